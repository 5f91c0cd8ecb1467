//! Throwaway pods on this host for the demo, the tests and the benchmark:
//! network namespaces joined by veth, child cgroups, and processes started
//! inside them as a given uid/gid. Every piece removes itself on drop, so a
//! panicking test still cleans up. Nothing here addresses anything outside
//! the namespaces it created.

use std::{
    io::{self, BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// Process placement, the product's own: re-exported so a test finds the
/// whole toolbox here.
pub use redirect_userspace::placement::{place, sibling_binary, unique, CgroupGuard, Placement};

/// Run a command, failing with its stderr.
pub fn run(cmd: &str, args: &[&str]) -> io::Result<String> {
    let out = Command::new(cmd).args(args).output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A named network namespace (`ip netns add`), deleted on drop.
pub struct NetnsGuard {
    pub name: String,
}

impl NetnsGuard {
    pub fn new(name: &str) -> io::Result<NetnsGuard> {
        run("ip", &["netns", "add", name])?;
        let ns = NetnsGuard { name: name.into() };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// `ip -n <name> ...`
    pub fn ip(&self, args: &[&str]) -> io::Result<String> {
        let mut a = vec!["-n", &self.name];
        a.extend_from_slice(args);
        run("ip", &a)
    }
}

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        let _ = run("ip", &["netns", "del", &self.name]);
    }
}

/// How a program run by [`run_placed`] ended.
#[derive(Debug)]
pub struct Finished {
    /// None when it could not be waited for.
    pub status: Option<std::process::ExitStatus>,
    pub stdout: String,
    pub stderr: String,
    /// Killed (by PID) at the timeout.
    pub timed_out: bool,
}

/// Run `program args` placed as asked, collecting its output; killed (by
/// PID) if still running after `timeout`. Err only when it cannot start.
pub fn run_placed(
    program: &Path,
    args: &[&str],
    p: &Placement,
    timeout: Duration,
) -> io::Result<Finished> {
    use std::io::Read;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    place(&mut cmd, p)?;
    let mut child = cmd.spawn()?;
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let t_out = drain(Box::new(child.stdout.take().expect("piped")));
    let t_err = drain(Box::new(child.stderr.take().expect("piped")));
    let deadline = Instant::now() + timeout;
    let mut timed_out = false;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break Some(st),
            Ok(None) if Instant::now() > deadline => {
                timed_out = true;
                let _ = child.kill();
                break child.wait().ok();
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(_) => break None,
        }
    };
    Ok(Finished {
        status,
        stdout: t_out.join().unwrap_or_default(),
        stderr: t_err.join().unwrap_or_default(),
        timed_out,
    })
}

/// A child process killed (by PID) and reaped on drop.
pub struct ChildGuard {
    pub child: Child,
    pub name: String,
    lines: Option<std::sync::mpsc::Receiver<String>>,
}

impl ChildGuard {
    /// Start `cmd` placed as asked, stdout piped; wait for its first stdout
    /// line when `wait_ready` (the kit tools print one when listening).
    pub fn spawn(
        name: &str,
        mut cmd: Command,
        p: &Placement,
        wait_ready: bool,
    ) -> io::Result<ChildGuard> {
        place(&mut cmd, p)?;
        cmd.stdin(Stdio::null()).stdout(if wait_ready {
            Stdio::piped()
        } else {
            Stdio::null()
        });
        let child = cmd
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("starting {name}: {e}")))?;
        let mut g = ChildGuard {
            child,
            name: name.into(),
            lines: None,
        };
        if wait_ready {
            let out = g.child.stdout.take().expect("piped");
            let mut r = BufReader::new(out);
            let mut line = String::new();
            r.read_line(&mut line)?;
            if !line.contains("ready") {
                return Err(io::Error::other(format!(
                    "{name} did not start: {line:?} {:?}",
                    g.child.try_wait()
                )));
            }
            // Keep draining so the child never blocks on a full pipe.
            let (tx, rx) = std::sync::mpsc::channel::<String>();
            std::thread::spawn(move || {
                for l in r.lines().map_while(Result::ok) {
                    if tx.send(l).is_err() {
                        break;
                    }
                }
            });
            g.lines = Some(rx);
        }
        Ok(g)
    }

    /// Lines printed since the last call (non-blocking).
    pub fn take_lines(&mut self) -> Vec<String> {
        match &self.lines {
            Some(rx) => rx.try_iter().collect(),
            None => Vec::new(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Pod + upstream: two namespaces over veth, each with IPv4 and IPv6, and
/// a child cgroup for the pod's processes.
pub struct Topology {
    pub pod: NetnsGuard,
    pub upstream: NetnsGuard,
    pub cgroup: CgroupGuard,
}

pub const POD_V4: &str = "10.200.0.2";
pub const UPSTREAM_V4: &str = "10.200.0.1";
pub const POD_V6: &str = "fd00:200::2";
pub const UPSTREAM_V6: &str = "fd00:200::1";

impl Topology {
    pub fn new(tag: &str) -> io::Result<Topology> {
        let id = unique("");
        let pod = NetnsGuard::new(&format!("rdp-{tag}-{id}"))?;
        let upstream = NetnsGuard::new(&format!("rdu-{tag}-{id}"))?;
        // The pair is created in our netns first, so use unique temporary
        // names there, then rename to eth0 inside each namespace.
        let (a, b) = (unique("va"), unique("vb"));
        run(
            "ip",
            &[
                "link",
                "add",
                &a,
                "netns",
                &pod.name,
                "type",
                "veth",
                "peer",
                "name",
                &b,
                "netns",
                &upstream.name,
            ],
        )?;
        pod.ip(&["link", "set", &a, "name", "eth0"])?;
        upstream.ip(&["link", "set", &b, "name", "eth0"])?;
        for (ns, v4, v6) in [
            (&pod, POD_V4, POD_V6),
            (&upstream, UPSTREAM_V4, UPSTREAM_V6),
        ] {
            ns.ip(&["addr", "add", &format!("{v4}/24"), "dev", "eth0"])?;
            ns.ip(&[
                "-6",
                "addr",
                "add",
                &format!("{v6}/64"),
                "dev",
                "eth0",
                "nodad",
            ])?;
            ns.ip(&["link", "set", "eth0", "up"])?;
        }
        let cgroup = CgroupGuard::new(&format!("redirect-{tag}-{id}"))?;
        Ok(Topology {
            pod,
            upstream,
            cgroup,
        })
    }

    pub fn in_pod(&self, uid: u32, gid: u32) -> Placement {
        Placement {
            netns: Some(self.pod.path()),
            cgroup: Some(self.cgroup.path.clone()),
            uid: Some(uid),
            gid: Some(gid),
        }
    }

    pub fn in_upstream(&self) -> Placement {
        Placement {
            netns: Some(self.upstream.path()),
            ..Placement::default()
        }
    }
}
