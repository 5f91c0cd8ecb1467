//! `redirect daemon` end to end: the daemon runs with its own socket, pin
//! dir and cgroup, and the redirect-cni binary is driven as a runtime
//! would (env + stdin) for a pod netns the test made. Traffic goes through
//! the kit sidecar proxy to an echo server in the test's upstream netns.

mod agent_support;

use std::{
    os::unix::fs::{MetadataExt, PermissionsExt},
    time::{Duration, Instant},
};

use agent_support::*;
use redirect_tests::{
    pinned_map_len, run_kit, wait_traced_by, NetnsGuard, Pod, Tracer, APP_UID, PROXY_UID,
    UPSTREAM_V4, UPSTREAM_V6,
};
use serde_json::{json, Value};

fn upstream() -> String {
    format!("{UPSTREAM_V4}:8080")
}

/// A pod with an upstream echo server, the kit proxy as uid 1337 and a
/// daemon serving it.
struct Setup {
    daemon: Option<Daemon>,
    proxy: usize,
    tmp: TempDir,
    pod: Pod,
}

impl Setup {
    fn new(tag: &str) -> Setup {
        let mut pod = Pod::new(tag);
        pod.start_upstream(8080);
        let proxy = pod.start_proxy();
        let tmp = TempDir::new(tag);
        let mut s = Setup {
            daemon: None,
            proxy,
            tmp,
            pod,
        };
        s.start_daemon(&[]);
        s
    }

    fn socket(&self) -> std::path::PathBuf {
        self.tmp.join("agent.sock")
    }

    fn start_daemon(&mut self, extra: &[&str]) -> &Daemon {
        let d = Daemon::start(
            &self.pod.pin_dir,
            &self.pod.topo.cgroup.path,
            &self.socket(),
            &self.tmp.join("daemon.log"),
            extra,
        );
        self.daemon = Some(d);
        self.daemon.as_ref().unwrap()
    }

    fn daemon(&self) -> &Daemon {
        self.daemon.as_ref().expect("daemon running")
    }

    fn netns(&self) -> String {
        self.pod.pod_netns().display().to_string()
    }

    fn cni(&self, command: &str, container: &str, args: &str, extra_conf: Value) -> CniRun {
        let ns = self.netns();
        cni(
            &pod_vars(command, container, &ns, args),
            plugin_conf(&self.socket(), extra_conf).as_bytes(),
        )
    }

    /// Outbound proxy connections logged since the last call.
    fn proxied(&mut self) -> Vec<Value> {
        let idx = self.proxy;
        self.pod
            .proxy_log(idx)
            .into_iter()
            .filter(|l| l["event"] == "conn" && l["dir"] == "outbound")
            .collect()
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        if let Some(d) = self.daemon.take() {
            if std::thread::panicking() {
                eprintln!("daemon log:\n{}", d.log_text());
            }
        }
    }
}

const SELECT: &str =
    "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart;REDIRECT_CAPTURE=true";

#[test]
fn cni_add_captures_and_del_releases() {
    let mut s = Setup::new("agadd");
    // The acceleration probe ran at start (not in the first ADD), and the
    // ready line says what it found on this kernel.
    let probe = s.daemon().ready["accel_probe"]
        .as_str()
        .unwrap_or_else(|| panic!("no probe result: {}", s.daemon().ready))
        .to_string();
    assert!(probe.starts_with("kernel probe "), "{probe}");
    // Before ADD: the app goes direct.
    assert!(s.pod.app_client(&upstream()).ok);
    assert!(s.proxied().is_empty());

    // The pod has IPv4 and IPv6 addresses, IPv4 first: --dual-stack for
    // its IPv6 to be captured too.
    let add = s.cni(
        "ADD",
        "ctr-1",
        SELECT,
        json!({"capture": {"dual-stack": true}}),
    );
    assert_eq!(add.code, 0, "{add:?}\n{}", s.daemon().log_text());
    assert_eq!(
        add.json(),
        serde_json::from_str::<Value>(PREV_RESULT).unwrap(),
        "ADD echoes prevResult"
    );

    // Captured: v4 and v6 through the proxy, with the original destination.
    let r = s.pod.app_client(&upstream());
    assert!(r.ok, "{r:?}");
    assert_eq!(
        r.peer.as_deref(),
        Some(upstream().as_str()),
        "getpeername shows the original peer"
    );
    let r6 = s.pod.app_client(&format!("[{UPSTREAM_V6}]:8080"));
    assert!(r6.ok, "{r6:?}");
    let conns = s.proxied();
    assert_eq!(conns.len(), 2, "{conns:?}");
    assert_eq!(conns[0]["orig"], upstream());
    assert_eq!(s.pod.counter("OUTPUT", "captured"), 2);

    // The agent knows the pod by name and container id.
    let pods = s.daemon().list();
    assert_eq!(pods.len(), 1, "{pods:?}");
    assert_eq!(
        (pods[0]["pod"].as_str(), pods[0]["container_id"].as_str()),
        (Some("shop/cart"), Some("ctr-1"))
    );
    assert_eq!(pods[0]["netns"], s.netns());
    assert_eq!(pods[0]["istio_iptables_args"], "-p 15001 -z 15006 -e 15008 -u '1337' -g '1337' -m REDIRECT -i '*' -x '' -q '' -o '' -b '*' -d '15020,15021,15090' --dual-stack");

    // Metrics: the decision counters per pod, attach counts, map usage.
    let (code, m) =
        redirect_userspace::agent::http::get(s.daemon().metrics_addr(), "/metrics").unwrap();
    assert_eq!(code, 200);
    let cookie = pods[0]["cookie"].as_u64().unwrap();
    let want = format!("redirect_decisions_total{{pod=\"shop/cart\",netns_cookie=\"{cookie}\",chain=\"OUTPUT\",rule=\"captured\",target=\"REDIRECT\"}} 2");
    assert!(m.lines().any(|l| l == want), "{want} not in\n{m}");
    assert!(
        m.contains("redirect_agent_attach_total{result=\"ok\"} 1\n"),
        "{m}"
    );
    assert!(
        m.contains("redirect_map_entries{map=\"REDIRECT_PODS\"} 1\n"),
        "{m}"
    );
    assert!(m.contains("redirect_pods 1\n"), "{m}");
    // `stats --zero` moves what `stats` shows, never the exported
    // counters: they stay monotonic (2, then 3 after one more).
    let zero = s.pod.redirect(&["stats", "--zero", "--netns", &s.netns()]);
    assert!(zero.status.success(), "{zero:?}");
    assert!(s.pod.app_client(&upstream()).ok);
    assert_eq!(s.proxied().len(), 1);
    assert_eq!(
        s.pod.counter("OUTPUT", "captured"),
        1,
        "shown since the zero"
    );
    let (_, m) =
        redirect_userspace::agent::http::get(s.daemon().metrics_addr(), "/metrics").unwrap();
    let want = want.replace("} 2", "} 3");
    assert!(m.lines().any(|l| l == want), "{want} not in\n{m}");
    for (path, want) in [("/healthz", 200), ("/readyz", 200), ("/nope", 404)] {
        assert_eq!(
            redirect_userspace::agent::http::get(s.daemon().metrics_addr(), path)
                .unwrap()
                .0,
            want,
            "{path}"
        );
    }

    // CHECK passes while captured.
    let check = s.cni("CHECK", "ctr-1", SELECT, json!({}));
    assert_eq!(check.code, 0, "{check:?}");

    // DEL releases: direct again, nothing left in the pins for the pod.
    let del = s.cni(
        "DEL",
        "ctr-1",
        "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart",
        json!({}),
    );
    assert_eq!((del.code, del.stdout.as_str()), (0, ""), "{del:?}");
    assert!(s.daemon().list().is_empty());
    assert!(!s
        .pod
        .pin_dir
        .join("netns")
        .join(cookie.to_string())
        .exists());
    assert_eq!(
        pinned_map_len(&s.pod, "REDIRECT_STATS_BASELINE"),
        0,
        "the released pod's --zero baseline is left"
    );
    let r = s.pod.app_client(&upstream());
    assert!(r.ok, "{r:?}");
    assert!(s.proxied().is_empty(), "released pod still captured");
    let (_, m) =
        redirect_userspace::agent::http::get(s.daemon().metrics_addr(), "/metrics").unwrap();
    assert!(
        m.contains("redirect_agent_detach_total{result=\"ok\"} 1\n")
            && m.contains("redirect_pods 0\n"),
        "{m}"
    );

    // DEL is idempotent; CHECK now fails.
    assert_eq!(
        s.cni("DEL", "ctr-1", "K8S_POD_NAME=cart", json!({})).code,
        0
    );
    assert_eq!(s.cni("CHECK", "ctr-1", SELECT, json!({})).error_code(), 101);
}

#[test]
fn cni_capture_config_reaches_the_pod() {
    let mut s = Setup::new("agcfg");
    // -x excludes the upstream: the app then goes direct.
    let add = s.cni("ADD", "ctr-cfg", SELECT, json!({"capture": {"istio-service-exclude-cidr": format!("{UPSTREAM_V4}/32"), "d": [15021]}}));
    assert_eq!(add.code, 0, "{add:?}");
    let pods = s.daemon().list();
    assert_eq!(pods[0]["istio_iptables_args"], format!("-p 15001 -z 15006 -e 15008 -u '1337' -g '1337' -m REDIRECT -i '*' -x '{UPSTREAM_V4}/32' -q '' -o '' -b '*' -d '15021'"));
    assert!(s.pod.app_client(&upstream()).ok);
    assert!(s.proxied().is_empty());
    assert_eq!(s.pod.counter("OUTPUT", "skip_excluded_cidr"), 1);
    // v6 is not captured: the pod's first address is IPv4 and the config
    // has no dual-stack (istio-iptables would write no ip6tables rules).
    assert!(s.pod.app_client(&format!("[{UPSTREAM_V6}]:8080")).ok);
    assert!(s.proxied().is_empty());
    assert_eq!(s.pod.counter("OUTPUT", "skip_ipv6_not_captured"), 1);
    // captureAll without the CNI_ARGS key selects too; REDIRECT_CAPTURE=false opts out.
    assert_eq!(
        s.cni("DEL", "ctr-cfg", "K8S_POD_NAME=cart", json!({})).code,
        0
    );
    assert_eq!(
        s.cni(
            "ADD",
            "ctr-cfg",
            "K8S_POD_NAME=cart;REDIRECT_CAPTURE=false",
            json!({"captureAll": true})
        )
        .code,
        0
    );
    assert!(s.daemon().list().is_empty());
    assert_eq!(
        s.cni(
            "ADD",
            "ctr-cfg",
            "K8S_POD_NAME=cart",
            json!({"captureAll": true})
        )
        .code,
        0
    );
    assert_eq!(s.daemon().list().len(), 1);
}

#[test]
fn cni_capture_config_turns_dns_capture_on() {
    let mut s = Setup::new("agdns");
    // The kit's stand-in for Istio's DNS proxy (127.0.0.1:15053, [::1]:15053)
    // as uid 1337; it answers *.mesh itself.
    let p = s.pod.topo.in_pod(PROXY_UID, PROXY_UID);
    s.pod.spawn("dns-proxy", &["dns-proxy"], &p);
    let ns = UPSTREAM_V4.to_string();
    let add = s.cni(
        "ADD",
        "ctr-dns",
        SELECT,
        json!({"capture": {"redirect-dns": true, "dns-servers": ns}}),
    );
    assert_eq!(add.code, 0, "{add:?}");
    let pods = s.daemon().list();
    assert!(
        pods[0]["istio_iptables_args"]
            .as_str()
            .unwrap()
            .ends_with(&format!("--redirect-dns --dns-servers '{UPSTREAM_V4}'")),
        "{pods:?}"
    );
    let server = format!("{UPSTREAM_V4}:53");
    let r = run_kit(
        &s.pod.topo.in_pod(APP_UID, APP_UID),
        &[
            "dns-query",
            "--server",
            &server,
            "--name",
            "svc.mesh",
            "--transport",
            "udp",
        ],
        std::time::Duration::from_secs(10),
    )
    .report();
    assert_eq!(r["answers"], json!(["198.51.100.53"]), "{r}");
    assert_eq!(r["reply_from"], server.as_str(), "{r}");
    let (code, m) =
        redirect_userspace::agent::http::get(s.daemon().metrics_addr(), "/metrics").unwrap();
    assert_eq!(code, 200);
    let cookie = pods[0]["cookie"].as_u64().unwrap();
    for (rule, target) in [
        ("captured_udp", "REDIRECT"),
        ("reply_from_nameserver", "ANSWER"),
    ] {
        let want = format!("redirect_decisions_total{{pod=\"shop/cart\",netns_cookie=\"{cookie}\",chain=\"DNS\",rule=\"{rule}\",target=\"{target}\"}} 1");
        assert!(m.lines().any(|l| l == want), "{want} not in\n{m}");
    }
    assert_eq!(
        s.cni("DEL", "ctr-dns", "K8S_POD_NAME=cart", json!({})).code,
        0
    );
}

#[test]
fn cni_add_fails_closed_when_the_agent_is_down() {
    let mut s = Setup::new("agdown");
    let d = s.daemon.take().unwrap();
    assert!(d.stop().success());
    assert!(!s.socket().exists(), "the socket is removed on shutdown");

    let add = s.cni("ADD", "ctr-down", SELECT, json!({}));
    assert_eq!(add.error_code(), 11, "agent unreachable: try again later");
    assert!(
        add.json()["msg"].as_str().unwrap().contains("uncaptured"),
        "{add:?}"
    );
    // Nothing was captured: the app goes direct (no install exists at all).
    assert!(s.pod.app_client(&upstream()).ok);
    assert!(s.proxied().is_empty());
    // Pods that are not selected pass through without the agent.
    assert_eq!(
        s.cni("ADD", "ctr-other", "K8S_POD_NAME=other", json!({}))
            .code,
        0
    );
    // DEL succeeds without the agent.
    let del = s.cni("DEL", "ctr-down", "K8S_POD_NAME=cart", json!({}));
    assert_eq!(del.code, 0, "{del:?}");

    // With the agent back, ADD works; a failing capture (the agent
    // refuses) fails the ADD too.
    s.start_daemon(&[]);
    let back = s.cni("ADD", "ctr-back", SELECT, json!({}));
    assert_eq!(back.code, 0, "{back:?}");
    let host_netns = format!("/proc/{}/ns/net", std::process::id());
    let refused = cni(
        &pod_vars("ADD", "ctr-host", &host_netns, SELECT),
        plugin_conf(&s.socket(), json!({})).as_bytes(),
    );
    assert_eq!(
        refused.error_code(),
        100,
        "capturing the host netns is refused: {refused:?}"
    );
    assert!(refused.stdout.contains("host"), "{refused:?}");
}

#[test]
fn daemon_restart_during_traffic_fails_no_connection() {
    let mut s = Setup::new("agrst");
    assert_eq!(s.cni("ADD", "ctr-rst", SELECT, json!({})).code, 0);
    let cookie = s.daemon().list()[0]["cookie"].as_u64().unwrap();
    let placement = s
        .pod
        .topo
        .in_pod(redirect_tests::APP_UID, redirect_tests::APP_UID);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let client = {
        let stop = stop.clone();
        let dst = upstream();
        std::thread::spawn(move || {
            let mut results = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(60);
            while !stop.load(std::sync::atomic::Ordering::SeqCst)
                && Instant::now() < deadline
                && results.len() < 2000
            {
                results.push(redirect_tests::client_sized(&placement, &dst, 1000));
            }
            results
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let old = s.daemon.take().unwrap();
    assert!(old.stop().success());
    std::thread::sleep(Duration::from_millis(300));
    let new = s.start_daemon(&[]);
    assert_eq!(
        new.ready["cgroup_newly_attached"], false,
        "the cgroup programs stayed attached"
    );
    assert_eq!(
        new.ready["reconciled"]["kept"],
        json!([cookie]),
        "{}",
        new.ready
    );
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let results = client.join().unwrap();
    let failed: Vec<_> = results.iter().filter(|r| !r.ok).collect();
    assert!(results.len() >= 5, "only {} connections", results.len());
    assert!(
        failed.is_empty(),
        "{} of {} connections failed: {failed:?}",
        failed.len(),
        results.len()
    );
    // Every one of them was captured.
    assert_eq!(s.pod.counter("OUTPUT", "captured") as usize, results.len());
    // The new agent knows the pod (records are pinned) and releases it.
    assert_eq!(s.daemon().list()[0]["pod"], "shop/cart");
    assert_eq!(
        s.cni("DEL", "ctr-rst", "K8S_POD_NAME=cart", json!({})).code,
        0
    );
    assert!(s.daemon().list().is_empty());
}

#[test]
fn pods_whose_netns_is_gone_are_released() {
    let mut s = Setup::new("aggone");
    // DEL after the netns is gone finds the pod by container id.
    let ns = NetnsGuard::new(&redirect_testbed::sandbox::unique("rdt-gone-")).unwrap();
    let p = ns.path().display().to_string();
    let add = cni(
        &pod_vars("ADD", "ctr-gone-1", &p, SELECT),
        plugin_conf(&s.socket(), json!({})).as_bytes(),
    );
    assert_eq!(add.code, 0, "{add:?}");
    assert_eq!(s.daemon().list().len(), 1);
    drop(ns);
    let del = cni(
        &pod_vars("DEL", "ctr-gone-1", &p, "K8S_POD_NAME=cart"),
        plugin_conf(&s.socket(), json!({})).as_bytes(),
    );
    assert_eq!(del.code, 0, "{del:?}");
    assert!(s.daemon().list().is_empty(), "released by container id");

    // A pod whose DEL was missed while no agent ran is released on start.
    let ns = NetnsGuard::new(&redirect_testbed::sandbox::unique("rdt-gone-")).unwrap();
    let p = ns.path().display().to_string();
    assert_eq!(
        cni(
            &pod_vars("ADD", "ctr-gone-2", &p, SELECT),
            plugin_conf(&s.socket(), json!({})).as_bytes()
        )
        .code,
        0
    );
    assert_eq!(s.cni("ADD", "ctr-alive", SELECT, json!({})).code, 0);
    let pods = s.daemon().list();
    let gone = pods
        .iter()
        .find(|x| x["container_id"] == "ctr-gone-2")
        .unwrap()["cookie"]
        .as_u64()
        .unwrap();
    let alive = pods
        .iter()
        .find(|x| x["container_id"] == "ctr-alive")
        .unwrap()["cookie"]
        .as_u64()
        .unwrap();
    assert!(s.daemon.take().unwrap().stop().success());
    drop(ns);
    let d = s.start_daemon(&[]);
    assert_eq!(
        d.ready["reconciled"]["released"],
        json!([gone]),
        "{}",
        d.ready
    );
    assert_eq!(d.ready["reconciled"]["kept"], json!([alive]), "{}", d.ready);
    let pods = d.list();
    assert_eq!(pods.len(), 1);
    assert_eq!(pods[0]["container_id"], "ctr-alive");
    let (_, m) = redirect_userspace::agent::http::get(d.metrics_addr(), "/metrics").unwrap();
    assert!(
        m.contains("redirect_agent_reconcile_released_total 1\n"),
        "{m}"
    );
    // The live pod is still captured.
    assert!(s.pod.app_client(&upstream()).ok);
    assert_eq!(s.proxied().len(), 1);
}

#[test]
fn agent_socket_is_root_only_and_checks_requests() {
    let mut s = Setup::new("agsock");
    let sock = s.socket();
    let m = std::fs::metadata(&sock).unwrap();
    assert_eq!(
        (m.permissions().mode() & 0o777, m.uid(), m.gid()),
        (0o600, 0, 0)
    );
    // A second daemon on the same socket refuses to start.
    let tmp = TempDir::new("agsock2");
    let second = Daemon::try_start(
        &s.pod.pin_dir,
        &s.pod.topo.cgroup.path,
        &sock,
        &tmp.join("log"),
        &[],
    );
    assert!(second.is_err());
    assert!(second.err().unwrap().contains("another agent"));
    assert!(sock.exists(), "the running agent keeps its socket");
    // A non-root client cannot connect: its ADD fails closed.
    let mut cmd = std::process::Command::new(cni_bin());
    cmd.env_clear();
    for (k, v) in pod_vars("ADD", "ctr-u", &s.netns(), SELECT) {
        cmd.env(k, v);
    }
    redirect_testbed::sandbox::place(
        &mut cmd,
        &redirect_testbed::sandbox::Placement {
            uid: Some(1000),
            gid: Some(1000),
            ..Default::default()
        },
    )
    .unwrap();
    let out = {
        use std::io::Write;
        let mut c = cmd
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        c.stdin
            .take()
            .unwrap()
            .write_all(plugin_conf(&sock, json!({})).as_bytes())
            .unwrap();
        c.wait_with_output().unwrap()
    };
    assert!(!out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["code"], 11, "{v}");
    // Bad requests get an error reply; the connection and the agent go on.
    let host_add = format!(
        r#"{{"op":"add","netns":"/proc/{}/ns/net"}}"#,
        std::process::id()
    );
    for (req, want) in [
        ("not json", "bad request"),
        (r#"{"op":"explode"}"#, "bad request"),
        (r#"{"op":"add","netns":"/etc/passwd"}"#, "refused"),
        (
            r#"{"op":"add","netns":"/run/netns/../../etc/passwd"}"#,
            "refused",
        ),
        (
            r#"{"op":"add","netns":"/run/netns/does-not-exist-xyz"}"#,
            "not a network namespace",
        ),
        (host_add.as_str(), "host"),
        (
            r#"{"op":"add","netns":"/run/netns/x","config":{"envoy-port":"0"}}"#,
            "-p/--envoy-port",
        ),
        (
            r#"{"op":"add","netns":"/run/netns/x","config":{"bogus":"1"}}"#,
            "bad request",
        ),
        (
            r#"{"op":"check","netns":"/run/netns/does-not-exist-xyz"}"#,
            "not a network namespace",
        ),
    ] {
        let r = call_raw(&sock, req);
        assert_eq!(r["ok"], false, "{req}: {r}");
        assert!(r["error"].as_str().unwrap().contains(want), "{req}: {r}");
    }
    assert_eq!(
        call_raw(&sock, r#"{"op":"del","container_id":"nobody"}"#)["ok"],
        true
    );
    assert!(s.daemon().list().is_empty());
    // Clients that hang up before reading the reply (a CNI plugin killed at
    // its timeout, an impatient scraper) do not take the agent down.
    for _ in 0..5 {
        use std::io::Write;
        let c = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        let _ = (&c).write_all("{\"op\":\"list\"}\n".repeat(50).as_bytes());
        drop(c);
        let t = std::net::TcpStream::connect(s.daemon().metrics_addr()).unwrap();
        let _ = (&t).write_all(b"GET /metrics HTTP/1.1\r\n\r\n");
        drop(t);
    }
    std::thread::sleep(Duration::from_millis(300));
    let mut d = s.daemon.take().unwrap();
    assert!(
        d.child.try_wait().unwrap().is_none(),
        "the agent died: {}",
        d.log_text()
    );
    assert!(d.list().is_empty());
    s.daemon = Some(d);
}

/// A CNI config dir with one conflist `50-<name>.conflist` (a bridge
/// network) and an empty bin dir, in a temp dir.
struct CniDirs {
    tmp: TempDir,
    conf_dir: std::path::PathBuf,
    bin_dir: std::path::PathBuf,
    conflist: std::path::PathBuf,
    original: String,
}

impl CniDirs {
    fn new(name: &str, bridge: &str) -> CniDirs {
        let tmp = TempDir::new(&format!("{name}-cni"));
        let (conf_dir, bin_dir) = (tmp.join("net.d"), tmp.join("bin"));
        std::fs::create_dir_all(&conf_dir).unwrap();
        let original = format!("{{\n  \"cniVersion\": \"1.0.0\",\n  \"name\": \"{name}\",\n  \"plugins\": [\n    {{\n      \"type\": \"bridge\",\n      \"bridge\": \"{bridge}\"\n    }}\n  ]\n}}\n");
        let conflist = conf_dir.join(format!("50-{name}.conflist"));
        std::fs::write(&conflist, &original).unwrap();
        CniDirs {
            tmp,
            conf_dir,
            bin_dir,
            conflist,
            original,
        }
    }
}

/// A network plugin that rewrites its conflist drops our entry (and a
/// node cleanup may delete the binary): the running agent puts both back
/// within --cni-recheck-secs, counts and logs it, and stops doing so
/// before --cni-cleanup removes the entry at shutdown.
#[test]
fn daemon_restores_a_conflist_entry_removed_while_it_runs() {
    let mut s = Setup::new("agguard");
    let CniDirs {
        tmp: _tmp,
        conf_dir,
        bin_dir,
        conflist,
        original,
    } = CniDirs::new("rdguard", "rdtbr8");
    let original = original.as_str();
    let args = [
        "--cni-conf-dir",
        conf_dir.to_str().unwrap(),
        "--cni-bin-dir",
        bin_dir.to_str().unwrap(),
        "--cni-conflist",
        "50-rdguard.conflist",
        "--cni-recheck-secs",
        "1",
        "--cni-cleanup",
    ];
    assert!(s.daemon.take().unwrap().stop().success());
    s.start_daemon(&args);
    let bin = bin_dir.join("redirect-cni");
    let installed = std::fs::read_to_string(&conflist).unwrap();
    assert_ne!(installed, original);
    let metric = |series: &str| -> u64 {
        let (code, m) =
            redirect_userspace::agent::http::get(s.daemon().metrics_addr(), "/metrics").unwrap();
        assert_eq!(code, 200);
        m.lines()
            .find_map(|l| {
                l.strip_prefix(series)
                    .and_then(|r| r.strip_prefix(' '))
                    .map(|v| v.trim().parse::<u64>().unwrap())
            })
            .unwrap_or(0)
    };
    let wait = |what: &str, f: &dyn Fn() -> bool| {
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while !f() {
            assert!(
                std::time::Instant::now() < deadline,
                "{what}\nlog:\n{}",
                s.daemon().log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    assert_eq!(
        metric("redirect_agent_cni_restored_total{what=\"entry\"}"),
        0
    );
    // The network plugin rewrites its file without us.
    std::fs::write(&conflist, original).unwrap();
    wait("entry restored", &|| {
        std::fs::read_to_string(&conflist).unwrap() == installed
    });
    wait("entry restore counted", &|| {
        metric("redirect_agent_cni_restored_total{what=\"entry\"}") == 1
    });
    // The binary deleted.
    std::fs::remove_file(&bin).unwrap();
    wait("binary restored", &|| bin.exists());
    assert_eq!(
        std::fs::read(&bin).unwrap(),
        std::fs::read(cni_bin()).unwrap()
    );
    wait("binary restore counted", &|| {
        metric("redirect_agent_cni_restored_total{what=\"binary\"}") == 1
    });
    // A broken file is counted as a failed check, never clobbered.
    std::fs::write(&conflist, "{ not json").unwrap();
    wait("check error counted", &|| {
        metric("redirect_agent_cni_check_errors_total") >= 1
    });
    assert_eq!(std::fs::read_to_string(&conflist).unwrap(), "{ not json");
    assert!(s
        .daemon()
        .log_text()
        .contains("cannot check or restore the CNI entry"));
    std::fs::write(&conflist, original).unwrap();
    wait("entry restored after the broken file", &|| {
        std::fs::read_to_string(&conflist).unwrap() == installed
    });
    // Shutdown with --cni-cleanup: the entry goes and stays gone.
    assert!(s.daemon.take().unwrap().stop().success());
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(std::fs::read_to_string(&conflist).unwrap(), original);
}

#[test]
fn daemon_installs_the_plugin_and_its_conflist_entry() {
    let mut s = Setup::new("agconf");
    let CniDirs {
        tmp,
        conf_dir,
        bin_dir,
        conflist,
        original,
    } = CniDirs::new("rdtest", "rdtbr9");
    let original = original.as_str();
    let args = [
        "--cni-conf-dir",
        conf_dir.to_str().unwrap(),
        "--cni-bin-dir",
        bin_dir.to_str().unwrap(),
        "--cni-conflist",
        "50-rdtest.conflist",
    ];
    assert!(s.daemon.take().unwrap().stop().success());
    s.start_daemon(&args);
    let bin = bin_dir.join("redirect-cni");
    assert_eq!(
        std::fs::metadata(&bin).unwrap().permissions().mode() & 0o777,
        0o755
    );
    assert_eq!(
        std::fs::read(&bin).unwrap(),
        std::fs::read(cni_bin()).unwrap()
    );
    let text = std::fs::read_to_string(&conflist).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        v["plugins"][0],
        json!({"type": "bridge", "bridge": "rdtbr9"})
    );
    assert_eq!(
        v["plugins"][1],
        json!({"type": "redirect-cni", "socket": s.socket()})
    );
    // A restart leaves the file alone; a stop without --cni-cleanup keeps the entry.
    assert!(s.daemon.take().unwrap().stop().success());
    assert_eq!(std::fs::read_to_string(&conflist).unwrap(), text);
    s.start_daemon(&args);
    assert_eq!(std::fs::read_to_string(&conflist).unwrap(), text);
    // With --cni-cleanup the entry goes on shutdown, and the file is as before.
    assert!(s.daemon.take().unwrap().stop().success());
    let mut with_cleanup = args.to_vec();
    with_cleanup.push("--cni-cleanup");
    s.start_daemon(&with_cleanup);
    assert!(s.daemon.take().unwrap().stop().success());
    assert_eq!(std::fs::read_to_string(&conflist).unwrap(), original);
    // `redirect uninstall --cni-conflist` removes it too (with the pins).
    s.start_daemon(&args);
    assert!(s.daemon.take().unwrap().stop().success());
    assert_ne!(std::fs::read_to_string(&conflist).unwrap(), original);
    let out = s.pod.redirect(&[
        "uninstall",
        "--cni-conf-dir",
        conf_dir.to_str().unwrap(),
        "--cni-conflist",
        "50-rdtest.conflist",
        "--cni-bin-dir",
        bin_dir.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(std::fs::read_to_string(&conflist).unwrap(), original);
    assert!(!bin.exists());
    assert!(!s.pod.pin_dir.exists(), "uninstall removed the pins");
    // A missing conflist is an error at start, before anything changes.
    let e = Daemon::try_start(
        &s.pod.pin_dir,
        &s.pod.topo.cgroup.path,
        &s.socket(),
        &tmp.join("log"),
        &[
            "--cni-conf-dir",
            conf_dir.to_str().unwrap(),
            "--cni-conflist",
            "missing.conflist",
        ],
    );
    assert!(e.err().unwrap().contains("does not exist"));
    assert!(!s.pod.pin_dir.exists());
}

/// One owner per pod, for the agent too: an ADD for a pod that another
/// install (here one made with the CLI in another pin dir) has captured
/// fails, naming that install; nothing of the agent's install is left on
/// the pod. After the other install releases it, the ADD captures it.
#[test]
fn cni_add_of_a_pod_another_install_has_is_refused() {
    let mut s = Setup::new("agowner");
    let other = std::path::PathBuf::from(format!(
        "/sys/fs/bpf/{}",
        redirect_testbed::sandbox::unique("rdt-other-")
    ));
    let redirect_at = |args: &[&str]| {
        std::process::Command::new(redirect_tests::redirect_bin())
            .arg("--pin-dir")
            .arg(&other)
            .args(args)
            .output()
            .expect("running redirect")
    };
    struct Uninstall<F: Fn(&[&str]) -> std::process::Output>(F);
    impl<F: Fn(&[&str]) -> std::process::Output> Drop for Uninstall<F> {
        fn drop(&mut self) {
            let _ = (self.0)(&["uninstall"]);
        }
    }
    let _guard = Uninstall(redirect_at);
    let redirect_at = &_guard.0;
    let ns = s.netns();
    let cg = s.pod.topo.cgroup.path.display().to_string();
    let out = redirect_at(&[
        "attach", "--netns", &ns, "--cgroup", &cg, "-p", "15001", "-z", "15006", "-u", "1337",
        "-m", "REDIRECT", "-i", "*", "-b", "*",
    ]);
    assert!(out.status.success(), "{out:?}");

    let add = s.cni("ADD", "ctr-own", SELECT, json!({}));
    assert_eq!(add.error_code(), 100, "{add:?}");
    assert!(
        add.stdout.contains("already captured by the install at")
            && add.stdout.contains(other.to_str().unwrap()),
        "{add:?}"
    );
    assert!(s.daemon().list().is_empty());
    // Still captured, by the other install alone: one sk_lookup program.
    assert!(s.pod.app_client(&upstream()).ok);
    assert_eq!(s.proxied().len(), 1);

    let out = redirect_at(&["detach", "--netns", &ns]);
    assert!(out.status.success(), "{out:?}");
    let add = s.cni("ADD", "ctr-own", SELECT, json!({}));
    assert_eq!(add.code, 0, "{add:?}");
    assert_eq!(s.daemon().list().len(), 1);
    assert!(s.pod.app_client(&upstream()).ok);
    assert_eq!(s.proxied().len(), 1);
    assert_eq!(s.pod.counter("OUTPUT", "captured"), 1);
}

#[test]
fn agent_serves_explain_and_trace_by_pod_name() {
    let s = Setup::new("agtr");
    let add = s.cni("ADD", "ctr-t", SELECT, json!({}));
    assert_eq!(add.code, 0, "{add:?}\n{}", s.daemon().log_text());
    let sock = s.socket();
    let sock = sock.to_str().unwrap();
    let up = upstream();

    // explain by pod name: the CLI goes through the agent on its socket.
    let out = s.pod.redirect(&[
        "explain",
        "--agent-socket",
        sock,
        "--pod",
        "shop/cart",
        "--uid",
        "1000",
        "--dst",
        &up,
        "--json",
    ]);
    assert!(out.status.success(), "{out:?}");
    let e: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (e["pod"].as_str(), e["verdict"]["counter"].as_str()),
        (Some("shop/cart"), Some("OUTPUT/captured")),
        "{e:#}"
    );
    // The op itself, on the socket.
    let r = s
        .daemon()
        .call(&json!({"op": "explain", "query": {"pod": "shop/cart", "uid": 1337, "dst": up}}));
    assert_eq!(
        (r["ok"].as_bool(), r["verdict"]["counter"].as_str()),
        (Some(true), Some("OUTPUT/skip_proxy_uid")),
        "{r}"
    );
    for (req, kind) in [
        (
            json!({"op": "explain", "query": {"pod": "shop/cart", "uid": 1, "dst": up}, "pin_dir": "/sys/fs/bpf/rdt-not-this-one"}),
            "other_install",
        ),
        (
            json!({"op": "explain", "query": {"pod": "shop/none", "uid": 1, "dst": up}}),
            "invalid",
        ),
        (
            json!({"op": "explain", "query": {"pod": "shop/cart", "uid": 1, "dst": "nowhere"}}),
            "invalid",
        ),
        (json!({"op": "trace", "pod": "shop/none"}), "invalid"),
        (
            json!({"op": "trace", "filter": {"rules": ["nope"]}}),
            "invalid",
        ),
    ] {
        let r = s.daemon().call(&req);
        assert_eq!(
            (r["ok"].as_bool(), r["kind"].as_str()),
            (Some(false), Some(kind)),
            "{req}: {r}"
        );
    }

    // Two clients at once, the same pod, different filters.
    let all = Tracer::spawn(
        &s.pod,
        &["--agent-socket", sock, "--pod", "shop/cart", "--json"],
    );
    let captured = Tracer::spawn(
        &s.pod,
        &[
            "--agent-socket",
            sock,
            "--pod",
            "shop/cart",
            "--json",
            "--rule",
            "captured",
        ],
    );
    wait_traced_by(&s.pod, s.daemon().pid() as u32);
    std::thread::sleep(Duration::from_millis(300));
    assert!(s.pod.app_client(&up).ok);
    let a = all.json_until(|l| l.iter().any(|x| x["hook"] == "getsockopt"));
    assert!(
        a.iter()
            .any(|x| x["rule"] == "captured" && x["pod"] == "shop/cart")
            && a.iter().any(|x| x["hook"] == "getsockopt"),
        "{a:#?}"
    );
    let c = captured.json_until(|l| !l.is_empty());
    std::thread::sleep(Duration::from_millis(500));
    let c2 = captured.json_until(|_| true);
    assert!(
        c.len() == 1 && c2.is_empty() && c[0]["rule"] == "captured" && c[0]["dst"] == up.as_str(),
        "{c:#?} {c2:#?}"
    );
    // The agent reads the events: a direct reader is refused, naming it.
    let out = s.pod.redirect(&["trace", "--no-agent"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains(&format!(
                "pid {} (redirect) is already reading",
                s.daemon().pid()
            )),
        "{err}"
    );
    // One client leaves, the other goes on; the last one switches it off.
    let (st, _) = all.interrupt();
    assert!(st.success());
    assert!(s.pod.app_client(&up).ok);
    assert_eq!(captured.json_until(|l| !l.is_empty()).len(), 1);
    let (st, _) = captured.interrupt();
    assert!(st.success());
    let pins = redirect_userspace::pins::Pins::new(&s.pod.pin_dir);
    eventually("tracing switched off after the last client", || {
        redirect_userspace::trace::switch_state(&pins)
            .unwrap()
            .is_some_and(|st| !st.on && st.owner_pid == 0)
    });
}
