//! Which pod a program runs for: the cookie of the socket's network
//! namespace, the key of every per-pod map entry. This is the one place a
//! program obtains it, one function per context type, so a kernel that
//! lacks `bpf_get_netns_cookie` for some hooks (Linux 5.10 offers it to
//! sock_addr programs, not to sockopt, sockops or sk_msg) can get it
//! another way here.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{bpf_sock_addr, bpf_sock_ops, bpf_sockopt, sk_msg_md},
    helpers::bpf_get_netns_cookie,
};

use crate::maps::{REDIRECT_SK_LOOKUP_NETNS, REDIRECT_TC_NETNS};

/// cgroup/connect4/6, cgroup/getpeername4/6.
#[inline(always)]
pub unsafe fn of_sock_addr(sa: *mut bpf_sock_addr) -> u64 {
    bpf_get_netns_cookie(sa as *mut c_void)
}

/// cgroup/getsockopt.
#[inline(always)]
pub unsafe fn of_sockopt(so: *mut bpf_sockopt) -> u64 {
    bpf_get_netns_cookie(so as *mut c_void)
}

/// sockops.
#[inline(always)]
pub unsafe fn of_sock_ops(ops: *mut bpf_sock_ops) -> u64 {
    bpf_get_netns_cookie(ops as *mut c_void)
}

/// sk_msg (a socket's first message; its storage carries it after that).
#[inline(always)]
pub unsafe fn of_msg(m: *mut sk_msg_md) -> u64 {
    bpf_get_netns_cookie(m as *mut c_void)
}

/// sk_lookup: the helper is not allowed there, so each pod's instance is
/// loaded with its netns cookie as a global.
#[inline(always)]
pub unsafe fn of_sk_lookup() -> u64 {
    core::ptr::read_volatile(&REDIRECT_SK_LOOKUP_NETNS)
}

/// tc (the programs on a pod's `-k` interfaces): not offered the helper
/// either, so each pod's instances carry their netns cookie as a global.
#[inline(always)]
pub unsafe fn of_tc() -> u64 {
    core::ptr::read_volatile(&REDIRECT_TC_NETNS)
}
