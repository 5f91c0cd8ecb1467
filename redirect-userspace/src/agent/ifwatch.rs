//! The agent follows the interfaces of the captured pods that name `-c` or
//! `-k` interfaces: istio-iptables' `-i <name>` rules match whatever
//! interface has the name when a packet passes, and KubeVirt creates a
//! VM's interfaces (and gives them addresses) after the pod's network is
//! set up, so names are resolved again whenever the pod's interfaces,
//! addresses or routes change (`Installation::refresh_interfaces`).
//!
//! One thread; per watched pod, a netlink socket made inside its netns,
//! subscribed to link, address and route changes. Every few seconds the
//! set of watched pods is brought up to date: new pods with names are
//! watched (and refreshed once, for what changed while nobody watched),
//! released pods are dropped, and so is a pod whose netns nothing but the
//! watch holds any more (the socket would keep it alive).

use std::{
    collections::BTreeMap,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::PathBuf,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use redirect_common::IFACE_NAME;

use super::{find_netns, records, Agent};
use crate::{maps::Maps, sys::Netns};

/// How often the set of watched pods is brought up to date.
const RESCAN: Duration = Duration::from_secs(3);
/// Changes come in bursts (a link, then its addresses and routes): wait
/// this long after the first before reading the pod again.
const SETTLE: Duration = Duration::from_millis(100);

struct Watched {
    netns: Netns,
    path: PathBuf,
    inode: u64,
    sock: OwnedFd,
}

/// Run until `stop`.
pub fn run(agent: &Agent, stop: &AtomicBool) {
    let mut watched: BTreeMap<u64, Watched> = BTreeMap::new();
    let mut next_scan = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        if Instant::now() >= next_scan {
            rescan(agent, &mut watched);
            next_scan = Instant::now() + RESCAN;
        }
        let ready = wait(
            &watched,
            next_scan.saturating_duration_since(Instant::now()),
        );
        if ready.is_empty() {
            continue;
        }
        std::thread::sleep(SETTLE);
        for cookie in ready {
            if let Some(w) = watched.get(&cookie) {
                drain(&w.sock);
                refresh(agent, cookie, w);
            }
        }
    }
}

/// The pods to watch: captured, with `-c`/`-k` name records.
fn wanted(agent: &Agent) -> Vec<(u64, u64, Option<PathBuf>)> {
    let Ok(maps) = Maps::open(&agent.pins) else {
        return Vec::new();
    };
    let Some(ifaces) = maps.ifaces.as_ref() else {
        return Vec::new();
    };
    let mut cookies: Vec<u64> = ifaces
        .keys()
        .filter_map(|k| k.ok())
        .filter(|k| k.ifindex & IFACE_NAME != 0)
        .map(|k| k.netns)
        .collect();
    cookies.sort_unstable();
    cookies.dedup();
    let inner = agent.inner();
    cookies
        .into_iter()
        .filter_map(|c| {
            let cfg = maps.pod(c)?;
            let hint = inner.records.get(c).and_then(|r| records::netns_path(&r));
            Some((c, cfg.netns_inode as u64, hint))
        })
        .collect()
}

fn rescan(agent: &Agent, watched: &mut BTreeMap<u64, Watched>) {
    let want = wanted(agent);
    // Released, or held by nothing but our socket: let it go.
    watched.retain(|cookie, w| {
        want.iter().any(|(c, _, _)| c == cookie)
            && find_netns(*cookie, w.inode, Some(&w.path)).is_some()
    });
    for (cookie, inode, hint) in want {
        if watched.contains_key(&cookie) {
            continue;
        }
        let Some(path) = find_netns(cookie, inode, hint.as_deref()) else {
            continue;
        };
        let w = Netns::open(&path).and_then(|netns| {
            let sock = crate::podns::on_this_thread(&netns, subscribe)?;
            Ok(Watched {
                netns,
                path,
                inode,
                sock,
            })
        });
        match w {
            Ok(w) => {
                tracing::debug!(cookie, netns = %w.path.display(), "following the pod's interfaces");
                // What changed while nobody watched.
                refresh(agent, cookie, &w);
                watched.insert(cookie, w);
            }
            Err(e) => {
                tracing::warn!(cookie, error = %format!("{e:#}"), "cannot follow the pod's interfaces")
            }
        }
    }
}

fn refresh(agent: &Agent, cookie: u64, w: &Watched) {
    let r = agent.inner().inst.refresh_interfaces(&w.netns, cookie);
    match r {
        Ok(Some(what)) => {
            tracing::info!(cookie, netns = %w.path.display(), %what, "pod's interfaces changed: applied")
        }
        Ok(None) => {}
        Err(e) => {
            tracing::warn!(cookie, netns = %w.path.display(), error = %format!("{e:#}"), "pod's interfaces changed, could not apply")
        }
    }
}

/// A netlink socket of the calling thread's netns, told about link,
/// address and route changes.
fn subscribe() -> io::Result<OwnedFd> {
    const RTMGRP_LINK: u32 = 0x1;
    const RTMGRP_IPV4_IFADDR: u32 = 0x10;
    const RTMGRP_IPV4_ROUTE: u32 = 0x40;
    const RTMGRP_IPV6_IFADDR: u32 = 0x100;
    const RTMGRP_IPV6_ROUTE: u32 = 0x400;
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    sa.nl_family = libc::AF_NETLINK as u16;
    sa.nl_groups = RTMGRP_LINK
        | RTMGRP_IPV4_IFADDR
        | RTMGRP_IPV4_ROUTE
        | RTMGRP_IPV6_IFADDR
        | RTMGRP_IPV6_ROUTE;
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sa as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// The pods whose socket has news, waiting at most `timeout`.
fn wait(watched: &BTreeMap<u64, Watched>, timeout: Duration) -> Vec<u64> {
    let timeout_ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    let mut fds: Vec<libc::pollfd> = watched
        .values()
        .map(|w| libc::pollfd {
            fd: w.sock.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    if fds.is_empty() {
        std::thread::sleep(timeout);
        return Vec::new();
    }
    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
    if n <= 0 {
        return Vec::new();
    }
    watched
        .keys()
        .zip(&fds)
        .filter(|(_, p)| p.revents != 0)
        .map(|(c, _)| *c)
        .collect()
}

/// Read everything queued (the messages only say that something changed;
/// the pod is read again as a whole).
fn drain(sock: &OwnedFd) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n <= 0 {
            break;
        }
    }
}
