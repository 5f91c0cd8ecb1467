//! `redirect`: eBPF replacement for istio-init's iptables rules.
use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

mod cmd;

#[derive(Parser)]
#[command(
    name = "redirect",
    version,
    about = "Transparent sidecar traffic redirection with eBPF (replaces istio-init's iptables rules)"
)]
struct Cli {
    /// bpffs directory holding this install's pinned maps and links.
    #[arg(long, global = true, env = "REDIRECT_PIN_DIR", default_value = redirect_userspace::pins::DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

/// One lives per process, parsed once: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Capture a pod's network namespace (istio-iptables flags accepted).
    Attach(cmd::attach::Args),
    /// Istio's init container, verbatim: `istio-init`'s args after the
    /// word `istio-iptables`, and its environment. Also what this binary
    /// does when invoked as `istio-iptables`.
    #[command(name = "istio-iptables")]
    IstioIptables(cmd::istio_iptables::Args),
    /// Release a pod: its connections go direct again.
    Detach(cmd::detach::Args),
    /// List captured pods and their config.
    Status(cmd::status::Args),
    /// Per-pod counters, laid out like `iptables -t nat -L -n -v`.
    ///
    /// One row per rule, with its configured match. The first column
    /// counts new connections (calls, sockets or messages in the
    /// ORIGINAL_DST, ACCEL and ERRORS chains); "bytes" counts both
    /// directions of redirected outbound connections (added when the app's
    /// socket closes) and the sk_msg rows' bytes, and is "-" for rows that
    /// count no bytes. `--zero`, `--chain` and `--watch` work like
    /// `iptables -Z`, `iptables --list CHAIN` and `watch -d`.
    Stats(cmd::stats::Args),
    /// Why is (isn't) a connection captured: the decision the kernel
    /// programs would take for it in a captured pod, with the pod's live
    /// config, rule by rule in the order of the chain.
    Explain(cmd::explain::Args),
    /// Stream live decisions (and SO_ORIGINAL_DST/getpeername answers,
    /// refusals) of one pod or of every pod as they happen; Ctrl-C stops.
    Trace(cmd::trace::Args),
    /// Remove every program, link and pin of this install (and, when
    /// named, the redirect-cni conflist entry and binary).
    Uninstall(cmd::uninstall::Args),
    /// The node agent: keeps the install loaded, captures and releases
    /// pods for the redirect-cni plugin over a unix socket, serves
    /// Prometheus metrics.
    Daemon(cmd::daemon::Args),
    /// Check a captured pod as Istio's validation init container does (run
    /// before the proxy starts): the proxy's probe to 127.0.0.6:15002 lands
    /// on the inbound port with its original destination, and a connection
    /// from outside the pod would land on the inbound port.
    Validate(cmd::validate::Args),
    /// The part of `validate` that runs inside the pod (internal).
    #[command(hide = true)]
    ValidateInside(cmd::validate::InsideArgs),
    /// The acceleration kernel probe's sandboxed half (internal).
    #[command(hide = true, name = "accel-probe-inside")]
    AccelProbeInside,
}

fn main() -> ExitCode {
    // `redirect stats | head` must end quietly, like any Unix tool.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    // Multi-call: invoked as `istio-iptables` (a symlink), it is `redirect
    // istio-iptables`.
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args
        .first()
        .and_then(|a| std::path::Path::new(a).file_name())
        .is_some_and(|n| n == "istio-iptables")
    {
        args.insert(1, "istio-iptables".into());
    }
    let cli = Cli::parse_from(args);
    // The agent logs what it does; the one-shot commands only warnings,
    // which read like their other messages (no timestamp, no module path).
    let daemon = matches!(cli.command, Command::Daemon(_));
    // --debug-log asks for the kernel's debug records: let them through.
    let kernel_log = match &cli.command {
        Command::Daemon(a) => a.debug_log,
        Command::Attach(a) => a.debug_log,
        _ => false,
    };
    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| if daemon { "info" } else { "warn" }.into());
    if kernel_log {
        if let Ok(d) = "redirect::kernel=debug".parse() {
            filter = filter.add_directive(d);
        }
    }
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    if daemon {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(ansi)
            .init();
    } else {
        tracing_subscriber::fmt()
            .without_time()
            .with_target(false)
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(ansi)
            .init();
    }
    let r = match cli.command {
        Command::Attach(a) => cmd::attach::run(&cli.pin_dir, a),
        Command::IstioIptables(a) => cmd::istio_iptables::run(&cli.pin_dir, a),
        Command::Detach(a) => cmd::detach::run(&cli.pin_dir, a),
        Command::Status(a) => cmd::status::run(&cli.pin_dir, a),
        Command::Stats(a) => cmd::stats::run(&cli.pin_dir, a),
        Command::Explain(a) => cmd::explain::run(&cli.pin_dir, a),
        Command::Trace(a) => cmd::trace::run(&cli.pin_dir, a),
        Command::Uninstall(a) => cmd::uninstall::run(&cli.pin_dir, a),
        Command::Daemon(a) => cmd::daemon::run(&cli.pin_dir, a),
        Command::Validate(a) => cmd::validate::run(&cli.pin_dir, a),
        Command::ValidateInside(a) => cmd::validate::run_inside(a),
        Command::AccelProbeInside => redirect_userspace::probe::inside()
            .map_err(|e| anyhow::anyhow!("acceleration probe: {e}")),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("redirect: error: {e:#}");
            match e.downcast_ref::<cmd::Exit>() {
                Some(x) => ExitCode::from(x.code),
                None => ExitCode::FAILURE,
            }
        }
    }
}
