//! One module per subcommand.
pub mod attach;
pub mod daemon;
pub mod detach;
pub mod stats;
pub mod status;
pub mod uninstall;
pub mod validate;

use std::path::PathBuf;

/// The pod a command works on: its netns, and the cgroup2 directory the
/// programs are (or get) attached to.
#[derive(clap::Args)]
pub struct PodArgs {
    /// The pod's network namespace (/var/run/netns/<name>, /proc/<pid>/ns/net).
    #[arg(long)]
    pub netns: PathBuf,
    /// cgroup2 directory the programs attach to (default: the cgroup2 root,
    /// read from /proc/mounts). One attachment serves every pod under it.
    #[arg(long)]
    pub cgroup: Option<PathBuf>,
}

impl PodArgs {
    /// `--cgroup`, or the cgroup2 root; checked to be a cgroup2 directory.
    pub fn cgroup(&self) -> redirect_userspace::error::Result<PathBuf> {
        let cg = match &self.cgroup {
            Some(c) => c.clone(),
            None => redirect_userspace::sys::cgroup2_mount()?,
        };
        redirect_userspace::sys::open_cgroup(&cg)?;
        Ok(cg)
    }
}
