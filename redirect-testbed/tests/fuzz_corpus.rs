//! Replays the kept fuzz corpus (fuzz/corpus/) through the same entry
//! points the `cargo fuzz` targets use: malformed, oversized and hostile
//! inputs must give errors, never panics.
use redirect_testbed::fuzzing;

fn replay(target: &str, f: fn(&[u8])) {
    let dir = fuzzing::corpus_dir(target);
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = e.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        if let Err(p) = std::panic::catch_unwind(|| f(&data)) {
            panic!("{} panicked: {p:?}", path.display());
        }
        n += 1;
    }
    assert!(n >= 10, "corpus {target} has only {n} inputs");
}

#[test]
fn flags_corpus_never_panics() {
    replay("flags", fuzzing::flags);
}

#[test]
fn cidr_corpus_never_panics() {
    replay("cidr", fuzzing::cidr);
}

#[test]
fn oversized_and_hostile_inputs() {
    fuzzing::flags(&vec![b'9'; 1 << 20]);
    fuzzing::flags(&[b'1', 0, b'1', 0, b'1', 0].repeat(10_000));
    fuzzing::cidr(&vec![b'/'; 1 << 16]);
    fuzzing::cidr("1.2.3.4/".repeat(1000).as_bytes());
    fuzzing::flags("15001\u{0}15006\u{0}15008\u{0}1,2,3,4,5,6,7,8,9\u{0}REDIRECT".as_bytes());
}

#[test]
fn annotations_corpus_never_panics() {
    replay("annotations", fuzzing::annotations);
    fuzzing::annotations(&vec![0u8; 1 << 16]);
    fuzzing::annotations(format!("{{\"kind\":\"Pod\",\"metadata\":{{\"annotations\":{{}}}},\"spec\":{{\"containers\":{}}}}}", "[".repeat(100)).as_bytes());
    fuzzing::annotations(&["8080,"; 20_000].concat().into_bytes());
}

#[test]
fn ports_corpus_never_panics() {
    replay("ports", fuzzing::ports);
    fuzzing::ports(&["65535,"; 50_000].concat().into_bytes());
    fuzzing::ports(&vec![b','; 1 << 20]);
}

#[test]
fn cni_corpus_never_panics() {
    replay("cni", fuzzing::cni);
    // Oversized environment and stdin.
    let mut big = b"\0CNI_COMMAND=ADD\0CNI_ARGS=".to_vec();
    big.extend(std::iter::repeat_n(b"A=B;".as_slice(), 100_000).flatten());
    big.push(b'\n');
    big.extend(std::iter::repeat_n(b'{', 1 << 16));
    fuzzing::cni(&big);
}
