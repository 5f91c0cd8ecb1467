//! One node of the demo: a bridge in a node netns, and Bookinfo's four
//! pods, each in its own netns (a veth to the bridge) and its own cgroup
//! under the node's, with its app as uid 1000 and, in a mesh, an HAProxy
//! sidecar as uid 1337 behind istio-init's iptables rules or `redirect`.
//! Every address is configured inside these namespaces, and every piece
//! removes itself on drop.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

use super::app;
use crate::{
    bench::runner,
    haproxy::{self, Haproxy},
    sandbox::{self, unique, CgroupGuard, ChildGuard, NetnsGuard, Placement},
};

pub const APP_UID: u32 = 1000;
pub const PROXY_UID: u32 = 1337;
/// The port every Bookinfo service listens on.
pub const APP_PORT: u16 = 9080;
/// The node's address on its bridge (the client calls from there).
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 1);
/// Where the sidecar's inbound passthrough comes from.
pub const PASSTHROUGH: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);

/// One Bookinfo service: its name, its pod's last address byte, and the
/// services it calls, in order.
pub struct Service {
    pub name: &'static str,
    host: u8,
    pub calls: &'static [&'static str],
}

pub const SERVICES: [Service; 4] = [
    Service {
        name: "productpage",
        host: 10,
        calls: &["details", "reviews"],
    },
    Service {
        name: "details",
        host: 11,
        calls: &[],
    },
    Service {
        name: "reviews",
        host: 12,
        calls: &["ratings"],
    },
    Service {
        name: "ratings",
        host: 13,
        calls: &[],
    },
];

pub fn service(name: &str) -> &'static Service {
    SERVICES
        .iter()
        .find(|s| s.name == name)
        .expect("a Bookinfo service")
}

impl Service {
    pub fn ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 201, 0, self.host)
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((self.ip(), APP_PORT))
    }

    /// Connections one call of productpage makes from this pod.
    pub fn outbound_per_call(&self) -> u64 {
        self.calls.len() as u64
    }
}

/// The three configurations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mesh {
    /// No sidecars: the apps call each other directly.
    None,
    /// HAProxy sidecars behind istio-init's nat rules.
    Iptables,
    /// HAProxy sidecars behind `redirect`.
    Redirect,
}

impl Mesh {
    pub const ALL: [Mesh; 3] = [Mesh::None, Mesh::Iptables, Mesh::Redirect];

    pub fn tag(self) -> &'static str {
        match self {
            Mesh::None => "a",
            Mesh::Iptables => "b",
            Mesh::Redirect => "c",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Mesh::None => "no mesh",
            Mesh::Iptables => "mesh on iptables",
            Mesh::Redirect => "mesh on redirect",
        }
    }

    pub fn sidecars(self) -> bool {
        self != Mesh::None
    }

    /// The body every call answers: who each app saw its request from.
    pub fn expected_body(self) -> String {
        let calls_of =
            |n: &str| -> Vec<String> { service(n).calls.iter().map(|c| c.to_string()).collect() };
        let peer_of = |caller: &str| -> IpAddr {
            if self.sidecars() {
                PASSTHROUGH.into()
            } else {
                service(caller).ip().into()
            }
        };
        let first: IpAddr = if self.sidecars() {
            PASSTHROUGH.into()
        } else {
            NODE_IP.into()
        };
        app::chain_body("productpage", first, &calls_of, &peer_of)
    }
}

/// Binaries and settings a node is built with.
pub struct Tools {
    pub kit: PathBuf,
    pub redirect: PathBuf,
    pub haproxy: PathBuf,
    /// The demo's install (`--pin-dir`), for the redirect node.
    pub pin_dir: PathBuf,
}

/// A pod: its sidecar and app (stopped first on drop), cgroup, netns.
pub struct Pod {
    pub service: &'static Service,
    pub sidecar: Option<Haproxy>,
    pub app: Option<ChildGuard>,
    pub cgroup: CgroupGuard,
    pub netns: NetnsGuard,
}

impl Pod {
    pub fn path(&self) -> PathBuf {
        self.netns.path()
    }

    fn place(&self, uid: u32) -> Placement {
        Placement {
            netns: Some(self.netns.path()),
            cgroup: Some(self.cgroup.path.clone()),
            uid: Some(uid),
            gid: Some(uid),
        }
    }
}

/// A node: its pods (dropped first), its cgroup, its netns and bridge.
pub struct Node {
    pub mesh: Mesh,
    pub pods: Vec<Pod>,
    pub cgroup: CgroupGuard,
    pub netns: NetnsGuard,
    /// Calls of productpage made on this node so far (every hop's
    /// counters follow from it).
    pub calls: u64,
}

impl Node {
    /// The node and its pods, without captures or processes yet.
    pub fn create(mesh: Mesh, id: &str) -> Result<Node> {
        let base = format!("rdbi-{id}-{}", mesh.tag());
        let netns = NetnsGuard::new(&format!("{base}-node"))?;
        netns.ip(&["link", "add", "br0", "type", "bridge"])?;
        netns.ip(&["addr", "add", &format!("{NODE_IP}/24"), "dev", "br0"])?;
        netns.ip(&["link", "set", "br0", "up"])?;
        let cgroup =
            CgroupGuard::new(&format!("redirect-{base}")).context("creating the node's cgroup")?;
        let mut node = Node {
            mesh,
            pods: Vec::new(),
            cgroup,
            netns,
            calls: 0,
        };
        for s in &SERVICES {
            let pod_ns = NetnsGuard::new(&format!("{base}-{}", s.name))?;
            // Unique names while both ends are created, then eth0 in the
            // pod and v<service> on the node's bridge.
            let (a, b) = (unique("vp"), unique("vn"));
            sandbox::run(
                "ip",
                &[
                    "link",
                    "add",
                    &a,
                    "netns",
                    &pod_ns.name,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    &b,
                    "netns",
                    &node.netns.name,
                ],
            )?;
            let port = format!("v{}", s.name);
            pod_ns.ip(&["link", "set", &a, "name", "eth0"])?;
            pod_ns.ip(&["addr", "add", &format!("{}/24", s.ip()), "dev", "eth0"])?;
            pod_ns.ip(&["link", "set", "eth0", "up"])?;
            node.netns.ip(&["link", "set", &b, "name", &port])?;
            node.netns.ip(&["link", "set", &port, "master", "br0"])?;
            node.netns.ip(&["link", "set", &port, "up"])?;
            let cgroup = CgroupGuard::new(&format!(
                "{}/{}",
                node.cgroup.path.file_name().unwrap().to_string_lossy(),
                s.name
            ))
            .with_context(|| format!("creating {}'s cgroup", s.name))?;
            node.pods.push(Pod {
                service: s,
                sidecar: None,
                app: None,
                cgroup,
                netns: pod_ns,
            });
        }
        Ok(node)
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.service.name == name)
            .expect("a Bookinfo pod")
    }

    /// istio-init's part, before any container starts: the nat rules in
    /// every pod (iptables) or `redirect attach` of every pod to the
    /// node's cgroup (redirect), with Istio's default injected flags.
    pub fn capture(&self, t: &Tools) -> Result<()> {
        for p in &self.pods {
            match self.mesh {
                Mesh::None => {}
                Mesh::Iptables => {
                    runner::iptables_restore(&p.netns.name, &runner::istio_nat_rules(&[]))
                        .with_context(|| format!("{}: istio-init's rules", p.service.name))?
                }
                Mesh::Redirect => {
                    let out = Command::new(&t.redirect)
                        .arg("--pin-dir")
                        .arg(&t.pin_dir)
                        .args(["attach", "--netns"])
                        .arg(p.path())
                        .arg("--cgroup")
                        .arg(&self.cgroup.path)
                        .args(runner::istio_attach_args(""))
                        .output()
                        .with_context(|| format!("running {}", t.redirect.display()))?;
                    if !out.status.success() {
                        bail!(
                            "{}: redirect attach: {}",
                            p.service.name,
                            String::from_utf8_lossy(&out.stderr).trim()
                        );
                    }
                }
            }
        }
        Ok(())
    }

    /// The sidecars (in a mesh), then the apps.
    pub fn start(&mut self, t: &Tools) -> Result<()> {
        let sidecars = self.mesh.sidecars();
        for p in &mut self.pods {
            let name = p.service.name;
            if sidecars {
                p.sidecar = Some(
                    Haproxy::start(&t.haproxy, &p.place(PROXY_UID), haproxy::SIDECAR)
                        .with_context(|| format!("{name}: starting its sidecar (haproxy)"))?,
                );
            }
            let mut cmd = Command::new(&t.kit);
            cmd.args([
                "bookinfo-app",
                "--name",
                name,
                "--listen",
                &SocketAddr::from(([0, 0, 0, 0], APP_PORT)).to_string(),
            ]);
            for c in p.service.calls {
                cmd.args(["--call", &format!("{c}={}", service(c).addr())]);
            }
            p.app = Some(
                ChildGuard::spawn(name, cmd, &p.place(APP_UID), true)
                    .with_context(|| format!("{name}: starting its app"))?,
            );
        }
        Ok(())
    }

    /// Stop every process of the node (sidecars first), by PID.
    pub fn stop(&mut self) {
        for p in &mut self.pods {
            p.sidecar.take();
            p.app.take();
        }
    }
}

/// Counters of one pod after the run, from every source there is.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct PodCounters {
    pub pod: String,
    /// What the calls made should have produced.
    pub want_out: u64,
    pub want_in: u64,
    /// iptables (nat table, packets = connections) or redirect
    /// (`count_total`): connections sent to 15001 / to 15006.
    pub captured_out: u64,
    pub captured_in: u64,
    /// The sidecar's own connections left alone: its upstream connections
    /// (uid 1337, rule 4) and its inbound passthrough (127.0.0.6, rule 1).
    pub proxy_uid: u64,
    pub passthrough: u64,
    /// SO_ORIGINAL_DST answered (redirect only; conntrack keeps no count).
    pub orig_dst: Option<u64>,
    /// HAProxy log lines: outbound frontend, inbound frontend.
    pub log_out: u64,
    pub log_in: u64,
    /// Whatever did not add up, in words.
    pub problems: Vec<String>,
    /// What is worth knowing but no failure (iptables' extra counts).
    pub notes: Vec<String>,
}

impl PodCounters {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// `[pkts:bytes] -A ...` of `iptables-save -c`: the packets of the first
/// rule whose text holds all of `parts`.
fn save_count(save: &str, parts: &[&str]) -> Option<u64> {
    save.lines()
        .find(|l| parts.iter().all(|p| l.contains(p)))
        .and_then(|l| l.strip_prefix('[')?.split(':').next()?.parse().ok())
}

/// Rules and BPF attachments present in a pod netns, for the no-mesh
/// check: nat rules (lines of `iptables-save -t nat` starting `-A`).
fn nat_rules(netns: &str) -> Result<String> {
    sandbox::run(
        "ip",
        &["netns", "exec", netns, "iptables-save", "-c", "-t", "nat"],
    )
    .with_context(|| format!("iptables-save in {netns}"))
}

/// `redirect stats --json --netns <pod>`: the pod's rows.
fn redirect_rows(t: &Tools, pod: &Path) -> Result<Vec<serde_json::Value>> {
    let out = Command::new(&t.redirect)
        .arg("--pin-dir")
        .arg(&t.pin_dir)
        .args(["stats", "--json", "--netns"])
        .arg(pod)
        .output()
        .with_context(|| format!("running {}", t.redirect.display()))?;
    if !out.status.success() {
        bail!(
            "redirect stats --netns {}: {}",
            pod.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let v: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout)?;
    Ok(v.first()
        .and_then(|p| p["rules"].as_array().cloned())
        .unwrap_or_default())
}

/// The netns's non-zero conntrack event counts that explain an entry
/// made twice (`/proc/net/stat/nf_conntrack`, summed over CPUs).
fn conntrack_stats(netns: &str) -> String {
    let Ok(text) = sandbox::run(
        "ip",
        &["netns", "exec", netns, "cat", "/proc/net/stat/nf_conntrack"],
    ) else {
        return String::new();
    };
    let mut lines = text.lines();
    let names: Vec<&str> = lines.next().unwrap_or("").split_whitespace().collect();
    let mut sums = vec![0u64; names.len()];
    for l in lines {
        for (i, v) in l.split_whitespace().enumerate() {
            if let (Some(s), Ok(v)) = (sums.get_mut(i), u64::from_str_radix(v, 16)) {
                *s += v;
            }
        }
    }
    let shown: Vec<String> = names
        .iter()
        .zip(&sums)
        .filter(|(n, v)| {
            **v > 0
                && [
                    "clashres",
                    "insert_failed",
                    "drop",
                    "invalid",
                    "search_restart",
                ]
                .contains(n)
        })
        .map(|(n, v)| format!("{n} {v}"))
        .collect();
    if shown.is_empty() {
        String::new()
    } else {
        format!(" (conntrack: {})", shown.join(", "))
    }
}

fn total(rows: &[serde_json::Value], chain: &str, rule: &str) -> u64 {
    rows.iter()
        .find(|r| r["chain"] == chain && r["rule"] == rule)
        .and_then(|r| r["count_total"].as_u64())
        .unwrap_or(0)
}

impl Node {
    /// Every pod's counters and sidecar log against what `calls` calls of
    /// productpage must have done: each hop through the outbound sidecar
    /// of its caller and the inbound sidecar of its callee (in a mesh),
    /// or through none (without).
    pub fn counters(&self, t: &Tools) -> Result<Vec<PodCounters>> {
        let n = self.calls;
        let mut all = Vec::new();
        for p in &self.pods {
            let s = p.service;
            let mut c = PodCounters {
                pod: s.name.to_string(),
                want_out: n * s.outbound_per_call(),
                want_in: n,
                ..Default::default()
            };
            let save = nat_rules(&p.netns.name)?;
            let rule_lines = save.lines().filter(|l| l.contains("-A ")).count();
            match self.mesh {
                Mesh::None => {
                    if rule_lines > 0 {
                        c.problems
                            .push(format!("{rule_lines} nat rules in a pod without a mesh"));
                    }
                    if p.sidecar.is_some() {
                        c.problems.push("a sidecar runs without a mesh".into());
                    }
                    // The apps' answers named their direct callers: the
                    // client checked that on every call.
                    c.captured_out = 0;
                    c.captured_in = 0;
                    all.push(c);
                    continue;
                }
                Mesh::Iptables => {
                    let get = |what: &str, parts: &[&str]| match save_count(&save, parts) {
                        Some(v) => Ok(v),
                        None => Err(format!("no {what} rule in iptables-save")),
                    };
                    let counts = [
                        get(
                            "ISTIO_REDIRECT",
                            &["-A ISTIO_REDIRECT ", "--to-ports 15001"],
                        ),
                        get(
                            "ISTIO_IN_REDIRECT",
                            &["-A ISTIO_IN_REDIRECT ", "--to-ports 15006"],
                        ),
                        get(
                            "uid 1337 RETURN",
                            &["-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN"],
                        ),
                        get("127.0.0.6", &["-A ISTIO_OUTPUT -s 127.0.0.6/32 -o lo"]),
                    ];
                    match counts {
                        [Ok(o), Ok(i), Ok(u), Ok(pt)] => {
                            (c.captured_out, c.captured_in, c.proxy_uid, c.passthrough) =
                                (o, i, u, pt)
                        }
                        e => c.problems.extend(e.into_iter().filter_map(|r| r.err())),
                    }
                }
                Mesh::Redirect => {
                    if rule_lines > 0 {
                        c.problems.push(format!(
                            "{rule_lines} nat rules in a pod captured by redirect"
                        ));
                    }
                    let rows = redirect_rows(t, &p.path())?;
                    c.captured_out = total(&rows, "OUTPUT", "captured");
                    c.captured_in = total(&rows, "PREROUTING", "captured");
                    c.proxy_uid = total(&rows, "OUTPUT", "skip_proxy_uid");
                    c.passthrough = total(&rows, "OUTPUT", "skip_passthrough_127_0_0_6");
                    let orig = total(&rows, "ORIGINAL_DST", "orig_dst_outbound")
                        + total(&rows, "ORIGINAL_DST", "orig_dst_inbound");
                    c.orig_dst = Some(orig);
                    if orig != c.want_out + c.want_in {
                        c.problems.push(format!(
                            "SO_ORIGINAL_DST answered {orig} times, {} connections through the sidecar",
                            c.want_out + c.want_in
                        ));
                    }
                    let missing = total(&rows, "ORIGINAL_DST", "orig_dst_missing");
                    if missing > 0 {
                        c.problems
                            .push(format!("{missing} SO_ORIGINAL_DST calls had no answer"));
                    }
                }
            }
            // iptables' nat rules count new conntrack entries, and a
            // connection can make more than one (seen: productpage, whose
            // app reuses source ports towards two services that REDIRECT
            // maps to one 127.0.0.1:15001). So at least one per connection
            // there; exact under redirect, which counts connect() calls.
            let inexact = self.mesh == Mesh::Iptables;
            let mut extra = Vec::new();
            for (what, got, want) in [
                ("captured to 15001", c.captured_out, c.want_out),
                ("captured to 15006", c.captured_in, c.want_in),
                ("sidecar upstream (uid 1337)", c.proxy_uid, c.want_out),
                ("sidecar passthrough (127.0.0.6)", c.passthrough, c.want_in),
            ] {
                if got > want && inexact {
                    extra.push(format!("{what} +{}", got - want));
                } else if got != want {
                    c.problems.push(format!("{what}: {got}, {want} expected"));
                }
            }
            if !extra.is_empty() {
                c.notes.push(format!(
                    "iptables counted more new conntrack entries than connections: {}{}",
                    extra.join(", "),
                    conntrack_stats(&p.netns.name)
                ));
            }
            self.check_log(p, &mut c);
            all.push(c);
        }
        Ok(all)
    }

    /// The sidecar's log: one outbound line per call to each service this
    /// one calls (to that service's address, as the original destination),
    /// one inbound line per call in (to the app on the pod address).
    fn check_log(&self, p: &Pod, c: &mut PodCounters) {
        let Some(h) = &p.sidecar else {
            c.problems.push("no sidecar".into());
            return;
        };
        let want = (c.want_out + c.want_in) as usize;
        let lines = h.conns(None, want);
        let fe = |f: &str| {
            lines
                .iter()
                .filter(|l| haproxy::log_field(l, "fe") == Some(f))
                .collect::<Vec<_>>()
        };
        let (out, inb) = (fe("outbound"), fe("inbound4"));
        c.log_out = out.len() as u64;
        c.log_in = inb.len() as u64;
        if lines.len() != out.len() + inb.len() {
            c.problems.push(format!(
                "{} log lines of other frontends",
                lines.len() - out.len() - inb.len()
            ));
        }
        for callee in p.service.calls {
            let to = service(callee).addr().to_string();
            let hops = out
                .iter()
                .filter(|l| {
                    haproxy::log_field(l, "dst") == Some(to.as_str())
                        && haproxy::log_field(l, "server") == Some(to.as_str())
                })
                .count() as u64;
            if hops != self.calls {
                c.problems.push(format!(
                    "{hops} outbound log lines to {callee} ({to}) as original destination, {} calls",
                    self.calls
                ));
            }
        }
        if c.log_out != c.want_out {
            c.problems.push(format!(
                "{} outbound log lines, {} expected",
                c.log_out, c.want_out
            ));
        }
        let own = p.service.addr().to_string();
        let passed = inb
            .iter()
            .filter(|l| {
                haproxy::log_field(l, "server") == Some(own.as_str())
                    && haproxy::log_field(l, "src")
                        .is_some_and(|s| s.starts_with(&format!("{PASSTHROUGH}:")))
            })
            .count() as u64;
        if passed != c.want_in || c.log_in != c.want_in {
            c.problems.push(format!(
                "{} inbound log lines, {passed} of them to {own} from {PASSTHROUGH}; {} expected",
                c.log_in, c.want_in
            ));
        }
    }
}
