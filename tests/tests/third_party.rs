//! The capture path through a real third-party transparent proxy: Debian's
//! haproxy (installed by `cargo xtask setup`), configured the stock way for
//! iptables REDIRECT setups, run as the sidecar identity (uid/gid 1337) in
//! the pod netns and cgroup.
//!
//! Outbound: `server orig 0.0.0.0:0` makes haproxy connect to the client
//! connection's destination, which it reads with getsockname() and then,
//! for IPv4, getsockopt(SOL_IP, SO_ORIGINAL_DST) (haproxy 2.6
//! src/sock_inet.c, sock_inet_get_dst). IPv6 is tested inbound only:
//! haproxy's inet6 family uses plain getsockname() (proto_fam_inet6.get_dst
//! = sock_get_dst) and never asks for IP6T_SO_ORIGINAL_DST, so a REDIRECTed
//! IPv6 connection would be forwarded to [::1]:15001, i.e. to itself — under
//! iptables exactly as under redirect. Inbound needs no original-destination
//! lookup at all (the steered socket keeps the pod address as its local
//! address), so both families work there.
use redirect_tests::*;

/// haproxy as the sidecar: outbound on 15001 (forward to the original
/// destination), inbound on 15006 (forward to the same local address from
/// 127.0.0.6 / ::6, like Envoy's inbound passthrough); the Bookinfo demo
/// runs the same configuration.
const PROXIES: &str = redirect_testbed::haproxy::SIDECAR;

#[test]
fn haproxy_outbound_v4_uses_so_original_dst() {
    let mut pod = Pod::new("hapo");
    pod.start_upstream(8080);
    // istio-init first, then the sidecar, as in a real pod.
    pod.attach_istio_default();
    let haproxy = Haproxy::start(&pod, PROXIES);

    let dst = format!("{UPSTREAM_V4}:8080");
    let r = pod.app_client(&dst);
    assert_ok(
        &r,
        &format!("app -> {dst} through haproxy ({})", haproxy.output()),
    );
    // The app sees the original peer, and its own socket leaves from the
    // pod's address, as under iptables (NAT keeps the source).
    assert_eq!(r.peer.as_deref(), Some(dst.as_str()), "{r:?}");
    let local = r.local.clone().unwrap_or_default();
    assert!(local.starts_with(&format!("{POD_V4}:")), "{r:?}");
    // The upstream saw haproxy's connection from the pod address.
    let banner = r.banner.clone().unwrap_or_default();
    assert!(
        banner.starts_with(&format!("peer={POD_V4}:")) && banner.ends_with(&format!("local={dst}")),
        "upstream greeting {banner:?}"
    );
    assert_ne!(
        banner,
        format!("peer={} local={dst}", r.local.as_deref().unwrap()),
        "the upstream saw the app's own socket"
    );

    let log = haproxy.conns(Some("outbound"), 1);
    assert_eq!(log.len(), 1, "haproxy log: {}", haproxy.output());
    assert!(
        log[0].contains(&format!("dst={dst}")) && log[0].contains(&format!("server={dst}")),
        "haproxy did not use the original destination: {}",
        log[0]
    );
    // haproxy saw the app's connection come from the app's socket, the
    // pod's address, as under iptables.
    assert!(
        log[0].contains(&format!("client={local} ")),
        "haproxy's client is not the app's socket {local}: {}",
        log[0]
    );

    assert_eq!(pod.counter("OUTPUT", "captured"), 1);
    assert_eq!(pod.counter("ORIGINAL_DST", "orig_dst_outbound"), 1);
    assert_eq!(
        pod.counter("OUTPUT", "skip_proxy_uid"),
        1,
        "haproxy's own upstream connection"
    );
    assert_eq!(pod.counter("ORIGINAL_DST", "orig_dst_missing"), 0);
}

#[test]
fn haproxy_inbound_passthrough_v4_v6() {
    let mut pod = Pod::new("hapi");
    pod.start_app_server(9080);
    pod.attach_istio_default();
    let haproxy = Haproxy::start(&pod, PROXIES);

    let upstream = pod.topo.in_upstream();
    for (dst, passthrough) in [
        (format!("{POD_V4}:9080"), "127.0.0.6"),
        (format!("[{POD_V6}]:9080"), "[::6]"),
    ] {
        let r = pod.client(&upstream, &dst, None);
        assert_ok(
            &r,
            &format!("upstream -> {dst} through haproxy ({})", haproxy.output()),
        );
        assert_eq!(r.peer.as_deref(), Some(dst.as_str()), "{r:?}");
        // The app saw haproxy's passthrough connection, on its own address.
        let banner = r.banner.clone().unwrap_or_default();
        assert!(
            banner.starts_with(&format!("peer={passthrough}:"))
                && banner.ends_with(&format!("local={dst}")),
            "app greeting for {dst}: {banner:?}"
        );
    }
    let v4 = haproxy.conns(Some("inbound4"), 1);
    let v6 = haproxy.conns(Some("inbound6"), 1);
    assert_eq!(
        (v4.len(), v6.len()),
        (1, 1),
        "haproxy log: {}",
        haproxy.output()
    );
    assert!(
        v4[0].contains(&format!("server={POD_V4}:9080")),
        "{}",
        v4[0]
    );
    assert!(
        v6[0].contains(&format!("server={POD_V6}:9080")),
        "{}",
        v6[0]
    );

    assert_eq!(pod.counter("PREROUTING", "captured"), 2);
    assert_eq!(pod.counter("OUTPUT", "skip_passthrough_127_0_0_6"), 2);
    assert_eq!(pod.counter("OUTPUT", "captured"), 0);
}

/// haproxy already running when the pod is captured (an agent repairing a
/// pod that started before it): attach must find haproxy's listeners.
#[test]
fn haproxy_running_before_attach() {
    let mut pod = Pod::new("hapb");
    pod.start_upstream(8080);
    pod.start_app_server(9080);
    let haproxy = Haproxy::start(&pod, PROXIES);
    let out = pod.attach_istio_default();
    let out = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.contains("proxy listener found"),
        "attach did not find haproxy's listener: {out}"
    );

    let dst = format!("{UPSTREAM_V4}:8080");
    let r = pod.app_client(&dst);
    assert_ok(&r, &format!("app -> {dst} ({})", haproxy.output()));
    assert!(
        r.banner
            .as_deref()
            .unwrap_or_default()
            .starts_with(&format!("peer={POD_V4}:")),
        "{r:?}"
    );
    assert_eq!(
        haproxy.conns(Some("outbound"), 1).len(),
        1,
        "{}",
        haproxy.output()
    );

    let upstream = pod.topo.in_upstream();
    for (dst, passthrough) in [
        (format!("{POD_V4}:9080"), "127.0.0.6"),
        (format!("[{POD_V6}]:9080"), "[::6]"),
    ] {
        let r = pod.client(&upstream, &dst, None);
        assert_ok(&r, &format!("upstream -> {dst} ({})", haproxy.output()));
        assert!(
            r.banner
                .as_deref()
                .unwrap_or_default()
                .starts_with(&format!("peer={passthrough}:")),
            "inbound {dst} not through haproxy: {r:?}"
        );
    }
    assert_eq!(pod.counter("PREROUTING", "captured"), 2);
    assert_eq!(pod.counter("OUTPUT", "captured"), 1);
    assert_eq!(pod.counter("ORIGINAL_DST", "orig_dst_outbound"), 1);
}
