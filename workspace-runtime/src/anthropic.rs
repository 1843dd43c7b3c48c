//! The `anthropic` driver: the Messages API with a tool-use loop over Warren's agent tools
//! (the same tools as the `openai` driver).
//!
//! Settings: `{"model": "claude-...", "max_tokens": 1024, "base_url":
//! "https://api.anthropic.com", "api_key_file": ...}`. Without `api_key_file` the key comes
//! from `ANTHROPIC_API_KEY_FILE` or `ANTHROPIC_API_KEY`; it is sent as `x-api-key` and never
//! logged. History is kept per conversation; 429 and 5xx are retried as for `openai`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tracing::info;
use warren_schema::Secret;

use crate::agent::{DriverError, TurnContext};
use crate::openai::{ToolEffects, api_key, execute, post_with_retry};

const MAX_STEPS: usize = 8;
const MAX_HISTORY: usize = 40;
const API_VERSION: &str = "2023-06-01";

/// A Messages API agent.
#[derive(Debug, Clone)]
pub struct Anthropic {
    client: reqwest::Client,
    base_url: String,
    model: String,
    max_tokens: u64,
    api_key: Option<Secret>,
    history: Arc<Mutex<HashMap<String, Vec<Value>>>>,
}

impl PartialEq for Anthropic {
    fn eq(&self, other: &Self) -> bool {
        self.base_url == other.base_url
            && self.model == other.model
            && self.max_tokens == other.max_tokens
    }
}

impl Eq for Anthropic {}

/// The agent tools in the Messages API's shape (`name`, `description`, `input_schema`).
pub fn anthropic_tools() -> Value {
    crate::openai::tools_flat("input_schema")
}

impl Anthropic {
    pub fn from_settings(settings: &Value) -> anyhow::Result<Self> {
        Ok(Self {
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(
                    settings["timeout_secs"].as_u64().unwrap_or(300),
                ))
                .build()?,
            base_url: settings["base_url"]
                .as_str()
                .unwrap_or("https://api.anthropic.com")
                .trim_end_matches('/')
                .to_owned(),
            model: settings["model"]
                .as_str()
                .ok_or_else(|| anyhow::anyhow!("an anthropic agent needs settings.model"))?
                .to_owned(),
            max_tokens: settings["max_tokens"].as_u64().unwrap_or(1024),
            api_key: api_key(settings, "ANTHROPIC_API_KEY")?,
            history: Arc::default(),
        })
    }

    pub async fn turn(&self, ctx: &TurnContext) -> Result<(String, ToolEffects), DriverError> {
        let conversation = ctx
            .conversation
            .clone()
            .unwrap_or_else(|| ctx.message_id.clone());
        let mut messages: Vec<Value> = self
            .history
            .lock()
            .map(|h| h.get(&conversation).cloned().unwrap_or_default())
            .unwrap_or_default();
        messages.push(json!({"role": "user", "content": ctx.text}));
        let system = format!(
            "You are {}, an agent in the Warren workspace {}. Use the tools to mention other \
             agents and to read and write shared memory.",
            ctx.agent, ctx.workspace
        );
        let mut effects = ToolEffects::default();
        let url = format!("{}/v1/messages", self.base_url);
        for _ in 0..MAX_STEPS {
            let body = json!({
                "model": self.model,
                "max_tokens": self.max_tokens,
                "system": system,
                "messages": messages,
                "tools": anthropic_tools(),
            });
            let response = post_with_retry(&url, ctx, || {
                let request = self
                    .client
                    .post(&url)
                    .header("anthropic-version", API_VERSION)
                    .json(&body);
                match &self.api_key {
                    Some(key) => request.header("x-api-key", key.expose()),
                    None => request,
                }
            })
            .await?;
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
                if let Ok(mut h) = self.history.lock() {
                    let keep = messages.len().saturating_sub(MAX_HISTORY);
                    h.insert(conversation, messages.split_off(keep));
                }
                return Ok((reply, effects));
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
