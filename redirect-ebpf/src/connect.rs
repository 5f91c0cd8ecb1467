//! cgroup/connect4 and connect6: the nat OUTPUT chain (ISTIO_OUTPUT, then
//! ISTIO_REDIRECT to the outbound capture port, ISTIO_IN_REDIRECT to the
//! inbound one, or ISTIO_OUTPUT_DNS to the DNS proxy for TCP and connected
//! UDP). The decision is `redirect_common::outbound_verdict`; this file
//! reads the connect, rewrites its destination to localhost and the
//! capture port, and records the original destination by socket cookie
//! for SO_ORIGINAL_DST and getpeername (`orig_dst.rs`, via `sockops.rs`)
//! and, for UDP, for the replies (`recvmsg.rs`).

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{bpf_sock, bpf_sock_addr},
    helpers::{bpf_get_current_uid_gid, bpf_get_socket_cookie},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use redirect_common::{
    flags, outbound_verdict, v4_mapped, v4_to_mapped, OrigDst, Outbound, Reason, Verdict, AF_INET,
    AF_INET6, DNS_PROXY_PORT, IPPROTO_TCP, IPPROTO_UDP,
};

use crate::{
    addr::{ip4_bytes, ip6_bytes, set_user_ip6},
    counters::count,
    maps::{PodMaps, REDIRECT_ORIG_BY_COOKIE, REDIRECT_PODS},
    netns,
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
    let sk: *mut bpf_sock = (*sa).__bindgen_anon_1.sk;
    let src = if v6 {
        ip6_bytes((*sk).src_ip6)
    } else {
        ip4_bytes((*sk).src_ip4)
    };
    let (conn, v4_in_v6) = read_outbound(sa, v6, proto, src);
    let (family, dport) = (conn.family, conn.dport);
    let verdict = outbound_verdict(cfg, &conn, &PodMaps { netns });
    count(netns, verdict.reason());
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
        addr: conn.effective_dst(),
        port: dport,
        family,
        reason: verdict.reason() as u32,
    };
    let cookie = bpf_get_socket_cookie(sa as *mut c_void);
    // Fail closed: a connection we cannot record is refused here (the app
    // gets EPERM at once), neither sent to a proxy that could not route it
    // nor let past the proxy. Counted under the verdict above and here.
    if REDIRECT_ORIG_BY_COOKIE.insert(&cookie, &orig, 0).is_err() {
        count(netns, Reason::ErrOrigMapFull);
        return CONNECT_REFUSE;
    }
    to_localhost(sa, v6, v4_in_v6, port);
    CONNECT_PROCEED
}

/// The OUTPUT decision's view of a sock_addr context (connect, sendmsg):
/// its destination, the bound source `src` (in the context's family), the
/// caller's ids. A dual-stack socket dialing ::ffff:a.b.c.d makes an IPv4
/// connection: iptables sees IPv4, so it is decided (and its original
/// destination answered) as IPv4; the bool says so.
#[inline(always)]
pub unsafe fn read_outbound(
    sa: *mut bpf_sock_addr,
    v6: bool,
    proto: u32,
    src: [u8; 16],
) -> (Outbound, bool) {
    let (mut family, mut dst, mut src) = if v6 {
        (AF_INET6, ip6_bytes((*sa).user_ip6), src)
    } else {
        (AF_INET, ip4_bytes((*sa).user_ip4), src)
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
