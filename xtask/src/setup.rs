//! `cargo xtask setup`: make a bare Debian machine (as root) ready to build
//! and test the redirector.
//!
//! Each step checks first and only acts when something is missing, so a
//! ready machine gets through in well under a second:
//!
//! * apt packages whose commands are missing (ip, iptables, bpftool, haproxy, jq,
//!   dnsmasq and dig for the DNS capture tests, podman, runc, conmon, the
//!   CNI plugins and busybox-static for the real-runtime test, musl-tools
//!   and file for the image);
//! * the nightly toolchain with `rust-src` (the eBPF crate uses `-Z build-std`);
//! * the `x86_64-unknown-linux-musl` target (and musl-tools from apt) for
//!   the image's static binaries;
//! * `bpf-linker`, built against the nightly's own libLLVM so no system LLVM
//!   is needed;
//! * `kubernetes-validate` (PyPI; it bundles the Kubernetes JSON schemas, so
//!   it validates offline) in a venv under target/tools/, for the test that
//!   validates deploy/*.yaml;
//! * `prometheus-client` (PyPI) in a venv under target/tools/, whose
//!   exposition parsers check the agent's `/metrics` in both formats;
//! * for `cargo xtask kernels`: QEMU and kmod (apt) and virtme-ng (PyPI, in
//!   a venv under target/tools/);
//! * warnings when the kernel lacks a cgroup2 mount or BTF.
//!
//! Failures say what failed and what to run by hand.

use std::{
    env, fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

use crate::cmd::{self, find_executable, is_executable, is_root};

/// Command that must be on the machine (or an absolute path to an
/// executable), and the Debian package providing it.
const APT_PACKAGES: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("iptables", "iptables"),
    ("bpftool", "bpftool"),
    ("haproxy", "haproxy"),
    ("jq", "jq"),
    // The real-runtime test of the node agent and redirect-cni: podman
    // (runc, conmon) with the CNI reference plugins, and a static busybox
    // for the local image (no registry).
    ("podman", "podman"),
    ("runc", "runc"),
    ("conmon", "conmon"),
    ("/usr/lib/cni/bridge", "containernetworking-plugins"),
    ("busybox", "busybox-static"),
    // Static binaries for the image (`cargo xtask image`): ring's C code is
    // compiled for musl with musl-gcc; the image test checks the copied
    // plugin with `file`.
    ("musl-gcc", "musl-tools"),
    ("file", "file"),
    // The DNS capture tests: a real DNS server upstream (dnsmasq, run with
    // its own config, no system service) and real clients (dig, nslookup).
    ("dnsmasq", "dnsmasq-base"),
    ("dig", "dnsutils"),
    // `cargo xtask kernels`: virtme-ng boots kernels with QEMU and runs
    // depmod on their module trees.
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("depmod", "kmod"),
];

/// What later build steps need to know about the prepared toolchain.
pub struct Toolchain {
    /// A `bpf-linker` that runs against the nightly's libLLVM.
    pub bpf_linker: PathBuf,
}

/// Runs every setup step; `reinstall_bpf_linker` rebuilds it even if it works.
pub fn setup(reinstall_bpf_linker: bool) -> Result<Toolchain> {
    ensure_apt_packages()?;
    let sysroot = ensure_nightly()?;
    let bpf_linker = ensure_bpf_linker(&sysroot, reinstall_bpf_linker)?;
    crate::image::ensure_musl_target()?;
    ensure_kubernetes_validate()?;
    ensure_prometheus_client()?;
    ensure_venv(
        &crate::kernels::virtme_venv(),
        crate::kernels::VIRTME_NG,
        &["bin/vng", "--version"],
    )?;
    check_kernel();
    eprintln!("setup: toolchain and tools ready");
    Ok(Toolchain { bpf_linker })
}

fn ensure_apt_packages() -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .filter(|(command, _)| find_executable(command).is_none())
        .map(|&(_, package)| package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }

    let packages = missing.join(" ");
    let by_hand = format!("apt-get update && apt-get install -y {packages}");
    if find_executable("apt-get").is_none() {
        bail!("missing packages: {packages}, and apt-get is not available; install them with your distribution's package manager");
    }
    if !is_root() {
        bail!("missing packages: {packages}; installing them needs root, run as root: {by_hand}");
    }

    cmd::run(Command::new("apt-get").arg("update")).with_context(|| {
        format!("`apt-get update` failed; check the network and apt sources, then run: {by_hand}")
    })?;
    cmd::run(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y"])
            .args(&missing),
    )
    .with_context(|| {
        format!("installing {packages} failed; see apt's output above and run: {by_hand}")
    })?;

    let still_missing: Vec<&str> = APT_PACKAGES
        .iter()
        .filter(|(command, _)| find_executable(command).is_none())
        .map(|&(command, _)| command)
        .collect();
    if !still_missing.is_empty() {
        bail!(
            "apt-get succeeded but these commands are still not on PATH: {}; check PATH (they usually live in /usr/bin and /usr/sbin)",
            still_missing.join(", ")
        );
    }
    Ok(())
}

/// The pinned `kubernetes-validate` release (its schemas go up to this
/// Kubernetes minor version).
const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";

/// The venv holding `kubernetes-validate`; tests/tests/deploy.rs looks here.
pub fn kubernetes_validate_venv() -> PathBuf {
    cmd::workspace_root().join("target/tools/kubernetes-validate")
}

/// The pinned Prometheus Python client, whose exposition parsers (text
/// 0.0.4 and OpenMetrics) check the agent's `/metrics`.
const PROMETHEUS_CLIENT: &str = "prometheus-client==0.26.0";

/// The venv holding `prometheus_client`; tests/tests/agent.rs looks here.
pub fn prometheus_client_venv() -> PathBuf {
    cmd::workspace_root().join("target/tools/prometheus-client")
}

fn ensure_kubernetes_validate() -> Result<()> {
    ensure_venv(
        &kubernetes_validate_venv(),
        KUBERNETES_VALIDATE,
        &["bin/kubernetes-validate", "--version"],
    )
}

fn ensure_prometheus_client() -> Result<()> {
    ensure_venv(
        &prometheus_client_venv(),
        PROMETHEUS_CLIENT,
        &[
            "bin/python",
            "-c",
            "import prometheus_client.parser, prometheus_client.openmetrics.parser",
        ],
    )
}

/// Installs the PyPI `requirement` into a venv at `venv` (under
/// target/tools/) unless `check` (a program relative to the venv, and its
/// arguments) already succeeds there. Needs python3 with venv (apt:
/// python3-venv).
fn ensure_venv(venv: &Path, requirement: &str, check: &[&str]) -> Result<()> {
    let runs = || {
        Command::new(venv.join(check[0]))
            .args(&check[1..])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if runs() {
        return Ok(());
    }
    let by_hand = format!(
        "python3 -m venv {0} && {0}/bin/pip install {requirement}",
        venv.display()
    );
    let make_venv = || {
        Command::new("python3")
            .args(["-m", "venv", "--clear"])
            .arg(venv)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !make_venv() {
        // Debian's python3 has no venv/ensurepip without python3-venv.
        if find_executable("apt-get").is_none() || !is_root() {
            bail!("cannot create a python3 venv at {}; install python3 and python3-venv, then run: {by_hand}", venv.display());
        }
        cmd::run(Command::new("apt-get").arg("update")).context("`apt-get update` failed")?;
        cmd::run(
            Command::new("apt-get")
                .env("DEBIAN_FRONTEND", "noninteractive")
                .args(["install", "-y", "python3", "python3-venv"]),
        )
        .with_context(|| format!("installing python3-venv failed; run: apt-get install -y python3 python3-venv && {by_hand}"))?;
        if !make_venv() {
            bail!(
                "`python3 -m venv {}` still fails; run by hand: {by_hand}",
                venv.display()
            );
        }
    }
    cmd::run(Command::new(venv.join("bin/pip")).args([
        "install",
        "--quiet",
        "--disable-pip-version-check",
        requirement,
    ]))
    .with_context(|| {
        format!("installing {requirement} failed; check access to PyPI, then run: {by_hand}")
    })?;
    if !runs() {
        bail!(
            "{} does not run after installing {requirement}; run by hand: {by_hand}",
            venv.join(check[0]).display()
        );
    }
    Ok(())
}

/// Makes sure the nightly toolchain and its `rust-src` are installed; returns
/// the nightly sysroot.
fn ensure_nightly() -> Result<PathBuf> {
    if find_executable("rustup").is_none() {
        bail!("rustup not found; install it from https://rustup.rs (curl https://sh.rustup.rs -sSf | sh -s -- -y), then re-run `cargo xtask setup`");
    }

    let sysroot = match nightly_sysroot() {
        Some(sysroot) => sysroot,
        None => {
            let install = [
                "toolchain",
                "install",
                "nightly",
                "--profile",
                "minimal",
                "--component",
                "rust-src",
            ];
            cmd::run(Command::new("rustup").args(install)).with_context(|| {
                format!(
                    "installing the nightly toolchain failed; run: rustup {}",
                    install.join(" ")
                )
            })?;
            nightly_sysroot().context(
                "the nightly toolchain was installed but `rustc +nightly --print sysroot` still fails; check `rustup toolchain list`",
            )?
        }
    };

    if !sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
        let add = ["component", "add", "rust-src", "--toolchain", "nightly"];
        cmd::run(Command::new("rustup").args(add)).with_context(|| {
            format!(
                "adding rust-src to the nightly toolchain failed; run: rustup {}",
                add.join(" ")
            )
        })?;
    }
    Ok(sysroot)
}

/// Sysroot of the installed nightly toolchain, or `None` if it isn't installed.
fn nightly_sysroot() -> Option<PathBuf> {
    let mut rustc = cmd::nightly("rustc");
    // Report a missing toolchain instead of letting rustup install it
    // implicitly (with the default profile and no rust-src).
    rustc
        .env("RUSTUP_AUTO_INSTALL", "0")
        .args(["--print", "sysroot"])
        .stderr(std::process::Stdio::null());
    let sysroot = cmd::output(&mut rustc).ok()?;
    Some(PathBuf::from(sysroot)).filter(|path| path.is_dir())
}

/// Returns a working `bpf-linker`, building one if none runs against the
/// nightly's libLLVM (e.g. none installed, or the nightly moved to a newer LLVM).
fn ensure_bpf_linker(sysroot: &Path, reinstall: bool) -> Result<PathBuf> {
    if !reinstall {
        match locate_bpf_linker() {
            Some(linker) if bpf_linker_runs(&linker, sysroot) => return Ok(linker),
            Some(linker) => eprintln!(
                "warning: {} does not run against the nightly's libLLVM; rebuilding it",
                linker.display()
            ),
            None => eprintln!("bpf-linker not found; building it (takes about a minute)"),
        }
    }
    install_bpf_linker(sysroot)?;

    let linker = install_root().join("bin/bpf-linker");
    if !bpf_linker_runs(&linker, sysroot) {
        bail!(
            "bpf-linker was built but `{} --version` fails; run `cargo xtask setup --reinstall-bpf-linker` and check its output",
            linker.display()
        );
    }
    Ok(linker)
}

/// `bpf-linker` on `PATH`, else in cargo's install root (which may be off `PATH`).
fn locate_bpf_linker() -> Option<PathBuf> {
    find_executable("bpf-linker").or_else(|| {
        let linker = install_root().join("bin/bpf-linker");
        is_executable(&linker).then_some(linker)
    })
}

/// Runs `bpf-linker --version` with the nightly's lib directory as the library
/// path, as rustup sets it up when rustc runs the linker.
fn bpf_linker_runs(linker: &Path, sysroot: &Path) -> bool {
    cmd::probe(
        Command::new(linker)
            .env("LD_LIBRARY_PATH", sysroot.join("lib"))
            .arg("--version"),
    )
}

/// Builds bpf-linker against the nightly's libLLVM (the same LLVM rustc emits
/// bitcode for), via an LLVM "prefix" made of symlinks into the sysroot.
fn install_bpf_linker(sysroot: &Path) -> Result<()> {
    let lib_dir = sysroot.join("lib");
    let (libllvm, major) = find_libllvm(&lib_dir)?;

    // The linker's RUNPATH points into this prefix, so keep it next to the
    // installed binary rather than under target/, where `cargo clean` would
    // remove it.
    let prefix = install_root().join("bpf-linker-llvm");
    let prefix_lib = prefix.join("lib");
    fs::create_dir_all(&prefix_lib)
        .with_context(|| format!("cannot create {}", prefix_lib.display()))?;
    let real = lib_dir.join(&libllvm);
    for name in ["libLLVM.so", libllvm.as_str()] {
        let link = prefix_lib.join(name);
        if link.symlink_metadata().is_ok() {
            fs::remove_file(&link).with_context(|| format!("cannot replace {}", link.display()))?;
        }
        symlink(&real, &link)
            .with_context(|| format!("cannot create symlink {}", link.display()))?;
    }

    let mut install = cmd::cargo();
    install
        .env("LLVM_PREFIX", &prefix)
        .args([
            "install",
            "bpf-linker",
            "--force",
            "--no-default-features",
            "--features",
        ])
        .arg(format!("llvm-{major}"));
    cmd::run(&mut install).with_context(|| {
        format!(
            "building bpf-linker failed; see cargo's output above, then retry with: {}",
            cmd::display(&install)
        )
    })
}

/// Name of the nightly's `libLLVM.so.<version>-rust-...` and its LLVM major version.
fn find_libllvm(lib_dir: &Path) -> Result<(String, u32)> {
    let entries = fs::read_dir(lib_dir).with_context(|| {
        format!(
            "cannot read the nightly's lib directory {}",
            lib_dir.display()
        )
    })?;
    let mut names: Vec<String> = entries
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .filter(|name| name.starts_with("libLLVM.so."))
        .collect();
    names.sort();
    let Some(name) = names.pop() else {
        bail!(
            "no libLLVM.so.* in {}; reinstall the nightly toolchain: rustup toolchain install nightly --profile minimal --component rust-src --force",
            lib_dir.display()
        );
    };
    let version = &name["libLLVM.so.".len()..];
    let digits: String = version.chars().take_while(char::is_ascii_digit).collect();
    let major = digits
        .parse()
        .with_context(|| format!("cannot read the LLVM major version from {name}"))?;
    Ok((name, major))
}

/// Where `cargo install` puts things: `$CARGO_INSTALL_ROOT`, else `$CARGO_HOME`,
/// else `~/.cargo`.
fn install_root() -> PathBuf {
    env::var_os("CARGO_INSTALL_ROOT")
        .or_else(|| env::var_os("CARGO_HOME"))
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = env::var_os("HOME").unwrap_or_else(|| "/root".into());
            PathBuf::from(home).join(".cargo")
        })
}

/// Warns about kernel features the redirector needs but setup cannot provide.
fn check_kernel() {
    let cgroup2 = fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .find_map(|line| {
            let mut fields = line.split_whitespace();
            let mount_point = fields.nth(1)?;
            (fields.next()? == "cgroup2").then(|| mount_point.to_owned())
        });
    match cgroup2 {
        Some(mount_point) => eprintln!("cgroup2 mounted at {mount_point}"),
        None => eprintln!(
            "warning: no cgroup2 filesystem is mounted; the redirector's programs attach to a cgroup v2 hierarchy. \
             Mount one, e.g.: mkdir -p /sys/fs/cgroup/unified && mount -t cgroup2 none /sys/fs/cgroup/unified"
        ),
    }
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        eprintln!(
            "warning: /sys/kernel/btf/vmlinux is missing; the kernel lacks BTF (CONFIG_DEBUG_INFO_BTF=y) \
             and loading the eBPF programs will likely fail"
        );
    }
    if !is_root() {
        eprintln!("warning: not running as root; loading eBPF programs and the end-to-end tests need root");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_libllvm_and_its_major_version() {
        let dir = env::temp_dir().join(format!("xtask-libllvm-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        for name in [
            "libLLVM-22-rust-1.97.0-nightly.so",
            "libLLVM.so.22.1-rust-1.97.0-nightly",
            "librustc_driver-b5a965480ee51f9a.so",
        ] {
            fs::write(dir.join(name), "").unwrap();
        }
        let found = find_libllvm(&dir);
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            found.unwrap(),
            ("libLLVM.so.22.1-rust-1.97.0-nightly".to_owned(), 22)
        );
    }
}
