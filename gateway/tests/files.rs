//! Files attached to Slack messages: the real Slack client downloads them from a local
//! server that serves files the way Slack's file host does (`url_private_download` with the
//! bot token as a bearer, chunked bodies, 503s, the sign-in page a token without
//! `files:read` gets), with a real PostgreSQL behind.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use warren_gateway::files::{self, FileLimits};
use warren_gateway::slack_api::SlackApi;
use warren_schema::events::{
    FileRef, MessageFileRefused, MessageFileStored, MessageReceived, Origin,
};
use warren_schema::testing::TestDatabase;
use warren_schema::{AppendRequest, EventId, EventLog, Metadata, NewEvent, Secret};

const TOKEN: &str = "xoxb-files-token";
const LIMIT: u64 = 1000;

/// What a file server was asked: path → (requests, authorized ones).
type Hits = Arc<Mutex<HashMap<String, (u32, u32)>>>;

#[derive(Clone, Default)]
struct FileHost {
    hits: Hits,
    /// Paths that answer 503 this many more times.
    failing: Arc<Mutex<HashMap<String, u32>>>,
}

async fn serve_file(
    State(host): State<FileHost>,
    Path(path): Path<String>,
    headers: HeaderMap,
) -> Response {
    let authorized = headers.get("authorization").and_then(|v| v.to_str().ok())
        == Some(&format!("Bearer {TOKEN}"));
    {
        let mut hits = host.hits.lock().expect("lock");
        let hit = hits.entry(path.clone()).or_default();
        hit.0 += 1;
        hit.1 += u32::from(authorized);
    }
    if !authorized || path.contains("FLOGIN") {
        // What Slack's file host answers without a usable token: its sign-in page, 200.
        return (
            [("content-type", "text/html; charset=utf-8")],
            "<!DOCTYPE html><html><title>Slack</title>sign in</html>",
        )
            .into_response();
    }
    if let Some(left) = host.failing.lock().expect("lock").get_mut(&path)
        && *left > 0
    {
        *left -= 1;
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    if path.contains("FBIG") {
        // No Content-Length: the limit must be kept while reading.
        let chunks = (0..10).map(|_| Ok::<_, std::io::Error>(vec![b'x'; 500]));
        return (
            [("content-type", "application/octet-stream")],
            Body::from_stream(futures_util::stream::iter(chunks)),
        )
            .into_response();
    }
    ([("content-type", "text/plain")], content(&path)).into_response()
}

/// The bytes the host serves at `path`.
fn content(path: &str) -> String {
    format!("contents of {path}\n")
}

async fn file_host() -> (String, FileHost) {
    let host = FileHost::default();
    let app = Router::new()
        .route("/files-pri/{*path}", get(serve_file))
        .with_state(host.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}/"), host)
}

fn file(id: &str, name: &str, url: String, size: Option<u64>) -> FileRef {
    FileRef {
        id: id.into(),
        name: Some(name.into()),
        mimetype: Some("text/plain".into()),
        url: Some(url),
        size,
    }
}

async fn message(log: &EventLog, n: u32, origin: Origin, files: Vec<FileRef>) -> EventId {
    let id = EventId::derive(&["files-test-message", &n.to_string()]);
    let event = NewEvent::from_domain(
        id,
        &MessageReceived {
            origin,
            text: "@alice see attached".into(),
            addressed_agents: vec!["alice".into()],
            files,
        },
        Metadata::new("test"),
    )
    .expect("event");
    log.append(&AppendRequest::new(format!("conv-{n}"), vec![event]))
        .await
        .expect("append");
    id
}

fn slack_origin() -> Origin {
    Origin::Slack {
        team_id: "T1".into(),
        channel: "C1".into(),
        thread_ts: "1700000000.000100".into(),
        ts: "1700000000.000100".into(),
        user: "U1".into(),
    }
}

async fn wait_until<F: AsyncFnMut() -> bool>(what: &str, mut done: F) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn outcomes(log: &EventLog) -> (Vec<MessageFileStored>, Vec<MessageFileRefused>) {
    let stored = log
        .read_type("message.file_stored", 0, 100)
        .await
        .expect("r");
    let refused = log
        .read_type("message.file_refused", 0, 100)
        .await
        .expect("r");
    (
        stored.iter().map(|e| e.decode().expect("stored")).collect(),
        refused
            .iter()
            .map(|e| e.decode().expect("refused"))
            .collect(),
    )
}

fn hits(host: &FileHost, path: &str) -> (u32, u32) {
    host.hits
        .lock()
        .expect("lock")
        .get(path)
        .copied()
        .unwrap_or_default()
}

#[tokio::test]
async fn attached_files_are_downloaded_once_with_the_bot_token_or_refused_with_a_reason() {
    let db = TestDatabase::new().await;
    let log = db.log();
    let (files_url, host) = file_host().await;
    let (elsewhere_url, elsewhere) = file_host().await;
    let at = |path: &str| format!("{files_url}files-pri/{path}");
    host.failing
        .lock()
        .expect("lock")
        .insert("T1-FFLAKY/flaky.txt".into(), 2);

    let files = vec![
        file(
            "FNOTES",
            "notes.txt",
            at("T1-FNOTES/download/notes.txt"),
            Some(30),
        ),
        file("FDOT", "../../home/.env", at("T1-FDOT/download/.env"), None),
        file("FBIG", "big.bin", at("T1-FBIG/big.bin"), None),
        file(
            "FHUGE",
            "huge.bin",
            at("T1-FHUGE/huge.bin"),
            Some(LIMIT + 1),
        ),
        file(
            "FAWAY",
            "away.txt",
            format!("{elsewhere_url}files-pri/T1-FAWAY/away.txt"),
            Some(5),
        ),
        file("FLOGIN", "login.txt", at("T1-FLOGIN/login.txt"), Some(5)),
        file("FFLAKY", "flaky.txt", at("T1-FFLAKY/flaky.txt"), Some(40)),
    ];
    let message_id = message(&log, 1, slack_origin(), files).await;
    // A webhook's message names no Slack files to fetch, whatever it carries.
    let webhook = Origin::Webhook {
        endpoint: "ci".into(),
        delivery_id: "1".into(),
    };
    message(
        &log,
        2,
        webhook,
        vec![file("FHOOK", "hook.txt", at("T1-FHOOK/hook.txt"), Some(5))],
    )
    .await;

    // Two gateway replicas: one downloads at a time.
    let shutdown = CancellationToken::new();
    let slack = SlackApi::new("http://127.0.0.1:9/api", Secret::new(TOKEN)).expect("client");
    let limits = FileLimits {
        files_url: files_url.clone(),
        max_bytes: LIMIT,
    };
    let replicas: Vec<_> = (0..2)
        .map(|_| {
            tokio::spawn(files::run(
                log.clone(),
                Some(slack.clone()),
                limits.clone(),
                shutdown.clone(),
            ))
        })
        .collect();
    wait_until("every file of the Slack message recorded", async || {
        let (stored, refused) = outcomes(&log).await;
        stored.len() + refused.len() == 7
    })
    .await;

    let (stored, refused) = outcomes(&log).await;
    let stored: HashMap<&str, &MessageFileStored> =
        stored.iter().map(|s| (s.file_id.as_str(), s)).collect();
    let refused: HashMap<&str, &str> = refused
        .iter()
        .map(|r| (r.file_id.as_str(), r.reason.as_str()))
        .collect();
    assert_eq!(
        stored
            .keys()
            .copied()
            .collect::<std::collections::BTreeSet<_>>(),
        ["FDOT", "FFLAKY", "FNOTES"].into(),
        "refused: {refused:?}"
    );
    assert_eq!(stored["FDOT"].name, "env", "no directories, no hidden name");
    assert_eq!(stored["FNOTES"].name, "notes.txt");
    assert!(
        refused["FBIG"].contains("limit of 1000 bytes"),
        "{refused:?}"
    );
    assert!(
        refused["FHUGE"].contains("limit of 1000 bytes"),
        "{refused:?}"
    );
    assert!(
        refused["FAWAY"].contains("not on Slack's file host"),
        "{refused:?}"
    );
    assert!(refused["FLOGIN"].contains("files:read"), "{refused:?}");
    assert!(!refused.contains_key("FHOOK"));

    // The bytes, as served, beside the log; each event names them by their SHA-256.
    for (id, path) in [
        ("FNOTES", "T1-FNOTES/download/notes.txt"),
        ("FDOT", "T1-FDOT/download/.env"),
        ("FFLAKY", "T1-FFLAKY/flaky.txt"),
    ] {
        let (bytes, sha256): (Vec<u8>, String) = sqlx::query_as(
            "SELECT content, sha256 FROM message_files WHERE message_id = $1 AND file_id = $2",
        )
        .bind(message_id.0)
        .bind(id)
        .fetch_one(&db.pool)
        .await
        .expect("row");
        assert_eq!(bytes, content(path).as_bytes(), "{id}");
        assert_eq!(sha256, hex::encode(Sha256::digest(&bytes)));
        assert_eq!(stored[id].sha256, sha256);
        assert_eq!(stored[id].size, bytes.len() as u64);
        assert_eq!(
            hits(&host, path).0,
            hits(&host, path).1,
            "always with the token"
        );
    }
    assert_eq!(
        hits(&host, "T1-FNOTES/download/notes.txt"),
        (1, 1),
        "once, two replicas"
    );
    assert_eq!(
        hits(&host, "T1-FFLAKY/flaky.txt"),
        (3, 3),
        "two 503s, then the file"
    );
    assert_eq!(
        hits(&host, "T1-FHUGE/huge.bin"),
        (0, 0),
        "announced too large: not fetched"
    );
    assert_eq!(hits(&host, "T1-FHOOK/hook.txt"), (0, 0));
    assert!(
        elsewhere.hits.lock().expect("lock").is_empty(),
        "the token never goes to another host"
    );

    // A crash before the checkpoint moved: the next run passes the message again, and
    // neither downloads nor records anything twice.
    shutdown.cancel();
    for replica in replicas {
        replica.await.expect("join").expect("stopped cleanly");
    }
    sqlx::query("UPDATE subscription_checkpoints SET position = 0 WHERE name = $1")
        .bind(files::CHECKPOINT)
        .execute(&db.pool)
        .await
        .expect("rewind");
    let later = message(
        &log,
        3,
        slack_origin(),
        vec![file(
            "FLATER",
            "later.txt",
            at("T1-FLATER/later.txt"),
            Some(30),
        )],
    )
    .await;
    let shutdown = CancellationToken::new();
    let replica = tokio::spawn(files::run(
        log.clone(),
        Some(slack),
        limits,
        shutdown.clone(),
    ));
    wait_until("the later message's file", async || {
        outcomes(&log).await.0.iter().any(|s| s.message_id == later)
    })
    .await;
    let (stored, refused) = outcomes(&log).await;
    assert_eq!(
        (stored.len(), refused.len()),
        (4, 4),
        "each file recorded once"
    );
    assert_eq!(
        hits(&host, "T1-FNOTES/download/notes.txt"),
        (1, 1),
        "not fetched again"
    );
    shutdown.cancel();
    replica.await.expect("join").expect("stopped cleanly");
}

/// A gateway without a bot token downloads nothing, and says so for each file at once: a
/// turn does not wait minutes for a file that cannot come.
#[tokio::test]
async fn without_a_bot_token_every_file_is_refused_at_once() {
    let db = TestDatabase::new().await;
    let log = db.log();
    let (files_url, host) = file_host().await;
    let url = format!("{files_url}files-pri/T1-FNOTES/notes.txt");
    message(
        &log,
        1,
        slack_origin(),
        vec![file("FNOTES", "notes.txt", url, Some(30))],
    )
    .await;
    let shutdown = CancellationToken::new();
    let limits = FileLimits {
        files_url,
        max_bytes: LIMIT,
    };
    let follower = tokio::spawn(files::run(log.clone(), None, limits, shutdown.clone()));
    wait_until("the refusal", async || !outcomes(&log).await.1.is_empty()).await;
    let (stored, refused) = outcomes(&log).await;
    assert!(stored.is_empty());
    assert!(refused[0].reason.contains("SLACK_BOT_TOKEN"), "{refused:?}");
    assert!(
        host.hits.lock().expect("lock").is_empty(),
        "nothing fetched"
    );
    shutdown.cancel();
    follower.await.expect("join").expect("stopped cleanly");
}
