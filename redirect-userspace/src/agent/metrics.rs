//! Prometheus text exposition of the agent: the per-pod decision counters
//! of `redirect stats`, the agent's own attach/detach counts and map usage.

use std::fmt::Write as _;

use super::Agent;
use crate::report;

/// Escape a label value (backslash, double quote, newline).
fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// The whole `/metrics` page.
pub fn render(agent: &Agent, ready: bool) -> String {
    let mut out = String::new();
    header(
        &mut out,
        "redirect_agent_ready",
        "gauge",
        "1 when the agent serves its socket with the programs attached.",
    );
    let _ = writeln!(out, "redirect_agent_ready {}", u8::from(ready));

    let c = agent.counters();
    header(
        &mut out,
        "redirect_agent_requests_total",
        "counter",
        "Requests served on the agent socket, by operation and result.",
    );
    for ((op, result), n) in &c.requests {
        let _ = writeln!(
            out,
            "redirect_agent_requests_total{{op=\"{op}\",result=\"{result}\"}} {n}"
        );
    }
    header(
        &mut out,
        "redirect_agent_attach_total",
        "counter",
        "Pod captures (add), by result.",
    );
    let _ = writeln!(
        out,
        "redirect_agent_attach_total{{result=\"ok\"}} {}",
        c.attach_ok
    );
    let _ = writeln!(
        out,
        "redirect_agent_attach_total{{result=\"error\"}} {}",
        c.attach_errors
    );
    header(
        &mut out,
        "redirect_agent_detach_total",
        "counter",
        "Pod releases (del), by result.",
    );
    let _ = writeln!(
        out,
        "redirect_agent_detach_total{{result=\"ok\"}} {}",
        c.detach_ok
    );
    let _ = writeln!(
        out,
        "redirect_agent_detach_total{{result=\"error\"}} {}",
        c.detach_errors
    );
    header(
        &mut out,
        "redirect_agent_reconcile_released_total",
        "counter",
        "Pods released at agent start because their network namespace was gone.",
    );
    let _ = writeln!(
        out,
        "redirect_agent_reconcile_released_total {}",
        c.reconcile_released
    );
    header(
        &mut out,
        "redirect_agent_cni_restored_total",
        "counter",
        "CNI conflist entry or plugin binary restored after something else removed it, by what.",
    );
    for what in ["entry", "binary"] {
        let _ = writeln!(
            out,
            "redirect_agent_cni_restored_total{{what=\"{what}\"}} {}",
            c.cni_restored.get(what).copied().unwrap_or(0)
        );
    }
    header(
        &mut out,
        "redirect_agent_cni_check_errors_total",
        "counter",
        "Checks of the CNI conflist entry that failed (file unreadable or invalid).",
    );
    let _ = writeln!(
        out,
        "redirect_agent_cni_check_errors_total {}",
        c.cni_check_errors
    );
    header(
        &mut out,
        "redirect_agent_map_full_total",
        "counter",
        "Pod captures refused because a map was full (fail closed: the CNI ADD fails), by map.",
    );
    for map in [
        redirect_common::MAP_PODS,
        redirect_common::MAP_PORTS,
        redirect_common::MAP_CIDRS,
    ] {
        let _ = writeln!(
            out,
            "redirect_agent_map_full_total{{map=\"{map}\"}} {}",
            c.map_full.get(map).copied().unwrap_or(0)
        );
    }
    drop(c);

    if let Some(w) = agent.k8s.get() {
        super::k8s::render_metrics(&mut out, w, agent);
    }

    let names = agent.pod_names();
    // The raw counters (`*_total`): a `redirect stats --zero` only moves
    // what `stats` shows, so these stay monotonic.
    match crate::stats::read(&agent.pins, None).map(|s| s.pods) {
        Ok(pods) => {
            header(&mut out, "redirect_pods", "gauge", "Captured pods.");
            let _ = writeln!(out, "redirect_pods {}", pods.len());
            header(&mut out, "redirect_decisions_total", "counter", "Connections (or calls) per pod and decision, as `redirect stats` (iptables -t nat -L -v packets column).");
            let mut bytes = String::new();
            for p in &pods {
                let pod = esc(names.get(&p.netns_cookie).map(String::as_str).unwrap_or(""));
                for r in &p.rules {
                    let labels = format!(
                        "pod=\"{pod}\",netns_cookie=\"{}\",chain=\"{}\",rule=\"{}\",target=\"{}\"",
                        p.netns_cookie,
                        r.chain.name(),
                        r.rule,
                        r.target
                    );
                    let _ = writeln!(
                        out,
                        "redirect_decisions_total{{{labels}}} {}",
                        r.count_total
                    );
                    if r.bytes_total > 0 {
                        let _ = writeln!(
                            bytes,
                            "redirect_decision_bytes_total{{{labels}}} {}",
                            r.bytes_total
                        );
                    }
                }
            }
            header(
                &mut out,
                "redirect_decision_bytes_total",
                "counter",
                "Bytes per pod and decision (redirected connections, counted when they close).",
            );
            out.push_str(&bytes);
        }
        Err(e) => {
            let _ = writeln!(
                out,
                "# counters unavailable: {}",
                e.to_string().replace('\n', " ")
            );
        }
    }
    match report::status(&agent.pins) {
        Ok(st) => {
            header(
                &mut out,
                "redirect_map_entries",
                "gauge",
                "Entries in use in the maps that grow with pods and traffic.",
            );
            for m in &st.map_usage {
                let _ = writeln!(
                    out,
                    "redirect_map_entries{{map=\"{}\"}} {}",
                    m.map, m.entries
                );
            }
            header(
                &mut out,
                "redirect_map_max_entries",
                "gauge",
                "Capacity of those maps.",
            );
            for m in &st.map_usage {
                let _ = writeln!(
                    out,
                    "redirect_map_max_entries{{map=\"{}\"}} {}",
                    m.map, m.max_entries
                );
            }
            header(&mut out, "redirect_counters_lost_total", "counter", "Counter updates lost because REDIRECT_COUNTERS was full (the decisions were applied; only their counts are missing).");
            let _ = writeln!(out, "redirect_counters_lost_total {}", st.counters_lost);
        }
        Err(e) => {
            let _ = writeln!(
                out,
                "# map usage unavailable: {}",
                e.to_string().replace('\n', " ")
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn label_escaping() {
        assert_eq!(super::esc("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
