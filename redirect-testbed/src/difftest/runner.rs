//! The two sides of a run: the reference pod, with istio-iptables' rules
//! installed by `iptables-restore` / `ip6tables-restore`, and the pod
//! captured by `redirect` with the same flags. Each gets a configuration,
//! a proxy started as the configuration's proxy identity, and one
//! connection at a time; what happened is read back as an [`Outcome`].

use std::{
    fmt,
    io::Write,
    net::SocketAddr,
    os::unix::process::CommandExt,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use super::{
    gen::{Config, Conn, Origin},
    known::{Feature, Probe, OPTIONAL},
    net::{classify_text, ProbeReport, Proto},
    topo::Pod,
};
use crate::{
    istio_rules::{Host, IstioConfig, IstioRules},
    sandbox::{self, place, sibling_binary, Placement},
};

/// How long a probe waits to connect and for its answer.
const PROBE_TIMEOUT_MS: u64 = 1500;

/// What one connection did, as seen from every side.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// The caller's result (`ok`, `refused`, `closed`, ...).
    pub result: String,
    /// The caller's getpeername().
    pub peer: Option<String>,
    /// The proxy's hops, in order: `out`/`in` with the SO_ORIGINAL_DST it
    /// got, and how reaching it went when it failed.
    pub hops: Vec<String>,
    /// Who answered, where it was reached and the client address it saw.
    pub server: Option<String>,
}

impl Outcome {
    /// Where the connection first landed: a proxy port, a server, or
    /// nowhere.
    pub fn landed(&self) -> String {
        if let Some(h) = self.hops.first() {
            return format!("proxy {}", h.split_whitespace().next().unwrap_or(""));
        }
        match &self.server {
            Some(s) => s.split_whitespace().next().unwrap_or("").to_string(),
            None => self.result.clone(),
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.result)?;
        if let Some(p) = &self.peer {
            write!(f, ", peer {p}")?;
        }
        for h in &self.hops {
            write!(f, ", proxy {h}")?;
        }
        if let Some(s) = &self.server {
            write!(f, ", {s}")?;
        }
        Ok(())
    }
}

/// Which side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Iptables,
    Redirect,
}

/// How redirect is driven.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Driver {
    /// `redirect attach --netns N --cgroup C <args>`: no environment.
    Attach,
    /// `redirect istio-iptables <args> --netns N --cgroup C` with the
    /// environment, as istio-init runs istio-iptables. Chosen when the
    /// subcommand exists ([`Feature::EnvForms`]).
    IstioIptables,
}

pub struct Side {
    pub kind: Kind,
    pub pod: Pod,
    proxy: Option<Proxy>,
    pin_dir: PathBuf,
    pub driver: Driver,
}

fn output_text(o: &std::process::Output) -> String {
    let mut s = String::from_utf8_lossy(&o.stderr).trim().to_string();
    if s.is_empty() {
        s = String::from_utf8_lossy(&o.stdout).trim().to_string();
    }
    s
}

/// `<tool> <args>` inside a netns (`ip netns exec`), `input` on stdin.
fn in_netns(ns: &str, tool: &str, args: &[&str], input: &str) -> Result<()> {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns, tool])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().with_context(|| format!("starting {tool}"))?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("{tool} in {ns}: {}\ninput:\n{input}", output_text(&out));
    }
    Ok(())
}

/// Empties the tables istio-iptables writes (`iptables-restore` without
/// `--noflush` flushes every table it names).
const FLUSH: &str = "*nat\nCOMMIT\n*raw\nCOMMIT\n*mangle\nCOMMIT\n";

impl Side {
    pub fn new(kind: Kind) -> Result<Side> {
        let tag = match kind {
            Kind::Iptables => "dfi",
            Kind::Redirect => "dfr",
        };
        let pod = Pod::new(tag).with_context(|| format!("setting up the {kind:?} pod"))?;
        Ok(Side {
            kind,
            pod,
            proxy: None,
            pin_dir: PathBuf::from(format!("/sys/fs/bpf/{}", sandbox::unique("rdf-"))),
            driver: Driver::Attach,
        })
    }

    pub fn name(&self) -> &'static str {
        match self.kind {
            Kind::Iptables => "iptables",
            Kind::Redirect => "redirect",
        }
    }

    fn redirect(&self, args: &[String], env: &[(String, String)]) -> std::process::Output {
        let mut c = Command::new(sibling_binary("redirect"));
        // Nothing from this process's environment: only the config's.
        c.env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .args(args);
        c.output()
            .unwrap_or_else(|e| panic!("running redirect: {e}"))
    }

    /// The capture command for `args` (and `env`) with this pod's netns
    /// and cgroup.
    fn capture(&self, args: &[String], env: &[(String, String)]) -> std::process::Output {
        let topo = &self.pod.topo;
        let place = [
            "--netns".to_string(),
            topo.pod.path().display().to_string(),
            "--cgroup".to_string(),
            topo.cgroup.path.display().to_string(),
        ];
        let mut a: Vec<String> = Vec::new();
        match self.driver {
            // Where the CLI rework lands, `redirect istio-iptables` takes
            // istio-init's args verbatim and reads the environment.
            Driver::IstioIptables => {
                a.push("istio-iptables".into());
                a.extend(args.iter().cloned());
                a.extend(place);
            }
            Driver::Attach => {
                a.push("attach".into());
                a.extend(place);
                a.extend(args.iter().cloned());
            }
        }
        self.redirect(&a, env)
    }

    /// Which optional features redirect takes, found by capturing this
    /// (redirect) pod with each; the driver is chosen on the way.
    pub fn probe_features(&mut self) -> Vec<(Feature, Result<(), String>)> {
        assert_eq!(self.kind, Kind::Redirect);
        let base = ["-i".to_string(), "*".to_string()];
        let help = self.redirect(&["istio-iptables".into(), "--help".into()], &[]);
        self.driver = Driver::IstioIptables;
        let istio_ok = help.status.success() && self.capture(&base, &[]).status.success();
        if !istio_ok {
            self.driver = Driver::Attach;
        }
        OPTIONAL
            .iter()
            .map(|o| {
                let r = match o.probe {
                    Probe::IstioIptables if istio_ok => Ok(()),
                    Probe::IstioIptables => Err("no `redirect istio-iptables`".to_string()),
                    Probe::Env(..) if !istio_ok => {
                        Err("environment not read by `redirect attach`".to_string())
                    }
                    Probe::Env(k, v) => {
                        let out = self.capture(&base, &[(k.to_string(), v.to_string())]);
                        out.status.success().then_some(()).ok_or(output_text(&out))
                    }
                    Probe::Args(extra) => {
                        let mut a = base.to_vec();
                        a.extend(extra.iter().map(|s| s.to_string()));
                        let out = self.capture(&a, &[]);
                        out.status.success().then_some(()).ok_or(output_text(&out))
                    }
                };
                (o.feature, r)
            })
            .collect()
    }

    /// Give the pod `cfg` and start its proxy. Err with the tool's message
    /// when the configuration is refused.
    pub fn apply(&mut self, cfg: &Config) -> Result<(), String> {
        // A proxy of the last configuration must not see this one's
        // listeners registered to it.
        self.proxy = None;
        match self.kind {
            Kind::Iptables => self.apply_iptables(cfg).map_err(|e| format!("{e:#}"))?,
            Kind::Redirect => self.apply_redirect(cfg)?,
        }
        let k = &cfg.knobs;
        let mut cmd = Command::new(sibling_binary("redirect-kit"));
        cmd.args(["proxy", "--outbound-port"])
            .arg(k.proxy_port.to_string())
            .arg("--inbound-port")
            .arg(k.inbound_port.to_string());
        let p = self.pod.topo.in_pod(cfg.proxy.uid, cfg.proxy.gid);
        let proxy = Proxy::start(cmd, &p).map_err(|e| format!("starting the proxy: {e}"))?;
        self.proxy = Some(proxy);
        Ok(())
    }

    fn apply_iptables(&mut self, cfg: &Config) -> Result<()> {
        let env = |k: &str| cfg.env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        let mut args = cfg.args.clone();
        args.extend(cfg.reference_only.iter().cloned());
        let icfg = IstioConfig::parse(&args, env)?;
        let mut host = Host::of_pod(&icfg, &Pod::addresses(), &cfg.nameservers);
        host.envoy_user_uid = envoy_user_uid(&cfg.env);
        let rules = IstioRules::build(&icfg, &host)?;
        let ns = self.pod.topo.pod.name.clone();
        in_netns(&ns, "iptables-restore", &[], FLUSH)?;
        in_netns(&ns, "ip6tables-restore", &[], FLUSH)?;
        let live = !icfg.dry_run;
        if live {
            let v4 = rules.restore(false).expect("IPv4 rules");
            in_netns(&ns, "iptables-restore", &["--noflush"], &v4)?;
            if let Some(v6) = rules.restore(true) {
                in_netns(&ns, "ip6tables-restore", &["--noflush"], &v6)?;
            }
        }
        self.pod
            .set_passthrough_v6(live && host.enable_ipv6)
            .context("::6 on lo")?;
        Ok(())
    }

    fn apply_redirect(&mut self, cfg: &Config) -> Result<(), String> {
        // As a fresh pod: no ::6 until redirect adds it.
        self.pod
            .set_passthrough_v6(false)
            .map_err(|e| e.to_string())?;
        if cfg.knobs.dry_run {
            // A dry run changes nothing: release the last configuration.
            let ns = self.pod.topo.pod.path().display().to_string();
            let _ = self.redirect(&["detach".into(), "--netns".into(), ns], &[]);
        }
        let env = match self.driver {
            Driver::IstioIptables => cfg.env.clone(),
            Driver::Attach => Vec::new(),
        };
        // The reference pod's nameservers are what istio-iptables read from
        // its resolv.conf; redirect is told them (`none` when DNS capture is
        // on with an empty list: istio-iptables then captures no DNS).
        let mut args = cfg.redirect_args();
        if cfg.knobs.dns {
            let list: Vec<String> = cfg.nameservers.iter().map(ToString::to_string).collect();
            args.push("--dns-servers".into());
            args.push(if list.is_empty() {
                "none".into()
            } else {
                list.join(",")
            });
        }
        let out = self.capture(&args, &env);
        if !out.status.success() {
            return Err(output_text(&out));
        }
        Ok(())
    }

    /// Start one connection (the caller runs while the other side's runs).
    pub fn start(&self, c: &Conn) -> Child {
        let mut cmd = Command::new(sibling_binary("redirect-kit"));
        let proto = match c.proto {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Mptcp => "mptcp",
        };
        cmd.args(["diff-probe", "--proto", proto, "--connect"])
            .arg(c.dst.to_string())
            .args(["--timeout-ms", &PROBE_TIMEOUT_MS.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(b) = c.bind {
            cmd.args(["--bind", &b.to_string()]);
        }
        let topo = &self.pod.topo;
        match &c.origin {
            Origin::Outside => {
                place(&mut cmd, &topo.in_upstream()).expect("placing the probe");
            }
            Origin::Pod(ids) => {
                let p = Placement {
                    netns: Some(topo.pod.path()),
                    cgroup: Some(topo.cgroup.path.clone()),
                    uid: None,
                    gid: None,
                };
                place(&mut cmd, &p).expect("placing the probe");
                let (uid, gid, groups) = (ids.uid, ids.gid, ids.groups.clone());
                // After place()'s own step (cgroup, netns): the ids, with
                // supplementary groups.
                unsafe {
                    cmd.pre_exec(move || {
                        if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                            || libc::setgid(gid) != 0
                            || libc::setuid(uid) != 0
                        {
                            return Err(std::io::Error::last_os_error());
                        }
                        Ok(())
                    });
                }
            }
        }
        cmd.spawn().expect("starting the probe")
    }

    /// The outcome of a connection started with [`Side::start`] at
    /// `started`.
    pub fn finish(&mut self, child: Child, started: Instant) -> Outcome {
        let out = child.wait_with_output().expect("waiting for the probe");
        let rep: ProbeReport = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "probe output {:?} {:?}: {e}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        });
        // A caller that gave up may leave the proxy still dialing: its
        // hop is this case's, so wait for it (the proxy's dial timeout).
        if rep.result == "timeout" {
            let until = started + PROXY_DIAL_TIMEOUT + Duration::from_millis(500);
            std::thread::sleep(until.saturating_duration_since(Instant::now()));
        }
        let hops = self.proxy_hops();
        Outcome {
            result: rep.result,
            peer: rep.peer,
            hops,
            server: rep.greeting.as_deref().map(server_view),
        }
    }

    /// The proxy's log lines for the last connection. Each hop writes its
    /// line before it relays or drops the connection, so every line of a
    /// connection is in the pipe before its caller has its answer (or its
    /// EOF): reading the pipe now gets exactly them.
    fn proxy_hops(&mut self) -> Vec<String> {
        let Some(p) = self.proxy.as_mut() else {
            return Vec::new();
        };
        let lines = p.lines();
        let mut hops: Vec<(u8, String)> = lines
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .map(|v| {
                let dir = if v["dir"] == "inbound" { "in" } else { "out" };
                let orig = v["orig"]
                    .as_str()
                    .and_then(|o| o.parse::<SocketAddr>().ok())
                    .map(|a| format!(" orig={}", canon(a)))
                    .unwrap_or_default();
                let fail = match v["error"].as_str() {
                    Some(e) => format!(" failed: {}", classify_text(e)),
                    None => String::new(),
                };
                (u8::from(dir == "in"), format!("{dir}{orig}{fail}"))
            })
            .collect();
        // A connection the proxy hands to itself logs in either order.
        hops.sort();
        hops.into_iter().map(|(_, h)| h).collect()
    }
}

impl Drop for Side {
    fn drop(&mut self) {
        self.proxy = None;
        if self.kind == Kind::Redirect && self.pin_dir.exists() {
            let out = self.redirect(&["uninstall".into()], &[]);
            if !out.status.success() {
                eprintln!(
                    "uninstall of {} failed: {}",
                    self.pin_dir.display(),
                    output_text(&out)
                );
                let _ = std::fs::remove_dir_all(&self.pin_dir);
            }
        }
    }
}

/// How long the kit proxy tries to reach an original destination.
const PROXY_DIAL_TIMEOUT: Duration = Duration::from_secs(5);

/// The kit proxy, its log read straight from its stdout pipe (no reader
/// thread, so a line written is a line read: nothing depends on how fast
/// a thread gets scheduled). Killed (by PID) on drop.
struct Proxy {
    child: Child,
    out: std::process::ChildStdout,
    pending: Vec<u8>,
}

impl Proxy {
    fn start(mut cmd: Command, p: &Placement) -> std::io::Result<Proxy> {
        use std::os::fd::AsRawFd;
        place(&mut cmd, p)?;
        cmd.stdin(Stdio::null()).stdout(Stdio::piped());
        let mut child = cmd.spawn()?;
        let out = child.stdout.take().expect("piped");
        let fd = out.as_raw_fd();
        unsafe {
            let fl = libc::fcntl(fd, libc::F_GETFL);
            libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK);
        }
        let mut proxy = Proxy {
            child,
            out,
            pending: Vec::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(l) = proxy.lines().into_iter().next() {
                if l.contains("ready") {
                    return Ok(proxy);
                }
                return Err(std::io::Error::other(format!("proxy said {l:?}")));
            }
            if let Ok(Some(st)) = proxy.child.try_wait() {
                return Err(std::io::Error::other(format!("proxy exited: {st}")));
            }
            if Instant::now() > deadline {
                return Err(std::io::Error::other("proxy not ready after 10 s"));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Complete lines written so far.
    fn lines(&mut self) -> Vec<String> {
        use std::io::Read;
        let mut buf = [0u8; 4096];
        loop {
            match self.out.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => self.pending.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break, // EAGAIN: nothing more for now
            }
        }
        let mut lines = Vec::new();
        while let Some(i) = self.pending.iter().position(|b| *b == b'\n') {
            let l: Vec<u8> = self.pending.drain(..=i).collect();
            lines.push(String::from_utf8_lossy(&l).trim().to_string());
        }
        lines
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// v4-mapped IPv6 folded to IPv4: what the wire carries.
fn canon(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

/// `role=app local=10.200.0.2:9080 peer=127.0.0.6:4711` → `app at
/// 10.200.0.2:9080 from 127.0.0.6` (the client's port is ephemeral).
fn server_view(greeting: &str) -> String {
    let field = |name: &str| {
        greeting
            .split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .unwrap_or("?")
    };
    let local = field("local=")
        .parse::<SocketAddr>()
        .map(|a| canon(a).to_string())
        .unwrap_or_else(|_| field("local=").to_string());
    let from = field("peer=")
        .parse::<SocketAddr>()
        .map(|a| a.ip().to_canonical().to_string())
        .unwrap_or_else(|_| field("peer=").to_string());
    format!("{} at {local} from {from}", field("role="))
}

/// The uid istio-iptables uses without `-u`: `ENVOY_USER`'s (default
/// `istio-proxy`) in this machine's user database.
fn envoy_user_uid(env: &[(String, String)]) -> Option<u32> {
    let name = env
        .iter()
        .find(|(k, _)| k == "ENVOY_USER")
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| "istio-proxy".into());
    let c = std::ffi::CString::new(name).ok()?;
    let pw = unsafe { libc::getpwnam(c.as_ptr()) };
    (!pw.is_null()).then(|| unsafe { (*pw).pw_uid })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_views_drop_the_ephemeral_port_and_fold_mapped_addresses() {
        assert_eq!(
            server_view("role=app local=10.200.0.2:9080 peer=127.0.0.6:4711"),
            "app at 10.200.0.2:9080 from 127.0.0.6"
        );
        assert_eq!(
            server_view("role=upstream local=[::ffff:10.200.0.1]:80 peer=[::ffff:10.200.0.2]:1"),
            "upstream at 10.200.0.1:80 from 10.200.0.2"
        );
        let o = Outcome {
            result: "ok".into(),
            peer: Some("10.200.0.1:80".into()),
            hops: vec!["out orig=10.200.0.1:80".into()],
            server: Some("upstream at 10.200.0.1:80 from 10.200.0.2".into()),
        };
        assert_eq!(o.landed(), "proxy out");
        assert_eq!(
            o.to_string(),
            "ok, peer 10.200.0.1:80, proxy out orig=10.200.0.1:80, upstream at 10.200.0.1:80 from 10.200.0.2"
        );
    }
}
