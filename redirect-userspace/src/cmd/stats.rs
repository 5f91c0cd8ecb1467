//! `redirect stats`
use std::path::{Path, PathBuf};

use anyhow::Result;
use redirect_userspace::{pins::Pins, report, sys};

#[derive(clap::Args)]
pub struct Args {
    /// Only this pod's counters.
    #[arg(long)]
    pub netns: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

pub fn run(pin_dir: &Path, a: Args) -> Result<()> {
    // The pins are root-only: without privileges they look absent.
    sys::check_privileges()?;
    let only = match &a.netns {
        Some(p) => Some(sys::Netns::open(p)?.cookie()?),
        None => None,
    };
    let pins = Pins::new(pin_dir);
    let pods = report::stats(&pins, only)?;
    if let (Some(p), true) = (&a.netns, pods.is_empty()) {
        return Err(redirect_userspace::error::Error::NotCaptured(p.display().to_string()).into());
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&pods)?);
    } else {
        print!("{}", report::render_stats(&pods));
    }
    // The counts above are short by this much: say so, on stderr so the
    // JSON stays a list of pods (`status --json` has `counters_lost`).
    let lost = report::counters_lost(&pins)?;
    if lost > 0 {
        eprintln!("redirect: warning: {}", report::counters_lost_warning(lost));
    }
    Ok(())
}
