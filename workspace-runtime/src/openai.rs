//! The `openai` driver: any OpenAI-compatible Chat Completions API (OpenAI, vLLM, Ollama,
//! LiteLLM, OpenRouter), with a tool-use loop over Warren's agent tools.
//!
//! Settings: `{"base_url": "http://127.0.0.1:11434/v1", "model": "...", "max_tokens": 1024,
//! "api_key_file": "/run/secrets/openai"}`. Without `api_key_file` the key comes from
//! `OPENAI_API_KEY_FILE` or `OPENAI_API_KEY` (optional for local servers); it is never
//! logged. History is kept per conversation. 429 (honouring
//! `Retry-After`) and 5xx are retried with backoff; what still fails fails the turn, which
//! redelivers the message and, in the end, dead-letters it.

use serde_json::{Value, json};
use tracing::info;

use crate::agent::{DriverError, TurnContext};
use crate::model::{MAX_STEPS, ModelApi, post_with_retry};

/// An OpenAI-compatible agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenAi(ModelApi);

/// What the tools did during a turn, besides the reply.
#[derive(Debug, Default)]
pub struct ToolEffects {
    /// `mention(agent, text)` calls, in order.
    pub mentions: Vec<(String, String)>,
    /// `reply(text)` calls, in order: said in the conversation before the turn's answer.
    pub replies: Vec<String>,
}

fn api_error(message: String) -> DriverError {
    DriverError::Api(message)
}

impl OpenAi {
    pub fn from_settings(settings: &Value) -> anyhow::Result<Self> {
        ModelApi::from_settings(
            "openai",
            settings,
            "https://api.openai.com/v1",
            "OPENAI_API_KEY",
        )
        .map(Self)
    }

    /// One turn: the model is called until it answers without tool calls.
    pub async fn turn(&self, ctx: &TurnContext) -> Result<(String, ToolEffects), DriverError> {
        let (conversation, mut messages) = self
            .0
            .start_turn(ctx, json!({"role": "user", "content": ctx.text}));
        let system = json!({"role": "system", "content": format!(
            "You are {}, an agent in the Warren workspace {}. Use the tools to mention \
             other agents and to read and write shared memory.",
            ctx.agent, ctx.workspace)});
        let mut effects = ToolEffects::default();
        for _ in 0..MAX_STEPS {
            let response = self.complete(&system, &messages, ctx).await?;
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
                return Ok((reply, effects));
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
            "tools": tools(),
        });
        let url = format!("{}/chat/completions", api.base_url);
        post_with_retry(&url, ctx, || {
            let request = api.client.post(&url).json(&body);
            match &api.api_key {
                Some(key) => request.bearer_auth(key.expose()),
                None => request,
            }
        })
        .await
    }
}

/// Warren's agent tools, as Chat Completions function definitions.
pub fn tools() -> Value {
    let function = |name: &str, description: &str, properties: Value, required: &[&str]| {
        json!({"type": "function", "function": {
            "name": name, "description": description,
            "parameters": {"type": "object", "properties": properties, "required": required},
        }})
    };
    let shared = json!({"type": "boolean", "description": "use the bucket all workspaces share"});
    json!([
        function(
            "mention",
            "Ask another agent; it answers in this conversation.",
            json!({"agent": {"type": "string"}, "text": {"type": "string"}}),
            &["agent", "text"]
        ),
        function(
            "reply",
            "Say something in this conversation now (progress, a partial answer); your \
             final answer is sent when the turn ends.",
            json!({"text": {"type": "string"}}),
            &["text"]
        ),
        function(
            "list_agents",
            "The agents you can mention, with their workspaces.",
            json!({}),
            &[]
        ),
        function(
            "memory_get",
            "Read a key from memory (value and revision).",
            json!({"key": {"type": "string"}, "shared": shared}),
            &["key"]
        ),
        function(
            "memory_put",
            "Write a key to memory.",
            json!({"key": {"type": "string"}, "value": {}, "shared": shared}),
            &["key", "value"]
        ),
        function(
            "memory_update",
            "Write a key only if it is still at expected_revision (0: only if absent).",
            json!({"key": {"type": "string"}, "value": {}, "expected_revision": {"type": "integer"},
                   "shared": shared}),
            &["key", "value", "expected_revision"]
        ),
        function(
            "memory_list",
            "List the keys in memory.",
            json!({"shared": shared}),
            &[]
        ),
        function(
            "memory_delete",
            "Delete a key from memory.",
            json!({"key": {"type": "string"}, "shared": shared}),
            &["key"]
        ),
    ])
}

/// The tools as flat definitions (`name`, `description`, and the parameter schema under
/// `schema_key`): `input_schema` for the Messages API, `inputSchema` for MCP.
pub fn tools_flat(schema_key: &str) -> Value {
    Value::Array(
        tools()
            .as_array()
            .map(|all| {
                all.iter()
                    .map(|t| {
                        let mut flat = json!({"name": t["function"]["name"],
                                              "description": t["function"]["description"]});
                        flat[schema_key] = t["function"]["parameters"].clone();
                        flat
                    })
                    .collect()
            })
            .unwrap_or_default(),
    )
}

/// Runs one tool call; the result (or the error) goes back to the model as JSON.
pub async fn execute(
    name: &str,
    args: &Value,
    ctx: &TurnContext,
    effects: &mut ToolEffects,
) -> Value {
    let key = args["key"].as_str().unwrap_or_default();
    let memory = if args["shared"].as_bool().unwrap_or(false) {
        ctx.shared_memory.as_ref()
    } else {
        ctx.memory.as_ref()
    };
    let result = match (name, memory) {
        ("mention", _) => {
            let agent = args["agent"].as_str().unwrap_or_default().to_owned();
            let text = args["text"].as_str().unwrap_or_default().to_owned();
            if agent.is_empty() || agent == ctx.agent {
                Err("mention needs another agent's name".to_owned())
            } else {
                effects.mentions.push((agent, text));
                Ok(json!({"ok": true}))
            }
        }
        ("reply", _) => match args["text"].as_str().map(str::trim) {
            Some(text) if !text.is_empty() => {
                effects.replies.push(text.to_owned());
                Ok(json!({"ok": true}))
            }
            _ => Err("reply needs a text".to_owned()),
        },
        ("list_agents", _) => Ok(json!({"agents": ctx.directory.iter().map(|a| json!({
            "name": a.name,
            "workspace": a.workspace,
            "you": a.name == ctx.agent,
        })).collect::<Vec<_>>()})),
        (_, None) if name.starts_with("memory_") => Err("memory is not available".to_owned()),
        ("memory_get", Some(m)) => m
            .get(key)
            .await
            .map(|e| match e {
                Some(e) => json!({"value": e.stored.value, "revision": e.revision,
                                  "written_by": e.stored.agent}),
                None => json!({"value": null}),
            })
            .map_err(|e| e.to_string()),
        ("memory_put", Some(m)) => m
            .put(key, args["value"].clone())
            .await
            .map(|r| json!({"revision": r}))
            .map_err(|e| e.to_string()),
        ("memory_update", Some(m)) => m
            .update(
                key,
                args["value"].clone(),
                args["expected_revision"].as_u64().unwrap_or(0),
            )
            .await
            .map(|r| json!({"revision": r}))
            .map_err(|e| e.to_string()),
        ("memory_list", Some(m)) => m
            .list()
            .await
            .map(|k| json!({"keys": k}))
            .map_err(|e| e.to_string()),
        ("memory_delete", Some(m)) => m
            .delete(key)
            .await
            .map(|()| json!({"ok": true}))
            .map_err(|e| e.to_string()),
        _ => Err(format!("no tool named {name:?}")),
    };
    result.unwrap_or_else(|e| json!({"error": e}))
}
