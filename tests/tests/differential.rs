//! Differential exactness, a fixed-seed run: random istio-iptables
//! configurations and connections, each connection made in a pod holding
//! Istio's own rules (written by `redirect_testbed::istio_rules`, installed
//! with iptables-restore / ip6tables-restore) and in a pod captured by the
//! `redirect` binary with the same flags; the outcomes must be the same
//! (where it landed, the proxy's SO_ORIGINAL_DST, the caller's
//! getpeername, the client address the server saw), except for the known
//! differences of `redirect_testbed::difftest::known`, each of which must
//! still show on its own example. `cargo xtask diff-test` runs the same
//! with any seed and size (docs/testing.md).
use redirect_testbed::difftest::{self, Options};

/// Changing it changes every case; keep it unless the run stops covering
/// what it should.
const SEED: u64 = 20;

#[test]
fn redirect_decides_every_connection_as_istio_iptables_rules_do() {
    let o = Options {
        cases: 300,
        seed: SEED,
        per_config: 12,
        verbose: false,
    };
    let mut out = Vec::new();
    let r = difftest::run(&o, &mut out).unwrap_or_else(|e| panic!("differential test: {e:#}"));
    let summary = r.summary();
    eprint!("{}{summary}", String::from_utf8_lossy(&out));
    assert!(r.ok(), "{summary}");
    assert_eq!(r.cases, o.cases);
    // A meaningful run: most connections come out the same in both pods
    // (known differences are the exception), and both directions and
    // every family were tried.
    assert!(r.passed * 10 >= r.cases * 8, "{summary}");
    assert!(r.configs >= 20, "{summary}");
    for kind in [
        "remote",
        "pod address",
        "loopback",
        "passthrough address",
        "unspecified address",
        "dns",
        "inbound",
    ] {
        for family in ["v4", "v6"] {
            let k = format!("{kind} {family}");
            assert!(r.tried.contains_key(&k), "no {k} case: {summary}");
        }
    }
}
