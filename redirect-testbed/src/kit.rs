//! Small network programs for the demo, the tests and the benchmark, run
//! as `redirect-kit <tool>`: a transparent sidecar proxy that behaves like
//! Envoy behind istio-init (SO_ORIGINAL_DST, inbound passthrough from
//! 127.0.0.6), an echo server that reports what it sees, and a client.

use std::{
    io::{self, BufRead, BufReader, Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    sync::{Arc, Mutex},
    time::Duration,
};

use socket2::{Domain, Protocol, Socket, Type};

/// The listener and `SO_ORIGINAL_DST` of the product's `validate`: the
/// kit's proxy asks the kernel the same way.
pub use redirect_userspace::sockopt::{listen, original_dst};

fn relay(a: TcpStream, b: TcpStream) {
    let (a2, b2) = match (a.try_clone(), b.try_clone()) {
        (Ok(a2), Ok(b2)) => (a2, b2),
        _ => return,
    };
    let t = std::thread::spawn(move || pipe(a2, b2));
    pipe(b, a);
    let _ = t.join();
}

fn pipe(from: TcpStream, to: TcpStream) {
    let mut to_w = &to;
    let _ = io::copy(&mut PollRead::new(&from, IDLE), &mut to_w);
    let _ = to.shutdown(Shutdown::Write);
}

/// How long the relay and the echo server wait for data.
const IDLE: Duration = Duration::from_secs(120);

/// A blocking reader that behaves like an event loop: when a read says
/// EAGAIN it waits for readability and tries again. Sockets accelerated with
/// sockmap can return EAGAIN from a blocking read when a packet (the peer's
/// FIN) arrives on the normal path while the redirected queue is empty; an
/// epoll-driven proxy such as Envoy never notices, and neither do these
/// tools. `timeout` bounds each wait.
pub struct PollRead<'a> {
    s: &'a TcpStream,
    timeout: Duration,
}

impl<'a> PollRead<'a> {
    pub fn new(s: &'a TcpStream, timeout: Duration) -> Self {
        PollRead { s, timeout }
    }
}

impl Read for PollRead<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match (&mut &*self.s).read(buf) {
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::Interrupted =>
                {
                    let mut pfd = libc::pollfd {
                        fd: self.s.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    let ms = self.timeout.as_millis().min(i32::MAX as u128) as i32;
                    match unsafe { libc::poll(&mut pfd, 1, ms) } {
                        0 => {
                            return Err(io::Error::new(
                                io::ErrorKind::TimedOut,
                                "no data before the timeout",
                            ))
                        }
                        n if n < 0 => {
                            let e = io::Error::last_os_error();
                            if e.kind() != io::ErrorKind::Interrupted {
                                return Err(e);
                            }
                        }
                        _ => {}
                    }
                }
                r => return r,
            }
        }
    }
}

/// Which listener a connection came in on.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Outbound,
    Inbound,
}

/// The sidecar: accept on the outbound and inbound capture ports, ask the
/// kernel for the original destination, connect there and relay. Inbound
/// connections to the app are made from 127.0.0.6 / ::6 as Envoy does.
/// One JSON line per connection on stdout.
pub fn proxy(outbound_port: u16, inbound_port: u16) -> io::Result<()> {
    let log = Arc::new(Mutex::new(io::stdout()));
    let mut threads = Vec::new();
    for (port, dir) in [
        (outbound_port, Direction::Outbound),
        (inbound_port, Direction::Inbound),
    ] {
        for ip in [
            IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        ] {
            let l = match listen(SocketAddr::new(ip, port)) {
                Ok(l) => l,
                Err(e) if ip.is_ipv6() => {
                    eprintln!("proxy: no IPv6 listener on {port}: {e}");
                    continue;
                }
                Err(e) => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("listening on {ip}:{port}: {e}"),
                    ))
                }
            };
            let log = log.clone();
            threads.push(std::thread::spawn(move || accept_loop(l, dir, log)));
        }
    }
    println!(
        "{{\"event\":\"ready\",\"outbound_port\":{outbound_port},\"inbound_port\":{inbound_port}}}"
    );
    let _ = io::stdout().flush();
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

fn accept_loop(l: TcpListener, dir: Direction, log: Arc<Mutex<io::Stdout>>) {
    for conn in l.incoming() {
        let Ok(conn) = conn else { continue };
        let log = log.clone();
        std::thread::spawn(move || handle(conn, dir, log));
    }
}

fn handle(conn: TcpStream, dir: Direction, log: Arc<Mutex<io::Stdout>>) {
    let peer = conn.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    let local = conn.local_addr().map(|a| a.to_string()).unwrap_or_default();
    let name = if dir == Direction::Outbound {
        "outbound"
    } else {
        "inbound"
    };
    let orig = original_dst(&conn);
    let result = orig.as_ref().map_err(clone_err).and_then(|&orig| {
        let up = if dir == Direction::Inbound {
            let src: IpAddr = if orig.is_ipv4() {
                Ipv4Addr::new(127, 0, 0, 6).into()
            } else {
                "::6".parse().unwrap()
            };
            connect_from(src, orig)
        } else {
            TcpStream::connect_timeout(&orig, Duration::from_secs(5))
        };
        up.map(|u| (orig, u))
    });
    let line = match (&result, &orig) {
        (Ok((orig, _)), _) => format!(
            "{{\"event\":\"conn\",\"dir\":\"{name}\",\"peer\":\"{peer}\",\"local\":\"{local}\",\"orig\":\"{orig}\"}}"
        ),
        // The original destination is known; reaching it failed.
        (Err(e), Ok(orig)) => format!(
            "{{\"event\":\"error\",\"dir\":\"{name}\",\"peer\":\"{peer}\",\"orig\":\"{orig}\",\"error\":\"{e}\"}}"
        ),
        (Err(e), Err(_)) => format!(
            "{{\"event\":\"error\",\"dir\":\"{name}\",\"peer\":\"{peer}\",\"error\":\"{e}\"}}"
        ),
    };
    if let Ok(mut out) = log.lock() {
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }
    if let Ok((_, up)) = result {
        let _ = conn.set_nodelay(true);
        let _ = up.set_nodelay(true);
        relay(conn, up);
    }
}

fn clone_err(e: &io::Error) -> io::Error {
    match e.raw_os_error() {
        Some(n) => io::Error::from_raw_os_error(n),
        None => io::Error::new(e.kind(), e.to_string()),
    }
}

fn connect_from(src: IpAddr, dst: SocketAddr) -> io::Result<TcpStream> {
    let s = Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP))?;
    if dst.is_ipv6() {
        s.set_freebind_ipv6(true)?;
    } else {
        s.set_freebind(true)?;
    }
    s.bind(&SocketAddr::new(src, 0).into())?;
    s.connect_timeout(&dst.into(), Duration::from_secs(5))?;
    Ok(s.into())
}

/// Echo server: greets each connection with `peer=<addr> local=<addr>`,
/// then echoes everything back until the client half-closes.
pub fn echo(addrs: &[SocketAddr]) -> io::Result<()> {
    let mut threads = Vec::new();
    for a in addrs {
        let l =
            listen(*a).map_err(|e| io::Error::new(e.kind(), format!("listening on {a}: {e}")))?;
        threads.push(std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                std::thread::spawn(move || {
                    let peer = c.peer_addr().map(|a| a.to_string()).unwrap_or_default();
                    let local = c.local_addr().map(|a| a.to_string()).unwrap_or_default();
                    let mut w = &c;
                    if writeln!(w, "peer={peer} local={local}").is_ok() {
                        let _ = io::copy(&mut PollRead::new(&c, IDLE), &mut w);
                    }
                    let _ = c.shutdown(Shutdown::Write);
                });
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

/// What the client saw, printed as one JSON line.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct ClientReport {
    pub ok: bool,
    pub error: Option<String>,
    /// getpeername() of the client socket.
    pub peer: Option<String>,
    pub local: Option<String>,
    /// The echo server's greeting (what the server saw).
    pub banner: Option<String>,
    pub echoed: bool,
}

/// Connect, read the greeting, send `payload` (while reading the echo, so
/// payloads of any size work), half-close, check the echo byte for byte.
pub fn client(
    dst: SocketAddr,
    bind: Option<IpAddr>,
    payload: &[u8],
    timeout: Duration,
) -> ClientReport {
    let mut rep = ClientReport {
        ok: false,
        error: None,
        peer: None,
        local: None,
        banner: None,
        echoed: false,
    };
    let run = |rep: &mut ClientReport| -> io::Result<()> {
        let s = match bind {
            Some(src) => {
                let s = Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP))?;
                s.bind(&SocketAddr::new(src, 0).into())?;
                s.connect_timeout(&dst.into(), timeout)?;
                TcpStream::from(s)
            }
            None => TcpStream::connect_timeout(&dst, timeout)?,
        };
        rep.peer = s.peer_addr().ok().map(|a| a.to_string());
        rep.local = s.local_addr().ok().map(|a| a.to_string());
        let mut r = BufReader::new(PollRead::new(&s, timeout));
        let mut banner = String::new();
        r.read_line(&mut banner)?;
        rep.banner = Some(banner.trim().to_string());
        let mut back = Vec::with_capacity(payload.len());
        std::thread::scope(|scope| -> io::Result<()> {
            let writer = scope.spawn(|| -> io::Result<()> {
                (&s).write_all(payload)?;
                s.shutdown(Shutdown::Write)
            });
            let read = r.read_to_end(&mut back);
            writer.join().expect("writer thread")?;
            read.map(|_| ())
        })?;
        rep.echoed = back == payload;
        if !rep.echoed {
            let first_diff = back.iter().zip(payload).position(|(a, b)| a != b);
            rep.error = Some(format!(
                "echo mismatch: sent {} bytes, got {} back (first difference at {first_diff:?})",
                payload.len(),
                back.len()
            ));
        }
        Ok(())
    };
    match run(&mut rep) {
        Ok(()) => rep.ok = rep.echoed,
        Err(e) => rep.error = Some(e.to_string()),
    }
    rep
}

/// A deterministic payload of `n` bytes (not a repeating short pattern,
/// so a lost or duplicated chunk shows).
pub fn payload(n: usize) -> Vec<u8> {
    let mut x: u32 = 0x9e37_79b9;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// The DNS proxy stand-in and query client of the DNS capture tests.
pub mod dns;
/// Stress tools of the acceleration correctness tests.
pub mod podchurn;
pub mod stress;
