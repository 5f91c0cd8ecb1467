//! Starting a helper process where the product needs it: in a cgroup, a
//! network namespace and as a uid/gid (`validate` runs its in-pod half
//! this way, the acceleration probe its sandboxed half in a throwaway
//! child cgroup), and finding the binaries shipped next to this one.

use std::{
    fs::File,
    io,
    os::fd::AsRawFd,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use crate::sys;

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A name unique to this process and call: `<prefix><pid>x<n>` (short
/// enough for interface names when prefix is ≤ 4 chars).
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}x{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::SeqCst)
    )
}

/// A child cgroup of the cgroup2 root. On drop its processes are killed
/// and the directory removed.
pub struct CgroupGuard {
    pub path: PathBuf,
}

impl CgroupGuard {
    pub fn new(name: &str) -> io::Result<CgroupGuard> {
        let root = sys::cgroup2_mount().map_err(io::Error::other)?;
        let path = root.join(name);
        std::fs::create_dir(&path)?;
        Ok(CgroupGuard { path })
    }

    pub fn pids(&self) -> Vec<i32> {
        std::fs::read_to_string(self.path.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }
}

impl Drop for CgroupGuard {
    fn drop(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let pids = self.pids();
            for pid in &pids {
                unsafe { libc::kill(*pid, libc::SIGKILL) };
            }
            if std::fs::remove_dir(&self.path).is_ok() || Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Where and as whom to start a process.
#[derive(Clone, Debug, Default)]
pub struct Placement {
    pub netns: Option<PathBuf>,
    pub cgroup: Option<PathBuf>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

/// Prepare `cmd` to start inside the placement: it joins the cgroup
/// first, then the netns, then drops to the uid/gid (supplementary groups
/// cleared).
pub fn place(cmd: &mut Command, p: &Placement) -> io::Result<()> {
    let procs = match &p.cgroup {
        Some(cg) => Some(
            std::fs::OpenOptions::new()
                .write(true)
                .open(cg.join("cgroup.procs"))?,
        ),
        None => None,
    };
    let ns = match &p.netns {
        Some(n) => Some(File::open(n)?),
        None => None,
    };
    let (uid, gid) = (p.uid, p.gid);
    unsafe {
        cmd.pre_exec(move || {
            if let Some(f) = &procs {
                if libc::write(f.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                    return Err(io::Error::last_os_error());
                }
            }
            if let Some(f) = &ns {
                if libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            if let Some(g) = gid.or(uid) {
                if libc::setgroups(0, std::ptr::null()) != 0 || libc::setgid(g) != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            if let Some(u) = uid {
                if libc::setuid(u) != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    Ok(())
}

/// A binary next to the running one (target/<profile>/), or in
/// `$REDIRECT_BIN_DIR`.
pub fn sibling_binary(name: &str) -> PathBuf {
    if let Ok(dir) = std::env::var("REDIRECT_BIN_DIR") {
        return Path::new(&dir).join(name);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir.join(name)
}
