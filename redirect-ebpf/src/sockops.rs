//! sockops: the lifecycle conntrack gives a NATed connection.
//! - SYN sent: ask for state callbacks, so the records of a connect that
//!   never completes are removed on close.
//! - Established (active side, the app): publish the original destination
//!   under the app socket's 4-tuple, which the proxy's accepted socket asks
//!   for with SO_ORIGINAL_DST (`orig_dst.rs`).
//! - Closed: remove the records and add the connection's bytes to the
//!   counter of the rule that redirected it.
//! - Listening: register the proxy's inbound listener (`inbound.rs`).
//!
//! App↔proxy sockets are also handed to acceleration here (`accel.rs`).

use core::ffi::c_void;

use aya_ebpf::{
    bindings::BPF_ANY,
    helpers::{bpf_get_socket_cookie, bpf_sock_ops_cb_flags_set},
    macros::sock_ops,
    programs::SockOpsContext,
};
use redirect_common::{flags, Reason};

use crate::{
    abi::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
        BPF_SOCK_OPS_TCP_LISTEN_CB, TCP_CLOSE,
    },
    accel,
    addr::ops_tuple,
    counters::{add_bytes, count},
    inbound,
    maps::{REDIRECT_ORIG_BY_COOKIE, REDIRECT_ORIG_BY_TUPLE, REDIRECT_PODS},
    netns,
};

#[sock_ops]
pub fn redirect_sockops(ctx: SockOpsContext) -> u32 {
    unsafe { sockops::<false>(&ctx) }
}

/// The same for kernels without `bpf_get_netns_cookie` in sockops (before
/// 5.15): the netns cookie comes from the socket's storage (`netns.rs`).
#[sock_ops]
pub fn redirect_sockops_stored(ctx: SockOpsContext) -> u32 {
    unsafe { sockops::<true>(&ctx) }
}

#[inline(always)]
unsafe fn sockops<const STORED: bool>(ctx: &SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => connecting(ctx),
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => active_established::<STORED>(ctx),
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => passive_established::<STORED>(ctx),
        BPF_SOCK_OPS_TCP_LISTEN_CB => inbound::register_listener::<STORED>(ctx),
        BPF_SOCK_OPS_STATE_CB => {
            if ctx.arg(1) == TCP_CLOSE {
                closed::<STORED>(ctx);
            }
        }
        _ => {}
    }
    1
}

/// A redirected app socket sends its SYN: ask for its state changes from
/// now on, so a connect that never completes (nothing listening on the
/// proxy port, timeout, RST) still removes its record on close. The
/// original-destination maps are plain hashes with no LRU backstop.
#[inline(always)]
unsafe fn connecting(ctx: &SockOpsContext) {
    let ops = ctx.ops;
    let cookie = bpf_get_socket_cookie(ops as *mut c_void);
    if REDIRECT_ORIG_BY_COOKIE.get(&cookie).is_some() {
        let _ = bpf_sock_ops_cb_flags_set(ops, BPF_SOCK_OPS_STATE_CB_FLAG);
    }
}

/// Active side established. For an app socket we redirected: publish its
/// original destination under the 4-tuple the proxy's accepted socket will
/// see. App sockets to the proxy and the proxy's passthrough sockets to the
/// app are accelerated when the pod wants it.
#[inline(always)]
unsafe fn active_established<const STORED: bool>(ctx: &SockOpsContext) {
    let ops = ctx.ops;
    let netns = netns::of_sock_ops::<STORED>(ops);
    let Some(cfg) = REDIRECT_PODS.get(&netns) else {
        return;
    };
    let t = ops_tuple(ops);
    let cookie = bpf_get_socket_cookie(ops as *mut c_void);
    let accel = cfg.has(flags::ACCEL);
    match REDIRECT_ORIG_BY_COOKIE.get(&cookie) {
        Some(orig) => {
            if REDIRECT_ORIG_BY_TUPLE
                .insert(&t.own_key(netns), orig, BPF_ANY as u64)
                .is_err()
            {
                count(netns, Reason::ErrTupleMapFull);
            }
            if accel {
                accel::accelerate_active(ops, netns, &cfg, &t, orig.port);
            }
        }
        None => {
            if !(accel && accel::is_passthrough_pair(netns, t.family, &t.local, &t.remote)) {
                return;
            }
            // The proxy's passthrough to the app: the app's port.
            accel::accelerate_active(ops, netns, &cfg, &t, t.remote_port);
        }
    }
    // Clean up (cookie entry, fallback mark) when the socket closes.
    let _ = bpf_sock_ops_cb_flags_set(ops, BPF_SOCK_OPS_STATE_CB_FLAG);
}

/// Passive side established: the proxy accepted a connection we
/// redirected (its close removes the tuple entry), or the app accepted the
/// proxy's passthrough connection. Accelerated when the pod wants it.
#[inline(always)]
unsafe fn passive_established<const STORED: bool>(ctx: &SockOpsContext) {
    let ops = ctx.ops;
    let netns = netns::of_sock_ops::<STORED>(ops);
    let Some(cfg) = REDIRECT_PODS.get(&netns) else {
        return;
    };
    let t = ops_tuple(ops);
    let orig_port = REDIRECT_ORIG_BY_TUPLE
        .get(&t.peer_key(netns))
        .map(|o| o.port);
    let redirected = orig_port.is_some();
    let accel = accel::accelerate_passive(ops, netns, cfg, &t, orig_port);
    if redirected || accel {
        let _ = bpf_sock_ops_cb_flags_set(ops, BPF_SOCK_OPS_STATE_CB_FLAG);
    }
}

/// The socket closed: drop its records (and count the bytes of a
/// redirected app socket), then let acceleration forget it.
#[inline(always)]
unsafe fn closed<const STORED: bool>(ctx: &SockOpsContext) {
    let ops = ctx.ops;
    let netns = netns::of_sock_ops::<STORED>(ops);
    let cookie = bpf_get_socket_cookie(ops as *mut c_void);
    if let Some(orig) = REDIRECT_ORIG_BY_COOKIE.get(&cookie) {
        // The app side of a redirected connection: account its bytes
        // (both directions) to the rule that redirected it.
        add_bytes(
            netns,
            orig.reason,
            (*ops).bytes_received + (*ops).bytes_acked,
        );
        let _ = REDIRECT_ORIG_BY_COOKIE.remove(&cookie);
    }
    let t = ops_tuple(ops);
    let _ = REDIRECT_ORIG_BY_TUPLE.remove(&t.peer_key(netns));
    accel::closed(ops, netns, &t);
}
