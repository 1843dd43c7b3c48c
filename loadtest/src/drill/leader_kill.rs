//! The leader-kill drill: the real control plane, as replicas in processes of their own with
//! the local backend (each workspace a real runtime process on real NATS, `echo` agents), is
//! SIGKILLed at random points during a burst of messages, again and again. A new standby is
//! started after each kill, so one always waits.
//!
//! What it counts, from the log and from the machine:
//! - **skipped**: a message never routed, or routed but never answered (no
//!   `agent.turn_completed`); **doubled**: a message routed twice;
//! - **started twice**: a workspace with more than one `workspace.start_requested` (a new
//!   leader must take over the start in force, not decide another), or with two runtime
//!   processes alive at once (`/proc` sampled every 20 ms: a twin living longer than that is
//!   seen);
//! - **takeover**: from the SIGKILL until a standby holds the lease with a higher fence.
//!
//! The old leader's runtimes die with the takeover (the local backend stops what a previous
//! control plane left and starts it again under the same decision), so runtime processes
//! outnumber workspaces: that is a restart, reported, not a twin.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rand::Rng;
use tokio_util::sync::CancellationToken;
use warren_schema::events::MessageReceived;
use warren_schema::events::Origin;
use warren_schema::nats::Namespace;
use warren_schema::testing::TestDatabase;
use warren_schema::{AppendRequest, EventId, Metadata, NewEvent};

use super::sibling;
use crate::report;

#[derive(Debug, Clone, clap::Parser)]
pub struct LeaderKillArgs {
    /// Messages in the burst.
    #[arg(long, default_value_t = 2000)]
    pub messages: u64,
    /// Messages per second.
    #[arg(long, default_value_t = 50)]
    pub rate: u64,
    /// Times the leader is SIGKILLed.
    #[arg(long, default_value_t = 10)]
    pub kills: usize,
    /// Agents, each in a workspace of its own.
    #[arg(long, default_value_t = 8)]
    pub workspaces: usize,
    /// Seconds a killed leader keeps the lease (the replicas' `WARREN_LEASE_TTL_SECS`).
    #[arg(long, default_value_t = 2)]
    pub lease_ttl_secs: u64,
    /// NATS server the replicas and runtimes use.
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// The control-plane binary (default: beside this program).
    #[arg(long)]
    pub control_plane_binary: Option<PathBuf>,
    /// The runtime binary (default: beside this program).
    #[arg(long)]
    pub runtime_binary: Option<PathBuf>,
}

/// What the log and the machine showed. Pure data; [`Counts::passed`] is the verdict.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub messages: usize,
    pub never_routed: usize,
    pub routed_twice: usize,
    pub unanswered: usize,
    pub dead_lettered: usize,
    /// Workspaces with more than one start decision.
    pub started_twice: usize,
    /// Workspaces with no start decision.
    pub never_started: usize,
    /// Workspaces seen with two runtime processes alive at once.
    pub twins: usize,
}

impl Counts {
    /// `sent`: the messages' ids; `routed`: (message id, routing id) of each routing
    /// decision; `answered`: routing ids with an `agent.turn_completed`; `starts`: start
    /// decisions per workspace; `twins`: workspaces seen running twice at once.
    pub fn of(
        sent: &[String],
        routed: &[(String, String)],
        answered: &HashSet<String>,
        dead_lettered: usize,
        workspaces: &[String],
        starts: &HashMap<String, usize>,
        twins: usize,
    ) -> Self {
        let mut routings: HashMap<&str, Vec<&str>> = HashMap::new();
        for (message, routing) in routed {
            routings.entry(message).or_default().push(routing);
        }
        let mut counts = Self {
            messages: sent.len(),
            dead_lettered,
            twins,
            ..Self::default()
        };
        for message in sent {
            match routings.get(message.as_str()).map(Vec::as_slice) {
                None | Some([]) => counts.never_routed += 1,
                Some([routing]) => {
                    counts.unanswered += usize::from(!answered.contains(*routing));
                }
                Some(_) => counts.routed_twice += 1,
            }
        }
        for workspace in workspaces {
            match starts.get(workspace).copied().unwrap_or(0) {
                0 => counts.never_started += 1,
                1 => {}
                _ => counts.started_twice += 1,
            }
        }
        counts
    }

    pub fn passed(&self) -> bool {
        let Self {
            messages: _,
            never_routed,
            routed_twice,
            unanswered,
            dead_lettered,
            started_twice,
            never_started,
            twins,
        } = self;
        [
            never_routed,
            routed_twice,
            unanswered,
            dead_lettered,
            started_twice,
            never_started,
            twins,
        ]
        .iter()
        .all(|n| **n == 0)
    }
}

/// One control-plane replica: its own process, its log in a file.
struct Replica {
    name: String,
    child: tokio::process::Child,
}

/// How every replica is started.
struct Replicas {
    binary: PathBuf,
    env: Vec<(&'static str, String)>,
    dir: PathBuf,
    started: usize,
}

impl Replicas {
    fn spawn(&mut self) -> anyhow::Result<Replica> {
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
}

/// The lease holder now: (replica, fence).
async fn leader(db: &TestDatabase) -> anyhow::Result<Option<(String, i64)>> {
    Ok(
        sqlx::query_as("SELECT holder, fence FROM leases WHERE name = $1 AND expires_at > now()")
            .bind(warren_control_plane::controller::LEASE)
            .fetch_optional(&db.pool)
            .await?,
    )
}

/// The runtime processes alive now, by workspace: each process whose program is `binary`,
/// its workspace read from its launch contract.
fn runtimes(binary: &Path) -> HashMap<String, Vec<u32>> {
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

/// What the sampler saw: every runtime pid by workspace, and the workspaces seen with two
/// alive at once.
#[derive(Debug, Default)]
struct Seen {
    pids: HashMap<String, HashSet<u32>>,
    twins: HashSet<String>,
}

fn sample_runtimes(binary: PathBuf, stop: CancellationToken) -> tokio::task::JoinHandle<Seen> {
    tokio::task::spawn_blocking(move || {
        let mut seen = Seen::default();
        while !stop.is_cancelled() {
            for (workspace, pids) in runtimes(&binary) {
                if pids.len() > 1 {
                    seen.twins.insert(workspace.clone());
                }
                seen.pids.entry(workspace).or_default().extend(pids);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        seen
    })
}

fn message(n: u64, workspaces: usize) -> anyhow::Result<NewEvent> {
    let agent = format!("agent{}", n as usize % workspaces);
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
        EventId::derive(&["drill-leader-kill", &n.to_string()]),
        &event,
        Metadata::new("drill"),
    )?)
}

async fn column_pairs(
    db: &TestDatabase,
    sql: &'static str,
) -> anyhow::Result<Vec<(String, String)>> {
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .fetch_all(&db.pool)
        .await?)
}

pub async fn leader_kill(args: LeaderKillArgs) -> anyhow::Result<bool> {
    report::heading("drill leader-kill");
    let control_plane = match &args.control_plane_binary {
        Some(b) => b.clone(),
        None => sibling("warren-control-plane")?,
    };
    let runtime = match &args.runtime_binary {
        Some(b) => b.clone(),
        None => sibling("warren-workspace-runtime")?,
    }
    .canonicalize()?;
    let db = TestDatabase::new().await;
    let dir = std::env::temp_dir().join(format!("warren-drill-leader-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let prefix = format!("drillleader{}", std::process::id());
    let names: Vec<String> = (0..args.workspaces).map(|i| format!("ws{i}")).collect();
    let agents: Vec<serde_json::Value> = (0..args.workspaces)
        .map(|i| {
            serde_json::json!({"name": format!("agent{i}"), "workspace": names[i],
                               "driver": "echo", "idle_timeout_secs": 3600})
        })
        .collect();
    let agents_file = dir.join("agents.json");
    std::fs::write(
        &agents_file,
        serde_json::json!({ "agents": agents }).to_string(),
    )?;
    report::line(&format!(
        "{} messages at {}/s to {} agents (a workspace each), {} leader SIGKILLs, lease TTL {} s; logs in {}",
        args.messages,
        args.rate,
        args.workspaces,
        args.kills,
        args.lease_ttl_secs,
        dir.display()
    ));

    let stop_sampling = CancellationToken::new();
    let sampler = sample_runtimes(runtime.clone(), stop_sampling.clone());
    let mut replicas = Replicas {
        binary: control_plane,
        env: vec![
            ("DATABASE_URL", db.url()),
            ("NATS_URL", args.nats_url.clone()),
            ("WARREN_NATS_PREFIX", prefix.clone()),
            ("WARREN_CONFIG", agents_file.display().to_string()),
            ("WARREN_BACKEND", "local".into()),
            ("WARREN_LOCAL_ROOT", dir.join("local").display().to_string()),
            ("WARREN_RUNTIME_COMMAND", runtime.display().to_string()),
            ("WARREN_LOCAL_SAME_USER", "true".into()),
            ("WARREN_LEASE_TTL_SECS", args.lease_ttl_secs.to_string()),
            ("WARREN_TICK_MS", "100".into()),
            ("WARREN_LOG_FORMAT", "text".into()),
            ("RUST_LOG", "info".into()),
        ],
        dir: dir.clone(),
        started: 0,
    };
    let mut running = vec![replicas.spawn()?, replicas.spawn()?];
    let log = db.log();
    let deadline = Instant::now() + Duration::from_secs(60);
    while log.read_type("agent.configured", 0, 10_000).await?.len() < args.workspaces {
        anyhow::ensure!(
            Instant::now() < deadline,
            "no replica configured the agents within 60 s; see {}",
            dir.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The burst, on its schedule, while leaders are killed.
    let burst = tokio::spawn({
        let (log, messages, rate, workspaces) =
            (log.clone(), args.messages, args.rate, args.workspaces);
        async move {
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
        }
    });

    let mut takeovers: Vec<Duration> = Vec::new();
    for _ in 0..args.kills {
        let (holder, fence) = loop {
            if let Some(h) = leader(&db).await? {
                break h;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        // A random point in the leader's work.
        let pause = rand::rng().random_range(300..2500);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        let Some(i) = running.iter().position(|r| r.name == holder) else {
            anyhow::bail!("the lease holder {holder} is not a replica of this drill");
        };
        let mut killed = running.remove(i);
        killed.child.kill().await?;
        let at = Instant::now();
        running.push(replicas.spawn()?);
        loop {
            if let Some((_, f)) = leader(&db).await?
                && f > fence
            {
                break;
            }
            anyhow::ensure!(
                at.elapsed() < Duration::from_secs(60),
                "no takeover within 60 s of killing {holder}; see {}",
                dir.display()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        takeovers.push(at.elapsed());
    }
    let sent = burst.await??;

    // Every message routed and answered, or the deadline.
    let deadline = Instant::now() + Duration::from_secs(120);
    let (routed, answered) = loop {
        let routed = column_pairs(
            &db,
            "SELECT payload->>'message_id', event_id::text FROM events \
             WHERE event_type = 'message.routed'",
        )
        .await?;
        let answered: HashSet<String> = column_pairs(
            &db,
            "SELECT payload->>'routing_id', event_id::text FROM events \
             WHERE event_type = 'agent.turn_completed'",
        )
        .await?
        .into_iter()
        .map(|(routing, _)| routing)
        .collect();
        if answered.len() >= sent.len() || Instant::now() > deadline {
            break (routed, answered);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let dead_lettered: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE event_type = 'message.dead_lettered'",
    )
    .fetch_one(&db.pool)
    .await?;
    let starts: HashMap<String, usize> = column_pairs(
        &db,
        "SELECT payload->>'workspace', count(*)::text FROM events \
         WHERE event_type = 'workspace.start_requested' GROUP BY 1",
    )
    .await?
    .into_iter()
    .map(|(w, n)| (w, n.parse().unwrap_or(0)))
    .collect();

    // Why a workspace was started more than once, for the report.
    let start_reasons = column_pairs(
        &db,
        "SELECT payload->>'workspace', string_agg(payload->>'reason', ',' ORDER BY position) \
         FROM events WHERE event_type = 'workspace.start_requested' GROUP BY 1 ORDER BY 1",
    )
    .await?;
    let observed = column_pairs(
        &db,
        "SELECT payload->>'workspace', string_agg(payload->>'phase', ',' ORDER BY position) \
         FROM events WHERE event_type = 'workspace.observed' GROUP BY 1 ORDER BY 1",
    )
    .await?;

    // Stop: the replicas (their runtimes die with them), then anything left.
    for replica in &mut running {
        if let Some(pid) = replica.child.id() {
            let _ = std::process::Command::new("kill")
                .arg(pid.to_string())
                .status();
        }
    }
    for mut replica in running {
        let _ = tokio::time::timeout(Duration::from_secs(20), replica.child.wait()).await;
    }
    stop_sampling.cancel();
    let seen = sampler.await?;
    for pids in runtimes(&runtime).values() {
        for pid in pids {
            let _ = std::process::Command::new("kill")
                .arg("-KILL")
                .arg(pid.to_string())
                .status();
        }
    }
    if let Ok(client) = async_nats::connect(&args.nats_url).await {
        let js = async_nats::jetstream::new(client);
        let ns = Namespace::new(&prefix);
        for stream in [
            ns.inbox_stream(),
            ns.outbox_stream(),
            ns.undelivered_stream(),
        ] {
            let _ = js.delete_stream(stream).await;
        }
        for bucket in names
            .iter()
            .map(|w| ns.workspace_bucket(w))
            .chain([ns.shared_bucket()])
        {
            let _ = js.delete_key_value(bucket).await;
        }
    }

    let counts = Counts::of(
        &sent,
        &routed,
        &answered,
        usize::try_from(dead_lettered).unwrap_or(usize::MAX),
        &names,
        &starts,
        seen.twins.len(),
    );
    let processes: usize = seen.pids.values().map(HashSet::len).sum();
    takeovers.sort();
    let ms = |d: Option<&Duration>| d.map_or(0.0, |d| d.as_secs_f64() * 1000.0);
    let passed = counts.passed();
    for (label, value) in [
        ("messages", counts.messages.to_string()),
        ("leader SIGKILLs", takeovers.len().to_string()),
        ("replicas started", replicas.started.to_string()),
        ("never routed (skipped)", counts.never_routed.to_string()),
        ("routed twice", counts.routed_twice.to_string()),
        (
            "routed, never answered (skipped)",
            counts.unanswered.to_string(),
        ),
        ("dead-lettered", counts.dead_lettered.to_string()),
        (
            "workspaces decided started twice",
            counts.started_twice.to_string(),
        ),
        ("workspaces never started", counts.never_started.to_string()),
        ("workspaces running twice at once", counts.twins.to_string()),
        (
            "runtime processes (restarts at takeover)",
            processes.to_string(),
        ),
        (
            "takeover p50 ms",
            format!("{:.0}", ms(takeovers.get(takeovers.len() / 2))),
        ),
        ("takeover max ms", format!("{:.0}", ms(takeovers.last()))),
    ] {
        report::line(&format!("{label:<44} {value:>10}"));
    }
    if !passed {
        for (workspace, reasons) in &start_reasons {
            report::line(&format!("  {workspace} started for: {reasons}"));
        }
        for (workspace, phases) in &observed {
            report::line(&format!("  {workspace} observed: {phases}"));
        }
    }
    report::line(&format!(
        "DRILL name=leader-kill messages={} kills={} skipped={} routed_twice={} \
         started_twice={} twins={} takeover_p50_ms={:.0} takeover_max_ms={:.0} result={}",
        counts.messages,
        takeovers.len(),
        counts.never_routed + counts.unanswered + counts.dead_lettered,
        counts.routed_twice,
        counts.started_twice + counts.never_started,
        counts.twins,
        ms(takeovers.get(takeovers.len() / 2)),
        ms(takeovers.last()),
        if passed { "pass" } else { "fail" }
    ));
    if passed {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(passed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
            .collect()
    }

    #[test]
    fn each_message_routed_and_answered_once_and_each_workspace_started_once_passes() {
        let counts = Counts::of(
            &ids(&["m1", "m2"]),
            &pairs(&[("m1", "r1"), ("m2", "r2")]),
            &ids(&["r1", "r2"]).into_iter().collect(),
            0,
            &ids(&["ws0"]),
            &HashMap::from([("ws0".to_owned(), 1)]),
            0,
        );
        assert!(counts.passed(), "{counts:?}");
    }

    #[test]
    fn a_skipped_doubled_or_unanswered_message_and_a_second_start_fail() {
        let counts = Counts::of(
            &ids(&["m1", "m2", "m3", "m4"]),
            &pairs(&[("m2", "r2"), ("m3", "r3"), ("m3", "r3b"), ("m4", "r4")]),
            &ids(&["r2"]).into_iter().collect(),
            0,
            &ids(&["ws0", "ws1"]),
            &HashMap::from([("ws0".to_owned(), 2)]),
            1,
        );
        assert_eq!(
            counts,
            Counts {
                messages: 4,
                never_routed: 1,
                routed_twice: 1,
                unanswered: 1,
                dead_lettered: 0,
                started_twice: 1,
                never_started: 1,
                twins: 1,
            }
        );
        assert!(!counts.passed());
    }
}
