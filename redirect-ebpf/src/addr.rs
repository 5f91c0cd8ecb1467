//! Addresses in and out of the program contexts: the kernel's 32-bit
//! words to network-order bytes (v4 in the first 4), sock_addr writes, and
//! a socket's 4-tuple ([`SockTuple`], v4-mapped IPv6 folded to IPv4) out of
//! each context that carries one.

use aya_ebpf::bindings::{bpf_sock, bpf_sock_addr, bpf_sock_ops, sk_msg_md};
use redirect_common::{SockTuple, AF_INET};

#[inline(always)]
pub fn ip6_bytes(w: [u32; 4]) -> [u8; 16] {
    let mut b = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let x = w[i].to_ne_bytes();
        b[i * 4] = x[0];
        b[i * 4 + 1] = x[1];
        b[i * 4 + 2] = x[2];
        b[i * 4 + 3] = x[3];
        i += 1;
    }
    b
}

#[inline(always)]
pub fn ip4_bytes(w: u32) -> [u8; 16] {
    let x = w.to_ne_bytes();
    let mut b = [0u8; 16];
    b[0] = x[0];
    b[1] = x[1];
    b[2] = x[2];
    b[3] = x[3];
    b
}

#[inline(always)]
fn words(b: &[u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
        u32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
        u32::from_ne_bytes([b[8], b[9], b[10], b[11]]),
        u32::from_ne_bytes([b[12], b[13], b[14], b[15]]),
    ]
}

/// Write an IPv6 address into a sock_addr context (32-bit stores only).
#[inline(always)]
pub unsafe fn set_user_ip6(sa: *mut bpf_sock_addr, addr: &[u8; 16]) {
    let w = words(addr);
    (*sa).user_ip6[0] = w[0];
    (*sa).user_ip6[1] = w[1];
    (*sa).user_ip6[2] = w[2];
    (*sa).user_ip6[3] = w[3];
}

/// A socket's 4-tuple from the address fields every socket context has
/// (IPv4 or IPv6 words, read only for the socket's family), ports already
/// in host order.
#[inline(always)]
fn tuple(
    family: u32,
    v4: impl FnOnce() -> (u32, u32),
    v6: impl FnOnce() -> ([u32; 4], [u32; 4]),
    local_port: u16,
    remote_port: u16,
) -> SockTuple {
    if family == AF_INET as u32 {
        let (l, r) = v4();
        return SockTuple::v4(ip4_bytes(l), ip4_bytes(r), local_port, remote_port);
    }
    let (l, r) = v6();
    SockTuple::v6(ip6_bytes(l), ip6_bytes(r), local_port, remote_port)
}

/// A sock_ops socket's 4-tuple.
#[inline(always)]
pub unsafe fn ops_tuple(ops: *mut bpf_sock_ops) -> SockTuple {
    tuple(
        (*ops).family,
        || ((*ops).local_ip4, (*ops).remote_ip4),
        || ((*ops).local_ip6, (*ops).remote_ip6),
        (*ops).local_port as u16,
        u16::from_be(((*ops).remote_port >> 16) as u16),
    )
}

/// An sk_msg socket's 4-tuple (the fields of sock_ops, in sk_msg_md).
#[inline(always)]
pub unsafe fn msg_tuple(m: *mut sk_msg_md) -> SockTuple {
    tuple(
        (*m).family,
        || ((*m).local_ip4, (*m).remote_ip4),
        || ((*m).local_ip6, (*m).remote_ip6),
        (*m).local_port as u16,
        u16::from_be(((*m).remote_port >> 16) as u16),
    )
}

/// A `bpf_sock`'s 4-tuple (getsockopt's socket).
#[inline(always)]
pub unsafe fn sock_tuple(sk: *mut bpf_sock) -> SockTuple {
    tuple(
        (*sk).family,
        || ((*sk).src_ip4, (*sk).dst_ip4),
        || ((*sk).src_ip6, (*sk).dst_ip6),
        (*sk).src_port as u16,
        u16::from_be((*sk).dst_port),
    )
}
