//! What the decisions need to know, folded from the log: agents, routes, workspaces and the
//! admission queue. [`State::apply`] is pure and total: any event, in log order, any number
//! of times (an event already applied is skipped by position), so the state after a replay
//! from position 0 is the state the live controller had.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use chrono::{DateTime, Utc};
use serde_json::Value;
use warren_schema::events::*;
use warren_schema::{EventId, NewEvent, RecordedEvent};

/// The reason of an operator's restart's stop (and of its start).
pub const RESTART: &str = "restart";

/// The reason of the stop of a workspace an operator deleted.
pub const DELETE: &str = "delete";

/// Mention times kept per conversation (more than any sane rate limit counts).
const MENTION_HISTORY: usize = 256;
/// Mentions older than this are forgotten (far beyond any rate window), so a long-running
/// controller does not keep every conversation it ever saw.
const MENTION_RETENTION: chrono::TimeDelta = chrono::TimeDelta::hours(1);
/// Conversations remembered per workspace for failure notices.
const WAITING_HISTORY: usize = 16;

/// An agent as configured.
#[derive(Debug, Clone, PartialEq)]
pub struct Agent {
    pub name: String,
    pub workspace: String,
    pub driver: String,
    pub settings: Value,
    pub idle_timeout_secs: u64,
}

/// Where a workspace is in its life, as far as the log says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Not running (never started, stopped, exited or gone).
    Stopped,
    /// Waiting for admission (`workspace.start_queued`).
    Queued,
    /// A start was decided; the backend has not reported it ready yet.
    Starting,
    Ready,
    /// A stop was decided; the backend has not reported it gone yet.
    Stopping,
    /// A failure was observed; a restart is due after a backoff (see `Policy`).
    BackingOff,
    /// Gave up after repeated failures (`workspace.failed`); new work starts it again.
    Failed,
}

impl Phase {
    pub const ALL: [Self; 7] = [
        Self::Stopped,
        Self::Queued,
        Self::Starting,
        Self::Ready,
        Self::Stopping,
        Self::BackingOff,
        Self::Failed,
    ];

    /// Its name in metrics and logs (`backing_off`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Stopped => "stopped",
            Self::Queued => "queued",
            Self::Starting => "starting",
            Self::Ready => "ready",
            Self::Stopping => "stopping",
            Self::BackingOff => "backing_off",
            Self::Failed => "failed",
        }
    }

    /// Whether the workspace holds (or is about to hold) a runtime slot. A stopping one still
    /// does until the backend reports it gone.
    pub fn occupies_slot(self) -> bool {
        matches!(
            self,
            Self::Starting | Self::Ready | Self::BackingOff | Self::Stopping
        )
    }
}

/// A workspace, as the decisions see it.
#[derive(Debug, Clone, PartialEq)]
pub struct Workspace {
    pub name: String,
    pub phase: Phase,
    /// Last message routed to it, reply or heartbeat from it, or readiness: what idleness
    /// counts from.
    pub last_activity: DateTime<Utc>,
    /// The event that set `last_activity` (the cause of an idle stop).
    pub last_activity_event: EventId,
    /// The start decision in force (each start, restart or admission is a new one). The
    /// reconciler acts on each once, so a process that exits before its exit is in the log
    /// is not started again behind the decisions' back.
    pub start_decision: Option<EventId>,
    /// The trace of the start decision (its `traceparent`: the message's trace), which the
    /// reconcile and the backend's calls for it join.
    pub start_trace: Option<String>,
    /// The trace of the stop decision in force, which the reconcile of the stop joins.
    pub stop_trace: Option<String>,
    /// Failed starts since it was last ready.
    pub failures: u32,
    /// When the last failure was observed (phase `BackingOff`; the restart is due a
    /// policy-given backoff later).
    pub failed_at: Option<DateTime<Utc>>,
    /// The failure observation: the cause of the restart.
    pub failure_event: Option<EventId>,
    /// What the backend said about the last failure.
    pub failure_detail: Option<String>,
    /// Team and channel of the work that woke it (admission scopes).
    pub team: Option<String>,
    pub channel: Option<String>,
    /// Where the conversations that woke it reply (told when it fails for good).
    pub waiting_origins: Vec<(EventId, Origin)>,
    /// An operator's restart is under way: stopped for it, to be started once gone.
    pub restart_pending: bool,
    /// An operator deleted it while it ran: stopped for it, forgotten once gone.
    pub delete_pending: bool,
}

/// A start held back by an admission cap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedStart {
    pub workspace: String,
    pub team: Option<String>,
    pub channel: Option<String>,
    /// The `workspace.start_queued` event: the cause of the eventual start.
    pub queued_by: EventId,
    /// Its trace (the message's that woke the workspace), which the admission links to.
    pub trace: Option<String>,
}

/// Everything the decisions read.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct State {
    pub agents: BTreeMap<String, Agent>,
    /// Route key → agent.
    pub routes: BTreeMap<String, String>,
    pub workspaces: BTreeMap<String, Workspace>,
    /// Starts waiting for capacity, oldest first.
    pub queue: VecDeque<QueuedStart>,
    /// Recent agent mentions per conversation (correlation id), for the rate limit.
    pub mentions: BTreeMap<EventId, VecDeque<DateTime<Utc>>>,
    /// Admission quotas recorded as events, by scope (`total`, `team`, `channel`,
    /// `team:{id}`, `channel:{id}`); `None` is "no cap". They override the policy's caps.
    pub quotas: BTreeMap<String, Option<usize>>,
    /// Highest position applied.
    pub position: i64,
    /// Decisions applied the moment they were made ([`State::apply_own`]); each is skipped
    /// once when it comes back from the log.
    pub pre_applied: BTreeSet<EventId>,
}

impl State {
    /// The cap on `scope` in force: the most specific quota recorded (`team:T1`, then
    /// `team`), else the policy's flag. `scope` is `total`, `team:{id}` or `channel:{id}`.
    pub fn cap(&self, scope: &str, policy: &super::Policy) -> Option<usize> {
        if let Some(q) = self.quotas.get(scope) {
            return *q;
        }
        let kind = scope.split_once(':').map_or(scope, |(kind, _)| kind);
        if let Some(q) = self.quotas.get(kind) {
            return *q;
        }
        match kind {
            "total" => policy.max_running,
            "team" => policy.max_running_per_team,
            "channel" => policy.max_running_per_channel,
            _ => None,
        }
    }

    /// Folds one event in. Events at or below [`State::position`] are ignored, so a batch
    /// re-read after a restart changes nothing. Unknown types and undecodable payloads are
    /// skipped: the log outlives this build.
    pub fn apply(&mut self, event: &RecordedEvent) {
        if event.position <= self.position {
            return;
        }
        self.position = event.position;
        if !self.pre_applied.remove(&event.id) {
            self.fold(event);
        }
    }

    /// Applies a decision the controller just recorded, before the log hands it back, so the
    /// events read in between are judged with it (a second message for a starting workspace
    /// must not start it again). `recorded_at` is when it was committed.
    pub fn apply_own(&mut self, decision: &NewEvent, recorded_at: DateTime<Utc>) {
        if self.pre_applied.contains(&decision.id) {
            return;
        }
        self.apply_unrecorded(decision, recorded_at);
        self.pre_applied.insert(decision.id);
    }

    /// Folds a decision that will never come back from the log (a what-if replay's own):
    /// unlike [`State::apply_own`], nothing is kept to skip it later.
    pub fn apply_unrecorded(&mut self, decision: &NewEvent, at: DateTime<Utc>) {
        self.fold(&RecordedEvent {
            position: self.position,
            id: decision.id,
            stream: String::new(),
            stream_version: 0,
            event_type: decision.event_type.clone(),
            event_version: decision.event_version,
            payload: decision.payload.clone(),
            metadata: decision.metadata.clone(),
            recorded_at: at,
        });
    }

    fn fold(&mut self, event: &RecordedEvent) {
        let at = event.recorded_at;
        match event.event_type.as_str() {
            AgentConfigured::TYPE => {
                if let Ok(a) = event.decode::<AgentConfigured>() {
                    self.agents.insert(
                        a.name.clone(),
                        Agent {
                            name: a.name,
                            workspace: a.workspace,
                            driver: a.driver,
                            settings: a.settings,
                            idle_timeout_secs: a.idle_timeout_secs,
                        },
                    );
                }
            }
            AgentRemoved::TYPE => {
                if let Ok(a) = event.decode::<AgentRemoved>() {
                    self.agents.remove(&a.name);
                }
            }
            RouteConfigured::TYPE => {
                if let Ok(r) = event.decode::<RouteConfigured>() {
                    self.routes.insert(r.route, r.agent);
                }
            }
            RouteRemoved::TYPE => {
                if let Ok(r) = event.decode::<RouteRemoved>() {
                    self.routes.remove(&r.route);
                }
            }
            QuotaSet::TYPE => {
                if let Ok(q) = event.decode::<QuotaSet>() {
                    let max = q
                        .max_running
                        .map(|m| usize::try_from(m).unwrap_or(usize::MAX));
                    self.quotas.insert(q.scope, max);
                }
            }
            QuotaRemoved::TYPE => {
                if let Ok(q) = event.decode::<QuotaRemoved>() {
                    self.quotas.remove(&q.scope);
                }
            }
            MessageRouted::TYPE => {
                if let Ok(r) = event.decode::<MessageRouted>() {
                    let w = self.workspace_mut(&r.workspace, at, event.id);
                    w.last_activity = at;
                    w.last_activity_event = event.id;
                }
            }
            WorkspaceStartQueued::TYPE => {
                if let Ok(q) = event.decode::<WorkspaceStartQueued>() {
                    let w = self.workspace_mut(&q.workspace, at, event.id);
                    w.phase = Phase::Queued;
                    w.team.clone_from(&q.team);
                    w.channel.clone_from(&q.channel);
                    if !self.queue.iter().any(|e| e.workspace == q.workspace) {
                        self.queue.push_back(QueuedStart {
                            workspace: q.workspace,
                            team: q.team,
                            channel: q.channel,
                            queued_by: event.id,
                            trace: event.metadata.traceparent.clone(),
                        });
                    }
                }
            }
            WorkspaceStartRequested::TYPE => {
                if let Ok(s) = event.decode::<WorkspaceStartRequested>() {
                    self.queue.retain(|q| q.workspace != s.workspace);
                    let w = self.workspace_mut(&s.workspace, at, event.id);
                    w.phase = Phase::Starting;
                    w.start_decision = Some(event.id);
                    w.start_trace = event.metadata.traceparent.clone();
                    w.failed_at = None;
                    w.restart_pending = false;
                    w.delete_pending = false;
                    if s.attempt == 0 {
                        w.failures = 0;
                    }
                }
            }
            WorkspaceStopRequested::TYPE => {
                if let Ok(s) = event.decode::<WorkspaceStopRequested>() {
                    self.queue.retain(|q| q.workspace != s.workspace);
                    let w = self.workspace_mut(&s.workspace, at, event.id);
                    w.stop_trace = event.metadata.traceparent.clone();
                    match w.phase {
                        Phase::Failed => {}
                        // Never started: nothing to wait for.
                        Phase::Queued => w.phase = Phase::Stopped,
                        _ => w.phase = Phase::Stopping,
                    }
                    w.restart_pending = s.reason == RESTART;
                    w.failed_at = None;
                    self.forget_if_deleted(&s.workspace);
                }
            }
            WorkspaceActionRequested::TYPE => {
                if let Ok(request) = event.decode::<WorkspaceActionRequested>()
                    && request.action == DELETE
                    && let Some(w) = self.workspaces.get_mut(&request.workspace)
                {
                    // Stopped or failed: gone now. Otherwise the stop decided for the
                    // request (or the one under way) ends it.
                    w.delete_pending = true;
                    if matches!(w.phase, Phase::Stopped | Phase::Failed) {
                        self.forget_if_deleted(&request.workspace);
                    }
                }
            }
            WorkspaceFailed::TYPE => {
                if let Ok(f) = event.decode::<WorkspaceFailed>() {
                    let w = self.workspace_mut(&f.workspace, at, event.id);
                    w.phase = Phase::Failed;
                    w.failed_at = None;
                    w.waiting_origins.clear();
                }
            }
            WorkspaceObserved::TYPE => {
                if let Ok(o) = event.decode::<WorkspaceObserved>() {
                    self.observe(&o, event, at);
                }
            }
            AgentBusy::TYPE => {
                if let Ok(b) = event.decode::<AgentBusy>()
                    && let Some(w) = self.workspaces.get_mut(&b.workspace)
                {
                    w.last_activity = at;
                    w.last_activity_event = event.id;
                }
            }
            AgentReplied::TYPE => {
                if let Ok(r) = event.decode::<AgentReplied>()
                    && let Some(w) = self.workspaces.get_mut(&r.workspace)
                {
                    w.last_activity = at;
                    w.last_activity_event = event.id;
                    w.waiting_origins.clear();
                }
            }
            MessageReceived::TYPE => {
                if let Ok(m) = event.decode::<MessageReceived>() {
                    for (agent, _) in super::route_targets(self, &m) {
                        self.note_waiting(&agent, event.id, &m.origin, at);
                    }
                }
            }
            AgentMentioned::TYPE => {
                let conversation = event.metadata.correlation_id.unwrap_or(event.id);
                // Forget conversations quiet for longer than the retention. Deterministic
                // (log times only), so a replay forgets the same ones.
                self.mentions.retain(|_, times| {
                    times
                        .back()
                        .is_some_and(|last| at - *last < MENTION_RETENTION)
                });
                let recent = self.mentions.entry(conversation).or_default();
                recent.push_back(at);
                // Only the rate window matters; keep the list short.
                while recent.len() > MENTION_HISTORY {
                    recent.pop_front();
                }
                if let Ok(m) = event.decode::<AgentMentioned>() {
                    self.note_waiting(&m.to_agent, event.id, &m.reply_to, at);
                }
            }
            _ => {}
        }
    }

    /// Whether `event` (an observation of `workspace`) is about an instance an earlier start
    /// decision made: its cause is a start decision that is no longer in force. The end of
    /// a pod that a restart replaced says nothing about the new one.
    pub fn is_stale_observation(&self, workspace: &str, event: &RecordedEvent) -> bool {
        let current = self
            .workspaces
            .get(workspace)
            .and_then(|w| w.start_decision);
        matches!((event.metadata.causation_id, current), (Some(cause), Some(current)) if cause != current)
    }

    fn observe(&mut self, o: &WorkspaceObserved, event: &RecordedEvent, at: DateTime<Utc>) {
        if self.is_stale_observation(&o.workspace, event) {
            return;
        }
        let w = self.workspace_mut(&o.workspace, at, event.id);
        match (o.phase, w.phase) {
            (WorkspacePhase::Starting, _) => {}
            (WorkspacePhase::Ready, Phase::Starting | Phase::BackingOff) => {
                w.phase = Phase::Ready;
                w.failures = 0;
                w.last_activity = at;
                w.last_activity_event = event.id;
            }
            // Ready after a stop was decided or a give-up: the reconciler will stop it.
            (WorkspacePhase::Ready, _) => {}
            (WorkspacePhase::Exited | WorkspacePhase::Gone, Phase::Stopping) => {
                w.phase = Phase::Stopped;
                self.forget_if_deleted(&o.workspace);
            }
            // It stopped without being asked to: back off, then restart (or give up). One
            // stopped by a control plane that took over is started again by it under the
            // start decision in force: the start's observations follow, nothing to decide.
            (_, Phase::Starting | Phase::Ready) if o.ended() => {
                w.phase = Phase::BackingOff;
                w.failures += 1;
                w.failed_at = Some(at);
                w.failure_event = Some(event.id);
                w.failure_detail.clone_from(&o.detail);
            }
            _ => {}
        }
    }

    /// Drops a workspace an operator deleted once it has stopped: it leaves the state (and
    /// the read models, the admin API's lists), and nothing of it is queued.
    fn forget_if_deleted(&mut self, workspace: &str) {
        if self
            .workspaces
            .get(workspace)
            .is_some_and(|w| w.delete_pending && matches!(w.phase, Phase::Stopped | Phase::Failed))
        {
            self.workspaces.remove(workspace);
            self.queue.retain(|q| q.workspace != workspace);
        }
    }

    /// Remembers that work for `agent` waits, and where its conversation replies.
    fn note_waiting(&mut self, agent: &str, id: EventId, origin: &Origin, at: DateTime<Utc>) {
        let Some(workspace) = self.agents.get(agent).map(|a| a.workspace.clone()) else {
            return;
        };
        let w = self.workspace_mut(&workspace, at, id);
        if !w.phase.occupies_slot() {
            // The work that wakes a workspace decides which admission scopes it counts in.
            let (team, channel) = super::scope(origin);
            w.team = team.map(str::to_owned);
            w.channel = channel.map(str::to_owned);
        }
        if !w.waiting_origins.iter().any(|(_, o)| o == origin) {
            w.waiting_origins.push((id, origin.clone()));
            if w.waiting_origins.len() > WAITING_HISTORY {
                w.waiting_origins.remove(0);
            }
        }
    }

    fn workspace_mut(&mut self, name: &str, at: DateTime<Utc>, by: EventId) -> &mut Workspace {
        self.workspaces
            .entry(name.to_owned())
            .or_insert_with(|| Workspace {
                name: name.to_owned(),
                phase: Phase::Stopped,
                last_activity: at,
                last_activity_event: by,
                start_decision: None,
                start_trace: None,
                stop_trace: None,
                failures: 0,
                failed_at: None,
                failure_event: None,
                failure_detail: None,
                team: None,
                channel: None,
                waiting_origins: Vec::new(),
                restart_pending: false,
                delete_pending: false,
            })
    }

    /// Workspaces holding a runtime slot, overall and for `team` / `channel`.
    pub fn occupied(&self, team: Option<&str>, channel: Option<&str>) -> (usize, usize, usize) {
        let mut counts = (0, 0, 0);
        for w in self.workspaces.values().filter(|w| w.phase.occupies_slot()) {
            counts.0 += 1;
            if team.is_some() && w.team.as_deref() == team {
                counts.1 += 1;
            }
            if channel.is_some() && w.channel.as_deref() == channel {
                counts.2 += 1;
            }
        }
        counts
    }
}
