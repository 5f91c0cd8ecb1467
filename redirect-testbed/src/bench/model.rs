//! What a benchmark run is made of and produces: the configurations,
//! placements and tests, the samples and path checks, and the machine.
//! The runner fills a [`Run`]; the report reads it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::loadgen::Mode;

/// The upstream echo server's port.
pub const ECHO_PORT: u16 = 7001;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Cfg {
    A,
    B,
    C,
    D,
    E,
}

impl Cfg {
    pub const ALL: [Cfg; 5] = [Cfg::A, Cfg::B, Cfg::C, Cfg::D, Cfg::E];
    pub const SCALED: [Cfg; 3] = [Cfg::C, Cfg::D, Cfg::E];

    pub fn describe(self) -> &'static str {
        match self {
            Cfg::A => "no proxy: app → server directly",
            Cfg::B => "proxy addressed directly (fixed upstream), no capture",
            Cfg::C => "Istio's iptables nat rules (REDIRECT) in the pod netns",
            Cfg::D => "eBPF redirect without acceleration (`redirect attach --no-accel`)",
            Cfg::E => "eBPF redirect with sockops/sk_msg acceleration (`redirect attach --accel`)",
        }
    }

    pub fn color(self) -> &'static str {
        match self {
            Cfg::A => "#7f7f7f",
            Cfg::B => "#9467bd",
            Cfg::C => "#d62728",
            Cfg::D => "#1f77b4",
            Cfg::E => "#2ca02c",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Place {
    /// Client, proxy and server all on CPU 0.
    Same,
    /// Client on CPU 0, proxy and server on CPU 1.
    Split,
}

impl Place {
    pub fn describe(self) -> &'static str {
        match self {
            Place::Same => "one CPU: client, proxy and server all on CPU 0",
            Place::Split => "two CPUs: client on CPU 0, proxy and server on CPU 1",
        }
    }

    pub fn short(self) -> &'static str {
        match self {
            Place::Same => "one CPU",
            Place::Split => "two CPUs",
        }
    }

    pub(super) fn cpus(self) -> (usize, usize) {
        match self {
            Place::Same => (0, 0),
            Place::Split => (0, 1),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Test {
    Rr64,
    Rr1k,
    Rr16k,
    Conn,
    Bulk,
    Open,
    /// App↔proxy leg: app (uid 1000) → proxy-side echo (uid 1337, :15001)
    /// in the pod, 64 B request/response: through capture in D and E,
    /// plain loopback TCP to 127.0.0.1:15001 in A (no capture).
    Leg64,
    /// The same two processes over an AF_UNIX stream pair (A only).
    Unix64,
}

impl Test {
    pub const ALL: [Test; 6] = [
        Test::Rr64,
        Test::Rr1k,
        Test::Rr16k,
        Test::Conn,
        Test::Bulk,
        Test::Open,
    ];

    pub fn describe(self) -> &'static str {
        match self {
            Test::Rr64 => "request/response 64 B",
            Test::Rr1k => "request/response 1 KiB",
            Test::Rr16k => "request/response 16 KiB",
            Test::Conn => "connection (connect + 64 B exchange + close)",
            Test::Bulk => "bulk upload",
            Test::Open => "open loop 64 B",
            Test::Leg64 => "app↔proxy leg request/response 64 B (TCP)",
            Test::Unix64 => "app↔proxy leg request/response 64 B (AF_UNIX)",
        }
    }

    pub(super) fn mode(self) -> (Mode, usize) {
        match self {
            Test::Rr64 => (Mode::Rr, 64),
            Test::Rr1k => (Mode::Rr, 1024),
            Test::Rr16k => (Mode::Rr, 16384),
            Test::Conn => (Mode::Conn, 64),
            Test::Bulk => (Mode::Bulk, 0),
            Test::Open => (Mode::Open, 64),
            Test::Leg64 => (Mode::Rr, 64),
            Test::Unix64 => (Mode::Unix, 64),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
pub enum ProxyKind {
    /// The workspace's own event-loop sidecar (`redirect-kit bench-proxy`).
    Kit,
    /// Debian's haproxy (`server 0.0.0.0:0`: SO_ORIGINAL_DST, IPv4).
    Haproxy,
}

/// Durations and counts of one run.
#[derive(Clone, Debug, Serialize)]
pub struct Settings {
    pub quick: bool,
    pub reps: usize,
    pub warmup_round: bool,
    pub duration_ms: u64,
    pub warmup_ms: u64,
    pub open_rate: u64,
    pub rule_counts: Vec<usize>,
    pub places: Vec<Place>,
    pub proxy: ProxyKind,
}

/// One measurement.
#[derive(Clone, Debug, Serialize)]
pub struct Sample {
    pub rep: usize,
    pub cfg: Cfg,
    pub place: Place,
    pub test: Test,
    /// Extra rules (C) or exclusion entries (D, E).
    pub rules: usize,
    pub rate: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub gbit_s: f64,
    pub cpu_s_per_gb: f64,
    pub conns: u64,
    #[serde(skip)]
    pub hist: Vec<[u64; 2]>,
}

/// The outcome of one path check.
#[derive(Clone, Debug, Serialize)]
pub struct Check {
    pub rep: usize,
    pub cfg: Cfg,
    pub rules: usize,
    /// An app↔proxy leg environment (echo as the proxy).
    pub leg: bool,
    pub ok: bool,
    pub detail: String,
}

/// Everything the report is made from.
pub struct Run {
    pub settings: Settings,
    pub samples: Vec<Sample>,
    pub checks: Vec<Check>,
    /// "ACCEL" counter rows seen in E (rule → count), summed over runs.
    pub accel: BTreeMap<String, u64>,
    pub accel_rows_present: bool,
    /// The same for the E leg environments.
    pub leg_accel: BTreeMap<String, u64>,
    pub leg_accel_rows_present: bool,
    pub machine: Machine,
    pub started: String,
    pub elapsed_s: f64,
    pub load_before: String,
    pub load_after: String,
}

/// The machine a run came from.
#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    pub nproc: usize,
    pub kernel: String,
    pub cpu: String,
    pub mem_gib: f64,
    pub hypervisor: bool,
}

impl Machine {
    pub fn probe() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| {
                l.strip_prefix("model name")
                    .and_then(|r| r.split_once(':'))
                    .map(|(_, v)| v.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        let hypervisor = cpuinfo
            .lines()
            .any(|l| l.starts_with("flags") && l.split_whitespace().any(|f| f == "hypervisor"));
        let mem_kib: f64 = std::fs::read_to_string("/proc/meminfo")
            .unwrap_or_default()
            .lines()
            .find_map(|l| {
                l.strip_prefix("MemTotal:")
                    .and_then(|v| v.split_whitespace().next()?.parse().ok())
            })
            .unwrap_or(0.0);
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_string();
        Machine {
            nproc: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            kernel,
            cpu,
            mem_gib: mem_kib / 1048576.0,
            hypervisor,
        }
    }

    pub fn describe(&self) -> String {
        format!(
            "{} {}CPU{} ({}), {:.0} GiB RAM, Linux {}",
            self.nproc,
            if self.hypervisor { "v" } else { "" },
            if self.nproc == 1 { "" } else { "s" },
            self.cpu,
            self.mem_gib,
            self.kernel
        )
    }
}
