//! `redirect attach`, and what `redirect istio-iptables` runs: the flag
//! table's values → validate → dry run / release / capture / validation.
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use redirect_userspace::{
    attach::{self, Installation},
    config::{CaptureFlags, PodSpec, RunOptions},
    pins::Pins,
    podfiles::PodFiles,
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
    /// ports, cidrs, counters, accel-ports, ifaces, routes), comma separated
    /// or repeated. An existing
    /// install keeps its sizes; a different size here is an error.
    #[arg(long = "map-size", value_name = "MAP=N", value_delimiter = ',')]
    pub map_size: Vec<String>,
    /// After attaching, turn the install's kernel debug log on and print
    /// its records (each decision of the programs, any pod) until
    /// interrupted; then turn it off. The pod stays captured.
    #[arg(long)]
    pub debug_log: bool,
    /// Capture the pod even when another install (another pin directory)
    /// has captured it: both then act on its connections. For moving pods
    /// between installs; without it, attach refuses and names the other.
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub flags: CaptureFlags,
}

pub fn run(pin_dir: &Path, a: Args) -> Result<()> {
    execute(
        pin_dir,
        Invocation {
            netns: Some(a.pod.netns),
            cgroup: a.pod.cgroup,
            json: a.json,
            map_size: a.map_size,
            force: a.force,
            debug_log: a.debug_log,
            flags: a.flags,
        },
    )
}

/// One run of `attach` or `istio-iptables`, its flags all gathered.
pub struct Invocation {
    /// `--netns`; None: this process's network namespace (istio-iptables
    /// runs inside the pod).
    pub netns: Option<PathBuf>,
    pub cgroup: Option<PathBuf>,
    pub json: bool,
    pub map_size: Vec<String>,
    /// `--force`: capture a pod another install has captured too.
    pub force: bool,
    /// `--debug-log`: follow the kernel debug log after capturing.
    pub debug_log: bool,
    pub flags: CaptureFlags,
}

/// The pod's netns: `--netns` or `--network-namespace` (the same if both),
/// else this process's, which must not be the host's.
fn netns_path(inv: &Invocation, opts: &RunOptions) -> Result<(PathBuf, bool)> {
    match (&inv.netns, &opts.network_namespace) {
        (Some(a), Some(b)) if a != b => bail!(
            "--netns {} and --network-namespace {} name different network namespaces: give one",
            a.display(),
            b.display()
        ),
        (Some(p), _) | (None, Some(p)) => Ok((p.clone(), false)),
        (None, None) => Ok((
            PathBuf::from(format!("/proc/{}/ns/net", std::process::id())),
            true,
        )),
    }
}

pub fn execute(pin_dir: &Path, inv: Invocation) -> Result<()> {
    // Everything is validated before anything is touched.
    let opts = inv.flags.run_options()?;
    let mut spec = inv.flags.to_spec()?;
    let sizes = redirect_userspace::mapsize::MapSizes::parse(&inv.map_size)?;
    let (netns_path, defaulted) = netns_path(&inv, &opts)?;
    let netns = sys::Netns::open(&netns_path).map_err(|e| {
        let by = if inv.netns.is_some() {
            "--netns".to_string()
        } else if opts.network_namespace.is_some() {
            inv.flags
                .field_name(redirect_userspace::config::Flag::NetworkNamespace)
        } else {
            "this process's network namespace".to_string()
        };
        anyhow::anyhow!("{by}: {e}")
    })?;
    // Refused before anything is touched: a pin dir that exists but is
    // not on bpffs holds no install.
    if Path::new(pin_dir).symlink_metadata().is_ok() {
        sys::check_on_bpffs(pin_dir)?;
    }
    // `--cgroup`, else the pod's recorded cgroup (a re-attach never widens
    // it silently), else the cgroup2 root.
    let (cgroup, from, recorded) = super::pod_cgroup(pin_dir, inv.cgroup.as_deref(), &netns)?;
    let ignored = inv.flags.ignored();
    for i in &ignored {
        tracing::info!(flag = %i.flag, value = %i.value, reason = i.reason, "accepted, no effect");
    }
    // Never the host's netns (checked again where pods are registered).
    if netns.is_host() && !opts.dry_run {
        return Err(redirect_userspace::error::Error::HostNetns(netns.path.clone()).into());
    }
    if opts.cleanup_only {
        return cleanup(pin_dir, &netns, &opts, inv.json);
    }
    // What istio-init reads inside the pod: its nameservers and groups.
    let notes = PodFiles::locate(&netns_path, defaulted, &opts).complete(&mut spec)?;
    if opts.dry_run {
        return dry_run(
            pin_dir, &inv, &opts, &spec, &netns, &cgroup, defaulted, &notes,
        );
    }
    if opts.skip_rule_apply {
        if !opts.run_validation {
            println!("--skip-rule-apply: nothing captured, nothing changed");
        }
    } else {
        for w in spec.warnings() {
            eprintln!("redirect: warning: {w}");
        }
        let target = Target {
            netns: &netns,
            cgroup: &cgroup,
            from,
            recorded: recorded.as_ref(),
            force: inv.force,
            debug_log: inv.debug_log,
        };
        capture(pin_dir, &target, &spec, &sizes, inv.json, &notes)?;
    }
    if opts.run_validation {
        let a = super::validate::Args {
            pod: super::PodArgs {
                netns: netns_path,
                cgroup: Some(cgroup),
            },
            probe_port: opts.probe_port,
            timeout_ms: opts.probe_timeout.as_millis().max(1) as u64,
        };
        super::validate::run(pin_dir, a).map_err(|e| {
            anyhow::Error::new(super::Exit {
                code: super::VALIDATION_FAILED,
                error: e,
            })
        })?;
    }
    Ok(())
}

/// `--cleanup-only`: release the pod (nothing captured: nothing to do).
fn cleanup(pin_dir: &Path, netns: &sys::Netns, opts: &RunOptions, json: bool) -> Result<()> {
    let cookie = netns.cookie()?;
    let pins = Pins::new(pin_dir);
    let captured = pins.is_installed()
        && redirect_userspace::maps::Maps::open(&pins)?
            .pod(cookie)
            .is_some();
    let released = if captured && !opts.dry_run {
        attach::release_pod(&pins, cookie)?;
        true
    } else {
        false
    };
    if json {
        println!(
            "{}",
            serde_json::json!({"cleanup_only": true, "dry_run": opts.dry_run, "netns": netns.path, "cookie": cookie, "captured": captured, "released": released})
        );
    } else if !captured {
        println!(
            "--cleanup-only: {} (netns cookie {cookie}) is not captured: nothing to release",
            netns.path.display()
        );
    } else if opts.dry_run {
        println!(
            "dry run: --cleanup-only would release {} (netns cookie {cookie})",
            netns.path.display()
        );
    } else {
        println!(
            "released netns cookie {cookie} ({}) (--cleanup-only)",
            netns.path.display()
        );
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn dry_run(
    pin_dir: &Path,
    inv: &Invocation,
    opts: &RunOptions,
    spec: &PodSpec,
    netns: &sys::Netns,
    cgroup: &Path,
    defaulted: bool,
    notes: &[String],
) -> Result<()> {
    let ignored = inv.flags.ignored();
    let host = netns.is_host();
    let mut refused: Vec<String> = spec
        .unsupported()
        .iter()
        .map(|(d, why)| format!("{}: not supported yet: {why}", d.name()))
        .collect();
    if let Some(e) = spec.unresolved_group() {
        refused.push(e.to_string());
    }
    if host {
        refused.push(redirect_userspace::error::Error::HostNetns(netns.path.clone()).to_string());
    }
    // Another install has the pod (see `owner`).
    let owned = if host {
        None
    } else {
        match redirect_userspace::podns::cookie(netns).and_then(|c| {
            redirect_userspace::owner::refuse_if_owned(netns, c, &Pins::new(pin_dir), inv.force)
        }) {
            Err(e @ redirect_userspace::error::Error::OwnedElsewhere { .. }) => Some(e),
            // Without the privileges to look, a dry run cannot tell.
            _ => None,
        }
    };
    if let Some(e) = &owned {
        refused.push(e.to_string());
    }
    let warnings = spec.warnings();
    if inv.json {
        println!(
            "{}",
            serde_json::json!({
                "dry_run": true,
                "netns": netns.path,
                "cgroup": cgroup,
                "pin_dir": pin_dir,
                "config": spec,
                "istio_iptables_args": spec.istio_args(),
                "skip_rule_apply": opts.skip_rule_apply,
                "run_validation": opts.run_validation,
                "run": {
                    "skip_rule_apply": opts.skip_rule_apply,
                    "run_validation": opts.run_validation,
                    "probe_port": opts.probe_port,
                    "probe_timeout_ms": opts.probe_timeout.as_millis() as u64,
                    "cleanup_only": opts.cleanup_only,
                    "dns_resolv_conf": opts.dns_resolv_conf,
                    "pod_root": opts.pod_root,
                },
                "warnings": warnings,
                "notes": notes,
                "dns_capture": spec.dns_capture().describe(),
                "ignored": ignored,
                "refused": refused,
            })
        );
    } else {
        for w in &warnings {
            eprintln!("redirect: warning: {w}");
        }
        println!("dry run: nothing changed");
        println!(
            "would capture netns {}{} (inode {}) via cgroup {}, pins in {}",
            netns.path.display(),
            if defaulted { " (this process's)" } else { "" },
            netns.inode,
            cgroup.display(),
            pin_dir.display()
        );
        if opts.skip_rule_apply {
            println!("--skip-rule-apply: a real run captures nothing");
        }
        if opts.run_validation {
            println!("--run-validation: a real run then validates the capture");
        }
        println!("istio-iptables {}", spec.istio_args());
        for n in notes {
            println!("{n}");
        }
        println!("dns capture: {}", spec.dns_capture().describe());
        println!("{}", serde_json::to_string_pretty(spec)?);
        for i in &ignored {
            println!("accepted, no effect: {}={} ({})", i.flag, i.value, i.reason);
        }
        for r in &refused {
            println!("a real run refuses: {r}");
        }
    }
    // A dry run fails where the real run would.
    if !opts.skip_rule_apply {
        spec.check_supported()?;
        if host {
            return Err(redirect_userspace::error::Error::HostNetns(netns.path.clone()).into());
        }
        if let Some(e) = owned {
            return Err(e.into());
        }
    }
    Ok(())
}

/// The pod a capture is for, and how its cgroup was chosen.
struct Target<'a> {
    netns: &'a sys::Netns,
    cgroup: &'a Path,
    from: super::CgroupFrom,
    /// The pod's cgroup recorded in the install before this capture.
    recorded: Option<&'a redirect_userspace::cgroups::Recorded>,
    force: bool,
    debug_log: bool,
}

fn capture(
    pin_dir: &Path,
    t: &Target<'_>,
    spec: &PodSpec,
    sizes: &redirect_userspace::mapsize::MapSizes,
    json: bool,
    notes: &[String],
) -> Result<()> {
    let (netns, cgroup) = (t.netns, t.cgroup);
    // Nothing half-applied: a failure removes what this call created (the
    // whole install when it made it, else the cgroup links it added), and
    // nothing else: a pin dir that existed before is kept.
    let pins = Pins::new(pin_dir);
    let fresh = !pins.is_installed();
    let root_existed = pin_dir.symlink_metadata().is_ok();
    let undo = |newly: bool| {
        if fresh {
            let _ = attach::uninstall_opts(&pins, !root_existed);
        } else if newly {
            let _ = attach::detach_cgroup(&pins, cgroup);
        }
    };
    // Refused before anything is created.
    spec.check_supported()?;
    sys::check_privileges()?;
    let mut inst = match Installation::open_with(pin_dir, sizes) {
        Ok(i) => i,
        Err(e) => {
            undo(false);
            return Err(e.into());
        }
    };
    // Another install's pod: refused before anything is attached.
    if let Err(e) = redirect_userspace::podns::cookie(netns)
        .and_then(|c| redirect_userspace::owner::refuse_if_owned(netns, c, &pins, t.force))
    {
        undo(false);
        return Err(e.into());
    }
    let newly = match inst.attach_cgroup(cgroup) {
        Ok(n) => n,
        Err(e) => {
            undo(false);
            return Err(e.into());
        }
    };
    let opts = attach::Register {
        cgroup: Some(cgroup),
        force: t.force,
    };
    let info = match inst.register_pod_with(netns, spec, &opts) {
        Ok(i) => i,
        Err(e) => {
            let others = inst.maps().map(|m| !m.pods().is_empty()).unwrap_or(true);
            if !others {
                undo(newly);
            }
            return Err(e.into());
        }
    };
    if !info.unmatched_interfaces.is_empty() {
        eprintln!(
            "redirect: warning: no interface of the pod matches {} yet. The agent (redirect daemon) follows the pod's interfaces and applies the name when one appears; without it, run this again once the interface exists",
            info.unmatched_interfaces.join(", ")
        );
    }
    for o in &info.also_captured_by {
        eprintln!(
            "redirect: warning: --force: {} is also captured by {o}; both installs act on its connections until it is released from one",
            netns.path.display()
        );
    }
    // A pod moved to another cgroup: the old one keeps its programs (the
    // pod's connections opened there still use them).
    let moved_from = t.recorded.filter(|r| {
        std::fs::metadata(cgroup)
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m) != r.id)
            .unwrap_or(true)
    });
    // Processes of the pod that this cgroup does not cover.
    let outside = sys::cgroup2_mount()
        .map(|m| redirect_userspace::cgroups::outside(netns.inode, cgroup, &m))
        .unwrap_or_default();
    if !outside.is_empty() {
        let list: Vec<String> = outside
            .iter()
            .take(5)
            .map(|o| format!("pid {} ({}) in {}", o.pid, o.comm, o.cgroup))
            .collect();
        eprintln!(
            "redirect: warning: {} process{} in {} {} outside cgroup {} and not captured (their connections go direct): {}{}. Attach with a --cgroup that contains them, or move them into it",
            outside.len(),
            if outside.len() == 1 { "" } else { "es" },
            netns.path.display(),
            if outside.len() == 1 { "is" } else { "are" },
            cgroup.display(),
            list.join(", "),
            if outside.len() > 5 { ", ..." } else { "" }
        );
    }
    let from = match t.from {
        super::CgroupFrom::Flag => "--cgroup",
        super::CgroupFrom::Recorded => "the pod's recorded cgroup",
        super::CgroupFrom::Root => "the cgroup2 root",
    };
    if json {
        println!(
            "{}",
            serde_json::json!({"pod": info, "cgroup": cgroup, "cgroup_from": from, "cgroup_newly_attached": newly, "moved_from_cgroup": moved_from.map(|m| &m.path), "outside_cgroup": outside, "config": spec, "dns_capture": spec.dns_capture().describe(), "ipv6": info.ipv6.describe(), "notes": notes})
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
        for n in notes {
            println!("  {n}");
        }
        if spec.redirect_dns {
            println!("  dns capture: {}", spec.dns_capture().describe());
        }
        println!(
            "  pod addresses: {}",
            info.addresses
                .iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        println!("  IPv6: {}", info.ipv6.describe());
        println!(
            "  cgroup {} {} ({from}{})",
            cgroup.display(),
            if newly {
                "attached now"
            } else {
                "already attached"
            },
            if t.from == super::CgroupFrom::Recorded {
                "; --cgroup to change it"
            } else {
                ""
            }
        );
        if let Some(old) = moved_from {
            println!(
                "  was attached under cgroup {} (its programs stay: `redirect detach` then `attach` moves the pod completely)",
                old.path.display()
            );
        }
        // Said once, here (forced on a failed probe included); the probe's
        // findings in full: `redirect status`.
        if !info.vm_interfaces.is_empty() {
            println!(
                "  VM interfaces (-k), programs attached: {}",
                info.vm_interfaces.join(", ")
            );
        }
        println!("  acceleration: {}", info.accel_decision);
        if !info.listener_seeded.is_empty() {
            println!(
                "  proxy listener found: {}",
                info.listener_seeded.join(", ")
            );
        }
    }
    if t.debug_log {
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
