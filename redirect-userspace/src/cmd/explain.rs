//! `redirect explain`
use std::path::{Path, PathBuf};

use anyhow::Result;
use redirect_userspace::{
    explain::{self, Explanation, Query},
    pins::Pins,
    sys,
    wire::{self, CallError, ErrorKind, Reply, Request},
};

#[derive(clap::Args)]
pub struct Args {
    /// The pod's network namespace (/var/run/netns/<name>, /proc/<pid>/ns/net).
    #[arg(long, value_name = "PATH")]
    pub netns: Option<PathBuf>,
    /// Or the pod as the agent recorded it, <namespace>/<name>.
    #[arg(long, value_name = "NS/NAME")]
    pub pod: Option<String>,
    /// A connection from outside the pod to it (the PREROUTING rules)
    /// instead of one the pod makes (OUTPUT).
    #[arg(long)]
    pub inbound: bool,
    /// Outbound: the uid of the process connecting.
    #[arg(long)]
    pub uid: Option<u32>,
    /// Outbound, with --uid: its gid (default: the uid).
    #[arg(long)]
    pub gid: Option<u32>,
    /// Outbound: the process connecting; its uid and gid are read from
    /// /proc/<pid>/status, and it must be in the pod's network namespace.
    #[arg(long)]
    pub pid: Option<u32>,
    /// Where the connection goes: ADDR:PORT ([ADDR]:PORT for IPv6).
    #[arg(long, value_name = "ADDR:PORT")]
    pub dst: String,
    /// Outbound: the address the socket is bound to (default: unbound);
    /// inbound: the peer's address (default: one outside the pod).
    #[arg(long, value_name = "ADDR")]
    pub src: Option<String>,
    /// tcp (default) or udp.
    #[arg(long, value_name = "tcp|udp")]
    pub proto: Option<String>,
    /// Inbound: the interface it arrives on (1 is lo).
    #[arg(long)]
    pub ifindex: Option<u32>,
    /// Print the explanation as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub agent: super::AgentArgs,
}

pub fn run(pin_dir: &Path, a: Args) -> Result<()> {
    let q = Query {
        netns: a.netns,
        pod: a.pod,
        inbound: a.inbound,
        uid: a.uid,
        gid: a.gid,
        pid: a.pid,
        dst: a.dst,
        src: a.src,
        proto: a.proto,
        ifindex: a.ifindex,
    };
    let e = match via_agent(pin_dir, &q, &a.agent)? {
        Some(e) => e,
        None => {
            sys::check_privileges()?;
            explain::explain(&Pins::new(pin_dir), &q)?
        }
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&e)?);
    } else {
        print!("{}", explain::render(&e));
    }
    Ok(())
}

/// Through the agent when one answers on its socket for this install;
/// None when the install is to be read here.
fn via_agent(pin_dir: &Path, q: &Query, a: &super::AgentArgs) -> Result<Option<Explanation>> {
    if a.no_agent || !a.agent_socket.exists() {
        return Ok(None);
    }
    let req = Request::Explain {
        query: q.clone(),
        pin_dir: Some(pin_dir.to_path_buf()),
    };
    match wire::call(&a.agent_socket, &req, std::time::Duration::from_secs(10)) {
        Ok(Reply::Explain(e)) => Ok(Some(*e)),
        Ok(other) => anyhow::bail!("agent protocol error: not an explain reply: {other:?}"),
        Err(CallError::Refused(e)) if e.kind == ErrorKind::OtherInstall => Ok(None),
        Err(CallError::Refused(e)) if e.kind == ErrorKind::BadRequest => {
            // An agent from before `explain`.
            tracing::debug!("the agent does not know explain: {e}");
            Ok(None)
        }
        Err(CallError::Refused(e)) => Err(anyhow::anyhow!("{}", e.message)),
        Err(CallError::Unreachable(why)) => {
            tracing::debug!("no agent: {why}");
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}
