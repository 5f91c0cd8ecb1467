//! Each row's configured match, written the way `iptables -t nat -L -n -v`
//! writes the rule it stands for: `tcp dpt:15008`, `tcp multiport dports
//! 15090,15021,15020`, `owner UID match 1337`, CIDR lists. iptables has a
//! source and a destination column; a single column here says `src`/`dst`,
//! and `out lo` for `-o lo`. Both families are shown together
//! (`127.0.0.1,::1`), as one row counts both. Where a row sends its
//! connections is its target and description (and `redirect status`
//! shows the ports).

use redirect_common::Reason;

use crate::config::{Cidr, DnsCapture, InboundPorts, OwnerGroups, PodSpec};

/// DNS capture in effect (the rules take their DNS form).
fn dns_on(s: &PodSpec) -> bool {
    s.dns_capture().captures()
}

/// Shown for a rule that exists in istio-iptables' output only when a flag
/// gives it something to match, and the flag was not given.
pub const NOT_SET: &str = "(not set)";

/// `tcp dpt:P` for one port, `tcp multiport dports P,Q` for several.
fn dports(ports: &[u16]) -> String {
    match ports {
        [] => NOT_SET.into(),
        [p] => format!("tcp dpt:{p}"),
        ps => format!("tcp multiport dports {}", join(ps)),
    }
}

fn join<T: ToString>(v: &[T]) -> String {
    v.iter().map(T::to_string).collect::<Vec<_>>().join(",")
}

fn cidrs(v: &[Cidr]) -> String {
    if v.is_empty() {
        NOT_SET.into()
    } else {
        format!("dst {}", join(v))
    }
}

/// `owner UID match 1337`, `owner GID match 1337`, or both as one when
/// the lists are equal (istio-iptables' default: `-g` = `-u`).
fn owner(s: &PodSpec, negated: bool) -> String {
    let not = if negated { "! " } else { "" };
    match (s.proxy_uids.is_empty(), s.proxy_gids.is_empty()) {
        (true, true) => NOT_SET.into(),
        (false, true) => format!("{not}owner UID match {}", join(&s.proxy_uids)),
        (true, false) => format!("{not}owner GID match {}", join(&s.proxy_gids)),
        (false, false) if s.proxy_uids == s.proxy_gids => {
            format!("{not}owner UID/GID match {}", join(&s.proxy_uids))
        }
        (false, false) => format!(
            "{not}owner UID match {} / GID match {}",
            join(&s.proxy_uids),
            join(&s.proxy_gids)
        ),
    }
}

/// `in eth1,eth2` / `out eth1`, as iptables' in/out columns.
fn ifaces(dir: &str, v: &[String]) -> String {
    if v.is_empty() {
        NOT_SET.into()
    } else {
        format!("{dir} {}", v.join(","))
    }
}

fn ids(v: &[u32], what: &str) -> String {
    if v.is_empty() {
        NOT_SET.into()
    } else {
        format!("owner {what} match {}", join(v))
    }
}

/// The IPv6 rows: no ip6tables rules when the pod's IPv6 is not captured.
fn ipv6(s: &PodSpec) -> String {
    if s.ipv6_off {
        "ip6 (no ip6tables rules: IPv6 not captured)".into()
    } else {
        "(none: IPv6 captured)".into()
    }
}

/// The configured match of `r` in a pod configured as `s` ("" for rows no
/// flag configures: original destination, acceleration, errors, and the
/// "nothing matched" ends of the chains).
pub fn rule_match(r: Reason, s: &PodSpec) -> String {
    match r {
        // No ip6tables rules at all: every IPv6 row.
        Reason::OutIpv6NotCaptured | Reason::InIpv6NotCaptured | Reason::InVirtIpv6NotCaptured => {
            ipv6(s)
        }
        // OUTPUT (ISTIO_OUTPUT), in rule order.
        Reason::OutExcludedInterface => ifaces("out", &s.exclude_interfaces),
        Reason::OutExcludedPort => dports(&s.exclude_outbound_ports),
        Reason::OutPassthrough => "out lo src 127.0.0.6,::6".into(),
        Reason::OutProxyToSelf if dns_on(s) => format!(
            "out lo dst !{},!::1 tcp dpt:!{} {} (UID: dpt:!53 too)",
            s.ipv4_loopback_cidr_shown(),
            s.tunnel_port,
            owner(s, false)
        ),
        Reason::OutProxyToSelf => format!(
            "out lo dst !{},!::1 tcp dpt:!{} {}",
            s.ipv4_loopback_cidr_shown(),
            s.tunnel_port,
            owner(s, false)
        ),
        Reason::OutAppLocal if s.include_has_loopback => {
            "(none: -i names a loopback address)".into()
        }
        Reason::OutAppLocal if dns_on(s) => format!("out lo tcp dpt:!53 {}", owner(s, true)),
        Reason::OutAppLocal => format!("out lo {}", owner(s, true)),
        Reason::OutProxyUid => ids(&s.proxy_uids, "UID"),
        Reason::OutProxyGid => ids(&s.proxy_gids, "GID"),
        Reason::OutOwnerGroupNotIncluded => match &s.outbound_owner_groups {
            OwnerGroups::Only(g) if g.is_empty() => "(all: the list is empty)".into(),
            OwnerGroups::Only(g) => format!("! owner GID match {}", g.join(",")),
            _ => NOT_SET.into(),
        },
        Reason::OutOwnerGroupExcluded => match &s.outbound_owner_groups {
            OwnerGroups::AllExcept(g) => format!("owner GID match {}", g.join(",")),
            _ => NOT_SET.into(),
        },
        Reason::OutLoopback => format!("dst {},::1", s.ipv4_loopback_cidr_shown()),
        Reason::OutExcludedCidr => cidrs(&s.exclude_cidrs),
        Reason::OutCapturedPort => dports(&s.include_outbound_ports),
        Reason::OutCaptured if s.include_all_outbound => "dst 0.0.0.0/0,::/0".into(),
        Reason::OutCaptured => cidrs(&s.include_cidrs),
        Reason::OutNotTcp if dns_on(s) => "! tcp, ! udp dpt:53".into(),
        Reason::OutNotTcp => "! tcp".into(),
        // ISTIO_OUTPUT_DNS.
        Reason::DnsCapturedUdp | Reason::DnsCapturedTcp => {
            let proto = if r == Reason::DnsCapturedUdp {
                "udp"
            } else {
                "tcp"
            };
            match s.dns_capture() {
                DnsCapture::Nameservers(v) => format!(
                    "{proto} dpt:53 dst {}",
                    v.iter()
                        .map(|a| a.to_string())
                        .collect::<Vec<_>>()
                        .join(",")
                ),
                DnsCapture::AllAddresses | DnsCapture::AllUnknownNameservers => {
                    format!("{proto} dpt:53")
                }
                DnsCapture::NoNameservers => "(none: no nameserver)".into(),
                DnsCapture::Off => NOT_SET.into(),
            }
        }
        Reason::DnsNotNameserver => match s.dns_capture() {
            DnsCapture::Nameservers(_) => "udp dpt:53".into(),
            _ => String::new(),
        },
        Reason::DnsReplyRewritten => {
            if dns_on(s) {
                format!(
                    "udp src 127.0.0.1,::1 spt:{}",
                    crate::config::DNS_PROXY_PORT
                )
            } else {
                String::new()
            }
        }
        // PREROUTING (ISTIO_INBOUND), in rule order.
        Reason::InExcludedInterface => ifaces("in", &s.exclude_interfaces),
        Reason::InTunnelPort => format!("tcp dpt:{}", s.tunnel_port),
        Reason::InExcludedPort => match s.inbound_ports {
            InboundPorts::All => dports(&s.exclude_inbound_ports),
            _ => "(none: only with -b '*')".into(),
        },
        Reason::InCaptured => match &s.inbound_ports {
            InboundPorts::All => "tcp".into(),
            InboundPorts::Listed(ps) => dports(ps),
            InboundPorts::None => NOT_SET.into(),
        },
        Reason::InNoListener => format!("no listener on :{}", s.inbound_port),
        Reason::InListenerRegistered => format!("listen :{}", s.inbound_port),
        // PREROUTING of -k interfaces.
        Reason::InVirtCaptured if s.kube_virt_interfaces.is_empty() => NOT_SET.into(),
        Reason::InVirtCaptured if s.include_all_outbound => {
            format!("{} tcp", ifaces("in", &s.kube_virt_interfaces))
        }
        Reason::InVirtCaptured => format!(
            "{} tcp {}",
            ifaces("in", &s.kube_virt_interfaces),
            cidrs(&s.include_cidrs)
        ),
        Reason::InVirtNotIncluded => ifaces("in", &s.kube_virt_interfaces),
        Reason::InVirtDropped if s.kube_virt_interfaces.is_empty() => NOT_SET.into(),
        Reason::InVirtDropped => format!("no listener on :{}", s.proxy_port),
        Reason::OutNotIncluded
        | Reason::InNotIncluded
        | Reason::OrigDstOutbound
        | Reason::OrigDstInbound
        | Reason::OrigDstMissing
        | Reason::PeerNameRewritten
        | Reason::ErrOrigMapFull
        | Reason::ErrTupleMapFull
        | Reason::ErrListenerMapFull
        | Reason::ErrSockMapFull
        | Reason::ErrLocalMapFull
        | Reason::ErrSourceBind
        | Reason::ErrVirtNatFull
        | Reason::ErrTraceLost
        | Reason::AccelInserted
        | Reason::AccelRedirected
        | Reason::AccelFallback
        | Reason::AccelBulk
        | Reason::AccelSkippedShort
        | Reason::AccelRemoved => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{CaptureFlags, Flag};

    fn spec(f: impl FnOnce(&mut CaptureFlags)) -> PodSpec {
        let mut c = CaptureFlags::defaults();
        f(&mut c);
        c.to_spec().unwrap()
    }

    #[test]
    fn istio_defaults_read_like_iptables() {
        let s = PodSpec::istio_default();
        let m = |r| rule_match(r, &s);
        assert_eq!(m(Reason::OutExcludedPort), "(not set)");
        assert_eq!(m(Reason::OutProxyUid), "owner UID match 1337");
        assert_eq!(m(Reason::OutProxyGid), "owner GID match 1337");
        assert_eq!(m(Reason::OutAppLocal), "out lo ! owner UID/GID match 1337");
        assert_eq!(
            m(Reason::OutProxyToSelf),
            "out lo dst !127.0.0.1,!::1 tcp dpt:!15008 owner UID/GID match 1337"
        );
        assert_eq!(m(Reason::OutLoopback), "dst 127.0.0.1,::1");
        assert_eq!(m(Reason::OutCaptured), "dst 0.0.0.0/0,::/0");
        assert_eq!(m(Reason::InTunnelPort), "tcp dpt:15008");
        // -d (kept sorted).
        assert_eq!(
            m(Reason::InExcludedPort),
            "tcp multiport dports 15020,15021,15090"
        );
        assert_eq!(m(Reason::InCaptured), "tcp");
        assert_eq!(m(Reason::OrigDstMissing), "");
    }

    #[test]
    fn lists_ports_cidrs_and_ids() {
        let s = spec(|c| {
            c.set(Flag::ServiceCidr, "10.0.0.0/8,fd00::/8");
            c.set(Flag::ServiceExcludeCidr, "10.9.0.0/16");
            c.set(Flag::OutboundPorts, "443");
            c.set(Flag::LocalOutboundPortsExclude, "22,3306");
            c.set(Flag::InboundPorts, "80,8080");
            c.set(Flag::LocalExcludePorts, "15021");
            c.set(Flag::ProxyUid, "1337,1338");
            c.set(Flag::ProxyGid, "2000");
        });
        let m = |r| rule_match(r, &s);
        assert_eq!(m(Reason::OutExcludedPort), "tcp multiport dports 22,3306");
        assert_eq!(m(Reason::OutCapturedPort), "tcp dpt:443");
        assert_eq!(m(Reason::OutExcludedCidr), "dst 10.9.0.0/16");
        assert_eq!(m(Reason::OutCaptured), "dst 10.0.0.0/8,fd00::/8");
        assert_eq!(m(Reason::OutProxyUid), "owner UID match 1337,1338");
        assert_eq!(
            m(Reason::OutAppLocal),
            "out lo ! owner UID match 1337,1338 / GID match 2000"
        );
        assert_eq!(m(Reason::InCaptured), "tcp multiport dports 80,8080");
        assert_eq!(m(Reason::InExcludedPort), "(none: only with -b '*')");
        let s = spec(|c| c.set(Flag::ServiceCidr, "127.0.0.1/32"));
        assert_eq!(
            rule_match(Reason::OutAppLocal, &s),
            "(none: -i names a loopback address)"
        );
        assert_eq!(rule_match(Reason::InCaptured, &s), "(not set)");
        assert_eq!(rule_match(Reason::OutCapturedPort, &s), "(not set)");
    }
}
