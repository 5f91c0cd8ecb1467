//! The one text renderer of `redirect stats` (and of its `--watch`
//! frames). Its output for a fixed input is checked byte for byte by the
//! golden tests below, and docs/stats.md shows that same output.

use std::{collections::BTreeMap, fmt::Write as _};

use redirect_common::Reason;

use super::{listing::Listing, PodStats};

/// The values a draw showed, per (netns cookie, reason): what the next
/// `--watch` frame compares with to highlight what changed.
pub type Drawn = BTreeMap<(u64, Reason), (u64, u64)>;

/// What these pods' rows show now.
pub fn drawn(pods: &[PodStats]) -> Drawn {
    pods.iter()
        .flat_map(|p| {
            p.rules
                .iter()
                .map(move |r| ((p.netns_cookie, r.reason), (r.count, r.bytes)))
        })
        .collect()
}

/// Reverse video on/off around a changed value, as `watch -d` does.
const HIGHLIGHT_ON: &str = "\x1b[7m";
const HIGHLIGHT_OFF: &str = "\x1b[27m";
/// `--watch` on a terminal: the alternate screen, cursor hidden; and back.
pub const SCREEN_ENTER: &str = "\x1b[?1049h\x1b[?25l";
pub const SCREEN_LEAVE: &str = "\x1b[?25h\x1b[?1049l";

/// The pods' listed rows as text, laid out like `iptables -L -n -v`.
/// With `changed_since`, values that differ from that draw are
/// highlighted (ANSI reverse video). `now` (unix seconds) dates `--zero`.
pub fn render(
    pods: &[PodStats],
    listing: &Listing,
    changed_since: Option<&Drawn>,
    now: u64,
) -> String {
    let mut s = String::new();
    if pods.is_empty() {
        s.push_str("no captured pods\n");
    }
    for p in pods {
        let _ = writeln!(
            s,
            "Pod {} (netns cookie {})",
            p.netns.as_deref().unwrap_or("<no path found>"),
            p.netns_cookie
        );
        let _ = writeln!(s, "acceleration: {}", p.acceleration);
        for sec in listing.sections(p) {
            let zeroed = sec.rows.iter().filter_map(|r| r.zeroed_at).max();
            let _ = write!(s, "{}", sec.title);
            if let Some(at) = zeroed {
                let _ = write!(s, " [since --zero {} ago]", age(now.saturating_sub(at)));
            }
            s.push('\n');
            // The configured match comes last, like iptables' extra
            // column; the rule column is padded only when there is one.
            let has_match = sec.rows.iter().any(|r| !r.matches.is_empty());
            let width = sec
                .rows
                .iter()
                .map(|r| r.description.chars().count())
                .max()
                .unwrap_or(0);
            let tail = |rule: &str, m: &str| {
                if has_match {
                    let pad = width.saturating_sub(rule.chars().count());
                    format!("{rule}{} {m}", " ".repeat(pad))
                        .trim_end()
                        .to_string()
                } else {
                    rule.to_string()
                }
            };
            let _ = writeln!(
                s,
                "{:>9} {:>9} {:<9} {}",
                sec.unit,
                "bytes",
                "target",
                tail("rule", "match")
            );
            for r in &sec.rows {
                let before = changed_since.and_then(|d| d.get(&(p.netns_cookie, r.reason)));
                let count = cell(human(r.count), before.is_some_and(|b| b.0 != r.count));
                let bytes = if r.reason.counts_bytes() || r.bytes > 0 {
                    cell(human(r.bytes), before.is_some_and(|b| b.1 != r.bytes))
                } else {
                    cell("-".into(), false)
                };
                let _ = writeln!(
                    s,
                    "{count} {bytes} {:<9} {}",
                    r.target,
                    tail(r.description, &r.matches)
                );
            }
        }
        s.push('\n');
    }
    s
}

/// A value right-aligned in 9 columns, highlighted (the characters only,
/// not the padding) when it changed.
fn cell(v: String, changed: bool) -> String {
    let pad = " ".repeat(9usize.saturating_sub(v.chars().count()));
    if changed {
        format!("{pad}{HIGHLIGHT_ON}{v}{HIGHLIGHT_OFF}")
    } else {
        format!("{pad}{v}")
    }
}

/// iptables -v style: 1234, 12K, 3M.
fn human(n: u64) -> String {
    match n {
        0..=99_999 => n.to_string(),
        100_000..=99_999_999 => format!("{}K", n / 1000),
        _ => format!("{}M", n / 1_000_000),
    }
}

/// 5 s, 3 min, 2 h, 4 d.
fn age(secs: u64) -> String {
    match secs {
        0..=119 => format!("{secs} s"),
        120..=7_199 => format!("{} min", secs / 60),
        7_200..=172_799 => format!("{} h", secs / 3600),
        _ => format!("{} d", secs / 86_400),
    }
}

/// One `--watch` frame. On a terminal of `size` (rows, columns) it is
/// drawn over the previous one, cut to fit as `watch` does: cursor home,
/// each line cleared to its end, the rest of the screen cleared.
/// Otherwise (`None`) frames follow each other, a blank line apart.
pub fn frame(header: &str, body: &str, size: Option<(usize, usize)>) -> String {
    let Some((rows, cols)) = size else {
        return format!("{header}\n\n{body}\n");
    };
    let mut s = String::from("\x1b[H");
    let lines = std::iter::once(header)
        .chain(std::iter::once(""))
        .chain(body.lines());
    for (i, line) in lines.take(rows.max(1)).enumerate() {
        // No newline after the last row: it would scroll the screen.
        let end = if i + 1 == rows { "" } else { "\n" };
        let _ = write!(s, "{}\x1b[K{end}", fit(line, cols));
    }
    s.push_str("\x1b[J");
    s
}

/// A line cut to `cols` visible characters; escape sequences are kept
/// (a highlight cut in the middle is still turned off).
fn fit(line: &str, cols: usize) -> String {
    let mut out = String::new();
    let mut shown = 0;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            out.push(c);
            for d in chars.by_ref() {
                out.push(d);
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else if shown < cols {
            out.push(c);
            shown += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use redirect_common::{CounterValue, Reason};

    use super::*;
    use crate::{
        config::{AccelMode, PodSpec},
        probe::{describe, ProbeResult},
        stats::{rows, Baseline, Listing, PodStats},
    };

    /// The golden input: an Istio-injected pod after the demo's traffic
    /// (3 IPv4 + 3 IPv6 app connections through the proxy, one connection
    /// from outside), on a kernel whose acceleration probe failed.
    pub(crate) fn demo_pod(baselines: &BTreeMap<Reason, Baseline>) -> PodStats {
        let spec = PodSpec::istio_default();
        let c = |count, bytes| CounterValue { count, bytes };
        let counters: BTreeMap<Reason, CounterValue> = [
            (Reason::OutPassthrough, c(1, 0)),
            (Reason::OutProxyUid, c(6, 0)),
            (Reason::OutCaptured, c(6, 564)),
            (Reason::InCaptured, c(1, 0)),
            (Reason::OrigDstOutbound, c(6, 0)),
            (Reason::OrigDstInbound, c(1, 0)),
            (Reason::PeerNameRewritten, c(6, 0)),
        ]
        .into_iter()
        .collect();
        let probe = ProbeResult {
            passed: false,
            failed: vec!["blocking-read".into(), "flow-control".into()],
            at: 0,
        };
        PodStats {
            netns_cookie: 4164,
            netns: Some("/run/netns/demo".into()),
            acceleration: describe(AccelMode::Auto, false, Some(&probe)),
            rules: rows(&spec, &counters, baselines),
            spec,
        }
    }

    /// Compare with a golden file; `REDIRECT_BLESS=1` rewrites it.
    fn golden(name: &str, got: &str) {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("src/stats/golden")
            .join(name);
        if std::env::var_os("REDIRECT_BLESS").is_some() {
            std::fs::write(&path, got).unwrap();
        }
        let want = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (REDIRECT_BLESS=1 writes it)", path.display()));
        assert!(
            got == want,
            "{} differs (REDIRECT_BLESS=1 rewrites it):\n--- got\n{got}\n--- want\n{want}",
            path.display()
        );
    }

    #[test]
    fn golden_all_chains() {
        let pod = demo_pod(&BTreeMap::new());
        golden("all.txt", &render(&[pod], &Listing::All, None, 0));
    }

    #[test]
    fn golden_one_chain_after_zero() {
        // Zeroed 75 s ago at 6 outbound captures; 2 more since.
        let at = 1_000_000;
        let zero = |count| Baseline {
            count,
            bytes: 0,
            at,
        };
        let mut pod = demo_pod(
            &[
                (Reason::OutProxyToSelf, zero(0)),
                (Reason::InCaptured, zero(1)),
            ]
            .into_iter()
            .collect(),
        );
        let inbound = Listing::parse("ISTIO_IN_REDIRECT").unwrap();
        for r in &mut pod.rules {
            if r.reason == Reason::InCaptured {
                r.count_total += 2;
                r.count += 2;
            }
        }
        golden(
            "istio_in_redirect.txt",
            &render(&[pod], &inbound, None, at + 75),
        );
        assert_eq!(
            render(&[], &Listing::All, None, 0),
            "no captured pods\n",
            "nothing captured"
        );
    }

    #[test]
    fn watch_highlights_only_what_changed() {
        let before = demo_pod(&BTreeMap::new());
        let mut after = before.clone();
        for r in &mut after.rules {
            if r.reason == Reason::OutCaptured {
                r.count += 1;
                r.bytes += 94;
            }
            if r.reason == Reason::OrigDstOutbound {
                r.count += 1;
            }
        }
        let prev = drawn(std::slice::from_ref(&before));
        let text = render(
            std::slice::from_ref(&after),
            &Listing::Chain(redirect_common::reason::Chain::Output),
            Some(&prev),
            0,
        );
        let lit: Vec<&str> = text.lines().filter(|l| l.contains("\x1b[7m")).collect();
        assert_eq!(
            lit,
            vec!["        \x1b[7m7\x1b[27m       \x1b[7m658\x1b[27m REDIRECT  captured -> outbound port (-i)                                 dst 0.0.0.0/0,::/0"],
            "{text}"
        );
        // Nothing changed: nothing lit; no previous draw: nothing lit.
        let same = render(std::slice::from_ref(&before), &Listing::All, Some(&prev), 0);
        assert!(!same.contains('\x1b'), "{same}");
        assert_eq!(
            render(std::slice::from_ref(&before), &Listing::All, None, 0),
            same
        );
    }

    #[test]
    fn watch_frames_redraw_in_place_on_a_terminal_only() {
        let f = frame("Every 2s: redirect stats", "a\nbb\n", Some((24, 80)));
        assert_eq!(
            f,
            "\x1b[HEvery 2s: redirect stats\x1b[K\n\x1b[K\na\x1b[K\nbb\x1b[K\n\x1b[J"
        );
        assert_eq!(
            frame("Every 2s: redirect stats", "a\n", None),
            "Every 2s: redirect stats\n\na\n\n"
        );
        // Cut to the terminal: 3 rows of 4 columns, highlights kept whole.
        let f = frame("Every", "ab\x1b[7m123\x1b[27mcd\nnext\n", Some((3, 4)));
        assert_eq!(
            f,
            "\x1b[HEver\x1b[K\n\x1b[K\nab\x1b[7m12\x1b[27m\x1b[K\x1b[J"
        );
    }

    #[test]
    fn human_and_age() {
        assert_eq!(
            [0, 99_999, 100_000, 123_456_789].map(human),
            ["0", "99999", "100K", "123M"]
        );
        assert_eq!(
            [5, 130, 7_300, 200_000].map(age),
            ["5 s", "2 min", "2 h", "2 d"]
        );
    }

    /// docs/stats.md shows the golden output, unchanged.
    #[test]
    fn docs_sample_is_the_renderers_output() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let doc = std::fs::read_to_string(root.join("docs/stats.md")).expect("docs/stats.md");
        for (marker, file) in [
            ("<!-- golden: all.txt -->", "all.txt"),
            (
                "<!-- golden: istio_in_redirect.txt -->",
                "istio_in_redirect.txt",
            ),
        ] {
            let golden = std::fs::read_to_string(
                root.join("redirect-userspace/src/stats/golden").join(file),
            )
            .unwrap();
            let at = doc
                .find(marker)
                .unwrap_or_else(|| panic!("docs/stats.md has no {marker}"));
            let block = &doc[at..];
            let start = block
                .find("```text\n")
                .expect("```text block after the marker")
                + 8;
            let end = block[start..].find("```").expect("closing ```") + start;
            assert_eq!(
                &block[start..end],
                golden,
                "docs/stats.md's sample after {marker} is not the renderer's output (copy redirect-userspace/src/stats/golden/{file})"
            );
        }
    }
}
