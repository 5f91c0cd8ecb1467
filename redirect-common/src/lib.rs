//! Types shared by the kernel programs and userspace, and the pure decision
//! logic both use. Everything here is `#[repr(C)]` with explicit padding and
//! a size assert, so the two sides cannot drift.
#![cfg_attr(not(feature = "user"), no_std)]

pub mod accel;
pub mod decision;
pub mod reason;
pub mod trace;
pub mod tuple;

pub use accel::*;
pub use decision::*;
pub use reason::Reason;
pub use trace::{TraceCtl, TraceEvent, MAP_TRACE, MAP_TRACE_EVENTS, MAP_TRACE_PODS};
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
/// Interface entries (`-c`, `-k`) of all pods.
pub const MAX_IFACES: u32 = MAX_PODS;
/// Route entries of all pods (a pod has a handful: its subnets, the
/// default route, per family).
pub const MAX_ROUTES: u32 = 4 * MAX_PODS;

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
pub const MAP_IFACES: &str = "REDIRECT_IFACES";
pub const MAP_ROUTES: &str = "REDIRECT_ROUTES";
/// The 4-tuples of the pod's own IPv6 connections to its own addresses
/// (sk_lookup tells their SYNs from ones arriving from outside).
pub const MAP_LOCAL_CONNECTS: &str = "REDIRECT_LOCAL_CONNECTS";
/// Socket-local storage of accelerated sockets (sk_msg state); not sized,
/// not in ALL_MAPS (no `--map-size` knob), but its layout is checked too.
pub const MAP_ACCEL_SK: &str = "REDIRECT_ACCEL_SK";
/// Counter updates lost to a full REDIRECT_COUNTERS (one per-CPU slot; not
/// sized, not in ALL_MAPS, layout checked).
pub const MAP_COUNTERS_LOST: &str = "REDIRECT_COUNTERS_LOST";
/// Socket-local storage holding a pod socket's netns cookie, for the hooks
/// that cannot ask the kernel for it (getsockopt, sockops and sk_msg
/// before Linux 5.15); see [`SkNetns`]. Not sized, not in ALL_MAPS,
/// layout checked.
pub const MAP_SK_NETNS: &str = "REDIRECT_SK_NETNS";
pub const ALL_MAPS: [&str; 13] = [
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
    MAP_IFACES,
    MAP_ROUTES,
    MAP_LOCAL_CONNECTS,
];

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;
pub const IPPROTO_TCP: u32 = 6;
pub const IPPROTO_UDP: u32 = 17;
/// An MPTCP socket (`socket(AF_INET, SOCK_STREAM, IPPROTO_MPTCP)`); its
/// subflows are IPPROTO_TCP sockets.
pub const IPPROTO_MPTCP: u32 = 262;
pub const SOCK_STREAM: u32 = 1;
pub const SOL_IP: i32 = 0;
pub const SOL_IPV6: i32 = 41;
/// `SO_ORIGINAL_DST` (SOL_IP) and `IP6T_SO_ORIGINAL_DST` (SOL_IPV6) share the number.
pub const SO_ORIGINAL_DST: i32 = 80;

/// DNS: the port captured with `--redirect-dns`, and the port of the DNS
/// proxy it goes to (Istio's agent listens on 127.0.0.1:15053 and
/// [::1]:15053, UDP and TCP; not configurable in istio-iptables either).
pub const DNS_PORT: u16 = 53;
pub const DNS_PROXY_PORT: u16 = 15053;

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
    /// `--redirect-dns` in effect (istio-iptables' rules with DNS): TCP
    /// and UDP port 53 to a nameserver (`cidr_kind::DNS_V4/V6`) go to the
    /// DNS proxy, and rules (2)/(3)/(6) leave port 53 to the DNS chain.
    /// Not set when the nameserver list is empty and no capture-all
    /// applies (istio-iptables then turns DNS capture off).
    pub const DNS_CAPTURE: u32 = 1 << 8;
    /// With DNS_CAPTURE: port 53 to any address (`--capture-all-dns`, or
    /// the nameservers are unknown).
    pub const DNS_CAPTURE_ALL: u32 = 1 << 9;
    /// Display only: DNS_CAPTURE_ALL because the pod's nameservers could
    /// not be learned, not because of `--capture-all-dns`.
    pub const DNS_SERVERS_UNKNOWN: u32 = 1 << 10;
    /// `ISTIO_OUTBOUND_OWNER_GROUPS` is a list: only processes whose gid is
    /// listed (`cidr_kind::OWNER_GID`) are captured.
    pub const OWNER_GROUPS_ONLY: u32 = 1 << 11;
    /// `ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE`: processes whose gid is listed
    /// are not captured.
    pub const OWNER_GROUPS_EXCEPT: u32 = 1 << 12;
    /// `ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR` is not 127.0.0.1/32: rules (2),
    /// (5) and (8) use the range in `cidr_kind::LOOPBACK_V4`.
    pub const LOOPBACK_CIDR: u32 = 1 << 13;
    /// Display only: `--redirect-dns` was given, but the pod has no
    /// nameserver and capture-all does not apply, so DNS_CAPTURE is off
    /// (as istio-iptables turns it off).
    pub const DNS_NO_SERVERS: u32 = 1 << 14;
    /// Set and cleared by the programs, not a setting: one of the pod's
    /// own IPv6 connections to its addresses could not be marked
    /// (REDIRECT_LOCAL_CONNECTS full). Until a mark is removed again (room
    /// again), sk_lookup takes any local IPv6 source for the pod's own, as
    /// for IPv4, rather than steer the pod's own connections (the proxy's
    /// passthrough to the app among them) back to the inbound port.
    pub const LOCAL_MARKS_LOST: u32 = 1 << 15;
    /// `-c` names interfaces: connections routed out of them are left
    /// alone (the connect hooks look the route up only then).
    pub const OUT_EXCLUDE_IFACES: u32 = 1 << 16;
    /// The pod has `-c` or `-k` interfaces: sk_lookup looks the interface a
    /// connection arrives on up in REDIRECT_IFACES (only then).
    pub const IFACES: u32 = 1 << 17;
    /// Display only: `--dual-stack` was given (IPv6 is captured when the
    /// pod has any usable IPv6 address, not only when its first one is).
    pub const DUAL_STACK: u32 = 1 << 18;
    /// IPv6 is not captured for this pod: istio-iptables' `EnableIPv6` is
    /// false (the pod's first usable address is IPv4, or, with
    /// `--dual-stack`, it has no usable IPv6 address), so it writes no
    /// ip6tables rules at all. No IPv6 connection is touched, outbound,
    /// inbound or from a `-k` VM; a v4-mapped destination is IPv4.
    pub const IPV6_OFF: u32 = 1 << 19;
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
    /// The pod's IPv4 nameservers (`--redirect-dns`), one /32 each.
    pub const DNS_V4: u32 = 4;
    /// The gids of `ISTIO_OUTBOUND_OWNER_GROUPS[_EXCLUDE]`: the gid in the
    /// address's first 4 bytes (network order), prefix 32. See
    /// [`gid_key`].
    pub const OWNER_GID: u32 = 5;
    /// `ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR` (when not 127.0.0.1/32).
    pub const LOOPBACK_V4: u32 = 6;
    pub const INCLUDE_V6: u32 = 17;
    pub const EXCLUDE_V6: u32 = 18;
    pub const LOCAL_V6: u32 = 19;
    /// The pod's IPv6 nameservers, one /128 each.
    pub const DNS_V6: u32 = 20;

    /// Kinds at or above this hold IPv6 addresses; below, IPv4 ones (or a
    /// gid written as one).
    pub const FIRST_V6: u32 = INCLUDE_V6;

    /// The address bytes an owner gid is stored and looked up under.
    pub const fn gid_key(gid: u32) -> [u8; 16] {
        let b = gid.to_be_bytes();
        [b[0], b[1], b[2], b[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    }
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

/// Key of REDIRECT_IFACES: an interface of a pod named by `-c` or `-k`.
/// `ifindex` is the interface's index in the pod's netns, or [`IFACE_NAME`]
/// plus a slot number for a name record: each name as given (it may match
/// no interface yet, or several with a trailing `+`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IfaceKey {
    pub netns: u64,
    pub ifindex: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<IfaceKey>() == 16);

/// `IfaceKey::ifindex` of a name record: this bit plus a slot. Never a real
/// ifindex (those are positive `int`s), so the kernel never finds one.
pub const IFACE_NAME: u32 = 1 << 31;

/// `IfaceEntry::flags` bits.
pub mod iface_flags {
    /// `-c`: connections arriving on it are not captured (and those routed
    /// out of it, through the route entries).
    pub const EXCLUDE: u32 = 1 << 0;
    /// `-k`: TCP connections a VM behind it opens go to the outbound port.
    pub const VIRT: u32 = 1 << 1;
    /// `addr4` holds the interface's first IPv4 address.
    pub const HAS_ADDR4: u32 = 1 << 2;
    /// `addr6` holds the interface's first IPv6 address (global if any).
    pub const HAS_ADDR6: u32 = 1 << 3;
}

/// Value of REDIRECT_IFACES: the interface's name (or the name as given,
/// in a name record), what it is for, and for a `-k` interface the link
/// header length and the addresses a VM's connections are redirected to
/// (as iptables REDIRECT in PREROUTING: the incoming interface's address).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IfaceEntry {
    /// NUL-padded.
    pub name: [u8; 16],
    pub flags: u32,
    /// Bytes before the IP header on this interface (14 on Ethernet, 0 on
    /// an IP-only device).
    pub l2_len: u32,
    /// Network order, in the first 4 bytes.
    pub addr4: [u8; 16],
    pub addr6: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<IfaceEntry>() == 56);

impl IfaceEntry {
    pub const fn has(&self, flag: u32) -> bool {
        self.flags & flag != 0
    }
}

/// `RouteEntry::flags` bits.
pub mod route_flags {
    /// `src` holds the source address the pod's route gives this
    /// destination.
    pub const HAS_SRC: u32 = 1 << 0;
    /// The route leaves through an interface named by `-c`.
    pub const EXCLUDED_IFACE: u32 = 1 << 1;
}

/// Value of REDIRECT_ROUTES, an LPM trie of a pod's routes (its main
/// table, read at attach) keyed like REDIRECT_CIDRS with the family as
/// kind: what the kernel's routing would pick for a destination before
/// any rewrite, which iptables NAT keeps (the source address, the output
/// interface).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouteEntry {
    /// Network order, v4 in the first 4 bytes.
    pub src: [u8; 16],
    pub ifindex: u32,
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<RouteEntry>() == 24);

impl RouteEntry {
    pub const fn has(&self, flag: u32) -> bool {
        self.flags & flag != 0
    }
}

/// A pod socket's netns cookie, kept in its socket-local storage
/// (REDIRECT_SK_NETNS) where the kernel lacks `bpf_get_netns_cookie` for
/// getsockopt, sockops and sk_msg programs (before Linux 5.15): written
/// when the socket is created (cgroup/sock_create, which has the helper)
/// and copied to the sockets a listener accepts (the map's BPF_F_CLONE).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SkNetns {
    pub netns: u64,
}
const _: () = assert!(core::mem::size_of::<SkNetns>() == 8);

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
    unsafe impl aya::Pod for IfaceKey {}
    unsafe impl aya::Pod for IfaceEntry {}
    unsafe impl aya::Pod for RouteEntry {}
    unsafe impl aya::Pod for SkNetns {}
}
