//! Map sizing (`--map-size <map>=<n>` on `attach` and `daemon`) and the
//! layout check that runs before an install's pinned maps are reused.
//!
//! Sizes are fixed when the maps are first created and pinned; an install
//! that exists keeps its sizes. Asking for a size that differs from the
//! pinned one is an error (resizing needs `redirect uninstall` first, which
//! detaches every pod).
//!
//! The layout check compares every pinned map with the same map of the
//! kernel object this binary carries (type, key size, value size, flags).
//! A binary whose maps differ (an upgrade that changed a map) must not run
//! its programs against the old maps: a smaller value than the program
//! expects is an out-of-bounds access the verifier may or may not catch,
//! and a different map type (LRU vs plain hash) silently changes what
//! "full" means. So it is refused, naming the map and both layouts.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use aya::maps::MapData;
use redirect_common::{
    ALL_MAPS, MAP_ACCEL_FALLBACK, MAP_ACCEL_PORTS, MAP_ACCEL_SK, MAP_CIDRS, MAP_COUNTERS,
    MAP_COUNTERS_LOST, MAP_IFACES, MAP_LISTENERS, MAP_LOCAL_CONNECTS, MAP_ORIG_BY_COOKIE,
    MAP_ORIG_BY_TUPLE, MAP_PODS, MAP_PORTS, MAP_ROUTES, MAP_SK_NETNS, MAP_SOCKS, MAP_TRACE,
    MAP_TRACE_EVENTS, MAP_TRACE_PODS, MAX_ACCEL_PORTS, MAX_CIDRS, MAX_COUNTERS, MAX_IFACES,
    MAX_PODS, MAX_PORTS, MAX_ROUTES, MAX_TRACKED_SOCKETS,
};

use crate::error::{Error, Result};

/// The flag as users type it (error messages name it).
pub const FLAG: &str = "--map-size";

/// Maps whose pinned layout must match this binary's: the sized ones, the
/// acceleration's socket storage (its value is the sk_msg state), the
/// lost-counter slot, the socket storage of the netns cookie, the trace
/// maps (sized by `MAX_TRACE_PODS` and `TRACE_RING_BYTES`, no knob) and the
/// kernel debug log's switch and ring buffer.
const LAYOUT_EXTRA: [&str; 8] = [
    MAP_ACCEL_SK,
    MAP_COUNTERS_LOST,
    MAP_SK_NETNS,
    MAP_TRACE,
    MAP_TRACE_PODS,
    MAP_TRACE_EVENTS,
    crate::kernlog::MAP_SWITCH,
    crate::kernlog::MAP_RING,
];

fn layout_maps() -> impl Iterator<Item = &'static str> {
    ALL_MAPS.into_iter().chain(LAYOUT_EXTRA)
}

/// Largest accepted size (16 Mi entries): beyond that a single
/// preallocated map takes gigabytes.
pub const MAX_SIZE: u32 = 1 << 24;

/// A sizing knob: its name, the maps it sizes (with a multiplier), the
/// default.
pub struct Knob {
    pub name: &'static str,
    pub maps: &'static [(&'static str, u32)],
    pub default: u32,
    pub what: &'static str,
}

pub const KNOBS: [Knob; 9] = [
    Knob { name: "pods", maps: &[(MAP_PODS, 1), (MAP_LISTENERS, 2)], default: MAX_PODS, what: "captured pods (REDIRECT_PODS; REDIRECT_LISTENERS gets twice as many)" },
    Knob { name: "orig", maps: &[(MAP_ORIG_BY_COOKIE, 1), (MAP_ORIG_BY_TUPLE, 1), (MAP_LOCAL_CONNECTS, 1)], default: MAX_TRACKED_SOCKETS, what: "redirected connections open at once on the node (REDIRECT_ORIG_BY_COOKIE and REDIRECT_ORIG_BY_TUPLE; also REDIRECT_LOCAL_CONNECTS, the pods' IPv6 connections to their own addresses)" },
    Knob { name: "sockhash", maps: &[(MAP_SOCKS, 1), (MAP_ACCEL_FALLBACK, 1)], default: MAX_TRACKED_SOCKETS, what: "accelerated sockets (REDIRECT_SOCKS and REDIRECT_ACCEL_FALLBACK)" },
    Knob { name: "ports", maps: &[(MAP_PORTS, 1)], default: MAX_PORTS, what: "port entries of all pods (-o, -q, -b, -d)" },
    Knob { name: "cidrs", maps: &[(MAP_CIDRS, 1)], default: MAX_CIDRS, what: "CIDR entries of all pods (-i, -x, pod addresses)" },
    Knob { name: "counters", maps: &[(MAP_COUNTERS, 1)], default: MAX_COUNTERS, what: "counter slots (pods x reasons)" },
    Knob { name: "accel-ports", maps: &[(MAP_ACCEL_PORTS, 1)], default: MAX_ACCEL_PORTS, what: "pod ports whose short-lived connections acceleration learned to skip (REDIRECT_ACCEL_PORTS, LRU: the oldest entries are forgotten)" },
    Knob { name: "ifaces", maps: &[(MAP_IFACES, 1)], default: MAX_IFACES, what: "interface entries of all pods (REDIRECT_IFACES: each -c/-k name, and each interface one matches)" },
    Knob { name: "routes", maps: &[(MAP_ROUTES, 1)], default: MAX_ROUTES, what: "route entries of all pods (REDIRECT_ROUTES: each pod's main routing table)" },
];

/// The knob that sizes `map`.
pub fn knob_of(map: &str) -> Option<&'static Knob> {
    KNOBS.iter().find(|k| k.maps.iter().any(|(m, _)| *m == map))
}

/// Requested sizes, by knob name. Empty: the built-in defaults for a new
/// install, whatever is pinned for an existing one.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct MapSizes(pub BTreeMap<&'static str, u32>);

impl MapSizes {
    /// Parse `--map-size` values: `name=n` items, possibly comma separated
    /// within one value.
    pub fn parse<S: AsRef<str>>(values: &[S]) -> Result<MapSizes> {
        let mut out = BTreeMap::new();
        for v in values {
            for item in v
                .as_ref()
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
            {
                let bad = |reason: String| Error::InvalidFlag {
                    field: FLAG.to_string(),
                    value: item.to_string(),
                    reason,
                };
                let (name, n) = item.split_once('=').ok_or_else(|| {
                    bad(format!(
                        "expected <map>=<entries>, <map> one of {}",
                        names()
                    ))
                })?;
                let knob = KNOBS
                    .iter()
                    .find(|k| k.name == name.trim())
                    .ok_or_else(|| {
                        bad(format!("unknown map '{}': one of {}", name.trim(), names()))
                    })?;
                let n: u32 = n.trim().parse().map_err(|_| {
                    bad(format!(
                        "'{}' is not a number of entries (1-{MAX_SIZE})",
                        n.trim()
                    ))
                })?;
                if n == 0 || n > MAX_SIZE {
                    return Err(bad(format!("{n} entries is out of range (1-{MAX_SIZE})")));
                }
                if let Some(prev) = out.insert(knob.name, n) {
                    if prev != n {
                        return Err(bad(format!("'{}' given twice ({prev} and {n})", knob.name)));
                    }
                }
            }
        }
        Ok(MapSizes(out))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// (map name, max_entries) for every map a requested knob sizes.
    pub fn map_entries(&self) -> Vec<(&'static str, u32)> {
        let mut v = Vec::new();
        for k in &KNOBS {
            if let Some(n) = self.0.get(k.name) {
                for (m, mult) in k.maps {
                    v.push((*m, n.saturating_mul(*mult)));
                }
            }
        }
        v
    }

    /// Apply to a loader: only maps it creates take these sizes (pinned
    /// maps that exist are reused as they are; `check_install` refuses a
    /// mismatch first).
    pub fn apply(&self, loader: &mut aya::EbpfLoader<'_>) {
        for (m, n) in self.map_entries() {
            loader.map_max_entries(m, n);
        }
    }
}

fn names() -> String {
    KNOBS.iter().map(|k| k.name).collect::<Vec<_>>().join(", ")
}

/// A map's shape as the kernel reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub flags: u32,
    pub max_entries: u32,
}

impl std::fmt::Display for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} key {} B, value {} B, flags {:#x}, {} entries",
            type_name(self.map_type),
            self.key_size,
            self.value_size,
            self.flags,
            self.max_entries
        )
    }
}

fn type_name(t: u32) -> String {
    // enum bpf_map_type (uapi/linux/bpf.h), the ones we use.
    match t {
        1 => "hash".into(),
        2 => "array".into(),
        5 => "percpu_hash".into(),
        6 => "percpu_array".into(),
        9 => "lru_hash".into(),
        11 => "lpm_trie".into(),
        18 => "sockhash".into(),
        24 => "sk_storage".into(),
        27 => "ringbuf".into(),
        t => format!("map type {t}"),
    }
}

fn layout_of(data: &MapData) -> std::result::Result<Layout, aya::maps::MapError> {
    let i = data.info()?;
    let map_type = i.map_type().map(|t| t as u32).unwrap_or(u32::MAX);
    Ok(Layout {
        map_type,
        key_size: i.key_size(),
        value_size: i.value_size(),
        flags: i.map_flags(),
        max_entries: i.max_entries(),
    })
}

/// The pinned map's layout, None when it is not pinned.
pub fn pinned_layout(map_path: &Path) -> Result<Option<Layout>> {
    if !map_path.exists() {
        return Ok(None);
    }
    let data = MapData::from_pin(map_path)
        .map_err(|e| Error::bpf(format!("opening pinned map {}", map_path.display()), e))?;
    layout_of(&data).map(Some).map_err(|e| {
        Error::bpf(
            format!("reading the layout of pinned map {}", map_path.display()),
            e,
        )
    })
}

/// The layout of every shared map in `object` (the maps are created
/// unpinned-by-name under a scratch directory with 1 entry each, read,
/// and removed).
pub fn object_layouts(object: &[u8], bpffs_dir: &Path) -> Result<BTreeMap<&'static str, Layout>> {
    remove_probes(bpffs_dir, false);
    let scratch = scratch_dir(bpffs_dir);
    crate::sys::create_private_dir(&scratch)?;
    let result = (|| {
        let mut loader = aya::EbpfLoader::new();
        loader.default_map_pin_directory(&scratch);
        for m in ALL_MAPS {
            loader.map_max_entries(m, 1);
        }
        let ebpf = loader
            .load(object)
            .map_err(|e| Error::bpf("loading the kernel object to read its map layout", e))?;
        let mut out = BTreeMap::new();
        for m in layout_maps() {
            let Some(map) = ebpf.map(m) else { continue };
            let fd =
                map_fd(map).map_err(|e| Error::bpf(format!("map {m} of the kernel object"), e))?;
            let data = MapData::from_fd(fd)
                .map_err(|e| Error::bpf(format!("map {m} of the kernel object"), e))?;
            let mut l = layout_of(&data)
                .map_err(|e| Error::bpf(format!("layout of map {m} of the kernel object"), e))?;
            l.max_entries = knob_of(m)
                .map(|k| {
                    k.default
                        * k.maps
                            .iter()
                            .find(|(x, _)| *x == m)
                            .map(|(_, x)| *x)
                            .unwrap_or(1)
                })
                .unwrap_or(l.max_entries);
            out.insert(m, l);
        }
        Ok(out)
    })();
    for p in crate::pins::read_dir(&scratch) {
        let _ = std::fs::remove_file(p);
    }
    let _ = std::fs::remove_dir(&scratch);
    result
}

/// Remove the scratch directories of probes (`layout-probe-<pid>-<n>`) in
/// `dir`: all of them, or only those whose process is gone (killed in the
/// middle of a probe). Only the map pins a probe makes are removed (and
/// the directory once empty). Returns what was removed.
pub fn remove_probes(dir: &Path, all: bool) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    for d in crate::pins::read_dir(dir) {
        let Some(name) = d.file_name().and_then(|n| n.to_str()).map(str::to_string) else {
            continue;
        };
        let Some(rest) = name.strip_prefix("layout-probe-") else {
            continue;
        };
        if !d.symlink_metadata().is_ok_and(|m| m.is_dir()) {
            continue;
        }
        let pid = rest.split('-').next().unwrap_or_default();
        if !all && (pid.is_empty() || Path::new("/proc").join(pid).exists()) {
            continue;
        }
        for m in crate::pins::known_maps() {
            let p = d.join(m);
            if crate::pins::pin_kind(&p) == Some(crate::pins::PinKind::Map)
                && std::fs::remove_file(&p).is_ok()
            {
                removed.push(p);
            }
        }
        if std::fs::remove_dir(&d).is_ok() {
            removed.push(d);
        }
    }
    removed
}

fn scratch_dir(bpffs_dir: &Path) -> PathBuf {
    static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    bpffs_dir.join(format!("layout-probe-{}-{n}", std::process::id()))
}

fn map_fd(map: &aya::maps::Map) -> std::io::Result<std::os::fd::OwnedFd> {
    use aya::maps::Map;
    use std::os::fd::AsFd;
    let fd = match map {
        Map::HashMap(d)
        | Map::LruHashMap(d)
        | Map::PerCpuHashMap(d)
        | Map::LpmTrie(d)
        | Map::SockHash(d)
        | Map::Array(d)
        | Map::PerCpuArray(d)
        | Map::SockMap(d)
        | Map::SkStorage(d) => d.fd().as_fd(),
        Map::RingBuf(d) => d.fd().as_fd(),
        _ => return Err(std::io::Error::other("unexpected map kind")),
    };
    fd.try_clone_to_owned()
}

/// Before an existing install is reused: every pinned shared map must have
/// this object's layout, and its size must be the one asked for (when
/// asked). `maps_dir` is the install's map directory.
pub fn check_install(object: &[u8], maps_dir: &Path, sizes: &MapSizes) -> Result<()> {
    let pinned: Vec<(&'static str, Layout)> = layout_maps()
        .map(|m| pinned_layout(&maps_dir.join(m)).map(|l| l.map(|l| (m, l))))
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .flatten()
        .collect();
    if pinned.is_empty() {
        return Ok(());
    }
    let install = maps_dir.parent().unwrap_or(maps_dir);
    let want = object_layouts(object, install)?;
    for (m, have) in &pinned {
        let Some(w) = want.get(m) else { continue };
        let same = (have.map_type, have.key_size, have.value_size, have.flags)
            == (w.map_type, w.key_size, w.value_size, w.flags);
        if !same {
            return Err(Error::Layout(format!(
                "pinned map {m} of the install at {} is {have}, but this binary's kernel object needs {w}: the install was made by an incompatible version. Its programs keep running; run `redirect uninstall` (this releases every pod) and install again with this version",
                install.display()
            )));
        }
    }
    let requested: BTreeMap<_, _> = sizes.map_entries().into_iter().collect();
    for (m, have) in &pinned {
        if let Some(n) = requested.get(m) {
            if *n != have.max_entries {
                let k = knob_of(m).map(|k| k.name).unwrap_or("?");
                return Err(Error::Layout(format!(
                    "{FLAG} {k}={} does not match the install at {}: {m} is pinned with {} entries. Sizes are fixed when the install is created; drop {FLAG} to use the pinned sizes, or run `redirect uninstall` (this releases every pod) and install again",
                    sizes.0.get(k).copied().unwrap_or(*n),
                    install.display(),
                    have.max_entries
                )));
            }
        }
    }
    Ok(())
}

/// The capacity of a pinned map (for messages and `status`), or the
/// built-in default when it cannot be read.
pub fn pinned_max_entries(maps_dir: &Path, map: &str) -> u32 {
    pinned_layout(&maps_dir.join(map))
        .ok()
        .flatten()
        .map(|l| l.max_entries)
        .unwrap_or_else(|| {
            knob_of(map)
                .map(|k| {
                    k.default
                        * k.maps
                            .iter()
                            .find(|(x, _)| *x == map)
                            .map(|(_, x)| *x)
                            .unwrap_or(1)
                })
                .unwrap_or(0)
        })
}

/// Is this aya map error the kernel's "map full" (E2BIG on update)?
pub fn is_full(e: &aya::maps::MapError) -> bool {
    matches!(e, aya::maps::MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(libc::E2BIG))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_sizes() {
        let s = MapSizes::parse(&["pods=64,orig=128", "sockhash=2"]).unwrap();
        assert_eq!(s.0.get("pods"), Some(&64));
        let m = s.map_entries();
        assert!(
            m.contains(&(MAP_LISTENERS, 128))
                && m.contains(&(MAP_ORIG_BY_TUPLE, 128))
                && m.contains(&(MAP_ACCEL_FALLBACK, 2))
        );
        assert!(MapSizes::parse::<&str>(&[]).unwrap().is_empty());
        assert_eq!(MapSizes::parse(&["pods=8", "pods=8"]).unwrap().0.len(), 1);
        for (bad, want) in [
            ("pods", "expected <map>=<entries>"),
            ("nope=3", "unknown map 'nope'"),
            ("pods=x", "'x' is not a number"),
            ("pods=0", "out of range"),
            ("pods=-1", "not a number"),
            ("orig=16777217", "out of range"),
            ("pods=99999999999999999999", "not a number"),
        ] {
            let e = MapSizes::parse(&[bad]).unwrap_err().to_string();
            assert!(e.contains("--map-size") && e.contains(want), "{bad}: {e}");
        }
        let e = MapSizes::parse(&["pods=8,pods=9"]).unwrap_err().to_string();
        assert!(e.contains("given twice"), "{e}");
    }

    #[test]
    fn every_map_has_one_knob() {
        for m in ALL_MAPS {
            assert_eq!(
                KNOBS
                    .iter()
                    .filter(|k| k.maps.iter().any(|(x, _)| *x == m))
                    .count(),
                1,
                "{m}"
            );
        }
    }
}
