//! `redirect istio-iptables`: Istio's init container, verbatim. The args
//! after the word `istio-iptables` in `istio-init`'s (or
//! `istio-validation`'s) container spec are passed unchanged, and the
//! environment is read as istio-iptables reads it (a flag on the command
//! line wins; see the flag table). The same binary invoked as
//! `istio-iptables` (a symlink) behaves the same. Without `--netns` (or
//! `--network-namespace`) the pod is this process's network namespace, as
//! for istio-init, which runs inside the pod.
use std::path::{Path, PathBuf};

use anyhow::Result;
use redirect_userspace::config::CaptureFlags;

#[derive(clap::Args)]
pub struct Args {
    /// The pod's network namespace (/var/run/netns/<name>,
    /// /proc/<pid>/ns/net). Default: this process's, which must not be
    /// the host's. `--network-namespace` is the same.
    #[arg(long)]
    pub netns: Option<PathBuf>,
    /// cgroup2 directory the programs attach to (default: the cgroup2
    /// root, read from /proc/mounts).
    #[arg(long)]
    pub cgroup: Option<PathBuf>,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
    /// Map sizes of a new install, as for `redirect attach`.
    #[arg(long = "map-size", value_name = "MAP=N", value_delimiter = ',')]
    pub map_size: Vec<String>,
    #[command(flatten)]
    pub flags: CaptureFlags,
}

pub fn run(pin_dir: &Path, mut a: Args) -> Result<()> {
    a.flags
        .fill_from_env(&|k| std::env::var_os(k).map(|v| v.to_string_lossy().into_owned()));
    super::attach::execute(
        pin_dir,
        super::attach::Invocation {
            netns: a.netns,
            cgroup: a.cgroup,
            json: a.json,
            map_size: a.map_size,
            force: false,
            debug_log: false,
            flags: a.flags,
        },
    )
}
