//! A CLI agent's sessions by conversation (`settings.resume`): the session id its CLI
//! reported for a conversation's last turn, kept in the workspace directory
//! (`.warren-sessions/{agent}/{conversation}`), so the next message of that conversation
//! resumes the session, in this runtime or the next one after an idle stop.
//!
//! Ids are used as arguments and file names: only `A-Z a-z 0-9 . _ -`, not starting with
//! `-` or `.`, at most 128 bytes ([`is_token`]); anything else is not stored or used.

use std::path::{Path, PathBuf};

/// Whether `s` may name a conversation or a session here. Pure.
pub fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && !s.starts_with(['-', '.'])
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

fn file(workspace_dir: &Path, agent: &str, conversation: &str) -> Option<PathBuf> {
    (is_token(agent) && is_token(conversation)).then(|| {
        workspace_dir
            .join(".warren-sessions")
            .join(agent)
            .join(conversation)
    })
}

/// The session to resume for `conversation`, if one was stored.
pub fn load(workspace_dir: &Path, agent: &str, conversation: &str) -> Option<String> {
    let path = file(workspace_dir, agent, conversation)?;
    let id = std::fs::read_to_string(path).ok()?;
    let id = id.trim();
    is_token(id).then(|| id.to_owned())
}

/// Remembers `session` for `conversation` (a failure only costs the next turn its context).
pub fn store(workspace_dir: &Path, agent: &str, conversation: &str, session: &str) {
    let Some(path) = file(workspace_dir, agent, conversation) else {
        return;
    };
    if !is_token(session) {
        return;
    }
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    if let Err(e) = std::fs::write(&path, session) {
        tracing::warn!(error = %e, "could not remember the CLI session");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_ids_are_kept_and_used() {
        assert!(is_token("01a24136-e3a8-7902-90c0-d176836597cd"));
        for bad in ["", "-rf", ".hidden", "a/b", "../x", "a b", &"x".repeat(129)] {
            assert!(!is_token(bad), "{bad:?}");
        }
        let dir = std::env::temp_dir().join(format!("warren-sessions-{}", std::process::id()));
        store(&dir, "alice", "conv-1", "sess-1");
        assert_eq!(load(&dir, "alice", "conv-1").as_deref(), Some("sess-1"));
        assert_eq!(load(&dir, "bob", "conv-1"), None, "another agent's");
        store(&dir, "alice", "conv-2", "--upload-everything");
        assert_eq!(load(&dir, "alice", "conv-2"), None, "not an id");
        store(&dir, "alice", "../escape", "sess");
        assert!(!dir.join(".warren-sessions/escape").exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
