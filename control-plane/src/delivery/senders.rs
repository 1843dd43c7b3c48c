//! Who may speak for a workspace.
//!
//! The outbox subject proves which workspace sent an output
//! ([`Namespace::check_outbox`](warren_schema::nats::Namespace::check_outbox)): only that
//! workspace's credentials may publish there. The agent an output names is only a claim.
//! It is recorded only if the configuration places that agent in that workspace. Otherwise
//! a workspace could post as another workspace's agent, or as a name nobody configured
//! (`warren`, the control plane's own voice, included).

use std::collections::BTreeMap;
use std::ops::Bound;

use warren_schema::events::{AgentConfigured, AgentRemoved, DomainEvent};
use warren_schema::nats::{AgentInfo, OutboxMessage};
use warren_schema::{EventLog, RecordedEvent};

use crate::config_file::CONFIG_STREAM;
use crate::error::Result;

/// Each configured agent's workspace, folded from the configuration events.
#[derive(Debug, Default, Clone)]
pub struct Senders {
    /// Agent → workspace, in name order (the directory pages by name).
    agents: BTreeMap<String, String>,
}

impl Senders {
    /// Applies one configuration event (others are ignored). In log order, the last word on
    /// an agent wins: configured again elsewhere, it moved; removed, it may not speak.
    pub fn apply(&mut self, event: &RecordedEvent) {
        match event.event_type.as_str() {
            AgentConfigured::TYPE => {
                if let Ok(a) = event.decode::<AgentConfigured>() {
                    self.agents.insert(a.name, a.workspace);
                }
            }
            AgentRemoved::TYPE => {
                if let Ok(a) = event.decode::<AgentRemoved>() {
                    self.agents.remove(&a.name);
                }
            }
            _ => {}
        }
    }

    /// Whether `out`'s agent is one of its workspace's agents.
    pub fn check(&self, out: &OutboxMessage) -> Result<(), String> {
        self.check_agent(out.workspace(), out.agent())
    }

    /// Whether `agent` is one of `workspace`'s agents.
    pub fn check_agent(&self, workspace: &str, agent: &str) -> Result<(), String> {
        match self.agents.get(agent) {
            Some(w) if w == workspace => Ok(()),
            Some(w) => Err(format!(
                "workspace {workspace:?} spoke as agent {agent:?}, who lives in {w:?}"
            )),
            None => Err(format!(
                "workspace {workspace:?} spoke as {agent:?}, which is not a configured agent"
            )),
        }
    }

    /// Up to `limit` agents after `after` (from the first when `None`), in name order, and
    /// the name to continue after when more follow.
    pub fn page(&self, after: Option<&str>, limit: usize) -> (Vec<AgentInfo>, Option<String>) {
        let start = after.map_or(Bound::Unbounded, Bound::Excluded);
        let mut agents: Vec<AgentInfo> = self
            .agents
            .range::<str, _>((start, Bound::Unbounded))
            .take(limit.saturating_add(1))
            .map(|(name, workspace)| AgentInfo {
                name: name.clone(),
                workspace: workspace.clone(),
            })
            .collect();
        let next = if agents.len() > limit {
            agents.truncate(limit);
            agents.last().map(|a| a.name.clone())
        } else {
            None
        };
        (agents, next)
    }
}

/// [`Senders`] kept up with the configuration stream: read once, then read on from where it
/// left off whenever an output does not pass, so an agent configured a moment ago is never
/// refused for a stale copy. Passing outputs cost nothing; a refused one costs one indexed
/// read of the configuration stream.
#[derive(Debug, Default)]
pub struct SenderCheck {
    senders: Senders,
    /// Version of [`CONFIG_STREAM`] folded so far.
    version: i64,
}

impl SenderCheck {
    pub async fn check(
        &mut self,
        log: &EventLog,
        out: &OutboxMessage,
    ) -> Result<Result<(), String>> {
        self.check_agent(log, out.workspace(), out.agent()).await
    }

    /// Whether `agent` lives in `workspace`, by the configuration as recorded now.
    pub async fn check_agent(
        &mut self,
        log: &EventLog,
        workspace: &str,
        agent: &str,
    ) -> Result<Result<(), String>> {
        if self.senders.check_agent(workspace, agent).is_ok() {
            return Ok(Ok(()));
        }
        self.catch_up(log).await?;
        Ok(self.senders.check_agent(workspace, agent))
    }

    /// A page of the directory ([`Senders::page`]) by the configuration as recorded now.
    pub async fn page(
        &mut self,
        log: &EventLog,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<AgentInfo>, Option<String>)> {
        self.catch_up(log).await?;
        Ok(self.senders.page(after, limit))
    }

    async fn catch_up(&mut self, log: &EventLog) -> Result<()> {
        const PAGE: i64 = 1000;
        loop {
            let events = log
                .read_stream(CONFIG_STREAM, self.version + 1, PAGE)
                .await?;
            for event in &events {
                self.senders.apply(event);
                self.version = event.stream_version;
            }
            if (events.len() as i64) < PAGE {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use chrono::Utc;
    use warren_schema::events::Origin;
    use warren_schema::{EventId, Metadata, NewEvent};

    use super::*;

    fn recorded<E: DomainEvent>(position: i64, event: &E) -> RecordedEvent {
        let new =
            NewEvent::from_domain(EventId::random(), event, Metadata::new("test")).expect("e");
        RecordedEvent {
            position,
            id: new.id,
            stream: CONFIG_STREAM.into(),
            stream_version: position,
            event_type: new.event_type,
            event_version: new.event_version,
            payload: new.payload,
            metadata: new.metadata,
            recorded_at: Utc::now(),
        }
    }

    fn configured(name: &str, workspace: &str) -> AgentConfigured {
        AgentConfigured {
            name: name.into(),
            workspace: workspace.into(),
            driver: "echo".into(),
            settings: serde_json::json!({}),
            idle_timeout_secs: 60,
        }
    }

    fn reply(workspace: &str, agent: &str) -> OutboxMessage {
        OutboxMessage::Reply {
            id: "r".into(),
            in_reply_to: EventId::random(),
            workspace: workspace.into(),
            agent: agent.into(),
            reply_to: Origin::Webhook {
                endpoint: "ci".into(),
                delivery_id: "1".into(),
            },
            text: "hi".into(),
            correlation_id: None,
        }
    }

    fn senders(events: &[RecordedEvent]) -> Senders {
        let mut s = Senders::default();
        events.iter().for_each(|e| s.apply(e));
        s
    }

    #[test]
    fn an_agent_speaks_for_its_own_workspace_only() {
        let s = senders(&[
            recorded(1, &configured("alice", "research")),
            recorded(2, &configured("bob", "ops")),
        ]);
        assert_eq!(s.check(&reply("research", "alice")), Ok(()));
        let err = s
            .check(&reply("research", "bob"))
            .expect_err("bob lives in ops");
        assert!(err.contains("\"ops\""), "{err}");
        let err = s
            .check(&reply("research", "warren"))
            .expect_err("not an agent");
        assert!(err.contains("not a configured agent"), "{err}");
    }

    #[test]
    fn the_last_configuration_wins() {
        let moved = senders(&[
            recorded(1, &configured("alice", "research")),
            recorded(2, &configured("alice", "ops")),
        ]);
        assert!(moved.check(&reply("research", "alice")).is_err());
        assert_eq!(moved.check(&reply("ops", "alice")), Ok(()));
        let removed = senders(&[
            recorded(1, &configured("alice", "research")),
            recorded(
                2,
                &AgentRemoved {
                    name: "alice".into(),
                },
            ),
        ]);
        assert!(removed.check(&reply("research", "alice")).is_err());
    }

    #[test]
    fn a_mention_is_checked_by_who_asks() {
        let s = senders(&[recorded(1, &configured("alice", "research"))]);
        let mention = |from: &str| OutboxMessage::Mention {
            id: "m".into(),
            in_reply_to: EventId::random(),
            workspace: "research".into(),
            from_agent: from.into(),
            to_agent: "bob".into(),
            text: "hi".into(),
            chain: vec![],
            reply_to: Origin::Webhook {
                endpoint: "ci".into(),
                delivery_id: "1".into(),
            },
            correlation_id: None,
        };
        assert_eq!(s.check(&mention("alice")), Ok(()));
        assert!(s.check(&mention("mallory")).is_err());
    }

    #[test]
    fn the_directory_pages_by_name_and_shows_the_last_word_on_each_agent() {
        let s = senders(&[
            recorded(1, &configured("carol", "ops")),
            recorded(2, &configured("alice", "research")),
            recorded(3, &configured("bob", "ops")),
            recorded(4, &configured("alice", "lab")),
            recorded(5, &configured("dave", "ops")),
            recorded(6, &AgentRemoved { name: "bob".into() }),
        ]);
        let names = |page: &[AgentInfo]| page.iter().map(|a| a.name.clone()).collect::<Vec<_>>();
        let (first, next) = s.page(None, 2);
        assert_eq!(names(&first), ["alice", "carol"]);
        assert_eq!(first[0].workspace, "lab", "moved: the last configuration");
        assert_eq!(next.as_deref(), Some("carol"));
        let (second, next) = s.page(next.as_deref(), 2);
        assert_eq!(names(&second), ["dave"]);
        assert_eq!(next, None, "nothing follows");
        let (exact, next) = s.page(None, 3);
        assert_eq!(
            (exact.len(), next),
            (3, None),
            "a full last page has no next"
        );
        let (after_gone, _) = s.page(Some("bob"), 10);
        assert_eq!(
            names(&after_gone),
            ["carol", "dave"],
            "after a removed name"
        );
        assert!(s.page(None, 0).0.is_empty());
    }
}
