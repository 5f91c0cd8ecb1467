//! The iptables rules istio-iptables installs for a configuration, as the
//! `iptables-restore` / `ip6tables-restore` input it feeds the kernel.
//!
//! This is the reference side of the differential test (and the nat table
//! of the benchmark's iptables configuration): a pod netns gets exactly the
//! rules Istio's init container would write, in istio-iptables' order,
//! and behaves as an Istio pod does. Written from istio-iptables'
//! documented behaviour (`tools/istio-iptables/pkg/capture/run.go` and its
//! rule builder, REDIRECT mode) and checked, rule by rule and line by line,
//! against the listings Istio publishes for its own test configurations
//! (`istio_rules/tests.rs`).
//!
//! Pure: no command is run. [`IstioConfig::parse`] reads the arguments and
//! environment as istio-iptables does; [`Host`] holds what istio-iptables
//! learns from the pod (whether IPv6 is on, the nameservers);
//! [`IstioRules::build`] lays the rules out; [`IstioRules::restore`] prints
//! them.
//!
//! Not modelled: `-m TPROXY` (redirect refuses it; [`RulesError::Tproxy`]).

use std::{fmt, net::IpAddr};

/// The agent's DNS proxy port (`--redirect-dns` sends port 53 there).
pub const DNS_PROXY_PORT: &str = "15053";

/// istio-iptables' configuration once flags and environment are read, in
/// its own terms: values are kept as written, because istio-iptables puts
/// them into the rules verbatim.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IstioConfig {
    pub proxy_port: String,
    pub inbound_capture_port: String,
    pub inbound_tunnel_port: String,
    /// `-u`; empty means "the uid of ENVOY_USER, else 1337" ([`Host`]).
    pub proxy_uid: String,
    /// `-g`; empty means "the `-u` list".
    pub proxy_gid: String,
    pub interception_mode: String,
    pub inbound_ports_include: String,
    pub inbound_ports_exclude: String,
    pub outbound_ports_include: String,
    pub outbound_ports_exclude: String,
    pub outbound_ip_ranges_include: String,
    pub outbound_ip_ranges_exclude: String,
    pub exclude_interfaces: String,
    pub kube_virt_interfaces: String,
    pub redirect_dns: bool,
    pub capture_all_dns: bool,
    pub drop_invalid: bool,
    pub dual_stack: bool,
    pub dry_run: bool,
    /// `ISTIO_OUTBOUND_OWNER_GROUPS` (environment only).
    pub owner_groups_include: String,
    /// `ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE` (environment only).
    pub owner_groups_exclude: String,
    /// `ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR` (environment only).
    pub host_ipv4_loopback_cidr: String,
}

impl Default for IstioConfig {
    /// istio-iptables' defaults (no flag, no environment).
    fn default() -> IstioConfig {
        IstioConfig {
            proxy_port: "15001".into(),
            inbound_capture_port: "15006".into(),
            inbound_tunnel_port: "15008".into(),
            proxy_uid: String::new(),
            proxy_gid: String::new(),
            interception_mode: String::new(),
            inbound_ports_include: String::new(),
            inbound_ports_exclude: String::new(),
            outbound_ports_include: String::new(),
            outbound_ports_exclude: String::new(),
            outbound_ip_ranges_include: String::new(),
            outbound_ip_ranges_exclude: String::new(),
            exclude_interfaces: String::new(),
            kube_virt_interfaces: String::new(),
            redirect_dns: false,
            capture_all_dns: false,
            drop_invalid: false,
            dual_stack: false,
            dry_run: false,
            owner_groups_include: "*".into(),
            owner_groups_exclude: String::new(),
            host_ipv4_loopback_cidr: "127.0.0.1/32".into(),
        }
    }
}

/// Why a configuration has no rules.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RulesError {
    /// An argument istio-iptables does not know.
    UnknownFlag(String),
    /// A flag that takes a value came last.
    MissingValue(String),
    /// A boolean flag with a value that is not a Go boolean.
    BadBool { flag: String, value: String },
    /// A CIDR list entry `netip.ParsePrefix` refuses (istio-iptables fails).
    BadCidr { flag: &'static str, value: String },
    /// `-x '*'` (istio-iptables: "invalid value for OUTBOUND_IP_RANGES_EXCLUDE").
    ExcludeWildcard,
    /// `-m TPROXY`: not modelled here.
    Tproxy,
}

impl fmt::Display for RulesError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RulesError::UnknownFlag(a) => write!(f, "istio-iptables has no flag {a:?}"),
            RulesError::MissingValue(a) => write!(f, "flag {a} needs a value"),
            RulesError::BadBool { flag, value } => {
                write!(f, "{flag}: {value:?} is not a boolean")
            }
            RulesError::BadCidr { flag, value } => {
                write!(f, "{flag}: {value:?} is not a CIDR (address/length)")
            }
            RulesError::ExcludeWildcard => {
                write!(f, "-x: invalid value for OUTBOUND_IP_RANGES_EXCLUDE ('*')")
            }
            RulesError::Tproxy => write!(f, "-m TPROXY is not modelled"),
        }
    }
}

impl std::error::Error for RulesError {}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Str,
    Bool,
    /// A value istio-iptables parses but that plays no part in the rules.
    Ignored,
    /// A boolean that plays no part in the rules.
    IgnoredBool,
}

/// One flag of istio-iptables' command line (root.go): long name, letter,
/// whether its environment variable is bound (long name upper-cased, `-`
/// turned into `_`), the extra variable Istio binds after it, and where it
/// goes.
struct Flag {
    long: &'static str,
    short: Option<char>,
    kind: Kind,
    env: bool,
    extra_env: Option<&'static str>,
    set: fn(&mut IstioConfig, String, bool),
}

macro_rules! s {
    ($f:ident) => {
        |c: &mut IstioConfig, v: String, _: bool| c.$f = v
    };
}
macro_rules! b {
    ($f:ident) => {
        |c: &mut IstioConfig, _: String, v: bool| c.$f = v
    };
}

fn ignore(_: &mut IstioConfig, _: String, _: bool) {}

/// In istio-iptables' bind order: environment variables are applied in
/// this order, then the extra names, then the command line.
#[rustfmt::skip]
const FLAGS: &[Flag] = &[
    Flag { long: "envoy-port", short: Some('p'), kind: Kind::Str, env: false, extra_env: None, set: s!(proxy_port) },
    Flag { long: "inbound-capture-port", short: Some('z'), kind: Kind::Str, env: true, extra_env: None, set: s!(inbound_capture_port) },
    Flag { long: "inbound-tunnel-port", short: Some('e'), kind: Kind::Str, env: true, extra_env: None, set: s!(inbound_tunnel_port) },
    Flag { long: "proxy-uid", short: Some('u'), kind: Kind::Str, env: true, extra_env: None, set: s!(proxy_uid) },
    Flag { long: "proxy-gid", short: Some('g'), kind: Kind::Str, env: true, extra_env: None, set: s!(proxy_gid) },
    Flag { long: "istio-inbound-interception-mode", short: Some('m'), kind: Kind::Str, env: true, extra_env: None, set: s!(interception_mode) },
    Flag { long: "istio-inbound-ports", short: Some('b'), kind: Kind::Str, env: true, extra_env: None, set: s!(inbound_ports_include) },
    Flag { long: "istio-local-exclude-ports", short: Some('d'), kind: Kind::Str, env: true, extra_env: None, set: s!(inbound_ports_exclude) },
    Flag { long: "istio-exclude-interfaces", short: Some('c'), kind: Kind::Str, env: true, extra_env: None, set: s!(exclude_interfaces) },
    Flag { long: "istio-service-cidr", short: Some('i'), kind: Kind::Str, env: true, extra_env: None, set: s!(outbound_ip_ranges_include) },
    Flag { long: "istio-service-exclude-cidr", short: Some('x'), kind: Kind::Str, env: true, extra_env: None, set: s!(outbound_ip_ranges_exclude) },
    Flag { long: "istio-outbound-ports", short: Some('q'), kind: Kind::Str, env: true, extra_env: None, set: s!(outbound_ports_include) },
    Flag { long: "istio-local-outbound-ports-exclude", short: Some('o'), kind: Kind::Str, env: true, extra_env: None, set: s!(outbound_ports_exclude) },
    Flag { long: "kube-virt-interfaces", short: Some('k'), kind: Kind::Str, env: true, extra_env: None, set: s!(kube_virt_interfaces) },
    Flag { long: "istio-inbound-tproxy-mark", short: Some('t'), kind: Kind::Ignored, env: true, extra_env: None, set: ignore },
    Flag { long: "istio-inbound-tproxy-route-table", short: Some('r'), kind: Kind::Ignored, env: true, extra_env: None, set: ignore },
    Flag { long: "dry-run", short: Some('n'), kind: Kind::Bool, env: true, extra_env: None, set: b!(dry_run) },
    Flag { long: "iptables-probe-port", short: None, kind: Kind::Ignored, env: true, extra_env: None, set: ignore },
    Flag { long: "probe-timeout", short: None, kind: Kind::Ignored, env: true, extra_env: None, set: ignore },
    Flag { long: "skip-rule-apply", short: None, kind: Kind::IgnoredBool, env: true, extra_env: None, set: ignore },
    Flag { long: "run-validation", short: None, kind: Kind::IgnoredBool, env: true, extra_env: None, set: ignore },
    Flag { long: "redirect-dns", short: None, kind: Kind::Bool, env: true, extra_env: Some("ISTIO_META_DNS_CAPTURE"), set: b!(redirect_dns) },
    Flag { long: "drop-invalid", short: None, kind: Kind::Bool, env: true, extra_env: Some("INVALID_DROP"), set: b!(drop_invalid) },
    Flag { long: "dual-stack", short: None, kind: Kind::Bool, env: true, extra_env: Some("ISTIO_DUAL_STACK"), set: b!(dual_stack) },
    Flag { long: "capture-all-dns", short: None, kind: Kind::Bool, env: true, extra_env: None, set: b!(capture_all_dns) },
    Flag { long: "network-namespace", short: None, kind: Kind::Ignored, env: true, extra_env: None, set: ignore },
    Flag { long: "cni-mode", short: None, kind: Kind::IgnoredBool, env: true, extra_env: None, set: ignore },
    Flag { long: "reconcile", short: None, kind: Kind::IgnoredBool, env: true, extra_env: None, set: ignore },
    Flag { long: "cleanup-only", short: None, kind: Kind::IgnoredBool, env: true, extra_env: None, set: ignore },
    Flag { long: "force-apply", short: None, kind: Kind::IgnoredBool, env: true, extra_env: None, set: ignore },
    Flag { long: "native-nftables", short: None, kind: Kind::IgnoredBool, env: true, extra_env: None, set: ignore },
    Flag { long: "force-iptables-binary", short: None, kind: Kind::Ignored, env: true, extra_env: None, set: ignore },
    // Istio's logging options.
    Flag { long: "log_as_json", short: None, kind: Kind::IgnoredBool, env: false, extra_env: None, set: ignore },
    Flag { long: "log_output_level", short: None, kind: Kind::Ignored, env: false, extra_env: None, set: ignore },
    Flag { long: "log_target", short: None, kind: Kind::Ignored, env: false, extra_env: None, set: ignore },
    Flag { long: "log_stacktrace_level", short: None, kind: Kind::Ignored, env: false, extra_env: None, set: ignore },
    Flag { long: "log_caller", short: None, kind: Kind::Ignored, env: false, extra_env: None, set: ignore },
];

/// The environment variables that have no flag (istio-iptables reads them
/// with Istio's `env.Register`).
pub const ENV_ONLY: [&str; 3] = [
    "ISTIO_OUTBOUND_OWNER_GROUPS",
    "ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE",
    "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR",
];

/// The environment variable istio-iptables reads for `long`, if any.
pub fn env_name(long: &str) -> Option<String> {
    FLAGS
        .iter()
        .find(|f| f.long == long && f.env)
        .map(|f| f.long.to_uppercase().replace('-', "_"))
}

/// Go's `strconv.ParseBool`.
fn parse_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}

fn apply(c: &mut IstioConfig, f: &Flag, v: &str) -> Result<(), ()> {
    match f.kind {
        Kind::Str | Kind::Ignored => (f.set)(c, v.to_string(), false),
        Kind::Bool | Kind::IgnoredBool => (f.set)(c, String::new(), parse_bool(v).ok_or(())?),
    }
    Ok(())
}

impl IstioConfig {
    /// Read the arguments after `istio-iptables` and the environment the
    /// way istio-iptables does (Go's pflag): `-p 15001`, `-p15001`,
    /// `--envoy-port 15001`, `--envoy-port=15001`; booleans by name alone
    /// or `--flag=value`; a flag given twice keeps its last value. A flag's
    /// environment variable is applied first, then Istio's extra name for
    /// it, then the command line; an unparsable variable is ignored, as
    /// istio-iptables ignores it.
    pub fn parse<S: AsRef<str>>(
        args: &[S],
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<IstioConfig, RulesError> {
        let mut c = IstioConfig::default();
        for f in FLAGS.iter().filter(|f| f.env) {
            if let Some(v) = env(&f.long.to_uppercase().replace('-', "_")) {
                let _ = apply(&mut c, f, &v);
            }
        }
        for f in FLAGS {
            if let Some(v) = f.extra_env.and_then(&env) {
                let _ = apply(&mut c, f, &v);
            }
        }
        let mut it = args.iter().map(AsRef::as_ref);
        while let Some(a) = it.next() {
            let (flag, inline): (&Flag, Option<&str>) = if let Some(long) = a.strip_prefix("--") {
                let (name, v) = match long.split_once('=') {
                    Some((n, v)) => (n, Some(v)),
                    None => (long, None),
                };
                let f = FLAGS
                    .iter()
                    .find(|f| f.long == name)
                    .ok_or_else(|| RulesError::UnknownFlag(a.to_string()))?;
                (f, v)
            } else if let Some(short) = a.strip_prefix('-') {
                let mut chars = short.chars();
                let letter = chars
                    .next()
                    .ok_or_else(|| RulesError::UnknownFlag(a.to_string()))?;
                let f = FLAGS
                    .iter()
                    .find(|f| f.short == Some(letter))
                    .ok_or_else(|| RulesError::UnknownFlag(a.to_string()))?;
                let rest = chars.as_str();
                let rest = rest.strip_prefix('=').unwrap_or(rest);
                (f, (!rest.is_empty()).then_some(rest))
            } else {
                return Err(RulesError::UnknownFlag(a.to_string()));
            };
            let value = match (flag.kind, inline) {
                (_, Some(v)) => v.to_string(),
                (Kind::Bool | Kind::IgnoredBool, None) => "true".to_string(),
                (_, None) => it
                    .next()
                    .ok_or_else(|| RulesError::MissingValue(a.to_string()))?
                    .to_string(),
            };
            apply(&mut c, flag, &value).map_err(|()| RulesError::BadBool {
                flag: a.to_string(),
                value: value.clone(),
            })?;
        }
        if let Some(v) = env("ISTIO_OUTBOUND_OWNER_GROUPS") {
            c.owner_groups_include = v;
        }
        if let Some(v) = env("ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE") {
            c.owner_groups_exclude = v;
        }
        if let Some(v) = env("ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR") {
            c.host_ipv4_loopback_cidr = v;
        }
        Ok(c)
    }
}

/// What istio-iptables learns from the pod it runs in.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Host {
    /// ip6tables rules (and `::6` on `lo`) are written.
    pub enable_ipv6: bool,
    /// The IPv4 / IPv6 nameservers of the pod's resolv.conf, as Go prints
    /// them (read only with `--redirect-dns` and without
    /// `--capture-all-dns`).
    pub dns_v4: Vec<String>,
    pub dns_v6: Vec<String>,
    /// The uid of the user `ENVOY_USER` names (default `istio-proxy`) in
    /// the machine's user database, used when `-u` is empty; 1337 when
    /// there is no such user.
    pub envoy_user_uid: Option<u32>,
}

impl Host {
    /// As istio-iptables finds them in a pod with these interface
    /// addresses (in the kernel's order, loopback included) and these
    /// resolv.conf nameservers: IPv6 is on when the first usable address is
    /// IPv6, or, with `--dual-stack`, when the pod has an IPv6 address.
    pub fn of_pod(cfg: &IstioConfig, addrs: &[IpAddr], nameservers: &[IpAddr]) -> Host {
        let usable = |a: &IpAddr| {
            let a = a.to_canonical();
            !a.is_loopback()
                && !matches!(a, IpAddr::V4(v) if v.is_link_local())
                && !matches!(a, IpAddr::V6(v) if v.segments()[0] & 0xffc0 == 0xfe80)
                && !a.is_multicast()
        };
        let mut enable_ipv6 = false;
        for a in addrs.iter().filter(|a| usable(a)) {
            enable_ipv6 = a.to_canonical().is_ipv6();
            if !cfg.dual_stack || enable_ipv6 {
                break;
            }
        }
        let mut h = Host {
            enable_ipv6,
            ..Host::default()
        };
        if cfg.redirect_dns && !cfg.capture_all_dns {
            for n in nameservers {
                match n.to_canonical() {
                    IpAddr::V4(v) => h.dns_v4.push(v.to_string()),
                    IpAddr::V6(v) => h.dns_v6.push(v.to_string()),
                }
            }
        }
        h
    }
}

/// One rule: table, chain, and its arguments as istio-iptables writes
/// them (`-A CHAIN ...` or `-I CHAIN 1 ...`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub table: &'static str,
    pub chain: String,
    pub params: Vec<String>,
}

/// The rules of both families.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IstioRules {
    pub v4: Vec<Rule>,
    /// Empty when IPv6 is off ([`Host::enable_ipv6`]).
    pub v6: Vec<Rule>,
    pub enable_ipv6: bool,
}

/// Built-in chains and targets: never created with `-N`.
const BUILT_IN: [&str; 8] = [
    "INPUT",
    "OUTPUT",
    "FORWARD",
    "PREROUTING",
    "POSTROUTING",
    "ACCEPT",
    "RETURN",
    "DROP",
];

const ISTIO_OUTPUT: &str = "ISTIO_OUTPUT";
const ISTIO_OUTPUT_DNS: &str = "ISTIO_OUTPUT_DNS";
const ISTIO_INBOUND: &str = "ISTIO_INBOUND";
const ISTIO_REDIRECT: &str = "ISTIO_REDIRECT";
const ISTIO_IN_REDIRECT: &str = "ISTIO_IN_REDIRECT";
const ISTIO_DROP: &str = "ISTIO_DROP";

/// istio-iptables' comma-separated list: empty items dropped, nothing
/// trimmed.
pub fn split(s: &str) -> Vec<&str> {
    s.split(',').filter(|x| !x.is_empty()).collect()
}

/// One family's share of a CIDR list.
#[derive(Default)]
struct Ranges {
    wildcard: bool,
    cidrs: Vec<String>,
    has_loopback: bool,
}

/// Go's `netip.ParsePrefix` on one item: `address/length`, the address
/// kept as written (not masked), printed back as Go prints it.
fn parse_prefix(s: &str) -> Option<(IpAddr, String)> {
    let (a, l) = s.split_once('/')?;
    let addr: IpAddr = a.parse().ok()?;
    if l.is_empty() || (l.len() > 1 && l.starts_with('0')) || !l.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let len: u8 = l.parse().ok()?;
    if len > if addr.is_ipv4() { 32 } else { 128 } {
        return None;
    }
    Some((addr, format!("{addr}/{len}")))
}

/// `SeparateV4V6`: `*` is a wildcard for both; otherwise each prefix goes
/// to its family (an IPv4-mapped IPv6 prefix is IPv6), and a family "has a
/// loopback IP" when a prefix's address, as written, is a loopback address
/// (Go's `IsLoopback`, which unmaps an IPv4-mapped address first).
fn separate(flag: &'static str, list: &str) -> Result<(Ranges, Ranges), RulesError> {
    if list == "*" {
        let w = || Ranges {
            wildcard: true,
            ..Ranges::default()
        };
        return Ok((w(), w()));
    }
    let (mut v4, mut v6) = (Ranges::default(), Ranges::default());
    for item in split(list) {
        let (addr, text) = parse_prefix(item).ok_or_else(|| RulesError::BadCidr {
            flag,
            value: item.to_string(),
        })?;
        let r = if addr.is_ipv4() { &mut v4 } else { &mut v6 };
        r.cidrs.push(text);
        r.has_loopback |= addr.to_canonical().is_loopback();
    }
    Ok((v4, v6))
}

/// istio-iptables' rule builder: rules in call order per family; the
/// IPv6 list only when IPv6 is on. A rule is written as its text after
/// the chain (`"-p tcp --dport 15008 -j RETURN"`); a value istio-iptables
/// would pass with a space inside would be one argument there, which
/// `iptables-restore` splits all the same.
struct Builder {
    r: IstioRules,
}

const V4: u8 = 1;
const V6: u8 = 2;
const BOTH: u8 = V4 | V6;

impl Builder {
    fn push(&mut self, fam: u8, table: &'static str, chain: &str, head: &str, rule: &str) {
        let rule = Rule {
            table,
            chain: chain.to_string(),
            params: head
                .split_whitespace()
                .chain(rule.split_whitespace())
                .map(str::to_string)
                .collect(),
        };
        if fam & V4 != 0 {
            self.r.v4.push(rule.clone());
        }
        if fam & V6 != 0 && self.r.enable_ipv6 {
            self.r.v6.push(rule);
        }
    }

    /// `-A chain rule`.
    fn append(&mut self, fam: u8, table: &'static str, chain: &str, rule: &str) {
        self.push(fam, table, chain, &format!("-A {chain}"), rule);
    }

    /// `-I chain 1 rule` (iptables-restore applies it in turn, so a later
    /// insert ends up first).
    fn insert(&mut self, fam: u8, table: &'static str, chain: &str, rule: &str) {
        self.push(fam, table, chain, &format!("-I {chain} 1"), rule);
    }

    /// A rule with one family-specific value (`AppendVersionedRule`): the
    /// word `@` is `v4` in the IPv4 rule and `v6` in the IPv6 one.
    fn versioned(&mut self, v4: &str, v6: &str, chain: &str, rule: &str) {
        for (fam, v) in [(V4, v4), (V6, v6)] {
            let r: Vec<&str> = rule
                .split_whitespace()
                .map(|w| if w == "@" { v } else { w })
                .collect();
            self.append(fam, "nat", chain, &r.join(" "));
        }
    }
}

impl IstioRules {
    /// The rules istio-iptables writes for `cfg` in a pod described by
    /// `host`, in its order (REDIRECT mode). `-n` still yields the rules
    /// (a dry run prints them); callers decide whether to install them.
    pub fn build(cfg: &IstioConfig, host: &Host) -> Result<IstioRules, RulesError> {
        if cfg.interception_mode == "TPROXY" {
            return Err(RulesError::Tproxy);
        }
        let (ex4, ex6) = separate("-x", &cfg.outbound_ip_ranges_exclude)?;
        if ex4.wildcard {
            return Err(RulesError::ExcludeWildcard);
        }
        let (in4, in6) = separate("-i", &cfg.outbound_ip_ranges_include)?;
        let proxy_uid = if cfg.proxy_uid.is_empty() {
            host.envoy_user_uid.unwrap_or(1337).to_string()
        } else {
            cfg.proxy_uid.clone()
        };
        let proxy_gid = if cfg.proxy_gid.is_empty() {
            proxy_uid.clone()
        } else {
            cfg.proxy_gid.clone()
        };
        // DNS capture is silently off without nameservers and without
        // --capture-all-dns.
        let dns = cfg.redirect_dns
            && (cfg.capture_all_dns || !host.dns_v4.is_empty() || !host.dns_v6.is_empty());
        let lo4 = cfg.host_ipv4_loopback_cidr.as_str();
        let tunnel = cfg.inbound_tunnel_port.as_str();
        let virt = split(&cfg.kube_virt_interfaces);
        let mut b = Builder {
            r: IstioRules {
                enable_ipv6: host.enable_ipv6,
                ..IstioRules::default()
            },
        };

        // Excluded interfaces, then the kube-virt interfaces' short cut.
        for nic in split(&cfg.exclude_interfaces) {
            b.append(BOTH, "nat", "PREROUTING", &format!("-i {nic} -j RETURN"));
            b.append(BOTH, "nat", "OUTPUT", &format!("-o {nic} -j RETURN"));
        }
        for nic in &virt {
            b.insert(BOTH, "nat", "PREROUTING", &format!("-i {nic} -j RETURN"));
        }
        if cfg.drop_invalid {
            let invalid = format!("-m conntrack --ctstate INVALID -j {ISTIO_DROP}");
            b.append(BOTH, "mangle", "PREROUTING", &invalid);
            b.append(BOTH, "mangle", ISTIO_DROP, "-j DROP");
        }
        let skip_tunnel = format!("-p tcp --dport {tunnel} -j RETURN");
        b.append(BOTH, "nat", ISTIO_INBOUND, &skip_tunnel);
        let out = format!("-p tcp -j REDIRECT --to-ports {}", cfg.proxy_port);
        b.append(BOTH, "nat", ISTIO_REDIRECT, &out);
        let inb = format!("-p tcp -j REDIRECT --to-ports {}", cfg.inbound_capture_port);
        b.append(BOTH, "nat", ISTIO_IN_REDIRECT, &inb);

        // Inbound (PREROUTING).
        if !cfg.inbound_ports_include.is_empty() {
            b.append(
                BOTH,
                "nat",
                "PREROUTING",
                &format!("-p tcp -j {ISTIO_INBOUND}"),
            );
            if cfg.inbound_ports_include == "*" {
                for port in split(&cfg.inbound_ports_exclude) {
                    let skip = format!("-p tcp --dport {port} -j RETURN");
                    b.append(BOTH, "nat", ISTIO_INBOUND, &skip);
                }
                let all = format!("-p tcp -j {ISTIO_IN_REDIRECT}");
                b.append(BOTH, "nat", ISTIO_INBOUND, &all);
            } else {
                for port in split(&cfg.inbound_ports_include) {
                    let one = format!("-p tcp --dport {port} -j {ISTIO_IN_REDIRECT}");
                    b.append(BOTH, "nat", ISTIO_INBOUND, &one);
                }
            }
        }

        // Outbound (OUTPUT): every protocol enters ISTIO_OUTPUT.
        b.append(BOTH, "nat", "OUTPUT", &format!("-j {ISTIO_OUTPUT}"));
        for port in split(&cfg.outbound_ports_exclude) {
            for proto in ["tcp", "udp"] {
                let skip = format!("-p {proto} --dport {port} -j RETURN");
                b.append(BOTH, "nat", ISTIO_OUTPUT, &skip);
            }
        }
        // (1) the proxy's inbound passthrough source.
        b.versioned(
            "127.0.0.6/32",
            "::6/128",
            ISTIO_OUTPUT,
            "-o lo -s @ -j RETURN",
        );
        let keep_app_local = !in4.has_loopback && !in6.has_loopback;
        // (2)-(4) per uid, then (5)-(7) per gid.
        for (owner, ids) in [("--uid-owner", &proxy_uid), ("--gid-owner", &proxy_gid)] {
            for id in split(ids) {
                // (2)/(5) the proxy calling its own pod → inbound port; with
                // DNS capture, the uid rule also spares port 53.
                let ports = if dns && owner == "--uid-owner" {
                    format!("-m multiport ! --dports 53,{tunnel}")
                } else {
                    format!("! --dport {tunnel}")
                };
                let to_inbound = format!(
                    "-o lo ! -d @ -p tcp {ports} -m owner {owner} {id} -j {ISTIO_IN_REDIRECT}"
                );
                b.versioned(lo4, "::1/128", ISTIO_OUTPUT, &to_inbound);
                // (3)/(6) anyone else calling the pod stays local (TCP DNS
                // excepted), unless -i names a loopback address.
                if keep_app_local {
                    let dns_port = if dns { "-p tcp ! --dport 53 " } else { "" };
                    let local = format!("-o lo {dns_port}-m owner ! {owner} {id} -j RETURN");
                    b.append(BOTH, "nat", ISTIO_OUTPUT, &local);
                }
                // (4)/(7) the proxy's own traffic.
                let own = format!("-m owner {owner} {id} -j RETURN");
                b.append(BOTH, "nat", ISTIO_OUTPUT, &own);
            }
        }
        // Capture by owner group (ISTIO_OUTBOUND_OWNER_GROUPS[_EXCLUDE]).
        if cfg.owner_groups_include == "*" {
            for g in split(&cfg.owner_groups_exclude) {
                let skip = format!("-m owner --gid-owner {g} -j RETURN");
                b.append(BOTH, "nat", ISTIO_OUTPUT, &skip);
            }
        } else {
            let none_of: String = split(&cfg.owner_groups_include)
                .iter()
                .map(|g| format!("-m owner ! --gid-owner {g} "))
                .collect();
            b.append(BOTH, "nat", ISTIO_OUTPUT, &format!("{none_of}-j RETURN"));
        }
        if dns {
            dns_rules(&mut b, cfg, host, &proxy_uid, &proxy_gid);
        }
        // (8) the host's loopback.
        b.versioned(lo4, "::1/128", ISTIO_OUTPUT, "-d @ -j RETURN");
        // -x, then -q, then -i (9).
        for (fam, r) in [(V4, &ex4), (V6, &ex6)] {
            for c in &r.cidrs {
                b.append(fam, "nat", ISTIO_OUTPUT, &format!("-d {c} -j RETURN"));
            }
        }
        for port in split(&cfg.outbound_ports_include) {
            let q = format!("-p tcp --dport {port} -j {ISTIO_REDIRECT}");
            b.append(BOTH, "nat", ISTIO_OUTPUT, &q);
        }
        for (fam, r) in [(V4, &in4), (V6, &in6)] {
            if r.wildcard {
                b.append(fam, "nat", ISTIO_OUTPUT, &format!("-j {ISTIO_REDIRECT}"));
                for nic in &virt {
                    let vm = format!("-i {nic} -j {ISTIO_REDIRECT}");
                    b.insert(fam, "nat", "PREROUTING", &vm);
                }
            } else {
                for c in &r.cidrs {
                    for nic in &virt {
                        let vm = format!("-i {nic} -d {c} -j {ISTIO_REDIRECT}");
                        b.insert(fam, "nat", "PREROUTING", &vm);
                    }
                    let to = format!("-d {c} -j {ISTIO_REDIRECT}");
                    b.append(fam, "nat", ISTIO_OUTPUT, &to);
                }
            }
        }
        Ok(b.r)
    }

    /// The `iptables-restore` input of one family, byte for byte as
    /// istio-iptables feeds it (`ip6tables-restore` for `v6`); `None` for
    /// IPv6 when IPv6 is off. Tables in name order; in each, `-N` for the
    /// chains that get rules, then for chains only jumped to, then the
    /// rules in order. istio-iptables runs it with `--noflush`.
    pub fn restore(&self, v6: bool) -> Option<String> {
        if v6 && !self.enable_ipv6 {
            return None;
        }
        let rules = if v6 { &self.v6 } else { &self.v4 };
        let mut out = String::new();
        for table in ["filter", "mangle", "nat", "raw"] {
            let mut lines: Vec<String> = Vec::new();
            let mut seen: Vec<&str> = Vec::new();
            let in_table = || rules.iter().filter(|r| r.table == table);
            for r in in_table() {
                if !seen.contains(&r.chain.as_str()) {
                    seen.push(&r.chain);
                    if !BUILT_IN.contains(&r.chain.as_str()) {
                        lines.push(format!("-N {}", r.chain));
                    }
                }
            }
            for r in in_table() {
                let n = r.params.len();
                if n >= 2 && r.params[n - 2] == "-j" {
                    let target = r.params[n - 1].as_str();
                    if !seen.contains(&target) {
                        seen.push(target);
                        if !BUILT_IN.contains(&target) {
                            lines.push(format!("-N {target}"));
                        }
                    }
                }
            }
            lines.extend(in_table().map(|r| r.params.join(" ")));
            if !lines.is_empty() {
                out.push_str(&format!("* {table}\n"));
                for l in lines {
                    out.push_str(&l);
                    out.push('\n');
                }
                out.push_str("COMMIT\n");
            }
        }
        Some(out)
    }
}

/// DNS capture: the nat jump and redirects to the agent's DNS proxy, and
/// the raw-table conntrack zones (`SetupDNSRedir`).
fn dns_rules(b: &mut Builder, cfg: &IstioConfig, host: &Host, proxy_uid: &str, proxy_gid: &str) {
    let all = cfg.capture_all_dns;
    let servers: Vec<(u8, String)> = (host.dns_v4.iter().map(|s| (V4, format!("{s}/32"))))
        .chain(host.dns_v6.iter().map(|s| (V6, format!("{s}/128"))))
        .collect();
    b.append(BOTH, "raw", "OUTPUT", &format!("-j {ISTIO_OUTPUT_DNS}"));
    for (fam, list) in [(V4, &host.dns_v4), (V6, &host.dns_v6)] {
        if all || !list.is_empty() {
            b.append(fam, "nat", ISTIO_OUTPUT, &format!("-j {ISTIO_OUTPUT_DNS}"));
        }
    }
    // TCP, then UDP (istio-iptables writes `--to-port` for UDP).
    for (proto, to) in [("tcp", "--to-ports"), ("udp", "--to-port")] {
        let redirect = format!("-j REDIRECT {to} {DNS_PROXY_PORT}");
        if all {
            let r = format!("-p {proto} --dport 53 {redirect}");
            b.append(BOTH, "nat", ISTIO_OUTPUT_DNS, &r);
        } else {
            for (fam, d) in &servers {
                let r = format!("-p {proto} --dport 53 -d {d} {redirect}");
                b.append(*fam, "nat", ISTIO_OUTPUT_DNS, &r);
            }
        }
    }
    // Conntrack zones: the proxy's queries to the resolvers in zone 1, its
    // answers to the app in zone 2.
    for (owner, ids) in [("--uid-owner", proxy_uid), ("--gid-owner", proxy_gid)] {
        for id in split(ids) {
            let q = format!("-p udp --dport 53 -m owner {owner} {id} -j CT --zone 1");
            b.append(BOTH, "raw", ISTIO_OUTPUT_DNS, &q);
            let a = format!("-p udp --sport {DNS_PROXY_PORT} -m owner {owner} {id} -j CT --zone 2");
            b.append(BOTH, "raw", ISTIO_OUTPUT_DNS, &a);
        }
    }
    let jump = format!("-j {ISTIO_INBOUND}");
    if all {
        b.append(BOTH, "raw", "PREROUTING", &jump);
        b.append(
            BOTH,
            "raw",
            ISTIO_OUTPUT_DNS,
            "-p udp --dport 53 -j CT --zone 2",
        );
        b.append(
            BOTH,
            "raw",
            ISTIO_INBOUND,
            "-p udp --sport 53 -j CT --zone 1",
        );
    } else {
        for fam in [V4, V6] {
            let mine = servers.iter().filter(|(f, _)| *f == fam);
            if mine.clone().next().is_some() {
                b.append(fam, "raw", "PREROUTING", &jump);
            }
            for (_, d) in mine {
                let q = format!("-p udp --dport 53 -d {d} -j CT --zone 2");
                b.append(fam, "raw", ISTIO_OUTPUT_DNS, &q);
                let a = format!("-p udp --sport 53 -s {d} -j CT --zone 1");
                b.append(fam, "raw", ISTIO_INBOUND, &a);
            }
        }
    }
}

#[cfg(test)]
mod golden;
#[cfg(test)]
mod tests;
