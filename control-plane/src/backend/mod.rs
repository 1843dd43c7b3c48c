//! Runtime backends: where a workspace's process runs. One trait, [`Backend`]; `local`
//! (child processes, the default on one machine) and `kubernetes` (a pod per workspace).
//! [`BackendConfig`] and [`AnyBackend`] are the one place that lists them: adding a backend
//! is its own module and a variant there.

pub mod kubernetes;
pub mod local;
pub mod log_file;
pub mod model_keys;
pub mod uid_range;

use std::future::Future;

use warren_schema::events::WorkspacePhase;

/// What a backend needs to start a workspace.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkspaceSpec {
    pub name: String,
    /// The agents that live in it, with their drivers and settings (the backend gives each
    /// the model keys its `allowed_keys` names).
    pub agents: Vec<warren_schema::launch::AgentLaunch>,
    /// How its inbox consumers redeliver (the control plane makes them with it, and the
    /// runtime dead-letters by it).
    pub tuning: warren_schema::launch::Tuning,
    /// The `workspace.start_decided` event this start acts on (a pod is annotated with it).
    pub decision: Option<warren_schema::EventId>,
    /// The decision's trace (`traceparent`): starting it is a span in that trace.
    pub traceparent: Option<String>,
}

impl WorkspaceSpec {
    /// The names of its agents.
    pub fn agent_names(&self) -> Vec<String> {
        self.agents.iter().map(|a| a.name.clone()).collect()
    }
}

/// Something the backend saw happen to a workspace's process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    pub workspace: String,
    pub phase: WorkspacePhase,
    /// Process id or pod name.
    pub instance: Option<String>,
    pub detail: Option<String>,
    /// Stopped at a takeover to be started again under the decision in force (see
    /// [`WorkspaceObserved::replaced`](warren_schema::events::WorkspaceObserved)).
    pub replaced: bool,
    /// The start decision the instance was made for: the observation's cause, so that
    /// `explain` leads from the decision to the process or pod.
    pub decision: Option<warren_schema::EventId>,
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("starting workspace {workspace}: {source}")]
    Start {
        workspace: String,
        source: std::io::Error,
    },
    #[error("NATS credentials for workspace {workspace}: {source}")]
    Credentials {
        workspace: String,
        source: crate::nats_auth::AuthError,
    },
    #[error("stopping workspace {workspace}: {message}")]
    Stop { workspace: String, message: String },
    #[error("workspace {workspace}: {action}: {source}")]
    Kubernetes {
        workspace: String,
        action: &'static str,
        source: Box<kube::Error>,
    },
    #[error("setting up the {backend} backend: {source}")]
    Setup {
        backend: &'static str,
        source: std::io::Error,
    },
}

/// A place to run workspaces. Starting a running workspace and stopping a stopped one are
/// no-ops, so a reconciler may repeat itself.
pub trait Backend: Send + Sync {
    /// `local` or `kubernetes`: recorded on every observation.
    fn name(&self) -> &'static str;
    /// Workspaces with a live process.
    fn running(&self) -> impl Future<Output = Vec<String>> + Send;
    /// Workspaces whose process ended but whose instance is kept for inspection (a failed
    /// pod, for `kubectl logs`); `stop` removes it. None where nothing outlives its process.
    fn ended(&self) -> impl Future<Output = Vec<String>> + Send {
        std::future::ready(Vec::new())
    }
    fn start(&self, spec: &WorkspaceSpec) -> impl Future<Output = Result<(), BackendError>> + Send;
    fn stop(&self, workspace: &str) -> impl Future<Output = Result<(), BackendError>> + Send;
    /// What happened since the last call, oldest first.
    fn drain_observations(&self) -> Vec<Observation>;
    /// Puts back observations that were drained but not recorded (the leadership ended, or
    /// the log failed, in between): they are the oldest, so they go first, and the next
    /// drain hands them out again. The backend reports each change once; one it dropped
    /// would never be recorded.
    fn return_observations(&self, unrecorded: Vec<Observation>);
    /// Notified whenever an observation is added.
    fn observed(&self) -> &tokio::sync::Notify;
    /// This replica stops leading (shut down): what the backend does with the workspaces it
    /// runs. `local` stops its child processes (a new control plane would not adopt them);
    /// a backend whose workspaces outlive the control plane leaves them running.
    fn hand_over(&self) -> impl Future<Output = ()> + Send;
}

/// Which backend runs workspaces, as configured (`--backend`).
#[derive(Debug, Clone)]
// Made once per process: the size of its variants does not matter.
#[allow(clippy::large_enum_variant)]
pub enum BackendConfig {
    Local(local::LocalConfig),
    Kubernetes(kubernetes::KubernetesConfig),
}

impl From<kubernetes::KubernetesConfig> for BackendConfig {
    fn from(config: kubernetes::KubernetesConfig) -> Self {
        Self::Kubernetes(config)
    }
}

impl From<local::LocalConfig> for BackendConfig {
    fn from(config: local::LocalConfig) -> Self {
        Self::Local(config)
    }
}

impl BackendConfig {
    /// Makes the backend. Call it only once this replica leads: a backend may act on what
    /// it finds (the local one stops runtimes a previous control plane left).
    pub async fn build(&self) -> Result<AnyBackend, BackendError> {
        match self {
            Self::Local(config) => local::LocalBackend::new(config.clone())
                .map(AnyBackend::Local)
                .map_err(|source| BackendError::Setup {
                    backend: "local",
                    source,
                }),
            Self::Kubernetes(config) => kubernetes::KubernetesBackend::new(config.clone())
                .await
                .map(AnyBackend::Kubernetes),
        }
    }
}

/// The configured backend.
#[derive(Debug, Clone)]
pub enum AnyBackend {
    Local(local::LocalBackend),
    Kubernetes(kubernetes::KubernetesBackend),
}

impl Backend for AnyBackend {
    fn name(&self) -> &'static str {
        match self {
            Self::Local(b) => b.name(),
            Self::Kubernetes(b) => b.name(),
        }
    }

    async fn running(&self) -> Vec<String> {
        match self {
            Self::Local(b) => b.running().await,
            Self::Kubernetes(b) => b.running().await,
        }
    }

    async fn ended(&self) -> Vec<String> {
        match self {
            Self::Local(b) => b.ended().await,
            Self::Kubernetes(b) => b.ended().await,
        }
    }

    async fn start(&self, spec: &WorkspaceSpec) -> Result<(), BackendError> {
        match self {
            Self::Local(b) => b.start(spec).await,
            Self::Kubernetes(b) => b.start(spec).await,
        }
    }

    async fn stop(&self, workspace: &str) -> Result<(), BackendError> {
        match self {
            Self::Local(b) => b.stop(workspace).await,
            Self::Kubernetes(b) => b.stop(workspace).await,
        }
    }

    fn drain_observations(&self) -> Vec<Observation> {
        match self {
            Self::Local(b) => b.drain_observations(),
            Self::Kubernetes(b) => b.drain_observations(),
        }
    }

    fn return_observations(&self, unrecorded: Vec<Observation>) {
        match self {
            Self::Local(b) => b.return_observations(unrecorded),
            Self::Kubernetes(b) => b.return_observations(unrecorded),
        }
    }

    fn observed(&self) -> &tokio::sync::Notify {
        match self {
            Self::Local(b) => b.observed(),
            Self::Kubernetes(b) => b.observed(),
        }
    }

    async fn hand_over(&self) {
        match self {
            Self::Local(b) => b.hand_over().await,
            Self::Kubernetes(b) => b.hand_over().await,
        }
    }
}
