//! The values given for the rows of the flag table, wherever they came
//! from (command line, environment, the agent's JSON config, pod
//! annotations, the injector's defaults), and their validation into a
//! [`PodSpec`] and this run's [`RunOptions`].

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use serde::{
    de::{self, MapAccess, Visitor},
    ser::SerializeMap,
    Deserialize, Deserializer, Serialize, Serializer,
};

use super::{
    parse,
    table::{FlagDef, Kind, Scope, Status, Target, TABLE},
    AccelMode, Flag, PodSpec,
};
use crate::error::Error;

/// Where a value came from (for messages).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    CommandLine,
    /// This environment variable.
    Env(&'static str),
    /// The agent's (or the CNI plugin's) JSON config.
    Config,
    /// This pod annotation (or securityContext field).
    Annotation(&'static str),
    /// Istio's injector default.
    Injected,
}

/// A value for a row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Given {
    pub value: String,
    pub from: Source,
}

/// Flag values by row. What is not given takes istio-iptables' default.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CaptureFlags {
    given: BTreeMap<Flag, Given>,
}

/// A refused value: which row, from where, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlagError {
    pub flag: Flag,
    pub from: Option<Source>,
    pub value: String,
    pub reason: String,
}

impl FlagError {
    /// The flag as the message names it: the flag, or the variable or
    /// annotation the value came from with the flag it feeds.
    pub fn field(&self) -> String {
        let d = FlagDef::get(self.flag);
        match self.from {
            Some(Source::Env(v)) if d.long.is_some() => format!("{v} (for {})", d.name()),
            Some(Source::Annotation(a)) => format!("{a} (istio-init {})", d.name()),
            _ => d.name(),
        }
    }
}

impl From<FlagError> for Error {
    fn from(e: FlagError) -> Error {
        Error::InvalidFlag {
            field: e.field(),
            value: e.value,
            reason: e.reason,
        }
    }
}

/// The options of one run of `redirect attach` / `redirect istio-iptables`
/// (the rows of scope `Run`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunOptions {
    pub dry_run: bool,
    pub skip_rule_apply: bool,
    pub run_validation: bool,
    pub probe_port: u16,
    pub probe_timeout: Duration,
    pub network_namespace: Option<PathBuf>,
    pub cleanup_only: bool,
    /// `--dns-resolv-conf`: the pod's resolv.conf.
    pub dns_resolv_conf: Option<PathBuf>,
    /// `--pod-root`: the pod's root directory.
    pub pod_root: Option<PathBuf>,
}

impl Default for RunOptions {
    fn default() -> RunOptions {
        RunOptions {
            dry_run: false,
            skip_rule_apply: false,
            run_validation: false,
            probe_port: 15002,
            probe_timeout: Duration::from_secs(5),
            network_namespace: None,
            cleanup_only: false,
            dns_resolv_conf: None,
            pod_root: None,
        }
    }
}

/// A flag given that has no effect (for the dry run and the logs).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Ignored {
    pub flag: String,
    pub value: String,
    pub reason: &'static str,
}

impl CaptureFlags {
    /// Nothing given: istio-iptables' defaults.
    pub fn new() -> CaptureFlags {
        CaptureFlags::default()
    }

    /// Alias of [`CaptureFlags::new`]: the flag defaults, as a command
    /// line without flags gives them.
    pub fn defaults() -> CaptureFlags {
        CaptureFlags::default()
    }

    /// What Istio's injector passes to `istio-init` by default (`-p 15001
    /// -z 15006 -u 1337 -m REDIRECT -i '*' -x "" -b '*' -d
    /// 15090,15021,15020`), the CNI plugin's defaults.
    pub fn istio_injected() -> CaptureFlags {
        let mut f = CaptureFlags::new();
        for d in &TABLE {
            if let (Some(v), Scope::Pod) = (d.injected, d.scope) {
                f.set_from(d.flag, v, Source::Injected);
            }
        }
        f
    }

    /// Set a value given on the command line.
    pub fn set(&mut self, flag: Flag, value: impl Into<String>) {
        self.set_from(flag, value, Source::CommandLine)
    }

    pub fn set_from(&mut self, flag: Flag, value: impl Into<String>, from: Source) {
        self.given.insert(
            flag,
            Given {
                value: value.into(),
                from,
            },
        );
    }

    /// Forget a value (back to the default).
    pub fn unset(&mut self, flag: Flag) {
        self.given.remove(&flag);
    }

    pub fn given(&self, flag: Flag) -> Option<&Given> {
        self.given.get(&flag)
    }

    /// The value in effect: given, else istio-iptables' default.
    pub fn get(&self, flag: Flag) -> &str {
        self.given
            .get(&flag)
            .map_or(FlagDef::get(flag).default, |g| g.value.as_str())
    }

    /// `self`'s values over `base`'s.
    pub fn over(&self, base: &CaptureFlags) -> CaptureFlags {
        let mut out = base.clone();
        for (f, g) in &self.given {
            out.given.insert(*f, g.clone());
        }
        out
    }

    /// Read the environment for the rows not given on the command line, as
    /// istio-iptables does: a row's variables in order, the last one set
    /// wins; the command line wins over all of them.
    pub fn fill_from_env(&mut self, env: &dyn Fn(&str) -> Option<String>) {
        for d in &TABLE {
            if self.given.contains_key(&d.flag) {
                continue;
            }
            let mut found = None;
            for var in d.env {
                if let Some(v) = env(var) {
                    found = Some((v, *var));
                }
            }
            if let Some((v, var)) = found {
                self.set_from(d.flag, v, Source::Env(var));
            }
        }
    }

    /// How a message names where `flag`'s value came from: the flag, or
    /// the variable or annotation with the flag it feeds.
    pub fn field_name(&self, flag: Flag) -> String {
        self.err(flag, "").field()
    }

    fn err(&self, flag: Flag, reason: impl Into<String>) -> FlagError {
        FlagError {
            flag,
            from: self.given.get(&flag).map(|g| g.from),
            value: self.get(flag).to_string(),
            reason: reason.into(),
        }
    }

    fn on(&self, flag: Flag) -> bool {
        parse::bool(self.get(flag)).unwrap_or(false)
    }

    /// Validate every pod row; the first bad value is reported with its
    /// flag (or variable, or annotation) and value.
    pub fn to_spec(&self) -> Result<PodSpec, Error> {
        self.try_spec().map_err(Error::from)
    }

    /// [`CaptureFlags::to_spec`] with the error as data.
    pub fn try_spec(&self) -> Result<PodSpec, FlagError> {
        // clap refuses nothing here: every combination comes through the
        // agent's JSON config and the environment too.
        if self.on(Flag::Accel) && self.on(Flag::NoAccel) {
            return Err(self.err(
                Flag::Accel,
                "conflicts with --no-accel (acceleration off): drop one of them",
            ));
        }
        if self.on(Flag::AccelShortConns) && self.on(Flag::NoAccel) {
            return Err(self.err(
                Flag::AccelShortConns,
                "conflicts with --no-accel (acceleration off): drop one of them",
            ));
        }
        let mut spec = PodSpec::blank();
        for d in TABLE.iter().filter(|d| d.scope == Scope::Pod) {
            let v = self.get(d.flag);
            let r = match d.target {
                Target::Spec(apply) => apply(&mut spec, v),
                Target::Check(check) => check(v),
                Target::Run(_) => Ok(()),
            };
            r.map_err(|why| self.err(d.flag, why))?;
        }
        // No -u: the uid of $ENVOY_USER's user, else 1337 (istio-iptables'
        // default); no -g: the -u list. Given empty, they stay empty (a
        // proxy known by its gid only, or uid only), which istio-iptables
        // cannot express; both empty is refused below.
        if spec.proxy_uids.is_empty() && self.given(Flag::ProxyUid).is_none() {
            spec.proxy_uids = vec![uid_of(self.get(Flag::EnvoyUser)).unwrap_or(1337)];
        }
        if spec.proxy_gids.is_empty() && self.given(Flag::ProxyGid).is_none() {
            spec.proxy_gids = spec.proxy_uids.clone();
        }
        if spec.proxy_uids.is_empty() && spec.proxy_gids.is_empty() {
            return Err(self.err(
                Flag::ProxyUid,
                "no proxy uid or gid given: the proxy's own traffic would loop back into it",
            ));
        }
        spec.accel_mode = match (self.on(Flag::Accel), self.on(Flag::NoAccel)) {
            (true, _) => AccelMode::Forced,
            (false, true) => AccelMode::Off,
            (false, false) => AccelMode::Auto,
        };
        spec.coherent().map_err(|(flag, why)| self.err(flag, why))?;
        Ok(spec)
    }

    /// This run's options (the `Run` rows), validated.
    pub fn run_options(&self) -> Result<RunOptions, Error> {
        let mut r = RunOptions::default();
        for d in TABLE.iter().filter(|d| d.scope == Scope::Run) {
            let v = self.get(d.flag);
            let res = match d.target {
                Target::Run(apply) => apply(&mut r, v),
                Target::Check(check) => check(v),
                Target::Spec(_) => Ok(()),
            };
            res.map_err(|why| Error::from(self.err(d.flag, why)))?;
        }
        Ok(r)
    }

    /// The given flags that have no effect, with the reason.
    pub fn ignored(&self) -> Vec<Ignored> {
        self.given
            .iter()
            .filter_map(|(f, g)| match FlagDef::get(*f).status {
                Status::NoOp(reason) => Some(Ignored {
                    flag: FlagDef::get(*f).name(),
                    value: g.value.clone(),
                    reason,
                }),
                _ => None,
            })
            .collect()
    }
}

/// A user's uid from this machine's user database.
fn uid_of(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut out: *mut libc::passwd = std::ptr::null_mut();
    let r = unsafe { libc::getpwnam_r(c.as_ptr(), &mut pw, buf.as_mut_ptr(), buf.len(), &mut out) };
    (r == 0 && !out.is_null()).then_some(pw.pw_uid)
}

// ------------------------------------------------------------------ JSON

/// The JSON form (the agent's `config`, the CNI plugin's `capture`): the
/// given pod rows by long name (env-only rows by variable). Booleans are
/// JSON booleans, other values strings.
impl Serialize for CaptureFlags {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let rows: Vec<(&FlagDef, &Given)> = self
            .given
            .iter()
            .map(|(f, g)| (FlagDef::get(*f), g))
            .filter(|(d, _)| d.scope == Scope::Pod)
            .collect();
        let mut m = s.serialize_map(Some(rows.len()))?;
        for (d, g) in rows {
            match (d.kind, parse::bool(&g.value)) {
                (Kind::Bool, Ok(b)) => m.serialize_entry(d.key(), &b)?,
                _ => m.serialize_entry(d.key(), &g.value)?,
            }
        }
        m.end()
    }
}

/// Read from JSON: a key is a row's long name, an alias, its letter, or
/// (env-only rows) its variable. A value is a string, a number, a boolean
/// or a list of strings and numbers (joined with commas: `[15090, 15021]`
/// is `"15090,15021"`). `"accel": false` means `--no-accel` (acceleration
/// has three states on the wire). Unknown keys, keys of a command-line run
/// (`dry-run`, ...), a key given twice and other value types are refused:
/// a knob that silently does nothing is worse than a refused config.
impl<'de> Deserialize<'de> for CaptureFlags {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = CaptureFlags;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object of istio-iptables flag values")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<CaptureFlags, A::Error> {
                let mut out = CaptureFlags::new();
                while let Some(key) = m.next_key::<String>()? {
                    let Some(d) = TABLE.iter().find(|d| d.is_named(&key)) else {
                        return Err(de::Error::custom(format!(
                            "unknown capture config key {key:?} (keys are istio-iptables' long flag names, their letters, or redirect's aliases)"
                        )));
                    };
                    if d.scope == Scope::Run {
                        return Err(de::Error::custom(format!(
                            "{key:?} ({}) is not part of a pod's capture config: it only applies to one command-line run",
                            d.name()
                        )));
                    }
                    let value: JsonValue = m.next_value()?;
                    let value = value.into_string().map_err(|why| {
                        de::Error::custom(format!("{key:?} ({}): {why}", d.name()))
                    })?;
                    let (flag, value) = if d.flag == Flag::Accel && parse::bool(&value) == Ok(false)
                    {
                        (Flag::NoAccel, "true".to_string())
                    } else {
                        (d.flag, value)
                    };
                    if out.given.contains_key(&flag) {
                        return Err(de::Error::custom(format!(
                            "{key:?}: {} is given twice",
                            FlagDef::get(flag).name()
                        )));
                    }
                    out.set_from(flag, value, Source::Config);
                }
                Ok(out)
            }
        }
        d.deserialize_map(V)
    }
}

/// One JSON value of the config.
#[derive(Deserialize)]
#[serde(untagged)]
enum JsonValue {
    S(String),
    B(bool),
    N(u64),
    L(Vec<JsonScalar>),
    Other(serde::de::IgnoredAny),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum JsonScalar {
    S(String),
    N(u64),
    Other(serde::de::IgnoredAny),
}

impl JsonValue {
    fn into_string(self) -> Result<String, String> {
        const WHAT: &str =
            "expected a string, a number, a boolean or a list of strings and numbers";
        let scalar = |s: JsonScalar| match s {
            JsonScalar::S(s) => Ok(s),
            JsonScalar::N(n) => Ok(n.to_string()),
            JsonScalar::Other(_) => Err(WHAT.to_string()),
        };
        match self {
            JsonValue::S(s) => Ok(s),
            JsonValue::B(b) => Ok(b.to_string()),
            JsonValue::N(n) => Ok(n.to_string()),
            JsonValue::L(l) => Ok(l
                .into_iter()
                .map(scalar)
                .collect::<Result<Vec<_>, _>>()?
                .join(",")),
            JsonValue::Other(_) => Err(WHAT.into()),
        }
    }
}

// ------------------------------------------------------------------ clap

/// The clap argument of a row (rows without a long name have none).
fn arg(d: &'static FlagDef) -> Option<clap::Arg> {
    use clap::{Arg, ArgAction};
    let long = d.long?;
    let mut help = d.help.to_string();
    if !d.default.is_empty() {
        help.push_str(&format!(" [default: {}]", d.default));
    }
    if !d.env.is_empty() {
        help.push_str(&format!(
            " [env, read by `redirect istio-iptables`: {}]",
            d.env.join(", ")
        ));
    }
    match d.status {
        Status::Works => {}
        Status::NoOp(why) => help.push_str(&format!(" (accepted, no effect: {why})")),
        Status::NotYet { missing, .. } => help.push_str(&format!(
            " (not supported yet, refused when set: {missing})"
        )),
    }
    let mut a = Arg::new(long)
        .long(long)
        .help(help)
        .action(ArgAction::Set)
        .overrides_with(long)
        .allow_hyphen_values(true);
    if let Some(c) = d.short {
        a = a.short(c);
    }
    if !d.aliases.is_empty() {
        a = a.visible_aliases(d.aliases.iter().copied());
    }
    a = match d.kind {
        Kind::Bool => a
            .num_args(0..=1)
            .require_equals(true)
            .default_missing_value("true")
            .value_name("BOOL"),
        Kind::Text => a.num_args(1).value_name("VALUE"),
    };
    if matches!(d.origin, super::table::Origin::IstioOlder) {
        a = a.hide(true);
    }
    Some(a)
}

impl clap::Args for CaptureFlags {
    fn augment_args(mut cmd: clap::Command) -> clap::Command {
        for d in &TABLE {
            if let Some(a) = arg(d) {
                cmd = cmd.arg(a);
            }
        }
        cmd
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_args(cmd)
    }
}

impl clap::FromArgMatches for CaptureFlags {
    fn from_arg_matches(m: &clap::ArgMatches) -> Result<Self, clap::Error> {
        let mut f = CaptureFlags::new();
        f.update_from_arg_matches(m)?;
        Ok(f)
    }

    fn update_from_arg_matches(&mut self, m: &clap::ArgMatches) -> Result<(), clap::Error> {
        for d in &TABLE {
            let Some(long) = d.long else { continue };
            if m.value_source(long) == Some(clap::parser::ValueSource::CommandLine) {
                if let Some(v) = m.get_one::<String>(long) {
                    self.set(d.flag, v.clone());
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        f: CaptureFlags,
    }

    fn cli(args: &[&str]) -> Result<CaptureFlags, clap::Error> {
        Cli::try_parse_from(std::iter::once("x").chain(args.iter().copied())).map(|c| c.f)
    }

    #[test]
    fn letters_long_names_aliases_and_bools() {
        let f = cli(&[
            "-p",
            "15101",
            "--inbound-capture-port=15106",
            "--istio-include-outbound-ports",
            "443",
            "-q",
            "8443",
            "--redirect-dns",
            "--drop-invalid=false",
            "-n",
            "--log_output_level=default:info",
            "--log_as_json",
        ])
        .unwrap();
        assert_eq!(f.get(Flag::EnvoyPort), "15101");
        assert_eq!(f.get(Flag::InboundCapturePort), "15106");
        // Repeated: the last one wins (pflag).
        assert_eq!(f.get(Flag::OutboundPorts), "8443");
        assert_eq!(f.get(Flag::RedirectDns), "true");
        assert_eq!(f.get(Flag::DropInvalid), "false");
        assert_eq!(f.get(Flag::DryRun), "true");
        assert_eq!(f.given(Flag::InboundTunnelPort), None);
        assert_eq!(f.get(Flag::InboundTunnelPort), "15008");
        assert!(f.run_options().unwrap().dry_run);
        let ig: Vec<String> = f.ignored().into_iter().map(|i| i.flag).collect();
        assert_eq!(
            ig,
            vec!["--drop-invalid", "--log_output_level", "--log_as_json"]
        );
        assert!(cli(&["--bogus"]).is_err());
        assert!(cli(&["-p"]).is_err());
    }

    #[test]
    fn env_precedence_is_istio_iptables() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let mut f = cli(&["-i", "10.0.0.0/8"]).unwrap();
        f.fill_from_env(&env(&[
            ("ISTIO_SERVICE_CIDR", "*"),
            ("ISTIO_INBOUND_PORTS", "*"),
            ("REDIRECT_DNS", "false"),
            ("ISTIO_META_DNS_CAPTURE", "true"),
            ("ENVOY_PORT", "1"),
        ]));
        // The command line wins; the extra name wins over the flag's own.
        assert_eq!(f.get(Flag::ServiceCidr), "10.0.0.0/8");
        assert_eq!(f.get(Flag::InboundPorts), "*");
        assert_eq!(
            f.given(Flag::RedirectDns).unwrap().from,
            Source::Env("ISTIO_META_DNS_CAPTURE")
        );
        assert_eq!(f.get(Flag::RedirectDns), "true");
        // -p has no variable.
        assert_eq!(f.get(Flag::EnvoyPort), "15001");
        let mut f = CaptureFlags::new();
        f.fill_from_env(&env(&[("INBOUND_CAPTURE_PORT", "x")]));
        let e = f.to_spec().unwrap_err().to_string();
        assert!(
            e.contains("INBOUND_CAPTURE_PORT (for -z/--inbound-capture-port)") && e.contains("'x'"),
            "{e}"
        );
    }

    #[test]
    fn json_names_values_and_refusals() {
        let f: CaptureFlags = serde_json::from_str(
            r#"{"d":[15090,15021],"istio-service-cidr":"*","envoy-port":15001,"accel":true,"redirect-dns":false,"ISTIO_OUTBOUND_OWNER_GROUPS":"*"}"#,
        )
        .unwrap();
        assert_eq!(f.get(Flag::LocalExcludePorts), "15090,15021");
        assert_eq!(f.get(Flag::EnvoyPort), "15001");
        assert_eq!(f.get(Flag::RedirectDns), "false");
        let back: CaptureFlags = serde_json::from_str(&serde_json::to_string(&f).unwrap()).unwrap();
        assert_eq!(back, f);
        let off: CaptureFlags = serde_json::from_str(r#"{"accel":false}"#).unwrap();
        assert_eq!(off.to_spec().unwrap().accel_mode, AccelMode::Off);
        for (bad, want) in [
            (
                r#"{"exclude-inbound-portz":"1"}"#,
                "unknown capture config key",
            ),
            (r#"{"d":{"a":1}}"#, "expected a string"),
            (r#"{"dry-run":true}"#, "not part of a pod's capture config"),
            (r#"{"d":"1","exclude-inbound-ports":"2"}"#, "given twice"),
        ] {
            let e = serde_json::from_str::<CaptureFlags>(bad)
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{bad}: {e}");
        }
    }
}
