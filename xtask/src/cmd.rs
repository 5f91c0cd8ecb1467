//! Helpers around `std::process::Command`.
//!
//! Every external command goes through [`run`], [`status`], [`output`],
//! [`probe`] or [`exec`], which echo it as `==> cmd` before running it and turn failures
//! into errors that name the command. The constructors [`cargo`] and
//! [`nightly`] build commands with an environment cleaned of what the outer
//! `cargo run` injected into the xtask process.

use std::{
    env,
    ffi::{OsStr, OsString},
    io,
    os::unix::{
        fs::PermissionsExt,
        process::{CommandExt, ExitStatusExt},
    },
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
};

use anyhow::{bail, Context, Result};

/// Root of the workspace: the parent directory of the xtask crate.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives inside the workspace")
        .to_path_buf()
}

/// Variables `cargo run` sets to describe the xtask package itself (besides
/// every `CARGO_PKG_*`); they mean nothing to child processes.
const CARGO_RUN_VARS: &[&str] = &[
    "CARGO_MANIFEST_DIR",
    "CARGO_MANIFEST_PATH",
    "CARGO_BIN_NAME",
    "CARGO_CRATE_NAME",
    "CARGO_PRIMARY_PACKAGE",
];

/// Variables that would make a `+nightly` invocation use the outer (stable)
/// toolchain's binaries, or change where and for what it builds.
const TOOLCHAIN_VARS: &[&str] = &[
    "RUSTUP_TOOLCHAIN",
    "CARGO",
    "RUSTC",
    "RUSTDOC",
    "RUSTC_WRAPPER",
    "RUSTC_WORKSPACE_WRAPPER",
    "RUSTFLAGS",
    "CARGO_ENCODED_RUSTFLAGS",
    "CARGO_BUILD_RUSTFLAGS",
    "CARGO_BUILD_TARGET",
    "CARGO_BUILD_TARGET_DIR",
    "CARGO_TARGET_DIR",
];

/// `cargo` of the toolchain running xtask (rustup resolves it through the
/// inherited `RUSTUP_TOOLCHAIN`), for host builds.
///
/// `CARGO_BUILD_TARGET` is removed so host binaries land in `target/<profile>`.
pub fn cargo() -> Command {
    let mut cmd = Command::new("cargo");
    remove_cargo_run_vars(&mut cmd);
    cmd.env_remove("CARGO_BUILD_TARGET");
    cmd
}

/// `<program> +nightly`, run through rustup with none of the outer
/// toolchain's environment, so it really uses the nightly toolchain.
pub fn nightly(program: &str) -> Command {
    let mut cmd = Command::new(program);
    cmd.arg("+nightly");
    remove_cargo_run_vars(&mut cmd);
    for var in TOOLCHAIN_VARS {
        cmd.env_remove(var);
    }
    cmd
}

fn remove_cargo_run_vars(cmd: &mut Command) {
    for (key, _) in env::vars_os() {
        if let Some(key) = key.to_str() {
            if CARGO_RUN_VARS.contains(&key) || key.starts_with("CARGO_PKG_") {
                cmd.env_remove(key);
            }
        }
    }
}

/// Runs `cmd` with inherited stdio; a non-zero exit is an error.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = status(cmd)?;
    if !status.success() {
        bail!("`{}` failed ({})", display(cmd), describe(status));
    }
    Ok(())
}

/// Runs `cmd` with inherited stdio and returns its exit status, whatever it is.
pub fn status(cmd: &mut Command) -> Result<ExitStatus> {
    echo(cmd);
    cmd.status()
        .with_context(|| format!("could not start `{}`", display(cmd)))
}

/// Runs `cmd` and returns its trimmed stdout; a non-zero exit is an error.
pub fn output(cmd: &mut Command) -> Result<String> {
    echo(cmd);
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("could not start `{}`", display(cmd)))?;
    if !out.status.success() {
        bail!("`{}` failed ({})", display(cmd), describe(out.status));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Runs `cmd` silently and reports whether it started and succeeded.
pub fn probe(cmd: &mut Command) -> bool {
    echo(cmd);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// Replaces the xtask process with `cmd`; returns only if that failed.
pub fn exec(cmd: &mut Command) -> io::Error {
    echo(cmd);
    cmd.exec()
}

/// Shell exit code equivalent of `status` (128 + signal for killed children).
pub fn exit_code(status: ExitStatus) -> u8 {
    match (status.code(), status.signal()) {
        (Some(code), _) => u8::try_from(code).unwrap_or(1),
        (None, Some(signal)) => u8::try_from(128 + signal).unwrap_or(1),
        (None, None) => 1,
    }
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        (None, None) => status.to_string(),
    }
}

fn echo(cmd: &Command) {
    eprintln!("==> {}", display(cmd));
}

/// Shell-like rendering of `cmd`, with the variables it sets as a prefix.
pub fn display(cmd: &Command) -> String {
    let vars = cmd
        .get_envs()
        .filter_map(|(key, value)| Some(format!("{}={}", key.to_string_lossy(), quote(value?))));
    let words = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(quote);
    vars.chain(words).collect::<Vec<_>>().join(" ")
}

fn quote(word: &OsStr) -> String {
    let word = word.to_string_lossy();
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_./=+:,@%".contains(c);
    if !word.is_empty() && word.chars().all(plain) {
        word.into_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// Finds an executable on `PATH`, falling back to the sbin directories that
/// non-login root shells sometimes leave out (bpftool, ip, iptables live there).
pub fn find_executable(name: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH").unwrap_or_default();
    env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

pub fn is_executable(path: &Path) -> bool {
    path.metadata()
        .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}

/// `$PATH` with `dir` in front, unless it is already on it.
pub fn path_with(dir: &Path) -> Option<OsString> {
    let path = env::var_os("PATH").unwrap_or_default();
    if env::split_paths(&path).any(|entry| entry == dir) {
        return None;
    }
    let entries = std::iter::once(dir.to_path_buf()).chain(env::split_paths(&path));
    env::join_paths(entries).ok()
}

/// Whether the effective user is root (read from `/proc/self/status`).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let uids = status.lines().find_map(|line| line.strip_prefix("Uid:"))?;
            uids.split_whitespace().nth(1).map(|euid| euid == "0")
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_quotes_like_a_shell() {
        let mut cmd = Command::new("cargo");
        cmd.env("LLVM_PREFIX", "/tmp/llvm prefix")
            .env_remove("RUSTFLAGS")
            .args(["install", "it's", "--features", "llvm-22"]);
        assert_eq!(
            display(&cmd),
            r"LLVM_PREFIX='/tmp/llvm prefix' cargo install 'it'\''s' --features llvm-22"
        );
    }
}
