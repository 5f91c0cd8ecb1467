//! A network namespace's cookie, the key every per-pod map entry has: what
//! the kernel programs get from `bpf_get_netns_cookie`.
//!
//! Userspace asks for it with `getsockopt(SO_NETNS_COOKIE)` on a socket
//! made inside the netns (Linux 5.14+). Where the kernel lacks that option
//! (5.10 answers `ENOPROTOOPT`), the kernel still tells: the program
//! `redirect_netns_cookie` (cgroup/sock_create) writes the cookie of the
//! netns a socket is created in into a one-entry array. It is loaded with
//! an array of its own, attached to a child cgroup of its own, and a
//! forked child moves into that cgroup, enters the netns and creates one
//! socket; then the array holds the answer. A few milliseconds, no install
//! needed, nothing left behind (a reporter killed midway leaves an empty
//! cgroup, removed by the next one).

use std::{
    ffi::CString,
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
    sync::OnceLock,
};

use aya_obj::{generated::bpf_insn, Object};

use crate::{
    error::{Error, Result},
    placement::{self, CgroupGuard},
    sklookup::{self, ProgKind},
};

/// `SOL_SOCKET` option (uapi/asm-generic/socket.h).
const SO_NETNS_COOKIE: libc::c_int = 71;
const PROGRAM: &str = "redirect_netns_cookie";
const REPORT_MAP: &str = "REDIRECT_NETNS_REPORT";
/// Stands for the report array in the relocated instructions; never a
/// real fd.
const REPORT_MARK: RawFd = i32::MAX - 2;
/// Name prefix of the reporting cgroups, `<prefix><pid>x<n>`.
const CGROUP_PREFIX: &str = "redirect-netns-cookie-";
// uapi/linux/bpf.h
const BPF_PROG_TYPE_CGROUP_SOCK: u32 = 9;
const BPF_CGROUP_INET_SOCK_CREATE: u32 = 2;

/// The cookie of the calling thread's netns by `SO_NETNS_COOKIE`; None
/// when the kernel does not have the option (before 5.14), or when the
/// fallbacks are forced (`kernel::FORCE_FALLBACKS_ENV`).
pub fn from_socket_option() -> io::Result<Option<u64>> {
    if crate::kernel::fallbacks_forced() {
        return Ok(None);
    }
    let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if s < 0 {
        return Err(io::Error::last_os_error());
    }
    let s = unsafe { OwnedFd::from_raw_fd(s) };
    let mut v: u64 = 0;
    let mut len = 8 as libc::socklen_t;
    if unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut v as *mut u64).cast(),
            &mut len,
        )
    } != 0
    {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENOPROTOOPT) {
            return Ok(None);
        }
        return Err(io::Error::other(format!(
            "getsockopt(SO_NETNS_COOKIE): {e}"
        )));
    }
    Ok(Some(v))
}

/// The program's instructions, relocated once, with [`REPORT_MARK`] where
/// the array's fd goes.
struct Template {
    insns: Vec<bpf_insn>,
    refs: Vec<usize>,
    license: CString,
    name: [u8; 16],
}

fn template() -> Result<&'static Template> {
    static T: OnceLock<std::result::Result<Template, String>> = OnceLock::new();
    T.get_or_init(|| {
        let what = |s: &str| format!("preparing the {PROGRAM} program: {s}");
        let mut obj = Object::parse(crate::attach::OBJECT)
            .map_err(|e| format!("{}: {e}", what("parsing the kernel object")))?;
        let r = sklookup::relocate(&mut obj, PROGRAM, |name, _| {
            Ok(if name == REPORT_MAP {
                REPORT_MARK
            } else {
                i32::MAX - 1
            })
        })
        .map_err(|e| format!("{e:#}"))?;
        let refs = sklookup::map_refs(&r.insns, REPORT_MARK);
        if refs.is_empty() {
            return Err(what(&format!("it does not use {REPORT_MAP}")));
        }
        Ok(Template {
            insns: r.insns,
            refs,
            license: r.license,
            name: r.name,
        })
    })
    .as_ref()
    .map_err(|e| Error::bpf("the netns cookie reporter", io::Error::other(e.to_string())))
}

/// The cookie of `netns` as the kernel reports it to `redirect_netns_cookie`
/// (see the module docs).
pub fn reported(netns: BorrowedFd<'_>) -> Result<u64> {
    let err = |what: &str, e: io::Error| {
        Error::Kernel(format!(
            "SO_NETNS_COOKIE (Linux 5.14+) is missing, and reading the netns cookie through a cgroup/sock_create program instead failed: {what}: {e}"
        ))
    };
    let t = template()?;
    let array = sklookup::map_create(crate::bpf::BPF_MAP_TYPE_ARRAY, 4, 8, 1, 0, b"netns_report")
        .map_err(|e| err("creating its array", e))?;
    let mut insns = t.insns.clone();
    for &i in &t.refs {
        insns[i].imm = array.as_raw_fd();
    }
    let kind = ProgKind {
        prog_type: BPF_PROG_TYPE_CGROUP_SOCK,
        attach_type: BPF_CGROUP_INET_SOCK_CREATE,
    };
    let prog = sklookup::load_logged(kind, &insns, &t.license, &t.name)
        .map_err(|e| err("loading it", e))?;
    remove_stale_cgroups();
    let cg = CgroupGuard::new(&placement::unique(CGROUP_PREFIX))
        .map_err(|e| err("creating its cgroup", e))?;
    let cg_dir = std::fs::File::open(&cg.path).map_err(|e| err("opening its cgroup", e))?;
    let _link = crate::bpf::link_create(prog.as_fd(), cg_dir.as_fd(), BPF_CGROUP_INET_SOCK_CREATE)
        .map_err(|e| err("attaching it", e))?;
    let procs = std::fs::OpenOptions::new()
        .write(true)
        .open(cg.path.join("cgroup.procs"))
        .map_err(|e| err("opening cgroup.procs", e))?;
    make_socket_in(procs.as_fd(), netns).map_err(|e| err("making a socket there", e))?;
    let mut cookie = 0u64;
    map_lookup(array.as_fd(), &0u32.to_ne_bytes(), &mut cookie)
        .map_err(|e| err("reading its array", e))?;
    if cookie == 0 {
        return Err(err(
            "reading its array",
            io::Error::other("the program reported nothing"),
        ));
    }
    Ok(cookie)
}

/// A forked child joins the cgroup whose `cgroup.procs` is `procs`, enters
/// `netns` and creates a socket, then exits. Between fork and exit it makes
/// system calls only (the parent may have other threads).
fn make_socket_in(procs: BorrowedFd<'_>, netns: BorrowedFd<'_>) -> io::Result<()> {
    let mut pipe = [0 as RawFd; 2];
    if unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let (rx, tx) = unsafe { (OwnedFd::from_raw_fd(pipe[0]), OwnedFd::from_raw_fd(pipe[1])) };
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        // The child: report [step, errno] on failure, nothing on success.
        unsafe {
            let step: i32 = if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                1
            } else if libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                2
            } else if libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) < 0 {
                3
            } else {
                0
            };
            if step != 0 {
                let errno = *libc::__errno_location();
                let msg = [step, errno];
                libc::write(tx.as_raw_fd(), msg.as_ptr().cast(), 8);
            }
            libc::_exit(step);
        }
    }
    drop(tx);
    let mut msg = [0i32; 2];
    let n = unsafe { libc::read(rx.as_raw_fd(), msg.as_mut_ptr().cast(), 8) };
    let mut status = 0;
    while unsafe { libc::waitpid(pid, &mut status, 0) } < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    if n == 8 {
        let what = match msg[0] {
            1 => "joining the cgroup",
            2 => "entering the netns",
            _ => "creating the socket",
        };
        return Err(io::Error::new(
            io::Error::from_raw_os_error(msg[1]).kind(),
            format!("{what}: {}", io::Error::from_raw_os_error(msg[1])),
        ));
    }
    if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
        return Err(io::Error::other(format!(
            "the child ended with wait status {status:#x}"
        )));
    }
    Ok(())
}

/// BPF_MAP_LOOKUP_ELEM of a u64 value.
fn map_lookup(map: BorrowedFd<'_>, key: &[u8], value: &mut u64) -> io::Result<()> {
    const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
    let mut attr = [0u64; 16];
    // { u32 map_fd; u64 key @8; u64 value @16; u64 flags @24 }
    attr[0] = map.as_raw_fd() as u32 as u64;
    attr[1] = key.as_ptr() as u64;
    attr[2] = value as *mut u64 as u64;
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_LOOKUP_ELEM,
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Reporting cgroups whose process is gone (killed midway): removed. Their
/// child exited at once and their link died with its process's fds, so
/// they are empty.
fn remove_stale_cgroups() {
    let Ok(root) = crate::sys::cgroup2_mount() else {
        return;
    };
    for dir in crate::pins::read_dir(&root) {
        let Some(pid) = dir
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix(CGROUP_PREFIX))
            .and_then(|r| r.split('x').next())
        else {
            continue;
        };
        if !std::path::Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir(&dir);
        }
    }
}
