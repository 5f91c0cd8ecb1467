//! `redirect explain`: the decision the kernel programs would take for one
//! connection in one captured pod, with the pod's live config (its pinned
//! map entries), and every rule on the way, in the order of the chain.
//!
//! There is no second implementation of the rules here: the decision is
//! redirect-common's `outbound_verdict_observed` / `inbound_verdict_observed`,
//! the very functions the kernel programs run (they pass `NoObserver`),
//! asking the pinned maps through the same `Lookup` trait. The observer
//! records each rule the decision evaluates; this module only words them.
//!
//! Around the decision, a few checks belong to the hook programs rather
//! than to the chain, and are shown as such (`"hook"` steps): whether the
//! process is in a cgroup the programs are attached to (`--pid`), and on
//! the inbound side what `sk_lookup` looks at before the chain (TCP, not
//! arriving on `lo`, a source outside the pod) and after it (a registered
//! listener on the inbound port).

use std::{
    net::{IpAddr, SocketAddr},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use aya::maps::lpm_trie::Key;
use redirect_common::{
    inbound_verdict_observed, is_local, outbound_verdict_observed, v4_mapped, CidrKeyData,
    CounterKey, Lookup, Observer, Outbound, Owner, PodConfig, PortKey, Reason, RouteEntry, Step,
    Verdict, AF_INET, AF_INET6, CIDR_KEY_FIXED_BITS, DNS_PORT, DNS_PROXY_PORT, IPPROTO_TCP,
    IPPROTO_UDP,
};
use serde::{Deserialize, Serialize};

use crate::{
    config::{addr_bytes, Cidr, InboundPorts, PodSpec},
    error::{Error, Result},
    maps::Maps,
    pins::Pins,
    sys::Netns,
};

/// What to explain: the CLI's flags, carried as they are by the agent's
/// `explain` op (the agent validates them the same way).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Query {
    /// The pod's network namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<PathBuf>,
    /// Or the pod's `namespace/name`, from the agent's pod records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// A connection from outside the pod (PREROUTING) instead of one the
    /// pod makes (OUTPUT).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub inbound: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// `ADDR:PORT`: where the connection goes.
    pub dst: String,
    /// Outbound: the address the socket is bound to; inbound: the peer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub src: Option<String>,
    /// `tcp` (default) or `udp`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proto: Option<String>,
    /// Inbound: the interface the connection arrives on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ifindex: Option<u32>,
}

/// The answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Explanation {
    pub netns_cookie: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// The pod's config as istio-iptables arguments.
    pub config: String,
    /// `outbound` or `inbound`.
    pub direction: String,
    /// The connection as decided (e.g. `tcp uid 1000 gid 1000 -> 10.0.0.1:80`).
    pub connection: String,
    /// The program that decides it (`cgroup/connect4`, `sk_lookup`, ...).
    pub program: String,
    /// `OUTPUT` or `PREROUTING`.
    pub chain: String,
    /// Every rule evaluated, in order; the last one decided.
    pub steps: Vec<ExplainStep>,
    pub verdict: ExplainVerdict,
    /// Things worth knowing about this connection that are not rules.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

/// One rule as evaluated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExplainStep {
    /// The rule as istio-init's table numbers it (`rule 4`), or the flag
    /// that makes it (`-o`), with the proxy id for the owner rules.
    pub rule: String,
    /// `decision`: a rule of the shared decision (what the kernel runs);
    /// `hook`: a check of the hook program around it.
    pub source: String,
    pub matched: bool,
    /// What was tested, in words.
    pub why: String,
    /// `no match`, or what the rule does (`RETURN (not captured)`,
    /// `REDIRECT to 127.0.0.1:15001`).
    pub outcome: String,
}

/// What happens to the connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExplainVerdict {
    /// iptables-style target: `REDIRECT`, `RETURN`, `REJECT`.
    pub target: String,
    /// `outbound` (the outbound capture port), `inbound` (the inbound
    /// capture port), `dns` (the DNS proxy), `untouched`, `refused`.
    pub action: String,
    /// Where it goes when redirected (`127.0.0.1:15001`, `:15006`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// The counter it moves (`OUTPUT/captured`, as `redirect stats
    /// --json` names chain and rule); none when no program counts it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counter: Option<String>,
    /// That counter's value now (`count_total`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counter_now: Option<u64>,
    /// The rule that decided, as `redirect stats` describes it.
    pub rule: String,
}

/// Checked flags: everything a decision needs, parsed.
struct Parsed {
    dst: SocketAddr,
    src: Option<IpAddr>,
    proto: u32,
}

fn invalid(field: &str, value: impl ToString, reason: impl Into<String>) -> Error {
    Error::InvalidFlag {
        field: field.into(),
        value: value.to_string(),
        reason: reason.into(),
    }
}

impl Query {
    /// Check the flags (before anything is read).
    fn parse(&self) -> Result<Parsed> {
        match (&self.netns, &self.pod) {
            (None, None) => {
                return Err(invalid(
                    "--netns",
                    "",
                    "name the pod: --netns <path> or --pod <namespace/name>",
                ))
            }
            (Some(n), Some(_)) => {
                return Err(invalid(
                    "--pod",
                    n.display(),
                    "give --netns or --pod, not both",
                ))
            }
            _ => {}
        }
        if let Some(p) = &self.pod {
            if p.split('/').count() != 2 || p.split('/').any(str::is_empty) {
                return Err(invalid("--pod", p, "expected <namespace>/<name>"));
            }
        }
        let dst: SocketAddr = self.dst.trim().parse().map_err(|_| {
            invalid(
                "--dst",
                &self.dst,
                "expected ADDR:PORT, e.g. 10.0.0.1:8080 or [fd00::1]:8080",
            )
        })?;
        if dst.port() == 0 {
            return Err(invalid("--dst", &self.dst, "port 0 is not a destination"));
        }
        let src = match &self.src {
            None => None,
            Some(s) => Some(s.trim().parse::<IpAddr>().map_err(|_| {
                invalid(
                    "--src",
                    s,
                    "expected an IP address (no port), e.g. 127.0.0.6 or ::6",
                )
            })?),
        };
        let proto = match self
            .proto
            .as_deref()
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            None | Some("tcp") => IPPROTO_TCP,
            Some("udp") => IPPROTO_UDP,
            Some(_) => {
                return Err(invalid(
                    "--proto",
                    self.proto.as_deref().unwrap_or_default(),
                    "expected tcp or udp",
                ))
            }
        };
        if self.inbound {
            for (flag, v) in [
                ("--uid", self.uid),
                ("--gid", self.gid),
                ("--pid", self.pid),
            ] {
                if let Some(v) = v {
                    return Err(invalid(
                        flag,
                        v,
                        "--inbound: the PREROUTING rules look at no process; leave it out",
                    ));
                }
            }
        } else {
            if let Some(i) = self.ifindex {
                return Err(invalid(
                    "--ifindex",
                    i,
                    "only with --inbound (the interface a connection arrives on)",
                ));
            }
            match (self.uid, self.pid) {
                (None, None) => {
                    return Err(invalid(
                        "--uid",
                        "",
                        "an outbound connection needs --uid <uid> [--gid <gid>] or --pid <pid>: the owner rules look at the process's ids",
                    ))
                }
                (Some(u), Some(_)) => {
                    return Err(invalid("--uid", u, "give --uid or --pid, not both"))
                }
                (None, Some(_)) if self.gid.is_some() => {
                    return Err(invalid(
                        "--gid",
                        self.gid.unwrap_or_default(),
                        "--pid reads the process's ids; --gid goes with --uid",
                    ))
                }
                _ => {}
            }
        }
        Ok(Parsed { dst, src, proto })
    }
}

/// The pod a query names.
pub struct Target {
    pub cookie: u64,
    pub netns: Option<String>,
    pub pod: Option<String>,
    pub cfg: PodConfig,
}

/// Find the captured pod of `--netns` or `--pod`; a clear error (listing
/// the captured pods) when it is not captured.
pub fn target(pins: &Pins, maps: &Maps, netns: Option<&Path>, pod: Option<&str>) -> Result<Target> {
    let records = crate::agent::records::Records::open_existing(pins)?;
    let name_of = |cookie: u64| -> Option<String> {
        records
            .as_ref()
            .and_then(|r| r.get(cookie))
            .map(|r| r.pod)
            .filter(|p| !p.is_empty())
    };
    let captured = || -> String {
        let pods = maps.pods();
        if pods.is_empty() {
            return "no pod is captured by this install".into();
        }
        let list: Vec<String> = pods
            .iter()
            .map(|(c, cfg)| {
                let name = name_of(*c)
                    .or_else(|| crate::sys::netns_name(cfg.netns_inode as u64))
                    .unwrap_or_else(|| "<no name found>".into());
                format!("{name} (netns cookie {c})")
            })
            .collect();
        format!("captured: {}", list.join(", "))
    };
    if let Some(path) = netns {
        let ns = Netns::open(path)?;
        let cookie = ns.cookie()?;
        let Some(cfg) = maps.pod(cookie) else {
            return Err(Error::NotCapturedAmong {
                netns: format!("{} (netns cookie {cookie})", path.display()),
                captured: captured(),
            });
        };
        return Ok(Target {
            cookie,
            netns: Some(path.display().to_string()),
            pod: name_of(cookie),
            cfg,
        });
    }
    let name = pod.unwrap_or_default();
    let found = records
        .as_ref()
        .map(|r| r.all())
        .unwrap_or_default()
        .into_iter()
        .find(|(_, r)| r.pod == name);
    let Some((cookie, rec)) = found else {
        return Err(invalid(
            "--pod",
            name,
            format!(
                "no captured pod of that name in the agent's records (pods are named when the agent captures them; otherwise use --netns); {}",
                captured()
            ),
        ));
    };
    let Some(cfg) = maps.pod(cookie) else {
        return Err(Error::NotCapturedAmong {
            netns: format!("pod {name} (netns cookie {cookie})"),
            captured: captured(),
        });
    };
    Ok(Target {
        cookie,
        netns: Some(rec.netns).filter(|n| !n.is_empty()),
        pod: Some(name.to_string()),
        cfg,
    })
}

/// The pinned maps as the decision's `Lookup`, for one pod: the same
/// questions the kernel programs ask of the same maps.
pub struct LiveLookup<'a> {
    pub maps: &'a Maps,
    pub cookie: u64,
}

impl Lookup for LiveLookup<'_> {
    fn port_listed(&self, kind: u16, port: u16) -> bool {
        let key = PortKey {
            netns: self.cookie,
            kind,
            port,
            _pad: 0,
        };
        self.maps.ports.get(&key, 0).is_ok()
    }

    fn cidr_contains(&self, kind: u32, addr: &[u8; 16]) -> bool {
        let key = Key::new(
            CIDR_KEY_FIXED_BITS + 128,
            CidrKeyData::new(self.cookie, kind, *addr),
        );
        self.maps.cidrs.get(&key, 0).is_ok()
    }

    fn route(&self, family: u16, addr: &[u8; 16]) -> Option<RouteEntry> {
        let key = Key::new(
            CIDR_KEY_FIXED_BITS + 128,
            CidrKeyData::new(self.cookie, family as u32, *addr),
        );
        self.maps.routes.as_ref()?.get(&key, 0).ok()
    }
}

/// Records every step the decision tells it.
#[derive(Default)]
pub struct Recorder(pub Vec<(Step, Option<Verdict>)>);

impl Observer for Recorder {
    fn step(&mut self, step: Step, decided: Option<Verdict>) {
        self.0.push((step, decided));
    }
}

/// A process, as the owner rules see it.
struct Task {
    uid: u32,
    gid: u32,
    groups: Vec<u32>,
    comm: String,
}

/// uid, gid (real, as `bpf_get_current_uid_gid` reads them), groups and
/// name of a process, from /proc/<pid>/status.
fn task(pid: u32) -> Result<Task> {
    let path = format!("/proc/{pid}/status");
    let s = std::fs::read_to_string(&path)
        .map_err(|e| invalid("--pid", pid, format!("no such process ({path}: {e})")))?;
    let field = |name: &str| -> Option<&str> {
        s.lines().find_map(|l| l.strip_prefix(name)).map(str::trim)
    };
    let first = |name: &str| -> Result<u32> {
        field(name)
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| invalid("--pid", pid, format!("{path} has no {name} line")))
    };
    Ok(Task {
        uid: first("Uid:")?,
        gid: first("Gid:")?,
        groups: field("Groups:")
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|g| g.parse().ok())
            .collect(),
        comm: field("Name:").unwrap_or_default().to_string(),
    })
}

/// Is the process's cgroup at or below one this install's programs are
/// attached to? Some(dir) when it is, None when not; Err when it cannot
/// tell.
fn attached_cgroup_of(pins: &Pins, pid: u32) -> std::result::Result<Option<PathBuf>, String> {
    let attached = pins.attached_cgroups();
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .map_err(|e| format!("/proc/{pid}/cgroup: {e}"))?;
    let rel = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or_else(|| format!("/proc/{pid}/cgroup has no cgroup2 line"))?;
    let root = crate::sys::cgroup2_mount().map_err(|e| e.to_string())?;
    let mut dir = root.join(rel.trim_start_matches('/'));
    loop {
        if let Ok(m) = std::fs::metadata(&dir) {
            if attached.contains(&m.ino()) {
                return Ok(Some(dir));
            }
        }
        if dir == root || !dir.pop() {
            return Ok(None);
        }
    }
}

fn netns_cookie_of_pid(pid: u32) -> Result<u64> {
    let path = PathBuf::from(format!("/proc/{pid}/ns/net"));
    let cannot = |e: String| {
        invalid(
            "--pid",
            pid,
            format!("cannot tell whether pid {pid} is in the pod's network namespace: {e}"),
        )
    };
    std::fs::metadata(&path).map_err(|e| cannot(format!("{}: {e}", path.display())))?;
    Netns::open(&path)
        .and_then(|n| n.cookie())
        .map_err(|e| cannot(format!("{e:#}")))
}

/// `--dst`/`--src` in the decision's form: family, address bytes (IPv4 in
/// the first 4), and whether a v4-mapped IPv6 address was folded to IPv4
/// (as the connect hook does: iptables sees IPv4 there).
fn decided_addr(a: IpAddr) -> (u16, [u8; 16], bool) {
    match a {
        IpAddr::V4(_) => (AF_INET, addr_bytes(a), false),
        IpAddr::V6(v6) => match v4_mapped(&v6.octets()) {
            Some(v4) => (AF_INET, v4, true),
            None => (AF_INET6, v6.octets(), false),
        },
    }
}

fn show_ip(family: u16, b: &[u8; 16]) -> IpAddr {
    if family == AF_INET {
        IpAddr::from([b[0], b[1], b[2], b[3]])
    } else {
        IpAddr::from(*b)
    }
}

fn list<T: ToString>(v: &[T]) -> String {
    if v.is_empty() {
        return "not set".into();
    }
    v.iter().map(T::to_string).collect::<Vec<_>>().join(",")
}

fn cidr_list(v: &[Cidr], v6: bool) -> String {
    if v.is_empty() {
        return "not set".into();
    }
    let of: Vec<String> = v
        .iter()
        .filter(|c| c.is_v6() == v6)
        .map(|c| c.to_string())
        .collect();
    if of.is_empty() {
        return format!("no IPv{} range", if v6 { 6 } else { 4 });
    }
    of.join(",")
}

/// Where a verdict sends the connection, as the connect hook rewrites it.
fn localhost(family: u16, v4_in_v6: bool, port: u16) -> String {
    match (family, v4_in_v6) {
        (AF_INET, false) => format!("127.0.0.1:{port}"),
        (AF_INET, true) => format!("[::ffff:127.0.0.1]:{port}"),
        _ => format!("[::1]:{port}"),
    }
}

/// What the outbound decision sees, for the words.
struct OutCtx<'a> {
    spec: &'a PodSpec,
    cfg: &'a PodConfig,
    c: &'a Outbound,
    v4_in_v6: bool,
}

impl OutCtx<'_> {
    fn dst(&self) -> IpAddr {
        show_ip(self.c.family, &self.c.dst)
    }
    fn v6(&self) -> bool {
        self.c.family == AF_INET6
    }
    fn to(&self, port: u16) -> String {
        localhost(self.c.family, self.v4_in_v6, port)
    }
    fn id(&self, owner: Owner) -> (&'static str, u32) {
        match owner {
            Owner::Uid => ("uid", self.c.uid),
            Owner::Gid => ("gid", self.c.gid),
        }
    }
}

/// The words of a verdict's effect (the `outcome` of the deciding step).
fn outcome(v: Verdict, to: &dyn Fn(u16) -> String, cfg: &PodConfig) -> String {
    match v {
        Verdict::ToOutbound(_) => format!("REDIRECT to the outbound port {}", to(cfg.proxy_port)),
        Verdict::ToInbound(_) => format!("REDIRECT to the inbound port {}", to(cfg.inbound_port)),
        Verdict::ToDns(_) => format!("REDIRECT to the DNS proxy {}", to(DNS_PROXY_PORT)),
        Verdict::Untouched(r) => format!("RETURN ({})", untouched_words(r)),
    }
}

fn untouched_words(r: Reason) -> &'static str {
    match r {
        Reason::OutNotTcp => "not captured: not TCP",
        Reason::OutExcludedPort | Reason::OutExcludedCidr | Reason::InExcludedPort => {
            "not captured: excluded"
        }
        Reason::OutPassthrough => "not captured: the proxy's passthrough to the app",
        Reason::OutAppLocal => "not captured: stays in the pod",
        Reason::OutProxyUid | Reason::OutProxyGid => "not captured: the proxy's own connection",
        Reason::OutLoopback => "not captured: host loopback",
        Reason::OutNotIncluded | Reason::InNotIncluded => "not captured: not included",
        Reason::InTunnelPort => "not captured: the tunnel port",
        Reason::OutIpv6NotCaptured | Reason::InIpv6NotCaptured => {
            "not captured: the pod's IPv6 is not captured"
        }
        _ => "not captured",
    }
}

/// One step of the outbound decision in words: (rule, why).
fn out_words(x: &OutCtx, step: Step, matched: bool) -> (String, String) {
    let dst = x.dst();
    let port = x.c.dport;
    let s = x.spec;
    match step {
        Step::Ipv6 { off } => ipv6_words(s, off),
        Step::Protocol { tcp, dns_udp } => (
            "-p tcp".into(),
            if tcp {
                "TCP".into()
            } else if dns_udp {
                "UDP to port 53 with DNS capture on: decided like TCP".into()
            } else if x.cfg.has(redirect_common::flags::DNS_CAPTURE) {
                format!("UDP to port {port}: only TCP and UDP port 53 (DNS capture) are captured")
            } else {
                "UDP: only TCP is captured (DNS capture is off)".into()
            },
        ),
        Step::ExcludedInterface {
            dst_local,
            excluded,
        } => (
            "-c".into(),
            if dst_local {
                format!("{dst} is local: it goes out of lo, not a -c interface")
            } else {
                format!(
                    "the pod routes {dst} out of {}a -c interface ({})",
                    if excluded { "" } else { "no " },
                    s.exclude_interfaces.join(",")
                )
            },
        ),
        Step::ExcludedPort { listed } => (
            "-o".into(),
            format!(
                "port {port} is {}in -o ({})",
                if listed { "" } else { "not " },
                list(&s.exclude_outbound_ports)
            ),
        ),
        Step::Passthrough {
            dst_local,
            src_passthrough,
            src_implied,
        } => {
            let src = if src_implied {
                format!("unbound, so {dst} (the address it dials)")
            } else if x.c.src == [0; 16] {
                "unbound".into()
            } else {
                show_ip(x.c.family, &x.c.src).to_string()
            };
            let why = if !dst_local {
                format!("{dst} is not an address of the pod (-o lo)")
            } else if src_passthrough {
                format!("{dst} is an address of the pod and the source, {src}, is the proxy's passthrough source 127.0.0.6/::6")
            } else {
                format!(
                    "{dst} is an address of the pod, but the source ({src}) is not 127.0.0.6/::6"
                )
            };
            ("rule 1".into(), why)
        }
        Step::ToInbound {
            owner,
            id,
            dst_local,
            dst_host_loopback,
            is_owner,
            tcp,
            tunnel_port,
            dns_port_skipped,
        } => {
            let (what, have) = x.id(owner);
            let n = if owner == Owner::Uid { 2 } else { 5 };
            let why = if matched {
                format!("{what} {id} is the proxy calling {dst}, an address of the pod other than the host loopback")
            } else if !dst_local {
                format!("{dst} is not an address of the pod (-o lo)")
            } else if dst_host_loopback {
                format!("{dst} is the host loopback, which the rule leaves out")
            } else if !is_owner {
                format!("{what} {have} is not {id}")
            } else if !tcp {
                "not TCP".into()
            } else if tunnel_port {
                format!("port {port} is the tunnel port (-e), which the rule leaves out")
            } else if dns_port_skipped {
                "port 53 is left to the DNS chain (DNS capture)".into()
            } else {
                "no match".into()
            };
            (format!("rule {n} ({what} {id})"), why)
        }
        Step::AppLocal {
            owner,
            id,
            dst_local,
            is_owner,
            present,
            dns_left,
        } => {
            let (what, have) = x.id(owner);
            let n = if owner == Owner::Uid { 3 } else { 6 };
            let why = if matched {
                format!("{dst} is an address of the pod and {what} {have} is not the proxy's {id}")
            } else if !present {
                "left out: -i names a loopback range (istio-iptables leaves it out then)".into()
            } else if !dst_local {
                format!("{dst} is not an address of the pod (-o lo)")
            } else if is_owner {
                format!("{what} {have} is the proxy's")
            } else if dns_left {
                "with DNS capture the rule only returns TCP to ports other than 53".into()
            } else {
                "no match".into()
            };
            (format!("rule {n} ({what} {id})"), why)
        }
        Step::ProxyId {
            owner,
            id,
            is_owner,
        } => {
            let (what, have) = x.id(owner);
            let n = if owner == Owner::Uid { 4 } else { 7 };
            let why = if is_owner {
                format!("{what} {id} is a proxy {what}")
            } else {
                format!("{what} {have} is not the proxy {what} {id}")
            };
            (format!("rule {n} ({what} {id})"), why)
        }
        Step::OwnerGroupsOnly { listed } => (
            "owner groups".into(),
            format!(
                "gid {} is {}in ISTIO_OUTBOUND_OWNER_GROUPS ({})",
                x.c.gid,
                if listed { "" } else { "not " },
                s.outbound_owner_groups.listed().join(",")
            ),
        ),
        Step::OwnerGroupsExcept { listed } => (
            "owner groups exclude".into(),
            format!(
                "gid {} is {}in ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE ({})",
                x.c.gid,
                if listed { "" } else { "not " },
                s.outbound_owner_groups.listed().join(",")
            ),
        ),
        Step::Dns {
            port53,
            tcp,
            capture_all,
            nameserver,
        } => {
            let why = if !port53 {
                format!("port {port} is not 53")
            } else if capture_all {
                format!(
                    "port 53 to any address is DNS ({})",
                    s.dns_capture().describe()
                )
            } else if nameserver {
                format!("port 53 to {dst}, a nameserver of the pod")
            } else if tcp {
                format!("{dst} is not a nameserver of the pod: TCP goes on down the chain")
            } else {
                format!("UDP port 53 to {dst}, not a nameserver of the pod: the rest of the chain only redirects TCP")
            };
            ("DNS".into(), why)
        }
        Step::HostLoopback { dst_host_loopback } => (
            "rule 8".into(),
            format!(
                "{dst} is {}the host loopback ({})",
                if dst_host_loopback { "" } else { "not " },
                if x.v6() {
                    "::1".to_string()
                } else {
                    s.ipv4_loopback_cidr_shown()
                }
            ),
        ),
        Step::ExcludedCidr { listed } => (
            "-x".into(),
            format!(
                "{dst} is {}in -x ({})",
                if listed { "" } else { "not " },
                cidr_list(&s.exclude_cidrs, x.v6())
            ),
        ),
        Step::IncludedPort { listed } => (
            "-q".into(),
            format!(
                "port {port} is {}in -q ({})",
                if listed { "" } else { "not " },
                list(&s.include_outbound_ports)
            ),
        ),
        Step::Included { all, listed } => {
            let why = if all {
                "-i '*' includes every destination".into()
            } else if listed {
                format!("{dst} is in -i ({})", cidr_list(&s.include_cidrs, x.v6()))
            } else {
                format!(
                    "{dst} is not in -i ({}): the end of the chain",
                    cidr_list(&s.include_cidrs, x.v6())
                )
            };
            ("rule 9 (-i)".into(), why)
        }
        other => (format!("{other:?}"), String::new()),
    }
}

/// The IPv6 step (either chain) in words: are there ip6tables rules?
fn ipv6_words(spec: &PodSpec, off: bool) -> (String, String) {
    (
        "ip6tables".into(),
        format!(
            "IPv6: {}{}",
            crate::ipv6::describe_recorded(off, spec.dual_stack),
            if off {
                ": istio-iptables writes no ip6tables rules"
            } else {
                ""
            }
        ),
    )
}

/// One step of the inbound decision in words.
fn in_words(spec: &PodSpec, cfg: &PodConfig, port: u16, step: Step) -> (String, String) {
    match step {
        Step::Ipv6 { off } => ipv6_words(spec, off),
        Step::InTunnelPort { tunnel_port } => (
            "-e".into(),
            format!(
                "port {port} is {}the inbound tunnel port ({})",
                if tunnel_port { "" } else { "not " },
                cfg.tunnel_port
            ),
        ),
        Step::InExcludedPort { listed } => (
            "-d".into(),
            format!(
                "port {port} is {}in -d ({})",
                if listed { "" } else { "not " },
                list(&spec.exclude_inbound_ports)
            ),
        ),
        Step::InCaptureAll => ("-b '*'".into(), "every other port is captured".into()),
        Step::InIncludedPort { configured, listed } => {
            let ports = match &spec.inbound_ports {
                InboundPorts::Listed(p) => list(p),
                _ => String::new(),
            };
            (
                "-b".into(),
                if !configured {
                    "-b is empty: no inbound port is captured".into()
                } else {
                    format!(
                        "port {port} is {}in -b ({ports})",
                        if listed { "" } else { "not " }
                    )
                },
            )
        }
        other => (format!("{other:?}"), String::new()),
    }
}

fn hook_step(rule: &str, matched: bool, why: String, outcome: &str) -> ExplainStep {
    ExplainStep {
        rule: rule.into(),
        source: "hook".into(),
        matched,
        why,
        outcome: outcome.into(),
    }
}

/// The counter of `r` for the pod (`count_total`).
fn counter_now(maps: &Maps, cookie: u64, r: Reason) -> Option<u64> {
    let key = CounterKey {
        netns: cookie,
        reason: r as u32,
        _pad: 0,
    };
    Some(
        maps.counters
            .get(&key, 0)
            .ok()
            .map(|v| v.iter().map(|c| c.count).sum())
            .unwrap_or(0),
    )
}

fn counter_name(r: Reason) -> String {
    format!("{}/{}", r.chain().name(), r.name())
}

/// Explain `q` against the install at `pins`.
pub fn explain(pins: &Pins, q: &Query) -> Result<Explanation> {
    let p = q.parse()?;
    let maps = Maps::open(pins)?;
    let t = target(pins, &maps, q.netns.as_deref(), q.pod.as_deref())?;
    let spec = PodSpec::from_kernel(
        &t.cfg,
        &maps.port_entries(t.cookie),
        &maps.cidr_entries(t.cookie),
    );
    let lookup = LiveLookup {
        maps: &maps,
        cookie: t.cookie,
    };
    let mut e = Explanation {
        netns_cookie: t.cookie,
        netns: t.netns.clone(),
        pod: t.pod.clone(),
        config: format!("istio-iptables {}", spec.istio_args()),
        direction: String::new(),
        connection: String::new(),
        program: String::new(),
        chain: String::new(),
        steps: Vec::new(),
        verdict: ExplainVerdict {
            target: String::new(),
            action: String::new(),
            to: None,
            counter: None,
            counter_now: None,
            rule: String::new(),
        },
        notes: Vec::new(),
    };
    if q.inbound {
        inbound(&mut e, &p, q, &spec, &t, &lookup, &maps)?;
    } else {
        outbound(&mut e, &p, q, &spec, &t, &lookup, &maps, pins)?;
    }
    Ok(e)
}

#[allow(clippy::too_many_arguments)]
fn outbound(
    e: &mut Explanation,
    p: &Parsed,
    q: &Query,
    spec: &PodSpec,
    t: &Target,
    lookup: &LiveLookup,
    maps: &Maps,
    pins: &Pins,
) -> Result<()> {
    let (family, dst, v4_in_v6) = decided_addr(p.dst.ip());
    let dialed_v6 = p.dst.is_ipv6();
    let src = match p.src {
        None => [0u8; 16],
        Some(s) => {
            let (sf, sb, _) = decided_addr(s);
            if sf != family {
                return Err(invalid(
                    "--src",
                    s,
                    format!(
                        "an IPv{} source for an IPv{} destination",
                        if sf == AF_INET { 4 } else { 6 },
                        if family == AF_INET { 4 } else { 6 }
                    ),
                ));
            }
            sb
        }
    };
    let who: String;
    let mut cgroup_attached: Option<bool> = None;
    let (uid, gid) = match (q.uid, q.pid) {
        (Some(u), _) => {
            let g = q.gid.unwrap_or(u);
            who = format!("uid {u} gid {g}");
            if q.gid.is_none() {
                e.notes
                    .push(format!("--gid not given: gid taken equal to the uid ({u})"));
            }
            (u, g)
        }
        (None, Some(pid)) => {
            let tk = task(pid)?;
            let ns = netns_cookie_of_pid(pid)?;
            if ns != t.cookie {
                return Err(invalid(
                    "--pid",
                    pid,
                    format!(
                        "pid {pid} is not in the pod's network namespace (its netns cookie is {ns}, the pod's is {})",
                        t.cookie
                    ),
                ));
            }
            who = format!("pid {pid} ({}) uid {} gid {}", tk.comm, tk.uid, tk.gid);
            if tk.groups.iter().any(|g| *g != tk.gid) {
                e.notes.push(format!(
                    "supplementary groups {} play no part: the owner rules and owner groups match the primary gid, as --gid-owner without --suppl-groups",
                    list(&tk.groups)
                ));
            }
            match attached_cgroup_of(pins, pid) {
                Ok(Some(dir)) => {
                    cgroup_attached = Some(true);
                    e.steps.push(hook_step(
                        "cgroup",
                        false,
                        format!(
                            "pid {pid}'s cgroup is at or below {}, where the programs are attached: they see its connections",
                            dir.display()
                        ),
                        "on to the rules",
                    ));
                }
                Ok(None) => {
                    cgroup_attached = Some(false);
                    e.steps.push(hook_step(
                        "cgroup",
                        true,
                        format!("pid {pid}'s cgroup is not at or below a cgroup this install is attached to (see `redirect status`): the programs never see its connections"),
                        "not seen: untouched, not counted",
                    ));
                }
                Err(why) => e.notes.push(format!(
                    "could not tell whether pid {pid}'s cgroup is one the programs see: {why}"
                )),
            }
            (tk.uid, tk.gid)
        }
        (None, None) => unreachable!("checked by parse"),
    };
    let c = Outbound {
        family,
        proto: p.proto,
        dst,
        dport: p.dst.port(),
        src,
        uid,
        gid,
    };
    let proto = if p.proto == IPPROTO_TCP { "tcp" } else { "udp" };
    let src_words = match p.src {
        None => "unbound".to_string(),
        Some(s) => s.to_string(),
    };
    e.direction = "outbound".into();
    e.chain = "OUTPUT".into();
    e.program = if dialed_v6 {
        "cgroup/connect6"
    } else {
        "cgroup/connect4"
    }
    .into();
    if p.proto == IPPROTO_UDP && c.dport == DNS_PORT {
        e.program = format!(
            "{} (a UDP connect), cgroup/sendmsg{} (a datagram sent with an address)",
            e.program,
            if dialed_v6 { 6 } else { 4 }
        );
    } else if p.proto == IPPROTO_UDP {
        e.notes.push(format!(
            "UDP to port {}: a connect() is decided here; datagrams sent with an address to a port other than 53 are not looked at (cgroup/sendmsg) and go out as sent, uncounted",
            c.dport
        ));
    }
    e.connection = format!("{proto} {who} -> {} (source {src_words})", p.dst);
    if v4_in_v6 {
        e.notes.push(
            "a v4-mapped IPv6 destination makes an IPv4 connection: decided as IPv4 (the IPv4 lists apply)"
                .into(),
        );
    }
    let mut rec = Recorder::default();
    let v = outbound_verdict_observed(&t.cfg, &c, lookup, &mut rec);
    let x = OutCtx {
        spec,
        cfg: &t.cfg,
        c: &c,
        v4_in_v6,
    };
    let to = |port: u16| x.to(port);
    for (step, decided) in &rec.0 {
        let (rule, why) = out_words(&x, *step, decided.is_some());
        let out = match decided {
            None if matches!(step, Step::Protocol { .. }) => "on to the rules".to_string(),
            None => "no match".to_string(),
            Some(v) => outcome(*v, &to, &t.cfg),
        };
        e.steps.push(ExplainStep {
            rule,
            source: "decision".into(),
            matched: decided.is_some(),
            why,
            outcome: out,
        });
    }
    let r = v.reason();
    let rule_name = e.steps.last().map(|s| s.rule.clone()).unwrap_or_default();
    e.verdict = match v {
        Verdict::Untouched(_) => ExplainVerdict {
            target: "RETURN".into(),
            action: "untouched".into(),
            to: None,
            counter: Some(counter_name(r)),
            counter_now: counter_now(maps, t.cookie, r),
            rule: format!("{rule_name}: {}", r.describe()),
        },
        Verdict::ToOutbound(_) | Verdict::ToInbound(_) | Verdict::ToDns(_) => {
            let (action, port) = match v {
                Verdict::ToOutbound(_) => ("outbound", t.cfg.proxy_port),
                Verdict::ToInbound(_) => ("inbound", t.cfg.inbound_port),
                _ => ("dns", DNS_PROXY_PORT),
            };
            e.notes.push(format!(
                "the original destination {} is recorded for SO_ORIGINAL_DST and getpeername; should that record not fit (REDIRECT_ORIG_BY_COOKIE full) the connect fails with EPERM (ERRORS/error_orig_map_full)",
                p.dst
            ));
            ExplainVerdict {
                target: "REDIRECT".into(),
                action: action.into(),
                to: Some(x.to(port)),
                counter: Some(counter_name(r)),
                counter_now: counter_now(maps, t.cookie, r),
                rule: format!("{rule_name}: {}", r.describe()),
            }
        }
    };
    if cgroup_attached == Some(false) {
        e.verdict = ExplainVerdict {
            target: "RETURN".into(),
            action: "untouched".into(),
            to: None,
            counter: None,
            counter_now: None,
            rule: "cgroup: the programs do not run for this process (were it in an attached cgroup, the rules above would decide)".into(),
        };
    }
    Ok(())
}

fn inbound(
    e: &mut Explanation,
    p: &Parsed,
    q: &Query,
    spec: &PodSpec,
    t: &Target,
    lookup: &LiveLookup,
    maps: &Maps,
) -> Result<()> {
    let (family, dst, mapped) = decided_addr(p.dst.ip());
    if mapped {
        return Err(invalid(
            "--dst",
            &q.dst,
            "inbound connections arrive as IPv4 or IPv6, not v4-mapped: give the IPv4 address",
        ));
    }
    e.direction = "inbound".into();
    e.chain = "PREROUTING".into();
    e.program = "sk_lookup (the pod's instance)".into();
    let src_words = match p.src {
        Some(s) => s.to_string(),
        None => "a peer outside the pod".into(),
    };
    e.connection = format!(
        "{} {src_words} -> {}{}",
        if p.proto == IPPROTO_TCP { "tcp" } else { "udp" },
        p.dst,
        q.ifindex
            .map(|i| format!(" (arriving on ifindex {i})"))
            .unwrap_or_default()
    );
    let untouched = |rule: &str| ExplainVerdict {
        target: "RETURN".into(),
        action: "untouched".into(),
        to: None,
        counter: None,
        counter_now: None,
        rule: rule.into(),
    };
    // What sk_lookup looks at before the chain (inbound.rs).
    if p.proto != IPPROTO_TCP {
        e.steps.push(hook_step(
            "-p tcp",
            true,
            "UDP: sk_lookup only steers TCP".into(),
            "RETURN (not captured, not counted)",
        ));
        e.verdict = untouched("-p tcp: only TCP is captured inbound");
        return Ok(());
    }
    e.steps
        .push(hook_step("-p tcp", false, "TCP".into(), "on to the rules"));
    const LOOPBACK_IFINDEX: u32 = 1;
    if q.ifindex == Some(LOOPBACK_IFINDEX) {
        e.steps.push(hook_step(
            "lo",
            true,
            "arriving on lo (ifindex 1): the pod's own traffic, which PREROUTING never sees".into(),
            "RETURN (not captured, not counted)",
        ));
        e.verdict = untouched("lo: the pod's own traffic");
        return Ok(());
    }
    e.steps.push(hook_step(
        "lo",
        false,
        match q.ifindex {
            Some(i) => format!("arriving on ifindex {i}, not lo"),
            None => "not arriving on lo (--ifindex not given)".into(),
        },
        "no match",
    ));
    if let Some(s) = p.src {
        let (sf, sb, _) = decided_addr(s);
        if sf != family {
            return Err(invalid(
                "--src",
                s,
                "the peer's address family must be the destination's",
            ));
        }
        if is_local(family, &sb, lookup) {
            e.steps.push(hook_step(
                "source",
                true,
                format!(
                    "{s} is an address of the pod: its own traffic, which PREROUTING never sees"
                ),
                "RETURN (not captured, not counted)",
            ));
            e.verdict = untouched("source: the pod's own traffic");
            return Ok(());
        }
        e.steps.push(hook_step(
            "source",
            false,
            format!("{s} is not an address of the pod: from outside"),
            "no match",
        ));
    } else {
        e.steps.push(hook_step(
            "source",
            false,
            "--src not given: taken as a peer outside the pod".into(),
            "no match",
        ));
    }
    if !is_local(family, &dst, lookup) {
        e.notes.push(format!(
            "{} is not an address of the pod: a connection to it would not reach the pod's sockets",
            p.dst.ip()
        ));
    }
    let port = p.dst.port();
    let mut rec = Recorder::default();
    let v = inbound_verdict_observed(&t.cfg, family, port, lookup, &mut rec);
    let to = |port: u16| format!(":{port}");
    for (step, decided) in &rec.0 {
        let (rule, why) = in_words(spec, &t.cfg, port, *step);
        e.steps.push(ExplainStep {
            rule,
            source: "decision".into(),
            matched: decided.is_some(),
            why,
            outcome: match decided {
                None => "no match".into(),
                Some(v) => outcome(*v, &to, &t.cfg),
            },
        });
    }
    let rule_name = e.steps.last().map(|s| s.rule.clone()).unwrap_or_default();
    if let Verdict::Untouched(r) = v {
        e.verdict = ExplainVerdict {
            target: "RETURN".into(),
            action: "untouched".into(),
            to: None,
            counter: Some(counter_name(r)),
            counter_now: counter_now(maps, t.cookie, r),
            rule: format!("{rule_name}: {}", r.describe()),
        };
        return Ok(());
    }
    // After the chain: the proxy's listener (a dual-stack [::] one also
    // serves IPv4).
    let fams = maps.listener_families(t.cookie);
    let want = if family == AF_INET { "ipv4" } else { "ipv6" };
    let serving: Vec<&str> = fams
        .iter()
        .copied()
        .filter(|f| *f == want || (family == AF_INET && *f == "ipv6"))
        .collect();
    let inport = t.cfg.inbound_port;
    if serving.is_empty() {
        e.steps.push(hook_step(
            "listener",
            true,
            format!("no proxy listener is registered on :{inport} for {want} (the proxy is not listening)"),
            "REJECT (connection refused)",
        ));
        let r = Reason::InNoListener;
        e.verdict = ExplainVerdict {
            target: "REJECT".into(),
            action: "refused".into(),
            to: None,
            counter: Some(counter_name(r)),
            counter_now: counter_now(maps, t.cookie, r),
            rule: format!("listener: {}", r.describe()),
        };
        return Ok(());
    }
    e.steps.push(hook_step(
        "listener",
        false,
        format!(
            "the proxy's {} listener on :{inport} is registered",
            serving.join(" and ")
        ),
        &format!("REDIRECT to the inbound port :{inport}"),
    ));
    let r = v.reason();
    e.verdict = ExplainVerdict {
        target: "REDIRECT".into(),
        action: "inbound".into(),
        to: Some(format!(":{inport}")),
        counter: Some(counter_name(r)),
        counter_now: counter_now(maps, t.cookie, r),
        rule: format!("{rule_name}: {}", r.describe()),
    };
    e.notes.push(format!(
        "the connection keeps its local address {}: the proxy's SO_ORIGINAL_DST answer is that address",
        p.dst
    ));
    Ok(())
}

/// The explanation as text: the pod, the connection, one line per rule in
/// chain order, the verdict.
pub fn render(e: &Explanation) -> String {
    let mut out = String::new();
    let who = match (&e.pod, &e.netns) {
        (Some(p), Some(n)) => format!("pod {p} ({n}, netns cookie {})", e.netns_cookie),
        (Some(p), None) => format!("pod {p} (netns cookie {})", e.netns_cookie),
        (None, Some(n)) => format!("pod {n} (netns cookie {})", e.netns_cookie),
        (None, None) => format!("netns cookie {}", e.netns_cookie),
    };
    out.push_str(&format!("{who}\n  {}\n", e.config));
    out.push_str(&format!(
        "{} {}\nchain {} ({}), first match wins:\n",
        e.direction, e.connection, e.chain, e.program
    ));
    let width = e.steps.iter().map(|s| s.rule.len()).max().unwrap_or(0);
    for s in &e.steps {
        out.push_str(&format!(
            "  {:width$}  {} -> {}\n",
            s.rule,
            s.why,
            s.outcome,
            width = width
        ));
    }
    let v = &e.verdict;
    let mut line = format!("verdict: {}", v.target);
    if let Some(to) = &v.to {
        line.push_str(&format!(" to {to}"));
    }
    line.push_str(&format!(" by {}", v.rule));
    out.push_str(&line);
    out.push('\n');
    match (&v.counter, v.counter_now) {
        (Some(c), Some(n)) => out.push_str(&format!("counted as {c} ({n} so far)\n")),
        (Some(c), None) => out.push_str(&format!("counted as {c}\n")),
        _ => out.push_str("not counted\n"),
    }
    for n in &e.notes {
        out.push_str(&format!("note: {n}\n"));
    }
    out
}
