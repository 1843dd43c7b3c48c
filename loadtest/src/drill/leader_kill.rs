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
use std::path::PathBuf;
use std::time::{Duration, Instant};

use rand::Rng;
use tokio_util::sync::CancellationToken;
use warren_schema::testing::TestDatabase;

use super::installation::{Installation, Options, runtimes};
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

/// The lease holder now: (replica, fence).
async fn leader(db: &TestDatabase) -> anyhow::Result<Option<(String, i64)>> {
    Ok(
        sqlx::query_as("SELECT holder, fence FROM leases WHERE name = $1 AND expires_at > now()")
            .bind(warren_control_plane::controller::LEASE)
            .fetch_optional(&db.pool)
            .await?,
    )
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

pub async fn leader_kill(args: LeaderKillArgs) -> anyhow::Result<bool> {
    report::heading("drill leader-kill");
    let mut install = Installation::new(Options {
        name: "leader",
        workspaces: args.workspaces,
        nats_url: &args.nats_url,
        lease_ttl_secs: args.lease_ttl_secs,
        control_plane_binary: args.control_plane_binary.as_deref(),
        runtime_binary: args.runtime_binary.as_deref(),
    })
    .await?;
    report::line(&format!(
        "{} messages at {}/s to {} agents (a workspace each), {} leader SIGKILLs, lease TTL {} s; logs in {}",
        args.messages,
        args.rate,
        args.workspaces,
        args.kills,
        args.lease_ttl_secs,
        install.dir.display()
    ));
    let stop_sampling = CancellationToken::new();
    let sampler = sample_runtimes(install.runtime.clone(), stop_sampling.clone());
    let mut running = vec![install.spawn()?, install.spawn()?];
    install.configured().await?;

    // The burst, on its schedule, while leaders are killed.
    let burst = install.burst(args.messages, args.rate);
    let mut takeovers: Vec<Duration> = Vec::new();
    for _ in 0..args.kills {
        let (holder, fence) = loop {
            if let Some(h) = leader(&install.db).await? {
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
        running.push(install.spawn()?);
        loop {
            if let Some((_, f)) = leader(&install.db).await?
                && f > fence
            {
                break;
            }
            anyhow::ensure!(
                at.elapsed() < Duration::from_secs(60),
                "no takeover within 60 s of killing {holder}; see {}",
                install.dir.display()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        takeovers.push(at.elapsed());
    }
    let sent = burst.await??;
    let (routed, answered) = install.outcome(&sent, Duration::from_secs(120)).await?;
    let dead_lettered = install.count("message.dead_lettered").await?;
    let starts: HashMap<String, usize> = install
        .pairs(
            "SELECT payload->>'workspace', count(*)::text FROM events \
             WHERE event_type = 'workspace.start_requested' GROUP BY 1",
        )
        .await?
        .into_iter()
        .map(|(w, n)| (w, n.parse().unwrap_or(0)))
        .collect();
    // Why a workspace was started more than once, for the report.
    let start_reasons = install
        .pairs(
            "SELECT payload->>'workspace', string_agg(payload->>'reason', ',' ORDER BY position) \
             FROM events WHERE event_type = 'workspace.start_requested' GROUP BY 1 ORDER BY 1",
        )
        .await?;
    let observed = install
        .pairs(
            "SELECT payload->>'workspace', string_agg(payload->>'phase', ',' ORDER BY position) \
             FROM events WHERE event_type = 'workspace.observed' GROUP BY 1 ORDER BY 1",
        )
        .await?;
    stop_sampling.cancel();
    let seen = sampler.await?;

    let counts = Counts::of(
        &sent,
        &routed,
        &answered,
        dead_lettered,
        &install.workspaces,
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
        ("replicas started", install.started.to_string()),
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
    install.remove(running, passed).await;
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
