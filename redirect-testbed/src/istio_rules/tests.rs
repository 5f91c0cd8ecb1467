//! The writer against Istio's own listings: each configuration of
//! istio-iptables' golden tests (`capture/run_test.go`), given here as the
//! arguments and environment a user would pass, must produce the listing
//! Istio publishes for it, line for line (`golden.rs`).
use super::{golden, *};

/// What Istio's test harness fixes for every case: `-u 1337 -g 1337`
/// (`constructTestConfig`), then the case's own settings.
struct Case {
    name: &'static str,
    args: &'static [&'static str],
    env: &'static [(&'static str, &'static str)],
    ipv6: bool,
    dns_v4: &'static [&'static str],
    dns_v6: &'static [&'static str],
    v4: &'static str,
    v6: Option<&'static str>,
}

macro_rules! case {
    ($name:literal, $g:ident, $args:expr, $env:expr, ipv6: $v6:expr, dns: $d4:expr, $d6:expr) => {
        paste_case($name, $args, $env, $v6, $d4, $d6, golden::$g)
    };
}

fn paste_case(
    name: &'static str,
    args: &'static [&'static str],
    env: &'static [(&'static str, &'static str)],
    ipv6: bool,
    dns_v4: &'static [&'static str],
    dns_v6: &'static [&'static str],
    (v4, v6): (&'static str, Option<&'static str>),
) -> Case {
    Case {
        name,
        args,
        env,
        ipv6,
        dns_v4,
        dns_v6,
        v4,
        v6,
    }
}

fn cases() -> Vec<Case> {
    const NONE: &[&str] = &[];
    const NO_ENV: &[(&str, &str)] = &[];
    vec![
        case!("empty", EMPTY, &[], NO_ENV, ipv6: false, dns: NONE, NONE),
        case!("ipv6-empty-inbound-ports", IPV6_EMPTY_INBOUND_PORTS, &["-b", ""], NO_ENV, ipv6: true, dns: NONE, NONE),
        case!("ip-range", IP_RANGE, &["-x", "1.1.0.0/16", "-i", "9.9.0.0/16", "-n", "--redirect-dns", "-g", "1,2", "-u", "3,4"], NO_ENV, ipv6: false, dns: &["127.0.0.53"], NONE),
        case!("ipv6-inbound-ports", IPV6_INBOUND_PORTS, &["-b", "4000,5000"], NO_ENV, ipv6: true, dns: NONE, NONE),
        case!("ipv6-virt-interfaces", IPV6_VIRT_INTERFACES, &["-b", "4000,5000", "-k", "eth0,eth1"], NO_ENV, ipv6: true, dns: NONE, NONE),
        case!("ipv6-ipnets", IPV6_IPNETS, &["-b", "4000,5000", "-d", "6000,7000,", "-k", "eth0,eth1", "-x", "2001:db8::/32", "-i", "2001:db8::/32"], NO_ENV, ipv6: true, dns: NONE, NONE),
        case!("ipv6-uid-gid", IPV6_UID_GID, &["-b", "4000,5000", "-d", "6000,7000", "-k", "eth0,eth1", "-g", "1,2", "-u", "3,4", "-x", "2001:db8::/32", "-i", "2001:db8::/32"], NO_ENV, ipv6: true, dns: NONE, NONE),
        case!("ipv6-outbound-ports", IPV6_OUTBOUND_PORTS, &["-b", "", "-q", "32000,31000"], NO_ENV, ipv6: true, dns: NONE, NONE),
        case!("kube-virt-interfaces", KUBE_VIRT_INTERFACES, &["-k", "eth1,eth2", "-i", "*"], NO_ENV, ipv6: false, dns: NONE, NONE),
        case!("ipnets", IPNETS, &["-i", "10.0.0.0/8"], NO_ENV, ipv6: false, dns: NONE, NONE),
        case!("ipnets-with-kube-virt-interfaces", IPNETS_WITH_KUBE_VIRT_INTERFACES, &["-k", "eth1,eth2", "-i", "10.0.0.0/8"], NO_ENV, ipv6: false, dns: NONE, NONE),
        case!("inbound-ports-include", INBOUND_PORTS_INCLUDE, &["-b", "32000,31000"], NO_ENV, ipv6: false, dns: NONE, NONE),
        case!("inbound-ports-wildcard", INBOUND_PORTS_WILDCARD, &["-b", "*"], NO_ENV, ipv6: false, dns: NONE, NONE),
        case!("dns-uid-gid", DNS_UID_GID, &["--redirect-dns", "-g", "1,2", "-u", "3,4"], NO_ENV, ipv6: true, dns: &["127.0.0.53"], &["::127.0.0.53"]),
        // --redirect-dns without nameservers: DNS capture silently off.
        case!("ipv6-dns-uid-gid", IPV6_DNS_UID_GID, &["--redirect-dns", "-g", "1,2", "-u", "3,4"], NO_ENV, ipv6: true, dns: NONE, NONE),
        case!("outbound-owner-groups", OUTBOUND_OWNER_GROUPS, &[], &[("ISTIO_OUTBOUND_OWNER_GROUPS", "java,202")], ipv6: false, dns: NONE, NONE),
        case!("outbound-owner-groups-exclude", OUTBOUND_OWNER_GROUPS_EXCLUDE, &[], &[("ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE", "888,ftp")], ipv6: false, dns: NONE, NONE),
        case!("ipv6-dns-outbound-owner-groups", IPV6_DNS_OUTBOUND_OWNER_GROUPS, &["--redirect-dns"], &[("ISTIO_OUTBOUND_OWNER_GROUPS", "java,202")], ipv6: true, dns: NONE, NONE),
        case!("ipv6-dns-outbound-owner-groups-exclude", IPV6_DNS_OUTBOUND_OWNER_GROUPS_EXCLUDE, &["--redirect-dns"], &[("ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE", "888,ftp")], ipv6: true, dns: NONE, NONE),
        case!("outbound-ports-include", OUTBOUND_PORTS_INCLUDE, &["-q", "32000,31000"], NO_ENV, ipv6: false, dns: NONE, NONE),
        case!("loopback-outbound-iprange", LOOPBACK_OUTBOUND_IPRANGE, &["-i", "127.1.2.3/32", "-n", "--redirect-dns", "-g", "1,2", "-u", "3,4"], NO_ENV, ipv6: false, dns: &["127.0.0.53"], NONE),
        case!("basic-exclude-nic", BASIC_EXCLUDE_NIC, &["-c", "not-istio-nic"], NO_ENV, ipv6: false, dns: NONE, NONE),
        case!("drop-invalid", DROP_INVALID, &["--drop-invalid"], NO_ENV, ipv6: false, dns: NONE, NONE),
        case!("host-ipv4-loopback-cidr", HOST_IPV4_LOOPBACK_CIDR, &[], &[("ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR", "127.0.0.1/8")], ipv6: false, dns: NONE, NONE),
    ]
}

fn rules_of(c: &Case) -> IstioRules {
    let mut args = vec!["-u", "1337", "-g", "1337"];
    args.extend_from_slice(c.args);
    let env = |k: &str| {
        c.env
            .iter()
            .find(|(n, _)| *n == k)
            .map(|(_, v)| v.to_string())
    };
    let cfg = IstioConfig::parse(&args, env).unwrap_or_else(|e| panic!("{}: {e}", c.name));
    let host = Host {
        enable_ipv6: c.ipv6,
        dns_v4: c.dns_v4.iter().map(|s| s.to_string()).collect(),
        dns_v6: c.dns_v6.iter().map(|s| s.to_string()).collect(),
        envoy_user_uid: None,
    };
    IstioRules::build(&cfg, &host).unwrap_or_else(|e| panic!("{}: {e}", c.name))
}

/// Line-by-line comparison, so a failure names the first line that differs.
fn same(name: &str, family: &str, got: &str, want: &str) {
    let want = want.trim_start_matches('\n');
    let (g, w): (Vec<_>, Vec<_>) = (got.lines().collect(), want.lines().collect());
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        assert_eq!(
            a,
            b,
            "{name} {family}: line {} differs\n--- got:\n{got}",
            i + 1
        );
    }
    assert_eq!(
        g.len(),
        w.len(),
        "{name} {family}: line count\n--- got:\n{got}"
    );
    assert!(got.ends_with('\n'));
}

#[test]
fn every_published_listing_is_reproduced_line_for_line() {
    let cases = cases();
    assert_eq!(cases.len(), 24, "every non-TPROXY golden of Istio's test");
    for c in &cases {
        let r = rules_of(c);
        same(c.name, "v4", &r.restore(false).unwrap(), c.v4);
        match (r.restore(true), c.v6) {
            (Some(got), Some(want)) => same(c.name, "v6", &got, want),
            (None, None) => {}
            (got, want) => panic!("{}: v6 {got:?} vs {want:?}", c.name),
        }
    }
}

#[test]
fn istio_inits_injected_args_give_the_documented_table() {
    // The injector's `istio-init` args on a dual-stack pod.
    let args = [
        "-p",
        "15001",
        "-z",
        "15006",
        "-u",
        "1337",
        "-m",
        "REDIRECT",
        "-i",
        "*",
        "-x",
        "",
        "-b",
        "*",
        "-d",
        "15090,15021,15020",
        "--log_output_level=default:info",
    ];
    let cfg = IstioConfig::parse(&args, |_| None).unwrap();
    let v4: IpAddr = "10.0.0.2".parse().unwrap();
    let host = Host::of_pod(&cfg, &[v4], &[]);
    assert!(!host.enable_ipv6);
    let t = IstioRules::build(&cfg, &host)
        .unwrap()
        .restore(false)
        .unwrap();
    let want = "* nat
-N ISTIO_INBOUND
-N ISTIO_REDIRECT
-N ISTIO_IN_REDIRECT
-N ISTIO_OUTPUT
-A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN
-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001
-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A PREROUTING -p tcp -j ISTIO_INBOUND
-A ISTIO_INBOUND -p tcp --dport 15090 -j RETURN
-A ISTIO_INBOUND -p tcp --dport 15021 -j RETURN
-A ISTIO_INBOUND -p tcp --dport 15020 -j RETURN
-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT
-A OUTPUT -j ISTIO_OUTPUT
-A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN
-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --gid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN
-A ISTIO_OUTPUT -j ISTIO_REDIRECT
COMMIT
";
    same("injected", "v4", &t, want);
}

#[test]
fn capture_all_dns_with_dual_stack_and_both_families() {
    let args = [
        "-u",
        "1337",
        "--redirect-dns",
        "--capture-all-dns",
        "--dual-stack",
        "-i",
        "*",
    ];
    let cfg = IstioConfig::parse(&args, |_| None).unwrap();
    let addrs: Vec<IpAddr> = ["127.0.0.1", "::1", "10.0.0.2", "fd00::2"]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
    let host = Host::of_pod(&cfg, &addrs, &["10.96.0.10".parse().unwrap()]);
    // --capture-all-dns: resolv.conf is not read.
    assert!(host.enable_ipv6 && host.dns_v4.is_empty());
    let r = IstioRules::build(&cfg, &host).unwrap();
    for v6 in [false, true] {
        let t = r.restore(v6).unwrap();
        let lines: Vec<&str> = t.lines().collect();
        let pos = |l: &str| {
            lines
                .iter()
                .position(|x| *x == l)
                .unwrap_or_else(|| panic!("{l:?} missing in\n{t}"))
        };
        let lo = if v6 { "::1/128" } else { "127.0.0.1/32" };
        assert!(
            pos("-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN")
                < pos("-A ISTIO_OUTPUT -j ISTIO_OUTPUT_DNS")
        );
        assert!(
            pos("-A ISTIO_OUTPUT -j ISTIO_OUTPUT_DNS")
                < pos(&format!("-A ISTIO_OUTPUT -d {lo} -j RETURN"))
        );
        pos("-A ISTIO_OUTPUT_DNS -p tcp --dport 53 -j REDIRECT --to-ports 15053");
        pos("-A ISTIO_OUTPUT_DNS -p udp --dport 53 -j REDIRECT --to-port 15053");
        pos("-A ISTIO_OUTPUT -o lo -p tcp ! --dport 53 -m owner ! --uid-owner 1337 -j RETURN");
        pos(&format!("-A ISTIO_OUTPUT -o lo ! -d {lo} -p tcp -m multiport ! --dports 53,15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT"));
        // The gid rule spares only the tunnel port.
        pos(&format!("-A ISTIO_OUTPUT -o lo ! -d {lo} -p tcp ! --dport 15008 -m owner --gid-owner 1337 -j ISTIO_IN_REDIRECT"));
        pos("-A PREROUTING -j ISTIO_INBOUND");
        pos("-A ISTIO_INBOUND -p udp --sport 53 -j CT --zone 1");
        assert!(t.contains("* raw\n") && t.ends_with("COMMIT\n"));
    }
}

#[test]
fn ipv6_is_on_as_istio_iptables_finds_it() {
    let cfg = |dual: bool| IstioConfig {
        dual_stack: dual,
        ..IstioConfig::default()
    };
    let a = |s: &[&str]| -> Vec<IpAddr> { s.iter().map(|a| a.parse().unwrap()).collect() };
    let dual = a(&["127.0.0.1", "::1", "10.0.0.2", "fe80::1", "fd00::2"]);
    // The first usable address decides, unless --dual-stack.
    assert!(!Host::of_pod(&cfg(false), &dual, &[]).enable_ipv6);
    assert!(Host::of_pod(&cfg(true), &dual, &[]).enable_ipv6);
    let v6_only = a(&["::1", "fe80::1", "fd00::2"]);
    assert!(Host::of_pod(&cfg(false), &v6_only, &[]).enable_ipv6);
    let v4_only = a(&["127.0.0.1", "10.0.0.2"]);
    assert!(!Host::of_pod(&cfg(true), &v4_only, &[]).enable_ipv6);
    // Nameservers split by family, only read with --redirect-dns.
    let ns = a(&["10.96.0.10", "fd00::10"]);
    let dns = IstioConfig {
        redirect_dns: true,
        ..IstioConfig::default()
    };
    let h = Host::of_pod(&dns, &dual, &ns);
    assert_eq!(
        (h.dns_v4, h.dns_v6),
        (vec!["10.96.0.10".to_string()], vec!["fd00::10".to_string()])
    );
    assert!(Host::of_pod(&cfg(false), &dual, &ns).dns_v4.is_empty());
}

#[test]
fn flags_and_environment_are_read_as_istio_iptables_reads_them() {
    let env = |k: &str| match k {
        "ISTIO_SERVICE_CIDR" => Some("10.0.0.0/8".to_string()),
        "ISTIO_INBOUND_PORTS" => Some("80".to_string()),
        "REDIRECT_DNS" => Some("false".to_string()),
        // The extra name wins over the flag's own variable.
        "ISTIO_META_DNS_CAPTURE" => Some("true".to_string()),
        "DUAL_STACK" => Some("not-a-bool".to_string()),
        "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR" => Some("127.0.0.1/8".to_string()),
        _ => None,
    };
    // The command line wins over the environment; every value form.
    let c = IstioConfig::parse(
        &[
            "-b*",
            "--envoy-port=16001",
            "-z",
            "16006",
            "--istio-local-exclude-ports",
            "22",
            "-e=9000",
            "-n",
            "--capture-all-dns=false",
            "-u",
            "1",
            "-u",
            "2",
        ],
        env,
    )
    .unwrap();
    assert_eq!(c.outbound_ip_ranges_include, "10.0.0.0/8");
    assert_eq!(c.inbound_ports_include, "*");
    assert_eq!(
        (c.proxy_port.as_str(), c.inbound_capture_port.as_str()),
        ("16001", "16006")
    );
    assert_eq!(
        (
            c.inbound_ports_exclude.as_str(),
            c.inbound_tunnel_port.as_str()
        ),
        ("22", "9000")
    );
    assert_eq!(c.proxy_uid, "2", "last one wins");
    assert!(c.redirect_dns && c.dry_run && !c.capture_all_dns);
    assert!(!c.dual_stack, "an unparsable variable is ignored");
    assert_eq!(c.host_ipv4_loopback_cidr, "127.0.0.1/8");
    for (bad, want) in [
        (
            &["--proxy-port", "1"][..],
            RulesError::UnknownFlag("--proxy-port".into()),
        ),
        (&["-u"][..], RulesError::MissingValue("-u".into())),
        (
            &["--dual-stack=maybe"][..],
            RulesError::BadBool {
                flag: "--dual-stack=maybe".into(),
                value: "maybe".into(),
            },
        ),
    ] {
        assert_eq!(IstioConfig::parse(bad, |_| None), Err(want));
    }
    // The first `-u`, `-g` defaults.
    let r = IstioRules::build(
        &IstioConfig::default(),
        &Host {
            envoy_user_uid: Some(101),
            ..Host::default()
        },
    )
    .unwrap();
    let t = r.restore(false).unwrap();
    assert!(
        t.contains("--uid-owner 101 ") && t.contains("--gid-owner 101 "),
        "{t}"
    );
}

#[test]
fn bad_configurations_fail_as_istio_iptables_fails() {
    let build = |args: &[&str]| {
        IstioRules::build(
            &IstioConfig::parse(args, |_| None).unwrap(),
            &Host::default(),
        )
    };
    assert_eq!(build(&["-x", "*"]), Err(RulesError::ExcludeWildcard));
    assert_eq!(build(&["-m", "TPROXY"]), Err(RulesError::Tproxy));
    // netip.ParsePrefix wants address/length.
    for bad in [
        "10.0.0.1",
        "10.0.0.0/33",
        "10.0.0.0/08",
        "10.0.0.0/",
        " 10.0.0.0/8",
    ] {
        assert!(
            matches!(
                build(&["-i", bad]),
                Err(RulesError::BadCidr { flag: "-i", .. })
            ),
            "{bad}"
        );
    }
}

#[test]
fn loopback_in_include_is_judged_by_the_written_address() {
    let t = |i: &str| {
        let cfg = IstioConfig::parse(&["-i", i], |_| None).unwrap();
        IstioRules::build(&cfg, &Host::default())
            .unwrap()
            .restore(false)
            .unwrap()
    };
    let app_local = "-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN";
    assert!(t("0.0.0.0/0").contains(app_local));
    assert!(!t("127.0.0.1/0").contains(app_local));
    assert!(
        !t("::1/128,10.0.0.0/8").contains(app_local),
        "either family drops it"
    );
    // Go's IsLoopback unmaps an IPv4-mapped address.
    assert!(!t("::ffff:127.0.0.1/128").contains(app_local));
    // The address is kept as written, not masked.
    assert!(t("10.1.2.3/8").contains("-A ISTIO_OUTPUT -d 10.1.2.3/8 -j ISTIO_REDIRECT"));
}
