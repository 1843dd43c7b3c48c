//! Files attached to a message, saved in the workspace directory before the agent's turn
//! and named in the message the agent gets.
//!
//! The runtime never sees Slack or its token: it asks the control plane for each file on
//! its own files subject ([`FileQuery`]), slice by slice, for the routing decision it is
//! working on; the control plane answers only for files of messages routed to this
//! workspace. Each file is checked against its SHA-256 and saved under
//! [`DIR`]`/{message id}/{name}` with the symlink-safe writer of [`crate::files`]. The
//! message tells the agent where each file is, or why it is not there.

use std::path::Path;
use std::time::Duration;

use base64::Engine;
use sha2::{Digest, Sha256};
use warren_schema::nats::{FileAnswer, FileQuery, InboxMessage, Namespace};

use crate::control_plane::ask;

/// Where attached files are saved, relative to the workspace directory.
pub const DIR: &str = ".warren-files";

/// How long a turn waits for the gateway to finish downloading a file.
const PENDING_PATIENCE: Duration = Duration::from_secs(120);

/// Why files could not be fetched now: the turn fails and the message comes back.
#[derive(Debug, thiserror::Error)]
#[error("the attached file {file} could not be fetched: {reason}")]
pub struct AttachmentError {
    pub file: String,
    pub reason: String,
}

/// What became of one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Saved {
    /// Saved at `path` (relative to the workspace directory).
    File {
        path: String,
        mimetype: Option<String>,
        size: u64,
    },
    /// Not saved, and why (for the agent to read).
    Missing { name: String, reason: String },
}

/// Asks the control plane for files, as one workspace.
#[derive(Debug, Clone)]
pub struct Attachments {
    client: async_nats::Client,
    subject: String,
}

impl Attachments {
    pub fn new(client: async_nats::Client, ns: &Namespace, workspace: &str) -> Self {
        Self {
            client,
            subject: ns.files_subject(workspace),
        }
    }

    /// Saves each file of `inbox` below `workspace_dir`. A file that is refused, or still
    /// not downloaded after [`PENDING_PATIENCE`], is [`Saved::Missing`]; a control plane
    /// that cannot answer now is an error.
    #[tracing::instrument(name = "attachments", skip_all, fields(files = inbox.files.len()))]
    pub async fn save(
        &self,
        inbox: &InboxMessage,
        workspace_dir: &Path,
    ) -> Result<Vec<Saved>, AttachmentError> {
        let mut saved = Vec::new();
        let mut names = std::collections::HashSet::new();
        for file in &inbox.files {
            let fail = |reason: String| AttachmentError {
                file: file.id.clone(),
                reason,
            };
            let shown = file.name.clone().unwrap_or_else(|| file.id.clone());
            let fetched = match self.fetch(inbox, &file.id).await.map_err(fail)? {
                Ok(f) => f,
                Err(reason) => {
                    saved.push(Saved::Missing {
                        name: shown,
                        reason,
                    });
                    continue;
                }
            };
            // Two files of one name: the second is told apart by its id.
            let name = if names.insert(fetched.name.clone()) {
                fetched.name.clone()
            } else {
                format!("{}-{}", file.id, fetched.name)
            };
            let path = format!("{DIR}/{}/{name}", inbox.message_id);
            match crate::files::write_bytes(workspace_dir, &path, &fetched.bytes) {
                Ok(_) => saved.push(Saved::File {
                    path,
                    mimetype: fetched.mimetype,
                    size: fetched.bytes.len() as u64,
                }),
                Err(e) => saved.push(Saved::Missing {
                    name: shown,
                    reason: format!("it could not be saved: {e}"),
                }),
            }
        }
        Ok(saved)
    }

    /// One file, whole and checked; `Ok(Err(reason))` when it will not come.
    async fn fetch(
        &self,
        inbox: &InboxMessage,
        file_id: &str,
    ) -> Result<Result<Fetched, String>, String> {
        let deadline = tokio::time::Instant::now() + PENDING_PATIENCE;
        let mut pause = Duration::from_millis(100);
        let mut bytes = Vec::new();
        loop {
            let query = FileQuery {
                routing_id: inbox.routing_id,
                file_id: file_id.to_owned(),
                offset: bytes.len() as u64,
            };
            let body = serde_json::to_vec(&query).map_err(|e| e.to_string())?;
            let answer = ask(&self.client, &self.subject, body)
                .await
                .map_err(|e| format!("the control plane did not answer: {e}"))?;
            let answer: FileAnswer = serde_json::from_slice(&answer.payload)
                .map_err(|e| format!("the control plane's answer is not readable: {e}"))?;
            match answer {
                FileAnswer::Slice {
                    name,
                    mimetype,
                    size,
                    sha256,
                    offset,
                    data,
                } => {
                    if offset != bytes.len() as u64 {
                        return Err(format!("asked for byte {}, got {offset}", bytes.len()));
                    }
                    let data = base64::engine::general_purpose::STANDARD
                        .decode(data)
                        .map_err(|e| format!("a slice is not base64: {e}"))?;
                    if data.is_empty() && (bytes.len() as u64) < size {
                        return Err("an empty slice before the end".into());
                    }
                    bytes.extend_from_slice(&data);
                    if bytes.len() as u64 >= size {
                        if hex::encode(Sha256::digest(&bytes)) != sha256 {
                            return Err("its bytes do not match their SHA-256".into());
                        }
                        return Ok(Ok(Fetched {
                            name,
                            mimetype,
                            bytes,
                        }));
                    }
                }
                FileAnswer::Pending if tokio::time::Instant::now() + pause < deadline => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
                FileAnswer::Pending => {
                    return Ok(Err(format!(
                        "it was still being downloaded after {} s",
                        PENDING_PATIENCE.as_secs()
                    )));
                }
                FileAnswer::Refused { reason } => return Ok(Err(reason)),
                FileAnswer::Failed { reason } => return Err(reason),
            }
        }
    }
}

struct Fetched {
    name: String,
    mimetype: Option<String>,
    bytes: Vec<u8>,
}

/// `text` with a note naming the saved files and those that are missing. Pure.
pub fn annotate(text: &str, saved: &[Saved]) -> String {
    if saved.is_empty() {
        return text.to_owned();
    }
    let mut out = format!("{text}\n\nFiles attached to this message:");
    for s in saved {
        match s {
            Saved::File {
                path,
                mimetype,
                size,
            } => {
                let kind = mimetype.as_deref().unwrap_or("unknown type");
                out.push_str(&format!(
                    "\n- {path} ({kind}, {size} bytes; in the workspace directory)"
                ));
            }
            Saved::Missing { name, reason } => {
                out.push_str(&format!("\n- {name}: not available ({reason})"));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_message_names_each_file_or_why_it_is_missing() {
        let saved = [
            Saved::File {
                path: ".warren-files/m1/report.csv".into(),
                mimetype: Some("text/csv".into()),
                size: 12,
            },
            Saved::Missing {
                name: "dump.bin".into(),
                reason: "larger than the gateway's limit of 10 bytes".into(),
            },
        ];
        assert_eq!(
            annotate("look at these", &saved),
            "look at these\n\nFiles attached to this message:\n\
             - .warren-files/m1/report.csv (text/csv, 12 bytes; in the workspace directory)\n\
             - dump.bin: not available (larger than the gateway's limit of 10 bytes)"
        );
        assert_eq!(annotate("no files", &[]), "no files");
    }
}
