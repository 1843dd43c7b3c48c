//! Request signature verification, on the raw body before any parsing. Pure functions: no
//! I/O, the clock is passed in. Every comparison of a signature is constant-time
//! (`Mac::verify_slice`).
//!
//! Schemes:
//! - Slack: `X-Slack-Signature: v0=hex(HMAC-SHA256(secret, "v0:{timestamp}:{body}"))`, with
//!   `X-Slack-Request-Timestamp` within 5 minutes of now.
//! - GitHub: `X-Hub-Signature-256: sha256=hex(HMAC-SHA256(secret, body))`.
//! - Standard Webhooks (Svix and others): `webhook-signature: v1,base64(HMAC-SHA256(key,
//!   "{webhook-id}.{webhook-timestamp}.{body}"))`, several space-separated; the secret is
//!   `whsec_` + base64 of the key; the timestamp within 5 minutes of now.
//! - Plain HMAC: a configured header carrying `hex(HMAC-SHA256(secret, body))`, optionally
//!   prefixed `sha256=`.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// How far a signed timestamp may be from now, either way (Slack's and Standard Webhooks'
/// recommendation).
pub const TIMESTAMP_TOLERANCE_SECS: i64 = 5 * 60;

/// Why a request was refused. Messages name the problem, never a secret or the expected
/// signature.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("missing header {0}")]
    MissingHeader(&'static str),
    #[error("malformed header {0}")]
    MalformedHeader(&'static str),
    #[error("timestamp is more than 5 minutes from now")]
    StaleTimestamp,
    #[error("signature does not match")]
    BadSignature,
    /// The configured secret is unusable (a server-side error, not the sender's).
    #[error("the configured secret is not valid for this scheme")]
    BadSecret,
}

/// The signature-related headers of a request, looked up case-insensitively by the caller.
pub trait Headers {
    fn get(&self, name: &'static str) -> Option<&str>;
}

impl Headers for http::HeaderMap {
    fn get(&self, name: &'static str) -> Option<&str> {
        http::HeaderMap::get(self, name).and_then(|v| v.to_str().ok())
    }
}

fn header<'a>(h: &'a impl Headers, name: &'static str) -> Result<&'a str, VerifyError> {
    h.get(name)
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .ok_or(VerifyError::MissingHeader(name))
}

fn mac(key: &[u8]) -> Result<HmacSha256, VerifyError> {
    HmacSha256::new_from_slice(key).map_err(|_| VerifyError::BadSecret)
}

fn check_timestamp(raw: &str, name: &'static str, now: i64) -> Result<(), VerifyError> {
    let ts: i64 = raw
        .parse()
        .map_err(|_| VerifyError::MalformedHeader(name))?;
    // Checked: `now - ts` overflows for timestamps near i64's ends (a panic in debug
    // builds, a wrapped, accepted difference in release).
    match now.checked_sub(ts).map(i64::unsigned_abs) {
        Some(skew) if skew <= TIMESTAMP_TOLERANCE_SECS.unsigned_abs() => Ok(()),
        _ => Err(VerifyError::StaleTimestamp),
    }
}

fn verify_hex(m: HmacSha256, hex_sig: &str, name: &'static str) -> Result<(), VerifyError> {
    let sig = hex::decode(hex_sig).map_err(|_| VerifyError::MalformedHeader(name))?;
    m.verify_slice(&sig).map_err(|_| VerifyError::BadSignature)
}

/// Verifies a request from Slack. `now` is Unix seconds.
pub fn slack(secret: &[u8], h: &impl Headers, body: &[u8], now: i64) -> Result<(), VerifyError> {
    const TS: &str = "x-slack-request-timestamp";
    const SIG: &str = "x-slack-signature";
    let ts = header(h, TS)?;
    let sig = header(h, SIG)?;
    check_timestamp(ts, TS, now)?;
    let hex_sig = sig
        .strip_prefix("v0=")
        .ok_or(VerifyError::MalformedHeader(SIG))?;
    let mut m = mac(secret)?;
    m.update(b"v0:");
    m.update(ts.as_bytes());
    m.update(b":");
    m.update(body);
    verify_hex(m, hex_sig, SIG)
}

/// Verifies a GitHub webhook delivery.
pub fn github(secret: &[u8], h: &impl Headers, body: &[u8]) -> Result<(), VerifyError> {
    const SIG: &str = "x-hub-signature-256";
    let hex_sig = header(h, SIG)?
        .strip_prefix("sha256=")
        .ok_or(VerifyError::MalformedHeader(SIG))?;
    let mut m = mac(secret)?;
    m.update(body);
    verify_hex(m, hex_sig, SIG)
}

/// Verifies a Standard Webhooks delivery. `secret` is the configured `whsec_...` string.
pub fn standard_webhooks(
    secret: &str,
    h: &impl Headers,
    body: &[u8],
    now: i64,
) -> Result<(), VerifyError> {
    const ID: &str = "webhook-id";
    const TS: &str = "webhook-timestamp";
    const SIG: &str = "webhook-signature";
    let key = BASE64
        .decode(secret.strip_prefix("whsec_").unwrap_or(secret))
        .map_err(|_| VerifyError::BadSecret)?;
    let id = header(h, ID)?;
    let ts = header(h, TS)?;
    let sigs = header(h, SIG)?;
    check_timestamp(ts, TS, now)?;
    let mut m = mac(&key)?;
    m.update(id.as_bytes());
    m.update(b".");
    m.update(ts.as_bytes());
    m.update(b".");
    m.update(body);
    // Several signatures may be sent during a key rotation; one valid v1 suffices.
    let mut saw_v1 = false;
    for candidate in sigs.split_whitespace() {
        let Some(b64) = candidate.strip_prefix("v1,") else {
            continue;
        };
        saw_v1 = true;
        if let Ok(sig) = BASE64.decode(b64)
            && m.clone().verify_slice(&sig).is_ok()
        {
            return Ok(());
        }
    }
    Err(if saw_v1 {
        VerifyError::BadSignature
    } else {
        VerifyError::MalformedHeader(SIG)
    })
}

/// Verifies a plain HMAC-SHA256 signature carried in `header_name`.
pub fn hmac_sha256(
    secret: &[u8],
    header_name: &'static str,
    h: &impl Headers,
    body: &[u8],
) -> Result<(), VerifyError> {
    let value = header(h, header_name)?;
    let hex_sig = value.strip_prefix("sha256=").unwrap_or(value);
    let mut m = mac(secret)?;
    m.update(body);
    verify_hex(m, hex_sig, header_name)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    struct H(HashMap<&'static str, String>);
    impl Headers for H {
        fn get(&self, name: &'static str) -> Option<&str> {
            self.0.get(name).map(String::as_str)
        }
    }
    fn h(pairs: &[(&'static str, &str)]) -> H {
        H(pairs.iter().map(|(k, v)| (*k, (*v).to_owned())).collect())
    }

    fn sign(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
        let mut m = HmacSha256::new_from_slice(key).expect("any key length");
        for p in parts {
            m.update(p);
        }
        m.finalize().into_bytes().to_vec()
    }

    const NOW: i64 = 1_700_000_000;

    fn slack_headers(secret: &[u8], ts: i64, body: &[u8]) -> H {
        let ts = ts.to_string();
        let sig = hex::encode(sign(secret, &[b"v0:", ts.as_bytes(), b":", body]));
        h(&[
            ("x-slack-request-timestamp", &ts),
            ("x-slack-signature", &format!("v0={sig}")),
        ])
    }

    #[test]
    fn slack_accepts_a_valid_signature_and_refuses_everything_else() {
        let (secret, body) = (
            b"8f742231b10e8888abcd99yyyzzz85a5",
            br#"{"type":"event_callback"}"#,
        );
        let ok = slack_headers(secret, NOW, body);
        assert_eq!(slack(secret, &ok, body, NOW), Ok(()));
        assert_eq!(
            slack(b"wrong", &ok, body, NOW),
            Err(VerifyError::BadSignature)
        );
        assert_eq!(
            slack(secret, &ok, br#"{"type":"event_callbacK"}"#, NOW),
            Err(VerifyError::BadSignature),
            "tampered body"
        );
        // 5 minutes is allowed either way; beyond is not.
        assert_eq!(slack(secret, &ok, body, NOW + 300), Ok(()));
        assert_eq!(
            slack(secret, &ok, body, NOW + 301),
            Err(VerifyError::StaleTimestamp)
        );
        assert_eq!(
            slack(secret, &ok, body, NOW - 301),
            Err(VerifyError::StaleTimestamp),
            "a timestamp from the future"
        );
        let no_sig = h(&[("x-slack-request-timestamp", &NOW.to_string())]);
        assert_eq!(
            slack(secret, &no_sig, body, NOW),
            Err(VerifyError::MissingHeader("x-slack-signature"))
        );
        let no_ts = h(&[("x-slack-signature", "v0=00")]);
        assert_eq!(
            slack(secret, &no_ts, body, NOW),
            Err(VerifyError::MissingHeader("x-slack-request-timestamp"))
        );
        let bad = h(&[
            ("x-slack-request-timestamp", &NOW.to_string()),
            ("x-slack-signature", "v1=abcd"),
        ]);
        assert_eq!(
            slack(secret, &bad, body, NOW),
            Err(VerifyError::MalformedHeader("x-slack-signature"))
        );
    }

    #[test]
    fn github_matches_its_documented_test_vector() {
        // From GitHub's "Validating webhook deliveries".
        let headers = h(&[(
            "x-hub-signature-256",
            "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17",
        )]);
        assert_eq!(
            github(b"It's a Secret to Everybody", &headers, b"Hello, World!"),
            Ok(())
        );
        assert_eq!(
            github(b"It's a Secret to Everybody", &headers, b"Hello, World?"),
            Err(VerifyError::BadSignature)
        );
        assert_eq!(
            github(b"another secret", &headers, b"Hello, World!"),
            Err(VerifyError::BadSignature)
        );
        assert_eq!(
            github(b"s", &h(&[]), b"x"),
            Err(VerifyError::MissingHeader("x-hub-signature-256"))
        );
    }

    #[test]
    fn standard_webhooks_accepts_any_valid_v1_signature() {
        let key = b"a 24 byte signing key!!!";
        let secret = format!("whsec_{}", BASE64.encode(key));
        let (id, ts, body) = ("msg_2KWPBgLlAfxdpx2AI54pPJ85f4W", NOW.to_string(), b"{}");
        let sig = BASE64.encode(sign(key, &[id.as_bytes(), b".", ts.as_bytes(), b".", body]));
        let headers = |sigs: &str| {
            h(&[
                ("webhook-id", id),
                ("webhook-timestamp", &ts),
                ("webhook-signature", sigs),
            ])
        };
        // A rotation sends several; an unknown version is skipped.
        let rotated = format!("v1,{} v2,zzz v1,{sig}", BASE64.encode([0u8; 32]));
        assert_eq!(
            standard_webhooks(&secret, &headers(&rotated), body, NOW),
            Ok(())
        );
        assert_eq!(
            standard_webhooks(&secret, &headers(&format!("v1,{sig}")), b"{ }", NOW),
            Err(VerifyError::BadSignature)
        );
        assert_eq!(
            standard_webhooks(&secret, &headers(&format!("v1,{sig}")), body, NOW + 600),
            Err(VerifyError::StaleTimestamp)
        );
        assert_eq!(
            standard_webhooks(&secret, &headers("v2,abc"), body, NOW),
            Err(VerifyError::MalformedHeader("webhook-signature"))
        );
        assert_eq!(
            standard_webhooks("whsec_***not base64***", &headers("v1,abc"), body, NOW),
            Err(VerifyError::BadSecret)
        );
    }

    #[test]
    fn plain_hmac_accepts_bare_or_prefixed_hex() {
        let sig = hex::encode(sign(b"k", &[b"payload"]));
        for value in [sig.clone(), format!("sha256={sig}")] {
            let headers = h(&[("x-signature-256", &value)]);
            assert_eq!(
                hmac_sha256(b"k", "x-signature-256", &headers, b"payload"),
                Ok(())
            );
            assert_eq!(
                hmac_sha256(b"k", "x-signature-256", &headers, b"payloaD"),
                Err(VerifyError::BadSignature)
            );
        }
        let headers = h(&[("x-signature-256", "not hex")]);
        assert_eq!(
            hmac_sha256(b"k", "x-signature-256", &headers, b"payload"),
            Err(VerifyError::MalformedHeader("x-signature-256"))
        );
    }

    #[test]
    fn error_messages_carry_no_secret_material() {
        let secret = b"super-secret-value";
        let body = b"{}";
        let headers = slack_headers(b"other", NOW, body);
        let err = slack(secret, &headers, body, NOW).expect_err("wrong secret");
        let text = format!("{err} {err:?}");
        assert!(!text.contains("super-secret-value"));
        let expected = hex::encode(sign(
            secret,
            &[b"v0:", NOW.to_string().as_bytes(), b":", body],
        ));
        assert!(
            !text.contains(&expected),
            "the expected signature must not leak"
        );
    }

    #[test]
    fn extreme_timestamps_are_stale_not_a_panic_or_an_acceptance() {
        let body = b"{}";
        for ts in [i64::MIN, i64::MIN + 1, i64::MAX, -NOW] {
            let h = slack_headers(b"secret", ts, body);
            assert!(
                matches!(
                    slack(b"secret", &h, body, NOW),
                    Err(VerifyError::StaleTimestamp)
                ),
                "timestamp {ts}"
            );
        }
        let h = slack_headers(b"secret", NOW - TIMESTAMP_TOLERANCE_SECS, body);
        assert!(
            slack(b"secret", &h, body, NOW).is_ok(),
            "the edge of the window"
        );
    }
}
