//! Userspace side of redirect: flag parsing, loading and attaching the
//! kernel programs, pod registration, counters and status.
pub mod agent;
pub mod annotations;
pub mod attach;
pub mod bpf;
pub mod cgroups;
pub mod cni;
pub mod config;
pub mod error;
pub mod kernlog;
pub mod maps;
pub mod mapsize;
pub mod owner;
pub mod pins;
pub mod placement;
pub mod podfiles;
pub mod podns;
pub mod probe;
pub mod report;
pub mod sklookup;
pub mod sockopt;
pub mod stats;
pub mod sys;
pub mod upgrade;
pub mod wire;
