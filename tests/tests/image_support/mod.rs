//! deploy/daemonset.yaml as a `podman run` command line: what image.rs
//! runs, read from the manifest itself so the two cannot drift.
//!
//! Every field of the pod spec and of its container is either mapped to
//! podman, or named here as meaningful only in a cluster; any other field,
//! or a value this mapping cannot reproduce, is an error naming it, so a
//! manifest change fails the test until the mapping (and its test) follow.
//!
//! | manifest                                   | podman                          |
//! |--------------------------------------------|---------------------------------|
//! | `hostNetwork: true`                        | `--network host`                |
//! | `hostPID: true`                            | `--pid host`                    |
//! | `terminationGracePeriodSeconds`            | `--stop-timeout`                |
//! | `command`                                  | `--entrypoint` (JSON array)     |
//! | `args`                                     | the arguments after the image   |
//! | `securityContext.privileged`               | `--privileged`                  |
//! | `securityContext.capabilities.add`/`drop`  | `--cap-add` / `--cap-drop`      |
//! | `securityContext.readOnlyRootFilesystem`   | `--read-only`                   |
//! | `securityContext.allowPrivilegeEscalation: false` | `--security-opt no-new-privileges` |
//! | `securityContext.runAsUser`/`runAsGroup`   | `--user`                        |
//! | `securityContext.seccompProfile`           | `--security-opt seccomp=unconfined` (Unconfined); podman's default profile otherwise (RuntimeDefault, or none given: stricter than a kubelet without SeccompDefault, which runs Unconfined) |
//! | `securityContext.appArmorProfile`          | `--security-opt apparmor=unconfined` (Unconfined) |
//! | `envFrom` ConfigMap (deploy/configmap.yaml)| `--env` per key                 |
//! | `env` value / `fieldRef: spec.nodeName`    | `--env` (the node name given)   |
//! | `resources.limits.memory` / `cpu`          | `--memory` / `--cpus`           |
//! | `volumes[].hostPath` + `volumeMounts`      | `--volume host:path[:ro,rslave]` (`readOnly` → ro, `mountPropagation: HostToContainer` → rslave, `Bidirectional` → rshared) |
//! | probes `httpGet`                           | kept: the test requests them    |
//!
//! Cluster-only (no meaning for one container on a node, ignored):
//! serviceAccountName, dnsPolicy, priorityClassName, tolerations,
//! updateStrategy, image pull policy, resource requests.
//!
//! Host paths can be substituted ([`Substitution`]) so a test writes its
//! own directories instead of the node's; environment overrides replace
//! ConfigMap or `env` values (image.rs documents which and why).
#![allow(dead_code)]

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use serde_json::Value;

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Every YAML document of deploy/*.yaml, as JSON values.
pub fn deploy_documents() -> Vec<Value> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join("deploy"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    let mut docs = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        let parsed: Vec<Value> = serde_saphyr::from_multiple(&text)
            .unwrap_or_else(|e| panic!("{}: not YAML: {e}", f.display()));
        docs.extend(parsed.into_iter().filter(|d| !d.is_null()));
    }
    docs
}

/// The one document of `kind` (named `name` when given).
pub fn document<'a>(
    docs: &'a [Value],
    kind: &str,
    name: Option<&str>,
) -> Result<&'a Value, String> {
    let found: Vec<&Value> = docs
        .iter()
        .filter(|d| d["kind"] == kind && name.is_none_or(|n| d["metadata"]["name"] == n))
        .collect();
    match found.as_slice() {
        [one] => Ok(one),
        _ => Err(format!(
            "deploy/ has {} {kind} documents{}, expected one",
            found.len(),
            name.map(|n| format!(" named {n}")).unwrap_or_default()
        )),
    }
}

/// One host directory replaced by a test directory, mounted at the
/// manifest's mountPath, or with `same_path` at the test directory's own
/// path: for a directory whose paths must agree on the host and in the
/// container (the agent's socket dir: the CNI plugin on the host dials
/// the path the agent serves).
#[derive(Clone, Debug)]
pub struct Substitution {
    pub host: String,
    pub test_dir: PathBuf,
    pub same_path: bool,
}

/// One `--volume`.
#[derive(Clone, Debug, PartialEq)]
pub struct Mount {
    pub volume: String,
    pub host: PathBuf,
    pub container: PathBuf,
    pub read_only: bool,
    /// podman's propagation option (`rslave`, `rshared`), if any.
    pub propagation: Option<&'static str>,
    /// hostPath type `Directory`: the host directory must exist.
    pub must_exist: bool,
}

impl Mount {
    pub fn volume_arg(&self) -> String {
        let mut opts: Vec<&str> = Vec::new();
        if self.read_only {
            opts.push("ro");
        }
        if let Some(p) = self.propagation {
            opts.push(p);
        }
        let mut s = format!("{}:{}", self.host.display(), self.container.display());
        if !opts.is_empty() {
            s.push(':');
            s.push_str(&opts.join(","));
        }
        s
    }
}

/// An HTTP probe of the container.
#[derive(Clone, Debug)]
pub struct Probe {
    pub kind: String,
    pub host: String,
    pub port: u64,
    pub path: String,
}

/// The DaemonSet's container as podman runs it.
#[derive(Clone, Debug)]
pub struct NodeRun {
    pub container_name: String,
    pub image: String,
    /// Options before the image: network, pid, privileges, limits.
    pub options: Vec<String>,
    pub entrypoint: Vec<String>,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub mounts: Vec<Mount>,
    pub probes: Vec<Probe>,
    pub grace_secs: u64,
    /// `privileged: true`, or the capabilities added.
    pub privileged: bool,
    pub cap_add: Vec<String>,
}

const POD_SPEC_MAPPED: &[&str] = &[
    "hostNetwork",
    "hostPID",
    "terminationGracePeriodSeconds",
    "containers",
    "volumes",
];
const POD_SPEC_CLUSTER_ONLY: &[&str] = &[
    "serviceAccountName",
    "dnsPolicy",
    "priorityClassName",
    "tolerations",
];
const CONTAINER_MAPPED: &[&str] = &[
    "name",
    "image",
    "command",
    "args",
    "envFrom",
    "env",
    "securityContext",
    "resources",
    "volumeMounts",
    "livenessProbe",
    "readinessProbe",
];
const CONTAINER_CLUSTER_ONLY: &[&str] = &["imagePullPolicy"];

fn keys_known(v: &Value, what: &str, known: &[&[&str]]) -> Result<(), String> {
    let Some(obj) = v.as_object() else {
        return Err(format!("{what} is not a mapping: {v}"));
    };
    for k in obj.keys() {
        if !known.iter().any(|list| list.contains(&k.as_str())) {
            return Err(format!(
                "{what}.{k} is not mapped to podman by this test (tests/tests/image_support): map it or list it as cluster-only"
            ));
        }
    }
    Ok(())
}

fn string(v: &Value, what: &str) -> Result<String, String> {
    v.as_str()
        .map(str::to_string)
        .ok_or_else(|| format!("{what} is not a string: {v}"))
}

fn strings(v: &Value, what: &str) -> Result<Vec<String>, String> {
    match v {
        Value::Null => Ok(Vec::new()),
        Value::Array(a) => a
            .iter()
            .enumerate()
            .map(|(i, x)| string(x, &format!("{what}[{i}]")))
            .collect(),
        _ => Err(format!("{what} is not a list: {v}")),
    }
}

/// Kubernetes memory quantity → podman `--memory` value.
fn memory(q: &str) -> Result<String, String> {
    let (num, unit) = q.split_at(q.find(|c: char| !c.is_ascii_digit()).unwrap_or(q.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("resources.limits.memory {q:?} is not a quantity"))?;
    let bytes = match unit {
        "" => n,
        "Ki" => n << 10,
        "Mi" => n << 20,
        "Gi" => n << 30,
        "k" => n * 1000,
        "M" => n * 1000 * 1000,
        "G" => n * 1000 * 1000 * 1000,
        _ => {
            return Err(format!(
                "resources.limits.memory {q:?}: unit {unit:?} not mapped"
            ))
        }
    };
    Ok(format!("{bytes}b"))
}

/// Kubernetes CPU quantity → podman `--cpus`.
fn cpus(q: &Value) -> Result<String, String> {
    match q {
        Value::Number(n) => Ok(n.to_string()),
        Value::String(s) => match s.strip_suffix('m') {
            Some(m) => m
                .parse::<u64>()
                .map(|m| format!("{}", m as f64 / 1000.0))
                .map_err(|_| format!("resources.limits.cpu {s:?} is not a quantity")),
            None => s
                .parse::<f64>()
                .map(|c| c.to_string())
                .map_err(|_| format!("resources.limits.cpu {s:?} is not a quantity")),
        },
        _ => Err(format!("resources.limits.cpu {q} is not a quantity")),
    }
}

/// The DaemonSet `ds_name` of `docs` as podman arguments, with host
/// paths substituted and `node_name` for the downward API's
/// spec.nodeName.
pub fn node_run(
    docs: &[Value],
    ds_name: &str,
    subs: &[Substitution],
    node_name: &str,
) -> Result<NodeRun, String> {
    let ds = document(docs, "DaemonSet", Some(ds_name))?;
    let pod = &ds["spec"]["template"]["spec"];
    keys_known(
        pod,
        "spec.template.spec",
        &[POD_SPEC_MAPPED, POD_SPEC_CLUSTER_ONLY],
    )?;
    let containers = pod["containers"]
        .as_array()
        .ok_or("spec.template.spec.containers is not a list")?;
    if containers.len() != 1 {
        return Err(format!(
            "spec.template.spec.containers has {} containers; this mapping runs one",
            containers.len()
        ));
    }
    if pod.get("initContainers").is_some() {
        return Err("spec.template.spec.initContainers is not mapped".into());
    }
    let c = &containers[0];
    let cw = "spec.template.spec.containers[0]";
    keys_known(c, cw, &[CONTAINER_MAPPED, CONTAINER_CLUSTER_ONLY])?;

    let mut options: Vec<String> = Vec::new();
    let flag = |v: &Value, what: &str| -> Result<bool, String> {
        match v {
            Value::Null => Ok(false),
            Value::Bool(b) => Ok(*b),
            _ => Err(format!("{what} is not a boolean: {v}")),
        }
    };
    if flag(&pod["hostNetwork"], "hostNetwork")? {
        options.extend(["--network".into(), "host".into()]);
    }
    if flag(&pod["hostPID"], "hostPID")? {
        options.extend(["--pid".into(), "host".into()]);
    }
    let grace_secs = match &pod["terminationGracePeriodSeconds"] {
        Value::Null => 30,
        v => v
            .as_u64()
            .ok_or(format!("terminationGracePeriodSeconds {v} is not a number"))?,
    };
    options.extend(["--stop-timeout".into(), grace_secs.to_string()]);

    // Security context.
    let sc = &c["securityContext"];
    let mut privileged = false;
    let mut cap_add = Vec::new();
    if !sc.is_null() {
        let scw = format!("{cw}.securityContext");
        keys_known(
            sc,
            &scw,
            &[&[
                "privileged",
                "capabilities",
                "readOnlyRootFilesystem",
                "allowPrivilegeEscalation",
                "runAsUser",
                "runAsGroup",
                "runAsNonRoot",
                "seccompProfile",
                "appArmorProfile",
            ]],
        )?;
        if flag(&sc["privileged"], &format!("{scw}.privileged"))? {
            privileged = true;
            options.push("--privileged".into());
        }
        let caps = &sc["capabilities"];
        if !caps.is_null() {
            keys_known(caps, &format!("{scw}.capabilities"), &[&["add", "drop"]])?;
            for cap in strings(&caps["drop"], &format!("{scw}.capabilities.drop"))? {
                options.extend(["--cap-drop".into(), cap]);
            }
            for cap in strings(&caps["add"], &format!("{scw}.capabilities.add"))? {
                options.extend(["--cap-add".into(), cap.clone()]);
                cap_add.push(cap);
            }
        }
        if flag(
            &sc["readOnlyRootFilesystem"],
            &format!("{scw}.readOnlyRootFilesystem"),
        )? {
            options.push("--read-only".into());
        }
        if sc["allowPrivilegeEscalation"] == false {
            options.extend(["--security-opt".into(), "no-new-privileges".into()]);
        }
        let user = sc["runAsUser"].as_u64();
        let group = sc["runAsGroup"].as_u64();
        match (user, group) {
            (Some(u), Some(g)) => options.extend(["--user".into(), format!("{u}:{g}")]),
            (Some(u), None) => options.extend(["--user".into(), u.to_string()]),
            (None, Some(_)) => {
                return Err(format!("{scw}.runAsGroup without runAsUser is not mapped"))
            }
            (None, None) => {}
        }
        match sc["seccompProfile"]["type"].as_str() {
            None if sc["seccompProfile"].is_null() => {}
            Some("Unconfined") => {
                options.extend(["--security-opt".into(), "seccomp=unconfined".into()])
            }
            Some("RuntimeDefault") => {}
            _ => {
                return Err(format!(
                    "{scw}.seccompProfile {} is not mapped",
                    sc["seccompProfile"]
                ))
            }
        }
        match sc["appArmorProfile"]["type"].as_str() {
            None if sc["appArmorProfile"].is_null() => {}
            Some("Unconfined") => {
                options.extend(["--security-opt".into(), "apparmor=unconfined".into()])
            }
            Some("RuntimeDefault") => {}
            _ => {
                return Err(format!(
                    "{scw}.appArmorProfile {} is not mapped",
                    sc["appArmorProfile"]
                ))
            }
        }
    }

    // Resources: limits only (requests mean scheduling).
    let res = &c["resources"];
    if !res.is_null() {
        keys_known(res, &format!("{cw}.resources"), &[&["limits", "requests"]])?;
        let limits = &res["limits"];
        if !limits.is_null() {
            keys_known(
                limits,
                &format!("{cw}.resources.limits"),
                &[&["memory", "cpu"]],
            )?;
            if let Some(m) = limits["memory"].as_str() {
                options.extend(["--memory".into(), memory(m)?]);
            }
            if !limits["cpu"].is_null() {
                options.extend(["--cpus".into(), cpus(&limits["cpu"])?]);
            }
        }
    }

    // Environment: the ConfigMaps of envFrom, then env (which wins).
    let mut env = BTreeMap::new();
    for (i, from) in c["envFrom"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        let w = format!("{cw}.envFrom[{i}]");
        keys_known(from, &w, &[&["configMapRef"]])?;
        let name = string(
            &from["configMapRef"]["name"],
            &format!("{w}.configMapRef.name"),
        )?;
        let cm = document(docs, "ConfigMap", Some(&name))?;
        for (k, v) in cm["data"].as_object().cloned().unwrap_or_default() {
            env.insert(
                k.clone(),
                string(&v, &format!("ConfigMap {name} data.{k}"))?,
            );
        }
    }
    for (i, e) in c["env"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        let w = format!("{cw}.env[{i}]");
        keys_known(e, &w, &[&["name", "value", "valueFrom"]])?;
        let name = string(&e["name"], &format!("{w}.name"))?;
        let value = if let Some(v) = e["value"].as_str() {
            v.to_string()
        } else {
            match e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                Some("spec.nodeName") => node_name.to_string(),
                _ => {
                    return Err(format!(
                        "{w} ({name}): valueFrom {} is not mapped (only fieldRef spec.nodeName)",
                        e["valueFrom"]
                    ))
                }
            }
        };
        env.insert(name, value);
    }

    // Mounts: hostPath volumes only.
    let mut volumes: BTreeMap<String, (String, String)> = BTreeMap::new();
    for (i, v) in pod["volumes"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        let w = format!("spec.template.spec.volumes[{i}]");
        keys_known(v, &w, &[&["name", "hostPath"]])?;
        let name = string(&v["name"], &format!("{w}.name"))?;
        if v["hostPath"].is_null() {
            return Err(format!(
                "{w} ({name}) is not a hostPath volume; only hostPath is mapped"
            ));
        }
        keys_known(
            &v["hostPath"],
            &format!("{w}.hostPath"),
            &[&["path", "type"]],
        )?;
        let path = string(&v["hostPath"]["path"], &format!("{w}.hostPath.path"))?;
        let ty = v["hostPath"]["type"].as_str().unwrap_or("").to_string();
        if !["", "Directory", "DirectoryOrCreate"].contains(&ty.as_str()) {
            return Err(format!("{w} ({name}): hostPath type {ty:?} is not mapped"));
        }
        volumes.insert(name, (path, ty));
    }
    let mut mounts = Vec::new();
    for (i, m) in c["volumeMounts"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        let w = format!("{cw}.volumeMounts[{i}]");
        keys_known(
            m,
            &w,
            &[&["name", "mountPath", "readOnly", "mountPropagation"]],
        )?;
        let name = string(&m["name"], &format!("{w}.name"))?;
        let (host, ty) = volumes.get(&name).ok_or(format!(
            "{w}: volume {name} is not in spec.template.spec.volumes"
        ))?;
        let mount_path = string(&m["mountPath"], &format!("{w}.mountPath"))?;
        let propagation = match m["mountPropagation"].as_str() {
            None | Some("None") => None,
            Some("HostToContainer") => Some("rslave"),
            Some("Bidirectional") => Some("rshared"),
            Some(other) => return Err(format!("{w}: mountPropagation {other:?} is not mapped")),
        };
        let sub = subs.iter().find(|s| s.host == *host);
        let (host_dir, container) = match sub {
            Some(s) if s.same_path => {
                if mount_path != *host {
                    return Err(format!(
                        "{w}: {host} is mounted at {mount_path}, not at the same path, which the substitution for it expects"
                    ));
                }
                (s.test_dir.clone(), s.test_dir.clone())
            }
            Some(s) => (s.test_dir.clone(), PathBuf::from(&mount_path)),
            None => (PathBuf::from(host), PathBuf::from(&mount_path)),
        };
        mounts.push(Mount {
            volume: name.clone(),
            host: host_dir,
            container,
            read_only: flag(&m["readOnly"], &format!("{w}.readOnly"))?,
            propagation,
            must_exist: ty == "Directory",
        });
    }
    for s in subs {
        if !volumes.values().any(|(h, _)| *h == s.host) {
            return Err(format!(
                "substitution for {}: the DaemonSet mounts no such host path",
                s.host
            ));
        }
    }

    let mut probes = Vec::new();
    for kind in ["livenessProbe", "readinessProbe"] {
        let p = &c[kind];
        if p.is_null() {
            continue;
        }
        let h = &p["httpGet"];
        if h.is_null() {
            return Err(format!("{cw}.{kind}: only httpGet probes are mapped"));
        }
        probes.push(Probe {
            kind: kind.to_string(),
            host: h["host"].as_str().unwrap_or("127.0.0.1").to_string(),
            port: h["port"]
                .as_u64()
                .ok_or(format!("{cw}.{kind}.httpGet.port is not a number"))?,
            path: string(&h["path"], &format!("{cw}.{kind}.httpGet.path"))?,
        });
    }

    Ok(NodeRun {
        container_name: string(&c["name"], &format!("{cw}.name"))?,
        image: string(&c["image"], &format!("{cw}.image"))?,
        options,
        entrypoint: strings(&c["command"], &format!("{cw}.command"))?,
        args: strings(&c["args"], &format!("{cw}.args"))?,
        env,
        mounts,
        probes,
        grace_secs,
        privileged,
        cap_add,
    })
}

impl NodeRun {
    /// The container path of a host path, through the mounts (the
    /// deepest mount wins); None when no mount covers it.
    pub fn in_container(&self, host: &Path) -> Option<PathBuf> {
        self.mounts
            .iter()
            .filter(|m| host.starts_with(&m.host))
            .max_by_key(|m| m.host.components().count())
            .map(|m| m.container.join(host.strip_prefix(&m.host).unwrap()))
    }

    /// `podman run -d --name <name> ... <image> <args>` arguments
    /// (after `podman`), with `overrides` replacing environment values and
    /// `extra` options (the test's cgroup parent) before the image.
    pub fn run_args(
        &self,
        name: &str,
        image: &str,
        overrides: &BTreeMap<String, String>,
        extra: &[String],
    ) -> Vec<String> {
        let mut a: Vec<String> = vec!["run".into(), "-d".into(), "--name".into(), name.into()];
        a.extend(self.options.iter().cloned());
        if !self.entrypoint.is_empty() {
            a.push("--entrypoint".into());
            a.push(serde_json::to_string(&self.entrypoint).unwrap());
        }
        let mut env = self.env.clone();
        env.extend(overrides.clone());
        for (k, v) in env {
            a.push("--env".into());
            a.push(format!("{k}={v}"));
        }
        for m in &self.mounts {
            a.push("--volume".into());
            a.push(m.volume_arg());
        }
        a.extend(extra.iter().cloned());
        a.push(image.into());
        a.extend(self.args.iter().cloned());
        a
    }
}
