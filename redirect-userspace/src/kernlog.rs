//! The kernel programs' debug log (aya-log), per install.
//!
//! The programs log each decision (the pod's netns cookie and the reason
//! code) when the install's switch, the one-entry array `REDIRECT_LOG`, is
//! on; when it is off the programs do one array lookup and a branch. The
//! records go to aya-log's ring buffer `AYA_LOGS`, which every load of the
//! object pins as `<pin-dir>/maps/AYA_LOGS` ([`pin_ring`]): one buffer per
//! install, shared by every program and program version, and found again
//! by a restarted agent. [`Follower`] reads it and forwards each record to
//! `tracing` (target `redirect::kernel`, at the record's level), with the
//! reason's rule and target spelled out.
//!
//! One reader per install: two followers split the records between them.

use std::{
    os::fd::{AsFd, AsRawFd},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use aya::maps::{Array, Map, MapData};

use crate::{
    error::{Error, Result},
    pins::Pins,
};

/// The switch (a pinned one-entry `u32` array; non-zero: on).
pub const MAP_SWITCH: &str = "REDIRECT_LOG";
/// aya-log's ring buffer.
pub const MAP_RING: &str = "AYA_LOGS";

/// Pin aya-log's ring buffer with the install's maps (aya-log-ebpf
/// declares it unpinned: without this every load would make a buffer of
/// its own that nobody reads).
pub fn pin_ring<'a>(loader: &mut aya::EbpfLoader<'a>, pins: &Pins) {
    loader.map_pin_path(MAP_RING, pins.map(MAP_RING));
}

fn switch(pins: &Pins) -> Result<Array<MapData, u32>> {
    let path = pins.map(MAP_SWITCH);
    let data = MapData::from_pin(&path).map_err(|e| {
        Error::bpf(
            format!("opening the debug log switch {}", path.display()),
            e,
        )
    })?;
    Array::try_from(Map::Array(data))
        .map_err(|e| Error::bpf(format!("debug log switch {}", path.display()), e))
}

/// Turn the install's kernel debug log on or off.
pub fn set(pins: &Pins, on: bool) -> Result<()> {
    switch(pins)?
        .set(0, u32::from(on), 0)
        .map_err(|e| Error::bpf("setting the debug log switch", e))
}

/// Is the install's kernel debug log on?
pub fn is_on(pins: &Pins) -> Result<bool> {
    Ok(switch(pins)?
        .get(&0, 0)
        .map_err(|e| Error::bpf("reading the debug log switch", e))?
        != 0)
}

/// Forwards the install's kernel log records to `tracing` on a thread of
/// its own, until dropped.
pub struct Follower {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Follower {
    /// Open the install's ring buffer (the install must exist) and start
    /// forwarding.
    pub fn start(pins: &Pins) -> Result<Follower> {
        // aya-log takes its buffer out of a loaded object: load ours
        // against the install's pins, so the buffer is the pinned one.
        let mut loader = aya::EbpfLoader::new();
        loader.default_map_pin_directory(pins.maps_dir());
        pin_ring(&mut loader, pins);
        let mut ebpf = loader
            .load(crate::attach::OBJECT)
            .map_err(|e| Error::bpf("loading the kernel object for its log buffer", e))?;
        let mut logger = aya_log::EbpfLogger::init_with_logger(&mut ebpf, ToTracing)
            .map_err(|e| Error::bpf("opening the kernel log buffer", std::io::Error::other(e)))?;
        drop(ebpf);
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("kernel-log".into())
            .spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    let mut p = libc::pollfd {
                        fd: logger.as_fd().as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // Wakes for records, else every 200 ms to see `stop`.
                    if unsafe { libc::poll(&mut p, 1, 200) } > 0 {
                        logger.flush();
                    }
                }
                logger.flush();
            })
            .map_err(|e| Error::io("starting the kernel log thread", pins.maps_dir(), e))?;
        Ok(Follower {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// aya-log hands records to a `log::Log`: this one emits them as
/// `tracing` events.
struct ToTracing;

impl log::Log for ToTracing {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let msg = describe(&record.args().to_string());
        let module = record.module_path().unwrap_or("");
        match record.level() {
            log::Level::Error => tracing::error!(target: "redirect::kernel", module, "{msg}"),
            log::Level::Warn => tracing::warn!(target: "redirect::kernel", module, "{msg}"),
            log::Level::Info => tracing::info!(target: "redirect::kernel", module, "{msg}"),
            log::Level::Debug => tracing::debug!(target: "redirect::kernel", module, "{msg}"),
            log::Level::Trace => tracing::trace!(target: "redirect::kernel", module, "{msg}"),
        }
    }

    fn flush(&self) {}
}

/// A decision record with its reason named: `decision netns=N reason=R`
/// gets ` (CHAIN rule -> TARGET)` appended.
fn describe(msg: &str) -> String {
    let reason = msg
        .strip_prefix("decision ")
        .and_then(|r| {
            r.split_whitespace()
                .find_map(|kv| kv.strip_prefix("reason="))
        })
        .and_then(|r| r.parse::<u32>().ok())
        .and_then(redirect_common::Reason::from_u32);
    match reason {
        Some(r) => format!(
            "{msg} ({} {} -> {})",
            r.chain().name(),
            r.name(),
            r.target()
        ),
        None => msg.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn decisions_get_their_reason_named() {
        let code = redirect_common::Reason::OutCaptured as u32;
        let d = super::describe(&format!("decision netns=4096 reason={code}"));
        assert!(
            d.starts_with(&format!("decision netns=4096 reason={code} (OUTPUT ")),
            "{d}"
        );
        assert!(d.ends_with("-> REDIRECT)"), "{d}");
        assert_eq!(
            super::describe("decision netns=1 reason=9999"),
            "decision netns=1 reason=9999"
        );
        assert_eq!(super::describe("other"), "other");
    }
}
