//! The control plane's decisions: pure functions from what the log says to the events that
//! should follow. No I/O, no clock (time is a parameter), no randomness; every decision
//! gets an id derived from its cause, so deciding twice (a restart, a second replica)
//! appends nothing new.
//!
//! - [`decide`]: a new event arrived. Route a message to its agents; wake a stopped
//!   workspace that has work waiting, or queue it behind the admission caps; give up on a
//!   workspace that keeps failing and tell the conversations waiting on it; route or refuse
//!   an agent's mention of another agent (depth and rate limits).
//! - [`tick`]: time passed. Restart failed workspaces whose backoff is over; stop idle ones;
//!   admit queued starts in fair order as capacity frees.
//!
//! Every decision carries `causation_id` (the event that caused it) and the conversation's
//! `correlation_id` and `traceparent`, so `explain` can walk from any decision back to the
//! Slack message or webhook that started it.

pub mod access;
pub mod state;
#[cfg(test)]
mod tests;

use chrono::{DateTime, TimeDelta, Utc};
use warren_schema::events::*;
use warren_schema::{EventId, Metadata, NewEvent, RecordedEvent};

pub use state::{Agent, Phase, QueuedStart, State, Workspace};

/// `metadata.source` of every decision.
pub const SOURCE: &str = "control-plane";

/// The rules the decisions apply.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Most workspaces holding a runtime slot at once (None: no cap).
    pub max_running: Option<usize>,
    /// Most per Slack team (or webhook sender).
    pub max_running_per_team: Option<usize>,
    /// Most per Slack channel (or webhook endpoint).
    pub max_running_per_channel: Option<usize>,
    /// Restarts after failures before giving up (`workspace.failed`).
    pub max_restarts: u32,
    /// First restart delay; doubles per failure up to `restart_backoff_max`.
    pub restart_backoff: TimeDelta,
    pub restart_backoff_max: TimeDelta,
    /// Longest agent-to-agent chain (who asked whom) that is still delivered.
    pub mention_max_depth: usize,
    /// Most agent mentions per conversation within `mention_window`.
    pub mention_max_per_window: usize,
    pub mention_window: TimeDelta,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            max_running: None,
            max_running_per_team: None,
            max_running_per_channel: None,
            max_restarts: 3,
            restart_backoff: TimeDelta::seconds(2),
            restart_backoff_max: TimeDelta::seconds(60),
            mention_max_depth: 5,
            mention_max_per_window: 20,
            mention_window: TimeDelta::seconds(60),
        }
    }
}

impl Policy {
    /// Delay before restart number `failures` (1 for the first failure).
    pub fn backoff(&self, failures: u32) -> TimeDelta {
        let doublings = failures.saturating_sub(1).min(20);
        let delay = self.restart_backoff * 2_i32.pow(doublings);
        delay.min(self.restart_backoff_max)
    }
}

/// The route key a message's origin reaches when it names no agent.
pub fn route_key(origin: &Origin) -> Option<String> {
    match origin {
        Origin::Slack { channel, .. } | Origin::SlackCommand { channel, .. } => {
            Some(format!("slack_channel:{channel}"))
        }
        Origin::Webhook { endpoint, .. } => Some(format!("webhook:{endpoint}")),
        Origin::Agent { .. } => None,
    }
}

/// The agents a message reaches, and why: those it addresses by name (that exist), else the
/// agent its channel or endpoint routes to.
pub fn route_targets(state: &State, message: &MessageReceived) -> Vec<(String, &'static str)> {
    let named: Vec<(String, &'static str)> = message
        .addressed_agents
        .iter()
        .filter(|a| state.agents.contains_key(*a))
        .map(|a| (a.clone(), "mention"))
        .collect();
    if !named.is_empty() {
        return named;
    }
    let reason = match message.origin {
        Origin::Webhook { .. } => "webhook_route",
        _ => "channel_route",
    };
    route_key(&message.origin)
        .and_then(|key| state.routes.get(&key))
        .filter(|agent| state.agents.contains_key(*agent))
        .map(|agent| vec![(agent.clone(), reason)])
        .unwrap_or_default()
}

/// The decisions that follow `event`, given the state *before* it.
pub fn decide(
    state: &State,
    event: &RecordedEvent,
    now: DateTime<Utc>,
    policy: &Policy,
) -> Vec<NewEvent> {
    let mut out = Decisions::new(Cause::of(event), now);
    match event.event_type.as_str() {
        MessageReceived::TYPE => {
            if let Ok(message) = event.decode::<MessageReceived>() {
                let (team, channel) = scope(&message.origin);
                for (agent, reason) in route_targets(state, &message) {
                    let allowed = access::Access::of(&state.agents[&agent].settings)
                        .and_then(|a| a.check(&message.origin));
                    if let Err(why) = allowed {
                        out.push(
                            &["message_refused", &event.id.to_string(), &agent],
                            &MessageRefused {
                                message_id: event.id,
                                agent: agent.clone(),
                                reason: why,
                            },
                        );
                        continue;
                    }
                    route(state, &mut out, event.id, &agent, reason);
                    let workspace = &state.agents[&agent].workspace;
                    wake(state, &mut out, workspace, team, channel, policy);
                }
            }
        }
        AgentMentioned::TYPE => {
            if let Ok(mention) = event.decode::<AgentMentioned>() {
                judge_mention(state, &mut out, event, &mention, policy);
            }
        }
        WorkspaceObserved::TYPE => {
            if let Ok(observed) = event.decode::<WorkspaceObserved>()
                && !state.is_stale_observation(&observed.workspace, event)
            {
                give_up_if_exhausted(state, &mut out, &observed, policy);
                restart_when_gone(state, &mut out, &observed, policy);
            }
        }
        WorkspaceActionRequested::TYPE => {
            if let Ok(request) = event.decode::<WorkspaceActionRequested>() {
                operator_action(state, &mut out, &request, policy);
            }
        }
        MessageDeadLettered::TYPE => {
            if let Ok(dead) = event.decode::<MessageDeadLettered>()
                && let Some(reply_to) = dead.reply_to
            {
                let cause = event.id.to_string();
                out.push(
                    &["dead_letter_notice", &cause],
                    &AgentReplied {
                        workspace: dead.workspace,
                        agent: "warren".into(),
                        reply_to,
                        // What went wrong (a path, a model URL, a provider's body) is for
                        // the operator, in the log: the conversation gets the id to ask by.
                        text: format!(
                            "@{} could not handle this message after {} attempts. It was set \
                             aside; send it again to retry. (For an operator: `warren-control-plane \
                             explain {cause}`.)",
                            dead.agent, dead.deliveries
                        ),
                    },
                );
            }
        }
        _ => {}
    }
    out.events
}

/// The decisions that are due at `now`, whatever event comes next.
pub fn tick(state: &State, now: DateTime<Utc>, policy: &Policy) -> Vec<NewEvent> {
    let mut events = Vec::new();
    for w in state.workspaces.values() {
        match w.phase {
            Phase::BackingOff => {
                let (Some(failed_at), Some(cause)) = (w.failed_at, w.failure_event) else {
                    continue;
                };
                if w.failures <= policy.max_restarts
                    && now >= failed_at + policy.backoff(w.failures)
                {
                    let mut out = Decisions::new(Cause::timed(cause, w.start_trace.as_ref()), now);
                    out.push(
                        &["restart", &cause.to_string()],
                        &WorkspaceStartRequested {
                            workspace: w.name.clone(),
                            reason: "restart_after_failure".into(),
                            attempt: w.failures,
                        },
                    );
                    events.extend(out.events);
                }
            }
            Phase::Ready => {
                let timeout = state
                    .agents
                    .values()
                    .filter(|a| a.workspace == w.name)
                    .map(|a| a.idle_timeout_secs)
                    .min();
                let Some(timeout) = timeout else { continue };
                let timeout = TimeDelta::seconds(i64::try_from(timeout).unwrap_or(i64::MAX));
                if now - w.last_activity >= timeout {
                    let cause = w.last_activity_event;
                    let mut out = Decisions::new(Cause::timed(cause, w.start_trace.as_ref()), now);
                    out.push(
                        &["stop_idle", &w.name, &cause.to_string()],
                        &WorkspaceStopRequested {
                            workspace: w.name.clone(),
                            reason: "idle".into(),
                        },
                    );
                    events.extend(out.events);
                }
            }
            _ => {}
        }
    }
    events.extend(admit_queued(state, now, policy));
    events
}

/// The event a decision follows from, and the conversation it belongs to.
#[derive(Debug, Clone)]
struct Cause {
    id: EventId,
    correlation: Option<EventId>,
    traceparent: Option<String>,
}

impl Cause {
    fn of(event: &RecordedEvent) -> Self {
        Self {
            id: event.id,
            correlation: event.metadata.correlation_id.or(Some(event.id)),
            traceparent: event.metadata.traceparent.clone(),
        }
    }

    /// The cause of a time-based decision: an event, and the trace of the work it follows
    /// from. The decider records such a decision in a trace of its own, linked to that one
    /// (`controller::decider`).
    fn timed(id: EventId, trace: Option<&String>) -> Self {
        Self {
            id,
            correlation: None,
            traceparent: trace.cloned(),
        }
    }
}

/// Decisions being built for one cause.
struct Decisions {
    cause: Cause,
    now: DateTime<Utc>,
    events: Vec<NewEvent>,
}

impl Decisions {
    fn new(cause: Cause, now: DateTime<Utc>) -> Self {
        Self {
            cause,
            now,
            events: Vec::new(),
        }
    }

    /// Adds a decision whose id is derived from `key` (which names the cause).
    /// Adds a decision; returns its id.
    fn push<E: DomainEvent>(&mut self, key: &[&str], event: &E) -> EventId {
        let mut parts = vec!["decision", E::TYPE];
        parts.extend_from_slice(key);
        let metadata = Metadata {
            traceparent: self.cause.traceparent.clone(),
            correlation_id: self.cause.correlation,
            causation_id: Some(self.cause.id),
            source: SOURCE.to_owned(),
            actor: None,
            received_at: self.now,
        };
        let id = EventId::derive(&parts);
        // Serialising a derived, plain-data struct cannot fail.
        if let Ok(e) = NewEvent::from_domain(id, event, metadata) {
            self.events.push(e);
        }
        id
    }

    fn has_start_for(&self, workspace: &str) -> bool {
        self.events.iter().any(|e| {
            (e.event_type == WorkspaceStartRequested::TYPE
                || e.event_type == WorkspaceStartQueued::TYPE)
                && e.payload["workspace"] == workspace
        })
    }
}

pub(crate) fn scope(origin: &Origin) -> (Option<&str>, Option<&str>) {
    match origin {
        Origin::Slack {
            team_id, channel, ..
        }
        | Origin::SlackCommand {
            team_id, channel, ..
        } => (Some(team_id), Some(channel)),
        Origin::Webhook { endpoint, .. } => (Some(endpoint), Some(endpoint)),
        Origin::Agent { .. } => (None, None),
    }
}

fn route(state: &State, out: &mut Decisions, message: EventId, agent: &str, reason: &str) {
    let Some(a) = state.agents.get(agent) else {
        return;
    };
    out.push(
        &["route", &message.to_string(), agent],
        &MessageRouted {
            message_id: message,
            agent: agent.to_owned(),
            workspace: a.workspace.clone(),
            reason: reason.to_owned(),
        },
    );
}

/// A workspace has work: start it if it is not running (or about to be), within the caps;
/// otherwise queue it. Work never jumps the queue: while anything waits, new starts queue.
/// An operator's start, stop, restart or delete. A start is a wake like a message's (the
/// admission caps apply; it may queue); a stop applies to a workspace that runs, starts,
/// backs off or waits in the queue, and to nothing else. A delete stops it the same way;
/// the state forgets it once it is stopped ([`State`]'s `delete_pending`).
fn operator_action(
    state: &State,
    out: &mut Decisions,
    request: &WorkspaceActionRequested,
    policy: &Policy,
) {
    let workspace = request.workspace.as_str();
    let phase = state
        .workspaces
        .get(workspace)
        .map_or(Phase::Stopped, |w| w.phase);
    match request.action.as_str() {
        "start" => {
            let hosted = state.agents.values().any(|a| a.workspace == workspace);
            if hosted {
                wake_for(state, out, workspace, None, None, policy, "operator");
            }
        }
        // Stop now; start again once the backend reports it gone ([`restart_when_gone`]).
        // A workspace that is not running is simply started.
        "restart" => match phase {
            Phase::Starting | Phase::Ready | Phase::BackingOff => {
                let cause = out.cause.id.to_string();
                out.push(
                    &["stop_restart", workspace, &cause],
                    &WorkspaceStopRequested {
                        workspace: workspace.to_owned(),
                        reason: state::RESTART.into(),
                    },
                );
            }
            Phase::Stopped | Phase::Failed
                if state.agents.values().any(|a| a.workspace == workspace) =>
            {
                wake_for(state, out, workspace, None, None, policy, "operator");
            }
            _ => {}
        },
        "stop" | state::DELETE => {
            if matches!(
                phase,
                Phase::Starting | Phase::Ready | Phase::BackingOff | Phase::Queued
            ) {
                let cause = out.cause.id.to_string();
                let reason = if request.action == state::DELETE {
                    state::DELETE
                } else {
                    "operator"
                };
                out.push(
                    &["stop_operator", workspace, &cause],
                    &WorkspaceStopRequested {
                        workspace: workspace.to_owned(),
                        reason: reason.into(),
                    },
                );
            }
        }
        _ => {}
    }
}

/// The second half of an operator's restart: the instance stopped for it is gone, so the
/// workspace starts again (a new start decision, so the reconciler makes a new instance).
fn restart_when_gone(
    state: &State,
    out: &mut Decisions,
    observed: &WorkspaceObserved,
    policy: &Policy,
) {
    let pending = state
        .workspaces
        .get(&observed.workspace)
        .is_some_and(|w| w.restart_pending && w.phase == Phase::Stopping);
    if pending
        && matches!(
            observed.phase,
            WorkspacePhase::Exited | WorkspacePhase::Gone
        )
    {
        wake_for(
            state,
            out,
            &observed.workspace,
            None,
            None,
            policy,
            state::RESTART,
        );
    }
}

fn wake(
    state: &State,
    out: &mut Decisions,
    workspace: &str,
    team: Option<&str>,
    channel: Option<&str>,
    policy: &Policy,
) {
    wake_for(
        state,
        out,
        workspace,
        team,
        channel,
        policy,
        "message_waiting",
    );
}

/// Starts `workspace` (or queues it behind a cap) unless it runs or is starting already;
/// `reason` goes in the start decision.
fn wake_for(
    state: &State,
    out: &mut Decisions,
    workspace: &str,
    team: Option<&str>,
    channel: Option<&str>,
    policy: &Policy,
    reason: &str,
) {
    let phase = state
        .workspaces
        .get(workspace)
        .map_or(Phase::Stopped, |w| w.phase);
    if !matches!(phase, Phase::Stopped | Phase::Stopping | Phase::Failed)
        || out.has_start_for(workspace)
    {
        return;
    }
    let cause = out.cause.id.to_string();
    let blocking_cap = cap_reached(
        state,
        team,
        channel,
        policy,
        out.started_here(team, channel),
    )
    .or_else(|| (!state.queue.is_empty()).then(|| "queue".to_owned()));
    match blocking_cap {
        None => out.push(
            &["start", workspace, &cause],
            &WorkspaceStartRequested {
                workspace: workspace.to_owned(),
                reason: reason.into(),
                attempt: 0,
            },
        ),
        Some(cap) => out.push(
            &["queue", workspace, &cause],
            &WorkspaceStartQueued {
                workspace: workspace.to_owned(),
                cap,
                team: team.map(str::to_owned),
                channel: channel.map(str::to_owned),
            },
        ),
    };
}

impl Decisions {
    /// Starts decided in this batch: they hold slots the state does not show yet. One event
    /// has one origin, so they share the scope of the start being considered.
    fn started_here(
        &self,
        team: Option<&str>,
        channel: Option<&str>,
    ) -> Vec<(Option<String>, Option<String>)> {
        self.events
            .iter()
            .filter(|e| e.event_type == WorkspaceStartRequested::TYPE)
            .map(|_| (team.map(str::to_owned), channel.map(str::to_owned)))
            .collect()
    }
}

/// Which cap a new start in (`team`, `channel`) would exceed, given `extra` starts already
/// decided but not yet in the state.
fn cap_reached(
    state: &State,
    team: Option<&str>,
    channel: Option<&str>,
    policy: &Policy,
    extra: Vec<(Option<String>, Option<String>)>,
) -> Option<String> {
    let (mut total, mut in_team, mut in_channel) = state.occupied(team, channel);
    for (t, c) in &extra {
        total += 1;
        in_team += usize::from(t.is_some() && t.as_deref() == team);
        in_channel += usize::from(c.is_some() && c.as_deref() == channel);
    }
    if state.cap("total", policy).is_some_and(|max| total >= max) {
        return Some("total".into());
    }
    if let Some(team) = team {
        let scope = format!("team:{team}");
        if state.cap(&scope, policy).is_some_and(|max| in_team >= max) {
            return Some(scope);
        }
    }
    if let Some(channel) = channel {
        let scope = format!("channel:{channel}");
        if state
            .cap(&scope, policy)
            .is_some_and(|max| in_channel >= max)
        {
            return Some(scope);
        }
    }
    None
}

/// Starts queued workspaces while capacity allows. Fair order: among the starts no cap
/// blocks, the one whose team holds the fewest slots goes first; ties go to the oldest.
fn admit_queued(state: &State, now: DateTime<Utc>, policy: &Policy) -> Vec<NewEvent> {
    let mut admitted: Vec<(Option<String>, Option<String>)> = Vec::new();
    let mut remaining: Vec<&QueuedStart> = state.queue.iter().collect();
    let mut events = Vec::new();
    loop {
        let team_load = |team: &Option<String>| {
            state.occupied(team.as_deref(), None).1
                + admitted
                    .iter()
                    .filter(|(t, _)| t.is_some() && t == team)
                    .count()
        };
        let next = remaining
            .iter()
            .enumerate()
            .filter(|(_, q)| {
                cap_reached(
                    state,
                    q.team.as_deref(),
                    q.channel.as_deref(),
                    policy,
                    admitted.clone(),
                )
                .is_none()
            })
            .min_by_key(|(i, q)| (team_load(&q.team), *i))
            .map(|(i, _)| i);
        let Some(i) = next else { break };
        let q = remaining.remove(i);
        let mut out = Decisions::new(Cause::timed(q.queued_by, q.trace.as_ref()), now);
        out.push(
            &["admit", &q.queued_by.to_string()],
            &WorkspaceStartRequested {
                workspace: q.workspace.clone(),
                reason: "admitted_from_queue".into(),
                attempt: 0,
            },
        );
        events.extend(out.events);
        admitted.push((q.team.clone(), q.channel.clone()));
    }
    events
}

fn judge_mention(
    state: &State,
    out: &mut Decisions,
    event: &RecordedEvent,
    mention: &AgentMentioned,
    policy: &Policy,
) {
    let conversation = event.metadata.correlation_id.unwrap_or(event.id);
    let window_start = event.recorded_at - policy.mention_window;
    let recent = state.mentions.get(&conversation).map_or(0, |times| {
        times.iter().filter(|t| **t > window_start).count()
    });
    let refusal = if !state.agents.contains_key(&mention.to_agent) {
        Some("unknown_agent")
    } else if access::Access::of(&state.agents[&mention.to_agent].settings)
        .and_then(|a| a.check(&mention.reply_to))
        .is_err()
    {
        // It would answer in a conversation it may not be addressed from.
        Some("not_allowed")
    } else if mention.chain.len() >= policy.mention_max_depth {
        Some("depth")
    } else if recent >= policy.mention_max_per_window {
        Some("rate")
    } else {
        None
    };
    let id = event.id.to_string();
    if let Some(reason) = refusal {
        out.push(
            &["mention_refused", &id],
            &MentionRefused {
                mention_id: event.id,
                reason: reason.into(),
                chain: mention.chain.clone(),
            },
        );
        out.push(
            &["mention_refused_notice", &id],
            &AgentReplied {
                workspace: mention.from_workspace.clone(),
                agent: "warren".into(),
                reply_to: mention.reply_to.clone(),
                text: format!(
                    "@{} asked @{}, but Warren did not pass it on ({}).",
                    mention.from_agent,
                    mention.to_agent,
                    match reason {
                        "depth" => "the chain of agents asking agents is too long",
                        "rate" => "too many agent mentions in this conversation",
                        "not_allowed" => "it is not allowed in this conversation",
                        _ => "no agent has that name",
                    }
                ),
            },
        );
        return;
    }
    route(state, out, event.id, &mention.to_agent, "agent_mention");
    let workspace = &state.agents[&mention.to_agent].workspace;
    let (team, channel) = scope(&mention.reply_to);
    wake(state, out, workspace, team, channel, policy);
}

/// A failure observed while the workspace should run: once the restarts are used up, mark it
/// failed, make sure nothing is left running, and tell every conversation waiting on it.
fn give_up_if_exhausted(
    state: &State,
    out: &mut Decisions,
    observed: &WorkspaceObserved,
    policy: &Policy,
) {
    let Some(w) = state.workspaces.get(&observed.workspace) else {
        return;
    };
    // A runtime replaced at a takeover is started again under its decision: no failure.
    if !observed.ended() || !matches!(w.phase, Phase::Starting | Phase::Ready) {
        return;
    }
    let failures = w.failures + 1;
    if failures <= policy.max_restarts {
        return; // `tick` restarts it after the backoff.
    }
    let cause = out.cause.id.to_string();
    let failed = out.push(
        &["failed", &cause],
        &WorkspaceFailed {
            workspace: w.name.clone(),
            attempts: failures,
            detail: observed.detail.clone(),
        },
    );
    out.push(
        &["stop_failed", &cause],
        &WorkspaceStopRequested {
            workspace: w.name.clone(),
            reason: "failed".into(),
        },
    );
    for (waiting, origin) in &w.waiting_origins {
        out.push(
            &["failed_notice", &cause, &waiting.to_string()],
            &AgentReplied {
                workspace: w.name.clone(),
                agent: "warren".into(),
                reply_to: origin.clone(),
                // The last error stays in the log (`workspace.failed`), not in the channel.
                text: format!(
                    "Workspace {} failed {failures} times in a row and was stopped. Send a new \
                     message to try again. (For an operator: `warren-control-plane explain \
                     {failed}`.)",
                    w.name,
                ),
            },
        );
    }
}
