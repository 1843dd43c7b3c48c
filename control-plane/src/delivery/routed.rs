//! What the control plane recorded about one routed message. It is the only source of an
//! agent's conversation context: the inbox message is built from it, and whatever an agent
//! sends back in answer (reply, mention, dead letter, heartbeat) is checked against it and
//! takes its origin, conversation and mention chain from it, never from what the workspace
//! says ([`authorize`]).

use warren_schema::events::{
    AgentMentioned, DomainEvent, FileRef, MessageReceived, MessageRouted, Origin,
};
use warren_schema::nats::{InboxMessage, OutboxMessage};
use warren_schema::{EventId, EventLog, RecordedEvent};

use crate::error::Result;

/// A `message.routed` decision with the message it routed, as the agent's inbox gets it:
/// the control plane's own record of what the agent is answering.
pub type Routed = InboxMessage;

/// From the decision and the event it routed (`message.received` or `agent.mentioned`);
/// `None` when the routed event is of another type. Pure.
pub fn from_events(routed: &RecordedEvent, source: &RecordedEvent) -> Result<Option<Routed>> {
    let r: MessageRouted = routed.decode()?;
    let (text, reply_to, chain, files) = match source.event_type.as_str() {
        MessageReceived::TYPE => {
            let m: MessageReceived = source.decode()?;
            // The workspace gets names, never Slack's URLs: it fetches the bytes from the
            // control plane ([`super::files`]).
            let files = m
                .files
                .into_iter()
                .map(|f| FileRef { url: None, ..f })
                .collect();
            (m.text, m.origin, Vec::new(), files)
        }
        AgentMentioned::TYPE => {
            let m: AgentMentioned = source.decode()?;
            (m.text, m.reply_to, m.chain, Vec::new())
        }
        _ => return Ok(None),
    };
    Ok(Some(InboxMessage {
        routing_id: routed.id,
        message_id: r.message_id,
        workspace: r.workspace,
        agent: r.agent,
        text,
        reply_to,
        chain,
        correlation_id: routed.metadata.correlation_id,
        files,
    }))
}

/// The routing decision `routing_id` and its message, from the log (`None`: no such
/// decision).
pub async fn load(log: &EventLog, routing_id: EventId) -> Result<Option<Routed>> {
    let Some(routed) = log.get(routing_id).await? else {
        return Ok(None);
    };
    if routed.event_type != MessageRouted::TYPE {
        return Ok(None);
    }
    let message_id = routed.decode::<MessageRouted>()?.message_id;
    let Some(source) = log.get(message_id).await? else {
        return Ok(None);
    };
    from_events(&routed, &source)
}

/// The context an output is recorded with, all of it from the control plane's record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trusted {
    /// The routing decision answered (the output's cause), if it answers one.
    pub routing_id: Option<EventId>,
    pub reply_to: Option<Origin>,
    pub correlation_id: Option<EventId>,
    /// A mention's chain: the routed message's chain and the mentioning agent.
    pub chain: Vec<String>,
}

/// The routing decision an output says it answers (a memory write answers none).
pub fn answers(out: &OutboxMessage) -> Option<EventId> {
    match out {
        OutboxMessage::Reply { in_reply_to, .. }
        | OutboxMessage::Mention { in_reply_to, .. }
        | OutboxMessage::DeadLettered { in_reply_to, .. }
        | OutboxMessage::TurnCompleted { in_reply_to, .. }
        | OutboxMessage::Heartbeat { in_reply_to, .. } => Some(*in_reply_to),
        OutboxMessage::MemoryWritten { .. } => None,
    }
}

/// The output's kind, as `output.refused` names it.
pub fn kind(out: &OutboxMessage) -> &'static str {
    match out {
        OutboxMessage::Reply { .. } => "reply",
        OutboxMessage::Mention { .. } => "mention",
        OutboxMessage::DeadLettered { .. } => "dead_lettered",
        OutboxMessage::Heartbeat { .. } => "heartbeat",
        OutboxMessage::TurnCompleted { .. } => "turn_completed",
        OutboxMessage::MemoryWritten { .. } => "memory_written",
    }
}

/// Whether `out` may be recorded, and with what context. `routed` is the control plane's
/// record of the message `out` says it answers ([`answers`]), `None` if there is none. An
/// answer must answer a message routed to that very agent of that very workspace; its
/// origin, conversation and chain are then the routed message's, whatever it claims. Pure.
pub fn authorize(out: &OutboxMessage, routed: Option<&Routed>) -> Result<Trusted, String> {
    let Some(claimed) = answers(out) else {
        // A memory write answers no message; its bucket and agent are checked elsewhere
        // (`Namespace::check_outbox`, `SenderCheck`), and its conversation is not used to
        // route, bill or post anything.
        let correlation_id = match out {
            OutboxMessage::MemoryWritten { correlation_id, .. } => *correlation_id,
            _ => None,
        };
        return Ok(Trusted {
            routing_id: None,
            reply_to: None,
            correlation_id,
            chain: Vec::new(),
        });
    };
    let Some(routed) = routed else {
        return Err(format!("{claimed} is not a message Warren routed"));
    };
    let (workspace, agent) = (out.workspace(), out.agent());
    if routed.workspace != workspace || routed.agent != agent {
        return Err(format!(
            "the message was routed to {}/{}, not {workspace}/{agent}",
            routed.workspace, routed.agent
        ));
    }
    let mut chain = routed.chain.clone();
    if matches!(out, OutboxMessage::Mention { .. }) {
        chain.push(agent.to_owned());
    }
    Ok(Trusted {
        routing_id: Some(routed.routing_id),
        reply_to: Some(routed.reply_to.clone()),
        correlation_id: routed.correlation_id,
        chain,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin(channel: &str) -> Origin {
        Origin::Slack {
            team_id: "T1".into(),
            channel: channel.into(),
            thread_ts: "1.0".into(),
            ts: "1.0".into(),
            user: "U1".into(),
        }
    }

    fn routed_to_alice() -> Routed {
        Routed {
            routing_id: EventId::derive(&["routed"]),
            message_id: EventId::derive(&["message"]),
            workspace: "research".into(),
            agent: "alice".into(),
            text: "@alice ask bob".into(),
            reply_to: origin("C1"),
            chain: vec!["carol".into()],
            correlation_id: Some(EventId::derive(&["conversation"])),
            files: vec![],
        }
    }

    fn reply(agent: &str, in_reply_to: EventId) -> OutboxMessage {
        OutboxMessage::Reply {
            id: "1".into(),
            in_reply_to,
            workspace: "research".into(),
            agent: agent.into(),
            reply_to: origin("C-GENERAL"),
            text: "hi".into(),
            correlation_id: Some(EventId::random()),
        }
    }

    #[test]
    fn an_answer_goes_where_the_message_came_from_whatever_it_claims() {
        let routed = routed_to_alice();
        let trusted = authorize(&reply("alice", routed.routing_id), Some(&routed)).expect("ok");
        assert_eq!(trusted.reply_to, Some(origin("C1")), "not C-GENERAL");
        assert_eq!(trusted.correlation_id, routed.correlation_id);
        assert_eq!(trusted.routing_id, Some(routed.routing_id));
    }

    #[test]
    fn a_mention_carries_the_recorded_chain_not_the_claimed_one() {
        let routed = routed_to_alice();
        let mention = OutboxMessage::Mention {
            id: "m".into(),
            in_reply_to: routed.routing_id,
            workspace: "research".into(),
            from_agent: "alice".into(),
            to_agent: "bob".into(),
            text: "@bob".into(),
            chain: vec![],
            reply_to: origin("C-GENERAL"),
            correlation_id: None,
        };
        let trusted = authorize(&mention, Some(&routed)).expect("ok");
        assert_eq!(trusted.chain, ["carol", "alice"]);
        assert_eq!(trusted.reply_to, Some(origin("C1")));
        assert_eq!(trusted.correlation_id, routed.correlation_id);
    }

    #[test]
    fn an_answer_to_a_message_not_routed_to_that_agent_is_refused() {
        let routed = routed_to_alice();
        let e = authorize(&reply("carol", routed.routing_id), Some(&routed)).expect_err("carol");
        assert!(e.contains("research/alice"), "{e}");
        let mut other_workspace = routed.clone();
        other_workspace.workspace = "ops".into();
        assert!(authorize(&reply("alice", routed.routing_id), Some(&other_workspace)).is_err());
        let e = authorize(&reply("alice", EventId::random()), None).expect_err("unknown");
        assert!(e.contains("not a message Warren routed"), "{e}");
    }
}
