//! Command line and configuration: every setting is a flag with an environment variable.

use std::time::Duration;

use clap::{Parser, Subcommand};
use sqlx::postgres::PgPoolOptions;
use warren_schema::{EventId, EventLog, Secret};

use crate::operator;
use crate::telemetry::{self, LogFormat};

#[derive(Debug, Parser)]
#[command(name = "warren-control-plane", version, about)]
pub struct Cli {
    /// PostgreSQL connection string of Warren's database.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Secret,

    /// Most connections this process opens.
    #[arg(long, env = "WARREN_DB_MAX_CONNECTIONS", default_value_t = 10)]
    pub db_max_connections: u32,

    /// Log format.
    #[arg(long, env = "WARREN_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Apply pending database migrations (safe to run concurrently and repeatedly).
    Migrate,
    /// Show the event log's position, how far readers are held back, and each checkpoint.
    Status,
    /// Print events as JSON lines.
    Events {
        /// Only events after this position.
        #[arg(long, default_value_t = 0)]
        after: i64,
        /// At most this many events.
        #[arg(long, default_value_t = 100)]
        limit: i64,
        /// Only this stream (versions from 1).
        #[arg(long, conflicts_with_all = ["event_type", "correlation"])]
        stream: Option<String>,
        /// Only this event type.
        #[arg(long = "type", conflicts_with = "correlation")]
        event_type: Option<String>,
        /// Only this conversation (correlation id).
        #[arg(long)]
        correlation: Option<uuid::Uuid>,
    },
    /// Print the causation chain of an event, root cause first: why did this happen?
    Explain {
        /// The event id.
        event_id: uuid::Uuid,
    },
}

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    telemetry::init(cli.log_format);
    let pool = PgPoolOptions::new()
        .max_connections(cli.db_max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .connect(cli.database_url.expose())
        .await
        // The URL may hold a password: the error names the operation, not the URL.
        .map_err(|e| anyhow::anyhow!("connecting to PostgreSQL (DATABASE_URL): {e}"))?;
    let log = EventLog::new(pool);
    let mut out = std::io::stdout().lock();
    match cli.command {
        Command::Migrate => {
            log.migrate().await?;
            tracing::info!("migrations applied");
        }
        Command::Status => operator::status(&log, &mut out).await?,
        Command::Events {
            after,
            limit,
            stream,
            event_type,
            correlation,
        } => {
            let events = match (stream, event_type, correlation) {
                (Some(s), _, _) => log.read_stream(&s, 1, limit).await?,
                (_, Some(t), _) => log.read_type(&t, after, limit).await?,
                (_, _, Some(c)) => log.read_correlation(EventId(c), limit).await?,
                _ => log.read_positions(after, i64::MAX, limit).await?,
            };
            operator::print_events(&events, &mut out)?;
        }
        Command::Explain { event_id } => {
            let chain = log.causation_chain(EventId(event_id)).await?;
            if chain.is_empty() {
                anyhow::bail!("no event with id {event_id}");
            }
            operator::print_chain(&chain, &mut out)?;
        }
    }
    Ok(())
}
