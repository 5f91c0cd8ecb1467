//! Inbound capture: nat PREROUTING → ISTIO_INBOUND → ISTIO_IN_REDIRECT.
//! - sk_lookup (one instance per pod netns) hands a connection from
//!   outside the pod to a captured port to the proxy's listener on the
//!   inbound capture port, keeping its original local address (which
//!   getsockopt in `orig_dst.rs` reports). The decision is
//!   `redirect_common::inbound_verdict`.
//! - The listener it needs is registered by sockops (`sockops.rs` calls
//!   [`register_listener`] when a socket of the pod starts listening).
//! - PREROUTING never sees the pod's own connections (conntrack decided
//!   them in OUTPUT), but sk_lookup does: the SYN of a connection to one
//!   of the pod's addresses arrives with that address's device as
//!   ingress. Its source is one of the pod's addresses; for IPv4 that is
//!   proof enough (the kernel drops a packet from outside with a local
//!   source as a martian), for IPv6 it is not, and sockops marks the
//!   pod's own IPv6 connections (REDIRECT_LOCAL_CONNECTS).
//! - A pod whose IPv6 is not captured (`flags::IPV6_OFF`: istio-iptables
//!   would write no ip6tables rules) has every IPv6 connection left alone,
//!   before anything else.

use aya_ebpf::{
    bindings::BPF_ANY, macros::sk_lookup, programs::SkLookupContext, programs::SockOpsContext,
};
use redirect_common::{
    flags, iface_flags, inbound_verdict, ipv6_off, IfaceKey, ListenerKey, Reason, TupleKey,
    Verdict, AF_INET, AF_INET6, IPPROTO_TCP,
};

use crate::{
    abi::{LOOPBACK_IFINDEX, SK_DROP, SK_PASS},
    addr::{ctx_ip4, ctx_ip6},
    counters::count,
    maps::{PodMaps, REDIRECT_IFACES, REDIRECT_LISTENERS, REDIRECT_LOCAL_CONNECTS, REDIRECT_PODS},
    netns, trace,
};

/// PREROUTING → ISTIO_INBOUND: attached to each pod netns. Connections
/// from outside the pod to a captured port go to the proxy's listener on
/// the inbound capture port, keeping their original local address.
#[sk_lookup]
pub fn redirect_sk_lookup(ctx: SkLookupContext) -> u32 {
    unsafe { sk_lookup_inbound::<true>(&ctx) }
}

/// The same for kernels whose sk_lookup context has no `ingress_ifindex`
/// (before 5.17): traffic of the pod itself is told by its source alone.
#[sk_lookup]
pub fn redirect_sk_lookup_addr(ctx: SkLookupContext) -> u32 {
    unsafe { sk_lookup_inbound::<false>(&ctx) }
}

/// `IFINDEX`: the context has `ingress_ifindex` (Linux 5.17+). Without it
/// no instruction may read the field (the verifier refuses the program).
#[inline(always)]
unsafe fn sk_lookup_inbound<const IFINDEX: bool>(ctx: &SkLookupContext) -> u32 {
    let l = ctx.lookup;
    if (*l).protocol != IPPROTO_TCP {
        return SK_PASS;
    }
    // Connections of the pod to itself arrive on `lo`. Without the field
    // (before Linux 5.17): every connection to a loopback address is one
    // (the kernel drops packets from outside to 127.0.0.0/8 or ::1 as
    // martians), the redirected ones to the proxy included, whose source
    // is the pod's address; the others have a source address of the
    // netns (below).
    if IFINDEX {
        if (*l).ingress_ifindex == LOOPBACK_IFINDEX {
            return SK_PASS;
        }
    } else if (*l).family == AF_INET as u32 {
        if ctx_ip4(&raw const (*l).local_ip4)[0] == 127 {
            return SK_PASS;
        }
    } else if ctx_ip6(&raw const (*l).local_ip6) == redirect_common::V6_LOCALHOST {
        return SK_PASS;
    }
    let netns = netns::of_sk_lookup();
    let Some(cfg) = REDIRECT_PODS.get(&netns) else {
        return SK_PASS;
    };
    // PREROUTING only sees packets from outside the netns. Local traffic
    // to the pod's own IP arrives with that IP's device as ingress, so
    // tell it apart by its source (an address of this netns) and, for
    // IPv6, by the mark its connecting socket set (see the module docs).
    let family = (*l).family;
    let src = if family == AF_INET as u32 {
        ctx_ip4(&raw const (*l).remote_ip4)
    } else {
        ctx_ip6(&raw const (*l).remote_ip6)
    };
    let maps = PodMaps { netns };
    let fam = if family == AF_INET as u32 {
        AF_INET
    } else {
        AF_INET6
    };
    let dport = (*l).local_port as u16;
    // No ip6tables rules at all when the pod's IPv6 is not captured:
    // every IPv6 connection reaches its socket. Counted only from outside
    // (PREROUTING never sees the pod's own), and without the local marks'
    // lookup below.
    if ipv6_off(cfg, fam) {
        if !redirect_common::is_local(fam, &src, &maps) {
            count(netns, Reason::InIpv6NotCaptured);
            trace::inbound(netns, l, Reason::InIpv6NotCaptured, 0);
        }
        return SK_PASS;
    }
    if redirect_common::is_local(fam, &src, &maps) {
        if fam == AF_INET {
            return SK_PASS;
        }
        let key = TupleKey {
            netns,
            src,
            dst: ctx_ip6(&raw const (*l).local_ip6),
            sport: u16::from_be((*l).remote_port),
            dport,
            family: AF_INET6,
            _pad: 0,
        };
        if REDIRECT_LOCAL_CONNECTS.get(&key).is_some() || cfg.has(flags::LOCAL_MARKS_LOST) {
            return SK_PASS;
        }
    }
    // `-A PREROUTING -i <iface> -j RETURN` of `-c` (counted) and `-k`
    // interfaces (what a VM sends is the tc program's, `vm.rs`), ahead
    // of the jump to ISTIO_INBOUND. Only the build with `ingress_ifindex`
    // (userspace refuses -c and -k where the kernel lacks it).
    if IFINDEX && cfg.has(flags::IFACES) {
        let key = IfaceKey {
            netns,
            ifindex: (*l).ingress_ifindex,
            _pad: 0,
        };
        if let Some(i) = REDIRECT_IFACES.get(&key) {
            if i.has(iface_flags::EXCLUDE) {
                count(netns, Reason::InExcludedInterface);
                trace::inbound(netns, l, Reason::InExcludedInterface, 0);
                return SK_PASS;
            }
            if i.has(iface_flags::VIRT) {
                return SK_PASS;
            }
        }
    }
    let verdict = inbound_verdict(cfg, fam, dport, &maps);
    if let Verdict::Untouched(r) = verdict {
        count(netns, r);
        trace::inbound(netns, l, r, 0);
        return SK_PASS;
    }
    let key = ListenerKey {
        netns,
        family,
        _pad: 0,
    };
    if REDIRECT_LISTENERS.redirect_sk_lookup(ctx, key, 0).is_ok() {
        count(netns, Reason::InCaptured);
        trace::inbound(netns, l, Reason::InCaptured, cfg.inbound_port);
        return SK_PASS;
    }
    if family == AF_INET as u32 {
        // A dual-stack [::]:port listener also serves IPv4.
        let key6 = ListenerKey {
            netns,
            family: AF_INET6 as u32,
            _pad: 0,
        };
        if REDIRECT_LISTENERS.redirect_sk_lookup(ctx, key6, 0).is_ok() {
            count(netns, Reason::InCaptured);
            trace::inbound(netns, l, Reason::InCaptured, cfg.inbound_port);
            return SK_PASS;
        }
    }
    // As iptables REDIRECT with nothing on the inbound port: refused.
    count(netns, Reason::InNoListener);
    trace::inbound(netns, l, Reason::InNoListener, 0);
    SK_DROP
}

/// A socket starts listening: if it is the pod's inbound capture port,
/// it becomes the target of inbound steering (restarts follow at once).
#[inline(always)]
pub unsafe fn register_listener<const STORED: bool>(ctx: &SockOpsContext) {
    let ops = ctx.ops;
    let netns = netns::of_sock_ops::<STORED>(ops);
    let Some(cfg) = REDIRECT_PODS.get(&netns) else {
        return;
    };
    if (*ops).local_port != cfg.inbound_port as u32 {
        return;
    }
    let mut key = ListenerKey {
        netns,
        family: (*ops).family,
        _pad: 0,
    };
    match REDIRECT_LISTENERS.update(&mut key, &mut *ops, BPF_ANY as u64) {
        Ok(()) => count(netns, Reason::InListenerRegistered),
        Err(_) => count(netns, Reason::ErrListenerMapFull),
    }
}
