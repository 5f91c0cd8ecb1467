//! What `redirect trace` costs the data path (issue 17): the benchmark's
//! configuration D (Istio's flags, `--no-accel`) measured with nobody
//! tracing, with a tracer on another pod of the same install (the switch
//! is on, this pod is not in its set), and with a tracer on the measured
//! pod itself (every decision and answer becomes an event, read and
//! thrown away). The variants are interleaved per repetition, each in
//! fresh pods, with D's path check after every run; medians and min-max
//! over the repetitions, as the main benchmark reports them.
//!
//! `redirect-kit bench-trace-cost [--reps N] [--quick]`, as root, after
//! `cargo xtask build` (release).

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use super::{
    model::{Cfg, Place, ProxyKind, Sample, Test},
    report::Agg,
    runner::{self, Env, Options},
};
use crate::sandbox::{self, Topology};

/// Who traces during a measurement.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Variant {
    Nobody,
    OtherPod,
    SamePod,
}

impl Variant {
    pub const ALL: [Variant; 3] = [Variant::Nobody, Variant::OtherPod, Variant::SamePod];

    fn describe(self) -> &'static str {
        match self {
            Variant::Nobody => "D, nobody tracing",
            Variant::OtherPod => "D, `redirect trace` on another pod",
            Variant::SamePod => "D, `redirect trace` on this pod",
        }
    }
}

/// A `redirect trace --json` reader writing to a file; stopped (SIGINT)
/// and its file removed on drop.
struct TraceReader {
    child: Child,
    out: PathBuf,
}

impl TraceReader {
    /// Stop it; how many events (JSON lines that are not `lost`) it read,
    /// and how many it was told were lost.
    fn finish(mut self) -> Result<(u64, u64)> {
        self.stop();
        let text = std::fs::read_to_string(&self.out)
            .with_context(|| format!("reading {}", self.out.display()))?;
        let (mut events, mut lost) = (0, 0);
        for l in text.lines() {
            let v: serde_json::Value = serde_json::from_str(l)
                .with_context(|| format!("redirect trace printed a line that is not JSON: {l}"))?;
            match v["lost"].as_u64() {
                Some(n) => lost += n,
                None => events += 1,
            }
        }
        Ok((events, lost))
    }

    fn stop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for TraceReader {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_file(&self.out);
    }
}

/// A second pod captured by the same install, with Istio's flags.
fn capture(pin: &Path, topo: &Topology) -> Result<()> {
    let out = Command::new(runner::redirect_bin())
        .arg("--pin-dir")
        .arg(pin)
        .args(["attach", "--netns"])
        .arg(topo.pod.path())
        .arg("--cgroup")
        .arg(&topo.cgroup.path)
        .args(runner::ISTIO_FLAGS)
        .args(["-d", runner::ISTIO_EXCLUDE_INBOUND, "--no-accel"])
        .output()
        .context("running redirect attach")?;
    if !out.status.success() {
        bail!(
            "redirect attach of the second pod: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// `redirect trace --json --netns <netns>` into a file; returned once its
/// lease is on.
fn trace(pin: &Path, netns: &Path) -> Result<TraceReader> {
    let out = std::env::temp_dir().join(sandbox::unique("rdb-trace-"));
    let file =
        std::fs::File::create(&out).with_context(|| format!("creating {}", out.display()))?;
    let child = Command::new(runner::redirect_bin())
        .arg("--pin-dir")
        .arg(pin)
        .args(["trace", "--no-agent", "--json", "--netns"])
        .arg(netns)
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(Stdio::null())
        .spawn();
    let child = match child {
        Ok(c) => c,
        Err(e) => {
            let _ = std::fs::remove_file(&out);
            return Err(e).context("starting redirect trace");
        }
    };
    let mut r = TraceReader { child, out };
    let pins = redirect_userspace::pins::Pins::new(pin);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let on = redirect_userspace::trace::switch_state(&pins)
            .ok()
            .flatten()
            .is_some_and(|s| s.on && s.owner_pid == r.child.id());
        if on {
            return Ok(r);
        }
        if let Ok(Some(st)) = r.child.try_wait() {
            bail!("redirect trace exited ({st}) before switching tracing on");
        }
        if Instant::now() > deadline {
            bail!("redirect trace did not switch tracing on within 10 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

const TESTS: [Test; 2] = [Test::Conn, Test::Rr64];

/// Run it; the report (markdown) is returned.
pub fn run(o: &Options) -> Result<String> {
    if redirect_userspace::sys::check_privileges().is_err() {
        bail!("the benchmark needs root (namespaces, cgroups, BPF)");
    }
    unsafe {
        libc::signal(
            libc::SIGINT,
            runner::on_signal as *const () as libc::sighandler_t,
        );
        libc::signal(
            libc::SIGTERM,
            runner::on_signal as *const () as libc::sighandler_t,
        );
    }
    if o.reps == Some(0) {
        bail!("invalid --reps value '0': expected 1 or more repetitions");
    }
    let s = runner::settings(o);
    let t0 = Instant::now();
    let load_before = runner::load_avg();
    let mut samples: Vec<(Variant, Sample)> = Vec::new();
    let mut failed = Vec::new();
    let mut events: BTreeMap<Variant, u64> = BTreeMap::new();
    let mut lost_events: BTreeMap<Variant, u64> = BTreeMap::new();
    // The app's connections made while a tracer ran.
    let mut traced_conns: BTreeMap<Variant, u64> = BTreeMap::new();
    let rounds = s.reps + usize::from(s.warmup_round);
    for round in 0..rounds {
        let warm = s.warmup_round && round == 0;
        let rep = if s.warmup_round { round } else { round + 1 };
        for v in Variant::ALL {
            runner::stopped()?;
            eprintln!(
                "[{:6.1}s] {} {}",
                t0.elapsed().as_secs_f64(),
                if warm {
                    "warm-up".to_string()
                } else {
                    format!("rep {rep}/{}", s.reps)
                },
                v.describe()
            );
            // Declared in this order so that on any exit the reader stops
            // first, then the install is removed (both pods still there),
            // then the second pod.
            let other = Topology::new("btc").context("creating the second pod")?;
            let mut env = Env::new(Cfg::D, 0, ProxyKind::Kit, false)?;
            let pin = env.pin_dir().context("D has an install")?.to_path_buf();
            capture(&pin, &other)?;
            let reader = match v {
                Variant::Nobody => None,
                Variant::OtherPod => Some(trace(&pin, &other.pod.path())?),
                Variant::SamePod => Some(trace(&pin, &env.pod_netns())?),
            };
            for place in &s.places {
                let cpu = env.place(*place)?;
                for t in TESTS {
                    runner::stopped()?;
                    let r = env.load(t, cpu, &s)?;
                    if !warm {
                        samples.push((v, runner::sample(rep, Cfg::D, *place, t, 0, r)));
                    }
                }
            }
            // The tracer must have seen the measured pod's connections
            // when it traced that pod, and nothing when it traced the other.
            let read = reader.map(TraceReader::finish).transpose()?;
            match (v, read) {
                (Variant::SamePod, Some((0, _))) => failed.push(format!(
                    "{v:?} rep {rep}: redirect trace read no event of the measured pod"
                )),
                (Variant::OtherPod, Some((n, _))) if n > 0 => failed.push(format!(
                    "{v:?} rep {rep}: redirect trace read {n} events of an idle pod"
                )),
                (_, Some((n, lost))) if !warm => {
                    *events.entry(v).or_default() += n;
                    *lost_events.entry(v).or_default() += lost;
                    *traced_conns.entry(v).or_default() += env.conns();
                }
                _ => {}
            }
            let c = env.verify(rep, &mut Default::default(), &mut false);
            if !c.ok {
                failed.push(format!("{v:?} rep {rep}: {}", c.detail));
            }
        }
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# What `redirect trace` costs the data path\n\n\
         Configuration D of the benchmark (Istio's flags, `--no-accel`), {} repetitions of {} ms (+{} ms warm-up) per measurement{}, interleaved, fresh pods each time; median and min-max over the repetitions. Load average {} before, {} after; {:.0} s.\n",
        s.reps,
        s.duration_ms,
        s.warmup_ms,
        if s.warmup_round { " after a discarded warm-up round" } else { "" },
        load_before,
        runner::load_avg(),
        t0.elapsed().as_secs_f64()
    );
    let _ = writeln!(
        out,
        "| placement | configuration | connections/s | connect p50 µs | connect p99 µs | 64 B RR p50 µs | 64 B RR p99 µs |\n|---|---|---|---|---|---|---|"
    );
    for place in &s.places {
        for v in Variant::ALL {
            // Latencies only from runs that completed requests (a run with
            // none has no histogram, and its percentiles are not zero).
            let pick = |t: Test, latency: bool, f: &dyn Fn(&Sample) -> f64| -> String {
                let x: Vec<f64> = samples
                    .iter()
                    .filter(|(vv, smp)| *vv == v && smp.place == *place && smp.test == t)
                    .filter(|(_, smp)| !latency || !smp.hist.is_empty())
                    .map(|(_, smp)| f(smp))
                    .collect();
                match Agg::of(x) {
                    Some(a) => format!("{:.1} ({:.1}-{:.1})", a.med, a.min, a.max),
                    None => "-".into(),
                }
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} |",
                match place {
                    Place::Same => "same CPU",
                    Place::Split => "split",
                },
                v.describe(),
                pick(Test::Conn, false, &|x| x.rate),
                pick(Test::Conn, true, &|x| x.p50_us),
                pick(Test::Conn, true, &|x| x.p99_us),
                pick(Test::Rr64, true, &|x| x.p50_us),
                pick(Test::Rr64, true, &|x| x.p99_us),
            );
        }
    }
    let get = |m: &BTreeMap<Variant, u64>, v| m.get(&v).copied().unwrap_or(0);
    let (same, same_conns) = (
        get(&events, Variant::SamePod),
        get(&traced_conns, Variant::SamePod),
    );
    let _ = writeln!(
        out,
        "\nEvents `redirect trace` read, over all measurements: tracing another pod {} (for {} app connections), tracing this pod {} for {} app connections ({}), {} lost.",
        get(&events, Variant::OtherPod),
        get(&traced_conns, Variant::OtherPod),
        same,
        same_conns,
        if same_conns > 0 {
            format!("{:.2} per connection", same as f64 / same_conns as f64)
        } else {
            "-".to_string()
        },
        get(&lost_events, Variant::SamePod),
    );
    if failed.is_empty() {
        let _ = writeln!(out, "\nPath checks: all passed (OUTPUT/captured = the app's connections, no nat rules, one sk_lookup link; the tracer of this pod read its events, the tracer of the other pod none).");
    } else {
        let _ = writeln!(out, "\nPath checks FAILED:\n- {}", failed.join("\n- "));
    }
    if !failed.is_empty() {
        eprint!("{out}");
        bail!("path checks failed");
    }
    Ok(out)
}
