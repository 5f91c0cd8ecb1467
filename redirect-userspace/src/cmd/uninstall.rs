//! `redirect uninstall`
use std::path::{Path, PathBuf};

use anyhow::Result;
use redirect_userspace::{attach, cni::conflist, pins::Pins, sys};

#[derive(clap::Args, Default)]
pub struct Args {
    /// Also remove the redirect-cni entry from this conflist (a file name
    /// in --cni-conf-dir, or a path) first, so no new pod asks for capture.
    #[arg(long)]
    pub cni_conflist: Option<PathBuf>,
    /// Directory of the CNI network configs.
    #[arg(long, default_value = "/etc/cni/net.d")]
    pub cni_conf_dir: PathBuf,
    /// Also remove the redirect-cni binary from this CNI bin directory.
    #[arg(long)]
    pub cni_bin_dir: Option<PathBuf>,
}

pub fn run(pin_dir: &Path, a: Args) -> Result<()> {
    sys::check_privileges()?;
    if let Some(c) = &a.cni_conflist {
        let p = conflist::conflist_path(&a.cni_conf_dir, c);
        if conflist::remove_entry(&p)? {
            println!("removed the redirect-cni entry from {}", p.display());
        } else {
            println!("no redirect-cni entry in {}", p.display());
        }
    }
    if let Some(dir) = &a.cni_bin_dir {
        let bin = dir.join(redirect_userspace::cni::PLUGIN_TYPE);
        match std::fs::remove_file(&bin) {
            Ok(()) => println!("removed {}", bin.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(anyhow::anyhow!("removing {}: {e}", bin.display())),
        }
    }
    let pins = Pins::new(pin_dir);
    if pins.root.symlink_metadata().is_err() {
        println!("nothing installed under {}", pin_dir.display());
        return Ok(());
    }
    // Only the pins of the install's layout go; a pin dir not on bpffs is
    // refused untouched.
    let r = attach::uninstall(&pins)?;
    println!(
        "uninstalled {}: {} links detached, {} maps and {} programs removed, {} pods released",
        pin_dir.display(),
        r.links,
        r.maps,
        r.programs,
        r.pods
    );
    for p in &r.removed {
        println!("  removed {}", p.display());
    }
    if !r.left.is_empty() {
        eprintln!(
            "redirect: warning: left in place in {} (not made by redirect, so not removed):",
            pin_dir.display()
        );
        for p in &r.left {
            eprintln!("  {}", p.display());
        }
    }
    Ok(())
}
