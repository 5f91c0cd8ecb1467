//! `redirect trace`: the reading side of the kernel programs' trace events
//! (redirect-ebpf's trace.rs, redirect-common's `trace`).
//!
//! One reader at a time per install consumes the ring buffer: a
//! [`Tracer`]. It holds an exclusive `flock` on the install's pin
//! directory for as long as it lives, so a second reader is refused at
//! once, naming the first; the lock goes with the process however it
//! ends. The kernel programs only emit for the pods of the switch
//! (REDIRECT_TRACE, REDIRECT_TRACE_PODS) and only until the end of the
//! tracer's lease, renewed every second: a reader killed with SIGKILL
//! stops costing anything [`LEASE`] later, and the next reader, `redirect
//! attach` or agent start clears what it left ([`clear_stale`]). The agent
//! is one such reader and fans the events out to any number of clients of
//! its socket (`trace` op).

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::File,
    io,
    net::{IpAddr, SocketAddr},
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    time::{Duration, Instant},
};

use aya::maps::{Array, HashMap, Map, MapData, RingBuf};
use redirect_common::{
    trace::{trace_event_flags, trace_flags, trace_kind},
    CounterKey, Reason, TraceCtl, TraceEvent, AF_INET, IPPROTO_TCP, MAP_TRACE, MAP_TRACE_EVENTS,
    MAP_TRACE_PODS,
};
use serde::{Deserialize, Serialize};

use crate::{
    error::{Error, Result},
    maps::Maps,
    pins::Pins,
};

/// How long the kernel programs keep emitting for a reader that stopped
/// renewing (killed): its lease. Renewed every [`RENEW`].
pub const LEASE: Duration = Duration::from_secs(5);
pub const RENEW: Duration = Duration::from_secs(1);

/// `BPF_MAP_TYPE_RINGBUF` (uapi/linux/bpf.h).
const BPF_MAP_TYPE_RINGBUF: u32 = 27;

fn sys_bpf(cmd: libc::c_long, attr: &mut [u8; 128]) -> io::Result<i32> {
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r as i32)
}

/// Can this kernel create a map of type `map_type` (key and value sizes
/// 0, `max_entries` as given)? Ring buffers are Linux 5.8+.
pub fn map_type_supported(map_type: u32, max_entries: u32) -> io::Result<()> {
    let mut attr = [0u8; 128];
    // { u32 map_type; u32 key_size; u32 value_size; u32 max_entries; ... }
    attr[0..4].copy_from_slice(&map_type.to_ne_bytes());
    attr[12..16].copy_from_slice(&max_entries.to_ne_bytes());
    let fd = sys_bpf(0, &mut attr)?;
    drop(unsafe { OwnedFd::from_raw_fd(fd) });
    Ok(())
}

/// The kernel must have BPF ring buffers for `trace`: a clear error when it
/// has none (5.7 and older).
pub fn check_ring_buffers() -> Result<()> {
    map_type_supported(BPF_MAP_TYPE_RINGBUF, 4096).map_err(|e| ring_buffer_error(&e))
}

fn ring_buffer_error(e: &io::Error) -> Error {
    Error::Kernel(format!(
        "this kernel cannot create a BPF ring buffer (BPF_MAP_TYPE_RINGBUF, Linux 5.8 and later): {e}. \
         `redirect trace` streams its events through one; `redirect explain` and `redirect stats` work without it"
    ))
}

/// Which program types may ask for the current task
/// (`bpf_get_current_pid_tgid`, `bpf_get_current_comm`): bit 1 the
/// cgroup/connect family (Linux 5.7+), bit 2 cgroup/getsockopt (6.1+).
/// The loader sets the programs' `REDIRECT_TRACE_TASK` from this: events
/// carry the pid and command where the kernel allows it, and the programs
/// load everywhere.
pub fn task_helpers() -> u8 {
    const PID_TGID: i32 = 14;
    // BPF_PROG_TYPE_CGROUP_SOCK_ADDR / BPF_CGROUP_INET4_CONNECT, and
    // BPF_PROG_TYPE_CGROUP_SOCKOPT / BPF_CGROUP_GETSOCKOPT.
    u8::from(probe_helper(18, 10, PID_TGID)) | (u8::from(probe_helper(25, 21, PID_TGID)) << 1)
}

/// Load `call helper; r0 = 1; exit` as `prog_type` / `attach_type`.
fn probe_helper(prog_type: u32, attach_type: u32, helper: i32) -> bool {
    // struct bpf_insn: code, dst:4|src:4, off, imm.
    let insn = |code: u8, regs: u8, off: i16, imm: i32| -> [u8; 8] {
        let mut b = [0u8; 8];
        b[0] = code;
        b[1] = regs;
        b[2..4].copy_from_slice(&off.to_ne_bytes());
        b[4..8].copy_from_slice(&imm.to_ne_bytes());
        b
    };
    let prog: Vec<[u8; 8]> = vec![
        insn(0x85, 0, 0, helper), // call helper
        insn(0xb7, 0, 0, 1),      // r0 = 1
        insn(0x95, 0, 0, 0),      // exit
    ];
    let license = b"GPL\0";
    let mut attr = [0u8; 128];
    // bpf_attr for BPF_PROG_LOAD: prog_type @0, insn_cnt @4, insns @8,
    // license @16, ..., expected_attach_type @68.
    attr[0..4].copy_from_slice(&prog_type.to_ne_bytes());
    attr[4..8].copy_from_slice(&(prog.len() as u32).to_ne_bytes());
    attr[8..16].copy_from_slice(&(prog.as_ptr() as u64).to_ne_bytes());
    attr[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
    attr[68..72].copy_from_slice(&attach_type.to_ne_bytes());
    match sys_bpf(5, &mut attr) {
        Ok(fd) => {
            drop(unsafe { OwnedFd::from_raw_fd(fd) });
            true
        }
        Err(_) => false,
    }
}

/// Which pods a reader wants: every one, or these netns cookies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Selection {
    All,
    Pods(BTreeSet<u64>),
}

impl Selection {
    pub fn wants(&self, cookie: u64) -> bool {
        match self {
            Selection::All => true,
            Selection::Pods(p) => p.contains(&cookie),
        }
    }

    /// The union of several readers' selections.
    pub fn union<'a>(all: impl IntoIterator<Item = &'a Selection>) -> Selection {
        let mut pods = BTreeSet::new();
        for s in all {
            match s {
                Selection::All => return Selection::All,
                Selection::Pods(p) => pods.extend(p),
            }
        }
        Selection::Pods(pods)
    }
}

/// The install's pin directory, locked for a trace reader (None: another
/// process holds it).
fn lock_pin_dir(pins: &Pins) -> Result<Option<File>> {
    let dir = File::open(&pins.root).map_err(|e| Error::io("opening", &pins.root, e))?;
    let r = unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r == 0 {
        return Ok(Some(dir));
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        return Ok(None);
    }
    Err(Error::io("locking for a trace reader", &pins.root, e))
}

fn open_map(pins: &Pins, name: &str) -> Result<Map> {
    let path = pins.map(name);
    if !path.exists() {
        return Err(Error::Trace(format!(
            "the install at {} has no {name} map: it was made by a version without `redirect trace`. \
             The next `redirect attach` adds the trace maps, and the agent (`redirect daemon`) also switches the running programs to this version when it starts",
            pins.root.display()
        )));
    }
    let data = MapData::from_pin(&path)
        .map_err(|e| Error::bpf(format!("opening pinned map {}", path.display()), e))?;
    Map::from_map_data(data)
        .map_err(|e| Error::bpf(format!("reading pinned map {}", path.display()), e))
}

struct Switch {
    ctl: Array<MapData, TraceCtl>,
    pods: HashMap<MapData, u64, u8>,
}

impl Switch {
    fn open(pins: &Pins) -> Result<Switch> {
        let bad = |name: &str, e: aya::maps::MapError| {
            Error::bpf(
                format!("pinned map {name} has an unexpected type (an install from another version? run `redirect uninstall`)"),
                e,
            )
        };
        Ok(Switch {
            ctl: Array::try_from(open_map(pins, MAP_TRACE)?).map_err(|e| bad(MAP_TRACE, e))?,
            pods: HashMap::try_from(open_map(pins, MAP_TRACE_PODS)?)
                .map_err(|e| bad(MAP_TRACE_PODS, e))?,
        })
    }

    fn read(&self) -> TraceCtl {
        self.ctl.get(&0, 0).unwrap_or_default()
    }

    /// Switch tracing off (the programs read only `until_ns`, so it goes
    /// first) and forget the pods.
    fn off(&mut self) {
        let _ = self.ctl.set(0, TraceCtl::default(), 0);
        let keys: Vec<u64> = self.pods.keys().filter_map(|k| k.ok()).collect();
        for k in keys {
            let _ = self.pods.remove(&k);
        }
    }

    fn is_clear(&self) -> bool {
        self.read() == TraceCtl::default() && self.pods.keys().next().is_none()
    }
}

/// Monotonic clock now, in ns (the clock of `bpf_ktime_get_ns`).
fn monotonic_ns() -> u64 {
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Switch off what a reader that is gone left behind (killed before it
/// could): run by `redirect attach`, agent start and every new reader.
/// Nothing happens while a reader holds the lock. Returns true when
/// something was cleared.
pub fn clear_stale(pins: &Pins) -> bool {
    if !pins.map(MAP_TRACE).exists() {
        return false;
    }
    let Ok(Some(_lock)) = lock_pin_dir(pins) else {
        return false;
    };
    let Ok(mut sw) = Switch::open(pins) else {
        return false;
    };
    if sw.is_clear() {
        return false;
    }
    let left = sw.read();
    sw.off();
    tracing::info!(
        owner_pid = left.owner_pid,
        "trace switch left on by a reader that is gone: switched off"
    );
    true
}

/// The reader of an install's trace events: holds the lock, the switch
/// and the lease; switches tracing off when dropped.
pub struct Tracer {
    _lock: File,
    switch: Switch,
    ring: RingBuf<MapData>,
    selection: Selection,
    renewed: Option<Instant>,
}

impl Tracer {
    /// Become the install's trace reader for `selection`. Refused, naming
    /// the reader, while another process reads.
    pub fn start(pins: &Pins, selection: Selection) -> Result<Tracer> {
        check_ring_buffers()?;
        if !pins.is_installed() {
            return Err(Error::NotInstalled(pins.root.clone()));
        }
        let mut switch = Switch::open(pins)?;
        let Some(lock) = lock_pin_dir(pins)? else {
            let owner = switch.read().owner_pid;
            let who = if owner != 0 {
                let comm = std::fs::read_to_string(format!("/proc/{owner}/comm"))
                    .map(|c| c.trim().to_string())
                    .unwrap_or_default();
                format!("pid {owner} ({comm})")
            } else {
                "another process".into()
            };
            return Err(Error::Trace(format!(
                "{who} is already reading the trace events of the install at {}: one reader at a time per install. \
                 Through the node agent (`redirect daemon`) any number of `redirect trace` can run at once",
                pins.root.display()
            )));
        };
        // Whatever a gone reader left behind.
        switch.off();
        let ring = RingBuf::try_from(open_map(pins, MAP_TRACE_EVENTS)?).map_err(|e| {
            Error::bpf(
                format!("pinned map {MAP_TRACE_EVENTS} is not a ring buffer"),
                e,
            )
        })?;
        let mut t = Tracer {
            _lock: lock,
            switch,
            ring,
            selection: Selection::Pods(BTreeSet::new()),
            renewed: None,
        };
        // Old events of a gone reader are not ours.
        while t.ring.next().is_some() {}
        t.select(selection)?;
        Ok(t)
    }

    /// Trace these pods from now on.
    pub fn select(&mut self, selection: Selection) -> Result<()> {
        if let Selection::Pods(want) = &selection {
            let have: Vec<u64> = self.switch.pods.keys().filter_map(|k| k.ok()).collect();
            for k in &have {
                if !want.contains(k) {
                    let _ = self.switch.pods.remove(k);
                }
            }
            for k in want {
                if !have.contains(k) {
                    self.switch.pods.insert(k, 1, 0).map_err(|e| {
                        Error::bpf(
                            format!(
                                "adding netns cookie {k} to {MAP_TRACE_PODS} ({} pods at most)",
                                redirect_common::trace::MAX_TRACE_PODS
                            ),
                            e,
                        )
                    })?;
                }
            }
        }
        self.selection = selection;
        self.renewed = None;
        self.renew()
    }

    pub fn selection(&self) -> &Selection {
        &self.selection
    }

    /// Extend the lease (at most every [`RENEW`]).
    pub fn renew(&mut self) -> Result<()> {
        if self.renewed.is_some_and(|r| r.elapsed() < RENEW) {
            return Ok(());
        }
        let ctl = TraceCtl {
            until_ns: monotonic_ns() + LEASE.as_nanos() as u64,
            owner_pid: std::process::id(),
            flags: if self.selection == Selection::All {
                trace_flags::ALL_PODS
            } else {
                0
            },
        };
        self.switch
            .ctl
            .set(0, ctl, 0)
            .map_err(|e| Error::bpf(format!("switching tracing on ({MAP_TRACE})"), e))?;
        self.renewed = Some(Instant::now());
        Ok(())
    }

    /// Wait up to `timeout` for events; then every event waiting.
    pub fn next_events(&mut self, timeout: Duration) -> Result<Vec<TraceEvent>> {
        self.renew()?;
        let mut out = self.drain();
        if out.is_empty() {
            let mut pfd = libc::pollfd {
                fd: self.ring.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
            let r = unsafe { libc::poll(&mut pfd, 1, ms) };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(Error::io("waiting for trace events", MAP_TRACE_EVENTS, e));
                }
            }
            out = self.drain();
        }
        Ok(out)
    }

    fn drain(&mut self) -> Vec<TraceEvent> {
        let mut out = Vec::new();
        while let Some(item) = self.ring.next() {
            if item.len() >= std::mem::size_of::<TraceEvent>() {
                // SAFETY: TraceEvent is plain old data of this size; the
                // ring's items are 8-byte aligned, read unaligned anyway.
                out.push(unsafe { std::ptr::read_unaligned(item.as_ptr() as *const TraceEvent) });
            }
        }
        out
    }

    /// The ring buffer's fd (for a poll alongside other fds).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.ring.as_fd()
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        self.switch.off();
    }
}

/// The switch as the kernel programs read it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SwitchState {
    /// A lease is running (the programs emit until it ends).
    pub on: bool,
    /// What is left of it.
    pub lease_left_ms: u64,
    /// The reader that set it (0: none).
    pub owner_pid: u32,
    pub all_pods: bool,
    /// Traced pods (netns cookies) when not all.
    pub pods: Vec<u64>,
}

/// The install's trace switch; None when the install has no trace maps.
pub fn switch_state(pins: &Pins) -> Result<Option<SwitchState>> {
    if !pins.map(MAP_TRACE).exists() {
        return Ok(None);
    }
    let sw = Switch::open(pins)?;
    let ctl = sw.read();
    let now = monotonic_ns();
    let mut pods: Vec<u64> = sw.pods.keys().filter_map(|k| k.ok()).collect();
    pods.sort_unstable();
    Ok(Some(SwitchState {
        on: ctl.until_ns > now,
        lease_left_ms: ctl.until_ns.saturating_sub(now) / 1_000_000,
        owner_pid: ctl.owner_pid,
        all_pods: ctl.flags & trace_flags::ALL_PODS != 0,
        pods,
    }))
}

/// Cgroup programs of the install that were loaded by a version without
/// trace events (they do not use REDIRECT_TRACE_EVENTS): `<cgroup-id>/<program>`.
pub fn programs_without_trace(pins: &Pins) -> Vec<String> {
    let Ok(ring) = MapData::from_pin(pins.map(MAP_TRACE_EVENTS)) else {
        return Vec::new();
    };
    let Ok(ring_id) = ring.info().map(|i| i.id()) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for dir in crate::pins::read_dir(&pins.cgroups_dir()) {
        for name in ["redirect_connect4", "redirect_connect6"] {
            let link = dir.join(name);
            let Ok(fd) = crate::upgrade::obj_get(&link) else {
                continue;
            };
            let ids = crate::upgrade::link_prog_id(fd.as_fd())
                .and_then(crate::upgrade::prog_by_id)
                .and_then(|p| crate::upgrade::prog_map_ids(p.as_fd()));
            if let Ok(ids) = ids {
                if !ids.contains(&ring_id) {
                    let cg = dir
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    out.push(format!("{cg}/{name}"));
                }
            }
        }
    }
    out
}

// ------------------------------------------------------------- the lines

/// One trace line: an event, decoded and named, or a report of events
/// lost. What `redirect trace --json` prints and the agent's `trace` op
/// streams.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceLine {
    /// `decision`, `answer` or `lost`.
    pub event: String,
    /// Wall-clock time, RFC 3339 UTC with microseconds.
    pub time: String,
    /// The same in ns since the Unix epoch.
    pub time_unix_ns: u64,
    /// The hook: `connect`, `sendmsg`, `sk_lookup`, `getsockopt`,
    /// `getpeername`, `recvmsg`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub hook: String,
    pub netns_cookie: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comm: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub proto: String,
    /// Source `ip:port` (port 0 when not bound yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub src: Option<String>,
    /// Destination as dialed (decisions) or the asking socket's own end
    /// (getsockopt).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dst: Option<String>,
    /// Decisions: where the connection was sent (`127.0.0.1:15001`,
    /// `:15006` inbound); answers: the original destination shown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub chain: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub rule: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub target: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// The connect or datagram was refused (EPERM).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub refused: bool,
    /// `lost`: how many events, and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost: Option<u64>,
}

fn addr(family: u16, b: &[u8; 16]) -> IpAddr {
    if family == AF_INET {
        IpAddr::from([b[0], b[1], b[2], b[3]])
    } else {
        IpAddr::from(*b)
    }
}

fn sockaddr(family: u16, b: &[u8; 16], port: u16) -> String {
    SocketAddr::new(addr(family, b), port).to_string()
}

/// Unix time of a monotonic time (now's offset between the clocks).
fn wall_ns(mono_ns: u64) -> u64 {
    let now_wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    now_wall.saturating_sub(monotonic_ns().saturating_sub(mono_ns))
}

/// `2026-12-04T22:40:01.123456Z`.
pub fn rfc3339(unix_ns: u64) -> String {
    let secs = (unix_ns / 1_000_000_000) as i64;
    let micros = (unix_ns % 1_000_000_000) / 1000;
    let days = secs.div_euclid(86_400);
    let tod = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{micros:06}Z",
        tod / 3600,
        tod % 3600 / 60,
        tod % 60
    )
}

/// Names pods by netns cookie (the agent's records, else the netns path
/// of the pod's inode) and turns events into lines.
pub struct Decoder {
    pins: Pins,
    names: BTreeMap<u64, (Option<String>, Option<String>)>,
}

impl Decoder {
    pub fn new(pins: &Pins) -> Decoder {
        Decoder {
            pins: pins.clone(),
            names: BTreeMap::new(),
        }
    }

    /// (pod name, netns path) of a pod.
    pub fn name(&mut self, cookie: u64) -> (Option<String>, Option<String>) {
        if let Some(n) = self.names.get(&cookie) {
            return n.clone();
        }
        let rec = crate::agent::records::Records::open_existing(&self.pins)
            .ok()
            .flatten()
            .and_then(|r| r.get(cookie));
        let pod = rec
            .as_ref()
            .map(|r| r.pod.clone())
            .filter(|p| !p.is_empty());
        let mut netns = rec.map(|r| r.netns).filter(|n| !n.is_empty());
        if netns.is_none() {
            netns = Maps::open(&self.pins)
                .ok()
                .and_then(|m| m.pod(cookie))
                .and_then(|cfg| crate::sys::netns_name(cfg.netns_inode as u64));
        }
        let n = (pod, netns);
        self.names.insert(cookie, n.clone());
        n
    }

    pub fn line(&mut self, e: &TraceEvent) -> TraceLine {
        let reason = Reason::from_u32(e.reason);
        let unix = wall_ns(e.time_ns);
        let (pod, netns) = self.name(e.netns);
        let task = e.flags & trace_event_flags::TASK != 0;
        let (hook, answer) = match e.kind {
            trace_kind::CONNECT => ("connect", false),
            trace_kind::SENDMSG => ("sendmsg", false),
            trace_kind::SK_LOOKUP => ("sk_lookup", false),
            trace_kind::GETSOCKOPT => ("getsockopt", true),
            trace_kind::GETPEERNAME => ("getpeername", true),
            trace_kind::RECVMSG => ("recvmsg", true),
            _ => ("?", false),
        };
        let f = e.family;
        let v4_in_v6 = e.flags & trace_event_flags::V4_IN_V6 != 0;
        let (src, dst, to) = match e.kind {
            trace_kind::CONNECT | trace_kind::SENDMSG => (
                Some(sockaddr(f, &e.src, e.sport)),
                Some(sockaddr(f, &e.dst, e.dport)),
                (e.to_port != 0).then(|| {
                    if v4_in_v6 {
                        format!("[::ffff:127.0.0.1]:{}", e.to_port)
                    } else {
                        sockaddr(f, &e.to, e.to_port)
                    }
                }),
            ),
            trace_kind::SK_LOOKUP => (
                Some(sockaddr(f, &e.src, e.sport)),
                Some(sockaddr(f, &e.dst, e.dport)),
                (e.to_port != 0).then(|| format!(":{}", e.to_port)),
            ),
            trace_kind::GETSOCKOPT => (
                Some(sockaddr(f, &e.src, e.sport)),
                Some(sockaddr(f, &e.dst, e.dport)),
                (e.to_port != 0).then(|| sockaddr(f, &e.to, e.to_port)),
            ),
            _ => (None, None, Some(sockaddr(f, &e.to, e.to_port))),
        };
        let comm = {
            let end = e.comm.iter().position(|&c| c == 0).unwrap_or(16);
            String::from_utf8_lossy(&e.comm[..end]).into_owned()
        };
        let has_ids = task || matches!(e.kind, trace_kind::CONNECT | trace_kind::SENDMSG);
        TraceLine {
            event: if answer { "answer" } else { "decision" }.into(),
            time: rfc3339(unix),
            time_unix_ns: unix,
            hook: hook.into(),
            netns_cookie: e.netns,
            pod,
            netns,
            pid: task.then_some(e.pid),
            comm: task.then_some(comm),
            uid: has_ids.then_some(e.uid),
            gid: has_ids.then_some(e.gid),
            proto: if e.proto as u32 == IPPROTO_TCP {
                "tcp"
            } else {
                "udp"
            }
            .into(),
            src,
            dst,
            to,
            chain: reason
                .map(|r| r.chain().name().to_string())
                .unwrap_or_default(),
            rule: reason
                .map(|r| r.name().to_string())
                .unwrap_or_else(|| format!("reason {}", e.reason)),
            target: reason.map(|r| r.target().to_string()).unwrap_or_default(),
            description: reason.map(|r| r.describe().to_string()).unwrap_or_default(),
            refused: e.flags & trace_event_flags::REFUSED != 0,
            lost: None,
        }
    }

    /// A `lost` line: `n` events of the pod dropped, `why`.
    pub fn lost(&mut self, cookie: u64, n: u64, why: &str) -> TraceLine {
        let (pod, netns) = self.name(cookie);
        let unix = wall_ns(monotonic_ns());
        TraceLine {
            event: "lost".into(),
            time: rfc3339(unix),
            time_unix_ns: unix,
            netns_cookie: cookie,
            pod,
            netns,
            description: why.into(),
            lost: Some(n),
            ..TraceLine::default()
        }
    }
}

/// Events the kernel dropped (ring buffer full), per pod: the
/// `ERRORS/trace_events_lost` counters, and what is new since the last
/// look.
pub struct LostCounter {
    seen: BTreeMap<u64, u64>,
}

impl LostCounter {
    pub fn new(pins: &Pins, pods: &[u64]) -> LostCounter {
        let mut l = LostCounter {
            seen: BTreeMap::new(),
        };
        let _ = l.new_losses(pins, pods);
        l
    }

    /// (pod, events lost since the last call) for these pods.
    pub fn new_losses(&mut self, pins: &Pins, pods: &[u64]) -> Vec<(u64, u64)> {
        let Ok(maps) = Maps::open(pins) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for &cookie in pods {
            let key = CounterKey {
                netns: cookie,
                reason: Reason::ErrTraceLost as u32,
                _pad: 0,
            };
            let now: u64 = maps
                .counters
                .get(&key, 0)
                .map(|v| v.iter().map(|c| c.count).sum())
                .unwrap_or(0);
            let before = self.seen.insert(cookie, now);
            if let Some(b) = before {
                if now > b {
                    out.push((cookie, now - b));
                }
            }
        }
        out
    }
}

/// The pods a selection covers now (every captured pod for `All`).
pub fn pods_of(pins: &Pins, s: &Selection) -> Vec<u64> {
    match s {
        Selection::Pods(p) => p.iter().copied().collect(),
        Selection::All => Maps::open(pins)
            .map(|m| m.pods().into_iter().map(|(c, _)| c).collect())
            .unwrap_or_default(),
    }
}

// ------------------------------------------------------------- filters

/// `--rule` and `--dst`: which lines to show.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Filter {
    /// Rule names (`captured`), `CHAIN/rule`, chains (`OUTPUT`) or
    /// targets (`REDIRECT`), any of them; empty: all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<String>,
    /// `ADDR` or `ADDR:PORT`: the original destination (decisions: the
    /// destination dialed; answers: the destination shown).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dst: Option<String>,
}

/// A checked `--dst`.
enum DstMatch {
    Ip(IpAddr),
    Sock(SocketAddr),
}

impl Filter {
    /// Refuse what cannot match anything, naming the flag and the value.
    pub fn check(&self) -> Result<()> {
        for r in &self.rules {
            if !rule_known(r) {
                return Err(Error::InvalidFlag {
                    field: "--rule".into(),
                    value: r.clone(),
                    reason: format!(
                        "not a rule, chain or target of `redirect stats`: one of {}",
                        known_rules().join(", ")
                    ),
                });
            }
        }
        if let Some(d) = &self.dst {
            self.dst_match(d)?;
        }
        Ok(())
    }

    fn dst_match(&self, d: &str) -> Result<DstMatch> {
        let d = d.trim();
        if let Ok(s) = d.parse::<SocketAddr>() {
            return Ok(DstMatch::Sock(SocketAddr::new(
                s.ip().to_canonical(),
                s.port(),
            )));
        }
        if let Ok(ip) = d.trim_matches(|c| c == '[' || c == ']').parse::<IpAddr>() {
            return Ok(DstMatch::Ip(ip.to_canonical()));
        }
        Err(Error::InvalidFlag {
            field: "--dst".into(),
            value: d.into(),
            reason: "expected ADDR or ADDR:PORT, e.g. 10.0.0.1, 10.0.0.1:8080 or [fd00::1]:8080"
                .into(),
        })
    }

    pub fn matches(&self, l: &TraceLine) -> bool {
        if l.event == "lost" {
            return true;
        }
        if !self.rules.is_empty() {
            let full = format!("{}/{}", l.chain, l.rule);
            let hit = self.rules.iter().any(|r| {
                r.eq_ignore_ascii_case(&l.rule)
                    || r.eq_ignore_ascii_case(&full)
                    || r.eq_ignore_ascii_case(&l.chain)
                    || r.eq_ignore_ascii_case(&l.target)
            });
            if !hit {
                return false;
            }
        }
        if let Some(d) = &self.dst {
            let Ok(m) = self.dst_match(d) else {
                return false;
            };
            // Decisions: the destination dialed; answers: the one shown.
            let of = if l.event == "answer" { &l.to } else { &l.dst };
            let Some(got) = of.as_deref().and_then(|s| s.parse::<SocketAddr>().ok()) else {
                return false;
            };
            let got = SocketAddr::new(got.ip().to_canonical(), got.port());
            return match m {
                DstMatch::Ip(ip) => got.ip() == ip,
                DstMatch::Sock(s) => got == s,
            };
        }
        true
    }
}

fn known_rules() -> Vec<String> {
    let mut v: Vec<String> = Vec::new();
    for c in redirect_common::reason::Chain::ALL {
        v.push(c.name().to_string());
        for r in c.reasons() {
            v.push(format!("{}/{}", c.name(), r.name()));
        }
    }
    for t in ["REDIRECT", "RETURN", "REJECT", "ANSWER", "MISSING", "ERROR"] {
        v.push(t.into());
    }
    v
}

fn rule_known(r: &str) -> bool {
    known_rules().iter().any(|k| k.eq_ignore_ascii_case(r))
        || Reason::ALL.iter().any(|x| x.name().eq_ignore_ascii_case(r))
}

/// A line as text: time, pod, task, hook, 5-tuple, where it went, rule.
pub fn render(l: &TraceLine) -> String {
    let time = l.time.get(11..26).unwrap_or(&l.time);
    let pod = l
        .pod
        .clone()
        .or_else(|| l.netns.clone())
        .unwrap_or_else(|| format!("netns cookie {}", l.netns_cookie));
    if l.event == "lost" {
        return format!(
            "{time} {pod} {} events lost: {}",
            l.lost.unwrap_or(0),
            l.description
        );
    }
    let mut s = format!("{time} {pod}");
    if let (Some(pid), Some(comm)) = (l.pid, &l.comm) {
        s.push_str(&format!(" pid {pid} ({comm})"));
    }
    if let Some(uid) = l.uid {
        s.push_str(&format!(" uid {uid}"));
    }
    s.push_str(&format!(" {} {}", l.hook, l.proto));
    match l.hook.as_str() {
        "getsockopt" => {
            s.push_str(&format!(
                " {} -> {} SO_ORIGINAL_DST {}",
                l.src.as_deref().unwrap_or("?"),
                l.dst.as_deref().unwrap_or("?"),
                l.to.as_deref().unwrap_or("none")
            ));
        }
        "getpeername" | "recvmsg" => {
            s.push_str(&format!(" peer shown {}", l.to.as_deref().unwrap_or("?")));
        }
        _ => {
            // At connect the source port is not chosen yet (0), and an
            // unbound socket has no source address either.
            if let Some(src) = l.src.as_deref().and_then(|a| a.parse::<SocketAddr>().ok()) {
                if src.port() != 0 {
                    s.push_str(&format!(" {src}"));
                } else if !src.ip().is_unspecified() {
                    s.push_str(&format!(" {}", src.ip()));
                }
            }
            s.push_str(&format!(" -> {}", l.dst.as_deref().unwrap_or("?")));
            if let Some(to) = &l.to {
                s.push_str(&format!(" => {to}"));
            }
        }
    }
    let target = if l.refused {
        "REFUSED (EPERM)"
    } else {
        &l.target
    };
    s.push_str(&format!(" {target} {}/{}", l.chain, l.rule));
    s
}
