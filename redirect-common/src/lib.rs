//! Types shared by the kernel programs and userspace, and the pure decision
//! logic both use. Everything here is `#[repr(C)]` with explicit padding and
//! a size assert, so the two sides cannot drift.
#![cfg_attr(not(feature = "user"), no_std)]

pub mod decision;
pub mod reason;
pub mod tuple;

pub use decision::*;
pub use reason::Reason;
pub use tuple::{v4_mapped, v4_to_mapped, SockTuple};

/// Maximum number of proxy uids and of proxy gids per pod (istio-iptables
/// takes comma lists; real deployments use one or two).
pub const MAX_IDS: usize = 8;

/// Map sizes. Pinned maps keep the size they were created with; changing one
/// of these needs `redirect uninstall` first.
pub const MAX_PODS: u32 = 16_384;
pub const MAX_CIDRS: u32 = 65_536;
pub const MAX_PORTS: u32 = 65_536;
pub const MAX_COUNTERS: u32 = 131_072;
pub const MAX_TRACKED_SOCKETS: u32 = 262_144;
pub const MAX_LISTENERS: u32 = 2 * MAX_PODS;

/// Names of the pinned maps (the kernel object's static names).
pub const MAP_PODS: &str = "REDIRECT_PODS";
pub const MAP_CIDRS: &str = "REDIRECT_CIDRS";
pub const MAP_PORTS: &str = "REDIRECT_PORTS";
pub const MAP_COUNTERS: &str = "REDIRECT_COUNTERS";
pub const MAP_ORIG_BY_COOKIE: &str = "REDIRECT_ORIG_BY_COOKIE";
pub const MAP_ORIG_BY_TUPLE: &str = "REDIRECT_ORIG_BY_TUPLE";
pub const MAP_LISTENERS: &str = "REDIRECT_LISTENERS";
pub const MAP_SOCKS: &str = "REDIRECT_SOCKS";
pub const MAP_ACCEL_FALLBACK: &str = "REDIRECT_ACCEL_FALLBACK";
pub const MAP_ACCEL_PORTS: &str = "REDIRECT_ACCEL_PORTS";
/// Socket-local storage of accelerated sockets (sk_msg state); not sized,
/// not in ALL_MAPS (no `--map-size` knob), but its layout is checked too.
pub const MAP_ACCEL_SK: &str = "REDIRECT_ACCEL_SK";
/// Counter updates lost to a full REDIRECT_COUNTERS (one per-CPU slot; not
/// sized, not in ALL_MAPS, layout checked).
pub const MAP_COUNTERS_LOST: &str = "REDIRECT_COUNTERS_LOST";
pub const ALL_MAPS: [&str; 10] = [
    MAP_PODS,
    MAP_CIDRS,
    MAP_PORTS,
    MAP_COUNTERS,
    MAP_ORIG_BY_COOKIE,
    MAP_ORIG_BY_TUPLE,
    MAP_LISTENERS,
    MAP_SOCKS,
    MAP_ACCEL_FALLBACK,
    MAP_ACCEL_PORTS,
];

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;
pub const IPPROTO_TCP: u32 = 6;
pub const SOCK_STREAM: u32 = 1;
pub const SOL_IP: i32 = 0;
pub const SOL_IPV6: i32 = 41;
/// `SO_ORIGINAL_DST` (SOL_IP) and `IP6T_SO_ORIGINAL_DST` (SOL_IPV6) share the number.
pub const SO_ORIGINAL_DST: i32 = 80;

/// Acceleration's bulk switch: a message of at least this many bytes
/// (one large write) moves its socket to the normal TCP path for good, so
/// bulk writers are flow-controlled by TCP again (redirected data is not,
/// README "Acceleration"). Small request/response messages stay below it.
pub const ACCEL_BULK_MSG_BYTES: u32 = 64 * 1024;

/// Does a message of `size` bytes switch its socket to the normal path?
#[inline(always)]
pub fn accel_is_bulk(size: u32) -> bool {
    size >= ACCEL_BULK_MSG_BYTES
}

/// Bytes one acceleration verdict covers (`bpf_msg_apply_bytes`): the
/// kernel applies the sk_msg program's verdict to a socket's next messages
/// until they add up to this, without running the program. Also the
/// granularity of the ACCEL byte counters (README "Acceleration").
pub const ACCEL_VERDICT_BYTES: u32 = 16 * 1024;

/// A verdict made for a message of `size` bytes: the bytes of that message
/// it covers (counted at once), and the rest of its budget (counted by the
/// next verdict, which runs only once the budget is used up).
#[inline(always)]
pub fn accel_verdict_split(size: u32) -> (u32, u32) {
    let covered = if size < ACCEL_VERDICT_BYTES {
        size
    } else {
        ACCEL_VERDICT_BYTES
    };
    (covered, ACCEL_VERDICT_BYTES - covered)
}

/// Acceleration learns where it does not pay. Each accelerated connection
/// costs the kernel a psock per socket, set up in the handshake and torn
/// down at close through an RCU-deferred work item (README,
/// "Acceleration"): for connections that live only microseconds that cost
/// is not won back, and it raises their latency tail. So each pod keeps,
/// per destination port (the original destination's port outbound, the
/// app's port for the inbound passthrough), a count of consecutive
/// connections that lived less than this; REDIRECT_ACCEL_PORTS.
pub const ACCEL_SHORT_CONN_NS: u64 = 10_000_000;

/// After this many consecutive short-lived connections to a port, new
/// connections to it are not accelerated; one connection that lives
/// longer (accelerated or not) turns acceleration back on for the port.
pub const ACCEL_SHORT_SKIP_AFTER: u32 = 4;

/// Entries of REDIRECT_ACCEL_PORTS (an LRU: the learned state is soft).
pub const MAX_ACCEL_PORTS: u32 = 16384;

/// A port's count after one of its connections closed after `lifetime_ns`.
#[inline(always)]
pub fn accel_short_count_after(count: u32, lifetime_ns: u64) -> u32 {
    if lifetime_ns >= ACCEL_SHORT_CONN_NS {
        0
    } else if count < ACCEL_SHORT_SKIP_AFTER {
        count + 1
    } else {
        ACCEL_SHORT_SKIP_AFTER
    }
}

/// Is a new connection to a port with this count accelerated?
#[inline(always)]
pub fn accel_pays(short_count: u32) -> bool {
    short_count < ACCEL_SHORT_SKIP_AFTER
}

/// `PodConfig::flags` bits.
pub mod flags {
    /// `-i '*'`: every outbound destination is included.
    pub const OUT_INCLUDE_ALL: u32 = 1 << 0;
    /// `-i` names a loopback range explicitly: istio-iptables then drops
    /// the "app via lo → RETURN" rules (3)/(6).
    pub const OUT_INCLUDE_HAS_LOOPBACK: u32 = 1 << 1;
    /// `-b '*'`: every inbound port except `-d` and the tunnel port.
    pub const IN_CAPTURE_ALL: u32 = 1 << 2;
    /// `-b p1,p2`: only the listed inbound ports.
    pub const IN_CAPTURE_LISTED: u32 = 1 << 3;
    /// sockops/sk_msg acceleration on for this pod (the programs read
    /// only this bit).
    pub const ACCEL: u32 = 1 << 4;
    /// `--accel`: acceleration forced on, whatever the kernel probe said.
    pub const ACCEL_FORCED: u32 = 1 << 5;
    /// `--no-accel`: acceleration off by request. With neither bit, it is
    /// on where the kernel probe passed.
    pub const ACCEL_OFF: u32 = 1 << 6;
    /// `--accel-short-conns`: accelerate connections to every port, also
    /// where the latest connections were short-lived (no learning).
    pub const ACCEL_SHORT_CONNS: u32 = 1 << 7;
}

/// Per-pod configuration, keyed by network namespace cookie.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodConfig {
    pub proxy_port: u16,
    pub inbound_port: u16,
    pub tunnel_port: u16,
    pub _pad0: u16,
    pub flags: u32,
    pub uid_count: u32,
    pub gid_count: u32,
    /// Inode of the pod's netns (display only: finds its /run/netns name).
    pub netns_inode: u32,
    pub uids: [u32; MAX_IDS],
    pub gids: [u32; MAX_IDS],
}
const _: () = assert!(core::mem::size_of::<PodConfig>() == 88);

impl PodConfig {
    pub const fn has(&self, flag: u32) -> bool {
        self.flags & flag != 0
    }
}

/// Kinds of CIDR entries in the shared LPM trie.
pub mod cidr_kind {
    pub const INCLUDE_V4: u32 = 1;
    pub const EXCLUDE_V4: u32 = 2;
    /// The pod's own addresses ("-o lo" destinations besides 127/8).
    pub const LOCAL_V4: u32 = 3;
    pub const INCLUDE_V6: u32 = 17;
    pub const EXCLUDE_V6: u32 = 18;
    pub const LOCAL_V6: u32 = 19;
}

/// Data part of the LPM trie key: netns cookie (8 bytes, native order),
/// kind (4 bytes, native order), address (16 bytes, network order, v4 in
/// the first 4). The prefix length counts the first 96 bits plus the CIDR's.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CidrKeyData {
    pub netns: [u8; 8],
    pub kind: [u8; 4],
    pub addr: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<CidrKeyData>() == 28);
pub const CIDR_KEY_FIXED_BITS: u32 = 96;

impl CidrKeyData {
    pub const fn new(netns: u64, kind: u32, addr: [u8; 16]) -> Self {
        Self {
            netns: netns.to_ne_bytes(),
            kind: kind.to_ne_bytes(),
            addr,
        }
    }
}

/// Kinds of port entries.
pub mod port_kind {
    /// `-o`: outbound ports never captured.
    pub const OUT_EXCLUDE: u16 = 1;
    /// `-q`: outbound ports always captured.
    pub const OUT_INCLUDE: u16 = 2;
    /// `-b`: inbound ports captured (when not `*`).
    pub const IN_INCLUDE: u16 = 3;
    /// `-d`: inbound ports excluded (when `-b '*'`).
    pub const IN_EXCLUDE: u16 = 4;
    /// REDIRECT_ACCEL_PORTS: a port's count of consecutive short-lived
    /// connections (not a config entry).
    pub const ACCEL_SHORT: u16 = 5;
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PortKey {
    pub netns: u64,
    pub kind: u16,
    pub port: u16,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<PortKey>() == 16);

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CounterKey {
    pub netns: u64,
    pub reason: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<CounterKey>() == 16);

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CounterValue {
    pub count: u64,
    pub bytes: u64,
}
const _: () = assert!(core::mem::size_of::<CounterValue>() == 16);

/// An original destination: address in network order (v4 in the first 4
/// bytes), port in host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OrigDst {
    pub addr: [u8; 16],
    pub port: u16,
    pub family: u16,
    /// The [`Reason`] the connection was redirected for (its bytes are
    /// added to that counter when the app socket closes).
    pub reason: u32,
}
const _: () = assert!(core::mem::size_of::<OrigDst>() == 24);

/// A TCP 4-tuple inside one netns, as seen from the connecting (app) side.
/// Addresses in network order, ports in host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TupleKey {
    pub netns: u64,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub family: u16,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<TupleKey>() == 48);

/// Key of the inbound listener sockhash: the proxy's listener on the
/// inbound capture port, per netns and family.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ListenerKey {
    pub netns: u64,
    pub family: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<ListenerKey>() == 16);

#[cfg(feature = "user")]
mod pod_impls {
    use super::*;
    unsafe impl aya::Pod for PodConfig {}
    unsafe impl aya::Pod for CidrKeyData {}
    unsafe impl aya::Pod for PortKey {}
    unsafe impl aya::Pod for CounterKey {}
    unsafe impl aya::Pod for CounterValue {}
    unsafe impl aya::Pod for OrigDst {}
    unsafe impl aya::Pod for TupleKey {}
    unsafe impl aya::Pod for ListenerKey {}
}

#[cfg(test)]
mod accel_tests {
    use super::*;

    #[test]
    fn a_verdict_covers_its_message_up_to_the_budget() {
        assert_eq!(accel_verdict_split(64), (64, ACCEL_VERDICT_BYTES - 64));
        assert_eq!(
            accel_verdict_split(ACCEL_VERDICT_BYTES - 1),
            (ACCEL_VERDICT_BYTES - 1, 1)
        );
        assert_eq!(
            accel_verdict_split(ACCEL_VERDICT_BYTES),
            (ACCEL_VERDICT_BYTES, 0)
        );
        assert_eq!(
            accel_verdict_split(3 * ACCEL_VERDICT_BYTES),
            (ACCEL_VERDICT_BYTES, 0)
        );
        // A verdict always covers at least its own message (or the budget),
        // and never more than the budget in all.
        for size in [0, 1, 1000, 70_000, u32::MAX] {
            let (c, r) = accel_verdict_split(size);
            assert_eq!(c + r, ACCEL_VERDICT_BYTES);
            assert_eq!(c, size.min(ACCEL_VERDICT_BYTES));
        }
    }

    #[test]
    fn short_connections_turn_acceleration_off_for_their_port_until_a_long_one() {
        let short = ACCEL_SHORT_CONN_NS - 1;
        let mut c = 0;
        for i in 0..ACCEL_SHORT_SKIP_AFTER {
            assert!(accel_pays(c), "after {i} short connections");
            c = accel_short_count_after(c, short);
        }
        assert!(!accel_pays(c));
        // Saturates, so one long connection always turns it back on.
        for _ in 0..100 {
            c = accel_short_count_after(c, short);
        }
        assert_eq!(c, ACCEL_SHORT_SKIP_AFTER);
        c = accel_short_count_after(c, ACCEL_SHORT_CONN_NS);
        assert_eq!(c, 0);
        assert!(accel_pays(c));
        // Short ones must be consecutive.
        let mut c = 0;
        for _ in 0..10 {
            c = accel_short_count_after(c, 1);
            c = accel_short_count_after(c, u64::MAX);
        }
        assert!(accel_pays(c));
    }

    #[test]
    fn bulk_starts_at_the_threshold() {
        assert!(!accel_is_bulk(ACCEL_BULK_MSG_BYTES - 1));
        assert!(accel_is_bulk(ACCEL_BULK_MSG_BYTES));
    }
}
