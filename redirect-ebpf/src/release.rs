//! cgroup/sock_release: conntrack forgets a connection that never
//! started. A redirected app socket whose connect failed before its SYN
//! never reaches sockops, so its original-destination record is dropped
//! here.

use core::ffi::c_void;

use aya_ebpf::{helpers::bpf_get_socket_cookie, macros::cgroup_sock, programs::SockContext};
use redirect_common::IPPROTO_TCP;

use crate::{abi::TCP_CLOSE, maps::REDIRECT_ORIG_BY_COOKIE};

/// A socket is released (its last fd closed). A redirected app socket
/// whose connect never got as far as the SYN (failed with
/// EADDRNOTAVAIL on local port exhaustion, say) is still in TCP_CLOSE
/// here and never reaches sockops: drop its original-destination record,
/// which nothing else would. Any other socket keeps its record until its
/// state callback (its bytes are counted there).
#[cgroup_sock(sock_release)]
pub fn redirect_sock_release(ctx: SockContext) -> i32 {
    unsafe {
        let sk = ctx.sock;
        if (*sk).protocol == IPPROTO_TCP && (*sk).state == TCP_CLOSE {
            let cookie = bpf_get_socket_cookie(sk as *mut c_void);
            let _ = REDIRECT_ORIG_BY_COOKIE.remove(&cookie);
        }
    }
    1
}
