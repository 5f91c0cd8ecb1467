//! The agent's socket protocol: one JSON object per line each way, between
//! `redirect daemon` (the server, [`crate::agent`]) and its clients (the
//! `redirect-cni` plugin, [`crate::cni`], and the tests). Both sides use the
//! types here, so neither takes anything from the other.
//!
//! Requests ([`Request`]):
//!
//! ```text
//! {"op":"add","netns":"/run/netns/x","pod":"ns/name","container_id":"...","config":{...}}
//! {"op":"add","netns":"/run/netns/x","pod":"ns/name","container_id":"...","kubernetes":true,"pod_uid":"..."}
//! {"op":"del","netns":"/run/netns/x","container_id":"..."}      (netns may be gone or absent)
//! {"op":"check","netns":"/run/netns/x"}
//! {"op":"list"}
//! {"op":"explain","query":{"pod":"ns/name","uid":1000,"dst":"10.0.0.1:80"},"pin_dir":"/sys/fs/bpf/redirect"}
//! {"op":"trace","pod":"ns/name","filter":{"rules":["captured"]},"pin_dir":"/sys/fs/bpf/redirect"}
//! ```
//!
//! Replies: `{"ok":true,...}` with the fields of the op's reply type
//! ([`AddReply`], [`DelReply`], [`CheckReply`], [`ListReply`],
//! [`crate::explain::Explanation`], [`TraceReply`]), or
//! `{"ok":false,"kind":"<ErrorKind>","error":"<message>"}` ([`AgentError`]).
//! A client decides from `kind`, never from the message text.
//!
//! `trace` is the one op that streams: after its reply, the agent sends
//! one [`crate::trace::TraceLine`] per line (`{"event":"decision",...}`)
//! until the client closes the connection. `explain` and `trace` carry the
//! client's pin directory: an agent serving another install refuses them
//! (`other_install`), and the client reads that install itself.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::IpAddr,
    os::unix::net::UnixStream,
    path::{Component, Path, PathBuf},
    time::Duration,
};

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use serde_json::Value;

use crate::config::CaptureFlags;

/// Longest request or reply line accepted (bytes).
pub const MAX_LINE: usize = 64 * 1024;

/// A request to the agent. One lives per request line, so the size of the
/// `add` variant (its capture config inline) does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
pub enum Request {
    Add {
        netns: PathBuf,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pod: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        container_id: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        config: Option<CaptureFlags>,
        /// Decide from the Kubernetes API instead of `config`: the agent
        /// looks `pod` (`namespace/name`) up in its pod watch and captures
        /// it with the config of its Istio annotations, or passes it
        /// through when it has no sidecar (see `agent::k8s`).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        kubernetes: bool,
        /// `K8S_POD_UID` of CNI_ARGS: the pod object must be this one (not
        /// an earlier pod of the same name).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pod_uid: Option<String>,
    },
    Del {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        netns: Option<PathBuf>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pod: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        container_id: Option<String>,
    },
    Check {
        netns: PathBuf,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pod: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        container_id: Option<String>,
        /// A pod the Kubernetes API says is not in the mesh passes.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        kubernetes: bool,
    },
    List,
    /// `redirect explain`: the decision for one connection of a captured
    /// pod.
    Explain {
        query: crate::explain::Query,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pin_dir: Option<PathBuf>,
    },
    /// `redirect trace`: stream the live decisions of one pod (`netns` or
    /// `pod`) or of every pod.
    Trace {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        netns: Option<PathBuf>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pod: Option<String>,
        #[serde(default)]
        filter: crate::trace::Filter,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pin_dir: Option<PathBuf>,
    },
}

impl Request {
    pub fn op(&self) -> &'static str {
        match self {
            Request::Add { .. } => "add",
            Request::Del { .. } => "del",
            Request::Check { .. } => "check",
            Request::List => "list",
            Request::Explain { .. } => "explain",
            Request::Trace { .. } => "trace",
        }
    }
}

/// `trace`: what is traced; the lines follow.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TraceReply {
    /// The pods traced (`ns/name`, netns path or cookie), or `["*"]`.
    pub tracing: Vec<String>,
    /// The agent, reading the install's events.
    pub reader_pid: u32,
}

/// `add`: the pod is captured, or (decided from the Kubernetes API) passes
/// through with `captured: false` and the reason.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AddReply {
    pub captured: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookie: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub istio_iptables_args: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub elapsed_ms: Option<f64>,
    /// Why a pod passes through (not in the mesh).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// How long the ADD waited for the pod watch to know the pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_wait_ms: Option<f64>,
}

/// `del`: the netns cookies released (none is not an error).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DelReply {
    pub released: Vec<u64>,
    pub elapsed_ms: f64,
}

/// `check`: the pod is captured with its inbound link, or (decided from
/// the Kubernetes API) is not in the mesh.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CheckReply {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookie: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub captured: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// One captured pod of `list`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ListedPod {
    pub cookie: u64,
    pub pod: String,
    pub container_id: String,
    pub netns: String,
    pub istio_iptables_args: String,
    pub addresses: Vec<String>,
    pub inbound_attached: bool,
    pub inbound_listeners: Vec<String>,
}

/// A running mesh pod of this node the agent has not captured.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UncapturedPod {
    pub pod: String,
    pub uid: String,
}

/// `list`: the captured pods, the attached cgroups and, with the
/// Kubernetes API, the mesh pods left uncaptured.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ListReply {
    pub pods: Vec<ListedPod>,
    pub cgroups: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uncaptured: Option<Vec<UncapturedPod>>,
}

/// A successful reply, of the request's op.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    Add(AddReply),
    Del(DelReply),
    Check(CheckReply),
    List(ListReply),
    Explain(Box<crate::explain::Explanation>),
    Trace(TraceReply),
}

/// Why the agent refused or failed a request. Stable names on the wire
/// (`"kind"`); a client acts on these, not on the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The line is not a request (JSON, op, fields, size).
    BadRequest,
    /// A value of the request is refused (netns path, pod name, config).
    Invalid,
    /// The agent's view of the Kubernetes API cannot answer for the pod
    /// (pod unknown after the bounded wait, API unreachable, first list
    /// not done): the CNI plugin fails the ADD with its code 102.
    Kubernetes,
    /// The netns is not captured (`check`).
    NotCaptured,
    /// Capturing or releasing failed (kernel, install, maps).
    Failed,
    /// The peer may not use the socket (not root).
    Forbidden,
    /// The agent is stopping and takes no new requests.
    ShuttingDown,
    /// `explain`/`trace` for another install (pin directory) than the
    /// agent's: the client reads that install itself.
    OtherInstall,
}

/// A refusal from the agent: its kind and a message for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct AgentError {
    pub kind: ErrorKind,
    #[serde(rename = "error")]
    pub message: String,
}

impl AgentError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> AgentError {
        AgentError {
            kind,
            message: message.into(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> AgentError {
        AgentError::new(ErrorKind::Invalid, message)
    }

    pub fn failed(message: impl Into<String>) -> AgentError {
        AgentError::new(ErrorKind::Failed, message)
    }

    /// A library error, with the kind its variant means.
    pub fn from_error(e: &crate::error::Error) -> AgentError {
        use crate::error::Error as E;
        let kind = match e {
            E::InvalidFlag { .. }
            | E::NotNetns { .. }
            | E::NotSupported { .. }
            | E::HostNetns(_) => ErrorKind::Invalid,
            E::NotCaptured(_) | E::NotCapturedAmong { .. } => ErrorKind::NotCaptured,
            _ => ErrorKind::Failed,
        };
        AgentError::new(kind, format!("{e:#}"))
    }
}

/// One reply line (without the newline).
pub fn reply_line(r: &Result<Reply, AgentError>) -> String {
    let v = match r {
        Ok(reply) => {
            let mut v = match reply {
                Reply::Add(r) => serde_json::to_value(r),
                Reply::Del(r) => serde_json::to_value(r),
                Reply::Check(r) => serde_json::to_value(r),
                Reply::List(r) => serde_json::to_value(r),
                Reply::Explain(r) => serde_json::to_value(r),
                Reply::Trace(r) => serde_json::to_value(r),
            }
            .expect("replies serialize");
            v["ok"] = Value::Bool(true);
            v
        }
        Err(e) => {
            let mut v = serde_json::to_value(e).expect("errors serialize");
            v["ok"] = Value::Bool(false);
            v
        }
    };
    v.to_string()
}

/// Parse a reply line to a request of `op`.
pub fn parse_reply(op: &str, line: &str) -> Result<Result<Reply, AgentError>, String> {
    let v: Value = serde_json::from_str(line).map_err(|e| format!("{e}: {line:?}"))?;
    fn typed<T: DeserializeOwned>(v: Value, line: &str) -> Result<T, String> {
        serde_json::from_value(v).map_err(|e| format!("{e}: {line:?}"))
    }
    match v.get("ok").and_then(Value::as_bool) {
        Some(true) => Ok(Ok(match op {
            "add" => Reply::Add(typed(v, line)?),
            "del" => Reply::Del(typed(v, line)?),
            "check" => Reply::Check(typed(v, line)?),
            "list" => Reply::List(typed(v, line)?),
            "explain" => Reply::Explain(Box::new(typed(v, line)?)),
            "trace" => Reply::Trace(typed(v, line)?),
            other => return Err(format!("no reply type for op {other:?}")),
        })),
        Some(false) => Ok(Err(typed(v, line)?)),
        None => Err(format!("reply without \"ok\": {line:?}")),
    }
}

/// Why a netns path is refused, or Ok. Only the places runtimes put pod
/// namespaces are accepted: `/run/netns/<name>`, `/var/run/netns/<name>`
/// (not a symlink) and `/proc/<pid>/ns/net`.
pub fn check_netns_path(p: &Path) -> Result<(), String> {
    let comps: Vec<Component> = p.components().collect();
    let norm: Vec<&str> = comps
        .iter()
        .filter_map(|c| match c {
            Component::Normal(s) => s.to_str(),
            _ => None,
        })
        .collect();
    // Written exactly as "/a/b/c": no ".", "..", "//" or trailing "/".
    let clean = comps.first() == Some(&Component::RootDir)
        && comps.len() == norm.len() + 1
        && p.as_os_str().to_str() == Some(format!("/{}", norm.join("/")).as_str());
    let ok = clean
        && match norm.as_slice() {
            ["run", "netns", name] | ["var", "run", "netns", name] => !name.is_empty(),
            ["proc", pid, "ns", "net"] => {
                !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit())
            }
            _ => false,
        };
    if !ok {
        return Err(format!(
            "netns path '{}' is refused: only /run/netns/<name>, /var/run/netns/<name> and /proc/<pid>/ns/net are accepted",
            p.display()
        ));
    }
    if !p.starts_with("/proc") {
        if let Ok(m) = std::fs::symlink_metadata(p) {
            if m.file_type().is_symlink() {
                return Err(format!(
                    "netns path '{}' is refused: it is a symlink",
                    p.display()
                ));
            }
        }
    }
    Ok(())
}

/// Why a call to the agent failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CallError {
    /// No agent answering on the socket (absent, refused, timed out).
    #[error("agent unreachable: {0}")]
    Unreachable(String),
    /// The agent answered `{"ok":false,...}`.
    #[error("agent refused: {0}")]
    Refused(AgentError),
    /// The answer was not a protocol reply.
    #[error("agent protocol error: {0}")]
    Protocol(String),
}

/// One request, one reply, over the agent socket.
pub fn call(socket: &Path, req: &Request, timeout: Duration) -> Result<Reply, CallError> {
    let unreachable = |what: &str, e: std::io::Error| {
        CallError::Unreachable(format!("{what} {}: {e}", socket.display()))
    };
    let s = UnixStream::connect(socket).map_err(|e| unreachable("connecting to", e))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| unreachable("configuring", e))?;
    s.set_write_timeout(Some(timeout))
        .map_err(|e| unreachable("configuring", e))?;
    let mut line = serde_json::to_string(req).expect("requests serialize");
    line.push('\n');
    // An agent that refuses the peer answers at once and closes without
    // reading the request: the write may then fail (EPIPE) while the
    // refusal is already waiting to be read. Read it before giving up.
    let written = (&s).write_all(line.as_bytes());
    let mut reply = String::new();
    let read = BufReader::new(&s)
        .take(MAX_LINE as u64)
        .read_line(&mut reply);
    if reply.is_empty() {
        if let Err(e) = written {
            return Err(unreachable("writing to", e));
        }
        read.map_err(|e| unreachable("reading the reply from", e))?;
        return Err(CallError::Unreachable(format!(
            "{} closed the connection without a reply",
            socket.display()
        )));
    }
    match parse_reply(req.op(), reply.trim_end()) {
        Ok(Ok(r)) => Ok(r),
        Ok(Err(e)) => Err(CallError::Refused(e)),
        Err(e) => Err(CallError::Protocol(e)),
    }
}

/// The lines of a `trace` op, after its reply.
pub struct TraceStream {
    reader: BufReader<UnixStream>,
    partial: String,
}

impl TraceStream {
    /// The next line: None when none came within the stream's read
    /// timeout (the caller may stop then), Err when the agent ended the
    /// stream or sent something else.
    pub fn next_line(&mut self) -> Result<Option<crate::trace::TraceLine>, CallError> {
        match (&mut self.reader)
            .take(MAX_LINE as u64)
            .read_line(&mut self.partial)
        {
            Ok(0) => Err(CallError::Unreachable("the agent ended the trace".into())),
            Ok(_) if !self.partial.ends_with('\n') => Ok(None),
            Ok(_) => {
                let line = std::mem::take(&mut self.partial);
                if let Ok(Err(e)) = parse_reply("trace", line.trim_end()) {
                    return Err(CallError::Refused(e));
                }
                serde_json::from_str(line.trim_end())
                    .map(Some)
                    .map_err(|e| CallError::Protocol(format!("{e}: {line:?}")))
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(CallError::Unreachable(format!("reading the trace: {e}"))),
        }
    }
}

/// Start a `trace` op: its reply, and the stream of its lines (read with
/// `poll` as the read timeout, so the caller can stop between lines).
pub fn open_trace(
    socket: &Path,
    req: &Request,
    timeout: Duration,
    poll: Duration,
) -> Result<(TraceReply, TraceStream), CallError> {
    let unreachable = |what: &str, e: std::io::Error| {
        CallError::Unreachable(format!("{what} {}: {e}", socket.display()))
    };
    let s = UnixStream::connect(socket).map_err(|e| unreachable("connecting to", e))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| unreachable("configuring", e))?;
    let mut line = serde_json::to_string(req).expect("requests serialize");
    line.push('\n');
    (&s).write_all(line.as_bytes())
        .map_err(|e| unreachable("writing to", e))?;
    let mut reader = BufReader::new(s);
    let mut reply = String::new();
    (&mut reader)
        .take(MAX_LINE as u64)
        .read_line(&mut reply)
        .map_err(|e| unreachable("reading the reply from", e))?;
    if reply.is_empty() {
        return Err(CallError::Unreachable(format!(
            "{} closed the connection without a reply",
            socket.display()
        )));
    }
    let r = match parse_reply("trace", reply.trim_end()) {
        Ok(Ok(Reply::Trace(r))) => r,
        Ok(Ok(other)) => return Err(CallError::Protocol(format!("not a trace reply: {other:?}"))),
        Ok(Err(e)) => return Err(CallError::Refused(e)),
        Err(e) => return Err(CallError::Protocol(e)),
    };
    reader
        .get_ref()
        .set_read_timeout(Some(poll))
        .map_err(|e| unreachable("configuring", e))?;
    Ok((
        r,
        TraceStream {
            reader,
            partial: String::new(),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netns_paths() {
        for ok in [
            "/run/netns/pod",
            "/var/run/netns/cni-1234",
            "/proc/42/ns/net",
        ] {
            assert!(check_netns_path(Path::new(ok)).is_ok(), "{ok}");
        }
        for bad in [
            "/etc/passwd",
            "run/netns/x",
            "/run/netns/../../etc/x",
            "/run/netns/a/b",
            "/run/netns/",
            "/run/netns",
            "/proc/self/ns/net",
            "/proc/1/ns/mnt",
            "/run//netns/x",
            "/run/netns/./x",
            "",
        ] {
            assert!(check_netns_path(Path::new(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn requests_round_trip() {
        let r: Request = serde_json::from_str(r#"{"op":"add","netns":"/run/netns/x","pod":"ns/name","container_id":"c","config":{"b":"*"}}"#).unwrap();
        assert_eq!(r.op(), "add");
        let back: Request = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back.op(), "add");
        assert!(serde_json::from_str::<Request>(r#"{"op":"explode"}"#).is_err());
        assert!(matches!(
            serde_json::from_str::<Request>(r#"{"op":"list"}"#).unwrap(),
            Request::List
        ));
        assert!(serde_json::from_str::<Request>(r#"{"op":"del"}"#).is_ok());
    }

    #[test]
    fn replies_round_trip_typed() {
        let add = Reply::Add(AddReply {
            captured: true,
            cookie: Some(7),
            istio_iptables_args: Some("-p 15001".into()),
            ..Default::default()
        });
        let line = reply_line(&Ok(add.clone()));
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(
            (v["ok"].clone(), v["cookie"].clone()),
            (true.into(), 7.into())
        );
        assert_eq!(parse_reply("add", &line).unwrap().unwrap(), add);
        let err = AgentError::new(ErrorKind::Kubernetes, "pod shop/x is not known");
        let line = reply_line(&Err(err.clone()));
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(
            (v["ok"].clone(), v["kind"].clone(), v["error"].clone()),
            (
                false.into(),
                "kubernetes".into(),
                "pod shop/x is not known".into()
            )
        );
        assert_eq!(parse_reply("add", &line).unwrap().unwrap_err(), err);
        // The kind decides, whatever the message says.
        let line = r#"{"ok":false,"kind":"failed","error":"kubernetes: looks like one"}"#;
        assert_eq!(
            parse_reply("add", line).unwrap().unwrap_err().kind,
            ErrorKind::Failed
        );
        assert!(parse_reply("add", r#"{"ok":false,"error":"no kind"}"#).is_err());
        assert!(parse_reply("add", r#"{"cookie":1}"#).is_err());
        let list = Reply::List(ListReply {
            pods: vec![ListedPod {
                cookie: 3,
                pod: "ns/p".into(),
                ..Default::default()
            }],
            cgroups: vec!["/sys/fs/cgroup".into()],
            uncaptured: None,
        });
        assert_eq!(
            parse_reply("list", &reply_line(&Ok(list.clone())))
                .unwrap()
                .unwrap(),
            list
        );
    }
}
