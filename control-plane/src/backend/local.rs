//! The `local` backend: each workspace is a child process of the control plane, with its own
//! directory (the stand-in for the workspace's NFS subPath) and a directory shared by all.
//!
//! - Start: `{root}/workspaces/{name}/` is created and the runtime command runs there with
//!   `WARREN_WORKSPACE`, `WARREN_AGENTS`, `WARREN_WORKSPACE_DIR`, `WARREN_SHARED_DIR` (and
//!   `NATS_URL` when set) in its environment; its stderr goes to `runtime.log` beside it and
//!   its pid to `runtime.pid`. It is `ready` when it prints a line `ready` on stdout.
//! - NATS credentials: with an [`Issuer`], each start gets a new user allowed this
//!   workspace's subjects only, written to `{root}/credentials/{name}.creds` (mode 0600,
//!   outside the workspace directory, removed when the process exits) and passed as
//!   `WARREN_NATS_CREDS`. The processes
//!   share one Unix user, so this isolates workspaces on NATS, not on the machine.
//! - Exit: reported as `exited` when a stop was asked for or it exited 0, `failed` otherwise
//!   (with the exit status).
//! - Stop: SIGTERM, then SIGKILL after the grace period.
//! - A previous control plane's processes (found by their pid files, checked against
//!   `/proc/{pid}/environ`) are stopped at start and reported `gone`, so the decisions
//!   restart what should run; nothing is left running that no one tracks.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::Notify;
use tracing::{Instrument, info, info_span, warn};
use warren_schema::events::WorkspacePhase;

use super::{Backend, BackendError, Observation, WorkspaceSpec};
use crate::nats_auth::{self, Issuer};

/// How the local backend runs workspaces.
#[derive(Debug, Clone)]
pub struct LocalConfig {
    /// Holds `workspaces/{name}/` and `shared/`.
    pub root: PathBuf,
    /// The runtime: program and arguments.
    pub command: Vec<String>,
    pub nats_url: Option<String>,
    /// Signs each workspace's NATS credentials (unset: the runtime connects without).
    pub credentials: Option<Arc<Issuer>>,
    /// More environment for the runtime (`WARREN_NATS_PREFIX`, `RUST_LOG`, ...).
    pub env: Vec<(String, String)>,
    /// SIGTERM to SIGKILL.
    pub stop_grace: Duration,
}

#[derive(Debug, Default)]
struct Inner {
    /// Workspace → pid of its process.
    running: BTreeMap<String, u32>,
    /// Workspaces asked to stop (their exit is not a failure).
    stopping: BTreeSet<String>,
    observations: Vec<Observation>,
}

/// Child processes, one per workspace.
#[derive(Debug, Clone)]
pub struct LocalBackend {
    config: Arc<LocalConfig>,
    inner: Arc<Mutex<Inner>>,
    notify: Arc<Notify>,
}

impl LocalBackend {
    /// Creates the directories and stops what a previous control plane left running.
    pub fn new(config: LocalConfig) -> std::io::Result<Self> {
        std::fs::create_dir_all(config.root.join("workspaces"))?;
        std::fs::create_dir_all(config.root.join("shared"))?;
        let backend = Self {
            config: Arc::new(config),
            inner: Arc::default(),
            notify: Arc::new(Notify::new()),
        };
        backend.clean_up_leftovers()?;
        Ok(backend)
    }

    fn workspace_dir(&self, name: &str) -> PathBuf {
        self.config.root.join("workspaces").join(name)
    }

    /// Where a running workspace's NATS credentials are (removed when it exits: they do
    /// not expire, so they are not left lying around).
    fn credentials_file(&self, name: &str) -> PathBuf {
        self.config
            .root
            .join("credentials")
            .join(format!("{name}.creds"))
    }

    fn observe(&self, o: Observation) {
        if let Ok(mut inner) = self.inner.lock() {
            inner.observations.push(o);
        }
        self.notify.notify_one();
    }

    fn clean_up_leftovers(&self) -> std::io::Result<()> {
        for entry in std::fs::read_dir(self.config.root.join("workspaces"))? {
            let dir = entry?.path();
            let pidfile = dir.join("runtime.pid");
            let Some(name) = dir.file_name().and_then(|n| n.to_str()).map(str::to_owned) else {
                continue;
            };
            let Ok(pid) = std::fs::read_to_string(&pidfile)
                .unwrap_or_default()
                .trim()
                .parse::<u32>()
            else {
                continue;
            };
            let detail = if is_our_runtime(pid, &name) {
                warn!(workspace = %name, pid, "stopping a runtime left by a previous control plane");
                match kill(pid_of(pid), Signal::SIGKILL) {
                    Ok(()) => "left by a previous control plane; stopped".to_owned(),
                    Err(e) => format!("left by a previous control plane; kill failed: {e}"),
                }
            } else {
                "a stale pid file; no such runtime was running".to_owned()
            };
            let _ = std::fs::remove_file(&pidfile);
            self.observe(Observation {
                workspace: name,
                phase: WorkspacePhase::Gone,
                instance: Some(pid.to_string()),
                detail: Some(detail),
            });
        }
        Ok(())
    }
}

fn pid_of(pid: u32) -> Pid {
    Pid::from_raw(i32::try_from(pid).unwrap_or(i32::MAX))
}

/// Whether `pid` is alive and is the runtime of `workspace` (not a recycled pid).
fn is_our_runtime(pid: u32, workspace: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/environ")).is_ok_and(|env| {
        env.split(|b| *b == 0)
            .any(|kv| kv == format!("WARREN_WORKSPACE={workspace}").as_bytes())
    })
}

impl Backend for LocalBackend {
    fn name(&self) -> &'static str {
        "local"
    }

    async fn running(&self) -> Vec<String> {
        self.inner
            .lock()
            .map(|i| i.running.keys().cloned().collect())
            .unwrap_or_default()
    }

    async fn start(&self, spec: &WorkspaceSpec) -> Result<(), BackendError> {
        if self
            .inner
            .lock()
            .is_ok_and(|i| i.running.contains_key(&spec.name))
        {
            return Ok(());
        }
        let error = |source| BackendError::Start {
            workspace: spec.name.clone(),
            source,
        };
        let dir = self.workspace_dir(&spec.name);
        std::fs::create_dir_all(&dir).map_err(error)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("runtime.log"))
            .map_err(error)?;
        let (program, args) = self
            .config
            .command
            .split_first()
            .ok_or_else(|| error(std::io::Error::other("no runtime command configured")))?;
        let mut command = tokio::process::Command::new(program);
        command
            .args(args)
            .current_dir(&dir)
            .env("WARREN_WORKSPACE", &spec.name)
            .env("WARREN_AGENTS", spec.agents.join(","))
            .env("WARREN_AGENT_SETTINGS", spec.agent_settings.to_string())
            .env(
                "WARREN_AGENT_DIRECTORY",
                serde_json::to_string(&spec.directory).unwrap_or_else(|_| "[]".into()),
            )
            .env("WARREN_WORKSPACE_DIR", &dir)
            .env("WARREN_SHARED_DIR", self.config.root.join("shared"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log));
        if let Some(url) = &self.config.nats_url {
            command.env("NATS_URL", url);
        }
        if let Some(path) = self.write_credentials(&spec.name, &spec.agents)? {
            command.env("WARREN_NATS_CREDS", &path);
        }
        command.envs(self.config.env.iter().map(|(k, v)| (k, v)));
        let mut child = command.spawn().map_err(error)?;
        let pid = child.id().unwrap_or_default();
        std::fs::write(dir.join("runtime.pid"), pid.to_string()).map_err(error)?;
        if let Ok(mut inner) = self.inner.lock() {
            inner.running.insert(spec.name.clone(), pid);
            inner.stopping.remove(&spec.name);
        }
        info!(workspace = %spec.name, pid, "runtime started");
        self.observe(Observation {
            workspace: spec.name.clone(),
            phase: WorkspacePhase::Starting,
            instance: Some(pid.to_string()),
            detail: None,
        });

        let backend = self.clone();
        let name = spec.name.clone();
        let agents = spec.agents.clone();
        let stdout = child.stdout.take();
        // Expiring credentials are renewed at half their lifetime while the runtime runs.
        let renew_every = self
            .config
            .credentials
            .as_ref()
            .and_then(|issuer| issuer.lifetime())
            .map(|lifetime| lifetime / 2);
        tokio::spawn(
            async move {
                let running = async {
                    if let Some(stdout) = stdout {
                        let mut lines = BufReader::new(stdout).lines();
                        while let Ok(Some(line)) = lines.next_line().await {
                            if line.trim() == "ready" {
                                backend.observe(Observation {
                                    workspace: name.clone(),
                                    phase: WorkspacePhase::Ready,
                                    instance: Some(pid.to_string()),
                                    detail: None,
                                });
                            }
                        }
                    }
                    child.wait().await
                };
                tokio::pin!(running);
                let status = loop {
                    let Some(every) = renew_every else {
                        break running.await;
                    };
                    tokio::select! {
                        status = &mut running => break status,
                        () = tokio::time::sleep(every) => {
                            if let Err(e) = backend.write_credentials(&name, &agents) {
                                warn!(error = %e, "could not renew the workspace's NATS credentials");
                            }
                        }
                    }
                };
                backend.exited(&name, pid, status);
            }
            .instrument(info_span!("local_runtime", workspace = %spec.name, pid)),
        );
        Ok(())
    }

    async fn stop(&self, workspace: &str) -> Result<(), BackendError> {
        let pid = match self.inner.lock() {
            Ok(mut inner) => {
                let pid = inner.running.get(workspace).copied();
                if pid.is_some() {
                    inner.stopping.insert(workspace.to_owned());
                }
                pid
            }
            Err(_) => None,
        };
        let Some(pid) = pid else { return Ok(()) };
        kill(pid_of(pid), Signal::SIGTERM).map_err(|e| BackendError::Stop {
            workspace: workspace.to_owned(),
            message: e.to_string(),
        })?;
        let (backend, name, grace) = (self.clone(), workspace.to_owned(), self.config.stop_grace);
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            let still = backend
                .inner
                .lock()
                .is_ok_and(|i| i.running.get(&name) == Some(&pid));
            if still {
                warn!(workspace = %name, pid, "runtime ignored SIGTERM; killing it");
                let _ = kill(pid_of(pid), Signal::SIGKILL);
            }
        });
        Ok(())
    }

    fn drain_observations(&self) -> Vec<Observation> {
        self.inner
            .lock()
            .map(|mut i| std::mem::take(&mut i.observations))
            .unwrap_or_default()
    }

    fn observed(&self) -> &Notify {
        &self.notify
    }
}

impl LocalBackend {
    /// Stops every workspace (control-plane shutdown: the next start would not adopt them).
    pub async fn stop_all(&self) {
        for name in self.running().await {
            if let Err(e) = self.stop(&name).await {
                warn!(workspace = %name, error = %e, "could not stop a workspace");
            }
        }
    }

    /// Issues `workspace`'s NATS credentials (a new user, its subjects only) and writes them
    /// to its credentials file, replacing it in one rename so that a runtime reconnecting
    /// meanwhile reads either the old file or the new one. `None` without an issuer.
    fn write_credentials(
        &self,
        workspace: &str,
        agents: &[String],
    ) -> Result<Option<PathBuf>, BackendError> {
        let Some(issuer) = &self.config.credentials else {
            return Ok(None);
        };
        let auth = |source| BackendError::Credentials {
            workspace: workspace.to_owned(),
            source,
        };
        let path = self.credentials_file(workspace);
        let creds = issuer
            .workspace_credentials(workspace, agents)
            .map_err(auth)?;
        let staged = path.with_extension("creds.new");
        nats_auth::write_file(&staged, creds.expose(), 0o600).map_err(auth)?;
        std::fs::rename(&staged, &path).map_err(|source| {
            auth(nats_auth::AuthError::Write {
                path: path.clone(),
                source,
            })
        })?;
        Ok(Some(path))
    }

    fn exited(&self, name: &str, pid: u32, status: std::io::Result<std::process::ExitStatus>) {
        let asked = match self.inner.lock() {
            Ok(mut inner) => {
                if inner.running.get(name) == Some(&pid) {
                    inner.running.remove(name);
                }
                inner.stopping.remove(name)
            }
            Err(_) => false,
        };
        let _ = std::fs::remove_file(self.workspace_dir(name).join("runtime.pid"));
        let _ = std::fs::remove_file(self.credentials_file(name));
        let (phase, detail) = match status {
            Ok(s) if asked || s.success() => (WorkspacePhase::Exited, Some(s.to_string())),
            Ok(s) => (WorkspacePhase::Failed, Some(s.to_string())),
            Err(e) => (WorkspacePhase::Failed, Some(e.to_string())),
        };
        info!(workspace = %name, pid, ?phase, detail = detail.as_deref(), "runtime exited");
        self.observe(Observation {
            workspace: name.to_owned(),
            phase,
            instance: Some(pid.to_string()),
            detail,
        });
    }
}
