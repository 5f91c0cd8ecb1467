//! Harness for the privileged end-to-end tests: each test gets its own pod
//! netns + upstream netns (veth), its own child cgroup and its own pin dir,
//! all removed on drop even when the test panics. Tests drive the real
//! `redirect` binary as a user would, and the `redirect-kit` tools as the
//! app, the sidecar proxy and the servers.

use std::{
    path::PathBuf,
    process::{Command, Output},
    time::Duration,
};

pub use redirect_testbed::sandbox::{
    run, ChildGuard, NetnsGuard, Placement, Topology, POD_V4, POD_V6, UPSTREAM_V4, UPSTREAM_V6,
};
use redirect_testbed::{kit::ClientReport, sandbox::sibling_binary};

pub const APP_UID: u32 = 1000;
pub const PROXY_UID: u32 = 1337;

pub fn redirect_bin() -> PathBuf {
    let p = sibling_binary("redirect");
    assert!(
        p.exists(),
        "{} missing: run `cargo xtask test` (it builds the binaries first)",
        p.display()
    );
    p
}

pub fn kit_bin() -> PathBuf {
    let p = sibling_binary("redirect-kit");
    assert!(
        p.exists(),
        "{} missing: run `cargo xtask test`",
        p.display()
    );
    p
}

/// The flags Istio's injector gives `istio-init` (after the word
/// `istio-iptables`), without `--log_output_level`.
pub const ISTIO_INJECTED: [&str; 16] = [
    "-p",
    "15001",
    "-z",
    "15006",
    "-u",
    "1337",
    "-m",
    "REDIRECT",
    "-i",
    "*",
    "-x",
    "",
    "-b",
    "*",
    "-d",
    "15090,15021,15020",
];

/// A test pod: topology, pin dir, and the processes started in it.
pub struct Pod {
    pub topo: Topology,
    pub pin_dir: PathBuf,
    pub children: Vec<ChildGuard>,
    /// Extra environment of every `redirect` this pod runs.
    pub env: Vec<(String, String)>,
}

impl Pod {
    pub fn new(tag: &str) -> Pod {
        let topo = Topology::new(tag).unwrap_or_else(|e| panic!("creating topology {tag}: {e}"));
        let pin_dir = PathBuf::from(format!(
            "/sys/fs/bpf/{}",
            redirect_testbed::sandbox::unique("rdt-")
        ));
        Pod {
            topo,
            pin_dir,
            children: Vec::new(),
            env: Vec::new(),
        }
    }

    /// A pod whose `redirect` takes the ways for kernels without a feature
    /// whatever the kernel has (`REDIRECT_FORCE_FALLBACKS`): what Linux
    /// 5.10 runs, on any kernel.
    pub fn with_fallbacks(tag: &str) -> Pod {
        let mut pod = Pod::new(tag);
        pod.env.push((
            redirect_userspace::kernel::FORCE_FALLBACKS_ENV.to_string(),
            "1".to_string(),
        ));
        pod
    }

    pub fn pod_netns(&self) -> PathBuf {
        self.topo.pod.path()
    }

    /// `redirect --pin-dir <this pod's> <args>`, output returned as is.
    pub fn redirect(&self, args: &[&str]) -> Output {
        Command::new(redirect_bin())
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .output()
            .expect("running redirect")
    }

    /// `redirect attach` of the pod netns to the pod cgroup; must succeed.
    /// The pod has IPv4 and IPv6 addresses, IPv4 first: `--dual-stack` is
    /// added so that its IPv6 is captured too, unless `flags` say
    /// otherwise (`--dual-stack=false` leaves it out, as istio-init's
    /// default).
    pub fn attach(&self, flags: &[&str]) -> Output {
        let ns = self.pod_netns();
        let cg = self.topo.cgroup.path.clone();
        let mut args = vec![
            "attach",
            "--netns",
            ns.to_str().unwrap(),
            "--cgroup",
            cg.to_str().unwrap(),
        ];
        args.extend_from_slice(flags);
        if !flags.iter().any(|f| f.starts_with("--dual-stack")) {
            args.push("--dual-stack");
        }
        let out = self.redirect(&args);
        assert!(
            out.status.success(),
            "redirect {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Istio's injected flags ([`ISTIO_INJECTED`]).
    pub fn attach_istio_default(&self) -> Output {
        self.attach_istio_default_with(&[])
    }

    /// Istio's injected flags plus `extra`.
    pub fn attach_istio_default_with(&self, extra: &[&str]) -> Output {
        let mut flags = ISTIO_INJECTED.to_vec();
        flags.extend_from_slice(extra);
        self.attach(&flags)
    }

    pub fn spawn(&mut self, name: &str, args: &[&str], p: &Placement) -> &mut ChildGuard {
        let mut cmd = Command::new(kit_bin());
        cmd.args(args);
        let c = ChildGuard::spawn(name, cmd, p, true).unwrap_or_else(|e| panic!("{name}: {e}"));
        self.children.push(c);
        self.children.last_mut().unwrap()
    }

    /// The kit sidecar proxy as uid/gid 1337 in the pod.
    pub fn start_proxy(&mut self) -> usize {
        let p = self.topo.in_pod(PROXY_UID, PROXY_UID);
        self.spawn("proxy", &["proxy"], &p);
        self.children.len() - 1
    }

    /// Echo server in the upstream netns on `port`, v4 and v6.
    pub fn start_upstream(&mut self, port: u16) {
        let (a, b) = (
            format!("{UPSTREAM_V4}:{port}"),
            format!("[{UPSTREAM_V6}]:{port}"),
        );
        let p = self.topo.in_upstream();
        self.spawn("upstream", &["echo", "--listen", &a, "--listen", &b], &p);
    }

    /// Echo server in the pod (the app's own server) on `port`, all addresses.
    pub fn start_app_server(&mut self, port: u16) {
        let (a, b) = (format!("0.0.0.0:{port}"), format!("[::]:{port}"));
        let p = self.topo.in_pod(APP_UID, APP_UID);
        self.spawn("app-server", &["echo", "--listen", &a, "--listen", &b], &p);
    }

    /// One kit client connection placed as asked.
    pub fn client(&self, p: &Placement, dst: &str, bind: Option<&str>) -> ClientReport {
        let mut cmd = Command::new(kit_bin());
        cmd.args(["client", "--connect", dst, "--timeout-ms", "2000"]);
        if let Some(b) = bind {
            cmd.args(["--bind", b]);
        }
        redirect_testbed::sandbox::place(&mut cmd, p).expect("placing client");
        let out = cmd.output().expect("running client");
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "client output {:?} {:?}: {e}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }

    /// One kit client connection sending `size` bytes of a deterministic
    /// pattern (echo checked byte for byte).
    pub fn client_sized(&self, p: &Placement, dst: &str, size: usize) -> ClientReport {
        client_sized(p, dst, size)
    }

    /// A client in the pod as the app (uid/gid 1000).
    pub fn app_client(&self, dst: &str) -> ClientReport {
        self.client(&self.topo.in_pod(APP_UID, APP_UID), dst, None)
    }

    /// Proxy log lines (JSON) printed so far by child `idx`.
    pub fn proxy_log(&mut self, idx: usize) -> Vec<serde_json::Value> {
        std::thread::sleep(Duration::from_millis(50));
        self.children[idx]
            .take_lines()
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// `redirect stats --json` for this pod.
    pub fn stats(&self) -> serde_json::Value {
        let ns = self.pod_netns();
        let out = self.redirect(&["stats", "--netns", ns.to_str().unwrap(), "--json"]);
        assert!(
            out.status.success(),
            "stats: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("stats json")
    }

    /// One counter: chain ("OUTPUT", "PREROUTING", "ORIGINAL_DST",
    /// "ERRORS") and rule name (see `Reason::name`).
    pub fn counter(&self, chain: &str, rule: &str) -> u64 {
        stats_rule(&self.stats()[0], chain, rule)["count"]
            .as_u64()
            .expect("count")
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        self.children.clear();
        if self.pin_dir.exists() {
            let out = self.redirect(&["uninstall"]);
            if !out.status.success() {
                eprintln!(
                    "uninstall of {} failed: {}",
                    self.pin_dir.display(),
                    String::from_utf8_lossy(&out.stderr)
                );
                let _ = std::fs::remove_dir_all(&self.pin_dir);
            }
        }
    }
}

/// A kit client placed as asked, sending `size` bytes of a deterministic
/// pattern; the echo is checked byte for byte.
pub fn client_sized(p: &Placement, dst: &str, size: usize) -> ClientReport {
    let mut cmd = Command::new(kit_bin());
    cmd.args([
        "client",
        "--connect",
        dst,
        "--timeout-ms",
        "10000",
        "--size",
        &size.to_string(),
    ]);
    redirect_testbed::sandbox::place(&mut cmd, p).expect("placing client");
    let out = cmd.output().expect("running client");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "client output {:?} {:?}: {e}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// True when the client reached the upstream server through our proxy:
/// it saw the original peer and the upstream saw the pod's address.
pub fn assert_ok(r: &ClientReport, what: &str) {
    assert!(r.ok, "{what}: {r:?}");
}

/// Debian's haproxy as the sidecar (a real third-party transparent proxy):
/// run as uid/gid 1337 in the pod netns and cgroup, in the foreground, its
/// config and log in a temp dir; killed by PID and the dir removed on drop
/// (`redirect_testbed::haproxy`, which the Bookinfo demo runs too).
///
/// `proxies` holds the frontends/backends; the common part adds a monitor
/// frontend (for readiness) and logs one line per connection as soon as it
/// is set up: `conn fe=<frontend> client=<ip:port> dst=<ip:port>
/// src=<ip:port> server=<ip:port>` (haproxy prints IPv6 addresses bare).
pub struct Haproxy(redirect_testbed::haproxy::Haproxy);

pub use redirect_testbed::haproxy::HAPROXY;

impl Haproxy {
    pub fn start(pod: &Pod, proxies: &str) -> Haproxy {
        let p = pod.topo.in_pod(PROXY_UID, PROXY_UID);
        match redirect_testbed::haproxy::Haproxy::start(std::path::Path::new(HAPROXY), &p, proxies)
        {
            Ok(h) => Haproxy(h),
            Err(e) => panic!("haproxy: {e:#}"),
        }
    }

    /// Everything haproxy printed, for failure messages.
    pub fn output(&self) -> String {
        self.0.output()
    }

    /// Connection log lines, in order, of one frontend (or of all with
    /// `None`), waiting up to 3 s for `want` of them.
    pub fn conns(&self, frontend: Option<&str>, want: usize) -> Vec<String> {
        self.0.conns(frontend, want)
    }
}

/// One row of `redirect stats --json` output for a pod.
pub fn stats_rule<'a>(
    pod_stats: &'a serde_json::Value,
    chain: &str,
    rule: &str,
) -> &'a serde_json::Value {
    pod_stats["rules"]
        .as_array()
        .expect("rules")
        .iter()
        .find(|r| r["chain"] == chain && r["rule"] == rule)
        .unwrap_or_else(|| panic!("no counter {chain}/{rule} in {pod_stats}"))
}

// ------------------------------------------------------ redirect trace

/// `redirect trace <args>` running, its stdout lines collected; killed
/// (by PID) on drop.
pub struct Tracer {
    pub child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    stderr: std::sync::mpsc::Receiver<String>,
}

fn pipe_lines(r: impl std::io::Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in std::io::BufReader::new(r).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    rx
}

impl Tracer {
    /// `redirect --pin-dir <pod's> trace <args>` started.
    pub fn spawn(pod: &Pod, args: &[&str]) -> Tracer {
        let mut cmd = Command::new(redirect_bin());
        cmd.arg("--pin-dir")
            .arg(&pod.pin_dir)
            .arg("trace")
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().expect("starting redirect trace");
        let lines = pipe_lines(child.stdout.take().unwrap());
        let stderr = pipe_lines(child.stderr.take().unwrap());
        Tracer {
            child,
            lines,
            stderr,
        }
    }

    /// `trace --no-agent <args>`, returned once its lease is on.
    pub fn start_direct(pod: &Pod, args: &[&str]) -> Tracer {
        let mut a = vec!["--no-agent"];
        a.extend_from_slice(args);
        let t = Tracer::spawn(pod, &a);
        wait_traced_by(pod, t.child.id());
        t
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// JSON lines until `done` says enough (5 s at most).
    pub fn json_until(
        &self,
        mut done: impl FnMut(&[serde_json::Value]) -> bool,
    ) -> Vec<serde_json::Value> {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let mut got = Vec::new();
        while !done(&got) && std::time::Instant::now() < deadline {
            if let Ok(l) = self.lines.recv_timeout(Duration::from_millis(50)) {
                got.push(serde_json::from_str(&l).unwrap_or_else(|e| panic!("{l:?}: {e}")));
            }
        }
        got
    }

    /// SIGINT, then its exit status and stderr.
    pub fn interrupt(mut self) -> (std::process::ExitStatus, String) {
        unsafe { libc::kill(self.pid(), libc::SIGINT) };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let st = loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                break st;
            }
            assert!(std::time::Instant::now() < deadline, "trace ignored SIGINT");
            std::thread::sleep(Duration::from_millis(20));
        };
        let err: Vec<String> = self.stderr.try_iter().collect();
        (st, err.join("\n"))
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Wait (10 s at most) until the pod's install is traced with a lease of
/// the process `pid`.
pub fn wait_traced_by(pod: &Pod, pid: u32) {
    let pins = redirect_userspace::pins::Pins::new(&pod.pin_dir);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let s = redirect_userspace::trace::switch_state(&pins)
            .ok()
            .flatten();
        if s.is_some_and(|s| s.on && s.owner_pid == pid) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "tracing was not switched on by pid {pid}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ------------------------------------------------- stress-test helpers

/// A kit tool run to completion: stdout/stderr, and whether it had to be
/// killed at the timeout (a hang).
pub struct KitRun {
    pub status: Option<std::process::ExitStatus>,
    pub stdout: String,
    pub stderr: String,
    pub timed_out: bool,
}

impl KitRun {
    /// The last JSON line of stdout (the tool's report).
    pub fn report(&self) -> serde_json::Value {
        self.stdout
            .lines()
            .rev()
            .find_map(|l| serde_json::from_str(l).ok())
            .unwrap_or_else(|| {
                panic!(
                    "no JSON report (timed out: {}); stdout {:?} stderr {:?}",
                    self.timed_out, self.stdout, self.stderr
                )
            })
    }
}

/// Run `redirect-kit <args>` placed as asked; killed (by PID) if still
/// running after `timeout`.
pub fn run_kit(p: &Placement, args: &[&str], timeout: Duration) -> KitRun {
    let f = redirect_testbed::sandbox::run_placed(&kit_bin(), args, p, timeout)
        .expect("starting redirect-kit");
    KitRun {
        status: f.status,
        stdout: f.stdout,
        stderr: f.stderr,
        timed_out: f.timed_out,
    }
}

/// JSON lines a started kit tool prints, waiting up to `timeout` until
/// `want` of them (parsed) arrived since the last call.
pub fn child_json_lines(
    child: &mut ChildGuard,
    want: usize,
    timeout: Duration,
) -> Vec<serde_json::Value> {
    let deadline = std::time::Instant::now() + timeout;
    let mut got = Vec::new();
    loop {
        got.extend(
            child
                .take_lines()
                .iter()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()),
        );
        if got.len() >= want || std::time::Instant::now() > deadline {
            return got;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Entries of one map as `redirect status --json` reports them
/// (`map_usage`).
pub fn map_usage(pod: &Pod, map: &str) -> u64 {
    let out = pod.redirect(&["status", "--json"]);
    assert!(
        out.status.success(),
        "status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status json");
    st["map_usage"]
        .as_array()
        .expect("map_usage")
        .iter()
        .find(|m| m["map"] == map)
        .unwrap_or_else(|| panic!("no {map} in map_usage: {st}"))["entries"]
        .as_u64()
        .expect("entries")
}

/// Entries of a pinned map of this pod's install, counted with bpftool
/// (for maps `redirect status` does not report).
pub fn pinned_map_len(pod: &Pod, map: &str) -> usize {
    let path = pod.pin_dir.join("maps").join(map);
    let out = Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(&path)
        .output()
        .expect("running bpftool (cargo xtask setup installs it)");
    assert!(
        out.status.success(),
        "bpftool map dump {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool json");
    v.as_array().map(|a| a.len()).unwrap_or(0)
}

/// Count and bytes of one `ACCEL` counter of the pod.
pub fn accel_counter(pod: &Pod, rule: &str) -> (u64, u64) {
    let s = pod.stats();
    let r = stats_rule(&s[0], "ACCEL", rule);
    (r["count"].as_u64().unwrap(), r["bytes"].as_u64().unwrap())
}

/// Bytes that went through the pod's sk_msg verdicts (straight to the
/// peer, or on the normal path after the bulk switch), as counted, plus
/// what the counters may not show yet: a redirect verdict covers up to
/// `ACCEL_VERDICT_BYTES` of its socket's next messages and its rest is
/// counted by the socket's next verdict, so each accelerated socket can
/// hold back up to that much (docs/acceleration.md, "Counters").
pub fn accel_bytes_upper(pod: &Pod) -> (u64, u64) {
    let (_, redirected) = accel_counter(pod, "messages_redirected");
    let (_, bulk) = accel_counter(pod, "messages_bulk");
    let sockets = accel_counter(pod, "sockets_inserted").0;
    let counted = redirected + bulk;
    (
        counted,
        counted + sockets * redirect_common::ACCEL_VERDICT_BYTES as u64,
    )
}

/// Raise this process's RLIMIT_NOFILE soft limit to the hard limit; the
/// tools started afterwards (proxy, servers) inherit it.
pub fn raise_nofile() {
    redirect_testbed::kit::stress::raise_nofile();
}

/// The programs attached to `cgroup` itself (not its parents): (attach
/// type name, program id), by `BPF_PROG_QUERY` for every cgroup attach
/// type, as `bpftool cgroup show` lists them. Asked directly: the
/// distribution's bpftool lists nothing on some older kernels (5.10).
pub fn cgroup_attached(cgroup: &std::path::Path) -> Vec<(String, u32)> {
    use std::os::fd::AsRawFd;
    const BPF_PROG_QUERY: libc::c_long = 16;
    let dir = std::fs::File::open(cgroup).unwrap_or_else(|e| panic!("{}: {e}", cgroup.display()));
    let mut out = Vec::new();
    // enum bpf_attach_type up to BPF_CGROUP_UNIX_RECVMSG and beyond;
    // non-cgroup types answer EINVAL and are skipped.
    for attach_type in 0u32..64 {
        let mut ids = [0u32; 64];
        let mut attr = [0u8; 128];
        // { u32 target_fd; u32 attach_type; u32 query_flags;
        //   u32 attach_flags; u64 prog_ids; u32 prog_cnt; }
        attr[0..4].copy_from_slice(&(dir.as_raw_fd() as u32).to_ne_bytes());
        attr[4..8].copy_from_slice(&attach_type.to_ne_bytes());
        attr[16..24].copy_from_slice(&(ids.as_mut_ptr() as u64).to_ne_bytes());
        attr[24..28].copy_from_slice(&(ids.len() as u32).to_ne_bytes());
        let r =
            unsafe { libc::syscall(libc::SYS_bpf, BPF_PROG_QUERY, attr.as_mut_ptr(), attr.len()) };
        if r != 0 {
            continue;
        }
        let n = u32::from_ne_bytes(attr[24..28].try_into().unwrap()) as usize;
        let name = match attach_type {
            2 => "sock_create".to_string(),
            3 => "sock_ops".to_string(),
            10 => "connect4".to_string(),
            11 => "connect6".to_string(),
            14 => "sendmsg4".to_string(),
            15 => "sendmsg6".to_string(),
            19 => "recvmsg4".to_string(),
            20 => "recvmsg6".to_string(),
            21 => "getsockopt".to_string(),
            29 => "getpeername4".to_string(),
            30 => "getpeername6".to_string(),
            34 => "sock_release".to_string(),
            t => format!("attach type {t}"),
        };
        for id in &ids[..n.min(ids.len())] {
            out.push((name.clone(), *id));
        }
    }
    out
}
