//! The controller: wait for the leader lease, then follow the log and record decisions
//! until shutdown or until deposed (then wait again).

pub mod decider;
pub use warren_schema::lease;

use std::path::PathBuf;
use std::time::Duration;

use chrono::Utc;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};
use warren_schema::EventLog;
use warren_schema::event_log::{Subscription, SubscriptionOptions};

use crate::backend::{AnyBackend, Backend, BackendConfig};
use crate::config_file;
use crate::decide::Policy;
use crate::delivery;
use crate::error::{Error, Result};
use crate::projection::Projections;
use crate::reconcile::nats::NatsResources;
use crate::reconcile::{self, Reconciler};
pub use decider::{DECISIONS_STREAM, Decider};
pub use lease::Lease;
use warren_schema::nats::Namespace;

/// Name of the decision loop's lease.
pub const LEASE: &str = "control-plane.leader";

/// How the controller runs.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// This replica's id in the lease.
    pub holder: String,
    /// A killed leader is replaced after at most this long.
    pub lease_ttl: Duration,
    /// How often time-based decisions (idle stops, restarts, admissions) are checked.
    pub tick: Duration,
    pub policy: Policy,
    /// Agents and routes, recorded as events when they change.
    pub config_file: Option<PathBuf>,
    /// Where workspaces run; `None` records decisions without running anything (a
    /// decisions-only replica, or tests of the decisions alone).
    pub backend: Option<BackendConfig>,
    /// NATS for delivery to agents' inboxes and their replies back; `None` records
    /// decisions without delivering them.
    pub nats: Option<NatsConfig>,
}

/// Where the agents' inboxes are.
#[derive(Debug, Clone)]
pub struct NatsConfig {
    pub url: String,
    pub namespace: Namespace,
    /// The control plane's own credentials file, when the server requires one.
    pub credentials: Option<PathBuf>,
}

/// Runs until `shutdown`: standby while another replica leads, leader otherwise.
pub async fn run(
    log: EventLog,
    config: ControllerConfig,
    shutdown: CancellationToken,
) -> Result<()> {
    // Read the file up front: a bad file stops start-up with a clear error.
    let file = config
        .config_file
        .as_deref()
        .map(config_file::load)
        .transpose()?;
    // The backend is made once this replica leads, never before: making it may act on
    // what it finds (the local one stops the runtimes it finds; a standby's would be the
    // leader's).
    let mut backend: Option<AnyBackend> = None;
    let nats = match &config.nats {
        Some(n) => Some((
            // A NATS server that is down at start is retried in the background; the
            // decisions do not wait for it.
            warren_schema::nats::connect_options(n.credentials.as_deref(), None)
                .await
                .map_err(|e| Error::Nats(e.to_string()))?
                .retry_on_initial_connect()
                .connect(n.url.as_str())
                .await
                .map_err(|e| Error::Nats(format!("connecting to {}: {e}", n.url)))?,
            n.namespace.clone(),
        )),
        None => None,
    };
    loop {
        let lease = loop {
            match Lease::try_acquire(log.pool(), LEASE, &config.holder, config.lease_ttl).await {
                Ok(Some(lease)) => break lease,
                Ok(None) => {}
                Err(e) => warn!(error = %e, "cannot reach the lease; retrying"),
            }
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                () = tokio::time::sleep(config.lease_ttl / 4) => {}
            }
        };
        info!(holder = %lease.holder, fence = lease.fence, "leading");
        if backend.is_none()
            && let Some(chosen) = &config.backend
        {
            backend = Some(chosen.build().await.map_err(|e| Error::Config {
                path: "backend".into(),
                message: e.to_string(),
            })?);
        }
        let span = info_span!("lead", fence = lease.fence);
        let parts = Parts {
            file: file.as_ref(),
            backend: backend.as_ref(),
            nats: nats.as_ref(),
        };
        match lead(&log, &config, parts, lease.clone(), &shutdown)
            .instrument(span)
            .await
        {
            Ok(()) => {
                if let Some(b) = &backend {
                    b.hand_over().await;
                }
                // Shutdown: hand over at once instead of after the TTL.
                if let Err(e) = lease.release(log.pool()).await {
                    warn!(error = %e, "could not release the lease");
                }
                return Ok(());
            }
            Err(e) if e.is_deposed() => warn!(error = %e, "deposed; back to standby"),
            Err(e) if e.is_unavailable() => {
                warn!(error = %e, "database unavailable; back to standby");
                tokio::select! {
                    () = shutdown.cancelled() => return Ok(()),
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// What a leader works with besides the log.
struct Parts<'a> {
    file: Option<&'a config_file::ConfigFile>,
    backend: Option<&'a AnyBackend>,
    nats: Option<&'a (async_nats::Client, Namespace)>,
}

async fn lead(
    log: &EventLog,
    config: &ControllerConfig,
    Parts {
        file,
        backend,
        nats,
    }: Parts<'_>,
    lease: Lease,
    shutdown: &CancellationToken,
) -> Result<()> {
    let pool = log.pool();
    // Taking over: load the decisions' state, catch up with the log, sync the configuration
    // file, load the read models. On a large log this takes longer than the lease's TTL,
    // so the lease is renewed all along.
    let starting = async {
        let mut decider = Decider::load(log, config.policy.clone(), lease.clone()).await?;
        let options = SubscriptionOptions {
            name: decider::CHECKPOINT.into(),
            // Decisions are on the path of every message: re-check unsettled positions
            // often (one cheap watermark query per millisecond while a writer is in flight).
            settle_poll: Duration::from_millis(1),
            ..SubscriptionOptions::default()
        };
        let mut subscription =
            Subscription::start(pool.clone(), decider.state().position, options).await?;
        // Catch up with the log before comparing it with the configuration file: a previous
        // leader may have recorded configuration it never decided on. Up to the head as it
        // is now, not until a poll comes back empty: a transaction in flight anywhere on
        // the server holds the safe horizon back, and an empty poll then means "not yet".
        let head = log.head().await?;
        while subscription.position() < head {
            let batch = subscription.next_batch().await?;
            decider.handle(pool, &batch, Utc::now()).await?;
        }
        if let Some(file) = file {
            // The configuration events come back through the subscription like any other.
            config_file::sync(log, decider.state(), file).await?;
        }
        // The read models follow the log beside the decisions, on the leader only.
        let projections = Projections::load(log).await?;
        Ok::<_, Error>((decider, subscription, projections))
    };
    let (mut decider, mut subscription, mut projections) = tokio::select! {
        () = shutdown.cancelled() => return Ok(()),
        started = lease.hold_while(pool, starting) => started???,
    };
    let read_models = projections.run(log, shutdown.clone());
    tokio::pin!(read_models);
    // Delivery to agents and their output back, beside the decisions; NATS failures are
    // retried inside, so they never stop the decisions.
    let delivering = async {
        match nats {
            Some((client, ns)) => {
                delivery::run(client.clone(), ns.clone(), log.clone(), shutdown.clone()).await
            }
            None => std::future::pending().await,
        }
    };
    tokio::pin!(delivering);
    // The reconciler is a task of its own: it follows the desired state the decisions
    // hand it, and a slow backend call never holds up the decisions or the lease renewal.
    // The state goes over as an `Arc`, and only when deciding changed it: a timer tick with
    // nothing due copies nothing.
    let (desired, desired_state) =
        tokio::sync::watch::channel(std::sync::Arc::new(decider.state().clone()));
    let stop_reconciling = shutdown.child_token();
    let mut reconciling = match backend {
        Some(b) => {
            let reconciler = Reconciler::new(b.clone(), log.clone());
            let reconciler = match nats {
                Some((client, ns)) => {
                    reconciler.with_nats(NatsResources::new(client.clone(), ns.clone()))
                }
                None => reconciler,
            };
            let stop = stop_reconciling.clone();
            // Aborted with this future: a leader that dies (or is dropped) leaves no
            // reconciler acting on its behalf.
            Some(tokio_util::task::AbortOnDropHandle::new(tokio::spawn(
                reconcile::run(reconciler, desired_state, stop)
                    .instrument(info_span!("reconciler")),
            )))
        }
        None => None,
    };
    let mut tick = tokio::time::interval(config.tick);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Renewed beside deciding (Lease::hold_while), not between batches: one batch of a
    // large backlog may take longer than the TTL.
    let decider_lease = decider.lease().clone();
    let deciding = async {
        loop {
            let position = decider.state().position;
            let decided = tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                result = &mut read_models => return result,
                result = &mut delivering => return result,
                _ = tick.tick() => decider.handle(pool, &[], Utc::now()).await?,
                batch = subscription.next_batch() => {
                    decider.handle(pool, &batch?, Utc::now()).await?
                }
                ended = async {
                    match reconciling.as_mut() {
                        Some(task) => task.await,
                        None => std::future::pending().await,
                    }
                } => {
                    reconciling = None;
                    return ended.map_err(|e| Error::Config {
                        path: "reconciler".into(),
                        message: format!("the reconciler task failed: {e}"),
                    })?;
                }
            };
            if !decided.is_empty() || decider.state().position != position {
                desired.send_replace(std::sync::Arc::new(decider.state().clone()));
            }
        }
    };
    let result = match decider_lease.hold_while(pool, deciding).await {
        Ok(Ok(result)) => result,
        Ok(Err(lost)) => Err(lost.into()),
        Err(e) => Err(e.into()),
    };
    // However leading ends, the reconciler stops with it, before anything is handed over.
    stop_reconciling.cancel();
    if let Some(task) = reconciling {
        let _ = task.await;
    }
    result
}
