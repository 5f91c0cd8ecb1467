//! Map pressure: each map that fills with pods or connections is made
//! small with `--map-size` and filled. What must hold (docs/design.md, "When
//! a map is full"): the defined behaviour per map (pod config full: the capture
//! fails closed, CNI ADD fails; original destination full: connect refused
//! with EPERM; sockhash full: the connection takes the normal path), a
//! counter for it, no connection ever reaching another destination than
//! the one it asked for, and full service again once entries are freed.
//! Also: `--map-size` validation, and an install whose pinned maps differ
//! from this binary's (sizes or layout) refused with a clear error.

mod agent_support;

use std::time::Duration;

use agent_support::*;
use redirect_tests::{child_json_lines, map_usage, run_kit, NetnsGuard, Pod, APP_UID, UPSTREAM_V4};
use serde_json::{json, Value};

const ECHO_PORT: u16 = 9000;

fn echo_dst() -> String {
    format!("{UPSTREAM_V4}:{ECHO_PORT}")
}

/// Pod with the kit proxy (uid 1337) and an epoll echo server upstream
/// (no greeting: the stress tools check every byte of the echo).
fn pod_with_echo(tag: &str) -> (Pod, usize) {
    pod_with_echo_tfo(tag, false)
}

/// `pod_with_echo`, with TCP Fast Open on in the pod netns first (a
/// listener gets it when it starts listening) when `tfo`.
fn pod_with_echo_tfo(tag: &str, tfo: bool) -> (Pod, usize) {
    let mut pod = Pod::new(tag);
    if tfo {
        enable_tfo(&pod);
    }
    let listen = echo_dst();
    let up = pod.topo.in_upstream();
    pod.spawn("upstream-echo", &["epoll-echo", "--listen", &listen], &up);
    let proxy = pod.start_proxy();
    (pod, proxy)
}

fn outbound_conns(pod: &mut Pod, proxy: usize) -> Vec<Value> {
    pod.proxy_log(proxy)
        .into_iter()
        .filter(|l| l["dir"] == "outbound")
        .collect()
}

/// One app connection (uid 1000 in the pod) sending `size` bytes, echo
/// checked by hash.
fn xfer(pod: &Pod, size: usize) -> Value {
    let p = pod.topo.in_pod(APP_UID, APP_UID);
    run_kit(
        &p,
        &[
            "xfer",
            "--connect",
            &echo_dst(),
            "--size",
            &size.to_string(),
            "--timeout-ms",
            "5000",
        ],
        Duration::from_secs(20),
    )
    .report()
}

/// `count` short app connections, each exchange checked byte for byte.
fn churn(pod: &Pod, count: u64) -> Value {
    churn_with(pod, count, 4)
}

fn churn_with(pod: &Pod, count: u64, concurrency: usize) -> Value {
    let p = pod.topo.in_pod(APP_UID, APP_UID);
    run_kit(
        &p,
        &[
            "churn",
            "--connect",
            &echo_dst(),
            "--count",
            &count.to_string(),
            "--concurrency",
            &concurrency.to_string(),
            "--size",
            "512",
            "--rounds",
            "2",
        ],
        Duration::from_secs(120),
    )
    .report()
}

/// `n` app connections held open (after one checked exchange each) for
/// `hold`; returns once all are open.
fn hold_open(pod: &mut Pod, n: u64, hold: Duration) -> usize {
    let p = pod.topo.in_pod(APP_UID, APP_UID);
    let args = [
        "fan",
        "--connect",
        &echo_dst(),
        "--count",
        &n.to_string(),
        "--threads",
        "2",
        "--size",
        "256",
        "--hold-ms",
        &hold.as_millis().to_string(),
    ];
    let owned: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let refs: Vec<&str> = owned.iter().map(String::as_str).collect();
    pod.spawn("fan", &refs, &p);
    pod.children.len() - 1
}

fn wait_exit(pod: &mut Pod, idx: usize, timeout: Duration) -> Vec<Value> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Ok(Some(_)) = pod.children[idx].child.try_wait() {
            return child_json_lines(&mut pod.children[idx], 1, Duration::from_millis(500));
        }
        assert!(std::time::Instant::now() < deadline, "fan did not end");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn counter(pod: &Pod, chain: &str, rule: &str) -> u64 {
    pod.counter(chain, rule)
}

#[test]
fn orig_dst_map_full_refuses_new_connections_and_recovers() {
    let (mut pod, proxy) = pod_with_echo("mporig");
    let out = pod.attach_istio_default_with(&["--map-size", "orig=8"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("captured"));
    assert_eq!(map_usage_max(&pod, "REDIRECT_ORIG_BY_COOKIE"), 8);
    assert_eq!(map_usage_max(&pod, "REDIRECT_ORIG_BY_TUPLE"), 8);

    // 8 connections held open: both original-destination maps are full.
    let fan = hold_open(&mut pod, 8, Duration::from_secs(4));
    assert_eq!(map_usage(&pod, "REDIRECT_ORIG_BY_COOKIE"), 8);
    assert_eq!(map_usage(&pod, "REDIRECT_ORIG_BY_TUPLE"), 8);
    assert_eq!(outbound_conns(&mut pod, proxy).len(), 8);

    // Full: a new connection is refused at connect (EPERM), counted, and
    // reaches nobody: not the proxy, not the upstream directly.
    let captured_before = counter(&pod, "OUTPUT", "captured");
    for _ in 0..3 {
        let r = xfer(&pod, 1000);
        assert_eq!(r["ok"], false, "{r}");
        let err = r["error"].as_str().unwrap_or_default();
        assert!(
            err.contains("Operation not permitted"),
            "refused with EPERM: {r}"
        );
        assert_eq!(r["sent"], 0, "{r}");
    }
    assert_eq!(counter(&pod, "ERRORS", "error_orig_map_full"), 3);
    assert_eq!(
        counter(&pod, "OUTPUT", "captured"),
        captured_before + 3,
        "the rule matched, then the connect was refused"
    );
    assert!(
        outbound_conns(&mut pod, proxy).is_empty(),
        "a refused connection reached the proxy"
    );
    assert_eq!(
        map_usage(&pod, "REDIRECT_ORIG_BY_COOKIE"),
        8,
        "nothing recorded for refused connections"
    );
    let text = pod.redirect(&["stats", "--netns", pod.pod_netns().to_str().unwrap()]);
    assert!(
        String::from_utf8_lossy(&text.stdout)
            .lines()
            .any(|l| l.contains("REJECT")
                && l.contains("original-destination map full")
                && l.trim_start().starts_with('3')),
        "{}",
        String::from_utf8_lossy(&text.stdout)
    );

    // The held connections were not disturbed: every echo checked.
    let fan_report = wait_exit(&mut pod, fan, Duration::from_secs(20));
    let last = fan_report.last().expect("fan report");
    assert_eq!(
        (last["done"].as_u64(), last["failures"].as_u64()),
        (Some(8), Some(0)),
        "{last}"
    );

    // Recovery: closing frees the entries, new connections go through the
    // proxy to the destination they asked for.
    eventually("original-destination maps empty", || {
        map_usage(&pod, "REDIRECT_ORIG_BY_COOKIE") == 0
            && map_usage(&pod, "REDIRECT_ORIG_BY_TUPLE") == 0
    });
    let r = churn(&pod, 40);
    assert_eq!(
        (r["done"].as_u64(), r["failures"].as_u64()),
        (Some(40), Some(0)),
        "{r}"
    );
    let conns = outbound_conns(&mut pod, proxy);
    assert_eq!(conns.len(), 40);
    assert!(conns.iter().all(|c| c["orig"] == echo_dst()), "{conns:?}");
    assert_eq!(
        counter(&pod, "ERRORS", "error_orig_map_full"),
        3,
        "no refusal once there is room"
    );
    assert_eq!(counter(&pod, "ORIGINAL_DST", "orig_dst_missing"), 0);
    eventually("maps empty again", || {
        map_usage(&pod, "REDIRECT_ORIG_BY_COOKIE") == 0
            && map_usage(&pod, "REDIRECT_ORIG_BY_TUPLE") == 0
    });
}

#[test]
fn failed_connects_leave_no_record() {
    // The original-destination maps have no LRU backstop any more: a
    // connect that never completes must still remove its record.
    let pod = Pod::new("mpfail");
    pod.attach_istio_default_with(&["--map-size", "orig=4"]);
    // No proxy listens on 15001: every captured connect is refused by
    // the kernel (RST). 20 of them through a 4-entry map.
    for _ in 0..20 {
        let r = xfer(&pod, 10);
        assert_eq!(r["ok"], false);
        assert!(
            r["error"].as_str().unwrap_or_default().contains("refused"),
            "{r}"
        );
    }
    assert_eq!(counter(&pod, "OUTPUT", "captured"), 20);
    assert_eq!(
        counter(&pod, "ERRORS", "error_orig_map_full"),
        0,
        "records of failed connects were removed"
    );
    assert_eq!(map_usage(&pod, "REDIRECT_ORIG_BY_COOKIE"), 0);
    assert_eq!(map_usage(&pod, "REDIRECT_ORIG_BY_TUPLE"), 0);
}

#[test]
fn sockhash_full_falls_back_to_the_normal_path() {
    redirect_tests::raise_nofile();
    let (mut pod, proxy) = pod_with_echo("mpsock");
    pod.attach_istio_default_with(&["--accel", "--accel-short-conns", "--map-size", "sockhash=4"]);
    assert_eq!(map_usage_max(&pod, "REDIRECT_SOCKS"), 4);
    // Each accelerated connection puts 2 sockets in the sockhash (the
    // app's and the proxy's accepted one): 2 held connections fill it.
    let fan = hold_open(&mut pod, 2, Duration::from_secs(6));
    assert_eq!(map_usage(&pod, "REDIRECT_SOCKS"), 4);
    let (inserted, _) = redirect_tests::accel_counter(&pod, "sockets_inserted");
    assert_eq!(inserted, 4);
    // Full: more connections work, on the normal path, every byte checked.
    let r = churn(&pod, 30);
    assert_eq!(
        (r["done"].as_u64(), r["failures"].as_u64()),
        (Some(30), Some(0)),
        "{r}"
    );
    for _ in 0..3 {
        let x = xfer(&pod, 3 << 20);
        assert_eq!(x["ok"], true, "{x}");
        assert_eq!(x["recv_hash"], x["sent_hash"]);
    }
    assert_eq!(
        counter(&pod, "ERRORS", "error_sockmap_update"),
        2 * 33,
        "both sockets of each new connection counted"
    );
    assert_eq!(
        redirect_tests::accel_counter(&pod, "sockets_inserted").0,
        4,
        "nothing inserted while full"
    );
    let conns = outbound_conns(&mut pod, proxy);
    assert_eq!(conns.len(), 2 + 33);
    assert!(conns.iter().all(|c| c["orig"] == echo_dst()), "{conns:?}");
    let last = wait_exit(&mut pod, fan, Duration::from_secs(30));
    let last = last.last().expect("fan report");
    assert_eq!(
        (last["done"].as_u64(), last["failures"].as_u64()),
        (Some(2), Some(0)),
        "{last}"
    );

    // Recovery: the kernel drops closed sockets from the sockhash; new
    // connections are accelerated again.
    eventually("sockhash empty", || map_usage(&pod, "REDIRECT_SOCKS") == 0);
    // One connection at a time (2 sockets; the previous connection's may
    // still be closing): accelerated again, every byte checked.
    let (_, redirected_before) = redirect_tests::accel_counter(&pod, "messages_redirected");
    let r = churn_with(&pod, 10, 1);
    assert_eq!(
        (r["done"].as_u64(), r["failures"].as_u64()),
        (Some(10), Some(0)),
        "{r}"
    );
    let inserted = redirect_tests::accel_counter(&pod, "sockets_inserted").0;
    assert!(
        inserted >= 4 + 10,
        "sockets inserted again: {}",
        String::from_utf8_lossy(&pod.redirect(&["stats"]).stdout)
    );
    assert!(
        redirect_tests::accel_counter(&pod, "messages_redirected").1 > redirected_before,
        "accelerated again"
    );
    eventually("sockhash empty at the end", || {
        map_usage(&pod, "REDIRECT_SOCKS") == 0
    });
}

/// A connect that fails before its SYN leaves (local port exhaustion:
/// EADDRNOTAVAIL after connect4 made the record) never reaches sockops;
/// its record goes when the socket is released (cgroup sock_release).
/// The pod has one local port, held by an open connection to the proxy,
/// so every further app connect fails that way.
#[test]
fn connects_failing_before_the_syn_leave_no_record() {
    let (mut pod, _proxy) = pod_with_echo("mpport");
    pod.attach_istio_default();
    let ns = pod.pod_netns();
    let name = ns.file_name().unwrap().to_string_lossy().into_owned();
    let set = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &name,
            "sysctl",
            "-q",
            "-w",
            "net.ipv4.ip_local_port_range=40000 40000",
        ])
        .output()
        .unwrap();
    assert!(set.status.success(), "{set:?}");
    let fan = hold_open(&mut pod, 1, Duration::from_secs(8));
    eventually("the held connection's record", || {
        map_usage(&pod, "REDIRECT_ORIG_BY_COOKIE") == 1
    });
    let before = counter(&pod, "OUTPUT", "captured");
    for _ in 0..10 {
        let r = xfer(&pod, 10);
        assert_eq!(r["ok"], false, "{r}");
        assert!(
            r["error"]
                .as_str()
                .unwrap_or_default()
                .contains("Cannot assign requested address")
                || r["error"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("os error 99"),
            "{r}"
        );
    }
    assert_eq!(
        counter(&pod, "OUTPUT", "captured"),
        before + 10,
        "each failed connect was captured (and recorded) first"
    );
    assert_eq!(
        map_usage(&pod, "REDIRECT_ORIG_BY_COOKIE"),
        1,
        "only the held connection's record is left"
    );
    let last = wait_exit(&mut pod, fan, Duration::from_secs(30));
    assert_eq!(
        last.last().map(|l| l["failures"].as_u64()),
        Some(Some(0)),
        "{last:?}"
    );
    eventually("no record left", || {
        map_usage(&pod, "REDIRECT_ORIG_BY_COOKIE") == 0
            && map_usage(&pod, "REDIRECT_ORIG_BY_TUPLE") == 0
    });
}

/// `counters=2`: the pod's first two reasons get their counter slots, the
/// rest cannot; every connection is still redirected (the proxy sees each
/// with its original destination, bytes hash-checked), and the lost
/// updates are counted: `status --json` `counters_lost`, a warning on
/// `stats`, and (by the same status) the agent's
/// `redirect_counters_lost_total`.
#[test]
fn counters_map_full_loses_counts_not_decisions_and_says_so() {
    let (mut pod, proxy) = pod_with_echo("mpcnt");
    pod.attach_istio_default_with(&["--map-size", "counters=2"]);
    assert_eq!(map_usage_max(&pod, "REDIRECT_COUNTERS"), 2);
    for _ in 0..3 {
        let x = xfer(&pod, 100_000);
        assert_eq!(x["ok"], true, "{x}");
    }
    let conns = outbound_conns(&mut pod, proxy);
    assert_eq!(conns.len(), 3);
    assert!(conns.iter().all(|c| c["orig"] == echo_dst()), "{conns:?}");
    // Captured (app), proxy uid (the proxy's upstream connections), the
    // SO_ORIGINAL_DST answers, ...: more reasons than slots.
    let st = status(&pod);
    assert_eq!(map_usage(&pod, "REDIRECT_COUNTERS"), 2);
    let lost = st["counters_lost"].as_u64().unwrap();
    assert!(lost >= 3, "counter updates lost: {lost}: {st}");
    let out = pod.redirect(&["stats"]);
    assert!(out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("counter updates lost: REDIRECT_COUNTERS is full")
            && err.contains("--map-size counters="),
        "{err}"
    );
    let text = String::from_utf8_lossy(&pod.redirect(&["status"]).stdout).into_owned();
    assert!(text.contains("counter updates lost"), "{text}");
}

/// A bare extra pod netns (loopback only) for capture-count tests.
fn extra_netns(tag: &str) -> NetnsGuard {
    NetnsGuard::new(&redirect_testbed::sandbox::unique(&format!("rdp-{tag}-"))).expect("netns")
}

#[test]
fn pod_config_map_full_fails_closed_and_recovers() {
    let pod = Pod::new("mppods");
    let tmp = TempDir::new("mppods");
    let sock = tmp.join("agent.sock");
    let daemon = Daemon::start(
        &pod.pin_dir,
        &pod.topo.cgroup.path,
        &sock,
        &tmp.join("daemon.log"),
        &["--map-size", "pods=2"],
    );
    let nss: Vec<NetnsGuard> = (0..2).map(|_| extra_netns("mppods")).collect();
    let paths: Vec<String> = std::iter::once(pod.pod_netns())
        .chain(nss.iter().map(|n| n.path()))
        .map(|p| p.display().to_string())
        .collect();
    let add = |i: usize| {
        cni(
            &pod_vars(
                "ADD",
                &format!("ctr-{i}"),
                &paths[i],
                "K8S_POD_NAME=p;REDIRECT_CAPTURE=true",
            ),
            plugin_conf(&sock, json!({})).as_bytes(),
        )
    };
    let del = |i: usize| {
        cni(
            &pod_vars("DEL", &format!("ctr-{i}"), &paths[i], "K8S_POD_NAME=p"),
            plugin_conf(&sock, json!({})).as_bytes(),
        )
    };
    assert_eq!(add(0).code, 0);
    assert_eq!(add(1).code, 0);
    // Full: the third ADD fails closed (the runtime does not start the
    // pod), naming the map, its size and the knob.
    let third = add(2);
    assert_eq!(third.error_code(), 100, "{third:?}");
    let msg = third.json()["details"]
        .as_str()
        .unwrap_or_default()
        .to_string()
        + third.json()["msg"].as_str().unwrap_or_default();
    for want in ["REDIRECT_PODS is full", "2 entries", "--map-size pods="] {
        assert!(msg.contains(want), "{want:?} not in {msg}");
    }
    let (_, m) = redirect_userspace::agent::http::get(daemon.metrics_addr(), "/metrics").unwrap();
    assert!(
        m.contains("redirect_agent_map_full_total{map=\"REDIRECT_PODS\"} 1\n"),
        "{m}"
    );
    assert!(
        m.contains("redirect_map_max_entries{map=\"REDIRECT_PODS\"} 2\n"),
        "{m}"
    );
    // Nothing half-done for the refused pod: no config, no tables, no link.
    assert_eq!(daemon.list().len(), 2);
    let st = status(&pod);
    assert_eq!(st["pods"].as_array().unwrap().len(), 2);
    let ports_before = redirect_tests::pinned_map_len(&pod, "REDIRECT_PORTS");
    let cidrs_before = redirect_tests::pinned_map_len(&pod, "REDIRECT_CIDRS");
    assert_eq!(add(2).error_code(), 100);
    assert_eq!(
        redirect_tests::pinned_map_len(&pod, "REDIRECT_PORTS"),
        ports_before,
        "port entries of the refused pod were rolled back"
    );
    assert_eq!(
        redirect_tests::pinned_map_len(&pod, "REDIRECT_CIDRS"),
        cidrs_before
    );
    assert_eq!(
        std::fs::read_dir(pod.pin_dir.join("netns"))
            .unwrap()
            .count(),
        2
    );
    // The CLI says the same.
    let cg = pod.topo.cgroup.path.display().to_string();
    let out = pod.redirect(&[
        "attach", "--netns", &paths[2], "--cgroup", &cg, "-i", "*", "-b", "*",
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("REDIRECT_PODS is full (2 entries)"),
        "{out:?}"
    );

    // Recovery: a DEL frees a slot and the waiting pod is captured.
    assert_eq!(del(1).code, 0);
    assert_eq!(add(2).code, 0, "captured once there is room");
    assert_eq!(daemon.list().len(), 2);
    // Captured pods still work: the test pod's app goes through the proxy.
    let mut pod = pod;
    pod.start_upstream(8080);
    let proxy = pod.start_proxy();
    let r = pod.app_client(&format!("{UPSTREAM_V4}:8080"));
    assert!(r.ok, "{r:?}");
    let conns = outbound_conns(&mut pod, proxy);
    assert_eq!(conns.len(), 1);
    assert_eq!(conns[0]["orig"], format!("{UPSTREAM_V4}:8080"));

    // Sizes are fixed at install: a restart asking for other sizes is
    // refused and changes nothing; without --map-size the pinned sizes
    // are used.
    assert!(daemon.stop().success());
    let e = Daemon::try_start(
        &pod.pin_dir,
        &pod.topo.cgroup.path,
        &sock,
        &tmp.join("daemon2.log"),
        &["--map-size", "pods=4"],
    )
    .err()
    .expect("refused");
    assert!(
        e.contains("--map-size pods=4 does not match")
            && e.contains("REDIRECT_PODS is pinned with 2 entries"),
        "{e}"
    );
    let d = Daemon::start(
        &pod.pin_dir,
        &pod.topo.cgroup.path,
        &sock,
        &tmp.join("daemon3.log"),
        &[],
    );
    assert_eq!(d.list().len(), 2, "pods kept across the refused start");
    drop(nss);
}

#[test]
fn map_size_flag_is_validated_before_anything_changes() {
    let pod = Pod::new("mpflag");
    let ns = pod.pod_netns().display().to_string();
    let cg = pod.topo.cgroup.path.display().to_string();
    for (v, want) in [
        ("pods=0", "invalid --map-size value 'pods=0'"),
        ("pods=abc", "invalid --map-size value 'pods=abc'"),
        ("conntrack=5", "unknown map 'conntrack'"),
        ("orig", "expected <map>=<entries>"),
        ("orig=99999999", "out of range"),
    ] {
        let out = pod.redirect(&[
            "attach",
            "--netns",
            &ns,
            "--cgroup",
            &cg,
            "-i",
            "*",
            "--map-size",
            v,
        ]);
        assert!(!out.status.success(), "{v}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{v}: {err}");
        assert!(!pod.pin_dir.exists(), "{v}: the install was created");
        let tmp = TempDir::new("mpflag");
        let e = Daemon::try_start(
            &pod.pin_dir,
            &pod.topo.cgroup.path,
            &tmp.join("s.sock"),
            &tmp.join("log"),
            &["--map-size", v],
        )
        .err()
        .expect("daemon refused");
        assert!(e.contains(want), "{v}: {e}");
        assert!(!pod.pin_dir.exists());
    }
    // A valid size on a fresh install is applied to every map it names.
    pod.attach(&[
        "-i",
        "*",
        "--map-size",
        "pods=10,orig=100",
        "--map-size",
        "sockhash=50,ports=300,cidrs=200,counters=1000",
    ]);
    let want = [
        ("REDIRECT_PODS", 10),
        ("REDIRECT_LISTENERS", 20),
        ("REDIRECT_ORIG_BY_COOKIE", 100),
        ("REDIRECT_ORIG_BY_TUPLE", 100),
        ("REDIRECT_SOCKS", 50),
        ("REDIRECT_ACCEL_FALLBACK", 50),
        ("REDIRECT_PORTS", 300),
        ("REDIRECT_CIDRS", 200),
        ("REDIRECT_COUNTERS", 1000),
    ];
    for (m, n) in want {
        assert_eq!(pinned_max_entries(&pod, m), n, "{m}");
    }
    // `status` (and the agent's metrics) report them as pinned, with their use.
    for (m, n) in [
        ("REDIRECT_PODS", 10),
        ("REDIRECT_ORIG_BY_COOKIE", 100),
        ("REDIRECT_SOCKS", 50),
        ("REDIRECT_PORTS", 300),
        ("REDIRECT_CIDRS", 200),
        ("REDIRECT_COUNTERS", 1000),
    ] {
        assert_eq!(map_usage_max(&pod, m), n, "{m}");
    }
    assert_eq!(map_usage(&pod, "REDIRECT_PODS"), 1);
    assert!(
        map_usage(&pod, "REDIRECT_CIDRS") >= 1,
        "the -i '*' and pod address entries"
    );
    // The same sizes again, or none, reuse the install; another size is refused.
    pod.attach(&["-i", "*", "--map-size", "orig=100"]);
    pod.attach(&["-i", "*"]);
    let out = pod.redirect(&[
        "attach",
        "--netns",
        &ns,
        "--cgroup",
        &cg,
        "-i",
        "*",
        "--map-size",
        "orig=101",
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("REDIRECT_ORIG_BY_COOKIE is pinned with 100 entries"),
        "{out:?}"
    );
    assert_eq!(
        status(&pod)["pods"].as_array().unwrap().len(),
        1,
        "the captured pod stays"
    );
}

#[test]
fn incompatible_pinned_map_layout_is_a_clear_error() {
    // An install made by a version whose maps differ (the versions before
    // this check pinned the original-destination maps as LRU hashes):
    // the new binary refuses to load against it, naming the map and both
    // layouts, and leaves the running install alone.
    let mut pod = Pod::new("mplayout");
    pod.start_upstream(8080);
    let proxy = pod.start_proxy();
    pod.attach_istio_default();
    let pin = pod.pin_dir.join("maps").join("REDIRECT_ORIG_BY_COOKIE");
    std::fs::remove_file(&pin).unwrap();
    let out = std::process::Command::new("bpftool")
        .args(["map", "create"])
        .arg(&pin)
        .args([
            "type",
            "lru_hash",
            "key",
            "8",
            "value",
            "24",
            "entries",
            "1024",
            "name",
            "REDIRECT_ORIG_BY",
        ])
        .output()
        .expect("bpftool");
    assert!(out.status.success(), "{out:?}");
    let ns = pod.pod_netns().display().to_string();
    let cg = pod.topo.cgroup.path.display().to_string();
    let out = pod.redirect(&["attach", "--netns", &ns, "--cgroup", &cg, "-i", "*"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for want in [
        "pinned map REDIRECT_ORIG_BY_COOKIE",
        "lru_hash key 8 B, value 24 B",
        "needs hash key 8 B, value 24 B",
        "redirect uninstall",
    ] {
        assert!(err.contains(want), "{want:?} not in {err}");
    }
    let tmp = TempDir::new("mplayout");
    let e = Daemon::try_start(
        &pod.pin_dir,
        &pod.topo.cgroup.path,
        &tmp.join("s.sock"),
        &tmp.join("log"),
        &[],
    )
    .err()
    .expect("daemon refused");
    assert!(
        e.contains("pinned map REDIRECT_ORIG_BY_COOKIE") && e.contains("incompatible version"),
        "{e}"
    );
    // The running install is untouched: the pod is still captured (its
    // programs hold the map they were loaded with).
    let r = pod.app_client(&format!("{UPSTREAM_V4}:8080"));
    assert!(r.ok, "{r:?}");
    assert_eq!(outbound_conns(&mut pod, proxy).len(), 1);
    assert!(!std::fs::read_dir(pod.pin_dir.join("maps"))
        .unwrap()
        .any(|e| e.unwrap().file_name().to_string_lossy().starts_with('.')));
    assert!(
        !std::fs::read_dir(&pod.pin_dir).unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with("layout-probe")),
        "probe maps removed"
    );
    // A probe killed in the middle leaves its scratch directory: the next
    // probe removes it (its process is gone), and so does `uninstall`.
    let stale = |n: u32| {
        let dir = pod.pin_dir.join(format!("layout-probe-4194303999-{n}"));
        std::fs::create_dir(&dir).unwrap();
        let out = std::process::Command::new("bpftool")
            .args(["map", "create"])
            .arg(dir.join("REDIRECT_PODS"))
            .args([
                "type", "hash", "key", "8", "value", "8", "entries", "1", "name", "stale",
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        dir
    };
    let dir = stale(1);
    let _ = pod.redirect(&["attach", "--netns", &ns, "--cgroup", &cg, "-i", "*"]);
    assert!(
        !dir.exists(),
        "a dead probe's directory is removed by the next probe"
    );
    stale(2);
    // `redirect uninstall` still cleans it all up (Pod's drop checks it).
    let out = pod.redirect(&["uninstall"]);
    assert!(out.status.success(), "{out:?}");
    assert!(!pod.pin_dir.exists());
}

fn status(pod: &Pod) -> Value {
    let out = pod.redirect(&["status", "--json"]);
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

fn map_usage_max(pod: &Pod, map: &str) -> u64 {
    status(pod)["map_usage"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["map"] == map)
        .unwrap()["max_entries"]
        .as_u64()
        .unwrap()
}

fn pinned_max_entries(pod: &Pod, map: &str) -> u64 {
    let out = std::process::Command::new("bpftool")
        .args(["-j", "map", "show", "pinned"])
        .arg(pod.pin_dir.join("maps").join(map))
        .output()
        .expect("bpftool");
    assert!(out.status.success(), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["max_entries"].as_u64().unwrap()
}

// ------------------------------------------------------- TCP Fast Open

/// The app's side of the TCP Fast Open tests, run as uid 1000 in the pod:
/// `count` connections to `host port`, each sending a short message and
/// checking its echo and getpeername. `mode`: `plain` (connect, send),
/// `sendto` (sendto with MSG_FASTOPEN: connect and data in the SYN),
/// `connect` (TCP_FASTOPEN_CONNECT, then connect and send). `hold`: keep
/// every connection open, print the report with `"event":"ready"` and
/// wait to be killed. One JSON report: how many succeeded, how many
/// carried their data in the SYN (tcpi_options & TCPI_OPT_SYN_DATA).
const TFO_CLIENT: &str = r#"
import json, socket, sys, time
mode, host, port, count, hold = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "hold"
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
MSG_FASTOPEN, TCP_FASTOPEN_CONNECT, TCPI_OPT_SYN_DATA = 0x20000000, 30, 32
rep = {"ok": 0, "syn_data": 0, "errors": []}
held = []
for i in range(count):
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(5)
    msg = b"tfo-%06d" % i
    try:
        if mode == "sendto":
            s.sendto(msg, MSG_FASTOPEN, (host, port))
        else:
            if mode == "connect":
                s.setsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN_CONNECT, 1)
            s.connect((host, port))
            s.sendall(msg)
        back = b""
        while len(back) < len(msg):
            chunk = s.recv(len(msg) - len(back))
            if not chunk:
                break
            back += chunk
        peer = s.getpeername()
        if back != msg:
            raise Exception("echo %r for %r" % (back, msg))
        if (peer[0], peer[1]) != (host, port):
            raise Exception("getpeername %r" % (peer,))
        if s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[5] & TCPI_OPT_SYN_DATA:
            rep["syn_data"] += 1
        rep["ok"] += 1
    except Exception as e:
        if len(rep["errors"]) < 5:
            rep["errors"].append("%d: %s" % (i, e))
    if hold:
        held.append(s)
    else:
        s.close()
if hold:
    rep["event"] = "ready"
    print(json.dumps(rep), flush=True)
    time.sleep(3600)
else:
    print(json.dumps(rep), flush=True)
"#;

/// Server and client TCP Fast Open in the pod netns, for every listener
/// started from now on (the proxy's: as a listener with TCP_FASTOPEN
/// set) and with
/// no cookie needed, so every connection of the TFO modes carries data
/// in its SYN (0x1 client, 0x2 server, 0x4 client without cookie, 0x200
/// server without cookie, 0x400 every listener).
fn enable_tfo(pod: &Pod) {
    redirect_tests::run(
        "ip",
        &[
            "netns",
            "exec",
            &pod.topo.pod.name,
            "sysctl",
            "-qw",
            "net.ipv4.tcp_fastopen=1543",
        ],
    )
    .expect("enabling TCP Fast Open in the pod netns");
}

/// Run the TFO client in the pod as the app; its report.
fn tfo_client(pod: &Pod, mode: &str, dst: &str, count: u32) -> Value {
    let sa: std::net::SocketAddr = dst.parse().unwrap();
    let f = redirect_testbed::sandbox::run_placed(
        std::path::Path::new("/usr/bin/python3"),
        &[
            "-c",
            TFO_CLIENT,
            mode,
            &sa.ip().to_string(),
            &sa.port().to_string(),
            &count.to_string(),
            "close",
        ],
        &pod.topo.in_pod(APP_UID, APP_UID),
        Duration::from_secs(120),
    )
    .expect("running the TFO client");
    serde_json::from_str(f.stdout.lines().last().unwrap_or_default()).unwrap_or_else(|e| {
        panic!(
            "TFO client report ({e}): {:?} {:?} timed out {}",
            f.stdout, f.stderr, f.timed_out
        )
    })
}

/// Start the TFO client (`mode`) holding `count` connections open; its
/// child index once they are all open (killed by PID on drop).
fn tfo_hold(pod: &mut Pod, mode: &str, dst: &str, count: u32) -> usize {
    let sa: std::net::SocketAddr = dst.parse().unwrap();
    let mut cmd = std::process::Command::new("/usr/bin/python3");
    cmd.args([
        "-c",
        TFO_CLIENT,
        mode,
        &sa.ip().to_string(),
        &sa.port().to_string(),
        &count.to_string(),
        "hold",
    ]);
    let p = pod.topo.in_pod(APP_UID, APP_UID);
    let c = redirect_tests::ChildGuard::spawn("tfo-hold", cmd, &p, true)
        .unwrap_or_else(|e| panic!("TFO client holding connections: {e}"));
    pod.children.push(c);
    pod.children.len() - 1
}

/// Entries of REDIRECT_ORIG_BY_TUPLE whose key is in netns `cookie` (the
/// key's first 8 bytes), counted with bpftool.
fn tuple_entries_of(pod: &Pod, cookie: u64) -> usize {
    let path = pod.pin_dir.join("maps/REDIRECT_ORIG_BY_TUPLE");
    let out = std::process::Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(&path)
        .output()
        .expect("bpftool");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("bpftool json");
    v.as_array()
        .expect("entries")
        .iter()
        .filter(|e| {
            let key: Vec<u8> = e["key"]
                .as_array()
                .expect("key bytes")
                .iter()
                .map(|b| {
                    u8::from_str_radix(b.as_str().unwrap().trim_start_matches("0x"), 16).unwrap()
                })
                .collect();
            u64::from_ne_bytes(key[..8].try_into().unwrap()) == cookie
        })
        .count()
}

/// Poll until both original-destination maps hold exactly `want` entries
/// (connections close asynchronously); the last counts seen.
fn wait_tracked(pod: &Pod, want: (u64, u64)) -> (u64, u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let got = (
            map_usage(pod, "REDIRECT_ORIG_BY_COOKIE"),
            map_usage(pod, "REDIRECT_ORIG_BY_TUPLE"),
        );
        if got == want || std::time::Instant::now() > deadline {
            return got;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn pod_cookie(pod: &Pod) -> u64 {
    pod.stats()[0]["netns_cookie"]
        .as_u64()
        .expect("netns_cookie")
}

/// With TCP Fast Open the proxy's side of a connection is established
/// (and can be accepted) before the app's side: no original-destination
/// record may outlive its connection whatever the order, and every
/// connection gets its SO_ORIGINAL_DST. TFO off and on (sendto with
/// MSG_FASTOPEN, TCP_FASTOPEN_CONNECT), IPv4 and IPv6.
#[test]
fn tcp_fast_open_leaves_no_original_destination_record() {
    let (mut pod, proxy) = pod_with_echo_tfo("mptfo", true);
    let v6 = format!("[{}]:{ECHO_PORT}", redirect_tests::UPSTREAM_V6);
    let up = pod.topo.in_upstream();
    pod.spawn("upstream-echo6", &["epoll-echo", "--listen", &v6], &up);
    pod.attach_istio_default();
    const N: u32 = 40;
    for dst in [echo_dst(), v6.clone()] {
        for mode in ["plain", "sendto", "connect"] {
            let what = format!("{mode} to {dst}");
            let r = tfo_client(&pod, mode, &dst, N);
            assert_eq!(r["ok"], N, "{what}: {r}");
            let want_syn_data = if mode == "plain" { 0 } else { N };
            assert_eq!(
                r["syn_data"], want_syn_data,
                "{what}: TCP Fast Open must be (or not be) in use: {r}"
            );
            let conns = outbound_conns(&mut pod, proxy);
            assert_eq!(conns.len(), N as usize, "{what}: proxied connections");
            assert!(
                conns.iter().all(|c| c["orig"] == dst.as_str()),
                "{what}: the proxy got the original destination: {conns:?}"
            );
            assert_eq!(
                wait_tracked(&pod, (0, 0)),
                (0, 0),
                "{what}: original-destination records left after every connection closed"
            );
        }
    }
    assert_eq!(counter(&pod, "ERRORS", "error_tuple_map_full"), 0);
    assert_eq!(counter(&pod, "ORIGINAL_DST", "orig_dst_missing"), 0);
    assert_eq!(counter(&pod, "OUTPUT", "captured"), 6 * N as u64);
}

/// One pod opening TCP Fast Open connections in a loop, on an install
/// whose original-destination maps hold 256 entries, while another pod
/// of the same install keeps working: every connection of both pods gets
/// its SO_ORIGINAL_DST, no record outlives its connection, and releasing
/// the flooding pod removes the records of its connections still open.
#[test]
fn a_tcp_fast_open_flood_from_one_pod_does_not_starve_another() {
    let (mut flood, flood_proxy) = pod_with_echo_tfo("mptfof", true);
    let (mut victim, victim_proxy) = pod_with_echo("mptfov");
    // One install for both pods.
    victim.pin_dir = flood.pin_dir.clone();
    flood.attach_istio_default_with(&["--map-size", "orig=256"]);
    victim.attach_istio_default();
    let flood_cookie = pod_cookie(&flood);

    // More connections than the maps hold, one after the other.
    let r = tfo_client(&flood, "sendto", &echo_dst(), 300);
    assert_eq!(r["ok"], 300, "flood: {r}");
    assert_eq!(
        r["syn_data"], 300,
        "flood connections use TCP Fast Open: {r}"
    );
    assert_eq!(outbound_conns(&mut flood, flood_proxy).len(), 300);
    assert_eq!(
        wait_tracked(&flood, (0, 0)),
        (0, 0),
        "records left by the flood"
    );
    // The other pod's proxy still gets SO_ORIGINAL_DST.
    let v = xfer(&victim, 4096);
    assert_eq!(v["ok"], true, "victim: {v}");
    let vc = outbound_conns(&mut victim, victim_proxy);
    assert_eq!(vc.len(), 1, "{vc:?}");
    assert_eq!(vc[0]["orig"], echo_dst().as_str());
    for p in [&flood, &victim] {
        assert_eq!(counter(p, "ERRORS", "error_tuple_map_full"), 0);
        assert_eq!(counter(p, "ORIGINAL_DST", "orig_dst_missing"), 0);
    }
    assert_eq!(wait_tracked(&flood, (0, 0)), (0, 0));

    // Connections held open keep their records; releasing the pod removes
    // every record it owns.
    let held = tfo_hold(&mut flood, "sendto", &echo_dst(), 20);
    assert_eq!(outbound_conns(&mut flood, flood_proxy).len(), 20);
    assert_eq!(tuple_entries_of(&flood, flood_cookie), 20);
    let out = flood.redirect(&["detach", "--netns", flood.pod_netns().to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        tuple_entries_of(&flood, flood_cookie),
        0,
        "records of the released pod's connections"
    );
    // Its connections then close: nothing left, the other pod unaffected.
    flood.children.remove(held);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while map_usage(&victim, "REDIRECT_ORIG_BY_COOKIE") != 0 && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(wait_tracked(&victim, (0, 0)), (0, 0));
    let v = xfer(&victim, 4096);
    assert_eq!(v["ok"], true, "victim after the release: {v}");
}

/// REDIRECT_LOCAL_CONNECTS (sized by `orig`) full: the pod's own IPv6
/// connections to its address cannot all be marked. Counted, and the pod
/// falls back to taking local sources for its own (as for IPv4), so its
/// connections still go direct and, above all, the proxy's passthrough
/// to the app, unmarked too, is not steered back to the proxy (which
/// would dial again: a loop). With room again, marking resumes.
#[test]
fn local_connects_map_full_falls_back_and_never_loops_the_proxy() {
    let mut pod = Pod::new("mplocal");
    let app = format!("[{}]:{ECHO_PORT}", redirect_tests::POD_V6);
    let p = pod.topo.in_pod(APP_UID, APP_UID);
    pod.spawn("app-echo", &["epoll-echo", "--listen", &app], &p);
    let proxy = pod.start_proxy();
    pod.attach_istio_default_with(&["--map-size", "orig=2"]);
    let local_marks = |pod: &Pod| redirect_tests::pinned_map_len(pod, "REDIRECT_LOCAL_CONNECTS");
    let held = tfo_hold(&mut pod, "plain", &app, 2);
    assert_eq!(local_marks(&pod), 2, "two local connections, two marks");
    assert_eq!(counter(&pod, "ERRORS", "error_local_map_full"), 0);

    // A third one of the pod's own: counted, still direct.
    let r = tfo_client(&pod, "plain", &app, 1);
    assert_eq!(r["ok"], 1, "{r}");
    assert_eq!(counter(&pod, "ERRORS", "error_local_map_full"), 1);
    // From outside: steered to the proxy once, whose passthrough to the
    // app (from ::6, unmarked) reaches the app.
    let up = pod.topo.in_upstream();
    let x = run_kit(
        &up,
        &[
            "xfer",
            "--connect",
            &app,
            "--size",
            "4096",
            "--timeout-ms",
            "5000",
        ],
        Duration::from_secs(20),
    )
    .report();
    assert_eq!(x["ok"], true, "{x}");
    let inbound: Vec<Value> = pod
        .proxy_log(proxy)
        .into_iter()
        .filter(|l| l["dir"] == "inbound")
        .collect();
    assert_eq!(
        inbound.len(),
        1,
        "the proxy saw its own passthrough: {inbound:?}"
    );
    assert_eq!(counter(&pod, "PREROUTING", "captured"), 1);
    assert_eq!(counter(&pod, "ERRORS", "error_local_map_full"), 2);

    // Room again: marked, direct, nothing left behind.
    pod.children.remove(held);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while local_marks(&pod) != 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(local_marks(&pod), 0);
    let r = tfo_client(&pod, "plain", &app, 2);
    assert_eq!(r["ok"], 2, "{r}");
    assert_eq!(counter(&pod, "ERRORS", "error_local_map_full"), 2);
    assert!(pod.proxy_log(proxy).is_empty());
    assert_eq!(local_marks(&pod), 0);
}
