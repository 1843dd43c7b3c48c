//! What the model-API drivers (`openai`, `anthropic`) share: their settings, the HTTP client,
//! the key, and the conversation history.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use warren_schema::Secret;
use warren_schema::events::TurnUsage;

use tracing::{Instrument, warn};

use super::{DriverError, TurnContext};

/// Attempts of one model call (429 and 5xx are retried).
const ATTEMPTS: u32 = 4;

fn api_error(message: String) -> DriverError {
    DriverError::Api(message)
}

/// Messages of history kept per conversation.
pub const MAX_HISTORY: usize = 40;
/// Bytes of history (as JSON) kept per conversation: a few huge tool results do not pile up.
pub const MAX_HISTORY_BYTES: usize = 256 << 10;
/// Conversations remembered per agent; past it, the one used longest ago is forgotten.
pub const MAX_CONVERSATIONS: usize = 256;
/// Most model calls in one turn (tool steps included).
pub const MAX_STEPS: usize = 8;

/// A model API endpoint and the history of its conversations.
#[derive(Debug, Clone)]
pub struct ModelApi {
    pub client: reqwest::Client,
    pub base_url: String,
    pub model: String,
    pub max_tokens: u64,
    pub api_key: Option<Secret>,
    history: Arc<Mutex<History>>,
}

/// Conversations' recent messages, bounded in conversations, messages and bytes.
#[derive(Debug, Default)]
struct History {
    conversations: HashMap<String, (u64, Vec<Value>)>,
    /// Increases with every use; the smallest stamp is the least recently used.
    clock: u64,
}

impl History {
    fn get(&self, conversation: &str) -> Vec<Value> {
        self.conversations
            .get(conversation)
            .map(|(_, m)| m.clone())
            .unwrap_or_default()
    }

    fn put(&mut self, conversation: String, messages: Vec<Value>) {
        self.clock += 1;
        let messages = trim_history(messages, MAX_HISTORY, MAX_HISTORY_BYTES);
        self.conversations
            .insert(conversation, (self.clock, messages));
        while self.conversations.len() > MAX_CONVERSATIONS {
            let Some(oldest) = self
                .conversations
                .iter()
                .min_by_key(|(_, (stamp, _))| *stamp)
                .map(|(c, _)| c.clone())
            else {
                break;
            };
            self.conversations.remove(&oldest);
        }
    }
}

impl PartialEq for ModelApi {
    fn eq(&self, other: &Self) -> bool {
        self.base_url == other.base_url
            && self.model == other.model
            && self.max_tokens == other.max_tokens
    }
}

impl Eq for ModelApi {}

impl ModelApi {
    /// `settings.model` (required), `base_url` (default `default_base`), `max_tokens`,
    /// `timeout_secs`, and the key from `api_key_file` (never from the process environment:
    /// an agent has the keys its launch contract allows, see `Driver::from_launch`).
    pub fn from_settings(
        driver: &str,
        settings: &Value,
        default_base: &str,
    ) -> Result<Self, DriverError> {
        Ok(Self {
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(
                    settings["timeout_secs"].as_u64().unwrap_or(300),
                ))
                .build()
                .map_err(|e| DriverError::Settings(format!("the {driver} HTTP client: {e}")))?,
            base_url: settings["base_url"]
                .as_str()
                .unwrap_or(default_base)
                .trim_end_matches('/')
                .to_owned(),
            model: settings["model"]
                .as_str()
                .ok_or_else(|| {
                    DriverError::Settings(format!("an {driver} agent needs settings.model"))
                })?
                .to_owned(),
            max_tokens: settings["max_tokens"].as_u64().unwrap_or(1024),
            api_key: api_key(settings)?,
            history: Arc::default(),
        })
    }

    /// The conversation so far (without any system prompt), then the turn's message.
    pub fn start_turn(&self, ctx: &TurnContext, user_message: Value) -> (String, Vec<Value>) {
        let conversation = ctx
            .conversation
            .clone()
            .unwrap_or_else(|| ctx.message_id.clone());
        let mut messages = self
            .history
            .lock()
            .map(|h| h.get(&conversation))
            .unwrap_or_default();
        messages.push(user_message);
        (conversation, messages)
    }

    /// A JSON POST to `url` with the key as a bearer token (OpenAI's APIs), if there is one.
    pub fn post_bearer(&self, url: &str, body: &Value) -> reqwest::RequestBuilder {
        let request = self.client.post(url).json(body);
        match &self.api_key {
            Some(key) => request.bearer_auth(key.expose()),
            None => request,
        }
    }

    /// Keeps the conversation's last messages for its next turn.
    pub fn remember(&self, conversation: String, messages: Vec<Value>) {
        if let Ok(mut h) = self.history.lock() {
            h.put(conversation, messages);
        }
    }
}

/// The last messages, at most `max` of them and `max_bytes` of JSON, starting at a user's
/// own message. A cut that left a tool result without the call it answers (or an assistant
/// turn first) would be refused by the API.
pub fn trim_history(mut messages: Vec<Value>, max: usize, max_bytes: usize) -> Vec<Value> {
    let sizes: Vec<usize> = messages.iter().map(|m| m.to_string().len()).collect();
    let mut start = messages.len().saturating_sub(max);
    let mut bytes: usize = sizes[start..].iter().sum();
    loop {
        while start < messages.len() && !is_user_text(&messages[start]) {
            bytes -= sizes[start];
            start += 1;
        }
        if bytes <= max_bytes || start >= messages.len() {
            break;
        }
        bytes -= sizes[start];
        start += 1;
    }
    messages.split_off(start)
}

/// A message a person (or another agent) wrote: role `user` with plain text content.
fn is_user_text(message: &Value) -> bool {
    message["role"] == "user" && message["content"].is_string()
}

/// Sends the request `build` makes, retrying 429 (honouring `Retry-After`) and 5xx with
/// backoff; returns the JSON body of the first success. Errors name the status and the
/// start of the body, never a credential.
pub async fn post_with_retry(
    url: &str,
    ctx: &TurnContext,
    build: impl Fn() -> reqwest::RequestBuilder,
) -> Result<Value, DriverError> {
    send_with_retry(url, ctx, build)
        .await?
        .json()
        .await
        .map_err(|e| api_error(format!("reading the response: {e}")))
}

/// [`post_with_retry`] up to the first successful status: the body is the caller's to read
/// (a stream, for the Responses API).
pub async fn send_with_retry(
    url: &str,
    ctx: &TurnContext,
    build: impl Fn() -> reqwest::RequestBuilder,
) -> Result<reqwest::Response, DriverError> {
    let mut backoff = Duration::from_millis(500);
    for attempt in 1..=ATTEMPTS {
        // Each call is a span in the turn's trace (up to the response's status; a stream is
        // read in the turn), and the provider is sent its context.
        // The address without its query: a query may carry a key.
        let endpoint = url.split('?').next().unwrap_or_default();
        let span =
            tracing::info_span!("model_call", %endpoint, attempt, status = tracing::field::Empty);
        let mut request = build();
        if let Some(tp) = warren_telemetry::join_trace(&span, ctx.traceparent.as_deref()) {
            request = request.header("traceparent", tp);
        }
        let response = request
            .send()
            .instrument(span.clone())
            .await
            .map_err(|e| api_error(format!("calling {url}: {e}")))?;
        let status = response.status();
        span.record("status", status.as_u16());
        if status.is_success() {
            return Ok(response);
        }
        let retryable = status.as_u16() == 429 || status.is_server_error();
        if !retryable || attempt == ATTEMPTS {
            let text = response.text().await.unwrap_or_default();
            let snippet: String = text.chars().take(200).collect();
            return Err(api_error(format!(
                "{status} from {url} after {attempt} attempt(s): {snippet}"
            )));
        }
        let wait = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(backoff, |s| Duration::from_secs(s.min(30)));
        warn!(%status, attempt, wait_ms = wait.as_millis() as u64, "model API refused; retrying");
        tokio::time::sleep(wait).await;
        backoff *= 2;
    }
    Err(api_error("no attempt made".into()))
}

/// The usage of one Chat Completions call (`usage.prompt_tokens`, `completion_tokens`,
/// `prompt_tokens_details.cached_tokens`); missing fields count 0.
pub fn chat_completions_usage(response: &Value) -> TurnUsage {
    let u = &response["usage"];
    TurnUsage {
        model_calls: 1,
        input_tokens: u["prompt_tokens"].as_u64().unwrap_or(0),
        output_tokens: u["completion_tokens"].as_u64().unwrap_or(0),
        cache_read_tokens: u["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap_or(0),
        cache_write_tokens: 0,
    }
}

/// The usage of one Messages API call. Anthropic's `input_tokens` leaves out the cached
/// ones (`cache_read_input_tokens`, `cache_creation_input_tokens`); here they are added in,
/// so `input_tokens` means the same for every provider.
pub fn anthropic_usage(response: &Value) -> TurnUsage {
    let u = &response["usage"];
    let n = |field: &str| u[field].as_u64().unwrap_or(0);
    TurnUsage {
        model_calls: 1,
        input_tokens: n("input_tokens")
            + n("cache_read_input_tokens")
            + n("cache_creation_input_tokens"),
        output_tokens: n("output_tokens"),
        cache_read_tokens: n("cache_read_input_tokens"),
        cache_write_tokens: n("cache_creation_input_tokens"),
    }
}

/// Reads an API key from the agent's `api_key_file` (none: the API is called without one,
/// as local servers allow).
pub fn api_key(settings: &Value) -> Result<Option<Secret>, DriverError> {
    settings["api_key_file"]
        .as_str()
        .map(|path| {
            std::fs::read_to_string(path)
                .map(|key| Secret::new(key.trim()))
                .map_err(|e| DriverError::Settings(format!("reading the API key file {path}: {e}")))
        })
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn usage_is_read_from_each_provider_s_fields_with_cached_input_counted_as_input() {
        let chat = json!({"usage": {"prompt_tokens": 120, "completion_tokens": 30,
            "total_tokens": 150, "prompt_tokens_details": {"cached_tokens": 100}}});
        assert_eq!(
            chat_completions_usage(&chat),
            TurnUsage {
                model_calls: 1,
                input_tokens: 120,
                output_tokens: 30,
                cache_read_tokens: 100,
                cache_write_tokens: 0
            }
        );
        let messages = json!({"usage": {"input_tokens": 20, "output_tokens": 7,
            "cache_read_input_tokens": 100, "cache_creation_input_tokens": 50}});
        assert_eq!(
            anthropic_usage(&messages),
            TurnUsage {
                model_calls: 1,
                input_tokens: 170,
                output_tokens: 7,
                cache_read_tokens: 100,
                cache_write_tokens: 50
            }
        );
        assert_eq!(
            chat_completions_usage(&json!({})).input_tokens,
            0,
            "a server that reports nothing costs nothing here"
        );
    }

    #[test]
    fn trimmed_history_starts_at_a_user_message_never_inside_a_tool_exchange() {
        let turn = |n: u32| {
            vec![
                json!({"role": "user", "content": format!("question {n}")}),
                json!({"role": "assistant", "tool_calls": [{"id": n}]}),
                json!({"role": "tool", "tool_call_id": n, "content": "{}"}),
                json!({"role": "user", "content": [{"type": "tool_result"}]}),
                json!({"role": "assistant", "content": format!("answer {n}")}),
            ]
        };
        let history: Vec<Value> = (0..10).flat_map(turn).collect();
        let trimmed = trim_history(history.clone(), 12, usize::MAX);
        assert!(trimmed.len() <= 12);
        assert_eq!(trimmed[0], json!({"role": "user", "content": "question 8"}));
        assert_eq!(
            trim_history(history.clone(), 100, usize::MAX).len(),
            50,
            "nothing cut when short"
        );
    }

    #[test]
    fn history_is_bounded_in_bytes_and_in_conversations() {
        let big = "x".repeat(100_000);
        let turn = |n: u32| {
            vec![
                json!({"role": "user", "content": format!("question {n}")}),
                json!({"role": "assistant", "content": big.clone()}),
            ]
        };
        let history: Vec<Value> = (0..5).flat_map(turn).collect();
        let trimmed = trim_history(history, 40, 256 << 10);
        let bytes: usize = trimmed.iter().map(|m| m.to_string().len()).sum();
        assert!(bytes <= 256 << 10, "{bytes}");
        assert_eq!(trimmed[0], json!({"role": "user", "content": "question 3"}));
        // One message past the limit by itself: nothing is kept, rather than everything.
        let huge = vec![json!({"role": "user", "content": "y".repeat(300_000)})];
        assert!(trim_history(huge, 40, 256 << 10).is_empty());

        let mut h = History::default();
        for n in 0..(MAX_CONVERSATIONS + 10) {
            h.put(format!("c{n}"), turn(0));
            // c0 is used all along: it stays.
            h.put("c0".into(), turn(0));
        }
        assert_eq!(h.conversations.len(), MAX_CONVERSATIONS);
        assert!(!h.get("c0").is_empty(), "the conversation in use is kept");
        assert!(
            h.get("c1").is_empty(),
            "the least recently used is forgotten"
        );
    }
}
