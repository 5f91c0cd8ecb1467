//! `redirect trace`
use std::{
    io::Write,
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::Result;
use redirect_userspace::{
    explain,
    maps::Maps,
    pins::Pins,
    sys,
    trace::{self, Decoder, Filter, LostCounter, Selection, TraceLine, Tracer},
    wire::{self, CallError, ErrorKind, Request},
};

#[derive(clap::Args)]
pub struct Args {
    /// Only this pod's network namespace (default: every captured pod).
    #[arg(long, value_name = "PATH")]
    pub netns: Option<PathBuf>,
    /// Only this pod, as the agent recorded it: <namespace>/<name>.
    #[arg(long, value_name = "NS/NAME", conflicts_with = "netns")]
    pub pod: Option<String>,
    /// One JSON object per line.
    #[arg(long)]
    pub json: bool,
    /// Only decisions of this rule (`captured`, `OUTPUT/skip_proxy_uid`),
    /// chain (`PREROUTING`) or target (`REDIRECT`); repeat for several.
    #[arg(long = "rule", value_name = "RULE")]
    pub rules: Vec<String>,
    /// Only connections to this original destination: ADDR or ADDR:PORT.
    #[arg(long, value_name = "ADDR[:PORT]")]
    pub dst: Option<String>,
    /// Stop after this many lines.
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,
    #[command(flatten)]
    pub agent: super::AgentArgs,
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Prints the lines and counts them.
struct Out {
    json: bool,
    shown: u64,
    count: Option<u64>,
    lost: u64,
}

impl Out {
    /// Print one line; false when the output is gone or the count reached.
    fn line(&mut self, l: &TraceLine) -> bool {
        if let Some(n) = l.lost {
            self.lost += n;
        }
        let text = if self.json {
            serde_json::to_string(l).expect("lines serialize")
        } else {
            trace::render(l)
        };
        let mut out = std::io::stdout().lock();
        if writeln!(out, "{text}").and_then(|()| out.flush()).is_err() {
            return false;
        }
        if l.lost.is_none() {
            self.shown += 1;
        }
        self.count.is_none_or(|c| self.shown < c)
    }
}

pub fn run(pin_dir: &Path, a: Args) -> Result<()> {
    let filter = Filter {
        rules: a.rules.clone(),
        dst: a.dst.clone(),
    };
    filter.check()?;
    if a.count == Some(0) {
        anyhow::bail!("invalid --count value '0': expected 1 or more lines");
    }
    unsafe {
        libc::signal(libc::SIGINT, on_stop as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_stop as *const () as libc::sighandler_t);
        // `redirect trace | head`: stop cleanly (switch off) on EPIPE.
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
    let mut out = Out {
        json: a.json,
        shown: 0,
        count: a.count,
        lost: 0,
    };
    if !via_agent(pin_dir, &a, &filter, &mut out)? {
        direct(pin_dir, &a, &filter, &mut out)?;
    }
    if !a.json {
        eprintln!(
            "redirect trace: {} lines shown{}",
            out.shown,
            if out.lost > 0 {
                format!(", {} events lost", out.lost)
            } else {
                String::new()
            }
        );
    }
    Ok(())
}

/// Through the agent: false when there is none for this install.
fn via_agent(pin_dir: &Path, a: &Args, filter: &Filter, out: &mut Out) -> Result<bool> {
    if a.agent.no_agent || !a.agent.agent_socket.exists() {
        return Ok(false);
    }
    let req = Request::Trace {
        netns: a.netns.clone(),
        pod: a.pod.clone(),
        filter: filter.clone(),
        pin_dir: Some(pin_dir.to_path_buf()),
    };
    let (reply, mut stream) = match wire::open_trace(
        &a.agent.agent_socket,
        &req,
        Duration::from_secs(10),
        Duration::from_millis(200),
    ) {
        Ok(x) => x,
        Err(CallError::Refused(e))
            if matches!(e.kind, ErrorKind::OtherInstall | ErrorKind::BadRequest) =>
        {
            tracing::debug!("not through the agent: {e}");
            return Ok(false);
        }
        Err(CallError::Unreachable(why)) => {
            tracing::debug!("no agent: {why}");
            return Ok(false);
        }
        Err(CallError::Refused(e)) => anyhow::bail!("{}", e.message),
        Err(e) => return Err(e.into()),
    };
    if !a.json {
        eprintln!(
            "tracing {} through the agent (pid {}) at {}; Ctrl-C to stop",
            reply.tracing.join(", "),
            reply.reader_pid,
            a.agent.agent_socket.display()
        );
    }
    while !STOP.load(Ordering::SeqCst) {
        match stream.next_line() {
            Ok(Some(l)) => {
                if !out.line(&l) {
                    break;
                }
            }
            Ok(None) => {}
            Err(e) => anyhow::bail!("{e}"),
        }
    }
    Ok(true)
}

/// Reading the install's events here.
fn direct(pin_dir: &Path, a: &Args, filter: &Filter, out: &mut Out) -> Result<()> {
    sys::check_privileges()?;
    let pins = Pins::new(pin_dir);
    let (selection, what) = if a.netns.is_none() && a.pod.is_none() {
        (Selection::All, "every captured pod".to_string())
    } else {
        let maps = Maps::open(&pins)?;
        let t = explain::target(&pins, &maps, a.netns.as_deref(), a.pod.as_deref())?;
        let name = t.pod.or(t.netns).unwrap_or_else(|| "the pod".to_string());
        (
            Selection::Pods([t.cookie].into()),
            format!("{name} (netns cookie {})", t.cookie),
        )
    };
    let mut tracer = Tracer::start(&pins, selection)?;
    let stale = trace::programs_without_trace(&pins);
    if !stale.is_empty() {
        eprintln!(
            "redirect: warning: the programs at {} were loaded by a version without trace events: they report nothing. Start the agent (`redirect daemon`) of this version once to switch them in place",
            stale.join(", ")
        );
    }
    if !a.json {
        eprintln!(
            "tracing {what} as pid {}, install {}; Ctrl-C to stop",
            std::process::id(),
            pins.root.display()
        );
    }
    let mut decoder = Decoder::new(&pins);
    let mut lost = LostCounter::new(&pins, &trace::pods_of(&pins, tracer.selection()));
    let mut looked = Instant::now();
    'read: while !STOP.load(Ordering::SeqCst) {
        for e in tracer.next_events(Duration::from_millis(200))? {
            let l = decoder.line(&e);
            if filter.matches(&l) && !out.line(&l) {
                break 'read;
            }
        }
        if looked.elapsed() >= Duration::from_secs(1) {
            looked = Instant::now();
            let pods = trace::pods_of(&pins, tracer.selection());
            for (cookie, n) in lost.new_losses(&pins, &pods) {
                let l = decoder.lost(
                    cookie,
                    n,
                    "the kernel's ring buffer was full (ERRORS/trace_events_lost)",
                );
                if !out.line(&l) {
                    break 'read;
                }
            }
        }
    }
    drop(tracer);
    Ok(())
}
