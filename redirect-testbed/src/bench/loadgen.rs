//! The benchmark's load generator, run as the app (uid 1000 in the pod):
//! one process per measurement, one JSON [`LoadResult`] line on stdout.
//!
//! * `rr`: one connection, closed loop: write `size` bytes, read them back.
//! * `unix`: the same over an AF_UNIX stream socket (abstract name
//!   `--unix`), the reference for the app↔proxy leg.
//! * `conn`: closed loop of connect + one 64 B exchange + close.
//! * `bulk`: one connection streaming to the sink for the duration; the
//!   sink's byte count at EOF marks the end.
//! * `open`: 64 B requests sent at a fixed rate on one connection (batched
//!   when late), each timed from its *scheduled* send time, so a stall shows
//!   up in every request it delays (no coordinated omission).
//!
//! Every sample after the warm-up goes into an HDR histogram (ns).

use std::{
    io::{self, Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use super::hist;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
pub enum Mode {
    Rr,
    Unix,
    Conn,
    Bulk,
    Open,
}

#[derive(Clone, Debug)]
pub struct LoadArgs {
    pub mode: Mode,
    pub target: SocketAddr,
    pub size: usize,
    pub duration: Duration,
    pub warmup: Duration,
    /// Requests per second (open loop).
    pub rate: u64,
    /// `unix` mode: the echo's abstract socket name (no leading NUL).
    pub unix: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LoadResult {
    /// Samples recorded after the warm-up.
    pub ops: u64,
    /// Connections made, warm-up included (what the capture counters see).
    pub conns: u64,
    /// Seconds measured (after the warm-up).
    pub elapsed_s: f64,
    /// ops / elapsed_s.
    pub rate: f64,
    /// Bulk: payload bytes measured and Gbit/s; CPU seconds: the whole
    /// machine's busy time over the measured window as the generator sees
    /// it, replaced by the runner with the benchmark processes' own time.
    pub bytes: u64,
    pub gbit_s: f64,
    pub cpu_s: f64,
    /// Bulk: every byte sent (warm-up included), and this process's own
    /// CPU time (user + system) over its whole life.
    pub total_bytes: u64,
    pub self_cpu_s: f64,
    /// Failed connects (conn mode carries on past them).
    pub errors: u64,
    pub error: Option<String>,
    pub hist: Vec<[u64; 2]>,
}

const TIMEOUT: Duration = Duration::from_secs(5);

fn connect(target: SocketAddr) -> io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&target, TIMEOUT)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(TIMEOUT))?;
    s.set_write_timeout(Some(TIMEOUT))?;
    Ok(s)
}

/// `read_exact` that retries a spurious `EAGAIN`: with sockmap
/// acceleration a blocking read woken by a packet on the normal path (a
/// FIN, data sent before pairing) can return it while the redirected queue
/// is empty (see docs/acceleration.md). A real timeout still fails.
fn read_full(s: &mut impl Read, buf: &mut [u8]) -> io::Result<()> {
    let start = Instant::now();
    let mut off = 0;
    while off < buf.len() {
        match s.read(&mut buf[off..]) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("peer closed after {off} of {} bytes", buf.len()),
                ))
            }
            Ok(n) => off += n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) && start.elapsed() < TIMEOUT => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn ns(d: Duration) -> u64 {
    d.as_nanos().min(u64::MAX as u128) as u64
}

pub fn run(a: &LoadArgs) -> LoadResult {
    let mut r = LoadResult::default();
    if let Err(e) = match a.mode {
        Mode::Rr => connect(a.target).and_then(|s| rr(s, a, &mut r)),
        Mode::Unix => unix_connect(a).and_then(|s| rr(s, a, &mut r)),
        Mode::Conn => conn(a, &mut r),
        Mode::Bulk => bulk(a, &mut r),
        Mode::Open => open(a, &mut r),
    } {
        r.error = Some(e.to_string());
    }
    if r.elapsed_s > 0.0 {
        r.rate = r.ops as f64 / r.elapsed_s;
    }
    r
}

fn unix_connect(a: &LoadArgs) -> io::Result<std::os::unix::net::UnixStream> {
    use std::os::linux::net::SocketAddrExt;
    let name = a
        .unix
        .as_deref()
        .ok_or_else(|| io::Error::other("unix mode needs --unix NAME"))?;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
    let s = std::os::unix::net::UnixStream::connect_addr(&addr)?;
    s.set_read_timeout(Some(TIMEOUT))?;
    s.set_write_timeout(Some(TIMEOUT))?;
    Ok(s)
}

/// Closed-loop request/response on one connected stream (TCP or AF_UNIX).
fn rr<S: Read + Write>(mut s: S, a: &LoadArgs, r: &mut LoadResult) -> io::Result<()> {
    let mut h = hist::new();
    r.conns = 1;
    let msg = vec![0x5au8; a.size];
    let mut back = vec![0u8; a.size];
    let start = Instant::now();
    let (measure, end) = (start + a.warmup, start + a.warmup + a.duration);
    let mut last = start;
    while last < end {
        let t0 = Instant::now();
        s.write_all(&msg)?;
        read_full(&mut s, &mut back)?;
        last = Instant::now();
        if t0 >= measure {
            h.saturating_record(ns(last - t0));
        }
    }
    r.ops = h.len();
    r.elapsed_s = (last - measure).as_secs_f64();
    r.hist = hist::to_buckets(&h);
    Ok(())
}

fn conn(a: &LoadArgs, r: &mut LoadResult) -> io::Result<()> {
    let mut h = hist::new();
    let msg = [0x5au8; 64];
    let mut back = [0u8; 64];
    let start = Instant::now();
    let (measure, end) = (start + a.warmup, start + a.warmup + a.duration);
    let mut last = start;
    let one = |back: &mut [u8; 64]| -> io::Result<()> {
        let mut s = connect(a.target)?;
        s.write_all(&msg)?;
        read_full(&mut s, back)
    };
    while last < end {
        let t0 = Instant::now();
        r.conns += 1;
        let res = one(&mut back);
        last = Instant::now();
        match res {
            Ok(()) if t0 >= measure => {
                h.saturating_record(ns(last - t0));
            }
            Ok(()) => {}
            Err(e) => {
                r.errors += 1;
                if r.errors > 100 {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("more than 100 failed connections, last: {e}"),
                    ));
                }
            }
        }
    }
    r.ops = h.len();
    r.elapsed_s = (last - measure).as_secs_f64();
    r.hist = hist::to_buckets(&h);
    Ok(())
}

/// Busy time of all CPUs, in seconds, from the first line of /proc/stat.
pub fn busy_cpu_s() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let busy: u64 = f
        .iter()
        .enumerate()
        .filter(|(i, _)| ![3, 4].contains(i) && *i < 8)
        .map(|(_, v)| v)
        .sum();
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    busy as f64 / hz
}

/// User + system time of this process (all threads).
fn self_cpu_s() -> f64 {
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn bulk(a: &LoadArgs, r: &mut LoadResult) -> io::Result<()> {
    let mut s = connect(a.target)?;
    r.conns = 1;
    let chunk = vec![0x5au8; 256 * 1024];
    let start = Instant::now();
    let (measure, end) = (start + a.warmup, start + a.warmup + a.duration);
    let (mut sent, mut warm) = (0u64, 0u64);
    let mut cpu0 = None;
    loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        if now >= measure && cpu0.is_none() {
            cpu0 = Some((now, busy_cpu_s()));
            warm = sent;
        }
        s.write_all(&chunk)?;
        sent += chunk.len() as u64;
    }
    s.shutdown(Shutdown::Write)?;
    let mut total = [0u8; 8];
    read_full(&mut s, &mut total)?;
    let (t1, c1) = (Instant::now(), busy_cpu_s());
    let total = u64::from_be_bytes(total);
    if total != sent {
        return Err(io::Error::other(format!(
            "sink received {total} bytes, {sent} sent"
        )));
    }
    let (t0, c0) = cpu0.unwrap_or((start, c1));
    r.bytes = sent - warm;
    r.elapsed_s = (t1 - t0).as_secs_f64();
    r.ops = 1;
    r.gbit_s = r.bytes as f64 * 8.0 / r.elapsed_s / 1e9;
    r.cpu_s = c1 - c0;
    r.total_bytes = sent;
    r.self_cpu_s = self_cpu_s();
    Ok(())
}

fn open(a: &LoadArgs, r: &mut LoadResult) -> io::Result<()> {
    const SIZE: usize = 64;
    let s = connect(a.target)?;
    r.conns = 1;
    let period = 1e9 / a.rate.max(1) as f64;
    let total = ((a.warmup + a.duration).as_secs_f64() * a.rate as f64) as u64;
    let warm_n = (a.warmup.as_secs_f64() * a.rate as f64) as u64;
    let mut reader = s.try_clone()?;
    let start = Instant::now();
    let sched = move |i: u64| start + Duration::from_nanos((i as f64 * period) as u64);
    let rd = std::thread::spawn(
        move || -> io::Result<(hdrhistogram::Histogram<u64>, Instant)> {
            let mut h = hist::new();
            let mut buf = [0u8; SIZE];
            let mut last = start;
            for i in 0..total {
                read_full(&mut reader, &mut buf)?;
                last = Instant::now();
                if i >= warm_n {
                    h.saturating_record(ns(last.saturating_duration_since(sched(i))));
                }
            }
            Ok((h, last))
        },
    );
    // The sender sleeps to each scheduled time (1 ns timer slack), then
    // sends everything due, in one write when it is late.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
    let batch = vec![0x5au8; SIZE * 1024];
    let mut w = &s;
    let mut sent = 0u64;
    while sent < total {
        let now = Instant::now();
        let due = sched(sent);
        if due > now {
            std::thread::sleep(due - now);
            continue;
        }
        let elapsed = now.duration_since(start).as_nanos() as f64;
        let due_n = ((elapsed / period) as u64 + 1).min(total).max(sent + 1);
        let k = (due_n - sent).min(1024) as usize;
        w.write_all(&batch[..k * SIZE])?;
        sent += k as u64;
    }
    let (h, last) = rd
        .join()
        .map_err(|_| io::Error::other("open-loop reader panicked"))??;
    r.ops = h.len();
    r.elapsed_s = last.saturating_duration_since(sched(warm_n)).as_secs_f64();
    r.hist = hist::to_buckets(&h);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_mode_measures_round_trips_through_an_abstract_echo() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("rdb-loadgen-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let l = std::os::unix::net::UnixListener::bind_addr(&addr).unwrap();
        let echo = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut b = [0u8; 64];
            while s.read_exact(&mut b).is_ok() {
                if s.write_all(&b).is_err() {
                    break;
                }
            }
        });
        let a = LoadArgs {
            mode: Mode::Unix,
            target: SocketAddr::from(([0, 0, 0, 0], 0)),
            size: 64,
            duration: Duration::from_millis(50),
            warmup: Duration::from_millis(10),
            rate: 0,
            unix: Some(name),
        };
        let r = run(&a);
        assert!(r.error.is_none(), "{:?}", r.error);
        assert_eq!(r.conns, 1);
        assert!(r.ops > 0 && r.rate > 0.0);
        assert_eq!(hist::from_buckets(&r.hist).len(), r.ops);
        echo.join().unwrap();
        // Without a name the mode fails with a message, not a panic.
        let r = run(&LoadArgs { unix: None, ..a });
        assert!(r.error.unwrap().contains("--unix"));
    }
}
