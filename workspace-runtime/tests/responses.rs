//! The `openai` driver with `"wire_api": "responses"` against a local server that speaks the
//! Responses API: bearer key, flat function tools, `function_call` output items answered by
//! `function_call_output` items, usage, 429 with Retry-After, and the answer streamed as
//! server-sent events in pieces (`response.output_item.done`, `response.completed`,
//! `response.failed`), with the tools acting on real NATS key-value memory.

mod support;

use serde_json::{Value, json};
use warren_schema::nats::Namespace;
use warren_workspace_runtime::agent::{Driver, DriverError, TurnContext};
use warren_workspace_runtime::memory::Memory;

fn driver(base_url: &str, key_file: &std::path::Path, stream: bool) -> Driver {
    Driver::from_settings(&json!({"driver": "openai", "settings": {
        "base_url": base_url, "model": "gpt-test", "max_tokens": 300, "wire_api": "responses",
        "stream": stream, "api_key_file": key_file}}))
    .expect("driver")
}

fn key_file(name: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("warren-responses-{}-{name}", std::process::id()));
    std::fs::write(&path, "sk-responses-key\n").expect("key file");
    path
}

/// A completed response with `output`, as the API returns it.
fn response(id: &str, output: Value, input_tokens: u64) -> Value {
    json!({"id": id, "object": "response", "created_at": 1_764_000_000, "status": "completed",
           "model": "gpt-test", "output": output, "parallel_tool_calls": true,
           "usage": {"input_tokens": input_tokens, "input_tokens_details": {"cached_tokens": 16},
                     "output_tokens": 12, "output_tokens_details": {"reasoning_tokens": 4},
                     "total_tokens": input_tokens + 12}})
}

fn message(id: &str, text: &str) -> Value {
    json!({"type": "message", "id": id, "status": "completed", "role": "assistant",
           "content": [{"type": "output_text", "text": text, "annotations": []}]})
}

fn call(n: u32, name: &str, arguments: Value) -> Value {
    json!({"type": "function_call", "id": format!("fc_{n}"), "call_id": format!("call_{n}"),
           "name": name, "arguments": arguments.to_string(), "status": "completed"})
}

async fn turn_with_memory(stream: bool) {
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let js = async_nats::jetstream::new(async_nats::connect(&url).await.expect("nats"));
    let ns = Namespace::new(&format!("rsp{}{stream}", std::process::id()));
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
    let (base, seen) = support::model_server(
        "/v1/responses",
        vec![
            (
                429,
                json!({"error": {"type": "rate_limit_error", "message": "slow down"}}),
            ),
            (
                200,
                response(
                    "resp_1",
                    json!([
                        {"type": "reasoning", "id": "rs_1", "summary": []},
                        call(1, "memory_put", json!({"key": "plan", "value": "ship it"})),
                        call(2, "mention", json!({"agent": "bob", "text": "bob, see the plan"}))
                    ]),
                    100,
                ),
            ),
            (
                200,
                response(
                    "resp_2",
                    json!([message("msg_2", "Saved the plan and asked @bob.")]),
                    180,
                ),
            ),
        ],
    )
    .await;
    let d = driver(
        &format!("{base}/v1"),
        &key_file(&stream.to_string()),
        stream,
    );
    let ctx = TurnContext {
        workspace: "research".into(),
        agent: "alice".into(),
        text: "save the plan and tell bob".into(),
        message_id: "m1".into(),
        routing_id: "r1".into(),
        conversation: Some("conv-1".into()),
        memory: Some(memory.clone()),
        ..TurnContext::default()
    };
    let turn = d.turn(&ctx).await.expect("turn");
    assert_eq!(turn.reply, "Saved the plan and asked @bob.");
    assert_eq!(
        turn.directed,
        [("bob".to_owned(), "bob, see the plan".to_owned())]
    );
    assert!(turn.mentions.is_empty(), "bob is asked by the tool already");
    assert_eq!(
        (
            turn.usage.model_calls,
            turn.usage.input_tokens,
            turn.usage.output_tokens,
            turn.usage.cache_read_tokens
        ),
        (2, 280, 24, 32)
    );
    let plan = memory.get("plan").await.expect("get").expect("written");
    assert_eq!(plan.stored.value, json!("ship it"));

    let calls = seen.lock().expect("lock").clone();
    assert_eq!(calls.len(), 3, "a 429, the tool step, the answer");
    for (headers, body) in &calls {
        assert_eq!(
            headers.get("authorization").and_then(|v| v.to_str().ok()),
            Some("Bearer sk-responses-key")
        );
        assert_eq!(body["model"], "gpt-test");
        assert_eq!(body["store"], false, "nothing kept at the provider");
        assert_eq!(body["stream"], stream);
        assert_eq!(body["max_output_tokens"], 300);
        assert!(
            body["instructions"]
                .as_str()
                .is_some_and(|i| i.contains("alice") && i.contains("research")),
            "{body}"
        );
    }
    let tools: Vec<&str> = calls[1].1["tools"]
        .as_array()
        .expect("tools")
        .iter()
        .filter(|t| t["type"] == "function")
        .filter_map(|t| t["name"].as_str())
        .collect();
    assert!(
        tools.contains(&"mention") && tools.contains(&"memory_put"),
        "{tools:?}"
    );
    assert_eq!(
        calls[1].1["input"],
        json!([{"role": "user", "content": "save the plan and tell bob"}])
    );
    // The second call carries the whole exchange (a stateless server): the calls, without
    // the reasoning item, then an output for each call id.
    let input = calls[2].1["input"].as_array().expect("input").clone();
    let kinds: Vec<&str> = input
        .iter()
        .map(|i| i["type"].as_str().unwrap_or("user"))
        .collect();
    assert_eq!(
        kinds,
        [
            "user",
            "function_call",
            "function_call",
            "function_call_output",
            "function_call_output"
        ]
    );
    assert_eq!(input[3]["call_id"], "call_1");
    let written: Value =
        serde_json::from_str(input[3]["output"].as_str().expect("output")).expect("json");
    assert!(written["revision"].as_u64().is_some(), "{written}");
    assert_eq!(input[4]["call_id"], "call_2");
}

#[tokio::test]
async fn a_streamed_tool_use_turn_writes_memory_and_mentions_an_agent() {
    turn_with_memory(true).await;
}

#[tokio::test]
async fn the_same_turn_unstreamed_gives_the_same_result() {
    turn_with_memory(false).await;
}

#[tokio::test]
async fn a_failed_response_fails_the_turn_and_an_unknown_wire_api_is_refused() {
    let failed = json!({"id": "resp_9", "object": "response", "status": "failed",
        "error": {"code": "server_error", "message": "The model is overloaded"},
        "output": []});
    let (base, _) = support::model_server("/v1/responses", vec![(200, failed)]).await;
    let d = driver(&format!("{base}/v1"), &key_file("failed"), true);
    let ctx = TurnContext {
        workspace: "research".into(),
        agent: "alice".into(),
        text: "hello".into(),
        message_id: "m2".into(),
        routing_id: "r2".into(),
        ..TurnContext::default()
    };
    match d.turn(&ctx).await {
        Err(DriverError::Api(e)) => {
            assert!(e.contains("server_error: The model is overloaded"), "{e}");
            assert!(!e.contains("sk-responses-key"), "no key in errors: {e}");
        }
        other => panic!("expected a model error, got {other:?}"),
    }
    let refused = Driver::from_settings(&json!({"driver": "openai", "settings": {
        "model": "m", "wire_api": "completions-v0"}}))
    .expect_err("unknown wire api");
    assert!(refused.to_string().contains("responses"), "{refused}");
}
