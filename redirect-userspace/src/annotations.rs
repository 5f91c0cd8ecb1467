//! Kubernetes Pod → capture config, as Istio's sidecar injector derives the
//! `istio-init` arguments from the pod's annotations.
//!
//! Input is the Pod object as JSON (what the API server returns for
//! `GET /api/v1/namespaces/<ns>/pods/<name>`, or a watch event's `object`).
//! The output is either "not in mesh" (with the reason) or the same
//! [`CaptureFlags`]/[`PodSpec`] that `redirect attach` would get from the
//! init container's arguments, which is also the agent protocol's capture config.
//!
//! What the injector's template does, and so what this does: every row
//! of the flag table ([`crate::config::table`]) with annotations takes the
//! first of them present on the pod, else the injector's default (the
//! table's `injected` column); in addition:
//!
//! | istio-iptables flag | source | default |
//! |---|---|---|
//! | `-p` / `-z` | mesh config (not per pod) | 15001 / 15006 |
//! | `-u` | the `istio-proxy` container's `securityContext.runAsUser` (else the pod's) | 1337 |
//! | `-g` | its `runAsGroup` (else the pod's) | the `-u` list |
//! | `-d` | `15090,15021,` + `traffic.sidecar.istio.io/excludeInboundPorts`, then `status.sidecar.istio.io/port` appended unless already listed or `0` | `15090,15021,15020` |
//!
//! An annotation that is present wins over the default even when it is
//! empty (the template's `annotation` helper): `includeInboundPorts: ""`
//! captures no inbound port, as with Istio.
//!
//! DNS capture (`--redirect-dns`) and the env-only settings istio-init
//! reads (`ISTIO_OUTBOUND_OWNER_GROUPS[_EXCLUDE]`,
//! `ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR`) come from where Istio's injector
//! and istio-cni take them: the mesh's `proxyMetadata`, which the injector
//! writes into the `istio-proxy` container's `env` (read first) and which
//! a pod can set in its `proxy.istio.io/config` annotation
//! (`proxyMetadata.<NAME>`). The nameservers of DNS capture are derived
//! from the pod spec as the kubelet writes the pod's resolv.conf
//! ([`NodeDns`]): `dnsPolicy: ClusterFirst` (the default) → the cluster DNS
//! address(es) the agent is given (`--cluster-dns`, the kubelet's
//! `clusterDNS`) then `dnsConfig.nameservers`; `None` →
//! `dnsConfig.nameservers`; `Default` → the node's nameservers (the agent's
//! `--node-resolv-conf`) then `dnsConfig.nameservers`; at most 3, as the
//! kubelet keeps. When the agent does not know them, DNS to any address is
//! captured (istio-cni always captures it so).
//!
//! Not in mesh: `hostNetwork` pods, pods whose `sidecar.istio.io/inject`
//! annotation or label is not a true value (Istio: `y`, `yes`, `true`, `on`,
//! any case; anything else turns injection off), pods with no `istio-proxy`
//! container (nor an `istio-proxy` native sidecar in `initContainers`), and
//! `interceptionMode: NONE` (Istio injects no `istio-init` then).
//! `interceptionMode: TPROXY` is refused (redirect replaces REDIRECT mode).

use std::net::IpAddr;

use serde_json::Value;

use crate::config::{CaptureFlags, Flag, FlagError, PodSpec, Source, TABLE};

pub const INJECT: &str = "sidecar.istio.io/inject";
/// The pod's proxy config overrides (YAML or JSON), `proxyMetadata` among them.
pub const PROXY_CONFIG: &str = "proxy.istio.io/config";
/// Where the nameservers come from, in messages.
pub const DNS_POLICY: &str = "spec.dnsPolicy/spec.dnsConfig";
pub const STATUS_PORT: &str = "status.sidecar.istio.io/port";
pub use crate::config::table::annotation::*;

/// The sidecar container's name in an injected pod.
pub const PROXY_CONTAINER: &str = "istio-proxy";
/// Ports the injector always puts in `-d` (Envoy's Prometheus port and the
/// health port), before the annotation's and the status port.
pub const ALWAYS_EXCLUDED_INBOUND: &str = "15090,15021";
/// The agent's status port (`-d` gets it unless the pod says otherwise).
pub const DEFAULT_STATUS_PORT: &str = "15020";

/// Where the proxyMetadata settings come from in messages.
pub const PROXY_ENV_DNS: &str = "spec.containers[istio-proxy].env.ISTIO_META_DNS_CAPTURE";
pub const PROXY_ENV_OWNER_GROUPS: &str =
    "spec.containers[istio-proxy].env.ISTIO_OUTBOUND_OWNER_GROUPS";
pub const PROXY_ENV_OWNER_GROUPS_EXCLUDE: &str =
    "spec.containers[istio-proxy].env.ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE";
pub const PROXY_ENV_LOOPBACK: &str =
    "spec.containers[istio-proxy].env.ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR";
pub const PROXY_ENV_DUAL_STACK: &str = "spec.containers[istio-proxy].env.ISTIO_DUAL_STACK";
pub use crate::config::table::NO_NAMESERVERS;

/// Where `-u` / `-g` come from in messages.
pub const RUN_AS_USER: &str = "spec.containers[istio-proxy].securityContext.runAsUser";
pub const RUN_AS_GROUP: &str = "spec.containers[istio-proxy].securityContext.runAsGroup";

/// A pod that is captured: where it came from and what it gets.
#[derive(Debug, Clone)]
pub struct MeshPod {
    /// `namespace/name`.
    pub pod: String,
    /// `metadata.uid`, when the object has one.
    pub uid: Option<String>,
    /// The istio-iptables flag values, exactly as the injector would pass them.
    pub flags: CaptureFlags,
    /// The validated result.
    pub spec: PodSpec,
}

impl MeshPod {
    /// The `config` of an agent `add` request for this pod.
    pub fn capture_config(&self) -> CaptureFlags {
        self.flags.clone()
    }
}

/// What a pod object means for capture.
#[derive(Debug, Clone)]
pub enum PodCapture {
    /// Capture it with this config.
    Mesh(Box<MeshPod>),
    /// Leave it alone; the reason says why (for logs).
    NotInMesh { pod: String, reason: String },
}

impl PodCapture {
    pub fn mesh(&self) -> Option<&MeshPod> {
        match self {
            PodCapture::Mesh(m) => Some(m),
            PodCapture::NotInMesh { .. } => None,
        }
    }
}

/// Why a pod object could not be turned into a config.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum AnnotationError {
    /// An annotation (or the proxy container's securityContext field) has a
    /// value istio-init would not accept.
    #[error("pod {pod}: invalid {annotation} value {value:?}: {reason}")]
    Invalid {
        pod: String,
        annotation: String,
        value: String,
        reason: String,
    },
    /// The object is not a Pod as the API server returns it.
    #[error("not a Kubernetes Pod object: {0}")]
    NotAPod(String),
}

/// The pod's `namespace/name` (for messages), `?` for missing parts.
pub fn pod_name(pod: &Value) -> String {
    let m = &pod["metadata"];
    let ns = m["namespace"].as_str().unwrap_or("?");
    let name = m["name"]
        .as_str()
        .or_else(|| m["generateName"].as_str())
        .unwrap_or("?");
    format!("{ns}/{name}")
}

/// A string-valued map (annotations, labels); `None` when absent or null.
fn string_map<'a>(
    pod: &'a Value,
    key: &str,
    name: &str,
) -> Result<Option<&'a serde_json::Map<String, Value>>, AnnotationError> {
    match &pod["metadata"][key] {
        Value::Null => Ok(None),
        Value::Object(m) => {
            if let Some((k, v)) = m.iter().find(|(_, v)| !v.is_string()) {
                return Err(AnnotationError::Invalid {
                    pod: name.to_string(),
                    annotation: format!("metadata.{key}.{k}"),
                    value: v.to_string(),
                    reason: "Kubernetes annotation and label values are strings".into(),
                });
            }
            Ok(Some(m))
        }
        other => Err(AnnotationError::NotAPod(format!(
            "metadata.{key} is {other}, not an object"
        ))),
    }
}

/// Istio's reading of `sidecar.istio.io/inject`: true values inject, an
/// empty value means "use the default", anything else turns injection off.
fn inject_off(v: &str) -> bool {
    !matches!(
        v.to_ascii_lowercase().as_str(),
        "y" | "yes" | "true" | "on" | ""
    )
}

/// The `istio-proxy` container: a regular container, or a native sidecar
/// (an init container with `restartPolicy: Always`, Istio 1.19+).
fn proxy_container(pod: &Value) -> Option<&Value> {
    let spec = &pod["spec"];
    let named = |c: &&Value| c["name"].as_str() == Some(PROXY_CONTAINER);
    spec["containers"]
        .as_array()
        .and_then(|cs| cs.iter().find(named))
        .or_else(|| {
            spec["initContainers"].as_array().and_then(|cs| {
                cs.iter()
                    .filter(named)
                    .find(|c| c["restartPolicy"].as_str() == Some("Always"))
            })
        })
}

/// A securityContext id (`runAsUser`/`runAsGroup`): the container's, else
/// the pod's. Kubernetes stores int64; the kernel's ids are u32.
fn security_id(
    pod: &Value,
    proxy: &Value,
    field: &str,
    name: &str,
) -> Result<Option<String>, AnnotationError> {
    for (where_, v) in [
        (
            format!("spec.containers[{PROXY_CONTAINER}].securityContext.{field}"),
            &proxy["securityContext"][field],
        ),
        (
            format!("spec.securityContext.{field}"),
            &pod["spec"]["securityContext"][field],
        ),
    ] {
        if v.is_null() {
            continue;
        }
        return match v.as_u64().and_then(|n| u32::try_from(n).ok()) {
            Some(n) => Ok(Some(n.to_string())),
            None => Err(AnnotationError::Invalid {
                pod: name.to_string(),
                annotation: where_,
                value: v.to_string(),
                reason: "expected a numeric id (0-4294967295)".into(),
            }),
        };
    }
    Ok(None)
}

/// Istio's `excludeInboundPort(statusPort, excluded)`: the status port is
/// appended unless it is empty, `0`, or already listed.
fn exclude_inbound_port(status_port: &str, excluded: &str) -> String {
    let port = status_port.trim();
    if port.is_empty() || port == "0" {
        return excluded.to_string();
    }
    let mut out = Vec::new();
    for p in excluded.split(',') {
        if p == port {
            return excluded.to_string();
        }
        let p = p.trim();
        if !p.is_empty() {
            out.push(p);
        }
    }
    out.push(port);
    out.join(",")
}

/// What the agent knows about DNS on its node, to derive a pod's
/// nameservers as the kubelet writes its resolv.conf.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeDns {
    /// The kubelet's `clusterDNS` (the agent's `--cluster-dns`).
    pub cluster_dns: Vec<IpAddr>,
    /// The node's nameservers (`--node-resolv-conf`), for `dnsPolicy:
    /// Default`; None when not known.
    pub node_nameservers: Option<Vec<IpAddr>>,
}

/// The kubelet writes at most this many nameservers.
const MAX_NAMESERVERS: usize = 3;

/// The pod's nameservers as the kubelet would write them, None when the
/// agent cannot know them.
fn pod_nameservers(
    pod: &Value,
    node: &NodeDns,
    name: &str,
) -> Result<Option<Vec<IpAddr>>, AnnotationError> {
    let spec = &pod["spec"];
    let mut extra = Vec::new();
    if let Some(list) = spec["dnsConfig"]["nameservers"].as_array() {
        for v in list {
            let a = v
                .as_str()
                .and_then(|s| s.parse::<IpAddr>().ok())
                .ok_or_else(|| AnnotationError::Invalid {
                    pod: name.to_string(),
                    annotation: "spec.dnsConfig.nameservers".into(),
                    value: v.to_string(),
                    reason: "expected an IP address".into(),
                })?;
            extra.push(a);
        }
    }
    let base: Option<Vec<IpAddr>> = match spec["dnsPolicy"].as_str().unwrap_or("ClusterFirst") {
        "ClusterFirst" | "ClusterFirstWithHostNet" if node.cluster_dns.is_empty() => None,
        "ClusterFirst" | "ClusterFirstWithHostNet" => Some(node.cluster_dns.clone()),
        "Default" => node.node_nameservers.clone(),
        "None" => Some(Vec::new()),
        other => {
            return Err(AnnotationError::Invalid {
                pod: name.to_string(),
                annotation: "spec.dnsPolicy".into(),
                value: other.into(),
                reason: "expected ClusterFirst, ClusterFirstWithHostNet, Default or None".into(),
            })
        }
    };
    Ok(base.map(|mut v| {
        for a in extra {
            if !v.contains(&a) {
                v.push(a);
            }
        }
        v.truncate(MAX_NAMESERVERS);
        v
    }))
}

/// A `proxyMetadata` entry of the `proxy.istio.io/config` annotation
/// (JSON, or the YAML forms it is written in: a `proxyMetadata:` block of
/// `NAME: value` lines, or a `{NAME: value, ...}` flow map).
fn proxy_metadata(config: &str, key: &str) -> Option<String> {
    let unquote = |v: &str| {
        let v = v.trim();
        v.strip_prefix('"')
            .and_then(|x| x.strip_suffix('"'))
            .or_else(|| v.strip_prefix('\'').and_then(|x| x.strip_suffix('\'')))
            .unwrap_or(v)
            .to_string()
    };
    if let Ok(v) = serde_json::from_str::<Value>(config) {
        return match &v["proxyMetadata"][key] {
            Value::String(s) => Some(s.clone()),
            Value::Bool(b) => Some(b.to_string()),
            _ => None,
        };
    }
    let mut lines = config.lines().peekable();
    while let Some(line) = lines.next() {
        let Some(rest) = line.trim_start().strip_prefix("proxyMetadata:") else {
            continue;
        };
        let indent = line.len() - line.trim_start().len();
        let rest = rest.trim();
        if let Some(flow) = rest.strip_prefix('{').and_then(|r| r.strip_suffix('}')) {
            return flow.split(',').find_map(|kv| {
                let (k, v) = kv.split_once(':')?;
                (unquote(k) == key).then(|| unquote(v))
            });
        }
        while let Some(l) = lines.peek() {
            let li = l.len() - l.trim_start().len();
            if !l.trim().is_empty() && li <= indent {
                break;
            }
            let l = lines.next().unwrap_or_default();
            if let Some((k, v)) = l.split_once(':') {
                if unquote(k) == key {
                    return Some(unquote(v.split(" #").next().unwrap_or(v)));
                }
            }
        }
    }
    None
}

/// Turn a Pod object into its capture config, as Istio's injector would,
/// with no knowledge of the node's DNS (see [`from_pod_on`]).
pub fn from_pod(pod: &Value) -> Result<PodCapture, AnnotationError> {
    from_pod_on(pod, &NodeDns::default())
}

/// Turn a Pod object into its capture config, as Istio's injector would,
/// on a node whose DNS is `node`.
pub fn from_pod_on(pod: &Value, node: &NodeDns) -> Result<PodCapture, AnnotationError> {
    if !pod.is_object() {
        return Err(AnnotationError::NotAPod(format!(
            "expected a JSON object, got {}",
            short(pod)
        )));
    }
    if let Some(kind) = pod.get("kind").and_then(Value::as_str) {
        if kind != "Pod" {
            return Err(AnnotationError::NotAPod(format!("kind is {kind:?}")));
        }
    }
    if !pod["metadata"].is_object() {
        return Err(AnnotationError::NotAPod("no metadata object".into()));
    }
    let name = pod_name(pod);
    let not = |reason: String| {
        Ok(PodCapture::NotInMesh {
            pod: name.clone(),
            reason,
        })
    };
    let annotations = string_map(pod, "annotations", &name)?;
    let labels = string_map(pod, "labels", &name)?;
    let ann = |k: &str| annotations.and_then(|m| m.get(k)).and_then(Value::as_str);

    if pod["spec"]["hostNetwork"].as_bool() == Some(true) {
        return not(
            "hostNetwork pod: Istio does not inject it, and its netns is the node's".into(),
        );
    }
    for (what, v) in [
        (
            "label",
            labels.and_then(|m| m.get(INJECT)).and_then(Value::as_str),
        ),
        ("annotation", ann(INJECT)),
    ] {
        if let Some(v) = v {
            if inject_off(v) {
                return not(format!("{INJECT} {what} is {v:?}"));
            }
        }
    }
    let Some(proxy) = proxy_container(pod) else {
        return not(format!("no {PROXY_CONTAINER} container"));
    };

    let mode = ann(INTERCEPTION_MODE).unwrap_or("REDIRECT");
    let invalid = |annotation: &str, value: &str, reason: String| AnnotationError::Invalid {
        pod: name.clone(),
        annotation: annotation.to_string(),
        value: value.to_string(),
        reason,
    };
    match mode {
        "REDIRECT" => {}
        "NONE" => return not(format!("{INTERCEPTION_MODE} is NONE: Istio injects no istio-init, nothing is captured")),
        "TPROXY" => {
            return Err(invalid(
                INTERCEPTION_MODE,
                mode,
                "TPROXY is not supported: redirect replaces istio-init's REDIRECT mode (remove the annotation or set REDIRECT)".into(),
            ))
        }
        _ => return Err(invalid(INTERCEPTION_MODE, mode, "expected REDIRECT, TPROXY or NONE (Istio's modes)".into())),
    }

    let status_port = ann(STATUS_PORT).unwrap_or(DEFAULT_STATUS_PORT);
    let sp = status_port.trim();
    if !sp.is_empty() && sp.parse::<u16>().is_err() {
        return Err(invalid(
            STATUS_PORT,
            status_port,
            "expected a port number (0 leaves -d without a status port)".into(),
        ));
    }
    let exclude_in = exclude_inbound_port(status_port, ann(EXCLUDE_INBOUND_PORTS).unwrap_or(""));
    let exclude_in_ports = if exclude_in.is_empty() {
        ALWAYS_EXCLUDED_INBOUND.to_string()
    } else {
        format!("{ALWAYS_EXCLUDED_INBOUND},{exclude_in}")
    };

    let uid = security_id(pod, proxy, "runAsUser", &name)?;
    let gid = security_id(pod, proxy, "runAsGroup", &name)?;
    let mut flags = CaptureFlags::istio_injected();
    // Every annotated row: the first of its annotations present wins, even
    // when empty (the template's `annotation` helper).
    for d in TABLE.iter().filter(|d| d.flag != Flag::LocalExcludePorts) {
        // -d is composed below.
        if let Some((key, v)) = d.annotations.iter().find_map(|k| ann(k).map(|v| (*k, v))) {
            flags.set_from(d.flag, v, Source::Annotation(key));
        }
    }
    let d_from = if ann(EXCLUDE_INBOUND_PORTS).is_some() {
        Source::Annotation(EXCLUDE_INBOUND_PORTS)
    } else if ann(STATUS_PORT).is_some() {
        Source::Annotation(STATUS_PORT)
    } else {
        Source::Injected
    };
    flags.set_from(Flag::LocalExcludePorts, exclude_in_ports, d_from);
    if let Some(u) = uid {
        flags.set_from(Flag::ProxyUid, u, Source::Annotation(RUN_AS_USER));
    }
    if let Some(g) = gid {
        flags.set_from(Flag::ProxyGid, g, Source::Annotation(RUN_AS_GROUP));
    }
    // proxyMetadata: the proxy container's env (the injector put it
    // there), else the pod's proxy.istio.io/config annotation.
    let env_of = |var: &str| -> Option<String> {
        proxy["env"].as_array().and_then(|env| {
            env.iter()
                .find(|e| e["name"].as_str() == Some(var))
                .and_then(|e| e["value"].as_str().map(str::to_string))
        })
    };
    for (flag, var, from_env) in [
        (Flag::RedirectDns, "ISTIO_META_DNS_CAPTURE", PROXY_ENV_DNS),
        (
            Flag::OwnerGroups,
            "ISTIO_OUTBOUND_OWNER_GROUPS",
            PROXY_ENV_OWNER_GROUPS,
        ),
        (
            Flag::OwnerGroupsExclude,
            "ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE",
            PROXY_ENV_OWNER_GROUPS_EXCLUDE,
        ),
        (
            Flag::Ipv4LoopbackCidr,
            "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR",
            PROXY_ENV_LOOPBACK,
        ),
        // Istio's CNI plugin reads it from the proxy's env too.
        (Flag::DualStack, "ISTIO_DUAL_STACK", PROXY_ENV_DUAL_STACK),
    ] {
        if let Some(v) = env_of(var) {
            flags.set_from(flag, v, Source::Annotation(from_env));
        } else if let Some(v) = ann(PROXY_CONFIG).and_then(|c| proxy_metadata(c, var)) {
            flags.set_from(flag, v, Source::Annotation(PROXY_CONFIG));
        }
    }
    let dns_on = flags
        .given(Flag::RedirectDns)
        .is_some_and(|g| crate::config::parse::bool(&g.value) == Ok(true));
    if dns_on {
        if let Some(servers) = pod_nameservers(pod, node, &name)? {
            let list = servers
                .iter()
                .map(IpAddr::to_string)
                .collect::<Vec<_>>()
                .join(",");
            // Empty means "not given" to the flag: the pod has none, which
            // turns DNS capture off (as istio-iptables with an empty
            // resolv.conf), said with a reserved word.
            let v = if list.is_empty() {
                NO_NAMESERVERS.to_string()
            } else {
                list
            };
            flags.set_from(Flag::DnsServers, v, Source::Annotation(DNS_POLICY));
        }
    }
    let spec = flags.try_spec().map_err(|e: FlagError| {
        let d = crate::config::FlagDef::get(e.flag);
        match e.from {
            Some(Source::Annotation(annotation)) => {
                // Name the annotation's own value, not the composed flag.
                let value = match annotation {
                    EXCLUDE_INBOUND_PORTS | STATUS_PORT => {
                        ann(annotation).map(str::to_string).unwrap_or(e.value)
                    }
                    _ => e.value,
                };
                invalid(
                    annotation,
                    &value,
                    format!("{} (istio-init {})", e.reason, d.name()),
                )
            }
            _ => invalid(
                "mesh defaults",
                &e.value,
                format!("{} (istio-init {})", e.reason, d.name()),
            ),
        }
    })?;
    Ok(PodCapture::Mesh(Box::new(MeshPod {
        pod: name.clone(),
        uid: pod["metadata"]["uid"].as_str().map(str::to_string),
        flags,
        spec,
    })))
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 60 {
        format!(
            "{}...",
            &s[..s
                .char_indices()
                .take_while(|(i, _)| *i < 60)
                .last()
                .map_or(0, |(i, c)| i + c.len_utf8())]
        )
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(annotations: Value) -> Value {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "p", "namespace": "ns", "annotations": annotations},
            "spec": {"containers": [
                {"name": "app", "image": "app"},
                {"name": "istio-proxy", "image": "proxyv2", "securityContext": {"runAsUser": 1337, "runAsGroup": 1337}}
            ]}
        })
    }

    fn args(p: &Value) -> String {
        from_pod(p).unwrap().mesh().unwrap().spec.istio_args()
    }

    #[test]
    fn status_port_rule_is_istios() {
        assert_eq!(exclude_inbound_port("15020", ""), "15020");
        assert_eq!(exclude_inbound_port("15020", "8080"), "8080,15020");
        assert_eq!(exclude_inbound_port("15020", "15020,8080"), "15020,8080");
        assert_eq!(exclude_inbound_port("0", "8080"), "8080");
        assert_eq!(exclude_inbound_port("", ""), "");
        assert_eq!(
            exclude_inbound_port("15020", " 8080 , ,9090"),
            "8080,9090,15020"
        );
    }

    #[test]
    fn defaults_are_the_injected_args() {
        let m = from_pod(&pod(json!({}))).unwrap();
        let m = m.mesh().unwrap();
        let mut injected = CaptureFlags::istio_injected();
        injected.set(Flag::ProxyGid, "1337");
        assert_eq!(m.spec, injected.to_spec().unwrap());
        assert!(m.spec.warnings().is_empty(), "{:?}", m.spec.warnings());
        // The agent config gives the same spec.
        let wire: CaptureFlags =
            serde_json::from_str(&serde_json::to_string(&m.capture_config()).unwrap()).unwrap();
        assert_eq!(wire.to_spec().unwrap(), m.spec);
    }

    #[test]
    fn interface_annotations_feed_k_and_c() {
        let m = from_pod(&pod(json!({
            KUBEVIRT_INTERFACES: "tap9",
            REROUTE_VIRTUAL_INTERFACES: "tap0,tap1",
            EXCLUDE_INTERFACES: "eth1",
        })))
        .unwrap();
        let s = &m.mesh().unwrap().spec;
        // The template's order: reroute-virtual-interfaces wins.
        assert_eq!(s.kube_virt_interfaces, vec!["tap0", "tap1"]);
        assert_eq!(s.exclude_interfaces, vec!["eth1"]);
        s.check_supported().unwrap();
        let bad = from_pod(&pod(json!({EXCLUDE_INTERFACES: "eth/1"})))
            .unwrap_err()
            .to_string();
        assert!(
            bad.contains(EXCLUDE_INTERFACES) && bad.contains("eth/1"),
            "{bad}"
        );
    }

    #[test]
    fn empty_annotation_wins_over_default() {
        let a = args(&pod(json!({INCLUDE_INBOUND_PORTS: ""})));
        assert!(a.contains("-b ''"), "{a}");
    }

    #[test]
    fn non_string_annotation_is_an_error() {
        let e = from_pod(&pod(json!({EXCLUDE_INBOUND_PORTS: 8080})))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(EXCLUDE_INBOUND_PORTS) && e.contains("8080"),
            "{e}"
        );
    }

    #[test]
    fn not_objects() {
        assert!(matches!(
            from_pod(&json!([])),
            Err(AnnotationError::NotAPod(_))
        ));
        assert!(matches!(
            from_pod(&json!({"kind": "Service", "metadata": {}})),
            Err(AnnotationError::NotAPod(_))
        ));
        assert!(matches!(
            from_pod(&json!({"kind": "Pod"})),
            Err(AnnotationError::NotAPod(_))
        ));
    }

    #[test]
    fn inject_values() {
        for v in ["false", "False", "no", "n", "off", "0", "nope"] {
            let mut p = pod(json!({INJECT: v}));
            assert!(from_pod(&p).unwrap().mesh().is_none(), "{v}");
            p["metadata"]["annotations"] = json!({});
            p["metadata"]["labels"] = json!({INJECT: v});
            assert!(from_pod(&p).unwrap().mesh().is_none(), "label {v}");
        }
        for v in ["true", "YES", "y", "on", ""] {
            assert!(
                from_pod(&pod(json!({INJECT: v}))).unwrap().mesh().is_some(),
                "{v}"
            );
        }
    }

    fn with_proxy_env(mut p: Value, env: Value) -> Value {
        p["spec"]["containers"][1]["env"] = env;
        p
    }

    fn spec_on(p: &Value, node: &NodeDns) -> PodSpec {
        from_pod_on(p, node).unwrap().mesh().unwrap().spec.clone()
    }

    #[test]
    fn dns_capture_from_the_proxy_env_or_the_proxy_config_annotation() {
        use crate::config::DnsCapture;
        let node = NodeDns {
            cluster_dns: vec!["10.96.0.10".parse().unwrap()],
            node_nameservers: Some(vec!["192.168.1.1".parse().unwrap()]),
        };
        let on = with_proxy_env(
            pod(json!({})),
            json!([{"name": "ISTIO_META_DNS_CAPTURE", "value": "true"}]),
        );
        let s = spec_on(&on, &node);
        assert_eq!(
            s.dns_capture(),
            DnsCapture::Nameservers(vec!["10.96.0.10".parse().unwrap()])
        );
        assert!(
            s.istio_args()
                .ends_with("--redirect-dns --dns-servers '10.96.0.10'"),
            "{}",
            s.istio_args()
        );
        // The cluster DNS unknown: DNS to any address.
        assert_eq!(
            spec_on(&on, &NodeDns::default()).dns_capture(),
            DnsCapture::AllUnknownNameservers
        );
        // The annotation, as YAML (block and flow) and JSON.
        for cfg in [
            "proxyMetadata:\n  OTHER: x\n  ISTIO_META_DNS_CAPTURE: \"true\"\nholdApplicationUntilProxyStarts: true\n",
            "proxyMetadata: {ISTIO_META_DNS_CAPTURE: 'true'}",
            r#"{"proxyMetadata":{"ISTIO_META_DNS_CAPTURE":"true"}}"#,
        ] {
            let s = spec_on(&pod(json!({PROXY_CONFIG: cfg})), &node);
            assert!(s.redirect_dns, "{cfg}");
        }
        let s = spec_on(
            &pod(json!({PROXY_CONFIG: "proxyMetadata:\n  OTHER: \"true\"\n"})),
            &node,
        );
        assert!(!s.redirect_dns);
        // The container's env wins over the annotation.
        let off = with_proxy_env(
            pod(json!({PROXY_CONFIG: "proxyMetadata:\n  ISTIO_META_DNS_CAPTURE: \"true\"\n"})),
            json!([{"name": "ISTIO_META_DNS_CAPTURE", "value": "false"}]),
        );
        assert!(!spec_on(&off, &node).redirect_dns);
        // A bad value names where it came from.
        let bad = with_proxy_env(
            pod(json!({})),
            json!([{"name": "ISTIO_META_DNS_CAPTURE", "value": "yes"}]),
        );
        let e = from_pod_on(&bad, &node).unwrap_err().to_string();
        assert!(e.contains(PROXY_ENV_DNS) && e.contains("yes"), "{e}");
    }

    #[test]
    fn dual_stack_from_the_proxy_env_or_the_proxy_config_annotation() {
        let node = NodeDns::default();
        assert!(!spec_on(&pod(json!({})), &node).dual_stack);
        let on = with_proxy_env(
            pod(json!({})),
            json!([{"name": "ISTIO_DUAL_STACK", "value": "true"}]),
        );
        let s = spec_on(&on, &node);
        assert!(s.dual_stack);
        assert!(
            s.istio_args().contains("--dual-stack"),
            "{}",
            s.istio_args()
        );
        assert!(s.pod_config(1).has(redirect_common::flags::DUAL_STACK));
        let s = spec_on(
            &pod(json!({PROXY_CONFIG: "proxyMetadata:\n  ISTIO_DUAL_STACK: \"true\"\n"})),
            &node,
        );
        assert!(s.dual_stack);
        // The container's env wins over the annotation.
        let off = with_proxy_env(
            pod(json!({PROXY_CONFIG: "proxyMetadata:\n  ISTIO_DUAL_STACK: \"true\"\n"})),
            json!([{"name": "ISTIO_DUAL_STACK", "value": "false"}]),
        );
        assert!(!spec_on(&off, &node).dual_stack);
        let bad = with_proxy_env(
            pod(json!({})),
            json!([{"name": "ISTIO_DUAL_STACK", "value": "maybe"}]),
        );
        let e = from_pod_on(&bad, &node).unwrap_err().to_string();
        assert!(
            e.contains(PROXY_ENV_DUAL_STACK) && e.contains("maybe"),
            "{e}"
        );
    }

    #[test]
    fn nameservers_follow_the_dns_policy_as_the_kubelet() {
        let node = NodeDns {
            cluster_dns: vec!["10.96.0.10".parse().unwrap()],
            node_nameservers: Some(vec!["192.168.1.1".parse().unwrap()]),
        };
        let dns = |policy: Option<&str>, extra: Value| {
            let mut p = with_proxy_env(
                pod(json!({})),
                json!([{"name": "ISTIO_META_DNS_CAPTURE", "value": "true"}]),
            );
            if let Some(pol) = policy {
                p["spec"]["dnsPolicy"] = json!(pol);
            }
            p["spec"]["dnsConfig"] = json!({"nameservers": extra});
            spec_on(&p, &node).dns_servers
        };
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            dns(None, json!(["10.0.0.53"])),
            Some(vec![ip("10.0.0.53"), ip("10.96.0.10")])
        );
        assert_eq!(
            dns(Some("Default"), json!([])),
            Some(vec![ip("192.168.1.1")])
        );
        assert_eq!(
            dns(Some("None"), json!(["fd00::53"])),
            Some(vec![ip("fd00::53")])
        );
        // None without nameservers: no DNS capture (istio-iptables with an
        // empty resolv.conf), said so.
        assert_eq!(dns(Some("None"), json!([])), Some(vec![]));
        // At most 3, the kubelet's limit.
        assert_eq!(
            dns(None, json!(["10.0.0.1", "10.0.0.2", "10.0.0.3"]))
                .unwrap()
                .len(),
            3
        );
        let mut p = with_proxy_env(
            pod(json!({})),
            json!([{"name": "ISTIO_META_DNS_CAPTURE", "value": "true"}]),
        );
        p["spec"]["dnsConfig"] = json!({"nameservers": ["nope"]});
        let e = from_pod_on(&p, &node).unwrap_err().to_string();
        assert!(
            e.contains("spec.dnsConfig.nameservers") && e.contains("nope"),
            "{e}"
        );
    }

    #[test]
    fn owner_groups_and_loopback_from_proxy_metadata() {
        let p = with_proxy_env(
            pod(json!({})),
            json!([
                {"name": "ISTIO_OUTBOUND_OWNER_GROUPS", "value": "2000,3000"},
                {"name": "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR", "value": "127.0.0.1/8"}
            ]),
        );
        let s = spec_on(&p, &NodeDns::default());
        assert_eq!(
            s.outbound_owner_groups,
            crate::config::OwnerGroups::Only(vec!["2000".into(), "3000".into()])
        );
        assert_eq!(s.ipv4_loopback_cidr.to_string(), "127.0.0.0/8");
        s.check_supported().unwrap();
        // A name: the agent cannot see the pod's /etc/group.
        let p = with_proxy_env(
            pod(json!({})),
            json!([{"name": "ISTIO_OUTBOUND_OWNER_GROUPS", "value": "java"}]),
        );
        let e = spec_on(&p, &NodeDns::default())
            .check_supported()
            .unwrap_err()
            .to_string();
        assert!(e.contains("'java' is a name"), "{e}");
    }
}
