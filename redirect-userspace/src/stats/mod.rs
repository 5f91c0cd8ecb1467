//! `redirect stats`: per-pod counters laid out like `iptables -t nat -L -n
//! -v`, from one read of the pinned maps.
//!
//! - [`read`] opens the maps once and makes a [`Stats`]: per pod, one
//!   [`RuleCount`] per [`Reason`], in the order of its [`Chain`] (defined in
//!   `redirect_common::reason`, nowhere else), each with its configured
//!   match ([`matches`]).
//! - [`listing`] parses `--chain` (our chain names and the iptables ones
//!   users know) and picks the rows of a listing.
//! - [`render`] is the one text renderer (plain, or with `--watch`'s
//!   highlights), checked by a golden test and by the sample in
//!   docs/stats.md.
//! - [`baseline`] is `--zero`: the kernel counters are never cleared (they
//!   are Prometheus counters, monotonic); a pinned map keeps the values
//!   at the last zero and the rows show what came since. `/metrics` uses
//!   the `*_total` values, which ignore it.

pub mod baseline;
pub mod listing;
pub mod matches;
pub mod render;

use std::collections::BTreeMap;

use redirect_common::{reason::Chain, CounterValue, Reason};
use serde::Serialize;

use crate::{
    config::PodSpec,
    error::{Error, Result},
    maps::Maps,
    pins::Pins,
    sys,
};

pub use baseline::Baseline;
pub use listing::Listing;

/// One row: a reason's counters in one pod.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RuleCount {
    /// JSON: the chain's stable name (`OUTPUT`, `PREROUTING`, ...).
    #[serde(serialize_with = "chain_name")]
    pub chain: Chain,
    #[serde(skip)]
    pub reason: Reason,
    pub rule: &'static str,
    pub target: &'static str,
    pub description: &'static str,
    /// The configured match, as `iptables -L -n` shows it ("" for rows
    /// that no flag configures).
    #[serde(rename = "match")]
    pub matches: String,
    /// Since the last `redirect stats --zero` of this row (since the pod
    /// was captured when never zeroed): what the text shows.
    pub count: u64,
    pub bytes: u64,
    /// Since the pod was captured, never reset: what `/metrics` exports.
    pub count_total: u64,
    pub bytes_total: u64,
    /// Unix time of the row's last `--zero`, if any.
    pub zeroed_at: Option<u64>,
}

fn chain_name<S: serde::Serializer>(c: &Chain, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(c.name())
}

/// One pod's rows.
#[derive(Clone, Debug, Serialize)]
pub struct PodStats {
    pub netns_cookie: u64,
    pub netns: Option<String>,
    /// Acceleration on or off for this pod, and why (short; the probe's
    /// findings are in `redirect status`).
    pub acceleration: String,
    /// The pod's configuration (for the matches and the listing titles).
    #[serde(skip)]
    pub spec: PodSpec,
    pub rules: Vec<RuleCount>,
}

/// Everything `redirect stats` shows, from one read of the maps.
#[derive(Clone, Debug)]
pub struct Stats {
    pub pods: Vec<PodStats>,
    /// Counter updates lost to a full REDIRECT_COUNTERS (the counts are
    /// short by this much).
    pub counters_lost: u64,
    /// Why the `--zero` baseline could not be read (the rows then show
    /// the raw counters).
    pub baseline_error: Option<String>,
}

/// Read every pod's counters (or only the pod with netns cookie `only`),
/// zero rows included as iptables shows them.
pub fn read(pins: &Pins, only: Option<u64>) -> Result<Stats> {
    let maps = Maps::open(pins)?;
    let counters = maps.counters();
    let mut ports = maps.all_port_entries();
    let mut cidrs = maps.all_cidr_entries();
    // A baseline that cannot be read must not cost the counters (nor
    // /metrics, which does not use it): shown as never zeroed, and why.
    let (baselines, baseline_error) = match baseline::read(pins) {
        Ok(b) => (b, None),
        Err(e) => (Default::default(), Some(format!("{e:#}"))),
    };
    let probe = crate::probe::cached(pins);
    let mut pods = Vec::new();
    for (cookie, cfg) in maps.pods() {
        if only.is_some_and(|c| c != cookie) {
            continue;
        }
        let spec = PodSpec::from_kernel(
            &cfg,
            &ports.remove(&cookie).unwrap_or_default(),
            &cidrs.remove(&cookie).unwrap_or_default(),
        )
        .with_interfaces(&maps.iface_entries(cookie));
        pods.push(PodStats {
            netns_cookie: cookie,
            netns: sys::netns_name(cfg.netns_inode as u64),
            acceleration: crate::probe::describe(spec.accel_mode, spec.accel, probe.as_ref()),
            rules: rows(
                &spec,
                counters.get(&cookie).unwrap_or(&BTreeMap::new()),
                baselines.get(&cookie).unwrap_or(&BTreeMap::new()),
            ),
            spec,
        });
    }
    pods.sort_by_key(|p| p.netns_cookie);
    Ok(Stats {
        pods,
        counters_lost: maps.counters_lost(),
        baseline_error,
    })
}

/// A pod's rows, chain by chain, from its raw counters and its baseline.
pub fn rows(
    spec: &PodSpec,
    counters: &BTreeMap<Reason, CounterValue>,
    baselines: &BTreeMap<Reason, Baseline>,
) -> Vec<RuleCount> {
    let mut out = Vec::new();
    for chain in Chain::ALL {
        for &r in chain.reasons() {
            let raw = counters.get(&r).copied().unwrap_or_default();
            // A baseline above the counter is from before the counters
            // were reset (the pod released and captured again): void.
            let base = baselines
                .get(&r)
                .filter(|b| b.count <= raw.count && b.bytes <= raw.bytes);
            let since = |raw: u64, base: Option<u64>| raw.saturating_sub(base.unwrap_or(0));
            out.push(RuleCount {
                chain,
                reason: r,
                rule: r.name(),
                target: r.target(),
                description: r.describe(),
                matches: matches::rule_match(r, spec),
                count: since(raw.count, base.map(|b| b.count)),
                bytes: since(raw.bytes, base.map(|b| b.bytes)),
                count_total: raw.count,
                bytes_total: raw.bytes,
                zeroed_at: base.map(|b| b.at),
            });
        }
    }
    out
}

/// Unix time now, in seconds.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `netns` is not one of these pods: an error that lists them.
pub fn not_captured(netns: &std::path::Path, pods: &[PodStats]) -> Error {
    let captured = if pods.is_empty() {
        "no pod is captured by this install".to_string()
    } else {
        format!(
            "captured: {}",
            pods.iter()
                .map(|p| format!(
                    "{} (netns cookie {})",
                    p.netns.as_deref().unwrap_or("<no path found>"),
                    p.netns_cookie
                ))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    Error::NotCapturedAmong {
        netns: netns.display().to_string(),
        captured,
    }
}

/// Zero the listed rows of these pods (`redirect stats --zero`).
pub fn zero(pins: &Pins, pods: &[PodStats], listing: &Listing, at: u64) -> Result<()> {
    let rows: Vec<(u64, Reason, u64, u64)> = pods
        .iter()
        .flat_map(|p| {
            p.rules
                .iter()
                .filter(|r| listing.lists(r.reason))
                .map(|r| (p.netns_cookie, r.reason, r.count_total, r.bytes_total))
        })
        .collect();
    baseline::zero(pins, &rows, at)
}
