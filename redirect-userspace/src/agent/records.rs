//! What the agent remembers about each pod it captured (container id, pod
//! name, netns path), so a DEL whose namespace is already gone can still
//! find the pod. It is a pinned BPF hash map next to the kernel maps
//! (`<pin-dir>/maps/REDIRECT_AGENT_PODS`), keyed by netns cookie: the
//! state stays on bpffs, a restarted agent reads it back, and `redirect
//! uninstall` removes it with the other maps. No kernel program uses it.

use std::{
    ffi::CString,
    io,
    os::fd::{AsFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
};

use aya::maps::{HashMap, Map, MapData};

use crate::{
    error::{Error, Result},
    pins::Pins,
};

pub const MAP_AGENT_PODS: &str = crate::pins::MAP_AGENT_PODS;

const CID_LEN: usize = 128;
const POD_LEN: usize = 320;
const NETNS_LEN: usize = 256;

/// One pod as the agent saw it at ADD (fixed-size, NUL-padded strings).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct RawRecord {
    container_id: [u8; CID_LEN],
    pod: [u8; POD_LEN],
    netns: [u8; NETNS_LEN],
}

unsafe impl aya::Pod for RawRecord {}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Record {
    pub container_id: String,
    pub pod: String,
    pub netns: String,
}

fn put<const N: usize>(s: &str) -> [u8; N] {
    let mut b = [0u8; N];
    // Truncated on a char boundary: the record is a lookup aid, and ids
    // and paths longer than these fields do not occur in practice.
    let mut end = s.len().min(N);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    b[..end].copy_from_slice(&s.as_bytes()[..end]);
    b
}

fn get(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

impl From<&Record> for RawRecord {
    fn from(r: &Record) -> RawRecord {
        RawRecord {
            container_id: put(&r.container_id),
            pod: put(&r.pod),
            netns: put(&r.netns),
        }
    }
}

impl From<&RawRecord> for Record {
    fn from(r: &RawRecord) -> Record {
        Record {
            container_id: get(&r.container_id),
            pod: get(&r.pod),
            netns: get(&r.netns),
        }
    }
}

/// Does this container id fit the record unchanged?
pub fn fits(container_id: &str) -> bool {
    container_id.len() <= CID_LEN
}

pub struct Records {
    map: HashMap<MapData, u64, RawRecord>,
}

impl Records {
    /// Open the pinned record map, creating and pinning it when missing.
    pub fn open_or_create(pins: &Pins) -> Result<Records> {
        let path = pins.map(MAP_AGENT_PODS);
        if !path.exists() {
            // As many records as the install has pod slots (`--map-size pods=`).
            let capacity =
                crate::mapsize::pinned_max_entries(&pins.maps_dir(), redirect_common::MAP_PODS);
            match create_pinned(&path, capacity) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(Error::io("creating the agent's pinned pod map", &path, e)),
            }
        }
        let data = MapData::from_pin(&path)
            .map_err(|e| Error::bpf(format!("opening pinned map {}", path.display()), e))?;
        let map = match Map::from_map_data(data)
            .map_err(|e| Error::bpf(format!("reading pinned map {}", path.display()), e))?
        {
            Map::HashMap(m) => HashMap::try_from(Map::HashMap(m))
                .map_err(|e| Error::bpf(format!("pinned map {}", path.display()), e))?,
            _ => {
                return Err(Error::bpf(
                    format!("pinned map {}", path.display()),
                    io::Error::other(
                        "unexpected map type (remove it, or run `redirect uninstall`)",
                    ),
                ))
            }
        };
        Ok(Records { map })
    }

    /// Open the pinned record map for reading; None when there is none
    /// (no agent ever captured a pod with this install).
    pub fn open_existing(pins: &Pins) -> Result<Option<Records>> {
        if !pins.map(MAP_AGENT_PODS).exists() {
            return Ok(None);
        }
        Self::open_or_create(pins).map(Some)
    }

    pub fn all(&self) -> Vec<(u64, Record)> {
        self.map
            .iter()
            .filter_map(|r| r.ok())
            .map(|(k, v)| (k, Record::from(&v)))
            .collect()
    }

    pub fn get(&self, cookie: u64) -> Option<Record> {
        self.map.get(&cookie, 0).ok().map(|r| Record::from(&r))
    }

    pub fn put(&mut self, cookie: u64, r: &Record) -> Result<()> {
        self.map
            .insert(cookie, RawRecord::from(r), 0)
            .map_err(|e| Error::bpf(format!("recording pod {} in {MAP_AGENT_PODS}", r.pod), e))
    }

    pub fn remove(&mut self, cookie: u64) {
        let _ = self.map.remove(&cookie);
    }

    /// Cookies recorded for this container id.
    pub fn by_container(&self, container_id: &str) -> Vec<u64> {
        let want = RawRecord::from(&Record {
            container_id: container_id.into(),
            ..Default::default()
        })
        .container_id;
        self.map
            .iter()
            .filter_map(|r| r.ok())
            .filter(|(_, v)| !container_id.is_empty() && v.container_id == want)
            .map(|(k, _)| k)
            .collect()
    }
}

/// BPF_MAP_CREATE a hash map (u64 → RawRecord, not preallocated) and pin it.
fn create_pinned(path: &Path, capacity: u32) -> io::Result<()> {
    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_OBJ_PIN: libc::c_long = 6;
    const BPF_MAP_TYPE_HASH: u32 = 1;
    const BPF_F_NO_PREALLOC: u32 = 1;
    // union bpf_attr, map create part: map_type, key_size, value_size,
    // max_entries, map_flags, inner_map_fd, numa_node, map_name[16].
    let mut attr = [0u8; 128];
    let words = [
        BPF_MAP_TYPE_HASH,
        8,
        std::mem::size_of::<RawRecord>() as u32,
        capacity,
        BPF_F_NO_PREALLOC,
    ];
    for (i, w) in words.iter().enumerate() {
        attr[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
    }
    let name = b"redirect_agent";
    attr[28..28 + name.len()].copy_from_slice(name);
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_MAP_CREATE, attr.as_mut_ptr(), attr.len()) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let c = CString::new(path.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    // { u64 pathname; u32 bpf_fd; u32 file_flags; }
    let mut pin = [0u8; 128];
    pin[..8].copy_from_slice(&(c.as_ptr() as u64).to_ne_bytes());
    pin[8..12]
        .copy_from_slice(&(std::os::fd::AsRawFd::as_raw_fd(&fd.as_fd()) as u32).to_ne_bytes());
    let r = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_PIN, pin.as_mut_ptr(), pin.len()) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A record's netns path, as a path.
pub fn netns_path(r: &Record) -> Option<PathBuf> {
    (!r.netns.is_empty()).then(|| PathBuf::from(&r.netns))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trip_and_truncation() {
        let r = Record {
            container_id: "abc".into(),
            pod: "ns/name".into(),
            netns: "/run/netns/x".into(),
        };
        assert_eq!(Record::from(&RawRecord::from(&r)), r);
        let long = "é".repeat(200);
        let back = Record::from(&RawRecord::from(&Record {
            pod: long.clone(),
            ..r.clone()
        }));
        assert!(long.starts_with(&back.pod) && back.pod.len() <= POD_LEN);
        assert!(fits(&"a".repeat(128)) && !fits(&"a".repeat(129)));
    }
}
