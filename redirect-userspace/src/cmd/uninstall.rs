//! `redirect uninstall`
use std::path::Path;

use anyhow::Result;
use redirect_userspace::{attach, pins::Pins, sys};

pub fn run(pin_dir: &Path) -> Result<()> {
    sys::check_privileges()?;
    let pins = Pins::new(pin_dir);
    if !pins.root.exists() {
        println!("nothing installed under {}", pin_dir.display());
        return Ok(());
    }
    let r = attach::uninstall(&pins)?;
    println!(
        "uninstalled {}: {} links detached, {} maps removed, {} pods released",
        pin_dir.display(),
        r.links,
        r.maps,
        r.pods
    );
    Ok(())
}
