//! RECORDED-CONTRACT tests of the agent's Kubernetes API side. No
//! kube-apiserver can run on this machine, so `kube_support::ApiFixture`
//! (a small HTTP server on 127.0.0.1 in the root netns) serves recorded API
//! responses — the Pod list and a watch stream with ADDED, MODIFIED,
//! DELETED, BOOKMARK and a 410 Gone, built from Istio-injected Pod objects
//! (`tests/fixtures/kube/`) — to the real `redirect daemon`, whose kube-rs
//! client lists and watches them. Everything else is real: the daemon loads
//! the programs into the kernel, `redirect-cni` is run as a runtime runs
//! it for a pod netns the test made, and traffic from the pod's app to an
//! echo server in the test's upstream netns shows what is captured.

mod agent_support;
mod kube_support;

use std::time::{Duration, Instant};

use agent_support::*;
use kube_support::*;
use redirect_tests::{Pod, UPSTREAM_V4};
use serde_json::{json, Value};

const NODE: &str = "node-a";

/// A pod netns with the kit proxy (1337), upstream echo servers on 8080 and
/// 8081, the API fixture, and a daemon watching it.
struct Setup {
    daemon: Option<Daemon>,
    proxy: usize,
    tmp: TempDir,
    pod: Pod,
    api: ApiFixture,
}

impl Setup {
    fn new(tag: &str, extra: &[&str]) -> Setup {
        let mut pod = Pod::new(tag);
        pod.start_upstream(8080);
        pod.start_upstream(8081);
        let proxy = pod.start_proxy();
        let tmp = TempDir::new(tag);
        let api = ApiFixture::start();
        let mut s = Setup {
            daemon: None,
            proxy,
            tmp,
            pod,
            api,
        };
        s.start_daemon(extra);
        s
    }

    fn start_daemon(&mut self, extra: &[&str]) {
        let url = self.api.url();
        let mut args = vec!["--node-name", NODE];
        if !extra.contains(&"--kubeconfig") {
            args.extend_from_slice(&["--api-server", url.as_str()]);
        }
        args.extend_from_slice(extra);
        let d = Daemon::start(
            &self.pod.pin_dir,
            &self.pod.topo.cgroup.path,
            &self.tmp.join("agent.sock"),
            &self.tmp.join("daemon.log"),
            &args,
        );
        self.daemon = Some(d);
    }

    fn daemon(&self) -> &Daemon {
        self.daemon.as_ref().expect("daemon running")
    }

    fn log(&self) -> String {
        self.daemon().log_text()
    }

    /// redirect-cni for this pod netns, in the API mode (`"kubernetes": true`).
    fn cni(&self, command: &str, container: &str, args: &str) -> CniRun {
        let ns = self.pod.pod_netns().display().to_string();
        cni(
            &pod_vars(command, container, &ns, args),
            plugin_conf(&self.daemon().socket, json!({"kubernetes": true})).as_bytes(),
        )
    }

    fn readyz(&self) -> (u16, String) {
        redirect_userspace::agent::http::get(self.daemon().metrics_addr(), "/readyz").unwrap()
    }

    fn metrics(&self) -> String {
        let (code, m) =
            redirect_userspace::agent::http::get(self.daemon().metrics_addr(), "/metrics").unwrap();
        assert_eq!(code, 200);
        m
    }

    /// The value of one metric line (`name` or `name{labels}`), 0 if absent.
    fn metric(&self, series: &str) -> u64 {
        self.metrics()
            .lines()
            .find_map(|l| {
                l.strip_prefix(series)
                    .and_then(|r| r.strip_prefix(' '))
                    .map(|v| v.trim().parse::<u64>().unwrap())
            })
            .unwrap_or(0)
    }

    fn wait_metric(&self, series: &str, want: u64) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let got = self.metric(series);
            if got == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{series} is {got}, want {want}\n{}\nlog:\n{}",
                self.metrics(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The app connects to the upstream server on `port`: "proxy" when the
    /// sidecar got it (with that original destination), else "direct".
    fn route(&mut self, port: u16) -> &'static str {
        let dst = format!("{UPSTREAM_V4}:{port}");
        let r = self.pod.app_client(&dst);
        assert!(r.ok, "app -> {dst}: {r:?}");
        let idx = self.proxy;
        let conns: Vec<Value> = self
            .pod
            .proxy_log(idx)
            .into_iter()
            .filter(|l| l["event"] == "conn" && l["dir"] == "outbound")
            .collect();
        match conns.as_slice() {
            [] => "direct",
            [c] if c["orig"] == dst.as_str() => "proxy",
            other => panic!("unexpected proxy log for {dst}: {other:?}"),
        }
    }

    fn routes(&mut self) -> (&'static str, &'static str) {
        (self.route(8080), self.route(8081))
    }

    /// The agent's pods (`list`).
    fn captured(&self) -> Vec<Value> {
        self.daemon().list()
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        if let Some(d) = self.daemon.take() {
            if std::thread::panicking() {
                eprintln!("daemon log:\n{}", d.log_text());
                eprintln!("API requests: {:?}", self.api.requests());
            }
        }
    }
}

fn name_of(prefix: &str) -> String {
    listed_pod(prefix)["metadata"]["name"]
        .as_str()
        .unwrap()
        .to_string()
}

fn uid_of(prefix: &str) -> String {
    listed_pod(prefix)["metadata"]["uid"]
        .as_str()
        .unwrap()
        .to_string()
}

fn k8s_args(ns: &str, name: &str, uid: Option<&str>) -> String {
    let mut s = format!(
        "IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME={name};K8S_POD_INFRA_CONTAINER_ID=ctr"
    );
    if let Some(u) = uid {
        s.push_str(&format!(";K8S_POD_UID={u}"));
    }
    s
}

/// The whole recorded stream against one daemon: pass-through of a pod
/// without sidecar, capture from annotations (excludeOutboundPorts really
/// excluded), live MODIFIED changes (config updated, invalid value
/// rejected, leaving and re-entering the mesh), BOOKMARK, 410 Gone and
/// relist, ADDED and DELETED, repair report.
#[test]
fn recorded_contract_annotations_drive_capture_and_live_changes() {
    let mut s = Setup::new("kapi", &[]);
    let events = watch_events();
    assert_eq!(
        events.len(),
        8,
        "the fixture stream (see tests/fixtures/kube/README.md)"
    );

    // The client side of the contract: one list of this node's pods, then
    // a watch from the list's resourceVersion with bookmarks.
    s.wait_metric("redirect_agent_kubernetes_synced", 1);
    s.api.wait_watching(1);
    let lists = s.api.lists();
    assert_eq!(lists.len(), 1, "{lists:?}");
    assert_eq!(
        lists[0].query.get("fieldSelector").map(String::as_str),
        Some("spec.nodeName=node-a"),
        "{lists:?}"
    );
    let w = &s.api.watches()[0];
    assert_eq!(
        w.query.get("fieldSelector").map(String::as_str),
        Some("spec.nodeName=node-a"),
        "{w:?}"
    );
    assert_eq!(
        w.query.get("resourceVersion").map(String::as_str),
        Some("48250"),
        "{w:?}"
    );
    assert_eq!(
        w.query.get("allowWatchBookmarks").map(String::as_str),
        Some("true"),
        "{w:?}"
    );
    assert_eq!(s.metric("redirect_agent_kubernetes_pods"), 3);
    assert_eq!(s.daemon().ready["kubernetes"]["node"], NODE);

    // Repair: ratings runs in the mesh but was never captured (it started
    // before the agent): reported in the log, the metric and `list`.
    let ratings = name_of("ratings-");
    s.wait_metric("redirect_agent_repair_total{action=\"reported\"}", 1);
    assert_eq!(s.metric("redirect_agent_uncaptured_pods"), 1);
    let l = s.daemon().call(&json!({"op": "list"}));
    assert_eq!(
        l["uncaptured"],
        json!([{"pod": format!("shop/{ratings}"), "uid": uid_of("ratings-")}]),
        "{l}"
    );
    assert!(
        s.log().contains("running pod in the mesh is not captured") && s.log().contains(&ratings),
        "{}",
        s.log()
    );

    // A pod without a sidecar passes through: ADD succeeds, nothing captured.
    let coredns = name_of("coredns-");
    let add = s.cni(
        "ADD",
        "ctr-dns",
        &k8s_args("kube-system", &coredns, Some(&uid_of("coredns-"))),
    );
    assert_eq!(add.code, 0, "{add:?}");
    assert!(
        add.stderr.contains("passes through") && add.stderr.contains("no istio-proxy container"),
        "{add:?}"
    );
    assert!(s.captured().is_empty());
    assert_eq!(s.routes(), ("direct", "direct"));
    let del = s.cni("DEL", "ctr-dns", &k8s_args("kube-system", &coredns, None));
    assert_eq!(del.code, 0, "{del:?}");

    // The injected pod is captured with its annotations' config:
    // excludeOutboundPorts 8081 really excluded, 8080 through the proxy.
    let cart = name_of("cart-");
    let cart_args = k8s_args("shop", &cart, Some(&uid_of("cart-")));
    let add = s.cni("ADD", "ctr-cart", &cart_args);
    assert_eq!(add.code, 0, "{add:?}\n{}", s.log());
    let pods = s.captured();
    assert_eq!(pods.len(), 1, "{pods:?}");
    assert_eq!(pods[0]["pod"], format!("shop/{cart}"));
    assert_eq!(pods[0]["istio_iptables_args"], "-p 15001 -z 15006 -e 15008 -u '1337' -g '1337' -m REDIRECT -i '*' -x '' -q '' -o '8081' -b '*' -d '15020,15021,15090'");
    assert_eq!(s.routes(), ("proxy", "direct"));
    assert_eq!(s.pod.counter("OUTPUT", "skip_excluded_port"), 1);
    assert_eq!(
        s.metric("redirect_agent_kubernetes_adds_total{result=\"captured\"}"),
        1
    );
    assert_eq!(
        s.metric("redirect_agent_kubernetes_adds_total{result=\"not_in_mesh\"}"),
        1
    );
    // CHECK agrees.
    assert_eq!(s.cni("CHECK", "ctr-cart", &cart_args).code, 0);

    // 1. MODIFIED: excludeOutboundPorts 8081 -> 8080, applied live.
    s.api.play(&events[0]);
    s.wait_metric(
        "redirect_agent_kubernetes_updates_total{result=\"updated\"}",
        1,
    );
    assert!(
        s.captured()[0]["istio_iptables_args"]
            .as_str()
            .unwrap()
            .contains("-o '8080'"),
        "{:?}",
        s.captured()
    );
    assert_eq!(s.routes(), ("direct", "proxy"));
    assert!(
        s.log().contains("annotation change applied live"),
        "{}",
        s.log()
    );

    // 2. BOOKMARK: nothing changes, the watch goes on.
    let applies = s.metric("redirect_agent_kubernetes_events_total{type=\"apply\"}");
    s.api.play(&events[1]);
    // 3. MODIFIED with an invalid value: rejected, named, counted; the
    //    pod keeps the config it has.
    s.api.play(&events[2]);
    s.wait_metric(
        "redirect_agent_kubernetes_updates_total{result=\"rejected\"}",
        1,
    );
    assert_eq!(
        s.metric("redirect_agent_kubernetes_events_total{type=\"apply\"}"),
        applies + 1,
        "the bookmark is not a pod change"
    );
    let log = s.log();
    assert!(
        log.lines().any(|l| l.contains("rejected annotation change")
            && l.contains("traffic.sidecar.istio.io/excludeOutboundPorts")
            && l.contains("8080,http")),
        "{log}"
    );
    assert!(s.captured()[0]["istio_iptables_args"]
        .as_str()
        .unwrap()
        .contains("-o '8080'"));
    assert_eq!(s.routes(), ("direct", "proxy"));

    // 4. interceptionMode NONE: the pod leaves the mesh, released live.
    s.api.play(&events[3]);
    s.wait_metric(
        "redirect_agent_kubernetes_updates_total{result=\"released\"}",
        1,
    );
    assert!(s.captured().is_empty());
    assert_eq!(s.routes(), ("direct", "direct"));

    // 5. REDIRECT again, no exclusion: captured again, live.
    s.api.play(&events[4]);
    s.wait_metric(
        "redirect_agent_kubernetes_updates_total{result=\"captured\"}",
        1,
    );
    assert!(
        s.captured()[0]["istio_iptables_args"]
            .as_str()
            .unwrap()
            .contains("-o ''"),
        "{:?}",
        s.captured()
    );
    assert_eq!(s.routes(), ("proxy", "proxy"));

    // 6. 410 Gone: the client relists (the list now has the changes) and
    //    watches again from the new resourceVersion; repair runs again.
    s.api.play(&events[5]);
    s.wait_metric(
        "redirect_agent_kubernetes_events_total{type=\"init_done\"}",
        2,
    );
    s.api.wait_watching(2);
    assert_eq!(s.api.lists().len(), 2, "{:?}", s.api.requests());
    assert_eq!(
        s.api.watches()[1]
            .query
            .get("resourceVersion")
            .map(String::as_str),
        Some("48470")
    );
    s.wait_metric("redirect_agent_repair_total{action=\"reported\"}", 2);
    assert_eq!(
        s.routes(),
        ("proxy", "proxy"),
        "a relist with the same config changes nothing"
    );
    assert_eq!(
        s.metric("redirect_agent_kubernetes_updates_total{result=\"updated\"}"),
        1
    );

    // 7. ADDED checkout (excludeOutboundPorts 8080), 8. DELETED cart.
    s.api.play(&events[6]);
    s.api.play(&events[7]);
    s.wait_metric("redirect_agent_kubernetes_events_total{type=\"delete\"}", 1);
    assert_eq!(s.metric("redirect_agent_kubernetes_pods"), 3);
    // The API deletion does not release the pod (its containers may still
    // run): the CNI DEL does.
    assert_eq!(s.captured().len(), 1);
    let del = s.cni("DEL", "ctr-cart", &k8s_args("shop", &cart, None));
    assert_eq!(del.code, 0, "{del:?}");
    assert!(s.captured().is_empty());
    // The deleted pod is now unknown: its ADD fails closed.
    let add = s.cni("ADD", "ctr-cart2", &cart_args);
    assert_eq!(add.error_code(), 102, "{add:?}");
    assert!(
        add.json()["details"]
            .as_str()
            .unwrap()
            .contains("is not known to the Kubernetes API"),
        "{add:?}"
    );
    assert!(s.captured().is_empty());
    // The new pod on the same netns: captured with its own annotations.
    let checkout = events[6]["object"]["metadata"]["name"].as_str().unwrap();
    let uid = events[6]["object"]["metadata"]["uid"].as_str().unwrap();
    let add = s.cni(
        "ADD",
        "ctr-checkout",
        &k8s_args("shop", checkout, Some(uid)),
    );
    assert_eq!(add.code, 0, "{add:?}\n{}", s.log());
    assert_eq!(s.captured()[0]["pod"], format!("shop/{checkout}"));
    assert_eq!(s.routes(), ("direct", "proxy"));
    let del = s.cni("DEL", "ctr-checkout", &k8s_args("shop", checkout, None));
    assert_eq!(del.code, 0, "{del:?}");
}

/// The unknown-pod rule: an ADD waits up to --pod-wait-ms for the watch to
/// know the pod, then fails closed (CNI code 102); an older pod of the
/// same name (K8S_POD_UID differs) is not taken for the new one; with the
/// API down, every API-decided ADD fails closed, and the watch recovers
/// when the API is back.
#[test]
fn recorded_contract_unknown_pod_and_api_down_fail_closed() {
    let mut s = Setup::new("kapiu", &["--pod-wait-ms", "1000"]);
    s.wait_metric("redirect_agent_kubernetes_synced", 1);
    assert_eq!(s.readyz(), (200, "ready\n".to_string()));

    let t0 = Instant::now();
    let add = s.cni(
        "ADD",
        "ctr-ghost",
        &k8s_args("shop", "ghost-5f6d7c8b9-abcde", None),
    );
    let waited = t0.elapsed();
    assert_eq!(add.error_code(), 102, "{add:?}");
    let v = add.json();
    assert!(
        v["msg"]
            .as_str()
            .unwrap()
            .contains("refusing to start it uncaptured"),
        "{v}"
    );
    assert!(
        v["details"]
            .as_str()
            .unwrap()
            .contains("pod shop/ghost-5f6d7c8b9-abcde is not known to the Kubernetes API"),
        "{v}"
    );
    assert!(
        waited >= Duration::from_millis(1000) && waited < Duration::from_secs(10),
        "waited {waited:?}"
    );
    assert!(s.captured().is_empty());
    assert_eq!(s.routes(), ("direct", "direct"));

    // Bad API-mode requests on the socket are refused by name, never a panic.
    let ns = s.pod.pod_netns().display().to_string();
    for (req, want) in [
        (
            json!({"op": "add", "netns": ns, "kubernetes": true}),
            "needs \"pod\"",
        ),
        (
            json!({"op": "add", "netns": ns, "kubernetes": true, "pod": "no-namespace"}),
            "needs \"pod\"",
        ),
        (
            json!({"op": "add", "netns": "/etc/passwd", "kubernetes": true, "pod": "shop/x"}),
            "is refused",
        ),
        (
            json!({"op": "add", "netns": ns, "kubernetes": "yes", "pod": "shop/x"}),
            "bad request",
        ),
        (
            json!({"op": "add", "netns": ns, "kubernetes": true, "pod": "shop/x", "pod_uid": 7}),
            "bad request",
        ),
    ] {
        let r = s.daemon().call(&req);
        assert_eq!(r["ok"], false, "{req} -> {r}");
        assert!(r["error"].as_str().unwrap().contains(want), "{req} -> {r}");
    }
    assert!(s.captured().is_empty());

    let cart = name_of("cart-");
    let add = s.cni(
        "ADD",
        "ctr-cart",
        &k8s_args("shop", &cart, Some("11111111-2222-4333-8444-555555555555")),
    );
    assert_eq!(add.error_code(), 102, "{add:?}");
    assert!(
        add.json()["details"]
            .as_str()
            .unwrap()
            .contains("not K8S_POD_UID"),
        "{add:?}"
    );
    assert_eq!(
        s.metric("redirect_agent_kubernetes_adds_total{result=\"unknown\"}"),
        2
    );

    // The API goes away: the watch notices, ADDs fail closed.
    s.api.shutdown();
    s.wait_metric("redirect_agent_kubernetes_connected", 0);
    // Not ready while ADDs of mesh pods cannot be decided; still healthy.
    let (code, body) = s.readyz();
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("Kubernetes API is unreachable"), "{body}");
    assert_eq!(
        redirect_userspace::agent::http::get(s.daemon().metrics_addr(), "/healthz")
            .unwrap()
            .0,
        200
    );
    let add = s.cni(
        "ADD",
        "ctr-cart",
        &k8s_args("shop", &cart, Some(&uid_of("cart-"))),
    );
    assert_eq!(add.error_code(), 102, "{add:?}");
    assert!(
        add.json()["details"]
            .as_str()
            .unwrap()
            .contains("Kubernetes API unreachable"),
        "{add:?}"
    );
    assert!(s.captured().is_empty());
    assert!(s.metric("redirect_agent_kubernetes_adds_total{result=\"unreachable\"}") >= 1);

    // Back: the watch reconnects and the same ADD captures.
    s.api.restart();
    s.wait_metric("redirect_agent_kubernetes_connected", 1);
    assert_eq!(s.readyz().0, 200);
    let add = s.cni(
        "ADD",
        "ctr-cart",
        &k8s_args("shop", &cart, Some(&uid_of("cart-"))),
    );
    assert_eq!(add.code, 0, "{add:?}\n{}", s.log());
    assert_eq!(s.routes(), ("proxy", "direct"));
    let del = s.cni("DEL", "ctr-cart", &k8s_args("shop", &cart, None));
    assert_eq!(del.code, 0, "{del:?}");

    // An agent without the API refuses API-mode ADDs (fail closed too).
    let tmp = TempDir::new("kapiu2");
    let d = Daemon::start(
        &s.pod.pin_dir,
        &s.pod.topo.cgroup.path,
        &tmp.join("agent.sock"),
        &tmp.join("daemon.log"),
        &["--no-kubernetes"],
    );
    let ns = s.pod.pod_netns().display().to_string();
    let add = cni(
        &pod_vars("ADD", "ctr-x", &ns, &k8s_args("shop", &cart, None)),
        plugin_conf(&d.socket, json!({"kubernetes": true})).as_bytes(),
    );
    assert_eq!(add.error_code(), 100, "{add:?}");
    assert!(
        add.json()["details"]
            .as_str()
            .unwrap()
            .contains("does not watch the Kubernetes API"),
        "{add:?}"
    );
    assert!(d.ready["kubernetes"].is_null(), "{}", d.ready);
    drop(d);

    // The API configured without a node name: refused at start, by name.
    let url = s.api.url();
    let e = Daemon::try_start(
        &s.pod.pin_dir,
        &s.pod.topo.cgroup.path,
        &tmp.join("agent3.sock"),
        &tmp.join("daemon3.log"),
        &["--api-server", &url],
    )
    .err()
    .expect("started without a node name");
    assert!(
        e.contains("--node-name") && e.contains("REDIRECT_NODE_NAME"),
        "{e}"
    );
}

/// `--repair delete`: the running mesh pod that is not captured is deleted
/// through the API (with a uid precondition) so its controller recreates
/// it captured, at start and as soon as another one starts running
/// uncaptured; once only, even after a relist.
#[test]
fn recorded_contract_repair_delete() {
    // This one reaches the API through a kubeconfig file (its current
    // context), as an agent outside a cluster would.
    let api = ApiFixture::start();
    let mut pod = Pod::new("kapir");
    pod.start_upstream(8080);
    let proxy = pod.start_proxy();
    let tmp = TempDir::new("kapir");
    let kubeconfig = tmp.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fixture\n  cluster:\n    server: {}\ncontexts:\n- name: agent\n  context:\n    cluster: fixture\n    user: agent\ncurrent-context: agent\nusers:\n- name: agent\n  user: {{}}\n",
            api.url()
        ),
    )
    .unwrap();
    let mut s = Setup {
        daemon: None,
        proxy,
        tmp,
        pod,
        api,
    };
    s.start_daemon(&[
        "--repair",
        "delete",
        "--kubeconfig",
        kubeconfig.to_str().unwrap(),
    ]);
    s.wait_metric("redirect_agent_repair_total{action=\"deleted\"}", 1);
    let ratings = name_of("ratings-");
    let dels: Vec<Req> = s
        .api
        .requests()
        .into_iter()
        .filter(|r| r.method == "DELETE")
        .collect();
    assert_eq!(dels.len(), 1, "{dels:?}");
    assert_eq!(
        dels[0].path,
        format!("/api/v1/namespaces/shop/pods/{ratings}")
    );
    let body: Value =
        serde_json::from_str(&dels[0].body).unwrap_or_else(|e| panic!("{e}: {:?}", dels[0].body));
    assert_eq!(body["preconditions"]["uid"], uid_of("ratings-"), "{body}");
    assert!(
        s.log().contains("deleted the uncaptured pod"),
        "{}",
        s.log()
    );

    // A pod that starts running in the mesh without having been captured
    // (cart's MODIFIED to Running, with no CNI ADD: as if the plugin had
    // been cut out of the conflist) is found at once, not at the next list.
    s.api.wait_watching(1);
    s.api.play(&watch_events()[0]);
    s.wait_metric("redirect_agent_repair_total{action=\"deleted\"}", 2);
    let dels: Vec<Req> = s
        .api
        .requests()
        .into_iter()
        .filter(|r| r.method == "DELETE")
        .collect();
    assert_eq!(
        dels[1].path,
        format!("/api/v1/namespaces/shop/pods/{}", name_of("cart-")),
        "{dels:?}"
    );
    assert_eq!(
        s.metric("redirect_agent_repair_total{action=\"reported\"}"),
        2
    );

    // A relist (410) finds both again (the fixture does not delete them),
    // but neither is deleted twice.
    s.api.play(&watch_events()[5]);
    s.wait_metric("redirect_agent_repair_total{action=\"reported\"}", 4);
    assert_eq!(
        s.api
            .requests()
            .iter()
            .filter(|r| r.method == "DELETE")
            .count(),
        2
    );
    assert_eq!(s.metric("redirect_agent_uncaptured_pods"), 2);
}

/// Annotations changed while no agent ran: the restarted agent's first
/// list brings the captured pod (known from its pinned records) in line,
/// and a relist with unchanged annotations touches nothing.
#[test]
fn recorded_contract_changes_while_the_agent_was_down_apply_at_start() {
    let mut s = Setup::new("kapis", &[]);
    s.wait_metric("redirect_agent_kubernetes_synced", 1);
    let cart = name_of("cart-");
    let add = s.cni(
        "ADD",
        "ctr-cart",
        &k8s_args("shop", &cart, Some(&uid_of("cart-"))),
    );
    assert_eq!(add.code, 0, "{add:?}\n{}", s.log());
    assert_eq!(s.routes(), ("proxy", "direct"));

    let st = s.daemon.take().unwrap().stop();
    assert!(st.success(), "{st:?}");
    // excludeOutboundPorts 8081 -> 8080 while no agent watches.
    s.api.play(&watch_events()[0]);
    assert_eq!(
        s.routes(),
        ("proxy", "direct"),
        "the pod stays as it was while no agent runs"
    );

    s.start_daemon(&[]);
    s.wait_metric(
        "redirect_agent_kubernetes_updates_total{result=\"updated\"}",
        1,
    );
    let pods = s.captured();
    assert_eq!(pods.len(), 1, "{pods:?}");
    assert_eq!(pods[0]["pod"], format!("shop/{cart}"));
    assert!(
        pods[0]["istio_iptables_args"]
            .as_str()
            .unwrap()
            .contains("-o '8080'"),
        "{pods:?}"
    );
    assert_eq!(s.routes(), ("direct", "proxy"));
    // Nothing is uncaptured but ratings.
    assert_eq!(s.metric("redirect_agent_uncaptured_pods"), 1);

    // A relist with the same annotations changes nothing.
    s.api.wait_watching(2);
    s.api.play(&watch_events()[5]);
    s.wait_metric(
        "redirect_agent_kubernetes_events_total{type=\"init_done\"}",
        2,
    );
    assert_eq!(
        s.metric("redirect_agent_kubernetes_updates_total{result=\"updated\"}"),
        1
    );
    let del = s.cni("DEL", "ctr-cart", &k8s_args("shop", &cart, None));
    assert_eq!(del.code, 0, "{del:?}");
}

/// The API answers, but refuses (RBAC without `list` on pods): the same
/// rule as an unreachable API, with the API's reason in the CNI error; the
/// watch recovers once the verb is granted.
#[test]
fn recorded_contract_forbidden_is_fail_closed() {
    let api = ApiFixture::start();
    api.set_forbidden(true);
    let mut pod = Pod::new("kapif");
    pod.start_upstream(8080);
    pod.start_upstream(8081);
    let proxy = pod.start_proxy();
    let tmp = TempDir::new("kapif");
    let mut s = Setup {
        daemon: None,
        proxy,
        tmp,
        pod,
        api,
    };
    s.start_daemon(&["--pod-wait-ms", "500"]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while s.metric("redirect_agent_kubernetes_events_total{type=\"error\"}") == 0 {
        assert!(Instant::now() < deadline, "no watch error\n{}", s.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let cart = name_of("cart-");
    let args = k8s_args("shop", &cart, Some(&uid_of("cart-")));
    let add = s.cni("ADD", "ctr-cart", &args);
    assert_eq!(add.error_code(), 102, "{add:?}");
    let details = add.json()["details"].as_str().unwrap().to_string();
    assert!(
        details.contains("Kubernetes API unreachable") && details.contains("cannot list resource"),
        "{details}"
    );
    assert!(s.captured().is_empty());
    assert_eq!(s.metric("redirect_agent_kubernetes_synced"), 0);

    s.api.set_forbidden(false);
    s.wait_metric("redirect_agent_kubernetes_synced", 1);
    let add = s.cni("ADD", "ctr-cart", &args);
    assert_eq!(add.code, 0, "{add:?}\n{}", s.log());
    assert_eq!(s.routes(), ("proxy", "direct"));
    let del = s.cni("DEL", "ctr-cart", &k8s_args("shop", &cart, None));
    assert_eq!(del.code, 0, "{del:?}");
}
