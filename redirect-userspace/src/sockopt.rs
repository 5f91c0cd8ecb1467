//! The two socket calls `validate`'s in-pod half makes as the proxy would:
//! a listener on a capture port, and `SO_ORIGINAL_DST` on what it accepts.

use std::{
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
};

use socket2::{Domain, Protocol, Socket, Type};

/// Bind a listener; IPv6 ones are v6-only so v4 and v6 can share a port.
pub fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.bind(&addr.into())?;
    s.listen(1024)?;
    Ok(s.into())
}

/// `getsockopt(SOL_IP, SO_ORIGINAL_DST)` / `(SOL_IPV6, IP6T_SO_ORIGINAL_DST)`.
pub fn original_dst(s: &TcpStream) -> io::Result<SocketAddr> {
    let v6 = s.local_addr()?.is_ipv6();
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = if v6 {
        std::mem::size_of::<libc::sockaddr_in6>()
    } else {
        std::mem::size_of::<libc::sockaddr_in>()
    } as libc::socklen_t;
    let level = if v6 { libc::SOL_IPV6 } else { libc::SOL_IP };
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            level,
            80,
            (&mut ss as *mut libc::sockaddr_storage).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    match ss.ss_family as i32 {
        libc::AF_INET => {
            let a = unsafe { &*(&ss as *const _ as *const libc::sockaddr_in) };
            Ok(SocketAddr::new(
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)).into(),
                u16::from_be(a.sin_port),
            ))
        }
        libc::AF_INET6 => {
            let a = unsafe { &*(&ss as *const _ as *const libc::sockaddr_in6) };
            Ok(SocketAddr::new(
                Ipv6Addr::from(a.sin6_addr.s6_addr).into(),
                u16::from_be(a.sin6_port),
            ))
        }
        f => Err(io::Error::other(format!(
            "SO_ORIGINAL_DST returned address family {f}"
        ))),
    }
}
