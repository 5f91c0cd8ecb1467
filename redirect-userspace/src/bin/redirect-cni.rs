//! `redirect-cni`: the chained CNI plugin that has `redirect daemon`
//! capture a pod when its network is set up (see `redirect_userspace::cni`).
//! Never panics its way out: any internal failure is a CNI error reply.
use std::io::{Read, Write};

use redirect_userspace::cni;

fn main() {
    // No panic message on stderr: the reply on stdout says it all.
    std::panic::set_hook(Box::new(|_| {}));
    let outcome = std::panic::catch_unwind(|| {
        let mut stdin = Vec::new();
        // At most 16 MiB of config: anything bigger is not a CNI config.
        if let Err(e) = std::io::stdin().take(16 << 20).read_to_end(&mut stdin) {
            let err = cni::CniError::new(
                cni::code::IO_FAILURE,
                "reading the network config from stdin failed",
                e.to_string(),
            );
            return cni::Outcome {
                stdout: err.to_json("1.0.0"),
                stderr: String::new(),
                exit_code: 1,
            };
        }
        cni::run(&|k| std::env::var(k).ok(), &stdin, &cni::SocketClient)
    })
    .unwrap_or_else(|p| {
        let what = p
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        let err = cni::CniError::new(cni::code::INTERNAL, "redirect-cni internal error", what);
        cni::Outcome {
            stdout: err.to_json("1.0.0"),
            stderr: String::new(),
            exit_code: 1,
        }
    });
    let _ = std::io::stderr().write_all(outcome.stderr.as_bytes());
    let mut out = std::io::stdout();
    let _ = out.write_all(outcome.stdout.as_bytes());
    if !outcome.stdout.is_empty() {
        let _ = out.write_all(b"\n");
    }
    let _ = out.flush();
    std::process::exit(outcome.exit_code);
}
