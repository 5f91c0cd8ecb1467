//! `-k` interfaces (a VM's tap or bridge in the pod, as KubeVirt makes
//! them): the nat PREROUTING rules istio-iptables puts first,
//! `-i <iface> [-d <cidr>] -j ISTIO_REDIRECT` then `-i <iface> -j RETURN`.
//! A TCP connection the VM opens to an included destination is redirected
//! to the outbound port, as REDIRECT does it: the destination becomes the
//! interface's own address and the outbound port, and the replies get the
//! original destination back as their source. The proxy accepts it like
//! any connection and asks SO_ORIGINAL_DST, which `orig_dst.rs` answers
//! from the record made here (keyed as the proxy's socket sees the
//! connection); `sockops.rs` removes the record when that socket closes.
//!
//! Two tc programs per interface (tcx links, one instance per pod with its
//! netns cookie as a constant): `redirect_vm_ingress` rewrites what the VM
//! sends, `redirect_vm_egress` what goes back to it. The decision is
//! `redirect_common::virt_verdict`.
//!
//! The connection cannot keep its original destination as the local
//! address instead (bpf_sk_assign): the SYN-ACK of a listener that is not
//! IP_TRANSPARENT, from an IPv4 address that is not the pod's, has no
//! route (the kernel's source check), so the proxy could never accept it.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{bpf_sock, bpf_sock_tuple},
    helpers::generated::{bpf_sk_release, bpf_skc_lookup_tcp},
    macros::classifier,
    programs::TcContext,
};
use redirect_common::{
    iface_flags, virt_verdict, IfaceEntry, IfaceKey, OrigDst, PodConfig, Reason, TupleKey, Verdict,
    AF_INET, AF_INET6,
};

use crate::{
    abi::{
        BPF_F_CURRENT_NETNS, BPF_F_PSEUDO_HDR, ETH_P_IP, ETH_P_IPV6, TCP_FLAG_ACK, TCP_FLAG_SYN,
        TCX_DROP, TCX_NEXT,
    },
    addr::words,
    counters::count,
    maps::{PodMaps, REDIRECT_IFACES, REDIRECT_ORIG_BY_TUPLE, REDIRECT_PODS},
    netns,
};

/// What the VM sends: redirected to the outbound port when included.
#[classifier]
pub fn redirect_vm_ingress(ctx: TcContext) -> i32 {
    unsafe { ingress(&ctx) }
}

/// What goes back to the VM: the proxy's replies get the original
/// destination back as their source.
#[classifier]
pub fn redirect_vm_egress(ctx: TcContext) -> i32 {
    unsafe { egress(&ctx) }
}

/// A TCP segment's addresses, ports (host order) and flags, and where its
/// headers are.
struct Segment {
    family: u16,
    l3: usize,
    l4: usize,
    src: [u8; 16],
    dst: [u8; 16],
    sport: u16,
    dport: u16,
    flags: u8,
}

/// The pod, its config and this interface's entry, when the interface is
/// one of the pod's `-k` interfaces.
#[inline(always)]
unsafe fn pod_iface(ctx: &TcContext) -> Option<(u64, &'static PodConfig, &'static IfaceEntry)> {
    let netns = netns::of_tc();
    let cfg = REDIRECT_PODS.get(&netns)?;
    let key = IfaceKey {
        netns,
        ifindex: (*ctx.skb.skb).ifindex,
        _pad: 0,
    };
    let iface = REDIRECT_IFACES.get(&key)?;
    if !iface.has(iface_flags::VIRT) {
        return None;
    }
    Some((netns, cfg, iface))
}

/// The TCP segment in the packet: IPv4 (not a fragment) or IPv6 with TCP
/// as the first next header. Anything else is not ours.
#[inline(always)]
unsafe fn segment(ctx: &TcContext, l2_len: u32) -> Option<Segment> {
    let proto = u16::from_be((*ctx.skb.skb).protocol as u16);
    let l3 = l2_len as usize;
    let (family, l4, src, dst) = if proto == ETH_P_IP {
        let vihl: u8 = ctx.load(l3).ok()?;
        let ihl = ((vihl & 0x0f) as usize) * 4;
        if vihl >> 4 != 4 || ihl < 20 {
            return None;
        }
        let p: u8 = ctx.load(l3 + 9).ok()?;
        let frag: u16 = ctx.load(l3 + 6).ok()?;
        if p != 6 || u16::from_be(frag) & 0x3fff != 0 {
            return None;
        }
        let s: [u8; 4] = ctx.load(l3 + 12).ok()?;
        let d: [u8; 4] = ctx.load(l3 + 16).ok()?;
        let mut src = [0u8; 16];
        let mut dst = [0u8; 16];
        src[..4].copy_from_slice(&s);
        dst[..4].copy_from_slice(&d);
        (AF_INET, l3 + ihl, src, dst)
    } else if proto == ETH_P_IPV6 {
        let v: u8 = ctx.load(l3).ok()?;
        let next: u8 = ctx.load(l3 + 6).ok()?;
        if v >> 4 != 6 || next != 6 {
            return None;
        }
        let src: [u8; 16] = ctx.load(l3 + 8).ok()?;
        let dst: [u8; 16] = ctx.load(l3 + 24).ok()?;
        (AF_INET6, l3 + 40, src, dst)
    } else {
        return None;
    };
    let sport: u16 = ctx.load(l4).ok()?;
    let dport: u16 = ctx.load(l4 + 2).ok()?;
    let flags: u8 = ctx.load(l4 + 13).ok()?;
    Some(Segment {
        family,
        l3,
        l4,
        src,
        dst,
        sport: u16::from_be(sport),
        dport: u16::from_be(dport),
        flags,
    })
}

/// The address connections are redirected to on this interface (its own,
/// of the segment's family), if it has one.
#[inline(always)]
fn nat_addr(iface: &IfaceEntry, family: u16) -> Option<[u8; 16]> {
    if family == AF_INET {
        iface.has(iface_flags::HAS_ADDR4).then_some(iface.addr4)
    } else {
        iface.has(iface_flags::HAS_ADDR6).then_some(iface.addr6)
    }
}

#[inline(always)]
unsafe fn ingress(ctx: &TcContext) -> i32 {
    let Some((netns, cfg, iface)) = pod_iface(ctx) else {
        return TCX_NEXT;
    };
    let Some(seg) = segment(ctx, iface.l2_len) else {
        return TCX_NEXT;
    };
    let nat = nat_addr(iface, seg.family);
    // The record is keyed as the proxy's accepted socket sees the
    // connection: from the VM's address and port to ours and -p.
    let key = TupleKey {
        netns,
        src: seg.src,
        dst: nat.unwrap_or([0; 16]),
        sport: seg.sport,
        dport: cfg.proxy_port,
        family: seg.family,
        _pad: 0,
    };
    let recorded = match REDIRECT_ORIG_BY_TUPLE.get(&key) {
        Some(o) => o.addr == seg.dst && o.port == seg.dport,
        None => false,
    };
    let new_conn = seg.flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN;
    if !new_conn || recorded {
        // A segment of a connection redirected at its SYN (a repeated SYN
        // included), or not ours (forwarded as it is).
        if recorded {
            rewrite(ctx, &seg, false, &key.dst, cfg.proxy_port);
        }
        return TCX_NEXT;
    }
    let verdict = virt_verdict(cfg, seg.family, &seg.dst, &PodMaps { netns });
    if let Verdict::Untouched(r) = verdict {
        count(netns, r);
        return TCX_NEXT;
    }
    // As REDIRECT: the interface's own address, and nothing when it has
    // none. Without a listener on -p the kernel would answer a RST from
    // our address, which the VM ignores: dropped here, the VM retries.
    if nat.is_none() || !listening(ctx, &key) {
        count(netns, Reason::InVirtDropped);
        return TCX_DROP;
    }
    let orig = OrigDst {
        addr: seg.dst,
        port: seg.dport,
        family: seg.family,
        reason: Reason::InVirtCaptured as u32,
    };
    // Fail closed: without a record the replies could not be given their
    // source back, nor SO_ORIGINAL_DST answered.
    if REDIRECT_ORIG_BY_TUPLE.insert(&key, &orig, 0).is_err() {
        count(netns, Reason::ErrVirtNatFull);
        return TCX_DROP;
    }
    count(netns, Reason::InVirtCaptured);
    rewrite(ctx, &seg, false, &key.dst, cfg.proxy_port);
    TCX_NEXT
}

#[inline(always)]
unsafe fn egress(ctx: &TcContext) -> i32 {
    let Some((netns, cfg, iface)) = pod_iface(ctx) else {
        return TCX_NEXT;
    };
    let Some(seg) = segment(ctx, iface.l2_len) else {
        return TCX_NEXT;
    };
    if seg.sport != cfg.proxy_port || nat_addr(iface, seg.family) != Some(seg.src) {
        return TCX_NEXT;
    }
    let key = TupleKey {
        netns,
        src: seg.dst,
        dst: seg.src,
        sport: seg.dport,
        dport: seg.sport,
        family: seg.family,
        _pad: 0,
    };
    if let Some(o) = REDIRECT_ORIG_BY_TUPLE.get(&key) {
        if o.reason == Reason::InVirtCaptured as u32 {
            let (addr, port) = (o.addr, o.port);
            rewrite(ctx, &seg, true, &addr, port);
        }
    }
    TCX_NEXT
}

/// Does a socket of the pod take this connection: the listener on -p, or
/// the socket a repeated SYN belongs to?
#[inline(always)]
unsafe fn listening(ctx: &TcContext, key: &TupleKey) -> bool {
    let mut t: bpf_sock_tuple = core::mem::zeroed();
    let size = if key.family == AF_INET {
        let v4 = &mut t.__bindgen_anon_1.ipv4;
        v4.saddr = u32::from_ne_bytes([key.src[0], key.src[1], key.src[2], key.src[3]]);
        v4.daddr = u32::from_ne_bytes([key.dst[0], key.dst[1], key.dst[2], key.dst[3]]);
        v4.sport = key.sport.to_be();
        v4.dport = key.dport.to_be();
        12
    } else {
        let v6 = &mut t.__bindgen_anon_1.ipv6;
        v6.saddr = words(&key.src);
        v6.daddr = words(&key.dst);
        v6.sport = key.sport.to_be();
        v6.dport = key.dport.to_be();
        36
    };
    let sk: *mut bpf_sock = bpf_skc_lookup_tcp(
        ctx.skb.skb as *mut c_void,
        &mut t,
        size,
        BPF_F_CURRENT_NETNS,
        0,
    );
    if sk.is_null() {
        return false;
    }
    bpf_sk_release(sk as *mut c_void);
    true
}

/// Rewrite the destination (`source` false) or the source address and
/// port of the segment, keeping the IPv4 header checksum and the TCP
/// checksum (pseudo-header included) right. The helpers fail only on an
/// offset outside the packet, which `segment` already read.
#[inline(always)]
unsafe fn rewrite(ctx: &TcContext, seg: &Segment, source: bool, addr: &[u8; 16], port: u16) {
    let csum = seg.l4 + 16;
    let addr_off = match (seg.family == AF_INET, source) {
        (true, true) => seg.l3 + 12,
        (true, false) => seg.l3 + 16,
        (false, true) => seg.l3 + 8,
        (false, false) => seg.l3 + 24,
    };
    let port_off = if source { seg.l4 } else { seg.l4 + 2 };
    let old = if source { &seg.src } else { &seg.dst };
    if seg.family == AF_INET {
        let from = u32::from_ne_bytes([old[0], old[1], old[2], old[3]]) as u64;
        let to = u32::from_ne_bytes([addr[0], addr[1], addr[2], addr[3]]);
        if ctx
            .l4_csum_replace(csum, from, to as u64, BPF_F_PSEUDO_HDR | 4)
            .is_err()
            || ctx
                .l3_csum_replace(seg.l3 + 10, from, to as u64, 4)
                .is_err()
            || ctx.store(addr_off, &to, 0).is_err()
        {
            return;
        }
    } else {
        let (from, to) = (words(old), words(addr));
        let mut i = 0;
        while i < 4 {
            if ctx
                .l4_csum_replace(csum, from[i] as u64, to[i] as u64, BPF_F_PSEUDO_HDR | 4)
                .is_err()
            {
                return;
            }
            i += 1;
        }
        if ctx.store(addr_off, addr, 0).is_err() {
            return;
        }
    }
    let old_port = if source { seg.sport } else { seg.dport }.to_be();
    let new_port = port.to_be();
    if ctx
        .l4_csum_replace(csum, old_port as u64, new_port as u64, 2)
        .is_ok()
    {
        let _ = ctx.store(port_off, &new_port, 0);
    }
}
