//! The redirect-cni binary against bad and odd input, as a runtime would
//! run it (env + stdin): every failure is a CNI error object on stdout with
//! the spec's code and exit status 1, never a panic or a hang. No agent
//! runs here: selected pods fail closed, others pass through.

mod agent_support;

use agent_support::*;
use serde_json::{json, Value};

const SOCK: &str = "/nonexistent/redirect-test/agent.sock";
const SELECT: &str = "IgnoreUnknown=1;K8S_POD_NAME=app;REDIRECT_CAPTURE=true";

fn conf(extra: Value) -> String {
    plugin_conf(std::path::Path::new(SOCK), extra)
}

fn add(netns: &str, args: &str, stdin: &str) -> CniRun {
    cni(&pod_vars("ADD", "ctr", netns, args), stdin.as_bytes())
}

#[test]
fn version_lists_supported_versions() {
    let r = cni(&[("CNI_COMMAND", "VERSION")], br#"{"cniVersion":"1.0.0"}"#);
    assert_eq!(r.code, 0, "{r:?}");
    let v = r.json();
    assert_eq!(v["cniVersion"], "1.0.0");
    assert_eq!(
        v["supportedVersions"],
        json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0"])
    );
    // VERSION needs no config at all.
    assert_eq!(cni(&[("CNI_COMMAND", "VERSION")], b"").code, 0);
}

#[test]
fn bad_environment_is_code_4() {
    let c = conf(json!({}));
    // Missing or unknown CNI_COMMAND, missing required variables.
    assert_eq!(cni(&[], c.as_bytes()).error_code(), 4);
    assert_eq!(cni(&[("CNI_COMMAND", "GC")], c.as_bytes()).error_code(), 4);
    assert_eq!(cni(&[("CNI_COMMAND", "add")], c.as_bytes()).error_code(), 4);
    for missing in ["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"] {
        let vars: Vec<_> = pod_vars("ADD", "ctr", "/run/netns/p", SELECT)
            .into_iter()
            .filter(|(k, _)| *k != missing)
            .collect();
        let r = cni(&vars, c.as_bytes());
        assert_eq!(r.error_code(), 4, "{missing}");
        assert!(r.json()["msg"].as_str().unwrap().contains(missing), "{r:?}");
    }
    // Malformed CNI_ARGS, bad selection value.
    assert_eq!(add("/run/netns/p", "K8S_POD_NAME", &c).error_code(), 4);
    assert_eq!(add("/run/netns/p", "=x", &c).error_code(), 4);
    assert_eq!(
        add("/run/netns/p", "K8S_POD_NAME=a;REDIRECT_CAPTURE=1", &c).error_code(),
        4
    );
}

#[test]
fn netns_outside_the_runtime_dirs_is_refused() {
    let c = conf(json!({}));
    for ns in [
        "/etc/passwd",
        "/tmp/netns",
        "/run/netns/../../etc/shadow",
        "/proc/self/ns/net",
        "/proc/1/ns/mnt",
        "relative/netns",
        "/run/netns/a/b",
    ] {
        let r = add(ns, SELECT, &c);
        assert_eq!(r.error_code(), 4, "{ns}: {r:?}");
        assert!(
            r.json()["details"].as_str().unwrap().contains("refused"),
            "{r:?}"
        );
    }
    // CHECK too.
    let r = cni(
        &pod_vars("CHECK", "ctr", "/etc/passwd", SELECT),
        c.as_bytes(),
    );
    assert_eq!(r.error_code(), 4);
    // An accepted path gets as far as the (absent) agent: fail closed.
    assert_eq!(add("/run/netns/some-pod", SELECT, &c).error_code(), 11);
    assert_eq!(add("/var/run/netns/cni-1234", SELECT, &c).error_code(), 11);
    assert_eq!(add("/proc/4242/ns/net", SELECT, &c).error_code(), 11);
}

#[test]
fn bad_config_is_decode_or_config_error() {
    let ns = "/run/netns/p";
    // Not JSON, not an object: 6 (failed to decode).
    for stdin in [
        "",
        "{",
        "not json",
        "[1,2]",
        "42",
        "\"x\"",
        "{\"cniVersion\":\"1.0.0\",}",
    ] {
        assert_eq!(add(ns, SELECT, stdin).error_code(), 6, "{stdin:?}");
    }
    // Invalid UTF-8 and deep nesting are decode errors, not crashes.
    assert_eq!(
        cni(
            &pod_vars("ADD", "ctr", ns, SELECT),
            b"{\"cniVersion\":\"\xff\xfe\"}"
        )
        .error_code(),
        6
    );
    let deep = format!(
        "{{\"cniVersion\":\"1.0.0\",\"x\":{}{}}}",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    assert_eq!(add(ns, SELECT, &deep).error_code(), 6);
    // Valid JSON, invalid config: 7; unknown version: 1.
    assert_eq!(
        add(ns, SELECT, r#"{"name":"n","type":"redirect-cni"}"#).error_code(),
        7
    );
    assert_eq!(
        add(ns, SELECT, r#"{"cniVersion":1,"name":"n"}"#).error_code(),
        7
    );
    assert_eq!(
        add(ns, SELECT, &conf(json!({"cniVersion": "2.0.0"}))).error_code(),
        1
    );
    assert_eq!(
        add(ns, SELECT, &conf(json!({"type": "bridge"}))).error_code(),
        7
    );
    assert_eq!(add(ns, SELECT, &conf(json!({"socket": 5}))).error_code(), 7);
    assert_eq!(
        add(ns, SELECT, &conf(json!({"captureAll": "yes"}))).error_code(),
        7
    );
    assert_eq!(
        add(ns, SELECT, &conf(json!({"prevResult": [1]}))).error_code(),
        7
    );
    let no_prev = r#"{"cniVersion":"1.0.0","name":"n","type":"redirect-cni"}"#;
    let r = add(ns, SELECT, no_prev);
    assert_eq!(r.error_code(), 7);
    assert!(
        r.json()["msg"].as_str().unwrap().contains("chained"),
        "{r:?}"
    );
    // The capture knobs are checked like `redirect attach` checks its flags.
    for (capture, names) in [
        (json!({"envoy-port": "0"}), "-p/--envoy-port"),
        (
            json!({"istio-service-cidr": "10.0.0.0/33"}),
            "-i/--istio-service-cidr",
        ),
        (
            json!({"istio-inbound-interception-mode": "TPROXY"}),
            "TPROXY",
        ),
        (
            json!({"exclude-inbound-portz": "15021"}),
            "exclude-inbound-portz",
        ),
        (json!({"d": {"nested": true}}), "string"),
        (json!("not an object"), "capture"),
    ] {
        let r = add(ns, SELECT, &conf(json!({ "capture": capture })));
        assert_eq!(r.error_code(), 7, "{capture}: {r:?}");
        assert!(r.stdout.contains(names), "{capture}: {r:?}");
    }
    // Also for pods that are not selected: a broken config is reported
    // on every ADD, not only on the first captured pod.
    assert_eq!(
        add(
            ns,
            "K8S_POD_NAME=other",
            &conf(json!({"capture": {"envoy-port": "0"}}))
        )
        .error_code(),
        7
    );
}

#[test]
fn error_replies_use_the_config_version() {
    let r = add(
        "/etc/passwd",
        SELECT,
        &conf(json!({"cniVersion": "0.4.0", "prevResult": {"cniVersion": "0.4.0"}})),
    );
    assert_eq!(r.error_code(), 4);
    assert_eq!(r.json()["cniVersion"], "0.4.0");
}

#[test]
fn unselected_pods_pass_through_untouched() {
    for args in [
        "",
        "IgnoreUnknown=1",
        "K8S_POD_NAME=app",
        "REDIRECT_CAPTURE=true",
        "K8S_POD_NAME=app;REDIRECT_CAPTURE=false",
    ] {
        let r = add("/run/netns/p", args, &conf(json!({})));
        assert_eq!(r.code, 0, "{args}: {r:?}");
        assert_eq!(
            r.json(),
            serde_json::from_str::<Value>(PREV_RESULT).unwrap(),
            "prevResult echoed"
        );
        assert!(r.stderr.is_empty(), "{r:?}");
        let r = cni(
            &pod_vars("CHECK", "ctr", "/run/netns/p", args),
            conf(json!({})).as_bytes(),
        );
        assert_eq!(r.code, 0, "{args}: {r:?}");
    }
    // Even a netns path we would refuse is not looked at for them.
    assert_eq!(
        add("/etc/passwd", "K8S_POD_NAME=app", &conf(json!({}))).code,
        0
    );
}

#[test]
fn selected_pod_without_agent_fails_closed() {
    let r = add("/run/netns/p", SELECT, &conf(json!({})));
    assert_eq!(r.error_code(), 11);
    let v = r.json();
    assert!(v["msg"].as_str().unwrap().contains("uncaptured"), "{v}");
    assert!(v["details"].as_str().unwrap().contains(SOCK), "{v}");
    // captureAll selects every Kubernetes pod.
    assert_eq!(
        add(
            "/run/netns/p",
            "K8S_POD_NAME=app",
            &conf(json!({"captureAll": true}))
        )
        .error_code(),
        11
    );
    // The default socket is used when none is configured.
    let mut c: Value = serde_json::from_str(&conf(json!({}))).unwrap();
    c.as_object_mut().unwrap().remove("socket");
    let r = add("/run/netns/p", SELECT, &c.to_string());
    if !std::path::Path::new("/run/redirect/agent.sock").exists() {
        assert_eq!(r.error_code(), 11);
        assert!(r.stdout.contains("/run/redirect/agent.sock"), "{r:?}");
    }
}

#[test]
fn del_is_idempotent_and_tolerant() {
    for (netns, args) in [
        ("/run/netns/gone", "K8S_POD_NAME=app"),
        ("", "K8S_POD_NAME=app"),
        ("/etc/passwd", "K8S_POD_NAME=app"),
        ("/run/netns/p", ""),
    ] {
        let mut vars = pod_vars("DEL", "ctr", netns, args);
        if netns.is_empty() {
            vars.retain(|(k, _)| *k != "CNI_NETNS");
        }
        let r = cni(&vars, conf(json!({"prevResult": null})).as_bytes());
        assert_eq!(
            (r.code, r.stdout.as_str()),
            (0, ""),
            "{netns} {args}: {r:?}"
        );
    }
    // Garbage is still an error on DEL (the runtime gave us nothing to act on).
    assert_eq!(
        cni(
            &pod_vars("DEL", "ctr", "/run/netns/p", "K8S_POD_NAME=app"),
            b"{"
        )
        .error_code(),
        6
    );
    let vars: Vec<_> = pod_vars("DEL", "ctr", "/run/netns/p", "")
        .into_iter()
        .filter(|(k, _)| *k != "CNI_CONTAINERID")
        .collect();
    assert_eq!(cni(&vars, conf(json!({})).as_bytes()).error_code(), 4);
}

#[test]
fn garbage_never_panics() {
    // A small deterministic fuzz over stdin and CNI_ARGS: the binary
    // always answers with exit 0 or a CNI error object.
    let mut x: u32 = 0x1234_5678;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        x
    };
    let base = conf(json!({"capture": {"b": "*"}}));
    for i in 0..60 {
        let mut bytes = base.clone().into_bytes();
        for _ in 0..(1 + next() % 4) {
            let at = next() as usize % bytes.len();
            let alphabet = b"{}[]\",:0a\\ \x00\xff";
            bytes[at] = alphabet[next() as usize % alphabet.len()];
        }
        let args = [
            "K8S_POD_NAME=a;REDIRECT_CAPTURE=true",
            ";;;",
            "a=b=c;K8S_POD_NAME=",
            "K8S_POD_NAME=a;REDIRECT_CAPTURE=true;x",
        ][i % 4];
        let r = cni(
            &pod_vars(["ADD", "DEL", "CHECK"][i % 3], "ctr", "/run/netns/p", args),
            &bytes,
        );
        assert!(r.code == 0 || r.code == 1, "{r:?}");
        if r.code == 1 {
            let code = r.error_code();
            assert!(
                [1, 2, 4, 6, 7, 11].contains(&code),
                "unexpected code {code}: {r:?}"
            );
        }
        assert!(!r.stderr.contains("panicked"), "{r:?}");
    }
}
