//! sockops: the lifecycle conntrack gives a NATed connection.
//! - SYN about to be sent (active side, the app): publish the original
//!   destination under the app socket's 4-tuple, which the proxy's
//!   accepted socket asks for with SO_ORIGINAL_DST (`orig_dst.rs`), and
//!   ask for state callbacks. The record exists before the proxy can see
//!   the connection, whatever the order of the two sides' later callbacks
//!   (with TCP Fast Open the proxy's side is established, and may be
//!   accepted, before the app's side).
//! - Established: acceleration (`accel.rs`); the proxy's accepted socket
//!   asks for its state callbacks too.
//! - Closed: remove the records (either side's close removes the tuple
//!   record, so none outlives its connection) and add the connection's
//!   bytes to the counter of the rule that redirected it.
//! - Listening: register the proxy's inbound listener (`inbound.rs`).
//! - An IPv6 connection of the pod to one of its own addresses: its
//!   4-tuple is marked from the SYN until the socket closes, so that
//!   sk_lookup tells its SYN from one from outside (`inbound.rs`).
//!
//! App↔proxy sockets are also handed to acceleration here (`accel.rs`).

use core::ffi::c_void;

use aya_ebpf::{
    bindings::BPF_ANY,
    helpers::{bpf_get_socket_cookie, bpf_sock_ops_cb_flags_set},
    macros::sock_ops,
    programs::SockOpsContext,
};
use redirect_common::{flags, is_local, Reason, AF_INET6, V6_LOCALHOST};

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
    maps::{
        PodMaps, REDIRECT_LOCAL_CONNECTS, REDIRECT_ORIG_BY_COOKIE, REDIRECT_ORIG_BY_TUPLE,
        REDIRECT_PODS,
    },
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
        BPF_SOCK_OPS_TCP_CONNECT_CB => connecting::<STORED>(ctx),
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

/// A redirected app socket is about to send its SYN (its 4-tuple is
/// final): publish its original destination under that 4-tuple, and ask
/// for its state changes from now on, so that its close removes both
/// records (a connect that never completes included: nothing listening on
/// the proxy port, timeout, RST). The original-destination maps are plain
/// hashes with no LRU backstop.
#[inline(always)]
unsafe fn connecting<const STORED: bool>(ctx: &SockOpsContext) {
    let ops = ctx.ops;
    let cookie = bpf_get_socket_cookie(ops as *mut c_void);
    let Some(orig) = REDIRECT_ORIG_BY_COOKIE.get(&cookie) else {
        local_connect::<STORED>(ops);
        return;
    };
    let netns = netns::of_sock_ops::<STORED>(ops);
    let t = ops_tuple(ops);
    if REDIRECT_ORIG_BY_TUPLE
        .insert(&t.own_key(netns), orig, BPF_ANY as u64)
        .is_err()
    {
        count(netns, Reason::ErrTupleMapFull);
    }
    let _ = bpf_sock_ops_cb_flags_set(ops, BPF_SOCK_OPS_STATE_CB_FLAG);
}

/// A connection that is not redirected is about to send its SYN: if it is
/// an IPv6 connection of a captured pod to one of the pod's own addresses
/// (not ::1, which stays on lo), mark its 4-tuple until it closes. Its
/// SYN reaches sk_lookup with the address's device as ingress and one of
/// the pod's addresses as source, as a SYN from outside with that source
/// would: the mark tells them apart (`inbound.rs`).
#[inline(always)]
unsafe fn local_connect<const STORED: bool>(ops: *mut aya_ebpf::bindings::bpf_sock_ops) {
    if (*ops).family != AF_INET6 as u32 {
        return;
    }
    let netns = netns::of_sock_ops::<STORED>(ops);
    if REDIRECT_PODS.get(&netns).is_none() {
        return;
    }
    let t = ops_tuple(ops);
    if t.family != AF_INET6
        || t.remote == V6_LOCALHOST
        || !is_local(AF_INET6, &t.remote, &PodMaps { netns })
    {
        return;
    }
    if REDIRECT_LOCAL_CONNECTS
        .insert(&t.own_key(netns), &1, BPF_ANY as u64)
        .is_err()
    {
        count(netns, Reason::ErrLocalMapFull);
        // Unmarked, its SYN would be steered to the inbound port, and a
        // proxy passthrough steered there would dial again, unmarked too:
        // local sources count as the pod's own until there is room.
        if let Some(cfg) = REDIRECT_PODS.get_ptr_mut(&netns) {
            (*cfg).flags |= flags::LOCAL_MARKS_LOST;
        }
        return;
    }
    let _ = bpf_sock_ops_cb_flags_set(ops, BPF_SOCK_OPS_STATE_CB_FLAG);
}

/// Active side established. For an app socket we redirected, its tuple
/// record was published at connect; it is published here only if missing
/// (a connect made under an older program version). App sockets to the
/// proxy and the proxy's passthrough sockets to the app are accelerated
/// when the pod wants it.
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
            let own = t.own_key(netns);
            if REDIRECT_ORIG_BY_TUPLE.get(&own).is_none()
                && REDIRECT_ORIG_BY_TUPLE
                    .insert(&own, orig, BPF_ANY as u64)
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
    let orig = REDIRECT_ORIG_BY_TUPLE.get(&t.peer_key(netns));
    let redirected = orig.is_some();
    // A VM's connection (`vm.rs`) has no app socket in the pod to
    // accelerate with.
    let orig_port = orig
        .filter(|o| o.reason != Reason::InVirtCaptured as u32)
        .map(|o| o.port);
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
    // The tuple record goes with whichever side closes first: the app's
    // own key, or the proxy's peer key (the same record). The app's
    // socket only reaches TCP_CLOSE once the proxy's side has closed too
    // or was reset (or the connect failed), so the proxy has asked by
    // then; and the proxy's side may never have had its state callbacks.
    let t = ops_tuple(ops);
    let _ = REDIRECT_ORIG_BY_TUPLE.remove(&t.own_key(netns));
    let _ = REDIRECT_ORIG_BY_TUPLE.remove(&t.peer_key(netns));
    if t.family == AF_INET6 && REDIRECT_LOCAL_CONNECTS.remove(&t.own_key(netns)).is_ok() {
        // Room again for the pod's marks.
        if let Some(cfg) = REDIRECT_PODS.get_ptr_mut(&netns) {
            if (*cfg).flags & flags::LOCAL_MARKS_LOST != 0 {
                (*cfg).flags &= !flags::LOCAL_MARKS_LOST;
            }
        }
    }
    accel::closed(ops, netns, &t);
}
