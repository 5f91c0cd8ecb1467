//! The differential test's two network tools, run as `redirect-kit
//! diff-serve` and `redirect-kit diff-probe`: a server that tells each
//! caller who answered and what it saw, and a one-shot caller that reports
//! how its connection went. Both speak TCP and UDP; the caller also MPTCP.

use std::{
    io::{self, Read, Write},
    net::{IpAddr, Shutdown, SocketAddr, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use socket2::{Domain, Protocol, Socket, Type};

pub use crate::kit::listen;

/// How a probe connects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    /// Connected UDP: one datagram out, one back.
    Udp,
    /// TCP through an IPPROTO_MPTCP socket.
    Mptcp,
}

/// What the caller saw, printed by `diff-probe` as one JSON line.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeReport {
    /// `ok`, or how it failed: `refused`, `reset`, `closed` (no greeting),
    /// `timeout`, `denied`, `unreachable`, `addr-not-avail`, `error <n>`.
    pub result: String,
    /// getpeername() of the caller's socket.
    pub peer: Option<String>,
    /// getsockname() of the caller's socket.
    pub local: Option<String>,
    /// The greeting of whoever answered (`role=<r> local=<a> peer=<a>`).
    pub greeting: Option<String>,
}

/// A failed call, as a short stable word (the OS error number decides).
pub fn classify(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ECONNREFUSED) => "refused".into(),
        Some(libc::ECONNRESET) | Some(libc::EPIPE) => "reset".into(),
        Some(libc::ETIMEDOUT) | Some(libc::EAGAIN) | Some(libc::EINPROGRESS) => "timeout".into(),
        Some(libc::EPERM) | Some(libc::EACCES) => "denied".into(),
        Some(libc::ENETUNREACH) | Some(libc::EHOSTUNREACH) => "unreachable".into(),
        Some(libc::EADDRNOTAVAIL) => "addr-not-avail".into(),
        Some(libc::EINVAL) => "invalid".into(),
        Some(libc::EAFNOSUPPORT) | Some(libc::EPROTONOSUPPORT) => "unsupported".into(),
        Some(n) => format!("error {n}"),
        None if e.kind() == io::ErrorKind::TimedOut || e.kind() == io::ErrorKind::WouldBlock => {
            "timeout".into()
        }
        None if e.kind() == io::ErrorKind::UnexpectedEof => "closed".into(),
        None => format!("error {}", e.kind()),
    }
}

/// The same classification for an error printed as text (the kit proxy's
/// log: "... (os error 111)").
pub fn classify_text(s: &str) -> String {
    let n = s
        .rsplit_once("(os error ")
        .and_then(|(_, n)| n.trim_end_matches(')').parse::<i32>().ok());
    match n {
        Some(n) => classify(&io::Error::from_raw_os_error(n)),
        None if s.contains("timed out") => "timeout".into(),
        None => "error".into(),
    }
}

/// One call: connect (bound to `bind` when given), then read the
/// greeting (TCP) or send one datagram and read the answer (UDP).
pub fn probe(
    proto: Proto,
    dst: SocketAddr,
    bind: Option<IpAddr>,
    timeout: Duration,
) -> ProbeReport {
    let mut rep = ProbeReport::default();
    let (ty, p) = match proto {
        Proto::Tcp => (Type::STREAM, Protocol::TCP),
        Proto::Mptcp => (Type::STREAM, Protocol::MPTCP),
        Proto::Udp => (Type::DGRAM, Protocol::UDP),
    };
    let run = |rep: &mut ProbeReport| -> io::Result<()> {
        let s = Socket::new(Domain::for_address(dst), ty, Some(p))?;
        if let Some(src) = bind {
            s.bind(&SocketAddr::new(src, 0).into())?;
        }
        s.connect_timeout(&dst.into(), timeout)?;
        rep.peer = s.peer_addr()?.as_socket().map(|a| a.to_string());
        rep.local = s.local_addr()?.as_socket().map(|a| a.to_string());
        let mut line = Vec::new();
        if proto == Proto::Udp {
            let u: UdpSocket = s.into();
            u.set_read_timeout(Some(timeout))?;
            u.send(b"q")?;
            let mut buf = [0u8; 512];
            let n = u.recv(&mut buf)?;
            line.extend_from_slice(&buf[..n]);
        } else {
            let t: TcpStream = s.into();
            read_line(&t, &mut line, timeout)?;
            let _ = t.shutdown(Shutdown::Both);
        }
        rep.greeting = Some(String::from_utf8_lossy(&line).trim().to_string());
        Ok(())
    };
    rep.result = match run(&mut rep) {
        Ok(()) => "ok".into(),
        Err(e) => classify(&e),
    };
    rep
}

/// Read up to the first newline; EOF before it is `closed`.
fn read_line(s: &TcpStream, out: &mut Vec<u8>, timeout: Duration) -> io::Result<()> {
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 256];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::from(io::ErrorKind::TimedOut));
        }
        let mut pfd = libc::pollfd {
            fd: s.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
        if unsafe { libc::poll(&mut pfd, 1, ms) } < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if pfd.revents == 0 {
            continue;
        }
        match (&mut &*s).read(&mut buf) {
            Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
            Ok(n) => {
                out.extend_from_slice(&buf[..n]);
                if out.contains(&b'\n') {
                    out.truncate(out.iter().position(|b| *b == b'\n').unwrap_or(out.len()));
                    return Ok(());
                }
            }
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// The greeting a server sends: who it is, where it was reached, and
/// from where.
pub fn greeting(role: &str, local: &SocketAddr, peer: &SocketAddr) -> String {
    format!("role={role} local={local} peer={peer}\n")
}

/// Serve `tcp` and `udp` addresses as `role`: each TCP connection gets the
/// greeting and is closed; each datagram is answered with it. Prints
/// `{"event":"ready"}` once every socket is bound.
pub fn serve(role: &str, tcp: &[SocketAddr], udp: &[SocketAddr]) -> io::Result<()> {
    let mut threads = Vec::new();
    for a in tcp {
        let l = listen(*a).map_err(|e| io::Error::new(e.kind(), format!("tcp {a}: {e}")))?;
        let role = role.to_string();
        threads.push(std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                let role = role.clone();
                std::thread::spawn(move || {
                    let (Ok(local), Ok(peer)) = (c.local_addr(), c.peer_addr()) else {
                        return;
                    };
                    let _ = (&c).write_all(greeting(&role, &local, &peer).as_bytes());
                    let _ = c.shutdown(Shutdown::Write);
                    // Let the caller read before the socket goes.
                    let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
                    let _ = (&c).read(&mut [0u8; 64]);
                });
            }
        }));
    }
    for a in udp {
        let s = Socket::new(Domain::for_address(*a), Type::DGRAM, Some(Protocol::UDP))?;
        if a.is_ipv6() {
            s.set_only_v6(true)?;
        }
        s.bind(&(*a).into())
            .map_err(|e| io::Error::new(e.kind(), format!("udp {a}: {e}")))?;
        let u: UdpSocket = s.into();
        let (role, local) = (role.to_string(), *a);
        threads.push(std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while let Ok((_, from)) = u.recv_from(&mut buf) {
                let _ = u.send_to(greeting(&role, &local, &from).as_bytes(), from);
            }
        }));
    }
    println!("{{\"event\":\"ready\"}}");
    let _ = io::stdout().flush();
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}
