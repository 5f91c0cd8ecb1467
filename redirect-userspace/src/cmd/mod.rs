//! One module per subcommand.
pub mod attach;
pub mod daemon;
pub mod detach;
pub mod explain;
pub mod istio_iptables;
pub mod stats;
pub mod status;
pub mod trace;
pub mod uninstall;
pub mod validate;

use std::path::{Path, PathBuf};

/// The pod a command works on: its netns, and the cgroup2 directory the
/// programs are (or get) attached to.
#[derive(clap::Args)]
pub struct PodArgs {
    /// The pod's network namespace (/var/run/netns/<name>, /proc/<pid>/ns/net).
    #[arg(long)]
    pub netns: PathBuf,
    /// cgroup2 directory the programs attach to (default: the cgroup the
    /// pod was attached under, as recorded in the install; for a pod not
    /// captured yet, the cgroup2 root, read from /proc/mounts). One
    /// attachment serves every pod under it.
    #[arg(long)]
    pub cgroup: Option<PathBuf>,
}

/// Where a command's cgroup came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CgroupFrom {
    /// `--cgroup`.
    Flag,
    /// The pod's cgroup recorded in the install.
    Recorded,
    /// The cgroup2 root (no `--cgroup`, nothing recorded).
    Root,
}

/// The pod's cgroup: `--cgroup`; else the one it was attached under (no
/// silent widening to the root on a re-attach, a validate or a detach);
/// else the cgroup2 root. Checked to be a cgroup2 directory. Also
/// returns the pod's recorded cgroup, if any.
pub fn pod_cgroup(
    pin_dir: &Path,
    given: Option<&Path>,
    netns: &redirect_userspace::sys::Netns,
) -> anyhow::Result<(
    PathBuf,
    CgroupFrom,
    Option<redirect_userspace::cgroups::Recorded>,
)> {
    let pins = redirect_userspace::pins::Pins::new(pin_dir);
    let recorded = if pins.is_installed() {
        redirect_userspace::cgroups::recorded(&pins, netns.cookie()?)?
    } else {
        None
    };
    if let Some(c) = given {
        return Ok((cgroup_or_root(Some(c))?, CgroupFrom::Flag, recorded));
    }
    if let Some(r) = &recorded {
        if !r.exists() {
            anyhow::bail!(
                "{} was attached under cgroup {} (recorded in {}), which no longer exists (id {}): pass the cgroup to use with --cgroup",
                netns.path.display(),
                r.path.display(),
                pin_dir.display(),
                r.id
            );
        }
        redirect_userspace::sys::open_cgroup(&r.path)?;
        return Ok((r.path.clone(), CgroupFrom::Recorded, recorded));
    }
    Ok((cgroup_or_root(None)?, CgroupFrom::Root, None))
}

/// `cgroup`, or the cgroup2 root; checked to be a cgroup2 directory.
pub fn cgroup_or_root(cgroup: Option<&Path>) -> redirect_userspace::error::Result<PathBuf> {
    let cg = match cgroup {
        Some(c) => c.to_path_buf(),
        None => redirect_userspace::sys::cgroup2_mount()?,
    };
    redirect_userspace::sys::open_cgroup(&cg)?;
    Ok(cg)
}

/// How `explain` and `trace` find the node agent. They go through it when
/// it answers on its socket and serves the same install (`--pin-dir`), and
/// read the install themselves otherwise.
#[derive(clap::Args)]
pub struct AgentArgs {
    /// The node agent's socket (`redirect daemon --socket`).
    #[arg(
        long,
        env = "REDIRECT_SOCKET",
        default_value = "/run/redirect/agent.sock",
        value_name = "PATH"
    )]
    pub agent_socket: PathBuf,
    /// Read the install here even when an agent answers.
    #[arg(long)]
    pub no_agent: bool,
}

/// istio-iptables' exit code when validation fails (Istio's CNI repair
/// looks for it on the validation init container).
pub const VALIDATION_FAILED: u8 = 126;

/// An error that ends the process with a given exit code.
#[derive(Debug)]
pub struct Exit {
    pub code: u8,
    pub error: anyhow::Error,
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#}", self.error)
    }
}

impl std::error::Error for Exit {}
