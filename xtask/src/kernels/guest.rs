//! What runs inside a guest: the test selection, the script the guest runs,
//! and reading its results back from the shared folder.
//!
//! The guest sees the host's root read-only (9p). Executing from 9p is slow
//! (every exec pages the binary in over the transport), so the host puts
//! stripped copies of the test binaries and of `redirect`, `redirect-kit`
//! and `redirect-cni` into one folder, which the guest copies into its RAM
//! (`/tmp` is an in-memory overlay there) and runs from.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
};

use anyhow::{bail, Result};

/// The tests the guests run by default (`cargo xtask kernels` and CI):
/// `<test file>` for all of a file's tests, `<test file>::<test>` for one.
/// Chosen to cover every hook on each kernel inside CI's time: under QEMU's
/// TCG a test that attaches costs 10-40 s (the verifier and the
/// acceleration probe run emulated), so a handful per area.
pub const DEFAULT_SELECTION: &[&str] = &[
    // The rule table: capture of both families with getpeername, CIDR
    // and port exclusions, the proxy's uid and gid.
    "outbound_basic",
    "outbound_rules::include_all_captures_v4_v6_and_getpeername_shows_original",
    "outbound_rules::exclude_cidr_goes_direct_even_for_include_port",
    "outbound_rules::proxy_uid_outbound_is_untouched",
    "outbound_rules::gid_only_proxy_identity_rules_5_6_7",
    // Inbound through sk_lookup, the original addresses the proxy sees,
    // and `redirect validate`.
    "inbound::inbound_reaches_app_through_proxy_v4_v6",
    "inbound::proxy_socket_keeps_original_addresses",
    "inbound::include_list_captures_only_listed_ports",
    "inbound::validate_passes_before_the_proxy_starts",
    "inbound::validate_fails_with_a_clear_reason",
    // The CLI lifecycle: attach, status/stats, detach, uninstall.
    "cli::status_and_stats_list_the_captured_pod",
    "cli::detach_restores_direct_connections_and_twice_is_an_error",
    "cli::uninstall_leaves_nothing_and_connections_go_direct",
    // The node agent with its CNI plugin, and the plugin's own checks.
    "agent::daemon_installs_the_plugin_and_its_conflist_entry",
    "agent::cni_add_captures_and_del_releases",
    "agent::pods_whose_netns_is_gone_are_released",
    "cni",
    // Other getsockopt calls of a captured pod, whatever their size,
    // are left alone (iptables-legacy's table dumps).
    "getsockopt",
    // DNS capture: UDP (sendmsg/recvmsg), connected UDP and TCP.
    "dns::captured_dns_is_answered_by_the_proxy_as_from_the_nameserver",
    // The ways for kernels without a feature (what 5.10 runs), on every
    // kernel.
    "old_kernels",
];

/// Test files the guests can run: the privileged end-to-end tests that
/// need nothing but the kernel, the host's tools (iproute2, iptables,
/// dnsmasq, dig) and the project's binaries (not podman, the Kubernetes
/// API fakes or the benchmark).
pub const GUEST_TEST_FILES: &[&str] = &[
    "outbound_basic",
    "outbound_rules",
    "inbound",
    "cli",
    "agent",
    "cni",
    "accel",
    "accel_probe",
    "accel_stress",
    "map_pressure",
    "reliability",
    "security",
    "churn",
    "getsockopt",
    "dns",
    "old_kernels",
    "kernel_log",
];

/// One test binary to run in the guest and the exact test names (all of
/// the file's tests when empty).
#[derive(Debug, PartialEq)]
pub struct TestRun {
    pub file: String,
    pub tests: Vec<String>,
}

/// Parses selections (`file`, `file::test`, `default`, `all`) into one run
/// per file, in order of first mention.
pub fn parse_selection(selections: &[String]) -> Result<Vec<TestRun>> {
    let mut runs: Vec<TestRun> = Vec::new();
    let mut whole: Vec<String> = Vec::new();
    let expanded: Vec<String> = selections
        .iter()
        .flat_map(|s| s.split(',').map(str::trim).filter(|s| !s.is_empty()))
        .flat_map(|s| match s {
            "default" => DEFAULT_SELECTION.iter().map(|s| s.to_string()).collect(),
            "all" => GUEST_TEST_FILES.iter().map(|s| s.to_string()).collect(),
            s => vec![s.to_string()],
        })
        .collect();
    if expanded.is_empty() {
        bail!("--tests: no test selected");
    }
    for sel in expanded {
        let (file, test) = match sel.split_once("::") {
            Some((f, t)) => (f, Some(t)),
            None => (sel.as_str(), None),
        };
        if !GUEST_TEST_FILES.contains(&file) {
            bail!(
                "--tests {sel:?}: {file:?} is not a test file the guests can run; choose from {}",
                GUEST_TEST_FILES.join(", ")
            );
        }
        if test.is_some_and(str::is_empty) {
            bail!("--tests {sel:?}: the test name after `::` is empty");
        }
        let i = match runs.iter().position(|r| r.file == file) {
            Some(i) => i,
            None => {
                runs.push(TestRun {
                    file: file.into(),
                    tests: Vec::new(),
                });
                runs.len() - 1
            }
        };
        match test {
            None => {
                whole.push(file.into());
                runs[i].tests.clear();
            }
            Some(t) if !whole.iter().any(|w| w == file) => {
                if !runs[i].tests.iter().any(|x| x == t) {
                    runs[i].tests.push(t.into());
                }
            }
            Some(_) => {}
        }
    }
    Ok(runs)
}

/// Where the guest finds things, and how long each test binary may run.
pub struct ScriptPlan<'a> {
    /// The shared read-write folder (same path in the guest).
    pub out: &'a Path,
    /// Host folder with the stripped binaries.
    pub bin: &'a Path,
    /// Working directory of the tests (the tests crate, as under cargo).
    pub cwd: &'a Path,
    pub runs: &'a [TestRun],
    pub threads: usize,
    pub test_timeout_secs: u64,
}

/// Guest folder (in RAM) the binaries are copied to.
const GUEST_BIN: &str = "/tmp/redirect-kernels-bin";
/// Names of the acceleration probe's pod (netns, cgroup, pin dir).
const PROBE_POD: &str = "redirect-kernels-probe";

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn q(p: &Path) -> String {
    quote(&p.to_string_lossy())
}

/// The script the guest runs (as root, from `vng --exec`). Everything it
/// reports goes to files in `plan.out`; the host reads them after the VM
/// has stopped:
///
/// * `booted`: the kernel is up and the script started;
/// * `uname`, `guest.log` (the script's own output), `dmesg.txt`;
/// * `probe.json`/`probe.err`/`probe.rc`: `redirect attach --json` of a
///   fresh install (its load errors, or the acceleration probe's verdict);
/// * `features.json`: `bpftool feature probe kernel -j`;
/// * `<file>.log`/`<file>.rc` per test binary (`<exit code> <seconds>`);
/// * `done`: the script finished.
pub fn script(plan: &ScriptPlan) -> String {
    let out = q(plan.out);
    let mut s = String::new();
    let _ = writeln!(
        s,
        "#!/bin/bash
# Written by `cargo xtask kernels`; runs as root inside the guest.
set -u
out={out}
exec >\"$out/guest.log\" 2>&1
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export RUST_BACKTRACE=1
uname -r >\"$out/uname\"
mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
mkdir -p /run/netns
modprobe veth || echo 'modprobe veth failed: the tests need veth'
bin={guest_bin}
rm -rf \"$bin\" && cp -r {host_bin} \"$bin\"
export REDIRECT_BIN_DIR=\"$bin\"
cgroup=$(awk '$3 == \"cgroup2\" {{print $2; exit}}' /proc/mounts)
touch \"$out/booted\"

# The programs load (or not) and the acceleration probe runs on a fresh
# install, in a namespace and child cgroup of its own (what each of its
# checks saw is logged at info).
probe={probe}
ip netns add \"$probe\" && mkdir -p \"$cgroup/$probe\"
RUST_LOG=redirect_userspace::probe=info \"$bin/redirect\" --pin-dir \"/sys/fs/bpf/$probe\" attach --netns \"/run/netns/$probe\" \\
    --cgroup \"$cgroup/$probe\" --json >\"$out/probe.json\" 2>\"$out/probe.err\"
echo $? >\"$out/probe.rc\"
\"$bin/redirect\" --pin-dir \"/sys/fs/bpf/$probe\" uninstall || true
ip netns del \"$probe\"; rmdir \"$cgroup/$probe\"
bpftool feature probe kernel -j >\"$out/features.json\" 2>\"$out/features.err\"

cd {cwd}
run() {{
    local name=$1 start=$(date +%s)
    shift
    timeout -k 10 {timeout} \"$bin/$name\" --test-threads={threads} \"$@\" >\"$out/$name.log\" 2>&1
    echo \"$? $(( $(date +%s) - start ))\" >\"$out/$name.rc\"
}}",
        guest_bin = GUEST_BIN,
        host_bin = q(plan.bin),
        probe = PROBE_POD,
        cwd = q(plan.cwd),
        timeout = plan.test_timeout_secs,
        threads = plan.threads,
    );
    for run in plan.runs {
        let mut line = format!("run {}", quote(&run.file));
        if !run.tests.is_empty() {
            line.push_str(" --exact");
            for t in &run.tests {
                line.push(' ');
                line.push_str(&quote(t));
            }
        }
        let _ = writeln!(s, "{line}");
    }
    let _ = writeln!(s, "dmesg >\"$out/dmesg.txt\"\ntouch \"$out/done\"");
    s
}

/// The result of one test binary in a guest.
#[derive(Debug, Default, PartialEq)]
pub struct FileResult {
    pub passed: Vec<String>,
    pub failed: Vec<String>,
    pub ignored: Vec<String>,
    /// The binary's exit code and run time, if it finished.
    pub exit: Option<(i32, u64)>,
    /// Why the binary counts as failed beyond its failed tests (a timeout,
    /// a crash, no result line).
    pub problem: Option<String>,
}

impl FileResult {
    /// Counted failures: failed tests, plus one for a binary that broke
    /// without naming a failed test.
    pub fn failures(&self) -> usize {
        self.failed.len() + usize::from(self.problem.is_some() && self.failed.is_empty())
    }
}

/// Reads `<file>.log`/`<file>.rc` from the guest's output folder.
pub fn read_result(out: &Path, file: &str, timeout_secs: u64) -> FileResult {
    let log = fs::read_to_string(out.join(format!("{file}.log"))).unwrap_or_default();
    let rc = fs::read_to_string(out.join(format!("{file}.rc"))).ok();
    parse_result(&log, rc.as_deref(), timeout_secs)
}

fn parse_result(log: &str, rc: Option<&str>, timeout_secs: u64) -> FileResult {
    let mut r = FileResult::default();
    let mut summary = false;
    for line in log.lines() {
        if line.starts_with("test result: ") {
            summary = true;
        }
        let Some(rest) = line.strip_prefix("test ") else {
            continue;
        };
        let Some((name, verdict)) = rest.split_once(" ... ") else {
            continue;
        };
        let name = name.to_string();
        match verdict.trim() {
            "ok" => r.passed.push(name),
            "FAILED" => r.failed.push(name),
            v if v.starts_with("ignored") => r.ignored.push(name),
            _ => {}
        }
    }
    r.exit = rc.and_then(|rc| {
        let mut w = rc.split_whitespace();
        Some((w.next()?.parse().ok()?, w.next()?.parse().ok()?))
    });
    let running: Vec<&str> = log
        .lines()
        .filter_map(|l| {
            l.strip_prefix("test ")?
                .strip_suffix(" has been running for over 60 seconds")
        })
        .filter(|name| !r.passed.iter().chain(&r.failed).any(|n| n == name))
        .collect();
    r.problem = match r.exit {
        None => Some("did not finish (the guest stopped or timed out first)".into()),
        Some((124 | 137, _)) => Some(format!(
            "timed out after {timeout_secs} s{}",
            if running.is_empty() {
                String::new()
            } else {
                format!(" (still running: {})", running.join(", "))
            }
        )),
        Some((0, _)) if !summary => Some("exited 0 without a `test result:` line".into()),
        Some((0, _)) => None,
        Some((code, _)) if r.failed.is_empty() => {
            Some(format!("exited with code {code} and no failed test named"))
        }
        Some(_) => None,
    };
    r
}

/// Tallies over test binaries.
#[derive(Debug, Default, PartialEq, Clone, Copy)]
pub struct Tally {
    pub passed: usize,
    pub failed: usize,
    pub skipped: usize,
}

impl Tally {
    pub fn add(&mut self, r: &FileResult) {
        self.passed += r.passed.len();
        self.failed += r.failures();
        self.skipped += r.ignored.len();
    }

    pub fn line(&self, label: &str) -> String {
        format!(
            "{label}: {} passed, {} failed, {} skipped",
            self.passed, self.failed, self.skipped
        )
    }
}

/// The acceleration probe's outcome on one kernel, from `probe.*`.
#[derive(Debug, PartialEq)]
pub enum ProbeOutcome {
    /// `redirect attach` failed: the programs did not load or attach.
    AttachFailed(String),
    /// The decision (`on (kernel probe passed)`, `off: kernel probe failed
    /// on ... checks: ...`) and what each failed check saw.
    Decided {
        decision: String,
        checks: BTreeMap<String, String>,
    },
    /// No output: the guest did not get that far.
    Missing,
}

pub fn read_probe(out: &Path) -> ProbeOutcome {
    let rc = fs::read_to_string(out.join("probe.rc")).ok();
    let err = fs::read_to_string(out.join("probe.err")).unwrap_or_default();
    let json = fs::read_to_string(out.join("probe.json")).unwrap_or_default();
    parse_probe(rc.as_deref(), &json, &err)
}

fn parse_probe(rc: Option<&str>, json: &str, err: &str) -> ProbeOutcome {
    let Some(rc) = rc else {
        return ProbeOutcome::Missing;
    };
    if rc.trim() != "0" {
        return ProbeOutcome::AttachFailed(attach_error(err));
    }
    let decision = serde_json::from_str::<serde_json::Value>(json)
        .ok()
        .and_then(|v| v["pod"]["accel_decision"].as_str().map(String::from))
        .unwrap_or_else(|| "attach printed no accel_decision".into());
    // `INFO redirect_userspace::probe: acceleration kernel probe: <what> check=<name>`
    let checks = err
        .lines()
        .filter_map(|l| {
            let (before, name) = l.rsplit_once(" check=")?;
            let what = before.split_once("acceleration kernel probe: ")?.1;
            Some((name.trim().to_string(), what.trim().to_string()))
        })
        .collect();
    ProbeOutcome::Decided { decision, checks }
}

/// `redirect attach`'s error in one line: the message, and for a verifier
/// rejection the verifier's verdict (its last line before the statistics).
fn attach_error(err: &str) -> String {
    let Some(at) = err.lines().position(|l| l.contains("error: ")) else {
        return err.trim().to_string();
    };
    let lines: Vec<&str> = err.lines().collect();
    let line = lines[at];
    let message = line[line.find("error: ").unwrap_or(0) + "error: ".len()..].trim();
    let (message, verifier) = match message.split_once(" Verifier output:") {
        Some((m, _)) => {
            let stats = ["verification time", "stack depth", "processed ", ":"];
            let last = lines[at + 1..]
                .iter()
                .map(|l| l.trim())
                .rfind(|l| !l.is_empty() && !stats.iter().any(|s| l.starts_with(s)));
            (m, last)
        }
        None => (message, None),
    };
    match verifier {
        Some(v) => format!("{message} Verifier: {v}"),
        None => message.to_string(),
    }
}

/// Stripped copies of `binaries` (host paths) in `dir`, under their names.
pub fn stage_binaries(dir: &Path, binaries: &[(String, PathBuf)]) -> Result<()> {
    use anyhow::Context;
    let _ = fs::remove_dir_all(dir);
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let strip = crate::cmd::find_executable("strip");
    for (name, path) in binaries {
        let dest = dir.join(name);
        let stripped = strip.as_ref().is_some_and(|strip| {
            std::process::Command::new(strip)
                .arg("-o")
                .arg(&dest)
                .arg(path)
                .status()
                .is_ok_and(|s| s.success())
        });
        if !stripped {
            fs::copy(path, &dest)
                .with_context(|| format!("cannot copy {} to {}", path.display(), dest.display()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sel(s: &[&str]) -> Result<Vec<TestRun>> {
        parse_selection(&s.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn selections_group_by_file() {
        let runs = sel(&["cli::a,inbound", "cli::b", "cli::a"]).unwrap();
        assert_eq!(
            runs,
            [
                TestRun {
                    file: "cli".into(),
                    tests: vec!["a".into(), "b".into()]
                },
                TestRun {
                    file: "inbound".into(),
                    tests: vec![]
                }
            ]
        );
        // A whole file wins over single tests of it, in either order.
        assert!(sel(&["cli::a", "cli"]).unwrap()[0].tests.is_empty());
        assert!(sel(&["cli", "cli::a"]).unwrap()[0].tests.is_empty());
        assert_eq!(sel(&["all"]).unwrap().len(), GUEST_TEST_FILES.len());
        assert!(!sel(&["default"]).unwrap().is_empty());
    }

    #[test]
    fn bad_selections_name_the_value() {
        let e = sel(&["podman"]).unwrap_err().to_string();
        assert!(
            e.contains("\"podman\"") && e.contains("outbound_rules"),
            "{e}"
        );
        let e = sel(&["cli::"]).unwrap_err().to_string();
        assert!(e.contains("empty"), "{e}");
        assert!(sel(&[" , "]).is_err());
    }

    #[test]
    fn default_selection_names_guest_files() {
        for s in DEFAULT_SELECTION {
            let file = s.split("::").next().unwrap();
            assert!(GUEST_TEST_FILES.contains(&file), "{s}");
        }
    }

    #[test]
    fn script_runs_each_file_with_its_tests() {
        let runs = sel(&["cli::it's", "inbound"]).unwrap();
        let s = script(&ScriptPlan {
            out: Path::new("/w/run"),
            bin: Path::new("/w/bin"),
            cwd: Path::new("/w/tests"),
            runs: &runs,
            threads: 2,
            test_timeout_secs: 600,
        });
        assert!(s.contains("run 'cli' --exact 'it'\\''s'\n"), "{s}");
        assert!(s.contains("run 'inbound'\n"), "{s}");
        assert!(s.contains("timeout -k 10 600 "), "{s}");
        assert!(s.contains("--test-threads=2"), "{s}");
        assert!(s.starts_with("#!/bin/bash\n"));
        assert!(s.trim_end().ends_with("touch \"$out/done\""));
    }

    #[test]
    fn results_count_tests_and_broken_binaries() {
        let log = "running 3 tests\ntest a ... ok\ntest b ... FAILED\ntest c ... ignored, slow\n\
                   test result: FAILED. 1 passed; 1 failed; 1 ignored\n";
        let r = parse_result(log, Some("101 12\n"), 600);
        assert_eq!((r.passed.len(), r.failed.len(), r.ignored.len()), (1, 1, 1));
        assert_eq!(r.failures(), 1);
        assert_eq!(r.problem, None);

        let hung = "test a ... ok\ntest b has been running for over 60 seconds\n";
        let r = parse_result(hung, Some("124 600"), 600);
        assert_eq!(r.failures(), 1);
        assert_eq!(
            r.problem.as_deref(),
            Some("timed out after 600 s (still running: b)")
        );

        let r = parse_result("", None, 600);
        assert_eq!(r.failures(), 1);
        assert!(r.problem.unwrap().contains("did not finish"));

        let r = parse_result("running 0 tests\n", Some("0 1"), 600);
        assert!(r.problem.unwrap().contains("without a `test result:` line"));

        let mut t = Tally::default();
        t.add(&parse_result(log, Some("101 12"), 600));
        t.add(&parse_result(hung, Some("124 600"), 600));
        assert_eq!(t.line("6.1"), "6.1: 2 passed, 2 failed, 1 skipped");
    }

    #[test]
    fn probe_outcomes() {
        let err =
            "2026-12-04T20:57:31Z  WARN redirect_userspace::probe: acceleration kernel probe: \
                   the peer saw EOF instead of ECONNRESET check=rst-on-unread-close\n";
        let json = r#"{"pod":{"accel_decision":"off: kernel probe failed"}}"#;
        match parse_probe(Some("0\n"), json, err) {
            ProbeOutcome::Decided { decision, checks } => {
                assert_eq!(decision, "off: kernel probe failed");
                assert_eq!(
                    checks.get("rst-on-unread-close").map(String::as_str),
                    Some("the peer saw EOF instead of ECONNRESET")
                );
            }
            other => panic!("{other:?}"),
        }
        let err = "redirect: warning: no -b given\nredirect: error: loading program redirect_getsockopt \
                   (cgroup /c): the BPF_PROG_LOAD syscall returned Invalid argument (os error 22). \
                   Verifier output: ; #[cgroup_sockopt(getsockopt)]\n0: (bf) r6 = r1\n\
                   7: (85) call bpf_get_netns_cookie#122\nunknown func bpf_get_netns_cookie#122\n\
                   verification time 708 usec\nstack depth 0\nprocessed 8 insns\n: Invalid argument (os error 22)\n";
        assert_eq!(
            parse_probe(Some("1"), "", err),
            ProbeOutcome::AttachFailed(
                "loading program redirect_getsockopt (cgroup /c): the BPF_PROG_LOAD syscall returned \
                 Invalid argument (os error 22). Verifier: unknown func bpf_get_netns_cookie#122"
                    .into()
            )
        );
        assert_eq!(
            parse_probe(Some("1"), "", "redirect: error: no such netns\n"),
            ProbeOutcome::AttachFailed("no such netns".into())
        );
        assert_eq!(parse_probe(None, "", ""), ProbeOutcome::Missing);
    }
}
