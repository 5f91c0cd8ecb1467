//! Which pod a program runs for: the cookie of the socket's network
//! namespace, the key of every per-pod map entry. This is the one place a
//! program obtains it, one function per context type.
//!
//! `bpf_get_netns_cookie` exists for sock_addr and sock programs since
//! Linux 5.7, but for getsockopt, sockops and sk_msg programs only since
//! 5.15. Those three hooks therefore come in two builds, chosen by the
//! `STORED` parameter: `false` asks the kernel (the programs named
//! `redirect_<hook>`), `true` reads the cookie a cgroup/sock_create
//! program ([`record`], `sock.rs`) stored in the socket's local storage
//! when the socket was made (`redirect_<hook>_stored`). Userspace loads
//! the first and, where the verifier refuses it, the second (a probe of
//! the kernel, not of its version string). A socket created before its
//! pod was captured has no entry: cookie 0, which no pod has, so it is
//! left alone as on any kernel for a netns that is not captured.
//!
//! sk_lookup cannot call the helper on any kernel: each pod's instance is
//! loaded with its cookie as a constant.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{bpf_sock, bpf_sock_addr, bpf_sock_ops, bpf_sockopt, sk_msg_md},
    helpers::bpf_get_netns_cookie,
};
use redirect_common::SkNetns;

use crate::maps::{sk_netns_storage, REDIRECT_SK_LOOKUP_NETNS, REDIRECT_TC_NETNS};

/// cgroup/connect4/6, sendmsg4/6, recvmsg4/6, getpeername4/6.
#[inline(always)]
pub unsafe fn of_sock_addr(sa: *mut bpf_sock_addr) -> u64 {
    bpf_get_netns_cookie(sa as *mut c_void)
}

/// cgroup/getsockopt.
#[inline(always)]
pub unsafe fn of_sockopt<const STORED: bool>(so: *mut bpf_sockopt) -> u64 {
    if STORED {
        stored((*so).__bindgen_anon_1.sk)
    } else {
        bpf_get_netns_cookie(so as *mut c_void)
    }
}

/// sockops.
#[inline(always)]
pub unsafe fn of_sock_ops<const STORED: bool>(ops: *mut bpf_sock_ops) -> u64 {
    if STORED {
        stored((*ops).__bindgen_anon_2.sk)
    } else {
        bpf_get_netns_cookie(ops as *mut c_void)
    }
}

/// sk_msg (a socket's first message; its storage carries it after that).
#[inline(always)]
pub unsafe fn of_msg<const STORED: bool>(m: *mut sk_msg_md) -> u64 {
    if STORED {
        stored((*m).__bindgen_anon_3.sk)
    } else {
        bpf_get_netns_cookie(m as *mut c_void)
    }
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

/// The cookie stored on `sk` (0: none).
#[inline(always)]
unsafe fn stored(sk: *mut bpf_sock) -> u64 {
    if sk.is_null() {
        return 0;
    }
    let st = sk_netns_storage(sk as *mut c_void, core::ptr::null_mut());
    if st.is_null() {
        0
    } else {
        (*st).netns
    }
}

/// cgroup/sock_create: the cookie of the netns the socket `sk` (the
/// program's context) is made in. The helper takes the context.
#[inline(always)]
pub unsafe fn of_new_sock(sk: *mut bpf_sock) -> u64 {
    bpf_get_netns_cookie(sk as *mut c_void)
}

/// cgroup/sock_create: store `netns` on the new socket `sk` (the
/// program's context) for the `STORED` builds. False when the kernel
/// could not allocate the entry.
#[inline(always)]
pub unsafe fn record(sk: *mut bpf_sock, netns: u64) -> bool {
    let mut init = SkNetns { netns };
    !sk_netns_storage(sk as *mut c_void, &mut init).is_null()
}
