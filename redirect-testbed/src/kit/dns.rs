//! DNS tools of the tests: a stand-in for Istio's DNS proxy (pilot-agent on
//! 127.0.0.1:15053 and [::1]:15053, UDP and TCP) and a query client that
//! reports what the app sees (the reply's source address, getpeername).
//!
//! The proxy answers names under `--local-suffix` itself with distinctive
//! addresses ([`PROXY_V4`], [`PROXY_V6`]), and forwards every other query
//! to `--upstream` (a real DNS server: the test runs dnsmasq) over UDP, as
//! its own uid: the proxy's own DNS must reach the nameserver untouched.
//! One JSON line per query on stdout.

use std::{
    io::{self, Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{Arc, Mutex},
    time::Duration,
};

/// What the stand-in proxy answers for names it owns.
pub const PROXY_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 53);
pub const PROXY_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x53);

pub const TYPE_A: u16 = 1;
pub const TYPE_AAAA: u16 = 28;

/// A query's question.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Question {
    pub id: u16,
    pub name: String,
    pub qtype: u16,
    /// The raw question section (name, type, class), echoed in replies.
    pub raw: Vec<u8>,
    pub rd: bool,
}

/// A query (one question, as resolvers send).
pub fn query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.') {
        m.push(label.len() as u8);
        m.extend_from_slice(label.as_bytes());
    }
    m.push(0);
    m.extend_from_slice(&qtype.to_be_bytes());
    m.extend_from_slice(&1u16.to_be_bytes());
    m
}

/// The question of a message, None when it is not one we can read.
pub fn parse_question(m: &[u8]) -> Option<Question> {
    if m.len() < 12 || u16::from_be_bytes([m[4], m[5]]) != 1 {
        return None;
    }
    let mut i = 12;
    let mut labels = Vec::new();
    loop {
        let len = *m.get(i)? as usize;
        i += 1;
        if len == 0 {
            break;
        }
        if len & 0xc0 != 0 {
            return None;
        }
        labels.push(String::from_utf8_lossy(m.get(i..i + len)?).to_ascii_lowercase());
        i += len;
    }
    let qtype = u16::from_be_bytes([*m.get(i)?, *m.get(i + 1)?]);
    m.get(i + 3)?;
    Some(Question {
        id: u16::from_be_bytes([m[0], m[1]]),
        name: labels.join("."),
        qtype,
        raw: m[12..i + 4].to_vec(),
        rd: m[2] & 1 != 0,
    })
}

/// A reply to `q` with these addresses (of the question's type).
pub fn reply(q: &Question, addrs: &[IpAddr]) -> Vec<u8> {
    let answers: Vec<&IpAddr> = addrs
        .iter()
        .filter(|a| (q.qtype == TYPE_A && a.is_ipv4()) || (q.qtype == TYPE_AAAA && a.is_ipv6()))
        .collect();
    let mut m = Vec::new();
    m.extend_from_slice(&q.id.to_be_bytes());
    m.push(0x84 | u8::from(q.rd)); // QR, AA, RD as asked
    m.push(0x80); // RA, NOERROR
    m.extend_from_slice(&1u16.to_be_bytes());
    m.extend_from_slice(&(answers.len() as u16).to_be_bytes());
    m.extend_from_slice(&[0, 0, 0, 0]);
    m.extend_from_slice(&q.raw);
    for a in answers {
        m.extend_from_slice(&[0xc0, 0x0c]);
        m.extend_from_slice(&q.qtype.to_be_bytes());
        m.extend_from_slice(&1u16.to_be_bytes());
        m.extend_from_slice(&60u32.to_be_bytes());
        match a {
            IpAddr::V4(v) => {
                m.extend_from_slice(&4u16.to_be_bytes());
                m.extend_from_slice(&v.octets());
            }
            IpAddr::V6(v) => {
                m.extend_from_slice(&16u16.to_be_bytes());
                m.extend_from_slice(&v.octets());
            }
        }
    }
    m
}

/// The A/AAAA addresses of a reply (to one question).
pub fn answers(m: &[u8]) -> Option<Vec<IpAddr>> {
    let q = parse_question(m)?;
    let ancount = u16::from_be_bytes([m[6], m[7]]) as usize;
    let mut i = 12 + q.raw.len();
    let mut out = Vec::new();
    for _ in 0..ancount {
        // Name: labels or a pointer.
        loop {
            let len = *m.get(i)? as usize;
            if len & 0xc0 == 0xc0 {
                i += 2;
                break;
            }
            i += 1 + len;
            if len == 0 {
                break;
            }
        }
        let t = u16::from_be_bytes([*m.get(i)?, *m.get(i + 1)?]);
        let rdlen = u16::from_be_bytes([*m.get(i + 8)?, *m.get(i + 9)?]) as usize;
        let data = m.get(i + 10..i + 10 + rdlen)?;
        match (t, rdlen) {
            (TYPE_A, 4) => out.push(IpAddr::from(<[u8; 4]>::try_from(data).ok()?)),
            (TYPE_AAAA, 16) => out.push(IpAddr::from(<[u8; 16]>::try_from(data).ok()?)),
            _ => {}
        }
        i += 10 + rdlen;
    }
    Some(out)
}

/// The stand-in DNS proxy. Serves until killed.
pub fn proxy(port: u16, local_suffix: &str, upstream: Option<SocketAddr>) -> io::Result<()> {
    let log = Arc::new(Mutex::new(()));
    let suffix = local_suffix.trim_matches('.').to_ascii_lowercase();
    let mut threads = Vec::new();
    for ip in [
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(Ipv6Addr::LOCALHOST),
    ] {
        let at = SocketAddr::new(ip, port);
        let udp = UdpSocket::bind(at).map_err(|e| ctx(e, "binding UDP", at))?;
        let tcp = TcpListener::bind(at).map_err(|e| ctx(e, "listening on TCP", at))?;
        let (l1, l2, s1, s2) = (log.clone(), log.clone(), suffix.clone(), suffix.clone());
        threads.push(std::thread::spawn(move || loop {
            let mut buf = [0u8; 1500];
            let Ok((n, from)) = udp.recv_from(&mut buf) else {
                continue;
            };
            if let Some(r) = answer(&buf[..n], from, "udp", &s1, upstream, &l1) {
                let _ = udp.send_to(&r, from);
            }
        }));
        threads.push(std::thread::spawn(move || {
            for c in tcp.incoming().flatten() {
                let (l, s) = (l2.clone(), s2.clone());
                std::thread::spawn(move || serve_tcp(c, &s, upstream, &l));
            }
        }));
    }
    println!("{{\"event\":\"ready\",\"port\":{port}}}");
    let _ = io::stdout().flush();
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

fn ctx(e: io::Error, what: &str, at: SocketAddr) -> io::Error {
    io::Error::new(e.kind(), format!("{what} {at}: {e}"))
}

fn serve_tcp(mut c: TcpStream, suffix: &str, upstream: Option<SocketAddr>, log: &Mutex<()>) {
    let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
    let from = c.peer_addr().unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)));
    loop {
        let mut len = [0u8; 2];
        if c.read_exact(&mut len).is_err() {
            return;
        }
        let mut m = vec![0u8; u16::from_be_bytes(len) as usize];
        if c.read_exact(&mut m).is_err() {
            return;
        }
        let Some(r) = answer(&m, from, "tcp", suffix, upstream, log) else {
            return;
        };
        let mut out = (r.len() as u16).to_be_bytes().to_vec();
        out.extend_from_slice(&r);
        if c.write_all(&out).is_err() {
            return;
        }
    }
}

/// The reply to one query: ours for the local suffix, else upstream's.
fn answer(
    m: &[u8],
    from: SocketAddr,
    transport: &str,
    suffix: &str,
    upstream: Option<SocketAddr>,
    log: &Mutex<()>,
) -> Option<Vec<u8>> {
    let q = parse_question(m)?;
    let local = q.name == suffix || q.name.ends_with(&format!(".{suffix}"));
    let (r, how) = if local {
        (
            reply(&q, &[IpAddr::V4(PROXY_V4), IpAddr::V6(PROXY_V6)]),
            "local".to_string(),
        )
    } else {
        match upstream.map(|u| (u, forward(m, u))) {
            Some((_, Ok(r))) => (r, "forwarded".to_string()),
            Some((u, Err(e))) => (reply(&q, &[]), format!("forward to {u} failed: {e}")),
            None => (reply(&q, &[]), "no upstream".to_string()),
        }
    };
    let _g = log.lock();
    println!(
        "{}",
        serde_json::json!({"event": "query", "transport": transport, "from": from.to_string(), "name": q.name, "qtype": q.qtype, "answer": how})
    );
    let _ = io::stdout().flush();
    Some(r)
}

/// Ask the upstream nameserver (UDP, port 53 as given), as this process.
fn forward(m: &[u8], upstream: SocketAddr) -> io::Result<Vec<u8>> {
    let bind: SocketAddr = if upstream.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let s = UdpSocket::bind(bind)?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.send_to(m, upstream)?;
    let mut buf = [0u8; 1500];
    let (n, _) = s.recv_from(&mut buf)?;
    Ok(buf[..n].to_vec())
}

/// How the query client talks to the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Transport {
    /// `sendto`/`recvfrom` on an unconnected socket.
    Udp,
    /// `connect`, `send`, `recvfrom` (glibc's and musl's way).
    UdpConnected,
    Tcp,
}

/// One query; a JSON report of what the app saw.
pub fn client(
    server: SocketAddr,
    name: &str,
    qtype: u16,
    transport: Transport,
    timeout: Duration,
) -> serde_json::Value {
    let id = (std::process::id() & 0xffff) as u16;
    let q = query(id, name, qtype);
    let r = (|| -> io::Result<serde_json::Value> {
        let mut out = serde_json::json!({"server": server.to_string(), "transport": format!("{transport:?}")});
        let reply = match transport {
            Transport::Udp | Transport::UdpConnected => {
                let bind: SocketAddr = if server.is_ipv4() {
                    (Ipv4Addr::UNSPECIFIED, 0).into()
                } else {
                    (Ipv6Addr::UNSPECIFIED, 0).into()
                };
                let s = UdpSocket::bind(bind)?;
                s.set_read_timeout(Some(timeout))?;
                if transport == Transport::UdpConnected {
                    s.connect(server)?;
                    out["peer"] = s.peer_addr()?.to_string().into();
                    s.send(&q)?;
                } else {
                    s.send_to(&q, server)?;
                }
                let mut buf = [0u8; 1500];
                let (n, from) = s.recv_from(&mut buf)?;
                out["reply_from"] = from.to_string().into();
                buf[..n].to_vec()
            }
            Transport::Tcp => {
                let mut s = TcpStream::connect_timeout(&server, timeout)?;
                s.set_read_timeout(Some(timeout))?;
                out["peer"] = s.peer_addr()?.to_string().into();
                out["local"] = s.local_addr()?.to_string().into();
                let mut m = (q.len() as u16).to_be_bytes().to_vec();
                m.extend_from_slice(&q);
                s.write_all(&m)?;
                let mut len = [0u8; 2];
                s.read_exact(&mut len)?;
                let mut r = vec![0u8; u16::from_be_bytes(len) as usize];
                s.read_exact(&mut r)?;
                r
            }
        };
        let a = answers(&reply).ok_or_else(|| io::Error::other("unreadable reply"))?;
        if u16::from_be_bytes([reply[0], reply[1]]) != id {
            return Err(io::Error::other("reply with another id"));
        }
        out["answers"] = a.iter().map(|a| a.to_string()).collect::<Vec<_>>().into();
        out["ok"] = true.into();
        Ok(out)
    })();
    r.unwrap_or_else(
        |e| serde_json::json!({"ok": false, "server": server.to_string(), "error": e.to_string()}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_reply_round_trip() {
        let q = query(0x1234, "svc.mesh.", TYPE_AAAA);
        let p = parse_question(&q).unwrap();
        assert_eq!(
            (p.id, p.name.as_str(), p.qtype),
            (0x1234, "svc.mesh", TYPE_AAAA)
        );
        let r = reply(&p, &[IpAddr::V4(PROXY_V4), IpAddr::V6(PROXY_V6)]);
        assert_eq!(answers(&r).unwrap(), vec![IpAddr::V6(PROXY_V6)]);
        let p = parse_question(&query(1, "a.b", TYPE_A)).unwrap();
        assert_eq!(
            answers(&reply(&p, &[IpAddr::V4(PROXY_V4)])).unwrap(),
            vec![IpAddr::V4(PROXY_V4)]
        );
    }
}
