//! Debian kernel packages: found with `apt-cache`, fetched with `apt-get
//! download` and unpacked with `dpkg-deb -x` into a cache under
//! `target/kernels/`. Nothing is installed and nothing global is touched:
//! apt runs with a sources list, package lists and a download cache of the
//! project's own (`target/kernels/apt/`). The mirrors are the ones the
//! machine's own apt sources already use for Debian.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

use crate::cmd::{self, find_executable, is_root};

/// Suites searched for kernels: each kernel of the matrix is the newest
/// `linux-image-amd64` of its version line among them.
const SUITES: &[(&str, Mirror)] = &[
    ("bullseye", Mirror::Main),
    ("bullseye-security", Mirror::Security),
    ("bookworm", Mirror::Main),
    ("bookworm-security", Mirror::Security),
    ("bookworm-backports", Mirror::Main),
];

/// Keyring of the Debian archive (package `debian-archive-keyring`); it
/// holds the keys of the current and the previous releases.
const DEBIAN_KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

/// Overrides of the mirrors found in the machine's apt sources.
const MIRROR_ENV: &str = "REDIRECT_DEBIAN_MIRROR";
const SECURITY_MIRROR_ENV: &str = "REDIRECT_DEBIAN_SECURITY_MIRROR";

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mirror {
    Main,
    Security,
}

/// A Debian mirror pair (the archive and its security archive) and the
/// keyring that signs them.
#[derive(Debug, PartialEq)]
pub struct Mirrors {
    main: String,
    security: String,
    keyring: String,
}

/// A kernel image package: name and exact version.
#[derive(Clone, Debug, PartialEq)]
pub struct ImagePackage {
    pub name: String,
    pub version: String,
}

impl std::fmt::Display for ImagePackage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.name, self.version)
    }
}

/// apt with the project's own sources, lists and cache.
pub struct Apt {
    dir: PathBuf,
}

impl Apt {
    /// Writes `<dir>/sources.list` for [`SUITES`] on the machine's Debian mirrors.
    pub fn new(dir: &Path) -> Result<Apt> {
        let mirrors = system_mirrors()?;
        if !Path::new(&mirrors.keyring).is_file() {
            install_keyring()?;
        }
        for sub in ["lists/partial", "cache/archives/partial", "sources.list.d"] {
            let d = dir.join(sub);
            fs::create_dir_all(&d).with_context(|| format!("cannot create {}", d.display()))?;
        }
        let list = dir.join("sources.list");
        fs::write(&list, sources_list(&mirrors))
            .with_context(|| format!("cannot write {}", list.display()))?;
        Ok(Apt {
            dir: dir.to_path_buf(),
        })
    }

    fn command(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        let opt = |key: &str, value: &Path| format!("{key}={}", value.display());
        for (key, sub) in [
            ("Dir::Etc::SourceList", "sources.list"),
            ("Dir::Etc::SourceParts", "sources.list.d"),
            ("Dir::State::Lists", "lists"),
            ("Dir::Cache", "cache"),
        ] {
            c.arg("-o").arg(opt(key, &self.dir.join(sub)));
        }
        c.args(["-o", "Acquire::Languages=none"]);
        // The files are root's: apt's unprivileged `_apt` user could not
        // write them (and warns).
        if is_root() {
            c.args(["-o", "APT::Sandbox::User=root"]);
        }
        c.env("DEBIAN_FRONTEND", "noninteractive");
        c
    }

    /// `apt-get update` of the project's lists.
    pub fn update(&self) -> Result<()> {
        let mut update = self.command("apt-get");
        update.args(["-qq", "update"]);
        cmd::run(&mut update).context("`apt-get update` of the kernel sources failed")
    }

    /// The newest kernel image of the `version` line (e.g. "6.1"): the
    /// dependency of the newest `linux-image-amd64` whose version starts
    /// with it.
    pub fn resolve(&self, version: &str) -> Result<ImagePackage> {
        let mut show = self.command("apt-cache");
        show.args(["show", "linux-image-amd64"]);
        let out = cmd::output(&mut show).context("`apt-cache show linux-image-amd64` failed")?;
        let mut best: Option<(String, ImagePackage)> = None;
        for (meta, image) in meta_packages(&out) {
            if !meta.starts_with(&format!("{version}.")) {
                continue;
            }
            let newer = match &best {
                None => true,
                Some((v, _)) => dpkg_newer(&meta, v)?,
            };
            if newer {
                best = Some((meta, image));
            }
        }
        match best {
            Some((_, image)) => Ok(image),
            None => bail!(
                "no linux-image-amd64 {version}.* in the suites {}; check {}",
                SUITES
                    .iter()
                    .map(|(s, _)| *s)
                    .collect::<Vec<_>>()
                    .join(", "),
                self.dir.join("sources.list").display()
            ),
        }
    }

    /// Downloads `image` and unpacks it into `root` (replaced atomically).
    pub fn fetch(&self, image: &ImagePackage, root: &Path) -> Result<()> {
        let downloads = self.dir.join("downloads");
        fs::create_dir_all(&downloads)
            .with_context(|| format!("cannot create {}", downloads.display()))?;
        let mut download = self.command("apt-get");
        download
            .current_dir(&downloads)
            .args(["-qq", "download"])
            .arg(format!("{}={}", image.name, image.version));
        cmd::run(&mut download).with_context(|| format!("downloading {image} failed"))?;
        let deb = fs::read_dir(&downloads)?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                    n.starts_with(&format!("{}_", image.name)) && n.ends_with(".deb")
                })
            })
            .with_context(|| {
                format!(
                    "apt-get download left no {}_*.deb in {}",
                    image.name,
                    downloads.display()
                )
            })?;
        let partial = root.with_extension("partial");
        let _ = fs::remove_dir_all(&partial);
        cmd::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&partial))
            .with_context(|| format!("unpacking {} failed", deb.display()))?;
        let _ = fs::remove_dir_all(root);
        fs::rename(&partial, root)
            .with_context(|| format!("cannot move {} to {}", partial.display(), root.display()))?;
        fs::remove_file(&deb).with_context(|| format!("cannot remove {}", deb.display()))?;
        Ok(())
    }
}

/// `(version of linux-image-amd64, the image package it depends on)` for
/// each stanza of `apt-cache show linux-image-amd64`.
fn meta_packages(show: &str) -> Vec<(String, ImagePackage)> {
    show.split("\n\n")
        .filter_map(|stanza| {
            let field = |name: &str| {
                stanza
                    .lines()
                    .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                    .map(str::trim)
            };
            let version = field("Version")?;
            // "linux-image-6.1.0-57-amd64 (= 6.1.192-3)"
            let first = field("Depends")?.split(',').next()?.trim();
            let (name, rest) = first.split_once(' ')?;
            let image_version = rest.trim().strip_prefix("(=")?.strip_suffix(')')?.trim();
            (name.starts_with("linux-image-") && name.ends_with("-amd64")).then(|| {
                (
                    version.to_string(),
                    ImagePackage {
                        name: name.to_string(),
                        version: image_version.to_string(),
                    },
                )
            })
        })
        .collect()
}

/// `dpkg --compare-versions a gt b`.
fn dpkg_newer(a: &str, b: &str) -> Result<bool> {
    Ok(Command::new("dpkg")
        .args(["--compare-versions", a, "gt", b])
        .status()
        .context("running dpkg --compare-versions")?
        .success())
}

fn sources_list(m: &Mirrors) -> String {
    let mut s =
        String::from("# Written by `cargo xtask kernels`: the suites its kernels come from.\n");
    for (suite, mirror) in SUITES {
        let uri = match mirror {
            Mirror::Main => &m.main,
            Mirror::Security => &m.security,
        };
        s.push_str(&format!(
            "deb [signed-by={}] {uri} {suite} main\n",
            m.keyring
        ));
    }
    s
}

/// The Debian mirrors of the machine's apt sources (or the environment's).
fn system_mirrors() -> Result<Mirrors> {
    let mut texts = Vec::new();
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = dir.flatten().map(|e| e.path()).collect();
        more.sort();
        files.extend(more);
    }
    for f in files {
        let deb822 = f.extension().is_some_and(|e| e == "sources");
        let one_line = f.extension().is_some_and(|e| e == "list");
        if deb822 || one_line {
            if let Ok(text) = fs::read_to_string(&f) {
                texts.push((deb822, text));
            }
        }
    }
    let found = mirrors_from(&texts);
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    let main = env(MIRROR_ENV).or_else(|| found.as_ref().map(|m| m.main.clone()));
    let security = env(SECURITY_MIRROR_ENV).or_else(|| found.as_ref().map(|m| m.security.clone()));
    match (main, security) {
        (Some(main), Some(security)) => Ok(Mirrors {
            main,
            security,
            keyring: found
                .map(|m| m.keyring)
                .unwrap_or_else(|| DEBIAN_KEYRING.into()),
        }),
        _ => bail!(
            "no Debian mirror (a suite and its -security suite) in /etc/apt/sources.list or \
             /etc/apt/sources.list.d/; set {MIRROR_ENV} and {SECURITY_MIRROR_ENV} to the \
             URIs of a Debian archive and its security archive"
        ),
    }
}

/// The first Debian archive and security archive in apt source files
/// (`(deb822 format?, text)`).
fn mirrors_from(texts: &[(bool, String)]) -> Option<Mirrors> {
    // (uris, suites, signed-by) of each `deb` entry.
    let mut entries: Vec<(Vec<String>, Vec<String>, Option<String>)> = Vec::new();
    for (deb822, text) in texts {
        if *deb822 {
            for stanza in text.split("\n\n") {
                let field = |name: &str| {
                    stanza.lines().find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.trim()
                            .eq_ignore_ascii_case(name)
                            .then(|| v.trim().to_string())
                    })
                };
                let enabled = field("Enabled").is_none_or(|v| v != "no");
                let is_deb =
                    field("Types").is_some_and(|t| t.split_whitespace().any(|t| t == "deb"));
                if enabled && is_deb {
                    let words = |v: Option<String>| {
                        v.map(|v| v.split_whitespace().map(String::from).collect())
                            .unwrap_or_default()
                    };
                    entries.push((
                        words(field("URIs")),
                        words(field("Suites")),
                        field("Signed-By"),
                    ));
                }
            }
        } else {
            for line in text.lines() {
                let line = line.split('#').next().unwrap_or("").trim();
                let Some(rest) = line.strip_prefix("deb ") else {
                    continue;
                };
                let mut rest = rest.trim();
                let mut signed_by = None;
                if let Some(opts) = rest.strip_prefix('[') {
                    let Some((opts, after)) = opts.split_once(']') else {
                        continue;
                    };
                    signed_by = opts
                        .split_whitespace()
                        .find_map(|o| o.strip_prefix("signed-by="))
                        .map(String::from);
                    rest = after.trim();
                }
                let mut words = rest.split_whitespace();
                let (Some(uri), Some(suite)) = (words.next(), words.next()) else {
                    continue;
                };
                entries.push((vec![uri.into()], vec![suite.into()], signed_by));
            }
        }
    }
    let debian = |suite: &str| {
        let base = suite.split('-').next().unwrap_or(suite);
        [
            "buster",
            "bullseye",
            "bookworm",
            "trixie",
            "forky",
            "duke",
            "sid",
            "stable",
            "oldstable",
            "testing",
            "unstable",
        ]
        .contains(&base)
    };
    let mut main = None;
    let mut security = None;
    let mut keyring = None;
    for (uris, suites, signed_by) in &entries {
        for suite in suites.iter().filter(|s| debian(s)) {
            let slot = if suite.ends_with("-security") {
                &mut security
            } else {
                &mut main
            };
            if slot.is_none() {
                *slot = uris.first().map(|u| u.trim_end_matches('/').to_string());
                if keyring.is_none() {
                    keyring = signed_by.clone().filter(|k| k.starts_with('/'));
                }
            }
        }
    }
    Some(Mirrors {
        main: main?,
        security: security?,
        keyring: keyring.unwrap_or_else(|| DEBIAN_KEYRING.into()),
    })
}

/// Installs `debian-archive-keyring` (the sources list names its keyring).
fn install_keyring() -> Result<()> {
    let by_hand = "apt-get install -y debian-archive-keyring";
    if find_executable("apt-get").is_none() || !is_root() {
        bail!("{DEBIAN_KEYRING} is missing; run as root: {by_hand}");
    }
    cmd::run(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "debian-archive-keyring"]),
    )
    .with_context(|| format!("installing the Debian archive keyring failed; run: {by_hand}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHOW: &str = "Package: linux-image-amd64
Source: linux-signed-amd64 (6.12.95+1~bpo12+1)
Version: 6.12.95-1~bpo12+1
Depends: linux-image-6.12.95+deb12-amd64 (= 6.12.95-1~bpo12+1)
Description: Linux for 64-bit PCs (meta-package)

Package: linux-image-amd64
Version: 6.1.192-3
Depends: linux-image-6.1.0-57-amd64 (= 6.1.192-3)

Package: linux-image-amd64
Version: 5.10.262-1
Depends: linux-image-5.10.0-46-amd64 (= 5.10.262-1), other
";

    #[test]
    fn meta_packages_name_their_image() {
        let found = meta_packages(SHOW);
        assert_eq!(found.len(), 3);
        assert_eq!(found[1].0, "6.1.192-3");
        assert_eq!(
            found[1].1,
            ImagePackage {
                name: "linux-image-6.1.0-57-amd64".into(),
                version: "6.1.192-3".into()
            }
        );
        assert_eq!(found[0].1.name, "linux-image-6.12.95+deb12-amd64");
        assert_eq!(found[2].1.version, "5.10.262-1");
    }

    #[test]
    fn mirrors_from_deb822_and_one_line_sources() {
        let deb822 = "Types: deb\nURIs: http://mirror.example/debian/\nSuites: bookworm bookworm-updates\n\
                      Components: main\nSigned-By: /usr/share/keyrings/k.gpg\n\n\
                      Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\n\
                      Components: main\n";
        let other = "Types: deb\nURIs: https://other.example/node\nSuites: nodistro\n";
        let m = mirrors_from(&[(true, other.into()), (true, deb822.into())]).unwrap();
        assert_eq!(
            m,
            Mirrors {
                main: "http://mirror.example/debian".into(),
                security: "http://mirror.example/debian-security".into(),
                keyring: "/usr/share/keyrings/k.gpg".into()
            }
        );
        let list =
            "# comment\ndeb [arch=amd64 signed-by=/k.gpg] http://m.example/debian bookworm main\n\
                    deb http://s.example/debian-security bookworm-security main\n";
        let m = mirrors_from(&[(false, list.into())]).unwrap();
        assert_eq!(m.main, "http://m.example/debian");
        assert_eq!(m.security, "http://s.example/debian-security");
        assert_eq!(m.keyring, "/k.gpg");
        assert!(
            mirrors_from(&[(false, "deb http://x.example/ubuntu jammy main\n".into())]).is_none()
        );
    }

    #[test]
    fn sources_list_covers_every_suite() {
        let m = Mirrors {
            main: "http://m/debian".into(),
            security: "http://m/debian-security".into(),
            keyring: DEBIAN_KEYRING.into(),
        };
        let s = sources_list(&m);
        assert!(s.contains(&format!(
            "deb [signed-by={DEBIAN_KEYRING}] http://m/debian-security bullseye-security main"
        )));
        assert!(s.contains("http://m/debian bookworm-backports main"));
        assert_eq!(
            s.lines().filter(|l| l.starts_with("deb ")).count(),
            SUITES.len()
        );
    }
}
