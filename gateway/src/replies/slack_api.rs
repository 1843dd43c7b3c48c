//! The Slack Web API calls the gateway makes, over real HTTP to a configurable base URL
//! (`https://slack.com/api` by default; tests and air-gapped installs point it elsewhere).

use std::time::Duration;

use serde::Deserialize;
use serde_json::json;
use warren_schema::Secret;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum SlackApiError {
    /// HTTP 429: wait this long, then retry.
    #[error("rate limited by Slack; retry after {0:?}")]
    RateLimited(Duration),
    /// Network trouble or a 5xx: worth retrying with backoff.
    #[error("Slack unreachable or failing: {0}")]
    Transient(String),
    /// Slack refused the call (`ok: false`), such as `channel_not_found` or `not_in_channel`.
    /// Retrying will not help.
    #[error("Slack refused the call: {0}")]
    Refused(String),
}

#[derive(Debug, Clone)]
pub struct SlackApi {
    http: reqwest::Client,
    base_url: String,
    token: Secret,
}

#[derive(Deserialize)]
struct PostMessageResponse {
    ok: bool,
    ts: Option<String>,
    error: Option<String>,
}

impl SlackApi {
    pub fn new(base_url: &str, token: Secret) -> Result<Self, SlackApiError> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| SlackApiError::Transient(e.to_string()))?;
        Ok(Self {
            http,
            base_url: base_url.trim_end_matches('/').to_owned(),
            token,
        })
    }

    /// `chat.postMessage`; returns the posted message's `ts`.
    pub async fn post_message(
        &self,
        channel: &str,
        thread_ts: Option<&str>,
        text: &str,
    ) -> Result<String, SlackApiError> {
        let mut body = json!({ "channel": channel, "text": text });
        if let Some(ts) = thread_ts {
            body["thread_ts"] = json!(ts);
        }
        let response = self
            .http
            .post(format!("{}/chat.postMessage", self.base_url))
            .bearer_auth(self.token.expose())
            .json(&body)
            .send()
            .await
            // reqwest errors name the URL, never the Authorization header.
            .map_err(|e| SlackApiError::Transient(e.without_url().to_string()))?;
        let status = response.status();
        if status == reqwest::StatusCode::TOO_MANY_REQUESTS {
            let secs = response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(1);
            return Err(SlackApiError::RateLimited(Duration::from_secs(secs)));
        }
        if status.is_server_error() {
            return Err(SlackApiError::Transient(format!("HTTP {status}")));
        }
        let parsed: PostMessageResponse = response.json().await.map_err(|e| {
            SlackApiError::Transient(format!("unreadable response: {}", e.without_url()))
        })?;
        match (parsed.ok, parsed.ts) {
            (true, Some(ts)) => Ok(ts),
            (true, None) => Err(SlackApiError::Transient("ok response without ts".into())),
            (false, _) => Err(SlackApiError::Refused(
                parsed.error.unwrap_or_else(|| "unknown_error".into()),
            )),
        }
    }
}
