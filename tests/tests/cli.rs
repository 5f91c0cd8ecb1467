//! The `redirect` CLI as a user runs it: bad input refused before anything
//! is touched, dry runs, status/stats views, detach, re-attach, uninstall,
//! counters across CLI runs, two pods sharing one cgroup attachment.
//!
//! Every test has its own pod netns, upstream netns, cgroup and pin dir
//! (see `redirect_tests::Pod`); all traffic stays inside namespaces the
//! test created.
use std::{
    os::{fd::FromRawFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
};

use redirect_testbed::{
    kit::ClientReport,
    sandbox::{place, unique},
};
use redirect_tests::*;
use serde_json::Value;

/// A finished CLI run, decoded.
#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn of(o: Output) -> Run {
        Run {
            code: o.status.code(),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }

    fn ok(self, what: &str) -> Run {
        assert_eq!(self.code, Some(0), "{what} should succeed: {self:#?}");
        self
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {self:#?}"))
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn redirect(pod: &Pod, args: &[&str]) -> Run {
    Run::of(pod.redirect(args))
}

/// `redirect --pin-dir <pod's> <args>` started with a placement (uid, ...).
fn redirect_as(pod: &Pod, p: &Placement, args: &[&str]) -> Run {
    let mut cmd = Command::new(redirect_bin());
    cmd.arg("--pin-dir").arg(&pod.pin_dir).args(args);
    place(&mut cmd, p).expect("placing redirect");
    Run::of(cmd.output().expect("running redirect"))
}

/// How many programs each attached cgroup has on this kernel (one more
/// where the netns cookie comes from socket storage: `redirect status`'s
/// `kernel.cgroup_programs`).
fn cgroup_program_count(pod: &Pod) -> usize {
    let st = redirect(pod, &["status", "--json"]).ok("status").json();
    st["kernel"]["cgroup_programs"]
        .as_array()
        .unwrap_or_else(|| panic!("status has no kernel.cgroup_programs: {st:#}"))
        .len()
}

fn ino(p: &Path) -> u64 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("stat {}: {e}", p.display()))
        .ino()
}

/// `bpftool -j link show` entries on this cgroup or this netns.
fn links_on(cgroup: &Path, netns: &Path) -> Vec<Value> {
    let (cg, ns) = (ino(cgroup), ino(netns));
    let out = run("bpftool", &["-j", "link", "show"]).expect("bpftool link show");
    let all: Vec<Value> = serde_json::from_str(&out).expect("bpftool json");
    all.into_iter()
        .filter(|l| l["cgroup_id"].as_u64() == Some(cg) || l["netns_ino"].as_u64() == Some(ns))
        .collect()
}

fn sk_lookup_links(netns: &Path) -> usize {
    let ns = ino(netns);
    let out = run("bpftool", &["-j", "link", "show"]).expect("bpftool link show");
    let all: Vec<Value> = serde_json::from_str(&out).expect("bpftool json");
    all.iter()
        .filter(|l| l["attach_type"] == "sk_lookup" && l["netns_ino"].as_u64() == Some(ns))
        .count()
}

/// Programs attached to the cgroup: `<attach type> <program id>`.
fn cgroup_programs(cgroup: &Path) -> Vec<String> {
    cgroup_attached(cgroup)
        .into_iter()
        .map(|(t, id)| format!("{t} {id}"))
        .collect()
}

/// Nothing of ours exists: no pin dir, no program on the test cgroup, no
/// link on the test cgroup or the pod netns.
fn assert_untouched(pod: &Pod, what: &str) {
    assert!(
        !pod.pin_dir.exists(),
        "{what}: pin dir {} was created",
        pod.pin_dir.display()
    );
    let progs = cgroup_programs(&pod.topo.cgroup.path);
    assert!(
        progs.is_empty(),
        "{what}: programs attached to the test cgroup: {progs:?}"
    );
    let links = links_on(&pod.topo.cgroup.path, &pod.pod_netns());
    assert!(
        links.is_empty(),
        "{what}: links on the test cgroup/netns: {links:?}"
    );
}

fn cg(pod: &Pod) -> PathBuf {
    pod.topo.cgroup.path.clone()
}

const ISTIO: [&str; 16] = redirect_tests::ISTIO_INJECTED;

fn v4_dst() -> String {
    format!("{UPSTREAM_V4}:8080")
}
fn v6_dst() -> String {
    format!("[{UPSTREAM_V6}]:8080")
}

/// Went through the proxy: getpeername shows the original destination,
/// the app's socket has the pod's source address (as under iptables), and
/// the server saw another socket (the proxy's), not the app's.
fn assert_captured(r: &ClientReport, dst: &str, what: &str) {
    assert_ok(r, what);
    assert_eq!(
        r.peer.as_deref(),
        Some(dst),
        "{what}: getpeername must show the original destination"
    );
    let local = r.local.clone().unwrap_or_default();
    assert!(
        !local.starts_with("127.") && !local.starts_with("[::1]"),
        "{what}: the app's source must be the pod's address: {r:?}"
    );
    assert_ne!(
        r.banner.as_deref(),
        Some(format!("peer={local} local={dst}").as_str()),
        "{what}: the server saw the app's own socket (not captured): {r:?}"
    );
}

/// Went direct: the socket leaves from the pod's own address, getpeername
/// is the real server, and the server saw exactly this socket.
fn assert_direct(r: &ClientReport, dst: &str, what: &str) {
    assert_ok(r, what);
    assert_eq!(
        r.peer.as_deref(),
        Some(dst),
        "{what}: getpeername must be the real server"
    );
    let local = r.local.clone().unwrap_or_default();
    assert!(
        !local.starts_with("127.") && !local.starts_with("[::1]"),
        "{what}: connection still captured: {r:?}"
    );
    assert_eq!(
        r.banner.as_deref(),
        Some(format!("peer={local} local={dst}").as_str()),
        "{what}: the server must see the app's own socket: {r:?}"
    );
}

fn proxy_conns(pod: &mut Pod, idx: usize) -> Vec<String> {
    pod.proxy_log(idx)
        .iter()
        .filter(|l| l["event"] == "conn")
        .map(|l| l["orig"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// Count of one rule in one pod's entry of `stats --json`.
fn rule_count(pod_stats: &Value, chain: &str, rule: &str) -> u64 {
    stats_rule(pod_stats, chain, rule)["count"]
        .as_u64()
        .expect("count")
}

// ---------------------------------------------------------------- bad input

#[test]
fn bad_input_is_refused_by_name_and_touches_nothing() {
    let pod = Pod::new("clibad");
    let ns = pod.pod_netns();
    let cgp = cg(&pod);
    // (args after `attach`, what the message must contain)
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (vec!["--bogus-flag"], vec!["--bogus-flag", "--help"]),
        (vec!["-p", "0"], vec!["-p/--envoy-port", "'0'", "1-65535"]),
        (
            vec!["-p", "70000"],
            vec!["-p/--envoy-port", "70000", "1-65535"],
        ),
        (
            vec!["-z", "abc"],
            vec!["-z/--inbound-capture-port", "abc", "1-65535"],
        ),
        (
            vec!["-i", "10.0.0.300/33"],
            vec![
                "-i/--istio-service-cidr",
                "10.0.0.300/33",
                "not an IPv4 or IPv6 address",
            ],
        ),
        (
            vec!["-i", "10.0.0.0/33"],
            vec!["-i/--istio-service-cidr", "10.0.0.0/33", "0..=32"],
        ),
        (
            vec!["-x", "*"],
            vec![
                "-x/--istio-service-exclude-cidr",
                "'*'",
                "only accepted by -i",
            ],
        ),
        (
            vec!["-m", "TPROXY"],
            vec![
                "-m/--istio-inbound-interception-mode",
                "TPROXY",
                "not supported",
                "-m REDIRECT",
            ],
        ),
        (
            vec!["-u", "root"],
            vec!["-u/--proxy-uid", "root", "numeric"],
        ),
    ];
    let mut failures = Vec::new();
    let mut check = |args: Vec<&str>, want: Vec<&str>| {
        let r = redirect(&pod, &args);
        let what = format!("redirect {}", args.join(" "));
        if r.code == Some(0) || r.code.is_none() {
            failures.push(format!("{what}: exit {:?}, want non-zero: {r:?}", r.code));
        }
        if r.stderr.contains("panicked") {
            failures.push(format!("{what}: panicked: {}", r.stderr));
        }
        for w in &want {
            if !r.stderr.contains(w) {
                failures.push(format!("{what}: message lacks {w:?}: {}", r.stderr.trim()));
            }
        }
        if !r.stdout.trim().is_empty() {
            failures.push(format!("{what}: printed on stdout: {}", r.stdout.trim()));
        }
        assert_untouched(&pod, &what);
    };
    for (flags, want) in cases {
        let mut args = vec!["attach", "--netns", s(&ns), "--cgroup", s(&cgp)];
        args.extend(flags);
        check(args, want);
    }
    let not_netns = "is not a network namespace";
    check(
        vec!["attach", "--netns", "/tmp", "--cgroup", s(&cgp), "-i", "*"],
        vec![
            "'/tmp'",
            not_netns,
            "not a namespace file",
            "/var/run/netns/",
        ],
    );
    check(
        vec![
            "attach",
            "--netns",
            "/nonexistent",
            "--cgroup",
            s(&cgp),
            "-i",
            "*",
        ],
        vec!["'/nonexistent'", not_netns, "No such file"],
    );
    check(
        vec![
            "attach",
            "--netns",
            "/proc/self/ns/uts",
            "--cgroup",
            s(&cgp),
            "-i",
            "*",
        ],
        vec![
            "'/proc/self/ns/uts'",
            "a namespace, but not a network namespace",
        ],
    );
    check(
        vec!["attach", "--netns", s(&ns), "--cgroup", "/tmp", "-i", "*"],
        vec![
            "'/tmp'",
            "is not a cgroup2 directory",
            "cgroup2 is mounted at",
        ],
    );
    // A subcommand that does not exist, and attach without --netns.
    check(vec!["atach", "--netns", s(&ns)], vec!["atach"]);
    check(vec!["attach", "-i", "*"], vec!["--netns"]);
    assert!(
        failures.is_empty(),
        "{} problems:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn non_root_attach_detach_uninstall_get_privilege_error_and_touch_nothing() {
    let pod = Pod::new("clinr");
    let ns = pod.pod_netns();
    let cgp = cg(&pod);
    let user = Placement {
        uid: Some(APP_UID),
        gid: Some(APP_UID),
        ..Placement::default()
    };
    let mut istio = vec!["attach", "--netns", s(&ns), "--cgroup", s(&cgp)];
    istio.extend(ISTIO);
    for args in [istio, vec!["detach", "--netns", s(&ns)], vec!["uninstall"]] {
        let r = redirect_as(&pod, &user, &args);
        let what = format!("uid {APP_UID}: redirect {}", args.join(" "));
        assert_eq!(r.code, Some(1), "{what}: {r:#?}");
        assert!(
            r.stderr.contains("missing privilege"),
            "{what}: want a privilege error: {}",
            r.stderr
        );
        assert!(
            r.stderr.contains("run redirect as root"),
            "{what}: want the fix: {}",
            r.stderr
        );
        assert_untouched(&pod, &what);
    }
}

/// With something installed, a non-root `status`/`stats` must say it
/// lacks privileges, not that nothing is installed.
#[test]
fn non_root_status_and_stats_report_privilege_not_absence() {
    let pod = Pod::new("clinrs");
    pod.attach_istio_default();
    let user = Placement {
        uid: Some(APP_UID),
        gid: Some(APP_UID),
        ..Placement::default()
    };
    let ns = pod.pod_netns();
    let mut problems = Vec::new();
    for args in [
        vec!["status"],
        vec!["status", "--json"],
        vec!["stats"],
        vec!["stats", "--netns", s(&ns)],
    ] {
        let r = redirect_as(&pod, &user, &args);
        let what = format!("uid {APP_UID}: redirect {}", args.join(" "));
        if r.code != Some(1)
            || !r.stderr.contains("privilege")
            || r.stderr.contains("nothing is installed")
        {
            problems.push(format!(
                "{what}: exit {:?}, stderr: {}",
                r.code,
                r.stderr.trim()
            ));
        }
    }
    // Still installed and captured: the refused calls changed nothing.
    let st = redirect(&pod, &["status", "--json"]).ok("status").json();
    assert_eq!(st["pods"].as_array().map(Vec::len), Some(1));
    assert!(
        problems.is_empty(),
        "misleading answers for an unprivileged user:\n{}",
        problems.join("\n")
    );
}

/// An OS error is stated once: `<what> '<path>': <cause>`, not
/// `<cause>: <cause>` (the library error already embeds its source and
/// the CLI prints the chain again).
#[test]
fn error_messages_state_the_cause_once() {
    let pod = Pod::new("clidup");
    pod.attach_istio_default();
    let ns = pod.pod_netns();
    let cgp = cg(&pod);
    // A pin dir below a pinned map: mkdir fails with ENOTDIR.
    let bad_pin = pod.pin_dir.join("maps").join("REDIRECT_PODS").join("x");
    let o = Command::new(redirect_bin())
        .arg("--pin-dir")
        .arg(&bad_pin)
        .args([
            "attach",
            "--netns",
            s(&ns),
            "--cgroup",
            s(&cgp),
            "-i",
            "*",
            "-b",
            "*",
        ])
        .output()
        .unwrap();
    let r = Run::of(o);
    assert_eq!(r.code, Some(1), "{r:#?}");
    let cause = "Not a directory (os error 20)";
    assert!(
        r.stderr.contains(s(&bad_pin)) && r.stderr.contains(cause),
        "{r:#?}"
    );
    assert_eq!(
        r.stderr.matches(cause).count(),
        1,
        "cause repeated: {}",
        r.stderr.trim()
    );
}

// ---------------------------------------------------------------- dry run

#[test]
fn dry_run_prints_config_and_istio_equivalent_and_touches_nothing() {
    let pod = Pod::new("clidry");
    let ns = pod.pod_netns();
    let cgp = cg(&pod);
    for dry in ["-n", "--dry-run"] {
        let mut args = vec!["attach", dry, "--netns", s(&ns), "--cgroup", s(&cgp)];
        args.extend(ISTIO);
        let r = redirect(&pod, &args).ok("dry run");
        assert!(r.stdout.contains("dry run"), "{r:#?}");
        assert!(
            r.stdout.contains("istio-iptables -p 15001 -z 15006 -e 15008 -u '1337' -g '1337' -m REDIRECT -i '*' -x '' -q '' -o '' -b '*' -d '15020,15021,15090'"),
            "dry run must print the istio-iptables equivalent: {}",
            r.stdout
        );
        assert!(
            r.stdout.contains("\"proxy_port\": 15001")
                && r.stdout.contains("\"inbound_port\": 15006"),
            "dry run must print the config: {}",
            r.stdout
        );
        assert!(
            r.stdout.contains(s(&ns)) && r.stdout.contains(s(&cgp)),
            "dry run must say what it would capture where: {}",
            r.stdout
        );
        assert_untouched(&pod, &format!("attach {dry}"));
    }
    // JSON form.
    let mut args = vec![
        "attach",
        "-n",
        "--json",
        "--netns",
        s(&ns),
        "--cgroup",
        s(&cgp),
    ];
    args.extend(ISTIO);
    let j = redirect(&pod, &args).ok("dry run --json").json();
    assert_eq!(j["dry_run"], true, "{j}");
    assert_eq!(j["config"]["proxy_port"], 15001, "{j}");
    assert_eq!(
        j["config"]["exclude_inbound_ports"],
        serde_json::json!([15020, 15021, 15090]),
        "{j}"
    );
    assert_untouched(&pod, "attach -n --json");
    // A dry run still validates.
    let r = redirect(
        &pod,
        &[
            "attach",
            "-n",
            "--netns",
            s(&ns),
            "--cgroup",
            s(&cgp),
            "-p",
            "0",
        ],
    );
    assert_eq!(r.code, Some(1), "{r:#?}");
    assert!(r.stderr.contains("-p/--envoy-port"), "{r:#?}");
    assert_untouched(&pod, "attach -n -p 0");

    // Over an existing install, a dry run changes nothing either.
    pod.attach_istio_default();
    let before = redirect(&pod, &["status", "--json"]).ok("status").json();
    let mut args = vec![
        "attach",
        "-n",
        "--netns",
        s(&ns),
        "--cgroup",
        s(&cgp),
        "-x",
        "10.200.0.1/32",
    ];
    args.extend(&ISTIO[..10]);
    redirect(&pod, &args).ok("dry run over install");
    let after = redirect(&pod, &["status", "--json"]).ok("status").json();
    assert_eq!(
        before["pods"], after["pods"],
        "a dry run changed the installed config"
    );
}

// ------------------------------------------------------------ status, stats

#[test]
fn status_and_stats_list_the_captured_pod() {
    let mut pod = Pod::new("clist");
    pod.start_upstream(8080);
    pod.start_proxy();
    let ns = pod.pod_netns();
    let cgp = cg(&pod);
    pod.attach_istio_default();
    assert_captured(&pod.app_client(&v4_dst()), &v4_dst(), "v4");

    // Text.
    let t = redirect(&pod, &["status"]).ok("status");
    for want in [
        s(&ns),
        s(&cgp),
        "captured pods: 1",
        "istio-iptables -p 15001 -z 15006 -e 15008 -u '1337' -g '1337' -m REDIRECT -i '*' -x '' -q '' -o '' -b '*' -d '",
        POD_V4,
        POD_V6,
        "sk_lookup attached",
        "IPv6: captured (--dual-stack, the pod has an IPv6 address)",
    ] {
        assert!(t.stdout.contains(want), "status lacks {want:?}:\n{}", t.stdout);
    }
    // -d ports in any order (the kernel map does not keep the flag's order).
    let d = t
        .stdout
        .split("-d '")
        .nth(1)
        .and_then(|r| r.split('\'').next())
        .unwrap_or_default();
    let mut d: Vec<&str> = d.split(',').collect();
    d.sort();
    assert_eq!(
        d,
        vec!["15020", "15021", "15090"],
        "status -d:\n{}",
        t.stdout
    );

    // JSON.
    let st = redirect(&pod, &["status", "--json"])
        .ok("status --json")
        .json();
    assert_eq!(st["pin_dir"], s(&pod.pin_dir), "{st:#}");
    assert!(
        st["cgroups"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c == s(&cgp)),
        "cgroup missing: {st:#}"
    );
    let pods = st["pods"].as_array().expect("pods");
    assert_eq!(pods.len(), 1, "{st:#}");
    let p = &pods[0];
    assert_eq!(p["netns"], s(&ns), "{p:#}");
    assert_eq!(p["netns_inode"].as_u64(), Some(ino(&ns)), "{p:#}");
    let c = &p["config"];
    assert_eq!(c["proxy_port"], 15001);
    assert_eq!(c["inbound_port"], 15006);
    assert_eq!(c["tunnel_port"], 15008);
    assert_eq!(c["proxy_uids"], serde_json::json!([1337]));
    assert_eq!(c["proxy_gids"], serde_json::json!([1337]));
    assert_eq!(c["include_all_outbound"], true);
    assert_eq!(c["inbound_ports"], "all");
    let mut ex: Vec<u64> = c["exclude_inbound_ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    ex.sort();
    assert_eq!(ex, vec![15020, 15021, 15090], "{c:#}");
    let addrs: Vec<&str> = p["pod_addresses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert!(
        addrs.contains(&POD_V4) && addrs.contains(&POD_V6),
        "pod addresses {addrs:?}"
    );
    assert_eq!(p["inbound_attached"], true);
    let cookie = p["netns_cookie"].as_u64().expect("cookie");

    // stats --json: one entry per pod, iptables-like rows, stable order.
    let stats = redirect(&pod, &["stats", "--json"])
        .ok("stats --json")
        .json();
    let arr = stats.as_array().expect("array of pods");
    assert_eq!(arr.len(), 1, "{stats:#}");
    let ps = &arr[0];
    assert_eq!(ps["netns_cookie"].as_u64(), Some(cookie));
    assert_eq!(ps["netns"], s(&ns));
    let rules = ps["rules"].as_array().expect("rules");
    let mut chains: Vec<&str> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for r in rules {
        for (k, is) in [
            ("chain", r["chain"].is_string()),
            ("rule", r["rule"].is_string()),
            ("target", r["target"].is_string()),
            ("description", r["description"].is_string()),
            ("count", r["count"].is_u64()),
            ("bytes", r["bytes"].is_u64()),
        ] {
            assert!(is, "rule field {k} missing or mistyped: {r}");
        }
        let ch = r["chain"].as_str().unwrap();
        if chains.last() != Some(&ch) {
            assert!(!chains.contains(&ch), "chain {ch} rows are not contiguous");
            chains.push(ch);
        }
        assert!(
            seen.insert((ch.to_string(), r["rule"].as_str().unwrap().to_string())),
            "duplicate row {r}"
        );
    }
    assert_eq!(
        chains,
        vec![
            "OUTPUT",
            "PREROUTING",
            "VM",
            "DNS",
            "ORIGINAL_DST",
            "ACCEL",
            "ERRORS"
        ]
    );
    for rule in [
        "captured",
        "captured_include_port",
        "skip_excluded_port",
        "skip_excluded_cidr",
        "skip_proxy_uid",
        "skip_proxy_gid",
        "skip_loopback",
        "skip_not_included",
    ] {
        rule_count(ps, "OUTPUT", rule);
    }
    assert_eq!(rule_count(ps, "OUTPUT", "captured"), 1);
    assert_eq!(rule_count(ps, "ORIGINAL_DST", "orig_dst_outbound"), 1);
    // The same through --netns.
    let only = redirect(&pod, &["stats", "--json", "--netns", s(&ns)])
        .ok("stats --netns")
        .json();
    assert_eq!(only, stats);
    // Text form, laid out like iptables -L -v.
    let text = redirect(&pod, &["stats"]).ok("stats");
    assert!(
        text.stdout.contains("Chain OUTPUT") && text.stdout.contains("Chain PREROUTING"),
        "{}",
        text.stdout
    );

    // An uncaptured netns: clear error naming it.
    let up = pod.topo.upstream.path();
    let r = redirect(&pod, &["stats", "--netns", s(&up)]);
    assert_eq!(r.code, Some(1), "{r:#?}");
    assert!(
        r.stderr.contains(s(&up)) && r.stderr.contains("not captured"),
        "{r:#?}"
    );
    assert!(r.stdout.is_empty(), "{r:#?}");
    // Not a netns at all.
    let r = redirect(&pod, &["stats", "--netns", "/tmp"]);
    assert_eq!(r.code, Some(1), "{r:#?}");
    assert!(r.stderr.contains("not a network namespace"), "{r:#?}");
    // Nothing installed under that pin dir.
    let empty = PathBuf::from(format!("/sys/fs/bpf/{}", unique("rdt-none-")));
    for args in [
        vec!["stats"],
        vec!["stats", "--netns", s(&ns)],
        vec!["status"],
    ] {
        let o = Command::new(redirect_bin())
            .arg("--pin-dir")
            .arg(&empty)
            .args(&args)
            .output()
            .unwrap();
        let r = Run::of(o);
        assert_eq!(r.code, Some(1), "{args:?}: {r:#?}");
        assert!(
            r.stderr.contains("nothing is installed") && r.stderr.contains("redirect attach"),
            "{args:?}: {r:#?}"
        );
        assert!(!empty.exists(), "{args:?} created {}", empty.display());
    }
}

/// The proxy listening on 15006 is registered for inbound steering (the
/// traffic proves it); `status` must say so, as text and JSON.
#[test]
fn status_shows_the_registered_inbound_listener() {
    let mut pod = Pod::new("clilst");
    pod.start_app_server(9080);
    let proxy = pod.start_proxy();
    let out = Run::of(pod.attach_istio_default());
    assert!(
        out.stdout.contains("proxy listener found"),
        "attach should find the running proxy: {out:#?}"
    );
    // Inbound really goes through the proxy: the app sees 127.0.0.6.
    let dst = format!("{POD_V4}:9080");
    let r = pod.client(&pod.topo.in_upstream(), &dst, None);
    assert_ok(&r, "inbound");
    assert!(
        r.banner
            .as_deref()
            .unwrap_or_default()
            .starts_with("peer=127.0.0.6:"),
        "inbound not via the proxy: {r:?}"
    );
    assert!(
        pod.proxy_log(proxy).iter().any(|l| l["dir"] == "inbound"),
        "proxy saw no inbound connection"
    );
    let st = redirect(&pod, &["status", "--json"])
        .ok("status --json")
        .json();
    let fams = &st["pods"][0]["inbound_listeners"];
    let text = redirect(&pod, &["status"]).ok("status").stdout;
    assert!(
        fams.as_array().is_some_and(|a| a.iter().any(|f| f == "ipv4") && a.iter().any(|f| f == "ipv6")),
        "status --json inbound_listeners = {fams} although the proxy's listeners are registered and inbound traffic reaches it; text: {text}"
    );
    assert!(!text.contains("none yet"), "status text: {text}");
}

/// `redirect stats | head -1` (the reader goes away early) must not
/// crash with a Rust panic and backtrace.
#[test]
fn output_to_a_closed_pipe_does_not_panic() {
    let pod = Pod::new("clipipe");
    pod.attach_istio_default();
    for args in [
        vec!["stats"],
        vec!["stats", "--json"],
        vec!["status", "--json"],
    ] {
        let mut fds = [0; 2];
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        unsafe { libc::close(fds[0]) };
        let w = unsafe { std::fs::File::from_raw_fd(fds[1]) };
        let o = Command::new(redirect_bin())
            .arg("--pin-dir")
            .arg(&pod.pin_dir)
            .args(&args)
            .stdout(Stdio::from(w))
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !err.contains("panicked"),
            "redirect {args:?} into a closed pipe panicked (status {:?}):\n{err}",
            o.status
        );
    }
}

// ------------------------------------------------------------------ detach

#[test]
fn detach_restores_direct_connections_and_twice_is_an_error() {
    let mut pod = Pod::new("clidet");
    pod.start_upstream(8080);
    let proxy = pod.start_proxy();
    let ns = pod.pod_netns();
    pod.attach_istio_default();
    for dst in [v4_dst(), v6_dst()] {
        assert_captured(&pod.app_client(&dst), &dst, "before detach");
    }
    assert_eq!(proxy_conns(&mut pod, proxy).len(), 2);
    let cookie = pod.stats()[0]["netns_cookie"].as_u64().unwrap();
    assert_eq!(sk_lookup_links(&ns), 1);

    let r = redirect(&pod, &["detach", "--netns", s(&ns)]).ok("detach");
    assert!(r.stdout.contains("released"), "{r:#?}");

    for dst in [v4_dst(), v6_dst()] {
        assert_direct(&pod.app_client(&dst), &dst, &format!("after detach {dst}"));
    }
    assert_eq!(
        proxy_conns(&mut pod, proxy),
        Vec::<String>::new(),
        "the proxy saw connections after detach"
    );
    // The pod and its counters are gone.
    let r = redirect(&pod, &["stats", "--netns", s(&ns)]);
    assert_eq!(r.code, Some(1), "stats of a detached pod: {r:#?}");
    assert!(r.stderr.contains("not captured"), "{r:#?}");
    let all = redirect(&pod, &["stats", "--json"]).ok("stats").json();
    assert!(
        !all.as_array()
            .unwrap()
            .iter()
            .any(|p| p["netns_cookie"].as_u64() == Some(cookie)),
        "{all:#}"
    );
    let st = redirect(&pod, &["status", "--json"]).ok("status").json();
    assert_eq!(st["pods"].as_array().map(Vec::len), Some(0), "{st:#}");
    assert_eq!(
        sk_lookup_links(&ns),
        0,
        "the pod's sk_lookup link must go with detach"
    );

    // Twice: a clear error naming the netns.
    let r = redirect(&pod, &["detach", "--netns", s(&ns)]);
    assert_eq!(r.code, Some(1), "second detach: {r:#?}");
    assert!(
        r.stderr.contains(s(&ns))
            && r.stderr.contains("not captured")
            && r.stderr.contains("redirect status"),
        "{r:#?}"
    );
    // By cookie too.
    let r = redirect(&pod, &["detach", "--cookie", &cookie.to_string()]);
    assert_eq!(r.code, Some(1), "detach --cookie of a released pod: {r:#?}");
    assert!(r.stderr.contains("not captured"), "{r:#?}");

    // Captured again, counting from zero (old counters were dropped).
    pod.attach_istio_default();
    let fresh = pod.stats();
    let nonzero: Vec<_> = fresh[0]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["count"].as_u64() != Some(0))
        .collect();
    assert!(
        nonzero.is_empty(),
        "re-attached pod starts with old counters: {nonzero:?}"
    );
    assert_captured(&pod.app_client(&v4_dst()), &v4_dst(), "re-attached");
    assert_eq!(pod.counter("OUTPUT", "captured"), 1);
}

// --------------------------------------------------------------- re-attach

#[test]
fn reattach_with_other_flags_replaces_the_config() {
    let mut pod = Pod::new("clire");
    pod.start_upstream(8080);
    let proxy = pod.start_proxy();
    let ns = pod.pod_netns();
    pod.attach_istio_default();
    assert_captured(&pod.app_client(&v4_dst()), &v4_dst(), "default");
    assert_eq!(proxy_conns(&mut pod, proxy), vec![v4_dst()]);

    // Exclude the upstream's IPv4 address: v4 direct, v6 still captured.
    let mut flags = ISTIO.to_vec();
    flags[11] = "10.200.0.1/32";
    let r = Run::of(pod.attach(&flags));
    assert!(
        r.stdout.contains("already attached"),
        "re-attach must reuse the cgroup attachment: {r:#?}"
    );
    assert!(r.stdout.contains("-x '10.200.0.1/32'"), "{r:#?}");
    assert_direct(&pod.app_client(&v4_dst()), &v4_dst(), "with -x upstream/32");
    assert_captured(&pod.app_client(&v6_dst()), &v6_dst(), "v6 with -x v4/32");
    assert_eq!(proxy_conns(&mut pod, proxy), vec![v6_dst()]);
    assert_eq!(pod.counter("OUTPUT", "skip_excluded_cidr"), 1);
    let st = redirect(&pod, &["status", "--json"]).ok("status").json();
    assert_eq!(
        st["pods"].as_array().unwrap().len(),
        1,
        "re-attach must not add a second pod: {st:#}"
    );
    let ex = &st["pods"][0]["config"]["exclude_cidrs"];
    assert_eq!(ex.as_array().map(Vec::len), Some(1), "{ex}");
    assert!(ex.to_string().contains("10.200.0.1"), "{ex}");
    assert_eq!(sk_lookup_links(&ns), 1, "one inbound link per pod");
    assert_eq!(
        cgroup_programs(&pod.topo.cgroup.path).len(),
        cgroup_program_count(&pod),
        "one set of cgroup programs"
    );

    // Back to the defaults: the exclusion is gone, not left behind.
    pod.attach_istio_default();
    assert_captured(&pod.app_client(&v4_dst()), &v4_dst(), "exclusion removed");
    assert_eq!(proxy_conns(&mut pod, proxy), vec![v4_dst()]);
    let st = redirect(&pod, &["status", "--json"]).ok("status").json();
    assert_eq!(
        st["pods"][0]["config"]["exclude_cidrs"],
        serde_json::json!([]),
        "{st:#}"
    );

    // Only the listed CIDR captured (-i upstream/32 -x ""), then another.
    let mut flags = ISTIO.to_vec();
    flags[9] = "10.200.0.0/24";
    pod.attach(&flags);
    assert_captured(&pod.app_client(&v4_dst()), &v4_dst(), "-i 10.200.0.0/24");
    assert_direct(&pod.app_client(&v6_dst()), &v6_dst(), "v6 not in -i");
    assert_eq!(proxy_conns(&mut pod, proxy), vec![v4_dst()]);
}

// --------------------------------------------------------------- uninstall

#[test]
fn uninstall_leaves_nothing_and_connections_go_direct() {
    let mut pod = Pod::new("cliun");
    pod.start_upstream(8080);
    let proxy = pod.start_proxy();
    let ns = pod.pod_netns();
    let cgp = cg(&pod);
    assert_eq!(sk_lookup_links(&ns), 0);
    assert!(links_on(&cgp, &ns).is_empty());
    pod.attach_istio_default();
    assert_eq!(
        cgroup_programs(&cgp).len(),
        cgroup_program_count(&pod),
        "{:?}",
        cgroup_programs(&cgp)
    );
    assert_eq!(
        links_on(&cgp, &ns).len(),
        cgroup_program_count(&pod) + 1,
        "the cgroup links + 1 sk_lookup"
    );
    for dst in [v4_dst(), v6_dst()] {
        assert_captured(&pod.app_client(&dst), &dst, "installed");
    }
    assert_eq!(proxy_conns(&mut pod, proxy).len(), 2);
    // Kernel objects of this install: the attached programs and the maps.
    let prog_ids: Vec<u64> = links_on(&cgp, &ns)
        .iter()
        .map(|l| l["prog_id"].as_u64().unwrap())
        .collect();
    let map_ids: Vec<u64> = std::fs::read_dir(pod.pin_dir.join("maps"))
        .expect("maps dir")
        .flatten()
        .map(|e| {
            let j: Value = serde_json::from_str(
                &run("bpftool", &["-j", "map", "show", "pinned", s(&e.path())]).unwrap(),
            )
            .unwrap();
            j["id"].as_u64().unwrap()
        })
        .collect();
    assert!(!map_ids.is_empty());

    let r = redirect(&pod, &["uninstall"]).ok("uninstall");
    assert!(r.stdout.contains("uninstalled"), "{r:#?}");
    assert!(
        !pod.pin_dir.exists(),
        "pin dir left: {:?}",
        std::fs::read_dir(&pod.pin_dir).map(|d| d.flatten().map(|e| e.path()).collect::<Vec<_>>())
    );
    assert_eq!(
        cgroup_programs(&cgp),
        Vec::<String>::new(),
        "programs attached to {}",
        cgp.display()
    );
    assert_eq!(
        links_on(&cgp, &ns),
        Vec::<Value>::new(),
        "links left on the test cgroup/netns"
    );
    assert_eq!(sk_lookup_links(&ns), 0);
    // Programs and maps are freed, not just unpinned (the kernel frees them
    // after an RCU grace period: poll briefly).
    let alive = |kind: &str, ids: &[u64]| -> Vec<u64> {
        ids.iter()
            .copied()
            .filter(|id| run("bpftool", &[kind, "show", "id", &id.to_string()]).is_ok())
            .collect()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    while (!alive("prog", &prog_ids).is_empty() || !alive("map", &map_ids).is_empty())
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(
        alive("prog", &prog_ids),
        Vec::<u64>::new(),
        "programs still loaded after uninstall"
    );
    assert_eq!(
        alive("map", &map_ids),
        Vec::<u64>::new(),
        "maps still alive after uninstall"
    );
    for dst in [v4_dst(), v6_dst()] {
        assert_direct(
            &pod.app_client(&dst),
            &dst,
            &format!("after uninstall {dst}"),
        );
    }
    assert_eq!(
        proxy_conns(&mut pod, proxy),
        Vec::<String>::new(),
        "the proxy saw connections after uninstall"
    );

    // Nothing installed: success, and says so.
    let r = redirect(&pod, &["uninstall"]).ok("second uninstall");
    assert!(r.stdout.contains("nothing installed"), "{r:#?}");
    assert!(!pod.pin_dir.exists());
}

// -------------------------------------------------- counters across CLI runs

#[test]
fn counters_survive_cli_restarts_and_only_grow() {
    let mut pod = Pod::new("clicnt");
    pod.start_upstream(8080);
    pod.start_proxy();
    pod.attach_istio_default();
    for _ in 0..3 {
        assert_captured(&pod.app_client(&v4_dst()), &v4_dst(), "v4");
    }
    let counts = |v: &Value| -> Vec<(String, u64, u64)> {
        v[0]["rules"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    format!(
                        "{}/{}",
                        r["chain"].as_str().unwrap(),
                        r["rule"].as_str().unwrap()
                    ),
                    r["count"].as_u64().unwrap(),
                    r["bytes"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    let a = counts(&pod.stats());
    let b = counts(&pod.stats());
    assert_eq!(a, b, "two stats runs with no traffic in between must agree");
    let get = |c: &[(String, u64, u64)], k: &str| c.iter().find(|r| r.0 == k).unwrap().1;
    assert_eq!(get(&a, "OUTPUT/captured"), 3);
    assert_eq!(get(&a, "ORIGINAL_DST/orig_dst_outbound"), 3);
    // Other CLI runs in between (status, a re-attach with the same flags)
    // do not reset anything.
    redirect(&pod, &["status"]).ok("status");
    pod.attach_istio_default();
    assert_captured(&pod.app_client(&v6_dst()), &v6_dst(), "v6");
    let c = counts(&pod.stats());
    for ((k, n1, b1), (_, n2, b2)) in b.iter().zip(&c) {
        assert!(
            n2 >= n1 && b2 >= b1,
            "{k} went down: {n1}/{b1} -> {n2}/{b2}"
        );
    }
    assert_eq!(get(&c, "OUTPUT/captured"), 4);
    assert_eq!(get(&c, "ORIGINAL_DST/orig_dst_outbound"), 4);
}

// ------------------------------------------------ two pods, one cgroup

/// A second pod netns joined to the upstream netns by its own veth
/// (10.201.0.2 -> 10.201.0.1); its processes go into the first pod's cgroup.
fn second_pod(pod: &Pod) -> NetnsGuard {
    let ns = NetnsGuard::new(&unique("rdp2-")).expect("second pod netns");
    let (a, b) = (unique("vc"), unique("vd"));
    run(
        "ip",
        &[
            "link",
            "add",
            &a,
            "netns",
            &ns.name,
            "type",
            "veth",
            "peer",
            "name",
            &b,
            "netns",
            &pod.topo.upstream.name,
        ],
    )
    .expect("veth");
    ns.ip(&["link", "set", &a, "name", "eth0"]).unwrap();
    ns.ip(&["addr", "add", "10.201.0.2/24", "dev", "eth0"])
        .unwrap();
    ns.ip(&["link", "set", "eth0", "up"]).unwrap();
    pod.topo
        .upstream
        .ip(&["addr", "add", "10.201.0.1/24", "dev", &b])
        .unwrap();
    pod.topo.upstream.ip(&["link", "set", &b, "up"]).unwrap();
    ns
}

#[test]
fn two_pods_share_the_cgroup_attachment_and_detach_separately() {
    let mut pod = Pod::new("cli2p");
    let ns2 = second_pod(&pod);
    let ns1 = pod.pod_netns();
    let ns2p = ns2.path();
    let cgp = cg(&pod);
    pod.start_upstream(8080);
    pod.spawn(
        "upstream2",
        &["echo", "--listen", "10.201.0.1:8081"],
        &pod.topo.in_upstream(),
    );
    let proxy1 = pod.start_proxy();
    let in2 = |uid: u32| Placement {
        netns: Some(ns2.path()),
        cgroup: Some(cgp.clone()),
        uid: Some(uid),
        gid: Some(uid),
    };
    pod.spawn("proxy2", &["proxy"], &in2(PROXY_UID));
    let proxy2 = pod.children.len() - 1;
    let dst2 = "10.201.0.1:8081";

    let r1 = Run::of(pod.attach(&[&["--json"][..], &ISTIO[..]].concat())).json();
    assert_eq!(r1["cgroup_newly_attached"], true, "{r1}");
    let mut args = vec!["attach", "--json", "--netns", s(&ns2p), "--cgroup", s(&cgp)];
    args.extend(ISTIO);
    let r2 = redirect(&pod, &args).ok("attach second pod").json();
    assert_eq!(
        r2["cgroup_newly_attached"], false,
        "the second pod must reuse the cgroup attachment: {r2}"
    );
    assert_ne!(r1["pod"]["cookie"], r2["pod"]["cookie"]);
    assert_eq!(
        cgroup_programs(&cgp).len(),
        cgroup_program_count(&pod),
        "one set of programs for both pods: {:?}",
        cgroup_programs(&cgp)
    );
    let st = redirect(&pod, &["status", "--json"]).ok("status").json();
    assert_eq!(st["pods"].as_array().unwrap().len(), 2, "{st:#}");
    assert_eq!(st["cgroups"].as_array().unwrap().len(), 1, "{st:#}");

    assert_captured(&pod.app_client(&v4_dst()), &v4_dst(), "pod 1");
    assert_captured(&pod.client(&in2(APP_UID), dst2, None), dst2, "pod 2");
    assert_eq!(proxy_conns(&mut pod, proxy1), vec![v4_dst()]);
    assert_eq!(proxy_conns(&mut pod, proxy2), vec![dst2.to_string()]);
    // Counters are per pod.
    let stats = redirect(&pod, &["stats", "--json"]).ok("stats").json();
    for p in stats.as_array().unwrap() {
        assert_eq!(rule_count(p, "OUTPUT", "captured"), 1, "{p:#}");
    }

    // Release pod 1: pod 2 stays captured, the cgroup programs stay.
    redirect(&pod, &["detach", "--netns", s(&ns1)]).ok("detach pod 1");
    assert_direct(
        &pod.app_client(&v4_dst()),
        &v4_dst(),
        "pod 1 after its detach",
    );
    assert_captured(
        &pod.client(&in2(APP_UID), dst2, None),
        dst2,
        "pod 2 after pod 1's detach",
    );
    assert_eq!(proxy_conns(&mut pod, proxy1), Vec::<String>::new());
    assert_eq!(proxy_conns(&mut pod, proxy2), vec![dst2.to_string()]);
    assert_eq!(
        cgroup_programs(&cgp).len(),
        cgroup_program_count(&pod),
        "pod 2 still needs the cgroup programs"
    );
    assert_eq!(sk_lookup_links(&ns1), 0);
    assert_eq!(sk_lookup_links(&ns2p), 1);
    let st = redirect(&pod, &["status", "--json"]).ok("status").json();
    let pods = st["pods"].as_array().unwrap();
    assert_eq!(pods.len(), 1, "{st:#}");
    assert_eq!(pods[0]["netns"], s(&ns2p));
    let r = redirect(&pod, &["stats", "--json", "--netns", s(&ns2p)])
        .ok("stats pod 2")
        .json();
    assert_eq!(rule_count(&r[0], "OUTPUT", "captured"), 2);
}

// ------------------------------------------------- the pin directory only

/// A directory removed on drop (its contents too): for pin dirs that are
/// not on bpffs.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(unique(&format!("rdt-{tag}-")));
        std::fs::create_dir(&p).expect("temp dir");
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `redirect --pin-dir <dir> <args>`.
fn redirect_at(dir: &Path, args: &[&str]) -> Run {
    Run::of(
        Command::new(redirect_bin())
            .arg("--pin-dir")
            .arg(dir)
            .args(args)
            .output()
            .expect("running redirect"),
    )
}

/// A pin dir that is not on bpffs holds no install: attach and uninstall
/// refuse it, say how to fix it (mount bpffs, or the right --pin-dir),
/// and leave everything there as it was (an empty directory, a regular
/// file planted where a map pin would be).
#[test]
fn a_pin_dir_not_on_bpffs_is_refused_and_left_untouched() {
    let pod = Pod::new("clinobpf");
    let dir = TempDir::new("clinobpf");
    let ns = pod.pod_netns();
    let cgp = cg(&pod);
    let mut args = vec!["attach", "--netns", s(&ns), "--cgroup", s(&cgp)];
    args.extend(ISTIO);
    let r = redirect_at(&dir.0, &args);
    assert_eq!(r.code, Some(1), "attach with a tmpfs pin dir: {r:#?}");
    assert!(
        r.stderr.contains(s(&dir.0))
            && r.stderr.contains("not on a bpffs")
            && r.stderr.contains("mount -t bpf"),
        "{r:#?}"
    );
    assert!(dir.0.is_dir(), "attach removed the existing directory");
    assert_eq!(std::fs::read_dir(&dir.0).unwrap().count(), 0);
    assert_eq!(cgroup_programs(&cgp), Vec::<String>::new());
    assert_eq!(sk_lookup_links(&ns), 0);

    // A file planted where a map pin would be.
    std::fs::create_dir(dir.0.join("maps")).unwrap();
    let planted = dir.0.join("maps/REDIRECT_PODS");
    std::fs::write(&planted, "not a pin").unwrap();
    let r = redirect_at(&dir.0, &["uninstall"]);
    assert_eq!(r.code, Some(1), "uninstall of a tmpfs pin dir: {r:#?}");
    assert!(
        r.stderr.contains("not on a bpffs") && r.stderr.contains("nothing there was touched"),
        "{r:#?}"
    );
    assert_eq!(std::fs::read_to_string(&planted).unwrap(), "not a pin");
    // Nothing there: still nothing to say but that.
    let gone = dir.0.join("no-such-install");
    let r = redirect_at(&gone, &["uninstall"]).ok("uninstall of a missing dir");
    assert!(r.stdout.contains("nothing installed"), "{r:#?}");
}

/// `uninstall` on bpffs removes the pins of the install's layout (the
/// known names, each holding a BPF object of the right kind) and says
/// exactly what it removed; anything else there (a pin under another
/// name, a pin of the wrong kind under a known name, a directory, a
/// symlink) is left in place and named, and so is the pin dir.
#[test]
fn uninstall_removes_only_the_installs_pins_and_names_them() {
    let mut pod = Pod::new("cliunpins");
    pod.start_upstream(8080);
    pod.start_proxy();
    pod.attach_istio_default();
    // `stats --zero` makes the userspace map REDIRECT_STATS_BASELINE.
    redirect(&pod, &["stats", "--zero"]).ok("stats --zero");
    let pin = pod.pin_dir.clone();
    assert!(pin.join("maps/REDIRECT_STATS_BASELINE").exists());
    let foreign_map = pin.join("maps/SOMEONE_ELSES");
    let wrong_kind = pin.join("netns/12345/sk_lookup");
    std::fs::create_dir(pin.join("netns/12345")).unwrap();
    for p in [&foreign_map, &wrong_kind] {
        run(
            "bpftool",
            &[
                "map",
                "create",
                s(p),
                "type",
                "hash",
                "key",
                "4",
                "value",
                "4",
                "entries",
                "1",
                "name",
                "foreign",
            ],
        )
        .expect("bpftool map create");
    }
    std::fs::create_dir(pin.join("mine")).unwrap();
    std::os::unix::fs::symlink(pin.join("maps/REDIRECT_PODS"), pin.join("maps/ALIAS")).unwrap();

    let r = redirect(&pod, &["uninstall"]).ok("uninstall");
    assert!(r.stdout.contains("uninstalled"), "{r:#?}");
    for removed in [
        "maps/REDIRECT_PODS",
        "maps/REDIRECT_STATS_BASELINE",
        "maps/REDIRECT_POD_CGROUPS",
        "cgroups/",
        "/sk_lookup",
    ] {
        assert!(
            r.stdout
                .lines()
                .any(|l| l.trim_start().starts_with("removed ") && l.contains(removed)),
            "{removed} not reported removed: {r:#?}"
        );
    }
    let left = [
        "maps/SOMEONE_ELSES",
        "netns/12345/sk_lookup",
        "mine",
        "maps/ALIAS",
    ];
    for l in left {
        let p = pin.join(l);
        assert!(
            p.symlink_metadata().is_ok(),
            "uninstall removed {} which it did not make",
            p.display()
        );
        assert!(
            r.stdout.contains(s(&p)) || r.stderr.contains(s(&p)),
            "{l} not named as left in place: {r:#?}"
        );
    }
    assert!(!pin.join("maps/REDIRECT_PODS").exists());
    assert!(pin.is_dir(), "the pin dir holds foreign entries: kept");
    assert_eq!(cgroup_programs(&cg(&pod)), Vec::<String>::new());
    assert_eq!(sk_lookup_links(&pod.pod_netns()), 0);
    // The test's own leftovers.
    for l in left {
        let p = pin.join(l);
        if p.is_dir() && !p.is_symlink() {
            std::fs::remove_dir(&p).unwrap();
        } else {
            std::fs::remove_file(&p).unwrap();
        }
    }
    for d in ["netns/12345", "netns", "maps", ""] {
        let _ = std::fs::remove_dir(pin.join(d));
    }
    assert!(!pin.exists());
}

// --------------------------------------------------------- one owner per pod

/// The same pod captured by a second install (another pin dir) is
/// refused, naming the install that has it; `--force` captures it anyway
/// and says so.
#[test]
fn a_pod_captured_by_another_install_is_refused_unless_forced() {
    let mut pod = Pod::new("cliowner");
    pod.start_upstream(8080);
    let proxy = pod.start_proxy();
    pod.attach_istio_default();
    let other = PathBuf::from(format!("/sys/fs/bpf/{}", unique("rdt-other-")));
    // Removed however the test ends.
    struct Uninstall(PathBuf);
    impl Drop for Uninstall {
        fn drop(&mut self) {
            if self.0.exists() {
                let _ = redirect_at(&self.0, &["uninstall"]);
            }
        }
    }
    let _other_guard = Uninstall(other.clone());
    let ns = pod.pod_netns();
    let cgp = cg(&pod);
    let mut args = vec!["attach", "--netns", s(&ns), "--cgroup", s(&cgp)];
    args.extend(ISTIO);
    // A dry run says so too.
    let mut dry = args.clone();
    dry.push("--dry-run");
    let r = redirect_at(&other, &dry);
    assert_eq!(r.code, Some(1), "dry run of a second install: {r:#?}");
    assert!(
        r.stdout.contains("a real run refuses") && r.stderr.contains(s(&pod.pin_dir)),
        "{r:#?}"
    );
    let r = redirect_at(&other, &args);
    assert_eq!(r.code, Some(1), "second install: {r:#?}");
    assert!(
        r.stderr.contains("already captured by the install at")
            && r.stderr.contains(s(&pod.pin_dir))
            && r.stderr.contains("--force"),
        "{r:#?}"
    );
    assert!(
        !other.exists(),
        "the refused attach left its new install behind"
    );
    assert_eq!(sk_lookup_links(&ns), 1);
    // Still captured by the first install only.
    assert_captured(&pod.app_client(&v4_dst()), &v4_dst(), "after the refusal");
    assert_eq!(proxy_conns(&mut pod, proxy), vec![v4_dst()]);

    let mut forced = args.clone();
    forced.push("--force");
    let r = redirect_at(&other, &forced).ok("forced attach");
    assert!(
        r.stderr.contains("--force") && r.stderr.contains(s(&pod.pin_dir)),
        "{r:#?}"
    );
    assert_eq!(sk_lookup_links(&ns), 2);
    redirect_at(&other, &["detach", "--netns", s(&ns)]).ok("detach from the second install");
    // The first install's own re-attach is not a conflict.
    pod.attach_istio_default();
    assert_captured(&pod.app_client(&v4_dst()), &v4_dst(), "at the end");
}

// ----------------------------------------------------- the recorded cgroup

/// A pod attached under a narrow cgroup keeps it: a re-attach, `validate`
/// and `detach` without --cgroup use the recorded cgroup (never the
/// cgroup2 root), and say so.
#[test]
fn without_cgroup_a_pod_keeps_the_cgroup_it_was_attached_under() {
    let mut pod = Pod::new("clicgrec");
    pod.start_upstream(8080);
    pod.attach_istio_default();
    let ns = pod.pod_netns();
    let cgp = cg(&pod);
    let mut args = vec!["attach", "--netns", s(&ns), "--json", "--dry-run"];
    args.extend(ISTIO);
    // The dry run first: nothing is attached anywhere if it would widen.
    let r = redirect(&pod, &args).ok("dry run without --cgroup").json();
    assert_eq!(r["cgroup"], s(&cgp), "{r:#}");
    args.retain(|a| *a != "--dry-run");
    let r = redirect(&pod, &args)
        .ok("re-attach without --cgroup")
        .json();
    assert_eq!(r["cgroup"], s(&cgp), "{r:#}");
    assert_eq!(r["cgroup_from"], "the pod's recorded cgroup", "{r:#}");
    assert_eq!(r["cgroup_newly_attached"], false, "{r:#}");
    let mut text = vec!["attach", "--netns", s(&ns)];
    text.extend(ISTIO);
    let r = redirect(&pod, &text).ok("re-attach, text");
    assert!(
        r.stdout
            .contains(&format!("cgroup {} already attached", s(&cgp)))
            && r.stdout.contains("recorded"),
        "{r:#?}"
    );
    let st = redirect(&pod, &["status", "--json"]).ok("status").json();
    assert_eq!(st["cgroups"].as_array().map(Vec::len), Some(1), "{st:#}");

    // validate (before the proxy starts, as Istio runs it) checks the
    // recorded cgroup (the root has no programs of this install).
    let r = redirect(&pod, &["validate", "--netns", s(&ns)]);
    assert_eq!(r.code, Some(0), "validate without --cgroup: {r:#?}");
    pod.start_proxy();
    assert_captured(&pod.app_client(&v4_dst()), &v4_dst(), "re-attached");

    // detach: the cgroup's programs go with its only pod.
    let r = redirect(&pod, &["detach", "--netns", s(&ns)]).ok("detach");
    assert!(
        r.stdout.contains(s(&cgp)) && r.stdout.contains("programs detached"),
        "{r:#?}"
    );
    assert_eq!(cgroup_programs(&cgp), Vec::<String>::new());
    assert!(links_on(&cgp, &ns).is_empty());
    assert_direct(&pod.app_client(&v4_dst()), &v4_dst(), "after detach");
}
