//! `redirect-kit bookinfo` (`cargo xtask demo --bookinfo`): Bookinfo's
//! call chain (productpage → details, productpage → reviews → ratings) on
//! three nodes built alike, run in one go, in interleaved rounds:
//!
//! - A, no mesh: the apps call each other directly;
//! - B, the mesh on istio-init's iptables rules: an HAProxy sidecar (uid
//!   1337) per pod, captured by the nat rules in each pod netns;
//! - C, the mesh on `redirect`: the same sidecars, captured by `redirect
//!   attach` with the same flags, no iptables rule anywhere.
//!
//! A client on the node (outside the pods) calls productpage; every answer
//! names who each app saw its request from, so every call checks its own
//! path. At the end every pod's counters (iptables' or `redirect stats`)
//! and every sidecar's log must add up to the calls made: each hop went
//! through its caller's outbound sidecar and its callee's inbound sidecar.
//! On the way, C's productpage pod shows the iptables workflow with
//! `redirect stats --zero` and `--chain ISTIO_OUTPUT`. Everything is
//! removed at the end, on error and on Ctrl-C.

pub mod app;
pub mod mesh;
pub mod report;

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
    time::Instant,
};

use anyhow::{bail, Context, Result};

use crate::{
    bench::hist,
    haproxy::HAPROXY,
    sandbox::{sibling_binary, unique},
};
use mesh::{Mesh, Node, PodCounters, Tools, APP_UID, NODE_IP, PROXY_UID};

#[derive(clap::Args, Clone, Debug)]
pub struct Options {
    /// Measured calls of productpage per configuration.
    #[arg(long, default_value = "1000")]
    pub calls: u64,
    /// Interleaved rounds the calls are split into (each round runs every
    /// configuration once, in a rotating order).
    #[arg(long, default_value = "10")]
    pub rounds: u64,
    /// Also write the README's block (the workflow and the latency table,
    /// Markdown) to this file.
    #[arg(long, value_name = "FILE")]
    pub markdown: Option<PathBuf>,
    /// Replace the block between the `bookinfo-demo` markers of this
    /// Markdown file (the README) with this run's.
    #[arg(long, value_name = "FILE")]
    pub update_readme: Option<PathBuf>,
    /// The HAProxy binary the sidecars run.
    #[arg(long, default_value = HAPROXY)]
    pub haproxy: PathBuf,
    /// What the names of everything the run creates contain (namespaces
    /// `rdbi-<id>-*`, cgroups `redirect-rdbi-<id>-*`, pins
    /// `/sys/fs/bpf/redirect-bookinfo-<id>`); unique by default.
    #[arg(skip)]
    pub id: Option<String>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            calls: 1000,
            rounds: 10,
            markdown: None,
            update_readme: None,
            haproxy: HAPROXY.into(),
            id: None,
        }
    }
}

/// Calls per node before anything is measured or shown.
pub const WARMUP_CALLS: u64 = 5;
/// Calls between `--zero` and the chain listing of the workflow.
pub const WORKFLOW_CALLS: u64 = 10;

/// End-to-end latency of one configuration.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Latency {
    pub label: String,
    pub calls: u64,
    pub p50_us: f64,
    pub p99_us: f64,
}

/// The iptables workflow, run with `redirect` in C's productpage pod:
/// each command as shown and its output.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Workflow {
    pub zero_cmd: String,
    pub zero_out: String,
    pub traffic: String,
    pub chain_cmd: String,
    pub chain_out: String,
}

/// What a run measured and checked.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Report {
    pub calls: u64,
    pub rounds: u64,
    /// The machine: CPUs, and the 1-minute load average when the
    /// measured calls started (other work on the machine shows in p99).
    pub cpus: usize,
    pub load: f64,
    /// A, B, C in that order.
    pub latency: Vec<Latency>,
    /// Per configuration, per pod.
    pub counters: Vec<(String, Vec<PodCounters>)>,
    pub workflow: Workflow,
}

impl Report {
    /// Every pod's counters and log added up.
    pub fn problems(&self) -> Vec<String> {
        self.counters
            .iter()
            .flat_map(|(mesh, pods)| {
                pods.iter().flat_map(move |p| {
                    p.problems
                        .iter()
                        .map(move |e| format!("{mesh}, {}: {e}", p.pod))
                })
            })
            .collect()
    }
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Ctrl-C (and SIGTERM) end the run at the next call or step, which then
/// cleans up like any error (the CLI installs this; a test does not).
pub fn stop_on_signals() {
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
}

/// A signal asked the run to stop.
pub fn interrupted() -> bool {
    STOP.load(Ordering::SeqCst)
}

fn stopped() -> Result<()> {
    if STOP.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// Everything the run created, removed on drop in this order: the
/// processes, the install (`redirect uninstall`), the pods' and nodes'
/// namespaces and cgroups.
struct Testbed {
    tools: Tools,
    nodes: Vec<Node>,
}

impl Drop for Testbed {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            n.stop();
        }
        if self.tools.pin_dir.exists() {
            let out = Command::new(&self.tools.redirect)
                .arg("--pin-dir")
                .arg(&self.tools.pin_dir)
                .arg("uninstall")
                .output();
            if !matches!(&out, Ok(o) if o.status.success()) {
                eprintln!(
                    "bookinfo cleanup: uninstall of {} failed: {out:?}",
                    self.tools.pin_dir.display()
                );
                let _ = std::fs::remove_dir_all(&self.tools.pin_dir);
            }
        }
        // The nodes (pods first) drop after this.
    }
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| {
        std::env::split_paths(&p).any(|d| {
            std::fs::metadata(d.join(program)).is_ok_and(|m| {
                use std::os::unix::fs::PermissionsExt;
                m.is_file() && m.permissions().mode() & 0o111 != 0
            })
        })
    })
}

/// Flags and prerequisites, before anything is created.
fn check(o: &Options, id: &str) -> Result<Tools> {
    if o.rounds == 0 || o.calls == 0 {
        bail!(
            "--calls {} --rounds {}: both must be at least 1",
            o.calls,
            o.rounds
        );
    }
    if o.rounds > o.calls {
        bail!(
            "--rounds {} is more than --calls {}: every round needs a call",
            o.rounds,
            o.calls
        );
    }
    if o.calls > 1_000_000 {
        bail!(
            "--calls {}: at most 1000000 (each call is 4 connections per node)",
            o.calls
        );
    }
    redirect_userspace::sys::check_privileges()
        .context("the demo creates namespaces, cgroups, iptables rules and BPF programs")?;
    let tools = Tools {
        kit: sibling_binary("redirect-kit"),
        redirect: sibling_binary("redirect"),
        haproxy: o.haproxy.clone(),
        pin_dir: PathBuf::from(format!("/sys/fs/bpf/redirect-bookinfo-{id}")),
    };
    for b in [&tools.kit, &tools.redirect] {
        if !b.exists() {
            bail!(
                "{} missing: build with `cargo xtask build` (or run `cargo xtask demo --bookinfo`)",
                b.display()
            );
        }
    }
    if !tools.haproxy.exists() {
        bail!(
            "--haproxy {}: missing: run `cargo xtask setup` (or apt-get install -y haproxy)",
            tools.haproxy.display()
        );
    }
    for p in ["ip", "iptables-restore", "iptables-save"] {
        if !on_path(p) {
            bail!("{p} is not on PATH: run `cargo xtask setup` (iproute2, iptables)");
        }
    }
    if let Some(f) = &o.update_readme {
        // Checked now, so a run is not wasted on a file it cannot update.
        report::splice(&std::fs::read_to_string(f)?, "")
            .with_context(|| format!("--update-readme {}", f.display()))?;
    }
    Ok(tools)
}

/// `count` calls of productpage from the node, each checked; their
/// latencies recorded in `h` (nanoseconds) when given.
fn calls(node: &mut Node, count: u64, h: Option<&mut hdrhistogram::Histogram<u64>>) -> Result<()> {
    let ns = redirect_userspace::sys::Netns::open(&node.netns.path())?;
    let want = node.mesh.expected_body();
    let page = mesh::service("productpage").addr();
    let mesh = node.mesh;
    let times = ns.run(|| {
        let mut t = Vec::with_capacity(count as usize);
        for i in 0..count {
            if STOP.load(Ordering::SeqCst) {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::Interrupted,
                    "interrupted",
                ));
            }
            let t0 = Instant::now();
            let (code, body) = app::get(page, "/productpage").map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("call {i} of {count}: GET {page}/productpage: {e}"),
                )
            })?;
            t.push(t0.elapsed());
            if code != 200 || body != want {
                return Err(std::io::Error::other(format!(
                    "call {i} of {count}: answer {code} {body}, expected 200 {want}"
                )));
            }
        }
        Ok(t)
    });
    let times = times
        .map_err(anyhow::Error::from)
        .with_context(|| format!("{} calling productpage", mesh.label()))?;
    node.calls += count;
    if let Some(h) = h {
        for t in times {
            h.record(t.as_nanos().max(1) as u64)?;
        }
    }
    Ok(())
}

/// `redirect <args>` against the demo's install (`REDIRECT_PIN_DIR`),
/// shown as `$ redirect <args>` and its output.
fn redirect_cmd(t: &Tools, args: &[&str]) -> Result<(String, String)> {
    let out = Command::new(&t.redirect)
        .env("REDIRECT_PIN_DIR", &t.pin_dir)
        .args(args)
        .output()
        .with_context(|| format!("running {}", t.redirect.display()))?;
    if !out.status.success() {
        bail!(
            "redirect {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok((
        format!("redirect {}", args.join(" ")),
        String::from_utf8_lossy(&out.stdout).trim_end().to_string(),
    ))
}

/// The run: build, capture, start, call, check, measure, report; the
/// progress and the results go to `out`. Everything created is removed
/// before this returns, whatever happens.
pub fn run(o: &Options, out: &mut dyn Write) -> Result<Report> {
    let id = o.id.clone().unwrap_or_else(|| unique(""));
    let tools = check(o, &id).context("step 0, checking flags and prerequisites")?;
    let mut bed = Testbed {
        tools,
        nodes: Vec::new(),
    };
    writeln!(
        out,
        "== 1. three nodes alike, each a bridge in a node netns with Bookinfo's four pods on it (own netns, veth, cgroup):\n   \
         A = {}, B = {}, C = {}; pods {} on :{}; the client calls from the node, {NODE_IP}",
        Mesh::None.label(),
        Mesh::Iptables.label(),
        Mesh::Redirect.label(),
        mesh::SERVICES
            .iter()
            .map(|s| format!("{} {}", s.name, s.ip()))
            .collect::<Vec<_>>()
            .join(", "),
        mesh::APP_PORT
    )?;
    for m in Mesh::ALL {
        stopped()?;
        let node = Node::create(m, &id).with_context(|| {
            format!(
                "step 1, creating node {} ({})",
                m.tag().to_uppercase(),
                m.label()
            )
        })?;
        bed.nodes.push(node);
    }
    writeln!(
        out,
        "== 2. istio-init's part, Istio's default flags: B: iptables-restore of its nat rules in each pod; C: redirect attach --netns <pod> --cgroup <node> {}",
        crate::bench::runner::istio_attach_args("")
            .iter()
            .map(|a| if a.is_empty() || a.contains('*') {
                format!("'{a}'")
            } else {
                a.clone()
            })
            .collect::<Vec<_>>()
            .join(" ")
    )?;
    for n in &bed.nodes {
        stopped()?;
        n.capture(&bed.tools).with_context(|| {
            format!(
                "step 2, capturing the pods of node {} ({})",
                n.mesh.tag().to_uppercase(),
                n.mesh.label()
            )
        })?;
    }
    writeln!(
        out,
        "== 3. in every pod: the app (redirect-kit bookinfo-app, uid {APP_UID}); in B and C also the sidecar ({}, uid {PROXY_UID})",
        bed.tools.haproxy.display()
    )?;
    let tools = &bed.tools;
    for n in &mut bed.nodes {
        stopped()?;
        let (tag, label) = (n.mesh.tag().to_uppercase(), n.mesh.label());
        n.start(tools)
            .with_context(|| format!("step 3, starting the pods of node {tag} ({label})"))?;
    }
    writeln!(
        out,
        "== 4. warm-up: {WARMUP_CALLS} calls per node, each answer checked"
    )?;
    for n in &mut bed.nodes {
        calls(n, WARMUP_CALLS, None).context("step 4, warm-up")?;
    }

    let c = bed
        .nodes
        .iter()
        .position(|n| n.mesh == Mesh::Redirect)
        .expect("node C");
    let page = bed.nodes[c].pod("productpage").path();
    let page = page.to_string_lossy();
    writeln!(
        out,
        "== 5. the iptables workflow with redirect, in C's productpage pod (the demo's install: REDIRECT_PIN_DIR={})",
        tools.pin_dir.display()
    )?;
    let (zero_cmd, zero_out) = redirect_cmd(tools, &["stats", "--zero", "--netns", &page])
        .context("step 5, redirect stats --zero")?;
    calls(&mut bed.nodes[c], WORKFLOW_CALLS, None).context("step 5, traffic")?;
    let (chain_cmd, chain_out) = redirect_cmd(
        tools,
        &["stats", "--netns", &page, "--chain", "ISTIO_OUTPUT"],
    )
    .context("step 5, redirect stats --chain ISTIO_OUTPUT")?;
    let workflow = Workflow {
        zero_cmd,
        zero_out,
        traffic: format!(
            "# {WORKFLOW_CALLS} calls from the node: GET http://{}/productpage",
            mesh::service("productpage").addr()
        ),
        chain_cmd,
        chain_out,
    };
    writeln!(out, "{}", report::workflow_text(&workflow))?;

    writeln!(
        out,
        "== 6. {} calls per node in {} interleaved rounds (A B C, B C A, C A B, ...), each answer checked",
        o.calls, o.rounds
    )?;
    let mut hists: Vec<_> = bed.nodes.iter().map(|_| hist::new()).collect();
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    let t0 = Instant::now();
    for r in 0..o.rounds {
        let share = o.calls / o.rounds + u64::from(r < o.calls % o.rounds);
        for k in 0..bed.nodes.len() {
            stopped()?;
            let i = (k + r as usize) % bed.nodes.len();
            calls(&mut bed.nodes[i], share, Some(&mut hists[i]))
                .with_context(|| format!("step 6, round {} of {}", r + 1, o.rounds))?;
        }
    }
    writeln!(out, "   {:.1} s", t0.elapsed().as_secs_f64())?;

    writeln!(
        out,
        "== 7. every hop through the sidecars? each pod's counters and its sidecar's log against the calls made"
    )?;
    let mut counters = Vec::new();
    for n in &bed.nodes {
        let c = n.counters(tools).with_context(|| {
            format!(
                "step 7, reading the counters of node {}",
                n.mesh.tag().to_uppercase()
            )
        })?;
        counters.push((n.mesh.label().to_string(), c));
    }
    let latency = bed
        .nodes
        .iter()
        .zip(&hists)
        .map(|(n, h)| Latency {
            label: n.mesh.label().to_string(),
            calls: h.len(),
            p50_us: hist::us(h, 0.5),
            p99_us: hist::us(h, 0.99),
        })
        .collect();
    let rep = Report {
        calls: o.calls,
        rounds: o.rounds,
        cpus: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        load,
        latency,
        counters,
        workflow,
    };
    write!(out, "{}", report::counters_text(&bed.nodes, &rep))?;
    writeln!(
        out,
        "== 8. end-to-end latency of GET /productpage from the node (productpage -> details, reviews -> ratings); {} CPUs, load average {:.1}",
        rep.cpus, rep.load
    )?;
    write!(out, "{}", report::latency_text(&rep))?;
    writeln!(
        out,
        "== 9. cleanup: processes, redirect uninstall, namespaces, cgroups"
    )?;
    drop(bed);
    let problems = rep.problems();
    if !problems.is_empty() {
        bail!(
            "step 7: {} check(s) failed:\n  {}",
            problems.len(),
            problems.join("\n  ")
        );
    }
    let md = report::markdown(&rep);
    if let Some(f) = &o.markdown {
        std::fs::write(f, &md).with_context(|| format!("--markdown {}", f.display()))?;
        writeln!(out, "   wrote {}", f.display())?;
    }
    if let Some(f) = &o.update_readme {
        update_readme(f, &md)?;
        writeln!(out, "   updated {}", f.display())?;
    }
    Ok(rep)
}

fn update_readme(f: &Path, md: &str) -> Result<()> {
    let text =
        std::fs::read_to_string(f).with_context(|| format!("--update-readme {}", f.display()))?;
    let new =
        report::splice(&text, md).with_context(|| format!("--update-readme {}", f.display()))?;
    std::fs::write(f, new).with_context(|| format!("--update-readme {}", f.display()))
}
