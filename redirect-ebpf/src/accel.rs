//! Acceleration (no iptables counterpart: it skips the loopback TCP/IP hop
//! between the app and its proxy). sockops puts established app↔proxy
//! sockets into REDIRECT_SOCKS (the functions below it calls), and the
//! sk_msg program sends each message of such a socket straight to its
//! peer's receive queue. A socket falls back to the normal path for good
//! when its peer is missing or a message is bulk; ports whose connections
//! are short-lived are learned and left out. The decisions and the
//! per-socket state machine are `redirect_common::accel` (host-tested);
//! this file reads the contexts and maps, and applies them.

use aya_ebpf::{
    bindings::{bpf_sock, bpf_sock_ops, sk_msg_md, BPF_ANY, BPF_F_INGRESS},
    macros::sk_msg,
    programs::SkMsgContext,
};
use redirect_common::{
    accel_unstored_message, flags, AccelSock, MsgEffects, PodConfig, PortKey, Reason, SockTuple,
    TupleKey,
};

use crate::{
    abi::SK_PASS,
    addr::msg_tuple,
    counters::{bump, count},
    maps::{accel_storage, PodMaps, REDIRECT_ACCEL_FALLBACK, REDIRECT_ACCEL_PORTS, REDIRECT_SOCKS},
    netns,
};

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
        let mut init = AccelSock::active(
            t.peer_key(netns),
            pays,
            aya_ebpf::helpers::generated::bpf_ktime_get_ns(),
            port,
        );
        st = accel_storage(sk, &mut init);
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
            let mut init = AccelSock::passive(t.peer_key(netns));
            let _ = accel_storage(sk, &mut init);
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
    let st = accel_storage(sk, core::ptr::null_mut());
    if st.is_null() {
        return;
    }
    let close = (*st).on_close(|| aya_ebpf::helpers::generated::bpf_ktime_get_ns());
    if close.removed {
        // The kernel took it out of the sockhash as it closed.
        count(netns, Reason::AccelRemoved);
    }
    if let Some((port, lifetime)) = close.learn {
        let key = PortKey {
            netns,
            kind: redirect_common::port_kind::ACCEL_SHORT,
            port,
            _pad: 0,
        };
        let old = REDIRECT_ACCEL_PORTS.get(&key).copied().unwrap_or(0);
        let new = redirect_common::accel_short_count_after(old, lifetime);
        if new != old {
            let _ = REDIRECT_ACCEL_PORTS.insert(&key, &new, 0);
        }
    }
}

// ------------------------------------------------------------------ sk_msg

/// Acceleration: the bytes an accelerated socket sends go straight to its
/// peer's receive queue, skipping the loopback TCP/IP stack. Falls back to
/// the normal path (for good, for that socket) when the peer is absent or
/// a message is bulk. The state machine is `AccelSock::on_message`.
#[sk_msg]
pub fn redirect_sk_msg(ctx: SkMsgContext) -> u32 {
    unsafe { sk_msg_redirect::<false>(&ctx) }
}

/// The same for kernels without `bpf_get_netns_cookie` in sk_msg (before
/// 5.15): the netns cookie comes from the socket's storage (`netns.rs`).
#[sk_msg]
pub fn redirect_sk_msg_stored(ctx: SkMsgContext) -> u32 {
    unsafe { sk_msg_redirect::<true>(&ctx) }
}

#[inline(always)]
unsafe fn sk_msg_redirect<const STORED: bool>(ctx: &SkMsgContext) -> u32 {
    let m = ctx.msg;
    let sk = (*m).__bindgen_anon_3.sk;
    if sk.is_null() {
        return SK_PASS;
    }
    let mut fx = MsgKernel { ctx };
    let mut st = accel_storage(sk, core::ptr::null_mut());
    if st.is_null() {
        st = first_message::<STORED>(m, sk, &mut fx);
        if st.is_null() {
            return SK_PASS;
        }
    }
    (*st).on_message((*m).size, &mut fx);
    SK_PASS
}

/// The effects of a verdict, on this message and the maps.
struct MsgKernel<'a> {
    ctx: &'a SkMsgContext,
}

impl MsgEffects for MsgKernel<'_> {
    #[inline(always)]
    fn redirect(&mut self, peer: &TupleKey) -> bool {
        REDIRECT_SOCKS.redirect_msg(self.ctx, *peer, BPF_F_INGRESS as u64) == SK_PASS as i64
    }

    #[inline(always)]
    fn mark_fallback(&mut self, own: &TupleKey, why: u32) {
        let _ = REDIRECT_ACCEL_FALLBACK.insert(own, &(why as u8), 0);
    }

    #[inline(always)]
    fn count(&mut self, netns: u64, reason: Reason, conns: u64, bytes: u64) {
        bump(netns, reason as u32, conns, bytes);
    }

    #[inline(always)]
    fn apply_bytes(&mut self, bytes: u32) {
        unsafe { aya_ebpf::helpers::generated::bpf_msg_apply_bytes(self.ctx.msg, bytes) };
    }
}

/// A socket's first message (since this program version): work out its
/// peer's key and whether an earlier version put it on the normal path,
/// and make its storage. Null when the kernel cannot allocate it (the
/// message then takes the normal path, `accel_unstored_message`).
#[inline(always)]
unsafe fn first_message<const STORED: bool>(
    m: *mut sk_msg_md,
    sk: *mut bpf_sock,
    fx: &mut MsgKernel,
) -> *mut AccelSock {
    let netns = netns::of_msg::<STORED>(m);
    let t = msg_tuple(m);
    let own = t.own_key(netns);
    let mark = REDIRECT_ACCEL_FALLBACK.get(&own).copied();
    let mut init = AccelSock::first_message(t.peer_key(netns), mark);
    let st = accel_storage(sk, &mut init);
    if st.is_null() {
        accel_unstored_message(&own, (*m).size, fx);
    }
    st
}
