//! `/v1/endpoints`: webhook endpoints (`/webhooks/{name}` at the gateway). A secret is made
//! here, shown once (at creation and at each rotation), kept only in `webhook_endpoints`
//! (never in the log: see migration 0005), and picked up by the gateway without a restart.
//! A rotation keeps the previous secret valid for a grace period, so senders can move over
//! without a refused delivery.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use base64::Engine;
use chrono::{DateTime, Utc};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sqlx::PgConnection;
use utoipa::ToSchema;
use warren_schema::events::{WebhookEndpointConfigured, WebhookEndpointRemoved};

use super::auth::{AdminRole, Authorized, ViewerRole};
use super::extract::{Body, Query, limit, page_of};
use super::problem::{ApiError, ApiResult};
use super::view::View;
use super::{Api, ConfigChange, Page, check_if_match, if_match, with_etag};

/// The channel the gateway listens on (its `webhook::registry::NOTIFY_CHANNEL`).
const NOTIFY_CHANNEL: &str = "warren_webhook_endpoints";

/// An endpoint as the log knows it (never its secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct WebhookEndpoint {
    /// `/webhooks/{name}` at the gateway.
    pub name: String,
    /// `github`, `standard_webhooks` or `hmac_sha256`.
    pub scheme: String,
    /// The agent its deliveries are addressed to.
    pub agent: String,
    pub signature_header: Option<String>,
    pub delivery_header: Option<String>,
    /// The first 12 hex digits of the secret's SHA-256, to tell secrets apart.
    pub secret_fingerprint: String,
    /// After a rotation: the previous secret is accepted until then.
    pub previous_valid_until: Option<DateTime<Utc>>,
    /// The configuration version of its last change (also its `ETag`).
    pub version: i64,
}

/// An endpoint with its secret: the answer to a create or a rotation, shown once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct EndpointWithSecret {
    #[serde(flatten)]
    pub endpoint: WebhookEndpoint,
    /// Give this to the sender. It cannot be read again.
    pub secret: String,
}

/// A new endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewEndpoint {
    /// Letters, digits, '-' and '_' (at most 63).
    pub name: String,
    /// `github`, `standard_webhooks` or `hmac_sha256`.
    pub scheme: String,
    pub agent: String,
    /// `hmac_sha256`: the header carrying `sha256={hex}` (default `x-signature-256`).
    pub signature_header: Option<String>,
    /// `hmac_sha256`: a header carrying a delivery id (default: the body's hash).
    pub delivery_header: Option<String>,
}

/// How a rotation goes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Rotation {
    /// Seconds the previous secret stays valid (default 3600; 0: at once).
    pub grace_secs: Option<u32>,
}

/// An endpoint as folded from the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointRecord {
    pub configured: WebhookEndpointConfigured,
    pub version: i64,
}

/// What is written to `webhook_endpoints` with the event.
#[derive(Debug, Clone)]
pub enum SecretWrite {
    /// Create or change, with a new secret (`rotate_grace`: keep the old one that long).
    Upsert {
        endpoint: NewEndpoint,
        secret: warren_schema::Secret,
        previous_valid_until: Option<DateTime<Utc>>,
    },
    Delete(String),
}

impl SecretWrite {
    pub async fn apply(&self, conn: &mut PgConnection) -> Result<(), sqlx::Error> {
        match self {
            Self::Upsert {
                endpoint: e,
                secret,
                previous_valid_until,
            } => {
                sqlx::query(
                    "INSERT INTO webhook_endpoints \
                       (name, scheme, agent, signature_header, delivery_header, secret) \
                     VALUES ($1, $2, $3, $4, $5, $6) \
                     ON CONFLICT (name) DO UPDATE SET \
                       scheme = excluded.scheme, agent = excluded.agent, \
                       signature_header = excluded.signature_header, \
                       delivery_header = excluded.delivery_header, \
                       previous_secret = CASE WHEN $7::timestamptz IS NULL THEN NULL \
                                              ELSE webhook_endpoints.secret END, \
                       previous_expires_at = $7, \
                       secret = excluded.secret, updated_at = now()",
                )
                .bind(&e.name)
                .bind(&e.scheme)
                .bind(&e.agent)
                .bind(&e.signature_header)
                .bind(&e.delivery_header)
                .bind(secret.expose())
                .bind(previous_valid_until)
                .execute(&mut *conn)
                .await?;
            }
            Self::Delete(name) => {
                sqlx::query("DELETE FROM webhook_endpoints WHERE name = $1")
                    .bind(name)
                    .execute(&mut *conn)
                    .await?;
            }
        }
        sqlx::query("SELECT pg_notify($1, '')")
            .bind(NOTIFY_CHANNEL)
            .execute(&mut *conn)
            .await?;
        Ok(())
    }
}

const SCHEMES: [&str; 3] = ["github", "standard_webhooks", "hmac_sha256"];

/// A fresh secret in the form the scheme expects (Standard Webhooks: `whsec_` + base64).
fn new_secret(scheme: &str) -> warren_schema::Secret {
    let mut key = [0u8; 32];
    rand::rng().fill_bytes(&mut key);
    warren_schema::Secret::new(match scheme {
        "standard_webhooks" => format!(
            "whsec_{}",
            base64::engine::general_purpose::STANDARD.encode(key)
        ),
        _ => hex::encode(key),
    })
}

fn fingerprint(secret: &warren_schema::Secret) -> String {
    hex::encode(Sha256::digest(secret.expose().as_bytes()))[..12].to_owned()
}

fn endpoint_of(r: &EndpointRecord) -> WebhookEndpoint {
    let c = &r.configured;
    WebhookEndpoint {
        name: c.endpoint.clone(),
        scheme: c.scheme.clone(),
        agent: c.agent.clone(),
        signature_header: c.signature_header.clone(),
        delivery_header: c.delivery_header.clone(),
        secret_fingerprint: c.secret_fingerprint.clone(),
        previous_valid_until: c.previous_valid_until,
        version: r.version,
    }
}

fn check(view: &View, e: &NewEndpoint) -> ApiResult<()> {
    let name_ok = !e.name.is_empty()
        && e.name.len() <= 63
        && e.name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if !name_ok {
        return Err(ApiError::BadRequest(format!(
            "endpoint name {:?}: 1-63 letters, digits, '-' and '_'",
            e.name
        )));
    }
    if !SCHEMES.contains(&e.scheme.as_str()) {
        return Err(ApiError::BadRequest(format!(
            "scheme {:?} is not one of {SCHEMES:?}",
            e.scheme
        )));
    }
    let header_ok = |h: &Option<String>| {
        h.as_ref().is_none_or(|h| {
            !h.is_empty()
                && h.len() <= 64
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
    };
    if !header_ok(&e.signature_header) || !header_ok(&e.delivery_header) {
        return Err(ApiError::BadRequest(
            "signature_header, delivery_header: header names (letters, digits, '-')".into(),
        ));
    }
    if e.scheme != "hmac_sha256" && (e.signature_header.is_some() || e.delivery_header.is_some()) {
        return Err(ApiError::BadRequest(
            "signature_header and delivery_header are for the hmac_sha256 scheme".into(),
        ));
    }
    if !view.state.agents.contains_key(&e.agent) {
        return Err(ApiError::BadRequest(format!("no agent {:?}", e.agent)));
    }
    Ok(())
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// Items per page (1-1000, default 100).
    pub limit: Option<usize>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// List webhook endpoints (never their secrets).
#[utoipa::path(get, path = "/v1/endpoints", tag = "endpoints", operation_id = "list_endpoints",
    security(("token" = ["viewer"])), params(ListParams),
    responses((status = 200, description = "A page of endpoints", body = Page<WebhookEndpoint>)))]
pub async fn list(
    _: Authorized<ViewerRole>,
    State(api): State<Api>,
    Query(params): Query<ListParams>,
) -> ApiResult<axum::Json<Page<WebhookEndpoint>>> {
    let limit = limit(params.limit)?;
    let view = api.view.read();
    page_of(&view.endpoints, params.cursor.as_deref(), limit, |_, r| {
        Some(endpoint_of(r))
    })
    .map(axum::Json)
}

/// One webhook endpoint.
#[utoipa::path(get, path = "/v1/endpoints/{name}", tag = "endpoints", operation_id = "get_endpoint",
    security(("token" = ["viewer"])), params(("name" = String, Path, description = "Endpoint name")),
    responses((status = 200, description = "The endpoint", body = WebhookEndpoint, headers(("ETag" = String))),
              (status = 404, description = "No such endpoint", body = super::problem::Problem)))]
pub async fn get(
    _: Authorized<ViewerRole>,
    State(api): State<Api>,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    let view = api.view.read();
    let e = view
        .endpoints
        .get(&name)
        .map(endpoint_of)
        .ok_or_else(|| ApiError::NotFound(format!("no endpoint {name:?}")))?;
    Ok(with_etag(StatusCode::OK, e.version, e))
}

/// Create a webhook endpoint. The answer holds its secret, once.
#[utoipa::path(post, path = "/v1/endpoints", tag = "endpoints", operation_id = "create_endpoint",
    security(("token" = ["admin"])), request_body = NewEndpoint,
    responses((status = 201, description = "Created; the secret is shown this once", body = EndpointWithSecret),
              (status = 400, description = "Invalid", body = super::problem::Problem),
              (status = 409, description = "The name is taken", body = super::problem::Problem)))]
pub async fn create(
    Authorized(caller, _): Authorized<AdminRole>,
    State(api): State<Api>,
    Body(new): Body<NewEndpoint>,
) -> ApiResult<(StatusCode, axum::Json<EndpointWithSecret>)> {
    let secret = new_secret(&new.scheme);
    api.change(&caller, None, |view| {
        if view.endpoints.contains_key(&new.name) {
            return Err(ApiError::Conflict(format!(
                "endpoint {:?} exists; rotate its secret or delete it",
                new.name
            )));
        }
        check(view, &new)?;
        Ok((
            vec![
                ConfigChange::of(&configured(&new, &secret, None))?.with(SecretWrite::Upsert {
                    endpoint: new.clone(),
                    secret: secret.clone(),
                    previous_valid_until: None,
                }),
            ],
            (),
        ))
    })
    .await?;
    let endpoint = found(&api, &new.name)?;
    Ok((
        StatusCode::CREATED,
        axum::Json(EndpointWithSecret {
            endpoint,
            secret: secret.expose().to_owned(),
        }),
    ))
}

fn configured(
    e: &NewEndpoint,
    secret: &warren_schema::Secret,
    previous_valid_until: Option<DateTime<Utc>>,
) -> WebhookEndpointConfigured {
    WebhookEndpointConfigured {
        endpoint: e.name.clone(),
        scheme: e.scheme.clone(),
        agent: e.agent.clone(),
        signature_header: e.signature_header.clone(),
        delivery_header: e.delivery_header.clone(),
        secret_fingerprint: fingerprint(secret),
        previous_valid_until,
    }
}

fn found(api: &Api, name: &str) -> ApiResult<WebhookEndpoint> {
    api.view
        .read()
        .endpoints
        .get(name)
        .map(endpoint_of)
        .ok_or_else(|| ApiError::Conflict(format!("endpoint {name:?} was removed meanwhile")))
}

/// Give an endpoint a new secret (shown once). The previous one stays valid for
/// `grace_secs` (default an hour), so the sender can be moved over without refusals.
#[utoipa::path(post, path = "/v1/endpoints/{name}/rotate", tag = "endpoints",
    operation_id = "rotate_endpoint_secret", security(("token" = ["admin"])),
    request_body = Rotation,
    params(("name" = String, Path, description = "Endpoint name"),
           ("If-Match" = Option<String>, Header, description = "The ETag the change is based on")),
    responses((status = 200, description = "Rotated; the new secret is shown this once", body = EndpointWithSecret),
              (status = 404, description = "No such endpoint", body = super::problem::Problem),
              (status = 412, description = "Changed meanwhile", body = super::problem::Problem)))]
pub async fn rotate(
    Authorized(caller, _): Authorized<AdminRole>,
    State(api): State<Api>,
    Path(name): Path<String>,
    headers: HeaderMap,
    Body(rotation): Body<Rotation>,
) -> ApiResult<axum::Json<EndpointWithSecret>> {
    let precondition = if_match(&headers)?;
    let grace = chrono::TimeDelta::seconds(i64::from(rotation.grace_secs.unwrap_or(3600)));
    let secret = {
        let view = api.view.read();
        let record = view
            .endpoints
            .get(&name)
            .ok_or_else(|| ApiError::NotFound(format!("no endpoint {name:?}")))?;
        new_secret(&record.configured.scheme)
    };
    api.change(&caller, None, |view| {
        let record = view
            .endpoints
            .get(&name)
            .ok_or_else(|| ApiError::NotFound(format!("no endpoint {name:?}")))?;
        check_if_match(&precondition, record.version)?;
        let c = &record.configured;
        let endpoint = NewEndpoint {
            name: c.endpoint.clone(),
            scheme: c.scheme.clone(),
            agent: c.agent.clone(),
            signature_header: c.signature_header.clone(),
            delivery_header: c.delivery_header.clone(),
        };
        let until = (grace > chrono::TimeDelta::zero()).then(|| Utc::now() + grace);
        Ok((
            vec![
                ConfigChange::of(&configured(&endpoint, &secret, until))?.with(
                    SecretWrite::Upsert {
                        endpoint,
                        secret: secret.clone(),
                        previous_valid_until: until,
                    },
                ),
            ],
            (),
        ))
    })
    .await?;
    Ok(axum::Json(EndpointWithSecret {
        endpoint: found(&api, &name)?,
        secret: secret.expose().to_owned(),
    }))
}

/// Delete an endpoint: its deliveries are refused (404) and its secret is erased.
#[utoipa::path(delete, path = "/v1/endpoints/{name}", tag = "endpoints", operation_id = "delete_endpoint",
    security(("token" = ["admin"])),
    params(("name" = String, Path, description = "Endpoint name"),
           ("If-Match" = Option<String>, Header, description = "The ETag the change is based on")),
    responses((status = 204, description = "Deleted"),
              (status = 404, description = "No such endpoint", body = super::problem::Problem),
              (status = 412, description = "Changed meanwhile", body = super::problem::Problem)))]
pub async fn delete(
    Authorized(caller, _): Authorized<AdminRole>,
    State(api): State<Api>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> ApiResult<StatusCode> {
    let precondition = if_match(&headers)?;
    api.change(&caller, None, |view| {
        let record = view
            .endpoints
            .get(&name)
            .ok_or_else(|| ApiError::NotFound(format!("no endpoint {name:?}")))?;
        check_if_match(&precondition, record.version)?;
        Ok((
            vec![
                ConfigChange::of(&WebhookEndpointRemoved {
                    endpoint: name.clone(),
                })?
                .with(SecretWrite::Delete(name.clone())),
            ],
            (),
        ))
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}
