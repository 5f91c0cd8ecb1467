//! The demo's output: the workflow, the per-pod counters, the latency
//! table, and the README's block (Markdown), which `--update-readme`
//! splices between the README's `bookinfo-demo` markers. A test checks
//! that the README's block has the format this module writes.

use std::fmt::Write as _;

use anyhow::{bail, Result};

use super::{
    mesh::{Mesh, Node},
    Latency, Report, Workflow,
};

pub const BEGIN: &str = "<!-- bookinfo-demo:begin";
pub const END: &str = "<!-- bookinfo-demo:end -->";

/// The workflow as a shell session.
pub fn workflow_text(w: &Workflow) -> String {
    format!(
        "$ {}\n{}\n$ {}\n$ {}\n{}",
        w.zero_cmd, w.zero_out, w.traffic, w.chain_cmd, w.chain_out
    )
}

fn ms(us: f64) -> String {
    format!("{:.2} ms", us / 1000.0)
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.2}", a / b)
    } else {
        "-".into()
    }
}

/// Each configuration's p50 and p99, and their ratios to no mesh and to
/// iptables, as rows of cells.
fn latency_rows(r: &Report) -> Vec<[String; 6]> {
    let find = |label: &str| r.latency.iter().find(|l| l.label == label);
    let base = find(Mesh::None.label());
    let ipt = find(Mesh::Iptables.label());
    let pair = |l: &Latency, b: Option<&Latency>| match b {
        Some(b) => format!(
            "{} / {}",
            ratio(l.p50_us, b.p50_us),
            ratio(l.p99_us, b.p99_us)
        ),
        None => "-".into(),
    };
    r.latency
        .iter()
        .map(|l| {
            [
                l.label.clone(),
                l.calls.to_string(),
                ms(l.p50_us),
                ms(l.p99_us),
                pair(l, base),
                pair(l, ipt),
            ]
        })
        .collect()
}

const LATENCY_HEAD: [&str; 6] = [
    "configuration",
    "calls",
    "p50",
    "p99",
    "÷ no mesh (p50 / p99)",
    "÷ iptables (p50 / p99)",
];

/// The latency table for the terminal.
pub fn latency_text(r: &Report) -> String {
    let rows = latency_rows(r);
    let width = |i: usize| {
        rows.iter()
            .map(|row| row[i].chars().count())
            .chain([LATENCY_HEAD[i].chars().count()])
            .max()
            .unwrap_or(0)
    };
    let w: Vec<usize> = (0..6).map(width).collect();
    let line = |cells: [&str; 6]| {
        let mut s = format!("   {:<w0$}", cells[0], w0 = w[0]);
        for i in 1..4 {
            let pad = w[i].saturating_sub(cells[i].chars().count());
            let _ = write!(s, "  {}{}", " ".repeat(pad), cells[i]);
        }
        for i in 4..6 {
            let pad = w[i].saturating_sub(cells[i].chars().count());
            let _ = write!(s, "  {}{}", cells[i], " ".repeat(pad));
        }
        s.trim_end().to_string() + "\n"
    };
    let mut s = line(LATENCY_HEAD);
    for row in &rows {
        s.push_str(&line([
            &row[0], &row[1], &row[2], &row[3], &row[4], &row[5],
        ]));
    }
    s
}

/// Per pod, per mesh: what was counted against what the calls made.
pub fn counters_text(nodes: &[Node], r: &Report) -> String {
    let mut s = String::new();
    for (label, pods) in &r.counters {
        let mesh = nodes
            .iter()
            .map(|n| n.mesh)
            .find(|m| m.label() == label)
            .unwrap_or(Mesh::None);
        let calls = nodes
            .iter()
            .find(|n| n.mesh == mesh)
            .map(|n| n.calls)
            .unwrap_or(0);
        let source = match mesh {
            Mesh::None => "no rules, no BPF, no sidecars; every app saw its caller's own address",
            Mesh::Iptables => "iptables-save -c -t nat in each pod, and each haproxy's log",
            Mesh::Redirect => {
                "redirect stats --json --netns <pod> (count_total), and each haproxy's log"
            }
        };
        let _ = writeln!(
            s,
            "   {} ({} calls of productpage): {source}",
            mesh.tag().to_uppercase(),
            calls
        );
        if mesh == Mesh::None {
            for p in pods.iter().filter(|p| !p.ok()) {
                let _ = writeln!(s, "     {}: {}", p.pod, p.problems.join("; "));
            }
            continue;
        }
        let _ = writeln!(
            s,
            "     {:<12} {:>9} {:>9} {:>9} {:>10} {:>15} {:>12} {:>11}  check",
            "pod",
            "to 15001",
            "to 15006",
            "uid 1337",
            "127.0.0.6",
            "SO_ORIGINAL_DST",
            "haproxy out",
            "haproxy in"
        );
        for p in pods {
            let _ = writeln!(
                s,
                "     {:<12} {:>9} {:>9} {:>9} {:>10} {:>15} {:>12} {:>11}  {}",
                p.pod,
                p.captured_out,
                p.captured_in,
                p.proxy_uid,
                p.passthrough,
                p.orig_dst.map(|v| v.to_string()).unwrap_or("-".into()),
                p.log_out,
                p.log_in,
                if p.ok() {
                    let mut ok = format!("ok ({} out, {} in expected)", p.want_out, p.want_in);
                    for n in &p.notes {
                        ok.push_str("; ");
                        ok.push_str(n);
                    }
                    ok
                } else {
                    p.problems.join("; ")
                }
            );
        }
    }
    s
}

/// The README's block: the workflow as a console session, then the
/// latency table.
pub fn markdown(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "```console\n{}\n```\n", workflow_text(&r.workflow));
    let _ = writeln!(
        s,
        "End-to-end latency of `GET /productpage` from the node, {} calls per configuration in {} interleaved rounds ({} CPUs, load average {:.1}):\n",
        r.calls, r.rounds, r.cpus, r.load
    );
    let _ = writeln!(s, "| {} |", LATENCY_HEAD.join(" | "));
    let _ = writeln!(s, "|---|--:|--:|--:|--:|--:|");
    for row in latency_rows(r) {
        let _ = writeln!(s, "| {} |", row.join(" | "));
    }
    s
}

/// `text` with the lines between the `bookinfo-demo` markers replaced by
/// `block` (the marker lines kept).
pub fn splice(text: &str, block: &str) -> Result<String> {
    let (Some(b), Some(e)) = (text.find(BEGIN), text.find(END)) else {
        bail!("no `{BEGIN} ... -->` and `{END}` marker lines");
    };
    let Some(after_begin) = text[b..].find('\n').map(|i| b + i + 1) else {
        bail!("nothing after the `{BEGIN}` marker");
    };
    if after_begin > e {
        bail!("`{END}` comes before `{BEGIN}`");
    }
    Ok(format!("{}{block}{}", &text[..after_begin], &text[e..]))
}

/// The block between the markers.
pub fn block(text: &str) -> Option<&str> {
    let b = text.find(BEGIN)?;
    let start = b + text[b..].find('\n')? + 1;
    let end = text.find(END)?;
    text.get(start..end)
}

/// A line reduced to its format: digit runs become `#`, runs of blanks
/// one blank; an `acceleration:` line keeps only its key (it says what
/// the machine's kernel allowed).
pub fn shape(line: &str) -> String {
    if line.starts_with("acceleration:") {
        return "acceleration: …".into();
    }
    let mut s = String::new();
    let mut last = ' ';
    for c in line.trim_end().chars() {
        let c = if c.is_ascii_digit() { '#' } else { c };
        if (c == '#' || c == ' ') && c == last {
            continue;
        }
        s.push(c);
        last = c;
    }
    s
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use redirect_common::{CounterValue, Reason};
    use redirect_userspace::{
        config::{AccelMode, PodSpec},
        probe::{describe, ProbeResult},
        stats::{render::render, rows, Baseline, Listing, PodStats},
    };

    use super::*;

    /// A run as the demo makes it, with the chain listing from the real
    /// renderer of `redirect stats`: productpage zeroed, then 10 calls (20
    /// connections out through its sidecar, 10 in from it).
    fn sample() -> Report {
        let at = 1_000_000;
        let c = |count, bytes| CounterValue { count, bytes };
        let before = [
            (Reason::OutPassthrough, c(5, 0)),
            (Reason::OutProxyUid, c(10, 0)),
            (Reason::OutCaptured, c(10, 1450)),
        ];
        let counters: BTreeMap<Reason, CounterValue> = [
            (Reason::OutPassthrough, c(15, 0)),
            (Reason::OutProxyUid, c(30, 0)),
            (Reason::OutCaptured, c(30, 4350)),
        ]
        .into_iter()
        .collect();
        // The demo's pods have IPv4 only: their IPv6 is not captured.
        let spec = PodSpec {
            ipv6_off: true,
            ..PodSpec::istio_default()
        };
        let baselines: BTreeMap<Reason, Baseline> = rows(&spec, &BTreeMap::new(), &BTreeMap::new())
            .iter()
            .map(|r| {
                let b = before
                    .iter()
                    .find(|(k, _)| *k == r.reason)
                    .map(|(_, v)| *v)
                    .unwrap_or_default();
                (
                    r.reason,
                    Baseline {
                        count: b.count,
                        bytes: b.bytes,
                        at,
                    },
                )
            })
            .collect();
        let probe = ProbeResult {
            passed: false,
            failed: vec!["blocking-read".into()],
            at: 0,
        };
        let path = "/run/netns/rdbi-4242x0-c-productpage";
        let pod = PodStats {
            netns_cookie: 8193,
            netns: Some(path.into()),
            acceleration: describe(AccelMode::Auto, false, Some(&probe)),
            rules: rows(&spec, &counters, &baselines),
            spec,
        };
        let listing = Listing::parse("ISTIO_OUTPUT").unwrap();
        let lat = |label: &str, p50_us, p99_us| Latency {
            label: label.into(),
            calls: 1000,
            p50_us,
            p99_us,
        };
        Report {
            calls: 1000,
            rounds: 10,
            cpus: 2,
            load: 1.5,
            latency: vec![
                lat(Mesh::None.label(), 420.0, 1210.5),
                lat(Mesh::Iptables.label(), 1530.0, 4100.0),
                lat(Mesh::Redirect.label(), 1405.0, 3800.0),
            ],
            counters: vec![],
            workflow: Workflow {
                zero_cmd: format!("redirect stats --zero --netns {path}"),
                zero_out: format!("zeroed {path} (netns cookie 8193)"),
                traffic: "# 10 calls from the node: GET http://10.201.0.10:9080/productpage".into(),
                chain_cmd: format!("redirect stats --netns {path} --chain ISTIO_OUTPUT"),
                chain_out: render(&[pod], &listing, None, at + 1)
                    .trim_end()
                    .to_string(),
            },
        }
    }

    #[test]
    fn splice_replaces_only_the_block() {
        let text = format!("a\n{BEGIN} (regenerate: x) -->\nold\nlines\n{END}\nb\n");
        let new = splice(&text, "new\n").unwrap();
        assert_eq!(
            new,
            format!("a\n{BEGIN} (regenerate: x) -->\nnew\n{END}\nb\n")
        );
        assert_eq!(block(&new), Some("new\n"));
        assert!(splice("no markers", "x").is_err());
        assert!(splice(&format!("{END}\n{BEGIN} -->\n"), "x").is_err());
    }

    #[test]
    fn the_latency_table_has_every_ratio() {
        let md = markdown(&sample());
        assert!(
            md.contains("| no mesh | 1000 | 0.42 ms | 1.21 ms | 1.00 / 1.00 | 0.27 / 0.30 |"),
            "{md}"
        );
        assert!(
            md.contains(
                "| mesh on redirect | 1000 | 1.41 ms | 3.80 ms | 3.35 / 3.14 | 0.92 / 0.93 |"
            ),
            "{md}"
        );
        let t = latency_text(&sample());
        assert_eq!(t.lines().count(), 4, "{t}");
        assert!(
            t.contains("mesh on iptables   1000  1.53 ms  4.10 ms  3.64 / 3.39"),
            "{t}"
        );
    }

    #[test]
    fn shape_ignores_numbers_and_widths() {
        assert_eq!(shape("       20      2900 REDIRECT  x"), "# # REDIRECT x");
        assert_eq!(
            shape("| no mesh | 1000 | 0.42 ms |"),
            "| no mesh | # | #.# ms |"
        );
        assert_eq!(
            shape("acceleration: on"),
            shape("acceleration: off: probe failed")
        );
    }

    /// The README's block was written by the demo: same lines as this
    /// module writes, numbers aside. After a format change, regenerate it
    /// with `cargo xtask demo --bookinfo --update-readme`.
    #[test]
    fn readme_block_has_the_demos_format() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let readme = std::fs::read_to_string(root.join("README.md")).expect("README.md");
        let got =
            block(&readme).unwrap_or_else(|| panic!("README.md has no {BEGIN} ... {END} block"));
        let want = markdown(&sample());
        let (got, want): (Vec<String>, Vec<String>) = (
            got.lines().map(shape).collect(),
            want.lines().map(shape).collect(),
        );
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(
                g,
                w,
                "README.md's bookinfo-demo block, line {} differs from the demo's format; \
                 regenerate it: cargo xtask demo --bookinfo --update-readme",
                i + 1
            );
        }
        assert_eq!(
            got.len(),
            want.len(),
            "README.md's bookinfo-demo block has {} lines, the demo writes {}; \
             regenerate it: cargo xtask demo --bookinfo --update-readme",
            got.len(),
            want.len()
        );
    }
}
