//! Seeded, reproducible pod configurations (istio-iptables arguments and
//! environment, as a user passes them) and connections to try in them.
//!
//! Every choice is drawn from one generator, whatever redirect supports:
//! a knob redirect does not take yet is still drawn (so a seed means the
//! same configurations before and after it lands), then left out, or
//! given to the reference only, or written another way, as
//! [`super::known::OPTIONAL`] says, and counted.

use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, SocketAddr},
};

use super::{known::Feature, net::Proto, topo};

/// splitmix64: small, fast, and the same on every machine.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// 0..n
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: u32) -> bool {
        self.below(100) < percent as usize
    }

    pub fn pick<T: Clone>(&mut self, from: &[T]) -> T {
        from[self.below(from.len())].clone()
    }

    /// 1..=max distinct items, in random order.
    pub fn some<T: Clone + PartialEq>(&mut self, from: &[T], max: usize) -> Vec<T> {
        let n = 1 + self.below(max.min(from.len()));
        let mut out = Vec::new();
        while out.len() < n {
            let x = self.pick(from);
            if !out.contains(&x) {
                out.push(x);
            }
        }
        out
    }
}

/// A caller's identity: uid, primary gid, supplementary groups.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ids {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

impl fmt::Display for Ids {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "uid={} gid={}", self.uid, self.gid)?;
        if !self.groups.is_empty() {
            let g: Vec<String> = self.groups.iter().map(u32::to_string).collect();
            write!(f, " groups={}", g.join(","))?;
        }
        Ok(())
    }
}

/// The app's identity.
pub const APP: u32 = 1000;
/// Ids the generator draws proxy uids and gids from.
const ID_POOL: [u32; 4] = [1337, 1338, 2000, 3000];
/// An id in no list.
const OTHER: u32 = 4242;

/// What a configuration turned on, in the generator's terms (for the
/// connection choices, the allow-list and the report).
#[derive(Clone, Debug, Default)]
pub struct Knobs {
    pub proxy_port: u16,
    pub inbound_port: u16,
    pub tunnel_port: u16,
    /// The proxy uids and gids in effect (defaults applied).
    pub uids: Vec<u32>,
    pub gids: Vec<u32>,
    /// `-i` as given (`*`, a list, or empty).
    pub include: String,
    pub exclude: String,
    pub include_ports: Vec<u16>,
    pub exclude_ports: Vec<u16>,
    /// `-b` as given.
    pub inbound: String,
    pub inbound_exclude: Vec<u16>,
    pub dual_stack: bool,
    pub dry_run: bool,
    /// DNS capture as given to the reference.
    pub dns: bool,
    pub capture_all_dns: bool,
}

/// One pod configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub id: usize,
    /// istio-iptables' arguments, for both sides.
    pub args: Vec<String>,
    /// Environment variables, for both sides (only when redirect reads
    /// them: [`Feature::EnvForms`]).
    pub env: Vec<(String, String)>,
    /// Arguments for the reference only: knobs whose effect redirect has
    /// without taking the flag ([`super::known::Fallback::ReferenceOnly`]).
    pub reference_only: Vec<String>,
    /// redirect's own flags (acceleration), not istio-iptables'.
    pub redirect_only: Vec<String>,
    /// The pod's resolv.conf nameservers.
    pub nameservers: Vec<IpAddr>,
    /// Who the proxy runs as.
    pub proxy: Ids,
    pub knobs: Knobs,
    /// The optional features it drew that redirect does not take.
    pub left_out: Vec<Feature>,
}

fn shell_word(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_=./:,".contains(c))
    {
        s.to_string()
    } else {
        format!("'{s}'")
    }
}

fn words(args: &[String]) -> String {
    args.iter()
        .map(|a| shell_word(a))
        .collect::<Vec<_>>()
        .join(" ")
}

impl Config {
    /// A fixed configuration (no environment, nameservers or redirect-only
    /// flags): `args` for both sides, `reference_only` for the reference;
    /// the proxy runs as the first `-u` and `-g` ids.
    pub fn fixed(args: &[&str], reference_only: &[&str]) -> Config {
        let all: Vec<&str> = args.iter().chain(reference_only).copied().collect();
        let c = crate::istio_rules::IstioConfig::parse(&all, |_| None)
            .unwrap_or_else(|e| panic!("{all:?}: {e}"));
        let ids = |s: &str| -> Vec<u32> {
            crate::istio_rules::split(s)
                .iter()
                .map(|i| i.parse().expect("numeric ids"))
                .collect()
        };
        let uids = if c.proxy_uid.is_empty() {
            vec![1337]
        } else {
            ids(&c.proxy_uid)
        };
        let gids = if c.proxy_gid.is_empty() {
            uids.clone()
        } else {
            ids(&c.proxy_gid)
        };
        let port = |s: &str| s.parse::<u16>().expect("a port");
        let ports = |s: &str| -> Vec<u16> {
            crate::istio_rules::split(s)
                .iter()
                .map(|p| port(p))
                .collect()
        };
        let knobs = Knobs {
            proxy_port: port(&c.proxy_port),
            inbound_port: port(&c.inbound_capture_port),
            tunnel_port: port(&c.inbound_tunnel_port),
            include: c.outbound_ip_ranges_include.clone(),
            exclude: c.outbound_ip_ranges_exclude.clone(),
            include_ports: ports(&c.outbound_ports_include),
            exclude_ports: ports(&c.outbound_ports_exclude),
            inbound: c.inbound_ports_include.clone(),
            inbound_exclude: ports(&c.inbound_ports_exclude),
            dual_stack: c.dual_stack,
            dry_run: c.dry_run,
            dns: c.redirect_dns,
            capture_all_dns: c.capture_all_dns,
            uids,
            gids,
        };
        Config {
            id: 0,
            args: args.iter().map(|s| s.to_string()).collect(),
            env: Vec::new(),
            reference_only: reference_only.iter().map(|s| s.to_string()).collect(),
            redirect_only: Vec::new(),
            nameservers: Vec::new(),
            proxy: Ids {
                uid: knobs.uids[0],
                gid: knobs.gids[0],
                groups: vec![],
            },
            knobs,
            left_out: Vec::new(),
        }
    }

    /// `[K=V ...] istio-iptables <args>` as the reference runs it.
    pub fn istio_line(&self) -> String {
        let mut s = String::new();
        for (k, v) in &self.env {
            s.push_str(&format!("{k}={} ", shell_word(v)));
        }
        let mut a = self.args.clone();
        a.extend(self.reference_only.iter().cloned());
        s.push_str(&format!("istio-iptables {}", words(&a)));
        s
    }

    /// redirect's arguments after the subcommand.
    pub fn redirect_args(&self) -> Vec<String> {
        let mut a = self.args.clone();
        a.extend(self.redirect_only.iter().cloned());
        a
    }

    pub fn redirect_line(&self, sub: &str) -> String {
        let mut s = String::new();
        for (k, v) in &self.env {
            s.push_str(&format!("{k}={} ", shell_word(v)));
        }
        s.push_str(&format!("redirect {sub} {}", words(&self.redirect_args())));
        s
    }
}

/// Where a connection starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// A process in the pod (its netns and cgroup).
    Pod(Ids),
    /// A client in the upstream netns: inbound to the pod.
    Outside,
}

/// One connection to try in both pods.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conn {
    pub origin: Origin,
    pub proto: Proto,
    pub dst: SocketAddr,
    pub bind: Option<IpAddr>,
    /// What the generator meant to exercise.
    pub kind: &'static str,
}

impl fmt::Display for Conn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let proto = match self.proto {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Mptcp => "mptcp",
        };
        match &self.origin {
            Origin::Pod(ids) => write!(f, "{proto} from the pod as {ids}")?,
            Origin::Outside => write!(f, "{proto} from outside")?,
        }
        if let Some(b) = self.bind {
            write!(f, " bound to {b}")?;
        }
        write!(f, " to {} ({})", self.dst, self.kind)
    }
}

/// CIDRs the lists are drawn from: around every address of the test's
/// namespaces, loopback ranges, default routes, IPv4-mapped forms.
const CIDRS: [&str; 24] = [
    "10.200.0.0/24",
    "10.200.0.0/28",
    "10.200.0.16/28",
    "10.200.0.20/30",
    "10.200.0.1/32",
    "10.200.0.2/32",
    "10.201.0.0/16",
    "10.201.0.1/24",
    "10.0.0.0/8",
    "0.0.0.0/0",
    "127.0.0.0/8",
    "127.0.0.1/32",
    "127.0.0.5/32",
    "fd00:200::/64",
    "fd00:200::/124",
    "fd00:200::10/124",
    "fd00:200::1/128",
    "fd00:200::2/128",
    "fd00:201::/64",
    "::/0",
    "::1/128",
    "::ffff:0:0/96",
    "::ffff:10.200.0.1/128",
    "::ffff:127.0.0.1/128",
];

/// Ports the outbound lists (`-q`, `-o`) are drawn from.
const OUT_PORTS: [u16; 10] = [22, 53, 80, 443, 8080, 8081, 9080, 9081, 15008, 7777];
/// Ports the inbound lists (`-b`, `-d`) are drawn from.
const IN_PORTS: [u16; 11] = [
    22, 53, 80, 8080, 9080, 9081, 15008, 15020, 15021, 15090, 7777,
];

/// A flag's letter and istio-iptables' long name.
struct Name {
    short: char,
    long: &'static str,
}

const P: Name = Name {
    short: 'p',
    long: "envoy-port",
};
const Z: Name = Name {
    short: 'z',
    long: "inbound-capture-port",
};
const E: Name = Name {
    short: 'e',
    long: "inbound-tunnel-port",
};
const U: Name = Name {
    short: 'u',
    long: "proxy-uid",
};
const G: Name = Name {
    short: 'g',
    long: "proxy-gid",
};
const M: Name = Name {
    short: 'm',
    long: "istio-inbound-interception-mode",
};
const I: Name = Name {
    short: 'i',
    long: "istio-service-cidr",
};
const X: Name = Name {
    short: 'x',
    long: "istio-service-exclude-cidr",
};
const Q: Name = Name {
    short: 'q',
    long: "istio-outbound-ports",
};
const O: Name = Name {
    short: 'o',
    long: "istio-local-outbound-ports-exclude",
};
const B: Name = Name {
    short: 'b',
    long: "istio-inbound-ports",
};
const D: Name = Name {
    short: 'd',
    long: "istio-local-exclude-ports",
};
const C: Name = Name {
    short: 'c',
    long: "istio-exclude-interfaces",
};
const K: Name = Name {
    short: 'k',
    long: "kube-virt-interfaces",
};
const N: Name = Name {
    short: 'n',
    long: "dry-run",
};

fn join<T: ToString>(v: &[T]) -> String {
    v.iter().map(T::to_string).collect::<Vec<_>>().join(",")
}

/// Builds one configuration's arguments and environment.
struct Render<'a> {
    rng: &'a mut Rng,
    supported: &'a dyn Fn(Feature) -> bool,
    c: Config,
}

impl Render<'_> {
    /// Is `f` taken by redirect? If not, count it as left out.
    fn takes(&mut self, f: Feature) -> bool {
        if (self.supported)(f) {
            return true;
        }
        if !self.c.left_out.contains(&f) {
            self.c.left_out.push(f);
        }
        false
    }

    /// A valued flag in one of the forms istio-iptables reads: `-x v`,
    /// `-xv`, `--long v`, `--long=v`, or its environment variable.
    fn flag(&mut self, n: &Name, value: &str) {
        self.flag_if(true, n, value)
    }

    /// [`Render::flag`], written only when `on`; the draws are the same
    /// either way.
    fn flag_if(&mut self, on: bool, n: &Name, value: &str) {
        let form = self.rng.below(100);
        let env_form = self.rng.chance(20);
        if !on {
            return;
        }
        if env_form {
            if let Some(var) = crate::istio_rules::env_name(n.long) {
                if self.takes(Feature::EnvForms) {
                    self.c.env.push((var, value.to_string()));
                    return;
                }
            }
        }
        // Istio's long name for -q is newer than redirect's.
        let long = form >= 55;
        let form = if long && n.short == 'q' && !self.takes(Feature::OutboundPortsLongName) {
            0
        } else {
            form
        };
        let a = &mut self.c.args;
        match form {
            _ if value.is_empty() && form < 55 => {
                a.extend([format!("-{}", n.short), String::new()])
            }
            0..=39 => a.extend([format!("-{}", n.short), value.to_string()]),
            40..=54 => a.push(format!("-{}{value}", n.short)),
            55..=79 => a.extend([format!("--{}", n.long), value.to_string()]),
            _ if value.is_empty() => a.extend([format!("--{}", n.long), String::new()]),
            _ => a.push(format!("--{}={value}", n.long)),
        }
    }

    /// A boolean flag, written only when `on`: `--name`, `--name=true`,
    /// or one of its variables. The draws are the same either way.
    fn switch_if(&mut self, on: bool, long: &str, extra_env: Option<&str>) {
        let env_form = self.rng.chance(20);
        let extra = self.rng.chance(50);
        let v = self.rng.pick(&["true", "1", "TRUE"]).to_string();
        let bare = self.rng.chance(70);
        if !on {
            return;
        }
        if env_form && self.takes(Feature::EnvForms) {
            let var = match extra_env {
                Some(v) if extra => v.to_string(),
                _ => long.to_uppercase().replace('-', "_"),
            };
            self.c.env.push((var, v));
        } else if bare {
            self.c.args.push(format!("--{long}"));
        } else {
            self.c.args.push(format!("--{long}=true"));
        }
    }

    /// An environment-only setting: taken only when redirect reads the
    /// environment and the setting itself.
    fn env_only(&mut self, f: Feature, var: &str, value: &str) {
        let env = self.takes(Feature::EnvForms);
        if self.takes(f) && env {
            self.c.env.push((var.to_string(), value.to_string()));
        }
    }
}

/// The configuration generator (one seed, configurations in order).
pub struct Generator {
    rng: Rng,
    next: usize,
    /// Configurations that drew a feature redirect does not take, per
    /// feature.
    pub left_out: BTreeMap<Feature, usize>,
}

impl Generator {
    pub fn new(seed: u64) -> Generator {
        Generator {
            rng: Rng::new(seed),
            next: 0,
            left_out: BTreeMap::new(),
        }
    }

    /// The next configuration; `supported` says which optional features
    /// redirect takes.
    pub fn config(&mut self, supported: &dyn Fn(Feature) -> bool) -> Config {
        let id = self.next;
        self.next += 1;
        let mut r = Render {
            rng: &mut self.rng,
            supported,
            c: Config {
                id,
                args: Vec::new(),
                env: Vec::new(),
                reference_only: Vec::new(),
                redirect_only: Vec::new(),
                nameservers: Vec::new(),
                proxy: Ids {
                    uid: 0,
                    gid: 0,
                    groups: vec![],
                },
                knobs: Knobs::default(),
                left_out: Vec::new(),
            },
        };
        let mut k = Knobs {
            proxy_port: 15001,
            inbound_port: 15006,
            tunnel_port: 15008,
            ..Knobs::default()
        };
        // Ports.
        match r.rng.below(100) {
            0..=69 => {}
            70..=84 => r.flag(&P, "15001"),
            _ => {
                k.proxy_port = 16001;
                r.flag(&P, "16001");
            }
        }
        match r.rng.below(100) {
            0..=69 => {}
            70..=84 => r.flag(&Z, "15006"),
            _ => {
                k.inbound_port = 16006;
                r.flag(&Z, "16006");
            }
        }
        match r.rng.below(100) {
            0..=69 => {}
            70..=79 => r.flag(&E, "15008"),
            _ => {
                k.tunnel_port = 9081;
                r.flag(&E, "9081");
            }
        }
        // Proxy ids. Without -u: the ENVOY_USER's uid, 1337 here.
        k.uids = if r.rng.chance(10) {
            vec![1337]
        } else {
            let u = r.rng.some(&ID_POOL, 3);
            r.flag(&U, &join(&u));
            u
        };
        k.gids = if r.rng.chance(50) {
            k.uids.clone()
        } else {
            let g = r.rng.some(&ID_POOL, 3);
            r.flag(&G, &join(&g));
            g
        };
        if r.rng.chance(70) {
            r.flag(&M, "REDIRECT");
        }
        // Outbound lists.
        k.include = match r.rng.below(100) {
            0..=34 => "*".to_string(),
            35..=44 => String::new(),
            _ => join(&r.rng.some(&CIDRS, 4)),
        };
        if !k.include.is_empty() || r.rng.chance(50) {
            r.flag(&I, &k.include.clone());
        }
        k.exclude = match r.rng.below(100) {
            0..=49 => String::new(),
            _ => join(&r.rng.some(&CIDRS, 3)),
        };
        if !k.exclude.is_empty() || r.rng.chance(20) {
            r.flag(&X, &k.exclude.clone());
        }
        if r.rng.chance(40) {
            k.include_ports = r.rng.some(&OUT_PORTS, 3);
            r.flag(&Q, &join(&k.include_ports));
        }
        if r.rng.chance(40) {
            k.exclude_ports = r.rng.some(&OUT_PORTS, 3);
            r.flag(&O, &join(&k.exclude_ports));
        }
        // Inbound.
        k.inbound = match r.rng.below(100) {
            0..=44 => "*".to_string(),
            45..=64 => String::new(),
            _ => join(&r.rng.some(&IN_PORTS, 3)),
        };
        if !k.inbound.is_empty() || r.rng.chance(50) {
            r.flag(&B, &k.inbound.clone());
        }
        match r.rng.below(100) {
            0..=39 => {}
            40..=49 => {
                k.inbound_exclude = vec![15090, 15021, 15020];
                r.flag(&D, "15090,15021,15020");
            }
            _ => {
                k.inbound_exclude = r.rng.some(&IN_PORTS, 3);
                let mut d = join(&k.inbound_exclude);
                if r.rng.chance(10) {
                    d.push(','); // istio-iptables skips empty items
                }
                r.flag(&D, &d);
            }
        }
        // Switches.
        k.dry_run = r.rng.chance(4);
        let short = r.rng.chance(50);
        if k.dry_run {
            // -n takes no value.
            r.c.args.push(if short {
                format!("-{}", N.short)
            } else {
                format!("--{}", N.long)
            });
        }
        // Both sides get it: without it, a pod whose first address is
        // IPv4 has its IPv6 left alone by both.
        k.dual_stack = r.rng.chance(85);
        r.switch_if(k.dual_stack, "dual-stack", Some("ISTIO_DUAL_STACK"));
        // DNS capture, with the pod's nameservers.
        let dns = r.rng.chance(25);
        let all = r.rng.chance(40);
        let ns = r
            .rng
            .some(&["127.0.0.53", topo::UP_V4[0], topo::UP_V6[0]], 2);
        k.dns = dns && r.takes(Feature::RedirectDns);
        r.switch_if(k.dns, "redirect-dns", Some("ISTIO_META_DNS_CAPTURE"));
        if k.dns {
            r.c.nameservers = ns.iter().map(|a| a.parse().unwrap()).collect();
        }
        k.capture_all_dns = dns && all && r.takes(Feature::CaptureAllDns) && k.dns;
        r.switch_if(k.capture_all_dns, "capture-all-dns", None);
        let nic = r.rng.pick(&["eth0", "eth9"]);
        let on = r.rng.chance(10) && r.takes(Feature::ExcludeInterfaces);
        r.flag_if(on, &C, nic);
        let nic = r.rng.pick(&["eth0", "eth9"]);
        let on = r.rng.chance(10) && r.takes(Feature::KubeVirtInterfaces);
        r.flag_if(on, &K, nic);
        let on = r.rng.chance(10) && r.takes(Feature::DropInvalid);
        r.switch_if(on, "drop-invalid", Some("INVALID_DROP"));
        let groups = r.rng.some(&ID_POOL, 2);
        match r.rng.below(100) {
            0..=4 => r.env_only(
                Feature::OwnerGroups,
                "ISTIO_OUTBOUND_OWNER_GROUPS",
                &join(&groups),
            ),
            5..=9 => r.env_only(
                Feature::OwnerGroups,
                "ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE",
                &join(&groups),
            ),
            _ => {}
        }
        let lo = r.rng.pick(&["127.0.0.1/8", "127.0.0.0/16"]);
        if r.rng.chance(8) {
            r.env_only(
                Feature::LoopbackCidr,
                "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR",
                lo,
            );
        }
        // redirect's own: acceleration.
        match r.rng.below(100) {
            0..=69 => {}
            70..=84 => r.c.redirect_only.push("--no-accel".into()),
            _ => r.c.redirect_only.push("--accel-short-conns".into()),
        }
        // The proxy's identity: one of its uids, one of its gids; at least
        // one of them must be in the lists or its own traffic loops.
        let (mut uid_in, mut gid_in) = (r.rng.chance(80), r.rng.chance(80));
        if !uid_in && !gid_in {
            (uid_in, gid_in) = (true, true);
        }
        let (u, g) = (r.rng.pick(&k.uids), r.rng.pick(&k.gids));
        r.c.proxy = Ids {
            uid: if uid_in { u } else { OTHER },
            gid: if gid_in { g } else { OTHER },
            groups: vec![],
        };
        r.c.knobs = k;
        let c = r.c;
        for f in &c.left_out {
            *self.left_out.entry(*f).or_insert(0) += 1;
        }
        c
    }

    /// `n` connections for `cfg`.
    pub fn conns(&mut self, cfg: &Config, n: usize) -> Vec<Conn> {
        (0..n).map(|_| self.conn(cfg)).collect()
    }

    fn caller(&mut self, cfg: &Config) -> Ids {
        let k = &cfg.knobs;
        let rng = &mut self.rng;
        let mut ids = match rng.below(100) {
            0..=54 => Ids {
                uid: APP,
                gid: APP,
                groups: vec![],
            },
            55..=69 => cfg.proxy.clone(),
            70..=77 => Ids {
                uid: rng.pick(&ID_POOL),
                gid: OTHER,
                groups: vec![],
            },
            78..=85 => Ids {
                uid: OTHER,
                gid: rng.pick(&ID_POOL),
                groups: vec![],
            },
            86..=91 => Ids {
                uid: 0,
                gid: 0,
                groups: vec![],
            },
            _ => Ids {
                uid: rng.pick(
                    &k.uids
                        .iter()
                        .chain(&k.gids)
                        .copied()
                        .chain([OTHER])
                        .collect::<Vec<_>>(),
                ),
                gid: rng.pick(&ID_POOL),
                groups: vec![],
            },
        };
        // Supplementary groups: a proxy gid there bypasses nothing.
        if rng.chance(25) {
            ids.groups = rng.some(&ID_POOL, 2);
        }
        ids
    }

    /// A port for a connection: one served, the tunnel port, one nobody
    /// serves, or one of the configuration's lists; never the proxy's own
    /// listeners (a connection to them directly is not a capture case and
    /// can loop).
    fn pod_port(&mut self, cfg: &Config, from: &[u16]) -> u16 {
        let k = &cfg.knobs;
        let mut pool: Vec<u16> = from.to_vec();
        pool.extend([k.tunnel_port, topo::NO_LISTENER]);
        pool.extend(k.include_ports.iter().chain(&k.exclude_ports));
        pool.retain(|p| ![k.proxy_port, k.inbound_port, topo::DNS_PORT].contains(p));
        self.rng.pick(&pool)
    }

    fn conn(&mut self, cfg: &Config) -> Conn {
        let k = cfg.knobs.clone();
        let kind = self.rng.below(100);
        let v6 = self.rng.chance(40);
        let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
        let fam = |v4: &str, v6a: &str| if v6 { ip(v6a) } else { ip(v4) };
        let caller = self.caller(cfg);
        let mut c = Conn {
            origin: Origin::Pod(caller),
            proto: Proto::Tcp,
            dst: SocketAddr::new(ip(topo::UP_V4[0]), 80),
            bind: None,
            kind: "",
        };
        match kind {
            // The outside world.
            0..=32 => {
                let mut a = if v6 {
                    ip(self.rng.pick(&topo::UP_V6))
                } else {
                    ip(self.rng.pick(&topo::UP_V4))
                };
                c.kind = "remote";
                if !v6 && self.rng.chance(12) {
                    let IpAddr::V4(v4) = a else { unreachable!() };
                    a = IpAddr::V6(v4.to_ipv6_mapped());
                    c.kind = "remote v4-mapped";
                }
                let port = self.pod_port(cfg, &topo::UP_PORTS);
                c.dst = SocketAddr::new(a, port);
                if self.rng.chance(8) {
                    c.proto = Proto::Mptcp;
                }
            }
            // The pod's own addresses.
            33..=47 => {
                c.kind = "pod address";
                c.dst = SocketAddr::new(
                    fam(topo::POD_V4, topo::POD_V6),
                    self.pod_port(cfg, &topo::APP_PORTS),
                );
                if self.rng.chance(20) {
                    c.bind = Some(fam("127.0.0.6", "::6"));
                    c.kind = "pod address from the passthrough source";
                }
            }
            // Loopback.
            48..=57 => {
                c.kind = "loopback";
                let a = if v6 {
                    ip("::1")
                } else {
                    ip(self.rng.pick(&["127.0.0.1", "127.0.0.5"]))
                };
                c.dst = SocketAddr::new(a, self.pod_port(cfg, &topo::APP_PORTS));
                if self.rng.chance(20) {
                    c.bind = Some(fam("127.0.0.6", "::6"));
                    c.kind = "loopback from the passthrough source";
                }
            }
            // 127.0.0.6 / ::6 as destination (istio-iptables' validation).
            58..=61 => {
                c.kind = "passthrough address";
                c.dst = SocketAddr::new(
                    fam("127.0.0.6", "::6"),
                    self.pod_port(cfg, &topo::APP_PORTS),
                );
                if self.rng.chance(60) {
                    c.bind = Some(fam("127.0.0.1", "::1"));
                }
            }
            // 0.0.0.0 / ::
            62..=65 => {
                c.kind = "unspecified address";
                c.dst = SocketAddr::new(fam("0.0.0.0", "::"), self.pod_port(cfg, &topo::APP_PORTS));
            }
            // UDP DNS.
            66..=73 => {
                c.kind = "dns";
                c.proto = Proto::Udp;
                let a = if v6 {
                    self.rng.pick(&[topo::UP_V6[0], "::1", topo::POD_V6])
                } else {
                    self.rng
                        .pick(&[topo::UP_V4[0], "127.0.0.53", topo::POD_V4, topo::UP_V4[3]])
                };
                c.dst = SocketAddr::new(ip(a), 53);
                if self.rng.chance(30) {
                    c.proto = Proto::Tcp;
                    c.kind = "dns over tcp";
                }
            }
            // Inbound from outside.
            _ => {
                c.origin = Origin::Outside;
                c.kind = "inbound";
                let mut pool = IN_PORTS.to_vec();
                pool.extend(k.inbound_exclude.iter());
                let port = self.pod_port(cfg, &pool);
                let mut a = fam(topo::POD_V4, topo::POD_V6);
                if !v6 && self.rng.chance(10) {
                    let IpAddr::V4(v4) = a else { unreachable!() };
                    a = IpAddr::V6(v4.to_ipv6_mapped());
                    c.kind = "inbound v4-mapped";
                }
                c.dst = SocketAddr::new(a, port);
                if self.rng.chance(15) {
                    c.bind = Some(fam(topo::UP_V4[1], topo::UP_V6[1]));
                }
            }
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::istio_rules::{Host, IstioConfig, IstioRules};

    fn all(_: Feature) -> bool {
        true
    }
    fn none(_: Feature) -> bool {
        false
    }

    #[test]
    fn a_seed_gives_the_same_configurations_and_connections() {
        let run = |seed, s: &dyn Fn(Feature) -> bool| {
            let mut g = Generator::new(seed);
            (0..20)
                .map(|_| {
                    let c = g.config(s);
                    let conns = g.conns(&c, 5);
                    format!("{} | {:?}", c.istio_line(), conns)
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7, &all), run(7, &all));
        assert_ne!(run(7, &all), run(8, &all));
        // What redirect takes changes the arguments, never the draws: the
        // connections are the same.
        let conns = |seed, s: &dyn Fn(Feature) -> bool| {
            let mut g = Generator::new(seed);
            (0..20)
                .map(|_| {
                    let c = g.config(s);
                    format!("{:?}", g.conns(&c, 5))
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(conns(7, &all), conns(7, &none));
    }

    #[test]
    fn every_configuration_is_one_istio_iptables_accepts_with_a_proxy_that_cannot_loop() {
        let mut g = Generator::new(1);
        let mut seen_env = 0;
        for _ in 0..2000 {
            for s in [&all as &dyn Fn(Feature) -> bool, &none] {
                let c = g.config(s);
                let env = |k: &str| c.env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
                let mut args = c.args.clone();
                args.extend(c.reference_only.iter().cloned());
                let cfg = IstioConfig::parse(&args, env)
                    .unwrap_or_else(|e| panic!("{}: {e}", c.istio_line()));
                IstioRules::build(&cfg, &Host::default())
                    .unwrap_or_else(|e| panic!("{}: {e}", c.istio_line()));
                let k = &c.knobs;
                assert!(
                    k.uids.contains(&c.proxy.uid) || k.gids.contains(&c.proxy.gid),
                    "{}: proxy {}",
                    c.istio_line(),
                    c.proxy
                );
                seen_env += c.env.len();
                if !s(Feature::EnvForms) {
                    assert!(c.env.is_empty());
                    assert!(!c
                        .args
                        .iter()
                        .any(|a| a.starts_with("--istio-outbound-ports")));
                    assert!(!c.args.iter().any(|a| a.contains("dns")));
                }
                for conn in g.conns(&c, 4) {
                    let p = conn.dst.port();
                    assert!(
                        ![k.proxy_port, k.inbound_port, topo::DNS_PORT].contains(&p),
                        "{conn}"
                    );
                }
            }
        }
        assert!(seen_env > 0);
        assert!(g.left_out.contains_key(&Feature::RedirectDns));
    }
}
