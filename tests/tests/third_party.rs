//! The capture path through a real third-party transparent proxy: Debian's
//! haproxy (installed by `cargo xtask setup`), configured the stock way for
//! iptables REDIRECT setups, run as the sidecar identity (uid/gid 1337) in
//! the pod netns and cgroup.
//!
//! Outbound: `server orig 0.0.0.0:0` makes haproxy connect to the client
//! connection's destination, which it reads with getsockname() and then,
//! for IPv4, getsockopt(SOL_IP, SO_ORIGINAL_DST) (haproxy 2.6
//! src/sock_inet.c, sock_inet_get_dst). IPv6 is tested inbound only:
//! haproxy's inet6 family uses plain getsockname() (proto_fam_inet6.get_dst
//! = sock_get_dst) and never asks for IP6T_SO_ORIGINAL_DST, so a REDIRECTed
//! IPv6 connection would be forwarded to [::1]:15001, i.e. to itself — under
//! iptables exactly as under redirect. Inbound needs no original-destination
//! lookup at all (the steered socket keeps the pod address as its local
//! address), so both families work there.
use std::{
    fs::File,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    os::{fd::AsRawFd, unix::fs::PermissionsExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use redirect_tests::*;
use redirect_userspace::sandbox::{place, unique};

const HAPROXY: &str = "/usr/sbin/haproxy";
const PROBE_PORT: u16 = 15998;

/// haproxy as the sidecar: outbound on 15001 (forward to the original
/// destination), inbound on 15006 (forward to the same local address from
/// 127.0.0.6 / ::6, like Envoy's inbound passthrough), a monitor port for
/// readiness. One log line per connection on stdout.
fn config() -> String {
    format!(
        r#"global
    maxconn 256
    nbthread 1
    log stdout format raw local0 info

defaults
    mode tcp
    log global
    log-format "conn fe=%f client=%ci:%cp dst=%fi:%fp server=%si:%sp bytes_in=%U bytes_out=%B term=%ts"
    timeout connect 5s
    timeout client 10s
    timeout server 10s

frontend probe
    mode http
    bind 127.0.0.1:{PROBE_PORT}
    monitor-uri /ready

frontend outbound
    bind 0.0.0.0:15001
    default_backend original_dst

backend original_dst
    server orig 0.0.0.0:0

frontend inbound4
    bind 0.0.0.0:15006
    default_backend inbound_passthrough4

backend inbound_passthrough4
    server app 0.0.0.0:0 source 127.0.0.6

frontend inbound6
    bind :::15006 v6only
    default_backend inbound_passthrough6

backend inbound_passthrough6
    server app6 :::0 source ::6:0
"#
    )
}

/// A haproxy process in the pod, killed by PID and its temp dir removed on
/// drop (also when the test panics).
struct Haproxy {
    child: Child,
    dir: PathBuf,
    netns: PathBuf,
}

impl Haproxy {
    fn start(pod: &Pod) -> Haproxy {
        assert!(Path::new(HAPROXY).exists(), "{HAPROXY} missing: run `cargo xtask setup` (or apt-get install -y haproxy)");
        let dir = std::env::temp_dir().join(unique("rdt-haproxy-"));
        std::fs::create_dir(&dir).expect("haproxy temp dir");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let cfg = dir.join("haproxy.cfg");
        std::fs::write(&cfg, config()).unwrap();
        std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o644)).unwrap();
        let mut cmd = Command::new(HAPROXY);
        cmd.arg("-db").arg("-f").arg(&cfg);
        cmd.stdin(Stdio::null())
            .stdout(File::create(dir.join("stdout.log")).unwrap())
            .stderr(File::create(dir.join("stderr.log")).unwrap());
        place(&mut cmd, &pod.topo.in_pod(PROXY_UID, PROXY_UID)).expect("placing haproxy");
        let child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                panic!("starting haproxy: {e}");
            }
        };
        let mut h = Haproxy { child, dir, netns: pod.pod_netns() };
        h.wait_ready();
        h
    }

    /// Poll the monitor URI from inside the pod netns until haproxy answers
    /// (it binds every listener before serving any).
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("haproxy exited ({st}) before listening: {}", self.output());
            }
            let ok = in_netns(&self.netns, || {
                let addr: SocketAddr = ([127, 0, 0, 1], PROBE_PORT).into();
                let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
                s.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
                s.write_all(b"GET /ready HTTP/1.0\r\n\r\n").ok()?;
                let mut resp = String::new();
                let _ = s.read_to_string(&mut resp);
                Some(resp.starts_with("HTTP/1.0 200") || resp.starts_with("HTTP/1.1 200"))
            });
            if ok == Some(true) {
                return;
            }
            assert!(Instant::now() < deadline, "haproxy not ready after 10s: {}", self.output());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn output(&self) -> String {
        let read = |n: &str| std::fs::read_to_string(self.dir.join(n)).unwrap_or_default();
        format!("stdout:\n{}\nstderr:\n{}", read("stdout.log"), read("stderr.log"))
    }

    /// Connection log lines of one frontend; haproxy logs a TCP session
    /// when it ends, so wait a little for `want` lines.
    fn conns(&self, frontend: &str, want: usize) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let lines: Vec<String> = std::fs::read_to_string(self.dir.join("stdout.log"))
                .unwrap_or_default()
                .lines()
                .filter(|l| l.contains(&format!("conn fe={frontend} ")))
                .map(str::to_string)
                .collect();
            if lines.len() >= want || Instant::now() > deadline {
                return lines;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Run `f` on a thread that entered `netns` (this process stays where it is).
fn in_netns<R: Send>(netns: &Path, f: impl FnOnce() -> Option<R> + Send) -> Option<R> {
    let ns = File::open(netns).expect("opening netns");
    std::thread::scope(|s| {
        s.spawn(|| {
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                panic!("setns {}: {}", netns.display(), std::io::Error::last_os_error());
            }
            f()
        })
        .join()
        .expect("netns thread")
    })
}

#[test]
fn haproxy_outbound_v4_uses_so_original_dst() {
    let mut pod = Pod::new("hapo");
    pod.start_upstream(8080);
    // istio-init first, then the sidecar, as in a real pod.
    pod.attach_istio_default();
    let haproxy = Haproxy::start(&pod);

    let dst = format!("{UPSTREAM_V4}:8080");
    let r = pod.app_client(&dst);
    assert_ok(&r, &format!("app -> {dst} through haproxy ({})", haproxy.output()));
    // The app sees the original peer; its socket really went to loopback.
    assert_eq!(r.peer.as_deref(), Some(dst.as_str()), "{r:?}");
    assert!(r.local.as_deref().unwrap_or_default().starts_with("127.0.0.1:"), "not captured: {r:?}");
    // The upstream saw haproxy's connection from the pod address.
    let banner = r.banner.clone().unwrap_or_default();
    assert!(banner.starts_with(&format!("peer={POD_V4}:")) && banner.ends_with(&format!("local={dst}")), "upstream greeting {banner:?}");
    assert_ne!(banner, format!("peer={} local={dst}", r.local.as_deref().unwrap()), "the upstream saw the app's own socket");

    let log = haproxy.conns("outbound", 1);
    assert_eq!(log.len(), 1, "haproxy log: {}", haproxy.output());
    assert!(log[0].contains(&format!("dst={dst}")) && log[0].contains(&format!("server={dst}")), "haproxy did not use the original destination: {}", log[0]);

    assert_eq!(pod.counter("OUTPUT", "captured"), 1);
    assert_eq!(pod.counter("ORIGINAL_DST", "orig_dst_outbound"), 1);
    assert_eq!(pod.counter("OUTPUT", "skip_proxy_uid"), 1, "haproxy's own upstream connection");
    assert_eq!(pod.counter("ORIGINAL_DST", "orig_dst_missing"), 0);
}

#[test]
fn haproxy_inbound_passthrough_v4_v6() {
    let mut pod = Pod::new("hapi");
    pod.start_app_server(9080);
    pod.attach_istio_default();
    let haproxy = Haproxy::start(&pod);

    let upstream = pod.topo.in_upstream();
    for (dst, passthrough) in [(format!("{POD_V4}:9080"), "127.0.0.6"), (format!("[{POD_V6}]:9080"), "[::6]")] {
        let r = pod.client(&upstream, &dst, None);
        assert_ok(&r, &format!("upstream -> {dst} through haproxy ({})", haproxy.output()));
        assert_eq!(r.peer.as_deref(), Some(dst.as_str()), "{r:?}");
        // The app saw haproxy's passthrough connection, on its own address.
        let banner = r.banner.clone().unwrap_or_default();
        assert!(banner.starts_with(&format!("peer={passthrough}:")) && banner.ends_with(&format!("local={dst}")), "app greeting for {dst}: {banner:?}");
    }
    let v4 = haproxy.conns("inbound4", 1);
    let v6 = haproxy.conns("inbound6", 1);
    assert_eq!((v4.len(), v6.len()), (1, 1), "haproxy log: {}", haproxy.output());
    assert!(v4[0].contains(&format!("server={POD_V4}:9080")), "{}", v4[0]);
    assert!(v6[0].contains(&format!("server={POD_V6}:9080")), "{}", v6[0]);

    assert_eq!(pod.counter("PREROUTING", "captured"), 2);
    assert_eq!(pod.counter("OUTPUT", "skip_passthrough_127_0_0_6"), 2);
    assert_eq!(pod.counter("OUTPUT", "captured"), 0);
}

/// haproxy already running when the pod is captured (an agent repairing a
/// pod that started before it): attach must find haproxy's listeners.
#[test]
fn haproxy_running_before_attach() {
    let mut pod = Pod::new("hapb");
    pod.start_upstream(8080);
    pod.start_app_server(9080);
    let haproxy = Haproxy::start(&pod);
    let out = pod.attach_istio_default();
    let out = String::from_utf8_lossy(&out.stdout);
    assert!(out.contains("proxy listener found"), "attach did not find haproxy's listener: {out}");

    let dst = format!("{UPSTREAM_V4}:8080");
    let r = pod.app_client(&dst);
    assert_ok(&r, &format!("app -> {dst} ({})", haproxy.output()));
    assert!(r.banner.as_deref().unwrap_or_default().starts_with(&format!("peer={POD_V4}:")), "{r:?}");
    assert_eq!(haproxy.conns("outbound", 1).len(), 1, "{}", haproxy.output());

    let upstream = pod.topo.in_upstream();
    for (dst, passthrough) in [(format!("{POD_V4}:9080"), "127.0.0.6"), (format!("[{POD_V6}]:9080"), "[::6]")] {
        let r = pod.client(&upstream, &dst, None);
        assert_ok(&r, &format!("upstream -> {dst} ({})", haproxy.output()));
        assert!(r.banner.as_deref().unwrap_or_default().starts_with(&format!("peer={passthrough}:")), "inbound {dst} not through haproxy: {r:?}");
    }
    assert_eq!(pod.counter("PREROUTING", "captured"), 2);
    assert_eq!(pod.counter("OUTPUT", "captured"), 1);
    assert_eq!(pod.counter("ORIGINAL_DST", "orig_dst_outbound"), 1);
}
