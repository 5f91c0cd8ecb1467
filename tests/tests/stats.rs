//! `redirect stats` as the iptables workflow uses it: zero the counters
//! (`iptables -Z`), list one chain (`iptables --list CHAIN`), watch them
//! change (`watch -d iptables -L -n -v`), and a MISSING row that counts
//! only real misses. Real programs, a real pod netns, real connections.

use std::{
    io::Read,
    os::fd::{FromRawFd, OwnedFd},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use redirect_tests::*;
use serde_json::Value;

fn v4_dst() -> String {
    format!("{UPSTREAM_V4}:8080")
}

fn ns(pod: &Pod) -> String {
    pod.pod_netns().display().to_string()
}

/// `redirect stats <args>`: exit code, stdout, stderr.
fn stats(pod: &Pod, args: &[&str]) -> (Option<i32>, String, String) {
    let mut all = vec!["stats"];
    all.extend_from_slice(args);
    let o = pod.redirect(&all);
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn ok_json(pod: &Pod, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    let (code, out, err) = stats(pod, &all);
    assert_eq!(code, Some(0), "stats {args:?}: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// (count, count_total, bytes, bytes_total) of one row of the pod.
fn row(pod: &Pod, chain: &str, rule: &str) -> (u64, u64, u64, u64) {
    let v = ok_json(pod, &["--netns", &ns(pod)]);
    let r = stats_rule(&v[0], chain, rule);
    let n = |k: &str| r[k].as_u64().unwrap_or_else(|| panic!("{k} in {r}"));
    (n("count"), n("count_total"), n("bytes"), n("bytes_total"))
}

/// One app connection through the proxy, and its bytes in (they are added
/// to the row when the app's socket closes): the row after it.
fn connect_and_settle(pod: &Pod) -> (u64, u64, u64, u64) {
    let before = row(pod, "OUTPUT", "captured").3;
    assert_ok(&pod.app_client(&v4_dst()), "app");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = row(pod, "OUTPUT", "captured");
        if r.3 > before {
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "no bytes counted for the closed connection: {r:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn captured_pod(tag: &str) -> Pod {
    let mut pod = Pod::new(tag);
    pod.start_upstream(8080);
    pod.start_proxy();
    pod.attach_istio_default();
    pod
}

#[test]
fn zero_resets_what_stats_shows_and_the_raw_counters_keep_growing() {
    let pod = captured_pod("stz");
    connect_and_settle(&pod);
    let (n, total, _, bytes_total) = connect_and_settle(&pod);
    assert_eq!((n, total), (2, 2));
    assert!(
        !pod.pin_dir.join("maps/REDIRECT_STATS_BASELINE").exists(),
        "baseline map made before any --zero"
    );

    // Zero this pod: it says so; every row reads 0, the totals do not move.
    let (code, out, err) = stats(&pod, &["--zero", "--netns", &ns(&pod)]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.starts_with(&format!("zeroed {} (netns cookie ", ns(&pod))),
        "{out}"
    );
    let v = ok_json(&pod, &["--netns", &ns(&pod)]);
    for r in v[0]["rules"].as_array().unwrap() {
        assert_eq!(
            (r["count"].as_u64(), r["bytes"].as_u64()),
            (Some(0), Some(0)),
            "{r}"
        );
        assert!(r["zeroed_at"].as_u64().is_some(), "{r}");
    }
    assert_eq!(
        row(&pod, "OUTPUT", "captured"),
        (0, 2, 0, bytes_total),
        "raw values moved"
    );
    let (_, text, _) = stats(&pod, &["--netns", &ns(&pod)]);
    assert!(text.contains("[since --zero "), "{text}");

    // One more connection: 1 since the zero, 3 in all, bytes likewise.
    let (n, total, bytes, total_bytes) = connect_and_settle(&pod);
    assert_eq!((n, total), (1, 3));
    assert!(
        bytes > 0 && total_bytes == bytes_total + bytes,
        "{bytes} {total_bytes}"
    );
    assert_eq!(row(&pod, "ORIGINAL_DST", "orig_dst_outbound").0, 1);

    // --chain zeroes one chain only.
    let (code, out, err) = stats(&pod, &["--zero", "--chain", "original_dst"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("zeroed chain ORIGINAL_DST of "), "{out}");
    assert_eq!(row(&pod, "ORIGINAL_DST", "orig_dst_outbound").0, 0);
    assert_eq!(
        row(&pod, "OUTPUT", "captured").0,
        1,
        "OUTPUT was zeroed too"
    );

    // Releasing the pod forgets its baselines with its counters: captured
    // again, it starts from 0 with nothing zeroed.
    let d = pod.redirect(&["detach", "--netns", &ns(&pod)]);
    assert!(d.status.success(), "{d:?}");
    assert_eq!(pinned_map_len(&pod, "REDIRECT_STATS_BASELINE"), 0);
    pod.attach_istio_default();
    assert_ok(&pod.app_client(&v4_dst()), "app");
    let v = ok_json(&pod, &["--netns", &ns(&pod)]);
    let r = stats_rule(&v[0], "OUTPUT", "captured");
    assert_eq!(
        (r["count"].as_u64(), r["count_total"].as_u64()),
        (Some(1), Some(1)),
        "{r}"
    );
    assert!(r["zeroed_at"].is_null(), "{r}");
}

#[test]
fn zero_and_chain_refuse_what_does_not_exist_and_change_nothing() {
    let pod = captured_pod("stbad");
    assert_ok(&pod.app_client(&v4_dst()), "app");
    let other = pod.topo.upstream.path().display().to_string();

    // --zero on a netns that is not captured: named, with what is.
    let (code, out, err) = stats(&pod, &["--zero", "--netns", &other]);
    assert_eq!(code, Some(1), "{err}");
    assert!(out.is_empty(), "{out}");
    assert!(
        err.contains(&format!("'{other}' is not captured"))
            && err.contains(&format!("captured: {} (netns cookie ", ns(&pod))),
        "{err}"
    );
    // A chain that does not exist: named, with the chains that do.
    for args in [
        vec!["--chain", "ISTIO_NOPE"],
        vec!["--zero", "--chain", "ISTIO_NOPE"],
    ] {
        let (code, out, err) = stats(&pod, &args);
        assert_eq!(code, Some(1), "{args:?}: {err}");
        assert!(out.is_empty(), "{out}");
        assert!(
            err.contains("invalid --chain value 'ISTIO_NOPE'")
                && err.contains("OUTPUT (or ISTIO_OUTPUT), PREROUTING (or ISTIO_INBOUND), ISTIO_REDIRECT, ISTIO_IN_REDIRECT, VM, DNS (or ISTIO_OUTPUT_DNS), ORIGINAL_DST, ACCEL, ERRORS"),
            "{args:?}: {err}"
        );
    }
    for bad in ["0", "soon", "1e9", "nan"] {
        let (code, _, err) = stats(&pod, &["--watch", bad]);
        assert_eq!(code, Some(1), "--watch {bad}: {err}");
        assert!(
            err.contains(&format!("invalid --watch value '{bad}'")),
            "{err}"
        );
    }
    // --zero prints no JSON.
    let (code, _, err) = stats(&pod, &["--zero", "--json"]);
    assert_eq!(code, Some(2), "{err}");
    // Nothing was zeroed by any of these.
    assert!(!pod.pin_dir.join("maps/REDIRECT_STATS_BASELINE").exists());
    assert_eq!(row(&pod, "OUTPUT", "captured").0, 1);
    // Something else pinned under the baseline's name: the counters are
    // still shown (never zeroed, with a warning); --zero names the pin.
    let planted = pod.pin_dir.join("maps/REDIRECT_STATS_BASELINE");
    let made = Command::new("bpftool")
        .arg("map")
        .arg("create")
        .arg(&planted)
        .args([
            "type", "hash", "key", "4", "value", "4", "entries", "1", "name", "planted",
        ])
        .output()
        .expect("bpftool");
    assert!(made.status.success(), "{made:?}");
    let (code, out, err) = stats(&pod, &["--netns", &ns(&pod)]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("Chain OUTPUT") && err.contains("never zeroed"),
        "{out}{err}"
    );
    assert_eq!(row(&pod, "OUTPUT", "captured").0, 1);
    let (code, _, err) = stats(&pod, &["--zero"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(planted.to_str().unwrap()) && err.contains("rm "),
        "{err}"
    );
    std::fs::remove_file(&planted).unwrap();
    // Nothing installed: said so.
    let empty = Pod::new("stbad2");
    let (code, _, err) = stats(&empty, &["--zero"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("nothing is installed"), "{err}");
}

#[test]
fn chain_lists_one_chain_by_our_name_or_the_iptables_one() {
    let mut pod = captured_pod("stch");
    pod.start_app_server(9080);
    assert_ok(&pod.app_client(&v4_dst()), "app");
    // One connection from outside: PREROUTING captures it.
    let r = pod.client(&pod.topo.in_upstream(), &format!("{POD_V4}:9080"), None);
    assert_ok(&r, "inbound");
    let rules = |v: &Value| -> Vec<(String, String, u64)> {
        v[0]["rules"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["chain"].as_str().unwrap().to_string(),
                    r["rule"].as_str().unwrap().to_string(),
                    r["count"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    let all = ok_json(&pod, &[]);
    for (names, chain, n) in [
        (["OUTPUT", "istio_output"], "OUTPUT", 16),
        (["PREROUTING", "ISTIO_INBOUND"], "PREROUTING", 8),
        (["VM", "vm"], "VM", 4),
        (["DNS", "istio_output_dns"], "DNS", 4),
        (["ORIGINAL_DST", "original_dst"], "ORIGINAL_DST", 4),
    ] {
        for name in names {
            let one = rules(&ok_json(&pod, &["--chain", name]));
            let want: Vec<_> = rules(&all).into_iter().filter(|r| r.0 == chain).collect();
            assert_eq!(one.len(), n, "{name}");
            assert_eq!(one, want, "{name}");
        }
    }
    // ISTIO_IN_REDIRECT: what goes to the inbound port, from both chains.
    let inr = rules(&ok_json(&pod, &["--chain", "ISTIO_IN_REDIRECT"]));
    assert_eq!(
        inr,
        vec![
            ("OUTPUT".into(), "proxy_to_self_inbound".into(), 0),
            ("PREROUTING".into(), "captured".into(), 1),
        ]
    );
    let out = rules(&ok_json(&pod, &["--chain", "ISTIO_REDIRECT"]));
    assert_eq!(
        out,
        vec![
            ("OUTPUT".into(), "captured_include_port".into(), 0),
            ("OUTPUT".into(), "captured".into(), 1),
            ("VM".into(), "captured".into(), 0),
        ]
    );
    // Text: that chain's title and rows, no other chain.
    let (code, text, err) = stats(&pod, &["--chain", "ISTIO_IN_REDIRECT"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        text.contains("Chain ISTIO_IN_REDIRECT (the OUTPUT and PREROUTING rows that send to the inbound port 15006)"),
        "{text}"
    );
    assert!(!text.contains("Chain OUTPUT"), "{text}");
    assert_eq!(
        text.lines().filter(|l| l.contains(" REDIRECT ")).count(),
        2,
        "{text}"
    );
}

/// Each row shows its configured match, as iptables -L -n shows it.
#[test]
fn rows_show_their_configured_match() {
    let pod = Pod::new("stmatch");
    pod.attach(&[
        "-i",
        "10.0.0.0/8,fd00::/8",
        "-x",
        "10.9.0.0/16",
        "-o",
        "22,3306",
        "-q",
        "443",
        "-b",
        "*",
        "-d",
        "15090,15021,15020",
        "-u",
        "1337",
    ]);
    let v = ok_json(&pod, &[]);
    let m = |chain, rule| {
        stats_rule(&v[0], chain, rule)["match"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(
        m("OUTPUT", "skip_excluded_port"),
        "tcp multiport dports 22,3306"
    );
    assert_eq!(m("OUTPUT", "skip_proxy_uid"), "owner UID match 1337");
    assert_eq!(m("OUTPUT", "skip_loopback"), "dst 127.0.0.1,::1");
    assert_eq!(m("OUTPUT", "skip_excluded_cidr"), "dst 10.9.0.0/16");
    assert_eq!(m("OUTPUT", "captured_include_port"), "tcp dpt:443");
    assert_eq!(m("OUTPUT", "captured"), "dst 10.0.0.0/8,fd00::/8");
    assert_eq!(m("PREROUTING", "skip_tunnel_port"), "tcp dpt:15008");
    assert_eq!(
        m("PREROUTING", "skip_excluded_port"),
        "tcp multiport dports 15020,15021,15090"
    );
    let (_, text, _) = stats(&pod, &[]);
    let line = text
        .lines()
        .find(|l| l.contains("excluded CIDR (-x)"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(line.ends_with(" dst 10.9.0.0/16"), "{line:?}");
    assert!(
        text.contains("    conns     bytes target    rule "),
        "{text}"
    );
}

/// A proxy that asks for the original destination on the other family's
/// level first (as proxies that try both do), then on its own. The other
/// level is never answered (by conntrack neither) and is not a miss.
const TRY_BOTH_PROXY: &str = r#"
import json, selectors, socket, struct, sys
SOL_IP, SOL_IPV6, SO_ORIGINAL_DST = 0, 41, 80
def orig(s, level):
    try:
        b = s.getsockopt(level, SO_ORIGINAL_DST, 128)
    except OSError as e:
        return "errno %d" % e.errno
    fam, port = struct.unpack_from("=H", b)[0], struct.unpack_from("!H", b, 2)[0]
    if fam == socket.AF_INET:
        return "%s:%d" % (socket.inet_ntop(socket.AF_INET, b[4:8]), port)
    return "[%s]:%d" % (socket.inet_ntop(socket.AF_INET6, b[8:24]), port)
def listener(fam, addr, v6only):
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if fam == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, v6only)
    s.bind((addr, 15001))
    s.listen(16)
    return s
if sys.argv[1] == "split":
    ls = [listener(socket.AF_INET, "0.0.0.0", 0), listener(socket.AF_INET6, "::", 1)]
else:
    ls = [listener(socket.AF_INET6, "::", 0)]
sel = selectors.DefaultSelector()
for l in ls:
    sel.register(l, selectors.EVENT_READ)
print("ready", flush=True)
while True:
    for key, _ in sel.select():
        c, peer = key.fileobj.accept()
        local = c.getsockname()[0]
        v4 = c.family == socket.AF_INET or local.startswith("::ffff:")
        own, other = (SOL_IP, SOL_IPV6) if v4 else (SOL_IPV6, SOL_IP)
        r = {"family": "v4" if v4 else "v6", "socket": "inet" if c.family == socket.AF_INET else "inet6"}
        r["other"] = orig(c, other)
        r["own"] = orig(c, own)
        print(json.dumps(r), flush=True)
        c.close()
"#;

#[test]
fn missing_does_not_count_the_other_familys_lookup() {
    let mut pod = Pod::new("stmiss");
    pod.start_upstream(8080);
    pod.attach_istio_default();
    let app = pod.topo.in_pod(APP_UID, APP_UID);
    let v6_dst = format!("[{UPSTREAM_V6}]:8080");
    let mut seen = Vec::new();
    for (mode, dsts) in [
        ("split", vec![v4_dst(), v6_dst.clone()]),
        // A dual-stack listener: the IPv4 connection arrives v4-mapped.
        ("dual", vec![v4_dst()]),
    ] {
        let mut cmd = Command::new("/usr/bin/python3");
        cmd.args(["-c", TRY_BOTH_PROXY, mode]);
        let mut proxy = ChildGuard::spawn(
            &format!("try-both proxy ({mode})"),
            cmd,
            &pod.topo.in_pod(PROXY_UID, PROXY_UID),
            true,
        )
        .expect("starting the python proxy");
        for d in &dsts {
            // The proxy closes at once: the app's exchange fails, its
            // connection was made.
            let _ = pod.client(&app, d, None);
        }
        let lines = child_json_lines(&mut proxy, dsts.len(), Duration::from_secs(5));
        assert_eq!(lines.len(), dsts.len(), "{mode}: {lines:?}");
        for (l, d) in lines.iter().zip(&dsts) {
            assert_eq!(l["own"].as_str(), Some(d.as_str()), "{mode}: {l}");
            assert!(
                l["other"].as_str().unwrap().starts_with("errno "),
                "{mode}: the other level answered: {l}"
            );
        }
        seen.extend(lines);
    }
    assert_eq!(
        seen.iter()
            .map(|l| format!(
                "{}/{}",
                l["family"].as_str().unwrap(),
                l["socket"].as_str().unwrap()
            ))
            .collect::<Vec<_>>(),
        vec!["v4/inet", "v6/inet6", "v4/inet6"]
    );
    assert_eq!(pod.counter("ORIGINAL_DST", "orig_dst_outbound"), 3);
    assert_eq!(
        pod.counter("ORIGINAL_DST", "orig_dst_missing"),
        0,
        "a lookup on the other family's level counted as a miss"
    );
}

// ------------------------------------------------------------- --watch

/// Bytes read from a fd by a thread, shared.
fn collect(fd: OwnedFd) -> Arc<Mutex<Vec<u8>>> {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let b = buf.clone();
    std::thread::spawn(move || {
        let mut f = std::fs::File::from(fd);
        let mut chunk = [0u8; 4096];
        // A pty master reads EIO once the child's side is closed.
        while let Ok(n) = f.read(&mut chunk) {
            if n == 0 {
                break;
            }
            b.lock().unwrap().extend_from_slice(&chunk[..n]);
        }
    });
    buf
}

fn text(buf: &Arc<Mutex<Vec<u8>>>) -> String {
    String::from_utf8_lossy(&buf.lock().unwrap()).into_owned()
}

fn wait_for(buf: &Arc<Mutex<Vec<u8>>>, what: &str, secs: u64) -> String {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let t = text(buf);
        if t.contains(what) {
            return t;
        }
        assert!(
            Instant::now() < deadline,
            "no {what:?} after {secs}s in {t:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// SIGINT (Ctrl-C) by PID; the watch must end by itself, successfully.
fn interrupt(child: &mut std::process::Child) -> std::process::ExitStatus {
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("--watch still running 5 s after SIGINT");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// On a terminal (a pty here): the alternate screen, redraws in place,
/// what changed since the last draw in reverse video, and the terminal
/// given back at Ctrl-C.
#[test]
fn watch_redraws_in_place_highlights_changes_and_restores_the_terminal() {
    let pod = captured_pod("stwt");
    assert_ok(&pod.app_client(&v4_dst()), "app");
    let (mut master, mut slave) = (0, 0);
    let ws = libc::winsize {
        ws_row: 60,
        ws_col: 250,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let r = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &ws,
        )
    };
    assert_eq!(r, 0, "openpty: {}", std::io::Error::last_os_error());
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    let mut child = Command::new(redirect_bin())
        .arg("--pin-dir")
        .arg(&pod.pin_dir)
        .args([
            "stats",
            "--watch",
            "0.3",
            "--netns",
            &ns(&pod),
            "--chain",
            "OUTPUT",
        ])
        .stdin(Stdio::from(slave.try_clone().unwrap()))
        .stdout(Stdio::from(slave.try_clone().unwrap()))
        .stderr(Stdio::from(slave))
        .spawn()
        .expect("running redirect stats --watch");
    let out = collect(master);
    let header = format!(
        "Every 0.3s: redirect stats --chain OUTPUT --netns {}",
        ns(&pod)
    );
    // The first frame, then a connection: a later frame lights up the
    // captured row's count (1 -> 2), and only rows that moved.
    wait_for(&out, &header, 10);
    assert_ok(&pod.app_client(&v4_dst()), "app");
    let t = wait_for(&out, "\x1b[7m2\x1b[27m", 10);
    let frame = t
        .split("\x1b[H")
        .find(|f| f.contains("\x1b[7m2\x1b[27m"))
        .unwrap()
        .to_string();
    let lit: Vec<&str> = frame.lines().filter(|l| l.contains("\x1b[7m")).collect();
    assert!(
        lit.iter().any(|l| l.contains("\x1b[7m2\x1b[27m") && l.contains("captured -> outbound port (-i)")),
        "{lit:?}"
    );
    // The app's connection and the proxy's own upstream one: nothing else.
    for l in &lit {
        assert!(
            l.contains("captured -> outbound port (-i)") || l.contains("proxy uid (rule 4)"),
            "a row that did not move is lit: {l:?}"
        );
    }
    // Highlights are since the last draw: quiet frames light nothing.
    std::thread::sleep(Duration::from_millis(1500));
    let quiet = text(&out);
    let last = quiet.rsplit("\x1b[H").next().unwrap();
    assert!(last.contains(&header), "{last:?}");
    assert!(!last.contains("\x1b[7m"), "{last:?}");
    let st = interrupt(&mut child);
    assert!(st.success(), "{st:?}");
    std::thread::sleep(Duration::from_millis(200));
    let all = text(&out);
    assert!(all.starts_with("\x1b[?1049h\x1b[?25l"), "{all:?}");
    assert!(
        all.ends_with("\x1b[?25h\x1b[?1049l"),
        "terminal not restored: {:?}",
        &all[all.len().saturating_sub(200)..]
    );
    // Redrawn in place: each frame starts at the top.
    assert!(all.matches("\x1b[H").count() >= 3, "{all:?}");
}

/// Not a terminal: frames one after the other, no escape sequences;
/// SIGINT ends it cleanly.
#[test]
fn watch_without_a_terminal_prints_plain_frames() {
    let pod = captured_pod("stwp");
    let mut child = Command::new(redirect_bin())
        .arg("--pin-dir")
        .arg(&pod.pin_dir)
        .args(["stats", "--watch", "0.2", "--chain", "ISTIO_REDIRECT"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running redirect stats --watch");
    let out = collect(child.stdout.take().unwrap().into());
    wait_for(
        &out,
        "Every 0.2s: redirect stats --chain ISTIO_REDIRECT",
        10,
    );
    assert_ok(&pod.app_client(&v4_dst()), "app");
    // A frame after the connection shows it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !text(&out)
        .lines()
        .any(|l| l.trim_start().starts_with("1 ") && l.contains("captured -> outbound port (-i)"))
    {
        assert!(Instant::now() < deadline, "{}", text(&out));
        std::thread::sleep(Duration::from_millis(20));
    }
    let st = interrupt(&mut child);
    assert!(st.success(), "{st:?}");
    let all = text(&out);
    assert!(!all.contains('\x1b'), "{all:?}");
    assert!(all.matches("Every 0.2s: ").count() >= 2, "{all}");
    assert!(all.contains("Chain ISTIO_REDIRECT"), "{all}");
}
