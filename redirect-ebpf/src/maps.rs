//! Every map of the object, and the load-time global of sk_lookup. The
//! names are an ABI: maps are pinned by name (`<pin-dir>/maps/<NAME>`) and
//! shared by every attached pod and every program version, and userspace
//! checks their layout before it reuses them (`mapsize.rs`), so a key or
//! value type here never changes size.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::bpf_sock,
    macros::map,
    maps::{
        lpm_trie::Key, Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf,
        SockHash,
    },
};
use redirect_common::{
    trace::{MAX_TRACE_PODS, TRACE_RING_BYTES},
    TraceCtl,
};
use redirect_common::{
    AccelSock, CidrKeyData, CounterKey, CounterValue, IfaceEntry, IfaceKey, ListenerKey, Lookup,
    OrigDst, PodConfig, PortKey, RouteEntry, SkNetns, TupleKey, CIDR_KEY_FIXED_BITS,
    MAX_ACCEL_PORTS, MAX_CIDRS, MAX_COUNTERS, MAX_IFACES, MAX_LISTENERS, MAX_PODS, MAX_PORTS,
    MAX_ROUTES, MAX_TRACKED_SOCKETS,
};

#[map]
pub static REDIRECT_PODS: HashMap<u64, PodConfig> = HashMap::pinned(MAX_PODS, 0);
#[map]
pub static REDIRECT_CIDRS: LpmTrie<CidrKeyData, u8> = LpmTrie::pinned(MAX_CIDRS, 0);
#[map]
pub static REDIRECT_PORTS: HashMap<PortKey, u8> = HashMap::pinned(MAX_PORTS, 0);
#[map]
pub static REDIRECT_COUNTERS: PerCpuHashMap<CounterKey, CounterValue> =
    PerCpuHashMap::pinned(MAX_COUNTERS, 0);
/// Counter updates lost because REDIRECT_COUNTERS was full (the slot of a
/// pod and reason did not exist yet and could not be made). One slot.
#[map]
pub static REDIRECT_COUNTERS_LOST: PerCpuArray<u64> = PerCpuArray::pinned(1, 0);
/// Original destination of a redirected app socket, by socket cookie
/// (getpeername, and the hand-over to the tuple map when established).
/// A plain hash, not LRU: when it is full the insert fails and connect4
/// refuses the connection (counted), where an LRU map would silently
/// evict the record of a live connection.
#[map]
pub static REDIRECT_ORIG_BY_COOKIE: HashMap<u64, OrigDst> = HashMap::pinned(MAX_TRACKED_SOCKETS, 0);
/// Original destination by the app socket's 4-tuple: what the proxy's
/// accepted socket asks for with SO_ORIGINAL_DST. A plain hash for the
/// same reason (a failed insert is counted; the proxy then gets no answer
/// and refuses the connection).
#[map]
pub static REDIRECT_ORIG_BY_TUPLE: HashMap<TupleKey, OrigDst> =
    HashMap::pinned(MAX_TRACKED_SOCKETS, 0);
/// Accelerated app↔proxy sockets, keyed by their own 4-tuple (local →
/// remote) and netns cookie; the sk_msg program redirects to the peer.
#[map]
pub static REDIRECT_SOCKS: SockHash<TupleKey> = SockHash::pinned(MAX_TRACKED_SOCKETS, 0);
/// Sockets whose data once took the normal path (peer not in the sockhash
/// yet): they stay on it, so bytes can never overtake each other.
#[map]
pub static REDIRECT_ACCEL_FALLBACK: HashMap<TupleKey, u8> = HashMap::pinned(MAX_TRACKED_SOCKETS, 0);
/// Per pod and destination port: how many of its latest connections in a
/// row lived less than ACCEL_SHORT_CONN_NS (acceleration skips the port
/// from ACCEL_SHORT_SKIP_AFTER on). Soft state, hence LRU.
#[map]
pub static REDIRECT_ACCEL_PORTS: LruHashMap<PortKey, u32> = LruHashMap::pinned(MAX_ACCEL_PORTS, 0);
/// The pod's own IPv6 connections to one of its own (non-loopback)
/// addresses, by the connecting socket's 4-tuple (local → remote) and
/// netns cookie, from the SYN until the socket closes: sk_lookup tells
/// their SYNs, which arrive with the address's device as ingress, from a
/// SYN from outside whose source is one of the pod's addresses (IPv6 does
/// not drop those as martians; PREROUTING captures them). Not
/// preallocated: only such connections take memory.
#[map]
pub static REDIRECT_LOCAL_CONNECTS: HashMap<TupleKey, u8> =
    HashMap::pinned(MAX_TRACKED_SOCKETS, aya_ebpf::bindings::BPF_F_NO_PREALLOC);
/// The proxy's listener on the inbound capture port, per netns and family.
#[map]
pub static REDIRECT_LISTENERS: SockHash<ListenerKey> = SockHash::pinned(MAX_LISTENERS, 0);

/// The interfaces pods name with `-c` and `-k`, by (netns cookie, ifindex).
#[map]
pub static REDIRECT_IFACES: HashMap<IfaceKey, IfaceEntry> = HashMap::pinned(MAX_IFACES, 0);
/// Each pod's routes (its main table as read at attach), keyed like
/// REDIRECT_CIDRS with the family as kind: source address and output
/// interface of a destination.
#[map]
pub static REDIRECT_ROUTES: LpmTrie<CidrKeyData, RouteEntry> = LpmTrie::pinned(MAX_ROUTES, 0);
/// `redirect trace`'s switch, one entry (see trace.rs): zero while nobody
/// traces.
#[map]
pub static REDIRECT_TRACE: Array<TraceCtl> = Array::pinned(1, 0);
/// The pods traced (netns cookie), unless the switch says every pod.
#[map]
pub static REDIRECT_TRACE_PODS: HashMap<u64, u8> = HashMap::pinned(MAX_TRACE_PODS, 0);
/// Trace events for `redirect trace` (and the agent's trace op).
#[map]
pub static REDIRECT_TRACE_EVENTS: RingBuf = RingBuf::pinned(TRACE_RING_BYTES, 0);
/// Where `redirect_netns_cookie` reports the netns cookie of a socket
/// created in its cgroup: userspace's way to learn a netns's cookie where
/// the kernel lacks `SO_NETNS_COOKIE` (before Linux 5.14). Not pinned:
/// each report loads the program with an array of its own.
#[map]
pub static REDIRECT_NETNS_REPORT: Array<u64> = Array::with_max_entries(1, 0);

/// The pod netns an sk_lookup instance serves: sk_lookup programs cannot
/// call bpf_get_netns_cookie, so each pod's instance is loaded with its
/// cookie set here (userspace `set_global`).
#[unsafe(no_mangle)]
pub static REDIRECT_SK_LOOKUP_NETNS: u64 = 0;

/// The same for the tc programs on a pod's `-k` interfaces (one instance
/// per pod; `bpf_get_netns_cookie` is not offered to tc programs).
#[unsafe(no_mangle)]
pub static REDIRECT_TC_NETNS: u64 = 0;

/// One pod's view of the config maps, for the shared decisions.
pub struct PodMaps {
    pub netns: u64,
}

/// The look-ups are BPF subprograms (`inline(never)`): their keys live in
/// small frames of their own instead of adding up in the decision's (the
/// verifier's 512-byte limit is on a call chain's sum).
impl Lookup for PodMaps {
    #[inline(never)]
    fn port_listed(&self, kind: u16, port: u16) -> bool {
        let key = PortKey {
            netns: self.netns,
            kind,
            port,
            _pad: 0,
        };
        unsafe { REDIRECT_PORTS.get(&key).is_some() }
    }

    #[inline(never)]
    fn cidr_contains(&self, kind: u32, addr: &[u8; 16]) -> bool {
        let key = Key::new(
            CIDR_KEY_FIXED_BITS + 128,
            CidrKeyData::new(self.netns, kind, *addr),
        );
        REDIRECT_CIDRS.get(&key).is_some()
    }

    #[inline(always)]
    fn route(&self, family: u16, addr: &[u8; 16]) -> Option<RouteEntry> {
        let key = Key::new(
            CIDR_KEY_FIXED_BITS + 128,
            CidrKeyData::new(self.netns, family as u32, *addr),
        );
        REDIRECT_ROUTES.get(&key).copied()
    }

    #[inline(never)]
    fn route_excluded(&self, family: u16, addr: &[u8; 16]) -> bool {
        let key = Key::new(
            CIDR_KEY_FIXED_BITS + 128,
            CidrKeyData::new(self.netns, family as u32, *addr),
        );
        REDIRECT_ROUTES
            .get(&key)
            .is_some_and(|r| r.has(redirect_common::route_flags::EXCLUDED_IFACE))
    }
}

/// A BTF map definition (`.maps`): socket-local storage needs BTF for its
/// value type ([`AccelSock`], the sk_msg state). Pinned by name like the other maps, so every program and
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
pub unsafe fn accel_storage(sk: *mut bpf_sock, init: *mut AccelSock) -> *mut AccelSock {
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

/// REDIRECT_SK_NETNS: a pod socket's netns cookie ([`SkNetns`]) for the
/// hooks that cannot ask the kernel for it (`netns.rs`). BTF-defined like
/// REDIRECT_ACCEL_SK; BPF_F_CLONE (with BPF_F_NO_PREALLOC, which socket
/// storage requires): a listener's entry is copied to every socket it
/// accepts.
#[repr(C)]
pub struct SkNetnsDef {
    r#type: *const [i32; aya_ebpf::bindings::bpf_map_type::BPF_MAP_TYPE_SK_STORAGE as usize],
    key: *const i32,
    value: *const SkNetns,
    max_entries: *const [i32; 0],
    map_flags: *const [i32; (aya_ebpf::bindings::BPF_F_NO_PREALLOC
        | aya_ebpf::bindings::BPF_F_CLONE) as usize],
    /// LIBBPF_PIN_BY_NAME.
    pinning: *const [i32; 1],
}
// SAFETY: placeholder pointers the loader reads from BTF; never dereferenced.
unsafe impl Sync for SkNetnsDef {}

#[unsafe(link_section = ".maps")]
#[unsafe(export_name = "REDIRECT_SK_NETNS")]
static REDIRECT_SK_NETNS: SkNetnsDef = SkNetnsDef {
    r#type: core::ptr::null(),
    key: core::ptr::null(),
    value: core::ptr::null(),
    max_entries: core::ptr::null(),
    map_flags: core::ptr::null(),
    pinning: core::ptr::null(),
};

/// `bpf_sk_storage_get` on REDIRECT_SK_NETNS: the socket's entry, null
/// when it has none (with `init`: created from it when absent). `sk` is a
/// socket the program's context hands out, or the context itself in a
/// cgroup/sock_create program.
#[inline(always)]
pub unsafe fn sk_netns_storage(sk: *mut c_void, init: *mut SkNetns) -> *mut SkNetns {
    let flags = if init.is_null() {
        0
    } else {
        aya_ebpf::bindings::BPF_SK_STORAGE_GET_F_CREATE as u64
    };
    aya_ebpf::helpers::generated::bpf_sk_storage_get(
        &REDIRECT_SK_NETNS as *const SkNetnsDef as *mut c_void,
        sk,
        init as *mut c_void,
        flags,
    ) as *mut SkNetns
}
