//! The original destination, handed out as conntrack would after the nat
//! REDIRECT rules:
//! - cgroup/getsockopt answers `SO_ORIGINAL_DST` / `IP6T_SO_ORIGINAL_DST`
//!   on the proxy's accepted socket (outbound: the record `sockops.rs`
//!   published under the app socket's 4-tuple; inbound: sk_lookup kept the
//!   original local address on the socket);
//! - cgroup/getpeername4/6 undo the NAT for the app: its socket reports the
//!   peer it dialed, not the proxy.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::bpf_sock,
    helpers::bpf_get_socket_cookie,
    macros::{cgroup_sock_addr, cgroup_sockopt},
    programs::{SockAddrContext, SockoptContext},
};
use redirect_common::{
    v4_to_mapped, OrigDst, Reason, AF_INET, AF_INET6, IPPROTO_MPTCP, SOL_IP, SOL_IPV6,
    SO_ORIGINAL_DST,
};

use crate::{
    addr::{set_user_ip6, sock_tuple},
    counters::count,
    maps::{REDIRECT_ORIG_BY_COOKIE, REDIRECT_ORIG_BY_TUPLE, REDIRECT_PODS},
    netns, trace,
};

// ------------------------------------------------------------ getpeername

#[cgroup_sock_addr(getpeername4)]
pub fn redirect_getpeername4(ctx: SockAddrContext) -> i32 {
    unsafe { getpeername(&ctx, false) };
    1
}

#[cgroup_sock_addr(getpeername6)]
pub fn redirect_getpeername6(ctx: SockAddrContext) -> i32 {
    unsafe { getpeername(&ctx, true) };
    1
}

/// NAT is invisible to the app: its socket reports the original peer.
///
/// An MPTCP socket is not the socket that connected: its first subflow, a
/// TCP socket of its own (with its own cookie), went through connect and
/// sockops, and the MPTCP socket reports the subflow's addresses. Its
/// record is found by that 4-tuple instead (the subflow's tuple record).
#[inline(always)]
unsafe fn getpeername(ctx: &SockAddrContext, v6: bool) {
    let sa = ctx.sock_addr;
    let cookie = bpf_get_socket_cookie(sa as *mut c_void);
    let netns = netns::of_sock_addr(sa);
    let orig = match REDIRECT_ORIG_BY_COOKIE.get(&cookie) {
        Some(o) => o,
        None => {
            let sk: *mut bpf_sock = (*sa).__bindgen_anon_1.sk;
            if sk.is_null() || (*sk).protocol != IPPROTO_MPTCP {
                return;
            }
            match REDIRECT_ORIG_BY_TUPLE.get(&sock_tuple(sk).own_key(netns)) {
                Some(o) => o,
                None => return,
            }
        }
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
    count(netns, Reason::PeerNameRewritten);
    trace::getpeername(netns, orig);
}

// ------------------------------------------------------------- getsockopt

#[cgroup_sockopt(getsockopt)]
pub fn redirect_getsockopt(ctx: SockoptContext) -> i32 {
    unsafe { getsockopt::<false>(&ctx) };
    1
}

/// The same for kernels without `bpf_get_netns_cookie` in getsockopt
/// (before 5.15): the netns cookie comes from the socket's storage
/// (`netns.rs`).
#[cgroup_sockopt(getsockopt)]
pub fn redirect_getsockopt_stored(ctx: SockoptContext) -> i32 {
    unsafe { getsockopt::<true>(&ctx) };
    1
}

/// Every getsockopt of the pod's processes comes here, after the kernel
/// answered it: SO_ORIGINAL_DST is answered, anything else is left as the
/// kernel made it.
#[inline(always)]
unsafe fn getsockopt<const STORED: bool>(ctx: &SockoptContext) {
    if !original_dst::<STORED>(ctx) {
        untouched(ctx.sockopt);
    }
}

/// The smallest page size: the kernel hands a getsockopt program at most
/// one page of the option buffer.
const MIN_PAGE_SIZE: i32 = 4096;

/// Leave a call as the kernel made it, whatever its size. The program sees
/// only the first page of a larger option buffer, and a result longer
/// than what the program holds fails the call with EFAULT (Linux 5.8 to
/// 6.4; later kernels ignore the program's buffer then): `iptables -L`,
/// whose rule dump is one getsockopt of the whole table, would fail in a
/// captured pod. optlen 0 means "keep the kernel's result" on every
/// kernel since 5.8 (Documentation/bpf/prog_cgroup_sockopt.rst, "Large
/// optval"). Smaller results keep their optlen: a program attached below
/// ours (run first) may have answered them.
#[inline(always)]
unsafe fn untouched(so: *mut aya_ebpf::bindings::bpf_sockopt) {
    if (*so).optlen > MIN_PAGE_SIZE {
        (*so).optlen = 0;
    }
}

/// Answer SO_ORIGINAL_DST / IP6T_SO_ORIGINAL_DST the way conntrack would.
/// False when the call is not one to answer (or cannot be answered).
#[inline(always)]
unsafe fn original_dst<const STORED: bool>(ctx: &SockoptContext) -> bool {
    let so = ctx.sockopt;
    if (*so).optname != SO_ORIGINAL_DST {
        return false;
    }
    let level = (*so).level;
    if level != SOL_IP && level != SOL_IPV6 {
        return false;
    }
    let netns = netns::of_sockopt::<STORED>(so);
    if REDIRECT_PODS.get(&netns).is_none() {
        return false;
    }
    let sk: *mut bpf_sock = (*so).__bindgen_anon_1.sk;
    if sk.is_null() {
        return false;
    }
    // The proxy's accepted socket: its peer is the app socket, whose own
    // 4-tuple keys the record.
    let t = sock_tuple(sk);
    // Only the connection's own family's level can be answered (as with
    // conntrack): a proxy trying the other one too is no miss. Left alone.
    if level != redirect_common::orig_dst_level(t.family) {
        return false;
    }
    let (orig, reason) = match REDIRECT_ORIG_BY_TUPLE.get(&t.peer_key(netns)) {
        Some(o) => (*o, Reason::OrigDstOutbound),
        None => {
            // Inbound steering keeps the original local address on the
            // accepted socket: that is the original destination.
            let loopback = if t.family == AF_INET {
                t.local[0] == 127
            } else {
                t.local == redirect_common::V6_LOCALHOST
            };
            if loopback {
                count(netns, Reason::OrigDstMissing);
                trace::getsockopt(netns, Reason::OrigDstMissing, None, &t);
                return false;
            }
            (
                OrigDst {
                    addr: t.local,
                    port: t.local_port,
                    family: t.family,
                    reason: Reason::InCaptured as u32,
                },
                Reason::OrigDstInbound,
            )
        }
    };
    let want = if orig.family == AF_INET {
        SOL_IP
    } else {
        SOL_IPV6
    };
    if level != want {
        count(netns, Reason::OrigDstMissing);
        trace::getsockopt(netns, Reason::OrigDstMissing, None, &t);
        return false;
    }
    let optval = (*so).__bindgen_anon_2.optval as *mut u8;
    let end = (*so).__bindgen_anon_3.optval_end as *mut u8;
    let port = orig.port.to_be_bytes();
    if orig.family == AF_INET {
        if optval.add(16) > end || (*so).optlen < 16 {
            return false;
        }
        let fam = AF_INET.to_ne_bytes();
        let b: [u8; 16] = [
            fam[0],
            fam[1],
            port[0],
            port[1],
            orig.addr[0],
            orig.addr[1],
            orig.addr[2],
            orig.addr[3],
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
        ];
        core::ptr::write_unaligned(optval as *mut [u8; 16], b);
        (*so).optlen = 16;
    } else {
        if optval.add(28) > end || (*so).optlen < 28 {
            return false;
        }
        let fam = AF_INET6.to_ne_bytes();
        let head: [u8; 8] = [fam[0], fam[1], port[0], port[1], 0, 0, 0, 0];
        core::ptr::write_unaligned(optval as *mut [u8; 8], head);
        core::ptr::write_unaligned(optval.add(8) as *mut [u8; 16], orig.addr);
        core::ptr::write_unaligned(optval.add(24) as *mut [u8; 4], [0, 0, 0, 0]);
        (*so).optlen = 28;
    }
    (*so).retval = 0;
    count(netns, reason);
    trace::getsockopt(netns, reason, Some(&orig), &t);
    true
}
