//! `redirect explain` against what real connections do. Outbound, every
//! rule of the OUTPUT chain is cross-checked in outbound_rules.rs (each of
//! its connections is explained first); here: the inbound chain (each
//! case explained, then made from outside the pod, v4 and v6), `--pid`
//! (the process's ids, its netns, its cgroup), DNS, and bad input.
use std::{collections::BTreeMap, process::Command};

use redirect_testbed::sandbox::unique;
use redirect_tests::*;
use serde_json::Value;

const APP_PORT: u16 = 9080;

fn sa(ip: &str, port: u16) -> String {
    std::net::SocketAddr::new(ip.parse().unwrap(), port).to_string()
}

/// `redirect explain --no-agent --json <args>`: the explanation, or the
/// error text.
fn explain(pod: &Pod, args: &[&str]) -> Result<Value, String> {
    let mut a = vec!["explain", "--no-agent", "--json"];
    a.extend_from_slice(args);
    let out = pod.redirect(&a);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!err.contains("panicked"), "{args:?}: {err}");
    if !out.status.success() {
        return Err(err);
    }
    Ok(serde_json::from_slice(&out.stdout).expect("explain json"))
}

fn explain_ok(pod: &Pod, args: &[&str]) -> Value {
    explain(pod, args).unwrap_or_else(|e| panic!("explain {args:?}: {e}"))
}

/// The pod's counters of one chain, `rule` → count.
fn chain(pod: &Pod, name: &str) -> BTreeMap<String, u64> {
    pod.stats()[0]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["chain"] == name)
        .map(|r| {
            (
                r["rule"].as_str().unwrap().to_string(),
                r["count"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn moved(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> Vec<String> {
    after
        .iter()
        .filter(|(k, v)| before.get(*k) != Some(v))
        .map(|(k, _)| k.clone())
        .collect()
}

/// Where a connection from outside landed: `inbound` (the app saw the
/// proxy's passthrough source), `untouched` (the app saw the client),
/// `refused`.
fn landed(r: &redirect_testbed::kit::ClientReport) -> &'static str {
    if !r.ok {
        let e = r.error.as_deref().unwrap_or_default();
        assert!(e.contains("refused"), "{r:?}");
        return "refused";
    }
    let banner = r.banner.as_deref().unwrap_or_default();
    let peer = banner
        .split_whitespace()
        .find_map(|w| w.strip_prefix("peer="))
        .unwrap_or_default();
    if peer.starts_with("127.0.0.6:") || peer.starts_with("[::6]:") {
        "inbound"
    } else {
        assert_eq!(Some(peer), r.local.as_deref(), "{r:?}");
        "untouched"
    }
}

/// Explain a connection from the upstream netns to `dst`, make it, and
/// compare: where it landed, and the one PREROUTING counter that moved.
fn check_inbound(pod: &Pod, dst: &str, want: &str) {
    let up = if dst.starts_with('[') {
        UPSTREAM_V6
    } else {
        UPSTREAM_V4
    };
    let ns = pod.pod_netns();
    let e = explain_ok(
        pod,
        &[
            "--netns",
            ns.to_str().unwrap(),
            "--inbound",
            "--dst",
            dst,
            "--src",
            up,
        ],
    );
    let before = chain(pod, "PREROUTING");
    let r = pod.client(&pod.topo.in_upstream(), dst, None);
    let after = chain(pod, "PREROUTING");
    let counter = e["verdict"]["counter"].as_str().unwrap_or_default();
    assert_eq!(counter, format!("PREROUTING/{want}"), "{dst}: {e:#}");
    assert_eq!(
        moved(&before, &after),
        vec![want.to_string()],
        "{dst}: the counter that moved"
    );
    assert_eq!(e["verdict"]["action"], landed(&r), "{dst}: {e:#} {r:?}");
}

#[test]
fn inbound_explained_as_connections_from_outside_land_v4_v6() {
    // Istio's flags: -b '*' -d 15090,15021,15020, tunnel 15008.
    let mut pod = Pod::new("exin");
    for p in [APP_PORT, 15090, 15008] {
        pod.start_app_server(p);
    }
    pod.start_proxy();
    pod.attach_istio_default();
    // The proxy listened before attach: attach registered it.
    for ip in [POD_V4, POD_V6] {
        check_inbound(&pod, &sa(ip, APP_PORT), "captured");
        check_inbound(&pod, &sa(ip, 15090), "skip_excluded_port");
        check_inbound(&pod, &sa(ip, 15008), "skip_tunnel_port");
    }
    let ns = pod.pod_netns();
    let ns = ns.to_str().unwrap();
    // ssh is a port like any other with -b '*' (as istio-iptables since
    // Istio 1.13; nothing listens on 22 here: the explanation only).
    let e = explain_ok(
        &pod,
        &["--netns", ns, "--inbound", "--dst", &sa(POD_V4, 22)],
    );
    assert_eq!(e["verdict"]["counter"], "PREROUTING/captured", "{e:#}");
    // What sk_lookup looks at before the chain: the pod's own traffic.
    let dst = sa(POD_V4, APP_PORT);
    for (extra, rule) in [
        (&["--src", POD_V4][..], "source"),
        (&["--ifindex", "1"][..], "lo"),
        (&["--proto", "udp"][..], "-p tcp"),
    ] {
        let mut args = vec!["--netns", ns, "--inbound", "--dst", &dst];
        args.extend_from_slice(extra);
        let e = explain_ok(&pod, &args);
        assert_eq!(e["verdict"]["action"], "untouched", "{extra:?}: {e:#}");
        assert!(e["verdict"]["counter"].is_null(), "{extra:?}: {e:#}");
        let last = e["steps"].as_array().unwrap().last().unwrap().clone();
        assert_eq!(
            (last["rule"].as_str(), last["source"].as_str()),
            (Some(rule), Some("hook")),
            "{e:#}"
        );
    }

    // -b with a list: the other ports are not included.
    let mut listed = Pod::new("exinb");
    for p in [APP_PORT, 8081] {
        listed.start_app_server(p);
    }
    listed.start_proxy();
    listed.attach(&["-b", "9080", "-i", "*"]);
    for ip in [POD_V4, POD_V6] {
        check_inbound(&listed, &sa(ip, APP_PORT), "captured");
        check_inbound(&listed, &sa(ip, 8081), "skip_not_included");
    }

    // No proxy listening: refused, as a REDIRECT to a closed 15006.
    let mut bare = Pod::new("exinr");
    bare.start_app_server(APP_PORT);
    bare.attach_istio_default();
    for ip in [POD_V4, POD_V6] {
        check_inbound(&bare, &sa(ip, APP_PORT), "no_listener");
    }
}

#[test]
fn explain_by_pid_reads_the_process_and_checks_its_namespace_and_cgroup() {
    let mut pod = Pod::new("expid");
    pod.start_upstream(8080);
    let proxy = pod.start_proxy();
    pod.attach_istio_default();
    let ns = pod.pod_netns();
    let ns = ns.to_str().unwrap();
    let up = sa(UPSTREAM_V4, 8080);
    let pid = pod.children[proxy].pid().to_string();
    let e = explain_ok(&pod, &["--netns", ns, "--pid", &pid, "--dst", &up]);
    assert_eq!(e["verdict"]["counter"], "OUTPUT/skip_proxy_uid", "{e:#}");
    let conn = e["connection"].as_str().unwrap();
    assert!(
        conn.contains(&format!("pid {pid} (redirect-kit) uid 1337 gid 1337")),
        "{conn}"
    );
    assert_eq!(e["steps"][0]["rule"], "cgroup", "{e:#}");
    assert_eq!(e["steps"][0]["matched"], false, "{e:#}");
    // The proxy's own upstream connection (made for the app's) moves that
    // counter.
    let before = pod.counter("OUTPUT", "skip_proxy_uid");
    assert!(pod.app_client(&up).ok);
    assert_eq!(pod.counter("OUTPUT", "skip_proxy_uid"), before + 1);
    // The text says it as the rule table does.
    let out = pod.redirect(&[
        "explain",
        "--no-agent",
        "--netns",
        ns,
        "--pid",
        &pid,
        "--dst",
        &up,
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("rule 4 (uid 1337)  uid 1337 is a proxy uid -> RETURN (not captured"),
        "{text}"
    );

    // A process outside the pod (the upstream server).
    let outside = pod.children[0].pid().to_string();
    let err = explain(&pod, &["--netns", ns, "--pid", &outside, "--dst", &up]).unwrap_err();
    assert!(
        err.contains(&format!(
            "pid {outside} is not in the pod's network namespace"
        )),
        "{err}"
    );
    // No such process.
    let err = explain(&pod, &["--netns", ns, "--pid", "999999999", "--dst", &up]).unwrap_err();
    assert!(
        err.contains("invalid --pid value '999999999': no such process"),
        "{err}"
    );

    // In the pod's netns but not in a cgroup the programs are attached to:
    // not seen, and indeed not captured.
    let loose = Placement {
        netns: Some(pod.pod_netns()),
        cgroup: None,
        uid: Some(APP_UID),
        gid: Some(APP_UID),
    };
    let mut cmd = Command::new(kit_bin());
    cmd.args(["echo", "--listen", "127.0.0.1:7777"]);
    let stray = ChildGuard::spawn("stray", cmd, &loose, true).expect("stray process");
    let stray_pid = stray.pid().to_string();
    let e = explain_ok(&pod, &["--netns", ns, "--pid", &stray_pid, "--dst", &up]);
    assert_eq!(
        (
            e["verdict"]["action"].as_str(),
            e["steps"][0]["rule"].as_str()
        ),
        (Some("untouched"), Some("cgroup")),
        "{e:#}"
    );
    assert!(e["verdict"]["counter"].is_null(), "{e:#}");
    let before = chain(&pod, "OUTPUT");
    let r = pod.client(&loose, &up, None);
    assert!(r.ok, "{r:?}");
    let banner = r.banner.as_deref().unwrap_or_default();
    assert!(
        banner.contains(&format!("peer={POD_V4}:")),
        "went direct: {banner}"
    );
    assert_eq!(chain(&pod, "OUTPUT"), before, "no OUTPUT counter moves");
}

#[test]
fn explain_dns_with_the_pods_nameservers() {
    let pod = Pod::new("exdns");
    pod.attach_istio_default_with(&["--redirect-dns", "--dns-servers", "10.200.0.1,fd00:200::1"]);
    let ns = pod.pod_netns();
    let ns = ns.to_str().unwrap();
    for (dst, proto, counter) in [
        ("10.200.0.1:53", "udp", "DNS/captured_udp"),
        ("[fd00:200::1]:53", "udp", "DNS/captured_udp"),
        ("10.200.0.1:53", "tcp", "DNS/captured_tcp"),
        ("10.9.9.9:53", "udp", "DNS/skip_not_nameserver"),
        ("10.9.9.9:53", "tcp", "OUTPUT/captured"),
        ("10.200.0.1:5353", "udp", "OUTPUT/skip_not_tcp"),
    ] {
        let e = explain_ok(
            &pod,
            &[
                "--netns", ns, "--uid", "1000", "--dst", dst, "--proto", proto,
            ],
        );
        assert_eq!(e["verdict"]["counter"], counter, "{dst} {proto}: {e:#}");
    }
    // The proxy's own DNS returns at rule 4, before the DNS chain.
    let e = explain_ok(
        &pod,
        &[
            "--netns",
            ns,
            "--uid",
            "1337",
            "--dst",
            "10.200.0.1:53",
            "--proto",
            "udp",
        ],
    );
    assert_eq!(e["verdict"]["counter"], "OUTPUT/skip_proxy_uid", "{e:#}");
}

#[test]
fn explain_refuses_bad_input_clearly() {
    let pod = Pod::new("exbad");
    pod.attach_istio_default();
    let ns = pod.pod_netns();
    let ns = ns.to_str().unwrap();
    let other = NetnsGuard::new(&unique("rdx-exo-")).expect("netns");
    let other_path = other.path();
    let cases: Vec<(Vec<&str>, String)> = vec![
        (
            vec![
                "--netns",
                other_path.to_str().unwrap(),
                "--uid",
                "1000",
                "--dst",
                "10.0.0.1:80",
            ],
            "is not captured; captured: ".into(),
        ),
        (
            vec!["--netns", ns, "--uid", "1000", "--dst", "10.0.0.1"],
            "invalid --dst value '10.0.0.1': expected ADDR:PORT".into(),
        ),
        (
            vec!["--netns", ns, "--uid", "1000", "--dst", "example.com:80"],
            "invalid --dst value 'example.com:80'".into(),
        ),
        (
            vec![
                "--netns",
                ns,
                "--uid",
                "1000",
                "--dst",
                "10.0.0.1:80",
                "--src",
                "x",
            ],
            "invalid --src value 'x': expected an IP address".into(),
        ),
        (
            vec![
                "--netns",
                ns,
                "--uid",
                "1000",
                "--dst",
                "10.0.0.1:80",
                "--src",
                "::1",
            ],
            "invalid --src value '::1': an IPv6 source for an IPv4 destination".into(),
        ),
        (
            vec!["--netns", ns, "--dst", "10.0.0.1:80"],
            "needs --uid <uid> [--gid <gid>] or --pid <pid>".into(),
        ),
        (
            vec![
                "--netns",
                ns,
                "--uid",
                "1",
                "--pid",
                "1",
                "--dst",
                "10.0.0.1:80",
            ],
            "give --uid or --pid, not both".into(),
        ),
        (
            vec![
                "--netns",
                ns,
                "--inbound",
                "--uid",
                "1",
                "--dst",
                "10.0.0.1:80",
            ],
            "invalid --uid value '1': --inbound".into(),
        ),
        (
            vec![
                "--netns",
                ns,
                "--uid",
                "1",
                "--dst",
                "10.0.0.1:80",
                "--proto",
                "sctp",
            ],
            "invalid --proto value 'sctp': expected tcp or udp".into(),
        ),
        (
            vec!["--pod", "shop/none", "--uid", "1", "--dst", "10.0.0.1:80"],
            "invalid --pod value 'shop/none'".into(),
        ),
        (
            vec![
                "--netns",
                "/etc/hostname",
                "--uid",
                "1",
                "--dst",
                "10.0.0.1:80",
            ],
            "is not a network namespace".into(),
        ),
    ];
    for (args, want) in cases {
        let err = explain(&pod, &args).unwrap_err();
        assert!(err.contains(&want), "{args:?}: want {want:?}, got {err}");
    }
}
