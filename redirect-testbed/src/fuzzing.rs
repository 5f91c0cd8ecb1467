//! Entry points shared by the `cargo fuzz` targets (fuzz/) and the test
//! that replays the kept corpus (tests/fuzz_corpus.rs). Each takes arbitrary
//! bytes, must never panic, and asserts the parser's invariants.

use redirect_userspace::config::{CaptureFlags, Cidr, Flag, PodSpec};

/// Arbitrary bytes as the values of every istio-iptables flag (fields
/// separated by NUL). A value that parses must survive the trip through
/// the kernel map format unchanged, and print as istio-iptables args.
pub fn flags(data: &[u8]) {
    let mut fields = data
        .split(|b| *b == 0)
        .map(|f| String::from_utf8_lossy(f).into_owned());
    let mut f = CaptureFlags::defaults();
    for flag in [
        Flag::EnvoyPort,
        Flag::InboundCapturePort,
        Flag::InboundTunnelPort,
        Flag::ProxyUid,
        Flag::InterceptionMode,
        Flag::ServiceCidr,
        Flag::ServiceExcludeCidr,
        Flag::OutboundPorts,
        Flag::LocalOutboundPortsExclude,
        Flag::InboundPorts,
        Flag::LocalExcludePorts,
        Flag::ProxyGid,
    ] {
        match fields.next() {
            Some(v) => f.set(flag, v),
            None => break,
        }
    }
    let Ok(spec) = f.to_spec() else {
        return;
    };
    let back = PodSpec::from_kernel(
        &spec.pod_config(1),
        &spec.port_entries(),
        &spec.cidr_entries(&[]),
    );
    assert_eq!(back, spec, "kernel round trip changed the spec");
    let _ = spec.istio_args();
    let _ = spec.warnings();
}

/// Arbitrary bytes as one CIDR: a parsed CIDR prints and parses back equal.
pub fn cidr(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(c) = Cidr::parse(s) {
        let again = Cidr::parse(&c.to_string()).expect("a printed CIDR parses");
        assert_eq!(again, c, "CIDR print/parse round trip");
    }
}

/// Arbitrary bytes as a Pod: JSON when it parses as JSON (`{...}`), else
/// NUL-separated values for the capture annotations (and the proxy's
/// runAsUser/runAsGroup) of an injected pod. Never panics; a pod that is
/// captured gives the same spec through the agent protocol's config, and
/// every error names an annotation or field.
pub fn annotations(data: &[u8]) {
    use redirect_userspace::annotations::{self as a, AnnotationError, PodCapture};
    let pod = match serde_json::from_slice::<serde_json::Value>(data) {
        Ok(v) => v,
        Err(_) => {
            let mut fields = data
                .split(|b| *b == 0)
                .map(|f| String::from_utf8_lossy(f).into_owned());
            let mut ann = serde_json::Map::new();
            for key in [
                a::INTERCEPTION_MODE,
                a::INCLUDE_INBOUND_PORTS,
                a::EXCLUDE_INBOUND_PORTS,
                a::INCLUDE_OUTBOUND_IP_RANGES,
                a::EXCLUDE_OUTBOUND_IP_RANGES,
                a::INCLUDE_OUTBOUND_PORTS,
                a::EXCLUDE_OUTBOUND_PORTS,
                a::STATUS_PORT,
                a::INJECT,
            ] {
                match fields.next() {
                    Some(v) if v == "-" => {}
                    Some(v) => {
                        ann.insert(key.into(), v.into());
                    }
                    None => break,
                }
            }
            let id = |s: Option<String>| {
                s.and_then(|s| s.parse::<i64>().ok())
                    .map_or(serde_json::Value::Null, Into::into)
            };
            serde_json::json!({
                "kind": "Pod",
                "metadata": {"name": "fuzz", "namespace": "default", "annotations": ann},
                "spec": {"containers": [
                    {"name": "app"},
                    {"name": "istio-proxy", "securityContext": {"runAsUser": id(fields.next()), "runAsGroup": id(fields.next())}},
                ]},
            })
        }
    };
    match a::from_pod(&pod) {
        Ok(PodCapture::Mesh(m)) => {
            let json = serde_json::to_string(&m.capture_config()).expect("configs serialize");
            let again = serde_json::from_str::<CaptureFlags>(&json)
                .expect("a captured pod's agent config reads back")
                .to_spec()
                .expect("a captured pod's agent config is valid");
            assert_eq!(again, m.spec, "agent config changed the spec");
            let _ = m.spec.istio_args();
        }
        Ok(PodCapture::NotInMesh { reason, .. }) => assert!(!reason.is_empty()),
        Err(AnnotationError::Invalid { annotation, .. }) => assert!(!annotation.is_empty()),
        Err(AnnotationError::NotAPod(why)) => assert!(!why.is_empty()),
    }
}

/// Arbitrary bytes as a port list (`-b/-d/-o/-q`): a list that parses is
/// sorted, without duplicates or port 0, holds only ports written in the
/// input, and prints back to itself; an error names the flag.
pub fn ports(data: &[u8]) {
    let s = String::from_utf8_lossy(data);
    const FIELD: &str = "-d/--istio-local-exclude-ports";
    match redirect_userspace::config::parse_ports(FIELD, &s) {
        Ok(v) => {
            assert!(
                v.windows(2).all(|w| w[0] < w[1]),
                "sorted and unique: {v:?}"
            );
            assert!(v.iter().all(|p| *p > 0), "no port 0: {v:?}");
            let written: Vec<&str> = s.split(',').map(str::trim).collect();
            assert!(
                v.iter()
                    .all(|p| written.iter().any(|w| w.parse::<u16>().ok() == Some(*p))),
                "only written ports: {v:?}"
            );
            let printed = v.iter().map(u16::to_string).collect::<Vec<_>>().join(",");
            assert_eq!(
                redirect_userspace::config::parse_ports(FIELD, &printed)
                    .expect("a printed list parses"),
                v
            );
        }
        Err(e) => assert!(e.to_string().contains(FIELD), "error names the flag: {e}"),
    }
}

/// MOCK agent for the `cni` fuzz target: no agent can run inside the
/// fuzzer's loop, so the socket call answers from the input (the real
/// socket path is covered by tests/tests/cni.rs and agent.rs).
struct MockAgent(u8);

impl redirect_userspace::cni::AgentClient for MockAgent {
    fn call(
        &self,
        _s: &std::path::Path,
        _req: &redirect_userspace::wire::Request,
        _t: std::time::Duration,
    ) -> Result<redirect_userspace::wire::Reply, redirect_userspace::wire::CallError> {
        use redirect_userspace::wire::{AgentError, CallError, Reply};
        match self.0 % 4 {
            0 => Ok(Reply::Add(redirect_userspace::wire::AddReply {
                captured: true,
                ..Default::default()
            })),
            1 => Err(CallError::Unreachable("mock: agent down".into())),
            2 => Err(CallError::Refused(AgentError::failed("mock: refused"))),
            _ => Err(CallError::Protocol("mock: garbage".into())),
        }
    }
}

/// Arbitrary bytes as one CNI plugin invocation: the first line holds the
/// environment (`KEY=value` fields separated by NUL; the first byte also
/// picks the mock agent's answer), the rest is the network config on
/// stdin. Never panics; stdout is always one JSON document; a failure is a
/// CNI error result with a code and a message.
pub fn cni(data: &[u8]) {
    let (env_part, stdin) = match data.iter().position(|b| *b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let agent = MockAgent(env_part.first().copied().unwrap_or(0));
    let env: std::collections::HashMap<String, String> = env_part
        .split(|b| *b == 0)
        .filter_map(|f| {
            let f = String::from_utf8_lossy(f);
            let (k, v) = f.split_once('=')?;
            Some((k.to_string(), v.to_string()))
        })
        .collect();
    let get = |k: &str| env.get(k).cloned();
    let out = redirect_userspace::cni::run(&get, stdin, &agent);
    if out.exit_code == 0 && out.stdout.is_empty() {
        return; // DEL prints nothing on success
    }
    let v: serde_json::Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {:?}", out.stdout));
    if out.exit_code != 0 {
        assert!(
            v["code"].as_u64().is_some(),
            "error result without a code: {v}"
        );
        assert!(
            v["msg"].as_str().is_some_and(|m| !m.is_empty()),
            "error result without a message: {v}"
        );
    }
}

/// The kept corpus: `fuzz/corpus/<target>/*`, replayed by the tests.
pub fn corpus_dir(target: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target)
}
