//! Warren's gateway: verifies Slack and webhook signatures, appends each accepted event to
//! the event log, and acks once it is durable.
//!
//! - [`verify`]: signature schemes (pure).
//! - [`slack`]: Slack Events API payloads → events (pure).
//! - [`webhook`]: endpoint configuration and deliveries → events (pure).
//! - [`http`]: routes and the mapping of failures to status codes.
//! - [`replies`]: agents' replies out to Slack, recorded as `reply.delivered`.
//! - [`files`]: files attached to Slack messages, downloaded with the bot token and stored
//!   for the workspaces (`message.file_stored` / `message.file_refused`).
//! - [`slack_api`]: the Slack Web API client both use; [`leased`]: one replica at a time.
//!
//! Metrics are served on a separate admin listener (`GET /metrics`); spans go out over OTLP
//! when configured (`warren-telemetry`).

pub mod config;
pub mod files;
pub mod http;
pub mod leased;
pub mod replies;
pub mod slack;
pub mod slack_api;
pub mod verify;
pub mod webhook;

use std::time::Duration;

use anyhow::Context;
use sqlx::postgres::PgPoolOptions;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info};
use warren_schema::EventLog;
use warren_schema::event_log::{Appender, AppenderConfig};

pub use config::Config;

/// Runs the gateway until `shutdown` is cancelled, then answers every request it accepted.
/// `admin` (the metrics route) is served on `config.metrics_listen`.
pub async fn run(
    config: Config,
    admin: axum::Router,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    // A budget smaller than one body would answer 503 to every request of that size.
    anyhow::ensure!(
        config.append_queue_bytes >= config.max_body_bytes,
        "WARREN_APPEND_QUEUE_BYTES ({}) is smaller than WARREN_MAX_BODY_BYTES ({}): a body of \
         the largest size could never be stored",
        config.append_queue_bytes,
        config.max_body_bytes
    );
    let pool = PgPoolOptions::new()
        .max_connections(config.db_max_connections)
        // Fail fast so a database outage becomes a 503 inside Slack's 3 s, not a hang.
        .acquire_timeout(Duration::from_secs(1))
        .connect_lazy(config.database_url()?.expose())
        .context("DATABASE_URL is not a valid PostgreSQL URL")?;
    let slack_signing_secret = config.slack_signing_secret()?;
    if slack_signing_secret.is_none() {
        info!("no Slack signing secret configured: /slack/events answers 404");
    }
    let log = EventLog::new(pool.clone());
    let limits = files::FileLimits {
        files_url: config.slack_files_url.clone(),
        max_bytes: config.max_file_bytes,
    };
    let stop = shutdown.clone();
    let followers = match config.slack_bot_token()? {
        Some(token) => {
            let slack = slack_api::SlackApi::new(&config.slack_api_url, token)?;
            tokio::spawn(
                leased::supervise("Slack followers", shutdown.clone(), move || {
                    run_slack_followers(log.clone(), slack.clone(), limits.clone(), stop.clone())
                })
                .instrument(tracing::info_span!("slack_out")),
            )
        }
        None => {
            info!(
                "no Slack bot token configured: agents' replies are recorded but not sent, \
                 and files attached to messages are recorded as refused"
            );
            tokio::spawn(
                leased::supervise("file refusals", shutdown.clone(), move || {
                    files::run(log.clone(), None, limits.clone(), stop.clone())
                })
                .instrument(tracing::info_span!("slack_files")),
            )
        }
    };
    let webhooks = webhook::registry::Registry::new(match &config.webhooks_file {
        Some(path) => webhook::load(path)?,
        None => Default::default(),
    });
    tokio::spawn(
        webhooks
            .clone()
            .follow(pool.clone(), shutdown.clone())
            .instrument(tracing::info_span!("webhook_endpoints")),
    );
    let (appender, writers) = Appender::start(
        pool.clone(),
        AppenderConfig {
            queue_capacity: config.append_queue,
            max_queue_wait: (config.append_max_queue_wait_ms > 0)
                .then(|| Duration::from_millis(config.append_max_queue_wait_ms)),
            ..AppenderConfig::default()
        },
    );
    let state = http::AppState {
        appender,
        pool,
        slack_signing_secret,
        webhooks,
        append_timeout: Duration::from_millis(config.append_timeout_ms),
        retry_after_secs: 1,
        queued_bytes: http::QueuedBytes::new(config.append_queue_bytes),
    };
    let app = http::router(state, config.max_body_bytes);
    let limits = config.limits();
    let listener = http::bind(config.listen, limits.listen_backlog)
        .with_context(|| format!("binding {}", config.listen))?;
    let admin_listener = http::bind(
        config.metrics_listen,
        http::Limits::default().listen_backlog,
    )
    .with_context(|| format!("binding {}", config.metrics_listen))?;
    let admin_shutdown = shutdown.clone();
    tokio::spawn(http::serve(
        admin_listener,
        admin,
        http::Limits {
            listener: "admin",
            ..http::Limits::default()
        },
        async move { admin_shutdown.cancelled().await },
    ));
    info!(listen = %config.listen, metrics = %config.metrics_listen, ?limits, "gateway listening");
    http::serve(
        listener,
        app,
        limits,
        async move { shutdown.cancelled().await },
    )
    .await?;
    // The router (and its Appender) is gone: the writers drain the queue and stop.
    writers.join().await;
    followers.await?;
    Ok(())
}

/// What the replica holding the lease [`replies::DELIVERY_LEASE`] does with Slack:
/// delivers replies ([`replies`]) and downloads files attached to messages ([`files`]),
/// each from its own checkpoint. One lease for both: one connection renews it, and the
/// replica that talks to Slack is one replica. An error ends both (the caller restarts
/// them).
pub async fn run_slack_followers(
    log: EventLog,
    slack: slack_api::SlackApi,
    limits: files::FileLimits,
    shutdown: CancellationToken,
) -> warren_schema::Result<()> {
    leased::run(&log, replies::DELIVERY_LEASE, &shutdown, || async {
        tokio::try_join!(
            replies::deliver(&log, &slack, &shutdown),
            files::follow(&log, Some(&slack), &limits, &shutdown)
        )
        .map(|_| ())
    })
    .await
}
