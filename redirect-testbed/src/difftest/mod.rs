//! Differential exactness: random istio-iptables configurations and
//! connections, run side by side in a pod with Istio's own rules and in a
//! pod captured by redirect, every outcome compared.
//!
//! - [`gen`]: seeded configurations (the arguments and environment a user
//!   passes istio-iptables) and connections (callers with uid, gid and
//!   supplementary groups; IPv4, IPv6, IPv4-mapped; the pod's own
//!   addresses, loopback, 127.0.0.6 / ::6, 0.0.0.0 / ::, hosts in and out
//!   of the CIDRs, ports in and out of the lists; TCP, MPTCP and UDP/53;
//!   inbound from outside).
//! - [`runner`]: the two pods. The reference gets the rules
//!   [`crate::istio_rules`] writes for the configuration, installed with
//!   `iptables-restore` / `ip6tables-restore`; the other is captured by
//!   the `redirect` binary with the same flags. Each has servers on every
//!   side and a proxy running as the configuration's proxy identity.
//! - [`known`]: the optional knobs redirect may not take yet, and the
//!   known differences (the allow-list).
//!
//! For each connection the outcome is compared: the caller's result and
//! getpeername, the proxy's hops with their SO_ORIGINAL_DST, and who
//! answered, where and from which client address.

pub mod gen;
pub mod known;
pub mod net;
pub mod runner;
pub mod topo;

use std::collections::BTreeMap;

use anyhow::{Context, Result};

use self::{
    gen::{Config, Conn, Generator},
    known::{Feature, KNOWN, OPTIONAL},
    runner::{Kind, Outcome, Side},
};

/// A known difference is no longer needed when this many of the cases it
/// covers, and all of them, came out the same. (An entry covers a class
/// of cases of which some differ; a handful that happen to agree says
/// nothing.)
pub const STALE_AFTER: usize = 20;

/// What to run.
#[derive(Clone, Debug)]
pub struct Options {
    /// Connections in all.
    pub cases: usize,
    pub seed: u64,
    /// Connections per configuration (the pods are reconfigured between).
    pub per_config: usize,
    /// Print every case, not only the mismatches.
    pub verbose: bool,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            cases: 300,
            seed: 1,
            per_config: 12,
            verbose: false,
        }
    }
}

/// One case whose outcomes differ.
#[derive(Clone, Debug)]
pub struct Mismatch {
    pub case: usize,
    /// The [`known::KNOWN`] entry that covers it, if any.
    pub known: Option<&'static str>,
    /// One line: seed and case, both command lines, the connection, both
    /// outcomes.
    pub repro: String,
}

/// What a run found.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub seed: u64,
    pub cases: usize,
    pub configs: usize,
    /// Same outcome in both pods.
    pub passed: usize,
    /// Different outcomes covered by a known difference.
    pub allowed: usize,
    /// Different outcomes nobody knew about.
    pub failed: usize,
    pub mismatches: Vec<Mismatch>,
    /// Known differences that covered cases of this run, all of which came
    /// out the same: no longer needed.
    pub stale: Vec<&'static str>,
    /// Known differences that covered too few cases of this run
    /// ([`STALE_AFTER`]) to judge them by more than their example, with
    /// the number they covered.
    pub unexercised: Vec<(&'static str, usize)>,
    /// Per optional feature redirect does not take: the note, and how
    /// many configurations drew it.
    pub left_out: Vec<(String, usize)>,
    /// How redirect was driven.
    pub driver: String,
    /// Cases per kind of connection and family (`remote v6`, `inbound
    /// v4`, `dns v4`, ...).
    pub tried: BTreeMap<String, usize>,
}

impl Report {
    /// Everything a user needs to read: notes, mismatches, totals.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        s.push_str(&format!(
            "differential test: seed {}, {} cases in {} configurations, redirect driven by `{}`\n",
            self.seed, self.cases, self.configs, self.driver
        ));
        let tried: Vec<String> = self.tried.iter().map(|(k, n)| format!("{k} {n}")).collect();
        s.push_str(&format!("tried: {}\n", tried.join(", ")));
        for (note, n) in &self.left_out {
            s.push_str(&format!("note: {note} ({n} configurations)\n"));
        }
        for m in &self.mismatches {
            match m.known {
                Some(k) => s.push_str(&format!("known difference [{k}]: {}\n", m.repro)),
                None => s.push_str(&format!("MISMATCH: {}\n", m.repro)),
            }
        }
        for k in &self.stale {
            let why = KNOWN
                .iter()
                .find(|e| e.id == *k)
                .map(|e| e.why)
                .unwrap_or("");
            s.push_str(&format!(
                "STALE known difference [{k}]: its example, or every one of at least {STALE_AFTER} cases it covers, now agrees; remove it from difftest/known.rs ({why})\n"
            ));
        }
        for (k, n) in &self.unexercised {
            let covered = match n {
                0 => "no case of this run".to_string(),
                n => format!("{n} cases of this run, all the same (under {STALE_AFTER})"),
            };
            s.push_str(&format!(
                "note: known difference [{k}] covered {covered}: judged on its example\n"
            ));
        }
        s.push_str(&format!(
            "{} passed, {} failed ({} known differences{})\n",
            self.passed,
            self.failed + self.stale.len(),
            self.allowed,
            if self.stale.is_empty() {
                String::new()
            } else {
                format!(
                    ", {} stale known differences counted as failed",
                    self.stale.len()
                )
            }
        ));
        s
    }

    /// No unknown mismatch and no stale known difference.
    pub fn ok(&self) -> bool {
        self.failed == 0 && self.stale.is_empty()
    }
}

fn repro(seed: u64, case: usize, cfg: &Config, driver: &str, c: &Conn, a: &str, b: &str) -> String {
    format!(
        "seed {seed} case {case} | {} | {} | {c} | iptables: {a} | redirect: {b}",
        cfg.istio_line(),
        cfg.redirect_line(driver)
    )
}

/// One connection in both pods; `applied` is how the redirect pod took
/// its configuration.
fn both(
    iptables: &mut Side,
    redirect: &mut Side,
    applied: &Result<(), String>,
    c: &Conn,
) -> (Outcome, Outcome) {
    match applied {
        Ok(()) => {
            let t = std::time::Instant::now();
            let (ca, cb) = (iptables.start(c), redirect.start(c));
            (iptables.finish(ca, t), redirect.finish(cb, t))
        }
        Err(e) => {
            let t = std::time::Instant::now();
            let a = iptables.finish(iptables.start(c), t);
            let refused = Outcome {
                result: format!("capture refused: {e}"),
                peer: None,
                hops: vec![],
                server: None,
            };
            (a, refused)
        }
    }
}

/// Give both pods `cfg`; the reference must take it.
fn apply(iptables: &mut Side, redirect: &mut Side, cfg: &Config) -> Result<Result<(), String>> {
    iptables
        .apply(cfg)
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("the reference refused {}", cfg.istio_line()))?;
    Ok(redirect.apply(cfg))
}

/// Run the differential test (as root: namespaces, cgroups, iptables,
/// BPF). `out` gets the case lines as they come (all of them with
/// `verbose`, else the mismatches).
pub fn run(o: &Options, out: &mut dyn std::io::Write) -> Result<Report> {
    anyhow::ensure!(
        unsafe { libc::geteuid() } == 0,
        "the differential test needs root (namespaces, cgroups, iptables, BPF)"
    );
    let mut iptables = Side::new(Kind::Iptables)?;
    let mut redirect = Side::new(Kind::Redirect)?;
    let probes = redirect.probe_features();
    let supported: Vec<Feature> = probes
        .iter()
        .filter(|(_, r)| r.is_ok())
        .map(|(f, _)| *f)
        .collect();
    let driver = match redirect.driver {
        runner::Driver::Attach => "attach",
        runner::Driver::IstioIptables => "istio-iptables",
    };
    let takes = |f: Feature| supported.contains(&f);
    let mut gen = Generator::new(o.seed);
    let mut rep = Report {
        seed: o.seed,
        driver: driver.to_string(),
        ..Report::default()
    };
    // Each known difference's own example must still differ.
    for k in KNOWN {
        let (cfg, c) = (k.example)();
        let applied = apply(&mut iptables, &mut redirect, &cfg)?;
        let (a, b) = both(&mut iptables, &mut redirect, &applied, &c);
        let line = repro(o.seed, 0, &cfg, driver, &c, &a.to_string(), &b.to_string());
        let line = line.replacen("case 0", &format!("example of [{}]", k.id), 1);
        if a == b {
            rep.stale.push(k.id);
            writeln!(
                out,
                "STALE known difference [{}]: its example agrees: {line}",
                k.id
            )?;
        } else if o.verbose {
            writeln!(out, "known difference [{}] still there: {line}", k.id)?;
        }
    }
    // Per known difference: cases covered, of which differing.
    let mut covered: BTreeMap<&'static str, (usize, usize)> = BTreeMap::new();
    while rep.cases < o.cases {
        let cfg = gen.config(&takes);
        let n = o.per_config.min(o.cases - rep.cases);
        let conns = gen.conns(&cfg, n);
        rep.configs += 1;
        let applied = apply(&mut iptables, &mut redirect, &cfg)?;
        for c in &conns {
            let case = rep.cases;
            rep.cases += 1;
            let (a, b) = both(&mut iptables, &mut redirect, &applied, c);
            let family = if c.dst.ip().to_canonical().is_ipv4() {
                "v4"
            } else {
                "v6"
            };
            *rep.tried.entry(format!("{} {family}", c.kind)).or_insert(0) += 1;
            let known = KNOWN.iter().find(|k| (k.covers)(&cfg, c));
            if let Some(k) = known {
                let e = covered.entry(k.id).or_insert((0, 0));
                e.0 += 1;
                e.1 += usize::from(a != b);
            }
            let line = repro(
                o.seed,
                case,
                &cfg,
                driver,
                c,
                &a.to_string(),
                &b.to_string(),
            );
            if a == b {
                rep.passed += 1;
                if o.verbose {
                    writeln!(out, "case {case}: same ({}): {line}", a.landed())?;
                }
                continue;
            }
            match known {
                Some(k) => {
                    rep.allowed += 1;
                    if o.verbose {
                        writeln!(out, "case {case}: known difference [{}]: {line}", k.id)?;
                    }
                }
                None => {
                    rep.failed += 1;
                    writeln!(out, "case {case}: MISMATCH: {line}")?;
                }
            }
            rep.mismatches.push(Mismatch {
                case,
                known: known.map(|k| k.id),
                repro: line,
            });
        }
    }
    for k in KNOWN {
        match covered.get(k.id) {
            None => rep.unexercised.push((k.id, 0)),
            Some((n, 0)) if *n >= STALE_AFTER => {
                if !rep.stale.contains(&k.id) {
                    rep.stale.push(k.id);
                }
            }
            Some((n, 0)) => rep.unexercised.push((k.id, *n)),
            Some(_) => {}
        }
    }
    for (f, r) in &probes {
        if let Err(why) = r {
            let o = OPTIONAL.iter().find(|o| o.feature == *f).expect("listed");
            let n = gen.left_out.get(f).copied().unwrap_or(0);
            let why = why.lines().next().unwrap_or("").to_string();
            rep.left_out.push((format!("{} [{why}]", o.note), n));
        }
    }
    Ok(rep)
}
