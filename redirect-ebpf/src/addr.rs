//! Addresses in and out of the program contexts: the kernel's 32-bit
//! words to network-order bytes (v4 in the first 4), sock_addr writes, and
//! a socket's 4-tuple ([`SockTuple`], v4-mapped IPv6 folded to IPv4) out of
//! each context that carries one.

use aya_ebpf::bindings::{bpf_sock, bpf_sock_addr, bpf_sock_ops, sk_msg_md};
use redirect_common::{SockTuple, AF_INET};

// The kernel keeps addresses as 32-bit words holding the network-order
// bytes; in memory the words are those bytes, so the conversions are
// reinterpretations (whole words, not 16 separate bytes the compiler would
// spill to the stack one by one). Context fields are read word by word
// (volatile), as the verifier wants them: left to itself the compiler may
// read the bytes it needs one at a time, which most context fields refuse.

/// An IPv6 address field of a context (`[u32; 4]`), as bytes.
#[inline(always)]
pub unsafe fn ctx_ip6(p: *const [u32; 4]) -> [u8; 16] {
    let p = p as *const u32;
    let w = [
        core::ptr::read_volatile(p),
        core::ptr::read_volatile(p.add(1)),
        core::ptr::read_volatile(p.add(2)),
        core::ptr::read_volatile(p.add(3)),
    ];
    core::mem::transmute::<[u32; 4], [u8; 16]>(w)
}

/// An IPv4 address field of a context, as bytes (the first 4).
#[inline(always)]
pub unsafe fn ctx_ip4(p: *const u32) -> [u8; 16] {
    let w = [core::ptr::read_volatile(p), 0, 0, 0];
    core::mem::transmute::<[u32; 4], [u8; 16]>(w)
}

#[inline(always)]
pub fn words(b: &[u8; 16]) -> [u32; 4] {
    unsafe { core::mem::transmute::<[u8; 16], [u32; 4]>(*b) }
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
unsafe fn tuple(
    family: u32,
    v4: impl FnOnce() -> (*const u32, *const u32),
    v6: impl FnOnce() -> (*const [u32; 4], *const [u32; 4]),
    local_port: u16,
    remote_port: u16,
) -> SockTuple {
    if family == AF_INET as u32 {
        let (l, r) = v4();
        return SockTuple::v4(ctx_ip4(l), ctx_ip4(r), local_port, remote_port);
    }
    let (l, r) = v6();
    SockTuple::v6(ctx_ip6(l), ctx_ip6(r), local_port, remote_port)
}

/// A sock_ops socket's 4-tuple.
#[inline(always)]
pub unsafe fn ops_tuple(ops: *mut bpf_sock_ops) -> SockTuple {
    tuple(
        (*ops).family,
        || (&raw const (*ops).local_ip4, &raw const (*ops).remote_ip4),
        || (&raw const (*ops).local_ip6, &raw const (*ops).remote_ip6),
        (*ops).local_port as u16,
        u16::from_be(((*ops).remote_port >> 16) as u16),
    )
}

/// An sk_msg socket's 4-tuple (the fields of sock_ops, in sk_msg_md).
#[inline(always)]
pub unsafe fn msg_tuple(m: *mut sk_msg_md) -> SockTuple {
    tuple(
        (*m).family,
        || (&raw const (*m).local_ip4, &raw const (*m).remote_ip4),
        || (&raw const (*m).local_ip6, &raw const (*m).remote_ip6),
        (*m).local_port as u16,
        u16::from_be(((*m).remote_port >> 16) as u16),
    )
}

/// A `bpf_sock`'s 4-tuple (getsockopt's socket).
#[inline(always)]
pub unsafe fn sock_tuple(sk: *mut bpf_sock) -> SockTuple {
    tuple(
        (*sk).family,
        || (&raw const (*sk).src_ip4, &raw const (*sk).dst_ip4),
        || (&raw const (*sk).src_ip6, &raw const (*sk).dst_ip6),
        (*sk).src_port as u16,
        u16::from_be((*sk).dst_port),
    )
}
