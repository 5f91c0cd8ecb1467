//! Hand-written SVG plots: latency CDFs and connection rate vs rule count.

use std::fmt::Write;

pub struct Series {
    pub label: String,
    pub color: String,
    pub dashed: bool,
    /// (x, y) for CDFs: (latency µs, quantile); for the rate plot: (index
    /// of the x category, median) with `err` holding (min, max).
    pub points: Vec<(f64, f64)>,
    pub err: Vec<(f64, f64)>,
}

pub struct Panel {
    pub title: String,
    pub series: Vec<Series>,
}

const PW: f64 = 470.0;
const PH: f64 = 300.0;
const ML: f64 = 64.0;
const MR: f64 = 16.0;
const MT: f64 = 28.0;
const MB: f64 = 46.0;
const HEAD: f64 = 64.0;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn begin(
    title: &str,
    cols: usize,
    rows: usize,
    legend: &[(String, String, bool)],
) -> (String, f64, f64) {
    let (w, h) = (cols as f64 * PW, HEAD + rows as f64 * PH);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="20" text-anchor="middle" font-size="15" font-weight="bold">{}</text>"#,
        w / 2.0,
        esc(title)
    );
    let mut x = 20.0;
    for (label, color, dashed) in legend {
        let dash = if *dashed {
            r#" stroke-dasharray="6 4""#
        } else {
            ""
        };
        let _ = writeln!(
            s,
            r#"<line x1="{x}" y1="44" x2="{}" y2="44" stroke="{color}" stroke-width="3"{dash}/>"#,
            x + 24.0
        );
        let _ = writeln!(s, r#"<text x="{}" y="48">{}</text>"#, x + 30.0, esc(label));
        x += 36.0 + 6.6 * label.chars().count() as f64;
    }
    (s, w, h)
}

fn frame(s: &mut String, ox: f64, oy: f64, title: &str) -> (f64, f64, f64, f64) {
    let (x0, y0, x1, y1) = (ox + ML, oy + MT, ox + PW - MR, oy + PH - MB);
    let _ = writeln!(
        s,
        r##"<rect x="{x0}" y="{y0}" width="{}" height="{}" fill="none" stroke="#333"/>"##,
        x1 - x0,
        y1 - y0
    );
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle" font-weight="bold">{}</text>"#,
        (x0 + x1) / 2.0,
        oy + MT - 8.0,
        esc(title)
    );
    (x0, y0, x1, y1)
}

fn polyline(s: &mut String, pts: &[(f64, f64)], color: &str, dashed: bool) {
    if pts.is_empty() {
        return;
    }
    let p: Vec<String> = pts.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
    let dash = if dashed {
        r#" stroke-dasharray="6 4""#
    } else {
        ""
    };
    let _ = writeln!(
        s,
        r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"{dash}/>"#,
        p.join(" ")
    );
}

/// Latency CDFs: x = latency (µs, log scale), y = percentile on a "nines"
/// scale (-log10(1-q)) so the tail is visible. Panels laid out `cols` wide.
pub fn cdf(title: &str, panels: &[Panel], cols: usize) -> String {
    let rows = panels.len().div_ceil(cols.max(1));
    let legend: Vec<(String, String, bool)> = panels
        .first()
        .map(|p| {
            p.series
                .iter()
                .map(|s| (s.label.clone(), s.color.clone(), s.dashed))
                .collect()
        })
        .unwrap_or_default();
    let (mut s, _, _) = begin(title, cols, rows, &legend);
    for (i, p) in panels.iter().enumerate() {
        let (ox, oy) = ((i % cols) as f64 * PW, HEAD + (i / cols) as f64 * PH);
        let (x0, y0, x1, y1) = frame(&mut s, ox, oy, &p.title);
        let all: Vec<f64> = p
            .series
            .iter()
            .flat_map(|s| s.points.iter().map(|(x, _)| *x))
            .filter(|x| *x > 0.0)
            .collect();
        if all.is_empty() {
            continue;
        }
        let lo = all.iter().cloned().fold(f64::INFINITY, f64::min).log10();
        let hi = all.iter().cloned().fold(0.0, f64::max).log10();
        // Gridlines at 1-2-5 steps within the range.
        let (lo, hi) = (lo - 0.05, hi + 0.05);
        let xmap = |v: f64| x0 + (v.log10() - lo) / (hi - lo) * (x1 - x0);
        let ymax = 4.0;
        let ymap = |nines: f64| y1 - nines.min(ymax) / ymax * (y1 - y0);
        for d in (lo.floor() as i32)..=(hi.ceil() as i32) {
            for m in [1.0, 2.0, 5.0] {
                let v = m * 10f64.powi(d);
                if v.log10() < lo || v.log10() > hi {
                    continue;
                }
                let x = xmap(v);
                let _ = writeln!(
                    s,
                    r##"<line x1="{x:.1}" y1="{y0}" x2="{x:.1}" y2="{y1}" stroke="#ddd"/>"##
                );
                let _ = writeln!(
                    s,
                    r#"<text x="{x:.1}" y="{}" text-anchor="middle">{}</text>"#,
                    y1 + 15.0,
                    fmt_num(v)
                );
            }
        }
        for (q, label) in [
            (0.0, "0%"),
            (0.5, "50%"),
            (0.9, "90%"),
            (0.99, "99%"),
            (0.999, "99.9%"),
            (0.9999, "99.99%"),
        ] {
            let y = ymap(-(1.0f64 - q).log10());
            let _ = writeln!(
                s,
                r##"<line x1="{x0}" y1="{y:.1}" x2="{x1}" y2="{y:.1}" stroke="#ddd"/>"##
            );
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{:.1}" text-anchor="end">{label}</text>"#,
                x0 - 4.0,
                y + 4.0
            );
        }
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle">latency (µs, log scale)</text>"#,
            (x0 + x1) / 2.0,
            y1 + 32.0
        );
        for se in &p.series {
            let pts: Vec<(f64, f64)> = se
                .points
                .iter()
                .filter(|(x, _)| *x > 0.0)
                .map(|(x, q)| (xmap(*x), ymap(-(1.0 - q).max(1e-9).log10())))
                .collect();
            polyline(&mut s, &pts, &se.color, se.dashed);
        }
    }
    s.push_str("</svg>\n");
    s
}

/// Connection rate vs rule count: x = categories (`xs` labels), y = rate
/// from 0; error bars from min to max; dashed series are flat references.
pub fn rate(title: &str, xs: &[String], ylabel: &str, panels: &[Panel]) -> String {
    let cols = panels.len().max(1);
    let legend: Vec<(String, String, bool)> = panels
        .first()
        .map(|p| {
            p.series
                .iter()
                .map(|s| (s.label.clone(), s.color.clone(), s.dashed))
                .collect()
        })
        .unwrap_or_default();
    let (mut s, _, _) = begin(title, cols, 1, &legend);
    for (i, p) in panels.iter().enumerate() {
        let (ox, oy) = (i as f64 * PW, HEAD);
        let (x0, y0, x1, y1) = frame(&mut s, ox, oy, &p.title);
        let top = p
            .series
            .iter()
            .flat_map(|s| {
                s.points
                    .iter()
                    .map(|(_, y)| *y)
                    .chain(s.err.iter().map(|(_, hi)| *hi))
            })
            .fold(0.0, f64::max);
        let top = nice_ceiling(top * 1.08);
        let n = xs.len().max(2) as f64;
        let xmap = |i: f64| x0 + (i + 0.5) / n * (x1 - x0);
        let ymap = |v: f64| y1 - v / top * (y1 - y0);
        for k in 0..=5 {
            let v = top * k as f64 / 5.0;
            let y = ymap(v);
            let _ = writeln!(
                s,
                r##"<line x1="{x0}" y1="{y:.1}" x2="{x1}" y2="{y:.1}" stroke="#ddd"/>"##
            );
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{:.1}" text-anchor="end">{}</text>"#,
                x0 - 4.0,
                y + 4.0,
                fmt_num(v)
            );
        }
        for (k, l) in xs.iter().enumerate() {
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{}" text-anchor="middle">{}</text>"#,
                xmap(k as f64),
                y1 + 15.0,
                esc(l)
            );
        }
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle">extra iptables rules (C) / exclusion entries (D, E)</text>"#,
            (x0 + x1) / 2.0,
            y1 + 32.0
        );
        let _ = writeln!(
            s,
            r#"<text transform="translate({},{}) rotate(-90)" text-anchor="middle">{}</text>"#,
            ox + 14.0,
            (y0 + y1) / 2.0,
            esc(ylabel)
        );
        for se in &p.series {
            if se.dashed {
                if let Some((_, v)) = se.points.first() {
                    let y = ymap(*v);
                    let _ = writeln!(
                        s,
                        r#"<line x1="{x0}" y1="{y:.1}" x2="{x1}" y2="{y:.1}" stroke="{}" stroke-width="1.5" stroke-dasharray="6 4"/>"#,
                        se.color
                    );
                }
                continue;
            }
            let pts: Vec<(f64, f64)> = se
                .points
                .iter()
                .map(|(i, v)| (xmap(*i), ymap(*v)))
                .collect();
            polyline(&mut s, &pts, &se.color, false);
            for ((px, py), (lo, hi)) in pts.iter().zip(&se.err) {
                let _ = writeln!(
                    s,
                    r#"<line x1="{px:.1}" y1="{:.1}" x2="{px:.1}" y2="{:.1}" stroke="{}" stroke-width="1.5"/>"#,
                    ymap(*lo),
                    ymap(*hi),
                    se.color
                );
                let _ = writeln!(
                    s,
                    r#"<circle cx="{px:.1}" cy="{py:.1}" r="3.5" fill="{}"/>"#,
                    se.color
                );
            }
        }
    }
    s.push_str("</svg>\n");
    s
}

fn nice_ceiling(v: f64) -> f64 {
    if v <= 0.0 {
        return 1.0;
    }
    let p = 10f64.powf(v.log10().floor());
    for m in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if m * p >= v {
            return m * p;
        }
    }
    10.0 * p
}

/// 12, 1.5, 250, 2.5k, 10k
pub fn fmt_num(v: f64) -> String {
    if v >= 1000.0 {
        let k = v / 1000.0;
        if (k - k.round()).abs() < 1e-9 {
            format!("{}k", k.round())
        } else {
            format!("{k:.1}k")
        }
    } else if v >= 10.0 || (v - v.round()).abs() < 1e-9 {
        format!("{}", v.round())
    } else {
        format!("{v:.1}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_ceilings() {
        assert_eq!(fmt_num(2000.0), "2k");
        assert_eq!(fmt_num(2500.0), "2.5k");
        assert_eq!(fmt_num(50.0), "50");
        assert_eq!(fmt_num(0.5), "0.5");
        assert_eq!(nice_ceiling(17_300.0), 20_000.0);
        assert_eq!(nice_ceiling(0.0), 1.0);
    }

    #[test]
    fn plots_are_well_formed() {
        let se = |c: &str, dashed| Series {
            label: c.into(),
            color: "#000".into(),
            dashed,
            points: vec![(0.0, 10.0), (1.0, 8.0)],
            err: vec![(9.0, 11.0), (7.0, 9.0)],
        };
        let svg = rate(
            "t",
            &["0".into(), "1k".into()],
            "conns/s",
            &[Panel {
                title: "p".into(),
                series: vec![se("C", false), se("B", true)],
            }],
        );
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        let cdf_series = Series {
            label: "A".into(),
            color: "#000".into(),
            dashed: false,
            points: vec![(20.0, 0.0), (30.0, 0.9), (80.0, 0.999)],
            err: vec![],
        };
        let svg = cdf(
            "t",
            &[Panel {
                title: "p".into(),
                series: vec![cdf_series],
            }],
            2,
        );
        assert!(svg.contains("<polyline") && svg.trim_end().ends_with("</svg>"));
    }
}
