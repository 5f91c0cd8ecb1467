//! `redirect attach`
use std::path::Path;

use anyhow::Result;
use redirect_userspace::{
    attach::{self, Installation},
    config::CaptureFlags,
    pins::Pins,
    sys,
};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub pod: super::PodArgs,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
    /// Map sizes of a new install, `<map>=<entries>` (pods, orig, sockhash,
    /// ports, cidrs, counters), comma separated or repeated. An existing
    /// install keeps its sizes; a different size here is an error.
    #[arg(long = "map-size", value_name = "MAP=N", value_delimiter = ',')]
    pub map_size: Vec<String>,
    /// After attaching, turn the install's kernel debug log on and print
    /// its records (each decision of the programs, any pod) until
    /// interrupted; then turn it off. The pod stays captured.
    #[arg(long)]
    pub debug_log: bool,
    #[command(flatten)]
    pub flags: CaptureFlags,
}

pub fn run(pin_dir: &Path, a: Args) -> Result<()> {
    // Everything is validated before anything is touched.
    let spec = a.flags.to_spec()?;
    let sizes = redirect_userspace::mapsize::MapSizes::parse(&a.map_size)?;
    let netns = sys::Netns::open(&a.pod.netns)?;
    let cgroup = a.pod.cgroup()?;
    for w in spec.warnings() {
        eprintln!("redirect: warning: {w}");
    }
    if a.flags.dry_run {
        if a.json {
            println!(
                "{}",
                serde_json::json!({"dry_run": true, "netns": a.pod.netns, "cgroup": cgroup, "pin_dir": pin_dir, "config": spec})
            );
        } else {
            println!("dry run: nothing changed");
            println!(
                "would capture netns {} (inode {}) via cgroup {}, pins in {}",
                a.pod.netns.display(),
                netns.inode,
                cgroup.display(),
                pin_dir.display()
            );
            println!("istio-iptables {}", spec.istio_args());
            println!("{}", serde_json::to_string_pretty(&spec)?);
        }
        return Ok(());
    }
    // Nothing half-applied: a failure removes what this call created (the
    // whole install when it made it, else the cgroup links it added).
    let pins = Pins::new(pin_dir);
    let fresh = !pins.is_installed();
    let undo = |newly: bool| {
        if fresh {
            let _ = attach::uninstall(&pins);
        } else if newly {
            let _ = attach::detach_cgroup(&pins, &cgroup);
        }
    };
    let mut inst = match Installation::open_with(pin_dir, &sizes) {
        Ok(i) => i,
        Err(e) => {
            undo(false);
            return Err(e.into());
        }
    };
    let newly = match inst.attach_cgroup(&cgroup) {
        Ok(n) => n,
        Err(e) => {
            undo(false);
            return Err(e.into());
        }
    };
    let info = match inst.register_pod(&netns, &spec) {
        Ok(i) => i,
        Err(e) => {
            let others = inst.maps().map(|m| !m.pods().is_empty()).unwrap_or(true);
            if !others {
                undo(newly);
            }
            return Err(e.into());
        }
    };
    if a.json {
        println!(
            "{}",
            serde_json::json!({"pod": info, "cgroup": cgroup, "cgroup_newly_attached": newly, "config": spec})
        );
    } else {
        println!(
            "captured {} (netns cookie {}): outbound -> 127.0.0.1:{} / [::1]:{}, inbound -> :{}",
            info.netns.display(),
            info.cookie,
            spec.proxy_port,
            spec.proxy_port,
            spec.inbound_port
        );
        println!("  istio-iptables {}", spec.istio_args());
        println!(
            "  pod addresses: {}",
            info.addresses
                .iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        println!(
            "  cgroup {} {}",
            cgroup.display(),
            if newly {
                "attached now"
            } else {
                "already attached"
            }
        );
        // Said once, here (forced on a failed probe included); the probe's
        // findings in full: `redirect status`.
        println!("  acceleration: {}", info.accel_decision);
        if !info.listener_seeded.is_empty() {
            println!(
                "  proxy listener found: {}",
                info.listener_seeded.join(", ")
            );
        }
    }
    if a.debug_log {
        follow_kernel_log(&pins)?;
    }
    Ok(())
}

/// `--debug-log`: the kernel's records on stderr until SIGINT or SIGTERM.
fn follow_kernel_log(pins: &Pins) -> Result<()> {
    use redirect_userspace::kernlog;
    use std::io::Write as _;
    let sigs = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    kernlog::set(pins, true)?;
    let follower = kernlog::Follower::start(pins);
    println!("kernel debug log on: following it until interrupted");
    let _ = std::io::stdout().flush();
    if follower.is_ok() {
        let mut sig: libc::c_int = 0;
        unsafe { libc::sigwait(&sigs, &mut sig) };
    }
    // Off again however the follower ended.
    let off = kernlog::set(pins, false);
    drop(follower?);
    off?;
    Ok(())
}
