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

use core::{ffi::c_void, mem::MaybeUninit};

use aya_ebpf::{
    helpers::bpf_get_socket_cookie, macros::cgroup_sock_addr, programs::SockAddrContext,
};
use redirect_common::{flags, OrigDst, Reason, Verdict, DNS_PORT, DNS_PROXY_PORT};

use crate::{
    connect::{decide, set_redirect_msg_source, to_localhost, Decided, DECIDE_MSG_SRC, DECIDE_V6},
    counters::{count, count_code},
    maps::{REDIRECT_ORIG_BY_COOKIE, REDIRECT_PODS},
    netns, trace,
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
    let mut d = MaybeUninit::<Decided>::uninit();
    let how = DECIDE_MSG_SRC | if v6 { DECIDE_V6 } else { 0 };
    let reason = decide(sa, cfg, netns, how, d.as_mut_ptr());
    let d = d.assume_init_ref();
    count_code(netns, reason);
    trace::outbound(trace::SENDMSG, netns, cfg, d);
    let Verdict::ToDns(reason) = d.verdict else {
        return SEND_PROCEED;
    };
    let dgram = &d.conn;
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
        trace::refused(trace::SENDMSG, netns, d);
        return SEND_REFUSE;
    }
    // The source iptables leaves the datagram (the pod's route to the
    // nameserver gives it), or the loopback destination below makes the
    // kernel pick a loopback one.
    if d.src_unset {
        set_redirect_msg_source(sa, netns, d, v6 as u32);
    }
    to_localhost(sa, v6, d.v4_in_v6, DNS_PROXY_PORT);
    SEND_PROCEED
}
