//! What a `command` agent's stdout means (`settings.output`). Pure: stdout in, the reply
//! and what the turn used out.
//!
//! - `text` (default): stdout, trimmed, is the reply.
//! - `codex-json`: `codex exec --json` prints one JSON event per line. The reply is the
//!   last `agent_message` item; the usage is `turn.completed`'s; `turn.failed` fails the
//!   turn. `error` events are not fatal by themselves (Codex reports its reconnects with
//!   them): without a `turn.completed`, the last one is the turn's error.
//! - `claude-json`: `claude -p --output-format json` prints one result object. The reply
//!   is its `result`; `is_error` fails the turn; the usage is its `usage` (Anthropic's
//!   fields) over `num_turns` model calls.

use serde_json::Value;
use warren_schema::events::TurnUsage;

/// How a program's stdout is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    Text,
    CodexJson,
    ClaudeJson,
}

impl Output {
    /// The setting's value; `None` for one this runtime does not know.
    pub fn named(name: &str) -> Option<Self> {
        match name {
            "text" => Some(Self::Text),
            "codex-json" => Some(Self::CodexJson),
            "claude-json" => Some(Self::ClaudeJson),
            _ => None,
        }
    }
}

/// What one run of the program said.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Said {
    pub reply: String,
    pub usage: TurnUsage,
    /// The CLI's session id (Codex's `thread.started` `thread_id`, Claude Code's
    /// `session_id`), for resuming the conversation.
    pub session: Option<String>,
}

/// Reads `stdout` as `output` says; an error names what the program reported.
pub fn read(output: Output, stdout: &str) -> Result<Said, String> {
    match output {
        Output::Text => Ok(Said {
            reply: stdout.trim().to_owned(),
            ..Said::default()
        }),
        Output::CodexJson => codex(stdout),
        Output::ClaudeJson => claude(stdout),
    }
}

fn codex(stdout: &str) -> Result<Said, String> {
    let mut said = Said::default();
    let mut completed = false;
    let mut last_error = None;
    for line in stdout.lines().filter(|l| !l.trim().is_empty()) {
        let event: Value = serde_json::from_str(line)
            .map_err(|e| format!("codex printed a line that is not a JSON event: {e}"))?;
        match event["type"].as_str().unwrap_or_default() {
            "thread.started" => said.session = event["thread_id"].as_str().map(str::to_owned),
            "item.completed" if event["item"]["type"] == "agent_message" => {
                said.reply = event["item"]["text"]
                    .as_str()
                    .unwrap_or_default()
                    .trim()
                    .to_owned();
            }
            "turn.completed" => {
                completed = true;
                let u = &event["usage"];
                let n = |f: &str| u[f].as_u64().unwrap_or(0);
                said.usage.add(&TurnUsage {
                    model_calls: 0,
                    input_tokens: n("input_tokens"),
                    output_tokens: n("output_tokens"),
                    cache_read_tokens: n("cached_input_tokens"),
                    cache_write_tokens: n("cache_write_input_tokens"),
                });
            }
            "turn.failed" => {
                return Err(format!(
                    "codex: the turn failed: {}",
                    text(&event["error"]["message"])
                ));
            }
            "error" => last_error = Some(text(&event["message"])),
            _ => {}
        }
    }
    if !completed {
        return Err(match last_error {
            Some(e) => format!("codex ended without turn.completed: {e}"),
            None => "codex ended without turn.completed".into(),
        });
    }
    Ok(said)
}

fn claude(stdout: &str) -> Result<Said, String> {
    let result: Value = serde_json::from_str(stdout.trim())
        .map_err(|e| format!("claude printed no JSON result: {e}"))?;
    if result["is_error"] == true {
        return Err(format!("claude: {}", text(&result["result"])));
    }
    let u = &result["usage"];
    let n = |f: &str| u[f].as_u64().unwrap_or(0);
    Ok(Said {
        session: result["session_id"].as_str().map(str::to_owned),
        reply: text(&result["result"]).trim().to_owned(),
        usage: TurnUsage {
            model_calls: u32::try_from(result["num_turns"].as_u64().unwrap_or(0))
                .unwrap_or(u32::MAX),
            input_tokens: n("input_tokens")
                + n("cache_read_input_tokens")
                + n("cache_creation_input_tokens"),
            output_tokens: n("output_tokens"),
            cache_read_tokens: n("cache_read_input_tokens"),
            cache_write_tokens: n("cache_creation_input_tokens"),
        },
    })
}

/// A string value, at most 500 characters (what a CLI says goes into an error and a log).
fn text(value: &Value) -> String {
    value
        .as_str()
        .unwrap_or("no message")
        .chars()
        .take(500)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codex_events_give_the_last_agent_message_and_the_turn_s_usage() {
        let stdout = r#"{"type":"thread.started","thread_id":"01a2"}
{"type":"item.completed","item":{"id":"item_0","type":"error","message":"Model metadata not found"}}
{"type":"turn.started"}
{"type":"item.completed","item":{"id":"item_1","type":"agent_message","text":"Looking."}}
{"type":"item.completed","item":{"id":"item_2","type":"mcp_tool_call","server":"warren"}}
{"type":"item.completed","item":{"id":"item_3","type":"agent_message","text":"Asked bob.\n"}}
{"type":"turn.completed","usage":{"input_tokens":2000,"cached_input_tokens":1500,"cache_write_input_tokens":0,"output_tokens":40,"reasoning_output_tokens":8}}
"#;
        let said = read(Output::CodexJson, stdout).expect("said");
        assert_eq!(said.reply, "Asked bob.");
        assert_eq!(said.session.as_deref(), Some("01a2"));
        assert_eq!(
            (
                said.usage.input_tokens,
                said.usage.cache_read_tokens,
                said.usage.output_tokens
            ),
            (2000, 1500, 40)
        );
        let failed = "{\"type\":\"turn.started\"}\n{\"type\":\"turn.failed\",\"error\":{\"message\":\"stream disconnected\"}}\n";
        let e = read(Output::CodexJson, failed).expect_err("failed");
        assert!(e.contains("stream disconnected"), "{e}");
        assert!(read(Output::CodexJson, "{\"type\":\"turn.started\"}\n").is_err());
        // A reconnect is reported as an `error` event; the turn still completes.
        let retried = "{\"type\":\"error\",\"message\":\"Reconnecting... 1/5\"}\n\
            {\"type\":\"item.completed\",\"item\":{\"type\":\"agent_message\",\"text\":\"done\"}}\n\
            {\"type\":\"turn.completed\",\"usage\":{}}\n";
        assert_eq!(
            read(Output::CodexJson, retried).expect("completed").reply,
            "done"
        );
        let gave_up = "{\"type\":\"error\",\"message\":\"Reconnecting... 5/5 (missing field)\"}\n";
        let e = read(Output::CodexJson, gave_up).expect_err("no turn.completed");
        assert!(e.contains("missing field"), "{e}");
        assert!(read(Output::CodexJson, "plain text\n").is_err());
    }

    #[test]
    fn a_claude_result_gives_its_text_and_usage_and_an_error_result_fails() {
        let ok = r#"{"type":"result","subtype":"success","is_error":false,"num_turns":2,
            "result":"Asked bob to review.","session_id":"b893",
            "usage":{"input_tokens":30,"cache_creation_input_tokens":200,"cache_read_input_tokens":1000,"output_tokens":25}}"#;
        let said = read(Output::ClaudeJson, ok).expect("said");
        assert_eq!(said.reply, "Asked bob to review.");
        assert_eq!(said.session.as_deref(), Some("b893"));
        assert_eq!(
            said.usage,
            TurnUsage {
                model_calls: 2,
                input_tokens: 1230,
                output_tokens: 25,
                cache_read_tokens: 1000,
                cache_write_tokens: 200
            }
        );
        let error = r#"{"type":"result","is_error":true,"result":"API Error: 400 probe says no"}"#;
        let e = read(Output::ClaudeJson, error).expect_err("error");
        assert!(e.contains("400 probe says no"), "{e}");
        assert_eq!(
            read(Output::Text, "  hello\n").expect("text").reply,
            "hello"
        );
    }
}
