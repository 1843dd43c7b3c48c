//! Agents: a driver turns a message into what the agent says; the `@name` tokens in what it
//! says are mentions of other agents.
//!
//! One [`Driver`] per agent, chosen by its configuration (`{"driver": ..., "settings":
//! {...}}`):
//!
//! - [`echo`]: says what it got (demos, tests, benchmarks);
//! - [`command`]: a program per turn, as CLI agents (Claude Code, Codex) are run;
//! - [`openai`]: an OpenAI-compatible Chat Completions API, or the Responses API
//!   ([`responses`], streamed: [`sse`]), with Warren's [tools](crate::tools);
//! - [`anthropic`]: Anthropic's Messages API with the same tools.
//!
//! The two HTTP drivers share [`model`]: settings, key, retries, history.

pub mod anthropic;
pub mod cli_output;
pub mod command;
pub mod echo;
pub mod model;
pub mod openai;
pub mod responses;
pub mod sessions;
pub mod sse;

use std::path::PathBuf;
use std::time::Duration;

use warren_schema::events::TurnUsage;

use crate::tools::ToolEffects;

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
    /// The directory every workspace shares, when there is one.
    pub shared_dir: Option<PathBuf>,
    /// What a `command` agent's program runs with besides the turn (PATH, the contract).
    pub environment: command::Environment,
    /// Where the conversation's replies go (JSON `Origin`), for the MCP server's mentions.
    pub reply_to: Option<String>,
    /// The workspace's memory bucket and the shared one, as this agent (for tools).
    pub memory: Option<crate::memory::Memory>,
    pub shared_memory: Option<crate::memory::Memory>,
    /// The agent directory (`list_agents`), asked of the control plane. `None`: not
    /// available.
    pub directory: Option<crate::control_plane::Directory>,
    /// Where what a `command` agent says through MCP is published (the runtime serves its
    /// MCP sessions on a socket of the turn; see `mcp::TurnSocket`). `None`: no MCP.
    pub outbox: Option<crate::outbox::Outbox>,
}

/// Why a driver could not be built, or produced no reply (the message is redelivered, then
/// dead-lettered).
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// The agent's settings are not usable (refused when the runtime starts).
    #[error("{0}")]
    Settings(String),
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
    /// What the model calls of the turn used, as the provider reported it.
    pub usage: TurnUsage,
}

impl Turn {
    /// A turn that only answered: its `@name`s are its mentions.
    pub fn answer(agent: &str, reply: String) -> Self {
        let mentions = mentions(agent, &reply);
        Self {
            reply,
            said: Vec::new(),
            directed: Vec::new(),
            mentions,
            usage: TurnUsage::default(),
        }
    }

    /// A model's turn: its reply, what it did with the tools, and the `@name`s in its reply
    /// that the `mention` tool did not already cover.
    fn with_tool_effects(
        agent: &str,
        reply: String,
        effects: ToolEffects,
        usage: TurnUsage,
    ) -> Self {
        let mentions = mentions(agent, &reply)
            .into_iter()
            .filter(|m| !effects.mentions.iter().any(|(to, _)| to == m))
            .collect();
        Self {
            reply,
            said: effects.replies,
            directed: effects.mentions,
            mentions,
            usage,
        }
    }
}

/// How an agent turns a message into a reply (chosen per agent in the configuration).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Driver {
    /// Says what it got; with `settings.cc` (agent names) it also addresses them, which
    /// makes the demo's agent-to-agent mention.
    Echo { cc: Vec<String> },
    /// Runs a program per turn (see [`command`]).
    Command(command::Command),
    /// An OpenAI-compatible Chat Completions API with Warren's tools (see [`openai`]).
    OpenAi(openai::OpenAi),
    /// Anthropic's Messages API with Warren's tools (see [`anthropic`]).
    Anthropic(anthropic::Anthropic),
}

/// The drivers a runtime offers, as named in the configuration.
pub const DRIVERS: &[&str] = &["echo", "command", "openai", "anthropic"];

impl Driver {
    /// The driver described by `{"driver": ..., "settings": {...}}` (missing: `echo`), with
    /// no model keys.
    pub fn from_settings(agent: &serde_json::Value) -> Result<Self, DriverError> {
        Self::from_launch(&warren_schema::launch::AgentLaunch::new(
            "",
            agent["driver"].as_str().unwrap_or("echo"),
            agent["settings"].clone(),
        ))
    }

    /// The driver of a hosted agent, with the model keys its launch contract gives it and
    /// no others: a model driver's key is its `api_key_file` or the allowed key of its
    /// provider; a command agent gets its allowed keys in its environment.
    pub fn from_launch(agent: &warren_schema::launch::AgentLaunch) -> Result<Self, DriverError> {
        let mut settings = agent.settings.clone();
        if settings.is_null() {
            settings = serde_json::json!({});
        }
        let with_key = |mut settings: serde_json::Value, var: &str| {
            if settings["api_key_file"].is_null()
                && let Some(path) = agent.keys.get(var)
            {
                settings["api_key_file"] = path.to_string_lossy().into_owned().into();
            }
            settings
        };
        match agent.driver.as_str() {
            "echo" => Ok(Self::Echo {
                cc: strings(&settings["cc"]),
            }),
            "command" => command::Command::from_settings(&settings)
                .map(|c| c.with_keys(agent.keys.clone()))
                .map(Self::Command),
            "openai" => {
                openai::OpenAi::from_settings(&with_key(settings, openai::KEY)).map(Self::OpenAi)
            }
            "anthropic" => anthropic::Anthropic::from_settings(&with_key(settings, anthropic::KEY))
                .map(Self::Anthropic),
            other => Err(DriverError::Settings(format!(
                "driver {other:?} is not one of {}",
                DRIVERS.join(", ")
            ))),
        }
    }

    /// One turn. A failure leaves the message unacknowledged (redelivered, then
    /// dead-lettered).
    pub async fn turn(&self, ctx: &TurnContext) -> Result<Turn, DriverError> {
        match self {
            Self::Echo { cc } => Ok(echo::turn(&ctx.agent, &ctx.text, cc)),
            Self::Command(command) => {
                let said = command.run(ctx).await?;
                let mut turn = Turn::answer(&ctx.agent, said.reply);
                turn.usage = said.usage;
                Ok(turn)
            }
            Self::OpenAi(d) => {
                let (reply, effects, usage) = d.turn(ctx).await?;
                Ok(Turn::with_tool_effects(&ctx.agent, reply, effects, usage))
            }
            Self::Anthropic(d) => {
                let (reply, effects, usage) = d.turn(ctx).await?;
                Ok(Turn::with_tool_effects(&ctx.agent, reply, effects, usage))
            }
        }
    }
}

/// The strings of a JSON array (anything else: none).
fn strings(value: &serde_json::Value) -> Vec<String> {
    value
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
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
        let unknown = Driver::from_settings(&serde_json::json!({"driver": "gpt-9"}))
            .expect_err("no such driver");
        assert!(
            unknown.to_string().contains("anthropic"),
            "names the drivers there are: {unknown}"
        );
        assert!(
            Driver::from_settings(&serde_json::json!({"driver": "command", "settings": {}}))
                .is_err(),
            "a command agent without a command"
        );
    }

    #[test]
    fn a_tool_mention_is_not_repeated_by_the_same_name_in_the_reply() {
        let effects = ToolEffects {
            mentions: vec![("bob".into(), "look at this".into())],
            replies: vec!["working on it".into()],
        };
        let turn = Turn::with_tool_effects(
            "alice",
            "asked @bob and @carol".into(),
            effects,
            TurnUsage::default(),
        );
        assert_eq!(
            turn.directed,
            [("bob".to_owned(), "look at this".to_owned())]
        );
        assert_eq!(
            turn.mentions,
            ["carol"],
            "bob was already asked by the tool"
        );
        assert_eq!(turn.said, ["working on it"]);
    }
}
