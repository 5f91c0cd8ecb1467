//! Live decision tracing (`redirect trace`): the switch the kernel programs
//! read before they build an event, and the event they put into the ring
//! buffer. See docs/explain-trace.md.
//!
//! Nobody tracing costs each hook one read of [`TraceCtl::until_ns`] (an
//! array slot the verifier inlines). A tracer sets it to the end of its
//! lease (CLOCK_MONOTONIC, renewed every second) and lists its pods in
//! REDIRECT_TRACE_PODS (or sets [`trace_flags::ALL_PODS`]); the programs
//! stop emitting by themselves when the lease runs out, so a tracer killed
//! with SIGKILL leaves tracing on for at most the lease.

/// The switch: REDIRECT_TRACE's one entry.
pub const MAP_TRACE: &str = "REDIRECT_TRACE";
/// The traced pods (netns cookie → 1), unless [`trace_flags::ALL_PODS`].
pub const MAP_TRACE_PODS: &str = "REDIRECT_TRACE_PODS";
/// The events (BPF_MAP_TYPE_RINGBUF).
pub const MAP_TRACE_EVENTS: &str = "REDIRECT_TRACE_EVENTS";

/// Pods traced at once by name (`--netns`, `--pod`); tracing every pod
/// needs no entry.
pub const MAX_TRACE_PODS: u32 = 1024;
/// Size of the event ring buffer in bytes (a power of 2 and whole pages):
/// about 2,000 events. When it is full (the tracer reads too slowly) an
/// event is dropped and counted under `ERRORS/trace_events_lost`.
pub const TRACE_RING_BYTES: u32 = 256 * 1024;

/// REDIRECT_TRACE's one entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TraceCtl {
    /// Tracing is on until this CLOCK_MONOTONIC time (ns, as
    /// `bpf_ktime_get_ns`); 0: nobody traces, and the programs read
    /// nothing else.
    pub until_ns: u64,
    /// The tracing process (shown to a second tracer).
    pub owner_pid: u32,
    /// [`trace_flags`].
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<TraceCtl>() == 16);

/// [`TraceCtl::flags`] bits.
pub mod trace_flags {
    /// Every captured pod is traced (REDIRECT_TRACE_PODS is not read).
    pub const ALL_PODS: u32 = 1;
}

/// [`TraceEvent::kind`]: the hook that emitted the event.
pub mod trace_kind {
    /// cgroup/connect4, connect6: the OUTPUT decision of a TCP connect or
    /// a UDP connect.
    pub const CONNECT: u16 = 1;
    /// cgroup/sendmsg4, sendmsg6: the OUTPUT decision of a UDP datagram to
    /// port 53 sent with an address.
    pub const SENDMSG: u16 = 2;
    /// sk_lookup: the PREROUTING decision of a connection from outside.
    pub const SK_LOOKUP: u16 = 3;
    /// cgroup/getsockopt: SO_ORIGINAL_DST answered or missing.
    pub const GETSOCKOPT: u16 = 4;
    /// cgroup/getpeername4, getpeername6: the original peer shown.
    pub const GETPEERNAME: u16 = 5;
    /// cgroup/recvmsg4, recvmsg6: a DNS reply read as from the nameserver.
    pub const RECVMSG: u16 = 6;
}

/// [`TraceEvent::flags`] bits.
pub mod trace_event_flags {
    /// A v4-mapped IPv6 socket making an IPv4 connection (decided as
    /// IPv4; its new destination is `::ffff:127.0.0.1`).
    pub const V4_IN_V6: u16 = 1;
    /// The connect or datagram was refused (`EPERM`): its decision said
    /// redirect, and the original destination could not be recorded.
    pub const REFUSED: u16 = 2;
    /// The event carries the calling task (pid, comm, uid, gid).
    pub const TASK: u16 = 4;
}

/// One event. Addresses in network order (IPv4 in the first 4 bytes),
/// ports in host order; what `src`, `dst` and `to` hold depends on `kind`:
///
/// | kind | src, sport | dst, dport | to, to_port |
/// |---|---|---|---|
/// | CONNECT, SENDMSG | bound source (zero when unbound) | destination dialed | new destination (zero: untouched) |
/// | SK_LOOKUP | the remote peer | the pod address dialed | `to_port`: the inbound port (zero: untouched) |
/// | GETSOCKOPT | the app side of the proxy's connection | the proxy's side | the answer (zero: missing) |
/// | GETPEERNAME, RECVMSG | - | - | the peer shown to the app |
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceEvent {
    /// CLOCK_MONOTONIC, ns.
    pub time_ns: u64,
    pub netns: u64,
    /// The task's process id (tgid), with [`trace_event_flags::TASK`].
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
    /// The [`crate::Reason`] counted for this decision or answer.
    pub reason: u32,
    /// [`trace_kind`].
    pub kind: u16,
    /// AF_INET or AF_INET6 (as decided: v4-mapped counts as AF_INET).
    pub family: u16,
    /// IPPROTO_TCP or IPPROTO_UDP.
    pub proto: u16,
    /// [`trace_event_flags`].
    pub flags: u16,
    pub sport: u16,
    pub dport: u16,
    pub to_port: u16,
    pub _pad: u16,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub to: [u8; 16],
    /// The task's command name (NUL padded), with `TASK`.
    pub comm: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<TraceEvent>() == 112);

#[cfg(feature = "user")]
mod pod_impls {
    use super::*;
    unsafe impl aya::Pod for TraceCtl {}
    unsafe impl aya::Pod for TraceEvent {}
}
