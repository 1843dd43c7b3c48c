//! The `kubernetes` backend: a pod per workspace on the shared ReadWriteMany claim.
//!
//! - [`objects`] builds what is applied (pod, Secret, NetworkPolicy, the anchor that owns
//!   them), [`settings`] checks per-agent pod settings, [`observe`] reads a pod's status,
//!   [`budget`] keeps the calls within a rate and retries transient errors. This file does
//!   the I/O.
//! - **Apply:** server-side apply under one field manager ([`objects::FIELD_MANAGER`]); the
//!   pod's name derives from the workspace, so a retry or a second leader never makes a
//!   twin. Delete treats 404 as done.
//! - **Watch:** a kube-runtime watcher follows the installation's pods. Every change of a
//!   pod's phase becomes an [`Observation`] (scheduled, ready, failed with its reason,
//!   exited, gone). After a watch error or a 410 it lists again, and a pod that vanished
//!   meanwhile is reported gone: no change is missed.
//! - **Ownership:** pods outlive the control plane ([`Backend::hand_over`] leaves them
//!   running). A new leader finds them by label: a pod whose workspace the decisions want
//!   running is adopted as it is; any other is deleted by the reconciler, which records it.
//! - **Credentials:** a workspace's NATS credentials and allowed model keys are in its
//!   Secret, read by the pod as files, and the NATS credentials are renewed (under a field
//!   manager of their own) at half their lifetime.

pub mod budget;
pub mod objects;
pub mod observe;
pub mod settings;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, DeleteParams, Patch, PatchParams, Preconditions};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, instrument, warn};
use warren_schema::events::WorkspacePhase;
use warren_schema::launch::{LaunchContract, NatsLaunch, TelemetryLaunch};

use self::budget::Budget;
use self::objects::{Egress, PodTemplate};
use super::{Backend, BackendError, Observation, WorkspaceSpec, model_keys};
use crate::nats_auth::Issuer;

/// The field manager of credential renewals (only `data["nats.creds"]` of a Secret).
const RENEWAL_MANAGER: &str = "warren-control-plane-renewal";

/// How the kubernetes backend reaches the cluster and what it makes there.
#[derive(Debug, Clone)]
pub struct KubernetesConfig {
    /// A kubeconfig file; unset: the in-cluster service account (or `KUBECONFIG`).
    pub kubeconfig: Option<PathBuf>,
    pub template: PodTemplate,
    /// NATS as the pods reach it (a cluster address, not the control plane's).
    pub nats_url: String,
    pub nats_prefix: String,
    /// Signs each workspace's NATS credentials.
    pub credentials: Option<Arc<Issuer>>,
    /// The operator's model keys (see [`model_keys`]).
    pub model_keys: Option<PathBuf>,
    pub telemetry: TelemetryLaunch,
    /// Where workspace pods may connect besides DNS (NATS, model APIs).
    pub egress: Vec<Egress>,
    /// Calls in flight at once.
    pub concurrency: usize,
    /// Writes (apply, delete) per second, on average.
    pub writes_per_second: f64,
}

impl KubernetesConfig {
    pub fn new(namespace: impl Into<String>, nats_url: impl Into<String>) -> Self {
        Self {
            kubeconfig: None,
            template: PodTemplate::new(namespace),
            nats_url: nats_url.into(),
            nats_prefix: "warren".into(),
            credentials: None,
            model_keys: None,
            telemetry: TelemetryLaunch::default(),
            egress: Vec::new(),
            concurrency: 16,
            writes_per_second: 50.0,
        }
    }
}

/// What the watcher knows.
#[derive(Debug, Default)]
struct Watched {
    /// Workspace → its pod, as last seen.
    pods: BTreeMap<String, Pod>,
    /// Pod uid → the last phase reported for it.
    reported: BTreeMap<String, (WorkspacePhase, Option<String>)>,
    /// Uids of pods this control plane deleted (their end is not a failure).
    deleting: BTreeSet<String>,
    observations: Vec<Observation>,
    /// Workspace → when its NATS credentials were last issued.
    issued: BTreeMap<String, tokio::time::Instant>,
}

#[derive(Debug)]
struct Shared {
    config: KubernetesConfig,
    pods: Api<Pod>,
    secrets: Api<Secret>,
    budget: Budget,
    owner: OwnerReference,
    watched: Mutex<Watched>,
    /// True once the first list is in.
    synced: watch::Sender<bool>,
    /// A pod changed (start waits on it for an old pod to go).
    changed: Notify,
    /// An observation was added.
    observed: Notify,
    /// Ends the watcher and the renewals with the backend.
    stop: CancellationToken,
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A pod per workspace.
#[derive(Debug, Clone)]
pub struct KubernetesBackend {
    shared: Arc<Shared>,
}

fn kube_error(workspace: &str, action: &'static str) -> impl Fn(kube::Error) -> BackendError {
    let workspace = workspace.to_owned();
    move |source| BackendError::Kubernetes {
        workspace: workspace.clone(),
        action,
        source: Box::new(source),
    }
}

fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

/// The workspace a pod belongs to (its label).
fn workspace_of(pod: &Pod) -> Option<String> {
    pod.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(objects::WORKSPACE_LABEL).cloned())
}

/// The start decision a pod was made for (its annotation).
fn decision_of(pod: &Pod) -> Option<warren_schema::EventId> {
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(objects::DECISION_ANNOTATION))
        .and_then(|d| d.parse::<uuid::Uuid>().ok())
        .map(warren_schema::EventId)
}

/// How observations name a pod: its name and uid (a recreated pod is another instance).
fn instance_of(pod: &Pod) -> String {
    let uid = pod.metadata.uid.as_deref().unwrap_or_default();
    format!(
        "{}/{}",
        pod.metadata.name.as_deref().unwrap_or_default(),
        uid.get(..8).unwrap_or(uid)
    )
}

/// Builds a client from `kubeconfig`, or from the environment.
pub async fn client(kubeconfig: Option<&std::path::Path>) -> Result<kube::Client, BackendError> {
    let setup = |message: String| BackendError::Setup {
        backend: "kubernetes",
        source: std::io::Error::other(message),
    };
    let config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| setup(format!("reading {}: {e}", path.display())))?;
            kube::Config::from_custom_kubeconfig(file, &Default::default())
                .await
                .map_err(|e| setup(format!("{}: {e}", path.display())))?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| setup(format!("no kubeconfig and not in a cluster: {e}")))?,
    };
    kube::Client::try_from(config).map_err(|e| setup(e.to_string()))
}

impl KubernetesBackend {
    /// Connects, applies the installation's anchor and NetworkPolicy, and starts following
    /// its pods.
    pub async fn new(config: KubernetesConfig) -> Result<Self, BackendError> {
        let client = client(config.kubeconfig.as_deref()).await?;
        let namespace = config.template.namespace.clone();
        let budget = Budget::new(config.concurrency, config.writes_per_second);
        let setup = |what: &'static str| {
            move |e: kube::Error| BackendError::Setup {
                backend: "kubernetes",
                source: std::io::Error::other(format!("{what}: {e}")),
            }
        };
        let apply = PatchParams::apply(objects::FIELD_MANAGER).force();
        let anchor = config.template.anchor();
        let anchors: Api<ConfigMap> = Api::namespaced(client.clone(), &namespace);
        let anchor_name = config.template.anchor_name();
        let patch = Patch::Apply(&anchor);
        let anchor = budget
            .call("apply anchor", true, || {
                anchors.patch(&anchor_name, &apply, &patch)
            })
            .await
            .map_err(setup("applying the installation's anchor ConfigMap"))?;
        let policies: Api<NetworkPolicy> = Api::namespaced(client.clone(), &namespace);
        let policy = config.template.network_policy(&config.egress);
        let patch = Patch::Apply(&policy);
        budget
            .call("apply network policy", true, || {
                policies.patch(&anchor_name, &apply, &patch)
            })
            .await
            .map_err(setup("applying the workspaces' NetworkPolicy"))?;
        let (synced, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            pods: Api::namespaced(client.clone(), &namespace),
            secrets: Api::namespaced(client, &namespace),
            owner: objects::owner_reference(&anchor),
            config,
            budget,
            watched: Mutex::new(Watched::default()),
            synced,
            changed: Notify::new(),
            observed: Notify::new(),
            stop: CancellationToken::new(),
        });
        let backend = Self { shared };
        tokio::spawn(
            follow_pods(Arc::downgrade(&backend.shared), backend.shared.stop.clone())
                .instrument(info_span!("pod_watcher")),
        );
        if let Some(every) = backend
            .shared
            .config
            .credentials
            .as_ref()
            .and_then(|i| i.lifetime())
        {
            tokio::spawn(
                renew_credentials(Arc::downgrade(&backend.shared), every / 2)
                    .instrument(info_span!("credential_renewal")),
            );
        }
        Ok(backend)
    }

    /// The API of the installation's pods (as the control plane's identity).
    pub fn pods(&self) -> &Api<Pod> {
        &self.shared.pods
    }

    async fn synced(&self) {
        let mut synced = self.shared.synced.subscribe();
        let _ = synced.wait_for(|s| *s).await;
    }

    /// Workspaces whose pod (as last watched) satisfies `keep`.
    async fn pods_where(&self, keep: impl Fn(&Pod) -> bool) -> Vec<String> {
        self.synced().await;
        self.shared
            .watched
            .lock()
            .map(|w| {
                w.pods
                    .iter()
                    .filter(|(_, pod)| keep(pod))
                    .map(|(name, _)| name.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn pod_of(&self, workspace: &str) -> Option<Pod> {
        self.shared
            .watched
            .lock()
            .ok()
            .and_then(|w| w.pods.get(workspace).cloned())
    }

    /// Deletes `pod` (only that instance: a precondition on its uid), 404 being done.
    async fn delete_pod(&self, workspace: &str, pod: &Pod) -> Result<(), BackendError> {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let uid = pod.metadata.uid.clone();
        if let (Ok(mut w), Some(uid)) = (self.shared.watched.lock(), &uid) {
            w.deleting.insert(uid.clone());
        }
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                uid,
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        let pods = &self.shared.pods;
        match self
            .shared
            .budget
            .call("delete pod", true, || pods.delete(&name, &params))
            .await
        {
            Ok(_) => Ok(()),
            // Gone already, or a newer pod took the name (the precondition failed).
            Err(e) if is_not_found(&e) || matches!(&e, kube::Error::Api(s) if s.code == 409) => {
                Ok(())
            }
            Err(e) => Err(kube_error(workspace, "deleting its pod")(e)),
        }
    }

    /// Waits until `workspace`'s pod `uid` is gone, at most `limit`.
    async fn wait_gone(&self, workspace: &str, uid: &str, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let changed = self.shared.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let present = self
                .pod_of(workspace)
                .is_some_and(|p| p.metadata.uid.as_deref() == Some(uid));
            if !present {
                return true;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return false;
            }
        }
    }

    /// The launch contract and Secret contents of `spec`.
    fn secret_data(&self, spec: &WorkspaceSpec) -> Result<BTreeMap<String, String>, BackendError> {
        let config = &self.shared.config;
        let error = |source| BackendError::Start {
            workspace: spec.name.clone(),
            source,
        };
        let mut data = BTreeMap::new();
        let mut contract = LaunchContract::new(
            &spec.name,
            PodTemplate::workspace_dir(),
            NatsLaunch::new(&config.nats_url, &config.nats_prefix),
        );
        contract.agents = spec.agents.clone();
        for agent in &mut contract.agents {
            agent.keys.clear();
            let keys =
                model_keys::allowed(config.model_keys.as_deref(), &agent.name, &agent.settings)
                    .map_err(error)?;
            for (name, value) in keys {
                let key = PodTemplate::model_key(&name);
                agent.keys.insert(name, PodTemplate::credentials_path(&key));
                data.insert(key, value);
            }
        }
        contract.shared_dir = Some(PodTemplate::shared_dir());
        contract.telemetry = config.telemetry.clone();
        contract.tuning = spec.tuning.clone();
        if let Some(issuer) = &config.credentials {
            let creds = issuer
                .workspace_credentials(&spec.name, &spec.agent_names())
                .map_err(|source| BackendError::Credentials {
                    workspace: spec.name.clone(),
                    source,
                })?;
            data.insert(objects::NATS_CREDS_KEY.into(), creds.expose().to_owned());
            contract.nats.credentials =
                Some(PodTemplate::credentials_path(objects::NATS_CREDS_KEY));
        }
        data.insert(objects::LAUNCH_KEY.into(), contract.to_json());
        Ok(data)
    }

    /// Applies `workspace`'s pod as `decision` would make it (server-side apply: applying
    /// the same twice changes nothing). Returns the pod as the server has it.
    pub async fn apply_pod(&self, spec: &WorkspaceSpec) -> Result<Pod, BackendError> {
        let pod_settings =
            settings::for_workspace(spec.agents.iter().map(|a| (a.name.as_str(), &a.settings)))
                .map_err(|message| BackendError::Start {
                    workspace: spec.name.clone(),
                    source: std::io::Error::other(message),
                })?;
        let template = &self.shared.config.template;
        let decision = spec.decision.map(|d| d.to_string());
        let pod = template.pod(
            &spec.name,
            decision.as_deref(),
            &spec.agent_names(),
            &pod_settings,
            &self.shared.owner,
        );
        let name = template.object_name(&spec.name);
        let apply = PatchParams::apply(objects::FIELD_MANAGER).force();
        let pods = &self.shared.pods;
        let patch = Patch::Apply(&pod);
        self.shared
            .budget
            .call("apply pod", true, || pods.patch(&name, &apply, &patch))
            .await
            .map_err(kube_error(&spec.name, "applying its pod"))
    }
}

impl Backend for KubernetesBackend {
    fn name(&self) -> &'static str {
        "kubernetes"
    }

    async fn running(&self) -> Vec<String> {
        self.pods_where(observe::is_live).await
    }

    /// Pods that ended and are not being deleted already.
    async fn ended(&self) -> Vec<String> {
        self.pods_where(|pod| !observe::is_live(pod) && pod.metadata.deletion_timestamp.is_none())
            .await
    }

    #[instrument(skip_all, fields(workspace = %spec.name, decision = ?spec.decision), err)]
    async fn start(&self, spec: &WorkspaceSpec) -> Result<(), BackendError> {
        self.synced().await;
        // A live pod is kept as it is (started already, or adopted from a previous leader);
        // a finished or stuck one is deleted first, and its end awaited.
        if let Some(pod) = self.pod_of(&spec.name) {
            if observe::is_live(&pod) {
                return Ok(());
            }
            // Made for this very decision, and ended: its end is for the decisions to act
            // on (a restart is a new decision). A new leader, which does not know what its
            // predecessor acted on, must not start it again behind their back.
            if spec.decision.is_some() && decision_of(&pod) == spec.decision {
                info!(pod = %instance_of(&pod), "the pod made for this decision has ended; left to the decisions");
                return Ok(());
            }
            let uid = pod.metadata.uid.clone().unwrap_or_default();
            if pod.metadata.deletion_timestamp.is_none() {
                info!(pod = %instance_of(&pod), "deleting the workspace's finished pod first");
                self.delete_pod(&spec.name, &pod).await?;
            }
            let grace = pod
                .spec
                .as_ref()
                .and_then(|s| s.termination_grace_period_seconds)
                .unwrap_or(30);
            let limit = Duration::from_secs(u64::try_from(grace).unwrap_or(30) + 30);
            if !self.wait_gone(&spec.name, &uid, limit).await {
                return Err(BackendError::Stop {
                    workspace: spec.name.clone(),
                    message: format!(
                        "its previous pod {} was not gone after {limit:?}",
                        instance_of(&pod)
                    ),
                });
            }
        }
        let data = self.secret_data(spec)?;
        let template = &self.shared.config.template;
        let secret = template.secret(&spec.name, data, &self.shared.owner);
        let name = template.object_name(&spec.name);
        let apply = PatchParams::apply(objects::FIELD_MANAGER).force();
        let secrets = &self.shared.secrets;
        let patch = Patch::Apply(&secret);
        self.shared
            .budget
            .call("apply secret", true, || {
                secrets.patch(&name, &apply, &patch)
            })
            .await
            .map_err(kube_error(&spec.name, "applying its Secret"))?;
        if let Ok(mut w) = self.shared.watched.lock() {
            w.issued
                .insert(spec.name.clone(), tokio::time::Instant::now());
        }
        let pod = self.apply_pod(spec).await?;
        info!(pod = %instance_of(&pod), "pod applied");
        Ok(())
    }

    #[instrument(skip(self), err)]
    async fn stop(&self, workspace: &str) -> Result<(), BackendError> {
        if let Some(pod) = self.pod_of(workspace)
            && pod.metadata.deletion_timestamp.is_none()
        {
            self.delete_pod(workspace, &pod).await?;
        }
        // Its credentials go with it (the pod keeps the files it has until it ends).
        let name = self.shared.config.template.object_name(workspace);
        let secrets = &self.shared.secrets;
        let params = DeleteParams::default();
        match self
            .shared
            .budget
            .call("delete secret", true, || secrets.delete(&name, &params))
            .await
        {
            Ok(_) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(kube_error(workspace, "deleting its Secret")(e)),
        }
        if let Ok(mut w) = self.shared.watched.lock() {
            w.issued.remove(workspace);
        }
        Ok(())
    }

    fn drain_observations(&self) -> Vec<Observation> {
        self.shared
            .watched
            .lock()
            .map(|mut w| std::mem::take(&mut w.observations))
            .unwrap_or_default()
    }

    fn return_observations(&self, unrecorded: Vec<Observation>) {
        if let Ok(mut w) = self.shared.watched.lock() {
            w.observations.splice(0..0, unrecorded);
        }
        self.shared.observed.notify_one();
    }

    fn observed(&self) -> &Notify {
        &self.shared.observed
    }

    /// Leaves every pod running: the next leader adopts them.
    async fn hand_over(&self) {
        info!("handing over: workspace pods keep running for the next leader to adopt");
        self.shared.stop.cancel();
    }
}

impl Shared {
    /// Records what `pod` now says, when it says something new.
    fn saw(&self, mut pod: Pod) {
        // Kept per workspace, with only what is read: metadata (without the field
        // managers), status, and of the spec the node and the grace period. The containers,
        // volumes and field managers are most of a pod's size, and 10,000 pods are kept.
        pod.metadata.managed_fields = None;
        pod.spec = pod.spec.map(|spec| k8s_openapi::api::core::v1::PodSpec {
            node_name: spec.node_name,
            termination_grace_period_seconds: spec.termination_grace_period_seconds,
            ..Default::default()
        });
        let Some(workspace) = workspace_of(&pod) else {
            return;
        };
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let Ok(mut w) = self.watched.lock() else {
            return;
        };
        if let Some((phase, detail)) = observe::phase_of(&pod)
            && w.reported.get(&uid) != Some(&(phase, detail.clone()))
        {
            w.reported.insert(uid, (phase, detail.clone()));
            w.observations.push(Observation {
                workspace: workspace.clone(),
                phase,
                instance: Some(instance_of(&pod)),
                detail,
                replaced: false,
                decision: decision_of(&pod),
            });
            self.observed.notify_one();
        }
        w.pods.insert(workspace, pod);
        drop(w);
        self.changed.notify_waiters();
    }

    /// Records that `pod` is gone.
    fn gone(&self, pod: &Pod) {
        let Some(workspace) = workspace_of(pod) else {
            return;
        };
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let Ok(mut w) = self.watched.lock() else {
            return;
        };
        if w.pods
            .get(&workspace)
            .is_some_and(|p| p.metadata.uid.as_deref() == Some(uid.as_str()))
        {
            w.pods.remove(&workspace);
        }
        w.reported.remove(&uid);
        let (phase, detail) = if w.deleting.remove(&uid) {
            (WorkspacePhase::Exited, "pod deleted by the control plane")
        } else {
            (
                WorkspacePhase::Gone,
                "pod deleted by someone else, or its node went away",
            )
        };
        w.observations.push(Observation {
            workspace,
            phase,
            instance: Some(instance_of(pod)),
            detail: Some(detail.into()),
            replaced: false,
            decision: decision_of(pod),
        });
        drop(w);
        self.observed.notify_one();
        self.changed.notify_waiters();
    }
}

/// Follows the installation's pods until `stop` (or the backend is dropped).
async fn follow_pods(shared: std::sync::Weak<Shared>, stop: CancellationToken) {
    let Some(strong) = shared.upgrade() else {
        return;
    };
    let selector = strong.config.template.selector();
    let stream = watcher::watcher(
        strong.pods.clone(),
        watcher::Config::default().labels(&selector),
    )
    .default_backoff();
    drop(strong);
    tokio::pin!(stream);
    // Pods seen in the current (re-)list; what the store holds and the list lacks went
    // away while the watch was down.
    let mut listed: Option<BTreeSet<String>> = None;
    loop {
        let event = tokio::select! {
            () = stop.cancelled() => return,
            event = stream.next() => event,
        };
        let Some(event) = event else { return };
        let Some(shared) = shared.upgrade() else {
            return;
        };
        match event {
            Ok(Event::Init) => listed = Some(BTreeSet::new()),
            Ok(Event::InitApply(pod)) => {
                if let (Some(listed), Some(uid)) = (listed.as_mut(), &pod.metadata.uid) {
                    listed.insert(uid.clone());
                }
                shared.saw(pod);
            }
            Ok(Event::InitDone) => {
                let listed = listed.take().unwrap_or_default();
                let vanished: Vec<Pod> = shared
                    .watched
                    .lock()
                    .map(|w| {
                        w.pods
                            .values()
                            .filter(|p| {
                                !listed.contains(p.metadata.uid.as_deref().unwrap_or_default())
                            })
                            .cloned()
                            .collect()
                    })
                    .unwrap_or_default();
                for pod in &vanished {
                    shared.gone(pod);
                }
                shared.synced.send_replace(true);
            }
            Ok(Event::Apply(pod)) => shared.saw(pod),
            Ok(Event::Delete(pod)) => shared.gone(&pod),
            Err(e) => {
                metrics::counter!("warren_kubernetes_watch_errors_total").increment(1);
                warn!(error = %e, "pod watch failed; resuming");
            }
        }
    }
}

/// Re-issues the NATS credentials of every live workspace pod whose credentials are older
/// than `every` (all of them after a takeover: their age is unknown).
async fn renew_credentials(shared: std::sync::Weak<Shared>, every: Duration) {
    let tick = (every / 4).clamp(Duration::from_secs(1), Duration::from_secs(60));
    loop {
        let Some(strong) = shared.upgrade() else {
            return;
        };
        let stop = strong.stop.clone();
        drop(strong);
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(tick) => {}
        }
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let due: Vec<(String, Vec<String>)> = shared
            .watched
            .lock()
            .map(|w| {
                w.pods
                    .iter()
                    .filter(|(name, pod)| {
                        observe::is_live(pod)
                            && w.issued.get(*name).is_none_or(|at| at.elapsed() >= every)
                    })
                    .map(|(name, pod)| {
                        let agents = pod
                            .metadata
                            .annotations
                            .as_ref()
                            .and_then(|a| a.get(objects::AGENTS_ANNOTATION))
                            .map(|a| {
                                a.split(',')
                                    .filter(|s| !s.is_empty())
                                    .map(str::to_owned)
                                    .collect()
                            })
                            .unwrap_or_default();
                        (name.clone(), agents)
                    })
                    .collect()
            })
            .unwrap_or_default();
        for (workspace, agents) in due {
            if let Err(e) = renew(&shared, &workspace, &agents).await {
                warn!(workspace, error = %e, "could not renew the workspace's NATS credentials");
            }
        }
    }
}

async fn renew(shared: &Shared, workspace: &str, agents: &[String]) -> Result<(), BackendError> {
    let Some(issuer) = &shared.config.credentials else {
        return Ok(());
    };
    let creds = issuer
        .workspace_credentials(workspace, agents)
        .map_err(|source| BackendError::Credentials {
            workspace: workspace.to_owned(),
            source,
        })?;
    let name = shared.config.template.object_name(workspace);
    let patch = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": shared.config.template.namespace},
        "data": {objects::NATS_CREDS_KEY: base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD, creds.expose())},
    });
    let apply = PatchParams::apply(RENEWAL_MANAGER).force();
    let patch = Patch::Apply(&patch);
    shared
        .budget
        .call("renew credentials", true, || {
            shared.secrets.patch(&name, &apply, &patch)
        })
        .await
        .map_err(kube_error(workspace, "renewing its NATS credentials"))?;
    if let Ok(mut w) = shared.watched.lock() {
        w.issued
            .insert(workspace.to_owned(), tokio::time::Instant::now());
    }
    info!(workspace, "NATS credentials renewed");
    Ok(())
}
