//! `redirect trace` against real connections: decisions, SO_ORIGINAL_DST
//! and getpeername answers, refusals (no listener, full map), filters;
//! and its life cycle: Ctrl-C switches tracing off and leaves no pin, a
//! tracer killed with SIGKILL stops costing anything when its lease ends
//! and the next attach clears what it left, a second reader is refused
//! naming the first, and events the ring buffer cannot take are counted
//! and reported.
use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use redirect_tests::*;
use redirect_userspace::{pins::Pins, trace::switch_state};
use serde_json::Value;

fn find<'a>(lines: &'a [Value], hook: &str, rule: &str) -> Option<&'a Value> {
    lines
        .iter()
        .find(|l| l["hook"] == hook && l["rule"] == rule)
}

/// Every file under the install's pin directory.
fn pins_now(pod: &Pod) -> Vec<PathBuf> {
    fn walk(d: &std::path::Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            }
            out.push(p);
        }
    }
    let mut v = Vec::new();
    walk(&pod.pin_dir, &mut v);
    v.sort();
    v
}

#[test]
fn trace_streams_decisions_and_answers_v4_v6() {
    let mut pod = Pod::new("trv");
    pod.start_upstream(8080);
    pod.start_app_server(9080);
    pod.start_proxy();
    pod.attach_istio_default();
    let ns = pod.pod_netns();
    let t = Tracer::start_direct(&pod, &["--netns", ns.to_str().unwrap(), "--json"]);
    for (up, pod_ip) in [
        (format!("{UPSTREAM_V4}:8080"), format!("{POD_V4}:9080")),
        (format!("[{UPSTREAM_V6}]:8080"), format!("[{POD_V6}]:9080")),
    ] {
        // Outbound: the app's connect, the proxy's SO_ORIGINAL_DST, the
        // proxy's own connect upstream, the app's getpeername.
        let r = pod.app_client(&up);
        assert!(r.ok, "{r:?}");
        let lines = t.json_until(|l| {
            find(l, "connect", "captured").is_some()
                && find(l, "getsockopt", "orig_dst_outbound").is_some()
                && find(l, "connect", "skip_proxy_uid").is_some()
                && find(l, "getpeername", "getpeername_rewritten").is_some()
        });
        let c = find(&lines, "connect", "captured").unwrap_or_else(|| panic!("{lines:#?}"));
        let lo = if up.starts_with('[') {
            "[::1]:15001"
        } else {
            "127.0.0.1:15001"
        };
        assert_eq!(
            (
                c["dst"].as_str(),
                c["to"].as_str(),
                c["uid"].as_u64(),
                c["comm"].as_str(),
                c["chain"].as_str(),
                c["target"].as_str(),
                c["netns"].as_str(),
            ),
            (
                Some(up.as_str()),
                Some(lo),
                Some(APP_UID as u64),
                Some("redirect-kit"),
                Some("OUTPUT"),
                Some("REDIRECT"),
                ns.to_str()
            ),
            "{c:#}"
        );
        assert!(c["pid"].as_u64().is_some_and(|p| p > 0), "{c:#}");
        assert!(
            c["time"].as_str().is_some_and(|t| t.ends_with('Z')),
            "{c:#}"
        );
        let a = find(&lines, "getsockopt", "orig_dst_outbound").unwrap();
        assert_eq!(a["to"], up, "SO_ORIGINAL_DST answer: {a:#}");
        assert_eq!(a["uid"], PROXY_UID, "asked by the proxy: {a:#}");
        let p = find(&lines, "connect", "skip_proxy_uid").unwrap();
        assert_eq!(
            (p["dst"].as_str(), p["to"].as_str()),
            (Some(up.as_str()), None),
            "{p:#}"
        );
        assert_eq!(
            find(&lines, "getpeername", "getpeername_rewritten").unwrap()["to"],
            up
        );
        // Inbound: sk_lookup's decision, the proxy's passthrough (rule 1)
        // and its SO_ORIGINAL_DST answer.
        let r = pod.client(&pod.topo.in_upstream(), &pod_ip, None);
        assert!(r.ok, "{r:?}");
        let lines = t.json_until(|l| {
            find(l, "sk_lookup", "captured").is_some()
                && find(l, "connect", "skip_passthrough_127_0_0_6").is_some()
                && find(l, "getsockopt", "orig_dst_inbound").is_some()
        });
        let s = find(&lines, "sk_lookup", "captured").unwrap_or_else(|| panic!("{lines:#?}"));
        assert_eq!(
            (s["dst"].as_str(), s["to"].as_str(), s["chain"].as_str()),
            (Some(pod_ip.as_str()), Some(":15006"), Some("PREROUTING")),
            "{s:#}"
        );
        assert_eq!(
            find(&lines, "getsockopt", "orig_dst_inbound").unwrap()["to"],
            pod_ip
        );
    }
    let (st, err) = t.interrupt();
    assert!(st.success(), "{st} {err}");
}

#[test]
fn trace_filters_by_rule_and_destination() {
    let mut pod = Pod::new("trf");
    pod.start_upstream(8080);
    pod.start_upstream(8081);
    pod.start_proxy();
    pod.attach_istio_default();
    let ns = pod.pod_netns();
    let want = format!("{UPSTREAM_V4}:8081");
    let t = Tracer::start_direct(
        &pod,
        &[
            "--netns",
            ns.to_str().unwrap(),
            "--json",
            "--rule",
            "OUTPUT/captured",
            "--dst",
            &want,
        ],
    );
    for dst in [
        format!("{UPSTREAM_V4}:8080"),
        want.clone(),
        format!("[{UPSTREAM_V6}]:8081"),
    ] {
        assert!(pod.app_client(&dst).ok, "{dst}");
    }
    // Only the one connection that matches both, whatever else happened.
    let lines = t.json_until(|_| false);
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert_eq!(
        (lines[0]["rule"].as_str(), lines[0]["dst"].as_str()),
        (Some("captured"), Some(want.as_str()))
    );
    // A destination without a port, and a target.
    let t2_args = ["--rule", "ANSWER", "--dst", UPSTREAM_V4, "--json"];
    drop(t);
    let t = Tracer::start_direct(&pod, &t2_args);
    assert!(pod.app_client(&want).ok);
    let lines = t.json_until(|l| l.len() >= 2);
    assert!(
        lines.len() == 2
            && lines
                .iter()
                .all(|l| l["target"] == "ANSWER" && l["to"] == want.as_str()),
        "SO_ORIGINAL_DST and getpeername answers only: {lines:#?}"
    );
    // Bad filters are refused before anything starts.
    for (args, want) in [
        (&["--rule", "nope"][..], "invalid --rule value 'nope'"),
        (
            &["--dst", "10.0.0.1:x"][..],
            "invalid --dst value '10.0.0.1:x'",
        ),
        (&["--count", "0"][..], "invalid --count value '0'"),
    ] {
        let mut a = vec!["trace", "--no-agent"];
        a.extend_from_slice(args);
        let out = pod.redirect(&a);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(want),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn trace_shows_refusals_no_listener_and_full_map() {
    // No proxy: an inbound connection is refused (SK_DROP).
    let mut pod = Pod::new("trr");
    pod.start_app_server(9080);
    pod.attach_istio_default_with(&["--map-size", "orig=1"]);
    let t = Tracer::start_direct(&pod, &["--json"]);
    let dst = format!("{POD_V4}:9080");
    let r = pod.client(&pod.topo.in_upstream(), &dst, None);
    assert!(!r.ok, "{r:?}");
    let lines = t.json_until(|l| find(l, "sk_lookup", "no_listener").is_some());
    let l = find(&lines, "sk_lookup", "no_listener").unwrap_or_else(|| panic!("{lines:#?}"));
    assert_eq!(
        (l["target"].as_str(), l["dst"].as_str()),
        (Some("REJECT"), Some(dst.as_str()))
    );
    // The original-destination map holds one record (`--map-size
    // orig=1`): a captured connection held open takes it (a stand-in
    // proxy accepts on 15001), and the next connect is refused (EPERM).
    let mut lsn = Command::new(kit_bin());
    lsn.args(["echo", "--listen", "127.0.0.1:15001"]);
    let _stand_in = ChildGuard::spawn(
        "stand-in",
        lsn,
        &pod.topo.in_pod(PROXY_UID, PROXY_UID),
        true,
    )
    .expect("listener on 15001");
    let mut cmd = Command::new("/usr/bin/python3");
    cmd.args([
        "-c",
        "import socket,time\ns=socket.create_connection(('10.200.0.1',8080))\nprint('held',flush=True)\ntime.sleep(30)",
    ])
    .stdout(Stdio::piped());
    redirect_testbed::sandbox::place(&mut cmd, &pod.topo.in_pod(APP_UID, APP_UID)).unwrap();
    let mut held = cmd.spawn().expect("python3");
    let mut first = String::new();
    BufReader::new(held.stdout.as_mut().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert_eq!(first.trim(), "held");
    let r = pod.app_client(&format!("{UPSTREAM_V4}:8081"));
    assert!(!r.ok, "the second connect must be refused: {r:?}");
    let lines = t.json_until(|l| l.iter().any(|x| x["refused"] == true));
    let l = lines
        .iter()
        .find(|x| x["refused"] == true)
        .unwrap_or_else(|| panic!("{lines:#?}"));
    assert_eq!(
        (l["rule"].as_str(), l["chain"].as_str(), l["dst"].as_str()),
        (
            Some("error_orig_map_full"),
            Some("ERRORS"),
            Some(format!("{UPSTREAM_V4}:8081").as_str())
        ),
        "{l:#}"
    );
    let _ = held.kill();
    let _ = held.wait();
}

#[test]
fn ctrl_c_leaves_nothing_and_a_killed_tracer_stops_at_its_lease() {
    let mut pod = Pod::new("trl");
    pod.start_upstream(8080);
    pod.start_proxy();
    pod.attach_istio_default();
    let pins = Pins::new(&pod.pin_dir);
    let before = pins_now(&pod);
    let ns = pod.pod_netns();
    let ns = ns.to_str().unwrap();

    // Ctrl-C: tracing off, the pod set empty, not one pin more.
    let t = Tracer::start_direct(&pod, &["--netns", ns]);
    let s = switch_state(&pins).unwrap().unwrap();
    assert_eq!((s.all_pods, s.pods.len()), (false, 1), "{s:?}");
    let (st, err) = t.interrupt();
    assert!(st.success(), "{st}: {err}");
    assert!(err.contains("lines shown"), "{err}");
    let s = switch_state(&pins).unwrap().unwrap();
    assert!(!s.on && s.owner_pid == 0 && s.pods.is_empty(), "{s:?}");
    assert_eq!(pins_now(&pod), before);

    // Two readers: the second is refused, naming the first.
    let t = Tracer::start_direct(&pod, &["--json"]);
    let out = pod.redirect(&["trace", "--no-agent"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains(&format!(
                "pid {} (redirect) is already reading the trace events",
                t.pid()
            )),
        "{err}"
    );

    // SIGKILL: the lease runs out, then the programs emit nothing.
    unsafe { libc::kill(t.pid(), libc::SIGKILL) };
    drop(t);
    let s = switch_state(&pins).unwrap().unwrap();
    assert!(
        s.on,
        "the lease is still running right after the kill: {s:?}"
    );
    std::thread::sleep(redirect_userspace::trace::LEASE + Duration::from_millis(500));
    let s = switch_state(&pins).unwrap().unwrap();
    assert!(!s.on, "{s:?}");
    let lost_before = pod.counter("ERRORS", "trace_events_lost");
    assert!(pod.app_client(&format!("{UPSTREAM_V4}:8080")).ok);
    let ring =
        aya::maps::MapData::from_pin(pod.pin_dir.join("maps/REDIRECT_TRACE_EVENTS")).unwrap();
    let mut ring = aya::maps::RingBuf::try_from(aya::maps::Map::RingBuf(ring)).unwrap();
    let mut waiting = 0;
    while ring.next().is_some() {
        waiting += 1;
    }
    assert_eq!(waiting, 0, "events emitted after the lease ended");
    assert_eq!(pod.counter("ERRORS", "trace_events_lost"), lost_before);
    // What it left (owner, until) is cleared by the next attach.
    assert_ne!(switch_state(&pins).unwrap().unwrap().owner_pid, 0);
    pod.attach_istio_default();
    let s = switch_state(&pins).unwrap().unwrap();
    assert!(s.owner_pid == 0 && s.pods.is_empty(), "{s:?}");
    // And a new reader can start at once (the lock went with the process).
    let t = Tracer::start_direct(&pod, &["--json"]);
    assert!(pod.app_client(&format!("{UPSTREAM_V4}:8080")).ok);
    assert!(!t.json_until(|l| !l.is_empty()).is_empty());
    drop(t);
}

#[test]
fn events_the_ring_buffer_cannot_take_are_counted_and_reported() {
    // Nothing listens on the outbound port: every connect is decided
    // (an event), redirected and refused at once, so a stopped reader's
    // ring fills fast.
    let pod = Pod::new("trfull");
    pod.attach_istio_default();
    let t = Tracer::start_direct(&pod, &["--json"]);
    unsafe { libc::kill(t.pid(), libc::SIGSTOP) };
    let n = 6000;
    let mut cmd = Command::new("/usr/bin/python3");
    cmd.args([
        "-c",
        &format!(
            "import socket\nfor i in range({n}):\n    s=socket.socket()\n    s.connect_ex(('10.200.0.1', 8080))\n    s.close()"
        ),
    ]);
    redirect_testbed::sandbox::place(&mut cmd, &pod.topo.in_pod(APP_UID, APP_UID)).unwrap();
    assert!(cmd.status().unwrap().success());
    unsafe { libc::kill(t.pid(), libc::SIGCONT) };
    let lost_counter = pod.counter("ERRORS", "trace_events_lost");
    assert!(
        lost_counter > 0,
        "the ring buffer holds ~2,000 events, {n} came"
    );
    // The reader shows what it got and reports the rest as lost.
    let lines = t.json_until(|l| l.iter().any(|x| x["event"] == "lost"));
    let lost: u64 = lines
        .iter()
        .filter(|l| l["event"] == "lost")
        .map(|l| l["lost"].as_u64().unwrap())
        .sum();
    let shown = lines.iter().filter(|l| l["event"] == "decision").count() as u64;
    assert_eq!(lost, lost_counter, "lost lines");
    assert!(
        shown > 0 && shown + lost >= n,
        "{shown} shown + {lost} lost of {n}"
    );
    let (st, _) = t.interrupt();
    assert!(st.success());
}

#[test]
fn trace_refuses_what_it_cannot_trace() {
    let pod = Pod::new("trbad");
    // Nothing installed.
    let out = pod.redirect(&["trace", "--no-agent"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("nothing is installed"),
        "{err}"
    );
    pod.attach_istio_default();
    let other = NetnsGuard::new(&redirect_testbed::sandbox::unique("rdx-tro-")).unwrap();
    let out = pod.redirect(&[
        "trace",
        "--no-agent",
        "--netns",
        other.path().to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("is not captured"),
        "{err}"
    );
    // The kernel check itself: ring buffers exist here; an unknown map type
    // is what a kernel without them says (EINVAL).
    assert!(redirect_userspace::trace::check_ring_buffers().is_ok());
    assert!(redirect_userspace::trace::map_type_supported(9999, 4096).is_err());
}
