//! Our MCP server as a third-party client sees it: the official Rust MCP SDK (`rmcp`)
//! starts `warren-workspace-runtime --mcp` as a child process, negotiates a protocol
//! version, lists the tools and calls them. What Claude Code or Codex would do, through a
//! client we did not write.

mod support;

use async_nats::jetstream;
use rmcp::ServiceExt;
use rmcp::model::CallToolRequestParams;
use rmcp::transport::TokioChildProcess;
use serde_json::{Value, json};
use warren_schema::EventId;
use warren_schema::events::Origin;
use warren_schema::nats::{Namespace, OutboxMessage};

fn args(value: Value) -> serde_json::Map<String, Value> {
    value.as_object().cloned().expect("an object")
}

#[tokio::test]
async fn the_official_mcp_sdk_negotiates_lists_and_calls_warrens_tools() {
    let url = support::nats_url();
    let prefix = format!("rmcp{}", std::process::id());
    let ns = Namespace::new(&prefix);
    let js = jetstream::new(async_nats::connect(&url).await.expect("nats"));
    let outbox = js
        .get_or_create_stream(ns.outbox_stream_config())
        .await
        .expect("outbox");
    let routing = EventId::random();
    let reply_to = Origin::Webhook {
        endpoint: "ci".into(),
        delivery_id: "7".into(),
    };
    let (turn, _directory) = support::mcp_turn(&js, &ns, routing, &reply_to).await;
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_warren-workspace-runtime"));
    command
        .arg("--mcp")
        .env_clear()
        .env("WARREN_MCP_SOCKET", turn.path());
    let client =
        ().serve(TokioChildProcess::new(command).expect("spawn"))
            .await
            .expect("the MCP handshake");

    let server = client.peer_info().expect("the server's initialize result");
    assert_eq!(
        server.server_info.as_ref().map(|i| i.name.as_str()),
        Some("warren")
    );
    assert!(server.capabilities.tools.is_some(), "{server:?}");

    let tools = client.list_all_tools().await.expect("tools/list");
    let mut names: Vec<&str> = tools.iter().map(|t| t.name.as_ref()).collect();
    names.sort_unstable();
    assert_eq!(
        names,
        [
            "file_list",
            "file_read",
            "file_write",
            "list_agents",
            "memory_delete",
            "memory_get",
            "memory_list",
            "memory_put",
            "memory_update",
            "mention",
            "reply"
        ]
    );

    let call = |name: &'static str, arguments: Value| {
        let client = &client;
        async move {
            let result = client
                .call_tool(CallToolRequestParams::new(name).with_arguments(args(arguments)))
                .await
                .unwrap_or_else(|e| panic!("tools/call {name}: {e}"));
            let text = result.content[0]
                .as_text()
                .expect("text content")
                .text
                .clone();
            (
                serde_json::from_str::<Value>(&text).expect("JSON in the text"),
                result.is_error.unwrap_or(false),
            )
        }
    };
    let (put, is_error) = call("memory_put", json!({"key": "plan", "value": [1, 2]})).await;
    assert!(!is_error, "{put}");
    let (got, _) = call("memory_get", json!({"key": "plan"})).await;
    assert_eq!(
        (got["value"].clone(), got["revision"].clone()),
        (json!([1, 2]), put["revision"].clone())
    );
    let (conflict, is_error) = call(
        "memory_update",
        json!({"key": "plan", "value": 3, "expected_revision": 0}),
    )
    .await;
    assert!(
        is_error,
        "creating an existing key is a conflict: {conflict}"
    );
    let (agents, _) = call("list_agents", json!({})).await;
    assert_eq!(agents["agents"][1]["name"], "bob");
    let (_, is_error) = call("mention", json!({"agent": "bob", "text": "see the plan"})).await;
    assert!(!is_error);

    client.cancel().await.expect("close the session");

    let mentions: Vec<_> = support::outbox_contents(&outbox, &ns, "research")
        .await
        .into_iter()
        .filter_map(|m| match m {
            OutboxMessage::Mention {
                to_agent,
                text,
                in_reply_to,
                ..
            } => Some((to_agent, text, in_reply_to)),
            _ => None,
        })
        .collect();
    assert_eq!(
        mentions,
        [("bob".to_owned(), "see the plan".to_owned(), routing)]
    );
    support::remove(&js, &ns, &["research"]).await;
}
