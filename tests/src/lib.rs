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

pub use redirect_userspace::sandbox::{
    run, ChildGuard, NetnsGuard, Placement, Topology, POD_V4, POD_V6, UPSTREAM_V4, UPSTREAM_V6,
};
use redirect_userspace::{kit::ClientReport, sandbox::sibling_binary};

pub const APP_UID: u32 = 1000;
pub const PROXY_UID: u32 = 1337;

pub fn redirect_bin() -> PathBuf {
    let p = sibling_binary("redirect");
    assert!(p.exists(), "{} missing: run `cargo xtask test` (it builds the binaries first)", p.display());
    p
}

pub fn kit_bin() -> PathBuf {
    let p = sibling_binary("redirect-kit");
    assert!(p.exists(), "{} missing: run `cargo xtask test`", p.display());
    p
}

/// A test pod: topology, pin dir, and the processes started in it.
pub struct Pod {
    pub topo: Topology,
    pub pin_dir: PathBuf,
    pub children: Vec<ChildGuard>,
}

impl Pod {
    pub fn new(tag: &str) -> Pod {
        let topo = Topology::new(tag).unwrap_or_else(|e| panic!("creating topology {tag}: {e}"));
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/{}", redirect_userspace::sandbox::unique("rdt-")));
        Pod {
            topo,
            pin_dir,
            children: Vec::new(),
        }
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
            .output()
            .expect("running redirect")
    }

    /// `redirect attach` of the pod netns to the pod cgroup; must succeed.
    pub fn attach(&self, flags: &[&str]) -> Output {
        let ns = self.pod_netns();
        let cg = self.topo.cgroup.path.clone();
        let mut args = vec!["attach", "--netns", ns.to_str().unwrap(), "--cgroup", cg.to_str().unwrap()];
        args.extend_from_slice(flags);
        let out = self.redirect(&args);
        assert!(
            out.status.success(),
            "redirect {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Istio's injected flags.
    pub fn attach_istio_default(&self) -> Output {
        self.attach(&["-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "", "-b", "*", "-d", "15090,15021,15020"])
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
        let (a, b) = (format!("{UPSTREAM_V4}:{port}"), format!("[{UPSTREAM_V6}]:{port}"));
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
        redirect_userspace::sandbox::place(&mut cmd, p).expect("placing client");
        let out = cmd.output().expect("running client");
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("client output {:?} {:?}: {e}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
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
        assert!(out.status.success(), "stats: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("stats json")
    }

    /// One counter: chain ("OUTPUT", "PREROUTING", "ORIGINAL_DST",
    /// "ERRORS") and rule name (see `Reason::name`).
    pub fn counter(&self, chain: &str, rule: &str) -> u64 {
        let s = self.stats();
        s[0]["rules"]
            .as_array()
            .expect("rules")
            .iter()
            .find(|r| r["chain"] == chain && r["rule"] == rule)
            .unwrap_or_else(|| panic!("no counter {chain}/{rule}"))["count"]
            .as_u64()
            .unwrap()
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        self.children.clear();
        if self.pin_dir.exists() {
            let out = self.redirect(&["uninstall"]);
            if !out.status.success() {
                eprintln!("uninstall of {} failed: {}", self.pin_dir.display(), String::from_utf8_lossy(&out.stderr));
                let _ = std::fs::remove_dir_all(&self.pin_dir);
            }
        }
    }
}

/// True when the client reached the upstream server through our proxy:
/// it saw the original peer and the upstream saw the pod's address.
pub fn assert_ok(r: &ClientReport, what: &str) {
    assert!(r.ok, "{what}: {r:?}");
}
