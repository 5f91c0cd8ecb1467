//! Source fidelity: the same connections under Istio's iptables rules and
//! under redirect, compared as the proxy sees them (the peer and local
//! address of the socket it accepts) and as the app sees them (its
//! getsockname and getpeername), IPv4 and IPv6.
//!
//! Under iptables the route to the original destination picks the source
//! before NAT rewrites the destination, so the proxy sees the app's
//! connection from the pod's address; redirect binds that source in the
//! connect hook. Where they still differ (an app that bound a port but no
//! address; an app bound to 127.0.0.1 dialing out), the test shows how, as
//! docs/design.md says.

use redirect_testbed::kit::ClientReport;
use redirect_tests::{
    run, Placement, Pod, APP_UID, POD_V4, POD_V6, PROXY_UID, UPSTREAM_V4, UPSTREAM_V6,
};
use serde_json::Value;

/// Istio's nat rules (REDIRECT mode, `-u 1337 -i '*' -b '*' -d
/// 15090,15021,15020`) for one family, as `iptables-save` writes them.
fn istio_rules(v6: bool) -> String {
    let (pass, lo) = if v6 {
        ("::6/128", "::1/128")
    } else {
        ("127.0.0.6/32", "127.0.0.1/32")
    };
    let mut s = String::from(
        "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n\
         :ISTIO_INBOUND - [0:0]\n:ISTIO_IN_REDIRECT - [0:0]\n:ISTIO_OUTPUT - [0:0]\n:ISTIO_REDIRECT - [0:0]\n\
         -A PREROUTING -p tcp -j ISTIO_INBOUND\n-A OUTPUT -p tcp -j ISTIO_OUTPUT\n",
    );
    for p in [15008, 22, 15090, 15021, 15020] {
        s.push_str(&format!("-A ISTIO_INBOUND -p tcp --dport {p} -j RETURN\n"));
    }
    s.push_str("-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT\n");
    s.push_str("-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006\n");
    s.push_str(&format!("-A ISTIO_OUTPUT -o lo -s {pass} -j RETURN\n"));
    for (m, id) in [("--uid-owner", 1337), ("--gid-owner", 1337)] {
        s.push_str(&format!(
            "-A ISTIO_OUTPUT -o lo ! -d {lo} -p tcp ! --dport 15008 -m owner {m} {id} -j ISTIO_IN_REDIRECT\n\
             -A ISTIO_OUTPUT -o lo -m owner ! {m} {id} -j RETURN\n\
             -A ISTIO_OUTPUT -m owner {m} {id} -j RETURN\n"
        ));
    }
    s.push_str(&format!("-A ISTIO_OUTPUT -d {lo} -j RETURN\n"));
    s.push_str("-A ISTIO_OUTPUT -j ISTIO_REDIRECT\n");
    s.push_str("-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001\nCOMMIT\n");
    s
}

fn restore(pod: &Pod, v6: bool) {
    use std::io::Write;
    let tool = if v6 {
        "ip6tables-restore"
    } else {
        "iptables-restore"
    };
    let mut c = std::process::Command::new("ip")
        .args(["netns", "exec", &pod.topo.pod.name, tool])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{tool}: {e}"));
    c.stdin
        .take()
        .unwrap()
        .write_all(istio_rules(v6).as_bytes())
        .unwrap();
    let out = c.wait_with_output().unwrap();
    assert!(out.status.success(), "{tool}: {out:?}");
}

/// What one connection looked like from both ends of the proxy hop.
#[derive(Debug, PartialEq)]
struct Seen {
    /// The app's getsockname address (port left out) and getpeername.
    app_local: String,
    app_peer: String,
    /// The proxy's accepted socket: direction, peer address (port left
    /// out), local address, SO_ORIGINAL_DST.
    proxy: Vec<(String, String, String, String)>,
}

fn ip_of(sa: &str) -> String {
    let (ip, _) = sa.rsplit_once(':').unwrap_or((sa, ""));
    ip.trim_start_matches('[').trim_end_matches(']').to_string()
}

/// A pod with upstream echo servers, the app's server on 9080 and the kit
/// proxy, captured the `how` way.
struct Rig {
    pod: Pod,
    proxy: usize,
}

#[derive(Clone, Copy, Debug)]
enum How {
    Iptables,
    Redirect,
}

impl Rig {
    fn new(tag: &str, how: How) -> Rig {
        let mut pod = Pod::new(tag);
        pod.start_upstream(8080);
        pod.start_app_server(9080);
        let proxy = pod.start_proxy();
        match how {
            How::Iptables => {
                restore(&pod, false);
                restore(&pod, true);
                // istio-iptables puts the IPv6 passthrough source on lo.
                pod.topo
                    .pod
                    .ip(&["-6", "addr", "add", "::6/128", "dev", "lo", "nodad"])
                    .unwrap();
            }
            How::Redirect => {
                pod.attach_istio_default();
            }
        }
        Rig { pod, proxy }
    }

    fn connect(&mut self, who: &Placement, dst: &str, bind: Option<&str>) -> (ClientReport, Seen) {
        let r = self.pod.client(who, dst, bind);
        let proxy = self
            .pod
            .proxy_log(self.proxy)
            .into_iter()
            .filter(|l: &Value| l["event"] == "conn")
            .map(|l| {
                (
                    l["dir"].as_str().unwrap().to_string(),
                    ip_of(l["peer"].as_str().unwrap()),
                    l["local"].as_str().unwrap().to_string(),
                    l["orig"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        let seen = Seen {
            app_local: ip_of(r.local.as_deref().unwrap_or_default()),
            app_peer: r.peer.clone().unwrap_or_default(),
            proxy,
        };
        (r, seen)
    }
}

fn app(pod: &Pod) -> Placement {
    pod.topo.in_pod(APP_UID, APP_UID)
}

fn proxy_user(pod: &Pod) -> Placement {
    pod.topo.in_pod(PROXY_UID, PROXY_UID)
}

fn v6(a: &str) -> String {
    format!("[{a}]")
}

#[test]
fn proxy_and_app_see_what_they_see_under_iptables() {
    let mut ipt = Rig::new("srcipt", How::Iptables);
    let mut red = Rig::new("srcred", How::Redirect);
    let cases = [
        // The app dialing out: the proxy sees it from the pod's address.
        (
            "app -> upstream v4",
            false,
            format!("{UPSTREAM_V4}:8080"),
            POD_V4.to_string(),
        ),
        (
            "app -> upstream v6",
            false,
            format!("{}:8080", v6(UPSTREAM_V6)),
            POD_V6.to_string(),
        ),
        // The proxy calling its own pod address: to the inbound port
        // (rule 2), from that address.
        (
            "proxy -> own pod address v4",
            true,
            format!("{POD_V4}:9080"),
            POD_V4.to_string(),
        ),
        (
            "proxy -> own pod address v6",
            true,
            format!("{}:9080", v6(POD_V6)),
            POD_V6.to_string(),
        ),
    ];
    for (what, as_proxy, dst, from) in cases {
        let who = |p: &Pod| if as_proxy { proxy_user(p) } else { app(p) };
        let (ri, si) = ipt.connect(&who(&ipt.pod), &dst, None);
        let (rr, sr) = red.connect(&who(&red.pod), &dst, None);
        assert!(ri.ok && rr.ok, "{what}: {ri:?} {rr:?}");
        assert_eq!(
            sr, si,
            "{what}: redirect (left) and iptables (right) differ"
        );
        // And what both see is the pod's address.
        assert_eq!(si.app_local, from, "{what}: {si:?}");
        assert!(
            si.proxy.iter().any(|(_, peer, _, _)| *peer == from),
            "{what}: {si:?}"
        );
    }
    // The app bound its own address: kept, under both.
    let dst = format!("{UPSTREAM_V4}:8080");
    let (_, si) = ipt.connect(&app(&ipt.pod), &dst, Some(POD_V4));
    let (_, sr) = red.connect(&app(&red.pod), &dst, Some(POD_V4));
    assert_eq!(sr, si, "bound to the pod address");
    assert_eq!(red.pod.counter("ERRORS", "error_source_bind"), 0);
}

/// Differences that remain, shown: an app socket bound to a port but to no
/// address (bind to 0.0.0.0:0 takes a port at once) cannot be bound again,
/// so its loopback destination gives it the loopback source: the proxy
/// sees 127.0.0.1 where iptables shows the pod's address. And an app bound
/// to 127.0.0.1 dialing out is refused by the kernel's routing under
/// iptables (a loopback source off loopback), while redirect, which
/// rewrites the destination first, takes it to the proxy.
#[test]
fn where_the_source_still_differs_from_iptables() {
    let mut ipt = Rig::new("srcdipt", How::Iptables);
    let mut red = Rig::new("srcdred", How::Redirect);
    let dst = format!("{UPSTREAM_V4}:8080");
    // Port bound, address not.
    let (ri, si) = ipt.connect(&app(&ipt.pod), &dst, Some("0.0.0.0"));
    let (rr, sr) = red.connect(&app(&red.pod), &dst, Some("0.0.0.0"));
    assert!(ri.ok && rr.ok, "{ri:?} {rr:?}");
    assert_eq!(si.app_local, POD_V4, "iptables: {si:?}");
    assert_eq!(si.proxy[0].1, POD_V4, "iptables: {si:?}");
    assert_eq!(sr.app_local, "127.0.0.1", "redirect: {sr:?}");
    assert_eq!(sr.proxy[0].1, "127.0.0.1", "redirect: {sr:?}");
    assert_eq!(sr.app_peer, si.app_peer);
    assert_eq!(sr.proxy[0].3, si.proxy[0].3, "SO_ORIGINAL_DST is the same");
    // Bound to 127.0.0.1.
    let (ri, _) = ipt.connect(&app(&ipt.pod), &dst, Some("127.0.0.1"));
    let (rr, sr) = red.connect(&app(&red.pod), &dst, Some("127.0.0.1"));
    assert!(!ri.ok, "iptables: {ri:?}");
    assert!(rr.ok, "redirect: {rr:?}");
    assert_eq!(sr.proxy[0].1, "127.0.0.1");
    // The iptables pod really ran iptables (its counters moved).
    let save = run(
        "ip",
        &[
            "netns",
            "exec",
            &ipt.pod.topo.pod.name,
            "iptables-save",
            "-c",
            "-t",
            "nat",
        ],
    )
    .unwrap();
    assert!(
        save.lines()
            .any(|l| l.contains("REDIRECT --to-ports 15001") && !l.starts_with("[0:0]")),
        "{save}"
    );
}
