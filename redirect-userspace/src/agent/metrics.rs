//! Prometheus exposition of the agent: the per-pod decision counters of
//! `redirect stats`, the agent's own attach/detach counts and map usage.
//!
//! Every value is read at scrape time (from the kernel maps and the
//! agent's counters) into [`Family`]s, which `prometheus-client` encodes
//! as typed counters and gauges: the Prometheus text format (0.0.4) by
//! default, OpenMetrics 1.0 when the scraper asks for it ([`Format`]).
//! The series are the same in both: a counter family `x` is exposed as
//! `x_total` (OpenMetrics names the family `x` in its HELP and TYPE
//! lines; the text format names it `x_total`, as it always did here).

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge, MetricType},
    registry::Registry,
};

use super::Agent;
use crate::report;

/// The exposition format of one scrape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Prometheus text format 0.0.4 (what a plain `curl` gets).
    Text,
    /// OpenMetrics text 1.0.0 (Prometheus asks for it first).
    OpenMetrics,
}

impl Format {
    /// The format an `Accept` header asks for: OpenMetrics when an
    /// `application/openmetrics-text` range (version 1.0.0, 0.0.1 or none)
    /// has a higher quality than every range the text format matches
    /// (`text/plain`, `text/*`, `*/*`); the first listed wins a tie. No
    /// header, or nothing acceptable: the text format.
    pub fn negotiate(accept: Option<&str>) -> Format {
        let Some(accept) = accept else {
            return Format::Text;
        };
        let mut best: Option<(f32, Format)> = None;
        for range in accept.split(',') {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next().unwrap_or("").to_ascii_lowercase();
            let (mut q, mut version) = (1.0f32, None);
            for p in parts {
                if let Some((k, v)) = p.split_once('=') {
                    let v = v.trim().trim_matches('"');
                    match k.trim().to_ascii_lowercase().as_str() {
                        "q" => q = v.parse().unwrap_or(0.0),
                        "version" => version = Some(v.to_string()),
                        _ => {}
                    }
                }
            }
            let format = match media.as_str() {
                "application/openmetrics-text"
                    if matches!(version.as_deref(), None | Some("1.0.0") | Some("0.0.1")) =>
                {
                    Format::OpenMetrics
                }
                "text/plain" | "text/*" | "*/*" => Format::Text,
                _ => continue,
            };
            if q > 0.0 && best.is_none_or(|(b, _)| q > b) {
                best = Some((q, format));
            }
        }
        best.map(|(_, f)| f).unwrap_or(Format::Text)
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Text => prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// A label set: names and values, in exposition order.
pub type Labels = Vec<(&'static str, String)>;

/// One metric family as read at scrape time.
#[derive(Debug)]
pub struct Family {
    /// The family name; a counter's without its `_total` suffix.
    pub name: &'static str,
    pub help: &'static str,
    pub kind: Kind,
    pub samples: Vec<(Labels, u64)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
}

impl Family {
    pub fn counter(name: &'static str, help: &'static str) -> Family {
        debug_assert!(!name.ends_with("_total"), "{name}: the encoder adds _total");
        Family {
            name,
            help,
            kind: Kind::Counter,
            samples: Vec::new(),
        }
    }

    pub fn gauge(name: &'static str, help: &'static str) -> Family {
        Family {
            name,
            help,
            kind: Kind::Gauge,
            samples: Vec::new(),
        }
    }

    /// Add a sample (`labels` in exposition order).
    pub fn with(mut self, labels: &[(&'static str, &str)], value: u64) -> Family {
        self.push(labels, value);
        self
    }

    pub fn push(&mut self, labels: &[(&'static str, &str)], value: u64) {
        self.samples.push((
            labels.iter().map(|(k, v)| (*k, v.to_string())).collect(),
            value,
        ));
    }
}

/// The families of one scrape, handed to `prometheus-client`.
#[derive(Debug)]
struct Scrape(Vec<Family>);

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for f in &self.0 {
            let kind = match f.kind {
                Kind::Counter => MetricType::Counter,
                Kind::Gauge => MetricType::Gauge,
            };
            let mut metric = encoder.encode_descriptor(f.name, f.help, None, kind)?;
            for (labels, v) in &f.samples {
                let sample = metric.encode_family(labels)?;
                match f.kind {
                    Kind::Counter => ConstCounter::new(*v).encode(sample)?,
                    Kind::Gauge => ConstGauge::new(*v).encode(sample)?,
                }
            }
        }
        Ok(())
    }
}

/// Encode `families` in `format`. `notes` (why some families are missing)
/// become comments in the text format; OpenMetrics allows none.
pub fn encode(families: Vec<Family>, notes: &[String], format: Format) -> String {
    let mut reg = Registry::default();
    reg.register_collector(Box::new(Scrape(families)));
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = match format {
        Format::Text => prometheus_client::encoding::prometheus_text::encode(&mut out, &reg),
        Format::OpenMetrics => prometheus_client::encoding::text::encode(&mut out, &reg),
    };
    if format == Format::Text {
        for n in notes {
            out.push_str("# ");
            out.push_str(&n.replace('\n', " "));
            out.push('\n');
        }
    }
    out
}

/// The whole `/metrics` page.
pub fn render(agent: &Agent, ready: bool, format: Format) -> String {
    let (families, notes) = families(agent, ready);
    for n in &notes {
        tracing::warn!("/metrics: {n}");
    }
    encode(families, &notes, format)
}

/// Read every family (and why some could not be read).
pub fn families(agent: &Agent, ready: bool) -> (Vec<Family>, Vec<String>) {
    let mut out = vec![Family::gauge(
        "redirect_agent_ready",
        "1 when the agent serves its socket with the programs attached.",
    )
    .with(&[], u64::from(ready))];
    let mut notes = Vec::new();

    let c = agent.counters();
    let mut requests = Family::counter(
        "redirect_agent_requests",
        "Requests served on the agent socket, by operation and result.",
    );
    for ((op, result), n) in &c.requests {
        requests.push(&[("op", op), ("result", result)], *n);
    }
    out.push(requests);
    out.push(
        Family::counter("redirect_agent_attach", "Pod captures (add), by result.")
            .with(&[("result", "ok")], c.attach_ok)
            .with(&[("result", "error")], c.attach_errors),
    );
    out.push(
        Family::counter("redirect_agent_detach", "Pod releases (del), by result.")
            .with(&[("result", "ok")], c.detach_ok)
            .with(&[("result", "error")], c.detach_errors),
    );
    out.push(
        Family::counter(
            "redirect_agent_reconcile_released",
            "Pods released at agent start because their network namespace was gone.",
        )
        .with(&[], c.reconcile_released),
    );
    let mut restored = Family::counter(
        "redirect_agent_cni_restored",
        "CNI conflist entry or plugin binary restored after something else removed it, by what.",
    );
    for what in ["entry", "binary"] {
        restored.push(
            &[("what", what)],
            c.cni_restored.get(what).copied().unwrap_or(0),
        );
    }
    out.push(restored);
    out.push(
        Family::counter(
            "redirect_agent_cni_check_errors",
            "Checks of the CNI conflist entry that failed (file unreadable or invalid).",
        )
        .with(&[], c.cni_check_errors),
    );
    let mut full = Family::counter(
        "redirect_agent_map_full",
        "Pod captures refused because a map was full (fail closed: the CNI ADD fails), by map.",
    );
    for map in [
        redirect_common::MAP_PODS,
        redirect_common::MAP_PORTS,
        redirect_common::MAP_CIDRS,
    ] {
        full.push(&[("map", map)], c.map_full.get(map).copied().unwrap_or(0));
    }
    out.push(full);
    drop(c);

    if let Some(w) = agent.k8s.get() {
        out.extend(super::k8s::metric_families(w, agent));
    }

    let names = agent.pod_names();
    // The raw counters (`*_total`): a `redirect stats --zero` only moves
    // what `stats` shows, so these stay monotonic.
    match crate::stats::read(&agent.pins, None).map(|s| s.pods) {
        Ok(pods) => {
            out.push(Family::gauge("redirect_pods", "Captured pods.").with(&[], pods.len() as u64));
            let mut decisions = Family::counter("redirect_decisions", "Connections (or calls) per pod and decision, as `redirect stats` (iptables -t nat -L -v packets column).");
            let mut bytes = Family::counter(
                "redirect_decision_bytes",
                "Bytes per pod and decision (redirected connections, counted when they close).",
            );
            for p in &pods {
                let pod = names.get(&p.netns_cookie).map(String::as_str).unwrap_or("");
                let cookie = p.netns_cookie.to_string();
                for r in &p.rules {
                    let labels = [
                        ("pod", pod),
                        ("netns_cookie", cookie.as_str()),
                        ("chain", r.chain.name()),
                        ("rule", r.rule),
                        ("target", r.target),
                    ];
                    decisions.push(&labels, r.count_total);
                    if r.bytes_total > 0 {
                        bytes.push(&labels, r.bytes_total);
                    }
                }
            }
            out.push(decisions);
            out.push(bytes);
        }
        Err(e) => notes.push(format!("counters unavailable: {e}")),
    }
    match report::status(&agent.pins) {
        Ok(st) => {
            let mut entries = Family::gauge(
                "redirect_map_entries",
                "Entries in use in the maps that grow with pods and traffic.",
            );
            let mut max = Family::gauge("redirect_map_max_entries", "Capacity of those maps.");
            for m in &st.map_usage {
                entries.push(&[("map", m.map)], m.entries as u64);
                max.push(&[("map", m.map)], u64::from(m.max_entries));
            }
            out.push(entries);
            out.push(max);
            out.push(Family::counter("redirect_counters_lost", "Counter updates lost because REDIRECT_COUNTERS was full (the decisions were applied; only their counts are missing).").with(&[], st.counters_lost));
        }
        Err(e) => notes.push(format!("map usage unavailable: {e}")),
    }
    (out, notes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Family> {
        vec![
            Family::gauge("redirect_pods", "Captured pods.").with(&[], 2),
            Family::counter("redirect_decisions", "Decisions.")
                .with(&[("pod", "a\"b\\c\nd"), ("rule", "captured")], 7),
            Family::counter("redirect_counters_lost", "Lost.").with(&[], 0),
        ]
    }

    #[test]
    fn text_format_keeps_the_total_names() {
        let t = encode(
            sample(),
            &["map usage unavailable: x\ny".into()],
            Format::Text,
        );
        assert_eq!(
            t,
            "# HELP redirect_pods Captured pods.\n\
             # TYPE redirect_pods gauge\n\
             redirect_pods 2\n\
             # HELP redirect_decisions_total Decisions.\n\
             # TYPE redirect_decisions_total counter\n\
             redirect_decisions_total{pod=\"a\\\"b\\\\c\\nd\",rule=\"captured\"} 7\n\
             # HELP redirect_counters_lost_total Lost.\n\
             # TYPE redirect_counters_lost_total counter\n\
             redirect_counters_lost_total 0\n\
             # map usage unavailable: x y\n"
        );
    }

    #[test]
    fn openmetrics_names_the_family_and_ends_with_eof() {
        let t = encode(sample(), &["not a comment".into()], Format::OpenMetrics);
        assert_eq!(
            t,
            "# HELP redirect_pods Captured pods.\n\
             # TYPE redirect_pods gauge\n\
             redirect_pods 2\n\
             # HELP redirect_decisions Decisions.\n\
             # TYPE redirect_decisions counter\n\
             redirect_decisions_total{pod=\"a\\\"b\\\\c\\nd\",rule=\"captured\"} 7\n\
             # HELP redirect_counters_lost Lost.\n\
             # TYPE redirect_counters_lost counter\n\
             redirect_counters_lost_total 0\n\
             # EOF\n"
        );
    }

    #[test]
    fn accept_negotiation() {
        use Format::*;
        for (accept, want) in [
            (None, Text),
            (Some(""), Text),
            (Some("*/*"), Text),
            (Some("text/plain"), Text),
            (Some("application/json"), Text),
            // What Prometheus 2.x/3.x sends.
            (Some("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"), OpenMetrics),
            (Some("application/openmetrics-text; version=0.0.1"), OpenMetrics),
            (Some("Application/OpenMetrics-Text"), OpenMetrics),
            (Some("text/plain;q=0.9, application/openmetrics-text;q=0.5"), Text),
            (Some("text/plain, application/openmetrics-text"), Text),
            (Some("application/openmetrics-text;q=0"), Text),
            (Some("application/openmetrics-text;version=2.0.0"), Text),
        ] {
            assert_eq!(Format::negotiate(accept), want, "{accept:?}");
        }
    }
}
