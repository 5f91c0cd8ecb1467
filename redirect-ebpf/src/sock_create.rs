//! cgroup/sock_create: the netns cookie for kernels that do not give it to
//! getsockopt, sockops and sk_msg programs (before Linux 5.15; `netns.rs`).
//! No iptables counterpart: conntrack knows a connection's netns.
//! - `redirect_sock_create` (attached to pod cgroups only where the
//!   `_stored` builds of those hooks are in use) stores the cookie in the
//!   local storage of every TCP socket a captured pod creates; the sockets
//!   a listener accepts inherit it.
//! - `redirect_netns_cookie` reports the cookie of the netns a socket is
//!   created in to userspace, where the kernel lacks `SO_NETNS_COOKIE`
//!   (before 5.14): userspace attaches it to a cgroup of its own and
//!   creates one socket there, in the netns it asks about.

use aya_ebpf::{macros::cgroup_sock, programs::SockContext};
use redirect_common::IPPROTO_TCP;

use crate::{
    maps::{REDIRECT_NETNS_REPORT, REDIRECT_PODS},
    netns,
};

/// sock_create programs allow the socket (0 would refuse it, EPERM).
const CREATE_PROCEED: i32 = 1;

/// A socket is created in a pod cgroup: a TCP socket of a captured netns
/// gets its netns cookie stored (only those: attached at the cgroup root,
/// this sees every socket of the node). Never refuses a socket: without
/// an entry (the kernel could not allocate one) its connections are not
/// recognised as the pod's by the stored builds, as for a socket made
/// before the pod was captured.
#[cgroup_sock(sock_create)]
pub fn redirect_sock_create(ctx: SockContext) -> i32 {
    unsafe {
        let sk = ctx.sock;
        if (*sk).protocol == IPPROTO_TCP {
            let cookie = netns::of_new_sock(sk);
            if REDIRECT_PODS.get(&cookie).is_some() {
                let _ = netns::record(sk, cookie);
            }
        }
    }
    CREATE_PROCEED
}

/// The cookie of the netns the socket is created in, into the one slot of
/// REDIRECT_NETNS_REPORT (nothing else runs in the reporting cgroup).
#[cgroup_sock(sock_create)]
pub fn redirect_netns_cookie(ctx: SockContext) -> i32 {
    unsafe {
        let cookie = netns::of_new_sock(ctx.sock);
        if let Some(slot) = REDIRECT_NETNS_REPORT.get_ptr_mut(0) {
            *slot = cookie;
        }
    }
    CREATE_PROCEED
}
