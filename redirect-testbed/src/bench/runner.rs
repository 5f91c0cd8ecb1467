//! The benchmark run: configurations A–E (and the rule-count scaling of
//! C, D, E) interleaved repetition by repetition, each in a fresh pod +
//! upstream namespace pair, under two CPU placements, with a check after
//! every configuration that the intended path was taken.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use super::{
    hist,
    loadgen::{LoadResult, Mode},
    model::{Cfg, Check, Machine, Place, ProxyKind, Run, Sample, Settings, Test, ECHO_PORT},
    report,
};
use crate::{
    istio_rules::{Host, IstioConfig, IstioRules},
    sandbox::{self, ChildGuard, Topology, UPSTREAM_V4},
};

pub const APP_UID: u32 = 1000;
pub const PROXY_UID: u32 = 1337;
const SINK_PORT: u16 = 7002;
/// The proxy-side echo of the app↔proxy leg listens on the outbound port.
const LEG_PORT: u16 = 15001;
/// The leg configurations, interleaved after the main ones in each round:
/// A = no capture (plain loopback TCP and AF_UNIX), D, E = through capture.
pub const LEG_CFGS: [Cfg; 3] = [Cfg::A, Cfg::D, Cfg::E];
/// Configuration B: the proxy's fixed-upstream listeners on 127.0.0.1.
const FIXED_ECHO: u16 = 15101;
const FIXED_SINK: u16 = 15102;
/// Istio's injected init arguments, minus `-x` (added per run).
pub(super) const ISTIO_FLAGS: [&str; 12] = [
    "-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-b", "*",
];
pub(super) const ISTIO_EXCLUDE_INBOUND: &str = "15090,15021,15020";

pub struct Options {
    pub quick: bool,
    pub proxy: ProxyKind,
    pub out: PathBuf,
    /// Override the number of measured repetitions.
    pub reps: Option<usize>,
    /// Override the open-loop rate (requests/s).
    pub rate: Option<u64>,
}

static STOP: AtomicBool = AtomicBool::new(false);

pub(super) extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

pub(super) fn stopped() -> Result<()> {
    if STOP.load(Ordering::SeqCst) {
        bail!("interrupted: cleaning up");
    }
    Ok(())
}

pub(super) fn settings(o: &Options) -> Settings {
    let ncpu = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let places = if ncpu >= 2 {
        vec![Place::Same, Place::Split]
    } else {
        vec![Place::Same]
    };
    let (reps, dur, warm) = if o.quick {
        (2, 250, 50)
    } else {
        (5, 1000, 200)
    };
    Settings {
        quick: o.quick,
        reps: o.reps.unwrap_or(reps),
        warmup_round: !o.quick,
        duration_ms: dur,
        warmup_ms: warm,
        open_rate: o.rate.unwrap_or(5000),
        rule_counts: vec![1000, 10_000],
        places,
        proxy: o.proxy,
    }
}

/// `count` distinct never-used /32s in 198.18.0.0/15 (RFC 2544 benchmark
/// space), shortest text first so that 10k of them fit in one argument.
pub fn exclusion_addrs(count: usize) -> Vec<Ipv4Addr> {
    let mut all: Vec<Ipv4Addr> = (18u8..=19)
        .flat_map(|b| {
            (0..=255u8).flat_map(move |x| (0..=255u8).map(move |y| Ipv4Addr::new(198, b, x, y)))
        })
        .collect();
    all.sort_by_key(|a| a.to_string().len());
    all.truncate(count);
    all
}

/// The nat table istio-init writes for the injector's arguments, with
/// `extra` never-matching exclusions (`-x <addr>/32`, one `-d <addr>/32 -j
/// RETURN` rule each): istio-iptables puts them after rule (8), before
/// (9), so the app's every new connection walks them. Written by the
/// differential test's rule writer ([`crate::istio_rules`]), IPv4 only.
pub fn istio_nat_rules(extra: &[Ipv4Addr]) -> String {
    let x: Vec<String> = extra.iter().map(|a| format!("{a}/32")).collect();
    let mut args: Vec<String> = ISTIO_FLAGS.iter().map(|s| s.to_string()).collect();
    let x = x.join(",");
    args.extend(["-x", &x, "-d", ISTIO_EXCLUDE_INBOUND].map(String::from));
    let cfg = IstioConfig::parse(&args, |_| None).expect("the injector's arguments parse");
    let host = Host::default();
    IstioRules::build(&cfg, &host)
        .expect("the injector's arguments have rules")
        .restore(false)
        .expect("IPv4 rules")
}

/// How many rules [`istio_nat_rules`] holds.
fn istio_nat_rule_count(extra: &[Ipv4Addr]) -> usize {
    istio_nat_rules(extra)
        .lines()
        .filter(|l| l.starts_with("-A ") || l.starts_with("-I "))
        .count()
}

/// `iptables-restore` of `rules` in the named netns (`ip netns exec`),
/// failing with its stderr. The benchmark and the Bookinfo demo load
/// [`istio_nat_rules`] with it (the demo with Istio's default flags, until
/// a general istio-init rule writer replaces this fixed one there).
pub fn iptables_restore(netns: &str, rules: &str) -> Result<()> {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", netns, "iptables-restore"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = c.spawn().context("starting iptables-restore")?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(rules.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "iptables-restore in {netns}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// `redirect attach`'s flags for Istio's injected init arguments, with
/// `exclude_cidrs` as `-x` (the same flags [`istio_nat_rules`] writes
/// rules for).
pub fn istio_attach_args(exclude_cidrs: &str) -> Vec<String> {
    ISTIO_FLAGS
        .iter()
        .map(|s| s.to_string())
        .chain(
            ["-x", exclude_cidrs, "-d", ISTIO_EXCLUDE_INBOUND]
                .iter()
                .map(|s| s.to_string()),
        )
        .collect()
}

fn kit_bin() -> PathBuf {
    sandbox::sibling_binary("redirect-kit")
}

pub(super) fn redirect_bin() -> PathBuf {
    sandbox::sibling_binary("redirect")
}

/// Pin every thread of `pid` to `cpu` (threads created later inherit it).
fn pin(pid: u32, cpu: usize) -> Result<()> {
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    unsafe { libc::CPU_SET(cpu, &mut set) };
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .with_context(|| format!("threads of {pid}"))?
    {
        let tid: i32 = t?.file_name().to_string_lossy().parse().unwrap_or(0);
        if unsafe { libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) }
            != 0
        {
            bail!(
                "sched_setaffinity({tid}, cpu {cpu}): {}",
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(())
}

/// Run the benchmark's processes at nice -20, so the other load on a shared
/// machine delays their wake-ups less (set before `place` drops root).
fn boost(cmd: &mut Command) {
    unsafe {
        cmd.pre_exec(|| {
            if libc::setpriority(libc::PRIO_PROCESS, 0, -20) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

fn netns_exec(ns: &str, args: &[&str]) -> Result<String> {
    let mut a = vec!["netns", "exec", ns];
    a.extend_from_slice(args);
    sandbox::run("ip", &a).map_err(Into::into)
}

/// Debian's haproxy as the sidecar, killed by PID and its directory
/// removed on drop.
struct Haproxy {
    child: std::process::Child,
    dir: PathBuf,
}

const HAPROXY: &str = "/usr/sbin/haproxy";

impl Haproxy {
    fn start(topo: &Topology) -> Result<Haproxy> {
        use std::os::unix::fs::PermissionsExt;
        if !Path::new(HAPROXY).exists() {
            bail!("{HAPROXY} missing: run `cargo xtask setup` (or apt-get install -y haproxy)");
        }
        let dir = std::env::temp_dir().join(sandbox::unique("rdb-haproxy-"));
        std::fs::create_dir(&dir)?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
        let cfg = dir.join("haproxy.cfg");
        std::fs::write(
            &cfg,
            format!(
                "global\n  maxconn 8000\n  nbthread 1\n\
                 defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\
                 frontend outbound\n  bind 0.0.0.0:15001\n  default_backend original_dst\n\
                 backend original_dst\n  server orig 0.0.0.0:0\n\
                 frontend fixed_echo\n  bind 127.0.0.1:{FIXED_ECHO}\n  default_backend echo\n\
                 backend echo\n  server echo {UPSTREAM_V4}:{ECHO_PORT}\n\
                 frontend fixed_sink\n  bind 127.0.0.1:{FIXED_SINK}\n  default_backend sink\n\
                 backend sink\n  server sink {UPSTREAM_V4}:{SINK_PORT}\n"
            ),
        )?;
        std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o644))?;
        let mut cmd = Command::new(HAPROXY);
        cmd.arg("-db").arg("-f").arg(&cfg);
        cmd.stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.join("out.log"))?)
            .stderr(std::fs::File::create(dir.join("err.log"))?);
        boost(&mut cmd);
        sandbox::place(&mut cmd, &topo.in_pod(PROXY_UID, PROXY_UID))?;
        let child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                bail!("starting haproxy: {e}");
            }
        };
        let mut h = Haproxy { child, dir };
        // Ready when the fixed echo frontend answers from inside the pod.
        let ns = redirect_userspace::sys::Netns::open(&topo.pod.path())?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(st)) = h.child.try_wait() {
                bail!(
                    "haproxy exited ({st}): {}",
                    std::fs::read_to_string(h.dir.join("err.log")).unwrap_or_default()
                );
            }
            let up = ns
                .run(|| {
                    let mut s = std::net::TcpStream::connect_timeout(
                        &SocketAddr::from(([127, 0, 0, 1], FIXED_ECHO)),
                        Duration::from_millis(200),
                    )?;
                    s.set_read_timeout(Some(Duration::from_millis(500)))?;
                    s.write_all(b"x")?;
                    let mut b = [0u8; 1];
                    s.read_exact(&mut b)
                })
                .is_ok();
            if up {
                return Ok(h);
            }
            if Instant::now() > deadline {
                bail!(
                    "haproxy not ready after 10 s: {}",
                    std::fs::read_to_string(h.dir.join("err.log")).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

enum Sidecar {
    Kit(ChildGuard),
    Haproxy(Haproxy),
}

impl Sidecar {
    fn pid(&self) -> u32 {
        match self {
            Sidecar::Kit(c) => c.pid(),
            Sidecar::Haproxy(h) => h.child.id(),
        }
    }

    /// The kit proxy's counters (SIGUSR1 → one stats line); None for haproxy.
    fn counters(&mut self) -> Option<serde_json::Value> {
        let Sidecar::Kit(c) = self else { return None };
        let _ = c.take_lines();
        unsafe { libc::kill(c.pid() as i32, libc::SIGUSR1) };
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            for l in c.take_lines() {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&l) {
                    if v["event"] == "stats" {
                        return Some(v["counters"].clone());
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }
}

/// One configuration instance: fresh namespaces, servers, sidecar and
/// capture; removed in reverse order on drop.
pub(super) struct Env {
    cfg: Cfg,
    rules: usize,
    /// App↔proxy leg: the "proxy" is an echo (TCP :15001 and AF_UNIX
    /// `unix`), no upstream server.
    leg: bool,
    unix: String,
    server: Option<ChildGuard>,
    proxy: Option<Sidecar>,
    pin_dir: Option<PathBuf>,
    topo: Option<Topology>,
    /// Connections the app made (from the load generator's reports).
    conns: u64,
}

impl Drop for Env {
    fn drop(&mut self) {
        self.proxy.take();
        self.server.take();
        if let Some(p) = self.pin_dir.take() {
            if p.exists() {
                let out = Command::new(redirect_bin())
                    .arg("--pin-dir")
                    .arg(&p)
                    .arg("uninstall")
                    .output();
                if !matches!(&out, Ok(o) if o.status.success()) {
                    eprintln!("bench: uninstall of {} failed: {out:?}", p.display());
                }
            }
        }
        self.topo.take();
    }
}

impl Env {
    pub(super) fn new(cfg: Cfg, rules: usize, proxy: ProxyKind, leg: bool) -> Result<Env> {
        let topo = Topology::new("bench").context("creating the pod and upstream namespaces")?;
        let mut env = Env {
            cfg,
            rules,
            leg,
            unix: sandbox::unique("rdb-leg-"),
            server: None,
            proxy: None,
            pin_dir: None,
            topo: None,
            conns: 0,
        };
        for ns in [&topo.pod.name, &topo.upstream.name] {
            // Connection-rate runs leave tens of thousands of TIME_WAIT
            // sockets: widen the port range and reuse them (per netns).
            netns_exec(
                ns,
                &[
                    "sysctl",
                    "-q",
                    "-w",
                    "net.ipv4.ip_local_port_range=10000 65000",
                    "net.ipv4.tcp_tw_reuse=1",
                ],
            )?;
        }
        if leg {
            // The proxy side of the leg: an echo as uid/gid 1337 in the pod
            // (netns and cgroup), on the outbound capture port and on an
            // abstract AF_UNIX name (abstract names are per netns).
            let mut e = Command::new(kit_bin());
            boost(&mut e);
            e.args([
                "bench-server",
                "--echo",
                &format!("0.0.0.0:{LEG_PORT}"),
                "--unix-echo",
                &env.unix,
            ]);
            env.proxy = Some(Sidecar::Kit(ChildGuard::spawn(
                "bench-leg-echo",
                e,
                &topo.in_pod(PROXY_UID, PROXY_UID),
                true,
            )?));
        } else {
            let mut server = Command::new(kit_bin());
            boost(&mut server);
            server.args([
                "bench-server",
                "--echo",
                &format!("{UPSTREAM_V4}:{ECHO_PORT}"),
                "--sink",
                &format!("{UPSTREAM_V4}:{SINK_PORT}"),
            ]);
            env.server = Some(ChildGuard::spawn(
                "bench-server",
                server,
                &topo.in_upstream(),
                true,
            )?);
        }
        if cfg != Cfg::A && !leg {
            env.proxy = Some(match proxy {
                ProxyKind::Kit => {
                    let mut p = Command::new(kit_bin());
                    boost(&mut p);
                    p.args(["bench-proxy", "--port", "15001"]);
                    p.args([
                        "--fixed",
                        &format!("{FIXED_ECHO}={UPSTREAM_V4}:{ECHO_PORT}"),
                    ]);
                    p.args([
                        "--fixed",
                        &format!("{FIXED_SINK}={UPSTREAM_V4}:{SINK_PORT}"),
                    ]);
                    Sidecar::Kit(ChildGuard::spawn(
                        "bench-proxy",
                        p,
                        &topo.in_pod(PROXY_UID, PROXY_UID),
                        true,
                    )?)
                }
                ProxyKind::Haproxy => Sidecar::Haproxy(Haproxy::start(&topo)?),
            });
        }
        let extra = exclusion_addrs(rules);
        match cfg {
            Cfg::A | Cfg::B => {}
            Cfg::C => iptables_restore(&topo.pod.name, &istio_nat_rules(&extra))?,
            Cfg::D | Cfg::E => {
                let pin = PathBuf::from(format!("/sys/fs/bpf/{}", sandbox::unique("rdb-")));
                env.pin_dir = Some(pin.clone());
                let x: Vec<String> = extra.iter().map(|a| a.to_string()).collect();
                let x = x.join(",");
                let ns = topo.pod.path();
                let mut c = Command::new(redirect_bin());
                c.arg("--pin-dir")
                    .arg(&pin)
                    .args(["attach", "--netns"])
                    .arg(&ns)
                    .arg("--cgroup")
                    .arg(&topo.cgroup.path);
                c.args(istio_attach_args(&x));
                c.arg(if cfg == Cfg::D {
                    "--no-accel"
                } else {
                    "--accel"
                });
                let out = c.output().context("running redirect attach")?;
                if !out.status.success() {
                    bail!(
                        "redirect attach ({cfg:?}, {rules} exclusions): {}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
            }
        }
        env.topo = Some(topo);
        Ok(env)
    }

    fn topo(&self) -> &Topology {
        self.topo
            .as_ref()
            .expect("topology lives as long as the env")
    }

    /// The install of D and E.
    pub(super) fn pin_dir(&self) -> Option<&Path> {
        self.pin_dir.as_deref()
    }

    /// The pod's network namespace.
    pub(super) fn pod_netns(&self) -> PathBuf {
        self.topo().pod.path()
    }

    /// Connections the app made so far.
    pub(super) fn conns(&self) -> u64 {
        self.conns
    }

    pub(super) fn place(&self, p: Place) -> Result<usize> {
        let (client, rest) = p.cpus();
        if let Some(s) = &self.server {
            pin(s.pid(), rest)?;
        }
        if let Some(px) = &self.proxy {
            pin(px.pid(), rest)?;
        }
        Ok(client)
    }

    fn targets(&self) -> (SocketAddr, SocketAddr) {
        let up: Ipv4Addr = UPSTREAM_V4.parse().expect("address");
        if self.leg {
            // A: plain loopback to the echo; D/E: the upstream address,
            // which capture sends to the echo on :15001 instead.
            let t = if self.cfg == Cfg::A {
                SocketAddr::from(([127, 0, 0, 1], LEG_PORT))
            } else {
                SocketAddr::from((up, ECHO_PORT))
            };
            return (t, t);
        }
        match self.cfg {
            Cfg::B => (
                SocketAddr::from(([127, 0, 0, 1], FIXED_ECHO)),
                SocketAddr::from(([127, 0, 0, 1], FIXED_SINK)),
            ),
            _ => (
                SocketAddr::from((up, ECHO_PORT)),
                SocketAddr::from((up, SINK_PORT)),
            ),
        }
    }

    /// One load generator run as the app, on `cpu`.
    pub(super) fn load(&mut self, test: Test, cpu: usize, s: &Settings) -> Result<LoadResult> {
        let (mode, size) = test.mode();
        let (echo, sink) = self.targets();
        let target = if mode == Mode::Bulk { sink } else { echo };
        let mut cmd = Command::new(kit_bin());
        cmd.arg("bench-load")
            .args([
                "--mode",
                &format!("{mode:?}").to_lowercase(),
                "--target",
                &target.to_string(),
                "--size",
                &size.to_string(),
            ])
            .args([
                "--duration-ms",
                &s.duration_ms.to_string(),
                "--warmup-ms",
                &s.warmup_ms.to_string(),
                "--rate",
                &s.open_rate.to_string(),
            ]);
        if mode == Mode::Unix {
            cmd.args(["--unix", &self.unix]);
        }
        boost(&mut cmd);
        sandbox::place(&mut cmd, &self.topo().in_pod(APP_UID, APP_UID))?;
        unsafe {
            cmd.pre_exec(move || {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                libc::CPU_SET(cpu, &mut set);
                if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        // Bulk CPU: the sidecar's and the server's CPU time over the load
        // generator's life (tick accounting charges softirq work to the
        // task it interrupts: here, these), plus the generator's own.
        let pids: Vec<u32> = self
            .server
            .iter()
            .map(ChildGuard::pid)
            .chain(self.proxy.iter().map(Sidecar::pid))
            .collect();
        let cpu0: f64 = pids.iter().map(|p| proc_cpu_s(*p)).sum();
        let out = cmd
            .stdin(Stdio::null())
            .output()
            .context("running the load generator")?;
        let others = pids.iter().map(|p| proc_cpu_s(*p)).sum::<f64>() - cpu0;
        let mut r: LoadResult = serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "load generator output {:?} {:?}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
        if r.total_bytes > 0 {
            r.cpu_s = r.self_cpu_s + others;
        }
        self.conns += r.conns;
        if let Some(e) = &r.error {
            bail!(
                "{:?} {test:?} with {} rules: load generator failed: {e}",
                self.cfg,
                self.rules
            );
        }
        Ok(r)
    }

    /// Was the intended path taken? Our counters, iptables counters, the
    /// proxy's own counts, and nothing stray.
    pub(super) fn verify(
        &mut self,
        rep: usize,
        accel: &mut BTreeMap<String, u64>,
        accel_rows: &mut bool,
    ) -> Check {
        let mut problems = Vec::new();
        let mut facts = Vec::new();
        let conns = self.conns;
        let topo = self.topo.as_ref().expect("topology");
        let pod = topo.pod.name.clone();
        let pod_path = topo.pod.path();
        let cgroup = topo.cgroup.path.clone();
        let inode = std::fs::metadata(&pod_path)
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
            .unwrap_or(0);

        // iptables: rules in the pod netns (nft and legacy backends).
        let save = netns_exec(&pod, &["iptables-save", "-c", "-t", "nat"]).unwrap_or_default();
        let rule_lines = save.lines().filter(|l| l.contains("-A ")).count();
        let legacy = netns_exec(&pod, &["iptables-legacy-save"]).unwrap_or_default();
        let legacy_lines = legacy.lines().filter(|l| l.starts_with("-A ")).count();
        if legacy_lines > 0 {
            problems.push(format!(
                "{legacy_lines} iptables-legacy rules in the pod netns"
            ));
        }
        // BPF: programs effective on the pod's cgroup, links on its netns.
        let effective = Command::new("bpftool")
            .args(["-j", "cgroup", "show"])
            .arg(&cgroup)
            .arg("effective")
            .output();
        let cg_progs: Vec<String> = effective
            .ok()
            .and_then(|o| serde_json::from_slice::<Vec<serde_json::Value>>(&o.stdout).ok())
            .unwrap_or_default()
            .iter()
            .map(|p| p["attach_type"].as_str().unwrap_or("?").to_string())
            .collect();
        let links = Command::new("bpftool")
            .args(["-j", "link", "show"])
            .output();
        let netns_links = links
            .ok()
            .and_then(|o| serde_json::from_slice::<Vec<serde_json::Value>>(&o.stdout).ok())
            .unwrap_or_default()
            .iter()
            .filter(|l| l["netns_ino"].as_u64() == Some(inode))
            .count();
        let proxy = self.proxy.as_mut().and_then(Sidecar::counters);
        // TCP retransmissions in the pod: any here would put RTO-sized
        // (200 ms+) stalls into the tails.
        let retrans = tcp_retrans(&pod);
        if retrans > 0 {
            facts.push(format!("{retrans} TCP segments retransmitted in the pod"));
        }
        match self.cfg {
            Cfg::A | Cfg::B => {
                if rule_lines > 0 {
                    problems.push(format!("{rule_lines} nat rules in the pod netns"));
                }
                if !cg_progs.is_empty() || netns_links > 0 {
                    problems.push(format!(
                        "BPF attached to the pod: cgroup {cg_progs:?}, {netns_links} netns links"
                    ));
                }
            }
            Cfg::C => {
                let redirected = save
                    .lines()
                    .find(|l| l.contains("-A ISTIO_REDIRECT") && l.contains("--to-ports 15001"))
                    .and_then(|l| l.strip_prefix('[')?.split(':').next()?.parse::<u64>().ok());
                match redirected {
                    Some(n) if n >= conns => facts.push(format!("iptables REDIRECT to 15001 counted {n} packets for {conns} app connections")),
                    Some(n) => problems.push(format!("iptables REDIRECT counted {n} packets, fewer than the {conns} app connections")),
                    None => problems.push("no ISTIO_REDIRECT REDIRECT rule found by iptables-save".into()),
                }
                let want = istio_nat_rule_count(&exclusion_addrs(self.rules));
                if rule_lines != want {
                    problems.push(format!(
                        "{rule_lines} nat rules in the pod netns, {want} expected"
                    ));
                }
                if !cg_progs.is_empty() || netns_links > 0 {
                    problems.push(format!(
                        "BPF attached to the pod: cgroup {cg_progs:?}, {netns_links} netns links"
                    ));
                }
            }
            Cfg::D | Cfg::E => {
                if rule_lines > 0 {
                    problems.push(format!("{rule_lines} stray nat rules in the pod netns"));
                }
                if !cg_progs.iter().any(|p| p.contains("inet4_connect")) {
                    problems.push(format!(
                        "no inet4_connect program effective on the pod cgroup ({cg_progs:?})"
                    ));
                }
                if netns_links != 1 {
                    problems.push(format!(
                        "{netns_links} BPF links on the pod netns, 1 (sk_lookup) expected"
                    ));
                }
                match self.stats() {
                    Ok(rows) => {
                        let count = |chain: &str, rule: &str| {
                            rows.iter()
                                .find(|r| r["chain"] == chain && r["rule"] == rule)
                                .and_then(|r| r["count"].as_u64())
                        };
                        match count("OUTPUT", "captured") {
                            Some(n) if n == conns => {
                                facts.push(format!("OUTPUT/captured = {n} = app connections"))
                            }
                            n => problems.push(format!(
                                "OUTPUT/captured = {n:?}, {conns} app connections made"
                            )),
                        }
                        if let Some(n) = count("OUTPUT", "skip_excluded_cidr").filter(|n| *n > 0) {
                            problems.push(format!("{n} connections matched an exclusion entry"));
                        }
                        let accel_now: Vec<(String, u64)> = rows
                            .iter()
                            .filter(|r| r["chain"] == "ACCEL")
                            .map(|r| {
                                (
                                    r["rule"].as_str().unwrap_or("?").to_string(),
                                    r["count"].as_u64().unwrap_or(0),
                                )
                            })
                            .collect();
                        if self.cfg == Cfg::E {
                            *accel_rows |= !accel_now.is_empty();
                            for (k, v) in &accel_now {
                                *accel.entry(k.clone()).or_default() += v;
                            }
                            facts.push(format!("ACCEL rows: {accel_now:?}"));
                        } else if accel_now.iter().any(|(_, v)| *v > 0) {
                            problems.push(format!(
                                "D ran with --no-accel but ACCEL counters moved: {accel_now:?}"
                            ));
                        }
                    }
                    Err(e) => problems.push(format!("redirect stats: {e:#}")),
                }
            }
        }
        if let (true, Some(c)) = (self.leg, &proxy) {
            // The leg's echo: every app connection (TCP and AF_UNIX) and
            // nothing else; no relay work.
            let accepted = c["accepted"].as_u64().unwrap_or(0);
            if accepted != conns {
                problems.push(format!(
                    "leg echo accepted {accepted} connections; {conns} app connections"
                ));
            } else {
                facts.push(format!("leg echo: {accepted} accepted"));
            }
        } else if let Some(c) = proxy {
            let (accepted, orig) = (
                c["accepted"].as_u64().unwrap_or(0),
                c["orig_dst_ok"].as_u64().unwrap_or(0),
            );
            let (want_fixed, want_orig) = if self.cfg == Cfg::B {
                (conns, 0)
            } else {
                (0, conns)
            };
            // B's proxy also served the readiness probe of nothing: exact counts.
            if c["fixed"].as_u64().unwrap_or(0) != want_fixed || orig != want_orig {
                problems.push(format!("proxy counted {accepted} accepted, {orig} SO_ORIGINAL_DST, {} fixed; {conns} app connections", c["fixed"]));
            } else {
                facts.push(format!(
                    "proxy: {accepted} accepted, {orig} via SO_ORIGINAL_DST"
                ));
            }
        } else if self.cfg == Cfg::A {
            facts.push("no proxy".into());
        }
        let ok = problems.is_empty();
        let mut detail = problems;
        detail.extend(facts);
        Check {
            rep,
            cfg: self.cfg,
            rules: self.rules,
            leg: self.leg,
            ok,
            detail: detail.join("; "),
        }
    }

    fn stats(&self) -> Result<Vec<serde_json::Value>> {
        let pin = self.pin_dir.as_ref().context("no pin dir")?;
        let out = Command::new(redirect_bin())
            .arg("--pin-dir")
            .arg(pin)
            .args(["stats", "--json", "--netns"])
            .arg(self.topo().pod.path())
            .output()?;
        if !out.status.success() {
            bail!("{}", String::from_utf8_lossy(&out.stderr));
        }
        let v: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout)?;
        Ok(v.first()
            .and_then(|p| p["rules"].as_array().cloned())
            .unwrap_or_default())
    }
}

/// User + system CPU seconds of a process, all its threads (live and exited).
fn proc_cpu_s(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<f64> = rest
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    // After "(comm)": state ppid ... utime is field 14 and stime 15 of the line.
    let ticks = f.get(10).copied().unwrap_or(0.0) + f.get(11).copied().unwrap_or(0.0);
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64
}

/// `Tcp: RetransSegs` of a netns (/proc/net/snmp is per netns).
fn tcp_retrans(ns: &str) -> u64 {
    let snmp = netns_exec(ns, &["cat", "/proc/net/snmp"]).unwrap_or_default();
    let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let (Some(names), Some(values)) = (tcp.next(), tcp.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "RetransSegs")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

pub(super) fn sample(
    rep: usize,
    cfg: Cfg,
    place: Place,
    test: Test,
    rules: usize,
    r: LoadResult,
) -> Sample {
    let h = hist::from_buckets(&r.hist);
    let has = !h.is_empty();
    Sample {
        rep,
        cfg,
        place,
        test,
        rules,
        rate: r.rate,
        p50_us: if has { hist::us(&h, 0.5) } else { 0.0 },
        p99_us: if has { hist::us(&h, 0.99) } else { 0.0 },
        p999_us: if has { hist::us(&h, 0.999) } else { 0.0 },
        gbit_s: r.gbit_s,
        cpu_s_per_gb: if r.total_bytes > 0 {
            r.cpu_s / (r.total_bytes as f64 / 1e9)
        } else {
            0.0
        },
        conns: r.conns,
        hist: r.hist,
    }
}

pub(super) fn load_avg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Run the whole benchmark and write the report. Returns the report path
/// and whether every path check passed.
pub fn run(o: &Options) -> Result<(PathBuf, bool)> {
    if redirect_userspace::sys::check_privileges().is_err() {
        bail!("the benchmark needs root (namespaces, cgroups, iptables, BPF)");
    }
    for b in [kit_bin(), redirect_bin()] {
        if !b.exists() {
            bail!(
                "{} missing: build with `cargo xtask build` (or run `cargo xtask bench`)",
                b.display()
            );
        }
    }
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    // One benchmark at a time on a machine: two would measure each other.
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open("/run/lock/redirect-bench.lock")
        .context("opening /run/lock/redirect-bench.lock")?;
    if unsafe {
        libc::flock(
            std::os::fd::AsRawFd::as_raw_fd(&lock),
            libc::LOCK_EX | libc::LOCK_NB,
        )
    } != 0
    {
        eprintln!(
            "bench: another benchmark run holds /run/lock/redirect-bench.lock; waiting for it"
        );
        if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) } != 0 {
            bail!(
                "locking /run/lock/redirect-bench.lock: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    let s = settings(o);
    let t0 = Instant::now();
    let started = report::utc_now();
    let load_before = load_avg();
    let mut samples = Vec::new();
    let mut checks = Vec::new();
    let mut accel = BTreeMap::new();
    let mut accel_rows = false;
    let mut leg_accel = BTreeMap::new();
    let mut leg_rows = false;
    let rounds = s.reps + usize::from(s.warmup_round);
    let log = |msg: String| {
        eprintln!("[{:6.1}s] {msg}", t0.elapsed().as_secs_f64());
    };
    for round in 0..rounds {
        // Round 0 of a full run warms caches, page tables and the BPF
        // object load path; it is measured and then discarded.
        let warm = s.warmup_round && round == 0;
        let rep = if s.warmup_round { round } else { round + 1 };
        let mut units: Vec<(Cfg, usize, bool)> = Cfg::ALL.iter().map(|c| (*c, 0, false)).collect();
        for n in &s.rule_counts {
            units.extend(Cfg::SCALED.iter().map(|c| (*c, *n, false)));
        }
        // The app↔proxy leg (issue 4: no slower than AF_UNIX), A D E.
        units.extend(LEG_CFGS.iter().map(|c| (*c, 0, true)));
        for (cfg, rules, leg) in units {
            stopped()?;
            let tests: &[Test] = match (leg, cfg, rules) {
                (true, Cfg::A, _) => &[Test::Leg64, Test::Unix64],
                (true, _, _) => &[Test::Leg64],
                (false, _, 0) => &Test::ALL,
                (false, _, _) => &[Test::Conn],
            };
            log(format!(
                "{} {cfg:?}{} rules={rules}",
                if warm {
                    "warm-up".to_string()
                } else {
                    format!("rep {rep}/{}", s.reps)
                },
                if leg { " leg" } else { "" }
            ));
            let mut env = Env::new(cfg, rules, s.proxy, leg).with_context(|| {
                format!(
                    "setting up {cfg:?}{} with {rules} rules",
                    if leg { " leg" } else { "" }
                )
            })?;
            for place in &s.places {
                let cpu = env.place(*place)?;
                for t in tests {
                    stopped()?;
                    let r = env.load(*t, cpu, &s)?;
                    if !warm {
                        samples.push(sample(rep, cfg, *place, *t, rules, r));
                    }
                }
            }
            let c = if leg {
                env.verify(rep, &mut leg_accel, &mut leg_rows)
            } else {
                env.verify(rep, &mut accel, &mut accel_rows)
            };
            if !c.ok {
                log(format!(
                    "CHECK FAILED {cfg:?}{} rules={rules}: {}",
                    if leg { " leg" } else { "" },
                    c.detail
                ));
            }
            if !warm {
                checks.push(c);
            }
        }
    }
    let run = Run {
        settings: s,
        samples,
        checks,
        accel,
        accel_rows_present: accel_rows,
        leg_accel,
        leg_accel_rows_present: leg_rows,
        machine: Machine::probe(),
        started,
        elapsed_s: t0.elapsed().as_secs_f64(),
        load_before,
        load_after: load_avg(),
    };
    let ok = run.checks.iter().all(|c| c.ok);
    let path = report::write(&run, &o.out)?;
    Ok((path, ok))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ten_thousand_exclusions_fit_in_one_argument() {
        let a = exclusion_addrs(10_000);
        let set: std::collections::HashSet<_> = a.iter().collect();
        assert_eq!(set.len(), 10_000);
        assert!(a
            .iter()
            .all(|x| x.octets()[0] == 198 && (18..=19).contains(&x.octets()[1])));
        let arg = a
            .iter()
            .map(|x| x.to_string())
            .collect::<Vec<_>>()
            .join(",");
        // MAX_ARG_STRLEN: one execve argument is at most 32 pages.
        assert!(arg.len() < 131_072, "{}", arg.len());
    }

    #[test]
    fn nat_table_is_istio_init_plus_extra_rules_before_the_redirect() {
        let extra = exclusion_addrs(3);
        let t = istio_nat_rules(&extra);
        // istio-init's 18 rules (three -d ports) and one per exclusion.
        assert_eq!(t.lines().filter(|l| l.starts_with("-A ")).count(), 18 + 3);
        assert_eq!(istio_nat_rule_count(&extra), 18 + 3);
        let pos = |needle: &str| t.find(needle).unwrap_or_else(|| panic!("{needle} missing"));
        assert!(
            pos("-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN") < pos(&format!("-d {}/32", extra[0]))
        );
        assert!(pos(&format!("-d {}/32", extra[2])) < pos("-A ISTIO_OUTPUT -j ISTIO_REDIRECT"));
        assert!(t.starts_with("* nat\n") && t.ends_with("COMMIT\n"));
    }
}
