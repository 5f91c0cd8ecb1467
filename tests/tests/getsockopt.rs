//! The getsockopt program answers SO_ORIGINAL_DST and leaves every other
//! getsockopt of a captured pod as the kernel made it, whatever its size.
//! A program sees only the first page of an option buffer; handing back
//! a result longer than that fails the call with EFAULT on Linux 5.8 to
//! 6.4 unless the program sets optlen to 0 (Documentation/bpf/
//! prog_cgroup_sockopt.rst, "Large optval"). The real programs that make
//! such calls: `iptables-legacy-save` and `iptables-legacy -L` read a
//! whole table with one getsockopt (IPT_SO_GET_ENTRIES, SOL_IP;
//! IP6T_SO_GET_ENTRIES, SOL_IPV6 for ip6tables), here tens of KiB. Run in
//! the pod's netns and cgroup as root, against the pod's own legacy nat
//! table (nothing outside the test's namespaces is touched).
use std::{
    io::Write,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use redirect_testbed::sandbox::{run_placed, Placement};
use redirect_tests::*;

/// Rules in the pod's legacy nat table: at ~150 bytes each in the
/// kernel's table blob, far beyond a 4 KiB page.
const RULES: usize = 300;

/// `<tool>-restore` of a nat table with a chain of [`RULES`] rules into
/// the pod netns (outside the pod's cgroup: before the capture anyway).
fn fill_nat_table(pod: &Pod, restore: &str, net: &str) {
    let mut table = String::from("*nat\n:BIGCHAIN - [0:0]\n");
    for i in 0..RULES {
        table.push_str(&format!(
            "-A BIGCHAIN -d {net}{} -p tcp --dport {} -m comment --comment \"rule {i}\" -j RETURN\n",
            i % 250 + 1,
            1000 + i
        ));
    }
    table.push_str("COMMIT\n");
    let mut child = Command::new("ip")
        .args(["netns", "exec", &pod.topo.pod.name, restore])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{restore}: {e}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(table.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{restore} in the pod netns: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Root in the pod's netns and cgroup: under the pod's programs.
fn in_pod_as_root(pod: &Pod) -> Placement {
    Placement {
        netns: Some(pod.pod_netns()),
        cgroup: Some(pod.topo.cgroup.path.clone()),
        ..Placement::default()
    }
}

/// Run `tool args` placed as asked; its stdout, or a panic with what it
/// printed.
fn tool(p: &Placement, tool: &str, args: &[&str]) -> String {
    let bin = Path::new("/usr/sbin").join(tool);
    let f = run_placed(&bin, args, p, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{tool}: {e}"));
    assert!(
        f.status.is_some_and(|s| s.success()),
        "{tool} {args:?} failed in the captured pod (timed out: {}): {}{}",
        f.timed_out,
        f.stdout,
        f.stderr
    );
    f.stdout
}

/// The table without the `#` lines (they carry the time).
fn rules(save: &str) -> Vec<&str> {
    save.lines().filter(|l| !l.starts_with('#')).collect()
}

#[test]
fn large_getsockopt_calls_of_other_options_are_untouched() {
    let pod = Pod::new("gsobig");
    fill_nat_table(&pod, "iptables-legacy-restore", "192.0.2.");
    fill_nat_table(&pod, "ip6tables-legacy-restore", "2001:db8::");
    // What the tools print outside the pod's cgroup (no program runs).
    let outside = Placement {
        netns: Some(pod.pod_netns()),
        ..Placement::default()
    };
    let want4 = tool(&outside, "iptables-legacy-save", &["-t", "nat"]);
    let want6 = tool(&outside, "ip6tables-legacy-save", &["-t", "nat"]);
    assert_eq!(
        rules(&want4)
            .iter()
            .filter(|l| l.starts_with("-A BIGCHAIN"))
            .count(),
        RULES,
        "{want4}"
    );

    pod.attach_istio_default();
    let inside = in_pod_as_root(&pod);
    let got4 = tool(&inside, "iptables-legacy-save", &["-t", "nat"]);
    assert_eq!(
        rules(&got4),
        rules(&want4),
        "iptables-legacy-save in the pod"
    );
    let got6 = tool(&inside, "ip6tables-legacy-save", &["-t", "nat"]);
    assert_eq!(
        rules(&got6),
        rules(&want6),
        "ip6tables-legacy-save in the pod"
    );
    let listed = tool(
        &inside,
        "iptables-legacy",
        &["-t", "nat", "-L", "BIGCHAIN", "-n"],
    );
    assert_eq!(
        listed.lines().filter(|l| l.starts_with("RETURN")).count(),
        RULES,
        "{listed}"
    );
    // None of these calls is an original-destination question: the
    // program neither answered nor counted them.
    assert_eq!(pod.counter("ORIGINAL_DST", "orig_dst_missing"), 0);
    assert_eq!(pod.counter("ORIGINAL_DST", "orig_dst_outbound"), 0);
}
