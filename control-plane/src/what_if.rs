//! What-if: replay a stretch of history under another policy, without writing, and list the
//! decisions that would differ.
//!
//! The replay feeds the recorded outside facts (messages, mentions, observations,
//! configuration, operators' requests) to the same pure [`decide`] and [`tick`] the leader
//! runs, skipping the decisions that were recorded; it then compares, by id, what it decided
//! with what was recorded. Decision ids derive from their cause and subject, not from the
//! time or the policy, so the same decision made under both policies has the same id and
//! only real differences show. A replay under the policy in force lists nothing (tested).
//!
//! The ids of the decisions recorded in the stretch are read first, so each decision the
//! replay makes is compared as it is made and only the differences are kept: a replay of a
//! million events holds the differences, not every decision.
//!
//! It answers "which decisions would differ", not a full counterfactual: the observations
//! replayed are the ones recorded, so a workspace the new policy would not have started is
//! still seen becoming ready if it did.

use std::collections::HashSet;

use warren_schema::events::{AgentConfigured, DomainEvent, QuotaRemoved, QuotaSet};
use warren_schema::{EventId, NewEvent, RecordedEvent};

use crate::controller::DECISIONS_STREAM;
use crate::decide::{Policy, State, decide, tick};

/// A replay in progress.
#[derive(Debug)]
pub struct Replay {
    state: State,
    policy: Policy,
    /// Every agent's idle timeout, overriding the configured ones.
    idle_timeout_secs: Option<u64>,
    /// Quotas that override the recorded ones (`total`, `team`, `channel`, ...).
    quotas: Vec<(String, Option<usize>)>,
    /// The ids of the decisions recorded in the stretch, not yet made by the replay.
    expected: HashSet<EventId>,
    /// Recorded ids the replay made too.
    matched: HashSet<EventId>,
    /// Made by the replay and not recorded, in order (a re-made decision's id once).
    only_new: Vec<NewEvent>,
    only_new_ids: HashSet<EventId>,
    /// Recorded decisions seen in the log that the replay has not made (yet), in order.
    unmatched: Vec<RecordedEvent>,
    /// Outside facts replayed.
    pub replayed: usize,
}

/// Feeds the events of `(after, up_to]` to `replay`, page by page (the I/O edge of this
/// module: the API's `/v1/what-if` and the history benchmark both use it).
///
/// Reading and deciding overlap ([`crate::replay::fold_range`]).
pub async fn replay_range(
    log: &warren_schema::EventLog,
    replay: Replay,
    after: i64,
    up_to: i64,
) -> warren_schema::Result<Replay> {
    crate::replay::fold_range(log, replay, after, up_to, Replay::step).await
}

/// Whether `event` is a decision. Logs written before the gateway had a stream of its own
/// also hold its `reply.*` records in the decisions stream.
fn is_decision(stream: &str, event_type: &str) -> bool {
    stream == DECISIONS_STREAM && !event_type.starts_with("reply.")
}

/// The ids of the decisions recorded in `(after, up_to]`: what [`Replay::new`] compares with.
pub async fn recorded_ids(
    log: &warren_schema::EventLog,
    after: i64,
    up_to: i64,
) -> warren_schema::Result<HashSet<EventId>> {
    let rows: Vec<(uuid::Uuid, String)> = sqlx::query_as(
        "SELECT event_id, event_type FROM events \
          WHERE stream = $1 AND position > $2 AND position <= $3",
    )
    .bind(DECISIONS_STREAM)
    .bind(after)
    .bind(up_to)
    .fetch_all(log.pool())
    .await
    .map_err(warren_schema::Error::db(
        "reading the decisions recorded in a stretch",
    ))?;
    Ok(rows
        .into_iter()
        .filter(|(_, event_type)| is_decision(DECISIONS_STREAM, event_type))
        .map(|(id, _)| EventId(id))
        .collect())
}

/// The decisions that differ.
#[derive(Debug, Clone, PartialEq)]
pub struct Differences {
    /// Decided under the new policy and not recorded.
    pub only_new: Vec<NewEvent>,
    /// Recorded and not decided under the new policy.
    pub only_recorded: Vec<RecordedEvent>,
    /// Decisions the two have in common.
    pub same: usize,
}

impl Replay {
    /// Starts from `state` (the log folded up to where the stretch begins).
    /// `quotas` override the quotas recorded, at the start and after every quota change in
    /// the stretch: the question is "what if the cap had been this".
    ///
    /// `recorded` holds the ids of the decisions the log recorded in the stretch
    /// ([`recorded_ids`]).
    pub fn new(
        state: State,
        policy: Policy,
        idle_timeout_secs: Option<u64>,
        quotas: Vec<(String, Option<usize>)>,
        recorded: HashSet<EventId>,
    ) -> Self {
        let mut replay = Self {
            state,
            policy,
            idle_timeout_secs,
            quotas,
            expected: recorded,
            matched: HashSet::new(),
            only_new: Vec::new(),
            only_new_ids: HashSet::new(),
            unmatched: Vec::new(),
            replayed: 0,
        };
        replay.override_idle();
        replay.override_quotas();
        replay
    }

    fn override_idle(&mut self) {
        if let Some(secs) = self.idle_timeout_secs {
            for agent in self.state.agents.values_mut() {
                agent.idle_timeout_secs = secs;
            }
        }
    }

    fn override_quotas(&mut self) {
        for (scope, cap) in &self.quotas {
            self.state.quotas.insert(scope.clone(), *cap);
        }
    }

    fn decided(&mut self, decisions: Vec<NewEvent>, at: chrono::DateTime<chrono::Utc>) {
        for d in decisions {
            self.state.apply_unrecorded(&d, at);
            if self.expected.remove(&d.id) {
                self.matched.insert(d.id);
            } else if !self.matched.contains(&d.id) && self.only_new_ids.insert(d.id) {
                self.only_new.push(d);
            }
        }
    }

    /// Takes the next recorded event, in log order.
    pub fn step(&mut self, event: &RecordedEvent) {
        let now = event.recorded_at;
        // What was due by then (the leader ticks every second; a due decision's id does
        // not depend on when it was made).
        let due = tick(&self.state, now, &self.policy);
        self.decided(due, now);
        if is_decision(&event.stream, &event.event_type) {
            // Made already (at its cause), or perhaps later (kept until the end).
            if !self.matched.contains(&event.id) {
                self.unmatched.push(event.clone());
            }
            return;
        }
        let made = decide(&self.state, event, now, &self.policy);
        self.state.apply(event);
        match event.event_type.as_str() {
            AgentConfigured::TYPE => self.override_idle(),
            QuotaSet::TYPE | QuotaRemoved::TYPE => self.override_quotas(),
            _ => {}
        }
        self.decided(made, now);
        self.replayed += 1;
    }

    /// Compares what was decided with what was recorded.
    pub fn finish(self) -> Differences {
        Differences {
            only_recorded: self
                .unmatched
                .into_iter()
                .filter(|r| !self.matched.contains(&r.id))
                .collect(),
            same: self.matched.len(),
            only_new: self.only_new,
        }
    }
}

#[cfg(test)]
mod tests {
    use chrono::{TimeDelta, TimeZone, Utc};
    use serde_json::json;
    use warren_schema::events::*;
    use warren_schema::{Metadata, NewEvent};

    use super::*;

    /// A log made by the real decisions under `policy`: outside facts and, after each, the
    /// decisions the leader would have recorded.
    fn history(policy: &Policy) -> Vec<RecordedEvent> {
        let mut log: Vec<RecordedEvent> = Vec::new();
        let mut state = State::default();
        let t0 = Utc
            .with_ymd_and_hms(2026, 12, 1, 9, 0, 0)
            .single()
            .expect("t");
        let push = |log: &mut Vec<RecordedEvent>,
                    state: &mut State,
                    e: NewEvent,
                    stream: &str,
                    minute: i64| {
            let recorded = RecordedEvent {
                position: log.len() as i64 + 1,
                id: e.id,
                stream: stream.into(),
                stream_version: 1,
                event_type: e.event_type,
                event_version: e.event_version,
                payload: e.payload,
                metadata: e.metadata,
                recorded_at: t0 + TimeDelta::minutes(minute),
            };
            let decisions = if stream == DECISIONS_STREAM {
                Vec::new()
            } else {
                decide(state, &recorded, recorded.recorded_at, policy)
            };
            state.apply(&recorded);
            log.push(recorded);
            decisions
        };
        let mut minute = 0;
        for (agent, workspace) in [("a", "wa"), ("b", "wb"), ("c", "wc")] {
            let e = NewEvent::from_domain(
                EventId::random(),
                &AgentConfigured {
                    name: agent.into(),
                    workspace: workspace.into(),
                    driver: "echo".into(),
                    settings: json!({}),
                    idle_timeout_secs: 3600,
                },
                Metadata::new("test"),
            )
            .expect("e");
            push(&mut log, &mut state, e, "control-plane:config", minute);
        }
        for agent in ["a", "b", "c"] {
            minute += 1;
            let message = MessageReceived {
                origin: Origin::Webhook {
                    endpoint: "ci".into(),
                    delivery_id: agent.into(),
                },
                text: "hi".into(),
                addressed_agents: vec![agent.into()],
                files: vec![],
            };
            let e = NewEvent::from_domain(EventId::random(), &message, Metadata::new("test"))
                .expect("e");
            let decisions = push(&mut log, &mut state, e, "webhook:ci", minute);
            for d in decisions {
                push(&mut log, &mut state, d, DECISIONS_STREAM, minute);
            }
        }
        log
    }

    fn replay(log: &[RecordedEvent], policy: Policy) -> Differences {
        let recorded = log
            .iter()
            .filter(|e| e.stream == DECISIONS_STREAM)
            .map(|e| e.id)
            .collect();
        let mut r = Replay::new(State::default(), policy, None, Vec::new(), recorded);
        for e in log {
            r.step(e);
        }
        r.finish()
    }

    #[test]
    fn under_the_policy_in_force_nothing_differs() {
        let log = history(&Policy::default());
        let d = replay(&log, Policy::default());
        assert!(d.only_new.is_empty() && d.only_recorded.is_empty(), "{d:?}");
        assert_eq!(d.same, 6, "three routings and three starts");
    }

    /// Before the gateway had a stream of its own, its records of a notice's delivery went
    /// in the decisions stream: they are not decisions the replay failed to make.
    #[test]
    fn the_gateways_old_records_in_the_decisions_stream_are_not_decisions() {
        let mut log = history(&Policy::default());
        let delivered = NewEvent::from_domain(
            EventId::random(),
            &ReplyDelivered {
                reply_id: EventId::random(),
                channel: "C1".into(),
                ts: "1.0".into(),
            },
            Metadata::new("gateway/replies"),
        )
        .expect("e");
        log.push(RecordedEvent {
            position: log.len() as i64 + 1,
            id: delivered.id,
            stream: DECISIONS_STREAM.into(),
            stream_version: 7,
            event_type: delivered.event_type,
            event_version: delivered.event_version,
            payload: delivered.payload,
            metadata: delivered.metadata,
            recorded_at: log.last().expect("history").recorded_at,
        });
        let recorded = log
            .iter()
            .filter(|e| is_decision(&e.stream, &e.event_type))
            .map(|e| e.id)
            .collect();
        let mut r = Replay::new(
            State::default(),
            Policy::default(),
            None,
            Vec::new(),
            recorded,
        );
        for e in &log {
            r.step(e);
        }
        let d = r.finish();
        assert!(d.only_new.is_empty() && d.only_recorded.is_empty(), "{d:?}");
        assert_eq!(d.same, 6);
    }

    #[test]
    fn a_lower_cap_lists_exactly_the_starts_that_would_have_queued() {
        let log = history(&Policy::default());
        let d = replay(
            &log,
            Policy {
                max_running: Some(1),
                ..Policy::default()
            },
        );
        let queued: Vec<String> = d
            .only_new
            .iter()
            .filter(|e| e.event_type == WorkspaceStartQueued::TYPE)
            .map(|e| {
                e.payload["workspace"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned()
            })
            .collect();
        assert_eq!(queued, ["wb", "wc"]);
        let not_started: std::collections::BTreeSet<String> = d
            .only_recorded
            .iter()
            .map(|e| {
                format!(
                    "{} {}",
                    e.event_type,
                    e.payload["workspace"].as_str().unwrap_or_default()
                )
            })
            .collect();
        assert_eq!(
            not_started,
            std::collections::BTreeSet::from([
                "workspace.start_requested wb".to_owned(),
                "workspace.start_requested wc".to_owned()
            ])
        );
        assert_eq!(d.only_new.len(), 2, "{:?}", d.only_new);
    }
}

#[cfg(test)]
mod quota_tests {
    use super::*;

    #[test]
    fn an_overridden_quota_stays_overridden_when_the_stretch_records_another() {
        use warren_schema::events::QuotaSet;
        use warren_schema::{Metadata, NewEvent};
        let mut r = Replay::new(
            State::default(),
            Policy::default(),
            None,
            vec![("total".into(), Some(1))],
            HashSet::new(),
        );
        let set = NewEvent::from_domain(
            EventId::random(),
            &QuotaSet {
                scope: "total".into(),
                max_running: Some(50),
            },
            Metadata::new("test"),
        )
        .expect("e");
        r.step(&RecordedEvent {
            position: 1,
            id: set.id,
            stream: "control-plane:config".into(),
            stream_version: 1,
            event_type: set.event_type,
            event_version: set.event_version,
            payload: set.payload,
            metadata: set.metadata,
            recorded_at: chrono::Utc::now(),
        });
        assert_eq!(r.state.cap("total", &Policy::default()), Some(1));
    }
}
