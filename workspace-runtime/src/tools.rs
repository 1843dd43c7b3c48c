//! Warren's tools for agents, the same for every driver: `mention(agent, text)`,
//! `reply(text)`, `list_agents`, `memory_get`, `memory_put`, `memory_update(expected_revision)`,
//! `memory_list`, `memory_delete`, and `file_read`, `file_write`, `file_list` (in the
//! workspace's directory, or the shared one: [`crate::files`]).
//!
//! [`chat_completions`] defines them for the `openai` driver, [`flat`] for the Messages API
//! (`anthropic`) and MCP ([`crate::mcp`]); [`execute`] runs one call. A mention or a reply is
//! not sent here: it is collected in [`ToolEffects`] and published by the caller as part of
//! the turn (the inbox worker after the turn, the MCP server at once).

use serde_json::{Value, json};

use crate::agent::TurnContext;
use crate::files;

/// What the tools did during a turn, besides the reply.
#[derive(Debug, Default)]
pub struct ToolEffects {
    /// `mention(agent, text)` calls, in order.
    pub mentions: Vec<(String, String)>,
    /// `reply(text)` calls, in order: said in the conversation before the turn's answer.
    pub replies: Vec<String>,
}

/// The tools as Chat Completions function definitions.
pub fn chat_completions() -> Value {
    let function = |name: &str, description: &str, properties: Value, required: &[&str]| {
        json!({"type": "function", "function": {
            "name": name, "description": description,
            "parameters": {"type": "object", "properties": properties, "required": required},
        }})
    };
    let shared = json!({"type": "boolean", "description": "use the bucket all workspaces share"});
    let shared_dir =
        json!({"type": "boolean", "description": "use the directory all workspaces share"});
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
            "The agents you can mention, with their workspaces, in name order, a page at a \
             time: when `next` is set, call again with after = next for more.",
            json!({"after": {"type": "string", "description": "list the agents after this name"}}),
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
        function(
            "file_read",
            "Read a text file (at most 256 KiB) from your workspace directory, or with \
             shared: true from the directory all workspaces share. Paths are relative.",
            json!({"path": {"type": "string"}, "shared": shared_dir}),
            &["path"]
        ),
        function(
            "file_write",
            "Write a text file (at most 1 MiB; its directories are made) in your workspace \
             directory, or with shared: true in the shared one. Paths are relative.",
            json!({"path": {"type": "string"}, "content": {"type": "string"},
                   "shared": shared_dir}),
            &["path", "content"]
        ),
        function(
            "file_list",
            "List a directory (default: the top) of your workspace directory, or with \
             shared: true of the shared one.",
            json!({"path": {"type": "string"}, "shared": shared_dir}),
            &[]
        ),
    ])
}

/// The tools as flat definitions (`name`, `description`, and the parameter schema under
/// `schema_key`): `input_schema` for the Messages API, `inputSchema` for MCP.
pub fn flat(schema_key: &str) -> Value {
    Value::Array(
        chat_completions()
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

/// A file tool, on a blocking thread (file system calls).
async fn file(name: &str, args: &Value, ctx: &TurnContext) -> Result<Value, String> {
    let root = if args["shared"].as_bool().unwrap_or(false) {
        ctx.shared_dir
            .clone()
            .ok_or_else(|| "this workspace has no shared directory".to_owned())?
    } else {
        ctx.workspace_dir.clone()
    };
    let (name, args) = (name.to_owned(), args.clone());
    tokio::task::spawn_blocking(move || {
        let path = args["path"].as_str().unwrap_or_default();
        match name.as_str() {
            "file_read" => files::read(&root, path).map(|content| json!({"content": content})),
            "file_write" => {
                let content = args["content"].as_str().unwrap_or_default();
                files::write(&root, path, content).map(|bytes| json!({"bytes": bytes}))
            }
            _ => files::list(&root, path).map(|l| json!(l)),
        }
        .map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| format!("the file tool stopped: {e}"))?
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
        ("list_agents", _) => match &ctx.directory {
            None => Err("the agent directory is not available".to_owned()),
            Some(directory) => {
                let after = args["after"].as_str().map(str::to_owned);
                directory.page(after, None).await.map(|page| {
                    json!({
                        "agents": page.agents.iter().map(|a| json!({
                            "name": a.name,
                            "workspace": a.workspace,
                            "you": a.name == ctx.agent,
                        })).collect::<Vec<_>>(),
                        "next": page.next,
                    })
                })
            }
        },
        ("file_read" | "file_write" | "file_list", _) => file(name, args, ctx).await,
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
