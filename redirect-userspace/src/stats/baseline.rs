//! `redirect stats --zero`, like `iptables -Z`, without clearing anything
//! the kernel counts: the counters are exported as Prometheus counters
//! and must stay monotonic. A hash map pinned in the install
//! (`maps/REDIRECT_STATS_BASELINE`, made by the first `--zero`; no
//! program uses it) keeps, per pod and row, the values at the last zero
//! and when it happened; `stats` shows the difference. Releasing a pod
//! removes its entries, as it removes its counters.

use std::collections::BTreeMap;

use aya::maps::{HashMap, Map, MapData};
use redirect_common::{CounterKey, Reason, MAP_COUNTERS};

use crate::{
    error::{Error, Result},
    pins::Pins,
};

/// Pin name (in the install's map directory).
pub const MAP_STATS_BASELINE: &str = crate::pins::MAP_STATS_BASELINE;

/// A row's values at its last `--zero`, and when (unix seconds).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Baseline {
    pub count: u64,
    pub bytes: u64,
    pub at: u64,
}
const _: () = assert!(std::mem::size_of::<Baseline>() == 24);
// SAFETY: plain old data, no padding.
unsafe impl aya::Pod for Baseline {}

type BaselineMap = HashMap<MapData, CounterKey, Baseline>;

/// Per pod (netns cookie), per reason.
pub type PodBaselines = BTreeMap<u64, BTreeMap<Reason, Baseline>>;

fn open(pins: &Pins) -> Result<Option<BaselineMap>> {
    let path = pins.map(MAP_STATS_BASELINE);
    if !path.exists() {
        return Ok(None);
    }
    let data = MapData::from_pin(&path)
        .map_err(|e| Error::bpf(format!("opening pinned map {}", path.display()), e))?;
    HashMap::try_from(Map::HashMap(data)).map(Some).map_err(|e| {
        Error::bpf(
            format!(
                "pinned map {} is not a `stats --zero` baseline of this version (remove it: rm {0}; the next --zero makes it again)",
                path.display()
            ),
            e,
        )
    })
}

/// The map, made and pinned when missing.
fn open_or_create(pins: &Pins) -> Result<BaselineMap> {
    if let Some(m) = open(pins)? {
        return Ok(m);
    }
    let path = pins.map(MAP_STATS_BASELINE);
    // One entry per counter at most.
    let max = match crate::mapsize::pinned_max_entries(&pins.maps_dir(), MAP_COUNTERS) {
        0 => redirect_common::MAX_COUNTERS,
        n => n,
    };
    crate::bpf::create_pinned(
        &path,
        &crate::bpf::MapSpec {
            map_type: crate::bpf::BPF_MAP_TYPE_HASH,
            key_size: std::mem::size_of::<CounterKey>() as u32,
            value_size: std::mem::size_of::<Baseline>() as u32,
            max_entries: max,
            name: "STATS_BASELINE",
        },
        MAP_STATS_BASELINE,
    )?;
    open(pins)?.ok_or_else(|| {
        Error::io(
            "reading back",
            &path,
            std::io::Error::from(std::io::ErrorKind::NotFound),
        )
    })
}

/// Every baseline of the install (none before the first `--zero`).
pub fn read(pins: &Pins) -> Result<PodBaselines> {
    let mut out = PodBaselines::new();
    let Some(m) = open(pins)? else {
        return Ok(out);
    };
    for (k, v) in m.iter().filter_map(|r| r.ok()) {
        if let Some(r) = Reason::from_u32(k.reason) {
            out.entry(k.netns).or_default().insert(r, v);
        }
    }
    Ok(out)
}

/// Make these rows (netns cookie, reason, current raw values) read zero
/// from now on: their raw values become their baseline.
pub fn zero(pins: &Pins, rows: &[(u64, Reason, u64, u64)], at: u64) -> Result<()> {
    let mut m = open_or_create(pins)?;
    for &(netns, reason, count, bytes) in rows {
        let key = CounterKey {
            netns,
            reason: reason as u32,
            _pad: 0,
        };
        m.insert(key, Baseline { count, bytes, at }, 0)
            .map_err(|e| {
                Error::bpf(
                    format!("writing the --zero baseline of netns cookie {netns} to {MAP_STATS_BASELINE}"),
                    e,
                )
            })?;
    }
    Ok(())
}

/// Drop a released pod's baselines (its counters are gone too; a pod
/// captured again in the same netns starts from zero).
pub fn forget_pod(pins: &Pins, cookie: u64) -> Result<()> {
    let Some(mut m) = open(pins)? else {
        return Ok(());
    };
    let keys: Vec<CounterKey> = m
        .keys()
        .filter_map(|k| k.ok())
        .filter(|k| k.netns == cookie)
        .collect();
    for k in keys {
        let _ = m.remove(&k);
    }
    Ok(())
}
