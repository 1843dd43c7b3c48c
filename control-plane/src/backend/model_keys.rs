//! Model keys: the operator keeps them in a directory, a file per key named like the key
//! (`OPENAI_API_KEY`, mode 0600); an agent is given those its `settings.allowed_keys`
//! names, and no other. Every backend reads them here; each hands them over its own way
//! (files in the workspace's credentials directory, a Secret).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// A key name: `A-Z`, `0-9` and `_`, as environment variables are named.
pub fn is_key_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
}

/// The keys `agent` is allowed, read from `dir`: (name, value). A key that is not a key
/// name, a key the directory lacks, or a key file others may read is refused with the
/// reason (never the value).
pub fn allowed(
    dir: Option<&Path>,
    agent: &str,
    settings: &serde_json::Value,
) -> std::io::Result<Vec<(String, String)>> {
    let mut keys = Vec::new();
    for name in warren_schema::launch::AgentLaunch::allowed_keys(settings) {
        if !is_key_name(&name) {
            return Err(std::io::Error::other(format!(
                "agent {agent}: allowed key {name:?} is not a key name (A-Z, 0-9, _)"
            )));
        }
        let Some(dir) = dir else {
            return Err(std::io::Error::other(format!(
                "agent {agent} is allowed {name}, but no model key directory is configured \
                 (--model-keys-dir)"
            )));
        };
        let source = dir.join(&name);
        let meta = std::fs::metadata(&source).map_err(|e| {
            std::io::Error::other(format!(
                "agent {agent}: key {name} ({}): {e}",
                source.display()
            ))
        })?;
        // Others may not read it, nor its group write it. Group read is allowed: a
        // Kubernetes Secret volume shows its files as 0440 to the pod's fsGroup whatever
        // its defaultMode says.
        if meta.permissions().mode() & 0o027 != 0 {
            return Err(std::io::Error::other(format!(
                "key file {} may be read by others (mode {:o}); chmod 600 it",
                source.display(),
                meta.permissions().mode() & 0o777
            )));
        }
        let value = std::fs::read_to_string(&source)?;
        keys.push((name, value.trim().to_owned()));
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_file_others_may_read_or_its_group_write_is_refused() {
        let dir = std::env::temp_dir().join(format!("warren-model-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("OPENAI_API_KEY");
        std::fs::write(&file, "sk-test\n").expect("write");
        let settings = serde_json::json!({"allowed_keys": ["OPENAI_API_KEY"]});
        for (mode, ok) in [
            (0o600, true),
            (0o400, true),
            (0o440, true),
            (0o640, true),
            (0o644, false),
            (0o660, false),
            (0o604, false),
        ] {
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).expect("chmod");
            let got = allowed(Some(&dir), "alice", &settings);
            assert_eq!(got.is_ok(), ok, "mode {mode:o}: {got:?}");
            if let Ok(keys) = got {
                assert_eq!(keys, [("OPENAI_API_KEY".to_owned(), "sk-test".to_owned())]);
            } else if let Err(e) = got {
                assert!(!e.to_string().contains("sk-test"), "never the value: {e}");
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
