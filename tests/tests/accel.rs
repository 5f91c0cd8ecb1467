//! Socket-level acceleration (`redirect attach --accel`): app↔proxy
//! sockets go into the sockhash at connection setup and sk_msg hands each
//! message straight to the peer. Data must arrive intact, in order, in both
//! directions, outbound (app → 15001) and inbound (proxy → app from
//! 127.0.0.6), and sockets must leave the map when they close.
use redirect_tests::*;

fn v4(ip: &str, port: u16) -> String {
    format!("{ip}:{port}")
}

fn v6(ip: &str, port: u16) -> String {
    format!("[{ip}]:{port}")
}

fn accel(pod: &Pod, rule: &str) -> (u64, u64) {
    let s = pod.stats();
    let r = stats_rule(&s[0], "ACCEL", rule);
    (r["count"].as_u64().unwrap(), r["bytes"].as_u64().unwrap())
}

fn accelerated_now(pod: &Pod) -> u64 {
    let out = pod.redirect(&["status", "--json"]);
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status json");
    st["map_usage"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["map"] == "REDIRECT_SOCKS")
        .expect("REDIRECT_SOCKS usage")["entries"]
        .as_u64()
        .unwrap()
}

/// Closed sockets leave the sockhash (the kernel unhashes them; TIME_WAIT
/// sockets are no longer full sockets).
fn wait_sockhash_empty(pod: &Pod) {
    for _ in 0..100 {
        if accelerated_now(pod) == 0 {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    panic!(
        "accelerated sockets still in the map after close: {}",
        accelerated_now(pod)
    );
}

const SIZES: [usize; 5] = [1, 1000, 64 * 1024, 1024 * 1024, 4 * 1024 * 1024];

#[test]
fn outbound_payloads_from_1_byte_to_mib_arrive_intact() {
    let mut pod = Pod::new("acco");
    pod.start_upstream(8080);
    pod.start_proxy();
    let out = pod.attach_istio_default_with(&["--accel", "--accel-short-conns"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("acceleration: on"),
        "{out:?}"
    );
    let app = pod.topo.in_pod(APP_UID, APP_UID);
    let mut total = 0;
    for size in SIZES {
        for dst in [v4(UPSTREAM_V4, 8080), v6(UPSTREAM_V6, 8080)] {
            let r = pod.client_sized(&app, &dst, size);
            assert_ok(&r, &format!("{size} bytes to {dst}"));
            total += size as u64;
        }
    }
    let conns = (SIZES.len() * 2) as u64;
    // App socket and proxy's accepted socket, per connection.
    assert_eq!(accel(&pod, "sockets_inserted").0, 2 * conns);
    let (msgs, bytes) = accel(&pod, "messages_redirected");
    assert!(msgs >= 2 * conns, "messages redirected {msgs}");
    // Each payload crosses the app↔proxy hop twice (there and echoed
    // back), through sk_msg: redirected, or after a bulk (≥ 64 KiB)
    // message on the normal path.
    // A verdict's rest is counted by the socket's next verdict, so each
    // socket can hold back up to one budget (ACCEL_VERDICT_BYTES).
    let (_, bulk) = accel(&pod, "messages_bulk");
    let (_, upper) = redirect_tests::accel_bytes_upper(&pod);
    assert!(upper >= 2 * total, "bytes redirected {bytes} + after the bulk switch {bulk}, with the uncounted rests {upper}, against {}", 2 * total);
    wait_sockhash_empty(&pod);
}

#[test]
fn inbound_passthrough_is_accelerated_and_intact() {
    let mut pod = Pod::new("acci");
    pod.start_app_server(9080);
    pod.start_proxy();
    pod.attach_istio_default_with(&["--accel", "--accel-short-conns"]);
    let outside = pod.topo.in_upstream();
    for size in SIZES {
        for dst in [v4(POD_V4, 9080), v6(POD_V6, 9080)] {
            let r = pod.client_sized(&outside, &dst, size);
            assert_ok(&r, &format!("{size} bytes to {dst}"));
            // The app saw the proxy's passthrough source.
            let banner = r.banner.as_deref().unwrap();
            assert!(
                banner.starts_with("peer=127.0.0.6:") || banner.starts_with("peer=[::6]:"),
                "{banner}"
            );
        }
    }
    let conns = (SIZES.len() * 2) as u64;
    // Proxy's 127.0.0.6 socket and the app's accepted socket.
    assert_eq!(accel(&pod, "sockets_inserted").0, 2 * conns);
    assert!(accel(&pod, "messages_redirected").0 >= 2 * conns);
    wait_sockhash_empty(&pod);
}

#[test]
fn many_concurrent_connections_and_no_map_growth() {
    let mut pod = Pod::new("accn");
    pod.start_upstream(8080);
    pod.start_proxy();
    pod.attach_istio_default_with(&["--accel", "--accel-short-conns"]);
    let app = pod.topo.in_pod(APP_UID, APP_UID);
    let dst = v4(UPSTREAM_V4, 8080);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|_| {
                s.spawn(|| {
                    for _ in 0..25 {
                        let r = client_sized(&app, &dst, 16 * 1024);
                        assert_ok(&r, &dst);
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().expect("client thread");
        }
    });
    assert_eq!(accel(&pod, "sockets_inserted").0, 2 * 200);
    wait_sockhash_empty(&pod);
    // Every one of them counted out again as it closed (the state
    // callback can come a little after the sockhash let go).
    for _ in 0..100 {
        if accel(&pod, "sockets_removed").0 == 2 * 200 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(accel(&pod, "sockets_removed").0, 2 * 200);
    let out = pod.redirect(&["status", "--json"]);
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // The maps that grow with connections (the others hold pod config).
    for m in st["map_usage"].as_array().unwrap() {
        if [
            "REDIRECT_SOCKS",
            "REDIRECT_ORIG_BY_COOKIE",
            "REDIRECT_ORIG_BY_TUPLE",
        ]
        .contains(&m["map"].as_str().unwrap())
        {
            assert_eq!(m["entries"], 0, "{m} not back to empty");
        }
    }
}

#[test]
fn off_with_no_accel_and_nothing_outside_pods_is_inserted() {
    let mut pod = Pod::new("accd");
    pod.start_upstream(8080);
    pod.start_proxy();
    pod.attach_istio_default_with(&["--no-accel"]);
    let r = pod.app_client(&v4(UPSTREAM_V4, 8080));
    assert_ok(&r, "--no-accel attach");
    assert_eq!(accel(&pod, "sockets_inserted").0, 0);
    assert_eq!(accel(&pod, "messages_redirected").0, 0);
    // With --accel, traffic of a netns that is not a captured pod (the
    // upstream server's side) is never inserted: only the two pod sockets.
    pod.attach_istio_default_with(&["--accel"]);
    let r = pod.app_client(&v4(UPSTREAM_V4, 8080));
    assert_ok(&r, "accelerated attach");
    assert_eq!(accel(&pod, "sockets_inserted").0, 2);
}

/// Acceleration learns where it does not pay (docs/acceleration.md): after
/// 4 connections in a row to a port that each lived under 10 ms, the pod's
/// new connections to that port stay on the normal path (counted as
/// `connections_short_skipped`), other ports are still accelerated, and
/// one connection to the port that lives longer (skipped itself, but
/// timed) turns acceleration back on for the port. `--accel-short-conns`
/// turns the learning off; detach forgets what the pod learned.
#[test]
fn short_lived_ports_are_left_out_until_a_connection_lives_longer() {
    let mut pod = Pod::new("acsh");
    let upstream = pod.topo.in_upstream();
    for port in [8080, 8081] {
        pod.spawn(
            "upstream",
            &["epoll-echo", "--listen", &v4(UPSTREAM_V4, port)],
            &upstream,
        );
    }
    pod.start_proxy();
    pod.attach_istio_default_with(&["--accel"]);
    let (short, other) = (v4(UPSTREAM_V4, 8080), v4(UPSTREAM_V4, 8081));
    let app = pod.topo.in_pod(APP_UID, APP_UID);
    // One connection (100 bytes echoed), held open `hold_ms` before close.
    let conn = |dst: &str, hold_ms: u32| {
        let r = run_kit(
            &app,
            &[
                "fan",
                "--connect",
                dst,
                "--count",
                "1",
                "--threads",
                "1",
                "--size",
                "100",
                "--hold-ms",
                &hold_ms.to_string(),
            ],
            std::time::Duration::from_secs(20),
        );
        assert!(
            !r.timed_out && r.report()["done"] == 1 && r.report()["failures"] == 0,
            "{dst}: {} {}",
            r.stdout,
            r.stderr
        );
    };
    let inserted = |pod: &Pod| accel(pod, "sockets_inserted").0;
    let skipped = |pod: &Pod| accel(pod, "connections_short_skipped").0;
    // Short connections until some are skipped (a connection slowed past
    // 10 ms by a busy machine starts the count again, so no fixed number).
    let mut n = 0;
    while skipped(&pod) < 3 {
        assert!(
            n < 200,
            "{n} short connections and still accelerated: {}",
            String::from_utf8_lossy(&pod.redirect(&["stats"]).stdout)
        );
        conn(&short, 0);
        n += 1;
    }
    assert!(n >= 4 + 3, "skipped after only {n} connections");
    // Each connection was either accelerated (2 sockets) or skipped.
    assert_eq!(inserted(&pod) + 2 * skipped(&pod), 2 * n);
    assert_eq!(
        pinned_map_len(&pod, "REDIRECT_ACCEL_PORTS"),
        1,
        "one port learned"
    );

    // Another port of the same pod is not affected.
    let before = inserted(&pod);
    conn(&other, 0);
    assert_eq!(inserted(&pod), before + 2);

    // A connection to the short port that lives 50 ms: skipped, and its
    // close turns acceleration back on for the port.
    let (s0, before) = (skipped(&pod), inserted(&pod));
    conn(&short, 50);
    assert_eq!((skipped(&pod), inserted(&pod)), (s0 + 1, before));
    conn(&short, 0);
    assert_eq!(inserted(&pod), before + 2, "accelerated again");

    // --accel-short-conns: every connection, however short.
    pod.attach_istio_default_with(&["--accel", "--accel-short-conns"]);
    let (s0, before) = (skipped(&pod), inserted(&pod));
    for _ in 0..8 {
        conn(&short, 0);
    }
    assert_eq!((skipped(&pod), inserted(&pod)), (s0, before + 16));
    wait_sockhash_empty(&pod);

    // Release: what the pod learned goes with it.
    assert!(pinned_map_len(&pod, "REDIRECT_ACCEL_PORTS") > 0);
    let out = pod.redirect(&["detach", "--netns", &pod.pod_netns().display().to_string()]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(pinned_map_len(&pod, "REDIRECT_ACCEL_PORTS"), 0);
}
