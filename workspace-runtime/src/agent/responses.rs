//! The OpenAI **Responses** API for the `openai` driver (`"wire_api": "responses"`): what
//! Codex speaks, and OpenAI's API for new models.
//!
//! Each call sends the whole conversation as `input` items with `store: false`, so it works
//! against stateless servers and keeps nothing at the provider (`previous_response_id` is
//! not used). The answer is streamed (`stream: true`, the default; `"stream": false` asks
//! for one JSON body): the output items are taken from `response.output_item.done` events
//! and the final `response.completed`, whose `usage` is the call's. A `response.failed`,
//! an `error` event or a stream that ends before `response.completed` fails the turn, like
//! any model error (the message is redelivered, then dead-lettered).

use serde_json::{Value, json};
use tracing::info;
use warren_schema::events::TurnUsage;

use super::model::{MAX_STEPS, ModelApi, send_with_retry};
use super::sse;
use super::{DriverError, TurnContext};
use crate::tools::{self, ToolEffects, execute};

fn api_error(message: String) -> DriverError {
    DriverError::Api(message)
}

/// One turn: the model is called until it answers without function calls.
pub async fn turn(
    api: &ModelApi,
    stream: bool,
    ctx: &TurnContext,
) -> Result<(String, ToolEffects, TurnUsage), DriverError> {
    let (conversation, mut items) =
        api.start_turn(ctx, json!({"role": "user", "content": ctx.text}));
    let instructions = format!(
        "You are {}, an agent in the Warren workspace {}. Use the tools to mention other \
         agents and to read and write shared memory.",
        ctx.agent, ctx.workspace
    );
    let mut effects = ToolEffects::default();
    let mut usage = TurnUsage::default();
    for _ in 0..MAX_STEPS {
        let response = respond(api, stream, &instructions, &items, ctx).await?;
        usage.add(&usage_of(&response));
        let output = response["output"].as_array().cloned().unwrap_or_default();
        // Reasoning items are not sent back: without `store` the server could not resolve
        // them, and the answer and the calls carry what the next step needs.
        items.extend(output.iter().filter(|i| i["type"] != "reasoning").cloned());
        let calls: Vec<&Value> = output
            .iter()
            .filter(|i| i["type"] == "function_call")
            .collect();
        if calls.is_empty() {
            let reply = output_text(&output);
            api.remember(conversation, items);
            return Ok((reply, effects, usage));
        }
        for call in calls {
            let name = call["name"].as_str().unwrap_or_default();
            let args: Value = call["arguments"]
                .as_str()
                .and_then(|a| serde_json::from_str(a).ok())
                .unwrap_or(Value::Null);
            let result = execute(name, &args, ctx, &mut effects).await;
            info!(tool = name, "tool call");
            items.push(json!({
                "type": "function_call_output",
                "call_id": call["call_id"],
                "output": result.to_string(),
            }));
        }
    }
    Err(api_error(format!(
        "the model was still calling tools after {MAX_STEPS} steps"
    )))
}

/// The tools as Responses API function definitions (flat: `name`, `parameters`).
pub fn tools() -> Value {
    let mut all = tools::flat("parameters");
    if let Some(all) = all.as_array_mut() {
        for tool in all {
            tool["type"] = "function".into();
        }
    }
    all
}

/// The text of the output's assistant messages (`output_text` parts), joined.
pub fn output_text(output: &[Value]) -> String {
    output
        .iter()
        .filter(|i| i["type"] == "message")
        .flat_map(|m| m["content"].as_array().cloned().unwrap_or_default())
        .filter(|part| part["type"] == "output_text")
        .filter_map(|part| part["text"].as_str().map(str::to_owned))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The usage of one call (`usage.input_tokens`, `output_tokens`,
/// `input_tokens_details.cached_tokens`); missing fields count 0.
pub fn usage_of(response: &Value) -> TurnUsage {
    let u = &response["usage"];
    TurnUsage {
        model_calls: 1,
        input_tokens: u["input_tokens"].as_u64().unwrap_or(0),
        output_tokens: u["output_tokens"].as_u64().unwrap_or(0),
        cache_read_tokens: u["input_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap_or(0),
        cache_write_tokens: 0,
    }
}

/// One call: the final response object.
async fn respond(
    api: &ModelApi,
    stream: bool,
    instructions: &str,
    items: &[Value],
    ctx: &TurnContext,
) -> Result<Value, DriverError> {
    let body = json!({
        "model": api.model,
        "instructions": instructions,
        "input": items,
        "tools": tools(),
        "max_output_tokens": api.max_tokens,
        "store": false,
        "stream": stream,
    });
    let url = format!("{}/responses", api.base_url);
    let response = send_with_retry(&url, ctx, || api.post_bearer(&url, &body)).await?;
    if !stream {
        return response
            .json()
            .await
            .map_err(|e| api_error(format!("reading the response: {e}")));
    }
    let mut response = response;
    let mut decoder = sse::Decoder::default();
    let mut events = Events::default();
    loop {
        let chunk = response
            .chunk()
            .await
            .map_err(|e| api_error(format!("reading the response stream: {e}")))?;
        let Some(chunk) = chunk else {
            return Err(api_error(
                "the response stream ended before response.completed".into(),
            ));
        };
        let frames = decoder
            .push(&chunk)
            .map_err(|e| api_error(format!("the response stream: {e}")))?;
        for frame in frames {
            if let Some(done) = events.take(&frame)? {
                return Ok(done);
            }
        }
    }
}

/// What a response stream has said so far. Pure.
#[derive(Debug, Default)]
pub struct Events {
    /// `response.output_item.done` items by `output_index`.
    items: std::collections::BTreeMap<u64, Value>,
}

impl Events {
    /// Takes one frame; the final response once it has come (with the streamed items as its
    /// output when the final event carries none).
    pub fn take(&mut self, frame: &sse::Frame) -> Result<Option<Value>, DriverError> {
        // Deltas are most of a stream and carry nothing the final events do not: named by
        // their `event:` line, they are passed over without parsing their data.
        let named = frame.event.as_deref().unwrap_or_default();
        if frame.data == "[DONE]" || named.ends_with(".delta") {
            return Ok(None);
        }
        let event: Value = serde_json::from_str(&frame.data)
            .map_err(|e| api_error(format!("an unreadable stream event: {e}")))?;
        let kind = event["type"]
            .as_str()
            .or(frame.event.as_deref())
            .unwrap_or_default();
        match kind {
            "response.output_item.done" => {
                let index = event["output_index"]
                    .as_u64()
                    .unwrap_or(self.items.len() as u64);
                self.items.insert(index, event["item"].clone());
                Ok(None)
            }
            "response.completed" | "response.incomplete" => {
                let mut response = event["response"].clone();
                let empty = response["output"].as_array().is_none_or(Vec::is_empty);
                if empty && !self.items.is_empty() {
                    response["output"] =
                        Value::Array(std::mem::take(&mut self.items).into_values().collect());
                }
                Ok(Some(response))
            }
            "response.failed" => Err(api_error(format!(
                "the response failed: {}",
                error_text(&event["response"]["error"])
            ))),
            "error" => Err(api_error(format!(
                "the response stream failed: {}",
                error_text(&event)
            ))),
            _ => Ok(None),
        }
    }
}

/// `code: message` of an error object (at most 200 characters: a provider's message, never
/// a credential of ours).
fn error_text(error: &Value) -> String {
    let text = format!(
        "{}: {}",
        error["code"].as_str().unwrap_or("error"),
        error["message"].as_str().unwrap_or("no message")
    );
    text.chars().take(200).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(data: Value) -> sse::Frame {
        sse::Frame {
            event: data["type"].as_str().map(str::to_owned),
            data: data.to_string(),
        }
    }

    #[test]
    fn the_streamed_items_make_the_output_when_the_final_event_has_none() {
        let mut events = Events::default();
        let delta = sse::Frame {
            event: Some("response.output_text.delta".into()),
            data: "not even JSON".into(),
        };
        assert_eq!(
            events.take(&delta).expect("passed over"),
            None,
            "not parsed"
        );
        let call = json!({"type": "function_call", "id": "fc_1", "call_id": "call_1",
                          "name": "mention", "arguments": "{}", "status": "completed"});
        let message = json!({"type": "message", "id": "msg_1", "role": "assistant",
            "status": "completed",
            "content": [{"type": "output_text", "text": "done", "annotations": []}]});
        for (index, item) in [(1, &message), (0, &call)] {
            let done = json!({"type": "response.output_item.done", "output_index": index,
                              "item": item});
            assert_eq!(events.take(&frame(done)).expect("item"), None);
        }
        let completed = json!({"type": "response.completed", "response": {"id": "resp_1",
            "status": "completed", "output": [],
            "usage": {"input_tokens": 9, "output_tokens": 2}}});
        let response = events
            .take(&frame(completed))
            .expect("completed")
            .expect("final");
        assert_eq!(
            response["output"],
            json!([call, message]),
            "in output order"
        );
        assert_eq!(
            output_text(response["output"].as_array().expect("output")),
            "done"
        );
        assert_eq!(usage_of(&response).input_tokens, 9);
    }

    #[test]
    fn a_failed_response_or_an_error_event_fails_the_call_with_the_provider_s_words() {
        let failed = json!({"type": "response.failed", "response": {"id": "resp_1",
            "status": "failed", "error": {"code": "server_error", "message": "overloaded"}}});
        let e = Events::default().take(&frame(failed)).expect_err("failed");
        assert!(e.to_string().contains("server_error: overloaded"), "{e}");
        let error = json!({"type": "error", "code": "rate_limit_exceeded", "message": "slow"});
        let e = Events::default().take(&frame(error)).expect_err("error");
        assert!(e.to_string().contains("rate_limit_exceeded: slow"), "{e}");
    }

    #[test]
    fn the_tools_are_flat_function_definitions() {
        let tools = tools();
        let mention = tools
            .as_array()
            .expect("array")
            .iter()
            .find(|t| t["name"] == "mention")
            .expect("mention");
        assert_eq!(mention["type"], "function");
        assert_eq!(mention["parameters"]["required"], json!(["agent", "text"]));
    }
}
