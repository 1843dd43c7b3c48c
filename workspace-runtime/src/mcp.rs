//! Warren's agent tools as an MCP server, for `command` agents (Claude Code, Codex and other
//! MCP clients call them natively).
//!
//! The runtime serves it, not the agent's program: for each turn of a `command` agent it
//! listens on a Unix socket of that turn ([`TurnSocket`], named in the program's
//! `WARREN_MCP_SOCKET`), and what a session there does is done as that turn, with the
//! context the runtime holds (its agent, the message it answers, the conversation). The
//! agent's MCP client starts `warren-workspace-runtime --mcp`, which only carries bytes
//! between its stdio and that socket ([`bridge`]). So a program cannot speak as another
//! agent by setting `WARREN_AGENT` or `WARREN_ROUTING_ID`: nothing reads them.
//!
//! Transport: newline-delimited JSON-RPC 2.0 (MCP's stdio transport, over the socket).
//! Methods: `initialize`, `notifications/initialized`, `ping`, `tools/list`, `tools/call`.
//! A mention or reply made through the tools is published to the outbox at once, as part of
//! the turn.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::{Value, json};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWrite, AsyncWriteExt};
use tracing::{Instrument, warn};
use warren_schema::EventId;
use warren_schema::events::Origin;
use warren_schema::nats::OutboxMessage;

use crate::agent::TurnContext;
use crate::error::{Error, Result};
use crate::outbox::{Outbox, TurnRef};
use crate::tools::{ToolEffects, execute};

/// The variable naming a turn's socket in a `command` agent's environment.
pub const SOCKET_ENV: &str = "WARREN_MCP_SOCKET";

/// Protocol versions this server speaks (the client's is echoed when it is one of them).
const VERSIONS: &[&str] = &["2025-06-18", "2025-03-26", "2024-11-05"];

/// The turn a session serves: the runtime's own record of it.
#[derive(Debug, Clone)]
pub struct McpTurn {
    pub ctx: TurnContext,
    pub routing_id: Option<EventId>,
    pub reply_to: Option<Origin>,
    pub correlation_id: Option<EventId>,
}

impl McpTurn {
    /// The turn `ctx` describes (as the inbox worker built it from the routed message).
    pub fn of(ctx: &TurnContext) -> Self {
        let id = |v: &str| v.parse().ok().map(EventId);
        Self {
            routing_id: id(&ctx.routing_id),
            reply_to: ctx
                .reply_to
                .as_deref()
                .and_then(|r| serde_json::from_str(r).ok()),
            correlation_id: ctx.conversation.as_deref().and_then(id),
            ctx: ctx.clone(),
        }
    }
}

/// A turn's MCP socket: listening while it lives, removed when dropped.
#[derive(Debug)]
pub struct TurnSocket {
    path: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl TurnSocket {
    /// Listens in `dir` (created, mode 0700) on a socket of its own, and serves every session
    /// there as `turn`, publishing what it says on `outbox`.
    pub fn open(dir: &Path, turn: McpTurn, outbox: Outbox) -> std::io::Result<Self> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        // Short: a socket's path must fit in 108 bytes.
        let path = dir.join(format!("{}.sock", &EventId::random().to_string()[..13]));
        let listener = tokio::net::UnixListener::bind(&path)?;
        // Outputs of every session of the turn are numbered together, so each id is unique.
        let sent = Arc::new(AtomicUsize::new(0));
        let span =
            tracing::info_span!("mcp", agent = %turn.ctx.agent, routing = %turn.ctx.routing_id);
        let task = tokio::spawn(
            async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let (turn, outbox, sent) = (turn.clone(), outbox.clone(), sent.clone());
                    tokio::spawn(
                        async move {
                            let (read, write) = stream.into_split();
                            let input = tokio::io::BufReader::new(read);
                            if let Err(e) = serve(turn, outbox, sent, input, write).await {
                                warn!(error = %e, "an MCP session ended with an error");
                            }
                        }
                        .in_current_span(),
                    );
                }
            }
            .instrument(span),
        );
        Ok(Self { path, task })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TurnSocket {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// `--mcp`: carries the MCP client's stdin to the turn's socket (`WARREN_MCP_SOCKET`) and
/// the answers back to stdout, until either side closes.
pub async fn bridge() -> Result<()> {
    let path = std::env::var_os(SOCKET_ENV).ok_or_else(|| {
        Error::Config(format!(
            "{SOCKET_ENV} is not set: the MCP server is started by a command agent's turn"
        ))
    })?;
    let io = |what| move |source| Error::Io { what, source };
    let stream = tokio::net::UnixStream::connect(&path)
        .await
        .map_err(io("connecting to the turn's MCP socket"))?;
    let (mut from_runtime, mut to_runtime) = stream.into_split();
    let requests = async {
        tokio::io::copy(&mut tokio::io::stdin(), &mut to_runtime)
            .await
            .map_err(io("passing on the MCP client's requests"))?;
        to_runtime
            .shutdown()
            .await
            .map_err(io("closing the requests"))
    };
    let answers = async {
        let mut stdout = tokio::io::stdout();
        tokio::io::copy(&mut from_runtime, &mut stdout)
            .await
            .map_err(io("passing on the answers"))?;
        stdout.flush().await.map_err(io("passing on the answers"))
    };
    // The session is over when the answers end (the runtime closes after the client did).
    let (_, answered) = tokio::join!(requests, answers);
    answered
}

/// Serves one MCP session until the client closes its end.
async fn serve(
    turn: McpTurn,
    outbox: Outbox,
    sent: Arc<AtomicUsize>,
    input: impl AsyncBufRead + Unpin,
    mut output: impl AsyncWrite + Unpin,
) -> Result<()> {
    let mut lines = input.lines();
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
                    let n = sent.fetch_add(1, Ordering::Relaxed);
                    let what = format!("mcp-mention:{n}:{to}");
                    publish(&outbox, &turn, |t| t.mention(&what, &to, &text)).await?;
                }
                for text in effects.replies {
                    let n = sent.fetch_add(1, Ordering::Relaxed);
                    let what = format!("mcp-said:{n}");
                    publish(&outbox, &turn, |t| t.reply(&what, &text)).await?;
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
        warn!("a tool call in a turn without a routed message: not sent");
        return Err(Error::Config(
            "mention and reply need a turn answering a routed message".into(),
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
