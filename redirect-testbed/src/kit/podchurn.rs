//! Pod churn (`redirect-kit pod-churn`, `cargo xtask bench --churn`, and
//! `tests/tests/churn.rs`): a real `redirect daemon` captures and releases
//! many short-lived pods through the real `redirect-cni` binary while
//! steady, content-checked traffic flows through one long-lived captured
//! pod. Measured: the time of every CNI ADD and DEL (end to end, plugin
//! process included, and inside the agent), the agent's RSS. Checked:
//! every pinned map back to its baseline entry count, the pin directory
//! back to its baseline listing, every per-pod sk_lookup link, program and
//! `.rodata` map gone from the kernel, the agent's fds and sockets back to
//! baseline, no pod netns or cgroup directory left, the agent's memory
//! flat, and zero failed connections.
//!
//! Resident pods (`--resident`, 100 by default) are captured before the
//! baseline and kept through the churn, so the maps hold a full node's
//! entries while the churned pods come and go.
//!
//! Each churned pod is what a runtime makes: a named netns with a veth
//! (10.202.0.2/24, fd00:202::2/64) and its own cgroup directory (a child of
//! the cgroup the agent attached to). Between ADD and DEL a process in the
//! pod (uid 0, so captured) listens on the proxy's ports and connects to
//! 10.202.0.1:80: the connection must land on its 15001 listener with
//! SO_ORIGINAL_DST = 10.202.0.1:80 and its bytes must come back intact;
//! its 15006 listener goes into the listener map. Nothing leaves the
//! machine: every address is in a namespace created here, and the
//! redirected connection never leaves the pod's loopback.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use serde::Serialize;
use serde_json::{json, Value};

use redirect_userspace::{pins::Pins, sys::Netns};

use crate::{
    kit,
    sandbox::{sibling_binary, unique, ChildGuard, NetnsGuard, Placement, Topology, UPSTREAM_V4},
};

/// Where a churned pod's app connects (on its own veth, never reached:
/// the connection is redirected to the pod's loopback).
pub const CHURN_DST: &str = "10.202.0.1:80";
const APP_UID: u32 = 1000;
const PROXY_UID: u32 = 1337;
/// The agent's RSS may grow by this much between the early and the late
/// pods (see `rss_tolerance_kib`).
const RSS_TOLERANCE_MIN_KIB: u64 = 1024;

#[derive(Debug, Clone)]
pub struct Options {
    pub pods: usize,
    /// Write churn.md and churn.json here.
    pub out: Option<PathBuf>,
    /// The `redirect` binary (default: next to this one).
    pub redirect: Option<PathBuf>,
    /// Pods captured before the churn and kept captured through it (a
    /// node's resident pods: the maps hold their entries while the churned
    /// pods come and go). Released at the end, after the checks.
    pub resident: usize,
}

#[derive(Debug, Default, Serialize, Clone)]
pub struct Stats {
    pub n: usize,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
    pub mean: f64,
}

impl Stats {
    pub fn of(v: &[f64]) -> Stats {
        if v.is_empty() {
            return Stats::default();
        }
        let mut s = v.to_vec();
        s.sort_by(|a, b| a.total_cmp(b));
        let q = |p: f64| s[(((s.len() as f64) * p).ceil() as usize).clamp(1, s.len()) - 1];
        Stats {
            n: s.len(),
            p50: q(0.5),
            p90: q(0.9),
            p99: q(0.99),
            max: s[s.len() - 1],
            mean: s.iter().sum::<f64>() / s.len() as f64,
        }
    }
}

#[derive(Debug, Serialize, Clone)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

#[derive(Debug, Default, Serialize, Clone)]
pub struct Steady {
    pub runs: u64,
    pub connections: u64,
    pub failures: u64,
    pub bytes_checked: u64,
    pub errors: Vec<String>,
}

#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub pods: usize,
    pub resident: usize,
    pub elapsed_s: f64,
    pub build: &'static str,
    pub kernel: String,
    pub cpus: usize,
    /// /proc/loadavg (1 min) at the start and at the end: the machine may
    /// be shared.
    pub load_avg: (f64, f64),
    /// CNI ADD, the plugin process end to end (fork/exec, socket, agent).
    pub add_cni_ms: Stats,
    /// CNI ADD inside the agent (its `elapsed_ms`: capture of the pod).
    pub add_agent_ms: Stats,
    pub del_cni_ms: Stats,
    pub del_agent_ms: Stats,
    /// Phases of the capture inside the agent (attach.rs `register_pod`).
    pub add_phases_ms: Vec<(String, Stats)>,
    pub pod_traffic_ok: u64,
    pub pod_traffic_failed: u64,
    pub pod_traffic_errors: Vec<String>,
    pub steady: Steady,
    /// (pods done, VmRSS KiB) every 10 pods (sampled after every pod).
    pub rss_kib: Vec<(usize, u64)>,
    pub rss_early_kib: u64,
    pub rss_late_kib: u64,
    pub rss_tolerance_kib: u64,
    pub maps_baseline: BTreeMap<String, u64>,
    pub maps_peak: BTreeMap<String, u64>,
    pub maps_after: BTreeMap<String, u64>,
    pub agent_fds_baseline: (usize, usize),
    pub agent_fds_after: (usize, usize),
    pub kernel_objects_created: usize,
    pub kernel_objects_left: Vec<String>,
    pub checks: Vec<Check>,
    pub ok: bool,
}

/// A temp directory removed on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A child cgroup directory, its processes killed and the dir removed on drop.
struct PodCgroup(PathBuf);

impl PodCgroup {
    fn remove(&self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            for pid in std::fs::read_to_string(self.0.join("cgroup.procs"))
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.trim().parse::<i32>().ok())
            {
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            if std::fs::remove_dir(&self.0).is_ok() || !self.0.exists() {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for PodCgroup {
    fn drop(&mut self) {
        self.remove();
    }
}

/// The agent, killed (by PID) on drop.
struct Agent {
    child: std::process::Child,
    log: PathBuf,
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Removes the install (`redirect uninstall`) on drop.
struct Install {
    redirect: PathBuf,
    pin_dir: PathBuf,
}

impl Drop for Install {
    fn drop(&mut self) {
        if self.pin_dir.exists() {
            let ok = Command::new(&self.redirect)
                .arg("--pin-dir")
                .arg(&self.pin_dir)
                .arg("uninstall")
                .stdout(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if !ok {
                let _ = std::fs::remove_dir_all(&self.pin_dir);
            }
        }
    }
}

/// One redirect-cni run: exit code, stdout, wall time.
fn cni(
    plugin: &Path,
    command: &str,
    container: &str,
    netns: &str,
    args: &str,
    conf: &str,
) -> (i32, String, f64) {
    let t = Instant::now();
    let mut cmd = Command::new(plugin);
    cmd.env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", container)
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/usr/lib/cni")
        .env("CNI_ARGS", args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let Ok(mut child) = cmd.spawn() else {
        return (-1, format!("could not run {}", plugin.display()), 0.0);
    };
    if let Some(mut i) = child.stdin.take() {
        let _ = i.write_all(conf.as_bytes());
    }
    let out = child.wait_with_output();
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    match out {
        Ok(o) => (
            o.status.code().unwrap_or(-1),
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
            ms,
        ),
        Err(e) => (-1, e.to_string(), ms),
    }
}

/// Run a redirect-kit tool placed as asked; its last JSON line, or an
/// error. Killed (by PID) at the timeout.
fn run_kit(kit: &Path, p: &Placement, args: &[&str], timeout: Duration) -> Result<Value, String> {
    let f = crate::sandbox::run_placed(kit, args, p, timeout)
        .map_err(|e| format!("starting redirect-kit {args:?}: {e}"))?;
    if f.timed_out {
        return Err(format!("redirect-kit {args:?} timed out: {}", f.stderr));
    }
    f.stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .ok_or_else(|| {
            format!(
                "redirect-kit {args:?}: no report; stdout {:?} stderr {:?}",
                f.stdout, f.stderr
            )
        })
}

/// Entry counts of every map pinned in `maps_dir` (BPF_MAP_GET_NEXT_KEY
/// walks, so any map type with keys works, sockhashes included). The
/// counter map counts the keys of other pods than `steady` only: the
/// long-lived pod's traffic may hit a reason (a key) for the first time
/// at any moment, which is growth of a live pod, not a leak.
pub fn map_entry_counts(maps_dir: &Path, steady: u64) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for p in redirect_userspace::pins::read_dir(maps_dir) {
        let name = p
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let skip = (name == redirect_common::MAP_COUNTERS).then_some(steady);
        if let Ok(n) = raw::count_keys(&p, skip) {
            out.insert(name, n);
        }
    }
    out
}

/// Every file and directory under `dir`, relative.
fn listing(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for p in redirect_userspace::pins::read_dir(&d) {
            out.push(p.strip_prefix(dir).unwrap_or(&p).display().to_string());
            if p.is_dir() {
                stack.push(p);
            }
        }
    }
    out.sort();
    out
}

fn vm_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// (open fds, of which sockets) of a process.
fn fds_of(pid: u32) -> (usize, usize) {
    let fds = redirect_userspace::pins::read_dir(Path::new(&format!("/proc/{pid}/fd")));
    let sockets = fds
        .iter()
        .filter(|f| {
            std::fs::read_link(f)
                .map(|t| t.to_string_lossy().starts_with("socket:"))
                .unwrap_or(false)
        })
        .count();
    (fds.len(), sockets)
}

/// A number field (`elapsed_ms`, ...) of the agent's log lines with
/// message `what`, per container id.
fn agent_times(log: &str, what: &str, name: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    let key = format!(" {name}=");
    for l in log.lines().filter(|l| l.contains(what)) {
        let field = |k: &str| {
            l.split(k)
                .nth(1)
                .map(|r| r.split([' ', '}', ':']).next().unwrap_or("").to_string())
        };
        if let (Some(cid), Some(ms)) = (
            field("container_id="),
            field(&key).and_then(|v| v.parse::<f64>().ok()),
        ) {
            out.insert(cid, ms);
        }
    }
    out
}

fn load_avg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// Set up a pod netns as a runtime's bridge plugin would (a veth eth0 with
/// IPv4 and IPv6), its peer kept in the same netns.
fn make_pod_netns(name: &str) -> std::io::Result<NetnsGuard> {
    let ns = NetnsGuard::new(name)?;
    let batch = "link add eth0 type veth peer name peer0\n\
                 addr add 10.202.0.2/24 dev eth0\n\
                 addr add fd00:202::2/64 dev eth0 nodad\n\
                 link set eth0 up\n\
                 link set peer0 up\n";
    let mut c = Command::new("ip")
        .args(["-n", name, "-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    c.stdin.take().unwrap().write_all(batch.as_bytes())?;
    let o = c.wait_with_output()?;
    if !o.status.success() {
        return Err(std::io::Error::other(format!(
            "ip -n {name} -batch: {}",
            String::from_utf8_lossy(&o.stderr)
        )));
    }
    Ok(ns)
}

/// Start the steady traffic loop: `redirect-kit churn` (content-checked
/// echo exchanges) and `xfer` (2 MiB, hash-checked), as the app of the
/// long-lived pod, through its proxy to the upstream echo. Paced (100 ms
/// between runs, ~150 connections/s): steady traffic, not a stress test;
/// back to back it saturates both vCPUs and, with TIME_WAIT, exhausts the
/// proxy's ephemeral ports towards the one upstream address within a
/// minute.
fn steady_loop(
    kit: PathBuf,
    p: Placement,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Steady> {
    std::thread::spawn(move || {
        let dst = format!("{UPSTREAM_V4}:8080");
        let churn = [
            "churn",
            "--connect",
            &dst,
            "--count",
            "20",
            "--concurrency",
            "1",
            "--size",
            "4096",
            "--rounds",
            "2",
            "--timeout-ms",
            "10000",
        ];
        let xfer = [
            "xfer",
            "--connect",
            &dst,
            "--size",
            "2097152",
            "--chunks",
            "65536,1000,16384",
            "--timeout-ms",
            "10000",
        ];
        let mut s = Steady::default();
        let mut i = 0u64;
        while !stop.load(Ordering::SeqCst) {
            i += 1;
            s.runs += 1;
            let r = if i.is_multiple_of(4) {
                run_kit(&kit, &p, &xfer, Duration::from_secs(60))
            } else {
                run_kit(&kit, &p, &churn, Duration::from_secs(60))
            };
            match r {
                Err(e) => {
                    s.failures += 1;
                    s.errors.push(e);
                }
                Ok(v) if i.is_multiple_of(4) => {
                    if v["ok"] == true
                        && v["sent"] == 2097152
                        && v["received"] == 2097152
                        && v["recv_hash"] == v["sent_hash"]
                    {
                        s.connections += 1;
                        s.bytes_checked += 2 * 2097152;
                    } else {
                        s.failures += 1;
                        s.errors.push(v.to_string());
                    }
                }
                Ok(v) => {
                    let done = v["done"].as_u64().unwrap_or(0);
                    let failed = v["failures"].as_u64().unwrap_or(1)
                        + 20u64.saturating_sub(done + v["failures"].as_u64().unwrap_or(0));
                    s.connections += done;
                    s.bytes_checked += done * 2 * 2 * 4096;
                    if failed > 0 {
                        s.failures += failed;
                        s.errors.push(v.to_string());
                    }
                }
            }
            s.errors.truncate(10);
            for _ in 0..10 {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        s
    })
}

/// The whole run. Err only when the run could not be set up; failed checks
/// are in the report (`ok` false).
pub fn run(o: &Options) -> Result<Report, String> {
    kit::stress::raise_nofile();
    let t_start = Instant::now();
    let redirect = o
        .redirect
        .clone()
        .unwrap_or_else(|| sibling_binary("redirect"));
    let plugin = sibling_binary("redirect-cni");
    let kitbin = std::env::current_exe().map_err(|e| e.to_string())?;
    for b in [&redirect, &plugin] {
        if !b.exists() {
            return Err(format!("{} missing (cargo build)", b.display()));
        }
    }
    let topo = Topology::new("chn").map_err(|e| format!("creating the topology: {e}"))?;
    let tmp = TempDir(std::env::temp_dir().join(unique("rdchurn-")));
    std::fs::create_dir_all(&tmp.0).map_err(|e| e.to_string())?;
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/{}", unique("rdchurn-")));
    let _install = Install {
        redirect: redirect.clone(),
        pin_dir: pin_dir.clone(),
    };
    let pins = Pins::new(&pin_dir);
    let socket = tmp.0.join("agent.sock");
    let log = tmp.0.join("agent.log");

    // Upstream echo and the long-lived pod's proxy.
    let mut children: Vec<ChildGuard> = Vec::new();
    let spawn = |args: &[&str], p: &Placement| -> Result<ChildGuard, String> {
        let mut c = Command::new(&kitbin);
        c.args(args);
        ChildGuard::spawn(args[0], c, p, true).map_err(|e| e.to_string())
    };
    let up = format!("{UPSTREAM_V4}:8080");
    children.push(spawn(
        &["epoll-echo", "--listen", &up],
        &topo.in_upstream(),
    )?);
    children.push(spawn(&["proxy"], &topo.in_pod(PROXY_UID, PROXY_UID))?);

    // The agent.
    let logf = std::fs::File::create(&log).map_err(|e| e.to_string())?;
    let mut cmd = Command::new(&redirect);
    cmd.arg("--pin-dir")
        .arg(&pin_dir)
        .arg("daemon")
        .arg("--socket")
        .arg(&socket)
        .args(["--metrics-addr", "127.0.0.1:0"])
        .arg("--cgroup")
        .arg(&topo.cgroup.path);
    cmd.env("RUST_LOG", "info,redirect_userspace::attach=debug")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(logf);
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("starting the agent: {e}"))?;
    let out = child.stdout.take().unwrap();
    let mut agent = Agent {
        child,
        log: log.clone(),
    };
    let mut r = BufReader::new(out);
    let mut line = String::new();
    let _ = r.read_line(&mut line);
    std::thread::spawn(move || {
        let mut sink = String::new();
        while r.read_line(&mut sink).map(|n| n > 0).unwrap_or(false) {
            sink.clear();
        }
    });
    if !line.contains("\"ready\"") {
        return Err(format!(
            "the agent did not get ready: {line:?}\n{}",
            std::fs::read_to_string(&agent.log).unwrap_or_default()
        ));
    }
    let agent_pid = agent.child.id();

    let conf = json!({
        "cniVersion": "1.0.0", "name": "churn", "type": "redirect-cni", "socket": socket,
        "prevResult": {"cniVersion": "1.0.0", "interfaces": [{"name": "eth0", "sandbox": "/run/netns/x"}], "ips": [{"address": "10.202.0.2/24", "interface": 0}]},
    })
    .to_string();
    let select = |pod: &str| {
        format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=churn;K8S_POD_NAME={pod};REDIRECT_CAPTURE=true")
    };

    // The long-lived pod, captured, warmed up with the same traffic mix.
    let steady_ns = topo.pod.path().display().to_string();
    let (code, out, _) = cni(
        &plugin,
        "ADD",
        "steady",
        &steady_ns,
        &select("steady"),
        &conf,
    );
    if code != 0 {
        return Err(format!(
            "CNI ADD of the long-lived pod failed: {out}\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        ));
    }
    let app = topo.in_pod(APP_UID, APP_UID);
    let warm = Arc::new(AtomicBool::new(false));
    {
        // One round of each tool, synchronously.
        let s = steady_loop(kitbin.clone(), app.clone(), warm.clone());
        std::thread::sleep(Duration::from_millis(1500));
        warm.store(true, Ordering::SeqCst);
        let s = s.join().unwrap_or_default();
        if s.failures > 0 || s.connections == 0 {
            return Err(format!(
                "warm-up traffic through the long-lived pod failed: {:?}",
                s.errors
            ));
        }
    }
    // Baseline: no connection in flight.
    let maps_dir = pins.maps_dir();
    let steady_cookie = Netns::open(&topo.pod.path())
        .and_then(|n| n.cookie())
        .map_err(|e| format!("cookie of the long-lived pod: {e}"))?;
    let settle = |want: Option<&BTreeMap<String, u64>>| -> BTreeMap<String, u64> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut prev = map_entry_counts(&maps_dir, steady_cookie);
        loop {
            std::thread::sleep(Duration::from_millis(200));
            let now = map_entry_counts(&maps_dir, steady_cookie);
            let done = match want {
                Some(w) => &now == w,
                None => now == prev,
            };
            if done || Instant::now() > deadline {
                return now;
            }
            prev = now;
        }
    };
    // Resident pods, captured for the whole churn.
    let mut residents: Vec<(NetnsGuard, String)> = Vec::new();
    for j in 0..o.resident {
        let name = format!("{}r{j}", unique("rdch"));
        let ns = make_pod_netns(&name).map_err(|e| format!("resident pod {j}: {e}"))?;
        let path = ns.path().display().to_string();
        let (code, out, _) = cni(
            &plugin,
            "ADD",
            &format!("resident-{j}"),
            &path,
            &select(&format!("r{j}")),
            &conf,
        );
        if code != 0 {
            return Err(format!("CNI ADD of resident pod {j} failed: {out}"));
        }
        residents.push((ns, path));
    }
    let maps_baseline = settle(None);
    let pins_baseline = listing(&pin_dir);
    let fds_baseline = fds_of(agent_pid);
    let netns_prefix = unique("rdch");

    let stop = Arc::new(AtomicBool::new(false));
    let steady = steady_loop(kitbin.clone(), app.clone(), stop.clone());

    let mut rep = Report {
        pods: o.pods,
        resident: o.resident,
        load_avg: (load_avg(), 0.0),
        build: if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        kernel: kernel(),
        cpus: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        ..Report::default()
    };
    let (mut add_cni, mut del_cni) = (Vec::new(), Vec::new());
    let mut created: Vec<raw::KernelIds> = Vec::new();
    let mut peak = maps_baseline.clone();
    let mut setup_errors = Vec::new();
    let mut rss_all: Vec<(usize, u64)> = Vec::new();
    for i in 0..o.pods {
        let name = format!("{netns_prefix}p{i}");
        let cid = format!("churn-{i}");
        let ns = match make_pod_netns(&name) {
            Ok(n) => n,
            Err(e) => {
                setup_errors.push(format!("pod {i}: {e}"));
                break;
            }
        };
        let cg = PodCgroup(topo.cgroup.path.join(format!("pod{i}")));
        if let Err(e) = std::fs::create_dir(&cg.0) {
            setup_errors.push(format!("pod {i}: creating {}: {e}", cg.0.display()));
            break;
        }
        let path = ns.path().display().to_string();
        let cookie = Netns::open(&ns.path()).and_then(|n| n.cookie()).ok();
        let (code, out, ms) = cni(
            &plugin,
            "ADD",
            &cid,
            &path,
            &select(&format!("p{i}")),
            &conf,
        );
        add_cni.push(ms);
        if code != 0 {
            rep.pod_traffic_failed += 1;
            rep.pod_traffic_errors
                .push(format!("pod {i}: CNI ADD failed: {out}"));
        } else {
            if let Some(ids) = cookie.and_then(|c| raw::ids_of_link(&pins.sk_lookup_link(c)).ok()) {
                created.push(ids);
            } else {
                rep.pod_traffic_errors.push(format!(
                    "pod {i}: no readable sk_lookup link pinned after ADD"
                ));
                rep.pod_traffic_failed += 1;
            }
            let p = Placement {
                netns: Some(ns.path()),
                cgroup: Some(cg.0.clone()),
                uid: Some(0),
                gid: Some(0),
            };
            match run_kit(
                &kitbin,
                &p,
                &["pod-probe", "--dst", CHURN_DST, "--size", "16384"],
                Duration::from_secs(20),
            ) {
                Ok(v) if v["ok"] == true => rep.pod_traffic_ok += 1,
                Ok(v) => {
                    rep.pod_traffic_failed += 1;
                    rep.pod_traffic_errors.push(format!("pod {i}: {v}"));
                }
                Err(e) => {
                    rep.pod_traffic_failed += 1;
                    rep.pod_traffic_errors.push(format!("pod {i}: {e}"));
                }
            }
        }
        if i % 50 == 0 {
            for (k, v) in map_entry_counts(&maps_dir, steady_cookie) {
                let e = peak.entry(k).or_default();
                *e = (*e).max(v);
            }
        }
        let (code, out, ms) = cni(
            &plugin,
            "DEL",
            &cid,
            &path,
            &format!("K8S_POD_NAMESPACE=churn;K8S_POD_NAME=p{i}"),
            &conf,
        );
        del_cni.push(ms);
        if code != 0 {
            rep.pod_traffic_errors
                .push(format!("pod {i}: CNI DEL failed: {out}"));
        }
        if !cg.remove() {
            rep.pod_traffic_errors.push(format!(
                "pod {i}: cgroup {} could not be removed",
                cg.0.display()
            ));
        }
        drop(ns);
        let rss = vm_rss_kib(agent_pid);
        rss_all.push((i + 1, rss));
        if i % 10 == 0 || i + 1 == o.pods {
            rep.rss_kib.push((i + 1, rss));
        }
        if i % 100 == 0 {
            eprintln!(
                "pod-churn: {i}/{} pods, agent RSS {} KiB",
                o.pods,
                vm_rss_kib(agent_pid)
            );
        }
        rep.pod_traffic_errors.truncate(20);
    }
    stop.store(true, Ordering::SeqCst);
    rep.load_avg.1 = load_avg();
    rep.steady = steady.join().unwrap_or_default();
    rep.maps_after = settle(Some(&maps_baseline));
    rep.maps_baseline = maps_baseline;
    rep.maps_peak = peak;
    // The agent's sockets: CNI connections are served by short threads.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        rep.agent_fds_after = fds_of(agent_pid);
        if rep.agent_fds_after <= fds_baseline || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    rep.agent_fds_baseline = fds_baseline;
    // Kernel objects of the churned pods: links, programs, .rodata maps.
    rep.kernel_objects_created = created.len();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        rep.kernel_objects_left = created.iter().flat_map(|ids| ids.alive()).collect();
        if rep.kernel_objects_left.is_empty() || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    rep.kernel_objects_left.truncate(20);
    let pins_after = listing(&pin_dir);
    let netns_left: Vec<String> = redirect_userspace::pins::read_dir(Path::new("/run/netns"))
        .iter()
        .filter_map(|p| p.file_name()?.to_str().map(str::to_string))
        .filter(|n| n.starts_with(&netns_prefix))
        .collect();
    let cgroups_left: Vec<String> = redirect_userspace::pins::read_dir(&topo.cgroup.path)
        .iter()
        .filter(|p| p.is_dir())
        .map(|p| p.display().to_string())
        .collect();
    let agent_alive = matches!(agent.child.try_wait(), Ok(None));

    // Memory: median of an early window (after the first 10% warm the
    // allocator) against the last 10%.
    let n = rss_all.len();
    let med = |w: &[(usize, u64)]| -> u64 {
        let mut v: Vec<u64> = w.iter().map(|x| x.1).collect();
        v.sort();
        v.get(v.len() / 2).copied().unwrap_or(0)
    };
    if n >= 10 {
        rep.rss_early_kib = med(&rss_all[n / 10..n / 5 + 1]);
        rep.rss_late_kib = med(&rss_all[n - n / 10..]);
    }
    rep.rss_tolerance_kib = rss_tolerance_kib(o.pods);
    rep.add_cni_ms = Stats::of(&add_cni);
    rep.del_cni_ms = Stats::of(&del_cni);
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let adds = agent_times(&text, "captured pod", "elapsed_ms");
    let dels = agent_times(&text, "released pod", "elapsed_ms");
    let pick = |m: &BTreeMap<String, f64>| -> Vec<f64> {
        m.iter()
            .filter(|(k, _)| k.starts_with("churn-"))
            .map(|(_, v)| *v)
            .collect()
    };
    rep.add_agent_ms = Stats::of(&pick(&adds));
    rep.del_agent_ms = Stats::of(&pick(&dels));
    for phase in [
        "accel_ms",
        "netns_ms",
        "maps_ms",
        "sk_lookup_ms",
        "listener_ms",
    ] {
        rep.add_phases_ms.push((
            phase.trim_end_matches("_ms").to_string(),
            Stats::of(&pick(&agent_times(&text, "pod registered", phase))),
        ));
    }

    let mut checks = Vec::new();
    let mut check = |name: &str, ok: bool, detail: String| {
        checks.push(Check {
            name: name.into(),
            ok,
            detail,
        })
    };
    check("setup", setup_errors.is_empty(), setup_errors.join("; "));
    check(
        "every pod captured, its traffic redirected with the right original destination, intact",
        rep.pod_traffic_failed == 0 && rep.pod_traffic_ok == o.pods as u64,
        format!(
            "{} ok, {} failed: {:?}",
            rep.pod_traffic_ok, rep.pod_traffic_failed, rep.pod_traffic_errors
        ),
    );
    check(
        "every ADD and DEL timed by the agent",
        rep.add_agent_ms.n == o.pods && rep.del_agent_ms.n == o.pods,
        format!(
            "{} ADD, {} DEL in the agent log",
            rep.add_agent_ms.n, rep.del_agent_ms.n
        ),
    );
    check(
        "steady traffic: zero failed connections, every byte checked",
        rep.steady.failures == 0 && rep.steady.connections > 0,
        format!(
            "{} connections, {} failures, {} bytes checked: {:?}",
            rep.steady.connections,
            rep.steady.failures,
            rep.steady.bytes_checked,
            rep.steady.errors
        ),
    );
    let diff: Vec<String> = rep
        .maps_baseline
        .iter()
        .chain(rep.maps_after.iter())
        .filter(|(k, _)| rep.maps_baseline.get(*k) != rep.maps_after.get(*k))
        .map(|(k, _)| {
            format!(
                "{k}: {:?} -> {:?}",
                rep.maps_baseline.get(k),
                rep.maps_after.get(k)
            )
        })
        .collect();
    check(
        "every pinned map back to its baseline entry count",
        diff.is_empty(),
        if diff.is_empty() {
            format!("{} maps", rep.maps_after.len())
        } else {
            diff.join(", ")
        },
    );
    let extra: Vec<&String> = pins_after
        .iter()
        .filter(|p| !pins_baseline.contains(p))
        .collect();
    let gone: Vec<&String> = pins_baseline
        .iter()
        .filter(|p| !pins_after.contains(p))
        .collect();
    check(
        "pin directory back to its baseline listing",
        extra.is_empty() && gone.is_empty(),
        format!(
            "{} entries; extra {extra:?}, missing {gone:?}",
            pins_after.len()
        ),
    );
    check(
        "every per-pod sk_lookup link, program and .rodata map freed",
        rep.kernel_objects_left.is_empty() && rep.kernel_objects_created == o.pods,
        format!(
            "{} pods' objects recorded; still alive: {:?}",
            rep.kernel_objects_created, rep.kernel_objects_left
        ),
    );
    check(
        "agent fds and sockets back to baseline",
        rep.agent_fds_after.0 <= fds_baseline.0 && rep.agent_fds_after.1 <= fds_baseline.1,
        format!(
            "fds/sockets {:?} -> {:?}",
            fds_baseline, rep.agent_fds_after
        ),
    );
    check(
        "no pod netns left",
        netns_left.is_empty(),
        format!("{netns_left:?}"),
    );
    check(
        "no pod cgroup directory left",
        cgroups_left.is_empty(),
        format!("{cgroups_left:?}"),
    );
    check(
        "agent memory flat",
        n >= 10 && rep.rss_late_kib <= rep.rss_early_kib + rep.rss_tolerance_kib,
        format!(
            "VmRSS median of pods {}..{}: {} KiB, of the last {}: {} KiB, tolerance {} KiB{}",
            n / 10 + 1,
            n / 5 + 1,
            rep.rss_early_kib,
            n / 10,
            rep.rss_late_kib,
            rep.rss_tolerance_kib,
            if n < 10 {
                " (at least 10 pods are needed)"
            } else {
                ""
            }
        ),
    );
    check("agent still running", agent_alive, String::new());
    rep.checks = checks;
    rep.ok = rep.checks.iter().all(|c| c.ok);
    rep.elapsed_s = t_start.elapsed().as_secs_f64();
    if !rep.ok {
        eprintln!(
            "pod-churn: agent log tail:\n{}",
            text.lines()
                .rev()
                .take(30)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    for (j, (ns, path)) in residents.into_iter().enumerate() {
        let _ = cni(
            &plugin,
            "DEL",
            &format!("resident-{j}"),
            &path,
            &format!("K8S_POD_NAMESPACE=churn;K8S_POD_NAME=r{j}"),
            &conf,
        );
        drop(ns);
    }
    drop(agent);
    drop(children);
    if let Some(dir) = &o.out {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        std::fs::write(
            dir.join("churn.json"),
            serde_json::to_string_pretty(&rep).unwrap(),
        )
        .map_err(|e| e.to_string())?;
        std::fs::write(dir.join("churn.md"), markdown(&rep)).map_err(|e| e.to_string())?;
    }
    Ok(rep)
}

/// Allowed RSS growth from the early to the late pods: 1 MiB, or 0.7 KiB
/// per pod when more. Over 1000 pods the windows are ~800 pods apart, so a
/// leak of 1.3 KiB per pod (a record, a path, a thread's buffers) crosses
/// it, while allocator and page-granular noise stays well below.
pub fn rss_tolerance_kib(pods: usize) -> u64 {
    RSS_TOLERANCE_MIN_KIB.max(pods as u64 * 7 / 10)
}

pub fn markdown(r: &Report) -> String {
    let row = |name: &str, s: &Stats| {
        format!(
            "| {name} | {} | {:.2} | {:.2} | {:.2} | {:.2} |\n",
            s.n, s.p50, s.p90, s.p99, s.max
        )
    };
    let mut m = format!(
        "# Pod churn\n\n{} pods created{}, captured (CNI ADD through `redirect-cni` to a running `redirect daemon`), checked with traffic, released (CNI DEL) and removed, while steady traffic flowed through a long-lived captured pod. {} build, Linux {}, {} CPUs, load average {:.1} at the start and {:.1} at the end (the machine may be shared), {:.0} s.\n\n\
         ## Attach and detach time per pod (ms)\n\n| | n | p50 | p90 | p99 | max |\n|---|---|---|---|---|---|\n",
        r.pods,
        if r.resident > 0 { format!(" (with {} resident pods captured throughout)", r.resident) } else { String::new() },
        r.build,
        r.kernel, r.cpus, r.load_avg.0, r.load_avg.1, r.elapsed_s
    );
    m += &row("ADD, inside the agent", &r.add_agent_ms);
    m += &row("DEL, inside the agent", &r.del_agent_ms);
    m += &row("ADD, `redirect-cni` process end to end", &r.add_cni_ms);
    m += &row("DEL, `redirect-cni` process end to end", &r.del_cni_ms);
    m += "\nADD inside the agent, by phase (`register_pod`; the rest of the ADD is the request itself: parsing, netns open, cgroup check, record):\n\n| phase | p50 | p90 | p99 | max |\n|---|---|---|---|---|\n";
    for (name, s) in &r.add_phases_ms {
        m += &format!(
            "| {name} | {:.2} | {:.2} | {:.2} | {:.2} |\n",
            s.p50, s.p90, s.p99, s.max
        );
    }
    m += &format!(
        "\n## Traffic\n\n- churned pods: {} redirected and checked, {} failed\n- long-lived pod: {} connections, {} failed, {:.1} MiB echoed and compared\n\n## Agent memory (VmRSS)\n\nearly {} KiB, late {} KiB (tolerance {} KiB); every 100 pods: {}\n\n## Maps (entries)\n\n{} counts the keys of other pods than the long-lived one (whose traffic may hit a new reason at any time).\n\n| map | baseline | peak | after |\n|---|---|---|---|\n",
        r.pod_traffic_ok,
        r.pod_traffic_failed,
        r.steady.connections,
        r.steady.failures,
        r.steady.bytes_checked as f64 / 1048576.0,
        r.rss_early_kib,
        r.rss_late_kib,
        r.rss_tolerance_kib,
        r.rss_kib.iter().filter(|(i, _)| i % 100 == 1 || *i == r.pods).map(|(i, k)| format!("{i}: {k}")).collect::<Vec<_>>().join(", "),
        redirect_common::MAP_COUNTERS
    );
    for (k, v) in &r.maps_baseline {
        m += &format!(
            "| {k} | {v} | {} | {} |\n",
            r.maps_peak.get(k).copied().unwrap_or(0),
            r.maps_after
                .get(k)
                .map(|v| v.to_string())
                .unwrap_or("-".into())
        );
    }
    m += "\n## Checks\n\n";
    for c in &r.checks {
        m += &format!(
            "- {} {}: {}\n",
            if c.ok { "PASS" } else { "FAIL" },
            c.name,
            c.detail
        );
    }
    m
}

// ------------------------------------------------------------- pod-probe

/// Inside a churned pod (uid 0, captured): listen on 127.0.0.1:15001 and
/// [::]:15006, connect to `dst`, which must be redirected to the 15001
/// listener with SO_ORIGINAL_DST = `dst`; send `size` bytes, echo them
/// back, compare. One JSON line.
pub fn pod_probe(dst: SocketAddr, size: usize) -> Value {
    let r = (|| -> Result<Value, String> {
        let out = TcpListener::bind("127.0.0.1:15001").map_err(|e| format!("listen 15001: {e}"))?;
        let _inbound = TcpListener::bind("[::]:15006").map_err(|e| format!("listen 15006: {e}"))?;
        let c = TcpStream::connect_timeout(&dst, Duration::from_secs(5))
            .map_err(|e| format!("connect {dst}: {e}"))?;
        let (a, _) = out.accept().map_err(|e| format!("accept: {e}"))?;
        let orig = original_dst(&a).map_err(|e| format!("SO_ORIGINAL_DST: {e}"))?;
        let peer = c.peer_addr().map_err(|e| e.to_string())?;
        let data = kit::payload(size);
        let t = Duration::from_secs(5);
        let (mut c2, mut a2) = (c.try_clone().unwrap(), a.try_clone().unwrap());
        c2.set_read_timeout(Some(t)).ok();
        a2.set_read_timeout(Some(t)).ok();
        let d2 = data.clone();
        let w = std::thread::spawn(move || c2.write_all(&d2));
        let mut got = vec![0u8; size];
        a2.read_exact(&mut got)
            .map_err(|e| format!("reading at the listener: {e}"))?;
        w.join().unwrap().map_err(|e| format!("writing: {e}"))?;
        let w = std::thread::spawn(move || a2.write_all(&got));
        let mut back = vec![0u8; size];
        let mut c3 = c.try_clone().unwrap();
        c3.set_read_timeout(Some(t)).ok();
        c3.read_exact(&mut back)
            .map_err(|e| format!("reading the echo: {e}"))?;
        w.join().unwrap().map_err(|e| format!("echoing: {e}"))?;
        let ok = orig == dst && peer == dst && kit::stress::hash(&back) == kit::stress::hash(&data);
        Ok(
            json!({"ok": ok, "orig": orig.to_string(), "peer": peer.to_string(), "hash": kit::stress::hash(&back), "want_hash": kit::stress::hash(&data)}),
        )
    })();
    r.unwrap_or_else(|e| json!({"ok": false, "error": e}))
}

fn original_dst(s: &TcpStream) -> std::io::Result<SocketAddr> {
    let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    if unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_IP,
            80,
            (&mut sa as *mut libc::sockaddr_in).cast(),
            &mut len,
        )
    } != 0
    {
        return Err(std::io::Error::last_os_error());
    }
    Ok(SocketAddr::from((
        u32::from_be(sa.sin_addr.s_addr).to_be_bytes(),
        u16::from_be(sa.sin_port),
    )))
}

// ------------------------------------------------------------- raw bpf(2)

mod raw {
    use super::*;

    const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
    const BPF_MAP_GET_FD_BY_ID: libc::c_long = 14;
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;

    fn bpf(cmd: libc::c_long, attr: &mut [u64; 16]) -> std::io::Result<i32> {
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                attr.as_mut_ptr(),
                std::mem::size_of_val(attr),
            )
        };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(r as i32)
    }

    fn obj_get(path: &Path) -> std::io::Result<OwnedFd> {
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(std::io::Error::other)?;
        let mut attr = [0u64; 16];
        attr[0] = c.as_ptr() as u64;
        bpf(BPF_OBJ_GET, &mut attr).map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
    }

    fn info(fd: &OwnedFd, buf: &mut [u8]) -> std::io::Result<()> {
        let mut attr = [0u64; 16];
        // { u32 bpf_fd; u32 info_len; u64 info }
        attr[0] = fd.as_raw_fd() as u32 as u64 | ((buf.len() as u64) << 32);
        attr[1] = buf.as_mut_ptr() as u64;
        bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).map(drop)
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_ne_bytes(b[off..off + 4].try_into().unwrap())
    }

    /// Keys of a pinned map, counted; with `skip`, keys that start with
    /// that u64 (a netns cookie) are not.
    pub fn count_keys(path: &Path, skip: Option<u64>) -> std::io::Result<u64> {
        let fd = obj_get(path)?;
        let mut inf = [0u8; 80];
        info(&fd, &mut inf)?;
        let key_size = u32_at(&inf, 8) as usize; // bpf_map_info: type, id, key_size
        let mut key = vec![0u8; key_size.max(1)];
        let mut next = vec![0u8; key_size.max(1)];
        let mut n = 0u64;
        let mut first = true;
        loop {
            let mut attr = [0u64; 16];
            attr[0] = fd.as_raw_fd() as u32 as u64;
            attr[1] = if first { 0 } else { key.as_ptr() as u64 };
            attr[2] = next.as_mut_ptr() as u64;
            match bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
                Ok(_) => {
                    let skipped =
                        skip.is_some_and(|c| next.len() >= 8 && next[..8] == c.to_ne_bytes());
                    n += u64::from(!skipped);
                    first = false;
                    std::mem::swap(&mut key, &mut next);
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(n),
                Err(e) => return Err(e),
            }
        }
    }

    /// The kernel objects of one pod's inbound steering.
    #[derive(Debug, Clone)]
    pub struct KernelIds {
        pub link: u32,
        pub prog: u32,
        /// The program's own maps (its `.rodata`), not the shared ones.
        pub maps: Vec<u32>,
    }

    /// Link id, program id and the program's private maps, from a pinned link.
    pub fn ids_of_link(path: &Path) -> std::io::Result<KernelIds> {
        let link = obj_get(path)?;
        let mut li = [0u8; 64];
        info(&link, &mut li)?;
        let (link_id, prog_id) = (u32_at(&li, 4), u32_at(&li, 8));
        let mut attr = [0u64; 16];
        attr[0] = prog_id as u64;
        let prog =
            bpf(BPF_PROG_GET_FD_BY_ID, &mut attr).map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })?;
        let mut ids = [0u32; 32];
        let mut pi = [0u8; 232];
        // bpf_prog_info: nr_map_ids @52, map_ids @56
        pi[52..56].copy_from_slice(&(ids.len() as u32).to_ne_bytes());
        pi[56..64].copy_from_slice(&(ids.as_mut_ptr() as u64).to_ne_bytes());
        info(&prog, &mut pi)?;
        let n = (u32_at(&pi, 52) as usize).min(ids.len());
        let maps_dir = path
            .parent()
            .and_then(Path::parent)
            .and_then(Path::parent)
            .map(|r| r.join("maps"))
            .unwrap_or_default();
        let mut shared = Vec::new();
        for p in redirect_userspace::pins::read_dir(&maps_dir) {
            if let Ok(fd) = obj_get(&p) {
                let mut mi = [0u8; 80];
                if info(&fd, &mut mi).is_ok() {
                    shared.push(u32_at(&mi, 4));
                }
            }
        }
        let maps = ids[..n]
            .iter()
            .copied()
            .filter(|id| !shared.contains(id))
            .collect();
        Ok(KernelIds {
            link: link_id,
            prog: prog_id,
            maps,
        })
    }

    fn alive(cmd: libc::c_long, id: u32) -> bool {
        let mut attr = [0u64; 16];
        attr[0] = id as u64;
        match bpf(cmd, &mut attr) {
            Ok(fd) => {
                drop(unsafe { OwnedFd::from_raw_fd(fd) });
                true
            }
            Err(_) => false,
        }
    }

    impl KernelIds {
        /// What of this pod is still in the kernel.
        pub fn alive(&self) -> Vec<String> {
            let mut v = Vec::new();
            if alive(BPF_LINK_GET_FD_BY_ID, self.link) {
                v.push(format!("link {}", self.link));
            }
            if alive(BPF_PROG_GET_FD_BY_ID, self.prog) {
                v.push(format!("prog {}", self.prog));
            }
            for m in &self.maps {
                if alive(BPF_MAP_GET_FD_BY_ID, *m) {
                    v.push(format!("map {m}"));
                }
            }
            v
        }
    }
}
