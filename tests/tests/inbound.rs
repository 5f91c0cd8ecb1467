//! Inbound capture (PREROUTING → ISTIO_INBOUND → REDIRECT 15006), end to
//! end: a client in the upstream netns → pod IP:port over veth → the
//! sidecar proxy (uid 1337) on 15006 → the app, reached by the proxy from
//! 127.0.0.6 / ::6 as Envoy does. Every inbound flag, IPv4 and IPv6, the
//! proxy's lifecycle (absent, late, restarted), loopback inside the pod, an
//! unmanaged netns, haproxy as the inbound proxy, and `redirect validate`.
//! No iptables rule anywhere; every client runs in a namespace the test
//! created.
use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpStream},
    process::Command,
    time::{Duration, Instant},
};

use redirect_testbed::kit::ClientReport;
use redirect_tests::*;
use redirect_userspace::sys::Netns;

const APP_PORT: u16 = 9080;

fn v4(port: u16) -> String {
    format!("{POD_V4}:{port}")
}

fn v6(port: u16) -> String {
    format!("[{POD_V6}]:{port}")
}

/// One connection from the upstream netns (outside the pod).
fn from_outside(pod: &Pod, dst: &str) -> ClientReport {
    pod.client(&pod.topo.in_upstream(), dst, None)
}

/// The `peer=` part of the app's greeting: who the app saw.
fn app_saw(r: &ClientReport) -> String {
    let b = r.banner.as_deref().unwrap_or_default();
    b.split_whitespace()
        .find_map(|w| w.strip_prefix("peer="))
        .unwrap_or_default()
        .to_string()
}

/// The client went through the proxy: the app saw the passthrough source.
fn assert_via_proxy(r: &ClientReport, dst: &str) {
    assert_ok(r, dst);
    let peer = app_saw(r);
    let want = if dst.starts_with('[') {
        "[::6]:"
    } else {
        "127.0.0.6:"
    };
    assert!(
        peer.starts_with(want),
        "{dst}: app should see the proxy's {want}*, saw {peer} ({r:?})"
    );
    let local = r.banner.as_deref().unwrap_or_default();
    assert!(
        local.ends_with(&format!("local={dst}")),
        "{dst}: app's local address should be the original destination: {r:?}"
    );
}

/// The client reached the app directly: the app saw the client itself.
fn assert_direct(r: &ClientReport, dst: &str) {
    assert_ok(r, dst);
    let peer = app_saw(r);
    assert_eq!(
        Some(peer.as_str()),
        r.local.as_deref(),
        "{dst}: app should see the client's own address: {r:?}"
    );
}

fn assert_refused(r: &ClientReport, dst: &str) {
    assert!(!r.ok, "{dst} should be refused: {r:?}");
    let e = r.error.as_deref().unwrap_or_default();
    assert!(
        e.contains("refused"),
        "{dst} should be refused (as REDIRECT to a closed 15006), got {e:?}"
    );
}

/// Inbound connections the proxy logged: (peer, orig).
fn inbound_conns(log: &[serde_json::Value]) -> Vec<(String, String)> {
    log.iter()
        .filter(|l| l["event"] == "conn" && l["dir"] == "inbound")
        .map(|l| {
            (
                l["peer"].as_str().unwrap().to_string(),
                l["orig"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// No nat/filter rule in any of these namespaces, iptables or nftables.
fn assert_no_rules(namespaces: &[&str]) {
    for ns in namespaces {
        for tool in ["iptables-save", "ip6tables-save"] {
            let out = run("ip", &["netns", "exec", ns, tool]).unwrap_or_default();
            assert!(
                !out.lines().any(|l| l.starts_with("-A ")),
                "{tool} in {ns} shows rules: {out}"
            );
        }
        let nft = run("ip", &["netns", "exec", ns, "nft", "list", "ruleset"]).unwrap_or_default();
        assert!(
            !nft.contains("redirect") && !nft.contains("dnat") && !nft.contains("tproxy"),
            "nft ruleset in {ns}: {nft}"
        );
    }
}

/// Wait until the sockops listen hook has registered `n` listeners in all
/// (the proxy's v4 and v6 sockets on 15006 count one each).
fn wait_for_registered(pod: &Pod, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let have = pod.counter("PREROUTING", "listener_registered");
        if have >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "only {have} of {n} inbound listeners registered"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn redirect_ok(out: &std::process::Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn inbound_reaches_app_through_proxy_v4_v6() {
    let mut pod = Pod::new("inb");
    pod.start_app_server(APP_PORT);
    let proxy = pod.start_proxy();
    // The proxy listens before attach: attach finds and registers it.
    let out = pod.attach_istio_default();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("proxy listener found"),
        "{out:?}"
    );
    let mut clients = Vec::new();
    for dst in [v4(APP_PORT), v6(APP_PORT)] {
        let r = from_outside(&pod, &dst);
        assert_via_proxy(&r, &dst);
        // The client itself still talks to the pod IP:port.
        assert_eq!(r.peer.as_deref(), Some(dst.as_str()));
        clients.push((r.local.clone().unwrap(), dst));
    }
    // The proxy saw the real client and got the original destination.
    let conns = inbound_conns(&pod.proxy_log(proxy));
    assert_eq!(conns, clients, "proxy's (peer, orig) per connection");
    assert_eq!(pod.counter("PREROUTING", "captured"), 2);
    assert_eq!(pod.counter("ORIGINAL_DST", "orig_dst_inbound"), 2);
    assert_eq!(pod.counter("OUTPUT", "skip_passthrough_127_0_0_6"), 2);
    assert_eq!(pod.counter("PREROUTING", "no_listener"), 0);
    assert_no_rules(&[&pod.topo.pod.name, &pod.topo.upstream.name]);
}

/// While a connection is open, the proxy's accepted socket (uid 1337) has
/// the original local address and the real client as peer: no NAT.
#[test]
fn proxy_socket_keeps_original_addresses() {
    let mut pod = Pod::new("inbss");
    pod.start_app_server(APP_PORT);
    pod.start_proxy();
    pod.attach_istio_default();
    let upstream = Netns::open(&pod.topo.upstream.path()).unwrap();
    for dst in [v4(APP_PORT), v6(APP_PORT)] {
        let addr: SocketAddr = dst.parse().unwrap();
        // A socket made inside the upstream netns: the client is outside the pod.
        let s = upstream
            .run(move || TcpStream::connect_timeout(&addr, Duration::from_secs(2)))
            .unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut greeting = String::new();
        BufReader::new(&s).read_line(&mut greeting).unwrap();
        let client = s.local_addr().unwrap().to_string();
        assert!(
            greeting.starts_with("peer=127.0.0.6:") || greeting.starts_with("peer=[::6]:"),
            "{greeting}"
        );
        let ss = run(
            "ip",
            &[
                "netns",
                "exec",
                &pod.topo.pod.name,
                "ss",
                "-Htne",
                "state",
                "established",
            ],
        )
        .unwrap();
        let proxy_side: Vec<&str> = ss
            .lines()
            .filter(|l| l.contains(&format!(" {client} ")))
            .collect();
        assert_eq!(
            proxy_side.len(),
            1,
            "one accepted socket with peer {client}: {ss}"
        );
        let fields: Vec<&str> = proxy_side[0].split_whitespace().collect();
        assert_eq!(
            fields[2], dst,
            "local address of the proxy's accepted socket: {ss}"
        );
        assert!(
            proxy_side[0].contains("uid:1337"),
            "accepted by the proxy (uid 1337): {ss}"
        );
        (&s).write_all(b"x").unwrap();
        drop(s);
    }
}

#[test]
fn include_all_honours_exclusions_tunnel_and_istio_defaults() {
    let mut pod = Pod::new("inball");
    let direct = [9090, 15008, 15090, 15021, 15020];
    for p in std::iter::once(APP_PORT).chain(direct) {
        pod.start_app_server(p);
    }
    let proxy = pod.start_proxy();
    pod.attach(&[
        "-p",
        "15001",
        "-z",
        "15006",
        "-u",
        "1337",
        "-m",
        "REDIRECT",
        "-i",
        "*",
        "-b",
        "*",
        "-d",
        "15090,15021,15020,9090",
    ]);
    for dst in [v4(APP_PORT), v6(APP_PORT)] {
        assert_via_proxy(&from_outside(&pod, &dst), &dst);
    }
    for p in direct {
        for dst in [v4(p), v6(p)] {
            assert_direct(&from_outside(&pod, &dst), &dst);
        }
    }
    assert_eq!(inbound_conns(&pod.proxy_log(proxy)).len(), 2);
    assert_eq!(pod.counter("PREROUTING", "captured"), 2);
    assert_eq!(pod.counter("PREROUTING", "skip_excluded_port"), 8);
    assert_eq!(pod.counter("PREROUTING", "skip_tunnel_port"), 2);
    assert_eq!(pod.counter("PREROUTING", "skip_not_included"), 0);
}

#[test]
fn ssh_port_is_captured_like_any_other_unless_excluded() {
    // Regression (found by the differential test, seed 7): istio-iptables
    // stopped sparing port 22 with `-b '*'` in Istio 1.13; only -d spares
    // it now.
    let mut pod = Pod::new("inbssh");
    // The app (uid 1000) serves port 22 in its own netns.
    run(
        "ip",
        &[
            "netns",
            "exec",
            &pod.topo.pod.name,
            "sysctl",
            "-q",
            "-w",
            "net.ipv4.ip_unprivileged_port_start=0",
        ],
    )
    .expect("sysctl in the pod");
    pod.start_app_server(22);
    let proxy = pod.start_proxy();
    pod.attach_istio_default();
    for dst in [v4(22), v6(22)] {
        assert_via_proxy(&from_outside(&pod, &dst), &dst);
    }
    assert_eq!(inbound_conns(&pod.proxy_log(proxy)).len(), 2);
    assert_eq!(pod.counter("PREROUTING", "captured"), 2);
    assert_eq!(pod.counter("PREROUTING", "skip_excluded_port"), 0);
    // Excluded by -d, as Istio's VM setup does.
    pod.attach(&[
        "-u",
        "1337",
        "-i",
        "*",
        "-b",
        "*",
        "-d",
        "22,15090,15021,15020",
    ]);
    for dst in [v4(22), v6(22)] {
        assert_direct(&from_outside(&pod, &dst), &dst);
    }
    assert_eq!(pod.counter("PREROUTING", "skip_excluded_port"), 2);
    assert_eq!(pod.counter("PREROUTING", "captured"), 2);
}

#[test]
fn custom_tunnel_port() {
    let mut pod = Pod::new("inbtun");
    pod.start_app_server(16008);
    pod.start_app_server(15008);
    pod.start_proxy();
    pod.attach(&["-u", "1337", "-b", "*", "-e", "16008"]);
    for dst in [v4(16008), v6(16008)] {
        assert_direct(&from_outside(&pod, &dst), &dst);
    }
    // 15008 is an ordinary port now.
    for dst in [v4(15008), v6(15008)] {
        assert_via_proxy(&from_outside(&pod, &dst), &dst);
    }
    assert_eq!(pod.counter("PREROUTING", "skip_tunnel_port"), 2);
    assert_eq!(pod.counter("PREROUTING", "captured"), 2);
}

#[test]
fn include_list_captures_only_listed_ports() {
    let mut pod = Pod::new("inblist");
    for p in [APP_PORT, 9443, 9090, 15008] {
        pod.start_app_server(p);
    }
    let proxy = pod.start_proxy();
    // The tunnel port is never captured, even when listed.
    pod.attach(&["-u", "1337", "-b", "9080,9443,15008"]);
    for p in [APP_PORT, 9443] {
        for dst in [v4(p), v6(p)] {
            assert_via_proxy(&from_outside(&pod, &dst), &dst);
        }
    }
    for dst in [v4(9090), v6(9090)] {
        assert_direct(&from_outside(&pod, &dst), &dst);
    }
    for dst in [v4(15008), v6(15008)] {
        assert_direct(&from_outside(&pod, &dst), &dst);
    }
    let origs: Vec<String> = inbound_conns(&pod.proxy_log(proxy))
        .into_iter()
        .map(|(_, o)| o)
        .collect();
    assert_eq!(origs, vec![v4(APP_PORT), v6(APP_PORT), v4(9443), v6(9443)]);
    assert_eq!(pod.counter("PREROUTING", "captured"), 4);
    assert_eq!(pod.counter("PREROUTING", "skip_not_included"), 2);
    assert_eq!(pod.counter("PREROUTING", "skip_tunnel_port"), 2);
}

#[test]
fn include_none_captures_nothing() {
    let mut pod = Pod::new("inbnone");
    pod.start_app_server(APP_PORT);
    pod.start_app_server(16006);
    let proxy = pod.start_proxy();
    pod.attach(&["-u", "1337", "-i", "*", "-b", ""]);
    for dst in [v4(APP_PORT), v6(APP_PORT), v4(16006), v6(16006)] {
        assert_direct(&from_outside(&pod, &dst), &dst);
    }
    assert!(inbound_conns(&pod.proxy_log(proxy)).is_empty());
    assert_eq!(pod.counter("PREROUTING", "captured"), 0);
    assert_eq!(pod.counter("PREROUTING", "skip_not_included"), 4);
}

/// "-o lo" traffic never goes through PREROUTING: app → its own pod IP,
/// app → 127.0.0.1 / ::1 stay direct, even with -b '*'.
#[test]
fn loopback_inside_pod_is_not_captured() {
    let mut pod = Pod::new("inblo");
    pod.start_app_server(APP_PORT);
    let proxy = pod.start_proxy();
    pod.attach_istio_default();
    for dst in [
        v4(APP_PORT),
        v6(APP_PORT),
        format!("127.0.0.1:{APP_PORT}"),
        format!("[::1]:{APP_PORT}"),
    ] {
        let r = pod.app_client(&dst);
        assert_direct(&r, &dst);
    }
    assert!(inbound_conns(&pod.proxy_log(proxy)).is_empty());
    for rule in [
        "captured",
        "no_listener",
        "skip_excluded_port",
        "skip_not_included",
        "skip_tunnel_port",
    ] {
        assert_eq!(pod.counter("PREROUTING", rule), 0, "PREROUTING {rule}");
    }
    // And from outside the same port is captured.
    assert_via_proxy(&from_outside(&pod, &v4(APP_PORT)), &v4(APP_PORT));
    assert_eq!(pod.counter("PREROUTING", "captured"), 1);
}

/// No proxy: refused at once and counted (iptables REDIRECT to a closed
/// 15006). A proxy started after attach is picked up; a restarted one
/// (new listener socket) too.
#[test]
fn proxy_absent_late_and_restarted() {
    let mut pod = Pod::new("inbrst");
    pod.start_app_server(APP_PORT);
    pod.attach_istio_default();
    for dst in [v4(APP_PORT), v6(APP_PORT)] {
        let t = Instant::now();
        let r = from_outside(&pod, &dst);
        assert_refused(&r, &dst);
        assert!(
            t.elapsed() < Duration::from_millis(1500),
            "refusal took {:?}",
            t.elapsed()
        );
    }
    assert_eq!(pod.counter("PREROUTING", "no_listener"), 2);

    let first = pod.start_proxy();
    assert_eq!(pod.counter("PREROUTING", "listener_registered"), 2);
    for dst in [v4(APP_PORT), v6(APP_PORT)] {
        assert_via_proxy(&from_outside(&pod, &dst), &dst);
    }
    assert_eq!(inbound_conns(&pod.proxy_log(first)).len(), 2);

    // Proxy dies: its listeners leave the map, connections are refused.
    drop(pod.children.remove(first));
    for dst in [v4(APP_PORT), v6(APP_PORT)] {
        assert_refused(&from_outside(&pod, &dst), &dst);
    }
    assert_eq!(pod.counter("PREROUTING", "no_listener"), 4);

    // A new proxy process, new listener sockets.
    let second = pod.start_proxy();
    for dst in [v4(APP_PORT), v6(APP_PORT)] {
        assert_via_proxy(&from_outside(&pod, &dst), &dst);
    }
    assert_eq!(inbound_conns(&pod.proxy_log(second)).len(), 2);
    assert_eq!(pod.counter("PREROUTING", "listener_registered"), 4);
    assert_eq!(pod.counter("PREROUTING", "captured"), 4);
    assert_no_rules(&[&pod.topo.pod.name]);
}

/// A second netns on the same host, with processes even inside the
/// attached cgroup, keeps plain kernel behaviour.
#[test]
fn unmanaged_netns_is_untouched() {
    let mut pod = Pod::new("inbman");
    pod.start_app_server(APP_PORT);
    let proxy = pod.start_proxy();
    pod.attach_istio_default();
    let other = Topology::new("inbunm").unwrap();
    let in_attached_cgroup = |uid: u32| Placement {
        netns: Some(other.pod.path()),
        cgroup: Some(pod.topo.cgroup.path.clone()),
        uid: Some(uid),
        gid: Some(uid),
    };
    let mut guards = Vec::new();
    let mut echo = Command::new(kit_bin());
    echo.args([
        "echo",
        "--listen",
        &format!("0.0.0.0:{APP_PORT}"),
        "--listen",
        &format!("[::]:{APP_PORT}"),
    ]);
    guards.push(ChildGuard::spawn("other app", echo, &in_attached_cgroup(APP_UID), true).unwrap());
    let mut other_proxy = Command::new(kit_bin());
    other_proxy.arg("proxy");
    guards.push(
        ChildGuard::spawn(
            "other proxy",
            other_proxy,
            &in_attached_cgroup(PROXY_UID),
            true,
        )
        .unwrap(),
    );

    for dst in [v4(APP_PORT), v6(APP_PORT)] {
        let r = pod.client(&other.in_upstream(), &dst, None);
        assert_direct(&r, &dst);
    }
    std::thread::sleep(Duration::from_millis(50));
    assert!(
        guards[1].take_lines().is_empty(),
        "the unmanaged netns' proxy got connections"
    );
    assert!(inbound_conns(&pod.proxy_log(proxy)).is_empty());
    // Nothing of it reached the managed pod's counters or listener map.
    assert_eq!(pod.counter("PREROUTING", "listener_registered"), 0);
    assert_eq!(pod.counter("PREROUTING", "captured"), 0);
    let st = pod.redirect(&["status", "--json"]);
    let st: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
    assert_eq!(st["pods"].as_array().unwrap().len(), 1);
    // The managed pod still captures.
    assert_via_proxy(&from_outside(&pod, &v4(APP_PORT)), &v4(APP_PORT));
    assert_no_rules(&[&other.pod.name, &other.upstream.name, &pod.topo.pod.name]);
    drop(guards);
}

/// haproxy (Debian's package) in place of Envoy: listens on 15006 as uid
/// 1337, forwards to the original destination (`server 0.0.0.0:0`, which
/// haproxy resolves with SO_ORIGINAL_DST / getsockname) from 127.0.0.6 / ::6.
/// One listener per family, as the kit proxy and Envoy do.
const HAPROXY_PER_FAMILY: &str = "frontend in4\n  bind 0.0.0.0:15006\n  default_backend app4\n\
     frontend in6\n  bind :::15006 v6only\n  default_backend app6\n\
     backend app4\n  source 127.0.0.6\n  server app 0.0.0.0:0\n\
     backend app6\n  source [::6]\n  server app 0.0.0.0:0\n";
/// One dual-stack [::]:15006 listener for both families (IPv4 clients
/// arrive v4-mapped), as Envoy's `ipv4_compat` listener.
const HAPROXY_DUAL_STACK: &str = "frontend in\n  bind :::15006 v4v6\n\
     \x20 use_backend app4 if { dst 0.0.0.0/0 }\n  default_backend app6\n\
     backend app4\n  source ::ffff:127.0.0.6:0\n  server app 0.0.0.0:0\n\
     backend app6\n  source [::6]\n  server app 0.0.0.0:0\n";

#[test]
fn haproxy_as_inbound_proxy_v4_v6() {
    let mut pod = Pod::new("inbhap");
    pod.start_app_server(APP_PORT);
    pod.attach_istio_default();
    // Started after attach: the listen hook registers its sockets.
    let hap = Haproxy::start(&pod, HAPROXY_PER_FAMILY);
    wait_for_registered(&pod, 2);
    let mut want = Vec::new();
    for dst in [v4(APP_PORT), v6(APP_PORT)] {
        let r = from_outside(&pod, &dst);
        assert_via_proxy(&r, &dst);
        want.push(format!(
            "client={} dst={dst}",
            r.local.clone().unwrap().replace(['[', ']'], "")
        ));
    }
    let log = hap.conns(None, 2);
    assert_eq!(log.len(), 2, "haproxy log: {log:?}");
    for (line, w) in log.iter().zip(&want) {
        // haproxy prints v6 addresses bare: client=fd00:200::1:port.
        let w = w.replace(['[', ']'], "");
        assert!(
            line.contains(&format!(" {w} ")),
            "haproxy saw {line:?}, want {w:?}"
        );
    }
    assert!(
        log[0].contains("src=127.0.0.6:") && log[1].contains("src=::6:"),
        "{log:?}"
    );
    assert_eq!(pod.counter("PREROUTING", "captured"), 2);
    assert!(
        pod.counter("ORIGINAL_DST", "orig_dst_inbound") >= 1,
        "haproxy asks SO_ORIGINAL_DST for IPv4"
    );
    assert_no_rules(&[&pod.topo.pod.name]);
    // haproxy gone: its listeners leave the map, as after a crash.
    drop(hap);
    assert_refused(&from_outside(&pod, &v4(APP_PORT)), &v4(APP_PORT));
    assert_eq!(pod.counter("PREROUTING", "no_listener"), 1);
}

#[test]
fn validate_passes_before_the_proxy_starts() {
    let mut pod = Pod::new("inbval");
    pod.start_app_server(APP_PORT);
    pod.attach_istio_default();
    let ns = pod.pod_netns();
    let cg = pod.topo.cgroup.path.clone();
    let args = [
        "validate",
        "--netns",
        ns.to_str().unwrap(),
        "--cgroup",
        cg.to_str().unwrap(),
    ];
    let out = redirect_ok(&pod.redirect(&args), "validate");
    assert_eq!(out.lines().count(), 1, "one line: {out}");
    assert!(out.starts_with("validation ok: "), "{out}");
    for want in [
        "127.0.0.6:15002",
        "[::6]:15002",
        "127.0.0.1:15006",
        "[::1]:15006",
        "uid 1337",
        "inbound from outside",
        &v4(80),
        &v6(80),
    ] {
        assert!(out.contains(want), "summary lacks {want}: {out}");
    }
    assert_eq!(pod.counter("OUTPUT", "proxy_to_self_inbound"), 2);
    assert_eq!(pod.counter("ORIGINAL_DST", "orig_dst_outbound"), 2);
    // Its listeners are gone (refused, as with no proxy)...
    assert_refused(&from_outside(&pod, &v4(APP_PORT)), &v4(APP_PORT));
    assert_eq!(pod.counter("PREROUTING", "no_listener"), 1);
    // ...and the real proxy takes over.
    let proxy = pod.start_proxy();
    for dst in [v4(APP_PORT), v6(APP_PORT)] {
        assert_via_proxy(&from_outside(&pod, &dst), &dst);
    }
    assert_eq!(inbound_conns(&pod.proxy_log(proxy)).len(), 2);

    // With the proxy holding its ports, validation cannot run (as Istio's).
    let out = pod.redirect(&args);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("already in use") && err.contains("15001"),
        "{err}"
    );
    // ...and it did not disturb the proxy.
    assert_via_proxy(&from_outside(&pod, &v4(APP_PORT)), &v4(APP_PORT));
}

#[test]
fn validate_fails_with_a_clear_reason() {
    let pod = Pod::new("inbvalf");
    let ns = pod.pod_netns();
    let cg = pod.topo.cgroup.path.clone();
    let validate = |pod: &Pod, ns: &std::path::Path, cg: &std::path::Path| {
        let out = pod.redirect(&[
            "validate",
            "--netns",
            ns.to_str().unwrap(),
            "--cgroup",
            cg.to_str().unwrap(),
            "--timeout-ms",
            "1000",
        ]);
        assert!(!out.status.success(), "validate should fail: {out:?}");
        assert!(
            out.stdout.is_empty()
                || !String::from_utf8_lossy(&out.stdout).contains("validation ok")
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    // Nothing installed.
    assert!(validate(&pod, &ns, &cg).contains("nothing is installed"));
    // Excluding the probe port (-o 15002) breaks rule 2 for it.
    pod.attach(&["-u", "1337", "-i", "*", "-b", "*", "-o", "15002"]);
    let err = validate(&pod, &ns, &cg);
    assert!(
        err.contains("127.0.0.6:15002") && err.contains("not sent to the inbound port"),
        "{err}"
    );
    // Probe from a cgroup without the hooks.
    let other = Topology::new("inbvalo").unwrap();
    let err = validate(&pod, &ns, &other.cgroup.path);
    assert!(err.contains("not attached to cgroup"), "{err}");
    // An uncaptured netns.
    let err = validate(&pod, &other.pod.path(), &cg);
    assert!(err.contains("is not captured"), "{err}");
    // After detach, the pod is not captured either.
    redirect_ok(
        &pod.redirect(&["detach", "--netns", ns.to_str().unwrap()]),
        "detach",
    );
    assert!(validate(&pod, &ns, &cg).contains("is not captured"));
}

#[test]
fn haproxy_dual_stack_listener_serves_both_families() {
    let mut pod = Pod::new("inbhds");
    pod.start_app_server(APP_PORT);
    pod.attach_istio_default();
    let hap = Haproxy::start(&pod, HAPROXY_DUAL_STACK);
    // One socket, registered under IPv6, steers IPv4 too.
    wait_for_registered(&pod, 1);
    let mut want = Vec::new();
    for (dst, mapped) in [(v4(APP_PORT), "::ffff:"), (v6(APP_PORT), "")] {
        let r = from_outside(&pod, &dst);
        assert_via_proxy(&r, &dst);
        want.push(
            format!(
                "client={mapped}{} dst={mapped}{dst}",
                r.local.clone().unwrap()
            )
            .replace(['[', ']'], ""),
        );
    }
    let log = hap.conns(None, 2);
    assert_eq!(log.len(), 2, "haproxy log: {log:?}");
    for (line, w) in log.iter().zip(&want) {
        assert!(
            line.contains(&format!(" {w} ")),
            "haproxy saw {line:?}, want {w:?}"
        );
    }
    assert_eq!(pod.counter("PREROUTING", "listener_registered"), 1);
    assert_eq!(pod.counter("PREROUTING", "captured"), 2);
    assert_eq!(pod.counter("PREROUTING", "no_listener"), 0);
}

/// Inbound follows the pod's current config: re-attach with other flags
/// applies at once; detach leaves plain kernel delivery.
#[test]
fn reattach_and_detach_change_inbound_at_once() {
    let mut pod = Pod::new("inbre");
    pod.start_app_server(APP_PORT);
    pod.start_proxy();
    pod.attach_istio_default();
    assert_via_proxy(&from_outside(&pod, &v6(APP_PORT)), &v6(APP_PORT));
    pod.attach(&["-u", "1337", "-i", "*", "-b", "*", "-d", "9080"]);
    assert_direct(&from_outside(&pod, &v6(APP_PORT)), &v6(APP_PORT));
    pod.attach(&["-u", "1337", "-i", "*", "-b", "9080"]);
    assert_via_proxy(&from_outside(&pod, &v4(APP_PORT)), &v4(APP_PORT));
    let ns = pod.pod_netns();
    redirect_ok(
        &pod.redirect(&["detach", "--netns", ns.to_str().unwrap()]),
        "detach",
    );
    for dst in [v4(APP_PORT), v6(APP_PORT)] {
        assert_direct(&from_outside(&pod, &dst), &dst);
    }
}
