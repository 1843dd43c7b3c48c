//! A control plane installed for a drill: a fresh database, `echo` agents each in a
//! workspace of its own, and replicas of the real `warren-control-plane` binary with the
//! local backend, each in a process of its own (its log in the drill's directory), whose
//! workspaces are real runtime processes on real NATS. Messages are appended to the log as
//! the gateway appends them; what became of them is read back from the log.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use warren_schema::events::{MessageReceived, Origin};
use warren_schema::nats::Namespace;
use warren_schema::testing::TestDatabase;
use warren_schema::{AppendRequest, EventId, Metadata, NewEvent};

use super::sibling;

/// One control-plane replica.
pub(super) struct Replica {
    pub name: String,
    pub child: tokio::process::Child,
}

pub(super) struct Installation {
    pub db: TestDatabase,
    /// Logs, the agents file and the local backend's root.
    pub dir: PathBuf,
    pub prefix: String,
    pub workspaces: Vec<String>,
    /// The runtime binary, as `/proc/{pid}/exe` names it.
    pub runtime: PathBuf,
    pub nats_url: String,
    /// Replicas started so far.
    pub started: usize,
    binary: PathBuf,
    env: Vec<(&'static str, String)>,
}

/// How a drill's installation is made.
pub(super) struct Options<'a> {
    pub name: &'a str,
    pub workspaces: usize,
    pub nats_url: &'a str,
    pub lease_ttl_secs: u64,
    pub control_plane_binary: Option<&'a Path>,
    pub runtime_binary: Option<&'a Path>,
}

impl Installation {
    pub async fn new(options: Options<'_>) -> anyhow::Result<Self> {
        let binary = match options.control_plane_binary {
            Some(b) => b.to_owned(),
            None => sibling("warren-control-plane")?,
        };
        let runtime = match options.runtime_binary {
            Some(b) => b.to_owned(),
            None => sibling("warren-workspace-runtime")?,
        }
        .canonicalize()?;
        let db = TestDatabase::new().await;
        let id = format!("{}{}", options.name, std::process::id());
        let dir = std::env::temp_dir().join(format!("warren-drill-{id}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let workspaces: Vec<String> = (0..options.workspaces).map(|i| format!("ws{i}")).collect();
        let agents: Vec<serde_json::Value> = workspaces
            .iter()
            .enumerate()
            .map(|(i, w)| {
                serde_json::json!({"name": format!("agent{i}"), "workspace": w,
                                   "driver": "echo", "idle_timeout_secs": 3600})
            })
            .collect();
        let agents_file = dir.join("agents.json");
        std::fs::write(
            &agents_file,
            serde_json::json!({ "agents": agents }).to_string(),
        )?;
        let env = vec![
            ("DATABASE_URL", db.url()),
            ("NATS_URL", options.nats_url.to_owned()),
            ("WARREN_NATS_PREFIX", id.clone()),
            ("WARREN_CONFIG", agents_file.display().to_string()),
            ("WARREN_BACKEND", "local".into()),
            ("WARREN_LOCAL_ROOT", dir.join("local").display().to_string()),
            ("WARREN_RUNTIME_COMMAND", runtime.display().to_string()),
            ("WARREN_LOCAL_SAME_USER", "true".into()),
            ("WARREN_LEASE_TTL_SECS", options.lease_ttl_secs.to_string()),
            ("WARREN_TICK_MS", "100".into()),
            ("WARREN_LOG_FORMAT", "text".into()),
            ("RUST_LOG", "info".into()),
        ];
        Ok(Self {
            db,
            dir,
            prefix: id,
            workspaces,
            runtime,
            nats_url: options.nats_url.to_owned(),
            started: 0,
            binary,
            env,
        })
    }

    /// Starts one more replica (`r0`, `r1`, ...), its log in `{dir}/{name}.log`.
    pub fn spawn(&mut self) -> anyhow::Result<Replica> {
        let name = format!("r{}", self.started);
        self.started += 1;
        let log = std::fs::File::create(self.dir.join(format!("{name}.log")))?;
        let free = || -> anyhow::Result<String> {
            Ok(std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .to_string())
        };
        let child = tokio::process::Command::new(&self.binary)
            .arg("run")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(self.env.iter().map(|(k, v)| (*k, v.as_str())))
            .env("WARREN_REPLICA", &name)
            .env("WARREN_CONTROL_PLANE_METRICS_LISTEN", free()?)
            .env("WARREN_ADMIN_LISTEN", free()?)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| anyhow::anyhow!("starting {}: {e}", self.binary.display()))?;
        Ok(Replica { name, child })
    }

    /// Waits until a replica has configured every agent.
    pub async fn configured(&self) -> anyhow::Result<()> {
        let log = self.db.log();
        let deadline = Instant::now() + Duration::from_secs(60);
        while log.read_type("agent.configured", 0, 10_000).await?.len() < self.workspaces.len() {
            anyhow::ensure!(
                Instant::now() < deadline,
                "no replica configured the agents within 60 s; see {}",
                self.dir.display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// Appends `messages` Slack messages at `rate` a second, in turn to each agent, on
    /// their schedule; the ids appended.
    pub fn burst(
        &self,
        messages: u64,
        rate: u64,
    ) -> tokio::task::JoinHandle<anyhow::Result<Vec<String>>> {
        let (log, workspaces) = (self.db.log(), self.workspaces.len());
        tokio::spawn(async move {
            let start = Instant::now();
            let mut ids = Vec::new();
            for n in 0..messages {
                let due = start + Duration::from_secs_f64(n as f64 / rate.max(1) as f64);
                tokio::time::sleep_until(due.into()).await;
                let event = message(n, workspaces)?;
                ids.push(event.id.to_string());
                log.append(&AppendRequest::new("slack:TDRILL:CDRILL", vec![event]))
                    .await?;
            }
            anyhow::Ok(ids)
        })
    }

    /// Rows of two text columns.
    pub async fn pairs(&self, sql: &'static str) -> anyhow::Result<Vec<(String, String)>> {
        Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .fetch_all(&self.db.pool)
            .await?)
    }

    /// The routing decisions (message id, routing id) and the routing ids answered
    /// (`agent.turn_completed`), once every one of `sent` is answered or `within` passed.
    pub async fn outcome(
        &self,
        sent: &[String],
        within: Duration,
    ) -> anyhow::Result<(Vec<(String, String)>, HashSet<String>)> {
        let deadline = Instant::now() + within;
        loop {
            let routed = self
                .pairs(
                    "SELECT payload->>'message_id', event_id::text FROM events \
                     WHERE event_type = 'message.routed'",
                )
                .await?;
            let answered: HashSet<String> = self
                .pairs(
                    "SELECT payload->>'routing_id', event_id::text FROM events \
                     WHERE event_type = 'agent.turn_completed'",
                )
                .await?
                .into_iter()
                .map(|(routing, _)| routing)
                .collect();
            if answered.len() >= sent.len() || Instant::now() > deadline {
                return Ok((routed, answered));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Events of `event_type` in the log.
    pub async fn count(&self, event_type: &str) -> anyhow::Result<usize> {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type = $1")
            .bind(event_type)
            .fetch_one(&self.db.pool)
            .await?;
        Ok(usize::try_from(n).unwrap_or(usize::MAX))
    }

    /// Stops the replicas (SIGTERM, their runtimes stop with them), kills any runtime left,
    /// and deletes the drill's NATS streams and buckets; its directory too when it passed
    /// (otherwise, or with `WARREN_DRILL_KEEP` set, the logs stay for a look).
    pub async fn remove(self, replicas: Vec<Replica>, passed: bool) {
        for replica in &replicas {
            if let Some(pid) = replica.child.id() {
                let _ = std::process::Command::new("kill")
                    .arg(pid.to_string())
                    .status();
            }
        }
        for mut replica in replicas {
            let _ = tokio::time::timeout(Duration::from_secs(20), replica.child.wait()).await;
        }
        for pids in runtimes(&self.runtime).values() {
            for pid in pids {
                let _ = std::process::Command::new("kill")
                    .arg("-KILL")
                    .arg(pid.to_string())
                    .status();
            }
        }
        if let Ok(client) = async_nats::connect(&self.nats_url).await {
            let js = async_nats::jetstream::new(client);
            let ns = Namespace::new(&self.prefix);
            for stream in [
                ns.inbox_stream(),
                ns.outbox_stream(),
                ns.undelivered_stream(),
            ] {
                let _ = js.delete_stream(stream).await;
            }
            let buckets = self.workspaces.iter().map(|w| ns.workspace_bucket(w));
            for bucket in buckets.chain([ns.shared_bucket()]) {
                let _ = js.delete_key_value(bucket).await;
            }
        }
        if passed && std::env::var_os("WARREN_DRILL_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Message `n`, addressed to agent `n mod workspaces`, with an id derived from `n`.
fn message(n: u64, workspaces: usize) -> anyhow::Result<NewEvent> {
    let agent = format!("agent{}", n as usize % workspaces.max(1));
    let event = MessageReceived {
        origin: Origin::Slack {
            team_id: "TDRILL".into(),
            channel: "CDRILL".into(),
            thread_ts: "1700000000.000000".into(),
            ts: format!("1700000001.{n:06}"),
            user: "U1".into(),
        },
        text: format!("@{agent} message {n}"),
        addressed_agents: vec![agent],
        files: vec![],
    };
    Ok(NewEvent::from_domain(
        EventId::derive(&["drill-message", &n.to_string()]),
        &event,
        Metadata::new("drill"),
    )?)
}

/// The runtime processes alive now, by workspace: each process whose program is `binary`,
/// its workspace read from its launch contract.
pub(super) fn runtimes(binary: &Path) -> HashMap<String, Vec<u32>> {
    let mut found: HashMap<String, Vec<u32>> = HashMap::new();
    let Ok(proc) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in proc.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if std::fs::read_link(entry.path().join("exe")).ok().as_deref() != Some(binary) {
            continue;
        }
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        let launch = environ
            .split(|b| *b == 0)
            .find_map(|var| var.strip_prefix(b"WARREN_LAUNCH="))
            .and_then(|json| serde_json::from_slice::<serde_json::Value>(json).ok());
        if let Some(workspace) = launch.as_ref().and_then(|l| l["workspace"].as_str()) {
            found.entry(workspace.to_owned()).or_default().push(pid);
        }
    }
    found
}
