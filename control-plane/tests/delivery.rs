//! Delivery over a real NATS JetStream server (NATS_URL; `./scripts/test` starts one) and a
//! real PostgreSQL: routed messages reach the agent's inbox once, with their trace; the
//! agent's reply comes back into the log once, caused by the routing decision; a publisher
//! that lost its checkpoint republishes without duplicating.

use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;
use warren_control_plane::controller::{self, ControllerConfig, NatsConfig};
use warren_control_plane::decide::Policy;
use warren_control_plane::delivery::{self, Publisher};
use warren_schema::events::*;
use warren_schema::nats::{InboxMessage, Namespace, OutboxMessage};
use warren_schema::testing::TestDatabase;
use warren_schema::{AppendRequest, EventId, EventLog, Metadata, NewEvent};

const TRACE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn nats_url() -> String {
    std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

fn namespace(test: &str) -> Namespace {
    Namespace::new(&format!("t{}{test}{}", std::process::id(), rand_suffix()))
}

fn rand_suffix() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0)
}

async fn connect() -> async_nats::Client {
    async_nats::connect(nats_url()).await.unwrap_or_else(|e| {
        panic!(
            "cannot reach NATS at NATS_URL ({}): {e}; run the tests with ./scripts/test",
            nats_url()
        )
    })
}

async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Waits until the controller has recorded at least `agents` agents of its configuration.
async fn configured(log: &EventLog, agents: usize) {
    eventually("configuration", async || {
        log.read_type("agent.configured", 0, 100)
            .await
            .expect("r")
            .len()
            >= agents
    })
    .await;
}

async fn inbox_count(js: &jetstream::Context, ns: &Namespace) -> u64 {
    match js.get_stream(ns.inbox_stream()).await {
        Ok(mut s) => s.info().await.map(|i| i.state.messages).unwrap_or(0),
        Err(_) => 0,
    }
}

/// The controller's settings for these tests: decisions and delivery, no backend.
fn delivery_config(holder: &str, file: std::path::PathBuf, ns: &Namespace) -> ControllerConfig {
    ControllerConfig {
        holder: holder.into(),
        lease_ttl: Duration::from_secs(5),
        tick: Duration::from_millis(50),
        policy: Policy::default(),
        config_file: Some(file),
        backend: None,
        nats: Some(NatsConfig {
            url: nats_url(),
            namespace: ns.clone(),
            credentials: None,
        }),
    }
}

#[tokio::test]
async fn a_routed_message_reaches_the_inbox_once_and_the_reply_comes_back_once() {
    let db = TestDatabase::new().await;
    let log = EventLog::new(db.pool.clone());
    let client = connect().await;
    let js = jetstream::new(client.clone());
    let ns = namespace("roundtrip");
    let dir = std::env::temp_dir().join(format!("warren-delivery-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("agents.json");
    std::fs::write(
        &file,
        r#"{"agents": [{"name": "alice", "workspace": "research"},
                       {"name": "bob", "workspace": "ops"}]}"#,
    )
    .expect("config");
    let shutdown = CancellationToken::new();
    let config = delivery_config("d", file, &ns);
    let task = tokio::spawn(controller::run(log.clone(), config, shutdown.clone()));
    configured(&log, 1).await;

    let message_id = EventId::random();
    let mut meta = Metadata::new("test");
    meta.traceparent = Some(TRACE.into());
    let origin = Origin::Slack {
        team_id: "T1".into(),
        channel: "C1".into(),
        thread_ts: "1.0".into(),
        ts: "1.0".into(),
        user: "U1".into(),
    };
    let message = MessageReceived {
        origin: origin.clone(),
        text: "@alice what's new?".into(),
        addressed_agents: vec!["alice".into()],
        files: vec![],
    };
    log.append(&AppendRequest::new(
        "slack:T1:C1",
        vec![NewEvent::from_domain(message_id, &message, meta).expect("e")],
    ))
    .await
    .expect("append");

    // The agent's side: read the inbox as a workspace runtime would.
    eventually("the inbox message", async || {
        inbox_count(&js, &ns).await == 1
    })
    .await;
    let stream = js.get_stream(ns.inbox_stream()).await.expect("stream");
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::Config {
            filter_subject: ns.inbox_subject("research", "alice"),
            ..Default::default()
        })
        .await
        .expect("consumer");
    let mut batch = consumer
        .fetch()
        .max_messages(10)
        .messages()
        .await
        .expect("fetch");
    let got = batch.next().await.expect("one message").expect("ok");
    let inbox: InboxMessage = serde_json::from_slice(&got.payload).expect("inbox json");
    let routed = log.read_type("message.routed", 0, 10).await.expect("r");
    assert_eq!(routed.len(), 1);
    assert_eq!(inbox.routing_id, routed[0].id);
    assert_eq!(inbox.message_id, message_id);
    assert_eq!(inbox.text, "@alice what's new?");
    assert_eq!(inbox.reply_to, origin);
    let headers = got.headers.as_ref().expect("headers");
    assert_eq!(
        headers.get("Nats-Msg-Id").map(|v| v.to_string()),
        Some(routed[0].id.to_string())
    );
    assert_eq!(
        headers.get("traceparent").map(|v| v.to_string()),
        Some(TRACE.into())
    );
    got.ack().await.expect("ack");

    // The reply, published twice (a runtime redelivery): recorded once.
    let reply = OutboxMessage::Reply {
        id: format!("{}-1", inbox.routing_id),
        in_reply_to: inbox.routing_id,
        workspace: "research".into(),
        agent: "alice".into(),
        reply_to: inbox.reply_to.clone(),
        text: "All quiet.".into(),
        correlation_id: inbox.correlation_id,
    };
    // And an impostor: another workspace's outbox, speaking as research/alice.
    let impostor = OutboxMessage::Reply {
        id: format!("{}-impostor", inbox.routing_id),
        in_reply_to: inbox.routing_id,
        workspace: "research".into(),
        agent: "alice".into(),
        reply_to: inbox.reply_to.clone(),
        text: "Send me the keys.".into(),
        correlation_id: inbox.correlation_id,
    };
    // On its own subject, research speaking as ops's bob, and as Warren itself.
    let speaking_as = |agent: &str| OutboxMessage::Reply {
        id: format!("{}-as-{agent}", inbox.routing_id),
        in_reply_to: inbox.routing_id,
        workspace: "research".into(),
        agent: agent.into(),
        reply_to: inbox.reply_to.clone(),
        text: format!("This is {agent}: send me the keys."),
        correlation_id: inbox.correlation_id,
    };
    let (as_bob, as_warren) = (speaking_as("bob"), speaking_as("warren"));
    for (subject, message) in [
        (ns.outbox_subject("ops"), &impostor),
        (ns.outbox_subject("research"), &as_bob),
        (ns.outbox_subject("research"), &as_warren),
        (ns.outbox_subject("research"), &reply),
        (ns.outbox_subject("research"), &reply),
    ] {
        js.publish(subject, serde_json::to_vec(message).expect("json").into())
            .await
            .expect("publish")
            .await
            .expect("ack");
    }
    eventually("the reply in the log", async || {
        !log.read_type("agent.replied", 0, 10)
            .await
            .expect("r")
            .is_empty()
    })
    .await;
    // Both copies consumed (the consumer has nothing pending) before counting.
    eventually("both outbox copies consumed", async || {
        let mut stream = js.get_stream(ns.outbox_stream()).await.expect("stream");
        let mut c = stream
            .get_consumer::<jetstream::consumer::pull::Config>(delivery::ingest::CONSUMER)
            .await
            .expect("consumer");
        let _ = stream.info().await;
        c.info()
            .await
            .is_ok_and(|i| i.num_pending == 0 && i.num_ack_pending == 0)
    })
    .await;
    let replies = log.read_type("agent.replied", 0, 10).await.expect("r");
    assert_eq!(
        replies.len(),
        1,
        "one reply recorded: the redelivery absorbed, no impostor recorded"
    );
    let recorded: AgentReplied = replies[0].decode().expect("reply");
    assert_eq!(
        recorded.text, "All quiet.",
        "no impostor is recorded: not another workspace's, not another agent's"
    );
    assert_eq!(replies[0].metadata.causation_id, Some(inbox.routing_id));
    assert_eq!(replies[0].metadata.correlation_id, Some(message_id));
    let chain = log.causation_chain(replies[0].id).await.expect("chain");
    assert_eq!(
        chain
            .iter()
            .map(|e| e.event_type.as_str())
            .collect::<Vec<_>>(),
        ["message.received", "message.routed", "agent.replied"],
        "explain: the reply leads back to the message"
    );
    shutdown.cancel();
    task.await.expect("join").expect("controller");
    assert_eq!(inbox_count(&js, &ns).await, 1);
    remove_streams(&js, &ns).await;
}

/// Tests share the server: leave nothing behind.
async fn remove_streams(js: &jetstream::Context, ns: &Namespace) {
    let _ = js.delete_stream(ns.inbox_stream()).await;
    let _ = js.delete_stream(ns.outbox_stream()).await;
    let _ = js.delete_stream(ns.undelivered_stream()).await;
}

#[tokio::test]
async fn a_publisher_that_lost_its_checkpoint_does_not_duplicate_the_inbox() {
    let db = TestDatabase::new().await;
    let log = EventLog::new(db.pool.clone());
    let client = connect().await;
    let js = jetstream::new(client.clone());
    let ns = namespace("republish");
    // The log: an agent, a message, and its routing decision.
    let configured = bob_configured();
    let [message, routed] = message_and_routing(1);
    log.append(&AppendRequest::new("s", vec![configured, message, routed]))
        .await
        .expect("append");
    let events = log.read_positions(0, i64::MAX, 10).await.expect("read");

    let mut publisher = Publisher::new(js.clone(), ns.clone(), log.clone())
        .await
        .expect("publisher");
    publisher.publish_batch(&events).await.expect("publish");
    assert_eq!(inbox_count(&js, &ns).await, 1);

    // A crash between the PubAck and the checkpoint: the checkpoint is behind.
    sqlx::query("UPDATE subscription_checkpoints SET position = 0 WHERE name = $1")
        .bind(delivery::CHECKPOINT)
        .execute(&db.pool)
        .await
        .expect("reset");
    let mut again = Publisher::new(js.clone(), ns.clone(), log.clone())
        .await
        .expect("publisher");
    again.publish_batch(&events).await.expect("republish");
    assert_eq!(
        inbox_count(&js, &ns).await,
        1,
        "the server dropped the duplicate"
    );
    remove_streams(&js, &ns).await;
}

/// The agent bob, an echo agent in the workspace ops.
fn bob_configured() -> NewEvent {
    NewEvent::from_domain(
        EventId::random(),
        &AgentConfigured {
            name: "bob".into(),
            workspace: "ops".into(),
            driver: "echo".into(),
            settings: serde_json::json!({}),
            idle_timeout_secs: 60,
        },
        Metadata::new("test"),
    )
    .expect("e")
}

/// A webhook message to bob and its routing decision, as the log holds them.
fn message_and_routing(n: u32) -> [NewEvent; 2] {
    let m = EventId::random();
    let message = NewEvent::from_domain(
        m,
        &MessageReceived {
            origin: Origin::Webhook {
                endpoint: "ci".into(),
                delivery_id: n.to_string(),
            },
            text: format!("build {n} failed"),
            addressed_agents: vec!["bob".into()],
            files: vec![],
        },
        Metadata::new("test"),
    )
    .expect("e");
    let routed = NewEvent::from_domain(
        EventId::derive(&["routed", &m.to_string()]),
        &MessageRouted {
            message_id: m,
            agent: "bob".into(),
            workspace: "ops".into(),
            reason: "mention".into(),
        },
        Metadata::new("test"),
    )
    .expect("e");
    [message, routed]
}

/// The NATS store lost, and the inbox stream made anew by another part (the undelivered
/// reader, a runtime) before the publisher's next publish: that publish succeeds, into the
/// new stream, and its acknowledgement is what shows the loss. The publisher recovers
/// then, not at its next idle check.
#[tokio::test]
async fn a_publish_into_an_inbox_stream_made_anew_recovers_at_once() {
    let db = TestDatabase::new().await;
    let log = EventLog::new(db.pool.clone());
    let js = jetstream::new(connect().await);
    let ns = namespace("remade");
    let configured = bob_configured();
    let mut first = vec![configured];
    first.extend(message_and_routing(1));
    first.extend(message_and_routing(2));
    log.append(&AppendRequest::new("s", first))
        .await
        .expect("append");
    let events = log.read_positions(0, i64::MAX, 10).await.expect("read");
    let mut publisher = Publisher::new(js.clone(), ns.clone(), log.clone())
        .await
        .expect("publisher");
    publisher.publish_batch(&events).await.expect("publish");
    assert_eq!(inbox_count(&js, &ns).await, 2);

    // The store goes; another part makes the stream again, empty.
    js.delete_stream(ns.inbox_stream())
        .await
        .expect("delete the inbox stream");
    js.get_or_create_stream(ns.inbox_stream_config())
        .await
        .expect("the stream made anew");
    let after = events.last().expect("events").position;
    log.append(&AppendRequest::new("s", message_and_routing(3).to_vec()))
        .await
        .expect("append");
    let third = log
        .read_positions(after + 1, i64::MAX, 10)
        .await
        .expect("read");
    publisher.publish_batch(&third).await.expect("publish");

    // Recovered by that publish: the two lost are back beside the third, once each.
    let recovered = log.read_type("nats.recovered", 0, 10).await.expect("read");
    assert_eq!(recovered.len(), 1, "recovered by the publish itself");
    let recovered: NatsRecovered = recovered[0].decode().expect("decode");
    assert_eq!((recovered.acknowledged, recovered.found), (2, 1));
    assert_eq!(
        recovered.republished, 3,
        "every unfinished routing, the third too"
    );
    assert_eq!(
        inbox_count(&js, &ns).await,
        3,
        "the third was not published twice"
    );
    remove_streams(&js, &ns).await;
}

#[tokio::test]
async fn with_nats_down_decisions_go_on_and_nothing_stops() {
    let db = TestDatabase::new().await;
    let log = EventLog::new(db.pool.clone());
    // A port nothing listens on: NATS is down.
    let unused = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let down = format!("nats://{}", unused.local_addr().expect("addr"));
    drop(unused);
    let dir = std::env::temp_dir().join(format!("warren-nats-down-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("agents.json");
    std::fs::write(
        &file,
        r#"{"agents": [{"name": "alice", "workspace": "research"}]}"#,
    )
    .expect("config");
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(controller::run(
        log.clone(),
        ControllerConfig {
            holder: "down".into(),
            lease_ttl: Duration::from_secs(5),
            tick: Duration::from_millis(50),
            policy: Policy::default(),
            config_file: Some(file),
            backend: None,
            nats: Some(NatsConfig {
                url: down,
                namespace: namespace("down"),
                credentials: None,
            }),
        },
        shutdown.clone(),
    ));
    eventually("configuration without NATS", async || {
        !log.read_type("agent.configured", 0, 1)
            .await
            .expect("r")
            .is_empty()
    })
    .await;
    let message = NewEvent::from_domain(
        EventId::random(),
        &MessageReceived {
            origin: Origin::Webhook {
                endpoint: "ci".into(),
                delivery_id: "1".into(),
            },
            text: "@alice hello".into(),
            addressed_agents: vec!["alice".into()],
            files: vec![],
        },
        Metadata::new("test"),
    )
    .expect("e");
    log.append(&AppendRequest::new("s", vec![message]))
        .await
        .expect("append");
    eventually("the routing decision without NATS", async || {
        !log.read_type("message.routed", 0, 1)
            .await
            .expect("r")
            .is_empty()
    })
    .await;
    assert!(
        !task.is_finished(),
        "the controller keeps running while NATS is down"
    );
    let delivered: i64 = sqlx::query_scalar(
        "SELECT coalesce(max(position), 0) FROM subscription_checkpoints WHERE name = $1",
    )
    .bind(delivery::CHECKPOINT)
    .fetch_one(&db.pool)
    .await
    .expect("checkpoint");
    assert_eq!(
        delivered, 0,
        "nothing counted as delivered while NATS is down"
    );
    shutdown.cancel();
    task.await.expect("join").expect("a clean stop");
}

/// Publishes `out` on its workspace's outbox subject, as that workspace's runtime would.
async fn publish_output(js: &jetstream::Context, ns: &Namespace, out: &OutboxMessage) {
    js.publish(
        ns.outbox_subject(out.workspace()),
        serde_json::to_vec(out).expect("json").into(),
    )
    .await
    .expect("publish")
    .await
    .expect("ack");
}

/// A workspace does not say where its answers go, in which conversation, after which chain
/// of mentions, or whose message it answers: the control plane takes all of that from its
/// own record of the routed message. An answer to a message routed to another agent (of
/// another workspace, or of its own) or to no message at all is refused, and the refusal
/// is an event `explain` shows beside the message it claimed to answer.
#[tokio::test]
async fn a_workspace_cannot_choose_where_or_in_which_conversation_it_answers() {
    let db = TestDatabase::new().await;
    let log = EventLog::new(db.pool.clone());
    let client = connect().await;
    let js = jetstream::new(client.clone());
    let ns = namespace("forged");
    let dir = std::env::temp_dir().join(format!("warren-forged-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("agents.json");
    std::fs::write(
        &file,
        r#"{"agents": [{"name": "alice", "workspace": "research"},
                       {"name": "carol", "workspace": "research"},
                       {"name": "bob", "workspace": "ops"}]}"#,
    )
    .expect("config");
    let shutdown = CancellationToken::new();
    let config = delivery_config("forged", file, &ns);
    let task = tokio::spawn(controller::run(log.clone(), config, shutdown.clone()));
    configured(&log, 3).await;
    let origin = |channel: &str| Origin::Slack {
        team_id: "T1".into(),
        channel: channel.into(),
        thread_ts: "1.0".into(),
        ts: "1.0".into(),
        user: "U1".into(),
    };
    // A message for alice in C1, and one for bob in C2.
    for (agent, channel) in [("alice", "C1"), ("bob", "C2")] {
        let message = MessageReceived {
            origin: origin(channel),
            text: format!("@{agent} hello"),
            addressed_agents: vec![agent.into()],
            files: vec![],
        };
        log.append(&AppendRequest::new(
            format!("slack:T1:{channel}"),
            vec![
                NewEvent::from_domain(EventId::random(), &message, Metadata::new("test"))
                    .expect("e"),
            ],
        ))
        .await
        .expect("append");
    }
    eventually("both routed", async || {
        log.read_type("message.routed", 0, 10)
            .await
            .expect("r")
            .len()
            == 2
    })
    .await;
    let routed = log.read_type("message.routed", 0, 10).await.expect("r");
    let routing_of = |agent: &str| {
        routed
            .iter()
            .find(|e| e.decode::<MessageRouted>().expect("routed").agent == agent)
            .expect("routed")
            .clone()
    };
    let (to_alice, to_bob) = (routing_of("alice"), routing_of("bob"));
    let alice_conversation = to_alice.metadata.correlation_id;

    let elsewhere = origin("C-ALL-HANDS");
    let reply = |id: &str, agent: &str, in_reply_to: EventId| OutboxMessage::Reply {
        id: id.into(),
        in_reply_to,
        workspace: "research".into(),
        agent: agent.into(),
        reply_to: elsewhere.clone(),
        text: format!("{id} from {agent}"),
        correlation_id: Some(EventId::random()),
    };
    let outputs = [
        // alice answers her own message, but names another channel and conversation.
        reply("forged-target", "alice", to_alice.id),
        // ...and mentions bob with an empty chain, in another channel and conversation.
        OutboxMessage::Mention {
            id: "forged-chain".into(),
            in_reply_to: to_alice.id,
            workspace: "research".into(),
            from_agent: "alice".into(),
            to_agent: "bob".into(),
            text: "@bob look".into(),
            chain: vec![],
            reply_to: elsewhere.clone(),
            correlation_id: Some(EventId::random()),
        },
        // carol (same workspace) answers alice's message; alice answers bob's; and an
        // answer to a message never routed.
        reply("as-carol", "carol", to_alice.id),
        reply("bobs-message", "alice", to_bob.id),
        reply("no-such-message", "alice", EventId::random()),
    ];
    for out in &outputs {
        publish_output(&js, &ns, out).await;
    }
    eventually("three refusals", async || {
        log.read_type("output.refused", 0, 10)
            .await
            .expect("r")
            .len()
            == 3
    })
    .await;
    eventually("the reply and the mention", async || {
        !log.read_type("agent.replied", 0, 10)
            .await
            .expect("r")
            .is_empty()
            && !log
                .read_type("agent.mentioned", 0, 10)
                .await
                .expect("r")
                .is_empty()
    })
    .await;

    let replies = log.read_type("agent.replied", 0, 10).await.expect("r");
    assert_eq!(replies.len(), 1, "only alice's answer to her own message");
    let recorded: AgentReplied = replies[0].decode().expect("reply");
    assert_eq!(recorded.text, "forged-target from alice");
    assert_eq!(
        recorded.reply_to,
        origin("C1"),
        "where the message came from"
    );
    assert_eq!(replies[0].metadata.correlation_id, alice_conversation);

    let mentions = log.read_type("agent.mentioned", 0, 10).await.expect("r");
    let mention: AgentMentioned = mentions[0].decode().expect("mention");
    assert_eq!(
        mention.chain,
        ["alice"],
        "the recorded chain, not the empty one"
    );
    assert_eq!(mention.reply_to, origin("C1"));
    assert_eq!(mentions[0].metadata.correlation_id, alice_conversation);

    let refused: Vec<OutputRefused> = log
        .read_type("output.refused", 0, 10)
        .await
        .expect("r")
        .iter()
        .map(|e| e.decode().expect("refusal"))
        .collect();
    let reasons: Vec<(&str, &str)> = refused
        .iter()
        .map(|r| (r.agent.as_str(), r.reason.as_str()))
        .collect();
    assert!(
        reasons.contains(&(
            "carol",
            "the message was routed to research/alice, not research/carol"
        )) && reasons.contains(&(
            "alice",
            "the message was routed to ops/bob, not research/alice"
        )),
        "{reasons:?}"
    );
    assert!(
        refused
            .iter()
            .any(|r| r.reason.ends_with("is not a message Warren routed")),
        "{reasons:?}"
    );
    // explain: carol's refusal leads back to alice's message.
    let carol = log
        .read_type("output.refused", 0, 10)
        .await
        .expect("r")
        .into_iter()
        .find(|e| {
            e.decode::<OutputRefused>()
                .is_ok_and(|r| r.agent == "carol")
        })
        .expect("carol's refusal");
    let chain = warren_control_plane::explain::event(&log, carol.id)
        .await
        .expect("explain");
    assert_eq!(
        chain
            .iter()
            .map(|e| e.event_type.as_str())
            .collect::<Vec<_>>(),
        ["message.received", "message.routed", "output.refused"]
    );

    // alice floods her conversation: 60 more replies to her one message, each with a new id
    // (every recorded reply is posted to Slack). At most 50 outputs answer a message: the
    // reply and the mention above, and 48 of these.
    for n in 0..60 {
        publish_output(
            &js,
            &ns,
            &reply(&format!("flood-{n}"), "alice", to_alice.id),
        )
        .await;
    }
    // Then bob answers his own message; the outbox is read in order, so once his answer is
    // recorded, every flood message before it has been judged.
    let bobs = OutboxMessage::Reply {
        id: "bobs-answer".into(),
        in_reply_to: to_bob.id,
        workspace: "ops".into(),
        agent: "bob".into(),
        reply_to: origin("C2"),
        text: "bob's answer".into(),
        correlation_id: None,
    };
    publish_output(&js, &ns, &bobs).await;
    eventually("bob's answer", async || {
        log.read_type("agent.replied", 0, 200)
            .await
            .expect("r")
            .iter()
            .any(|e| e.decode::<AgentReplied>().is_ok_and(|r| r.agent == "bob"))
    })
    .await;
    let alices = log
        .read_type("agent.replied", 0, 200)
        .await
        .expect("r")
        .iter()
        .filter(|e| e.decode::<AgentReplied>().is_ok_and(|r| r.agent == "alice"))
        .count();
    assert_eq!(
        alices, 49,
        "50 outputs answer a message, the mention included"
    );
    let over: Vec<OutputRefused> = log
        .read_type("output.refused", 0, 200)
        .await
        .expect("r")
        .iter()
        .filter_map(|e| e.decode::<OutputRefused>().ok())
        .filter(|r| r.reason.contains("outputs answer this message"))
        .collect();
    assert!(
        !over.is_empty(),
        "the refusals are recorded (within their own budget)"
    );
    shutdown.cancel();
    task.await.expect("join").expect("controller");
    remove_streams(&js, &ns).await;
}
