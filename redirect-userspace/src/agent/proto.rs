//! The agent's socket protocol (one JSON object per line each way) and the
//! capture config carried in it, which the CNI plugin also reads from its
//! network config.
//!
//! Requests:
//!
//! ```text
//! {"op":"add","netns":"/run/netns/x","pod":"ns/name","container_id":"...","config":{...}}
//! {"op":"add","netns":"/run/netns/x","pod":"ns/name","container_id":"...","kubernetes":true,"pod_uid":"..."}
//! {"op":"del","netns":"/run/netns/x","container_id":"..."}      (netns may be gone or absent)
//! {"op":"check","netns":"/run/netns/x"}
//! {"op":"list"}
//! ```
//!
//! Replies: `{"ok":true,...}` or `{"ok":false,"error":"..."}`.

use std::{
    io::{BufRead, BufReader, Read, Write},
    os::unix::net::UnixStream,
    path::{Component, Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Deserializer, Serialize};

use crate::config::CaptureFlags;

/// Longest request or reply line accepted (bytes).
pub const MAX_LINE: usize = 64 * 1024;

/// An istio-iptables flag value: a string, a number, or a list of them
/// (joined with commas), so `"15090,15021"` and `[15090, 15021]` both work.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct FlagValue(pub String);

impl<'de> Deserialize<'de> for FlagValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum One {
            S(String),
            N(u64),
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum V {
            One(One),
            List(Vec<One>),
        }
        let s = |o: One| match o {
            One::S(s) => s,
            One::N(n) => n.to_string(),
        };
        Ok(FlagValue(
            match V::deserialize(d).map_err(|_| {
                serde::de::Error::custom("expected a string, a number or a list of them")
            })? {
                V::One(o) => s(o),
                V::List(l) => l.into_iter().map(s).collect::<Vec<_>>().join(","),
            },
        ))
    }
}

/// istio-iptables flag values by long name (the letters and `redirect
/// attach`'s aliases are accepted too). Unknown keys are errors: a knob
/// that silently does nothing is worse than a refused config.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaptureConfig {
    #[serde(
        rename = "envoy-port",
        alias = "proxy-port",
        alias = "p",
        skip_serializing_if = "Option::is_none",
        default
    )]
    pub proxy_port: Option<FlagValue>,
    #[serde(
        rename = "inbound-capture-port",
        alias = "z",
        skip_serializing_if = "Option::is_none",
        default
    )]
    pub inbound_port: Option<FlagValue>,
    #[serde(
        rename = "inbound-tunnel-port",
        alias = "e",
        skip_serializing_if = "Option::is_none",
        default
    )]
    pub tunnel_port: Option<FlagValue>,
    #[serde(
        rename = "proxy-uid",
        alias = "u",
        skip_serializing_if = "Option::is_none",
        default
    )]
    pub proxy_uid: Option<FlagValue>,
    #[serde(
        rename = "proxy-gid",
        alias = "g",
        skip_serializing_if = "Option::is_none",
        default
    )]
    pub proxy_gid: Option<FlagValue>,
    #[serde(
        rename = "istio-inbound-interception-mode",
        alias = "m",
        skip_serializing_if = "Option::is_none",
        default
    )]
    pub mode: Option<FlagValue>,
    #[serde(
        rename = "istio-service-cidr",
        alias = "include-outbound-ip-ranges",
        alias = "i",
        skip_serializing_if = "Option::is_none",
        default
    )]
    pub include_cidrs: Option<FlagValue>,
    #[serde(
        rename = "istio-service-exclude-cidr",
        alias = "exclude-outbound-ip-ranges",
        alias = "x",
        skip_serializing_if = "Option::is_none",
        default
    )]
    pub exclude_cidrs: Option<FlagValue>,
    #[serde(
        rename = "istio-include-outbound-ports",
        alias = "include-outbound-ports",
        alias = "q",
        skip_serializing_if = "Option::is_none",
        default
    )]
    pub include_out_ports: Option<FlagValue>,
    #[serde(
        rename = "istio-local-outbound-ports-exclude",
        alias = "exclude-outbound-ports",
        alias = "o",
        skip_serializing_if = "Option::is_none",
        default
    )]
    pub exclude_out_ports: Option<FlagValue>,
    #[serde(
        rename = "istio-inbound-ports",
        alias = "include-inbound-ports",
        alias = "b",
        skip_serializing_if = "Option::is_none",
        default
    )]
    pub include_in_ports: Option<FlagValue>,
    #[serde(
        rename = "istio-local-exclude-ports",
        alias = "exclude-inbound-ports",
        alias = "d",
        skip_serializing_if = "Option::is_none",
        default
    )]
    pub exclude_in_ports: Option<FlagValue>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub accel: Option<bool>,
    /// `true`: `--accel-short-conns`.
    #[serde(
        rename = "accel-short-conns",
        skip_serializing_if = "Option::is_none",
        default
    )]
    pub accel_short_conns: Option<bool>,
}

impl CaptureConfig {
    /// Istio's injected init arguments (`-p 15001 -z 15006 -u 1337 -m
    /// REDIRECT -i '*' -x "" -b '*' -d 15090,15021,15020`), the CNI
    /// plugin's defaults.
    pub fn istio_injected() -> CaptureConfig {
        let v = |s: &str| Some(FlagValue(s.into()));
        CaptureConfig {
            proxy_port: v("15001"),
            inbound_port: v("15006"),
            proxy_uid: v("1337"),
            mode: v("REDIRECT"),
            include_cidrs: v("*"),
            exclude_cidrs: v(""),
            include_in_ports: v("*"),
            exclude_in_ports: v("15090,15021,15020"),
            ..CaptureConfig::default()
        }
    }

    /// `self`'s values over `base`'s.
    pub fn over(&self, base: &CaptureConfig) -> CaptureConfig {
        macro_rules! pick {
            ($($f:ident),*) => { CaptureConfig { $($f: self.$f.clone().or_else(|| base.$f.clone())),* } };
        }
        pick!(
            proxy_port,
            inbound_port,
            tunnel_port,
            proxy_uid,
            proxy_gid,
            mode,
            include_cidrs,
            exclude_cidrs,
            include_out_ports,
            exclude_out_ports,
            include_in_ports,
            exclude_in_ports,
            accel,
            accel_short_conns
        )
    }

    /// The flags, with istio-iptables' defaults for what is not set (as
    /// `redirect attach` would see them).
    pub fn to_flags(&self) -> CaptureFlags {
        let mut f = CaptureFlags::defaults();
        let set = |dst: &mut String, v: &Option<FlagValue>| {
            if let Some(v) = v {
                *dst = v.0.clone();
            }
        };
        set(&mut f.proxy_port, &self.proxy_port);
        set(&mut f.inbound_port, &self.inbound_port);
        set(&mut f.tunnel_port, &self.tunnel_port);
        set(&mut f.proxy_uid, &self.proxy_uid);
        if let Some(g) = &self.proxy_gid {
            f.proxy_gid = Some(g.0.clone());
        }
        set(&mut f.mode, &self.mode);
        set(&mut f.include_cidrs, &self.include_cidrs);
        set(&mut f.exclude_cidrs, &self.exclude_cidrs);
        set(&mut f.include_out_ports, &self.include_out_ports);
        set(&mut f.exclude_out_ports, &self.exclude_out_ports);
        set(&mut f.include_in_ports, &self.include_in_ports);
        set(&mut f.exclude_in_ports, &self.exclude_in_ports);
        // true: --accel, false: --no-accel, absent: as the kernel probe says.
        f.accel = self.accel == Some(true);
        f.no_accel = self.accel == Some(false);
        f.accel_short_conns = self.accel_short_conns == Some(true);
        f
    }
}

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
        config: Option<CaptureConfig>,
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
}

impl Request {
    pub fn op(&self) -> &'static str {
        match self {
            Request::Add { .. } => "add",
            Request::Del { .. } => "del",
            Request::Check { .. } => "check",
            Request::List => "list",
        }
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
#[derive(Debug)]
pub enum CallError {
    /// No agent answering on the socket (absent, refused, timed out).
    Unreachable(String),
    /// The agent answered `{"ok":false,...}`.
    Refused(String),
    /// The answer was not a protocol reply.
    Protocol(String),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Unreachable(s) => write!(f, "agent unreachable: {s}"),
            CallError::Refused(s) => write!(f, "agent refused: {s}"),
            CallError::Protocol(s) => write!(f, "agent protocol error: {s}"),
        }
    }
}

impl std::error::Error for CallError {}

/// One request, one reply (`ok` true), over the agent socket.
pub fn call(
    socket: &Path,
    req: &Request,
    timeout: Duration,
) -> Result<serde_json::Value, CallError> {
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
    let v: serde_json::Value =
        serde_json::from_str(&reply).map_err(|e| CallError::Protocol(format!("{e}: {reply:?}")))?;
    match v.get("ok").and_then(|o| o.as_bool()) {
        Some(true) => Ok(v),
        Some(false) => Err(CallError::Refused(
            v.get("error")
                .and_then(|e| e.as_str())
                .unwrap_or("no reason given")
                .to_string(),
        )),
        None => Err(CallError::Protocol(format!(
            "reply without \"ok\": {reply:?}"
        ))),
    }
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
    fn capture_config_values_and_aliases() {
        let c: CaptureConfig = serde_json::from_str(
            r#"{"d":[15090,15021],"istio-service-cidr":"*","envoy-port":15001,"accel":true}"#,
        )
        .unwrap();
        assert_eq!(c.exclude_in_ports, Some(FlagValue("15090,15021".into())));
        assert_eq!(c.proxy_port, Some(FlagValue("15001".into())));
        let f = c.to_flags();
        assert_eq!(
            (f.include_cidrs.as_str(), f.accel, f.no_accel),
            ("*", true, false)
        );
        let off: CaptureConfig = serde_json::from_str(r#"{"accel":false}"#).unwrap();
        let f = off.to_flags();
        assert_eq!((f.accel, f.no_accel), (false, true));
        let auto: CaptureConfig = serde_json::from_str("{}").unwrap();
        let f = auto.to_flags();
        assert_eq!(
            (f.accel, f.no_accel, f.accel_short_conns),
            (false, false, false)
        );
        let all: CaptureConfig =
            serde_json::from_str(r#"{"accel":true,"accel-short-conns":true}"#).unwrap();
        assert!(all.to_flags().to_spec().unwrap().accel_short_conns);
        let e =
            serde_json::from_str::<CaptureConfig>(r#"{"accel":false,"accel-short-conns":true}"#)
                .unwrap()
                .to_flags()
                .to_spec()
                .unwrap_err()
                .to_string();
        assert!(
            e.contains("--accel-short-conns") && e.contains("--no-accel"),
            "{e}"
        );
        assert!(serde_json::from_str::<CaptureConfig>(r#"{"exclude-inbound-portz":"1"}"#).is_err());
        assert!(serde_json::from_str::<CaptureConfig>(r#"{"d":{"a":1}}"#).is_err());
        let merged = CaptureConfig {
            exclude_in_ports: Some(FlagValue("".into())),
            ..Default::default()
        }
        .over(&CaptureConfig::istio_injected());
        let spec = merged.to_flags().to_spec().unwrap();
        assert!(spec.exclude_inbound_ports.is_empty() && spec.include_all_outbound);
        assert_eq!(
            CaptureConfig::istio_injected()
                .to_flags()
                .to_spec()
                .unwrap(),
            crate::config::PodSpec::istio_default()
        );
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
}
