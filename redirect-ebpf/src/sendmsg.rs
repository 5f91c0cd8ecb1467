//! cgroup/sendmsg4 and sendmsg6: ISTIO_OUTPUT_DNS for UDP datagrams sent
//! with an address (`sendto`, `sendmsg` with a name: the kernel runs these
//! hooks only then; a connected socket was decided at connect,
//! `connect.rs`). A datagram to port 53 of one of the pod's nameservers
//! (any address with capture-all) is sent to the DNS proxy on
//! 127.0.0.1:15053 / [::1]:15053 instead, and the nameserver it was for
//! is recorded under the socket's cookie, so that the reply reads as
//! coming from it (`recvmsg.rs`). The decision is the OUTPUT chain's,
//! `redirect_common::outbound_verdict`, as for a connect.
//!
//! Everything but port 53 returns at once, before the pod lookup: this
//! hook sees every datagram the pods' processes send.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::bpf_sock, helpers::bpf_get_socket_cookie, macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use redirect_common::{
    flags, outbound_verdict, OrigDst, Reason, Verdict, DNS_PORT, DNS_PROXY_PORT, IPPROTO_UDP,
};

use crate::{
    addr::{ip4_bytes, ip6_bytes},
    connect::{read_outbound, to_localhost},
    counters::count,
    maps::{PodMaps, REDIRECT_ORIG_BY_COOKIE, REDIRECT_PODS},
    netns,
};

/// sendmsg verdicts: send (rewritten or not), or refuse (EPERM).
const SEND_PROCEED: i32 = 1;
const SEND_REFUSE: i32 = 0;

#[cgroup_sock_addr(sendmsg4)]
pub fn redirect_sendmsg4(ctx: SockAddrContext) -> i32 {
    unsafe { sendmsg(&ctx, false) }
}

#[cgroup_sock_addr(sendmsg6)]
pub fn redirect_sendmsg6(ctx: SockAddrContext) -> i32 {
    unsafe { sendmsg(&ctx, true) }
}

/// A datagram with an address. Refused only when a datagram that must go
/// to the DNS proxy cannot be recorded (original-destination map full):
/// fail closed, as for connect. Sent on without a record its reply would
/// show the proxy's address, which resolvers drop as a spoofed answer;
/// sent to the nameserver it would bypass the DNS proxy. The app gets
/// EPERM at once and its resolver tries again or fails fast.
#[inline(always)]
unsafe fn sendmsg(ctx: &SockAddrContext, v6: bool) -> i32 {
    let sa = ctx.sock_addr;
    if u16::from_be((*sa).user_port as u16) != DNS_PORT {
        return SEND_PROCEED;
    }
    let netns = netns::of_sock_addr(sa);
    let Some(cfg) = REDIRECT_PODS.get(&netns) else {
        return SEND_PROCEED;
    };
    if !cfg.has(flags::DNS_CAPTURE) {
        return SEND_PROCEED;
    }
    // The source: the one given with the datagram (IP_PKTINFO), else the
    // socket's bound one (zero when unbound).
    let sk: *mut bpf_sock = (*sa).__bindgen_anon_1.sk;
    let src = if v6 {
        let m = ip6_bytes((*sa).msg_src_ip6);
        if m != [0; 16] {
            m
        } else {
            ip6_bytes((*sk).src_ip6)
        }
    } else {
        let m = (*sa).msg_src_ip4;
        ip4_bytes(if m != 0 { m } else { (*sk).src_ip4 })
    };
    let (dgram, v4_in_v6) = read_outbound(sa, v6, IPPROTO_UDP, src);
    let verdict = outbound_verdict(cfg, &dgram, &PodMaps { netns });
    count(netns, verdict.reason());
    let Verdict::ToDns(reason) = verdict else {
        return SEND_PROCEED;
    };
    let orig = OrigDst {
        addr: dgram.dst,
        port: dgram.dport,
        family: dgram.family,
        reason: reason as u32,
    };
    // One record per socket: an unconnected socket asking several
    // nameservers reads every reply as from the one it asked last (a
    // nameserver it asked, which is what resolvers check).
    let cookie = bpf_get_socket_cookie(sa as *mut c_void);
    if REDIRECT_ORIG_BY_COOKIE.insert(&cookie, &orig, 0).is_err() {
        count(netns, Reason::ErrOrigMapFull);
        return SEND_REFUSE;
    }
    to_localhost(sa, v6, v4_in_v6, DNS_PROXY_PORT);
    SEND_PROCEED
}
