//! What an operator may set about a workspace's pod, per agent (`settings.pod`), checked
//! when the configuration is read so that a mistake is refused naming its field, not found
//! later as a pod the API server rejects.
//!
//! ```json
//! "settings": {"pod": {
//!   "image": "registry.example/warren-runtime:1.2",
//!   "resources": {"requests": {"cpu": "250m", "memory": "256Mi"},
//!                 "limits": {"cpu": "2", "memory": "1Gi"}},
//!   "runtime_class": "gvisor",
//!   "node_selector": {"warren.dev/pool": "agents"},
//!   "tolerations": [{"key": "agents", "operator": "Exists", "effect": "NoSchedule"}],
//!   "affinity": {"nodeAffinity": {...}},
//!   "priority_class": "warren-agents"
//! }}
//! ```
//!
//! A workspace's pod takes the settings of its agents: agents of one workspace that set the
//! same field differently are refused ([`for_workspace`]).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Affinity, Toleration};
use serde::{Deserialize, Serialize};

/// One agent's pod settings. Every field is optional; unset ones take the backend's
/// defaults.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PodSettings {
    /// The runtime image (it must hold `warren-workspace-runtime` and the agents' programs).
    pub image: Option<String>,
    pub resources: Option<Resources>,
    /// A RuntimeClass such as `gvisor` or `kata`: a sandbox per pod.
    pub runtime_class: Option<String>,
    pub node_selector: Option<BTreeMap<String, String>>,
    pub tolerations: Option<Vec<Toleration>>,
    pub affinity: Option<Affinity>,
    pub priority_class: Option<String>,
}

/// Requests and limits, `cpu` and `memory` only.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    pub requests: Option<Amounts>,
    pub limits: Option<Amounts>,
}

/// Kubernetes quantities (`250m`, `1.5`, `512Mi`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Amounts {
    pub cpu: Option<String>,
    pub memory: Option<String>,
}

/// A setting that cannot be used, naming its field (`settings.pod.resources.limits.cpu`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("settings.pod.{field}: {problem}")]
pub struct SettingsError {
    pub field: String,
    pub problem: String,
}

fn invalid(field: impl Into<String>, problem: impl Into<String>) -> SettingsError {
    SettingsError {
        field: field.into(),
        problem: problem.into(),
    }
}

impl PodSettings {
    /// The pod settings in an agent's settings (none: all defaults), checked.
    pub fn of(agent_settings: &serde_json::Value) -> Result<Self, SettingsError> {
        let Some(value) = agent_settings.get("pod") else {
            return Ok(Self::default());
        };
        let settings: Self = serde_json::from_value(value.clone()).map_err(|e| {
            // serde names the unknown or mistyped field in its message.
            invalid("", e.to_string())
        })?;
        settings.validate()?;
        Ok(settings)
    }

    /// The operator's defaults for every workspace pod (`--kube-pod-defaults`): a JSON file
    /// of the same shape as `settings.pod`, checked the same way.
    pub fn defaults_from_file(path: &std::path::Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("reading {}: {e}", path.display()))?;
        let value: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| format!("{} is not JSON: {e}", path.display()))?;
        Self::of(&serde_json::json!({ "pod": value })).map_err(|e| {
            format!(
                "{}: {}",
                path.display(),
                e.to_string().replacen("settings.pod.", "", 1)
            )
        })
    }

    /// Each field `self` leaves unset taken from `defaults`; a field is taken whole (an
    /// agent's `resources` replaces the default `resources`, requests and limits together).
    pub fn or(&self, defaults: &Self) -> Self {
        fn or<T: Clone>(mine: &Option<T>, default: &Option<T>) -> Option<T> {
            mine.clone().or_else(|| default.clone())
        }
        Self {
            image: or(&self.image, &defaults.image),
            resources: or(&self.resources, &defaults.resources),
            runtime_class: or(&self.runtime_class, &defaults.runtime_class),
            node_selector: or(&self.node_selector, &defaults.node_selector),
            tolerations: or(&self.tolerations, &defaults.tolerations),
            affinity: or(&self.affinity, &defaults.affinity),
            priority_class: or(&self.priority_class, &defaults.priority_class),
        }
    }

    fn validate(&self) -> Result<(), SettingsError> {
        if let Some(image) = &self.image
            && (image.is_empty() || image.chars().any(char::is_whitespace))
        {
            return Err(invalid("image", "an image reference has no spaces"));
        }
        if let Some(resources) = &self.resources {
            for (which, amounts) in [
                ("requests", &resources.requests),
                ("limits", &resources.limits),
            ] {
                let Some(amounts) = amounts else { continue };
                for (name, value) in [("cpu", &amounts.cpu), ("memory", &amounts.memory)] {
                    if let Some(value) = value
                        && !is_quantity(value)
                    {
                        return Err(invalid(
                            format!("resources.{which}.{name}"),
                            format!("{value:?} is not a quantity (such as 500m, 2, 512Mi, 1Gi)"),
                        ));
                    }
                }
            }
        }
        for (field, name) in [
            ("runtime_class", &self.runtime_class),
            ("priority_class", &self.priority_class),
        ] {
            if let Some(name) = name
                && !is_dns_subdomain(name)
            {
                return Err(invalid(
                    field,
                    format!("{name:?} is not a DNS subdomain name"),
                ));
            }
        }
        if let Some(selector) = &self.node_selector {
            for (key, value) in selector {
                if !is_label_key(key) {
                    return Err(invalid(
                        format!("node_selector.{key}"),
                        "not a label key (prefix/name, 63 characters a name at most)",
                    ));
                }
                if !is_label_value(value) {
                    return Err(invalid(
                        format!("node_selector.{key}"),
                        format!("{value:?} is not a label value"),
                    ));
                }
            }
        }
        for (i, t) in self.tolerations.iter().flatten().enumerate() {
            let operator = t.operator.as_deref().unwrap_or("Equal");
            if !matches!(operator, "Equal" | "Exists") {
                return Err(invalid(
                    format!("tolerations[{i}].operator"),
                    format!("{operator:?}: use Equal or Exists"),
                ));
            }
            if let Some(effect) = t.effect.as_deref()
                && !matches!(effect, "" | "NoSchedule" | "PreferNoSchedule" | "NoExecute")
            {
                return Err(invalid(
                    format!("tolerations[{i}].effect"),
                    format!("{effect:?}: use NoSchedule, PreferNoSchedule or NoExecute"),
                ));
            }
            if operator == "Exists" && t.value.as_deref().is_some_and(|v| !v.is_empty()) {
                return Err(invalid(
                    format!("tolerations[{i}].value"),
                    "must be empty when the operator is Exists",
                ));
            }
        }
        Ok(())
    }

    /// `self` with every field `other` sets and `self` does not. A field both set
    /// differently is an error naming it.
    fn merge(mut self, other: &Self) -> Result<Self, String> {
        fn take<T: Clone + PartialEq>(
            mine: &mut Option<T>,
            theirs: &Option<T>,
            field: &str,
        ) -> Result<(), String> {
            match (mine.as_ref(), theirs) {
                (Some(a), Some(b)) if a != b => Err(field.to_owned()),
                (None, Some(b)) => {
                    *mine = Some(b.clone());
                    Ok(())
                }
                _ => Ok(()),
            }
        }
        take(&mut self.image, &other.image, "image")?;
        take(&mut self.resources, &other.resources, "resources")?;
        take(
            &mut self.runtime_class,
            &other.runtime_class,
            "runtime_class",
        )?;
        take(
            &mut self.node_selector,
            &other.node_selector,
            "node_selector",
        )?;
        take(&mut self.tolerations, &other.tolerations, "tolerations")?;
        take(&mut self.affinity, &other.affinity, "affinity")?;
        take(
            &mut self.priority_class,
            &other.priority_class,
            "priority_class",
        )?;
        Ok(self)
    }
}

/// The pod settings of a workspace hosting `agents` (name, settings): the union of theirs.
/// Two agents that set one field differently are refused, naming both and the field.
pub fn for_workspace<'a>(
    agents: impl IntoIterator<Item = (&'a str, &'a serde_json::Value)>,
) -> Result<PodSettings, String> {
    let mut merged = PodSettings::default();
    let mut set_by: Option<&str> = None;
    for (name, settings) in agents {
        let mine = PodSettings::of(settings).map_err(|e| format!("agent {name}: {e}"))?;
        merged = merged.merge(&mine).map_err(|field| {
            format!(
                "agents {} and {name} share a workspace (one pod) but set settings.pod.{field} \
                 differently",
                set_by.unwrap_or("?")
            )
        })?;
        if mine != PodSettings::default() {
            set_by.get_or_insert(name);
        }
    }
    Ok(merged)
}

/// A Kubernetes quantity: a decimal number with an optional SI or binary suffix.
pub fn is_quantity(s: &str) -> bool {
    const SUFFIXES: [&str; 13] = [
        "Ki", "Mi", "Gi", "Ti", "Pi", "Ei", "n", "u", "m", "k", "M", "G", "T",
    ];
    let number = SUFFIXES
        .iter()
        .find_map(|suffix| s.strip_suffix(suffix))
        .unwrap_or(s);
    let mut parts = number.splitn(2, '.');
    let whole = parts.next().unwrap_or_default();
    let fraction = parts.next();
    !number.is_empty()
        && whole.chars().all(|c| c.is_ascii_digit())
        && fraction.is_none_or(|f| !f.is_empty() && f.chars().all(|c| c.is_ascii_digit()))
        && (!whole.is_empty() || fraction.is_some())
}

/// RFC 1123 subdomain: lowercase alphanumerics, '-' and '.', at most 253 characters.
pub fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

fn is_label_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
}

/// `[prefix/]name`, the prefix a DNS subdomain.
pub fn is_label_key(s: &str) -> bool {
    match s.split_once('/') {
        Some((prefix, name)) => is_dns_subdomain(prefix) && is_label_name(name),
        None => is_label_name(s),
    }
}

/// Empty, or a label name.
pub fn is_label_value(s: &str) -> bool {
    s.is_empty() || is_label_name(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn settings_are_read_and_every_mistake_names_its_field() {
        let good = PodSettings::of(&json!({"pod": {
            "image": "example/runtime:1",
            "resources": {"limits": {"cpu": "1500m", "memory": "1Gi"}},
            "runtime_class": "gvisor",
            "node_selector": {"warren.dev/pool": "agents"},
            "tolerations": [{"key": "agents", "operator": "Exists", "effect": "NoSchedule"}],
            "priority_class": "warren-agents"
        }}))
        .expect("valid");
        assert_eq!(good.runtime_class.as_deref(), Some("gvisor"));
        assert_eq!(PodSettings::of(&json!({})), Ok(PodSettings::default()));

        let field_of = |pod: serde_json::Value| {
            PodSettings::of(&json!({ "pod": pod }))
                .expect_err("refused")
                .to_string()
        };
        assert!(
            field_of(json!({"resources": {"limits": {"cpu": "lots"}}}))
                .starts_with("settings.pod.resources.limits.cpu:")
        );
        assert!(
            field_of(json!({"runtime_class": "GVisor!"}))
                .starts_with("settings.pod.runtime_class:")
        );
        assert!(
            field_of(json!({"node_selector": {"bad key!": "x"}}))
                .starts_with("settings.pod.node_selector.bad key!:")
        );
        assert!(
            field_of(json!({"tolerations": [{"operator": "Sometimes"}]}))
                .starts_with("settings.pod.tolerations[0].operator:")
        );
        let unknown = field_of(json!({"privileged": true}));
        assert!(unknown.contains("privileged"), "{unknown}");
    }

    #[test]
    fn quantities_and_names() {
        for q in ["1", "250m", "1.5", "512Mi", "1Gi", "0.5", "100k"] {
            assert!(is_quantity(q), "{q}");
        }
        for q in ["", "m", "1..5", "-1", "1 Gi", "1GB", ".", "1."] {
            assert!(!is_quantity(q), "{q}");
        }
        assert!(is_dns_subdomain("kata-qemu.example"));
        assert!(!is_dns_subdomain("Kata"));
        assert!(is_label_key("kubernetes.io/arch") && !is_label_key("/arch"));
    }

    #[test]
    fn agents_of_one_workspace_share_their_settings_and_may_not_contradict() {
        let a = json!({"pod": {"runtime_class": "gvisor"}});
        let b = json!({"pod": {"image": "example/runtime:2"}});
        let merged = for_workspace([("a", &a), ("b", &b)]).expect("no conflict");
        assert_eq!(merged.runtime_class.as_deref(), Some("gvisor"));
        assert_eq!(merged.image.as_deref(), Some("example/runtime:2"));

        let c = json!({"pod": {"runtime_class": "kata"}});
        let e = for_workspace([("a", &a), ("c", &c)]).expect_err("conflict");
        assert!(
            e.contains("agents a and c") && e.contains("settings.pod.runtime_class"),
            "{e}"
        );
    }

    #[test]
    fn a_defaults_file_is_checked_like_an_agents_settings() {
        let dir = std::env::temp_dir().join(format!("warren-pod-defaults-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("defaults.json");
        std::fs::write(
            &file,
            r#"{"runtime_class": "gvisor", "node_selector": {"pool": "agents"}}"#,
        )
        .expect("write");
        let ok = PodSettings::defaults_from_file(&file).expect("valid");
        assert_eq!(ok.runtime_class.as_deref(), Some("gvisor"));
        std::fs::write(&file, r#"{"resources": {"limits": {"cpu": "lots"}}}"#).expect("write");
        let e = PodSettings::defaults_from_file(&file).expect_err("not a quantity");
        assert!(e.contains("resources.limits.cpu"), "{e}");
        std::fs::write(&file, r#"{"runtime": "gvisor"}"#).expect("write");
        let e = PodSettings::defaults_from_file(&file).expect_err("unknown field");
        assert!(e.contains("runtime"), "{e}");
        std::fs::write(&file, "runtime_class: gvisor").expect("write");
        let e = PodSettings::defaults_from_file(&file).expect_err("not JSON");
        assert!(e.contains("not JSON"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
