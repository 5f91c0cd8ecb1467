//! Where an installation keeps its state on bpffs. One directory per
//! install:
//!
//! ```text
//! <pin-dir>/maps/REDIRECT_*            the shared maps
//! <pin-dir>/maps/AYA_LOGS              the kernel debug log's ring buffer
//! <pin-dir>/cgroups/<cgroup-id>/<prog> cgroup links (connect, sockops, ...)
//! <pin-dir>/netns/<netns-cookie>/sk_lookup   per-pod inbound link
//! <pin-dir>/programs/redirect_sk_msg   acceleration verdict (attached to
//!                                       the REDIRECT_SOCKS map)
//! ```

use std::path::{Path, PathBuf};

pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/redirect";

#[derive(Clone, Debug)]
pub struct Pins {
    pub root: PathBuf,
}

impl Pins {
    pub fn new(root: impl Into<PathBuf>) -> Pins {
        Pins { root: root.into() }
    }

    pub fn maps_dir(&self) -> PathBuf {
        self.root.join("maps")
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.maps_dir().join(name)
    }

    pub fn cgroups_dir(&self) -> PathBuf {
        self.root.join("cgroups")
    }

    pub fn cgroup_dir(&self, cgroup_id: u64) -> PathBuf {
        self.cgroups_dir().join(cgroup_id.to_string())
    }

    pub fn netns_root(&self) -> PathBuf {
        self.root.join("netns")
    }

    pub fn netns_dir(&self, cookie: u64) -> PathBuf {
        self.netns_root().join(cookie.to_string())
    }

    pub fn sk_lookup_link(&self, cookie: u64) -> PathBuf {
        self.netns_dir(cookie).join("sk_lookup")
    }

    pub fn programs_dir(&self) -> PathBuf {
        self.root.join("programs")
    }

    pub fn sk_msg_program(&self) -> PathBuf {
        self.programs_dir().join("redirect_sk_msg")
    }

    pub fn is_installed(&self) -> bool {
        self.map(redirect_common::MAP_PODS).exists()
    }

    /// Every pinned link (files two levels under cgroups/ and netns/).
    pub fn all_links(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for top in [self.cgroups_dir(), self.netns_root()] {
            for dir in read_dir(&top) {
                out.extend(read_dir(&dir));
            }
        }
        out
    }

    /// Ids of the cgroups with links under this install.
    pub fn attached_cgroups(&self) -> Vec<u64> {
        read_dir(&self.cgroups_dir())
            .iter()
            .filter_map(|p| p.file_name()?.to_str()?.parse().ok())
            .collect()
    }
}

pub fn read_dir(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    v.sort();
    v
}
