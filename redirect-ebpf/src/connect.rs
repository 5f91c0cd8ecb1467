//! cgroup/connect4 and connect6: the nat OUTPUT chain (ISTIO_OUTPUT, then
//! ISTIO_REDIRECT to the outbound capture port, ISTIO_IN_REDIRECT to the
//! inbound one, or ISTIO_OUTPUT_DNS to the DNS proxy for TCP and connected
//! UDP). The decision is `redirect_common::outbound_verdict`; this file
//! reads the connect, rewrites its destination to localhost and the
//! capture port, and records the original destination by socket cookie
//! for SO_ORIGINAL_DST and getpeername (`orig_dst.rs`, via `sockops.rs`)
//! and, for UDP, for the replies (`recvmsg.rs`).
//! Before the rewrite it binds an unbound socket to the source address the
//! pod's route to the original destination gives (iptables NAT keeps it),
//! so the proxy and the app see the connection as under iptables.

use core::{ffi::c_void, mem::MaybeUninit};

use aya_ebpf::{
    bindings::{bpf_sock, bpf_sock_addr, sockaddr},
    helpers::{bpf_bind, bpf_get_current_uid_gid, bpf_get_socket_cookie},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use redirect_common::{
    flags, outbound_verdict, redirect_source, v4_mapped, v4_to_mapped, OrigDst, Outbound,
    PodConfig, Reason, Verdict, AF_INET, AF_INET6, DNS_PROXY_PORT, IPPROTO_TCP, IPPROTO_UDP,
};

use crate::{
    addr::{ctx_ip4, ctx_ip6, set_user_ip6},
    counters::{count, count_code},
    maps::{PodMaps, REDIRECT_ORIG_BY_COOKIE, REDIRECT_PODS},
    netns, trace,
};

/// connect4/6 verdicts: go on (rewritten or not), or refuse (EPERM).
const CONNECT_PROCEED: i32 = 1;
const CONNECT_REFUSE: i32 = 0;

#[cgroup_sock_addr(connect4)]
pub fn redirect_connect4(ctx: SockAddrContext) -> i32 {
    unsafe { connect(&ctx, false) }
}

#[cgroup_sock_addr(connect6)]
pub fn redirect_connect6(ctx: SockAddrContext) -> i32 {
    unsafe { connect(&ctx, true) }
}

/// The OUTPUT chain: rewrites or leaves. It refuses a connect only when a
/// connection it must redirect cannot be recorded (original-destination
/// map full): fail closed, counted, never a bypass of the proxy.
#[inline(always)]
unsafe fn connect(ctx: &SockAddrContext, v6: bool) -> i32 {
    let sa = ctx.sock_addr;
    let netns = netns::of_sock_addr(sa);
    let Some(cfg) = REDIRECT_PODS.get(&netns) else {
        return CONNECT_PROCEED;
    };
    let proto = (*sa).protocol;
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        count(netns, Reason::OutNotTcp);
        return CONNECT_PROCEED;
    }
    let mut d = MaybeUninit::<Decided>::uninit();
    let reason = decide(sa, cfg, netns, v6 as u32, d.as_mut_ptr());
    let d = d.assume_init_ref();
    let verdict = d.verdict;
    count_code(netns, reason);
    trace::outbound(trace::CONNECT, netns, cfg, d);
    let port = match verdict {
        Verdict::Untouched(_) => {
            // A UDP socket connected again elsewhere: the record of its
            // earlier (DNS) peer no longer applies.
            if proto == IPPROTO_UDP && cfg.has(flags::DNS_CAPTURE) {
                let cookie = bpf_get_socket_cookie(sa as *mut c_void);
                let _ = REDIRECT_ORIG_BY_COOKIE.remove(&cookie);
            }
            return CONNECT_PROCEED;
        }
        Verdict::ToOutbound(_) => cfg.proxy_port,
        Verdict::ToInbound(_) => cfg.inbound_port,
        Verdict::ToDns(_) => DNS_PROXY_PORT,
    };
    // The original destination is the one the connection really has (a
    // connect to the unspecified address goes to this host), as conntrack
    // records it.
    let orig = OrigDst {
        addr: d.dst,
        port: d.conn.dport,
        family: d.conn.family,
        reason: verdict.reason() as u32,
    };
    let cookie = bpf_get_socket_cookie(sa as *mut c_void);
    // Fail closed: a connection we cannot record is refused here (the app
    // gets EPERM at once), neither sent to a proxy that could not route it
    // nor let past the proxy. Counted under the verdict above and here.
    if REDIRECT_ORIG_BY_COOKIE.insert(&cookie, &orig, 0).is_err() {
        count(netns, Reason::ErrOrigMapFull);
        trace::refused(trace::CONNECT, netns, d);
        return CONNECT_REFUSE;
    }
    // The source iptables would leave: bound now, or the loopback
    // destination below makes the kernel pick a loopback source. Only for
    // a socket the app has not bound (address or port; nor, for UDP, an
    // earlier datagram).
    if d.unbound && bind_redirect_source(sa, netns, d, v6 as u32) {
        count(netns, Reason::ErrSourceBind);
    }
    to_localhost(sa, v6, d.v4_in_v6, port);
    CONNECT_PROCEED
}

/// A sock_addr context as the OUTPUT decision saw it ([`decide`]).
pub struct Decided {
    pub conn: Outbound,
    /// `conn`'s effective destination (`Outbound::effective_dst`).
    pub dst: [u8; 16],
    pub verdict: Verdict,
    /// A v4-mapped destination on an IPv6 socket (decided as IPv4).
    pub v4_in_v6: bool,
    /// No source address: none given with the datagram, none bound.
    pub src_unset: bool,
    /// Neither a source address nor a port bound.
    pub unbound: bool,
}

/// `decide`'s `how`: the context is IPv6 (sendmsg6, connect6).
pub const DECIDE_V6: u32 = 1;
/// `decide`'s `how`: a datagram's own source (IP_PKTINFO) comes first.
pub const DECIDE_MSG_SRC: u32 = 2;

/// Read a sock_addr context (connect, sendmsg) and take the OUTPUT
/// decision (`redirect_common::outbound_verdict`) into `out`; returns its
/// reason code. `how`:
/// [`DECIDE_V6`], [`DECIDE_MSG_SRC`]: a constant at each call, so the
/// verifier never walks the `msg_src` reads of a connect hook (which may
/// not read them). A BPF subprogram: the addresses, the decision's map
/// keys and copies live in a frame of their own, not in the hook's, which
/// also calls `bind_redirect_source` or `set_redirect_msg_source` (the
/// verifier's 512-byte limit is on the sum of a call chain's frames).
#[inline(never)]
pub unsafe fn decide(
    sa: *mut bpf_sock_addr,
    cfg: &PodConfig,
    netns: u64,
    how: u32,
    out: *mut Decided,
) -> u32 {
    let v6 = how & DECIDE_V6 != 0;
    let sk: *mut bpf_sock = (*sa).__bindgen_anon_1.sk;
    let mut src = [0u8; 16];
    if how & DECIDE_MSG_SRC != 0 {
        src = if v6 {
            ctx_ip6(&raw const (*sa).msg_src_ip6)
        } else {
            ctx_ip4(&raw const (*sa).msg_src_ip4)
        };
    }
    if src == [0u8; 16] {
        src = if v6 {
            ctx_ip6(&raw const (*sk).src_ip6)
        } else {
            ctx_ip4(&raw const (*sk).src_ip4)
        };
    }
    let src_unset = src == [0u8; 16];
    let unbound = src_unset && (*sk).src_port == 0;
    let (conn, v4_in_v6) = read_outbound(sa, v6, (*sa).protocol, src);
    // Field by field into the caller's `out`, the connection first and
    // decided from there: no second copy of `Decided` in this frame
    // (which, with the hook's and a lookup's, must fit in 512 bytes on
    // every kernel).
    let out = &raw mut *out;
    (&raw mut (*out).conn).write(conn);
    let conn = &*(&raw const (*out).conn);
    (&raw mut (*out).dst).write(conn.effective_dst());
    (&raw mut (*out).v4_in_v6).write(v4_in_v6);
    (&raw mut (*out).src_unset).write(src_unset);
    (&raw mut (*out).unbound).write(unbound);
    let verdict = outbound_verdict(cfg, conn, &PodMaps { netns });
    (&raw mut (*out).verdict).write(verdict);
    // A scalar in r0, used by the callers (else the compiler drops it):
    // the verifier refuses a subprogram that leaves a pointer into a
    // stack (here the caller's `out`) there.
    verdict.reason() as u32
}

/// The OUTPUT decision's view of a sock_addr context (connect, sendmsg):
/// its destination, the bound source `src` (in the context's family), the
/// caller's ids. A dual-stack socket dialing ::ffff:a.b.c.d makes an IPv4
/// connection: iptables sees IPv4, so it is decided (and its original
/// destination answered) as IPv4; the bool says so.
#[inline(always)]
unsafe fn read_outbound(
    sa: *mut bpf_sock_addr,
    v6: bool,
    proto: u32,
    src: [u8; 16],
) -> (Outbound, bool) {
    let (mut family, mut dst, mut src) = if v6 {
        (AF_INET6, ctx_ip6(&raw const (*sa).user_ip6), src)
    } else {
        (AF_INET, ctx_ip4(&raw const (*sa).user_ip4), src)
    };
    let mut v4_in_v6 = false;
    if v6 {
        if let Some(d) = v4_mapped(&dst) {
            family = AF_INET;
            dst = d;
            src = v4_mapped(&src).unwrap_or([0; 16]);
            v4_in_v6 = true;
        }
    }
    let ids = bpf_get_current_uid_gid();
    let conn = Outbound {
        family,
        proto,
        dst,
        dport: u16::from_be((*sa).user_port as u16),
        src,
        uid: ids as u32,
        gid: (ids >> 32) as u32,
    };
    (conn, v4_in_v6)
}

/// Rewrite a sock_addr's destination to the family's localhost and `port`
/// (127.0.0.1, [::1], or ::ffff:127.0.0.1 for a v4-mapped destination),
/// as REDIRECT does for locally made connections.
#[inline(always)]
pub unsafe fn to_localhost(sa: *mut bpf_sock_addr, v6: bool, v4_in_v6: bool, port: u16) {
    (*sa).user_port = (port.to_be()) as u32;
    if !v6 {
        (*sa).user_ip4 = u32::from_ne_bytes([127, 0, 0, 1]);
    } else {
        let target = if v4_in_v6 {
            let mut lo = [0u8; 16];
            lo[0] = 127;
            lo[3] = 1;
            v4_to_mapped(&lo)
        } else {
            redirect_common::V6_LOCALHOST
        };
        set_user_ip6(sa, &target);
    }
}

#[repr(C)]
struct SockaddrIn {
    family: u16,
    port: u16,
    addr: [u8; 4],
    zero: [u8; 8],
}

#[repr(C)]
struct SockaddrIn6 {
    family: u16,
    port: u16,
    flowinfo: u32,
    addr: [u8; 16],
    scope_id: u32,
}

/// Bind the socket to the source `redirect_source` gives (if any); true
/// when that failed. `v6`: the context is IPv6. A function of its own (a
/// BPF subprogram): its stack is not added to the connect hook's, which
/// the verifier's 512-byte frame limit would not take.
#[inline(never)]
unsafe fn bind_redirect_source(sa: *mut bpf_sock_addr, netns: u64, d: &Decided, v6: u32) -> bool {
    let family = d.conn.family;
    match redirect_source(d.verdict, family, &d.dst, &PodMaps { netns }) {
        Some(s) => bind_source(sa, v6 != 0, family, &s) != 0,
        None => false,
    }
}

/// `bpf_bind` to `src` (of the decided `family`: an IPv4 connection on an
/// IPv6 socket binds its v4-mapped form), port 0: the kernel picks the port
/// at connect, as for an unbound socket.
#[inline(always)]
unsafe fn bind_source(sa: *mut bpf_sock_addr, v6: bool, family: u16, src: &[u8; 16]) -> i64 {
    if !v6 {
        let mut a = SockaddrIn {
            family: AF_INET,
            port: 0,
            addr: [src[0], src[1], src[2], src[3]],
            zero: [0; 8],
        };
        return bpf_bind(
            sa,
            &mut a as *mut SockaddrIn as *mut sockaddr,
            core::mem::size_of::<SockaddrIn>() as i32,
        );
    }
    let addr = if family == AF_INET {
        v4_to_mapped(src)
    } else {
        *src
    };
    let mut a = SockaddrIn6 {
        family: AF_INET6,
        port: 0,
        flowinfo: 0,
        addr,
        scope_id: 0,
    };
    bpf_bind(
        sa,
        &mut a as *mut SockaddrIn6 as *mut sockaddr,
        core::mem::size_of::<SockaddrIn6>() as i32,
    )
}

/// The source a datagram sent with an address gets under iptables when
/// the sendmsg hook redirects it (`sendmsg.rs`): written into the
/// context's `msg_src_ip4/6` (as IP_PKTINFO would give it), since
/// `bpf_bind` is not allowed there. The caller checks that neither the
/// datagram nor the socket names a source. `v6`: the context is IPv6. A
/// BPF subprogram, as `bind_redirect_source`.
#[inline(never)]
pub unsafe fn set_redirect_msg_source(sa: *mut bpf_sock_addr, netns: u64, d: &Decided, v6: u32) {
    let family = d.conn.family;
    let Some(s) = redirect_source(d.verdict, family, &d.dst, &PodMaps { netns }) else {
        return;
    };
    if v6 == 0 {
        (*sa).msg_src_ip4 = u32::from_ne_bytes([s[0], s[1], s[2], s[3]]);
        return;
    }
    let addr = if family == AF_INET {
        v4_to_mapped(&s)
    } else {
        s
    };
    let w = crate::addr::words(&addr);
    (*sa).msg_src_ip6[0] = w[0];
    (*sa).msg_src_ip6[1] = w[1];
    (*sa).msg_src_ip6[2] = w[2];
    (*sa).msg_src_ip6[3] = w[3];
}
