//! The Kubernetes API side of the agent: a watch of the pods on this node
//! (kube-rs, `fieldSelector=spec.nodeName=<node>`), whose Istio annotations
//! decide which pods are captured and with what config
//! ([`crate::annotations::from_pod`]).
//!
//! * **CNI ADD** (`{"op":"add","kubernetes":true,...}`): the pod is looked
//!   up in the watch cache. A pod in the mesh is captured with the config
//!   of its annotations; a pod without a sidecar passes through (nothing is
//!   written to any map). A pod with an invalid annotation is refused.
//! * **Unknown pod rule** (fail closed): the ADD waits up to `--pod-wait-ms`
//!   (2 s) for the watch to be connected, to have finished its first list
//!   and to hold the pod (with `K8S_POD_UID` when the runtime gives it). If
//!   it still does not, or the API is unreachable, the ADD fails with an
//!   error of kind [`ErrorKind::Kubernetes`] (the plugin's code 102), and
//!   the runtime retries the sandbox later.
//! * **Live changes**: every ADDED/MODIFIED event (and every object of a
//!   relist) recomputes the pod's config. A captured pod whose config
//!   changed gets the new one (`register_pod`, the config entry is the
//!   commit point); a pod that leaves the mesh is released; a pod that
//!   passed through at ADD and enters the mesh is captured. An invalid
//!   value is logged and counted with the annotation and value, and the
//!   pod keeps the config it has.
//! * **Repair**: after each complete list (start, and every relist after a
//!   410 Gone or a broken watch), and for a pod as soon as it starts
//!   running or its annotations change, running pods in the mesh on this
//!   node that the agent has not captured (started before the agent, or
//!   while the plugin was not chained) are logged, counted and listed; with
//!   `--repair delete` they are also deleted (uid precondition) so their
//!   controller recreates them, captured.
//!
//! The watch runs on its own thread with a single-threaded tokio runtime;
//! the rest of the agent is plain threads. Two locks: the watch cache
//! (`state`), and `apply` which orders API-driven captures against live
//! updates so an ADD never installs a config an event already replaced.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    path::{Path, PathBuf},
    sync::{Arc, Condvar, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use ::kube::{
    api::{Api, DeleteParams, ListParams, Preconditions},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{watcher, WatchStreamExt},
    Client, Config,
};
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Pod;

use super::Agent;
use crate::{
    annotations::{self, AnnotationError, PodCapture},
    attach,
    config::PodSpec,
    error::Error,
    maps::Maps,
    sys::Netns,
    wire::{check_netns_path, AddReply, AgentError, CheckReply, ErrorKind},
};

/// What to do with running mesh pods the agent has not captured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Repair {
    /// Log, count and list them (default).
    Report,
    /// Also delete them, so their controller recreates them captured
    /// (needs the `delete` verb on pods).
    Delete,
}

/// Where the API is and which pods to watch.
#[derive(Clone, Debug)]
pub struct Options {
    /// `--api-server`: a URL, no credentials (tests, `kubectl proxy`).
    pub api_server: Option<String>,
    /// `--kubeconfig`: a kubeconfig file (its current context).
    pub kubeconfig: Option<PathBuf>,
    /// This node's name (`spec.nodeName` of its pods).
    pub node_name: String,
    /// How long an ADD waits for the watch to know the pod.
    pub pod_wait: Duration,
    pub repair: Repair,
    /// The node's DNS, for the nameservers of pods with DNS capture.
    pub dns: annotations::NodeDns,
}

/// One pod as the watch last saw it.
struct CachedPod {
    uid: String,
    /// A static pod's own uid (its mirror pod in the API has another one
    /// and names the static pod's in `kubernetes.io/config.mirror`): the
    /// kubelet passes that one as `K8S_POD_UID`.
    mirror_of: Option<String>,
    resource_version: String,
    running: bool,
    decision: Result<PodCapture, AnnotationError>,
    /// The relist generation that last listed it.
    generation: u64,
}

#[derive(Default)]
struct State {
    pods: HashMap<String, CachedPod>,
    /// The last watch step succeeded (cleared by a watch error).
    connected: bool,
    /// A complete list has been received.
    synced: bool,
    last_error: Option<String>,
    generation: u64,
    /// Pods let through at ADD (not in the mesh then): netns path and
    /// container id, so a change that puts them in the mesh captures them.
    passthrough: HashMap<String, (PathBuf, String)>,
    /// Uids deleted by repair (never deleted twice).
    repaired: HashSet<String>,
}

/// Counters of the API side (rendered by `/metrics`).
#[derive(Default)]
pub struct Counters {
    /// Watch events by type (`apply`, `delete`, `init`, `init_apply`, `init_done`, `error`).
    pub events: BTreeMap<&'static str, u64>,
    /// API-driven ADDs by result (`captured`, `not_in_mesh`, `invalid`, `unknown`, `unreachable`).
    pub adds: BTreeMap<&'static str, u64>,
    /// Live changes by result (`updated`, `released`, `captured`, `rejected`, `error`).
    pub updates: BTreeMap<&'static str, u64>,
    /// Repair by action (`reported`, `deleted`, `delete_failed`).
    pub repair: BTreeMap<&'static str, u64>,
}

pub struct PodWatch {
    pub opts: Options,
    state: Mutex<State>,
    changed: Condvar,
    apply: Mutex<()>,
    pub counters: Mutex<Counters>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The parts of a pod's config the annotations decide, in a form that
/// compares equal when the kernel would behave the same (lists as sets).
/// Acceleration is not the annotations' to set: it is left out.
#[derive(PartialEq, Debug)]
struct Comparable {
    ports: (u16, u16, u16),
    ids: (Vec<u32>, Vec<u32>),
    include_all: (bool, bool),
    include_cidrs: Vec<(std::net::IpAddr, u8)>,
    exclude_cidrs: Vec<(std::net::IpAddr, u8)>,
    outbound_ports: (Vec<u16>, Vec<u16>),
    inbound: (String, Vec<u16>),
    /// `-c`, `-k` names (sets).
    interfaces: (Vec<String>, Vec<String>),
    /// DNS capture, owner groups, the IPv4 loopback range.
    dns: String,
    owner_groups: String,
    loopback: String,
    /// `--dual-stack` (whether IPv6 is then captured is the pod's
    /// addresses' to say, at capture).
    dual_stack: bool,
    /// Settings not supported yet (never in the kernel): a change that
    /// asks for one is applied, and so refused and logged, not skipped.
    unsupported: Vec<String>,
}

fn names(v: &[String]) -> Vec<String> {
    let mut v = v.to_vec();
    v.sort();
    v.dedup();
    v
}

fn comparable(s: &PodSpec) -> Comparable {
    let cidrs = |v: &[crate::config::Cidr]| {
        let mut v: Vec<_> = v.iter().map(|c| (c.addr, c.len)).collect();
        v.sort();
        v.dedup();
        v
    };
    let set = |v: &[u16]| {
        let mut v = v.to_vec();
        v.sort_unstable();
        v.dedup();
        v
    };
    let inbound = match &s.inbound_ports {
        crate::config::InboundPorts::All => "*".to_string(),
        crate::config::InboundPorts::None => String::new(),
        crate::config::InboundPorts::Listed(v) => format!("{:?}", set(v)),
    };
    Comparable {
        ports: (s.proxy_port, s.inbound_port, s.tunnel_port),
        ids: (s.proxy_uids.clone(), s.proxy_gids.clone()),
        include_all: (s.include_all_outbound, s.include_has_loopback),
        include_cidrs: cidrs(&s.include_cidrs),
        exclude_cidrs: cidrs(&s.exclude_cidrs),
        outbound_ports: (
            set(&s.include_outbound_ports),
            set(&s.exclude_outbound_ports),
        ),
        inbound: (inbound, set(&s.exclude_inbound_ports)),
        interfaces: (names(&s.exclude_interfaces), names(&s.kube_virt_interfaces)),
        dns: format!("{:?}", s.dns_capture()),
        // As sets: the kernel gives the gids back sorted.
        owner_groups: {
            let mode = match s.outbound_owner_groups {
                crate::config::OwnerGroups::All => "all",
                crate::config::OwnerGroups::Only(_) => "only",
                crate::config::OwnerGroups::AllExcept(_) => "except",
            };
            format!(
                "{mode} {:?} {:?}",
                s.outbound_owner_groups.gids(),
                s.outbound_owner_groups.names()
            )
        },
        loopback: s.ipv4_loopback_cidr.to_string(),
        dual_stack: s.dual_stack,
        unsupported: s.unsupported().iter().map(|(d, _)| d.name()).collect(),
    }
}

/// On a mirror pod: the uid of the static pod it mirrors.
const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";

/// `namespace/name` of a pod object.
fn key_of(p: &Pod) -> String {
    format!(
        "{}/{}",
        p.metadata.namespace.as_deref().unwrap_or(""),
        p.metadata.name.as_deref().unwrap_or("")
    )
}

/// What a decision is, for "did it change?" (the args, or the reason).
fn decision_key(d: &Result<PodCapture, AnnotationError>) -> String {
    match d {
        Ok(PodCapture::Mesh(m)) => format!("mesh {}", m.spec.istio_args()),
        Ok(PodCapture::NotInMesh { reason, .. }) => format!("not in mesh: {reason}"),
        Err(e) => format!("invalid: {e}"),
    }
}

/// The client config: `--api-server`, else `--kubeconfig`, else the
/// in-cluster service account.
pub async fn client_config(o: &Options) -> Result<Config, String> {
    let mut c = if let Some(url) = &o.api_server {
        Config::new(
            url.parse()
                .map_err(|e| format!("--api-server {url:?}: {e}"))?,
        )
    } else if let Some(path) = &o.kubeconfig {
        let kc = Kubeconfig::read_from(path)
            .map_err(|e| format!("--kubeconfig {}: {e}", path.display()))?;
        Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .map_err(|e| format!("--kubeconfig {}: {e}", path.display()))?
    } else {
        Config::incluster().map_err(|e| {
            format!("in-cluster Kubernetes config (KUBERNETES_SERVICE_HOST is set): {e}")
        })?
    };
    // A dead API server is noticed in seconds, not minutes.
    c.connect_timeout = Some(Duration::from_secs(5));
    Ok(c)
}

impl PodWatch {
    /// Build the client and start watching on a thread of its own. Fails
    /// (and the daemon with it) on a bad kubeconfig or URL; an unreachable
    /// API server is not an error here: the watch retries with backoff and
    /// ADDs fail closed meanwhile.
    pub fn start(agent: Arc<Agent>, opts: Options) -> anyhow::Result<Arc<PodWatch>> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let config = rt
            .block_on(client_config(&opts))
            .map_err(anyhow::Error::msg)?;
        let client = rt.block_on(async { Client::try_from(config) })?;
        let w = Arc::new(PodWatch {
            opts,
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            apply: Mutex::new(()),
            counters: Mutex::new(Counters::default()),
        });
        if agent.k8s.set(w.clone()).is_err() {
            anyhow::bail!("the pod watch is already running");
        }
        let w2 = w.clone();
        std::thread::Builder::new()
            .name("kube-watch".into())
            .spawn(move || rt.block_on(w2.run(agent, client)))?;
        Ok(w)
    }

    fn count(
        &self,
        which: fn(&mut Counters) -> &mut BTreeMap<&'static str, u64>,
        what: &'static str,
    ) {
        *which(&mut lock(&self.counters)).entry(what).or_default() += 1;
    }

    async fn run(self: Arc<Self>, agent: Arc<Agent>, client: Client) {
        let api: Api<Pod> = Api::all(client.clone());
        let sel = format!("spec.nodeName={}", self.opts.node_name);
        let wc = watcher::Config::default().fields(&sel);
        let mut stream = watcher(api.clone(), wc.clone()).default_backoff().boxed();
        tracing::info!(node = %self.opts.node_name, "watching the pods of this node");
        loop {
            // A watch that was re-established yields nothing until an event
            // comes; while the watch is failing, a one-item list every
            // second tells when the API answers again.
            let ev = match tokio::time::timeout(Duration::from_secs(1), stream.next()).await {
                Ok(Some(ev)) => ev,
                Ok(None) => {
                    // The watcher retries forever; should it ever end, a
                    // new one starts over with a list.
                    tracing::error!("Kubernetes pod watch ended: starting it again");
                    lock(&self.state).connected = false;
                    self.changed.notify_all();
                    stream = watcher(api.clone(), wc.clone()).default_backoff().boxed();
                    continue;
                }
                Err(_) => {
                    let failing = {
                        let st = lock(&self.state);
                        !st.connected && st.synced
                    };
                    if failing {
                        let r = api
                            .list_metadata(&ListParams::default().fields(&sel).limit(1))
                            .await;
                        let mut st = lock(&self.state);
                        match r {
                            Ok(_) => {
                                tracing::info!("Kubernetes API reachable again");
                                st.connected = true;
                                st.last_error = None;
                            }
                            Err(e) => st.last_error = Some(e.to_string()),
                        }
                        drop(st);
                        self.changed.notify_all();
                    }
                    continue;
                }
            };
            match ev {
                Ok(e) => {
                    if let Some(only) = self.on_event(&agent, e) {
                        self.repair(&agent, &client, only.as_deref()).await;
                    }
                }
                Err(e) => {
                    self.count(|c| &mut c.events, "error");
                    let msg = e.to_string();
                    let mut st = lock(&self.state);
                    if st.connected || st.last_error.as_deref() != Some(msg.as_str()) {
                        tracing::warn!(error = %msg, "Kubernetes pod watch failed (retrying with backoff; ADDs of pods fail closed meanwhile)");
                    }
                    st.connected = false;
                    st.last_error = Some(msg);
                    drop(st);
                    self.changed.notify_all();
                }
            }
        }
    }

    /// Apply one watch event to the cache and to the captured pods. Then
    /// a repair scan is due: `Some(None)` of every pod when a complete
    /// list just ended, `Some(Some(pod))` of one pod that just started
    /// running or changed.
    fn on_event(&self, agent: &Agent, e: watcher::Event<Pod>) -> Option<Option<String>> {
        {
            let mut st = lock(&self.state);
            if !st.connected && st.last_error.is_some() {
                tracing::info!("Kubernetes pod watch reconnected");
            }
            st.connected = true;
            st.last_error = None;
        }
        let mut scan = None;
        match e {
            watcher::Event::Init => {
                self.count(|c| &mut c.events, "init");
                lock(&self.state).generation += 1;
            }
            watcher::Event::InitApply(p) => {
                self.count(|c| &mut c.events, "init_apply");
                // Repair waits for the whole list (InitDone).
                self.on_apply(agent, &p);
            }
            watcher::Event::Apply(p) => {
                self.count(|c| &mut c.events, "apply");
                if self.on_apply(agent, &p) {
                    scan = Some(Some(key_of(&p)));
                }
            }
            watcher::Event::Delete(p) => {
                self.count(|c| &mut c.events, "delete");
                let key = key_of(&p);
                let mut st = lock(&self.state);
                st.pods.remove(&key);
                st.passthrough.remove(&key);
                tracing::debug!(pod = %key, "pod deleted from the API (its CNI DEL releases it)");
            }
            watcher::Event::InitDone => {
                self.count(|c| &mut c.events, "init_done");
                let mut st = lock(&self.state);
                let g = st.generation;
                let gone: Vec<String> = st
                    .pods
                    .iter()
                    .filter(|(_, p)| p.generation < g)
                    .map(|(k, _)| k.clone())
                    .collect();
                for k in &gone {
                    st.pods.remove(k);
                    st.passthrough.remove(k);
                }
                st.synced = true;
                tracing::info!(
                    pods = st.pods.len(),
                    dropped = gone.len(),
                    "pod list complete"
                );
                scan = Some(None);
            }
        }
        self.changed.notify_all();
        scan
    }

    /// A pod was added or changed (or listed): cache it, and bring its
    /// capture in line with its annotations when they changed. True when
    /// its decision changed or it just started running (worth a repair
    /// check: a pod that runs in the mesh uncaptured, e.g. because the
    /// plugin was cut out of the conflist, is found at once).
    fn on_apply(&self, agent: &Agent, p: &Pod) -> bool {
        let key = key_of(p);
        let value = match serde_json::to_value(p) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(pod = %key, error = %e, "pod object could not be read");
                return false;
            }
        };
        let decision = annotations::from_pod_on(&value, &self.opts.dns);
        let new_key = decision_key(&decision);
        let running = p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
        let (changed, started) = {
            let mut st = lock(&self.state);
            let generation = st.generation;
            let old = st.pods.insert(
                key.clone(),
                CachedPod {
                    uid: p.metadata.uid.clone().unwrap_or_default(),
                    mirror_of: p
                        .metadata
                        .annotations
                        .as_ref()
                        .and_then(|a| a.get(MIRROR_ANNOTATION))
                        .cloned(),
                    resource_version: p.metadata.resource_version.clone().unwrap_or_default(),
                    running,
                    decision,
                    generation,
                },
            );
            // First sight (agent start, relist) is checked too: the
            // annotations may have changed while no agent watched.
            let started = running && old.as_ref().is_some_and(|o| !o.running);
            (
                old.map(|o| decision_key(&o.decision)) != Some(new_key),
                started,
            )
        };
        if changed {
            self.reconcile_pod(agent, &key);
        }
        changed || started
    }

    /// Make the pod's capture match its cached decision.
    fn reconcile_pod(&self, agent: &Agent, key: &str) {
        let _apply = lock(&self.apply);
        let (decision, rv) = {
            let st = lock(&self.state);
            let Some(p) = st.pods.get(key) else { return };
            (p.decision.clone(), p.resource_version.clone())
        };
        let span = tracing::info_span!("pod_update", pod = %key, resource_version = %rv);
        let _g = span.enter();
        let captured: Vec<(u64, super::records::Record)> = agent
            .inner()
            .records
            .all()
            .into_iter()
            .filter(|(_, r)| r.pod == key)
            .collect();
        match decision {
            Err(e) => {
                if captured.is_empty() {
                    tracing::warn!(error = %e, "pod has an invalid capture annotation (a new sandbox of it will be refused)");
                    return;
                }
                self.count(|c| &mut c.updates, "rejected");
                match &e {
                    AnnotationError::Invalid {
                        annotation,
                        value,
                        reason,
                        ..
                    } => {
                        tracing::warn!(annotation = %annotation, value = %value, reason = %reason, "rejected annotation change: the pod keeps its current config")
                    }
                    AnnotationError::NotAPod(why) => {
                        tracing::warn!(reason = %why, "rejected pod update: the pod keeps its current config")
                    }
                }
            }
            Ok(PodCapture::NotInMesh { reason, .. }) => {
                for (cookie, rec) in captured {
                    let mut inner = agent.inner();
                    match attach::release_pod(&agent.pins, cookie) {
                        Ok(()) | Err(Error::NotCaptured(_)) => {
                            inner.records.remove(cookie);
                            drop(inner);
                            self.count(|c| &mut c.updates, "released");
                            lock(&self.state).passthrough.insert(
                                key.to_string(),
                                (PathBuf::from(&rec.netns), rec.container_id.clone()),
                            );
                            tracing::info!(cookie, %reason, "pod left the mesh: released");
                        }
                        Err(e) => {
                            drop(inner);
                            self.count(|c| &mut c.updates, "error");
                            tracing::warn!(cookie, error = %format!("{e:#}"), "pod left the mesh but could not be released");
                        }
                    }
                }
            }
            Ok(PodCapture::Mesh(m)) => {
                if captured.is_empty() {
                    let pass = lock(&self.state).passthrough.get(key).cloned();
                    if let Some((netns, cid)) = pass {
                        match agent.add(&netns, Some(key), Some(&cid), Some(&m.capture_config())) {
                            Ok(v) => {
                                lock(&self.state).passthrough.remove(key);
                                self.count(|c| &mut c.updates, "captured");
                                tracing::info!(cookie = ?v.cookie, config = %m.spec.istio_args(), "pod entered the mesh: captured");
                            }
                            Err(e) => {
                                self.count(|c| &mut c.updates, "error");
                                tracing::warn!(error = %e, "pod entered the mesh but could not be captured");
                            }
                        }
                    }
                    return;
                }
                for (cookie, rec) in captured {
                    let r = (|| -> Result<Option<String>, String> {
                        let maps = Maps::open(&agent.pins).map_err(|e| format!("{e:#}"))?;
                        let Some(cfg) = maps.pod(cookie) else {
                            return Ok(None);
                        };
                        let cur = PodSpec::from_kernel(
                            &cfg,
                            &maps.port_entries(cookie),
                            &maps.cidr_entries(cookie),
                        )
                        .with_interfaces(&maps.iface_entries(cookie));
                        drop(maps);
                        if comparable(&cur) == comparable(&m.spec) {
                            return Ok(None);
                        }
                        let ns =
                            Netns::open(Path::new(&rec.netns)).map_err(|e| format!("{e:#}"))?;
                        if ns.cookie().map_err(|e| format!("{e:#}"))? != cookie {
                            return Err(format!(
                                "{} is no longer the pod's network namespace",
                                rec.netns
                            ));
                        }
                        let mut inner = agent.inner();
                        inner
                            .inst
                            .register_pod(&ns, &m.spec)
                            .map_err(|e| format!("{e:#}"))?;
                        Ok(Some(cur.istio_args()))
                    })();
                    match r {
                        Ok(None) => tracing::debug!(cookie, "config unchanged"),
                        Ok(Some(old)) => {
                            self.count(|c| &mut c.updates, "updated");
                            tracing::info!(cookie, old = %old, new = %m.spec.istio_args(), "annotation change applied live");
                        }
                        Err(e) => {
                            self.count(|c| &mut c.updates, "error");
                            tracing::warn!(cookie, error = %e, "annotation change could not be applied: the pod keeps its current config");
                        }
                    }
                }
            }
        }
    }

    /// Wait (up to `--pod-wait-ms`) until the watch can answer for `key`.
    fn wait_pod(&self, key: &str, uid: Option<&str>) -> Result<(), (&'static str, String)> {
        let deadline = Instant::now() + self.opts.pod_wait;
        let mut st = lock(&self.state);
        loop {
            let found = st.pods.get(key);
            if st.connected && st.synced {
                if let Some(p) = found {
                    if uid.is_none_or(|u| u == p.uid || p.mirror_of.as_deref() == Some(u)) {
                        return Ok(());
                    }
                }
            }
            let now = Instant::now();
            if now >= deadline {
                let ms = self.opts.pod_wait.as_millis();
                return Err(if !st.connected {
                    (
                        "unreachable",
                        format!(
                            "Kubernetes API unreachable ({}): cannot tell whether pod {key} has a sidecar, refusing to start it uncaptured",
                            st.last_error.as_deref().unwrap_or("the pod watch has not connected yet")
                        ),
                    )
                } else if !st.synced {
                    ("unreachable", format!("the pod watch has not finished its first list after {ms} ms: cannot tell whether pod {key} has a sidecar"))
                } else if let (Some(p), Some(u)) = (found, uid) {
                    ("unknown", format!("pod {key} in the Kubernetes API has uid {}, not K8S_POD_UID {u} (still an older pod of that name after {ms} ms)", p.uid))
                } else {
                    (
                        "unknown",
                        format!("pod {key} is not known to the Kubernetes API (not among the pods of node {} after waiting {ms} ms)", self.opts.node_name),
                    )
                });
            }
            st = self
                .changed
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// The cached decision for a pod.
    fn decision(&self, key: &str) -> Option<Result<PodCapture, AnnotationError>> {
        lock(&self.state).pods.get(key).map(|p| p.decision.clone())
    }

    /// Running pods in the mesh that the agent has not captured.
    pub fn uncaptured(&self, agent: &Agent) -> Vec<(String, String)> {
        let recorded: HashSet<String> = agent
            .inner()
            .records
            .all()
            .into_iter()
            .map(|(_, r)| r.pod)
            .collect();
        let st = lock(&self.state);
        let mut v: Vec<(String, String)> = st
            .pods
            .iter()
            .filter(|(k, p)| {
                p.running && matches!(p.decision, Ok(PodCapture::Mesh(_))) && !recorded.contains(*k)
            })
            .map(|(k, p)| (k.clone(), p.uid.clone()))
            .collect();
        v.sort();
        v
    }

    /// After a complete list (or for `only`, a pod that just started
    /// running or changed): report (and with `--repair delete`, delete)
    /// the running mesh pods that are not captured.
    async fn repair(&self, agent: &Agent, client: &Client, only: Option<&str>) {
        let pods: Vec<(String, String)> = self
            .uncaptured(agent)
            .into_iter()
            .filter(|(k, _)| only.is_none_or(|o| o == k))
            .collect();
        if pods.is_empty() {
            return;
        }
        for (key, uid) in pods {
            self.count(|c| &mut c.repair, "reported");
            tracing::warn!(pod = %key, uid = %uid, repair = ?self.opts.repair, "running pod in the mesh is not captured (started before the agent or without redirect-cni)");
            if self.opts.repair != Repair::Delete || lock(&self.state).repaired.contains(&uid) {
                continue;
            }
            let (ns, name) = key.split_once('/').unwrap_or(("", &key));
            let api: Api<Pod> = Api::namespaced(client.clone(), ns);
            let dp = DeleteParams {
                preconditions: Some(Preconditions {
                    uid: Some(uid.clone()),
                    resource_version: None,
                }),
                ..DeleteParams::default()
            };
            match api.delete(name, &dp).await {
                Ok(_) => {
                    lock(&self.state).repaired.insert(uid.clone());
                    self.count(|c| &mut c.repair, "deleted");
                    tracing::warn!(pod = %key, uid = %uid, "deleted the uncaptured pod so its controller recreates it captured (--repair delete)");
                }
                Err(e) => {
                    self.count(|c| &mut c.repair, "delete_failed");
                    tracing::warn!(pod = %key, uid = %uid, error = %e, "could not delete the uncaptured pod");
                }
            }
        }
    }

    /// A CNI DEL: forget pods let through in that netns or container.
    pub fn forget(&self, netns: Option<&Path>, container_id: Option<&str>) {
        lock(&self.state).passthrough.retain(|_, (n, c)| {
            netns.is_none_or(|p| p != n.as_path())
                && container_id.is_none_or(|id| id.is_empty() || id != c.as_str())
        });
    }

    /// Gauges for `/metrics`: (connected, synced, cached pods).
    pub fn gauges(&self) -> (bool, bool, usize) {
        let st = lock(&self.state);
        (st.connected, st.synced, st.pods.len())
    }
}

impl Agent {
    /// A CNI ADD decided from the Kubernetes API (see the module docs).
    pub(super) fn add_from_api(
        &self,
        netns: &Path,
        pod: Option<&str>,
        container_id: Option<&str>,
        pod_uid: Option<&str>,
    ) -> Result<AddReply, AgentError> {
        let Some(w) = self.k8s.get() else {
            return Err(AgentError::invalid("this agent does not watch the Kubernetes API (run it in a cluster, or with --kubeconfig or --api-server): refusing a \"kubernetes\" add"));
        };
        let Some(key) = pod.filter(|p| {
            p.split_once('/')
                .is_some_and(|(a, b)| !a.is_empty() && !b.is_empty())
        }) else {
            return Err(AgentError::invalid(format!(
                "a \"kubernetes\" add needs \"pod\": \"namespace/name\", got {pod:?}"
            )));
        };
        check_netns_path(netns).map_err(AgentError::invalid)?;
        let t0 = Instant::now();
        if let Err((what, msg)) = w.wait_pod(key, pod_uid) {
            w.count(|c| &mut c.adds, what);
            tracing::warn!(pod = %key, netns = %netns.display(), error = %msg, "refused ADD (fail closed)");
            return Err(AgentError::new(ErrorKind::Kubernetes, msg));
        }
        let waited_ms = t0.elapsed().as_secs_f64() * 1000.0;
        let _apply = lock(&w.apply);
        match w.decision(key) {
            Some(Ok(PodCapture::Mesh(m))) => {
                let mut v = self.add(netns, Some(key), container_id, Some(&m.capture_config()));
                match &mut v {
                    Ok(v) => {
                        w.count(|c| &mut c.adds, "captured");
                        lock(&w.state).passthrough.remove(key);
                        v.api_wait_ms = Some(waited_ms);
                    }
                    Err(_) => w.count(|c| &mut c.adds, "error"),
                }
                v
            }
            Some(Ok(PodCapture::NotInMesh { reason, .. })) => {
                w.count(|c| &mut c.adds, "not_in_mesh");
                lock(&w.state).passthrough.insert(
                    key.to_string(),
                    (netns.to_path_buf(), container_id.unwrap_or("").to_string()),
                );
                tracing::info!(pod = %key, netns = %netns.display(), %reason, "pod passes through: not in the mesh");
                Ok(AddReply {
                    captured: false,
                    reason: Some(reason),
                    api_wait_ms: Some(waited_ms),
                    ..AddReply::default()
                })
            }
            Some(Err(e)) => {
                w.count(|c| &mut c.adds, "invalid");
                tracing::warn!(pod = %key, error = %e, "refused ADD: invalid capture annotation");
                Err(AgentError::invalid(e.to_string()))
            }
            // Deleted between the wait and now.
            None => {
                w.count(|c| &mut c.adds, "unknown");
                Err(AgentError::new(
                    ErrorKind::Kubernetes,
                    format!("pod {key} was deleted from the Kubernetes API during its ADD"),
                ))
            }
        }
    }

    /// CHECK for the API mode: a pod the API says is not in the mesh passes.
    pub(super) fn check_from_api(
        &self,
        netns: &Path,
        pod: Option<&str>,
    ) -> Result<CheckReply, AgentError> {
        if let (Some(w), Some(key)) = (self.k8s.get(), pod) {
            if let Some(Ok(PodCapture::NotInMesh { reason, .. })) = w.decision(key) {
                return Ok(CheckReply {
                    captured: Some(false),
                    reason: Some(reason),
                    ..CheckReply::default()
                });
            }
        }
        self.check(netns)
    }
}

/// The pod watch's metric families (see `metrics`).
pub fn metric_families(w: &PodWatch, agent: &Agent) -> Vec<super::metrics::Family> {
    use super::metrics::Family;
    let (connected, synced, pods) = w.gauges();
    let mut out = vec![
        Family::gauge(
            "redirect_agent_kubernetes_connected",
            "1 while the Kubernetes pod watch is connected.",
        )
        .with(&[], u64::from(connected)),
        Family::gauge(
            "redirect_agent_kubernetes_synced",
            "1 once the pod watch has completed a list of this node's pods.",
        )
        .with(&[], u64::from(synced)),
        Family::gauge(
            "redirect_agent_kubernetes_pods",
            "Pods of this node in the watch cache.",
        )
        .with(&[], pods as u64),
        Family::gauge(
            "redirect_agent_uncaptured_pods",
            "Running pods in the mesh on this node that the agent has not captured.",
        )
        .with(&[], w.uncaptured(agent).len() as u64),
    ];
    let c = lock(&w.counters);
    for (name, label, help, m) in [
        (
            "redirect_agent_kubernetes_events",
            "type",
            "Pod watch events, by type.",
            &c.events,
        ),
        (
            "redirect_agent_kubernetes_adds",
            "result",
            "CNI ADDs decided from the Kubernetes API, by result.",
            &c.adds,
        ),
        (
            "redirect_agent_kubernetes_updates",
            "result",
            "Live changes of captured pods from annotation changes, by result.",
            &c.updates,
        ),
        (
            "redirect_agent_repair",
            "action",
            "Uncaptured running mesh pods found after a pod list, by action.",
            &c.repair,
        ),
    ] {
        let mut f = Family::counter(name, help);
        for (k, n) in m {
            f.push(&[(label, k)], *n);
        }
        out.push(f);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn pod(annotations: Value) -> Value {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "cart-1", "namespace": "shop", "uid": "u-1", "resourceVersion": "7", "annotations": annotations},
            "spec": {"nodeName": "node-a", "containers": [
                {"name": "cart", "image": "cart"},
                {"name": "istio-proxy", "image": "proxyv2", "securityContext": {"runAsUser": 1337, "runAsGroup": 1337}}
            ]},
            "status": {"phase": "Running"}
        })
    }

    fn watch() -> PodWatch {
        PodWatch {
            opts: Options {
                api_server: None,
                kubeconfig: None,
                node_name: "node-a".into(),
                pod_wait: Duration::from_millis(100),
                repair: Repair::Report,
                dns: Default::default(),
            },
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            apply: Mutex::new(()),
            counters: Mutex::new(Counters::default()),
        }
    }

    fn cache(w: &PodWatch, p: &Value) {
        let typed: Pod = serde_json::from_value(p.clone()).unwrap();
        let mut st = lock(&w.state);
        st.pods.insert(
            key_of(&typed),
            CachedPod {
                uid: typed.metadata.uid.clone().unwrap(),
                mirror_of: typed
                    .metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(MIRROR_ANNOTATION))
                    .cloned(),
                resource_version: "7".into(),
                running: true,
                decision: annotations::from_pod(&serde_json::to_value(&typed).unwrap()),
                generation: 0,
            },
        );
    }

    #[test]
    fn typed_pod_round_trip_keeps_the_annotations_meaning() {
        // The watch decodes into k8s-openapi's Pod and re-encodes for
        // from_pod: the config must be the one of the raw JSON.
        let raw = pod(
            json!({"traffic.sidecar.istio.io/excludeOutboundPorts": "8081", "traffic.sidecar.istio.io/includeInboundPorts": ""}),
        );
        let typed: Pod = serde_json::from_value(raw.clone()).unwrap();
        let via = annotations::from_pod(&serde_json::to_value(&typed).unwrap()).unwrap();
        let direct = annotations::from_pod(&raw).unwrap();
        assert_eq!(via.mesh().unwrap().spec, direct.mesh().unwrap().spec);
        assert_eq!(key_of(&typed), "shop/cart-1");
    }

    #[test]
    fn kernel_round_trip_compares_equal_and_changes_do_not() {
        for ann in [
            json!({}),
            json!({"traffic.sidecar.istio.io/excludeOutboundPorts": "9090,8081,8081", "traffic.sidecar.istio.io/excludeOutboundIPRanges": "10.96.0.0/12,fd00::/8"}),
            json!({"traffic.sidecar.istio.io/includeOutboundIPRanges": "10.0.0.0/8,127.0.0.0/8", "traffic.sidecar.istio.io/includeInboundPorts": "9080,8080"}),
            json!({"traffic.sidecar.istio.io/includeInboundPorts": ""}),
            json!({"traffic.sidecar.istio.io/excludeInterfaces": "net1,eth+", "traffic.sidecar.istio.io/kubevirtInterfaces": "tap0"}),
            // DNS capture, owner groups (out of order), the loopback range.
            json!({"proxy.istio.io/config": "{\"proxyMetadata\":{\"ISTIO_META_DNS_CAPTURE\":\"true\",\"ISTIO_OUTBOUND_OWNER_GROUPS\":\"3000,2000\",\"ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR\":\"127.0.0.0/8\"}}"}),
            json!({"proxy.istio.io/config": "{\"proxyMetadata\":{\"ISTIO_META_DNS_CAPTURE\":\"true\",\"ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE\":\"7\"}}"}),
        ] {
            let spec = annotations::from_pod(&pod(ann.clone()))
                .unwrap()
                .mesh()
                .unwrap()
                .spec
                .clone();
            let addrs = [
                "10.244.1.17".parse().unwrap(),
                "fd00:200::2".parse().unwrap(),
            ];
            let ifaces = crate::podnet::PodNet::default()
                .iface_entries(&spec.exclude_interfaces, &spec.kube_virt_interfaces);
            let back = PodSpec::from_kernel(
                &spec.pod_config(42),
                &spec.port_entries(),
                &spec.cidr_entries(&addrs),
            )
            .with_interfaces(&ifaces);
            assert_eq!(comparable(&back), comparable(&spec), "{ann}");
            // Without its interface entries the config reads differently.
            if !spec.exclude_interfaces.is_empty() {
                let bare = PodSpec::from_kernel(&spec.pod_config(42), &spec.port_entries(), &[]);
                assert_ne!(comparable(&bare), comparable(&spec), "{ann}");
            }
        }
        let a = annotations::from_pod(&pod(
            json!({"traffic.sidecar.istio.io/excludeOutboundPorts": "8081"}),
        ))
        .unwrap();
        let b = annotations::from_pod(&pod(
            json!({"traffic.sidecar.istio.io/excludeOutboundPorts": "8080"}),
        ))
        .unwrap();
        assert_ne!(
            comparable(&a.mesh().unwrap().spec),
            comparable(&b.mesh().unwrap().spec)
        );
        assert_ne!(decision_key(&Ok(a.clone())), decision_key(&Ok(b)));
        assert_eq!(decision_key(&Ok(a.clone())), decision_key(&Ok(a)));
    }

    #[test]
    fn decisions_of_pod_changes() {
        let mesh = annotations::from_pod(&pod(json!({})));
        assert!(
            decision_key(&mesh).starts_with("mesh -p 15001"),
            "{}",
            decision_key(&mesh)
        );
        let none =
            annotations::from_pod(&pod(json!({"sidecar.istio.io/interceptionMode": "NONE"})));
        assert!(
            decision_key(&none).starts_with("not in mesh"),
            "{}",
            decision_key(&none)
        );
        let bad = annotations::from_pod(&pod(
            json!({"traffic.sidecar.istio.io/excludeOutboundPorts": "8080,http"}),
        ));
        let k = decision_key(&bad);
        assert!(
            k.starts_with("invalid")
                && k.contains("traffic.sidecar.istio.io/excludeOutboundPorts")
                && k.contains("8080,http"),
            "{k}"
        );
    }

    #[test]
    fn unknown_pod_rule() {
        let w = watch();
        // Never connected: unreachable, after the bounded wait.
        let t0 = Instant::now();
        let (what, msg) = w.wait_pod("shop/cart-1", None).unwrap_err();
        assert!(t0.elapsed() >= Duration::from_millis(100));
        assert_eq!(what, "unreachable", "{msg}");
        assert!(msg.contains("Kubernetes API unreachable"), "{msg}");
        // Connected but no complete list yet.
        lock(&w.state).connected = true;
        let (what, msg) = w.wait_pod("shop/cart-1", None).unwrap_err();
        assert_eq!(what, "unreachable");
        assert!(msg.contains("first list"), "{msg}");
        // Synced, pod absent: unknown.
        lock(&w.state).synced = true;
        let (what, msg) = w.wait_pod("shop/cart-1", None).unwrap_err();
        assert_eq!(what, "unknown");
        assert!(
            msg.contains("shop/cart-1 is not known to the Kubernetes API")
                && msg.contains("node-a"),
            "{msg}"
        );
        // Arrives while waiting: found.
        let p = pod(json!({}));
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(30));
                cache(&w, &p);
                w.changed.notify_all();
            });
            assert!(w.wait_pod("shop/cart-1", Some("u-1")).is_ok());
        });
        // Another incarnation of the name: not taken for this one.
        let (what, msg) = w.wait_pod("shop/cart-1", Some("u-2")).unwrap_err();
        assert_eq!(what, "unknown");
        assert!(msg.contains("not K8S_POD_UID u-2"), "{msg}");
        // A static pod: the API holds its mirror pod, whose annotation names
        // the static pod's uid (what the kubelet passes).
        let mut mirror = pod(json!({MIRROR_ANNOTATION: "static-uid-9"}));
        mirror["metadata"]["name"] = json!("etcd-node-a");
        cache(&w, &mirror);
        assert!(w.wait_pod("shop/etcd-node-a", Some("static-uid-9")).is_ok());
        assert!(
            w.wait_pod("shop/etcd-node-a", Some("u-1")).is_ok(),
            "its own uid too"
        );
        assert!(w.wait_pod("shop/etcd-node-a", Some("other")).is_err());
        // The API went away: even a cached pod is refused.
        {
            let mut st = lock(&w.state);
            st.connected = false;
            st.last_error = Some("connection refused".into());
        }
        let (what, msg) = w.wait_pod("shop/cart-1", Some("u-1")).unwrap_err();
        assert_eq!(what, "unreachable");
        assert!(msg.contains("connection refused"), "{msg}");
    }

    #[test]
    fn forget_drops_passthrough_by_netns_or_container() {
        let w = watch();
        {
            let mut st = lock(&w.state);
            st.passthrough
                .insert("a/x".into(), (PathBuf::from("/run/netns/x"), "c1".into()));
            st.passthrough
                .insert("a/y".into(), (PathBuf::from("/run/netns/y"), "c2".into()));
            st.passthrough
                .insert("a/z".into(), (PathBuf::from("/run/netns/z"), "c3".into()));
        }
        w.forget(Some(Path::new("/run/netns/x")), None);
        w.forget(None, Some("c2"));
        w.forget(None, Some(""));
        let left: Vec<String> = lock(&w.state).passthrough.keys().cloned().collect();
        assert_eq!(left, vec!["a/z".to_string()]);
    }
}
