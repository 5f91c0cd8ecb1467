//! Which cgroup each pod was attached under, and the processes of a pod
//! that an attachment does not cover.
//!
//! The cgroup is recorded in the install (`maps/REDIRECT_POD_CGROUPS`, a
//! hash map made by userspace and keyed by netns cookie; no program uses
//! it), so a later `attach`, `validate` or `detach` without `--cgroup`
//! keeps to the pod's cgroup instead of widening to the cgroup2 root.
//! Releasing the pod forgets it; `uninstall` removes the map.
//!
//! The cgroup programs only see sockets of processes in the attached
//! cgroup or below it: a process in the pod's network namespace but in
//! another cgroup is not captured. [`outside`] finds such processes.

use std::{
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use aya::maps::{HashMap, Map, MapData};

use crate::{
    error::{Error, Result},
    pins::{Pins, MAP_POD_CGROUPS},
};

const PATH_LEN: usize = 504;

/// The recorded cgroup of a pod: the cgroup's id (its directory's inode)
/// and its path (NUL-padded, truncated past 503 bytes).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct RawCgroup {
    id: u64,
    path: [u8; PATH_LEN],
}
const _: () = assert!(std::mem::size_of::<RawCgroup>() == 512);
// SAFETY: plain old data, no padding.
unsafe impl aya::Pod for RawCgroup {}

/// A pod's recorded cgroup.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Recorded {
    pub id: u64,
    pub path: PathBuf,
}

impl Recorded {
    /// The cgroup still exists at its recorded path (same id).
    pub fn exists(&self) -> bool {
        std::fs::metadata(&self.path).is_ok_and(|m| m.ino() == self.id)
    }
}

type CgroupMap = HashMap<MapData, u64, RawCgroup>;

fn open(pins: &Pins) -> Result<Option<CgroupMap>> {
    let path = pins.map(MAP_POD_CGROUPS);
    if !path.exists() {
        return Ok(None);
    }
    let data = MapData::from_pin(&path)
        .map_err(|e| Error::bpf(format!("opening pinned map {}", path.display()), e))?;
    HashMap::try_from(Map::HashMap(data))
        .map(Some)
        .map_err(|e| {
            Error::bpf(
                format!(
                    "pinned map {} is not this version's record of the pods' cgroups",
                    path.display()
                ),
                e,
            )
        })
}

fn open_or_create(pins: &Pins) -> Result<CgroupMap> {
    if let Some(m) = open(pins)? {
        return Ok(m);
    }
    let path = pins.map(MAP_POD_CGROUPS);
    // One entry per pod slot.
    let max = match crate::mapsize::pinned_max_entries(&pins.maps_dir(), redirect_common::MAP_PODS)
    {
        0 => redirect_common::MAX_PODS,
        n => n,
    };
    crate::bpf::create_pinned(
        &path,
        &crate::bpf::MapSpec {
            map_type: crate::bpf::BPF_MAP_TYPE_HASH,
            key_size: 8,
            value_size: std::mem::size_of::<RawCgroup>() as u32,
            max_entries: max,
            name: "POD_CGROUPS",
        },
        MAP_POD_CGROUPS,
    )?;
    open(pins)?.ok_or_else(|| {
        Error::io(
            "reading back",
            &path,
            std::io::Error::from(std::io::ErrorKind::NotFound),
        )
    })
}

fn decode(v: &RawCgroup) -> Recorded {
    let end = v.path.iter().position(|&c| c == 0).unwrap_or(PATH_LEN);
    Recorded {
        id: v.id,
        path: PathBuf::from(String::from_utf8_lossy(&v.path[..end]).into_owned()),
    }
}

/// Record `cgroup` as the pod's.
pub fn record(pins: &Pins, cookie: u64, cgroup: &Path) -> Result<()> {
    let id = std::fs::metadata(cgroup)
        .map_err(|e| Error::io("reading", cgroup, e))?
        .ino();
    let mut path = [0u8; PATH_LEN];
    let s = cgroup.as_os_str().as_encoded_bytes();
    let n = s.len().min(PATH_LEN - 1);
    path[..n].copy_from_slice(&s[..n]);
    let mut m = open_or_create(pins)?;
    m.insert(cookie, RawCgroup { id, path }, 0).map_err(|e| {
        Error::bpf(
            format!("recording the cgroup of netns cookie {cookie} in {MAP_POD_CGROUPS}"),
            e,
        )
    })
}

/// The pod's recorded cgroup (None: never recorded, e.g. captured by an
/// older version).
pub fn recorded(pins: &Pins, cookie: u64) -> Result<Option<Recorded>> {
    Ok(open(pins)?.and_then(|m| m.get(&cookie, 0).ok().map(|v| decode(&v))))
}

/// Every pod's recorded cgroup, by netns cookie.
pub fn all(pins: &Pins) -> Result<std::collections::BTreeMap<u64, Recorded>> {
    Ok(open(pins)?
        .map(|m| {
            m.iter()
                .filter_map(|r| r.ok())
                .map(|(k, v)| (k, decode(&v)))
                .collect()
        })
        .unwrap_or_default())
}

/// Forget a released pod's cgroup.
pub fn forget(pins: &Pins, cookie: u64) -> Result<()> {
    if let Some(mut m) = open(pins)? {
        let _ = m.remove(&cookie);
    }
    Ok(())
}

/// A process in a pod's network namespace that the attached cgroup does
/// not cover.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Outside {
    pub pid: u32,
    pub comm: String,
    /// Its cgroup2 path, as /proc/<pid>/cgroup says it (`0::<path>`).
    pub cgroup: String,
}

/// Processes in the network namespace `netns_inode` that are not in
/// `cgroup` or below it (their connections are not captured). `cgroup`
/// is a directory of the cgroup2 mount `mount`.
pub fn outside(netns_inode: u64, cgroup: &Path, mount: &Path) -> Vec<Outside> {
    let want = cgroup.strip_prefix(mount).unwrap_or(Path::new(""));
    let want = Path::new("/").join(want);
    let mut out = Vec::new();
    for pid in crate::sys::pids_in_netns(netns_inode) {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/cgroup")) else {
            continue;
        };
        let Some(cg) = text.lines().find_map(|l| l.strip_prefix("0::")) else {
            continue;
        };
        if Path::new(cg).starts_with(&want) {
            continue;
        }
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        out.push(Outside {
            pid,
            comm,
            cgroup: cg.to_string(),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorded_path_round_trips_and_truncates() {
        let mut path = [0u8; PATH_LEN];
        path[..5].copy_from_slice(b"/a/bc");
        assert_eq!(
            decode(&RawCgroup { id: 7, path }),
            Recorded {
                id: 7,
                path: PathBuf::from("/a/bc")
            }
        );
        let full = [b'x'; PATH_LEN];
        assert_eq!(
            decode(&RawCgroup { id: 1, path: full })
                .path
                .as_os_str()
                .len(),
            PATH_LEN
        );
    }

    #[test]
    fn this_process_is_inside_its_own_cgroup_and_the_root() {
        // Our own netns and cgroup: we are not "outside" either of them.
        let Ok(mount) = crate::sys::cgroup2_mount() else {
            return;
        };
        let ino = std::fs::metadata("/proc/self/ns/net").unwrap().ino();
        let me = std::process::id();
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        let Some(rel) = own.lines().find_map(|l| l.strip_prefix("0::")) else {
            return;
        };
        let dir = mount.join(rel.trim_start_matches('/'));
        assert!(!outside(ino, &dir, &mount).iter().any(|o| o.pid == me));
        assert!(!outside(ino, &mount, &mount).iter().any(|o| o.pid == me));
        // A sibling cgroup path that does not contain us.
        let other = mount.join("redirect-no-such-cgroup");
        assert!(outside(ino, &other, &mount).iter().any(|o| o.pid == me));
    }
}
