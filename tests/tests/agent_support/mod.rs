//! Shared by the agent, CNI and podman tests: a `redirect daemon` run as a
//! child (own socket, pin dir and cgroup; stopped by PID), the redirect-cni
//! binary driven with env + stdin, and agent socket calls.
#![allow(dead_code)]

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use redirect_testbed::sandbox::{sibling_binary, unique};
use redirect_tests::redirect_bin;
use serde_json::{json, Value};

pub fn cni_bin() -> PathBuf {
    let p = sibling_binary("redirect-cni");
    assert!(
        p.exists(),
        "{} missing: run `cargo xtask test` (it builds the binaries first)",
        p.display()
    );
    p
}

/// A private temp directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(unique(&format!("rdt-{tag}-")));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    pub fn join(&self, p: &str) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `redirect --pin-dir <pin> daemon --socket <sock> --metrics-addr
/// 127.0.0.1:0 --cgroup <cg> <extra>`, started and waited for ready.
/// Dropping kills it (by PID) if it still runs.
pub struct Daemon {
    pub child: Child,
    pub ready: Value,
    pub socket: PathBuf,
    pub log: PathBuf,
}

impl Daemon {
    pub fn start(
        pin_dir: &Path,
        cgroup: &Path,
        socket: &Path,
        log: &Path,
        extra: &[&str],
    ) -> Daemon {
        match Daemon::try_start(pin_dir, cgroup, socket, log, extra) {
            Ok(d) => d,
            Err(e) => panic!("{e}"),
        }
    }

    /// Start; Err carries the daemon's log when it did not get ready.
    pub fn try_start(
        pin_dir: &Path,
        cgroup: &Path,
        socket: &Path,
        log: &Path,
        extra: &[&str],
    ) -> Result<Daemon, String> {
        Daemon::try_start_bin(&redirect_bin(), pin_dir, cgroup, socket, log, extra)
    }

    /// `try_start` with another `redirect` binary (an upgrade).
    pub fn try_start_bin(
        bin: &Path,
        pin_dir: &Path,
        cgroup: &Path,
        socket: &Path,
        log: &Path,
        extra: &[&str],
    ) -> Result<Daemon, String> {
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let mut cmd = Command::new(bin);
        cmd.arg("--pin-dir")
            .arg(pin_dir)
            .arg("daemon")
            .arg("--socket")
            .arg(socket)
            .args(["--metrics-addr", "127.0.0.1:0"])
            .arg("--cgroup")
            .arg(cgroup)
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(logf);
        let mut child = cmd.spawn().expect("starting redirect daemon");
        let out = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(out);
            let mut line = String::new();
            let _ = r.read_line(&mut line);
            let _ = tx.send(line);
            // Keep draining so the daemon never blocks on stdout.
            let mut sink = String::new();
            while r.read_line(&mut sink).map(|n| n > 0).unwrap_or(false) {
                sink.clear();
            }
        });
        // Generous: the first start of an install runs the acceleration
        // probe, which takes a minute under QEMU's TCG (the kernel matrix).
        let line = rx
            .recv_timeout(Duration::from_secs(120))
            .unwrap_or_default();
        let ready: Value = match serde_json::from_str(&line) {
            Ok(v) => v,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "daemon did not get ready: {line:?}\nlog:\n{}",
                    std::fs::read_to_string(log).unwrap_or_default()
                ));
            }
        };
        assert_eq!(ready["event"], "ready", "{ready}");
        Ok(Daemon {
            child,
            ready,
            socket: socket.to_path_buf(),
            log: log.to_path_buf(),
        })
    }

    pub fn metrics_addr(&self) -> std::net::SocketAddr {
        self.ready["metrics_addr"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap()
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// SIGTERM, then wait (10 s at most): the exit status.
    pub fn stop(mut self) -> std::process::ExitStatus {
        unsafe { libc::kill(self.pid(), libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "daemon ignored SIGTERM for 10 s; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// One request on the agent socket (raw reply, ok or not).
    pub fn call(&self, req: &Value) -> Value {
        call_raw(&self.socket, &req.to_string())
    }

    pub fn list(&self) -> Vec<Value> {
        let r = self.call(&json!({"op": "list"}));
        assert_eq!(r["ok"], true, "{r}");
        r["pods"].as_array().unwrap().clone()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Send one line, read one reply line.
pub fn call_raw(socket: &Path, line: &str) -> Value {
    let s = UnixStream::connect(socket)
        .unwrap_or_else(|e| panic!("connecting to {}: {e}", socket.display()));
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    (&s).write_all(format!("{line}\n").as_bytes()).unwrap();
    let mut reply = String::new();
    BufReader::new(&s).read_line(&mut reply).unwrap();
    serde_json::from_str(&reply).unwrap_or_else(|e| panic!("reply {reply:?}: {e}"))
}

/// What one redirect-cni run printed.
#[derive(Debug)]
pub struct CniRun {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl CniRun {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("redirect-cni stdout is not JSON ({e}): {self:?}"))
    }

    /// The CNI error code (the run must have failed).
    pub fn error_code(&self) -> u64 {
        assert_eq!(self.code, 1, "expected a CNI error: {self:?}");
        let v = self.json();
        assert!(v["msg"].is_string() && v["cniVersion"].is_string(), "{v}");
        v["code"].as_u64().unwrap_or_else(|| panic!("no code: {v}"))
    }
}

/// Run redirect-cni with exactly these CNI_* variables (nothing else of
/// ours leaks in) and `stdin`.
pub fn cni(vars: &[(&str, &str)], stdin: &[u8]) -> CniRun {
    let mut cmd = Command::new(cni_bin());
    cmd.env_clear().env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
    for (k, v) in vars {
        cmd.env(k, v);
    }
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("running redirect-cni");
    let mut inp = child.stdin.take().unwrap();
    let data = stdin.to_vec();
    let w = std::thread::spawn(move || {
        let _ = inp.write_all(&data);
    });
    let out = child.wait_with_output().unwrap();
    let _ = w.join();
    CniRun {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).trim().to_string(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

pub const PREV_RESULT: &str = r#"{"cniVersion":"1.0.0","interfaces":[{"name":"eth0","sandbox":"/run/netns/x"}],"ips":[{"address":"10.200.0.2/24","interface":0}]}"#;

/// The plugin config as a runtime passes it to the chained plugin.
pub fn plugin_conf(socket: &Path, extra: Value) -> String {
    let mut v = json!({
        "cniVersion": "1.0.0",
        "name": "rdtest",
        "type": "redirect-cni",
        "socket": socket,
        "prevResult": serde_json::from_str::<Value>(PREV_RESULT).unwrap(),
    });
    for (k, x) in extra.as_object().cloned().unwrap_or_default() {
        v[k] = x;
    }
    v.to_string()
}

/// CNI_* variables of one pod operation.
pub fn pod_vars<'a>(
    command: &'a str,
    container_id: &'a str,
    netns: &'a str,
    args: &'a str,
) -> Vec<(&'a str, &'a str)> {
    vec![
        ("CNI_COMMAND", command),
        ("CNI_CONTAINERID", container_id),
        ("CNI_NETNS", netns),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/usr/lib/cni"),
        ("CNI_ARGS", args),
    ]
}

/// Poll `f` until it is true (5 s at most).
pub fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
