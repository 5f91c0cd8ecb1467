//! deploy/: every manifest validates against the Kubernetes JSON schemas
//! (`kubernetes-validate --strict`, installed by `cargo xtask setup` into
//! target/tools/kubernetes-validate; it bundles the schemas, so this runs
//! offline: as root it runs in a fresh network namespace to prove it), a
//! broken copy fails, and the manifests agree with each other and with the
//! daemon (ConfigMap keys are the daemon's environment variables, probes hit
//! its endpoint, every path it uses is mounted, RBAC is read-only on pods).
use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn venv() -> PathBuf {
    match std::env::var_os("REDIRECT_K8S_VALIDATE_VENV") {
        Some(v) => v.into(),
        None => root().join("target/tools/kubernetes-validate"),
    }
}

fn validator() -> PathBuf {
    let bin = venv().join("bin/kubernetes-validate");
    assert!(bin.exists(), "{} missing: run `cargo xtask setup` (it installs kubernetes-validate from PyPI into a venv there)", bin.display());
    bin
}

/// `kubernetes-validate --strict` on `files`; without network when root
/// (the schemas ship in the package).
fn validate(files: &[PathBuf]) -> Output {
    let offline = unsafe { libc::geteuid() } == 0 && Path::new("/usr/bin/unshare").exists();
    let mut c = if offline {
        let mut c = Command::new("/usr/bin/unshare");
        c.arg("-n").arg(validator());
        c
    } else {
        Command::new(validator())
    };
    c.args(["--strict", "--no-warn"])
        .args(files)
        .output()
        .expect("running kubernetes-validate")
}

fn manifests() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(root().join("deploy"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    v.sort();
    v
}

/// Every YAML document of deploy/ as JSON (PyYAML from the same venv).
fn documents() -> Vec<Value> {
    let mut out = Vec::new();
    for f in manifests() {
        let o = Command::new(venv().join("bin/python"))
            .args(["-c", "import json,sys,yaml; print(json.dumps([d for d in yaml.safe_load_all(open(sys.argv[1])) if d is not None]))"])
            .arg(&f)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{}: {}",
            f.display(),
            String::from_utf8_lossy(&o.stderr)
        );
        let docs: Vec<Value> = serde_json::from_slice(&o.stdout).unwrap();
        out.extend(docs);
    }
    out
}

fn one<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let v: Vec<&Value> = docs.iter().filter(|d| d["kind"] == kind).collect();
    assert_eq!(v.len(), 1, "exactly one {kind} in deploy/");
    v[0]
}

#[test]
fn every_manifest_validates_offline() {
    let files = manifests();
    let names: BTreeSet<String> = files
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for want in [
        "configmap.yaml",
        "daemonset.yaml",
        "namespace.yaml",
        "rbac.yaml",
    ] {
        assert!(names.contains(want), "deploy/{want} missing: {names:?}");
    }
    let o = validate(&files);
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "deploy/ does not validate:\n{out}");
    // One "passed" line per resource: ns, sa, clusterrole, binding, cm, ds.
    let passed = out.lines().filter(|l| l.contains(" passed ")).count();
    assert_eq!(passed, 6, "{out}");
}

#[test]
fn broken_copies_fail() {
    let dir = std::env::temp_dir().join(format!("redirect-deploy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ds = std::fs::read_to_string(root().join("deploy/daemonset.yaml")).unwrap();
    let cases = [
        (
            "wrong-type.yaml",
            ds.replace("hostPID: true", "hostPID: \"yes\""),
            "hostPID",
        ),
        (
            "unknown-field.yaml",
            ds.replace(
                "hostNetwork: true",
                "hostNetwork: true\n      hostNetworking: true",
            ),
            "hostNetworking",
        ),
        (
            "missing-required.yaml",
            ds.replace(
                "      containers:\n        - name: agent\n",
                "      containers:\n        - nam: agent\n",
            ),
            "name",
        ),
        (
            "not-a-number.yaml",
            ds.replace(
                "terminationGracePeriodSeconds: 30",
                "terminationGracePeriodSeconds: thirty",
            ),
            "thirty",
        ),
    ];
    for (name, text, why) in cases {
        assert_ne!(text, ds, "{name}: the edit did not apply");
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        let o = validate(&[p]);
        let out = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(!o.status.success(), "{name} validated:\n{out}");
        assert!(
            out.contains(why),
            "{name}: error does not name {why}:\n{out}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The `env = "..."` names of `redirect daemon`'s flags (and the global
/// --pin-dir), read from the source.
fn daemon_env_names() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for f in [
        "redirect-userspace/src/cmd/daemon.rs",
        "redirect-userspace/src/main.rs",
    ] {
        let src = std::fs::read_to_string(root().join(f)).unwrap();
        for part in src.split("env = \"").skip(1) {
            names.insert(part.split('"').next().unwrap().to_string());
        }
    }
    names
}

#[test]
fn manifests_agree_with_each_other_and_the_daemon() {
    let docs = documents();
    let ns = one(&docs, "Namespace")["metadata"]["name"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        one(&docs, "Namespace")["metadata"]["labels"]["pod-security.kubernetes.io/enforce"],
        "privileged"
    );
    let cm = one(&docs, "ConfigMap");
    let sa = one(&docs, "ServiceAccount");
    let ds = one(&docs, "DaemonSet");
    for d in [cm, sa, ds] {
        assert_eq!(d["metadata"]["namespace"], ns.as_str(), "{}", d["kind"]);
    }

    // RBAC: get/list/watch on pods, nothing else, bound to the agent's SA.
    let role = one(&docs, "ClusterRole");
    assert_eq!(
        role["rules"],
        serde_json::json!([{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}])
    );
    let binding = one(&docs, "ClusterRoleBinding");
    assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
    assert_eq!(
        binding["subjects"],
        serde_json::json!([{"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": ns}])
    );

    // The ConfigMap holds daemon flags only (RUST_LOG aside).
    let data = cm["data"].as_object().unwrap();
    let known = daemon_env_names();
    for k in data.keys().filter(|k| *k != "RUST_LOG") {
        assert!(
            known.contains(k),
            "ConfigMap key {k} is no daemon flag's variable (known: {known:?})"
        );
    }
    let get = |k: &str| data[k].as_str().unwrap().to_string();

    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], sa["metadata"]["name"]);
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["hostPID"], true);
    let c = &pod["containers"][0];
    // Least privilege: not privileged, every capability dropped, the
    // few the agent needs added (image.rs runs it so and shows each one
    // is needed); no AppArmor profile (the default one denies bpffs writes).
    let sc = &c["securityContext"];
    assert!(
        sc["privileged"].is_null() || sc["privileged"] == false,
        "{sc}"
    );
    assert_eq!(
        sc["capabilities"]["drop"],
        serde_json::json!(["ALL"]),
        "{sc}"
    );
    assert_eq!(
        sc["capabilities"]["add"],
        serde_json::json!(["SYS_ADMIN", "NET_ADMIN", "SYS_PTRACE", "DAC_OVERRIDE"]),
        "{sc}"
    );
    assert_eq!(sc["appArmorProfile"]["type"], "Unconfined", "{sc}");
    assert_eq!(
        c["envFrom"][0]["configMapRef"]["name"],
        cm["metadata"]["name"]
    );
    assert_eq!(c["args"][0], "daemon");
    // The pod watch's node name, from the downward API.
    let node_env = c["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "REDIRECT_NODE_NAME")
        .expect("REDIRECT_NODE_NAME in the DaemonSet env");
    assert_eq!(
        node_env["valueFrom"]["fieldRef"]["fieldPath"],
        "spec.nodeName"
    );
    assert!(known.contains("REDIRECT_NODE_NAME"));

    // Probes: the daemon's endpoint, on the address it binds.
    let addr: std::net::SocketAddr = get("REDIRECT_METRICS_ADDR").parse().unwrap();
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let h = &c[probe]["httpGet"];
        assert_eq!(h["path"], path, "{probe}");
        assert_eq!(h["port"], addr.port(), "{probe}");
        assert_eq!(h["host"], addr.ip().to_string(), "{probe}");
    }

    // Every path the daemon uses is under a hostPath mount, and the mounts
    // the node agent needs are there.
    let volumes: Vec<(String, String)> = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["name"].as_str().unwrap().to_string(),
                v["hostPath"]["path"]
                    .as_str()
                    .expect("hostPath volumes only")
                    .to_string(),
            )
        })
        .collect();
    let mounts: Vec<(String, String)> = c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let name = m["name"].as_str().unwrap();
            let host = &volumes
                .iter()
                .find(|(n, _)| n == name)
                .unwrap_or_else(|| panic!("mount {name} has no volume"))
                .1;
            (host.clone(), m["mountPath"].as_str().unwrap().to_string())
        })
        .collect();
    for host in [
        "/sys/fs/bpf",
        "/sys/fs/cgroup",
        "/run/netns",
        "/var/run/netns",
        "/proc",
        "/opt/cni/bin",
        "/etc/cni/net.d",
        "/run/redirect",
    ] {
        assert!(
            mounts.iter().any(|(h, _)| h == host),
            "host {host} is not mounted: {mounts:?}"
        );
    }
    let mounted = |p: &str| mounts.iter().any(|(_, m)| Path::new(p).starts_with(m));
    for k in [
        "REDIRECT_PIN_DIR",
        "REDIRECT_CGROUP",
        "REDIRECT_CNI_CONF_DIR",
        "REDIRECT_CNI_BIN_DIR",
    ] {
        assert!(mounted(&get(k)), "{k}={} is not under a mount", get(k));
    }
    let socket = get("REDIRECT_SOCKET");
    assert!(
        mounted(Path::new(&socket).parent().unwrap().to_str().unwrap()),
        "socket {socket} is not on a mount"
    );
    // The CNI plugin (on the host) dials the same path the agent serves.
    assert!(
        mounts
            .iter()
            .any(|(h, m)| h == m && Path::new(&socket).starts_with(m)),
        "socket dir must be the same path on host and in the pod"
    );
    assert_eq!(socket, redirect_userspace::cni::DEFAULT_SOCKET);

    // The image: FROM scratch (nothing to pull), both static binaries
    // from the context `cargo xtask image` prepares, side by side (the
    // agent installs redirect-cni from next to itself).
    let dockerfile = std::fs::read_to_string(root().join("deploy/Dockerfile")).unwrap();
    assert!(dockerfile.contains("cargo xtask image"));
    let from: Vec<&str> = dockerfile
        .lines()
        .filter(|l| l.trim_start().to_ascii_uppercase().starts_with("FROM "))
        .collect();
    assert_eq!(from, ["FROM scratch"], "no base image: {from:?}");
    assert!(
        dockerfile
            .lines()
            .any(|l| l.trim() == "COPY redirect redirect-cni /usr/local/bin/"),
        "Dockerfile does not copy both binaries into /usr/local/bin/"
    );
    let image_cmd = c["command"][0].as_str().unwrap();
    assert_eq!(
        image_cmd, "/usr/local/bin/redirect",
        "command {image_cmd} is not where the Dockerfile puts redirect"
    );
}

/// `redirect daemon` accepts every ConfigMap value as its environment: with
/// the conflist dir pointed at nothing it gets past flag parsing and stops
/// at the conflist check, before binding or loading anything.
#[test]
fn daemon_parses_the_configmap() {
    let bin = redirect_testbed::sandbox::sibling_binary("redirect");
    if unsafe { libc::geteuid() } != 0 || !bin.exists() {
        eprintln!("skipped: needs root and the built redirect binary (cargo xtask test)");
        return;
    }
    let docs = documents();
    let data = one(&docs, "ConfigMap")["data"].as_object().unwrap().clone();
    let mut c = Command::new(&bin);
    c.arg("daemon");
    for (k, v) in &data {
        c.env(k, v.as_str().unwrap());
    }
    c.env("REDIRECT_CNI_CONF_DIR", "/nonexistent-redirect-deploy-test");
    let o = c.output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("/nonexistent-redirect-deploy-test/") && err.contains("does not exist"),
        "{err}"
    );
    // A bad value is refused by name.
    let o = Command::new(&bin)
        .arg("daemon")
        .env("REDIRECT_CNI_CAPTURE_ALL", "maybe")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains("--cni-capture-all"));
}
