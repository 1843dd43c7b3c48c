//! The MCP server a runtime serves for a `command` agent's turn, reached through the real
//! binary (`warren-workspace-runtime --mcp`) over its stdio as an MCP client does
//! (newline-delimited JSON-RPC 2.0): the handshake, the tool list, memory tools on real
//! NATS key-value, a mention and a reply published to the outbox as that turn (whatever
//! the program's environment claims), the agent directory, errors.

mod support;

use std::process::Stdio;

use async_nats::jetstream;
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use warren_schema::EventId;
use warren_schema::events::Origin;
use warren_schema::nats::{Namespace, OutboxMessage};

struct Session {
    stdin: tokio::process::ChildStdin,
    stdout: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    next_id: u64,
}

impl Session {
    async fn send(&mut self, message: Value) {
        let mut line = serde_json::to_vec(&message).expect("json");
        line.push(b'\n');
        self.stdin.write_all(&line).await.expect("write");
        self.stdin.flush().await.expect("flush");
    }

    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        self.send(json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}))
            .await;
        let line =
            tokio::time::timeout(std::time::Duration::from_secs(10), self.stdout.next_line())
                .await
                .expect("an answer in time")
                .expect("read")
                .expect("a line");
        let answer: Value = serde_json::from_str(&line).expect("JSON-RPC");
        assert_eq!(answer["jsonrpc"], "2.0");
        assert_eq!(answer["id"], id, "answers match requests");
        answer
    }

    async fn tool(&mut self, name: &str, arguments: Value) -> (Value, bool) {
        let answer = self
            .call("tools/call", json!({"name": name, "arguments": arguments}))
            .await;
        let result = &answer["result"];
        let text = result["content"][0]["text"].as_str().expect("text content");
        (
            serde_json::from_str(text).expect("tool result JSON"),
            result["isError"].as_bool().unwrap_or(false),
        )
    }
}

#[tokio::test]
async fn an_mcp_client_lists_and_calls_warrens_tools() {
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let prefix = format!("mcp{}", std::process::id());
    let ns = Namespace::new(&prefix);
    let js = jetstream::new(async_nats::connect(&url).await.expect("nats"));
    js.get_or_create_stream(ns.outbox_stream_config())
        .await
        .expect("outbox");
    let routing = EventId::random();
    let reply_to = Origin::Slack {
        team_id: "T1".into(),
        channel: "C1".into(),
        thread_ts: "1.0".into(),
        ts: "1.0".into(),
        user: "U1".into(),
    };
    // alice's turn, as her runtime holds it; her program starts the MCP server, and claims
    // in its environment to be bob, answering another message, in another conversation:
    // nothing reads those.
    let (turn, _directory) = support::mcp_turn(&js, &ns, routing, &reply_to).await;
    let elsewhere = Origin::Slack {
        team_id: "T1".into(),
        channel: "CSECRET".into(),
        thread_ts: "9.0".into(),
        ts: "9.0".into(),
        user: "U9".into(),
    };
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_warren-workspace-runtime"))
        .arg("--mcp")
        .env_clear()
        .env("WARREN_MCP_SOCKET", turn.path())
        .env("WARREN_AGENT", "bob")
        .env("WARREN_WORKSPACE", "ops")
        .env("WARREN_ROUTING_ID", EventId::random().to_string())
        .env("WARREN_CHAIN", "carol,dave")
        .env(
            "WARREN_REPLY_TO",
            serde_json::to_string(&elsewhere).expect("json"),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn");
    let mut session = Session {
        stdin: child.stdin.take().expect("stdin"),
        stdout: BufReader::new(child.stdout.take().expect("stdout")).lines(),
        next_id: 0,
    };

    let init = session
        .call(
            "initialize",
            json!({"protocolVersion": "2025-03-26", "capabilities": {},
                   "clientInfo": {"name": "test-client", "version": "1"}}),
        )
        .await;
    assert_eq!(init["result"]["protocolVersion"], "2025-03-26");
    assert!(init["result"]["capabilities"]["tools"].is_object());
    assert_eq!(init["result"]["serverInfo"]["name"], "warren");
    session
        .send(json!({"jsonrpc": "2.0", "method": "notifications/initialized"}))
        .await;

    let list = session.call("tools/list", json!({})).await;
    let tools = list["result"]["tools"].as_array().expect("tools").clone();
    let names: Vec<&str> = tools.iter().filter_map(|t| t["name"].as_str()).collect();
    for expected in [
        "mention",
        "memory_get",
        "memory_put",
        "memory_update",
        "memory_list",
        "memory_delete",
        "reply",
        "list_agents",
    ] {
        assert!(names.contains(&expected), "{expected} in {names:?}");
    }
    assert!(tools.iter().all(|t| t["inputSchema"]["type"] == "object"));

    let (put, is_error) = session
        .tool("memory_put", json!({"key": "plan", "value": {"step": 1}}))
        .await;
    assert!(!is_error, "{put}");
    let revision = put["revision"].as_u64().expect("revision");
    let (got, _) = session.tool("memory_get", json!({"key": "plan"})).await;
    assert_eq!(got["value"], json!({"step": 1}));
    assert_eq!(got["written_by"], "alice");
    let (conflict, is_error) = session
        .tool(
            "memory_update",
            json!({"key": "plan", "value": 2, "expected_revision": revision + 5}),
        )
        .await;
    assert!(is_error, "a stale revision is an error result: {conflict}");

    let (_, is_error) = session
        .tool(
            "mention",
            json!({"agent": "bob", "text": "bob, the plan is in memory"}),
        )
        .await;
    assert!(!is_error);
    let (agents, is_error) = session.tool("list_agents", json!({})).await;
    assert!(!is_error, "{agents}");
    assert_eq!(
        agents["agents"],
        json!([{"name": "alice", "workspace": "research", "you": true},
               {"name": "bob", "workspace": "ops", "you": false}])
    );
    assert_eq!(agents["next"], Value::Null, "one page holds both");
    let (after, _) = session.tool("list_agents", json!({"after": "alice"})).await;
    assert_eq!(
        after["agents"],
        json!([{"name": "bob", "workspace": "ops", "you": false}])
    );
    let (_, is_error) = session
        .tool("reply", json!({"text": "working on it"}))
        .await;
    assert!(!is_error);
    let (_, is_error) = session.tool("reply", json!({"text": "  "})).await;
    assert!(is_error, "an empty reply is refused");
    let (_, is_error) = session.tool("no_such_tool", json!({})).await;
    assert!(is_error);
    let unknown = session.call("resources/list", json!({})).await;
    assert_eq!(unknown["error"]["code"], -32601);

    // The mention is on the outbox, part of the turn.
    let stream = js.get_stream(ns.outbox_stream()).await.expect("stream");
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::Config {
            filter_subject: ns.outbox_subject("research"),
            ..Default::default()
        })
        .await
        .expect("consumer");
    let mut found = None;
    let mut said = Vec::new();
    let mut messages = consumer
        .fetch()
        .max_messages(20)
        .messages()
        .await
        .expect("fetch");
    while let Some(Ok(m)) = messages.next().await {
        if let Ok(OutboxMessage::Mention {
            from_agent,
            to_agent,
            text,
            in_reply_to,
            chain,
            reply_to: to,
            ..
        }) = serde_json::from_slice::<OutboxMessage>(&m.payload)
        {
            assert_eq!((from_agent.as_str(), &to), ("alice", &reply_to));
            found = Some((to_agent, text, in_reply_to, chain));
        } else if let Ok(OutboxMessage::Reply {
            agent,
            text,
            in_reply_to,
            reply_to: to,
            ..
        }) = serde_json::from_slice::<OutboxMessage>(&m.payload)
        {
            assert_eq!((agent.as_str(), &to), ("alice", &reply_to));
            said.push((text, in_reply_to));
        }
    }
    assert_eq!(
        said,
        [("working on it".to_owned(), routing)],
        "the reply tool speaks in the conversation at once, once"
    );
    let (to, text, in_reply_to, chain) = found.expect("the mention was published");
    assert_eq!(
        (to.as_str(), text.as_str()),
        ("bob", "bob, the plan is in memory")
    );
    // As alice's turn: her routed message and her chain, not what the environment said.
    assert_eq!(in_reply_to, routing);
    assert_eq!(chain, ["alice"]);

    drop(session);
    let status = child.wait().await.expect("exit");
    assert!(
        status.success(),
        "the server exits cleanly when the client closes stdin"
    );
    // Without a turn's socket there is no MCP server to speak as anyone.
    let alone = tokio::process::Command::new(env!("CARGO_BIN_EXE_warren-workspace-runtime"))
        .arg("--mcp")
        .env_clear()
        .env("WARREN_AGENT", "bob")
        .stdin(Stdio::null())
        .output()
        .await
        .expect("run");
    assert!(!alone.status.success());
    assert!(
        String::from_utf8_lossy(&alone.stderr).contains("WARREN_MCP_SOCKET"),
        "{}",
        String::from_utf8_lossy(&alone.stderr)
    );
    drop(turn);
    let _ = js.delete_key_value(ns.workspace_bucket("research")).await;
    let _ = js.delete_key_value(ns.shared_bucket()).await;
    let _ = js.delete_stream(ns.outbox_stream()).await;
}

/// The whole path: a runtime runs a `command` agent whose program starts
/// `warren-workspace-runtime --mcp` (as Claude Code would) and, claiming to be bob, says
/// something through the `reply` tool. It is said as alice, in alice's conversation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_agents_program_speaks_through_its_runtimes_mcp_server_as_its_own_turn() {
    let url = support::nats_url();
    let prefix = format!("mcprt{}", std::process::id());
    let ns = Namespace::new(&prefix);
    let js = jetstream::new(async_nats::connect(&url).await.expect("nats"));
    let (_, outbox) = support::streams(&js, &ns).await;
    let request = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"reply","arguments":{"text":"said through MCP"}}}"#;
    let script = format!(
        "printf '%s\\n' '{request}' | WARREN_AGENT=bob WARREN_ROUTING_ID=00000000-0000-0000-0000-000000000000 {bin} --mcp >/dev/null; echo done",
        bin = env!("CARGO_BIN_EXE_warren-workspace-runtime"),
    );
    let dir = std::env::temp_dir().join(format!("warren-mcp-runtime-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let config = support::launch(
        &url,
        &prefix,
        "research",
        "alice",
        json!({"driver": "command", "settings": {"command": ["/bin/sh", "-c", script]}}),
        &dir,
    );
    let shutdown = tokio_util::sync::CancellationToken::new();
    let runtime = tokio::spawn(warren_workspace_runtime::run(config, shutdown.clone()));
    let mut outputs = Box::pin(support::follow_outbox(&outbox, &ns, "research").await);
    let message = support::message("research", "alice", "use your tools");
    support::send(&js, &ns, &message).await;
    let mut replies = Vec::new();
    while replies.len() < 2 {
        match support::next_output(&mut outputs).await {
            OutboxMessage::Reply {
                agent,
                text,
                in_reply_to,
                ..
            } => replies.push((agent, text, in_reply_to)),
            OutboxMessage::Heartbeat { .. } => {}
            other => panic!("unexpected output {other:?}"),
        }
    }
    assert_eq!(
        replies,
        [
            (
                "alice".into(),
                "said through MCP".into(),
                message.routing_id
            ),
            ("alice".into(), "done".into(), message.routing_id),
        ]
    );
    // The turn's socket is gone with the turn.
    let sockets = std::fs::read_dir(dir.join(".warren-mcp"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(sockets, 0, "a socket outlived its turn");
    shutdown.cancel();
    runtime.await.expect("join").expect("runtime");
    support::remove(&js, &ns, &["research"]).await;
    let _ = std::fs::remove_dir_all(&dir);
}
