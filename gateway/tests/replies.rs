//! Replies out to Slack: the real Slack client, pointed at a local server that speaks the
//! Web API's `chat.postMessage` (bearer token, JSON body, 429 with Retry-After, `ok`/`ts`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use warren_gateway::replies;
use warren_gateway::slack_api::SlackApi;
use warren_schema::events::{AgentReplied, Origin};
use warren_schema::testing::TestDatabase;
use warren_schema::{AppendRequest, EventId, EventLog, Metadata, NewEvent, Secret};

const TOKEN: &str = "xoxb-test-token";

#[derive(Default)]
struct FakeSlack {
    /// Every call: (authorized, body).
    calls: Vec<(bool, Value)>,
    /// Answer the next this-many calls with 429.
    rate_limit_next: usize,
    /// The messages Slack holds: what was accepted, with `ts`, `thread_ts` and `metadata`.
    messages: Vec<Value>,
    /// Hang the next post (the gateway "crashes" while it waits), before or after Slack
    /// accepted it.
    stall: Option<Stall>,
    /// A stalled post arrived.
    stalled: Arc<tokio::sync::Notify>,
    /// `conversations.replies` / `.history` calls.
    lookups: usize,
    /// Answer lookups as Slack does for an app without the `*:history` scopes.
    refuse_lookups: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Stall {
    BeforeAccept,
    AfterAccept,
}

async fn post_message(
    State(fake): State<Arc<Mutex<FakeSlack>>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let authorized = headers.get("authorization").and_then(|v| v.to_str().ok())
        == Some(&format!("Bearer {TOKEN}"));
    let (answer, stalled) = accept(&mut fake.lock().expect("lock"), authorized, body);
    if let Some(stalled) = stalled {
        stalled.notify_one();
        std::future::pending::<()>().await;
    }
    answer
}

/// What Slack does with a post; the notification to give when it is to hang.
fn accept(
    fake: &mut FakeSlack,
    authorized: bool,
    body: Value,
) -> (Response, Option<Arc<tokio::sync::Notify>>) {
    let n = fake.calls.len();
    fake.calls.push((authorized, body.clone()));
    if !authorized {
        return (
            Json(json!({"ok": false, "error": "invalid_auth"})).into_response(),
            None,
        );
    }
    if fake.rate_limit_next > 0 {
        fake.rate_limit_next -= 1;
        return (
            (StatusCode::TOO_MANY_REQUESTS, [("retry-after", "1")], "").into_response(),
            None,
        );
    }
    if body["channel"] == "C-GONE" {
        return (
            Json(json!({"ok": false, "error": "channel_not_found"})).into_response(),
            None,
        );
    }
    let ts = format!("{}.{n:06}", chrono::Utc::now().timestamp());
    let stall = fake.stall.take();
    if stall != Some(Stall::BeforeAccept) {
        let mut message = body.clone();
        message["ts"] = json!(ts);
        fake.messages.push(message);
    }
    let answer = Json(json!({"ok": true, "channel": body["channel"], "ts": ts})).into_response();
    (answer, stall.map(|_| fake.stalled.clone()))
}

/// `conversations.replies` (a thread: `ts` is its parent) and `conversations.history` (the
/// channel), as Slack answers them: messages from `oldest` on, their `metadata` only with
/// `include_all_metadata=true`, at most two per page (Slack may return fewer than `limit`)
/// with a `next_cursor`.
async fn lookup(
    State(fake): State<Arc<Mutex<FakeSlack>>>,
    axum::extract::Path(method): axum::extract::Path<String>,
    headers: HeaderMap,
    axum::extract::Query(q): axum::extract::Query<HashMap<String, String>>,
) -> Response {
    if headers.get("authorization").and_then(|v| v.to_str().ok())
        != Some(&format!("Bearer {TOKEN}"))
    {
        return Json(json!({"ok": false, "error": "invalid_auth"})).into_response();
    }
    let mut fake = fake.lock().expect("lock");
    fake.lookups += 1;
    if fake.refuse_lookups {
        return Json(json!({"ok": false, "error": "missing_scope",
                           "needed": "channels:history", "provided": "chat:write"}))
        .into_response();
    }
    let oldest: f64 = q.get("oldest").and_then(|o| o.parse().ok()).unwrap_or(0.0);
    let matching: Vec<Value> = fake
        .messages
        .iter()
        .filter(|m| m["channel"] == q["channel"].as_str())
        .filter(|m| match method.as_str() {
            "conversations.replies" => m["thread_ts"] == q["ts"].as_str(),
            _ => m["thread_ts"].is_null(),
        })
        .filter(|m| m["ts"].as_str().and_then(|t| t.parse::<f64>().ok()) >= Some(oldest))
        .map(|m| {
            let mut m = m.clone();
            if q.get("include_all_metadata").map(String::as_str) != Some("true") {
                m.as_object_mut().expect("object").remove("metadata");
            }
            m
        })
        .collect();
    let start: usize = q.get("cursor").and_then(|c| c.parse().ok()).unwrap_or(0);
    let page: Vec<Value> = matching.iter().skip(start).take(2).cloned().collect();
    let next = if start + 2 < matching.len() {
        (start + 2).to_string()
    } else {
        String::new()
    };
    Json(
        json!({"ok": true, "messages": page, "has_more": !next.is_empty(),
                "response_metadata": {"next_cursor": next}}),
    )
    .into_response()
}

async fn fake_slack(rate_limit_next: usize) -> (String, Arc<Mutex<FakeSlack>>) {
    let state = Arc::new(Mutex::new(FakeSlack {
        rate_limit_next,
        ..FakeSlack::default()
    }));
    let app = Router::new()
        .route("/api/chat.postMessage", post(post_message))
        .route("/api/{method}", axum::routing::get(lookup))
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}/api"), state)
}

async fn reply(log: &EventLog, n: u32, channel: &str) -> EventId {
    let id = EventId::derive(&["test-reply", &n.to_string()]);
    let event = NewEvent::from_domain(
        id,
        &AgentReplied {
            workspace: "w".into(),
            agent: "alice".into(),
            reply_to: Origin::Slack {
                team_id: "T1".into(),
                channel: channel.into(),
                thread_ts: "1700000000.000100".into(),
                ts: "1700000000.000200".into(),
                user: "U1".into(),
            },
            text: format!("answer {n}"),
        },
        Metadata::new("test"),
    )
    .expect("event");
    log.append(&AppendRequest::new("conv", vec![event]))
        .await
        .expect("append");
    id
}

async fn delivered(db: &TestDatabase) -> Vec<Value> {
    sqlx::query_scalar(
        "SELECT payload FROM events WHERE event_type = 'reply.delivered' ORDER BY position",
    )
    .fetch_all(&db.pool)
    .await
    .expect("read")
}

async fn wait_until<F: AsyncFnMut() -> bool>(what: &str, mut done: F) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs a reply follower until `n` deliveries are recorded, then stops it.
async fn deliver_until(db: &TestDatabase, slack: &SlackApi, n: usize) {
    let shutdown = CancellationToken::new();
    let runner = tokio::spawn(replies::run(db.log(), slack.clone(), shutdown.clone()));
    wait_until("the delivery records", async || {
        delivered(db).await.len() == n
    })
    .await;
    shutdown.cancel();
    runner.await.expect("task").expect("clean stop");
}

/// A follower that dies while its post is in flight, `stall` (before or after Slack
/// accepted it); its lease, which would run out after the TTL, is ended at once.
async fn crash_while_posting(
    db: &TestDatabase,
    slack: &SlackApi,
    fake: &Mutex<FakeSlack>,
    stall: Stall,
) {
    let stalled = {
        let mut f = fake.lock().expect("lock");
        f.stall = Some(stall);
        f.stalled.clone()
    };
    let crashed = tokio::spawn(replies::run(
        db.log(),
        slack.clone(),
        CancellationToken::new(),
    ));
    tokio::time::timeout(Duration::from_secs(20), stalled.notified())
        .await
        .expect("the post reached Slack");
    crashed.abort();
    let _ = crashed.await;
    sqlx::query("UPDATE leases SET expires_at = now() - interval '1 second' WHERE name = $1")
        .bind(replies::DELIVERY_LEASE)
        .execute(&db.pool)
        .await
        .expect("expire");
}

#[tokio::test]
async fn a_reply_is_posted_in_its_thread_after_a_429_and_recorded_once() {
    let db = TestDatabase::new().await;
    let log = db.log();
    let (url, fake) = fake_slack(1).await;
    let id = reply(&log, 1, "C1").await;

    let shutdown = CancellationToken::new();
    let slack = SlackApi::new(&url, Secret::new(TOKEN)).expect("client");
    let runner = tokio::spawn(replies::run(log.clone(), slack, shutdown.clone()));
    wait_until("the delivery record", async || {
        delivered(&db).await.len() == 1
    })
    .await;
    shutdown.cancel();
    runner.await.expect("task").expect("clean stop");

    let calls = fake.lock().expect("lock").calls.clone();
    assert_eq!(calls.len(), 2, "one 429, then the post");
    assert!(calls.iter().all(|(auth, _)| *auth), "bearer token sent");
    assert_eq!(calls[1].1["channel"], "C1");
    assert_eq!(
        calls[1].1["thread_ts"], "1700000000.000100",
        "in the originating thread"
    );
    assert_eq!(calls[1].1["text"], "answer 1");
    let record = &delivered(&db).await[0];
    assert_eq!(record["reply_id"], json!(id.to_string()));
    let held = fake.lock().expect("lock").messages[0]["ts"].clone();
    assert_eq!(record["ts"], held, "Slack's ts of the posted message");
}

/// The control plane's own notices ("workspace failed ...") are recorded in its decisions
/// stream, whose version is the leader's fence: the gateway's records of their delivery go
/// in a stream of its own. A record in the decisions stream made the leader's next
/// decision a version conflict, and deposed it.
#[tokio::test]
async fn delivering_a_control_plane_notice_leaves_the_decisions_stream_alone() {
    const DECISIONS: &str = "control-plane:decisions";
    let db = TestDatabase::new().await;
    let log = db.log();
    let (url, fake) = fake_slack(0).await;
    let notice = NewEvent::from_domain(
        EventId::derive(&["test-notice"]),
        &AgentReplied {
            workspace: "w".into(),
            agent: "warren".into(),
            reply_to: Origin::Slack {
                team_id: "T1".into(),
                channel: "C1".into(),
                thread_ts: "1700000000.000100".into(),
                ts: "1700000000.000100".into(),
                user: "U1".into(),
            },
            text: "Workspace w failed 2 times in a row and was stopped".into(),
        },
        Metadata::new("control-plane"),
    )
    .expect("event");
    log.append(&AppendRequest::new(DECISIONS, vec![notice]))
        .await
        .expect("append");
    let before = log.stream_version(DECISIONS).await.expect("version");

    let slack = SlackApi::new(&url, Secret::new(TOKEN)).expect("client");
    deliver_until(&db, &slack, 1).await;

    assert_eq!(fake.lock().expect("lock").messages.len(), 1, "posted once");
    assert_eq!(
        log.stream_version(DECISIONS).await.expect("version"),
        before,
        "the leader's fence did not move"
    );
    let records = log
        .read_stream(warren_schema::events::REPLIES_STREAM, 0, 10)
        .await
        .expect("read");
    let types: Vec<&str> = records.iter().map(|e| e.event_type.as_str()).collect();
    assert_eq!(types, ["reply.post_started", "reply.delivered"]);
}

/// Every gateway replica runs the reply follower (the chart runs two). One delivers; the
/// other waits, and takes over when the first stops. Slack sees each reply once.
#[tokio::test]
async fn of_two_gateway_replicas_one_delivers_and_the_other_takes_over() {
    let db = TestDatabase::new().await;
    let log = db.log();
    let (url, fake) = fake_slack(0).await;
    let slack = SlackApi::new(&url, Secret::new(TOKEN)).expect("client");
    let (first_stop, second_stop) = (CancellationToken::new(), CancellationToken::new());
    let first = tokio::spawn(replies::run(log.clone(), slack.clone(), first_stop.clone()));
    reply(&log, 1, "C1").await;
    wait_until("the first delivery", async || {
        delivered(&db).await.len() == 1
    })
    .await;
    // The first delivers; now a second replica starts beside it.
    let second = tokio::spawn(replies::run(log.clone(), slack, second_stop.clone()));
    for n in 2..=3 {
        reply(&log, n, "C1").await;
    }
    wait_until("three deliveries", async || delivered(&db).await.len() == 3).await;
    // The first stops; the second takes over and delivers what comes next.
    first_stop.cancel();
    first.await.expect("task").expect("stop");
    reply(&log, 4, "C1").await;
    wait_until("the fourth delivery", async || {
        delivered(&db).await.len() == 4
    })
    .await;
    second_stop.cancel();
    second.await.expect("task").expect("stop");

    let texts: Vec<String> = fake
        .lock()
        .expect("lock")
        .calls
        .iter()
        .map(|(_, b)| b["text"].as_str().expect("text").to_owned())
        .collect();
    assert_eq!(
        texts,
        ["answer 1", "answer 2", "answer 3", "answer 4"],
        "each reply posted once, by one replica"
    );
}

#[tokio::test]
async fn a_restart_neither_loses_nor_repeats_a_delivery() {
    let db = TestDatabase::new().await;
    let log = db.log();
    let (url, fake) = fake_slack(0).await;
    let slack = SlackApi::new(&url, Secret::new(TOKEN)).expect("client");

    // First run delivers reply 1 and stops.
    reply(&log, 1, "C1").await;
    let shutdown = CancellationToken::new();
    let runner = tokio::spawn(replies::run(log.clone(), slack.clone(), shutdown.clone()));
    wait_until("the first delivery", async || {
        delivered(&db).await.len() == 1
    })
    .await;
    shutdown.cancel();
    runner.await.expect("task").expect("stop");

    // While the gateway is down, another reply is recorded, and one to a channel Slack
    // refuses.
    reply(&log, 2, "C-GONE").await;
    reply(&log, 3, "C1").await;

    // The restarted gateway delivers what is new, and only that.
    let shutdown = CancellationToken::new();
    let runner = tokio::spawn(replies::run(log.clone(), slack, shutdown.clone()));
    wait_until("the second delivery", async || {
        delivered(&db).await.len() == 2
    })
    .await;
    // Let it reach its checkpoint, then stop.
    wait_until("the checkpoint", async || {
        let cp: Option<i64> = sqlx::query_scalar(
            "SELECT position FROM subscription_checkpoints WHERE name = 'gateway.replies'",
        )
        .fetch_optional(&db.pool)
        .await
        .expect("cp");
        let last: i64 = sqlx::query_scalar(
            "SELECT max(position) FROM events WHERE event_type = 'agent.replied'",
        )
        .fetch_one(&db.pool)
        .await
        .expect("max");
        cp.unwrap_or(0) >= last
    })
    .await;
    shutdown.cancel();
    runner.await.expect("task").expect("stop");

    let texts: Vec<String> = fake
        .lock()
        .expect("lock")
        .calls
        .iter()
        .filter(|(_, b)| b["channel"] == "C1")
        .map(|(_, b)| b["text"].as_str().expect("text").to_owned())
        .collect();
    assert_eq!(
        texts,
        vec!["answer 1", "answer 3"],
        "each reply posted exactly once"
    );
    assert_eq!(
        delivered(&db).await.len(),
        2,
        "the refused reply is not recorded as delivered"
    );
}

#[tokio::test]
async fn broadcasts_are_escaped_unless_the_agent_is_configured_to_send_them() {
    let db = TestDatabase::new().await;
    let log = db.log();
    let (url, fake) = fake_slack(0).await;
    // herald may notify the channel; alice may not (no setting: the default).
    let configured = NewEvent::from_domain(
        EventId::random(),
        &warren_schema::events::AgentConfigured {
            name: "herald".into(),
            workspace: "w".into(),
            driver: "echo".into(),
            settings: json!({"allow_broadcasts": true}),
            idle_timeout_secs: 60,
        },
        Metadata::new("test"),
    )
    .expect("event");
    log.append(&AppendRequest::new("config", vec![configured]))
        .await
        .expect("append");
    for agent in ["herald", "alice"] {
        let event = NewEvent::from_domain(
            EventId::random(),
            &AgentReplied {
                workspace: "w".into(),
                agent: agent.into(),
                reply_to: Origin::Slack {
                    team_id: "T1".into(),
                    channel: "C1".into(),
                    thread_ts: "1.0".into(),
                    ts: "1.0".into(),
                    user: "U1".into(),
                },
                text: format!("<!here> from {agent}"),
            },
            Metadata::new("test"),
        )
        .expect("event");
        log.append(&AppendRequest::new("conv", vec![event]))
            .await
            .expect("append");
    }
    let shutdown = CancellationToken::new();
    let slack = SlackApi::new(&url, Secret::new(TOKEN)).expect("client");
    let runner = tokio::spawn(replies::run(log.clone(), slack, shutdown.clone()));
    wait_until("both deliveries", async || delivered(&db).await.len() == 2).await;
    shutdown.cancel();
    runner.await.expect("task").expect("clean stop");
    let texts: Vec<Value> = fake
        .lock()
        .expect("lock")
        .calls
        .iter()
        .map(|(_, body)| body["text"].clone())
        .collect();
    assert_eq!(
        texts,
        [
            json!("<!here> from herald"),
            json!("&lt;!here&gt; from alice")
        ]
    );
}

/// A crash while a post is in flight, before and after Slack accepted it: the restarted
/// gateway finds the accepted one in the thread by the reply id in its metadata and records
/// it without posting again, and posts the one Slack never accepted. Each reply is in Slack
/// exactly once.
#[tokio::test]
async fn a_crash_around_slacks_accept_leaves_each_reply_in_slack_once() {
    let db = TestDatabase::new().await;
    let log = db.log();
    let (url, fake) = fake_slack(0).await;
    let slack = SlackApi::new(&url, Secret::new(TOKEN)).expect("client");
    // Earlier messages in the thread (several pages of the lookup).
    for n in 0..3 {
        fake.lock().expect("lock").messages.push(json!({
            "channel": "C1", "thread_ts": "1700000000.000100", "text": format!("chatter {n}"),
            "ts": format!("{}.{n:06}", chrono::Utc::now().timestamp())}));
    }

    for (n, stall) in [(1, Stall::AfterAccept), (2, Stall::BeforeAccept)] {
        let id = reply(&log, n, "C1").await;
        crash_while_posting(&db, &slack, &fake, stall).await;
        deliver_until(&db, &slack, n as usize).await;

        let (in_slack, lookups) = {
            let fake = fake.lock().expect("lock");
            let in_slack: Vec<Value> = fake
                .messages
                .iter()
                .filter(|m| m["metadata"]["event_payload"]["reply_id"] == json!(id.to_string()))
                .cloned()
                .collect();
            (in_slack, fake.lookups)
        };
        assert_eq!(in_slack.len(), 1, "reply {n} is in Slack once");
        assert_eq!(in_slack[0]["text"], format!("answer {n}"));
        assert_eq!(in_slack[0]["thread_ts"], "1700000000.000100");
        let record = delivered(&db).await.pop().expect("record");
        assert_eq!(record["reply_id"], json!(id.to_string()));
        assert_eq!(record["ts"], in_slack[0]["ts"], "the message Slack holds");
        assert!(lookups > 0, "the restart looked before posting");
    }
    let started = log.read_type("reply.post_started", 0, 10).await.expect("r");
    assert_eq!(
        started.len(),
        2,
        "one intent per reply, whatever the restarts"
    );
}

/// Without the `*:history` scopes Slack refuses the lookup (`missing_scope`). A restart that
/// cannot look posts the reply again: at least once rather than lost, as documented. It
/// is recorded delivered once, with the `ts` of the post it made.
#[tokio::test]
async fn a_refused_lookup_after_a_crash_posts_the_reply_again_rather_than_lose_it() {
    let db = TestDatabase::new().await;
    let log = db.log();
    let (url, fake) = fake_slack(0).await;
    let slack = SlackApi::new(&url, Secret::new(TOKEN)).expect("client");
    let id = reply(&log, 1, "C1").await;
    fake.lock().expect("lock").refuse_lookups = true;
    crash_while_posting(&db, &slack, &fake, Stall::AfterAccept).await;
    deliver_until(&db, &slack, 1).await;

    let record = delivered(&db).await.pop().expect("record");
    let fake = fake.lock().expect("lock");
    assert!(fake.lookups > 0, "the restart asked Slack first");
    let in_slack: Vec<&Value> = fake
        .messages
        .iter()
        .filter(|m| m["metadata"]["event_payload"]["reply_id"] == json!(id.to_string()))
        .collect();
    assert_eq!(in_slack.len(), 2, "posted again: the lookup was refused");
    assert_eq!(record["ts"], in_slack[1]["ts"], "the post the restart made");
}
