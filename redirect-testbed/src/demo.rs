//! `redirect-kit demo` (`cargo xtask demo`): the main job end to end on
//! this host, then cleanup.
//!
//! pod netns (app uid 1000 + sidecar proxy uid 1337, own cgroup)
//!   <-- veth --> upstream netns (echo server)
//! Every address used lives in a namespace the demo created.

use std::{path::PathBuf, process::Command};

use anyhow::{bail, Context, Result};
use redirect_userspace::{
    attach::{self, Installation},
    config::PodSpec,
    pins::Pins,
    report, sys,
};

use crate::{
    kit::ClientReport,
    sandbox::{
        place, sibling_binary, ChildGuard, Placement, Topology, POD_V4, UPSTREAM_V4, UPSTREAM_V6,
    },
};

#[derive(clap::Args)]
pub struct Args {
    /// Outbound connections the app makes (per address family).
    #[arg(long, default_value = "3")]
    pub connections: u32,
}

/// Removes the demo's install even if the demo fails half-way.
struct PinGuard(Pins);
impl Drop for PinGuard {
    fn drop(&mut self) {
        if let Err(e) = attach::uninstall(&self.0) {
            eprintln!("demo cleanup: {e}");
        }
    }
}

fn client(kit: &PathBuf, p: &Placement, dst: &str) -> Result<ClientReport> {
    let mut cmd = Command::new(kit);
    cmd.args([
        "client",
        "--connect",
        dst,
        "--payload",
        "hello through the mesh",
    ]);
    place(&mut cmd, p)?;
    let out = cmd
        .output()
        .with_context(|| format!("running client to {dst}"))?;
    serde_json::from_slice(&out.stdout)
        .with_context(|| format!("client output {:?}", String::from_utf8_lossy(&out.stderr)))
}

pub fn run(a: Args) -> Result<()> {
    sys::check_privileges()?;
    let kit = sibling_binary("redirect-kit");
    if !kit.exists() {
        bail!(
            "{} is missing: build it with `cargo build --release` (or run `cargo xtask demo`)",
            kit.display()
        );
    }
    println!("== 1. pod netns + upstream netns over veth, pod cgroup");
    let topo = Topology::new("demo")?;
    println!(
        "   pod {} ({POD_V4}), upstream {} ({UPSTREAM_V4}, {UPSTREAM_V6}), cgroup {}",
        topo.pod.path().display(),
        topo.upstream.path().display(),
        topo.cgroup.path.display()
    );

    let port = "8080";
    let mut upstream = Command::new(&kit);
    upstream.args([
        "echo",
        "--listen",
        &format!("{UPSTREAM_V4}:{port}"),
        "--listen",
        &format!("[{UPSTREAM_V6}]:{port}"),
    ]);
    let _upstream = ChildGuard::spawn("upstream echo server", upstream, &topo.in_upstream(), true)?;
    let mut app_server = Command::new(&kit);
    app_server.args(["echo", "--listen", "0.0.0.0:9080"]);
    let _app_server = ChildGuard::spawn("app server", app_server, &topo.in_pod(1000, 1000), true)?;
    let mut proxy_cmd = Command::new(&kit);
    proxy_cmd.arg("proxy");
    let mut proxy = ChildGuard::spawn("sidecar proxy", proxy_cmd, &topo.in_pod(1337, 1337), true)?;
    println!("== 2. sidecar proxy (uid 1337) on 15001/15006 and app server on :9080 in the pod; echo server upstream");

    let pins = Pins::new(format!("/sys/fs/bpf/redirect-demo-{}", std::process::id()));
    let _cleanup = PinGuard(pins.clone());
    // The pod has IPv4 and IPv6 addresses, IPv4 first: --dual-stack for
    // its IPv6 calls to be captured too (shown in the command below).
    let spec = PodSpec {
        dual_stack: true,
        ..PodSpec::istio_default()
    };
    let mut inst = Installation::open(&pins.root)?;
    inst.attach_cgroup(&topo.cgroup.path)?;
    let netns = sys::Netns::open(&topo.pod.path())?;
    let info = inst.register_pod(&netns, &spec)?;
    println!(
        "== 3. redirect attach --netns {} --cgroup {} {}",
        topo.pod.path().display(),
        topo.cgroup.path.display(),
        spec.istio_args()
    );
    println!(
        "   netns cookie {}, pod addresses {:?}, IPv6 {}",
        info.cookie,
        info.addresses,
        info.ipv6.describe()
    );

    println!("== 4. the app (uid 1000) calls the upstream server; no iptables rule exists");
    let app = topo.in_pod(1000, 1000);
    let mut failures = 0;
    for i in 0..a.connections {
        for dst in [
            format!("{UPSTREAM_V4}:{port}"),
            format!("[{UPSTREAM_V6}]:{port}"),
        ] {
            let r = client(&kit, &app, &dst)?;
            println!(
                "   #{i} app -> {dst}: {} (app's getpeername {}, server greeted \"{}\")",
                if r.ok { "ok" } else { "FAILED" },
                r.peer.as_deref().unwrap_or("-"),
                r.banner.as_deref().or(r.error.as_deref()).unwrap_or("-")
            );
            failures += usize::from(!r.ok);
        }
    }
    println!("== 5. a client outside the pod calls the app on {POD_V4}:9080 (captured to the proxy's 15006)");
    let r = client(&kit, &topo.in_upstream(), &format!("{POD_V4}:9080"))?;
    println!(
        "   upstream -> {POD_V4}:9080: {} (app greeted \"{}\")",
        if r.ok { "ok" } else { "FAILED" },
        r.banner.as_deref().or(r.error.as_deref()).unwrap_or("-")
    );
    failures += usize::from(!r.ok);

    std::thread::sleep(std::time::Duration::from_millis(100));
    println!("== 6. what the proxy saw (SO_ORIGINAL_DST per accepted connection)");
    for l in proxy.take_lines() {
        println!("   {l}");
    }
    println!("== 7. redirect stats");
    print!(
        "{}",
        report::render_stats(&report::stats(&pins, Some(info.cookie))?)
    );
    println!("== 8. cleanup: uninstall, namespaces, cgroup, processes");
    if failures > 0 {
        bail!("{failures} demo connection(s) failed");
    }
    println!("demo ok");
    Ok(())
}
