//! The per-pod, per-reason counters (`iptables -L -v`'s packet and byte
//! columns): REDIRECT_COUNTERS, and REDIRECT_COUNTERS_LOST when it is full.

use redirect_common::{CounterKey, CounterValue, Reason};

use crate::maps::{REDIRECT_COUNTERS, REDIRECT_COUNTERS_LOST};

/// Add to a per-CPU counter (no atomics needed), creating it on first use.
/// A BPF subprogram: its key and value live in a small frame of their own,
/// not once per call site in the calling program's (whose stack the
/// verifier limits to 512 bytes with its subprograms').
#[inline(never)]
pub fn bump(netns: u64, reason: u32, conns: u64, bytes: u64) {
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

/// Count one connection (or call) under `reason` (and log it, when the
/// install's debug log is on).
#[inline(always)]
pub fn count(netns: u64, reason: Reason) {
    count_code(netns, reason as u32);
}

/// [`count`] by raw reason code.
#[inline(always)]
pub fn count_code(netns: u64, reason: u32) {
    bump(netns, reason, 1, 0);
    crate::log::decision(netns, reason);
}

/// Add bytes to a counter (by raw reason code) without counting a
/// connection.
#[inline(always)]
pub fn add_bytes(netns: u64, reason: u32, bytes: u64) {
    bump(netns, reason, 0, bytes);
}
