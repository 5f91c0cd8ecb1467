//! `redirect validate`: what Istio's validation init container
//! (`istio-iptables --run-validation`) checks, for a pod captured with eBPF.
//!
//! Outbound half, exactly as Istio does it. A child process (this binary
//! re-executed as the hidden `redirect validate-inside`) is placed in the
//! pod's network namespace and cgroup (the connect hooks only run for
//! processes in the attached cgroup or below) as the pod's first proxy
//! uid/gid. It listens on 127.0.0.1:<proxy port> and 127.0.0.1:<inbound
//! port> ([::1] for IPv6), dials 127.0.0.6:15002 ([::6]:15002) from
//! 127.0.0.1 ([::1]) and passes only if that connection is accepted on the
//! inbound port and the accepted socket's SO_ORIGINAL_DST
//! (IP6T_SO_ORIGINAL_DST) port is 15002: rule (2) of ISTIO_OUTPUT at work.
//! Like Istio's, it needs those two ports free: with the proxy already
//! running it fails and says so.
//!
//! Inbound half ("a connection from outside the pod lands on the inbound
//! port"). Sending a real connection from outside needs a sender outside
//! the pod netns that can reach the pod: a temporary veth into the pod
//! changes the pod's network (an interface, addresses, routes); a client in
//! whatever namespace already routes to the pod is, on a node, the host
//! namespace; injecting a forged SYN on the pod's interface
//! (XDP live frames) makes the pod answer with a SYN-ACK that leaves the
//! pod for an address nobody owns. None of those is clean, so the proof is
//! made with the kernel itself, sending nothing and changing nothing:
//!  - the pinned sk_lookup link is a live link attached to *this* netns
//!    (its link info names the pod's netns inode);
//!  - the validator's own listener on the inbound port was registered for
//!    inbound steering by the sockops listen hook (the listener map);
//!  - the very program instance attached to the pod netns is run by the
//!    kernel (`BPF_PROG_TEST_RUN`, the sk_lookup test-run) on the lookup a
//!    SYN from outside would make (TCP, 192.0.2.1 / 2001:db8::1 → pod IP :
//!    a captured port, not via lo), and the kernel reports which socket it
//!    would deliver the SYN to: it must be the validator's listener on the
//!    inbound port (same socket cookie).
//!
//! Like Istio's validation, which leaves one connection in the iptables
//! counters, each run adds one connection per family to the pod's
//! counters (OUTPUT `proxy_to_self_inbound`, ORIGINAL_DST answered,
//! PREROUTING `captured`, `listener_registered`).

use std::{
    io::{self, BufRead, BufReader, Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    os::unix::fs::MetadataExt,
    path::Path,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};
use redirect_common::{cidr_kind, inbound_verdict, port_kind, Lookup, PodConfig, Verdict};
use redirect_userspace::{
    error::Error,
    maps::Maps,
    pins::Pins,
    placement::{self, Placement},
    sockopt, sys,
};
use serde::{Deserialize, Serialize};

/// Port the probe dials (istio-iptables `--iptables-probe-port`).
pub const PROBE_PORT: u16 = 15002;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub pod: super::PodArgs,
    /// Original destination port of the probe connection.
    #[arg(long, default_value_t = PROBE_PORT)]
    pub probe_port: u16,
    /// How long to wait for each step inside the pod, in milliseconds.
    #[arg(long, default_value = "5000")]
    pub timeout_ms: u64,
}

/// The part that runs inside the pod (hidden subcommand).
#[derive(clap::Args)]
pub struct InsideArgs {
    #[arg(long)]
    pub v6: bool,
    #[arg(long)]
    pub proxy_port: u16,
    #[arg(long)]
    pub inbound_port: u16,
    #[arg(long)]
    pub probe_port: u16,
    #[arg(long)]
    pub timeout_ms: u64,
}

/// One JSON line from the inside part to the outside part.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
enum Event {
    Listening {
        inbound_cookie: u64,
        uid: u32,
        gid: u32,
    },
    Probe {
        from: String,
        dialed: String,
        accepted_on: String,
        orig_dst: String,
    },
    Failed {
        error: String,
    },
}

fn emit(e: &Event) {
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{}", serde_json::to_string(e).expect("serializable"));
    let _ = out.flush();
}

// ------------------------------------------------------------------ inside

/// Runs in the pod netns + cgroup as the proxy uid/gid. Prints events; on
/// success keeps its listeners open until stdin closes, so the outside part
/// can check the inbound steering against them.
pub fn run_inside(a: InsideArgs) -> Result<()> {
    match inside(&a) {
        Ok(_listeners) => {
            // Hold the listeners until the outside part is done.
            let _ = io::stdin().read_to_end(&mut Vec::new());
            Ok(())
        }
        Err(e) => {
            emit(&Event::Failed {
                error: format!("{e:#}"),
            });
            Err(e)
        }
    }
}

fn inside(a: &InsideArgs) -> Result<(TcpListener, TcpListener)> {
    let timeout = Duration::from_millis(a.timeout_ms);
    let (lo, probe_dst): (IpAddr, IpAddr) = if a.v6 {
        (
            Ipv6Addr::LOCALHOST.into(),
            "::6".parse::<Ipv6Addr>().unwrap().into(),
        )
    } else {
        (
            Ipv4Addr::LOCALHOST.into(),
            Ipv4Addr::new(127, 0, 0, 6).into(),
        )
    };
    let bind = |port: u16, what: &str| -> Result<TcpListener> {
        let addr = SocketAddr::new(lo, port);
        sockopt::listen(addr).map_err(|e| {
            if e.kind() == io::ErrorKind::AddrInUse {
                anyhow!(
                    "cannot listen on {addr} ({what} port): it is already in use in the pod. \
                     The proxy (or something else) already listens on port {port}; validation must run \
                     before the proxy starts, as Istio's validation init container does (it would fail the same way)"
                )
            } else {
                anyhow!("cannot listen on {addr} ({what} port): {e}")
            }
        })
    };
    let outbound = bind(a.proxy_port, "outbound capture")?;
    let inbound = bind(a.inbound_port, "inbound capture")?;
    emit(&Event::Listening {
        inbound_cookie: socket_cookie(&inbound)?,
        uid: unsafe { libc::getuid() },
        gid: unsafe { libc::getgid() },
    });

    let dst = SocketAddr::new(probe_dst, a.probe_port);
    let s = socket2::Socket::new(
        socket2::Domain::for_address(dst),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    s.bind(&SocketAddr::new(lo, 0).into())
        .with_context(|| format!("binding the probe socket to {lo}"))?;
    if let Err(e) = s.connect_timeout(&dst.into(), timeout) {
        bail!(
            "connecting from {lo} to {dst} failed ({e}): the connection was not sent to the inbound port {} \
             (nothing listens on {dst}); the connect hook did not apply ISTIO_OUTPUT rule 2 to this uid/gid \
             in this cgroup",
            a.inbound_port
        );
    }
    let probe: TcpStream = s.into();
    let from = probe.local_addr()?;

    for l in [&outbound, &inbound] {
        l.set_nonblocking(true)?;
    }
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("the probe connection {from} -> {dst} was established but never accepted on {lo}:{} or {lo}:{}", a.inbound_port, a.proxy_port);
        }
        let mut fds = [
            libc::pollfd {
                fd: outbound.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: inbound.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let n = unsafe {
            libc::poll(
                fds.as_mut_ptr(),
                2,
                left.as_millis().min(i32::MAX as u128) as i32,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e.into());
        }
        let mut accepted = None;
        for (l, port) in [(&outbound, a.proxy_port), (&inbound, a.inbound_port)] {
            if accepted.is_some() {
                break;
            }
            let (conn, peer) = match l.accept() {
                Ok(c) => c,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e.into()),
            };
            if peer != from {
                // Not ours (e.g. a connection steered here from outside
                // while we hold the port): Istio's server closes those too.
                drop(conn);
                continue;
            }
            conn.set_nonblocking(false)?;
            let orig = sockopt::original_dst(&conn).map_err(|e| {
                anyhow!("the probe {from} -> {dst} was accepted on {lo}:{port}, but SO_ORIGINAL_DST on the accepted socket failed: {e}")
            })?;
            if port != a.inbound_port {
                bail!("the probe {from} -> {dst} landed on the outbound capture port {port}, not on the inbound capture port {}", a.inbound_port);
            }
            if orig.port() != a.probe_port {
                bail!(
                    "the probe {from} -> {dst} was accepted on {lo}:{port} but SO_ORIGINAL_DST answered {orig}, not port {}",
                    a.probe_port
                );
            }
            accepted = Some(Event::Probe {
                from: from.to_string(),
                dialed: dst.to_string(),
                accepted_on: SocketAddr::new(lo, port).to_string(),
                orig_dst: orig.to_string(),
            });
        }
        if let Some(e) = accepted {
            emit(&e);
            return Ok((outbound, inbound));
        }
    }
}

fn socket_cookie(l: &TcpListener) -> Result<u64> {
    const SO_COOKIE: libc::c_int = 57;
    let mut v: u64 = 0;
    let mut len = 8 as libc::socklen_t;
    if unsafe {
        libc::getsockopt(
            l.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_COOKIE,
            (&mut v as *mut u64).cast(),
            &mut len,
        )
    } != 0
    {
        return Err(anyhow!(
            "SO_COOKIE of the inbound listener: {}",
            io::Error::last_os_error()
        ));
    }
    Ok(v)
}

// ----------------------------------------------------------------- outside

/// The inside part, killed (by pid) and reaped on drop.
struct Inside {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Inside {
    fn next(&mut self, timeout: Duration, waiting_for: &str) -> Result<Event> {
        match self.lines.recv_timeout(timeout) {
            Ok(l) => serde_json::from_str(&l)
                .with_context(|| format!("unexpected output of the validator in the pod: {l:?}")),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                bail!("the validator in the pod did not report {waiting_for} within {timeout:?}")
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let st = self.child.wait().map(|s| s.to_string()).unwrap_or_default();
                bail!("the validator in the pod exited ({st}) before reporting {waiting_for}")
            }
        }
    }

    /// Close its stdin and wait for it to leave.
    fn finish(mut self) {
        drop(self.child.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Inside {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// What one family's run established.
struct FamilyResult {
    v6: bool,
    probe: (String, String, String, String),
    inbound: Option<String>,
}

pub fn run(pin_dir: &Path, a: Args) -> Result<()> {
    sys::check_privileges()?;
    let pins = Pins::new(pin_dir);
    let maps = Maps::open(&pins)?;
    let netns = sys::Netns::open(&a.pod.netns)?;
    let cookie = netns.cookie()?;
    let Some(cfg) = maps.pod(cookie) else {
        return Err(Error::NotCaptured(a.pod.netns.display().to_string()).into());
    };
    let fail = |what: String| anyhow!("validation failed for {}: {what}", a.pod.netns.display());

    // The connect/getsockopt/sockops hooks must cover the cgroup we run in.
    // `--cgroup`, else the pod's recorded cgroup, else the root.
    let (cgroup, _, _) = super::pod_cgroup(pin_dir, a.pod.cgroup.as_deref(), &netns)?;
    check_cgroup_attached(&pins, &cgroup).map_err(fail)?;

    // Inbound steering: a live sk_lookup link on this very netns.
    let link_path = pins.sk_lookup_link(cookie);
    if !link_path.exists() {
        return Err(fail(format!(
            "inbound: no sk_lookup link is pinned at {} (attach did not finish?)",
            link_path.display()
        )));
    }
    let link = raw::obj_get(&link_path).map_err(|e| {
        fail(format!(
            "inbound: opening the pinned link {}: {e}",
            link_path.display()
        ))
    })?;
    let (prog_id, link_netns) = raw::netns_link_info(&link).map_err(|e| {
        fail(format!(
            "inbound: reading link {}: {e}",
            link_path.display()
        ))
    })?;
    if link_netns != netns.inode as u32 {
        return Err(fail(format!(
            "inbound: the sk_lookup link {} is attached to netns inode {link_netns}, not to this netns (inode {}); it is detached or stale",
            link_path.display(),
            netns.inode
        )));
    }
    let prog = raw::prog_by_id(prog_id).map_err(|e| {
        fail(format!(
            "inbound: opening sk_lookup program id {prog_id}: {e}"
        ))
    })?;

    let cidrs = maps.cidr_entries(cookie);
    let addr_of = |kind: u32| -> Option<IpAddr> {
        cidrs
            .iter()
            .filter(|(k, _)| *k == kind)
            .map(|(_, c)| c.addr)
            .find(|a| *a != "::6".parse::<IpAddr>().unwrap())
    };
    let (pod_v4, pod_v6) = (addr_of(cidr_kind::LOCAL_V4), addr_of(cidr_kind::LOCAL_V6));
    // IPv6 only where it is captured (as istio-iptables validates only
    // the families it wrote rules for).
    let test_v6 = pod_v6.is_some() && !cfg.has(redirect_common::flags::IPV6_OFF);
    let mut families = Vec::new();
    if pod_v4.is_some() || !test_v6 {
        families.push(false);
    }
    if test_v6 {
        families.push(true);
    }
    let uid = if cfg.uid_count > 0 { cfg.uids[0] } else { 1337 };
    let gid = if cfg.gid_count > 0 { cfg.gids[0] } else { uid };
    let captured_port = inbound_test_port(&cfg, &maps.port_entries(cookie));

    let mut results = Vec::new();
    for v6 in families {
        let fam = if v6 { "IPv6" } else { "IPv4" };
        let place = Placement {
            netns: Some(a.pod.netns.clone()),
            cgroup: Some(cgroup.clone()),
            uid: Some(uid),
            gid: Some(gid),
        };
        let timeout = Duration::from_millis(a.timeout_ms);
        let mut inside =
            spawn_inside(&place, &a, &cfg, v6).map_err(|e| fail(format!("{fam}: {e:#}")))?;
        let wait = timeout + Duration::from_secs(2);
        let listener_cookie = match inside
            .next(wait, "its listeners")
            .map_err(|e| fail(format!("{fam}: {e:#}")))?
        {
            Event::Listening {
                inbound_cookie,
                uid: u,
                gid: g,
            } => {
                if (u, g) != (uid, gid) {
                    return Err(fail(format!("{fam}: the validator runs as uid {u} gid {g}, not as the proxy's uid {uid} gid {gid}")));
                }
                inbound_cookie
            }
            Event::Failed { error } => return Err(fail(format!("{fam}: {error}"))),
            e => return Err(fail(format!("{fam}: unexpected report {e:?}"))),
        };
        let probe = match inside
            .next(wait, "the probe connection")
            .map_err(|e| fail(format!("{fam}: {e:#}")))?
        {
            Event::Probe {
                from,
                dialed,
                accepted_on,
                orig_dst,
            } => (from, dialed, accepted_on, orig_dst),
            Event::Failed { error } => return Err(fail(format!("{fam}: {error}"))),
            e => return Err(fail(format!("{fam}: unexpected report {e:?}"))),
        };

        // The validator's inbound listener, as the proxy's would be.
        if !listener_registered(&maps, cookie, v6) {
            return Err(fail(format!(
                "{fam}: the listener on the inbound port {} was not registered for inbound steering (sockops listen hook not run for cgroup {}?)",
                cfg.inbound_port,
                cgroup.display()
            )));
        }
        let pod_ip = if v6 { pod_v6 } else { pod_v4 };
        let inbound = match (pod_ip, captured_port) {
            (Some(ip), Some(port)) => {
                let client: IpAddr = if v6 {
                    "2001:db8::1".parse().unwrap()
                } else {
                    Ipv4Addr::new(192, 0, 2, 1).into()
                };
                let (retval, selected) = raw::sk_lookup_test_run(&prog, client, 40000, ip, port)
                    .map_err(|e| fail(format!("{fam}: inbound: running the pod's sk_lookup program (BPF_PROG_TEST_RUN): {e}")))?;
                let shown = SocketAddr::new(ip, port);
                if retval != 1 {
                    return Err(fail(format!("{fam}: inbound: a connection from outside to {shown} would be refused (sk_lookup verdict {retval}), not sent to the listener on :{}", cfg.inbound_port)));
                }
                if selected != listener_cookie {
                    return Err(fail(format!(
                        "{fam}: inbound: a connection from outside to {shown} would not land on the listener on :{} (sk_lookup selected {})",
                        cfg.inbound_port,
                        if selected == 0 { "no socket: normal delivery".to_string() } else { format!("socket cookie {selected}") }
                    )));
                }
                Some(format!(
                    "{client} -> {shown} lands on the :{} listener",
                    cfg.inbound_port
                ))
            }
            (None, _) => None,
            (_, None) => None,
        };
        inside.finish();
        results.push(FamilyResult { v6, probe, inbound });
    }

    let mut parts = Vec::new();
    for r in &results {
        let (from, dialed, accepted_on, orig) = &r.probe;
        parts.push(format!(
            "{from} -> {dialed} accepted on {accepted_on} with original destination {orig}"
        ));
    }
    let inbound: Vec<String> = results.iter().filter_map(|r| r.inbound.clone()).collect();
    let inbound = if captured_port.is_none() {
        "inbound capture is off (-b \"\"), nothing to steer".to_string()
    } else if inbound.is_empty() {
        "inbound not checked (the pod has no address)".to_string()
    } else {
        format!(
            "inbound from outside (sk_lookup on the pod netns, test run): {}",
            inbound.join("; ")
        )
    };
    let fams: Vec<&str> = results
        .iter()
        .map(|r| if r.v6 { "IPv6" } else { "IPv4" })
        .collect();
    println!(
        "validation ok: {} (netns cookie {cookie}) as uid {uid} gid {gid}, {}: {}; {inbound}",
        a.pod.netns.display(),
        fams.join("+"),
        parts.join("; ")
    );
    Ok(())
}

fn spawn_inside(place: &Placement, a: &Args, cfg: &PodConfig, v6: bool) -> Result<Inside> {
    let exe = std::env::current_exe().context("finding the redirect binary")?;
    let mut cmd = Command::new(&exe);
    cmd.arg("validate-inside")
        .args(["--proxy-port", &cfg.proxy_port.to_string()])
        .args(["--inbound-port", &cfg.inbound_port.to_string()])
        .args(["--probe-port", &a.probe_port.to_string()])
        .args(["--timeout-ms", &a.timeout_ms.to_string()]);
    if v6 {
        cmd.arg("--v6");
    }
    placement::place(&mut cmd, place)?;
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {} validate-inside in the pod", exe.display()))?;
    let out = child.stdout.take().expect("piped");
    let err = child.stderr.take().expect("piped");
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    // Its stderr only matters when it failed to start at all.
    std::thread::spawn(move || {
        for l in BufReader::new(err).lines().map_while(Result::ok) {
            if !l.starts_with("redirect: error:") {
                eprintln!("validator in pod: {l}");
            }
        }
    });
    Ok(Inside { child, lines })
}

/// Is there an inbound listener for this pod and family in the listener
/// map? (A sockhash with 4-byte values cannot be read from userspace, the
/// kernel answers ENOSPC to every lookup: look at its keys instead.)
fn listener_registered(maps: &Maps, cookie: u64, v6: bool) -> bool {
    let family = if v6 { libc::AF_INET6 } else { libc::AF_INET } as u32;
    maps.listeners
        .keys()
        .filter_map(|k| k.ok())
        .any(|k| k.netns == cookie && k.family == family)
}

/// A port a connection from outside would be captured on, if any, by the
/// same decision the kernel program makes.
fn inbound_test_port(cfg: &PodConfig, ports: &[(u16, u16)]) -> Option<u16> {
    struct Ports<'a>(&'a [(u16, u16)]);
    impl Lookup for Ports<'_> {
        fn port_listed(&self, kind: u16, port: u16) -> bool {
            self.0.contains(&(kind, port))
        }
        fn cidr_contains(&self, _kind: u32, _addr: &[u8; 16]) -> bool {
            false
        }
    }
    let l = Ports(ports);
    let captured = |p: &u16| {
        matches!(
            inbound_verdict(cfg, redirect_common::AF_INET, *p, &l),
            Verdict::ToInbound(_)
        )
    };
    if let Some(p) = [80, 8080, 9080].into_iter().find(captured) {
        return Some(p);
    }
    let mut listed: Vec<u16> = ports
        .iter()
        .filter(|(k, _)| *k == port_kind::IN_INCLUDE)
        .map(|(_, p)| *p)
        .collect();
    listed.sort();
    listed.into_iter().chain(1..=u16::MAX).find(captured)
}

/// Ok when this install's cgroup programs are attached to `cgroup` or one
/// of its ancestors (cgroup programs are inherited).
fn check_cgroup_attached(pins: &Pins, cgroup: &Path) -> std::result::Result<(), String> {
    let attached = pins.attached_cgroups();
    let root = sys::cgroup2_mount().ok();
    let mut dir = Some(cgroup.to_path_buf());
    while let Some(d) = dir {
        if let Ok(m) = std::fs::metadata(&d) {
            if attached.contains(&m.ino()) {
                return Ok(());
            }
        }
        if root.as_deref() == Some(d.as_path()) {
            break;
        }
        dir = d.parent().map(Path::to_path_buf);
    }
    Err(format!(
        "the connect hooks are not attached to cgroup {} or any parent: processes there are not captured \
         (pass the pod's cgroup with --cgroup, or attach with --cgroup <a parent of it>)",
        cgroup.display()
    ))
}

/// The raw bpf(2) commands validation needs (aya does not expose them).
mod raw {
    use super::*;

    const BPF_PROG_TEST_RUN: libc::c_long = 10;
    const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    const BPF_LINK_TYPE_NETNS: u32 = 5;

    fn bpf(cmd: libc::c_long, attr: &mut [u64; 16]) -> io::Result<i32> {
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                attr.as_mut_ptr(),
                std::mem::size_of_val(attr),
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(r as i32)
    }

    pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(io::Error::other)?;
        let mut attr = [0u64; 16];
        attr[0] = c.as_ptr() as u64;
        let fd = bpf(BPF_OBJ_GET, &mut attr)?;
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// (prog id, netns inode) of a netns link; inode 0 once detached.
    pub fn netns_link_info(link: &OwnedFd) -> io::Result<(u32, u32)> {
        // struct bpf_link_info: type, id, prog_id, then the union at 16
        // (netns: netns_ino, attach_type).
        let mut info = [0u32; 32];
        let mut attr = [0u64; 16];
        attr[0] = link.as_raw_fd() as u32 as u64 | ((std::mem::size_of_val(&info) as u64) << 32);
        attr[1] = info.as_mut_ptr() as u64;
        bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
        if info[0] != BPF_LINK_TYPE_NETNS {
            return Err(io::Error::other(format!(
                "not a netns link (link type {})",
                info[0]
            )));
        }
        Ok((info[2], info[4]))
    }

    pub fn prog_by_id(id: u32) -> io::Result<OwnedFd> {
        let mut attr = [0u64; 16];
        attr[0] = id as u64;
        let fd = bpf(BPF_PROG_GET_FD_BY_ID, &mut attr)?;
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// Run an sk_lookup program on a TCP lookup from `remote` to
    /// `local:port`; returns (verdict, cookie of the selected socket or 0).
    pub fn sk_lookup_test_run(
        prog: &OwnedFd,
        remote: IpAddr,
        rport: u16,
        local: IpAddr,
        port: u16,
    ) -> io::Result<(u32, u64)> {
        // struct bpf_sk_lookup (72 bytes): cookie@0, family@8, protocol@12,
        // remote_ip4@16, remote_ip6@20, remote_port@36 (be16),
        // local_ip4@40, local_ip6@44, local_port@60, ingress_ifindex@64.
        let mut ctx = [0u8; 72];
        let family = if local.is_ipv6() {
            libc::AF_INET6
        } else {
            libc::AF_INET
        } as u32;
        ctx[8..12].copy_from_slice(&family.to_ne_bytes());
        ctx[12..16].copy_from_slice(&(libc::IPPROTO_TCP as u32).to_ne_bytes());
        match remote {
            IpAddr::V4(a) => ctx[16..20].copy_from_slice(&a.octets()),
            IpAddr::V6(a) => ctx[20..36].copy_from_slice(&a.octets()),
        }
        ctx[36..38].copy_from_slice(&rport.to_be_bytes());
        match local {
            IpAddr::V4(a) => ctx[40..44].copy_from_slice(&a.octets()),
            IpAddr::V6(a) => ctx[44..60].copy_from_slice(&a.octets()),
        }
        ctx[60..64].copy_from_slice(&(port as u32).to_ne_bytes());
        let mut out = [0u8; 72];
        let mut attr = [0u64; 16];
        // prog_fd, retval | data_size_in, data_size_out | data_in | data_out
        // | repeat, duration | ctx_size_in, ctx_size_out | ctx_in | ctx_out
        attr[0] = prog.as_raw_fd() as u32 as u64;
        attr[4] = 1;
        attr[5] = ctx.len() as u64 | ((out.len() as u64) << 32);
        attr[6] = ctx.as_ptr() as u64;
        attr[7] = out.as_mut_ptr() as u64;
        bpf(BPF_PROG_TEST_RUN, &mut attr)?;
        let retval = (attr[0] >> 32) as u32;
        let cookie = u64::from_ne_bytes(out[0..8].try_into().unwrap());
        Ok((retval, cookie))
    }
}
