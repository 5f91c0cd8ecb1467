//! Loading the kernel object, attaching its programs (once per cgroup, once
//! per pod netns), registering and releasing pods, and uninstalling.

use std::{
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use aya::{programs::Program, Ebpf, EbpfLoader};
use redirect_common::ListenerKey;

use crate::bpf::{
    BPF_CGROUP_GETSOCKOPT, BPF_CGROUP_INET4_CONNECT, BPF_CGROUP_INET4_GETPEERNAME,
    BPF_CGROUP_INET6_CONNECT, BPF_CGROUP_INET6_GETPEERNAME, BPF_CGROUP_INET_SOCK_CREATE,
    BPF_CGROUP_INET_SOCK_RELEASE, BPF_CGROUP_SOCK_OPS, BPF_CGROUP_UDP4_RECVMSG,
    BPF_CGROUP_UDP4_SENDMSG, BPF_CGROUP_UDP6_RECVMSG, BPF_CGROUP_UDP6_SENDMSG,
};

use crate::{
    config::{AccelMode, PodSpec},
    error::{Error, Result},
    maps::Maps,
    mapsize::MapSizes,
    pins::{PinKind, Pins},
    probe,
    sklookup::SkLookupTemplate,
    sys::{self, Netns},
};

type SkNetnsStorage = aya::maps::SkStorage<aya::maps::MapData, redirect_common::SkNetns>;

/// The kernel object, built by `cargo xtask build-ebpf`.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../target/bpfel-unknown-none/release/redirect"
));

/// Programs attached to each cgroup (the OUTPUT side and the helpers).
/// An install made before a program existed gets its link at the next
/// `attach_cgroup` (the agent does it at start); the others are kept.
pub use crate::pins::CGROUP_PROGRAMS;
pub const SK_LOOKUP_PROGRAM: &str = "redirect_sk_lookup";
/// The tc programs of `-k` interfaces (one instance each per pod).
pub const VM_INGRESS_PROGRAM: &str = "redirect_vm_ingress";
pub const VM_EGRESS_PROGRAM: &str = "redirect_vm_egress";
pub const SK_MSG_PROGRAM: &str = "redirect_sk_msg";
pub use crate::pins::SOCK_CREATE_PROGRAM;
/// The sk_lookup build for kernels without `bpf_sk_lookup.ingress_ifindex`
/// (before 5.17; `kernel::SK_LOOKUP_INGRESS_IFINDEX`).
pub const SK_LOOKUP_ADDR_PROGRAM: &str = "redirect_sk_lookup_addr";
/// The programs that read the netns cookie with `bpf_get_netns_cookie`
/// where sock_addr programs do not; each has a `<name>_stored` build.
const NETNS_HOOKS: [&str; 3] = ["redirect_getsockopt", "redirect_sockops", SK_MSG_PROGRAM];

/// The programs (and link pin names) each attached cgroup has: with
/// `stored`, the kernel needs the stored netns cookie (see
/// [`SOCK_CREATE_PROGRAM`]).
pub fn cgroup_programs(stored: bool) -> Vec<&'static str> {
    let mut v = CGROUP_PROGRAMS.to_vec();
    if stored {
        v.push(SOCK_CREATE_PROGRAM);
    }
    v
}

/// The program of the object that serves `slot` (a name of
/// [`CGROUP_PROGRAMS`], [`SK_MSG_PROGRAM`] or [`SOCK_CREATE_PROGRAM`]),
/// by the build this kernel needs. Pins and links keep the slot's name
/// whatever the build.
fn program_for(slot: &'static str, stored: bool) -> &'static str {
    match slot {
        "redirect_getsockopt" if stored => "redirect_getsockopt_stored",
        "redirect_sockops" if stored => "redirect_sockops_stored",
        SK_MSG_PROGRAM if stored => "redirect_sk_msg_stored",
        s => s,
    }
}

/// An install (a pin directory) with the object loaded against its maps.
pub struct Installation {
    pub pins: Pins,
    ebpf: Ebpf,
    /// The per-pod sk_lookup program, relocated once (on first use).
    sk_lookup: Option<SkLookupTemplate>,
    /// The tc programs of `-k` interfaces (ingress, egress), the same way.
    pub(crate) vm: Option<(SkLookupTemplate, SkLookupTemplate)>,
    /// Whether this kernel needs the `_stored` builds (decided at the
    /// first cgroup program loaded; see `netns_cookie_stored`).
    stored: Option<bool>,
    /// The sk_lookup template is the build that goes by addresses.
    sk_lookup_by_address: bool,
}

/// What `register_pod` did.
#[derive(Debug, serde::Serialize)]
pub struct PodInfo {
    pub netns: PathBuf,
    pub cookie: u64,
    pub inode: u64,
    pub addresses: Vec<std::net::IpAddr>,
    pub inbound_attached: bool,
    /// `-k` interfaces with the VM programs attached (`name (ifindex)`).
    pub vm_interfaces: Vec<String>,
    /// `-c`/`-k` names that match no interface of the pod (yet).
    pub unmatched_interfaces: Vec<String>,
    pub listener_seeded: Vec<String>,
    /// Is the pod's IPv6 captured, and why (istio-iptables' rule).
    pub ipv6: crate::ipv6::Ipv6Capture,
    /// Acceleration active for this pod.
    pub accel: bool,
    /// The decision in words: on or off, and why (the kernel probe, a
    /// flag, or an error).
    pub accel_decision: String,
    /// Other installs that have captured this netns too (only with
    /// `Register::force`).
    pub also_captured_by: Vec<String>,
}

/// How `register_pod_with` registers a pod.
#[derive(Clone, Copy, Debug, Default)]
pub struct Register<'a> {
    /// The cgroup the pod is attached under, recorded in the install.
    pub cgroup: Option<&'a Path>,
    /// Capture the pod even when another install has captured it.
    pub force: bool,
}

impl Installation {
    /// Preflight checks, bpffs, then load the object reusing (or creating)
    /// the pinned maps. Programs are loaded lazily, only when attached.
    pub fn open(pin_dir: &Path) -> Result<Installation> {
        Self::open_with(pin_dir, &MapSizes::default())
    }

    /// `open`, creating missing maps with `sizes` (`--map-size`). An
    /// existing install is first checked: its pinned maps must have this
    /// object's layout, and the sizes asked for (if any) must be theirs.
    pub fn open_with(pin_dir: &Path, sizes: &MapSizes) -> Result<Installation> {
        sys::check_privileges()?;
        sys::check_btf()?;
        sys::ensure_bpffs(pin_dir)?;
        let pins = Pins::new(pin_dir);
        sys::create_private_dir(&pins.maps_dir())?;
        crate::mapsize::check_install(OBJECT, &pins.maps_dir(), sizes)?;
        let mut loader = EbpfLoader::new();
        loader.default_map_pin_directory(pins.maps_dir());
        crate::kernlog::pin_ring(&mut loader, &pins);
        sizes.apply(&mut loader);
        // Trace events carry the calling task where the kernel lets cgroup
        // programs ask for it (the verifier drops the calls elsewhere).
        let task = crate::trace::task_helpers();
        loader.override_global("REDIRECT_TRACE_TASK", &task, true);
        let ebpf = loader.load(OBJECT).map_err(|e| {
            Error::bpf(
                format!(
                    "loading the kernel object with maps pinned in {}",
                    pins.maps_dir().display()
                ),
                e,
            )
        })?;
        // A trace reader killed before it could switch tracing off.
        crate::trace::clear_stale(&pins);
        Ok(Installation {
            pins,
            ebpf,
            sk_lookup: None,
            vm: None,
            stored: None,
            sk_lookup_by_address: false,
        })
    }

    pub fn maps(&self) -> Result<Maps> {
        Maps::open(&self.pins)
    }

    /// Attach the cgroup programs to `cgroup` unless this install already
    /// did. All or nothing: on failure the links made here are removed.
    /// Returns true when it attached.
    pub fn attach_cgroup(&mut self, cgroup: &Path) -> Result<bool> {
        let cg = sys::open_cgroup(cgroup)?;
        let id = cg
            .metadata()
            .map_err(|e| Error::io("reading", cgroup, e))?
            .ino();
        let dir = self.pins.cgroup_dir(id);
        let slots = cgroup_programs(self.netns_cookie_stored()?);
        if slots.iter().all(|p| dir.join(p).exists()) {
            return Ok(false);
        }
        sys::create_private_dir(&dir)?;
        let mut made: Vec<PathBuf> = Vec::new();
        let result = (|| -> Result<()> {
            // The socket-creation hook first: the others need what it
            // stores.
            let mut slots = slots;
            slots.sort_by_key(|s| *s != SOCK_CREATE_PROGRAM);
            for name in slots {
                let path = dir.join(name);
                if path.exists() {
                    continue;
                }
                let link = self.attach_one(name, &cg).map_err(|e| match e {
                    Error::Bpf { what, source } => Error::Bpf {
                        what: format!("{what} (cgroup {})", cgroup.display()),
                        source,
                    },
                    e => e,
                })?;
                crate::bpf::obj_pin(link.as_fd(), &path)
                    .map_err(|e| Error::io("pinning link", &path, e))?;
                made.push(path);
            }
            Ok(())
        })();
        if result.is_err() {
            for p in made {
                let _ = std::fs::remove_file(p);
            }
            let _ = std::fs::remove_dir(&dir);
        }
        result.map(|()| true)
    }

    /// Does this kernel need the `_stored` builds? Decided once, by the
    /// verifier: getsockopt's build that calls `bpf_get_netns_cookie` is
    /// loaded, and where it is refused the `_stored` one. The decision is
    /// recorded in the install (`kernel`).
    pub fn netns_cookie_stored(&mut self) -> Result<bool> {
        if let Some(s) = self.stored {
            return Ok(s);
        }
        let direct = if crate::kernel::fallbacks_forced() {
            Err(Error::Kernel(format!(
                "{} is set",
                crate::kernel::FORCE_FALLBACKS_ENV
            )))
        } else {
            self.load_cgroup_program("redirect_getsockopt")
        };
        let stored = match direct {
            Ok(()) => false,
            Err(e) => match self.load_cgroup_program("redirect_getsockopt_stored") {
                Ok(()) => {
                    tracing::info!(
                        "this kernel lacks {} (Linux {}+): {}. The verifier's answer: {e:#}",
                        crate::kernel::NETNS_COOKIE_IN_HOOKS.feature,
                        crate::kernel::NETNS_COOKIE_IN_HOOKS.since,
                        crate::kernel::NETNS_COOKIE_IN_HOOKS.instead
                    );
                    true
                }
                Err(e2) => {
                    return Err(match e {
                        Error::Bpf { what, source } => Error::Bpf {
                            what: format!(
                                "{what} (its build without bpf_get_netns_cookie failed too: {e2})"
                            ),
                            source,
                        },
                        e => e,
                    })
                }
            },
        };
        self.stored = Some(stored);
        if let Err(e) = crate::kernel::record(&self.pins, |b| b.netns_cookie_stored = Some(stored))
        {
            tracing::warn!("the kernel's builds are not recorded in the install: {e:#}");
        }
        Ok(stored)
    }

    fn program(&mut self, name: &str) -> Result<&mut Program> {
        self.ebpf.program_mut(name).ok_or_else(|| {
            Error::bpf(
                "kernel object",
                std::io::Error::other(format!(
                    "program {name} missing: rebuild with `cargo xtask build-ebpf`"
                )),
            )
        })
    }

    /// Upgrade in place (the agent does this at start): every cgroup link
    /// of this install whose program has other code than this binary's (an
    /// older or newer version) is switched to this binary's program,
    /// atomically (see `upgrade`). Returns `<cgroup-id>/<program>` of each
    /// link switched.
    pub fn update_cgroup_programs(&mut self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        let dirs = crate::pins::read_dir(&self.pins.cgroups_dir());
        if dirs.is_empty() {
            return Ok(out);
        }
        let slots = cgroup_programs(self.netns_cookie_stored()?);
        for dir in dirs {
            for &name in &slots {
                let link = dir.join(name);
                if !link.exists() {
                    continue;
                }
                let (fd, _) = self.loaded_cgroup_program(name)?;
                if crate::upgrade::replace_if_changed(&link, fd.as_fd()).map_err(|e| {
                    Error::io("switching to this version's program the link", &link, e)
                })? {
                    let cg = dir
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    out.push(format!("{cg}/{name}"));
                }
            }
        }
        Ok(out)
    }

    /// Upgrade in place: the cgroup links (`update_cgroup_programs`) and
    /// the acceleration verdict program attached to the sockhash. Returns
    /// what was switched (`<cgroup-id>/<program>`, `programs/<program>`).
    pub fn update_programs(&mut self) -> Result<Vec<String>> {
        let mut out = self.update_cgroup_programs()?;
        out.extend(self.update_sk_lookup_programs()?);
        out.extend(self.update_vm_programs()?);
        if self.update_sk_msg_program()? {
            out.push(format!("programs/{SK_MSG_PROGRAM}"));
        }
        Ok(out)
    }

    /// The per-pod sk_lookup links (`netns/<cookie>/sk_lookup`) whose
    /// program has other code than this binary's: each gets a new instance
    /// for its pod (the cookie is a constant of the instance), switched in
    /// atomically. One instance is loaded to learn this binary's tag; a
    /// pod whose program already has it costs nothing more.
    fn update_sk_lookup_programs(&mut self) -> Result<Vec<String>> {
        use crate::upgrade;
        let links: Vec<(u64, PathBuf)> = crate::pins::read_dir(&self.pins.netns_root())
            .into_iter()
            .filter_map(|d| {
                let cookie = d.file_name()?.to_str()?.parse().ok()?;
                let link = d.join("sk_lookup");
                link.exists().then_some((cookie, link))
            })
            .collect();
        let mut ours: Option<[u8; 8]> = None;
        let mut out = Vec::new();
        for (cookie, path) in links {
            let ioerr = |e| Error::io("switching to this version's program the link", &path, e);
            let link = upgrade::obj_get(&path).map_err(ioerr)?;
            let old = upgrade::prog_by_id(upgrade::link_prog_id(link.as_fd()).map_err(ioerr)?)
                .map_err(ioerr)?;
            let old_tag = upgrade::prog_tag(old.as_fd()).map_err(ioerr)?;
            if ours == Some(old_tag) {
                continue;
            }
            let new = self.sk_lookup_template()?.load(cookie).map_err(|e| {
                Error::bpf(format!("loading sk_lookup for netns cookie {cookie}"), e)
            })?;
            let new_tag = upgrade::prog_tag(new.as_fd()).map_err(ioerr)?;
            ours = Some(new_tag);
            if new_tag == old_tag {
                continue;
            }
            upgrade::link_update(link.as_fd(), new.as_fd(), Some(old.as_fd())).map_err(ioerr)?;
            out.push(format!("netns/{cookie}/sk_lookup"));
        }
        Ok(out)
    }

    /// The per-pod sk_lookup program, relocated once against this
    /// install's maps (again when they were made anew): the build that
    /// reads `ingress_ifindex` where the verifier takes it, else the one
    /// that goes by addresses (`kernel::SK_LOOKUP_INGRESS_IFINDEX`). A
    /// trial instance (cookie 0, no pod) is the probe.
    fn sk_lookup_template(&mut self) -> Result<&SkLookupTemplate> {
        if !self.sk_lookup.as_ref().is_some_and(|t| t.is_current()) {
            let maps_dir = self.pins.maps_dir();
            let make = |program| {
                SkLookupTemplate::new(OBJECT, &maps_dir, program, "REDIRECT_SK_LOOKUP_NETNS")
            };
            let full = make(SK_LOOKUP_PROGRAM)?;
            let trial = if crate::kernel::fallbacks_forced() {
                Err(std::io::Error::other(format!(
                    "{} is set",
                    crate::kernel::FORCE_FALLBACKS_ENV
                )))
            } else {
                full.load(0)
            };
            let (template, by_address) = match trial {
                Ok(_) => (full, false),
                Err(e) => {
                    let addr = make(SK_LOOKUP_ADDR_PROGRAM)?;
                    if let Err(e2) = addr.load(0) {
                        return Err(Error::bpf(
                            format!(
                                "loading {SK_LOOKUP_PROGRAM} (its build without ingress_ifindex, {SK_LOOKUP_ADDR_PROGRAM}, failed too: {e2})"
                            ),
                            e,
                        ));
                    }
                    let gap = &crate::kernel::SK_LOOKUP_INGRESS_IFINDEX;
                    tracing::info!(
                        "this kernel lacks {} (Linux {}+): {}. The verifier's answer: {e}",
                        gap.feature,
                        gap.since,
                        gap.instead
                    );
                    (addr, true)
                }
            };
            if let Err(e) =
                crate::kernel::record(&self.pins, |b| b.sk_lookup_by_address = Some(by_address))
            {
                tracing::warn!("the kernel's builds are not recorded in the install: {e:#}");
            }
            self.sk_lookup = Some(template);
            self.sk_lookup_by_address = by_address;
        }
        Ok(self.sk_lookup.as_ref().expect("set above"))
    }

    /// Does this kernel's sk_lookup lack `ingress_ifindex` (the build that
    /// goes by addresses is in use)? Settings that need the field are
    /// refused there (`kernel::refuse`).
    pub fn sk_lookup_by_address(&mut self) -> Result<bool> {
        self.sk_lookup_template()?;
        Ok(self.sk_lookup_by_address)
    }

    /// The sk_msg program pinned under `programs/` (attached to
    /// REDIRECT_SOCKS): when its code is not this binary's, attach this
    /// binary's instead (the sockhash holds one verdict program: attaching
    /// replaces it; sockets inserted from then on run the new one) and
    /// re-pin. True when switched.
    fn update_sk_msg_program(&mut self) -> Result<bool> {
        let pin = self.pins.sk_msg_program();
        if !pin.exists() {
            return Ok(false);
        }
        let old = crate::upgrade::obj_get(&pin)
            .map_err(|e| Error::io("opening pinned program", &pin, e))?;
        let new = self.sk_msg_program_fd()?;
        let tags = crate::upgrade::prog_tag(old.as_fd())
            .and_then(|o| Ok((o, crate::upgrade::prog_tag(new.as_fd())?)));
        let (old_tag, new_tag) =
            tags.map_err(|e| Error::io("reading the tag of pinned program", &pin, e))?;
        if old_tag == new_tag {
            return Ok(false);
        }
        let map_fd = self.socks_map_fd()?;
        crate::bpf::prog_attach(new.as_fd(), map_fd.as_fd(), crate::bpf::BPF_SK_MSG_VERDICT)
            .map_err(|e| {
                Error::bpf(
                    "attaching this version's sk_msg to the REDIRECT_SOCKS sockhash",
                    e,
                )
            })?;
        std::fs::remove_file(&pin)
            .map_err(|e| Error::io("removing the previous program's pin", &pin, e))?;
        crate::bpf::obj_pin(new.as_fd(), &pin)
            .map_err(|e| Error::io("pinning program", &pin, e))?;
        Ok(true)
    }

    /// The install's REDIRECT_SK_NETNS (socket storage of the netns
    /// cookie, see `kernel::NETNS_COOKIE_IN_HOOKS`).
    fn sk_netns_storage(&self) -> Result<SkNetnsStorage> {
        let path = self.pins.map(redirect_common::MAP_SK_NETNS);
        let data = aya::maps::MapData::from_pin(&path)
            .map_err(|e| Error::bpf(format!("opening {}", path.display()), e))?;
        SkNetnsStorage::try_from(aya::maps::Map::SkStorage(data))
            .map_err(|e| Error::bpf(format!("{} is not socket storage", path.display()), e))
    }

    /// The acceleration sockhash (REDIRECT_SOCKS) of this install.
    fn socks_map_fd(&self) -> Result<OwnedFd> {
        match self.ebpf.map(redirect_common::MAP_SOCKS) {
            Some(aya::maps::Map::SockHash(m)) => m
                .fd()
                .as_fd()
                .try_clone_to_owned()
                .map_err(|e| Error::bpf("sockhash fd", e)),
            _ => Err(Error::bpf(
                "kernel object",
                std::io::Error::other(
                    "REDIRECT_SOCKS sockhash missing: rebuild with `cargo xtask build-ebpf`",
                ),
            )),
        }
    }

    /// The sk_msg verdict program of this object, loaded on first use.
    fn sk_msg_program_fd(&mut self) -> Result<OwnedFd> {
        let name = program_for(SK_MSG_PROGRAM, self.netns_cookie_stored()?);
        let prog: &mut aya::programs::SkMsg = self
            .program(name)?
            .try_into()
            .map_err(|e| Error::bpf("sk_msg program", e))?;
        if prog.fd().is_err() {
            prog.load()
                .map_err(|e| Error::bpf("loading sk_msg program", e))?;
        }
        prog.fd()
            .map_err(|e| Error::bpf("sk_msg program fd", e))?
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| Error::bpf("sk_msg fd", e))
    }

    /// Load (once) and link the program of one cgroup slot; the link fd is
    /// returned for pinning.
    fn attach_one(&mut self, slot: &'static str, cg: &std::fs::File) -> Result<OwnedFd> {
        let (fd, attach_type) = self.loaded_cgroup_program(slot)?;
        crate::bpf::link_create(fd.as_fd(), cg.as_fd(), attach_type)
            .map_err(|e| Error::bpf(format!("attaching program {slot} (bpf_link_create)"), e))
    }

    /// The program of one cgroup slot (the build this kernel takes),
    /// loaded on first use: its fd and attach type.
    fn loaded_cgroup_program(&mut self, slot: &'static str) -> Result<(OwnedFd, u32)> {
        let stored = NETNS_HOOKS.contains(&slot) && self.netns_cookie_stored()?;
        let fd = self.cgroup_program_fd(program_for(slot, stored))?;
        let attach_type = match slot {
            "redirect_connect4" => BPF_CGROUP_INET4_CONNECT,
            "redirect_connect6" => BPF_CGROUP_INET6_CONNECT,
            "redirect_getpeername4" => BPF_CGROUP_INET4_GETPEERNAME,
            "redirect_getpeername6" => BPF_CGROUP_INET6_GETPEERNAME,
            "redirect_sendmsg4" => BPF_CGROUP_UDP4_SENDMSG,
            "redirect_sendmsg6" => BPF_CGROUP_UDP6_SENDMSG,
            "redirect_recvmsg4" => BPF_CGROUP_UDP4_RECVMSG,
            "redirect_recvmsg6" => BPF_CGROUP_UDP6_RECVMSG,
            "redirect_getsockopt" => BPF_CGROUP_GETSOCKOPT,
            "redirect_sockops" => BPF_CGROUP_SOCK_OPS,
            "redirect_sock_release" => BPF_CGROUP_INET_SOCK_RELEASE,
            SOCK_CREATE_PROGRAM => BPF_CGROUP_INET_SOCK_CREATE,
            _ => unreachable!("{slot} is not a cgroup program slot"),
        };
        Ok((fd, attach_type))
    }

    /// Load (once) the cgroup program `name` of the object.
    fn load_cgroup_program(&mut self, name: &str) -> Result<()> {
        self.cgroup_program_fd(name).map(drop)
    }

    /// The cgroup program `name` of the object, loaded on first use.
    fn cgroup_program_fd(&mut self, name: &str) -> Result<OwnedFd> {
        let verr = |what: &str, e: aya::programs::ProgramError| {
            Error::bpf(format!("{what} program {name}"), e)
        };
        macro_rules! loaded {
            ($p:expr) => {{
                if $p.fd().is_err() {
                    $p.load().map_err(|e| verr("loading", e))?;
                }
                $p.fd()
                    .map_err(|e| verr("fd of", e))?
                    .as_fd()
                    .try_clone_to_owned()
            }};
        }
        let fd = match self.program(name)? {
            Program::CgroupSockAddr(p) => loaded!(p),
            Program::CgroupSockopt(p) => loaded!(p),
            Program::SockOps(p) => loaded!(p),
            Program::CgroupSock(p) => loaded!(p),
            _ => unreachable!("{name} is a cgroup program"),
        };
        fd.map_err(|e| Error::bpf(format!("duplicating fd of {name}"), e))
    }

    /// Attach inbound steering (sk_lookup) to the pod's netns, once.
    pub fn attach_netns(&mut self, netns: &Netns, cookie: u64) -> Result<bool> {
        let path = self.pins.sk_lookup_link(cookie);
        if path.exists() {
            return Ok(false);
        }
        sys::create_private_dir(&self.pins.netns_dir(cookie))?;
        // sk_lookup cannot ask for its netns cookie: each pod gets its own
        // instance with the cookie set as a constant (maps stay shared),
        // loaded from instructions relocated once (see sklookup.rs).
        let template = self.sk_lookup_template()?;
        let verr = |what: &str, e| {
            Error::bpf(
                format!("{what} sk_lookup on netns {}", netns.path.display()),
                e,
            )
        };
        let prog = template.load(cookie).map_err(|e| verr("loading", e))?;
        let link = crate::bpf::link_create(
            prog.as_fd(),
            netns.file.as_fd(),
            crate::sklookup::BPF_SK_LOOKUP,
        )
        .map_err(|e| verr("attaching (bpf_link_create)", e))?;
        crate::bpf::obj_pin(link.as_fd(), &path)
            .map_err(|e| Error::io("pinning link", &path, e))?;
        Ok(true)
    }

    /// Attach the acceleration verdict program to the sockhash, once per
    /// install (the pinned program marks it done).
    pub fn ensure_accel(&mut self) -> Result<()> {
        let pin = self.pins.sk_msg_program();
        if pin.exists() {
            return Ok(());
        }
        let map_fd = self.socks_map_fd()?;
        let fd = self.sk_msg_program_fd()?;
        crate::bpf::prog_attach(fd.as_fd(), map_fd.as_fd(), crate::bpf::BPF_SK_MSG_VERDICT)
            .map_err(|e| Error::bpf("attaching sk_msg to the REDIRECT_SOCKS sockhash", e))?;
        sys::create_private_dir(&self.pins.programs_dir())?;
        crate::bpf::obj_pin(fd.as_fd(), &pin).map_err(|e| Error::io("pinning program", &pin, e))?;
        Ok(())
    }

    /// Make `netns` a captured pod: config into the maps, inbound steering
    /// attached, an already-listening proxy registered. Acceleration is on
    /// when asked for and the kernel supports it. Refused when another
    /// install has captured the netns (see `owner`); the pod's recorded
    /// cgroup (if any) is kept.
    pub fn register_pod(&mut self, netns: &Netns, spec: &PodSpec) -> Result<PodInfo> {
        self.register_pod_with(netns, spec, &Register::default())
    }

    /// `register_pod`, recording the pod's cgroup and, with `force`,
    /// capturing a pod another install has captured too.
    pub fn register_pod_with(
        &mut self,
        netns: &Netns,
        spec: &PodSpec,
        opts: &Register<'_>,
    ) -> Result<PodInfo> {
        // Settings the kernel side cannot honour yet are refused, never
        // silently dropped (the flag table's `NotYet` rows).
        spec.check_supported()?;
        // Never the host: Istio captures pods, not the node.
        if netns.is_host() {
            return Err(Error::HostNetns(netns.path.clone()));
        }
        // What this kernel cannot do is refused, naming the feature.
        if !spec.exclude_interfaces.is_empty() && self.sk_lookup_by_address()? {
            return Err(crate::kernel::refuse(
                &crate::kernel::SK_LOOKUP_INGRESS_IFINDEX,
                "-c/--istio-exclude-interfaces",
            ));
        }
        let t0 = std::time::Instant::now();
        let mut spec = spec.clone();
        let (accel, accel_decision) = self.decide_accel(spec.accel_mode);
        spec.accel = accel;
        let t_accel = t0.elapsed();
        // Kernel features -c and -k need, asked before anything changes.
        crate::ifaces::check_kernel(netns, &spec)?;
        // One visit inside the netns, no subprocess: cookie, addresses,
        // whether IPv6 is captured (istio-iptables' rule over them),
        // interfaces and routes, ::6 on lo when IPv6 is captured (the
        // proxy's IPv6 inbound passthrough source, as istio-iptables adds
        // it).
        let crate::podns::PodNs {
            cookie,
            addresses,
            ipv6,
            net,
        } = crate::podns::visit(netns, spec.dual_stack)?;
        spec.ipv6_off = !ipv6.captured;
        let spec = &spec;
        let others = crate::owner::refuse_if_owned(netns, cookie, &self.pins, opts.force)?;
        let t_netns = t0.elapsed();
        let mut maps = self.maps()?;
        let cfg = spec.pod_config(netns.inode as u32);
        // The interface and route entries, then the config (the commit
        // point); a failure puts back what the pod had.
        let entries = crate::ifaces::entries(&net, spec);
        let old_net = crate::maps::NetEntries {
            ifaces: maps.iface_entries(cookie),
            routes: maps.route_entries(cookie),
        };
        maps.put_net(cookie, &entries)?;
        if let Err(e) = maps.put_pod(
            cookie,
            &cfg,
            &spec.port_entries(),
            &spec.cidr_entries(&addresses),
        ) {
            let _ = maps.put_net(cookie, &old_net);
            return Err(e);
        }
        let t_maps = t0.elapsed();
        let attached = self.attach_netns(netns, cookie).and_then(|inbound| {
            let (vm, _) = self.attach_vm_links(netns, cookie, &entries.ifaces)?;
            Ok((inbound, vm))
        });
        let (inbound_attached, vm_interfaces) = match attached {
            Ok(a) => a,
            Err(e) => {
                maps.remove_pod(cookie);
                let _ = release_links(&self.pins, cookie);
                return Err(e);
            }
        };
        // A proxy already listening never goes through sockops' listen
        // hook: find it (a /proc walk) only when a listener exists.
        let t_sk_lookup = t0.elapsed();
        let listening = crate::podns::listening(netns, spec.inbound_port)?;
        let stored = self.netns_cookie_stored()?;
        let seeded = if listening || stored {
            let mut storage = if stored {
                Some(self.sk_netns_storage()?)
            } else {
                None
            };
            let port = listening.then_some(spec.inbound_port);
            seed_sockets(&mut maps, netns, cookie, port, storage.as_mut())?
        } else {
            Seeded::default()
        };
        if seeded.stored > 0 {
            tracing::debug!(
                cookie,
                sockets = seeded.stored,
                "netns cookie stored on the pod's existing TCP sockets"
            );
        }
        let listener_seeded = seeded.listeners;
        if listening && listener_seeded.is_empty() {
            tracing::warn!(
                cookie,
                port = spec.inbound_port,
                "the pod's proxy already listens on the inbound port but its socket could not be taken from its process \
                 (reading /proc/<pid>/fd and pidfd_getfd need CAP_SYS_PTRACE and the host's PIDs); \
                 inbound connections find no listener until the proxy listens again"
            );
        }
        if let Some(cg) = opts.cgroup {
            if let Err(e) = crate::cgroups::record(&self.pins, cookie, cg) {
                tracing::warn!(
                    "pod captured, but its cgroup {} was not recorded ({e:#}): a later attach, validate or detach without --cgroup will not know it",
                    cg.display()
                );
            }
        }
        // Where the time of a capture goes (ms, per phase), for the churn
        // benchmark and for anyone chasing a slow attach.
        let ms = |a: std::time::Duration, b: std::time::Duration| {
            (b.saturating_sub(a)).as_secs_f64() * 1000.0
        };
        let t_end = t0.elapsed();
        tracing::debug!(
            cookie,
            accel_ms = ms(Default::default(), t_accel),
            netns_ms = ms(t_accel, t_netns),
            maps_ms = ms(t_netns, t_maps),
            sk_lookup_ms = ms(t_maps, t_sk_lookup),
            listener_ms = ms(t_sk_lookup, t_end),
            "pod registered"
        );
        Ok(PodInfo {
            netns: netns.path.clone(),
            cookie,
            inode: netns.inode,
            addresses,
            inbound_attached,
            vm_interfaces,
            unmatched_interfaces: crate::ifaces::unmatched(&net, spec),
            listener_seeded,
            ipv6,
            accel: spec.accel,
            accel_decision,
            also_captured_by: others.iter().map(ToString::to_string).collect(),
        })
    }

    /// The install's acceleration probe result, running the probe now if
    /// no conclusive result is cached (the agent does this at start, so no
    /// pod's ADD waits for it).
    pub fn probe_accel(&mut self) -> std::result::Result<probe::ProbeResult, String> {
        let pins = Pins::new(self.pins.root.clone());
        probe::result(&pins, self)
    }

    /// Acceleration for a pod: off when asked, on when forced, else on
    /// exactly where the kernel probe (cached in the install) passed.
    /// Never silent: the decision comes back in words, and is logged when
    /// acceleration is off for any reason but `--no-accel`.
    fn decide_accel(&mut self, mode: AccelMode) -> (bool, String) {
        let pins = Pins::new(self.pins.root.clone());
        let probed = match mode {
            AccelMode::Off => return (false, probe::describe(mode, false, None)),
            AccelMode::Forced => Ok(probe::cached(&pins)),
            AccelMode::Auto => probe::result(&pins, self).map(Some),
        };
        let decision = match probed {
            Ok(p) if mode == AccelMode::Forced || p.as_ref().is_some_and(|p| p.passed) => {
                match self.ensure_accel() {
                    Ok(()) => (true, probe::describe(mode, true, p.as_ref())),
                    Err(e) => (
                        false,
                        format!("off: the sk_msg program could not be attached: {e:#}"),
                    ),
                }
            }
            Ok(p) => (false, probe::describe(mode, false, p.as_ref())),
            Err(e) => (
                false,
                format!("off: the kernel probe did not complete ({e}); --accel forces it on"),
            ),
        };
        if !decision.0 {
            // Logged for the agent; `attach` prints the decision itself.
            tracing::info!("acceleration {}", decision.1);
        }
        decision
    }
}

/// The probe runs against this install: its namespace becomes a pod with
/// acceleration forced, in its own cgroup, for the time of the checks.
impl probe::ProbeHost for Installation {
    fn capture(&mut self, netns: &Path, cgroup: &Path) -> Result<u64> {
        let ns = Netns::open(netns)?;
        self.attach_cgroup(cgroup)?;
        let mut spec = PodSpec::istio_default();
        spec.accel_mode = AccelMode::Forced;
        // Every check's connection must be accelerated, however short.
        spec.accel_short_conns = true;
        let opts = Register {
            cgroup: Some(cgroup),
            force: false,
        };
        match self.register_pod_with(&ns, &spec, &opts) {
            Ok(info) if info.accel => Ok(info.cookie),
            Ok(info) => {
                self.release(info.cookie, cgroup);
                Err(Error::Kernel(format!(
                    "acceleration for the probe: {}",
                    info.accel_decision
                )))
            }
            Err(e) => {
                let _ = detach_cgroup(&self.pins, cgroup);
                Err(e)
            }
        }
    }

    fn accel_counts(&self, cookie: u64) -> (u64, u64) {
        let c = self.maps().map(|m| m.counters()).unwrap_or_default();
        let get = |r: redirect_common::Reason| {
            c.get(&cookie)
                .and_then(|m| m.get(&r))
                .map(|v| v.count)
                .unwrap_or(0)
        };
        (
            get(redirect_common::Reason::AccelInserted),
            get(redirect_common::Reason::AccelRedirected),
        )
    }

    fn release(&mut self, cookie: u64, cgroup: &Path) {
        if let Err(e) = release_pod(&self.pins, cookie) {
            tracing::warn!("releasing the acceleration probe's namespace: {e:#}");
        }
        self.forget_cgroup(cgroup);
    }

    fn forget_cgroup(&mut self, cgroup: &Path) {
        if let Err(e) = detach_cgroup(&self.pins, cgroup) {
            tracing::warn!("detaching from the acceleration probe's cgroup: {e:#}");
        }
    }

    fn owns_cgroup(&self, cgroup: &Path) -> bool {
        std::fs::metadata(cgroup)
            .map(|m| self.pins.cgroup_dir(m.ino()).exists())
            .unwrap_or(false)
    }
}

/// Release a pod: config and tables removed, inbound link unpinned.
pub fn release_pod(pins: &Pins, cookie: u64) -> Result<()> {
    let mut maps = Maps::open(pins)?;
    if maps.pod(cookie).is_none() && !pins.netns_dir(cookie).exists() {
        return Err(Error::NotCaptured(format!("cookie {cookie}")));
    }
    maps.remove_pod(cookie);
    // Its `stats --zero` baselines go with its counters, its recorded
    // cgroup with it.
    if let Err(e) = crate::stats::baseline::forget_pod(pins, cookie) {
        tracing::warn!("released pod {cookie}: {e:#}");
    }
    if let Err(e) = crate::cgroups::forget(pins, cookie) {
        tracing::warn!("released pod {cookie}: {e:#}");
    }
    release_links(pins, cookie)
}

/// Unpin every link of a pod (sk_lookup, the tc links of its `-k`
/// interfaces) and remove its directory.
fn release_links(pins: &Pins, cookie: u64) -> Result<()> {
    for link in pins.netns_links(cookie) {
        unpin_link(&link)?;
    }
    let _ = std::fs::remove_dir(pins.netns_dir(cookie));
    Ok(())
}

/// Detach this install's programs from one cgroup: its link pins
/// (`cgroups/<id>/<program>`) are removed, nothing else. Returns the pins
/// removed.
pub fn detach_cgroup(pins: &Pins, cgroup: &Path) -> Result<Vec<PathBuf>> {
    let id = std::fs::metadata(cgroup)
        .map_err(|e| Error::io("reading", cgroup, e))?
        .ino();
    detach_cgroup_id(pins, id)
}

/// `detach_cgroup` by cgroup id (the inode of its directory).
pub fn detach_cgroup_id(pins: &Pins, id: u64) -> Result<Vec<PathBuf>> {
    let dir = pins.cgroup_dir(id);
    let mut removed = Vec::new();
    for name in crate::pins::cgroup_link_names() {
        let link = dir.join(name);
        if unpin_link(&link)? {
            removed.push(link);
        }
    }
    let _ = std::fs::remove_dir(dir);
    Ok(removed)
}

/// Remove the original-destination records (by socket cookie) of the
/// TCP sockets still open in `netns`, a released pod's: the programs
/// remove a record when its socket closes, but not once they are
/// detached from the socket's cgroup. Returns how many were removed.
pub fn forget_socket_records(pins: &Pins, netns: &Netns) -> Result<usize> {
    let mut maps = Maps::open(pins)?;
    let mut n = 0;
    for c in crate::podns::tcp_socket_cookies(netns)? {
        if maps.orig_by_cookie.remove(&c).is_ok() {
            n += 1;
        }
    }
    Ok(n)
}

/// Does a captured pod still need this install's programs on cgroup
/// `id`? True when one is recorded under it, and when any captured pod
/// has no recorded cgroup (captured by an older version: it may rely on
/// any attachment). False when nothing is attached there.
pub fn cgroup_in_use(pins: &Pins, id: u64) -> Result<bool> {
    if !pins.cgroup_dir(id).exists() {
        return Ok(false);
    }
    let recorded = crate::cgroups::all(pins)?;
    let pods = Maps::open(pins)?.pods();
    Ok(pods.iter().any(|(cookie, _)| match recorded.get(cookie) {
        Some(r) => r.id == id,
        None => true,
    }))
}

/// Remove a pinned link; the kernel detaches it once nothing holds it.
/// Ok(false) when there is no link pinned at `path`: whatever is there
/// instead was not made by an install and is left in place (and named).
pub fn unpin_link(path: &Path) -> Result<bool> {
    // Detached first: a pin removed alone releases its link only when the
    // kernel frees the pin's inode, after an RCU grace period, so the
    // programs would stay attached for a moment after detach or
    // uninstall returned (seconds on a slow machine).
    if crate::pins::pin_kind(path) == Some(PinKind::Link) {
        if let Ok(fd) = crate::upgrade::obj_get(path) {
            if let Err(e) = crate::upgrade::link_detach(fd.as_fd()) {
                tracing::debug!("detaching the link {}: {e}", path.display());
            }
        }
    }
    remove_pin(path, PinKind::Link)
}

/// Remove the pin at `path` if it is a BPF object of `kind` (unpinning a
/// link detaches it once nothing else holds it; a map or program is freed
/// when unused). Anything else there is left in place, with a warning.
fn remove_pin(path: &Path, kind: PinKind) -> Result<bool> {
    match crate::pins::pin_kind(path) {
        Some(k) if k == kind => {
            std::fs::remove_file(path).map_err(|e| Error::io("removing pin", path, e))?;
            Ok(true)
        }
        found => {
            if path.symlink_metadata().is_ok() {
                tracing::warn!(
                    "left {} in place: it is not a {kind:?} pin (found {}), so redirect did not make it",
                    path.display(),
                    found.map_or("no BPF object".into(), |k| format!("a {k:?} pin"))
                );
            }
            Ok(false)
        }
    }
}

/// What `uninstall` removed, and what it found and left in place.
#[derive(Debug, Default, serde::Serialize)]
pub struct Removed {
    pub links: usize,
    pub maps: usize,
    pub programs: usize,
    pub pods: usize,
    /// Every pin and directory removed, in order.
    pub removed: Vec<PathBuf>,
    /// What is still in the pin directory: not made by an install (a
    /// file, a symlink, a pin under a name the layout does not have...).
    pub left: Vec<PathBuf>,
}

/// Remove every link, map and program pin of the install at `pins`, then
/// its directories once empty (the pin directory too). Only the known
/// names of the layout holding a BPF object of the right kind are
/// removed; a pin directory that is not on bpffs is refused untouched.
pub fn uninstall(pins: &Pins) -> Result<Removed> {
    uninstall_opts(pins, true)
}

/// `uninstall`; `remove_root`: remove the pin directory itself once empty
/// (false when it existed before the caller's install, e.g. the undo of a
/// failed first `attach`).
pub fn uninstall_opts(pins: &Pins, remove_root: bool) -> Result<Removed> {
    let mut r = Removed::default();
    if pins.root.symlink_metadata().is_err() {
        return Ok(r);
    }
    sys::check_on_bpffs(&pins.root)?;
    if let Ok(maps) = Maps::open(pins) {
        r.pods = maps.pods().len();
    }
    for link in pins.all_links() {
        if unpin_link(&link)? {
            r.links += 1;
            r.removed.push(link);
        }
    }
    for name in crate::pins::known_maps() {
        let m = pins.map(name);
        if remove_pin(&m, PinKind::Map)? {
            r.maps += 1;
            r.removed.push(m);
        }
    }
    let prog = pins.sk_msg_program();
    if remove_pin(&prog, PinKind::Program)? {
        r.programs += 1;
        r.removed.push(prog);
    }
    r.removed
        .extend(crate::mapsize::remove_probes(&pins.root, true));
    let mut dirs: Vec<PathBuf> = Vec::new();
    for top in [pins.cgroups_dir(), pins.netns_root()] {
        dirs.extend(crate::pins::numbered(&top));
    }
    dirs.extend([
        pins.cgroups_dir(),
        pins.netns_root(),
        pins.maps_dir(),
        pins.programs_dir(),
    ]);
    if remove_root {
        dirs.push(pins.root.clone());
    }
    for d in dirs {
        let is_dir = d.symlink_metadata().is_ok_and(|m| m.is_dir());
        if is_dir && std::fs::remove_dir(&d).is_ok() {
            r.removed.push(d);
        }
    }
    r.left = leftovers(&pins.root);
    Ok(r)
}

/// Everything under `dir` (files, symlinks, and directories with nothing
/// under them), depth first.
fn leftovers(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for p in crate::pins::read_dir(dir) {
        let is_dir = p.symlink_metadata().is_ok_and(|m| m.is_dir());
        if is_dir {
            let inner = leftovers(&p);
            if inner.is_empty() {
                out.push(p);
            } else {
                out.extend(inner);
            }
        } else {
            out.push(p);
        }
    }
    out
}

/// What capturing a pod did to the sockets its processes already held.
#[derive(Default)]
struct Seeded {
    /// The proxy's listeners registered for inbound steering.
    listeners: Vec<String>,
    /// TCP sockets that got their netns cookie stored.
    stored: usize,
}

/// Sockets a pod made before it was captured never go through the hooks
/// that see new sockets: a proxy already listening on the inbound port
/// (`listener_port`) is registered for inbound steering, and where the
/// netns cookie comes from socket storage (`netns_storage`), every TCP
/// socket of the netns gets its entry, as the sock_create hook gives new
/// ones (the connections a listener accepts inherit it). Found through
/// `/proc/<pid>/fd` and `pidfd_getfd`.
fn seed_sockets(
    maps: &mut Maps,
    netns: &Netns,
    cookie: u64,
    listener_port: Option<u16>,
    mut netns_storage: Option<&mut SkNetnsStorage>,
) -> Result<Seeded> {
    let mut seeded = Seeded::default();
    for pid in sys::pids_in_netns(netns.inode) {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if pidfd < 0 {
            continue;
        }
        let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
        for fd in fds.flatten() {
            let is_socket = std::fs::read_link(fd.path())
                .map(|t| t.to_string_lossy().starts_with("socket:"))
                .unwrap_or(false);
            let Some(num) = fd.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
                continue;
            };
            if !is_socket {
                continue;
            }
            let dup = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), num, 0) };
            if dup < 0 {
                continue;
            }
            let sock = unsafe { OwnedFd::from_raw_fd(dup as i32) };
            if let Some(st) = netns_storage.as_deref_mut() {
                if is_tcp(&sock) && socket_netns_inode(&sock) == Some(netns.inode) {
                    st.insert(&sock, redirect_common::SkNetns { netns: cookie }, 0)
                        .map_err(|e| {
                            Error::bpf(
                                format!("storing the netns cookie on socket {num} of pid {pid}"),
                                e,
                            )
                        })?;
                    seeded.stored += 1;
                }
            }
            let Some(port) = listener_port else {
                continue;
            };
            let Some(family) = tcp_listener_on(&sock, port) else {
                continue;
            };
            let key = ListenerKey {
                netns: cookie,
                family,
                _pad: 0,
            };
            maps.listeners.insert(key, sock.as_fd(), 0).map_err(|e| {
                Error::bpf(
                    format!("registering the listener of pid {pid} on port {port}"),
                    e,
                )
            })?;
            let name = if family == libc::AF_INET as u32 {
                "ipv4"
            } else {
                "ipv6"
            };
            if !seeded.listeners.iter().any(|s: &String| s.ends_with(name)) {
                seeded.listeners.push(format!("pid {pid} {name}"));
            }
        }
    }
    Ok(seeded)
}

/// A TCP socket (of either family)?
fn is_tcp(fd: &OwnedFd) -> bool {
    let mut v: i32 = 0;
    let mut len = 4 as libc::socklen_t;
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PROTOCOL,
            (&mut v as *mut i32).cast(),
            &mut len,
        )
    };
    r == 0 && v == libc::IPPROTO_TCP
}

/// The inode of the netns a socket belongs to (`SIOCGSKNS`).
fn socket_netns_inode(fd: &OwnedFd) -> Option<u64> {
    const SIOCGSKNS: libc::Ioctl = 0x894C;
    let ns = unsafe { libc::ioctl(fd.as_raw_fd(), SIOCGSKNS) };
    if ns < 0 {
        return None;
    }
    let ns = unsafe { std::fs::File::from_raw_fd(ns) };
    ns.metadata().ok().map(|m| m.ino())
}

/// Some(family) when `fd` is a listening TCP socket bound to `port`.
fn tcp_listener_on(fd: &OwnedFd, port: u16) -> Option<u32> {
    let get = |level, opt| -> Option<i32> {
        let mut v: i32 = 0;
        let mut len = 4 as libc::socklen_t;
        let r = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                level,
                opt,
                (&mut v as *mut i32).cast(),
                &mut len,
            )
        };
        (r == 0).then_some(v)
    };
    if get(libc::SOL_SOCKET, libc::SO_ACCEPTCONN)? != 1
        || get(libc::SOL_SOCKET, libc::SO_PROTOCOL)? != libc::IPPROTO_TCP
    {
        return None;
    }
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    if unsafe {
        libc::getsockname(
            fd.as_raw_fd(),
            (&mut ss as *mut libc::sockaddr_storage).cast(),
            &mut len,
        )
    } != 0
    {
        return None;
    }
    let (family, p) = match ss.ss_family as i32 {
        libc::AF_INET => {
            let s = unsafe { &*(&ss as *const _ as *const libc::sockaddr_in) };
            (libc::AF_INET, u16::from_be(s.sin_port))
        }
        libc::AF_INET6 => {
            let s = unsafe { &*(&ss as *const _ as *const libc::sockaddr_in6) };
            (libc::AF_INET6, u16::from_be(s.sin6_port))
        }
        _ => return None,
    };
    (p == port).then_some(family as u32)
}
