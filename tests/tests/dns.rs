//! DNS capture (`--redirect-dns`) end to end, with real parts: dnsmasq as
//! the pod's nameserver in the upstream netns (its own config, no system
//! file touched), the kit's stand-in for Istio's DNS proxy on
//! 127.0.0.1:15053 / [::1]:15053 as uid 1337 in the pod (it answers
//! `*.local.mesh` itself with 198.51.100.53 / 2001:db8::53 and forwards the
//! rest to dnsmasq), and real clients in the pod: glibc's `getent` (with
//! the netns's own resolv.conf, `/etc/netns/<name>/resolv.conf`, as `ip
//! netns exec` shows it), `dig` and `nslookup`, and the kit's raw UDP
//! (unconnected and connected) and TCP queries.
//!
//! dnsmasq answers `*.local.mesh` with 203.0.113.9 / 2001:db8::9: an
//! answer of 198.51.100.53 can only come from the proxy. Every test has
//! its own namespaces, cgroup and pin dir; nothing leaves them.
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use redirect_testbed::sandbox::{run_placed, unique, ChildGuard, Placement};
use redirect_tests::*;
use serde_json::Value;

const DNSMASQ: &str = "/usr/sbin/dnsmasq";
/// The pod's nameservers: dnsmasq on the upstream's addresses.
const NS_V4: &str = UPSTREAM_V4;
const NS_V6: &str = UPSTREAM_V6;
/// A third address of the upstream, where dnsmasq answers too, that is
/// not among the pod's nameservers.
const OTHER_V4: &str = "10.200.0.53";

const PROXY_A: &str = "198.51.100.53";
const PROXY_AAAA: &str = "2001:db8::53";
const UPSTREAM_A: &str = "203.0.113.9";
const FWD_A: &str = "203.0.113.10";
const APP_GROUP: u32 = 2000;

/// A directory removed on drop.
struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// dnsmasq in the upstream netns, killed by PID on drop.
struct Dnsmasq {
    _child: ChildGuard,
    dir: Dir,
}

impl Dnsmasq {
    fn start(pod: &Pod) -> Dnsmasq {
        assert!(
            Path::new(DNSMASQ).exists(),
            "{DNSMASQ} missing: run `cargo xtask setup` (or apt-get install -y dnsmasq-base)"
        );
        pod.topo
            .upstream
            .ip(&["addr", "add", &format!("{OTHER_V4}/24"), "dev", "eth0"])
            .expect("extra upstream address");
        let dir = Dir(std::env::temp_dir().join(unique("rdt-dnsmasq-")));
        std::fs::create_dir_all(&dir.0).unwrap();
        let conf = dir.0.join("dnsmasq.conf");
        let log = dir.0.join("dnsmasq.log");
        std::fs::write(
            &conf,
            format!(
                "no-resolv\nno-hosts\nno-poll\nbind-interfaces\nport=53\nuser=root\n\
                 listen-address={NS_V4}\nlisten-address={NS_V6}\nlisten-address={OTHER_V4}\n\
                 address=/local.mesh/{UPSTREAM_A}\naddress=/local.mesh/2001:db8::9\n\
                 address=/fwd.test/{FWD_A}\naddress=/fwd.test/2001:db8::10\n\
                 log-queries\nlog-facility={}\n",
                log.display()
            ),
        )
        .unwrap();
        let mut cmd = Command::new(DNSMASQ);
        cmd.arg("--keep-in-foreground")
            .arg(format!("--conf-file={}", conf.display()))
            .arg("--pid-file=");
        let child = ChildGuard::spawn("dnsmasq", cmd, &pod.topo.in_upstream(), false)
            .expect("starting dnsmasq");
        let d = Dnsmasq { _child: child, dir };
        // Ready when it answers (asked from its own netns).
        for _ in 0..100 {
            let r = query(
                &pod.topo.in_upstream(),
                &format!("{NS_V4}:53"),
                "x.local.mesh",
                "A",
                "udp",
            );
            if r["ok"] == true {
                return d;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("dnsmasq did not answer: {}", d.log());
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.0.join("dnsmasq.log")).unwrap_or_default()
    }

    /// Queries dnsmasq logged for `name` from `client` (an address).
    fn queries_from(&self, name: &str, client: &str) -> usize {
        self.log()
            .lines()
            .filter(|l| {
                l.contains(&format!("query[A] {name} from {client}"))
                    || l.contains(&format!("query[AAAA] {name} from {client}"))
            })
            .count()
    }
}

/// `/etc/netns/<pod netns>/resolv.conf` (what `ip netns exec` shows the
/// pod's processes, and where `redirect attach --netns /run/netns/<name>`
/// reads the nameservers), removed on drop.
fn pod_resolv_conf(pod: &Pod, nameservers: &[&str]) -> Dir {
    let dir = PathBuf::from("/etc/netns").join(&pod.topo.pod.name);
    std::fs::create_dir_all(&dir).unwrap();
    let text: String = nameservers
        .iter()
        .map(|n| format!("nameserver {n}\n"))
        .collect();
    std::fs::write(dir.join("resolv.conf"), text).unwrap();
    Dir(dir)
}

/// One kit query placed as asked.
fn query(p: &Placement, server: &str, name: &str, qtype: &str, transport: &str) -> Value {
    let r = run_kit(
        p,
        &[
            "dns-query",
            "--server",
            server,
            "--name",
            name,
            "--qtype",
            qtype,
            "--transport",
            transport,
            "--timeout-ms",
            "2000",
        ],
        Duration::from_secs(10),
    );
    r.report()
}

fn app(pod: &Pod) -> Placement {
    pod.topo.in_pod(APP_UID, APP_UID)
}

fn answers(v: &Value) -> Vec<String> {
    v["answers"]
        .as_array()
        .unwrap_or_else(|| panic!("no answers: {v}"))
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect()
}

/// The stand-in DNS proxy as uid/gid 1337 in the pod, forwarding to the
/// IPv4 nameserver.
fn start_dns_proxy(pod: &mut Pod) -> usize {
    let p = pod.topo.in_pod(PROXY_UID, PROXY_UID);
    let up = format!("{NS_V4}:53");
    pod.spawn(
        "dns-proxy",
        &[
            "dns-proxy",
            "--local-suffix",
            "local.mesh",
            "--upstream",
            &up,
        ],
        &p,
    );
    pod.children.len() - 1
}

fn dns_counter(pod: &Pod, rule: &str) -> u64 {
    pod.counter("DNS", rule)
}

fn run_tool(p: &Placement, bin: &str, args: &[&str]) -> (bool, String) {
    let f = run_placed(Path::new(bin), args, p, Duration::from_secs(15)).expect(bin);
    (
        f.status.is_some_and(|s| s.success()),
        format!("{}{}", f.stdout, f.stderr),
    )
}

/// glibc's resolver in the pod, with the pod's resolv.conf: `ip netns
/// exec` (which bind-mounts /etc/netns/<name>/resolv.conf) started in the
/// pod's cgroup, then `getent` as the app's uid/gid.
fn getent(pod: &Pod, db: &str, name: &str) -> (bool, String) {
    let p = Placement {
        cgroup: Some(pod.topo.cgroup.path.clone()),
        ..Placement::default()
    };
    let uid = APP_UID.to_string();
    run_tool(
        &p,
        "/usr/sbin/ip",
        &[
            "netns",
            "exec",
            &pod.topo.pod.name,
            "setpriv",
            "--reuid",
            &uid,
            "--regid",
            &uid,
            "--clear-groups",
            "getent",
            db,
            name,
        ],
    )
}

#[test]
fn captured_dns_is_answered_by_the_proxy_as_from_the_nameserver() {
    let mut pod = Pod::new("dns");
    let upstream = Dnsmasq::start(&pod);
    let _rc = pod_resolv_conf(&pod, &[NS_V4, NS_V6, "127.0.0.53"]);
    let proxy = start_dns_proxy(&mut pod);
    let out = pod.attach_istio_default_with(&["--redirect-dns"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        text.contains("--redirect-dns --dns-servers '10.200.0.1,127.0.0.53,fd00:200::1'")
            && text.contains(&format!("/etc/netns/{}/resolv.conf", pod.topo.pod.name)),
        "the nameservers come from the netns's resolv.conf: {text}"
    );
    let app = app(&pod);
    let v4 = format!("{NS_V4}:53");
    let v6 = format!("[{NS_V6}]:53");
    // The kit's raw queries: unconnected UDP, connected UDP, TCP; IPv4
    // and IPv6. The answer is the proxy's; the reply reads as from the
    // nameserver the app asked, and so does getpeername.
    for (server, qtype, want) in [(&v4, "A", PROXY_A), (&v6, "AAAA", PROXY_AAAA)] {
        for transport in ["udp", "udp-connected", "tcp"] {
            let r = query(&app, server, "svc.local.mesh", qtype, transport);
            assert_eq!(r["ok"], true, "{transport} {server}: {r}");
            assert_eq!(
                answers(&r),
                vec![want.to_string()],
                "{transport} {server}: {r}"
            );
            if transport != "tcp" {
                assert_eq!(r["reply_from"], server.as_str(), "{transport}: {r}");
            }
            if transport != "udp" {
                assert_eq!(r["peer"], server.as_str(), "{transport}: {r}");
            }
        }
    }
    // A dual-stack socket asking the IPv4 nameserver as ::ffff:10.200.0.1:
    // decided as IPv4 (as iptables sees it), read back v4-mapped.
    let mapped = format!("[::ffff:{NS_V4}]:53");
    for transport in ["udp", "udp-connected", "tcp"] {
        let r = query(&app, &mapped, "svc.local.mesh", "A", transport);
        assert_eq!(answers(&r), vec![PROXY_A.to_string()], "{transport}: {r}");
        if transport != "tcp" {
            assert_eq!(r["reply_from"], mapped.as_str(), "{transport}: {r}");
        }
        if transport != "udp" {
            assert_eq!(r["peer"], mapped.as_str(), "{transport}: {r}");
        }
    }
    // A local resolver (127.0.0.53) among the nameservers: captured too,
    // TCP included (rules 3/6 leave port 53 to the DNS chain).
    for transport in ["udp", "tcp"] {
        let r = query(&app, "127.0.0.53:53", "svc.local.mesh", "A", transport);
        assert_eq!(answers(&r), vec![PROXY_A.to_string()], "{transport}: {r}");
    }
    // Real clients: dig (UDP and TCP), nslookup, glibc's getent with the
    // pod's resolv.conf.
    for extra in [None, Some("+tcp")] {
        let mut args = vec![
            "@10.200.0.1",
            "svc.local.mesh",
            "A",
            "+short",
            "+time=2",
            "+tries=1",
        ];
        args.extend(extra);
        let (ok, out) = run_tool(&app, "/usr/bin/dig", &args);
        assert!(ok && out.trim() == PROXY_A, "dig {extra:?}: {out}");
    }
    let (ok, out) = run_tool(
        &app,
        "/usr/bin/dig",
        &[
            "@fd00:200::1",
            "svc.local.mesh",
            "AAAA",
            "+short",
            "+time=2",
            "+tries=1",
        ],
    );
    assert!(ok && out.trim() == PROXY_AAAA, "dig -6: {out}");
    let (ok, out) = run_tool(
        &app,
        "/usr/bin/nslookup",
        &["-timeout=2", "svc.local.mesh", NS_V4],
    );
    assert!(ok && out.contains(PROXY_A), "nslookup: {out}");
    let (ok, out) = getent(&pod, "ahostsv4", "svc.local.mesh");
    assert!(ok && out.contains(PROXY_A), "getent: {out}");
    // Not a mesh name: the proxy forwards it, its own query reaches the
    // nameserver untouched (as uid 1337), and the app gets upstream's
    // answer through the proxy.
    let before = upstream.queries_from("fwd.test", POD_V4);
    let r = query(&app, &v4, "fwd.test", "A", "udp-connected");
    assert_eq!(answers(&r), vec![FWD_A.to_string()], "{r}");
    assert_eq!(
        upstream.queries_from("fwd.test", POD_V4),
        before + 1,
        "{}",
        upstream.log()
    );
    let (ok, out) = getent(&pod, "ahostsv4", "fwd.test");
    assert!(ok && out.contains(FWD_A), "getent fwd.test: {out}");
    // The proxy's own DNS: untouched, answered by dnsmasq.
    let own = query(
        &pod.topo.in_pod(PROXY_UID, PROXY_UID),
        &v4,
        "svc.local.mesh",
        "A",
        "udp",
    );
    assert_eq!(answers(&own), vec![UPSTREAM_A.to_string()], "{own}");
    let seen = pod
        .proxy_log(proxy)
        .into_iter()
        .filter(|l| l["event"] == "query")
        .count();
    assert!(seen >= 12, "{seen}");
    // The proxy sees each query from the source iptables leaves it: the
    // pod's address (its route to the nameserver), loopback for the local
    // resolver 127.0.0.53. A socket bound to a port before its connect
    // (the kit's connected UDP, as Rust's UdpSocket binds first; dig and
    // nslookup) cannot be bound again and shows loopback (a difference
    // docs/design.md lists).
    for (name, server, transport, from) in [
        ("src-udp.local.mesh", v4.as_str(), "udp", POD_V4),
        ("src-tcp.local.mesh", v4.as_str(), "tcp", POD_V4),
        ("src-udp6.local.mesh", v6.as_str(), "udp", POD_V6),
        ("src-tcp6.local.mesh", v6.as_str(), "tcp", POD_V6),
        ("src-mapped.local.mesh", mapped.as_str(), "udp", POD_V4),
        ("src-local.local.mesh", "127.0.0.53:53", "udp", "127.0.0.1"),
        (
            "src-bound.local.mesh",
            v4.as_str(),
            "udp-connected",
            "127.0.0.1",
        ),
    ] {
        let qtype = if from.contains(':') { "AAAA" } else { "A" };
        let r = query(&app, server, name, qtype, transport);
        assert_eq!(r["ok"], true, "{name}: {r}");
        let seen: Vec<std::net::IpAddr> = pod
            .proxy_log(proxy)
            .into_iter()
            .filter(|l| l["event"] == "query" && l["name"] == name)
            .map(|l| {
                let f: std::net::SocketAddr = l["from"].as_str().unwrap().parse().unwrap();
                f.ip()
            })
            .collect();
        assert_eq!(
            seen,
            vec![from.parse::<std::net::IpAddr>().unwrap()],
            "{name}"
        );
    }
    // Counted in the DNS chain; the proxy's own queries under rule 4.
    assert!(dns_counter(&pod, "captured_udp") >= 6);
    assert!(dns_counter(&pod, "captured_tcp") >= 4);
    assert!(dns_counter(&pod, "reply_from_nameserver") >= 6);
    assert!(pod.counter("OUTPUT", "skip_proxy_uid") >= 2);
    // Status and stats say it.
    let st: Value = serde_json::from_slice(&pod.redirect(&["status", "--json"]).stdout).unwrap();
    assert!(
        st["pods"][0]["dns_capture"]
            .as_str()
            .unwrap()
            .contains("10.200.0.1"),
        "{st}"
    );
    let text = String::from_utf8_lossy(
        &pod.redirect(&["stats", "--chain", "ISTIO_OUTPUT_DNS"])
            .stdout,
    )
    .to_string();
    assert!(
        text.contains("Chain DNS")
            && text.contains("udp dpt:53 dst 10.200.0.1,127.0.0.53,fd00:200::1"),
        "{text}"
    );
}

#[test]
fn only_the_nameservers_unless_capture_all_and_nothing_without_redirect_dns() {
    let mut pod = Pod::new("dnsall");
    let _upstream = Dnsmasq::start(&pod);
    let _rc = pod_resolv_conf(&pod, &[NS_V4]);
    start_dns_proxy(&mut pod);
    let app = app(&pod);
    let other = format!("{OTHER_V4}:53");
    let ns = format!("{NS_V4}:53");
    // Listed nameservers: DNS to another address goes there.
    pod.attach_istio_default_with(&["--redirect-dns"]);
    let r = query(&app, &other, "svc.local.mesh", "A", "udp");
    assert_eq!(answers(&r), vec![UPSTREAM_A.to_string()], "{r}");
    assert_eq!(r["reply_from"], other.as_str());
    assert_eq!(dns_counter(&pod, "skip_not_nameserver"), 1);
    // IPv6 is not listed: not captured.
    let r = query(
        &app,
        &format!("[{NS_V6}]:53"),
        "svc.local.mesh",
        "AAAA",
        "udp",
    );
    assert_eq!(answers(&r), vec!["2001:db8::9".to_string()], "{r}");
    // --capture-all-dns: any address.
    pod.attach_istio_default_with(&["--redirect-dns", "--capture-all-dns"]);
    for t in ["udp", "udp-connected", "tcp"] {
        let r = query(&app, &other, "svc.local.mesh", "A", t);
        assert_eq!(answers(&r), vec![PROXY_A.to_string()], "{t}: {r}");
    }
    // No --redirect-dns: nothing is captured; TCP to port 53 is an
    // ordinary outbound connection (no proxy on 15001 here: refused).
    pod.attach_istio_default();
    let r = query(&app, &ns, "svc.local.mesh", "A", "udp");
    assert_eq!(answers(&r), vec![UPSTREAM_A.to_string()], "{r}");
    let r = query(&app, &ns, "svc.local.mesh", "A", "udp-connected");
    assert_eq!(answers(&r), vec![UPSTREAM_A.to_string()], "{r}");
    // --dns-servers none: DNS capture off, and the output says why.
    let out = pod.attach_istio_default_with(&["--redirect-dns", "--dns-servers", "none"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        text.contains("dns capture: off: --redirect-dns, but the pod lists no nameserver"),
        "{text}"
    );
    let r = query(&app, &ns, "svc.local.mesh", "A", "udp");
    assert_eq!(answers(&r), vec![UPSTREAM_A.to_string()], "{r}");
}

#[test]
fn unknown_nameservers_capture_every_address_and_say_so() {
    let pod = Pod::new("dnsunk");
    // No /etc/netns/<name>/resolv.conf: the host's is not the pod's.
    let ns = pod.pod_netns();
    let cg = pod.topo.cgroup.path.clone();
    let out = pod.redirect(&[
        "attach",
        "--netns",
        ns.to_str().unwrap(),
        "--cgroup",
        cg.to_str().unwrap(),
        "-i",
        "*",
        "-b",
        "*",
        "--redirect-dns",
        "-n",
        "--json",
    ]);
    assert!(out.status.success(), "{out:?}");
    let j: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        j["dns_capture"].as_str().unwrap().contains("any address"),
        "{j}"
    );
    assert!(
        j["warnings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w.as_str().unwrap().contains("nameservers are not known")),
        "{j}"
    );
    // --dns-resolv-conf that does not exist: an error naming it.
    let out = pod.redirect(&[
        "attach",
        "--netns",
        ns.to_str().unwrap(),
        "--cgroup",
        cg.to_str().unwrap(),
        "--redirect-dns",
        "--dns-resolv-conf",
        "/nonexistent/resolv.conf",
    ]);
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains("/nonexistent/resolv.conf") && e.contains("resolv.conf"),
        "{e}"
    );
    assert!(!pod.pin_dir.exists(), "nothing attached");
}

#[test]
fn owner_groups_select_whose_traffic_and_dns_are_captured() {
    let mut pod = Pod::new("dnsgrp");
    let _upstream = Dnsmasq::start(&pod);
    let _rc = pod_resolv_conf(&pod, &[NS_V4]);
    start_dns_proxy(&mut pod);
    pod.start_upstream(8080);
    let ns = pod.pod_netns();
    let cg = pod.topo.cgroup.path.clone();
    let istio = |env: &[(&str, &str)], extra: &[&str]| {
        let mut args = vec!["istio-iptables"];
        args.extend(redirect_tests::ISTIO_INJECTED);
        args.extend([
            "--netns",
            ns.to_str().unwrap(),
            "--cgroup",
            cg.to_str().unwrap(),
        ]);
        args.extend_from_slice(extra);
        let out = Command::new(redirect_bin())
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .envs(env.iter().copied())
            .arg("--pin-dir")
            .arg(&pod.pin_dir)
            .args(&args)
            .output()
            .unwrap();
        out
    };
    let srv = format!("{NS_V4}:53");
    let as_group = |gid: u32| pod.topo.in_pod(APP_UID, gid);
    let ask = |gid: u32| answers(&query(&as_group(gid), &srv, "svc.local.mesh", "A", "udp"));
    // Only group 2000 is captured.
    let out = istio(
        &[
            ("ISTIO_META_DNS_CAPTURE", "true"),
            ("ISTIO_OUTBOUND_OWNER_GROUPS", "2000"),
        ],
        &[],
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(ask(APP_GROUP), vec![PROXY_A.to_string()]);
    assert_eq!(ask(APP_UID), vec![UPSTREAM_A.to_string()]);
    assert!(pod.counter("OUTPUT", "skip_owner_group_not_included") >= 1);
    // All but group 2000.
    let out = istio(
        &[
            ("ISTIO_META_DNS_CAPTURE", "true"),
            ("ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE", "2000"),
        ],
        &[],
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(ask(APP_GROUP), vec![UPSTREAM_A.to_string()]);
    assert_eq!(ask(APP_UID), vec![PROXY_A.to_string()]);
    assert!(pod.counter("OUTPUT", "skip_owner_group_excluded") >= 1);
    // A TCP connection of an excluded group is not captured either (no
    // proxy on 15001: a captured one would be refused).
    let r = pod.client(&as_group(APP_GROUP), &format!("{UPSTREAM_V4}:8080"), None);
    assert_ok(&r, "excluded group goes direct");
    // A group name: refused where the pod's /etc/group is unknown...
    let status_before: Value =
        serde_json::from_slice(&pod.redirect(&["status", "--json"]).stdout).unwrap();
    let out = istio(&[("ISTIO_OUTBOUND_OWNER_GROUPS", "appgrp")], &[]);
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains("ISTIO_OUTBOUND_OWNER_GROUPS")
            && e.contains("'appgrp'")
            && e.contains("numeric gids"),
        "{e}"
    );
    let status_after: Value =
        serde_json::from_slice(&pod.redirect(&["status", "--json"]).stdout).unwrap();
    assert_eq!(
        status_before["pods"], status_after["pods"],
        "nothing changed"
    );
    // ...and resolved in the pod's root when given.
    let root = Dir(std::env::temp_dir().join(unique("rdt-podroot-")));
    std::fs::create_dir_all(root.0.join("etc")).unwrap();
    std::fs::write(root.0.join("etc/group"), format!("appgrp:x:{APP_GROUP}:\n")).unwrap();
    std::fs::write(
        root.0.join("etc/resolv.conf"),
        format!("nameserver {NS_V4}\n"),
    )
    .unwrap();
    let out = istio(
        &[
            ("ISTIO_META_DNS_CAPTURE", "true"),
            ("ISTIO_OUTBOUND_OWNER_GROUPS", "appgrp"),
        ],
        &["--pod-root", root.0.to_str().unwrap()],
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(ask(APP_GROUP), vec![PROXY_A.to_string()]);
    assert_eq!(ask(APP_UID), vec![UPSTREAM_A.to_string()]);
}

#[test]
fn an_install_without_the_dns_hooks_gets_them_on_the_next_attach() {
    // An install made by a version without the DNS hooks has every other
    // cgroup link: attach (and the agent at start, which calls the same
    // attach_cgroup) adds the missing ones and keeps the others.
    let mut pod = Pod::new("dnsupg");
    let _upstream = Dnsmasq::start(&pod);
    let _rc = pod_resolv_conf(&pod, &[NS_V4]);
    start_dns_proxy(&mut pod);
    pod.attach_istio_default_with(&["--redirect-dns"]);
    let cg_dirs = redirect_userspace::pins::read_dir(&pod.pin_dir.join("cgroups"));
    assert_eq!(cg_dirs.len(), 1);
    let dns_links = [
        "redirect_sendmsg4",
        "redirect_sendmsg6",
        "redirect_recvmsg4",
        "redirect_recvmsg6",
    ];
    for l in dns_links {
        redirect_userspace::attach::unpin_link(&cg_dirs[0].join(l)).unwrap();
    }
    let keep = cg_dirs[0].join("redirect_connect4");
    let before = std::fs::metadata(&keep).unwrap();
    let app = app(&pod);
    let ns = format!("{NS_V4}:53");
    // Without them unconnected UDP DNS goes out as sent...
    let r = query(&app, &ns, "svc.local.mesh", "A", "udp");
    assert_eq!(answers(&r), vec![UPSTREAM_A.to_string()], "{r}");
    // ...and the next attach brings them back.
    pod.attach_istio_default_with(&["--redirect-dns"]);
    for l in dns_links {
        assert!(cg_dirs[0].join(l).exists(), "{l}");
    }
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        std::fs::metadata(&keep).unwrap().ino(),
        before.ino(),
        "the other links are kept"
    );
    let r = query(&app, &ns, "svc.local.mesh", "A", "udp");
    assert_eq!(answers(&r), vec![PROXY_A.to_string()], "{r}");
}
