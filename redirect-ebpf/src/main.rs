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
    macros::{cgroup_sock_addr, cgroup_sockopt, map, sk_lookup, sk_msg, sock_ops},
    maps::{lpm_trie::Key, HashMap, LpmTrie, PerCpuHashMap, SockHash},
    programs::{SkLookupContext, SkMsgContext, SockAddrContext, SockOpsContext, SockoptContext},
};
use redirect_common::{
    flags, inbound_verdict, outbound_verdict, CidrKeyData, CounterKey, CounterValue, ListenerKey,
    Lookup, OrigDst, Outbound, PodConfig, PortKey, Reason, TupleKey, Verdict, AF_INET, AF_INET6,
    CIDR_KEY_FIXED_BITS, IPPROTO_TCP, MAX_CIDRS, MAX_COUNTERS, MAX_LISTENERS, MAX_PODS,
    MAX_PORTS, MAX_TRACKED_SOCKETS, SOL_IP, SOL_IPV6, SO_ORIGINAL_DST,
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
/// Original destination of a redirected app socket, by socket cookie
/// (getpeername, and the hand-over to the tuple map when established).
/// A plain hash, not LRU: when it is full the insert fails and connect4
/// refuses the connection (counted), where an LRU map would silently
/// evict the record of a live connection.
#[map]
static REDIRECT_ORIG_BY_COOKIE: HashMap<u64, OrigDst> =
    HashMap::pinned(MAX_TRACKED_SOCKETS, 0);
/// Original destination by the app socket's 4-tuple: what the proxy's
/// accepted socket asks for with SO_ORIGINAL_DST. A plain hash for the
/// same reason (a failed insert is counted; the proxy then gets no answer
/// and refuses the connection).
#[map]
static REDIRECT_ORIG_BY_TUPLE: HashMap<TupleKey, OrigDst> =
    HashMap::pinned(MAX_TRACKED_SOCKETS, 0);
/// Accelerated app↔proxy sockets, keyed by their own 4-tuple (local →
/// remote) and netns cookie; the sk_msg program redirects to the peer.
#[map]
static REDIRECT_SOCKS: SockHash<TupleKey> = SockHash::pinned(MAX_TRACKED_SOCKETS, 0);
/// Sockets whose data once took the normal path (peer not in the sockhash
/// yet): they stay on it, so bytes can never overtake each other.
#[map]
static REDIRECT_ACCEL_FALLBACK: HashMap<TupleKey, u8> = HashMap::pinned(MAX_TRACKED_SOCKETS, 0);
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
            let _ = REDIRECT_COUNTERS.insert(&key, &CounterValue { count: conns, bytes }, 0);
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
        (*sa).user_ip4 = u32::from_ne_bytes([orig.addr[0], orig.addr[1], orig.addr[2], orig.addr[3]]);
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
unsafe fn accelerate(ops: *mut bpf_sock_ops, netns: u64, key: TupleKey) {
    let mut key = key;
    match REDIRECT_SOCKS.update(&mut key, &mut *ops, BPF_ANY as u64) {
        Ok(()) => count(netns, Reason::AccelInserted),
        Err(_) => count(netns, Reason::ErrSockMapFull),
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
            if REDIRECT_ORIG_BY_TUPLE.insert(&own_key(netns, &t), orig, BPF_ANY as u64).is_err() {
                count(netns, Reason::ErrTupleMapFull);
            }
            if accel {
                accelerate(ops, netns, own_key(netns, &t));
            }
        }
        None => {
            if !(accel && is_passthrough_pair(netns, t.0, &t.1, &t.2)) {
                return;
            }
            accelerate(ops, netns, own_key(netns, &t));
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
    let redirected = REDIRECT_ORIG_BY_TUPLE.get(&peer_key(netns, &t)).is_some();
    let accel = cfg.has(flags::ACCEL) && (redirected || is_passthrough_pair(netns, t.0, &t.2, &t.1));
    if accel {
        accelerate(ops, netns, own_key(netns, &t));
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
        add_bytes(netns, orig.reason, (*ops).bytes_received + (*ops).bytes_acked);
        let _ = REDIRECT_ORIG_BY_COOKIE.remove(&cookie);
    }
    let t = ops_tuple(ops);
    let _ = REDIRECT_ORIG_BY_TUPLE.remove(&peer_key(netns, &t));
    // The sockhash drops closed sockets itself; the fallback mark is ours.
    let _ = REDIRECT_ACCEL_FALLBACK.remove(&own_key(netns, &t));
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
    let want = if orig.family == AF_INET { SOL_IP } else { SOL_IPV6 };
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
            fam[0], fam[1], port[0], port[1], orig.addr[0], orig.addr[1], orig.addr[2],
            orig.addr[3], 0, 0, 0, 0, 0, 0, 0, 0,
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
    let fam = if family == AF_INET as u32 { AF_INET } else { AF_INET6 };
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

/// Acceleration: each message an accelerated socket sends goes straight to
/// its peer's receive queue, skipping the loopback TCP/IP stack. Falls back
/// to the normal path (for good, for that socket) when the peer is absent.
#[sk_msg]
pub fn redirect_sk_msg(ctx: SkMsgContext) -> u32 {
    unsafe { sk_msg_redirect(&ctx) }
}

/// REDIRECT_ACCEL_FALLBACK values: why a socket is on the normal path.
const FALLBACK_PEER_MISSING: u8 = 1;
const FALLBACK_BULK: u8 = 2;

#[inline(always)]
unsafe fn sk_msg_redirect(ctx: &SkMsgContext) -> u32 {
    let m = ctx.msg;
    let netns = bpf_get_netns_cookie(m as *mut c_void);
    let lport = (*m).local_port as u16;
    let rport = u16::from_be(((*m).remote_port >> 16) as u16);
    let t = if (*m).family == AF_INET as u32 {
        (AF_INET, ip4_bytes((*m).local_ip4), ip4_bytes((*m).remote_ip4), lport, rport)
    } else {
        let l = ip6_bytes((*m).local_ip6);
        let r = ip6_bytes((*m).remote_ip6);
        match (v4_mapped(&l), v4_mapped(&r)) {
            (Some(l4), Some(r4)) => (AF_INET, l4, r4, lport, rport),
            _ => (AF_INET6, l, r, lport, rport),
        }
    };
    let own = own_key(netns, &t);
    let size = (*m).size as u64;
    match REDIRECT_ACCEL_FALLBACK.get(&own) {
        Some(&FALLBACK_BULK) => {
            bump(netns, Reason::AccelBulk as u32, 1, size);
            return SK_PASS;
        }
        Some(_) => return SK_PASS,
        None => {}
    }
    // Bulk: a large message moves the socket to the normal path for good,
    // where TCP flow control holds a writer back (the peer's sockmap queue
    // has none). The receiver reads what was already redirected before it
    // reads the normal path's bytes, so the order is kept.
    if redirect_common::accel_is_bulk((*m).size) {
        let _ = REDIRECT_ACCEL_FALLBACK.insert(&own, &FALLBACK_BULK, 0);
        bump(netns, Reason::AccelBulk as u32, 1, size);
        return SK_PASS;
    }
    if REDIRECT_SOCKS.redirect_msg(ctx, peer_key(netns, &t), BPF_F_INGRESS as u64) == SK_PASS as i64 {
        bump(netns, Reason::AccelRedirected as u32, 1, size);
        return SK_PASS;
    }
    let _ = REDIRECT_ACCEL_FALLBACK.insert(&own, &FALLBACK_PEER_MISSING, 0);
    bump(netns, Reason::AccelFallback as u32, 1, size);
    SK_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
