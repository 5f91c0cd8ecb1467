//! `redirect stats --chain NAME`: one chain, like `iptables --list NAME`.
//! Our chain names are accepted, and so are the iptables chains users of
//! istio-init know: ISTIO_OUTPUT and ISTIO_INBOUND are our OUTPUT and
//! PREROUTING; ISTIO_REDIRECT and ISTIO_IN_REDIRECT (one REDIRECT rule
//! each in iptables) are the rows that send connections to the outbound
//! and to the inbound port.

use redirect_common::{reason::Chain, Reason};

use super::{PodStats, RuleCount};
use crate::error::Error;

/// What `redirect stats` lists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listing {
    /// Every chain (no `--chain`).
    All,
    /// One of our chains.
    Chain(Chain),
    /// ISTIO_REDIRECT: the rows that send to the outbound port (`-p`).
    ToOutbound,
    /// ISTIO_IN_REDIRECT: the rows that send to the inbound port (`-z`).
    ToInbound,
}

/// Rows of ISTIO_REDIRECT: its one rule counts what these send to it
/// (ISTIO_OUTPUT's, and PREROUTING's for a `-k` interface).
const TO_OUTBOUND: [Reason; 3] = [
    Reason::OutCapturedPort,
    Reason::OutCaptured,
    Reason::InVirtCaptured,
];
/// Rows of ISTIO_IN_REDIRECT: rules (2)/(5) of ISTIO_OUTPUT and ISTIO_INBOUND.
const TO_INBOUND: [Reason; 2] = [Reason::OutProxyToSelf, Reason::InCaptured];

/// The iptables names that are another name of one of our chains.
const ALIASES: [(&str, Chain); 3] = [
    ("ISTIO_OUTPUT", Chain::Output),
    ("ISTIO_INBOUND", Chain::Prerouting),
    ("ISTIO_OUTPUT_DNS", Chain::Dns),
];

/// Every name `--chain` accepts (for help and errors).
pub fn names() -> String {
    let mut v: Vec<String> = Chain::ALL
        .iter()
        .map(|c| match ALIASES.iter().find(|(_, a)| a == c) {
            Some((alias, _)) => format!("{} (or {alias})", c.name()),
            None => c.name().to_string(),
        })
        .collect();
    v.insert(2, "ISTIO_REDIRECT".into());
    v.insert(3, "ISTIO_IN_REDIRECT".into());
    v.join(", ")
}

impl Listing {
    /// A `--chain` value, case-insensitive.
    pub fn parse(name: &str) -> Result<Listing, Error> {
        let n = name.trim().to_ascii_uppercase();
        if let Some(c) = Chain::ALL.into_iter().find(|c| c.name() == n) {
            return Ok(Listing::Chain(c));
        }
        if let Some((_, c)) = ALIASES.iter().find(|(a, _)| *a == n) {
            return Ok(Listing::Chain(*c));
        }
        match n.as_str() {
            "ISTIO_REDIRECT" => Ok(Listing::ToOutbound),
            "ISTIO_IN_REDIRECT" => Ok(Listing::ToInbound),
            _ => Err(Error::InvalidFlag {
                field: "--chain".into(),
                value: name.to_string(),
                reason: format!("no such chain; the chains are {}", names()),
            }),
        }
    }

    /// Is this reason's row listed?
    pub fn lists(&self, r: Reason) -> bool {
        match self {
            Listing::All => true,
            Listing::Chain(c) => r.chain() == *c,
            Listing::ToOutbound => TO_OUTBOUND.contains(&r),
            Listing::ToInbound => TO_INBOUND.contains(&r),
        }
    }

    /// The pod with only the listed rows (for `--json`).
    pub fn filter(&self, mut pod: PodStats) -> PodStats {
        pod.rules.retain(|r| self.lists(r.reason));
        pod
    }

    /// The pod's listed rows in titled sections, as the text shows them.
    pub fn sections<'a>(&self, pod: &'a PodStats) -> Vec<Section<'a>> {
        let pick = |f: &dyn Fn(&RuleCount) -> bool| pod.rules.iter().filter(|r| f(r)).collect();
        match self {
            Listing::All => Chain::ALL
                .into_iter()
                .map(|c| Section::chain(c, pick(&|r| r.chain == c)))
                .collect(),
            Listing::Chain(c) => vec![Section::chain(*c, pick(&|r| r.chain == *c))],
            Listing::ToOutbound | Listing::ToInbound => {
                let (name, rows, port) = if *self == Listing::ToOutbound {
                    (
                        "ISTIO_REDIRECT",
                        "OUTPUT and VM rows",
                        ("outbound", pod.spec.proxy_port),
                    )
                } else {
                    (
                        "ISTIO_IN_REDIRECT",
                        "OUTPUT and PREROUTING rows",
                        ("inbound", pod.spec.inbound_port),
                    )
                };
                vec![Section {
                    title: format!(
                        "Chain {name} (the {rows} that send to the {} port {})",
                        port.0, port.1
                    ),
                    unit: "conns",
                    rows: pick(&|r| self.lists(r.reason)),
                }]
            }
        }
    }
}

/// A titled group of rows.
pub struct Section<'a> {
    pub title: String,
    /// What the first column counts.
    pub unit: &'static str,
    pub rows: Vec<&'a RuleCount>,
}

impl<'a> Section<'a> {
    fn chain(c: Chain, rows: Vec<&'a RuleCount>) -> Section<'a> {
        Section {
            title: format!("Chain {} ({})", c.name(), c.title()),
            unit: match c {
                Chain::Output | Chain::Prerouting | Chain::Vm => "conns",
                Chain::Dns => "count",
                Chain::OrigDst => "calls",
                Chain::Accel | Chain::Errors => "count",
            },
            rows,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iptables_and_our_names() {
        for (name, want) in [
            ("OUTPUT", Listing::Chain(Chain::Output)),
            ("istio_output", Listing::Chain(Chain::Output)),
            ("PREROUTING", Listing::Chain(Chain::Prerouting)),
            ("ISTIO_INBOUND", Listing::Chain(Chain::Prerouting)),
            ("ISTIO_REDIRECT", Listing::ToOutbound),
            ("ISTIO_IN_REDIRECT", Listing::ToInbound),
            ("ORIGINAL_DST", Listing::Chain(Chain::OrigDst)),
            ("vm", Listing::Chain(Chain::Vm)),
            ("DNS", Listing::Chain(Chain::Dns)),
            ("istio_output_dns", Listing::Chain(Chain::Dns)),
            ("accel", Listing::Chain(Chain::Accel)),
            ("ERRORS", Listing::Chain(Chain::Errors)),
        ] {
            assert_eq!(Listing::parse(name).unwrap(), want, "{name}");
        }
        let e = Listing::parse("ISTIO_OUTPUTX").unwrap_err().to_string();
        assert_eq!(
            e,
            "invalid --chain value 'ISTIO_OUTPUTX': no such chain; the chains are OUTPUT (or ISTIO_OUTPUT), PREROUTING (or ISTIO_INBOUND), ISTIO_REDIRECT, ISTIO_IN_REDIRECT, VM, DNS (or ISTIO_OUTPUT_DNS), ORIGINAL_DST, ACCEL, ERRORS"
        );
    }

    #[test]
    fn redirect_chains_hold_the_rows_that_send_to_each_port() {
        // Every REDIRECT row of OUTPUT/PREROUTING/VM is in exactly one of
        // them, by the port it sends to.
        for r in Reason::ALL {
            let listed = (Listing::ToOutbound.lists(r), Listing::ToInbound.lists(r));
            let redirects = matches!(r.chain(), Chain::Output | Chain::Prerouting | Chain::Vm)
                && r.target() == "REDIRECT";
            assert_eq!(listed.0 || listed.1, redirects, "{r:?}");
            assert!(!(listed.0 && listed.1), "{r:?}");
        }
    }
}
