//! A socket's 4-tuple as the kernel programs read it, and the map keys made
//! from it. Addresses are in network order with IPv4 in the first 4 bytes;
//! ports in host order.

use crate::{TupleKey, AF_INET, AF_INET6};

/// `::ffff:a.b.c.d` → `Some(a.b.c.d)` in the first 4 bytes; `None` for any
/// other IPv6 address.
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

/// An IPv4 address (first 4 bytes) as `::ffff:a.b.c.d`.
#[inline(always)]
pub fn v4_to_mapped(v4: &[u8; 16]) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[10] = 0xff;
    b[11] = 0xff;
    b[12] = v4[0];
    b[13] = v4[1];
    b[14] = v4[2];
    b[15] = v4[3];
    b
}

/// A TCP socket's 4-tuple from its own side (local → remote). A dual-stack
/// socket talking IPv4 (both ends v4-mapped) is folded to IPv4, as the
/// connect hook decides it (iptables sees IPv4 there), so every hook keys
/// one connection the same way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockTuple {
    /// AF_INET or AF_INET6.
    pub family: u16,
    pub local: [u8; 16],
    pub remote: [u8; 16],
    pub local_port: u16,
    pub remote_port: u16,
}

impl SockTuple {
    /// An AF_INET socket's tuple (addresses in the first 4 bytes).
    #[inline(always)]
    pub fn v4(local: [u8; 16], remote: [u8; 16], local_port: u16, remote_port: u16) -> Self {
        SockTuple {
            family: AF_INET,
            local,
            remote,
            local_port,
            remote_port,
        }
    }

    /// An AF_INET6 socket's tuple: IPv4 when both ends are v4-mapped.
    #[inline(always)]
    pub fn v6(local: [u8; 16], remote: [u8; 16], local_port: u16, remote_port: u16) -> Self {
        match (v4_mapped(&local), v4_mapped(&remote)) {
            (Some(l4), Some(r4)) => Self::v4(l4, r4, local_port, remote_port),
            _ => SockTuple {
                family: AF_INET6,
                local,
                remote,
                local_port,
                remote_port,
            },
        }
    }

    /// This socket's key (local → remote): its REDIRECT_SOCKS and
    /// REDIRECT_ACCEL_FALLBACK entry, and for an app socket its
    /// REDIRECT_ORIG_BY_TUPLE entry.
    #[inline(always)]
    pub fn own_key(&self, netns: u64) -> TupleKey {
        TupleKey {
            netns,
            src: self.local,
            dst: self.remote,
            sport: self.local_port,
            dport: self.remote_port,
            family: self.family,
            _pad: 0,
        }
    }

    /// The peer's key: the same connection seen from the other end (what
    /// the proxy's accepted socket looks up, where sk_msg redirects to).
    #[inline(always)]
    pub fn peer_key(&self, netns: u64) -> TupleKey {
        TupleKey {
            netns,
            src: self.remote,
            dst: self.local,
            sport: self.remote_port,
            dport: self.local_port,
            family: self.family,
            _pad: 0,
        }
    }
}

impl TupleKey {
    /// The key of the other end of the connection (same netns).
    #[inline(always)]
    pub fn reversed(&self) -> TupleKey {
        TupleKey {
            netns: self.netns,
            src: self.dst,
            dst: self.src,
            sport: self.dport,
            dport: self.sport,
            family: self.family,
            _pad: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(a: [u8; 4]) -> [u8; 16] {
        let mut b = [0; 16];
        b[..4].copy_from_slice(&a);
        b
    }

    fn v6(s: &str) -> [u8; 16] {
        s.parse::<core::net::Ipv6Addr>().unwrap().octets()
    }

    #[test]
    fn v4_mapped_round_trips_and_rejects_other_v6() {
        let a = v4([10, 1, 2, 3]);
        assert_eq!(v4_to_mapped(&a), v6("::ffff:10.1.2.3"));
        assert_eq!(v4_mapped(&v4_to_mapped(&a)), Some(a));
        for other in [
            "::1",
            "::6",
            "fd00::1",
            "::10.1.2.3",
            "::fffe:10.1.2.3",
            "1::ffff:a01:203",
        ] {
            assert_eq!(v4_mapped(&v6(other)), None, "{other}");
        }
    }

    #[test]
    fn a_dual_stack_socket_talking_v4_is_keyed_as_v4() {
        let t = SockTuple::v6(v6("::ffff:127.0.0.1"), v6("::ffff:10.0.0.9"), 40000, 15001);
        assert_eq!(
            t,
            SockTuple::v4(v4([127, 0, 0, 1]), v4([10, 0, 0, 9]), 40000, 15001)
        );
        // One end mapped is not an IPv4 connection: left as is.
        let half = SockTuple::v6(v6("::ffff:127.0.0.1"), v6("::1"), 1, 2);
        assert_eq!(half.family, AF_INET6);
        assert_eq!(half.local, v6("::ffff:127.0.0.1"));
        let plain = SockTuple::v6(v6("fd00::1"), v6("fd00::2"), 1, 2);
        assert_eq!(plain.family, AF_INET6);
    }

    #[test]
    fn own_and_peer_keys_are_the_two_ends_of_one_connection() {
        let t = SockTuple::v4(v4([10, 0, 0, 1]), v4([127, 0, 0, 1]), 40000, 15001);
        let own = t.own_key(7);
        let peer = t.peer_key(7);
        assert_eq!(
            own,
            TupleKey {
                netns: 7,
                src: v4([10, 0, 0, 1]),
                dst: v4([127, 0, 0, 1]),
                sport: 40000,
                dport: 15001,
                family: AF_INET,
                _pad: 0,
            }
        );
        assert_eq!(peer.src, own.dst);
        assert_eq!((peer.sport, peer.dport), (15001, 40000));
        assert_eq!(own.reversed(), peer);
        assert_eq!(peer.reversed(), own);
        // The peer socket's own view gives back this socket's key.
        let other = SockTuple::v4(t.remote, t.local, t.remote_port, t.local_port);
        assert_eq!(other.own_key(7), peer);
        assert_eq!(other.peer_key(7), own);
    }
}
