//! Kernel programs of the redirector, one file per hook. Each program is a
//! thin shell: read the context, call the shared decision in
//! `redirect-common`, apply, count. Program, section and map names are an
//! ABI (userspace attaches by program name, maps are pinned by name).
//!
//! Hooks, and what each replaces:
//! - `connect.rs`: `redirect_connect4/6` (cgroup/connect4, connect6). The
//!   nat OUTPUT chain: ISTIO_OUTPUT, then ISTIO_REDIRECT (outbound capture
//!   port) or ISTIO_IN_REDIRECT (inbound capture port).
//! - `orig_dst.rs`: `redirect_getsockopt` (cgroup/getsockopt) and
//!   `redirect_getpeername4/6` (cgroup/getpeername4, getpeername6).
//!   conntrack's answer to SO_ORIGINAL_DST, and the un-NAT the app sees.
//! - `sockops.rs`: `redirect_sockops` (sockops). conntrack's lifecycle of a
//!   NATed connection: the original-destination records are handed over
//!   when it is established and removed when it closes.
//! - `inbound.rs`: `redirect_sk_lookup` (sk_lookup, one per pod netns).
//!   nat PREROUTING: ISTIO_INBOUND, then ISTIO_IN_REDIRECT; plus the
//!   proxy's listener registration sockops calls.
//! - `accel.rs`: `redirect_sk_msg` (sk_msg), and the sockops side of
//!   acceleration. No iptables counterpart: it skips the loopback TCP/IP
//!   hop between app and proxy.
//! - `sendmsg.rs`: `redirect_sendmsg4/6` (cgroup/sendmsg4, sendmsg6).
//!   ISTIO_OUTPUT_DNS for UDP datagrams sent with an address: port 53 to a
//!   nameserver goes to the DNS proxy (TCP and connected UDP: connect.rs).
//! - `recvmsg.rs`: `redirect_recvmsg4/6` (cgroup/recvmsg4, recvmsg6). The
//!   un-NAT of captured DNS replies: they read as from the nameserver.
//! - `release.rs`: `redirect_sock_release` (cgroup/sock_release).
//!   conntrack forgetting a connection that never started, and a DNS
//!   socket's record when it closes.
//! - `vm.rs`: `redirect_vm_ingress/egress` (tc, tcx links on a pod's `-k`
//!   interfaces, one instance per pod). The nat PREROUTING rules of
//!   `-k`: a VM's connections go to the outbound port, as REDIRECT.
//! - `sock_create.rs`: `redirect_sock_create` and `redirect_netns_cookie`
//!   (cgroup/sock_create). The netns cookie where the kernel does not hand
//!   it to a hook (before Linux 5.15) or to userspace (before 5.14).
//!
//! getsockopt, sockops, sk_msg and sk_lookup come in two builds each, for
//! kernels with and without a feature (`<program>_stored`: `netns.rs`;
//! `redirect_sk_lookup_addr`: `inbound.rs`); userspace loads the first
//! one the kernel's verifier accepts.
//!
//! Helpers, imported by the hook files and never importing them:
//! `maps.rs` (every map), `netns.rs` (the one place a program learns its
//! pod's netns cookie), `addr.rs` (addresses and 4-tuples out of the
//! contexts), `counters.rs` (the per-reason counters), `trace.rs`
//! (`redirect trace`'s events: one call per hook where it counts),
//! `log.rs` (the debug log, off unless the install turns it on),
//! `abi.rs` (kernel constants the bindings lack). A new hook gets a file
//! of its own and a line here.
#![no_std]
#![no_main]

mod abi;
mod accel;
mod addr;
mod connect;
mod counters;
mod inbound;
mod log;
mod maps;
mod netns;
mod orig_dst;
mod recvmsg;
mod release;
mod sendmsg;
mod sock_create;
mod sockops;
mod trace;
mod vm;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
