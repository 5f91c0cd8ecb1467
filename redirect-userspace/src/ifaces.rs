//! `-c` and `-k`: the interface and route entries a pod gets from its
//! network namespace, the tc programs on its `-k` interfaces (tcx links,
//! pinned as `netns/<cookie>/vm_ingress_<ifindex>` and
//! `vm_egress_<ifindex>`; bpffs refuses dots in names), and bringing both up to date when interfaces
//! come and go (the agent's interface watch, `agent::ifwatch`).
//!
//! Names are resolved when the pod is captured. A name that matches no
//! interface yet is kept (a name record) and resolved when the interface
//! appears: istio-iptables' `-i <name>` rules match whatever interface has
//! the name when a packet passes, and KubeVirt creates a VM's interfaces
//! after the pod's network is set up.

use std::{
    os::fd::{AsFd, OwnedFd},
    path::PathBuf,
};

use redirect_common::{iface_flags, IfaceEntry, IFACE_NAME};

use crate::{
    attach::{unpin_link, Installation, OBJECT, VM_EGRESS_PROGRAM, VM_INGRESS_PROGRAM},
    bpf,
    config::{PodSpec, TABLE},
    error::{Error, Result},
    maps::NetEntries,
    pins::{self, Pins},
    podnet::{self, PodNet},
    sklookup::SkLookupTemplate,
    sys::{self, Netns},
};

/// The global the tc programs read their pod's netns cookie from.
const TC_NETNS_GLOBAL: &str = "REDIRECT_TC_NETNS";

fn flag_name(f: crate::config::Flag) -> String {
    TABLE
        .iter()
        .find(|d| d.flag == f)
        .map(|d| d.name())
        .unwrap_or_default()
}

/// The kernel features `-c` and `-k` need, asked before anything changes
/// (`features`): `ingress_ifindex` in sk_lookup for both, tcx links for
/// `-k` (probed inside the pod's netns).
pub fn check_kernel(netns: &Netns, spec: &PodSpec) -> Result<()> {
    use crate::config::Flag;
    if !spec.exclude_interfaces.is_empty() {
        crate::features::require_sk_lookup_ifindex(&flag_name(Flag::ExcludeInterfaces))?;
    }
    if !spec.kube_virt_interfaces.is_empty() {
        let k = flag_name(Flag::KubeVirtInterfaces);
        crate::features::require_sk_lookup_ifindex(&k)?;
        crate::podns::on_this_thread(netns, || Ok(crate::features::require_tcx(&k)))??;
    }
    Ok(())
}

/// A pod's interface and route entries for `spec`, from what its netns
/// holds now.
pub fn entries(net: &PodNet, spec: &PodSpec) -> NetEntries {
    NetEntries {
        ifaces: net.iface_entries(&spec.exclude_interfaces, &spec.kube_virt_interfaces),
        routes: net.route_entries(&spec.exclude_interfaces),
    }
}

/// The `-c`/`-k` names that match no interface of the pod now.
pub fn unmatched(net: &PodNet, spec: &PodSpec) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for n in spec
        .exclude_interfaces
        .iter()
        .chain(&spec.kube_virt_interfaces)
    {
        let found = net.links.iter().any(|l| podnet::name_matches(n, &l.name));
        if !found && !out.contains(n) {
            out.push(n.clone());
        }
    }
    out
}

/// Pin of a `-k` interface's tc link.
fn vm_link(pins: &Pins, cookie: u64, ingress: bool, ifindex: u32) -> PathBuf {
    pins.vm_link(cookie, ingress, ifindex)
}

/// Is the tcx link pinned at `path` still attached to `ifindex`? (The
/// kernel detaches it when the interface goes away.)
fn link_alive(path: &std::path::Path, ifindex: u32) -> bool {
    crate::upgrade::obj_get(path)
        .and_then(|l| crate::upgrade::tcx_link_ifindex(l.as_fd()))
        .map(|i| i == ifindex)
        .unwrap_or(false)
}

impl Installation {
    /// The tc programs' templates, made (again) when missing or stale.
    fn vm_templates(&mut self) -> Result<&(SkLookupTemplate, SkLookupTemplate)> {
        let stale = self
            .vm
            .as_ref()
            .is_none_or(|(i, e)| !i.is_current() || !e.is_current());
        if stale {
            let maps = self.pins.maps_dir();
            let make = |p| SkLookupTemplate::new(OBJECT, &maps, p, TC_NETNS_GLOBAL);
            self.vm = Some((make(VM_INGRESS_PROGRAM)?, make(VM_EGRESS_PROGRAM)?));
        }
        Ok(self.vm.as_ref().expect("set above"))
    }

    /// Loaded instances of the tc programs for the pod with this cookie.
    fn vm_instances(&mut self, cookie: u64) -> Result<(OwnedFd, OwnedFd)> {
        let (i, e) = self.vm_templates()?;
        let load = |t: &SkLookupTemplate, name: &str| {
            t.load(cookie)
                .map_err(|err| Error::bpf(format!("loading {name} for netns cookie {cookie}"), err))
        };
        Ok((load(i, VM_INGRESS_PROGRAM)?, load(e, VM_EGRESS_PROGRAM)?))
    }

    /// The tc programs on every present `-k` interface of the pod, once
    /// each (a link whose interface went away is replaced), and none left
    /// on interfaces that are no longer `-k` ones. Returns the interfaces
    /// (`name (ifindex N)`) and whether a link was made or removed.
    pub(crate) fn attach_vm_links(
        &mut self,
        netns: &Netns,
        cookie: u64,
        ifaces: &[(u32, IfaceEntry)],
    ) -> Result<(Vec<String>, bool)> {
        let want: Vec<(u32, String)> = ifaces
            .iter()
            .filter(|(i, e)| i & IFACE_NAME == 0 && e.has(iface_flags::VIRT))
            .map(|(i, e)| (*i, podnet::entry_name(e)))
            .collect();
        let mut changed = false;
        for p in pins::read_dir(&self.pins.netns_dir(cookie)) {
            let Some((_, ifindex)) = p
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(pins::parse_vm_link)
            else {
                continue;
            };
            if !want.iter().any(|(i, _)| *i == ifindex) || !link_alive(&p, ifindex) {
                unpin_link(&p)?;
                changed = true;
            }
        }
        let missing: Vec<(u32, bool)> = want
            .iter()
            .flat_map(|(i, _)| [(*i, true), (*i, false)])
            .filter(|(i, ingress)| !vm_link(&self.pins, cookie, *ingress, *i).exists())
            .collect();
        let names = want
            .iter()
            .map(|(i, n)| format!("{n} (ifindex {i})"))
            .collect();
        if missing.is_empty() {
            return Ok((names, changed));
        }
        sys::create_private_dir(&self.pins.netns_dir(cookie))?;
        let (ingress, egress) = self.vm_instances(cookie)?;
        let pins = self.pins.clone();
        // tcx links name the interface by index in the calling thread's
        // netns: made inside the pod's (and pinned from ours: bpffs
        // refuses a pin made from another netns).
        let links = crate::podns::on_this_thread(netns, || {
            let mut links = Vec::new();
            for (ifindex, is_ingress) in &missing {
                let (prog, at) = if *is_ingress {
                    (&ingress, bpf::BPF_TCX_INGRESS)
                } else {
                    (&egress, bpf::BPF_TCX_EGRESS)
                };
                let link = bpf::link_create_ifindex(prog.as_fd(), *ifindex, at).map_err(|e| {
                    std::io::Error::new(
                        e.kind(),
                        format!("attaching the VM program to interface {ifindex} (tcx): {e}"),
                    )
                })?;
                links.push((vm_link(&pins, cookie, *is_ingress, *ifindex), link));
            }
            Ok(links)
        })?;
        for (path, link) in links {
            bpf::obj_pin(link.as_fd(), &path).map_err(|e| Error::io("pinning link", &path, e))?;
        }
        Ok((names, true))
    }

    /// Bring a captured pod's interface and route entries, and the tc
    /// programs of its `-k` interfaces, up to date with its netns (an
    /// interface appeared, went away, or got an address). A pod without
    /// `-c`/`-k` names is left alone. Some(what changed) when something
    /// did.
    pub fn refresh_interfaces(&mut self, netns: &Netns, cookie: u64) -> Result<Option<String>> {
        let mut maps = self.maps()?;
        if maps.pod(cookie).is_none() {
            return Ok(None);
        }
        let old = NetEntries {
            ifaces: maps.iface_entries(cookie),
            routes: maps.route_entries(cookie),
        };
        let (exclude, virt) = podnet::names(&old.ifaces);
        if exclude.is_empty() && virt.is_empty() {
            return Ok(None);
        }
        let mut spec = PodSpec::blank();
        spec.exclude_interfaces = exclude;
        spec.kube_virt_interfaces = virt;
        let net = crate::podns::net(netns)?;
        let new = entries(&net, &spec);
        let same = same(&new, &old);
        if !same {
            maps.put_net(cookie, &new)?;
        }
        drop(maps);
        let (vm, links_changed) = self.attach_vm_links(netns, cookie, &new.ifaces)?;
        if same && !links_changed {
            return Ok(None);
        }
        let resolved: Vec<String> = new
            .ifaces
            .iter()
            .filter(|(i, _)| i & IFACE_NAME == 0)
            .map(|(i, e)| format!("{} (ifindex {i})", podnet::entry_name(e)))
            .collect();
        Ok(Some(format!(
            "interfaces: {}; VM programs on: {}; not present: {}",
            list(&resolved),
            list(&vm),
            list(&unmatched(&net, &spec))
        )))
    }

    /// Upgrade in place: each `-k` interface's tc link whose program has
    /// other code than this binary's gets a new instance for its pod,
    /// switched in atomically (as the sk_lookup links).
    pub(crate) fn update_vm_programs(&mut self) -> Result<Vec<String>> {
        use crate::upgrade;
        let mut links: Vec<(u64, bool, PathBuf)> = Vec::new();
        for d in pins::read_dir(&self.pins.netns_root()) {
            let Some(cookie) = d
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.parse().ok())
            else {
                continue;
            };
            for p in pins::read_dir(&d) {
                if let Some((ingress, _)) = p
                    .file_name()
                    .and_then(|n| n.to_str())
                    .and_then(pins::parse_vm_link)
                {
                    links.push((cookie, ingress, p));
                }
            }
        }
        let mut out = Vec::new();
        for (cookie, ingress, path) in links {
            let ioerr = |e| Error::io("switching to this version's program the link", &path, e);
            let link = upgrade::obj_get(&path).map_err(ioerr)?;
            let old = upgrade::prog_by_id(upgrade::link_prog_id(link.as_fd()).map_err(ioerr)?)
                .map_err(ioerr)?;
            let (i, e) = self.vm_instances(cookie)?;
            let new = if ingress { i } else { e };
            if upgrade::prog_tag(old.as_fd()).map_err(ioerr)?
                == upgrade::prog_tag(new.as_fd()).map_err(ioerr)?
            {
                continue;
            }
            upgrade::link_update(link.as_fd(), new.as_fd(), Some(old.as_fd())).map_err(ioerr)?;
            out.push(
                path.strip_prefix(&self.pins.root)
                    .unwrap_or(&path)
                    .display()
                    .to_string(),
            );
        }
        Ok(out)
    }
}

/// The same entries, whatever their order.
fn same(a: &NetEntries, b: &NetEntries) -> bool {
    let norm = |n: &NetEntries| {
        let mut i = n.ifaces.clone();
        i.sort_by_key(|(k, _)| *k);
        let mut r = n.routes.clone();
        r.sort_by_key(|(c, _)| c.to_string());
        (i, r)
    };
    norm(a) == norm(b)
}

/// A pod's interfaces for `redirect status`: each resolved one with its
/// index and role (and for `-k`, where a VM's connections go and whether
/// its programs are attached), then the names no interface has.
pub fn describe(pins: &Pins, cookie: u64, entries: &[(u32, IfaceEntry)]) -> Vec<String> {
    let mut out = Vec::new();
    for (i, e) in entries.iter().filter(|(i, _)| i & IFACE_NAME == 0) {
        let mut roles = Vec::new();
        if e.has(iface_flags::EXCLUDE) {
            roles.push("-c: not captured".to_string());
        }
        if e.has(iface_flags::VIRT) {
            let mut to = Vec::new();
            if e.has(iface_flags::HAS_ADDR4) {
                let a = std::net::Ipv4Addr::new(e.addr4[0], e.addr4[1], e.addr4[2], e.addr4[3]);
                to.push(a.to_string());
            }
            if e.has(iface_flags::HAS_ADDR6) {
                to.push(std::net::Ipv6Addr::from(e.addr6).to_string());
            }
            let attached = vm_link(pins, cookie, true, *i).exists()
                && vm_link(pins, cookie, false, *i).exists();
            roles.push(format!(
                "-k: a VM's connections go to {} on the outbound port, programs {}",
                if to.is_empty() {
                    "nowhere (the interface has no address: dropped)".to_string()
                } else {
                    to.join(" / ")
                },
                if attached { "attached" } else { "NOT attached" }
            ));
        }
        out.push(format!(
            "{} (ifindex {i}) {}",
            podnet::entry_name(e),
            roles.join(", ")
        ));
    }
    let present: Vec<String> = entries
        .iter()
        .filter(|(i, _)| i & IFACE_NAME == 0)
        .map(|(_, e)| podnet::entry_name(e))
        .collect();
    for (_, e) in entries.iter().filter(|(i, _)| i & IFACE_NAME != 0) {
        let name = podnet::entry_name(e);
        if !present.iter().any(|p| podnet::name_matches(&name, p)) {
            out.push(format!("{name}: no such interface in the pod (yet)"));
        }
    }
    out
}

fn list(v: &[String]) -> String {
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_link_pins_parse_back() {
        let pins = Pins::new("/x");
        for (ingress, ifindex) in [(true, 7), (false, 42)] {
            let p = vm_link(&pins, 9, ingress, ifindex);
            let name = p.file_name().unwrap().to_str().unwrap();
            assert_eq!(pins::parse_vm_link(name), Some((ingress, ifindex)));
        }
        assert_eq!(pins::parse_vm_link("sk_lookup"), None);
        assert_eq!(pins::parse_vm_link("vm_ingress_x"), None);
    }
}
