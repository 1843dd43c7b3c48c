//! Warren's agent tools as an MCP server over stdio, for `command` agents (Claude Code,
//! Codex and other MCP clients call them natively).
//!
//! The agent's MCP client starts `warren-workspace-runtime --mcp` during a turn; the turn's
//! context comes from the environment the `command` driver set (`WARREN_AGENT`,
//! `WARREN_ROUTING_ID`, `WARREN_CONVERSATION`, `WARREN_CHAIN`, `WARREN_REPLY_TO`) and
//! the runtime's launch contract (`WARREN_LAUNCH`: NATS, prefix, workspace, credentials).
//!
//! Transport: newline-delimited JSON-RPC 2.0 on stdin/stdout (MCP's stdio transport).
//! Methods: `initialize`, `notifications/initialized`, `ping`, `tools/list`, `tools/call`.
//! A mention made through the `mention` tool is published to the outbox at once, as part of
//! the turn that started this server.

use serde_json::{Value, json};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWrite, AsyncWriteExt};
use tracing::warn;
use warren_schema::EventId;
use warren_schema::events::Origin;
use warren_schema::nats::{Namespace, OutboxMessage};

use crate::agent::TurnContext;
use crate::error::{Error, Result};
use crate::outbox::{Outbox, TurnRef};
use crate::tools::{ToolEffects, execute};

/// Protocol versions this server speaks (the client's is echoed when it is one of them).
const VERSIONS: &[&str] = &["2025-06-18", "2025-03-26", "2024-11-05"];

/// The turn this server serves, from the environment.
#[derive(Debug, Clone)]
pub struct McpTurn {
    pub ctx: TurnContext,
    pub routing_id: Option<EventId>,
    pub reply_to: Option<Origin>,
    pub correlation_id: Option<EventId>,
}

impl McpTurn {
    /// Reads the turn's context from `WARREN_*` variables.
    pub fn from_env(workspace: &str) -> Result<Self> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let agent = var("WARREN_AGENT").ok_or_else(|| {
            Error::Config("WARREN_AGENT is not set: start me from an agent's turn".into())
        })?;
        let parse_id = |name: &str| var(name).and_then(|v| v.parse().ok()).map(EventId);
        Ok(Self {
            ctx: TurnContext {
                workspace: workspace.to_owned(),
                agent,
                message_id: var("WARREN_MESSAGE_ID").unwrap_or_default(),
                routing_id: var("WARREN_ROUTING_ID").unwrap_or_default(),
                conversation: var("WARREN_CONVERSATION"),
                chain: var("WARREN_CHAIN")
                    .map(|c| c.split(',').map(str::to_owned).collect())
                    .unwrap_or_default(),
                traceparent: var("TRACEPARENT"),
                ..TurnContext::default()
            },
            routing_id: parse_id("WARREN_ROUTING_ID"),
            reply_to: var("WARREN_REPLY_TO").and_then(|v| serde_json::from_str(&v).ok()),
            correlation_id: parse_id("WARREN_CONVERSATION"),
        })
    }
}

/// Serves one MCP session until the client closes its end.
pub async fn serve(
    mut turn: McpTurn,
    js: async_nats::jetstream::Context,
    ns: Namespace,
    buckets: &crate::memory::Buckets,
    input: impl AsyncBufRead + Unpin,
    mut output: impl AsyncWrite + Unpin,
) -> Result<()> {
    let (own, shared) = buckets.for_agent(&turn.ctx.agent);
    turn.ctx.memory = Some(own);
    turn.ctx.shared_memory = Some(shared);
    let outbox = Outbox::new(js.clone(), &ns, &turn.ctx.workspace);
    let mut lines = input.lines();
    // Outputs sent in this session: numbers their ids, so each is recorded once.
    let mut sent = 0;
    while let Some(line) = lines.next_line().await.map_err(|source| Error::Io {
        what: "reading the MCP client's requests",
        source,
    })? {
        if line.trim().is_empty() {
            continue;
        }
        let request: Value = match serde_json::from_str(&line) {
            Ok(v) => v,
            Err(e) => {
                write(
                    &mut output,
                    &error(Value::Null, -32700, &format!("parse error: {e}")),
                )
                .await?;
                continue;
            }
        };
        let id = request.get("id").cloned();
        let method = request["method"].as_str().unwrap_or_default();
        let result = match method {
            "initialize" => {
                let asked = request["params"]["protocolVersion"].as_str().unwrap_or("");
                let version = VERSIONS
                    .iter()
                    .find(|v| **v == asked)
                    .unwrap_or(&VERSIONS[0]);
                Ok(json!({
                    "protocolVersion": version,
                    "capabilities": {"tools": {"listChanged": false}},
                    "serverInfo": {"name": "warren", "version": env!("CARGO_PKG_VERSION")},
                }))
            }
            "ping" => Ok(json!({})),
            "tools/list" => Ok(json!({"tools": mcp_tools()})),
            "tools/call" => {
                let name = request["params"]["name"].as_str().unwrap_or_default();
                let args = request["params"]["arguments"].clone();
                let mut effects = ToolEffects::default();
                let result = execute(name, &args, &turn.ctx, &mut effects).await;
                for (to, text) in effects.mentions {
                    let what = format!("mcp-mention:{sent}:{to}");
                    publish(&outbox, &turn, |t| t.mention(&what, &to, &text)).await?;
                    sent += 1;
                }
                for text in effects.replies {
                    let what = format!("mcp-said:{sent}");
                    publish(&outbox, &turn, |t| t.reply(&what, &text)).await?;
                    sent += 1;
                }
                let is_error = result.get("error").is_some();
                Ok(
                    json!({"content": [{"type": "text", "text": result.to_string()}],
                          "isError": is_error}),
                )
            }
            _ if method.starts_with("notifications/") => continue,
            other => Err((-32601, format!("method not found: {other}"))),
        };
        // Requests without an id are notifications: no answer.
        let Some(id) = id else { continue };
        let response = match result {
            Ok(result) => json!({"jsonrpc": "2.0", "id": id, "result": result}),
            Err((code, message)) => error(id, code, &message),
        };
        write(&mut output, &response).await?;
    }
    Ok(())
}

/// The tools in MCP's shape (`name`, `description`, `inputSchema`).
pub fn mcp_tools() -> Value {
    crate::tools::flat("inputSchema")
}

fn error(id: Value, code: i64, message: &str) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}})
}

async fn write(output: &mut (impl AsyncWrite + Unpin), message: &Value) -> Result<()> {
    let mut line = message.to_string().into_bytes();
    line.push(b'\n');
    let io = |source| Error::Io {
        what: "answering the MCP client",
        source,
    };
    output.write_all(&line).await.map_err(io)?;
    output.flush().await.map_err(io)
}

/// Publishes what a tool call said (a mention or a reply) at once, as part of the turn.
async fn publish(
    outbox: &Outbox,
    turn: &McpTurn,
    message: impl FnOnce(&TurnRef) -> OutboxMessage,
) -> Result<()> {
    let (Some(routing_id), Some(reply_to)) = (turn.routing_id, turn.reply_to.clone()) else {
        warn!("a tool call outside a turn (no WARREN_ROUTING_ID / WARREN_REPLY_TO): not sent");
        return Err(Error::Config(
            "mention and reply need a turn's context (WARREN_ROUTING_ID, WARREN_REPLY_TO)".into(),
        ));
    };
    let turn_ref = TurnRef {
        routing_id,
        workspace: turn.ctx.workspace.clone(),
        agent: turn.ctx.agent.clone(),
        chain: turn.ctx.chain.clone(),
        reply_to,
        correlation_id: turn.correlation_id,
    };
    outbox
        .send_stored(&message(&turn_ref), turn.ctx.traceparent.as_deref())
        .await?;
    Ok(())
}
