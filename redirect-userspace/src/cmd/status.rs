//! `redirect status`
use std::path::Path;

use anyhow::Result;
use redirect_userspace::{pins::Pins, report, sys};

#[derive(clap::Args)]
pub struct Args {
    #[arg(long)]
    pub json: bool,
}

pub fn run(pin_dir: &Path, a: Args) -> Result<()> {
    // The pins are root-only: without privileges they look absent.
    sys::check_privileges()?;
    let st = report::status(&Pins::new(pin_dir))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&st)?);
    } else {
        print!("{}", st.render());
    }
    Ok(())
}
