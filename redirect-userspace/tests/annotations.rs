//! `annotations::from_pod` on the hand-written Istio-injected Pod fixtures
//! in tests/fixtures/pods/ (see the README there: fixtures, not recordings).
//! For each injected fixture, the config derived from the annotations must
//! equal the one `redirect attach` gets from the fixture's own `istio-init`
//! args.
use clap::Parser;
use redirect_userspace::{
    annotations::{self, AnnotationError, PodCapture},
    config::CaptureFlags,
};
use serde_json::Value;

fn fixture(name: &str) -> Value {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/pods")
        .join(name);
    serde_json::from_str(
        &std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())),
    )
    .unwrap()
}

#[derive(Parser)]
struct InitArgs {
    #[command(flatten)]
    f: CaptureFlags,
}

/// The flags of the fixture's `istio-init` container (`istio-iptables`
/// subcommand word and the log-level flag dropped).
fn init_flags(pod: &Value) -> CaptureFlags {
    let init = pod["spec"]["initContainers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "istio-init")
        .unwrap();
    let args = init["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string());
    let args: Vec<String> = std::iter::once("istio-iptables".to_string())
        .chain(
            args.skip(1)
                .filter(|a| !a.starts_with("--log_output_level")),
        )
        .collect();
    InitArgs::try_parse_from(args).unwrap().f
}

fn mesh(name: &str) -> annotations::MeshPod {
    match annotations::from_pod(&fixture(name)).unwrap_or_else(|e| panic!("{name}: {e}")) {
        PodCapture::Mesh(m) => *m,
        PodCapture::NotInMesh { reason, .. } => panic!("{name}: not in mesh: {reason}"),
    }
}

#[test]
fn injected_fixtures_match_their_istio_init_args() {
    for name in [
        "default-injected.json",
        "custom-annotations.json",
        "include-ranges-dualstack.json",
        "native-sidecar.json",
    ] {
        let pod = fixture(name);
        let m = mesh(name);
        assert_eq!(m.spec, init_flags(&pod).to_spec().unwrap(), "{name}");
        // Through the agent socket protocol's config: the same spec.
        let cfg = serde_json::to_string(&m.capture_config()).unwrap();
        let cfg: redirect_userspace::config::CaptureFlags = serde_json::from_str(&cfg).unwrap();
        assert_eq!(
            cfg.to_spec().unwrap(),
            m.spec,
            "{name} via the agent config"
        );
    }
}

#[test]
fn default_pod_gets_istios_injected_args() {
    let m = mesh("default-injected.json");
    assert_eq!(m.pod, "bookinfo/productpage-v1-7d8b9c6f5-x2k9q");
    assert_eq!(
        m.uid.as_deref(),
        Some("3f9a1c2e-5b7d-4e1f-9a0b-0c2d4e6f8a1b")
    );
    assert_eq!(
        m.spec.istio_args(),
        "-p 15001 -z 15006 -e 15008 -u '1337' -g '1337' -m REDIRECT -i '*' -x '' -q '' -o '' -b '*' -d '15020,15021,15090'"
    );
    assert_eq!(m.spec.exclude_inbound_ports, vec![15020, 15021, 15090]);
    assert!(m.spec.include_all_outbound);
    assert_eq!(
        m.spec.inbound_ports,
        redirect_userspace::config::InboundPorts::All
    );
}

#[test]
fn custom_annotations_and_proxy_ids() {
    let m = mesh("custom-annotations.json");
    let s = &m.spec;
    assert_eq!(s.proxy_uids, vec![1500]);
    assert_eq!(s.proxy_gids, vec![1600]);
    assert_eq!(
        s.exclude_inbound_ports,
        vec![8443, 9901, 15021, 15090],
        "status port 15021 is not added twice, 15020 not at all"
    );
    assert_eq!(
        s.inbound_ports,
        redirect_userspace::config::InboundPorts::Listed(vec![8443, 9080])
    );
    assert_eq!(s.include_outbound_ports, vec![3306]);
    assert_eq!(s.exclude_outbound_ports, vec![6379, 11211]);
    assert_eq!(
        s.exclude_cidrs
            .iter()
            .map(|c| c.to_string())
            .collect::<Vec<_>>(),
        ["169.254.169.254/32", "10.96.0.0/12"]
    );
    assert_eq!(
        m.flags
            .get(redirect_userspace::config::Flag::LocalExcludePorts),
        "15090,15021,8443,9901,15021"
    );
}

#[test]
fn dual_stack_include_ranges() {
    let s = mesh("include-ranges-dualstack.json").spec;
    assert!(!s.include_all_outbound);
    assert_eq!(
        s.include_cidrs
            .iter()
            .map(|c| c.to_string())
            .collect::<Vec<_>>(),
        ["10.96.0.0/12", "fd00:10:96::/112"]
    );
    assert_eq!(s.exclude_inbound_ports, vec![15020, 15021, 15090]);
}

#[test]
fn not_in_mesh() {
    for (name, why) in [
        ("inject-false.json", "sidecar.istio.io/inject"),
        ("no-sidecar.json", "no istio-proxy container"),
        ("mode-none.json", "NONE"),
    ] {
        match annotations::from_pod(&fixture(name)).unwrap() {
            PodCapture::NotInMesh { reason, .. } => {
                assert!(reason.contains(why), "{name}: {reason}")
            }
            PodCapture::Mesh(_) => panic!("{name} captured"),
        }
    }
    let mut p = fixture("default-injected.json");
    p["spec"]["hostNetwork"] = true.into();
    assert!(annotations::from_pod(&p).unwrap().mesh().is_none());
    // inject=false wins over a present istio-proxy container.
    let mut p = fixture("default-injected.json");
    p["metadata"]["labels"]["sidecar.istio.io/inject"] = "false".into();
    assert!(annotations::from_pod(&p).unwrap().mesh().is_none());
    // An istio-proxy init container that is not a native sidecar is no proxy.
    let mut p = fixture("native-sidecar.json");
    p["spec"]["initContainers"][1]["restartPolicy"] = Value::Null;
    assert!(annotations::from_pod(&p).unwrap().mesh().is_none());
}

#[test]
fn bad_values_name_the_annotation_and_value() {
    for (name, annotation, value, why) in [
        (
            "bad-tproxy.json",
            "sidecar.istio.io/interceptionMode",
            "TPROXY",
            "TPROXY is not supported",
        ),
        (
            "bad-mode.json",
            "sidecar.istio.io/interceptionMode",
            "redirect",
            "expected REDIRECT",
        ),
        (
            "bad-include-cidr.json",
            "traffic.sidecar.istio.io/includeOutboundIPRanges",
            "10.0.0.0/33",
            "/33",
        ),
        (
            "bad-exclude-cidr.json",
            "traffic.sidecar.istio.io/excludeOutboundIPRanges",
            "10.96.0.0/12,kubernetes.default",
            "kubernetes.default",
        ),
        (
            "bad-exclude-inbound-port.json",
            "traffic.sidecar.istio.io/excludeInboundPorts",
            "8080,http-metrics",
            "http-metrics",
        ),
        (
            "bad-include-inbound-port.json",
            "traffic.sidecar.istio.io/includeInboundPorts",
            "9080,70000",
            "70000",
        ),
        (
            "bad-include-outbound-port.json",
            "traffic.sidecar.istio.io/includeOutboundPorts",
            "*",
            "'*'",
        ),
        (
            "bad-exclude-outbound-port.json",
            "traffic.sidecar.istio.io/excludeOutboundPorts",
            "0",
            "port number",
        ),
        (
            "bad-status-port.json",
            "status.sidecar.istio.io/port",
            "status",
            "port number",
        ),
        (
            "bad-run-as-user.json",
            "spec.containers[istio-proxy].securityContext.runAsUser",
            "-1",
            "numeric id",
        ),
    ] {
        let e = annotations::from_pod(&fixture(name))
            .map(|_| ())
            .unwrap_err();
        let msg = e.to_string();
        match &e {
            AnnotationError::Invalid {
                annotation: a,
                value: v,
                ..
            } => {
                assert_eq!(
                    (a.as_str(), v.as_str()),
                    (annotation, value),
                    "{name}: {msg}"
                );
            }
            other => panic!("{name}: {other}"),
        }
        assert!(
            msg.contains(annotation) && msg.contains(value) && msg.contains(why),
            "{name}: {msg}"
        );
        assert!(
            msg.contains("default/httpbin-7b9c8d6f5-p9l3k"),
            "{name}: {msg}"
        );
    }
}
