//! The capture config as JSON: istio-iptables flag values by name, what
//! the CNI plugin reads from its network config and sends to the agent.

use serde::{Deserialize, Deserializer, Serialize};

use super::CaptureFlags;

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
