//! `redirect trace`: each hook calls one function here where it counts its
//! decision or answer. Nothing is built unless the pod is traced: [`on`]
//! first reads REDIRECT_TRACE's one entry (an array slot the verifier
//! inlines, no helper call) and returns at once while nobody traces
//! (`until_ns` 0). With a tracer it checks the pod (every pod, or the
//! pod set) and the tracer's lease (`bpf_ktime_get_ns() < until_ns`: a
//! tracer that was killed stops being served when its lease ends). An
//! event that finds the ring buffer full is counted
//! (`ERRORS/trace_events_lost`), never waited for.

use aya_ebpf::{
    bindings::bpf_sk_lookup,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid, bpf_ktime_get_ns,
    },
};
use redirect_common::{
    trace::{trace_event_flags, trace_flags, trace_kind},
    OrigDst, Outbound, PodConfig, Reason, SockTuple, TraceEvent, Verdict, AF_INET, DNS_PROXY_PORT,
    IPPROTO_TCP,
};

pub use redirect_common::trace::trace_kind::{CONNECT, SENDMSG};

use crate::{
    addr::{ctx_ip4, ctx_ip6},
    connect::Decided,
    counters::count,
    maps::{REDIRECT_TRACE, REDIRECT_TRACE_EVENTS, REDIRECT_TRACE_PODS},
};

/// Which program types may ask for the current task (pid, command, ids),
/// as the loader found: [`TASK_SOCK_ADDR`] (cgroup/connect and friends,
/// Linux 5.7+), [`TASK_SOCKOPT`] (cgroup/getsockopt, 6.1+). Without its
/// bit a program's events carry no task. Read-only data: the verifier
/// drops the branch a clear bit rules out, helper calls included, so the
/// programs load where those helpers are missing.
#[unsafe(no_mangle)]
pub static REDIRECT_TRACE_TASK: u8 = 0;
pub const TASK_SOCK_ADDR: u8 = 1;
pub const TASK_SOCKOPT: u8 = 2;

/// Is `netns` traced right now? Some(now) when it is.
#[inline(always)]
fn on(netns: u64) -> Option<u64> {
    let ctl = REDIRECT_TRACE.get(0)?;
    let until = ctl.until_ns;
    if until == 0 {
        return None;
    }
    if ctl.flags & trace_flags::ALL_PODS == 0
        && unsafe { REDIRECT_TRACE_PODS.get(&netns) }.is_none()
    {
        return None;
    }
    let now = unsafe { bpf_ktime_get_ns() };
    if now >= until {
        return None;
    }
    Some(now)
}

/// Reserve, fill and submit one event of a traced pod; `task`: the
/// [`REDIRECT_TRACE_TASK`] bit of the calling program type (0: none).
#[inline(always)]
fn emit(netns: u64, kind: u16, reason: Reason, task: u8, fill: impl FnOnce(&mut TraceEvent)) {
    let Some(now) = on(netns) else {
        return;
    };
    let Some(mut slot) = REDIRECT_TRACE_EVENTS.reserve::<TraceEvent>(0) else {
        count(netns, Reason::ErrTraceLost);
        return;
    };
    let e = unsafe { &mut *slot.as_mut_ptr() };
    // Ring memory holds older events: every byte is written.
    unsafe { core::ptr::write_bytes(e as *mut TraceEvent, 0, 1) };
    e.time_ns = now;
    e.netns = netns;
    e.kind = kind;
    e.reason = reason as u32;
    e.proto = IPPROTO_TCP as u16;
    if task != 0 && unsafe { core::ptr::read_volatile(&REDIRECT_TRACE_TASK) } & task != 0 {
        e.flags |= trace_event_flags::TASK;
        e.pid = (bpf_get_current_pid_tgid() >> 32) as u32;
        let ids = bpf_get_current_uid_gid();
        e.uid = ids as u32;
        e.gid = (ids >> 32) as u32;
        if let Ok(c) = bpf_get_current_comm() {
            e.comm = c;
        }
    }
    fill(e);
    slot.submit(0);
}

/// connect4/6 (`kind` CONNECT) and sendmsg4/6 (SENDMSG): the OUTPUT
/// decision `d`. The new destination is the family's localhost on the
/// port the verdict sends to. A BPF subprogram: the event's building (and
/// the task helpers' buffers) stay out of the hook's stack frame, which
/// the verifier's 512-byte limit on a call chain holds tight there.
#[inline(never)]
pub fn outbound(kind: u16, netns: u64, cfg: &PodConfig, d: &Decided) {
    let v = d.verdict;
    let to_port = match v {
        Verdict::Untouched(_) => 0,
        Verdict::ToOutbound(_) => cfg.proxy_port,
        Verdict::ToInbound(_) => cfg.inbound_port,
        Verdict::ToDns(_) => DNS_PROXY_PORT,
    };
    emit(netns, kind, v.reason(), TASK_SOCK_ADDR, |e| {
        fill_outbound(e, &d.conn, d.v4_in_v6);
        e.to_port = to_port;
        if to_port != 0 {
            e.to = localhost(d.conn.family);
        }
    });
}

/// connect4/6 and sendmsg4/6: `d` refused (its record could not be
/// made). A BPF subprogram, as [`outbound`].
#[inline(never)]
pub fn refused(kind: u16, netns: u64, d: &Decided) {
    emit(netns, kind, Reason::ErrOrigMapFull, TASK_SOCK_ADDR, |e| {
        fill_outbound(e, &d.conn, d.v4_in_v6);
        e.flags |= trace_event_flags::REFUSED;
    });
}

#[inline(always)]
fn fill_outbound(e: &mut TraceEvent, c: &Outbound, v4_in_v6: bool) {
    e.family = c.family;
    e.proto = c.proto as u16;
    e.src = c.src;
    e.dst = c.dst;
    e.dport = c.dport;
    // The decision's ids, whatever the task helpers allow.
    e.uid = c.uid;
    e.gid = c.gid;
    if v4_in_v6 {
        e.flags |= trace_event_flags::V4_IN_V6;
    }
}

#[inline(always)]
fn localhost(family: u16) -> [u8; 16] {
    if family == AF_INET {
        let mut lo = [0u8; 16];
        lo[..4].copy_from_slice(&[127, 0, 0, 1]);
        lo
    } else {
        redirect_common::V6_LOCALHOST
    }
}

// The hooks below call these as BPF subprograms (`inline(never)`): an
// event's building stays out of the hook's stack frame.

/// sk_lookup: the PREROUTING decision `reason` for the lookup `l`;
/// `to_port` is the inbound port when captured (0: untouched).
#[inline(never)]
pub unsafe fn inbound(netns: u64, l: *mut bpf_sk_lookup, reason: Reason, to_port: u16) {
    emit(netns, trace_kind::SK_LOOKUP, reason, 0, |e| {
        let v4 = (*l).family == AF_INET as u32;
        e.family = (*l).family as u16;
        if v4 {
            e.src = ctx_ip4(&raw const (*l).remote_ip4);
            e.dst = ctx_ip4(&raw const (*l).local_ip4);
        } else {
            e.src = ctx_ip6(&raw const (*l).remote_ip6);
            e.dst = ctx_ip6(&raw const (*l).local_ip6);
        }
        e.sport = u16::from_be((*l).remote_port);
        e.dport = (*l).local_port as u16;
        e.to_port = to_port;
    });
}

/// getsockopt: SO_ORIGINAL_DST answered with `orig` (`OrigDstOutbound`,
/// `OrigDstInbound`) or not (`OrigDstMissing`), on the proxy's socket `t`.
#[inline(never)]
pub fn getsockopt(netns: u64, reason: Reason, orig: Option<&OrigDst>, t: &SockTuple) {
    answer(
        trace_kind::GETSOCKOPT,
        TASK_SOCKOPT,
        netns,
        reason,
        orig,
        Some(t),
    );
}

/// getpeername4/6: the app shown its original peer `orig`.
#[inline(never)]
pub fn getpeername(netns: u64, orig: &OrigDst) {
    answer(
        trace_kind::GETPEERNAME,
        TASK_SOCK_ADDR,
        netns,
        Reason::PeerNameRewritten,
        Some(orig),
        None,
    );
}

/// recvmsg4/6: a DNS reply read as from the nameserver `orig`.
#[inline(never)]
pub fn recvmsg(netns: u64, orig: &OrigDst) {
    answer(
        trace_kind::RECVMSG,
        TASK_SOCK_ADDR,
        netns,
        Reason::DnsReplyRewritten,
        Some(orig),
        None,
    );
}

/// An answer `reason` (the original destination `orig` shown; None: no
/// answer), on the connection `t` as the asking socket sees it.
#[inline(always)]
fn answer(
    kind: u16,
    task: u8,
    netns: u64,
    reason: Reason,
    orig: Option<&OrigDst>,
    t: Option<&SockTuple>,
) {
    emit(netns, kind, reason, task, |e| {
        if let Some(t) = t {
            e.family = t.family;
            e.src = t.remote;
            e.sport = t.remote_port;
            e.dst = t.local;
            e.dport = t.local_port;
        }
        if let Some(o) = orig {
            e.family = o.family;
            e.to = o.addr;
            e.to_port = o.port;
        }
        if kind == trace_kind::RECVMSG {
            e.proto = redirect_common::IPPROTO_UDP as u16;
        }
    });
}
