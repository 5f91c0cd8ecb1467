//! RECORDED-CONTRACT fixture of the Kubernetes API: no kube-apiserver can
//! run here, so this small HTTP/1.1 server (std only, 127.0.0.1 in the root
//! netns, reached only by the daemon under test) serves the recorded API
//! responses of `tests/fixtures/kube/` to the daemon's real kube-rs client:
//!
//! * `GET /api/v1/pods?fieldSelector=...` (no `watch`): the pod list, as the
//!   fixture's current state (the list fixture, changed by the events
//!   played so far), with its resourceVersion;
//! * `GET /api/v1/pods?watch=true&...`: a chunked watch stream; the test
//!   plays the recorded events into it one at a time. An ERROR event (410
//!   Gone) ends the stream, as the API server does;
//! * `DELETE /api/v1/namespaces/<ns>/pods/<name>`: recorded, answered with
//!   the pod object (repair);
//! * anything else: a 404 `Status`.
//!
//! Every request is recorded (method, path, query), so the tests check the
//! client's side of the contract too (field selector, resourceVersion,
//! bookmarks). `shutdown` closes the listener and every open connection
//! (the API going away); `restart` listens again on the same port.
#![allow(dead_code)]

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc, Mutex,
    },
    time::{Duration, Instant},
};

use serde_json::{json, Value};

pub fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/kube")
}

/// The recorded pod list.
pub fn pod_list() -> Value {
    let p = fixture_dir().join("pod-list.json");
    serde_json::from_str(
        &std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())),
    )
    .unwrap()
}

/// The recorded watch events, in order (one JSON object per line).
pub fn watch_events() -> Vec<Value> {
    let p = fixture_dir().join("watch-stream.jsonl");
    std::fs::read_to_string(&p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{}: {e}: {l}", p.display())))
        .collect()
}

/// A pod of the list fixture by name prefix (`cart-`, `ratings-`, ...).
pub fn listed_pod(prefix: &str) -> Value {
    pod_list()["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["metadata"]["name"].as_str().unwrap().starts_with(prefix))
        .cloned()
        .unwrap_or_else(|| panic!("no {prefix} pod in the fixture"))
}

#[derive(Debug, Clone)]
pub struct Req {
    pub method: String,
    pub path: String,
    pub query: BTreeMap<String, String>,
    pub body: String,
}

impl Req {
    pub fn is_watch(&self) -> bool {
        self.query.get("watch").map(String::as_str) == Some("true")
    }
}

struct Shared {
    /// `namespace/name` → pod object, as a list returns them now.
    pods: BTreeMap<String, Value>,
    resource_version: String,
    requests: Vec<Req>,
    /// Senders of the open watch streams.
    watches: Vec<mpsc::Sender<Option<String>>>,
    /// Open connections, shut down by `shutdown`.
    conns: Vec<TcpStream>,
    /// Answer pod lists and watches with 403 (RBAC without `list`).
    forbidden: bool,
}

pub struct ApiFixture {
    pub addr: SocketAddr,
    shared: Arc<Mutex<Shared>>,
    stop: Arc<AtomicBool>,
    accept: Option<std::thread::JoinHandle<()>>,
}

fn key(p: &Value) -> String {
    format!(
        "{}/{}",
        p["metadata"]["namespace"].as_str().unwrap_or(""),
        p["metadata"]["name"].as_str().unwrap_or("")
    )
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let h = std::str::from_utf8(&b[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match h {
                    Some(c) => {
                        out.push(c);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl ApiFixture {
    /// Serve the recorded list on 127.0.0.1 (a free port).
    pub fn start() -> ApiFixture {
        ApiFixture::start_with(pod_list()["items"].as_array().unwrap().clone())
    }

    /// Serve these pods (recorded ones, renamed for a test) as the list.
    pub fn start_with(items: Vec<Value>) -> ApiFixture {
        let pods = items.iter().map(|p| (key(p), p.clone())).collect();
        let rv = pod_list()["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .to_string();
        let shared = Arc::new(Mutex::new(Shared {
            pods,
            resource_version: rv,
            requests: Vec::new(),
            watches: Vec::new(),
            conns: Vec::new(),
            forbidden: false,
        }));
        let l = TcpListener::bind("127.0.0.1:0").expect("binding the API fixture on 127.0.0.1");
        let addr = l.local_addr().unwrap();
        let mut f = ApiFixture {
            addr,
            shared,
            stop: Arc::new(AtomicBool::new(false)),
            accept: None,
        };
        f.serve(l);
        f
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn serve(&mut self, l: TcpListener) {
        let (shared, stop) = (self.shared.clone(), self.stop.clone());
        l.set_nonblocking(true).unwrap();
        self.accept = Some(std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                match l.accept() {
                    Ok((c, _)) => {
                        let _ = c.set_nonblocking(false);
                        if let Ok(c2) = c.try_clone() {
                            shared.lock().unwrap().conns.push(c2);
                        }
                        let (shared, stop) = (shared.clone(), stop.clone());
                        std::thread::spawn(move || handle(c, &shared, &stop));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        }));
    }

    /// The API goes away: no listener, every connection closed.
    pub fn shutdown(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        let mut s = self.shared.lock().unwrap();
        for w in s.watches.drain(..) {
            let _ = w.send(None);
        }
        for c in s.conns.drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Listen again on the same address.
    pub fn restart(&mut self) {
        assert!(self.accept.is_none(), "restart after shutdown only");
        self.stop = Arc::new(AtomicBool::new(false));
        let l = TcpListener::bind(self.addr).expect("rebinding the API fixture");
        self.serve(l);
    }

    pub fn requests(&self) -> Vec<Req> {
        self.shared.lock().unwrap().requests.clone()
    }

    /// The lists of the watch (not the one-item probes the daemon makes
    /// while its watch is failing).
    pub fn lists(&self) -> Vec<Req> {
        self.requests()
            .into_iter()
            .filter(|r| {
                r.method == "GET"
                    && !r.is_watch()
                    && r.query.get("limit").map(String::as_str) != Some("1")
            })
            .collect()
    }

    pub fn watches(&self) -> Vec<Req> {
        self.requests()
            .into_iter()
            .filter(|r| r.is_watch())
            .collect()
    }

    /// From now on, pod lists and watches get the API server's 403 for a
    /// service account without the verb (or not, with `false`).
    pub fn set_forbidden(&self, on: bool) {
        self.shared.lock().unwrap().forbidden = on;
    }

    /// Number of watch streams open now.
    pub fn open_watches(&self) -> usize {
        self.shared.lock().unwrap().watches.len()
    }

    /// Wait until `n` watch requests have been made and one is open.
    pub fn wait_watching(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.watches().len() < n || self.open_watches() == 0 {
            assert!(
                Instant::now() < deadline,
                "no watch #{n} from the daemon; requests: {:?}",
                self.requests()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Play one recorded event: the fixture's state follows it (for a
    /// later list) and every open watch stream gets the line.
    pub fn play(&self, ev: &Value) {
        let mut s = self.shared.lock().unwrap();
        let obj = &ev["object"];
        match ev["type"].as_str().unwrap() {
            "ADDED" | "MODIFIED" => {
                let mut p = obj.clone();
                if let Some(m) = p.as_object_mut() {
                    m.remove("kind");
                    m.remove("apiVersion");
                }
                s.pods.insert(key(obj), p);
            }
            "DELETED" => {
                s.pods.remove(&key(obj));
            }
            _ => {}
        }
        if let Some(rv) = obj["metadata"]["resourceVersion"].as_str() {
            s.resource_version = rv.to_string();
        }
        let line = format!("{ev}\n");
        s.watches.retain(|w| w.send(Some(line.clone())).is_ok());
        if ev["type"] == "ERROR" {
            // The API server ends a watch after an ERROR event.
            for w in s.watches.drain(..) {
                let _ = w.send(None);
            }
        }
    }
}

impl Drop for ApiFixture {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn respond(c: &mut TcpStream, status: &str, body: &str) -> bool {
    write!(
        c,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .is_ok()
        && c.flush().is_ok()
}

fn status_body(code: u16, reason: &str, msg: &str) -> String {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": msg, "reason": reason, "code": code}).to_string()
}

/// One connection: requests served one after the other (HTTP/1.1
/// keep-alive, as the API server does: a client reuses a connection after
/// a list, and after a watch that ended).
fn handle(mut c: TcpStream, shared: &Mutex<Shared>, stop: &AtomicBool) {
    let mut r = BufReader::new(c.try_clone().unwrap());
    while !stop.load(Ordering::SeqCst) && serve_one(&mut r, &mut c, shared, stop) {}
    let _ = c.shutdown(std::net::Shutdown::Both);
}

/// Serve one request; false when the connection is done.
fn serve_one(
    r: &mut BufReader<TcpStream>,
    c: &mut TcpStream,
    shared: &Mutex<Shared>,
    stop: &AtomicBool,
) -> bool {
    let mut line = String::new();
    if r.read_line(&mut line).unwrap_or(0) == 0 {
        return false;
    }
    let mut len = 0usize;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).unwrap_or(0) == 0 {
            return false;
        }
        if h == "\r\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut body = vec![0u8; len.min(1 << 20)];
    if r.read_exact(&mut body).is_err() {
        return false;
    }
    let mut parts = line.split_whitespace();
    let (method, target) = (
        parts.next().unwrap_or("").to_string(),
        parts.next().unwrap_or(""),
    );
    let (path, q) = target.split_once('?').unwrap_or((target, ""));
    let query: BTreeMap<String, String> = q
        .split('&')
        .filter(|s| !s.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (decode(k), decode(v))
        })
        .collect();
    let req = Req {
        method: method.clone(),
        path: path.to_string(),
        query,
        body: String::from_utf8_lossy(&body).into_owned(),
    };
    shared.lock().unwrap().requests.push(req.clone());

    let forbidden = shared.lock().unwrap().forbidden;
    match (method.as_str(), path) {
        ("GET", "/api/v1/pods") if forbidden => {
            let verb = if req.is_watch() { "watch" } else { "list" };
            let msg = format!("pods is forbidden: User \"system:serviceaccount:redirect-system:redirect-agent\" cannot {verb} resource \"pods\" in API group \"\" at the cluster scope");
            respond(c, "403 Forbidden", &status_body(403, "Forbidden", &msg))
        }
        ("GET", "/api/v1/pods") if !req.is_watch() => {
            let s = shared.lock().unwrap();
            // Only this node's pods: the fixture's pods all run on node-a.
            let items: Vec<Value> = if req.query.get("fieldSelector").map(String::as_str)
                == Some("spec.nodeName=node-a")
            {
                s.pods.values().cloned().collect()
            } else {
                Vec::new()
            };
            let body = json!({"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": s.resource_version}, "items": items});
            drop(s);
            respond(c, "200 OK", &body.to_string())
        }
        ("GET", "/api/v1/pods") => {
            let (tx, rx) = mpsc::channel();
            shared.lock().unwrap().watches.push(tx);
            if write!(c, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n").is_err() || c.flush().is_err() {
                return false;
            }
            while !stop.load(Ordering::SeqCst) {
                match rx.recv_timeout(Duration::from_millis(100)) {
                    Ok(Some(line)) => {
                        if write!(c, "{:x}\r\n{line}\r\n", line.len()).is_err()
                            || c.flush().is_err()
                        {
                            return false;
                        }
                    }
                    Ok(None) | Err(mpsc::RecvTimeoutError::Disconnected) => break,
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                }
            }
            // The stream ends; the connection stays open for the next request.
            write!(c, "0\r\n\r\n").is_ok() && c.flush().is_ok()
        }
        ("DELETE", p) if p.starts_with("/api/v1/namespaces/") && p.contains("/pods/") => {
            let rest = &p["/api/v1/namespaces/".len()..];
            let (ns, name) = rest.split_once("/pods/").unwrap_or(("", ""));
            let pod = shared
                .lock()
                .unwrap()
                .pods
                .get(&format!("{ns}/{name}"))
                .cloned();
            match pod {
                Some(mut pod) => {
                    pod["kind"] = json!("Pod");
                    pod["apiVersion"] = json!("v1");
                    pod["metadata"]["deletionTimestamp"] = json!("2026-11-25T09:30:00Z");
                    pod["metadata"]["deletionGracePeriodSeconds"] = json!(30);
                    respond(c, "200 OK", &pod.to_string())
                }
                None => respond(
                    c,
                    "404 Not Found",
                    &status_body(404, "NotFound", &format!("pods \"{name}\" not found")),
                ),
            }
        }
        _ => respond(
            c,
            "404 Not Found",
            &status_body(
                404,
                "NotFound",
                "the server could not find the requested resource",
            ),
        ),
    }
}
