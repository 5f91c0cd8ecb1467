//! `redirect-kit`: the demo/test/bench network tools (see `kit`).
use std::{net::SocketAddr, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};
use redirect_userspace::kit;

#[derive(Parser)]
#[command(name = "redirect-kit", about = "Sidecar proxy, echo server and client used by redirect's demo, tests and benchmark")]
struct Cli {
    #[command(subcommand)]
    tool: Tool,
}

#[derive(Subcommand)]
enum Tool {
    /// Transparent sidecar proxy (SO_ORIGINAL_DST, inbound from 127.0.0.6).
    Proxy {
        #[arg(long, default_value = "15001")]
        outbound_port: u16,
        #[arg(long, default_value = "15006")]
        inbound_port: u16,
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
}

fn main() -> ExitCode {
    match Cli::parse().tool {
        Tool::Proxy { outbound_port, inbound_port } => report(kit::proxy(outbound_port, inbound_port)),
        Tool::Echo { listen } => report(kit::echo(&listen)),
        Tool::Client { connect, bind, payload, size, timeout_ms } => {
            let bytes = match size {
                Some(n) => kit::payload(n),
                None => payload.into_bytes(),
            };
            let r = kit::client(connect, bind, &bytes, Duration::from_millis(timeout_ms));
            println!("{}", serde_json::to_string(&r).expect("serializable"));
            if r.ok { ExitCode::SUCCESS } else { ExitCode::FAILURE }
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
