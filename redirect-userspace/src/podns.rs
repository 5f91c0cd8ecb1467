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
    os::fd::{AsFd, AsRawFd},
};

use netlink_packet_core::{
    NetlinkDeserializable, NetlinkHeader, NetlinkMessage, NetlinkPayload, NetlinkSerializable,
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_REPLACE, NLM_F_REQUEST,
};
use netlink_packet_route::{
    address::{AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage},
    AddressFamily, RouteNetlinkMessage,
};
use netlink_packet_sock_diag::{
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags},
    SockDiagMessage,
};
use netlink_sys::{
    protocols::{NETLINK_ROUTE, NETLINK_SOCK_DIAG},
    Socket, SocketAddr,
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

/// The non-loopback addresses of the calling thread's netns, in the
/// kernel's order (IPv4 first), each once: an RTM_GETADDR dump, read as
/// getifaddrs(3) does (`IFA_LOCAL` when present, else `IFA_ADDRESS`).
fn non_loopback() -> io::Result<Vec<IpAddr>> {
    let mut out: Vec<IpAddr> = Vec::new();
    netlink(
        NETLINK_ROUTE,
        RouteNetlinkMessage::GetAddress(AddressMessage::default()),
        NLM_F_DUMP,
        |m| {
            let RouteNetlinkMessage::NewAddress(a) = m else {
                return;
            };
            let (mut local, mut address) = (None, None);
            for attr in &a.attributes {
                match attr {
                    AddressAttribute::Local(ip) => local = Some(*ip),
                    AddressAttribute::Address(ip) => address = Some(*ip),
                    _ => {}
                }
            }
            if let Some(ip) = local.or(address) {
                if !ip.is_loopback() && !out.contains(&ip) {
                    out.push(ip);
                }
            }
        },
    )
    .map_err(|e| io::Error::new(e.kind(), format!("listing addresses (RTM_GETADDR): {e}")))?;
    Ok(out)
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
/// thread's netns (NETLINK_SOCK_DIAG, an inet_diag_req_v2 dump).
fn diag_listeners(family: u8) -> io::Result<Vec<u16>> {
    let req = InetRequest {
        family,
        protocol: libc::IPPROTO_TCP as u8,
        extensions: ExtensionFlags::empty(),
        states: StateFlags::LISTEN,
        socket_id: if family == libc::AF_INET6 as u8 {
            SocketId::new_v6()
        } else {
            SocketId::new_v4()
        },
    };
    let mut ports = Vec::new();
    netlink(
        NETLINK_SOCK_DIAG,
        SockDiagMessage::InetRequest(req),
        NLM_F_DUMP,
        |m| {
            if let SockDiagMessage::InetResponse(r) = m {
                ports.push(r.header.socket_id.source_port);
            }
        },
    )?;
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
    let req = InetRequest {
        family,
        protocol: libc::IPPROTO_TCP as u8,
        extensions: ExtensionFlags::empty(),
        // Every state bit, also those the crate has no name for.
        states: StateFlags::from_bits_retain(u32::MAX),
        socket_id: if family == libc::AF_INET6 as u8 {
            SocketId::new_v6()
        } else {
            SocketId::new_v4()
        },
    };
    let mut cookies = Vec::new();
    netlink(
        NETLINK_SOCK_DIAG,
        SockDiagMessage::InetRequest(req),
        NLM_F_DUMP,
        |m| {
            if let SockDiagMessage::InetResponse(r) = m {
                // The kernel's `__u32 idiag_cookie[2]`, low word first.
                let c = r.header.socket_id.cookie;
                let lo = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]) as u64;
                let hi = u32::from_ne_bytes([c[4], c[5], c[6], c[7]]) as u64;
                cookies.push(lo | (hi << 32));
            }
        },
    )?;
    Ok(cookies)
}

/// `ip -6 addr replace <addr>/128 dev lo nodad` in the calling thread's
/// netns, as one RTM_NEWADDR request over rtnetlink.
fn add_lo_address_v6(addr: Ipv6Addr) -> io::Result<()> {
    let lo = unsafe { libc::if_nametoindex(c"lo".as_ptr()) };
    if lo == 0 {
        return Err(io::Error::other(format!(
            "no lo interface: {}",
            io::Error::last_os_error()
        )));
    }
    let mut m = AddressMessage::default();
    m.header.family = AddressFamily::Inet6;
    m.header.prefix_len = 128;
    m.header.flags = AddressHeaderFlags::Nodad;
    m.header.index = lo;
    m.attributes = vec![
        AddressAttribute::Local(addr.into()),
        AddressAttribute::Address(addr.into()),
        AddressAttribute::Flags(AddressFlags::Nodad),
    ];
    netlink(
        NETLINK_ROUTE,
        RouteNetlinkMessage::NewAddress(m),
        NLM_F_ACK | NLM_F_REPLACE | NLM_F_CREATE,
        |_| {},
    )
    .map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("adding {addr}/128 to lo (RTM_NEWADDR): {e}"),
        )
    })
}

/// Send one request (`flags` besides NLM_F_REQUEST) on a new netlink
/// socket of `protocol` and hand each message of the reply to `on_msg`,
/// until the dump is done or the kernel acknowledges (or refuses: its
/// errno is the error).
pub(crate) fn netlink<M>(
    protocol: isize,
    req: M,
    flags: u16,
    mut on_msg: impl FnMut(M),
) -> io::Result<()>
where
    M: NetlinkSerializable + NetlinkDeserializable,
{
    let socket = Socket::new(protocol)?;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | flags;
    header.sequence_number = 1;
    let mut msg = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(req));
    msg.finalize();
    let mut buf = vec![0u8; msg.buffer_len()];
    msg.serialize(&mut buf);
    socket.send_to(&buf, &SocketAddr::new(0, 0), 0)?;
    let malformed =
        |e: &dyn std::fmt::Display| io::Error::other(format!("malformed netlink reply: {e}"));
    let mut rx: Vec<u8> = Vec::with_capacity(32 * 1024);
    loop {
        rx.clear();
        match socket.recv(&mut rx, 0) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        let mut off = 0;
        while off < rx.len() {
            let m = NetlinkMessage::<M>::deserialize(&rx[off..]).map_err(|e| malformed(&e))?;
            let len = m.header.length as usize;
            match m.payload {
                NetlinkPayload::Done(_) => return Ok(()),
                NetlinkPayload::Error(e) if e.code.is_none() => return Ok(()),
                NetlinkPayload::Error(e) => return Err(e.to_io()),
                NetlinkPayload::InnerMessage(inner) => on_msg(inner),
                _ => {}
            }
            if len == 0 {
                return Err(malformed(&"a message of length 0"));
            }
            off += (len + 3) & !3;
        }
    }
}
