//! Kernel features the install uses where the running kernel has them, and
//! what it does instead where it does not (Linux 5.10 to 5.16, see
//! docs/kernels.md). Each is learned by trying, never from the kernel's
//! version string: the verifier's verdict on the real program
//! (`attach.rs` loads the build that needs the feature and, when it is
//! refused, the one that does without), the socket option's answer
//! (`netns_cookie.rs`).
//!
//! Which builds an install took is recorded in it (`maps/REDIRECT_KERNEL`,
//! one u64, like the acceleration probe's cache): `status` shows it, and
//! tests and other processes read it instead of guessing.

use aya::maps::{Array, Map, MapData};
use serde::Serialize;

use crate::{
    error::{Error, Result},
    pins::Pins,
};

/// Set (to anything) in the environment of `redirect`, `redirect-cni` or
/// a test: take the builds and ways for kernels without each feature
/// (and report the netns cookie the old way), whatever the kernel has. For
/// running what Linux 5.10 runs on a newer kernel; never needed otherwise.
pub const FORCE_FALLBACKS_ENV: &str = "REDIRECT_FORCE_FALLBACKS";

/// Is [`FORCE_FALLBACKS_ENV`] set?
pub fn fallbacks_forced() -> bool {
    std::env::var_os(FORCE_FALLBACKS_ENV).is_some()
}

/// A kernel feature the project uses where it exists.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Gap {
    /// The feature, as the kernel names it.
    pub feature: &'static str,
    /// The first Linux version that has it.
    pub since: &'static str,
    /// What the install does where it is missing.
    pub instead: &'static str,
}

pub const NETNS_COOKIE_IN_HOOKS: Gap = Gap {
    feature: "bpf_get_netns_cookie in getsockopt, sockops and sk_msg programs",
    since: "5.15",
    instead:
        "the _stored builds of those programs read the netns cookie that redirect_sock_create \
              (cgroup/sock_create) stores on each TCP socket of a captured pod when it is created; \
              sockets created before their pod was captured are not recognised as the pod's",
};

pub const SO_NETNS_COOKIE: Gap = Gap {
    feature: "the SO_NETNS_COOKIE socket option",
    since: "5.14",
    instead: "a netns's cookie is reported by redirect_netns_cookie (cgroup/sock_create) for a \
              socket a forked child creates in the netns",
};

pub const SK_LOOKUP_INGRESS_IFINDEX: Gap = Gap {
    feature: "the ingress_ifindex field of sk_lookup programs",
    since: "5.17",
    instead: "redirect_sk_lookup_addr tells the pod's own connections (which arrive on lo) by \
              their source address: 127.0.0.0/8, ::1 or an address of the pod",
};

/// A setting that needs `gap`'s feature, refused on a kernel without it:
/// the error names the feature, the version that has it, and what still
/// works.
pub fn refuse(gap: &Gap, setting: &str) -> Error {
    Error::Kernel(format!(
        "{setting} needs {} (Linux {}+), which this kernel ({}) lacks; everything else works on it \
         (outbound and inbound capture, SO_ORIGINAL_DST, getpeername, DNS capture, stats, the agent): \
         drop {setting}, or run a newer kernel",
        gap.feature,
        gap.since,
        crate::probe::uname_release()
    ))
}

/// Which builds of the hooks the install took on this kernel (None: not
/// decided yet, no program of that kind was loaded).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Builds {
    /// getsockopt, sockops and sk_msg read the netns cookie from socket
    /// storage ([`NETNS_COOKIE_IN_HOOKS`] missing).
    pub netns_cookie_stored: Option<bool>,
    /// sk_lookup tells the pod's own connections by address
    /// ([`SK_LOOKUP_INGRESS_IFINDEX`] missing).
    pub sk_lookup_by_address: Option<bool>,
}

impl Builds {
    fn from_bits(v: u64) -> Builds {
        let get = |decided: u64, yes: u64| (v & decided != 0).then_some(v & yes != 0);
        Builds {
            netns_cookie_stored: get(1, 2),
            sk_lookup_by_address: get(4, 8),
        }
    }

    fn bits(&self) -> u64 {
        let put = |b: Option<bool>, decided: u64, yes: u64| match b {
            None => 0,
            Some(false) => decided,
            Some(true) => decided | yes,
        };
        put(self.netns_cookie_stored, 1, 2) | put(self.sk_lookup_by_address, 4, 8)
    }

    /// The features this kernel lacks, as far as known.
    pub fn gaps(&self) -> Vec<&'static Gap> {
        let mut v = Vec::new();
        if self.netns_cookie_stored == Some(true) {
            v.push(&NETNS_COOKIE_IN_HOOKS);
        }
        if self.sk_lookup_by_address == Some(true) {
            v.push(&SK_LOOKUP_INGRESS_IFINDEX);
        }
        v
    }
}

/// Pin name of the record (in the install's map directory).
pub const KERNEL_MAP: &str = "REDIRECT_KERNEL";

/// What the install recorded (nothing recorded: all None).
pub fn recorded(pins: &Pins) -> Builds {
    open(pins)
        .ok()
        .and_then(|a| a.get(&0, 0).ok())
        .map(Builds::from_bits)
        .unwrap_or_default()
}

/// Record a decision (merged with what is there; every process on this
/// kernel decides the same).
pub fn record(pins: &Pins, f: impl FnOnce(&mut Builds)) -> Result<()> {
    let path = pins.map(KERNEL_MAP);
    crate::bpf::create_pinned(
        &path,
        &crate::bpf::MapSpec {
            map_type: crate::bpf::BPF_MAP_TYPE_ARRAY,
            key_size: 4,
            value_size: 8,
            max_entries: 1,
            name: "",
        },
        "the install's kernel record map",
    )?;
    let mut arr = open(pins)?;
    let mut b = Builds::from_bits(arr.get(&0, 0).unwrap_or(0));
    f(&mut b);
    arr.set(0, b.bits(), 0)
        .map_err(|e| Error::bpf(format!("writing {}", path.display()), e))
}

fn open(pins: &Pins) -> Result<Array<MapData, u64>> {
    let path = pins.map(KERNEL_MAP);
    let data = MapData::from_pin(&path)
        .map_err(|e| Error::bpf(format!("opening {}", path.display()), e))?;
    Array::try_from(Map::Array(data))
        .map_err(|e| Error::bpf(format!("{} is not the kernel record", path.display()), e))
}

/// `status`'s view: the kernel, what it lacks and what is done instead.
#[derive(Debug, Clone, Serialize)]
pub struct KernelStatus {
    pub release: String,
    /// The builds the install took (see [`Builds`]).
    pub builds: Builds,
    /// The programs each attached cgroup has.
    pub cgroup_programs: Vec<&'static str>,
    /// Missing features: what each is, since when, and what is done
    /// instead.
    pub missing: Vec<Gap>,
}

pub fn status(pins: &Pins) -> KernelStatus {
    let builds = recorded(pins);
    let mut missing: Vec<Gap> = builds.gaps().into_iter().copied().collect();
    if matches!(crate::netns_cookie::from_socket_option(), Ok(None)) {
        missing.push(SO_NETNS_COOKIE);
    }
    KernelStatus {
        release: crate::probe::uname_release(),
        builds,
        cgroup_programs: crate::attach::cgroup_programs(builds.netns_cookie_stored == Some(true)),
        missing,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_round_trip() {
        for n in [None, Some(false), Some(true)] {
            for s in [None, Some(false), Some(true)] {
                let b = Builds {
                    netns_cookie_stored: n,
                    sk_lookup_by_address: s,
                };
                assert_eq!(Builds::from_bits(b.bits()), b);
            }
        }
        assert!(Builds::default().gaps().is_empty());
    }

    #[test]
    fn refusal_names_feature_version_and_what_works() {
        let e = refuse(&SK_LOOKUP_INGRESS_IFINDEX, "-c/--istio-exclude-interfaces").to_string();
        assert!(
            e.contains("ingress_ifindex")
                && e.contains("5.17+")
                && e.contains("-c/--istio-exclude-interfaces")
                && e.contains("everything else works"),
            "{e}"
        );
    }
}
