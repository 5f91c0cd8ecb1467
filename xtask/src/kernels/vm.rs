//! Booting a kernel under QEMU (TCG) with virtme-ng and waiting for it,
//! with deadlines; whatever happens, nothing of it is left running.
//!
//! `vng` runs in a process group of its own (its `virtme-run` and the
//! `qemu-system-x86_64` it forks stay in it); a deadline, Ctrl-C or
//! SIGTERM kills that group by its id. vng's exit code says nothing here
//! (255 without udev on the host), so the caller reads the guest's files.

use std::{
    fs::File,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicI32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

/// The last signal asked to stop xtask (SIGINT/SIGTERM), or 0.
static STOP: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(signal: libc::c_int) {
    STOP.store(signal, Ordering::SeqCst);
}

/// From now on SIGINT and SIGTERM make [`boot`] kill its VM and return.
pub fn catch_stop_signals() {
    let handler = on_signal as extern "C" fn(libc::c_int);
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores into an atomic.
        unsafe {
            libc::signal(signal, handler as libc::sighandler_t);
        }
    }
}

/// The signal that stopped us, if one did.
pub fn stopped_by() -> Option<i32> {
    match STOP.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

pub struct BootPlan<'a> {
    /// `vng` and the directory with `virtme-run` (put on PATH).
    pub vng: &'a Path,
    pub vmlinuz: &'a Path,
    pub rwdir: &'a Path,
    pub script: &'a Path,
    pub console: &'a Path,
    pub memory: &'a str,
    pub cpus: usize,
    /// `booted` must appear in `rwdir` within this.
    pub boot_timeout: Duration,
    /// The whole run must end within this.
    pub timeout: Duration,
}

/// How a VM run ended.
#[derive(Debug, PartialEq)]
pub enum Ended {
    /// vng exited (the guest powered off); see the rwdir for results.
    Exited,
    /// No `booted` in time: killed.
    NoBoot(Duration),
    /// Killed at the overall deadline.
    TimedOut(Duration),
    /// Killed because xtask got this signal.
    Stopped(i32),
}

/// The `vng` command line for `plan`.
pub fn command(plan: &BootPlan) -> Command {
    let mut vng = Command::new(plan.vng);
    if let Some(path) = plan.vng.parent().and_then(crate::cmd::path_with) {
        vng.env("PATH", path);
    }
    vng.arg("--disable-kvm")
        // Without virtiofsd on the host vng tries it, fails, and falls
        // back to 9p: go to 9p at once.
        .arg("--force-9p")
        .arg("--run")
        .arg(plan.vmlinuz)
        .args(["-m", plan.memory, "--cpus", &plan.cpus.to_string()])
        .arg("--rwdir")
        .arg(plan.rwdir)
        // Tests write /etc/netns/<name>/resolv.conf (what `ip netns exec`
        // shows a namespace): a writable /etc, in the guest's memory.
        .args(["--overlay-rwdir", "/etc"])
        .arg("--exec")
        .arg(plan.script);
    vng
}

/// Boots and waits; the VM is gone when this returns.
pub fn boot(plan: &BootPlan) -> Result<Ended> {
    let mut vng = command(plan);
    let console = File::create(plan.console)
        .with_context(|| format!("cannot create {}", plan.console.display()))?;
    vng.stdin(Stdio::null())
        .stdout(console.try_clone()?)
        .stderr(console)
        .process_group(0);
    eprintln!("==> {}", crate::cmd::display(&vng));
    let child = vng
        .spawn()
        .with_context(|| format!("could not start {}", plan.vng.display()))?;
    let mut guard = Group { child: Some(child) };
    let start = Instant::now();
    let booted = plan.rwdir.join("booted");
    loop {
        if let Some(child) = guard.child.as_mut() {
            if child.try_wait()?.is_some() {
                let pgid = child.id() as libc::pid_t;
                guard.child = None;
                // QEMU exits before vng does; anything of the group still
                // there keeps the id from being reused, so this kills only
                // what is ours.
                // SAFETY: plain syscall.
                unsafe {
                    libc::kill(-pgid, libc::SIGKILL);
                }
                return Ok(Ended::Exited);
            }
        }
        let elapsed = start.elapsed();
        let ended = if let Some(signal) = stopped_by() {
            Some(Ended::Stopped(signal))
        } else if !booted.exists() && elapsed > plan.boot_timeout {
            Some(Ended::NoBoot(plan.boot_timeout))
        } else if elapsed > plan.timeout {
            Some(Ended::TimedOut(plan.timeout))
        } else {
            None
        };
        if let Some(ended) = ended {
            guard.kill();
            return Ok(ended);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// vng's process group, killed on drop unless it exited.
struct Group {
    child: Option<Child>,
}

impl Group {
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pgid = child.id() as libc::pid_t;
            // SAFETY: plain syscall; the group is ours (vng leads it and
            // has not been reaped, so the id cannot have been reused).
            unsafe {
                libc::kill(-pgid, libc::SIGKILL);
            }
            let _ = child.wait();
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The kernel image in an unpacked kernel package.
pub fn find_vmlinuz(root: &Path) -> Result<PathBuf> {
    let boot = root.join("boot");
    std::fs::read_dir(&boot)
        .with_context(|| format!("cannot read {}", boot.display()))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .with_context(|| format!("no vmlinuz-* in {}", boot.display()))
}

/// The last `n` lines of a file, for error messages.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
