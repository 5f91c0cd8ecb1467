//! Pod churn (issue 7): `redirect-kit pod-churn` runs a real `redirect
//! daemon` in its own pin dir, socket and child cgroup, and drives the real
//! `redirect-cni` binary through ADD and DEL of many pods (netns with a
//! veth, own cgroup directory, one checked redirected connection each)
//! while a long-lived captured pod carries steady content-checked traffic.
//! The driver measures and checks; this test asserts on its checks: no
//! failed connection, every map back to its baseline entry count, the pin
//! directory back to its baseline, every per-pod link, program and map
//! gone from the kernel, the agent's fds and sockets back to baseline, no
//! netns or cgroup directory left, the agent's RSS flat. Timings are
//! benchmark output (`cargo xtask bench --churn`), never asserted.
//!
//! 1000 churned pods and 100 resident ones (captured before the churn and
//! kept through it, as on a full node) by default: under a minute in the
//! debug build on 2 vCPUs. `REDIRECT_CHURN_PODS` changes the churned count.

use std::time::Duration;

use redirect_tests::{kit_bin, run_kit, Placement};
use serde_json::Value;

fn pods() -> usize {
    std::env::var("REDIRECT_CHURN_PODS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000)
}

#[test]
fn churn_of_pods_leaves_nothing_behind_and_memory_flat() {
    assert!(kit_bin().exists());
    let n = pods();
    let run = run_kit(
        &Placement::default(),
        &["pod-churn", "--pods", &n.to_string()],
        Duration::from_secs(900),
    );
    assert!(!run.timed_out, "pod-churn hung; stderr:\n{}", run.stderr);
    eprintln!("{}", run.stderr);
    let r: Value = run.report();
    let checks = r["checks"].as_array().expect("checks");
    let failed: Vec<&Value> = checks.iter().filter(|c| c["ok"] != true).collect();
    assert!(
        failed.is_empty(),
        "failed checks: {failed:#?}\nstderr:\n{}",
        run.stderr
    );
    // The checks that must have run (a report without them proves nothing).
    for want in [
        "every pinned map back to its baseline entry count",
        "pin directory back to its baseline listing",
        "every per-pod sk_lookup link, program and .rodata map freed",
        "agent fds and sockets back to baseline",
        "no pod netns left",
        "no pod cgroup directory left",
        "agent memory flat",
        "steady traffic: zero failed connections, every byte checked",
    ] {
        assert!(
            checks.iter().any(|c| c["name"] == want),
            "check {want:?} missing from {checks:#?}"
        );
    }
    assert_eq!(r["ok"], true);
    assert_eq!(r["pods"].as_u64(), Some(n as u64));
    assert_eq!(
        r["pod_traffic_ok"].as_u64(),
        Some(n as u64),
        "every churned pod's connection was redirected and checked"
    );
    assert_eq!(r["kernel_objects_created"].as_u64(), Some(n as u64));
    assert!(r["steady"]["connections"].as_u64().unwrap() > 0);
    // The churned pods really filled the maps in between (the baseline
    // comparison is not vacuous).
    for m in [
        "REDIRECT_PODS",
        "REDIRECT_PORTS",
        "REDIRECT_CIDRS",
        "REDIRECT_COUNTERS",
    ] {
        let (base, peak) = (
            r["maps_baseline"][m].as_u64().unwrap(),
            r["maps_peak"][m].as_u64().unwrap(),
        );
        assert!(peak > base, "{m}: peak {peak} not above baseline {base}");
    }
    assert_eq!(r["add_agent_ms"]["n"].as_u64(), Some(n as u64));
    assert_eq!(r["del_agent_ms"]["n"].as_u64(), Some(n as u64));
}
