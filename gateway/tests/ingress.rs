//! The gateway's HTTP ingress against a real PostgreSQL: signed requests built with the real
//! algorithms, answered by the real router; what is stored is read back from the log.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use serde_json::{Value, json};
use sha2::Sha256;
use tower::ServiceExt;
use warren_gateway::http::{AppState, router};
use warren_gateway::webhook::{Endpoint, Scheme};
use warren_schema::Secret;
use warren_schema::event_log::{Appender, AppenderConfig};
use warren_schema::testing::TestDatabase;

const SLACK_SECRET: &str = "8f742231b10e8888abcd99yyyzzz85a5";
const GITHUB_SECRET: &str = "It's a Secret to Everybody";
const STD_KEY: &[u8] = b"standard webhooks signing key";
const MAX_BODY: usize = 64 * 1024;

fn hmac(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    let mut m = Hmac::<Sha256>::new_from_slice(key).expect("key");
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().to_vec()
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

fn app(db: &TestDatabase) -> Router {
    let (appender, _writers) = Appender::start(db.pool.clone(), AppenderConfig::default());
    state_router(appender, db.pool.clone(), 64 << 20)
}

fn state_router(appender: Appender, pool: sqlx::PgPool, queued_bytes: usize) -> Router {
    let endpoint = |name: &str, scheme, secret: String| {
        (
            name.to_owned(),
            Endpoint {
                name: name.into(),
                scheme,
                secret: Secret::new(secret),
                previous: None,
                agent: "triage".into(),
                signature_header: "x-signature-256",
                delivery_header: None,
            },
        )
    };
    let webhooks: HashMap<String, Endpoint> = [
        endpoint("github", Scheme::Github, GITHUB_SECRET.into()),
        endpoint(
            "svix",
            Scheme::StandardWebhooks,
            format!(
                "whsec_{}",
                base64::engine::general_purpose::STANDARD.encode(STD_KEY)
            ),
        ),
        endpoint("ci", Scheme::HmacSha256, "ci-secret".into()),
    ]
    .into_iter()
    .collect();
    router(
        AppState {
            appender,
            pool,
            slack_signing_secret: Some(Secret::new(SLACK_SECRET)),
            webhooks: warren_gateway::webhook::registry::Registry::new(webhooks),
            append_timeout: Duration::from_millis(1500),
            retry_after_secs: 1,
            queued_bytes: warren_gateway::http::QueuedBytes::new(queued_bytes),
        },
        MAX_BODY,
    )
}

fn slack_request(secret: &str, ts: i64, body: &[u8], retry: Option<u32>) -> Request<Body> {
    let sig = hex::encode(hmac(
        secret.as_bytes(),
        &[b"v0:", ts.to_string().as_bytes(), b":", body],
    ));
    let mut req = Request::post("/slack/events")
        .header("content-type", "application/json")
        .header("x-slack-request-timestamp", ts.to_string())
        .header("x-slack-signature", format!("v0={sig}"));
    if let Some(n) = retry {
        req = req
            .header("x-slack-retry-num", n.to_string())
            .header("x-slack-retry-reason", "http_timeout");
    }
    req.body(Body::from(body.to_vec())).expect("request")
}

fn mention(event_id: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "type": "event_callback", "team_id": "T1", "event_id": event_id,
        "event_time": now(), "authorizations": [{"user_id": "UAPP"}],
        "event": {"type": "app_mention", "user": "U1", "channel": "C1",
                  "text": "<@UAPP> @alice please look", "ts": "1700000000.000100"},
    }))
    .expect("json")
}

async fn send(app: &Router, req: Request<Body>) -> (StatusCode, Value, Option<String>) {
    let response = app.clone().oneshot(req).await.expect("response");
    let status = response.status();
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().expect("ascii").to_owned());
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .expect("body");
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (status, body, retry_after)
}

async fn stored(db: &TestDatabase) -> Vec<(String, String)> {
    sqlx::query_as("SELECT event_type, stream FROM events ORDER BY position")
        .fetch_all(&db.pool)
        .await
        .expect("read")
}

#[tokio::test]
async fn a_signed_mention_is_stored_once_however_often_slack_retries() {
    let db = TestDatabase::new().await;
    let app = app(&db);
    let body = mention("Ev1");
    let (status, _, _) = send(&app, slack_request(SLACK_SECRET, now(), &body, None)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        stored(&db).await,
        vec![
            ("slack.event_received".into(), "slack:T1:C1".into()),
            ("message.received".into(), "slack:T1:C1".into()),
        ]
    );
    // Slack's retries, sequential and concurrent.
    for n in 1..=3 {
        let (status, _, _) = send(&app, slack_request(SLACK_SECRET, now(), &body, Some(n))).await;
        assert_eq!(status, StatusCode::OK);
    }
    let mut handles = Vec::new();
    for _ in 0..10 {
        let (app, body) = (app.clone(), body.clone());
        handles.push(tokio::spawn(async move {
            send(&app, slack_request(SLACK_SECRET, now(), &body, Some(1)))
                .await
                .0
        }));
    }
    for h in handles {
        assert_eq!(h.await.expect("task"), StatusCode::OK);
    }
    assert_eq!(stored(&db).await.len(), 2, "one delivery, stored once");

    // The same message delivered again as a `message` event (another event_id) is one
    // more raw event, not a second message for the agent.
    let as_message = String::from_utf8(mention("Ev2"))
        .expect("utf8")
        .replace("app_mention", "message");
    let (status, _, _) = send(
        &app,
        slack_request(SLACK_SECRET, now(), as_message.as_bytes(), None),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let types: Vec<String> = stored(&db).await.into_iter().map(|(t, _)| t).collect();
    assert_eq!(types.iter().filter(|t| *t == "message.received").count(), 1);
}

#[tokio::test]
async fn bad_signatures_are_refused_with_nothing_stored_and_nothing_leaked() {
    let db = TestDatabase::new().await;
    let app = app(&db);
    let body = mention("Ev1");
    let cases = [
        (
            "wrong secret",
            slack_request("not-the-secret", now(), &body, None),
        ),
        (
            "stale",
            slack_request(SLACK_SECRET, now() - 301, &body, None),
        ),
        (
            "future",
            slack_request(SLACK_SECRET, now() + 301, &body, None),
        ),
        ("tampered", {
            let mut r = slack_request(SLACK_SECRET, now(), &body, None);
            let mut tampered = body.clone();
            tampered[20] ^= 1;
            *r.body_mut() = Body::from(tampered);
            r
        }),
        (
            "missing headers",
            Request::post("/slack/events")
                .body(Body::from(body.clone()))
                .expect("request"),
        ),
    ];
    for (name, req) in cases {
        let (status, body, _) = send(&app, req).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{name}");
        let text = body.to_string();
        assert!(!text.contains(SLACK_SECRET), "{name}: secret leaked");
        assert!(text.contains("unauthorized"), "{name}: {text}");
    }
    assert!(stored(&db).await.is_empty());
}

#[tokio::test]
async fn url_verification_bots_and_malformed_bodies() {
    let db = TestDatabase::new().await;
    let app = app(&db);
    let challenge = br#"{"type":"url_verification","challenge":"c-123","token":"t"}"#;
    let (status, body, _) = send(&app, slack_request(SLACK_SECRET, now(), challenge, None)).await;
    assert_eq!(
        (status, body),
        (StatusCode::OK, json!({"challenge": "c-123"}))
    );

    let echo = serde_json::to_vec(&json!({
        "type": "event_callback", "team_id": "T1", "event_id": "Ev9", "event_time": now(),
        "authorizations": [{"user_id": "UAPP"}],
        "event": {"type": "message", "user": "UAPP", "bot_id": "B1", "channel": "C1",
                  "text": "my own reply", "ts": "1.1"},
    }))
    .expect("json");
    let (status, _, _) = send(&app, slack_request(SLACK_SECRET, now(), &echo, None)).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "Slack must not retry an ignored echo"
    );

    let (status, body, _) =
        send(&app, slack_request(SLACK_SECRET, now(), b"{not json", None)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body["error"]
            .as_str()
            .expect("message")
            .contains("malformed")
    );
    assert!(stored(&db).await.is_empty());
}

fn github_request(delivery: &str, body: &[u8], secret: &str) -> Request<Body> {
    let sig = hex::encode(hmac(secret.as_bytes(), &[body]));
    Request::post("/webhooks/github")
        .header("content-type", "application/json")
        .header("x-github-delivery", delivery)
        .header("x-github-event", "issues")
        .header("x-hub-signature-256", format!("sha256={sig}"))
        .body(Body::from(body.to_vec()))
        .expect("request")
}

#[tokio::test]
async fn webhooks_verify_per_scheme_and_absorb_redeliveries() {
    let db = TestDatabase::new().await;
    let app = app(&db);
    let body = br#"{"action":"opened","issue":{"number":7}}"#;

    let (status, _, _) = send(&app, github_request("d-1", body, GITHUB_SECRET)).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, _) = send(&app, github_request("d-1", body, GITHUB_SECRET)).await;
    assert_eq!(status, StatusCode::OK, "a redelivery is acked");
    assert_eq!(stored(&db).await.len(), 2, "and stored once");
    // The same signed body replayed under a new delivery id (GitHub signs the body only,
    // so anyone who saw it could): absorbed, the agent does not run again.
    let (status, _, _) = send(&app, github_request("d-replayed", body, GITHUB_SECRET)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(stored(&db).await.len(), 2, "a replay stores nothing");
    let (status, _, _) = send(&app, github_request("d-2", body, "wrong")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // Standard Webhooks.
    let ts = now().to_string();
    let sig = base64::engine::general_purpose::STANDARD
        .encode(hmac(STD_KEY, &[b"msg_1.", ts.as_bytes(), b".", body]));
    let std_req = |sig: &str| {
        Request::post("/webhooks/svix")
            .header("content-type", "application/json")
            .header("webhook-id", "msg_1")
            .header("webhook-timestamp", ts.clone())
            .header("webhook-signature", format!("v1,{sig}"))
            .body(Body::from(body.to_vec()))
            .expect("request")
    };
    assert_eq!(send(&app, std_req(&sig)).await.0, StatusCode::OK);
    assert_eq!(
        send(&app, std_req("AAAA")).await.0,
        StatusCode::UNAUTHORIZED
    );

    // Plain HMAC without a delivery id: the body hash absorbs an identical redelivery.
    let ci = |body: &'static [u8]| {
        Request::post("/webhooks/ci")
            .header("x-signature-256", hex::encode(hmac(b"ci-secret", &[body])))
            .body(Body::from(body))
            .expect("request")
    };
    assert_eq!(send(&app, ci(b"build 42 failed")).await.0, StatusCode::OK);
    assert_eq!(send(&app, ci(b"build 42 failed")).await.0, StatusCode::OK);

    let streams: Vec<String> = stored(&db).await.into_iter().map(|(_, s)| s).collect();
    assert_eq!(
        streams,
        vec![
            "webhook:github",
            "webhook:github",
            "webhook:svix",
            "webhook:svix",
            "webhook:ci",
            "webhook:ci"
        ]
    );
    // The message is addressed to the endpoint's agent.
    let agents: Vec<Value> = sqlx::query_scalar(
        "SELECT payload->'addressed_agents' FROM events WHERE event_type = 'message.received'",
    )
    .fetch_all(&db.pool)
    .await
    .expect("read");
    assert!(agents.iter().all(|a| *a == json!(["triage"])));
}

#[tokio::test]
async fn unknown_endpoints_oversize_and_malformed_json_store_nothing() {
    let db = TestDatabase::new().await;
    let app = app(&db);
    let unknown = Request::post("/webhooks/nope")
        .body(Body::from("{}"))
        .expect("request");
    assert_eq!(send(&app, unknown).await.0, StatusCode::NOT_FOUND);

    let big = vec![b'a'; MAX_BODY + 1];
    let (status, _, _) = send(&app, github_request("d-big", &big, GITHUB_SECRET)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);

    let (status, _, _) = send(&app, github_request("d-bad", b"{oops", GITHUB_SECRET)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(stored(&db).await.is_empty());
}

#[tokio::test]
async fn database_down_answers_503_with_retry_after_quickly() {
    // A pool pointing at a port where nothing listens: PostgreSQL unreachable.
    let pool = sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(Duration::from_millis(500))
        .connect_lazy("postgres://postgres@127.0.0.1:1/warren")
        .expect("lazy pool");
    let (appender, _writers) = Appender::start(pool.clone(), AppenderConfig::default());
    let app = state_router(appender, pool, 64 << 20);

    let started = Instant::now();
    let (status, body, retry_after) = send(
        &app,
        slack_request(SLACK_SECRET, now(), &mention("Ev1"), None),
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(retry_after.as_deref(), Some("1"));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "answered in {:?}; Slack gives up after 3 s",
        started.elapsed()
    );
    assert!(
        !body.to_string().contains("127.0.0.1"),
        "no internal detail"
    );

    let ready = Request::get("/readyz")
        .body(Body::empty())
        .expect("request");
    assert_eq!(send(&app, ready).await.0, StatusCode::SERVICE_UNAVAILABLE);
    let health = Request::get("/healthz")
        .body(Body::empty())
        .expect("request");
    assert_eq!(send(&app, health).await.0, StatusCode::OK);
}

#[tokio::test]
async fn past_the_bytes_the_append_queue_may_hold_senders_get_503_and_nothing_is_stored() {
    let db = TestDatabase::new().await;
    let (appender, _writers) = Appender::start(db.pool.clone(), AppenderConfig::default());
    let body = mention("Ev1");
    // Room for less than one body: the queue holds no request, however few are queued.
    let app = state_router(appender, db.pool.clone(), body.len() - 1);
    let (status, _, retry_after) =
        send(&app, slack_request(SLACK_SECRET, now(), &body, None)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(retry_after.as_deref(), Some("1"));
    assert!(stored(&db).await.is_empty());
    // With room for it, the same delivery is stored.
    let (appender, _writers) = Appender::start(db.pool.clone(), AppenderConfig::default());
    let app = state_router(appender, db.pool.clone(), body.len());
    let (status, _, _) = send(&app, slack_request(SLACK_SECRET, now(), &body, None)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(stored(&db).await.len(), 2);
}

#[tokio::test]
async fn readyz_is_ready_with_a_database() {
    let db = TestDatabase::new().await;
    let app = app(&db);
    let ready = Request::get("/readyz")
        .body(Body::empty())
        .expect("request");
    assert_eq!(send(&app, ready).await.0, StatusCode::OK);
}

fn command_request(secret: &str, text: &str, trigger: &str) -> Request<Body> {
    let body = serde_urlencoded::to_string([
        ("team_id", "T1"),
        ("channel_id", "C1"),
        ("user_id", "U1"),
        ("command", "/warren"),
        ("text", text),
        (
            "response_url",
            "https://hooks.slack.com/commands/T1/1/capability",
        ),
        ("trigger_id", trigger),
    ])
    .expect("form");
    let mut req = slack_request(secret, now(), body.as_bytes(), None);
    *req.uri_mut() = "/slack/commands".parse().expect("uri");
    req.headers_mut().insert(
        "content-type",
        "application/x-www-form-urlencoded".parse().expect("header"),
    );
    req
}

#[tokio::test]
async fn the_warren_slash_command_asks_an_agent_and_reports_status() {
    let db = TestDatabase::new().await;
    let app = app(&db);

    let (status, body, _) = send(
        &app,
        command_request(SLACK_SECRET, "ask @alice is CI green?", "tr-1"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["response_type"], "ephemeral");
    assert!(body["text"].as_str().expect("text").contains("@alice"));
    // Same invocation again: stored once.
    send(
        &app,
        command_request(SLACK_SECRET, "ask @alice is CI green?", "tr-1"),
    )
    .await;
    let rows: Vec<Value> = sqlx::query_scalar("SELECT payload FROM events")
        .fetch_all(&db.pool)
        .await
        .expect("read");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["addressed_agents"], json!(["alice"]));
    assert!(
        !rows[0].to_string().contains("hooks.slack.com"),
        "response_url is a capability and is not kept in the log"
    );

    let (status, body, _) = send(&app, command_request(SLACK_SECRET, "status", "tr-2")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        body["text"].as_str().expect("text").contains("position"),
        "{body}"
    );

    let (status, body, _) = send(&app, command_request(SLACK_SECRET, "", "tr-3")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body["text"].as_str().expect("text").contains("Usage"));

    let (status, _, _) = send(&app, command_request("wrong", "ask @alice hi", "tr-4")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM events")
            .fetch_one(&db.pool)
            .await
            .expect("count"),
        1
    );
}
