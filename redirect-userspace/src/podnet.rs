//! A pod's interfaces, their addresses and its main routing table, read
//! over rtnetlink (netlink-packet-route) inside its netns (one dump each, in the visit of
//! `podns`), and what capture derives from them:
//! - the entries of the interfaces `-c` and `-k` name (REDIRECT_IFACES):
//!   their index, and for `-k` the address a VM's connections are
//!   redirected to (the interface's own, as REDIRECT takes it);
//! - the route entries (REDIRECT_ROUTES): for each destination prefix of
//!   the main table, the source address the kernel gives a connection
//!   there and whether it leaves through a `-c` interface.
//!
//! iptables matches interfaces by name whenever a packet passes; here the
//! names are resolved to interfaces when the pod is captured, and kept (as
//! name records) so they can be resolved again when interfaces appear (see
//! `docs/design.md`, "Interfaces").

/// The `-c` and `-k` names kept in a pod's name records, in order.
pub fn names(entries: &[(u32, IfaceEntry)]) -> (Vec<String>, Vec<String>) {
    let mut recs: Vec<&(u32, IfaceEntry)> = entries
        .iter()
        .filter(|(i, _)| i & IFACE_NAME != 0)
        .collect();
    recs.sort_by_key(|(i, _)| *i);
    let pick = |flag| {
        recs.iter()
            .filter(|(_, e)| e.has(flag))
            .map(|(_, e)| entry_name(e))
            .collect()
    };
    (pick(iface_flags::EXCLUDE), pick(iface_flags::VIRT))
}

use std::{io, net::IpAddr};

use redirect_common::{iface_flags, route_flags, IfaceEntry, RouteEntry, IFACE_NAME};

use netlink_packet_core::NLM_F_DUMP;
use netlink_packet_route::{
    address::{AddressAttribute, AddressMessage},
    link::{LinkAttribute, LinkMessage},
    route::{RouteAddress, RouteAttribute, RouteMessage, RouteType},
    AddressFamily, RouteNetlinkMessage,
};
use netlink_sys::protocols::NETLINK_ROUTE;

use crate::{
    config::{addr_bytes, Cidr},
    podns::netlink,
};

/// An interface of the pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// ARPHRD_* link type (1: Ethernet).
    pub kind: u16,
}

/// An address of one of its interfaces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Addr {
    pub index: u32,
    pub addr: IpAddr,
    /// IFA_F_* flags.
    pub flags: u32,
    /// RT_SCOPE_* (0: global).
    pub scope: u8,
}

/// A unicast route of the main table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub dst: Cidr,
    /// Output interface (the first next hop's for a multipath route).
    pub oif: Option<u32>,
    /// The route's preferred source (`src` in `ip route`).
    pub prefsrc: Option<IpAddr>,
}

/// What one read found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodNet {
    pub links: Vec<Link>,
    pub addrs: Vec<Addr>,
    pub routes: Vec<Route>,
}

const IFA_F_SECONDARY: u32 = 0x01;
const IFA_F_DADFAILED: u32 = 0x08;
const IFA_F_TENTATIVE: u32 = 0x40;
const ARPHRD_ETHER: u16 = 1;

/// Read the calling thread's netns.
pub fn read() -> io::Result<PodNet> {
    Ok(PodNet {
        links: links()?,
        addrs: addrs()?,
        routes: routes()?,
    })
}

/// Does `pattern` name `name`? As iptables' `-i`/`-o`: a trailing `+`
/// matches every name that starts with what precedes it.
pub fn name_matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_suffix('+') {
        Some(prefix) => name.starts_with(prefix),
        None => pattern == name,
    }
}

fn name_bytes(s: &str) -> [u8; 16] {
    let mut b = [0u8; 16];
    for (d, c) in b.iter_mut().zip(s.bytes().take(15)) {
        *d = c;
    }
    b
}

/// The name in an entry (NUL-padded).
pub fn entry_name(e: &IfaceEntry) -> String {
    let end = e.name.iter().position(|&b| b == 0).unwrap_or(16);
    String::from_utf8_lossy(&e.name[..end]).into_owned()
}

impl PodNet {
    /// The address REDIRECT would take on interface `index` for a
    /// family: IPv4, its first primary address; IPv6, its first usable
    /// address, a global one if it has one.
    pub fn first_addr(&self, index: u32, v6: bool) -> Option<IpAddr> {
        let usable = |a: &&Addr| {
            a.index == index
                && a.addr.is_ipv6() == v6
                && a.flags & (IFA_F_TENTATIVE | IFA_F_DADFAILED) == 0
                && (v6 || a.flags & IFA_F_SECONDARY == 0)
        };
        let mut it = self.addrs.iter().filter(usable);
        if !v6 {
            return it.next().map(|a| a.addr);
        }
        let all: Vec<&Addr> = it.collect();
        all.iter()
            .find(|a| a.scope == 0)
            .or(all.first())
            .map(|a| a.addr)
    }

    /// The REDIRECT_IFACES entries of a pod with these `-c` and `-k`
    /// names: (ifindex, entry) for every interface a name matches (with
    /// its own name), and a name record (`IFACE_NAME` + slot) for every
    /// name as given, matched or not, so the names are known later (to
    /// show the config, and to match interfaces that appear).
    pub fn iface_entries(&self, exclude: &[String], virt: &[String]) -> Vec<(u32, IfaceEntry)> {
        let mut out: Vec<(u32, IfaceEntry)> = Vec::new();
        let mut names: Vec<(String, u32)> = Vec::new();
        for (list, flag) in [(exclude, iface_flags::EXCLUDE), (virt, iface_flags::VIRT)] {
            for pattern in list {
                for l in self.links.iter().filter(|l| name_matches(pattern, &l.name)) {
                    match out.iter_mut().find(|(i, _)| *i == l.index) {
                        Some((_, e)) => e.flags |= flag,
                        None => out.push((l.index, self.entry(l, flag))),
                    }
                }
                match names.iter_mut().find(|(n, _)| n == pattern) {
                    Some((_, f)) => *f |= flag,
                    None => names.push((pattern.clone(), flag)),
                }
            }
        }
        for (slot, (name, flags)) in names.into_iter().enumerate() {
            out.push((
                IFACE_NAME | slot as u32,
                IfaceEntry {
                    name: name_bytes(&name),
                    flags,
                    l2_len: 0,
                    addr4: [0; 16],
                    addr6: [0; 16],
                },
            ));
        }
        out
    }

    fn entry(&self, l: &Link, flags: u32) -> IfaceEntry {
        let mut e = IfaceEntry {
            name: name_bytes(&l.name),
            flags,
            l2_len: if l.kind == ARPHRD_ETHER { 14 } else { 0 },
            addr4: [0; 16],
            addr6: [0; 16],
        };
        if let Some(a) = self.first_addr(l.index, false) {
            e.addr4 = addr_bytes(a);
            e.flags |= iface_flags::HAS_ADDR4;
        }
        if let Some(a) = self.first_addr(l.index, true) {
            e.addr6 = addr_bytes(a);
            e.flags |= iface_flags::HAS_ADDR6;
        }
        e
    }

    /// The REDIRECT_ROUTES entries: every route of the main table with
    /// the source the kernel picks for it (its preferred source, else the
    /// output interface's address as `first_addr` picks it) and whether
    /// its interface is named by `-c`.
    pub fn route_entries(&self, exclude: &[String]) -> Vec<(Cidr, RouteEntry)> {
        let mut out: Vec<(Cidr, RouteEntry)> = Vec::new();
        for r in &self.routes {
            let link = r.oif.and_then(|i| self.links.iter().find(|l| l.index == i));
            let src = r
                .prefsrc
                .or_else(|| r.oif.and_then(|i| self.first_addr(i, r.dst.addr.is_ipv6())));
            let mut flags = 0;
            if src.is_some() {
                flags |= route_flags::HAS_SRC;
            }
            if link.is_some_and(|l| exclude.iter().any(|p| name_matches(p, &l.name))) {
                flags |= route_flags::EXCLUDED_IFACE;
            }
            // One entry per prefix: the first route listed (the kernel's
            // pick among equal prefixes, lowest metric first).
            if out.iter().any(|(c, _)| *c == r.dst) {
                continue;
            }
            out.push((
                r.dst,
                RouteEntry {
                    src: src.map(addr_bytes).unwrap_or([0; 16]),
                    ifindex: r.oif.unwrap_or(0),
                    flags,
                },
            ));
        }
        out
    }
}

/// One rtnetlink dump of `req`, each reply handed to `each`.
fn dump(req: RouteNetlinkMessage, each: impl FnMut(RouteNetlinkMessage)) -> io::Result<()> {
    netlink(NETLINK_ROUTE, req, NLM_F_DUMP, each)
}

fn route_ip(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(a) => Some(IpAddr::V4(*a)),
        RouteAddress::Inet6(a) => Some(IpAddr::V6(*a)),
        _ => None,
    }
}

fn links() -> io::Result<Vec<Link>> {
    let mut out = Vec::new();
    dump(RouteNetlinkMessage::GetLink(LinkMessage::default()), |m| {
        let RouteNetlinkMessage::NewLink(l) = m else {
            return;
        };
        for attr in &l.attributes {
            if let LinkAttribute::IfName(name) = attr {
                out.push(Link {
                    index: l.header.index,
                    name: name.clone(),
                    kind: u16::from(l.header.link_layer_type),
                });
            }
        }
    })
    .map_err(|e| io::Error::new(e.kind(), format!("listing links (RTM_GETLINK): {e}")))?;
    Ok(out)
}

fn addrs() -> io::Result<Vec<Addr>> {
    let mut out = Vec::new();
    dump(
        RouteNetlinkMessage::GetAddress(AddressMessage::default()),
        |m| {
            let RouteNetlinkMessage::NewAddress(a) = m else {
                return;
            };
            let mut flags = u32::from(a.header.flags.bits());
            let (mut local, mut address) = (None, None);
            for attr in &a.attributes {
                match attr {
                    AddressAttribute::Local(ip) => local = Some(*ip),
                    AddressAttribute::Address(ip) => address = Some(*ip),
                    AddressAttribute::Flags(f) => flags = f.bits(),
                    _ => {}
                }
            }
            // IPv4 point-to-point: IFA_LOCAL is ours, IFA_ADDRESS the peer.
            if let Some(addr) = local.or(address) {
                out.push(Addr {
                    index: a.header.index,
                    addr,
                    flags,
                    scope: u8::from(a.header.scope),
                });
            }
        },
    )
    .map_err(|e| io::Error::new(e.kind(), format!("listing addresses (RTM_GETADDR): {e}")))?;
    Ok(out)
}

fn routes() -> io::Result<Vec<Route>> {
    const RT_TABLE_MAIN: u32 = 254;
    let mut out = Vec::new();
    dump(
        RouteNetlinkMessage::GetRoute(RouteMessage::default()),
        |m| {
            let RouteNetlinkMessage::NewRoute(r) = m else {
                return;
            };
            let mut table = u32::from(r.header.table);
            let (mut dst, mut oif, mut first_hop, mut prefsrc) = (None, None, None, None);
            for attr in &r.attributes {
                match attr {
                    RouteAttribute::Destination(a) => dst = route_ip(a),
                    RouteAttribute::Oif(i) => oif = Some(*i),
                    RouteAttribute::PrefSource(a) => prefsrc = route_ip(a),
                    RouteAttribute::Table(t) => table = *t,
                    RouteAttribute::MultiPath(hops) => {
                        first_hop = hops.first().map(|h| h.interface_index)
                    }
                    _ => {}
                }
            }
            if table != RT_TABLE_MAIN || r.header.kind != RouteType::Unicast {
                return;
            }
            let v6 = match r.header.address_family {
                AddressFamily::Inet => false,
                AddressFamily::Inet6 => true,
                _ => return,
            };
            let dst = dst.unwrap_or(if v6 {
                IpAddr::from([0u8; 16])
            } else {
                IpAddr::from([0u8; 4])
            });
            let dst_len = r.header.destination_prefix_length;
            let Ok(dst) = Cidr::parse(&format!("{dst}/{dst_len}")) else {
                return;
            };
            out.push(Route {
                dst,
                // A multipath route: its first next hop's interface.
                oif: oif.or(first_hop),
                prefsrc,
            });
        },
    )
    .map_err(|e| io::Error::new(e.kind(), format!("listing routes (RTM_GETROUTE): {e}")))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net() -> PodNet {
        let addr = |index, a: &str, flags, scope| Addr {
            index,
            addr: a.parse().unwrap(),
            flags,
            scope,
        };
        let route = |d: &str, oif, src: Option<&str>| Route {
            dst: Cidr::parse(d).unwrap(),
            oif,
            prefsrc: src.map(|s| s.parse().unwrap()),
        };
        PodNet {
            links: vec![
                Link {
                    index: 1,
                    name: "lo".into(),
                    kind: 772,
                },
                Link {
                    index: 2,
                    name: "eth0".into(),
                    kind: 1,
                },
                Link {
                    index: 3,
                    name: "net1".into(),
                    kind: 1,
                },
                Link {
                    index: 4,
                    name: "tun0".into(),
                    kind: 65534,
                },
            ],
            addrs: vec![
                addr(1, "127.0.0.1", 0, 254),
                addr(2, "10.1.0.5", 0, 0),
                addr(2, "10.1.0.6", IFA_F_SECONDARY, 0),
                addr(2, "fe80::5", 0, 253),
                addr(2, "fd00::5", 0, 0),
                addr(3, "fd07::9", IFA_F_TENTATIVE, 0),
                addr(3, "fe80::9", 0, 253),
                addr(3, "10.7.0.5", 0, 0),
            ],
            routes: vec![
                route("0.0.0.0/0", Some(2), None),
                route("10.7.0.0/16", Some(3), None),
                route("10.8.0.0/16", Some(3), Some("10.7.0.5")),
                route("10.8.0.0/16", Some(2), None),
                route("::/0", Some(2), None),
                route("10.9.0.0/16", None, None),
            ],
        }
    }

    #[test]
    fn first_addresses_as_redirect_takes_them() {
        let n = net();
        let a = |i, v6| n.first_addr(i, v6).map(|a| a.to_string());
        assert_eq!(a(2, false).as_deref(), Some("10.1.0.5"));
        assert_eq!(a(2, true).as_deref(), Some("fd00::5"));
        // Tentative skipped; no global left: the link-local one.
        assert_eq!(a(3, true).as_deref(), Some("fe80::9"));
        assert_eq!(a(4, false), None);
    }

    #[test]
    fn interface_entries_match_names_and_keep_the_names() {
        let n = net();
        let c: Vec<String> = vec!["net1".into(), "eth+".into(), "k6t-eth0".into()];
        let k: Vec<String> = vec!["net1".into(), "tap0".into(), "k6t-eth0".into()];
        let e = n.iface_entries(&c, &k);
        let k = k.clone();
        let by = |i: u32| e.iter().find(|(x, _)| *x == i).map(|(_, e)| *e).unwrap();
        let net1 = by(3);
        assert_eq!(entry_name(&net1), "net1");
        assert_eq!(
            net1.flags,
            iface_flags::EXCLUDE
                | iface_flags::VIRT
                | iface_flags::HAS_ADDR4
                | iface_flags::HAS_ADDR6
        );
        assert_eq!(net1.l2_len, 14);
        assert_eq!(&net1.addr4[..4], &[10, 7, 0, 5]);
        let eth0 = by(2);
        assert_eq!(
            (entry_name(&eth0).as_str(), eth0.flags & 3),
            ("eth0", iface_flags::EXCLUDE)
        );
        let records: Vec<(String, u32)> = e
            .iter()
            .filter(|(i, _)| i & IFACE_NAME != 0)
            .map(|(_, e)| (entry_name(e), e.flags))
            .collect();
        let both = iface_flags::EXCLUDE | iface_flags::VIRT;
        assert_eq!(
            records,
            vec![
                ("net1".into(), both),
                ("eth+".into(), iface_flags::EXCLUDE),
                ("k6t-eth0".into(), both),
                ("tap0".into(), iface_flags::VIRT),
            ]
        );
        assert_eq!(e.len(), 6);
        // Back as given (a name in both lists keeps its first place).
        let (back_c, mut back_k) = names(&e);
        assert_eq!(back_c, c);
        back_k.sort();
        let mut k = k;
        k.sort();
        assert_eq!(back_k, k);
        let tun = n.iface_entries(&[], &["tun0".into()]);
        assert_eq!(tun[0].1.l2_len, 0);
    }

    #[test]
    fn route_entries_carry_source_and_exclusion() {
        let n = net();
        let r = n.route_entries(&["net1".into()]);
        let get = |c: &str| {
            r.iter()
                .find(|(x, _)| *x == Cidr::parse(c).unwrap())
                .map(|(_, e)| *e)
                .unwrap()
        };
        let d = get("0.0.0.0/0");
        assert_eq!(
            (&d.src[..4], d.flags),
            (&[10, 1, 0, 5][..], route_flags::HAS_SRC)
        );
        let n1 = get("10.7.0.0/16");
        assert_eq!(n1.flags, route_flags::HAS_SRC | route_flags::EXCLUDED_IFACE);
        // The first of two routes to one prefix; its preferred source.
        assert_eq!(&get("10.8.0.0/16").src[..4], &[10, 7, 0, 5]);
        assert_eq!(get("::/0").src, addr_bytes("fd00::5".parse().unwrap()));
        assert_eq!(get("10.9.0.0/16").flags, 0);
        assert_eq!(r.len(), 5);
    }

    #[test]
    fn names_match_as_iptables_does() {
        assert!(name_matches("eth0", "eth0"));
        assert!(!name_matches("eth0", "eth01"));
        assert!(name_matches("eth+", "eth01"));
        assert!(name_matches("+", "anything"));
    }

    #[test]
    fn this_netns_reads() {
        // The test's own netns: at least lo, with 127.0.0.1.
        let n = read().unwrap();
        let lo = n.links.iter().find(|l| l.name == "lo").unwrap();
        assert!(n
            .addrs
            .iter()
            .any(|a| a.index == lo.index && a.addr.to_string() == "127.0.0.1"));
    }
}
