//! Addresses in and out of the program contexts: the kernel's 32-bit
//! words to network-order bytes (v4 in the first 4), v4-mapped IPv6
//! folding, sock_addr writes, and a socket's 4-tuple.

use aya_ebpf::bindings::{bpf_sock_addr, bpf_sock_ops};
use redirect_common::{TupleKey, AF_INET, AF_INET6};

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

/// `::ffff:a.b.c.d` → Some(a.b.c.d in the first 4 bytes).
#[inline(always)]
pub fn v4_mapped(b: &[u8; 16]) -> Option<[u8; 16]> {
    let mut i = 0;
    while i < 10 {
        if b[i] != 0 {
            return None;
        }
        i += 1;
    }
    if b[10] != 0xff || b[11] != 0xff {
        return None;
    }
    let mut v4 = [0u8; 16];
    v4[0] = b[12];
    v4[1] = b[13];
    v4[2] = b[14];
    v4[3] = b[15];
    Some(v4)
}

#[inline(always)]
pub fn mapped(v4: &[u8; 16]) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[10] = 0xff;
    b[11] = 0xff;
    b[12] = v4[0];
    b[13] = v4[1];
    b[14] = v4[2];
    b[15] = v4[3];
    b
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

/// The socket's 4-tuple as (local, remote, local port, remote port), with
/// v4-mapped v6 addresses folded to v4 (matching the connect hook).
#[inline(always)]
pub unsafe fn ops_tuple(ops: *mut bpf_sock_ops) -> (u16, [u8; 16], [u8; 16], u16, u16) {
    let lport = (*ops).local_port as u16;
    let rport = u16::from_be(((*ops).remote_port >> 16) as u16);
    if (*ops).family == AF_INET as u32 {
        return (
            AF_INET,
            ip4_bytes((*ops).local_ip4),
            ip4_bytes((*ops).remote_ip4),
            lport,
            rport,
        );
    }
    let l = ip6_bytes((*ops).local_ip6);
    let r = ip6_bytes((*ops).remote_ip6);
    match (v4_mapped(&l), v4_mapped(&r)) {
        (Some(l4), Some(r4)) => (AF_INET, l4, r4, lport, rport),
        _ => (AF_INET6, l, r, lport, rport),
    }
}

/// The socket's own key in the sockhash (local → remote).
#[inline(always)]
pub fn own_key(netns: u64, t: &(u16, [u8; 16], [u8; 16], u16, u16)) -> TupleKey {
    TupleKey {
        netns,
        src: t.1,
        dst: t.2,
        sport: t.3,
        dport: t.4,
        family: t.0,
        _pad: 0,
    }
}

/// The peer's key: the same connection seen from the other end.
#[inline(always)]
pub fn peer_key(netns: u64, t: &(u16, [u8; 16], [u8; 16], u16, u16)) -> TupleKey {
    TupleKey {
        netns,
        src: t.2,
        dst: t.1,
        sport: t.4,
        dport: t.3,
        family: t.0,
        _pad: 0,
    }
}
