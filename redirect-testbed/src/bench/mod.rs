//! `cargo xtask bench`: the eBPF path vs Istio's iptables path, side by
//! side, in one run on one machine (docs/benchmark.md). The load generator, the
//! sidecar proxy and the servers are in here too, run as hidden
//! `redirect-kit` subcommands, so every configuration uses the same code.
pub mod hist;
pub mod loadgen;
pub mod model;
pub mod net;
pub mod report;
pub mod runner;
pub mod svg;
pub mod trace_cost;
