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
//! removed by the guards (podman_support), even on failure.

mod agent_support;
mod kube_support;
mod podman_support;

use std::path::PathBuf;

use agent_support::*;
use podman_support::*;
use redirect_testbed::sandbox::unique;
use serde_json::Value;

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
    pm.run_kit_container(&srv, &["echo", "--listen", "0.0.0.0:8080"]);
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
    let (infra, netns) = pm
        .start_pod(&pod, "K8S_POD_NAMESPACE=shop;REDIRECT_CAPTURE=true")
        .unwrap_or_else(|e| panic!("{}", fail(&e, &daemon)));
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
    let reports = pm.json_logs(&app);
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
    let proxied = pm.proxied(&format!("{pod}-proxy"));
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

    pm.run_kit_container(
        &srv,
        &[
            "echo",
            "--listen",
            "0.0.0.0:8080",
            "--listen",
            "0.0.0.0:8081",
        ],
    );
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
    let (_, netns) = pm
        .start_pod(&pod, "K8S_POD_NAMESPACE=shop")
        .unwrap_or_else(|e| panic!("{}", fail(&e)));
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
    let reports = pm.json_logs(&app);
    assert_eq!(reports.len(), 2, "{app_log:?}");
    assert!(reports.iter().all(|r| r["ok"] == true), "{reports:?}");
    // Only the 8080 connection went through the sidecar.
    let proxied = pm.proxied(&format!("{pod}-proxy"));
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
