//! Steady traffic with every byte checked end to end, for the tests that
//! restart or replace the agent under load (reliability.rs, image.rs):
//! loops of short echo connections (churn, compared byte for byte) and
//! long paced transfers (xfer, checked by hash), run by the kit placed in
//! a pod's netns and cgroup as its app.
#![allow(dead_code)]

use std::sync::{
    atomic::{AtomicBool, Ordering},
    Arc,
};
use std::time::Duration;

use redirect_tests::{run_kit, Placement};
use serde_json::Value;

/// What one traffic loop saw.
#[derive(Default, Debug)]
pub struct Tally {
    pub conns: u64,
    pub failures: u64,
    pub bytes: u64,
    pub errors: Vec<String>,
    pub runs: u64,
}

impl Tally {
    pub fn add(&mut self, o: &Tally) {
        self.conns += o.conns;
        self.failures += o.failures;
        self.bytes += o.bytes;
        self.runs += o.runs;
        self.errors.extend(o.errors.iter().take(5).cloned());
    }
}

/// (connections ok, failures, verified bytes, error) of one tool report.
pub type Score = fn(&Value) -> (u64, u64, u64, Option<String>);

/// Run `args` again and again until `stop`; `score` turns each report
/// into its figures.
pub fn traffic_loop(
    p: Placement,
    args: Vec<String>,
    stop: Arc<AtomicBool>,
    score: Score,
) -> std::thread::JoinHandle<Tally> {
    std::thread::spawn(move || {
        let mut t = Tally::default();
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        while !stop.load(Ordering::SeqCst) {
            let run = run_kit(&p, &refs, Duration::from_secs(60));
            t.runs += 1;
            if run.timed_out {
                t.failures += 1;
                t.errors.push(format!("{args:?} timed out: {}", run.stderr));
                continue;
            }
            let (ok, failed, bytes, err) = score(&run.report());
            t.conns += ok;
            t.failures += failed;
            t.bytes += bytes;
            if let Some(e) = err {
                t.errors.push(e);
            }
        }
        t
    })
}

/// churn: `count` connections, each `rounds` exchanges of `size` bytes
/// echoed and compared byte for byte.
pub fn churn_args(dst: &str, count: u64, size: usize) -> Vec<String> {
    [
        "churn",
        "--connect",
        dst,
        "--count",
        &count.to_string(),
        "--concurrency",
        "2",
        "--size",
        &size.to_string(),
        "--rounds",
        "2",
        "--timeout-ms",
        "10000",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

pub fn churn_score(r: &Value) -> (u64, u64, u64, Option<String>) {
    let done = r["done"].as_u64().unwrap_or(0);
    let failures = r["failures"].as_u64().unwrap_or(1);
    // Sent and received, 2 rounds of 4096 bytes.
    let err = (failures > 0).then(|| r["errors"].to_string());
    (done, failures, done * 2 * 2 * 4096, err)
}

/// xfer: one long connection (paced, ~1.5 s) whose echo is checked by hash.
pub fn xfer_args(dst: &str) -> Vec<String> {
    [
        "xfer",
        "--connect",
        dst,
        "--size",
        "2097152",
        "--chunks",
        "8192,1000,16384",
        "--pause-us",
        "5000",
        "--pause-every",
        "1",
        "--timeout-ms",
        "10000",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

pub fn xfer_score(r: &Value) -> (u64, u64, u64, Option<String>) {
    let ok = r["ok"] == true
        && r["sent"] == 2097152
        && r["received"] == 2097152
        && r["recv_hash"] == r["sent_hash"];
    if ok {
        (1, 0, 2 * 2097152, None)
    } else {
        (0, 1, 0, Some(r.to_string()))
    }
}
