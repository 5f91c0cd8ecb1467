//! The Bookinfo demo (`cargo xtask demo --bookinfo`), short: Bookinfo's
//! four pods on a node, with no mesh, with HAProxy sidecars behind
//! istio-init's iptables rules, and with the same sidecars behind
//! `redirect`. Every hop of every call must have gone through its caller's
//! outbound sidecar and its callee's inbound sidecar, by both capture
//! paths' counters and by the sidecars' own logs; the README's block must
//! have the format of the demo's output; and nothing may be left behind,
//! after a run or after a failed one.
use redirect_testbed::{
    bookinfo::{self, mesh::Mesh, report, Options, WARMUP_CALLS, WORKFLOW_CALLS},
    sandbox::unique,
};

const CALLS: u64 = 20;

fn options(id: &str) -> Options {
    Options {
        calls: CALLS,
        rounds: 2,
        id: Some(id.into()),
        ..Options::default()
    }
}

/// The namespaces, cgroups and pins of the run with this `id`.
fn leftovers(id: &str) -> Vec<String> {
    let mut left: Vec<String> = redirect_testbed::sandbox::run("ip", &["netns", "list"])
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with(&format!("rdbi-{id}-")))
        .map(|l| format!("netns {l}"))
        .collect();
    let cgroups = format!("redirect-rdbi-{id}-");
    let pins = format!("redirect-bookinfo-{id}");
    let names = |dir: &std::path::Path| -> Vec<String> {
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect()
    };
    let cg = redirect_userspace::sys::cgroup2_mount().expect("cgroup2");
    left.extend(names(&cg).into_iter().filter(|n| n.starts_with(&cgroups)));
    left.extend(
        names(std::path::Path::new("/sys/fs/bpf"))
            .into_iter()
            .filter(|n| *n == pins),
    );
    left
}

/// The run's report or its error (with causes), and what it printed.
fn run(o: &Options) -> (Result<bookinfo::Report, String>, String) {
    let mut out = Vec::new();
    let r = bookinfo::run(o, &mut out).map_err(|e| format!("{e:#}"));
    (r, String::from_utf8_lossy(&out).into_owned())
}

#[test]
fn bookinfo_every_hop_through_the_sidecars_under_both_capture_paths() {
    let id = unique("");
    let md = std::env::temp_dir().join(format!("{}.md", unique("bookinfo-md-")));
    let mut o = options(&id);
    o.markdown = Some(md.clone());
    let (r, out) = run(&o);
    let rep = r.unwrap_or_else(|e| panic!("demo failed: {e}\n{out}"));
    assert_eq!(leftovers(&id), Vec::<String>::new(), "left behind:\n{out}");

    // Per node: the warm-up, the workflow's calls on C, the measured ones.
    let calls = |m: Mesh| {
        WARMUP_CALLS
            + CALLS
            + if m == Mesh::Redirect {
                WORKFLOW_CALLS
            } else {
                0
            }
    };
    assert_eq!(rep.counters.len(), 3, "{out}");
    for (label, pods) in &rep.counters {
        let m = *Mesh::ALL.iter().find(|m| m.label() == label).unwrap();
        let n = calls(m);
        assert_eq!(pods.len(), 4, "{label}");
        for p in pods {
            assert!(p.ok(), "{label}, {}: {:?}\n{out}", p.pod, p.problems);
            // Connections out of this pod per call: productpage calls
            // details and reviews, reviews calls ratings.
            let per_call = match p.pod.as_str() {
                "productpage" => 2,
                "reviews" => 1,
                _ => 0,
            };
            let (want_out, want_in) = if m == Mesh::None {
                (0, 0)
            } else {
                (n * per_call, n)
            };
            let counted = [p.captured_out, p.captured_in, p.proxy_uid, p.passthrough];
            let want = [want_out, want_in, want_out, want_in];
            if m == Mesh::Iptables {
                // The nat table counts new conntrack entries: at least one
                // per connection, sometimes more (docs/bookinfo.md).
                assert!(
                    counted.iter().zip(&want).all(|(c, w)| c >= w),
                    "{label}, {}: iptables counted {counted:?}, fewer than {want:?} \
                     (to 15001, to 15006, uid 1337, 127.0.0.6)\n{out}",
                    p.pod
                );
            } else {
                assert_eq!(
                    counted, want,
                    "{label}, {}: captured to 15001 / 15006, the sidecar's own connections\n{out}",
                    p.pod
                );
            }
            assert_eq!(
                (p.log_out, p.log_in),
                (want_out, want_in),
                "{label}, {}: haproxy log lines (out, in)\n{out}",
                p.pod
            );
            match m {
                Mesh::Redirect => assert_eq!(p.orig_dst, Some(want_out + want_in), "{}", p.pod),
                _ => assert_eq!(p.orig_dst, None, "{}", p.pod),
            }
        }
    }
    for (l, m) in rep.latency.iter().zip(Mesh::ALL) {
        assert_eq!(l.label, m.label());
        assert_eq!(l.calls, CALLS, "{l:?}");
        assert!(l.p50_us > 0.0 && l.p99_us >= l.p50_us, "{l:?}");
    }

    // The workflow in C's productpage pod: zeroed, then exactly the
    // workflow's calls counted (2 captured connections out per call).
    let w = &rep.workflow;
    assert!(
        w.zero_out.starts_with("zeroed /run/netns/"),
        "{}",
        w.zero_out
    );
    let captured = w
        .chain_out
        .lines()
        .find(|l| l.contains("captured -> outbound port (-i)"))
        .unwrap_or_else(|| panic!("no captured row:\n{}", w.chain_out));
    assert_eq!(
        captured.split_whitespace().next(),
        Some((2 * WORKFLOW_CALLS).to_string().as_str()),
        "{}",
        w.chain_out
    );
    assert!(w.chain_out.contains("[since --zero"), "{}", w.chain_out);

    // The Markdown it wrote is the README's block's format, numbers aside.
    let written = std::fs::read_to_string(&md).expect("--markdown file");
    let _ = std::fs::remove_file(&md);
    assert_eq!(written, report::markdown(&rep));
    let readme = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"),
    )
    .unwrap();
    let block = report::block(&readme).expect("README.md's bookinfo-demo block");
    let shape = |t: &str| t.lines().map(report::shape).collect::<Vec<_>>();
    assert_eq!(
        shape(block),
        shape(&written),
        "README.md's block differs from this run's format: cargo xtask demo --bookinfo --update-readme"
    );
}

#[test]
fn bookinfo_bad_input_names_the_step_and_leaves_nothing() {
    let err = |o: &Options| {
        let (r, out) = run(o);
        let e = match r {
            Ok(_) => panic!("accepted: {out}"),
            Err(e) => e,
        };
        let left = leftovers(o.id.as_deref().unwrap());
        assert_eq!(left, Vec::<String>::new(), "left behind after: {e}\n{out}");
        e
    };

    let mut o = options(&unique(""));
    o.rounds = 0;
    let e = err(&o);
    assert!(e.contains("step 0") && e.contains("--rounds 0"), "{e}");
    o.rounds = CALLS + 1;
    let e = err(&o);
    assert!(e.contains("--rounds 21 is more than --calls 20"), "{e}");

    let mut o = options(&unique(""));
    o.haproxy = "/nonexistent/haproxy".into();
    let e = err(&o);
    assert!(
        e.contains("step 0") && e.contains("--haproxy /nonexistent/haproxy: missing"),
        "{e}"
    );

    let readme = std::env::temp_dir().join(format!("{}.md", unique("bookinfo-no-markers")));
    std::fs::write(&readme, "# no markers\n").unwrap();
    let mut o = options(&unique(""));
    o.update_readme = Some(readme.clone());
    let e = err(&o);
    let _ = std::fs::remove_file(&readme);
    assert!(e.contains("--update-readme") && e.contains("marker"), "{e}");

    // A sidecar that does not start, after the nodes, pods and captures
    // exist: the step and the pod are named, and everything is removed.
    let mut o = options(&unique(""));
    o.haproxy = "/bin/false".into();
    let e = err(&o);
    assert!(
        e.contains("step 3, starting the pods of node B (mesh on iptables)")
            && e.contains("productpage: starting its sidecar (haproxy)"),
        "{e}"
    );
}
