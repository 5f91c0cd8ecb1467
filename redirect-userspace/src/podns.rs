//! What capturing a pod needs to learn and set inside its network
//! namespace, done in one visit (one thread that enters the netns) and
//! without running a program: its cookie, its addresses, whether its IPv6
//! is captured (`ipv6::decide`, from the addresses as found), `::6/128` on
//! `lo` when it is (as istio-iptables does, over rtnetlink rather than
//! `ip`). And, once the pod's config is in, whether any TCP socket listens
//! on the inbound capture port (only then can there be a proxy listener to
//! register, and only then is `/proc` searched for it). Its interfaces,
//! addresses per interface and routes are read in the same visit
//! (`podnet`, which uses the netlink helpers here).

use std::{
    io,
    net::{IpAddr, Ipv6Addr},
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
};

use crate::{error::Result, sys::Netns};

/// The IPv6 source of the proxy's inbound passthrough (istio-iptables adds
/// it to `lo`).
pub const PASSTHROUGH_V6: Ipv6Addr = Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6);

/// What one visit found.
#[derive(Debug, Clone)]
pub struct PodNs {
    pub cookie: u64,
    /// Non-loopback addresses, in the kernel's order (after `::6` was
    /// added, so it is listed).
    pub addresses: Vec<IpAddr>,
    /// Is the pod's IPv6 captured (decided before `::6` was added)?
    pub ipv6: crate::ipv6::Ipv6Capture,
    /// Interfaces, their addresses, main routes.
    pub net: crate::podnet::PodNet,
}

/// Visit `netns`: see the module docs. `dual_stack`: `--dual-stack`.
pub fn visit(netns: &Netns, dual_stack: bool) -> Result<PodNs> {
    let (cookie, addresses, ipv6, net) = on_this_thread(netns, || {
        let cookie = crate::netns_cookie::from_socket_option()?;
        let mut addresses = non_loopback()?;
        let ipv6 = crate::ipv6::decide(&addresses, dual_stack);
        if ipv6.captured && !addresses.contains(&IpAddr::V6(PASSTHROUGH_V6)) {
            add_lo_address_v6(PASSTHROUGH_V6)?;
            addresses = non_loopback()?;
        }
        let net = crate::podnet::read()?;
        Ok((cookie, addresses, ipv6, net))
    })?;
    let cookie = match cookie {
        Some(c) => c,
        None => crate::netns_cookie::reported(netns.file.as_fd())?,
    };
    Ok(PodNs {
        cookie,
        addresses,
        ipv6,
        net,
    })
}

/// The interfaces, addresses and routes of `netns` (as `visit`).
pub fn net(netns: &Netns) -> Result<crate::podnet::PodNet> {
    on_this_thread(netns, crate::podnet::read)
}

/// The netns cookie of `netns` (as `Netns::cookie`, without a thread).
pub fn cookie(netns: &Netns) -> Result<u64> {
    match on_this_thread(netns, crate::netns_cookie::from_socket_option)? {
        Some(c) => Ok(c),
        None => crate::netns_cookie::reported(netns.file.as_fd()),
    }
}

/// Does a TCP socket of `netns` listen on `port`? Asked after the pod's
/// config is in: from then on sockops registers any new listener, so a
/// proxy is either seen here or registered by the kernel.
pub fn listening(netns: &Netns, port: u16) -> Result<bool> {
    on_this_thread(netns, || tcp_listening(port))
}

/// Run `f` with the calling thread inside `netns`, then put the thread
/// back in its own netns (also when `f` panics). Unlike `Netns::run` no
/// thread is started: on a busy node a new thread waits for a CPU (up to
/// the scheduler's slice, ~3 ms), and a capture did that twice.
pub(crate) fn on_this_thread<R>(netns: &Netns, f: impl FnOnce() -> io::Result<R>) -> Result<R> {
    let err = |e| crate::error::Error::io("working inside network namespace", &netns.path, e);
    let home = std::fs::File::open("/proc/thread-self/ns/net").map_err(err)?;
    if unsafe { libc::setns(netns.file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(err(io::Error::last_os_error()));
    }
    struct Back(std::fs::File);
    impl Drop for Back {
        fn drop(&mut self) {
            if unsafe { libc::setns(self.0.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                // A thread left in a pod's netns must not go on.
                eprintln!(
                    "redirect: could not return to the agent's network namespace: {}",
                    io::Error::last_os_error()
                );
                std::process::abort();
            }
        }
    }
    let back = Back(home);
    let r = f();
    drop(back);
    r.map_err(err)
}

fn non_loopback() -> io::Result<Vec<IpAddr>> {
    Ok(crate::sys::local_addresses()?
        .into_iter()
        .filter(|a| !a.is_loopback())
        .collect())
}

/// Does a TCP socket of the calling thread's netns listen on `port`? Asked
/// with a sock_diag dump of LISTEN sockets only, which walks the listening
/// hash alone; `/proc/net/tcp` would walk the whole established hash
/// (~4 ms on a 24 GiB machine, whatever the netns holds).
fn tcp_listening(port: u16) -> io::Result<bool> {
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        if diag_listeners(family)?.contains(&port) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Local ports of the TCP sockets in LISTEN of one family, in the calling
/// thread's netns (NETLINK_SOCK_DIAG, inet_diag_req_v2 dump).
fn diag_listeners(family: u8) -> io::Result<Vec<u16>> {
    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const NLM_F_DUMP: u16 = 0x300;
    const TCP_LISTEN: u32 = 10;
    let mut msg = nl_header(SOCK_DIAG_BY_FAMILY, NLM_F_DUMP);
    // struct inet_diag_req_v2 { family, protocol, ext, pad, states, sockid (48 bytes) }
    msg.extend_from_slice(&[family, libc::IPPROTO_TCP as u8, 0, 0]);
    msg.extend_from_slice(&(1u32 << TCP_LISTEN).to_ne_bytes());
    msg.extend_from_slice(&[0u8; 48]);
    let mut ports = Vec::new();
    nl_exchange(libc::NETLINK_SOCK_DIAG, msg, |ty, body| {
        match ty {
            NLMSG_DONE => return Some(Ok(())),
            NLMSG_ERROR => return Some(nl_error(body)),
            // struct inet_diag_msg { family, state, timer, retrans, id { sport (be16) ... } }
            _ if body.len() >= 6 => ports.push(u16::from_be_bytes([body[4], body[5]])),
            _ => {}
        }
        None
    })?;
    Ok(ports)
}

/// The socket cookies of every TCP socket of `netns` (both families, any
/// state): what a released pod's connections still hold records under.
pub fn tcp_socket_cookies(netns: &Netns) -> Result<Vec<u64>> {
    on_this_thread(netns, || {
        let mut out = diag_cookies(libc::AF_INET as u8)?;
        out.extend(diag_cookies(libc::AF_INET6 as u8)?);
        Ok(out)
    })
}

/// Cookies of the TCP sockets of one family, in the calling thread's
/// netns (NETLINK_SOCK_DIAG, inet_diag_req_v2 dump of every state).
fn diag_cookies(family: u8) -> io::Result<Vec<u64>> {
    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const NLM_F_DUMP: u16 = 0x300;
    let mut msg = nl_header(SOCK_DIAG_BY_FAMILY, NLM_F_DUMP);
    msg.extend_from_slice(&[family, libc::IPPROTO_TCP as u8, 0, 0]);
    msg.extend_from_slice(&u32::MAX.to_ne_bytes());
    msg.extend_from_slice(&[0u8; 48]);
    let mut cookies = Vec::new();
    nl_exchange(libc::NETLINK_SOCK_DIAG, msg, |ty, body| {
        match ty {
            NLMSG_DONE => return Some(Ok(())),
            NLMSG_ERROR => return Some(nl_error(body)),
            // struct inet_diag_msg { family, state, timer, retrans,
            //   id { sport, dport, src[4], dst[4], if, cookie[2] @44 } }
            _ if body.len() >= 52 => {
                let lo = u32::from_ne_bytes(body[44..48].try_into().unwrap()) as u64;
                let hi = u32::from_ne_bytes(body[48..52].try_into().unwrap()) as u64;
                cookies.push(lo | (hi << 32));
            }
            _ => {}
        }
        None
    })?;
    Ok(cookies)
}

/// `ip -6 addr replace <addr>/128 dev lo nodad` in the calling thread's
/// netns, as one RTM_NEWADDR request over rtnetlink.
fn add_lo_address_v6(addr: Ipv6Addr) -> io::Result<()> {
    const RTM_NEWADDR: u16 = 20;
    const NLM_F_ACK: u16 = 0x4;
    const NLM_F_REPLACE: u16 = 0x100;
    const NLM_F_CREATE: u16 = 0x400;
    const IFA_ADDRESS: u16 = 1;
    const IFA_LOCAL: u16 = 2;
    const IFA_FLAGS: u16 = 8;
    const IFA_F_NODAD: u32 = 0x02;

    let lo = unsafe { libc::if_nametoindex(c"lo".as_ptr()) };
    if lo == 0 {
        return Err(io::Error::other(format!(
            "no lo interface: {}",
            io::Error::last_os_error()
        )));
    }
    let mut msg = nl_header(RTM_NEWADDR, NLM_F_ACK | NLM_F_REPLACE | NLM_F_CREATE);
    // struct ifaddrmsg { family, prefixlen, flags, scope, index }
    msg.extend_from_slice(&[libc::AF_INET6 as u8, 128, IFA_F_NODAD as u8, 0]);
    msg.extend_from_slice(&lo.to_ne_bytes());
    for (ty, data) in [
        (IFA_LOCAL, &addr.octets()[..]),
        (IFA_ADDRESS, &addr.octets()[..]),
        (IFA_FLAGS, &IFA_F_NODAD.to_ne_bytes()[..]),
    ] {
        msg.extend_from_slice(&((4 + data.len()) as u16).to_ne_bytes());
        msg.extend_from_slice(&ty.to_ne_bytes());
        msg.extend_from_slice(data);
        while !msg.len().is_multiple_of(4) {
            msg.push(0);
        }
    }
    nl_exchange(libc::NETLINK_ROUTE, msg, |ty, body| {
        (ty == NLMSG_ERROR).then(|| nl_error(body))
    })
    .map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("adding {addr}/128 to lo (RTM_NEWADDR): {e}"),
        )
    })
}

pub(crate) const NLMSG_ERROR: u16 = 2;
pub(crate) const NLMSG_DONE: u16 = 3;

/// A netlink request header (its length is set by `nl_exchange`).
pub(crate) fn nl_header(ty: u16, flags: u16) -> Vec<u8> {
    const NLM_F_REQUEST: u16 = 0x1;
    let mut msg = Vec::with_capacity(80);
    msg.extend_from_slice(&0u32.to_ne_bytes()); // length
    msg.extend_from_slice(&ty.to_ne_bytes());
    msg.extend_from_slice(&(NLM_F_REQUEST | flags).to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes()); // seq
    msg.extend_from_slice(&0u32.to_ne_bytes()); // pid: the kernel
    msg
}

/// The errno of an NLMSG_ERROR body (0: an ACK).
pub(crate) fn nl_error(body: &[u8]) -> io::Result<()> {
    match body
        .get(..4)
        .map(|b| i32::from_ne_bytes(b.try_into().unwrap()))
    {
        Some(0) => Ok(()),
        Some(err) => Err(io::Error::from_raw_os_error(-err)),
        None => Err(io::Error::other("truncated netlink error")),
    }
}

/// Send one request on a new netlink socket of `protocol`, then hand each
/// reply message (type, body after the header) to `on_msg` until it
/// returns a result.
pub(crate) fn nl_exchange(
    protocol: libc::c_int,
    mut msg: Vec<u8>,
    mut on_msg: impl FnMut(u16, &[u8]) -> Option<io::Result<()>>,
) -> io::Result<()> {
    let len = msg.len() as u32;
    msg[..4].copy_from_slice(&len.to_ne_bytes());
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            protocol,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    sa.nl_family = libc::AF_NETLINK as u16;
    let sent = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            msg.as_ptr().cast(),
            msg.len(),
            0,
            (&sa as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let n = n as usize;
        let mut off = 0;
        while off + 16 <= n {
            let mlen = u32::from_ne_bytes(buf[off..off + 4].try_into().unwrap()) as usize;
            let ty = u16::from_ne_bytes(buf[off + 4..off + 6].try_into().unwrap());
            if mlen < 16 || off + mlen > n {
                return Err(io::Error::other("malformed netlink reply"));
            }
            if let Some(r) = on_msg(ty, &buf[off + 16..off + mlen]) {
                return r;
            }
            off += (mlen + 3) & !3;
        }
    }
}
