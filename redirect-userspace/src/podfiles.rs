//! The pod's own files istio-init reads from inside the pod: its
//! `/etc/resolv.conf` (the nameservers `--redirect-dns` captures) and its
//! `/etc/group` (owner groups given by name, which iptables resolves in
//! the pod). `redirect` usually runs outside the pod, so it finds them
//! where it can, in this order:
//!
//! - nameservers: `--dns-servers`; else `--dns-resolv-conf <path>`; else
//!   the pod root's `etc/resolv.conf`; else, for a netns of `ip netns`
//!   (`/run/netns/<name>`), `/etc/netns/<name>/resolv.conf` (what `ip
//!   netns exec` shows its processes) when it exists; else unknown: DNS
//!   to any address is captured, and the output says so. The host's own
//!   `/etc/resolv.conf` is never taken for the pod's.
//! - the pod root: `--pod-root <dir>`; else `/` when this process runs in
//!   the pod (no `--netns`, as istio-init); else `/proc/<pid>/root` for
//!   `--netns /proc/<pid>/ns/net`; else unknown, and owner group names
//!   are refused (numeric gids always work).

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use crate::{
    config::{Flag, FlagDef, PodSpec, RunOptions},
    error::Error,
};

/// Where the pod's files are, as far as this run can tell.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodFiles {
    /// The pod's root directory, and how it was found.
    pub root: Option<(PathBuf, &'static str)>,
    /// The pod's resolv.conf, how it was found, and whether a missing file
    /// is an error (given explicitly, or the pod's own).
    pub resolv_conf: Option<(PathBuf, &'static str)>,
}

impl PodFiles {
    /// For a run on the netns at `netns` (`inside`: this process's own,
    /// no `--netns`).
    pub fn locate(netns: &Path, inside: bool, opts: &RunOptions) -> PodFiles {
        let root = if let Some(r) = &opts.pod_root {
            Some((r.clone(), "--pod-root"))
        } else if inside {
            Some((PathBuf::from("/"), "this process runs in the pod"))
        } else {
            proc_root(netns).map(|r| (r, "the root of the process whose netns --netns names"))
        };
        let resolv_conf = if let Some(p) = &opts.dns_resolv_conf {
            Some((p.clone(), "--dns-resolv-conf"))
        } else if let Some((r, how)) = &root {
            Some((r.join("etc/resolv.conf"), *how))
        } else {
            ip_netns_name(netns)
                .map(|n| Path::new("/etc/netns").join(n).join("resolv.conf"))
                .filter(|p| p.exists())
                .map(|p| (p, "the netns's own resolv.conf (ip netns)"))
        };
        PodFiles { root, resolv_conf }
    }

    /// Fill what the flags left to the pod's files: the nameservers of
    /// `--redirect-dns` (when `--dns-servers` did not give them) and the
    /// gids of owner groups given by name. Returns notes for the output
    /// (where the nameservers came from).
    pub fn complete(&self, spec: &mut PodSpec) -> Result<Vec<String>, Error> {
        let mut notes = Vec::new();
        if spec.redirect_dns && !spec.capture_all_dns && spec.dns_servers.is_none() {
            if let Some((path, how)) = &self.resolv_conf {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    Error::io(
                        "reading the pod's resolv.conf (for the nameservers of --redirect-dns; --dns-servers gives them instead)",
                        path,
                        e,
                    )
                })?;
                let (servers, skipped) = nameservers(&text);
                for s in skipped {
                    notes.push(format!(
                        "{}: nameserver '{s}' is not an IP address: left out",
                        path.display()
                    ));
                }
                notes.push(format!(
                    "DNS nameservers from {} ({how}): {}",
                    path.display(),
                    if servers.is_empty() {
                        "none".to_string()
                    } else {
                        servers
                            .iter()
                            .map(IpAddr::to_string)
                            .collect::<Vec<_>>()
                            .join(", ")
                    }
                ));
                spec.dns_servers = Some(servers);
            }
        }
        if !spec.outbound_owner_groups.names().is_empty() {
            if let Some((root, _)) = &self.root {
                let group = root.join("etc/group");
                let text = std::fs::read_to_string(&group).unwrap_or_default();
                let flag = match spec.outbound_owner_groups {
                    crate::config::OwnerGroups::AllExcept(_) => Flag::OwnerGroupsExclude,
                    _ => Flag::OwnerGroups,
                };
                let value = spec.outbound_owner_groups.listed().join(",");
                spec.outbound_owner_groups
                    .resolve(&|name| gid_in(&text, name))
                    .map_err(|why| Error::InvalidFlag {
                        field: FlagDef::get(flag).name(),
                        value,
                        reason: format!("{why} ({})", group.display()),
                    })?;
            }
        }
        Ok(notes)
    }
}

/// `/proc/<pid>/root` for `/proc/<pid>/ns/net` (or a task's).
fn proc_root(netns: &Path) -> Option<PathBuf> {
    let s = netns.to_str()?;
    let rest = s.strip_prefix("/proc/")?;
    let (pid, tail) = rest.split_once('/')?;
    pid.parse::<u32>().ok()?;
    let ok = tail == "ns/net"
        || tail
            .strip_prefix("task/")
            .and_then(|t| t.split_once('/'))
            .is_some_and(|(tid, t)| tid.parse::<u32>().is_ok() && t == "ns/net");
    ok.then(|| PathBuf::from(format!("/proc/{pid}/root")))
}

/// The name of an `ip netns` namespace (`/run/netns/<name>`,
/// `/var/run/netns/<name>`).
fn ip_netns_name(netns: &Path) -> Option<&str> {
    let parent = netns.parent()?;
    if parent != Path::new("/run/netns") && parent != Path::new("/var/run/netns") {
        return None;
    }
    let name = netns.file_name()?.to_str()?;
    (!name.is_empty() && name != "." && name != "..").then_some(name)
}

/// The `nameserver` lines of a resolv.conf, in order, as the resolver
/// reads them (a zone suffix `%eth0` dropped); what is not an address is
/// returned apart.
pub fn nameservers(text: &str) -> (Vec<IpAddr>, Vec<String>) {
    let mut out = Vec::new();
    let mut bad = Vec::new();
    for line in text.lines() {
        let line = line.split(['#', ';']).next().unwrap_or("");
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        let Some(a) = words.next() else { continue };
        let addr = a.split('%').next().unwrap_or(a);
        match addr.parse::<IpAddr>() {
            Ok(ip) if !out.contains(&ip) => out.push(ip),
            Ok(_) => {}
            Err(_) => bad.push(a.to_string()),
        }
    }
    out.sort();
    (out, bad)
}

/// A group's gid in an /etc/group text.
pub fn gid_in(group: &str, name: &str) -> Option<u32> {
    group.lines().find_map(|l| {
        let mut f = l.split(':');
        (f.next()? == name).then_some(())?;
        f.next()?;
        f.next()?.trim().parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{CaptureFlags, OwnerGroups};

    #[test]
    fn resolv_conf_nameservers() {
        let (v, bad) = nameservers(
            "# kubelet\nsearch ns.svc.cluster.local\nnameserver 10.96.0.10\nnameserver fd00::10%eth0 # x\nnameserver  10.96.0.10\nnameserver bogus\noptions ndots:5\n",
        );
        assert_eq!(
            v,
            vec![
                "10.96.0.10".parse::<IpAddr>().unwrap(),
                "fd00::10".parse().unwrap()
            ]
        );
        assert_eq!(bad, vec!["bogus".to_string()]);
        assert!(nameservers("search x\n").0.is_empty());
    }

    #[test]
    fn where_the_pods_files_are() {
        let o = RunOptions::default();
        let f = PodFiles::locate(Path::new("/proc/42/ns/net"), false, &o);
        assert_eq!(f.root.unwrap().0, PathBuf::from("/proc/42/root"));
        assert_eq!(
            f.resolv_conf.unwrap().0,
            PathBuf::from("/proc/42/root/etc/resolv.conf")
        );
        let f = PodFiles::locate(Path::new("/proc/42/task/43/ns/net"), false, &o);
        assert_eq!(f.root.unwrap().0, PathBuf::from("/proc/42/root"));
        // Inside the pod: its own /.
        let f = PodFiles::locate(Path::new("/proc/7/ns/net"), true, &o);
        assert_eq!(f.root.unwrap().0, PathBuf::from("/"));
        // An ip-netns name without /etc/netns/<name>/resolv.conf: unknown;
        // the host's resolv.conf is not the pod's.
        let f = PodFiles::locate(Path::new("/run/netns/no-such-rdt-ns"), false, &o);
        assert_eq!(f, PodFiles::default());
        assert_eq!(ip_netns_name(Path::new("/var/run/netns/a")), Some("a"));
        assert_eq!(ip_netns_name(Path::new("/tmp/a")), None);
        // Flags win.
        let o = RunOptions {
            dns_resolv_conf: Some("/x/resolv.conf".into()),
            pod_root: Some("/r".into()),
            ..RunOptions::default()
        };
        let f = PodFiles::locate(Path::new("/proc/42/ns/net"), false, &o);
        assert_eq!(f.root.unwrap().0, PathBuf::from("/r"));
        assert_eq!(f.resolv_conf.unwrap().0, PathBuf::from("/x/resolv.conf"));
    }

    #[test]
    fn complete_fills_nameservers_and_gids() {
        let dir = std::env::temp_dir().join(crate::placement::unique("rdt-podfiles-"));
        std::fs::create_dir_all(dir.join("etc")).unwrap();
        std::fs::write(dir.join("etc/resolv.conf"), "nameserver 10.96.0.10\n").unwrap();
        std::fs::write(dir.join("etc/group"), "root:x:0:\njava:x:1001:app\n").unwrap();
        let mut c = CaptureFlags::istio_injected();
        c.set(Flag::RedirectDns, "true");
        c.set(Flag::OwnerGroups, "java,202");
        let mut spec = c.to_spec().unwrap();
        assert!(spec.check_supported().is_err(), "names unresolved");
        let o = RunOptions {
            pod_root: Some(dir.clone()),
            ..RunOptions::default()
        };
        let f = PodFiles::locate(Path::new("/run/netns/x"), false, &o);
        let notes = f.complete(&mut spec).unwrap();
        assert!(notes[0].contains("10.96.0.10"), "{notes:?}");
        assert_eq!(spec.dns_servers, Some(vec!["10.96.0.10".parse().unwrap()]));
        assert_eq!(
            spec.outbound_owner_groups,
            OwnerGroups::Only(vec!["202".into(), "1001".into()])
        );
        spec.check_supported().unwrap();
        // An unknown name names itself and the file.
        let mut c2 = c.clone();
        c2.set(Flag::OwnerGroups, "nosuch");
        let mut spec = c2.to_spec().unwrap();
        let e = f.complete(&mut spec).unwrap_err().to_string();
        assert!(
            e.contains("ISTIO_OUTBOUND_OWNER_GROUPS") && e.contains("'nosuch'"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
