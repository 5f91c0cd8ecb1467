//! Typed handles on the pinned maps, and the per-pod entries in them.

use std::{collections::BTreeMap, net::IpAddr};

use aya::maps::{
    lpm_trie::{Key, LpmTrie},
    HashMap, Map, MapData, PerCpuHashMap, SockHash,
};
use redirect_common::{
    cidr_kind, CidrKeyData, CounterKey, CounterValue, ListenerKey, OrigDst, PodConfig, PortKey,
    Reason, TupleKey, AF_INET, AF_INET6, CIDR_KEY_FIXED_BITS, MAP_CIDRS, MAP_COUNTERS,
    MAP_LISTENERS, MAP_ORIG_BY_COOKIE, MAP_ORIG_BY_TUPLE, MAP_PODS, MAP_PORTS, MAP_SOCKS,
};

use crate::{
    config::{addr_bytes, Cidr, CidrEntry, PortEntry},
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
    /// Accelerated sockets kept on the normal path; None for an install
    /// made before it existed.
    pub accel_fallback: Option<HashMap<MapData, TupleKey, u8>>,
    /// The pods' IPv6 connections to their own addresses; None for an
    /// install made before it existed.
    pub local_connects: Option<HashMap<MapData, TupleKey, u8>>,
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
