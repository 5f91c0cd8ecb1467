//! The kernel programs' debug log (aya-log): off unless asked, per
//! install, forwarded to the agent's log, and the same pinned buffer for a
//! restarted agent.

mod agent_support;

use std::{path::Path, time::Duration};

use agent_support::*;
use redirect_tests::{Pod, UPSTREAM_V4};
use serde_json::json;

const SELECT: &str =
    "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart;REDIRECT_CAPTURE=true";

/// The switch's value (`REDIRECT_LOG[0]`), read with bpftool.
fn switch(pin_dir: &Path) -> u8 {
    let out = std::process::Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(pin_dir.join("maps/REDIRECT_LOG"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let value = &v[0]["value"];
    value[0]
        .as_str()
        .map(|s| u8::from_str_radix(s.trim_start_matches("0x"), 16).unwrap())
        .unwrap_or_else(|| value[0].as_u64().unwrap() as u8)
}

/// The id of the pinned ring buffer.
fn ring_id(pin_dir: &Path) -> u64 {
    let out = std::process::Command::new("bpftool")
        .args(["-j", "map", "show", "pinned"])
        .arg(pin_dir.join("maps/AYA_LOGS"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["type"], "ringbuf", "{v}");
    v["id"].as_u64().unwrap()
}

#[test]
fn debug_log_is_per_install_forwarded_and_survives_a_restart() {
    let mut pod = Pod::new("klog");
    pod.start_upstream(8080);
    pod.start_proxy();
    let tmp = TempDir::new("klog");
    let socket = tmp.join("agent.sock");
    let start = |log: &str, extra: &[&str]| {
        Daemon::start(
            &pod.pin_dir,
            &pod.topo.cgroup.path,
            &socket,
            &tmp.join(log),
            extra,
        )
    };
    let upstream = format!("{UPSTREAM_V4}:8080");

    // Without --debug-log: the switch is off, nothing is logged.
    let d = start("plain.log", &[]);
    let ns = pod.pod_netns().display().to_string();
    let add = cni(
        &pod_vars("ADD", "ctr-1", &ns, SELECT),
        plugin_conf(&socket, json!({})).as_bytes(),
    );
    assert_eq!(add.code, 0, "{add:?}\n{}", d.log_text());
    let cookie = d.list()[0]["cookie"].as_u64().unwrap();
    assert!(pod.app_client(&upstream).ok);
    assert_eq!(switch(&pod.pin_dir), 0);
    let ring = ring_id(&pod.pin_dir);
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !d.log_text().contains("redirect::kernel"),
        "{}",
        d.log_text()
    );
    assert!(d.stop().success());

    // With it: on while the agent runs, each decision in its log with the
    // rule named, from the same pinned buffer.
    let d = start("debug.log", &["--debug-log"]);
    assert_eq!(switch(&pod.pin_dir), 1);
    assert_eq!(ring_id(&pod.pin_dir), ring, "a new buffer");
    assert!(pod.app_client(&upstream).ok);
    let want = format!("decision netns={cookie} reason=1 (OUTPUT ");
    eventually("the capture logged", || d.log_text().contains(&want));
    let line = d
        .log_text()
        .lines()
        .find(|l| l.contains(&want))
        .unwrap()
        .to_string();
    assert!(
        line.contains("DEBUG redirect::kernel:") && line.contains("-> REDIRECT)"),
        "{line}"
    );
    assert!(d.stop().success());
    // Off again after it.
    assert_eq!(switch(&pod.pin_dir), 0);

    // A restarted agent reads the same buffer.
    let d = start("debug2.log", &["--debug-log"]);
    assert_eq!(ring_id(&pod.pin_dir), ring);
    assert!(pod.app_client(&upstream).ok);
    eventually("the capture logged after a restart", || {
        d.log_text().contains(&want)
    });
    assert!(d.stop().success());
    assert_eq!(switch(&pod.pin_dir), 0);
}
