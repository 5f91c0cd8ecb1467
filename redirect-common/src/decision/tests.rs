//! Host tests of the decision logic: one case per rule of istio-iptables'
//! nat OUTPUT and PREROUTING chains, DNS capture and owner groups included.
use super::*;
use crate::{flags, port_kind, Reason, MAX_IDS};
use std::net::IpAddr;

#[derive(Default)]
struct Maps {
    ports: Vec<(u16, u16)>,
    cidrs: Vec<(u32, IpAddr, u8)>,
    /// (prefix, len, entry): the pod's routes, longest prefix wins.
    routes: Vec<(IpAddr, u8, crate::RouteEntry)>,
}

fn bytes(ip: IpAddr) -> [u8; 16] {
    let mut b = [0u8; 16];
    match ip {
        IpAddr::V4(a) => b[..4].copy_from_slice(&a.octets()),
        IpAddr::V6(a) => b = a.octets(),
    }
    b
}

fn prefix_match(a: &[u8; 16], b: &[u8; 16], bits: u8) -> bool {
    (0..bits as usize).all(|i| (a[i / 8] >> (7 - i % 8)) & 1 == (b[i / 8] >> (7 - i % 8)) & 1)
}

impl Lookup for Maps {
    fn port_listed(&self, kind: u16, port: u16) -> bool {
        self.ports.contains(&(kind, port))
    }
    fn cidr_contains(&self, kind: u32, addr: &[u8; 16]) -> bool {
        self.cidrs
            .iter()
            .any(|(k, ip, bits)| *k == kind && prefix_match(&bytes(*ip), addr, *bits))
    }
    fn route(&self, family: u16, addr: &[u8; 16]) -> Option<crate::RouteEntry> {
        self.routes
            .iter()
            .filter(|(ip, bits, _)| {
                crate::decision::family(ip.is_ipv6()) == family
                    && prefix_match(&bytes(*ip), addr, *bits)
            })
            .max_by_key(|(_, bits, _)| *bits)
            .map(|(_, _, r)| *r)
    }
}

fn route(src: Option<&str>, ifindex: u32, excluded: bool) -> crate::RouteEntry {
    let mut flags = 0;
    if src.is_some() {
        flags |= crate::route_flags::HAS_SRC;
    }
    if excluded {
        flags |= crate::route_flags::EXCLUDED_IFACE;
    }
    crate::RouteEntry {
        src: src.map(|s| bytes(s.parse().unwrap())).unwrap_or([0; 16]),
        ifindex,
        flags,
    }
}

/// A pod with eth0 (10.1.0.5/24, fd00::5/64, default routes) and net1
/// (10.7.0.5/16, a route to 10.8.0.0/16 via it, and 10.8.1.0/24 back via
/// eth0), net1 named by `-c`.
fn multi_homed() -> (PodConfig, Maps) {
    let mut cfg = istio_cfg();
    cfg.flags |= flags::OUT_EXCLUDE_IFACES;
    let mut m = pod_maps();
    m.cidrs
        .push((cidr_kind::LOCAL_V4, "10.7.0.5".parse().unwrap(), 32));
    let r = |p: &str, len, e| (p.parse().unwrap(), len, e);
    m.routes = vec![
        r("0.0.0.0", 0, route(Some("10.1.0.5"), 2, false)),
        r("10.1.0.0", 24, route(Some("10.1.0.5"), 2, false)),
        r("10.7.0.0", 16, route(Some("10.7.0.5"), 3, true)),
        r("10.8.0.0", 16, route(Some("10.7.0.5"), 3, true)),
        r("10.8.1.0", 24, route(Some("10.1.0.5"), 2, false)),
        r("::", 0, route(Some("fd00::5"), 2, false)),
        r("fd07::", 64, route(None, 3, true)),
    ];
    (cfg, m)
}

#[test]
fn excluded_interface_route_is_untouched_first() {
    let (cfg, m) = multi_homed();
    let v = |d, uid| out(&cfg, &m, conn(d, 80, uid, uid));
    for d in ["10.7.3.3", "10.8.9.9", "fd07::9"] {
        assert_eq!(
            v(d, 1000),
            Verdict::Untouched(Reason::OutExcludedInterface),
            "{d}"
        );
    }
    // OUTPUT -o net1 -j RETURN comes before every ISTIO_OUTPUT rule: -o
    // ports too, and the proxy's own connections are counted there.
    let mut with_port = m;
    with_port.ports.push((port_kind::OUT_EXCLUDE, 80));
    assert_eq!(
        out(&cfg, &with_port, conn("10.8.9.9", 80, 1337, 1337)),
        Verdict::Untouched(Reason::OutExcludedInterface)
    );
    let (cfg, m) = multi_homed();
    let v = |d, uid| out(&cfg, &m, conn(d, 80, uid, uid));
    // The longer prefix back through eth0 is captured, as the default.
    assert_eq!(
        v("10.8.1.1", 1000),
        Verdict::ToOutbound(Reason::OutCaptured)
    );
    assert_eq!(
        v("10.2.0.9", 1000),
        Verdict::ToOutbound(Reason::OutCaptured)
    );
    // Local destinations leave through lo, whatever interface holds them.
    assert_eq!(v("10.7.0.5", 1000), Verdict::Untouched(Reason::OutAppLocal));
    // Without -c the routes are not looked at.
    let mut no_c = cfg;
    no_c.flags &= !flags::OUT_EXCLUDE_IFACES;
    assert_eq!(
        out(&no_c, &m, conn("10.8.9.9", 80, 1000, 1000)),
        Verdict::ToOutbound(Reason::OutCaptured)
    );
}

#[test]
fn redirect_source_is_the_routes_or_the_local_destination() {
    let (cfg, m) = multi_homed();
    let src = |d: &str, uid| {
        let c = conn(d, 80, uid, uid);
        let v = out(&cfg, &m, c);
        redirect_source(v, c.family, &c.dst, &m).map(|b| {
            if c.family == crate::AF_INET {
                IpAddr::from([b[0], b[1], b[2], b[3]])
            } else {
                IpAddr::from(b)
            }
        })
    };
    let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
    assert_eq!(src("10.2.0.9", 1000), ip("10.1.0.5"));
    assert_eq!(src("10.8.1.1", 1000), ip("10.1.0.5"));
    assert_eq!(src("fd00:2::9", 1000), ip("fd00::5"));
    // Proxy to its own addresses (rules 2/5): the address itself; to
    // 127.0.0.0/8 the rewrite's 127.0.0.1 is already right.
    assert_eq!(src("10.7.0.5", 1337), ip("10.7.0.5"));
    assert_eq!(src("fd00::5", 1337), ip("fd00::5"));
    assert_eq!(src("127.0.0.6", 1337), None);
    // Left alone: nothing to bind.
    assert_eq!(src("10.8.9.9", 1000), None);
    assert_eq!(src("10.2.0.9", 1337), None);
    // No route, or a route without a source: none.
    let bare = Maps {
        routes: vec![("fd00::".parse().unwrap(), 8, route(None, 2, false))],
        ..pod_maps()
    };
    let c = conn("10.2.0.9", 80, 1000, 1000);
    assert_eq!(
        redirect_source(out(&cfg, &bare, c), c.family, &c.dst, &bare),
        None
    );
    let c = conn("fd00:2::9", 80, 1000, 1000);
    assert_eq!(
        redirect_source(out(&cfg, &bare, c), c.family, &c.dst, &bare),
        None
    );
}

#[test]
fn virt_interface_connections_follow_the_include_list_only() {
    let (cfg, mut m) = (istio_cfg(), pod_maps());
    let d = |s: &str| bytes(s.parse().unwrap());
    // -i '*': every destination, the pod's own addresses and -x ranges too.
    m.cidrs
        .push((cidr_kind::EXCLUDE_V4, "10.3.0.0".parse().unwrap(), 16));
    for (fam, dst) in [
        (crate::AF_INET, "10.2.0.9"),
        (crate::AF_INET, "10.3.0.9"),
        (crate::AF_INET, "10.1.0.5"),
        (crate::AF_INET6, "fd00:2::9"),
    ] {
        assert_eq!(
            virt_verdict(&cfg, fam, &d(dst), &m),
            Verdict::ToOutbound(Reason::InVirtCaptured),
            "{dst}"
        );
    }
    // -i CIDRs: only those, per family.
    let mut cidrs = cfg;
    cidrs.flags = 0;
    m.cidrs
        .push((cidr_kind::INCLUDE_V4, "10.2.0.0".parse().unwrap(), 16));
    assert_eq!(
        virt_verdict(&cidrs, crate::AF_INET, &d("10.2.0.9"), &m),
        Verdict::ToOutbound(Reason::InVirtCaptured)
    );
    for (fam, dst) in [(crate::AF_INET, "10.9.0.9"), (crate::AF_INET6, "fd00:2::9")] {
        assert_eq!(
            virt_verdict(&cidrs, fam, &d(dst), &m),
            Verdict::Untouched(Reason::InVirtNotIncluded),
            "{dst}"
        );
    }
}

fn istio_cfg() -> PodConfig {
    let mut uids = [0; MAX_IDS];
    uids[0] = 1337;
    PodConfig {
        proxy_port: 15001,
        inbound_port: 15006,
        tunnel_port: 15008,
        _pad0: 0,
        flags: flags::OUT_INCLUDE_ALL | flags::IN_CAPTURE_ALL,
        uid_count: 1,
        gid_count: 1,
        netns_inode: 0,
        uids,
        gids: uids,
    }
}

fn pod_maps() -> Maps {
    Maps {
        ports: vec![
            (port_kind::IN_EXCLUDE, 15090),
            (port_kind::IN_EXCLUDE, 15021),
            (port_kind::IN_EXCLUDE, 15020),
        ],
        cidrs: vec![
            (cidr_kind::LOCAL_V4, "10.1.0.5".parse().unwrap(), 32),
            (cidr_kind::LOCAL_V6, "fd00::5".parse().unwrap(), 128),
            // attach puts ::6 on the pod's lo, as istio-iptables does.
            (cidr_kind::LOCAL_V6, "::6".parse().unwrap(), 128),
        ],
        routes: Vec::new(),
    }
}

fn conn(dst: &str, dport: u16, uid: u32, gid: u32) -> Outbound {
    let ip: IpAddr = dst.parse().unwrap();
    Outbound {
        family: family(ip.is_ipv6()),
        proto: crate::IPPROTO_TCP,
        dst: bytes(ip),
        dport,
        src: [0; 16],
        uid,
        gid,
    }
}

/// The verdict, checked against the observed run of the same decision:
/// the same verdict, told by the last step and by no other.
fn out(cfg: &PodConfig, m: &Maps, c: Outbound) -> Verdict {
    let v = outbound_verdict(cfg, &c, m);
    let steps = observed_out(cfg, m, c);
    assert_consistent(&steps, v);
    v
}

#[derive(Default)]
struct Steps(Vec<(Step, Option<Verdict>)>);

impl Observer for Steps {
    fn step(&mut self, step: Step, decided: Option<Verdict>) {
        self.0.push((step, decided));
    }
}

fn observed_out(cfg: &PodConfig, m: &Maps, c: Outbound) -> Vec<(Step, Option<Verdict>)> {
    let mut o = Steps::default();
    outbound_verdict_observed(cfg, &c, m, &mut o);
    o.0
}

fn observed_in(cfg: &PodConfig, m: &Maps, port: u16) -> Vec<(Step, Option<Verdict>)> {
    observed_in_family(cfg, m, crate::AF_INET, port)
}

fn observed_in_family(
    cfg: &PodConfig,
    m: &Maps,
    family: u16,
    port: u16,
) -> Vec<(Step, Option<Verdict>)> {
    let mut o = Steps::default();
    let v = inbound_verdict_observed(cfg, family, port, m, &mut o);
    assert_eq!(v, inbound_verdict(cfg, family, port, m));
    assert_consistent(&o.0, v);
    o.0
}

fn assert_consistent(steps: &[(Step, Option<Verdict>)], v: Verdict) {
    let decided: Vec<usize> = (0..steps.len()).filter(|&i| steps[i].1.is_some()).collect();
    assert_eq!(
        decided,
        vec![steps.len() - 1],
        "one step decides, the last: {steps:?}"
    );
    assert_eq!(steps.last().unwrap().1, Some(v), "{steps:?}");
}

#[test]
fn app_to_remote_is_captured_v4_v6() {
    let (cfg, m) = (istio_cfg(), pod_maps());
    for dst in ["10.2.0.9", "fd00:2::9"] {
        assert_eq!(
            out(&cfg, &m, conn(dst, 80, 1000, 1000)),
            Verdict::ToOutbound(Reason::OutCaptured),
            "{dst}"
        );
    }
}

#[test]
fn proxy_uid_outbound_is_untouched() {
    let (cfg, m) = (istio_cfg(), pod_maps());
    assert_eq!(
        out(&cfg, &m, conn("10.2.0.9", 80, 1337, 0)),
        Verdict::Untouched(Reason::OutProxyUid)
    );
}

#[test]
fn proxy_gid_only_is_untouched() {
    let (cfg, m) = (istio_cfg(), pod_maps());
    assert_eq!(
        out(&cfg, &m, conn("fd00:2::9", 80, 4242, 1337)),
        Verdict::Untouched(Reason::OutProxyGid)
    );
}

#[test]
fn excluded_port_wins_over_everything() {
    let (cfg, mut m) = (istio_cfg(), pod_maps());
    m.ports.push((port_kind::OUT_EXCLUDE, 5432));
    m.ports.push((port_kind::OUT_INCLUDE, 5432));
    let mut c = conn("10.1.0.5", 5432, 1337, 1337);
    c.src = bytes("127.0.0.6".parse().unwrap());
    assert_eq!(
        out(&cfg, &m, c),
        Verdict::Untouched(Reason::OutExcludedPort)
    );
}

#[test]
fn passthrough_source_via_lo_is_untouched() {
    let (cfg, m) = (istio_cfg(), pod_maps());
    for (src, dst) in [
        ("127.0.0.6", "10.1.0.5"),
        ("::6", "fd00::5"),
        ("127.0.0.6", "127.0.0.1"),
    ] {
        let mut c = conn(dst, 8080, 1337, 1337);
        c.src = bytes(src.parse().unwrap());
        assert_eq!(
            out(&cfg, &m, c),
            Verdict::Untouched(Reason::OutPassthrough),
            "{src}->{dst}"
        );
    }
    // Unbound IPv6 to ::6 gets source ::6 from the kernel: rule 1.
    assert_eq!(
        out(&cfg, &m, conn("::6", 8080, 1337, 1337)),
        Verdict::Untouched(Reason::OutPassthrough)
    );
    // 127.0.0.6 as source towards a remote address is not "via lo".
    let mut c = conn("10.2.0.9", 80, 1000, 1000);
    c.src = bytes("127.0.0.6".parse().unwrap());
    assert_eq!(out(&cfg, &m, c), Verdict::ToOutbound(Reason::OutCaptured));
}

#[test]
fn proxy_to_own_pod_ip_goes_to_inbound_port() {
    let (cfg, m) = (istio_cfg(), pod_maps());
    for dst in ["10.1.0.5", "127.0.0.6", "fd00::5"] {
        assert_eq!(
            out(&cfg, &m, conn(dst, 8080, 1337, 1337)),
            Verdict::ToInbound(Reason::OutProxyToSelf),
            "{dst}"
        );
    }
    // A process with only the proxy gid meets rule (3) of the uid block
    // first, exactly as under iptables...
    assert_eq!(
        out(&cfg, &m, conn("10.1.0.5", 8080, 99, 1337)),
        Verdict::Untouched(Reason::OutAppLocal)
    );
    // ...and rule (5) when no uid is configured.
    let mut gid_only = cfg;
    gid_only.uid_count = 0;
    assert_eq!(
        out(&gid_only, &m, conn("10.1.0.5", 8080, 99, 1337)),
        Verdict::ToInbound(Reason::OutProxyToSelf)
    );
}

#[test]
fn proxy_to_self_on_tunnel_port_is_untouched() {
    let (cfg, m) = (istio_cfg(), pod_maps());
    assert_eq!(
        out(&cfg, &m, conn("10.1.0.5", 15008, 1337, 1337)),
        Verdict::Untouched(Reason::OutProxyUid)
    );
}

#[test]
fn proxy_to_localhost_is_untouched() {
    let (cfg, m) = (istio_cfg(), pod_maps());
    assert_eq!(
        out(&cfg, &m, conn("127.0.0.1", 15000, 1337, 1337)),
        Verdict::Untouched(Reason::OutProxyUid)
    );
    assert_eq!(
        out(&cfg, &m, conn("::1", 15000, 1337, 1337)),
        Verdict::Untouched(Reason::OutProxyUid)
    );
}

#[test]
fn app_to_local_addresses_stays_local() {
    let (cfg, m) = (istio_cfg(), pod_maps());
    for dst in ["10.1.0.5", "127.0.0.1", "127.1.2.3", "::1", "fd00::5"] {
        assert_eq!(
            out(&cfg, &m, conn(dst, 8080, 1000, 1000)),
            Verdict::Untouched(Reason::OutAppLocal),
            "{dst}"
        );
    }
}

#[test]
fn include_with_loopback_drops_rule_3_but_keeps_127_0_0_1() {
    let (mut cfg, mut m) = (istio_cfg(), pod_maps());
    cfg.flags = flags::OUT_INCLUDE_HAS_LOOPBACK;
    m.cidrs
        .push((cidr_kind::INCLUDE_V4, "127.0.0.0".parse().unwrap(), 8));
    assert_eq!(
        out(&cfg, &m, conn("127.0.0.1", 80, 1000, 1000)),
        Verdict::Untouched(Reason::OutLoopback)
    );
    assert_eq!(
        out(&cfg, &m, conn("127.0.0.5", 80, 1000, 1000)),
        Verdict::ToOutbound(Reason::OutCaptured)
    );
}

#[test]
fn exclude_cidr_then_include_port_then_include_cidr() {
    let (mut cfg, mut m) = (istio_cfg(), pod_maps());
    cfg.flags = 0;
    m.cidrs
        .push((cidr_kind::EXCLUDE_V4, "10.3.0.0".parse().unwrap(), 16));
    m.cidrs
        .push((cidr_kind::INCLUDE_V4, "10.2.0.0".parse().unwrap(), 16));
    m.cidrs
        .push((cidr_kind::EXCLUDE_V6, "fd00:3::".parse().unwrap(), 32));
    m.ports.push((port_kind::OUT_INCLUDE, 443));
    let v = |d, p| out(&cfg, &m, conn(d, p, 1000, 1000));
    assert_eq!(
        v("10.3.1.1", 443),
        Verdict::Untouched(Reason::OutExcludedCidr)
    );
    assert_eq!(
        v("fd00:3::1", 443),
        Verdict::Untouched(Reason::OutExcludedCidr)
    );
    assert_eq!(
        v("10.9.1.1", 443),
        Verdict::ToOutbound(Reason::OutCapturedPort)
    );
    assert_eq!(v("10.2.1.1", 80), Verdict::ToOutbound(Reason::OutCaptured));
    assert_eq!(
        v("10.9.1.1", 80),
        Verdict::Untouched(Reason::OutNotIncluded)
    );
    // v6 has its own include list: none given, so not included.
    assert_eq!(
        v("fd00:2::1", 80),
        Verdict::Untouched(Reason::OutNotIncluded)
    );
}

#[test]
fn several_uids_follow_istio_rule_order() {
    let (mut cfg, m) = (istio_cfg(), pod_maps());
    cfg.uids[1] = 2000;
    cfg.uid_count = 2;
    cfg.gid_count = 0;
    // uid 2000 calling its own pod IP: the "! --uid-owner 1337" RETURN of
    // the first uid's block matches before the second uid's redirect.
    assert_eq!(
        out(&cfg, &m, conn("10.1.0.5", 80, 2000, 0)),
        Verdict::Untouched(Reason::OutAppLocal)
    );
    assert_eq!(
        out(&cfg, &m, conn("10.2.0.9", 80, 2000, 0)),
        Verdict::Untouched(Reason::OutProxyUid)
    );
}

#[test]
fn inbound_star_excludes_listed_and_tunnel() {
    let (cfg, m) = (istio_cfg(), pod_maps());
    assert_eq!(
        inbound_verdict(&cfg, crate::AF_INET, 8080, &m),
        Verdict::ToInbound(Reason::InCaptured)
    );
    assert_eq!(
        inbound_verdict(&cfg, crate::AF_INET, 15021, &m),
        Verdict::Untouched(Reason::InExcludedPort)
    );
    assert_eq!(
        inbound_verdict(&cfg, crate::AF_INET, 15008, &m),
        Verdict::Untouched(Reason::InTunnelPort)
    );
    // ssh is captured like any port (istio-iptables since Istio 1.13),
    // unless -d names it.
    assert_eq!(
        inbound_verdict(&cfg, crate::AF_INET, 22, &m),
        Verdict::ToInbound(Reason::InCaptured)
    );
    let mut m = m;
    m.ports.push((port_kind::IN_EXCLUDE, 22));
    assert_eq!(
        inbound_verdict(&cfg, crate::AF_INET, 22, &m),
        Verdict::Untouched(Reason::InExcludedPort)
    );
}

#[test]
fn inbound_list_and_empty() {
    let (mut cfg, mut m) = (istio_cfg(), pod_maps());
    cfg.flags = flags::IN_CAPTURE_LISTED;
    m.ports.push((port_kind::IN_INCLUDE, 80));
    assert_eq!(
        inbound_verdict(&cfg, crate::AF_INET, 80, &m),
        Verdict::ToInbound(Reason::InCaptured)
    );
    assert_eq!(
        inbound_verdict(&cfg, crate::AF_INET, 81, &m),
        Verdict::Untouched(Reason::InNotIncluded)
    );
    // A list that names 22 captures it.
    m.ports.push((port_kind::IN_INCLUDE, 22));
    assert_eq!(
        inbound_verdict(&cfg, crate::AF_INET, 22, &m),
        Verdict::ToInbound(Reason::InCaptured)
    );
    cfg.flags = 0;
    assert_eq!(
        inbound_verdict(&cfg, crate::AF_INET, 80, &m),
        Verdict::Untouched(Reason::InNotIncluded)
    );
}

#[test]
fn orig_dst_is_asked_on_the_connections_own_family_level() {
    // 0 = SOL_IP, 41 = SOL_IPV6 (libc's values).
    assert_eq!((crate::SOL_IP, crate::SOL_IPV6), (0, 41));
    assert_eq!(orig_dst_level(crate::AF_INET), crate::SOL_IP);
    assert_eq!(orig_dst_level(crate::AF_INET6), crate::SOL_IPV6);
    // The getsockopt program folds v4-mapped sockets to AF_INET first, so
    // a dual-stack socket's IPv4 connection is asked for with SOL_IP.
    assert_eq!(orig_dst_level(family(false)), crate::SOL_IP);
    assert_eq!(orig_dst_level(family(true)), crate::SOL_IPV6);
}

// ------------------------------------------------------------ DNS capture

fn udp(dst: &str, dport: u16, uid: u32, gid: u32) -> Outbound {
    Outbound {
        proto: crate::IPPROTO_UDP,
        ..conn(dst, dport, uid, gid)
    }
}

/// istio-init with `--redirect-dns` and the pod's nameservers
/// 10.96.0.10 and fd00:96::10 (plus a local resolver 127.0.0.53).
fn dns_pod() -> (PodConfig, Maps) {
    let (mut cfg, mut m) = (istio_cfg(), pod_maps());
    cfg.flags |= flags::DNS_CAPTURE;
    for (k, a, len) in [
        (cidr_kind::DNS_V4, "10.96.0.10", 32),
        (cidr_kind::DNS_V4, "127.0.0.53", 32),
        (cidr_kind::DNS_V6, "fd00:96::10", 128),
    ] {
        m.cidrs.push((k, a.parse().unwrap(), len));
    }
    (cfg, m)
}

const DNS_UDP: Verdict = Verdict::ToDns(Reason::DnsCapturedUdp);
const DNS_TCP: Verdict = Verdict::ToDns(Reason::DnsCapturedTcp);

#[test]
fn dns_to_a_nameserver_goes_to_the_dns_proxy_udp_and_tcp_v4_v6() {
    let (cfg, m) = dns_pod();
    for ns in ["10.96.0.10", "fd00:96::10", "127.0.0.53"] {
        assert_eq!(out(&cfg, &m, udp(ns, 53, 1000, 1000)), DNS_UDP, "{ns}");
        assert_eq!(out(&cfg, &m, conn(ns, 53, 1000, 1000)), DNS_TCP, "{ns}");
    }
    // Another address on port 53: UDP is left alone (the rest of the chain
    // only redirects TCP); TCP goes on through the chain (-i '*': 15001).
    assert_eq!(
        out(&cfg, &m, udp("10.2.0.9", 53, 1000, 1000)),
        Verdict::Untouched(Reason::DnsNotNameserver)
    );
    assert_eq!(
        out(&cfg, &m, conn("10.2.0.9", 53, 1000, 1000)),
        Verdict::ToOutbound(Reason::OutCaptured)
    );
    // UDP to another port is not captured, DNS on or off.
    assert_eq!(
        out(&cfg, &m, udp("10.96.0.10", 5353, 1000, 1000)),
        Verdict::Untouched(Reason::OutNotTcp)
    );
    let plain = istio_cfg();
    assert_eq!(
        out(&plain, &m, udp("10.96.0.10", 53, 1000, 1000)),
        Verdict::Untouched(Reason::OutNotTcp)
    );
    // Without --redirect-dns TCP port 53 is an ordinary connection.
    assert_eq!(
        out(&plain, &m, conn("10.96.0.10", 53, 1000, 1000)),
        Verdict::ToOutbound(Reason::OutCaptured)
    );
}

#[test]
fn capture_all_dns_takes_any_address() {
    let (mut cfg, m) = dns_pod();
    cfg.flags |= flags::DNS_CAPTURE_ALL;
    for dst in ["10.2.0.9", "fd00:2::9", "127.0.0.1", "10.1.0.5"] {
        assert_eq!(out(&cfg, &m, udp(dst, 53, 1000, 1000)), DNS_UDP, "{dst}");
        assert_eq!(out(&cfg, &m, conn(dst, 53, 1000, 1000)), DNS_TCP, "{dst}");
    }
}

#[test]
fn the_proxys_own_dns_is_untouched() {
    let (mut cfg, m) = dns_pod();
    cfg.flags |= flags::DNS_CAPTURE_ALL;
    assert_eq!(
        out(&cfg, &m, udp("10.96.0.10", 53, 1337, 1337)),
        Verdict::Untouched(Reason::OutProxyUid)
    );
    assert_eq!(
        out(&cfg, &m, conn("fd00:96::10", 53, 1337, 1337)),
        Verdict::Untouched(Reason::OutProxyUid)
    );
    // Known by its gid only.
    assert_eq!(
        out(&cfg, &m, udp("10.96.0.10", 53, 4242, 1337)),
        Verdict::Untouched(Reason::OutProxyGid)
    );
}

#[test]
fn dns_reshapes_the_owner_rules_as_istio_iptables() {
    let (cfg, m) = dns_pod();
    // Rule (2) per uid skips TCP port 53: the proxy uid's TCP DNS to its
    // own pod IP is its own (rule 4), not sent to the inbound port.
    assert_eq!(
        out(&cfg, &m, conn("10.1.0.5", 53, 1337, 0)),
        Verdict::Untouched(Reason::OutProxyUid)
    );
    // ...but a gid's rule (5) skips only the tunnel port: a process with
    // only the proxy gid gets there (rule 3 of the uid no longer returns
    // port 53), and is sent to the inbound port.
    assert_eq!(
        out(&cfg, &m, conn("10.1.0.5", 53, 4242, 1337)),
        Verdict::ToInbound(Reason::OutProxyToSelf)
    );
    // Rules (3)/(6) are TCP only and skip port 53: the app's TCP DNS to a
    // local resolver falls through to the DNS chain...
    assert_eq!(out(&cfg, &m, conn("127.0.0.53", 53, 1000, 1000)), DNS_TCP);
    // ...and to a local address that is no nameserver, on to the rest
    // of the chain (as under iptables: ISTIO_REDIRECT with -i '*').
    assert_eq!(
        out(&cfg, &m, conn("10.1.0.5", 53, 1000, 1000)),
        Verdict::ToOutbound(Reason::OutCaptured)
    );
    // Other ports still stay local.
    assert_eq!(
        out(&cfg, &m, conn("10.1.0.5", 8080, 1000, 1000)),
        Verdict::Untouched(Reason::OutAppLocal)
    );
    // UDP to a local address that is not a nameserver.
    assert_eq!(
        out(&cfg, &m, udp("127.0.0.1", 53, 1000, 1000)),
        Verdict::Untouched(Reason::DnsNotNameserver)
    );
    // -o 53 returns DNS first, as istio-iptables' -o rules do for UDP too.
    let mut m2 = dns_pod().1;
    m2.ports.push((port_kind::OUT_EXCLUDE, 53));
    assert_eq!(
        out(&cfg, &m2, udp("10.96.0.10", 53, 1000, 1000)),
        Verdict::Untouched(Reason::OutExcludedPort)
    );
    // The passthrough source (rule 1) is protocol-independent.
    let mut c = udp("127.0.0.53", 53, 1337, 1337);
    c.src = bytes("127.0.0.6".parse().unwrap());
    assert_eq!(out(&cfg, &m, c), Verdict::Untouched(Reason::OutPassthrough));
}

#[test]
fn dns_capture_per_family_follows_the_lists() {
    // Only an IPv6 nameserver: IPv4 DNS is not captured (istio-iptables
    // then writes no IPv4 jump to ISTIO_OUTPUT_DNS).
    let (mut cfg, mut m) = (istio_cfg(), pod_maps());
    cfg.flags |= flags::DNS_CAPTURE;
    m.cidrs
        .push((cidr_kind::DNS_V6, "fd00:96::10".parse().unwrap(), 128));
    assert_eq!(out(&cfg, &m, udp("fd00:96::10", 53, 1000, 1000)), DNS_UDP);
    assert_eq!(
        out(&cfg, &m, udp("10.96.0.10", 53, 1000, 1000)),
        Verdict::Untouched(Reason::DnsNotNameserver)
    );
}

// ----------------------------------------------------------- owner groups

fn gid_entry(gid: u32) -> (u32, IpAddr, u8) {
    let k = cidr_kind::gid_key(gid);
    (
        cidr_kind::OWNER_GID,
        IpAddr::V4([k[0], k[1], k[2], k[3]].into()),
        32,
    )
}

#[test]
fn owner_groups_include_only_the_listed_groups() {
    let (mut cfg, mut m) = istio_cfg_and_maps();
    cfg.flags |= flags::OWNER_GROUPS_ONLY;
    m.cidrs.push(gid_entry(2000));
    m.cidrs.push(gid_entry(70_000));
    assert_eq!(
        out(&cfg, &m, conn("10.2.0.9", 80, 1000, 2000)),
        Verdict::ToOutbound(Reason::OutCaptured)
    );
    assert_eq!(
        out(&cfg, &m, conn("10.2.0.9", 80, 1000, 70_000)),
        Verdict::ToOutbound(Reason::OutCaptured)
    );
    assert_eq!(
        out(&cfg, &m, conn("10.2.0.9", 80, 1000, 1000)),
        Verdict::Untouched(Reason::OutOwnerGroupNotIncluded)
    );
    // After the uid/gid rules: the proxy and the app's local calls are
    // decided first.
    assert_eq!(
        out(&cfg, &m, conn("10.2.0.9", 80, 1337, 1337)),
        Verdict::Untouched(Reason::OutProxyUid)
    );
    assert_eq!(
        out(&cfg, &m, conn("10.1.0.5", 80, 1000, 1000)),
        Verdict::Untouched(Reason::OutAppLocal)
    );
    // An empty list captures no group (istio-iptables: one bare RETURN).
    let mut none = istio_cfg_and_maps();
    none.0.flags |= flags::OWNER_GROUPS_ONLY;
    assert_eq!(
        out(&none.0, &none.1, conn("10.2.0.9", 80, 1000, 2000)),
        Verdict::Untouched(Reason::OutOwnerGroupNotIncluded)
    );
}

#[test]
fn owner_groups_exclude_and_dns() {
    let (mut cfg, mut m) = dns_pod();
    cfg.flags |= flags::OWNER_GROUPS_EXCEPT;
    m.cidrs.push(gid_entry(3000));
    assert_eq!(
        out(&cfg, &m, conn("10.2.0.9", 80, 1000, 3000)),
        Verdict::Untouched(Reason::OutOwnerGroupExcluded)
    );
    // Before the DNS chain: an excluded group's DNS is not captured.
    assert_eq!(
        out(&cfg, &m, udp("10.96.0.10", 53, 1000, 3000)),
        Verdict::Untouched(Reason::OutOwnerGroupExcluded)
    );
    assert_eq!(out(&cfg, &m, udp("10.96.0.10", 53, 1000, 1000)), DNS_UDP);
    assert_eq!(
        out(&cfg, &m, conn("10.2.0.9", 80, 1000, 1000)),
        Verdict::ToOutbound(Reason::OutCaptured)
    );
}

fn istio_cfg_and_maps() -> (PodConfig, Maps) {
    (istio_cfg(), pod_maps())
}

// ------------------------------------------------------ loopback range

#[test]
fn ipv4_loopback_cidr_widens_rules_2_5_and_8() {
    let (mut cfg, mut m) = istio_cfg_and_maps();
    cfg.flags |= flags::LOOPBACK_CIDR;
    m.cidrs
        .push((cidr_kind::LOOPBACK_V4, "127.0.0.0".parse().unwrap(), 8));
    // -i names no loopback, so rule 3 keeps the app's calls local; with
    // -i 127.0.0.0/8 (rule 3 left out) rule 8 now covers all of 127/8.
    cfg.flags |= flags::OUT_INCLUDE_HAS_LOOPBACK;
    assert_eq!(
        out(&cfg, &m, conn("127.0.0.5", 80, 1000, 1000)),
        Verdict::Untouched(Reason::OutLoopback)
    );
    // The proxy calling 127.0.0.6 is now "to the host loopback": its own
    // traffic (rule 4), not sent to the inbound port (rule 2).
    assert_eq!(
        out(&cfg, &m, conn("127.0.0.6", 8080, 1337, 1337)),
        Verdict::Untouched(Reason::OutProxyUid)
    );
    // The pod IP is still not the loopback.
    assert_eq!(
        out(&cfg, &m, conn("10.1.0.5", 8080, 1337, 1337)),
        Verdict::ToInbound(Reason::OutProxyToSelf)
    );
    // Without the flag, only 127.0.0.1.
    cfg.flags &= !flags::LOOPBACK_CIDR;
    assert_eq!(
        out(&cfg, &m, conn("127.0.0.5", 80, 1000, 1000)),
        Verdict::ToOutbound(Reason::OutCaptured)
    );
}

/// `connect(0.0.0.0:p)` / `connect([::]:p)`: the kernel connects to this
/// host (IPv4: the bound source, else 127.0.0.1; IPv6: ::1), out through
/// lo, and iptables decides for that address: never captured.
#[test]
fn unspecified_destination_is_this_host_as_iptables_sees_it() {
    let (cfg, m) = (istio_cfg(), pod_maps());
    for dst in ["0.0.0.0", "::"] {
        // The app: rule (3), "-o lo ! --uid-owner 1337 -j RETURN".
        assert_eq!(
            out(&cfg, &m, conn(dst, 9080, 1000, 1000)),
            Verdict::Untouched(Reason::OutAppLocal),
            "{dst}"
        );
        // The proxy: to 127.0.0.1 / ::1, so rule (2) does not redirect it
        // to the inbound port; rule (4) returns it.
        assert_eq!(
            out(&cfg, &m, conn(dst, 9080, 1337, 1337)),
            Verdict::Untouched(Reason::OutProxyUid),
            "{dst}"
        );
        // With -i naming loopback (rule 3 dropped): 127.0.0.1 / ::1 still
        // return (rule 8), never captured.
        let mut wide = cfg;
        wide.flags |= flags::OUT_INCLUDE_HAS_LOOPBACK;
        assert_eq!(
            out(&wide, &m, conn(dst, 9080, 1000, 1000)),
            Verdict::Untouched(Reason::OutLoopback),
            "{dst}"
        );
    }
    // IPv4 bound to a source: the kernel sends it to that address.
    let bound = |src: &str, uid| {
        let mut c = conn("0.0.0.0", 9080, uid, uid);
        c.src = bytes(src.parse().unwrap());
        c
    };
    assert_eq!(
        bound("10.1.0.5", 1000).effective_dst(),
        bytes("10.1.0.5".parse().unwrap())
    );
    assert_eq!(
        out(&cfg, &m, bound("10.1.0.5", 1337)),
        Verdict::ToInbound(Reason::OutProxyToSelf)
    );
    assert_eq!(
        out(&cfg, &m, bound("127.0.0.6", 1337)),
        Verdict::Untouched(Reason::OutPassthrough)
    );
    // IPv6 always goes to ::1, bound or not.
    let mut c = conn("::", 9080, 1337, 1337);
    c.src = bytes("fd00::5".parse().unwrap());
    assert_eq!(c.effective_dst(), V6_LOCALHOST);
    // Any other destination is left as is.
    let c = conn("10.2.0.9", 80, 1000, 1000);
    assert_eq!(c.effective_dst(), c.dst);
    assert_eq!(
        conn("0.0.0.0", 1, 0, 0).effective_dst(),
        bytes("127.0.0.1".parse().unwrap())
    );
}

// ------------------------------------------ interfaces and DNS, source

/// `multi_homed` with `--redirect-dns`: nameservers 10.96.0.10 (routed
/// out of eth0 by the default route), 10.8.0.53 (out of net1, a `-c`
/// interface) and 10.8.1.53 (back out of eth0).
fn multi_homed_dns() -> (PodConfig, Maps) {
    let (mut cfg, mut m) = multi_homed();
    cfg.flags |= flags::DNS_CAPTURE;
    for ns in ["10.96.0.10", "10.8.0.53", "10.8.1.53"] {
        m.cidrs.push((cidr_kind::DNS_V4, ns.parse().unwrap(), 32));
    }
    (cfg, m)
}

#[test]
fn dns_routed_out_of_an_excluded_interface_is_untouched_first() {
    let (cfg, m) = multi_homed_dns();
    // `-A OUTPUT -o net1 -j RETURN` comes before the jump to ISTIO_OUTPUT,
    // so before ISTIO_OUTPUT_DNS: UDP and TCP alike.
    assert_eq!(
        out(&cfg, &m, udp("10.8.0.53", 53, 1000, 1000)),
        Verdict::Untouched(Reason::OutExcludedInterface)
    );
    assert_eq!(
        out(&cfg, &m, conn("10.8.0.53", 53, 1000, 1000)),
        Verdict::Untouched(Reason::OutExcludedInterface)
    );
    for ns in ["10.96.0.10", "10.8.1.53"] {
        assert_eq!(out(&cfg, &m, udp(ns, 53, 1000, 1000)), DNS_UDP, "{ns}");
        assert_eq!(out(&cfg, &m, conn(ns, 53, 1000, 1000)), DNS_TCP, "{ns}");
    }
    // A protocol never captured is left alone before any route look-up,
    // counted as such whatever the route.
    assert_eq!(
        out(&cfg, &m, udp("10.8.0.53", 5353, 1000, 1000)),
        Verdict::Untouched(Reason::OutNotTcp)
    );
}

#[test]
fn redirect_source_of_dns_is_the_route_to_the_nameserver() {
    let (mut cfg, mut m) = multi_homed_dns();
    let src = |cfg: &PodConfig, m: &Maps, c: Outbound| {
        let v = out(cfg, m, c);
        redirect_source(v, c.family, &c.effective_dst(), m)
            .map(|b| IpAddr::from([b[0], b[1], b[2], b[3]]))
    };
    let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
    assert_eq!(
        src(&cfg, &m, udp("10.96.0.10", 53, 1000, 1000)),
        ip("10.1.0.5")
    );
    assert_eq!(
        src(&cfg, &m, conn("10.8.1.53", 53, 1000, 1000)),
        ip("10.1.0.5")
    );
    // A local resolver: 127.0.0.53 keeps the loopback source the rewrite
    // gives, whatever the default route says; one of the pod's addresses
    // is its own source.
    m.cidrs
        .push((cidr_kind::DNS_V4, "127.0.0.53".parse().unwrap(), 32));
    m.cidrs
        .push((cidr_kind::DNS_V4, "10.7.0.5".parse().unwrap(), 32));
    assert_eq!(src(&cfg, &m, udp("127.0.0.53", 53, 1000, 1000)), None);
    assert_eq!(
        src(&cfg, &m, udp("10.7.0.5", 53, 1000, 1000)),
        ip("10.7.0.5")
    );
    // Capture-all and a connect to 0.0.0.0:53: this host, 127.0.0.1.
    cfg.flags |= flags::DNS_CAPTURE_ALL;
    assert_eq!(out(&cfg, &m, udp("0.0.0.0", 53, 1000, 1000)), DNS_UDP);
    assert_eq!(src(&cfg, &m, udp("0.0.0.0", 53, 1000, 1000)), None);
    // Not captured: nothing to give.
    assert_eq!(src(&cfg, &m, udp("10.8.0.53", 53, 1000, 1000)), None);
}

// --------------------------------------------------- observed decisions

/// Just the steps, for sequence checks.
fn kinds(steps: &[(Step, Option<Verdict>)]) -> Vec<Step> {
    steps.iter().map(|(s, _)| *s).collect()
}

const UID_1337_NO_MATCH_REMOTE: [Step; 3] = [
    Step::ToInbound {
        owner: Owner::Uid,
        id: 1337,
        dst_local: false,
        dst_host_loopback: false,
        is_owner: false,
        tcp: true,
        tunnel_port: false,
        dns_port_skipped: false,
    },
    Step::AppLocal {
        owner: Owner::Uid,
        id: 1337,
        dst_local: false,
        is_owner: false,
        present: true,
        dns_left: false,
    },
    Step::ProxyId {
        owner: Owner::Uid,
        id: 1337,
        is_owner: false,
    },
];

#[test]
fn observer_walks_every_rule_of_a_captured_connection_in_order() {
    let (cfg, m) = (istio_cfg(), pod_maps());
    let steps = observed_out(&cfg, &m, conn("10.2.0.9", 80, 1000, 1000));
    let mut want = vec![
        Step::Protocol {
            tcp: true,
            dns_udp: false,
        },
        Step::ExcludedPort { listed: false },
        Step::Passthrough {
            dst_local: false,
            src_passthrough: false,
            src_implied: false,
        },
    ];
    want.extend(UID_1337_NO_MATCH_REMOTE);
    want.extend(UID_1337_NO_MATCH_REMOTE.map(|s| match s {
        Step::ToInbound { .. } => Step::ToInbound {
            owner: Owner::Gid,
            id: 1337,
            dst_local: false,
            dst_host_loopback: false,
            is_owner: false,
            tcp: true,
            tunnel_port: false,
            dns_port_skipped: false,
        },
        Step::AppLocal { .. } => Step::AppLocal {
            owner: Owner::Gid,
            id: 1337,
            dst_local: false,
            is_owner: false,
            present: true,
            dns_left: false,
        },
        _ => Step::ProxyId {
            owner: Owner::Gid,
            id: 1337,
            is_owner: false,
        },
    }));
    want.extend([
        Step::HostLoopback {
            dst_host_loopback: false,
        },
        Step::ExcludedCidr { listed: false },
        Step::IncludedPort { listed: false },
        Step::Included {
            all: true,
            listed: true,
        },
    ]);
    assert_eq!(kinds(&steps), want);
    assert_eq!(
        steps.last().unwrap().1,
        Some(Verdict::ToOutbound(Reason::OutCaptured))
    );
}

#[test]
fn observer_stops_at_the_rule_that_decides() {
    let (cfg, m) = (istio_cfg(), pod_maps());
    // Rule 4: the proxy's own connection.
    let steps = observed_out(&cfg, &m, conn("10.2.0.9", 80, 1337, 1337));
    assert_eq!(steps.len(), 6, "{steps:?}");
    assert_eq!(
        steps.last().unwrap(),
        &(
            Step::ProxyId {
                owner: Owner::Uid,
                id: 1337,
                is_owner: true
            },
            Some(Verdict::Untouched(Reason::OutProxyUid))
        )
    );
    // Rule 2: the proxy to its pod's own address, after rule 1 did not match.
    let steps = observed_out(&cfg, &m, conn("10.1.0.5", 9080, 1337, 1337));
    assert_eq!(
        kinds(&steps)[2..],
        [
            Step::Passthrough {
                dst_local: true,
                src_passthrough: false,
                src_implied: false,
            },
            Step::ToInbound {
                owner: Owner::Uid,
                id: 1337,
                dst_local: true,
                dst_host_loopback: false,
                is_owner: true,
                tcp: true,
                tunnel_port: false,
                dns_port_skipped: false,
            },
        ]
    );
    // Rule 2 spares the tunnel port: the observer says why, rule 4 decides.
    let steps = observed_out(&cfg, &m, conn("10.1.0.5", 15008, 1337, 1337));
    assert!(matches!(
        steps[3],
        (
            Step::ToInbound {
                tunnel_port: true,
                ..
            },
            None
        )
    ));
    assert_eq!(steps.len(), 6);
    // Rule 1 with the IPv6 source implied by dialing [::6] unbound.
    let steps = observed_out(&cfg, &m, conn("::6", 9080, 1337, 1337));
    assert_eq!(
        steps.last().unwrap().0,
        Step::Passthrough {
            dst_local: true,
            src_passthrough: true,
            src_implied: true,
        }
    );
    // Not TCP: the first step decides.
    let steps = observed_out(&cfg, &m, udp("10.2.0.9", 80, 1000, 1000));
    assert_eq!(steps.len(), 1);
    // -o first.
    let mut m2 = pod_maps();
    m2.ports.push((port_kind::OUT_EXCLUDE, 80));
    let steps = observed_out(&cfg, &m2, conn("10.2.0.9", 80, 1337, 1337));
    assert_eq!(
        steps.last().unwrap(),
        &(
            Step::ExcludedPort { listed: true },
            Some(Verdict::Untouched(Reason::OutExcludedPort))
        )
    );
}

#[test]
fn observer_sees_the_dns_and_owner_group_steps_only_when_configured() {
    let (cfg, m) = (istio_cfg(), pod_maps());
    let plain = observed_out(&cfg, &m, conn("10.2.0.9", 80, 1000, 1000));
    assert!(!plain.iter().any(|(s, _)| matches!(
        s,
        Step::Dns { .. } | Step::OwnerGroupsOnly { .. } | Step::OwnerGroupsExcept { .. }
    )));
    let (dcfg, dm) = dns_pod();
    // Not port 53: the DNS step is told as not matching.
    let steps = observed_out(&dcfg, &dm, conn("10.2.0.9", 80, 1000, 1000));
    assert!(steps.contains(&(
        Step::Dns {
            port53: false,
            tcp: true,
            capture_all: false,
            nameserver: false
        },
        None
    )));
    // A nameserver decides there.
    let steps = observed_out(&dcfg, &dm, udp("10.96.0.10", 53, 1000, 1000));
    assert_eq!(
        steps.last().unwrap(),
        &(
            Step::Dns {
                port53: true,
                tcp: false,
                capture_all: false,
                nameserver: true
            },
            Some(DNS_UDP)
        )
    );
    // Owner groups: only 202 is captured; gid 1000 returns there.
    let (mut gcfg, mut gm) = (istio_cfg(), pod_maps());
    gcfg.flags |= flags::OWNER_GROUPS_ONLY;
    gm.cidrs.push(gid_entry(202));
    let steps = observed_out(&gcfg, &gm, conn("10.2.0.9", 80, 1000, 1000));
    assert_eq!(
        steps.last().unwrap(),
        &(
            Step::OwnerGroupsOnly { listed: false },
            Some(Verdict::Untouched(Reason::OutOwnerGroupNotIncluded))
        )
    );
    let steps = observed_out(&gcfg, &gm, conn("10.2.0.9", 80, 1000, 202));
    assert!(steps.contains(&(Step::OwnerGroupsOnly { listed: true }, None)));
}

#[test]
fn observer_walks_the_inbound_chain() {
    let (cfg, m) = (istio_cfg(), pod_maps());
    assert_eq!(
        kinds(&observed_in(&cfg, &m, 8080)),
        [
            Step::InTunnelPort { tunnel_port: false },
            Step::InExcludedPort { listed: false },
            Step::InCaptureAll,
        ]
    );
    assert_eq!(
        observed_in(&cfg, &m, 15021).last().unwrap().0,
        Step::InExcludedPort { listed: true }
    );
    // ssh is a port like any other.
    assert_eq!(
        observed_in(&cfg, &m, 22).last().unwrap().0,
        Step::InCaptureAll
    );
    assert_eq!(observed_in(&cfg, &m, 15008).len(), 1);
    let mut listed = istio_cfg();
    listed.flags = flags::IN_CAPTURE_LISTED;
    let mut lm = pod_maps();
    lm.ports.push((port_kind::IN_INCLUDE, 80));
    assert_eq!(
        observed_in(&listed, &lm, 81).last().unwrap().0,
        Step::InIncludedPort {
            configured: true,
            listed: false
        }
    );
    assert_eq!(
        observed_in(&listed, &lm, 80).last().unwrap().1,
        Some(Verdict::ToInbound(Reason::InCaptured))
    );
    let mut none = istio_cfg();
    none.flags = 0;
    assert_eq!(
        observed_in(&none, &lm, 80).last().unwrap().0,
        Step::InIncludedPort {
            configured: false,
            listed: false
        }
    );
}

#[test]
fn no_observer_changes_no_verdict() {
    // The kernel's path (NoObserver) and the recorded one agree on every
    // destination, owner and protocol of a busy config.
    let (mut cfg, mut m) = dns_pod();
    cfg.flags |= flags::OWNER_GROUPS_EXCEPT;
    m.cidrs.push(gid_entry(888));
    m.ports.push((port_kind::OUT_EXCLUDE, 5432));
    m.ports.push((port_kind::OUT_INCLUDE, 8081));
    m.cidrs
        .push((cidr_kind::EXCLUDE_V4, "10.3.0.0".parse().unwrap(), 16));
    for dst in [
        "10.2.0.9",
        "10.3.0.1",
        "10.1.0.5",
        "127.0.0.1",
        "127.0.0.6",
        "::1",
        "::6",
        "fd00::5",
        "10.96.0.10",
    ] {
        for port in [53, 80, 5432, 8081, 15008] {
            for (uid, gid) in [(1000, 1000), (1337, 1337), (1000, 1337), (1000, 888)] {
                for c in [conn(dst, port, uid, gid), udp(dst, port, uid, gid)] {
                    out(&cfg, &m, c);
                }
            }
        }
    }
}

#[test]
fn ipv6_off_leaves_every_ipv6_connection_alone_first() {
    let (mut cfg, m) = dns_pod();
    cfg.flags |= flags::IPV6_OFF;
    // Outbound: any IPv6 destination, any owner, protocol or port, even
    // one that a rule ahead (-o, the proxy's own, DNS) would decide.
    for dst in ["fd00:2::9", "fd00::5", "::1", "::6", "::", "fd00:96::10"] {
        for port in [53, 80, 15008] {
            for (uid, gid) in [(1000, 1000), (1337, 1337)] {
                for c in [conn(dst, port, uid, gid), udp(dst, port, uid, gid)] {
                    assert_eq!(
                        out(&cfg, &m, c),
                        Verdict::Untouched(Reason::OutIpv6NotCaptured),
                        "{dst}:{port} uid {uid}"
                    );
                    assert_eq!(
                        observed_out(&cfg, &m, c),
                        [(
                            Step::Ipv6 { off: true },
                            Some(Verdict::Untouched(Reason::OutIpv6NotCaptured))
                        )]
                    );
                }
            }
        }
    }
    // IPv4 (a v4-mapped destination too: the hooks fold it to IPv4
    // before deciding) is decided as before, without the IPv6 step.
    let on = dns_pod().0;
    for c in [
        conn("10.2.0.9", 80, 1000, 1000),
        udp("10.96.0.10", 53, 1000, 1000),
    ] {
        assert!(!matches!(out(&cfg, &m, c), Verdict::Untouched(_)));
        assert_eq!(out(&cfg, &m, c), out(&on, &m, c));
        assert!(!kinds(&observed_out(&cfg, &m, c))
            .iter()
            .any(|s| matches!(s, Step::Ipv6 { .. })));
    }
    // Inbound: IPv6 first, ahead of the tunnel port; IPv4 as before.
    for port in [8080, 15008, 15021] {
        assert_eq!(
            inbound_verdict(&cfg, crate::AF_INET6, port, &m),
            Verdict::Untouched(Reason::InIpv6NotCaptured)
        );
        assert_eq!(
            observed_in_family(&cfg, &m, crate::AF_INET6, port).len(),
            1,
            "{port}"
        );
        assert_eq!(
            inbound_verdict(&cfg, crate::AF_INET, port, &m),
            inbound_verdict(&on, crate::AF_INET, port, &m)
        );
    }
    // A VM's IPv6 connection: no rule either.
    let d6 = bytes("fd00:2::9".parse().unwrap());
    assert_eq!(
        virt_verdict(&cfg, crate::AF_INET6, &d6, &m),
        Verdict::Untouched(Reason::InVirtIpv6NotCaptured)
    );
    assert_eq!(
        virt_verdict(&on, crate::AF_INET6, &d6, &m),
        Verdict::ToOutbound(Reason::InVirtCaptured)
    );
}

#[test]
fn ipv6_on_tells_the_ipv6_step_and_decides_as_before() {
    let (cfg, m) = dns_pod();
    let c = conn("fd00:2::9", 80, 1000, 1000);
    assert_eq!(out(&cfg, &m, c), Verdict::ToOutbound(Reason::OutCaptured));
    assert_eq!(
        observed_out(&cfg, &m, c).first().unwrap(),
        &(Step::Ipv6 { off: false }, None)
    );
    let steps = observed_in_family(&cfg, &m, crate::AF_INET6, 8080);
    assert_eq!(steps.first().unwrap(), &(Step::Ipv6 { off: false }, None));
    assert_eq!(
        steps.last().unwrap().1,
        Some(Verdict::ToInbound(Reason::InCaptured))
    );
    // The flag bit alone decides: DUAL_STACK is display only.
    let mut dual = cfg;
    dual.flags |= flags::DUAL_STACK;
    assert_eq!(out(&dual, &m, c), Verdict::ToOutbound(Reason::OutCaptured));
    assert!(!ipv6_off(&dual, crate::AF_INET6));
    dual.flags |= flags::IPV6_OFF;
    assert!(ipv6_off(&dual, crate::AF_INET6) && !ipv6_off(&dual, crate::AF_INET));
}
