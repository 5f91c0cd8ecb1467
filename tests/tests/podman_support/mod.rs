//! podman confined to a temp dir for the real-runtime tests (podman.rs,
//! image.rs): runc, cgroupfs, the CNI backend with the test's own network
//! (a bridge without an address on an isolated subnet), a local image
//! imported from busybox-static (no registry), and the daemon's pins.
//!
//! Everything podman makes lives under the temp dir (--root, --runroot,
//! --tmpdir, containers.conf via CONTAINERS_CONF, network config dir, CNI
//! bin dir); the bridge, host-local's state, the cgroups, containers and
//! images are removed on drop, even on failure.
#![allow(dead_code)]

use std::{
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use redirect_testbed::sandbox::{sibling_binary, unique};
use redirect_tests::redirect_bin;
use serde_json::Value;

pub const IMAGE: &str = "localhost/redirect-test:1";
pub const KIT_IN_CTR: &str = "/usr/local/bin/redirect-kit";

pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// podman confined to a temp dir, its network, bridge and cgroup parent;
/// all of it removed on drop.
pub struct Podman {
    pub dir: PathBuf,
    pub net: String,
    pub bridge: String,
    pub subnet: String,
    pub cgroup_parent: String,
}

impl Podman {
    pub fn new() -> Podman {
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

    pub fn cgroup2_parent(&self) -> PathBuf {
        redirect_userspace::sys::cgroup2_mount()
            .unwrap()
            .join(&self.cgroup_parent)
    }

    pub fn conflist(&self) -> PathBuf {
        self.dir
            .join("net.d")
            .join(format!("{}.conflist", self.net))
    }

    pub fn write_conflist(&self) -> String {
        let text = format!(
            "{{\n  \"cniVersion\": \"1.0.0\",\n  \"name\": \"{}\",\n  \"plugins\": [\n    {{\n      \"type\": \"bridge\",\n      \"bridge\": \"{}\",\n      \"isGateway\": false,\n      \"ipMasq\": false,\n      \"ipam\": {{ \"type\": \"host-local\", \"ranges\": [[{{ \"subnet\": \"{}\" }}]] }}\n    }}\n  ]\n}}\n",
            self.net, self.bridge, self.subnet
        );
        std::fs::write(self.conflist(), &text).unwrap();
        text
    }

    pub fn command(&self, args: &[&str]) -> Command {
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

    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("running podman")
    }

    /// Must succeed; stdout trimmed.
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(o.status.success(), "podman {args:?}: {}", text(&o));
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    }

    /// The image: busybox-static, the kit's shared libraries (the kit
    /// itself is bind-mounted), and /pause for the infra container.
    pub fn import_image(&self) {
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

    pub fn kit_mount(&self) -> String {
        format!(
            "{}:{KIT_IN_CTR}:ro",
            sibling_binary("redirect-kit").display()
        )
    }

    /// Start `redirect-kit <tool>` as a plain container (uid 1000) on this
    /// instance's network: a server the pods connect to.
    pub fn run_kit_container(&self, name: &str, tool: &[&str]) {
        let kit = self.kit_mount();
        let mut args = vec![
            "run",
            "-d",
            "--name",
            name,
            "--network",
            &self.net,
            "--user",
            "1000:1000",
            "-v",
            &kit,
            IMAGE,
            KIT_IN_CTR,
        ];
        args.extend_from_slice(tool);
        self.ok(&args);
    }

    /// `podman logs` of a container, as lines.
    pub fn logs(&self, ctr: &str) -> Vec<String> {
        let o = self.run(&["logs", ctr]);
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// The JSON lines of a container's log (kit reports and events).
    pub fn json_logs(&self, ctr: &str) -> Vec<Value> {
        self.logs(ctr)
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The `conn` events a kit proxy container logged.
    pub fn proxied(&self, proxy: &str) -> Vec<Value> {
        self.json_logs(proxy)
            .into_iter()
            .filter(|l| l["event"] == "conn")
            .collect()
    }

    /// `pod start` with `cni_args` in CNI_ARGS: the infra container id and
    /// the pod's netns path; Err with podman's output when it fails.
    pub fn start_pod(&self, pod: &str, cni_args: &str) -> Result<(String, String), String> {
        let start = self
            .command(&["pod", "start", pod])
            .env("CNI_ARGS", cni_args)
            .output()
            .unwrap();
        if !start.status.success() {
            return Err(format!("pod start: {}", text(&start)));
        }
        let infra = self.ok(&["pod", "inspect", "-f", "{{.InfraContainerID}}", pod]);
        let netns = self.ok(&["inspect", "-f", "{{.NetworkSettings.SandboxKey}}", &infra]);
        Ok((infra, netns))
    }

    pub fn state(&self, ctr: &str) -> String {
        self.ok(&["inspect", "-f", "{{.State.Status}}", ctr])
    }

    /// The IPv4 address of a container (or pod infra container) on this
    /// instance's network.
    pub fn ip_of(&self, ctr: &str) -> String {
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
    pub fn create_pod(&self, pod: &str) {
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
    pub fn pod_never_starts(&self, pod: &str, dst: &str, cni_args: &str, why: &str) {
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
    pub fn create_mesh_pod(&self, pod: &str, first: &str, second: &str) -> String {
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

pub fn remove_cgroup_tree(dir: &Path) {
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
pub struct Pins(pub PathBuf);

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

pub fn stats(pins: &Path, netns: &str) -> Value {
    let o = Command::new(redirect_bin())
        .arg("--pin-dir")
        .arg(pins)
        .args(["stats", "--netns", netns, "--json"])
        .output()
        .unwrap();
    assert!(o.status.success(), "stats: {}", text(&o));
    serde_json::from_slice(&o.stdout).unwrap()
}
