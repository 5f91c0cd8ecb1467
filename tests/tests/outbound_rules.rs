//! Every outbound knob (`-p -z -e -u -g -i -x -q -o -n`) and every rule of
//! the OUTPUT chain (docs/design.md, "The rules being replaced"), IPv4 and
//! IPv6, through the real `redirect attach` CLI and the real kernel.
//!
//! Each connection is checked from every side:
//! - the client (the app): it succeeds and `getpeername` shows the
//!   destination it dialed, captured or not;
//! - the server that answers (upstream or the app's own server in the pod):
//!   its greeting says it was reached at that destination, and from which
//!   address (the pod's, 127.0.0.6/::6 after the inbound proxy, ...);
//! - the kit proxy: the exact connections it handled (direction, orig dst);
//! - the counters: the exact increments of every rule, all others unchanged;
//! - `redirect explain`, asked first with the same uid, gid, source and
//!   destination: its verdict must be where the connection landed (the
//!   outbound port, the inbound port, or direct) and the counter that
//!   moved for it.
//!
//! Expected verdicts are what istio-iptables' rules would do, including its
//! quirks (several proxy ids, -u with -g, `-i` naming a loopback range).
use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr, UdpSocket},
    os::fd::AsRawFd,
    path::PathBuf,
    process::Command,
    time::Duration,
};

use redirect_testbed::{kit::ClientReport, sandbox::unique};
use redirect_tests::*;

/// The app's own server in the pod.
const APP_PORT: u16 = 9080;
/// Upstream echo ports (every upstream address).
const UP_PORT: u16 = 8080;
const UP_PORT2: u16 = 8081;
const TUNNEL_PORT: u16 = 15008;

/// Extra upstream addresses, on-link for the pod: inside / outside
/// 10.200.0.16/28 and fd00:200::10/124.
const UP2_V4: &str = "10.200.0.21";
const UP3_V4: &str = "10.200.0.11";
const UP2_V6: &str = "fd00:200::15";
const UP3_V6: &str = "fd00:200::5";

const PASS_V4: &str = "127.0.0.6";
const PASS_V6: &str = "::6";

// Counter names (`Reason::name`), OUTPUT chain.
const CAPTURED: &str = "captured";
const CAPTURED_PORT: &str = "captured_include_port";
const TO_INBOUND: &str = "proxy_to_self_inbound";
const EXCL_PORT: &str = "skip_excluded_port";
const PASSTHROUGH: &str = "skip_passthrough_127_0_0_6";
const SKIP_UID: &str = "skip_proxy_uid";
const SKIP_GID: &str = "skip_proxy_gid";
const APP_LOCAL: &str = "skip_app_to_local";
const LOOPBACK: &str = "skip_loopback";
const EXCL_CIDR: &str = "skip_excluded_cidr";
const NOT_INCLUDED: &str = "skip_not_included";
const NOT_TCP: &str = "skip_not_tcp";

/// `ip:port`, bracketed for IPv6.
fn sa(ip: &str, port: u16) -> String {
    SocketAddr::new(
        ip.parse::<IpAddr>().unwrap_or_else(|e| panic!("{ip}: {e}")),
        port,
    )
    .to_string()
}

fn parse_sa(s: &str) -> SocketAddr {
    s.parse()
        .unwrap_or_else(|e| panic!("{s:?} is not a socket address: {e}"))
}

/// v4-mapped IPv6 folded to IPv4: what the wire (and iptables) sees.
fn canon(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

/// The pod's own address of the family the connection really uses.
fn pod_ip_for(dst: &str) -> &'static str {
    if canon(parse_sa(dst)).is_ipv4() {
        POD_V4
    } else {
        POD_V6
    }
}

fn passthrough_for(dst: &str) -> &'static str {
    if canon(parse_sa(dst)).is_ipv4() {
        PASS_V4
    } else {
        PASS_V6
    }
}

/// What one connection must look like.
struct Expect {
    /// Proxy log entries it causes, `"<dir> <orig>"`; empty: the proxy
    /// never sees it.
    proxy: Vec<String>,
    /// The address the answering server sees it come from.
    from: String,
    /// OUTPUT counter increments. Every other counter of the pod stays put,
    /// except the ORIGINAL_DST answers, which follow from `proxy`.
    output: Vec<(&'static str, u64)>,
}

/// Left alone by rule `rule`: straight to the destination, from `from`.
fn direct(from: &str, rule: &'static str) -> Expect {
    Expect {
        proxy: vec![],
        from: from.into(),
        output: vec![(rule, 1)],
    }
}

/// Sent to the outbound port by `rule`; the proxy (whose own connection is
/// left alone by `proxy_rule`) reaches `dst` from the pod's address.
fn captured(dst: &str, rule: &'static str, proxy_rule: &'static str) -> Expect {
    Expect {
        proxy: vec![format!("outbound {}", canon(parse_sa(dst)))],
        from: pod_ip_for(dst).into(),
        output: vec![(rule, 1), (proxy_rule, 1)],
    }
}

/// Sent to the inbound port (rules 2/5); the proxy's inbound passthrough
/// reaches the app from 127.0.0.6 / ::6 (rule 1).
fn to_inbound(dst: &str) -> Expect {
    Expect {
        proxy: vec![format!("inbound {}", canon(parse_sa(dst)))],
        from: passthrough_for(dst).into(),
        output: vec![(TO_INBOUND, 1), (PASSTHROUGH, 1)],
    }
}

/// A test pod with upstream echo servers on every upstream address
/// (ports 8080, 8081), the app's own echo server(s) in the pod, the kit
/// sidecar proxy, attached with `flags`.
struct Rig {
    pod: Pod,
    proxy: usize,
}

impl Rig {
    fn new(tag: &str, flags: &[&str]) -> Rig {
        Rig::custom(tag, &[APP_PORT], &[], flags)
    }

    fn custom(tag: &str, app_ports: &[u16], proxy_args: &[&str], flags: &[&str]) -> Rig {
        let mut pod = Pod::new(tag);
        let up = &pod.topo.upstream;
        for a in [UP2_V4, UP3_V4] {
            up.ip(&["addr", "add", &format!("{a}/32"), "dev", "eth0"])
                .expect("upstream v4 address");
        }
        for a in [UP2_V6, UP3_V6] {
            up.ip(&[
                "-6",
                "addr",
                "add",
                &format!("{a}/128"),
                "dev",
                "eth0",
                "nodad",
            ])
            .expect("upstream v6 address");
        }
        let mut listen = Vec::new();
        for p in [UP_PORT, UP_PORT2] {
            listen.extend([
                "--listen".to_string(),
                format!("0.0.0.0:{p}"),
                "--listen".into(),
                format!("[::]:{p}"),
            ]);
        }
        let mut args = vec!["echo"];
        args.extend(listen.iter().map(String::as_str));
        let p = pod.topo.in_upstream();
        pod.spawn("upstream", &args, &p);
        for port in app_ports {
            pod.start_app_server(*port);
        }
        let mut args = vec!["proxy"];
        args.extend_from_slice(proxy_args);
        let p = pod.topo.in_pod(PROXY_UID, PROXY_UID);
        pod.spawn("proxy", &args, &p);
        let proxy = pod.children.len() - 1;
        pod.attach(flags);
        Rig { pod, proxy }
    }

    /// A process in the pod (netns and cgroup) as uid/gid.
    fn user(&self, uid: u32, gid: u32) -> Placement {
        self.pod.topo.in_pod(uid, gid)
    }

    fn app(&self) -> Placement {
        self.user(APP_UID, APP_UID)
    }

    fn proxy_user(&self) -> Placement {
        self.user(PROXY_UID, PROXY_UID)
    }

    /// Every counter of the pod, `"<chain>/<rule>"`, ORIGINAL_DST answers
    /// (outbound or inbound record) summed as `ORIGINAL_DST/answered`.
    fn counters(&self) -> BTreeMap<String, u64> {
        let s = self.pod.stats();
        let mut m = BTreeMap::new();
        for r in s[0]["rules"].as_array().expect("rules") {
            let (chain, rule) = (r["chain"].as_str().unwrap(), r["rule"].as_str().unwrap());
            let rule = match (chain, rule) {
                ("ORIGINAL_DST", "orig_dst_outbound" | "orig_dst_inbound") => "answered",
                _ => rule,
            };
            *m.entry(format!("{chain}/{rule}")).or_insert(0) += r["count"].as_u64().unwrap();
        }
        m
    }

    /// Proxy log since the last call, `"<dir> <orig>"`; errors fail the test.
    fn proxy_conns(&mut self) -> Vec<String> {
        self.pod
            .proxy_log(self.proxy)
            .iter()
            .map(|l| {
                assert_eq!(l["event"], "conn", "proxy reported: {l}");
                format!(
                    "{} {}",
                    l["dir"].as_str().unwrap(),
                    l["orig"].as_str().unwrap()
                )
            })
            .collect()
    }

    /// One connection by `who` (bound to `bind`) to `dst`, checked against
    /// `want` from the client, the server, the proxy and the counters.
    fn check(
        &mut self,
        who: &Placement,
        bind: Option<&str>,
        dst: &str,
        want: Expect,
    ) -> ClientReport {
        let what = format!("uid {:?} gid {:?} bind {bind:?} -> {dst}", who.uid, who.gid);
        let explained = self.explain(who, bind, dst);
        let before = self.counters();
        let r = self.pod.client(who, dst, bind);
        check_reached(&r, dst, &want.from, &what);
        check_explained(&explained, &want, &what);
        // A connection the proxy hands to itself logs in either order.
        let (mut seen, mut proxy) = (self.proxy_conns(), want.proxy.clone());
        seen.sort();
        proxy.sort();
        assert_eq!(seen, proxy, "{what}: proxy log");
        let after = self.counters();
        let delta: BTreeMap<String, u64> = after
            .iter()
            .filter_map(|(k, v)| {
                let d = v - before.get(k).copied().unwrap_or(0);
                (d > 0).then(|| (k.clone(), d))
            })
            .collect();
        let mut expected: BTreeMap<String, u64> = BTreeMap::new();
        for (rule, n) in &want.output {
            *expected.entry(format!("OUTPUT/{rule}")).or_insert(0) += n;
        }
        if !want.proxy.is_empty() {
            // The proxy asked SO_ORIGINAL_DST once per connection it took,
            // and the app's redirected socket answered getpeername once.
            expected.insert("ORIGINAL_DST/answered".into(), want.proxy.len() as u64);
            expected.insert("ORIGINAL_DST/getpeername_rewritten".into(), 1);
        }
        assert_eq!(delta, expected, "{what}: counter increments");
        if let Ok(e) = &explained {
            let counter = e["verdict"]["counter"].as_str().unwrap_or_default();
            assert!(
                delta.contains_key(counter),
                "{what}: explain's counter {counter} did not move: {delta:?}"
            );
        }
        r
    }

    /// `redirect explain` for the connection `who` is about to make: the
    /// JSON explanation, or the error text.
    fn explain(
        &self,
        who: &Placement,
        bind: Option<&str>,
        dst: &str,
    ) -> Result<serde_json::Value, String> {
        let ns = who.netns.as_ref().expect("a placement in a netns");
        let (uid, gid) = (who.uid.expect("uid"), who.gid.expect("gid"));
        let (uid, gid) = (uid.to_string(), gid.to_string());
        let mut args = vec![
            "explain",
            "--no-agent",
            "--json",
            "--netns",
            ns.to_str().unwrap(),
            "--uid",
            &uid,
            "--gid",
            &gid,
            "--dst",
            dst,
        ];
        if let Some(b) = bind {
            args.extend(["--src", b]);
        }
        let out = self.pod.redirect(&args);
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        Ok(serde_json::from_slice(&out.stdout).expect("explain json"))
    }
}

/// What `redirect explain` said against what the connection will do:
/// where it lands (the proxy's outbound or inbound port, or direct) and
/// the rule that takes it (the first OUTPUT counter of `want`). An
/// uncaptured namespace must be refused as such.
fn check_explained(explained: &Result<serde_json::Value, String>, want: &Expect, what: &str) {
    let e = match explained {
        Err(err) if want.output.is_empty() => {
            assert!(err.contains("is not captured"), "{what}: explain: {err}");
            return;
        }
        Err(err) => panic!("{what}: explain failed: {err}"),
        Ok(e) => e,
    };
    assert!(
        !want.output.is_empty(),
        "{what}: explained an uncaptured pod: {e}"
    );
    assert_eq!(
        e["verdict"]["counter"],
        format!("OUTPUT/{}", want.output[0].0),
        "{what}: explain's rule: {e:#}"
    );
    let landed = match want.proxy.first() {
        None => "untouched",
        Some(p) if p.starts_with("outbound ") => "outbound",
        Some(_) => "inbound",
    };
    assert_eq!(
        e["verdict"]["action"], landed,
        "{what}: where explain says it lands: {e:#}"
    );
    // The rule that decided is the last one walked, after every rule before
    // it in the chain.
    let steps = e["steps"].as_array().expect("steps");
    let last = steps.last().expect("a step");
    assert_eq!(last["matched"], true, "{what}: {e:#}");
    assert!(
        steps[..steps.len() - 1]
            .iter()
            .all(|s| s["matched"] == false),
        "{what}: a rule before the deciding one matched: {e:#}"
    );
}

/// The client got through to a server at `dst` (as dialed: getpeername
/// shows it), and that server saw the connection come from `from`.
fn check_reached(r: &ClientReport, dst: &str, from: &str, what: &str) {
    assert!(r.ok, "{what}: {r:?}");
    assert_eq!(
        r.peer.as_deref().map(parse_sa),
        Some(parse_sa(dst)),
        "{what}: getpeername: {r:?}"
    );
    let banner = r.banner.as_deref().unwrap_or_default();
    let field = |name: &str| {
        banner
            .split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .map(parse_sa)
            .unwrap_or_else(|| panic!("{what}: no {name} in greeting {banner:?}"))
    };
    assert_eq!(
        canon(field("local=")),
        canon(parse_sa(dst)),
        "{what}: server reached at: {banner}"
    );
    let from: IpAddr = from.parse().unwrap();
    assert_eq!(
        field("peer=").ip().to_canonical(),
        from,
        "{what}: server saw the connection from: {banner}"
    );
}

fn upstreams() -> [String; 2] {
    [sa(UPSTREAM_V4, UP_PORT), sa(UPSTREAM_V6, UP_PORT)]
}

fn pod_app_addrs(port: u16) -> [String; 2] {
    [sa(POD_V4, port), sa(POD_V6, port)]
}

// ------------------------------------------------------------------ -i

#[test]
fn include_all_captures_v4_v6_and_getpeername_shows_original() {
    let mut rig = Rig::new("iall", &["-i", "*"]);
    let app = rig.app();
    for dst in [
        sa(UPSTREAM_V4, UP_PORT),
        sa(UPSTREAM_V6, UP_PORT),
        sa(UP2_V4, UP_PORT2),
        sa(UP2_V6, UP_PORT2),
    ] {
        rig.check(&app, None, &dst, captured(&dst, CAPTURED, SKIP_UID));
    }
}

#[test]
fn include_cidr_list_mixed_v4_v6() {
    let mut rig = Rig::new("icidr", &["-i", "10.200.0.16/28,fd00:200::10/124"]);
    let app = rig.app();
    for ip in [UP2_V4, UP2_V6] {
        let dst = sa(ip, UP_PORT);
        rig.check(&app, None, &dst, captured(&dst, CAPTURED, SKIP_UID));
    }
    // Not included: straight to the upstream, which answers directly.
    for ip in [UP3_V4, UPSTREAM_V4, UP3_V6, UPSTREAM_V6] {
        let dst = sa(ip, UP_PORT);
        rig.check(&app, None, &dst, direct(pod_ip_for(&dst), NOT_INCLUDED));
    }
}

#[test]
fn include_cidr_list_of_one_family_leaves_the_other_alone() {
    for (tag, list, inside, outside) in [
        ("i4only", "10.200.0.0/24", UPSTREAM_V4, UPSTREAM_V6),
        ("i6only", "fd00:200::/64", UPSTREAM_V6, UPSTREAM_V4),
    ] {
        let mut rig = Rig::new(tag, &["-i", list]);
        let app = rig.app();
        let dst = sa(inside, UP_PORT);
        rig.check(&app, None, &dst, captured(&dst, CAPTURED, SKIP_UID));
        let dst = sa(outside, UP_PORT);
        rig.check(&app, None, &dst, direct(pod_ip_for(&dst), NOT_INCLUDED));
        // The pod's own address is in the list, but "app via lo" (rule 3)
        // comes first.
        let dst = sa(if inside.contains(':') { POD_V6 } else { POD_V4 }, APP_PORT);
        rig.check(&app, None, &dst, direct(pod_ip_for(&dst), APP_LOCAL));
    }
}

// ------------------------------------------------------------------ -x

#[test]
fn exclude_cidr_goes_direct_even_for_include_port() {
    let mut rig = Rig::new(
        "xcidr",
        &[
            "-i",
            "*",
            "-x",
            "10.200.0.0/28,fd00:200::/124",
            "-q",
            "8080",
        ],
    );
    let app = rig.app();
    // -x (rule 5) comes before -q (rule 6) and -i (rule 7).
    for ip in [UPSTREAM_V4, UP3_V4, UPSTREAM_V6, UP3_V6] {
        for port in [UP_PORT, UP_PORT2] {
            let dst = sa(ip, port);
            rig.check(&app, None, &dst, direct(pod_ip_for(&dst), EXCL_CIDR));
        }
    }
    // Just outside the excluded ranges: captured.
    for ip in [UP2_V4, UP2_V6] {
        let dst = sa(ip, UP_PORT2);
        rig.check(&app, None, &dst, captured(&dst, CAPTURED, SKIP_UID));
        let dst = sa(ip, UP_PORT);
        rig.check(&app, None, &dst, captured(&dst, CAPTURED_PORT, SKIP_UID));
    }
}

// ------------------------------------------------------------------ -q

#[test]
fn include_port_captures_outside_include_cidrs() {
    let mut rig = Rig::custom(
        "qport",
        &[APP_PORT, UP_PORT],
        &[],
        &["-i", "10.200.0.16/28,fd00:200::10/124", "-q", "8080,9999"],
    );
    let app = rig.app();
    for ip in [UPSTREAM_V4, UPSTREAM_V6] {
        let dst = sa(ip, UP_PORT);
        rig.check(&app, None, &dst, captured(&dst, CAPTURED_PORT, SKIP_UID));
        let dst = sa(ip, UP_PORT2);
        rig.check(&app, None, &dst, direct(pod_ip_for(&dst), NOT_INCLUDED));
    }
    // Included by -i and by -q: -q (rule 6) decides.
    for ip in [UP2_V4, UP2_V6] {
        let dst = sa(ip, UP_PORT);
        rig.check(&app, None, &dst, captured(&dst, CAPTURED_PORT, SKIP_UID));
    }
    // The app's own address on a -q port: "app via lo" (rule 3) first.
    for dst in pod_app_addrs(UP_PORT) {
        rig.check(&app, None, &dst, direct(pod_ip_for(&dst), APP_LOCAL));
    }
}

#[test]
fn include_port_alone_captures_that_port_only() {
    // No -i at all (istio-iptables' default ""), only -q.
    let mut rig = Rig::new("qonly", &["-q", "8081"]);
    let app = rig.app();
    for ip in [UPSTREAM_V4, UPSTREAM_V6] {
        let dst = sa(ip, UP_PORT2);
        rig.check(&app, None, &dst, captured(&dst, CAPTURED_PORT, SKIP_UID));
        let dst = sa(ip, UP_PORT);
        rig.check(&app, None, &dst, direct(pod_ip_for(&dst), NOT_INCLUDED));
    }
}

// ------------------------------------------------------------------ -o

#[test]
fn exclude_port_wins_over_everything() {
    let mut rig = Rig::custom(
        "oport",
        &[APP_PORT, UP_PORT],
        &[],
        &["-i", "*", "-q", "8080", "-o", "8080,9999"],
    );
    let (app, proxy) = (rig.app(), rig.proxy_user());
    for ip in [UPSTREAM_V4, UPSTREAM_V6] {
        // Over -q and -i '*'.
        let dst = sa(ip, UP_PORT);
        rig.check(&app, None, &dst, direct(pod_ip_for(&dst), EXCL_PORT));
        let dst = sa(ip, UP_PORT2);
        rig.check(&app, None, &dst, captured(&dst, CAPTURED, SKIP_UID));
    }
    for dst in pod_app_addrs(UP_PORT) {
        // Over "proxy to its own address → inbound" (rule 2).
        rig.check(&proxy, None, &dst, direct(pod_ip_for(&dst), EXCL_PORT));
        // Over the 127.0.0.6 / ::6 passthrough (rule 1).
        let src = passthrough_for(&dst);
        rig.check(&proxy, Some(src), &dst, direct(src, EXCL_PORT));
    }
    // Control: another port of the app's own address still goes inbound.
    for dst in pod_app_addrs(APP_PORT) {
        rig.check(&proxy, None, &dst, to_inbound(&dst));
    }
}

// ------------------------------------------------------------- -u / -g

#[test]
fn proxy_uid_outbound_is_untouched() {
    let mut rig = Rig::new("puid", &["-i", "*"]);
    let proxy = rig.proxy_user();
    for dst in upstreams() {
        rig.check(&proxy, None, &dst, direct(pod_ip_for(&dst), SKIP_UID));
    }
    // 127.0.0.1 / ::1: not "inbound" (rule 2 excludes them), rule 4.
    for (dst, from) in [
        (sa("127.0.0.1", APP_PORT), "127.0.0.1"),
        (sa("::1", APP_PORT), "::1"),
    ] {
        rig.check(&proxy, None, &dst, direct(from, SKIP_UID));
    }
    // -g defaults to the -u list: gid 1337 alone is the proxy too (rule 7).
    let gid_only = rig.user(4242, PROXY_UID);
    for dst in upstreams() {
        rig.check(&gid_only, None, &dst, direct(pod_ip_for(&dst), SKIP_GID));
    }
}

#[test]
fn gid_proxy_identity_with_other_uid() {
    // uid block for 2000 first, then the gid block for 1337. The kit proxy
    // runs as 1337:1337, so only its gid marks it as the proxy.
    let mut rig = Rig::new("gidu", &["-i", "*", "-u", "2000", "-g", "1337"]);
    let (app, gid_only, uid2000) = (rig.app(), rig.user(4242, PROXY_UID), rig.user(2000, 2000));
    for dst in upstreams() {
        // Remote: the uid block does not match, rule 7 does.
        rig.check(&gid_only, None, &dst, direct(pod_ip_for(&dst), SKIP_GID));
        rig.check(&uid2000, None, &dst, direct(pod_ip_for(&dst), SKIP_UID));
        // The app is captured; the proxy's own upstream leg is rule 7.
        rig.check(&app, None, &dst, captured(&dst, CAPTURED, SKIP_GID));
    }
    for dst in pod_app_addrs(APP_PORT) {
        // Local: "-o lo ! --uid-owner 2000 -j RETURN" (rule 3) catches the
        // gid-1337 process before the gid block's rule 5 could.
        rig.check(&gid_only, None, &dst, direct(pod_ip_for(&dst), APP_LOCAL));
        rig.check(&uid2000, None, &dst, to_inbound(&dst));
    }
}

#[test]
fn gid_only_proxy_identity_rules_5_6_7() {
    let mut rig = Rig::custom(
        "gido",
        &[APP_PORT, TUNNEL_PORT],
        &[],
        &["-i", "*", "-u", "", "-g", "1337"],
    );
    let (app, gid_only) = (rig.app(), rig.user(4242, PROXY_UID));
    for dst in pod_app_addrs(APP_PORT) {
        // (5) the proxy gid to its own address → inbound port.
        rig.check(&gid_only, None, &dst, to_inbound(&dst));
        // (6) anyone else via lo → untouched.
        rig.check(&app, None, &dst, direct(pod_ip_for(&dst), APP_LOCAL));
    }
    for dst in pod_app_addrs(TUNNEL_PORT) {
        // (5) spares the tunnel port; (7) then leaves the proxy alone.
        rig.check(&gid_only, None, &dst, direct(pod_ip_for(&dst), SKIP_GID));
    }
    for dst in upstreams() {
        rig.check(&gid_only, None, &dst, direct(pod_ip_for(&dst), SKIP_GID));
        rig.check(&app, None, &dst, captured(&dst, CAPTURED, SKIP_GID));
    }
}

#[test]
fn several_proxy_uids() {
    // -g defaults to the same list.
    let mut rig = Rig::new("uids", &["-i", "*", "-u", "1337,2000"]);
    let (app, proxy, uid2000, gid2000) = (
        rig.app(),
        rig.proxy_user(),
        rig.user(2000, 2000),
        rig.user(4242, 2000),
    );
    for dst in upstreams() {
        rig.check(&uid2000, None, &dst, direct(pod_ip_for(&dst), SKIP_UID));
        rig.check(&gid2000, None, &dst, direct(pod_ip_for(&dst), SKIP_GID));
        rig.check(&proxy, None, &dst, direct(pod_ip_for(&dst), SKIP_UID));
        rig.check(&app, None, &dst, captured(&dst, CAPTURED, SKIP_UID));
    }
    for dst in pod_app_addrs(APP_PORT) {
        rig.check(&proxy, None, &dst, to_inbound(&dst));
        // istio-iptables emits the three rules per id: uid 1337's
        // "-o lo ! --uid-owner 1337 -j RETURN" catches uid 2000 first.
        rig.check(&uid2000, None, &dst, direct(pod_ip_for(&dst), APP_LOCAL));
    }
}

// ------------------------------------------------- rules 1, 2, 3, 8 (lo)

#[test]
fn passthrough_source_is_untouched() {
    let mut rig = Rig::new("pass", &["-i", "*"]);
    let (app, proxy) = (rig.app(), rig.proxy_user());
    for dst in pod_app_addrs(APP_PORT) {
        let src = passthrough_for(&dst);
        // Without rule 1 the proxy uid would go to the inbound port (rule 2).
        rig.check(&proxy, Some(src), &dst, direct(src, PASSTHROUGH));
        // Rule 1 does not look at the owner.
        rig.check(&app, Some(src), &dst, direct(src, PASSTHROUGH));
    }
    for (dst, src) in [
        (sa("127.0.0.5", APP_PORT), PASS_V4),
        (sa(PASS_V6, APP_PORT), PASS_V6),
    ] {
        rig.check(&proxy, Some(src), &dst, direct(src, PASSTHROUGH));
    }
}

#[test]
fn proxy_to_own_address_goes_to_inbound_port() {
    let mut rig = Rig::new("self", &["-i", "*"]);
    let proxy = rig.proxy_user();
    for dst in pod_app_addrs(APP_PORT) {
        rig.check(&proxy, None, &dst, to_inbound(&dst));
    }
    // istio-iptables --run-validation's shape: from 127.0.0.1 to
    // 127.0.0.6 → inbound port, SO_ORIGINAL_DST = 127.0.0.6:port.
    let dst = sa(PASS_V4, APP_PORT);
    rig.check(&proxy, Some("127.0.0.1"), &dst, to_inbound(&dst));
    // The same from ::1 to ::6.
    let dst = sa(PASS_V6, APP_PORT);
    rig.check(&proxy, Some("::1"), &dst, to_inbound(&dst));
}

#[test]
fn proxy_dialing_unbound_passthrough_v6_address_meets_rule_1() {
    // ip6tables' "-o lo -s ::6/128 -j RETURN" sees the source the kernel
    // chose: dialing [::6] unbound picks ::6 (RFC 6724 rule 1, same
    // address), so iptables leaves it alone.
    let mut rig = Rig::new("pass6", &["-i", "*"]);
    let proxy = rig.proxy_user();
    let dst = sa(PASS_V6, APP_PORT);
    rig.check(&proxy, None, &dst, direct(PASS_V6, PASSTHROUGH));
}

#[test]
fn tunnel_port_is_not_sent_to_inbound() {
    // Default -e 15008, then a custom one.
    for (tag, flags, tunnel, other) in [
        ("tun", &["-i", "*"][..], TUNNEL_PORT, APP_PORT),
        (
            "tune",
            &["-i", "*", "-e", "9080"][..],
            APP_PORT,
            TUNNEL_PORT,
        ),
    ] {
        let mut rig = Rig::custom(tag, &[APP_PORT, TUNNEL_PORT], &[], flags);
        let proxy = rig.proxy_user();
        for dst in pod_app_addrs(tunnel) {
            rig.check(&proxy, None, &dst, direct(pod_ip_for(&dst), SKIP_UID));
        }
        for dst in pod_app_addrs(other) {
            rig.check(&proxy, None, &dst, to_inbound(&dst));
        }
    }
}

#[test]
fn app_to_local_addresses_is_untouched() {
    let mut rig = Rig::new("local", &["-i", "*"]);
    let app = rig.app();
    for dst in pod_app_addrs(APP_PORT) {
        rig.check(&app, None, &dst, direct(pod_ip_for(&dst), APP_LOCAL));
    }
    // 127.0.0.1 / ::1 meet rule 3 before rule 8, as under iptables.
    for (ip, from) in [
        ("127.0.0.1", "127.0.0.1"),
        ("127.0.0.5", "127.0.0.1"),
        ("::1", "::1"),
    ] {
        rig.check(&app, None, &sa(ip, APP_PORT), direct(from, APP_LOCAL));
    }
}

#[test]
fn include_naming_loopback_drops_app_local_rule() {
    // A v4 loopback range in -i drops rules 3/6 for both families.
    let mut rig = Rig::new("ilo", &["-i", "127.0.0.0/8,fd00:200::2/128"]);
    let app = rig.app();
    // Captured; the proxy then dials a local non-127.0.0.1 address as 1337
    // (rule 2 → inbound port) and reaches the app from 127.0.0.6 / ::6.
    for dst in [sa("127.0.0.5", APP_PORT), sa(POD_V6, APP_PORT)] {
        let orig = canon(parse_sa(&dst));
        let want = Expect {
            proxy: vec![format!("outbound {orig}"), format!("inbound {orig}")],
            from: passthrough_for(&dst).into(),
            output: vec![(CAPTURED, 1), (TO_INBOUND, 1), (PASSTHROUGH, 1)],
        };
        rig.check(&app, None, &dst, want);
    }
    // 127.0.0.1 / ::1 stay untouched, now by rule 8.
    for (ip, from) in [("127.0.0.1", "127.0.0.1"), ("::1", "::1")] {
        rig.check(&app, None, &sa(ip, APP_PORT), direct(from, LOOPBACK));
    }
    // Local but not in -i: rule 3 is gone, so "not included".
    let dst = sa(POD_V4, APP_PORT);
    rig.check(&app, None, &dst, direct(POD_V4, NOT_INCLUDED));
    for dst in upstreams() {
        rig.check(&app, None, &dst, direct(pod_ip_for(&dst), NOT_INCLUDED));
    }
}

#[test]
fn include_naming_v4_mapped_loopback_drops_app_local_rule() {
    // Regression (found by the differential test, seed 7): istio-iptables
    // judges "-i names a loopback address" with Go's IsLoopback, which
    // unmaps ::ffff:127.0.0.1, so rules 3/6 are left out here too.
    let mut rig = Rig::new("imaplo", &["-i", "::ffff:127.0.0.1/128,0.0.0.0/0"]);
    let app = rig.app();
    let dst = sa(POD_V4, APP_PORT);
    let orig = canon(parse_sa(&dst));
    let want = Expect {
        proxy: vec![format!("outbound {orig}"), format!("inbound {orig}")],
        from: PASS_V4.into(),
        output: vec![(CAPTURED, 1), (TO_INBOUND, 1), (PASSTHROUGH, 1)],
    };
    rig.check(&app, None, &dst, want);
}

#[test]
fn include_default_routes_keep_app_local_rule() {
    // istio-iptables sets HasLoopBackIP from the prefix's *address*
    // (netip.Prefix.Addr().IsLoopback()): 0.0.0.0/0 and ::/0 capture
    // everything remote but keep "-o lo ! --uid-owner 1337 -j RETURN".
    let mut rig = Rig::new("idef", &["-i", "0.0.0.0/0,::/0"]);
    let app = rig.app();
    for dst in upstreams() {
        rig.check(&app, None, &dst, captured(&dst, CAPTURED, SKIP_UID));
    }
    for dst in pod_app_addrs(APP_PORT) {
        rig.check(&app, None, &dst, direct(pod_ip_for(&dst), APP_LOCAL));
    }
    rig.check(
        &app,
        None,
        &sa("127.0.0.5", APP_PORT),
        direct("127.0.0.1", APP_LOCAL),
    );
}

// ------------------------------------------------------ v4-mapped IPv6

#[test]
fn v4_mapped_destination_is_decided_as_ipv4() {
    // A dual-stack socket dialing ::ffff:a.b.c.d makes an IPv4 connection:
    // the v4 lists apply, as in iptables (not ip6tables).
    let mut rig = Rig::new("mapped", &["-i", "10.200.0.0/24", "-x", "10.200.0.11/32"]);
    let app = rig.app();
    // Captured, and the proxy's SO_ORIGINAL_DST answer is IPv4.
    let dst = format!("[::ffff:{UPSTREAM_V4}]:{UP_PORT}");
    rig.check(&app, None, &dst, captured(&dst, CAPTURED, SKIP_UID));
    let dst = format!("[::ffff:{UP2_V4}]:{UP_PORT2}");
    rig.check(&app, None, &dst, captured(&dst, CAPTURED, SKIP_UID));
    // -x 10.200.0.11/32 excludes its mapped form.
    let dst = format!("[::ffff:{UP3_V4}]:{UP_PORT}");
    rig.check(&app, None, &dst, direct(POD_V4, EXCL_CIDR));
    // Mapped loopback / own address: "via lo" as IPv4.
    let dst = format!("[::ffff:{POD_V4}]:{APP_PORT}");
    rig.check(&app, None, &dst, direct(POD_V4, APP_LOCAL));
}

#[test]
fn v4_mapped_destination_not_in_v4_list_is_untouched() {
    // The v6 list names ::ffff:0:0/96, but the connection is IPv4 and the
    // v4 list is empty.
    let mut rig = Rig::new("mapped6", &["-i", "fd00:200::/64,::ffff:0:0/96"]);
    let app = rig.app();
    let dst = format!("[::ffff:{UPSTREAM_V4}]:{UP_PORT}");
    rig.check(&app, None, &dst, direct(POD_V4, NOT_INCLUDED));
    let dst = sa(UPSTREAM_V6, UP_PORT);
    rig.check(&app, None, &dst, captured(&dst, CAPTURED, SKIP_UID));
}

// ------------------------------------------------------- -p / -z ports

#[test]
fn custom_capture_ports_p_z() {
    let mut rig = Rig::custom(
        "pz",
        &[APP_PORT],
        &["--outbound-port", "16001", "--inbound-port", "16006"],
        &["-i", "*", "-p", "16001", "-z", "16006"],
    );
    let (app, proxy) = (rig.app(), rig.proxy_user());
    for dst in upstreams() {
        rig.check(&app, None, &dst, captured(&dst, CAPTURED, SKIP_UID));
    }
    for dst in pod_app_addrs(APP_PORT) {
        rig.check(&proxy, None, &dst, to_inbound(&dst));
    }
}

// ------------------------------------------------------- not TCP, -n

/// Run `f` on a thread that joined the netns at `ns` (only that thread).
fn in_netns<T: Send + 'static>(ns: PathBuf, f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        let file = std::fs::File::open(&ns).unwrap_or_else(|e| panic!("{}: {e}", ns.display()));
        assert_eq!(
            unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) },
            0,
            "setns {}",
            ns.display()
        );
        f()
    })
    .join()
    .expect("netns thread")
}

#[test]
fn udp_is_not_captured() {
    let rig = Rig::new("udp", &["-i", "*"]);
    for ip in [UPSTREAM_V4, UPSTREAM_V6] {
        let dst = SocketAddr::new(ip.parse().unwrap(), 5353);
        let sock = in_netns(rig.pod.topo.upstream.path(), move || {
            UdpSocket::bind(dst).expect("udp bind in upstream")
        });
        sock.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let before = rig.counters();
        // bash's /dev/udp connect()s a UDP socket: the connect hook runs.
        let mut cmd = Command::new("bash");
        cmd.args(["-c", &format!("echo ping >/dev/udp/{ip}/5353")]);
        redirect_testbed::sandbox::place(&mut cmd, &rig.app()).unwrap();
        let st = cmd.status().expect("bash");
        assert!(st.success(), "udp send to {dst}: {st}");
        let mut buf = [0u8; 64];
        let (n, from) = sock
            .recv_from(&mut buf)
            .unwrap_or_else(|e| panic!("nothing arrived at {dst}: {e}"));
        assert_eq!(&buf[..n], b"ping\n");
        assert_eq!(
            from.ip(),
            pod_ip_for(&dst.to_string()).parse::<IpAddr>().unwrap()
        );
        let after = rig.counters();
        let changed: Vec<_> = after
            .iter()
            .filter(|(k, v)| before.get(*k) != Some(v))
            .collect();
        assert_eq!(
            changed,
            vec![(
                &format!("OUTPUT/{NOT_TCP}"),
                &(before[&format!("OUTPUT/{NOT_TCP}")] + 1)
            )],
            "{dst}"
        );
    }
}

#[test]
fn dry_run_changes_nothing() {
    let mut pod = Pod::new("dry");
    pod.start_upstream(UP_PORT);
    let proxy = pod.start_proxy();
    let out = pod.attach(&["-n", "-i", "*"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("dry run"),
        "{out:?}"
    );
    for dst in upstreams() {
        let r = pod.app_client(&dst);
        check_reached(&r, &dst, pod_ip_for(&dst), &dst);
    }
    assert!(
        pod.proxy_log(proxy).is_empty(),
        "the proxy saw a connection"
    );
    assert!(
        !pod.pin_dir.exists(),
        "dry run created {}",
        pod.pin_dir.display()
    );
}

// -------------------------------------------------- unmanaged netns

#[test]
fn unmanaged_netns_in_pod_cgroup_is_untouched() {
    let mut rig = Rig::new("unman", &["-i", "*"]);
    // A twin of the pod: same addresses, its own upstream, not attached.
    let x = NetnsGuard::new(&unique("rdx-")).expect("netns");
    let y = NetnsGuard::new(&unique("rdy-")).expect("netns");
    let (a, b) = (unique("vxa"), unique("vxb"));
    run(
        "ip",
        &[
            "link", "add", &a, "netns", &x.name, "type", "veth", "peer", "name", &b, "netns",
            &y.name,
        ],
    )
    .expect("veth");
    for (ns, dev, v4, v6) in [(&x, &a, POD_V4, POD_V6), (&y, &b, UPSTREAM_V4, UPSTREAM_V6)] {
        ns.ip(&["link", "set", dev, "name", "eth0"]).unwrap();
        ns.ip(&["addr", "add", &format!("{v4}/24"), "dev", "eth0"])
            .unwrap();
        ns.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{v6}/64"),
            "dev",
            "eth0",
            "nodad",
        ])
        .unwrap();
        ns.ip(&["link", "set", "eth0", "up"]).unwrap();
    }
    // Port 8082: only the twin serves it, so a capture by mistake (through
    // the pod's proxy) could not succeed.
    let mut cmd = Command::new(kit_bin());
    cmd.args(["echo", "--listen", "0.0.0.0:8082", "--listen", "[::]:8082"]);
    let _twin = ChildGuard::spawn(
        "twin-upstream",
        cmd,
        &Placement {
            netns: Some(y.path()),
            ..Placement::default()
        },
        true,
    )
    .expect("twin upstream");
    let in_twin = Placement {
        netns: Some(x.path()),
        cgroup: Some(rig.pod.topo.cgroup.path.clone()),
        uid: Some(APP_UID),
        gid: Some(APP_UID),
    };
    for dst in [sa(UPSTREAM_V4, 8082), sa(UPSTREAM_V6, 8082)] {
        rig.check(
            &in_twin,
            None,
            &dst,
            Expect {
                proxy: vec![],
                from: pod_ip_for(&dst).into(),
                output: vec![],
            },
        );
    }
    // The pod itself is still captured.
    let app = rig.app();
    for dst in upstreams() {
        rig.check(&app, None, &dst, captured(&dst, CAPTURED, SKIP_UID));
    }
    // Only the pod is known to the install.
    let all = rig.pod.redirect(&["stats", "--json"]);
    let all: serde_json::Value = serde_json::from_slice(&all.stdout).expect("stats json");
    assert_eq!(all.as_array().map(Vec::len), Some(1), "{all}");
}
