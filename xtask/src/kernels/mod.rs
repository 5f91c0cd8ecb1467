//! `cargo xtask kernels`: the privileged end-to-end tests on other kernels,
//! each booted under QEMU (TCG) with virtme-ng.
//!
//! 1. Builds what `cargo xtask test` builds and finds the test binaries.
//! 2. Fetches each kernel of [`KERNELS`] from Debian's archive (newest
//!    `linux-image-amd64` of its version line) into `target/kernels/<name>/`
//!    (see [`apt`]); a cached kernel is reused, also when apt is offline.
//! 3. Boots it with the host's root shared read-only; the guest runs the
//!    selected tests (see [`guest`]) and writes its results into
//!    `target/kernels/<name>/run/`, which the host reads afterwards.
//! 4. Prints per kernel the program load / acceleration probe outcome,
//!    the per-file results, a check of docs/kernels.md's feature table
//!    against the kernel (see [`features`]), and one line
//!    `<kernel>: N passed, N failed, N skipped`; then the total.
//!
//! A kernel that cannot be fetched or does not boot, and a guest that
//! outlives its deadline, fail the run with a message naming the kernel;
//! the VM is killed (see [`vm`]).

mod apt;
pub mod features;
mod guest;
mod vm;

use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::{
    cmd::{self, workspace_root},
    setup::Toolchain,
    tasks,
};

/// A kernel of the matrix: the newest Debian `linux-image-amd64` whose
/// version starts with `name`.
#[derive(Debug)]
pub struct Kernel {
    /// Version line, also the name on the command line and in the summary.
    pub name: &'static str,
    /// Where Debian ships it.
    pub from: &'static str,
    /// Set while the project is known not to work on this kernel: its test
    /// failures are shown but not counted (a boot or harness failure still
    /// is). The text says why.
    pub known_gap: Option<&'static str>,
}

pub const KERNELS: &[Kernel] = &[
    Kernel {
        name: "5.10",
        from: "Debian 11 bullseye (-security)",
        known_gap: None,
    },
    Kernel {
        name: "6.1",
        from: "Debian 12 bookworm (-security)",
        known_gap: None,
    },
    Kernel {
        name: "6.12",
        from: "Debian 12 bookworm-backports",
        known_gap: None,
    },
];

/// The pinned virtme-ng release (PyPI), installed by `cargo xtask setup`.
pub const VIRTME_NG: &str = "virtme-ng==1.42";
const GUEST_MEMORY: &str = "2G";
const GUEST_CPUS: usize = 2;
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
/// Time for the guest's work besides the tests (copying the binaries, the
/// load/probe attach, bpftool, shutting down).
const GUEST_OVERHEAD: Duration = Duration::from_secs(240);

/// The venv holding virtme-ng (`vng`).
pub fn virtme_venv() -> PathBuf {
    workspace_root().join("target/tools/virtme-ng")
}

fn cache_dir() -> PathBuf {
    workspace_root().join("target/kernels")
}

pub struct Options {
    /// Kernel names; empty means all of [`KERNELS`].
    pub kernels: Vec<String>,
    /// Test selections (see [`guest::parse_selection`]); empty means the default.
    pub tests: Vec<String>,
    /// Deadline of each test binary in a guest.
    pub test_timeout: Duration,
    /// `--test-threads` in the guests.
    pub threads: usize,
}

/// Everything of one kernel's run that the summary needs.
struct Outcome {
    kernel: &'static Kernel,
    tally: guest::Tally,
    /// Harness failures (fetch, boot, deadline), counted even for a known gap.
    errors: Vec<String>,
    /// Feature-table disagreements, counted even for a known gap.
    feature_problems: Vec<String>,
}

pub fn run(toolchain: &Toolchain, opts: &Options) -> Result<ExitCode> {
    let kernels = select_kernels(&opts.kernels)?;
    let selection = if opts.tests.is_empty() {
        vec!["default".to_string()]
    } else {
        opts.tests.clone()
    };
    let runs = guest::parse_selection(&selection)?;
    if opts.threads == 0 {
        bail!("--threads must be at least 1");
    }
    let vng = virtme_venv().join("bin/vng");
    if !cmd::is_executable(&vng) {
        bail!(
            "{} is missing; run `cargo xtask setup` (it installs virtme-ng, qemu-system-x86 and kmod)",
            vng.display()
        );
    }
    let (_, table) = features::read(&workspace_root())?;

    tasks::build(toolchain, true)?;
    let exes = test_executables()?;
    check_selection(&runs, &exes)?;
    let staged = cache_dir().join("bin");
    let mut binaries: Vec<(String, PathBuf)> = ["redirect", "redirect-kit", "redirect-cni"]
        .iter()
        .map(|b| (b.to_string(), workspace_root().join("target/debug").join(b)))
        .collect();
    for r in &runs {
        binaries.push((r.file.clone(), exes[&r.file].clone()));
    }
    guest::stage_binaries(&staged, &binaries)?;

    let packages = fetch_kernels(&kernels);
    vm::catch_stop_signals();
    let mut outcomes = Vec::new();
    for (kernel, package) in kernels.iter().zip(packages) {
        let outcome = match package {
            Ok(root) => run_kernel(kernel, &root, &runs, &staged, &table, &vng, opts)?,
            Err(e) => Outcome {
                kernel,
                tally: guest::Tally::default(),
                errors: vec![format!("{e:#}")],
                feature_problems: Vec::new(),
            },
        };
        outcomes.push(outcome);
        if let Some(signal) = vm::stopped_by() {
            bail!("stopped by signal {signal}; the VM was killed");
        }
    }
    Ok(summary(&outcomes))
}

fn select_kernels(names: &[String]) -> Result<Vec<&'static Kernel>> {
    let names: Vec<&str> = names
        .iter()
        .flat_map(|n| n.split(','))
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .collect();
    if names.is_empty() || names.contains(&"all") {
        return Ok(KERNELS.iter().collect());
    }
    let mut out: Vec<&'static Kernel> = Vec::new();
    for n in names {
        let Some(k) = KERNELS.iter().find(|k| k.name == n) else {
            bail!(
                "--kernel {n:?}: not a kernel of the matrix; choose from {} (or all)",
                KERNELS
                    .iter()
                    .map(|k| k.name)
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        };
        if !out.iter().any(|o| o.name == k.name) {
            out.push(k);
        }
    }
    Ok(out)
}

/// Test target name → executable of tests/tests/*.rs, from `cargo test --no-run`.
fn test_executables() -> Result<HashMap<String, PathBuf>> {
    let mut build = cmd::cargo();
    build
        .current_dir(workspace_root())
        // The same package selection as `cargo xtask test`, so the same
        // feature resolution: the binaries it built are reused.
        .args([
            "test",
            "--workspace",
            "--exclude",
            "redirect-ebpf",
            "--tests",
            "--no-run",
            "--message-format=json",
            "--target-dir",
        ])
        .arg(workspace_root().join("target"));
    let e2e = workspace_root().join("tests/tests");
    eprintln!("==> {}", cmd::display(&build));
    let out = build
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("could not start cargo")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let messages: Vec<serde_json::Value> = stdout
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    if !out.status.success() {
        // With --message-format=json the compiler's errors are in stdout.
        for msg in &messages {
            if msg["reason"] == "compiler-message" && msg["message"]["level"] == "error" {
                eprint!(
                    "{}",
                    msg["message"]["rendered"].as_str().unwrap_or_default()
                );
            }
        }
        bail!(
            "building the test binaries failed (`{}`)",
            cmd::display(&build)
        );
    }
    let mut exes = HashMap::new();
    for msg in messages {
        let is_test = msg["target"]["kind"]
            .as_array()
            .is_some_and(|k| k.iter().any(|k| k == "test"));
        let in_e2e = msg["target"]["src_path"]
            .as_str()
            .is_some_and(|p| Path::new(p).starts_with(&e2e));
        if let (true, Some(name), Some(exe)) = (
            is_test && in_e2e,
            msg["target"]["name"].as_str(),
            msg["executable"].as_str(),
        ) {
            exes.insert(name.to_string(), PathBuf::from(exe));
        }
    }
    Ok(exes)
}

/// Every selected file has a binary and every named test exists in it
/// (a renamed test must not silently select nothing).
fn check_selection(runs: &[guest::TestRun], exes: &HashMap<String, PathBuf>) -> Result<()> {
    for r in runs {
        let exe = exes
            .get(&r.file)
            .with_context(|| format!("cargo built no test binary named {}", r.file))?;
        if r.tests.is_empty() {
            continue;
        }
        let list = cmd::output(Command::new(exe).args(["--list", "--format", "terse"]))?;
        let names: Vec<&str> = list
            .lines()
            .filter_map(|l| l.strip_suffix(": test"))
            .collect();
        for t in &r.tests {
            if !names.contains(&t.as_str()) {
                bail!(
                    "--tests {}::{t}: no such test in tests/tests/{}.rs (it has: {})",
                    r.file,
                    r.file,
                    names.join(", ")
                );
            }
        }
    }
    Ok(())
}

/// Each kernel's unpacked package root, or why it is not there.
fn fetch_kernels(kernels: &[&'static Kernel]) -> Vec<Result<PathBuf>> {
    let apt = apt::Apt::new(&cache_dir().join("apt")).and_then(|apt| {
        apt.update()?;
        Ok(apt)
    });
    if let Err(e) = &apt {
        eprintln!("warning: apt is not usable ({e:#}); using cached kernels only");
    }
    kernels
        .iter()
        .map(|k| {
            let dir = cache_dir().join(k.name);
            let root = dir.join("root");
            let stamp = dir.join("package");
            let cached = fs::read_to_string(&stamp).ok();
            let result = match &apt {
                Ok(apt) => (|| {
                    // apt-get update only warns when a mirror is out of
                    // reach: a kernel that cannot be resolved then is
                    // taken from the cache when there is one.
                    let image = match apt.resolve(k.name) {
                        Ok(image) => image,
                        Err(e) if cached.is_some() && root.is_dir() => {
                            eprintln!(
                                "{}: warning: {e:#}; using the cached {}",
                                k.name,
                                cached.as_deref().unwrap_or_default()
                            );
                            return Ok(root.clone());
                        }
                        Err(e) => return Err(e),
                    };
                    if cached.as_deref() == Some(image.to_string().as_str()) && root.is_dir() {
                        eprintln!("{}: {image} (cached)", k.name);
                        return Ok(root.clone());
                    }
                    eprintln!("{}: fetching {image} ({})", k.name, k.from);
                    fs::create_dir_all(&dir)?;
                    let _ = fs::remove_file(&stamp);
                    apt.fetch(&image, &root)?;
                    fs::write(&stamp, image.to_string())?;
                    Ok(root.clone())
                })(),
                Err(_) if cached.is_some() && root.is_dir() => {
                    eprintln!(
                        "{}: {} (cached; apt offline)",
                        k.name,
                        cached.unwrap_or_default()
                    );
                    Ok(root.clone())
                }
                Err(e) => Err(anyhow::anyhow!(
                    "apt is not usable and no kernel is cached: {e:#}"
                )),
            };
            result.with_context(|| format!("kernel {}: no kernel package", k.name))
        })
        .collect()
}

fn run_kernel(
    kernel: &'static Kernel,
    root: &Path,
    runs: &[guest::TestRun],
    staged: &Path,
    table: &[features::Feature],
    vng: &Path,
    opts: &Options,
) -> Result<Outcome> {
    let name = kernel.name;
    let dir = cache_dir().join(name);
    let out = dir.join("run");
    let _ = fs::remove_dir_all(&out);
    fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let script_path = dir.join("guest.sh");
    let script = guest::script(&guest::ScriptPlan {
        out: &out,
        bin: staged,
        cwd: &workspace_root().join("tests"),
        runs,
        threads: opts.threads,
        test_timeout_secs: opts.test_timeout.as_secs(),
    });
    fs::write(&script_path, script)
        .with_context(|| format!("cannot write {}", script_path.display()))?;
    cmd::run(Command::new("chmod").arg("+x").arg(&script_path))?;
    let mut outcome = Outcome {
        kernel,
        tally: guest::Tally::default(),
        errors: Vec::new(),
        feature_problems: Vec::new(),
    };
    let vmlinuz = match vm::find_vmlinuz(root) {
        Ok(v) => v,
        Err(e) => {
            outcome.errors.push(format!("kernel {name}: {e:#}"));
            return Ok(outcome);
        }
    };
    let console = dir.join("console.log");
    let timeout = BOOT_TIMEOUT + GUEST_OVERHEAD + opts.test_timeout * runs.len() as u32;
    eprintln!(
        "{name}: booting {} under QEMU TCG (deadline {}; console: {})",
        vmlinuz.display(),
        minutes(timeout),
        console.display()
    );
    let start = Instant::now();
    let ended = vm::boot(&vm::BootPlan {
        vng,
        vmlinuz: &vmlinuz,
        rwdir: &out,
        script: &script_path,
        console: &console,
        memory: GUEST_MEMORY,
        cpus: GUEST_CPUS,
        boot_timeout: BOOT_TIMEOUT,
        timeout,
    })?;
    let took = start.elapsed();
    let release = fs::read_to_string(out.join("uname")).unwrap_or_default();
    let release = release.trim();
    match &ended {
        vm::Ended::Exited if !out.join("booted").exists() => outcome.errors.push(format!(
            "kernel {name} ({}) did not boot: the VM stopped after {} without starting the test script; last console lines:\n{}",
            vmlinuz.display(),
            minutes(took),
            vm::tail(&console, 15)
        )),
        vm::Ended::Exited if !out.join("done").exists() => outcome.errors.push(format!(
            "kernel {name} ({release}): the guest stopped before its script finished (a kernel panic or the VM died); see {}",
            console.display()
        )),
        vm::Ended::Exited => {}
        vm::Ended::NoBoot(t) => outcome.errors.push(format!(
            "kernel {name} did not boot within {}: VM killed; last console lines:\n{}",
            minutes(*t),
            vm::tail(&console, 15)
        )),
        vm::Ended::TimedOut(t) => outcome.errors.push(format!(
            "kernel {name} ({release}): the guest ran past its deadline of {}: VM killed",
            minutes(*t)
        )),
        vm::Ended::Stopped(signal) => {
            outcome.errors.push(format!("kernel {name}: stopped by signal {signal}: VM killed"))
        }
    }
    if out.join("booted").exists() {
        eprintln!("{name}: {release} ran {} (boot included)", minutes(took));
        report_probe(name, &out);
        for r in runs {
            let res = guest::read_result(&out, &r.file, opts.test_timeout.as_secs());
            let mut t = guest::Tally::default();
            t.add(&res);
            let secs = res
                .exit
                .map(|(_, s)| format!(" ({s} s)"))
                .unwrap_or_default();
            eprintln!("{name}: {}{secs}", t.line(&r.file));
            for f in &res.failed {
                eprintln!(
                    "{name}:   FAILED {}::{f} (log: {})",
                    r.file,
                    out.join(format!("{}.log", r.file)).display()
                );
            }
            if let Some(p) = &res.problem {
                eprintln!("{name}:   {}: {p}", r.file);
            }
            outcome.tally.add(&res);
        }
        match fs::read_to_string(out.join("features.json"))
            .ok()
            .and_then(|j| serde_json::from_str::<serde_json::Value>(&j).ok())
        {
            Some(probe) => outcome.feature_problems = features::check(table, release, &probe),
            None => outcome.feature_problems.push(format!(
                "no bpftool feature probe output from {release} (see {})",
                out.join("features.err").display()
            )),
        }
        if outcome.feature_problems.is_empty() {
            eprintln!(
                "{name}: {} agrees with bpftool's feature probe",
                features::DOC
            );
        }
        for p in &outcome.feature_problems {
            eprintln!("{name}: feature table: {p}");
        }
    }
    Ok(outcome)
}

fn report_probe(name: &str, out: &Path) {
    match guest::read_probe(out) {
        guest::ProbeOutcome::AttachFailed(why) => {
            eprintln!("{name}: the programs do not load/attach: {why}")
        }
        guest::ProbeOutcome::Decided { decision, checks } => {
            eprintln!("{name}: programs load; acceleration: {decision}");
            for (check, saw) in checks {
                eprintln!("{name}:   probe check {check}: {saw}");
            }
        }
        guest::ProbeOutcome::Missing => eprintln!("{name}: no probe result"),
    }
}

/// Prints the per-kernel lines and the total; the exit code.
fn summary(outcomes: &[Outcome]) -> ExitCode {
    println!(
        "== kernel matrix (QEMU TCG; logs in {}) ==",
        cache_dir().join("<kernel>/run").display()
    );
    let mut total = guest::Tally::default();
    let mut failed = false;
    for o in outcomes {
        let mut t = o.tally;
        t.failed += o.errors.len() + usize::from(!o.feature_problems.is_empty());
        for e in &o.errors {
            println!("{}: error: {e}", o.kernel.name);
        }
        println!("{}", t.line(o.kernel.name));
        match o.kernel.known_gap {
            Some(why) if o.errors.is_empty() && o.feature_problems.is_empty() => {
                if o.tally.failed == 0 {
                    println!(
                        "{}: known gap no longer shows (every test passed): remove known_gap from xtask/src/kernels/mod.rs",
                        o.kernel.name
                    );
                }
                println!(
                    "{}: known gap, not counted in the exit code or the total: {why}",
                    o.kernel.name
                );
            }
            _ => {
                failed |= t.failed > 0;
                total.passed += t.passed;
                total.failed += t.failed;
                total.skipped += t.skipped;
            }
        }
    }
    println!("{}", total.line("kernels"));
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn minutes(d: Duration) -> String {
    let s = d.as_secs();
    if s < 60 {
        format!("{s} s")
    } else {
        format!("{}m{:02}s", s / 60, s % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_names_are_checked() {
        let all = select_kernels(&[]).unwrap();
        assert_eq!(all.len(), KERNELS.len());
        let some = select_kernels(&["6.1,5.10".into(), "6.1".into()]).unwrap();
        assert_eq!(
            some.iter().map(|k| k.name).collect::<Vec<_>>(),
            ["6.1", "5.10"]
        );
        let e = select_kernels(&["4.19".into()]).unwrap_err().to_string();
        assert!(e.contains("\"4.19\"") && e.contains("6.12"), "{e}");
    }

    /// docs/kernels.md's feature table has one column per kernel of the
    /// matrix, in order (tests/tests/kernel_features.rs checks the rows
    /// and the cells).
    #[test]
    fn feature_table_columns_are_the_matrix() {
        let (columns, _) = features::read(&workspace_root()).unwrap();
        let names: Vec<&str> = KERNELS.iter().map(|k| k.name).collect();
        assert_eq!(columns, names, "{}: kernel columns", features::DOC);
    }
}
