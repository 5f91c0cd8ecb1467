//! The node agent behind `redirect daemon`: one loaded [`Installation`]
//! shared by every request, the cgroup programs attached once, pods
//! captured and released on request over a root-only unix socket (the CNI
//! plugin is its client), and Prometheus metrics.
//!
//! All state is on bpffs (the kernel maps plus the agent's pod records),
//! so the agent can stop and start at any time: nothing is detached when it
//! exits, and a new agent picks up where the old one left off.

pub mod http;
pub mod ifwatch;
pub mod k8s;
pub mod metrics;
pub mod records;
pub mod tracehub;

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Read, Write},
    os::fd::AsRawFd,
    os::unix::{
        fs::{MetadataExt, PermissionsExt},
        net::{UnixListener, UnixStream},
    },
    path::{Path, PathBuf},
    sync::{Condvar, Mutex},
    time::Duration,
};

use crate::wire::{
    check_netns_path, reply_line, AddReply, AgentError, CheckReply, DelReply, ErrorKind, ListReply,
    ListedPod, Reply, Request, TraceReply, UncapturedPod, MAX_LINE,
};
use crate::{
    attach::{self, Installation},
    error::{Error, Result},
    maps::Maps,
    pins::Pins,
    sys::{self, Netns},
};
use records::{Record, Records};

/// Counters the agent keeps about itself (the kernel's are read from the
/// maps at scrape time).
#[derive(Default)]
pub struct AgentCounters {
    /// (op, result) → count, for every request served.
    pub requests: BTreeMap<(&'static str, &'static str), u64>,
    pub attach_ok: u64,
    pub attach_errors: u64,
    pub detach_ok: u64,
    pub detach_errors: u64,
    pub reconcile_released: u64,
    /// Captures refused because a map was full, by map name.
    pub map_full: BTreeMap<&'static str, u64>,
    /// CNI conflist entry / plugin binary put back after something else
    /// removed them, by what ("entry", "binary").
    pub cni_restored: BTreeMap<&'static str, u64>,
    /// Failed checks of the conflist entry (unreadable or invalid file).
    pub cni_check_errors: u64,
}

struct Inner {
    inst: Installation,
    records: Records,
}

/// Requests being served, and whether new ones are still accepted.
#[derive(Default)]
struct Gate {
    stopping: bool,
    inflight: usize,
}

pub struct Agent {
    pub pins: Pins,
    pub cgroup: PathBuf,
    inner: Mutex<Inner>,
    pub counters: Mutex<AgentCounters>,
    gate: Mutex<Gate>,
    idle: Condvar,
    /// The agent's own netns: never captured.
    own_netns_inode: u64,
    /// The Kubernetes pod watch, when the agent uses the API.
    pub k8s: std::sync::OnceLock<std::sync::Arc<k8s::PodWatch>>,
    /// `--map-size`: used when the install is (re)created.
    sizes: crate::mapsize::MapSizes,
    /// Links switched to this version's programs at start (`upgrade`).
    pub programs_updated: Vec<String>,
    /// The install's acceleration probe result (None: did not complete).
    pub accel_probe: Option<crate::probe::ProbeResult>,
    /// The clients of the `trace` op, and the reader serving them.
    pub trace: tracehub::TraceHub,
}

/// What reconciliation did at start.
#[derive(Debug, Default, serde::Serialize)]
pub struct Reconciled {
    pub kept: Vec<u64>,
    pub released: Vec<u64>,
    pub stale_records: Vec<u64>,
}

impl Agent {
    /// Load the install (creating it if needed), attach the cgroup
    /// programs (once per cgroup: an existing attachment is kept), open the
    /// pod records.
    pub fn start(pin_dir: &Path, cgroup: &Path) -> Result<(Agent, bool)> {
        Self::start_with(pin_dir, cgroup, &crate::mapsize::MapSizes::default())
    }

    /// `start`, creating a new install's maps with `sizes` (an existing
    /// install must match them, see `mapsize::check_install`).
    pub fn start_with(
        pin_dir: &Path,
        cgroup: &Path,
        sizes: &crate::mapsize::MapSizes,
    ) -> Result<(Agent, bool)> {
        sys::open_cgroup(cgroup)?;
        let mut inst = Installation::open_with(pin_dir, sizes)?;
        let programs_updated = inst.update_programs()?;
        let newly = inst.attach_cgroup(cgroup)?;
        // The acceleration probe (once per install, ~1 s) runs now rather
        // than in the first pod's ADD. Not fatal: without a conclusive
        // result pods start with acceleration off (and say why).
        let accel_probe = match inst.probe_accel() {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!("acceleration probe did not complete: {e}; pods get acceleration only when forced");
                None
            }
        };
        let records = Records::open_or_create(&inst.pins)?;
        let own = std::fs::metadata("/proc/self/ns/net")
            .map_err(|e| Error::io("reading", "/proc/self/ns/net", e))?
            .ino();
        Ok((
            Agent {
                pins: inst.pins.clone(),
                cgroup: cgroup.to_path_buf(),
                inner: Mutex::new(Inner { inst, records }),
                counters: Mutex::new(AgentCounters::default()),
                gate: Mutex::new(Gate::default()),
                idle: Condvar::new(),
                own_netns_inode: own,
                k8s: std::sync::OnceLock::new(),
                sizes: sizes.clone(),
                programs_updated,
                accel_probe,
                trace: tracehub::TraceHub::default(),
            },
            newly,
        ))
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn counters(&self) -> std::sync::MutexGuard<'_, AgentCounters> {
        self.counters.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Release the pods whose network namespace no longer exists (their
    /// DEL was missed while no agent ran) and forget records of pods that
    /// are no longer captured.
    pub fn reconcile(&self) -> Result<Reconciled> {
        let mut inner = self.inner();
        let maps = Maps::open(&self.pins)?;
        let mut out = Reconciled::default();
        for (cookie, cfg) in maps.pods() {
            let hint = inner
                .records
                .get(cookie)
                .and_then(|r| records::netns_path(&r));
            if netns_alive(cookie, cfg.netns_inode as u64, hint.as_deref()) {
                out.kept.push(cookie);
                continue;
            }
            match attach::release_pod(&self.pins, cookie) {
                Ok(()) | Err(Error::NotCaptured(_)) => {
                    let rec = inner.records.get(cookie).unwrap_or_default();
                    tracing::info!(cookie, pod = %rec.pod, container_id = %rec.container_id, netns = %rec.netns, "released pod whose network namespace is gone");
                    inner.records.remove(cookie);
                    out.released.push(cookie);
                }
                Err(e) => {
                    tracing::warn!(cookie, error = %format!("{e:#}"), "could not release pod whose network namespace is gone")
                }
            }
        }
        let captured: Vec<u64> = maps.pods().into_iter().map(|(c, _)| c).collect();
        for (cookie, _) in inner.records.all() {
            if !captured.contains(&cookie) {
                inner.records.remove(cookie);
                out.stale_records.push(cookie);
            }
        }
        drop(inner);
        self.counters().reconcile_released += out.released.len() as u64;
        Ok(out)
    }

    /// Serve one request.
    pub fn handle(&self, req: &Request) -> Result<Reply, AgentError> {
        let r = match req {
            Request::Add {
                netns,
                pod,
                container_id,
                kubernetes: true,
                pod_uid,
                ..
            } => self
                .add_from_api(
                    netns,
                    pod.as_deref(),
                    container_id.as_deref(),
                    pod_uid.as_deref(),
                )
                .map(Reply::Add),
            Request::Add {
                netns,
                pod,
                container_id,
                config,
                ..
            } => self
                .add(
                    netns,
                    pod.as_deref(),
                    container_id.as_deref(),
                    config.as_ref(),
                )
                .map(Reply::Add),
            Request::Del {
                netns,
                pod,
                container_id,
            } => {
                if let Some(w) = self.k8s.get() {
                    w.forget(netns.as_deref(), container_id.as_deref());
                }
                self.del(netns.as_deref(), pod.as_deref(), container_id.as_deref())
                    .map(Reply::Del)
            }
            Request::Check {
                netns,
                pod,
                kubernetes: true,
                ..
            } => self.check_from_api(netns, pod.as_deref()).map(Reply::Check),
            Request::Check { netns, .. } => self.check(netns).map(Reply::Check),
            Request::List => self.list().map(Reply::List),
            Request::Explain { query, pin_dir } => self
                .same_install(pin_dir.as_deref())
                .and_then(|()| {
                    crate::explain::explain(&self.pins, query)
                        .map_err(|e| AgentError::from_error(&e))
                })
                .map(|e| Reply::Explain(Box::new(e))),
            // Streams: served by `serve_conn` (`serve_trace`).
            Request::Trace { .. } => Err(AgentError::new(
                ErrorKind::BadRequest,
                "trace streams its lines on the connection it came on",
            )),
        };
        let result = if r.is_ok() { "ok" } else { "error" };
        *self
            .counters()
            .requests
            .entry((req.op(), result))
            .or_default() += 1;
        r
    }

    fn add(
        &self,
        netns: &Path,
        pod: Option<&str>,
        container_id: Option<&str>,
        config: Option<&crate::config::CaptureFlags>,
    ) -> Result<AddReply, AgentError> {
        let pod = pod.unwrap_or("");
        let cid = container_id.unwrap_or("");
        let span =
            tracing::info_span!("add", pod = %pod, container_id = %cid, netns = %netns.display());
        let _g = span.enter();
        let t0 = std::time::Instant::now();
        let r = (|| -> Result<AddReply, AgentError> {
            check_netns_path(netns).map_err(AgentError::invalid)?;
            let spec = config
                .cloned()
                .unwrap_or_default()
                .to_spec()
                .map_err(|e| AgentError::invalid(e.to_string()))?;
            let ns = Netns::open(netns).map_err(|e| AgentError::invalid(e.to_string()))?;
            if ns.inode == self.own_netns_inode {
                return Err(AgentError::invalid(format!(
                    "refusing to capture {}: it is the agent's own (host) network namespace",
                    netns.display()
                )));
            }
            let mut inner = self.inner();
            // Repair the install if something removed it underneath us
            // (`redirect uninstall`): reload, reattach.
            if !self.pins.is_installed() {
                tracing::warn!(
                    "install at {} is gone: loading it again",
                    self.pins.root.display()
                );
                inner.inst = Installation::open_with(&self.pins.root, &self.sizes)
                    .map_err(|e| AgentError::from_error(&e))?;
                inner.records =
                    Records::open_or_create(&self.pins).map_err(|e| AgentError::from_error(&e))?;
            }
            inner
                .inst
                .attach_cgroup(&self.cgroup)
                .map_err(|e| AgentError::from_error(&e))?;
            let opts = attach::Register {
                cgroup: Some(&self.cgroup),
                force: false,
            };
            let info = inner
                .inst
                .register_pod_with(&ns, &spec, &opts)
                .map_err(|e| {
                    if let Error::MapFull { map, .. } = &e {
                        *self.counters().map_full.entry(map).or_default() += 1;
                    }
                    AgentError::from_error(&e)
                })?;
            let rec = Record {
                container_id: cid.into(),
                pod: pod.into(),
                netns: netns.display().to_string(),
            };
            if let Err(e) = inner.records.put(info.cookie, &rec) {
                tracing::warn!(error = %format!("{e:#}"), "pod captured but not recorded (a DEL after its netns is gone will not find it; the next agent start releases it)");
            }
            let elapsed_ms = t0.elapsed().as_secs_f64() * 1000.0;
            tracing::info!(cookie = info.cookie, addresses = ?info.addresses, config = %spec.istio_args(), dns_capture = %spec.dns_capture().describe(), ipv6 = %info.ipv6.describe(), elapsed_ms, "captured pod");
            if spec.dns_capture() == crate::config::DnsCapture::AllUnknownNameservers {
                tracing::warn!(
                    cookie = info.cookie,
                    "DNS capture: {}",
                    spec.dns_capture().describe()
                );
            }
            Ok(AddReply {
                captured: true,
                cookie: Some(info.cookie),
                netns: Some(netns.to_path_buf()),
                addresses: info.addresses.clone(),
                istio_iptables_args: Some(spec.istio_args()),
                elapsed_ms: Some(elapsed_ms),
                ..AddReply::default()
            })
        })();
        let mut c = self.counters();
        match &r {
            Ok(_) => c.attach_ok += 1,
            Err(e) => {
                c.attach_errors += 1;
                tracing::warn!(error = %e, "capture failed");
            }
        }
        r
    }

    fn del(
        &self,
        netns: Option<&Path>,
        pod: Option<&str>,
        container_id: Option<&str>,
    ) -> Result<DelReply, AgentError> {
        let cid = container_id.unwrap_or("");
        let span = tracing::info_span!("del", pod = %pod.unwrap_or(""), container_id = %cid, netns = %netns.map(|p| p.display().to_string()).unwrap_or_default());
        let _g = span.enter();
        let t0 = std::time::Instant::now();
        let mut cookies = Vec::new();
        if let Some(p) = netns {
            match check_netns_path(p) {
                Ok(()) => {
                    if let Ok(ns) = Netns::open(p) {
                        if ns.inode != self.own_netns_inode {
                            if let Ok(c) = crate::podns::cookie(&ns) {
                                cookies.push(c);
                            }
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "ignoring the netns path of a DEL"),
            }
        }
        let mut inner = self.inner();
        if !cid.is_empty() {
            for c in inner.records.by_container(cid) {
                if !cookies.contains(&c) {
                    cookies.push(c);
                }
            }
        }
        let mut released = Vec::new();
        let mut errors = Vec::new();
        for cookie in cookies {
            match attach::release_pod(&self.pins, cookie) {
                Ok(()) => {
                    inner.records.remove(cookie);
                    released.push(cookie);
                }
                Err(Error::NotCaptured(_)) | Err(Error::NotInstalled(_)) => {
                    inner.records.remove(cookie)
                }
                Err(e) => errors.push(format!("{e:#}")),
            }
        }
        drop(inner);
        let mut c = self.counters();
        c.detach_ok += released.len() as u64;
        c.detach_errors += errors.len() as u64;
        drop(c);
        if !errors.is_empty() {
            tracing::warn!(errors = ?errors, "release failed");
            return Err(AgentError::failed(errors.join("; ")));
        }
        if released.is_empty() {
            tracing::debug!("nothing to release");
        } else {
            let elapsed_ms = t0.elapsed().as_secs_f64() * 1000.0;
            tracing::info!(cookies = ?released, elapsed_ms, "released pod");
        }
        Ok(DelReply {
            released,
            elapsed_ms: t0.elapsed().as_secs_f64() * 1000.0,
        })
    }

    fn check(&self, netns: &Path) -> Result<CheckReply, AgentError> {
        check_netns_path(netns).map_err(AgentError::invalid)?;
        let ns = Netns::open(netns).map_err(|e| AgentError::invalid(e.to_string()))?;
        let cookie = ns.cookie().map_err(|e| AgentError::failed(e.to_string()))?;
        let maps = Maps::open(&self.pins).map_err(|e| AgentError::failed(e.to_string()))?;
        if maps.pod(cookie).is_none() {
            return Err(AgentError::new(
                ErrorKind::NotCaptured,
                format!(
                    "{} (netns cookie {cookie}) is not captured",
                    netns.display()
                ),
            ));
        }
        if !self.pins.sk_lookup_link(cookie).exists() {
            return Err(AgentError::new(
                ErrorKind::NotCaptured,
                format!(
                    "{} (netns cookie {cookie}) has no inbound link",
                    netns.display()
                ),
            ));
        }
        Ok(CheckReply {
            cookie: Some(cookie),
            ..CheckReply::default()
        })
    }

    fn list(&self) -> Result<ListReply, AgentError> {
        let st =
            crate::report::status(&self.pins).map_err(|e| AgentError::failed(e.to_string()))?;
        let inner = self.inner();
        let pods: Vec<ListedPod> = st
            .pods
            .iter()
            .map(|p| {
                let rec = inner.records.get(p.netns_cookie).unwrap_or_default();
                ListedPod {
                    cookie: p.netns_cookie,
                    netns: if rec.netns.is_empty() {
                        p.netns.clone().unwrap_or_default()
                    } else {
                        rec.netns.clone()
                    },
                    pod: rec.pod,
                    container_id: rec.container_id,
                    istio_iptables_args: p.istio_iptables_args.clone(),
                    addresses: p.pod_addresses.clone(),
                    inbound_attached: p.inbound_attached,
                    inbound_listeners: p.inbound_listeners.iter().map(|l| l.to_string()).collect(),
                }
            })
            .collect();
        drop(inner);
        // Running mesh pods on this node that are not captured (repair).
        let uncaptured = self.k8s.get().map(|w| {
            w.uncaptured(self)
                .into_iter()
                .map(|(pod, uid)| UncapturedPod { pod, uid })
                .collect()
        });
        Ok(ListReply {
            pods,
            cgroups: st.cgroups,
            uncaptured,
        })
    }

    /// `explain` and `trace` name the client's install: refused when it is
    /// not this agent's (the client then reads it itself).
    fn same_install(&self, pin_dir: Option<&Path>) -> Result<(), AgentError> {
        let Some(theirs) = pin_dir else {
            return Ok(());
        };
        let canon = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
        if canon(theirs) != canon(&self.pins.root) {
            return Err(AgentError::new(
                ErrorKind::OtherInstall,
                format!(
                    "this agent serves the install at {}, not {}",
                    self.pins.root.display(),
                    theirs.display()
                ),
            ));
        }
        Ok(())
    }

    /// `trace`: the reply, then one line per event for this client until it
    /// closes the connection (or the agent stops).
    fn serve_trace(
        &self,
        s: &UnixStream,
        netns: Option<&Path>,
        pod: Option<&str>,
        filter: &crate::trace::Filter,
        pin_dir: Option<&Path>,
    ) {
        use crate::trace::Selection;
        let subscribed = (|| {
            self.same_install(pin_dir)?;
            filter.check().map_err(|e| AgentError::from_error(&e))?;
            if let Some(n) = netns {
                check_netns_path(n).map_err(AgentError::invalid)?;
            }
            let (selection, tracing) = if netns.is_none() && pod.is_none() {
                (Selection::All, vec!["*".to_string()])
            } else {
                let maps = Maps::open(&self.pins).map_err(|e| AgentError::from_error(&e))?;
                let t = crate::explain::target(&self.pins, &maps, netns, pod)
                    .map_err(|e| AgentError::from_error(&e))?;
                let name = t
                    .pod
                    .or(t.netns)
                    .unwrap_or_else(|| format!("netns cookie {}", t.cookie));
                (Selection::Pods([t.cookie].into()), vec![name])
            };
            let sub = self
                .trace
                .subscribe(&self.pins, selection, filter.clone())
                .map_err(AgentError::failed)?;
            Ok((sub, tracing))
        })();
        let (sub, tracing) = match subscribed {
            Ok(x) => x,
            Err(e) => {
                let _ = (&*s).write_all(format!("{}\n", reply_line(&Err(e))).as_bytes());
                return;
            }
        };
        let reply = Reply::Trace(TraceReply {
            tracing,
            reader_pid: std::process::id(),
        });
        if (&*s)
            .write_all(format!("{}\n", reply_line(&Ok(reply))).as_bytes())
            .is_err()
        {
            return;
        }
        tracing::info!(clients = self.trace.clients(), "trace client connected");
        loop {
            if self.gate.lock().map(|g| g.stopping).unwrap_or(true) {
                return;
            }
            match sub.rx.recv_timeout(Duration::from_millis(500)) {
                Ok(line) => {
                    let mut l = serde_json::to_string(&line).expect("lines serialize");
                    l.push('\n');
                    if (&*s).write_all(l.as_bytes()).is_err() {
                        return;
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    if peer_closed(s) {
                        return;
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
            }
        }
    }

    /// Pod names by cookie, for metric labels.
    pub fn pod_names(&self) -> BTreeMap<u64, String> {
        self.inner()
            .records
            .all()
            .into_iter()
            .map(|(c, r)| (c, r.pod))
            .collect()
    }

    /// Admit a request unless shutting down.
    fn enter(&self) -> bool {
        let mut g = self.gate.lock().unwrap_or_else(|p| p.into_inner());
        if g.stopping {
            return false;
        }
        g.inflight += 1;
        true
    }

    fn leave(&self) {
        let mut g = self.gate.lock().unwrap_or_else(|p| p.into_inner());
        g.inflight -= 1;
        if g.inflight == 0 {
            self.idle.notify_all();
        }
    }

    /// Refuse new requests and wait (up to `timeout`) for those being served.
    pub fn drain(&self, timeout: Duration) -> bool {
        let mut g = self.gate.lock().unwrap_or_else(|p| p.into_inner());
        g.stopping = true;
        let (g, _) = self
            .idle
            .wait_timeout_while(g, timeout, |g| g.inflight > 0)
            .unwrap_or_else(|p| p.into_inner());
        g.inflight == 0
    }

    /// Serve one client connection: request lines in, reply lines out.
    pub fn serve_conn(&self, s: UnixStream) {
        if let Err(why) = peer_is_root(&s) {
            tracing::warn!(%why, "refused a connection on the agent socket");
            // Take the request line first (bounded in size and time), so the
            // refusal is not lost to a reset of a socket closed unread.
            let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
            let _ = s.set_write_timeout(Some(Duration::from_millis(500)));
            let _ = BufReader::new(&s)
                .take(MAX_LINE as u64 + 1)
                .read_line(&mut String::new());
            let refusal = reply_line(&Err(AgentError::new(ErrorKind::Forbidden, why)));
            let _ = (&s).write_all(format!("{refusal}\n").as_bytes());
            return;
        }
        let _ = s.set_read_timeout(Some(Duration::from_secs(60)));
        let _ = s.set_write_timeout(Some(Duration::from_secs(10)));
        let mut r = BufReader::new(&s);
        loop {
            let mut line = String::new();
            match (&mut r).take(MAX_LINE as u64 + 1).read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            if line.len() > MAX_LINE {
                let too_long = AgentError::new(
                    ErrorKind::BadRequest,
                    format!("request longer than {MAX_LINE} bytes"),
                );
                let _ = (&s).write_all(format!("{}\n", reply_line(&Err(too_long))).as_bytes());
                return;
            }
            if line.trim().is_empty() {
                continue;
            }
            let reply = match serde_json::from_str::<Request>(&line) {
                Err(e) => Err(AgentError::new(
                    ErrorKind::BadRequest,
                    format!("bad request: {e}"),
                )),
                Ok(Request::Trace {
                    netns,
                    pod,
                    filter,
                    pin_dir,
                }) => {
                    if !self.enter() {
                        Err(AgentError::new(
                            ErrorKind::ShuttingDown,
                            "agent is shutting down",
                        ))
                    } else {
                        // The connection is the stream's from now on.
                        let _ = s.set_read_timeout(None);
                        self.serve_trace(
                            &s,
                            netns.as_deref(),
                            pod.as_deref(),
                            &filter,
                            pin_dir.as_deref(),
                        );
                        *self.counters().requests.entry(("trace", "ok")).or_default() += 1;
                        self.leave();
                        return;
                    }
                }
                Ok(req) => {
                    if !self.enter() {
                        Err(AgentError::new(
                            ErrorKind::ShuttingDown,
                            "agent is shutting down",
                        ))
                    } else {
                        let v = self.handle(&req);
                        self.leave();
                        v
                    }
                }
            };
            let reply = reply_line(&reply);
            if (&s).write_all(format!("{reply}\n").as_bytes()).is_err() {
                return;
            }
        }
    }
}

/// Has the client closed its end (a trace client stops this way)?
fn peer_closed(s: &UnixStream) -> bool {
    let mut pfd = libc::pollfd {
        fd: s.as_raw_fd(),
        events: libc::POLLIN | libc::POLLRDHUP,
        revents: 0,
    };
    let r = unsafe { libc::poll(&mut pfd, 1, 0) };
    if r <= 0 {
        return false;
    }
    if pfd.revents & (libc::POLLHUP | libc::POLLRDHUP | libc::POLLERR) != 0 {
        return true;
    }
    // Readable: anything it sends after the request is ignored; EOF ends it.
    let mut b = [0u8; 512];
    let n = unsafe {
        libc::recv(
            s.as_raw_fd(),
            b.as_mut_ptr().cast(),
            b.len(),
            libc::MSG_DONTWAIT,
        )
    };
    n == 0
}

/// Only root may talk to the agent (the socket is 0600 too).
fn peer_is_root(s: &UnixStream) -> std::result::Result<(), String> {
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(format!("SO_PEERCRED: {}", std::io::Error::last_os_error()));
    }
    if cred.uid != 0 {
        return Err(format!(
            "peer uid {} (pid {}) is not root",
            cred.uid, cred.pid
        ));
    }
    Ok(())
}

/// Bind the agent socket: 0600, owned by root, in a directory created
/// 0700 when missing. A stale socket file is replaced; a live agent on it
/// is an error.
pub fn bind_socket(path: &Path) -> Result<UnixListener> {
    if !path.is_absolute() {
        return Err(Error::io(
            "the agent socket path must be absolute",
            path,
            std::io::Error::from(std::io::ErrorKind::InvalidInput),
        ));
    }
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            sys::create_private_dir(dir)?;
        }
    }
    if let Ok(m) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !m.file_type().is_socket() {
            return Err(Error::io(
                "refusing to replace a non-socket file",
                path,
                std::io::Error::from(std::io::ErrorKind::AlreadyExists),
            ));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(Error::io(
                "another agent is already serving",
                path,
                std::io::Error::from(std::io::ErrorKind::AddrInUse),
            ));
        }
        std::fs::remove_file(path).map_err(|e| Error::io("removing stale socket", path, e))?;
    }
    // No window where the socket is reachable with wider permissions.
    let old = unsafe { libc::umask(0o177) };
    let l = UnixListener::bind(path);
    unsafe { libc::umask(old) };
    let l = l.map_err(|e| Error::io("binding the agent socket", path, e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| Error::io("chmod 0600", path, e))?;
    std::os::unix::fs::chown(path, Some(0), Some(0))
        .map_err(|e| Error::io("chown root:root", path, e))?;
    Ok(l)
}

/// Is the netns with this cookie still alive? It is found through its
/// recorded path, the named netns directories, nsfs bind mounts, or a
/// process inside it; the inode narrows the candidates and the cookie
/// (never reused) decides.
pub fn netns_alive(cookie: u64, inode: u64, hint: Option<&Path>) -> bool {
    find_netns(cookie, inode, hint).is_some()
}

/// A path to the netns with this cookie, found as `netns_alive` finds it.
pub fn find_netns(cookie: u64, inode: u64, hint: Option<&Path>) -> Option<PathBuf> {
    let matches = |p: &Path| -> bool {
        let same_inode = std::fs::metadata(p)
            .map(|m| m.ino() as u32 as u64 == inode as u32 as u64)
            .unwrap_or(false);
        same_inode
            && Netns::open(p)
                .and_then(|n| n.cookie())
                .map(|c| c == cookie)
                .unwrap_or(false)
    };
    if let Some(h) = hint.filter(|h| matches(h)) {
        return Some(h.to_path_buf());
    }
    let mut candidates: Vec<PathBuf> = Vec::new();
    for dir in ["/run/netns", "/var/run/netns"] {
        candidates.extend(crate::pins::read_dir(Path::new(dir)));
    }
    if let Ok(mi) = std::fs::read_to_string("/proc/self/mountinfo") {
        for l in mi.lines() {
            // ... mount-point ... - fstype source options
            let (left, right) = l.split_once(" - ").unwrap_or((l, ""));
            if right.split_whitespace().next() == Some("nsfs") {
                if let Some(mp) = left.split_whitespace().nth(4) {
                    candidates.push(PathBuf::from(mp.replace("\\040", " ")));
                }
            }
        }
    }
    if let Some(p) = candidates.into_iter().find(|p| matches(p)) {
        return Some(p);
    }
    crate::pins::read_dir(Path::new("/proc"))
        .iter()
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        })
        .map(|p| p.join("ns/net"))
        .find(|p| matches(p))
}
