//! The Slack Web API calls the gateway makes, over real HTTP to a configurable base URL
//! (`https://slack.com/api` by default; tests and air-gapped installs point it elsewhere),
//! and downloads of files attached to messages (`url_private`, with the same bot token).

use std::time::Duration;

use serde_json::{Value, json};
use tracing::Instrument;
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

/// The `event_type` of the metadata Warren puts on every reply it posts; its
/// `event_payload` is `{"reply_id": "<agent.replied event id>"}`. It is how a reply is
/// found in its thread after a crash between Slack's accept and Warren's record
/// ([`SlackApi::find_reply`]).
pub const REPLY_METADATA_TYPE: &str = "warren_reply";

/// Most pages of a thread (or channel) read when looking for a reply: 10 × 200 messages.
const LOOKUP_PAGES: usize = 10;

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

    /// `chat.postMessage` of `text`, carrying `reply_id` in its metadata; returns the
    /// posted message's `ts`.
    pub async fn post_message(
        &self,
        channel: &str,
        thread_ts: Option<&str>,
        text: &str,
        reply_id: &str,
    ) -> Result<String, SlackApiError> {
        let mut body = json!({
            "channel": channel,
            "text": text,
            "metadata": {"event_type": REPLY_METADATA_TYPE,
                         "event_payload": {"reply_id": reply_id}},
        });
        if let Some(ts) = thread_ts {
            body["thread_ts"] = json!(ts);
        }
        let request = self
            .http
            .post(format!("{}/chat.postMessage", self.base_url))
            .json(&body);
        let answer = self.call("chat.postMessage", request).await?;
        match answer["ts"].as_str() {
            Some(ts) => Ok(ts.to_owned()),
            None => Err(SlackApiError::Transient("ok response without ts".into())),
        }
    }

    /// The `ts` of the message Warren posted for `reply_id`, if Slack has one: in the
    /// thread `thread_ts` (`conversations.replies`), or for a reply to the channel itself
    /// in the channel's history (`conversations.history`); either from `oldest` (a Slack
    /// `ts`) on, with `include_all_metadata`, page by page (at most [`LOOKUP_PAGES`]).
    /// Needs the `*:history` scopes of the conversation's kind.
    pub async fn find_reply(
        &self,
        channel: &str,
        thread_ts: Option<&str>,
        oldest: &str,
        reply_id: &str,
    ) -> Result<Option<String>, SlackApiError> {
        let method = match thread_ts {
            Some(_) => "conversations.replies",
            None => "conversations.history",
        };
        let mut cursor = String::new();
        for _ in 0..LOOKUP_PAGES {
            let mut query = vec![
                ("channel", channel),
                ("oldest", oldest),
                ("inclusive", "true"),
                ("include_all_metadata", "true"),
                ("limit", "200"),
            ];
            if let Some(ts) = thread_ts {
                query.push(("ts", ts));
            }
            if !cursor.is_empty() {
                query.push(("cursor", &cursor));
            }
            let query = serde_urlencoded::to_string(&query)
                .map_err(|e| SlackApiError::Refused(e.to_string()))?;
            let request = self.http.get(format!("{}/{method}?{query}", self.base_url));
            let page = self.call(method, request).await?;
            let messages = page["messages"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default();
            if let Some(found) = messages.iter().find(|m| {
                m["metadata"]["event_type"] == REPLY_METADATA_TYPE
                    && m["metadata"]["event_payload"]["reply_id"] == reply_id
            }) {
                return Ok(found["ts"].as_str().map(str::to_owned));
            }
            cursor = page["response_metadata"]["next_cursor"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            if cursor.is_empty() {
                break;
            }
        }
        Ok(None)
    }

    /// Sends `request` with the bot token: network errors and 5xx as errors to retry, 429
    /// as a wait; any other answer is the caller's to read.
    async fn send(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, SlackApiError> {
        let response = request
            .bearer_auth(self.token.expose())
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
        Ok(response)
    }

    /// One Web API call with the bot token: 429 and 5xx as errors to retry, `ok: false` as
    /// a refusal; the answer's JSON otherwise.
    async fn call(
        &self,
        method: &'static str,
        request: reqwest::RequestBuilder,
    ) -> Result<Value, SlackApiError> {
        self.call_once(request)
            .instrument(tracing::info_span!("slack_api", method))
            .await
    }

    async fn call_once(&self, request: reqwest::RequestBuilder) -> Result<Value, SlackApiError> {
        let response = self.send(request).await?;
        let answer: Value = response.json().await.map_err(|e| {
            SlackApiError::Transient(format!("unreadable response: {}", e.without_url()))
        })?;
        if answer["ok"] != true {
            return Err(SlackApiError::Refused(
                answer["error"]
                    .as_str()
                    .unwrap_or("unknown_error")
                    .to_owned(),
            ));
        }
        Ok(answer)
    }

    /// Downloads a file Slack serves at `url` (a message's `url_private_download`), with
    /// the bot token, and at most `limit` bytes of it: a larger file is refused as soon as
    /// its announced length or its bytes so far pass the limit, never read whole.
    ///
    /// The caller checks that `url` is Slack's: the token goes wherever `url` points. On a
    /// redirect to another host the client drops the `Authorization` header.
    pub async fn download(&self, url: &str, limit: u64) -> Result<Download, SlackApiError> {
        let request = self.http.get(url).timeout(DOWNLOAD_TIMEOUT);
        let mut response = self.send(request).await?;
        let status = response.status();
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
