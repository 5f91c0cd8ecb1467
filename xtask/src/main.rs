//! `cargo xtask`: developer and CI tasks for the redirector workspace.
//!
//! * `setup`      install missing prerequisites (also run by the tasks below)
//! * `build-ebpf` build the eBPF object with the nightly toolchain
//! * `build`      eBPF object plus the host binaries
//! * `lint`       cargo fmt --check and clippy -D warnings
//! * `test`       build in debug, then run the workspace tests
//! * `demo`       release build, then `redirect-kit demo` (`--bookinfo`:
//!   `redirect-kit bookinfo`)
//! * `bench`      release build, then the eBPF-vs-iptables benchmark
//! * `diff-test`  debug build, then the differential test against Istio's rules
//! * `image`      static binaries, then the node agent's OCI image (podman)
//! * `kernels`    the privileged tests on other kernels, under QEMU
//!
//! Every external command is echoed as `==> cmd` before it runs.

mod cmd;
mod image;
mod kernels;
mod setup;
mod tasks;

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Build, test and demo tasks for the redirector"
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install missing apt packages, the nightly toolchain with rust-src and
    /// bpf-linker, and check the kernel for cgroup2 and BTF.
    Setup {
        /// Rebuild bpf-linker even if a working one is installed.
        #[arg(long)]
        reinstall_bpf_linker: bool,
    },
    /// Build the eBPF object into target/bpfel-unknown-none/<profile>/redirect.
    BuildEbpf {
        /// Use the dev profile (the userspace binary embeds the release object).
        #[arg(long)]
        debug: bool,
    },
    /// Build the release eBPF object, then the host binaries.
    Build {
        /// Build the host binaries with the dev profile.
        #[arg(long)]
        debug: bool,
    },
    /// Build everything, then run the workspace tests (as root for the e2e tests).
    ///
    /// Tests run with --test-threads=$REDIRECT_TEST_THREADS (default 2).
    Test {
        /// Extra arguments for the test binaries, e.g. `-- --nocapture`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Formatting and lint checks, as CI runs them: `cargo fmt --check` (the
    /// workspace and fuzz/) and clippy with warnings denied.
    Lint,
    /// Release build, then run `target/release/redirect-kit demo`.
    Demo {
        /// Instead: Bookinfo's call chain with no mesh, with HAProxy
        /// sidecars behind iptables and behind redirect, interleaved
        /// (`redirect-kit bookinfo`).
        #[arg(long)]
        bookinfo: bool,
        /// With --bookinfo: measured calls per configuration.
        #[arg(long, requires = "bookinfo")]
        calls: Option<u64>,
        /// With --bookinfo: also write the README's block to this file.
        #[arg(long, requires = "bookinfo")]
        markdown: Option<std::path::PathBuf>,
        /// With --bookinfo: regenerate the README's Bookinfo block
        /// (between its `bookinfo-demo` markers) from this run.
        #[arg(long, requires = "bookinfo")]
        update_readme: bool,
    },
    /// Debug build, then the differential test (as root): random
    /// istio-iptables configurations and connections, a pod with Istio's
    /// own rules (iptables-restore) against a pod captured by redirect.
    /// Prints the cases, each mismatch with a one-line reproduction, and
    /// `N passed, N failed`.
    DiffTest {
        /// Connections in all (about 12 per configuration).
        #[arg(long, default_value = "300")]
        cases: usize,
        /// Generator seed (default: from the clock; printed, so a run can
        /// be repeated).
        #[arg(long)]
        seed: Option<u64>,
        /// Print only mismatches and totals.
        #[arg(long)]
        quiet: bool,
    },
    /// Release build, then the benchmark (docs/benchmark.md: eBPF vs iptables),
    /// as root; writes results/<timestamp>/report.md and SVG plots.
    Bench {
        /// Smoke run: 2 short repetitions, under 2 minutes.
        #[arg(long)]
        quick: bool,
        /// Sidecar proxy: `kit` (the workspace's) or `haproxy` (Debian's).
        #[arg(long, default_value = "kit")]
        proxy: String,
        /// Results directory (default: <workspace>/results).
        #[arg(long)]
        out: Option<std::path::PathBuf>,
        /// Instead: pod churn against a real agent (attach/detach time per
        /// pod, leak checks, agent memory); writes <out>/latest/churn.md
        /// and churn.json.
        #[arg(long)]
        churn: bool,
        /// Pods for --churn.
        #[arg(long, default_value = "1000")]
        pods: usize,
        /// Pods kept captured through the --churn run.
        #[arg(long, default_value = "100")]
        resident: usize,
    },
    /// Build the node agent's OCI image (deploy/Dockerfile, FROM scratch)
    /// from static (musl) release binaries with podman, or buildah; prints
    /// its id and size. Nothing is pulled.
    Image {
        /// Image name and tag (default: localhost/redirect:<version>).
        #[arg(long)]
        tag: Option<String>,
    },
    /// Boot other kernels (Debian's 5.10, 6.1, 6.12) under QEMU and run the
    /// privileged end-to-end tests in each; one summary line per kernel.
    ///
    /// Kernels are fetched into target/kernels/ (cached); see docs/kernels.md.
    Kernels {
        /// Kernels to boot (repeat or comma-separate): 5.10, 6.1, 6.12, all.
        #[arg(long = "kernel", value_name = "NAME")]
        kernels: Vec<String>,
        /// Tests to run in each guest (repeat or comma-separate): `default`
        /// (CI's selection), `all`, a test file (`inbound`) or one test
        /// (`cli::uninstall_leaves_nothing_and_connections_go_direct`).
        #[arg(long, value_name = "SELECTION")]
        tests: Vec<String>,
        /// Deadline of each test binary in a guest, in seconds.
        #[arg(long, default_value = "900", value_name = "SECS")]
        test_timeout: u64,
        /// `--test-threads` in the guests (they have 2 CPUs).
        #[arg(long, default_value = "2")]
        threads: usize,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse().task) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error}");
            for cause in error.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}

fn run(task: Task) -> Result<ExitCode> {
    match task {
        Task::Setup {
            reinstall_bpf_linker,
        } => {
            setup::setup(reinstall_bpf_linker)?;
        }
        Task::BuildEbpf { debug } => {
            tasks::build_ebpf(&setup::setup(false)?, debug)?;
        }
        Task::Build { debug } => tasks::build(&setup::setup(false)?, debug)?,
        Task::Test { args } => return tasks::test(&setup::setup(false)?, &args),
        Task::Lint => tasks::lint(&setup::setup(false)?)?,
        Task::DiffTest { cases, seed, quiet } => {
            tasks::diff_test(&setup::setup(false)?, cases, seed, quiet)?
        }
        Task::Demo {
            bookinfo: false, ..
        } => tasks::demo(&setup::setup(false)?)?,
        Task::Demo {
            bookinfo: true,
            calls,
            markdown,
            update_readme,
        } => tasks::demo_bookinfo(&setup::setup(false)?, calls, markdown, update_readme)?,
        Task::Bench {
            churn: true,
            out,
            pods,
            resident,
            ..
        } => tasks::bench_churn(&setup::setup(false)?, pods, resident, out)?,
        Task::Bench {
            quick, proxy, out, ..
        } => tasks::bench(&setup::setup(false)?, quick, &proxy, out)?,
        Task::Image { tag } => image::image(&setup::setup(false)?, tag)?,
        Task::Kernels {
            kernels,
            tests,
            test_timeout,
            threads,
        } => {
            let opts = kernels::Options {
                kernels,
                tests,
                test_timeout: std::time::Duration::from_secs(test_timeout),
                threads,
            };
            return kernels::run(&setup::setup(false)?, &opts);
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test_args(argv: &[&str]) -> Vec<String> {
        match Cli::try_parse_from(argv).expect("parses").task {
            Task::Test { args } => args,
            _ => panic!("not the test task"),
        }
    }

    #[test]
    fn test_task_passes_extra_args_through() {
        assert!(test_args(&["xtask", "test"]).is_empty());
        assert_eq!(
            test_args(&["xtask", "test", "--", "--nocapture", "e2e::"]),
            ["--nocapture", "e2e::"]
        );
        assert_eq!(test_args(&["xtask", "test", "e2e::"]), ["e2e::"]);
    }
}
