//! The benchmark's network programs: a transparent sidecar proxy and the
//! upstream servers (echo, sink), on one event loop each.
//!
//! One thread, level-triggered epoll, non-blocking sockets with
//! TCP_NODELAY, 256 KiB relay buffers reused across connections. The proxy
//! behaves like Envoy behind istio-init: it accepts on the outbound capture
//! port and connects to the connection's `SO_ORIGINAL_DST`; with `--fixed`
//! listeners it forwards to a fixed address instead (configuration B: the
//! app addresses the proxy directly). The same binary serves B to E.

use std::{
    collections::HashMap,
    io::{self, Write},
    mem::ManuallyDrop,
    net::{SocketAddr, TcpStream},
    os::fd::{FromRawFd, IntoRawFd, RawFd},
};

use crate::kit;

const BUF: usize = 256 * 1024;
/// Tokens at or above this are listeners (index = token - LISTENER).
const LISTENER: u64 = 1 << 40;
const SIGNAL: u64 = u64::MAX;

/// What a listener does with the connections it accepts.
#[derive(Clone, Copy, Debug)]
pub enum Role {
    /// Relay to `SO_ORIGINAL_DST` (the transparent sidecar).
    Transparent,
    /// Relay to a fixed address.
    Fixed(SocketAddr),
    /// Echo everything back.
    Echo,
    /// Read and discard; on EOF answer the byte count (8 bytes, big endian).
    Sink,
}

#[derive(Default, serde::Serialize)]
pub struct Counters {
    pub accepted: u64,
    pub orig_dst_ok: u64,
    pub orig_dst_failed: u64,
    pub fixed: u64,
    pub connect_failed: u64,
}

/// One direction of a connection: bytes read from `from` waiting to be
/// written to `to` (indices into `Conn::fds`).
struct Pipe {
    from: usize,
    to: usize,
    buf: Vec<u8>,
    lo: usize,
    hi: usize,
    eof: bool,
    shut: bool,
}

enum Kind {
    Relay,
    Echo,
    Sink(u64),
}

struct Conn {
    fds: [RawFd; 2],
    kind: Kind,
    connecting: bool,
    pipes: Vec<Pipe>,
    interest: [u32; 2],
}

struct Loop {
    ep: RawFd,
    listeners: Vec<(RawFd, Role)>,
    conns: Vec<Option<Conn>>,
    free: Vec<usize>,
    pool: Vec<Vec<u8>>,
    counters: Counters,
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn set_nodelay(fd: RawFd) {
    let one: libc::c_int = 1;
    unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            (&one as *const libc::c_int).cast(),
            4,
        )
    };
}

fn sockaddr(a: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    let s: socket2::SockAddr = (*a).into();
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    unsafe {
        std::ptr::copy_nonoverlapping(
            s.as_ptr().cast::<u8>(),
            (&mut ss as *mut libc::sockaddr_storage).cast::<u8>(),
            s.len() as usize,
        )
    };
    (ss, s.len())
}

impl Loop {
    fn new() -> io::Result<Loop> {
        let ep = cvt(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        Ok(Loop {
            ep,
            listeners: Vec::new(),
            conns: Vec::new(),
            free: Vec::new(),
            pool: Vec::new(),
            counters: Counters::default(),
        })
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: token };
        cvt(unsafe { libc::epoll_ctl(self.ep, op, fd, &mut ev) }).map(drop)
    }

    fn listen(&mut self, addr: SocketAddr, role: Role) -> io::Result<()> {
        let l = kit::listen(addr)
            .map_err(|e| io::Error::new(e.kind(), format!("listening on {addr}: {e}")))?;
        l.set_nonblocking(true)?;
        self.add_listener(l.into_raw_fd(), role)
    }

    fn add_listener(&mut self, fd: RawFd, role: Role) -> io::Result<()> {
        self.ctl(
            libc::EPOLL_CTL_ADD,
            fd,
            libc::EPOLLIN as u32,
            LISTENER + self.listeners.len() as u64,
        )?;
        self.listeners.push((fd, role));
        Ok(())
    }

    /// An echo listener on an AF_UNIX stream socket with an abstract name
    /// (per netns, so only processes of this netns can reach it).
    fn listen_unix_echo(&mut self, name: &str) -> io::Result<()> {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
        let l = std::os::unix::net::UnixListener::bind_addr(&addr)
            .map_err(|e| io::Error::new(e.kind(), format!("listening on @{name}: {e}")))?;
        l.set_nonblocking(true)?;
        self.add_listener(l.into_raw_fd(), Role::Echo)
    }

    fn buffer(&mut self) -> Vec<u8> {
        self.pool.pop().unwrap_or_else(|| vec![0u8; BUF])
    }

    fn pipe(&mut self, from: usize, to: usize) -> Pipe {
        Pipe {
            from,
            to,
            buf: self.buffer(),
            lo: 0,
            hi: 0,
            eof: false,
            shut: false,
        }
    }

    fn insert(&mut self, c: Conn) -> usize {
        match self.free.pop() {
            Some(i) => {
                self.conns[i] = Some(c);
                i
            }
            None => {
                self.conns.push(Some(c));
                self.conns.len() - 1
            }
        }
    }

    fn accept(&mut self, li: usize) {
        let (lfd, role) = self.listeners[li];
        for _ in 0..64 {
            let fd = unsafe {
                libc::accept4(
                    lfd,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                )
            };
            if fd < 0 {
                return;
            }
            self.counters.accepted += 1;
            set_nodelay(fd);
            match role {
                Role::Echo | Role::Sink => {
                    let p = self.pipe(0, 0);
                    let kind = if matches!(role, Role::Echo) {
                        Kind::Echo
                    } else {
                        Kind::Sink(0)
                    };
                    let c = Conn {
                        fds: [fd, -1],
                        kind,
                        connecting: false,
                        pipes: vec![p],
                        interest: [libc::EPOLLIN as u32, 0],
                    };
                    let i = self.insert(c);
                    if self
                        .ctl(
                            libc::EPOLL_CTL_ADD,
                            fd,
                            libc::EPOLLIN as u32,
                            (i as u64) << 1,
                        )
                        .is_err()
                    {
                        self.close(i);
                    }
                }
                Role::Transparent | Role::Fixed(_) => {
                    let dst = match role {
                        Role::Fixed(a) => {
                            self.counters.fixed += 1;
                            Ok(a)
                        }
                        _ => {
                            let s = ManuallyDrop::new(unsafe { TcpStream::from_raw_fd(fd) });
                            kit::original_dst(&s)
                        }
                    };
                    let dst = match dst {
                        Ok(d) => {
                            if matches!(role, Role::Transparent) {
                                self.counters.orig_dst_ok += 1;
                            }
                            d
                        }
                        Err(_) => {
                            self.counters.orig_dst_failed += 1;
                            unsafe { libc::close(fd) };
                            continue;
                        }
                    };
                    match self.connect(dst) {
                        Ok((up, done)) => {
                            let pipes = vec![self.pipe(0, 1), self.pipe(1, 0)];
                            let interest = if done {
                                [libc::EPOLLIN as u32; 2]
                            } else {
                                [0, libc::EPOLLOUT as u32]
                            };
                            let c = Conn {
                                fds: [fd, up],
                                kind: Kind::Relay,
                                connecting: !done,
                                pipes,
                                interest,
                            };
                            let i = self.insert(c);
                            let ok = self
                                .ctl(libc::EPOLL_CTL_ADD, fd, interest[0], (i as u64) << 1)
                                .is_ok()
                                && self
                                    .ctl(
                                        libc::EPOLL_CTL_ADD,
                                        up,
                                        interest[1],
                                        ((i as u64) << 1) | 1,
                                    )
                                    .is_ok();
                            if !ok {
                                self.close(i);
                            }
                        }
                        Err(_) => {
                            self.counters.connect_failed += 1;
                            unsafe { libc::close(fd) };
                        }
                    }
                }
            }
        }
    }

    /// Non-blocking connect; true when it completed at once.
    fn connect(&self, dst: SocketAddr) -> io::Result<(RawFd, bool)> {
        let family = if dst.is_ipv4() {
            libc::AF_INET
        } else {
            libc::AF_INET6
        };
        let fd = cvt(unsafe {
            libc::socket(
                family,
                libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            )
        })?;
        set_nodelay(fd);
        let (ss, len) = sockaddr(&dst);
        let r = unsafe { libc::connect(fd, (&ss as *const libc::sockaddr_storage).cast(), len) };
        if r == 0 {
            return Ok((fd, true));
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EINPROGRESS) {
            return Ok((fd, false));
        }
        unsafe { libc::close(fd) };
        Err(e)
    }

    fn close(&mut self, i: usize) {
        if let Some(c) = self.conns[i].take() {
            for fd in c.fds {
                if fd >= 0 {
                    unsafe { libc::close(fd) };
                }
            }
            for p in c.pipes {
                if self.pool.len() < 64 {
                    self.pool.push(p.buf);
                }
            }
            self.free.push(i);
        }
    }

    fn event(&mut self, token: u64, ev: u32) {
        let i = (token >> 1) as usize;
        let side = (token & 1) as usize;
        let Some(c) = self.conns[i].as_mut() else {
            return;
        };
        let err = ev & (libc::EPOLLERR | libc::EPOLLHUP) as u32 != 0;
        let readable = ev & libc::EPOLLIN as u32 != 0 || err;
        let writable = ev & libc::EPOLLOUT as u32 != 0 || err;
        if c.connecting {
            if side != 1 || !writable {
                return;
            }
            let mut e: libc::c_int = 0;
            let mut len = 4 as libc::socklen_t;
            unsafe {
                libc::getsockopt(
                    c.fds[1],
                    libc::SOL_SOCKET,
                    libc::SO_ERROR,
                    (&mut e as *mut libc::c_int).cast(),
                    &mut len,
                )
            };
            if e != 0 {
                self.counters.connect_failed += 1;
                self.close(i);
                return;
            }
            c.connecting = false;
            // Whatever the app already sent is waiting: read it now.
            if pump(c, 0).is_err() {
                self.close(i);
                return;
            }
        } else {
            let mut ok = true;
            for p in 0..c.pipes.len() {
                let (from, to) = (c.pipes[p].from, c.pipes[p].to);
                if writable && to == side && flush(c, p).is_err() {
                    ok = false;
                }
                if ok && readable && from == side && pump(c, p).is_err() {
                    ok = false;
                }
            }
            if !ok {
                self.close(i);
                return;
            }
        }
        if finished(c) {
            self.close(i);
            return;
        }
        let want = interest(c);
        let mut changes = [None; 2];
        for s in 0..2 {
            if c.fds[s] >= 0 && want[s] != c.interest[s] {
                c.interest[s] = want[s];
                changes[s] = Some(c.fds[s]);
            }
        }
        for (s, fd) in changes.iter().enumerate() {
            if let Some(fd) = fd {
                if self
                    .ctl(
                        libc::EPOLL_CTL_MOD,
                        *fd,
                        want[s],
                        ((i as u64) << 1) | s as u64,
                    )
                    .is_err()
                {
                    self.close(i);
                    return;
                }
            }
        }
    }
}

fn would_block(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EINTR))
}

/// Write what pipe `p` holds; Ok even when the socket is full.
fn flush(c: &mut Conn, p: usize) -> io::Result<()> {
    let to = c.fds[c.pipes[p].to];
    let pipe = &mut c.pipes[p];
    while pipe.lo < pipe.hi {
        let n = unsafe {
            libc::send(
                to,
                pipe.buf[pipe.lo..].as_ptr().cast(),
                pipe.hi - pipe.lo,
                libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if would_block(&e) { Ok(()) } else { Err(e) };
        }
        pipe.lo += n as usize;
    }
    pipe.lo = 0;
    pipe.hi = 0;
    if pipe.eof && !pipe.shut {
        pipe.shut = true;
        match c.kind {
            Kind::Relay => unsafe {
                libc::shutdown(to, libc::SHUT_WR);
            },
            Kind::Echo | Kind::Sink(_) => {}
        }
    }
    Ok(())
}

/// Read from pipe `p`'s source and pass it on, while the buffer is empty
/// and the socket keeps filling it.
fn pump(c: &mut Conn, p: usize) -> io::Result<()> {
    for _ in 0..16 {
        let pipe = &mut c.pipes[p];
        if pipe.eof || pipe.lo < pipe.hi {
            return Ok(());
        }
        let from = c.fds[pipe.from];
        let n = unsafe { libc::recv(from, pipe.buf.as_mut_ptr().cast(), pipe.buf.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if would_block(&e) { Ok(()) } else { Err(e) };
        }
        let n = n as usize;
        if n == 0 {
            pipe.eof = true;
            if let Kind::Sink(total) = c.kind {
                let b = total.to_be_bytes();
                unsafe { libc::send(from, b.as_ptr().cast(), 8, libc::MSG_NOSIGNAL) };
                pipe.shut = true;
                return Ok(());
            }
            return flush(c, p);
        }
        let full = n == pipe.buf.len();
        if let Kind::Sink(total) = &mut c.kind {
            *total += n as u64;
        } else {
            pipe.hi = n;
            flush(c, p)?;
        }
        if !full {
            return Ok(());
        }
    }
    Ok(())
}

fn finished(c: &Conn) -> bool {
    !c.connecting && c.pipes.iter().all(|p| p.shut)
}

/// epoll interest per side: read while the pipe from it is empty and
/// open, write while the pipe to it holds data.
fn interest(c: &Conn) -> [u32; 2] {
    let mut w = [0u32; 2];
    for p in &c.pipes {
        if !p.eof && p.lo == p.hi {
            w[p.from] |= libc::EPOLLIN as u32;
        }
        if p.lo < p.hi {
            w[p.to] |= libc::EPOLLOUT as u32;
        }
    }
    w
}

/// Run the event loop over `listeners` forever. Prints `{"event":"ready"}`
/// once listening, and a `{"event":"stats",...}` line on every SIGUSR1.
pub fn serve(listeners: &[(SocketAddr, Role)]) -> io::Result<()> {
    serve_all(listeners, &[])
}

/// [`serve`], plus echo listeners on the abstract AF_UNIX names `unix_echo`.
pub fn serve_all(listeners: &[(SocketAddr, Role)], unix_echo: &[String]) -> io::Result<()> {
    let mut lp = Loop::new()?;
    let sfd = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGUSR1);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        cvt(libc::signalfd(
            -1,
            &set,
            libc::SFD_NONBLOCK | libc::SFD_CLOEXEC,
        ))?
    };
    lp.ctl(libc::EPOLL_CTL_ADD, sfd, libc::EPOLLIN as u32, SIGNAL)?;
    for (a, r) in listeners {
        lp.listen(*a, *r)?;
    }
    for n in unix_echo {
        lp.listen_unix_echo(n)?;
    }
    println!("{{\"event\":\"ready\"}}");
    io::stdout().flush()?;
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    loop {
        let n = unsafe { libc::epoll_wait(lp.ep, events.as_mut_ptr(), events.len() as i32, -1) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if would_block(&e) {
                continue;
            }
            return Err(e);
        }
        for ev in &events[..n as usize] {
            let (token, bits) = (ev.u64, ev.events);
            if token == SIGNAL {
                let mut info = [0u8; 128];
                while unsafe { libc::read(sfd, info.as_mut_ptr().cast(), info.len()) } > 0 {}
                let line = serde_json::json!({"event": "stats", "counters": &lp.counters});
                println!("{line}");
                io::stdout().flush()?;
            } else if token >= LISTENER {
                lp.accept((token - LISTENER) as usize);
            } else {
                lp.event(token, bits);
            }
        }
    }
}

/// `--fixed PORT=ADDR` of the proxy.
pub fn parse_fixed(s: &str) -> Result<(u16, SocketAddr), String> {
    let (p, a) = s
        .split_once('=')
        .ok_or_else(|| format!("'{s}' is not PORT=ADDR"))?;
    Ok((
        p.parse().map_err(|_| format!("bad port '{p}'"))?,
        a.parse().map_err(|_| format!("bad address '{a}'"))?,
    ))
}

/// The benchmark sidecar: transparent on `port` (all IPv4 addresses),
/// plus fixed-upstream listeners on 127.0.0.1.
pub fn proxy(port: u16, fixed: &[(u16, SocketAddr)]) -> io::Result<()> {
    let mut l = vec![(SocketAddr::from(([0, 0, 0, 0], port)), Role::Transparent)];
    let mut seen = HashMap::new();
    for (p, a) in fixed {
        if seen.insert(*p, *a).is_some() {
            return Err(io::Error::other(format!("--fixed port {p} given twice")));
        }
        l.push((SocketAddr::from(([127, 0, 0, 1], *p)), Role::Fixed(*a)));
    }
    serve(&l)
}
