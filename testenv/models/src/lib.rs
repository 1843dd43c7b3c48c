//! Test support: local model API servers that speak the real wire protocols (OpenAI
//! Responses and Anthropic Messages, streamed as the API references show), and the pinned
//! coding-agent CLIs. Shared by the runtime's tests and the turn-overhead benchmark in
//! `loadtest/`, so both measure against the same server.

/// A Responses API answer streamed as the API streams it (`text/event-stream`):
/// `response.created`, then per output item `response.output_item.added`, its text deltas
/// (`response.content_part.added`, `response.output_text.delta`/`.done`,
/// `response.content_part.done`) or argument deltas (`response.function_call_arguments.*`),
/// and `response.output_item.done`; then `response.completed` with the whole response (or
/// `response.failed`, for a response whose status is `failed`). Sent in 7-byte pieces, so
/// the client reassembles frames split anywhere.
pub fn responses_stream(response: &serde_json::Value) -> axum::response::Response {
    use serde_json::{Value, json};
    let mut frames = String::new();
    let mut sequence = 0;
    let mut emit = |kind: &str, mut data: Value| {
        data["type"] = kind.into();
        data["sequence_number"] = sequence.into();
        sequence += 1;
        frames.push_str(&format!("event: {kind}\ndata: {data}\n\n"));
    };
    let mut created = response.clone();
    created["status"] = "in_progress".into();
    created["output"] = json!([]);
    created["usage"] = Value::Null;
    emit("response.created", json!({"response": created}));
    if response["status"] == "failed" {
        emit("response.failed", json!({"response": response}));
    } else {
        let output = response["output"].as_array().cloned().unwrap_or_default();
        for (index, item) in output.iter().enumerate() {
            let id = item["id"].clone();
            let mut added = item.clone();
            added["status"] = "in_progress".into();
            match item["type"].as_str() {
                Some("message") => {
                    added["content"] = json!([]);
                    emit(
                        "response.output_item.added",
                        json!({"output_index": index, "item": added}),
                    );
                    let parts = item["content"].as_array().cloned().unwrap_or_default();
                    for (part_index, part) in parts.iter().enumerate() {
                        let at = json!({"item_id": id, "output_index": index,
                                        "content_index": part_index});
                        let mut start = at.clone();
                        start["part"] =
                            json!({"type": "output_text", "text": "", "annotations": []});
                        emit("response.content_part.added", start);
                        let text = part["text"].as_str().unwrap_or_default();
                        let chars: Vec<char> = text.chars().collect();
                        for piece in chars.chunks(4) {
                            let mut delta = at.clone();
                            delta["delta"] = piece.iter().collect::<String>().into();
                            emit("response.output_text.delta", delta);
                        }
                        let mut done = at.clone();
                        done["text"] = text.into();
                        emit("response.output_text.done", done);
                        let mut done = at;
                        done["part"] = part.clone();
                        emit("response.content_part.done", done);
                    }
                }
                Some("function_call") => {
                    added["arguments"] = "".into();
                    emit(
                        "response.output_item.added",
                        json!({"output_index": index, "item": added}),
                    );
                    let at = json!({"item_id": id, "output_index": index});
                    let mut delta = at.clone();
                    delta["delta"] = item["arguments"].clone();
                    emit("response.function_call_arguments.delta", delta);
                    let mut done = at;
                    done["arguments"] = item["arguments"].clone();
                    emit("response.function_call_arguments.done", done);
                }
                _ => emit(
                    "response.output_item.added",
                    json!({"output_index": index, "item": added}),
                ),
            }
            emit(
                "response.output_item.done",
                json!({"output_index": index, "item": item}),
            );
        }
        emit("response.completed", json!({"response": response}));
    }
    sse_body(frames)
}

/// A Messages API answer streamed as the API streams it (`text/event-stream`):
/// `message_start` (the message with no content, the input usage), per content block
/// `content_block_start`, its deltas (`text_delta`, or `input_json_delta` pieces of a
/// `tool_use` block's input) and `content_block_stop`, a `ping`, then `message_delta` (the
/// stop reason, the output usage) and `message_stop`. Sent in 7-byte pieces.
pub fn messages_stream(message: &serde_json::Value) -> axum::response::Response {
    use serde_json::{Value, json};
    let mut frames = String::new();
    let mut emit = |kind: &str, mut data: Value| {
        data["type"] = kind.into();
        frames.push_str(&format!("event: {kind}\ndata: {data}\n\n"));
    };
    let mut start = message.clone();
    start["content"] = json!([]);
    start["stop_reason"] = Value::Null;
    start["usage"]["output_tokens"] = 1.into();
    emit("message_start", json!({"message": start}));
    emit("ping", json!({}));
    let blocks = message["content"].as_array().cloned().unwrap_or_default();
    for (index, block) in blocks.iter().enumerate() {
        match block["type"].as_str() {
            Some("tool_use") => {
                let mut empty = block.clone();
                empty["input"] = json!({});
                emit(
                    "content_block_start",
                    json!({"index": index, "content_block": empty}),
                );
                let input = block["input"].to_string();
                let chars: Vec<char> = input.chars().collect();
                for piece in chars.chunks(9) {
                    emit(
                        "content_block_delta",
                        json!({"index": index, "delta": {
                        "type": "input_json_delta",
                        "partial_json": piece.iter().collect::<String>()}}),
                    );
                }
            }
            _ => {
                emit(
                    "content_block_start",
                    json!({"index": index,
                    "content_block": {"type": "text", "text": ""}}),
                );
                let text = block["text"].as_str().unwrap_or_default();
                let chars: Vec<char> = text.chars().collect();
                for piece in chars.chunks(5) {
                    emit(
                        "content_block_delta",
                        json!({"index": index, "delta": {
                        "type": "text_delta", "text": piece.iter().collect::<String>()}}),
                    );
                }
            }
        }
        emit("content_block_stop", json!({"index": index}));
    }
    emit(
        "message_delta",
        json!({
        "delta": {"stop_reason": message["stop_reason"], "stop_sequence": null},
        "usage": {"output_tokens": message["usage"]["output_tokens"]}}),
    );
    emit("message_stop", json!({}));
    sse_body(frames)
}

/// Server-sent event frames as a `text/event-stream` body, sent in 7-byte pieces so the
/// client reassembles frames split anywhere.
pub fn sse_body(frames: String) -> axum::response::Response {
    let pieces: Vec<Result<Vec<u8>, std::convert::Infallible>> = frames
        .into_bytes()
        .chunks(7)
        .map(|c| Ok(c.to_vec()))
        .collect();
    axum::response::Response::builder()
        .header("content-type", "text/event-stream")
        .body(axum::body::Body::from_stream(futures_util::stream::iter(
            pieces,
        )))
        .expect("response")
}

/// A model's requests as a local server received them.
pub type Requests =
    std::sync::Arc<std::sync::Mutex<Vec<(axum::http::HeaderMap, serde_json::Value)>>>;

/// Serves `answer` (request body → response) on POST `path`, recording every request.
/// Returns `http://{addr}`.
pub async fn dynamic_model<F>(path: &str, answer: F) -> (String, Requests)
where
    F: Fn(&serde_json::Value) -> axum::response::Response + Clone + Send + Sync + 'static,
{
    let requests = Requests::default();
    let seen = requests.clone();
    let app = axum::Router::new().route(
        path,
        axum::routing::post(
            move |headers: axum::http::HeaderMap,
                  axum::Json(body): axum::Json<serde_json::Value>| {
                let (seen, answer) = (seen.clone(), answer.clone());
                async move {
                    let response = answer(&body);
                    seen.lock().expect("lock").push((headers, body));
                    response
                }
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), requests)
}

/// A CLI installed by `scripts/lib/clis.sh`: `$env_var` (set by `./scripts/test`), else the
/// pinned install under `.warren/clis/{dir_prefix}*`.
pub fn cli(env_var: &str, dir_prefix: &str, bin: &str) -> Result<String, String> {
    if let Ok(path) = std::env::var(env_var) {
        return Ok(path);
    }
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../../.warren/clis");
    std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|d| d.file_name().to_string_lossy().starts_with(dir_prefix))
        .map(|d| d.path().join("node_modules/.bin").join(bin))
        .find(|p| p.exists())
        .map(|p| p.to_string_lossy().into_owned())
        .ok_or_else(|| {
            format!(
                "{bin} is not installed: run ./scripts/test, or source scripts/lib/services.sh \
                 and scripts/lib/clis.sh and run ensure_codex / ensure_claude"
            )
        })
}

/// The documented Codex recipe's command line (docs/coding-agents.md): `codex exec --json`
/// with a model provider at `base_url` speaking the Responses API, its key from
/// `OPENAI_API_KEY`. With `mcp_runtime`, Warren's tools through `{mcp_runtime} --mcp`; without,
/// the CLI alone (the turn-overhead benchmark's baseline).
pub fn codex_command(cli: &str, base_url: &str, mcp_runtime: Option<&str>) -> Vec<String> {
    let mut command: Vec<String> = [
        cli,
        "exec",
        "--json",
        "--skip-git-repo-check",
        "--sandbox",
        "danger-full-access",
        "-c",
        "approval_policy=\"never\"",
        "-c",
        "model_provider=\"warren\"",
        "-c",
    ]
    .map(str::to_owned)
    .into();
    command.push(format!(
        "model_providers.warren={{name=\"warren\",base_url=\"{base_url}/v1\",\
         env_key=\"OPENAI_API_KEY\",wire_api=\"responses\"}}"
    ));
    if let Some(runtime) = mcp_runtime {
        command.push("-c".into());
        command.push(format!(
            "mcp_servers.warren={{command=\"{runtime}\",args=[\"--mcp\"],\
             env_vars=[\"WARREN_MCP_SOCKET\"]}}"
        ));
    }
    command.extend(["-m".into(), "gpt-test".into()]);
    command
}

/// The documented Claude Code recipe's command line (docs/coding-agents.md): `claude -p
/// --output-format json` against `base_url` (set with `/usr/bin/env`, with the switches
/// that stop other traffic), no MCP server but Warren's. With `mcp_runtime`, Warren's tools
/// through `{mcp_runtime} --mcp`, allowed without a prompt; without, the CLI alone.
pub fn claude_command(cli: &str, base_url: &str, mcp_runtime: Option<&str>) -> Vec<String> {
    let mut command: Vec<String> = vec![
        "/usr/bin/env".into(),
        format!("ANTHROPIC_BASE_URL={base_url}"),
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1".into(),
        "DISABLE_AUTOUPDATER=1".into(),
        "ENABLE_TOOL_SEARCH=false".into(),
        cli.into(),
        "-p".into(),
        "--output-format".into(),
        "json".into(),
        "--model".into(),
        "claude-test".into(),
        "--strict-mcp-config".into(),
    ];
    if let Some(runtime) = mcp_runtime {
        let mcp =
            serde_json::json!({"mcpServers": {"warren": {"command": runtime, "args": ["--mcp"]}}});
        command.extend([
            "--mcp-config".into(),
            mcp.to_string(),
            "--allowedTools".into(),
            "mcp__warren".into(),
        ]);
    }
    command
}

/// A `command` agent's driver configuration running `command`, the message as its last
/// argument, its output read as `output` (`codex-json`, `claude-json`).
pub fn command_agent(command: Vec<String>, output: &str) -> serde_json::Value {
    serde_json::json!({"driver": "command", "settings": {
        "input": "argument",
        "output": output,
        "timeout_secs": 120,
        "command": command,
    }})
}
