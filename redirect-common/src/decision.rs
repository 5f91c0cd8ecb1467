//! The decision logic of istio-iptables' rules (docs/design.md, "The rules
//! being replaced"), shared by the kernel programs and the host tests. The
//! kernel provides map lookups through [`Lookup`].

use crate::{
    cidr_kind, flags, port_kind, PodConfig, Reason, AF_INET, AF_INET6, DNS_PORT, IPPROTO_TCP,
    IPPROTO_UDP, MAX_IDS, SOL_IP, SOL_IPV6,
};

/// Map lookups the decision needs, per pod.
pub trait Lookup {
    /// Is `port` listed under `kind` (see [`port_kind`])?
    fn port_listed(&self, kind: u16, port: u16) -> bool;
    /// Does a CIDR of `kind` (see [`cidr_kind`]) contain `addr`?
    fn cidr_contains(&self, kind: u32, addr: &[u8; 16]) -> bool;
}

/// A new outbound connection as the connect hook sees it (TCP, or UDP:
/// a connect, or an unconnected datagram seen by sendmsg).
#[derive(Clone, Copy, Debug)]
pub struct Outbound {
    pub family: u16,
    /// `IPPROTO_TCP`, `IPPROTO_UDP`, or another protocol.
    pub proto: u32,
    /// Destination, network order, v4 in the first 4 bytes.
    pub dst: [u8; 16],
    pub dport: u16,
    /// Bound source address (zero when unbound).
    pub src: [u8; 16],
    pub uid: u32,
    pub gid: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Leave the connection alone.
    Untouched(Reason),
    /// Send it to the outbound capture port (`-p`).
    ToOutbound(Reason),
    /// Send it to the inbound capture port (`-z`).
    ToInbound(Reason),
    /// Send it to the DNS proxy ([`crate::DNS_PROXY_PORT`]).
    ToDns(Reason),
}

impl Verdict {
    pub const fn reason(self) -> Reason {
        match self {
            Verdict::Untouched(r)
            | Verdict::ToOutbound(r)
            | Verdict::ToInbound(r)
            | Verdict::ToDns(r) => r,
        }
    }
}

pub const V4_LOCALHOST: [u8; 4] = [127, 0, 0, 1];
pub const V4_PASSTHROUGH: [u8; 4] = [127, 0, 0, 6];
pub const V6_LOCALHOST: [u8; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
pub const V6_PASSTHROUGH: [u8; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 6];

#[inline(always)]
fn v4(a: &[u8; 16]) -> [u8; 4] {
    [a[0], a[1], a[2], a[3]]
}

/// Is this the family's "localhost" address (127.0.0.1 or ::1)?
#[inline(always)]
pub fn is_localhost(family: u16, a: &[u8; 16]) -> bool {
    if family == AF_INET {
        v4(a) == V4_LOCALHOST
    } else {
        *a == V6_LOCALHOST
    }
}

#[inline(always)]
pub fn is_passthrough_source(family: u16, a: &[u8; 16]) -> bool {
    if family == AF_INET {
        v4(a) == V4_PASSTHROUGH
    } else {
        *a == V6_PASSTHROUGH
    }
}

/// "-o lo": the destination is an address of this netns: 127.0.0.0/8, ::1,
/// or one of the pod's own addresses.
#[inline(always)]
pub fn is_local<L: Lookup>(family: u16, a: &[u8; 16], l: &L) -> bool {
    if family == AF_INET {
        a[0] == 127 || l.cidr_contains(cidr_kind::LOCAL_V4, a)
    } else {
        *a == V6_LOCALHOST || l.cidr_contains(cidr_kind::LOCAL_V6, a)
    }
}

/// Rules (2), (5) and (8)'s host loopback: 127.0.0.1 (or the range of
/// `ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR`), and `::1`.
#[inline(always)]
pub fn is_host_loopback<L: Lookup>(cfg: &PodConfig, family: u16, a: &[u8; 16], l: &L) -> bool {
    if family == AF_INET && cfg.has(flags::LOOPBACK_CIDR) {
        return l.cidr_contains(cidr_kind::LOOPBACK_V4, a);
    }
    is_localhost(family, a)
}

/// Which owner rules: a uid's (2)-(4) or a gid's (5)-(7).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Owner {
    Uid,
    Gid,
}

/// One owner match of the ISTIO_OUTPUT chain: rules (2)-(4) for a uid or
/// (5)-(7) for a gid. `None` means "fall through to the next rule". With
/// DNS capture on, istio-iptables writes them so that port 53 reaches the
/// DNS chain: a uid's rule (2) also skips TCP port 53 (a gid's only the
/// tunnel port), and rules (3)/(6) only return TCP to other ports.
#[inline(always)]
fn owner_rules(
    cfg: &PodConfig,
    c: &Outbound,
    via_lo: bool,
    to_localhost: bool,
    is_owner: bool,
    which: Owner,
) -> Option<Verdict> {
    let dns_on = cfg.has(flags::DNS_CAPTURE);
    let tcp = c.proto == IPPROTO_TCP;
    let dns_skip = dns_on && which == Owner::Uid && c.dport == DNS_PORT;
    if via_lo && !to_localhost && is_owner && tcp && c.dport != cfg.tunnel_port && !dns_skip {
        return Some(Verdict::ToInbound(Reason::OutProxyToSelf));
    }
    let returns_local = !dns_on || (tcp && c.dport != DNS_PORT);
    if via_lo && !is_owner && !cfg.has(flags::OUT_INCLUDE_HAS_LOOPBACK) && returns_local {
        return Some(Verdict::Untouched(Reason::OutAppLocal));
    }
    if is_owner {
        return Some(Verdict::Untouched(match which {
            Owner::Uid => Reason::OutProxyUid,
            Owner::Gid => Reason::OutProxyGid,
        }));
    }
    None
}

impl Outbound {
    /// The destination the kernel really connects to, which is what
    /// iptables' OUTPUT chain sees: the unspecified address means this
    /// host. IPv4 `0.0.0.0` becomes the bound source address, or
    /// 127.0.0.1 when unbound (the route lookup of a connect); IPv6 `::`
    /// becomes `::1` (tcp_v6_connect). Any other destination is itself.
    #[inline(always)]
    pub fn effective_dst(&self) -> [u8; 16] {
        if self.family == AF_INET {
            if v4(&self.dst) != [0; 4] {
                return self.dst;
            }
            if v4(&self.src) != [0; 4] {
                return self.src;
            }
            let mut lo = [0u8; 16];
            lo[..4].copy_from_slice(&V4_LOCALHOST);
            lo
        } else if self.dst == [0u8; 16] {
            V6_LOCALHOST
        } else {
            self.dst
        }
    }
}

/// The OUTPUT decision for a new connection (or, for unconnected UDP, a
/// datagram), first match wins, in istio-iptables' order. Only TCP is
/// captured, and with `--redirect-dns` UDP to port 53. A connect to the
/// unspecified address is decided for the address the kernel sends it to
/// ([`Outbound::effective_dst`]), as iptables sees it: a local one, out
/// through `lo`.
#[inline(always)]
pub fn outbound_verdict<L: Lookup>(cfg: &PodConfig, c: &Outbound, l: &L) -> Verdict {
    let c = &Outbound {
        dst: c.effective_dst(),
        ..*c
    };
    let tcp = c.proto == IPPROTO_TCP;
    let dns = cfg.has(flags::DNS_CAPTURE) && c.dport == DNS_PORT;
    let dns_udp = dns && c.proto == IPPROTO_UDP;
    if !tcp && !dns_udp {
        return Verdict::Untouched(Reason::OutNotTcp);
    }
    // 1. -o ports (istio-iptables returns them for TCP and UDP).
    if l.port_listed(port_kind::OUT_EXCLUDE, c.dport) {
        return Verdict::Untouched(Reason::OutExcludedPort);
    }
    let via_lo = is_local(c.family, &c.dst, l);
    // 2. source 127.0.0.6 / ::6 via lo. An unbound IPv6 socket dialing a
    //    local address gets that address as its source (same-address rule
    //    of source selection), so `[::6]` unbound counts as from ::6. (IPv4
    //    picks 127.0.0.1 for 127/8 and the address itself otherwise: an
    //    unbound socket can never get 127.0.0.6.)
    let src = if c.family == AF_INET6 && via_lo && c.src == [0u8; 16] {
        &c.dst
    } else {
        &c.src
    };
    if via_lo && is_passthrough_source(c.family, src) {
        return Verdict::Untouched(Reason::OutPassthrough);
    }
    let to_localhost = is_host_loopback(cfg, c.family, &c.dst, l);
    // 3. per uid, then per gid (istio-iptables emits the three rules per id,
    //    so with several ids the "! --uid-owner A" rule also catches id B).
    let mut i = 0;
    while i < MAX_IDS {
        if i as u32 >= cfg.uid_count {
            break;
        }
        let owner = c.uid == cfg.uids[i];
        if let Some(v) = owner_rules(cfg, c, via_lo, to_localhost, owner, Owner::Uid) {
            return v;
        }
        i += 1;
    }
    let mut i = 0;
    while i < MAX_IDS {
        if i as u32 >= cfg.gid_count {
            break;
        }
        let owner = c.gid == cfg.gids[i];
        if let Some(v) = owner_rules(cfg, c, via_lo, to_localhost, owner, Owner::Gid) {
            return v;
        }
        i += 1;
    }
    // Owner groups (ISTIO_OUTBOUND_OWNER_GROUPS[_EXCLUDE]): after every
    // uid/gid rule, before the DNS chain, for every protocol.
    if cfg.has(flags::OWNER_GROUPS_ONLY | flags::OWNER_GROUPS_EXCEPT) {
        let listed = l.cidr_contains(cidr_kind::OWNER_GID, &cidr_kind::gid_key(c.gid));
        if cfg.has(flags::OWNER_GROUPS_ONLY) && !listed {
            return Verdict::Untouched(Reason::OutOwnerGroupNotIncluded);
        }
        if cfg.has(flags::OWNER_GROUPS_EXCEPT) && listed {
            return Verdict::Untouched(Reason::OutOwnerGroupExcluded);
        }
    }
    // ISTIO_OUTPUT_DNS: port 53 to a nameserver (any address with
    // capture-all), TCP and UDP. UDP goes no further: the rest of the
    // chain only ever redirects TCP.
    if dns {
        let kind = if c.family == AF_INET {
            cidr_kind::DNS_V4
        } else {
            cidr_kind::DNS_V6
        };
        if cfg.has(flags::DNS_CAPTURE_ALL) || l.cidr_contains(kind, &c.dst) {
            return Verdict::ToDns(if tcp {
                Reason::DnsCapturedTcp
            } else {
                Reason::DnsCapturedUdp
            });
        }
        if !tcp {
            return Verdict::Untouched(Reason::DnsNotNameserver);
        }
    }
    // 4. 127.0.0.1 / ::1.
    if to_localhost {
        return Verdict::Untouched(Reason::OutLoopback);
    }
    let (inc, exc) = if c.family == AF_INET {
        (cidr_kind::INCLUDE_V4, cidr_kind::EXCLUDE_V4)
    } else {
        (cidr_kind::INCLUDE_V6, cidr_kind::EXCLUDE_V6)
    };
    // 5. -x.
    if l.cidr_contains(exc, &c.dst) {
        return Verdict::Untouched(Reason::OutExcludedCidr);
    }
    // 6. -q.
    if l.port_listed(port_kind::OUT_INCLUDE, c.dport) {
        return Verdict::ToOutbound(Reason::OutCapturedPort);
    }
    // 7. -i.
    if cfg.has(flags::OUT_INCLUDE_ALL) || l.cidr_contains(inc, &c.dst) {
        return Verdict::ToOutbound(Reason::OutCaptured);
    }
    Verdict::Untouched(Reason::OutNotIncluded)
}

/// The PREROUTING decision for a new TCP connection arriving from outside
/// the pod on `dport`. Port 22 is not special: istio-iptables stopped
/// sparing ssh with `-b '*'` in Istio 1.13 (Istio's VM setup puts 22 into
/// `-d` instead).
#[inline(always)]
pub fn inbound_verdict<L: Lookup>(cfg: &PodConfig, dport: u16, l: &L) -> Verdict {
    if dport == cfg.tunnel_port {
        return Verdict::Untouched(Reason::InTunnelPort);
    }
    if cfg.has(flags::IN_CAPTURE_ALL) {
        if l.port_listed(port_kind::IN_EXCLUDE, dport) {
            return Verdict::Untouched(Reason::InExcludedPort);
        }
        return Verdict::ToInbound(Reason::InCaptured);
    }
    if cfg.has(flags::IN_CAPTURE_LISTED) && l.port_listed(port_kind::IN_INCLUDE, dport) {
        return Verdict::ToInbound(Reason::InCaptured);
    }
    Verdict::Untouched(Reason::InNotIncluded)
}

/// Family helper for callers that only know v4/v6 as a bool.
pub const fn family(v6: bool) -> u16 {
    if v6 {
        AF_INET6
    } else {
        AF_INET
    }
}

/// The getsockopt level that asks for a connection's original
/// destination: `SOL_IP` (SO_ORIGINAL_DST) for IPv4, v4-mapped included,
/// `SOL_IPV6` (IP6T_SO_ORIGINAL_DST) for IPv6, as with conntrack. A call on
/// the other level can never be answered (conntrack has no entry of that
/// family either). Proxies that try both levels make such a call on every
/// connection: it is no miss, and the getsockopt program neither answers
/// nor counts it.
#[inline(always)]
pub const fn orig_dst_level(family: u16) -> i32 {
    if family == AF_INET6 {
        SOL_IPV6
    } else {
        SOL_IP
    }
}

#[cfg(all(test, feature = "user"))]
mod tests;
