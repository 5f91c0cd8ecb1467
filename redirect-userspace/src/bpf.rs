//! The raw bpf(2) commands aya 0.14 does not expose for every program
//! type we use: creating a cgroup link and pinning it, and creating a map
//! only userspace uses (no kernel object declares it).
use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    path::Path,
};

// enum bpf_attach_type (uapi/linux/bpf.h)
pub const BPF_CGROUP_INET_SOCK_CREATE: u32 = 2;
pub const BPF_CGROUP_SOCK_OPS: u32 = 3;
pub const BPF_CGROUP_INET4_CONNECT: u32 = 10;
pub const BPF_CGROUP_INET6_CONNECT: u32 = 11;
pub const BPF_CGROUP_UDP4_SENDMSG: u32 = 14;
pub const BPF_CGROUP_UDP6_SENDMSG: u32 = 15;
pub const BPF_CGROUP_UDP4_RECVMSG: u32 = 19;
pub const BPF_CGROUP_UDP6_RECVMSG: u32 = 20;
pub const BPF_CGROUP_GETSOCKOPT: u32 = 21;
pub const BPF_CGROUP_INET4_GETPEERNAME: u32 = 29;
pub const BPF_CGROUP_INET6_GETPEERNAME: u32 = 30;
pub const BPF_CGROUP_INET_SOCK_RELEASE: u32 = 34;

pub const BPF_SK_MSG_VERDICT: u32 = 7;

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_LINK_CREATE: libc::c_long = 28;

fn bpf(cmd: libc::c_long, attr: &mut [u64; 16]) -> io::Result<i32> {
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            std::mem::size_of_val(attr),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r as i32)
}

/// Run a BPF_MAP_CREATE or BPF_PROG_LOAD; on EPERM raise RLIMIT_MEMLOCK
/// to unlimited (when allowed) and try once more. Before Linux 5.11 the
/// kernel charges maps and programs to the user's locked memory, counted
/// for all of root's processes together (the pinned maps of every install
/// included) against the calling process's limit: a process that only
/// makes a small map (`stats` reporting a netns cookie) fails then. aya
/// does the same for the maps and programs it loads.
pub fn with_memlock_retry<T>(mut op: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    let first = op();
    match &first {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
            let unlimited = libc::rlimit {
                rlim_cur: libc::RLIM_INFINITY,
                rlim_max: libc::RLIM_INFINITY,
            };
            if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
                return first;
            }
            op()
        }
        _ => first,
    }
}

/// BPF_LINK_CREATE for a cgroup attach type (links coexist with others).
pub fn link_create(
    prog: BorrowedFd<'_>,
    cgroup: BorrowedFd<'_>,
    attach_type: u32,
) -> io::Result<OwnedFd> {
    let mut attr = [0u64; 16];
    // { u32 prog_fd; u32 target_fd; u32 attach_type; u32 flags; }
    attr[0] = prog.as_raw_fd() as u32 as u64 | ((cgroup.as_raw_fd() as u32 as u64) << 32);
    attr[1] = attach_type as u64;
    let fd = bpf(BPF_LINK_CREATE, &mut attr)?;
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// tcx links on a network interface (Linux 6.6+).
pub const BPF_TCX_INGRESS: u32 = 46;
pub const BPF_TCX_EGRESS: u32 = 47;

/// BPF_LINK_CREATE on a network interface (tcx): `ifindex` in the calling
/// thread's network namespace. The program runs after those already
/// attached.
pub fn link_create_ifindex(
    prog: BorrowedFd<'_>,
    ifindex: u32,
    attach_type: u32,
) -> io::Result<OwnedFd> {
    let mut attr = [0u64; 16];
    // { u32 prog_fd; u32 target_ifindex; u32 attach_type; u32 flags;
    //   tcx: { u32 relative_fd; u64 expected_revision } }
    attr[0] = prog.as_raw_fd() as u32 as u64 | ((ifindex as u64) << 32);
    attr[1] = attach_type as u64;
    let fd = bpf(BPF_LINK_CREATE, &mut attr)?;
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// BPF_PROG_LOAD of a few hand-written instructions (feature probes):
/// each `u64` is one `struct bpf_insn` as the kernel reads it.
pub fn prog_load_raw(
    prog_type: u32,
    expected_attach_type: u32,
    insns: &[u64],
) -> io::Result<OwnedFd> {
    const BPF_PROG_LOAD: libc::c_long = 5;
    let license = c"GPL";
    let mut b = [0u8; 128];
    // { u32 prog_type; u32 insn_cnt; u64 insns; u64 license; ...
    //   u32 expected_attach_type @68 }
    b[0..4].copy_from_slice(&prog_type.to_ne_bytes());
    b[4..8].copy_from_slice(&(insns.len() as u32).to_ne_bytes());
    b[8..16].copy_from_slice(&(insns.as_ptr() as u64).to_ne_bytes());
    b[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
    b[68..72].copy_from_slice(&expected_attach_type.to_ne_bytes());
    let mut attr = [0u64; 16];
    for (a, c) in attr.iter_mut().zip(b.chunks_exact(8)) {
        *a = u64::from_ne_bytes(c.try_into().expect("8 bytes"));
    }
    let fd = bpf(BPF_PROG_LOAD, &mut attr)?;
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

// enum bpf_map_type (uapi/linux/bpf.h)
pub const BPF_MAP_TYPE_HASH: u32 = 1;
pub const BPF_MAP_TYPE_ARRAY: u32 = 2;

/// BPF_MAP_CREATE of a map no program uses: type, key and value sizes,
/// capacity, and a name for bpftool (at most 15 of [A-Za-z0-9_.]).
pub fn map_create(
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    name: &str,
) -> io::Result<OwnedFd> {
    // { u32 map_type; u32 key_size; u32 value_size; u32 max_entries;
    //   u32 map_flags; u32 inner_map_fd; u32 numa_node; char map_name[16]; }
    let mut b = [0u8; 128];
    for (i, v) in [map_type, key_size, value_size, max_entries]
        .into_iter()
        .enumerate()
    {
        b[i * 4..i * 4 + 4].copy_from_slice(&v.to_ne_bytes());
    }
    let n = name.len().min(15);
    b[28..28 + n].copy_from_slice(&name.as_bytes()[..n]);
    let mut attr = [0u64; 16];
    for (a, c) in attr.iter_mut().zip(b.chunks_exact(8)) {
        *a = u64::from_ne_bytes(c.try_into().expect("8 bytes"));
    }
    let fd = with_memlock_retry(|| bpf(BPF_MAP_CREATE, &mut attr))?;
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The attributes of a map no program uses ([`map_create`]).
pub struct MapSpec<'a> {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    /// For bpftool (at most 15 of [A-Za-z0-9_.]).
    pub name: &'a str,
}

/// Make the map `spec` pinned at `path` unless one is pinned there: a
/// process that pinned it meanwhile (attaches run in parallel) wins, and
/// everyone uses theirs. `what` names the map in errors.
pub fn create_pinned(path: &Path, spec: &MapSpec<'_>, what: &str) -> crate::error::Result<()> {
    use crate::error::Error;
    if path.exists() {
        return Ok(());
    }
    let fd = map_create(
        spec.map_type,
        spec.key_size,
        spec.value_size,
        spec.max_entries,
        spec.name,
    )
    .map_err(|e| Error::bpf(format!("creating {what}"), e))?;
    match obj_pin(std::os::fd::AsFd::as_fd(&fd), path) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(Error::io("pinning", path, e)),
        _ => Ok(()),
    }
}

/// BPF_OBJ_PIN
pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let c = CString::new(path.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    let mut attr = [0u64; 16];
    // { u64 pathname; u32 bpf_fd; u32 file_flags; }
    attr[0] = c.as_ptr() as u64;
    attr[1] = fd.as_raw_fd() as u32 as u64;
    bpf(BPF_OBJ_PIN, &mut attr)?;
    Ok(())
}

/// BPF_PROG_ATTACH of a program to a map (sk_msg verdict on a sockhash).
/// The attachment lives as long as the map, whatever happens to our fds.
pub fn prog_attach(
    prog: BorrowedFd<'_>,
    target: BorrowedFd<'_>,
    attach_type: u32,
) -> io::Result<()> {
    let mut attr = [0u64; 16];
    // { u32 target_fd; u32 attach_bpf_fd; u32 attach_type; u32 attach_flags; }
    attr[0] = target.as_raw_fd() as u32 as u64 | ((prog.as_raw_fd() as u32 as u64) << 32);
    attr[1] = attach_type as u64;
    bpf(BPF_PROG_ATTACH, &mut attr)?;
    Ok(())
}
