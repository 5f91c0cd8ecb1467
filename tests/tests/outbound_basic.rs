//! The main outbound path, IPv4 and IPv6: app → upstream through the
//! sidecar proxy (uid 1337) forwarding to SO_ORIGINAL_DST, no iptables.
use redirect_tests::*;

#[test]
fn app_reaches_upstream_through_proxy_v4_v6() {
    let mut pod = Pod::new("basic");
    pod.start_upstream(8080);
    let proxy = pod.start_proxy();
    pod.attach_istio_default();
    for dst in [
        format!("{UPSTREAM_V4}:8080"),
        format!("[{UPSTREAM_V6}]:8080"),
    ] {
        let r = pod.app_client(&dst);
        assert_ok(&r, &dst);
        // getpeername shows the original destination, as under iptables.
        assert_eq!(r.peer.as_deref(), Some(dst.as_str()));
    }
    let log = pod.proxy_log(proxy);
    let origs: Vec<_> = log
        .iter()
        .filter(|l| l["event"] == "conn")
        .map(|l| l["orig"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        origs,
        vec![
            format!("{UPSTREAM_V4}:8080"),
            format!("[{UPSTREAM_V6}]:8080")
        ]
    );
    assert_eq!(pod.counter("OUTPUT", "captured"), 2);
    // Bytes of both directions are added when the app socket closes:
    // the greeting plus "ping" echoed, per connection.
    let captured = stats_rule(&pod.stats()[0], "OUTPUT", "captured")["bytes"]
        .as_u64()
        .unwrap();
    assert!(captured >= 2 * 8, "captured bytes {captured}");
    assert_eq!(pod.counter("ORIGINAL_DST", "orig_dst_outbound"), 2);
    assert_eq!(pod.counter("OUTPUT", "skip_proxy_uid"), 2);
    let nat = run(
        "ip",
        &[
            "netns",
            "exec",
            &pod.topo.pod.name,
            "iptables-save",
            "-t",
            "nat",
        ],
    )
    .unwrap_or_default();
    assert!(!nat.contains("-A "), "no iptables rule may exist: {nat}");
}
