//! Acceleration (no iptables counterpart: it skips the loopback TCP/IP hop
//! between the app and its proxy). sockops puts established app↔proxy
//! sockets into REDIRECT_SOCKS (the functions below it calls), and the
//! sk_msg program sends each message of such a socket straight to its
//! peer's receive queue. A socket falls back to the normal path for good
//! when its peer is missing or a message is bulk; ports whose connections
//! are short-lived are learned and left out.

use aya_ebpf::{
    bindings::{bpf_sock, bpf_sock_ops, BPF_ANY, BPF_F_INGRESS},
    macros::sk_msg,
    programs::SkMsgContext,
};
use redirect_common::{flags, PodConfig, PortKey, Reason, SockTuple, TupleKey};

use crate::{
    abi::SK_PASS,
    addr::msg_tuple,
    counters::{bump, count},
    maps::{
        accel_state, AccelSock, PodMaps, REDIRECT_ACCEL_FALLBACK, REDIRECT_ACCEL_PORTS,
        REDIRECT_SOCKS,
    },
    netns,
};

/// AccelSock states; the FALLBACK_* values are also the
/// REDIRECT_ACCEL_FALLBACK marks (why a socket is on the normal path).
const ACCEL_ON: u32 = 0;
const FALLBACK_PEER_MISSING: u32 = 1;
const FALLBACK_BULK: u32 = 2;
/// An active socket left out of the sockhash (its port's connections are
/// short-lived); its storage is there only to time it.
const ACCEL_SKIPPED: u32 = 3;

/// One verdict of this program covers this many bytes of the socket
/// (`bpf_msg_apply_bytes`): the kernel applies it to the socket's next
/// messages without running the program again until they add up to the
/// budget. Per message that leaves tcp_bpf's own path, with no program run,
/// storage or sockhash lookup (redirect_common::ACCEL_VERDICT_BYTES).
const BUDGET: u32 = redirect_common::ACCEL_VERDICT_BYTES;

// ----------------------------------------------------- sockops: insertion

/// Put an established app↔proxy socket into the acceleration sockhash
/// (before any data flows: this runs inside the handshake).
#[inline(always)]
unsafe fn accelerate(ops: *mut bpf_sock_ops, netns: u64, key: TupleKey) -> bool {
    let mut key = key;
    match REDIRECT_SOCKS.update(&mut key, &mut *ops, BPF_ANY as u64) {
        Ok(()) => {
            count(netns, Reason::AccelInserted);
            true
        }
        Err(_) => {
            count(netns, Reason::ErrSockMapFull);
            false
        }
    }
}

/// Does acceleration pay for a new connection of this pod to `port`? Not
/// once its latest connections were short-lived in a row (redirect_common::
/// accel_pays).
#[inline(always)]
fn accel_pays(netns: u64, cfg: &PodConfig, port: u16) -> bool {
    if cfg.has(flags::ACCEL_SHORT_CONNS) {
        return true;
    }
    let key = PortKey {
        netns,
        kind: redirect_common::port_kind::ACCEL_SHORT,
        port,
        _pad: 0,
    };
    match unsafe { REDIRECT_ACCEL_PORTS.get(&key) } {
        Some(n) => redirect_common::accel_pays(*n),
        None => true,
    }
}

/// The active side of an app↔proxy connection (the app's socket, or the
/// proxy's passthrough socket): accelerated unless the port's latest
/// connections were short-lived. Either way its storage records when it
/// was established and its port, so its close teaches the port.
#[inline(always)]
pub unsafe fn accelerate_active(
    ops: *mut bpf_sock_ops,
    netns: u64,
    cfg: &PodConfig,
    t: &SockTuple,
    port: u16,
) {
    let pays = accel_pays(netns, cfg, port);
    let sk = (*ops).__bindgen_anon_2.sk;
    let mut st = core::ptr::null_mut();
    if !sk.is_null() {
        let mut init = AccelSock {
            born_ns: aya_ebpf::helpers::generated::bpf_ktime_get_ns(),
            learn_port: port,
            ..AccelSock::new(
                t.peer_key(netns),
                if pays { ACCEL_ON } else { ACCEL_SKIPPED },
            )
        };
        st = accel_state(sk, &mut init);
    }
    if !pays {
        count(netns, Reason::AccelSkippedShort);
    } else if accelerate(ops, netns, t.own_key(netns)) && !st.is_null() {
        (*st).inserted = 1;
    }
}

/// Is this loopback connection the proxy's inbound passthrough to the app
/// (one end bound to 127.0.0.6 / ::6, the other an address of the pod)?
#[inline(always)]
pub fn is_passthrough_pair(netns: u64, family: u16, from: &[u8; 16], to: &[u8; 16]) -> bool {
    redirect_common::is_passthrough_source(family, from)
        && redirect_common::is_local(family, to, &PodMaps { netns })
}

/// The passive side of a connection (`orig_port`: the original
/// destination's port when the proxy accepted a connection we redirected):
/// accelerated when the pod wants it, it is app↔proxy, and the port pays.
/// Returns whether it is an accelerated connection (its close needs the
/// state callback).
#[inline(always)]
pub unsafe fn accelerate_passive(
    ops: *mut bpf_sock_ops,
    netns: u64,
    cfg: &PodConfig,
    t: &SockTuple,
    orig_port: Option<u16>,
) -> bool {
    let redirected = orig_port.is_some();
    // The same port as the active side decided on: the original
    // destination's, or for the passthrough the app's (this side's own).
    let port = orig_port.unwrap_or(t.local_port);
    let accel = cfg.has(flags::ACCEL)
        && (redirected || is_passthrough_pair(netns, t.family, &t.remote, &t.local))
        && accel_pays(netns, cfg, port);
    if accel && accelerate(ops, netns, t.own_key(netns)) {
        // Its state from the start (sk_msg would make it at the first
        // message), so its close is counted.
        let sk = (*ops).__bindgen_anon_2.sk;
        if !sk.is_null() {
            let mut init = AccelSock {
                inserted: 1,
                ..AccelSock::new(t.peer_key(netns), ACCEL_ON)
            };
            let _ = accel_state(sk, &mut init);
        }
    }
    accel
}

/// A socket closed: drop its fallback mark; an accelerated socket is
/// counted out, an active app↔proxy socket teaches its port how long
/// connections to it live.
#[inline(always)]
pub unsafe fn closed(ops: *mut bpf_sock_ops, netns: u64, t: &SockTuple) {
    // The sockhash drops closed sockets itself (and the kernel the socket's
    // storage); the fallback mark is ours.
    let _ = REDIRECT_ACCEL_FALLBACK.remove(&t.own_key(netns));
    // An accelerated socket is counted out; an active app↔proxy socket
    // teaches its port how long connections to it live.
    let sk = (*ops).__bindgen_anon_2.sk;
    if sk.is_null() {
        return;
    }
    let st = accel_state(sk, core::ptr::null_mut());
    if st.is_null() {
        return;
    }
    if (*st).inserted != 0 {
        // The kernel took it out of the sockhash as it closed.
        count(netns, Reason::AccelRemoved);
        (*st).inserted = 0;
    }
    if (*st).learn_port != 0 {
        let lifetime = aya_ebpf::helpers::generated::bpf_ktime_get_ns().wrapping_sub((*st).born_ns);
        let key = PortKey {
            netns,
            kind: redirect_common::port_kind::ACCEL_SHORT,
            port: (*st).learn_port,
            _pad: 0,
        };
        let old = REDIRECT_ACCEL_PORTS.get(&key).copied().unwrap_or(0);
        let new = redirect_common::accel_short_count_after(old, lifetime);
        if new != old {
            let _ = REDIRECT_ACCEL_PORTS.insert(&key, &new, 0);
        }
        (*st).learn_port = 0;
    }
}

// ------------------------------------------------------------------ sk_msg

/// The counter of a socket state.
#[inline(always)]
fn accel_reason(state: u32) -> u32 {
    match state {
        ACCEL_ON => Reason::AccelRedirected as u32,
        FALLBACK_BULK => Reason::AccelBulk as u32,
        _ => Reason::AccelFallback as u32,
    }
}

/// Acceleration: the bytes an accelerated socket sends go straight to its
/// peer's receive queue, skipping the loopback TCP/IP stack. Falls back to
/// the normal path (for good, for that socket) when the peer is absent or
/// a message is bulk.
#[sk_msg]
pub fn redirect_sk_msg(ctx: SkMsgContext) -> u32 {
    unsafe { sk_msg_redirect(&ctx) }
}

#[inline(always)]
unsafe fn sk_msg_redirect(ctx: &SkMsgContext) -> u32 {
    let m = ctx.msg;
    let sk = (*m).__bindgen_anon_3.sk;
    if sk.is_null() {
        return SK_PASS;
    }
    let mut st = accel_state(sk, core::ptr::null_mut());
    if st.is_null() {
        st = first_message(ctx, sk);
        if st.is_null() {
            return SK_PASS;
        }
    }
    let size = (*m).size;
    let was = (*st).state;
    if was == ACCEL_ON {
        // Bulk: a large message moves the socket to the normal path for
        // good, where TCP flow control holds a writer back (the peer's
        // sockmap queue has none). The receiver reads what was already
        // redirected before it reads the normal path's bytes, so the order
        // is kept.
        if redirect_common::accel_is_bulk(size) {
            leave_accel(st, FALLBACK_BULK);
        } else if REDIRECT_SOCKS.redirect_msg(ctx, (*st).peer, BPF_F_INGRESS as u64)
            != SK_PASS as i64
        {
            leave_accel(st, FALLBACK_PEER_MISSING);
        }
    }
    // A redirect verdict covers the next BUDGET bytes: this program runs
    // again only once they are used up, so the last verdict's rest is
    // counted now, under the reason it was made for, and this message (the
    // part of it the verdict covers) at once. On the normal path the
    // program runs for every message (bulk messages are large, so that
    // costs little) and counts each exactly.
    let now = (*st).state;
    let (covered, rest) = if now == ACCEL_ON {
        redirect_common::accel_verdict_split(size)
    } else {
        (size, 0)
    };
    let netns = (*st).peer.netns;
    if now == was {
        bump(
            netns,
            accel_reason(was),
            1,
            (*st).uncounted as u64 + covered as u64,
        );
    } else {
        if (*st).uncounted != 0 {
            bump(netns, accel_reason(was), 0, (*st).uncounted as u64);
        }
        bump(netns, accel_reason(now), 1, covered as u64);
    }
    (*st).uncounted = rest;
    if now == ACCEL_ON {
        aya_ebpf::helpers::generated::bpf_msg_apply_bytes(m, BUDGET);
    }
    SK_PASS
}

/// The socket goes to the normal path for good (`why`: FALLBACK_*); the
/// pinned mark keeps it there across program versions (whose storage
/// starts empty).
#[inline(always)]
unsafe fn leave_accel(st: *mut AccelSock, why: u32) {
    (*st).state = why;
    let own = (*st).peer.reversed();
    let _ = REDIRECT_ACCEL_FALLBACK.insert(&own, &(why as u8), 0);
}

/// A socket's first message (since this program version): work out its
/// peer's key and whether an earlier version put it on the normal path,
/// and make its storage. Null when the kernel cannot allocate it: the
/// message then takes the normal path and the socket is marked to stay on
/// it, so no later message can overtake this one.
#[inline(always)]
unsafe fn first_message(ctx: &SkMsgContext, sk: *mut bpf_sock) -> *mut AccelSock {
    let m = ctx.msg;
    let netns = netns::of_msg(m);
    let t = msg_tuple(m);
    let state = match REDIRECT_ACCEL_FALLBACK.get(&t.own_key(netns)) {
        Some(&why) => why as u32,
        None => ACCEL_ON,
    };
    let mut init = AccelSock::new(t.peer_key(netns), state);
    let st = accel_state(sk, &mut init);
    if st.is_null() {
        let _ =
            REDIRECT_ACCEL_FALLBACK.insert(&t.own_key(netns), &(FALLBACK_PEER_MISSING as u8), 0);
        bump(netns, Reason::AccelFallback as u32, 1, (*m).size as u64);
    }
    st
}
