//! `warren`: a thin client of the admin API (see `docs/admin-api.md`).
//!
//! - Server and token from flags, the environment or a config file, in that order. The
//!   token is never a flag's value (a command line is visible to every user of the machine):
//!   `WARREN_TOKEN`, `--token-file`, or the config file.
//! - Tables by default, `--output json` for scripts.
//! - Exit codes: 0 done; 1 failed; 2 bad usage or request; 3 not authenticated or not
//!   allowed; 4 not found; 5 conflict (taken, changed meanwhile, key reused); 6 unavailable.
//!
//! The break-glass commands that read the database directly stay in `warren-control-plane`.

mod client;
mod output;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use futures_util::StreamExt;
use reqwest::Method;
use serde::Deserialize;
use serde_json::{Value, json};

pub use client::{Client, Error};
use output::{Column, Format};

#[derive(Debug, Parser)]
#[command(
    name = "warren",
    version,
    about = "Manage Warren through its admin API"
)]
pub struct Cli {
    /// The admin API's base URL.
    #[arg(long, env = "WARREN_SERVER", global = true)]
    pub server: Option<String>,
    /// A file holding the API token (or set WARREN_TOKEN).
    #[arg(long, env = "WARREN_TOKEN_FILE", global = true)]
    pub token_file: Option<PathBuf>,
    /// A JSON file with `server` and `token_file` (or `token`); default
    /// `~/.config/warren/cli.json`.
    #[arg(long, env = "WARREN_CLI_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// `table` or `json`.
    #[arg(long, short, value_enum, default_value_t = Format::Table, global = true)]
    pub output: Format,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Agents: list, get, create, update, delete.
    #[command(subcommand)]
    Agents(AgentsCommand),
    /// Routes from Slack channels and webhook endpoints to agents.
    #[command(subcommand)]
    Routes(RoutesCommand),
    /// Webhook endpoints: list, get, create, rotate, delete (secrets are shown once).
    #[command(subcommand)]
    Endpoints(EndpointsCommand),
    /// Workspaces: list, get, start, stop, restart, delete.
    #[command(subcommand)]
    Workspaces(WorkspacesCommand),
    /// The event log: list with filters, get one, or follow new events.
    Events(EventsArgs),
    /// Why did this happen? The causal chain of an event or a workspace.
    Explain {
        /// An event id (message, reply, decision, memory write).
        #[arg(required_unless_present = "workspace")]
        event_id: Option<String>,
        #[arg(long, conflicts_with = "event_id")]
        workspace: Option<String>,
    },
    /// Agents, routes and workspaces as they were at a position or instant.
    AsOf {
        #[arg(long, required_unless_present = "at")]
        position: Option<i64>,
        /// RFC 3339.
        #[arg(long, conflicts_with = "position")]
        at: Option<String>,
    },
    /// Replay history under a changed policy and list the decisions that would differ.
    WhatIf(WhatIfArgs),
    /// Changes operators made, with the token and role behind each.
    Audit {
        #[arg(long)]
        since: Option<String>,
        #[arg(long)]
        limit: Option<usize>,
    },
    /// API tokens: list, issue, revoke.
    #[command(subcommand)]
    Tokens(TokensCommand),
    /// Agents' shared memory.
    #[command(subcommand)]
    Memory(MemoryCommand),
    /// Admission quotas: how many workspaces may run at once, in all, per team or channel.
    #[command(subcommand)]
    Quotas(QuotasCommand),
    /// Turns, runtime seconds and model tokens per agent, workspace or team.
    Usage {
        /// `agent`, `workspace` or `team`.
        #[arg(long, default_value = "workspace")]
        by: String,
        /// RFC 3339.
        #[arg(long)]
        since: Option<String>,
        #[arg(long)]
        until: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum QuotasCommand {
    /// The quotas recorded, and the flags they override.
    List,
    /// Set a quota: SCOPE is total, team, channel, team:{id} or channel:{id}; MAX a number
    /// or `none` (no cap).
    Set { scope: String, max: String },
    /// Remove a quota (its scope falls back to the broader one or the flag).
    Remove { scope: String },
}

#[derive(Debug, Subcommand)]
pub enum MemoryCommand {
    /// Put a memory bucket back from the log (after a NATS store loss).
    Restore {
        /// The workspace whose bucket to restore.
        #[arg(long, required_unless_present = "shared")]
        workspace: Option<String>,
        /// The shared bucket instead.
        #[arg(long, conflicts_with = "workspace")]
        shared: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum AgentsCommand {
    List {
        #[arg(long)]
        workspace: Option<String>,
    },
    Get {
        name: String,
    },
    Create(AgentArgs),
    /// Replace an agent's settings (all of them).
    Update {
        #[command(flatten)]
        agent: AgentArgs,
        /// Refuse if it changed since this ETag (from `get`).
        #[arg(long)]
        if_match: Option<String>,
    },
    Delete {
        name: String,
        #[arg(long)]
        if_match: Option<String>,
    },
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    pub name: String,
    #[arg(long)]
    pub workspace: String,
    /// `echo`, `command`, `anthropic` or `openai`.
    #[arg(long, default_value = "echo")]
    pub driver: String,
    /// Driver settings as JSON, or `@file.json`.
    #[arg(long)]
    pub settings: Option<String>,
    #[arg(long, default_value_t = 900)]
    pub idle_timeout_secs: u64,
    /// Makes a retried create safe.
    #[arg(long)]
    pub idempotency_key: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum RoutesCommand {
    List,
    Get {
        route: String,
    },
    /// Point `slack_channel:{id}` or `webhook:{endpoint}` at an agent.
    Set {
        route: String,
        agent: String,
    },
    Delete {
        route: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum EndpointsCommand {
    List,
    Get {
        name: String,
    },
    /// Create `/webhooks/{name}`; its secret is printed once.
    Create {
        name: String,
        /// `github`, `standard_webhooks` or `hmac_sha256`.
        #[arg(long)]
        scheme: String,
        /// The agent its deliveries are addressed to.
        #[arg(long)]
        agent: String,
        #[arg(long)]
        signature_header: Option<String>,
        #[arg(long)]
        delivery_header: Option<String>,
    },
    /// A new secret, printed once; the old one stays valid for `--grace-secs`.
    Rotate {
        name: String,
        #[arg(long, default_value_t = 3600)]
        grace_secs: u32,
    },
    Delete {
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum WorkspacesCommand {
    List {
        #[arg(long)]
        phase: Option<String>,
    },
    Get {
        name: String,
    },
    Start {
        name: String,
        #[arg(long)]
        reason: Option<String>,
    },
    Stop {
        name: String,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Stop it and start it again (a new pod or process).
    Restart {
        name: String,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Stop it and forget it (admin; refused while agents live there). Its files and
    /// memory bucket are kept.
    Delete {
        name: String,
        #[arg(long)]
        reason: Option<String>,
    },
}

#[derive(Debug, Args)]
pub struct EventsArgs {
    /// One event by id.
    #[arg(long, conflicts_with = "follow")]
    pub id: Option<String>,
    /// Keep printing new events as they are recorded (Ctrl-C to stop).
    #[arg(long, short)]
    pub follow: bool,
    /// Types, comma-separated.
    #[arg(long = "type")]
    pub event_type: Option<String>,
    #[arg(long)]
    pub after: Option<i64>,
    #[arg(long)]
    pub up_to: Option<i64>,
    #[arg(long)]
    pub since: Option<String>,
    #[arg(long)]
    pub until: Option<String>,
    #[arg(long)]
    pub stream: Option<String>,
    #[arg(long)]
    pub correlation: Option<String>,
    #[arg(long)]
    pub trace_id: Option<String>,
    /// At most this many (default 100).
    #[arg(long, default_value_t = 100)]
    pub limit: usize,
}

#[derive(Debug, Args)]
pub struct WhatIfArgs {
    #[arg(long)]
    pub after: Option<i64>,
    #[arg(long)]
    pub up_to: Option<i64>,
    /// A number, or `none` for no cap.
    #[arg(long)]
    pub max_running: Option<String>,
    #[arg(long)]
    pub max_running_per_team: Option<String>,
    #[arg(long)]
    pub max_running_per_channel: Option<String>,
    #[arg(long)]
    pub max_restarts: Option<u32>,
    #[arg(long)]
    pub mention_max_depth: Option<usize>,
    #[arg(long)]
    pub idle_timeout_secs: Option<u64>,
}

#[derive(Debug, Subcommand)]
pub enum TokensCommand {
    List {
        /// Revoked and expired ones too.
        #[arg(long)]
        all: bool,
    },
    /// Issue a token; it is printed once.
    Issue {
        #[arg(long)]
        name: String,
        /// `viewer`, `operator` or `admin`.
        #[arg(long)]
        role: String,
        #[arg(long)]
        expires_in_secs: Option<u64>,
    },
    Revoke {
        id: String,
    },
}

/// The config file's shape.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    server: Option<String>,
    token: Option<String>,
    token_file: Option<PathBuf>,
}

const DEFAULT_SERVER: &str = "http://127.0.0.1:9470";

impl Cli {
    /// The client these settings describe.
    pub fn client(&self) -> Result<Client, Error> {
        let config_path = self.config.clone().or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config/warren/cli.json"))
        });
        let file: ConfigFile = match &config_path {
            Some(path) if path.exists() => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
                serde_json::from_str(&text)
                    .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?
            }
            Some(path) if self.config.is_some() => {
                return Err(Error::Config(format!("{}: no such file", path.display())));
            }
            _ => ConfigFile::default(),
        };
        let server = self
            .server
            .clone()
            .or(file.server)
            .unwrap_or_else(|| DEFAULT_SERVER.to_owned());
        let read = |path: &PathBuf| {
            std::fs::read_to_string(path)
                .map(|t| t.trim().to_owned())
                .map_err(|e| Error::Config(format!("token file {}: {e}", path.display())))
        };
        let token = match (&self.token_file, std::env::var("WARREN_TOKEN").ok()) {
            (Some(path), _) => Some(read(path)?),
            (None, Some(t)) if !t.is_empty() => Some(t),
            _ => match (&file.token_file, file.token) {
                (Some(path), _) => Some(read(path)?),
                (None, token) => token,
            },
        };
        Ok(Client::new(&server, token))
    }
}

/// Runs the command; the exit code says how it went.
pub async fn run(cli: Cli) -> ExitCode {
    let mut out = std::io::stdout().lock();
    match execute(&cli, &mut out).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "warren: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

const AGENT_COLUMNS: &[Column] = &[
    ("NAME", "/name"),
    ("WORKSPACE", "/workspace"),
    ("DRIVER", "/driver"),
    ("MODEL", "/settings/model"),
    ("IDLE", "/idle_timeout_secs"),
    ("VERSION", "/version"),
];
const ROUTE_COLUMNS: &[Column] = &[
    ("ROUTE", "/route"),
    ("AGENT", "/agent"),
    ("VERSION", "/version"),
];
const WORKSPACE_COLUMNS: &[Column] = &[
    ("NAME", "/name"),
    ("PHASE", "/phase"),
    ("OBSERVED", "/observed/phase"),
    ("INSTANCE", "/observed/instance"),
    ("QUEUE", "/queue_position"),
    ("LAST ACTIVITY", "/last_activity"),
    ("AGENTS", "/agents"),
];
const EVENT_COLUMNS: &[Column] = &[
    ("POSITION", "/position"),
    ("RECORDED", "/recorded_at"),
    ("TYPE", "/type"),
    ("STREAM", "/stream"),
    ("ID", "/id"),
];
const ENDPOINT_COLUMNS: &[Column] = &[
    ("NAME", "/name"),
    ("SCHEME", "/scheme"),
    ("AGENT", "/agent"),
    ("SECRET", "/secret_fingerprint"),
    ("PREVIOUS VALID UNTIL", "/previous_valid_until"),
];
const TOKEN_COLUMNS: &[Column] = &[
    ("ID", "/id"),
    ("NAME", "/name"),
    ("ROLE", "/role"),
    ("ISSUED", "/issued_at"),
    ("EXPIRES", "/expires_at"),
    ("REVOKED", "/revoked_at"),
];
const DECISION_COLUMNS: &[Column] = &[
    ("TYPE", "/type"),
    ("WORKSPACE", "/payload/workspace"),
    ("AGENT", "/payload/agent"),
    ("ID", "/id"),
];

/// `?k=v&...` of the parameters that are set, percent-encoded.
fn query(params: &[(&str, Option<String>)]) -> String {
    let set: Vec<String> = params
        .iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", encode(v))))
        .collect();
    if set.is_empty() {
        String::new()
    } else {
        format!("?{}", set.join("&"))
    }
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            b => format!("%{b:02X}"),
        })
        .collect()
}

fn settings(text: &Option<String>) -> Result<Value, Error> {
    let Some(text) = text else {
        return Ok(json!({}));
    };
    let text = match text.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path)
            .map_err(|e| Error::Config(format!("--settings {path}: {e}")))?,
        None => text.clone(),
    };
    serde_json::from_str(&text).map_err(|e| Error::Config(format!("--settings: {e}")))
}

fn cap(value: &Option<String>) -> Result<Option<Value>, Error> {
    value
        .as_ref()
        .map(|v| match v.as_str() {
            "none" => Ok(Value::Null),
            n => n
                .parse::<u64>()
                .map(Value::from)
                .map_err(|_| Error::Config(format!("{n:?}: a number, or none"))),
        })
        .transpose()
}

async fn execute(cli: &Cli, out: &mut impl Write) -> Result<(), Error> {
    let api = cli.client()?;
    let format = cli.output;
    match &cli.command {
        Command::Agents(command) => match command {
            AgentsCommand::List { workspace } => {
                let items = api
                    .list(
                        &format!("/v1/agents{}", query(&[("workspace", workspace.clone())])),
                        None,
                    )
                    .await?;
                output::list(out, format, &items, AGENT_COLUMNS)?;
            }
            AgentsCommand::Get { name } => {
                let answer = api
                    .send(api.request(Method::GET, &format!("/v1/agents/{}", encode(name))))
                    .await?;
                output::item(out, format, &answer.body)?;
            }
            AgentsCommand::Create(a) => {
                let mut r = api.request(Method::POST, "/v1/agents").json(&json!({
                    "name": a.name, "workspace": a.workspace, "driver": a.driver,
                    "settings": settings(&a.settings)?, "idle_timeout_secs": a.idle_timeout_secs,
                }));
                if let Some(key) = &a.idempotency_key {
                    r = r.header("idempotency-key", key);
                }
                output::item(out, format, &api.send(r).await?.body)?;
            }
            AgentsCommand::Update { agent: a, if_match } => {
                let mut r = api
                    .request(Method::PUT, &format!("/v1/agents/{}", encode(&a.name)))
                    .json(&json!({
                        "workspace": a.workspace, "driver": a.driver,
                        "settings": settings(&a.settings)?, "idle_timeout_secs": a.idle_timeout_secs,
                    }));
                if let Some(tag) = if_match {
                    r = r.header("if-match", tag);
                }
                output::item(out, format, &api.send(r).await?.body)?;
            }
            AgentsCommand::Delete { name, if_match } => {
                let mut r = api.request(Method::DELETE, &format!("/v1/agents/{}", encode(name)));
                if let Some(tag) = if_match {
                    r = r.header("if-match", tag);
                }
                api.send(r).await?;
                writeln!(out, "deleted agent {name}")?;
            }
        },
        Command::Routes(command) => match command {
            RoutesCommand::List => {
                let items = api.list("/v1/routes", None).await?;
                output::list(out, format, &items, ROUTE_COLUMNS)?;
            }
            RoutesCommand::Get { route } => {
                let item = api.get(&format!("/v1/routes/{}", encode(route))).await?;
                output::item(out, format, &item)?;
            }
            RoutesCommand::Set { route, agent } => {
                let r = api
                    .request(Method::PUT, &format!("/v1/routes/{}", encode(route)))
                    .json(&json!({"agent": agent}));
                output::item(out, format, &api.send(r).await?.body)?;
            }
            RoutesCommand::Delete { route } => {
                api.send(api.request(Method::DELETE, &format!("/v1/routes/{}", encode(route))))
                    .await?;
                writeln!(out, "deleted route {route}")?;
            }
        },
        Command::Endpoints(command) => match command {
            EndpointsCommand::List => {
                let items = api.list("/v1/endpoints", None).await?;
                output::list(out, format, &items, ENDPOINT_COLUMNS)?;
            }
            EndpointsCommand::Get { name } => {
                let item = api.get(&format!("/v1/endpoints/{}", encode(name))).await?;
                output::item(out, format, &item)?;
            }
            EndpointsCommand::Create {
                name,
                scheme,
                agent,
                signature_header,
                delivery_header,
            } => {
                let r = api.request(Method::POST, "/v1/endpoints").json(&json!({
                    "name": name, "scheme": scheme, "agent": agent,
                    "signature_header": signature_header, "delivery_header": delivery_header,
                }));
                secret_once(out, format, api.send(r).await?.body)?;
            }
            EndpointsCommand::Rotate { name, grace_secs } => {
                let r = api
                    .request(
                        Method::POST,
                        &format!("/v1/endpoints/{}/rotate", encode(name)),
                    )
                    .json(&json!({"grace_secs": grace_secs}));
                secret_once(out, format, api.send(r).await?.body)?;
            }
            EndpointsCommand::Delete { name } => {
                api.send(api.request(Method::DELETE, &format!("/v1/endpoints/{}", encode(name))))
                    .await?;
                writeln!(out, "deleted endpoint {name}")?;
            }
        },
        Command::Workspaces(command) => match command {
            WorkspacesCommand::List { phase } => {
                let items = api
                    .list(
                        &format!("/v1/workspaces{}", query(&[("phase", phase.clone())])),
                        None,
                    )
                    .await?;
                output::list(out, format, &items, WORKSPACE_COLUMNS)?;
            }
            WorkspacesCommand::Get { name } => {
                let item = api.get(&format!("/v1/workspaces/{}", encode(name))).await?;
                output::item(out, format, &item)?;
            }
            WorkspacesCommand::Start { name, reason }
            | WorkspacesCommand::Stop { name, reason }
            | WorkspacesCommand::Restart { name, reason }
            | WorkspacesCommand::Delete { name, reason } => {
                let (method, action) = match command {
                    WorkspacesCommand::Start { .. } => (Method::POST, "/start"),
                    WorkspacesCommand::Stop { .. } => (Method::POST, "/stop"),
                    WorkspacesCommand::Restart { .. } => (Method::POST, "/restart"),
                    _ => (Method::DELETE, ""),
                };
                let path = format!(
                    "/v1/workspaces/{}{action}{}",
                    encode(name),
                    query(&[("reason", reason.clone())])
                );
                let answer = api.send(api.request(method, &path)).await?;
                output::item(out, format, &answer.body)?;
            }
        },
        Command::Events(args) => events(&api, args, format, out).await?,
        Command::Explain {
            event_id,
            workspace,
        } => {
            let path = match (event_id, workspace) {
                (Some(id), _) => format!("/v1/explain/events/{}", encode(id)),
                (None, Some(w)) => format!("/v1/explain/workspaces/{}", encode(w)),
                (None, None) => {
                    return Err(Error::Config("give an event id or --workspace".into()));
                }
            };
            let chain = api.get(&path).await?;
            let items = chain["chain"].as_array().cloned().unwrap_or_default();
            output::list(out, format, &items, EVENT_COLUMNS)?;
        }
        Command::AsOf { position, at } => {
            let path = format!(
                "/v1/as-of{}",
                query(&[
                    ("position", position.map(|p| p.to_string())),
                    ("at", at.clone())
                ])
            );
            let state = api.get(&path).await?;
            if format == Format::Json {
                output::item(out, format, &state)?;
            } else {
                writeln!(
                    out,
                    "as of position {} ({})",
                    state["position"], state["recorded_at"]
                )?;
                for (title, key, columns) in [
                    ("agents", "agents", AGENT_COLUMNS),
                    ("routes", "routes", ROUTE_COLUMNS),
                    ("workspaces", "workspaces", WORKSPACE_COLUMNS),
                ] {
                    writeln!(out, "\n{title}:")?;
                    let items = state[key].as_array().cloned().unwrap_or_default();
                    output::list(out, format, &items, columns)?;
                }
            }
        }
        Command::WhatIf(w) => {
            let mut body = serde_json::Map::new();
            for (k, v) in [
                ("max_running", cap(&w.max_running)?),
                ("max_running_per_team", cap(&w.max_running_per_team)?),
                ("max_running_per_channel", cap(&w.max_running_per_channel)?),
                ("after", w.after.map(Value::from)),
                ("up_to", w.up_to.map(Value::from)),
                ("max_restarts", w.max_restarts.map(Value::from)),
                ("mention_max_depth", w.mention_max_depth.map(Value::from)),
                ("idle_timeout_secs", w.idle_timeout_secs.map(Value::from)),
            ] {
                if let Some(v) = v {
                    body.insert(k.into(), v);
                }
            }
            let answer = api
                .send(api.request(Method::POST, "/v1/what-if").json(&body))
                .await?;
            let r = answer.body;
            if format == Format::Json {
                output::item(out, format, &r)?;
            } else {
                writeln!(
                    out,
                    "replayed {} events (positions {}..{}); {} decisions the same",
                    r["replayed_events"], r["after"], r["up_to"], r["same"]
                )?;
                for (title, key) in [
                    ("would decide", "would_decide"),
                    ("would not decide", "would_not_decide"),
                ] {
                    writeln!(out, "\n{title}:")?;
                    let items = r[key].as_array().cloned().unwrap_or_default();
                    output::list(out, format, &items, DECISION_COLUMNS)?;
                }
            }
        }
        Command::Audit { since, limit } => {
            let items = api
                .list(
                    &format!("/v1/audit{}", query(&[("since", since.clone())])),
                    *limit,
                )
                .await?;
            output::list(
                out,
                format,
                &items,
                &[
                    ("POSITION", "/position"),
                    ("RECORDED", "/recorded_at"),
                    ("TYPE", "/type"),
                    ("VIA", "/via"),
                    ("TOKEN", "/token_id"),
                    ("ROLE", "/role"),
                ],
            )?;
        }
        Command::Usage { by, since, until } => {
            let report = api
                .get(&format!(
                    "/v1/usage{}",
                    query(&[
                        ("by", Some(by.clone())),
                        ("since", since.clone()),
                        ("until", until.clone())
                    ])
                ))
                .await?;
            let rows = report["rows"].as_array().cloned().unwrap_or_default();
            output::list(
                out,
                format,
                &rows,
                &[
                    ("KEY", "/key"),
                    ("WORKSPACE", "/workspace"),
                    ("TURNS", "/turns"),
                    ("RUNTIME SECONDS", "/runtime_seconds"),
                    ("TURN SECONDS", "/turn_seconds"),
                    ("INPUT TOKENS", "/input_tokens"),
                    ("CACHED", "/cache_read_tokens"),
                    ("OUTPUT TOKENS", "/output_tokens"),
                ],
            )?;
        }
        Command::Quotas(command) => match command {
            QuotasCommand::List => {
                let quotas = api.get("/v1/quotas").await?;
                if format == Format::Json {
                    output::item(out, format, &quotas)?;
                } else {
                    let columns: &[Column] =
                        &[("SCOPE", "/scope"), ("MAX RUNNING", "/max_running")];
                    writeln!(out, "recorded:")?;
                    let items = quotas["quotas"].as_array().cloned().unwrap_or_default();
                    output::list(out, format, &items, columns)?;
                    writeln!(out, "\nflags (where nothing is recorded):")?;
                    let items = quotas["defaults"].as_array().cloned().unwrap_or_default();
                    output::list(out, format, &items, columns)?;
                }
            }
            QuotasCommand::Set { scope, max } => {
                let max = cap(&Some(max.clone()))?.unwrap_or(Value::Null);
                let r = api
                    .request(Method::PUT, &format!("/v1/quotas/{}", encode(scope)))
                    .json(&json!({"max_running": max}));
                output::item(out, format, &api.send(r).await?.body)?;
            }
            QuotasCommand::Remove { scope } => {
                api.send(api.request(Method::DELETE, &format!("/v1/quotas/{}", encode(scope))))
                    .await?;
                writeln!(out, "removed the quota on {scope}")?;
            }
        },
        Command::Memory(MemoryCommand::Restore { workspace, shared }) => {
            let r = api
                .request(Method::POST, "/v1/memory/restore")
                .json(&json!({"workspace": workspace, "shared": shared}));
            let restored = api.send(r).await?.body;
            match format {
                Format::Json => output::item(out, format, &restored)?,
                Format::Table => writeln!(
                    out,
                    "restored {} keys into {}",
                    restored["keys"],
                    restored["bucket"].as_str().unwrap_or_default()
                )?,
            }
        }
        Command::Tokens(command) => match command {
            TokensCommand::List { all } => {
                let path = if *all {
                    "/v1/tokens?all=true"
                } else {
                    "/v1/tokens"
                };
                let items = api.list(path, None).await?;
                output::list(out, format, &items, TOKEN_COLUMNS)?;
            }
            TokensCommand::Issue {
                name,
                role,
                expires_in_secs,
            } => {
                let r = api.request(Method::POST, "/v1/tokens").json(&json!({
                    "name": name, "role": role, "expires_in_secs": expires_in_secs,
                }));
                let issued = api.send(r).await?.body;
                if format == Format::Json {
                    output::item(out, format, &issued)?;
                } else {
                    writeln!(out, "{}", issued["token"].as_str().unwrap_or_default())?;
                    writeln!(
                        std::io::stderr(),
                        "token {} ({}) issued; it is shown this once",
                        issued["id"].as_str().unwrap_or_default(),
                        issued["role"].as_str().unwrap_or_default()
                    )?;
                }
            }
            TokensCommand::Revoke { id } => {
                api.send(api.request(Method::DELETE, &format!("/v1/tokens/{}", encode(id))))
                    .await?;
                writeln!(out, "revoked token {id}")?;
            }
        },
    }
    Ok(())
}

/// An endpoint's secret, printed alone on stdout (for a pipe), the rest on stderr.
fn secret_once(out: &mut impl Write, format: Format, body: Value) -> Result<(), Error> {
    if format == Format::Json {
        return Ok(output::item(out, format, &body)?);
    }
    writeln!(out, "{}", body["secret"].as_str().unwrap_or_default())?;
    writeln!(
        std::io::stderr(),
        "endpoint {} ({}, for agent {}): the secret is shown this once",
        body["name"].as_str().unwrap_or_default(),
        body["scheme"].as_str().unwrap_or_default(),
        body["agent"].as_str().unwrap_or_default()
    )?;
    Ok(())
}

async fn events(
    api: &Client,
    args: &EventsArgs,
    format: Format,
    out: &mut impl Write,
) -> Result<(), Error> {
    if let Some(id) = &args.id {
        let event = api.get(&format!("/v1/events/{}", encode(id))).await?;
        return Ok(output::item(out, format, &event)?);
    }
    if args.follow {
        return follow(api, args, format, out).await;
    }
    let path = format!(
        "/v1/events{}",
        query(&[
            ("type", args.event_type.clone()),
            ("after", args.after.map(|p| p.to_string())),
            ("up_to", args.up_to.map(|p| p.to_string())),
            ("since", args.since.clone()),
            ("until", args.until.clone()),
            ("stream", args.stream.clone()),
            ("correlation", args.correlation.clone()),
            ("trace_id", args.trace_id.clone()),
            ("limit", Some(args.limit.clamp(1, 1000).to_string())),
        ])
    );
    let items = api.list(&path, Some(args.limit)).await?;
    Ok(output::list(out, format, &items, EVENT_COLUMNS)?)
}

/// Prints events as the server sends them (Server-Sent Events), one line each (a JSON
/// document per line with `--output json`), until the stream ends.
async fn follow(
    api: &Client,
    args: &EventsArgs,
    format: Format,
    out: &mut impl Write,
) -> Result<(), Error> {
    let path = format!(
        "/v1/events/stream{}",
        query(&[
            ("type", args.event_type.clone()),
            ("after", args.after.map(|p| p.to_string())),
        ])
    );
    let response = api
        .request(Method::GET, &path)
        .send()
        .await
        .map_err(|source| Error::Connect {
            url: api.server.clone(),
            source,
        })?;
    if !response.status().is_success() {
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        return Err(Error::Api {
            status,
            detail: body["detail"].as_str().unwrap_or("refused").to_owned(),
        });
    }
    let mut stream = response.bytes_stream();
    let mut buffer = String::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| Error::Protocol(e.to_string()))?;
        buffer.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buffer.find("\n\n") {
            let frame: String = buffer.drain(..end + 2).collect();
            for data in frame.lines().filter_map(|l| l.strip_prefix("data: ")) {
                let Ok(event) = serde_json::from_str::<Value>(data) else {
                    continue;
                };
                match format {
                    Format::Json => writeln!(out, "{event}")?,
                    Format::Table => writeln!(
                        out,
                        "{}  {}  {}  {}",
                        event["position"],
                        event["recorded_at"].as_str().unwrap_or_default(),
                        event["type"].as_str().unwrap_or_default(),
                        event["payload"]
                    )?,
                }
                out.flush()?;
            }
        }
    }
    Ok(())
}
