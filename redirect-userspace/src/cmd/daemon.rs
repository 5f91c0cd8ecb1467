//! `redirect daemon`: the node agent (see `redirect_userspace::agent`).
//!
//! Start: load the install and attach the cgroup programs (once), release
//! pods whose netns is gone, serve the socket and the metrics, then install
//! the CNI plugin binary and add it to the named conflist. SIGTERM/SIGINT:
//! stop taking requests, finish those in flight, remove the socket (and,
//! with --cni-cleanup, the conflist entry) and exit. Nothing is ever
//! detached on exit: captured pods stay captured and a new agent takes over.
use std::{
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use redirect_userspace::{
    agent::{self, Agent},
    cni::conflist,
    placement::sibling_binary,
    sys,
};

/// Every flag can also be set from the environment (`REDIRECT_SOCKET`,
/// `REDIRECT_CNI_CONFLIST`, ...: the DaemonSet's ConfigMap in deploy/ does);
/// a flag on the command line wins.
#[derive(clap::Args)]
pub struct Args {
    /// Unix socket the CNI plugin (and `redirect` tooling) talks to; 0600, root only.
    #[arg(
        long,
        env = "REDIRECT_SOCKET",
        default_value = "/run/redirect/agent.sock"
    )]
    pub socket: PathBuf,
    /// Address of the /metrics, /healthz and /readyz HTTP endpoint.
    #[arg(long, env = "REDIRECT_METRICS_ADDR", default_value = "127.0.0.1:15099")]
    pub metrics_addr: SocketAddr,
    /// cgroup2 directory the programs attach to (default: the cgroup2 root).
    #[arg(long, env = "REDIRECT_CGROUP")]
    pub cgroup: Option<PathBuf>,
    /// Directory of the CNI network configs.
    #[arg(long, env = "REDIRECT_CNI_CONF_DIR", default_value = "/etc/cni/net.d")]
    pub cni_conf_dir: PathBuf,
    /// Directory the CNI plugin binary is installed into.
    #[arg(long, env = "REDIRECT_CNI_BIN_DIR", default_value = "/opt/cni/bin")]
    pub cni_bin_dir: PathBuf,
    /// Conflist (a file name in --cni-conf-dir, or a path) to chain
    /// redirect-cni into. Without it no CNI file is installed or changed.
    #[arg(long, env = "REDIRECT_CNI_CONFLIST")]
    pub cni_conflist: Option<PathBuf>,
    /// The plugin binary to install (default: redirect-cni next to this binary).
    #[arg(long, env = "REDIRECT_CNI_PLUGIN")]
    pub cni_plugin: Option<PathBuf>,
    /// Write `"captureAll": true` into the conflist entry: every Kubernetes
    /// pod is captured (CNI_ARGS REDIRECT_CAPTURE=false opts out). Without
    /// it only pods with REDIRECT_CAPTURE=true are.
    #[arg(long, env = "REDIRECT_CNI_CAPTURE_ALL")]
    pub cni_capture_all: bool,
    /// Remove the conflist entry on shutdown (new pods then start
    /// uncaptured; use when uninstalling the agent, not for restarts).
    #[arg(long, env = "REDIRECT_CNI_CLEANUP")]
    pub cni_cleanup: bool,
    /// Kubernetes API server URL, without credentials (tests, `kubectl
    /// proxy`). With it, --kubeconfig, or KUBERNETES_SERVICE_HOST set (in a
    /// cluster: the service account), the agent watches this node's pods
    /// and captures those whose Istio annotations put them in the mesh.
    #[arg(long, env = "REDIRECT_API_SERVER", conflicts_with = "kubeconfig")]
    pub api_server: Option<String>,
    /// Kubeconfig file for the Kubernetes API (its current context).
    #[arg(long, env = "REDIRECT_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Do not use the Kubernetes API even when KUBERNETES_SERVICE_HOST is set.
    #[arg(long, env = "REDIRECT_NO_KUBERNETES", conflicts_with_all = ["api_server", "kubeconfig"])]
    pub no_kubernetes: bool,
    /// This node's name: only pods with this spec.nodeName are watched
    /// (the DaemonSet sets it from the downward API).
    #[arg(long, env = "REDIRECT_NODE_NAME")]
    pub node_name: Option<String>,
    /// How long a CNI ADD waits for the pod watch to know the pod before
    /// it fails (closed).
    #[arg(long, env = "REDIRECT_POD_WAIT_MS", default_value_t = 2000, value_parser = clap::value_parser!(u64).range(0..=60_000))]
    pub pod_wait_ms: u64,
    /// Running mesh pods of this node that are not captured (started before
    /// the agent): `report` (log, metric, `list`), or `delete` them too so
    /// their controller recreates them captured (needs the `delete` verb on
    /// pods in the ClusterRole).
    #[arg(long, env = "REDIRECT_REPAIR", default_value = "report", value_parser = ["report", "delete"])]
    pub repair: String,
    /// How often (seconds) the agent checks that its conflist entry and
    /// plugin binary are still in place and restores them (a network
    /// plugin that rewrites its conflist drops foreign entries: new pods
    /// would then start uncaptured). 0 turns the check off.
    #[arg(long, env = "REDIRECT_CNI_RECHECK_SECS", default_value_t = 5, value_parser = clap::value_parser!(u64).range(0..=3600))]
    pub cni_recheck_secs: u64,
    /// The cluster DNS address(es), comma separated (the kubelet's
    /// `clusterDNS`, e.g. 10.96.0.10): the nameservers of pods with DNS
    /// capture (`ISTIO_META_DNS_CAPTURE`) and `dnsPolicy: ClusterFirst`.
    /// Not given: such pods get DNS to any address captured.
    #[arg(long, env = "REDIRECT_CLUSTER_DNS")]
    pub cluster_dns: Option<String>,
    /// The node's resolv.conf as the kubelet reads it (its `--resolv-conf`,
    /// mounted into the agent): the nameservers of pods with DNS capture
    /// and `dnsPolicy: Default`. Not given: such pods get DNS to any
    /// address captured.
    #[arg(long, env = "REDIRECT_NODE_RESOLV_CONF")]
    pub node_resolv_conf: Option<PathBuf>,
    /// Map sizes of a new install, `<map>=<entries>` (pods, orig, sockhash,
    /// ports, cidrs, counters, accel-ports, ifaces, routes), comma separated
    /// or repeated. An existing
    /// install keeps its sizes; a different size here is an error.
    #[arg(
        long = "map-size",
        env = "REDIRECT_MAP_SIZE",
        value_name = "MAP=N",
        value_delimiter = ','
    )]
    pub map_size: Vec<String>,
    /// Turn the install's kernel debug log on while the agent runs (each
    /// decision of the programs, logged under `redirect::kernel` at debug
    /// level); off again when it stops. Costs a little per connection
    /// while on; nothing measurable when off.
    #[arg(long, env = "REDIRECT_DEBUG_LOG")]
    pub debug_log: bool,
}

/// Removes the socket file when the daemon ends, however it ends.
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn block_signals() -> libc::sigset_t {
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

pub fn run(pin_dir: &Path, a: Args) -> Result<()> {
    sys::check_privileges()?;
    // A long-running server: a closed log pipe or a client that hung up is
    // an error to handle, not a reason to die (main sets SIGPIPE to default
    // for the one-shot commands).
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    // Before any thread exists, so every thread inherits the mask and the
    // signals are only taken by sigwait below.
    let sigs = block_signals();
    let sizes = redirect_userspace::mapsize::MapSizes::parse(&a.map_size)?;
    let cgroup = match &a.cgroup {
        Some(c) => c.clone(),
        None => sys::cgroup2_mount()?,
    };
    let plugin_src = a
        .cni_plugin
        .clone()
        .unwrap_or_else(|| sibling_binary("redirect-cni"));
    let conflist_path = a
        .cni_conflist
        .as_ref()
        .map(|c| conflist::conflist_path(&a.cni_conf_dir, c));
    if let Some(p) = &conflist_path {
        anyhow::ensure!(
            p.exists(),
            "conflist {} does not exist: redirect-cni is chained into an existing network",
            p.display()
        );
        anyhow::ensure!(
            plugin_src.exists(),
            "plugin binary {} is missing (build it, or pass --cni-plugin)",
            plugin_src.display()
        );
    }

    // Checked before anything is bound or loaded.
    let kube_opts = kubernetes_options(&a)?;
    // Endpoints first: a port or socket conflict changes nothing.
    let http = TcpListener::bind(a.metrics_addr)
        .with_context(|| format!("binding the metrics endpoint {}", a.metrics_addr))?;
    let metrics_addr = http.local_addr()?;
    let unix = agent::bind_socket(&a.socket)?;
    let _socket_file = SocketFile(a.socket.clone());

    let t0 = Instant::now();
    let (agent, newly) = Agent::start_with(pin_dir, &cgroup, &sizes)?;
    let agent = Arc::new(agent);
    tracing::info!(pin_dir = %pin_dir.display(), cgroup = %cgroup.display(), newly_attached = newly, programs_updated = ?agent.programs_updated, elapsed_ms = t0.elapsed().as_millis() as u64, "install loaded, cgroup programs attached");
    let kernel_log = if a.debug_log {
        redirect_userspace::kernlog::set(&agent.pins, true)?;
        Some(redirect_userspace::kernlog::Follower::start(&agent.pins)?)
    } else {
        None
    };
    let reconciled = agent.reconcile()?;
    if let Some(o) = &kube_opts {
        agent::k8s::PodWatch::start(agent.clone(), o.clone())
            .context("starting the Kubernetes pod watch")?;
    }
    tracing::info!(
        kept = reconciled.kept.len(),
        released = reconciled.released.len(),
        stale_records = reconciled.stale_records.len(),
        "reconciled captured pods"
    );

    let ready = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let http = agent::http::Server::start(http, agent.clone(), ready.clone())
        .context("starting the metrics endpoint")?;
    {
        let agent = agent.clone();
        std::thread::Builder::new()
            .name("socket".into())
            .spawn(move || {
                for conn in unix.incoming() {
                    match conn {
                        Ok(c) => {
                            let agent = agent.clone();
                            let _ = std::thread::Builder::new()
                                .name("conn".into())
                                .spawn(move || agent.serve_conn(c));
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "accept on the agent socket failed");
                            std::thread::sleep(Duration::from_millis(100));
                        }
                    }
                }
            })?;
    }

    let mut guard = None;
    if let Some(p) = &conflist_path {
        let bin = conflist::install_binary(&plugin_src, &a.cni_bin_dir)?;
        let changed =
            conflist::install_entry_k8s(p, &a.socket, a.cni_capture_all, kube_opts.is_some())?;
        tracing::info!(binary = %bin.display(), conflist = %p.display(), changed, capture_all = a.cni_capture_all, "CNI plugin installed");
        if a.cni_recheck_secs > 0 {
            let g = CniGuard {
                conflist: p.clone(),
                plugin_src: plugin_src.clone(),
                bin: bin.clone(),
                bin_dir: a.cni_bin_dir.clone(),
                socket: a.socket.clone(),
                capture_all: a.cni_capture_all,
                kubernetes: kube_opts.is_some(),
                every: Duration::from_secs(a.cni_recheck_secs),
            };
            let (agent, stop) = (agent.clone(), stop.clone());
            guard = Some(
                std::thread::Builder::new()
                    .name("cni-guard".into())
                    .spawn(move || g.run(&agent, &stop))?,
            );
        }
    }

    // Pods naming -c/-k interfaces: names applied as interfaces appear.
    {
        let (agent, stop) = (agent.clone(), stop.clone());
        std::thread::Builder::new()
            .name("ifwatch".into())
            .spawn(move || agent::ifwatch::run(&agent, &stop))?;
    }

    ready.store(true, Ordering::SeqCst);
    tracing::info!(socket = %a.socket.display(), metrics = %metrics_addr, "ready");
    println!(
        "{}",
        serde_json::json!({
            "event": "ready",
            "socket": a.socket,
            "metrics_addr": metrics_addr.to_string(),
            "pin_dir": pin_dir,
            "cgroup": cgroup,
            "cgroup_newly_attached": newly,
            "programs_updated": agent.programs_updated,
            "accel_probe": agent.accel_probe.as_ref().map(|p| p.summary()),
            "reconciled": reconciled,
            "cni_conflist": conflist_path,
            "kubernetes": kube_opts.as_ref().map(|o| serde_json::json!({"node": o.node_name, "pod_wait_ms": o.pod_wait.as_millis() as u64, "repair": format!("{:?}", o.repair).to_lowercase()})),
        })
    );
    use std::io::Write as _;
    let _ = std::io::stdout().flush();

    let mut sig: libc::c_int = 0;
    unsafe { libc::sigwait(&sigs, &mut sig) };
    tracing::info!(signal = sig, "shutting down: captured pods stay captured");
    ready.store(false, Ordering::SeqCst);
    stop.store(true, Ordering::SeqCst);
    // New clients find no socket (a CNI ADD then fails closed).
    let _ = std::fs::remove_file(&a.socket);
    // Stopped before --cni-cleanup, so it cannot put the entry back.
    if let Some(g) = guard {
        let _ = g.join();
    }
    if a.cni_cleanup {
        if let Some(p) = &conflist_path {
            match conflist::remove_entry(p) {
                Ok(removed) => {
                    tracing::info!(conflist = %p.display(), removed, "CNI entry removed (--cni-cleanup)")
                }
                Err(e) => tracing::warn!(error = %e, "could not remove the CNI entry"),
            }
        }
    }
    if !agent.drain(Duration::from_secs(20)) {
        tracing::warn!("requests still in flight after 20 s; exiting anyway");
    }
    // Scrapes went on during the drain (/readyz said 503); now those in
    // flight finish and the endpoint closes.
    http.shutdown(Duration::from_secs(5));
    if let Some(f) = kernel_log {
        if let Err(e) = redirect_userspace::kernlog::set(&agent.pins, false) {
            tracing::warn!(error = %e, "could not turn the kernel debug log off");
        }
        drop(f);
    }
    tracing::info!("stopped");
    Ok(())
}

/// The Kubernetes API side's options, when it is on: `--api-server`,
/// `--kubeconfig`, or in a cluster (`KUBERNETES_SERVICE_HOST`).
fn kubernetes_options(a: &Args) -> Result<Option<agent::k8s::Options>> {
    let in_cluster = std::env::var("KUBERNETES_SERVICE_HOST").is_ok_and(|h| !h.is_empty());
    if a.no_kubernetes || (a.api_server.is_none() && a.kubeconfig.is_none() && !in_cluster) {
        return Ok(None);
    }
    let node_name = a
        .node_name
        .clone()
        .filter(|n| !n.is_empty())
        .context("the Kubernetes API is configured but the node name is not: set --node-name or REDIRECT_NODE_NAME (the DaemonSet sets it from spec.nodeName)")?;
    Ok(Some(agent::k8s::Options {
        api_server: a.api_server.clone(),
        kubeconfig: a.kubeconfig.clone(),
        node_name,
        pod_wait: Duration::from_millis(a.pod_wait_ms),
        repair: if a.repair == "delete" {
            agent::k8s::Repair::Delete
        } else {
            agent::k8s::Repair::Report
        },
        dns: node_dns(a)?,
    }))
}

/// `--cluster-dns` and `--node-resolv-conf`: what pods with DNS capture
/// get as nameservers (see `annotations::NodeDns`).
fn node_dns(a: &Args) -> Result<redirect_userspace::annotations::NodeDns> {
    let cluster_dns = match &a.cluster_dns {
        Some(v) => redirect_userspace::config::parse::addresses(v).map_err(|why| {
            redirect_userspace::error::Error::InvalidFlag {
                field: "--cluster-dns".into(),
                value: v.clone(),
                reason: why,
            }
        })?,
        None => Vec::new(),
    };
    let node_nameservers = match &a.node_resolv_conf {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("--node-resolv-conf {}: cannot read it", p.display()))?;
            Some(redirect_userspace::podfiles::nameservers(&text).0)
        }
        None => None,
    };
    Ok(redirect_userspace::annotations::NodeDns {
        cluster_dns,
        node_nameservers,
    })
}

/// Keeps the conflist entry and the plugin binary in place while the agent
/// runs, restoring them when something else removed them (counted, logged).
struct CniGuard {
    conflist: PathBuf,
    plugin_src: PathBuf,
    bin: PathBuf,
    bin_dir: PathBuf,
    socket: PathBuf,
    capture_all: bool,
    kubernetes: bool,
    every: Duration,
}

impl CniGuard {
    fn run(&self, agent: &Agent, stop: &AtomicBool) {
        let mut failing = false;
        loop {
            // Sleep in short steps so shutdown is not delayed.
            let until = Instant::now() + self.every;
            while Instant::now() < until {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100).min(self.every));
            }
            match self.check() {
                Ok(restored) => {
                    if failing {
                        tracing::info!(conflist = %self.conflist.display(), "CNI entry check succeeds again");
                        failing = false;
                    }
                    for what in restored {
                        agent
                            .counters()
                            .cni_restored
                            .entry(what)
                            .and_modify(|n| *n += 1)
                            .or_insert(1);
                        tracing::warn!(conflist = %self.conflist.display(), binary = %self.bin.display(), restored = what, "the CNI {what} had been removed by something else; restored it (pods created meanwhile may be uncaptured: see the repair metric)");
                    }
                }
                Err(e) => {
                    agent.counters().cni_check_errors += 1;
                    if !failing {
                        tracing::warn!(conflist = %self.conflist.display(), error = %e, "cannot check or restore the CNI entry (retrying)");
                        failing = true;
                    }
                }
            }
        }
    }

    /// What had to be put back: "entry" and/or "binary".
    fn check(&self) -> Result<Vec<&'static str>> {
        let mut restored = Vec::new();
        if !self.bin.exists() {
            conflist::install_binary(&self.plugin_src, &self.bin_dir)?;
            restored.push("binary");
        }
        if conflist::install_entry_k8s(
            &self.conflist,
            &self.socket,
            self.capture_all,
            self.kubernetes,
        )? {
            restored.push("entry");
        }
        Ok(restored)
    }
}
