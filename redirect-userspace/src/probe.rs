//! Kernel capability probe for acceleration (sockops + sk_msg).
//!
//! Acceleration is on by default only where the running kernel's sockmap
//! TCP code behaves like plain TCP in the ways an application can notice.
//! The probe exercises the known-bad behaviours with this install's real
//! programs, in a throwaway network namespace and child cgroup it creates
//! and removes, on a redirected (accelerated) connection and on a plain
//! loopback connection of the same namespace as a control:
//!
//! - `blocking-read`: a blocking `read()` waiting for data must not return
//!   `EAGAIN` when its socket is woken without data (here: by its own
//!   `shutdown(SHUT_WR)`; the ACK of that FIN or the peer's FIN do the
//!   same). tcp_bpf_recvmsg() waits once and returns `EAGAIN` on any
//!   wake-up that finds both queues empty.
//! - `rst-on-unread-close`: closing a socket that holds unread data must
//!   reset the connection (the peer's read fails with `ECONNRESET`).
//!   tcp_close() counts only sk_receive_queue, not the sockmap queue.
//! - `flow-control`: a peer that never reads must stop a blocking writer
//!   after a bounded amount of data. Redirected data is charged to the receiver's
//!   forward allocation, not its window.
//!
//! The controls must pass and the redirected connections must really be
//! accelerated (the pod's ACCEL counters), or the probe is inconclusive
//! (acceleration stays off, not cached). A conclusive result is cached in
//! a one-entry array map pinned in the install (`maps/REDIRECT_ACCEL_PROBE`):
//! bpffs is in memory, so the cache lives as long as the running kernel.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    os::unix::process::CommandExt,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use aya::maps::{Array, Map, MapData};
use serde::{Deserialize, Serialize};

use crate::{
    config::AccelMode,
    error::{Error, Result},
    pins::Pins,
    placement::{self, CgroupGuard, Placement},
};

/// Bumped when the checks change: an older cached result is re-probed.
pub const PROBE_VERSION: u64 = 1;
/// Pin name of the cache (in the install's map directory).
pub const PROBE_MAP: &str = crate::pins::MAP_ACCEL_PROBE;
/// The hidden subcommand the probe runs itself as, inside the sandbox.
pub const INSIDE_COMMAND: &str = "accel-probe-inside";

/// The checks, in bit order of the cached failure mask.
pub const CHECKS: [(&str, &str); 3] = [
    ("blocking-read", "a blocking read() returns EAGAIN when its socket is woken without data (e.g. after shutdown(SHUT_WR))"),
    ("rst-on-unread-close", "closing a socket with unread redirected data sends FIN, not RST (the peer sees EOF instead of ECONNRESET)"),
    ("flow-control", "no flow control: a peer that never reads does not stop the writer"),
];

/// Flow-control check: plain loopback TCP stops a writer after a few MiB
/// (send buffer + receive window); more than this is "no flow control".
const FLOW_LIMIT: usize = 16 << 20;
/// Original destination the probe's "app" dials: TEST-NET-1, rewritten to
/// the proxy port by the connect hook. The namespace has only `lo`, so it
/// could not leave even if it were not redirected.
const PROBE_DST: &str = "192.0.2.1:80";

/// A conclusive probe result.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProbeResult {
    /// Every check passed on the accelerated connection.
    pub passed: bool,
    /// Names of the checks that failed with acceleration.
    pub failed: Vec<String>,
    /// Unix time of the run.
    pub at: u64,
}

impl ProbeResult {
    fn from_mask(mask: u64, at: u64) -> ProbeResult {
        let failed: Vec<String> = CHECKS
            .iter()
            .enumerate()
            .filter(|(i, _)| mask & (1 << i) != 0)
            .map(|(_, (n, _))| n.to_string())
            .collect();
        ProbeResult {
            passed: failed.is_empty(),
            failed,
            at,
        }
    }

    fn mask(&self) -> u64 {
        CHECKS
            .iter()
            .enumerate()
            .filter(|(_, (n, _))| self.failed.iter().any(|f| f == n))
            .map(|(i, _)| 1 << i)
            .sum()
    }

    /// One line: what failed, in words.
    pub fn summary(&self) -> String {
        if self.passed {
            return "kernel probe passed".into();
        }
        let why: Vec<String> = self
            .failed
            .iter()
            .map(|f| {
                let d = CHECKS
                    .iter()
                    .find(|(n, _)| n == f)
                    .map(|(_, d)| *d)
                    .unwrap_or("");
                format!("{f}: {d}")
            })
            .collect();
        format!(
            "kernel probe failed on {} {}: {}",
            uname_release(),
            if why.len() == 1 { "check" } else { "checks" },
            why.join("; ")
        )
    }
}

/// A pod's acceleration decision in words, from how it was asked for,
/// whether it is on, and the install's probe result. Short: a failed probe
/// is named by its checks; what they mean is said once, by `redirect
/// status` ([`ProbeResult::summary`]).
pub fn describe(mode: AccelMode, on: bool, probe: Option<&ProbeResult>) -> String {
    let failed = |p: &ProbeResult| format!("{}; details: `redirect status`", p.failed.join(", "));
    match (mode, on, probe) {
        (AccelMode::Off, _, _) => "off (--no-accel)".into(),
        (AccelMode::Forced, true, Some(p)) if !p.passed => {
            format!(
                "on, forced with --accel although the kernel probe failed ({})",
                failed(p)
            )
        }
        (AccelMode::Forced, true, _) => "on, forced with --accel".into(),
        (AccelMode::Auto, true, _) => "on (kernel probe passed)".into(),
        (AccelMode::Auto, false, Some(p)) if !p.passed => {
            format!(
                "off: kernel probe failed ({}); --accel forces it on",
                failed(p)
            )
        }
        (AccelMode::Auto, false, None) => {
            "off: the kernel probe did not complete; --accel forces it on".into()
        }
        (_, false, _) => "off: the sk_msg program could not be attached".into(),
    }
}

/// The running kernel's release string.
pub fn uname_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "this kernel".into())
}

// ------------------------------------------------------------ the cache

/// The cached result of this install, if a conclusive probe of this
/// version ran.
pub fn cached(pins: &Pins) -> Option<ProbeResult> {
    let arr = open_cache(pins).ok()?;
    let v = arr.get(&0, 0).ok()?;
    let version = v & 0xffff;
    if version != PROBE_VERSION {
        return None;
    }
    let mask = (v >> 16) & 0xffff;
    let at = v >> 32;
    Some(ProbeResult::from_mask(mask, at))
}

fn open_cache(pins: &Pins) -> Result<Array<MapData, u64>> {
    let path = pins.map(PROBE_MAP);
    let data = MapData::from_pin(&path)
        .map_err(|e| Error::bpf(format!("opening {}", path.display()), e))?;
    Array::try_from(Map::Array(data))
        .map_err(|e| Error::bpf(format!("{} is not the probe cache", path.display()), e))
}

fn store(pins: &Pins, r: &ProbeResult) -> Result<()> {
    let path = pins.map(PROBE_MAP);
    crate::bpf::create_pinned(
        &path,
        &crate::bpf::MapSpec {
            map_type: crate::bpf::BPF_MAP_TYPE_ARRAY,
            key_size: 4,
            value_size: 8,
            max_entries: 1,
            name: "",
        },
        "the acceleration probe cache map",
    )?;
    let mut arr = open_cache(pins)?;
    let v = PROBE_VERSION | (r.mask() << 16) | ((r.at & 0xffff_ffff) << 32);
    arr.set(0, v, 0)
        .map_err(|e| Error::bpf(format!("writing {}", path.display()), e))
}

// ------------------------------------------------------------ running it

/// What the sandboxed half reports: per check, the control and the
/// accelerated outcome (None = as plain TCP, Some(why) = differed).
#[derive(Debug, Serialize, Deserialize)]
pub struct InsideReport {
    pub checks: Vec<CheckOutcome>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct CheckOutcome {
    pub name: String,
    pub control: Option<String>,
    pub accel: Option<String>,
}

/// Hooks the probe needs from the install: make the sandbox's netns a
/// pod with acceleration forced on, attach the cgroup programs to the
/// sandbox cgroup, read the pod's ACCEL counters, and undo both.
pub trait ProbeHost {
    /// Capture `netns` (forced acceleration) with the programs attached to
    /// `cgroup`; returns the pod's netns cookie.
    fn capture(&mut self, netns: &Path, cgroup: &Path) -> Result<u64>;
    /// (sockets inserted, messages redirected) of the pod.
    fn accel_counts(&self, cookie: u64) -> (u64, u64);
    /// Release the pod and detach from the cgroup.
    fn release(&mut self, cookie: u64, cgroup: &Path);
    /// Detach from the cgroup of a probe that died midway.
    fn forget_cgroup(&mut self, cgroup: &Path);
    /// This install has programs attached to `cgroup`.
    fn owns_cgroup(&self, cgroup: &Path) -> bool;
}

/// Name prefix of the probe's child cgroup, `<prefix><pid>x<n>` (the pid
/// of the probing process). Once its namespace is captured, the cgroup
/// holds a marker child `c<netns cookie>`.
const STALE_PREFIX: &str = "redirect-accel-probe-";

/// Child cgroups of probes whose process is gone (killed midway): their
/// pod released and this install's links to them removed, their
/// processes killed, the directories removed. A cgroup with a captured
/// pod is left to the install that attached to it.
fn remove_stale_cgroups(host: &mut dyn ProbeHost) {
    let Ok(root) = crate::sys::cgroup2_mount() else {
        return;
    };
    for dir in crate::pins::read_dir(&root) {
        let Some(name) = dir.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let Some(pid) = name
            .strip_prefix(STALE_PREFIX)
            .and_then(|r| r.split('x').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let markers: Vec<(std::path::PathBuf, u64)> = crate::pins::read_dir(&dir)
            .into_iter()
            .filter_map(|m| {
                let c = m.file_name()?.to_str()?.strip_prefix('c')?.parse().ok()?;
                Some((m, c))
            })
            .collect();
        if !markers.is_empty() && !host.owns_cgroup(&dir) {
            continue;
        }
        tracing::warn!(
            "removing {} left by an acceleration probe that did not finish",
            dir.display()
        );
        for (m, cookie) in &markers {
            host.release(*cookie, &dir);
            let _ = std::fs::remove_dir(m);
        }
        host.forget_cgroup(&dir);
        drop(CgroupGuard { path: dir });
    }
}

/// The cached result, or run the probe now (and cache it when
/// conclusive). Err means the probe could not run or was inconclusive.
pub fn result(pins: &Pins, host: &mut dyn ProbeHost) -> std::result::Result<ProbeResult, String> {
    if let Some(r) = cached(pins) {
        return Ok(r);
    }
    let t = Instant::now();
    let r = run(host)?;
    tracing::info!(passed = r.passed, failed = ?r.failed, elapsed_ms = t.elapsed().as_millis() as u64, "acceleration kernel probe: {}", r.summary());
    if let Err(e) = store(pins, &r) {
        tracing::warn!("acceleration probe result not cached: {e:#}");
    }
    Ok(r)
}

/// Set in the sandboxed half's environment: a probe never starts another.
const INSIDE_ENV: &str = "REDIRECT_ACCEL_PROBE_INSIDE";

/// The `redirect` binary that knows the hidden subcommand: this process
/// when it is `redirect`, else `redirect` in `$REDIRECT_BIN_DIR` or next to
/// this program (tests, examples).
fn redirect_binary() -> std::result::Result<std::path::PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("finding the redirect binary: {e}"))?;
    if exe.file_name().is_some_and(|n| n == "redirect") {
        return Ok(exe);
    }
    let mut candidates = vec![placement::sibling_binary("redirect")];
    if let Some(dir) = exe.parent() {
        candidates.push(dir.join("redirect"));
        if let Some(up) = dir.parent() {
            candidates.push(up.join("redirect"));
        }
    }
    candidates.into_iter().find(|p| p.is_file()).ok_or_else(|| {
        format!(
            "no `redirect` binary next to {} to run the probe with (set REDIRECT_BIN_DIR)",
            exe.display()
        )
    })
}

fn run(host: &mut dyn ProbeHost) -> std::result::Result<ProbeResult, String> {
    if std::env::var_os(INSIDE_ENV).is_some() {
        return Err("the acceleration probe does not run inside itself".into());
    }
    let exe = redirect_binary()?;
    remove_stale_cgroups(host);
    let cg = CgroupGuard::new(&placement::unique(STALE_PREFIX))
        .map_err(|e| format!("creating the probe's child cgroup: {e}"))?;
    let mut cmd = Command::new(&exe);
    cmd.arg(INSIDE_COMMAND).env(INSIDE_ENV, "1");
    placement::place(
        &mut cmd,
        &Placement {
            cgroup: Some(cg.path.clone()),
            ..Default::default()
        },
    )
    .map_err(|e| format!("placing the probe: {e}"))?;
    // A network namespace of its own, gone when the process is.
    unsafe {
        cmd.pre_exec(|| {
            if libc::unshare(libc::CLONE_NEWNET) != 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(())
            }
        });
    }
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("starting {} {INSIDE_COMMAND}: {e}", exe.display()))?;
    let pid = child.id();
    let outcome = (|| {
        let mut out = BufReader::new(child.stdout.take().expect("piped"));
        let mut line = String::new();
        out.read_line(&mut line)
            .map_err(|e| format!("reading the probe: {e}"))?;
        if line.trim() != "ready" {
            return Err(format!("the probe did not start: {line:?}"));
        }
        let netns = std::path::PathBuf::from(format!("/proc/{pid}/ns/net"));
        let cookie = host
            .capture(&netns, &cg.path)
            .map_err(|e| format!("capturing the probe's namespace: {e:#}"))?;
        // A marker in the cgroup names the pod (cgroup v2 cannot rename):
        // a probe killed from here on has its pod released by the next.
        let marker = cg.path.join(format!("c{cookie}"));
        let _ = std::fs::create_dir(&marker);
        let report = (|| {
            writeln!(child.stdin.as_mut().expect("piped"), "go")
                .map_err(|e| format!("starting the checks: {e}"))?;
            line.clear();
            out.read_line(&mut line)
                .map_err(|e| format!("reading the probe's report: {e}"))?;
            serde_json::from_str::<InsideReport>(&line)
                .map_err(|e| format!("the probe's report {line:?}: {e}"))
        })();
        let counts = host.accel_counts(cookie);
        host.release(cookie, &cg.path);
        let _ = std::fs::remove_dir(&marker);
        Ok((report?, counts))
    })();
    let _ = child.kill();
    let _ = child.wait();
    drop(cg);
    let (report, (inserted, redirected)) = outcome?;
    judge(&report, inserted, redirected)
}

/// Turn the sandbox's report and the pod's counters into a result.
pub fn judge(
    report: &InsideReport,
    inserted: u64,
    redirected: u64,
) -> std::result::Result<ProbeResult, String> {
    let mut mask = 0;
    for (i, (name, _)) in CHECKS.iter().enumerate() {
        let c = report
            .checks
            .iter()
            .find(|c| c.name == *name)
            .ok_or_else(|| format!("probe inconclusive: check {name} did not run"))?;
        if let Some(why) = &c.control {
            return Err(format!(
                "probe inconclusive: check {name} failed on plain TCP too ({why})"
            ));
        }
        if c.accel.is_some() {
            mask |= 1 << i;
        }
    }
    // Each check's accelerated pair: two sockets, at least one message.
    let want = 2 * CHECKS.len() as u64;
    if inserted != want || redirected == 0 {
        return Err(format!("probe inconclusive: {inserted} sockets accelerated (expected {want}), {redirected} messages redirected"));
    }
    let at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let r = ProbeResult::from_mask(mask, at);
    for c in &report.checks {
        if let Some(why) = &c.accel {
            // Details for the agent's log; `status` says it for the CLI.
            tracing::info!(check = %c.name, "acceleration kernel probe: {why}");
        }
    }
    Ok(r)
}

// ------------------------------------------------ inside the sandbox

/// The sandboxed half: runs as root in its own netns (only `lo`) and the
/// probe cgroup. Listens on the proxy port, says "ready", waits for "go"
/// (the namespace is captured then), runs each check on a plain loopback
/// connection and on a redirected one, prints one JSON line.
pub fn inside() -> std::io::Result<()> {
    if std::env::var_os(INSIDE_ENV).is_none() {
        return Err(std::io::Error::other(format!(
            "internal command: run only by the acceleration probe ({INSIDE_ENV} unset)"
        )));
    }
    lo_up()?;
    let listener = TcpListener::bind("127.0.0.1:15001")?;
    println!("ready");
    std::io::stdout().flush()?;
    let mut go = String::new();
    std::io::stdin().read_line(&mut go)?;
    if go.trim() != "go" {
        // The probing process went away before capturing the namespace.
        return Err(std::io::Error::other("the probe was abandoned"));
    }
    let plain: SocketAddr = "127.0.0.1:15001".parse().unwrap();
    let redirected: SocketAddr = PROBE_DST.parse().unwrap();
    type Check = fn(TcpStream, TcpStream) -> Option<String>;
    let checks: [(&str, Check); 3] = [
        ("blocking-read", check_blocking_read),
        ("rst-on-unread-close", check_rst),
        ("flow-control", check_flow),
    ];
    let mut report = InsideReport { checks: Vec::new() };
    for (name, check) in checks {
        let run = |dst: SocketAddr| -> Option<String> {
            let pair = (|| -> std::io::Result<(TcpStream, TcpStream)> {
                let app = TcpStream::connect_timeout(&dst, Duration::from_secs(2))?;
                let (proxy, _) = listener.accept()?;
                Ok((app, proxy))
            })();
            match pair {
                Ok((app, proxy)) => check(app, proxy),
                Err(e) => Some(format!("connecting to {dst}: {e}")),
            }
        };
        let control = run(plain);
        let accel = run(redirected);
        report.checks.push(CheckOutcome {
            name: name.into(),
            control,
            accel,
        });
    }
    println!(
        "{}",
        serde_json::to_string(&report).map_err(std::io::Error::other)?
    );
    Ok(())
}

/// The app blocks in read(); its own shutdown(SHUT_WR) wakes it without
/// data; then the proxy answers. Plain TCP: the read returns the answer.
fn check_blocking_read(app: TcpStream, proxy: TcpStream) -> Option<String> {
    app.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    let reader = app.try_clone().ok()?;
    let (tx, rx) = std::sync::mpsc::channel();
    let t = std::thread::spawn(move || {
        let _ = tx.send(unsafe { libc::gettid() });
        let mut r = reader;
        let mut buf = [0u8; 16];
        let t0 = Instant::now();
        let res = r.read(&mut buf);
        (res.map(|n| buf[..n].to_vec()), t0.elapsed())
    });
    let tid = rx.recv().ok()?;
    // Wait until the reader sleeps in read() (state S), then wake it.
    let deadline = Instant::now() + Duration::from_secs(2);
    while !sleeping(tid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::sleep(Duration::from_millis(20));
    let _ = app.shutdown(Shutdown::Write);
    std::thread::sleep(Duration::from_millis(50));
    let _ = (&proxy).write_all(b"pong");
    let (res, took) = t.join().ok()?;
    match res {
        Ok(b) if b == b"pong" => None,
        Ok(b) => Some(format!("read() returned {b:?} instead of the answer")),
        Err(e) => Some(format!(
            "read() failed after {} ms with {e} instead of waiting for the answer",
            took.as_millis()
        )),
    }
}

fn sleeping(tid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('S'))
        })
        .unwrap_or(false)
}

/// The app sends; the proxy closes without reading. Plain TCP: RST, the
/// app's read fails with ECONNRESET.
fn check_rst(app: TcpStream, proxy: TcpStream) -> Option<String> {
    let mut a = &app;
    a.write_all(&[7u8; 100]).ok()?;
    std::thread::sleep(Duration::from_millis(20));
    drop(proxy);
    app.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let mut buf = [0u8; 16];
    match a.read(&mut buf) {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => None,
        Ok(0) => Some("the peer saw EOF instead of ECONNRESET".into()),
        other => Some(format!(
            "the peer's read returned {other:?} instead of ECONNRESET"
        )),
    }
}

/// The proxy never reads; the app writes, blocking, with a send timeout.
/// Plain TCP: the write blocks (then times out) after a few MiB.
fn check_flow(app: TcpStream, proxy: TcpStream) -> Option<String> {
    app.set_write_timeout(Some(Duration::from_millis(100)))
        .ok()?;
    // Below the bulk switch (which would move the socket to the normal
    // path, flow-controlled): the kernel's redirected path is probed.
    let chunk = vec![1u8; 16 << 10];
    let mut total = 0usize;
    let mut a = &app;
    let res = loop {
        match a.write(&chunk) {
            Ok(n) => {
                total += n;
                if total >= FLOW_LIMIT {
                    break Some(format!(
                        "{} MiB accepted for a peer that never reads",
                        total >> 20
                    ));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break None,
            Err(e) => break Some(format!("write failed with {e} after {total} bytes")),
        }
    };
    drop(proxy);
    res
}

/// `ip link set lo up`, by ioctl.
fn lo_up() -> std::io::Result<()> {
    let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if s < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let s = unsafe { OwnedFd::from_raw_fd(s) };
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, c) in ifr.ifr_name.iter_mut().zip(b"lo\0") {
        *d = *c as libc::c_char;
    }
    if unsafe { libc::ioctl(s.as_raw_fd(), libc::SIOCGIFFLAGS as libc::Ioctl, &mut ifr) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    unsafe { ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    if unsafe { libc::ioctl(s.as_raw_fd(), libc::SIOCSIFFLAGS as libc::Ioctl, &ifr) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(control: [Option<&str>; 3], accel: [Option<&str>; 3]) -> InsideReport {
        InsideReport {
            checks: CHECKS
                .iter()
                .zip(control.iter().zip(accel.iter()))
                .map(|((n, _), (c, a))| CheckOutcome {
                    name: n.to_string(),
                    control: c.map(String::from),
                    accel: a.map(String::from),
                })
                .collect(),
        }
    }

    #[test]
    fn mask_round_trips_and_summary_names_checks() {
        let r = ProbeResult::from_mask(0b101, 7);
        assert_eq!(r.failed, vec!["blocking-read", "flow-control"]);
        assert!(!r.passed);
        assert_eq!(r.mask(), 0b101);
        assert!(
            r.summary().contains("blocking-read: a blocking read()")
                && r.summary().contains("flow-control: no flow control"),
            "{}",
            r.summary()
        );
        assert!(ProbeResult::from_mask(0, 7).passed);
    }

    #[test]
    fn judge_requires_passing_controls_and_real_acceleration() {
        let ok = report([None; 3], [None, Some("eof"), None]);
        let r = judge(&ok, 6, 3).unwrap();
        assert_eq!(r.failed, vec!["rst-on-unread-close"]);
        assert!(judge(&ok, 4, 3)
            .unwrap_err()
            .contains("4 sockets accelerated"));
        assert!(judge(&ok, 6, 0).is_err());
        let bad_control = report([None, None, Some("x")], [None; 3]);
        assert!(judge(&bad_control, 6, 3)
            .unwrap_err()
            .contains("plain TCP too"));
        let missing = InsideReport { checks: Vec::new() };
        assert!(judge(&missing, 6, 3).is_err());
    }
}
