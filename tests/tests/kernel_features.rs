//! docs/kernels.md's kernel feature table cannot drift from the programs:
//! its rows are exactly the program types and attach points, the helpers
//! each program type calls, the map types, and the context fields newer
//! than their program type ([`LATE_FIELDS`]) of the eBPF object that
//! `redirect` embeds (read from the object's instructions, so helpers
//! called inside aya's map methods count too), with the programs or maps
//! using each; and every kernel column follows from the first kernel.
//! The README's table is generated from it (one row per program: the
//! newest kernel any of its rows needs), checked here too.
//! (`cargo xtask kernels` checks the first-kernel claims against each
//! booted kernel's `bpftool feature probe`; xtask's tests check that the
//! columns are the matrix's kernels.) No root needed.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use aya_obj::{
    generated::{bpf_func_id, bpf_map_type},
    programs::{CgroupSockAddrAttachType, CgroupSockAttachType, CgroupSockoptAttachType},
    Object, ProgramSection,
};

const DOC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/kernels.md");
const BEGIN: &str = "<!-- kernel-features:begin";
const END: &str = "<!-- kernel-features:end";

/// (kind, feature) → users, as the table writes them.
type Features = BTreeMap<(String, String), BTreeSet<String>>;

/// bpftool's program type name and the attach point (empty when the type
/// has one).
fn program_type(section: &ProgramSection) -> (&'static str, &'static str) {
    use CgroupSockAddrAttachType as A;
    match section {
        ProgramSection::CgroupSockAddr { attach_type } => (
            "cgroup_sock_addr",
            match attach_type {
                A::Bind4 => "bind4",
                A::Bind6 => "bind6",
                A::Connect4 => "connect4",
                A::Connect6 => "connect6",
                A::GetPeerName4 => "getpeername4",
                A::GetPeerName6 => "getpeername6",
                A::GetSockName4 => "getsockname4",
                A::GetSockName6 => "getsockname6",
                A::UDPSendMsg4 => "sendmsg4",
                A::UDPSendMsg6 => "sendmsg6",
                A::UDPRecvMsg4 => "recvmsg4",
                A::UDPRecvMsg6 => "recvmsg6",
            },
        ),
        ProgramSection::CgroupSock { attach_type } => (
            "cgroup_sock",
            match attach_type {
                CgroupSockAttachType::PostBind4 => "post_bind4",
                CgroupSockAttachType::PostBind6 => "post_bind6",
                CgroupSockAttachType::SockCreate => "sock_create",
                CgroupSockAttachType::SockRelease => "sock_release",
            },
        ),
        ProgramSection::CgroupSockopt { attach_type } => (
            "cgroup_sockopt",
            match attach_type {
                CgroupSockoptAttachType::Get => "getsockopt",
                CgroupSockoptAttachType::Set => "setsockopt",
            },
        ),
        ProgramSection::SockOps => ("sock_ops", ""),
        ProgramSection::SkMsg => ("sk_msg", ""),
        ProgramSection::SkLookup => ("sk_lookup", ""),
        ProgramSection::SchedClassifier => ("sched_cls", ""),
        other => panic!("program section {other:?}: add its bpftool name to this test"),
    }
}

/// Context fields newer than their program type that a kernel the project
/// supports (5.10 on) may lack: (program type, offset, field). An access
/// is a load through the context pointer (or a copy of it) at that offset.
const LATE_FIELDS: &[(&str, i16, &str)] = &[
    // struct bpf_sk_lookup, Linux 5.17.
    ("sk_lookup", 64, "ingress_ifindex"),
];

/// Offsets of the loads `insns` make through the context pointer (r1 at
/// entry, and the registers it is copied to until they are overwritten;
/// calls clobber r0-r5). A straight scan: the compiler keeps the context
/// in one register for the whole program.
fn context_loads(insns: &[aya_obj::generated::bpf_insn]) -> Vec<i16> {
    let mut ctx: u16 = 1 << 1;
    let mut out = Vec::new();
    for insn in insns {
        let (class, dst, src) = (insn.code & 0x07, insn.dst_reg(), insn.src_reg());
        let is_ctx = |r: u8| ctx & (1 << r) != 0;
        match class {
            // BPF_LDX | BPF_MEM
            0x01 if insn.code & 0xe0 == 0x60 => {
                if is_ctx(src) {
                    out.push(insn.off);
                }
                ctx &= !(1 << dst);
            }
            // BPF_ALU64 | BPF_MOV | BPF_X: a copy.
            0x07 if insn.code == 0xbf => {
                if is_ctx(src) {
                    ctx |= 1 << dst;
                } else {
                    ctx &= !(1 << dst);
                }
            }
            // Other ALU and loads write dst.
            0x00 | 0x04 | 0x07 => ctx &= !(1 << dst),
            // BPF_JMP | BPF_CALL
            0x05 if insn.code == 0x85 => ctx &= !0x3f,
            _ => {}
        }
    }
    out
}

/// `BPF_FUNC_get_netns_cookie` → `bpf_get_netns_cookie`.
fn helper_name(id: i32) -> String {
    let max = bpf_func_id::__BPF_FUNC_MAX_ID as i32;
    assert!((0..max).contains(&id), "helper id {id} out of range");
    // SAFETY: bpf_func_id is a #[repr(u32)] enum of every value 0..MAX
    // (the kernel's ___BPF_FUNC_MAPPER numbers them consecutively).
    let f = unsafe { std::mem::transmute::<u32, bpf_func_id>(id as u32) };
    format!("{f:?}").replacen("BPF_FUNC_", "bpf_", 1)
}

/// What the embedded object uses.
fn used() -> Features {
    let mut obj = Object::parse(redirect_userspace::attach::OBJECT).expect("parse the eBPF object");
    let text: HashSet<usize> = obj.functions.keys().map(|(s, _)| *s).collect();
    obj.relocate_calls(&text).expect("link bpf-to-bpf calls");
    let mut f = Features::new();
    let mut add = |kind: &str, feature: String, user: &str| {
        f.entry((kind.to_string(), feature))
            .or_default()
            .insert(user.to_string());
    };
    for (name, prog) in &obj.programs {
        let (ptype, attach) = program_type(&prog.section);
        let feature = format!("{ptype} {attach}").trim_end().to_string();
        add("program", feature, name);
        let function = &obj.functions[&prog.function_key()];
        for off in context_loads(&function.instructions) {
            for (t, o, field) in LATE_FIELDS {
                if *t == ptype && *o == off {
                    add("field", format!("{field} in {ptype}"), name);
                }
            }
        }
        for insn in &function.instructions {
            // BPF_JMP | BPF_CALL with src_reg 0: a helper call (1 is a
            // bpf-to-bpf call, already linked in; 2 a kfunc).
            if insn.code == 0x85 && insn.src_reg() == 0 {
                add(
                    "helper",
                    format!("{} in {ptype}", helper_name(insn.imm)),
                    name,
                );
            }
            assert!(
                !(insn.code == 0x85 && insn.src_reg() == 2),
                "{name} calls a kfunc: add kfuncs to the kernel feature table"
            );
        }
    }
    for (name, map) in &obj.maps {
        if name.starts_with('.') {
            continue; // .rodata/.bss: data, not a map type of ours
        }
        let t = bpf_map_type::try_from(map.map_type())
            .unwrap_or_else(|_| panic!("map {name}: unknown map type {}", map.map_type()));
        let t = format!("{t:?}")
            .replacen("BPF_MAP_TYPE_", "", 1)
            .to_lowercase();
        add("map", t, name);
    }
    f
}

/// What the table says: (kind, feature) → users.
fn documented() -> Features {
    let doc = std::fs::read_to_string(DOC).expect("read docs/kernels.md");
    let start = doc.find(BEGIN).expect("feature table begin marker");
    let end = start + doc[start..].find(END).expect("feature table end marker");
    let clean = |c: &str| c.trim().replace(['`', '*'], "");
    doc[start..end]
        .lines()
        .filter(|l| l.trim_start().starts_with('|'))
        .skip(2)
        .map(|l| {
            let c: Vec<String> = l.trim().trim_matches('|').split('|').map(clean).collect();
            let users = c[2].split(',').map(|u| u.trim().to_string()).collect();
            ((c[0].clone(), c[1].clone()), users)
        })
        .collect()
}

fn render(f: &Features) -> String {
    f.iter()
        .map(|((kind, feature), users)| {
            let users: Vec<String> = users.iter().map(|u| format!("`{u}`")).collect();
            format!("| {kind} | {feature} | {} | ? |", users.join(", "))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn feature_table_lists_exactly_what_the_object_uses() {
    let used = used();
    let documented = documented();
    let missing: Features = used
        .iter()
        .filter(|(k, v)| documented.get(*k) != Some(*v))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let stale: Vec<_> = documented
        .keys()
        .filter(|k| !used.contains_key(*k))
        .collect();
    assert!(
        missing.is_empty() && stale.is_empty(),
        "docs/kernels.md's kernel feature table is out of date.\n\
         Rows to add or fix (users; fill in the first kernel and the kernel columns):\n{}\n\
         Rows to remove: {stale:?}",
        render(&missing)
    );
}

#[test]
fn feature_table_cells_follow_from_the_first_kernel() {
    let doc = std::fs::read_to_string(DOC).expect("read docs/kernels.md");
    let start = doc.find(BEGIN).unwrap();
    let end = start + doc[start..].find(END).unwrap();
    let rows: Vec<Vec<String>> = doc[start..end]
        .lines()
        .filter(|l| l.trim_start().starts_with('|'))
        .map(|l| {
            l.trim()
                .trim_matches('|')
                .split('|')
                .map(|c| c.trim().replace(['`', '*'], ""))
                .collect()
        })
        .collect();
    let version = |s: &str| -> (u32, u32) {
        let mut p = s
            .split('.')
            .map(|n| n.parse::<u32>().unwrap_or_else(|_| panic!("version {s:?}")));
        (p.next().unwrap(), p.next().unwrap())
    };
    let header = &rows[0];
    assert_eq!(header[..4], ["Kind", "Feature", "Used by", "First kernel"]);
    for row in &rows[2..] {
        assert_eq!(row.len(), header.len(), "{row:?}");
        let first = version(&row[3]);
        for (kernel, cell) in header[4..].iter().zip(&row[4..]) {
            let want = if version(kernel) >= first {
                "yes"
            } else {
                "no"
            };
            assert_eq!(cell, want, "{row:?}: the {kernel} column");
        }
    }
}

/// Linux 5.10's (and 6.1's) verifier rounds every stack frame up to 32
/// bytes and counts a call chain's frames together against the 512-byte
/// limit (later kernels round to 16 where the JIT runs the program). The
/// IPv6 connect and sendmsg hooks need most of it, which is why they
/// leave the decision and the trace events to BPF subprograms (frames of
/// their own) and have LLVM expand `memset`/`memcpy` inline (`cargo xtask
/// build-ebpf`): each call chain, frames rounded as 5.10 rounds them, must
/// fit. Read from the linked instructions (each function's depth is its
/// deepest `r10 - N` access), as the verifier walks them.
#[test]
fn every_call_chain_fits_linux_5_10s_stack_rule() {
    let mut obj = Object::parse(redirect_userspace::attach::OBJECT).expect("parse the eBPF object");
    let text: HashSet<usize> = obj.functions.keys().map(|(s, _)| *s).collect();
    obj.relocate_calls(&text).expect("link the functions");
    let mut problems = Vec::new();
    for (name, prog) in &obj.programs {
        let insns = &obj.functions[&prog.function_key()].instructions;
        // Function starts: 0 and every call target (BPF_JMP | BPF_CALL,
        // src_reg 1: pc + 1 + imm).
        let mut starts: BTreeSet<usize> = BTreeSet::from([0]);
        for (pc, insn) in insns.iter().enumerate() {
            if insn.code == 0x85 && insn.src_reg() == 1 {
                starts.insert((pc as i64 + 1 + insn.imm as i64) as usize);
            }
        }
        let bounds: Vec<usize> = starts.iter().copied().chain([insns.len()]).collect();
        let func_of = |pc: usize| bounds.partition_point(|&b| b <= pc) - 1;
        // Each function's frame (rounded) and callees.
        let mut frame = vec![0i32; bounds.len() - 1];
        let mut calls: Vec<BTreeSet<usize>> = vec![BTreeSet::new(); bounds.len() - 1];
        for (pc, insn) in insns.iter().enumerate() {
            let f = func_of(pc);
            if insn.code == 0x85 && insn.src_reg() == 1 {
                calls[f].insert(func_of((pc as i64 + 1 + insn.imm as i64) as usize));
            }
            // Loads (BPF_LDX) from and stores (BPF_ST, BPF_STX) to the
            // stack: r10 plus a negative offset.
            let on_stack = match insn.code & 0x07 {
                0x01 => insn.src_reg() == 10,
                0x02 | 0x03 => insn.dst_reg() == 10,
                _ => false,
            };
            if on_stack && insn.off < 0 {
                frame[f] = frame[f].max(-(insn.off as i32));
            }
        }
        let rounded: Vec<i32> = frame.iter().map(|d| (d.max(&1) + 31) / 32 * 32).collect();
        // The deepest chain from the program's entry (no recursion in BPF).
        fn deepest(
            f: usize,
            rounded: &[i32],
            calls: &[BTreeSet<usize>],
            path: &mut Vec<usize>,
        ) -> i32 {
            path.push(f);
            let mut below = 0;
            for &c in &calls[f] {
                if !path.contains(&c) {
                    below = below.max(deepest(c, rounded, calls, path));
                }
            }
            path.pop();
            rounded[f] + below
        }
        let total = deepest(0, &rounded, &calls, &mut Vec::new());
        if total > 512 {
            problems.push(format!(
                "{name}: its deepest call chain needs {total} bytes of stack as Linux 5.10 rounds frames (512 at most); frames {frame:?}"
            ));
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

const README: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md");
const README_BEGIN: &str = "<!-- kernel-table:begin";
const README_END: &str = "<!-- kernel-table:end";

fn version(s: &str) -> (u32, u32) {
    let mut p = s
        .split('.')
        .map(|n| n.parse::<u32>().unwrap_or_else(|_| panic!("version {s:?}")));
    (p.next().unwrap(), p.next().unwrap())
}

/// The README's kernel table, made from docs/kernels.md's: one row per
/// program with the newest first kernel among the rows it uses (its
/// program type, helpers and context fields), then one row for all the
/// maps; the same kernel columns.
/// Helpers a program calls only where the kernel has them: the trace
/// events' task fields (pid, command), behind the read-only global
/// `REDIRECT_TRACE_TASK` the loader sets per kernel (the verifier drops
/// the calls a clear bit rules out), so they do not raise the kernel a
/// program needs.
const LEFT_OUT_WHERE_MISSING: &[&str] = &[
    "bpf_get_current_comm in cgroup_sock_addr",
    "bpf_get_current_pid_tgid in cgroup_sock_addr",
    "bpf_get_current_comm in cgroup_sockopt",
    "bpf_get_current_pid_tgid in cgroup_sockopt",
];

fn readme_table() -> String {
    let doc = std::fs::read_to_string(DOC).expect("read docs/kernels.md");
    let start = doc.find(BEGIN).expect("feature table begin marker");
    let end = start + doc[start..].find(END).expect("feature table end marker");
    let clean = |c: &str| c.trim().replace(['`', '*'], "");
    let rows: Vec<Vec<String>> = doc[start..end]
        .lines()
        .filter(|l| l.trim_start().starts_with('|'))
        .map(|l| l.trim().trim_matches('|').split('|').map(clean).collect())
        .collect();
    let kernels = &rows[0][4..];
    let cells = |needs: (u32, u32)| -> String {
        kernels
            .iter()
            .map(|k| if version(k) >= needs { "yes" } else { "**no**" })
            .collect::<Vec<_>>()
            .join(" | ")
    };
    // program → (hook, needs)
    let mut programs: BTreeMap<String, (String, (u32, u32))> = BTreeMap::new();
    let mut maps: (Vec<String>, (u32, u32)) = (Vec::new(), (0, 0));
    for r in &rows[2..] {
        let first = version(&r[3]);
        if LEFT_OUT_WHERE_MISSING.contains(&r[1].as_str()) {
            continue;
        }
        if r[0] == "map" {
            maps.0.push(r[1].clone());
            maps.1 = maps.1.max(first);
            continue;
        }
        for user in r[2].split(',').map(str::trim) {
            let e = programs
                .entry(user.to_string())
                .or_insert_with(|| (String::new(), (0, 0)));
            e.1 = e.1.max(first);
            if r[0] == "program" {
                let mut w = r[1].splitn(2, ' ');
                let (t, attach) = (w.next().unwrap(), w.next().unwrap_or(""));
                e.0 = format!("`{t}` {attach}").trim_end().to_string();
            }
        }
    }
    let mut out = format!(
        "| Program | Hook | Needs Linux | {} |\n| --- | --- | --- |{}\n",
        kernels.join(" | "),
        " --- |".repeat(kernels.len())
    );
    for (name, (hook, needs)) in &programs {
        out.push_str(&format!(
            "| `{name}` | {hook} | {}.{} | {} |\n",
            needs.0,
            needs.1,
            cells(*needs)
        ));
    }
    let types: Vec<String> = maps.0.iter().map(|m| format!("`{m}`")).collect();
    out.push_str(&format!(
        "| (maps) | {} | {}.{} | {} |\n",
        types.join(", "),
        maps.1 .0,
        maps.1 .1,
        cells(maps.1)
    ));
    out
}

#[test]
fn readme_kernel_table_is_generated_from_the_feature_table() {
    let readme = std::fs::read_to_string(README).expect("read README.md");
    let start = readme
        .find(README_BEGIN)
        .expect("README kernel-table begin marker");
    let body = start + readme[start..].find('\n').expect("marker line") + 1;
    let end = body
        + readme[body..]
            .find(README_END)
            .expect("README kernel-table end marker");
    let want = readme_table();
    assert!(
        readme[body..end] == want,
        "README.md's kernel table is out of date; between its markers it must read:\n{want}"
    );
}
