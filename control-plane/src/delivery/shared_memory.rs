//! Writes to the shared memory bucket, done by the control plane for the workspaces.
//!
//! Workspaces read the shared bucket directly but may not write it: a workspace writing
//! there could claim any provenance, overwrite or delete anyone's keys, or wipe the bucket
//! with one `Nats-Rollup`. Instead a workspace sends a [`SharedWrite`] request on its own
//! [`Namespace::shared_write_subject`] (only its credentials may publish there). The control
//! plane checks that the agent lives in that workspace ([`SenderCheck`]), writes the value
//! with that provenance, records it as `memory.written` and answers with the revision.

use async_nats::jetstream::{self, kv};
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info_span, warn};
use warren_schema::events::MemoryWritten;
use warren_schema::nats::{BucketLimits, Namespace, SharedWrite, SharedWriteResult};
use warren_schema::{AppendRequest, EventId, EventLog, Metadata, NewEvent};

use super::nats;
use super::senders::SenderCheck;
use crate::error::{Error, Result};

/// Queue group of the control plane's replicas (only the leader serves; a second one during
/// a hand-over must not write twice).
const QUEUE: &str = "control-plane";

/// Serves shared writes until `shutdown`. NATS failures are returned (the caller retries);
/// a write the log could not record is answered `failed` and ends the service with the
/// database error.
pub async fn run(
    js: jetstream::Context,
    ns: Namespace,
    log: EventLog,
    shutdown: CancellationToken,
) -> Result<()> {
    let store = warren_schema::nats::ensure_bucket(&js, &ns.shared_bucket(), &BucketLimits::SHARED)
        .await
        .map_err(|e| Error::Nats(e.to_string()))?;
    let client = js.client();
    let mut requests = client
        .queue_subscribe(ns.shared_write_subjects(), QUEUE.into())
        .await
        .map_err(|e| nats("subscribing to shared writes")(&e))?;
    let mut senders = SenderCheck::default();
    loop {
        let request = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            request = requests.next() => request,
        };
        let Some(request) = request else {
            return Err(Error::Nats("the shared-write subscription ended".into()));
        };
        let Some(reply) = request.reply.clone() else {
            continue;
        };
        let span = info_span!("shared_write", subject = %request.subject);
        let (answer, failure) = async {
            let workspace = ns.shared_write_workspace(&request.subject);
            let write = serde_json::from_slice::<SharedWrite>(&request.payload);
            let (workspace, write) = match (workspace, write) {
                (Some(w), Ok(write)) => (w.to_owned(), write),
                (_, Err(e)) => return (refused(format!("not a shared write: {e}")), None),
                (None, _) => return (refused("not a workspace's subject".into()), None),
            };
            match senders.check_agent(&log, &workspace, &write.agent).await {
                Ok(Ok(())) => {}
                Ok(Err(reason)) => return (refused(reason), None),
                Err(e) => return (failed("the configuration could not be read"), Some(e)),
            }
            match apply(&store, &ns, &workspace, &write).await {
                Ok(revision) => match record(&log, &ns, &workspace, &write, revision).await {
                    Ok(()) => (SharedWriteResult::Written { revision }, None),
                    Err(e) => (failed("the write could not be recorded"), Some(e)),
                },
                Err(answer) => (answer, None),
            }
        }
        .instrument(span)
        .await;
        if !matches!(answer, SharedWriteResult::Written { .. }) {
            warn!(subject = %request.subject, ?answer, "shared write not done");
        }
        let body = serde_json::to_vec(&answer).unwrap_or_default();
        client
            .publish(reply, body.into())
            .await
            .map_err(|e| nats("answering a shared write")(&e))?;
        if let Some(e) = failure {
            return Err(e);
        }
    }
}

fn refused(reason: String) -> SharedWriteResult {
    metrics::counter!("warren_control_plane_shared_writes_refused_total").increment(1);
    SharedWriteResult::Refused { reason }
}

fn failed(reason: &str) -> SharedWriteResult {
    SharedWriteResult::Failed {
        reason: reason.to_owned(),
    }
}

/// Writes `write` into the shared bucket with the provenance the control plane knows;
/// returns the new revision (a delete's: its marker's).
async fn apply(
    store: &kv::Store,
    ns: &Namespace,
    workspace: &str,
    write: &SharedWrite,
) -> std::result::Result<u64, SharedWriteResult> {
    let key = write.key.as_str();
    if !is_key(key) {
        return Err(refused(format!(
            "{key:?} is not a memory key (letters, digits, and - _ / = . inside)"
        )));
    }
    let nats_failed = |e: &dyn std::fmt::Display| {
        warn!(error = %e, "shared write failed in NATS");
        failed("NATS refused the write; try again")
    };
    let Some(value) = &write.value else {
        store.delete(key).await.map_err(|e| nats_failed(&e))?;
        return match store.entry(key).await {
            Ok(entry) => Ok(entry.map_or(0, |e| e.revision)),
            Err(e) => Err(nats_failed(&e)),
        };
    };
    let stored =
        serde_json::json!({ "value": value, "agent": write.agent, "workspace": workspace });
    let bytes = stored.to_string().into_bytes();
    let limit = ns.bucket_limits(&ns.shared_bucket()).max_value_bytes;
    if bytes.len() > limit as usize {
        return Err(refused(format!(
            "the value is {} bytes; a shared value holds at most {limit}",
            bytes.len()
        )));
    }
    let conflict = SharedWriteResult::Conflict {
        expected: write.expected_revision.unwrap_or(0),
    };
    match write.expected_revision {
        None => store
            .put(key, bytes.into())
            .await
            .map_err(|e| nats_failed(&e)),
        Some(0) => store.create(key, bytes.into()).await.map_err(|e| {
            if e.kind() == kv::CreateErrorKind::AlreadyExists {
                conflict.clone()
            } else {
                nats_failed(&e)
            }
        }),
        Some(revision) => store
            .update(key, bytes.into(), revision)
            .await
            .map_err(|e| {
                if e.kind() == kv::UpdateErrorKind::WrongLastRevision {
                    conflict.clone()
                } else {
                    nats_failed(&e)
                }
            }),
    }
}

/// Whether `key` is a key-value key NATS accepts.
fn is_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 256
        && !key.starts_with('.')
        && !key.ends_with('.')
        && !key.contains("..")
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_/=.".contains(c))
}

/// Records the write as `memory.written` (one event per bucket, key and revision).
async fn record(
    log: &EventLog,
    ns: &Namespace,
    workspace: &str,
    write: &SharedWrite,
    revision: u64,
) -> Result<()> {
    let bucket = ns.shared_bucket();
    let mut metadata = Metadata::new("control-plane.shared-memory");
    metadata.actor = Some(write.agent.clone());
    metadata.correlation_id = write.conversation;
    let event = NewEvent::from_domain(
        EventId::derive(&["shared-memory", &bucket, &write.key, &revision.to_string()]),
        &MemoryWritten {
            bucket: bucket.clone(),
            key: write.key.clone(),
            value: write.value.clone(),
            revision,
            workspace: workspace.to_owned(),
            agent: write.agent.clone(),
        },
        metadata,
    )
    .map_err(|e| Error::Nats(format!("encoding a shared write: {e}")))?;
    log.append(&AppendRequest::new(format!("memory:{bucket}"), vec![event]))
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_keys_are_what_nats_accepts() {
        for key in ["plan", "a/b", "team.notes", "x=1", "A_b-c"] {
            assert!(is_key(key), "{key}");
        }
        for key in ["", ".a", "a.", "a..b", "a b", "a*", "a>", "ü"] {
            assert!(!is_key(key), "{key}");
        }
    }
}
