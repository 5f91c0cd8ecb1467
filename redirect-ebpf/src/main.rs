//! Kernel programs of the redirector, one file per hook. Each program is a
//! thin shell: read the context, call the shared decision in
//! `redirect-common`, apply, count.
//!
//! | file          | programs (section)                                  | replaces                                    |
//! |---------------|-----------------------------------------------------|---------------------------------------------|
//! | `connect.rs`  | `redirect_connect4/6` (cgroup/connect4, connect6)    | nat OUTPUT → ISTIO_OUTPUT → ISTIO_REDIRECT / ISTIO_IN_REDIRECT |
//! | `orig_dst.rs` | `redirect_getsockopt` (cgroup/getsockopt), `redirect_getpeername4/6` | conntrack's SO_ORIGINAL_DST answer, and the un-NAT of getpeername |
//! | `sockops.rs`  | `redirect_sockops` (sockops)                         | conntrack's connection lifecycle (the records' hand-over and removal) |
//! | `inbound.rs`  | `redirect_sk_lookup` (sk_lookup)                     | nat PREROUTING → ISTIO_INBOUND → ISTIO_IN_REDIRECT |
//! | `accel.rs`    | `redirect_sk_msg` (sk_msg)                           | nothing: the loopback TCP/IP hop app↔proxy, skipped |
//! | `release.rs`  | `redirect_sock_release` (cgroup/sock_release)        | conntrack dropping a connection that never started |
//!
//! Helpers: `maps.rs` (every map, pinned by name: an ABI), `netns.rs` (the
//! one place a program learns its pod netns), `addr.rs` (addresses and
//! 4-tuples out of the contexts), `counters.rs` (the per-reason counters),
//! `abi.rs` (kernel constants the bindings lack). Imports point from the
//! hook files to the helpers, never back.
#![no_std]
#![no_main]

mod abi;
mod accel;
mod addr;
mod connect;
mod counters;
mod inbound;
mod maps;
mod netns;
mod orig_dst;
mod release;
mod sockops;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
