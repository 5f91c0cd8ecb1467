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
    panic!("accelerated sockets still in the map after close: {}", accelerated_now(pod));
}

const SIZES: [usize; 5] = [1, 1000, 64 * 1024, 1024 * 1024, 4 * 1024 * 1024];

#[test]
fn outbound_payloads_from_1_byte_to_mib_arrive_intact() {
    let mut pod = Pod::new("acco");
    pod.start_upstream(8080);
    pod.start_proxy();
    let out = pod.attach_istio_default_with(&["--accel"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("acceleration: on"), "{out:?}");
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
    let (_, bulk) = accel(&pod, "messages_bulk");
    assert!(bytes + bulk >= 2 * total, "bytes redirected {bytes} + after the bulk switch {bulk} < {}", 2 * total);
    wait_sockhash_empty(&pod);
}

#[test]
fn inbound_passthrough_is_accelerated_and_intact() {
    let mut pod = Pod::new("acci");
    pod.start_app_server(9080);
    pod.start_proxy();
    pod.attach_istio_default_with(&["--accel"]);
    let outside = pod.topo.in_upstream();
    for size in SIZES {
        for dst in [v4(POD_V4, 9080), v6(POD_V6, 9080)] {
            let r = pod.client_sized(&outside, &dst, size);
            assert_ok(&r, &format!("{size} bytes to {dst}"));
            // The app saw the proxy's passthrough source.
            let banner = r.banner.as_deref().unwrap();
            assert!(banner.starts_with("peer=127.0.0.6:") || banner.starts_with("peer=[::6]:"), "{banner}");
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
    pod.attach_istio_default_with(&["--accel"]);
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
    let out = pod.redirect(&["status", "--json"]);
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // The maps that grow with connections (the others hold pod config).
    for m in st["map_usage"].as_array().unwrap() {
        if ["REDIRECT_SOCKS", "REDIRECT_ORIG_BY_COOKIE", "REDIRECT_ORIG_BY_TUPLE"].contains(&m["map"].as_str().unwrap()) {
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
