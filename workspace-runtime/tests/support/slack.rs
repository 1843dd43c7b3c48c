//! Slack's side of an end-to-end test: a local server speaking Slack's Web API
//! (`chat.postMessage`) and serving files as its file host does (bearer token), the gateway
//! in front of the log (real socket, real signatures), the reply delivery posting to that
//! server and the file follower downloading from it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::HeaderMap;
use axum::routing::{get, post};
use axum::{Json, Router};
use hmac::{Hmac, KeyInit, Mac};
use serde_json::{Value, json};
use sha2::Sha256;
use tokio_util::sync::CancellationToken;
use warren_gateway::http::{AppState, router, serve};
use warren_gateway::slack_api::SlackApi;
use warren_schema::Secret;
use warren_schema::event_log::{Appender, AppenderConfig};
use warren_schema::testing::TestDatabase;

pub const SIGNING_SECRET: &str = "e2e-signing-secret";
pub const BOT_TOKEN: &str = "xoxb-e2e";

/// What the local Slack server was asked to post.
pub type Posts = Arc<Mutex<Vec<Value>>>;

/// What the local file host serves at `/files-pri/{path}`: `contents of {path}\n`, to a
/// request with the bot token; 20,000 times over for a path with `LARGE` in it (several of
/// the control plane's slices).
pub fn file_content(path: &str) -> String {
    let line = format!("contents of {path}\n");
    if path.contains("LARGE") {
        line.repeat(20_000)
    } else {
        line
    }
}

/// A local Slack: the Web API's `chat.postMessage` under `{url}` (the `SLACK_API_URL`),
/// recording each post, and the file host under `{url without /api}/files-pri/`.
pub async fn slack_server() -> (String, Posts) {
    let posts: Posts = Arc::default();
    let seen = posts.clone();
    let app = Router::new()
        .route(
            "/files-pri/{*path}",
            get(
                |axum::extract::Path(path): axum::extract::Path<String>, headers: HeaderMap| async move {
                    let token = headers.get("authorization").and_then(|v| v.to_str().ok());
                    if token != Some(&format!("Bearer {BOT_TOKEN}")) {
                        return Err(axum::http::StatusCode::FORBIDDEN);
                    }
                    Ok(file_content(&path))
                },
            ),
        )
        .route(
        "/api/chat.postMessage",
        post(move |Json(body): Json<Value>| {
            let seen = seen.clone();
            async move {
                let mut posts = seen.lock().expect("lock");
                posts.push(body.clone());
                Json(json!({"ok": true, "channel": body["channel"],
                            "ts": format!("1700000200.{:06}", posts.len())}))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}/api"), posts)
}

/// Slack's signature headers for `body`, now.
pub fn signed(body: &str) -> (String, String) {
    let ts = chrono::Utc::now().timestamp().to_string();
    let mut mac = Hmac::<Sha256>::new_from_slice(SIGNING_SECRET.as_bytes()).expect("key");
    mac.update(format!("v0:{ts}:{body}").as_bytes());
    (
        ts,
        format!("v0={}", hex::encode(mac.finalize().into_bytes())),
    )
}

/// Posts `body` to the gateway at `gateway_url` as Slack does (signed now); its status.
pub async fn post_slack_event(gateway_url: &str, body: &Value) -> reqwest::StatusCode {
    let body = body.to_string();
    let (ts, sig) = signed(&body);
    reqwest::Client::new()
        .post(format!("{gateway_url}/slack/events"))
        .header("content-type", "application/json")
        .header("x-slack-request-timestamp", ts)
        .header("x-slack-signature", sig)
        .body(body)
        .send()
        .await
        .expect("gateway answers")
        .status()
}

/// The gateway (Slack events in, replies out) and the Slack server it posts to.
pub struct Gateway {
    pub url: String,
    /// Where the local Slack serves files (`{files_url}{path}`).
    pub files_url: String,
    pub posts: Posts,
    pub delivery: tokio::task::JoinHandle<warren_schema::Result<()>>,
}

impl Gateway {
    pub async fn start(db: &TestDatabase, shutdown: &CancellationToken) -> Self {
        let (slack_url, posts) = slack_server().await;
        // The gateway's own pool, as its own process has (8 connections, its default): it
        // shares the database with the control plane, not the connections.
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(8)
            .connect_lazy_with((*db.pool.connect_options()).clone());
        // Endpoints managed through the admin API, followed as the gateway binary does.
        let webhooks = warren_gateway::webhook::registry::Registry::default();
        tokio::spawn(webhooks.clone().follow(pool.clone(), shutdown.clone()));
        let (appender, _writers) = Appender::start(pool.clone(), AppenderConfig::default());
        let app = router(
            AppState {
                appender,
                pool: pool.clone(),
                slack_signing_secret: Some(Secret::new(SIGNING_SECRET)),
                webhooks,
                append_timeout: Duration::from_secs(2),
                retry_after_secs: 1,
                queued_bytes: warren_gateway::http::QueuedBytes::new(64 << 20),
            },
            1024 * 1024,
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let stop = shutdown.clone();
        tokio::spawn(serve(listener, app, Default::default(), async move {
            stop.cancelled().await
        }));
        let slack = SlackApi::new(&slack_url, Secret::new(BOT_TOKEN)).expect("client");
        let files_url = slack_url.trim_end_matches("/api").to_owned() + "/files-pri/";
        let limits = warren_gateway::files::FileLimits {
            files_url: files_url.clone(),
            max_bytes: 1 << 20,
        };
        let delivery = tokio::spawn(warren_gateway::run_slack_followers(
            warren_schema::EventLog::new(pool),
            slack,
            limits,
            shutdown.clone(),
        ));
        Self {
            url,
            files_url,
            posts,
            delivery,
        }
    }

    /// Posts a signed Slack event; the gateway's status.
    pub async fn slack_event(&self, body: &Value) -> reqwest::StatusCode {
        post_slack_event(&self.url, body).await
    }

    /// What was posted to Slack so far.
    pub fn posted(&self) -> Vec<Value> {
        self.posts.lock().expect("lock").clone()
    }
}
