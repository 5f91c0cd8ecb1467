//! The one table of capture flags: every flag and environment variable of
//! istio-iptables (Istio's `tools/istio-iptables/pkg/cmd` and
//! `tools/common/config`), the logging flags its command takes, and
//! redirect's own capture flags. Everything else is driven by it: the clap
//! arguments of `redirect attach` / `redirect istio-iptables`, the
//! environment variables, the agent's JSON capture config, the pod
//! annotations, `istio_args()`, the injected defaults, what is not
//! supported yet, and the table in `docs/flags.md` (checked by a test).
//!
//! A row says how a flag is written (letter, long name, aliases, variables),
//! its default (istio-iptables') and the value Istio's injector passes, the
//! annotation it comes from, where its parsed value goes (`target`), how it
//! prints in `istio_args()` (`show`) and what redirect does with it
//! (`status`).

use super::{parse, AccelMode, Cidr, InboundPorts, OwnerGroups, PodSpec, RunOptions};

/// The pod annotations Istio's injector reads for istio-init's args.
pub mod annotation {
    pub const INTERCEPTION_MODE: &str = "sidecar.istio.io/interceptionMode";
    pub const INCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.istio.io/includeInboundPorts";
    pub const EXCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeInboundPorts";
    pub const INCLUDE_OUTBOUND_IP_RANGES: &str = "traffic.sidecar.istio.io/includeOutboundIPRanges";
    pub const EXCLUDE_OUTBOUND_IP_RANGES: &str = "traffic.sidecar.istio.io/excludeOutboundIPRanges";
    pub const INCLUDE_OUTBOUND_PORTS: &str = "traffic.sidecar.istio.io/includeOutboundPorts";
    pub const EXCLUDE_OUTBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeOutboundPorts";
    pub const EXCLUDE_INTERFACES: &str = "traffic.sidecar.istio.io/excludeInterfaces";
    /// `-k`; wins over [`KUBEVIRT_INTERFACES`] (the template's order).
    pub const REROUTE_VIRTUAL_INTERFACES: &str = "istio.io/reroute-virtual-interfaces";
    pub const KUBEVIRT_INTERFACES: &str = "traffic.sidecar.istio.io/kubevirtInterfaces";
}

/// A row of the table (its position in [`TABLE`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Flag {
    EnvoyPort,
    InboundCapturePort,
    InboundTunnelPort,
    ProxyUid,
    ProxyGid,
    InterceptionMode,
    ServiceCidr,
    ServiceExcludeCidr,
    OutboundPorts,
    LocalOutboundPortsExclude,
    InboundPorts,
    LocalExcludePorts,
    ExcludeInterfaces,
    KubeVirtInterfaces,
    RedirectDns,
    CaptureAllDns,
    DnsServers,
    DnsResolvConf,
    PodRoot,
    OwnerGroups,
    OwnerGroupsExclude,
    Ipv4LoopbackCidr,
    EnvoyUser,
    TproxyMark,
    TproxyRouteTable,
    DropInvalid,
    DualStack,
    Accel,
    NoAccel,
    AccelShortConns,
    DryRun,
    SkipRuleApply,
    RunValidation,
    IptablesProbePort,
    ProbeTimeout,
    NetworkNamespace,
    CleanupOnly,
    Reconcile,
    ForceApply,
    CniMode,
    NativeNftables,
    ForceIptablesBinary,
    LogOutputLevel,
    LogAsJson,
    LogTarget,
    LogStacktraceLevel,
    LogCaller,
    RestoreFormat,
    IptablesTraceLogging,
}

/// How a value is written on a command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `--flag value`, `--flag=value`, `-f value`.
    Text,
    /// `--flag` (true) or `--flag=false`, as Go's pflag booleans.
    Bool,
}

/// Where a flag comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// istio-iptables (current releases).
    IstioIptables,
    /// An istio-iptables environment variable without a flag.
    IstioEnv,
    /// Istio's logging flags (every Istio command takes them; the injector
    /// always passes `--log_output_level`).
    IstioLog,
    /// Flags of older istio-iptables releases.
    IstioOlder,
    /// redirect's own.
    Redirect,
}

/// What the value configures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// The pod's capture: part of the agent's JSON config and of the spec.
    Pod,
    /// This one run of the command (dry run, validation, logging...): not
    /// part of a pod's config, refused in the agent's JSON config.
    Run,
}

/// What redirect does with a flag.
#[derive(Clone, Copy, Debug)]
pub enum Status {
    /// Works as in istio-iptables.
    Works,
    /// Accepted (and its value checked), no effect: the reason.
    NoOp(&'static str),
    /// Parsed into the spec, but capture refuses it while `in_effect` says
    /// the value asks for something (`<flag>: not supported yet`): what is
    /// missing. Flip the row to `Works` when the kernel side lands.
    NotYet {
        missing: &'static str,
        in_effect: fn(&PodSpec) -> bool,
    },
}

/// Where a parsed value goes.
#[derive(Clone, Copy)]
pub enum Target {
    /// A field of the pod spec.
    Spec(fn(&mut PodSpec, &str) -> Result<(), String>),
    /// A field of this run's options.
    Run(fn(&mut RunOptions, &str) -> Result<(), String>),
    /// Checked only (a no-op, or read while resolving another row).
    Check(fn(&str) -> Result<(), String>),
}

/// How a row prints in `istio_args()` (from a spec).
#[derive(Clone, Copy)]
pub enum Show {
    /// Always, with this value.
    Always(fn(&PodSpec) -> String),
    /// Only when the function gives a value (`Some("")` for a bare flag).
    IfSet(fn(&PodSpec) -> Option<String>),
    Never,
}

/// One row.
pub struct FlagDef {
    pub flag: Flag,
    pub short: Option<char>,
    /// None: an environment variable only.
    pub long: Option<&'static str>,
    /// Other long names accepted (shown in `--help`).
    pub aliases: &'static [&'static str],
    /// Variables read when the flag is not on the command line; when
    /// several are set, the last one listed wins (istio-iptables binds the
    /// extra names after the flag's own).
    pub env: &'static [&'static str],
    /// istio-iptables' default.
    pub default: &'static str,
    /// What Istio's injector passes in `istio-init`'s args by default.
    pub injected: Option<&'static str>,
    /// Pod annotations it comes from (the agent), first present wins.
    pub annotations: &'static [&'static str],
    /// Other pod sources, and how the injector composes the value (docs).
    pub pod_note: &'static str,
    pub kind: Kind,
    pub origin: Origin,
    pub scope: Scope,
    pub target: Target,
    pub show: Show,
    pub status: Status,
    pub help: &'static str,
}

impl FlagDef {
    /// How messages name it: `-p/--envoy-port`, `--redirect-dns`,
    /// `ISTIO_OUTBOUND_OWNER_GROUPS`.
    pub fn name(&self) -> String {
        match (self.short, self.long) {
            (Some(s), Some(l)) => format!("-{s}/--{l}"),
            (None, Some(l)) => format!("--{l}"),
            _ => self.env.first().copied().unwrap_or("?").to_string(),
        }
    }

    /// The key of the agent's JSON config: the long name, else the
    /// variable.
    pub fn key(&self) -> &'static str {
        self.long
            .or_else(|| self.env.first().copied())
            .expect("a row has a long name or a variable")
    }

    /// Does `name` (a JSON key) name this row: long name, alias, letter, or
    /// (env-only rows) the variable?
    pub fn is_named(&self, name: &str) -> bool {
        self.long == Some(name)
            || self.aliases.contains(&name)
            || self
                .short
                .is_some_and(|c| name.len() == c.len_utf8() && name.starts_with(c))
            || (self.long.is_none() && self.env.contains(&name))
    }

    pub fn get(flag: Flag) -> &'static FlagDef {
        let d = &TABLE[flag as usize];
        debug_assert_eq!(d.flag, flag);
        d
    }
}

// ------------------------------------------------------------- targets

fn bad_mode(v: &str) -> Result<(), String> {
    match v.trim() {
        "" | "REDIRECT" => Ok(()),
        "TPROXY" => Err("TPROXY is not supported: redirect replaces istio-init's REDIRECT mode (use -m REDIRECT, Istio's default)".into()),
        _ => Err("expected REDIRECT".into()),
    }
}

fn set_include_cidrs(s: &mut PodSpec, v: &str) -> Result<(), String> {
    let l = parse::cidrs(v, true)?;
    s.include_all_outbound = l.all;
    s.include_has_loopback = l.names_loopback;
    s.include_cidrs = l.cidrs;
    Ok(())
}

fn set_inbound_ports(s: &mut PodSpec, v: &str) -> Result<(), String> {
    s.inbound_ports = match v.trim() {
        "*" => InboundPorts::All,
        "" => InboundPorts::None,
        v => InboundPorts::Listed(parse::ports(v)?),
    };
    Ok(())
}

fn set_owner_groups(s: &mut PodSpec, v: &str) -> Result<(), String> {
    if v.trim() == "*" {
        s.outbound_owner_groups = OwnerGroups::All;
        return Ok(());
    }
    let g = parse::groups(v)?;
    // istio-iptables' limit: one rule with a match per group.
    if g.len() > 64 {
        return Err(format!("at most 64 groups are supported, got {}", g.len()));
    }
    s.outbound_owner_groups = OwnerGroups::Only(g);
    Ok(())
}

fn set_owner_groups_exclude(s: &mut PodSpec, v: &str) -> Result<(), String> {
    let g = parse::groups(v)?;
    // Only read when every group is captured (istio-iptables ignores it
    // otherwise).
    if s.outbound_owner_groups == OwnerGroups::All && !g.is_empty() {
        s.outbound_owner_groups = OwnerGroups::AllExcept(g);
    }
    Ok(())
}

fn set_loopback_cidr(s: &mut PodSpec, v: &str) -> Result<(), String> {
    // As istio-iptables: an IPv4 loopback prefix with a length of 8-32.
    let (a, l) = v
        .trim()
        .split_once('/')
        .ok_or_else(|| format!("'{v}' is not a CIDR (address/length)"))?;
    let addr: std::net::Ipv4Addr = a
        .parse()
        .map_err(|_| format!("'{a}' is not an IPv4 address"))?;
    let len: u8 = l
        .parse()
        .map_err(|_| format!("'/{l}' is not a prefix length"))?;
    if !addr.is_loopback() {
        return Err(format!("{addr} is not an IPv4 loopback address"));
    }
    if !(8..=32).contains(&len) {
        return Err(format!(
            "the prefix length must be within 8..=32, not {len}"
        ));
    }
    s.ipv4_loopback_cidr = Cidr::parse(v.trim())?;
    Ok(())
}

fn check_iptables_binary(v: &str) -> Result<(), String> {
    match v {
        "" | "legacy" | "nft" => Ok(()),
        _ => Err("expected legacy or nft".into()),
    }
}

fn check_user(v: &str) -> Result<(), String> {
    if v.trim().is_empty() {
        return Err("empty user name".into());
    }
    Ok(())
}

fn any(_: &str) -> Result<(), String> {
    Ok(())
}

fn is_bool(v: &str) -> Result<(), String> {
    parse::bool(v).map(|_| ())
}

// --------------------------------------------------------------- shows

fn list<T: ToString>(v: &[T]) -> String {
    v.iter().map(T::to_string).collect::<Vec<_>>().join(",")
}

fn quoted(s: String) -> String {
    format!("'{s}'")
}

fn cidr_list(v: &[Cidr]) -> String {
    list(v)
}

fn show_include(s: &PodSpec) -> String {
    quoted(if s.include_all_outbound {
        "*".into()
    } else {
        cidr_list(&s.include_cidrs)
    })
}

fn show_inbound(s: &PodSpec) -> String {
    quoted(match &s.inbound_ports {
        InboundPorts::All => "*".into(),
        InboundPorts::Listed(p) => list(p),
        InboundPorts::None => String::new(),
    })
}

fn if_nonempty(v: &[String]) -> Option<String> {
    (!v.is_empty()).then(|| quoted(v.join(",")))
}

fn flag_if(on: bool) -> Option<String> {
    on.then(String::new)
}

fn show_dns_servers(s: &PodSpec) -> Option<String> {
    match &s.dns_servers {
        Some(v) if s.redirect_dns && !s.capture_all_dns && v.is_empty() => {
            Some(NO_NAMESERVERS.into())
        }
        Some(v) if s.redirect_dns && !s.capture_all_dns => Some(quoted(list(v))),
        _ => None,
    }
}

/// `--dns-servers none`: the pod has no nameserver (DNS capture is then
/// off, as istio-iptables with a resolv.conf that lists none).
pub const NO_NAMESERVERS: &str = "none";

fn set_dns_servers(s: &mut PodSpec, v: &str) -> Result<(), String> {
    // Empty: not given (the CLI then reads the pod's resolv.conf).
    s.dns_servers = match v.trim() {
        "" => None,
        NO_NAMESERVERS => Some(Vec::new()),
        v => Some(parse::addresses(v)?),
    };
    Ok(())
}

fn check_path(v: &str) -> Result<Option<std::path::PathBuf>, String> {
    let v = v.trim();
    if v.is_empty() {
        return Ok(None);
    }
    if !v.starts_with('/') {
        return Err(format!("'{v}' is not an absolute path"));
    }
    Ok(Some(v.into()))
}

const NOT_WITHOUT_NETFILTER: &str = "there are no iptables rules to apply";

/// Every row, in the order `istio_args()` prints them.
pub static TABLE: [FlagDef; 49] = [
    FlagDef {
        flag: Flag::EnvoyPort,
        short: Some('p'),
        long: Some("envoy-port"),
        aliases: &["proxy-port"],
        env: &[],
        default: "15001",
        injected: Some("15001"),
        annotations: &[],
        pod_note: "",
        kind: Kind::Text,
        origin: Origin::IstioIptables,
        scope: Scope::Pod,
        target: Target::Spec(|s, v| {
            s.proxy_port = parse::port(v)?;
            Ok(())
        }),
        show: Show::Always(|s| s.proxy_port.to_string()),
        status: Status::Works,
        help: "Outbound capture port (Envoy's outbound listener).",
    },
    FlagDef {
        flag: Flag::InboundCapturePort,
        short: Some('z'),
        long: Some("inbound-capture-port"),
        aliases: &[],
        env: &["INBOUND_CAPTURE_PORT"],
        default: "15006",
        injected: Some("15006"),
        annotations: &[],
        pod_note: "",
        kind: Kind::Text,
        origin: Origin::IstioIptables,
        scope: Scope::Pod,
        target: Target::Spec(|s, v| {
            s.inbound_port = parse::port(v)?;
            Ok(())
        }),
        show: Show::Always(|s| s.inbound_port.to_string()),
        status: Status::Works,
        help: "Inbound capture port: connections from outside the pod go there.",
    },
    FlagDef {
        flag: Flag::InboundTunnelPort,
        short: Some('e'),
        long: Some("inbound-tunnel-port"),
        aliases: &[],
        env: &["INBOUND_TUNNEL_PORT"],
        default: "15008",
        injected: None,
        annotations: &[],
        pod_note: "",
        kind: Kind::Text,
        origin: Origin::IstioIptables,
        scope: Scope::Pod,
        target: Target::Spec(|s, v| {
            s.tunnel_port = parse::port(v)?;
            Ok(())
        }),
        show: Show::Always(|s| s.tunnel_port.to_string()),
        status: Status::Works,
        help: "Inbound tunnel (HBONE) port, never captured.",
    },
    FlagDef {
        flag: Flag::ProxyUid,
        short: Some('u'),
        long: Some("proxy-uid"),
        aliases: &[],
        env: &["PROXY_UID"],
        default: "",
        injected: Some("1337"),
        annotations: &[],
        pod_note: "securityContext.runAsUser of the istio-proxy container, else the pod's",
        kind: Kind::Text,
        origin: Origin::IstioIptables,
        scope: Scope::Pod,
        target: Target::Spec(|s, v| {
            s.proxy_uids = parse::ids(v)?;
            Ok(())
        }),
        show: Show::Always(|s| quoted(list(&s.proxy_uids))),
        status: Status::Works,
        help: "Proxy uids, comma separated: their traffic is not captured. Not given: the uid of the user $ENVOY_USER names, else 1337 (istio-iptables' default); given empty: no proxy uid (-g then needed).",
    },
    FlagDef {
        flag: Flag::ProxyGid,
        short: Some('g'),
        long: Some("proxy-gid"),
        aliases: &[],
        env: &["PROXY_GID"],
        default: "",
        injected: None,
        annotations: &[],
        pod_note: "securityContext.runAsGroup of the istio-proxy container, else the pod's",
        kind: Kind::Text,
        origin: Origin::IstioIptables,
        scope: Scope::Pod,
        target: Target::Spec(|s, v| {
            s.proxy_gids = parse::ids(v)?;
            Ok(())
        }),
        show: Show::Always(|s| quoted(list(&s.proxy_gids))),
        status: Status::Works,
        help: "Proxy gids, comma separated. Not given: the -u list; given empty: no proxy gid.",
    },
    FlagDef {
        flag: Flag::InterceptionMode,
        short: Some('m'),
        long: Some("istio-inbound-interception-mode"),
        aliases: &[],
        env: &["ISTIO_INBOUND_INTERCEPTION_MODE"],
        default: "",
        injected: Some("REDIRECT"),
        annotations: &[annotation::INTERCEPTION_MODE],
        pod_note: "",
        kind: Kind::Text,
        origin: Origin::IstioIptables,
        scope: Scope::Pod,
        target: Target::Spec(|_, v| bad_mode(v)),
        show: Show::Always(|_| "REDIRECT".into()),
        status: Status::Works,
        help: "Inbound interception mode: REDIRECT (empty means REDIRECT). TPROXY is refused.",
    },
    FlagDef {
        flag: Flag::ServiceCidr,
        short: Some('i'),
        long: Some("istio-service-cidr"),
        aliases: &["include-outbound-ip-ranges"],
        env: &["ISTIO_SERVICE_CIDR"],
        default: "",
        injected: Some("*"),
        annotations: &[annotation::INCLUDE_OUTBOUND_IP_RANGES],
        pod_note: "",
        kind: Kind::Text,
        origin: Origin::IstioIptables,
        scope: Scope::Pod,
        target: Target::Spec(set_include_cidrs),
        show: Show::Always(show_include),
        status: Status::Works,
        help: "Outbound CIDRs to capture, comma separated; '*' for all.",
    },
    FlagDef {
        flag: Flag::ServiceExcludeCidr,
        short: Some('x'),
        long: Some("istio-service-exclude-cidr"),
        aliases: &["exclude-outbound-ip-ranges"],
        env: &["ISTIO_SERVICE_EXCLUDE_CIDR"],
        default: "",
        injected: Some(""),
        annotations: &[annotation::EXCLUDE_OUTBOUND_IP_RANGES],
        pod_note: "",
        kind: Kind::Text,
        origin: Origin::IstioIptables,
        scope: Scope::Pod,
        target: Target::Spec(|s, v| {
            s.exclude_cidrs = parse::cidrs(v, false)?.cidrs;
            Ok(())
        }),
        show: Show::Always(|s| quoted(cidr_list(&s.exclude_cidrs))),
        status: Status::Works,
        help: "Outbound CIDRs never captured.",
    },
    FlagDef {
        flag: Flag::OutboundPorts,
        short: Some('q'),
        long: Some("istio-outbound-ports"),
        aliases: &["istio-include-outbound-ports", "include-outbound-ports"],
        env: &["ISTIO_OUTBOUND_PORTS"],
        default: "",
        injected: None,
        annotations: &[annotation::INCLUDE_OUTBOUND_PORTS],
        pod_note: "",
        kind: Kind::Text,
        origin: Origin::IstioIptables,
        scope: Scope::Pod,
        target: Target::Spec(|s, v| {
            s.include_outbound_ports = parse::ports(v)?;
            Ok(())
        }),
        show: Show::Always(|s| quoted(list(&s.include_outbound_ports))),
        status: Status::Works,
        help: "Outbound ports captured even when -i does not include the destination.",
    },
    FlagDef {
        flag: Flag::LocalOutboundPortsExclude,
        short: Some('o'),
        long: Some("istio-local-outbound-ports-exclude"),
        aliases: &["exclude-outbound-ports"],
        env: &["ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE"],
        default: "",
        injected: None,
        annotations: &[annotation::EXCLUDE_OUTBOUND_PORTS],
        pod_note: "",
        kind: Kind::Text,
        origin: Origin::IstioIptables,
        scope: Scope::Pod,
        target: Target::Spec(|s, v| {
            s.exclude_outbound_ports = parse::ports(v)?;
            Ok(())
        }),
        show: Show::Always(|s| quoted(list(&s.exclude_outbound_ports))),
        status: Status::Works,
        help: "Outbound ports never captured.",
    },
    FlagDef {
        flag: Flag::InboundPorts,
        short: Some('b'),
        long: Some("istio-inbound-ports"),
        aliases: &["include-inbound-ports"],
        env: &["ISTIO_INBOUND_PORTS"],
        default: "",
        injected: Some("*"),
        annotations: &[annotation::INCLUDE_INBOUND_PORTS],
        pod_note: "",
        kind: Kind::Text,
        origin: Origin::IstioIptables,
        scope: Scope::Pod,
        target: Target::Spec(set_inbound_ports),
        show: Show::Always(show_inbound),
        status: Status::Works,
        help: "Inbound ports to capture, comma separated; '*' for all.",
    },
    FlagDef {
        flag: Flag::LocalExcludePorts,
        short: Some('d'),
        long: Some("istio-local-exclude-ports"),
        aliases: &["exclude-inbound-ports"],
        env: &["ISTIO_LOCAL_EXCLUDE_PORTS"],
        default: "",
        injected: Some("15090,15021,15020"),
        annotations: &[annotation::EXCLUDE_INBOUND_PORTS],
        pod_note: "after 15090,15021; then status.sidecar.istio.io/port is appended unless 0 or listed",
        kind: Kind::Text,
        origin: Origin::IstioIptables,
        scope: Scope::Pod,
        target: Target::Spec(|s, v| {
            s.exclude_inbound_ports = parse::ports(v)?;
            Ok(())
        }),
        show: Show::Always(|s| quoted(list(&s.exclude_inbound_ports))),
        status: Status::Works,
        help: "Inbound ports not captured when -b '*'.",
    },
    FlagDef {
        flag: Flag::ExcludeInterfaces,
        short: Some('c'),
        long: Some("istio-exclude-interfaces"),
        aliases: &[],
        env: &["ISTIO_EXCLUDE_INTERFACES"],
        default: "",
        injected: None,
        annotations: &[annotation::EXCLUDE_INTERFACES],
        pod_note: "",
        kind: Kind::Text,
        origin: Origin::IstioIptables,
        scope: Scope::Pod,
        target: Target::Spec(|s, v| {
            s.exclude_interfaces = parse::interfaces(v)?;
            Ok(())
        }),
        show: Show::IfSet(|s| if_nonempty(&s.exclude_interfaces)),
        status: Status::Works,
        help: "Interfaces whose traffic is never captured (in and out), comma separated; a trailing + matches a prefix.",
    },
    FlagDef {
        flag: Flag::KubeVirtInterfaces,
        short: Some('k'),
        long: Some("kube-virt-interfaces"),
        aliases: &[],
        env: &["KUBE_VIRT_INTERFACES"],
        default: "",
        injected: None,
        annotations: &[
            annotation::REROUTE_VIRTUAL_INTERFACES,
            annotation::KUBEVIRT_INTERFACES,
        ],
        pod_note: "",
        kind: Kind::Text,
        origin: Origin::IstioIptables,
        scope: Scope::Pod,
        target: Target::Spec(|s, v| {
            s.kube_virt_interfaces = parse::interfaces(v)?;
            Ok(())
        }),
        show: Show::IfSet(|s| if_nonempty(&s.kube_virt_interfaces)),
        status: Status::Works,
        help: "Virtual interfaces (a VM's) whose TCP connections go to the outbound port, as the pod's own; comma separated.",
    },
    FlagDef {
        flag: Flag::RedirectDns,
        short: None,
        long: Some("redirect-dns"),
        aliases: &[],
        env: &["REDIRECT_DNS", "ISTIO_META_DNS_CAPTURE"],
        default: "false",
        injected: None,
        annotations: &[],
        pod_note: "",
        kind: Kind::Bool,
        origin: Origin::IstioIptables,
        scope: Scope::Pod,
        target: Target::Spec(|s, v| {
            s.redirect_dns = parse::bool(v)?;
            Ok(())
        }),
        show: Show::IfSet(|s| flag_if(s.redirect_dns)),
        status: Status::Works,
        help: "Send the app's DNS (UDP and TCP port 53) to the pod's nameservers to the DNS proxy on 127.0.0.1:15053 / [::1]:15053; the app reads the replies as from the nameserver. The nameservers: --dns-servers, else --dns-resolv-conf, else the pod's resolv.conf where redirect can read it (see the docs), else DNS to any address is captured.",
    },
    FlagDef {
        flag: Flag::CaptureAllDns,
        short: None,
        long: Some("capture-all-dns"),
        aliases: &[],
        env: &["CAPTURE_ALL_DNS"],
        default: "false",
        injected: None,
        annotations: &[],
        pod_note: "",
        kind: Kind::Bool,
        origin: Origin::IstioIptables,
        scope: Scope::Pod,
        target: Target::Spec(|s, v| {
            s.capture_all_dns = parse::bool(v)?;
            Ok(())
        }),
        show: Show::IfSet(|s| flag_if(s.capture_all_dns)),
        status: Status::Works,
        help: "With --redirect-dns: capture DNS to any address, not only the pod's nameservers.",
    },
    FlagDef {
        flag: Flag::DnsServers,
        short: None,
        long: Some("dns-servers"),
        aliases: &[],
        env: &[],
        default: "",
        injected: None,
        annotations: &[],
        pod_note: "the agent: from the pod's dnsPolicy and dnsConfig, as the kubelet writes resolv.conf (ClusterFirst: the daemon's --cluster-dns)",
        kind: Kind::Text,
        origin: Origin::Redirect,
        scope: Scope::Pod,
        target: Target::Spec(set_dns_servers),
        show: Show::IfSet(show_dns_servers),
        status: Status::Works,
        help: "The pod's nameservers for --redirect-dns, comma separated, or 'none' (istio-iptables reads them from the pod's /etc/resolv.conf). Not given: read from --dns-resolv-conf or the pod's resolv.conf where redirect can find it.",
    },
    FlagDef {
        flag: Flag::DnsResolvConf,
        short: None,
        long: Some("dns-resolv-conf"),
        aliases: &[],
        env: &[],
        default: "",
        injected: None,
        annotations: &[],
        pod_note: "",
        kind: Kind::Text,
        origin: Origin::Redirect,
        scope: Scope::Run,
        target: Target::Run(|r, v| {
            r.dns_resolv_conf = check_path(v)?;
            Ok(())
        }),
        show: Show::Never,
        status: Status::Works,
        help: "The pod's resolv.conf, whose nameserver lines are the nameservers of --redirect-dns (when --dns-servers is not given).",
    },
    FlagDef {
        flag: Flag::PodRoot,
        short: None,
        long: Some("pod-root"),
        aliases: &[],
        env: &[],
        default: "",
        injected: None,
        annotations: &[],
        pod_note: "",
        kind: Kind::Text,
        origin: Origin::Redirect,
        scope: Scope::Run,
        target: Target::Run(|r, v| {
            r.pod_root = check_path(v)?;
            Ok(())
        }),
        show: Show::Never,
        status: Status::Works,
        help: "The pod's root directory (its /etc/resolv.conf for --redirect-dns, its /etc/group for owner group names). Default: / when run inside the pod (no --netns), /proc/<pid>/root with --netns /proc/<pid>/ns/net.",
    },
    FlagDef {
        flag: Flag::OwnerGroups,
        short: None,
        long: None,
        aliases: &[],
        env: &["ISTIO_OUTBOUND_OWNER_GROUPS"],
        default: "*",
        injected: None,
        annotations: &[],
        pod_note: "",
        kind: Kind::Text,
        origin: Origin::IstioEnv,
        scope: Scope::Pod,
        target: Target::Spec(set_owner_groups),
        show: Show::Never,
        status: Status::Works,
        help: "Groups (gids, or names looked up in the pod's /etc/group) whose outbound traffic (and DNS) is captured; '*' for all. Matched on the process's primary gid, after the proxy uid/gid rules.",
    },
    FlagDef {
        flag: Flag::OwnerGroupsExclude,
        short: None,
        long: None,
        aliases: &[],
        env: &["ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE"],
        default: "",
        injected: None,
        annotations: &[],
        pod_note: "",
        kind: Kind::Text,
        origin: Origin::IstioEnv,
        scope: Scope::Pod,
        target: Target::Spec(set_owner_groups_exclude),
        show: Show::Never,
        status: Status::Works,
        help: "Groups (gids, or names looked up in the pod's /etc/group) whose outbound traffic (and DNS) is not captured (read only when ISTIO_OUTBOUND_OWNER_GROUPS is '*').",
    },
    FlagDef {
        flag: Flag::Ipv4LoopbackCidr,
        short: None,
        long: None,
        aliases: &[],
        env: &["ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR"],
        default: "127.0.0.1/32",
        injected: None,
        annotations: &[],
        pod_note: "",
        kind: Kind::Text,
        origin: Origin::IstioEnv,
        scope: Scope::Pod,
        target: Target::Spec(set_loopback_cidr),
        show: Show::Never,
        status: Status::Works,
        help: "The IPv4 loopback range of the 127.0.0.1 rules (2), (5) and (8).",
    },
    FlagDef {
        flag: Flag::EnvoyUser,
        short: None,
        long: None,
        aliases: &[],
        env: &["ENVOY_USER"],
        default: "istio-proxy",
        injected: None,
        annotations: &[],
        pod_note: "",
        kind: Kind::Text,
        origin: Origin::IstioEnv,
        scope: Scope::Pod,
        target: Target::Check(check_user),
        show: Show::Never,
        status: Status::Works,
        help: "The user whose uid -u defaults to (looked up in this machine's user database; 1337 when there is no such user).",
    },
    FlagDef {
        flag: Flag::TproxyMark,
        short: Some('t'),
        long: Some("istio-inbound-tproxy-mark"),
        aliases: &[],
        env: &["ISTIO_INBOUND_TPROXY_MARK"],
        default: "1337",
        injected: None,
        annotations: &[],
        pod_note: "",
        kind: Kind::Text,
        origin: Origin::IstioIptables,
        scope: Scope::Pod,
        target: Target::Check(any),
        show: Show::Never,
        status: Status::NoOp("only used by -m TPROXY, which is refused"),
        help: "Packet mark of TPROXY mode.",
    },
    FlagDef {
        flag: Flag::TproxyRouteTable,
        short: Some('r'),
        long: Some("istio-inbound-tproxy-route-table"),
        aliases: &[],
        env: &["ISTIO_INBOUND_TPROXY_ROUTE_TABLE"],
        default: "133",
        injected: None,
        annotations: &[],
        pod_note: "",
        kind: Kind::Text,
        origin: Origin::IstioIptables,
        scope: Scope::Pod,
        target: Target::Check(any),
        show: Show::Never,
        status: Status::NoOp("only used by -m TPROXY, which is refused"),
        help: "Routing table of TPROXY mode.",
    },
    FlagDef {
        flag: Flag::DropInvalid,
        short: None,
        long: Some("drop-invalid"),
        aliases: &[],
        env: &["DROP_INVALID", "INVALID_DROP"],
        default: "false",
        injected: None,
        annotations: &[],
        pod_note: "",
        kind: Kind::Bool,
        origin: Origin::IstioIptables,
        scope: Scope::Pod,
        target: Target::Check(is_bool),
        show: Show::Never,
        status: Status::NoOp("no NAT, so no conntrack INVALID packets to drop: an out-of-window packet is never translated and reset by the wrong socket"),
        help: "Drop packets conntrack marks INVALID.",
    },
    FlagDef {
        flag: Flag::DualStack,
        short: None,
        long: Some("dual-stack"),
        aliases: &[],
        env: &["DUAL_STACK", "ISTIO_DUAL_STACK"],
        default: "false",
        injected: None,
        annotations: &[],
        pod_note: "the agent: ISTIO_DUAL_STACK in the istio-proxy container's env (the mesh's proxyMetadata), else in the pod's proxy.istio.io/config proxyMetadata",
        kind: Kind::Bool,
        origin: Origin::IstioIptables,
        scope: Scope::Pod,
        target: Target::Spec(|s, v| {
            s.dual_stack = parse::bool(v)?;
            Ok(())
        }),
        show: Show::IfSet(|s| flag_if(s.dual_stack)),
        status: Status::Works,
        help: "Capture IPv6 whenever the pod has an IPv6 address. Without it, as istio-iptables, IPv6 is captured only when the pod's first address is IPv6 (the kernel lists IPv4 addresses first; loopback and link-local ones do not count): a pod with both families then has only its IPv4 connections captured.",
    },
    FlagDef {
        flag: Flag::Accel,
        short: None,
        long: Some("accel"),
        aliases: &[],
        env: &[],
        default: "false",
        injected: None,
        annotations: &[],
        pod_note: "",
        kind: Kind::Bool,
        origin: Origin::Redirect,
        scope: Scope::Pod,
        target: Target::Spec(|s, v| {
            if parse::bool(v)? {
                s.accel_mode = AccelMode::Forced;
            }
            Ok(())
        }),
        show: Show::IfSet(|s| flag_if(s.accel_mode == AccelMode::Forced)),
        status: Status::Works,
        help: "Force socket-level (sockops/sk_msg) acceleration between app and proxy on, even where the kernel probe failed (see the acceleration docs: the app can then see spurious EAGAIN on blocking reads, EOF instead of ECONNRESET, and no flow control). Without --accel/--no-accel it is on exactly where the probe passed.",
    },
    FlagDef {
        flag: Flag::NoAccel,
        short: None,
        long: Some("no-accel"),
        aliases: &[],
        env: &[],
        default: "false",
        injected: None,
        annotations: &[],
        pod_note: "",
        kind: Kind::Bool,
        origin: Origin::Redirect,
        scope: Scope::Pod,
        target: Target::Spec(|s, v| {
            if parse::bool(v)? {
                s.accel_mode = AccelMode::Off;
            }
            Ok(())
        }),
        show: Show::IfSet(|s| flag_if(s.accel_mode == AccelMode::Off)),
        status: Status::Works,
        help: "Acceleration off for this pod (the kernel probe is not run).",
    },
    FlagDef {
        flag: Flag::AccelShortConns,
        short: None,
        long: Some("accel-short-conns"),
        aliases: &[],
        env: &[],
        default: "false",
        injected: None,
        annotations: &[],
        pod_note: "",
        kind: Kind::Bool,
        origin: Origin::Redirect,
        scope: Scope::Pod,
        target: Target::Spec(|s, v| {
            s.accel_short_conns = parse::bool(v)?;
            Ok(())
        }),
        show: Show::IfSet(|s| flag_if(s.accel_short_conns)),
        status: Status::Works,
        help: "Accelerate short-lived connections too (by default a port whose last 4 connections lived under 10 ms stays on the normal path until one lives longer).",
    },
    FlagDef {
        flag: Flag::DryRun,
        short: Some('n'),
        long: Some("dry-run"),
        aliases: &[],
        env: &["DRY_RUN"],
        default: "false",
        injected: None,
        annotations: &[],
        pod_note: "",
        kind: Kind::Bool,
        origin: Origin::IstioIptables,
        scope: Scope::Run,
        target: Target::Run(|r, v| {
            r.dry_run = parse::bool(v)?;
            Ok(())
        }),
        show: Show::Never,
        status: Status::Works,
        help: "Print the resulting pod config and change nothing.",
    },
    FlagDef {
        flag: Flag::SkipRuleApply,
        short: None,
        long: Some("skip-rule-apply"),
        aliases: &[],
        env: &["SKIP_RULE_APPLY"],
        default: "false",
        injected: None,
        annotations: &[],
        pod_note: "",
        kind: Kind::Bool,
        origin: Origin::IstioIptables,
        scope: Scope::Run,
        target: Target::Run(|r, v| {
            r.skip_rule_apply = parse::bool(v)?;
            Ok(())
        }),
        show: Show::Never,
        status: Status::Works,
        help: "Capture nothing (with --run-validation: only validate, as Istio's validation init container in CNI mode).",
    },
    FlagDef {
        flag: Flag::RunValidation,
        short: None,
        long: Some("run-validation"),
        aliases: &[],
        env: &["RUN_VALIDATION"],
        default: "false",
        injected: None,
        annotations: &[],
        pod_note: "",
        kind: Kind::Bool,
        origin: Origin::IstioIptables,
        scope: Scope::Run,
        target: Target::Run(|r, v| {
            r.run_validation = parse::bool(v)?;
            Ok(())
        }),
        show: Show::Never,
        status: Status::Works,
        help: "Then check the pod's capture as `redirect validate` does (exit code 126 when it fails, as istio-iptables).",
    },
    FlagDef {
        flag: Flag::IptablesProbePort,
        short: None,
        long: Some("iptables-probe-port"),
        aliases: &[],
        env: &["IPTABLES_PROBE_PORT"],
        default: "15002",
        injected: None,
        annotations: &[],
        pod_note: "",
        kind: Kind::Text,
        origin: Origin::IstioIptables,
        scope: Scope::Run,
        target: Target::Run(|r, v| {
            r.probe_port = parse::port(v)?;
            Ok(())
        }),
        show: Show::Never,
        status: Status::Works,
        help: "Original destination port of the validation probe.",
    },
    FlagDef {
        flag: Flag::ProbeTimeout,
        short: None,
        long: Some("probe-timeout"),
        aliases: &[],
        env: &["PROBE_TIMEOUT"],
        default: "5s",
        injected: None,
        annotations: &[],
        pod_note: "",
        kind: Kind::Text,
        origin: Origin::IstioIptables,
        scope: Scope::Run,
        target: Target::Run(|r, v| {
            r.probe_timeout = parse::duration(v)?;
            Ok(())
        }),
        show: Show::Never,
        status: Status::Works,
        help: "How long each validation step may take (a Go duration: 5s, 500ms).",
    },
    FlagDef {
        flag: Flag::NetworkNamespace,
        short: None,
        long: Some("network-namespace"),
        aliases: &[],
        env: &["NETWORK_NAMESPACE"],
        default: "",
        injected: None,
        annotations: &[],
        pod_note: "",
        kind: Kind::Text,
        origin: Origin::IstioIptables,
        scope: Scope::Run,
        target: Target::Run(|r, v| {
            r.network_namespace = (!v.trim().is_empty()).then(|| v.trim().into());
            Ok(())
        }),
        show: Show::Never,
        status: Status::Works,
        help: "The pod's network namespace (the same as --netns).",
    },
    FlagDef {
        flag: Flag::CleanupOnly,
        short: None,
        long: Some("cleanup-only"),
        aliases: &[],
        env: &["CLEANUP_ONLY"],
        default: "false",
        injected: None,
        annotations: &[],
        pod_note: "",
        kind: Kind::Bool,
        origin: Origin::IstioIptables,
        scope: Scope::Run,
        target: Target::Run(|r, v| {
            r.cleanup_only = parse::bool(v)?;
            Ok(())
        }),
        show: Show::Never,
        status: Status::Works,
        help: "Release the pod (as `redirect detach`) and capture nothing.",
    },
    FlagDef {
        flag: Flag::Reconcile,
        short: None,
        long: Some("reconcile"),
        aliases: &[],
        env: &["RECONCILE"],
        default: "false",
        injected: None,
        annotations: &[],
        pod_note: "",
        kind: Kind::Bool,
        origin: Origin::IstioIptables,
        scope: Scope::Run,
        target: Target::Check(is_bool),
        show: Show::Never,
        status: Status::NoOp("capturing a captured pod always replaces its config"),
        help: "Replace rules left by an earlier run.",
    },
    FlagDef {
        flag: Flag::ForceApply,
        short: None,
        long: Some("force-apply"),
        aliases: &[],
        env: &["FORCE_APPLY"],
        default: "false",
        injected: None,
        annotations: &[],
        pod_note: "",
        kind: Kind::Bool,
        origin: Origin::IstioIptables,
        scope: Scope::Run,
        target: Target::Check(is_bool),
        show: Show::Never,
        status: Status::NoOp(NOT_WITHOUT_NETFILTER),
        help: "Apply iptables rules even when they seem in place.",
    },
    FlagDef {
        flag: Flag::CniMode,
        short: None,
        long: Some("cni-mode"),
        aliases: &[],
        env: &["CNI_MODE"],
        default: "false",
        injected: None,
        annotations: &[],
        pod_note: "",
        kind: Kind::Bool,
        origin: Origin::IstioIptables,
        scope: Scope::Run,
        target: Target::Check(is_bool),
        show: Show::Never,
        status: Status::NoOp("it only chooses the iptables lock"),
        help: "Run as istio-cni does.",
    },
    FlagDef {
        flag: Flag::NativeNftables,
        short: None,
        long: Some("native-nftables"),
        aliases: &[],
        env: &["NATIVE_NFTABLES"],
        default: "false",
        injected: None,
        annotations: &[],
        pod_note: "",
        kind: Kind::Bool,
        origin: Origin::IstioIptables,
        scope: Scope::Run,
        target: Target::Check(is_bool),
        show: Show::Never,
        status: Status::NoOp("there are no nftables rules either"),
        help: "Use nftables instead of iptables.",
    },
    FlagDef {
        flag: Flag::ForceIptablesBinary,
        short: None,
        long: Some("force-iptables-binary"),
        aliases: &[],
        env: &["FORCE_IPTABLES_BINARY"],
        default: "",
        injected: None,
        annotations: &[],
        pod_note: "",
        kind: Kind::Text,
        origin: Origin::IstioIptables,
        scope: Scope::Run,
        target: Target::Check(check_iptables_binary),
        show: Show::Never,
        status: Status::NoOp("no iptables binary is run"),
        help: "Which iptables binary to run: legacy or nft.",
    },
    FlagDef {
        flag: Flag::LogOutputLevel,
        short: None,
        long: Some("log_output_level"),
        aliases: &[],
        env: &[],
        default: "default:info",
        injected: Some("default:info"),
        annotations: &[],
        pod_note: "sidecar.istio.io/agentLogLevel",
        kind: Kind::Text,
        origin: Origin::IstioLog,
        scope: Scope::Run,
        target: Target::Check(any),
        show: Show::Never,
        status: Status::NoOp("redirect logs with RUST_LOG levels (default: warnings only)"),
        help: "Istio log level per scope.",
    },
    FlagDef {
        flag: Flag::LogAsJson,
        short: None,
        long: Some("log_as_json"),
        aliases: &[],
        env: &[],
        default: "false",
        injected: None,
        annotations: &[],
        pod_note: "",
        kind: Kind::Bool,
        origin: Origin::IstioLog,
        scope: Scope::Run,
        target: Target::Check(is_bool),
        show: Show::Never,
        status: Status::NoOp("redirect's one-shot commands log plain text to stderr"),
        help: "Istio logs as JSON.",
    },
    FlagDef {
        flag: Flag::LogTarget,
        short: None,
        long: Some("log_target"),
        aliases: &[],
        env: &[],
        default: "stdout",
        injected: None,
        annotations: &[],
        pod_note: "",
        kind: Kind::Text,
        origin: Origin::IstioLog,
        scope: Scope::Run,
        target: Target::Check(any),
        show: Show::Never,
        status: Status::NoOp("redirect logs to stderr"),
        help: "Where Istio logs go.",
    },
    FlagDef {
        flag: Flag::LogStacktraceLevel,
        short: None,
        long: Some("log_stacktrace_level"),
        aliases: &[],
        env: &[],
        default: "default:none",
        injected: None,
        annotations: &[],
        pod_note: "",
        kind: Kind::Text,
        origin: Origin::IstioLog,
        scope: Scope::Run,
        target: Target::Check(any),
        show: Show::Never,
        status: Status::NoOp("Go stack traces have no equivalent"),
        help: "Istio log level of stack traces.",
    },
    FlagDef {
        flag: Flag::LogCaller,
        short: None,
        long: Some("log_caller"),
        aliases: &[],
        env: &[],
        default: "",
        injected: None,
        annotations: &[],
        pod_note: "",
        kind: Kind::Text,
        origin: Origin::IstioLog,
        scope: Scope::Run,
        target: Target::Check(any),
        show: Show::Never,
        status: Status::NoOp("Istio's log scopes have no equivalent"),
        help: "Istio scopes logged with their caller.",
    },
    FlagDef {
        flag: Flag::RestoreFormat,
        short: Some('f'),
        long: Some("restore-format"),
        aliases: &[],
        env: &[],
        default: "true",
        injected: None,
        annotations: &[],
        pod_note: "",
        kind: Kind::Bool,
        origin: Origin::IstioOlder,
        scope: Scope::Run,
        target: Target::Check(is_bool),
        show: Show::Never,
        status: Status::NoOp(NOT_WITHOUT_NETFILTER),
        help: "Print rules in iptables-restore format (older releases).",
    },
    FlagDef {
        flag: Flag::IptablesTraceLogging,
        short: None,
        long: Some("iptables-trace-logging"),
        aliases: &[],
        env: &[],
        default: "false",
        injected: None,
        annotations: &[],
        pod_note: "",
        kind: Kind::Bool,
        origin: Origin::IstioOlder,
        scope: Scope::Run,
        target: Target::Check(is_bool),
        show: Show::Never,
        status: Status::NoOp("no iptables LOG rules; `redirect stats` counts every decision"),
        help: "Log each rule hit with iptables' LOG target (older releases).",
    },
];

/// The table in Markdown, as `docs/flags.md` carries it (between its
/// `flag-table` markers).
pub fn markdown() -> String {
    let mut out = String::from(
        "| Flag | Long name (aliases) | Environment | Default | Injected | Annotation / source | Status |\n|---|---|---|---|---|---|---|\n",
    );
    let code = |s: &str| {
        if s.is_empty() {
            "(empty)".to_string()
        } else {
            format!("`{s}`")
        }
    };
    for d in &TABLE {
        let letter = d.short.map(|c| format!("`-{c}`")).unwrap_or_default();
        let mut long = d.long.map(|l| format!("`--{l}`")).unwrap_or_default();
        if !d.aliases.is_empty() {
            let a: Vec<String> = d.aliases.iter().map(|a| format!("`--{a}`")).collect();
            long.push_str(&format!(" ({})", a.join(", ")));
        }
        let env = d
            .env
            .iter()
            .map(|e| format!("`{e}`"))
            .collect::<Vec<_>>()
            .join(", ");
        let injected = d.injected.map(code).unwrap_or_default();
        let status = match d.status {
            Status::Works => match d.origin {
                Origin::Redirect => "works (redirect's own)".to_string(),
                _ => "works".to_string(),
            },
            Status::NoOp(why) => format!("accepted, no effect: {why}"),
            Status::NotYet { missing, .. } => {
                format!("not supported yet, refused when set: {missing}")
            }
        };
        let origin = match d.origin {
            Origin::IstioOlder => " (older istio-iptables)",
            Origin::IstioLog => " (Istio logging)",
            _ => "",
        };
        let mut source: Vec<String> = d.annotations.iter().map(|a| format!("`{a}`")).collect();
        if !d.pod_note.is_empty() {
            source.push(d.pod_note.to_string());
        }
        out.push_str(&format!(
            "| {letter} | {long}{origin} | {env} | {} | {injected} | {} | {status} |\n",
            code(d.default),
            source.join("; ")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_in_flag_order_and_names_are_unique() {
        let mut names = std::collections::HashSet::new();
        for (i, d) in TABLE.iter().enumerate() {
            assert_eq!(d.flag as usize, i, "{:?} is not at its index", d.flag);
            assert!(d.long.is_some() || !d.env.is_empty(), "{:?}", d.flag);
            for n in d
                .long
                .iter()
                .chain(d.aliases)
                .map(|s| s.to_string())
                .chain(d.short.map(|c| c.to_string()))
                .chain(d.env.iter().map(|s| s.to_string()))
            {
                assert!(names.insert(n.clone()), "{n} names two rows");
            }
        }
    }

    #[test]
    fn env_names_follow_istio_iptables() {
        // The long name upper-cased with '-' → '_' (its BindEnv), except
        // -p (no variable) and redirect's, logging and older flags.
        for d in &TABLE {
            let (Some(long), Origin::IstioIptables) = (d.long, d.origin) else {
                continue;
            };
            if d.flag == Flag::EnvoyPort {
                assert!(d.env.is_empty());
                continue;
            }
            assert_eq!(
                d.env.first().copied(),
                Some(long.to_uppercase().replace('-', "_").as_str()),
                "{long}"
            );
        }
    }
}
