//! The `openai` driver against a local server that speaks the Chat Completions API (bearer
//! key, `tools`, `tool_calls`, `tool` messages, 429 with Retry-After), with the tools acting
//! on real NATS key-value memory.

mod support;

use serde_json::{Value, json};
use warren_schema::nats::Namespace;
use warren_workspace_runtime::agent::{Driver, DriverError, TurnContext};
use warren_workspace_runtime::memory::Memory;

/// The local Chat Completions server; its base URL ends in `/v1`.
async fn model_server(script: Vec<(u16, Value)>) -> (String, support::Seen) {
    let (base, seen) = support::model_server("/v1/chat/completions", script).await;
    (format!("{base}/v1"), seen)
}

fn bearer(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers.get("authorization").and_then(|v| v.to_str().ok())
}

fn driver(base_url: &str, key_file: &std::path::Path) -> Driver {
    Driver::from_settings(&json!({"driver": "openai", "settings": {
        "base_url": base_url, "model": "test-model", "max_tokens": 256,
        "api_key_file": key_file}}))
    .expect("driver")
}

fn key_file(name: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("warren-openai-{}-{name}", std::process::id()));
    std::fs::write(&path, "sk-test-key\n").expect("key file");
    path
}

fn assistant(message: Value) -> Value {
    json!({"id": "chatcmpl-1", "object": "chat.completion", "model": "test-model",
           "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
           "usage": {"prompt_tokens": 50, "completion_tokens": 7, "total_tokens": 57,
                     "prompt_tokens_details": {"cached_tokens": 32}}})
}

#[tokio::test]
async fn a_tool_use_turn_writes_memory_mentions_an_agent_and_keeps_history() {
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let js = async_nats::jetstream::new(async_nats::connect(&url).await.expect("nats"));
    let ns = Namespace::new(&format!("oai{}", std::process::id()));
    support::streams(&js, &ns).await;
    let memory = Memory::open(
        js.clone(),
        ns.clone(),
        &ns.workspace_bucket("research"),
        "research",
        "alice",
    )
    .await
    .expect("memory");

    let (base, seen) = model_server(vec![
        (429, json!({"error": {"message": "slow down"}})),
        (200, assistant(json!({"role": "assistant", "content": null, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "memory_put", "arguments": "{\"key\":\"note\",\"value\":\"hi\"}"}},
            {"id": "call_2", "type": "function",
             "function": {"name": "mention", "arguments": "{\"agent\":\"bob\",\"text\":\"bob, read the note\"}"}},
            {"id": "call_3", "type": "function",
             "function": {"name": "reply", "arguments": "{\"text\":\"on it\"}"}},
            {"id": "call_4", "type": "function",
             "function": {"name": "list_agents", "arguments": "{}"}}
        ]}))),
        (200, assistant(json!({"role": "assistant", "content": "Noted, and asked @bob."}))),
        (200, assistant(json!({"role": "assistant", "content": "Still here."}))),
    ])
    .await;
    let d = driver(&base, &key_file("ok"));
    let ctx = TurnContext {
        workspace: "research".into(),
        agent: "alice".into(),
        text: "remember hi and tell bob".into(),
        message_id: "m1".into(),
        routing_id: "r1".into(),
        conversation: Some("conv-1".into()),
        memory: Some(memory.clone()),
        directory: Some(warren_workspace_runtime::control_plane::Directory::new(
            js.client(),
            &ns,
            "research",
        )),
        ..TurnContext::default()
    };
    let _directory =
        support::serve_directory(&js, &ns, &[("alice", "research"), ("bob", "ops")]).await;
    let turn = d.turn(&ctx).await.expect("turn");
    assert_eq!(turn.reply, "Noted, and asked @bob.");
    assert_eq!(
        (
            turn.usage.model_calls,
            turn.usage.input_tokens,
            turn.usage.output_tokens,
            turn.usage.cache_read_tokens
        ),
        (2, 100, 14, 64),
        "the two calls that answered, summed"
    );
    assert_eq!(
        turn.said,
        ["on it"],
        "the reply tool's words, said before the answer"
    );
    assert_eq!(
        turn.directed,
        [("bob".to_owned(), "bob, read the note".to_owned())]
    );
    assert!(
        turn.mentions.is_empty(),
        "bob is already mentioned by the tool"
    );
    let note = memory.get("note").await.expect("get").expect("written");
    assert_eq!(
        (note.stored.value.clone(), note.stored.agent.as_str()),
        (json!("hi"), "alice")
    );

    let calls = seen.lock().expect("lock").clone();
    assert_eq!(calls.len(), 3, "a 429, the tool step, the answer");
    assert!(
        calls
            .iter()
            .all(|(headers, _)| bearer(headers) == Some("Bearer sk-test-key"))
    );
    let first = &calls[1].1;
    assert_eq!(first["model"], "test-model");
    let tools: Vec<&str> = first["tools"]
        .as_array()
        .expect("tools")
        .iter()
        .filter_map(|t| t["function"]["name"].as_str())
        .collect();
    assert!(
        tools.contains(&"memory_put") && tools.contains(&"mention"),
        "{tools:?}"
    );
    let answer_request = calls[2].1["messages"].as_array().expect("messages").clone();
    let tool_results: Vec<&Value> = answer_request
        .iter()
        .filter(|m| m["role"] == "tool")
        .collect();
    assert_eq!(tool_results.len(), 4);
    let directory: Value =
        serde_json::from_str(tool_results[3]["content"].as_str().expect("text")).expect("json");
    assert_eq!(
        directory["agents"][1],
        json!({"name": "bob", "workspace": "ops", "you": false})
    );
    assert_eq!(tool_results[0]["tool_call_id"], "call_1");
    assert!(
        tool_results[0]["content"]
            .as_str()
            .unwrap_or("")
            .contains("revision")
    );

    // The next turn of the conversation carries its history.
    let next = TurnContext {
        text: "are you there?".into(),
        ..ctx.clone()
    };
    assert_eq!(d.turn(&next).await.expect("turn").reply, "Still here.");
    let history = seen.lock().expect("lock")[3].1["messages"].clone();
    let texts: Vec<&str> = history
        .as_array()
        .expect("messages")
        .iter()
        .filter_map(|m| m["content"].as_str())
        .collect();
    assert!(texts.contains(&"remember hi and tell bob"), "{texts:?}");
    assert!(texts.contains(&"are you there?"));
    let _ = js.delete_key_value(ns.workspace_bucket("research")).await;
    let _ = js.delete_stream(ns.outbox_stream()).await;
}

#[tokio::test]
async fn server_errors_are_retried_then_reported_without_the_key() {
    let (base, seen) = model_server(vec![
        (503, json!({"error": "down"})),
        (503, json!({"error": "down"})),
        (503, json!({"error": "down"})),
        (503, json!({"error": "still down"})),
    ])
    .await;
    let d = driver(&base, &key_file("down"));
    let err = d
        .turn(&TurnContext {
            agent: "alice".into(),
            text: "hello".into(),
            ..TurnContext::default()
        })
        .await
        .expect_err("fails");
    assert!(matches!(err, DriverError::Api(_)), "{err}");
    let message = err.to_string();
    assert!(
        message.contains("503") && message.contains("4 attempt"),
        "{message}"
    );
    assert!(!message.contains("sk-test-key"), "no secret in the error");
    assert_eq!(seen.lock().expect("lock").len(), 4);
}

/// Through the runtime: what the model says with the `reply` tool reaches the conversation
/// before its answer, both as replies to the message's origin, and the inbox message is
/// acknowledged once both are stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_the_runtime_the_reply_tool_speaks_before_the_answer() {
    let url = support::nats_url();
    let prefix = format!("oairt{}", std::process::id());
    let ns = Namespace::new(&prefix);
    let js = async_nats::jetstream::new(async_nats::connect(&url).await.expect("nats"));
    let (inbox, outbox) = support::streams(&js, &ns).await;
    let (base, seen) = model_server(vec![
        (
            200,
            assistant(json!({"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "reply", "arguments": "{\"text\":\"looking into it\"}"}}
            ]})),
        ),
        (
            200,
            assistant(json!({"role": "assistant", "content": "found it"})),
        ),
    ])
    .await;
    let settings = json!({"alice": {"driver": "openai", "settings": {
        "base_url": base, "model": "test-model", "max_tokens": 64,
        "api_key_file": key_file("runtime")}}});
    let shutdown = tokio_util::sync::CancellationToken::new();
    let runtime = tokio::spawn(warren_workspace_runtime::run(
        {
            let mut c = support::launch(
                &url,
                &prefix,
                "w",
                "alice",
                settings["alice"].clone(),
                &std::env::temp_dir(),
            );
            c.tuning.max_deliver = 3;
            c.tuning.heartbeat_secs = 10;
            c
        },
        shutdown.clone(),
    ));

    let message = support::message("w", "alice", "where is it?");
    support::send(&js, &ns, &message).await;
    let mut outputs = Box::pin(support::follow_outbox(&outbox, &ns, "w").await);
    let mut said = Vec::new();
    while said.len() < 2 {
        match support::next_output(&mut outputs).await {
            warren_schema::nats::OutboxMessage::Reply {
                in_reply_to,
                reply_to,
                text,
                ..
            } => {
                assert_eq!(in_reply_to, message.routing_id);
                assert_eq!(
                    reply_to, message.reply_to,
                    "said in the message's conversation"
                );
                said.push(text);
            }
            other => panic!("unexpected output {other:?}"),
        }
    }
    assert_eq!(said, ["looking into it", "found it"]);
    let info = support::acknowledged(&inbox, "w", "alice").await;
    assert_eq!(
        info.delivered.consumer_sequence, 1,
        "answered on the first delivery"
    );
    // The model saw the tool's result before it answered.
    let calls = seen.lock().expect("lock").clone();
    assert_eq!(calls.len(), 2);
    let answered = calls[1].1["messages"].as_array().expect("messages").clone();
    assert!(
        answered
            .iter()
            .any(|m| m["role"] == "tool" && m["tool_call_id"] == "call_1"),
        "{answered:?}"
    );

    shutdown.cancel();
    runtime.await.expect("join").expect("runtime");
    support::remove(&js, &ns, &["w"]).await;
}
