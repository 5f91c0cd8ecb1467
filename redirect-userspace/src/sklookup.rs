//! Per-pod `sk_lookup` instances, loaded in well under a millisecond (and
//! the per-pod instances of the tc programs of `-k` interfaces, which
//! cannot call `bpf_get_netns_cookie` either: the same template serves
//! any program of the object that carries its pod's cookie in a global).
//!
//! `sk_lookup` programs cannot call `bpf_get_netns_cookie`, so every pod
//! gets its own instance of `redirect_sk_lookup` with its netns cookie in
//! the read-only global `REDIRECT_SK_LOOKUP_NETNS`. Loading that instance
//! through `EbpfLoader` costs a full object load per pod: the loader parses
//! the kernel BTF (`/sys/kernel/btf/vmlinux`, 5.5 MB: ~17 ms in release,
//! over 100 ms in debug) although our object has no BTF and no CO-RE
//! relocation, then parses the ELF, opens every pinned map, creates the
//! `.rodata` map and links every program (~3 ms more).
//!
//! [`SkLookupTemplate`] does that work once per install: it parses the
//! object, links the program's instructions (bpf-to-bpf calls such as
//! `memset`) and relocates its map references against the install's pinned
//! maps, whose fds it keeps open. A pod then costs what the kernel needs: a
//! one-entry read-only array holding the `.rodata` bytes with the pod's
//! cookie (created, filled, frozen, exactly as aya makes `.rodata`), the
//! instructions with that array's fd patched in, and `BPF_PROG_LOAD` (the
//! verifier pass, ~0.5 ms). The program and its link are the same as the
//! loader made: same instructions, same program type and expected attach
//! type, same name; the link is pinned where it always was.

use std::{
    collections::{HashMap, HashSet},
    ffi::CString,
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
    path::{Path, PathBuf},
};

use aya_obj::{
    generated::{bpf_insn, BPF_PSEUDO_MAP_FD, BPF_PSEUDO_MAP_VALUE},
    maps::PinningType,
    Object, ProgramSection,
};

use crate::error::{Error, Result};

/// Stands for the per-pod `.rodata` array in the relocated instructions;
/// never a real fd (RLIMIT_NOFILE is far below it).
const RODATA_MARK: RawFd = i32::MAX;
/// Stands for a map that is neither pinned nor the global's section; an
/// error if the program refers to it.
const OTHER_MARK: RawFd = i32::MAX - 1;
/// Written into the global to find its offset in its section.
const SENTINEL: u64 = 0x5e4f_1c0a_d00d_feed;

// uapi/linux/bpf.h
const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_MAP_FREEZE: libc::c_long = 22;
const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_F_RDONLY_PROG: u32 = 1 << 7;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
const BPF_PROG_TYPE_SK_LOOKUP: u32 = 30;
pub const BPF_SK_LOOKUP: u32 = 36;
const LD_IMM64: u8 = 0x18; // BPF_LD | BPF_IMM | BPF_DW

/// The program's instructions relocated once; see the module docs.
pub struct SkLookupTemplate {
    insns: Vec<bpf_insn>,
    /// `ld_imm64` instructions that address the global's section.
    rodata_refs: Vec<usize>,
    rodata: Vec<u8>,
    cookie_offset: usize,
    license: CString,
    name: [u8; 16],
    /// Program type and expected attach type (from its section).
    prog_type: u32,
    attach_type: u32,
    /// The pinned maps the instructions name by fd, open as long as the
    /// template lives, with their pin path and map id.
    maps: Vec<(OwnedFd, PathBuf, u32)>,
}

impl SkLookupTemplate {
    /// Parse `object` and relocate `program` against the maps pinned in
    /// `maps_dir`; `global` is the u64 set per instance.
    pub fn new(
        object: &[u8],
        maps_dir: &Path,
        program: &str,
        global: &str,
    ) -> Result<SkLookupTemplate> {
        let what = |s: &str| format!("preparing the {program} program: {s}");
        let mut obj =
            Object::parse(object).map_err(|e| Error::bpf(what("parsing the kernel object"), e))?;
        let sentinel = SENTINEL.to_ne_bytes();
        obj.patch_map_data(HashMap::from([(global, (&sentinel[..], true))]))
            .map_err(|e| Error::bpf(what(&format!("no global {global} in the kernel object (rebuild with `cargo xtask build-ebpf`)")), e))?;
        let mut section = None;
        for (name, m) in &obj.maps {
            let data = m.data();
            let hits: Vec<usize> = (0..data.len().saturating_sub(7))
                .filter(|&i| data[i..i + 8] == sentinel)
                .collect();
            if let [off] = hits[..] {
                section = Some((name.clone(), off, data.to_vec()));
            }
        }
        let (section, cookie_offset, rodata) = section.ok_or_else(|| {
            Error::bpf(
                what(&format!("global {global} not found once in a data section")),
                io::Error::other("layout"),
            )
        })?;

        let mut keep = Vec::new();
        let relocated = relocate(&mut obj, program, |name, m| {
            if *name == section {
                Ok(RODATA_MARK)
            } else if m.pinning() == PinningType::ByName || name == crate::kernlog::MAP_RING {
                // (aya-log's ring buffer is pinned by the loader, by path.)
                let path = maps_dir.join(name);
                let fd = obj_get(&path).map_err(|e| Error::io("opening pinned map", &path, e))?;
                let raw = fd.as_raw_fd();
                let id = map_id(fd.as_fd())
                    .map_err(|e| Error::io("reading the id of pinned map", &path, e))?;
                keep.push((fd, path, id));
                Ok(raw)
            } else {
                Ok(OTHER_MARK)
            }
        })?;
        let Relocated {
            insns,
            license,
            name,
        } = relocated;
        let (prog_type, attach_type) = match obj.programs.get(program).map(|p| &p.section) {
            Some(ProgramSection::SkLookup) => (BPF_PROG_TYPE_SK_LOOKUP, BPF_SK_LOOKUP),
            Some(ProgramSection::SchedClassifier) => (BPF_PROG_TYPE_SCHED_CLS, 0),
            _ => {
                return Err(Error::bpf(
                    what("not an sk_lookup or tc program"),
                    io::Error::other("unsupported program type"),
                ))
            }
        };
        let refers = |mark: RawFd| map_refs(&insns, mark);
        if !refers(OTHER_MARK).is_empty() {
            return Err(Error::bpf(
                what("it uses a map that is not pinned"),
                io::Error::other("unsupported map"),
            ));
        }
        let rodata_refs = refers(RODATA_MARK);
        Ok(SkLookupTemplate {
            insns,
            rodata_refs,
            rodata,
            cookie_offset,
            license,
            name,
            prog_type,
            attach_type,
            maps: keep,
        })
    }

    /// Are the maps pinned now the ones the instructions refer to? Not
    /// when the install was removed and made again (`redirect uninstall`,
    /// then a new `attach`) under a running agent: the template must then
    /// be made again, or new pods' instances would read the old maps.
    pub fn is_current(&self) -> bool {
        self.maps.iter().all(|(_, path, id)| {
            obj_get(path)
                .and_then(|fd| map_id(fd.as_fd()))
                .map(|now| now == *id)
                .unwrap_or(false)
        })
    }

    /// Load an instance for the pod with this netns cookie; the returned
    /// program fd is all there is to it (it holds its `.rodata` array).
    pub fn load(&self, cookie: u64) -> io::Result<OwnedFd> {
        let mut data = self.rodata.clone();
        data[self.cookie_offset..self.cookie_offset + 8].copy_from_slice(&cookie.to_ne_bytes());
        let map = map_create(
            BPF_MAP_TYPE_ARRAY,
            4,
            data.len() as u32,
            1,
            BPF_F_RDONLY_PROG,
            b".rodata",
        )?;
        map_update(map.as_fd(), &0u32.to_ne_bytes(), &data)?;
        map_freeze(map.as_fd())?;
        let mut insns = self.insns.clone();
        for &i in &self.rodata_refs {
            insns[i].imm = map.as_raw_fd();
        }
        let kind = ProgKind {
            prog_type: self.prog_type,
            attach_type: self.attach_type,
        };
        load_logged(kind, &insns, &self.license, &self.name)
    }
}

/// A program's instructions out of the kernel object, linked and with its
/// map references relocated, plus what BPF_PROG_LOAD needs besides.
pub(crate) struct Relocated {
    pub insns: Vec<bpf_insn>,
    pub license: CString,
    /// The program's name as the kernel keeps it (15 bytes at most).
    pub name: [u8; 16],
}

/// Link `program` of `obj` (bpf-to-bpf calls) and relocate its map
/// references: `fd_for(map name, map)` gives the fd (or a mark) each map
/// of the object stands for.
pub(crate) fn relocate(
    obj: &mut Object,
    program: &str,
    mut fd_for: impl FnMut(&String, &aya_obj::Map) -> Result<RawFd>,
) -> Result<Relocated> {
    let what = |s: &str| format!("preparing the {program} program: {s}");
    let mut by_name: HashMap<String, RawFd> = HashMap::new();
    for (name, m) in &obj.maps {
        by_name.insert(name.clone(), fd_for(name, m)?);
    }
    let text_sections: HashSet<usize> = obj.functions.keys().map(|(s, _)| *s).collect();
    // relocate_maps takes &mut obj: hand it a copy of the map table.
    let maps_owned: Vec<(String, RawFd, aya_obj::Map)> = obj
        .maps
        .iter()
        .map(|(n, m)| (n.clone(), by_name[n], m.clone()))
        .collect();
    obj.relocate_maps(
        maps_owned.iter().map(|(n, f, m)| (n.as_str(), *f, m)),
        &text_sections,
    )
    .map_err(|e| Error::bpf(what("relocating map references"), e))?;
    obj.relocate_calls(&text_sections)
        .map_err(|e| Error::bpf(what("linking functions"), e))?;
    let prog = obj.programs.get(program).ok_or_else(|| {
        Error::bpf(
            what("missing from the kernel object (rebuild with `cargo xtask build-ebpf`)"),
            io::Error::other("no such program"),
        )
    })?;
    let insns = obj.functions[&prog.function_key()].instructions.clone();
    let mut name = [0u8; 16];
    for (d, s) in name.iter_mut().zip(program.bytes().take(15)) {
        *d = s;
    }
    Ok(Relocated {
        insns,
        license: prog.license.clone(),
        name,
    })
}

/// Indexes of the `ld_imm64` map references of `insns` to `mark`.
pub(crate) fn map_refs(insns: &[bpf_insn], mark: RawFd) -> Vec<usize> {
    (0..insns.len())
        .filter(|&i| {
            let s = insns[i].src_reg() as u32;
            insns[i].code == LD_IMM64
                && (s == BPF_PSEUDO_MAP_FD || s == BPF_PSEUDO_MAP_VALUE)
                && insns[i].imm == mark
        })
        .collect()
}

/// A program type and the attach type it is loaded for.
#[derive(Clone, Copy)]
pub(crate) struct ProgKind {
    pub prog_type: u32,
    pub attach_type: u32,
}

/// BPF_PROG_LOAD; on failure again with the verifier's log, whose tail
/// goes into the error.
pub(crate) fn load_logged(
    kind: ProgKind,
    insns: &[bpf_insn],
    license: &CString,
    name: &[u8; 16],
) -> io::Result<OwnedFd> {
    match prog_load(kind, insns, license, name, None) {
        Ok(fd) => Ok(fd),
        Err(e) => {
            let mut log = vec![0u8; 1 << 20];
            let _ = prog_load(kind, insns, license, name, Some(&mut log));
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            let text = String::from_utf8_lossy(&log[..end]);
            let tail: Vec<&str> = text
                .lines()
                .rev()
                .take(20)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            Err(io::Error::new(
                e.kind(),
                format!(
                    "BPF_PROG_LOAD: {e}; verifier log (tail):\n{}",
                    tail.join("\n")
                ),
            ))
        }
    }
}

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

fn fd(r: i32) -> OwnedFd {
    unsafe { OwnedFd::from_raw_fd(r) }
}

/// Write `b` at byte offset `off` of the attr.
fn put(attr: &mut [u64; 16], off: usize, b: &[u8]) {
    let bytes = unsafe { std::slice::from_raw_parts_mut(attr.as_mut_ptr().cast::<u8>(), 128) };
    bytes[off..off + b.len()].copy_from_slice(b);
}

/// The id of a map (BPF_OBJ_GET_INFO_BY_FD, `bpf_map_info.id`).
fn map_id(map: BorrowedFd<'_>) -> io::Result<u32> {
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    let mut info = [0u8; 80];
    let mut attr = [0u64; 16];
    // { u32 bpf_fd; u32 info_len; u64 info }
    attr[0] = map.as_raw_fd() as u32 as u64 | ((info.len() as u64) << 32);
    attr[1] = info.as_mut_ptr() as u64;
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(u32::from_ne_bytes([info[4], info[5], info[6], info[7]]))
}

fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    let mut attr = [0u64; 16];
    attr[0] = c.as_ptr() as u64;
    bpf(BPF_OBJ_GET, &mut attr).map(fd)
}

pub(crate) fn map_create(
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    flags: u32,
    name: &[u8],
) -> io::Result<OwnedFd> {
    let mut attr = [0u64; 16];
    // { map_type, key_size, value_size, max_entries, map_flags, inner_map_fd, numa_node, map_name[16] @28 }
    for (i, v) in [map_type, key_size, value_size, max_entries, flags]
        .into_iter()
        .enumerate()
    {
        put(&mut attr, i * 4, &v.to_ne_bytes());
    }
    put(&mut attr, 28, &name[..name.len().min(15)]);
    crate::bpf::with_memlock_retry(|| bpf(BPF_MAP_CREATE, &mut attr)).map(fd)
}

pub(crate) fn map_update(map: BorrowedFd<'_>, key: &[u8], value: &[u8]) -> io::Result<()> {
    let mut attr = [0u64; 16];
    // { u32 map_fd; u64 key @8; u64 value @16; u64 flags @24 }
    attr[0] = map.as_raw_fd() as u32 as u64;
    attr[1] = key.as_ptr() as u64;
    attr[2] = value.as_ptr() as u64;
    bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(drop)
}

fn map_freeze(map: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = [0u64; 16];
    attr[0] = map.as_raw_fd() as u32 as u64;
    bpf(BPF_MAP_FREEZE, &mut attr).map(drop)
}

fn prog_load(
    kind: ProgKind,
    insns: &[bpf_insn],
    license: &CString,
    name: &[u8; 16],
    log: Option<&mut Vec<u8>>,
) -> io::Result<OwnedFd> {
    let mut attr = [0u64; 16];
    // { u32 prog_type; u32 insn_cnt; u64 insns @8; u64 license @16;
    //   u32 log_level @24; u32 log_size @28; u64 log_buf @32;
    //   u32 kern_version @40; u32 prog_flags @44; char prog_name[16] @48;
    //   u32 prog_ifindex @64; u32 expected_attach_type @68 }
    put(&mut attr, 0, &kind.prog_type.to_ne_bytes());
    put(&mut attr, 4, &(insns.len() as u32).to_ne_bytes());
    attr[1] = insns.as_ptr() as u64;
    attr[2] = license.as_ptr() as u64;
    if let Some(log) = log {
        put(&mut attr, 24, &1u32.to_ne_bytes());
        put(&mut attr, 28, &(log.len() as u32).to_ne_bytes());
        attr[4] = log.as_mut_ptr() as u64;
    }
    put(&mut attr, 48, name);
    put(&mut attr, 68, &kind.attach_type.to_ne_bytes());
    crate::bpf::with_memlock_retry(|| bpf(BPF_PROG_LOAD, &mut attr)).map(fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bpf_insn_is_eight_bytes() {
        assert_eq!(std::mem::size_of::<bpf_insn>(), 8);
    }
}
