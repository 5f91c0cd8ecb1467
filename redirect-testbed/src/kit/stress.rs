//! Stress tools for the acceleration correctness tests (`redirect-kit
//! xfer | stress-server | epoll-echo | churn | fan`). Every read has a
//! timeout, every payload is checked by hash (FNV-1a 64) end to end, and
//! every tool prints JSON a test can check.
//!
//! Blocking reads go through [`Reader`], which, like the kit's `PollRead`,
//! treats `EAGAIN` as "wait for readability and retry" (a blocking read on
//! a sockmap socket can return it spuriously, see the README) and counts
//! how often that happened; `epoll-echo` uses non-blocking sockets.

use std::{
    collections::HashMap,
    io::{self, Read, Write},
    net::{IpAddr, Shutdown, SocketAddr, TcpStream},
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Barrier, Mutex,
    },
    time::{Duration, Instant},
};

use socket2::{Domain, Protocol, Socket, Type};

use super::{listen, payload};

// ------------------------------------------------------------ utilities

/// FNV-1a, 64 bit: order-sensitive, so loss, duplication and reordering
/// all change it.
#[derive(Clone, Copy, Debug)]
pub struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    pub fn update(&mut self, b: &[u8]) {
        let mut h = self.0;
        for &x in b {
            h ^= x as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        self.0 = h;
    }

    pub fn hex(&self) -> String {
        format!("{:016x}", self.0)
    }
}

/// The hash the tools report for `b`.
pub fn hash(b: &[u8]) -> String {
    let mut h = Fnv::default();
    h.update(b);
    h.hex()
}

/// Raise RLIMIT_NOFILE's soft limit to the hard limit (thousands of
/// sockets in one process).
pub fn raise_nofile() {
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

/// Exit with a JSON error line if the tool is still running after
/// `deadline`: a hung write (no timeout of its own) must not hang a test.
pub fn watchdog(deadline: Duration, tool: &'static str) {
    if deadline.is_zero() {
        return;
    }
    std::thread::spawn(move || {
        std::thread::sleep(deadline);
        println!("{{\"event\":\"deadline\",\"ok\":false,\"error\":\"{tool}: still running after {} ms (hang)\"}}", deadline.as_millis());
        let _ = io::stdout().flush();
        std::process::exit(3);
    });
}

fn poll_fd(fd: RawFd, events: i16, timeout: Duration) -> io::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut pfd = libc::pollfd {
            fd,
            events,
            revents: 0,
        };
        let ms = left.as_millis().min(i32::MAX as u128) as i32;
        match unsafe { libc::poll(&mut pfd, 1, ms) } {
            0 => {
                let what = if events == libc::POLLIN {
                    "no data"
                } else {
                    "not writable"
                };
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("{what} within {} ms", timeout.as_millis()),
                ));
            }
            n if n < 0 => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            _ => return Ok(()),
        }
    }
}

/// A reader with a timeout on every read. EAGAIN → wait for readability,
/// retry; on a blocking socket each such EAGAIN is spurious and counted.
pub struct Reader<'a> {
    s: &'a TcpStream,
    timeout: Duration,
    blocking: bool,
    pub spurious_eagain: u64,
}

impl<'a> Reader<'a> {
    pub fn new(s: &'a TcpStream, timeout: Duration, blocking: bool) -> Self {
        Reader {
            s,
            timeout,
            blocking,
            spurious_eagain: 0,
        }
    }
}

impl Read for Reader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match (&mut &*self.s).read(buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if self.blocking {
                        self.spurious_eagain += 1;
                    }
                    poll_fd(self.s.as_raw_fd(), libc::POLLIN, self.timeout)?;
                }
                r => return r,
            }
        }
    }
}

/// `write` until all of `b` is written; EAGAIN → wait for writability.
/// Returns how many writes were short.
fn write_fully(s: &TcpStream, mut b: &[u8], timeout: Duration) -> io::Result<u64> {
    let mut short = 0;
    while !b.is_empty() {
        match (&mut &*s).write(b) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "write returned 0")),
            Ok(n) => {
                if n < b.len() {
                    short += 1;
                }
                b = &b[n..];
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                poll_fd(s.as_raw_fd(), libc::POLLOUT, timeout)?
            }
            Err(e) => return Err(e),
        }
    }
    Ok(short)
}

/// Cycles through a list of sizes (never 0).
struct Sizes<'a> {
    list: &'a [usize],
    i: usize,
}

impl<'a> Sizes<'a> {
    fn new(list: &'a [usize]) -> Self {
        Sizes { list, i: 0 }
    }

    fn next(&mut self) -> usize {
        if self.list.is_empty() {
            return 64 * 1024;
        }
        let n = self.list[self.i % self.list.len()].max(1);
        self.i += 1;
        n
    }
}

/// Sleep `pause` after every `every` chunks (no pause when either is 0).
struct Pacer {
    pause: Duration,
    every: usize,
    n: usize,
}

impl Pacer {
    fn tick(&mut self) {
        self.n += 1;
        if !self.pause.is_zero() && self.every > 0 && self.n.is_multiple_of(self.every) {
            std::thread::sleep(self.pause);
        }
    }
}

fn errno_of(e: &io::Error) -> Option<i32> {
    e.raw_os_error()
}

fn connect(dst: SocketAddr, bind: Option<IpAddr>, timeout: Duration) -> io::Result<TcpStream> {
    let s = Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP))?;
    if let Some(src) = bind {
        if dst.is_ipv6() {
            s.set_freebind_ipv6(true)?;
        } else {
            s.set_freebind(true)?;
        }
        s.bind(&SocketAddr::new(src, 0).into())?;
    }
    s.connect_timeout(&dst.into(), timeout)?;
    Ok(s.into())
}

/// Close with SO_LINGER {on, 0}: the kernel sends RST instead of FIN.
fn close_rst(s: TcpStream) {
    let s = Socket::from(s);
    let _ = s.set_linger(Some(Duration::ZERO));
    drop(s);
}

// ----------------------------------------------------------------- xfer

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SendMode {
    /// write(2) in the given chunk sizes
    Write,
    /// sendfile(2) from a file holding the payload
    Sendfile,
    /// splice(2) file → pipe → socket
    Splice,
    /// write, sendfile, splice in turn, chunk by chunk
    Mixed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Expect {
    /// the peer echoes: read it all back (concurrently) and compare
    Echo,
    /// the peer answers "<bytes> <hash>" after our EOF
    Hash,
    /// nothing comes back (send, then end)
    None,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum End {
    /// shutdown(SHUT_WR) after the payload, keep reading to EOF
    Shutdown,
    /// close(2) right after the last write
    Close,
    /// SO_LINGER 0 + close(2): RST
    Rst,
}

#[derive(Clone, Debug)]
pub struct XferOpts {
    pub dst: SocketAddr,
    pub bind: Option<IpAddr>,
    pub size: usize,
    pub send: SendMode,
    pub chunks: Vec<usize>,
    pub pause: Duration,
    pub pause_every: usize,
    pub read_chunks: Vec<usize>,
    pub expect: Expect,
    pub end: End,
    pub nonblock: bool,
    pub sndbuf: Option<usize>,
    /// Wait this long before the first read.
    pub read_delay: Duration,
    /// With `--end close|rst`: wait this long after the last write.
    pub close_delay: Duration,
    pub timeout: Duration,
}

/// What one `xfer` connection saw, one JSON line.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct XferReport {
    pub ok: bool,
    pub error: Option<String>,
    pub sent: u64,
    pub sent_hash: String,
    pub received: u64,
    pub recv_hash: String,
    /// `--expect hash`: the peer's answer line.
    pub reply: Option<String>,
    /// The last read returned 0.
    pub eof: bool,
    pub read_error: Option<String>,
    pub read_errno: Option<i32>,
    pub write_error: Option<String>,
    pub write_errno: Option<i32>,
    pub short_writes: u64,
    pub spurious_eagain: u64,
    /// From connected to the last write done.
    pub write_ms: u64,
    pub elapsed_ms: u64,
}

/// The sending half of `xfer`: the payload in chunks, by write, sendfile
/// or splice (or each in turn), with pauses.
fn send_payload(s: &TcpStream, data: &[u8], o: &XferOpts) -> io::Result<u64> {
    let mut sizes = Sizes::new(&o.chunks);
    let mut pacer = Pacer {
        pause: o.pause,
        every: o.pause_every,
        n: 0,
    };
    let file = if o.send == SendMode::Write {
        None
    } else {
        Some(payload_file(data)?)
    };
    let pipe = if matches!(o.send, SendMode::Splice | SendMode::Mixed) {
        Some(pipe()?)
    } else {
        None
    };
    let mut short = 0;
    let mut off = 0;
    let mut i = 0;
    while off < data.len() {
        let n = sizes.next().min(data.len() - off);
        let mode = match o.send {
            SendMode::Mixed => [SendMode::Write, SendMode::Sendfile, SendMode::Splice][i % 3],
            m => m,
        };
        short += match mode {
            SendMode::Sendfile => {
                sendfile_chunk(s, file.as_ref().expect("file"), off, n, o.timeout)?
            }
            SendMode::Splice => splice_chunk(
                s,
                file.as_ref().expect("file"),
                pipe.as_ref().expect("pipe"),
                off,
                n,
                o.timeout,
            )?,
            _ => write_fully(s, &data[off..off + n], o.timeout)?,
        };
        off += n;
        i += 1;
        pacer.tick();
    }
    Ok(short)
}

/// sendfile(2) of file bytes [off, off+n) to the socket.
fn sendfile_chunk(
    s: &TcpStream,
    file: &std::fs::File,
    off: usize,
    n: usize,
    timeout: Duration,
) -> io::Result<u64> {
    let (ffd, sfd) = (file.as_raw_fd(), s.as_raw_fd());
    let mut pos = off as libc::off_t;
    let mut left = n;
    let mut short = 0;
    while left > 0 {
        let k = to_socket(sfd, timeout, "sendfile", || unsafe {
            libc::sendfile(sfd, ffd, &mut pos, left)
        })?;
        if (k as usize) < left {
            short += 1;
        }
        left -= k as usize;
    }
    Ok(short)
}

/// One call that moves bytes into socket `sfd` (sendfile, splice), retried
/// on EINTR and, after waiting for POLLOUT, on EAGAIN; the bytes moved (> 0).
fn to_socket(
    sfd: i32,
    timeout: Duration,
    what: &str,
    mut call: impl FnMut() -> isize,
) -> io::Result<usize> {
    loop {
        let k = call();
        if k > 0 {
            return Ok(k as usize);
        }
        if k == 0 {
            return Err(io::Error::other(format!(
                "{what} returned 0 before the end of the data"
            )));
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::Interrupted => {}
            io::ErrorKind::WouldBlock => poll_fd(sfd, libc::POLLOUT, timeout)?,
            _ => return Err(io::Error::new(e.kind(), format!("{what}: {e}"))),
        }
    }
}

/// splice(2) file bytes [off, off+n) into the pipe, then pipe → socket
/// (at most the pipe's capacity at a time).
fn splice_chunk(
    s: &TcpStream,
    file: &std::fs::File,
    (pr, pw): &(OwnedFd, OwnedFd),
    off: usize,
    n: usize,
    timeout: Duration,
) -> io::Result<u64> {
    let (ffd, sfd) = (file.as_raw_fd(), s.as_raw_fd());
    let mut pos = off as libc::off_t;
    let end = (off + n) as libc::off_t;
    let mut short = 0;
    while pos < end {
        let want = (end - pos) as usize;
        let got = unsafe {
            libc::splice(
                ffd,
                &mut pos,
                pw.as_raw_fd(),
                std::ptr::null_mut(),
                want,
                libc::SPLICE_F_MOVE,
            )
        };
        if got < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(io::Error::new(e.kind(), format!("splice file→pipe: {e}")));
        }
        if got == 0 {
            return Err(io::Error::other("splice file→pipe: unexpected end of file"));
        }
        if (got as usize) < want {
            short += 1;
        }
        let mut in_pipe = got as usize;
        while in_pipe > 0 {
            let k = to_socket(sfd, timeout, "splice pipe→socket", || unsafe {
                libc::splice(
                    pr.as_raw_fd(),
                    std::ptr::null_mut(),
                    sfd,
                    std::ptr::null_mut(),
                    in_pipe,
                    libc::SPLICE_F_MOVE,
                )
            })?;
            if (k as usize) < in_pipe {
                short += 1;
            }
            in_pipe -= k as usize;
        }
    }
    Ok(short)
}

/// The payload in an unlinked regular file (what sendfile/splice read).
fn payload_file(data: &[u8]) -> io::Result<std::fs::File> {
    let path = std::env::temp_dir().join(crate::sandbox::unique("redirect-kit-xfer-"));
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)?;
    let _ = std::fs::remove_file(&path);
    f.write_all(data)?;
    f.flush()?;
    Ok(f)
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Read until EOF or error in `read_chunks`-sized reads, hashing; keeps
/// the bytes when `keep` (for a short answer line).
struct ReadResult {
    bytes: u64,
    hash: String,
    kept: Vec<u8>,
    eof: bool,
    error: Option<io::Error>,
    spurious_eagain: u64,
}

fn read_all(
    s: &TcpStream,
    chunks: &[usize],
    timeout: Duration,
    blocking: bool,
    keep: bool,
) -> ReadResult {
    let mut r = Reader::new(s, timeout, blocking);
    let mut sizes = Sizes::new(chunks);
    let mut buf = vec![0u8; chunks.iter().copied().max().unwrap_or(64 * 1024).max(1)];
    let mut h = Fnv::default();
    let mut out = ReadResult {
        bytes: 0,
        hash: String::new(),
        kept: Vec::new(),
        eof: false,
        error: None,
        spurious_eagain: 0,
    };
    loop {
        let n = sizes.next().min(buf.len());
        match r.read(&mut buf[..n]) {
            Ok(0) => {
                out.eof = true;
                break;
            }
            Ok(k) => {
                h.update(&buf[..k]);
                out.bytes += k as u64;
                if keep && out.kept.len() < 4096 {
                    out.kept.extend_from_slice(&buf[..k]);
                }
            }
            Err(e) => {
                out.error = Some(e);
                break;
            }
        }
    }
    out.hash = h.hex();
    out.spurious_eagain = r.spurious_eagain;
    out
}

/// One connection: send `size` bytes of the kit's deterministic payload as
/// asked, end it as asked, check what comes back.
pub fn xfer(o: &XferOpts) -> XferReport {
    let start = Instant::now();
    let data = payload(o.size);
    let mut rep = XferReport {
        sent_hash: hash(&data),
        ..XferReport::default()
    };
    let s = match connect(o.dst, o.bind, o.timeout) {
        Ok(s) => s,
        Err(e) => {
            rep.error = Some(format!("connect {}: {e}", o.dst));
            return rep;
        }
    };
    if let Some(n) = o.sndbuf {
        let _ = socket2::SockRef::from(&s).set_send_buffer_size(n);
    }
    if o.nonblock {
        if let Err(e) = s.set_nonblocking(true) {
            rep.error = Some(format!("O_NONBLOCK: {e}"));
            return rep;
        }
    }
    let reads = o.expect != Expect::None;
    let connected = Instant::now();
    let ((wres, write_ms), rres) = std::thread::scope(|scope| {
        let writer = scope.spawn(|| {
            let r = send_payload(&s, &data, o);
            let took = connected.elapsed().as_millis() as u64;
            if r.is_ok() && o.end == End::Shutdown {
                return (s.shutdown(Shutdown::Write).map(|_| r.unwrap_or(0)), took);
            }
            (r, took)
        });
        let rres = if reads {
            std::thread::sleep(o.read_delay);
            Some(read_all(
                &s,
                &o.read_chunks,
                o.timeout,
                !o.nonblock,
                o.expect == Expect::Hash,
            ))
        } else {
            None
        };
        (writer.join().expect("writer thread"), rres)
    });
    rep.write_ms = write_ms;
    match wres {
        Ok(short) => {
            rep.sent = data.len() as u64;
            rep.short_writes = short;
        }
        Err(e) => {
            rep.write_errno = errno_of(&e);
            rep.write_error = Some(e.to_string());
        }
    }
    if let Some(r) = rres {
        rep.received = r.bytes;
        rep.recv_hash = r.hash;
        rep.eof = r.eof;
        rep.spurious_eagain = r.spurious_eagain;
        if let Some(e) = &r.error {
            rep.read_errno = errno_of(e);
            rep.read_error = Some(e.to_string());
        }
        if o.expect == Expect::Hash {
            rep.reply = Some(String::from_utf8_lossy(&r.kept).trim_end().to_string());
        }
    }
    match o.end {
        End::Shutdown => drop(s),
        End::Close => {
            std::thread::sleep(o.close_delay);
            drop(s)
        }
        End::Rst => {
            std::thread::sleep(o.close_delay);
            close_rst(s)
        }
    }
    rep.ok = rep.write_error.is_none()
        && rep.read_error.is_none()
        && match o.expect {
            Expect::Echo => rep.eof && rep.received == rep.sent && rep.recv_hash == rep.sent_hash,
            Expect::Hash => {
                rep.eof
                    && rep.reply.as_deref()
                        == Some(format!("{} {}", rep.sent, rep.sent_hash).as_str())
            }
            Expect::None => true,
        };
    if !rep.ok && rep.error.is_none() {
        rep.error = Some(
            rep.write_error
                .clone()
                .or_else(|| rep.read_error.clone())
                .unwrap_or_else(|| {
                    format!(
                        "mismatch: sent {} bytes ({}), got {} ({}), eof {}, reply {:?}",
                        rep.sent, rep.sent_hash, rep.received, rep.recv_hash, rep.eof, rep.reply
                    )
                }),
        );
    }
    rep.elapsed_ms = start.elapsed().as_millis() as u64;
    rep
}

// -------------------------------------------------------- stress-server

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Reply {
    /// echo every byte back, in `write_chunks` pieces with pauses
    Echo,
    /// after the client's EOF, answer "<bytes> <hash>\n"
    Hash,
    /// send nothing
    None,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ServerEnd {
    /// normal close (FIN)
    Close,
    /// SO_LINGER 0 close (RST) right after the reply
    Rst,
}

#[derive(Clone, Debug)]
pub struct ServerOpts {
    pub listen: Vec<SocketAddr>,
    pub reply: Reply,
    pub read_chunks: Vec<usize>,
    pub write_chunks: Vec<usize>,
    pub pause: Duration,
    pub pause_every: usize,
    /// Wait this long after accepting before the first read.
    pub read_delay: Duration,
    /// Stop reading after this many bytes (0: read to EOF), then end the
    /// connection (end "limit"), leaving the rest unread.
    pub read_limit: u64,
    /// Before reading, peek (MSG_PEEK) until this many bytes are there,
    /// waiting on an edge-triggered epoll as Envoy's listener filters
    /// (tls_inspector, http_inspector) do; then check the read bytes
    /// equal the peeked ones.
    pub peek: usize,
    pub end: ServerEnd,
    pub timeout: Duration,
}

/// What the server saw on one connection, one JSON line.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct ServerConnReport {
    pub event: String,
    pub peer: String,
    pub local: String,
    pub bytes: u64,
    pub hash: String,
    /// "eof", "error" or "limit" (stopped reading at --read-limit).
    pub end: String,
    pub error: Option<String>,
    pub errno: Option<i32>,
    pub write_error: Option<String>,
    pub spurious_eagain: u64,
    /// `--peek`: bytes peeked, how many peeks it took, and whether the
    /// bytes then read were the same.
    pub peeked: Option<u64>,
    pub peeks: Option<u64>,
    pub peek_matches: Option<bool>,
}

/// Peek until `n` bytes are queued (or EOF), waiting for each new edge of
/// an edge-triggered epoll in between: returns the peeked bytes and the
/// number of peeks.
fn peek_first(c: &TcpStream, n: usize, timeout: Duration) -> io::Result<(Vec<u8>, u64)> {
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if ep < 0 {
        return Err(io::Error::last_os_error());
    }
    let ep = unsafe { OwnedFd::from_raw_fd(ep) };
    ctl(
        ep.as_raw_fd(),
        libc::EPOLL_CTL_ADD,
        c.as_raw_fd(),
        (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLET) as u32,
    )?;
    let mut buf = vec![0u8; n];
    let mut peeks = 0;
    loop {
        let k = unsafe {
            libc::recv(
                c.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                n,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        peeks += 1;
        if k < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::WouldBlock && e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        } else if k as usize >= n || k == 0 {
            buf.truncate(k as usize);
            return Ok((buf, peeks));
        }
        let mut ev = [libc::epoll_event { events: 0, u64: 0 }];
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        match unsafe { libc::epoll_wait(ep.as_raw_fd(), ev.as_mut_ptr(), 1, ms) } {
            0 => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "peek: no new data within {} ms (had {k} of {n} bytes)",
                        timeout.as_millis()
                    ),
                ))
            }
            r if r < 0 => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            _ => {}
        }
    }
}

/// Thread-per-connection server with small reads, odd-sized writes and
/// pauses; prints one [`ServerConnReport`] line per connection.
pub fn stress_server(o: ServerOpts) -> io::Result<()> {
    raise_nofile();
    let o = Arc::new(o);
    let mut threads = Vec::new();
    for a in &o.listen {
        let l =
            listen(*a).map_err(|e| io::Error::new(e.kind(), format!("listening on {a}: {e}")))?;
        let o = o.clone();
        threads.push(std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                let o = o.clone();
                std::thread::spawn(move || serve(c, &o));
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

fn serve(c: TcpStream, o: &ServerOpts) {
    let mut rep = ServerConnReport {
        event: "conn".into(),
        peer: c.peer_addr().map(|a| a.to_string()).unwrap_or_default(),
        local: c.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        ..ServerConnReport::default()
    };
    std::thread::sleep(o.read_delay);
    let mut peeked = None;
    if o.peek > 0 {
        match peek_first(&c, o.peek, o.timeout) {
            Ok((b, n)) => {
                rep.peeked = Some(b.len() as u64);
                rep.peeks = Some(n);
                peeked = Some(b);
            }
            Err(e) => {
                rep.errno = errno_of(&e);
                rep.error = Some(e.to_string());
                rep.end = "error".into();
                println!("{}", serde_json::to_string(&rep).expect("serializable"));
                let _ = io::stdout().flush();
                return;
            }
        }
    }
    let mut head: Vec<u8> = Vec::new();
    let mut r = Reader::new(&c, o.timeout, true);
    let mut rsizes = Sizes::new(&o.read_chunks);
    let mut wsizes = Sizes::new(&o.write_chunks);
    let mut pacer = Pacer {
        pause: o.pause,
        every: o.pause_every,
        n: 0,
    };
    let mut buf = vec![
        0u8;
        o.read_chunks
            .iter()
            .copied()
            .max()
            .unwrap_or(64 * 1024)
            .max(1)
    ];
    let mut h = Fnv::default();
    let mut eof = false;
    let mut limited = false;
    loop {
        let mut n = rsizes.next().min(buf.len());
        if o.read_limit > 0 {
            n = n.min((o.read_limit - rep.bytes) as usize);
            if n == 0 {
                limited = true;
                break;
            }
        }
        match r.read(&mut buf[..n]) {
            Ok(0) => {
                eof = true;
                break;
            }
            Ok(k) => {
                h.update(&buf[..k]);
                rep.bytes += k as u64;
                if let Some(p) = &peeked {
                    if head.len() < p.len() {
                        let take = k.min(p.len() - head.len());
                        head.extend_from_slice(&buf[..take]);
                    }
                }
                if o.reply == Reply::Echo && rep.write_error.is_none() {
                    let mut off = 0;
                    while off < k {
                        let w = wsizes.next().min(k - off);
                        if let Err(e) = write_fully(&c, &buf[off..off + w], o.timeout) {
                            rep.write_error = Some(e.to_string());
                            break;
                        }
                        off += w;
                        pacer.tick();
                    }
                }
            }
            Err(e) => {
                rep.errno = errno_of(&e);
                rep.error = Some(e.to_string());
                break;
            }
        }
    }
    rep.hash = h.hex();
    if let Some(p) = &peeked {
        rep.peek_matches = Some(&head == p);
    }
    rep.end = if eof {
        "eof"
    } else if limited {
        "limit"
    } else {
        "error"
    }
    .into();
    rep.spurious_eagain = r.spurious_eagain;
    if eof {
        let answer = match o.reply {
            Reply::Hash => Some(format!("{} {}\n", rep.bytes, rep.hash)),
            _ => None,
        };
        if let Some(a) = answer {
            if let Err(e) = write_fully(&c, a.as_bytes(), o.timeout) {
                rep.write_error = Some(e.to_string());
            }
        }
    }
    match o.end {
        // close(2): FIN, or RST when data is left unread (as TCP does).
        ServerEnd::Close => drop(c),
        ServerEnd::Rst => close_rst(c),
    }
    println!("{}", serde_json::to_string(&rep).expect("serializable"));
    let _ = io::stdout().flush();
}

// ----------------------------------------------------------- epoll-echo

struct Conn {
    s: TcpStream,
    pending: Vec<u8>,
    read_eof: bool,
    echoed: u64,
}

/// Single-threaded epoll echo server on non-blocking sockets, edge- or
/// level-triggered (as an event-loop proxy like Envoy reads). Echoes until
/// the client's EOF, then shuts down and closes; with `close_after` > 0 it
/// closes first, once it has echoed that many bytes.
pub fn epoll_echo(addrs: &[SocketAddr], edge: bool, close_after: u64) -> io::Result<()> {
    raise_nofile();
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if ep < 0 {
        return Err(io::Error::last_os_error());
    }
    let ep = unsafe { OwnedFd::from_raw_fd(ep) };
    let mut listeners = HashMap::new();
    for a in addrs {
        let l =
            listen(*a).map_err(|e| io::Error::new(e.kind(), format!("listening on {a}: {e}")))?;
        l.set_nonblocking(true)?;
        ctl(
            ep.as_raw_fd(),
            libc::EPOLL_CTL_ADD,
            l.as_raw_fd(),
            libc::EPOLLIN as u32,
        )?;
        listeners.insert(l.as_raw_fd(), l);
    }
    println!("{{\"event\":\"ready\"}}");
    let _ = io::stdout().flush();
    let conn_events = if edge {
        (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32
    } else {
        libc::EPOLLIN as u32
    };
    let mut conns: HashMap<RawFd, Conn> = HashMap::new();
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = unsafe {
            libc::epoll_wait(ep.as_raw_fd(), events.as_mut_ptr(), events.len() as i32, -1)
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        for ev in &events[..n as usize] {
            let fd = ev.u64 as RawFd;
            if let Some(l) = listeners.get(&fd) {
                loop {
                    match l.accept() {
                        Ok((s, _)) => {
                            if s.set_nonblocking(true).is_err() {
                                continue;
                            }
                            let cfd = s.as_raw_fd();
                            if ctl(ep.as_raw_fd(), libc::EPOLL_CTL_ADD, cfd, conn_events).is_ok() {
                                conns.insert(
                                    cfd,
                                    Conn {
                                        s,
                                        pending: Vec::new(),
                                        read_eof: false,
                                        echoed: 0,
                                    },
                                );
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(_) => break, // EAGAIN (or EMFILE: retried on the next event)
                    }
                }
                continue;
            }
            let Some(c) = conns.get_mut(&fd) else {
                continue;
            };
            let done = service(c, &mut buf, close_after).unwrap_or(true);
            if done {
                let c = conns.remove(&fd).expect("present");
                let _ = ctl(ep.as_raw_fd(), libc::EPOLL_CTL_DEL, fd, 0);
                drop(c);
            } else if !edge {
                let want = if !c.pending.is_empty() {
                    libc::EPOLLOUT
                } else {
                    libc::EPOLLIN
                };
                let _ = ctl(ep.as_raw_fd(), libc::EPOLL_CTL_MOD, fd, want as u32);
            }
        }
    }
}

fn ctl(ep: RawFd, op: i32, fd: RawFd, events: u32) -> io::Result<()> {
    let mut ev = libc::epoll_event {
        events,
        u64: fd as u64,
    };
    if unsafe { libc::epoll_ctl(ep, op, fd, &mut ev) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Flush, then read until EAGAIN (or until a write would block). Ok(true)
/// when the connection is finished.
fn service(c: &mut Conn, buf: &mut [u8], close_after: u64) -> io::Result<bool> {
    loop {
        while !c.pending.is_empty() {
            match (&c.s).write(&c.pending) {
                Ok(n) => {
                    c.pending.drain(..n);
                    c.echoed += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        if c.read_eof || (close_after > 0 && c.echoed >= close_after) {
            let _ = c.s.shutdown(Shutdown::Write);
            return Ok(true);
        }
        let want = if close_after > 0 {
            buf.len().min((close_after - c.echoed) as usize)
        } else {
            buf.len()
        };
        match (&c.s).read(&mut buf[..want]) {
            Ok(0) => c.read_eof = true,
            Ok(n) => c.pending.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) => return Err(e),
        }
    }
}

// ---------------------------------------------------------------- churn

/// What `churn` or `fan` saw, one JSON line.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct ManyReport {
    pub event: String,
    pub ok: bool,
    /// `fan`: connections that were open at the same time.
    pub open: u64,
    /// Connections that completed every exchange.
    pub done: u64,
    pub failures: u64,
    /// The first few errors, with the connection number and step.
    pub errors: Vec<String>,
    pub spurious_eagain: u64,
    /// `churn --late-write`: what each step after the server's close saw,
    /// by outcome ("eof", "ok", "ECONNRESET", ...), counted.
    pub outcomes: std::collections::BTreeMap<String, u64>,
    pub elapsed_ms: u64,
}

struct Tally {
    done: AtomicU64,
    failures: AtomicU64,
    eagain: AtomicU64,
    errors: Mutex<Vec<String>>,
    outcomes: Mutex<std::collections::BTreeMap<String, u64>>,
}

impl Tally {
    fn new() -> Tally {
        Tally {
            done: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            eagain: AtomicU64::new(0),
            errors: Mutex::new(Vec::new()),
            outcomes: Mutex::new(Default::default()),
        }
    }

    fn outcome(&self, what: String) {
        *self.outcomes.lock().unwrap().entry(what).or_default() += 1;
    }

    fn fail(&self, what: String) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        let mut e = self.errors.lock().unwrap();
        if e.len() < 10 {
            e.push(what);
        }
    }

    fn report(&self, event: &str, start: Instant) -> ManyReport {
        let failures = self.failures.load(Ordering::Relaxed);
        ManyReport {
            event: event.into(),
            ok: failures == 0,
            open: 0,
            done: self.done.load(Ordering::Relaxed),
            failures,
            errors: self.errors.lock().unwrap().clone(),
            spurious_eagain: self.eagain.load(Ordering::Relaxed),
            outcomes: self.outcomes.lock().unwrap().clone(),
            elapsed_ms: start.elapsed().as_millis() as u64,
        }
    }
}

/// The message of connection `i`, round `r`: unique, `size` bytes.
fn message(i: u64, r: u64, size: usize) -> Vec<u8> {
    let mut m = format!("{i}:{r}:").into_bytes();
    let pad = payload(size.max(m.len()));
    m.extend_from_slice(&pad[m.len()..]);
    m
}

/// Write `msg`, read the same number of bytes back, compare.
fn exchange(
    s: &TcpStream,
    msg: &[u8],
    timeout: Duration,
    eagain: &AtomicU64,
) -> Result<(), String> {
    write_fully(s, msg, timeout).map_err(|e| format!("write: {e}"))?;
    let mut back = vec![0u8; msg.len()];
    let mut r = Reader::new(s, timeout, true);
    let res = r.read_exact(&mut back);
    eagain.fetch_add(r.spurious_eagain, Ordering::Relaxed);
    res.map_err(|e| format!("read: {e}"))?;
    if back != msg {
        return Err(format!("echo differs ({} bytes)", msg.len()));
    }
    Ok(())
}

/// How a read or write ended, as an outcome name.
fn outcome_of(r: &io::Result<usize>) -> String {
    match r {
        Ok(0) => "eof".into(),
        Ok(_) => "data".into(),
        Err(e) => match e.raw_os_error() {
            Some(libc::ECONNRESET) => "ECONNRESET".into(),
            Some(libc::EPIPE) => "EPIPE".into(),
            _ => format!("{:?}", e.kind()),
        },
    }
}

/// After the exchanges, with a server that closes first: the client
/// reads the server's EOF, writes 1 more byte (as a client reusing an
/// idle keep-alive connection the server just closed), then reads again.
/// Each step's outcome is tallied.
fn late_write(s: &TcpStream, timeout: Duration, second_after: Option<Duration>, t: &Tally) {
    let mut r = Reader::new(s, timeout, true);
    let mut b = [0u8; 16];
    let first = r.read(&mut b);
    t.outcome(format!("1 read after the exchange: {}", outcome_of(&first)));
    let w = (&mut &*s).write(b"x");
    t.outcome(format!(
        "2 late write: {}",
        if w.is_ok() {
            "ok".into()
        } else {
            outcome_of(&w)
        }
    ));
    let second = r.read(&mut b);
    t.outcome(format!(
        "3 read after the late write: {}",
        outcome_of(&second)
    ));
    t.eagain.fetch_add(r.spurious_eagain, Ordering::Relaxed);
    if let Some(d) = second_after {
        // By now the peer's answer to the late write (an RST) has arrived.
        std::thread::sleep(d);
        let w = (&mut &*s).write(b"y");
        t.outcome(format!(
            "4 second late write: {}",
            if w.is_ok() {
                "ok".into()
            } else {
                outcome_of(&w)
            }
        ));
    }
}

/// `count` short connections, `concurrency` at a time: connect, `rounds`
/// exchanges of `size` bytes, (`late_write`), close. Every read has
/// `timeout`.
pub fn churn(
    dst: SocketAddr,
    count: u64,
    concurrency: usize,
    size: usize,
    rounds: u64,
    late: Option<Option<Duration>>,
    timeout: Duration,
) -> ManyReport {
    raise_nofile();
    let start = Instant::now();
    let next = AtomicU64::new(0);
    let t = Tally::new();
    std::thread::scope(|scope| {
        for _ in 0..concurrency.max(1) {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    break;
                }
                let s = match TcpStream::connect_timeout(&dst, timeout) {
                    Ok(s) => s,
                    Err(e) => {
                        t.fail(format!("conn {i}: connect: {e}"));
                        continue;
                    }
                };
                let _ = s.set_nodelay(true);
                let mut ok = true;
                for r in 0..rounds {
                    if let Err(e) = exchange(&s, &message(i, r, size), timeout, &t.eagain) {
                        t.fail(format!("conn {i} round {r}: {e}"));
                        ok = false;
                        break;
                    }
                }
                if ok {
                    if let Some(second) = late {
                        late_write(&s, timeout, second, &t);
                    }
                    t.done.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    });
    t.report("done", start)
}

// ------------------------------------------------------------------ fan

/// `count` connections open at once (opened by `threads` threads), one
/// exchange of `size` bytes on each while all are open; prints a "ready"
/// line (with the tally so far) once every exchange is done, holds them
/// `hold` longer, then closes them all. Returns the final tally.
pub fn fan(
    dst: SocketAddr,
    count: u64,
    threads: usize,
    size: usize,
    hold: Duration,
    timeout: Duration,
) -> ManyReport {
    raise_nofile();
    let start = Instant::now();
    let threads = threads.max(1);
    let t = Tally::new();
    let opened = AtomicU64::new(0);
    let barrier = Barrier::new(threads);
    std::thread::scope(|scope| {
        for k in 0..threads {
            let (t, opened, barrier) = (&t, &opened, &barrier);
            scope.spawn(move || {
                let mine: Vec<u64> = (0..count)
                    .filter(|i| i % threads as u64 == k as u64)
                    .collect();
                let mut socks = Vec::with_capacity(mine.len());
                for &i in &mine {
                    match TcpStream::connect_timeout(&dst, timeout) {
                        Ok(s) => {
                            opened.fetch_add(1, Ordering::Relaxed);
                            socks.push((i, s));
                        }
                        Err(e) => t.fail(format!("conn {i}: connect: {e}")),
                    }
                }
                // Every connection is open before any data flows.
                barrier.wait();
                for (i, s) in &socks {
                    match exchange(s, &message(*i, 0, size), timeout, &t.eagain) {
                        Ok(()) => {
                            t.done.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => t.fail(format!("conn {i}: {e}")),
                    }
                }
                if barrier.wait().is_leader() {
                    let mut r = t.report("ready", start);
                    r.open = opened.load(Ordering::Relaxed);
                    println!("{}", serde_json::to_string(&r).expect("serializable"));
                    let _ = io::stdout().flush();
                    std::thread::sleep(hold);
                }
                barrier.wait();
                drop(socks);
            });
        }
    });
    let mut r = t.report("done", start);
    r.open = opened.load(Ordering::Relaxed);
    r
}

// ------------------------------------------------------------------ CLI

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

/// The stress tools as `redirect-kit` subcommands (flattened into its
/// tool list).
#[derive(clap::Subcommand)]
pub enum StressTool {
    /// One connection: send a payload by write/sendfile/splice in odd
    /// chunks with pauses, end it (shutdown, close, RST), check what comes
    /// back by hash; one JSON line.
    Xfer {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long)]
        bind: Option<IpAddr>,
        #[arg(long, default_value = "65536")]
        size: usize,
        #[arg(long, value_enum, default_value = "write")]
        send: SendMode,
        /// Chunk sizes, cycled (write/sendfile/splice calls).
        #[arg(long, value_delimiter = ',', default_value = "65536")]
        chunks: Vec<usize>,
        #[arg(long, default_value = "0")]
        pause_us: u64,
        /// Pause after every this many chunks.
        #[arg(long, default_value = "1")]
        pause_every: usize,
        /// Read buffer sizes, cycled.
        #[arg(long, value_delimiter = ',', default_value = "65536")]
        read_chunks: Vec<usize>,
        #[arg(long, value_enum, default_value = "echo")]
        expect: Expect,
        #[arg(long, value_enum, default_value = "shutdown")]
        end: End,
        /// Non-blocking socket (EAGAIN → poll).
        #[arg(long)]
        nonblock: bool,
        #[arg(long)]
        sndbuf: Option<usize>,
        #[arg(long, default_value = "0")]
        read_delay_ms: u64,
        #[arg(long, default_value = "0")]
        close_delay_ms: u64,
        /// Timeout of every read (and connect, and wait for writability).
        #[arg(long, default_value = "10000")]
        timeout_ms: u64,
        /// Exit with an error line if still running then (0: never).
        #[arg(long, default_value = "60000")]
        deadline_ms: u64,
    },
    /// Thread-per-connection server: small reads, odd writes, pauses;
    /// echo / hash answer / nothing; one JSON line per connection.
    StressServer {
        #[arg(long = "listen", required = true)]
        listen: Vec<SocketAddr>,
        #[arg(long, value_enum, default_value = "echo")]
        reply: Reply,
        #[arg(long, value_delimiter = ',', default_value = "65536")]
        read_chunks: Vec<usize>,
        #[arg(long, value_delimiter = ',', default_value = "65536")]
        write_chunks: Vec<usize>,
        #[arg(long, default_value = "0")]
        pause_us: u64,
        #[arg(long, default_value = "1")]
        pause_every: usize,
        #[arg(long, default_value = "0")]
        read_delay_ms: u64,
        /// Stop reading after this many bytes, then end (0: read to EOF).
        #[arg(long, default_value = "0")]
        read_limit: u64,
        /// First peek (MSG_PEEK, edge-triggered epoll) this many bytes.
        #[arg(long, default_value = "0")]
        peek: usize,
        #[arg(long, value_enum, default_value = "close")]
        end: ServerEnd,
        #[arg(long, default_value = "10000")]
        timeout_ms: u64,
    },
    /// Single-threaded epoll echo server, non-blocking sockets.
    EpollEcho {
        #[arg(long = "listen", required = true)]
        listen: Vec<SocketAddr>,
        /// Edge-triggered (EPOLLET) instead of level-triggered.
        #[arg(long)]
        edge: bool,
        /// Close each connection first once this many bytes are echoed.
        #[arg(long, default_value = "0")]
        close_after: u64,
    },
    /// Many short connections from one process: connect, exchange(s),
    /// close; one JSON line with the failures.
    Churn {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long, default_value = "1000")]
        count: u64,
        #[arg(long, default_value = "8")]
        concurrency: usize,
        #[arg(long, default_value = "32")]
        size: usize,
        /// Exchanges per connection.
        #[arg(long, default_value = "1")]
        rounds: u64,
        /// The server closes first (epoll-echo --close-after): read its
        /// EOF, write once more, read again; outcomes tallied.
        #[arg(long)]
        late_write: bool,
        /// With --late-write: this long after it, write once more.
        #[arg(long)]
        second_write_after_ms: Option<u64>,
        #[arg(long, default_value = "5000")]
        timeout_ms: u64,
        #[arg(long, default_value = "300000")]
        deadline_ms: u64,
    },
    /// Many connections open at once, one exchange each, held, closed.
    Fan {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long, default_value = "2000")]
        count: u64,
        #[arg(long, default_value = "16")]
        threads: usize,
        #[arg(long, default_value = "1000")]
        size: usize,
        #[arg(long, default_value = "0")]
        hold_ms: u64,
        #[arg(long, default_value = "10000")]
        timeout_ms: u64,
        #[arg(long, default_value = "120000")]
        deadline_ms: u64,
    },
}

fn print_json<T: serde::Serialize>(v: &T, ok: bool) -> std::process::ExitCode {
    println!("{}", serde_json::to_string(v).expect("serializable"));
    let _ = io::stdout().flush();
    if ok {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}

fn served(r: io::Result<()>) -> std::process::ExitCode {
    match r {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("redirect-kit: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

impl StressTool {
    pub fn run(self) -> std::process::ExitCode {
        match self {
            StressTool::Xfer {
                connect,
                bind,
                size,
                send,
                chunks,
                pause_us,
                pause_every,
                read_chunks,
                expect,
                end,
                nonblock,
                sndbuf,
                read_delay_ms,
                close_delay_ms,
                timeout_ms,
                deadline_ms,
            } => {
                watchdog(ms(deadline_ms), "xfer");
                let o = XferOpts {
                    dst: connect,
                    bind,
                    size,
                    send,
                    chunks,
                    pause: Duration::from_micros(pause_us),
                    pause_every,
                    read_chunks,
                    expect,
                    end,
                    nonblock,
                    sndbuf,
                    read_delay: ms(read_delay_ms),
                    close_delay: ms(close_delay_ms),
                    timeout: ms(timeout_ms),
                };
                let r = xfer(&o);
                let ok = r.ok;
                print_json(&r, ok)
            }
            StressTool::StressServer {
                listen,
                reply,
                read_chunks,
                write_chunks,
                pause_us,
                pause_every,
                read_delay_ms,
                read_limit,
                peek,
                end,
                timeout_ms,
            } => served(stress_server(ServerOpts {
                listen,
                reply,
                read_chunks,
                write_chunks,
                pause: Duration::from_micros(pause_us),
                pause_every,
                read_delay: ms(read_delay_ms),
                read_limit,
                peek,
                end,
                timeout: ms(timeout_ms),
            })),
            StressTool::EpollEcho {
                listen,
                edge,
                close_after,
            } => served(epoll_echo(&listen, edge, close_after)),
            StressTool::Churn {
                connect,
                count,
                concurrency,
                size,
                rounds,
                late_write,
                second_write_after_ms,
                timeout_ms,
                deadline_ms,
            } => {
                watchdog(ms(deadline_ms), "churn");
                let late = late_write.then(|| second_write_after_ms.map(ms));
                let r = churn(
                    connect,
                    count,
                    concurrency,
                    size,
                    rounds,
                    late,
                    ms(timeout_ms),
                );
                let ok = r.ok && r.done == count;
                print_json(&r, ok)
            }
            StressTool::Fan {
                connect,
                count,
                threads,
                size,
                hold_ms,
                timeout_ms,
                deadline_ms,
            } => {
                watchdog(ms(deadline_ms), "fan");
                let r = fan(connect, count, threads, size, ms(hold_ms), ms(timeout_ms));
                let ok = r.ok && r.done == count;
                print_json(&r, ok)
            }
        }
    }
}
