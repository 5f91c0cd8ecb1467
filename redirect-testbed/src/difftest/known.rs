//! What the differential test knows in advance, in one place:
//!
//! - [`OPTIONAL`]: the istio-iptables knobs redirect may not take yet,
//!   how the run finds out (a real capture with the knob, at start), and
//!   what the generator does meanwhile. When one lands, the probe passes
//!   and the generator starts using it: the run grows by itself.
//! - [`KNOWN`]: the differences between the two pods that are known,
//!   each with why. A mismatch is a failure unless an entry here covers
//!   it; an entry that covers cases of a run, none of which differ any
//!   more, is a failure too (it is no longer needed: remove it).

use super::gen::{Config, Conn};

/// An optional knob of istio-iptables' (or a way of writing one).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Feature {
    /// `--redirect-dns` / `ISTIO_META_DNS_CAPTURE`, with the pod's
    /// nameservers.
    RedirectDns,
    /// `--capture-all-dns`.
    CaptureAllDns,
    /// `-c`.
    ExcludeInterfaces,
    /// `-k`.
    KubeVirtInterfaces,
    /// `--drop-invalid`.
    DropInvalid,
    /// `ISTIO_OUTBOUND_OWNER_GROUPS[_EXCLUDE]` (environment only).
    OwnerGroups,
    /// `ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR` (environment only).
    LoopbackCidr,
    /// `-q`'s long name in istio-iptables, `--istio-outbound-ports`.
    OutboundPortsLongName,
    /// Flags given as environment variables: needs `redirect
    /// istio-iptables`, which reads the environment as istio-iptables does
    /// (`attach` reads none).
    EnvForms,
}

/// What the generator does with a knob redirect does not take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fallback {
    /// Left out of the configuration (both sides).
    LeaveOut,
    /// Given to the reference only: redirect behaves as if it were set.
    ReferenceOnly,
    /// Written another way (short form, or a flag instead of a variable).
    WriteOtherwise,
}

/// How the run learns whether redirect takes a knob.
#[derive(Clone, Copy, Debug)]
pub enum Probe {
    /// A capture with these flags added succeeds.
    Args(&'static [&'static str]),
    /// A capture through `redirect istio-iptables` with this variable set
    /// succeeds.
    Env(&'static str, &'static str),
    /// `redirect istio-iptables` exists and captures.
    IstioIptables,
}

pub struct Optional {
    pub feature: Feature,
    pub probe: Probe,
    pub fallback: Fallback,
    /// Said in the run's notes while redirect does not take it.
    pub note: &'static str,
}

/// Every optional knob. Each is probed at the start of a run, so a knob
/// redirect starts taking is used from then on without an edit here (DNS
/// capture, owner groups, the loopback range, `-c` and `-k` are taken now;
/// the notes say what a run does while one is not).
pub const OPTIONAL: &[Optional] = &[
    Optional {
        feature: Feature::RedirectDns,
        probe: Probe::Args(&["--redirect-dns"]),
        fallback: Fallback::LeaveOut,
        note: "DNS capture (--redirect-dns) not supported by redirect yet: left out",
    },
    Optional {
        feature: Feature::CaptureAllDns,
        probe: Probe::Args(&["--redirect-dns", "--capture-all-dns"]),
        fallback: Fallback::LeaveOut,
        note: "--capture-all-dns not supported by redirect yet: left out",
    },
    Optional {
        feature: Feature::ExcludeInterfaces,
        probe: Probe::Args(&["-c", "eth9"]),
        fallback: Fallback::LeaveOut,
        note: "-c (exclude interfaces) not supported by redirect yet: left out",
    },
    Optional {
        feature: Feature::KubeVirtInterfaces,
        probe: Probe::Args(&["-k", "eth9"]),
        fallback: Fallback::LeaveOut,
        note: "-k (kube-virt interfaces) not supported by redirect yet: left out",
    },
    Optional {
        feature: Feature::DropInvalid,
        probe: Probe::Args(&["--drop-invalid"]),
        fallback: Fallback::LeaveOut,
        note: "--drop-invalid not taken by redirect: left out",
    },
    Optional {
        feature: Feature::OwnerGroups,
        probe: Probe::Env("ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE", "4242"),
        fallback: Fallback::LeaveOut,
        note: "ISTIO_OUTBOUND_OWNER_GROUPS[_EXCLUDE] not supported by redirect yet: left out",
    },
    Optional {
        feature: Feature::LoopbackCidr,
        probe: Probe::Env("ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR", "127.0.0.1/8"),
        fallback: Fallback::LeaveOut,
        note: "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR not supported by redirect yet: left out",
    },
    Optional {
        feature: Feature::OutboundPortsLongName,
        probe: Probe::Args(&["--istio-outbound-ports", "7777"]),
        fallback: Fallback::WriteOtherwise,
        note: "--istio-outbound-ports (istio-iptables' long name for -q) not taken by redirect yet: written -q",
    },
    Optional {
        feature: Feature::EnvForms,
        probe: Probe::IstioIptables,
        fallback: Fallback::WriteOtherwise,
        note: "no `redirect istio-iptables` (reads the environment as istio-iptables does) yet: flags written as arguments",
    },
];

/// A known difference between the pods.
pub struct Known {
    pub id: &'static str,
    /// Why the outcomes differ, and what happens next.
    pub why: &'static str,
    /// The cases it covers. Not every case it covers differs (the class
    /// is wider than the difference); a random run calls it stale only
    /// after many agreeing cases ([`super::STALE_AFTER`]).
    pub covers: fn(&Config, &Conn) -> bool,
    /// A case that shows the difference: every run tries it first, and
    /// the entry is stale (the run fails) when both pods agree on it.
    pub example: fn() -> (Config, Conn),
}

/// The known differences: none now. (IPv6 in a pod whose first address
/// is IPv4, without `--dual-stack`, was one until redirect gated IPv6
/// capture as istio-iptables does.)
pub const KNOWN: &[Known] = &[];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_example_is_covered_by_its_own_entry_only() {
        for k in KNOWN {
            let (cfg, c) = (k.example)();
            assert!((k.covers)(&cfg, &c), "{}: its example is not covered", k.id);
            let first = KNOWN.iter().find(|e| (e.covers)(&cfg, &c)).map(|e| e.id);
            assert_eq!(
                first,
                Some(k.id),
                "the example of {} is taken by another entry",
                k.id
            );
        }
        let mut ids: Vec<&str> = KNOWN.iter().map(|k| k.id).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), KNOWN.len());
    }
}
