//! `redirect detach`
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use redirect_userspace::{attach, cgroups, maps::Maps, pins::Pins, sys};

#[derive(clap::Args)]
pub struct Args {
    /// The pod's network namespace.
    #[arg(long, required_unless_present = "cookie")]
    pub netns: Option<PathBuf>,
    /// Release by netns cookie (see `redirect status`), e.g. when the
    /// namespace is already gone.
    #[arg(long, conflicts_with = "netns")]
    pub cookie: Option<u64>,
}

pub fn run(pin_dir: &Path, a: Args) -> Result<()> {
    sys::check_privileges()?;
    let netns = a.netns.as_deref().map(sys::Netns::open).transpose()?;
    let cookie = match (&netns, a.cookie) {
        (_, Some(c)) => c,
        (Some(ns), None) => ns.cookie()?,
        (None, None) => bail!("give --netns or --cookie"),
    };
    let pins = Pins::new(pin_dir);
    // The cgroup the pod was attached under, and its netns when only the
    // cookie was given (found by the inode its config keeps).
    let (recorded, netns) = if pins.is_installed() {
        let netns = netns.or_else(|| {
            let inode = Maps::open(&pins).ok()?.pod(cookie)?.netns_inode;
            let path = sys::netns_name(inode as u64)?;
            sys::Netns::open(Path::new(&path)).ok()
        });
        (cgroups::recorded(&pins, cookie)?, netns)
    } else {
        (None, netns)
    };
    attach::release_pod(&pins, cookie).map_err(|e| match (&e, &a.netns) {
        (redirect_userspace::error::Error::NotCaptured(_), Some(p)) => {
            redirect_userspace::error::Error::NotCaptured(p.display().to_string())
        }
        _ => e,
    })?;
    println!(
        "released netns cookie {cookie}{}",
        a.netns
            .map(|p| format!(" ({})", p.display()))
            .unwrap_or_default()
    );
    // Its cgroup's programs go too when no other pod was attached under
    // it. Their socket records first: once the programs are gone, no
    // close of the pod's remaining sockets would remove them.
    let Some(r) = recorded else {
        return Ok(());
    };
    if !pins.cgroup_dir(r.id).exists() {
        return Ok(());
    }
    if attach::cgroup_in_use(&pins, r.id)? {
        println!(
            "  cgroup {}: programs stay attached (other pods use them)",
            r.path.display()
        );
        return Ok(());
    }
    let Some(ns) = netns else {
        println!(
            "  cgroup {}: programs stay attached (the pod's network namespace was not found, and its open connections may still need them); `redirect uninstall` removes them",
            r.path.display()
        );
        return Ok(());
    };
    attach::forget_socket_records(&pins, &ns)?;
    attach::detach_cgroup_id(&pins, r.id)?;
    println!(
        "  cgroup {}: programs detached (no other pod was attached under it)",
        r.path.display()
    );
    Ok(())
}
