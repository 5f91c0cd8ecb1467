//! Entry points shared by the `cargo fuzz` targets (fuzz/) and the test
//! that replays the kept corpus (tests/fuzz_corpus.rs). Each takes arbitrary
//! bytes, must never panic, and asserts the parser's invariants.

use crate::config::{CaptureFlags, Cidr, PodSpec};

/// Arbitrary bytes as the values of every istio-iptables flag (fields
/// separated by NUL). A value that parses must survive the trip through
/// the kernel map format unchanged, and print as istio-iptables args.
pub fn flags(data: &[u8]) {
    let mut fields = data.split(|b| *b == 0).map(|f| String::from_utf8_lossy(f).into_owned());
    let mut f = CaptureFlags::defaults();
    for slot in [
        &mut f.proxy_port,
        &mut f.inbound_port,
        &mut f.tunnel_port,
        &mut f.proxy_uid,
        &mut f.mode,
        &mut f.include_cidrs,
        &mut f.exclude_cidrs,
        &mut f.include_out_ports,
        &mut f.exclude_out_ports,
        &mut f.include_in_ports,
        &mut f.exclude_in_ports,
    ] {
        match fields.next() {
            Some(v) => *slot = v,
            None => break,
        }
    }
    f.proxy_gid = fields.next();
    let Ok(spec) = f.to_spec() else {
        return;
    };
    let back = PodSpec::from_kernel(&spec.pod_config(1), &spec.port_entries(), &spec.cidr_entries(&[]));
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
    use crate::annotations::{self as a, AnnotationError, PodCapture};
    let pod = match serde_json::from_slice::<serde_json::Value>(data) {
        Ok(v) => v,
        Err(_) => {
            let mut fields = data.split(|b| *b == 0).map(|f| String::from_utf8_lossy(f).into_owned());
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
            let id = |s: Option<String>| s.and_then(|s| s.parse::<i64>().ok()).map_or(serde_json::Value::Null, Into::into);
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
            let again = m.capture_config().to_flags().to_spec().expect("a captured pod's agent config is valid");
            assert_eq!(again, m.spec, "agent config changed the spec");
            let _ = m.spec.istio_args();
        }
        Ok(PodCapture::NotInMesh { reason, .. }) => assert!(!reason.is_empty()),
        Err(AnnotationError::Invalid { annotation, .. }) => assert!(!annotation.is_empty()),
        Err(AnnotationError::NotAPod(why)) => assert!(!why.is_empty()),
    }
}

/// The kept corpus: `fuzz/corpus/<target>/*`, replayed by the tests.
pub fn corpus_dir(target: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus").join(target)
}
