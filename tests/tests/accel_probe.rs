//! Acceleration by default: the kernel probe decides, once per install,
//! whether `attach` without `--accel`/`--no-accel` turns acceleration on;
//! the decision and its reason are visible in attach, status and stats; the
//! probe leaves nothing behind; `--accel` and `--no-accel` override it.
use redirect_tests::*;
use serde_json::Value;

fn status(pod: &Pod) -> Value {
    let out = pod.redirect(&["status", "--json"]);
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).expect("status json")
}

fn text(out: &std::process::Output) -> (String, String) {
    (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn probe_cgroups() -> Vec<String> {
    let root = redirect_userspace::sys::cgroup2_mount().expect("cgroup2");
    std::fs::read_dir(root)
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(String::from))
        .filter(|n| n.starts_with("redirect-accel-probe-"))
        .collect()
}

/// The probe's own pod, links and cgroup are gone: one pod, one netns link
/// dir, one cgroup attached, no probe cgroup of this process left.
fn assert_probe_left_nothing(pod: &Pod) {
    let st = status(pod);
    assert_eq!(st["pods"].as_array().unwrap().len(), 1, "{st}");
    assert_eq!(st["cgroups"].as_array().unwrap().len(), 1, "{st}");
    let netns_dirs = std::fs::read_dir(pod.pin_dir.join("netns")).map(|d| d.count()).unwrap_or(0);
    assert_eq!(netns_dirs, 1, "netns link dirs left in {}", pod.pin_dir.display());
    let cgroup_dirs = std::fs::read_dir(pod.pin_dir.join("cgroups")).map(|d| d.count()).unwrap_or(0);
    assert_eq!(cgroup_dirs, 1, "cgroup link dirs left in {}", pod.pin_dir.display());
    let mine = format!("redirect-accel-probe-{}x", std::process::id());
    assert!(probe_cgroups().iter().all(|c| !c.starts_with(&mine)), "probe cgroups left: {:?}", probe_cgroups());
    for m in st["map_usage"].as_array().unwrap() {
        if ["REDIRECT_SOCKS", "REDIRECT_ORIG_BY_COOKIE", "REDIRECT_ORIG_BY_TUPLE"].contains(&m["map"].as_str().unwrap()) {
            assert_eq!(m["entries"], 0, "{m}");
        }
    }
    let stats: Value = serde_json::from_slice(&pod.redirect(&["stats", "--json"]).stdout).expect("stats json");
    assert_eq!(stats.as_array().map(|a| a.len()), Some(1), "counters of the probe's pod left: {stats}");
}

/// Default attach runs the probe; the pod's acceleration is exactly the
/// probe's verdict, said in the attach output, in status (install and pod)
/// and in stats; a refusal names the failed checks and is logged; the
/// counters agree with the decision.
#[test]
fn default_attach_follows_the_kernel_probe_and_says_why() {
    let mut pod = Pod::new("apd");
    pod.start_upstream(8080);
    pod.start_proxy();
    let out = pod.attach_istio_default();
    let (stdout, stderr) = text(&out);
    let st = status(&pod);
    let probe = &st["accel_probe"];
    assert!(probe.is_object(), "no probe result after a default attach: {st}");
    let passed = probe["passed"].as_bool().unwrap();
    let failed: Vec<&str> = probe["failed"].as_array().unwrap().iter().map(|f| f.as_str().unwrap()).collect();
    assert_eq!(passed, failed.is_empty(), "{probe}");
    let p = &st["pods"][0];
    assert_eq!(p["config"]["accel"], passed, "{p}");
    assert_eq!(p["config"]["accel_mode"], "auto", "{p}");
    let decision = p["acceleration"].as_str().unwrap();
    let line = stdout.lines().find(|l| l.trim_start().starts_with("acceleration:")).unwrap_or_else(|| panic!("no acceleration line: {stdout}"));
    assert!(line.contains(decision), "attach said {line:?}, status {decision:?}");
    if passed {
        assert_eq!(decision, "on (kernel probe passed)");
    } else {
        assert!(decision.starts_with("off: kernel probe failed"), "{decision}");
        for f in &failed {
            assert!(decision.contains(f), "{decision} does not name {f}");
        }
        assert!(stderr.contains("acceleration off: kernel probe failed"), "no log line: {stderr}");
        assert!(stderr.contains("acceleration kernel probe"), "no per-check log: {stderr}");
    }
    let stats = pod.redirect(&["stats"]);
    assert!(text(&stats).0.contains(&format!("acceleration: {decision}")), "{}", text(&stats).0);
    let human = text(&pod.redirect(&["status"])).0;
    assert!(human.contains("acceleration kernel probe: kernel probe"), "{human}");

    assert_ok(&pod.app_client(&format!("{UPSTREAM_V4}:8080")), "client");
    let inserted = accel_counter(&pod, "sockets_inserted").0;
    assert_eq!(inserted, if passed { 2 } else { 0 }, "counters disagree with the decision");
    assert_probe_left_nothing(&pod);
}

/// `--accel` forces it on (saying so, and warning when the cached probe
/// failed), `--no-accel` forces it off without running the probe; the
/// cached probe is not re-run by later attaches.
#[test]
fn forced_modes_override_the_probe_and_are_visible() {
    let mut pod = Pod::new("apf");
    pod.start_upstream(8080);
    pod.start_proxy();
    // --no-accel: no probe at all.
    let out = pod.attach_istio_default_with(&["--no-accel"]);
    assert!(text(&out).0.contains("acceleration: off (--no-accel)"), "{out:?}");
    let st = status(&pod);
    assert!(st["accel_probe"].is_null(), "--no-accel ran the probe: {st}");
    assert_eq!(st["pods"][0]["config"]["accel_mode"], "off");
    assert_ok(&pod.app_client(&format!("{UPSTREAM_V4}:8080")), "client");
    assert_eq!(accel_counter(&pod, "sockets_inserted").0, 0);

    // Default: the probe runs now; then --accel on top of it.
    pod.attach_istio_default();
    let probe = status(&pod)["accel_probe"].clone();
    assert!(probe.is_object());
    let at = probe["at"].clone();
    let out = pod.attach_istio_default_with(&["--accel"]);
    let (stdout, stderr) = text(&out);
    let st = status(&pod);
    assert_eq!(st["accel_probe"]["at"], at, "the cached probe ran again");
    let p = &st["pods"][0];
    assert_eq!((p["config"]["accel"].as_bool(), p["config"]["accel_mode"].as_str()), (Some(true), Some("forced")), "{p}");
    let decision = p["acceleration"].as_str().unwrap();
    assert!(decision.starts_with("on, forced with --accel"), "{decision}");
    assert!(stdout.contains(decision), "{stdout}");
    if probe["passed"] == false {
        assert!(decision.contains("kernel probe failed"), "{decision}");
        assert!(stderr.contains("warning: acceleration forced"), "{stderr}");
    }
    assert!(p["istio_iptables_args"].as_str().unwrap().ends_with(" --accel"), "{p}");
    assert_ok(&pod.app_client(&format!("{UPSTREAM_V4}:8080")), "client");
    assert_eq!(accel_counter(&pod, "sockets_inserted").0, 2);
    assert_probe_left_nothing(&pod);
}

/// A probe killed midway (its process gone) leaves a child cgroup; the
/// next probe removes it and says so.
#[test]
fn the_next_probe_removes_what_a_killed_probe_left() {
    let mut dead = std::process::Command::new("true").spawn().expect("true");
    let pid = dead.id();
    dead.wait().unwrap();
    let stale = redirect_userspace::sys::cgroup2_mount().unwrap().join(format!("redirect-accel-probe-{pid}x0"));
    std::fs::create_dir(&stale).expect("stale cgroup");
    // Removed even if the test fails.
    let _guard = redirect_userspace::sandbox::CgroupGuard { path: stale.clone() };
    let pod = Pod::new("aps");
    let out = pod.attach_istio_default();
    let (_, stderr) = text(&out);
    assert!(!stale.exists(), "{} still there: {stderr}", stale.display());
    assert!(stderr.contains("left by an acceleration probe that did not finish"), "{stderr}");
    assert!(status(&pod)["accel_probe"].is_object());
    assert_probe_left_nothing(&pod);
}
