//! The Slack Web API calls the gateway makes, over real HTTP to a configurable base URL
//! (`https://slack.com/api` by default; tests and air-gapped installs point it elsewhere),
//! and downloads of files attached to messages (`url_private`, with the same bot token).

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
            return Err(SlackApiError::RateLimited(retry_after(&response)));
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

    /// Downloads a file Slack serves at `url` (a message's `url_private_download`), with
    /// the bot token, and at most `limit` bytes of it: a larger file is refused as soon as
    /// its announced length or its bytes so far pass the limit, never read whole.
    ///
    /// The caller checks that `url` is Slack's: the token goes wherever `url` points. On a
    /// redirect to another host the client drops the `Authorization` header.
    pub async fn download(&self, url: &str, limit: u64) -> Result<Download, SlackApiError> {
        let mut response = self
            .http
            .get(url)
            .bearer_auth(self.token.expose())
            .timeout(DOWNLOAD_TIMEOUT)
            .send()
            .await
            .map_err(|e| SlackApiError::Transient(e.without_url().to_string()))?;
        let status = response.status();
        if status == reqwest::StatusCode::TOO_MANY_REQUESTS {
            return Err(SlackApiError::RateLimited(retry_after(&response)));
        }
        if status.is_server_error() {
            return Err(SlackApiError::Transient(format!("HTTP {status}")));
        }
        if !status.is_success() {
            return Err(SlackApiError::Refused(format!("HTTP {status}")));
        }
        let content_type = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        if response.content_length().is_some_and(|n| n > limit) {
            return Err(SlackApiError::Refused(too_large(limit)));
        }
        let mut bytes = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| SlackApiError::Transient(e.without_url().to_string()))?
        {
            if bytes.len() as u64 + chunk.len() as u64 > limit {
                return Err(SlackApiError::Refused(too_large(limit)));
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok(Download {
            bytes,
            content_type,
        })
    }
}

/// A downloaded file.
#[derive(Debug)]
pub struct Download {
    pub bytes: Vec<u8>,
    /// The response's `Content-Type` (Slack's sign-in page is `text/html`).
    pub content_type: Option<String>,
}

/// Longest a file download may take (a 20 MiB file on a slow link).
const DOWNLOAD_TIMEOUT: Duration = Duration::from_secs(120);

fn too_large(limit: u64) -> String {
    format!("larger than the gateway's limit of {limit} bytes")
}

/// A 429's `Retry-After`, in seconds (1 when absent or unreadable).
fn retry_after(response: &reqwest::Response) -> Duration {
    let secs = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(1);
    Duration::from_secs(secs)
}
