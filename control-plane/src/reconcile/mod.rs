//! Reconcile: make the runtime match the decisions.
//!
//! [`plan`] (pure) compares what the decisions want (from the [`State`]) with what the
//! backend runs and returns the actions; [`Reconciler`] performs them through a
//! [`Backend`](crate::backend::Backend) and records what the backend reports (started,
//! ready, exited, failed, gone) as `workspace.observed` events, which come back through the
//! log into the state. Running it twice does nothing the second time: a workspace that
//! runs is not started again, one that is gone is not stopped again.

use std::collections::{BTreeMap, BTreeSet};

use futures_util::StreamExt;
use tracing::{Instrument, info, info_span, instrument, warn};
use warren_schema::events::{WorkspaceObserved, WorkspacePhase};
use warren_schema::{AppendRequest, EventId, EventLog, Metadata, NewEvent};

use warren_schema::launch::AgentLaunch;

pub mod nats;

/// Start and stop actions carried out at once, at most. More than a backend's own limit on
/// calls in flight, so that its budget (not this) paces a backlog.
pub const MAX_ACTIONS_IN_FLIGHT: usize = 256;

use crate::backend::{Backend, Observation, WorkspaceSpec};
use crate::decide::{Phase, State};
use crate::error::Result;

/// What to do to one workspace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Start(WorkspaceSpec),
    /// Stop the workspace; `trace` is the stop decision's `traceparent` (none for an
    /// instance no decision wants, found running or ended).
    Stop {
        workspace: String,
        trace: Option<String>,
    },
}

impl Action {
    /// Stop `workspace`, in the trace of the stop decision `state` holds for it (if any).
    fn stop(state: &State, workspace: &str) -> Self {
        Self::Stop {
            workspace: workspace.to_owned(),
            trace: state
                .workspaces
                .get(workspace)
                .and_then(|w| w.stop_trace.clone()),
        }
    }

    /// The workspace it acts on.
    pub fn workspace(&self) -> &str {
        match self {
            Self::Start(spec) => &spec.name,
            Self::Stop { workspace, .. } => workspace,
        }
    }
}

/// Whether a decision explains `workspace`'s instance: the log knows the workspace and has
/// not stopped it (a stop of one it does not explain deletes an orphan). Pure.
pub fn decision_explains(state: &State, workspace: &str) -> bool {
    state
        .workspaces
        .get(workspace)
        .is_some_and(|w| w.phase != Phase::Stopped)
}

/// Whether the decisions want `phase` to have a running process.
pub fn wants_running(phase: Phase) -> bool {
    matches!(phase, Phase::Starting | Phase::Ready)
}

/// The actions that bring `running` (what the backend has) to what `state` wants. Pure.
/// `acted` holds, per workspace, the start decision already acted on: a process that came
/// and went under that decision is not started again until the decisions say so (they
/// see its exit and decide a restart, or give up).
pub fn plan(state: &State, present: &Present, acted: &BTreeMap<String, EventId>) -> Vec<Action> {
    let running = &present.running;
    let mut actions = Vec::new();
    // Agents by workspace, gathered once: a filter per workspace is quadratic, and a plan
    // of 10,000 starts would scan 10^8 agents.
    let mut hosted: Option<BTreeMap<&str, Vec<AgentLaunch>>> = None;
    for w in state.workspaces.values() {
        let already = w.start_decision.is_some() && acted.get(&w.name) == w.start_decision.as_ref();
        if wants_running(w.phase) && !running.contains(&w.name) && !already {
            let hosted = hosted.get_or_insert_with(|| {
                let mut by_workspace = BTreeMap::<&str, Vec<AgentLaunch>>::new();
                for a in state.agents.values() {
                    by_workspace
                        .entry(a.workspace.as_str())
                        .or_default()
                        .push(AgentLaunch::new(&a.name, &a.driver, a.settings.clone()));
                }
                by_workspace
            });
            actions.push(Action::Start(WorkspaceSpec {
                name: w.name.clone(),
                agents: hosted.remove(w.name.as_str()).unwrap_or_default(),
                tuning: warren_schema::launch::Tuning::default(),
                decision: w.start_decision,
                traceparent: w.start_trace.clone(),
            }));
        }
    }
    for name in running {
        let wanted = state
            .workspaces
            .get(name)
            .is_some_and(|w| wants_running(w.phase));
        if !wanted {
            actions.push(Action::stop(state, name));
        }
    }
    // An ended instance is kept while a decision may still explain it (a failed pod stays
    // for `kubectl logs` until the restart replaces it); one of a workspace no decision
    // wants is removed, whatever state it ended in.
    for name in present.ended.difference(running) {
        let explained = state
            .workspaces
            .get(name)
            .is_some_and(|w| !matches!(w.phase, Phase::Stopped | Phase::Stopping));
        if !explained {
            actions.push(Action::stop(state, name));
        }
    }
    actions
}

/// What the backend has, by workspace.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Present {
    /// With a live process.
    pub running: BTreeSet<String>,
    /// Ended, but kept (a failed pod stays for inspection).
    pub ended: BTreeSet<String>,
}

/// Observations drained from a backend and not yet recorded: given back when dropped.
struct Unrecorded<'a, B: Backend> {
    backend: &'a B,
    observations: Vec<Observation>,
    /// How many of them, from the first, are in the log.
    recorded: usize,
}

impl<B: Backend> Drop for Unrecorded<'_, B> {
    fn drop(&mut self) {
        if self.recorded < self.observations.len() {
            let left = self.observations.split_off(self.recorded);
            warn!(
                observations = left.len(),
                "observations not recorded; given back to the backend"
            );
            self.backend.return_observations(left);
        }
    }
}

/// Observations recorded in one transaction, at most.
pub const OBSERVATIONS_PER_COMMIT: usize = 500;

/// Reconciles until `stop`: against the latest desired state whenever it changes, and
/// after the backend's observations are recorded. Runs as a task of its own beside the
/// decisions, which hand it their state over `desired`; a database error ends it (and with
/// it the leadership).
///
/// Recording and reconciling run side by side: a long pass (a backlog of thousands of
/// starts, paced by the API budget) does not hold the observations back, and recording a
/// burst of observations does not hold the starts back.
pub async fn run<B: Backend>(
    reconciler: Reconciler<B>,
    mut desired: tokio::sync::watch::Receiver<std::sync::Arc<State>>,
    stop: tokio_util::sync::CancellationToken,
) -> Result<()> {
    reconciler.record_observations().await?;
    let recorded = tokio::sync::Notify::new();
    let recording = async {
        loop {
            reconciler.backend().observed().notified().await;
            if reconciler.record_observations().await? > 0 {
                recorded.notify_one();
            }
        }
    };
    let reconciling = async {
        // Actions in flight, by workspace: a pass never waits for the previous one's calls
        // (a slow API call delays its own workspace only), and never acts twice at once on
        // one workspace.
        let mut acting = futures_util::stream::FuturesUnordered::new();
        let mut busy: BTreeSet<String> = BTreeSet::new();
        // The rest of the last plan, waiting for room in flight, with what each action
        // needs of the state taken at plan time (whether a decision explains a stop's
        // instance): an action holding the whole state would keep a copy alive per plan it
        // came from, 5 MB each at 10,000 workspaces.
        let mut queued: std::collections::VecDeque<(Action, bool)> = Default::default();
        let mut replan = true;
        // A planned action found its workspace busy: plan again once that ends.
        let mut held_back = false;
        loop {
            if replan {
                let state = std::sync::Arc::clone(&desired.borrow_and_update());
                queued = reconciler
                    .plan_now(&state)
                    .await
                    .into_iter()
                    .map(|action| {
                        let explained = decision_explains(&state, action.workspace());
                        (action, explained)
                    })
                    .collect();
                replan = false;
                held_back = false;
            }
            // Fill the room in flight from the plan. Not a new plan per action that ends:
            // with a backlog of 10,000 starts that was a plan over every workspace for each
            // pod made.
            while acting.len() < MAX_ACTIONS_IN_FLIGHT {
                let Some((action, explained)) = queued.pop_front() else {
                    break;
                };
                let name = action.workspace().to_owned();
                if !busy.insert(name.clone()) {
                    held_back = true;
                    continue;
                }
                let reconciler = &reconciler;
                acting.push(async move { (name, reconciler.act(action, explained).await) });
            }
            tokio::select! {
                changed = desired.changed() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                    replan = true;
                }
                () = recorded.notified() => replan = true,
                Some((name, done)) = acting.next(), if !acting.is_empty() => {
                    done?;
                    busy.remove(&name);
                    if held_back && queued.is_empty() {
                        replan = true;
                    }
                }
            }
        }
    };
    // Stopping does not wait for a slow call to end (what a stopped leader left half done,
    // the next one plans again).
    tokio::select! {
        () = stop.cancelled() => Ok(()),
        done = recording => done,
        done = reconciling => done,
    }
}

/// Performs plans and records observations.
#[derive(Debug)]
pub struct Reconciler<B> {
    backend: B,
    log: EventLog,
    /// Start decision acted on, per workspace.
    acted: std::sync::Mutex<BTreeMap<String, EventId>>,
    /// Makes each workspace's bucket and inbox consumers before it starts.
    nats: Option<nats::NatsResources>,
}

impl<B: Backend> Reconciler<B> {
    pub fn new(backend: B, log: EventLog) -> Self {
        Self {
            backend,
            log,
            acted: Default::default(),
            nats: None,
        }
    }

    /// Prepares each workspace's NATS resources before starting it (see [`nats`]).
    pub fn with_nats(mut self, resources: nats::NatsResources) -> Self {
        self.nats = Some(resources);
        self
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// What to do now: `state` against what the backend runs and what was acted on.
    #[instrument(skip_all, fields(actions))]
    pub async fn plan_now(&self, state: &State) -> Vec<Action> {
        let present = Present {
            running: self.backend.running().await.into_iter().collect(),
            ended: self.backend.ended().await.into_iter().collect(),
        };
        let acted = self.acted.lock().map(|a| a.clone()).unwrap_or_default();
        let actions = plan(state, &present, &acted);
        tracing::Span::current().record("actions", actions.len());
        actions
    }

    /// Carries out `action`; `explained`: whether a decision explains the workspace's
    /// instance ([`decision_explains`]), for a stop.
    async fn act(&self, action: Action, explained: bool) -> Result<()> {
        match action {
            Action::Start(spec) => {
                // In the trace of the message that caused the start decision.
                let span = info_span!(
                    "reconcile.start",
                    workspace = %spec.name,
                    decision = ?spec.decision,
                    backend = self.backend.name(),
                );
                if let Some(parent) = &spec.traceparent {
                    warren_telemetry::set_parent_from_traceparent(&span, parent);
                }
                self.start(spec).instrument(span).await
            }
            Action::Stop { workspace, trace } => {
                // In the trace of the stop decision (an idle stop's own, linked to the work
                // it ends).
                let span = info_span!("reconcile.stop", %workspace);
                if let Some(parent) = &trace {
                    warren_telemetry::set_parent_from_traceparent(&span, parent);
                }
                self.stop(&workspace, explained).instrument(span).await
            }
        }
    }

    async fn start(&self, spec: WorkspaceSpec) -> Result<()> {
        info!(workspace = %spec.name, agents = ?spec.agents, "starting workspace");
        if let (Ok(mut acted), Some(decision)) = (self.acted.lock(), spec.decision) {
            acted.insert(spec.name.clone(), decision);
        }
        // Its NATS resources first, then its process.
        let prepared = match &self.nats {
            Some(resources) => resources.prepare(&spec).await.map_err(|e| e.to_string()),
            None => Ok(()),
        };
        let started = match prepared {
            Ok(()) => self.backend.start(&spec).await.map_err(|e| e.to_string()),
            Err(e) => Err(e),
        };
        if let Err(detail) = started {
            warn!(workspace = %spec.name, error = %detail, "start failed");
            metrics::counter!("warren_control_plane_reconcile_errors_total", "action" => "start")
                .increment(1);
            // One failure per start decision (a retry of the same one is absorbed).
            self.record(Observation {
                workspace: spec.name.clone(),
                phase: WorkspacePhase::Failed,
                instance: None,
                detail: Some(detail),
                replaced: false,
                decision: spec.decision,
            })
            .await?;
        }
        Ok(())
    }

    /// Stops `name`'s instance. One no decision explains is an orphan, left by a crash or
    /// by hand: it is deleted, and that is recorded so that `explain` shows why it went.
    async fn stop(&self, name: &str, explained: bool) -> Result<()> {
        info!(workspace = %name, explained, "stopping workspace");
        if let Err(e) = self.backend.stop(name).await {
            warn!(workspace = %name, error = %e, "stop failed");
            metrics::counter!("warren_control_plane_reconcile_errors_total", "action" => "stop")
                .increment(1);
        } else if !explained {
            self.record(Observation {
                workspace: name.to_owned(),
                phase: WorkspacePhase::Gone,
                instance: None,
                detail: Some("orphan: no decision wants it running; deleted".into()),
                replaced: false,
                decision: None,
            })
            .await?;
        }
        Ok(())
    }

    /// Records what the backend reported since the last call: in one transaction per
    /// [`OBSERVATIONS_PER_COMMIT`], each workspace's in the order seen. Under a backlog
    /// thousands arrive at once; a transaction each would be as many commits, and as many
    /// writers in flight that the decisions' subscription must wait to settle.
    ///
    /// What is not recorded goes back to the backend, whether an append fails or this
    /// future is dropped mid-way (the leadership ended): the next leader records it.
    pub async fn record_observations(&self) -> Result<usize> {
        let mut pending = Unrecorded {
            backend: &self.backend,
            observations: self.backend.drain_observations(),
            recorded: 0,
        };
        let n = pending.observations.len();
        while pending.recorded < n {
            let end = n.min(pending.recorded + OBSERVATIONS_PER_COMMIT);
            let chunk = &pending.observations[pending.recorded..end];
            let mut by_workspace: BTreeMap<&str, Vec<NewEvent>> = BTreeMap::new();
            for o in chunk {
                by_workspace
                    .entry(o.workspace.as_str())
                    .or_default()
                    .push(self.observed(o)?);
            }
            let requests: Vec<AppendRequest> = by_workspace
                .into_iter()
                .map(|(workspace, events)| {
                    AppendRequest::new(format!("workspace:{workspace}"), events)
                })
                .collect();
            let refs: Vec<&AppendRequest> = requests.iter().collect();
            for outcome in self.log.append_all(&refs).await? {
                outcome?;
            }
            pending.recorded = end;
        }
        Ok(n)
    }

    /// Records `o` at once (an orphan deleted, a start that failed).
    async fn record(&self, o: Observation) -> Result<()> {
        let event = self.observed(&o)?;
        self.log
            .append(&AppendRequest::new(
                format!("workspace:{}", o.workspace),
                vec![event],
            ))
            .await?;
        Ok(())
    }

    /// `o` as `workspace.observed`, caused by the start decision of its instance. One
    /// event per (instance, phase, detail, decision): a re-report is absorbed.
    fn observed(&self, o: &Observation) -> Result<NewEvent> {
        let phase_name = serde_json::to_value(o.phase)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        let cause = o.decision.map(|d| d.to_string());
        let mut key = vec![
            "observed",
            o.workspace.as_str(),
            o.instance.as_deref().unwrap_or("-"),
            &phase_name,
            o.detail.as_deref().unwrap_or(""),
        ];
        key.extend(cause.as_deref());
        let event = WorkspaceObserved {
            workspace: o.workspace.clone(),
            phase: o.phase,
            backend: self.backend.name().to_owned(),
            instance: o.instance.clone(),
            detail: o.detail.clone(),
            replaced: o.replaced,
        };
        let mut meta = Metadata::new("control-plane.reconcile");
        meta.causation_id = o.decision;
        meta.actor = Some(self.backend.name().to_owned());
        Ok(NewEvent::from_domain(EventId::derive(&key), &event, meta)
            .map_err(|e| warren_schema::Error::InvalidEvent(e.to_string()))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::{Agent, Workspace};
    use chrono::Utc;

    fn stop(workspace: &str) -> Action {
        Action::Stop {
            workspace: workspace.into(),
            trace: None,
        }
    }

    fn state(phases: &[(&str, Phase)]) -> State {
        let mut s = State::default();
        for (name, phase) in phases {
            s.workspaces.insert(
                (*name).to_owned(),
                Workspace {
                    name: (*name).to_owned(),
                    phase: *phase,
                    last_activity: Utc::now(),
                    last_activity_event: EventId::random(),
                    start_decision: Some(EventId::derive(&["start", name])),
                    start_trace: None,
                    stop_trace: None,
                    failures: 0,
                    failed_at: None,
                    failure_event: None,
                    failure_detail: None,
                    team: None,
                    channel: None,
                    waiting_origins: vec![],
                    restart_pending: false,
                    delete_pending: false,
                },
            );
            s.agents.insert(
                format!("agent-{name}"),
                Agent {
                    name: format!("agent-{name}"),
                    workspace: (*name).to_owned(),
                    driver: "echo".into(),
                    settings: serde_json::json!({}),
                    idle_timeout_secs: 60,
                },
            );
        }
        s
    }

    fn names(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|n| (*n).to_owned()).collect()
    }

    fn running(running: &[&str]) -> Present {
        Present {
            running: names(running),
            ended: BTreeSet::new(),
        }
    }

    #[test]
    fn starts_what_should_run_and_stops_what_should_not() {
        let s = state(&[
            ("a", Phase::Starting),
            ("b", Phase::Ready),
            ("c", Phase::Stopping),
            ("d", Phase::BackingOff),
            ("e", Phase::Queued),
        ]);
        let actions = plan(&s, &running(&["b", "c", "d", "zombie"]), &BTreeMap::new());
        assert_eq!(
            actions,
            vec![
                Action::Start(WorkspaceSpec {
                    name: "a".into(),
                    agents: vec![AgentLaunch::new("agent-a", "echo", serde_json::json!({}))],
                    tuning: Default::default(),
                    decision: Some(EventId::derive(&["start", "a"])),
                    traceparent: None,
                }),
                stop("c"),
                stop("d"),
                stop("zombie"),
            ]
        );
    }

    #[test]
    fn a_second_pass_over_the_result_does_nothing() {
        let s = state(&[("a", Phase::Starting), ("c", Phase::Stopping)]);
        let after_first_pass = running(&["a"]);
        assert!(plan(&s, &after_first_pass, &BTreeMap::new()).is_empty());
    }

    #[test]
    fn a_process_that_exited_is_not_restarted_before_the_decisions_say_so() {
        let s = state(&[("a", Phase::Starting)]);
        let acted = BTreeMap::from([("a".to_owned(), EventId::derive(&["start", "a"]))]);
        assert!(
            plan(&s, &running(&[]), &acted).is_empty(),
            "same start decision"
        );
        let older = BTreeMap::from([("a".to_owned(), EventId::derive(&["start", "old"]))]);
        assert_eq!(
            plan(&s, &running(&[]), &older).len(),
            1,
            "a new start decision"
        );
    }

    #[test]
    fn an_ended_instance_is_kept_only_while_a_decision_explains_it() {
        let s = state(&[
            ("failed", Phase::Failed),
            ("backing-off", Phase::BackingOff),
            ("stopped", Phase::Stopped),
            ("stopping", Phase::Stopping),
        ]);
        let present = Present {
            running: BTreeSet::new(),
            ended: names(&["failed", "backing-off", "stopped", "stopping", "stray"]),
        };
        assert_eq!(
            plan(&s, &present, &BTreeMap::new()),
            vec![stop("stopped"), stop("stopping"), stop("stray"),]
        );
    }

    #[test]
    fn each_start_hosts_its_own_workspaces_agents_and_no_others() {
        let mut s = state(&[
            ("a", Phase::Starting),
            ("b", Phase::Starting),
            ("c", Phase::Ready),
        ]);
        let mut second = s.agents["agent-a"].clone();
        second.name = "agent-a2".into();
        s.agents.insert(second.name.clone(), second);
        let hosted: Vec<(String, Vec<String>)> = plan(&s, &running(&["c"]), &BTreeMap::new())
            .into_iter()
            .filter_map(|a| match a {
                Action::Start(spec) => {
                    Some((spec.name, spec.agents.into_iter().map(|a| a.name).collect()))
                }
                Action::Stop { .. } => None,
            })
            .collect();
        assert_eq!(
            hosted,
            [
                (
                    "a".to_owned(),
                    vec!["agent-a".to_owned(), "agent-a2".to_owned()]
                ),
                ("b".to_owned(), vec!["agent-b".to_owned()]),
            ]
        );
    }

    #[test]
    fn only_a_workspace_the_log_has_not_stopped_explains_its_instance() {
        let s = state(&[
            ("ready", Phase::Ready),
            ("stopping", Phase::Stopping),
            ("failed", Phase::Failed),
            ("stopped", Phase::Stopped),
        ]);
        assert!(decision_explains(&s, "ready"));
        assert!(decision_explains(&s, "stopping"));
        assert!(decision_explains(&s, "failed"));
        assert!(!decision_explains(&s, "stopped"));
        assert!(
            !decision_explains(&s, "stray"),
            "unknown to the log: an orphan"
        );
    }
}
