//! `-c` (excluded interfaces) and `-k` (a VM's interfaces), end to end.
//!
//! - `-c`: a second network ("side", on the pod's `net1`) whose inbound
//!   connections are not captured, and whose destinations (its subnet and
//!   a route through it) are left alone outbound, while eth0 is captured.
//! - `-k`: a "vm" namespace behind the pod (a veth standing in for the
//!   VM's tap; the pod routes and forwards for it). The VM's connection to
//!   the upstream lands on the proxy's outbound port, from the VM's
//!   address, on the interface's own address (as REDIRECT), with
//!   SO_ORIGINAL_DST the upstream; the proxy's own connection goes out.
//!   Without `-k` the VM's connection is forwarded straight upstream.
//! - The agent applies names whose interfaces appear later.

mod agent_support;

use std::{
    path::Path,
    time::{Duration, Instant},
};

use agent_support::{Daemon, TempDir};
use redirect_testbed::{kit::ClientReport, sandbox::unique};
use redirect_tests::{
    pinned_map_len, run, NetnsGuard, Placement, Pod, POD_V4, POD_V6, UPSTREAM_V4, UPSTREAM_V6,
};
use serde_json::{json, Value};

/// The side network, on the pod's `net1`.
const SIDE_V4: &str = "10.201.0.1";
const SIDE_V6: &str = "fd00:201::1";
const POD_NET1_V4: &str = "10.201.0.2";
const POD_NET1_V6: &str = "fd00:201::2";
/// Beyond the side network: the pod routes it through net1.
const BEYOND_SIDE_V4: &str = "10.202.0.1";

/// The VM's network, on the pod's `vm0` (KubeVirt's masquerade binding
/// uses 10.0.2.0/24 the same way).
const VM_GW_V4: &str = "10.0.2.1";
const VM_GW_V6: &str = "fd10:0:2::1";
const VM_V4: &str = "10.0.2.2";
const VM_V6: &str = "fd10:0:2::2";

fn sa(ip: &str, port: u16) -> String {
    if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    }
}

/// A veth pair between `a` (named `a_name` there) and `b` (`b_name`).
fn veth(a: &NetnsGuard, a_name: &str, b: &NetnsGuard, b_name: &str) {
    let (ta, tb) = (unique("xa"), unique("xb"));
    run(
        "ip",
        &[
            "link", "add", &ta, "netns", &a.name, "type", "veth", "peer", "name", &tb, "netns",
            &b.name,
        ],
    )
    .expect("veth");
    a.ip(&["link", "set", &ta, "name", a_name]).unwrap();
    b.ip(&["link", "set", &tb, "name", b_name]).unwrap();
}

fn addrs(ns: &NetnsGuard, dev: &str, v4: &str, v6: &str, len6: u8) {
    ns.ip(&["addr", "add", &format!("{v4}/24"), "dev", dev])
        .unwrap();
    ns.ip(&[
        "-6",
        "addr",
        "add",
        &format!("{v6}/{len6}"),
        "dev",
        dev,
        "nodad",
    ])
    .unwrap();
    ns.ip(&["link", "set", dev, "up"]).unwrap();
}

fn in_ns(ns: &NetnsGuard) -> Placement {
    Placement {
        netns: Some(ns.path()),
        ..Placement::default()
    }
}

/// `redirect stats` counter of the pod.
fn counter(pod: &Pod, chain: &str, rule: &str) -> u64 {
    pod.counter(chain, rule)
}

fn eventually(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The server reached saw the client's own socket: not through a proxy.
fn assert_direct(r: &ClientReport, dst: &str, what: &str) {
    assert!(r.ok, "{what}: {r:?}");
    assert_eq!(r.peer.as_deref(), Some(dst), "{what}: {r:?}");
    let local = r.local.clone().unwrap_or_default();
    assert_eq!(
        r.banner.as_deref(),
        Some(format!("peer={local} local={dst}").as_str()),
        "{what}: the server must see the client's own socket: {r:?}"
    );
}

/// The server reached saw another socket, from `from`: through the proxy.
fn assert_proxied(r: &ClientReport, dst: &str, from: &str, what: &str) {
    assert!(r.ok, "{what}: {r:?}");
    assert_eq!(r.peer.as_deref(), Some(dst), "{what}: {r:?}");
    let banner = r.banner.clone().unwrap_or_default();
    let host = if from.contains(':') {
        format!("[{from}]")
    } else {
        from.to_string()
    };
    assert!(
        banner.starts_with(&format!("peer={host}:")) && banner.ends_with(&format!("local={dst}")),
        "{what}: the server must see the proxy's socket from {from}: {r:?}"
    );
    assert_ne!(
        banner,
        format!(
            "peer={} local={dst}",
            r.local.as_deref().unwrap_or_default()
        ),
        "{what}: not proxied"
    );
}

// ---------------------------------------------------------------- -c

/// A pod with eth0 (upstream) and net1 (side network, plus a route to
/// 10.202.0.0/16 through it); echo servers upstream and on the side; the
/// app's server on 9080; the kit proxy.
struct SideRig {
    pod: Pod,
    side: NetnsGuard,
    proxy: usize,
}

impl SideRig {
    fn new(tag: &str) -> SideRig {
        let mut pod = Pod::new(tag);
        let side = NetnsGuard::new(&format!("rds-{tag}-{}", unique(""))).unwrap();
        veth(&pod.topo.pod, "net1", &side, "eth0");
        addrs(&pod.topo.pod, "net1", POD_NET1_V4, POD_NET1_V6, 64);
        addrs(&side, "eth0", SIDE_V4, SIDE_V6, 64);
        side.ip(&["addr", "add", &format!("{BEYOND_SIDE_V4}/32"), "dev", "lo"])
            .unwrap();
        pod.topo
            .pod
            .ip(&[
                "route",
                "add",
                "10.202.0.0/16",
                "via",
                SIDE_V4,
                "dev",
                "net1",
            ])
            .unwrap();
        pod.start_upstream(8080);
        let listen: Vec<String> = [SIDE_V4, BEYOND_SIDE_V4, SIDE_V6]
            .iter()
            .flat_map(|a| ["--listen".to_string(), sa(a, 8080)])
            .collect();
        let mut args = vec!["echo"];
        args.extend(listen.iter().map(String::as_str));
        pod.spawn("side-echo", &args, &in_ns(&side));
        pod.start_app_server(9080);
        let proxy = pod.start_proxy();
        SideRig { pod, side, proxy }
    }

    fn proxy_conns(&mut self) -> Vec<Value> {
        self.pod
            .proxy_log(self.proxy)
            .into_iter()
            .filter(|l| l["event"] == "conn")
            .collect()
    }
}

#[test]
fn excluded_interface_inbound_is_not_captured() {
    let mut r = SideRig::new("cin");
    r.pod.attach_istio_default_with(&["-c", "net1"]);
    let upstream = r.pod.topo.in_upstream();
    let side = in_ns(&r.side);
    // From the side network, on net1: straight to the app.
    for dst in [sa(POD_NET1_V4, 9080), sa(POD_NET1_V6, 9080)] {
        let c = r.pod.client(&side, &dst, None);
        assert_direct(&c, &dst, &format!("side -> {dst} (net1, -c)"));
    }
    assert!(
        r.proxy_conns().is_empty(),
        "the proxy took a net1 connection"
    );
    assert_eq!(counter(&r.pod, "PREROUTING", "skip_excluded_interface"), 2);
    // From upstream, on eth0: captured, the app sees the passthrough.
    for (dst, pass) in [(sa(POD_V4, 9080), "127.0.0.6"), (sa(POD_V6, 9080), "[::6]")] {
        let c = r.pod.client(&upstream, &dst, None);
        assert!(c.ok, "{c:?}");
        let banner = c.banner.clone().unwrap_or_default();
        assert!(
            banner.starts_with(&format!("peer={pass}:")),
            "upstream -> {dst}: {banner}"
        );
    }
    assert_eq!(r.proxy_conns().len(), 2);
    assert_eq!(counter(&r.pod, "PREROUTING", "captured"), 2);
}

#[test]
fn excluded_interface_routes_are_not_captured_outbound() {
    let mut r = SideRig::new("cout");
    r.pod.attach_istio_default_with(&["-c", "net1"]);
    // Out of net1: its subnet (v4, v6) and a route through it.
    for dst in [
        sa(SIDE_V4, 8080),
        sa(SIDE_V6, 8080),
        sa(BEYOND_SIDE_V4, 8080),
    ] {
        let c = r.pod.app_client(&dst);
        assert_direct(&c, &dst, &format!("app -> {dst} (out net1)"));
    }
    assert!(r.proxy_conns().is_empty());
    assert_eq!(counter(&r.pod, "OUTPUT", "skip_excluded_interface"), 3);
    // Out of eth0: captured.
    for (dst, from) in [
        (sa(UPSTREAM_V4, 8080), POD_V4),
        (sa(UPSTREAM_V6, 8080), POD_V6),
    ] {
        let c = r.pod.app_client(&dst);
        assert_proxied(&c, &dst, from, &format!("app -> {dst} (out eth0)"));
    }
    assert_eq!(r.proxy_conns().len(), 2);
    assert_eq!(counter(&r.pod, "OUTPUT", "captured"), 2);
    // The same pod without -c: net1's destinations are captured too.
    r.pod.attach_istio_default();
    let dst = sa(BEYOND_SIDE_V4, 8080);
    let c = r.pod.app_client(&dst);
    assert_proxied(&c, &dst, POD_NET1_V4, "app -> beyond side, no -c");
}

#[test]
fn interface_names_show_in_status_and_stats() {
    let r = SideRig::new("cstat");
    let out = r
        .pod
        .attach_istio_default_with(&["-c", "net1,eth9", "-k", "vm+"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no interface of the pod matches eth9, vm+ yet"),
        "{err}"
    );
    let st = r.pod.redirect(&["status", "--json"]);
    let v: Value = serde_json::from_slice(&st.stdout).unwrap();
    let p = &v["pods"][0];
    assert!(
        p["istio_iptables_args"]
            .as_str()
            .unwrap()
            .ends_with("-c 'net1,eth9' -k 'vm+' --dual-stack"),
        "{p}"
    );
    let ifaces: Vec<String> = serde_json::from_value(p["interfaces"].clone()).unwrap();
    assert!(
        ifaces
            .iter()
            .any(|i| i.starts_with("net1 (ifindex ") && i.contains("-c: not captured")),
        "{ifaces:?}"
    );
    assert!(ifaces
        .iter()
        .any(|i| i == "eth9: no such interface in the pod (yet)"));
    let stats = r.pod.stats();
    let rule = redirect_tests::stats_rule(&stats[0], "OUTPUT", "skip_excluded_interface");
    assert_eq!(rule["match"], "out net1,eth9", "{rule}");
}

// ---------------------------------------------------------------- -k

/// A pod with a VM behind `vm0`: the pod has 10.0.2.1 and fd10:0:2::1
/// there, the VM 10.0.2.2 and fd10:0:2::2 with its default routes through
/// the pod, which forwards; the upstream routes the VM's networks back
/// through the pod (for what is not redirected).
struct VmRig {
    pod: Pod,
    vm: NetnsGuard,
}

impl VmRig {
    fn new(tag: &str) -> VmRig {
        let mut pod = Pod::new(tag);
        let vm = NetnsGuard::new(&format!("rdv-{tag}-{}", unique(""))).unwrap();
        veth(&pod.topo.pod, "vm0", &vm, "eth0");
        addrs(&pod.topo.pod, "vm0", VM_GW_V4, VM_GW_V6, 64);
        addrs(&vm, "eth0", VM_V4, VM_V6, 64);
        vm.ip(&["route", "add", "default", "via", VM_GW_V4])
            .unwrap();
        vm.ip(&["-6", "route", "add", "default", "via", VM_GW_V6])
            .unwrap();
        let pname = pod.topo.pod.name.clone();
        for s in ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"] {
            run("ip", &["netns", "exec", &pname, "sysctl", "-qw", s]).unwrap();
        }
        let up = &pod.topo.upstream;
        up.ip(&["route", "add", "10.0.2.0/24", "via", POD_V4])
            .unwrap();
        up.ip(&["-6", "route", "add", "fd10:0:2::/64", "via", POD_V6])
            .unwrap();
        pod.start_upstream(8080);
        VmRig { pod, vm }
    }

    fn vm(&self) -> Placement {
        in_ns(&self.vm)
    }
}

#[test]
fn vm_connections_land_on_the_outbound_port_with_their_original_destination() {
    let mut r = VmRig::new("kvm");
    let proxy = r.pod.start_proxy();
    let out = r.pod.attach_istio_default_with(&["-k", "vm0"]);
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains("VM interfaces (-k), programs attached: vm0 (ifindex"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let vm = r.vm();
    for (dst, vm_ip, gw, pod_ip) in [
        (sa(UPSTREAM_V4, 8080), VM_V4, sa(VM_GW_V4, 15001), POD_V4),
        (sa(UPSTREAM_V6, 8080), VM_V6, sa(VM_GW_V6, 15001), POD_V6),
    ] {
        let c = r.pod.client(&vm, &dst, None);
        // The VM sees the upstream answer (replies get their source back);
        // the upstream sees the proxy's connection from the pod.
        assert_proxied(&c, &dst, pod_ip, &format!("vm -> {dst}"));
        let log: Vec<Value> = r
            .pod
            .proxy_log(proxy)
            .into_iter()
            .filter(|l| l["event"] == "conn")
            .collect();
        assert_eq!(log.len(), 1, "{log:?}");
        // As REDIRECT: on the outbound port of the interface's address,
        // from the VM's own socket, SO_ORIGINAL_DST the upstream.
        assert_eq!(log[0]["dir"], "outbound", "{}", log[0]);
        assert_eq!(log[0]["orig"], dst.as_str(), "{}", log[0]);
        assert_eq!(log[0]["local"], gw.as_str(), "{}", log[0]);
        assert_eq!(
            log[0]["peer"],
            c.local.as_deref().unwrap_or_default(),
            "the proxy sees the VM's socket ({vm_ip})"
        );
    }
    assert_eq!(counter(&r.pod, "VM", "captured"), 2);
    assert_eq!(counter(&r.pod, "ORIGINAL_DST", "orig_dst_outbound"), 2);
    assert_eq!(counter(&r.pod, "OUTPUT", "skip_proxy_uid"), 2);
    // Neither an inbound capture nor a miss.
    assert_eq!(counter(&r.pod, "PREROUTING", "captured"), 0);
    assert_eq!(counter(&r.pod, "ORIGINAL_DST", "orig_dst_missing"), 0);
    // Records go when the proxy's sockets close.
    eventually(
        "the VM connections' records to go",
        Duration::from_secs(5),
        || pinned_map_len(&r.pod, "REDIRECT_ORIG_BY_TUPLE") == 0,
    );
    // Many in a row, and data both ways (the echo is checked byte for byte).
    for _ in 0..20 {
        let c = redirect_tests::client_sized(&vm, &sa(UPSTREAM_V4, 8080), 256 * 1024);
        assert!(c.ok && c.echoed, "{c:?}");
    }
    assert_eq!(counter(&r.pod, "VM", "captured"), 22);
}

#[test]
fn vm_connections_go_straight_without_k() {
    let mut r = VmRig::new("knok");
    let proxy = r.pod.start_proxy();
    r.pod.attach_istio_default();
    let vm = r.vm();
    for (dst, vm_ip) in [
        (sa(UPSTREAM_V4, 8080), VM_V4),
        (sa(UPSTREAM_V6, 8080), VM_V6),
    ] {
        let c = r.pod.client(&vm, &dst, None);
        assert_direct(&c, &dst, &format!("vm -> {dst}, no -k"));
        assert!(
            c.local.as_deref().unwrap_or_default().contains(vm_ip),
            "{c:?}"
        );
    }
    assert!(r.pod.proxy_log(proxy).iter().all(|l| l["event"] != "conn"));
    assert_eq!(counter(&r.pod, "VM", "captured"), 0);
}

#[test]
fn vm_rules_follow_the_include_list_only() {
    let mut r = VmRig::new("kinc");
    let proxy = r.pod.start_proxy();
    // -i names the upstream's v4 subnet only; -x excludes the upstream
    // itself, which the -k rules do not look at (istio-iptables puts -x in
    // ISTIO_OUTPUT only).
    let x = format!("{UPSTREAM_V4}/32");
    r.pod
        .attach_istio_default_with(&["-i", "10.200.0.0/24", "-x", &x, "-k", "vm0"]);
    let vm = r.vm();
    let v4 = sa(UPSTREAM_V4, 8080);
    assert_proxied(&r.pod.client(&vm, &v4, None), &v4, POD_V4, "vm -> v4");
    let v6 = sa(UPSTREAM_V6, 8080);
    assert_direct(&r.pod.client(&vm, &v6, None), &v6, "vm -> v6 (not in -i)");
    // The app's own connection to the excluded upstream goes direct.
    assert_direct(&r.pod.app_client(&v4), &v4, "app -> -x upstream");
    assert_eq!(counter(&r.pod, "VM", "captured"), 1);
    // Counted per SYN: one the VM sent again (a slow first handshake)
    // counts again when it was not redirected.
    assert!(counter(&r.pod, "VM", "skip_not_included") >= 1);
    assert_eq!(counter(&r.pod, "OUTPUT", "skip_excluded_cidr"), 1);
    let conns: Vec<Value> = r
        .pod
        .proxy_log(proxy)
        .into_iter()
        .filter(|l| l["event"] == "conn")
        .collect();
    assert_eq!(conns.len(), 1, "{conns:?}");
}

#[test]
fn vm_connection_without_a_proxy_is_dropped_and_leaves_nothing() {
    let r = VmRig::new("kdrop");
    r.pod.attach_istio_default_with(&["-k", "vm0"]);
    let c = r.pod.client(&r.vm(), &sa(UPSTREAM_V4, 8080), None);
    assert!(!c.ok, "nothing listens on 15001: {c:?}");
    assert!(counter(&r.pod, "VM", "dropped") >= 1);
    assert_eq!(counter(&r.pod, "VM", "captured"), 0);
    assert_eq!(pinned_map_len(&r.pod, "REDIRECT_ORIG_BY_TUPLE"), 0);
}

#[test]
fn detach_and_uninstall_remove_the_vm_programs() {
    let r = VmRig::new("kdet");
    r.pod.attach_istio_default_with(&["-k", "vm0"]);
    let cookie = r.pod.stats()[0]["netns_cookie"].as_u64().unwrap();
    let dir = r.pod.pin_dir.join("netns").join(cookie.to_string());
    let links = |d: &Path| -> Vec<String> {
        std::fs::read_dir(d)
            .map(|rd| {
                let mut v: Vec<String> = rd
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect();
                v.sort();
                v
            })
            .unwrap_or_default()
    };
    let want: Vec<String> = {
        let idx = r
            .pod
            .topo
            .pod
            .ip(&["-o", "link", "show", "vm0"])
            .unwrap()
            .split(':')
            .next()
            .unwrap()
            .trim()
            .to_string();
        vec![
            "sk_lookup".into(),
            format!("vm_egress_{idx}"),
            format!("vm_ingress_{idx}"),
        ]
    };
    assert_eq!(links(&dir), want);
    // The kernel holds the links (tcx on vm0); detach frees them.
    let link_ids: Vec<u64> = want[1..]
        .iter()
        .map(|f| {
            let out = run(
                "bpftool",
                &[
                    "-j",
                    "link",
                    "show",
                    "pinned",
                    dir.join(f).to_str().unwrap(),
                ],
            )
            .unwrap();
            let v: Value = serde_json::from_str(&out).unwrap();
            v["id"].as_u64().unwrap_or_else(|| panic!("{v}"))
        })
        .collect();
    let ns = r.pod.pod_netns();
    let out = r.pod.redirect(&["detach", "--netns", ns.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    assert!(!dir.exists(), "{:?}", links(&dir));
    for id in link_ids {
        let out = std::process::Command::new("bpftool")
            .args(["link", "show", "id", &id.to_string()])
            .output()
            .unwrap();
        assert!(!out.status.success(), "link {id} still exists: {out:?}");
    }
    // The VM's connections go straight again.
    let dst = sa(UPSTREAM_V4, 8080);
    assert_direct(&r.pod.client(&r.vm(), &dst, None), &dst, "after detach");
    // Captured again, then uninstall (the Pod's drop) removes everything.
    r.pod.attach_istio_default_with(&["-k", "vm0"]);
    assert_eq!(links(&dir).len(), 3);
}

// ------------------------------------------------- interfaces appearing

/// The agent applies `-c`/`-k` names as interfaces appear (KubeVirt makes
/// a VM's interfaces after the pod's network): the VM programs attach to
/// the new interface once it has its address, and go when it goes.
#[test]
fn agent_applies_names_when_interfaces_appear() {
    let mut pod = Pod::new("kappear");
    pod.start_upstream(8080);
    let proxy = pod.start_proxy();
    let tmp = TempDir::new("kappear");
    let sock = tmp.join("agent.sock");
    let daemon = Daemon::start(
        &pod.pin_dir,
        &pod.topo.cgroup.path,
        &sock,
        &tmp.join("daemon.log"),
        &[],
    );
    let ns = pod.pod_netns().display().to_string();
    let r = daemon.call(&json!({
        "op": "add",
        "netns": ns,
        "container_id": "ctr-kappear",
        "config": {"istio-inbound-ports": "*", "istio-service-cidr": "*", "kube-virt-interfaces": "vm0", "istio-exclude-interfaces": "net7"}
    }));
    assert_eq!(r["ok"], true, "{r}");
    let status = |pod: &Pod| -> Vec<String> {
        let st = pod.redirect(&["status", "--json"]);
        let v: Value = serde_json::from_slice(&st.stdout).unwrap();
        serde_json::from_value(v["pods"][0]["interfaces"].clone()).unwrap_or_default()
    };
    assert!(
        status(&pod).contains(&"vm0: no such interface in the pod (yet)".to_string()),
        "{:?}",
        status(&pod)
    );
    // The VM's interface appears, then gets its address.
    let vm = NetnsGuard::new(&format!("rdv-kappear-{}", unique(""))).unwrap();
    veth(&pod.topo.pod, "vm0", &vm, "eth0");
    pod.topo.pod.ip(&["link", "set", "vm0", "up"]).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    addrs(&pod.topo.pod, "vm0", VM_GW_V4, VM_GW_V6, 64);
    addrs(&vm, "eth0", VM_V4, VM_V6, 64);
    vm.ip(&["route", "add", "default", "via", VM_GW_V4])
        .unwrap();
    eventually("the VM programs on vm0", Duration::from_secs(10), || {
        status(&pod).iter().any(|i| {
            i.starts_with("vm0 (ifindex") && i.contains(VM_GW_V4) && i.contains("programs attached")
        })
    });
    let dst = sa(UPSTREAM_V4, 8080);
    let c = pod.client(&in_ns(&vm), &dst, None);
    assert_proxied(&c, &dst, POD_V4, "vm -> upstream after vm0 appeared");
    assert!(pod
        .proxy_log(proxy)
        .iter()
        .any(|l| l["event"] == "conn" && l["orig"] == dst.as_str()));
    // The interface goes: its links go with it.
    pod.topo.pod.ip(&["link", "del", "vm0"]).unwrap();
    let cookie = pod.stats()[0]["netns_cookie"].as_u64().unwrap();
    let dir = pod.pin_dir.join("netns").join(cookie.to_string());
    eventually("vm0's links to go", Duration::from_secs(10), || {
        std::fs::read_dir(&dir)
            .map(|rd| {
                rd.flatten()
                    .all(|e| !e.file_name().to_string_lossy().starts_with("vm_"))
            })
            .unwrap_or(true)
    });
    assert!(
        daemon
            .log_text()
            .contains("pod's interfaces changed: applied"),
        "{}",
        daemon.log_text()
    );
    drop(daemon);
}
