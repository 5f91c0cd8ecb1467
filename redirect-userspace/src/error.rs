//! Library errors: each says what failed, on what, and what to do.
use std::{io, path::PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid {field} value '{value}': {reason}")]
    InvalidFlag {
        field: String,
        value: String,
        reason: String,
    },
    /// A setting capture does not support yet (the flag table's `NotYet`).
    #[error("{flag}: not supported yet: {reason}")]
    NotSupported { flag: String, reason: String },
    #[error("missing privilege: {0}; run redirect as root (or with CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN and CAP_SYS_PTRACE)")]
    Privilege(String),
    #[error("kernel feature missing: {0}")]
    Kernel(String),
    /// A flag needs a kernel feature this kernel lacks (`features`).
    #[error("{flag}: not possible on this kernel: {reason}")]
    KernelLacks { flag: String, reason: String },
    /// `redirect trace` cannot read the install's events (another reader,
    /// an install without trace maps).
    #[error("{0}")]
    Trace(String),
    #[error("no cgroup2 filesystem is mounted (none in /proc/mounts); mount one: mount -t cgroup2 none /sys/fs/cgroup/unified")]
    NoCgroup2,
    #[error("'{path}' is not a cgroup2 directory: {reason}")]
    NotCgroup2 { path: PathBuf, reason: String },
    #[error("'{path}' is not a network namespace: {reason} (pass a path such as /var/run/netns/<name> or /proc/<pid>/ns/net)")]
    NotNetns { path: PathBuf, reason: String },
    #[error("pin directory '{path}' is not on a bpffs: {reason}")]
    NotBpffs { path: PathBuf, reason: String },
    #[error("refusing to capture '{0}': it is the host's network namespace (the kernel's initial one), not a pod's. Name the pod's with --netns, or run inside it as istio-init does")]
    HostNetns(PathBuf),
    #[error("network namespace '{0}' is not captured (see `redirect status`)")]
    NotCaptured(String),
    /// Not captured, and what is (`stats --netns`, `stats --zero`).
    #[error("network namespace '{netns}' is not captured; {captured}")]
    NotCapturedAmong { netns: String, captured: String },
    /// Another install (pin directory) has captured the netns.
    #[error("network namespace '{netns}' is already captured by {others}. One install per pod: release it there first (`redirect --pin-dir <that dir> detach --netns {netns}`), or pass --force to capture it here as well (both installs then act on its connections; for moving pods between installs)")]
    OwnedElsewhere { netns: String, others: String },
    #[error("nothing is installed under '{0}' (no pinned maps): run `redirect attach` first")]
    NotInstalled(PathBuf),
    /// An install's pinned maps do not fit this binary (see `mapsize`).
    #[error("{0}")]
    Layout(String),
    /// A map has no room for the entry (the kernel said E2BIG).
    #[error("map {map} is full ({max_entries} entries): {what}. Free entries (release pods) or size it for the node: `--map-size {knob}=<n>` on a new install (`redirect uninstall` first)")]
    MapFull {
        map: &'static str,
        max_entries: u32,
        knob: &'static str,
        what: String,
    },
    #[error("{what} '{path}'")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{what}")]
    Bpf {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl Error {
    pub fn io(what: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Error {
        Error::Io {
            what,
            path: path.into(),
            source,
        }
    }

    pub fn bpf(
        what: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Error {
        Error::Bpf {
            what: what.into(),
            source: Box::new(source),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
