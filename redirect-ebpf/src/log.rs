//! Debug logging of the decisions through aya-log, off unless the install
//! turns it on (`redirect attach --debug-log`, `redirect daemon
//! --debug-log`). Every log call of the programs is here, behind [`on`]:
//! one lookup in a one-entry array (which the verifier inlines) and a
//! branch when off. Records go to aya-log's ring buffer `AYA_LOGS`, which
//! userspace pins next to the other maps, so every program, every version
//! and every process of an install share one switch and one buffer.

use aya_ebpf::{macros::map, maps::Array};
use aya_log_ebpf::debug;

/// The install's switch: entry 0 non-zero turns logging on.
#[map]
pub static REDIRECT_LOG: Array<u32> = Array::pinned(1, 0);

/// Is debug logging on for this install?
#[inline(always)]
pub fn on() -> bool {
    matches!(REDIRECT_LOG.get(0), Some(v) if *v != 0)
}

/// A decision was taken (and counted): the pod's netns cookie and the
/// reason code (`redirect_common::Reason`; userspace names it).
#[inline(always)]
pub fn decision(netns: u64, reason: u32) {
    if on() {
        redirect_log_decision(netns, reason);
    }
}

/// The record itself: a global BPF function (exported by the linker, see
/// xtask's `build-ebpf`), which the verifier checks once, on its own,
/// and at each call only takes its scalar result. A static subprogram is
/// walked again on every path that calls it: aya-log's record (a ring
/// buffer reservation and a byte-by-byte copy) on every path of the
/// connect hooks took Linux 6.1's verifier past its 1M-instruction limit.
/// Returns 0 (a global function must return a scalar).
#[no_mangle]
#[inline(never)]
pub extern "C" fn redirect_log_decision(netns: u64, reason: u32) -> u32 {
    debug!(&(), "decision netns={} reason={}", netns, reason);
    0
}
