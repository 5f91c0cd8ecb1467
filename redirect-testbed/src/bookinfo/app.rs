//! The Bookinfo-shaped apps (`redirect-kit bookinfo-app`): one small
//! HTTP/1.1 server per service that, for each request, calls the services
//! it depends on one after the other, as Bookinfo's do (productpage calls
//! details, then reviews; reviews calls ratings), and answers with what it
//! got. Every connection carries one request (`Connection: close` both
//! ways), in every configuration, so every call is a new connection for
//! the capture to decide.
//!
//! Each answer is a JSON object naming the service, the address its
//! request came from (`peer`: the caller's pod without a mesh, the
//! sidecar's 127.0.0.6 with one), and the answers of its own calls: the
//! client checks the whole chain from one body.

use std::{
    io::{self, Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    time::Duration,
};

/// How long one hop may take (connect, send, answer).
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// `--call NAME=ADDR`.
pub fn parse_call(s: &str) -> Result<(String, SocketAddr), String> {
    let (n, a) = s
        .split_once('=')
        .ok_or_else(|| format!("'{s}' is not NAME=ADDR"))?;
    if n.is_empty() || !n.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        return Err(format!("bad service name '{n}' in '{s}'"));
    }
    Ok((
        n.to_string(),
        a.parse()
            .map_err(|_| format!("bad address '{a}' in '{s}'"))?,
    ))
}

/// Serve `name` on `listen` forever, calling `calls` for every request.
/// Prints `{"event":"ready"}` once listening.
pub fn serve(name: &str, listen: SocketAddr, calls: &[(String, SocketAddr)]) -> io::Result<()> {
    let l = TcpListener::bind(listen)
        .map_err(|e| io::Error::new(e.kind(), format!("{name}: listening on {listen}: {e}")))?;
    println!("{{\"event\":\"ready\",\"service\":\"{name}\",\"listen\":\"{listen}\"}}");
    io::stdout().flush()?;
    for c in l.incoming() {
        let Ok(c) = c else { continue };
        let name = name.to_string();
        let calls = calls.to_vec();
        std::thread::spawn(move || {
            let _ = handle(&name, c, &calls);
        });
    }
    Ok(())
}

fn handle(name: &str, c: TcpStream, calls: &[(String, SocketAddr)]) -> io::Result<()> {
    c.set_nodelay(true)?;
    c.set_read_timeout(Some(TIMEOUT))?;
    c.set_write_timeout(Some(TIMEOUT))?;
    let peer = c.peer_addr()?.ip();
    read_head(&c)?;
    let mut body = format!("{{\"service\":\"{name}\",\"peer\":\"{peer}\"");
    let mut status = 200;
    for (svc, addr) in calls {
        match get(*addr, &format!("/{svc}")) {
            Ok((200, b)) => body.push_str(&format!(",\"{svc}\":{b}")),
            Ok((code, b)) => {
                status = 502;
                body.push_str(&format!(",\"{svc}\":{{\"status\":{code},\"body\":{b:?}}}"));
            }
            Err(e) => {
                status = 502;
                body.push_str(&format!(",\"{svc}\":{{\"error\":{:?}}}", e.to_string()));
            }
        }
    }
    body.push('}');
    let reason = if status == 200 { "OK" } else { "Bad Gateway" };
    let resp = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    (&c).write_all(resp.as_bytes())?;
    c.shutdown(std::net::Shutdown::Write)
}

/// Read a request head (up to the blank line); a GET has no body.
fn read_head(mut c: &TcpStream) -> io::Result<()> {
    let mut head = Vec::with_capacity(256);
    let mut buf = [0u8; 1024];
    while !head.ends_with(b"\r\n\r\n") {
        let n = c.read(&mut buf)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed before the end of the request head",
            ));
        }
        head.extend_from_slice(&buf[..n]);
        if head.len() > 16 * 1024 {
            return Err(io::Error::other("request head over 16 KiB"));
        }
    }
    if !head.starts_with(b"GET ") {
        return Err(io::Error::other("not a GET"));
    }
    Ok(())
}

/// One HTTP/1.1 GET on a new connection (`Connection: close`): the status
/// code and the body.
pub fn get(addr: SocketAddr, path: &str) -> io::Result<(u16, String)> {
    let s = TcpStream::connect_timeout(&addr, TIMEOUT)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(TIMEOUT))?;
    s.set_write_timeout(Some(TIMEOUT))?;
    (&s).write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )?;
    let mut resp = Vec::new();
    (&s).read_to_end(&mut resp)?;
    let text = String::from_utf8_lossy(&resp);
    let bad = || io::Error::other(format!("malformed answer from {addr}: {text:?}"));
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(bad)?;
    let code: u16 = head
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse().ok())
        .ok_or_else(bad)?;
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .ok_or_else(bad)?;
    if length != body.len() {
        return Err(io::Error::other(format!(
            "{addr}: Content-Length {length}, {} bytes of body",
            body.len()
        )));
    }
    Ok((code, body.to_string()))
}

/// The body a whole call chain answers when service `name` is reached
/// from `peer`: `peer_of(caller)` says where a service's calls come from
/// (the caller's pod address without a mesh, 127.0.0.6 with one).
pub fn chain_body(
    name: &str,
    peer: IpAddr,
    calls_of: &dyn Fn(&str) -> Vec<String>,
    peer_of: &dyn Fn(&str) -> IpAddr,
) -> String {
    let mut b = format!("{{\"service\":\"{name}\",\"peer\":\"{peer}\"");
    for c in calls_of(name) {
        b.push_str(&format!(
            ",\"{c}\":{}",
            chain_body(&c, peer_of(name), calls_of, peer_of)
        ));
    }
    b.push('}');
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_parse_and_bad_ones_are_named() {
        assert_eq!(
            parse_call("details=10.1.0.11:9080").unwrap(),
            ("details".to_string(), "10.1.0.11:9080".parse().unwrap())
        );
        assert!(parse_call("details").unwrap_err().contains("NAME=ADDR"));
        assert!(parse_call("details=10.1.0.11")
            .unwrap_err()
            .contains("10.1.0.11"));
        assert!(parse_call("=10.1.0.11:1")
            .unwrap_err()
            .contains("service name"));
    }

    /// A real chain on loopback: three servers, one GET, the body checked.
    #[test]
    fn a_chain_answers_with_every_hop() {
        let bind = |name: &'static str, calls: Vec<(String, SocketAddr)>| {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = l.local_addr().unwrap();
            std::thread::spawn(move || {
                for c in l.incoming().flatten() {
                    let calls = calls.clone();
                    std::thread::spawn(move || handle(name, c, &calls));
                }
            });
            addr
        };
        let ratings = bind("ratings", vec![]);
        let reviews = bind("reviews", vec![("ratings".into(), ratings)]);
        let details = bind("details", vec![]);
        let page = bind(
            "productpage",
            vec![("details".into(), details), ("reviews".into(), reviews)],
        );
        let (code, body) = get(page, "/productpage").unwrap();
        assert_eq!(code, 200, "{body}");
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        let calls_of = |n: &str| match n {
            "productpage" => vec!["details".to_string(), "reviews".to_string()],
            "reviews" => vec!["ratings".to_string()],
            _ => vec![],
        };
        assert_eq!(body, chain_body("productpage", lo, &calls_of, &|_| lo));
        assert!(
            body.contains("\"ratings\":{\"service\":\"ratings\""),
            "{body}"
        );
    }
}
