//! The decision loop's I/O: feed each new event to [`decide`](crate::decide::decide) and
//! record the decisions, exactly once, under the leader lease.
//!
//! One transaction per batch of events: check the lease (held FOR SHARE until commit), check
//! that the checkpoint is where this replica left it, append the decisions to
//! [`DECISIONS_STREAM`] with the expected stream version (a second, fenced-out writer fails
//! here even if the lease check were bypassed), advance the checkpoint, commit. A crash
//! anywhere rolls all of it back and the batch is decided again on restart, with the same
//! derived ids.

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tracing::{debug, info, info_span, instrument};
use warren_schema::event_log::append_in_tx;
use warren_schema::event_log::projection::{lock_checkpoint, store_checkpoint};
use warren_schema::{
    AppendRequest, Error as LogError, EventLog, ExpectedVersion, NewEvent, RecordedEvent,
};

use super::lease::Lease;
use crate::decide::{self, Phase, Policy, State};
use crate::error::{Error, Result};

/// Every decision is appended to this one stream: its version is the leader's fence.
pub const DECISIONS_STREAM: &str = "control-plane:decisions";
/// Checkpoint of the decision loop: the last event it decided on.
pub const CHECKPOINT: &str = "control-plane.decisions";

/// The leader's decision state. Built by [`Decider::load`]; fed by [`Decider::handle`].
#[derive(Debug)]
pub struct Decider {
    state: State,
    policy: Policy,
    lease: Lease,
    /// Version of [`DECISIONS_STREAM`] after our last append.
    version: i64,
}

impl Decider {
    /// Replays the log up to the decision checkpoint into the state (no decisions: those
    /// events were decided on already), and reads the decision stream's version.
    #[instrument(skip_all, fields(lease = %lease.name, fence = lease.fence))]
    pub async fn load(log: &EventLog, policy: Policy, lease: Lease) -> Result<Self> {
        let (state, checkpoint) = crate::replay::to_checkpoint(log, CHECKPOINT).await?;
        let version = log.stream_version(DECISIONS_STREAM).await?;
        info!(
            checkpoint,
            agents = state.agents.len(),
            workspaces = state.workspaces.len(),
            "decision state loaded"
        );
        Ok(Self {
            state,
            policy,
            lease,
            version,
        })
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    pub fn lease(&self) -> &Lease {
        &self.lease
    }

    /// Decides on `events` (those past the checkpoint) and on what is due at `now`, records
    /// the decisions and advances the checkpoint, in one transaction. Returns the recorded
    /// decisions. On any error the state is unchanged: reload before going on.
    #[instrument(skip_all, fields(events = events.len(), decisions), err)]
    pub async fn handle(
        &mut self,
        pool: &PgPool,
        events: &[RecordedEvent],
        now: DateTime<Utc>,
    ) -> Result<Vec<NewEvent>> {
        // The common case on an idle controller: a timer tick with nothing due.
        if events.iter().all(|e| e.position <= self.state.position)
            && decide::tick(&self.state, now, &self.policy).is_empty()
        {
            return Ok(Vec::new());
        }
        // Work on a copy: a failed transaction must leave the state as the log has it.
        let mut next = self.state.clone();
        let mut decisions = Vec::new();
        let from = next.position;
        for event in events.iter().filter(|e| e.position > from) {
            // A span in the trace of the event (a message's: from the gateway's request).
            let span = info_span!(
                "decide",
                position = event.position,
                event_type = %event.event_type,
                decisions = tracing::field::Empty,
            );
            if let Some(parent) = &event.metadata.traceparent {
                warren_telemetry::set_parent_from_traceparent(&span, parent);
            }
            let _entered = span.enter();
            let mut made = decide::decide(&next, event, now, &self.policy);
            // The decisions continue the trace from this span: what acts on them (the
            // reconcile, the publish to an inbox) is its child.
            if let Some(own) = warren_telemetry::current_traceparent() {
                for d in &mut made {
                    d.metadata.traceparent = Some(own.clone());
                }
            }
            span.record("decisions", made.len());
            debug!(decisions = made.len(), "decided");
            next.apply(event);
            for d in &made {
                next.apply_own(d, now);
            }
            decisions.extend(made);
        }
        let mut due = decide::tick(&next, now, &self.policy);
        for d in &mut due {
            // A decision the clock made is a trace of its own, linked to the work it follows
            // from (the traceparent `tick` gave it).
            let span = info_span!(
                parent: None,
                "decide_tick",
                event_type = %d.event_type,
                cause = ?d.metadata.causation_id,
            );
            warren_telemetry::start_linked_trace(&span, d.metadata.traceparent.as_deref());
            if let Some(own) = span.in_scope(warren_telemetry::current_traceparent) {
                d.metadata.traceparent = Some(own);
            }
        }
        for d in &due {
            next.apply_own(d, now);
        }
        decisions.extend(due);
        tracing::Span::current().record("decisions", decisions.len());
        if next.position == self.state.position && decisions.is_empty() {
            return Ok(decisions);
        }

        let mut tx = pool
            .begin()
            .await
            .map_err(LogError::db("beginning a decision transaction"))?;
        self.lease.verify_in(&mut tx).await??;
        let stored = lock_checkpoint(&mut tx, CHECKPOINT).await?;
        if stored != self.state.position {
            return Err(Error::CheckpointMoved {
                expected: self.state.position,
                found: stored,
            });
        }
        let mut version = self.version;
        if !decisions.is_empty() {
            let expected = match self.version {
                0 => ExpectedVersion::NoStream,
                v => ExpectedVersion::Exact(v),
            };
            let request =
                AppendRequest::new(DECISIONS_STREAM, decisions.clone()).expecting(expected);
            let appended = append_in_tx(&mut tx, &[&request]).await?.remove(0)?;
            // A re-decided event's decisions are duplicates, reported at their old versions:
            // the stream is never behind what we already knew.
            version = appended
                .iter()
                .map(|a| a.stream_version)
                .fold(version, i64::max);
        }
        store_checkpoint(&mut tx, CHECKPOINT, next.position).await?;
        tx.commit()
            .await
            .map_err(LogError::db("committing decisions"))?;
        for decision in &decisions {
            metrics::counter!("warren_control_plane_decisions_total",
                              "kind" => decision.event_type.clone())
            .increment(1);
        }
        if next.position != self.state.position {
            // Workspaces by phase; `queued` is the admission queue.
            let mut phases = [0usize; Phase::ALL.len()];
            for w in next.workspaces.values() {
                phases[Phase::ALL.iter().position(|p| *p == w.phase).unwrap_or(0)] += 1;
            }
            for (phase, count) in Phase::ALL.iter().zip(phases) {
                metrics::gauge!("warren_control_plane_workspaces", "phase" => phase.name())
                    .set(count as f64);
            }
        }
        self.state = next;
        self.version = version;
        Ok(decisions)
    }
}
