//! Host facts and privileged primitives: privileges, cgroup2 and bpffs
//! mounts, BTF, network namespaces (cookie, inode, addresses).

use std::{
    ffi::CString,
    fs::File,
    net::IpAddr,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use crate::error::{Error, Result};

const NSFS_MAGIC: i64 = 0x6e73_6673;
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
/// `libc::Ioctl`: the request type differs between glibc and musl.
const NS_GET_NSTYPE: libc::Ioctl = 0xb703;
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf";

fn statfs_type(path: &Path) -> std::io::Result<i64> {
    let c = CString::new(path.as_os_str().as_encoded_bytes()).map_err(std::io::Error::other)?;
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st.f_type as i64)
}

/// Effective capabilities needed to load, attach and pin, and to take a
/// proxy's listener from another process.
pub fn check_privileges() -> Result<()> {
    let status = std::fs::read_to_string("/proc/self/status")
        .map_err(|e| Error::io("reading", "/proc/self/status", e))?;
    let caps = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    let need = [(21, "CAP_SYS_ADMIN"), (12, "CAP_NET_ADMIN")];
    let missing: Vec<_> = need
        .iter()
        .filter(|(b, _)| caps & (1 << b) == 0)
        .map(|(_, n)| *n)
        .collect();
    let bpf_ok = caps & (1 << 39) != 0 || caps & (1 << 21) != 0;
    if !missing.is_empty() || !bpf_ok {
        let mut missing = missing;
        if !bpf_ok {
            missing.push("CAP_BPF");
        }
        let m = missing.join(", ");
        return Err(Error::Privilege(format!("effective capabilities lack {m}")));
    }
    Ok(())
}

pub fn check_btf() -> Result<()> {
    if Path::new("/sys/kernel/btf/vmlinux").exists() {
        Ok(())
    } else {
        Err(Error::Kernel(
            "/sys/kernel/btf/vmlinux is missing: the kernel needs CONFIG_DEBUG_INFO_BTF=y (kernel 5.10 or later)".into(),
        ))
    }
}

/// The cgroup2 mount point, read from /proc/mounts (hybrid layouts put it
/// at /sys/fs/cgroup/unified, unified ones at /sys/fs/cgroup).
pub fn cgroup2_mount() -> Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts")
        .map_err(|e| Error::io("reading", "/proc/mounts", e))?;
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, dir, fs) = (f.next()?, f.next()?, f.next()?);
            (fs == "cgroup2").then(|| PathBuf::from(dir.replace("\\040", " ")))
        })
        .next()
        .ok_or(Error::NoCgroup2)
}

/// Open a cgroup2 directory, checking it is one.
pub fn open_cgroup(path: &Path) -> Result<File> {
    match statfs_type(path) {
        Ok(CGROUP2_SUPER_MAGIC) => {}
        Ok(_) => {
            return Err(Error::NotCgroup2 {
                path: path.into(),
                reason: format!(
                    "it is not on the cgroup2 filesystem (cgroup2 is mounted at {})",
                    cgroup2_mount()
                        .map(|p| p.display().to_string())
                        .unwrap_or_else(|_| "nowhere".into())
                ),
            })
        }
        Err(e) => {
            return Err(Error::NotCgroup2 {
                path: path.into(),
                reason: e.to_string(),
            })
        }
    }
    File::open(path).map_err(|e| Error::io("opening cgroup", path, e))
}

/// Make sure `pin_dir` can hold pins: mount bpffs at /sys/fs/bpf when the
/// pin dir lives there and it is not mounted yet; create the directory.
pub fn ensure_bpffs(pin_dir: &Path) -> Result<()> {
    let bpffs = Path::new(DEFAULT_BPFFS);
    if pin_dir.starts_with(bpffs) && statfs_type(bpffs).ok() != Some(BPF_FS_MAGIC) {
        std::fs::create_dir_all(bpffs).map_err(|e| Error::io("creating", bpffs, e))?;
        let (src, dst, ty, data) = (
            c"bpf",
            CString::new(DEFAULT_BPFFS).unwrap(),
            c"bpf",
            c"mode=0700",
        );
        if unsafe {
            libc::mount(
                src.as_ptr(),
                dst.as_ptr(),
                ty.as_ptr(),
                0,
                data.as_ptr().cast(),
            )
        } != 0
        {
            return Err(Error::NotBpffs {
                path: pin_dir.into(),
                reason: format!(
                    "mounting bpffs at {DEFAULT_BPFFS} failed: {}",
                    std::io::Error::last_os_error()
                ),
            });
        }
    }
    let mut probe = pin_dir.to_path_buf();
    while !probe.exists() {
        if !probe.pop() {
            break;
        }
    }
    match statfs_type(&probe) {
        Ok(BPF_FS_MAGIC) => {}
        _ => {
            return Err(Error::NotBpffs {
                path: pin_dir.into(),
                reason: format!("'{}' is not on a bpf filesystem; mount one (mount -t bpf bpf <dir>) or use a pin dir under {DEFAULT_BPFFS}", probe.display()),
            })
        }
    }
    create_private_dir(pin_dir)
}

/// The mount points of bpf filesystems, from /proc/mounts.
pub fn bpffs_mounts() -> Vec<PathBuf> {
    std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, dir, fs) = (f.next()?, f.next()?, f.next()?);
            (fs == "bpf").then(|| PathBuf::from(dir.replace("\\040", " ")))
        })
        .collect()
}

/// An existing pin directory must be on a bpf filesystem: anything else
/// is not an install, and nothing there may be touched.
pub fn check_on_bpffs(pin_dir: &Path) -> Result<()> {
    match statfs_type(pin_dir) {
        Ok(BPF_FS_MAGIC) => Ok(()),
        r => {
            let why = match r {
                Ok(_) => "it is on another filesystem".to_string(),
                Err(e) => e.to_string(),
            };
            let mounts = bpffs_mounts();
            let mounted = if mounts.is_empty() {
                "no bpf filesystem is mounted".to_string()
            } else {
                format!(
                    "bpffs is mounted at {}",
                    mounts
                        .iter()
                        .map(|m| m.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            };
            Err(Error::NotBpffs {
                path: pin_dir.into(),
                reason: format!(
                    "{why}, so it holds no install and nothing there was touched ({mounted}). \
                     Pass the install's --pin-dir (default {}), or mount bpffs there first: mount -t bpf bpf <dir>",
                    crate::pins::DEFAULT_PIN_DIR
                ),
            })
        }
    }
}

/// Pids of the processes whose network namespace has this inode.
pub fn pids_in_netns(inode: u64) -> Vec<u32> {
    crate::pins::read_dir(Path::new("/proc"))
        .iter()
        .filter_map(|p| p.file_name()?.to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::metadata(format!("/proc/{pid}/ns/net"))
                .map(|m| m.ino() == inode)
                .unwrap_or(false)
        })
        .collect()
}

/// mkdir -p with mode 0700 (pins are root-only).
pub fn create_private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| Error::io("creating directory", dir, e))
}

/// An open network namespace.
pub struct Netns {
    pub path: PathBuf,
    pub file: File,
    pub inode: u64,
}

impl Netns {
    /// Open `path` and check it is a network namespace.
    pub fn open(path: &Path) -> Result<Netns> {
        let not = |reason: String| Error::NotNetns {
            path: path.into(),
            reason,
        };
        let file = File::open(path).map_err(|e| not(e.to_string()))?;
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) } != 0
            || st.f_type as i64 != NSFS_MAGIC
        {
            return Err(not("not a namespace file (nsfs)".into()));
        }
        let ty = unsafe { libc::ioctl(file.as_raw_fd(), NS_GET_NSTYPE) };
        if ty != libc::CLONE_NEWNET {
            return Err(not("a namespace, but not a network namespace".into()));
        }
        let inode = file.metadata().map_err(|e| not(e.to_string()))?.ino();
        Ok(Netns {
            path: path.into(),
            file,
            inode,
        })
    }

    /// Is this the host's (the kernel's initial) network namespace? Known
    /// for sure where the kernel gives the initial netns its fixed inode
    /// (`PROC_NET_INIT_INO`), or where kthreadd (PID 2 of the initial pid
    /// namespace, always in the initial netns) is visible.
    pub fn is_host(&self) -> bool {
        const PROC_NET_INIT_INO: u64 = 0xEFFF_FFF9;
        if self.inode == PROC_NET_INIT_INO {
            return true;
        }
        let kthreadd = std::fs::read_to_string("/proc/2/comm")
            .is_ok_and(|c| c.trim() == "kthreadd")
            && std::fs::read_to_string("/proc/2/status").is_ok_and(|s| {
                s.lines()
                    .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["PPid:", "0"])
            });
        kthreadd && std::fs::metadata("/proc/2/ns/net").is_ok_and(|m| m.ino() == self.inode)
    }

    /// Run `f` on a thread that has entered this netns.
    pub fn run<R: Send>(&self, f: impl FnOnce() -> std::io::Result<R> + Send) -> Result<R> {
        let fd = self.file.as_fd();
        std::thread::scope(|s| {
            s.spawn(move || {
                setns(fd)?;
                f()
            })
            .join()
            .expect("netns worker thread panicked")
        })
        .map_err(|e| Error::io("working inside network namespace", &self.path, e))
    }

    /// The netns cookie the kernel programs key pods by (see
    /// `netns_cookie`).
    pub fn cookie(&self) -> Result<u64> {
        match self.run(crate::netns_cookie::from_socket_option)? {
            Some(c) => Ok(c),
            None => crate::netns_cookie::reported(self.file.as_fd()),
        }
    }

    /// The addresses configured inside the netns, loopback ones excluded.
    pub fn addresses(&self) -> Result<Vec<IpAddr>> {
        self.run(|| {
            Ok(local_addresses()?
                .into_iter()
                .filter(|a| !a.is_loopback())
                .collect())
        })
    }
}

fn setns(fd: BorrowedFd<'_>) -> std::io::Result<()> {
    if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Addresses of the current thread's netns (getifaddrs).
pub fn local_addresses() -> std::io::Result<Vec<IpAddr>> {
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    if unsafe { libc::getifaddrs(&mut ifap) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cur = ifap;
    while !cur.is_null() {
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() {
            if let Some(a) = unsafe { sockaddr_ip(ifa.ifa_addr) } {
                if !out.contains(&a) {
                    out.push(a);
                }
            }
        }
        cur = ifa.ifa_next;
    }
    unsafe { libc::freeifaddrs(ifap) };
    Ok(out)
}

/// # Safety
/// `sa` must point to a valid sockaddr.
pub unsafe fn sockaddr_ip(sa: *const libc::sockaddr) -> Option<IpAddr> {
    match (*sa).sa_family as i32 {
        libc::AF_INET => {
            let s = &*(sa as *const libc::sockaddr_in);
            Some(IpAddr::V4(u32::from_be(s.sin_addr.s_addr).into()))
        }
        libc::AF_INET6 => {
            let s = &*(sa as *const libc::sockaddr_in6);
            Some(IpAddr::V6(s.sin6_addr.s6_addr.into()))
        }
        _ => None,
    }
}

/// Find a name for a netns inode: /run/netns/* first, then a process in it.
pub fn netns_name(inode: u64) -> Option<String> {
    for dir in ["/run/netns", "/var/run/netns"] {
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.flatten() {
                if std::fs::metadata(e.path())
                    .map(|m| m.ino() == inode)
                    .unwrap_or(false)
                {
                    return Some(e.path().display().to_string());
                }
            }
        }
    }
    let rd = std::fs::read_dir("/proc").ok()?;
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let p = format!("/proc/{pid}/ns/net");
        if std::fs::metadata(&p)
            .map(|m| m.ino() == inode)
            .unwrap_or(false)
        {
            return Some(p);
        }
    }
    None
}
