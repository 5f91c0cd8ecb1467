//! The agent's `/metrics`, `/healthz` and `/readyz` endpoint as a scraper
//! sees it: every family and label parsed by the Prometheus Python client's
//! own parsers (text 0.0.4 and OpenMetrics, `cargo xtask setup` installs
//! them into target/tools/prometheus-client), and the HTTP side (keep-alive,
//! status codes, limits, shutdown) spoken to over raw TCP.

mod agent_support;

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::TcpStream,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use agent_support::*;
use redirect_tests::{Pod, UPSTREAM_V4};
use redirect_userspace::agent::http::{fetch, Fetched};
use serde_json::{json, Value};

const SELECT: &str =
    "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart;REDIRECT_CAPTURE=true";

/// What Prometheus 2.x/3.x sends.
const PROMETHEUS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

/// Parse an exposition with prometheus_client's parser for `format`
/// (`text` or `openmetrics`): families by name, each {type, samples:
/// [{name, labels, value}]}. A parse error fails the test.
fn parse(format: &str, body: &str) -> BTreeMap<String, Value> {
    let venv = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .join("target/tools/prometheus-client");
    let python = venv.join("bin/python");
    assert!(
        python.exists(),
        "{} missing: run `cargo xtask setup` (it installs prometheus-client from PyPI there)",
        python.display()
    );
    const SCRIPT: &str = r#"
import json, sys
from prometheus_client import parser
from prometheus_client.openmetrics import parser as om
text = sys.stdin.read()
p = om if sys.argv[1] == "openmetrics" else parser
out = [{"name": f.name, "type": f.type, "samples": [{"name": s.name, "labels": s.labels, "value": s.value} for s in f.samples]} for f in p.text_string_to_metric_families(text)]
print(json.dumps(out))
"#;
    let mut child = Command::new(&python)
        .args(["-c", SCRIPT, format])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running the prometheus_client parser");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "prometheus_client ({format}) rejects the exposition: {}\n{body}",
        String::from_utf8_lossy(&out.stderr)
    );
    let families: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    let mut by_name = BTreeMap::new();
    for f in families {
        let name = f["name"].as_str().unwrap().to_string();
        assert!(
            by_name.insert(name.clone(), f).is_none(),
            "{format}: family {name} twice\n{body}"
        );
    }
    by_name
}

/// Every family the agent exports without the Kubernetes API: name (as
/// the parsers name it: a counter without `_total`), type, label names.
const FAMILIES: [(&str, &str, &[&str]); 14] = [
    ("redirect_agent_ready", "gauge", &[]),
    ("redirect_agent_requests", "counter", &["op", "result"]),
    ("redirect_agent_attach", "counter", &["result"]),
    ("redirect_agent_detach", "counter", &["result"]),
    ("redirect_agent_reconcile_released", "counter", &[]),
    ("redirect_agent_cni_restored", "counter", &["what"]),
    ("redirect_agent_cni_check_errors", "counter", &[]),
    ("redirect_agent_map_full", "counter", &["map"]),
    ("redirect_pods", "gauge", &[]),
    (
        "redirect_decisions",
        "counter",
        &["pod", "netns_cookie", "chain", "rule", "target"],
    ),
    (
        "redirect_decision_bytes",
        "counter",
        &["pod", "netns_cookie", "chain", "rule", "target"],
    ),
    ("redirect_map_entries", "gauge", &["map"]),
    ("redirect_map_max_entries", "gauge", &["map"]),
    ("redirect_counters_lost", "counter", &[]),
];

/// The value of the sample `name` with exactly `labels`.
fn value(f: &BTreeMap<String, Value>, family: &str, name: &str, labels: Value) -> f64 {
    f[family]["samples"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name && s["labels"] == labels)
        .unwrap_or_else(|| panic!("no {name} {labels} in {}", f[family]))["value"]
        .as_f64()
        .unwrap()
}

fn check_families(format: &str, f: &BTreeMap<String, Value>, body: &str, cookie: u64) {
    for (name, kind, labels) in FAMILIES {
        let fam = f
            .get(name)
            .unwrap_or_else(|| panic!("{format}: no family {name}\n{body}"));
        assert_eq!(fam["type"], kind, "{format}: {name}");
        let mut want: Vec<&str> = labels.to_vec();
        want.sort();
        for s in fam["samples"].as_array().unwrap() {
            let sample = s["name"].as_str().unwrap();
            let total = format!("{name}_total");
            let want_name = if kind == "counter" {
                total.as_str()
            } else {
                name
            };
            // OpenMetrics may add `_created`; nothing else.
            assert!(
                sample == want_name || (kind == "counter" && sample == format!("{name}_created")),
                "{format}: sample {sample} in family {name}"
            );
            let mut got: Vec<&str> = s["labels"]
                .as_object()
                .unwrap()
                .keys()
                .map(String::as_str)
                .collect();
            got.sort();
            assert_eq!(got, want, "{format}: labels of {s}");
        }
    }
    // Nothing beyond the table.
    let known: Vec<&str> = FAMILIES.iter().map(|(n, _, _)| *n).collect();
    for name in f.keys() {
        assert!(
            known.contains(&name.as_str()),
            "{format}: family {name} is not in the table"
        );
    }
    // The values behind them.
    let captured = json!({"pod": "shop/cart", "netns_cookie": cookie.to_string(), "chain": "OUTPUT", "rule": "captured", "target": "REDIRECT"});
    assert_eq!(
        value(
            f,
            "redirect_decisions",
            "redirect_decisions_total",
            captured.clone()
        ),
        1.0,
        "{format}"
    );
    assert_eq!(
        value(
            f,
            "redirect_agent_attach",
            "redirect_agent_attach_total",
            json!({"result": "ok"})
        ),
        1.0
    );
    assert_eq!(
        value(
            f,
            "redirect_agent_requests",
            "redirect_agent_requests_total",
            json!({"op": "add", "result": "ok"})
        ),
        1.0
    );
    assert_eq!(value(f, "redirect_pods", "redirect_pods", json!({})), 1.0);
    assert_eq!(
        value(f, "redirect_agent_ready", "redirect_agent_ready", json!({})),
        1.0
    );
    assert_eq!(
        value(
            f,
            "redirect_map_entries",
            "redirect_map_entries",
            json!({"map": "REDIRECT_PODS"})
        ),
        1.0
    );
}

struct Setup {
    daemon: Option<Daemon>,
    _tmp: TempDir,
    pod: Pod,
    socket: std::path::PathBuf,
}

impl Setup {
    fn new(tag: &str) -> Setup {
        let mut pod = Pod::new(tag);
        pod.start_upstream(8080);
        pod.start_proxy();
        let tmp = TempDir::new(tag);
        let socket = tmp.join("agent.sock");
        let daemon = Daemon::start(
            &pod.pin_dir,
            &pod.topo.cgroup.path,
            &socket,
            &tmp.join("daemon.log"),
            &[],
        );
        Setup {
            daemon: Some(daemon),
            _tmp: tmp,
            pod,
            socket,
        }
    }

    fn daemon(&self) -> &Daemon {
        self.daemon.as_ref().unwrap()
    }

    fn addr(&self) -> std::net::SocketAddr {
        self.daemon().metrics_addr()
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        if let Some(d) = self.daemon.take() {
            if std::thread::panicking() {
                eprintln!("daemon log:\n{}", d.log_text());
            }
        }
    }
}

#[test]
fn scrape_parses_in_both_formats_with_every_family_and_label() {
    let s = Setup::new("mscrape");
    let ns = s.pod.pod_netns().display().to_string();
    let add = cni(
        &pod_vars("ADD", "ctr-1", &ns, SELECT),
        plugin_conf(&s.socket, json!({})).as_bytes(),
    );
    assert_eq!(add.code, 0, "{add:?}\n{}", s.daemon().log_text());
    let r = s.pod.app_client(&format!("{UPSTREAM_V4}:8080"));
    assert!(r.ok, "{r:?}");
    let cookie = s.daemon().list()[0]["cookie"].as_u64().unwrap();

    // A plain scrape (curl, Prometheus 1.x): the text format, as before.
    let text = fetch(s.addr(), "GET", "/metrics", &[]).unwrap();
    assert_eq!(text.status, 200);
    assert_eq!(
        text.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    assert!(
        text.body
            .contains("# TYPE redirect_decisions_total counter\n"),
        "{}",
        text.body
    );
    check_families("text", &parse("text", &text.body), &text.body, cookie);

    // What Prometheus asks for: OpenMetrics, same series.
    let om = fetch(
        s.addr(),
        "GET",
        "/metrics",
        &[("Accept", PROMETHEUS_ACCEPT)],
    )
    .unwrap();
    assert_eq!(om.status, 200);
    assert_eq!(
        om.header("content-type"),
        Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
    );
    assert!(om.body.ends_with("# EOF\n"), "{}", om.body);
    check_families(
        "openmetrics",
        &parse("openmetrics", &om.body),
        &om.body,
        cookie,
    );
    // Text asked for by name still gets text.
    let t2 = fetch(
        s.addr(),
        "GET",
        "/metrics",
        &[("Accept", "text/plain;version=0.0.4")],
    )
    .unwrap();
    assert!(t2.header("content-type").unwrap().starts_with("text/plain"));
}

/// Read one HTTP/1.1 response with a Content-Length body from `s`.
fn read_response(s: &mut TcpStream) -> Fetched {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        let n = s.read(&mut byte).expect("reading a response head");
        assert!(
            n > 0,
            "connection closed mid-head: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.push(byte[0]);
    }
    let head = String::from_utf8(buf).unwrap();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let len: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .map(|(_, v)| v.parse().unwrap())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).unwrap();
    Fetched {
        status,
        headers,
        body: String::from_utf8(body).unwrap(),
    }
}

fn connect(addr: std::net::SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    s
}

/// Read until the server closes (Ok) or `limit` passes (Err).
fn closed_within(s: &mut TcpStream, limit: Duration) -> Result<Vec<u8>, String> {
    s.set_read_timeout(Some(limit)).unwrap();
    let mut rest = Vec::new();
    match s.read_to_end(&mut rest) {
        Ok(_) => Ok(rest),
        Err(e) => Err(format!("not closed within {limit:?}: {e}")),
    }
}

#[test]
fn http_keep_alive_status_codes_limits_and_shutdown() {
    let mut s = Setup::new("mhttp");
    let addr = s.addr();

    // Keep-alive: several requests, one connection.
    let mut c = connect(addr);
    for path in ["/healthz", "/readyz", "/metrics", "/nope"] {
        write!(c, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let r = read_response(&mut c);
        let want = if path == "/nope" { 404 } else { 200 };
        assert_eq!(r.status, want, "{path}: {r:?}");
        assert_ne!(r.header("connection"), Some("close"), "{path}");
    }
    // HEAD: the headers of GET, no body.
    write!(c, "HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(c.read(&mut byte).unwrap(), 1);
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("content-length: 3\r\n"),
        "{head}"
    );
    // ... and the next response comes right after it (no body in between).
    write!(c, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let r = read_response(&mut c);
    assert_eq!((r.status, r.body.as_str()), (200, "ok\n"));

    // 405 names what is allowed; the connection stays usable.
    write!(c, "DELETE /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let r = read_response(&mut c);
    assert_eq!(r.status, 405, "{r:?}");
    assert_eq!(r.header("allow"), Some("GET, HEAD"));
    write!(c, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert_eq!(read_response(&mut c).status, 200);
    drop(c);

    // 413: a body over the limit, announced or chunked; then closed.
    let mut c = connect(addr);
    write!(
        c,
        "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n"
    )
    .unwrap();
    let r = read_response(&mut c);
    assert_eq!(r.status, 413, "{r:?}");
    assert_eq!(r.header("connection"), Some("close"));
    let mut c = connect(addr);
    write!(
        c,
        "POST /metrics HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    .unwrap();
    let chunk = "x".repeat(2000);
    let _ = write!(c, "{:x}\r\n{chunk}\r\n0\r\n\r\n", chunk.len());
    assert_eq!(read_response(&mut c).status, 413);

    // 431: a request head over the limit.
    let mut c = connect(addr);
    let _ = write!(
        c,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "y".repeat(20_000)
    );
    assert_eq!(read_response(&mut c).status, 431);

    // 408: part of a request head, then nothing; an idle kept-alive
    // connection is closed without a word.
    let t0 = Instant::now();
    let mut slow = connect(addr);
    slow.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let mut idle = connect(addr);
    write!(idle, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert_eq!(read_response(&mut idle).status, 200);
    let r = read_response(&mut slow);
    assert_eq!(r.status, 408, "{r:?}");
    assert!(t0.elapsed() >= Duration::from_secs(4), "{:?}", t0.elapsed());
    assert_eq!(
        closed_within(&mut idle, Duration::from_secs(10)).unwrap(),
        b""
    );

    // Bounded concurrency: with every slot held by an idle connection, a
    // new one gets 503 and is closed; freed slots serve again.
    let held: Vec<TcpStream> = (0..redirect_userspace::agent::http::MAX_CONNS)
        .map(|_| connect(addr))
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let r = fetch(addr, "GET", "/healthz", &[]).unwrap();
    assert_eq!(r.status, 503, "{r:?}");
    drop(held);
    let mut ok = false;
    for _ in 0..50 {
        if fetch(addr, "GET", "/healthz", &[]).unwrap().status == 200 {
            ok = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(ok, "slots not freed");

    // Graceful shutdown: an idle kept-alive connection does not hold the
    // agent, and is closed.
    let mut c = connect(addr);
    write!(c, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert_eq!(read_response(&mut c).status, 200);
    let t0 = Instant::now();
    let st = s.daemon.take().unwrap().stop();
    assert!(st.success(), "{st:?}");
    assert!(t0.elapsed() < Duration::from_secs(4), "{:?}", t0.elapsed());
    assert_eq!(closed_within(&mut c, Duration::from_secs(5)).unwrap(), b"");
    assert!(TcpStream::connect(addr).is_err(), "still listening");
}
