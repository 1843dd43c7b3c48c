//! Given (events already in the log) / when (a new event, or time passing) / then (the
//! decisions). The `Controller` below runs decisions the way the live loop does: decide on
//! the state before the event, apply the event, apply each decision the moment it is made,
//! and skip it when the log hands it back.

use chrono::{DateTime, TimeDelta, TimeZone, Utc};
use serde_json::json;
use warren_schema::events::*;
use warren_schema::{EventId, Metadata, NewEvent, RecordedEvent};

use super::*;

const TRACE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

struct Controller {
    state: State,
    log: Vec<RecordedEvent>,
    now: DateTime<Utc>,
    policy: Policy,
}

impl Controller {
    fn new(policy: Policy) -> Self {
        Self {
            state: State::default(),
            log: Vec::new(),
            now: Utc
                .with_ymd_and_hms(2026, 11, 22, 12, 0, 0)
                .single()
                .expect("time"),
            policy,
        }
    }

    fn advance(&mut self, seconds: i64) {
        self.now += TimeDelta::seconds(seconds);
    }

    fn record(&mut self, event: NewEvent) -> RecordedEvent {
        let recorded = RecordedEvent {
            position: self.log.len() as i64 + 1,
            id: event.id,
            stream: "test".into(),
            stream_version: self.log.len() as i64 + 1,
            event_type: event.event_type,
            event_version: event.event_version,
            payload: event.payload,
            metadata: event.metadata,
            recorded_at: self.now,
        };
        self.log.push(recorded.clone());
        recorded
    }

    /// An outside fact arrives: decide, apply, record and pre-apply the decisions, then let
    /// the log hand them back. Returns the decisions.
    fn when<E: DomainEvent>(&mut self, event: E) -> Vec<NewEvent> {
        let id = EventId::random();
        let mut meta = Metadata::new("test");
        meta.traceparent = Some(TRACE.into());
        let new = NewEvent::from_domain(id, &event, meta).expect("encode");
        let recorded = self.record(new);
        self.process(&recorded)
    }

    fn process(&mut self, event: &RecordedEvent) -> Vec<NewEvent> {
        let decisions = decide(&self.state, event, self.now, &self.policy);
        self.state.apply(event);
        self.commit(&decisions);
        decisions
    }

    /// Time passes to `now`: the due decisions, recorded.
    fn tick(&mut self) -> Vec<NewEvent> {
        let decisions = tick(&self.state, self.now, &self.policy);
        self.commit(&decisions);
        decisions
    }

    fn commit(&mut self, decisions: &[NewEvent]) {
        for d in decisions {
            if self.log.iter().any(|e| e.id == d.id) {
                continue; // the log absorbs a duplicate decision
            }
            self.state.apply_own(d, self.now);
            let recorded = self.record(d.clone());
            self.state.apply(&recorded);
        }
    }

    fn given_agent(&mut self, name: &str, workspace: &str, idle_secs: u64) {
        self.when(AgentConfigured {
            name: name.into(),
            workspace: workspace.into(),
            driver: "echo".into(),
            settings: json!({}),
            idle_timeout_secs: idle_secs,
        });
    }

    fn given_agent_with(&mut self, name: &str, workspace: &str, settings: serde_json::Value) {
        self.when(AgentConfigured {
            name: name.into(),
            workspace: workspace.into(),
            driver: "echo".into(),
            settings,
            idle_timeout_secs: 600,
        });
    }

    fn given_route(&mut self, route: &str, agent: &str) {
        self.when(RouteConfigured {
            route: route.into(),
            agent: agent.into(),
        });
    }

    fn observe(&mut self, workspace: &str, phase: WorkspacePhase) -> Vec<NewEvent> {
        self.when(WorkspaceObserved {
            workspace: workspace.into(),
            phase,
            backend: "local".into(),
            instance: Some("1".into()),
            detail: Some("exit status 1".into()),
            replaced: false,
        })
    }

    /// An observation of the instance `decision` started (what the backends record).
    fn observe_instance_of(
        &mut self,
        decision: EventId,
        workspace: &str,
        phase: WorkspacePhase,
    ) -> Vec<NewEvent> {
        let observed = WorkspaceObserved {
            workspace: workspace.into(),
            phase,
            backend: "kubernetes".into(),
            instance: Some(format!("warren-{workspace}/{decision}")),
            detail: None,
            replaced: false,
        };
        let mut meta = Metadata::new("test");
        meta.causation_id = Some(decision);
        let new = NewEvent::from_domain(EventId::random(), &observed, meta).expect("encode");
        let recorded = self.record(new);
        self.process(&recorded)
    }

    fn start_decision(&self, workspace: &str) -> EventId {
        self.state.workspaces[workspace]
            .start_decision
            .expect("a start decision")
    }

    fn phase(&self, workspace: &str) -> Phase {
        self.state.workspaces[workspace].phase
    }
}

fn slack_message(channel: &str, text: &str, addressed: &[&str]) -> MessageReceived {
    slack_message_in("T1", channel, text, addressed)
}

fn slack_message_in(team: &str, channel: &str, text: &str, addressed: &[&str]) -> MessageReceived {
    MessageReceived {
        origin: Origin::Slack {
            team_id: team.into(),
            channel: channel.into(),
            thread_ts: "1.0".into(),
            ts: "1.0".into(),
            user: "U1".into(),
        },
        text: text.into(),
        addressed_agents: addressed.iter().map(|s| (*s).to_owned()).collect(),
        files: vec![],
    }
}

fn of_type<E: DomainEvent>(decisions: &[NewEvent]) -> Vec<E> {
    decisions
        .iter()
        .filter(|d| d.event_type == E::TYPE)
        .map(|d| serde_json::from_value(d.payload.clone()).expect("decode decision"))
        .collect()
}

fn types(decisions: &[NewEvent]) -> Vec<&str> {
    decisions.iter().map(|d| d.event_type.as_str()).collect()
}

fn two_agents() -> Controller {
    let mut c = Controller::new(Policy::default());
    c.given_agent("alice", "research", 600);
    c.given_agent("bob", "ops", 600);
    c.given_route("slack_channel:CGEN", "bob");
    c
}

#[test]
fn a_message_naming_an_agent_is_routed_to_it_and_wakes_its_stopped_workspace() {
    let mut c = two_agents();
    let d = c.when(slack_message("CGEN", "@alice summarise", &["alice"]));
    assert_eq!(
        types(&d),
        ["message.routed", "workspace.start_requested"],
        "route first, then wake"
    );
    let routed = &of_type::<MessageRouted>(&d)[0];
    assert_eq!(
        (routed.agent.as_str(), routed.workspace.as_str()),
        ("alice", "research")
    );
    assert_eq!(routed.reason, "mention");
    let start = &of_type::<WorkspaceStartRequested>(&d)[0];
    assert_eq!((start.workspace.as_str(), start.attempt), ("research", 0));
    assert_eq!(c.phase("research"), Phase::Starting);
}

#[test]
fn a_message_naming_no_agent_follows_its_channel_or_endpoint_route() {
    let mut c = two_agents();
    c.given_route("webhook:github", "alice");
    let d = c.when(slack_message("CGEN", "anyone?", &[]));
    assert_eq!(of_type::<MessageRouted>(&d)[0].agent, "bob");
    assert_eq!(of_type::<MessageRouted>(&d)[0].reason, "channel_route");

    let d = c.when(MessageReceived {
        origin: Origin::Webhook {
            endpoint: "github".into(),
            delivery_id: "d1".into(),
        },
        text: "issue opened".into(),
        addressed_agents: vec![],
        files: vec![],
    });
    assert_eq!(of_type::<MessageRouted>(&d)[0].agent, "alice");
    assert_eq!(of_type::<MessageRouted>(&d)[0].reason, "webhook_route");
}

#[test]
fn a_message_that_reaches_no_agent_decides_nothing() {
    let mut c = two_agents();
    assert!(c.when(slack_message("COTHER", "hello", &[])).is_empty());
    // A name that is no agent falls back to the route, not to nothing.
    let d = c.when(slack_message("CGEN", "@carol hi", &["carol"]));
    assert_eq!(of_type::<MessageRouted>(&d)[0].agent, "bob");
}

#[test]
fn a_workspace_that_is_starting_or_ready_is_never_started_again() {
    let mut c = two_agents();
    c.when(slack_message("CGEN", "@alice one", &["alice"]));
    let d = c.when(slack_message("CGEN", "@alice two", &["alice"]));
    assert_eq!(types(&d), ["message.routed"], "starting: route only");
    c.observe("research", WorkspacePhase::Ready);
    let d = c.when(slack_message("CGEN", "@alice three", &["alice"]));
    assert_eq!(types(&d), ["message.routed"], "ready: route only");
}

#[test]
fn one_message_to_two_agents_of_one_workspace_starts_it_once() {
    let mut c = two_agents();
    c.given_agent("carol", "research", 600);
    let d = c.when(slack_message("CGEN", "@alice @carol", &["alice", "carol"]));
    assert_eq!(of_type::<MessageRouted>(&d).len(), 2);
    assert_eq!(of_type::<WorkspaceStartRequested>(&d).len(), 1);
}

#[test]
fn decisions_carry_their_cause_the_conversation_and_the_trace() {
    let mut c = two_agents();
    let d = c.when(slack_message("CGEN", "@alice hi", &["alice"]));
    let message = c
        .log
        .iter()
        .rev()
        .find(|e| e.event_type == "message.received")
        .expect("msg");
    for decision in &d {
        assert_eq!(decision.metadata.causation_id, Some(message.id));
        assert_eq!(decision.metadata.correlation_id, Some(message.id));
        assert_eq!(decision.metadata.traceparent.as_deref(), Some(TRACE));
        assert_eq!(decision.metadata.source, SOURCE);
    }
}

#[test]
fn deciding_the_same_event_twice_gives_the_same_ids() {
    let c = two_agents();
    let mut meta = Metadata::new("test");
    meta.received_at = c.now;
    let event = RecordedEvent {
        position: 100,
        id: EventId::derive(&["m"]),
        stream: "s".into(),
        stream_version: 1,
        event_type: MessageReceived::TYPE.into(),
        event_version: 1,
        payload: serde_json::to_value(slack_message("CGEN", "@alice", &["alice"])).expect("json"),
        metadata: meta,
        recorded_at: c.now,
    };
    let first = decide(&c.state, &event, c.now, &c.policy);
    let second = decide(&c.state, &event, c.now + TimeDelta::seconds(5), &c.policy);
    let ids = |d: &[NewEvent]| d.iter().map(|e| e.id).collect::<Vec<_>>();
    assert_eq!(ids(&first), ids(&second));
    assert_eq!(first.len(), 2);
}

#[test]
fn an_idle_workspace_is_stopped_after_its_agents_shortest_timeout() {
    let mut c = two_agents();
    c.given_agent("carol", "research", 120);
    c.when(slack_message("CGEN", "@alice hi", &["alice"]));
    c.observe("research", WorkspacePhase::Ready);
    c.advance(119);
    assert!(c.tick().is_empty(), "not idle yet");
    c.when(AgentReplied {
        workspace: "research".into(),
        agent: "alice".into(),
        reply_to: slack_message("CGEN", "", &[]).origin,
        text: "done".into(),
    });
    c.advance(119);
    assert!(c.tick().is_empty(), "a reply is activity");
    c.advance(1);
    let d = c.tick();
    assert_eq!(of_type::<WorkspaceStopRequested>(&d)[0].reason, "idle");
    // The clock's decision carries the trace of the start it ends: the decider records it
    // in a trace of its own, linked to that one.
    assert_eq!(d[0].metadata.traceparent.as_deref(), Some(TRACE));
    assert_eq!(c.phase("research"), Phase::Stopping);
    assert!(c.tick().is_empty(), "stopping: not stopped twice");
    c.observe("research", WorkspacePhase::Exited);
    assert_eq!(c.phase("research"), Phase::Stopped);
    let d = c.when(slack_message("CGEN", "@alice again", &["alice"]));
    assert_eq!(
        of_type::<WorkspaceStartRequested>(&d).len(),
        1,
        "woken again"
    );
}

#[test]
fn a_workspace_whose_agent_is_in_a_long_turn_is_busy_not_idle() {
    let mut c = two_agents();
    c.given_agent("carol", "research", 120);
    let routed = c.when(slack_message("CGEN", "@alice a long job", &["alice"]));
    assert_eq!(of_type::<MessageRouted>(&routed)[0].agent, "alice");
    let routing_id = routed
        .iter()
        .find(|e| e.event_type == MessageRouted::TYPE)
        .map(|e| e.id)
        .expect("routed");
    c.observe("research", WorkspacePhase::Ready);
    // The turn runs for ten minutes; the runtime's heartbeat comes every 60 s.
    for minute in 1..=10 {
        c.advance(60);
        c.when(AgentBusy {
            workspace: "research".into(),
            agent: "alice".into(),
            routing_id,
            busy_for_secs: 60 * minute,
        });
        assert!(c.tick().is_empty(), "busy at minute {minute}: not idle");
    }
    // The turn ends without a word; idleness counts from the last heartbeat.
    c.advance(120);
    let d = c.tick();
    assert_eq!(of_type::<WorkspaceStopRequested>(&d)[0].reason, "idle");
}

#[test]
fn a_runtime_replaced_at_a_takeover_is_not_a_failure_to_restart() {
    let mut c = two_agents();
    c.when(slack_message("CGEN", "@alice hi", &["alice"]));
    c.observe("research", WorkspacePhase::Ready);
    // The new leader stopped the dead leader's runtime and starts it again itself. With
    // no restarts allowed, a failure would end the workspace; a replacement does not.
    c.policy.max_restarts = 0;
    let d = c.when(WorkspaceObserved {
        workspace: "research".into(),
        phase: WorkspacePhase::Gone,
        backend: "local".into(),
        instance: Some("41".into()),
        detail: Some("left by a previous control plane; stopped".into()),
        replaced: true,
    });
    assert!(
        of_type::<WorkspaceFailed>(&d).is_empty(),
        "not given up on: {d:?}"
    );
    assert_eq!(c.phase("research"), Phase::Ready);
    c.policy.max_restarts = Policy::default().max_restarts;
    // Past any backoff (not past the idle timeout).
    c.advance(120);
    let d = c.tick();
    assert!(
        of_type::<WorkspaceStartRequested>(&d).is_empty(),
        "no second start: {d:?}"
    );
    // A runtime that is gone on its own is a failure, as before.
    c.observe("research", WorkspacePhase::Gone);
    assert_eq!(c.phase("research"), Phase::BackingOff);
}

#[test]
fn a_failed_workspace_restarts_with_capped_exponential_backoff_then_gives_up_and_says_so() {
    let policy = Policy {
        max_restarts: 3,
        restart_backoff: TimeDelta::seconds(2),
        restart_backoff_max: TimeDelta::seconds(5),
        ..Policy::default()
    };
    assert_eq!(
        (1..=4)
            .map(|n| policy.backoff(n).num_seconds())
            .collect::<Vec<_>>(),
        [2, 4, 5, 5]
    );
    let mut c = Controller::new(policy);
    c.given_agent("alice", "research", 600);
    c.when(slack_message("CGEN", "@alice hi", &["alice"]));
    for (attempt, delay) in [(1, 2), (2, 4), (3, 5)] {
        assert!(c.observe("research", WorkspacePhase::Failed).is_empty());
        assert_eq!(c.phase("research"), Phase::BackingOff);
        c.advance(delay - 1);
        assert!(c.tick().is_empty(), "attempt {attempt}: backoff not over");
        c.advance(1);
        let d = c.tick();
        let start = &of_type::<WorkspaceStartRequested>(&d)[0];
        assert_eq!(
            (start.attempt, start.reason.as_str()),
            (attempt, "restart_after_failure")
        );
        assert!(c.tick().is_empty(), "one restart per failure");
    }
    let d = c.observe("research", WorkspacePhase::Failed);
    assert_eq!(
        types(&d),
        [
            "workspace.failed",
            "workspace.stop_requested",
            "agent.replied"
        ]
    );
    assert_eq!(of_type::<WorkspaceFailed>(&d)[0].attempts, 4);
    let notice = &of_type::<AgentReplied>(&d)[0];
    assert_eq!(notice.reply_to, slack_message("CGEN", "", &[]).origin);
    assert!(notice.text.contains("failed 4 times"), "{}", notice.text);
    // The error is for the operator: the channel gets the id `explain` takes, not the text.
    assert!(!notice.text.contains("exit status 1"), "{}", notice.text);
    let failed_id = d
        .iter()
        .find(|e| e.event_type == "workspace.failed")
        .expect("failed")
        .id;
    assert!(
        notice.text.contains(&format!("explain {failed_id}")),
        "{}",
        notice.text
    );
    assert_eq!(
        of_type::<WorkspaceFailed>(&d)[0].detail.as_deref(),
        Some("exit status 1"),
        "kept in the log"
    );
    c.advance(600);
    assert!(c.tick().is_empty(), "no restart after giving up");
    let d = c.when(slack_message("CGEN", "@alice try again", &["alice"]));
    assert_eq!(
        of_type::<WorkspaceStartRequested>(&d)[0].attempt,
        0,
        "new work, new start"
    );
}

#[test]
fn ready_resets_the_failure_count() {
    let mut c = two_agents();
    c.when(slack_message("CGEN", "@alice hi", &["alice"]));
    c.observe("research", WorkspacePhase::Failed);
    c.advance(2);
    c.tick();
    c.observe("research", WorkspacePhase::Ready);
    assert_eq!(c.state.workspaces["research"].failures, 0);
}

#[test]
fn an_agent_mention_is_routed_to_the_other_agent_and_wakes_its_workspace() {
    let mut c = two_agents();
    let d = c.when(AgentMentioned {
        from_workspace: "research".into(),
        from_agent: "alice".into(),
        to_agent: "bob".into(),
        text: "@bob check this".into(),
        chain: vec!["alice".into()],
        reply_to: slack_message("CGEN", "", &[]).origin,
    });
    assert_eq!(types(&d), ["message.routed", "workspace.start_requested"]);
    let routed = &of_type::<MessageRouted>(&d)[0];
    assert_eq!(
        (routed.agent.as_str(), routed.reason.as_str()),
        ("bob", "agent_mention")
    );
}

fn from_user(channel: &str, user: &str, addressed: &[&str]) -> MessageReceived {
    let mut message = slack_message(channel, "@deployer ship it", addressed);
    if let Origin::Slack { user: u, .. } = &mut message.origin {
        *u = user.into();
    }
    message
}

#[test]
fn an_agent_is_addressed_only_from_its_allowed_channels_and_users_and_no_strangers_dm() {
    let mut c = two_agents();
    c.given_agent_with(
        "deployer",
        "ops",
        json!({"access": {"channels": ["COPS"], "users": ["U0ALICE"]}}),
    );
    // Allowed: its channel, its user.
    let d = c.when(from_user("COPS", "U0ALICE", &["deployer"]));
    assert_eq!(of_type::<MessageRouted>(&d).len(), 1);
    // Refused, recorded, nothing said and nothing woken: another channel, another user.
    for (channel, user, why) in [
        ("CGEN", "U0ALICE", "channel CGEN"),
        ("COPS", "U0EVE", "user U0EVE"),
    ] {
        let d = c.when(from_user(channel, user, &["deployer"]));
        assert_eq!(types(&d), ["message.refused"], "{channel}/{user}");
        let refused = &of_type::<MessageRefused>(&d)[0];
        assert_eq!(refused.agent, "deployer");
        assert!(refused.reason.contains(why), "{}", refused.reason);
    }
    // Direct messages: its listed user may; a stranger may not.
    assert_eq!(
        of_type::<MessageRouted>(&c.when(from_user("D0A", "U0ALICE", &["deployer"]))).len(),
        1
    );
    let d = c.when(from_user("D0E", "U0EVE", &["deployer"]));
    assert_eq!(types(&d), ["message.refused"]);
    // An agent without lists: channels yes, a DM from anyone no (deny by default).
    let d = c.when(from_user("D0E", "U0EVE", &["alice"]));
    assert_eq!(types(&d), ["message.refused"]);
    assert!(
        of_type::<MessageRefused>(&d)[0]
            .reason
            .contains("direct message")
    );
    assert_eq!(
        of_type::<MessageRouted>(&c.when(from_user("CANY", "U0EVE", &["alice"]))).len(),
        1
    );
    // Mentioned by another agent into a channel it may not answer in: refused, and said.
    let mut into_general = mention(&["alice"], "deployer");
    into_general.reply_to = from_user("CGEN", "U0ALICE", &[]).origin;
    let d = c.when(into_general);
    assert_eq!(types(&d), ["mention.refused", "agent.replied"]);
    assert_eq!(of_type::<MentionRefused>(&d)[0].reason, "not_allowed");
}

fn mention(chain: &[&str], to: &str) -> AgentMentioned {
    AgentMentioned {
        from_workspace: "research".into(),
        from_agent: chain.last().copied().unwrap_or("alice").into(),
        to_agent: to.into(),
        text: "ping".into(),
        chain: chain.iter().map(|s| (*s).to_owned()).collect(),
        reply_to: slack_message("CGEN", "", &[]).origin,
    }
}

#[test]
fn a_mention_chain_past_the_depth_limit_is_refused_and_the_channel_told() {
    let mut c = Controller::new(Policy {
        mention_max_depth: 3,
        ..Policy::default()
    });
    c.given_agent("alice", "research", 600);
    c.given_agent("bob", "ops", 600);
    assert_eq!(
        of_type::<MessageRouted>(&c.when(mention(&["alice", "bob"], "alice"))).len(),
        1
    );
    let d = c.when(mention(&["alice", "bob", "alice"], "bob"));
    assert_eq!(types(&d), ["mention.refused", "agent.replied"]);
    assert_eq!(of_type::<MentionRefused>(&d)[0].reason, "depth");
    assert!(of_type::<AgentReplied>(&d)[0].text.contains("too long"));
}

#[test]
fn mentions_past_the_rate_limit_in_one_conversation_are_refused() {
    let mut c = Controller::new(Policy {
        mention_max_per_window: 3,
        mention_window: TimeDelta::seconds(60),
        ..Policy::default()
    });
    c.given_agent("alice", "research", 600);
    c.given_agent("bob", "ops", 600);
    // One conversation: every mention shares a correlation id.
    let conversation = EventId::random();
    let send = |c: &mut Controller| {
        let mut meta = Metadata::new("test");
        meta.correlation_id = Some(conversation);
        let e = NewEvent::from_domain(EventId::random(), &mention(&["alice"], "bob"), meta)
            .expect("encode");
        let recorded = c.record(e);
        c.process(&recorded)
    };
    for _ in 0..3 {
        assert_eq!(of_type::<MessageRouted>(&send(&mut c)).len(), 1);
    }
    let d = send(&mut c);
    assert_eq!(of_type::<MentionRefused>(&d)[0].reason, "rate");
    c.advance(61);
    assert_eq!(
        of_type::<MessageRouted>(&send(&mut c)).len(),
        1,
        "window passed"
    );
}

#[test]
fn a_mention_of_an_unknown_agent_is_refused() {
    let mut c = two_agents();
    let d = c.when(mention(&["alice"], "mallory"));
    assert_eq!(of_type::<MentionRefused>(&d)[0].reason, "unknown_agent");
}

#[test]
fn over_the_total_cap_work_waits_in_the_queue_and_starts_when_capacity_frees() {
    let mut c = Controller::new(Policy {
        max_running: Some(1),
        ..Policy::default()
    });
    c.given_agent("alice", "research", 60);
    c.given_agent("bob", "ops", 60);
    c.when(slack_message("C1", "@alice", &["alice"]));
    let d = c.when(slack_message("C1", "@bob", &["bob"]));
    assert_eq!(types(&d), ["message.routed", "workspace.start_queued"]);
    assert_eq!(of_type::<WorkspaceStartQueued>(&d)[0].cap, "total");
    assert_eq!(c.phase("ops"), Phase::Queued);
    assert!(c.tick().is_empty(), "no capacity yet");
    // Another message for the queued workspace neither starts nor queues it twice.
    let d = c.when(slack_message("C1", "@bob again", &["bob"]));
    assert_eq!(types(&d), ["message.routed"]);

    c.observe("research", WorkspacePhase::Ready);
    c.advance(60);
    let d = c.tick();
    assert_eq!(of_type::<WorkspaceStopRequested>(&d)[0].reason, "idle");
    assert!(
        c.tick().is_empty(),
        "a stopping workspace holds its slot until it is gone"
    );
    c.observe("research", WorkspacePhase::Exited);
    let d = c.tick();
    let start = &of_type::<WorkspaceStartRequested>(&d)[0];
    assert_eq!(
        (start.workspace.as_str(), start.reason.as_str()),
        ("ops", "admitted_from_queue")
    );
    assert!(c.state.queue.is_empty());
}

#[test]
fn queued_work_starts_in_fair_order_across_teams() {
    let mut c = Controller::new(Policy {
        max_running: Some(2),
        max_running_per_team: Some(2),
        ..Policy::default()
    });
    for (agent, workspace) in [
        ("a1", "w-a1"),
        ("a2", "w-a2"),
        ("a3", "w-a3"),
        ("b1", "w-b1"),
    ] {
        c.given_agent(agent, workspace, 600);
    }
    // Team A fills both slots, then queues another; team B queues after it.
    c.when(slack_message_in("TA", "C1", "@a1", &["a1"]));
    c.when(slack_message_in("TA", "C1", "@a2", &["a2"]));
    c.when(slack_message_in("TA", "C1", "@a3", &["a3"]));
    c.when(slack_message_in("TB", "C9", "@b1", &["b1"]));
    assert_eq!(c.state.queue.len(), 2);
    c.observe("w-a1", WorkspacePhase::Ready);
    c.when(WorkspaceStopRequested {
        workspace: "w-a1".into(),
        reason: "operator".into(),
    });
    c.observe("w-a1", WorkspacePhase::Exited);
    let d = c.tick();
    let started: Vec<String> = of_type::<WorkspaceStartRequested>(&d)
        .into_iter()
        .map(|s| s.workspace)
        .collect();
    assert_eq!(
        started,
        ["w-b1"],
        "team B holds no slot, so it goes before A's older entry"
    );
}

#[test]
fn the_per_channel_cap_queues_only_that_channel() {
    let mut c = Controller::new(Policy {
        max_running_per_channel: Some(1),
        ..Policy::default()
    });
    c.given_agent("alice", "research", 600);
    c.given_agent("bob", "ops", 600);
    c.given_agent("carol", "design", 600);
    c.when(slack_message("C1", "@alice", &["alice"]));
    let d = c.when(slack_message("C1", "@bob", &["bob"]));
    assert_eq!(of_type::<WorkspaceStartQueued>(&d)[0].cap, "channel:C1");
    // Work is never started ahead of the queue, even in another channel.
    let d = c.when(slack_message("C2", "@carol", &["carol"]));
    assert_eq!(of_type::<WorkspaceStartQueued>(&d)[0].cap, "queue");
    let d = c.tick();
    assert_eq!(
        of_type::<WorkspaceStartRequested>(&d)
            .into_iter()
            .map(|s| s.workspace)
            .collect::<Vec<_>>(),
        ["design"],
        "C2 has room: carol's workspace is admitted; bob's waits for C1"
    );
}

#[test]
fn replaying_the_log_rebuilds_the_state_the_live_controller_had() {
    let mut c = Controller::new(Policy {
        max_running: Some(1),
        ..Policy::default()
    });
    c.given_agent("alice", "research", 30);
    c.given_agent("bob", "ops", 30);
    c.given_route("slack_channel:C1", "bob");
    c.when(slack_message("C1", "@alice hi", &["alice"]));
    c.when(slack_message("C1", "hi", &[]));
    c.observe("research", WorkspacePhase::Failed);
    c.advance(2);
    c.tick();
    c.observe("research", WorkspacePhase::Ready);
    c.when(mention(&["alice"], "bob"));
    c.advance(30);
    c.tick();
    c.observe("research", WorkspacePhase::Exited);
    c.tick();

    let mut rebuilt = State::default();
    for e in &c.log {
        rebuilt.apply(e);
    }
    assert!(
        c.state.pre_applied.is_empty(),
        "every own decision came back"
    );
    assert_eq!(rebuilt, c.state);
    // And applying the log again changes nothing.
    let before = rebuilt.clone();
    for e in &c.log {
        rebuilt.apply(e);
    }
    assert_eq!(rebuilt, before);
}

#[test]
fn a_dead_lettered_message_is_reported_to_its_conversation() {
    let mut c = two_agents();
    let d = c.when(MessageDeadLettered {
        routing_id: EventId::random(),
        workspace: "research".into(),
        agent: "alice".into(),
        deliveries: 5,
        error: "POST https://llm.internal:8443/v1: 503 {\"detail\": \"/srv/keys\"}".into(),
        reply_to: Some(slack_message("CGEN", "", &[]).origin),
    });
    let dead_letter = c
        .log
        .iter()
        .rev()
        .find(|e| e.event_type == "message.dead_lettered")
        .expect("recorded")
        .id;
    let notice = &of_type::<AgentReplied>(&d)[0];
    assert_eq!(notice.agent, "warren");
    assert_eq!(notice.reply_to, slack_message("CGEN", "", &[]).origin);
    assert!(
        notice.text.contains("@alice") && notice.text.contains("5 attempts"),
        "{}",
        notice.text
    );
    // No internal detail in the channel; the id an operator gives `explain` instead (left
    // out of the check: a random id may well contain "503").
    let without_id = notice.text.replace(&dead_letter.to_string(), "");
    for internal in ["llm.internal", "/srv/keys", "503"] {
        assert!(!without_id.contains(internal), "{}", notice.text);
    }
    assert!(
        notice.text.contains(&format!("explain {dead_letter}")),
        "{}",
        notice.text
    );
    // Unreadable messages have no conversation to tell.
    let d = c.when(MessageDeadLettered {
        routing_id: EventId::random(),
        workspace: "research".into(),
        agent: "alice".into(),
        deliveries: 1,
        error: "unreadable".into(),
        reply_to: None,
    });
    assert!(d.is_empty());
}

#[test]
fn mention_history_is_forgotten_after_an_hour_of_quiet() {
    let mut c = two_agents();
    c.when(mention(&["alice"], "bob"));
    assert_eq!(c.state.mentions.len(), 1);
    c.advance(3601);
    c.when(mention(&["alice"], "bob"));
    assert_eq!(
        c.state.mentions.len(),
        1,
        "the quiet conversation was dropped"
    );
    assert_eq!(c.state.mentions.values().next().map(|t| t.len()), Some(1));
}

#[test]
fn the_end_of_an_instance_that_a_restart_replaced_changes_nothing() {
    let mut c = Controller::new(Policy {
        max_restarts: 1,
        restart_backoff: TimeDelta::seconds(2),
        ..Policy::default()
    });
    c.given_agent("alice", "research", 600);
    c.when(slack_message("CGEN", "@alice hi", &["alice"]));
    let first = c.start_decision("research");
    assert!(
        c.observe_instance_of(first, "research", WorkspacePhase::Failed)
            .is_empty()
    );
    c.advance(2);
    assert_eq!(of_type::<WorkspaceStartRequested>(&c.tick()).len(), 1);
    let second = c.start_decision("research");
    assert_ne!(first, second);

    // The failed pod is deleted to make room for the new one; its end arrives now. It is
    // the first instance's: no failure of the second, no give-up (one restart allowed).
    assert!(
        c.observe_instance_of(first, "research", WorkspacePhase::Exited)
            .is_empty()
    );
    assert_eq!(c.phase("research"), Phase::Starting);
    c.observe_instance_of(second, "research", WorkspacePhase::Ready);
    assert_eq!(c.phase("research"), Phase::Ready);
    // The second instance's own failure still counts, and uses up the restarts.
    let d = c.observe_instance_of(second, "research", WorkspacePhase::Failed);
    assert_eq!(
        of_type::<WorkspaceFailed>(&d).len(),
        0,
        "ready reset the count"
    );
}

fn operator(workspace: &str, action: &str) -> WorkspaceActionRequested {
    WorkspaceActionRequested {
        workspace: workspace.into(),
        action: action.into(),
        reason: None,
    }
}

#[test]
fn an_operator_starts_and_stops_a_workspace_and_the_decision_names_the_request() {
    let mut c = two_agents();
    let d = c.when(operator("research", "start"));
    let start = &of_type::<WorkspaceStartRequested>(&d)[0];
    assert_eq!(
        (start.workspace.as_str(), start.reason.as_str()),
        ("research", "operator")
    );
    let request = c.log[c.log.len() - 2].id;
    assert_eq!(
        d[0].metadata.causation_id,
        Some(request),
        "the request is the cause"
    );
    assert!(
        c.when(operator("research", "start")).is_empty(),
        "starting already"
    );

    c.observe("research", WorkspacePhase::Ready);
    let d = c.when(operator("research", "stop"));
    assert_eq!(of_type::<WorkspaceStopRequested>(&d)[0].reason, "operator");
    assert_eq!(c.phase("research"), Phase::Stopping);
    assert!(
        c.when(operator("research", "stop")).is_empty(),
        "stopping already"
    );
    assert!(c.when(operator("nobody-lives-here", "start")).is_empty());
    assert!(c.when(operator("research", "dance")).is_empty());
}

#[test]
fn an_operator_s_start_waits_behind_the_caps_and_a_stop_takes_it_out_of_the_queue() {
    let mut c = Controller::new(Policy {
        max_running: Some(1),
        ..Policy::default()
    });
    c.given_agent("alice", "research", 60);
    c.given_agent("bob", "ops", 60);
    c.when(operator("research", "start"));
    let d = c.when(operator("ops", "start"));
    assert_eq!(types(&d), ["workspace.start_queued"]);
    assert_eq!(c.phase("ops"), Phase::Queued);
    let d = c.when(operator("ops", "stop"));
    assert_eq!(types(&d), ["workspace.stop_requested"]);
    assert_eq!(
        c.phase("ops"),
        Phase::Stopped,
        "never started: nothing to wait for"
    );
    assert!(c.state.queue.is_empty());
    c.observe("research", WorkspacePhase::Exited);
    assert!(
        of_type::<WorkspaceStartRequested>(&c.tick()).is_empty(),
        "the stopped one is not admitted later"
    );
}

#[test]
fn recorded_quotas_override_the_flags_most_specific_first_and_fall_back_when_removed() {
    let mut c = Controller::new(Policy {
        max_running_per_team: Some(5),
        ..Policy::default()
    });
    for (agent, workspace) in [("a", "wa"), ("b", "wb"), ("c", "wc")] {
        c.given_agent(agent, workspace, 600);
    }
    c.when(QuotaSet {
        scope: "team".into(),
        max_running: Some(2),
    });
    c.when(QuotaSet {
        scope: "team:T2".into(),
        max_running: None,
    });
    c.when(slack_message_in("T1", "C1", "@a", &["a"]));
    c.when(slack_message_in("T1", "C1", "@b", &["b"]));
    let d = c.when(slack_message_in("T1", "C1", "@c", &["c"]));
    assert_eq!(
        of_type::<WorkspaceStartQueued>(&d)[0].cap,
        "team:T1",
        "the recorded default for teams (2) beats the flag (5)"
    );
    // T2 has no cap at all, whatever the default.
    let mut c2 = Controller::new(Policy::default());
    for (agent, workspace) in [("a", "wa"), ("b", "wb"), ("c", "wc")] {
        c2.given_agent(agent, workspace, 600);
    }
    c2.when(QuotaSet {
        scope: "team".into(),
        max_running: Some(1),
    });
    c2.when(QuotaSet {
        scope: "team:T2".into(),
        max_running: None,
    });
    for agent in ["a", "b", "c"] {
        let d = c2.when(slack_message_in("T2", "C9", "hi", &[agent]));
        assert!(
            of_type::<WorkspaceStartQueued>(&d).is_empty(),
            "T2 is uncapped"
        );
    }
    // Removed: back to the flag.
    c.when(QuotaRemoved {
        scope: "team".into(),
    });
    assert_eq!(c.state.cap("team:T1", &c.policy), Some(5));
    assert_eq!(c.state.cap("total", &c.policy), None);
}

#[test]
fn an_operator_s_restart_stops_the_workspace_then_starts_it_once_it_is_gone() {
    let mut c = two_agents();
    c.when(operator("research", "start"));
    c.observe("research", WorkspacePhase::Ready);
    let first = c.start_decision("research");
    let d = c.when(operator("research", "restart"));
    assert_eq!(of_type::<WorkspaceStopRequested>(&d)[0].reason, "restart");
    assert_eq!(c.phase("research"), Phase::Stopping);
    assert!(
        c.tick().is_empty(),
        "nothing until the old instance is gone"
    );
    let d = c.observe("research", WorkspacePhase::Exited);
    let start = &of_type::<WorkspaceStartRequested>(&d)[0];
    assert_eq!(
        (start.workspace.as_str(), start.reason.as_str()),
        ("research", "restart")
    );
    assert_eq!(c.phase("research"), Phase::Starting);
    assert_ne!(
        c.start_decision("research"),
        first,
        "a new start decision: a new instance"
    );
    assert!(!c.state.workspaces["research"].restart_pending);
    // An idle stop is not a restart: gone stays gone.
    c.observe("research", WorkspacePhase::Ready);
    c.advance(3600);
    c.tick();
    let d = c.observe("research", WorkspacePhase::Exited);
    assert!(of_type::<WorkspaceStartRequested>(&d).is_empty());
    // Restarting a stopped workspace starts it.
    let d = c.when(operator("research", "restart"));
    assert_eq!(of_type::<WorkspaceStartRequested>(&d)[0].reason, "operator");
}

#[test]
fn a_deleted_workspace_is_stopped_then_forgotten_and_a_stopped_one_at_once() {
    let mut c = two_agents();
    c.when(operator("research", "start"));
    c.observe("research", WorkspacePhase::Ready);
    let d = c.when(operator("research", "delete"));
    assert_eq!(of_type::<WorkspaceStopRequested>(&d)[0].reason, "delete");
    assert_eq!(
        c.phase("research"),
        Phase::Stopping,
        "still there until gone"
    );
    c.observe("research", WorkspacePhase::Gone);
    assert!(
        !c.state.workspaces.contains_key("research"),
        "forgotten once its instance is gone"
    );

    // Stopped already: forgotten at once, with no decision.
    c.when(operator("ops", "start"));
    c.observe("ops", WorkspacePhase::Ready);
    c.when(operator("ops", "stop"));
    c.observe("ops", WorkspacePhase::Exited);
    assert!(c.when(operator("ops", "delete")).is_empty());
    assert!(!c.state.workspaces.contains_key("ops"));

    // Queued: taken out of the queue and forgotten.
    let mut c = Controller::new(Policy {
        max_running: Some(1),
        ..Policy::default()
    });
    c.given_agent("alice", "research", 60);
    c.given_agent("bob", "ops", 60);
    c.when(operator("research", "start"));
    c.when(operator("ops", "start"));
    assert_eq!(c.phase("ops"), Phase::Queued);
    c.when(operator("ops", "delete"));
    assert!(!c.state.workspaces.contains_key("ops"));
    assert!(c.state.queue.is_empty());
}
