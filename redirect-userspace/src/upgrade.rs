//! Upgrading an install's kernel programs in place.
//!
//! The cgroup programs are attached once per cgroup through pinned
//! `bpf_link`s, and a restarted agent finds the links and keeps them. A new
//! version of the agent must not keep the old version's kernel code under
//! its new userspace: at start it compares, link by link, the attached
//! program with its own (by the kernel's program tag, a hash of the
//! instructions that ignores map fd numbers) and, where they differ,
//! swaps the program with `BPF_LINK_UPDATE` (`BPF_F_REPLACE`: only if the
//! link still runs the program it looked at). The swap is atomic: every
//! connection is seen by the old program or by the new one, never by none,
//! and the maps (checked compatible first, see `mapsize`) stay in place,
//! so live connections keep their records.

use std::{
    ffi::CString,
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    path::Path,
};

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_LINK_DETACH: libc::c_long = 34;
const BPF_F_REPLACE: u32 = 1 << 2;

fn sys_bpf(cmd: libc::c_long, attr: &mut [u8; 128]) -> io::Result<i32> {
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r as i32)
}

fn put32(attr: &mut [u8; 128], off: usize, v: u32) {
    attr[off..off + 4].copy_from_slice(&v.to_ne_bytes());
}

/// BPF_OBJ_GET: open a pinned object.
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    let mut attr = [0u8; 128];
    // { u64 pathname; u32 bpf_fd; u32 file_flags; }
    attr[..8].copy_from_slice(&(c.as_ptr() as u64).to_ne_bytes());
    let fd = sys_bpf(BPF_OBJ_GET, &mut attr)?;
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// BPF_LINK_DETACH: detach the link's program now, whoever still holds
/// the link (Linux 5.9+ for cgroup and netns links).
pub fn link_detach(link: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = [0u8; 128];
    // { u32 link_fd; }
    put32(&mut attr, 0, link.as_raw_fd() as u32);
    sys_bpf(BPF_LINK_DETACH, &mut attr).map(|_| ())
}

/// BPF_OBJ_GET_INFO_BY_FD into a zeroed buffer.
fn info(fd: BorrowedFd<'_>) -> io::Result<[u8; 256]> {
    let mut buf = [0u8; 256];
    let mut attr = [0u8; 128];
    // { u32 bpf_fd; u32 info_len; u64 info; }
    put32(&mut attr, 0, fd.as_raw_fd() as u32);
    put32(&mut attr, 4, buf.len() as u32);
    attr[8..16].copy_from_slice(&(buf.as_mut_ptr() as u64).to_ne_bytes());
    sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(buf)
}

/// The id of the program a link runs (`bpf_link_info.prog_id`).
pub fn link_prog_id(link: BorrowedFd<'_>) -> io::Result<u32> {
    let b = info(link)?;
    // { u32 type; u32 id; u32 prog_id; ... }
    Ok(u32::from_ne_bytes([b[8], b[9], b[10], b[11]]))
}

/// The interface a tcx link is attached to (`bpf_link_info.tcx.ifindex`);
/// 0 once the interface is gone (the kernel detached the link).
pub fn tcx_link_ifindex(link: BorrowedFd<'_>) -> io::Result<u32> {
    let b = info(link)?;
    // { u32 type; u32 id; u32 prog_id; union (8-aligned) { tcx: { u32 ifindex; ... } } }
    Ok(u32::from_ne_bytes([b[16], b[17], b[18], b[19]]))
}

/// The ids of the maps a program uses (`bpf_prog_info.map_ids`).
pub fn prog_map_ids(prog: BorrowedFd<'_>) -> io::Result<Vec<u32>> {
    let mut ids = [0u32; 64];
    let mut buf = [0u8; 256];
    // { ...; u32 nr_map_ids @52; u64 map_ids @56; ... }
    buf[52..56].copy_from_slice(&(ids.len() as u32).to_ne_bytes());
    buf[56..64].copy_from_slice(&(ids.as_mut_ptr() as u64).to_ne_bytes());
    let mut attr = [0u8; 128];
    put32(&mut attr, 0, prog.as_raw_fd() as u32);
    put32(&mut attr, 4, buf.len() as u32);
    attr[8..16].copy_from_slice(&(buf.as_mut_ptr() as u64).to_ne_bytes());
    sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    let n = u32::from_ne_bytes([buf[52], buf[53], buf[54], buf[55]]) as usize;
    Ok(ids[..n.min(ids.len())].to_vec())
}

/// An fd of the program with this id.
pub fn prog_by_id(id: u32) -> io::Result<OwnedFd> {
    let mut attr = [0u8; 128];
    put32(&mut attr, 0, id);
    let fd = sys_bpf(BPF_PROG_GET_FD_BY_ID, &mut attr)?;
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The kernel's tag of a program (`bpf_prog_info.tag`): a hash of its
/// instructions, map fd numbers left out.
pub fn prog_tag(prog: BorrowedFd<'_>) -> io::Result<[u8; 8]> {
    let b = info(prog)?;
    // { u32 type; u32 id; u8 tag[8]; ... }
    let mut t = [0u8; 8];
    t.copy_from_slice(&b[8..16]);
    Ok(t)
}

/// The name of a program (`bpf_prog_info.name`, at most 15 bytes).
pub fn prog_name(prog: BorrowedFd<'_>) -> io::Result<String> {
    let b = info(prog)?;
    // ... u32 created_by_uid @48; u32 nr_map_ids; u64 map_ids; char name[16] @64
    let name = &b[64..80];
    let end = name.iter().position(|&c| c == 0).unwrap_or(name.len());
    Ok(String::from_utf8_lossy(&name[..end]).into_owned())
}

/// BPF_PROG_QUERY: ids of the programs attached to `target` (a cgroup or
/// network namespace fd) for `attach_type`.
pub fn prog_query(target: BorrowedFd<'_>, attach_type: u32) -> io::Result<Vec<u32>> {
    const BPF_PROG_QUERY: libc::c_long = 16;
    let mut ids = [0u32; 64];
    let mut attr = [0u8; 128];
    // { u32 target_fd; u32 attach_type; u32 query_flags; u32 attach_flags;
    //   u64 prog_ids; u32 prog_cnt; }
    put32(&mut attr, 0, target.as_raw_fd() as u32);
    put32(&mut attr, 4, attach_type);
    attr[16..24].copy_from_slice(&(ids.as_mut_ptr() as u64).to_ne_bytes());
    put32(&mut attr, 24, ids.len() as u32);
    sys_bpf(BPF_PROG_QUERY, &mut attr)?;
    let n = u32::from_ne_bytes([attr[24], attr[25], attr[26], attr[27]]) as usize;
    Ok(ids[..n.min(ids.len())].to_vec())
}

/// BPF_LINK_UPDATE: the link runs `new` from now on. With `old`, only if
/// it still runs `old` (BPF_F_REPLACE).
pub fn link_update(
    link: BorrowedFd<'_>,
    new: BorrowedFd<'_>,
    old: Option<BorrowedFd<'_>>,
) -> io::Result<()> {
    let mut attr = [0u8; 128];
    // { u32 link_fd; u32 new_prog_fd; u32 flags; u32 old_prog_fd; }
    put32(&mut attr, 0, link.as_raw_fd() as u32);
    put32(&mut attr, 4, new.as_raw_fd() as u32);
    if let Some(o) = old {
        put32(&mut attr, 8, BPF_F_REPLACE);
        put32(&mut attr, 12, o.as_raw_fd() as u32);
    }
    sys_bpf(BPF_LINK_UPDATE, &mut attr)?;
    Ok(())
}

/// Switch the pinned link at `link_path` to `new` when the program it
/// runs has other code. Ok(true) when it was switched.
pub fn replace_if_changed(link_path: &Path, new: BorrowedFd<'_>) -> io::Result<bool> {
    let link = obj_get(link_path)?;
    let old = prog_by_id(link_prog_id(link.as_fd())?)?;
    if prog_tag(old.as_fd())? == prog_tag(new)? {
        return Ok(false);
    }
    link_update(link.as_fd(), new, Some(old.as_fd()))?;
    Ok(true)
}
