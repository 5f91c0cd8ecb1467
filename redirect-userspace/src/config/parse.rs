//! Value parsers of the flag table: each takes the whole value as written
//! and returns the parsed value or the reason it is refused (the caller
//! names the flag and the value).

use std::{net::IpAddr, time::Duration};

use redirect_common::MAX_IDS;

use super::Cidr;

/// One port, 1-65535.
pub fn port(s: &str) -> Result<u16, String> {
    match s.trim().parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(format!("'{s}' is not a port number (1-65535)")),
    }
}

/// A port list, sorted and deduplicated (the kernel keeps a set). Empty
/// items are ignored, as istio-iptables does.
pub fn ports(s: &str) -> Result<Vec<u16>, String> {
    let mut out = Vec::new();
    for p in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if p == "*" {
            return Err("'*' is only accepted by -b".into());
        }
        out.push(port(p)?);
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// Numeric uids or gids, in order, without duplicates, at most MAX_IDS.
pub fn ids(s: &str) -> Result<Vec<u32>, String> {
    let mut out = Vec::new();
    for id in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let v = id
            .parse::<u32>()
            .map_err(|_| format!("'{id}' is not a numeric id"))?;
        if !out.contains(&v) {
            out.push(v);
        }
    }
    if out.len() > MAX_IDS {
        return Err(format!("at most {MAX_IDS} ids are supported"));
    }
    Ok(out)
}

/// A parsed CIDR list.
pub struct CidrList {
    /// The value was exactly `*`.
    pub all: bool,
    pub cidrs: Vec<Cidr>,
    /// Some entry's address, as written, is a loopback address (what
    /// istio-iptables checks: `127.0.0.1/0` counts, `0.0.0.0/0` does not).
    pub names_loopback: bool,
}

/// A CIDR list; `*` (the whole value) only where `star_ok`.
pub fn cidrs(s: &str, star_ok: bool) -> Result<CidrList, String> {
    let mut list = CidrList {
        all: false,
        cidrs: Vec::new(),
        names_loopback: false,
    };
    if s.trim() == "*" {
        if !star_ok {
            return Err("'*' is only accepted by -i".into());
        }
        list.all = true;
        return Ok(list);
    }
    for c in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if c == "*" {
            return Err(if star_ok {
                "'*' must be the whole value (it means every destination)".into()
            } else {
                "'*' is only accepted by -i".into()
            });
        }
        let cidr = Cidr::parse(c).map_err(|why| format!("invalid CIDR '{c}': {why}"))?;
        let written: Option<IpAddr> = c.split('/').next().and_then(|a| a.parse().ok());
        // As istio-iptables (Go's IsLoopback unmaps ::ffff:127.0.0.1).
        list.names_loopback |= written.is_some_and(|a| a.to_canonical().is_loopback());
        if !list.cidrs.contains(&cidr) {
            list.cidrs.push(cidr);
        }
    }
    Ok(list)
}

/// Addresses (`--dns-servers`), comma separated: sorted (IPv4 first),
/// without duplicates. An IPv6 zone (`fe80::1%eth0`) is not accepted.
pub fn addresses(s: &str) -> Result<Vec<IpAddr>, String> {
    let mut out = Vec::new();
    for a in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        out.push(
            a.parse::<IpAddr>()
                .map_err(|_| format!("'{a}' is not an IPv4 or IPv6 address"))?,
        );
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// A boolean as Go's `strconv.ParseBool` reads it (istio-iptables' flags
/// and environment variables).
pub fn bool(s: &str) -> Result<bool, String> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Ok(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Ok(false),
        _ => Err(format!("'{s}' is not a boolean (true or false)")),
    }
}

/// A duration as Go's `time.ParseDuration` reads it: `5s`, `1m30s`,
/// `1.5s`, `250ms`, `0`.
pub fn duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("'{s}' is not a duration (e.g. 5s, 1m30s, 500ms)");
    let t = s.trim();
    if t == "0" {
        return Ok(Duration::ZERO);
    }
    if t.is_empty() || t.starts_with('-') {
        return Err(bad());
    }
    let t = t.strip_prefix('+').unwrap_or(t);
    let mut rest = t;
    let mut total = 0f64;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let n: f64 = rest[..num_end].parse().map_err(|_| bad())?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let secs = match &rest[..unit_end] {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        total += n * secs;
        rest = &rest[unit_end..];
    }
    if !total.is_finite() || total > 1e9 {
        return Err(bad());
    }
    Ok(Duration::from_secs_f64(total))
}

/// Network interface names (`-c`, `-k`): comma separated, each a valid
/// Linux name (1-15 bytes, no '/', ':' or white space, not "." or "..").
pub fn interfaces(s: &str) -> Result<Vec<String>, String> {
    let mut out: Vec<String> = Vec::new();
    for n in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if n.len() > 15
            || n == "."
            || n == ".."
            || n.chars()
                .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
        {
            return Err(format!(
                "'{n}' is not a network interface name (1-15 characters, no '/', ':' or spaces)"
            ));
        }
        if !out.iter().any(|o| o == n) {
            out.push(n.to_string());
        }
    }
    Ok(out)
}

/// Group names or numeric gids (`ISTIO_OUTBOUND_OWNER_GROUPS*`).
pub fn groups(s: &str) -> Result<Vec<String>, String> {
    let mut out: Vec<String> = Vec::new();
    for g in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let name_ok = g
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
        if !name_ok || g == "*" {
            return Err(format!("'{g}' is not a group name or numeric gid"));
        }
        if !out.iter().any(|o| o == g) {
            out.push(g.to_string());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_bools_and_durations() {
        for t in ["1", "t", "T", "true", "TRUE", "True"] {
            assert_eq!(bool(t), Ok(true), "{t}");
        }
        for f in ["0", "f", "F", "false", "FALSE", "False"] {
            assert_eq!(bool(f), Ok(false), "{f}");
        }
        for b in ["", "yes", "on", "tRuE", " true"] {
            assert!(bool(b).is_err(), "{b:?}");
        }
        assert_eq!(duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(duration("0"), Ok(Duration::ZERO));
        for b in ["", "5", "-1s", "s", "5x", "1..5s", "1e3s"] {
            assert!(duration(b).is_err(), "{b:?}");
        }
    }

    #[test]
    fn interface_and_group_names() {
        assert_eq!(
            interfaces(" eth1, tap0,,eth1").unwrap(),
            vec!["eth1".to_string(), "tap0".to_string()]
        );
        for b in ["a/b", "x y", "0123456789abcdef", "..", "eth0:1"] {
            assert!(interfaces(b).is_err(), "{b}");
        }
        assert_eq!(
            groups("1000,app-users").unwrap(),
            vec!["1000".to_string(), "app-users".to_string()]
        );
        assert!(groups("a;b").is_err());
    }
}
