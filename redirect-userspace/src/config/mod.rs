//! istio-iptables flags → a validated pod spec → kernel map entries.
//!
//! The flags keep istio-iptables' letters, long names and defaults, so the
//! args of Istio's injected init container work unchanged. Every flag is a
//! row of [`table::TABLE`]; [`CaptureFlags`] holds the values given for
//! them (command line, environment, JSON config, annotations) and turns
//! them into a [`PodSpec`] (what the kernel maps hold, and the settings not
//! supported yet) and the run's [`RunOptions`].

use std::{fmt, net::IpAddr};

use redirect_common::{cidr_kind, flags, port_kind, PodConfig, MAX_IDS};
use serde::Serialize;

use crate::error::Error;

pub mod parse;
pub mod table;
mod values;

pub use table::{Flag, FlagDef, TABLE};
pub use values::{CaptureFlags, FlagError, Given, Ignored, RunOptions, Source};

/// How a pod's acceleration was asked for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AccelMode {
    /// On where the kernel probe passed (the default).
    #[default]
    Auto,
    /// `--accel`: on whatever the probe says.
    Forced,
    /// `--no-accel`.
    Off,
}

/// A CIDR with its host bits cleared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Cidr {
    pub addr: IpAddr,
    pub len: u8,
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl Cidr {
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let (a, l) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = a
            .parse()
            .map_err(|_| format!("'{a}' is not an IPv4 or IPv6 address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match l {
            None => max,
            Some(l) => match l.parse::<u8>() {
                Ok(n) if n <= max => n,
                _ => return Err(format!("prefix length '/{l}' is not within 0..={max}")),
            },
        };
        Ok(Cidr {
            addr: mask(addr, len),
            len,
        })
    }

    pub fn is_v6(&self) -> bool {
        self.addr.is_ipv6()
    }

    /// A single address (/32 or /128).
    pub fn host(addr: IpAddr) -> Cidr {
        Cidr {
            addr,
            len: if addr.is_ipv4() { 32 } else { 128 },
        }
    }

    /// 127.0.0.1/32: the host loopback istio-iptables' rules name.
    pub fn default_loopback() -> Cidr {
        Cidr {
            addr: IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
            len: 32,
        }
    }
}

fn mask(addr: IpAddr, len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let m = if len == 0 {
                0
            } else {
                u32::MAX << (32 - len as u32)
            };
            IpAddr::V4((u32::from(a) & m).into())
        }
        IpAddr::V6(a) => {
            let m = if len == 0 {
                0
            } else {
                u128::MAX << (128 - len as u32)
            };
            IpAddr::V6((u128::from(a) & m).into())
        }
    }
}

/// 16-byte network-order form used by the kernel maps.
pub fn addr_bytes(a: IpAddr) -> [u8; 16] {
    let mut b = [0u8; 16];
    match a {
        IpAddr::V4(a) => b[..4].copy_from_slice(&a.octets()),
        IpAddr::V6(a) => b = a.octets(),
    }
    b
}

/// Which inbound ports are captured.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum InboundPorts {
    /// `-b '*'`: all but `-d` and the tunnel port.
    All,
    /// `-b p1,p2`.
    Listed(Vec<u16>),
    /// `-b ""`: nothing.
    None,
}

/// A validated pod configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PodSpec {
    pub proxy_port: u16,
    pub inbound_port: u16,
    pub tunnel_port: u16,
    pub proxy_uids: Vec<u32>,
    pub proxy_gids: Vec<u32>,
    pub include_all_outbound: bool,
    /// `-i` names a loopback address: rules (3)/(6) are then left out.
    pub include_has_loopback: bool,
    pub include_cidrs: Vec<Cidr>,
    pub exclude_cidrs: Vec<Cidr>,
    pub include_outbound_ports: Vec<u16>,
    pub exclude_outbound_ports: Vec<u16>,
    pub inbound_ports: InboundPorts,
    pub exclude_inbound_ports: Vec<u16>,
    /// Acceleration in effect for the pod (decided by `register_pod`).
    pub accel: bool,
    /// How it was asked for.
    pub accel_mode: AccelMode,
    /// `--accel-short-conns`: no learning of short-lived ports.
    pub accel_short_conns: bool,
    /// `-c`: interfaces whose traffic is not captured (names; a trailing
    /// `+` matches a prefix, as iptables' `-i`).
    pub exclude_interfaces: Vec<String>,
    /// `-k`: interfaces whose inbound (VM) traffic is treated as outbound.
    pub kube_virt_interfaces: Vec<String>,
    /// `--redirect-dns` / `ISTIO_META_DNS_CAPTURE`: DNS to the DNS proxy.
    pub redirect_dns: bool,
    /// `--capture-all-dns` (with `--redirect-dns` only).
    pub capture_all_dns: bool,
    /// The pod's nameservers for `--redirect-dns` (sorted, IPv4 first,
    /// no duplicates). `None`: not known (DNS to any address is then
    /// captured, as with `--capture-all-dns`); empty: the pod has none
    /// (DNS capture is then off, as istio-iptables does). Unused (None)
    /// without `--redirect-dns` or with `--capture-all-dns`.
    pub dns_servers: Option<Vec<IpAddr>>,
    /// `ISTIO_OUTBOUND_OWNER_GROUPS[_EXCLUDE]`. Captured pods hold numeric
    /// gids only: names are resolved against the pod's /etc/group first
    /// ([`OwnerGroups::resolve`]) or the capture is refused.
    pub outbound_owner_groups: OwnerGroups,
    /// `ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR`: the range rules (2), (5) and (8)
    /// treat as the host loopback (127.0.0.1/32).
    pub ipv4_loopback_cidr: Cidr,
    /// `--dual-stack` / `ISTIO_DUAL_STACK`: IPv6 is captured whenever the
    /// pod has an IPv6 address, not only when its first address is IPv6.
    pub dual_stack: bool,
    /// IPv6 not captured for this pod (decided by `register_pod` from the
    /// pod's addresses, [`crate::ipv6::decide`]; false until then).
    pub ipv6_off: bool,
}

/// What DNS capture does for a pod ([`PodSpec::dns_capture`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DnsCapture {
    /// No `--redirect-dns`.
    Off,
    /// `--redirect-dns`, but the pod has no nameserver and
    /// `--capture-all-dns` is not set: nothing is captured (as
    /// istio-iptables does).
    NoNameservers,
    /// Port 53 to these nameservers.
    Nameservers(Vec<IpAddr>),
    /// Port 53 to any address (`--capture-all-dns`).
    AllAddresses,
    /// Port 53 to any address because the pod's nameservers are not
    /// known where the capture was made.
    AllUnknownNameservers,
}

impl DnsCapture {
    /// Does it send anything to the DNS proxy?
    pub fn captures(&self) -> bool {
        matches!(
            self,
            DnsCapture::Nameservers(_)
                | DnsCapture::AllAddresses
                | DnsCapture::AllUnknownNameservers
        )
    }

    /// In words, for `attach`, `status` and the agent's log.
    pub fn describe(&self) -> String {
        let to = format!("-> 127.0.0.1:{DNS_PROXY_PORT} / [::1]:{DNS_PROXY_PORT}");
        match self {
            DnsCapture::Off => "off".into(),
            DnsCapture::NoNameservers => "off: --redirect-dns, but the pod lists no nameserver and --capture-all-dns is not set (istio-iptables turns DNS capture off then too)".into(),
            DnsCapture::Nameservers(v) => format!(
                "UDP and TCP port 53 to the pod's nameservers {} {to}",
                v.iter().map(IpAddr::to_string).collect::<Vec<_>>().join(", ")
            ),
            DnsCapture::AllAddresses => format!("UDP and TCP port 53 to any address (--capture-all-dns) {to}"),
            DnsCapture::AllUnknownNameservers => format!("UDP and TCP port 53 to any address {to}: the pod's nameservers are not known here (--dns-servers, --dns-resolv-conf or the pod's root name them)"),
        }
    }
}

/// Which groups' outbound connections are captured
/// (`ISTIO_OUTBOUND_OWNER_GROUPS`, `ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OwnerGroups {
    /// Every group (`*`, the default).
    #[default]
    All,
    /// Only these.
    Only(Vec<String>),
    /// All but these.
    AllExcept(Vec<String>),
}

impl OwnerGroups {
    /// The groups listed (empty for `All`).
    pub fn listed(&self) -> &[String] {
        match self {
            OwnerGroups::All => &[],
            OwnerGroups::Only(g) | OwnerGroups::AllExcept(g) => g,
        }
    }

    fn listed_mut(&mut self) -> Option<&mut Vec<String>> {
        match self {
            OwnerGroups::All => None,
            OwnerGroups::Only(g) | OwnerGroups::AllExcept(g) => Some(g),
        }
    }

    /// The listed groups that are names, not numeric gids.
    pub fn names(&self) -> Vec<&str> {
        self.listed()
            .iter()
            .filter(|g| g.parse::<u32>().is_err())
            .map(String::as_str)
            .collect()
    }

    /// The numeric gids listed (names left out).
    pub fn gids(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self
            .listed()
            .iter()
            .filter_map(|g| g.parse().ok())
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Replace group names by their gids, looked up with `gid_of` (the
    /// pod's /etc/group, as iptables resolves `--gid-owner <name>` where
    /// istio-init runs: in the pod). A name it does not know is an error
    /// naming it. Afterwards the list is the sorted numeric gids.
    pub fn resolve(&mut self, gid_of: &dyn Fn(&str) -> Option<u32>) -> Result<(), String> {
        let Some(list) = self.listed_mut() else {
            return Ok(());
        };
        let mut gids = Vec::new();
        for g in list.iter() {
            match g.parse::<u32>() {
                Ok(n) => gids.push(n),
                Err(_) => gids.push(
                    gid_of(g)
                        .ok_or_else(|| format!("group '{g}' is not in the pod's /etc/group"))?,
                ),
            }
        }
        gids.sort_unstable();
        gids.dedup();
        *list = gids.iter().map(u32::to_string).collect();
        Ok(())
    }
}

/// A list port parse, for callers outside the table (the fuzz target):
/// the error names `field`.
pub fn parse_ports(field: &str, s: &str) -> Result<Vec<u16>, Error> {
    parse::ports(s).map_err(|reason| Error::InvalidFlag {
        field: field.to_string(),
        value: s.to_string(),
        reason,
    })
}

/// One port entry of a pod: (kind, port).
pub type PortEntry = (u16, u16);
/// One CIDR entry of a pod: (kind, cidr).
pub type CidrEntry = (u32, Cidr);

impl PodSpec {
    /// Istio's injected defaults: `-p 15001 -z 15006 -u 1337 -m REDIRECT
    /// -i '*' -x "" -b '*' -d 15090,15021,15020`.
    pub fn istio_default() -> PodSpec {
        CaptureFlags::istio_injected()
            .to_spec()
            .expect("built-in defaults are valid")
    }

    /// Every field empty or zero, before the flags fill it.
    pub(crate) fn blank() -> PodSpec {
        PodSpec {
            proxy_port: 0,
            inbound_port: 0,
            tunnel_port: 0,
            proxy_uids: Vec::new(),
            proxy_gids: Vec::new(),
            include_all_outbound: false,
            include_has_loopback: false,
            include_cidrs: Vec::new(),
            exclude_cidrs: Vec::new(),
            include_outbound_ports: Vec::new(),
            exclude_outbound_ports: Vec::new(),
            inbound_ports: InboundPorts::None,
            exclude_inbound_ports: Vec::new(),
            accel: false,
            accel_mode: AccelMode::Auto,
            accel_short_conns: false,
            exclude_interfaces: Vec::new(),
            kube_virt_interfaces: Vec::new(),
            redirect_dns: false,
            capture_all_dns: false,
            dns_servers: None,
            outbound_owner_groups: OwnerGroups::All,
            ipv4_loopback_cidr: Cidr::default_loopback(),
            dual_stack: false,
            ipv6_off: false,
        }
    }

    /// The kernel's per-pod config (netns inode for display).
    pub fn pod_config(&self, netns_inode: u32) -> PodConfig {
        let mut f = 0;
        if self.include_all_outbound {
            f |= flags::OUT_INCLUDE_ALL;
        }
        if self.include_has_loopback {
            f |= flags::OUT_INCLUDE_HAS_LOOPBACK;
        }
        match self.inbound_ports {
            InboundPorts::All => f |= flags::IN_CAPTURE_ALL,
            InboundPorts::Listed(_) => f |= flags::IN_CAPTURE_LISTED,
            InboundPorts::None => {}
        }
        if self.accel {
            f |= flags::ACCEL;
        }
        match self.accel_mode {
            AccelMode::Forced => f |= flags::ACCEL_FORCED,
            AccelMode::Off => f |= flags::ACCEL_OFF,
            AccelMode::Auto => {}
        }
        if self.accel_short_conns {
            f |= flags::ACCEL_SHORT_CONNS;
        }
        if !self.exclude_interfaces.is_empty() {
            f |= flags::OUT_EXCLUDE_IFACES;
        }
        if !self.exclude_interfaces.is_empty() || !self.kube_virt_interfaces.is_empty() {
            f |= flags::IFACES;
        }
        f |= match self.dns_capture() {
            DnsCapture::Off => 0,
            DnsCapture::NoNameservers => flags::DNS_NO_SERVERS,
            DnsCapture::Nameservers(_) => flags::DNS_CAPTURE,
            DnsCapture::AllAddresses => flags::DNS_CAPTURE | flags::DNS_CAPTURE_ALL,
            DnsCapture::AllUnknownNameservers => {
                flags::DNS_CAPTURE | flags::DNS_CAPTURE_ALL | flags::DNS_SERVERS_UNKNOWN
            }
        };
        match self.outbound_owner_groups {
            OwnerGroups::All => {}
            OwnerGroups::Only(_) => f |= flags::OWNER_GROUPS_ONLY,
            OwnerGroups::AllExcept(_) => f |= flags::OWNER_GROUPS_EXCEPT,
        }
        if self.ipv4_loopback_cidr != Cidr::default_loopback() {
            f |= flags::LOOPBACK_CIDR;
        }
        if self.dual_stack {
            f |= flags::DUAL_STACK;
        }
        if self.ipv6_off {
            f |= flags::IPV6_OFF;
        }
        let mut uids = [0; MAX_IDS];
        let mut gids = [0; MAX_IDS];
        uids[..self.proxy_uids.len()].copy_from_slice(&self.proxy_uids);
        gids[..self.proxy_gids.len()].copy_from_slice(&self.proxy_gids);
        PodConfig {
            proxy_port: self.proxy_port,
            inbound_port: self.inbound_port,
            tunnel_port: self.tunnel_port,
            _pad0: 0,
            flags: f,
            uid_count: self.proxy_uids.len() as u32,
            gid_count: self.proxy_gids.len() as u32,
            netns_inode,
            uids,
            gids,
        }
    }

    pub fn port_entries(&self) -> Vec<PortEntry> {
        let mut v = Vec::new();
        v.extend(
            self.exclude_outbound_ports
                .iter()
                .map(|p| (port_kind::OUT_EXCLUDE, *p)),
        );
        v.extend(
            self.include_outbound_ports
                .iter()
                .map(|p| (port_kind::OUT_INCLUDE, *p)),
        );
        if let InboundPorts::Listed(ps) = &self.inbound_ports {
            v.extend(ps.iter().map(|p| (port_kind::IN_INCLUDE, *p)));
        }
        v.extend(
            self.exclude_inbound_ports
                .iter()
                .map(|p| (port_kind::IN_EXCLUDE, *p)),
        );
        v
    }

    pub fn cidr_entries(&self, local_addrs: &[IpAddr]) -> Vec<CidrEntry> {
        let kind = |c: &Cidr, v4, v6| if c.is_v6() { v6 } else { v4 };
        let mut v = Vec::new();
        for c in &self.include_cidrs {
            v.push((kind(c, cidr_kind::INCLUDE_V4, cidr_kind::INCLUDE_V6), *c));
        }
        for c in &self.exclude_cidrs {
            v.push((kind(c, cidr_kind::EXCLUDE_V4, cidr_kind::EXCLUDE_V6), *c));
        }
        for a in local_addrs {
            let c = Cidr::host(*a);
            v.push((kind(&c, cidr_kind::LOCAL_V4, cidr_kind::LOCAL_V6), c));
        }
        if let DnsCapture::Nameservers(servers) = self.dns_capture() {
            for a in servers {
                let c = Cidr::host(a);
                v.push((kind(&c, cidr_kind::DNS_V4, cidr_kind::DNS_V6), c));
            }
        }
        for gid in self.outbound_owner_groups.gids() {
            let k = cidr_kind::gid_key(gid);
            let addr = IpAddr::V4([k[0], k[1], k[2], k[3]].into());
            v.push((cidr_kind::OWNER_GID, Cidr { addr, len: 32 }));
        }
        if self.ipv4_loopback_cidr != Cidr::default_loopback() {
            v.push((cidr_kind::LOOPBACK_V4, self.ipv4_loopback_cidr));
        }
        v
    }

    /// The IPv4 host loopback as `iptables -L -n` prints it (127.0.0.1,
    /// or the range of `ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR`).
    pub fn ipv4_loopback_cidr_shown(&self) -> String {
        if self.ipv4_loopback_cidr == Cidr::default_loopback() {
            "127.0.0.1".into()
        } else {
            self.ipv4_loopback_cidr.to_string()
        }
    }

    /// What DNS capture does for this pod.
    pub fn dns_capture(&self) -> DnsCapture {
        if !self.redirect_dns {
            return DnsCapture::Off;
        }
        if self.capture_all_dns {
            return DnsCapture::AllAddresses;
        }
        match &self.dns_servers {
            None => DnsCapture::AllUnknownNameservers,
            Some(v) if v.is_empty() => DnsCapture::NoNameservers,
            Some(v) => DnsCapture::Nameservers(v.clone()),
        }
    }

    /// Rebuild the spec from what the kernel maps hold.
    pub fn from_kernel(cfg: &PodConfig, ports: &[PortEntry], cidrs: &[CidrEntry]) -> PodSpec {
        let pick = |k: u16| {
            let mut v: Vec<u16> = ports
                .iter()
                .filter(|(kk, _)| *kk == k)
                .map(|(_, p)| *p)
                .collect();
            v.sort_unstable();
            v
        };
        let pickc = |k4: u32, k6: u32| {
            cidrs
                .iter()
                .filter(|(k, _)| *k == k4 || *k == k6)
                .map(|(_, c)| *c)
                .collect::<Vec<_>>()
        };
        let dns_servers = if cfg.has(flags::DNS_CAPTURE) && !cfg.has(flags::DNS_CAPTURE_ALL) {
            let mut v: Vec<IpAddr> = pickc(cidr_kind::DNS_V4, cidr_kind::DNS_V6)
                .iter()
                .map(|c| c.addr)
                .collect();
            v.sort();
            Some(v)
        } else if cfg.has(flags::DNS_NO_SERVERS) {
            Some(Vec::new())
        } else {
            None
        };
        let gids = || {
            let mut g: Vec<u32> = cidrs
                .iter()
                .filter(|(k, _)| *k == cidr_kind::OWNER_GID)
                .filter_map(|(_, c)| match c.addr {
                    IpAddr::V4(a) => Some(u32::from(a)),
                    IpAddr::V6(_) => None,
                })
                .collect();
            g.sort_unstable();
            g.iter().map(u32::to_string).collect::<Vec<_>>()
        };
        let outbound_owner_groups = if cfg.has(flags::OWNER_GROUPS_ONLY) {
            OwnerGroups::Only(gids())
        } else if cfg.has(flags::OWNER_GROUPS_EXCEPT) {
            OwnerGroups::AllExcept(gids())
        } else {
            OwnerGroups::All
        };
        let ipv4_loopback_cidr = if cfg.has(flags::LOOPBACK_CIDR) {
            pickc(cidr_kind::LOOPBACK_V4, cidr_kind::LOOPBACK_V4)
                .first()
                .copied()
                .unwrap_or_else(Cidr::default_loopback)
        } else {
            Cidr::default_loopback()
        };
        let inbound_ports = if cfg.has(flags::IN_CAPTURE_ALL) {
            InboundPorts::All
        } else if cfg.has(flags::IN_CAPTURE_LISTED) {
            InboundPorts::Listed(pick(port_kind::IN_INCLUDE))
        } else {
            InboundPorts::None
        };
        PodSpec {
            proxy_port: cfg.proxy_port,
            inbound_port: cfg.inbound_port,
            tunnel_port: cfg.tunnel_port,
            proxy_uids: cfg.uids[..cfg.uid_count as usize].to_vec(),
            proxy_gids: cfg.gids[..cfg.gid_count as usize].to_vec(),
            include_all_outbound: cfg.has(flags::OUT_INCLUDE_ALL),
            include_has_loopback: cfg.has(flags::OUT_INCLUDE_HAS_LOOPBACK),
            include_cidrs: pickc(cidr_kind::INCLUDE_V4, cidr_kind::INCLUDE_V6),
            exclude_cidrs: pickc(cidr_kind::EXCLUDE_V4, cidr_kind::EXCLUDE_V6),
            include_outbound_ports: pick(port_kind::OUT_INCLUDE),
            exclude_outbound_ports: pick(port_kind::OUT_EXCLUDE),
            inbound_ports,
            exclude_inbound_ports: pick(port_kind::IN_EXCLUDE),
            accel: cfg.has(flags::ACCEL),
            accel_mode: if cfg.has(flags::ACCEL_FORCED) {
                AccelMode::Forced
            } else if cfg.has(flags::ACCEL_OFF) {
                AccelMode::Off
            } else {
                AccelMode::Auto
            },
            accel_short_conns: cfg.has(flags::ACCEL_SHORT_CONNS),
            redirect_dns: cfg.has(flags::DNS_CAPTURE) || cfg.has(flags::DNS_NO_SERVERS),
            capture_all_dns: cfg.has(flags::DNS_CAPTURE_ALL)
                && !cfg.has(flags::DNS_SERVERS_UNKNOWN),
            dns_servers,
            outbound_owner_groups,
            ipv4_loopback_cidr,
            dual_stack: cfg.has(flags::DUAL_STACK),
            ipv6_off: cfg.has(flags::IPV6_OFF),
            ..PodSpec::blank()
        }
    }

    /// The `-c` and `-k` names, from the pod's REDIRECT_IFACES name records
    /// (`from_kernel` has no names: the other maps hold none).
    pub fn with_interfaces(mut self, entries: &[(u32, redirect_common::IfaceEntry)]) -> PodSpec {
        (self.exclude_interfaces, self.kube_virt_interfaces) = crate::podnet::names(entries);
        self
    }

    /// Warnings for configurations that capture nothing in one direction,
    /// or where a flag has no effect (as under istio-iptables).
    pub fn warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        if !self.include_all_outbound
            && self.include_cidrs.is_empty()
            && self.include_outbound_ports.is_empty()
        {
            w.push("no -i or -q given: no outbound connection will be captured (istio-init passes -i '*')".into());
        }
        if self.inbound_ports == InboundPorts::None {
            w.push(
                "no -b given: no inbound connection will be captured (istio-init passes -b '*')"
                    .into(),
            );
        }
        if !self.exclude_inbound_ports.is_empty() && self.inbound_ports != InboundPorts::All {
            w.push("-d has no effect unless -b '*' (as with istio-iptables)".into());
        }
        let both: Vec<String> = self
            .include_outbound_ports
            .iter()
            .filter(|p| self.exclude_outbound_ports.contains(p))
            .map(u16::to_string)
            .collect();
        if !both.is_empty() {
            w.push(format!(
                "port(s) {} in both -q and -o: -o wins, they are not captured (as with istio-iptables)",
                both.join(",")
            ));
        }
        if self.capture_all_dns && !self.redirect_dns {
            w.push("--capture-all-dns has no effect without --redirect-dns".into());
        }
        if self.dns_servers.is_some() && !self.redirect_dns {
            w.push("--dns-servers has no effect without --redirect-dns".into());
        } else if self.dns_servers.is_some() && self.capture_all_dns {
            w.push("--dns-servers has no effect with --capture-all-dns (DNS to any address is captured)".into());
        }
        match self.dns_capture() {
            DnsCapture::NoNameservers | DnsCapture::AllUnknownNameservers => {
                w.push(format!("DNS capture: {}", self.dns_capture().describe()));
            }
            _ => {}
        }
        w
    }

    /// The equivalent istio-iptables arguments (the table's `show`).
    pub fn istio_args(&self) -> String {
        let mut out: Vec<String> = Vec::new();
        for d in &TABLE {
            let v = match d.show {
                table::Show::Always(f) => Some(f(self)),
                table::Show::IfSet(f) => f(self),
                table::Show::Never => None,
            };
            let Some(v) = v else { continue };
            let name = match (d.short, d.long) {
                (Some(c), _) => format!("-{c}"),
                (None, Some(l)) => format!("--{l}"),
                (None, None) => continue,
            };
            out.push(if v.is_empty() {
                name
            } else {
                format!("{name} {v}")
            });
        }
        out.join(" ")
    }

    /// Combinations that cannot work, as (the flag to blame, why). Only
    /// what cannot work under istio-iptables' rules either, or would loop.
    pub(crate) fn coherent(&self) -> Result<(), (Flag, String)> {
        let (p, z, e) = (self.proxy_port, self.inbound_port, self.tunnel_port);
        if z == p {
            return Err((
                Flag::InboundCapturePort,
                format!("it is also the outbound capture port (-p {p}): one listener would get the app's outbound connections and the connections from outside the pod alike, and send the inbound ones back out to the pod (a loop); give -p and -z different ports"),
            ));
        }
        if e == p {
            return Err((
                Flag::InboundTunnelPort,
                format!("it is also the outbound capture port (-p {p}): the tunnel port is never captured, so connections from outside to it would reach the outbound listener as if the app had made them; give -e and -p different ports"),
            ));
        }
        if e == z {
            return Err((
                Flag::InboundTunnelPort,
                format!("it is also the inbound capture port (-z {z}): the tunnel port is never captured, so connections from outside to it would reach the inbound listener without an original destination; give -e and -z different ports"),
            ));
        }
        if self.redirect_dns {
            for (flag, port) in [(Flag::EnvoyPort, p), (Flag::InboundCapturePort, z)] {
                if port == DNS_PROXY_PORT {
                    return Err((
                        flag,
                        format!("with --redirect-dns, port {DNS_PROXY_PORT} is the DNS proxy's: captured DNS and captured TCP connections would reach the same listener"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The settings in effect that capture does not support yet (the
    /// table's `NotYet` rows), with what is missing.
    pub fn unsupported(&self) -> Vec<(&'static FlagDef, &'static str)> {
        TABLE
            .iter()
            .filter_map(|d| match d.status {
                table::Status::NotYet { missing, in_effect } if in_effect(self) => {
                    Some((d, missing))
                }
                _ => None,
            })
            .collect()
    }

    /// The one place capture refuses what is not supported yet: every
    /// attach (CLI, agent, live annotation change) goes through it. Owner
    /// groups given by name must have been resolved against the pod's
    /// /etc/group by then ([`OwnerGroups::resolve`]).
    pub fn check_supported(&self) -> Result<(), Error> {
        if let Some((d, missing)) = self.unsupported().first() {
            return Err(Error::NotSupported {
                flag: d.name(),
                reason: missing.to_string(),
            });
        }
        match self.unresolved_group() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// An owner group given by name that was not resolved to a gid (the
    /// pod's /etc/group was not available): the error that refuses it.
    pub fn unresolved_group(&self) -> Option<Error> {
        let name = self.outbound_owner_groups.names().first()?.to_string();
        let flag = match self.outbound_owner_groups {
            OwnerGroups::AllExcept(_) => Flag::OwnerGroupsExclude,
            _ => Flag::OwnerGroups,
        };
        Some(Error::InvalidFlag {
            field: FlagDef::get(flag).name(),
            value: self.outbound_owner_groups.listed().join(","),
            reason: format!("group '{name}' is a name, and the pod's /etc/group is not known here, so it cannot be turned into a gid (the kernel matches gids): give numeric gids, or let redirect read the pod's root (run it inside the pod as istio-init does, use --netns /proc/<pid>/ns/net, or --pod-root <dir>)"),
        })
    }
}

/// The agent's DNS proxy port (istio-iptables' `--redirect-dns` target).
pub use redirect_common::DNS_PROXY_PORT;

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(f: impl FnOnce(&mut CaptureFlags)) -> Result<PodSpec, Error> {
        let mut c = CaptureFlags::defaults();
        f(&mut c);
        c.to_spec()
    }

    #[test]
    fn defaults_match_istio_iptables() {
        let s = flags(|_| {}).unwrap();
        assert_eq!(
            (s.proxy_port, s.inbound_port, s.tunnel_port),
            (15001, 15006, 15008)
        );
        assert_eq!(s.proxy_uids, vec![1337]);
        assert_eq!(s.proxy_gids, vec![1337]);
        assert_eq!(s.inbound_ports, InboundPorts::None);
        assert!(!s.include_all_outbound);
        assert_eq!(s.warnings().len(), 2);
    }

    #[test]
    fn bad_cidr_names_field_and_value() {
        let e = flags(|c| c.set(Flag::ServiceCidr, "10.0.0.300/33"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("-i/--istio-service-cidr"), "{e}");
        assert!(e.contains("10.0.0.300/33"), "{e}");
        let e = flags(|c| c.set(Flag::ServiceExcludeCidr, "10.0.0.0/33"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/33") && e.contains("-x"), "{e}");
        let e = flags(|c| c.set(Flag::ServiceExcludeCidr, "*"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("only accepted by -i"), "{e}");
    }

    #[test]
    fn bad_ports_and_ids() {
        for (set, field) in [
            (
                Box::new(|c: &mut CaptureFlags| c.set(Flag::EnvoyPort, "0"))
                    as Box<dyn Fn(&mut CaptureFlags)>,
                "-p",
            ),
            (
                Box::new(|c: &mut CaptureFlags| c.set(Flag::InboundCapturePort, "70000")),
                "-z",
            ),
            (
                Box::new(|c: &mut CaptureFlags| c.set(Flag::LocalOutboundPortsExclude, "80,http")),
                "-o",
            ),
            (
                Box::new(|c: &mut CaptureFlags| c.set(Flag::InboundPorts, "80,*")),
                "-b",
            ),
            (
                Box::new(|c: &mut CaptureFlags| c.set(Flag::ProxyUid, "root")),
                "-u",
            ),
            (
                Box::new(|c: &mut CaptureFlags| c.set(Flag::InterceptionMode, "TPROXY")),
                "-m",
            ),
        ] {
            let e = flags(set).unwrap_err().to_string();
            assert!(e.contains(field), "{field}: {e}");
        }
    }

    #[test]
    fn mixed_v4_v6_cidrs_and_loopback_detection() {
        let s = flags(|c| c.set(Flag::ServiceCidr, "10.0.0.1/8, fd00::/8,127.0.0.0/8")).unwrap();
        assert_eq!(s.include_cidrs[0].to_string(), "10.0.0.0/8");
        assert!(s.include_cidrs[1].is_v6());
        assert!(s.include_has_loopback);
        let s = flags(|c| c.set(Flag::ServiceCidr, "*")).unwrap();
        assert!(s.include_all_outbound && !s.include_has_loopback);
        // As istio-iptables: the written address decides, not coverage.
        let s = flags(|c| c.set(Flag::ServiceCidr, "0.0.0.0/0,::/0")).unwrap();
        assert!(!s.include_has_loopback);
        let s = flags(|c| c.set(Flag::ServiceCidr, "::1/128")).unwrap();
        assert!(s.include_has_loopback);
        let e = flags(|c| c.set(Flag::ServiceCidr, "*,10.0.0.0/8"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("whole value"), "{e}");
    }

    #[test]
    fn kernel_round_trip() {
        let s = flags(|c| {
            c.set(Flag::ServiceCidr, "10.0.0.0/8,127.0.0.1/32");
            c.set(Flag::ServiceExcludeCidr, "10.9.0.0/16,fd00::/16");
            c.set(Flag::OutboundPorts, "443");
            c.set(Flag::LocalOutboundPortsExclude, "22");
            c.set(Flag::InboundPorts, "80,8080");
            c.set(Flag::LocalExcludePorts, "15021");
            c.set(Flag::ProxyGid, "1337,2000");
            c.set(Flag::ExcludeInterfaces, "net1,eth+");
            c.set(Flag::KubeVirtInterfaces, "k6t-eth0");
        })
        .unwrap();
        let cfg = s.pod_config(7);
        assert!(cfg.has(flags::OUT_EXCLUDE_IFACES) && cfg.has(flags::IFACES));
        let ifaces = crate::podnet::PodNet::default()
            .iface_entries(&s.exclude_interfaces, &s.kube_virt_interfaces);
        let back = PodSpec::from_kernel(&cfg, &s.port_entries(), &s.cidr_entries(&[]))
            .with_interfaces(&ifaces);
        assert_eq!(back, s);
    }

    #[test]
    fn accel_modes_parse_and_survive_the_kernel_map() {
        for (accel, no_accel, mode, arg) in [
            (false, false, AccelMode::Auto, ""),
            (true, false, AccelMode::Forced, " --accel"),
            (false, true, AccelMode::Off, " --no-accel"),
        ] {
            let mut s = flags(|c| {
                c.set(Flag::Accel, accel.to_string());
                c.set(Flag::NoAccel, no_accel.to_string());
            })
            .unwrap();
            assert_eq!(
                (s.accel_mode, s.accel),
                (mode, false),
                "decided by register_pod, not here"
            );
            assert!(
                s.istio_args().ends_with(&format!("-d ''{arg}")),
                "{}",
                s.istio_args()
            );
            for on in [false, true] {
                s.accel = on;
                let cfg = s.pod_config(1);
                assert_eq!(cfg.has(flags::ACCEL), on, "the programs read only this bit");
                let back = PodSpec::from_kernel(&cfg, &[], &[]);
                assert_eq!((back.accel, back.accel_mode), (on, mode));
            }
        }
    }

    #[test]
    fn dual_stack_and_ipv6_off_survive_the_kernel_map() {
        let mut c = CaptureFlags::defaults();
        c.set(Flag::DualStack, "true");
        let mut s = c.to_spec().unwrap();
        assert!(s.dual_stack && !s.ipv6_off);
        assert!(
            s.istio_args().ends_with("--dual-stack"),
            "{}",
            s.istio_args()
        );
        for off in [false, true] {
            s.ipv6_off = off;
            let cfg = s.pod_config(1);
            assert!(cfg.has(flags::DUAL_STACK));
            assert_eq!(cfg.has(flags::IPV6_OFF), off);
            let back = PodSpec::from_kernel(&cfg, &s.port_entries(), &s.cidr_entries(&[]));
            assert_eq!(back, s);
        }
        // Not given: not shown, no bit.
        let d = CaptureFlags::defaults().to_spec().unwrap();
        assert!(!d.istio_args().contains("dual-stack"));
        assert!(!d.pod_config(1).has(flags::DUAL_STACK));
    }

    #[test]
    fn accel_short_conns_survives_the_kernel_map_and_conflicts_with_no_accel() {
        let s = flags(|c| {
            c.set(Flag::Accel, "true");
            c.set(Flag::AccelShortConns, "true");
        })
        .unwrap();
        assert!(
            s.istio_args().ends_with(" --accel --accel-short-conns"),
            "{}",
            s.istio_args()
        );
        let cfg = s.pod_config(1);
        assert!(cfg.has(flags::ACCEL_SHORT_CONNS));
        assert!(PodSpec::from_kernel(&cfg, &[], &[]).accel_short_conns);
        assert!(!flags(|_| {})
            .unwrap()
            .pod_config(1)
            .has(flags::ACCEL_SHORT_CONNS));
        let e = flags(|c| {
            c.set(Flag::NoAccel, "true");
            c.set(Flag::AccelShortConns, "true");
        })
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("--accel-short-conns") && e.contains("--no-accel"),
            "{e}"
        );
    }

    #[test]
    fn istio_default_args() {
        let s = PodSpec::istio_default();
        assert_eq!(
            s.istio_args(),
            "-p 15001 -z 15006 -e 15008 -u '1337' -g '1337' -m REDIRECT -i '*' -x '' -q '' -o '' -b '*' -d '15020,15021,15090'"
        );
    }
}
