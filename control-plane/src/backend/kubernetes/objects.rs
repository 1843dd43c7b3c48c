//! The Kubernetes objects of a workspace, built from its spec (pure: no I/O).
//!
//! Per workspace, in the configured namespace:
//! - a **Pod** `{instance}-{workspace}` (deterministic: a retry or a second leader applies
//!   the same name, never a twin), restricted by Pod Security, its working directory the
//!   workspace's `subPath` of the shared claim, the shared directory beside it, `/tmp` an
//!   emptyDir under a read-only root; annotated with the decision that started it;
//! - a **Secret** of the same name: its launch contract (`launch.json`), its NATS
//!   credentials (`nats.creds`) and the model keys its agents are allowed (`key.{NAME}`),
//!   mounted as files.
//!
//! Per installation: the **anchor** ConfigMap `{instance}-workspaces` that owns every pod
//! and Secret (delete it, or uninstall, and the garbage collector removes them) and one
//! **NetworkPolicy** over all workspace pods: no ingress; egress to DNS, NATS and the model
//! endpoints only.

use std::collections::BTreeMap;
use std::path::PathBuf;

use base64::Engine as _;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use serde_json::json;

use super::settings::{Amounts, PodSettings, Resources};

/// The field manager of every object Warren applies.
pub const FIELD_MANAGER: &str = "warren-control-plane";
/// Label: the workspace a pod or Secret belongs to.
pub const WORKSPACE_LABEL: &str = "warren.dev/workspace";
/// Annotation: the id of the `workspace.start_decided` event that made the pod.
pub const DECISION_ANNOTATION: &str = "warren.dev/decision";
/// Annotation: the agents the pod hosts (what its NATS credentials allow).
pub const AGENTS_ANNOTATION: &str = "warren.dev/agents";
/// The container's name.
pub const CONTAINER: &str = "runtime";

/// Where things are inside the pod.
pub const WORKSPACE_DIR: &str = "/workspace";
pub const SHARED_DIR: &str = "/shared";
pub const CREDENTIALS_DIR: &str = "/var/run/secrets/warren";
/// The Secret's key holding the launch contract (the runtime's `WARREN_LAUNCH`).
pub const LAUNCH_KEY: &str = "launch.json";
pub const NATS_CREDS_KEY: &str = "nats.creds";

/// The part of the backend's configuration the objects depend on.
#[derive(Debug, Clone, PartialEq)]
pub struct PodTemplate {
    pub namespace: String,
    /// The installation's name: prefixes object names, `app.kubernetes.io/instance`.
    pub instance: String,
    /// The runtime image, unless an agent's settings name another.
    pub image: String,
    pub command: Vec<String>,
    /// The ReadWriteMany claim holding `workspaces/{name}` and `shared/`.
    pub claim: String,
    /// The non-root user and group the runtime runs as (also the pod's fsGroup).
    pub run_as: i64,
    /// Requests and limits where neither an agent's settings nor [`Self::defaults`] name
    /// any.
    pub resources: Resources,
    /// The operator's pod settings for every workspace (`--kube-pod-defaults`); an agent's
    /// `settings.pod` overrides them field by field.
    pub defaults: PodSettings,
    pub stop_grace_secs: i64,
    /// `PATH` inside the container.
    pub path: String,
}

impl PodTemplate {
    /// Defaults for an installation named `warren` in `namespace`.
    pub fn new(namespace: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            instance: "warren".into(),
            image: "ghcr.io/warren-dev/warren-workspace-runtime:0.1.0".into(),
            command: vec!["warren-workspace-runtime".into()],
            claim: "warren-files".into(),
            run_as: 10001,
            resources: Resources {
                requests: Some(Amounts {
                    cpu: Some("100m".into()),
                    memory: Some("256Mi".into()),
                }),
                limits: Some(Amounts {
                    cpu: Some("2".into()),
                    memory: Some("2Gi".into()),
                }),
            },
            defaults: PodSettings::default(),
            stop_grace_secs: 30,
            path: "/usr/local/bin:/usr/bin:/bin".into(),
        }
    }

    /// The name of a workspace's pod and Secret. Workspace names are DNS labels (checked
    /// when configured), so this is a valid object name.
    pub fn object_name(&self, workspace: &str) -> String {
        format!("{}-{workspace}", self.instance)
    }

    /// The anchor ConfigMap's name.
    pub fn anchor_name(&self) -> String {
        format!("{}-workspaces", self.instance)
    }

    /// Selects every workspace object of this installation.
    pub fn selector(&self) -> String {
        format!(
            "app.kubernetes.io/component=workspace,app.kubernetes.io/instance={}",
            self.instance
        )
    }

    fn labels(&self, workspace: Option<&str>) -> serde_json::Value {
        let mut labels = json!({
            "app.kubernetes.io/name": "warren-workspace",
            "app.kubernetes.io/component": "workspace",
            "app.kubernetes.io/instance": self.instance,
            "app.kubernetes.io/managed-by": FIELD_MANAGER,
        });
        if let Some(w) = workspace {
            labels[WORKSPACE_LABEL] = json!(w);
        }
        labels
    }

    /// The installation's anchor: owner of every workspace object.
    pub fn anchor(&self) -> ConfigMap {
        from_json(json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": self.anchor_name(),
                "namespace": self.namespace,
                "labels": {
                    "app.kubernetes.io/name": "warren",
                    "app.kubernetes.io/instance": self.instance,
                    "app.kubernetes.io/managed-by": FIELD_MANAGER,
                },
            },
            "data": {
                "purpose": "Owns this installation's workspace pods and Secrets: deleting it \
                            deletes them.",
            },
        }))
    }

    /// Paths the launch contract names, as the pod sees them.
    pub fn workspace_dir() -> PathBuf {
        PathBuf::from(WORKSPACE_DIR)
    }

    pub fn shared_dir() -> PathBuf {
        PathBuf::from(SHARED_DIR)
    }

    pub fn credentials_path(key: &str) -> PathBuf {
        PathBuf::from(CREDENTIALS_DIR).join(key)
    }

    /// The key of a model key in the Secret.
    pub fn model_key(name: &str) -> String {
        format!("key.{name}")
    }

    /// A workspace's Secret (`data`: key → value, values secret).
    pub fn secret(
        &self,
        workspace: &str,
        data: BTreeMap<String, String>,
        owner: &OwnerReference,
    ) -> Secret {
        from_json(json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {
                "name": self.object_name(workspace),
                "namespace": self.namespace,
                "labels": self.labels(Some(workspace)),
                "ownerReferences": [owner],
            },
            "type": "Opaque",
            // `data`, not `stringData`: the API server turns stringData into data, and a
            // second apply of it would not compare equal.
            "data": data
                .into_iter()
                .map(|(k, v)| (k, base64::engine::general_purpose::STANDARD.encode(v)))
                .collect::<BTreeMap<_, _>>(),
        }))
    }

    /// A workspace's pod.
    pub fn pod(
        &self,
        workspace: &str,
        decision: Option<&str>,
        agents: &[String],
        settings: &PodSettings,
        owner: &OwnerReference,
    ) -> Pod {
        let name = self.object_name(workspace);
        let settings = &settings.or(&self.defaults);
        let resources = settings.resources.as_ref().unwrap_or(&self.resources);
        let amounts = |a: &Option<Amounts>| {
            let mut m = serde_json::Map::new();
            if let Some(a) = a {
                if let Some(cpu) = &a.cpu {
                    m.insert("cpu".into(), json!(cpu));
                }
                if let Some(memory) = &a.memory {
                    m.insert("memory".into(), json!(memory));
                }
            }
            m
        };
        let mut annotations = serde_json::Map::new();
        if let Some(decision) = decision {
            annotations.insert(DECISION_ANNOTATION.into(), json!(decision));
        }
        annotations.insert(AGENTS_ANNOTATION.into(), json!(agents.join(",")));
        let mut spec = json!({
            // Restarts are decisions: recorded, backed off and given up on by the control
            // plane, so that `explain` can tell why a pod came back.
            "restartPolicy": "Never",
            "automountServiceAccountToken": false,
            "enableServiceLinks": false,
            "terminationGracePeriodSeconds": self.stop_grace_secs,
            "securityContext": {
                "runAsNonRoot": true,
                "runAsUser": self.run_as,
                "runAsGroup": self.run_as,
                "fsGroup": self.run_as,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "containers": [{
                "name": CONTAINER,
                "image": settings.image.as_deref().unwrap_or(&self.image),
                "command": self.command,
                "workingDir": WORKSPACE_DIR,
                // A failed runtime's last log lines become its termination message, and so
                // the detail of the failure Warren records.
                "terminationMessagePolicy": "FallbackToLogsOnError",
                "env": [
                    {"name": warren_schema::launch::ENV, "valueFrom": {"secretKeyRef": {
                        "name": name, "key": LAUNCH_KEY}}},
                    {"name": "PATH", "value": self.path},
                    {"name": "HOME", "value": WORKSPACE_DIR},
                ],
                "resources": {
                    "requests": amounts(&resources.requests),
                    "limits": amounts(&resources.limits),
                },
                "securityContext": {
                    "allowPrivilegeEscalation": false,
                    "readOnlyRootFilesystem": true,
                    "runAsNonRoot": true,
                    "capabilities": {"drop": ["ALL"]},
                },
                "volumeMounts": [
                    {"name": "files", "mountPath": WORKSPACE_DIR,
                     "subPath": format!("workspaces/{workspace}")},
                    {"name": "files", "mountPath": SHARED_DIR, "subPath": "shared"},
                    {"name": "tmp", "mountPath": "/tmp"},
                    {"name": "credentials", "mountPath": CREDENTIALS_DIR, "readOnly": true},
                ],
            }],
            "volumes": [
                {"name": "files", "persistentVolumeClaim": {"claimName": self.claim}},
                {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}},
                // Group-readable: the files belong to root and the pod's fsGroup.
                {"name": "credentials", "secret": {"secretName": name, "defaultMode": 0o440}},
            ],
        });
        if let Some(class) = &settings.runtime_class {
            spec["runtimeClassName"] = json!(class);
        }
        if let Some(selector) = &settings.node_selector {
            spec["nodeSelector"] = json!(selector);
        }
        if let Some(tolerations) = &settings.tolerations {
            spec["tolerations"] = json!(tolerations);
        }
        if let Some(affinity) = &settings.affinity {
            spec["affinity"] = json!(affinity);
        }
        if let Some(class) = &settings.priority_class {
            spec["priorityClassName"] = json!(class);
        }
        from_json(json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": self.namespace,
                "labels": self.labels(Some(workspace)),
                "annotations": annotations,
                "ownerReferences": [owner],
            },
            "spec": spec,
        }))
    }

    /// The one NetworkPolicy over every workspace pod of the installation: no ingress;
    /// egress to DNS and to `egress` only.
    pub fn network_policy(&self, egress: &[Egress]) -> NetworkPolicy {
        let mut rules = vec![json!({
            "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}],
            "to": [{"namespaceSelector": {}}],
        })];
        for e in egress {
            rules.push(json!({
                "to": [{"ipBlock": {"cidr": e.cidr}}],
                "ports": [{"protocol": "TCP", "port": e.port}],
            }));
        }
        from_json(json!({
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {
                "name": self.anchor_name(),
                "namespace": self.namespace,
                "labels": self.labels(None),
            },
            "spec": {
                "podSelector": {"matchLabels": {
                    "app.kubernetes.io/component": "workspace",
                    "app.kubernetes.io/instance": self.instance,
                }},
                "policyTypes": ["Ingress", "Egress"],
                "ingress": [],
                "egress": rules,
            },
        }))
    }
}

/// Where workspace pods may connect: `CIDR:PORT` (NATS, a model API).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Egress {
    pub cidr: String,
    pub port: u16,
}

impl std::str::FromStr for Egress {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (cidr, port) = s
            .rsplit_once(':')
            .ok_or_else(|| format!("{s:?}: use CIDR:PORT, such as 10.0.0.0/8:4222"))?;
        let port: u16 = port
            .parse()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("{s:?}: {port:?} is not a port"))?;
        let (address, bits) = cidr
            .split_once('/')
            .ok_or_else(|| format!("{s:?}: {cidr:?} is not a CIDR (address/bits)"))?;
        let max = match address.parse::<std::net::IpAddr>() {
            Ok(std::net::IpAddr::V4(_)) => 32,
            Ok(std::net::IpAddr::V6(_)) => 128,
            Err(_) => return Err(format!("{s:?}: {address:?} is not an IP address")),
        };
        if bits.parse::<u8>().ok().is_none_or(|b| b > max) {
            return Err(format!("{s:?}: /{bits} is not a prefix length"));
        }
        Ok(Self {
            cidr: cidr.to_owned(),
            port,
        })
    }
}

/// The owner reference to the anchor, given its uid.
pub fn owner_reference(anchor: &ConfigMap) -> OwnerReference {
    OwnerReference {
        api_version: "v1".into(),
        kind: "ConfigMap".into(),
        name: anchor.metadata.name.clone().unwrap_or_default(),
        uid: anchor.metadata.uid.clone().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: None,
    }
}

/// The typed object of a JSON literal above. Every literal here has its type's shape, so
/// this never fails (the unit tests build each one).
fn from_json<T: serde::de::DeserializeOwned + Default>(value: serde_json::Value) -> T {
    serde_json::from_value(value).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner() -> OwnerReference {
        let mut anchor = PodTemplate::new("workspaces").anchor();
        anchor.metadata.uid = Some("0a0a".into());
        owner_reference(&anchor)
    }

    #[test]
    fn a_pod_is_named_for_its_workspace_hardened_and_annotated_with_its_decision() {
        let t = PodTemplate::new("workspaces");
        let pod = t.pod(
            "research",
            Some("01234567-89ab-cdef-0123-456789abcdef"),
            &["alice".into(), "bob".into()],
            &PodSettings::default(),
            &owner(),
        );
        assert_eq!(pod.metadata.name.as_deref(), Some("warren-research"));
        let annotations = pod.metadata.annotations.clone().unwrap_or_default();
        assert_eq!(
            annotations[DECISION_ANNOTATION],
            "01234567-89ab-cdef-0123-456789abcdef"
        );
        assert_eq!(annotations[AGENTS_ANNOTATION], "alice,bob");
        let labels = pod.metadata.labels.clone().unwrap_or_default();
        assert_eq!(labels[WORKSPACE_LABEL], "research");
        let spec = pod.spec.expect("spec");
        assert_eq!(spec.automount_service_account_token, Some(false));
        let security = spec.security_context.expect("pod security");
        assert_eq!(security.run_as_non_root, Some(true));
        assert_eq!(security.fs_group, Some(10001));
        let container = &spec.containers[0];
        let c = container
            .security_context
            .clone()
            .expect("container security");
        assert_eq!(c.allow_privilege_escalation, Some(false));
        assert_eq!(c.read_only_root_filesystem, Some(true));
        assert_eq!(
            c.capabilities.and_then(|c| c.drop),
            Some(vec!["ALL".to_owned()])
        );
        let mounts = container.volume_mounts.clone().unwrap_or_default();
        assert_eq!(mounts[0].sub_path.as_deref(), Some("workspaces/research"));
        assert_eq!(mounts[0].mount_path, WORKSPACE_DIR);
        assert_eq!(
            pod.metadata.owner_references.unwrap_or_default()[0].uid,
            "0a0a"
        );
    }

    #[test]
    fn agent_settings_reach_the_pod_and_defaults_fill_the_rest() {
        let t = PodTemplate::new("workspaces");
        let settings = PodSettings::of(&json!({"pod": {
            "runtime_class": "gvisor",
            "priority_class": "agents",
            "node_selector": {"pool": "agents"},
            "resources": {"limits": {"memory": "4Gi"}},
        }}))
        .expect("valid");
        let spec = t
            .pod("w", None, &[], &settings, &owner())
            .spec
            .expect("spec");
        assert_eq!(spec.runtime_class_name.as_deref(), Some("gvisor"));
        assert_eq!(spec.priority_class_name.as_deref(), Some("agents"));
        let limits = spec.containers[0]
            .resources
            .clone()
            .and_then(|r| r.limits)
            .unwrap_or_default();
        assert_eq!(limits["memory"].0, "4Gi");
        let defaults = t.pod("w", None, &[], &PodSettings::default(), &owner());
        let requests = defaults.spec.expect("spec").containers[0]
            .resources
            .clone()
            .and_then(|r| r.requests)
            .unwrap_or_default();
        assert_eq!(requests["memory"].0, "256Mi");
    }

    #[test]
    fn the_operators_defaults_apply_where_an_agent_sets_nothing() {
        let mut t = PodTemplate::new("workspaces");
        t.defaults = PodSettings::of(&json!({"pod": {
            "runtime_class": "gvisor",
            "node_selector": {"pool": "agents"},
            "tolerations": [{"key": "agents", "operator": "Exists", "effect": "NoSchedule"}],
            "resources": {"limits": {"memory": "1Gi"}},
        }}))
        .expect("valid");
        let plain = t
            .pod("w", None, &[], &PodSettings::default(), &owner())
            .spec
            .expect("spec");
        assert_eq!(plain.runtime_class_name.as_deref(), Some("gvisor"));
        assert_eq!(
            plain
                .node_selector
                .unwrap_or_default()
                .get("pool")
                .map(String::as_str),
            Some("agents")
        );
        assert_eq!(plain.tolerations.unwrap_or_default().len(), 1);
        let limits = plain.containers[0]
            .resources
            .as_ref()
            .and_then(|r| r.limits.clone())
            .unwrap_or_default();
        assert_eq!(limits.get("memory").map(|q| q.0.as_str()), Some("1Gi"));

        let own = PodSettings::of(&json!({"pod": {"runtime_class": "kata"}})).expect("valid");
        let spec = t.pod("w", None, &[], &own, &owner()).spec.expect("spec");
        assert_eq!(
            spec.runtime_class_name.as_deref(),
            Some("kata"),
            "the agent's wins"
        );
        assert!(
            spec.node_selector.is_some(),
            "the rest still from the defaults"
        );
    }

    #[test]
    fn the_network_policy_admits_nothing_in_and_only_the_configured_peers_out() {
        let t = PodTemplate::new("workspaces");
        let nats: Egress = "10.0.0.5/32:4222".parse().expect("valid");
        let policy = t.network_policy(&[nats]);
        let spec = policy.spec.expect("spec");
        assert_eq!(spec.ingress, Some(vec![]));
        let egress = spec.egress.unwrap_or_default();
        assert_eq!(egress.len(), 2, "DNS and NATS");
        let to = egress[1].to.clone().unwrap_or_default();
        assert_eq!(
            to[0].ip_block.as_ref().map(|b| b.cidr.as_str()),
            Some("10.0.0.5/32")
        );
        for bad in [
            "10.0.0.5:4222",
            "10.0.0.5/33:4222",
            "host/8:1",
            "10.0.0.0/8:0",
        ] {
            assert!(bad.parse::<Egress>().is_err(), "{bad}");
        }
    }

    #[test]
    fn the_secret_holds_what_the_runtime_reads_as_files() {
        let t = PodTemplate::new("workspaces");
        let secret = t.secret(
            "w",
            BTreeMap::from([
                (LAUNCH_KEY.to_owned(), "{}".to_owned()),
                (PodTemplate::model_key("OPENAI_API_KEY"), "sk".to_owned()),
            ]),
            &owner(),
        );
        assert_eq!(secret.metadata.name.as_deref(), Some("warren-w"));
        let data = secret.data.unwrap_or_default();
        assert_eq!(data["key.OPENAI_API_KEY"].0, b"sk");
        assert_eq!(
            PodTemplate::credentials_path("key.OPENAI_API_KEY"),
            PathBuf::from("/var/run/secrets/warren/key.OPENAI_API_KEY")
        );
    }
}
