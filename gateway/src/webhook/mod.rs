//! Webhook endpoints: configuration, verification by scheme, and what a delivery stores.

pub mod registry;

use std::collections::HashMap;
use std::path::Path;

use serde::Deserialize;
use serde_json::Value;
use sha2::{Digest, Sha256};
use warren_schema::events::{MessageReceived, Origin, WebhookReceived};
use warren_schema::{AppendRequest, EventId, Metadata, NewEvent, Secret};

use crate::verify::{self, Headers, VerifyError};

/// How an endpoint's deliveries are signed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scheme {
    Github,
    StandardWebhooks,
    HmacSha256,
}

impl Scheme {
    fn name(self) -> &'static str {
        match self {
            Self::Github => "github",
            Self::StandardWebhooks => "standard_webhooks",
            Self::HmacSha256 => "hmac_sha256",
        }
    }
}

/// One configured endpoint, `/webhooks/{name}`.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub name: String,
    pub scheme: Scheme,
    pub secret: Secret,
    /// After a rotation: the old secret, still accepted until this Unix time.
    pub previous: Option<(Secret, i64)>,
    /// The agent its deliveries are addressed to.
    pub agent: String,
    /// `hmac_sha256` only: the header carrying the signature.
    pub signature_header: &'static str,
    /// `hmac_sha256` only: a header carrying a delivery id; without one, the body's SHA-256
    /// is the delivery id (so an identical redelivery is absorbed).
    pub delivery_header: Option<&'static str>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EndpointFile {
    endpoints: Vec<EndpointEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EndpointEntry {
    name: String,
    scheme: Scheme,
    secret: Option<String>,
    secret_file: Option<String>,
    agent: String,
    signature_header: Option<String>,
    delivery_header: Option<String>,
}

/// Errors in the endpoints file. They never include a secret.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("parsing {path}: {source}")]
    Parse {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("endpoint {0:?}: {1}")]
    Endpoint(String, &'static str),
}

/// Loads endpoints from a JSON file: `{"endpoints": [{"name", "scheme", "secret" or
/// "secret_file", "agent", "signature_header"?, "delivery_header"?}]}`.
pub fn load(path: &Path) -> Result<HashMap<String, Endpoint>, ConfigError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: shown.clone(),
        source,
    })?;
    let file: EndpointFile = serde_json::from_str(&text).map_err(|source| ConfigError::Parse {
        path: shown,
        source,
    })?;
    let mut endpoints = HashMap::new();
    for e in file.endpoints {
        let bad = |why| ConfigError::Endpoint(e.name.clone(), why);
        if e.name.is_empty()
            || !e
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(bad("name must be letters, digits, - or _"));
        }
        let secret = match (&e.secret, &e.secret_file) {
            (Some(s), None) => s.clone(),
            (None, Some(f)) => std::fs::read_to_string(f)
                .map_err(|source| ConfigError::Read {
                    path: f.clone(),
                    source,
                })?
                .trim_end_matches(['\r', '\n'])
                .to_owned(),
            _ => return Err(bad("exactly one of secret and secret_file is required")),
        };
        // An empty key lets anyone sign: `""`, blanks, or a bare `whsec_` (whose key,
        // base64-decoded, is empty).
        let key_empty = match e.scheme {
            Scheme::StandardWebhooks => secret
                .trim()
                .strip_prefix("whsec_")
                .unwrap_or(secret.trim())
                .is_empty(),
            _ => secret.trim().is_empty(),
        };
        if key_empty {
            return Err(bad("the secret is empty"));
        }
        let endpoint = Endpoint {
            name: e.name.clone(),
            scheme: e.scheme,
            secret: Secret::new(secret),
            previous: None,
            agent: e.agent.clone(),
            signature_header: e
                .signature_header
                .as_deref()
                .map_or("x-signature-256", registry::intern),
            delivery_header: e.delivery_header.as_deref().map(registry::intern),
        };
        if endpoints.insert(e.name.clone(), endpoint).is_some() {
            return Err(bad("configured twice"));
        }
    }
    Ok(endpoints)
}

/// Why a delivery was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    Signature(VerifyError),
    Malformed(String),
}

/// What makes a delivery the same delivery, so that storing it again adds nothing: what its
/// signature covers. Standard Webhooks signs the delivery id with the body and a timestamp,
/// so the id is the key. GitHub and plain HMAC sign the body alone: anyone who saw one
/// delivery could send it again under a new delivery id, so the key is the body's SHA-256.
/// (A sender of such a scheme that sends the same bytes twice on purpose must put something
/// unique in them: a delivery id or a timestamp in the body.)
pub fn replay_key(scheme: Scheme, delivery_id: &str, body: &[u8]) -> String {
    match scheme {
        Scheme::StandardWebhooks => delivery_id.to_owned(),
        Scheme::Github | Scheme::HmacSha256 => {
            format!("sha256:{}", hex::encode(Sha256::digest(body)))
        }
    }
}

/// Checks the signature with the endpoint's secret, or, during a rotation's grace period,
/// with the previous one.
fn verify_signature(
    endpoint: &Endpoint,
    h: &impl Headers,
    body: &[u8],
    now: i64,
) -> Result<(), VerifyError> {
    let check = |secret: &str| match endpoint.scheme {
        Scheme::Github => verify::github(secret.as_bytes(), h, body),
        Scheme::StandardWebhooks => verify::standard_webhooks(secret, h, body, now),
        Scheme::HmacSha256 => {
            verify::hmac_sha256(secret.as_bytes(), endpoint.signature_header, h, body)
        }
    };
    match (check(endpoint.secret.expose()), &endpoint.previous) {
        (Err(VerifyError::BadSignature), Some((previous, until))) if now < *until => {
            check(previous.expose())
        }
        (result, _) => result,
    }
}

/// Verifies a delivery and builds what to store: the delivery as received and a message for
/// the endpoint's agent, both keyed by [`replay_key`] so a redelivery, or a replay of the
/// same signed body under another delivery id, stores nothing new.
pub fn accept(
    endpoint: &Endpoint,
    h: &impl Headers,
    content_type: Option<&str>,
    body: &[u8],
    now: i64,
    traceparent: Option<String>,
) -> Result<AppendRequest, Refusal> {
    verify_signature(endpoint, h, body, now).map_err(Refusal::Signature)?;
    let (delivery_id, event) = match endpoint.scheme {
        Scheme::Github => {
            let id = h
                .get("x-github-delivery")
                .ok_or_else(|| Refusal::Malformed("missing X-GitHub-Delivery".into()))?;
            (id.to_owned(), h.get("x-github-event").map(str::to_owned))
        }
        Scheme::StandardWebhooks => {
            let id = h.get("webhook-id").unwrap_or_default();
            (id.to_owned(), None)
        }
        Scheme::HmacSha256 => {
            let id = match endpoint.delivery_header.and_then(|name| h.get(name)) {
                Some(id) => id.to_owned(),
                None => format!("sha256:{}", hex::encode(Sha256::digest(body))),
            };
            (id, None)
        }
    };
    if delivery_id.is_empty() || delivery_id.len() > 256 {
        return Err(Refusal::Malformed(
            "delivery id must be 1 to 256 bytes".into(),
        ));
    }
    let key = replay_key(endpoint.scheme, &delivery_id, body);

    let is_json = content_type.is_some_and(|c| c.contains("json"));
    let body_value = if is_json {
        serde_json::from_slice::<Value>(body)
            .map_err(|e| Refusal::Malformed(format!("body is not valid JSON: {e}")))?
    } else {
        Value::String(String::from_utf8_lossy(body).into_owned())
    };
    let text = match &body_value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };

    let raw_id = EventId::derive(&["webhook", &endpoint.name, &key]);
    let mut raw_meta = Metadata::new("gateway/webhook");
    raw_meta.traceparent = traceparent.clone();
    raw_meta.actor = Some(format!("webhook:{}", endpoint.name));
    let raw = NewEvent::from_domain(
        raw_id,
        &WebhookReceived {
            endpoint: endpoint.name.clone(),
            scheme: endpoint.scheme.name().into(),
            delivery_id: delivery_id.clone(),
            event: event.clone(),
            content_type: content_type.map(str::to_owned),
            body: body_value,
        },
        raw_meta.clone(),
    )
    .map_err(|e| Refusal::Malformed(e.to_string()))?;

    let mut meta = raw_meta;
    meta.causation_id = Some(raw_id);
    meta.correlation_id = Some(raw_id);
    let message = NewEvent::from_domain(
        EventId::derive(&["webhook-message", &endpoint.name, &key]),
        &MessageReceived {
            origin: Origin::Webhook {
                endpoint: endpoint.name.clone(),
                delivery_id,
            },
            text,
            addressed_agents: vec![endpoint.agent.clone()],
            files: Vec::new(),
        },
        meta,
    )
    .map_err(|e| Refusal::Malformed(e.to_string()))?;
    Ok(AppendRequest::new(
        format!("webhook:{}", endpoint.name),
        vec![raw, message],
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn after_a_rotation_the_previous_secret_verifies_until_its_grace_ends() {
        use hmac::{KeyInit, Mac};
        let sign = |secret: &str, body: &[u8]| {
            let mut mac = hmac::Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("key");
            mac.update(body);
            let mut headers = http::HeaderMap::new();
            let value = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
            headers.insert("x-signature-256", value.parse().expect("a header"));
            headers
        };
        let endpoint = Endpoint {
            name: "ci".into(),
            scheme: Scheme::HmacSha256,
            secret: Secret::new("new"),
            previous: Some((Secret::new("old"), 1_000)),
            agent: "a".into(),
            signature_header: "x-signature-256",
            delivery_header: None,
        };
        let body = b"{}";
        assert_eq!(
            verify_signature(&endpoint, &sign("new", body), body, 999),
            Ok(())
        );
        assert_eq!(
            verify_signature(&endpoint, &sign("old", body), body, 999),
            Ok(())
        );
        assert_eq!(
            verify_signature(&endpoint, &sign("old", body), body, 1_000),
            Err(VerifyError::BadSignature),
            "the grace is over"
        );
        assert_eq!(
            verify_signature(&endpoint, &sign("other", body), body, 999),
            Err(VerifyError::BadSignature)
        );
    }

    fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write");
        path
    }

    #[test]
    fn loads_endpoints_with_inline_and_file_secrets() {
        let dir = std::env::temp_dir().join(format!("warren-webhooks-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let secret = write(&dir, "gh.secret", "from-a-file\n");
        let config = write(
            &dir,
            "ok.json",
            &format!(
                r#"{{"endpoints": [
                  {{"name": "github", "scheme": "github", "secret_file": "{}", "agent": "triage"}},
                  {{"name": "ci", "scheme": "hmac_sha256", "secret": "inline", "agent": "ci",
                    "signature_header": "X-Sig", "delivery_header": "X-Id"}}]}}"#,
                secret.display()
            ),
        );
        let endpoints = load(&config).expect("valid config");
        assert_eq!(endpoints["github"].secret.expose(), "from-a-file");
        assert_eq!(endpoints["github"].scheme, Scheme::Github);
        assert_eq!(
            endpoints["ci"].signature_header, "x-sig",
            "header names are lowercased"
        );
        assert_eq!(endpoints["ci"].delivery_header, Some("x-id"));
        assert_eq!(endpoints["ci"].signature_header.len(), 5);

        for (name, body, why) in [
            (
                "dup.json",
                r#"{"endpoints": [{"name": "a", "scheme": "github", "secret": "s", "agent": "x"},
                                            {"name": "a", "scheme": "github", "secret": "s", "agent": "x"}]}"#,
                "twice",
            ),
            (
                "name.json",
                r#"{"endpoints": [{"name": "a/b", "scheme": "github", "secret": "s", "agent": "x"}]}"#,
                "name",
            ),
            (
                "both.json",
                r#"{"endpoints": [{"name": "a", "scheme": "github", "agent": "x"}]}"#,
                "exactly one",
            ),
            (
                "empty.json",
                r#"{"endpoints": [{"name": "a", "scheme": "github", "secret": "", "agent": "x"}]}"#,
                "empty",
            ),
            (
                "blank.json",
                r#"{"endpoints": [{"name": "a", "scheme": "hmac_sha256", "secret": "  ", "agent": "x"}]}"#,
                "empty",
            ),
            (
                "bare-whsec.json",
                r#"{"endpoints": [{"name": "a", "scheme": "standard_webhooks", "secret": "whsec_", "agent": "x"}]}"#,
                "empty",
            ),
        ] {
            let err = load(&write(&dir, name, body)).expect_err(name).to_string();
            assert!(err.contains(why), "{name}: {err}");
            assert!(!err.contains("\"s\""), "no secret in {err}");
        }
        let err = load(&write(
            &dir,
            "typo.json",
            r#"{"endpoints": [{"name": "a", "scheme": "gitlab", "secret": "s", "agent": "x"}]}"#,
        ))
        .expect_err("unknown scheme");
        assert!(matches!(err, ConfigError::Parse { .. }));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
