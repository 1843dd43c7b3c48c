//! The `/warren` slash command. Pure: parses a verified form body into what to do.
//!
//! - `/warren status`: answered at once (ephemeral) with the log's position.
//! - `/warren ask AGENT TEXT`: stored as a `message.received` addressed to AGENT, keyed by
//!   Slack's `trigger_id` (unique per invocation), and acknowledged at once; the agent's
//!   reply is posted in the channel.
//! - anything else: the usage text.
//!
//! `response_url` is a 30-minute capability to post into the channel; it is never stored in
//! the log, which is kept forever and readable by operators.

use serde::Deserialize;
use warren_schema::events::{MessageReceived, Origin};
use warren_schema::{EventId, Metadata, NewEvent};

pub const USAGE: &str = "Usage: `/warren status` or `/warren ask AGENT QUESTION`";

#[derive(Debug, Deserialize)]
struct Form {
    team_id: String,
    channel_id: String,
    user_id: String,
    #[serde(default)]
    text: String,
    trigger_id: String,
}

/// What a command asks for.
#[derive(Debug, PartialEq)]
pub enum Command {
    Status,
    Ask {
        agent: String,
        stream: String,
        event: Box<NewEvent>,
    },
    Usage,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("malformed slash command: {0}")]
pub struct Malformed(pub String);

pub fn parse(body: &[u8], traceparent: Option<String>) -> Result<Command, Malformed> {
    let form: Form = serde_urlencoded::from_bytes(body).map_err(|e| Malformed(e.to_string()))?;
    let mut words = form.text.split_whitespace();
    match words.next() {
        Some("status") => Ok(Command::Status),
        Some("ask") => {
            let Some(agent) = words
                .next()
                .map(|a| a.trim_start_matches('@').to_ascii_lowercase())
            else {
                return Ok(Command::Usage);
            };
            let question = words.collect::<Vec<_>>().join(" ");
            if agent.is_empty() || question.is_empty() {
                return Ok(Command::Usage);
            }
            let id = EventId::derive(&["slack-command", &form.team_id, &form.trigger_id]);
            let mut meta = Metadata::new("gateway/slack-command");
            meta.traceparent = traceparent;
            meta.actor = Some(form.user_id.clone());
            meta.correlation_id = Some(id);
            let message = MessageReceived {
                origin: Origin::SlackCommand {
                    team_id: form.team_id.clone(),
                    channel: form.channel_id.clone(),
                    user: form.user_id,
                },
                text: question,
                addressed_agents: vec![agent.clone()],
                files: Vec::new(),
            };
            let event =
                NewEvent::from_domain(id, &message, meta).map_err(|e| Malformed(e.to_string()))?;
            Ok(Command::Ask {
                agent,
                stream: format!("slack:{}:{}", form.team_id, form.channel_id),
                event: Box::new(event),
            })
        }
        _ => Ok(Command::Usage),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(text: &str) -> Vec<u8> {
        serde_urlencoded::to_string([
            ("token", "legacy"),
            ("team_id", "T1"),
            ("channel_id", "C1"),
            ("user_id", "U1"),
            ("command", "/warren"),
            ("text", text),
            (
                "response_url",
                "https://hooks.slack.com/commands/T1/1/secret",
            ),
            ("trigger_id", "13345224609.738474920.8088930838d88f008e0"),
        ])
        .expect("form")
        .into_bytes()
    }

    #[test]
    fn ask_addresses_the_agent_and_keeps_no_response_url() {
        let Command::Ask {
            agent,
            stream,
            event,
        } = parse(&form("ask @Alice why is CI red?"), None).expect("ok")
        else {
            panic!("expected ask")
        };
        assert_eq!((agent.as_str(), stream.as_str()), ("alice", "slack:T1:C1"));
        let msg: MessageReceived = serde_json::from_value(event.payload.clone()).expect("msg");
        assert_eq!(msg.text, "why is CI red?");
        assert_eq!(msg.addressed_agents, vec!["alice"]);
        assert!(!event.payload.to_string().contains("hooks.slack.com"));
        // The same invocation (same trigger_id) is the same event.
        let Command::Ask { event: again, .. } =
            parse(&form("ask @Alice why is CI red?"), None).expect("ok")
        else {
            panic!("expected ask")
        };
        assert_eq!(event.id, again.id);
    }

    #[test]
    fn status_usage_and_malformed() {
        assert_eq!(parse(&form("status"), None), Ok(Command::Status));
        assert_eq!(parse(&form(""), None), Ok(Command::Usage));
        assert_eq!(parse(&form("ask alice"), None), Ok(Command::Usage));
        assert_eq!(parse(&form("dance"), None), Ok(Command::Usage));
        assert!(parse(b"text=status", None).is_err(), "fields missing");
    }
}
