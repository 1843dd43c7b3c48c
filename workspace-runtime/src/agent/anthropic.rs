//! The `anthropic` driver: the Messages API with a tool-use loop over Warren's agent tools
//! (the same tools as the `openai` driver).
//!
//! Settings: `{"model": "claude-...", "max_tokens": 1024, "base_url":
//! "https://api.anthropic.com", "api_key_file": ...}`. Without `api_key_file` the key is the
//! agent's allowed `ANTHROPIC_API_KEY`; it is sent as `x-api-key` and never logged. History is kept per conversation; 429 and 5xx are retried as for `openai`.

use serde_json::{Value, json};
use tracing::info;

use warren_schema::events::TurnUsage;

use super::model::{MAX_STEPS, ModelApi, anthropic_usage, post_with_retry};
use super::{DriverError, TurnContext};
use crate::tools::{ToolEffects, execute};

const API_VERSION: &str = "2023-06-01";

/// A Messages API agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Anthropic(ModelApi);

/// The agent tools in the Messages API's shape (`name`, `description`, `input_schema`).
pub fn anthropic_tools() -> Value {
    crate::tools::flat("input_schema")
}

/// The name of its key among an agent's allowed keys.
pub const KEY: &str = "ANTHROPIC_API_KEY";

impl Anthropic {
    pub fn from_settings(settings: &Value) -> Result<Self, DriverError> {
        ModelApi::from_settings("anthropic", settings, "https://api.anthropic.com").map(Self)
    }

    pub async fn turn(
        &self,
        ctx: &TurnContext,
    ) -> Result<(String, ToolEffects, TurnUsage), DriverError> {
        let api = &self.0;
        let (conversation, mut messages) =
            api.start_turn(ctx, json!({"role": "user", "content": ctx.text}));
        let system = format!(
            "You are {}, an agent in the Warren workspace {}. Use the tools to mention other \
             agents and to read and write shared memory.",
            ctx.agent, ctx.workspace
        );
        let mut effects = ToolEffects::default();
        let mut usage = TurnUsage::default();
        let url = format!("{}/v1/messages", api.base_url);
        for _ in 0..MAX_STEPS {
            let body = json!({
                "model": api.model,
                "max_tokens": api.max_tokens,
                "system": system,
                "messages": messages,
                "tools": anthropic_tools(),
            });
            let response = post_with_retry(&url, ctx, || {
                let request = api
                    .client
                    .post(&url)
                    .header("anthropic-version", API_VERSION)
                    .json(&body);
                match &api.api_key {
                    Some(key) => request.header("x-api-key", key.expose()),
                    None => request,
                }
            })
            .await?;
            usage.add(&anthropic_usage(&response));
            let content = response["content"]
                .as_array()
                .cloned()
                .ok_or_else(|| DriverError::Api("the response has no content blocks".into()))?;
            messages.push(json!({"role": "assistant", "content": content}));
            let uses: Vec<&Value> = content.iter().filter(|b| b["type"] == "tool_use").collect();
            if uses.is_empty() || response["stop_reason"] != "tool_use" {
                let reply = content
                    .iter()
                    .filter(|b| b["type"] == "text")
                    .filter_map(|b| b["text"].as_str())
                    .collect::<Vec<_>>()
                    .join("\n");
                api.remember(conversation, messages);
                return Ok((reply, effects, usage));
            }
            let mut results = Vec::new();
            for block in uses {
                let name = block["name"].as_str().unwrap_or_default();
                let result = execute(name, &block["input"], ctx, &mut effects).await;
                info!(tool = name, "tool call");
                results.push(json!({"type": "tool_result", "tool_use_id": block["id"],
                                    "content": result.to_string()}));
            }
            messages.push(json!({"role": "user", "content": results}));
        }
        Err(DriverError::Api(format!(
            "the model was still calling tools after {MAX_STEPS} steps"
        )))
    }
}
