//! `redirect-kit`: the demo, the benchmark and the network tools of the
//! tests (see `redirect_testbed::kit`).
use std::{net::SocketAddr, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};
use redirect_testbed::{bench, bookinfo, demo, difftest, kit};

#[derive(Parser)]
#[command(
    name = "redirect-kit",
    about = "Demo, benchmark, and the sidecar proxy, echo server and client of redirect's tests"
)]
struct Cli {
    #[command(subcommand)]
    tool: Tool,
}

#[derive(Subcommand)]
enum Tool {
    /// Build a demo pod (app + sidecar proxy as uid 1337) and an upstream
    /// server in network namespaces on this host, capture it, send
    /// traffic, print the counters and clean up (`cargo xtask demo` runs
    /// this).
    Demo(demo::Args),
    /// Bookinfo's call chain on three nodes of four pods each (no mesh;
    /// HAProxy sidecars behind istio-init's iptables rules; the same
    /// behind redirect), interleaved: checks every hop went through the
    /// sidecars, prints per-pod counters and the end-to-end latency,
    /// cleans up (`cargo xtask demo --bookinfo` runs this).
    Bookinfo(bookinfo::Options),
    /// One Bookinfo service: an HTTP/1.1 server on --listen that calls
    /// each --call NAME=ADDR in order for every request.
    #[command(hide = true)]
    BookinfoApp {
        #[arg(long)]
        name: String,
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long = "call", value_parser = bookinfo::app::parse_call)]
        calls: Vec<(String, SocketAddr)>,
    },
    /// Transparent sidecar proxy (SO_ORIGINAL_DST, inbound from 127.0.0.6).
    Proxy {
        #[arg(long, default_value = "15001")]
        outbound_port: u16,
        #[arg(long, default_value = "15006")]
        inbound_port: u16,
    },
    /// Stand-in for Istio's DNS proxy on 127.0.0.1 and [::1] (UDP, TCP):
    /// answers names under --local-suffix itself, forwards the rest to
    /// --upstream. One JSON line per query.
    DnsProxy {
        #[arg(long, default_value = "15053")]
        port: u16,
        #[arg(long, default_value = "mesh")]
        local_suffix: String,
        #[arg(long)]
        upstream: Option<SocketAddr>,
    },
    /// One DNS query; prints a JSON report (answers, the reply's source,
    /// getpeername).
    DnsQuery {
        #[arg(long)]
        server: SocketAddr,
        #[arg(long)]
        name: String,
        /// A or AAAA.
        #[arg(long, default_value = "A")]
        qtype: String,
        #[arg(long, value_enum, default_value = "udp")]
        transport: kit::dns::Transport,
        #[arg(long, default_value = "3000")]
        timeout_ms: u64,
    },
    /// Echo server that greets with what it sees.
    Echo {
        #[arg(long = "listen", required = true)]
        listen: Vec<SocketAddr>,
    },
    /// One connection: greeting, payload, echo; prints a JSON report.
    Client {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long)]
        bind: Option<std::net::IpAddr>,
        #[arg(long, default_value = "ping", conflicts_with = "size")]
        payload: String,
        /// Send this many bytes of a deterministic pattern instead.
        #[arg(long)]
        size: Option<usize>,
        #[arg(long, default_value = "3000")]
        timeout_ms: u64,
    },
    /// Benchmark sidecar: event-loop transparent proxy on --port, plus
    /// fixed-upstream listeners on 127.0.0.1 (`--fixed PORT=ADDR`).
    #[command(hide = true)]
    BenchProxy {
        #[arg(long, default_value = "15001")]
        port: u16,
        #[arg(long, value_parser = bench::net::parse_fixed)]
        fixed: Vec<(u16, SocketAddr)>,
    },
    /// Benchmark servers: echo and sink listeners on one event loop.
    #[command(hide = true)]
    BenchServer {
        #[arg(long)]
        echo: Vec<SocketAddr>,
        #[arg(long)]
        sink: Vec<SocketAddr>,
        /// Echo on an AF_UNIX stream socket with this abstract name.
        #[arg(long)]
        unix_echo: Vec<String>,
    },
    /// Benchmark load generator: one measurement, one JSON line.
    #[command(hide = true)]
    BenchLoad {
        #[arg(long, value_enum)]
        mode: bench::loadgen::Mode,
        #[arg(long, required_unless_present = "unix")]
        target: Option<SocketAddr>,
        /// `--mode unix`: the echo's abstract AF_UNIX name.
        #[arg(long)]
        unix: Option<String>,
        #[arg(long, default_value = "64")]
        size: usize,
        #[arg(long, default_value = "1000")]
        duration_ms: u64,
        #[arg(long, default_value = "200")]
        warmup_ms: u64,
        /// Requests per second (open loop).
        #[arg(long, default_value = "5000")]
        rate: u64,
    },
    /// The whole benchmark (as root; `cargo xtask bench` runs this).
    #[command(hide = true)]
    Bench {
        #[arg(long)]
        quick: bool,
        #[arg(long, value_enum, default_value = "kit")]
        proxy: bench::model::ProxyKind,
        #[arg(long, default_value = "results")]
        out: std::path::PathBuf,
        #[arg(long)]
        reps: Option<usize>,
        /// Open-loop rate (requests/s).
        #[arg(long)]
        rate: Option<u64>,
    },
    /// What `redirect trace` costs: configuration D with nobody tracing,
    /// a tracer on another pod, a tracer on the measured pod (as root,
    /// after `cargo xtask build`); a markdown table on stdout.
    BenchTraceCost {
        /// Smoke run: 2 repetitions of 250 ms, no warm-up round.
        #[arg(long)]
        quick: bool,
        /// Repetitions (default 5, 2 with --quick).
        #[arg(long)]
        reps: Option<usize>,
    },
    /// Pod churn against a real agent: N pods captured and released through
    /// redirect-cni under steady traffic; timings and leak checks (as root;
    /// `cargo xtask bench --churn` runs this).
    PodChurn {
        #[arg(long, default_value = "1000")]
        pods: usize,
        /// Write churn.md and churn.json here.
        #[arg(long)]
        out: Option<std::path::PathBuf>,
        /// Pods kept captured through the churn (a node's resident pods;
        /// 100: about a full node at kubelet's default of 110 pods).
        #[arg(long, default_value = "100")]
        resident: usize,
    },
    /// Inside a churned pod: one redirected connection, checked.
    #[command(hide = true)]
    PodProbe {
        #[arg(long)]
        dst: SocketAddr,
        #[arg(long, default_value = "16384")]
        size: usize,
    },
    /// The differential test: random istio-iptables configurations and
    /// connections, a pod with Istio's own rules against a pod captured by
    /// redirect (as root; `cargo xtask diff-test` runs this). Exits 1 on a
    /// mismatch no known difference covers, or on a known difference no
    /// longer needed.
    DiffTest {
        /// Connections in all.
        #[arg(long, default_value = "300")]
        cases: usize,
        /// Generator seed (default: from the clock; printed either way).
        #[arg(long)]
        seed: Option<u64>,
        /// Connections per configuration.
        #[arg(long, default_value = "12")]
        per_config: usize,
        /// Print only the mismatches and the totals, not every case.
        #[arg(long)]
        quiet: bool,
    },
    /// Differential test server: greets each TCP connection, answers each
    /// datagram, with its role, where it was reached and from where.
    #[command(hide = true)]
    DiffServe {
        #[arg(long)]
        role: String,
        #[arg(long)]
        tcp: Vec<SocketAddr>,
        #[arg(long)]
        udp: Vec<SocketAddr>,
    },
    /// Differential test caller: one connection, one JSON line.
    #[command(hide = true)]
    DiffProbe {
        #[arg(long, value_enum)]
        proto: difftest::net::Proto,
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long)]
        bind: Option<std::net::IpAddr>,
        #[arg(long, default_value = "1500")]
        timeout_ms: u64,
    },
    /// Stress tools of the acceleration tests (xfer, stress-server,
    /// epoll-echo, churn, fan).
    #[command(flatten)]
    Stress(kit::stress::StressTool),
}

fn main() -> ExitCode {
    match Cli::parse().tool {
        Tool::Demo(a) => run_demo(a),
        Tool::Bookinfo(o) => run_bookinfo(o),
        Tool::BookinfoApp {
            name,
            listen,
            calls,
        } => report(bookinfo::app::serve(&name, listen, &calls)),
        Tool::Proxy {
            outbound_port,
            inbound_port,
        } => report(kit::proxy(outbound_port, inbound_port)),
        Tool::Echo { listen } => report(kit::echo(&listen)),
        Tool::DnsProxy {
            port,
            local_suffix,
            upstream,
        } => report(kit::dns::proxy(port, &local_suffix, upstream)),
        Tool::DnsQuery {
            server,
            name,
            qtype,
            transport,
            timeout_ms,
        } => {
            let t = if qtype.eq_ignore_ascii_case("AAAA") {
                kit::dns::TYPE_AAAA
            } else {
                kit::dns::TYPE_A
            };
            let v = kit::dns::client(
                server,
                &name,
                t,
                transport,
                Duration::from_millis(timeout_ms),
            );
            println!("{v}");
            if v["ok"] == true {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Tool::Client {
            connect,
            bind,
            payload,
            size,
            timeout_ms,
        } => {
            let bytes = match size {
                Some(n) => kit::payload(n),
                None => payload.into_bytes(),
            };
            let r = kit::client(connect, bind, &bytes, Duration::from_millis(timeout_ms));
            println!("{}", serde_json::to_string(&r).expect("serializable"));
            if r.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Tool::BenchProxy { port, fixed } => report(bench::net::proxy(port, &fixed)),
        Tool::BenchServer {
            echo,
            sink,
            unix_echo,
        } => {
            let l: Vec<_> = echo
                .iter()
                .map(|a| (*a, bench::net::Role::Echo))
                .chain(sink.iter().map(|a| (*a, bench::net::Role::Sink)))
                .collect();
            report(bench::net::serve_all(&l, &unix_echo))
        }
        Tool::BenchLoad {
            mode,
            target,
            unix,
            size,
            duration_ms,
            warmup_ms,
            rate,
        } => {
            let target = target.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
            let a = bench::loadgen::LoadArgs {
                mode,
                target,
                unix,
                size,
                duration: Duration::from_millis(duration_ms),
                warmup: Duration::from_millis(warmup_ms),
                rate,
            };
            let r = bench::loadgen::run(&a);
            println!("{}", serde_json::to_string(&r).expect("serializable"));
            if r.error.is_none() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Tool::Stress(t) => t.run(),
        Tool::DiffServe { role, tcp, udp } => report(difftest::net::serve(&role, &tcp, &udp)),
        Tool::DiffProbe {
            proto,
            connect,
            bind,
            timeout_ms,
        } => {
            let r = difftest::net::probe(proto, connect, bind, Duration::from_millis(timeout_ms));
            println!("{}", serde_json::to_string(&r).expect("serializable"));
            ExitCode::SUCCESS
        }
        Tool::DiffTest {
            cases,
            seed,
            per_config,
            quiet,
        } => run_diff_test(cases, seed, per_config, quiet),
        Tool::PodProbe { dst, size } => {
            let v = kit::podchurn::pod_probe(dst, size);
            println!("{v}");
            if v["ok"] == true {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Tool::PodChurn {
            pods,
            out,
            resident,
        } => match kit::podchurn::run(&kit::podchurn::Options {
            pods,
            out,
            redirect: None,
            resident,
        }) {
            Ok(r) => {
                eprint!("{}", kit::podchurn::markdown(&r));
                println!("{}", serde_json::to_string(&r).expect("serializable"));
                if r.ok {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                }
            }
            Err(e) => {
                eprintln!("redirect-kit pod-churn: {e}");
                ExitCode::FAILURE
            }
        },
        Tool::BenchTraceCost { quick, reps } => {
            let o = bench::runner::Options {
                quick,
                proxy: bench::model::ProxyKind::Kit,
                out: std::path::PathBuf::new(),
                reps,
                rate: None,
            };
            match bench::trace_cost::run(&o) {
                Ok(md) => {
                    print!("{md}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("redirect-kit bench-trace-cost: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Tool::Bench {
            quick,
            proxy,
            out,
            reps,
            rate,
        } => {
            let o = bench::runner::Options {
                quick,
                proxy,
                out,
                reps,
                rate,
            };
            match bench::runner::run(&o) {
                Ok((path, ok)) => {
                    // The head of the report (run, machine, targets), then its path.
                    let md = std::fs::read_to_string(&path).unwrap_or_default();
                    println!("{}", md.split("\n## Results").next().unwrap_or(""));
                    println!("report: {}", path.display());
                    if ok {
                        ExitCode::SUCCESS
                    } else {
                        eprintln!("redirect-kit bench: some path checks failed (see the report)");
                        ExitCode::FAILURE
                    }
                }
                Err(e) => {
                    eprintln!("redirect-kit bench: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn run_diff_test(cases: usize, seed: Option<u64>, per_config: usize, quiet: bool) -> ExitCode {
    let seed = seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(1)
    });
    let o = difftest::Options {
        cases,
        seed,
        per_config: per_config.max(1),
        verbose: !quiet,
    };
    println!("differential test: seed {seed} (rerun: --seed {seed} --cases {cases})");
    match difftest::run(&o, &mut std::io::stdout()) {
        Ok(r) => {
            print!("{}", r.summary());
            if r.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("redirect-kit diff-test: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The demos' logging as `redirect`'s: quiet on a closed pipe, the
/// library's warnings on stderr (RUST_LOG to see more).
fn demo_logging() {
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn run_demo(a: demo::Args) -> ExitCode {
    demo_logging();
    match demo::run(a) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("redirect-kit demo: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The Bookinfo demo; Ctrl-C stops it at the next call or step, and it
/// cleans up as on any error.
fn run_bookinfo(o: bookinfo::Options) -> ExitCode {
    demo_logging();
    bookinfo::stop_on_signals();
    match bookinfo::run(&o, &mut std::io::stdout()) {
        Ok(_) => {
            println!("bookinfo demo ok");
            ExitCode::SUCCESS
        }
        // Ctrl-C reaches the apps and sidecars too: whatever failed
        // first, the run was stopped.
        Err(_) if bookinfo::interrupted() => {
            eprintln!("redirect-kit bookinfo: interrupted; everything it created is removed");
            ExitCode::from(130)
        }
        Err(e) => {
            eprintln!("redirect-kit bookinfo: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn report(r: std::io::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("redirect-kit: {e}");
            ExitCode::FAILURE
        }
    }
}
