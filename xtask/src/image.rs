//! `cargo xtask image`: the node agent's OCI image, built on this machine
//! from static binaries, with no base image pulled from anywhere.
//!
//! 1. **static binaries**: the release eBPF object, then `redirect` (which
//!    embeds it) and `redirect-cni` for `x86_64-unknown-linux-musl`
//!    (statically linked: musl's libc is linked in; the C parts of `ring`,
//!    kube-rs's TLS, are compiled with `musl-gcc`). Each must have no ELF
//!    interpreter (PT_INTERP).
//! 2. **context**: both binaries alone in `target/image/context/`.
//! 3. **build**: `podman build --pull=never -f deploy/Dockerfile` (`FROM
//!    scratch`) on that context, or `buildah build` when only buildah is
//!    installed, tagged `localhost/redirect:<version>` unless `--tag` says
//!    otherwise; prints the image id and size.
//!
//! Every failure names its step. `cargo xtask test` runs steps 1 and 2 and
//! hands the context to the image test (`REDIRECT_IMAGE_CONTEXT`), which
//! builds its own images with the same Dockerfile in a private store.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

use crate::{
    cmd::{self, find_executable, workspace_root},
    setup::Toolchain,
    tasks,
};

/// The static target the image's binaries are built for.
pub const MUSL_TARGET: &str = "x86_64-unknown-linux-musl";
/// What the image ships, all in /usr/local/bin.
pub const BINARIES: [&str; 2] = ["redirect", "redirect-cni"];
/// Repository of the default tag (the DaemonSet's `image:` is
/// `redirect:<version>`, which podman and Kubernetes nodes resolve to
/// their local image of that name when it is loaded there).
const REPOSITORY: &str = "localhost/redirect";
/// The image must stay under this (bytes); a bigger one is reported.
const SIZE_TARGET: u64 = 30 * 1024 * 1024;

/// The image test reads the context from here (`cargo xtask test` sets it).
pub const CONTEXT_ENV: &str = "REDIRECT_IMAGE_CONTEXT";

pub fn context_dir() -> PathBuf {
    workspace_root().join("target/image/context")
}

fn dockerfile() -> PathBuf {
    workspace_root().join("deploy/Dockerfile")
}

/// The default tag: the workspace version.
pub fn default_tag() -> String {
    format!("{REPOSITORY}:{}", env!("CARGO_PKG_VERSION"))
}

/// Setup hook: the musl target's standard library for the toolchain that
/// runs xtask (`rustup target add`), when it is missing.
pub fn ensure_musl_target() -> Result<()> {
    if musl_std_installed() {
        return Ok(());
    }
    if find_executable("rustup").is_none() {
        bail!("the {MUSL_TARGET} standard library is missing and rustup is not installed; install rustup (https://rustup.rs), then run: rustup target add {MUSL_TARGET}");
    }
    let mut add = Command::new("rustup");
    add.args(["target", "add", MUSL_TARGET]);
    cmd::run(&mut add).with_context(|| {
        format!("adding the {MUSL_TARGET} target failed; run: rustup target add {MUSL_TARGET}")
    })?;
    if !musl_std_installed() {
        bail!("`rustup target add {MUSL_TARGET}` succeeded but rustc still has no standard library for it; check `rustup target list --installed` for the toolchain xtask runs with");
    }
    Ok(())
}

/// Whether rustc has a `libstd` for the musl target.
fn musl_std_installed() -> bool {
    let libdir = Command::new("rustc")
        .args(["--print", "target-libdir", "--target", MUSL_TARGET])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    libdir
        .and_then(|dir| fs::read_dir(dir).ok())
        .is_some_and(|entries| {
            entries.flatten().any(|e| {
                let name = e.file_name();
                let name = name.to_string_lossy();
                name.starts_with("libstd-") && name.ends_with(".rlib")
            })
        })
}

/// Step 1: the release eBPF object, then the static release binaries;
/// returns their paths (checked static).
pub fn build_static(toolchain: &Toolchain) -> Result<Vec<PathBuf>> {
    tasks::build_ebpf(toolchain, false)
        .context("step 1/3 (static binaries): building the eBPF object failed")?;
    if find_executable("musl-gcc").is_none() {
        bail!("step 1/3 (static binaries): musl-gcc not found (ring's C code is compiled with it); run `cargo xtask setup` or apt-get install musl-tools");
    }
    let mut build = cmd::cargo();
    build
        .current_dir(workspace_root())
        .args([
            "build",
            "--release",
            "--target",
            MUSL_TARGET,
            "-p",
            "redirect-userspace",
        ])
        .args(BINARIES.iter().flat_map(|b| ["--bin", b]))
        .arg("--target-dir")
        .arg(workspace_root().join("target"))
        // Symbols stripped: the image is what nodes pull.
        .args(["--config", "profile.release.strip=\"symbols\""])
        .env("CC_x86_64_unknown_linux_musl", "musl-gcc");
    cmd::run(&mut build).context(
        "step 1/3 (static binaries): building for x86_64-unknown-linux-musl failed; see the compiler output above (`cargo xtask setup` installs the target and musl-tools)",
    )?;
    let dir = workspace_root()
        .join("target")
        .join(MUSL_TARGET)
        .join("release");
    let mut out = Vec::new();
    for bin in BINARIES {
        let path = dir.join(bin);
        let bytes = fs::read(&path).with_context(|| {
            format!(
                "step 1/3 (static binaries): the build succeeded but {} cannot be read",
                path.display()
            )
        })?;
        match elf_interpreter(&bytes) {
            Ok(None) => {}
            Ok(Some(interp)) => bail!(
                "step 1/3 (static binaries): {} is dynamically linked (ELF interpreter {interp}); it must be static to run on any node",
                path.display()
            ),
            Err(why) => bail!(
                "step 1/3 (static binaries): {} is not an x86-64 ELF executable: {why}",
                path.display()
            ),
        }
        out.push(path);
    }
    Ok(out)
}

/// Steps 1 and 2: static binaries copied alone into `target/image/context`.
pub fn prepare_context(toolchain: &Toolchain) -> Result<PathBuf> {
    let binaries = build_static(toolchain)?;
    let dir = context_dir();
    let step = "step 2/3 (build context)";
    if dir.exists() {
        fs::remove_dir_all(&dir)
            .with_context(|| format!("{step}: cannot empty {}", dir.display()))?;
    }
    fs::create_dir_all(&dir).with_context(|| format!("{step}: cannot create {}", dir.display()))?;
    for bin in &binaries {
        let dst = dir.join(bin.file_name().expect("binary path has a name"));
        fs::copy(bin, &dst).with_context(|| {
            format!("{step}: cannot copy {} to {}", bin.display(), dst.display())
        })?;
    }
    println!("image context: {}", dir.display());
    Ok(dir)
}

/// The tool that builds the image.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Builder {
    Podman,
    Buildah,
}

impl Builder {
    fn find() -> Result<Builder> {
        if find_executable("podman").is_some() {
            Ok(Builder::Podman)
        } else if find_executable("buildah").is_some() {
            Ok(Builder::Buildah)
        } else {
            bail!("step 3/3 (image build): neither podman nor buildah is installed; run `cargo xtask setup` (apt-get install podman)")
        }
    }

    fn name(self) -> &'static str {
        match self {
            Builder::Podman => "podman",
            Builder::Buildah => "buildah",
        }
    }

    /// The build command: no base image is pulled (the Dockerfile is
    /// `FROM scratch`; --pull=never makes any pull an error), no cached
    /// layer is reused (buildah's cache reuses a LABEL step whose build
    /// args changed, which would keep a stale version or revision label)
    /// and no intermediate image is kept (--layers=false).
    fn build_command(self, tag: &str, version: &str, revision: &str, context: &Path) -> Command {
        let mut c = Command::new(self.name());
        match self {
            Builder::Podman => c.args(["build", "--pull=never", "--no-cache", "--layers=false"]),
            Builder::Buildah => c.args(["build", "--pull-never", "--no-cache", "--layers=false"]),
        };
        c.arg("--file")
            .arg(dockerfile())
            .arg("--build-arg")
            .arg(format!("VERSION={version}"))
            .arg("--build-arg")
            .arg(format!("REVISION={revision}"))
            .args(["--tag", tag])
            .arg(context);
        c
    }

    /// The id of the image `tag` names, if any (no output, no error);
    /// podman only (buildah's images are left as they are).
    fn image_id(self, tag: &str) -> Option<String> {
        if self != Builder::Podman {
            return None;
        }
        let out = Command::new(self.name())
            .args(["image", "inspect", "--format", "{{.Id}}", tag])
            .stderr(std::process::Stdio::null())
            .output()
            .ok()?;
        let id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        (out.status.success() && !id.is_empty()).then_some(id)
    }

    /// Whether image `id` has no name left.
    fn untagged(self, id: &str) -> bool {
        Command::new(self.name())
            .args(["image", "inspect", "--format", "{{len .RepoTags}}", id])
            .stderr(std::process::Stdio::null())
            .output()
            .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).trim() == "0")
    }

    /// The image id and its size as the tool reports it: bytes for
    /// podman, a rounded human figure for buildah (which has no exact one).
    fn inspect(self, tag: &str) -> Result<(String, Size)> {
        match self {
            Builder::Podman => {
                let out = cmd::output(Command::new("podman").args([
                    "image",
                    "inspect",
                    "--format",
                    "{{.Id}} {{.Size}}",
                    tag,
                ]))?;
                let (id, bytes) = parse_inspect(&out)?;
                Ok((id, Size::Bytes(bytes)))
            }
            Builder::Buildah => {
                let out = cmd::output(Command::new("buildah").args([
                    "images",
                    "--noheading",
                    "--no-trunc",
                    "--format",
                    "{{.ID}} {{.Size}}",
                    tag,
                ]))?;
                let (id, size) = out
                    .split_once(' ')
                    .with_context(|| format!("unexpected `buildah images` output {out:?}"))?;
                Ok((id.to_owned(), Size::Reported(size.trim().to_owned())))
            }
        }
    }
}

enum Size {
    Bytes(u64),
    Reported(String),
}

/// `"<id> <size>"` as podman's inspect prints it.
fn parse_inspect(out: &str) -> Result<(String, u64)> {
    let mut words = out.split_whitespace();
    let (Some(id), Some(size)) = (words.next(), words.next()) else {
        bail!("unexpected image inspect output {out:?}");
    };
    let size = size
        .parse()
        .with_context(|| format!("image size {size:?} is not a number"))?;
    Ok((id.to_owned(), size))
}

/// The commit the image is built from, for its revision label.
fn git_revision() -> String {
    let out = Command::new("git")
        .current_dir(workspace_root())
        .args(["rev-parse", "HEAD"])
        .output();
    match out {
        Ok(o) if o.status.success() => {
            let rev = String::from_utf8_lossy(&o.stdout).trim().to_owned();
            let dirty = Command::new("git")
                .current_dir(workspace_root())
                .args(["status", "--porcelain", "--untracked-files=no"])
                .output()
                .is_ok_and(|o| o.status.success() && !o.stdout.is_empty());
            if dirty {
                format!("{rev}-dirty")
            } else {
                rev
            }
        }
        _ => "unknown".to_owned(),
    }
}

/// `cargo xtask image [--tag T]`.
pub fn image(toolchain: &Toolchain, tag: Option<String>) -> Result<()> {
    let tag = tag.unwrap_or_else(default_tag);
    if tag.trim().is_empty() || tag.chars().any(char::is_whitespace) {
        bail!("--tag {tag:?} is not an image name");
    }
    // Before the (long) build: fail now if nothing can build the image.
    let builder = Builder::find()?;
    let started = std::time::Instant::now();
    let context = prepare_context(toolchain)?;
    let version = env!("CARGO_PKG_VERSION");
    let previous = builder.image_id(&tag);
    let mut build = builder.build_command(&tag, version, &git_revision(), &context);
    cmd::run(&mut build).with_context(|| {
        format!(
            "step 3/3 (image build): `{}` failed; see its output above",
            cmd::display(&build)
        )
    })?;
    let (id, size) = builder
        .inspect(&tag)
        .context("step 3/3 (image build): the build succeeded but the image cannot be inspected")?;
    // The image this tag named before, now nameless: removed, so that
    // rebuilding leaves nothing behind.
    if let Some(old) = previous.filter(|old| *old != id) {
        if builder.untagged(&old) {
            match cmd::output(Command::new(builder.name()).args(["rmi", &old])) {
                Ok(_) => println!("removed the previous image {old} (no tag left)"),
                Err(e) => eprintln!("warning: could not remove the previous image {old}: {e:#}"),
            }
        }
    }
    println!("image: {tag}");
    println!("id: {id}");
    match size {
        Size::Bytes(size) => {
            println!(
                "size: {size} bytes ({:.1} MiB)",
                size as f64 / (1024.0 * 1024.0)
            );
            if size > SIZE_TARGET {
                eprintln!(
                    "warning: the image is {size} bytes, over the {} MiB target",
                    SIZE_TARGET / (1024 * 1024)
                );
            }
        }
        Size::Reported(size) => println!("size: {size}"),
    }
    println!("built in {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// The ELF interpreter (PT_INTERP) of a 64-bit little-endian ELF file:
/// `None` for a static executable. Err when it is no such ELF file.
pub fn elf_interpreter(bytes: &[u8]) -> Result<Option<String>, String> {
    const PT_INTERP: u32 = 3;
    let u16_at = |o: usize| -> Result<u16, String> {
        bytes
            .get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .ok_or_else(|| format!("truncated at byte {o}"))
    };
    let u32_at = |o: usize| -> Result<u32, String> {
        bytes
            .get(o..o + 4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
            .ok_or_else(|| format!("truncated at byte {o}"))
    };
    let u64_at = |o: usize| -> Result<u64, String> {
        bytes
            .get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
            .ok_or_else(|| format!("truncated at byte {o}"))
    };
    if bytes.get(..4) != Some(b"\x7fELF") {
        return Err("no ELF magic".into());
    }
    if bytes.get(4..6) != Some(&[2, 1]) {
        return Err("not a 64-bit little-endian ELF file".into());
    }
    let phoff = usize::try_from(u64_at(0x20)?).map_err(|e| e.to_string())?;
    let phentsize = usize::from(u16_at(0x36)?);
    let phnum = usize::from(u16_at(0x38)?);
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        if u32_at(ph)? == PT_INTERP {
            let off = usize::try_from(u64_at(ph + 8)?).map_err(|e| e.to_string())?;
            let len = usize::try_from(u64_at(ph + 32)?).map_err(|e| e.to_string())?;
            let raw = bytes
                .get(off..off + len)
                .ok_or("PT_INTERP points past the end of the file")?;
            let path = raw.split(|&b| b == 0).next().unwrap_or_default();
            return Ok(Some(String::from_utf8_lossy(path).into_owned()));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dynamic_executable_has_an_interpreter() {
        // The xtask binary itself is built for the host (glibc, dynamic).
        let me = fs::read(std::env::current_exe().unwrap()).unwrap();
        let interp = elf_interpreter(&me).unwrap();
        assert!(
            interp.as_deref().is_some_and(|i| i.contains("ld-linux")),
            "{interp:?}"
        );
    }

    #[test]
    fn not_elf_is_an_error() {
        assert!(elf_interpreter(b"#!/bin/sh\n").is_err());
        assert!(elf_interpreter(b"\x7fELF\x01\x01").is_err());
        let mut truncated = b"\x7fELF\x02\x01".to_vec();
        truncated.resize(0x30, 0);
        assert!(elf_interpreter(&truncated)
            .unwrap_err()
            .contains("truncated"));
    }

    #[test]
    fn inspect_output_parses() {
        assert_eq!(
            parse_inspect("abc123 2048\n").unwrap(),
            ("abc123".to_owned(), 2048)
        );
        assert!(parse_inspect("abc123").is_err());
        assert!(parse_inspect("abc123 big").is_err());
    }

    #[test]
    fn build_never_pulls() {
        let c = Builder::Podman.build_command("t:1", "1", "r", Path::new("/ctx"));
        let line = cmd::display(&c);
        assert!(
            line.starts_with("podman build --pull=never --no-cache --layers=false --file "),
            "{line}"
        );
        assert!(
            line.ends_with(
                "deploy/Dockerfile --build-arg VERSION=1 --build-arg REVISION=r --tag t:1 /ctx"
            ),
            "{line}"
        );
    }
}
