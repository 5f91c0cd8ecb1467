//! Parity with Istio's iptables rules, case by case: the same pod, proxy,
//! servers and client, once under the nat rules istio-init writes (Istio's
//! injected flags: `-p 15001 -z 15006 -u 1337 -m REDIRECT -i '*' -b '*'
//! -d 15090,15021,15020`, loaded with iptables-restore and
//! ip6tables-restore in the pod netns) and once under `redirect attach`
//! with the same flags. What every side saw (the client, the server that
//! answered, the kit proxy's log) must be the same, and what iptables does.
//!
//! The cases are ones a hostile review found different:
//! - an app connecting to the unspecified address (`0.0.0.0:<port>`,
//!   `[::]:<port>`), which the kernel sends to this host: under iptables
//!   it leaves through lo and reaches the local app directly;
//! - an MPTCP socket: captured, and its `getpeername` shows the peer it
//!   dialed;
//! - an inbound IPv6 SYN whose source is one of the pod's own addresses
//!   (IPv6 does not drop it as a martian): PREROUTING steers it to the
//!   inbound port.
//!
//! All traffic stays inside the namespaces the test created.
use std::{
    io::Write,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use redirect_testbed::{kit::ClientReport, sandbox::run_placed};
use redirect_tests::*;

const APP_PORT: u16 = 9080;
const UP_PORT: u16 = 8080;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Capture {
    /// istio-init's nat table, in the pod netns.
    Iptables,
    /// `redirect attach` with the same flags.
    Redirect,
}

const BOTH: [Capture; 2] = [Capture::Iptables, Capture::Redirect];

/// Istio's nat rules for one family: the testbed's IPv4 table, and the
/// same rules for IPv6 as istio-iptables writes them (::6 and ::1 for
/// 127.0.0.6 and 127.0.0.1).
fn istio_rules(v6: bool) -> String {
    let v4 = redirect_testbed::bench::runner::istio_nat_rules(&[]);
    if !v6 {
        return v4;
    }
    v4.replace("127.0.0.6/32", "::6/128")
        .replace("127.0.0.1/32", "::1/128")
}

/// Load istio-init's rules into the pod netns (and `::6` on lo, which
/// istio-iptables adds for the proxy's IPv6 inbound passthrough).
fn load_iptables(pod: &Pod) {
    for (tool, v6) in [("iptables-restore", false), ("ip6tables-restore", true)] {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &pod.topo.pod.name, tool])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{tool}: {e}"));
        child
            .stdin
            .take()
            .unwrap()
            .write_all(istio_rules(v6).as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{tool} in {}: {}",
            pod.topo.pod.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    pod.topo
        .pod
        .ip(&["-6", "addr", "add", "::6/128", "dev", "lo", "nodad"])
        .expect("::6 on lo");
}

/// A pod with the upstream echo server (every address, `UP_PORT`), the
/// app's own echo server (`APP_PORT`) and the kit proxy as 1337, captured
/// as `how`. `prepare` runs first (addresses, routes).
fn pod_under(tag: &str, how: Capture, prepare: impl FnOnce(&Pod)) -> (Pod, usize) {
    let mut pod = Pod::new(tag);
    prepare(&pod);
    pod.start_upstream(UP_PORT);
    pod.start_app_server(APP_PORT);
    let proxy = pod.start_proxy();
    match how {
        Capture::Iptables => load_iptables(&pod),
        Capture::Redirect => {
            pod.attach_istio_default();
        }
    }
    (pod, proxy)
}

/// The proxy's connections since the last call: (direction, original
/// destination).
fn proxied(pod: &mut Pod, proxy: usize) -> Vec<(String, String)> {
    pod.proxy_log(proxy)
        .iter()
        .filter(|l| l["event"] == "conn" || l["event"] == "error")
        .map(|l| {
            (
                l["dir"].as_str().unwrap_or_default().to_string(),
                l["orig"]
                    .as_str()
                    .or(l["error"].as_str())
                    .unwrap_or_default()
                    .to_string(),
            )
        })
        .collect()
}

/// The address the answering server saw the connection from (the IP of
/// `peer=` in its greeting), and where it was reached (`local=`).
fn greeting(banner: Option<&str>) -> (String, String) {
    let b = banner.unwrap_or_default();
    let field = |k: &str| {
        b.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .unwrap_or_default()
            .to_string()
    };
    let peer = field("peer=");
    let ip = peer
        .parse::<std::net::SocketAddr>()
        .map(|a| a.ip().to_string())
        .unwrap_or(peer);
    (ip, field("local="))
}

/// What one connection looked like from every side.
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    ok: bool,
    /// The client's getpeername.
    peer: Option<String>,
    /// The answering server: (source IP it saw, its local address).
    server: (String, String),
    /// The proxy's log for it: (direction, original destination).
    proxied: Vec<(String, String)>,
}

/// Run `case` under both captures; the two must see the same. Returns
/// what they saw.
fn same_under_both(what: &str, case: impl Fn(Capture) -> Seen) -> Seen {
    let seen: Vec<Seen> = BOTH.iter().map(|&how| case(how)).collect();
    assert_eq!(
        seen[0], seen[1],
        "{what}: under iptables (left) and under redirect (right)"
    );
    seen.into_iter().next().unwrap()
}

// ------------------------------------------------- the unspecified address

/// `connect(0.0.0.0:9080)` / `connect([::]:9080)` by the app: the kernel
/// connects to 127.0.0.1 / ::1, out through lo; iptables' rule "-o lo !
/// --uid-owner 1337 -j RETURN" leaves it alone: the app's own server
/// answers, the proxy sees nothing.
#[test]
fn app_to_the_unspecified_address_reaches_the_local_app_directly() {
    for (dst, lo) in [
        (format!("0.0.0.0:{APP_PORT}"), "127.0.0.1"),
        (format!("[::]:{APP_PORT}"), "::1"),
    ] {
        let seen = same_under_both(&dst, |how| {
            let (mut pod, proxy) = pod_under("parany", how, |_| {});
            let _ = proxied(&mut pod, proxy);
            let r = pod.app_client(&dst);
            Seen {
                ok: r.ok,
                peer: r.peer.clone(),
                server: greeting(r.banner.as_deref()),
                proxied: proxied(&mut pod, proxy),
            }
        });
        let local = std::net::SocketAddr::new(lo.parse().unwrap(), APP_PORT).to_string();
        assert_eq!(
            seen,
            Seen {
                ok: true,
                peer: Some(local.clone()),
                server: (lo.to_string(), local),
                proxied: vec![],
            },
            "{dst}"
        );
    }
}

// ------------------------------------------------------------------ MPTCP

/// The app's MPTCP client (IPPROTO_MPTCP; the kernel falls back to TCP
/// when the peer does not speak MPTCP): connect, read the greeting, send
/// and check the echo, report getpeername. One JSON line, as the kit
/// client's.
const MPTCP_CLIENT: &str = r#"
import json, socket, sys
host, port = sys.argv[1], int(sys.argv[2])
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
rep = {"ok": False, "error": None, "peer": None, "local": None, "banner": None, "echoed": False}
try:
    s = socket.socket(fam, socket.SOCK_STREAM, 262)
    s.settimeout(5)
    s.connect((host, port))
    p = s.getpeername()
    rep["peer"] = ("[%s]:%d" if fam == socket.AF_INET6 else "%s:%d") % (p[0], p[1])
    l = s.getsockname()
    rep["local"] = ("[%s]:%d" if fam == socket.AF_INET6 else "%s:%d") % (l[0], l[1])
    f = s.makefile("rb")
    rep["banner"] = f.readline().decode().strip()
    s.sendall(b"ping")
    s.shutdown(socket.SHUT_WR)
    rep["echoed"] = f.read() == b"ping"
    rep["ok"] = rep["echoed"]
except Exception as e:
    rep["error"] = str(e)
print(json.dumps(rep))
"#;

fn mptcp_client(pod: &Pod, dst: &str) -> ClientReport {
    let sa: std::net::SocketAddr = dst.parse().unwrap();
    let f = run_placed(
        Path::new("/usr/bin/python3"),
        &[
            "-c",
            MPTCP_CLIENT,
            &sa.ip().to_string(),
            &sa.port().to_string(),
        ],
        &pod.topo.in_pod(APP_UID, APP_UID),
        Duration::from_secs(20),
    )
    .expect("running the MPTCP client");
    serde_json::from_str(f.stdout.trim())
        .unwrap_or_else(|e| panic!("MPTCP client report ({e}): {:?} {:?}", f.stdout, f.stderr))
}

/// An MPTCP socket is captured like a TCP one, and (as under iptables,
/// where NAT never shows to the socket) its getpeername shows the peer it
/// dialed, not the proxy.
#[test]
fn mptcp_app_is_captured_and_sees_the_peer_it_dialed() {
    for dst in [
        format!("{UPSTREAM_V4}:{UP_PORT}"),
        format!("[{UPSTREAM_V6}]:{UP_PORT}"),
    ] {
        let pod_ip = if dst.starts_with('[') { POD_V6 } else { POD_V4 };
        let seen = same_under_both(&dst, |how| {
            let (mut pod, proxy) = pod_under("parmptcp", how, |_| {});
            let _ = proxied(&mut pod, proxy);
            let r = mptcp_client(&pod, &dst);
            let (server_ip, server_local) = greeting(r.banner.as_deref());
            if how == Capture::Redirect {
                // Counted once, as the TCP connection it is on the wire.
                for (chain, rule, n) in [
                    ("OUTPUT", "captured", 1),
                    ("OUTPUT", "skip_not_tcp", 0),
                    ("ORIGINAL_DST", "getpeername_rewritten", 1),
                ] {
                    assert_eq!(pod.counter(chain, rule), n, "{dst}: {chain}/{rule}");
                }
            }
            Seen {
                ok: r.ok,
                peer: r.peer.clone(),
                server: (server_ip, server_local),
                proxied: proxied(&mut pod, proxy),
            }
        });
        assert_eq!(
            seen,
            Seen {
                ok: true,
                peer: Some(dst.clone()),
                server: (pod_ip.to_string(), dst.clone()),
                proxied: vec![("outbound".into(), dst.clone())],
            },
            "{dst}"
        );
    }
}

// ------------------------------------- inbound from the pod's own address

/// A second address of the pod (the destination of the inbound case).
const POD2_V6: &str = "fd00:200::22";

/// An inbound IPv6 connection from outside the pod whose source is the
/// pod's own address (here the upstream netns holds fd00:200::2 on its lo
/// and the pod routes its replies to that address back out of eth0, so
/// the handshake completes). PREROUTING sees it like any packet from
/// outside: steered to the inbound port, the proxy connects to the app
/// from ::6.
#[test]
fn inbound_v6_from_the_pods_own_address_is_steered_to_the_inbound_port() {
    let dst = format!("[{POD2_V6}]:{APP_PORT}");
    let seen = same_under_both(&dst, |how| {
        let (mut pod, proxy) = pod_under("parsrc6", how, |pod| {
            let ns = &pod.topo.pod;
            ns.ip(&[
                "-6",
                "addr",
                "add",
                &format!("{POD2_V6}/64"),
                "dev",
                "eth0",
                "nodad",
            ])
            .unwrap();
            // Replies to fd00:200::2 (locally generated: iif lo) leave
            // through eth0 to the upstream netns, which holds it.
            ns.ip(&["-6", "rule", "add", "pref", "1000", "lookup", "local"])
                .unwrap();
            ns.ip(&["-6", "rule", "del", "pref", "0", "lookup", "local"])
                .unwrap();
            ns.ip(&[
                "-6",
                "rule",
                "add",
                "pref",
                "100",
                "to",
                &format!("{POD_V6}/128"),
                "iif",
                "lo",
                "lookup",
                "200",
            ])
            .unwrap();
            ns.ip(&[
                "-6",
                "route",
                "add",
                &format!("{POD_V6}/128"),
                "via",
                UPSTREAM_V6,
                "dev",
                "eth0",
                "table",
                "200",
            ])
            .unwrap();
            pod.topo
                .upstream
                .ip(&[
                    "-6",
                    "addr",
                    "add",
                    &format!("{POD_V6}/128"),
                    "dev",
                    "lo",
                    "nodad",
                ])
                .unwrap();
            // The replies' next hop is resolved from the link-local
            // addresses: wait for their duplicate address detection.
            wait_no_tentative(&pod.topo.pod);
            wait_no_tentative(&pod.topo.upstream);
        });
        let _ = proxied(&mut pod, proxy);
        let r = pod.client(&pod.topo.in_upstream(), &dst, Some(POD_V6));
        Seen {
            ok: r.ok,
            peer: r.peer.clone(),
            server: greeting(r.banner.as_deref()),
            proxied: proxied(&mut pod, proxy),
        }
    });
    assert_eq!(
        seen,
        Seen {
            ok: true,
            peer: Some(dst.clone()),
            server: ("::6".into(), dst.clone()),
            proxied: vec![("inbound".into(), dst.clone())],
        }
    );
}

/// Wait until no IPv6 address of `ns` is tentative (DAD done).
fn wait_no_tentative(ns: &NetnsGuard) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !ns
        .ip(&["-6", "addr", "show", "tentative"])
        .unwrap_or_default()
        .trim()
        .is_empty()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "IPv6 addresses of {} still tentative",
            ns.name
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The pod's own local connections stay local under both (the case above
/// must not be "fixed" by steering these): the app to its own IPv6
/// address and from it, not through the proxy.
#[test]
fn local_v6_connections_to_the_pods_address_stay_local() {
    let dst = format!("[{POD_V6}]:{APP_PORT}");
    let seen = same_under_both(&dst, |how| {
        let (mut pod, proxy) = pod_under("parloc6", how, |_| {});
        let _ = proxied(&mut pod, proxy);
        let r = pod.app_client(&dst);
        let seen = Seen {
            ok: r.ok,
            peer: r.peer.clone(),
            server: greeting(r.banner.as_deref()),
            proxied: proxied(&mut pod, proxy),
        };
        if how == Capture::Redirect {
            assert_eq!(pod.counter("PREROUTING", "captured"), 0);
        }
        seen
    });
    assert_eq!(
        seen,
        Seen {
            ok: true,
            peer: Some(dst.clone()),
            server: (POD_V6.to_string(), dst.clone()),
            proxied: vec![],
        }
    );
}
