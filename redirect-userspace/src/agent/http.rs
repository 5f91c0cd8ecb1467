//! A tiny HTTP/1.x server (std only) for `/metrics`, `/healthz` and
//! `/readyz`: one short-lived thread per connection, `Connection: close`.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use super::Agent;

/// At most this many scrapes are served at once; more are refused (503).
const MAX_CONNS: usize = 16;

/// Serve until `stop` is set and the listener is shut down.
pub fn serve(l: TcpListener, agent: Arc<Agent>, ready: Arc<AtomicBool>, stop: Arc<AtomicBool>) {
    let busy = Arc::new(AtomicUsize::new(0));
    for conn in l.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(conn) = conn else {
            // EMFILE and the like: back off instead of spinning.
            std::thread::sleep(Duration::from_millis(100));
            continue;
        };
        if busy.fetch_add(1, Ordering::SeqCst) >= MAX_CONNS {
            busy.fetch_sub(1, Ordering::SeqCst);
            let _ = respond(
                &conn,
                "503 Service Unavailable",
                "text/plain",
                "busy\n",
                false,
            );
            continue;
        }
        let (agent, ready, busy) = (agent.clone(), ready.clone(), busy.clone());
        std::thread::spawn(move || {
            handle(conn, &agent, &ready);
            busy.fetch_sub(1, Ordering::SeqCst);
        });
    }
}

fn handle(conn: TcpStream, agent: &Agent, ready: &AtomicBool) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = conn.set_write_timeout(Some(Duration::from_secs(10)));
    let mut r = BufReader::new((&conn).take(8192));
    let mut request_line = String::new();
    if r.read_line(&mut request_line).is_err() {
        return;
    }
    // Skip the headers (bounded by take()).
    loop {
        let mut h = String::new();
        match r.read_line(&mut h) {
            Ok(0) | Err(_) => break,
            Ok(_) if h == "\r\n" || h == "\n" => break,
            Ok(_) => {}
        }
    }
    let mut parts = request_line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let head = method == "HEAD";
    if method != "GET" && !head {
        let _ = respond(
            &conn,
            "405 Method Not Allowed",
            "text/plain",
            "only GET and HEAD\n",
            head,
        );
        return;
    }
    let path = target.split('?').next().unwrap_or("");
    let _ = match path {
        "/metrics" => respond(
            &conn,
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            &super::metrics::render(agent, ready.load(Ordering::SeqCst)),
            head,
        ),
        "/healthz" => respond(&conn, "200 OK", "text/plain", "ok\n", head),
        "/readyz" => match readiness(agent, ready.load(Ordering::SeqCst)) {
            Ok(()) => respond(&conn, "200 OK", "text/plain", "ready\n", head),
            Err(why) => respond(
                &conn,
                "503 Service Unavailable",
                "text/plain",
                &format!("not ready: {why}\n"),
                head,
            ),
        },
        _ => respond(
            &conn,
            "404 Not Found",
            "text/plain",
            "not found: try /metrics, /healthz or /readyz\n",
            head,
        ),
    };
}

/// Ready when the agent serves its socket with the programs attached and,
/// if it uses the Kubernetes API, its pod watch is connected and has listed
/// this node's pods: only then can it decide a CNI ADD (otherwise ADDs fail
/// closed, and the probe says why).
pub fn readiness(agent: &Agent, serving: bool) -> Result<(), &'static str> {
    if !serving {
        return Err("the agent is starting or stopping");
    }
    if let Some(w) = agent.k8s.get() {
        let (connected, synced, _) = w.gauges();
        if !connected {
            return Err("the Kubernetes API is unreachable (CNI ADDs of mesh pods fail closed)");
        }
        if !synced {
            return Err("the pod watch has not listed this node's pods yet");
        }
    }
    Ok(())
}

fn respond(
    mut conn: &TcpStream,
    status: &str,
    ctype: &str,
    body: &str,
    head: bool,
) -> std::io::Result<()> {
    write!(
        conn,
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    if !head {
        conn.write_all(body.as_bytes())?;
    }
    conn.flush()
}

/// GET `path` from `addr` (for tests and probes): (status code, body).
pub fn get(addr: std::net::SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let code = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((code, body))
}
