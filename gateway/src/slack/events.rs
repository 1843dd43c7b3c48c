//! Slack Events API payloads → what Warren stores. Pure: no I/O.
//!
//! Identity rules, chosen so that Slack's duplicates collapse:
//! - The raw delivery is keyed by `team_id` + `event_id`: Slack's retries of one delivery
//!   (same `event_id`, `X-Slack-Retry-Num`) store one row.
//! - The normalised message is keyed by team + channel + message `ts`. Slack sends *two*
//!   deliveries, with different `event_id`s, for one message that @-mentions the app
//!   (`message` and `app_mention`) when the app subscribes to both. They become one
//!   `message.received`.

use serde::Deserialize;
use serde_json::Value;
use warren_schema::events::{FileRef, MessageReceived, Origin, SlackEventReceived};
use warren_schema::{EventId, Metadata, NewEvent};

/// What a verified body asks the gateway to do.
#[derive(Debug, PartialEq)]
pub enum Inbound {
    /// `url_verification`: answer with the challenge.
    Challenge(String),
    /// An event to store: its stream and events (raw first, then the normalised message if
    /// the event is a message addressed to Warren).
    Store {
        stream: String,
        events: Vec<NewEvent>,
    },
    /// Nothing to store (the app's own messages, other bots, edits): answer 200 so Slack
    /// does not retry.
    Ignore(&'static str),
}

/// A body that is not a Slack Events API payload Warren understands.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("malformed Slack event: {0}")]
pub struct Malformed(pub String);

#[derive(Deserialize)]
struct Envelope {
    #[serde(rename = "type")]
    kind: String,
    challenge: Option<String>,
    team_id: Option<String>,
    event_id: Option<String>,
    event_time: Option<i64>,
    event: Option<Value>,
    #[serde(default)]
    authorizations: Vec<Authorization>,
}

#[derive(Deserialize)]
struct Authorization {
    user_id: Option<String>,
}

#[derive(Deserialize)]
struct SlackMessage {
    #[serde(rename = "type")]
    kind: String,
    subtype: Option<String>,
    channel: Option<String>,
    user: Option<String>,
    bot_id: Option<String>,
    #[serde(default)]
    text: String,
    ts: Option<String>,
    thread_ts: Option<String>,
    #[serde(default)]
    files: Vec<SlackFile>,
}

#[derive(Deserialize)]
struct SlackFile {
    id: String,
    name: Option<String>,
    mimetype: Option<String>,
    url_private: Option<String>,
    /// The same file with `Content-Disposition: attachment`: what a download should fetch.
    url_private_download: Option<String>,
    size: Option<u64>,
}

/// Message subtypes that are a person saying something; every other subtype (edits,
/// deletions, joins, bot_message) is not a new message for an agent.
const MESSAGE_SUBTYPES: &[&str] = &["file_share", "thread_broadcast"];

/// Parses a verified body. `traceparent` is the request's trace context.
pub fn parse(body: &[u8], traceparent: Option<String>) -> Result<Inbound, Malformed> {
    // Parsed once: the typed view is read from the same value that is stored.
    let body: Value =
        serde_json::from_slice(body).map_err(|e| Malformed(format!("not JSON: {e}")))?;
    let envelope =
        Envelope::deserialize(&body).map_err(|e| Malformed(format!("not an event: {e}")))?;
    match envelope.kind.as_str() {
        "url_verification" => envelope
            .challenge
            .map(Inbound::Challenge)
            .ok_or_else(|| Malformed("url_verification without challenge".into())),
        "event_callback" => event_callback(envelope, body, traceparent),
        // Slack says it is dropping this app's events for a while. A 200 keeps the
        // subscription; anything else and Slack would disable it.
        "app_rate_limited" => {
            tracing::warn!("Slack reports app_rate_limited: events are being dropped");
            Ok(Inbound::Ignore("app_rate_limited"))
        }
        other => Err(Malformed(format!("unsupported type {other:?}"))),
    }
}

fn event_callback(
    envelope: Envelope,
    body: Value,
    traceparent: Option<String>,
) -> Result<Inbound, Malformed> {
    let team_id = envelope
        .team_id
        .ok_or_else(|| Malformed("event_callback without team_id".into()))?;
    let event_id = envelope
        .event_id
        .ok_or_else(|| Malformed("event_callback without event_id".into()))?;
    let event = envelope
        .event
        .ok_or_else(|| Malformed("event_callback without event".into()))?;
    let app_user = envelope
        .authorizations
        .first()
        .and_then(|a| a.user_id.clone());

    let message = SlackMessage::deserialize(&event)
        .map_err(|e| Malformed(format!("unreadable event: {e}")))?;
    // No reply loops: the app's own posts and every other bot's are not input.
    if message.bot_id.is_some() || message.subtype.as_deref() == Some("bot_message") {
        return Ok(Inbound::Ignore("bot message"));
    }
    if app_user.is_some() && message.user == app_user {
        return Ok(Inbound::Ignore("the app's own message"));
    }

    let channel = message.channel.clone().unwrap_or_default();
    let stream = format!(
        "slack:{team_id}:{}",
        if channel.is_empty() { "team" } else { &channel }
    );
    let raw_id = EventId::derive(&["slack-event", &team_id, &event_id]);
    let mut raw_meta = Metadata::new("gateway/slack");
    raw_meta.traceparent = traceparent.clone();
    raw_meta.actor = message.user.clone();
    let raw = NewEvent::from_domain(
        raw_id,
        &SlackEventReceived {
            team_id: team_id.clone(),
            event_id,
            event_time: envelope.event_time.unwrap_or_default(),
            body,
        },
        raw_meta,
    )
    .map_err(|e| Malformed(e.to_string()))?;

    let is_message = matches!(message.kind.as_str(), "message" | "app_mention")
        && message
            .subtype
            .as_deref()
            .is_none_or(|s| MESSAGE_SUBTYPES.contains(&s));
    if !is_message {
        // Other events (reactions, joins, edits) are kept for the record only.
        return Ok(Inbound::Store {
            stream,
            events: vec![raw],
        });
    }
    // A message with no user (an integration's, a workflow's) is no one to answer: kept for
    // the record, answered 200, so that Slack does not give up on the subscription.
    let (Some(user), Some(ts), false) =
        (message.user.clone(), message.ts.clone(), channel.is_empty())
    else {
        return Ok(Inbound::Store {
            stream,
            events: vec![raw],
        });
    };
    let thread_ts = message.thread_ts.clone().unwrap_or_else(|| ts.clone());
    let mut meta = Metadata::new("gateway/slack");
    meta.traceparent = traceparent;
    meta.actor = Some(user.clone());
    meta.causation_id = Some(raw_id);
    // A thread is a conversation: every message in it shares the correlation id.
    meta.correlation_id = Some(EventId::derive(&[
        "slack-thread",
        &team_id,
        &channel,
        &thread_ts,
    ]));
    let normalised = MessageReceived {
        addressed_agents: addressed_agents(&message.text),
        files: message
            .files
            .into_iter()
            .map(|f| FileRef {
                id: f.id,
                name: f.name,
                mimetype: f.mimetype,
                url: f.url_private_download.or(f.url_private),
                size: f.size,
            })
            .collect(),
        text: message.text,
        origin: Origin::Slack {
            team_id: team_id.clone(),
            channel: channel.clone(),
            thread_ts,
            ts: ts.clone(),
            user,
        },
    };
    let message_id = EventId::derive(&["slack-message", &team_id, &channel, &ts]);
    let normalised = NewEvent::from_domain(message_id, &normalised, meta)
        .map_err(|e| Malformed(e.to_string()))?;
    Ok(Inbound::Store {
        stream,
        events: vec![raw, normalised],
    })
}

/// Agent names addressed as `@name` in plain text, lowercased, in order of first mention.
/// Slack user mentions (`<@U123>`) are left in the text for routing, which knows which user
/// id is the app.
pub fn addressed_agents(text: &str) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    let bytes = text.as_bytes();
    for (i, _) in text.match_indices('@') {
        // `<@U123>` is a Slack mention, and `a@b` an email address.
        if i > 0 && (bytes[i - 1] == b'<' || bytes[i - 1].is_ascii_alphanumeric()) {
            continue;
        }
        let name: String = text[i + 1..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
            .collect::<String>()
            .to_ascii_lowercase();
        if !name.is_empty() && !names.contains(&name) {
            names.push(name);
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn callback(event: Value) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "type": "event_callback",
            "team_id": "T1",
            "event_id": "Ev1",
            "event_time": 1_700_000_000,
            "authorizations": [{"user_id": "UAPP"}],
            "event": event,
        }))
        .expect("json")
    }

    fn stored(inbound: Inbound) -> (String, Vec<NewEvent>) {
        match inbound {
            Inbound::Store { stream, events } => (stream, events),
            other => panic!("expected Store, got {other:?}"),
        }
    }

    #[test]
    fn url_verification_returns_the_challenge() {
        let body = br#"{"type":"url_verification","challenge":"3eZbrw1aB","token":"x"}"#;
        assert_eq!(
            parse(body, None),
            Ok(Inbound::Challenge("3eZbrw1aB".into()))
        );
    }

    #[test]
    fn an_app_mention_becomes_a_raw_event_and_a_message() {
        let body = callback(json!({
            "type": "app_mention", "user": "U1", "channel": "C1",
            "text": "<@UAPP> hey @Alice, ask @bob (not me@example.com)",
            "ts": "1700000000.000200", "thread_ts": "1700000000.000100",
        }));
        let (stream, events) = stored(parse(&body, Some("00-abc-def-01".into())).expect("ok"));
        assert_eq!(stream, "slack:T1:C1");
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].event_type, "slack.event_received");
        let msg: MessageReceived = serde_json::from_value(events[1].payload.clone()).expect("msg");
        assert_eq!(msg.addressed_agents, vec!["alice", "bob"]);
        assert_eq!(
            msg.origin,
            Origin::Slack {
                team_id: "T1".into(),
                channel: "C1".into(),
                thread_ts: "1700000000.000100".into(),
                ts: "1700000000.000200".into(),
                user: "U1".into(),
            }
        );
        assert_eq!(events[1].metadata.causation_id, Some(events[0].id));
        assert_eq!(
            events[1].metadata.traceparent.as_deref(),
            Some("00-abc-def-01")
        );
    }

    #[test]
    fn message_and_app_mention_of_one_message_share_the_message_id() {
        let event = |kind: &str| {
            json!({"type": kind, "user": "U1", "channel": "C1", "text": "<@UAPP> hi",
                   "ts": "1700000000.000200"})
        };
        let mut a = callback(event("message"));
        let b = callback(event("app_mention"));
        // Different deliveries.
        a = String::from_utf8(a)
            .expect("utf8")
            .replace("Ev1", "Ev2")
            .into_bytes();
        let (_, a) = stored(parse(&a, None).expect("ok"));
        let (_, b) = stored(parse(&b, None).expect("ok"));
        assert_ne!(a[0].id, b[0].id, "two raw deliveries");
        assert_eq!(a[1].id, b[1].id, "one message");
        // A thread root is its own thread.
        let msg: MessageReceived = serde_json::from_value(a[1].payload.clone()).expect("msg");
        assert!(
            matches!(msg.origin, Origin::Slack { ref thread_ts, .. } if thread_ts == "1700000000.000200")
        );
    }

    #[test]
    fn bots_and_the_app_itself_are_ignored() {
        for event in [
            json!({"type": "message", "bot_id": "B1", "channel": "C1", "text": "x", "ts": "1.2"}),
            json!({"type": "message", "subtype": "bot_message", "channel": "C1", "text": "x", "ts": "1.2"}),
            json!({"type": "message", "user": "UAPP", "channel": "C1", "text": "x", "ts": "1.2"}),
        ] {
            assert!(matches!(
                parse(&callback(event), None),
                Ok(Inbound::Ignore(_))
            ));
        }
    }

    #[test]
    fn edits_and_other_events_are_recorded_but_not_messages() {
        for event in [
            json!({"type": "message", "subtype": "message_changed", "channel": "C1", "ts": "1.2"}),
            json!({"type": "reaction_added", "user": "U1", "reaction": "eyes"}),
        ] {
            let (_, events) = stored(parse(&callback(event), None).expect("ok"));
            assert_eq!(events.len(), 1);
            assert_eq!(events[0].event_type, "slack.event_received");
        }
    }

    #[test]
    fn dms_threads_and_files_are_messages() {
        let body = callback(json!({
            "type": "message", "subtype": "file_share", "channel": "D1", "channel_type": "im",
            "user": "U1", "text": "see attached", "ts": "5.6", "thread_ts": "5.0",
            "files": [{"id": "F1", "name": "a.txt", "mimetype": "text/plain",
                       "url_private": "https://files.slack.com/F1"},
                      {"id": "F2", "name": "b.txt", "mimetype": "text/plain", "size": 12,
                       "url_private": "https://files.slack.com/F2",
                       "url_private_download": "https://files.slack.com/F2/download"}],
        }));
        let (stream, events) = stored(parse(&body, None).expect("ok"));
        assert_eq!(stream, "slack:T1:D1");
        let msg: MessageReceived = serde_json::from_value(events[1].payload.clone()).expect("msg");
        assert_eq!(msg.files.len(), 2);
        assert_eq!(
            msg.files[0].url.as_deref(),
            Some("https://files.slack.com/F1")
        );
        assert_eq!(
            msg.files[1].url.as_deref(),
            Some("https://files.slack.com/F2/download"),
            "the download address when Slack gives one"
        );
        assert_eq!(msg.files[1].size, Some(12));
    }

    #[test]
    fn malformed_bodies_are_refused() {
        assert!(parse(b"not json", None).is_err());
        assert!(parse(br#"{"type":"url_verification"}"#, None).is_err());
        assert!(parse(br#"{"type":"event_callback","team_id":"T1"}"#, None).is_err());
        assert!(parse(br#"{"type":"something_else"}"#, None).is_err());
    }

    #[test]
    fn rate_limit_notices_and_messages_without_a_user_are_answered_not_refused() {
        let limited = br#"{"type":"app_rate_limited","token":"x","team_id":"T1","minute_rate_limited":1518467820,"api_app_id":"A1"}"#;
        assert!(matches!(parse(limited, None), Ok(Inbound::Ignore(_))));
        for event in [
            json!({"type": "message", "user": "U1", "channel": "C1", "text": "x"}),
            json!({"type": "message", "channel": "C1", "text": "from a workflow", "ts": "1.2"}),
        ] {
            match parse(&callback(event), None) {
                Ok(Inbound::Store { events, .. }) => {
                    assert_eq!(
                        events.len(),
                        1,
                        "kept for the record, no message for an agent"
                    );
                }
                other => panic!("expected the raw event stored, got {other:?}"),
            }
        }
    }
}
