//! Agents: a driver turns a message into what the agent says; the `@name` tokens in what it
//! says are mentions of other agents.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tracing::{info, warn};

/// What a driver knows about the turn besides the text.
#[derive(Debug, Clone, Default)]
pub struct TurnContext {
    pub workspace: String,
    pub agent: String,
    pub text: String,
    pub message_id: String,
    pub routing_id: String,
    pub conversation: Option<String>,
    /// Who asked whom before this turn.
    pub chain: Vec<String>,
    pub traceparent: Option<String>,
    /// The workspace's directory (the working directory of `command` agents).
    pub workspace_dir: PathBuf,
    /// Where the conversation's replies go (JSON `Origin`), for the MCP server's mentions.
    pub reply_to: Option<String>,
    /// The workspace's memory bucket and the shared one, as this agent (for tools).
    pub memory: Option<crate::memory::Memory>,
    pub shared_memory: Option<crate::memory::Memory>,
    /// Every agent of the installation (`list_agents`).
    pub directory: Vec<warren_schema::nats::AgentInfo>,
}

/// Why a driver produced no reply (the message is redelivered, then dead-lettered).
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("starting {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("{program} did not finish within {timeout:?}; killed")]
    Timeout { program: String, timeout: Duration },
    #[error("{program} failed: {status}")]
    Failed { program: String, status: String },
    #[error("model API: {0}")]
    Api(String),
    #[error("{program}: {source}")]
    Io {
        program: String,
        source: std::io::Error,
    },
}

/// How a `command` agent receives the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input {
    Stdin,
    /// Appended as the last argument (`claude -p MESSAGE`).
    Argument,
}

/// What an agent said in one turn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Turn {
    /// The answer (not sent when empty).
    pub reply: String,
    /// What the agent said along the way with the `reply` tool, in order.
    pub said: Vec<String>,
    /// Mentions made with the `mention` tool: (agent, text).
    pub directed: Vec<(String, String)>,
    /// Agents it addressed (`@name`), in order, without itself or repeats.
    pub mentions: Vec<String>,
}

/// How an agent turns a message into a reply (chosen per agent in the configuration).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Driver {
    /// Says what it got; with `settings.cc` (agent names) it also addresses them, which
    /// makes the demo's agent-to-agent mention.
    Echo { cc: Vec<String> },
    /// Runs a program per turn, as CLI agents (Claude Code, Codex) are run: the message on
    /// stdin or as the last argument, the context in `WARREN_*` variables, the workspace
    /// directory as working directory, stdout as the reply, stderr to the runtime's log.
    /// Settings: `{"command": ["claude", "-p"], "input": "argument", "timeout_secs": 600}`.
    Command {
        argv: Vec<String>,
        input: Input,
        timeout: Duration,
    },
    /// An OpenAI-compatible Chat Completions API with Warren's tools (see `openai`).
    OpenAi(crate::openai::OpenAi),
    /// Anthropic's Messages API with Warren's tools (see `anthropic`).
    Anthropic(crate::anthropic::Anthropic),
}

impl Driver {
    /// The driver described by `{"driver": ..., "settings": {...}}` (missing: `echo`).
    pub fn from_settings(agent: &serde_json::Value) -> anyhow::Result<Self> {
        match agent["driver"].as_str().unwrap_or("echo") {
            "echo" => Ok(Self::Echo {
                cc: agent["settings"]["cc"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|v| v.as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default(),
            }),
            "command" => {
                let settings = &agent["settings"];
                let argv: Vec<String> = settings["command"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|v| v.as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default();
                anyhow::ensure!(
                    !argv.is_empty(),
                    "a command agent needs settings.command, e.g. [\"claude\", \"-p\"]"
                );
                let input = match settings["input"].as_str().unwrap_or("stdin") {
                    "stdin" => Input::Stdin,
                    "argument" => Input::Argument,
                    other => anyhow::bail!("settings.input {other:?}: use stdin or argument"),
                };
                let timeout = Duration::from_secs(settings["timeout_secs"].as_u64().unwrap_or(600));
                Ok(Self::Command {
                    argv,
                    input,
                    timeout,
                })
            }
            "openai" => Ok(Self::OpenAi(crate::openai::OpenAi::from_settings(
                &agent["settings"],
            )?)),
            "anthropic" => Ok(Self::Anthropic(crate::anthropic::Anthropic::from_settings(
                &agent["settings"],
            )?)),
            other => anyhow::bail!(
                "driver {other:?} is not available in this runtime yet (echo, command, openai)"
            ),
        }
    }

    /// One turn. A failure leaves the message unacknowledged (redelivered, then
    /// dead-lettered).
    pub async fn turn(&self, ctx: &TurnContext) -> Result<Turn, DriverError> {
        match self {
            Self::Echo { cc } => Ok(echo(&ctx.agent, &ctx.text, cc)),
            Self::Command {
                argv,
                input,
                timeout,
            } => {
                let reply = run_command(argv, *input, *timeout, ctx).await?;
                let mentions = mentions(&ctx.agent, &reply);
                Ok(Turn {
                    reply,
                    said: Vec::new(),
                    directed: Vec::new(),
                    mentions,
                })
            }
            Self::OpenAi(d) => {
                let (reply, effects) = d.turn(ctx).await?;
                Ok(with_tool_effects(&ctx.agent, reply, effects))
            }
            Self::Anthropic(d) => {
                let (reply, effects) = d.turn(ctx).await?;
                Ok(with_tool_effects(&ctx.agent, reply, effects))
            }
        }
    }
}

/// A model's turn: its reply, the mentions it made with the tool, and the `@name`s in its
/// reply that the tool did not already cover.
fn with_tool_effects(agent: &str, reply: String, effects: crate::openai::ToolEffects) -> Turn {
    let mentions = mentions(agent, &reply)
        .into_iter()
        .filter(|m| !effects.mentions.iter().any(|(to, _)| to == m))
        .collect();
    Turn {
        reply,
        said: effects.replies,
        directed: effects.mentions,
        mentions,
    }
}

async fn run_command(
    argv: &[String],
    input: Input,
    timeout: Duration,
    ctx: &TurnContext,
) -> Result<String, DriverError> {
    let program = argv.first().cloned().unwrap_or_default();
    let io = |source| DriverError::Io {
        program: program.clone(),
        source,
    };
    let mut command = tokio::process::Command::new(&program);
    command
        .args(&argv[1..])
        .current_dir(&ctx.workspace_dir)
        .env("WARREN_AGENT", &ctx.agent)
        .env("WARREN_WORKSPACE", &ctx.workspace)
        .env("WARREN_MESSAGE_ID", &ctx.message_id)
        .env("WARREN_ROUTING_ID", &ctx.routing_id)
        .env(
            "WARREN_CONVERSATION",
            ctx.conversation.as_deref().unwrap_or(""),
        )
        .env("WARREN_CHAIN", ctx.chain.join(","))
        .env("TRACEPARENT", ctx.traceparent.as_deref().unwrap_or(""))
        .env("WARREN_REPLY_TO", ctx.reply_to.as_deref().unwrap_or(""))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    if input == Input::Argument {
        command.arg(&ctx.text);
    }
    let mut child = command.spawn().map_err(|source| DriverError::Spawn {
        program: program.clone(),
        source,
    })?;
    let mut stdin = child.stdin.take();
    let text = ctx.text.clone();
    let feed = async move {
        if let (Some(stdin), Input::Stdin) = (stdin.as_mut(), input) {
            stdin.write_all(text.as_bytes()).await?;
            stdin.write_all(b"\n").await?;
        }
        drop(stdin);
        Ok::<(), std::io::Error>(())
    };
    let run = async {
        // A program that does not read its stdin is not an error.
        if let Err(e) = feed.await {
            warn!(error = %e, "the command did not take its input");
        }
        child.wait_with_output().await
    };
    let output = match tokio::time::timeout(timeout, run).await {
        Ok(output) => output.map_err(io)?,
        // Dropping the future drops the child, which kills it (kill_on_drop).
        Err(_) => return Err(DriverError::Timeout { program, timeout }),
    };
    if !output.status.success() {
        return Err(DriverError::Failed {
            program,
            status: output.status.to_string(),
        });
    }
    let reply = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    info!(bytes = reply.len(), "command turn finished");
    Ok(reply)
}

/// The `echo` driver: says what it got (and addresses `cc`). For demos and tests.
pub fn echo(agent: &str, text: &str, cc: &[String]) -> Turn {
    let mut reply = format!("{agent} got: {text}");
    if !cc.is_empty() {
        let names: Vec<String> = cc.iter().map(|n| format!("@{n}")).collect();
        reply.push_str(&format!(" (cc {})", names.join(" ")));
    }
    let mentions = mentions(agent, &reply);
    Turn {
        reply,
        said: Vec::new(),
        directed: Vec::new(),
        mentions,
    }
}

/// `@name` tokens in `text` (names are lowercase letters, digits and `-`), except `me`.
pub fn mentions(me: &str, text: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for token in text.split(|c: char| c.is_whitespace()) {
        let Some(name) = token.strip_prefix('@') else {
            continue;
        };
        let name: String = name
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-')
            .collect();
        if !name.is_empty() && name != me && !out.contains(&name) {
            out.push(name);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mentions_are_the_other_agents_named_once_in_order() {
        assert_eq!(
            mentions(
                "alice",
                "@alice ask @bob, then @carol and @bob again; mail@example"
            ),
            ["bob", "carol"]
        );
        assert!(mentions("alice", "no one here @ all").is_empty());
    }

    #[test]
    fn echo_repeats_and_passes_mentions_on() {
        let t = echo("alice", "@alice please ask @bob", &[]);
        assert_eq!(t.reply, "alice got: @alice please ask @bob");
        assert_eq!(t.mentions, ["bob"]);
        let t = echo("alice", "hello", &["bob".to_owned()]);
        assert_eq!(t.reply, "alice got: hello (cc @bob)");
        assert_eq!(t.mentions, ["bob"]);
    }

    #[test]
    fn drivers_come_from_the_agent_settings() {
        let d = Driver::from_settings(
            &serde_json::json!({"driver": "echo", "settings": {"cc": ["bob"]}}),
        )
        .expect("echo");
        assert_eq!(
            d,
            Driver::Echo {
                cc: vec!["bob".into()]
            }
        );
        assert!(
            Driver::from_settings(&serde_json::json!({"driver": "anthropic"})).is_err(),
            "an anthropic agent without a model"
        );
        assert!(Driver::from_settings(&serde_json::json!({"driver": "gpt-9"})).is_err());
        assert!(
            Driver::from_settings(&serde_json::json!({"driver": "command", "settings": {}}))
                .is_err(),
            "a command agent without a command"
        );
    }

    fn command(script: &str, input: Input, timeout_ms: u64) -> Driver {
        Driver::Command {
            argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
            input,
            timeout: Duration::from_millis(timeout_ms),
        }
    }

    fn ctx(text: &str) -> TurnContext {
        TurnContext {
            workspace: "research".into(),
            agent: "alice".into(),
            text: text.into(),
            chain: vec!["bob".into()],
            workspace_dir: std::env::temp_dir(),
            ..TurnContext::default()
        }
    }

    #[tokio::test]
    async fn a_command_agent_reads_stdin_with_its_context_and_replies_on_stdout() {
        let d = command(
            r#"read line; echo "$WARREN_AGENT in $WARREN_WORKSPACE (asked by $WARREN_CHAIN) heard: $line; cc @carol""#,
            Input::Stdin,
            5_000,
        );
        let turn = d.turn(&ctx("hello")).await.expect("turn");
        assert_eq!(
            turn.reply,
            "alice in research (asked by bob) heard: hello; cc @carol"
        );
        assert_eq!(turn.mentions, ["carol"]);
        let pwd = command("pwd", Input::Stdin, 5_000);
        let dir = pwd.turn(&ctx("x")).await.expect("turn").reply;
        assert_eq!(
            std::fs::canonicalize(dir).expect("dir"),
            std::fs::canonicalize(std::env::temp_dir()).expect("tmp"),
            "runs in the workspace directory"
        );
    }

    #[tokio::test]
    async fn a_command_agent_can_take_the_message_as_its_last_argument() {
        let d = command(r#"echo "arg: $0""#, Input::Argument, 5_000);
        assert_eq!(
            d.turn(&ctx("summarise")).await.expect("turn").reply,
            "arg: summarise"
        );
    }

    #[tokio::test]
    async fn a_failing_or_hanging_command_is_an_error_not_a_reply() {
        let failing = command("echo partial; exit 4", Input::Stdin, 5_000);
        let e = failing.turn(&ctx("x")).await.expect_err("fails");
        assert!(e.to_string().contains("exit status: 4"), "{e}");
        let hanging = command("sleep 30", Input::Stdin, 200);
        let started = std::time::Instant::now();
        let e = hanging.turn(&ctx("x")).await.expect_err("times out");
        assert!(matches!(e, DriverError::Timeout { .. }), "{e}");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "killed, not waited for"
        );
    }
}
