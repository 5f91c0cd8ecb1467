//! docs/kernels.md's kernel feature table cannot drift from the programs:
//! its rows are exactly the program types and attach points, the helpers
//! each program type calls and the map types of the eBPF object that
//! `redirect` embeds (read from the object's instructions, so helpers
//! called inside aya's map methods count too), with the programs or maps
//! using each; and every kernel column follows from the first kernel.
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
        other => panic!("program section {other:?}: add its bpftool name to this test"),
    }
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
