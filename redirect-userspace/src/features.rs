//! Kernel features that some flags need beyond what every capture needs,
//! probed by asking the kernel (loading or attaching a tiny program), never
//! by its version string: distributions backport. A flag that needs a
//! missing feature is refused at attach, naming the feature, the Linux
//! version that has it and what still works.

use std::{io, os::fd::AsFd, sync::OnceLock};

use crate::{
    bpf,
    error::{Error, Result},
};

const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
const BPF_PROG_TYPE_SK_LOOKUP: u32 = 30;
const BPF_SK_LOOKUP: u32 = 36;

/// One instruction (`struct bpf_insn`): opcode, registers, offset, immediate.
const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    code as u64
        | ((dst as u64) << 8)
        | ((src as u64) << 12)
        | ((off as u16 as u64) << 16)
        | ((imm as u32 as u64) << 32)
}
const MOV64_IMM: u8 = 0xb7;
const LDX_MEM_W: u8 = 0x61;
const EXIT: u8 = 0x95;
/// Offset of `ingress_ifindex` in `struct bpf_sk_lookup`.
const SK_LOOKUP_INGRESS_IFINDEX: i16 = 64;

/// Does an sk_lookup program see the interface a connection arrives on
/// (`bpf_sk_lookup.ingress_ifindex`, Linux 5.17)? The verifier of an
/// older kernel refuses the read. Asked once per process.
pub fn sk_lookup_ingress_ifindex() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        let prog = [
            insn(LDX_MEM_W, 2, 1, SK_LOOKUP_INGRESS_IFINDEX, 0),
            insn(MOV64_IMM, 0, 0, 0, 1),
            insn(EXIT, 0, 0, 0, 0),
        ];
        bpf::prog_load_raw(BPF_PROG_TYPE_SK_LOOKUP, BPF_SK_LOOKUP, &prog).is_ok()
    })
}

/// Can tc programs be attached through bpf links (tcx, Linux 6.6)? Asked
/// by attaching a program that passes everything on to the ingress of
/// `lo` of the calling thread's network namespace (a pod's), and
/// detaching it at once. Asked once per process; an error other than the
/// kernel not knowing the attach type is returned.
pub fn tcx() -> io::Result<bool> {
    static HAS: OnceLock<bool> = OnceLock::new();
    if let Some(h) = HAS.get() {
        return Ok(*h);
    }
    // TCX_NEXT: on to the next program and the stack.
    let prog = [insn(MOV64_IMM, 0, 0, 0, -1), insn(EXIT, 0, 0, 0, 0)];
    let fd = bpf::prog_load_raw(BPF_PROG_TYPE_SCHED_CLS, 0, &prog)?;
    let lo = unsafe { libc::if_nametoindex(c"lo".as_ptr()) };
    if lo == 0 {
        return Err(io::Error::last_os_error());
    }
    let has = match bpf::link_create_ifindex(fd.as_fd(), lo, bpf::BPF_TCX_INGRESS) {
        // Dropping the link detaches it: it is pinned nowhere.
        Ok(_link) => true,
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => false,
        Err(e) => return Err(e),
    };
    Ok(*HAS.get_or_init(|| has))
}

/// `-c` needs `ingress_ifindex` in sk_lookup, and so does `-k` (what a VM
/// sends must not be taken for inbound traffic).
pub fn require_sk_lookup_ifindex(flag: &str) -> Result<()> {
    if sk_lookup_ingress_ifindex() {
        return Ok(());
    }
    Err(Error::KernelLacks {
        flag: flag.to_string(),
        reason: "inbound capture (sk_lookup) cannot tell which interface a connection arrives on: that is bpf_sk_lookup.ingress_ifindex, in Linux 5.17 and later; everything else is captured on this kernel: capture the pod without this flag".into(),
    })
}

/// `-k` needs tcx links (in the calling thread's network namespace, the
/// pod's).
pub fn require_tcx(flag: &str) -> Result<()> {
    match tcx() {
        Ok(true) => Ok(()),
        Ok(false) => Err(Error::KernelLacks {
            flag: flag.to_string(),
            reason: "the programs on a VM's interface are attached as tcx links, in Linux 6.6 and later (a link stays attached after redirect exits, and is removed with the pod); everything else is captured on this kernel: capture the pod without this flag".into(),
        }),
        Err(e) => Err(Error::KernelLacks {
            flag: flag.to_string(),
            reason: format!("probing for tcx links (Linux 6.6+) failed: {e}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instructions_encode_as_the_kernel_reads_them() {
        // r2 = *(u32 *)(r1 + 64): opcode 0x61, dst 2, src 1.
        assert_eq!(insn(LDX_MEM_W, 2, 1, 64, 0), 0x0000_0000_0040_1261);
        assert_eq!(insn(MOV64_IMM, 0, 0, 0, -1), 0xffff_ffff_0000_00b7);
    }
}
