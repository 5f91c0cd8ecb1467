//! Debian's HAProxy as a pod's sidecar: a real third-party transparent
//! proxy, configured the stock way for iptables REDIRECT setups (no code of
//! ours in its path), run as the sidecar identity in the pod's netns and
//! cgroup, in the foreground, logging one line per connection.
//!
//! Outbound, `server orig 0.0.0.0:0` makes HAProxy connect to the accepted
//! connection's destination, which it reads with getsockname() and then,
//! for IPv4, getsockopt(SOL_IP, SO_ORIGINAL_DST) (HAProxy 2.6
//! src/sock_inet.c, sock_inet_get_dst). Its inet6 family never asks for
//! IP6T_SO_ORIGINAL_DST, so outbound IPv6 cannot work behind REDIRECT,
//! under iptables as under redirect. Inbound needs no lookup under
//! redirect (the steered socket keeps the pod address as its local
//! address) and gets conntrack's answer under iptables.

use std::{
    io::{Read, Write},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::sandbox::{place, unique, Placement};

/// Where Debian installs it (`cargo xtask setup` does).
pub const HAPROXY: &str = "/usr/sbin/haproxy";
/// The readiness frontend: `GET /ready` on 127.0.0.1 in the pod.
pub const MONITOR_PORT: u16 = 15998;

/// The sidecar's frontends, as in front of istio-init's rules: outbound on
/// 15001 forwards to the original destination; inbound on 15006 forwards
/// to the same local address from 127.0.0.6 / ::6, like Envoy's inbound
/// passthrough (istio-init's rule 1 lets that connection through).
pub const SIDECAR: &str = "\
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
";

/// A running HAProxy: killed (by PID) and its directory removed on drop.
///
/// The configuration is the caller's frontends/backends plus a common
/// part: a monitor frontend (readiness) and one log line per connection,
/// written to a file as soon as the connection is set up: `conn
/// fe=<frontend> client=<ip:port> dst=<ip:port> src=<ip:port>
/// server=<ip:port>` (HAProxy prints IPv6 addresses bare).
pub struct Haproxy {
    child: Child,
    dir: PathBuf,
}

impl Haproxy {
    /// Check the configuration, start `binary` placed as asked (in a pod:
    /// `p.netns` is required, for the readiness check) and wait until it
    /// serves its monitor URI. Nothing is left behind on error.
    pub fn start(binary: &Path, p: &Placement, proxies: &str) -> Result<Haproxy> {
        use std::os::unix::fs::PermissionsExt;
        let netns = p
            .netns
            .clone()
            .context("haproxy needs a network namespace to run in")?;
        if !binary.exists() {
            bail!(
                "{} missing: run `cargo xtask setup` (or apt-get install -y haproxy)",
                binary.display()
            );
        }
        let dir = std::env::temp_dir().join(unique("rd-haproxy-"));
        std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        // Owned by the Haproxy (or removed here) from now on.
        let remove = |e: anyhow::Error| {
            let _ = std::fs::remove_dir_all(&dir);
            e
        };
        let cfg = dir.join("haproxy.cfg");
        let common = format!(
            "global\n  maxconn 256\n  nbthread 1\n  log stdout format raw local0 info\n\
             defaults\n  mode tcp\n  log global\n  option logasap\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
             \x20 log-format \"conn fe=%f client=%ci:%cp dst=%fi:%fp src=%bi:%bp server=%si:%sp\"\n\
             frontend monitor\n  mode http\n  bind 127.0.0.1:{MONITOR_PORT}\n  monitor-uri /ready\n"
        );
        let prepared = (|| -> Result<()> {
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
            std::fs::write(&cfg, format!("{common}{proxies}"))?;
            std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o644))?;
            let check = Command::new(binary)
                .arg("-c")
                .arg("-f")
                .arg(&cfg)
                .output()
                .with_context(|| format!("running {} -c", binary.display()))?;
            if !check.status.success() {
                bail!(
                    "{} -c rejects the configuration ({}): {}",
                    binary.display(),
                    check.status,
                    String::from_utf8_lossy(&check.stderr).trim()
                );
            }
            Ok(())
        })();
        prepared.map_err(remove)?;
        let spawned = (|| -> Result<Child> {
            let mut cmd = Command::new(binary);
            cmd.arg("-db").arg("-f").arg(&cfg);
            cmd.stdin(Stdio::null())
                .stdout(std::fs::File::create(dir.join("stdout.log"))?)
                .stderr(std::fs::File::create(dir.join("stderr.log"))?);
            place(&mut cmd, p)?;
            cmd.spawn()
                .with_context(|| format!("starting {}", binary.display()))
        })();
        let child = spawned.map_err(remove)?;
        let mut h = Haproxy { child, dir };
        h.wait_ready(&netns)?;
        Ok(h)
    }

    /// Poll the monitor URI from inside the pod netns until HAProxy
    /// answers (it binds every listener before serving any).
    fn wait_ready(&mut self, netns: &Path) -> Result<()> {
        let ns = redirect_userspace::sys::Netns::open(netns)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                bail!("haproxy exited ({st}) before listening: {}", self.output());
            }
            let ready = ns
                .run(|| {
                    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], MONITOR_PORT));
                    let mut s =
                        std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200))?;
                    s.set_read_timeout(Some(Duration::from_secs(1)))?;
                    s.write_all(b"GET /ready HTTP/1.0\r\n\r\n")?;
                    let mut resp = String::new();
                    let _ = s.read_to_string(&mut resp);
                    Ok(resp.starts_with("HTTP/1.0 200") || resp.starts_with("HTTP/1.1 200"))
                })
                .unwrap_or(false);
            if ready {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("haproxy not ready after 10 s: {}", self.output());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything HAProxy printed, for error messages.
    pub fn output(&self) -> String {
        let read = |n: &str| std::fs::read_to_string(self.dir.join(n)).unwrap_or_default();
        format!(
            "stdout:\n{}\nstderr:\n{}",
            read("stdout.log"),
            read("stderr.log")
        )
    }

    /// The connection log lines so far, in order (the monitor's left out).
    pub fn log_lines(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.join("stdout.log"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with("conn fe=") && !l.starts_with("conn fe=monitor "))
            .map(str::to_string)
            .collect()
    }

    /// Connection log lines of one frontend (or of all with `None`),
    /// waiting up to 3 s for `want` of them.
    pub fn conns(&self, frontend: Option<&str>, want: usize) -> Vec<String> {
        let prefix = match frontend {
            Some(f) => format!("conn fe={f} "),
            None => "conn fe=".to_string(),
        };
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let lines: Vec<String> = self
                .log_lines()
                .into_iter()
                .filter(|l| l.starts_with(&prefix))
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

/// One field (`dst`, `server`, ...) of a connection log line.
pub fn log_field<'a>(line: &'a str, field: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(field)?.strip_prefix('='))
}
