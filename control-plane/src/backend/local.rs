//! The `local` backend: each workspace is a child process of the control plane, with its own
//! directory (the stand-in for the workspace's NFS subPath) and a directory shared by all.
//!
//! What a workspace's process gets is its [`LaunchContract`] and nothing else: it starts
//! from an empty environment (`WARREN_LAUNCH`, `PATH`, `HOME` only), so the control plane's
//! `DATABASE_URL`, NATS account seed and model keys never reach it.
//!
//! Layout under the root:
//!
//! ```text
//! workspaces/{name}/        the workspace's directory (its own user, 0700)
//! shared/                   shared by every workspace (their common group, 2770)
//! credentials/{name}/       its NATS credentials and allowed model keys (its own user, 0700)
//! runtimes/{name}/          runtime.log and runtime.pid (the control plane's only)
//! users.json                the Unix user of each workspace, once given
//! ```
//!
//! - Users: when the control plane runs as root ([`Users::Auto`]), each workspace runs as a
//!   Unix user of its own (uids from its root's own range, [`uid_range`], never reused for
//!   another workspace),
//!   so it cannot read another workspace's directory, credentials or `/proc/*/environ`, nor
//!   the control plane's. Not as root, every workspace runs as the control plane's user and
//!   only the environment is isolated: see docs/security.md.
//! - NATS credentials: with an [`Issuer`], each start gets a new user allowed this
//!   workspace's subjects only, renewed at half its lifetime, removed when the process exits.
//! - Model keys: the agents' `allowed_keys` are copied from the operator's key directory
//!   into the workspace's credentials directory; no other key is.
//! - Ready: when the runtime prints a line `ready` on stdout.
//! - Exit: reported as `exited` when a stop was asked for or it exited 0, `failed` otherwise.
//! - Stop: SIGTERM, then SIGKILL after the grace period.
//! - A previous control plane's processes (found by their pid files, checked against
//!   `/proc/{pid}/environ`) are stopped at start and reported `gone` as `replaced`: the
//!   reconciler starts what should run again under the start decision in force (not a
//!   failure, no restart decision), and nothing is left running that no one tracks.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::Notify;
use tracing::{Instrument, info, info_span, warn};
use warren_schema::events::WorkspacePhase;
use warren_schema::launch::{self, LaunchContract, NatsLaunch, TelemetryLaunch};

use super::{Backend, BackendError, Observation, WorkspaceSpec, log_file, model_keys, uid_range};
use crate::nats_auth::{self, Issuer};

/// Which Unix user a workspace runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Users {
    /// A user of its own when the control plane runs as root, else the control plane's.
    Auto,
    /// Always the control plane's user (only the environment is isolated).
    Same,
}

/// How the local backend runs workspaces.
#[derive(Debug, Clone)]
pub struct LocalConfig {
    /// Holds `workspaces/`, `shared/`, `credentials/` and `runtimes/`.
    pub root: PathBuf,
    /// The runtime: program and arguments.
    pub command: Vec<String>,
    pub nats_url: Option<String>,
    /// Prefix of every NATS subject and stream.
    pub nats_prefix: String,
    /// Signs each workspace's NATS credentials (unset: the runtime connects without).
    pub credentials: Option<Arc<Issuer>>,
    /// Where the operator keeps model keys, a file per key named like the key
    /// (`OPENAI_API_KEY`). An agent gets those its `allowed_keys` names.
    pub model_keys: Option<PathBuf>,
    /// The runtimes' log format, filter and trace export.
    pub telemetry: TelemetryLaunch,
    /// `PATH` of the runtimes and their agents' programs.
    pub path: String,
    pub users: Users,
    /// SIGTERM to SIGKILL.
    pub stop_grace: Duration,
}

impl LocalConfig {
    /// Runs `command` per workspace under `root`, with no NATS, no keys, the usual `PATH`.
    pub fn new(root: PathBuf, command: Vec<String>) -> Self {
        Self {
            root,
            command,
            nats_url: None,
            nats_prefix: "warren".into(),
            credentials: None,
            model_keys: None,
            telemetry: TelemetryLaunch::default(),
            path: "/usr/local/bin:/usr/bin:/bin".into(),
            users: Users::Auto,
            stop_grace: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    /// Workspace → pid of its process.
    running: BTreeMap<String, u32>,
    /// Workspaces asked to stop (their exit is not a failure).
    stopping: BTreeSet<String>,
    observations: Vec<Observation>,
    /// Workspace → its uid (with per-workspace users), as in `users.json`.
    uids: BTreeMap<String, u32>,
}

/// Child processes, one per workspace.
#[derive(Debug, Clone)]
pub struct LocalBackend {
    config: Arc<LocalConfig>,
    /// Whether each workspace gets a user of its own.
    own_users: bool,
    /// The first uid of this root's range (the workspaces' common group); its workspaces
    /// get the uids after it.
    uid_base: u32,
    inner: Arc<Mutex<Inner>>,
    notify: Arc<Notify>,
}

/// Sets `path`'s mode, and its owner when one is given.
fn own(path: &Path, mode: u32, owner: Option<(u32, u32)>) -> std::io::Result<()> {
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(path, Some(uid), Some(gid))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

/// Creates `path` (and its parents) with `mode` and `owner`.
fn make_dir(path: &Path, mode: u32, owner: Option<(u32, u32)>) -> std::io::Result<()> {
    std::fs::create_dir_all(path)?;
    own(path, mode, owner)
}

impl LocalBackend {
    /// Creates the directories and stops what a previous control plane left running.
    pub fn new(config: LocalConfig) -> std::io::Result<Self> {
        let own_users = config.users == Users::Auto && running_as_root();
        // Workspaces may pass through the root and the parent directories, not list them.
        make_dir(&config.root, 0o711, None)?;
        let uid_base = if own_users {
            uid_range::base_for(&config.root)?
        } else {
            0
        };
        let group = own_users.then_some((0, uid_base));
        for dir in ["workspaces", "credentials"] {
            make_dir(&config.root.join(dir), 0o711, None)?;
        }
        make_dir(&config.root.join("runtimes"), 0o700, None)?;
        // Everyone's: the workspaces' common group may write, new files keep the group.
        make_dir(
            &config.root.join("shared"),
            if own_users { 0o2770 } else { 0o755 },
            group,
        )?;
        let uids = std::fs::read(config.root.join("users.json"))
            .ok()
            .and_then(|json| serde_json::from_slice(&json).ok())
            .unwrap_or_default();
        let backend = Self {
            config: Arc::new(config),
            own_users,
            uid_base,
            inner: Arc::new(Mutex::new(Inner {
                uids,
                ..Inner::default()
            })),
            notify: Arc::new(Notify::new()),
        };
        backend.clean_up_leftovers()?;
        Ok(backend)
    }

    fn workspace_dir(&self, name: &str) -> PathBuf {
        self.config.root.join("workspaces").join(name)
    }

    /// The runtime's log and pid file: the control plane's, out of the workspace's reach
    /// (a workspace that could write its pid file could have another process killed).
    fn runtime_dir(&self, name: &str) -> PathBuf {
        self.config.root.join("runtimes").join(name)
    }

    /// A running workspace's NATS credentials and model keys (removed when it exits).
    fn credentials_dir(&self, name: &str) -> PathBuf {
        self.config.root.join("credentials").join(name)
    }

    fn credentials_file(&self, name: &str) -> PathBuf {
        self.credentials_dir(name).join("nats.creds")
    }

    /// The uid and gid `workspace` runs as (`None`: the control plane's). A new workspace
    /// gets the next uid, recorded in `users.json` before it is used.
    fn owner(&self, workspace: &str) -> std::io::Result<Option<(u32, u32)>> {
        if !self.own_users {
            return Ok(None);
        }
        let mut inner = self
            .inner
            .lock()
            .map_err(|_| std::io::Error::other("backend state poisoned"))?;
        if let Some(uid) = inner.uids.get(workspace) {
            return Ok(Some((*uid, self.uid_base)));
        }
        let uid = inner
            .uids
            .values()
            .max()
            .map_or(self.uid_base + 1, |u| u + 1);
        if uid >= self.uid_base + uid_range::RANGE {
            return Err(std::io::Error::other(format!(
                "this root has given out all {} uids of its range",
                uid_range::RANGE - 1
            )));
        }
        inner.uids.insert(workspace.to_owned(), uid);
        let json = serde_json::to_vec_pretty(&inner.uids).map_err(std::io::Error::other)?;
        let path = self.config.root.join("users.json");
        let staged = path.with_extension("json.new");
        std::fs::write(&staged, json)?;
        std::fs::rename(&staged, &path)?;
        Ok(Some((uid, self.uid_base)))
    }

    fn observe(&self, o: Observation) {
        if let Ok(mut inner) = self.inner.lock() {
            inner.observations.push(o);
        }
        self.notify.notify_one();
    }

    fn clean_up_leftovers(&self) -> std::io::Result<()> {
        for entry in std::fs::read_dir(self.config.root.join("runtimes"))? {
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
            let _ = std::fs::remove_dir_all(self.credentials_dir(&name));
            self.kill_leftover_processes(&name);
            self.observe(Observation {
                workspace: name,
                phase: WorkspacePhase::Gone,
                instance: Some(pid.to_string()),
                detail: Some(detail),
                // This control plane starts it again under the decision in force.
                replaced: true,
                decision: None,
            });
        }
        Ok(())
    }

    /// What `spec`'s runtime is given: its contract, with its allowed keys and NATS
    /// credentials written for it.
    fn launch_contract(
        &self,
        spec: &WorkspaceSpec,
        dir: &Path,
        owner: Option<(u32, u32)>,
    ) -> Result<LaunchContract, BackendError> {
        let mut contract = LaunchContract::new(
            &spec.name,
            dir.to_owned(),
            NatsLaunch::new(
                self.config.nats_url.clone().unwrap_or_default(),
                &self.config.nats_prefix,
            ),
        );
        contract.agents = self
            .give_keys(spec, owner)
            .map_err(|source| BackendError::Start {
                workspace: spec.name.clone(),
                source,
            })?;
        contract.shared_dir = Some(self.config.root.join("shared"));
        contract.telemetry = self.config.telemetry.clone();
        contract.tuning = spec.tuning.clone();
        contract.nats.credentials = self.write_credentials(&spec.name, &spec.agent_names())?;
        Ok(contract)
    }

    /// Copies each agent's allowed keys from the operator's key directory into the
    /// workspace's credentials directory (readable by the workspace only) and names them in
    /// its launch entry. A key the directory lacks, or a key file others may read, is
    /// refused with the reason.
    fn give_keys(
        &self,
        spec: &WorkspaceSpec,
        owner: Option<(u32, u32)>,
    ) -> std::io::Result<Vec<launch::AgentLaunch>> {
        let mut agents = spec.agents.clone();
        for agent in &mut agents {
            agent.keys.clear();
            let keys = model_keys::allowed(
                self.config.model_keys.as_deref(),
                &agent.name,
                &agent.settings,
            )?;
            for (name, value) in keys {
                let target = self.credentials_dir(&spec.name).join("keys").join(&name);
                nats_auth::write_file(&target, &value, 0o600).map_err(std::io::Error::other)?;
                own(&target, 0o400, owner)?;
                agent.keys.insert(name, target);
            }
        }
        if let Some(owner) = owner
            && self.credentials_dir(&spec.name).join("keys").exists()
        {
            own(
                &self.credentials_dir(&spec.name).join("keys"),
                0o500,
                Some(owner),
            )?;
        }
        Ok(agents)
    }
}

/// Whether this process runs as root (`/proc/self` belongs to the effective user).
fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// SIGKILLs every live process whose real uid is `uid`, pass after pass until a pass finds
/// none (a process may fork while the pass runs); returns how many were killed.
fn kill_processes_of(uid: u32) -> usize {
    let mut killed = 0;
    for _ in 0..100 {
        let pids = processes_of(uid);
        if pids.is_empty() {
            break;
        }
        for pid in pids {
            if kill(pid_of(pid), Signal::SIGKILL).is_ok() {
                killed += 1;
            }
        }
    }
    killed
}

/// Live (not zombie) processes whose real uid is `uid`, from `/proc`.
fn processes_of(uid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            let field = |name: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .map(str::trim)
                    .map(str::to_owned)
            };
            let real_uid = field("Uid:").and_then(|u| u.split_whitespace().next()?.parse().ok());
            let zombie = field("State:").is_some_and(|s| s.starts_with('Z'));
            real_uid == Some(uid) && !zombie
        })
        .collect()
}

fn pid_of(pid: u32) -> Pid {
    Pid::from_raw(i32::try_from(pid).unwrap_or(i32::MAX))
}

/// Whether `pid` is alive and is the runtime of `workspace` (not a recycled pid): its
/// launch contract names the workspace.
fn is_our_runtime(pid: u32, workspace: &str) -> bool {
    let prefix = format!("{}=", launch::ENV);
    std::fs::read(format!("/proc/{pid}/environ")).is_ok_and(|env| {
        env.split(|b| *b == 0).any(|kv| {
            kv.strip_prefix(prefix.as_bytes())
                .and_then(|json| std::str::from_utf8(json).ok())
                .and_then(|json| LaunchContract::from_json(json).ok())
                .is_some_and(|c| c.workspace == workspace)
        })
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
        let owner = self.owner(&spec.name).map_err(error)?;
        let dir = self.workspace_dir(&spec.name);
        make_dir(&dir, 0o700, owner).map_err(error)?;
        let runtime_dir = self.runtime_dir(&spec.name);
        make_dir(&runtime_dir, 0o700, None).map_err(error)?;
        let credentials_dir = self.credentials_dir(&spec.name);
        let _ = std::fs::remove_dir_all(&credentials_dir);
        make_dir(&credentials_dir, 0o700, owner).map_err(error)?;
        let (program, args) = self
            .config
            .command
            .split_first()
            .ok_or_else(|| error(std::io::Error::other("no runtime command configured")))?;
        // Nothing of a start that fails is left behind: no keys, no credentials.
        let contract = self.launch_contract(spec, &dir, owner).inspect_err(|_| {
            let _ = std::fs::remove_dir_all(&credentials_dir);
        })?;
        let mut command = tokio::process::Command::new(program);
        command
            .args(args)
            .current_dir(&dir)
            // Nothing of the control plane's environment crosses: only the contract.
            .env_clear()
            .envs(contract.environment(&self.config.path))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            // Copied into runtime.log by the control plane, which bounds its size.
            .stderr(Stdio::piped())
            // A control plane that goes away (or a test that fails) takes its runtimes along.
            .kill_on_drop(true);
        if let Some((uid, gid)) = owner {
            command.uid(uid).gid(gid);
        }
        let mut child = command.spawn().map_err(|e| {
            let _ = std::fs::remove_dir_all(&credentials_dir);
            error(e)
        })?;
        if let Some(stderr) = child.stderr.take() {
            let path = runtime_dir.join("runtime.log");
            tokio::spawn(async move {
                if let Err(e) = log_file::copy_bounded(stderr, &path, log_file::MAX_LOG_BYTES).await
                {
                    warn!(log = %path.display(), error = %e, "the runtime's log could not be written");
                }
            });
        }
        let pid = child.id().unwrap_or_default();
        std::fs::write(runtime_dir.join("runtime.pid"), pid.to_string()).map_err(error)?;
        if let Ok(mut inner) = self.inner.lock() {
            inner.running.insert(spec.name.clone(), pid);
            inner.stopping.remove(&spec.name);
        }
        info!(workspace = %spec.name, pid, uid = owner.map(|o| o.0), "runtime started");
        self.observe(Observation {
            workspace: spec.name.clone(),
            phase: WorkspacePhase::Starting,
            instance: Some(pid.to_string()),
            detail: None,
            replaced: false,
            decision: spec.decision,
        });
        let decision = spec.decision;

        let backend = self.clone();
        let name = spec.name.clone();
        let agents = spec.agent_names();
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
                // The runtime's exit is what counts, not its stdout's end: a program it
                // started may hold the pipe open long after (it is killed then, below).
                let ready = async {
                    if let Some(stdout) = stdout {
                        let mut lines = BufReader::new(stdout).lines();
                        while let Ok(Some(line)) = lines.next_line().await {
                            if line.trim() == "ready" {
                                backend.observe(Observation {
                                    workspace: name.clone(),
                                    phase: WorkspacePhase::Ready,
                                    instance: Some(pid.to_string()),
                                    detail: None,
                                    replaced: false,
                                    decision,
                                });
                            }
                        }
                    }
                    std::future::pending().await
                };
                let running = async {
                    tokio::select! {
                        status = child.wait() => status,
                        status = ready => status,
                    }
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
                backend.exited(&name, pid, status, decision);
            }
            .instrument({
                // The process's life is a span of its own, following from the start: as a
                // child it would hold the start's span open (and unexported) until it exits.
                let span = info_span!(parent: None, "local_runtime", workspace = %spec.name, pid);
                span.follows_from(tracing::Span::current());
                span
            }),
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

    fn return_observations(&self, unrecorded: Vec<Observation>) {
        if let Ok(mut i) = self.inner.lock() {
            i.observations.splice(0..0, unrecorded);
        }
        self.notify.notify_one();
    }

    fn observed(&self) -> &Notify {
        &self.notify
    }

    /// Stops every workspace: its processes are this control plane's children, and the next
    /// one would not adopt them.
    async fn hand_over(&self) {
        for name in self.running().await {
            if let Err(e) = self.stop(&name).await {
                warn!(workspace = %name, error = %e, "could not stop a workspace");
            }
        }
    }
}

impl LocalBackend {
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
        let write_error = |source| {
            auth(nats_auth::AuthError::Write {
                path: path.clone(),
                source,
            })
        };
        nats_auth::write_file(&staged, creds.expose(), 0o600).map_err(auth)?;
        // Readable by this workspace's user only.
        let owner = self.owner(workspace).map_err(write_error)?;
        own(&staged, 0o400, owner).map_err(write_error)?;
        std::fs::rename(&staged, &path).map_err(write_error)?;
        Ok(Some(path))
    }

    /// Kills whatever processes `workspace`'s user still has: what its agents started that
    /// outlived the runtime (a program that called `setsid`, children reparented when the
    /// runtime was SIGKILLed). Only with a user per workspace, where every process of that
    /// uid is the workspace's; with one shared user there is no telling them apart.
    fn kill_leftover_processes(&self, workspace: &str) {
        let uid = match self.inner.lock() {
            Ok(inner) if self.own_users => inner.uids.get(workspace).copied(),
            _ => None,
        };
        let Some(uid) = uid else { return };
        let killed = kill_processes_of(uid);
        if killed > 0 {
            warn!(
                workspace,
                uid, killed, "killed processes left behind by the runtime's agents"
            );
        }
    }

    fn exited(
        &self,
        name: &str,
        pid: u32,
        status: std::io::Result<std::process::ExitStatus>,
        decision: Option<warren_schema::EventId>,
    ) {
        self.kill_leftover_processes(name);
        let asked = match self.inner.lock() {
            Ok(mut inner) => {
                if inner.running.get(name) == Some(&pid) {
                    inner.running.remove(name);
                }
                inner.stopping.remove(name)
            }
            Err(_) => false,
        };
        let _ = std::fs::remove_file(self.runtime_dir(name).join("runtime.pid"));
        let _ = std::fs::remove_dir_all(self.credentials_dir(name));
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
            replaced: false,
            decision,
        });
    }
}
