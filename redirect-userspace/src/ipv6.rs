//! Is a pod's IPv6 captured? istio-iptables decides it once, from the
//! pod's interface addresses (`EnableIPv6`), and writes no ip6tables rules
//! at all when it is off: no IPv6 connection of the pod is then captured,
//! outbound, inbound or DNS (a v4-mapped destination on an IPv6 socket is
//! IPv4, and stays captured).
//!
//! The rule: over the pod's addresses in the kernel's order (an
//! RTM_GETADDR dump, as getifaddrs gives them: every IPv4 address, then
//! every IPv6 one), leaving out loopback, link-local (169.254.0.0/16,
//! fe80::/10) and multicast ones, IPv6 is captured when the first one is
//! IPv6; with `--dual-stack`, when any is. Where istio-iptables finds no
//! such address at all it fails; here IPv6 is then not captured (nothing
//! of the pod's could be reached over it from outside anyway).
//!
//! `::6` on `lo` is the address istio-iptables itself adds (the proxy's
//! IPv6 passthrough source) once IPv6 is on: it never decides.

use std::net::IpAddr;

use serde::Serialize;

use crate::podns::PASSTHROUGH_V6;

/// The decision and what it rests on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Ipv6Capture {
    pub captured: bool,
    pub dual_stack: bool,
    /// The pod's first usable address, if it has one.
    pub first: Option<IpAddr>,
    /// Its first usable IPv6 address, if it has one.
    pub first_v6: Option<IpAddr>,
}

/// Counts for istio-iptables: not loopback, not link-local, not
/// multicast (a v4-mapped address as IPv4), and not the `::6` it adds.
pub fn usable(a: &IpAddr) -> bool {
    let a = a.to_canonical();
    if a == IpAddr::V6(PASSTHROUGH_V6) {
        return false;
    }
    !a.is_loopback()
        && !a.is_multicast()
        && match a {
            IpAddr::V4(v) => !v.is_link_local(),
            IpAddr::V6(v) => v.segments()[0] & 0xffc0 != 0xfe80,
        }
}

/// istio-iptables' rule over `addrs` (in the kernel's order), see the
/// module docs.
pub fn decide(addrs: &[IpAddr], dual_stack: bool) -> Ipv6Capture {
    let mut ok = addrs.iter().filter(|a| usable(a)).map(|a| a.to_canonical());
    let first = ok.clone().next();
    let first_v6 = ok.find(IpAddr::is_ipv6);
    let captured = if dual_stack {
        first_v6.is_some()
    } else {
        first.is_some_and(|a| a.is_ipv6())
    };
    Ipv6Capture {
        captured,
        dual_stack,
        first,
        first_v6,
    }
}

impl Ipv6Capture {
    /// In words, for `attach` and the agent's log: "captured (...)" or
    /// "not captured (...)".
    pub fn describe(&self) -> String {
        match (self.captured, self.dual_stack, self.first, self.first_v6) {
            (true, false, Some(a), _) => format!("captured (first address {a} is IPv6)"),
            (true, true, _, Some(a)) => {
                format!("captured (--dual-stack, the pod has IPv6 address {a})")
            }
            (false, _, None, _) => {
                "not captured (the pod has no address but loopback or link-local ones)".into()
            }
            (false, false, Some(a), _) => {
                format!("not captured (first address {a} is IPv4; --dual-stack captures it)")
            }
            (false, true, Some(_), _) => {
                "not captured (--dual-stack, but the pod has no IPv6 address)".into()
            }
            // Not reachable: captured always has its address.
            (true, _, _, _) => "captured".into(),
        }
    }
}

/// The decision as a pod's kernel config records it (no addresses):
/// for `redirect status`.
pub fn describe_recorded(ipv6_off: bool, dual_stack: bool) -> String {
    match (ipv6_off, dual_stack) {
        (false, false) => "captured (the pod's first address is IPv6)".into(),
        (false, true) => "captured (--dual-stack, the pod has an IPv6 address)".into(),
        (true, false) => {
            "not captured (the pod's first address is IPv4; --dual-stack captures it)".into()
        }
        (true, true) => "not captured (--dual-stack, but the pod has no IPv6 address)".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ips(v: &[&str]) -> Vec<IpAddr> {
        v.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn first_usable_address_decides_without_dual_stack() {
        // IPv4 first (the kernel lists IPv4 first): off.
        let d = decide(&ips(&["10.1.0.5", "fd00::5", "fe80::1"]), false);
        assert!(!d.captured);
        assert_eq!(d.first, Some("10.1.0.5".parse().unwrap()));
        assert_eq!(
            d.describe(),
            "not captured (first address 10.1.0.5 is IPv4; --dual-stack captures it)"
        );
        // IPv6 only: on.
        let d = decide(&ips(&["fd00::5", "fe80::1"]), false);
        assert!(d.captured);
        assert_eq!(d.describe(), "captured (first address fd00::5 is IPv6)");
        // Loopback and link-local ones never count, whatever their place.
        let d = decide(
            &ips(&["127.0.0.1", "169.254.1.1", "::1", "fe80::1", "fd00::5"]),
            false,
        );
        assert!(d.captured);
        // IPv4 only.
        assert!(!decide(&ips(&["10.1.0.5"]), false).captured);
    }

    #[test]
    fn link_local_ipv6_alone_is_no_ipv6() {
        for dual in [false, true] {
            let d = decide(&ips(&["fe80::1", "febf::1", "ff02::1", "::1"]), dual);
            assert!(!d.captured, "dual {dual}");
            assert_eq!(d.first, None);
            assert_eq!(
                d.describe(),
                "not captured (the pod has no address but loopback or link-local ones)"
            );
        }
        // fe80::/10 only: fec0:: is not link-local.
        assert!(decide(&ips(&["fec0::1"]), false).captured);
        // A v4 link-local first, then IPv6: the IPv6 one is first usable.
        assert!(decide(&ips(&["169.254.0.9", "fd00::5"]), false).captured);
    }

    #[test]
    fn dual_stack_captures_ipv6_whenever_the_pod_has_it() {
        let d = decide(&ips(&["10.1.0.5", "fe80::1", "fd00::5"]), true);
        assert!(d.captured);
        assert_eq!(
            d.describe(),
            "captured (--dual-stack, the pod has IPv6 address fd00::5)"
        );
        let d = decide(&ips(&["10.1.0.5", "fe80::1"]), true);
        assert!(!d.captured);
        assert_eq!(
            d.describe(),
            "not captured (--dual-stack, but the pod has no IPv6 address)"
        );
        assert!(decide(&ips(&["fd00::5"]), true).captured);
    }

    #[test]
    fn the_passthrough_address_and_v4_mapped_ones_are_not_ipv6() {
        // ::6 (which attach adds to lo once IPv6 is on) never turns it on.
        assert!(!decide(&ips(&["::6"]), false).captured);
        assert!(!decide(&ips(&["10.1.0.5", "::6"]), true).captured);
        // A v4-mapped address counts as the IPv4 one.
        let d = decide(&ips(&["::ffff:10.1.0.5", "fd00::5"]), false);
        assert!(!d.captured);
        assert_eq!(d.first, Some("10.1.0.5".parse().unwrap()));
    }

    #[test]
    fn recorded_words_follow_the_flags() {
        assert!(describe_recorded(true, false).starts_with("not captured"));
        assert!(describe_recorded(false, true).starts_with("captured"));
    }
}
