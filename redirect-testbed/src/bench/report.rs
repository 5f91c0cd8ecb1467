//! The benchmark report: markdown tables (absolute numbers, ratios to C,
//! median and min–max over the repetitions), the targets met or missed and
//! why, the path checks, and two SVG plots.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use hdrhistogram::Histogram;

use super::{
    hist,
    model::{Cfg, Place, ProxyKind, Run, Sample, Test, ECHO_PORT},
    svg,
};

/// (year, month, day, hour, minute, second) in UTC.
fn utc_parts() -> (i64, u32, u32, u32, u32, u32) {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (
        y,
        m,
        d,
        (rem / 3600) as u32,
        (rem / 60 % 60) as u32,
        (rem % 60) as u32,
    )
}

pub fn utc_now() -> String {
    let (y, m, d, h, mi, s) = utc_parts();
    format!("{y:04}-{m:02}-{d:02} {h:02}:{mi:02}:{s:02} UTC")
}

fn stamp() -> String {
    let (y, m, d, h, mi, s) = utc_parts();
    format!("{y:04}{m:02}{d:02}-{h:02}{mi:02}{s:02}")
}

/// Median and range over repetitions.
#[derive(Clone, Copy, Debug)]
pub struct Agg {
    pub med: f64,
    pub min: f64,
    pub max: f64,
}

impl Agg {
    pub(super) fn of(mut v: Vec<f64>) -> Option<Agg> {
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let med = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Agg {
            med,
            min: v[0],
            max: v[n - 1],
        })
    }

    /// Ranges overlap: the difference is within the run-to-run spread.
    fn overlaps(&self, o: &Agg) -> bool {
        self.min <= o.max && o.min <= self.max
    }
}

#[derive(Clone, Copy)]
enum Metric {
    P50,
    P99,
    P999,
    Rate,
    Gbit,
    CpuPerGb,
}

impl Metric {
    fn get(self, s: &Sample) -> f64 {
        match self {
            Metric::P50 => s.p50_us,
            Metric::P99 => s.p99_us,
            Metric::P999 => s.p999_us,
            Metric::Rate => s.rate,
            Metric::Gbit => s.gbit_s,
            Metric::CpuPerGb => s.cpu_s_per_gb,
        }
    }
}

struct View<'a> {
    run: &'a Run,
}

impl View<'_> {
    fn agg(&self, cfg: Cfg, place: Place, test: Test, rules: usize, m: Metric) -> Option<Agg> {
        Agg::of(
            self.run
                .samples
                .iter()
                .filter(|s| s.cfg == cfg && s.place == place && s.test == test && s.rules == rules)
                .map(|s| m.get(s))
                .collect(),
        )
    }

    /// Median ratio cfg/C and whether it is beyond the spread.
    fn ratio(
        &self,
        cfg: Cfg,
        place: Place,
        test: Test,
        rules: usize,
        m: Metric,
    ) -> Option<(f64, bool)> {
        let (a, c) = (
            self.agg(cfg, place, test, rules, m)?,
            self.agg(Cfg::C, place, test, rules, m)?,
        );
        (c.med > 0.0).then(|| (a.med / c.med, !a.overlaps(&c)))
    }

    fn merged(&self, cfg: Cfg, place: Place, test: Test) -> Histogram<u64> {
        let mut h = hist::new();
        for s in self
            .run
            .samples
            .iter()
            .filter(|s| s.cfg == cfg && s.place == place && s.test == test && s.rules == 0)
        {
            let _ = h.add(hist::from_buckets(&s.hist));
        }
        h
    }

    fn accel_active(&self) -> bool {
        self.run.accel.values().any(|v| *v > 0)
    }

    /// One app↔proxy leg variant (samples of the leg environments).
    fn leg(&self, l: Leg, place: Place, m: Metric) -> Option<Agg> {
        let (cfg, test) = l.key();
        self.agg(cfg, place, test, 0, m)
    }

    fn leg_accel_active(&self) -> bool {
        self.run.leg_accel.values().any(|v| *v > 0)
    }
}

/// The variants of the app↔proxy leg measurement (issue 4: "app↔proxy
/// round trip no slower than an AF_UNIX round trip"): app (uid 1000) ↔ an
/// echo standing in for the proxy (uid 1337) in the pod netns, 64 B
/// request/response on one connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Leg {
    /// Through capture, acceleration forced on (`--accel`).
    E,
    /// Through capture, no acceleration (`--no-accel`).
    D,
    /// AF_UNIX stream pair between the same two processes.
    Unix,
    /// Plain loopback TCP to 127.0.0.1:15001, no capture (reference).
    Tcp,
}

impl Leg {
    pub const ALL: [Leg; 4] = [Leg::E, Leg::D, Leg::Unix, Leg::Tcp];

    /// Where its samples are: (configuration of the leg environment, test).
    fn key(self) -> (Cfg, Test) {
        match self {
            Leg::E => (Cfg::E, Test::Leg64),
            Leg::D => (Cfg::D, Test::Leg64),
            Leg::Unix => (Cfg::A, Test::Unix64),
            Leg::Tcp => (Cfg::A, Test::Leg64),
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Leg::E => "E: TCP through capture, acceleration **forced on** (`--accel`)",
            Leg::D => "D: TCP through capture, no acceleration (`--no-accel`)",
            Leg::Unix => "AF_UNIX stream pair, same two processes",
            Leg::Tcp => "loopback TCP to 127.0.0.1:15001, no capture (reference)",
        }
    }
}

/// The verdict of "E leg p50 ≤ AF_UNIX p50", with the spread rule of the
/// ratio targets: met or missed only when the two min–max ranges do not
/// overlap, otherwise no result.
fn leg_verdict(e: &Agg, unix: &Agg) -> Verdict {
    match (e.med <= unix.med, !e.overlaps(unix)) {
        (true, true) => Verdict::Met,
        (_, false) => Verdict::NoResult,
        (false, true) => Verdict::Missed,
    }
}

/// Why E's leg is not at AF_UNIX's p50 (medians in µs), in terms of the
/// other variants of the same run.
fn why_leg(
    e: f64,
    unix: f64,
    d: Option<f64>,
    tcp: Option<f64>,
    accel_active: bool,
    accel_rows: bool,
) -> String {
    let mut why = Vec::new();
    if !accel_active {
        why.push(if accel_rows {
            "acceleration was not active in the leg (its ACCEL counters stayed at 0), so E ran as D".to_string()
        } else {
            "acceleration is not in this build (no ACCEL counters in `redirect stats`), so E ran as D".to_string()
        });
    }
    let mut line = format!(
        "E's round trip is {} µs against AF_UNIX's {} µs ({}{})",
        num(e),
        num(unix),
        if e < unix { "−" } else { "+" },
        num((e - unix).abs())
    );
    let saved = accel_active && d.is_some_and(|d| d > e);
    if let Some(d) = d {
        let _ = write!(
            line,
            "; D, the same capture over loopback TCP, is at {} µs",
            num(d)
        );
        if saved {
            let _ = write!(
                line,
                ", so acceleration took {} µs off the TCP/IP stack",
                num(d - e)
            );
        } else if accel_active {
            line.push_str(", so this run shows no saving from acceleration in this placement");
        }
    }
    if let Some(t) = tcp {
        let _ = write!(
            line,
            "; plain loopback TCP without capture is at {} µs",
            num(t)
        );
    }
    why.push(line);
    if saved && e > unix {
        why.push(
            "what is left is tcp_bpf's own path per message (tcp_bpf_sendmsg copies the data into an sk_msg and queues it on the peer's psock, taking both sockets' locks; tcp_bpf_recvmsg reads it from there) against AF_UNIX's one skb queued straight on the peer; our sk_msg program runs once per 16 KiB of a socket's messages, not per message"
                .to_string(),
        );
    }
    why.join("; ")
}

fn leg_target(v: &View, place: Place) -> Option<Target> {
    let (e, unix) = (
        v.leg(Leg::E, place, Metric::P50)?,
        v.leg(Leg::Unix, place, Metric::P50)?,
    );
    let verdict = leg_verdict(&e, &unix);
    let why = || {
        let med = |l: Leg| v.leg(l, place, Metric::P50).map(|a| a.med);
        why_leg(
            e.med,
            unix.med,
            med(Leg::D),
            med(Leg::Tcp),
            v.leg_accel_active(),
            v.run.leg_accel_rows_present,
        )
    };
    let why = match verdict {
        Verdict::Met => String::new(),
        Verdict::NoResult => format!(
            "E and AF_UNIX overlap run to run ({}–{} vs {}–{} µs); {}",
            num(e.min),
            num(e.max),
            num(unix.min),
            num(unix.max),
            why()
        ),
        Verdict::Missed => why(),
    };
    let value = if unix.med > 0.0 {
        format!(
            "{} vs {} µs ({:.2}×)",
            num(e.med),
            num(unix.med),
            e.med / unix.med
        )
    } else {
        format!("{} vs {} µs", num(e.med), num(unix.med))
    };
    Some(Target {
        name: "E app↔proxy RR 64 B p50 ≤ AF_UNIX RR p50".into(),
        value,
        verdict,
        why,
    })
}

fn leg_table(v: &View, place: Place, out: &mut String) {
    let _ = writeln!(
        out,
        "| variant | p50 (µs) | p99 (µs) | p99.9 (µs) | p50 / AF_UNIX |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|");
    let unix = v.leg(Leg::Unix, place, Metric::P50);
    for l in Leg::ALL {
        let p50 = v.leg(l, place, Metric::P50);
        let ratio = match (p50, unix) {
            _ if l == Leg::Unix => "1 (reference)".into(),
            (Some(a), Some(u)) if u.med > 0.0 => ratio_cell(Some((a.med / u.med, !a.overlaps(&u)))),
            _ => "–".into(),
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {ratio} |",
            l.describe(),
            cell(p50),
            cell(v.leg(l, place, Metric::P99)),
            cell(v.leg(l, place, Metric::P999))
        );
    }
}

/// 3 significant digits, thousands grouped for large values.
fn num(v: f64) -> String {
    if v >= 10_000.0 {
        let s = format!("{:.0}", v);
        let mut out = String::new();
        for (i, ch) in s.chars().enumerate() {
            if i > 0 && (s.len() - i) % 3 == 0 {
                out.push('\u{202f}');
            }
            out.push(ch);
        }
        out
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn cell(a: Option<Agg>) -> String {
    match a {
        Some(a) => format!("{} ({}–{})", num(a.med), num(a.min), num(a.max)),
        None => "–".into(),
    }
}

fn ratio_cell(r: Option<(f64, bool)>) -> String {
    match r {
        Some((r, true)) => format!("{r:.2}×"),
        Some((r, false)) => format!("{r:.2}× n.r."),
        None => "–".into(),
    }
}

const ROWS: [(&str, Test, Metric); 17] = [
    ("RR 64 B p50 (µs)", Test::Rr64, Metric::P50),
    ("RR 64 B p99 (µs)", Test::Rr64, Metric::P99),
    ("RR 64 B p99.9 (µs)", Test::Rr64, Metric::P999),
    ("RR 1 KiB p50 (µs)", Test::Rr1k, Metric::P50),
    ("RR 1 KiB p99 (µs)", Test::Rr1k, Metric::P99),
    ("RR 1 KiB p99.9 (µs)", Test::Rr1k, Metric::P999),
    ("RR 16 KiB p50 (µs)", Test::Rr16k, Metric::P50),
    ("RR 16 KiB p99 (µs)", Test::Rr16k, Metric::P99),
    ("RR 16 KiB p99.9 (µs)", Test::Rr16k, Metric::P999),
    ("connections/s", Test::Conn, Metric::Rate),
    ("connection p50 (µs)", Test::Conn, Metric::P50),
    ("connection p99 (µs)", Test::Conn, Metric::P99),
    ("bulk (Gbit/s)", Test::Bulk, Metric::Gbit),
    (
        "bulk CPU (s per GB: client + proxy + server)",
        Test::Bulk,
        Metric::CpuPerGb,
    ),
    ("open loop p50 (µs)", Test::Open, Metric::P50),
    ("open loop p99 (µs)", Test::Open, Metric::P99),
    ("open loop p99.9 (µs)", Test::Open, Metric::P999),
];

fn results_table(v: &View, place: Place, out: &mut String) {
    let _ = writeln!(
        out,
        "| metric | A | B | C | D | E | A/C | B/C | D/C | E/C |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|");
    for (label, test, m) in ROWS {
        let label = if test == Test::Open {
            label.replace(
                "open loop",
                &format!("open loop {}/s", num(v.run.settings.open_rate as f64)),
            )
        } else {
            label.to_string()
        };
        let mut line = format!("| {label} |");
        for c in Cfg::ALL {
            let _ = write!(line, " {} |", cell(v.agg(c, place, test, 0, m)));
        }
        for c in [Cfg::A, Cfg::B, Cfg::D, Cfg::E] {
            let _ = write!(line, " {} |", ratio_cell(v.ratio(c, place, test, 0, m)));
        }
        let _ = writeln!(out, "{line}");
    }
}

fn rules_label(n: usize) -> String {
    if n >= 1000 && n.is_multiple_of(1000) {
        format!("{}k", n / 1000)
    } else {
        n.to_string()
    }
}

fn scaling_table(v: &View, place: Place, out: &mut String) {
    let counts: Vec<usize> = std::iter::once(0)
        .chain(v.run.settings.rule_counts.iter().copied())
        .collect();
    let mut head = "| connections/s |".to_string();
    let mut sep = "|---|".to_string();
    for n in &counts {
        let _ = write!(head, " {} |", rules_label(*n));
        sep.push_str("---|");
    }
    let last = *counts.last().unwrap_or(&0);
    let _ = writeln!(
        out,
        "{head} {} vs 0 | p50 µs at 0 → {} |",
        rules_label(last),
        rules_label(last)
    );
    let _ = writeln!(out, "{sep}---|---|");
    for c in Cfg::SCALED {
        let mut line = format!("| {c:?} |");
        for n in &counts {
            let _ = write!(
                line,
                " {} |",
                cell(v.agg(c, place, Test::Conn, *n, Metric::Rate))
            );
        }
        let (z, l) = (
            v.agg(c, place, Test::Conn, 0, Metric::Rate),
            v.agg(c, place, Test::Conn, last, Metric::Rate),
        );
        let change = match (z, l) {
            (Some(z), Some(l)) if z.med > 0.0 => format!(
                "{:+.1} %{}",
                (l.med / z.med - 1.0) * 100.0,
                if z.overlaps(&l) { " n.r." } else { "" }
            ),
            _ => "–".into(),
        };
        let (pz, pl) = (
            v.agg(c, place, Test::Conn, 0, Metric::P50),
            v.agg(c, place, Test::Conn, last, Metric::P50),
        );
        let lat = match (pz, pl) {
            (Some(a), Some(b)) => format!("{} → {}", num(a.med), num(b.med)),
            _ => "–".into(),
        };
        let _ = writeln!(out, "{line} {change} | {lat} |");
    }
}

#[derive(PartialEq)]
enum Verdict {
    Met,
    Missed,
    NoResult,
}

impl Verdict {
    fn word(&self) -> &'static str {
        match self {
            Verdict::Met => "**met**",
            Verdict::Missed => "**missed**",
            Verdict::NoResult => "**no result**",
        }
    }
}

struct Target {
    name: String,
    value: String,
    verdict: Verdict,
    why: String,
}

/// Why a D/E-vs-C ratio target was missed, in terms of the floors the
/// run measured: B (the same proxy with no capture at all) bounds what
/// removing iptables can give; A (no proxy) bounds what acceleration can.
fn why_ratio(
    v: &View,
    cfg: Cfg,
    place: Place,
    test: Test,
    m: Metric,
    need: f64,
    lower_is_better: bool,
) -> String {
    let mut why = Vec::new();
    if cfg == Cfg::E && !v.accel_active() {
        why.push(if v.run.accel_rows_present {
            "acceleration was not active (its ACCEL counters stayed at 0), so E ran as D".to_string()
        } else {
            "acceleration is not in this build (no ACCEL counters in `redirect stats`), so E ran as D".to_string()
        });
    }
    let r = |c: Cfg| v.ratio(c, place, test, 0, m).map(|(r, _)| r);
    let beyond = |x: f64| if lower_is_better { x > need } else { x < need };
    if let (Some(a), Some(b), Some(x)) = (r(Cfg::A), r(Cfg::B), r(cfg)) {
        if cfg == Cfg::D && beyond(b) {
            why.push(format!(
                "D's data path is B's (app → loopback TCP → proxy → upstream) minus nothing: B, the proxy addressed directly with no capture at all, reaches only {b:.2}× of C, so removing the iptables/conntrack work cannot reach {need}×; the rest of C is the proxy's own cost (two extra TCP legs and its wake-ups)"
            ));
        } else if cfg == Cfg::D {
            let p50 = |c: Cfg| v.agg(c, place, test, 0, Metric::P50).map(|a| a.med);
            let extra = match (p50(Cfg::D), p50(Cfg::B)) {
                (Some(d), Some(b)) => format!(" (p50 {} µs over B's {} µs)", num(d - b), num(b)),
                _ => String::new(),
            };
            why.push(format!(
                "B (no capture) is at {b:.2}× of C but D at {x:.2}×: what separates D from the target is the cost of its own hooks{extra}, i.e. connect4, the sockops callbacks at both handshakes and both closes, the getsockopt answer and their map updates"
            ));
        } else if r(Cfg::D).is_some_and(|d| if lower_is_better { x > d } else { x < d }) {
            let cpu = |c: Cfg| {
                v.agg(c, place, Test::Bulk, 0, Metric::CpuPerGb)
                    .map(|a| num(a.med))
                    .unwrap_or_default()
            };
            let d = r(Cfg::D).unwrap_or(0.0);
            why.push(if test == Test::Bulk {
                format!(
                    "acceleration makes this worse: E is at {x:.2}× of C, D (same hooks, no sk_msg) at {d:.2}×; E spends {} CPU s/GB against D's {}: sk_msg redirection into the proxy's ingress queue moves large transfers less efficiently than loopback TCP with GSO/GRO on this kernel",
                    cpu(Cfg::E),
                    cpu(Cfg::D)
                )
            } else {
                format!("E is at {x:.2}× of C, behind D (same hooks, no sk_msg) at {d:.2}×: here acceleration did not pay")
            });
        } else {
            why.push(format!(
                "E is at {x:.2}× of C, B (proxy, no capture) at {b:.2}×, A (no proxy at all) at {a:.2}×: acceleration removes the app↔proxy TCP leg, not the proxy's relay work (its wake-ups, copies and the upstream leg), which is what stands between E and {need}×"
            ));
        }
    }
    why.join("; ")
}

fn targets(v: &View, place: Place) -> Vec<Target> {
    let mut t = Vec::new();
    let mut ratio_target =
        |name: String, cfg: Cfg, test: Test, m: Metric, need: f64, lower: bool| {
            let Some((r, beyond)) = v.ratio(cfg, place, test, 0, m) else {
                return;
            };
            let ok = if lower { r <= need } else { r >= need };
            let verdict = match (ok, beyond) {
                (true, true) => Verdict::Met,
                (_, false) => Verdict::NoResult,
                (false, true) => Verdict::Missed,
            };
            let why = match verdict {
                Verdict::Met => String::new(),
                Verdict::NoResult => format!(
                    "{cfg:?} and C overlap run to run; {}",
                    why_ratio(v, cfg, place, test, m, need, lower)
                ),
                Verdict::Missed => why_ratio(v, cfg, place, test, m, need, lower),
            };
            t.push(Target {
                name,
                value: format!("{r:.2}×"),
                verdict,
                why,
            });
        };
    ratio_target(
        "D connection rate ≥ 1.25× C".into(),
        Cfg::D,
        Test::Conn,
        Metric::Rate,
        1.25,
        false,
    );
    for (test, size) in [
        (Test::Rr64, "64 B"),
        (Test::Rr1k, "1 KiB"),
        (Test::Rr16k, "16 KiB"),
    ] {
        ratio_target(
            format!("D RR {size} p50 ≤ 0.9× C"),
            Cfg::D,
            test,
            Metric::P50,
            0.9,
            true,
        );
    }
    for (test, size) in [
        (Test::Rr64, "64 B"),
        (Test::Rr1k, "1 KiB"),
        (Test::Rr16k, "16 KiB"),
    ] {
        ratio_target(
            format!("E RR {size} p50 ≤ 0.75× C"),
            Cfg::E,
            test,
            Metric::P50,
            0.75,
            true,
        );
    }
    ratio_target(
        "E bulk ≥ 1.5× C".into(),
        Cfg::E,
        Test::Bulk,
        Metric::Gbit,
        1.5,
        false,
    );

    // Rule-count scaling.
    if let Some(&last) = v.run.settings.rule_counts.last() {
        let change = |c: Cfg| -> Option<(f64, bool, Agg, Agg)> {
            let (z, l) = (
                v.agg(c, place, Test::Conn, 0, Metric::Rate)?,
                v.agg(c, place, Test::Conn, last, Metric::Rate)?,
            );
            Some((l.med / z.med - 1.0, z.overlaps(&l), z, l))
        };
        for c in [Cfg::D, Cfg::E] {
            if let Some((ch, overlap, _, _)) = change(c) {
                let verdict = if ch.abs() <= 0.05 {
                    Verdict::Met
                } else if overlap {
                    Verdict::NoResult
                } else {
                    Verdict::Missed
                };
                let why = match verdict {
                    Verdict::Met => String::new(),
                    Verdict::NoResult => format!("the {:+.1} % change is within the run-to-run spread at 0 and {} entries: the lookup is one LPM-trie walk whatever the size, so this is noise, but the run cannot show it", ch * 100.0, rules_label(last)),
                    Verdict::Missed => format!("{c:?} changed by {:+.1} % beyond the run-to-run spread", ch * 100.0),
                };
                t.push(Target {
                    name: format!(
                        "{c:?} connection rate within 5 % from 0 to {} exclusion entries",
                        rules_label(last)
                    ),
                    value: format!("{:+.1} %", ch * 100.0),
                    verdict,
                    why,
                });
            }
        }
        if let Some((ch, overlap, _, _)) = change(Cfg::C) {
            let degrades = ch < -0.05 && !overlap;
            t.push(Target {
                name: format!("… while C degrades with {} extra rules", rules_label(last)),
                value: format!("{:+.1} %", ch * 100.0),
                verdict: if degrades {
                    Verdict::Met
                } else if overlap {
                    Verdict::NoResult
                } else {
                    Verdict::Missed
                },
                why: if degrades {
                    String::new()
                } else {
                    "C's rate did not fall beyond the spread".into()
                },
            });
        }
    }

    // No configuration's p99 worse than C's.
    let mut worse = Vec::new();
    for test in [Test::Rr64, Test::Rr1k, Test::Rr16k, Test::Conn, Test::Open] {
        let Some(c) = v.agg(Cfg::C, place, test, 0, Metric::P99) else {
            continue;
        };
        for cfg in [Cfg::A, Cfg::B, Cfg::D, Cfg::E] {
            if let Some(a) = v.agg(cfg, place, test, 0, Metric::P99) {
                if a.med > c.med && !a.overlaps(&c) {
                    worse.push(format!(
                        "{cfg:?} {}: {} µs vs C {} µs",
                        test.describe(),
                        num(a.med),
                        num(c.med)
                    ));
                }
            }
        }
    }
    t.extend(leg_target(v, place));
    // Issue 4: acceleration must not make the connection-rate tail worse.
    if let (Some(e), Some(d)) = (
        v.agg(Cfg::E, place, Test::Conn, 0, Metric::P99),
        v.agg(Cfg::D, place, Test::Conn, 0, Metric::P99),
    ) {
        let verdict = if e.med <= d.med {
            Verdict::Met
        } else if e.overlaps(&d) {
            Verdict::NoResult
        } else {
            Verdict::Missed
        };
        let why = match verdict {
            Verdict::Met => String::new(),
            Verdict::NoResult => format!("E {} µs against D {} µs, within the run-to-run spread", num(e.med), num(d.med)),
            Verdict::Missed => format!("E {} µs against D {} µs: each accelerated connection sets up and tears down a psock per socket (docs/acceleration.md); connections to a port whose last 4 lived under 10 ms are left out, so E should match D unless its connections were accelerated anyway", num(e.med), num(d.med)),
        };
        t.push(Target {
            name: "E connection p99 no worse than D's".into(),
            value: format!("{:.2}×", e.med / d.med),
            verdict,
            why,
        });
    }
    t.push(Target {
        name: "no configuration's p99 worse than C's".into(),
        value: if worse.is_empty() { "none worse".into() } else { format!("{} worse", worse.len()) },
        verdict: if worse.is_empty() { Verdict::Met } else { Verdict::Missed },
        why: if worse.is_empty() {
            String::new()
        } else {
            format!("{} (beyond the spread: the runs' p99 ranges do not overlap). A p99 here is set by a few scheduler or softirq stalls per second on a shared 2-vCPU VM", worse.join("; "))
        },
    });
    t
}

fn cdf_points(h: &Histogram<u64>) -> Vec<(f64, f64)> {
    let n = h.len();
    if n == 0 {
        return Vec::new();
    }
    let qmax = 1.0 - 1.0 / n as f64;
    let mut pts = Vec::new();
    let mut y = 0.0;
    while y <= 4.0 + 1e-9 {
        let q = 1.0 - 10f64.powf(-y);
        if q > qmax {
            break;
        }
        pts.push((hist::us(h, q), q));
        y += 0.04;
    }
    pts.push((hist::us(h, qmax.max(0.0)), qmax));
    pts
}

fn plots(v: &View) -> (String, String) {
    let mut panels = Vec::new();
    for test in [Test::Rr64, Test::Open] {
        for place in &v.run.settings.places {
            let series = Cfg::ALL
                .iter()
                .map(|c| svg::Series {
                    label: format!("{c:?}: {}", short(*c)),
                    color: c.color().into(),
                    dashed: false,
                    points: cdf_points(&v.merged(*c, *place, test)),
                    err: Vec::new(),
                })
                .collect();
            let what = if test == Test::Open {
                format!(
                    "open loop 64 B at {}/s",
                    num(v.run.settings.open_rate as f64)
                )
            } else {
                test.describe().to_string()
            };
            panels.push(svg::Panel {
                title: format!("{what}, {}", place.short()),
                series,
            });
        }
    }
    let cols = v.run.settings.places.len();
    let cdf = svg::cdf(
        "Latency CDF per configuration (all samples of all repetitions)",
        &panels,
        cols,
    );

    let counts: Vec<usize> = std::iter::once(0)
        .chain(v.run.settings.rule_counts.iter().copied())
        .collect();
    let labels: Vec<String> = counts.iter().map(|n| rules_label(*n)).collect();
    let mut panels = Vec::new();
    for place in &v.run.settings.places {
        let mut series = Vec::new();
        for c in Cfg::SCALED {
            let aggs: Vec<(usize, Agg)> = counts
                .iter()
                .enumerate()
                .filter_map(|(i, n)| Some((i, v.agg(c, *place, Test::Conn, *n, Metric::Rate)?)))
                .collect();
            series.push(svg::Series {
                label: format!("{c:?}: {}", short(c)),
                color: c.color().into(),
                dashed: false,
                points: aggs.iter().map(|(i, a)| (*i as f64, a.med)).collect(),
                err: aggs.iter().map(|(_, a)| (a.min, a.max)).collect(),
            });
        }
        for c in [Cfg::A, Cfg::B] {
            if let Some(a) = v.agg(c, *place, Test::Conn, 0, Metric::Rate) {
                series.push(svg::Series {
                    label: format!("{c:?}: {} (0 rules)", short(c)),
                    color: c.color().into(),
                    dashed: true,
                    points: vec![(0.0, a.med)],
                    err: Vec::new(),
                });
            }
        }
        panels.push(svg::Panel {
            title: place.short().to_string(),
            series,
        });
    }
    let rate = svg::rate(
        "Connection rate vs rule count (median, bars: min–max)",
        &labels,
        "connections/s",
        &panels,
    );
    (cdf, rate)
}

fn short(c: Cfg) -> &'static str {
    match c {
        Cfg::A => "no proxy",
        Cfg::B => "proxy direct",
        Cfg::C => "iptables",
        Cfg::D => "eBPF",
        Cfg::E => "eBPF + accel",
    }
}

fn counters(m: &std::collections::BTreeMap<String, u64>) -> String {
    m.iter()
        .map(|(k, n)| format!("{k} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn sandbox_upstream() -> String {
    format!("{}:{}", crate::sandbox::UPSTREAM_V4, ECHO_PORT)
}

fn git_commit() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

pub fn markdown(run: &Run) -> String {
    let v = View { run };
    let s = &run.settings;
    let mut o = String::new();
    let _ = writeln!(o, "# Benchmark: eBPF redirect vs Istio's iptables rules\n");
    let proxy = match s.proxy {
        ProxyKind::Kit => "the workspace's event-loop sidecar (`redirect-kit bench-proxy`)",
        ProxyKind::Haproxy => "Debian's haproxy (`server 0.0.0.0:0`, SO_ORIGINAL_DST), one thread",
    };
    let _ = writeln!(
        o,
        "- Run: {} ({}), {:.0} s, commit {}",
        run.started,
        if s.quick {
            "quick smoke run: too short to trust the numbers"
        } else {
            "full run"
        },
        run.elapsed_s,
        git_commit()
    );
    let _ = writeln!(o, "- Machine: {}", run.machine.describe());
    let _ = writeln!(o, "- Sidecar proxy in B–E: {proxy}");
    let _ = writeln!(
        o,
        "- {} measured repetitions, interleaved A B C D E (then C D E per rule count, then the app↔proxy leg's A D E){}; each measurement {} ms after a {} ms warm-up that is discarded",
        s.reps,
        if s.warmup_round { ", after one whole warm-up round that is discarded" } else { "" },
        s.duration_ms,
        s.warmup_ms
    );
    let _ = writeln!(
        o,
        "- Load average (1, 5, 15 min) before: {}, after: {}",
        run.load_before, run.load_after
    );
    let accel = if v.accel_active() {
        format!("**active** in E (ACCEL counters: {})", counters(&run.accel))
    } else if run.accel_rows_present {
        "**not active**: E's ACCEL counters stayed at 0, so E measured the same path as D".into()
    } else {
        "**not in this build**: `redirect stats` has no ACCEL counters, so E measured the same path as D".into()
    };
    let _ = writeln!(o, "- Acceleration (sockops/sk_msg): {accel}");
    let leg_accel = if v.leg_accel_active() {
        format!("**active** (ACCEL counters: {})", counters(&run.leg_accel))
    } else if run.leg_accel_rows_present {
        "**not active**: its ACCEL counters stayed at 0, so E measured D's path".into()
    } else {
        "**not in this build** (no ACCEL counters)".into()
    };
    let _ = writeln!(o, "- Acceleration is **forced on** in E (`redirect attach --accel`), whatever the kernel probe says: by default it follows the probe, which fails on Linux 6.18 (docs/acceleration.md), so a default attach there has it off. In the app↔proxy leg's E: {leg_accel}");
    let failed: Vec<_> = run.checks.iter().filter(|c| !c.ok).collect();
    let _ = writeln!(
        o,
        "- Path checks: {} of {} passed{}\n",
        run.checks.len() - failed.len(),
        run.checks.len(),
        if failed.is_empty() {
            ""
        } else {
            " — **see Path checks below**"
        }
    );

    let _ = writeln!(o, "Cells are the median over the repetitions with the min–max range in brackets. Ratios are medians over C's median; \"n.r.\" (no result) marks a difference smaller than the run-to-run spread (the two min–max ranges overlap). Latencies are from HDR histograms of every sample.\n");

    let _ = writeln!(o, "## Targets\n");
    let _ = writeln!(o, "| placement | target | measured | verdict | why |");
    let _ = writeln!(o, "|---|---|---|---|---|");
    for p in &s.places {
        for t in targets(&v, *p) {
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} | {} |",
                p.short(),
                t.name,
                t.value,
                t.verdict.word(),
                t.why
            );
        }
    }
    o.push('\n');

    for p in &s.places {
        let _ = writeln!(o, "## Results: {}\n", p.describe());
        results_table(&v, *p, &mut o);
        o.push('\n');
    }

    let _ = writeln!(o, "## App↔proxy leg\n");
    let _ = writeln!(
        o,
        "The hop acceleration replaces, alone: the app (uid 1000, pod netns and cgroup) and an echo standing in for the proxy (uid/gid 1337, pod netns and cgroup, listening on :15001 and on an abstract AF_UNIX name), 64 B request/response on one connection, closed loop, same durations and placements as above (the echo where the proxy is). E and D: fresh pods captured with `--accel` / `--no-accel`, the app addressing {} so that capture takes it to the echo; AF_UNIX and loopback TCP: a pod without capture. Interleaved after the main configurations in every repetition (A, D, E leg environments). Target (issue 4): E's p50 no higher than AF_UNIX's.\n",
        sandbox_upstream()
    );
    for p in &s.places {
        let _ = writeln!(o, "### {}\n", p.describe());
        leg_table(&v, *p, &mut o);
        o.push('\n');
    }

    let _ = writeln!(o, "## Rule-count scaling\n");
    let _ = writeln!(o, "Connection rate with extra never-matching `-d 198.18.x.y/32 -j RETURN` rules in C's ISTIO_OUTPUT (where istio-iptables puts `-x` exclusions: every app connection walks them before the REDIRECT), and the same addresses as `-x` exclusion entries in D and E.\n");
    for p in &s.places {
        let _ = writeln!(o, "### {}\n", p.describe());
        scaling_table(&v, *p, &mut o);
        o.push('\n');
    }

    let _ = writeln!(o, "## Plots\n");
    let _ = writeln!(o, "![latency CDF](latency-cdf.svg)\n");
    let _ = writeln!(
        o,
        "![connection rate vs rule count](conn-rate-vs-rules.svg)\n"
    );

    let _ = writeln!(o, "## Path checks\n");
    let _ = writeln!(o, "After every configuration: our counters (`redirect stats`: OUTPUT/captured must equal the app's connections, no exclusion hit, ACCEL rows), the iptables counters (the REDIRECT rule counted at least one packet per app connection), the proxy's own counts (SO_ORIGINAL_DST answers or fixed-upstream connections equal the app's connections), no stray rules (no nat rules in D/E; no iptables-legacy rules anywhere), and no BPF effective on the pod's cgroup or linked to its netns in A, B and C. The app↔proxy leg's environments (\"leg\") get the same checks, with the echo's accepted connections (TCP and AF_UNIX) in place of the proxy's counts.\n");
    let _ = writeln!(o, "| rep | config | rules | ok | detail |");
    let _ = writeln!(o, "|---|---|---|---|---|");
    let mut shown = 0;
    for c in &run.checks {
        // All failures, and every check of the first repetition as a sample.
        if !c.ok || c.rep == 1 {
            let _ = writeln!(
                o,
                "| {} | {:?}{} | {} | {} | {} |",
                c.rep,
                c.cfg,
                if c.leg { " leg" } else { "" },
                c.rules,
                if c.ok { "yes" } else { "**NO**" },
                c.detail.replace('|', "/")
            );
            shown += 1;
        }
    }
    if shown < run.checks.len() {
        let _ = writeln!(
            o,
            "\n({} further checks passed; all are in `checks.json`.)",
            run.checks.len() - shown
        );
    }
    o.push('\n');

    let _ = writeln!(o, "## Configurations and method\n");
    for c in Cfg::ALL {
        let _ = writeln!(o, "- **{c:?}**: {}", c.describe());
    }
    let _ = writeln!(
        o,
        "\nTopology: a pod netns and an upstream netns joined by veth (10.200.0.2 ↔ 10.200.0.1), a child cgroup for the pod, all created for each configuration of each repetition and removed after it. The app (load generator) runs as uid 1000 in the pod netns and cgroup, the sidecar as uid/gid 1337 in the pod, the servers (echo on :7001, sink on :7002) in the upstream netns. C installs the exact nat table istio-init writes (docs/design.md, \"The rules being replaced\") with `iptables-restore` inside the pod netns; D and E run the real `redirect attach` with Istio's injected flags (`-p 15001 -z 15006 -u 1337 -m REDIRECT -i '*' -b '*' -d 15090,15021,15020`) into a private pin directory, uninstalled afterwards.\n\
         \n\
         Measurements: request/response: one connection, closed loop, write N bytes and read them back. Connections: closed loop of connect + 64 B exchange + close, one client. Bulk: one connection streaming 256 KiB writes into the sink; the sink's byte count at EOF ends the window; CPU per GB is the user + system time of the load generator, the sidecar and the servers over the whole transfer (the kernel's tick accounting charges the softirq work to the task it interrupts, i.e. to these), divided by every byte sent. Open loop: 64 B requests at a fixed {}/s on one connection, each timed from its scheduled send time (no coordinated omission).\n\
         \n\
         CPU placement: `sched_setaffinity` on the load generator, and on every thread of the sidecar and the servers, per placement. Every benchmark process runs at nice -20 so that other load on the machine delays its wake-ups less; the load average above says how busy the machine was.",
        num(s.open_rate as f64)
    );
    o
}

/// Write report.md, the plots, samples.json and checks.json into
/// `<out>/<timestamp>/` and copy them to `<out>/latest/` (full runs) or
/// `<out>/latest-quick/` (quick runs). Returns the report's path.
pub fn write(run: &Run, out: &Path) -> Result<PathBuf> {
    let dir = out.join(stamp());
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let v = View { run };
    let (cdf, rate) = plots(&v);
    let files = [
        ("report.md", markdown(run)),
        ("latency-cdf.svg", cdf),
        ("conn-rate-vs-rules.svg", rate),
        ("samples.json", serde_json::to_string_pretty(&run.samples)?),
        ("checks.json", serde_json::to_string_pretty(&run.checks)?),
    ];
    let latest = out.join(if run.settings.quick {
        "latest-quick"
    } else {
        "latest"
    });
    std::fs::create_dir_all(&latest).with_context(|| format!("creating {}", latest.display()))?;
    for (name, body) in &files {
        std::fs::write(dir.join(name), body).with_context(|| format!("writing {name}"))?;
        std::fs::write(latest.join(name), body).with_context(|| format!("writing {name}"))?;
    }
    Ok(dir.join("report.md"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_overlap() {
        let a = Agg::of(vec![3.0, 1.0, 2.0]).unwrap();
        assert_eq!((a.med, a.min, a.max), (2.0, 1.0, 3.0));
        let b = Agg::of(vec![4.0, 5.0]).unwrap();
        assert_eq!(b.med, 4.5);
        assert!(!a.overlaps(&b));
        assert!(a.overlaps(&Agg::of(vec![2.5, 9.0]).unwrap()));
        assert!(Agg::of(vec![]).is_none());
    }

    fn agg(v: &[f64]) -> Agg {
        Agg::of(v.to_vec()).unwrap()
    }

    #[test]
    fn leg_verdict_uses_the_spread() {
        // Below AF_UNIX beyond the spread: met; above it: missed.
        assert!(leg_verdict(&agg(&[4.0, 4.1]), &agg(&[4.5, 4.6])) == Verdict::Met);
        assert!(leg_verdict(&agg(&[4.77, 4.78]), &agg(&[4.47, 4.64])) == Verdict::Missed);
        // Ranges overlap: no result, whichever median is lower.
        assert!(leg_verdict(&agg(&[45.2, 47.4]), &agg(&[42.9, 45.5])) == Verdict::NoResult);
        assert!(leg_verdict(&agg(&[4.0, 4.6]), &agg(&[4.5, 4.7])) == Verdict::NoResult);
        // Equal medians with touching ranges are within the spread.
        assert!(leg_verdict(&agg(&[5.0]), &agg(&[5.0])) == Verdict::NoResult);
    }

    #[test]
    fn leg_why_names_the_gap_and_the_other_variants() {
        let w = why_leg(4.78, 4.56, Some(6.73), Some(6.72), true, true);
        assert!(
            w.starts_with("E's round trip is 4.78 µs against AF_UNIX's 4.56 µs (+0.22)"),
            "{w}"
        );
        assert!(w.contains("D, the same capture over loopback TCP, is at 6.73 µs, so acceleration took 1.95 µs off"), "{w}");
        assert!(
            w.contains("plain loopback TCP without capture is at 6.72 µs"),
            "{w}"
        );
        assert!(w.contains("tcp_bpf_sendmsg"), "{w}");
        assert!(!w.contains("not active"), "{w}");
        // Acceleration that did not engage is named first, and no claim
        // about what it saved is made.
        let w = why_leg(6.8, 4.5, Some(6.7), None, false, true);
        assert!(
            w.starts_with("acceleration was not active in the leg"),
            "{w}"
        );
        assert!(
            !w.contains("took") && !w.contains("tcp_bpf_sendmsg") && !w.contains("plain loopback"),
            "{w}"
        );
        assert!(why_leg(6.8, 4.5, None, None, false, false)
            .starts_with("acceleration is not in this build"));
        // Active but not faster than D: no saving claimed.
        let w = why_leg(68.7, 51.0, Some(50.8), Some(55.3), true, true);
        assert!(
            w.contains("shows no saving") && !w.contains("took") && !w.contains("tcp_bpf_sendmsg"),
            "{w}"
        );
        // Below AF_UNIX (a no-result within the spread): signed gap, no
        // explanation of a gap that is not there.
        let w = why_leg(72.1, 72.6, Some(75.3), None, true, true);
        assert!(
            w.contains("(−0.50)") && w.contains("took 3.20 µs") && !w.contains("tcp_bpf_sendmsg"),
            "{w}"
        );
    }

    #[test]
    fn leg_variants_map_to_distinct_samples() {
        let keys: std::collections::HashSet<_> = Leg::ALL.iter().map(|l| l.key()).collect();
        assert_eq!(keys.len(), Leg::ALL.len());
        assert_eq!(Leg::Unix.key(), (Cfg::A, Test::Unix64));
        assert!(Leg::E.describe().contains("forced on"));
    }

    #[test]
    fn numbers() {
        assert_eq!(num(37.25), "37.2");
        assert_eq!(num(1.234), "1.23");
        assert_eq!(num(13_245.0), "13\u{202f}245");
        assert_eq!(rules_label(10_000), "10k");
    }
}
