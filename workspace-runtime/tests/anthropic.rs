//! The `anthropic` driver against a local server that speaks the Messages API (`x-api-key`,
//! `anthropic-version`, `tool_use` blocks, `tool_result` blocks, 429 with Retry-After).

mod support;

use serde_json::{Value, json};
use warren_workspace_runtime::agent::{Driver, TurnContext};

async fn messages_server(script: Vec<(u16, Value)>) -> (String, support::Seen) {
    support::model_server("/v1/messages", script).await
}

fn message(content: Value, stop_reason: &str) -> Value {
    json!({"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-test",
           "content": content, "stop_reason": stop_reason,
           "usage": {"input_tokens": 10, "output_tokens": 5,
                     "cache_read_input_tokens": 100, "cache_creation_input_tokens": 0}})
}

#[tokio::test]
async fn a_tool_use_turn_mentions_an_agent_and_answers() {
    let (base, seen) = messages_server(vec![
        (429, json!({"type": "error", "error": {"type": "rate_limit_error"}})),
        (200, message(json!([
            {"type": "text", "text": "Let me ask bob."},
            {"type": "tool_use", "id": "toolu_1", "name": "mention",
             "input": {"agent": "bob", "text": "bob, what is the status?"}},
            {"type": "tool_use", "id": "toolu_2", "name": "memory_get", "input": {"key": "x"}}
        ]), "tool_use")),
        (200, message(json!([{"type": "text", "text": "Asked bob; he will answer here."}]), "end_turn")),
    ])
    .await;
    let key = std::env::temp_dir().join(format!("warren-anthropic-{}", std::process::id()));
    std::fs::write(&key, "sk-ant-test\n").expect("key");
    let driver = Driver::from_settings(&json!({"driver": "anthropic", "settings": {
        "base_url": base, "model": "claude-test", "max_tokens": 512, "api_key_file": key}}))
    .expect("driver");
    let ctx = TurnContext {
        workspace: "research".into(),
        agent: "alice".into(),
        text: "what's the status?".into(),
        message_id: "m1".into(),
        conversation: Some("c1".into()),
        traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
        ..TurnContext::default()
    };
    let turn = driver.turn(&ctx).await.expect("turn");
    // Two calls answered (the 429 is not one), each reporting its usage.
    assert_eq!(
        turn.usage,
        warren_schema::events::TurnUsage {
            model_calls: 2,
            input_tokens: 220,
            output_tokens: 10,
            cache_read_tokens: 200,
            cache_write_tokens: 0,
        }
    );
    assert_eq!(turn.reply, "Asked bob; he will answer here.");
    assert_eq!(
        turn.directed,
        [("bob".to_owned(), "bob, what is the status?".to_owned())]
    );

    let calls = seen.lock().expect("lock").clone();
    assert_eq!(calls.len(), 3);
    for (headers, body) in &calls {
        assert_eq!(
            headers.get("x-api-key").map(|v| v.to_str().ok()),
            Some(Some("sk-ant-test"))
        );
        assert_eq!(
            headers
                .get("anthropic-version")
                .and_then(|v| v.to_str().ok()),
            Some("2023-06-01")
        );
        assert!(
            headers.get("traceparent").is_some(),
            "trace context on the call"
        );
        assert_eq!(body["model"], "claude-test");
        assert!(body["system"].as_str().unwrap_or("").contains("alice"));
        let tools: Vec<&str> = body["tools"]
            .as_array()
            .expect("tools")
            .iter()
            .filter_map(|t| t["name"].as_str())
            .collect();
        assert!(
            tools.contains(&"mention") && tools.contains(&"memory_update"),
            "{tools:?}"
        );
    }
    // The tool results went back as one user turn of tool_result blocks.
    let last = calls[2].1["messages"].as_array().expect("messages").clone();
    let results = last.last().expect("results")["content"]
        .as_array()
        .expect("blocks")
        .clone();
    assert_eq!(results.len(), 2);
    assert_eq!(results[0]["type"], "tool_result");
    assert_eq!(results[0]["tool_use_id"], "toolu_1");
    assert_eq!(results[1]["tool_use_id"], "toolu_2");
    assert!(
        results[1]["content"]
            .as_str()
            .unwrap_or("")
            .contains("memory is not available"),
        "a tool error goes back to the model: {}",
        results[1]["content"]
    );
}
