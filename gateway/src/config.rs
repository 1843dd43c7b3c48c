//! The gateway's configuration: every setting a flag with an environment variable. Secrets
//! (the database URL, the Slack signing secret and bot token) come from the environment or
//! from files (`--*-file`), never from flags, and are never printed (`[redacted]`).

use std::net::SocketAddr;
use std::path::PathBuf;

use warren_schema::Secret;
use warren_schema::secret::SecretError;

#[derive(Debug, clap::Parser)]
#[command(name = "warren-gateway", version, about)]
pub struct Config {
    /// Address to listen on.
    #[arg(long, env = "WARREN_GATEWAY_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,

    /// File holding the PostgreSQL connection string (instead of the `DATABASE_URL`
    /// variable). Secrets are read from the environment or files, never from flags: a
    /// command line is visible to every user of the machine.
    #[arg(long, env = "DATABASE_URL_FILE")]
    pub database_url_file: Option<PathBuf>,

    /// File holding the Slack app signing secret (instead of the `SLACK_SIGNING_SECRET`
    /// variable; Basic Information → App Credentials). Without either, /slack answers 404.
    #[arg(long, env = "SLACK_SIGNING_SECRET_FILE")]
    pub slack_signing_secret_file: Option<PathBuf>,

    /// File holding the Slack bot token, xoxb-... (instead of the `SLACK_BOT_TOKEN`
    /// variable). Without either, replies are recorded in the log but not sent.
    #[arg(long, env = "SLACK_BOT_TOKEN_FILE")]
    pub slack_bot_token_file: Option<PathBuf>,

    /// Base URL of Slack's Web API (a local server in tests and air-gapped installs).
    #[arg(long, env = "SLACK_API_URL", default_value = "https://slack.com/api")]
    pub slack_api_url: String,

    /// Where Slack serves files attached to messages: a file is downloaded (with the bot
    /// token) only from an address that starts with this, so a token never goes elsewhere.
    #[arg(
        long,
        env = "SLACK_FILES_URL",
        default_value = "https://files.slack.com/"
    )]
    pub slack_files_url: String,

    /// Largest file attached to a Slack message that is downloaded for the agents, bytes.
    /// A larger one is recorded as refused, and the agent is told so.
    #[arg(long, env = "WARREN_MAX_FILE_BYTES", default_value_t = 20 * 1024 * 1024)]
    pub max_file_bytes: u64,

    /// JSON file of webhook endpoints (see docs/gateway.md).
    #[arg(long, env = "WARREN_WEBHOOKS_FILE")]
    pub webhooks_file: Option<PathBuf>,

    /// Largest request body accepted, bytes (413 beyond).
    #[arg(long, env = "WARREN_MAX_BODY_BYTES", default_value_t = 1024 * 1024)]
    pub max_body_bytes: usize,

    /// Longest an append may take before the sender gets 503, milliseconds.
    #[arg(long, env = "WARREN_APPEND_TIMEOUT_MS", default_value_t = 2000)]
    pub append_timeout_ms: u64,

    /// Appends that may wait for a commit; beyond this senders get 503 at once.
    #[arg(long, env = "WARREN_APPEND_QUEUE", default_value_t = 10_000)]
    pub append_queue: usize,

    /// Longest an append should wait in the queue, milliseconds: while the last batch taken
    /// had waited longer and more are queued, senders get 503 at once (with Retry-After)
    /// instead of a long wait. 0 turns it off (only the queue's size limits).
    #[arg(long, env = "WARREN_APPEND_MAX_QUEUE_WAIT_MS", default_value_t = 50)]
    pub append_max_queue_wait_ms: u64,

    /// Most connections open at once; one more gets 503 with Retry-After and is closed.
    #[arg(long, env = "WARREN_MAX_CONNECTIONS", default_value_t = 1024)]
    pub max_connections: usize,

    /// Connections the kernel holds, handshake done, until the gateway accepts them (capped
    /// by the kernel's `net.core.somaxconn`). Past it the kernel drops handshakes, and the
    /// client tries again only after a second.
    #[arg(long, env = "WARREN_LISTEN_BACKLOG", default_value_t = 4096)]
    pub listen_backlog: u32,

    /// Longest a client may take to send a request's headers (and an idle kept-alive
    /// connection may stay open), milliseconds.
    #[arg(long, env = "WARREN_HEADER_READ_TIMEOUT_MS", default_value_t = 10_000)]
    pub header_read_timeout_ms: u64,

    /// Longest a whole request may take, body included, milliseconds (408 beyond).
    #[arg(long, env = "WARREN_REQUEST_TIMEOUT_MS", default_value_t = 15_000)]
    pub request_timeout_ms: u64,

    /// Bytes of request bodies that may wait for the log at once; beyond this senders get
    /// 503 at once (the queue is bounded in requests and in bytes).
    #[arg(long, env = "WARREN_APPEND_QUEUE_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub append_queue_bytes: usize,

    /// Most database connections.
    #[arg(long, env = "WARREN_DB_MAX_CONNECTIONS", default_value_t = 8)]
    pub db_max_connections: u32,

    /// Address of the admin listener: `GET /metrics` (Prometheus). Kept off the public
    /// port, which faces Slack and webhook senders.
    #[arg(
        long,
        env = "WARREN_GATEWAY_METRICS_LISTEN",
        default_value = "127.0.0.1:9464"
    )]
    pub metrics_listen: SocketAddr,

    #[command(flatten)]
    pub telemetry: warren_telemetry::TelemetryOptions,
}

impl Config {
    /// The database URL, from `DATABASE_URL` or `--database-url-file`.
    pub fn database_url(&self) -> Result<Secret, SecretError> {
        Secret::from_env_or_file("DATABASE_URL", self.database_url_file.as_deref())?.ok_or(
            SecretError::Empty {
                var: "DATABASE_URL (or --database-url-file)".into(),
            },
        )
    }

    /// The Slack signing secret, from `SLACK_SIGNING_SECRET` or its file.
    pub fn slack_signing_secret(&self) -> Result<Option<Secret>, SecretError> {
        Secret::from_env_or_file(
            "SLACK_SIGNING_SECRET",
            self.slack_signing_secret_file.as_deref(),
        )
    }

    /// The Slack bot token, from `SLACK_BOT_TOKEN` or its file.
    pub fn slack_bot_token(&self) -> Result<Option<Secret>, SecretError> {
        Secret::from_env_or_file("SLACK_BOT_TOKEN", self.slack_bot_token_file.as_deref())
    }

    /// What one client may hold on the public port.
    pub fn limits(&self) -> crate::http::Limits {
        crate::http::Limits {
            listener: "public",
            max_connections: self.max_connections,
            header_read_timeout: std::time::Duration::from_millis(self.header_read_timeout_ms),
            request_timeout: std::time::Duration::from_millis(self.request_timeout_ms),
            retry_after_secs: 1,
            listen_backlog: self.listen_backlog,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_metrics_listener_is_on_loopback_unless_told_otherwise() {
        use clap::Parser;
        let config = Config::try_parse_from(["warren-gateway"]).expect("parses");
        // (WARREN_GATEWAY_METRICS_LISTEN, if the test's environment sets it, wins.)
        if std::env::var_os("WARREN_GATEWAY_METRICS_LISTEN").is_none() {
            assert!(
                config.metrics_listen.ip().is_loopback(),
                "{}",
                config.metrics_listen
            );
        }
    }

    #[test]
    fn secrets_are_not_flags() {
        use clap::Parser;
        for flag in [
            "--database-url",
            "--slack-signing-secret",
            "--slack-bot-token",
        ] {
            let e = Config::try_parse_from(["warren-gateway", flag, "s3cret"])
                .expect_err("a secret on the command line");
            assert_eq!(e.kind(), clap::error::ErrorKind::UnknownArgument, "{flag}");
        }
    }
}
