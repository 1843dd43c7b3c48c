//! The launch contract: exactly what a workspace's runtime is given, and nothing else.
//!
//! Every backend (local child processes, Kubernetes pods) starts a runtime from one
//! [`LaunchContract`], and the runtime reads only that. The contract travels as JSON in one
//! environment variable ([`ENV`]); the rest of the process environment is empty but for
//! `PATH` and `HOME` ([`LaunchContract::environment`]). So what a workspace can learn about
//! the installation is what this type says, reviewed in one place:
//!
//! - its name, its agents (driver, settings, the model keys each may use);
//! - its own directory and the shared one;
//! - its NATS server, subject prefix and the path of its own credentials file;
//! - telemetry settings and the runtime's tuning.
//!
//! Never in it: the database URL, the NATS account seed, another workspace's anything, a
//! key value (keys are files the backend writes for this workspace only; the contract names
//! their paths).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The environment variable holding the contract (JSON).
pub const ENV: &str = "WARREN_LAUNCH";

/// Everything a workspace's runtime is started with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LaunchContract {
    /// The workspace's name.
    pub workspace: String,
    /// The agents it hosts.
    pub agents: Vec<AgentLaunch>,
    /// The workspace's own directory (`command` agents run there).
    pub workspace_dir: PathBuf,
    /// The directory every workspace shares, when there is one.
    #[serde(default)]
    pub shared_dir: Option<PathBuf>,
    pub nats: NatsLaunch,
    /// The trace context of the decision that started this workspace.
    #[serde(default)]
    pub traceparent: Option<String>,
    #[serde(default)]
    pub telemetry: TelemetryLaunch,
    #[serde(default)]
    pub tuning: Tuning,
}

/// One hosted agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentLaunch {
    pub name: String,
    /// `echo`, `command`, `openai` or `anthropic`.
    pub driver: String,
    /// The driver's settings, as configured.
    #[serde(default)]
    pub settings: serde_json::Value,
    /// The model keys this agent may use: key name (`OPENAI_API_KEY`) → the file holding it,
    /// written by the backend for this workspace only. Only the names the agent's
    /// `allowed_keys` lists are here.
    #[serde(default)]
    pub keys: BTreeMap<String, PathBuf>,
}

/// Where the workspace's NATS is, and who it is there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsLaunch {
    pub url: String,
    /// Prefix of every subject and stream.
    pub prefix: String,
    /// The workspace's own credentials file (a user allowed its own subjects only).
    #[serde(default)]
    pub credentials: Option<PathBuf>,
}

/// Logs, traces and metrics of the runtime.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryLaunch {
    /// `json` (default) or `text`.
    #[serde(default)]
    pub log_format: Option<String>,
    /// An `EnvFilter` directive such as `info,warren=debug`.
    #[serde(default)]
    pub log_filter: Option<String>,
    /// OTLP/HTTP collector for traces.
    #[serde(default)]
    pub otlp_endpoint: Option<String>,
    /// Where to serve `GET /metrics` (a pod sets it; many local runtimes share a machine).
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
}

/// How the runtime treats its inboxes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tuning {
    /// Deliveries of one message before it is dead-lettered.
    pub max_deliver: i64,
    /// Seconds before an unacknowledged message is redelivered.
    pub ack_wait_secs: u64,
    /// Seconds between heartbeats while a turn runs.
    pub heartbeat_secs: u64,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            max_deliver: 5,
            ack_wait_secs: 120,
            heartbeat_secs: 30,
        }
    }
}

/// Why a contract could not be read.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("{ENV} is not set: the runtime is started by a Warren backend")]
    Missing,
    #[error("{ENV} is not a launch contract: {0}")]
    Invalid(String),
}

impl NatsLaunch {
    pub fn new(url: impl Into<String>, prefix: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            prefix: prefix.into(),
            credentials: None,
        }
    }
}

impl AgentLaunch {
    /// An agent with no model keys.
    pub fn new(
        name: impl Into<String>,
        driver: impl Into<String>,
        settings: serde_json::Value,
    ) -> Self {
        Self {
            name: name.into(),
            driver: driver.into(),
            settings,
            keys: BTreeMap::new(),
        }
    }

    /// The key names an agent's settings allow (`settings.allowed_keys`).
    pub fn allowed_keys(settings: &serde_json::Value) -> Vec<String> {
        settings["allowed_keys"]
            .as_array()
            .map(|keys| {
                keys.iter()
                    .filter_map(|k| k.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl LaunchContract {
    /// A workspace with no agents yet and default tuning.
    pub fn new(workspace: impl Into<String>, workspace_dir: PathBuf, nats: NatsLaunch) -> Self {
        Self {
            workspace: workspace.into(),
            agents: Vec::new(),
            workspace_dir,
            shared_dir: None,
            nats,
            traceparent: None,
            telemetry: TelemetryLaunch::default(),
            tuning: Tuning::default(),
        }
    }

    /// The contract as the value of [`ENV`].
    pub fn to_json(&self) -> String {
        // A struct of strings, paths and JSON values always serialises.
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn from_json(json: &str) -> Result<Self, LaunchError> {
        serde_json::from_str(json).map_err(|e| LaunchError::Invalid(e.to_string()))
    }

    /// Reads the contract from this process's environment.
    pub fn from_env() -> Result<Self, LaunchError> {
        let json = std::env::var(ENV).map_err(|_| LaunchError::Missing)?;
        Self::from_json(&json)
    }

    /// The whole environment of a runtime process: the contract, `PATH` (where programs
    /// are found; not a secret) and `HOME` (the workspace directory). A backend starts the
    /// runtime from an empty environment with exactly these.
    pub fn environment(&self, path: &str) -> Vec<(String, String)> {
        vec![
            (ENV.to_owned(), self.to_json()),
            ("PATH".to_owned(), path.to_owned()),
            (
                "HOME".to_owned(),
                self.workspace_dir.to_string_lossy().into_owned(),
            ),
        ]
    }

    /// The agent named `name`.
    pub fn agent(&self, name: &str) -> Option<&AgentLaunch> {
        self.agents.iter().find(|a| a.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_contract_survives_its_environment_variable_and_refuses_unknown_fields() {
        let mut launch = LaunchContract::new(
            "research",
            PathBuf::from("/w/research"),
            NatsLaunch::new("nats://127.0.0.1:4222", "warren"),
        );
        let mut alice = AgentLaunch::new("alice", "openai", serde_json::json!({"model": "m"}));
        alice
            .keys
            .insert("OPENAI_API_KEY".into(), PathBuf::from("/k/OPENAI_API_KEY"));
        launch.agents.push(alice);
        let env = launch.environment("/usr/bin:/bin");
        let names: Vec<&str> = env.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, [ENV, "PATH", "HOME"]);
        assert_eq!(
            LaunchContract::from_json(&env[0].1).expect("parses"),
            launch
        );

        let smuggled = env[0]
            .1
            .replacen('{', r#"{"database_url": "postgres://x","#, 1);
        assert!(
            LaunchContract::from_json(&smuggled).is_err(),
            "a field the contract does not know is refused, not ignored"
        );
    }

    #[test]
    fn allowed_keys_come_from_the_agent_settings() {
        let settings = serde_json::json!({"allowed_keys": ["OPENAI_API_KEY", 3]});
        assert_eq!(AgentLaunch::allowed_keys(&settings), ["OPENAI_API_KEY"]);
        assert!(AgentLaunch::allowed_keys(&serde_json::json!({})).is_empty());
    }
}
