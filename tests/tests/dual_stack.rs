//! Which pods get their IPv6 captured, as istio-iptables decides it: the
//! pod's first usable address (the kernel lists IPv4 first) must be IPv6,
//! or `--dual-stack` given and the pod have an IPv6 address. The test pod
//! has both families on its veth, IPv4 first; the IPv6-only pod is the
//! same pod with its IPv4 address removed. Real programs, real
//! connections out of and into the pod, checked from the client, the
//! server that answered, the proxy and the counters.
use redirect_testbed::kit::ClientReport;
use redirect_tests::*;

const UP_PORT: u16 = 8080;
const APP_PORT: u16 = 9080;

fn up_v4() -> String {
    format!("{UPSTREAM_V4}:{UP_PORT}")
}
fn up_v6() -> String {
    format!("[{UPSTREAM_V6}]:{UP_PORT}")
}

/// The flags of Istio's injector, plus `extra`.
fn istio(extra: &[&'static str]) -> Vec<&'static str> {
    let mut v = redirect_tests::ISTIO_INJECTED.to_vec();
    v.extend_from_slice(extra);
    v
}

/// A pod with the proxy, an upstream echo server and the app's server.
fn pod(tag: &str) -> (Pod, usize) {
    let mut pod = Pod::new(tag);
    pod.start_upstream(UP_PORT);
    pod.start_app_server(APP_PORT);
    let proxy = pod.start_proxy();
    (pod, proxy)
}

/// The proxy's connections logged since the last call, by direction.
fn proxied(pod: &mut Pod, proxy: usize, dir: &str) -> Vec<String> {
    pod.proxy_log(proxy)
        .into_iter()
        .filter(|l| l["event"] == "conn" && l["dir"] == dir)
        .map(|l| l["orig"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// Outbound: captured means getpeername shows the original destination
/// and the server saw another socket (the proxy's).
fn assert_out_captured(r: &ClientReport, dst: &str) {
    assert_ok(r, dst);
    assert_eq!(r.peer.as_deref(), Some(dst), "{r:?}");
    let local = r.local.clone().unwrap_or_default();
    assert_ne!(
        r.banner.as_deref(),
        Some(format!("peer={local} local={dst}").as_str()),
        "{dst}: the server saw the app's own socket (not captured): {r:?}"
    );
}

/// Outbound direct: the server saw exactly the app's socket.
fn assert_out_direct(r: &ClientReport, dst: &str) {
    assert_ok(r, dst);
    let local = r.local.clone().unwrap_or_default();
    assert_eq!(
        r.banner.as_deref(),
        Some(format!("peer={local} local={dst}").as_str()),
        "{dst}: the server must see the app's own socket: {r:?}"
    );
}

/// Who the app's server saw as its peer.
fn app_saw(r: &ClientReport) -> String {
    r.banner
        .as_deref()
        .unwrap_or_default()
        .split_whitespace()
        .find_map(|w| w.strip_prefix("peer="))
        .unwrap_or_default()
        .to_string()
}

/// Inbound from the upstream netns to the pod's app server.
fn from_outside(pod: &Pod, dst: &str) -> ClientReport {
    pod.client(&pod.topo.in_upstream(), dst, None)
}

fn assert_in_captured(r: &ClientReport, dst: &str) {
    assert_ok(r, dst);
    let peer = app_saw(r);
    assert!(
        peer.starts_with("127.0.0.6:") || peer.starts_with("[::6]:"),
        "{dst}: the app should see the proxy's passthrough source, saw {peer}: {r:?}"
    );
}

fn assert_in_direct(r: &ClientReport, dst: &str) {
    assert_ok(r, dst);
    assert_eq!(
        Some(app_saw(r).as_str()),
        r.local.as_deref(),
        "{dst}: the app should see the client itself: {r:?}"
    );
}

fn lo_addresses(pod: &Pod) -> String {
    pod.topo
        .pod
        .ip(&["-6", "addr", "show", "dev", "lo"])
        .unwrap_or_default()
}

#[test]
fn without_dual_stack_a_pod_whose_first_address_is_ipv4_keeps_its_ipv6_uncaptured() {
    let (mut pod, proxy) = pod("dsoff");
    let out = pod.attach(&istio(&["--dual-stack=false"]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!(
            "IPv6: not captured (first address {POD_V4} is IPv4; --dual-stack captures it)"
        )),
        "{text}"
    );
    // istio-iptables adds ::6 only when it writes ip6tables rules.
    assert!(
        !lo_addresses(&pod).contains("::6/128"),
        "{}",
        lo_addresses(&pod)
    );

    // Outbound: IPv4 captured; IPv6 straight to the server, counted.
    assert_out_captured(&pod.app_client(&up_v4()), &up_v4());
    assert_out_direct(&pod.app_client(&up_v6()), &up_v6());
    // A v4-mapped destination on an IPv6 socket is IPv4: captured.
    let mapped = format!("[::ffff:{UPSTREAM_V4}]:{UP_PORT}");
    assert_out_captured(&pod.app_client(&mapped), &mapped);
    assert_eq!(
        proxied(&mut pod, proxy, "outbound"),
        vec![up_v4(), up_v4()],
        "only the IPv4 connections reach the proxy"
    );
    assert_eq!(pod.counter("OUTPUT", "captured"), 2);
    assert_eq!(pod.counter("OUTPUT", "skip_ipv6_not_captured"), 1);

    // Inbound: IPv4 through the proxy, IPv6 to the app directly.
    let in4 = format!("{POD_V4}:{APP_PORT}");
    let in6 = format!("[{POD_V6}]:{APP_PORT}");
    assert_in_captured(&from_outside(&pod, &in4), &in4);
    assert_in_direct(&from_outside(&pod, &in6), &in6);
    assert_eq!(pod.counter("PREROUTING", "captured"), 1);
    assert_eq!(pod.counter("PREROUTING", "skip_ipv6_not_captured"), 1);

    // stats' match column and status say why.
    let st = pod.stats();
    let row = stats_rule(&st[0], "OUTPUT", "skip_ipv6_not_captured");
    assert_eq!(
        row["match"], "ip6 (no ip6tables rules: IPv6 not captured)",
        "{row}"
    );
    let status = pod.redirect(&["status"]);
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.contains(
            "IPv6: not captured (the pod's first address is IPv4; --dual-stack captures it)"
        ),
        "{status}"
    );

    // explain says so too, first, for an IPv6 connection.
    let ns = pod.pod_netns();
    let ex = pod.redirect(&[
        "explain",
        "--no-agent",
        "--netns",
        ns.to_str().unwrap(),
        "--uid",
        "1000",
        "--dst",
        &up_v6(),
        "--json",
    ]);
    assert!(ex.status.success(), "{ex:?}");
    let ex: serde_json::Value = serde_json::from_slice(&ex.stdout).unwrap();
    assert_eq!(
        ex["verdict"]["counter"], "OUTPUT/skip_ipv6_not_captured",
        "{ex:#}"
    );
    let decision: Vec<&serde_json::Value> = ex["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["source"] == "decision")
        .collect();
    assert_eq!(decision.len(), 1, "{ex:#}");
    assert_eq!(decision[0]["rule"], "ip6tables", "{ex:#}");
    let ex = pod.redirect(&[
        "explain",
        "--no-agent",
        "--netns",
        ns.to_str().unwrap(),
        "--inbound",
        "--dst",
        &in6,
        "--src",
        UPSTREAM_V6,
        "--json",
    ]);
    assert!(ex.status.success(), "{ex:?}");
    let ex: serde_json::Value = serde_json::from_slice(&ex.stdout).unwrap();
    assert_eq!(
        ex["verdict"]["counter"], "PREROUTING/skip_ipv6_not_captured",
        "{ex:#}"
    );

    // Attached again with --dual-stack: IPv6 is captured from then on.
    let out = pod.attach(&istio(&["--dual-stack"]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!(
            "IPv6: captured (--dual-stack, the pod has IPv6 address {POD_V6})"
        )),
        "{text}"
    );
    assert!(
        lo_addresses(&pod).contains("::6/128"),
        "{}",
        lo_addresses(&pod)
    );
    assert_out_captured(&pod.app_client(&up_v6()), &up_v6());
    assert_eq!(proxied(&mut pod, proxy, "outbound"), vec![up_v6()]);
    assert_in_captured(&from_outside(&pod, &in6), &in6);
    assert_eq!(pod.counter("OUTPUT", "skip_ipv6_not_captured"), 1);
    assert_eq!(pod.counter("PREROUTING", "skip_ipv6_not_captured"), 1);
}

#[test]
fn with_dual_stack_both_families_are_captured_both_ways() {
    let (mut pod, proxy) = pod("dson");
    // Pod::attach adds --dual-stack.
    let out = pod.attach(&istio(&[]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("IPv6: captured (--dual-stack"), "{text}");
    assert!(
        text.contains("--dual-stack"),
        "the istio-iptables line shows it: {text}"
    );
    for dst in [up_v4(), up_v6()] {
        assert_out_captured(&pod.app_client(&dst), &dst);
    }
    assert_eq!(proxied(&mut pod, proxy, "outbound"), vec![up_v4(), up_v6()]);
    for dst in [
        format!("{POD_V4}:{APP_PORT}"),
        format!("[{POD_V6}]:{APP_PORT}"),
    ] {
        assert_in_captured(&from_outside(&pod, &dst), &dst);
    }
    assert_eq!(pod.counter("OUTPUT", "captured"), 2);
    assert_eq!(pod.counter("PREROUTING", "captured"), 2);
    assert_eq!(pod.counter("OUTPUT", "skip_ipv6_not_captured"), 0);
    assert_eq!(pod.counter("PREROUTING", "skip_ipv6_not_captured"), 0);
}

#[test]
fn an_ipv6_only_pod_is_captured_without_dual_stack() {
    let (mut pod, proxy) = pod("ds6");
    pod.topo
        .pod
        .ip(&["addr", "del", &format!("{POD_V4}/24"), "dev", "eth0"])
        .expect("removing the pod's IPv4 address");
    let out = pod.attach(&istio(&["--dual-stack=false"]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("IPv6: captured (first address {POD_V6} is IPv6)")),
        "{text}"
    );
    assert_out_captured(&pod.app_client(&up_v6()), &up_v6());
    assert_eq!(proxied(&mut pod, proxy, "outbound"), vec![up_v6()]);
    let in6 = format!("[{POD_V6}]:{APP_PORT}");
    assert_in_captured(&from_outside(&pod, &in6), &in6);
    assert_eq!(pod.counter("OUTPUT", "skip_ipv6_not_captured"), 0);
    assert_eq!(pod.counter("PREROUTING", "captured"), 1);
}
