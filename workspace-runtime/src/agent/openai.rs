//! The `openai` driver: any OpenAI-compatible Chat Completions API (OpenAI, vLLM, Ollama,
//! LiteLLM, OpenRouter), or the Responses API with `"wire_api": "responses"` (see
//! [`super::responses`]), with a tool-use loop over Warren's agent tools.
//!
//! Settings: `{"base_url": "http://127.0.0.1:11434/v1", "model": "...", "max_tokens": 1024,
//! "api_key_file": "/run/secrets/openai", "wire_api": "chat_completions" | "responses",
//! "stream": true}` (`stream` is for the Responses API, whose answers are streamed unless
//! it is `false`). Without `api_key_file` the key is the agent's
//! allowed `OPENAI_API_KEY` (see `allowed_keys`; optional for local servers); it is never
//! logged. History is kept per conversation. 429 (honouring
//! `Retry-After`) and 5xx are retried with backoff; what still fails fails the turn, which
//! redelivers the message and, in the end, dead-letters it.

use serde_json::{Value, json};
use tracing::info;

use warren_schema::events::TurnUsage;

use super::model::{MAX_STEPS, ModelApi, chat_completions_usage, post_with_retry};
use super::{DriverError, TurnContext};
use crate::tools::{self, ToolEffects, execute};

/// An OpenAI-compatible agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenAi(ModelApi, Wire);

/// Which of OpenAI's APIs it speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    ChatCompletions,
    Responses { stream: bool },
}

fn api_error(message: String) -> DriverError {
    DriverError::Api(message)
}

/// The name of its key among an agent's allowed keys.
pub const KEY: &str = "OPENAI_API_KEY";

impl OpenAi {
    pub fn from_settings(settings: &Value) -> Result<Self, DriverError> {
        let wire = match settings["wire_api"].as_str().unwrap_or("chat_completions") {
            "chat_completions" => Wire::ChatCompletions,
            "responses" => Wire::Responses {
                stream: settings["stream"].as_bool().unwrap_or(true),
            },
            other => {
                return Err(DriverError::Settings(format!(
                    "settings.wire_api {other:?} is not chat_completions or responses"
                )));
            }
        };
        let api = ModelApi::from_settings("openai", settings, "https://api.openai.com/v1")?;
        Ok(Self(api, wire))
    }

    /// One turn: the model is called until it answers without tool calls.
    pub async fn turn(
        &self,
        ctx: &TurnContext,
    ) -> Result<(String, ToolEffects, TurnUsage), DriverError> {
        if let Wire::Responses { stream } = self.1 {
            return super::responses::turn(&self.0, stream, ctx).await;
        }
        let (conversation, mut messages) = self
            .0
            .start_turn(ctx, json!({"role": "user", "content": ctx.text}));
        let system = json!({"role": "system", "content": format!(
            "You are {}, an agent in the Warren workspace {}. Use the tools to mention \
             other agents and to read and write shared memory.",
            ctx.agent, ctx.workspace)});
        let mut effects = ToolEffects::default();
        let mut usage = TurnUsage::default();
        for _ in 0..MAX_STEPS {
            let response = self.complete(&system, &messages, ctx).await?;
            usage.add(&chat_completions_usage(&response));
            let message = response["choices"][0]["message"].clone();
            if message.is_null() {
                return Err(api_error("the response has no choices[0].message".into()));
            }
            messages.push(message.clone());
            let calls = message["tool_calls"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            if calls.is_empty() {
                let reply = message["content"].as_str().unwrap_or_default().to_owned();
                self.0.remember(conversation, messages);
                return Ok((reply, effects, usage));
            }
            for call in calls {
                let name = call["function"]["name"].as_str().unwrap_or_default();
                let args: Value = call["function"]["arguments"]
                    .as_str()
                    .and_then(|a| serde_json::from_str(a).ok())
                    .unwrap_or(Value::Null);
                let result = execute(name, &args, ctx, &mut effects).await;
                info!(tool = name, "tool call");
                messages.push(json!({
                    "role": "tool",
                    "tool_call_id": call["id"],
                    "content": result.to_string(),
                }));
            }
        }
        Err(api_error(format!(
            "the model was still calling tools after {MAX_STEPS} steps"
        )))
    }

    async fn complete(
        &self,
        system: &Value,
        messages: &[Value],
        ctx: &TurnContext,
    ) -> Result<Value, DriverError> {
        let api = &self.0;
        let mut all = Vec::with_capacity(messages.len() + 1);
        all.push(system.clone());
        all.extend_from_slice(messages);
        let body = json!({
            "model": api.model,
            "max_tokens": api.max_tokens,
            "messages": all,
            "tools": tools::chat_completions(),
        });
        let url = format!("{}/chat/completions", api.base_url);
        post_with_retry(&url, ctx, || api.post_bearer(&url, &body)).await
    }
}
