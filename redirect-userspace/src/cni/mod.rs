//! `redirect-cni`: a chained CNI plugin (spec 1.0: ADD, DEL, CHECK,
//! VERSION) that asks the node agent (`redirect daemon`) to capture a pod
//! when the runtime sets up its network, and to release it on teardown.
//!
//! * Selection: a pod is captured only when `CNI_ARGS` has `K8S_POD_NAME`
//!   and either the plugin config says `"captureAll": true` or `CNI_ARGS`
//!   has `REDIRECT_CAPTURE=true` (`REDIRECT_CAPTURE=false` opts a pod out
//!   of `captureAll`). Other pods pass through: prevResult is echoed and the
//!   agent is not contacted.
//! * Fail closed: for a selected pod, ADD fails when the agent cannot be
//!   reached or the capture fails, so the pod never runs uncaptured.
//! * DEL always succeeds once its input is valid (the agent, the pod or the
//!   netns may be gone): the agent is asked to release the pod, and a
//!   failure is only reported on stderr (a later agent start releases pods
//!   whose netns is gone).
//!
//! The plugin logic is a pure function of the environment and stdin
//! ([`run`]), so it is tested without a runtime.

pub mod conflist;

use std::{path::PathBuf, time::Duration};

use serde::Deserialize;
use serde_json::{json, Value};

use crate::{
    config::CaptureFlags,
    wire::{self, CallError, ErrorKind, Reply, Request},
};

pub const PLUGIN_TYPE: &str = "redirect-cni";
pub const DEFAULT_SOCKET: &str = "/run/redirect/agent.sock";
pub const SUPPORTED_VERSIONS: [&str; 4] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0"];
/// How long ADD waits for the agent to capture the pod.
pub const ADD_TIMEOUT: Duration = Duration::from_secs(30);
/// How long DEL waits before giving up (it succeeds either way).
pub const DEL_TIMEOUT: Duration = Duration::from_secs(10);

/// Error codes of the CNI spec (1.0, "Error" section).
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const UNKNOWN_CONTAINER: u32 = 3;
    pub const INVALID_ENV: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODE_FAILURE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// Plugin-specific (100+): the agent refused or failed the capture.
    pub const CAPTURE_FAILED: u32 = 100;
    /// Plugin-specific: CHECK found the pod not captured.
    pub const NOT_CAPTURED: u32 = 101;
    /// Plugin-specific (`"kubernetes": true`): the agent has no view of
    /// the pod from the Kubernetes API (the pod is not known to its watch
    /// after the agent's bounded wait, or the API is unreachable).
    pub const POD_UNKNOWN: u32 = 102;
    /// Plugin-specific: an internal error (a bug).
    pub const INTERNAL: u32 = 999;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> CniError {
        CniError {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    pub fn to_json(&self, cni_version: &str) -> String {
        json!({"cniVersion": cni_version, "code": self.code, "msg": self.msg, "details": self.details}).to_string()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
}

/// The CNI_* environment of one invocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Env {
    pub command: Command,
    pub container_id: String,
    pub netns: Option<PathBuf>,
    pub ifname: String,
    pub args: Vec<(String, String)>,
}

impl Env {
    pub fn arg(&self, key: &str) -> Option<&str> {
        self.args
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// `CNI_ARGS`: `K=V` pairs separated by `;`.
pub fn parse_cni_args(s: &str) -> Result<Vec<(String, String)>, CniError> {
    let mut out = Vec::new();
    for part in s.split(';').filter(|p| !p.is_empty()) {
        let Some((k, v)) = part.split_once('=') else {
            return Err(CniError::new(
                code::INVALID_ENV,
                "invalid CNI_ARGS",
                format!("'{part}' is not KEY=VALUE (CNI_ARGS={s:?})"),
            ));
        };
        if k.is_empty() {
            return Err(CniError::new(
                code::INVALID_ENV,
                "invalid CNI_ARGS",
                format!("empty key in '{part}' (CNI_ARGS={s:?})"),
            ));
        }
        out.push((k.to_string(), v.to_string()));
    }
    Ok(out)
}

/// Read and check the CNI_* variables.
pub fn parse_env(get: &dyn Fn(&str) -> Option<String>) -> Result<Env, CniError> {
    let missing = |v: &str| {
        CniError::new(
            code::INVALID_ENV,
            format!("{v} is not set"),
            format!("the runtime must set {v}"),
        )
    };
    let command = match get("CNI_COMMAND").as_deref() {
        Some("ADD") => Command::Add,
        Some("DEL") => Command::Del,
        Some("CHECK") => Command::Check,
        Some("VERSION") => Command::Version,
        Some(other) => {
            return Err(CniError::new(
                code::INVALID_ENV,
                "unsupported CNI_COMMAND",
                format!(
                    "CNI_COMMAND={other:?}; redirect-cni implements ADD, DEL, CHECK and VERSION"
                ),
            ))
        }
        None => return Err(missing("CNI_COMMAND")),
    };
    let nonempty = |v: &str| get(v).filter(|s| !s.is_empty());
    if command == Command::Version {
        return Ok(Env {
            command,
            container_id: String::new(),
            netns: None,
            ifname: String::new(),
            args: Vec::new(),
        });
    }
    let container_id = nonempty("CNI_CONTAINERID").ok_or_else(|| missing("CNI_CONTAINERID"))?;
    let ifname = nonempty("CNI_IFNAME").ok_or_else(|| missing("CNI_IFNAME"))?;
    let netns = nonempty("CNI_NETNS").map(PathBuf::from);
    if netns.is_none() && command != Command::Del {
        return Err(missing("CNI_NETNS"));
    }
    let args = parse_cni_args(&get("CNI_ARGS").unwrap_or_default())?;
    Ok(Env {
        command,
        container_id,
        netns,
        ifname,
        args,
    })
}

/// The plugin's network config (plus what the runtime adds to it).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(rename = "type", default)]
    pub plugin_type: Option<String>,
    /// The agent's socket.
    #[serde(default)]
    pub socket: Option<PathBuf>,
    /// istio-iptables flag values over Istio's injected defaults.
    #[serde(default)]
    pub capture: Option<Value>,
    #[serde(default)]
    pub capture_all: Option<bool>,
    /// The agent decides from the Kubernetes API: every pod with
    /// `K8S_POD_NAME` is sent to it, and it captures those whose
    /// annotations put them in the mesh (`capture` and `captureAll` are
    /// then not used).
    #[serde(default)]
    pub kubernetes: Option<bool>,
    #[serde(default)]
    pub prev_result: Option<Value>,
}

impl NetConf {
    pub fn socket(&self) -> PathBuf {
        self.socket
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
    }

    /// The capture config to send: `capture` over Istio's injected one.
    pub fn capture_config(&self) -> Result<CaptureFlags, CniError> {
        let own: CaptureFlags = match &self.capture {
            None | Some(Value::Null) => CaptureFlags::default(),
            Some(v) => serde_json::from_value(v.clone()).map_err(|e| {
                CniError::new(
                    code::INVALID_CONFIG,
                    "invalid \"capture\" in the plugin config",
                    e.to_string(),
                )
            })?,
        };
        let merged = own.over(&CaptureFlags::istio_injected());
        merged
            .to_spec()
            .and_then(|spec| spec.check_supported())
            .map_err(|e| {
                CniError::new(
                    code::INVALID_CONFIG,
                    "invalid \"capture\" in the plugin config",
                    e.to_string(),
                )
            })?;
        Ok(merged)
    }
}

/// Parse stdin as the plugin config. `cni_version` is filled as soon as
/// it is known, for the error reply.
pub fn parse_conf(stdin: &[u8], cni_version: &mut String) -> Result<NetConf, CniError> {
    let v: Value = serde_json::from_slice(stdin).map_err(|e| {
        CniError::new(
            code::DECODE_FAILURE,
            "failed to decode the network config on stdin",
            e.to_string(),
        )
    })?;
    if !v.is_object() {
        return Err(CniError::new(
            code::DECODE_FAILURE,
            "failed to decode the network config on stdin",
            "expected a JSON object",
        ));
    }
    if let Some(s) = v.get("cniVersion").and_then(Value::as_str) {
        if SUPPORTED_VERSIONS.contains(&s) {
            *cni_version = s.to_string();
        }
    }
    let conf: NetConf = serde_json::from_value(v).map_err(|e| {
        CniError::new(
            code::INVALID_CONFIG,
            "invalid network config",
            e.to_string(),
        )
    })?;
    if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            "incompatible CNI version",
            format!(
                "cniVersion {:?}; redirect-cni supports {}",
                conf.cni_version,
                SUPPORTED_VERSIONS.join(", ")
            ),
        ));
    }
    if let Some(t) = &conf.plugin_type {
        if t != PLUGIN_TYPE {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                "invalid network config",
                format!("type {t:?} is not {PLUGIN_TYPE:?}"),
            ));
        }
    }
    if conf.prev_result.as_ref().is_some_and(|p| !p.is_object()) {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            "invalid network config",
            "prevResult is not an object",
        ));
    }
    Ok(conf)
}

/// Is this pod to be captured (or, with `"kubernetes": true`, sent to
/// the agent for it to decide)? (`K8S_POD_NAME` and captureAll,
/// `kubernetes` or `REDIRECT_CAPTURE=true`.)
pub fn selected(env: &Env, conf: &NetConf) -> Result<bool, CniError> {
    if env.arg("K8S_POD_NAME").is_none_or(str::is_empty) {
        return Ok(false);
    }
    match env.arg("REDIRECT_CAPTURE") {
        Some("true") => Ok(true),
        Some("false") => Ok(false),
        Some(other) => Err(CniError::new(
            code::INVALID_ENV,
            "invalid CNI_ARGS",
            format!("REDIRECT_CAPTURE={other:?}: expected true or false"),
        )),
        None => Ok(conf.capture_all.unwrap_or(false) || conf.kubernetes.unwrap_or(false)),
    }
}

/// `namespace/name` from the Kubernetes keys of CNI_ARGS.
pub fn pod_name(env: &Env) -> String {
    let ns = env
        .arg("K8S_POD_NAMESPACE")
        .filter(|s| !s.is_empty())
        .unwrap_or("default");
    format!("{ns}/{}", env.arg("K8S_POD_NAME").unwrap_or(""))
}

/// How to talk to the agent (a trait so tests can stand in for it).
pub trait AgentClient {
    fn call(
        &self,
        socket: &std::path::Path,
        req: &Request,
        timeout: Duration,
    ) -> Result<Reply, CallError>;
}

/// The real socket.
pub struct SocketClient;

impl AgentClient for SocketClient {
    fn call(
        &self,
        socket: &std::path::Path,
        req: &Request,
        timeout: Duration,
    ) -> Result<Reply, CallError> {
        wire::call(socket, req, timeout)
    }
}

/// What to print and how to exit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub stdout: String,
    pub stderr: String,
    pub exit_code: i32,
}

/// One plugin invocation.
pub fn run(
    get_env: &dyn Fn(&str) -> Option<String>,
    stdin: &[u8],
    agent: &dyn AgentClient,
) -> Outcome {
    let mut version = "1.0.0".to_string();
    let mut stderr = String::new();
    match run_inner(get_env, stdin, agent, &mut version, &mut stderr) {
        Ok(stdout) => Outcome {
            stdout,
            stderr,
            exit_code: 0,
        },
        Err(e) => Outcome {
            stdout: e.to_json(&version),
            stderr,
            exit_code: 1,
        },
    }
}

fn run_inner(
    get_env: &dyn Fn(&str) -> Option<String>,
    stdin: &[u8],
    agent: &dyn AgentClient,
    version: &mut String,
    stderr: &mut String,
) -> Result<String, CniError> {
    let env = parse_env(get_env)?;
    if env.command == Command::Version {
        // The requested version, when stdin names a known one.
        if let Ok(v) = serde_json::from_slice::<Value>(stdin) {
            if let Some(s) = v
                .get("cniVersion")
                .and_then(Value::as_str)
                .filter(|s| SUPPORTED_VERSIONS.contains(s))
            {
                *version = s.to_string();
            }
        }
        return Ok(
            json!({"cniVersion": version, "supportedVersions": SUPPORTED_VERSIONS}).to_string(),
        );
    }
    let conf = parse_conf(stdin, version)?;
    let prev = || -> Result<String, CniError> {
        match &conf.prev_result {
            Some(p) => Ok(p.to_string()),
            None => Err(CniError::new(
                code::INVALID_CONFIG,
                "redirect-cni is a chained plugin: no prevResult",
                "list it after the plugin that creates the pod's interface (e.g. bridge) in a conflist",
            )),
        }
    };
    match env.command {
        Command::Version => unreachable!(),
        Command::Add => {
            let out = prev()?;
            let kubernetes = conf.kubernetes.unwrap_or(false);
            let capture = if kubernetes {
                None
            } else {
                Some(conf.capture_config()?)
            };
            if !selected(&env, &conf)? {
                return Ok(out);
            }
            let netns = env.netns.clone().expect("checked by parse_env");
            wire::check_netns_path(&netns)
                .map_err(|e| CniError::new(code::INVALID_ENV, "invalid CNI_NETNS", e))?;
            let req = Request::Add {
                netns,
                pod: Some(pod_name(&env)),
                container_id: Some(env.container_id.clone()),
                config: capture,
                kubernetes,
                pod_uid: if kubernetes {
                    env.arg("K8S_POD_UID")
                        .filter(|s| !s.is_empty())
                        .map(str::to_string)
                } else {
                    None
                },
            };
            let reply = agent.call(&conf.socket(), &req, ADD_TIMEOUT).map_err(|e| match e {
                CallError::Unreachable(d) => CniError::new(
                    code::TRY_AGAIN_LATER,
                    "redirect agent unreachable: refusing to start the pod uncaptured",
                    d,
                ),
                CallError::Refused(e) if e.kind == ErrorKind::Kubernetes => CniError::new(
                    code::POD_UNKNOWN,
                    "redirect agent cannot see the pod in the Kubernetes API: refusing to start it uncaptured",
                    e.message,
                ),
                CallError::Refused(e) => CniError::new(code::CAPTURE_FAILED, "redirect agent could not capture the pod", e.message),
                CallError::Protocol(d) => CniError::new(code::CAPTURE_FAILED, "redirect agent could not capture the pod", d),
            })?;
            match reply {
                Reply::Add(r) if !r.captured => stderr.push_str(&format!(
                    "redirect-cni: {} passes through: {}\n",
                    pod_name(&env),
                    r.reason.as_deref().unwrap_or("not in the mesh")
                )),
                Reply::Add(_) => {}
                other => {
                    return Err(CniError::new(
                        code::CAPTURE_FAILED,
                        "redirect agent could not capture the pod",
                        format!("not an add reply: {other:?}"),
                    ))
                }
            }
            Ok(out)
        }
        Command::Check => {
            let out = prev()?;
            let kubernetes = conf.kubernetes.unwrap_or(false);
            if !kubernetes {
                conf.capture_config()?;
            }
            if !selected(&env, &conf)? {
                return Ok(out);
            }
            let netns = env.netns.clone().expect("checked by parse_env");
            wire::check_netns_path(&netns)
                .map_err(|e| CniError::new(code::INVALID_ENV, "invalid CNI_NETNS", e))?;
            let req = Request::Check {
                netns,
                pod: Some(pod_name(&env)),
                container_id: Some(env.container_id.clone()),
                kubernetes,
            };
            agent
                .call(&conf.socket(), &req, ADD_TIMEOUT)
                .map_err(|e| match e {
                    CallError::Unreachable(d) => {
                        CniError::new(code::TRY_AGAIN_LATER, "redirect agent unreachable", d)
                    }
                    CallError::Refused(e) => {
                        CniError::new(code::NOT_CAPTURED, "pod is not captured", e.message)
                    }
                    CallError::Protocol(d) => {
                        CniError::new(code::NOT_CAPTURED, "pod is not captured", d)
                    }
                })?;
            Ok(out)
        }
        Command::Del => {
            // Only pods that could have been captured (Kubernetes keys
            // present) are looked up; the selection key itself is not
            // required, as DEL may not get the ADD's CNI_ARGS.
            if env.arg("K8S_POD_NAME").is_none_or(str::is_empty) {
                return Ok(String::new());
            }
            let socket = conf.socket();
            if !socket.exists() {
                stderr.push_str(&format!("redirect-cni: DEL: no agent socket at {}: nothing released now (the agent releases pods whose netns is gone when it starts)\n", socket.display()));
                return Ok(String::new());
            }
            let netns = env
                .netns
                .clone()
                .filter(|p| match wire::check_netns_path(p) {
                    Ok(()) => true,
                    Err(e) => {
                        stderr.push_str(&format!(
                            "redirect-cni: DEL: {e}; releasing by container id only\n"
                        ));
                        false
                    }
                });
            let req = Request::Del {
                netns,
                pod: Some(pod_name(&env)),
                container_id: Some(env.container_id.clone()),
            };
            if let Err(e) = agent.call(&socket, &req, DEL_TIMEOUT) {
                stderr.push_str(&format!("redirect-cni: DEL: {e} (ignored: DEL succeeds)\n"));
            }
            Ok(String::new())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{cell::RefCell, collections::HashMap};

    struct Fake {
        reply: Result<Reply, fn() -> CallError>,
        calls: RefCell<Vec<Request>>,
    }

    impl AgentClient for Fake {
        fn call(
            &self,
            _s: &std::path::Path,
            req: &Request,
            _t: Duration,
        ) -> Result<Reply, CallError> {
            self.calls.borrow_mut().push(req.clone());
            self.reply.clone().map_err(|f| f())
        }
    }

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    const CONF: &str = r#"{"cniVersion":"1.0.0","name":"n","type":"redirect-cni","socket":"/nonexistent/agent.sock","prevResult":{"cniVersion":"1.0.0","ips":[{"address":"10.1.0.2/24"}]}}"#;

    fn add_env(args: &str) -> Vec<(&'static str, String)> {
        vec![
            ("CNI_COMMAND", "ADD".into()),
            ("CNI_CONTAINERID", "c1".into()),
            ("CNI_NETNS", "/run/netns/p".into()),
            ("CNI_IFNAME", "eth0".into()),
            ("CNI_ARGS", args.into()),
        ]
    }

    fn run_with(pairs: &[(&str, String)], stdin: &str, fake: &Fake) -> Outcome {
        let p: Vec<(&str, &str)> = pairs.iter().map(|(k, v)| (*k, v.as_str())).collect();
        run(&env(&p), stdin.as_bytes(), fake)
    }

    fn ok_fake() -> Fake {
        Fake {
            reply: Ok(Reply::Add(wire::AddReply {
                captured: true,
                cookie: Some(7),
                ..Default::default()
            })),
            calls: RefCell::new(Vec::new()),
        }
    }

    fn code_of(o: &Outcome) -> u64 {
        assert_eq!(o.exit_code, 1, "{o:?}");
        serde_json::from_str::<Value>(&o.stdout).unwrap()["code"]
            .as_u64()
            .unwrap()
    }

    #[test]
    fn unselected_pods_pass_through_without_the_agent() {
        let f = ok_fake();
        for args in [
            "",
            "IgnoreUnknown=1",
            "K8S_POD_NAME=x",
            "K8S_POD_NAME=x;REDIRECT_CAPTURE=false",
            "REDIRECT_CAPTURE=true",
        ] {
            let o = run_with(&add_env(args), CONF, &f);
            assert_eq!(o.exit_code, 0, "{args}: {o:?}");
            assert_eq!(
                serde_json::from_str::<Value>(&o.stdout).unwrap()["ips"][0]["address"],
                "10.1.0.2/24"
            );
        }
        assert!(f.calls.borrow().is_empty());
    }

    #[test]
    fn selected_pod_is_sent_with_istio_defaults() {
        let f = ok_fake();
        let o = run_with(
            &add_env(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart;REDIRECT_CAPTURE=true",
            ),
            CONF,
            &f,
        );
        assert_eq!(o.exit_code, 0, "{o:?}");
        let calls = f.calls.borrow();
        let Request::Add {
            netns,
            pod,
            container_id,
            config,
            ..
        } = &calls[0]
        else {
            panic!()
        };
        assert_eq!(
            (
                netns.to_str().unwrap(),
                pod.as_deref(),
                container_id.as_deref()
            ),
            ("/run/netns/p", Some("shop/cart"), Some("c1"))
        );
        assert_eq!(
            config.clone().unwrap().to_spec().unwrap(),
            crate::config::PodSpec::istio_default()
        );
        // captureAll selects too
        let conf = CONF.replace("\"socket\"", "\"captureAll\":true,\"socket\"");
        let f = ok_fake();
        assert_eq!(run_with(&add_env("K8S_POD_NAME=x"), &conf, &f).exit_code, 0);
        assert_eq!(f.calls.borrow().len(), 1);
    }

    #[test]
    fn kubernetes_mode_sends_every_pod_for_the_agent_to_decide() {
        let conf = CONF.replace(
            "\"socket\"",
            "\"kubernetes\":true,\"capture\":{\"d\":\"not-a-port\"},\"socket\"",
        );
        let f = ok_fake();
        let o = run_with(
            &add_env("IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart;K8S_POD_UID=u-1"),
            &conf,
            &f,
        );
        assert_eq!(o.exit_code, 0, "{o:?}");
        let calls = f.calls.borrow();
        let Request::Add {
            pod,
            config,
            kubernetes,
            pod_uid,
            ..
        } = &calls[0]
        else {
            panic!()
        };
        // No config sent (and "capture" is not used): the annotations decide.
        assert_eq!(
            (
                pod.as_deref(),
                config.is_none(),
                *kubernetes,
                pod_uid.as_deref()
            ),
            (Some("shop/cart"), true, true, Some("u-1"))
        );
        // Not a Kubernetes pod, or opted out: not sent.
        let f = ok_fake();
        for args in ["", "K8S_POD_NAME=x;REDIRECT_CAPTURE=false"] {
            assert_eq!(run_with(&add_env(args), &conf, &f).exit_code, 0);
        }
        assert!(f.calls.borrow().is_empty());
        // A pod the agent lets through: ADD succeeds, said on stderr.
        let pass = Fake {
            reply: Ok(Reply::Add(wire::AddReply {
                captured: false,
                reason: Some("no istio-proxy container".into()),
                ..Default::default()
            })),
            calls: RefCell::new(Vec::new()),
        };
        let o = run_with(&add_env("K8S_POD_NAME=dns"), &conf, &pass);
        assert_eq!(o.exit_code, 0, "{o:?}");
        assert!(
            o.stderr
                .contains("default/dns passes through: no istio-proxy container"),
            "{o:?}"
        );
        // The agent cannot see the pod: code 102; other refusals: 100.
        let unknown = Fake {
            reply: Err(|| {
                CallError::Refused(wire::AgentError::new(
                    ErrorKind::Kubernetes,
                    "pod shop/cart is not known",
                ))
            }),
            calls: RefCell::new(Vec::new()),
        };
        assert_eq!(
            code_of(&run_with(&add_env("K8S_POD_NAME=cart"), &conf, &unknown)),
            code::POD_UNKNOWN as u64
        );
        let refused = Fake {
            reply: Err(|| CallError::Refused(wire::AgentError::invalid("invalid annotation"))),
            calls: RefCell::new(Vec::new()),
        };
        assert_eq!(
            code_of(&run_with(&add_env("K8S_POD_NAME=cart"), &conf, &refused)),
            code::CAPTURE_FAILED as u64
        );
        let down = Fake {
            reply: Err(|| CallError::Unreachable("no socket".into())),
            calls: RefCell::new(Vec::new()),
        };
        assert_eq!(
            code_of(&run_with(&add_env("K8S_POD_NAME=cart"), &conf, &down)),
            code::TRY_AGAIN_LATER as u64
        );
    }

    #[test]
    fn add_fails_closed() {
        let sel = add_env("K8S_POD_NAME=x;REDIRECT_CAPTURE=true");
        let down = Fake {
            reply: Err(|| CallError::Unreachable("no socket".into())),
            calls: RefCell::new(Vec::new()),
        };
        assert_eq!(
            code_of(&run_with(&sel, CONF, &down)),
            code::TRY_AGAIN_LATER as u64
        );
        let refused = Fake {
            reply: Err(|| CallError::Refused(wire::AgentError::failed("boom"))),
            calls: RefCell::new(Vec::new()),
        };
        let o = run_with(&sel, CONF, &refused);
        assert_eq!(code_of(&o), code::CAPTURE_FAILED as u64);
        assert!(o.stdout.contains("boom"));
    }

    #[test]
    fn bad_env_is_code_4() {
        let f = ok_fake();
        let mut e = add_env("K8S_POD_NAME=x;REDIRECT_CAPTURE=true");
        e[2].1 = "/etc/passwd".into();
        assert_eq!(code_of(&run_with(&e, CONF, &f)), 4);
        assert_eq!(code_of(&run_with(&add_env("K8S_POD_NAME"), CONF, &f)), 4);
        assert_eq!(
            code_of(&run_with(
                &add_env("K8S_POD_NAME=x;REDIRECT_CAPTURE=yes"),
                CONF,
                &f
            )),
            4
        );
        for drop in ["CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"] {
            let e: Vec<_> = add_env("")
                .into_iter()
                .filter(|(k, _)| *k != drop)
                .collect();
            assert_eq!(code_of(&run_with(&e, CONF, &f)), 4, "{drop}");
        }
        let mut e = add_env("");
        e[0].1 = "GC".into();
        assert_eq!(code_of(&run_with(&e, CONF, &f)), 4);
        assert!(f.calls.borrow().is_empty());
    }

    #[test]
    fn bad_config() {
        let f = ok_fake();
        let e = add_env("K8S_POD_NAME=x;REDIRECT_CAPTURE=true");
        assert_eq!(code_of(&run_with(&e, "{not json", &f)), 6);
        assert_eq!(code_of(&run_with(&e, "[1]", &f)), 6);
        assert_eq!(code_of(&run_with(&e, "", &f)), 6);
        assert_eq!(code_of(&run_with(&e, r#"{"name":"n"}"#, &f)), 7);
        assert_eq!(
            code_of(&run_with(
                &e,
                &CONF.replace("1.0.0\",\"name", "9.9.9\",\"name"),
                &f
            )),
            1
        );
        assert_eq!(
            code_of(&run_with(
                &e,
                &CONF.replace(
                    "\"socket\"",
                    "\"capture\":{\"envoy-port\":\"0\"},\"socket\""
                ),
                &f
            )),
            7
        );
        assert_eq!(
            code_of(&run_with(
                &e,
                &CONF.replace("\"socket\"", "\"capture\":{\"bogus\":1},\"socket\""),
                &f
            )),
            7
        );
        assert_eq!(
            code_of(&run_with(
                &e,
                r#"{"cniVersion":"1.0.0","type":"redirect-cni"}"#,
                &f
            )),
            7
        );
        assert_eq!(
            code_of(&run_with(&e, &CONF.replace("redirect-cni", "bridge"), &f)),
            7
        );
        assert!(f.calls.borrow().is_empty());
        // The error names the version of the config when known.
        let o = run_with(
            &e,
            &CONF
                .replace("\"socket\"", "\"capture\":{\"bogus\":1},\"socket\"")
                .replace("1.0.0\",\"name", "0.4.0\",\"name"),
            &f,
        );
        assert_eq!(
            serde_json::from_str::<Value>(&o.stdout).unwrap()["cniVersion"],
            "0.4.0"
        );
    }

    #[test]
    fn del_always_succeeds() {
        let down = Fake {
            reply: Err(|| CallError::Unreachable("gone".into())),
            calls: RefCell::new(Vec::new()),
        };
        let mut e = add_env("K8S_POD_NAME=x");
        e[0].1 = "DEL".into();
        // No socket file: not even tried.
        let o = run_with(&e, CONF, &down);
        assert_eq!((o.exit_code, o.stdout.as_str()), (0, ""));
        assert!(down.calls.borrow().is_empty());
        // Socket present but the agent fails: still success.
        let dir = std::env::temp_dir().join(format!("rd-cni-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("agent.sock");
        std::fs::write(&sock, "").unwrap();
        let conf = CONF.replace("/nonexistent/agent.sock", sock.to_str().unwrap());
        let e2: Vec<_> = e
            .iter()
            .filter(|(k, _)| *k != "CNI_NETNS")
            .cloned()
            .collect();
        let o = run_with(&e2, &conf, &down);
        assert_eq!(o.exit_code, 0, "{o:?}");
        let Request::Del {
            netns,
            container_id,
            ..
        } = &down.calls.borrow()[0]
        else {
            panic!()
        };
        assert_eq!((netns.clone(), container_id.as_deref()), (None, Some("c1")));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn version() {
        let o = run(&env(&[("CNI_COMMAND", "VERSION")]), b"", &ok_fake());
        let v: Value = serde_json::from_str(&o.stdout).unwrap();
        assert_eq!(v["cniVersion"], "1.0.0");
        assert!(v["supportedVersions"]
            .as_array()
            .unwrap()
            .contains(&json!("0.4.0")));
        let o = run(
            &env(&[("CNI_COMMAND", "VERSION")]),
            br#"{"cniVersion":"0.4.0"}"#,
            &ok_fake(),
        );
        assert_eq!(
            serde_json::from_str::<Value>(&o.stdout).unwrap()["cniVersion"],
            "0.4.0"
        );
    }

    #[test]
    fn cni_args() {
        assert_eq!(
            parse_cni_args("A=1;B=;C=x=y").unwrap(),
            vec![
                ("A".into(), "1".into()),
                ("B".into(), "".into()),
                ("C".into(), "x=y".into())
            ]
        );
        assert!(parse_cni_args("A=1;B").is_err());
        assert!(parse_cni_args("=1").is_err());
    }
}
