//! `redirect stats`
use std::{
    io::{IsTerminal, Write},
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::Result;
use redirect_userspace::{
    error::Error,
    pins::Pins,
    report,
    stats::{self, render, Listing, PodStats},
    sys,
};

#[derive(clap::Args)]
pub struct Args {
    /// Only this pod's counters.
    #[arg(long)]
    pub netns: Option<PathBuf>,
    /// Print the pods and their rows as JSON: count and bytes since the
    /// last --zero, count_total and bytes_total since capture.
    #[arg(long)]
    pub json: bool,
    /// List one chain, like `iptables --list CHAIN`: OUTPUT (or
    /// ISTIO_OUTPUT), PREROUTING (or ISTIO_INBOUND), ISTIO_REDIRECT,
    /// ISTIO_IN_REDIRECT, ORIGINAL_DST, ACCEL, ERRORS.
    #[arg(long, value_name = "CHAIN")]
    pub chain: Option<String>,
    /// Zero the counters `stats` shows, like `iptables -Z`: of every pod,
    /// or of --netns's, and only --chain's rows with --chain. The kernel
    /// counters are not touched: /metrics and --json's count_total and
    /// bytes_total keep counting.
    #[arg(long, conflicts_with = "json")]
    pub zero: bool,
    /// Redraw every SECS seconds (default 2), highlighting what changed
    /// since the last draw, like `watch -d`; Ctrl-C ends it.
    #[arg(
        long,
        value_name = "SECS",
        num_args = 0..=1,
        default_missing_value = "2",
        conflicts_with = "json"
    )]
    pub watch: Option<String>,
}

pub fn run(pin_dir: &Path, a: Args) -> Result<()> {
    // Everything is checked before anything is read or zeroed.
    let listing = match &a.chain {
        Some(c) => Listing::parse(c)?,
        None => Listing::All,
    };
    let every = a.watch.as_deref().map(watch_interval).transpose()?;
    // The pins are root-only: without privileges they look absent.
    sys::check_privileges()?;
    let only = match &a.netns {
        Some(p) => Some(sys::Netns::open(p)?.cookie()?),
        None => None,
    };
    let pins = Pins::new(pin_dir);
    let st = stats::read(&pins, None)?;
    let pods = pick(st.pods, only, a.netns.as_deref())?;
    if a.zero {
        stats::zero(&pins, &pods, &listing, stats::unix_now())?;
        if every.is_none() {
            if pods.is_empty() {
                println!("no captured pods: nothing to zero");
            }
            for p in &pods {
                println!(
                    "zeroed {}{} (netns cookie {})",
                    match &a.chain {
                        Some(c) => format!("chain {} of ", c.to_ascii_uppercase()),
                        None => String::new(),
                    },
                    p.netns.as_deref().unwrap_or("<no path found>"),
                    p.netns_cookie
                );
            }
        }
    }
    if let Some(secs) = every {
        return watch(&pins, only, a.netns.as_deref(), &listing, secs, &a);
    }
    if a.zero {
        return Ok(());
    }
    if a.json {
        let pods: Vec<PodStats> = pods.into_iter().map(|p| listing.filter(p)).collect();
        println!("{}", serde_json::to_string_pretty(&pods)?);
    } else {
        print!(
            "{}",
            render::render(&pods, &listing, None, stats::unix_now())
        );
    }
    if let Some(e) = &st.baseline_error {
        eprintln!("redirect: warning: the counters are shown as never zeroed: {e}");
    }
    // The counts above are short by this much: say so, on stderr so the
    // JSON stays a list of pods (`status --json` has `counters_lost`).
    if st.counters_lost > 0 {
        eprintln!(
            "redirect: warning: {}",
            report::counters_lost_warning(st.counters_lost)
        );
    }
    Ok(())
}

/// The pods shown: all, or the one of `--netns` (an error listing the
/// captured pods when it is not one of them).
fn pick(pods: Vec<PodStats>, only: Option<u64>, netns: Option<&Path>) -> Result<Vec<PodStats>> {
    let (Some(cookie), Some(path)) = (only, netns) else {
        return Ok(pods);
    };
    if !pods.iter().any(|p| p.netns_cookie == cookie) {
        return Err(stats::not_captured(path, &pods).into());
    }
    Ok(pods
        .into_iter()
        .filter(|p| p.netns_cookie == cookie)
        .collect())
}

/// `--watch` seconds: a number from 0.1 to 86400.
fn watch_interval(v: &str) -> Result<f64, Error> {
    match v.trim().parse::<f64>() {
        Ok(s) if (0.1..=86_400.0).contains(&s) => Ok(s),
        _ => Err(Error::InvalidFlag {
            field: "--watch".into(),
            value: v.to_string(),
            reason: "expected seconds between redraws, a number from 0.1 to 86400".into(),
        }),
    }
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// The terminal as it was, whatever ends the watch (Ctrl-C, an error).
struct Screen(bool);

impl Drop for Screen {
    fn drop(&mut self) {
        if self.0 {
            let mut out = std::io::stdout();
            let _ = out.write_all(render::SCREEN_LEAVE.as_bytes());
            let _ = out.flush();
        }
    }
}

/// Redraw every `secs` until Ctrl-C (SIGINT) or SIGTERM: in place with the
/// changes highlighted on a terminal, frame after frame otherwise.
fn watch(
    pins: &Pins,
    only: Option<u64>,
    netns: Option<&Path>,
    listing: &Listing,
    secs: f64,
    a: &Args,
) -> Result<()> {
    unsafe {
        libc::signal(libc::SIGINT, on_stop as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_stop as *const () as libc::sighandler_t);
    }
    let tty = std::io::stdout().is_terminal();
    let mut command = String::from("redirect stats");
    if let Some(c) = &a.chain {
        command.push_str(&format!(" --chain {c}"));
    }
    if let Some(n) = netns {
        command.push_str(&format!(" --netns {}", n.display()));
    }
    let mut out = std::io::stdout();
    if tty {
        out.write_all(render::SCREEN_ENTER.as_bytes())?;
    }
    let _screen = Screen(tty);
    let mut before: Option<render::Drawn> = None;
    while !STOP.load(Ordering::SeqCst) {
        let st = stats::read(pins, None)?;
        let pods = pick(st.pods, only, netns)?;
        let body = render::render(
            &pods,
            listing,
            before.as_ref().filter(|_| tty),
            stats::unix_now(),
        );
        let header = format!("Every {secs}s: {command}    {}", clock());
        let size = if tty { Some(terminal_size()) } else { None };
        out.write_all(render::frame(&header, &body, size).as_bytes())?;
        out.flush()?;
        before = Some(render::drawn(&pods));
        let until = Instant::now() + Duration::from_secs_f64(secs);
        while !STOP.load(Ordering::SeqCst) && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(())
}

/// Local time of day, HH:MM:SS.
fn clock() -> String {
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    let t = unsafe { libc::time(std::ptr::null_mut()) };
    if unsafe { libc::localtime_r(&t, &mut tm) }.is_null() {
        return String::new();
    }
    format!("{:02}:{:02}:{:02}", tm.tm_hour, tm.tm_min, tm.tm_sec)
}

/// Rows and columns of the terminal on stdout (24x80 when it won't say).
fn terminal_size() -> (usize, usize) {
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    let ok = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut ws) } == 0;
    if ok && ws.ws_row > 0 && ws.ws_col > 0 {
        (ws.ws_row as usize, ws.ws_col as usize)
    } else {
        (24, 80)
    }
}
