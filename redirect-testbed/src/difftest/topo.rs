//! The two pods of the differential test and everything around them. Both
//! are the same: a pod netns and an upstream netns over veth
//! ([`crate::sandbox::Topology`]), more upstream hosts inside and outside
//! the pod's subnet, servers on fixed ports on every side, all addresses
//! inside the test's own namespaces.

use std::{io, net::SocketAddr, process::Command};

use crate::sandbox::{sibling_binary, ChildGuard, Topology};

pub use crate::sandbox::{POD_V4, POD_V6};

/// Upstream hosts: the pod's on-link peer, two more on-link addresses in
/// and out of the small CIDRs, and one behind a route (another subnet).
pub const UP_V4: [&str; 4] = ["10.200.0.1", "10.200.0.11", "10.200.0.21", "10.201.0.1"];
pub const UP_V6: [&str; 4] = ["fd00:200::1", "fd00:200::11", "fd00:200::21", "fd00:201::1"];

/// TCP ports every upstream host serves.
pub const UP_PORTS: [u16; 8] = [22, 53, 80, 443, 8080, 8081, 9080, 15008];
/// TCP ports the app serves in the pod (every address).
pub const APP_PORTS: [u16; 10] = [22, 53, 80, 8080, 9080, 9081, 15008, 15020, 15021, 15090];
/// A port nothing listens on, anywhere.
pub const NO_LISTENER: u16 = 7777;
/// The agent's DNS proxy (a stub here, as the proxy's uid).
pub const DNS_PORT: u16 = 15053;
/// The DNS stub runs as this uid/gid (the agent runs as the proxy user).
pub const DNS_STUB_ID: u32 = 1337;

fn kit() -> std::path::PathBuf {
    sibling_binary("redirect-kit")
}

/// `redirect-kit diff-serve` as `role` placed as asked.
fn serve(
    name: &str,
    role: &str,
    tcp: &[SocketAddr],
    udp: &[SocketAddr],
    p: &crate::sandbox::Placement,
) -> io::Result<ChildGuard> {
    let mut cmd = Command::new(kit());
    cmd.args(["diff-serve", "--role", role]);
    for a in tcp {
        cmd.args(["--tcp", &a.to_string()]);
    }
    for a in udp {
        cmd.args(["--udp", &a.to_string()]);
    }
    ChildGuard::spawn(name, cmd, p, true)
}

fn sa(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().expect("a literal address"), port)
}

/// One pod with its surroundings and servers.
pub struct Pod {
    pub topo: Topology,
    /// Upstream servers, the app, the DNS stub; killed on drop.
    _servers: Vec<ChildGuard>,
}

impl Pod {
    pub fn new(tag: &str) -> io::Result<Pod> {
        let topo = Topology::new(tag)?;
        let (pod, up) = (&topo.pod, &topo.upstream);
        // The app binds ports below 1024 as uid 1000 (per-netns setting).
        let out = Command::new("ip")
            .args(["netns", "exec", &pod.name, "sysctl", "-q", "-w"])
            .arg("net.ipv4.ip_unprivileged_port_start=0")
            .output()?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "sysctl in {}: {}",
                pod.name,
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        pod.ip(&["route", "add", "10.201.0.0/24", "via", UP_V4[0]])?;
        pod.ip(&["-6", "route", "add", "fd00:201::/64", "via", UP_V6[0]])?;
        for a in &UP_V4[1..] {
            up.ip(&["addr", "add", &format!("{a}/32"), "dev", "eth0"])?;
        }
        for a in &UP_V6[1..] {
            up.ip(&[
                "-6",
                "addr",
                "add",
                &format!("{a}/128"),
                "dev",
                "eth0",
                "nodad",
            ])?;
        }
        let mut servers = Vec::new();
        let mut tcp = Vec::new();
        for p in UP_PORTS {
            tcp.extend([sa("0.0.0.0", p), sa("::", p)]);
        }
        let udp: Vec<SocketAddr> = UP_V4.iter().chain(&UP_V6).map(|a| sa(a, 53)).collect();
        servers.push(serve(
            "upstream",
            "upstream",
            &tcp,
            &udp,
            &topo.in_upstream(),
        )?);
        let mut tcp = Vec::new();
        for p in APP_PORTS {
            tcp.extend([sa("0.0.0.0", p), sa("::", p)]);
        }
        let udp = [
            sa("127.0.0.53", 53),
            sa(POD_V4, 53),
            sa(POD_V6, 53),
            sa("::1", 53),
        ];
        let app = topo.in_pod(super::gen::APP, super::gen::APP);
        servers.push(serve("app", "app", &tcp, &udp, &app)?);
        let dns = [sa("127.0.0.1", DNS_PORT), sa("::1", DNS_PORT)];
        let stub = topo.in_pod(DNS_STUB_ID, DNS_STUB_ID);
        servers.push(serve("dns", "dns", &dns, &dns, &stub)?);
        Ok(Pod {
            topo,
            _servers: servers,
        })
    }

    /// Interface addresses as the kernel lists them (what istio-iptables
    /// looks at to decide whether IPv6 is on).
    pub fn addresses() -> Vec<std::net::IpAddr> {
        ["127.0.0.1", "::1", POD_V4, POD_V6, "fe80::1"]
            .iter()
            .map(|a| a.parse().expect("a literal address"))
            .collect()
    }

    /// `::6` on `lo`, present or not ("a fresh pod" has none).
    pub fn set_passthrough_v6(&self, on: bool) -> io::Result<()> {
        let _ = self
            .topo
            .pod
            .ip(&["-6", "addr", "del", "::6/128", "dev", "lo"]);
        if on {
            self.topo
                .pod
                .ip(&["-6", "addr", "add", "::6/128", "dev", "lo", "nodad"])?;
        }
        Ok(())
    }
}
