//! Build, test and demo tasks.
//!
//! The eBPF object is built by a nightly cargo for `bpfel-unknown-none`; the
//! userspace crate embeds it from `target/bpfel-unknown-none/release/redirect`,
//! so every host build is preceded by a release eBPF build. Host crates are
//! built by the stable toolchain running xtask. Everything builds into
//! `<workspace>/target`, whatever `CARGO_TARGET_DIR` says, so the paths above
//! and the test binaries' `REDIRECT_BIN_DIR` hold.

use std::{
    env,
    path::PathBuf,
    process::{Command, ExitCode},
};

use anyhow::{bail, Context, Result};

use crate::{
    cmd::{self, workspace_root},
    setup::Toolchain,
};

/// The eBPF crate; it only builds for the BPF target, so host builds skip it.
const EBPF_PACKAGE: &str = "redirect-ebpf";
const EBPF_TARGET: &str = "bpfel-unknown-none";
/// Test threads unless `REDIRECT_TEST_THREADS` says otherwise.
const DEFAULT_TEST_THREADS: usize = 2;

fn target_dir() -> PathBuf {
    workspace_root().join("target")
}

fn profile_dir(debug: bool) -> &'static str {
    if debug {
        "debug"
    } else {
        "release"
    }
}

/// Builds the eBPF object (release unless `debug`) and returns its path.
pub fn build_ebpf(toolchain: &Toolchain, debug: bool) -> Result<PathBuf> {
    let target_dir = target_dir();
    let mut build = cmd::nightly("cargo");
    build
        .current_dir(workspace_root())
        .args([
            "build",
            "-p",
            EBPF_PACKAGE,
            "--target",
            EBPF_TARGET,
            "-Z",
            "build-std=core",
            // BTF: the socket-local storage map needs its value type, and
            // every function called from a program (compiler_builtins'
            // memset/memcpy too) needs its func_info, hence debug info for
            // every crate of the object.
            "--config",
            "profile.release.package.\"*\".debug=2",
        ])
        // --disable-expand-memcpy-in-order: LLVM expands every constant
        // memset/memcpy into stores instead of calling compiler_builtins'.
        // A called function is a stack frame of its own, and Linux 5.10's
        // verifier rounds each frame up to 32 bytes: the IPv6 connect and
        // sendmsg programs, which use nearly all of the 512 bytes, would
        // exceed it there (tests/tests/kernel_features.rs checks).
        // --export: `redirect_log_decision` stays a global function: the
        // kernel verifies it once, not on every path that calls it (log.rs).
        .env(
            "CARGO_TARGET_BPFEL_UNKNOWN_NONE_RUSTFLAGS",
            "-C link-arg=--btf -C link-arg=--disable-expand-memcpy-in-order -C link-arg=--export=redirect_log_decision",
        )
        .arg("--target-dir")
        .arg(&target_dir);
    if !debug {
        build.arg("--release");
    }
    // rustc finds bpf-linker on PATH; it may sit in an install root that isn't.
    if let Some(path) = toolchain.bpf_linker.parent().and_then(cmd::path_with) {
        build.env("PATH", path);
    }
    cmd::run(&mut build)
        .context("building the eBPF object failed; see the compiler output above")?;

    let object = target_dir
        .join(EBPF_TARGET)
        .join(profile_dir(debug))
        .join("redirect");
    if !object.is_file() {
        bail!(
            "the eBPF build succeeded but {} does not exist",
            object.display()
        );
    }
    println!("eBPF object: {}", object.display());
    Ok(object)
}

/// Host binaries of the whole workspace (minus the eBPF crate).
fn build_host(debug: bool) -> Result<()> {
    let mut build = host_cargo("build");
    build.arg("--bins");
    if !debug {
        build.arg("--release");
    }
    cmd::run(&mut build).context("building the host binaries failed; see the compiler output above")
}

/// `cargo <subcommand> --workspace` for the host crates, into `target/`.
fn host_cargo(subcommand: &str) -> Command {
    let mut cargo = cmd::cargo();
    cargo
        .current_dir(workspace_root())
        .args([
            subcommand,
            "--workspace",
            "--exclude",
            EBPF_PACKAGE,
            "--target-dir",
        ])
        .arg(target_dir());
    cargo
}

/// Release eBPF object, then host binaries (release unless `debug`).
pub fn build(toolchain: &Toolchain, debug: bool) -> Result<()> {
    build_ebpf(toolchain, false)?;
    build_host(debug)?;
    println!(
        "binaries: {}",
        target_dir().join(profile_dir(debug)).display()
    );
    Ok(())
}

/// `cargo fmt --check` on the workspace and on fuzz/ (its own workspace),
/// then clippy on the host crates with warnings denied (clippy compiles the
/// userspace crate, which embeds the eBPF object: that is built first).
pub fn lint(toolchain: &Toolchain) -> Result<()> {
    cmd::run(
        cmd::cargo()
            .current_dir(workspace_root())
            .args(["fmt", "--all", "--check"]),
    )
    .context("the workspace is not formatted: run `cargo fmt --all`")?;
    cmd::run(
        cmd::cargo()
            .current_dir(workspace_root().join("fuzz"))
            .args(["fmt", "--all", "--check"]),
    )
    .context("fuzz/ is not formatted: run `cargo fmt --all` in fuzz/")?;
    build_ebpf(toolchain, false)?;
    let mut clippy = host_cargo("clippy");
    clippy.args(["--all-targets", "--", "-D", "warnings"]);
    cmd::run(&mut clippy).context("clippy found problems; see its output above")
}

/// Builds everything in debug, then runs the workspace tests; `extra` goes to
/// the test binaries. Returns cargo test's exit code: its own output (ending
/// in `test result:` lines) is the report.
pub fn test(toolchain: &Toolchain, extra: &[String]) -> Result<ExitCode> {
    build_ebpf(toolchain, false)?;
    build_host(true)?;
    // The image test builds the image from the static binaries.
    let image_context = crate::image::prepare_context(toolchain)?;

    let bin_dir = target_dir().join("debug");
    let mut test = host_cargo("test");
    // No doc tests: the crates have none, and their empty runs would be
    // the last lines a CI log reader sees.
    test.args(["--no-fail-fast", "--lib", "--bins", "--tests"])
        .env("REDIRECT_BIN_DIR", &bin_dir)
        .env(crate::image::CONTEXT_ENV, &image_context)
        .arg("--");
    if !extra.iter().any(|arg| arg.starts_with("--test-threads")) {
        test.arg(format!("--test-threads={}", test_threads()?));
    }
    test.args(extra);

    let (status, totals) = run_counting(&mut test)?;
    println!(
        "summary: {} passed, {} failed, {} skipped",
        totals.passed, totals.failed, totals.ignored
    );
    Ok(ExitCode::from(cmd::exit_code(status)))
}

/// Sums of cargo's per-binary `test result:` lines.
#[derive(Default, Debug, PartialEq)]
struct Totals {
    passed: u64,
    failed: u64,
    ignored: u64,
}

impl Totals {
    /// Add one `test result: ok. 3 passed; 0 failed; 1 ignored; ...` line.
    fn add_line(&mut self, line: &str) {
        let Some(rest) = line.trim().strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(what), Some(n)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(n) = n.parse::<u64>() else { continue };
            match what {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                "ignored" => self.ignored += n,
                _ => {}
            }
        }
    }
}

/// Run with stdout passed through line by line, counting test results.
fn run_counting(test: &mut Command) -> Result<(std::process::ExitStatus, Totals)> {
    use std::io::{BufRead, BufReader, Write};
    println!("==> {}", cmd::display(test));
    let mut child = test
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("starting cargo test")?;
    let mut totals = Totals::default();
    let out = child.stdout.take().expect("piped stdout");
    let mut stdout = std::io::stdout();
    for line in BufReader::new(out).lines() {
        let line = line.context("reading cargo test output")?;
        totals.add_line(&line);
        let _ = writeln!(stdout, "{line}");
    }
    let status = child.wait().context("waiting for cargo test")?;
    Ok((status, totals))
}

/// Where benchmark results go: `out` (relative to the current directory)
/// or `<workspace>/results`.
fn results_dir(out: Option<PathBuf>) -> Result<PathBuf> {
    Ok(match out {
        Some(dir) if dir.is_relative() => env::current_dir()?.join(dir),
        Some(dir) => dir,
        None => workspace_root().join("results"),
    })
}

/// Release build, then `redirect-kit pod-churn`: results in
/// `<out>/latest/churn.md` and `churn.json`.
pub fn bench_churn(
    toolchain: &Toolchain,
    pods: usize,
    resident: usize,
    out: Option<PathBuf>,
) -> Result<()> {
    if !cmd::is_root() {
        bail!("the churn benchmark creates namespaces, cgroups and BPF programs and runs the agent: run it as root");
    }
    build(toolchain, false)?;
    let out = results_dir(out)?;
    let binary = target_dir().join("release/redirect-kit");
    let mut churn = Command::new(&binary);
    churn
        .current_dir(workspace_root())
        .args([
            "pod-churn",
            "--pods",
            &pods.to_string(),
            "--resident",
            &resident.to_string(),
            "--out",
        ])
        .arg(out.join("latest"));
    Err(cmd::exec(&mut churn)).with_context(|| format!("could not run {}", binary.display()))
}

fn test_threads() -> Result<usize> {
    match env::var("REDIRECT_TEST_THREADS") {
        Ok(value) => value
            .trim()
            .parse()
            .ok()
            .filter(|&threads| threads > 0)
            .with_context(|| {
                format!("REDIRECT_TEST_THREADS must be a positive integer, got {value:?}")
            }),
        Err(_) => Ok(DEFAULT_TEST_THREADS),
    }
}

/// Release build, then replaces xtask with `redirect-kit demo` (the
/// testbed's binary), so the demo owns the terminal and its exit code is
/// ours.
pub fn demo(toolchain: &Toolchain) -> Result<()> {
    build(toolchain, false)?;
    let binary = target_dir().join("release/redirect-kit");
    let mut demo = Command::new(&binary);
    demo.current_dir(workspace_root()).arg("demo");
    Err(cmd::exec(&mut demo)).with_context(|| {
        format!(
            "could not run {}; was it built by `cargo xtask build`?",
            binary.display()
        )
    })
}

/// Debug build (as `test` makes it), then replaces xtask with
/// `redirect-kit diff-test`, so its output and exit code are ours.
pub fn diff_test(
    toolchain: &Toolchain,
    cases: usize,
    seed: Option<u64>,
    quiet: bool,
) -> Result<()> {
    if !cmd::is_root() {
        bail!("the differential test creates namespaces, cgroups, iptables rules and BPF programs: run it as root");
    }
    build(toolchain, true)?;
    let binary = target_dir().join("debug/redirect-kit");
    let mut diff = Command::new(&binary);
    diff.current_dir(workspace_root())
        .args(["diff-test", "--cases", &cases.to_string()]);
    if let Some(s) = seed {
        diff.args(["--seed", &s.to_string()]);
    }
    if quiet {
        diff.arg("--quiet");
    }
    Err(cmd::exec(&mut diff)).with_context(|| format!("could not run {}", binary.display()))
}

/// Release build, then replaces xtask with `redirect-kit bookinfo` (which
/// handles Ctrl-C by cleaning up). `--update-readme` names the
/// workspace's README.md; `--markdown` is relative to the current
/// directory.
pub fn demo_bookinfo(
    toolchain: &Toolchain,
    calls: Option<u64>,
    markdown: Option<PathBuf>,
    update_readme: bool,
) -> Result<()> {
    if !cmd::is_root() {
        bail!("the Bookinfo demo creates namespaces, cgroups, iptables rules and BPF programs: run it as root");
    }
    build(toolchain, false)?;
    let binary = target_dir().join("release/redirect-kit");
    let mut demo = Command::new(&binary);
    demo.current_dir(workspace_root()).arg("bookinfo");
    if let Some(n) = calls {
        demo.args(["--calls", &n.to_string()]);
    }
    if let Some(f) = markdown {
        demo.arg("--markdown").arg(env::current_dir()?.join(f));
    }
    if update_readme {
        demo.arg("--update-readme")
            .arg(workspace_root().join("README.md"));
    }
    Err(cmd::exec(&mut demo)).with_context(|| format!("could not run {}", binary.display()))
}

/// Release build, then replaces xtask with `redirect-kit bench` (which
/// handles Ctrl-C by cleaning up), so its output and exit code are ours.
pub fn bench(toolchain: &Toolchain, quick: bool, proxy: &str, out: Option<PathBuf>) -> Result<()> {
    if !cmd::is_root() {
        bail!("the benchmark creates namespaces, cgroups, iptables rules and BPF programs: run it as root");
    }
    build(toolchain, false)?;
    let out = results_dir(out)?;
    let binary = target_dir().join("release/redirect-kit");
    let mut bench = Command::new(&binary);
    bench
        .current_dir(workspace_root())
        .args(["bench", "--proxy", proxy, "--out"])
        .arg(&out);
    if quick {
        bench.arg("--quick");
    }
    Err(cmd::exec(&mut bench)).with_context(|| format!("could not run {}", binary.display()))
}

#[cfg(test)]
mod totals_tests {
    use super::Totals;

    #[test]
    fn sums_result_lines() {
        let mut t = Totals::default();
        t.add_line("test result: ok. 14 passed; 0 failed; 2 ignored; 0 measured; 0 filtered out; finished in 0.01s");
        t.add_line(
            "test result: FAILED. 1 passed; 3 failed; 0 ignored; 0 measured; 0 filtered out",
        );
        t.add_line("running 3 tests");
        assert_eq!(
            t,
            Totals {
                passed: 15,
                failed: 3,
                ignored: 2
            }
        );
    }
}
