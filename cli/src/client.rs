//! The HTTP side: one request to the admin API, its failure as a typed error with the exit
//! code a script can rely on.

use reqwest::{Method, StatusCode};
use serde_json::Value;

/// Why a command failed. Each kind has its own exit code ([`Error::exit_code`]).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Settings missing or wrong (no server, unreadable token file).
    #[error("{0}")]
    Config(String),
    #[error("cannot reach the admin API at {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    /// The API refused the request; `detail` is its problem+json detail.
    #[error("{status}: {detail}")]
    Api { status: StatusCode, detail: String },
    #[error("the admin API answered something unexpected: {0}")]
    Protocol(String),
    #[error("writing the output: {0}")]
    Output(#[from] std::io::Error),
}

impl Error {
    /// 1: other failure; 2: usage (clap's); 3: not authenticated or not allowed; 4: not found;
    /// 5: conflict (taken, changed meanwhile, key reused); 6: unavailable (unreachable, 503).
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Config(_) => 2,
            Self::Connect { .. } => 6,
            Self::Api { status, .. } => match status.as_u16() {
                401 | 403 => 3,
                404 => 4,
                409 | 412 | 422 => 5,
                503 => 6,
                400 => 2,
                _ => 1,
            },
            Self::Protocol(_) | Self::Output(_) => 1,
        }
    }
}

/// The admin API, as one server and one token.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    pub server: String,
    token: Option<String>,
}

/// A request's answer: status, headers we use, and its JSON body.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub etag: Option<String>,
    pub body: Value,
}

impl Client {
    pub fn new(server: &str, token: Option<String>) -> Self {
        Self {
            http: reqwest::Client::new(),
            server: server.trim_end_matches('/').to_owned(),
            token,
        }
    }

    pub fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        let mut r = self.http.request(method, format!("{}{path}", self.server));
        if let Some(t) = &self.token {
            r = r.bearer_auth(t);
        }
        r
    }

    /// Sends and checks: a 2xx answer's JSON, or the API's problem as an [`Error::Api`].
    pub async fn send(&self, request: reqwest::RequestBuilder) -> Result<Answer, Error> {
        let response = request.send().await.map_err(|source| Error::Connect {
            url: self.server.clone(),
            source,
        })?;
        check(response).await
    }

    pub async fn get(&self, path: &str) -> Result<Value, Error> {
        Ok(self.send(self.request(Method::GET, path)).await?.body)
    }

    /// Every item of a paged list, following `next_cursor`, at most `max` (all when `None`).
    pub async fn list(&self, path: &str, max: Option<usize>) -> Result<Vec<Value>, Error> {
        let mut items = Vec::new();
        let mut cursor: Option<String> = None;
        let join = if path.contains('?') { '&' } else { '?' };
        loop {
            let page_path = match &cursor {
                Some(c) => format!("{path}{join}cursor={c}"),
                None => path.to_owned(),
            };
            let page = self.get(&page_path).await?;
            let got = page["items"]
                .as_array()
                .ok_or_else(|| Error::Protocol(format!("{page_path}: no items")))?;
            items.extend(got.iter().cloned());
            if max.is_some_and(|m| items.len() >= m) {
                items.truncate(max.unwrap_or(usize::MAX));
                return Ok(items);
            }
            match page["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_owned()),
                None => return Ok(items),
            }
        }
    }
}

async fn check(response: reqwest::Response) -> Result<Answer, Error> {
    let status = response.status();
    let etag = response
        .headers()
        .get("etag")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let text = response
        .text()
        .await
        .map_err(|e| Error::Protocol(e.to_string()))?;
    let body: Value = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or(Value::String(text))
    };
    if status.is_success() {
        return Ok(Answer { status, etag, body });
    }
    let detail = body["detail"]
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| body.to_string());
    Err(Error::Api { status, detail })
}
