//! `redirect detach`
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use redirect_userspace::{attach, pins::Pins, sys};

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
    let cookie = match (&a.netns, a.cookie) {
        (_, Some(c)) => c,
        (Some(p), None) => sys::Netns::open(p)?.cookie()?,
        (None, None) => bail!("give --netns or --cookie"),
    };
    let pins = Pins::new(pin_dir);
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
    Ok(())
}
