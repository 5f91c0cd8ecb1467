//! The kernel feature table of docs/kernels.md, checked against what each
//! guest kernel reports (`bpftool feature probe kernel -j`): a feature the
//! table says a kernel has must be there, and one it says the kernel lacks
//! must be missing. tests/tests/kernel_features.rs checks the other side
//! (the rows are exactly what the eBPF object uses).

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::Value;

pub const DOC: &str = "docs/kernels.md";
pub const BEGIN: &str = "<!-- kernel-features:begin";
pub const END: &str = "<!-- kernel-features:end";

/// One row of the table.
#[derive(Debug, PartialEq)]
pub struct Feature {
    pub kind: Kind,
    /// The first kernel version (major, minor) that has it.
    pub first: (u32, u32),
    /// Kernel columns: (name, claimed to have it).
    pub cells: Vec<(String, bool)>,
}

#[derive(Debug, PartialEq)]
pub enum Kind {
    /// A program type (bpftool's name) and its attach point.
    Program {
        prog_type: String,
        attach: String,
    },
    Helper {
        helper: String,
        prog_type: String,
    },
    Map {
        map_type: String,
    },
    /// A context field newer than its program type.
    Field {
        field: String,
        prog_type: String,
    },
}

impl Kind {
    fn describe(&self) -> String {
        match self {
            Kind::Program { prog_type, attach } if attach.is_empty() => {
                format!("program type {prog_type}")
            }
            Kind::Program { prog_type, attach } => format!("program type {prog_type} ({attach})"),
            Kind::Helper { helper, prog_type } => format!("{helper} in {prog_type} programs"),
            Kind::Map { map_type } => format!("map type {map_type}"),
            Kind::Field { field, prog_type } => format!("{field} in {prog_type} programs"),
        }
    }
}

/// "5.10" → (5, 10); also takes a release string ("6.12.95+deb12-amd64").
pub fn version(s: &str) -> Option<(u32, u32)> {
    let mut parts = s.trim().split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// The header's kernel columns and the rows of the table in `doc`.
pub fn parse(doc: &str) -> Result<(Vec<String>, Vec<Feature>)> {
    let start = doc
        .find(BEGIN)
        .with_context(|| format!("no `{BEGIN}` marker"))?;
    let end = doc[start..]
        .find(END)
        .map(|e| start + e)
        .with_context(|| format!("no `{END}` marker"))?;
    let mut lines = doc[start..end]
        .lines()
        .skip(1)
        .filter(|l| l.trim_start().starts_with('|'));
    let cells = |l: &str| -> Vec<String> {
        l.trim()
            .trim_matches('|')
            .split('|')
            .map(|c| c.trim().replace(['`', '*'], ""))
            .collect()
    };
    let header = cells(lines.next().context("the table has no header")?);
    let fixed = ["Kind", "Feature", "Used by", "First kernel"];
    if header.len() < fixed.len() || header[..fixed.len()] != fixed {
        bail!("the table header must start with {}", fixed.join(" | "));
    }
    let kernels: Vec<String> = header[fixed.len()..].to_vec();
    let mut rows = Vec::new();
    for line in lines.skip(1) {
        let c = cells(line);
        if c.len() != header.len() {
            bail!(
                "row {line:?} has {} cells, the header {}",
                c.len(),
                header.len()
            );
        }
        let words: Vec<&str> = c[1].split_whitespace().collect();
        let kind = match (c[0].as_str(), words.as_slice()) {
            ("program", [t]) => Kind::Program {
                prog_type: t.to_string(),
                attach: String::new(),
            },
            ("program", [t, a]) => Kind::Program {
                prog_type: t.to_string(),
                attach: a.to_string(),
            },
            ("helper", [h, "in", t]) => Kind::Helper {
                helper: h.to_string(),
                prog_type: t.to_string(),
            },
            ("map", [m]) => Kind::Map {
                map_type: m.to_string(),
            },
            ("field", [f, "in", t]) => Kind::Field {
                field: f.to_string(),
                prog_type: t.to_string(),
            },
            _ => bail!(
                "row {line:?}: cannot read kind {:?} / feature {:?}",
                c[0],
                c[1]
            ),
        };
        let first =
            version(&c[3]).with_context(|| format!("row {line:?}: first kernel {:?}", c[3]))?;
        let mut claims = Vec::new();
        for (k, cell) in kernels.iter().zip(&c[fixed.len()..]) {
            let has = match cell.as_str() {
                "yes" => true,
                "no" => false,
                other => bail!("row {line:?}: kernel {k}: {other:?} is neither yes nor no"),
            };
            claims.push((k.clone(), has));
        }
        rows.push(Feature {
            kind,
            first,
            cells: claims,
        });
    }
    Ok((kernels, rows))
}

/// Reads the table from the workspace's docs.
pub fn read(workspace: &Path) -> Result<(Vec<String>, Vec<Feature>)> {
    let path = workspace.join(DOC);
    let doc = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    parse(&doc).with_context(|| format!("{}: kernel feature table", path.display()))
}

/// Disagreements between the table and a kernel's `bpftool feature probe
/// kernel -j` output, one message each. Attach points are not probed by
/// bpftool: their rows only require the program type where the table
/// says the kernel has them. Context fields are not probed either: the
/// verifier checks them when the programs load (the guests' attach and
/// tests).
pub fn check(rows: &[Feature], release: &str, probe: &Value) -> Vec<String> {
    let Some(have_version) = version(release) else {
        return vec![format!(
            "cannot read a version from the kernel release {release:?}"
        )];
    };
    let mut problems = Vec::new();
    for row in rows {
        let claimed = have_version >= row.first;
        let present = match &row.kind {
            Kind::Field { .. } => continue,
            Kind::Program { prog_type, .. } => {
                probe["program_types"][format!("have_{prog_type}_prog_type")].as_bool()
            }
            Kind::Map { map_type } => {
                probe["map_types"][format!("have_{map_type}_map_type")].as_bool()
            }
            Kind::Helper { helper, prog_type } => probe["helpers"]
                [format!("{prog_type}_available_helpers")]
            .as_array()
            .map(|list| list.iter().any(|h| h.as_str() == Some(helper))),
        };
        let Some(present) = present else {
            problems.push(format!(
                "bpftool reported nothing about {} on {release}",
                row.kind.describe()
            ));
            continue;
        };
        // A program type can predate the attach point a row names
        // (cgroup_sock vs sock_release): bpftool sees only the type, so
        // such a row is checked one way only.
        let one_way = matches!(&row.kind, Kind::Program { attach, .. } if !attach.is_empty());
        if present != claimed && !(one_way && present) {
            problems.push(format!(
                "{DOC} says {} first appears in {}.{}, but {release} {} it",
                row.kind.describe(),
                row.first.0,
                row.first.1,
                if present { "has" } else { "lacks" }
            ));
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC_TABLE: &str = "intro
<!-- kernel-features:begin (checked) -->
| Kind | Feature | Used by | First kernel | 5.10 | 6.1 |
| --- | --- | --- | --- | --- | --- |
| program | `cgroup_sock_addr` connect4 | `redirect_connect4` | 4.17 | yes | yes |
| program | `sock_ops` | `redirect_sockops` | 4.13 | yes | yes |
| helper | `bpf_get_netns_cookie` in `sock_ops` | `redirect_sockops` | 5.15 | **no** | yes |
| map | `sk_storage` | `X` | 5.2 | yes | yes |
| field | `ingress_ifindex` in `sk_lookup` | `Y` | 5.17 | **no** | yes |
<!-- kernel-features:end -->
";

    #[test]
    fn parses_the_table() {
        let (kernels, rows) = parse(DOC_TABLE).unwrap();
        assert_eq!(kernels, ["5.10", "6.1"]);
        assert_eq!(rows.len(), 5);
        assert_eq!(
            rows[4].kind,
            Kind::Field {
                field: "ingress_ifindex".into(),
                prog_type: "sk_lookup".into()
            }
        );
        assert_eq!(
            rows[0].kind,
            Kind::Program {
                prog_type: "cgroup_sock_addr".into(),
                attach: "connect4".into()
            }
        );
        assert_eq!(rows[2].first, (5, 15));
        assert_eq!(
            rows[2].cells,
            [("5.10".into(), false), ("6.1".into(), true)]
        );
        assert!(parse("no table").is_err());
        assert!(parse(
            &DOC_TABLE.replace("| yes | yes |\n| program", "| maybe | yes |\n| program")
        )
        .is_err());
    }

    #[test]
    fn checks_claims_against_bpftool() {
        let (_, rows) = parse(DOC_TABLE).unwrap();
        let probe = serde_json::json!({
            "program_types": {"have_cgroup_sock_addr_prog_type": true, "have_sock_ops_prog_type": true},
            "map_types": {"have_sk_storage_map_type": true},
            "helpers": {"sock_ops_available_helpers": ["bpf_map_lookup_elem"]},
        });
        assert!(check(&rows, "5.10.0-46-amd64", &probe).is_empty());
        let problems = check(&rows, "6.1.0-57-amd64", &probe);
        assert_eq!(
            problems,
            ["docs/kernels.md says bpf_get_netns_cookie in sock_ops programs first appears in 5.15, but 6.1.0-57-amd64 lacks it"]
        );
        assert_eq!(version("6.12.95+deb12-amd64"), Some((6, 12)));
    }
}
