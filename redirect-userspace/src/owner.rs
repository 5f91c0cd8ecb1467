//! One owner per pod. A network namespace is captured by one install (one
//! pin directory) at a time: two installs would both act on its
//! connections (each rewriting, each steering inbound traffic, each
//! counting) under configs that may differ.
//!
//! The kernel holds the marker: every captured pod has its install's
//! `redirect_sk_lookup` program attached to its netns (by a link pinned at
//! `<pin-dir>/netns/<cookie>/sk_lookup`). Before a pod is registered, the
//! programs attached to its netns are queried; one of ours that is not
//! this install's link means another install owns the pod, whatever its
//! pin directory and even if its links are not pinned at all. To name it,
//! the pin layout is looked for under every bpffs mount.

use std::{
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use crate::{
    error::{Error, Result},
    pins::Pins,
    sys::Netns,
    upgrade,
};

/// Another install's program on a pod's netns.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct OtherInstall {
    /// Its `redirect_sk_lookup` program attached to the netns.
    pub prog_id: u32,
    /// Its pin directory, when found under a bpffs mount.
    pub pin_dir: Option<PathBuf>,
}

impl std::fmt::Display for OtherInstall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.pin_dir {
            Some(d) => write!(
                f,
                "the install at {} (its sk_lookup program id {})",
                d.display(),
                self.prog_id
            ),
            None => write!(
                f,
                "an install whose pins are under no bpffs mount (its sk_lookup program id {}; `bpftool net show` lists it)",
                self.prog_id
            ),
        }
    }
}

/// The kernel's name of our sk_lookup program (names keep 15 bytes).
fn is_ours(name: &str) -> bool {
    let full = crate::attach::SK_LOOKUP_PROGRAM;
    !name.is_empty() && full.starts_with(name) && name.len() >= full.len().min(15)
}

/// Installs other than `pins` that have captured this netns (cookie).
pub fn other_installs(netns: &Netns, cookie: u64, pins: &Pins) -> Result<Vec<OtherInstall>> {
    let ioerr = |what: &'static str| move |e| Error::io(what, netns.path.clone(), e);
    let attached = upgrade::prog_query(netns.file.as_fd(), crate::sklookup::BPF_SK_LOOKUP)
        .map_err(ioerr("listing the sk_lookup programs of network namespace"))?;
    let own = link_prog(&pins.sk_lookup_link(cookie));
    let mut others = Vec::new();
    for id in attached {
        if Some(id) == own {
            continue;
        }
        let Ok(fd) = upgrade::prog_by_id(id) else {
            continue;
        };
        if upgrade::prog_name(fd.as_fd()).is_ok_and(|n| is_ours(&n)) {
            others.push(id);
        }
    }
    if others.is_empty() {
        return Ok(Vec::new());
    }
    let own_root = std::fs::canonicalize(&pins.root).unwrap_or(pins.root.clone());
    let mut found: Vec<(u32, PathBuf)> = Vec::new();
    for mount in crate::sys::bpffs_mounts() {
        for root in install_roots(&mount, 3) {
            if std::fs::canonicalize(&root).unwrap_or(root.clone()) == own_root {
                continue;
            }
            if let Some(id) = link_prog(&Pins::new(&root).sk_lookup_link(cookie)) {
                if others.contains(&id) && !found.iter().any(|(i, _)| *i == id) {
                    found.push((id, root));
                }
            }
        }
    }
    Ok(others
        .into_iter()
        .map(|prog_id| OtherInstall {
            prog_id,
            pin_dir: found
                .iter()
                .find(|(i, _)| *i == prog_id)
                .map(|(_, d)| d.clone()),
        })
        .collect())
}

/// `other_installs`, as a refusal unless `force`: Err naming them, else
/// the ones forced over (empty when the pod has no other owner).
pub fn refuse_if_owned(
    netns: &Netns,
    cookie: u64,
    pins: &Pins,
    force: bool,
) -> Result<Vec<OtherInstall>> {
    let others = other_installs(netns, cookie, pins)?;
    if !others.is_empty() && !force {
        return Err(Error::OwnedElsewhere {
            netns: netns.path.display().to_string(),
            others: others
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; "),
        });
    }
    Ok(others)
}

/// The program id of the link pinned at `path`.
fn link_prog(path: &Path) -> Option<u32> {
    if crate::pins::pin_kind(path) != Some(crate::pins::PinKind::Link) {
        return None;
    }
    let link = upgrade::obj_get(path).ok()?;
    upgrade::link_prog_id(link.as_fd()).ok()
}

/// Directories under `dir` (itself included, `depth` levels down) that
/// hold an install (`maps/REDIRECT_PODS`); an install's own directories
/// are not searched further.
fn install_roots(dir: &Path, depth: usize) -> Vec<PathBuf> {
    if Pins::new(dir).is_installed() {
        return vec![dir.to_path_buf()];
    }
    if depth == 0 {
        return Vec::new();
    }
    crate::pins::read_dir(dir)
        .into_iter()
        .filter(|p| p.symlink_metadata().is_ok_and(|m| m.is_dir()))
        .flat_map(|p| install_roots(&p, depth - 1))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_program_name_as_the_kernel_keeps_it() {
        assert!(is_ours("redirect_sk_loo"));
        assert!(is_ours("redirect_sk_lookup"));
        assert!(!is_ours("redirect_sk"));
        assert!(!is_ours(""));
        assert!(!is_ours("cilium_sk_lookup"));
    }
}
