//! The decision logic of istio-iptables' rules (docs/design.md, "The rules
//! being replaced"), shared by the kernel programs and the host tests. The
//! kernel provides map lookups through [`Lookup`].

use crate::{
    cidr_kind, flags, port_kind, route_flags, PodConfig, Reason, RouteEntry, AF_INET, AF_INET6,
    DNS_PORT, IPPROTO_TCP, IPPROTO_UDP, MAX_IDS, SOL_IP, SOL_IPV6,
};

/// Map lookups the decision needs, per pod.
pub trait Lookup {
    /// Is `port` listed under `kind` (see [`port_kind`])?
    fn port_listed(&self, kind: u16, port: u16) -> bool;
    /// Does a CIDR of `kind` (see [`cidr_kind`]) contain `addr`?
    fn cidr_contains(&self, kind: u32, addr: &[u8; 16]) -> bool;
    /// The pod's route to `addr` (longest prefix of its main table, as
    /// read at attach), if it has one.
    fn route(&self, _family: u16, _addr: &[u8; 16]) -> Option<RouteEntry> {
        None
    }
    /// Does the pod's route to `addr` leave through a `-c` interface? (The
    /// kernel answers it without copying the entry out.)
    fn route_excluded(&self, family: u16, addr: &[u8; 16]) -> bool {
        self.route(family, addr)
            .is_some_and(|r| r.has(route_flags::EXCLUDED_IFACE))
    }
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

/// Is `family` IPv6 while the pod's IPv6 is not captured? istio-iptables
/// then writes no ip6tables rules (`EnableIPv6` false: the pod's first
/// usable address is IPv4, or with `--dual-stack` it has no usable IPv6
/// address), so nothing of that family is touched. `family` is the
/// decided one: a v4-mapped address is IPv4.
#[inline(always)]
pub fn ipv6_off(cfg: &PodConfig, family: u16) -> bool {
    family == AF_INET6 && cfg.has(flags::IPV6_OFF)
}

/// Which owner rules: a uid's (2)-(4) or a gid's (5)-(7).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Owner {
    Uid,
    Gid,
}

/// One rule of the nat chains as the decision evaluates it, with the facts
/// it tested. An [`Observer`] is told every step in rule order: the rules
/// that did not match, then the one that decided.
///
/// `dst_local` is "-o lo" (an address of the pod, [`is_local`]),
/// `dst_host_loopback` is 127.0.0.1 / `::1` (or the range of
/// `ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR`, [`is_host_loopback`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Told first, for IPv6 only (a v4-mapped destination is IPv4), in
    /// both chains: are there ip6tables rules at all? `off`: no, the pod's
    /// IPv6 is not captured ([`flags::IPV6_OFF`], [`ipv6_off`]).
    Ipv6 { off: bool },
    // -------------------------------------------------- OUTPUT, in order
    /// `-p tcp` (and, with DNS capture, UDP to port 53): is the connection
    /// considered at all? Decides `OutNotTcp` when not.
    Protocol { tcp: bool, dns_udp: bool },
    /// `-c` (only told when `-c` names interfaces): the pod routes the
    /// destination out of an excluded interface (`OUTPUT -o <iface> -j
    /// RETURN`, ahead of ISTIO_OUTPUT). A local destination goes out of
    /// `lo`, never an excluded interface.
    ExcludedInterface { dst_local: bool, excluded: bool },
    /// `-o`: the destination port is excluded.
    ExcludedPort { listed: bool },
    /// Rule (1): a local destination from 127.0.0.6 / `::6`.
    /// `src_implied`: an unbound IPv6 socket dialing a local address gets
    /// that address as its source, which is what was tested.
    Passthrough {
        dst_local: bool,
        src_passthrough: bool,
        src_implied: bool,
    },
    /// Rules (2)/(5) for one proxy id: the proxy calling a local address
    /// other than the host loopback goes to the inbound port (not on the
    /// tunnel port, and with DNS capture not a uid's port 53; TCP only).
    ToInbound {
        owner: Owner,
        id: u32,
        dst_local: bool,
        dst_host_loopback: bool,
        is_owner: bool,
        tcp: bool,
        tunnel_port: bool,
        dns_port_skipped: bool,
    },
    /// Rules (3)/(6) for one proxy id: anyone else calling a local address
    /// is left alone. `present` is false when `-i` names a loopback range
    /// (istio-iptables then leaves the rule out); `dns_left`: with DNS
    /// capture the rule only returns TCP to ports other than 53.
    AppLocal {
        owner: Owner,
        id: u32,
        dst_local: bool,
        is_owner: bool,
        present: bool,
        dns_left: bool,
    },
    /// Rules (4)/(7) for one proxy id: the proxy's own connections.
    ProxyId {
        owner: Owner,
        id: u32,
        is_owner: bool,
    },
    /// `ISTIO_OUTBOUND_OWNER_GROUPS` (only when it is a list): the
    /// process's gid is listed.
    OwnerGroupsOnly { listed: bool },
    /// `ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE`: the process's gid is listed.
    OwnerGroupsExcept { listed: bool },
    /// ISTIO_OUTPUT_DNS (only told when DNS capture is in effect): port 53
    /// to a nameserver (any address with capture-all).
    Dns {
        port53: bool,
        tcp: bool,
        capture_all: bool,
        nameserver: bool,
    },
    /// Rule (8): the host loopback.
    HostLoopback { dst_host_loopback: bool },
    /// `-x`: the destination is in an excluded CIDR.
    ExcludedCidr { listed: bool },
    /// `-q`: the destination port is always captured.
    IncludedPort { listed: bool },
    /// Rule (9): `-i '*'` or an `-i` CIDR; also the end of the chain
    /// (`OutNotIncluded`) when it does not match.
    Included { all: bool, listed: bool },
    // ---------------------------------------------- PREROUTING, in order
    /// The inbound tunnel port (`-e`).
    InTunnelPort { tunnel_port: bool },
    /// With `-b '*'`: a `-d` port.
    InExcludedPort { listed: bool },
    /// `-b '*'`: everything else is captured.
    InCaptureAll,
    /// `-b p1,p2` (`listed` = the port is one of them); with `-b ""`
    /// (`configured` false) nothing is captured. The end of the chain.
    InIncludedPort { configured: bool, listed: bool },
}

/// Told each rule the decision evaluates, in order, and its outcome:
/// `decided` is the verdict the rule took, `None` when it did not match
/// and the chain goes on. `redirect explain` records them; the kernel
/// passes [`NoObserver`].
pub trait Observer {
    /// False only for [`NoObserver`]: every call to the observer sits in
    /// an `if O::ON` block (and the kernel build compiles them out
    /// altogether, see `tell!`).
    const ON: bool = true;
    fn step(&mut self, step: Step, decided: Option<Verdict>);
}

/// The kernel's observer: nothing is recorded, nothing is built.
pub struct NoObserver;

impl Observer for NoObserver {
    const ON: bool = false;
    #[inline(always)]
    fn step(&mut self, _step: Step, _decided: Option<Verdict>) {}
}

/// Tell the observer a step; `if cond =>` tells it only when `cond`
/// holds. The kernel build (without the `user` feature) compiles every
/// call out: even dead `if O::ON` blocks made LLVM's BPF codegen lay the
/// connect programs out differently (connect4: 780 instructions instead
/// of 871, and seven times the verifier's work), so the kernel's decision
/// is, after macro expansion, the code it was before the observer
/// existed, instruction for instruction.
#[cfg(feature = "user")]
macro_rules! tell {
    ($o:ident: $O:ident, if $cond:expr => $step:expr, $decided:expr) => {
        if $O::ON && $cond {
            $o.step($step, $decided);
        }
    };
    ($o:ident: $O:ident, $step:expr, $decided:expr) => {
        if $O::ON {
            $o.step($step, $decided);
        }
    };
}
#[cfg(not(feature = "user"))]
macro_rules! tell {
    ($o:ident: $O:ident, if $cond:expr => $step:expr, $decided:expr) => {
        let _ = &$o;
    };
    ($o:ident: $O:ident, $step:expr, $decided:expr) => {
        let _ = &$o;
    };
}

/// Tell the observer that `$step` decided `$v`, and return `$v`.
macro_rules! decide {
    ($o:ident: $O:ident, $step:expr, $v:expr) => {{
        let v = $v;
        tell!($o: $O, $step, Some(v));
        v
    }};
}

/// One owner match of the ISTIO_OUTPUT chain: rules (2)-(4) for a uid or
/// (5)-(7) for a gid. `None` means "fall through to the next rule". With
/// DNS capture on, istio-iptables writes them so that port 53 reaches the
/// DNS chain: a uid's rule (2) also skips TCP port 53 (a gid's only the
/// tunnel port), and rules (3)/(6) only return TCP to other ports.
#[allow(clippy::too_many_arguments)]
#[cfg_attr(not(feature = "user"), allow(unused_macros, unused_variables))]
#[inline(always)]
fn owner_rules<O: Observer>(
    cfg: &PodConfig,
    c: &Outbound,
    via_lo: bool,
    to_localhost: bool,
    id: u32,
    is_owner: bool,
    which: Owner,
    o: &mut O,
) -> Option<Verdict> {
    let dns_on = cfg.has(flags::DNS_CAPTURE);
    let tcp = c.proto == IPPROTO_TCP;
    let dns_skip = dns_on && which == Owner::Uid && c.dport == DNS_PORT;
    macro_rules! to_inbound {
        () => {
            Step::ToInbound {
                owner: which,
                id,
                dst_local: via_lo,
                dst_host_loopback: to_localhost,
                is_owner,
                tcp,
                tunnel_port: c.dport == cfg.tunnel_port,
                dns_port_skipped: dns_skip,
            }
        };
    }
    if via_lo && !to_localhost && is_owner && tcp && c.dport != cfg.tunnel_port && !dns_skip {
        let v = Verdict::ToInbound(Reason::OutProxyToSelf);
        return Some(decide!(o: O, to_inbound!(), v));
    }
    tell!(o: O, to_inbound!(), None);
    let returns_local = !dns_on || (tcp && c.dport != DNS_PORT);
    macro_rules! app_local {
        () => {
            Step::AppLocal {
                owner: which,
                id,
                dst_local: via_lo,
                is_owner,
                present: !cfg.has(flags::OUT_INCLUDE_HAS_LOOPBACK),
                dns_left: !returns_local,
            }
        };
    }
    if via_lo && !is_owner && !cfg.has(flags::OUT_INCLUDE_HAS_LOOPBACK) && returns_local {
        let v = Verdict::Untouched(Reason::OutAppLocal);
        return Some(decide!(o: O, app_local!(), v));
    }
    tell!(o: O, app_local!(), None);
    macro_rules! proxy_id {
        () => {
            Step::ProxyId {
                owner: which,
                id,
                is_owner,
            }
        };
    }
    if is_owner {
        let v = Verdict::Untouched(match which {
            Owner::Uid => Reason::OutProxyUid,
            Owner::Gid => Reason::OutProxyGid,
        });
        return Some(decide!(o: O, proxy_id!(), v));
    }
    tell!(o: O, proxy_id!(), None);
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
    outbound_verdict_observed(cfg, c, l, &mut NoObserver)
}

/// [`outbound_verdict`], telling `o` every rule it evaluates. This is the
/// one implementation of the OUTPUT chain: the kernel runs it with
/// [`NoObserver`], `redirect explain` with a recorder.
#[inline(always)]
pub fn outbound_verdict_observed<L: Lookup, O: Observer>(
    cfg: &PodConfig,
    c: &Outbound,
    l: &L,
    o: &mut O,
) -> Verdict {
    // No ip6tables rules at all for a pod whose IPv6 is not captured.
    if ipv6_off(cfg, c.family) {
        return decide!(o: O, Step::Ipv6 { off: true }, Verdict::Untouched(Reason::OutIpv6NotCaptured));
    }
    tell!(o: O, if c.family == AF_INET6 => Step::Ipv6 { off: false }, None);
    let c = &Outbound {
        dst: c.effective_dst(),
        ..*c
    };
    let tcp = c.proto == IPPROTO_TCP;
    let dns = cfg.has(flags::DNS_CAPTURE) && c.dport == DNS_PORT;
    let dns_udp = dns && c.proto == IPPROTO_UDP;
    if !tcp && !dns_udp {
        return decide!(o: O, Step::Protocol { tcp, dns_udp }, Verdict::Untouched(Reason::OutNotTcp));
    }
    tell!(o: O, Step::Protocol { tcp, dns_udp }, None);
    let via_lo = is_local(c.family, &c.dst, l);
    // 0. `-A OUTPUT -o <-c interface> -j RETURN`, ahead of the jump to
    //    ISTIO_OUTPUT (so ahead of the DNS chain too): a destination the
    //    pod routes out of an excluded interface (a local one goes out of
    //    lo). A protocol that is never captured was left alone above,
    //    without the route lookup.
    if !via_lo && cfg.has(flags::OUT_EXCLUDE_IFACES) && l.route_excluded(c.family, &c.dst) {
        return decide!(o: O, Step::ExcludedInterface { dst_local: false, excluded: true }, Verdict::Untouched(Reason::OutExcludedInterface));
    }
    tell!(o: O, if cfg.has(flags::OUT_EXCLUDE_IFACES) => Step::ExcludedInterface { dst_local: via_lo, excluded: false }, None);
    // 1. -o ports (istio-iptables returns them for TCP and UDP).
    if l.port_listed(port_kind::OUT_EXCLUDE, c.dport) {
        return decide!(o: O, Step::ExcludedPort { listed: true }, Verdict::Untouched(Reason::OutExcludedPort));
    }
    tell!(o: O, Step::ExcludedPort { listed: false }, None);
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
        return decide!(o: O, Step::Passthrough {
            dst_local: true,
            src_passthrough: true,
            src_implied: !core::ptr::eq(src, &c.src),
        }, Verdict::Untouched(Reason::OutPassthrough));
    }
    tell!(
        o: O,
        Step::Passthrough {
            dst_local: via_lo,
            src_passthrough: via_lo && is_passthrough_source(c.family, src),
            src_implied: !core::ptr::eq(src, &c.src),
        },
        None
    );
    let to_localhost = is_host_loopback(cfg, c.family, &c.dst, l);
    // 3. per uid, then per gid (istio-iptables emits the three rules per id,
    //    so with several ids the "! --uid-owner A" rule also catches id B).
    let mut i = 0;
    while i < MAX_IDS {
        if i as u32 >= cfg.uid_count {
            break;
        }
        let owner = c.uid == cfg.uids[i];
        let id = cfg.uids[i];
        if let Some(v) = owner_rules(cfg, c, via_lo, to_localhost, id, owner, Owner::Uid, o) {
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
        let id = cfg.gids[i];
        if let Some(v) = owner_rules(cfg, c, via_lo, to_localhost, id, owner, Owner::Gid, o) {
            return v;
        }
        i += 1;
    }
    // Owner groups (ISTIO_OUTBOUND_OWNER_GROUPS[_EXCLUDE]): after every
    // uid/gid rule, before the DNS chain, for every protocol.
    if cfg.has(flags::OWNER_GROUPS_ONLY | flags::OWNER_GROUPS_EXCEPT) {
        let listed = l.cidr_contains(cidr_kind::OWNER_GID, &cidr_kind::gid_key(c.gid));
        if cfg.has(flags::OWNER_GROUPS_ONLY) && !listed {
            return decide!(o: O, Step::OwnerGroupsOnly { listed }, Verdict::Untouched(Reason::OutOwnerGroupNotIncluded));
        }
        tell!(o: O, if cfg.has(flags::OWNER_GROUPS_ONLY) => Step::OwnerGroupsOnly { listed }, None);
        if cfg.has(flags::OWNER_GROUPS_EXCEPT) && listed {
            return decide!(o: O, Step::OwnerGroupsExcept { listed }, Verdict::Untouched(Reason::OutOwnerGroupExcluded));
        }
        tell!(o: O, if cfg.has(flags::OWNER_GROUPS_EXCEPT) => Step::OwnerGroupsExcept { listed }, None);
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
            let v = Verdict::ToDns(if tcp {
                Reason::DnsCapturedTcp
            } else {
                Reason::DnsCapturedUdp
            });
            return decide!(
                o: O,
                Step::Dns {
                    port53: true,
                    tcp,
                    capture_all: cfg.has(flags::DNS_CAPTURE_ALL),
                    nameserver: true,
                },
                v
            );
        }
        if !tcp {
            let v = Verdict::Untouched(Reason::DnsNotNameserver);
            return decide!(o: O, Step::Dns { port53: true, tcp, capture_all: false, nameserver: false }, v);
        }
        tell!(o: O, Step::Dns { port53: true, tcp, capture_all: false, nameserver: false }, None);
    } else {
        tell!(
            o: O,
            if cfg.has(flags::DNS_CAPTURE) => Step::Dns {
                port53: false,
                tcp,
                capture_all: cfg.has(flags::DNS_CAPTURE_ALL),
                nameserver: false,
            },
            None
        );
    }
    // 4. 127.0.0.1 / ::1.
    if to_localhost {
        return decide!(o: O, Step::HostLoopback {
            dst_host_loopback: true,
        }, Verdict::Untouched(Reason::OutLoopback));
    }
    tell!(
        o: O,
        Step::HostLoopback {
            dst_host_loopback: false
        },
        None
    );
    let (inc, exc) = if c.family == AF_INET {
        (cidr_kind::INCLUDE_V4, cidr_kind::EXCLUDE_V4)
    } else {
        (cidr_kind::INCLUDE_V6, cidr_kind::EXCLUDE_V6)
    };
    // 5. -x.
    if l.cidr_contains(exc, &c.dst) {
        return decide!(o: O, Step::ExcludedCidr { listed: true }, Verdict::Untouched(Reason::OutExcludedCidr));
    }
    tell!(o: O, Step::ExcludedCidr { listed: false }, None);
    // 6. -q.
    if l.port_listed(port_kind::OUT_INCLUDE, c.dport) {
        return decide!(o: O, Step::IncludedPort { listed: true }, Verdict::ToOutbound(Reason::OutCapturedPort));
    }
    tell!(o: O, Step::IncludedPort { listed: false }, None);
    // 7. -i.
    if cfg.has(flags::OUT_INCLUDE_ALL) || l.cidr_contains(inc, &c.dst) {
        return decide!(o: O, Step::Included {
            all: cfg.has(flags::OUT_INCLUDE_ALL),
            listed: true,
        }, Verdict::ToOutbound(Reason::OutCaptured));
    }
    let v = Verdict::Untouched(Reason::OutNotIncluded);
    decide!(o: O, Step::Included { all: false, listed: false }, v)
}

/// The source address a connection keeps under iptables when the connect
/// hook redirects it, for an unbound socket: NAT changes the destination
/// after the route to the original one chose the source, so the proxy
/// sees the app's connection come from that source. The connect hook
/// binds it before the rewrite (which would make the kernel pick a
/// loopback source); the sendmsg hook gives it to a DNS datagram.
/// `family`/`dst` are the decided ones (v4-mapped folded to IPv4, the
/// unspecified address made effective).
/// - A destination in 127.0.0.0/8 or `::1` (rule 8 aside: a local
///   resolver such as 127.0.0.53 with DNS capture): none, the rewrite
///   gives the loopback source the kernel would pick anyway (its local
///   table, which the pod's routes as read do not hold, wins over any
///   default route).
/// - Another address of the pod (rules 2/5 to the inbound port always):
///   that address, which the kernel picks as the source of a local
///   connection.
/// - Otherwise (to the outbound port or the DNS proxy): the source of the
///   pod's route to `dst`; none when the pod has no route there (the
///   connection would fail under iptables).
#[inline(always)]
pub fn redirect_source<L: Lookup>(
    v: Verdict,
    family: u16,
    dst: &[u8; 16],
    l: &L,
) -> Option<[u8; 16]> {
    let loopback = if family == AF_INET {
        dst[0] == 127
    } else {
        *dst == V6_LOCALHOST
    };
    let local = match v {
        Verdict::Untouched(_) => return None,
        _ if loopback => return None,
        Verdict::ToInbound(_) => true,
        Verdict::ToOutbound(_) | Verdict::ToDns(_) => is_local(family, dst, l),
    };
    if local {
        return Some(*dst);
    }
    match l.route(family, dst) {
        Some(r) if r.has(route_flags::HAS_SRC) => Some(r.src),
        _ => None,
    }
}

/// The nat PREROUTING rules of a `-k` interface for a TCP connection a VM
/// behind it opens: istio-iptables inserts `-i <iface> -j ISTIO_REDIRECT`
/// (with `-i '*'`) or `-i <iface> -d <cidr> -j ISTIO_REDIRECT` (one per
/// `-i` CIDR), ahead of `-i <iface> -j RETURN`. Neither `-x`, `-o` nor
/// `-q` play a part, and the connection never reaches ISTIO_INBOUND. No
/// rule at all for IPv6 when the pod's IPv6 is not captured.
#[inline(always)]
pub fn virt_verdict<L: Lookup>(cfg: &PodConfig, family: u16, dst: &[u8; 16], l: &L) -> Verdict {
    if ipv6_off(cfg, family) {
        return Verdict::Untouched(Reason::InVirtIpv6NotCaptured);
    }
    let inc = if family == AF_INET {
        cidr_kind::INCLUDE_V4
    } else {
        cidr_kind::INCLUDE_V6
    };
    if cfg.has(flags::OUT_INCLUDE_ALL) || l.cidr_contains(inc, dst) {
        return Verdict::ToOutbound(Reason::InVirtCaptured);
    }
    Verdict::Untouched(Reason::InVirtNotIncluded)
}

/// The PREROUTING decision for a new TCP connection of `family` arriving
/// from outside the pod on `dport`. Port 22 is not special: istio-iptables
/// stopped sparing ssh with `-b '*'` in Istio 1.13 (Istio's VM setup puts
/// 22 into `-d` instead). IPv6 first: no rule at all when the pod's IPv6
/// is not captured ([`ipv6_off`]).
#[inline(always)]
pub fn inbound_verdict<L: Lookup>(cfg: &PodConfig, family: u16, dport: u16, l: &L) -> Verdict {
    inbound_verdict_observed(cfg, family, dport, l, &mut NoObserver)
}

/// [`inbound_verdict`], telling `o` every rule it evaluates (see
/// [`outbound_verdict_observed`]).
#[inline(always)]
pub fn inbound_verdict_observed<L: Lookup, O: Observer>(
    cfg: &PodConfig,
    family: u16,
    dport: u16,
    l: &L,
    o: &mut O,
) -> Verdict {
    if ipv6_off(cfg, family) {
        return decide!(o: O, Step::Ipv6 { off: true }, Verdict::Untouched(Reason::InIpv6NotCaptured));
    }
    tell!(o: O, if family == AF_INET6 => Step::Ipv6 { off: false }, None);
    if dport == cfg.tunnel_port {
        return decide!(o: O, Step::InTunnelPort { tunnel_port: true }, Verdict::Untouched(Reason::InTunnelPort));
    }
    tell!(o: O, Step::InTunnelPort { tunnel_port: false }, None);
    if cfg.has(flags::IN_CAPTURE_ALL) {
        if l.port_listed(port_kind::IN_EXCLUDE, dport) {
            return decide!(o: O, Step::InExcludedPort { listed: true }, Verdict::Untouched(Reason::InExcludedPort));
        }
        tell!(o: O, Step::InExcludedPort { listed: false }, None);
        return decide!(o: O, Step::InCaptureAll, Verdict::ToInbound(Reason::InCaptured));
    }
    if cfg.has(flags::IN_CAPTURE_LISTED) && l.port_listed(port_kind::IN_INCLUDE, dport) {
        return decide!(o: O, Step::InIncludedPort {
            configured: true,
            listed: true,
        }, Verdict::ToInbound(Reason::InCaptured));
    }
    let v = Verdict::Untouched(Reason::InNotIncluded);
    decide!(
        o: O,
        Step::InIncludedPort {
            configured: cfg.has(flags::IN_CAPTURE_LISTED),
            listed: false,
        },
        v
    )
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
