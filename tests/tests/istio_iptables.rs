//! `redirect istio-iptables`: the args and environment of Istio's injected
//! init container, verbatim (fixtures in tests/fixtures/istio-init/, written
//! from the injection template's logic), through the real binary:
//! - every fixture's dry run (`-n --json`) gives the expected pod config;
//! - the supported ones capture a test pod for real (a connection from the
//!   app reaches the proxy), also under the name `istio-iptables` (symlink);
//! - the CNI-mode validation container validates and writes nothing;
//! - the refused ones attach nothing and name the flag;
//! - every row of the flag table (each flag, letter and variable) has a
//!   case with its effect, the command line wins over the environment, and
//!   a bad value names the flag (or variable) and attaches nothing.
//!
//! Every test has its own pod netns, upstream netns, cgroup and pin dir;
//! all traffic stays inside namespaces the test created.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use redirect_testbed::{kit::ClientReport, sandbox::unique};
use redirect_tests::*;
use redirect_userspace::config::{
    table::{Kind, Scope},
    Flag, FlagDef, TABLE,
};
use serde_json::{json, Value};

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

    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {self:#?}"))
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `<bin> [--pin-dir <pod's>] <args>` with exactly `env` (and PATH) as its
/// environment.
fn run_with_env(bin: &Path, pod: &Pod, args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut cmd = Command::new(bin);
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .arg("--pin-dir")
        .arg(&pod.pin_dir)
        .args(args)
        .envs(env.iter().copied());
    Run::of(cmd.output().expect("running redirect"))
}

fn istio_iptables(pod: &Pod, args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut a = vec!["istio-iptables"];
    a.extend_from_slice(args);
    run_with_env(&redirect_bin(), pod, &a, env)
}

/// `--netns <pod> --cgroup <pod's>`.
fn target(pod: &Pod) -> Vec<String> {
    vec![
        "--netns".into(),
        s(&pod.pod_netns()).into(),
        "--cgroup".into(),
        s(&pod.topo.cgroup.path).into(),
    ]
}

/// Nothing of ours exists: no pin dir.
fn assert_untouched(pod: &Pod, what: &str) {
    assert!(
        !pod.pin_dir.exists(),
        "{what}: pin dir {} was created",
        pod.pin_dir.display()
    );
}

// ---------------------------------------------------------------- fixtures

struct Fixture {
    name: String,
    args: Vec<String>,
    env: BTreeMap<String, String>,
    expect: Value,
    live: bool,
}

impl Fixture {
    /// The args after the word `istio-iptables`.
    fn args(&self) -> Vec<&str> {
        assert_eq!(self.args[0], "istio-iptables", "{}", self.name);
        self.args[1..].iter().map(String::as_str).collect()
    }

    fn env(&self) -> Vec<(&str, &str)> {
        self.env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect()
    }
}

fn fixtures() -> Vec<Fixture> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/istio-init");
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    paths.sort();
    paths
        .iter()
        .map(|p| {
            let v: Value = serde_json::from_str(&std::fs::read_to_string(p).unwrap())
                .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            Fixture {
                name: v["name"].as_str().unwrap().into(),
                args: serde_json::from_value(v["args"].clone()).unwrap(),
                env: serde_json::from_value(v["env"].clone()).unwrap(),
                expect: v["expect"].clone(),
                live: v["live"].as_bool().unwrap(),
            }
        })
        .collect()
}

fn fixture(name: &str) -> Fixture {
    fixtures()
        .into_iter()
        .find(|f| f.name == name)
        .unwrap_or_else(|| panic!("no fixture {name}"))
}

/// Every field of `want` (an object) is in `have` with that value.
fn assert_subset(have: &Value, want: &Value, what: &str) {
    for (k, v) in want.as_object().unwrap() {
        assert_eq!(&have[k], v, "{what}: config.{k} in {have:#}");
    }
}

#[test]
fn fixtures_dry_run_to_the_expected_pod_config() {
    let pod = Pod::new("iidry");
    let fx = fixtures();
    assert!(fx.len() >= 9, "fixtures missing: {}", fx.len());
    for f in &fx {
        let t = target(&pod);
        let mut args = f.args();
        args.extend(t.iter().map(String::as_str));
        args.extend(["-n", "--json"]);
        let r = istio_iptables(&pod, &args, &f.env());
        let e = &f.expect;
        if let Some(err) = e["error"].as_str() {
            assert_eq!(r.code, Some(1), "{}: {r:#?}", f.name);
            assert!(r.stderr.contains(err), "{}: {r:#?}", f.name);
            assert_untouched(&pod, &f.name);
            continue;
        }
        let j = r.json();
        assert_eq!(j["dry_run"], true, "{}", f.name);
        assert_eq!(
            j["istio_iptables_args"], e["istio_iptables_args"],
            "{}: {j:#}",
            f.name
        );
        assert_subset(&j["config"], &e["config"], &f.name);
        let mut ignored: Vec<String> = j["ignored"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["flag"].as_str().unwrap().to_string())
            .collect();
        let mut want: Vec<String> = serde_json::from_value(e["ignored"].clone()).unwrap();
        ignored.sort();
        want.sort();
        assert_eq!(ignored, want, "{}: ignored flags", f.name);
        assert_eq!(j["skip_rule_apply"], e["skip_rule_apply"], "{}", f.name);
        assert_eq!(j["run_validation"], e["run_validation"], "{}", f.name);
        let refused = j["refused"].as_array().unwrap();
        match e["refused"].as_str() {
            None => {
                assert_eq!(r.code, Some(0), "{}: {r:#?}", f.name);
                assert!(refused.is_empty(), "{}: {refused:?}", f.name);
            }
            Some(why) => {
                assert_eq!(
                    r.code,
                    Some(1),
                    "{}: a dry run fails where the real run would: {r:#?}",
                    f.name
                );
                assert!(
                    refused.iter().any(|x| x.as_str().unwrap().contains(why)),
                    "{}: {refused:?}",
                    f.name
                );
                assert!(r.stderr.contains(why), "{}: {r:#?}", f.name);
            }
        }
        assert_untouched(&pod, &f.name);
    }
}

/// The app's connection went through the proxy: getpeername shows what it
/// dialed, its socket has the pod's source address (as under iptables),
/// and the server saw another socket (the proxy's).
fn assert_captured(r: &ClientReport, dst: &str, what: &str) {
    assert_ok(r, what);
    assert_eq!(r.peer.as_deref(), Some(dst), "{what}: {r:?}");
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

fn assert_direct(r: &ClientReport, dst: &str, what: &str) {
    assert_ok(r, what);
    assert_eq!(r.peer.as_deref(), Some(dst), "{what}: {r:?}");
    let local = r.local.clone().unwrap_or_default();
    assert_eq!(
        r.banner.as_deref(),
        Some(format!("peer={local} local={dst}").as_str()),
        "{what}: the server must see the app's own socket: {r:?}"
    );
}

fn proxy_origs(pod: &mut Pod, idx: usize) -> Vec<String> {
    pod.proxy_log(idx)
        .iter()
        .filter(|l| l["event"] == "conn")
        .map(|l| l["orig"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[test]
fn live_fixtures_capture_the_pod() {
    let live: Vec<Fixture> = fixtures().into_iter().filter(|f| f.live).collect();
    assert!(live.len() >= 5, "live fixtures missing");
    for f in &live {
        let mut pod = Pod::new("iilive");
        pod.start_upstream(8080);
        pod.start_upstream(8081);
        let proxy = pod.start_proxy();
        let t = target(&pod);
        let mut args = f.args();
        args.extend(t.iter().map(String::as_str));
        let r = istio_iptables(&pod, &args, &f.env());
        assert_eq!(r.code, Some(0), "{}: {r:#?}", f.name);
        assert!(
            r.stdout.contains(&format!(
                "istio-iptables {}",
                f.expect["istio_iptables_args"].as_str().unwrap()
            )),
            "{}: {r:#?}",
            f.name
        );
        let v4 = format!("{UPSTREAM_V4}:8080");
        let v6 = format!("[{UPSTREAM_V6}]:8080");
        assert_captured(&pod.app_client(&v4), &v4, &f.name);
        // The pod's first address is IPv4 and the injector passes no
        // --dual-stack: istio-iptables writes no ip6tables rules, IPv6
        // goes direct.
        assert_direct(&pod.app_client(&v6), &v6, &f.name);
        assert_eq!(
            pod.counter("OUTPUT", "skip_ipv6_not_captured"),
            1,
            "{}",
            f.name
        );
        let mut want = vec![v4.clone()];
        if f.name == "outbound-ports" {
            // -i does not include the upstream: 8080 is captured by -q,
            // 8081 (in -o, and not in -q) goes direct.
            let d = format!("{UPSTREAM_V4}:8081");
            assert_direct(&pod.app_client(&d), &d, &f.name);
            assert_eq!(pod.counter("OUTPUT", "captured_include_port"), 1);
            assert_eq!(pod.counter("OUTPUT", "skip_excluded_port"), 1);
        } else {
            assert_eq!(pod.counter("OUTPUT", "captured"), 1, "{}", f.name);
        }
        want.sort();
        let mut got = proxy_origs(&mut pod, proxy);
        got.sort();
        assert_eq!(got, want, "{}: the proxy's connections", f.name);
        let st = Run::of(pod.redirect(&["status", "--json"])).json();
        let shown = st["pods"][0]["istio_iptables_args"].as_str().unwrap();
        assert_eq!(
            shown,
            f.expect["istio_iptables_args"].as_str().unwrap(),
            "{}: status shows the config the kernel holds",
            f.name
        );
    }
}

/// Removes a directory of ours on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn invoked_as_istio_iptables_it_is_istio_iptables() {
    let mut pod = Pod::new("iilink");
    pod.start_upstream(8080);
    let proxy = pod.start_proxy();
    let dir = TempDir(std::env::temp_dir().join(unique("rdt-istio-iptables-")));
    std::fs::create_dir_all(&dir.0).unwrap();
    let link = dir.0.join("istio-iptables");
    std::os::unix::fs::symlink(redirect_bin(), &link).unwrap();
    let f = fixture("default");
    let t = target(&pod);
    let mut args = f.args();
    args.extend(t.iter().map(String::as_str));
    // ISTIO_DUAL_STACK, as istio-iptables reads it: IPv6 captured too.
    let r = run_with_env(&link, &pod, &args, &[("ISTIO_DUAL_STACK", "true")]);
    assert_eq!(r.code, Some(0), "{r:#?}");
    assert!(
        r.stdout.contains("--dual-stack") && r.stdout.contains("IPv6: captured (--dual-stack"),
        "{r:#?}"
    );
    let v4 = format!("{UPSTREAM_V4}:8080");
    let v6 = format!("[{UPSTREAM_V6}]:8080");
    assert_captured(&pod.app_client(&v4), &v4, "via the symlink");
    assert_captured(&pod.app_client(&v6), &v6, "via the symlink");
    assert_eq!(proxy_origs(&mut pod, proxy), vec![v4, v6]);
    // Its help is istio-iptables' flags.
    let h = run_with_env(&link, &pod, &["--help"], &[]);
    assert!(
        h.stdout.contains("--istio-service-cidr") && h.stdout.contains("--run-validation"),
        "{h:#?}"
    );
}

#[test]
fn validation_container_validates_and_writes_nothing() {
    let pod = Pod::new("iival");
    let f = fixture("cni-validation");
    let t = target(&pod);
    let mut args = f.args();
    args.extend(t.iter().map(String::as_str));
    // Not captured (istio-cni has not run): validation fails with
    // istio-iptables' code, and nothing is created.
    let r = istio_iptables(&pod, &args, &[]);
    assert_eq!(r.code, Some(126), "{r:#?}");
    assert!(
        r.stderr.contains("run `redirect attach` first") || r.stderr.contains("not captured"),
        "{r:#?}"
    );
    assert_untouched(&pod, "validation of an uncaptured pod");
    // Captured (as the CNI plugin does): validation passes and the config
    // stays as it was.
    pod.attach_istio_default();
    let before = Run::of(pod.redirect(&["status", "--json"])).json();
    let r = istio_iptables(&pod, &args, &[]);
    assert_eq!(r.code, Some(0), "{r:#?}");
    assert!(r.stdout.contains("validation ok"), "{r:#?}");
    let after = Run::of(pod.redirect(&["status", "--json"])).json();
    assert_eq!(before["pods"][0]["config"], after["pods"][0]["config"]);
    assert_eq!(
        before["pods"][0]["istio_iptables_args"],
        after["pods"][0]["istio_iptables_args"]
    );
    // --skip-rule-apply alone: nothing at all.
    let r = istio_iptables(
        &pod,
        &[
            "--skip-rule-apply",
            "-p",
            "15101",
            "--netns",
            s(&pod.pod_netns()),
        ],
        &[],
    );
    assert_eq!(r.code, Some(0), "{r:#?}");
    let again = Run::of(pod.redirect(&["status", "--json"])).json();
    assert_eq!(before["pods"][0]["config"], again["pods"][0]["config"]);
}

#[test]
fn refused_fixtures_attach_nothing() {
    let refused: Vec<Fixture> = fixtures()
        .into_iter()
        .filter(|f| f.expect["refused"].is_string() || f.expect["error"].is_string())
        .collect();
    // TPROXY is the one setting left that istio-init passes and redirect
    // refuses (-c, -k and DNS capture are taken now).
    let names: Vec<&str> = refused.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(names, ["tproxy"], "refused fixtures");
    let pod = Pod::new("iiref");
    for f in &refused {
        let t = target(&pod);
        let mut args = f.args();
        args.extend(t.iter().map(String::as_str));
        let r = istio_iptables(&pod, &args, &f.env());
        assert_eq!(r.code, Some(1), "{}: {r:#?}", f.name);
        let why = f.expect["refused"]
            .as_str()
            .or(f.expect["error"].as_str())
            .unwrap();
        assert!(r.stderr.contains(why), "{}: {r:#?}", f.name);
        assert_untouched(&pod, &f.name);
    }
    // Over a captured pod: refused, and the pod keeps its config.
    pod.attach_istio_default();
    let before = Run::of(pod.redirect(&["status", "--json"])).json();
    let f = fixture("tproxy");
    let t = target(&pod);
    let mut args = f.args();
    args.extend(t.iter().map(String::as_str));
    let r = istio_iptables(&pod, &args, &f.env());
    assert_eq!(r.code, Some(1), "{r:#?}");
    let after = Run::of(pod.redirect(&["status", "--json"])).json();
    assert_eq!(before["pods"], after["pods"]);
}

// ------------------------------------------------------- one case per row

/// What a good value must show in the dry run's JSON.
enum Effect {
    /// This JSON pointer has this value.
    Json(&'static str, Value),
    /// Listed as accepted with no effect.
    Ignored,
    /// A real run refuses it with this text (the dry run exits 1).
    Refused(&'static str),
    /// The printed `istio-iptables ...` line contains this.
    Args(&'static str),
    /// This warning is printed.
    Warning(&'static str),
}

struct Case {
    good: &'static str,
    effects: Vec<Effect>,
    /// A value the row refuses (None: every value is accepted).
    bad: Option<&'static str>,
}

fn case(flag: Flag) -> Case {
    use Effect::*;
    let c = |good, effects, bad| Case { good, effects, bad };
    match flag {
        Flag::EnvoyPort => c(
            "15101",
            vec![Json("/config/proxy_port", json!(15101))],
            Some("0"),
        ),
        Flag::InboundCapturePort => c(
            "15106",
            vec![Json("/config/inbound_port", json!(15106))],
            Some("x"),
        ),
        Flag::InboundTunnelPort => c(
            "15108",
            vec![Json("/config/tunnel_port", json!(15108))],
            Some("65536"),
        ),
        Flag::ProxyUid => c(
            "2000,2001",
            vec![Json("/config/proxy_uids", json!([2000, 2001]))],
            Some("root"),
        ),
        Flag::ProxyGid => c(
            "3000",
            vec![Json("/config/proxy_gids", json!([3000]))],
            Some("-1"),
        ),
        Flag::InterceptionMode => c("REDIRECT", vec![Args("-m REDIRECT")], Some("TPROXY")),
        Flag::ServiceCidr => c(
            "10.0.0.0/8",
            vec![Json(
                "/config/include_cidrs",
                json!([{"addr": "10.0.0.0", "len": 8}]),
            )],
            Some("10.0.0.0/33"),
        ),
        Flag::ServiceExcludeCidr => c(
            "192.168.0.0/16",
            vec![Json(
                "/config/exclude_cidrs",
                json!([{"addr": "192.168.0.0", "len": 16}]),
            )],
            Some("*"),
        ),
        Flag::OutboundPorts => c(
            "443",
            vec![Json("/config/include_outbound_ports", json!([443]))],
            Some("https"),
        ),
        Flag::LocalOutboundPortsExclude => c(
            "22",
            vec![Json("/config/exclude_outbound_ports", json!([22]))],
            Some("0"),
        ),
        Flag::InboundPorts => c(
            "80,8080",
            vec![Json("/config/inbound_ports", json!({"listed": [80, 8080]}))],
            Some("80,*"),
        ),
        Flag::LocalExcludePorts => c(
            "15021",
            vec![Json("/config/exclude_inbound_ports", json!([15021]))],
            Some("1-2"),
        ),
        Flag::ExcludeInterfaces => c(
            "eth1",
            vec![
                Json("/config/exclude_interfaces", json!(["eth1"])),
                Args("-c 'eth1'"),
            ],
            Some("a/b"),
        ),
        Flag::KubeVirtInterfaces => c(
            "tap0",
            vec![
                Json("/config/kube_virt_interfaces", json!(["tap0"])),
                Args("-k 'tap0'"),
            ],
            Some("x y"),
        ),
        Flag::RedirectDns => c(
            "true",
            vec![
                Json("/config/redirect_dns", json!(true)),
                // The test netns has no /etc/netns/<name>/resolv.conf.
                Json("/config/dns_servers", Value::Null),
            ],
            Some("maybe"),
        ),
        Flag::CaptureAllDns => c(
            "true",
            vec![
                Json("/config/capture_all_dns", json!(true)),
                Warning("--capture-all-dns has no effect without --redirect-dns"),
            ],
            Some("yes"),
        ),
        Flag::DnsServers => c(
            "10.96.0.10,fd00::10",
            vec![
                Json("/config/dns_servers", json!(["10.96.0.10", "fd00::10"])),
                Warning("--dns-servers has no effect without --redirect-dns"),
            ],
            Some("10.96.0.300"),
        ),
        Flag::DnsResolvConf => c(
            "/x/resolv.conf",
            vec![Json("/run/dns_resolv_conf", json!("/x/resolv.conf"))],
            Some("resolv.conf"),
        ),
        Flag::PodRoot => c("/x", vec![Json("/run/pod_root", json!("/x"))], Some("x")),
        Flag::OwnerGroups => c(
            "1000,app",
            vec![
                Json(
                    "/config/outbound_owner_groups",
                    json!({"only": ["1000", "app"]}),
                ),
                // A name, and the test netns names no pod root.
                Refused("ISTIO_OUTBOUND_OWNER_GROUPS value '1000,app': group 'app' is a name"),
            ],
            Some("a;b"),
        ),
        Flag::OwnerGroupsExclude => c(
            "2000",
            vec![Json(
                "/config/outbound_owner_groups",
                json!({"all_except": ["2000"]}),
            )],
            Some("*"),
        ),
        Flag::Ipv4LoopbackCidr => c(
            "127.0.0.0/8",
            vec![Json(
                "/config/ipv4_loopback_cidr",
                json!({"addr": "127.0.0.0", "len": 8}),
            )],
            Some("10.0.0.0/8"),
        ),
        Flag::EnvoyUser => c(
            "root",
            vec![Json("/config/proxy_uids", json!([0]))],
            Some(" "),
        ),
        Flag::TproxyMark => c("1338", vec![Ignored], None),
        Flag::TproxyRouteTable => c("134", vec![Ignored], None),
        Flag::DropInvalid => c("true", vec![Ignored], Some("2")),
        Flag::DualStack => c(
            "true",
            vec![
                Json("/config/dual_stack", json!(true)),
                Args("--dual-stack"),
            ],
            Some("x"),
        ),
        Flag::Accel => c(
            "true",
            vec![Json("/config/accel_mode", json!("forced"))],
            Some("yes"),
        ),
        Flag::NoAccel => c(
            "true",
            vec![Json("/config/accel_mode", json!("off"))],
            Some("no"),
        ),
        Flag::AccelShortConns => c(
            "true",
            vec![Json("/config/accel_short_conns", json!(true))],
            Some("1x"),
        ),
        Flag::DryRun => c("true", vec![Json("/dry_run", json!(true))], Some("maybe")),
        Flag::SkipRuleApply => c(
            "true",
            vec![Json("/run/skip_rule_apply", json!(true))],
            Some("t1"),
        ),
        Flag::RunValidation => c(
            "true",
            vec![Json("/run/run_validation", json!(true))],
            Some("nope"),
        ),
        Flag::IptablesProbePort => c(
            "15012",
            vec![Json("/run/probe_port", json!(15012))],
            Some("0"),
        ),
        Flag::ProbeTimeout => c(
            "1500ms",
            vec![Json("/run/probe_timeout_ms", json!(1500))],
            Some("5"),
        ),
        Flag::NetworkNamespace => c(
            "<netns>",
            vec![Json("/netns", json!("<netns>"))],
            Some("/nonexistent-netns"),
        ),
        Flag::CleanupOnly => c("true", vec![Json("/cleanup_only", json!(true))], Some("2")),
        Flag::Reconcile => c("true", vec![Ignored], Some("x")),
        Flag::ForceApply => c("true", vec![Ignored], Some("x")),
        Flag::CniMode => c("true", vec![Ignored], Some("x")),
        Flag::NativeNftables => c("true", vec![Ignored], Some("x")),
        Flag::ForceIptablesBinary => c("nft", vec![Ignored], Some("iptables")),
        Flag::LogOutputLevel => c("default:debug", vec![Ignored], None),
        Flag::LogAsJson => c("true", vec![Ignored], Some("x")),
        Flag::LogTarget => c("stderr", vec![Ignored], None),
        Flag::LogStacktraceLevel => c("default:error", vec![Ignored], None),
        Flag::LogCaller => c("default", vec![Ignored], None),
        Flag::RestoreFormat => c("false", vec![Ignored], Some("x")),
        Flag::IptablesTraceLogging => c("true", vec![Ignored], Some("x")),
    }
}

/// How a value is written for a row: `--long value` or `--long=value`
/// (booleans), and the letter form when it has one.
fn cli_forms(d: &FlagDef, v: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    if let Some(l) = d.long {
        out.push(match d.kind {
            Kind::Bool => vec![format!("--{l}={v}")],
            Kind::Text => vec![format!("--{l}"), v.to_string()],
        });
        if let Some(a) = d.aliases.first() {
            out.push(vec![format!("--{a}"), v.to_string()]);
        }
    }
    if let Some(c) = d.short {
        out.push(match d.kind {
            Kind::Bool => vec![format!("-{c}={v}")],
            Kind::Text => vec![format!("-{c}"), v.to_string()],
        });
    }
    out
}

#[test]
fn every_flag_and_variable_of_the_table_has_a_case() {
    let pod = Pod::new("iirows");
    let ns = s(&pod.pod_netns()).to_string();
    let cg = s(&pod.topo.cgroup.path).to_string();
    let fix = |v: &str| v.replace("<netns>", &ns);
    // The dry run of these extra args with this env, checked against the
    // row's effects.
    let check =
        |d: &FlagDef, what: &str, extra: &[String], env: &[(&str, &str)], effects: &[Effect]| {
            let mut args: Vec<String> = vec!["--cgroup".into(), cg.clone(), "--json".into()];
            if d.flag != Flag::NetworkNamespace {
                args.extend(["--netns".into(), ns.clone()]);
            }
            if d.flag != Flag::DryRun {
                args.push("-n".into());
            }
            args.extend(extra.iter().cloned());
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            let r = istio_iptables(&pod, &a, env);
            let refused = effects.iter().any(|e| matches!(e, Effect::Refused(_)));
            assert_eq!(r.code, Some(if refused { 1 } else { 0 }), "{what}: {r:#?}");
            let j = r.json();
            for e in effects {
                match e {
                    Effect::Json(ptr, want) => {
                        let want = match want {
                            Value::String(v) => json!(fix(v)),
                            v => v.clone(),
                        };
                        assert_eq!(j.pointer(ptr), Some(&want), "{what}: {ptr} in {j:#}");
                    }
                    Effect::Args(a) => assert!(
                        j["istio_iptables_args"].as_str().unwrap().contains(a),
                        "{what}: {j:#}"
                    ),
                    Effect::Warning(w) => assert!(
                        j["warnings"].as_array().unwrap().iter().any(|x| x == w),
                        "{what}: {j:#}"
                    ),
                    Effect::Ignored => assert!(
                        j["ignored"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .any(|i| i["flag"] == d.name()),
                        "{what}: not listed as ignored: {j:#}"
                    ),
                    Effect::Refused(why) => {
                        assert!(
                            j["refused"]
                                .as_array()
                                .unwrap()
                                .iter()
                                .any(|x| x.as_str().unwrap().contains(why)),
                            "{what}: {j:#}"
                        );
                        assert!(r.stderr.contains(why), "{what}: {r:#?}");
                    }
                }
            }
            assert_untouched(&pod, what);
        };
    let mut seen = 0;
    for d in TABLE.iter() {
        let c = case(d.flag);
        let good = fix(c.good);
        // The command line, every spelling.
        for form in cli_forms(d, &good) {
            check(d, &format!("{} {form:?}", d.name()), &form, &[], &c.effects);
            seen += 1;
        }
        // Each variable alone.
        for var in d.env {
            check(
                d,
                &format!("{var}={good}"),
                &[],
                &[(var, &good)],
                &c.effects,
            );
            seen += 1;
        }
        let Some(bad) = c.bad else { continue };
        // The command line wins over a variable (even a bad one).
        if let (Some(var), Some(form)) = (d.env.first(), cli_forms(d, &good).into_iter().next()) {
            check(
                d,
                &format!("{var}={bad} under {form:?}"),
                &form,
                &[(var, bad)],
                &c.effects,
            );
        }
        // A bad value names the flag (or variable) and the value.
        let bad_run = |name: &str, form: Vec<String>, env: &[(&str, &str)]| {
            let mut args: Vec<String> = vec!["--cgroup".into(), cg.clone()];
            if d.flag != Flag::NetworkNamespace {
                args.extend(["--netns".into(), ns.clone()]);
            }
            args.extend(form);
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            let r = istio_iptables(&pod, &a, env);
            assert_eq!(r.code, Some(1), "{name}={bad}: {r:#?}");
            assert!(
                r.stderr.contains(name) && r.stderr.contains(bad.trim()),
                "{name}={bad}: the error must name it and the value: {r:#?}"
            );
            assert_untouched(&pod, &format!("{name}={bad}"));
        };
        if let Some(form) = cli_forms(d, bad).into_iter().next() {
            bad_run(&d.name(), form, &[]);
        }
        for var in d.env {
            bad_run(var, vec![], &[(var, bad)]);
        }
    }
    assert!(seen > TABLE.len(), "{seen} cases");
    // Rows of a command-line run are refused in the agent's JSON config;
    // pod rows are accepted there (checked by the library's unit tests).
    assert!(TABLE.iter().any(|d| d.scope == Scope::Run));

    // `redirect attach` reads no environment: PROXY_UID is ignored.
    let r = run_with_env(
        &redirect_bin(),
        &pod,
        &["attach", "--netns", &ns, "--cgroup", &cg, "-n", "--json"],
        &[("PROXY_UID", "2000"), ("DRY_RUN", "false")],
    );
    assert_eq!(r.code, Some(0), "{r:#?}");
    assert_eq!(r.json()["config"]["proxy_uids"], json!([1337]));
    // --netns and --network-namespace must agree.
    let r = istio_iptables(
        &pod,
        &[
            "-n",
            "--netns",
            &ns,
            "--network-namespace",
            "/run/netns/other",
        ],
        &[],
    );
    assert_eq!(r.code, Some(1), "{r:#?}");
    assert!(r.stderr.contains("--network-namespace"), "{r:#?}");
    assert_untouched(&pod, "conflicting netns");
}

#[test]
fn incoherent_flags_are_refused_with_the_reason() {
    let pod = Pod::new("iicoh");
    let t = target(&pod);
    for (args, want) in [
        (
            vec!["-p", "15001", "-z", "15001"],
            "-z/--inbound-capture-port value '15001': it is also the outbound capture port",
        ),
        (
            vec!["-p", "15008"],
            "-e/--inbound-tunnel-port value '15008': it is also the outbound capture port",
        ),
        (
            vec!["-z", "15008"],
            "-e/--inbound-tunnel-port value '15008': it is also the inbound capture port",
        ),
        (vec!["--accel", "--no-accel"], "conflicts with --no-accel"),
    ] {
        let mut a = args.clone();
        a.extend(["-i", "*", "-b", "*"]);
        a.extend(t.iter().map(String::as_str));
        let r = istio_iptables(&pod, &a, &[]);
        assert_eq!(r.code, Some(1), "{args:?}: {r:#?}");
        assert!(r.stderr.contains(want), "{args:?}: {r:#?}");
        assert_untouched(&pod, &format!("{args:?}"));
    }
    // A capture port in an exclude list does not break capture: accepted.
    let mut a = vec!["-n", "-i", "*", "-b", "*", "-o", "15001", "-d", "15006"];
    a.extend(t.iter().map(String::as_str));
    let r = istio_iptables(&pod, &a, &[]);
    assert_eq!(r.code, Some(0), "{r:#?}");
}

#[test]
fn the_hosts_network_namespace_is_refused() {
    // Checked with dry runs only: a real run that wrongly went ahead would
    // steer the host's inbound connections.
    use std::os::unix::fs::MetadataExt;
    const PROC_NET_INIT_INO: u64 = 0xEFFF_FFF9;
    let own = std::fs::metadata("/proc/self/ns/net").unwrap().ino();
    if own != PROC_NET_INIT_INO {
        eprintln!("skipped: this test runs outside the kernel's initial netns (inode {own})");
        return;
    }
    let pod = Pod::new("iihost");
    let cg = s(&pod.topo.cgroup.path).to_string();
    // Defaulted (this process's) and named.
    for extra in [vec![], vec!["--netns", "/proc/self/ns/net"]] {
        let mut a = vec!["-n", "--json", "--cgroup", &cg, "-i", "*", "-b", "*"];
        a.extend(extra.iter().copied());
        let r = istio_iptables(&pod, &a, &[]);
        assert_eq!(r.code, Some(1), "{extra:?}: {r:#?}");
        assert!(
            r.stderr.contains("host's network namespace"),
            "{extra:?}: {r:#?}"
        );
        assert_untouched(&pod, "host netns");
    }
}
