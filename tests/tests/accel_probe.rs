//! Acceleration by default: the kernel probe decides, once per install,
//! whether `attach` without `--accel`/`--no-accel` turns acceleration on;
//! the decision and its reason are visible in attach, status and stats; the
//! probe leaves nothing behind; `--accel` and `--no-accel` override it.
use redirect_tests::*;
use serde_json::Value;

/// Cgroup directories removed on drop, in order, if they still exist
/// (the test's fakes, when the probe under test did not remove them).
struct Leftover(Vec<std::path::PathBuf>);

impl Drop for Leftover {
    fn drop(&mut self) {
        for d in self.0.drain(..) {
            if d.exists() {
                drop(redirect_testbed::sandbox::CgroupGuard { path: d });
            }
        }
    }
}

/// Pids named by the fake leftovers of `the_next_probe_removes_what_a_killed_probe_left`.
static FAKE_PIDS: std::sync::Mutex<Vec<u32>> = std::sync::Mutex::new(Vec::new());

fn status(pod: &Pod) -> Value {
    let out = pod.redirect(&["status", "--json"]);
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).expect("status json")
}

fn text(out: &std::process::Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
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
    let netns_dirs = std::fs::read_dir(pod.pin_dir.join("netns"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(
        netns_dirs,
        1,
        "netns link dirs left in {}",
        pod.pin_dir.display()
    );
    let cgroup_dirs = std::fs::read_dir(pod.pin_dir.join("cgroups"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(
        cgroup_dirs,
        1,
        "cgroup link dirs left in {}",
        pod.pin_dir.display()
    );
    // A probe cgroup is named after the attach process that made it; that
    // process has exited, so any of its cgroups left would be a leftover
    // (except the fakes of the test below, pid of an exited `true`).
    let fakes = FAKE_PIDS.lock().unwrap().clone();
    let dead: Vec<String> = probe_cgroups()
        .into_iter()
        .filter(|c| {
            !fakes
                .iter()
                .any(|p| c.starts_with(&format!("redirect-accel-probe-{p}x")))
        })
        .filter(|c| {
            let pid = c
                .trim_start_matches("redirect-accel-probe-")
                .split('x')
                .next()
                .unwrap_or("")
                .to_string();
            !std::path::Path::new(&format!("/proc/{pid}")).exists()
        })
        .collect();
    assert!(dead.is_empty(), "probe cgroups left: {dead:?}");
    for m in st["map_usage"].as_array().unwrap() {
        if [
            "REDIRECT_SOCKS",
            "REDIRECT_ORIG_BY_COOKIE",
            "REDIRECT_ORIG_BY_TUPLE",
        ]
        .contains(&m["map"].as_str().unwrap())
        {
            assert_eq!(m["entries"], 0, "{m}");
        }
    }
    let stats: Value =
        serde_json::from_slice(&pod.redirect(&["stats", "--json"]).stdout).expect("stats json");
    assert_eq!(
        stats.as_array().map(|a| a.len()),
        Some(1),
        "counters of the probe's pod left: {stats}"
    );
}

/// Default attach runs the probe; the pod's acceleration is exactly the
/// probe's verdict, said once in the attach output (a refusal names the
/// failed checks and points to `status`, which has the findings), in
/// status (install and pod) and in stats; the counters agree with the
/// decision.
#[test]
fn default_attach_follows_the_kernel_probe_and_says_why() {
    let mut pod = Pod::new("apd");
    pod.start_upstream(8080);
    pod.start_proxy();
    let out = pod.attach_istio_default();
    let (stdout, stderr) = text(&out);
    let st = status(&pod);
    let probe = &st["accel_probe"];
    assert!(
        probe.is_object(),
        "no probe result after a default attach: {st}"
    );
    let passed = probe["passed"].as_bool().unwrap();
    let failed: Vec<&str> = probe["failed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    assert_eq!(passed, failed.is_empty(), "{probe}");
    let p = &st["pods"][0];
    assert_eq!(p["config"]["accel"], passed, "{p}");
    assert_eq!(p["config"]["accel_mode"], "auto", "{p}");
    let decision = p["acceleration"].as_str().unwrap();
    let line = stdout
        .lines()
        .find(|l| l.trim_start().starts_with("acceleration:"))
        .unwrap_or_else(|| panic!("no acceleration line: {stdout}"));
    assert!(
        line.contains(decision),
        "attach said {line:?}, status {decision:?}"
    );
    if passed {
        assert_eq!(decision, "on (kernel probe passed)");
    } else {
        assert!(
            decision.starts_with("off: kernel probe failed"),
            "{decision}"
        );
        for f in &failed {
            assert!(decision.contains(f), "{decision} does not name {f}");
        }
        // Said once, short, with the pointer; the findings in full are in
        // `status` (below), not repeated on stderr.
        assert!(
            decision.contains("details: `redirect status`"),
            "{decision}"
        );
    }
    assert!(
        !stderr.contains("acceleration"),
        "acceleration said again on stderr: {stderr}"
    );
    let stats = pod.redirect(&["stats"]);
    assert!(
        text(&stats)
            .0
            .contains(&format!("acceleration: {decision}")),
        "{}",
        text(&stats).0
    );
    let human = text(&pod.redirect(&["status"])).0;
    assert!(
        human.contains("acceleration kernel probe: kernel probe"),
        "{human}"
    );

    assert_ok(&pod.app_client(&format!("{UPSTREAM_V4}:8080")), "client");
    let inserted = accel_counter(&pod, "sockets_inserted").0;
    assert_eq!(
        inserted,
        if passed { 2 } else { 0 },
        "counters disagree with the decision"
    );
    assert_probe_left_nothing(&pod);
}

/// `--accel` forces it on (saying so, once, and that the cached probe
/// failed when it did), `--no-accel` forces it off without running the probe; the
/// cached probe is not re-run by later attaches.
#[test]
fn forced_modes_override_the_probe_and_are_visible() {
    let mut pod = Pod::new("apf");
    pod.start_upstream(8080);
    pod.start_proxy();
    // --no-accel: no probe at all.
    let out = pod.attach_istio_default_with(&["--no-accel"]);
    assert!(
        text(&out).0.contains("acceleration: off (--no-accel)"),
        "{out:?}"
    );
    let st = status(&pod);
    assert!(
        st["accel_probe"].is_null(),
        "--no-accel ran the probe: {st}"
    );
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
    assert_eq!(
        (
            p["config"]["accel"].as_bool(),
            p["config"]["accel_mode"].as_str()
        ),
        (Some(true), Some("forced")),
        "{p}"
    );
    let decision = p["acceleration"].as_str().unwrap();
    assert!(
        decision.starts_with("on, forced with --accel"),
        "{decision}"
    );
    assert!(stdout.contains(decision), "{stdout}");
    assert!(
        !stderr.contains("acceleration"),
        "said twice (stdout and stderr): {stderr}"
    );
    if probe["passed"] == false {
        assert!(decision.contains("kernel probe failed"), "{decision}");
        assert!(
            decision.contains("details: `redirect status`"),
            "{decision}"
        );
    }
    assert!(
        p["istio_iptables_args"]
            .as_str()
            .unwrap()
            .ends_with(" --accel"),
        "{p}"
    );
    assert_ok(&pod.app_client(&format!("{UPSTREAM_V4}:8080")), "client");
    assert_eq!(accel_counter(&pod, "sockets_inserted").0, 2);
    assert_probe_left_nothing(&pod);
}

/// A probe killed midway (its process gone) leaves a child cgroup, and,
/// when killed after capturing its namespace, a pod and links to that
/// cgroup in the install; the next probe removes all of it and says so.
#[test]
fn the_next_probe_removes_what_a_killed_probe_left() {
    let mut dead = std::process::Command::new("true").spawn().expect("true");
    let pid = dead.id();
    dead.wait().unwrap();
    FAKE_PIDS.lock().unwrap().push(pid);
    let root = redirect_userspace::sys::cgroup2_mount().unwrap();
    // Killed before capturing: only the cgroup.
    let early = root.join(format!("redirect-accel-probe-{pid}x0"));
    std::fs::create_dir(&early).expect("stale cgroup");
    let _early_guard = Leftover(vec![early.clone()]);
    // Killed after capturing: its namespace captured into this install,
    // its cgroup attached and named after the pod's cookie.
    let pod = Pod::new("aps");
    let ns = NetnsGuard::new(&redirect_testbed::sandbox::unique("rdps-")).expect("netns");
    let captured = root.join(format!("redirect-accel-probe-{pid}x1"));
    std::fs::create_dir(&captured).expect("stale cgroup");
    let out = pod.redirect(&[
        "attach",
        "--netns",
        ns.path().to_str().unwrap(),
        "--cgroup",
        captured.to_str().unwrap(),
        "-i",
        "*",
        "--no-accel",
        "--json",
    ]);
    assert!(out.status.success(), "{out:?}");
    let info: Value = serde_json::from_slice(&out.stdout).expect("attach json");
    let cookie = info["pod"]["cookie"].as_u64().unwrap();
    // The marker the probe leaves in its cgroup once it has captured.
    let marker = captured.join(format!("c{cookie}"));
    std::fs::create_dir(&marker).unwrap();
    let _captured_guard = Leftover(vec![marker.clone(), captured.clone()]);
    assert_eq!(status(&pod)["pods"].as_array().unwrap().len(), 1);

    let out = pod.attach_istio_default();
    let (_, stderr) = text(&out);
    // The captured one is this install's to clean (its links are here);
    // the early one any probe may have removed already.
    assert!(
        !captured.exists(),
        "stale probe cgroup still there: {stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "removing {} left by an acceleration probe that did not finish",
            captured.display()
        )),
        "{stderr}"
    );
    assert!(!early.exists(), "{stderr}");
    assert!(status(&pod)["accel_probe"].is_object());
    // Only the real pod and its cgroup are left in the install.
    assert_probe_left_nothing(&pod);
}
