//! cgroup/sock_release: conntrack forgetting a connection that never
//! started, and a captured DNS socket's last query.
//! - A redirected app socket whose connect failed before its SYN never
//!   reaches sockops, so its original-destination record is dropped here.
//! - A UDP socket whose DNS was captured (`sendmsg.rs`, `connect.rs`)
//!   keeps its record for the replies until it is closed: dropped here.

use core::ffi::c_void;

use aya_ebpf::{helpers::bpf_get_socket_cookie, macros::cgroup_sock, programs::SockContext};
use redirect_common::{IPPROTO_TCP, IPPROTO_UDP};

use crate::{abi::TCP_CLOSE, maps::REDIRECT_ORIG_BY_COOKIE};

/// A socket is released (its last fd closed). A redirected app socket
/// whose connect never got as far as the SYN (failed with
/// EADDRNOTAVAIL on local port exhaustion, say) is still in TCP_CLOSE
/// here and never reaches sockops: drop its original-destination record,
/// which nothing else would. Any other TCP socket keeps its record until
/// its state callback (its bytes are counted there). A UDP socket's
/// record (its captured DNS query) goes with it.
#[cgroup_sock(sock_release)]
pub fn redirect_sock_release(ctx: SockContext) -> i32 {
    unsafe {
        let sk = ctx.sock;
        let proto = (*sk).protocol;
        if (proto == IPPROTO_TCP && (*sk).state == TCP_CLOSE) || proto == IPPROTO_UDP {
            let cookie = bpf_get_socket_cookie(sk as *mut c_void);
            let _ = REDIRECT_ORIG_BY_COOKIE.remove(&cookie);
        }
    }
    1
}
