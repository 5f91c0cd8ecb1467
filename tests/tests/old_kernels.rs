//! What the project does on kernels that lack a feature it uses (Linux
//! 5.10 to 5.16, docs/kernels.md): the netns cookie kept in socket storage
//! for getsockopt, sockops and sk_msg (`bpf_get_netns_cookie` there: 5.15),
//! the pod's own connections told by address in sk_lookup
//! (`ingress_ifindex`: 5.17), the netns cookie reported by a
//! cgroup/sock_create program (`SO_NETNS_COOKIE`: 5.14).
//!
//! `Pod::with_fallbacks` makes `redirect` take those ways whatever the
//! kernel has (`REDIRECT_FORCE_FALLBACKS`), so every kernel, the host's
//! too, runs what 5.10 runs; on 5.10 itself (`cargo xtask kernels`) they
//! are what the loader picks anyway.
use std::{os::fd::AsFd, time::Duration};

use redirect_tests::*;
use redirect_userspace::{netns_cookie, sys::Netns};
use serde_json::Value;

const APP_PORT: u16 = 9080;

fn status(pod: &Pod) -> Value {
    let out = pod.redirect(&["status", "--json"]);
    assert!(out.status.success(), "status: {out:?}");
    serde_json::from_slice(&out.stdout).expect("status json")
}

/// Attach types of the programs attached to the pod's cgroup.
fn attach_types(pod: &Pod) -> Vec<String> {
    cgroup_attached(&pod.topo.cgroup.path)
        .into_iter()
        .map(|(t, _)| t)
        .collect()
}

/// The `peer=`/`local=` the pod's echo server greets with.
fn app_saw(banner: Option<&str>) -> (String, String) {
    let b = banner.unwrap_or_default();
    let field = |k: &str| {
        b.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .unwrap_or_default()
            .to_string()
    };
    (field("peer="), field("local="))
}

/// (direction, orig) of the connections the kit proxy logged.
fn proxied(pod: &mut Pod, proxy: usize) -> Vec<(String, String)> {
    pod.proxy_log(proxy)
        .iter()
        .filter(|l| l["event"] == "conn")
        .map(|l| {
            (
                l["dir"].as_str().unwrap_or("?").to_string(),
                l["orig"].as_str().unwrap_or("?").to_string(),
            )
        })
        .collect()
}

/// Outbound v4 and v6 to the upstream and inbound v4 and v6 from it, all
/// through the proxy with their original addresses.
fn assert_full_capture(pod: &mut Pod, proxy: usize) {
    let mut want = Vec::new();
    for dst in [
        format!("{UPSTREAM_V4}:8080"),
        format!("[{UPSTREAM_V6}]:8080"),
    ] {
        let r = pod.app_client(&dst);
        assert_ok(&r, &dst);
        assert_eq!(r.peer.as_deref(), Some(dst.as_str()), "getpeername");
        want.push(("outbound".to_string(), dst));
    }
    for dst in [
        format!("{POD_V4}:{APP_PORT}"),
        format!("[{POD_V6}]:{APP_PORT}"),
    ] {
        let r = pod.client(&pod.topo.in_upstream(), &dst, None);
        assert_ok(&r, &dst);
        let (peer, local) = app_saw(r.banner.as_deref());
        assert!(
            peer.starts_with("127.0.0.6:") || peer.starts_with("[::6]:"),
            "{dst}: the app sees the proxy's passthrough source: {r:?}"
        );
        assert_eq!(local, dst, "{dst}: the app's local address: {r:?}");
        want.push(("inbound".to_string(), dst));
    }
    assert_eq!(
        proxied(pod, proxy),
        want,
        "the proxy's SO_ORIGINAL_DST answers"
    );
}

fn wait_for_registered(pod: &Pod, n: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while pod.counter("PREROUTING", "listener_registered") < n {
        assert!(
            std::time::Instant::now() < deadline,
            "the restarted proxy's listeners were not registered"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The builds for kernels without the features capture everything, with
/// the original addresses: a proxy that was listening before the capture
/// (its sockets get their netns cookie from attach), and one started
/// after (from the cgroup/sock_create hook).
#[test]
fn the_fallbacks_capture_with_the_original_addresses() {
    let mut pod = Pod::with_fallbacks("oldk");
    pod.start_upstream(8080);
    pod.start_app_server(APP_PORT);
    let proxy = pod.start_proxy();
    pod.attach_istio_default();

    let st = status(&pod);
    let k = &st["kernel"];
    assert_eq!(k["builds"]["netns_cookie_stored"], true, "{k:#}");
    assert_eq!(k["builds"]["sk_lookup_by_address"], true, "{k:#}");
    let programs: Vec<&str> = k["cgroup_programs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert!(programs.contains(&"redirect_sock_create"), "{k:#}");
    let missing: Vec<(&str, &str)> = k["missing"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| (g["feature"].as_str().unwrap(), g["since"].as_str().unwrap()))
        .collect();
    for (what, since) in [
        ("bpf_get_netns_cookie", "5.15"),
        ("ingress_ifindex", "5.17"),
        ("SO_NETNS_COOKIE", "5.14"),
    ] {
        assert!(
            missing.iter().any(|(f, s)| f.contains(what) && *s == since),
            "status names {what} ({since}): {k:#}"
        );
    }
    let types = attach_types(&pod);
    assert_eq!(types.len(), programs.len(), "{types:?}");
    assert!(types.iter().any(|t| t == "sock_create"), "{types:?}");

    assert_full_capture(&mut pod, proxy);
    assert_eq!(pod.counter("OUTPUT", "captured"), 2);
    assert_eq!(pod.counter("ORIGINAL_DST", "orig_dst_outbound"), 2);
    assert_eq!(pod.counter("PREROUTING", "captured"), 2);
    assert_eq!(pod.counter("ORIGINAL_DST", "orig_dst_inbound"), 2);

    // A proxy started after the capture: its sockets are recorded when
    // they are made, and sockops registers its inbound listener.
    let registered = pod.counter("PREROUTING", "listener_registered");
    pod.children.remove(proxy);
    let proxy = pod.start_proxy();
    wait_for_registered(&pod, registered + 2);
    assert_full_capture(&mut pod, proxy);
    assert_eq!(pod.counter("ORIGINAL_DST", "orig_dst_outbound"), 4);
    assert_eq!(pod.counter("ORIGINAL_DST", "orig_dst_inbound"), 4);
    assert_eq!(pod.counter("ORIGINAL_DST", "orig_dst_missing"), 0);

    // Traffic of the pod to itself is not inbound traffic: told by its
    // source address (no ingress_ifindex in this build).
    let own = format!("{POD_V4}:{APP_PORT}");
    let r = pod.client(&pod.topo.in_pod(APP_UID, APP_UID), &own, None);
    assert_ok(&r, &own);
    let (peer, _) = app_saw(r.banner.as_deref());
    assert_eq!(
        Some(peer.as_str()),
        r.local.as_deref(),
        "the pod reaches itself directly: {r:?}"
    );
    assert_eq!(pod.counter("PREROUTING", "captured"), 4);

    // Uninstall removes every link, the sock_create one too: nothing left
    // attached, nothing left pinned.
    let out = pod.redirect(&["uninstall"]);
    assert!(out.status.success(), "uninstall: {out:?}");
    assert_eq!(attach_types(&pod), Vec::<String>::new());
    assert!(
        !pod.pin_dir.exists(),
        "pin dir left: {:?}",
        std::fs::read_dir(&pod.pin_dir).map(|d| d.flatten().map(|e| e.path()).collect::<Vec<_>>())
    );
}

/// The kernel's report of a netns's cookie (`redirect_netns_cookie`, for
/// kernels without SO_NETNS_COOKIE) is the cookie: the same twice, another
/// for another netns, and SO_NETNS_COOKIE's where the kernel has that. No
/// reporting cgroup is left behind.
#[test]
fn the_netns_cookie_reported_by_the_kernel_is_the_netns_cookie() {
    let a = Pod::new("oldka");
    let b = Pod::new("oldkb");
    let na = Netns::open(&a.pod_netns()).unwrap();
    let nb = Netns::open(&b.pod_netns()).unwrap();
    let ra = netns_cookie::reported(na.file.as_fd()).expect("reported cookie");
    assert_ne!(ra, 0);
    assert_eq!(netns_cookie::reported(na.file.as_fd()).unwrap(), ra);
    let rb = netns_cookie::reported(nb.file.as_fd()).unwrap();
    assert_ne!(ra, rb);
    if let Some(c) = na.run(netns_cookie::from_socket_option).unwrap() {
        assert_eq!(c, ra, "SO_NETNS_COOKIE");
    }
    let root = redirect_userspace::sys::cgroup2_mount().unwrap();
    let mine = format!("redirect-netns-cookie-{}x", std::process::id());
    let left: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&mine))
        .collect();
    assert!(left.is_empty(), "reporting cgroups left: {left:?}");
}
