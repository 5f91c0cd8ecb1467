//! The agent's HTTP endpoint: `/metrics`, `/healthz` and `/readyz`, served
//! by hyper (HTTP/1.1 with keep-alive) on a tokio runtime of its own thread,
//! so a slow scrape never waits behind the pod watch or the reverse.
//!
//! Limits: at most [`MAX_CONNS`] connections are served at once (up to as
//! many more get `503` and are closed, beyond that a connection is closed
//! unanswered); a request head must arrive within [`HEAD_TIMEOUT`] (`408`
//! when part of it came, a silent close of an idle kept-alive connection),
//! be at most [`MAX_HEAD_BYTES`] (`431`), and carry at most
//! [`MAX_BODY_BYTES`] of body (`413`; no endpoint reads one). Only `GET`
//! and `HEAD` (`405` otherwise), unknown paths `404`. `/metrics` speaks
//! the Prometheus text format, or OpenMetrics when asked (`Accept`, see
//! [`metrics::Format`]); reading the maps for it is bounded by
//! [`RENDER_TIMEOUT`] (`503`).
//!
//! [`Server::shutdown`] stops accepting, lets the requests in flight
//! finish and closes idle connections, within a grace period.

use std::{
    convert::Infallible,
    io,
    net::SocketAddr,
    os::fd::AsFd,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{body::Incoming, header, Method, Request, Response, StatusCode};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::graceful::GracefulShutdown,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    sync::{oneshot, Semaphore},
};

use super::{metrics, Agent};

/// Connections served at once.
pub const MAX_CONNS: usize = 16;
/// Connections beyond [`MAX_CONNS`] answered `503` at once; more are
/// closed unanswered.
const MAX_REFUSING: usize = 16;
/// Time for a whole request head (and the idle time of a kept-alive
/// connection).
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// Time for a request body.
const BODY_TIMEOUT: Duration = Duration::from_secs(5);
/// Time for reading the maps and the agent's state for `/metrics`.
pub const RENDER_TIMEOUT: Duration = Duration::from_secs(10);
/// Request line and headers (hyper's smallest buffer).
pub const MAX_HEAD_BYTES: usize = 8192;
/// Request body: no endpoint takes one.
pub const MAX_BODY_BYTES: usize = 1024;

/// What the handlers read.
struct State {
    agent: Arc<Agent>,
    ready: Arc<AtomicBool>,
}

/// The running endpoint.
pub struct Server {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<Duration>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    /// Serve on `listener` (already bound: a port conflict is the
    /// caller's error before anything starts) until [`Server::shutdown`].
    /// `ready` is what `/readyz` and `redirect_agent_ready` report.
    pub fn start(
        listener: std::net::TcpListener,
        agent: Arc<Agent>,
        ready: Arc<AtomicBool>,
    ) -> io::Result<Server> {
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let listener = {
            let _g = rt.enter();
            tokio::net::TcpListener::from_std(listener)?
        };
        let (tx, rx) = oneshot::channel();
        let state = Arc::new(State { agent, ready });
        let thread = std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || rt.block_on(serve(listener, state, rx)))?;
        Ok(Server {
            addr,
            stop: Some(tx),
            thread: Some(thread),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stop accepting, finish the requests in flight and close idle
    /// connections; connections still busy after `grace` are dropped.
    pub fn shutdown(mut self, grace: Duration) {
        self.stop_and_join(grace);
    }

    fn stop_and_join(&mut self, grace: Duration) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(grace);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop_and_join(Duration::ZERO);
    }
}

async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<State>,
    mut stop: oneshot::Receiver<Duration>,
) {
    use futures_util::future::{select, Either};
    let graceful = GracefulShutdown::new();
    let serving = Arc::new(Semaphore::new(MAX_CONNS));
    let refusing = Arc::new(Semaphore::new(MAX_REFUSING));
    let mut accept_failing = false;
    let grace = loop {
        let accept = std::pin::pin!(listener.accept());
        let (stream, peer) = match select(accept, &mut stop).await {
            Either::Right((grace, _)) => break grace.unwrap_or(Duration::ZERO),
            Either::Left((Ok(s), _)) => {
                accept_failing = false;
                s
            }
            Either::Left((Err(e), _)) => {
                // EMFILE and the like: back off instead of spinning.
                if !accept_failing {
                    tracing::warn!(error = %e, "accept on the metrics endpoint failed (retrying)");
                    accept_failing = true;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (permit, busy) = match serving.clone().try_acquire_owned() {
            Ok(p) => (p, false),
            Err(_) => match refusing.clone().try_acquire_owned() {
                Ok(p) => (p, true),
                Err(_) => {
                    tracing::debug!(%peer, "metrics endpoint saturated: connection closed unanswered");
                    continue;
                }
            },
        };
        let conn = connection(stream, state.clone(), busy, graceful.watcher());
        tokio::spawn(async move {
            conn.await;
            drop(permit);
        });
    };
    drop(listener);
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("metrics endpoint: connections still busy after {grace:?}; closing them");
    }
}

/// Serve one connection. Hyper closes a connection whose request head
/// does not arrive in time without a word: when part of a request had
/// come, the client gets a `408` here (through a second handle on the
/// socket, non-blocking: a client that does not read gets nothing).
async fn connection(
    stream: tokio::net::TcpStream,
    state: Arc<State>,
    busy: bool,
    watcher: hyper_util::server::graceful::Watcher,
) {
    let partial = Arc::new(AtomicBool::new(false));
    let dup = stream
        .as_fd()
        .try_clone_to_owned()
        .ok()
        .map(std::net::TcpStream::from);
    let io = TokioIo::new(Tracked {
        inner: stream,
        partial: partial.clone(),
    });
    let svc = hyper::service::service_fn(move |req| handle(req, state.clone(), busy));
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT)
        .max_buf_size(MAX_HEAD_BYTES)
        .keep_alive(!busy)
        .serve_connection(io, svc);
    if let Err(e) = watcher.watch(conn).await {
        if e.is_timeout() && partial.load(Ordering::Relaxed) {
            if let Some(s) = &dup {
                use std::io::Write as _;
                let _ = (&*s).write_all(
                    b"HTTP/1.1 408 Request Timeout\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 18\r\nConnection: close\r\n\r\nrequest timed out\n",
                );
            }
        } else {
            tracing::debug!(error = %e, "metrics endpoint connection ended");
        }
    }
}

/// A TCP stream that remembers whether a request has started arriving
/// since the last response began.
struct Tracked {
    inner: tokio::net::TcpStream,
    partial: Arc<AtomicBool>,
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.partial.store(true, Ordering::Relaxed);
        }
        r
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.partial.store(false, Ordering::Relaxed);
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.partial.store(false, Ordering::Relaxed);
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

type Reply = Response<Full<Bytes>>;

fn reply(status: StatusCode, ctype: &'static str, body: impl Into<Bytes>) -> Reply {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(ctype),
    );
    r
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Reply {
    reply(status, "text/plain; charset=utf-8", body)
}

/// A reply after which the connection closes (the request was not, or
/// not fully, read).
fn closing(mut r: Reply) -> Reply {
    r.headers_mut().insert(
        header::CONNECTION,
        header::HeaderValue::from_static("close"),
    );
    r
}

async fn handle(
    req: Request<Incoming>,
    state: Arc<State>,
    busy: bool,
) -> Result<Reply, Infallible> {
    if busy {
        return Ok(closing(text(
            StatusCode::SERVICE_UNAVAILABLE,
            "busy: too many connections\n",
        )));
    }
    let too_large = || {
        closing(text(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body over {MAX_BODY_BYTES} bytes\n"),
        ))
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return Ok(too_large());
    }
    let (parts, body) = req.into_parts();
    match tokio::time::timeout(BODY_TIMEOUT, Limited::new(body, MAX_BODY_BYTES).collect()).await {
        Err(_) => {
            return Ok(closing(text(
                StatusCode::REQUEST_TIMEOUT,
                "request timed out\n",
            )))
        }
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => return Ok(too_large()),
        Ok(Err(_)) => return Ok(closing(text(StatusCode::BAD_REQUEST, "bad request body\n"))),
        Ok(Ok(_)) => {}
    }
    if parts.method != Method::GET && parts.method != Method::HEAD {
        let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
        r.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return Ok(r);
    }
    let ready = state.ready.load(Ordering::SeqCst);
    Ok(match parts.uri.path() {
        "/metrics" => {
            let accept = parts
                .headers
                .get(header::ACCEPT)
                .and_then(|v| v.to_str().ok());
            let format = metrics::Format::negotiate(accept);
            let agent = state.agent.clone();
            let render =
                tokio::task::spawn_blocking(move || metrics::render(&agent, ready, format));
            match tokio::time::timeout(RENDER_TIMEOUT, render).await {
                Ok(Ok(page)) => {
                    let mut r = reply(StatusCode::OK, format.content_type(), page);
                    r.headers_mut()
                        .insert(header::VARY, header::HeaderValue::from_static("Accept"));
                    r
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "rendering /metrics failed");
                    text(StatusCode::INTERNAL_SERVER_ERROR, "rendering failed\n")
                }
                Err(_) => {
                    tracing::warn!("rendering /metrics took over {RENDER_TIMEOUT:?}");
                    text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "timed out reading the maps\n",
                    )
                }
            }
        }
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => {
            let agent = state.agent.clone();
            match tokio::task::spawn_blocking(move || readiness(&agent, ready)).await {
                Ok(Ok(())) => text(StatusCode::OK, "ready\n"),
                Ok(Err(why)) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: {why}\n"),
                ),
                Err(_) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "readiness check failed\n",
                ),
            }
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /metrics, /healthz or /readyz\n",
        ),
    })
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

/// A response read by [`fetch`].
#[derive(Debug)]
pub struct Fetched {
    pub status: u16,
    /// Header names lower-cased, in order.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Fetched {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One request to `addr` on a new connection that the client closes
/// (`Connection: close`), for tests and probes: `GET`, `HEAD`, ... with
/// extra `headers`.
pub fn fetch(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> io::Result<Fetched> {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)?;
    let resp = String::from_utf8_lossy(&resp);
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok(Fetched {
        status,
        headers,
        body: body.to_string(),
    })
}

/// GET `path` from `addr` (for tests and probes): (status code, body).
pub fn get(addr: SocketAddr, path: &str) -> io::Result<(u16, String)> {
    let r = fetch(addr, "GET", path, &[])?;
    Ok((r.status, r.body))
}
