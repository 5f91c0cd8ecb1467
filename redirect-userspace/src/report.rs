//! `redirect status` as text and JSON (and, for its callers, the entry
//! points of `redirect stats`, which lives in `crate::stats`).

use std::fmt::Write as _;

use redirect_common::cidr_kind;
use serde::Serialize;

pub use crate::stats::{PodStats, RuleCount};
use crate::{config::PodSpec, error::Result, maps::Maps, pins::Pins, sys};

#[derive(Debug, Serialize)]
pub struct PodStatus {
    pub netns_cookie: u64,
    pub netns_inode: u32,
    pub netns: Option<String>,
    pub config: PodSpec,
    pub istio_iptables_args: String,
    pub pod_addresses: Vec<String>,
    pub inbound_attached: bool,
    pub inbound_listeners: Vec<&'static str>,
    /// The interfaces `-c` and `-k` name, as resolved in the pod (and the
    /// names no interface of the pod has).
    pub interfaces: Vec<String>,
    /// Acceleration on or off for this pod, and why.
    pub acceleration: String,
    /// What DNS capture does for this pod (`--redirect-dns`), in words.
    pub dns_capture: String,
    /// Whether the pod's IPv6 is captured, and why, in words.
    pub ipv6: String,
}

#[derive(Debug, Serialize)]
pub struct Status {
    pub pin_dir: String,
    pub cgroups: Vec<String>,
    pub pods: Vec<PodStatus>,
    /// The install's acceleration kernel probe (None: not run yet).
    pub accel_probe: Option<crate::probe::ProbeResult>,
    /// Entries in use / capacity of the maps that grow with traffic.
    pub map_usage: Vec<MapUsage>,
    /// Counter updates lost because REDIRECT_COUNTERS was full.
    pub counters_lost: u64,
    /// The kernel: what it lacks, and the builds of the hooks in use.
    pub kernel: crate::kernel::KernelStatus,
}

#[derive(Debug, Serialize)]
pub struct MapUsage {
    pub map: &'static str,
    pub entries: usize,
    pub max_entries: u32,
}

pub fn status(pins: &Pins) -> Result<Status> {
    let maps = Maps::open(pins)?;
    let cg_root = sys::cgroup2_mount().ok();
    let cgroups = pins
        .attached_cgroups()
        .into_iter()
        .map(|id| {
            cg_root
                .as_ref()
                .and_then(|r| find_cgroup(r, id, 6))
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| format!("cgroup id {id} (gone)"))
        })
        .collect();
    let mut pods = Vec::new();
    let probe = crate::probe::cached(pins);
    for (cookie, cfg) in maps.pods() {
        let cidrs = maps.cidr_entries(cookie);
        let ifaces = maps.iface_entries(cookie);
        let spec =
            PodSpec::from_kernel(&cfg, &maps.port_entries(cookie), &cidrs).with_interfaces(&ifaces);
        let pod_addresses = cidrs
            .iter()
            .filter(|(k, _)| *k == cidr_kind::LOCAL_V4 || *k == cidr_kind::LOCAL_V6)
            .map(|(_, c)| c.addr.to_string())
            .collect();
        pods.push(PodStatus {
            netns_cookie: cookie,
            netns_inode: cfg.netns_inode,
            netns: sys::netns_name(cfg.netns_inode as u64),
            istio_iptables_args: spec.istio_args(),
            acceleration: crate::probe::describe(spec.accel_mode, spec.accel, probe.as_ref()),
            dns_capture: spec.dns_capture().describe(),
            ipv6: crate::ipv6::describe_recorded(spec.ipv6_off, spec.dual_stack),
            config: spec,
            pod_addresses,
            inbound_attached: pins.sk_lookup_link(cookie).exists(),
            inbound_listeners: maps.listener_families(cookie),
            interfaces: crate::ifaces::describe(pins, cookie, &ifaces),
        });
    }
    pods.sort_by_key(|p| p.netns_cookie);
    let (by_cookie, by_tuple) = maps.tracked_sockets();
    // Capacities as pinned (`--map-size` may have changed them).
    let cap = |m| crate::mapsize::pinned_max_entries(&pins.maps_dir(), m);
    let map_usage = vec![
        MapUsage {
            map: redirect_common::MAP_PODS,
            entries: pods.len(),
            max_entries: cap(redirect_common::MAP_PODS),
        },
        MapUsage {
            map: redirect_common::MAP_ORIG_BY_COOKIE,
            entries: by_cookie,
            max_entries: cap(redirect_common::MAP_ORIG_BY_COOKIE),
        },
        MapUsage {
            map: redirect_common::MAP_ORIG_BY_TUPLE,
            entries: by_tuple,
            max_entries: cap(redirect_common::MAP_ORIG_BY_TUPLE),
        },
        MapUsage {
            map: redirect_common::MAP_SOCKS,
            entries: maps.accelerated_sockets(),
            max_entries: cap(redirect_common::MAP_SOCKS),
        },
        // Full, these refuse captures (ports, CIDRs) or lose counts
        // (counters, which has no counter of its own): watch them here.
        MapUsage {
            map: redirect_common::MAP_PORTS,
            entries: maps.ports.keys().count(),
            max_entries: cap(redirect_common::MAP_PORTS),
        },
        MapUsage {
            map: redirect_common::MAP_CIDRS,
            entries: maps.cidrs.keys().count(),
            max_entries: cap(redirect_common::MAP_CIDRS),
        },
        MapUsage {
            map: redirect_common::MAP_COUNTERS,
            entries: maps.counters.keys().count(),
            max_entries: cap(redirect_common::MAP_COUNTERS),
        },
        // Soft state (LRU): what acceleration learned about short-lived ports.
        MapUsage {
            map: redirect_common::MAP_ACCEL_PORTS,
            entries: maps.accel_ports.as_ref().map_or(0, |m| m.keys().count()),
            max_entries: cap(redirect_common::MAP_ACCEL_PORTS),
        },
    ];
    Ok(Status {
        pin_dir: pins.root.display().to_string(),
        cgroups,
        pods,
        accel_probe: probe,
        map_usage,
        counters_lost: maps.counters_lost(),
        kernel: crate::kernel::status(pins),
    })
}

fn find_cgroup(dir: &std::path::Path, id: u64, depth: u32) -> Option<std::path::PathBuf> {
    use std::os::unix::fs::MetadataExt;
    if std::fs::metadata(dir).ok()?.ino() == id {
        return Some(dir.to_path_buf());
    }
    if depth == 0 {
        return None;
    }
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            if let Some(p) = find_cgroup(&e.path(), id, depth - 1) {
                return Some(p);
            }
        }
    }
    None
}

impl Status {
    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "install: {}", self.pin_dir);
        let _ = writeln!(
            s,
            "attached cgroups: {}",
            if self.cgroups.is_empty() {
                "none".into()
            } else {
                self.cgroups.join(", ")
            }
        );
        let _ = writeln!(
            s,
            "acceleration kernel probe: {}",
            match &self.accel_probe {
                Some(p) => p.summary(),
                None => "not run (runs at the first attach without --accel/--no-accel)".into(),
            }
        );
        let _ = writeln!(s, "kernel: {}", self.kernel.release);
        for g in &self.kernel.missing {
            let _ = writeln!(
                s,
                "  lacks {} (Linux {}+): {}",
                g.feature, g.since, g.instead
            );
        }
        let _ = writeln!(s, "captured pods: {}", self.pods.len());
        for p in &self.pods {
            let _ = writeln!(s);
            let _ = writeln!(
                s,
                "pod {} (netns cookie {}, inode {})",
                p.netns.as_deref().unwrap_or("<no path found>"),
                p.netns_cookie,
                p.netns_inode
            );
            let _ = writeln!(s, "  istio-iptables {}", p.istio_iptables_args);
            let _ = writeln!(s, "  pod addresses: {}", p.pod_addresses.join(", "));
            let _ = writeln!(
                s,
                "  inbound: {}; proxy listener on {}: {}",
                if p.inbound_attached {
                    "sk_lookup attached"
                } else {
                    "NOT attached"
                },
                p.config.inbound_port,
                if p.inbound_listeners.is_empty() {
                    "none yet".into()
                } else {
                    p.inbound_listeners.join(", ")
                }
            );
            if !p.interfaces.is_empty() {
                let _ = writeln!(s, "  interfaces: {}", p.interfaces.join("; "));
            }
            let _ = writeln!(s, "  IPv6: {}", p.ipv6);
            let _ = writeln!(s, "  acceleration: {}", p.acceleration);
            if p.config.redirect_dns {
                let _ = writeln!(s, "  dns capture: {}", p.dns_capture);
            }
        }
        let _ = writeln!(s);
        for m in &self.map_usage {
            let _ = writeln!(
                s,
                "map {}: {} / {} entries",
                m.map, m.entries, m.max_entries
            );
        }
        if self.counters_lost > 0 {
            let _ = writeln!(s, "{}", counters_lost_warning(self.counters_lost));
        }
        s
    }
}

/// What to tell a user when counter updates were lost.
pub fn counters_lost_warning(n: u64) -> String {
    format!(
        "{n} counter updates lost: {} is full (a pod's counter for a reason it had not counted yet could not be made; the decisions themselves were applied). Its size is set when the install is created: --map-size counters=<n>",
        redirect_common::MAP_COUNTERS
    )
}

/// Counters of every pod (or of `only`): `crate::stats::read`'s pods.
pub fn stats(pins: &Pins, only: Option<u64>) -> Result<Vec<PodStats>> {
    Ok(crate::stats::read(pins, only)?.pods)
}

/// The pods' counters as `redirect stats` prints them.
pub fn render_stats(pods: &[PodStats]) -> String {
    crate::stats::render::render(
        pods,
        &crate::stats::Listing::All,
        None,
        crate::stats::unix_now(),
    )
}
