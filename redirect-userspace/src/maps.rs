//! Typed handles on the pinned maps, and the per-pod entries in them.

use std::{collections::BTreeMap, net::IpAddr};

use crate::config::addr_bytes;

use aya::maps::{
    lpm_trie::{Key, LpmTrie},
    HashMap, Map, MapData, PerCpuHashMap, SockHash,
};
use redirect_common::{
    cidr_kind, CidrKeyData, CounterKey, CounterValue, IfaceEntry, IfaceKey, ListenerKey, OrigDst,
    PodConfig, PortKey, Reason, RouteEntry, TupleKey, AF_INET, AF_INET6, CIDR_KEY_FIXED_BITS,
    MAP_CIDRS, MAP_COUNTERS, MAP_IFACES, MAP_LISTENERS, MAP_ORIG_BY_COOKIE, MAP_ORIG_BY_TUPLE,
    MAP_PODS, MAP_PORTS, MAP_ROUTES, MAP_SOCKS,
};

use crate::{
    config::{Cidr, CidrEntry, PortEntry},
    error::{Error, Result},
    pins::Pins,
};

pub struct Maps {
    pub pods: HashMap<MapData, u64, PodConfig>,
    pub cidrs: LpmTrie<MapData, CidrKeyData, u8>,
    pub ports: HashMap<MapData, PortKey, u8>,
    pub counters: PerCpuHashMap<MapData, CounterKey, CounterValue>,
    pub listeners: SockHash<MapData, ListenerKey>,
    pub socks: SockHash<MapData, TupleKey>,
    pub orig_by_cookie: HashMap<MapData, u64, OrigDst>,
    pub orig_by_tuple: HashMap<MapData, TupleKey, OrigDst>,
    /// Learned per pod and port (acceleration skips short-lived ports);
    /// None for an install made before it existed.
    pub accel_ports: Option<HashMap<MapData, PortKey, u32>>,
    /// Counter updates lost to a full REDIRECT_COUNTERS; None for an
    /// install made before it existed.
    pub counters_lost: Option<aya::maps::PerCpuArray<MapData, u64>>,
    /// `-c`/`-k` interface entries; None for an install made before they
    /// existed (until a new version loads the object into it).
    pub ifaces: Option<HashMap<MapData, IfaceKey, IfaceEntry>>,
    /// Route entries; None as `ifaces`.
    pub routes: Option<LpmTrie<MapData, CidrKeyData, RouteEntry>>,
    /// Accelerated sockets kept on the normal path; None for an install
    /// made before it existed.
    pub accel_fallback: Option<HashMap<MapData, TupleKey, u8>>,
    /// The pods' IPv6 connections to their own addresses; None for an
    /// install made before it existed.
    pub local_connects: Option<HashMap<MapData, TupleKey, u8>>,
}

/// A pod's entries that come from its network namespace as read at
/// attach (`podnet`): its `-c`/`-k` interfaces and its routes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NetEntries {
    /// (ifindex or `IFACE_PENDING` + slot, entry).
    pub ifaces: Vec<(u32, IfaceEntry)>,
    pub routes: Vec<(Cidr, RouteEntry)>,
}

fn open(pins: &Pins, name: &str) -> Result<Map> {
    let path = pins.map(name);
    let data = MapData::from_pin(&path)
        .map_err(|e| Error::bpf(format!("opening pinned map {}", path.display()), e))?;
    Map::from_map_data(data)
        .map_err(|e| Error::bpf(format!("reading pinned map {}", path.display()), e))
}

macro_rules! typed {
    ($pins:expr, $name:expr) => {
        open($pins, $name)?
            .try_into()
            .map_err(|e| Error::bpf(format!("pinned map {} has an unexpected type (an install from another version? run `redirect uninstall`)", $name), e))?
    };
}

/// Per-pod aggregates of the counters map.
pub type PodCounters = BTreeMap<u64, BTreeMap<Reason, CounterValue>>;

impl Maps {
    /// Open the pinned maps of an existing install.
    pub fn open(pins: &Pins) -> Result<Maps> {
        if !pins.is_installed() {
            return Err(Error::NotInstalled(pins.root.clone()));
        }
        Ok(Maps {
            pods: typed!(pins, MAP_PODS),
            cidrs: typed!(pins, MAP_CIDRS),
            ports: typed!(pins, MAP_PORTS),
            counters: typed!(pins, MAP_COUNTERS),
            listeners: typed!(pins, MAP_LISTENERS),
            socks: typed!(pins, MAP_SOCKS),
            orig_by_cookie: lru(pins, MAP_ORIG_BY_COOKIE)?,
            orig_by_tuple: lru(pins, MAP_ORIG_BY_TUPLE)?,
            accel_ports: if pins.map(redirect_common::MAP_ACCEL_PORTS).exists() {
                Some(lru(pins, redirect_common::MAP_ACCEL_PORTS)?)
            } else {
                None
            },
            counters_lost: if pins.map(redirect_common::MAP_COUNTERS_LOST).exists() {
                Some(typed!(pins, redirect_common::MAP_COUNTERS_LOST))
            } else {
                None
            },
            ifaces: if pins.map(MAP_IFACES).exists() {
                Some(typed!(pins, MAP_IFACES))
            } else {
                None
            },
            routes: if pins.map(MAP_ROUTES).exists() {
                Some(typed!(pins, MAP_ROUTES))
            } else {
                None
            },
            accel_fallback: if pins.map(redirect_common::MAP_ACCEL_FALLBACK).exists() {
                Some(lru(pins, redirect_common::MAP_ACCEL_FALLBACK)?)
            } else {
                None
            },
            local_connects: if pins.map(redirect_common::MAP_LOCAL_CONNECTS).exists() {
                Some(lru(pins, redirect_common::MAP_LOCAL_CONNECTS)?)
            } else {
                None
            },
        })
    }

    /// A pod's interface entries (ifindex or pending slot, entry).
    pub fn iface_entries(&self, cookie: u64) -> Vec<(u32, IfaceEntry)> {
        let Some(m) = self.ifaces.as_ref() else {
            return Vec::new();
        };
        let mut v: Vec<(u32, IfaceEntry)> = m
            .iter()
            .filter_map(|r| r.ok())
            .filter(|(k, _)| k.netns == cookie)
            .map(|(k, e)| (k.ifindex, e))
            .collect();
        v.sort_by_key(|(i, _)| *i);
        v
    }

    /// A pod's route entries.
    pub fn route_entries(&self, cookie: u64) -> Vec<(Cidr, RouteEntry)> {
        let Some(m) = self.routes.as_ref() else {
            return Vec::new();
        };
        let mut v = Vec::new();
        for k in m.keys().filter_map(|k| k.ok()) {
            let d = k.data();
            if u64::from_ne_bytes(d.netns) != cookie {
                continue;
            }
            let Ok(e) = m.get(&k, 0) else { continue };
            let family = u32::from_ne_bytes(d.kind);
            let len = (k.prefix_len() - CIDR_KEY_FIXED_BITS) as u8;
            let addr = if family == AF_INET6 as u32 {
                IpAddr::V6(d.addr.into())
            } else {
                IpAddr::V4([d.addr[0], d.addr[1], d.addr[2], d.addr[3]].into())
            };
            v.push((Cidr { addr, len }, e));
        }
        v
    }

    fn route_key(cookie: u64, c: &Cidr) -> Key<CidrKeyData> {
        let family = if c.is_v6() { AF_INET6 } else { AF_INET };
        Key::new(
            CIDR_KEY_FIXED_BITS + c.len as u32,
            CidrKeyData::new(cookie, family as u32, addr_bytes(c.addr)),
        )
    }

    fn iface_key(cookie: u64, ifindex: u32) -> IfaceKey {
        IfaceKey {
            netns: cookie,
            ifindex,
            _pad: 0,
        }
    }

    /// Write a pod's interface and route entries, then drop those it had
    /// that are not in `net` any more. On a failure the new entries are
    /// removed and the old ones kept. An install without these maps (made
    /// by an older version) takes none: Err when some are needed.
    pub fn put_net(&mut self, cookie: u64, net: &NetEntries) -> Result<()> {
        let old = NetEntries {
            ifaces: self.iface_entries(cookie),
            routes: self.route_entries(cookie),
        };
        let result = (|| -> Result<()> {
            if !net.ifaces.is_empty() {
                let m = self.ifaces.as_mut().ok_or_else(|| missing(MAP_IFACES))?;
                for (i, e) in &net.ifaces {
                    m.insert(Self::iface_key(cookie, *i), e, 0).map_err(|err| {
                        let cap = capacity(&*m);
                        full_or(
                            err,
                            MAP_IFACES,
                            cap,
                            "ifaces",
                            format!(
                                "adding interface {} to {MAP_IFACES}",
                                crate::podnet::entry_name(e)
                            ),
                        )
                    })?;
                }
            }
            if !net.routes.is_empty() {
                let m = self.routes.as_mut().ok_or_else(|| missing(MAP_ROUTES))?;
                for (c, e) in &net.routes {
                    m.insert(&Self::route_key(cookie, c), e, 0).map_err(|err| {
                        full_or(
                            err,
                            MAP_ROUTES,
                            capacity(&*m),
                            "routes",
                            format!("adding the route to {c} to {MAP_ROUTES}"),
                        )
                    })?;
                }
            }
            Ok(())
        })();
        let keep = if result.is_ok() { net } else { &old };
        let drop_from = if result.is_ok() { &old } else { net };
        if let Some(m) = self.ifaces.as_mut() {
            for (i, _) in &drop_from.ifaces {
                if !keep.ifaces.iter().any(|(k, _)| k == i) {
                    let _ = m.remove(&Self::iface_key(cookie, *i));
                }
            }
            if result.is_err() {
                for (i, e) in &old.ifaces {
                    let _ = m.insert(Self::iface_key(cookie, *i), e, 0);
                }
            }
        }
        if let Some(m) = self.routes.as_mut() {
            for (c, _) in &drop_from.routes {
                if !keep.routes.iter().any(|(k, _)| k == c) {
                    let _ = m.remove(&Self::route_key(cookie, c));
                }
            }
            if result.is_err() {
                for (c, e) in &old.routes {
                    let _ = m.insert(&Self::route_key(cookie, c), e, 0);
                }
            }
        }
        result
    }

    pub fn pods(&self) -> Vec<(u64, PodConfig)> {
        self.pods.iter().filter_map(|r| r.ok()).collect()
    }

    pub fn pod(&self, cookie: u64) -> Option<PodConfig> {
        self.pods.get(&cookie, 0).ok()
    }

    pub fn port_entries(&self, cookie: u64) -> Vec<PortEntry> {
        self.all_port_entries().remove(&cookie).unwrap_or_default()
    }

    /// Every pod's port entries, in one pass over the map.
    pub fn all_port_entries(&self) -> BTreeMap<u64, Vec<PortEntry>> {
        let mut out: BTreeMap<u64, Vec<PortEntry>> = BTreeMap::new();
        for k in self.ports.keys().filter_map(|k| k.ok()) {
            out.entry(k.netns).or_default().push((k.kind, k.port));
        }
        out
    }

    pub fn cidr_entries(&self, cookie: u64) -> Vec<CidrEntry> {
        self.all_cidr_entries().remove(&cookie).unwrap_or_default()
    }

    /// Every pod's CIDR entries, in one pass over the map.
    pub fn all_cidr_entries(&self) -> BTreeMap<u64, Vec<CidrEntry>> {
        let mut out: BTreeMap<u64, Vec<CidrEntry>> = BTreeMap::new();
        for k in self.cidrs.keys().filter_map(|k| k.ok()) {
            let d = k.data();
            let kind = u32::from_ne_bytes(d.kind);
            let len = (k.prefix_len() - CIDR_KEY_FIXED_BITS) as u8;
            let addr = if kind >= cidr_kind::INCLUDE_V6 {
                IpAddr::V6(d.addr.into())
            } else {
                IpAddr::V4([d.addr[0], d.addr[1], d.addr[2], d.addr[3]].into())
            };
            out.entry(u64::from_ne_bytes(d.netns))
                .or_default()
                .push((kind, Cidr { addr, len }));
        }
        out
    }

    fn port_key(cookie: u64, (kind, port): PortEntry) -> PortKey {
        PortKey {
            netns: cookie,
            kind,
            port,
            _pad: 0,
        }
    }

    fn cidr_key(cookie: u64, (kind, c): CidrEntry) -> Key<CidrKeyData> {
        Key::new(
            CIDR_KEY_FIXED_BITS + c.len as u32,
            CidrKeyData::new(cookie, kind, addr_bytes(c.addr)),
        )
    }

    /// Install a pod's entries and, last, its config (the commit point: the
    /// programs ignore a netns until its config exists). On re-attach the
    /// old entries stay valid until the new config is in, then go.
    pub fn put_pod(
        &mut self,
        cookie: u64,
        cfg: &PodConfig,
        ports: &[PortEntry],
        cidrs: &[CidrEntry],
    ) -> Result<()> {
        let old_ports = self.port_entries(cookie);
        let old_cidrs = self.cidr_entries(cookie);
        let result = (|| -> Result<()> {
            for p in ports {
                self.ports
                    .insert(Self::port_key(cookie, *p), 1, 0)
                    .map_err(|e| {
                        full_or(
                            e,
                            MAP_PORTS,
                            capacity(&self.ports),
                            "ports",
                            format!("adding port {} to {MAP_PORTS}", p.1),
                        )
                    })?;
            }
            for c in cidrs {
                self.cidrs
                    .insert(&Self::cidr_key(cookie, *c), 1, 0)
                    .map_err(|e| {
                        full_or(
                            e,
                            MAP_CIDRS,
                            capacity(&self.cidrs),
                            "cidrs",
                            format!("adding CIDR {} to {MAP_CIDRS}", c.1),
                        )
                    })?;
            }
            self.pods.insert(cookie, cfg, 0).map_err(|e| {
                if crate::mapsize::is_full(&e) {
                    Error::MapFull { map: MAP_PODS, max_entries: self.pods_capacity(), knob: "pods", what: format!("no room for the config of the pod with netns cookie {cookie}, which is not captured") }
                } else {
                    Error::bpf(format!("adding pod config to {MAP_PODS}"), e)
                }
            })
        })();
        let (stale_ports, stale_cidrs): (Vec<_>, Vec<_>) = match &result {
            // Success: drop what the new config no longer lists.
            Ok(()) => (
                old_ports
                    .iter()
                    .filter(|p| !ports.contains(p))
                    .copied()
                    .collect(),
                old_cidrs
                    .iter()
                    .filter(|c| !cidrs.contains(c))
                    .copied()
                    .collect(),
            ),
            // Failure: drop what we added, keep the old pod as it was.
            Err(_) => (
                ports
                    .iter()
                    .filter(|p| !old_ports.contains(p))
                    .copied()
                    .collect(),
                cidrs
                    .iter()
                    .filter(|c| !old_cidrs.contains(c))
                    .copied()
                    .collect(),
            ),
        };
        for p in stale_ports {
            let _ = self.ports.remove(&Self::port_key(cookie, p));
        }
        for c in stale_cidrs {
            let _ = self.cidrs.remove(&Self::cidr_key(cookie, c));
        }
        result
    }

    /// Capacity of the pinned pod-config map.
    pub fn pods_capacity(&self) -> u32 {
        capacity(&self.pods)
    }

    /// Remove everything keyed by this pod. Config first, so capture stops
    /// before its tables go. Its connection records keyed by 4-tuple (the
    /// original destinations published for its proxy, the acceleration
    /// fallback marks, the marks of its own IPv6 connections) go too;
    /// records keyed by socket cookie carry no netns and go with their
    /// sockets (the programs remove them at close whether the pod is
    /// captured or not).
    pub fn remove_pod(&mut self, cookie: u64) {
        let _ = self.pods.remove(&cookie);
        for p in self.port_entries(cookie) {
            let _ = self.ports.remove(&Self::port_key(cookie, p));
        }
        for c in self.cidr_entries(cookie) {
            let _ = self.cidrs.remove(&Self::cidr_key(cookie, c));
        }
        for family in [AF_INET as u32, AF_INET6 as u32] {
            let _ = self.listeners.remove(&ListenerKey {
                netns: cookie,
                family,
                _pad: 0,
            });
        }
        let keys: Vec<_> = self
            .counters
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| k.netns == cookie)
            .collect();
        for k in keys {
            let _ = self.counters.remove(&k);
        }
        let keys: Vec<_> = self
            .orig_by_tuple
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| k.netns == cookie)
            .collect();
        for k in keys {
            let _ = self.orig_by_tuple.remove(&k);
        }
        for m in [self.accel_fallback.as_mut(), self.local_connects.as_mut()]
            .into_iter()
            .flatten()
        {
            let keys: Vec<_> = m
                .keys()
                .filter_map(|k| k.ok())
                .filter(|k| k.netns == cookie)
                .collect();
            for k in keys {
                let _ = m.remove(&k);
            }
        }
        if let Some(m) = self.accel_ports.as_mut() {
            let keys: Vec<_> = m
                .keys()
                .filter_map(|k| k.ok())
                .filter(|k| k.netns == cookie)
                .collect();
            for k in keys {
                let _ = m.remove(&k);
            }
        }
        // Its `-c`/`-k` interface and route entries. (A VM's connections,
        // recorded by 4-tuple only, went with the tuple records above.)
        let _ = self.put_net(cookie, &NetEntries::default());
    }

    /// Counter updates the programs could not record because
    /// REDIRECT_COUNTERS was full (summed over CPUs).
    pub fn counters_lost(&self) -> u64 {
        self.counters_lost
            .as_ref()
            .and_then(|m| m.get(&0, 0).ok())
            .map_or(0, |v| v.iter().sum())
    }

    /// Counters summed over CPUs, per pod and reason.
    pub fn counters(&self) -> PodCounters {
        let mut out = PodCounters::new();
        for (k, per_cpu) in self.counters.iter().filter_map(|r| r.ok()) {
            let Some(reason) = Reason::from_u32(k.reason) else {
                continue;
            };
            let sum = per_cpu
                .iter()
                .fold(CounterValue::default(), |a, v| CounterValue {
                    count: a.count + v.count,
                    bytes: a.bytes + v.bytes,
                });
            let slot = out.entry(k.netns).or_default().entry(reason).or_default();
            slot.count += sum.count;
            slot.bytes += sum.bytes;
        }
        out
    }

    /// Families with a registered inbound listener for this pod.
    pub fn listener_families(&self, cookie: u64) -> Vec<&'static str> {
        // Sockhash values cannot be read back from userspace (ENOSPC):
        // look for the keys instead.
        let keys: Vec<ListenerKey> = self.listeners.keys().filter_map(|k| k.ok()).collect();
        [(AF_INET, "ipv4"), (AF_INET6, "ipv6")]
            .into_iter()
            .filter(|(f, _)| {
                keys.contains(&ListenerKey {
                    netns: cookie,
                    family: *f as u32,
                    _pad: 0,
                })
            })
            .map(|(_, name)| name)
            .collect()
    }

    /// Entry counts of the socket-tracking maps (for leak checks).
    pub fn tracked_sockets(&self) -> (usize, usize) {
        (
            self.orig_by_cookie.keys().count(),
            self.orig_by_tuple.keys().count(),
        )
    }

    /// Accelerated sockets currently in the sockhash (the kernel removes
    /// them when they close).
    pub fn accelerated_sockets(&self) -> usize {
        self.socks.keys().count()
    }
}

/// LRU hash maps are read like hash maps.
fn lru<K: aya::Pod, V: aya::Pod>(pins: &Pins, name: &str) -> Result<HashMap<MapData, K, V>> {
    match open(pins, name)? {
        Map::LruHashMap(m) | Map::HashMap(m) => HashMap::try_from(Map::HashMap(m))
            .map_err(|e| Error::bpf(format!("pinned map {name}"), e)),
        _ => Err(Error::bpf(
            format!("pinned map {name}"),
            std::io::Error::other(
                "unexpected map type (an install from another version? run `redirect uninstall`)",
            ),
        )),
    }
}

/// A map this binary needs is not pinned in the install (made by an older
/// version, and not loaded by this one yet).
fn missing(map: &str) -> Error {
    Error::bpf(
        format!("pinned map {map}"),
        std::io::Error::other(
            "missing from the install (made by an older version): run `redirect attach` or restart the agent with this version first",
        ),
    )
}

/// A map-full error (naming the map, its capacity and the knob) when the
/// kernel said E2BIG, else the plain error.
fn full_or(
    e: aya::maps::MapError,
    map: &'static str,
    max_entries: u32,
    knob: &'static str,
    what: String,
) -> Error {
    if crate::mapsize::is_full(&e) {
        return Error::MapFull {
            map,
            max_entries,
            knob,
            what: format!("{what}: no room"),
        };
    }
    Error::bpf(what, e)
}

/// max_entries of an open map (0 if the kernel does not say).
pub fn capacity<K: aya::Pod, V, M: aya::maps::IterableMap<K, V>>(m: &M) -> u32 {
    m.map().info().map(|i| i.max_entries()).unwrap_or(0)
}
