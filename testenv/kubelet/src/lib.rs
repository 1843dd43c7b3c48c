//! A kubelet for tests: the test API server has no nodes, so this binds pods and runs them.
//!
//! It watches pods in one namespace and, for each new one:
//! - **binds** it to its node (the `binding` subresource, as the scheduler would), or
//!   reports it unschedulable when told to;
//! - in [`Mode::Run`], **runs its container** as a local process: the command's program is
//!   looked up in the directory its image maps to (an unknown image is `ErrImagePull`), its
//!   environment resolved through the API (`secretKeyRef`, `configMapKeyRef`), its Secret
//!   volumes written to files (and kept in sync), its claim's `subPath`s created as
//!   directories under [`KubeletConfig::root`] (owned by the pod's user, as an NFS export
//!   with `all_squash` does), `/tmp` a tmpfs. The process runs in mount and pid namespaces
//!   of its own (`unshare`), so it sees its own mounts and processes only, as its user
//!   (`setpriv`, no new privileges, no capabilities), with a read-only root;
//! - reports **status** through the status subresource: Pending → Running → Ready (when
//!   the process prints a line `ready`, the runtime's readiness line), then Succeeded or
//!   Failed with the exit code;
//! - on **delete**, sends SIGTERM, then SIGKILL after the pod's grace period, and removes
//!   the pod (grace period 0), as a kubelet does;
//! - can be told to **fail** a pod ([`Failure`]).
//!
//! In [`Mode::Simulate`] it reports pods Ready without running anything (for benchmarks of
//! thousands of pods).
//!
//! Running containers needs root (mounts, namespaces, users), as a kubelet does.

pub mod fault_proxy;
pub mod testenv;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, KeyToPath, Pod, Secret, ServiceAccount};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, watcher};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

/// How pods are run.
#[derive(Debug, Clone)]
pub enum Mode {
    /// Really run each container.
    Run {
        /// Image → the directory holding its programs (`target/debug` for Warren's).
        images: BTreeMap<String, PathBuf>,
    },
    /// Report each pod Ready without running anything.
    Simulate,
}

/// The kubelet's settings.
#[derive(Debug, Clone)]
pub struct KubeletConfig {
    pub namespace: String,
    /// The node pods are bound to.
    pub node: String,
    /// Only pods matching this label selector (unset: all).
    pub selector: Option<String>,
    /// Holds `claims/{claim}/` (the stand-in for each PersistentVolumeClaim) and
    /// `pods/{uid}/` (secret volumes).
    pub root: PathBuf,
    pub mode: Mode,
    /// How often Secret volumes are refreshed from the API.
    pub secret_sync: Duration,
    /// The API server as pods reach it (`KUBERNETES_SERVICE_HOST`, `_PORT` in every
    /// container, as a kubelet sets them); unset: not set.
    pub api_server: Option<(String, u16)>,
}

impl KubeletConfig {
    pub fn new(namespace: impl Into<String>, root: impl Into<PathBuf>, mode: Mode) -> Self {
        Self {
            namespace: namespace.into(),
            node: "test-node".into(),
            selector: None,
            root: root.into(),
            mode,
            secret_sync: Duration::from_secs(1),
            api_server: None,
        }
    }

    /// The directory standing for the claim `claim`.
    pub fn claim_dir(&self, claim: &str) -> PathBuf {
        self.root.join("claims").join(claim)
    }
}

/// A failure the kubelet can be told to make a pod have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Its image cannot be pulled: it stays Pending, waiting in `ImagePullBackOff`.
    ImagePullBackOff,
    /// It runs, then is killed for memory: Failed, `OOMKilled`, exit code 137.
    OomKilled,
    /// No node fits: it stays Pending, `PodScheduled=False`, reason `Unschedulable`.
    Unschedulable,
    /// Its container keeps crashing: waiting in `CrashLoopBackOff`, last exit code 1.
    CrashLoop,
}

#[derive(Debug, Default)]
struct Pods {
    /// Pod uid → pid of its container's process.
    pids: BTreeMap<String, u32>,
    /// Uids of every pod it has taken on (never forgotten: a second pod for the same
    /// workspace is a second uid).
    handled: BTreeSet<String>,
    /// Pod name → the failure its instances get, until healed.
    failures: BTreeMap<String, Failure>,
    /// Pod uid → cancelled when the pod is deleted.
    deleted: BTreeMap<String, CancellationToken>,
}

#[derive(Debug)]
struct Inner {
    config: KubeletConfig,
    pods: Api<Pod>,
    secrets: Api<Secret>,
    config_maps: Api<ConfigMap>,
    service_accounts: Api<ServiceAccount>,
    state: Mutex<Pods>,
    next_ip: AtomicU32,
    stop: CancellationToken,
}

/// A running test kubelet. Dropping it (or [`Kubelet::shutdown`]) kills the containers it
/// runs; their pods stay as they are in the API.
#[derive(Debug)]
pub struct Kubelet {
    inner: Arc<Inner>,
}

#[derive(Debug, thiserror::Error)]
pub enum KubeletError {
    #[error("pod {pod}: {message}")]
    Pod { pod: String, message: String },
    #[error("Kubernetes API: {0}")]
    Api(#[from] kube::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> KubeletError + '_ {
    move |source| KubeletError::Io {
        path: path.to_owned(),
        source,
    }
}

impl Kubelet {
    /// Starts following pods with `client` (an identity allowed to bind pods, patch their
    /// status, read Secrets and ConfigMaps and request ServiceAccount tokens).
    pub fn start(client: kube::Client, config: KubeletConfig) -> Self {
        let inner = Arc::new(Inner {
            pods: Api::namespaced(client.clone(), &config.namespace),
            secrets: Api::namespaced(client.clone(), &config.namespace),
            config_maps: Api::namespaced(client.clone(), &config.namespace),
            service_accounts: Api::namespaced(client, &config.namespace),
            config,
            state: Mutex::new(Pods::default()),
            next_ip: AtomicU32::new(2),
            stop: CancellationToken::new(),
        });
        tokio::spawn(follow(Arc::clone(&inner)).instrument(info_span!("test_kubelet")));
        Self { inner }
    }

    /// Every pod named `pod` from now on fails this way (until [`Kubelet::heal`]).
    pub fn fail(&self, pod: &str, failure: Failure) {
        if let Ok(mut s) = self.inner.state.lock() {
            s.failures.insert(pod.to_owned(), failure);
        }
    }

    /// Pods named `pod` run normally again.
    pub fn heal(&self, pod: &str) {
        if let Ok(mut s) = self.inner.state.lock() {
            s.failures.remove(pod);
        }
    }

    /// The pid of the container process of the pod with uid `uid` (as the host sees it).
    pub fn pid(&self, uid: &str) -> Option<u32> {
        self.inner
            .state
            .lock()
            .ok()
            .and_then(|s| s.pids.get(uid).copied())
    }

    /// How many distinct pods (by uid) it has taken on so far.
    pub fn pods_taken_on(&self) -> usize {
        self.inner
            .state
            .lock()
            .map(|s| s.handled.len())
            .unwrap_or_default()
    }

    /// Stops watching and kills every container it runs.
    pub fn shutdown(&self) {
        self.inner.stop.cancel();
        if let Ok(s) = self.inner.state.lock() {
            for pid in s.pids.values() {
                let _ = kill(Pid::from_raw(-(*pid as i32)), Signal::SIGKILL);
            }
        }
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        self.shutdown();
    }
}

async fn follow(inner: Arc<Inner>) {
    let mut config = watcher::Config::default();
    if let Some(selector) = &inner.config.selector {
        config = config.labels(selector);
    }
    let stream = watcher(inner.pods.clone(), config)
        .default_backoff()
        .applied_objects();
    tokio::pin!(stream);
    loop {
        let pod = tokio::select! {
            () = inner.stop.cancelled() => return,
            next = stream.next() => match next {
                Some(Ok(pod)) => pod,
                Some(Err(e)) => {
                    warn!(error = %e, "watch failed; resuming");
                    continue;
                }
                None => return,
            },
        };
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        if pod.metadata.deletion_timestamp.is_some() {
            let running = inner
                .state
                .lock()
                .ok()
                .and_then(|s| s.deleted.get(&uid).map(CancellationToken::cancel))
                .is_some();
            let on_this_node = pod.spec.as_ref().and_then(|s| s.node_name.as_deref())
                == Some(inner.config.node.as_str());
            if !running && on_this_node {
                // Nothing of it runs here (an earlier kubelet's pod): confirm at once.
                let name = pod.metadata.name.clone().unwrap_or_default();
                inner.remove(&name, &uid).await;
            }
            continue;
        }
        let new = inner
            .state
            .lock()
            .map(|mut s| s.handled.insert(uid.clone()))
            .unwrap_or(false);
        let ours = pod.spec.as_ref().is_some_and(|s| {
            s.node_name.is_none() || s.node_name.as_deref() == Some(inner.config.node.as_str())
        });
        let finished = pod
            .status
            .as_ref()
            .and_then(|s| s.phase.as_deref())
            .is_some_and(|p| p == "Succeeded" || p == "Failed");
        let bound_before = pod.spec.as_ref().and_then(|s| s.node_name.as_deref())
            == Some(inner.config.node.as_str());
        if new && bound_before && !finished {
            // Bound to this node by an earlier life of this kubelet: its container went
            // with it. As after a node restart, a pod that never restarts has failed.
            let name = pod.metadata.name.clone().unwrap_or_default();
            let failed = json!({"phase": "Failed", "reason": "NodeShutdown",
                "message": "the test kubelet restarted; the pod's container is gone",
                "conditions": [{"type": "Ready", "status": "False"}]});
            if let Err(e) = inner.status(&name, failed).await {
                warn!(pod = %name, error = %e, "could not fail a pod of an earlier kubelet");
            }
        } else if new && ours && !finished {
            let name = pod.metadata.name.clone().unwrap_or_default();
            let inner = Arc::clone(&inner);
            tokio::spawn(
                async move {
                    if let Err(e) = run_pod(&inner, pod).await {
                        warn!(error = %e, "pod failed in the kubelet");
                    }
                }
                .instrument(info_span!("pod", pod = %name, uid = %uid)),
            );
        }
    }
}

/// Status patch helpers.
fn container_status(image: &str, state: serde_json::Value, ready: bool) -> serde_json::Value {
    json!({
        "name": "runtime", "image": image, "imageID": "", "ready": ready,
        "restartCount": 0, "started": ready, "state": state,
    })
}

impl Inner {
    async fn status(&self, name: &str, status: serde_json::Value) -> Result<(), KubeletError> {
        self.pods
            .patch_status(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({ "status": status })),
            )
            .await?;
        Ok(())
    }

    /// Removes the pod for good (a kubelet's last word), only if it is still this one.
    async fn remove(&self, name: &str, uid: &str) {
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: Some(uid.to_owned()),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        if let Err(e) = self.pods.delete(name, &params).await
            && !matches!(&e, kube::Error::Api(s) if s.code == 404 || s.code == 409)
        {
            warn!(pod = name, error = %e, "could not remove the pod");
        }
    }
}

fn deleted_token(inner: &Inner, uid: &str) -> CancellationToken {
    inner
        .state
        .lock()
        .map(|mut s| s.deleted.entry(uid.to_owned()).or_default().clone())
        .unwrap_or_default()
}

async fn run_pod(inner: &Arc<Inner>, pod: Pod) -> Result<(), KubeletError> {
    let name = pod.metadata.name.clone().unwrap_or_default();
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let deleted = deleted_token(inner, &uid);
    let failure = inner
        .state
        .lock()
        .ok()
        .and_then(|s| s.failures.get(&name).copied());
    let spec = pod.spec.clone().unwrap_or_default();
    let container = spec.containers.first().cloned().unwrap_or_default();
    let image = container.image.clone().unwrap_or_default();
    if failure == Some(Failure::Unschedulable) {
        inner
            .status(
                &name,
                json!({"phase": "Pending", "conditions": [{
                    "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                    "message": "0/1 nodes are available: 1 node(s) didn't match Pod's node \
                                affinity/selector."}]}),
            )
            .await?;
        return Ok(());
    }
    if spec.node_name.is_none() {
        let binding = json!({
            "apiVersion": "v1", "kind": "Binding",
            "metadata": {"name": name},
            "target": {"apiVersion": "v1", "kind": "Node", "name": inner.config.node},
        });
        let _: serde_json::Value = inner
            .pods
            .create_subresource("binding", &name, &PostParams::default(), &binding)
            .await?;
    }
    let ip = inner.next_ip.fetch_add(1, Ordering::Relaxed);
    let pod_ip = format!("10.244.{}.{}", (ip >> 8) & 0xff, ip & 0xff);
    let scheduled = json!({"type": "PodScheduled", "status": "True"});
    inner
        .status(
            &name,
            json!({"phase": "Pending", "hostIP": "127.0.0.1", "conditions": [scheduled],
                   "containerStatuses": [container_status(&image,
                       json!({"waiting": {"reason": "ContainerCreating"}}), false)]}),
        )
        .await?;
    let program = match &inner.config.mode {
        Mode::Simulate => None,
        Mode::Run { images } => images.get(&image).cloned().map(Some).unwrap_or(None),
    };
    let stuck = match failure {
        Some(Failure::ImagePullBackOff) => Some(json!({"waiting": {"reason": "ImagePullBackOff",
            "message": format!("Back-off pulling image \"{image}\"")}})),
        Some(Failure::CrashLoop) => Some(json!({"waiting": {"reason": "CrashLoopBackOff",
            "message": "back-off 40s restarting failed container=runtime"}})),
        _ => match (&inner.config.mode, &program) {
            (Mode::Run { .. }, None) => Some(json!({"waiting": {"reason": "ErrImagePull",
                "message": format!("image \"{image}\" is not known to the test kubelet")}})),
            _ => None,
        },
    };
    if let Some(state) = stuck {
        inner
            .status(
                &name,
                json!({"containerStatuses": [container_status(&image, state, false)]}),
            )
            .await?;
        deleted.cancelled().await;
        inner.remove(&name, &uid).await;
        return Ok(());
    }
    let running = |ready: bool| {
        json!({"phase": "Running", "podIP": pod_ip, "podIPs": [{"ip": pod_ip}],
               "conditions": [scheduled, {"type": "Ready", "status": if ready {"True"} else {"False"}},
                              {"type": "ContainersReady", "status": if ready {"True"} else {"False"}}],
               "containerStatuses": [container_status(&image,
                   json!({"running": {"startedAt": now()}}), ready)]})
    };
    let Some(program_dir) = program else {
        // Simulated: ready at once, until deleted.
        inner.status(&name, running(true)).await?;
        deleted.cancelled().await;
        inner.remove(&name, &uid).await;
        return Ok(());
    };
    // Init containers first, one after another, each to a successful end.
    for init in spec.init_containers.iter().flatten() {
        let log = format!("init-{}.log", init.name);
        let outcome = match prepare(inner, &pod, init, &program_dir, &log).await {
            Ok(mut child) => match child.wait().await {
                Ok(s) if s.success() => Ok(()),
                Ok(s) => Err(format!("exited with {s}")),
                Err(e) => Err(e.to_string()),
            },
            Err(e) => Err(e.to_string()),
        };
        if let Err(message) = outcome {
            let tail = log_tail(&inner.config.root.join("pods").join(&uid).join(&log), 2048);
            warn!(init = %init.name, %message, "init container failed");
            inner
                .status(
                    &name,
                    json!({"phase": "Failed", "conditions": [scheduled],
                           "initContainerStatuses": [{"name": init.name, "ready": false,
                               "restartCount": 0, "image": init.image, "imageID": "",
                               "state": {"terminated": {"exitCode": 1, "reason": "Error",
                                   "message": tail.unwrap_or(message)}}}]}),
                )
                .await?;
            deleted.cancelled().await;
            inner.remove(&name, &uid).await;
            return Ok(());
        }
    }
    let prepared = prepare(inner, &pod, &container, &program_dir, "container.log").await;
    let mut child = match prepared {
        Ok(command) => command,
        Err(e) => {
            inner
                .status(
                    &name,
                    json!({"containerStatuses": [container_status(&image,
                        json!({"waiting": {"reason": "CreateContainerConfigError",
                                           "message": e.to_string()}}), false)]}),
                )
                .await?;
            deleted.cancelled().await;
            inner.remove(&name, &uid).await;
            return Ok(());
        }
    };
    let pid = child.id().unwrap_or_default();
    if let Ok(mut s) = inner.state.lock() {
        s.pids.insert(uid.clone(), pid);
    }
    info!(pid, "container started");
    inner.status(&name, running(false)).await?;
    let stdout = child.stdout.take();
    let ready_inner = Arc::clone(inner);
    let (ready_name, ready_status) = (name.clone(), running(true));
    let oom = failure == Some(Failure::OomKilled);
    let ready = async move {
        if let Some(stdout) = stdout {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if line.trim() == "ready" {
                    if oom {
                        // Killed for memory right after it started.
                        let _ = kill(Pid::from_raw(-(pid as i32)), Signal::SIGKILL);
                    } else if let Err(e) =
                        ready_inner.status(&ready_name, ready_status.clone()).await
                    {
                        warn!(error = %e, "could not report the pod ready");
                    }
                }
            }
        }
        std::future::pending::<()>().await
    };
    let sync = sync_secrets(inner, &pod);
    let grace = Duration::from_secs(
        u64::try_from(spec.termination_grace_period_seconds.unwrap_or(30)).unwrap_or(30),
    );
    let status = tokio::select! {
        status = child.wait() => Some(status),
        () = ready => None,
        () = sync => None,
        () = deleted.cancelled() => None,
    };
    let status = match status {
        Some(status) => status,
        None => {
            // Deleted: SIGTERM to the container, SIGKILL after the grace period.
            let _ = kill(Pid::from_raw(-(pid as i32)), Signal::SIGTERM);
            match tokio::time::timeout(grace, child.wait()).await {
                Ok(status) => status,
                Err(_) => {
                    warn!(pid, "container ignored SIGTERM; killing it");
                    let _ = kill(Pid::from_raw(-(pid as i32)), Signal::SIGKILL);
                    child.wait().await
                }
            }
        }
    };
    if let Ok(mut s) = inner.state.lock() {
        s.pids.remove(&uid);
    }
    let pod_dir = inner.config.root.join("pods").join(&uid);
    if deleted.is_cancelled() {
        let _ = std::fs::remove_dir_all(&pod_dir);
        inner.remove(&name, &uid).await;
        return Ok(());
    }
    let (code, reason) = match status {
        Ok(_) if oom => (137, "OOMKilled".to_owned()),
        Ok(s) => match (s.code(), std::os::unix::process::ExitStatusExt::signal(&s)) {
            (Some(0), _) => (0, "Completed".to_owned()),
            (Some(code), _) => (code, "Error".to_owned()),
            (None, Some(signal)) => (128 + signal, "Error".to_owned()),
            (None, None) => (1, "Error".to_owned()),
        },
        Err(e) => (1, format!("Error: {e}")),
    };
    // `terminationMessagePolicy: FallbackToLogsOnError`: a failed container's message is
    // the end of its log (2048 bytes at most), as a kubelet reports it.
    let log = pod_dir.join("container.log");
    let message = (code != 0
        && container.termination_message_policy.as_deref() == Some("FallbackToLogsOnError"))
    .then(|| log_tail(&log, 2048))
    .flatten();
    let _ = std::fs::remove_dir_all(&pod_dir);
    info!(code, reason, message, "container exited");
    let mut terminated = json!({"exitCode": code, "reason": reason, "finishedAt": now()});
    if let Some(message) = message {
        terminated["message"] = json!(message);
    }
    inner
        .status(
            &name,
            json!({"phase": if code == 0 {"Succeeded"} else {"Failed"},
                   "conditions": [scheduled, {"type": "Ready", "status": "False"}],
                   "containerStatuses": [container_status(&image,
                       json!({"terminated": terminated}), false)]}),
        )
        .await?;
    deleted.cancelled().await;
    inner.remove(&name, &uid).await;
    Ok(())
}

fn now() -> String {
    // RFC 3339 in UTC, seconds (what the API server stores).
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let days = secs / 86_400;
    let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{d:02}T{h:02}:{m:02}:{s:02}Z")
}

/// One volume mount, resolved to a host path.
#[derive(Debug)]
struct Mount {
    host: PathBuf,
    container: String,
    read_only: bool,
    tmpfs: bool,
}

/// Resolves `container`'s environment and volumes and starts its process; its stderr goes
/// to `log` in the pod's directory.
async fn prepare(
    inner: &Inner,
    pod: &Pod,
    container: &k8s_openapi::api::core::v1::Container,
    program_dir: &Path,
    log: &str,
) -> Result<tokio::process::Child, KubeletError> {
    let name = pod.metadata.name.clone().unwrap_or_default();
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let bad = |message: String| KubeletError::Pod {
        pod: name.clone(),
        message,
    };
    let spec = pod.spec.clone().unwrap_or_default();
    let security = spec.security_context.clone().unwrap_or_default();
    let user = container
        .security_context
        .as_ref()
        .and_then(|s| s.run_as_user)
        .or(security.run_as_user)
        .ok_or_else(|| bad("no runAsUser: the test kubelet runs nothing as root".into()))?;
    let group = security.run_as_group.unwrap_or(user);
    let fs_group = security.fs_group;
    let owner = (user as u32, fs_group.unwrap_or(group) as u32);

    // Environment.
    let mut env = Vec::new();
    if let Some((host, port)) = &inner.config.api_server {
        env.push(("KUBERNETES_SERVICE_HOST".to_owned(), host.clone()));
        env.push(("KUBERNETES_SERVICE_PORT".to_owned(), port.to_string()));
    }
    for var in container.env.iter().flatten() {
        let value = match (&var.value, &var.value_from) {
            (Some(v), _) => v.clone(),
            (None, Some(from)) => {
                if let Some(key) = &from.secret_key_ref {
                    let secret = inner.secrets.get(&key.name).await?;
                    let bytes = secret
                        .data
                        .as_ref()
                        .and_then(|d| d.get(&key.key))
                        .ok_or_else(|| {
                            bad(format!("secret {} has no key {}", key.name, key.key))
                        })?;
                    String::from_utf8_lossy(&bytes.0).into_owned()
                } else if let Some(key) = &from.config_map_key_ref {
                    let map = inner.config_maps.get(&key.name).await?;
                    map.data
                        .as_ref()
                        .and_then(|d| d.get(&key.key).cloned())
                        .ok_or_else(|| {
                            bad(format!("configmap {} has no key {}", key.name, key.key))
                        })?
                } else if let Some(field) = &from.field_ref {
                    field_value(pod, &field.field_path).ok_or_else(|| {
                        bad(format!(
                            "env {}: unsupported fieldRef {}",
                            var.name, field.field_path
                        ))
                    })?
                } else {
                    return Err(bad(format!("env {}: unsupported valueFrom", var.name)));
                }
            }
            (None, None) => String::new(),
        };
        env.push((var.name.clone(), value));
    }

    // Volumes.
    let pod_dir = inner.config.root.join("pods").join(&uid);
    std::fs::create_dir_all(&pod_dir).map_err(io(&pod_dir))?;
    let mut mounts = Vec::new();
    for m in container.volume_mounts.iter().flatten() {
        let volume = spec
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == m.name)
            .ok_or_else(|| bad(format!("no volume {}", m.name)))?;
        let read_only = m.read_only.unwrap_or(false);
        let mount = if let Some(claim) = &volume.persistent_volume_claim {
            let mut host = inner.config.claim_dir(&claim.claim_name);
            if let Some(sub) = m.sub_path.as_deref().filter(|s| !s.is_empty()) {
                if sub.split('/').any(|part| part == "..") || sub.starts_with('/') {
                    return Err(bad(format!("subPath {sub:?} leaves the volume")));
                }
                host = host.join(sub);
            }
            if !host.exists() {
                std::fs::create_dir_all(&host).map_err(io(&host))?;
                // As an NFS export with all_squash to the pods' user would own it.
                std::os::unix::fs::chown(&host, Some(owner.0), Some(owner.1)).map_err(io(&host))?;
                set_mode(&host, 0o2770)?;
            }
            Mount {
                host,
                container: m.mount_path.clone(),
                read_only,
                tmpfs: false,
            }
        } else if let Some(secret) = &volume.secret {
            let host = pod_dir.join("volumes").join(&m.name);
            let secret_name = secret.secret_name.clone().unwrap_or_default();
            write_secret(
                inner,
                &secret_name,
                secret.items.as_deref(),
                &host,
                secret.default_mode.unwrap_or(0o644),
                fs_group,
            )
            .await?;
            Mount {
                host,
                container: m.mount_path.clone(),
                read_only: true,
                tmpfs: false,
            }
        } else if let Some(map) = &volume.config_map {
            let host = pod_dir.join("volumes").join(&m.name);
            let files = config_map_files(inner, &map.name, map.items.as_deref()).await?;
            write_files(&host, files, map.default_mode.unwrap_or(0o644), fs_group)?;
            Mount {
                host,
                container: m.mount_path.clone(),
                read_only: true,
                tmpfs: false,
            }
        } else if let Some(projected) = &volume.projected {
            let host = pod_dir.join("volumes").join(&m.name);
            let files = projected_files(inner, pod, projected).await?;
            write_files(
                &host,
                files,
                projected.default_mode.unwrap_or(0o644),
                fs_group,
            )?;
            Mount {
                host,
                container: m.mount_path.clone(),
                read_only: true,
                tmpfs: false,
            }
        } else if volume.empty_dir.is_some() {
            Mount {
                host: PathBuf::new(),
                container: m.mount_path.clone(),
                read_only,
                tmpfs: true,
            }
        } else {
            return Err(bad(format!(
                "volume {}: only claims, secrets, configMaps, projected volumes and emptyDirs",
                m.name
            )));
        };
        mounts.push(mount);
    }
    // Bind mounts first (shallow before deep), tmpfs last: a tmpfs over /tmp must not hide
    // the host paths the binds come from (the kubelet's root may well be under /tmp).
    mounts.sort_by_key(|m| (m.tmpfs, m.container.matches('/').count()));
    if let Some((bind, tmpfs)) = mounts.iter().find_map(|b| {
        mounts
            .iter()
            .filter(|t| t.tmpfs && !b.tmpfs)
            .find(|t| Path::new(&b.container).starts_with(&t.container))
            .map(|t| (b.container.clone(), t.container.clone()))
    }) {
        return Err(bad(format!(
            "{bind} lies under the emptyDir {tmpfs}: the test kubelet cannot mount that"
        )));
    }

    // The program, from the image's directory: the command, or without one the image's
    // entrypoint, which for the test kubelet is the program named like the image's
    // repository (`registry/warren-control-plane:tag` runs `warren-control-plane`, as
    // deploy/images/Dockerfile sets it). Then the args, as Kubernetes appends them.
    let image = container.image.clone().unwrap_or_default();
    let entrypoint = image
        .rsplit('/')
        .next()
        .and_then(|r| r.split([':', '@']).next())
        .unwrap_or_default()
        .to_owned();
    let mut command = container
        .command
        .clone()
        .unwrap_or_else(|| vec![entrypoint]);
    command.extend(container.args.iter().flatten().cloned());
    let (program, args) = command
        .split_first()
        .filter(|(p, _)| !p.is_empty())
        .ok_or_else(|| bad("the container has no command".into()))?;
    let program = if program.starts_with('/') {
        PathBuf::from(program)
    } else {
        program_dir.join(program)
    };
    if !program.exists() {
        return Err(bad(format!("{} is not in the image", program.display())));
    }
    let read_only_root = container
        .security_context
        .as_ref()
        .and_then(|s| s.read_only_root_filesystem)
        .unwrap_or(false);

    // The script run as root inside the new namespaces: mount, then become the user.
    let mut script = String::from("set -e\n");
    for m in &mounts {
        // Mount points are made on the host once (empty directories), as a container
        // runtime makes them in the image's root.
        std::fs::create_dir_all(&m.container).map_err(io(Path::new(&m.container)))?;
        let target = quote(&m.container);
        if m.tmpfs {
            script.push_str(&format!(
                "/bin/mount -t tmpfs -o size=1g,mode=1777 tmpfs {target}\n"
            ));
        } else {
            script.push_str(&format!(
                "/bin/mount --bind {} {target}\n",
                quote(&m.host.to_string_lossy())
            ));
            if m.read_only {
                script.push_str(&format!("/bin/mount -o remount,bind,ro {target}\n"));
            }
        }
    }
    if read_only_root {
        script.push_str("/bin/mount -o remount,bind,ro /\n");
    }
    if let Some(dir) = &container.working_dir {
        script.push_str(&format!("cd {}\n", quote(dir)));
    }
    let groups = fs_group
        .map(|g| format!("--groups={g}"))
        .unwrap_or("--clear-groups".into());
    script.push_str(&format!(
        "exec /usr/bin/setpriv --reuid={user} --regid={group} {groups} --no-new-privs \
         --bounding-set=-all --inh-caps=-all -- \"$@\"\n"
    ));
    let mut cmd = tokio::process::Command::new("/usr/bin/unshare");
    cmd.args([
        "--mount",
        "--propagation",
        "private",
        "--pid",
        "--fork",
        "--mount-proc",
        "--",
    ])
    .arg("/bin/sh")
    .arg("-c")
    .arg(&script)
    .arg("sh")
    .arg(&program)
    .args(args)
    .env_clear()
    .envs(env)
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::from(
        std::fs::File::create(pod_dir.join(log)).map_err(io(&pod_dir.join(log)))?,
    ))
    .process_group(0)
    .kill_on_drop(true);
    cmd.spawn().map_err(io(Path::new("/usr/bin/unshare")))
}

/// The last `max` bytes of the file at `path` (from a line start when it is longer).
fn log_tail(path: &Path, max: usize) -> Option<String> {
    let bytes = std::fs::read(path).ok()?;
    let mut tail = &bytes[bytes.len().saturating_sub(max)..];
    if tail.len() < bytes.len()
        && let Some(newline) = tail.iter().position(|b| *b == b'\n')
    {
        tail = &tail[newline + 1..];
    }
    let text = String::from_utf8_lossy(tail).trim().to_owned();
    (!text.is_empty()).then_some(text)
}

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn set_mode(path: &Path, mode: u32) -> Result<(), KubeletError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io(path))
}

/// Writes Secret `name`'s keys (those `items` names, when given) as files in `dir`.
async fn write_secret(
    inner: &Inner,
    name: &str,
    items: Option<&[KeyToPath]>,
    dir: &Path,
    mode: i32,
    fs_group: Option<i64>,
) -> Result<(), KubeletError> {
    let secret = inner.secrets.get(name).await?;
    let data = secret
        .data
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, v.0))
        .collect();
    write_files(dir, select(name, data, items)?, mode, fs_group)
}

/// A volume's files: (path in the volume, contents).
type Files = Vec<(String, Vec<u8>)>;

/// The keys of `data` as files: every key under its own name, or only `items`, each under
/// its path (a missing key is an error, as for a kubelet).
fn select(
    source: &str,
    data: BTreeMap<String, Vec<u8>>,
    items: Option<&[KeyToPath]>,
) -> Result<Files, KubeletError> {
    let Some(items) = items else {
        return Ok(data.into_iter().collect());
    };
    items
        .iter()
        .map(|item| {
            data.get(&item.key)
                .map(|v| (item.path.clone(), v.clone()))
                .ok_or_else(|| KubeletError::Pod {
                    pod: String::new(),
                    message: format!("{source} has no key {}", item.key),
                })
        })
        .collect()
}

async fn config_map_files(
    inner: &Inner,
    name: &str,
    items: Option<&[KeyToPath]>,
) -> Result<Files, KubeletError> {
    let map = inner.config_maps.get(name).await?;
    let mut data: BTreeMap<String, Vec<u8>> = map
        .data
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, v.into_bytes()))
        .collect();
    data.extend(
        map.binary_data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.0)),
    );
    select(name, data, items)
}

/// A projected volume (what the ServiceAccount admission adds for the API token): a token
/// from the TokenRequest API bound to this pod, ConfigMap and Secret keys, and the pod's
/// own fields.
async fn projected_files(
    inner: &Inner,
    pod: &Pod,
    projected: &k8s_openapi::api::core::v1::ProjectedVolumeSource,
) -> Result<Files, KubeletError> {
    let mut files = Files::new();
    for source in projected.sources.iter().flatten() {
        if let Some(token) = &source.service_account_token {
            let account = pod
                .spec
                .as_ref()
                .and_then(|s| s.service_account_name.clone())
                .unwrap_or_else(|| "default".into());
            let request = json!({
                "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                "spec": {
                    "audiences": token.audience.iter().collect::<Vec<_>>(),
                    "expirationSeconds": token.expiration_seconds.unwrap_or(3600),
                    "boundObjectRef": {"apiVersion": "v1", "kind": "Pod",
                        "name": pod.metadata.name, "uid": pod.metadata.uid},
                },
            });
            let answer: serde_json::Value = inner
                .service_accounts
                .create_subresource("token", &account, &PostParams::default(), &request)
                .await?;
            let value = answer["status"]["token"].as_str().unwrap_or_default();
            files.push((token.path.clone(), value.as_bytes().to_vec()));
        }
        if let Some(map) = &source.config_map {
            files.extend(config_map_files(inner, &map.name, map.items.as_deref()).await?);
        }
        if let Some(secret) = &source.secret {
            let s = inner.secrets.get(&secret.name).await?;
            let data = s
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.0))
                .collect();
            files.extend(select(&secret.name, data, secret.items.as_deref())?);
        }
        if let Some(downward) = &source.downward_api {
            for item in downward.items.iter().flatten() {
                let value = item
                    .field_ref
                    .as_ref()
                    .and_then(|f| field_value(pod, &f.field_path))
                    .ok_or_else(|| KubeletError::Pod {
                        pod: pod.metadata.name.clone().unwrap_or_default(),
                        message: format!("downwardAPI {}: unsupported field", item.path),
                    })?;
                files.push((item.path.clone(), value.into_bytes()));
            }
        }
    }
    Ok(files)
}

/// A pod field a `fieldRef` may name (those the test kubelet knows).
fn field_value(pod: &Pod, path: &str) -> Option<String> {
    match path {
        "metadata.name" => pod.metadata.name.clone(),
        "metadata.namespace" => pod.metadata.namespace.clone(),
        "metadata.uid" => pod.metadata.uid.clone(),
        "spec.serviceAccountName" => pod.spec.as_ref()?.service_account_name.clone(),
        "spec.nodeName" => pod.spec.as_ref()?.node_name.clone(),
        _ => None,
    }
}

/// Writes `files` in `dir` (root-owned, group `fs_group`), replacing what changed.
fn write_files(
    dir: &Path,
    files: Files,
    mode: i32,
    fs_group: Option<i64>,
) -> Result<(), KubeletError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    set_mode(dir, 0o755)?;
    for (key, value) in files {
        let path = dir.join(&key);
        if std::fs::read(&path).is_ok_and(|old| old == value) {
            continue;
        }
        let staged = dir.join(format!(".{key}.new"));
        std::fs::write(&staged, &value).map_err(io(&staged))?;
        if let Some(group) = fs_group {
            std::os::unix::fs::chown(&staged, Some(0), Some(group as u32)).map_err(io(&staged))?;
        }
        set_mode(&staged, mode as u32 & 0o777)?;
        std::fs::rename(&staged, &path).map_err(io(&path))?;
    }
    Ok(())
}

/// Keeps the pod's Secret volumes in step with their Secrets, as a kubelet does.
async fn sync_secrets(inner: &Inner, pod: &Pod) {
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let spec = pod.spec.clone().unwrap_or_default();
    let fs_group = spec.security_context.as_ref().and_then(|s| s.fs_group);
    let secrets: Vec<(String, String, Option<Vec<KeyToPath>>, i32)> = spec
        .containers
        .first()
        .and_then(|c| c.volume_mounts.clone())
        .unwrap_or_default()
        .iter()
        .filter_map(|m| {
            let v = spec.volumes.iter().flatten().find(|v| v.name == m.name)?;
            let s = v.secret.as_ref()?;
            Some((
                m.name.clone(),
                s.secret_name.clone()?,
                s.items.clone(),
                s.default_mode.unwrap_or(0o644),
            ))
        })
        .collect();
    loop {
        tokio::time::sleep(inner.config.secret_sync).await;
        for (volume, secret, items, mode) in &secrets {
            let dir = inner
                .config
                .root
                .join("pods")
                .join(&uid)
                .join("volumes")
                .join(volume);
            // A Secret deleted meanwhile leaves the files as they are.
            if let Err(e) =
                write_secret(inner, secret, items.as_deref(), &dir, *mode, fs_group).await
                && !matches!(&e, KubeletError::Api(kube::Error::Api(s)) if s.code == 404)
            {
                warn!(error = %e, "could not refresh a secret volume");
            }
        }
    }
}
