//! Adding the redirect-cni entry to a network's conflist and removing it
//! again, and installing the plugin binary.
//!
//! The edit is exact: the file is parsed to find the `plugins` array and
//! the span of each entry in the original text, and only the redirect-cni
//! entry is inserted, replaced or cut out; every other byte stays as it
//! was, so add-then-remove gives back the original file. The result is
//! parsed again before it is written (atomically, with the file's mode).

use std::{
    collections::BTreeMap,
    io::Write,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use serde_json::{value::RawValue, Value};

use super::PLUGIN_TYPE;

#[derive(Debug, thiserror::Error)]
pub enum ConflistError {
    #[error("{path}: {what}")]
    Invalid { path: String, what: String },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
}

fn invalid(path: &Path, what: impl Into<String>) -> ConflistError {
    ConflistError::Invalid {
        path: path.display().to_string(),
        what: what.into(),
    }
}

fn io(what: &'static str, path: &Path, source: std::io::Error) -> ConflistError {
    ConflistError::Io {
        what,
        path: path.display().to_string(),
        source,
    }
}

/// The entry the agent writes: `{"type":"redirect-cni","socket":...}`,
/// plus `"captureAll":true` when asked.
pub fn entry(socket: &Path, capture_all: bool) -> String {
    entry_with(socket, capture_all, false)
}

/// The entry, with `"kubernetes": true` when the agent decides from the
/// Kubernetes API.
pub fn entry_with(socket: &Path, capture_all: bool, kubernetes: bool) -> String {
    let mut s = format!(
        "{{\"type\":\"{PLUGIN_TYPE}\",\"socket\":{}",
        Value::String(socket.display().to_string())
    );
    if capture_all {
        s.push_str(",\"captureAll\":true");
    }
    if kubernetes {
        s.push_str(",\"kubernetes\":true");
    }
    s.push('}');
    s
}

/// Byte span of each plugin entry in `text`, with its parsed value, and
/// the span of the `plugins` array itself.
struct Layout {
    array: (usize, usize),
    items: Vec<((usize, usize), Value)>,
}

fn span(text: &str, part: &str) -> (usize, usize) {
    let start = part.as_ptr() as usize - text.as_ptr() as usize;
    (start, start + part.len())
}

fn layout(text: &str) -> Result<Layout, String> {
    let top: BTreeMap<String, &RawValue> =
        serde_json::from_str(text).map_err(|e| format!("not a JSON object: {e}"))?;
    if !top.contains_key("cniVersion") {
        return Err("no \"cniVersion\": not a CNI conflist".into());
    }
    let plugins = top
        .get("plugins")
        .ok_or("no \"plugins\" array: not a conflist (a single-plugin .conf cannot be chained)")?;
    let items: Vec<&RawValue> = serde_json::from_str(plugins.get())
        .map_err(|e| format!("\"plugins\" is not an array: {e}"))?;
    let mut out = Vec::new();
    for it in items {
        let v: Value = serde_json::from_str(it.get()).map_err(|e| e.to_string())?;
        if !v.is_object() {
            return Err("a \"plugins\" entry is not an object".into());
        }
        out.push((span(text, it.get()), v));
    }
    Ok(Layout {
        array: span(text, plugins.get()),
        items: out,
    })
}

/// `text` with the redirect-cni entry added (or, if present with other
/// values, updated in place keeping its other fields). None: nothing to
/// change.
pub fn with_entry(text: &str, socket: &Path, capture_all: bool) -> Result<Option<String>, String> {
    with_entry_k8s(text, socket, capture_all, false)
}

/// [`with_entry`], and `"kubernetes"` set to `kubernetes` (the key is
/// removed when false, so an agent started without the API never gets
/// API-mode requests from an old entry).
pub fn with_entry_k8s(
    text: &str,
    socket: &Path,
    capture_all: bool,
    kubernetes: bool,
) -> Result<Option<String>, String> {
    let l = layout(text)?;
    let ours: Vec<_> = l
        .items
        .iter()
        .filter(|(_, v)| v["type"] == PLUGIN_TYPE)
        .collect();
    if ours.len() > 1 {
        return Err(format!("{} entries of type {PLUGIN_TYPE}", ours.len()));
    }
    let new = if let Some(((a, b), v)) = ours.first() {
        let mut v = v.clone();
        let want_socket = Value::String(socket.display().to_string());
        let mut changed = v["socket"] != want_socket;
        v["socket"] = want_socket;
        if capture_all && v["captureAll"] != Value::Bool(true) {
            v["captureAll"] = Value::Bool(true);
            changed = true;
        }
        if kubernetes && v["kubernetes"] != Value::Bool(true) {
            v["kubernetes"] = Value::Bool(true);
            changed = true;
        }
        if !kubernetes && v.get("kubernetes").is_some() {
            if let Some(o) = v.as_object_mut() {
                o.remove("kubernetes");
            }
            changed = true;
        }
        if !changed {
            return Ok(None);
        }
        format!(
            "{}{}{}",
            &text[..*a],
            serde_json::to_string(&v).expect("serializable"),
            &text[*b..]
        )
    } else if let Some(((_, last_end), _)) = l.items.last() {
        // After the last entry, on its own line with the last entry's
        // indentation.
        let (last_start, _) = l.items.last().unwrap().0;
        let line_start = text[..last_start]
            .rfind('\n')
            .map(|i| i + 1)
            .unwrap_or(last_start);
        let indent = &text[line_start..last_start];
        let sep = if indent.chars().all(char::is_whitespace) && line_start != last_start {
            format!(",\n{indent}")
        } else {
            ", ".into()
        };
        format!(
            "{}{sep}{}{}",
            &text[..*last_end],
            entry_with(socket, capture_all, kubernetes),
            &text[*last_end..]
        )
    } else {
        // Empty array: right after '['.
        let at = l.array.0 + 1;
        format!(
            "{}{}{}",
            &text[..at],
            entry_with(socket, capture_all, kubernetes),
            &text[at..]
        )
    };
    layout(&new).map_err(|e| format!("edit produced an invalid conflist (bug): {e}"))?;
    Ok(Some(new))
}

/// `text` without the redirect-cni entry; None when there is none.
pub fn without_entry(text: &str) -> Result<Option<String>, String> {
    let l = layout(text)?;
    let Some(i) = l.items.iter().position(|(_, v)| v["type"] == PLUGIN_TYPE) else {
        return Ok(None);
    };
    let (a, b) = l.items[i].0;
    let new = if i > 0 {
        // From the end of the previous entry: takes the separator too.
        let prev_end = l.items[i - 1].0 .1;
        format!("{}{}", &text[..prev_end], &text[b..])
    } else if let Some(((next_start, _), _)) = l.items.get(1) {
        format!("{}{}", &text[..a], &text[*next_start..])
    } else {
        format!("{}{}", &text[..a], &text[b..])
    };
    layout(&new).map_err(|e| format!("edit produced an invalid conflist (bug): {e}"))?;
    Ok(Some(new))
}

/// `<conf_dir>/<conflist>`, or `conflist` itself when it is a path.
pub fn conflist_path(conf_dir: &Path, conflist: &Path) -> PathBuf {
    if conflist.is_absolute() || conflist.components().count() > 1 {
        conflist.to_path_buf()
    } else {
        conf_dir.join(conflist)
    }
}

/// Replace `path` atomically with `text`, keeping its mode.
fn write_atomic(path: &Path, text: &str) -> Result<(), ConflistError> {
    let mode = std::fs::metadata(path)
        .map(|m| m.permissions().mode() & 0o7777)
        .unwrap_or(0o644);
    let dir = path.parent().unwrap_or(Path::new("."));
    // A dot name without a .conf/.conflist/.json extension: runtimes
    // never load it as a network.
    let tmp = dir.join(format!(
        ".{}.redirect-tmp",
        path.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("conflist")
    ));
    let r = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = r {
        let _ = std::fs::remove_file(&tmp);
        return Err(io("writing", path, e));
    }
    Ok(())
}

/// Add (or update) the entry in the conflist file. True when changed.
pub fn install_entry(path: &Path, socket: &Path, capture_all: bool) -> Result<bool, ConflistError> {
    install_entry_k8s(path, socket, capture_all, false)
}

/// [`install_entry`] with the `"kubernetes"` key (see [`with_entry_k8s`]).
pub fn install_entry_k8s(
    path: &Path,
    socket: &Path,
    capture_all: bool,
    kubernetes: bool,
) -> Result<bool, ConflistError> {
    let text = std::fs::read_to_string(path).map_err(|e| io("reading conflist", path, e))?;
    match with_entry_k8s(&text, socket, capture_all, kubernetes).map_err(|e| invalid(path, e))? {
        Some(new) => write_atomic(path, &new).map(|()| true),
        None => Ok(false),
    }
}

/// Remove the entry from the conflist file. True when it was there. A
/// missing file has nothing to remove.
pub fn remove_entry(path: &Path) -> Result<bool, ConflistError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(io("reading conflist", path, e)),
    };
    match without_entry(&text).map_err(|e| invalid(path, e))? {
        Some(new) => write_atomic(path, &new).map(|()| true),
        None => Ok(false),
    }
}

/// Copy the plugin binary into the CNI bin dir as `redirect-cni` (0755,
/// atomically: a runtime running the old one is not disturbed).
pub fn install_binary(src: &Path, bin_dir: &Path) -> Result<PathBuf, ConflistError> {
    let dst = bin_dir.join(PLUGIN_TYPE);
    let tmp = bin_dir.join(format!(".{PLUGIN_TYPE}.redirect-tmp"));
    let r = (|| {
        std::fs::create_dir_all(bin_dir)?;
        std::fs::copy(src, &tmp)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))?;
        std::fs::rename(&tmp, &dst)
    })();
    if let Err(e) = r {
        let _ = std::fs::remove_file(&tmp);
        return Err(io("installing the plugin binary into", bin_dir, e));
    }
    Ok(dst)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PRETTY: &str = r#"{
  "cniVersion": "1.0.0",
  "name": "podnet",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "br0",
      "ipam": { "type": "host-local", "ranges": [[{ "subnet": "10.1.0.0/24" }]] }
    },
    { "type": "tuning",   "sysctl": {} }
  ]
}
"#;

    #[test]
    fn add_then_remove_is_exact() {
        let s = Path::new("/run/redirect/agent.sock");
        let added = with_entry(PRETTY, s, false).unwrap().unwrap();
        assert!(added.contains("    { \"type\": \"tuning\",   \"sysctl\": {} },\n    {\"type\":\"redirect-cni\",\"socket\":\"/run/redirect/agent.sock\"}\n  ]"), "{added}");
        let v: Value = serde_json::from_str(&added).unwrap();
        assert_eq!(v["plugins"].as_array().unwrap().len(), 3);
        assert_eq!(v["plugins"][2]["type"], PLUGIN_TYPE);
        // Idempotent, and exact on removal.
        assert_eq!(with_entry(&added, s, false).unwrap(), None);
        assert_eq!(without_entry(&added).unwrap().unwrap(), PRETTY);
        assert_eq!(without_entry(PRETTY).unwrap(), None);
    }

    #[test]
    fn compact_empty_and_first_position() {
        let s = Path::new("/s");
        let compact = r#"{"cniVersion":"0.4.0","name":"n","plugins":[{"type":"bridge"}]}"#;
        let a = with_entry(compact, s, true).unwrap().unwrap();
        assert_eq!(
            a,
            r#"{"cniVersion":"0.4.0","name":"n","plugins":[{"type":"bridge"}, {"type":"redirect-cni","socket":"/s","captureAll":true}]}"#
        );
        assert_eq!(without_entry(&a).unwrap().unwrap(), compact);
        let empty = r#"{"cniVersion":"1.0.0","name":"n","plugins":[]}"#;
        let a = with_entry(empty, s, false).unwrap().unwrap();
        assert_eq!(without_entry(&a).unwrap().unwrap(), empty);
        let first = r#"{"cniVersion":"1.0.0","plugins":[{"type":"redirect-cni","socket":"/s"}, {"type":"x"}]}"#;
        assert_eq!(
            without_entry(first).unwrap().unwrap(),
            r#"{"cniVersion":"1.0.0","plugins":[{"type":"x"}]}"#
        );
    }

    #[test]
    fn kubernetes_key_follows_the_agent() {
        let s = Path::new("/s");
        let compact = r#"{"cniVersion":"1.0.0","plugins":[{"type":"bridge"}]}"#;
        let a = with_entry_k8s(compact, s, false, true).unwrap().unwrap();
        assert_eq!(
            a,
            r#"{"cniVersion":"1.0.0","plugins":[{"type":"bridge"}, {"type":"redirect-cni","socket":"/s","kubernetes":true}]}"#
        );
        assert_eq!(
            with_entry_k8s(&a, s, false, true).unwrap(),
            None,
            "idempotent"
        );
        // An agent without the API takes the key out again.
        let b = with_entry_k8s(&a, s, false, false).unwrap().unwrap();
        let v: Value = serde_json::from_str(&b).unwrap();
        assert!(v["plugins"][1].get("kubernetes").is_none(), "{b}");
        assert_eq!(without_entry(&a).unwrap().unwrap(), compact);
    }

    #[test]
    fn update_keeps_user_fields() {
        let t = r#"{"cniVersion":"1.0.0","plugins":[{"type":"bridge"},{"type":"redirect-cni","socket":"/old","capture":{"d":"15021"}}]}"#;
        let a = with_entry(t, Path::new("/new"), false).unwrap().unwrap();
        let v: Value = serde_json::from_str(&a).unwrap();
        assert_eq!(v["plugins"][1]["socket"], "/new");
        assert_eq!(v["plugins"][1]["capture"]["d"], "15021");
        assert!(a.starts_with(r#"{"cniVersion":"1.0.0","plugins":[{"type":"bridge"},{"#));
    }

    #[test]
    fn refuses_non_conflists() {
        for bad in [
            "",
            "[]",
            r#"{"cniVersion":"1.0.0","type":"bridge"}"#,
            r#"{"plugins":[]}"#,
            r#"{"cniVersion":"1.0.0","plugins":{}}"#,
            r#"{"cniVersion":"1.0.0","plugins":[1]}"#,
        ] {
            assert!(with_entry(bad, Path::new("/s"), false).is_err(), "{bad}");
        }
    }

    #[test]
    fn conflist_paths() {
        assert_eq!(
            conflist_path(Path::new("/etc/cni/net.d"), Path::new("10-x.conflist")),
            PathBuf::from("/etc/cni/net.d/10-x.conflist")
        );
        assert_eq!(
            conflist_path(Path::new("/etc/cni/net.d"), Path::new("/tmp/x.conflist")),
            PathBuf::from("/tmp/x.conflist")
        );
    }
}
