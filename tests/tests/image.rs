//! The node agent's image, run by podman exactly as deploy/daemonset.yaml
//! runs it on a node: command, args, privileges, host network and PID
//! namespaces, environment (the ConfigMap and env) and host mounts are
//! read from the manifests (image_support maps each field, and fails on a
//! field it does not know), then:
//!
//! * the image is built from deploy/Dockerfile and the static binaries
//!   `cargo xtask image` / `cargo xtask test` put in target/image/context
//!   ($REDIRECT_IMAGE_CONTEXT), twice: two tags with different version
//!   labels, the second standing for the next release;
//! * the agent in the container (not privileged: the DaemonSet's
//!   capabilities only) installs its CNI entry and the static redirect-cni
//!   on the host's dirs, a podman pod on that CNI network is captured from
//!   its first connection, a pod captured late gets its proxy's listener,
//!   the acceleration probe runs, /readyz, /healthz and /metrics answer on
//!   the host;
//! * stopping the container leaves capture in place, and the second tag
//!   started over the same pins takes over while connections flow, none
//!   failing (the traffic checker of reliability.rs);
//! * without any one of the DaemonSet's capabilities something fails;
//! * a container that exits at start is reported, naming the step, with
//!   its log, and removed; the mapping refuses fields it does not know.
//!
//! What a node without a cluster needs, and a test run next to others:
//!
//! Host directories substituted (the test never touches the node's own):
//!
//! | DaemonSet hostPath | on this host                                 | in the container |
//! |--------------------|----------------------------------------------|------------------|
//! | /etc/cni/net.d     | the test podman's network config dir         | /etc/cni/net.d (as the manifest) |
//! | /opt/cni/bin       | a CNI bin dir on the test podman's plugin path | /opt/cni/bin (as the manifest) |
//! | /run/redirect      | a temp dir                                   | the same temp dir path (the manifest mounts it at its host path: the plugin on the host dials the socket path the agent serves) |
//!
//! The others (bpffs, the cgroup tree, the netns dirs, /proc) are the real
//! host paths: the agent writes only its own pin dir and attaches to the
//! test's cgroup.
//!
//! Environment overrides (on top of the ConfigMap and env):
//!
//! | variable              | value                                    | why |
//! |-----------------------|------------------------------------------|-----|
//! | REDIRECT_PIN_DIR      | /sys/fs/bpf/rdt-image-<id>               | its own install, not the node's |
//! | REDIRECT_CGROUP       | the test's child cgroup, through the cgroup mount | never the cgroup2 root |
//! | REDIRECT_METRICS_ADDR | 127.0.0.1:0                              | parallel runs; the port is read from the ready line, the paths from the probes |
//! | REDIRECT_SOCKET       | <socket dir>/agent.sock                  | the substituted socket dir |
//! | REDIRECT_CNI_CONFLIST | the test network's conflist              | the node's network |
//! | REDIRECT_NODE_NAME    | image-test-node (downward API spec.nodeName) | no API server to ask |
//!
//! Without KUBERNETES_SERVICE_HOST (no cluster) the agent runs without
//! the pod watch: pods ask to be captured with CNI_ARGS
//! REDIRECT_CAPTURE=true, as podman.rs does.
//!
//! Everything is removed on drop: the agent containers, pods, images and
//! podman's private store (podman_support), the pins.

mod agent_support;
mod image_support;
mod podman_support;
mod traffic_support;

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    path::{Path, PathBuf},
    process::Command,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use agent_support::{call_raw, eventually, TempDir};
use image_support::*;
use podman_support::*;
use redirect_testbed::sandbox::unique;
use redirect_tests::{run_kit, Placement, APP_UID};
use serde_json::Value;
use traffic_support::*;

const DAEMONSET: &str = "redirect-agent";
const NODE_NAME: &str = "image-test-node";
/// Under this, as the issue asks of the image.
const IMAGE_SIZE_LIMIT: u64 = 30 * 1024 * 1024;

/// The build context `cargo xtask image` prepares: the two static binaries.
fn context() -> PathBuf {
    let dir = std::env::var_os("REDIRECT_IMAGE_CONTEXT")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target/image/context"));
    for bin in ["redirect", "redirect-cni"] {
        assert!(
            dir.join(bin).is_file(),
            "{} missing: run `cargo xtask image` (or `cargo xtask test`) first; it builds the static binaries into {}",
            dir.join(bin).display(),
            dir.display()
        );
    }
    dir
}

/// `podman build` of deploy/Dockerfile in the test's store; the image id.
fn build_image(pm: &Podman, tag: &str, version: &str) -> String {
    let dockerfile = root().join("deploy/Dockerfile");
    let ctx = context();
    let o = pm.run(&[
        "build",
        "--pull=never",
        // A cached LABEL step would keep the other build's version label.
        "--no-cache",
        "--file",
        dockerfile.to_str().unwrap(),
        "--build-arg",
        &format!("VERSION={version}"),
        "--build-arg",
        "REVISION=image-test",
        "--tag",
        tag,
        ctx.to_str().unwrap(),
    ]);
    assert!(
        o.status.success(),
        "step: image build (podman build -f deploy/Dockerfile {}) failed:\n{}",
        ctx.display(),
        text(&o)
    );
    pm.ok(&["image", "inspect", "--format", "{{.Id}}", tag])
}

/// The test's pin dir, its podman (network with its conflist, the pods'
/// busybox image) and a temp dir; bound in this order, they are dropped
/// the other way round: containers and pods before the pins.
fn fixture(tag: &str) -> (Pins, Podman, TempDir) {
    let pins = Pins(PathBuf::from(format!(
        "/sys/fs/bpf/{}",
        unique("rdt-image-")
    )));
    let pm = Podman::new();
    pm.write_conflist();
    pm.import_image();
    (pins, pm, TempDir::new(tag))
}

/// The test's own directories in place of the node's, and its overrides.
struct Node {
    run: NodeRun,
    overrides: BTreeMap<String, String>,
    socket: PathBuf,
    extra: Vec<String>,
}

impl Node {
    fn new(pm: &Podman, tmp: &TempDir, pins: &Path) -> Node {
        Node::with_documents(pm, tmp, pins, &deploy_documents())
    }

    /// As `new`, from (edited) manifests.
    fn with_documents(pm: &Podman, tmp: &TempDir, pins: &Path, docs: &[Value]) -> Node {
        let socket_dir = tmp.join("run-redirect");
        std::fs::create_dir_all(&socket_dir).unwrap();
        let subs = [
            Substitution {
                host: "/etc/cni/net.d".into(),
                test_dir: pm.dir.join("net.d"),
                same_path: false,
            },
            Substitution {
                host: "/opt/cni/bin".into(),
                test_dir: pm.dir.join("cni-bin"),
                same_path: false,
            },
            Substitution {
                host: "/run/redirect".into(),
                test_dir: socket_dir.clone(),
                same_path: true,
            },
        ];
        let run = node_run(docs, DAEMONSET, &subs, NODE_NAME).unwrap_or_else(|e| panic!("{e}"));
        for m in &run.mounts {
            if m.must_exist {
                assert!(
                    m.host.is_dir(),
                    "hostPath {} (type Directory) does not exist here",
                    m.host.display()
                );
            } else {
                std::fs::create_dir_all(&m.host).unwrap();
            }
        }
        let socket = socket_dir.join("agent.sock");
        let through = |what: &str, host: &Path| -> String {
            run.in_container(host)
                .unwrap_or_else(|| {
                    panic!(
                        "{what} {} is under no mount of the DaemonSet",
                        host.display()
                    )
                })
                .display()
                .to_string()
        };
        let mut overrides = BTreeMap::new();
        overrides.insert("REDIRECT_PIN_DIR".into(), through("the pin dir", pins));
        overrides.insert(
            "REDIRECT_CGROUP".into(),
            through("the test's cgroup", &pm.cgroup2_parent()),
        );
        overrides.insert("REDIRECT_METRICS_ADDR".into(), "127.0.0.1:0".into());
        overrides.insert("REDIRECT_SOCKET".into(), through("the socket", &socket));
        overrides.insert(
            "REDIRECT_CNI_CONFLIST".into(),
            pm.conflist().file_name().unwrap().to_str().unwrap().into(),
        );
        for k in overrides.keys() {
            assert!(
                run.env.contains_key(k),
                "override {k} replaces nothing: the DaemonSet no longer sets it"
            );
        }
        // The socket is the same path on the host and in the container.
        assert_eq!(overrides["REDIRECT_SOCKET"], socket.display().to_string());
        Node {
            run,
            overrides,
            socket,
            extra: vec!["--cgroup-parent".into(), format!("/{}", pm.cgroup_parent)],
        }
    }
}

/// A container of the agent image, removed (by name) on drop.
struct AgentContainer<'a> {
    pm: &'a Podman,
    name: String,
    ready: Value,
}

impl<'a> AgentContainer<'a> {
    /// `podman run -d` as the DaemonSet says, then wait for the agent's
    /// ready line; Err names the step and carries the container's log.
    fn start(pm: &'a Podman, node: &Node, image: &str) -> Result<AgentContainer<'a>, String> {
        let name = unique("rdt-agent-");
        let args = node
            .run
            .run_args(&name, image, &node.overrides, &node.extra);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut c = AgentContainer {
            pm,
            name,
            ready: Value::Null,
        };
        let o = pm.run(&refs);
        if !o.status.success() {
            return Err(format!(
                "step: agent container start (podman {}) failed:\n{}",
                args.join(" "),
                text(&o)
            ));
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(ready) =
                c.pm.logs(&c.name)
                    .iter()
                    .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                    .find(|v| v["event"] == "ready")
            {
                c.ready = ready;
                return Ok(c);
            }
            let state = c.pm.ok(&["inspect", "-f", "{{.State.Status}}", &c.name]);
            if state == "exited" || state == "stopped" {
                let code = c.pm.ok(&["inspect", "-f", "{{.State.ExitCode}}", &c.name]);
                return Err(format!(
                    "step: agent container start: the container exited at start (exit code {code}); its log:\n{}",
                    c.log_text()
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "step: agent container start: no ready line within 60 s (state {state}); where its threads wait:\n{}its log:\n{}",
                    c.threads(),
                    c.log_text()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The agent's threads (host PIDs) with their names, kernel wait
    /// channels and kernel stacks: why a start hangs.
    fn threads(&self) -> String {
        let pid = self.pm.ok(&["inspect", "-f", "{{.State.Pid}}", &self.name]);
        let mut out = String::new();
        for t in std::fs::read_dir(format!("/proc/{pid}/task"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let p = t.path();
            let read = |f: &str| std::fs::read_to_string(p.join(f)).unwrap_or_default();
            out += &format!(
                "  tid {} {} wchan={}\n{}",
                t.file_name().to_string_lossy(),
                read("comm").trim(),
                read("wchan"),
                read("stack")
            );
        }
        out
    }

    fn log_text(&self) -> String {
        text(&self.pm.run(&["logs", &self.name]))
    }

    fn metrics_port(&self) -> u16 {
        let addr: std::net::SocketAddr = self.ready["metrics_addr"]
            .as_str()
            .unwrap_or_else(|| panic!("ready line without metrics_addr: {}", self.ready))
            .parse()
            .unwrap();
        assert!(addr.ip().is_loopback(), "{addr}");
        addr.port()
    }

    /// `podman stop` (SIGTERM, the DaemonSet's grace period): exit code.
    fn stop(&self) -> i64 {
        self.pm.ok(&["stop", &self.name]);
        self.pm
            .ok(&["inspect", "-f", "{{.State.ExitCode}}", &self.name])
            .parse()
            .unwrap()
    }
}

impl Drop for AgentContainer<'_> {
    fn drop(&mut self) {
        let _ = self.pm.run(&["rm", "-f", "-t", "0", &self.name]);
    }
}

/// GET `path` on 127.0.0.1:`port` (the node's loopback): status line and body.
fn http_get(port: u16, path: &str) -> (String, String) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))
        .unwrap_or_else(|e| panic!("connecting to 127.0.0.1:{port}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    (
        head.lines().next().unwrap_or("").to_string(),
        body.to_string(),
    )
}

fn list(socket: &Path) -> Vec<Value> {
    let r = call_raw(socket, r#"{"op":"list"}"#);
    assert_eq!(r["ok"], true, "{r}");
    r["pods"].as_array().unwrap().clone()
}

fn captured(pins: &Path, netns: &str) -> u64 {
    let st = stats(pins, netns);
    redirect_tests::stats_rule(&st[0], "OUTPUT", "captured")["count"]
        .as_u64()
        .unwrap()
}

/// A pod started uncaptured, its sidecar proxy already listening, then
/// captured by running the installed redirect-cni's ADD by hand, as a late
/// capture does (a pod whose annotations changed, or a repaired one): the
/// agent has to take the proxy's listening socket from its process
/// (/proc/<pid>/fd and pidfd_getfd: CAP_SYS_PTRACE, hostPID). Returns the
/// agent's list entry of the pod, then removes the pod (CNI DEL).
fn late_capture(pm: &Podman, socket: &Path, name: &str) -> Value {
    pm.create_pod(name);
    let proxy = format!("{name}-proxy");
    pm.ok(&[
        "create",
        "--pod",
        name,
        "--name",
        &proxy,
        "--user",
        "1337:1337",
        "-v",
        &pm.kit_mount(),
        IMAGE,
        KIT_IN_CTR,
        "proxy",
    ]);
    // Not selected: redirect-cni passes it through.
    pm.ok(&["pod", "start", name]);
    eventually("the late pod's proxy to listen on 15006", || {
        pm.run(&[
            "exec",
            &proxy,
            "grep",
            "-q",
            ":3A9E 00000000:0000 0A",
            "/proc/net/tcp",
        ])
        .status
        .success()
    });
    let infra = pm.ok(&["pod", "inspect", "-f", "{{.InfraContainerID}}", name]);
    let netns = pm.ok(&["inspect", "-f", "{{.NetworkSettings.SandboxKey}}", &infra]);
    let ip = pm.ip_of(&infra);
    let conflist: Value =
        serde_json::from_str(&std::fs::read_to_string(pm.conflist()).unwrap()).unwrap();
    let mut conf = conflist["plugins"][1].clone();
    conf["cniVersion"] = conflist["cniVersion"].clone();
    conf["name"] = conflist["name"].clone();
    conf["prevResult"] = serde_json::json!({
        "cniVersion": conflist["cniVersion"],
        "interfaces": [{"name": "eth0", "sandbox": netns}],
        "ips": [{"address": format!("{ip}/24"), "interface": 0}],
    });
    let mut add = Command::new(pm.dir.join("cni-bin/redirect-cni"))
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", &infra)
        .env("CNI_NETNS", &netns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", pm.dir.join("cni-bin"))
        .env(
            "CNI_ARGS",
            format!("K8S_POD_NAMESPACE=shop;K8S_POD_NAME={name};REDIRECT_CAPTURE=true"),
        )
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    add.stdin
        .take()
        .unwrap()
        .write_all(conf.to_string().as_bytes())
        .unwrap();
    let out = add.wait_with_output().unwrap();
    assert!(out.status.success(), "late ADD: {}", text(&out));
    let entry = list(socket)
        .into_iter()
        .find(|p| p["netns"] == netns.as_str())
        .unwrap_or_else(|| panic!("the late pod is not in the agent's list"));
    // podman's DEL goes to the agent too.
    pm.ok(&["pod", "rm", "-f", "-t", "0", name]);
    assert!(
        !list(socket).iter().any(|p| p["netns"] == netns.as_str()),
        "the late pod was not released"
    );
    entry
}

/// Sets the flag on drop (a failed assertion included).
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// A long paced transfer (about 10 s): open across a whole agent restart.
fn long_xfer_args(dst: &str) -> Vec<String> {
    let mut a = xfer_args(dst);
    let at = a.iter().position(|x| x == "--pause-us").unwrap();
    a[at + 1] = "40000".into();
    a
}

#[test]
fn daemonset_image_captures_pods_and_upgrades_in_place() {
    let ctx = context();
    let (pins, pm, tmp) = fixture("image");
    let node = Node::new(&pm, &tmp, &pins.0);

    // Two builds of deploy/Dockerfile: different version labels, so
    // different images, from the same static binaries.
    let t0 = Instant::now();
    let (tag1, tag2) = (
        "localhost/redirect:image-test-1",
        "localhost/redirect:image-test-2",
    );
    let id1 = build_image(&pm, tag1, "image-test-1");
    let id2 = build_image(&pm, tag2, "image-test-2");
    let build_time = t0.elapsed();
    assert_ne!(id1, id2);
    let size: u64 = pm
        .ok(&["image", "inspect", "--format", "{{.Size}}", tag1])
        .parse()
        .unwrap();
    assert!(
        size < IMAGE_SIZE_LIMIT,
        "the image is {size} bytes, over {IMAGE_SIZE_LIMIT}"
    );
    assert_eq!(
        pm.ok(&[
            "image",
            "inspect",
            "--format",
            "{{index .Labels \"org.opencontainers.image.version\"}}",
            tag2
        ]),
        "image-test-2"
    );
    // Nothing but the two binaries, and the DaemonSet's command is one.
    let entry = pm.ok(&[
        "image",
        "inspect",
        "--format",
        "{{json .Config.Entrypoint}}",
        tag1,
    ]);
    assert_eq!(
        serde_json::from_str::<Vec<String>>(&entry).unwrap(),
        node.run.entrypoint,
        "the DaemonSet's command is the image's entrypoint"
    );

    // The agent, as the DaemonSet runs it.
    let v1 = AgentContainer::start(&pm, &node, tag1).unwrap_or_else(|e| panic!("{e}"));
    let fail = |what: &str, a: &AgentContainer| format!("{what}\nagent log:\n{}", a.log_text());
    assert_eq!(
        v1.ready["pin_dir"], node.overrides["REDIRECT_PIN_DIR"],
        "{}",
        v1.ready
    );
    assert_eq!(v1.ready["cgroup_newly_attached"], true, "{}", v1.ready);
    assert!(v1.ready["kubernetes"].is_null(), "no cluster: {}", v1.ready);
    assert!(
        v1.ready["accel_probe"].is_string(),
        "the acceleration probe ran to its end in the container: {}",
        fail("", &v1)
    );

    // Its CNI entry and plugin, on the (test's) host dirs.
    let conf: Value =
        serde_json::from_str(&std::fs::read_to_string(pm.conflist()).unwrap()).unwrap();
    assert_eq!(conf["plugins"][1]["type"], "redirect-cni", "{conf}");
    assert_eq!(
        conf["plugins"][1]["socket"],
        node.socket.display().to_string(),
        "the plugin dials the socket's host path: {conf}"
    );
    let plugin = pm.dir.join("cni-bin/redirect-cni");
    assert_eq!(
        std::fs::read(&plugin).unwrap(),
        std::fs::read(ctx.join("redirect-cni")).unwrap(),
        "the agent installed the image's redirect-cni"
    );
    let file = Command::new("file").arg("-b").arg(&plugin).output();
    let file = file.map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
    let file = file.unwrap_or_else(|e| panic!("`file` (apt-get install file): {e}"));
    assert!(
        file.contains("static") && !file.contains("interpreter"),
        "the installed plugin is not static: {file}"
    );

    // Probes and metrics on the node's loopback.
    let port = v1.metrics_port();
    assert!(!node.run.probes.is_empty());
    for p in &node.run.probes {
        assert_eq!(p.host, "127.0.0.1", "{p:?}");
        let (status, body) = http_get(port, &p.path);
        assert!(
            status.contains(" 200 "),
            "{} {}: {status} {body}",
            p.kind,
            p.path
        );
    }
    let (status, metrics) = http_get(port, "/metrics");
    assert!(status.contains(" 200 "), "{status}");
    assert!(metrics.contains("redirect_"), "{metrics}");

    // Servers on the pod network: a greeting echo (it reports the peer it
    // saw) and a plain echo for the traffic loops.
    let id = unique("");
    let srv = format!("rdt-isrv-{id}");
    pm.run_kit_container(&srv, &["echo", "--listen", "0.0.0.0:8080"]);
    let echo = format!("rdt-iecho-{id}");
    pm.run_kit_container(&echo, &["epoll-echo", "--listen", "0.0.0.0:9001"]);
    let srv_ip = pm.ip_of(&srv);
    let echo_ip = pm.ip_of(&echo);
    eventually("the servers to listen", || {
        pm.logs(&srv).iter().any(|l| l.contains("ready"))
            && pm
                .run(&[
                    "exec",
                    &echo,
                    "grep",
                    "-q",
                    ":2329 00000000:0000 0A",
                    "/proc/net/tcp",
                ])
                .status
                .success()
    });

    // A mesh pod, captured from its first connection.
    let pod = format!("rdt-ipod-{id}");
    let greet = format!("{srv_ip}:8080");
    let app = pm.create_mesh_pod(&pod, &greet, &greet);
    let (_, netns) = pm
        .start_pod(&pod, "K8S_POD_NAMESPACE=shop;REDIRECT_CAPTURE=true")
        .unwrap_or_else(|e| panic!("{}", fail(&e, &v1)));
    let pods = list(&node.socket);
    assert_eq!(pods.len(), 1, "{pods:?}");
    assert_eq!(pods[0]["pod"], format!("shop/{pod}"));
    assert_eq!(pods[0]["netns"], netns);
    let cookie = pods[0]["cookie"].as_u64().unwrap();
    let exit = pm.ok(&["wait", &app]);
    let app_log = pm.logs(&app);
    assert_eq!(exit, "0", "{}", fail(&format!("app: {app_log:?}"), &v1));
    let reports = pm.json_logs(&app);
    assert_eq!(reports.len(), 2, "{app_log:?}");
    for r in &reports {
        assert_eq!(
            (r["ok"].as_bool(), r["peer"].as_str()),
            (Some(true), Some(greet.as_str())),
            "{r}"
        );
    }
    let proxy = format!("{pod}-proxy");
    let conns = pm.proxied(&proxy);
    assert_eq!(
        conns.len(),
        2,
        "both through the sidecar, the first one too: {conns:?}"
    );
    assert!(
        conns
            .iter()
            .all(|c| c["dir"] == "outbound" && c["orig"] == greet.as_str()),
        "the proxy got the original destination (SO_ORIGINAL_DST): {conns:?}"
    );
    assert_eq!(captured(&pins.0, &netns), 2);

    // A pod captured late: its proxy's listener is found.
    let late = late_capture(&pm, &node.socket, &format!("rdt-ilate-{id}"));
    assert_ne!(
        late["inbound_listeners"],
        serde_json::json!([]),
        "{}",
        fail(
            &format!("the late pod's listener was not found: {late}"),
            &v1
        )
    );

    // Traffic from the pod's app (placed in the pod's netns, in a cgroup
    // under the one the agent attached to) for the rest of the test.
    let clients = pm.cgroup2_parent().join("clients");
    std::fs::create_dir_all(&clients).unwrap();
    let app_at = Placement {
        netns: Some(PathBuf::from(&netns)),
        cgroup: Some(clients),
        uid: Some(APP_UID),
        gid: Some(APP_UID),
    };
    let up = format!("{echo_ip}:9001");
    let stop = Arc::new(AtomicBool::new(false));
    // The loops end with the test, passed or not.
    let _stop_loops = StopOnDrop(stop.clone());
    let loops = vec![
        (
            "outbound short",
            traffic_loop(
                app_at.clone(),
                churn_args(&up, 40, 4096),
                stop.clone(),
                churn_score,
            ),
        ),
        (
            "outbound long",
            traffic_loop(app_at.clone(), xfer_args(&up), stop.clone(), xfer_score),
        ),
    ];
    std::thread::sleep(Duration::from_millis(1000));

    // One connection open across the whole stop and upgrade.
    let long = {
        let (p, args) = (app_at.clone(), long_xfer_args(&up));
        std::thread::spawn(move || {
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            let t0 = Instant::now();
            let run = run_kit(&p, &refs, Duration::from_secs(60));
            (t0, Instant::now(), run)
        })
    };
    std::thread::sleep(Duration::from_millis(500));

    // Stop the agent (a DaemonSet pod deleted): capture stays.
    let t_stop = Instant::now();
    assert_eq!(v1.stop(), 0, "{}", fail("v1 exit status", &v1));
    assert!(
        v1.log_text().contains("captured pods stay captured"),
        "{}",
        fail("no shutdown line", &v1)
    );
    drop(v1);
    assert!(!node.socket.exists(), "the socket is gone with the agent");
    let r = redirect_tests::client_sized(&app_at, &greet, 64);
    assert!(r.ok && r.peer.as_deref() == Some(greet.as_str()), "{r:?}");
    assert_eq!(
        pm.proxied(&proxy)
            .iter()
            .filter(|c| c["orig"] == greet.as_str())
            .count(),
        3,
        "a new connection with no agent running still goes through the sidecar"
    );
    std::thread::sleep(Duration::from_millis(1000));

    // The next release's image over the same pins.
    let t_v2 = Instant::now();
    let v2 = AgentContainer::start(&pm, &node, tag2).unwrap_or_else(|e| panic!("{e}"));
    let v2_ready = t_v2.elapsed();
    assert_eq!(v2.ready["cgroup_newly_attached"], false, "{}", v2.ready);
    assert_eq!(
        v2.ready["reconciled"]["kept"],
        serde_json::json!([cookie]),
        "{}",
        v2.ready
    );
    let pods = list(&node.socket);
    assert_eq!(pods.len(), 1, "{pods:?}");
    assert_eq!(pods[0]["cookie"], cookie);
    let port2 = v2.metrics_port();
    let (status, body) = http_get(port2, "/readyz");
    assert!(status.contains(" 200 "), "{status} {body}");
    std::thread::sleep(Duration::from_millis(1500));

    let (long_t0, long_t1, long_run) = long.join().unwrap();
    assert!(
        long_t0 < t_stop && long_t1 > t_v2 + v2_ready,
        "the long connection did not span the upgrade ({:?} .. {:?})",
        long_t0.elapsed(),
        long_t1.elapsed()
    );
    let (ok, failed, _, err) = xfer_score(&long_run.report());
    assert_eq!((ok, failed), (1, 0), "the live connection broke: {err:?}");

    stop.store(true, Ordering::SeqCst);
    let mut total = Tally::default();
    for (name, h) in loops {
        let t = h.join().expect("traffic loop");
        assert!(t.conns > 0, "{name}: no traffic");
        total.add(&t);
    }
    println!(
        "image: built twice in {:.1} s, {size} bytes; v2 ready {} ms after start; {} connections ({} bytes verified) through the stop and upgrade, {} failed",
        build_time.as_secs_f64(),
        v2_ready.as_millis(),
        total.conns,
        total.bytes,
        total.failures
    );
    assert_eq!(total.failures, 0, "failed connections: {:?}", total.errors);
    // Every one of them captured: the app's 2, the check, the long one,
    // the loops'.
    assert_eq!(
        captured(&pins.0, &netns),
        2 + 1 + 1 + total.conns,
        "every connection was captured"
    );
    assert!(
        pm.proxied(&proxy)
            .iter()
            .all(|c| c["orig"] == greet.as_str() || c["orig"] == up.as_str()),
        "a connection went elsewhere"
    );

    // The new agent serves CNI: removing the pod releases it.
    pm.ok(&["pod", "rm", "-f", "-t", "0", &pod]);
    assert!(
        list(&node.socket).is_empty(),
        "{}",
        fail("pod removal did not release", &v2)
    );
    assert_eq!(v2.stop(), 0, "{}", fail("v2 exit status", &v2));
}

/// Least privilege: the DaemonSet is not privileged, drops every
/// capability and adds a few; the test above runs it with exactly those.
/// Here each added capability is taken away in turn, and something the
/// agent must do then fails: it refuses to start (naming the capability),
/// or the acceleration probe cannot run, or a pod captured late (its proxy
/// already listening) gets no inbound listener, with a warning.
#[test]
fn each_capability_of_the_daemonset_is_needed() {
    let docs = deploy_documents();
    let run = node_run(&docs, DAEMONSET, &[], NODE_NAME).unwrap();
    assert!(!run.privileged, "the DaemonSet runs the agent privileged");
    assert!(
        run.options.windows(2).any(|w| w == ["--cap-drop", "ALL"]),
        "the DaemonSet drops every capability first: {:?}",
        run.options
    );
    assert!(!run.cap_add.is_empty());
    let (pins, pm, tmp) = fixture("image-caps");
    let tag = "localhost/redirect:image-test-caps";
    build_image(&pm, tag, "image-test-caps");
    let mut outcomes = Vec::new();
    for (i, cap) in run.cap_add.iter().enumerate() {
        let mut less = docs.clone();
        let ds = less.iter_mut().find(|d| d["kind"] == "DaemonSet").unwrap();
        ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"]["add"]
            .as_array_mut()
            .unwrap()
            .retain(|c| c != cap.as_str());
        let node = Node::with_documents(&pm, &tmp, &pins.0, &less);
        assert!(!node.run.cap_add.contains(cap));
        let agent = match AgentContainer::start(&pm, &node, tag) {
            Err(e) => {
                assert!(
                    e.contains("effective capabilities lack") && e.contains(&format!("CAP_{cap}")),
                    "without {cap} the agent failed to start, but not naming it: {e}"
                );
                outcomes.push(format!("without {cap}: the agent refuses to start"));
                continue;
            }
            Ok(a) => a,
        };
        let mut failed = Vec::new();
        if !agent.ready["accel_probe"].is_string() {
            failed.push("the acceleration probe cannot run");
        }
        let late = late_capture(&pm, &node.socket, &format!("rdt-icap{i}-{}", unique("")));
        if late["inbound_listeners"] == serde_json::json!([]) {
            assert!(
                agent
                    .log_text()
                    .contains("its socket could not be taken from its process"),
                "no warning for the missing listener: {}",
                agent.log_text()
            );
            failed.push("a pod captured late gets no inbound listener (warned)");
        }
        assert!(
            !failed.is_empty(),
            "the agent did everything without {cap}: drop it from the DaemonSet"
        );
        outcomes.push(format!("without {cap}: {}", failed.join(", ")));
    }
    println!("least privilege:\n  {}", outcomes.join("\n  "));
}

/// A container that exits at start is reported with its step and log, and
/// is not left behind.
#[test]
fn an_agent_container_that_exits_at_start_is_reported() {
    context();
    let (pins, pm, tmp) = fixture("image-bad");
    let mut node = Node::new(&pm, &tmp, &pins.0);
    let tag = "localhost/redirect:image-test-bad";
    build_image(&pm, tag, "image-test-bad");
    node.overrides
        .insert("REDIRECT_CNI_CONFLIST".into(), "missing.conflist".into());
    let err = match AgentContainer::start(&pm, &node, tag) {
        Ok(c) => panic!("the agent started without its conflist: {}", c.ready),
        Err(e) => e,
    };
    assert!(
        err.contains("step: agent container start: the container exited at start (exit code 1)"),
        "{err}"
    );
    assert!(
        err.contains("missing.conflist"),
        "the log names the conflist: {err}"
    );
    let left = pm.ok(&["ps", "-a", "--format", "{{.Names}}"]);
    assert!(left.is_empty(), "containers left behind: {left}");
}

/// An edit of the DaemonSet document.
type Edit = fn(&mut Value);

/// The mapping refuses what it cannot reproduce, naming the field.
#[test]
fn the_daemonset_mapping_names_what_it_cannot_map() {
    let docs = deploy_documents();
    let run = node_run(&docs, DAEMONSET, &[], NODE_NAME).unwrap();
    // The manifest's image is the one `cargo xtask image` tags by default.
    assert_eq!(
        run.image,
        format!("redirect:{}", env!("CARGO_PKG_VERSION")),
        "deploy/daemonset.yaml's image is not xtask image's default tag"
    );
    assert_eq!(run.env["REDIRECT_NODE_NAME"], NODE_NAME);
    assert!(
        run.env.contains_key("REDIRECT_CNI_CONFLIST"),
        "the ConfigMap is in"
    );
    let cases: [(&str, Edit, &str); 6] = [
        (
            "emptyDir volume",
            |ds| {
                ds["spec"]["template"]["spec"]["volumes"][0] =
                    serde_json::json!({"name": "bpffs", "emptyDir": {}})
            },
            "volumes[0].emptyDir",
        ),
        (
            "unknown securityContext field",
            |ds| {
                ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]["procMount"] =
                    "Unmasked".into()
            },
            "securityContext.procMount",
        ),
        (
            "secret env",
            |ds| {
                ds["spec"]["template"]["spec"]["containers"][0]["env"][0]["valueFrom"] =
                    serde_json::json!({"secretKeyRef": {"name": "s", "key": "k"}})
            },
            "valueFrom",
        ),
        (
            "second container",
            |ds| {
                let c = ds["spec"]["template"]["spec"]["containers"][0].clone();
                ds["spec"]["template"]["spec"]["containers"]
                    .as_array_mut()
                    .unwrap()
                    .push(c);
            },
            "2 containers",
        ),
        (
            "unknown pod field",
            |ds| ds["spec"]["template"]["spec"]["hostIPC"] = true.into(),
            "spec.template.spec.hostIPC",
        ),
        (
            "mount of an unknown volume",
            |ds| {
                ds["spec"]["template"]["spec"]["containers"][0]["volumeMounts"][0]["name"] =
                    "nope".into()
            },
            "volume nope",
        ),
    ];
    for (what, edit, want) in cases {
        let mut changed = docs.clone();
        let ds = changed
            .iter_mut()
            .find(|d| d["kind"] == "DaemonSet")
            .unwrap();
        edit(ds);
        match node_run(&changed, DAEMONSET, &[], NODE_NAME) {
            Ok(_) => panic!("{what}: mapped"),
            Err(e) => assert!(e.contains(want), "{what}: {e}"),
        }
    }
    // A substitution for a path the manifest does not mount.
    let bad = [Substitution {
        host: "/etc/nowhere".into(),
        test_dir: "/tmp".into(),
        same_path: false,
    }];
    let e = node_run(&docs, DAEMONSET, &bad, NODE_NAME).unwrap_err();
    assert!(e.contains("/etc/nowhere"), "{e}");
}
