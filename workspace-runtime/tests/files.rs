//! The file tools of the model drivers: an `openai` agent in one workspace writes a file in
//! the shared directory; an `anthropic` agent in another workspace reads it; what leaves
//! the directories is refused. Against local model servers speaking each API, on the real
//! file system.

mod support;

use serde_json::{Value, json};
use warren_workspace_runtime::agent::{Driver, TurnContext};

fn dirs(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("warren-file-tools-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    dir
}

fn ctx(
    workspace: &str,
    agent: &str,
    dir: &std::path::Path,
    shared: &std::path::Path,
) -> TurnContext {
    TurnContext {
        workspace: workspace.into(),
        agent: agent.into(),
        text: "go".into(),
        message_id: format!("m-{agent}"),
        routing_id: format!("r-{agent}"),
        workspace_dir: dir.to_owned(),
        shared_dir: Some(shared.to_owned()),
        ..TurnContext::default()
    }
}

fn chat(message: Value) -> Value {
    json!({"id": "chatcmpl-1", "object": "chat.completion", "model": "m",
           "choices": [{"index": 0, "message": message, "finish_reason": "stop"}]})
}

fn messages(content: Value, stop: &str) -> Value {
    json!({"id": "msg_1", "type": "message", "role": "assistant", "model": "m",
           "content": content, "stop_reason": stop,
           "usage": {"input_tokens": 10, "output_tokens": 5}})
}

#[tokio::test]
async fn an_agent_reads_what_an_agent_of_another_workspace_wrote_in_the_shared_directory() {
    let root = dirs("root");
    let (research, ops, shared) = (root.join("research"), root.join("ops"), root.join("shared"));
    for d in [&research, &ops, &shared] {
        std::fs::create_dir_all(d).expect("dir");
    }
    std::fs::write(research.join("private.txt"), "research only").expect("private");

    // alice (research, Chat Completions) writes a note to the shared directory.
    let (base, _) = support::model_server(
        "/v1/chat/completions",
        vec![
            (
                200,
                chat(json!({"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "file_write",
                 "arguments": json!({"path": "handoff/notes.md", "shared": true,
                                     "content": "deploy at 5pm\n"}).to_string()}}]})),
            ),
            (
                200,
                chat(json!({"role": "assistant", "content": "Left a note for ops."})),
            ),
        ],
    )
    .await;
    let alice = Driver::from_settings(&json!({"driver": "openai", "settings": {
        "base_url": format!("{base}/v1"), "model": "m"}}))
    .expect("alice");
    let turn = alice
        .turn(&ctx("research", "alice", &research, &shared))
        .await
        .expect("alice's turn");
    assert_eq!(turn.reply, "Left a note for ops.");
    assert_eq!(
        std::fs::read_to_string(shared.join("handoff/notes.md")).expect("written"),
        "deploy at 5pm\n"
    );

    // bob (ops, Messages API) lists and reads it, and cannot reach research's directory.
    let (base, seen) = support::model_server(
        "/v1/messages",
        vec![
            (
                200,
                messages(
                    json!([
                        {"type": "tool_use", "id": "t1", "name": "file_list",
                         "input": {"path": "handoff", "shared": true}},
                        {"type": "tool_use", "id": "t2", "name": "file_read",
                         "input": {"path": "handoff/notes.md", "shared": true}},
                        {"type": "tool_use", "id": "t3", "name": "file_read",
                         "input": {"path": "../research/private.txt", "shared": true}},
                        {"type": "tool_use", "id": "t4", "name": "file_read",
                         "input": {"path": format!("{}/private.txt", research.display())}}
                    ]),
                    "tool_use",
                ),
            ),
            (
                200,
                messages(
                    json!([{"type": "text", "text": "Deploy is at 5pm."}]),
                    "end_turn",
                ),
            ),
        ],
    )
    .await;
    let bob = Driver::from_settings(&json!({"driver": "anthropic", "settings": {
        "base_url": base, "model": "m"}}))
    .expect("bob");
    let turn = bob
        .turn(&ctx("ops", "bob", &ops, &shared))
        .await
        .expect("bob's turn");
    assert_eq!(turn.reply, "Deploy is at 5pm.");
    let calls = seen.lock().expect("lock").clone();
    let results: Vec<Value> = calls[1].1["messages"]
        .as_array()
        .and_then(|m| m.last())
        .and_then(|m| m["content"].as_array())
        .expect("tool results")
        .iter()
        .map(|r| serde_json::from_str(r["content"].as_str().expect("text")).expect("json"))
        .collect();
    assert_eq!(
        results[0]["entries"],
        json!([{"name": "notes.md", "kind": "file", "bytes": 14}])
    );
    assert_eq!(results[1]["content"], "deploy at 5pm\n");
    assert!(
        results[2]["error"]
            .as_str()
            .is_some_and(|e| e.contains("..")),
        "{}",
        results[2]
    );
    assert!(
        results[3]["error"]
            .as_str()
            .is_some_and(|e| e.contains("absolute")),
        "{}",
        results[3]
    );
    let offered: Vec<&str> = calls[0].1["tools"]
        .as_array()
        .expect("tools")
        .iter()
        .filter_map(|t| t["name"].as_str())
        .collect();
    for tool in ["file_read", "file_write", "file_list"] {
        assert!(offered.contains(&tool), "{offered:?}");
    }
    let _ = std::fs::remove_dir_all(&root);
}
