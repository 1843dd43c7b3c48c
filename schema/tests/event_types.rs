//! Every event type round-trips through JSON, and its wire form is pinned by a snapshot file
//! in `tests/snapshots/`. A failing snapshot means a stored format changed: old events in
//! the log would no longer read. Add a new version instead of editing the old one. Only a
//! brand-new type gets a new file: run with `WARREN_WRITE_NEW_SNAPSHOTS=1` to write missing
//! files (existing ones are never overwritten).

use std::path::PathBuf;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use warren_schema::EventId;
use warren_schema::events::*;

fn slack_origin() -> Origin {
    Origin::Slack {
        team_id: "T0001".into(),
        channel: "C0001".into(),
        thread_ts: "1700000000.000100".into(),
        ts: "1700000000.000200".into(),
        user: "U0001".into(),
    }
}

fn id(n: &str) -> EventId {
    EventId::derive(&["snapshot", n])
}

/// A known type's name, version, sample in JSON, and a check that decodes a stored form back
/// into the type, compares it with the sample and re-encodes it.
struct Sample {
    event_type: &'static str,
    version: i16,
    value: Value,
    roundtrip: Box<dyn Fn(&Value) -> Value>,
}

/// One sample per known type, serialised by the type itself.
fn samples() -> Vec<Sample> {
    fn entry<
        E: DomainEvent + Serialize + DeserializeOwned + PartialEq + std::fmt::Debug + 'static,
    >(
        sample: E,
    ) -> Sample {
        let value = serde_json::to_value(&sample).expect("serialise");
        let roundtrip = Box::new(move |v: &Value| {
            let back: E = serde_json::from_value(v.clone()).expect("deserialise snapshot");
            assert_eq!(back, sample, "{} does not round-trip", E::TYPE);
            serde_json::to_value(&back).expect("serialise")
        });
        Sample {
            event_type: E::TYPE,
            version: E::VERSION,
            value,
            roundtrip,
        }
    }
    vec![
        entry(SlackEventReceived {
            team_id: "T0001".into(),
            event_id: "Ev0001".into(),
            event_time: 1_700_000_000,
            body: json!({"type": "event_callback", "event": {"type": "app_mention", "text": "<@U0APP> hi"}}),
        }),
        entry(WebhookReceived {
            endpoint: "github".into(),
            scheme: "github".into(),
            delivery_id: "72d3162e-cc78-11e3-81ab-4c9367dc0958".into(),
            event: Some("issues".into()),
            content_type: Some("application/json".into()),
            body: json!({"action": "opened"}),
        }),
        entry(MessageReceived {
            origin: slack_origin(),
            text: "@alice summarise the thread".into(),
            addressed_agents: vec!["alice".into()],
            files: vec![FileRef {
                id: "F0001".into(),
                name: Some("log.txt".into()),
                mimetype: Some("text/plain".into()),
                url: None,
                size: Some(2_048),
            }],
        }),
        entry(MessageFileStored {
            message_id: id("message"),
            file_id: "F0001".into(),
            name: "log.txt".into(),
            mimetype: Some("text/plain".into()),
            size: 2_048,
            sha256: "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08".into(),
        }),
        entry(MessageFileRefused {
            message_id: id("message"),
            file_id: "F0002".into(),
            name: Some("dump.bin".into()),
            reason: "larger than the gateway's limit of 20971520 bytes".into(),
        }),
        entry(MessageRouted {
            message_id: id("message"),
            agent: "alice".into(),
            workspace: "research".into(),
            reason: "mention".into(),
        }),
        entry(WorkspaceStartRequested {
            workspace: "research".into(),
            reason: "message_waiting".into(),
            attempt: 0,
        }),
        entry(WorkspaceStopRequested {
            workspace: "research".into(),
            reason: "idle".into(),
        }),
        entry(WorkspaceObserved {
            workspace: "research".into(),
            phase: WorkspacePhase::Ready,
            backend: "local".into(),
            instance: Some("4242".into()),
            detail: None,
            replaced: false,
        }),
        entry(AgentReplied {
            workspace: "research".into(),
            agent: "alice".into(),
            reply_to: slack_origin(),
            text: "Here is the summary.".into(),
        }),
        entry(AgentMentioned {
            from_workspace: "research".into(),
            from_agent: "alice".into(),
            to_agent: "bob".into(),
            text: "@bob check the numbers".into(),
            chain: vec!["alice".into()],
            reply_to: Origin::Webhook {
                endpoint: "github".into(),
                delivery_id: "d1".into(),
            },
        }),
        entry(ReplyPostStarted {
            reply_id: id("reply"),
            channel: "C0001".into(),
            thread_ts: Some("1700000000.000100".into()),
        }),
        entry(ReplyDelivered {
            reply_id: id("reply"),
            channel: "C0001".into(),
            ts: "1700000001.000300".into(),
        }),
        entry(AgentConfigured {
            name: "alice".into(),
            workspace: "research".into(),
            driver: "anthropic".into(),
            settings: json!({"model": "claude-sonnet-4-5", "max_tokens": 4096}),
            idle_timeout_secs: 900,
        }),
        entry(AgentRemoved {
            name: "alice".into(),
        }),
        entry(RouteConfigured {
            route: "slack_channel:C0001".into(),
            agent: "alice".into(),
        }),
        entry(RouteRemoved {
            route: "slack_channel:C0001".into(),
        }),
        entry(WorkspaceStartQueued {
            workspace: "research".into(),
            cap: "team:T0001".into(),
            team: Some("T0001".into()),
            channel: Some("C0001".into()),
        }),
        entry(WorkspaceFailed {
            workspace: "research".into(),
            attempts: 4,
            detail: Some("exit status 1".into()),
        }),
        entry(MentionRefused {
            mention_id: id("mention"),
            reason: "depth".into(),
            chain: vec!["alice".into(), "bob".into(), "alice".into()],
        }),
        entry(MemoryWritten {
            bucket: "warren-mem-research".into(),
            key: "quarter.numbers".into(),
            value: Some(json!({"revenue": 42})),
            revision: 7,
            workspace: "research".into(),
            agent: "alice".into(),
        }),
        entry(MessageDeadLettered {
            routing_id: id("routing"),
            workspace: "research".into(),
            agent: "alice".into(),
            deliveries: 5,
            error: "model API: 503 Service Unavailable after 4 attempt(s)".into(),
            reply_to: Some(slack_origin()),
        }),
        entry(AgentTurnCompleted {
            workspace: "research".into(),
            agent: "alice".into(),
            routing_id: id("routing"),
            duration_ms: 2_350,
            usage: TurnUsage {
                model_calls: 2,
                input_tokens: 1_200,
                output_tokens: 310,
                cache_read_tokens: 1_024,
                cache_write_tokens: 0,
            },
        }),
        entry(AgentBusy {
            workspace: "research".into(),
            agent: "alice".into(),
            routing_id: id("routing"),
            busy_for_secs: 90,
        }),
        entry(OutputRefused {
            workspace: "research".into(),
            agent: "carol".into(),
            kind: "reply".into(),
            in_reply_to: Some(id("routing")),
            reason: "the message was routed to research/alice, not research/carol".into(),
        }),
        entry(MessageRefused {
            message_id: id("message"),
            agent: "deployer".into(),
            reason: "a direct message from U0EVE, who is not in its users".into(),
        }),
        entry(TokenIssued {
            token_id: "tk4f2a9c1d".into(),
            name: "ci".into(),
            role: "operator".into(),
            secret_sha256: "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
                .into(),
            expires_at: Some(
                chrono::DateTime::parse_from_rfc3339("2027-01-01T00:00:00Z")
                    .expect("a time")
                    .to_utc(),
            ),
        }),
        entry(TokenRevoked {
            token_id: "tk4f2a9c1d".into(),
        }),
        entry(WorkspaceActionRequested {
            workspace: "research".into(),
            action: "stop".into(),
            reason: Some("maintenance on the node".into()),
        }),
        entry(WebhookEndpointConfigured {
            endpoint: "github".into(),
            scheme: "github".into(),
            agent: "triage".into(),
            signature_header: None,
            delivery_header: None,
            secret_fingerprint: "9f86d081884c".into(),
            previous_valid_until: Some(
                chrono::DateTime::parse_from_rfc3339("2027-01-01T01:00:00Z")
                    .expect("a time")
                    .to_utc(),
            ),
        }),
        entry(WebhookEndpointRemoved {
            endpoint: "github".into(),
        }),
        entry(MemoryRestored {
            bucket: "warren-memory-research".into(),
            keys: 42,
        }),
        entry(NatsRecovered {
            stream: "WARREN_INBOX".into(),
            acknowledged: 1_204,
            found: 0,
            republished: 3,
            buckets: vec![BucketRestored {
                bucket: "warren-mem-research".into(),
                keys: 12,
            }],
        }),
        entry(QuotaSet {
            scope: "team:T0001".into(),
            max_running: Some(20),
        }),
        entry(QuotaRemoved {
            scope: "channel".into(),
        }),
    ]
}

#[test]
fn every_event_type_matches_its_snapshot_and_round_trips() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/snapshots");
    let write_new = std::env::var_os("WARREN_WRITE_NEW_SNAPSHOTS").is_some();
    let samples = samples();

    let covered: Vec<(&str, i16)> = samples.iter().map(|s| (s.event_type, s.version)).collect();
    assert_eq!(
        covered, KNOWN_EVENT_TYPES,
        "every known event type needs a sample here"
    );

    let mut missing = Vec::new();
    for Sample {
        event_type,
        version,
        value,
        roundtrip,
    } in &samples
    {
        let path = dir.join(format!("{event_type}.v{version}.json"));
        let rendered = serde_json::to_string_pretty(value).expect("render") + "\n";
        match std::fs::read_to_string(&path) {
            Ok(stored) => {
                assert_eq!(
                    rendered,
                    stored,
                    "wire form of {event_type} v{version} changed (see {})",
                    path.display()
                );
                let stored: Value = serde_json::from_str(&stored).expect("snapshot is JSON");
                assert_eq!(&roundtrip(&stored), value);
            }
            Err(_) if write_new => {
                std::fs::create_dir_all(&dir).expect("mkdir");
                std::fs::write(&path, rendered).expect("write snapshot");
            }
            Err(_) => missing.push(path.display().to_string()),
        }
    }
    assert!(missing.is_empty(), "missing snapshots: {missing:?}");
}
