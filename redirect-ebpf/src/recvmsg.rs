//! cgroup/recvmsg4 and recvmsg6: the un-NAT of captured DNS replies. A
//! datagram the app reads with its source address (`recvfrom`, `recvmsg`
//! with a name: the kernel runs these hooks only then) that comes from
//! the DNS proxy (127.0.0.1:15053, [::1]:15053 or ::ffff:127.0.0.1:15053)
//! on a socket whose query was captured (`sendmsg.rs`, or `connect.rs`
//! for connected UDP) reads as coming from the nameserver the app asked,
//! port 53, as conntrack would show it after the nat REDIRECT. Resolvers
//! (glibc, musl, Go) drop replies from an address they did not ask.
//!
//! Only the reply's address is rewritten; the payload is the proxy's.

use core::ffi::c_void;

use aya_ebpf::{
    helpers::bpf_get_socket_cookie, macros::cgroup_sock_addr, programs::SockAddrContext,
};
use redirect_common::{v4_to_mapped, Reason, AF_INET, DNS_PROXY_PORT, V6_LOCALHOST};

use crate::{
    addr::{ctx_ip6, set_user_ip6},
    counters::count,
    maps::REDIRECT_ORIG_BY_COOKIE,
    netns, trace,
};

/// recvmsg programs must allow (the verifier accepts only 1).
const RECV_PROCEED: i32 = 1;

#[cgroup_sock_addr(recvmsg4)]
pub fn redirect_recvmsg4(ctx: SockAddrContext) -> i32 {
    unsafe { recvmsg(&ctx, false) };
    RECV_PROCEED
}

#[cgroup_sock_addr(recvmsg6)]
pub fn redirect_recvmsg6(ctx: SockAddrContext) -> i32 {
    unsafe { recvmsg(&ctx, true) };
    RECV_PROCEED
}

#[inline(always)]
unsafe fn recvmsg(ctx: &SockAddrContext, v6: bool) {
    let sa = ctx.sock_addr;
    if u16::from_be((*sa).user_port as u16) != DNS_PROXY_PORT {
        return;
    }
    const V4_LOCALHOST: [u8; 4] = [127, 0, 0, 1];
    let mut mapped_lo = [0u8; 16];
    mapped_lo[..4].copy_from_slice(&V4_LOCALHOST);
    let mapped_lo = v4_to_mapped(&mapped_lo);
    let from_proxy = if v6 {
        let src = ctx_ip6(&raw const (*sa).user_ip6);
        src == V6_LOCALHOST || src == mapped_lo
    } else {
        (*sa).user_ip4 == u32::from_ne_bytes(V4_LOCALHOST)
    };
    if !from_proxy {
        return;
    }
    let cookie = bpf_get_socket_cookie(sa as *mut c_void);
    let Some(orig) = REDIRECT_ORIG_BY_COOKIE.get(&cookie) else {
        return;
    };
    if !v6 {
        if orig.family != AF_INET {
            return;
        }
        (*sa).user_ip4 =
            u32::from_ne_bytes([orig.addr[0], orig.addr[1], orig.addr[2], orig.addr[3]]);
    } else {
        let addr = if orig.family == AF_INET {
            v4_to_mapped(&orig.addr)
        } else {
            orig.addr
        };
        set_user_ip6(sa, &addr);
    }
    (*sa).user_port = (orig.port.to_be()) as u32;
    let netns = netns::of_sock_addr(sa);
    count(netns, Reason::DnsReplyRewritten);
    trace::recvmsg(netns, orig);
}
