//! istio-iptables flags → a validated pod spec → kernel map entries.
//!
//! The flags keep istio-iptables' letters, long names and defaults, so the
//! args of Istio's injected init container work unchanged.

use std::{fmt, net::IpAddr};

use clap::Args;
use redirect_common::{cidr_kind, flags, port_kind, PodConfig, MAX_IDS};
use serde::Serialize;

use crate::error::Error;

mod capture;
pub use capture::{CaptureConfig, FlagValue};

/// The istio-iptables flags `redirect attach` understands.
#[derive(Args, Debug, Clone, Default)]
pub struct CaptureFlags {
    /// Outbound capture port (Envoy's outbound listener).
    #[arg(
        short = 'p',
        long = "envoy-port",
        visible_alias = "proxy-port",
        default_value = "15001"
    )]
    pub proxy_port: String,
    /// Inbound capture port.
    #[arg(short = 'z', long = "inbound-capture-port", default_value = "15006")]
    pub inbound_port: String,
    /// Inbound tunnel (HBONE) port, never captured.
    #[arg(short = 'e', long = "inbound-tunnel-port", default_value = "15008")]
    pub tunnel_port: String,
    /// Proxy uid(s), comma separated: their traffic is not captured.
    #[arg(short = 'u', long = "proxy-uid", default_value = "1337")]
    pub proxy_uid: String,
    /// Proxy gid(s), comma separated (default: the uid list).
    #[arg(short = 'g', long = "proxy-gid")]
    pub proxy_gid: Option<String>,
    /// Inbound interception mode: REDIRECT (TPROXY is not supported).
    #[arg(
        short = 'm',
        long = "istio-inbound-interception-mode",
        default_value = "REDIRECT"
    )]
    pub mode: String,
    /// Outbound CIDRs to capture, comma separated, `*` for all.
    #[arg(
        short = 'i',
        long = "istio-service-cidr",
        visible_alias = "include-outbound-ip-ranges",
        default_value = ""
    )]
    pub include_cidrs: String,
    /// Outbound CIDRs never captured.
    #[arg(
        short = 'x',
        long = "istio-service-exclude-cidr",
        visible_alias = "exclude-outbound-ip-ranges",
        default_value = ""
    )]
    pub exclude_cidrs: String,
    /// Outbound ports captured even when `-i` does not include the destination.
    #[arg(
        short = 'q',
        long = "istio-include-outbound-ports",
        visible_alias = "include-outbound-ports",
        default_value = ""
    )]
    pub include_out_ports: String,
    /// Outbound ports never captured.
    #[arg(
        short = 'o',
        long = "istio-local-outbound-ports-exclude",
        visible_alias = "exclude-outbound-ports",
        default_value = ""
    )]
    pub exclude_out_ports: String,
    /// Inbound ports to capture, comma separated, `*` for all.
    #[arg(
        short = 'b',
        long = "istio-inbound-ports",
        visible_alias = "include-inbound-ports",
        default_value = ""
    )]
    pub include_in_ports: String,
    /// Inbound ports not captured when `-b '*'`.
    #[arg(
        short = 'd',
        long = "istio-local-exclude-ports",
        visible_alias = "exclude-inbound-ports",
        default_value = ""
    )]
    pub exclude_in_ports: String,
    /// Print the resulting pod config and change nothing.
    #[arg(short = 'n', long = "dry-run")]
    pub dry_run: bool,
    /// Force socket-level (sockops/sk_msg) acceleration between app and
    /// proxy on, even where the kernel probe failed (README,
    /// "Acceleration": the application can then see spurious EAGAIN on
    /// blocking reads, EOF instead of ECONNRESET, and no flow control).
    /// Without --accel/--no-accel, acceleration is on exactly where the
    /// kernel probe passed.
    #[arg(long = "accel", conflicts_with = "no_accel")]
    pub accel: bool,
    /// Acceleration off for this pod (the kernel probe is not run).
    #[arg(long = "no-accel")]
    pub no_accel: bool,
    /// Accelerate short-lived connections too. By default a port whose
    /// last 4 connections lived under 10 ms is left on the normal path
    /// until one of its connections lives longer: setting up and tearing
    /// down sockmap state costs each such connection more than it saves
    /// (README, "Acceleration").
    #[arg(long = "accel-short-conns", conflicts_with = "no_accel")]
    pub accel_short_conns: bool,
}

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
}

fn bad(field: &'static str, value: &str, why: impl Into<String>) -> Error {
    Error::InvalidFlag {
        field,
        value: value.to_string(),
        reason: why.into(),
    }
}

fn parse_port(field: &'static str, whole: &str, s: &str) -> Result<u16, Error> {
    match s.trim().parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(bad(
            field,
            whole,
            format!("'{s}' is not a port number (1-65535)"),
        )),
    }
}

/// A port list, sorted and deduplicated (the kernel keeps a set).
pub(crate) fn parse_ports(field: &'static str, s: &str) -> Result<Vec<u16>, Error> {
    let mut out = Vec::new();
    for p in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if p == "*" {
            return Err(bad(field, s, "'*' is only accepted by -b"));
        }
        out.push(parse_port(field, s, p)?);
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

fn parse_ids(field: &'static str, s: &str) -> Result<Vec<u32>, Error> {
    let mut out = Vec::new();
    for id in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let v = id
            .parse::<u32>()
            .map_err(|_| bad(field, s, format!("'{id}' is not a numeric id")))?;
        if !out.contains(&v) {
            out.push(v);
        }
    }
    if out.len() > MAX_IDS {
        return Err(bad(
            field,
            s,
            format!("at most {MAX_IDS} ids are supported"),
        ));
    }
    Ok(out)
}

/// A parsed CIDR list flag.
struct CidrList {
    /// The value was exactly `*`.
    all: bool,
    cidrs: Vec<Cidr>,
    /// Some entry's address, as written, is a loopback address (what
    /// istio-iptables checks: `127.0.0.1/0` counts, `0.0.0.0/0` does not).
    names_loopback: bool,
}

fn parse_cidrs(field: &'static str, s: &str, star_ok: bool) -> Result<CidrList, Error> {
    let mut list = CidrList {
        all: false,
        cidrs: Vec::new(),
        names_loopback: false,
    };
    if s.trim() == "*" {
        if !star_ok {
            return Err(bad(field, s, "'*' is only accepted by -i"));
        }
        list.all = true;
        return Ok(list);
    }
    for c in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if c == "*" {
            let why = if star_ok {
                "'*' must be the whole value (it means every destination)"
            } else {
                "'*' is only accepted by -i"
            };
            return Err(bad(field, s, why));
        }
        let cidr =
            Cidr::parse(c).map_err(|why| bad(field, s, format!("invalid CIDR '{c}': {why}")))?;
        let written: Option<IpAddr> = c.split('/').next().and_then(|a| a.parse().ok());
        list.names_loopback |= written.is_some_and(|a| a.is_loopback());
        if !list.cidrs.contains(&cidr) {
            list.cidrs.push(cidr);
        }
    }
    Ok(list)
}

impl CaptureFlags {
    /// Validate every flag; the first bad one is reported by name and value.
    pub fn to_spec(&self) -> Result<PodSpec, Error> {
        // clap refuses the pair on the command line; the agent's capture
        // config comes here without clap.
        if self.accel_short_conns && self.no_accel {
            return Err(bad(
                "--accel-short-conns",
                "true",
                "conflicts with --no-accel (acceleration off): drop one of them",
            ));
        }
        match self.mode.as_str() {
            "REDIRECT" => {}
            "TPROXY" => {
                return Err(bad(
                    "-m/--istio-inbound-interception-mode",
                    &self.mode,
                    "TPROXY is not supported: redirect replaces istio-init's REDIRECT mode (use -m REDIRECT, Istio's default)",
                ))
            }
            _ => return Err(bad("-m/--istio-inbound-interception-mode", &self.mode, "expected REDIRECT")),
        }
        let proxy_port = parse_port("-p/--envoy-port", &self.proxy_port, &self.proxy_port)?;
        let inbound_port = parse_port(
            "-z/--inbound-capture-port",
            &self.inbound_port,
            &self.inbound_port,
        )?;
        let tunnel_port = parse_port(
            "-e/--inbound-tunnel-port",
            &self.tunnel_port,
            &self.tunnel_port,
        )?;
        let proxy_uids = parse_ids("-u/--proxy-uid", &self.proxy_uid)?;
        let proxy_gids = match &self.proxy_gid {
            Some(g) => parse_ids("-g/--proxy-gid", g)?,
            None => proxy_uids.clone(),
        };
        if proxy_uids.is_empty() && proxy_gids.is_empty() {
            return Err(bad(
                "-u/--proxy-uid",
                &self.proxy_uid,
                "no proxy uid or gid given: the proxy's own traffic would loop back into it",
            ));
        }
        let include = parse_cidrs("-i/--istio-service-cidr", &self.include_cidrs, true)?;
        let exclude_cidrs = parse_cidrs(
            "-x/--istio-service-exclude-cidr",
            &self.exclude_cidrs,
            false,
        )?
        .cidrs;
        let include_outbound_ports =
            parse_ports("-q/--istio-include-outbound-ports", &self.include_out_ports)?;
        let exclude_outbound_ports = parse_ports(
            "-o/--istio-local-outbound-ports-exclude",
            &self.exclude_out_ports,
        )?;
        let inbound_ports = match self.include_in_ports.trim() {
            "*" => InboundPorts::All,
            "" => InboundPorts::None,
            s => InboundPorts::Listed(parse_ports("-b/--istio-inbound-ports", s)?),
        };
        let exclude_inbound_ports =
            parse_ports("-d/--istio-local-exclude-ports", &self.exclude_in_ports)?;
        Ok(PodSpec {
            proxy_port,
            inbound_port,
            tunnel_port,
            proxy_uids,
            proxy_gids,
            include_all_outbound: include.all,
            include_has_loopback: include.names_loopback,
            include_cidrs: include.cidrs,
            exclude_cidrs,
            include_outbound_ports,
            exclude_outbound_ports,
            inbound_ports,
            exclude_inbound_ports,
            accel: false,
            accel_mode: match (self.accel, self.no_accel) {
                (true, _) => AccelMode::Forced,
                (false, true) => AccelMode::Off,
                (false, false) => AccelMode::Auto,
            },
            accel_short_conns: self.accel_short_conns,
        })
    }
}

/// One port entry of a pod: (kind, port).
pub type PortEntry = (u16, u16);
/// One CIDR entry of a pod: (kind, cidr).
pub type CidrEntry = (u32, Cidr);

impl PodSpec {
    /// Istio's injected defaults: `-p 15001 -z 15006 -u 1337 -m REDIRECT
    /// -i '*' -x "" -b '*' -d 15090,15021,15020`.
    pub fn istio_default() -> PodSpec {
        CaptureFlags {
            include_cidrs: "*".into(),
            include_in_ports: "*".into(),
            exclude_in_ports: "15090,15021,15020".into(),
            ..CaptureFlags::defaults()
        }
        .to_spec()
        .expect("built-in defaults are valid")
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
            let c = Cidr {
                addr: *a,
                len: if a.is_ipv4() { 32 } else { 128 },
            };
            v.push((kind(&c, cidr_kind::LOCAL_V4, cidr_kind::LOCAL_V6), c));
        }
        v
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
        }
    }

    /// Warnings for configurations that capture nothing in one direction.
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
        w
    }

    /// The equivalent istio-iptables arguments.
    pub fn istio_args(&self) -> String {
        let join = |v: &[u16]| v.iter().map(u16::to_string).collect::<Vec<_>>().join(",");
        let ids = |v: &[u32]| v.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
        let cidrs = |v: &[Cidr]| v.iter().map(Cidr::to_string).collect::<Vec<_>>().join(",");
        let include = if self.include_all_outbound {
            "*".to_string()
        } else {
            cidrs(&self.include_cidrs)
        };
        let inbound = match &self.inbound_ports {
            InboundPorts::All => "*".to_string(),
            InboundPorts::Listed(p) => join(p),
            InboundPorts::None => String::new(),
        };
        format!(
            "-p {} -z {} -e {} -u '{}' -g '{}' -m REDIRECT -i '{}' -x '{}' -q '{}' -o '{}' -b '{}' -d '{}'{}{}",
            self.proxy_port,
            self.inbound_port,
            self.tunnel_port,
            ids(&self.proxy_uids),
            ids(&self.proxy_gids),
            include,
            cidrs(&self.exclude_cidrs),
            join(&self.include_outbound_ports),
            join(&self.exclude_outbound_ports),
            inbound,
            join(&self.exclude_inbound_ports),
            match self.accel_mode {
                AccelMode::Forced => " --accel",
                AccelMode::Off => " --no-accel",
                AccelMode::Auto => "",
            },
            if self.accel_short_conns { " --accel-short-conns" } else { "" },
        )
    }
}

impl CaptureFlags {
    /// The flag defaults, as clap would fill them.
    pub fn defaults() -> CaptureFlags {
        CaptureFlags {
            proxy_port: "15001".into(),
            inbound_port: "15006".into(),
            tunnel_port: "15008".into(),
            proxy_uid: "1337".into(),
            proxy_gid: None,
            mode: "REDIRECT".into(),
            ..CaptureFlags::default()
        }
    }
}

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
        let e = flags(|c| c.include_cidrs = "10.0.0.300/33".into())
            .unwrap_err()
            .to_string();
        assert!(e.contains("-i/--istio-service-cidr"), "{e}");
        assert!(e.contains("10.0.0.300/33"), "{e}");
        let e = flags(|c| c.exclude_cidrs = "10.0.0.0/33".into())
            .unwrap_err()
            .to_string();
        assert!(e.contains("/33") && e.contains("-x"), "{e}");
        let e = flags(|c| c.exclude_cidrs = "*".into())
            .unwrap_err()
            .to_string();
        assert!(e.contains("only accepted by -i"), "{e}");
    }

    #[test]
    fn bad_ports_and_ids() {
        for (set, field) in [
            (
                Box::new(|c: &mut CaptureFlags| c.proxy_port = "0".into())
                    as Box<dyn Fn(&mut CaptureFlags)>,
                "-p",
            ),
            (
                Box::new(|c: &mut CaptureFlags| c.inbound_port = "70000".into()),
                "-z",
            ),
            (
                Box::new(|c: &mut CaptureFlags| c.exclude_out_ports = "80,http".into()),
                "-o",
            ),
            (
                Box::new(|c: &mut CaptureFlags| c.include_in_ports = "80,*".into()),
                "-b",
            ),
            (
                Box::new(|c: &mut CaptureFlags| c.proxy_uid = "root".into()),
                "-u",
            ),
            (
                Box::new(|c: &mut CaptureFlags| c.mode = "TPROXY".into()),
                "-m",
            ),
        ] {
            let e = flags(set).unwrap_err().to_string();
            assert!(e.contains(field), "{field}: {e}");
        }
    }

    #[test]
    fn mixed_v4_v6_cidrs_and_loopback_detection() {
        let s = flags(|c| c.include_cidrs = "10.0.0.1/8, fd00::/8,127.0.0.0/8".into()).unwrap();
        assert_eq!(s.include_cidrs[0].to_string(), "10.0.0.0/8");
        assert!(s.include_cidrs[1].is_v6());
        assert!(s.include_has_loopback);
        let s = flags(|c| c.include_cidrs = "*".into()).unwrap();
        assert!(s.include_all_outbound && !s.include_has_loopback);
        // As istio-iptables: the written address decides, not coverage.
        let s = flags(|c| c.include_cidrs = "0.0.0.0/0,::/0".into()).unwrap();
        assert!(!s.include_has_loopback);
        let s = flags(|c| c.include_cidrs = "::1/128".into()).unwrap();
        assert!(s.include_has_loopback);
        let e = flags(|c| c.include_cidrs = "*,10.0.0.0/8".into())
            .unwrap_err()
            .to_string();
        assert!(e.contains("whole value"), "{e}");
    }

    #[test]
    fn kernel_round_trip() {
        let s = flags(|c| {
            c.include_cidrs = "10.0.0.0/8,127.0.0.1/32".into();
            c.exclude_cidrs = "10.9.0.0/16,fd00::/16".into();
            c.include_out_ports = "443".into();
            c.exclude_out_ports = "22".into();
            c.include_in_ports = "80,8080".into();
            c.exclude_in_ports = "15021".into();
            c.proxy_gid = Some("1337,2000".into());
        })
        .unwrap();
        let back = PodSpec::from_kernel(&s.pod_config(7), &s.port_entries(), &s.cidr_entries(&[]));
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
                c.accel = accel;
                c.no_accel = no_accel;
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
    fn accel_short_conns_survives_the_kernel_map_and_conflicts_with_no_accel() {
        let s = flags(|c| {
            c.accel = true;
            c.accel_short_conns = true;
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
            c.no_accel = true;
            c.accel_short_conns = true;
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
