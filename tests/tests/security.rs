//! Who can bypass capture, end to end: only the configured proxy uid (and
//! gid, when `-g` is given) as the connecting task's *real* ids at connect
//! time. Everything else in the pod is captured, root included (as under
//! istio-iptables, whose rules capture root too). Plus the limits of the
//! mechanism (a netns made inside the pod is not the pod) and the
//! root-only pins and agent socket.
//!
//! Every connection is checked three ways:
//! - the kit proxy log: was this very connection proxied (its `peer` is
//!   the client's own local address)?
//! - the upstream echo server's greeting: who did the upstream see? A
//!   direct connection is the client's own socket (`peer=` equals the
//!   client's local address); a proxied one is the proxy's socket (the
//!   client's socket is a loopback one to the proxy);
//! - the pod's counters: exact increments.
//!
//! Each test has its own pod. Processes are started with exact credentials
//! (real/effective uid and gid, supplementary groups) by a test-local
//! `pre_exec`, since `placement::place` always clears the groups and sets
//! real = effective.
mod agent_support;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    os::fd::AsRawFd,
    os::unix::{
        fs::{MetadataExt, PermissionsExt},
        process::CommandExt,
    },
    path::{Path, PathBuf},
    process::{Command, Output},
    time::{Duration, Instant},
};

use redirect_testbed::{
    kit::ClientReport,
    sandbox::{unique, CgroupGuard},
};
use redirect_tests::*;
use serde_json::Value;

const UP_PORT: u16 = 8080;

const CAPTURED: &str = "OUTPUT/captured";
const SKIP_UID: &str = "OUTPUT/skip_proxy_uid";
const SKIP_GID: &str = "OUTPUT/skip_proxy_gid";

/// Credentials of a process started in the pod.
#[derive(Clone, Debug)]
struct Creds {
    ruid: u32,
    euid: u32,
    rgid: u32,
    egid: u32,
    /// Supplementary groups (setgroups).
    groups: Vec<u32>,
}

impl Creds {
    fn user(uid: u32, gid: u32) -> Creds {
        Creds {
            ruid: uid,
            euid: uid,
            rgid: gid,
            egid: gid,
            groups: vec![],
        }
    }

    fn with_groups(mut self, groups: &[u32]) -> Creds {
        self.groups = groups.to_vec();
        self
    }
}

/// Start `cmd` in `netns` (if any) and `cgroup` with exactly `creds`
/// (saved ids = effective ids). Same order as `placement::place`: cgroup,
/// netns, then groups, gids, uids.
fn place_as(cmd: &mut Command, netns: Option<&Path>, cgroup: &Path, creds: &Creds) {
    let procs = std::fs::OpenOptions::new()
        .write(true)
        .open(cgroup.join("cgroup.procs"))
        .expect("cgroup.procs");
    let ns = netns.map(|n| std::fs::File::open(n).expect("netns"));
    let c = creds.clone();
    unsafe {
        cmd.pre_exec(move || {
            let err = || Err(std::io::Error::last_os_error());
            if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                return err();
            }
            if let Some(f) = &ns {
                if libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return err();
                }
            }
            if libc::setgroups(c.groups.len(), c.groups.as_ptr()) != 0 {
                return err();
            }
            if libc::setresgid(c.rgid, c.egid, c.egid) != 0 {
                return err();
            }
            if libc::setresuid(c.ruid, c.euid, c.euid) != 0 {
                return err();
            }
            Ok(())
        });
    }
}

/// What one connection attempt looked like from every side.
#[derive(Debug)]
struct Seen {
    what: String,
    /// One report per client the command ran (JSON lines on stdout).
    reports: Vec<ClientReport>,
    /// Proxy log lines since the attempt started.
    proxied: Vec<Value>,
    /// Counter increments, `"<chain>/<rule>"`.
    delta: BTreeMap<String, u64>,
    out: Output,
}

impl Seen {
    fn one(&self) -> &ClientReport {
        assert_eq!(self.reports.len(), 1, "{}: {self:?}", self.what);
        &self.reports[0]
    }
}

/// A pod with an echo server upstream (every address, port 8080), the kit
/// proxy as 1337, attached with Istio's flags plus `extra`.
struct Rig {
    pod: Pod,
    proxy: usize,
}

impl Rig {
    fn new(tag: &str, extra: &[&str]) -> Rig {
        let mut pod = Pod::new(tag);
        let p = pod.topo.in_upstream();
        pod.spawn(
            "upstream",
            &["echo", "--listen", "0.0.0.0:8080", "--listen", "[::]:8080"],
            &p,
        );
        let proxy = pod.start_proxy();
        pod.attach_istio_default_with(extra);
        Rig { pod, proxy }
    }

    fn counters(&self) -> BTreeMap<String, u64> {
        let s = self.pod.stats();
        let mut m = BTreeMap::new();
        for r in s[0]["rules"].as_array().expect("rules") {
            let k = format!(
                "{}/{}",
                r["chain"].as_str().unwrap(),
                r["rule"].as_str().unwrap()
            );
            *m.entry(k).or_insert(0) += r["count"].as_u64().unwrap();
        }
        m
    }

    /// Run `prefix... redirect-kit client --connect <dst>` in the pod as
    /// `creds`, and see what happened.
    fn run(&mut self, creds: &Creds, prefix: &[&str], dst: &str) -> Seen {
        let kit = kit_bin();
        let kit = kit.to_str().unwrap();
        let mut argv: Vec<&str> = prefix.to_vec();
        argv.extend([kit, "client", "--connect", dst, "--timeout-ms", "2000"]);
        self.run_argv(creds, &argv, &format!("{creds:?} {prefix:?} -> {dst}"))
    }

    fn run_argv(&mut self, creds: &Creds, argv: &[&str], what: &str) -> Seen {
        let _ = self.pod.proxy_log(self.proxy);
        let before = self.counters();
        let mut cmd = Command::new(argv[0]);
        cmd.args(&argv[1..])
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
        place_as(
            &mut cmd,
            Some(&self.pod.pod_netns()),
            &self.pod.topo.cgroup.path,
            creds,
        );
        let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
        let reports = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str::<ClientReport>(l).ok())
            .collect();
        let proxied = self.pod.proxy_log(self.proxy);
        let after = self.counters();
        let delta = after
            .iter()
            .filter_map(|(k, v)| {
                let d = v - before.get(k).copied().unwrap_or(0);
                (d > 0).then(|| (k.clone(), d))
            })
            .collect();
        Seen {
            what: what.to_string(),
            reports,
            proxied,
            delta,
            out,
        }
    }
}

fn banner_peer(r: &ClientReport, what: &str) -> SocketAddr {
    let b = r.banner.as_deref().unwrap_or_default();
    b.split_whitespace()
        .find_map(|w| w.strip_prefix("peer="))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{what}: no peer= in greeting {b:?}"))
}

fn local(r: &ClientReport) -> SocketAddr {
    r.local
        .as_deref()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no local address: {r:?}"))
}

fn pod_ip(dst: &str) -> &'static str {
    if dst.starts_with('[') {
        POD_V6
    } else {
        POD_V4
    }
}

/// Client `r` (of `s`) went through the proxy: the proxy logged exactly
/// this connection (its peer is the client's own socket, from the pod's
/// address as under iptables) with
/// the original destination, the upstream saw the proxy's socket from the
/// pod address, not the client's, and the counters say captured once and
/// the proxy's own connection skipped by uid once.
fn assert_captured_report(s: &Seen, r: &ClientReport, dst: &str) {
    let what = &s.what;
    assert!(
        r.ok,
        "{what}: {r:?} stderr {}",
        String::from_utf8_lossy(&s.out.stderr)
    );
    assert_eq!(
        r.peer.as_deref(),
        Some(dst),
        "{what}: getpeername shows the original destination"
    );
    let l = local(r);
    assert_eq!(
        l.ip().to_string(),
        pod_ip(dst),
        "{what}: the client's socket leaves from the pod's address, as under iptables: {r:?}"
    );
    let conns: Vec<_> = s.proxied.iter().filter(|c| c["event"] == "conn").collect();
    assert!(
        conns
            .iter()
            .any(|c| c["dir"] == "outbound" && c["orig"] == dst && c["peer"] == l.to_string()),
        "{what}: the proxy did not log this connection ({l}): {:?}",
        s.proxied
    );
    let seen = banner_peer(r, what);
    assert_eq!(
        seen.ip().to_string(),
        pod_ip(dst),
        "{what}: upstream saw {seen}"
    );
    assert_ne!(
        seen, l,
        "{what}: upstream saw the proxy's socket, not the client's"
    );
}

fn assert_captured(s: &Seen, dst: &str) {
    let r = s.one();
    assert_captured_report(s, r, dst);
    assert_eq!(s.proxied.len(), 1, "{}: proxy log {:?}", s.what, s.proxied);
    let want: BTreeMap<String, u64> = [
        (CAPTURED, 1),
        (SKIP_UID, 1),
        ("ORIGINAL_DST/orig_dst_outbound", 1),
        ("ORIGINAL_DST/getpeername_rewritten", 1),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    assert_eq!(s.delta, want, "{}: counter increments", s.what);
}

/// Client `r` went straight to the upstream: the proxy saw nothing, the
/// upstream saw the client's own socket.
fn assert_direct_report(s: &Seen, r: &ClientReport, dst: &str) {
    let what = &s.what;
    assert!(
        r.ok,
        "{what}: {r:?} stderr {}",
        String::from_utf8_lossy(&s.out.stderr)
    );
    assert_eq!(r.peer.as_deref(), Some(dst), "{what}");
    let l = local(r);
    assert_eq!(
        banner_peer(r, what),
        l,
        "{what}: upstream saw the client's own socket"
    );
    assert_eq!(l.ip().to_string(), pod_ip(dst), "{what}");
}

/// Not captured, by counter `rule` (once), nothing else counted.
fn assert_bypassed(s: &Seen, dst: &str, rule: &str) {
    let r = s.one();
    assert_direct_report(s, r, dst);
    assert!(
        s.proxied.is_empty(),
        "{}: proxy saw {:?}",
        s.what,
        s.proxied
    );
    let want: BTreeMap<String, u64> = [(rule.to_string(), 1)].into_iter().collect();
    assert_eq!(s.delta, want, "{}: counter increments", s.what);
}

fn upstreams() -> [String; 2] {
    [
        format!("{UPSTREAM_V4}:{UP_PORT}"),
        format!("[{UPSTREAM_V6}]:{UP_PORT}"),
    ]
}

// ------------------------------------------------------------ identities

/// With Istio's flags (`-u 1337`, and `-g` defaulting to the `-u` list as
/// in istio-iptables), every other uid/gid is captured: root (uid 0 is not
/// special, as with istio-iptables' `--uid-owner`), the app, neighbours of
/// 1337, nobody. Only uid 1337, or primary gid 1337, goes direct.
#[test]
fn only_the_proxy_uid_bypasses_root_included() {
    let mut rig = Rig::new("secuid", &[]);
    let cases = [
        Creds::user(0, 0),
        Creds::user(APP_UID, APP_UID),
        Creds::user(1336, 1336),
        Creds::user(1338, 1338),
        Creds::user(65534, 65534),
        Creds::user(1337 + 65536, 1337 + 65536),
    ];
    for dst in upstreams() {
        for c in &cases {
            let s = rig.run(c, &[], &dst);
            assert_captured(&s, &dst);
        }
        let s = rig.run(&Creds::user(PROXY_UID, PROXY_UID), &[], &dst);
        assert_bypassed(&s, &dst, SKIP_UID);
        // The default `-g 1337`: the proxy gid as primary gid, any uid.
        for uid in [APP_UID, 0] {
            let s = rig.run(&Creds::user(uid, PROXY_UID), &[], &dst);
            assert_bypassed(&s, &dst, SKIP_GID);
        }
    }
}

/// With `-g 1337` too: the proxy gid bypasses only as the *primary* (real)
/// gid. A process that merely has 1337 among its supplementary groups is
/// captured, as `xt_owner --gid-owner` without `--suppl-groups` (what
/// istio-iptables emits) does not match supplementary groups either.
#[test]
fn proxy_gid_as_supplementary_group_is_captured() {
    let mut rig = Rig::new("secgrp", &["-g", "1337"]);
    // The placement really gives the groups asked for.
    let id = rig.run_argv(
        &Creds::user(APP_UID, APP_UID).with_groups(&[PROXY_UID]),
        &["/usr/bin/id", "-G"],
        "id -G",
    );
    let groups: Vec<u32> = String::from_utf8_lossy(&id.out.stdout)
        .split_whitespace()
        .map(|g| g.parse().unwrap())
        .collect();
    assert_eq!(groups, vec![APP_UID, PROXY_UID], "id -G: {:?}", id.out);
    for dst in upstreams() {
        for groups in [vec![PROXY_UID], vec![0, PROXY_UID, 1338]] {
            let s = rig.run(
                &Creds::user(APP_UID, APP_UID).with_groups(&groups),
                &[],
                &dst,
            );
            assert_captured(&s, &dst);
        }
        // Root with the proxy group as a supplementary group: captured too.
        let s = rig.run(&Creds::user(0, 0).with_groups(&[PROXY_UID]), &[], &dst);
        assert_captured(&s, &dst);
        // The configured gid as the primary gid does bypass (that is what
        // `-g` configures).
        let s = rig.run(&Creds::user(APP_UID, PROXY_UID), &[], &dst);
        assert_bypassed(&s, &dst, SKIP_GID);
    }
}

/// The hook reads the *real* uid/gid (`bpf_get_current_uid_gid`), not the
/// effective ones. A task running with effective uid/gid 1337 but real ids
/// 1000 — what a set-user-ID/set-group-ID 1337 program run by the app gets —
/// is captured. (`xt_owner` matches the socket's fsuid/fsgid, i.e. the
/// effective ids, and would let it through: the hook is stricter here.)
/// The reverse, real 1337 with effective 1000, bypasses; only a task that
/// already is 1337 (or root) can get there.
#[test]
fn real_ids_decide_not_effective_ids() {
    let mut rig = Rig::new("secreal", &["-g", "1337"]);
    for dst in upstreams() {
        let setuid_like = Creds {
            ruid: APP_UID,
            euid: PROXY_UID,
            rgid: APP_UID,
            egid: PROXY_UID,
            groups: vec![],
        };
        let s = rig.run(&setuid_like, &[], &dst);
        assert_captured(&s, &dst);
        let reverse = Creds {
            ruid: PROXY_UID,
            euid: APP_UID,
            rgid: PROXY_UID,
            egid: APP_UID,
            groups: vec![],
        };
        let s = rig.run(&reverse, &[], &dst);
        assert_bypassed(&s, &dst, SKIP_UID);
    }
}

/// The ids are read at connect time: a process that starts as 1337 (and
/// holds CAP_SETUID/CAP_SETGID, so it can change) connects directly, then
/// its child drops to 1000 and is captured. The proxy identity is not
/// inherited by anything that stops being 1337.
#[test]
fn process_that_drops_from_proxy_uid_is_captured() {
    let mut rig = Rig::new("secdrop", &[]);
    let kit = kit_bin();
    let kit = kit.to_str().unwrap();
    for dst in upstreams() {
        let script = format!(
            "id -u >&2; {kit} client --connect '{dst}' --timeout-ms 2000; \
             exec setpriv --reuid={APP_UID} --regid={APP_UID} --clear-groups --inh-caps=-all --ambient-caps=-all \
             {kit} client --connect '{dst}' --timeout-ms 2000"
        );
        let argv = [
            "setpriv",
            "--reuid=1337",
            "--regid=1337",
            "--clear-groups",
            "--inh-caps=+setuid,+setgid",
            "--ambient-caps=+setuid,+setgid",
            "sh",
            "-c",
            &script,
        ];
        let s = rig.run_argv(
            &Creds::user(0, 0),
            &argv,
            &format!("1337 then 1000 -> {dst}"),
        );
        assert!(s.out.status.success(), "{}: {:?}", s.what, s.out);
        assert_eq!(
            String::from_utf8_lossy(&s.out.stderr).lines().next(),
            Some("1337"),
            "{:?}",
            s.out
        );
        assert_eq!(s.reports.len(), 2, "{s:?}");
        // First as 1337: direct; then as 1000: through the proxy.
        assert_direct_report(&s, &s.reports[0], &dst);
        assert_captured_report(&s, &s.reports[1], &dst);
        assert_eq!(s.proxied.len(), 1, "{s:?}");
        let want: BTreeMap<String, u64> = [
            (CAPTURED, 1),
            (SKIP_UID, 2),
            ("ORIGINAL_DST/orig_dst_outbound", 1),
            ("ORIGINAL_DST/getpeername_rewritten", 1),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        assert_eq!(s.delta, want, "{}", s.what);
    }
}

/// The app (uid 1000, no capabilities) cannot become 1337, neither its
/// real nor its effective ids, so it has no way to bypass: the attempts fail
/// before any connection is made, and its own connections are captured.
#[test]
fn app_cannot_become_the_proxy() {
    let mut rig = Rig::new("secnoup", &["-g", "1337"]);
    let app = Creds::user(APP_UID, APP_UID);
    for dst in upstreams() {
        for change in [
            vec!["setpriv", "--reuid=1337", "--regid=1337", "--clear-groups"],
            vec!["setpriv", "--euid=1337"],
            vec!["setpriv", "--ruid=1337"],
            vec!["setpriv", "--regid=1337", "--keep-groups"],
            vec!["setpriv", "--groups=1337"],
        ] {
            let s = rig.run(&app, &change, &dst);
            assert!(!s.out.status.success(), "{}: {:?}", s.what, s.out);
            assert!(
                s.reports.is_empty(),
                "{}: the client must not run: {:?}",
                s.what,
                s.reports
            );
            let err = String::from_utf8_lossy(&s.out.stderr);
            assert!(err.contains("Operation not permitted"), "{}: {err}", s.what);
            assert!(
                s.proxied.is_empty() && s.delta.is_empty(),
                "{}: nothing connected: {s:?}",
                s.what
            );
        }
        let s = rig.run(&app, &["sh", "-c", "exec \"$@\"", "sh"], &dst);
        assert_captured(&s, &dst);
    }
}

// ------------------------------------------------------------ netns

/// A process of the pod (in the pod's cgroup) that creates a network
/// namespace of its own (`unshare -n`) is not in a captured pod: pods are
/// selected by netns cookie, and the new netns has another one. Its traffic
/// goes out untouched, uncounted, and the proxy never sees it.
///
/// What that means: the new netns is a different network. Its traffic does
/// not traverse the pod's interfaces at all; it only reaches anything if
/// someone with privileges on the node (here: the test) wires it up, as
/// with the veth to the upstream netns below. Creating a netns needs
/// CAP_SYS_ADMIN (an unprivileged process can only get one inside a new
/// user namespace, and that one has nothing but a loopback), and wiring it
/// up needs CAP_NET_ADMIN in the pod's netns; a mesh pod must have
/// neither, and with them it could as well rewrite its own network.
/// Istio's iptables rules have the same limit (they live in the pod's
/// netns only).
#[test]
fn netns_created_inside_the_pod_is_not_the_pod() {
    let mut rig = Rig::new("secns", &[]);
    let cg = rig.pod.topo.cgroup.path.clone();
    // A root process of the pod unshares a netns and keeps it alive.
    let mut holder_cmd = Command::new("unshare");
    holder_cmd.args(["-n", "sleep", "120"]);
    let root_in_pod = rig.pod.topo.in_pod(0, 0);
    let mut holder =
        ChildGuard::spawn("holder", holder_cmd, &root_in_pod, false).expect("unshare -n");
    let pid = holder.pid();
    let pod_ns = std::fs::metadata(rig.pod.pod_netns()).unwrap().ino();
    let proc_ns = format!("/proc/{pid}/ns/net");
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::fs::metadata(&proc_ns)
        .map(|m| m.ino())
        .unwrap_or(pod_ns)
        == pod_ns
    {
        assert!(Instant::now() < deadline, "unshare -n did not make a netns");
        assert!(
            holder.child.try_wait().unwrap().is_none(),
            "unshare -n exited"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let in_cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(
        in_cgroup
            .trim_end()
            .ends_with(cg.file_name().unwrap().to_str().unwrap()),
        "{in_cgroup}"
    );
    // The test wires it to the upstream netns (only addresses inside the
    // test's namespaces; the pair lives and dies with them).
    let (a, b) = (unique("vn"), unique("vm"));
    let pid_s = pid.to_string();
    run(
        "ip",
        &[
            "link",
            "add",
            &a,
            "netns",
            &pid_s,
            "type",
            "veth",
            "peer",
            "name",
            &b,
            "netns",
            &rig.pod.topo.upstream.name,
        ],
    )
    .expect("veth");
    let nsip = |args: &[&str]| {
        let mut v = vec!["-t", pid_s.as_str(), "-n", "ip"];
        v.extend_from_slice(args);
        run("nsenter", &v).unwrap_or_else(|e| panic!("{e}"))
    };
    nsip(&["link", "set", "lo", "up"]);
    nsip(&["addr", "add", "10.200.1.2/24", "dev", &a]);
    nsip(&["link", "set", &a, "up"]);
    let up = &rig.pod.topo.upstream;
    up.ip(&["addr", "add", "10.200.1.1/24", "dev", &b]).unwrap();
    up.ip(&["link", "set", &b, "up"]).unwrap();

    // Control: from the pod's netns, root is captured.
    let dst = format!("{UPSTREAM_V4}:{UP_PORT}");
    let s = rig.run(&Creds::user(0, 0), &[], &dst);
    assert_captured(&s, &dst);
    // From the new netns (same cgroup, same programs run), as root and as
    // the app: direct, uncounted, unseen by the proxy.
    let dst = format!("10.200.1.1:{UP_PORT}");
    let kit = kit_bin();
    let kit = kit.to_str().unwrap();
    // nsenter needs root: it enters, then drops to the id asked for.
    for id in ["0", "1000"] {
        let argv = [
            "nsenter",
            "-t",
            pid_s.as_str(),
            "-n",
            "-S",
            id,
            "-G",
            id,
            "--",
            kit,
            "client",
            "--connect",
            &dst,
            "--timeout-ms",
            "2000",
        ];
        let s = rig.run_argv(
            &Creds::user(0, 0),
            &argv,
            &format!("uid {id} in the new netns -> {dst}"),
        );
        let r = s.one();
        assert!(r.ok, "{}: {r:?} {:?}", s.what, s.out);
        assert_eq!(r.peer.as_deref(), Some(dst.as_str()));
        assert_eq!(
            banner_peer(r, &s.what),
            local(r),
            "{}: upstream saw the client's own socket",
            s.what
        );
        assert_eq!(local(r).ip().to_string(), "10.200.1.2", "{}", s.what);
        assert!(s.proxied.is_empty(), "{}: {:?}", s.what, s.proxied);
        assert!(
            s.delta.is_empty(),
            "{}: the pod's counters moved: {:?}",
            s.what,
            s.delta
        );
    }
    drop(holder);

    // Without capabilities the app can still make a netns of its own inside
    // a new user namespace (where the kernel allows unprivileged ones), but
    // it has only a loopback: nothing leaves, nothing is counted.
    for dst in upstreams() {
        let s = rig.run(&Creds::user(APP_UID, APP_UID), &["unshare", "-Urn"], &dst);
        let r = s.one();
        assert!(!r.ok, "{}: {r:?}", s.what);
        let e = r.error.as_deref().unwrap_or_default();
        assert!(
            e.contains("unreachable") || e.contains("Cannot assign requested address"),
            "{}: {r:?}",
            s.what
        );
        assert!(s.proxied.is_empty() && s.delta.is_empty(), "{s:?}");
    }
}

/// A process in the pod's network namespace but in a cgroup outside the
/// attached one is not captured: its sockets never meet the cgroup
/// programs (docs/threat-model.md, "Processes outside the attached
/// cgroup"; the agent attaches at the cgroup2 root, so this is about a
/// narrow `--cgroup`). `attach` warns, naming the process.
#[test]
fn a_process_outside_the_attached_cgroup_is_not_captured_and_attach_warns() {
    let mut pod = Pod::new("secoutcg");
    let up = pod.topo.in_upstream();
    pod.spawn(
        "upstream",
        &["echo", "--listen", "0.0.0.0:8080", "--listen", "[::]:8080"],
        &up,
    );
    let proxy = pod.start_proxy();
    let other = CgroupGuard::new(&unique("redirect-secout-")).expect("cgroup");
    let outside = Placement {
        netns: Some(pod.pod_netns()),
        cgroup: Some(other.path.clone()),
        uid: Some(APP_UID),
        gid: Some(APP_UID),
    };
    let pid = pod
        .spawn(
            "outsider",
            &["echo", "--listen", "127.0.0.1:9999"],
            &outside,
        )
        .pid();
    let out = pod.attach_istio_default();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("pid {pid} "))
            && err.contains("outside cgroup")
            && err.contains(pod.topo.cgroup.path.to_str().unwrap())
            && err.contains("not captured"),
        "attach must warn about pid {pid}: {err}"
    );
    // Not captured indeed: a client placed like it goes direct, unseen by
    // the proxy and the counters.
    let dst = format!("{UPSTREAM_V4}:{UP_PORT}");
    let _ = pod.proxy_log(proxy);
    let r = pod.client(&outside, &dst, None);
    assert!(r.ok, "{r:?}");
    assert_eq!(
        banner_peer(&r, "outside"),
        local(&r),
        "upstream saw the client itself"
    );
    assert!(pod.proxy_log(proxy).is_empty());
    assert_eq!(pod.counter("OUTPUT", "captured"), 0);
    // Inside the cgroup: captured, and a pod whose processes are all in
    // it gets no warning.
    let r = pod.app_client(&dst);
    assert!(r.ok, "{r:?}");
    assert!(!pod.proxy_log(proxy).is_empty(), "the proxy saw it: {r:?}");
    assert_eq!(pod.counter("OUTPUT", "captured"), 1);
    pod.children.retain(|c| c.name != "outsider");
    let again = pod.attach_istio_default();
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(!err.contains("outside cgroup"), "{err}");
}

// ------------------------------------------------------------ pins, agent

fn as_app(cmd: &str, args: &[&str]) -> Output {
    let mut c = Command::new(cmd);
    c.args(args);
    redirect_testbed::sandbox::place(
        &mut c,
        &Placement {
            uid: Some(APP_UID),
            gid: Some(APP_UID),
            ..Default::default()
        },
    )
    .unwrap();
    c.output().unwrap_or_else(|e| panic!("{cmd}: {e}"))
}

/// The pin directory is root-only (0700, owned by root; every pinned
/// object inside is root's too), so an unprivileged user can neither list
/// nor open the maps and links, and `redirect` itself refuses to run
/// without privileges.
#[test]
fn pins_are_root_only() {
    let rig = Rig::new("secpin", &[]);
    let pin = &rig.pod.pin_dir;
    let m = std::fs::metadata(pin).unwrap();
    assert_eq!(
        (m.permissions().mode() & 0o777, m.uid()),
        (0o700, 0),
        "{}",
        pin.display()
    );
    fn walk(p: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(p).unwrap().flatten() {
            out.push(e.path());
            if e.file_type().unwrap().is_dir() {
                walk(&e.path(), out);
            }
        }
    }
    let mut all = Vec::new();
    walk(pin, &mut all);
    assert!(all.iter().any(|p| p.ends_with("REDIRECT_PODS")), "{all:?}");
    for p in &all {
        let m = std::fs::symlink_metadata(p).unwrap();
        assert_eq!(m.uid(), 0, "{}", p.display());
        assert_eq!(
            m.permissions().mode() & 0o077,
            0,
            "{} is open to others: {:o}",
            p.display(),
            m.permissions().mode()
        );
    }
    let pin_s = pin.to_str().unwrap();
    let ls = as_app("ls", &[pin_s]);
    assert!(!ls.status.success(), "ls as uid 1000: {ls:?}");
    assert!(
        String::from_utf8_lossy(&ls.stderr).contains("Permission denied"),
        "{ls:?}"
    );
    let maps = pin.join("maps/REDIRECT_PODS");
    let cat = as_app("cat", &[maps.to_str().unwrap()]);
    assert!(
        !cat.status.success() && String::from_utf8_lossy(&cat.stderr).contains("Permission denied"),
        "{cat:?}"
    );
    let ns = rig.pod.pod_netns();
    let ns = ns.to_str().unwrap();
    let bin = redirect_bin();
    let bin = bin.to_str().unwrap();
    for args in [
        vec!["status"],
        vec!["stats", "--netns", ns],
        vec!["detach", "--netns", ns],
        vec!["uninstall"],
        vec!["attach", "--netns", ns, "-u", "1000"],
    ] {
        let mut a = vec!["--pin-dir", pin_s];
        a.extend_from_slice(&args);
        let out = as_app(bin, &a);
        assert!(
            !out.status.success(),
            "redirect {args:?} as uid 1000: {out:?}"
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("missing privilege"),
            "redirect {args:?} as uid 1000: {err}"
        );
    }
    // Still attached and working after all that.
    assert_eq!(
        std::fs::metadata(pin.join("maps/REDIRECT_PODS"))
            .unwrap()
            .uid(),
        0
    );
    let out = rig.pod.redirect(&["status"]);
    assert!(out.status.success(), "{out:?}");
}

/// The agent socket is 0600 root:root, and even when its mode is opened up
/// the agent refuses peers that are not uid 0 (SO_PEERCRED): the app can't
/// capture, release or reconfigure pods. (agent.rs checks the mode and a
/// non-root client on the untouched socket.)
#[test]
fn agent_refuses_non_root_peers_even_on_an_open_socket() {
    use agent_support::*;
    let pod = Pod::new("secagent");
    let tmp = TempDir::new("secagent");
    std::fs::set_permissions(&tmp.0, std::fs::Permissions::from_mode(0o755)).unwrap();
    let sock = tmp.join("agent.sock");
    let d = Daemon::start(
        &pod.pin_dir,
        &pod.topo.cgroup.path,
        &sock,
        &tmp.join("daemon.log"),
        &[],
    );
    let m = std::fs::metadata(&sock).unwrap();
    assert_eq!(
        (m.permissions().mode() & 0o777, m.uid(), m.gid()),
        (0o600, 0, 0)
    );
    let netns = pod.pod_netns().display().to_string();
    let vars = pod_vars(
        "ADD",
        "ctr-x",
        &netns,
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=a;K8S_POD_NAME=b;REDIRECT_CAPTURE=true",
    );
    let conf = plugin_conf(&sock, serde_json::json!({}));
    let run_cni_as_app = || {
        use std::io::Write;
        let mut cmd = Command::new(cni_bin());
        cmd.env_clear();
        for (k, v) in &vars {
            cmd.env(k, v);
        }
        cmd.stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        redirect_testbed::sandbox::place(
            &mut cmd,
            &Placement {
                uid: Some(APP_UID),
                gid: Some(APP_UID),
                ..Default::default()
            },
        )
        .unwrap();
        let mut c = cmd.spawn().unwrap();
        c.stdin.take().unwrap().write_all(conf.as_bytes()).unwrap();
        c.wait_with_output().unwrap()
    };
    // 0600: the connect itself is refused.
    let out = run_cni_as_app();
    assert!(!out.status.success(), "{out:?}");
    // Opened to everyone: the agent answers, with a refusal.
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = run_cni_as_app();
    assert!(!out.status.success(), "{out:?}");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("not root"),
        "the agent's refusal reaches the plugin: {text}"
    );
    agent_support::eventually("the agent logs the refusal", || {
        d.log_text().contains("is not root")
    });
    assert!(d.list().is_empty(), "nothing was captured");
    assert!(
        !pod.pin_dir.join("netns").exists()
            || std::fs::read_dir(pod.pin_dir.join("netns"))
                .unwrap()
                .next()
                .is_none()
    );
}
