//! The gateway's configuration: every setting a flag with an environment variable; secrets
//! also readable from files (`*_FILE`) and never printed (`[redacted]`).

use std::net::SocketAddr;
use std::path::PathBuf;

use warren_schema::Secret;

#[derive(Debug, clap::Parser)]
#[command(name = "warren-gateway", version, about)]
pub struct Config {
    /// Address to listen on.
    #[arg(long, env = "WARREN_GATEWAY_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,

    /// PostgreSQL connection string of Warren's database.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Secret,

    /// Slack app signing secret (Basic Information → App Credentials).
    #[arg(long, env = "SLACK_SIGNING_SECRET", hide_env_values = true)]
    pub slack_signing_secret: Option<Secret>,

    /// File holding the Slack signing secret (instead of SLACK_SIGNING_SECRET).
    #[arg(
        long,
        env = "SLACK_SIGNING_SECRET_FILE",
        conflicts_with = "slack_signing_secret"
    )]
    pub slack_signing_secret_file: Option<PathBuf>,

    /// Slack bot token (xoxb-...) for posting agents' replies. Without one, replies are
    /// recorded in the log but not sent.
    #[arg(long, env = "SLACK_BOT_TOKEN", hide_env_values = true)]
    pub slack_bot_token: Option<Secret>,

    /// File holding the Slack bot token (instead of SLACK_BOT_TOKEN).
    #[arg(long, env = "SLACK_BOT_TOKEN_FILE", conflicts_with = "slack_bot_token")]
    pub slack_bot_token_file: Option<PathBuf>,

    /// Base URL of Slack's Web API (a local server in tests and air-gapped installs).
    #[arg(long, env = "SLACK_API_URL", default_value = "https://slack.com/api")]
    pub slack_api_url: String,

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
    /// The Slack signing secret, from the flag, the environment or the file.
    pub fn slack_signing_secret(&self) -> std::io::Result<Option<Secret>> {
        secret_or_file(&self.slack_signing_secret, &self.slack_signing_secret_file)
    }

    /// The Slack bot token, from the flag, the environment or the file.
    pub fn slack_bot_token(&self) -> std::io::Result<Option<Secret>> {
        secret_or_file(&self.slack_bot_token, &self.slack_bot_token_file)
    }
}

/// A secret from its variable or its file. An empty one (`SLACK_SIGNING_SECRET=`, an empty
/// file) is an error, not "no secret": with an empty signing key anyone can sign.
fn secret_or_file(
    value: &Option<Secret>,
    file: &Option<PathBuf>,
) -> std::io::Result<Option<Secret>> {
    let secret = match (value, file) {
        (Some(s), _) => Some(s.clone()),
        (None, Some(p)) => {
            let text = std::fs::read_to_string(p)?;
            Some(Secret::new(text.trim_end_matches(['\r', '\n'])))
        }
        (None, None) => None,
    };
    if secret
        .as_ref()
        .is_some_and(|s| s.expose().trim().is_empty())
    {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the secret is empty: with an empty key anyone can sign; set it or unset it",
        ));
    }
    Ok(secret)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_metrics_listener_is_on_loopback_unless_told_otherwise() {
        use clap::Parser;
        let config = Config::try_parse_from(["warren-gateway", "--database-url", "postgres://x"])
            .expect("parses");
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
    fn an_empty_secret_is_refused_not_taken_as_none() {
        let empty = Some(Secret::new(""));
        let e = secret_or_file(&empty, &None).expect_err("empty");
        assert!(e.to_string().contains("anyone can sign"), "{e}");
        let file = std::env::temp_dir().join(format!("warren-empty-secret-{}", std::process::id()));
        std::fs::write(&file, "\n").expect("file");
        assert!(
            secret_or_file(&None, &Some(file.clone())).is_err(),
            "an empty file"
        );
        std::fs::remove_file(&file).expect("rm");
        assert!(secret_or_file(&None, &None).expect("unset").is_none());
        assert_eq!(
            secret_or_file(&Some(Secret::new("s3cret")), &None)
                .expect("set")
                .map(|s| s.expose().to_owned()),
            Some("s3cret".into())
        );
    }
}
