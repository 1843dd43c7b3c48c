//! The declarative agents-and-routes file, turned into events.
//!
//! Until the admin API exists, agents and routes come from a JSON file the leader reads at
//! start. Each entry that differs from what the log says becomes an `agent.configured` /
//! `route.configured` event, each entry that disappeared an `agent.removed` /
//! `route.removed`; an unchanged file records nothing. An invalid file records nothing and
//! says which entry is wrong.
//!
//! ```json
//! {
//!   "agents": [
//!     {"name": "alice", "workspace": "research", "driver": "echo",
//!      "settings": {}, "idle_timeout_secs": 900}
//!   ],
//!   "routes": [{"route": "slack_channel:C0123", "agent": "alice"},
//!              {"route": "webhook:github", "agent": "alice"}]
//! }
//! ```

use std::collections::BTreeSet;
use std::path::Path;

use serde::Deserialize;
use serde_json::Value;
use warren_schema::events::*;
use warren_schema::{AppendRequest, EventId, EventLog, Metadata, NewEvent};

use crate::decide::State;
use crate::error::{Error, Result};

/// The stream configuration events are appended to.
pub const CONFIG_STREAM: &str = "control-plane:config";

/// The file's shape.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    #[serde(default)]
    pub agents: Vec<AgentEntry>,
    #[serde(default)]
    pub routes: Vec<RouteConfigured>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentEntry {
    pub name: String,
    pub workspace: String,
    #[serde(default = "default_driver")]
    pub driver: String,
    #[serde(default = "empty_settings")]
    pub settings: Value,
    #[serde(default = "default_idle")]
    pub idle_timeout_secs: u64,
}

fn default_driver() -> String {
    "echo".into()
}
fn empty_settings() -> Value {
    Value::Object(Default::default())
}
fn default_idle() -> u64 {
    900
}

const DRIVERS: &[&str] = &["echo", "command", "anthropic", "openai"];

/// Reads and validates the file.
pub fn load(path: &Path) -> Result<ConfigFile> {
    let error = |message: String| Error::Config {
        path: path.display().to_string(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| error(e.to_string()))?;
    let file: ConfigFile = serde_json::from_str(&text).map_err(|e| error(e.to_string()))?;
    validate(&file).map_err(error)?;
    Ok(file)
}

pub fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Names are DNS labels (they become pod and subject names); every route names a
/// configured agent; nothing is defined twice.
pub fn validate(file: &ConfigFile) -> std::result::Result<(), String> {
    let mut names = BTreeSet::new();
    for a in &file.agents {
        if !is_name(&a.name) {
            return Err(format!(
                "agent name {:?}: use 1-63 lowercase letters, digits and '-'",
                a.name
            ));
        }
        if !is_name(&a.workspace) {
            return Err(format!(
                "agent {}: workspace {:?}: use 1-63 lowercase letters, digits and '-'",
                a.name, a.workspace
            ));
        }
        if warren_schema::nats::Namespace::RESERVED_WORKSPACES.contains(&a.workspace.as_str()) {
            return Err(format!(
                "agent {}: workspace {:?} is reserved (the shared memory bucket); choose another",
                a.name, a.workspace
            ));
        }
        if let Some(key) = warren_schema::launch::AgentLaunch::allowed_keys(&a.settings)
            .into_iter()
            .find(|k| !crate::backend::model_keys::is_key_name(k))
        {
            return Err(format!(
                "agent {}: allowed key {key:?}: use a key name such as OPENAI_API_KEY (A-Z, 0-9, _)",
                a.name
            ));
        }
        if a.settings
            .get("allow_broadcasts")
            .is_some_and(|v| !v.is_boolean())
        {
            return Err(format!(
                "agent {}: settings.allow_broadcasts is true or false",
                a.name
            ));
        }
        if let Err(e) = crate::decide::access::Access::of(&a.settings) {
            return Err(format!(
                "agent {}: {e} (channels, users and endpoints are lists of ids)",
                a.name
            ));
        }
        if !DRIVERS.contains(&a.driver.as_str()) {
            return Err(format!(
                "agent {}: driver {:?} is not one of {DRIVERS:?}",
                a.name, a.driver
            ));
        }
        if !names.insert(a.name.as_str()) {
            return Err(format!("agent {} is defined twice", a.name));
        }
    }
    // Pod settings (kubernetes backend): each checked, and the agents of one workspace
    // (one pod) may not contradict each other.
    let mut workspaces: std::collections::BTreeMap<&str, Vec<&AgentEntry>> = Default::default();
    for a in &file.agents {
        workspaces.entry(a.workspace.as_str()).or_default().push(a);
    }
    for (workspace, agents) in workspaces {
        crate::backend::kubernetes::settings::for_workspace(
            agents.iter().map(|a| (a.name.as_str(), &a.settings)),
        )
        .map_err(|e| format!("workspace {workspace}: {e}"))?;
    }
    let mut routes = BTreeSet::new();
    for r in &file.routes {
        let valid_key = r.route.split_once(':').is_some_and(|(kind, id)| {
            matches!(kind, "slack_channel" | "webhook") && !id.is_empty()
        });
        if !valid_key {
            return Err(format!(
                "route {:?}: use slack_channel:{{channel id}} or webhook:{{endpoint}}",
                r.route
            ));
        }
        if !names.contains(r.agent.as_str()) {
            return Err(format!(
                "route {} names unknown agent {:?}",
                r.route, r.agent
            ));
        }
        if !routes.insert(r.route.as_str()) {
            return Err(format!("route {} is defined twice", r.route));
        }
    }
    Ok(())
}

/// The events that bring the log from `state` to `file` (pure). Ids derive from the entry
/// and the log position the diff was made at, so a retry of the same sync is absorbed.
pub fn diff(state: &State, file: &ConfigFile) -> Vec<NewEvent> {
    /// The changes, each with an id derived from the entry and the diff's log position.
    struct Changes {
        at: String,
        events: Vec<NewEvent>,
    }
    impl Changes {
        fn push<E: DomainEvent>(&mut self, key: &[&str], event: &E) {
            let mut parts = vec!["config", self.at.as_str(), E::TYPE];
            parts.extend_from_slice(key);
            // Serialising a plain-data event cannot fail.
            if let Ok(e) = NewEvent::from_domain(
                EventId::derive(&parts),
                event,
                Metadata::new("control-plane.config"),
            ) {
                self.events.push(e);
            }
        }
    }
    let mut out = Changes {
        at: state.position.to_string(),
        events: Vec::new(),
    };
    for a in &file.agents {
        let wanted = AgentConfigured {
            name: a.name.clone(),
            workspace: a.workspace.clone(),
            driver: a.driver.clone(),
            settings: a.settings.clone(),
            idle_timeout_secs: a.idle_timeout_secs,
        };
        let unchanged = state.agents.get(&a.name).is_some_and(|have| {
            have.workspace == wanted.workspace
                && have.driver == wanted.driver
                && have.settings == wanted.settings
                && have.idle_timeout_secs == wanted.idle_timeout_secs
        });
        if !unchanged {
            out.push(&[&a.name], &wanted);
        }
    }
    for name in state.agents.keys() {
        if !file.agents.iter().any(|a| &a.name == name) {
            out.push(&[name], &AgentRemoved { name: name.clone() });
        }
    }
    for r in &file.routes {
        if state.routes.get(&r.route) != Some(&r.agent) {
            out.push(&[&r.route], r);
        }
    }
    for route in state.routes.keys() {
        if !file.routes.iter().any(|r| &r.route == route) {
            out.push(
                &[route],
                &RouteRemoved {
                    route: route.clone(),
                },
            );
        }
    }
    out.events
}

/// Records what changed between the log (`state`) and `file`. Returns how many events.
pub async fn sync(log: &EventLog, state: &State, file: &ConfigFile) -> Result<usize> {
    let events = diff(state, file);
    if events.is_empty() {
        return Ok(0);
    }
    let n = events.len();
    log.append(&AppendRequest::new(CONFIG_STREAM, events))
        .await?;
    tracing::info!(events = n, "configuration changes recorded");
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn file(json: Value) -> ConfigFile {
        serde_json::from_value(json).expect("a config file")
    }

    #[test]
    fn bad_pod_settings_are_refused_naming_the_agent_and_the_field() {
        let e = validate(&file(json!({"agents": [{"name": "a", "workspace": "w",
            "settings": {"pod": {"resources": {"limits": {"memory": "lots"}}}}}]})))
        .expect_err("refused");
        assert!(
            e.contains("agent a") && e.contains("settings.pod.resources.limits.memory"),
            "{e}"
        );
        let e = validate(&file(json!({"agents": [
            {"name": "a", "workspace": "w", "settings": {"pod": {"runtime_class": "gvisor"}}},
            {"name": "b", "workspace": "w", "settings": {"pod": {"runtime_class": "kata"}}}]})))
        .expect_err("refused");
        assert!(
            e.contains("workspace w") && e.contains("runtime_class"),
            "{e}"
        );
    }

    #[test]
    fn reserved_workspaces_and_bad_key_names_are_refused_naming_the_agent() {
        let shared = file(serde_json::json!({"agents": [{"name": "a", "workspace": "shared"}]}));
        let e = validate(&shared).expect_err("shared is the shared bucket");
        assert!(e.contains("agent a") && e.contains("reserved"), "{e}");

        let traversal = file(
            serde_json::json!({"agents": [{"name": "a", "workspace": "w",
            "settings": {"allowed_keys": ["../../etc/shadow"]}}]}),
        );
        let e = validate(&traversal).expect_err("not a key name");
        assert!(e.contains("allowed key"), "{e}");

        let access = file(
            serde_json::json!({"agents": [{"name": "a", "workspace": "w",
            "settings": {"access": {"channels": "C1"}}}]}),
        );
        let e = validate(&access).expect_err("not a list");
        assert!(
            e.contains("agent a") && e.contains("settings.access"),
            "{e}"
        );

        let fine = file(
            serde_json::json!({"agents": [{"name": "a", "workspace": "w",
            "settings": {"allowed_keys": ["OPENAI_API_KEY"],
                         "access": {"channels": ["C1"], "users": ["U1"]}}}]}),
        );
        assert_eq!(validate(&fine), Ok(()));
    }
}
