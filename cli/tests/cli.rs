//! The real `warren` binary against the real admin API (on a real PostgreSQL): what it
//! prints, and the exit codes scripts rely on.

use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::AsyncBufReadExt;
use tokio_util::sync::CancellationToken;
use warren_control_plane::admin_api::{self, Role};
use warren_schema::testing::TestDatabase;

struct Server {
    url: String,
    admin: String,
    _db: TestDatabase,
    shutdown: CancellationToken,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn server() -> Server {
    let db = TestDatabase::new().await;
    let log = db.log();
    let shutdown = CancellationToken::new();
    let url = admin_api::serve_on_loopback(log.clone(), Default::default(), shutdown.clone())
        .await
        .expect("served");
    let (_, admin) = admin_api::tokens::issue_direct(&log, "admin", Role::Admin, None, "test")
        .await
        .expect("token");
    let server = Server {
        url,
        admin: admin.expose().to_owned(),
        _db: db,
        shutdown,
    };
    // Ready once the token works.
    let deadline = Instant::now() + Duration::from_secs(20);
    while server.warren(&["agents", "list"]).await.0 != 0 {
        assert!(
            Instant::now() < deadline,
            "the API never accepted the token"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    server
}

impl Server {
    /// Runs `warren args` with this server and the admin token (from the environment, never
    /// the command line): exit code, stdout, stderr.
    async fn warren(&self, args: &[&str]) -> (i32, String, String) {
        self.warren_as(Some(&self.admin), args).await
    }

    async fn warren_as(&self, token: Option<&str>, args: &[&str]) -> (i32, String, String) {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_warren"));
        command
            .args(args)
            .env("WARREN_SERVER", &self.url)
            .env_remove("WARREN_CLI_CONFIG")
            .env("HOME", std::env::temp_dir())
            .env_remove("WARREN_TOKEN_FILE");
        match token {
            Some(t) => command.env("WARREN_TOKEN", t),
            None => command.env_remove("WARREN_TOKEN"),
        };
        let output = command.output().await.expect("warren runs");
        (
            output.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_are_created_listed_and_read_as_tables_and_as_json() {
    let s = server().await;
    let (code, _, err) = s
        .warren(&[
            "agents",
            "create",
            "alice",
            "--workspace",
            "research",
            "--settings",
            r#"{"model": "gpt-5"}"#,
        ])
        .await;
    assert_eq!(code, 0, "{err}");
    let (code, table, _) = s.warren(&["agents", "list"]).await;
    assert_eq!(code, 0);
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].starts_with("NAME") && lines[0].contains("WORKSPACE"),
        "{table}"
    );
    assert!(
        lines[1].starts_with("alice")
            && lines[1].contains("research")
            && lines[1].contains("gpt-5"),
        "{table}"
    );

    let (code, json, _) = s.warren(&["agents", "list", "--output", "json"]).await;
    assert_eq!(code, 0);
    let agents: Value = serde_json::from_str(&json).expect("json");
    assert_eq!(agents[0]["name"], "alice");
    assert_eq!(agents[0]["settings"]["model"], "gpt-5");

    let (_, json, _) = s.warren(&["-o", "json", "agents", "get", "alice"]).await;
    let alice: Value = serde_json::from_str(&json).expect("json");
    let version = alice["version"].to_string();

    // Routes, workspaces, events and the audit read back what was done.
    assert_eq!(
        s.warren(&["routes", "set", "slack_channel:C1", "alice"])
            .await
            .0,
        0
    );
    let (_, routes, _) = s.warren(&["routes", "list"]).await;
    assert!(
        routes.contains("slack_channel:C1") && routes.contains("alice"),
        "{routes}"
    );
    let (_, workspaces, _) = s.warren(&["workspaces", "list"]).await;
    assert!(
        workspaces
            .lines()
            .nth(1)
            .is_some_and(|l| l.starts_with("research") && l.contains("stopped")),
        "{workspaces}"
    );
    let (_, events, _) = s
        .warren(&["events", "--type", "agent.configured,route.configured"])
        .await;
    assert_eq!(
        events.lines().count(),
        3,
        "a heading and two events: {events}"
    );
    let (_, audit, _) = s.warren(&["audit"]).await;
    assert!(
        audit.contains("agent.configured") && audit.contains("admin"),
        "{audit}"
    );

    // An endpoint: the secret printed once, then only its fingerprint.
    let (code, secret, err) = s
        .warren(&[
            "endpoints",
            "create",
            "ci",
            "--scheme",
            "github",
            "--agent",
            "alice",
        ])
        .await;
    assert_eq!(code, 0, "{err}");
    let secret = secret.trim().to_owned();
    assert_eq!(secret.len(), 64, "{secret}");
    let (_, listed, _) = s.warren(&["endpoints", "list"]).await;
    assert!(
        listed.contains("ci") && listed.contains("github") && !listed.contains(&secret),
        "{listed}"
    );
    let (code, rotated, _) = s
        .warren(&["endpoints", "rotate", "ci", "--grace-secs", "60"])
        .await;
    assert_eq!(code, 0);
    assert_ne!(rotated.trim(), secret);
    let (_, listed, _) = s.warren(&["endpoints", "list"]).await;
    assert!(
        listed.contains("PREVIOUS VALID UNTIL")
            && listed.lines().nth(1).is_some_and(|l| !l.ends_with('-')),
        "{listed}"
    );

    // Quotas: set, listed, removed.
    assert_eq!(s.warren(&["quotas", "set", "team:T1", "2"]).await.0, 0);
    assert_eq!(s.warren(&["quotas", "set", "channel", "none"]).await.0, 0);
    let (_, quotas, _) = s.warren(&["-o", "json", "quotas", "list"]).await;
    let quotas: Value = serde_json::from_str(&quotas).expect("json");
    assert_eq!(
        quotas["quotas"],
        serde_json::json!([{"scope": "channel", "max_running": null},
                           {"scope": "team:T1", "max_running": 2}])
    );
    assert_eq!(s.warren(&["quotas", "remove", "team:T1"]).await.0, 0);
    assert_eq!(
        s.warren(&["quotas", "remove", "team:T1"]).await.0,
        4,
        "gone"
    );
    assert_eq!(
        s.warren(&["quotas", "set", "planet", "1"]).await.0,
        2,
        "a bad scope"
    );

    let (code, usage, err) = s.warren(&["usage", "--by", "agent"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(usage.starts_with("KEY"), "{usage}");

    // A stale ETag: exit 5, and nothing changed.
    let (code, _, _) = s
        .warren(&[
            "agents",
            "update",
            "alice",
            "--workspace",
            "research",
            "--settings",
            r#"{"model": "b"}"#,
            "--if-match",
            &version,
        ])
        .await;
    assert_eq!(code, 0);
    let (code, _, err) = s
        .warren(&[
            "agents",
            "update",
            "alice",
            "--workspace",
            "research",
            "--settings",
            r#"{"model": "c"}"#,
            "--if-match",
            &version,
        ])
        .await;
    assert_eq!(code, 5, "{err}");
    assert!(err.contains("412"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_codes_tell_a_script_what_went_wrong() {
    let s = server().await;
    assert_eq!(
        s.warren(&["agents", "create", "alice", "--workspace", "w"])
            .await
            .0,
        0
    );
    let (code, _, err) = s.warren_as(None, &["agents", "list"]).await;
    assert_eq!(code, 3, "no token: {err}");
    let (code, _, _) = s
        .warren_as(Some("wrn_0123456789ab_nope"), &["agents", "list"])
        .await;
    assert_eq!(code, 3, "a bad token");
    let (code, _, err) = s.warren(&["agents", "get", "nobody"]).await;
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("nobody"), "{err}");
    let (code, _, _) = s
        .warren(&["agents", "create", "alice", "--workspace", "w"])
        .await;
    assert_eq!(code, 5, "the name is taken");
    let (code, _, err) = s
        .warren(&[
            "agents",
            "create",
            "bob",
            "--workspace",
            "w",
            "--settings",
            "{oops",
        ])
        .await;
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = s
        .warren(&["agents", "create", "Bad_Name", "--workspace", "w"])
        .await;
    assert_eq!(code, 2, "refused by the API: {err}");
    let (code, _, _) = s.warren(&["definitely-not-a-command"]).await;
    assert_eq!(code, 2);
    // A viewer may read but not write.
    let (code, viewer, _) = s
        .warren(&["tokens", "issue", "--name", "v", "--role", "viewer"])
        .await;
    assert_eq!(code, 0);
    let viewer = viewer.trim();
    assert!(viewer.starts_with("wrn_"), "{viewer}");
    assert_eq!(s.warren_as(Some(viewer), &["agents", "list"]).await.0, 0);
    assert_eq!(
        s.warren_as(Some(viewer), &["agents", "delete", "alice"])
            .await
            .0,
        3
    );
    // Nothing listening.
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_warren"));
    let output = command
        .args(["agents", "list"])
        .env("WARREN_SERVER", "http://127.0.0.1:9")
        .env("WARREN_TOKEN", &s.admin)
        .output()
        .await
        .expect("runs");
    assert_eq!(output.status.code(), Some(6));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_follow_prints_new_events_as_they_are_recorded() {
    let s = server().await;
    let mut follower = tokio::process::Command::new(env!("CARGO_BIN_EXE_warren"))
        .args([
            "events",
            "--follow",
            "--type",
            "agent.configured",
            "-o",
            "json",
        ])
        .env("WARREN_SERVER", &s.url)
        .env("WARREN_TOKEN", &s.admin)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("follows");
    let mut lines = tokio::io::BufReader::new(follower.stdout.take().expect("stdout")).lines();
    // Until the follower is attached, an agent created may come before its start: create
    // one per attempt until one is printed.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut n = 0;
    let line = loop {
        n += 1;
        assert_eq!(
            s.warren(&["agents", "create", &format!("a{n}"), "--workspace", "w"])
                .await
                .0,
            0
        );
        match tokio::time::timeout(Duration::from_millis(500), lines.next_line()).await {
            Ok(line) => break line.expect("read").expect("a line"),
            Err(_) => assert!(Instant::now() < deadline, "nothing printed"),
        }
    };
    let event: Value = serde_json::from_str(&line).expect("a JSON line");
    assert_eq!(event["type"], "agent.configured");
    assert!(
        event["payload"]["name"]
            .as_str()
            .is_some_and(|n| n.starts_with('a'))
    );
    follower.kill().await.expect("stopped");
}
