//! Where an installation keeps its state on bpffs. One directory per
//! install:
//!
//! ```text
//! <pin-dir>/maps/REDIRECT_*            the shared maps
//! <pin-dir>/maps/AYA_LOGS              the kernel debug log's ring buffer
//! <pin-dir>/cgroups/<cgroup-id>/<prog> cgroup links (connect, sockops, ...)
//! <pin-dir>/netns/<netns-cookie>/sk_lookup   per-pod inbound link
//! <pin-dir>/netns/<netns-cookie>/vm_ingress_<ifindex>, vm_egress_<ifindex>
//!                                       tc links on the pod's `-k` interfaces
//! <pin-dir>/programs/redirect_sk_msg   acceleration verdict (attached to
//!                                       the REDIRECT_SOCKS map)
//! ```
//!
//! The pin directory is the only thing `attach`, `detach` and `uninstall`
//! touch, and they only remove what an install makes: a known name of the
//! layout above holding a BPF object of the right kind ([`pin_kind`]).
//! Anything else found there is left in place and named.

use std::{
    os::fd::AsRawFd,
    os::unix::fs::FileTypeExt,
    path::{Path, PathBuf},
};

pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/redirect";

/// Programs attached to each cgroup (the OUTPUT side and the helpers),
/// one link pin each under `cgroups/<cgroup-id>/`.
pub const CGROUP_PROGRAMS: [&str; 11] = [
    "redirect_connect4",
    "redirect_connect6",
    "redirect_getpeername4",
    "redirect_getpeername6",
    "redirect_getsockopt",
    "redirect_sockops",
    "redirect_sock_release",
    "redirect_sendmsg4",
    "redirect_sendmsg6",
    "redirect_recvmsg4",
    "redirect_recvmsg6",
];

/// Attached to each cgroup besides [`CGROUP_PROGRAMS`] where the kernel
/// lacks `bpf_get_netns_cookie` in getsockopt, sockops and sk_msg programs
/// (before 5.15): it stores the netns cookie on the pods' sockets, for the
/// `_stored` builds of those three (`kernel::NETNS_COOKIE_IN_HOOKS`).
pub const SOCK_CREATE_PROGRAM: &str = "redirect_sock_create";

/// Every link pin name a `cgroups/<cgroup-id>/` directory may hold, on any
/// kernel: what detach and uninstall remove.
pub fn cgroup_link_names() -> impl Iterator<Item = &'static str> {
    CGROUP_PROGRAMS.into_iter().chain([SOCK_CREATE_PROGRAM])
}

/// Maps userspace makes and pins next to the kernel object's (no program
/// uses them): the acceleration probe's result, the `stats --zero`
/// baselines, the agent's pod records, the pods' recorded cgroups (and
/// the kernel builds taken, `kernel::KERNEL_MAP`).
pub const MAP_ACCEL_PROBE: &str = "REDIRECT_ACCEL_PROBE";
pub const MAP_STATS_BASELINE: &str = "REDIRECT_STATS_BASELINE";
pub const MAP_AGENT_PODS: &str = "REDIRECT_AGENT_PODS";
pub const MAP_POD_CGROUPS: &str = "REDIRECT_POD_CGROUPS";

/// Every name an install pins under `maps/`.
pub fn known_maps() -> impl Iterator<Item = &'static str> {
    redirect_common::ALL_MAPS.into_iter().chain([
        redirect_common::MAP_ACCEL_SK,
        redirect_common::MAP_COUNTERS_LOST,
        redirect_common::MAP_SK_NETNS,
        redirect_common::trace::MAP_TRACE,
        redirect_common::trace::MAP_TRACE_PODS,
        redirect_common::trace::MAP_TRACE_EVENTS,
        crate::kernlog::MAP_SWITCH,
        crate::kernlog::MAP_RING,
        MAP_ACCEL_PROBE,
        crate::kernel::KERNEL_MAP,
        MAP_STATS_BASELINE,
        MAP_AGENT_PODS,
        MAP_POD_CGROUPS,
    ])
}

/// The kinds of BPF objects an install pins.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PinKind {
    Map,
    Program,
    Link,
}

/// What is pinned at `path`: None when it is not a BPF object pinned there
/// (missing, a directory, a symlink, a regular file on another
/// filesystem...). Symlinks are not followed.
pub fn pin_kind(path: &Path) -> Option<PinKind> {
    let ft = std::fs::symlink_metadata(path).ok()?.file_type();
    if !ft.is_file() || ft.is_symlink() || ft.is_fifo() || ft.is_socket() {
        return None;
    }
    let fd = crate::upgrade::obj_get(path).ok()?;
    let target = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).ok()?;
    match target.to_str()? {
        "anon_inode:bpf-map" => Some(PinKind::Map),
        "anon_inode:bpf-prog" => Some(PinKind::Program),
        "anon_inode:bpf-link" => Some(PinKind::Link),
        _ => None,
    }
}

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

    /// The tc link of a `-k` interface (ingress or egress side).
    pub fn vm_link(&self, cookie: u64, ingress: bool, ifindex: u32) -> PathBuf {
        let dir = if ingress { "vm_ingress" } else { "vm_egress" };
        self.netns_dir(cookie).join(format!("{dir}_{ifindex}"))
    }

    /// The link pins of the layout in a pod's directory that exist (not
    /// checked to be links): `sk_lookup` and the `-k` interfaces' tc links.
    pub fn netns_links(&self, cookie: u64) -> Vec<PathBuf> {
        netns_links_in(&self.netns_dir(cookie))
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

    /// Every link pin path of the layout that exists (not checked to be a
    /// link): `cgroups/<id>/<cgroup program>`, `netns/<cookie>/sk_lookup`
    /// and `netns/<cookie>/vm_{ingress,egress}_<ifindex>`.
    pub fn all_links(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for dir in numbered(&self.cgroups_dir()) {
            out.extend(
                cgroup_link_names()
                    .map(|p| dir.join(p))
                    .filter(|p| p.symlink_metadata().is_ok()),
            );
        }
        for dir in numbered(&self.netns_root()) {
            out.extend(netns_links_in(&dir));
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

/// The link pins a pod directory may hold, by name.
fn netns_links_in(dir: &Path) -> Vec<PathBuf> {
    read_dir(dir)
        .into_iter()
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            name == "sk_lookup" || parse_vm_link(name).is_some()
        })
        .collect()
}

/// (ingress?, ifindex) of a `-k` interface's link pin name
/// ([`Pins::vm_link`]).
pub fn parse_vm_link(name: &str) -> Option<(bool, u32)> {
    let (dir, ifindex) = name.rsplit_once('_')?;
    let ingress = match dir {
        "vm_ingress" => true,
        "vm_egress" => false,
        _ => return None,
    };
    if ifindex.is_empty() || !ifindex.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((ingress, ifindex.parse().ok()?))
}

/// Subdirectories of `dir` named by a number (cgroup ids, netns cookies).
pub fn numbered(dir: &Path) -> Vec<PathBuf> {
    read_dir(dir)
        .into_iter()
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
                && p.symlink_metadata().is_ok_and(|m| m.is_dir())
        })
        .collect()
}

pub fn read_dir(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_maps_are_the_objects_and_the_userspace_ones_once_each() {
        let known: Vec<&str> = known_maps().collect();
        let mut sorted = known.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), known.len(), "a name twice: {known:?}");
        for m in redirect_common::ALL_MAPS.iter().chain(&[
            redirect_common::MAP_ACCEL_SK,
            redirect_common::MAP_COUNTERS_LOST,
            redirect_common::MAP_SK_NETNS,
            redirect_common::trace::MAP_TRACE,
            redirect_common::trace::MAP_TRACE_PODS,
            redirect_common::trace::MAP_TRACE_EVENTS,
            crate::kernlog::MAP_SWITCH,
            crate::kernlog::MAP_RING,
            crate::probe::PROBE_MAP,
            crate::kernel::KERNEL_MAP,
            crate::stats::baseline::MAP_STATS_BASELINE,
            crate::agent::records::MAP_AGENT_PODS,
            MAP_POD_CGROUPS,
        ]) {
            assert!(known.contains(m), "{m} is not a known pin");
        }
    }

    #[test]
    fn only_numbered_directories_hold_links() {
        let dir = std::env::temp_dir().join(format!("redirect-pins-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for d in ["cgroups/123", "cgroups/abc", "netns/42", "netns/4x2"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        std::fs::write(dir.join("cgroups/777"), "a file").unwrap();
        for f in [
            "cgroups/123/redirect_connect4",
            "cgroups/123/other",
            "cgroups/abc/redirect_connect4",
            "netns/42/sk_lookup",
            "netns/42/vm_ingress_7",
            "netns/42/vm_egress_7",
            "netns/42/vm_egress_x",
            "netns/42/other",
            "netns/4x2/sk_lookup",
        ] {
            std::fs::write(dir.join(f), "").unwrap();
        }
        let pins = Pins::new(&dir);
        assert_eq!(
            pins.all_links(),
            vec![
                dir.join("cgroups/123/redirect_connect4"),
                dir.join("netns/42/sk_lookup"),
                dir.join("netns/42/vm_egress_7"),
                dir.join("netns/42/vm_ingress_7"),
            ]
        );
        assert_eq!(pins.netns_links(42), pins.all_links()[1..].to_vec());
        assert_eq!(parse_vm_link("vm_ingress_7"), Some((true, 7)));
        assert_eq!(parse_vm_link("vm_egress_+7"), None);
        // Not on bpffs: nothing there is a pin.
        assert_eq!(pin_kind(&dir.join("netns/42/sk_lookup")), None);
        assert_eq!(pin_kind(&dir.join("cgroups")), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
