//! The admin API over real HTTP, against a real PostgreSQL: who may call what, ETags,
//! idempotent creates, the audit trail, tokens, the event list and its follower.

use std::time::{Duration, Instant};

use chrono::Utc;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use warren_control_plane::admin_api::{self, Role};
use warren_schema::EventLog;
use warren_schema::event_log::EventFilter;
use warren_schema::testing::TestDatabase;

struct Server {
    url: String,
    log: EventLog,
    _db: TestDatabase,
    shutdown: CancellationToken,
    http: reqwest::Client,
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
    let server = Server {
        url,
        log,
        _db: db,
        shutdown,
        http: reqwest::Client::new(),
    };
    server.wait_ready().await;
    server
}

impl Server {
    async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(r) = self.http.get(format!("{}/readyz", self.url)).send().await
                && r.status() == StatusCode::OK
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the admin API never became ready"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A token issued the break-glass way (straight into the log).
    async fn token(&self, name: &str, role: Role) -> String {
        self.token_expiring(name, role, None).await
    }

    async fn token_expiring(
        &self,
        name: &str,
        role: Role,
        expires_at: Option<chrono::DateTime<Utc>>,
    ) -> String {
        let (_, token) = admin_api::tokens::issue_direct(&self.log, name, role, expires_at, "test")
            .await
            .expect("issued");
        let token = token.expose().to_owned();
        // The API sees it once its fold has it.
        let deadline = Instant::now() + Duration::from_secs(10);
        while self
            .call(Method::GET, "/v1/agents", Some(&token), None)
            .await
            .status()
            == StatusCode::UNAUTHORIZED
            && expires_at.is_none_or(|t| t > Utc::now())
        {
            assert!(Instant::now() < deadline, "the token never took effect");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        token
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> reqwest::Response {
        self.request(method, path, token, body, &[]).await
    }

    async fn request(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
        headers: &[(&str, &str)],
    ) -> reqwest::Response {
        let mut r = self.http.request(method, format!("{}{path}", self.url));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        if let Some(b) = body {
            r = r.json(b);
        }
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        r.timeout(Duration::from_secs(20))
            .send()
            .await
            .expect("the API answers")
    }
}

/// The operations the served document lists, with the role each declares.
async fn operations(s: &Server) -> Vec<(Method, String, Role)> {
    let doc: Value = s
        .http
        .get(format!("{}/openapi.json", s.url))
        .send()
        .await
        .expect("document")
        .json()
        .await
        .expect("json");
    let mut out = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().expect("item") {
            let role = op["security"][0]["token"][0]
                .as_str()
                .and_then(Role::parse)
                .unwrap_or_else(|| panic!("{method} {path} declares no role"));
            out.push((
                method.to_uppercase().parse().expect("a method"),
                path.clone(),
                role,
            ));
        }
    }
    out
}

/// A concrete request for a documented operation: path parameters filled with things that
/// exist, a body that parses.
fn concrete(method: &Method, path: &str, victim_token: &str) -> (String, Option<Value>) {
    let path = path
        .replace("/v1/workspaces/{name}", "/v1/workspaces/w1")
        .replace("/v1/explain/workspaces/{name}", "/v1/explain/workspaces/w1")
        .replace("{name}", "alice")
        .replace("{route}", "webhook:ci")
        .replace("{scope}", "channel:C7")
        .replace("{id}", victim_token);
    let body = match (method.as_str(), path.as_str()) {
        ("POST", "/v1/agents") => Some(json!({"name": "carol", "workspace": "w2"})),
        ("PUT", p) if p.starts_with("/v1/agents/") => Some(json!({"workspace": "w1"})),
        ("PUT", p) if p.starts_with("/v1/routes/") => Some(json!({"agent": "alice"})),
        ("POST", "/v1/tokens") => Some(json!({"name": "made", "role": "viewer"})),
        ("POST", "/v1/what-if") => Some(json!({"max_running": 1})),
        ("PUT", p) if p.starts_with("/v1/quotas/") => Some(json!({"max_running": 3})),
        _ => None,
    };
    (path, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_answers_each_role_no_token_and_bad_tokens_as_designed() {
    let s = server().await;
    let admin = s.token("admin", Role::Admin).await;
    let operator = s.token("operator", Role::Operator).await;
    let viewer = s.token("viewer", Role::Viewer).await;
    let revoked = s.token("revoked", Role::Admin).await;
    let expired = s
        .token_expiring(
            "expired",
            Role::Admin,
            Some(Utc::now() - chrono::TimeDelta::seconds(1)),
        )
        .await;
    let revoked_id = revoked.split('_').nth(1).expect("id").to_owned();
    assert_eq!(
        s.call(
            Method::DELETE,
            &format!("/v1/tokens/{revoked_id}"),
            Some(&admin),
            None
        )
        .await
        .status(),
        StatusCode::NO_CONTENT
    );
    // Something for the path parameters to name.
    assert_eq!(
        s.call(
            Method::POST,
            "/v1/agents",
            Some(&admin),
            Some(&json!({"name": "alice", "workspace": "w1"}))
        )
        .await
        .status(),
        StatusCode::CREATED
    );
    assert_eq!(
        s.call(
            Method::PUT,
            "/v1/routes/webhook:ci",
            Some(&admin),
            Some(&json!({"agent": "alice"}))
        )
        .await
        .status(),
        StatusCode::OK
    );

    let operations = operations(&s).await;
    assert!(operations.len() >= 20, "{} operations", operations.len());
    let mut checked = 0;
    for (method, template, needs) in &operations {
        // Each admin call may revoke its victim: a fresh one per operation.
        let victim = s.token("victim", Role::Viewer).await;
        let victim_id = victim.split('_').nth(1).expect("id").to_owned();
        let (path, body) = concrete(method, template, &victim_id);
        for (label, token) in [
            ("no token", None),
            ("a revoked token", Some(revoked.as_str())),
            ("an expired token", Some(expired.as_str())),
            ("a made-up token", Some("wrn_0123456789ab_notasecret")),
            ("not a bearer token", Some("hello")),
        ] {
            let r = s.call(method.clone(), &path, token, body.as_ref()).await;
            assert_eq!(
                r.status(),
                StatusCode::UNAUTHORIZED,
                "{method} {path} with {label}"
            );
            assert_eq!(r.headers()["content-type"], "application/problem+json");
            assert!(r.headers().contains_key("www-authenticate"));
            checked += 1;
        }
        for (role, token) in [
            (Role::Viewer, &viewer),
            (Role::Operator, &operator),
            (Role::Admin, &admin),
        ] {
            let r = s
                .call(method.clone(), &path, Some(token), body.as_ref())
                .await;
            let status = r.status();
            if role < *needs {
                assert_eq!(status, StatusCode::FORBIDDEN, "{method} {path} as {role}");
                let problem: Value = r.json().await.expect("problem");
                assert!(
                    problem["detail"]
                        .as_str()
                        .is_some_and(|d| d.contains(needs.name())),
                    "{problem}"
                );
            } else {
                assert!(
                    status != StatusCode::UNAUTHORIZED
                        && status != StatusCode::FORBIDDEN
                        && !status.is_server_error(),
                    "{method} {path} as {role}: {status} {}",
                    r.text().await.unwrap_or_default()
                );
            }
            checked += 1;
        }
    }
    assert_eq!(checked, operations.len() * 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_etag_is_refused_and_changes_nothing() {
    let s = server().await;
    let admin = s.token("admin", Role::Admin).await;
    let created = s
        .call(
            Method::POST,
            "/v1/agents",
            Some(&admin),
            Some(&json!({"name": "alice", "workspace": "w1", "settings": {"model": "a"}})),
        )
        .await;
    assert_eq!(created.status(), StatusCode::CREATED);
    assert_eq!(created.headers()["location"], "/v1/agents/alice");
    let first = created.headers()["etag"].to_str().expect("etag").to_owned();

    let changed = s
        .request(
            Method::PUT,
            "/v1/agents/alice",
            Some(&admin),
            Some(&json!({"workspace": "w1", "settings": {"model": "b"}})),
            &[("if-match", &first)],
        )
        .await;
    assert_eq!(changed.status(), StatusCode::OK);
    let second = changed.headers()["etag"].to_str().expect("etag").to_owned();
    assert_ne!(first, second, "a change moves the ETag");

    let stale = s
        .request(
            Method::PUT,
            "/v1/agents/alice",
            Some(&admin),
            Some(&json!({"workspace": "w1", "settings": {"model": "c"}})),
            &[("if-match", &first)],
        )
        .await;
    assert_eq!(stale.status(), StatusCode::PRECONDITION_FAILED);
    let problem: Value = stale.json().await.expect("problem");
    assert!(
        problem["detail"]
            .as_str()
            .expect("detail")
            .contains(&second),
        "{problem}"
    );
    let stale_delete = s
        .request(
            Method::DELETE,
            "/v1/agents/alice",
            Some(&admin),
            None,
            &[("if-match", &first)],
        )
        .await;
    assert_eq!(stale_delete.status(), StatusCode::PRECONDITION_FAILED);

    let now: Value = s
        .call(Method::GET, "/v1/agents/alice", Some(&admin), None)
        .await
        .json()
        .await
        .expect("agent");
    assert_eq!(
        now["settings"]["model"], "b",
        "the stale change was not applied"
    );
    let configured = s
        .log
        .query(
            &EventFilter {
                types: vec!["agent.configured".into()],
                ..Default::default()
            },
            100,
        )
        .await
        .expect("events");
    assert_eq!(configured.len(), 2, "the create and the one change");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_idempotency_key_twice_creates_once_and_a_reused_key_is_refused() {
    let s = server().await;
    let admin = s.token("admin", Role::Admin).await;
    let body = json!({"name": "alice", "workspace": "w1"});
    let key = [("idempotency-key", "create-alice-1")];
    let first = s
        .request(Method::POST, "/v1/agents", Some(&admin), Some(&body), &key)
        .await;
    assert_eq!(first.status(), StatusCode::CREATED);
    let first_etag = first.headers()["etag"].clone();
    let first: Value = first.json().await.expect("agent");
    let again = s
        .request(Method::POST, "/v1/agents", Some(&admin), Some(&body), &key)
        .await;
    assert_eq!(
        again.status(),
        StatusCode::CREATED,
        "answered as the first was"
    );
    assert_eq!(again.headers()["etag"], first_etag);
    assert_eq!(again.json::<Value>().await.expect("agent"), first);

    // Without the key, the same create is a conflict: the name is taken.
    let conflict = s
        .call(Method::POST, "/v1/agents", Some(&admin), Some(&body))
        .await;
    assert_eq!(conflict.status(), StatusCode::CONFLICT);

    let other = json!({"name": "alice", "workspace": "w2"});
    let reused = s
        .request(Method::POST, "/v1/agents", Some(&admin), Some(&other), &key)
        .await;
    assert_eq!(reused.status(), StatusCode::UNPROCESSABLE_ENTITY);

    let configured = s
        .log
        .query(
            &EventFilter {
                types: vec!["agent.configured".into()],
                ..Default::default()
            },
            100,
        )
        .await
        .expect("events");
    assert_eq!(configured.len(), 1, "created once");

    // Tokens too: the repeat does not issue a second token, nor show the secret again.
    let key = [("idempotency-key", "ci-token")];
    let body = json!({"name": "ci", "role": "operator"});
    let issued = s
        .request(Method::POST, "/v1/tokens", Some(&admin), Some(&body), &key)
        .await;
    assert_eq!(issued.status(), StatusCode::CREATED);
    let issued: Value = issued.json().await.expect("token");
    assert!(
        issued["token"]
            .as_str()
            .is_some_and(|t| t.starts_with("wrn_"))
    );
    let repeat = s
        .request(Method::POST, "/v1/tokens", Some(&admin), Some(&body), &key)
        .await;
    assert_eq!(repeat.status(), StatusCode::OK);
    let repeat: Value = repeat.json().await.expect("token");
    assert_eq!(repeat["id"], issued["id"]);
    assert!(repeat["token"].is_null(), "the secret is shown once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_token_is_refused_once_the_revoke_answers_and_the_last_admin_stays() {
    let s = server().await;
    let admin = s.token("admin", Role::Admin).await;
    let issued: Value = s
        .call(
            Method::POST,
            "/v1/tokens",
            Some(&admin),
            Some(&json!({"name": "ci", "role": "operator", "expires_in_secs": 3600})),
        )
        .await
        .json()
        .await
        .expect("token");
    let ci = issued["token"].as_str().expect("token").to_owned();
    assert!(issued["expires_at"].is_string());
    assert_eq!(
        s.call(Method::GET, "/v1/workspaces", Some(&ci), None)
            .await
            .status(),
        StatusCode::OK
    );
    let id = issued["id"].as_str().expect("id");
    assert_eq!(
        s.call(
            Method::DELETE,
            &format!("/v1/tokens/{id}"),
            Some(&admin),
            None
        )
        .await
        .status(),
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        s.call(Method::GET, "/v1/workspaces", Some(&ci), None)
            .await
            .status(),
        StatusCode::UNAUTHORIZED,
        "refused as soon as the revoke answered"
    );
    let admin_id = admin.split('_').nth(1).expect("id");
    let last = s
        .call(
            Method::DELETE,
            &format!("/v1/tokens/{admin_id}"),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(
        last.status(),
        StatusCode::CONFLICT,
        "the last admin token stays"
    );
    let listed: Value = s
        .call(Method::GET, "/v1/tokens?all=true", Some(&admin), None)
        .await
        .json()
        .await
        .expect("tokens");
    let text = listed.to_string();
    assert!(
        !text.contains(&ci[17..]) && !text.contains("secret"),
        "no secret is listed: {text}"
    );
    assert_eq!(listed["items"].as_array().expect("items").len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_names_the_token_and_role_of_every_change_and_no_read() {
    let s = server().await;
    let admin = s.token("admin", Role::Admin).await;
    let viewer = s.token("viewer", Role::Viewer).await;
    let admin_id = admin.split('_').nth(1).expect("id");
    s.call(
        Method::POST,
        "/v1/agents",
        Some(&admin),
        Some(&json!({"name": "alice", "workspace": "w1"})),
    )
    .await;
    s.call(
        Method::PUT,
        "/v1/routes/slack_channel:C1",
        Some(&admin),
        Some(&json!({"agent": "alice"})),
    )
    .await;
    s.call(Method::GET, "/v1/agents", Some(&viewer), None).await;
    let audit: Value = s
        .call(Method::GET, "/v1/audit", Some(&viewer), None)
        .await
        .json()
        .await
        .expect("audit");
    let items = audit["items"].as_array().expect("items");
    let kinds: Vec<&str> = items.iter().filter_map(|i| i["type"].as_str()).collect();
    assert_eq!(
        kinds,
        [
            "token.issued",
            "token.issued",
            "agent.configured",
            "route.configured"
        ],
        "{audit}"
    );
    for item in &items[2..] {
        assert_eq!(item["via"], "token");
        assert_eq!(item["token_id"], admin_id);
        assert_eq!(item["role"], "admin");
    }
    // Paged: one at a time, the same four.
    let mut cursor: Option<String> = None;
    let mut paged = 0;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/audit?limit=1&cursor={c}"),
            None => "/v1/audit?limit=1".into(),
        };
        let page: Value = s
            .call(Method::GET, &path, Some(&viewer), None)
            .await
            .json()
            .await
            .expect("page");
        paged += page["items"].as_array().expect("items").len();
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(paged, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_a_problem_naming_the_field_and_records_nothing() {
    let s = server().await;
    let admin = s.token("admin", Role::Admin).await;
    let before = s.log.head().await.expect("head");
    for (method, path, body, needle) in [
        (
            Method::POST,
            "/v1/agents",
            json!({"name": "Bad_Name", "workspace": "w"}),
            "agent name",
        ),
        (
            Method::POST,
            "/v1/agents",
            json!({"name": "a", "workspace": "shared"}),
            "reserved",
        ),
        (
            Method::POST,
            "/v1/agents",
            json!({"name": "a", "workspace": "w", "driver": "gpt"}),
            "driver",
        ),
        (
            Method::POST,
            "/v1/agents",
            json!({"name": "a", "workspace": "w", "extra": 1}),
            "extra",
        ),
        (
            Method::POST,
            "/v1/agents",
            json!({"name": "a", "workspace": "w",
            "settings": {"allowed_keys": ["../../etc/shadow"]}}),
            "allowed key",
        ),
        (
            Method::PUT,
            "/v1/routes/email:x",
            json!({"agent": "a"}),
            "slack_channel",
        ),
        (
            Method::PUT,
            "/v1/routes/webhook:ci",
            json!({"agent": "nobody"}),
            "no agent",
        ),
        (
            Method::POST,
            "/v1/tokens",
            json!({"name": "", "role": "viewer"}),
            "name",
        ),
        (
            Method::POST,
            "/v1/tokens",
            json!({"name": "x", "role": "root"}),
            "role",
        ),
    ] {
        let r = s
            .call(method.clone(), path, Some(&admin), Some(&body))
            .await;
        assert_eq!(
            r.status(),
            StatusCode::BAD_REQUEST,
            "{method} {path} {body}"
        );
        assert_eq!(r.headers()["content-type"], "application/problem+json");
        let problem: Value = r.json().await.expect("problem");
        assert!(
            problem["detail"]
                .as_str()
                .is_some_and(|d| d.contains(needle)),
            "{method} {path}: {problem}"
        );
    }
    for query in [
        "limit=0",
        "limit=5000",
        "cursor=%25%25",
        "trace_id=xyz",
        "since=yesterday",
    ] {
        let r = s
            .call(
                Method::GET,
                &format!("/v1/events?{query}"),
                Some(&admin),
                None,
            )
            .await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{query}");
    }
    assert_eq!(
        s.log.head().await.expect("head"),
        before,
        "nothing recorded"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_listed_by_filter_and_followed_from_the_last_event_id() {
    let s = server().await;
    let admin = s.token("admin", Role::Admin).await;
    for name in ["a1", "a2", "a3"] {
        s.call(
            Method::POST,
            "/v1/agents",
            Some(&admin),
            Some(&json!({"name": name, "workspace": "w"})),
        )
        .await;
    }
    let page: Value = s
        .call(
            Method::GET,
            "/v1/events?type=agent.configured&limit=2",
            Some(&admin),
            None,
        )
        .await
        .json()
        .await
        .expect("page");
    let items = page["items"].as_array().expect("items");
    assert_eq!(items.len(), 2);
    assert_eq!(items[0]["payload"]["name"], "a1");
    let cursor = page["next_cursor"].as_str().expect("a next page");
    let rest: Value = s
        .call(
            Method::GET,
            &format!("/v1/events?type=agent.configured&limit=2&cursor={cursor}"),
            Some(&admin),
            None,
        )
        .await
        .json()
        .await
        .expect("page");
    assert_eq!(rest["items"][0]["payload"]["name"], "a3");
    assert!(rest["next_cursor"].is_null());
    let first_id = items[0]["id"].as_str().expect("id");
    let one: Value = s
        .call(
            Method::GET,
            &format!("/v1/events/{first_id}"),
            Some(&admin),
            None,
        )
        .await
        .json()
        .await
        .expect("event");
    assert_eq!(one["payload"]["name"], "a1");
    assert_eq!(
        s.call(
            Method::GET,
            "/v1/events/00000000-0000-0000-0000-000000000000",
            Some(&admin),
            None
        )
        .await
        .status(),
        StatusCode::NOT_FOUND
    );

    // Follow from the first agent's position: a2, a3, then a4 as it happens.
    let after = items[0]["position"].as_i64().expect("position").to_string();
    let mut stream = s
        .request(
            Method::GET,
            "/v1/events/stream?type=agent.configured",
            Some(&admin),
            None,
            &[("last-event-id", &after)],
        )
        .await;
    assert_eq!(stream.status(), StatusCode::OK);
    assert_eq!(stream.headers()["content-type"], "text/event-stream");
    s.call(
        Method::POST,
        "/v1/agents",
        Some(&admin),
        Some(&json!({"name": "a4", "workspace": "w"})),
    )
    .await;
    let mut text = String::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while text.matches("event: agent.configured").count() < 3 {
        let chunk = tokio::time::timeout_at(deadline.into(), stream.chunk())
            .await
            .expect("events in time")
            .expect("a chunk")
            .expect("not the end");
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    let names: Vec<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| serde_json::from_str::<Value>(d).expect("json")["payload"]["name"].to_string())
        .collect();
    assert_eq!(names, ["\"a2\"", "\"a3\"", "\"a4\""], "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_admin_token_is_issued_once_whoever_starts_first() {
    let db = TestDatabase::new().await;
    let log = db.log();
    let (a, b) = tokio::join!(
        admin_api::tokens::bootstrap(&log),
        admin_api::tokens::bootstrap(&log)
    );
    let issued: Vec<_> = [a.expect("a"), b.expect("b")]
        .into_iter()
        .flatten()
        .collect();
    assert_eq!(
        issued.len(),
        1,
        "one of two replicas starting together issues it"
    );
    assert!(
        admin_api::tokens::bootstrap(&log)
            .await
            .expect("again")
            .is_none()
    );
    let events = log
        .query(
            &EventFilter {
                types: vec!["token.issued".into()],
                ..Default::default()
            },
            10,
        )
        .await
        .expect("events");
    assert_eq!(events.len(), 1);
    let text = events[0].payload.to_string();
    // `wrn_{id}_{secret}`; the secret is base64url and may itself hold '_'.
    let secret = issued[0].expose().splitn(3, '_').nth(2).expect("secret");
    assert!(secret.len() >= 43, "{secret}");
    assert!(!text.contains(secret), "only the hash is recorded");
}

async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn of_type(log: &EventLog, event_type: &str) -> Vec<warren_schema::RecordedEvent> {
    log.query(
        &EventFilter {
            types: vec![event_type.into()],
            ..Default::default()
        },
        100,
    )
    .await
    .expect("events")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_running_leader_routes_to_an_agent_created_through_the_api_and_obeys_an_operator_s_stop()
 {
    use warren_schema::events::WorkspaceStopRequested;
    let s = server().await;
    let admin = s.token("admin", Role::Admin).await;
    let operator = s.token("operator", Role::Operator).await;
    let (leader_stop, leader) = leader(&s.log);

    // Configured while the leader runs: no restart.
    let created = s
        .call(
            Method::POST,
            "/v1/agents",
            Some(&admin),
            Some(&json!({"name": "alice", "workspace": "research"})),
        )
        .await;
    assert_eq!(created.status(), StatusCode::CREATED);
    webhook_message(&s.log, "d1", "alice").await;
    eventually("the message routed to the new agent", async || {
        of_type(&s.log, "message.routed")
            .await
            .iter()
            .any(|e| e.payload["agent"] == "alice")
    })
    .await;
    eventually("the workspace starting, as the API sees it", async || {
        let w: Value = s
            .call(
                Method::GET,
                "/v1/workspaces/research",
                Some(&operator),
                None,
            )
            .await
            .json()
            .await
            .expect("workspace");
        w["phase"] == "starting" && w["desired_running"] == true && w["agents"] == json!(["alice"])
    })
    .await;

    let accepted = s
        .call(
            Method::POST,
            "/v1/workspaces/research/stop?reason=maintenance",
            Some(&operator),
            None,
        )
        .await;
    assert_eq!(accepted.status(), StatusCode::ACCEPTED);
    let accepted: Value = accepted.json().await.expect("accepted");
    let request_id = accepted["request_id"].as_str().expect("id").to_owned();
    eventually("the operator's stop decided", async || {
        of_type(&s.log, "workspace.stop_requested")
            .await
            .iter()
            .any(|e| {
                e.metadata.causation_id.map(|c| c.to_string()) == Some(request_id.clone())
                    && e.decode::<WorkspaceStopRequested>()
                        .is_ok_and(|d| d.reason == "operator")
            })
    })
    .await;
    // Stopping now: a second stop has nothing to stop.
    eventually("the API sees it stopping", async || {
        s.call(
            Method::POST,
            "/v1/workspaces/research/stop",
            Some(&operator),
            None,
        )
        .await
        .status()
            == StatusCode::CONFLICT
    })
    .await;
    let audit: Value = s
        .call(Method::GET, "/v1/audit?limit=10", Some(&operator), None)
        .await
        .json()
        .await
        .expect("audit");
    // (The loop above may have recorded more stops before the API saw the first decided;
    // the decisions ignore those.)
    let last = audit["items"]
        .as_array()
        .expect("items")
        .iter()
        .find(|i| i["id"] == request_id.as_str())
        .expect("the stop is audited")
        .clone();
    assert_eq!(last["type"], "workspace.action_requested");
    assert_eq!(last["role"], "operator");
    assert_eq!(last["payload"]["reason"], "maintenance");

    // Delete: an admin's, and only once no agent lives there.
    let path = "/v1/workspaces/research";
    let refused = s.call(Method::DELETE, path, Some(&admin), None).await;
    assert_eq!(refused.status(), StatusCode::CONFLICT);
    let problem: Value = refused.json().await.expect("problem");
    assert!(
        problem["detail"]
            .as_str()
            .is_some_and(|d| d.contains("alice")),
        "{problem}"
    );
    let removed = s
        .call(Method::DELETE, "/v1/agents/alice", Some(&admin), None)
        .await;
    assert_eq!(removed.status(), StatusCode::NO_CONTENT);
    let deleted = s.call(Method::DELETE, path, Some(&admin), None).await;
    assert_eq!(deleted.status(), StatusCode::ACCEPTED);
    // No backend runs here: report the instance gone, as the reconciler would.
    append_event(
        &s.log,
        "workspace:research",
        &warren_schema::events::WorkspaceObserved {
            workspace: "research".into(),
            phase: warren_schema::events::WorkspacePhase::Gone,
            backend: "local".into(),
            instance: None,
            detail: None,
            replaced: false,
        },
    )
    .await;
    eventually("the deleted workspace gone from the API", async || {
        s.call(Method::GET, path, Some(&operator), None)
            .await
            .status()
            == StatusCode::NOT_FOUND
    })
    .await;
    eventually("and from the read model", async || {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM workspaces WHERE name = 'research'")
            .fetch_one(s.log.pool())
            .await
            .expect("count")
            == 0
    })
    .await;

    leader_stop.cancel();
    leader.await.expect("join");
}

#[test]
fn the_committed_openapi_document_is_the_one_the_code_generates() {
    let mut generated = serde_json::to_string_pretty(&admin_api::openapi()).expect("the document");
    generated.push('\n');
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.json");
    let committed = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        committed == generated,
        "docs/openapi.json is not what the handlers declare; regenerate it with \
         `cargo run -p warren-control-plane -- openapi > docs/openapi.json` and commit it"
    );
}

fn leader(log: &EventLog) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    use warren_control_plane::controller::{self, ControllerConfig};
    let stop = CancellationToken::new();
    let task = tokio::spawn({
        let (log, stop) = (log.clone(), stop.clone());
        async move {
            controller::run(
                log,
                ControllerConfig {
                    holder: "leader".into(),
                    lease_ttl: Duration::from_secs(2),
                    tick: Duration::from_millis(50),
                    policy: Default::default(),
                    config_file: None,
                    backend: None,
                    nats: None,
                },
                stop,
            )
            .await
            .expect("the leader ran");
        }
    });
    (stop, task)
}

async fn append_event<E: warren_schema::events::DomainEvent>(log: &EventLog, stream: &str, e: &E) {
    log.append(&warren_schema::AppendRequest::new(
        stream,
        vec![
            warren_schema::NewEvent::from_domain(
                warren_schema::EventId::random(),
                e,
                warren_schema::Metadata::new("test"),
            )
            .expect("event"),
        ],
    ))
    .await
    .expect("append");
}

async fn webhook_message(log: &EventLog, delivery: &str, agent: &str) {
    use warren_schema::events::{MessageReceived, Origin};
    let message = MessageReceived {
        origin: Origin::Webhook {
            endpoint: "ci".into(),
            delivery_id: delivery.into(),
        },
        text: "build failed".into(),
        addressed_agents: vec![agent.into()],
        files: vec![],
    };
    append_event(log, "webhook:ci", &message).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn as_of_returns_the_earlier_state_after_later_changes() {
    let s = server().await;
    let admin = s.token("admin", Role::Admin).await;
    s.call(
        Method::POST,
        "/v1/agents",
        Some(&admin),
        Some(&json!({"name": "alice", "workspace": "w1", "settings": {"model": "first"}})),
    )
    .await;
    s.call(
        Method::PUT,
        "/v1/routes/slack_channel:C1",
        Some(&admin),
        Some(&json!({"agent": "alice"})),
    )
    .await;
    let then: Value = s
        .call(
            Method::GET,
            "/v1/events?type=route.configured",
            Some(&admin),
            None,
        )
        .await
        .json()
        .await
        .expect("events");
    let position = then["items"][0]["position"].as_i64().expect("position");
    let at = then["items"][0]["recorded_at"]
        .as_str()
        .expect("time")
        .to_owned();

    // Later: alice changes, the route goes, bob arrives.
    s.call(
        Method::PUT,
        "/v1/agents/alice",
        Some(&admin),
        Some(&json!({"workspace": "w1", "settings": {"model": "second"}})),
    )
    .await;
    s.call(
        Method::DELETE,
        "/v1/routes/slack_channel:C1",
        Some(&admin),
        None,
    )
    .await;
    s.call(
        Method::POST,
        "/v1/agents",
        Some(&admin),
        Some(&json!({"name": "bob", "workspace": "w2"})),
    )
    .await;

    for query in [
        format!("position={position}"),
        format!("at={}", urlencode(&at)),
    ] {
        let past: Value = s
            .call(
                Method::GET,
                &format!("/v1/as-of?{query}"),
                Some(&admin),
                None,
            )
            .await
            .json()
            .await
            .expect("as of");
        assert_eq!(past["position"], position, "{query}: {past}");
        let agents = past["agents"].as_array().expect("agents");
        assert_eq!(agents.len(), 1, "{query}: bob came later");
        assert_eq!(agents[0]["settings"]["model"], "first", "{query}");
        assert_eq!(past["routes"][0]["route"], "slack_channel:C1", "{query}");
        assert_eq!(past["workspaces"][0]["name"], "w1", "{query}");
    }
    let now: Value = s
        .call(Method::GET, "/v1/agents/alice", Some(&admin), None)
        .await
        .json()
        .await
        .expect("agent");
    assert_eq!(now["settings"]["model"], "second");
    let none = s.call(Method::GET, "/v1/as-of", Some(&admin), None).await;
    assert_eq!(none.status(), StatusCode::BAD_REQUEST);
}

fn urlencode(s: &str) -> String {
    s.replace(':', "%3A").replace('+', "%2B")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_if_with_a_lower_cap_lists_exactly_the_starts_that_would_have_been_queued() {
    let s = server().await;
    let admin = s.token("admin", Role::Admin).await;
    let (stop, task) = leader(&s.log);
    for (agent, workspace) in [("a", "wa"), ("b", "wb"), ("c", "wc")] {
        s.call(
            Method::POST,
            "/v1/agents",
            Some(&admin),
            Some(&json!({"name": agent, "workspace": workspace})),
        )
        .await;
    }
    for agent in ["a", "b", "c"] {
        webhook_message(&s.log, agent, agent).await;
        // One at a time, so the order of the starts is the order of the messages.
        eventually("the start", async || {
            of_type(&s.log, "workspace.start_requested")
                .await
                .iter()
                .any(|e| e.payload["workspace"] == format!("w{agent}"))
        })
        .await;
    }
    stop.cancel();
    task.await.expect("join");

    let unchanged: Value = s
        .call(Method::POST, "/v1/what-if", Some(&admin), Some(&json!({})))
        .await
        .json()
        .await
        .expect("what-if");
    assert_eq!(unchanged["would_decide"], json!([]), "{unchanged}");
    assert_eq!(unchanged["would_not_decide"], json!([]), "{unchanged}");
    assert_eq!(unchanged["same"], 6, "three routings, three starts");

    let capped: Value = s
        .call(
            Method::POST,
            "/v1/what-if",
            Some(&admin),
            Some(&json!({"max_running": 1})),
        )
        .await
        .json()
        .await
        .expect("what-if");
    let summary = |list: &Value| -> Vec<String> {
        list.as_array()
            .expect("a list")
            .iter()
            .map(|d| {
                format!(
                    "{} {}",
                    d["type"].as_str().unwrap_or(""),
                    d["payload"]["workspace"].as_str().unwrap_or("")
                )
            })
            .collect()
    };
    assert_eq!(
        summary(&capped["would_decide"]),
        ["workspace.start_queued wb", "workspace.start_queued wc"],
        "{capped}"
    );
    assert_eq!(
        summary(&capped["would_not_decide"]),
        [
            "workspace.start_requested wb",
            "workspace.start_requested wc"
        ],
        "{capped}"
    );
    assert!(
        of_type(&s.log, "workspace.start_queued").await.is_empty(),
        "a what-if writes nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quota_set_through_the_api_queues_the_next_start_and_its_removal_frees_it() {
    let s = server().await;
    let admin = s.token("admin", Role::Admin).await;
    let (stop, task) = leader(&s.log);
    for (agent, workspace) in [("a", "wa"), ("b", "wb")] {
        s.call(
            Method::POST,
            "/v1/agents",
            Some(&admin),
            Some(&json!({"name": agent, "workspace": workspace})),
        )
        .await;
    }
    let set = s
        .call(
            Method::PUT,
            "/v1/quotas/total",
            Some(&admin),
            Some(&json!({"max_running": 1})),
        )
        .await;
    assert_eq!(set.status(), StatusCode::OK);
    let bad = s
        .call(
            Method::PUT,
            "/v1/quotas/planet:earth",
            Some(&admin),
            Some(&json!({"max_running": 1})),
        )
        .await;
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    webhook_message(&s.log, "1", "a").await;
    eventually("a started", async || {
        !of_type(&s.log, "workspace.start_requested")
            .await
            .is_empty()
    })
    .await;
    webhook_message(&s.log, "2", "b").await;
    eventually("b queued behind the quota, as the API shows", async || {
        let queue: Value = s
            .call(Method::GET, "/v1/queue", Some(&admin), None)
            .await
            .json()
            .await
            .expect("queue");
        queue
            .as_array()
            .is_some_and(|q| q.len() == 1 && q[0]["workspace"] == "wb")
    })
    .await;
    let quotas: Value = s
        .call(Method::GET, "/v1/quotas", Some(&admin), None)
        .await
        .json()
        .await
        .expect("quotas");
    assert_eq!(
        quotas["quotas"],
        json!([{"scope": "total", "max_running": 1}])
    );

    // Removed: the flag (no cap) applies, and the queued start is admitted.
    let removed = s
        .call(Method::DELETE, "/v1/quotas/total", Some(&admin), None)
        .await;
    assert_eq!(removed.status(), StatusCode::NO_CONTENT);
    eventually("b admitted", async || {
        of_type(&s.log, "workspace.start_requested")
            .await
            .iter()
            .any(|e| e.payload["workspace"] == "wb")
    })
    .await;
    stop.cancel();
    task.await.expect("join");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_counts_turns_by_agent_team_and_workspace_and_runtime_seconds() {
    use warren_schema::events::{WorkspaceObserved, WorkspacePhase};
    let s = server().await;
    let admin = s.token("admin", Role::Admin).await;
    let (stop, task) = leader(&s.log);
    for (agent, workspace) in [("a", "wa"), ("b", "wb")] {
        s.call(
            Method::POST,
            "/v1/agents",
            Some(&admin),
            Some(&json!({"name": agent, "workspace": workspace})),
        )
        .await;
    }
    for (delivery, agent) in [("1", "a"), ("2", "a"), ("3", "b")] {
        webhook_message(&s.log, delivery, agent).await;
    }
    eventually("three routings", async || {
        of_type(&s.log, "message.routed").await.len() == 3
    })
    .await;
    stop.cancel();
    task.await.expect("join");
    // Two turns completed, as the ingest records what the runtimes report: both of a's,
    // none of b's yet.
    let routings = of_type(&s.log, "message.routed").await;
    for (n, routing) in routings
        .iter()
        .filter(|r| r.payload["agent"] == "a")
        .enumerate()
    {
        append_event(
            &s.log,
            "agent:wa:a",
            &warren_schema::events::AgentTurnCompleted {
                workspace: "wa".into(),
                agent: "a".into(),
                routing_id: routing.id,
                duration_ms: 1_500,
                usage: warren_schema::events::TurnUsage {
                    model_calls: 2,
                    input_tokens: 1_000 + n as u64,
                    output_tokens: 100,
                    cache_read_tokens: 800,
                    cache_write_tokens: 0,
                },
            },
        )
        .await;
    }
    // The backend saw wa's runtime start (as the reconciler records it).
    let observed = warren_schema::NewEvent::from_domain(
        warren_schema::EventId::random(),
        &WorkspaceObserved {
            workspace: "wa".into(),
            phase: WorkspacePhase::Ready,
            backend: "local".into(),
            instance: Some("4242".into()),
            detail: None,
            replaced: false,
        },
        warren_schema::Metadata::new("test"),
    )
    .expect("event");
    s.log
        .append(&warren_schema::AppendRequest::new(
            "workspace:wa",
            vec![observed],
        ))
        .await
        .expect("append");
    let usage = |by: &'static str| {
        let s = &s;
        let admin = admin.clone();
        async move {
            let r: Value = s
                .call(
                    Method::GET,
                    &format!("/v1/usage?by={by}"),
                    Some(&admin),
                    None,
                )
                .await
                .json()
                .await
                .expect("usage");
            r["rows"]
                .as_array()
                .unwrap_or_else(|| panic!("{r}"))
                .clone()
        }
    };
    let by_agent = usage("agent").await;
    let turns: Vec<(String, u64)> = by_agent
        .iter()
        .map(|r| {
            (
                r["key"].as_str().unwrap_or("").to_owned(),
                r["turns"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(turns, [("a".to_owned(), 2), ("b".to_owned(), 1)]);
    assert_eq!(by_agent[0]["workspace"], "wa");
    let tokens = |row: &Value| {
        [
            "completed_turns",
            "model_calls",
            "input_tokens",
            "output_tokens",
            "cache_read_tokens",
        ]
        .map(|f| row[f].as_u64().unwrap_or_else(|| panic!("{f} in {row}")))
    };
    assert_eq!(tokens(&by_agent[0]), [2, 4, 2_001, 200, 1_600]);
    assert_eq!(by_agent[0]["turn_seconds"], 3.0);
    assert_eq!(tokens(&by_agent[1]), [0, 0, 0, 0, 0], "b has not answered");
    let by_team = usage("team").await;
    assert_eq!(by_team.len(), 1);
    assert_eq!(
        (by_team[0]["key"].as_str(), by_team[0]["turns"].as_u64()),
        (Some("ci"), Some(3))
    );
    assert_eq!(
        tokens(&by_team[0]),
        [2, 4, 2_001, 200, 1_600],
        "the team through the turn's routing and message"
    );
    let by_workspace = usage("workspace").await;
    let wa = by_workspace.iter().find(|r| r["key"] == "wa").expect("wa");
    assert_eq!(wa["turns"], 2);
    assert!(
        wa["runtime_seconds"].as_f64().is_some_and(|s| s >= 0.0),
        "{wa}"
    );
    assert_eq!(tokens(wa), [2, 4, 2_001, 200, 1_600]);
    let wb = by_workspace.iter().find(|r| r["key"] == "wb").expect("wb");
    assert_eq!(wb["runtime_seconds"], 0.0, "never observed running");
    let bad = s
        .call(Method::GET, "/v1/usage?by=planet", Some(&admin), None)
        .await;
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_break_glass_token_commands_issue_list_and_revoke_in_the_database() {
    let db = TestDatabase::new().await;
    let run = async |args: &[&str]| {
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_warren-control-plane"))
            .args(args)
            .env("DATABASE_URL", db.url())
            .env_remove("DATABASE_URL_FILE")
            .output()
            .await
            .expect("runs");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (ok, token) = run(&["tokens", "issue", "--name", "ops", "--role", "admin"]).await;
    assert!(ok);
    let token = token.trim().to_owned();
    let id = token.split('_').nth(1).expect("an id").to_owned();
    let (ok, listed) = run(&["tokens", "list"]).await;
    assert!(ok);
    let listed: Value = serde_json::from_str(listed.trim()).expect("a JSON line");
    assert_eq!(
        (listed["id"].as_str(), listed["role"].as_str()),
        (Some(id.as_str()), Some("admin"))
    );
    assert!(listed["revoked_at"].is_null());
    assert!(
        !listed.to_string().contains(&token[17..]),
        "no secret listed"
    );
    assert!(run(&["tokens", "revoke", &id]).await.0);
    let (_, listed) = run(&["tokens", "list"]).await;
    let listed: Value = serde_json::from_str(listed.trim()).expect("a JSON line");
    assert!(listed["revoked_at"].is_string(), "{listed}");
    assert!(
        !run(&["tokens", "revoke", "000000000000"]).await.0,
        "an unknown id"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_changes_all_land_each_re_checked_after_the_one_that_won() {
    let s = server().await;
    let admin = s.token("admin", Role::Admin).await;
    let creates = (0..8).map(|i| {
        let (s, admin) = (&s, admin.clone());
        async move {
            s.call(
                Method::POST,
                "/v1/agents",
                Some(&admin),
                Some(&json!({"name": format!("a{i}"), "workspace": "w"})),
            )
            .await
            .status()
        }
    });
    let statuses = futures_util::future::join_all(creates).await;
    assert!(
        statuses.iter().all(|s| *s == StatusCode::CREATED),
        "{statuses:?}"
    );
    // The same name eight times at once: exactly one create wins.
    let same = (0..8).map(|_| {
        let (s, admin) = (&s, admin.clone());
        async move {
            s.call(
                Method::POST,
                "/v1/agents",
                Some(&admin),
                Some(&json!({"name": "contested", "workspace": "w"})),
            )
            .await
            .status()
        }
    });
    let statuses = futures_util::future::join_all(same).await;
    assert_eq!(
        statuses
            .iter()
            .filter(|s| **s == StatusCode::CREATED)
            .count(),
        1,
        "{statuses:?}"
    );
    assert!(
        statuses
            .iter()
            .all(|s| *s == StatusCode::CREATED || *s == StatusCode::CONFLICT)
    );
    assert_eq!(of_type(&s.log, "agent.configured").await.len(), 9);
}
