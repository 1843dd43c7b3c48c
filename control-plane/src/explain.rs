//! "Why is this running?": the causal chain of a workspace, a message or a reply, back to
//! the inbound event(s) that started it, with times.

use warren_schema::events::{DomainEvent, WorkspaceObserved, WorkspaceStartRequested};
use warren_schema::{EventId, EventLog, RecordedEvent};

use crate::error::Result;

/// The chain behind any event, root cause first (a message: itself and what carried it in;
/// a reply: the message, its routing, any mentions, the reply).
pub async fn event(log: &EventLog, id: EventId) -> Result<Vec<RecordedEvent>> {
    Ok(log.causation_chain(id).await?)
}

/// The chain behind a workspace's current run: its latest start decision, back to the
/// message (or failure, or admission) that caused it, then what the backend observed of
/// the process or pod that decision made (`workspace.observed`, naming the pod). Empty if
/// it was never started.
pub async fn workspace(log: &EventLog, name: &str) -> Result<Vec<RecordedEvent>> {
    match log
        .latest_for_workspace(WorkspaceStartRequested::TYPE, name)
        .await?
    {
        Some(start) => {
            let mut chain = log.causation_chain(start.id).await?;
            chain.extend(
                log.consequences(start.id)
                    .await?
                    .into_iter()
                    .filter(|e| e.event_type == WorkspaceObserved::TYPE),
            );
            Ok(chain)
        }
        None => Ok(Vec::new()),
    }
}
