//! Files attached to messages, served to the workspaces the messages were routed to.
//!
//! The gateway downloads a Slack message's files with the bot token and stores them beside
//! the log (`message_files`). A workspace asks for one on its own
//! [`Namespace::files_subject`] with a [`FileQuery`] naming the routing decision it works
//! on, and gets it slice by slice ([`FileQuery::SLICE`]). It gets a file only if that
//! decision routed the message to one of its agents and the message has that file
//! ([`allowed`]): what it says about itself is checked against the control plane's record.
//! Until the gateway has stored the file the answer is `pending`; a file the gateway
//! refused is `refused` with the gateway's reason.

use async_nats::Client;
use base64::Engine;
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info_span, warn};
use warren_schema::events::{DomainEvent, MessageFileRefused, message_file_event_id};
use warren_schema::nats::{FileAnswer, FileQuery, Namespace};
use warren_schema::{EventId, EventLog};

use super::nats;
use super::routed::{self, Routed};
use crate::error::{Error, Result};

/// Queue group of the control plane's replicas: one answer per query.
const QUEUE: &str = "control-plane";

/// Serves file queries until `shutdown`. NATS failures are returned (the caller retries);
/// a query that cannot be answered now is answered `failed`.
pub async fn run(
    client: Client,
    ns: Namespace,
    log: EventLog,
    shutdown: CancellationToken,
) -> Result<()> {
    let mut queries = client
        .queue_subscribe(ns.files_subjects(), QUEUE.into())
        .await
        .map_err(|e| nats("subscribing to file queries")(&e))?;
    loop {
        let query = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            query = queries.next() => query,
        };
        let Some(query) = query else {
            return Err(Error::Nats("the file subscription ended".into()));
        };
        let Some(reply) = query.reply.clone() else {
            continue;
        };
        let workspace = ns.files_workspace(&query.subject).unwrap_or_default();
        let span = info_span!("file_query", workspace, file = tracing::field::Empty);
        let answer = answer(&log, workspace, &query.payload)
            .instrument(span.clone())
            .await;
        if let FileAnswer::Refused { reason } | FileAnswer::Failed { reason } = &answer {
            warn!(parent: &span, reason, "file query not answered with the file");
        }
        let body = serde_json::to_vec(&answer).unwrap_or_default();
        client
            .publish(reply, body.into())
            .await
            .map_err(|e| nats("answering a file query")(&e))?;
    }
}

/// Whether `workspace` may read file `file_id` for the routing decision it named: the
/// decision exists, routed the message to one of its agents, and the message has the file.
/// The message's id when it may. Pure.
pub fn allowed(
    routed: Option<&Routed>,
    workspace: &str,
    file_id: &str,
) -> std::result::Result<EventId, String> {
    let Some(routed) = routed else {
        return Err("that is not a message Warren routed".into());
    };
    if routed.workspace != workspace {
        return Err(format!(
            "the message was routed to workspace {}, not {workspace}",
            routed.workspace
        ));
    }
    if !routed.files.iter().any(|f| f.id == file_id) {
        return Err(format!("the message has no file {file_id}"));
    }
    Ok(routed.message_id)
}

async fn answer(log: &EventLog, workspace: &str, payload: &[u8]) -> FileAnswer {
    let query: FileQuery = match serde_json::from_slice(payload) {
        Ok(q) => q,
        Err(e) => {
            return FileAnswer::Refused {
                reason: format!("not a file query: {e}"),
            };
        }
    };
    tracing::Span::current().record("file", query.file_id.as_str());
    let failed = |e: Error| {
        warn!(error = %e, "a file query could not be answered");
        FileAnswer::Failed {
            reason: "the control plane could not read the file now; try again".into(),
        }
    };
    let routed = match routed::load(log, query.routing_id).await {
        Ok(r) => r,
        Err(e) => return failed(e),
    };
    let message_id = match allowed(routed.as_ref(), workspace, &query.file_id) {
        Ok(id) => id,
        Err(reason) => return FileAnswer::Refused { reason },
    };
    match slice(log, message_id, &query).await {
        Ok(Some(answer)) => answer,
        Ok(None) => match refusal(log, message_id, &query.file_id).await {
            Ok(Some(reason)) => FileAnswer::Refused { reason },
            Ok(None) => FileAnswer::Pending,
            Err(e) => failed(e),
        },
        Err(e) => failed(e),
    }
}

/// A stored file's name, type, size, SHA-256, and the bytes of one slice.
type StoredSlice = (String, Option<String>, i64, String, Vec<u8>);

/// The slice the query asks for, if the file is stored.
async fn slice(
    log: &EventLog,
    message_id: EventId,
    query: &FileQuery,
) -> Result<Option<FileAnswer>> {
    let row: Option<StoredSlice> = sqlx::query_as(
        // substring() counts from 1; on an EXTERNAL column it reads only the slice's chunks.
        "SELECT name, mimetype, size, sha256, substring(content FROM $3 FOR $4) \
           FROM message_files WHERE message_id = $1 AND file_id = $2",
    )
    .bind(message_id.0)
    .bind(&query.file_id)
    // (substring takes int4: files are far below 2 GiB.)
    .bind(i32::try_from(query.offset).unwrap_or(i32::MAX - 1) + 1)
    .bind(FileQuery::SLICE as i32)
    .fetch_optional(log.pool())
    .await
    .map_err(warren_schema::Error::db("reading a stored file"))?;
    let Some((name, mimetype, size, sha256, data)) = row else {
        return Ok(None);
    };
    let size = u64::try_from(size).unwrap_or_default();
    if query.offset > size {
        return Ok(Some(FileAnswer::Refused {
            reason: format!("offset {} is past the end ({size} bytes)", query.offset),
        }));
    }
    Ok(Some(FileAnswer::Slice {
        name,
        mimetype,
        size,
        sha256,
        offset: query.offset,
        data: base64::engine::general_purpose::STANDARD.encode(data),
    }))
}

/// The gateway's reason, if it refused the file.
async fn refusal(log: &EventLog, message_id: EventId, file_id: &str) -> Result<Option<String>> {
    let Some(event) = log.get(message_file_event_id(message_id, file_id)).await? else {
        return Ok(None);
    };
    if event.event_type != MessageFileRefused::TYPE {
        // Recorded as stored, yet no row: the row and its event commit together, so this
        // is a file whose row was deleted (retention). It will not come back.
        return Ok(Some("the file is no longer kept".into()));
    }
    Ok(Some(event.decode::<MessageFileRefused>()?.reason))
}

#[cfg(test)]
mod tests {
    use super::*;
    use warren_schema::events::{FileRef, Origin};

    fn routed(workspace: &str, files: &[&str]) -> Routed {
        Routed {
            routing_id: EventId::derive(&["routed"]),
            message_id: EventId::derive(&["message"]),
            workspace: workspace.into(),
            agent: "alice".into(),
            text: "see attached".into(),
            reply_to: Origin::Webhook {
                endpoint: "e".into(),
                delivery_id: "1".into(),
            },
            chain: vec![],
            correlation_id: None,
            files: files
                .iter()
                .map(|id| FileRef {
                    id: (*id).into(),
                    name: None,
                    mimetype: None,
                    url: None,
                    size: None,
                })
                .collect(),
        }
    }

    #[test]
    fn a_workspace_reads_only_the_files_of_messages_routed_to_it() {
        let to_research = routed("research", &["F1"]);
        assert_eq!(
            allowed(Some(&to_research), "research", "F1"),
            Ok(to_research.message_id)
        );
        assert!(
            allowed(Some(&to_research), "ops", "F1")
                .expect_err("refused")
                .contains("routed to workspace research, not ops")
        );
        assert!(
            allowed(Some(&to_research), "research", "F2")
                .expect_err("refused")
                .contains("no file F2")
        );
        assert!(
            allowed(None, "research", "F1")
                .expect_err("refused")
                .contains("not a message Warren routed")
        );
    }
}
