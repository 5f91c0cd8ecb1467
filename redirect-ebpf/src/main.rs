//! Kernel programs of the redirector. Each is a thin shell: read the
//! context, call the shared decision in `redirect-common`, apply, count.
#![no_std]
#![no_main]

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{bpf_sock, bpf_sock_ops, BPF_ANY, BPF_F_INGRESS},
    helpers::{
        bpf_get_current_uid_gid, bpf_get_netns_cookie, bpf_get_socket_cookie,
        bpf_sock_ops_cb_flags_set,
    },
    macros::{cgroup_sock, cgroup_sock_addr, cgroup_sockopt, map, sk_lookup, sk_msg, sock_ops},
    maps::{lpm_trie::Key, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap, SockHash},
    programs::{
        SkLookupContext, SkMsgContext, SockAddrContext, SockContext, SockOpsContext, SockoptContext,
    },
};
use redirect_common::{
    flags, inbound_verdict, outbound_verdict, CidrKeyData, CounterKey, CounterValue, ListenerKey,
    Lookup, OrigDst, Outbound, PodConfig, PortKey, Reason, TupleKey, Verdict, AF_INET, AF_INET6,
    CIDR_KEY_FIXED_BITS, IPPROTO_TCP, MAX_ACCEL_PORTS, MAX_CIDRS, MAX_COUNTERS, MAX_LISTENERS,
    MAX_PODS, MAX_PORTS, MAX_TRACKED_SOCKETS, SOL_IP, SOL_IPV6, SO_ORIGINAL_DST,
};

#[map]
static REDIRECT_PODS: HashMap<u64, PodConfig> = HashMap::pinned(MAX_PODS, 0);
#[map]
static REDIRECT_CIDRS: LpmTrie<CidrKeyData, u8> = LpmTrie::pinned(MAX_CIDRS, 0);
#[map]
static REDIRECT_PORTS: HashMap<PortKey, u8> = HashMap::pinned(MAX_PORTS, 0);
#[map]
static REDIRECT_COUNTERS: PerCpuHashMap<CounterKey, CounterValue> =
    PerCpuHashMap::pinned(MAX_COUNTERS, 0);
/// Counter updates lost because REDIRECT_COUNTERS was full (the slot of a
/// pod and reason did not exist yet and could not be made). One slot.
#[map]
static REDIRECT_COUNTERS_LOST: PerCpuArray<u64> = PerCpuArray::pinned(1, 0);
/// Original destination of a redirected app socket, by socket cookie
/// (getpeername, and the hand-over to the tuple map when established).
/// A plain hash, not LRU: when it is full the insert fails and connect4
/// refuses the connection (counted), where an LRU map would silently
/// evict the record of a live connection.
#[map]
static REDIRECT_ORIG_BY_COOKIE: HashMap<u64, OrigDst> = HashMap::pinned(MAX_TRACKED_SOCKETS, 0);
/// Original destination by the app socket's 4-tuple: what the proxy's
/// accepted socket asks for with SO_ORIGINAL_DST. A plain hash for the
/// same reason (a failed insert is counted; the proxy then gets no answer
/// and refuses the connection).
#[map]
static REDIRECT_ORIG_BY_TUPLE: HashMap<TupleKey, OrigDst> = HashMap::pinned(MAX_TRACKED_SOCKETS, 0);
/// Accelerated app↔proxy sockets, keyed by their own 4-tuple (local →
/// remote) and netns cookie; the sk_msg program redirects to the peer.
#[map]
static REDIRECT_SOCKS: SockHash<TupleKey> = SockHash::pinned(MAX_TRACKED_SOCKETS, 0);
/// Sockets whose data once took the normal path (peer not in the sockhash
/// yet): they stay on it, so bytes can never overtake each other.
#[map]
static REDIRECT_ACCEL_FALLBACK: HashMap<TupleKey, u8> = HashMap::pinned(MAX_TRACKED_SOCKETS, 0);
/// Per pod and destination port: how many of its latest connections in a
/// row lived less than ACCEL_SHORT_CONN_NS (acceleration skips the port
/// from ACCEL_SHORT_SKIP_AFTER on). Soft state, hence LRU.
#[map]
static REDIRECT_ACCEL_PORTS: LruHashMap<PortKey, u32> = LruHashMap::pinned(MAX_ACCEL_PORTS, 0);
/// The proxy's listener on the inbound capture port, per netns and family.
#[map]
static REDIRECT_LISTENERS: SockHash<ListenerKey> = SockHash::pinned(MAX_LISTENERS, 0);

/// The pod netns an sk_lookup instance serves: sk_lookup programs cannot
/// call bpf_get_netns_cookie, so each pod's instance is loaded with its
/// cookie set here (userspace `set_global`).
#[unsafe(no_mangle)]
static REDIRECT_SK_LOOKUP_NETNS: u64 = 0;

const SK_PASS: u32 = 1;
const SK_DROP: u32 = 0;
const LOOPBACK_IFINDEX: u32 = 1;
const TCP_CLOSE: u32 = 7;
const BPF_SOCK_OPS_TCP_CONNECT_CB: u32 = 3;
const BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB: u32 = 4;
const BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB: u32 = 5;
const BPF_SOCK_OPS_STATE_CB: u32 = 10;
const BPF_SOCK_OPS_TCP_LISTEN_CB: u32 = 11;
const BPF_SOCK_OPS_STATE_CB_FLAG: i32 = 4;

/// Add to a per-CPU counter (no atomics needed), creating it on first use.
#[inline(always)]
fn bump(netns: u64, reason: u32, conns: u64, bytes: u64) {
    let key = CounterKey {
        netns,
        reason,
        _pad: 0,
    };
    match REDIRECT_COUNTERS.get_ptr_mut(&key) {
        Some(v) => unsafe {
            (*v).count += conns;
            (*v).bytes += bytes;
        },
        None => {
            if REDIRECT_COUNTERS
                .insert(
                    &key,
                    &CounterValue {
                        count: conns,
                        bytes,
                    },
                    0,
                )
                .is_err()
            {
                if let Some(lost) = REDIRECT_COUNTERS_LOST.get_ptr_mut(0) {
                    unsafe { *lost += 1 };
                }
            }
        }
    }
}

/// Count one connection (or call) under `reason`.
#[inline(always)]
fn count(netns: u64, reason: Reason) {
    bump(netns, reason as u32, 1, 0);
}

/// Add bytes to a counter (by raw reason code) without counting a
/// connection.
#[inline(always)]
fn add_bytes(netns: u64, reason: u32, bytes: u64) {
    bump(netns, reason, 0, bytes);
}

struct Maps {
    netns: u64,
}

impl Lookup for Maps {
    #[inline(always)]
    fn port_listed(&self, kind: u16, port: u16) -> bool {
        let key = PortKey {
            netns: self.netns,
            kind,
            port,
            _pad: 0,
        };
        unsafe { REDIRECT_PORTS.get(&key).is_some() }
    }

    #[inline(always)]
    fn cidr_contains(&self, kind: u32, addr: &[u8; 16]) -> bool {
        let key = Key::new(
            CIDR_KEY_FIXED_BITS + 128,
            CidrKeyData::new(self.netns, kind, *addr),
        );
        REDIRECT_CIDRS.get(&key).is_some()
    }
}

#[inline(always)]
fn ip6_bytes(w: [u32; 4]) -> [u8; 16] {
    let mut b = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let x = w[i].to_ne_bytes();
        b[i * 4] = x[0];
        b[i * 4 + 1] = x[1];
        b[i * 4 + 2] = x[2];
        b[i * 4 + 3] = x[3];
        i += 1;
    }
    b
}

#[inline(always)]
fn ip4_bytes(w: u32) -> [u8; 16] {
    let x = w.to_ne_bytes();
    let mut b = [0u8; 16];
    b[0] = x[0];
    b[1] = x[1];
    b[2] = x[2];
    b[3] = x[3];
    b
}

#[inline(always)]
fn words(b: &[u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
        u32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
        u32::from_ne_bytes([b[8], b[9], b[10], b[11]]),
        u32::from_ne_bytes([b[12], b[13], b[14], b[15]]),
    ]
}

/// `::ffff:a.b.c.d` → Some(a.b.c.d in the first 4 bytes).
#[inline(always)]
fn v4_mapped(b: &[u8; 16]) -> Option<[u8; 16]> {
    let mut i = 0;
    while i < 10 {
        if b[i] != 0 {
            return None;
        }
        i += 1;
    }
    if b[10] != 0xff || b[11] != 0xff {
        return None;
    }
    let mut v4 = [0u8; 16];
    v4[0] = b[12];
    v4[1] = b[13];
    v4[2] = b[14];
    v4[3] = b[15];
    Some(v4)
}

#[inline(always)]
fn mapped(v4: &[u8; 16]) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[10] = 0xff;
    b[11] = 0xff;
    b[12] = v4[0];
    b[13] = v4[1];
    b[14] = v4[2];
    b[15] = v4[3];
    b
}

/// Write an IPv6 address into a sock_addr context (32-bit stores only).
#[inline(always)]
unsafe fn set_user_ip6(sa: *mut aya_ebpf::bindings::bpf_sock_addr, addr: &[u8; 16]) {
    let w = words(addr);
    (*sa).user_ip6[0] = w[0];
    (*sa).user_ip6[1] = w[1];
    (*sa).user_ip6[2] = w[2];
    (*sa).user_ip6[3] = w[3];
}

// ---------------------------------------------------------------- connect

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
    let netns = bpf_get_netns_cookie(sa as *mut c_void);
    let Some(cfg) = REDIRECT_PODS.get(&netns) else {
        return CONNECT_PROCEED;
    };
    if (*sa).protocol != IPPROTO_TCP {
        count(netns, Reason::OutNotTcp);
        return CONNECT_PROCEED;
    }
    let sk: *mut bpf_sock = (*sa).__bindgen_anon_1.sk;
    let (mut family, mut dst, mut src) = if v6 {
        (
            AF_INET6,
            ip6_bytes((*sa).user_ip6),
            ip6_bytes((*sk).src_ip6),
        )
    } else {
        (AF_INET, ip4_bytes((*sa).user_ip4), ip4_bytes((*sk).src_ip4))
    };
    // A dual-stack socket dialing ::ffff:a.b.c.d makes an IPv4 connection:
    // iptables sees IPv4, so decide (and answer SO_ORIGINAL_DST) as IPv4.
    let mut v4_in_v6 = false;
    if v6 {
        if let Some(d) = v4_mapped(&dst) {
            family = AF_INET;
            dst = d;
            src = v4_mapped(&src).unwrap_or([0; 16]);
            v4_in_v6 = true;
        }
    }
    let dport = u16::from_be((*sa).user_port as u16);
    let ids = bpf_get_current_uid_gid();
    let conn = Outbound {
        family,
        dst,
        dport,
        src,
        uid: ids as u32,
        gid: (ids >> 32) as u32,
    };
    let verdict = outbound_verdict(cfg, &conn, &Maps { netns });
    count(netns, verdict.reason());
    let port = match verdict {
        Verdict::Untouched(_) => return CONNECT_PROCEED,
        Verdict::ToOutbound(_) => cfg.proxy_port,
        Verdict::ToInbound(_) => cfg.inbound_port,
    };
    let orig = OrigDst {
        addr: dst,
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
    (*sa).user_port = (port.to_be()) as u32;
    if !v6 {
        (*sa).user_ip4 = u32::from_ne_bytes([127, 0, 0, 1]);
    } else {
        let target = if v4_in_v6 {
            let mut lo = [0u8; 16];
            lo[0] = 127;
            lo[3] = 1;
            mapped(&lo)
        } else {
            redirect_common::V6_LOCALHOST
        };
        set_user_ip6(sa, &target);
    }
    CONNECT_PROCEED
}

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
#[inline(always)]
unsafe fn getpeername(ctx: &SockAddrContext, v6: bool) {
    let sa = ctx.sock_addr;
    let cookie = bpf_get_socket_cookie(sa as *mut c_void);
    let Some(orig) = REDIRECT_ORIG_BY_COOKIE.get(&cookie) else {
        return;
    };
    let netns = bpf_get_netns_cookie(sa as *mut c_void);
    if !v6 {
        if orig.family != AF_INET {
            return;
        }
        (*sa).user_ip4 =
            u32::from_ne_bytes([orig.addr[0], orig.addr[1], orig.addr[2], orig.addr[3]]);
    } else {
        let addr = if orig.family == AF_INET {
            mapped(&orig.addr)
        } else {
            orig.addr
        };
        set_user_ip6(sa, &addr);
    }
    (*sa).user_port = (orig.port.to_be()) as u32;
    count(netns, Reason::PeerNameRewritten);
}

// ---------------------------------------------------------------- sockops

#[sock_ops]
pub fn redirect_sockops(ctx: SockOpsContext) -> u32 {
    unsafe {
        match ctx.op() {
            BPF_SOCK_OPS_TCP_CONNECT_CB => connecting(&ctx),
            BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => active_established(&ctx),
            BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => passive_established(&ctx),
            BPF_SOCK_OPS_TCP_LISTEN_CB => listening(&ctx),
            BPF_SOCK_OPS_STATE_CB => {
                if ctx.arg(1) == TCP_CLOSE {
                    closed(&ctx);
                }
            }
            _ => {}
        }
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

/// The socket's 4-tuple as (local, remote, local port, remote port), with
/// v4-mapped v6 addresses folded to v4 (matching the connect hook).
#[inline(always)]
unsafe fn ops_tuple(ops: *mut bpf_sock_ops) -> (u16, [u8; 16], [u8; 16], u16, u16) {
    let lport = (*ops).local_port as u16;
    let rport = u16::from_be(((*ops).remote_port >> 16) as u16);
    if (*ops).family == AF_INET as u32 {
        return (
            AF_INET,
            ip4_bytes((*ops).local_ip4),
            ip4_bytes((*ops).remote_ip4),
            lport,
            rport,
        );
    }
    let l = ip6_bytes((*ops).local_ip6);
    let r = ip6_bytes((*ops).remote_ip6);
    match (v4_mapped(&l), v4_mapped(&r)) {
        (Some(l4), Some(r4)) => (AF_INET, l4, r4, lport, rport),
        _ => (AF_INET6, l, r, lport, rport),
    }
}

/// The socket's own key in the sockhash (local → remote).
#[inline(always)]
fn own_key(netns: u64, t: &(u16, [u8; 16], [u8; 16], u16, u16)) -> TupleKey {
    TupleKey {
        netns,
        src: t.1,
        dst: t.2,
        sport: t.3,
        dport: t.4,
        family: t.0,
        _pad: 0,
    }
}

/// The peer's key: the same connection seen from the other end.
#[inline(always)]
fn peer_key(netns: u64, t: &(u16, [u8; 16], [u8; 16], u16, u16)) -> TupleKey {
    TupleKey {
        netns,
        src: t.2,
        dst: t.1,
        sport: t.4,
        dport: t.3,
        family: t.0,
        _pad: 0,
    }
}

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
unsafe fn accelerate_active(
    ops: *mut bpf_sock_ops,
    netns: u64,
    cfg: &PodConfig,
    t: &(u16, [u8; 16], [u8; 16], u16, u16),
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
                peer_key(netns, t),
                if pays { ACCEL_ON } else { ACCEL_SKIPPED },
            )
        };
        st = accel_state(sk, &mut init);
    }
    if !pays {
        count(netns, Reason::AccelSkippedShort);
    } else if accelerate(ops, netns, own_key(netns, t)) && !st.is_null() {
        (*st).inserted = 1;
    }
}

/// Is this loopback connection the proxy's inbound passthrough to the app
/// (one end bound to 127.0.0.6 / ::6, the other an address of the pod)?
#[inline(always)]
fn is_passthrough_pair(netns: u64, family: u16, from: &[u8; 16], to: &[u8; 16]) -> bool {
    redirect_common::is_passthrough_source(family, from)
        && redirect_common::is_local(family, to, &Maps { netns })
}

/// Active side established. For an app socket we redirected: publish its
/// original destination under the 4-tuple the proxy's accepted socket will
/// see. App sockets to the proxy and the proxy's passthrough sockets to the
/// app are accelerated when the pod wants it.
#[inline(always)]
unsafe fn active_established(ctx: &SockOpsContext) {
    let ops = ctx.ops;
    let netns = bpf_get_netns_cookie(ops as *mut c_void);
    let Some(cfg) = REDIRECT_PODS.get(&netns) else {
        return;
    };
    let t = ops_tuple(ops);
    let cookie = bpf_get_socket_cookie(ops as *mut c_void);
    let accel = cfg.has(flags::ACCEL);
    match REDIRECT_ORIG_BY_COOKIE.get(&cookie) {
        Some(orig) => {
            if REDIRECT_ORIG_BY_TUPLE
                .insert(&own_key(netns, &t), orig, BPF_ANY as u64)
                .is_err()
            {
                count(netns, Reason::ErrTupleMapFull);
            }
            if accel {
                accelerate_active(ops, netns, &cfg, &t, orig.port);
            }
        }
        None => {
            if !(accel && is_passthrough_pair(netns, t.0, &t.1, &t.2)) {
                return;
            }
            // The proxy's passthrough to the app: the app's port.
            accelerate_active(ops, netns, &cfg, &t, t.4);
        }
    }
    // Clean up (cookie entry, fallback mark) when the socket closes.
    let _ = bpf_sock_ops_cb_flags_set(ops, BPF_SOCK_OPS_STATE_CB_FLAG);
}

/// Passive side established: the proxy accepted a connection we
/// redirected (its close removes the tuple entry), or the app accepted the
/// proxy's passthrough connection. Accelerated when the pod wants it.
#[inline(always)]
unsafe fn passive_established(ctx: &SockOpsContext) {
    let ops = ctx.ops;
    let netns = bpf_get_netns_cookie(ops as *mut c_void);
    let Some(cfg) = REDIRECT_PODS.get(&netns) else {
        return;
    };
    let t = ops_tuple(ops);
    let orig_port = REDIRECT_ORIG_BY_TUPLE
        .get(&peer_key(netns, &t))
        .map(|o| o.port);
    let redirected = orig_port.is_some();
    // The same port as the active side decided on: the original
    // destination's, or for the passthrough the app's (this side's own).
    let port = orig_port.unwrap_or(t.3);
    let accel = cfg.has(flags::ACCEL)
        && (redirected || is_passthrough_pair(netns, t.0, &t.2, &t.1))
        && accel_pays(netns, cfg, port);
    if accel && accelerate(ops, netns, own_key(netns, &t)) {
        // Its state from the start (sk_msg would make it at the first
        // message), so its close is counted.
        let sk = (*ops).__bindgen_anon_2.sk;
        if !sk.is_null() {
            let mut init = AccelSock {
                inserted: 1,
                ..AccelSock::new(peer_key(netns, &t), ACCEL_ON)
            };
            let _ = accel_state(sk, &mut init);
        }
    }
    if redirected || accel {
        let _ = bpf_sock_ops_cb_flags_set(ops, BPF_SOCK_OPS_STATE_CB_FLAG);
    }
}

#[inline(always)]
unsafe fn closed(ctx: &SockOpsContext) {
    let ops = ctx.ops;
    let netns = bpf_get_netns_cookie(ops as *mut c_void);
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
    let _ = REDIRECT_ORIG_BY_TUPLE.remove(&peer_key(netns, &t));
    // The sockhash drops closed sockets itself (and the kernel the socket's
    // storage); the fallback mark is ours.
    let _ = REDIRECT_ACCEL_FALLBACK.remove(&own_key(netns, &t));
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

/// A socket is released (its last fd closed). A redirected app socket
/// whose connect never got as far as the SYN (failed with
/// EADDRNOTAVAIL on local port exhaustion, say) is still in TCP_CLOSE
/// here and never reaches sockops: drop its original-destination record,
/// which nothing else would. Any other socket keeps its record until its
/// state callback (its bytes are counted there).
#[cgroup_sock(sock_release)]
pub fn redirect_sock_release(ctx: SockContext) -> i32 {
    unsafe {
        let sk = ctx.sock;
        if (*sk).protocol == IPPROTO_TCP && (*sk).state == TCP_CLOSE {
            let cookie = bpf_get_socket_cookie(sk as *mut c_void);
            let _ = REDIRECT_ORIG_BY_COOKIE.remove(&cookie);
        }
    }
    1
}

/// A socket starts listening: if it is the pod's inbound capture port,
/// it becomes the target of inbound steering (restarts follow at once).
#[inline(always)]
unsafe fn listening(ctx: &SockOpsContext) {
    let ops = ctx.ops;
    let netns = bpf_get_netns_cookie(ops as *mut c_void);
    let Some(cfg) = REDIRECT_PODS.get(&netns) else {
        return;
    };
    if (*ops).local_port != cfg.inbound_port as u32 {
        return;
    }
    let mut key = ListenerKey {
        netns,
        family: (*ops).family,
        _pad: 0,
    };
    match REDIRECT_LISTENERS.update(&mut key, &mut *ops, BPF_ANY as u64) {
        Ok(()) => count(netns, Reason::InListenerRegistered),
        Err(_) => count(netns, Reason::ErrListenerMapFull),
    }
}

// ------------------------------------------------------------- getsockopt

#[cgroup_sockopt(getsockopt)]
pub fn redirect_getsockopt(ctx: SockoptContext) -> i32 {
    unsafe { getsockopt(&ctx) };
    1
}

/// Answer SO_ORIGINAL_DST / IP6T_SO_ORIGINAL_DST the way conntrack would.
#[inline(always)]
unsafe fn getsockopt(ctx: &SockoptContext) {
    let so = ctx.sockopt;
    if (*so).optname != SO_ORIGINAL_DST {
        return;
    }
    let level = (*so).level;
    if level != SOL_IP && level != SOL_IPV6 {
        return;
    }
    let netns = bpf_get_netns_cookie(so as *mut c_void);
    if REDIRECT_PODS.get(&netns).is_none() {
        return;
    }
    let sk: *mut bpf_sock = (*so).__bindgen_anon_1.sk;
    if sk.is_null() {
        return;
    }
    let lport = (*sk).src_port as u16;
    let rport = u16::from_be((*sk).dst_port);
    let (mut family, mut local, mut remote) = if (*sk).family == AF_INET as u32 {
        (AF_INET, ip4_bytes((*sk).src_ip4), ip4_bytes((*sk).dst_ip4))
    } else {
        (AF_INET6, ip6_bytes((*sk).src_ip6), ip6_bytes((*sk).dst_ip6))
    };
    if family == AF_INET6 {
        if let (Some(l), Some(r)) = (v4_mapped(&local), v4_mapped(&remote)) {
            family = AF_INET;
            local = l;
            remote = r;
        }
    }
    // Only the connection's own family's level can be answered (as with
    // conntrack): a proxy trying the other one too is no miss. Left alone.
    if level != redirect_common::orig_dst_level(family) {
        return;
    }
    let key = TupleKey {
        netns,
        src: remote,
        dst: local,
        sport: rport,
        dport: lport,
        family,
        _pad: 0,
    };
    let (orig, reason) = match REDIRECT_ORIG_BY_TUPLE.get(&key) {
        Some(o) => (*o, Reason::OrigDstOutbound),
        None => {
            // Inbound steering keeps the original local address on the
            // accepted socket: that is the original destination.
            let loopback = if family == AF_INET {
                local[0] == 127
            } else {
                local == redirect_common::V6_LOCALHOST
            };
            if loopback {
                count(netns, Reason::OrigDstMissing);
                return;
            }
            (
                OrigDst {
                    addr: local,
                    port: lport,
                    family,
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
        return;
    }
    let optval = (*so).__bindgen_anon_2.optval as *mut u8;
    let end = (*so).__bindgen_anon_3.optval_end as *mut u8;
    let port = orig.port.to_be_bytes();
    if orig.family == AF_INET {
        if optval.add(16) > end || (*so).optlen < 16 {
            return;
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
            return;
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
}

// -------------------------------------------------------------- sk_lookup

/// PREROUTING → ISTIO_INBOUND: attached to each pod netns. Connections
/// from outside the pod to a captured port go to the proxy's listener on
/// the inbound capture port, keeping their original local address.
#[sk_lookup]
pub fn redirect_sk_lookup(ctx: SkLookupContext) -> u32 {
    unsafe { sk_lookup_inbound(&ctx) }
}

#[inline(always)]
unsafe fn sk_lookup_inbound(ctx: &SkLookupContext) -> u32 {
    let l = ctx.lookup;
    if (*l).protocol != IPPROTO_TCP || (*l).ingress_ifindex == LOOPBACK_IFINDEX {
        return SK_PASS;
    }
    let netns = core::ptr::read_volatile(&REDIRECT_SK_LOOKUP_NETNS);
    let Some(cfg) = REDIRECT_PODS.get(&netns) else {
        return SK_PASS;
    };
    // PREROUTING only sees packets from outside the netns. Local traffic
    // to the pod's own IP arrives with that IP's device as ingress, so
    // tell it apart by its source: an address of this netns.
    let family = (*l).family;
    let src = if family == AF_INET as u32 {
        ip4_bytes((*l).remote_ip4)
    } else {
        ip6_bytes((*l).remote_ip6)
    };
    let maps = Maps { netns };
    let fam = if family == AF_INET as u32 {
        AF_INET
    } else {
        AF_INET6
    };
    if redirect_common::is_local(fam, &src, &maps) {
        return SK_PASS;
    }
    let dport = (*l).local_port as u16;
    let verdict = inbound_verdict(cfg, dport, &maps);
    if let Verdict::Untouched(r) = verdict {
        count(netns, r);
        return SK_PASS;
    }
    let key = ListenerKey {
        netns,
        family,
        _pad: 0,
    };
    if REDIRECT_LISTENERS.redirect_sk_lookup(ctx, key, 0).is_ok() {
        count(netns, Reason::InCaptured);
        return SK_PASS;
    }
    if family == AF_INET as u32 {
        // A dual-stack [::]:port listener also serves IPv4.
        let key6 = ListenerKey {
            netns,
            family: AF_INET6 as u32,
            _pad: 0,
        };
        if REDIRECT_LISTENERS.redirect_sk_lookup(ctx, key6, 0).is_ok() {
            count(netns, Reason::InCaptured);
            return SK_PASS;
        }
    }
    // As iptables REDIRECT with nothing on the inbound port: refused.
    count(netns, Reason::InNoListener);
    SK_DROP
}

// ------------------------------------------------------------------ sk_msg

/// Per-socket acceleration state (socket-local storage): the peer's key,
/// where this socket's bytes go, and how much of the last verdict's budget
/// is not counted yet. Made by sockops in the handshake (by the first
/// message for a socket an earlier version inserted), so a verdict costs
/// one storage lookup and the redirect, with no key to rebuild and no hash
/// lookup of our own. The kernel frees it with the socket.
#[repr(C)]
pub struct AccelSock {
    /// The peer's sockhash key (carries the netns cookie).
    peer: TupleKey,
    /// ACCEL_ON, or the FALLBACK_* reason this socket is on the normal path.
    state: u32,
    /// Bytes of the last verdict's budget beyond the message it was made
    /// for: counted when the next verdict shows the budget was used up.
    uncounted: u32,
    /// Active side only (0 otherwise): when the connection was
    /// established and the port its lifetime is learned for.
    born_ns: u64,
    learn_port: u16,
    /// 1 while the socket is in REDIRECT_SOCKS (inserted by this version):
    /// its close is counted as a removal.
    inserted: u16,
    _pad: [u16; 2],
}

impl AccelSock {
    /// State for a socket sending to `peer`: nothing counted, not timed,
    /// not marked as inserted.
    #[inline(always)]
    fn new(peer: TupleKey, state: u32) -> Self {
        AccelSock {
            peer,
            state,
            uncounted: 0,
            born_ns: 0,
            learn_port: 0,
            inserted: 0,
            _pad: [0; 2],
        }
    }
}

/// A BTF map definition (`.maps`): socket-local storage needs BTF for its
/// value type. Pinned by name like the other maps, so every program and
/// every version of them sees the same state.
#[repr(C)]
pub struct SkStorageDef {
    r#type: *const [i32; aya_ebpf::bindings::bpf_map_type::BPF_MAP_TYPE_SK_STORAGE as usize],
    key: *const i32,
    value: *const AccelSock,
    max_entries: *const [i32; 0],
    map_flags: *const [i32; aya_ebpf::bindings::BPF_F_NO_PREALLOC as usize],
    /// LIBBPF_PIN_BY_NAME.
    pinning: *const [i32; 1],
}
// SAFETY: placeholder pointers the loader reads from BTF; never dereferenced.
unsafe impl Sync for SkStorageDef {}

#[unsafe(link_section = ".maps")]
#[unsafe(export_name = "REDIRECT_ACCEL_SK")]
static REDIRECT_ACCEL_SK: SkStorageDef = SkStorageDef {
    r#type: core::ptr::null(),
    key: core::ptr::null(),
    value: core::ptr::null(),
    max_entries: core::ptr::null(),
    map_flags: core::ptr::null(),
    pinning: core::ptr::null(),
};

/// `bpf_sk_storage_get` on REDIRECT_ACCEL_SK (with `init`: create it from
/// `init` when absent).
#[inline(always)]
unsafe fn accel_state(sk: *mut bpf_sock, init: *mut AccelSock) -> *mut AccelSock {
    let flags = if init.is_null() {
        0
    } else {
        aya_ebpf::bindings::BPF_SK_STORAGE_GET_F_CREATE as u64
    };
    aya_ebpf::helpers::generated::bpf_sk_storage_get(
        &REDIRECT_ACCEL_SK as *const SkStorageDef as *mut c_void,
        sk as *mut c_void,
        init as *mut c_void,
        flags,
    ) as *mut AccelSock
}

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
    let own = TupleKey {
        netns: (*st).peer.netns,
        src: (*st).peer.dst,
        dst: (*st).peer.src,
        sport: (*st).peer.dport,
        dport: (*st).peer.sport,
        family: (*st).peer.family,
        _pad: 0,
    };
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
    let netns = bpf_get_netns_cookie(m as *mut c_void);
    let lport = (*m).local_port as u16;
    let rport = u16::from_be(((*m).remote_port >> 16) as u16);
    let t = if (*m).family == AF_INET as u32 {
        (
            AF_INET,
            ip4_bytes((*m).local_ip4),
            ip4_bytes((*m).remote_ip4),
            lport,
            rport,
        )
    } else {
        let l = ip6_bytes((*m).local_ip6);
        let r = ip6_bytes((*m).remote_ip6);
        match (v4_mapped(&l), v4_mapped(&r)) {
            (Some(l4), Some(r4)) => (AF_INET, l4, r4, lport, rport),
            _ => (AF_INET6, l, r, lport, rport),
        }
    };
    let state = match REDIRECT_ACCEL_FALLBACK.get(&own_key(netns, &t)) {
        Some(&why) => why as u32,
        None => ACCEL_ON,
    };
    let mut init = AccelSock::new(peer_key(netns, &t), state);
    let st = accel_state(sk, &mut init);
    if st.is_null() {
        let _ =
            REDIRECT_ACCEL_FALLBACK.insert(&own_key(netns, &t), &(FALLBACK_PEER_MISSING as u8), 0);
        bump(netns, Reason::AccelFallback as u32, 1, (*m).size as u64);
    }
    st
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
