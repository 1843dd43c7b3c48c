//! What the gateway's public door must hold for any bytes a sender can send. Shared by the
//! fuzz targets (`fuzz/fuzz_targets/`) and by `gateway/tests/bad_input.rs`, which replays
//! every seed and every kept crash case (`fuzz/seeds/`, `fuzz/regressions/`) on each test
//! run, so a case found once stays fixed.
//!
//! Each check panics when a property fails; a panic is what the fuzzer reports as a crash.
//! Beyond "never panics, whatever the input", they hold:
//! - a body signed with the secret verifies, and the same signature over any other body
//!   does not;
//! - a signature the sender made up verifies only if it is the one the secret makes;
//! - parsing is deterministic: the same bytes give the same event ids, so a redelivery is
//!   absorbed by the log rather than stored twice;
//! - no refusal's message carries the secret.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use warren_gateway::slack::{commands, events};
use warren_gateway::verify::{self, Headers, VerifyError};
use warren_gateway::webhook::{self, Endpoint, Refusal, Scheme};
use warren_schema::Secret;

/// The signing secret of every check (never in a refusal's message).
pub const SECRET: &str = "fuzz-signing-secret-0123456789";
/// The clock of every check (Unix seconds).
pub const NOW: i64 = 1_700_000_000;

/// Request headers as a sender wrote them: any text, in any order.
struct Fields(Vec<(&'static str, String)>);

impl Headers for Fields {
    fn get(&self, name: &'static str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn hmac_hex(key: &[u8], parts: &[&[u8]]) -> String {
    let mut m = Hmac::<Sha256>::new_from_slice(key).expect("any key length");
    for part in parts {
        m.update(part);
    }
    hex::encode(m.finalize().into_bytes())
}

/// Splits `data` at NUL bytes into `n` parts (missing parts are empty; the last keeps the
/// rest): how a target reads several fields out of one input.
fn fields(data: &[u8], n: usize) -> Vec<&[u8]> {
    let mut parts: Vec<&[u8]> = data.splitn(n, |b| *b == 0).collect();
    parts.resize(n, &[]);
    parts
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A Slack request: `data` is `timestamp NUL signature NUL body`.
pub fn slack_request(data: &[u8]) {
    let parts = fields(data, 3);
    let (ts, sig, body) = (text(parts[0]), text(parts[1]), parts[2]);

    // What the sender wrote verifies only when it is the secret's signature of it.
    let sent = Fields(vec![
        ("x-slack-request-timestamp", ts.clone()),
        ("x-slack-signature", sig.clone()),
    ]);
    let result = verify::slack(SECRET.as_bytes(), &sent, body, NOW);
    if result.is_ok() {
        let real = hmac_hex(
            SECRET.as_bytes(),
            &[b"v0:", ts.trim().as_bytes(), b":", body],
        );
        let given = sig.trim().strip_prefix("v0=").unwrap_or_default();
        assert!(
            given.eq_ignore_ascii_case(&real),
            "a forged signature verified"
        );
    }
    refusal_hides_secret(result);

    // Signed with the secret now, the body verifies; one byte more and it does not.
    let now = NOW.to_string();
    let signed = Fields(vec![
        ("x-slack-request-timestamp", now.clone()),
        (
            "x-slack-signature",
            format!(
                "v0={}",
                hmac_hex(SECRET.as_bytes(), &[b"v0:", now.as_bytes(), b":", body])
            ),
        ),
    ]);
    assert_eq!(verify::slack(SECRET.as_bytes(), &signed, body, NOW), Ok(()));
    let mut longer = body.to_vec();
    longer.push(b' ');
    assert_eq!(
        verify::slack(SECRET.as_bytes(), &signed, &longer, NOW),
        Err(VerifyError::BadSignature)
    );

    // The verified body, parsed twice, stores the same events: Slack's retries collapse.
    let first = events::parse(body, None);
    let again = events::parse(body, None);
    match (&first, &again) {
        (
            Ok(events::Inbound::Store { stream, events }),
            Ok(events::Inbound::Store {
                stream: s2,
                events: e2,
            }),
        ) => {
            assert_eq!(stream, s2);
            assert!(!events.is_empty(), "a stored delivery without events");
            let ids: Vec<_> = events.iter().map(|e| e.id).collect();
            assert_eq!(ids, e2.iter().map(|e| e.id).collect::<Vec<_>>());
        }
        _ => assert_eq!(first.is_ok(), again.is_ok()),
    }
    let first = commands::parse(body, None);
    let again = commands::parse(body, None);
    if let (
        Ok(commands::Command::Ask { event, agent, .. }),
        Ok(commands::Command::Ask { event: e2, .. }),
    ) = (&first, &again)
    {
        assert_eq!(event.id, e2.id);
        assert!(!agent.is_empty(), "a question for no agent");
    }
    assert_eq!(first.is_ok(), again.is_ok());
}

fn endpoint(scheme: Scheme) -> Endpoint {
    let secret = match scheme {
        Scheme::StandardWebhooks => format!("whsec_{}", BASE64.encode(SECRET)),
        Scheme::Github | Scheme::HmacSha256 => SECRET.to_owned(),
    };
    Endpoint {
        name: "fuzz".into(),
        scheme,
        secret: Secret::new(secret),
        previous: None,
        agent: "alice".into(),
        signature_header: "x-signature",
        delivery_header: Some("x-delivery"),
    }
}

/// The signature headers the secret makes for `body` under `scheme`, with `id` as the
/// delivery id and `ts` as the signing time, and the signature alone (without its prefix).
fn signed_headers(scheme: Scheme, id: &str, ts: &str, body: &[u8]) -> (Fields, String) {
    let key = SECRET.as_bytes();
    match scheme {
        Scheme::Github => {
            let sig = hmac_hex(key, &[body]);
            let headers = Fields(vec![
                ("x-github-delivery", id.to_owned()),
                ("x-github-event", "push".into()),
                ("x-hub-signature-256", format!("sha256={sig}")),
            ]);
            (headers, sig)
        }
        Scheme::HmacSha256 => {
            let sig = hmac_hex(key, &[body]);
            let headers = Fields(vec![
                ("x-delivery", id.to_owned()),
                ("x-signature", sig.clone()),
            ]);
            (headers, sig)
        }
        Scheme::StandardWebhooks => {
            let mut m = Hmac::<Sha256>::new_from_slice(key).expect("any key length");
            m.update(format!("{id}.{ts}.").as_bytes());
            m.update(body);
            let sig = BASE64.encode(m.finalize().into_bytes());
            let headers = Fields(vec![
                ("webhook-id", id.to_owned()),
                ("webhook-timestamp", ts.to_owned()),
                ("webhook-signature", format!("v1,{sig}")),
            ]);
            (headers, sig)
        }
    }
}

/// A webhook delivery: `data` is `scheme byte, then delivery id NUL timestamp NUL signature
/// NUL content type NUL body`.
pub fn webhook_delivery(data: &[u8]) {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let scheme =
        [Scheme::Github, Scheme::StandardWebhooks, Scheme::HmacSha256][usize::from(pick % 3)];
    let endpoint = endpoint(scheme);
    let parts = fields(rest, 5);
    let (id, ts, sig, content_type, body) = (
        text(parts[0]),
        text(parts[1]),
        text(parts[2]),
        text(parts[3]),
        parts[4],
    );
    let content_type = (!content_type.is_empty()).then_some(content_type.as_str());

    // Headers as the sender wrote them: accepted only with the secret's own signature.
    let sent = Fields(vec![
        ("x-github-delivery", id.clone()),
        ("x-hub-signature-256", sig.clone()),
        ("webhook-id", id.clone()),
        ("webhook-timestamp", ts.clone()),
        ("webhook-signature", sig.clone()),
        ("x-delivery", id.clone()),
        ("x-signature", sig.clone()),
    ]);
    match webhook::accept(&endpoint, &sent, content_type, body, NOW, None) {
        Ok(_) => {
            let (_, real) = signed_headers(scheme, id.trim(), ts.trim(), body);
            let given = match scheme {
                Scheme::StandardWebhooks => sig.clone(),
                Scheme::Github | Scheme::HmacSha256 => sig.to_ascii_lowercase(),
            };
            assert!(
                given.contains(&real),
                "a delivery verified without the secret's signature"
            );
        }
        Err(Refusal::Signature(e)) => refusal_hides_secret(Err(e)),
        Err(Refusal::Malformed(why)) => assert!(!why.contains(SECRET), "the secret in {why}"),
    }

    // Signed with the secret, the delivery is refused only for what it is (no delivery id,
    // a body its content type calls JSON that is not), never for its signature; accepted
    // twice, it stores the same events.
    let now = NOW.to_string();
    let (signed, _) = signed_headers(scheme, id.trim(), &now, body);
    let first = webhook::accept(&endpoint, &signed, content_type, body, NOW, None);
    if let Err(Refusal::Signature(e)) = &first {
        assert!(
            *e == VerifyError::MissingHeader("webhook-id") && id.trim().is_empty(),
            "a correctly signed delivery refused: {e}"
        );
    }
    let mut longer = body.to_vec();
    longer.push(b' ');
    if first.is_ok() {
        assert_eq!(
            webhook::accept(&endpoint, &signed, content_type, &longer, NOW, None).err(),
            Some(Refusal::Signature(VerifyError::BadSignature)),
            "a signature verified another body"
        );
    }
    let again = webhook::accept(&endpoint, &signed, content_type, body, NOW, None);
    match (&first, &again) {
        (Ok(a), Ok(b)) => {
            assert_eq!(a.stream, b.stream);
            let ids = |r: &warren_schema::AppendRequest| {
                r.events.iter().map(|e| e.id).collect::<Vec<_>>()
            };
            assert_eq!(ids(a), ids(b), "a redelivery would be stored twice");
        }
        _ => assert_eq!(first.is_ok(), again.is_ok()),
    }
}

fn refusal_hides_secret(result: Result<(), VerifyError>) {
    if let Err(e) = result {
        assert!(
            !e.to_string().contains(SECRET),
            "the secret in a refusal: {e}"
        );
    }
}
