//! The real runtime: podman (runc, CNI backend) starts a pod whose network
//! is a conflist of this test (bridge + host-local + redirect-cni, an
//! isolated subnet on a bridge without an address, so no packet can leave
//! the bridge), with `redirect daemon` serving the plugin. The pod has an
//! app container and the kit sidecar proxy as 1337:1337; the server is a
//! container on the same bridge. No registry: the image is imported from
//! the busybox-static binary (plus the kit's shared libraries), and the kit
//! binary is bind-mounted.
//!
//! Everything podman makes lives under a temp dir (--root, --runroot,
//! --tmpdir, containers.conf via CONTAINERS_CONF, network config dir, CNI
//! bin dir); the bridge, host-local's state, the cgroups and the pins are
//! removed by the guards, even on failure.

mod agent_support;
mod kube_support;

use std::{
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use agent_support::*;
use redirect_testbed::sandbox::{sibling_binary, unique};
use redirect_tests::redirect_bin;
use serde_json::Value;

const IMAGE: &str = "localhost/redirect-test:1";
const KIT_IN_CTR: &str = "/usr/local/bin/redirect-kit";

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// podman confined to a temp dir, its network, bridge and cgroup parent;
/// all of it removed on drop.
struct Podman {
    dir: PathBuf,
    net: String,
    bridge: String,
    subnet: String,
    cgroup_parent: String,
}

impl Podman {
    fn new() -> Podman {
        for tool in [
            "podman",
            "runc",
            "conmon",
            "/usr/lib/cni/bridge",
            "/usr/lib/cni/host-local",
        ] {
            let found = if tool.starts_with('/') {
                Path::new(tool).exists()
            } else {
                Command::new("sh")
                    .args(["-c", &format!("command -v {tool}")])
                    .output()
                    .map(|o| o.status.success())
                    .unwrap_or(false)
            };
            assert!(found, "{tool} missing: run `cargo xtask setup` (apt-get install podman runc conmon containernetworking-plugins busybox-static)");
        }
        let id = unique("");
        // Bridge and subnet unique per instance too: the tests of this
        // file run in parallel in one process.
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let n: u32 = (std::process::id() + seq * 97) % 200 + 20;
        let p = Podman {
            dir: std::env::temp_dir().join(format!("rdt-podman-{id}")),
            net: format!("rdtnet{id}"),
            bridge: format!("rdtb{}x{seq}", std::process::id() % 100_000),
            subnet: format!("10.203.{n}.0/24"),
            cgroup_parent: format!("redirect-podman-{id}"),
        };
        for d in ["net.d", "cni-bin", "root", "runroot", "tmp", "rootfs"] {
            std::fs::create_dir_all(p.dir.join(d)).unwrap();
        }
        let nofile = {
            let mut l = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) };
            l.rlim_max
        };
        std::fs::write(
            p.dir.join("containers.conf"),
            format!(
                "[containers]\ndefault_ulimits = [\"nofile={nofile}:{nofile}\", \"nproc=32768:32768\"]\n\
                 [engine]\nruntime = \"runc\"\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\nevents_logfile_path = \"{}\"\n\
                 [network]\nnetwork_backend = \"cni\"\ncni_plugin_dirs = [\"/usr/lib/cni\", \"{}\"]\nnetwork_config_dir = \"{}\"\n",
                p.dir.join("events.log").display(),
                p.dir.join("cni-bin").display(),
                p.dir.join("net.d").display()
            ),
        )
        .unwrap();
        std::fs::create_dir(p.cgroup2_parent()).unwrap();
        p
    }

    fn cgroup2_parent(&self) -> PathBuf {
        redirect_userspace::sys::cgroup2_mount()
            .unwrap()
            .join(&self.cgroup_parent)
    }

    fn conflist(&self) -> PathBuf {
        self.dir
            .join("net.d")
            .join(format!("{}.conflist", self.net))
    }

    fn write_conflist(&self) -> String {
        let text = format!(
            "{{\n  \"cniVersion\": \"1.0.0\",\n  \"name\": \"{}\",\n  \"plugins\": [\n    {{\n      \"type\": \"bridge\",\n      \"bridge\": \"{}\",\n      \"isGateway\": false,\n      \"ipMasq\": false,\n      \"ipam\": {{ \"type\": \"host-local\", \"ranges\": [[{{ \"subnet\": \"{}\" }}]] }}\n    }}\n  ]\n}}\n",
            self.net, self.bridge, self.subnet
        );
        std::fs::write(self.conflist(), &text).unwrap();
        text
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("podman");
        c.env("CONTAINERS_CONF", self.dir.join("containers.conf"))
            .env_remove("CNI_ARGS")
            .arg("--root")
            .arg(self.dir.join("root"))
            .arg("--runroot")
            .arg(self.dir.join("runroot"))
            .arg("--tmpdir")
            .arg(self.dir.join("tmp"))
            .args(["--storage-driver", "vfs"])
            .args(args)
            .stdin(Stdio::null());
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("running podman")
    }

    /// Must succeed; stdout trimmed.
    fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(o.status.success(), "podman {args:?}: {}", text(&o));
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    }

    /// The image: busybox-static, the kit's shared libraries (the kit
    /// itself is bind-mounted), and /pause for the infra container.
    fn import_image(&self) {
        let rootfs = self.dir.join("rootfs");
        let bb = Path::new("/bin/busybox");
        assert!(
            bb.exists(),
            "/bin/busybox missing: apt-get install busybox-static"
        );
        let ldd = Command::new("ldd").arg(bb).output().unwrap();
        assert!(
            !ldd.status.success() || text(&ldd).contains("not a dynamic"),
            "/bin/busybox is not static (install busybox-static): {}",
            text(&ldd)
        );
        std::fs::create_dir_all(rootfs.join("bin")).unwrap();
        std::fs::copy(bb, rootfs.join("bin/busybox")).unwrap();
        for applet in ["sh", "sleep", "grep", "cat", "echo", "ls"] {
            std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet)).unwrap();
        }
        let kit = sibling_binary("redirect-kit");
        let deps = Command::new("ldd").arg(&kit).output().unwrap();
        for lib in String::from_utf8_lossy(&deps.stdout)
            .split_whitespace()
            .filter(|w| w.starts_with('/'))
        {
            let dst = rootfs.join(lib.trim_start_matches('/'));
            std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
            std::fs::copy(lib, &dst).unwrap_or_else(|e| panic!("copying {lib}: {e}"));
        }
        std::fs::create_dir_all(rootfs.join("usr/local/bin")).unwrap();
        std::fs::write(rootfs.join(KIT_IN_CTR.trim_start_matches('/')), "").unwrap();
        std::fs::create_dir_all(rootfs.join("tmp")).unwrap();
        let pause = rootfs.join("pause");
        std::fs::write(
            &pause,
            "#!/bin/sh\ntrap 'exit 0' TERM INT\nwhile :; do sleep 1 & wait $!; done\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&pause, std::fs::Permissions::from_mode(0o755)).unwrap();
        let tar = self.dir.join("image.tar");
        let st = Command::new("tar")
            .arg("-C")
            .arg(&rootfs)
            .arg("-cf")
            .arg(&tar)
            .arg(".")
            .status()
            .unwrap();
        assert!(st.success());
        self.ok(&["import", tar.to_str().unwrap(), IMAGE]);
    }

    fn kit_mount(&self) -> String {
        format!(
            "{}:{KIT_IN_CTR}:ro",
            sibling_binary("redirect-kit").display()
        )
    }

    /// `podman logs` of a container, as lines.
    fn logs(&self, ctr: &str) -> Vec<String> {
        let o = self.run(&["logs", ctr]);
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn state(&self, ctr: &str) -> String {
        self.ok(&["inspect", "-f", "{{.State.Status}}", ctr])
    }

    /// The IPv4 address of a container (or pod infra container) on this
    /// instance's network.
    fn ip_of(&self, ctr: &str) -> String {
        self.ok(&[
            "inspect",
            "-f",
            &format!(
                "{{{{(index .NetworkSettings.Networks \"{}\").IPAddress}}}}",
                self.net
            ),
            ctr,
        ])
    }

    /// Create (not start) an empty pod (infra container only) on this
    /// instance's network, under its cgroup parent.
    fn create_pod(&self, pod: &str) {
        let cg = format!("/{}", self.cgroup_parent);
        self.ok(&[
            "pod",
            "create",
            "--name",
            pod,
            "--network",
            &self.net,
            "--infra-image",
            IMAGE,
            "--infra-command",
            "/pause",
            "--cgroup-parent",
            &cg,
        ]);
    }

    /// A pod whose app would connect to `dst`, started with `cni_args`:
    /// the start must fail with `why` (fail closed) and the app never run.
    /// The pod is removed afterwards.
    fn pod_never_starts(&self, pod: &str, dst: &str, cni_args: &str, why: &str) {
        self.create_pod(pod);
        let app = format!("{pod}-app");
        self.ok(&[
            "create",
            "--pod",
            pod,
            "--name",
            &app,
            "--user",
            "1000:1000",
            "-v",
            &self.kit_mount(),
            IMAGE,
            KIT_IN_CTR,
            "client",
            "--connect",
            dst,
        ]);
        let start = self
            .command(&["pod", "start", pod])
            .env("CNI_ARGS", cni_args)
            .output()
            .unwrap();
        assert!(
            !start.status.success(),
            "pod {pod} started ({cni_args}): {}",
            text(&start)
        );
        assert!(text(&start).contains(why), "{}", text(&start));
        assert_eq!(self.state(&app), "created", "the app never ran");
        self.ok(&["pod", "rm", "-f", "-t", "0", pod]);
    }

    /// Create (not start) a mesh pod: the sidecar (kit proxy as 1337:1337)
    /// and the app (uid 1000), which waits for the proxy to listen
    /// (reading /proc/net/tcp: no connection) and then makes its first two
    /// connections, to `first` and `second`. Returns the app's name.
    fn create_mesh_pod(&self, pod: &str, first: &str, second: &str) -> String {
        self.create_pod(pod);
        self.ok(&[
            "create",
            "--pod",
            pod,
            "--name",
            &format!("{pod}-proxy"),
            "--user",
            "1337:1337",
            "-v",
            &self.kit_mount(),
            IMAGE,
            KIT_IN_CTR,
            "proxy",
        ]);
        let app_script = format!(
            "i=0; until grep -q ':3A99 00000000:0000 0A' /proc/net/tcp; do i=$((i+1)); [ $i -gt 200 ] && exit 3; sleep 0.1; done; \
             {KIT_IN_CTR} client --connect {first} --payload first; {KIT_IN_CTR} client --connect {second} --payload second"
        );
        let app = format!("{pod}-app");
        self.ok(&[
            "create",
            "--pod",
            pod,
            "--name",
            &app,
            "--user",
            "1000:1000",
            "-v",
            &self.kit_mount(),
            IMAGE,
            "/bin/sh",
            "-c",
            &app_script,
        ]);
        app
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self.run(&["pod", "rm", "-a", "-f", "-t", "0"]);
        let _ = self.run(&["rm", "-a", "-f", "-t", "0"]);
        let _ = self.run(&["rmi", "-a", "-f"]);
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(Path::new("/var/lib/cni/networks").join(&self.net));
        // Mounts podman may have left under our dir (shm, overlays).
        let mounts: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_whitespace().nth(4).map(str::to_string))
            .filter(|m| Path::new(m).starts_with(&self.dir))
            .collect();
        for m in mounts.iter().rev() {
            let c = std::ffi::CString::new(m.as_str()).unwrap();
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
        // The cgroup parent in every hierarchy (cgroupfs makes it in the v1
        // controllers too), deepest first, killing what is left.
        let roots: Vec<PathBuf> = std::fs::read_to_string("/proc/mounts")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.len() > 2 && (f[2] == "cgroup" || f[2] == "cgroup2"))
                    .then(|| PathBuf::from(f[1]))
            })
            .collect();
        for root in roots {
            remove_cgroup_tree(&root.join(&self.cgroup_parent));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn remove_cgroup_tree(dir: &Path) {
    if !dir.is_dir() {
        return;
    }
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            remove_cgroup_tree(&e.path());
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        for f in ["cgroup.procs", "tasks"] {
            for pid in std::fs::read_to_string(dir.join(f))
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.trim().parse::<i32>().ok())
            {
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        if std::fs::remove_dir(dir).is_ok() || Instant::now() > deadline {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The daemon's pin dir, uninstalled on drop (after the pods are gone).
struct Pins(PathBuf);

impl Drop for Pins {
    fn drop(&mut self) {
        if self.0.exists() {
            let _ = Command::new(redirect_bin())
                .arg("--pin-dir")
                .arg(&self.0)
                .arg("uninstall")
                .output();
        }
    }
}

fn stats(pins: &Path, netns: &str) -> Value {
    let o = Command::new(redirect_bin())
        .arg("--pin-dir")
        .arg(pins)
        .args(["stats", "--netns", netns, "--json"])
        .output()
        .unwrap();
    assert!(o.status.success(), "stats: {}", text(&o));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn podman_pod_is_captured_from_its_first_connection() {
    let pins = Pins(PathBuf::from(format!(
        "/sys/fs/bpf/{}",
        unique("rdt-podman-")
    )));
    let pm = Podman::new();
    let original = pm.write_conflist();
    pm.import_image();
    let tmp = TempDir::new("podman-agent");
    let socket = tmp.join("agent.sock");
    let daemon_args = [
        "--cni-conf-dir",
        pm.dir.join("net.d").to_str().unwrap().to_string().leak() as &str,
        "--cni-bin-dir",
        pm.dir.join("cni-bin").to_str().unwrap().to_string().leak(),
        "--cni-conflist",
        pm.conflist()
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .to_string()
            .leak(),
    ];
    let daemon = Daemon::start(
        &pins.0,
        &pm.cgroup2_parent(),
        &socket,
        &tmp.join("daemon.log"),
        &daemon_args,
    );
    let fail =
        |what: &str, d: &Daemon| -> String { format!("{what}\ndaemon log:\n{}", d.log_text()) };
    let conf: Value =
        serde_json::from_str(&std::fs::read_to_string(pm.conflist()).unwrap()).unwrap();
    assert_eq!(
        conf["plugins"][1]["type"], "redirect-cni",
        "the daemon chained itself: {conf}"
    );
    assert!(pm.dir.join("cni-bin/redirect-cni").exists());

    // The server: a plain container on the same bridge (not selected, so
    // redirect-cni passes it through).
    let id = unique("");
    let srv = format!("rdt-srv-{id}");
    pm.ok(&[
        "run",
        "-d",
        "--name",
        &srv,
        "--network",
        &pm.net,
        "--user",
        "1000:1000",
        "-v",
        &pm.kit_mount(),
        IMAGE,
        KIT_IN_CTR,
        "echo",
        "--listen",
        "0.0.0.0:8080",
    ]);
    let srv_ip = pm.ip_of(&srv);
    assert!(srv_ip.starts_with("10.203."), "server ip {srv_ip:?}");
    eventually("the server to listen", || {
        pm.logs(&srv).iter().any(|l| l.contains("ready"))
    });
    assert!(
        daemon.list().is_empty(),
        "the server container was not captured"
    );

    // The pod: the sidecar and the app, whose first two connections go to
    // the server.
    let pod = format!("rdt-pod-{id}");
    let app = pm.create_mesh_pod(&pod, &format!("{srv_ip}:8080"), &format!("{srv_ip}:8080"));
    let start = pm
        .command(&["pod", "start", &pod])
        .env("CNI_ARGS", "K8S_POD_NAMESPACE=shop;REDIRECT_CAPTURE=true")
        .output()
        .unwrap();
    assert!(
        start.status.success(),
        "{}",
        fail(&format!("pod start: {}", text(&start)), &daemon)
    );
    let infra = pm.ok(&["pod", "inspect", "-f", "{{.InfraContainerID}}", &pod]);
    let netns = pm.ok(&["inspect", "-f", "{{.NetworkSettings.SandboxKey}}", &infra]);
    let pod_ip = pm.ip_of(&infra);

    let pods = daemon.list();
    assert_eq!(pods.len(), 1, "{pods:?}");
    assert_eq!(pods[0]["pod"], format!("shop/{pod}"));
    assert_eq!(pods[0]["container_id"], infra);
    assert_eq!(pods[0]["netns"], netns);

    let exit = pm.ok(&["wait", &app]);
    let app_log = pm.logs(&app);
    assert_eq!(
        exit,
        "0",
        "{}",
        fail(&format!("app exit {exit}: {app_log:?}"), &daemon)
    );
    let reports: Vec<Value> = app_log
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert_eq!(reports.len(), 2, "{app_log:?}");
    for r in &reports {
        assert_eq!(r["ok"], true, "{r}");
        assert_eq!(
            r["peer"],
            format!("{srv_ip}:8080"),
            "the app sees its original peer: {r}"
        );
        assert!(
            r["banner"]
                .as_str()
                .unwrap()
                .starts_with(&format!("peer={pod_ip}:")),
            "the server saw the pod: {r}"
        );
    }
    // Both went through the sidecar, the first one included, and the
    // counters account for every connection the app made.
    let proxied: Vec<Value> = pm
        .logs(&format!("{pod}-proxy"))
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l["event"] == "conn")
        .collect();
    assert_eq!(proxied.len(), 2, "{proxied:?}");
    for p in &proxied {
        assert_eq!(
            (p["dir"].as_str(), p["orig"].as_str()),
            (Some("outbound"), Some(format!("{srv_ip}:8080").as_str())),
            "{p}"
        );
    }
    let st = stats(&pins.0, &netns);
    let count = |rule: &str| {
        redirect_tests::stats_rule(&st[0], "OUTPUT", rule)["count"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(count("captured"), 2, "{st}");
    assert_eq!(
        count("skip_proxy_uid"),
        2,
        "the sidecar's own connections go direct: {st}"
    );
    assert_eq!(count("skip_not_included"), 0);

    // Removing the pod releases it (CNI DEL).
    pm.ok(&["pod", "rm", "-f", "-t", "0", &pod]);
    assert!(
        daemon.list().is_empty(),
        "{}",
        fail("pod removal did not release", &daemon)
    );
    assert!(
        redirect_userspace::pins::read_dir(&pins.0.join("netns")).is_empty(),
        "no per-pod link left"
    );

    // With the agent stopped, a selected pod does not start.
    assert!(daemon.stop().success());
    pm.pod_never_starts(
        &format!("rdt-pod2-{id}"),
        &format!("{srv_ip}:8080"),
        "REDIRECT_CAPTURE=true",
        "redirect agent unreachable",
    );
    // An unselected pod still starts with the agent down.
    let pod3 = format!("rdt-pod3-{id}");
    pm.create_pod(&pod3);
    pm.ok(&["pod", "start", &pod3]);
    pm.ok(&["pod", "rm", "-f", "-t", "0", &pod3]);

    // The agent back with --cni-cleanup, then stopped: the conflist is as
    // the test wrote it.
    let mut cleanup_args = daemon_args.to_vec();
    cleanup_args.push("--cni-cleanup");
    let d = Daemon::start(
        &pins.0,
        &pm.cgroup2_parent(),
        &socket,
        &tmp.join("daemon.log"),
        &cleanup_args,
    );
    assert_eq!(d.ready["reconciled"]["kept"], serde_json::json!([]));
    assert!(d.stop().success());
    assert_eq!(std::fs::read_to_string(pm.conflist()).unwrap(), original);
}

/// RECORDED-CONTRACT (the Kubernetes API is `kube_support::ApiFixture`,
/// serving the recorded Istio-injected pod renamed to the podman pod: no
/// kube-apiserver runs here) with the real runtime: the agent watches the
/// fixture, its conflist entry says `"kubernetes": true`, and podman's
/// pod is captured from its annotations (`excludeOutboundPorts: "8081"`
/// really excluded from its very first connections); the server container
/// is a pod without a sidecar and passes through; a pod the API does not
/// know does not start.
#[test]
fn podman_pod_is_captured_from_its_annotations() {
    let pins = Pins(PathBuf::from(format!(
        "/sys/fs/bpf/{}",
        unique("rdt-podman-")
    )));
    let pm = Podman::new();
    pm.write_conflist();
    pm.import_image();
    let id = unique("");
    let srv = format!("rdt-ksrv-{id}");
    let pod = format!("rdt-kpod-{id}");
    // The API's view: the recorded injected pod as this podman pod, and
    // the recorded sidecar-less pod as the server container.
    let mut cart = kube_support::listed_pod("cart-");
    cart["metadata"]["name"] = pod.clone().into();
    let mut plain = kube_support::listed_pod("coredns-");
    plain["metadata"]["name"] = srv.clone().into();
    plain["metadata"]["namespace"] = "default".into();
    let api = kube_support::ApiFixture::start_with(vec![cart, plain]);
    let url = api.url();
    let tmp = TempDir::new("podman-kube");
    let socket = tmp.join("agent.sock");
    let conf_dir = pm.dir.join("net.d").to_str().unwrap().to_string();
    let bin_dir = pm.dir.join("cni-bin").to_str().unwrap().to_string();
    let conflist = pm
        .conflist()
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    let args = [
        "--cni-conf-dir",
        &conf_dir,
        "--cni-bin-dir",
        &bin_dir,
        "--cni-conflist",
        &conflist,
        "--api-server",
        &url,
        "--node-name",
        "node-a",
    ];
    let daemon = Daemon::start(
        &pins.0,
        &pm.cgroup2_parent(),
        &socket,
        &tmp.join("daemon.log"),
        &args,
    );
    let fail = |what: &str| -> String {
        format!(
            "{what}\ndaemon log:\n{}\nAPI requests: {:?}",
            daemon.log_text(),
            api.requests()
        )
    };
    let conf: Value =
        serde_json::from_str(&std::fs::read_to_string(pm.conflist()).unwrap()).unwrap();
    assert_eq!(conf["plugins"][1]["kubernetes"], true, "{conf}");

    pm.ok(&[
        "run",
        "-d",
        "--name",
        &srv,
        "--network",
        &pm.net,
        "--user",
        "1000:1000",
        "-v",
        &pm.kit_mount(),
        IMAGE,
        KIT_IN_CTR,
        "echo",
        "--listen",
        "0.0.0.0:8080",
        "--listen",
        "0.0.0.0:8081",
    ]);
    let srv_ip = pm.ip_of(&srv);
    eventually("the server to listen", || {
        pm.logs(&srv).iter().any(|l| l.contains("ready"))
    });
    assert!(
        daemon.list().is_empty(),
        "{}",
        fail("the server (no sidecar) was captured")
    );
    assert!(
        daemon
            .log_text()
            .contains("pod passes through: not in the mesh"),
        "{}",
        fail("no pass-through")
    );

    let app = pm.create_mesh_pod(&pod, &format!("{srv_ip}:8080"), &format!("{srv_ip}:8081"));
    let start = pm
        .command(&["pod", "start", &pod])
        .env("CNI_ARGS", "K8S_POD_NAMESPACE=shop")
        .output()
        .unwrap();
    assert!(
        start.status.success(),
        "{}",
        fail(&format!("pod start: {}", text(&start)))
    );
    let infra = pm.ok(&["pod", "inspect", "-f", "{{.InfraContainerID}}", &pod]);
    let netns = pm.ok(&["inspect", "-f", "{{.NetworkSettings.SandboxKey}}", &infra]);
    let pods = daemon.list();
    assert_eq!(pods.len(), 1, "{pods:?}");
    assert_eq!(pods[0]["pod"], format!("shop/{pod}"));
    assert!(
        pods[0]["istio_iptables_args"]
            .as_str()
            .unwrap()
            .contains("-o '8081'"),
        "{pods:?}"
    );

    let exit = pm.ok(&["wait", &app]);
    let app_log = pm.logs(&app);
    assert_eq!(
        exit,
        "0",
        "{}",
        fail(&format!("app exit {exit}: {app_log:?}"))
    );
    let reports: Vec<Value> = app_log
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert_eq!(reports.len(), 2, "{app_log:?}");
    assert!(reports.iter().all(|r| r["ok"] == true), "{reports:?}");
    // Only the 8080 connection went through the sidecar.
    let proxied: Vec<Value> = pm
        .logs(&format!("{pod}-proxy"))
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l["event"] == "conn")
        .collect();
    assert_eq!(proxied.len(), 1, "{proxied:?}");
    assert_eq!(proxied[0]["orig"], format!("{srv_ip}:8080"), "{proxied:?}");
    let st = stats(&pins.0, &netns);
    let count = |rule: &str| {
        redirect_tests::stats_rule(&st[0], "OUTPUT", rule)["count"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(
        (count("captured"), count("skip_excluded_port")),
        (1, 1),
        "{st}"
    );
    pm.ok(&["pod", "rm", "-f", "-t", "0", &pod]);
    assert!(
        daemon.list().is_empty(),
        "{}",
        fail("pod removal did not release")
    );

    // A pod the API does not know: its ADD fails closed, it never runs.
    pm.pod_never_starts(
        &format!("rdt-kghost-{id}"),
        &format!("{srv_ip}:8080"),
        "K8S_POD_NAMESPACE=shop",
        "cannot see the pod in the Kubernetes API",
    );
    pm.ok(&["rm", "-f", "-t", "0", &srv]);
    assert!(daemon.stop().success());
}
