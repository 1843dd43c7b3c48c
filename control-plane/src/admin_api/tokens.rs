//! `/v1/tokens`: issue (the token is in the answer, once), list and revoke API tokens; and
//! the first admin token, which nobody can ask the API for.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use warren_schema::events::{DomainEvent, TokenIssued, TokenRevoked};
use warren_schema::{AppendRequest, EventId, EventLog, Metadata, NewEvent, Secret};

use super::auth::{AdminRole, Authorized, NewToken, Role, TokenRecord};
use super::extract::{Body, Query, limit, page_of};
use super::problem::{ApiError, ApiResult};
use super::{Api, ConfigChange, Page, SOURCE, idempotent_id};
use crate::config_file::CONFIG_STREAM;

/// A token, as listed (never its secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Token {
    pub id: String,
    pub name: String,
    pub role: Role,
    pub issued_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// A token just issued: `token` is shown this once and cannot be read again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct IssuedToken {
    #[serde(flatten)]
    pub info: Token,
    /// `wrn_{id}_{secret}`: the bearer token. Absent when an `Idempotency-Key` repeat found
    /// the token already issued (its secret was shown to the first request only).
    pub token: Option<String>,
}

/// What to issue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    /// What it is for (`ci`, `alice`), 1-100 characters.
    pub name: String,
    pub role: Role,
    /// Seconds until it expires (unset: never).
    pub expires_in_secs: Option<u64>,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// Items per page (1-1000, default 100).
    pub limit: Option<usize>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// Include revoked and expired tokens.
    #[serde(default)]
    pub all: bool,
}

fn token_of(t: &TokenRecord) -> Token {
    Token {
        id: t.id.clone(),
        name: t.name.clone(),
        role: t.role,
        issued_at: t.issued_at,
        expires_at: t.expires_at,
        revoked_at: t.revoked_at,
    }
}

/// The event that issues `token`, and what it records.
fn issued_event(
    token: &NewToken,
    name: &str,
    role: Role,
    expires_at: Option<DateTime<Utc>>,
) -> TokenIssued {
    TokenIssued {
        token_id: token.id.clone(),
        name: name.to_owned(),
        role: role.name().to_owned(),
        secret_sha256: token.secret_sha256.clone(),
        expires_at,
    }
}

fn check_name(name: &str) -> ApiResult<()> {
    if name.trim().is_empty() || name.chars().count() > 100 || name.chars().any(char::is_control) {
        return Err(ApiError::BadRequest(
            "name: 1-100 characters, no control characters".into(),
        ));
    }
    Ok(())
}

/// List tokens (valid ones; `all=true` for revoked and expired too).
#[utoipa::path(get, path = "/v1/tokens", tag = "tokens", operation_id = "list_tokens",
    security(("token" = ["admin"])), params(ListParams),
    responses((status = 200, description = "A page of tokens", body = Page<Token>)))]
pub async fn list(
    _: Authorized<AdminRole>,
    State(api): State<Api>,
    Query(params): Query<ListParams>,
) -> ApiResult<axum::Json<Page<Token>>> {
    let limit = limit(params.limit)?;
    let now = Utc::now();
    let view = api.view.read();
    page_of(&view.tokens, params.cursor.as_deref(), limit, |_, t| {
        (params.all || t.is_valid_at(now)).then(|| token_of(t))
    })
    .map(axum::Json)
}

/// Issue a token. The answer holds it, once.
#[utoipa::path(post, path = "/v1/tokens", tag = "tokens", operation_id = "issue_token",
    security(("token" = ["admin"])), request_body = TokenRequest,
    params(("Idempotency-Key" = Option<String>, Header, description = "Makes a retry safe")),
    responses((status = 201, description = "Issued", body = IssuedToken),
              (status = 200, description = "Already issued for this Idempotency-Key", body = IssuedToken),
              (status = 400, description = "Invalid", body = super::problem::Problem),
              (status = 422, description = "Idempotency-Key reused for another request",
               body = super::problem::Problem)))]
pub async fn issue(
    Authorized(caller, _): Authorized<AdminRole>,
    State(api): State<Api>,
    headers: HeaderMap,
    Body(request): Body<TokenRequest>,
) -> ApiResult<(StatusCode, axum::Json<IssuedToken>)> {
    check_name(&request.name)?;
    let (id, key) = idempotent_id(&caller, &headers)?;
    let expires_at = request
        .expires_in_secs
        .map(|s| {
            i64::try_from(s)
                .ok()
                .and_then(chrono::TimeDelta::try_seconds)
                .and_then(|d| Utc::now().checked_add_signed(d))
                .ok_or_else(|| ApiError::BadRequest("expires_in_secs: too far".into()))
        })
        .transpose()?;
    if let Some(event) = api
        .replayed(id, key.as_deref(), |e| {
            e.decode::<TokenIssued>()
                .is_ok_and(|t| t.name == request.name && t.role == request.role.name())
        })
        .await?
    {
        let token_id = event.decode::<TokenIssued>()?.token_id;
        let view = api.view.read();
        let record = view
            .tokens
            .get(&token_id)
            .ok_or_else(|| ApiError::Unavailable("the token is not visible yet".into()))?;
        return Ok((
            StatusCode::OK,
            axum::Json(IssuedToken {
                info: token_of(record),
                token: None,
            }),
        ));
    }
    let token = NewToken::generate();
    let issued = issued_event(&token, &request.name, request.role, expires_at);
    api.change(&caller, id, |_| Ok((vec![ConfigChange::of(&issued)?], ())))
        .await?;
    let view = api.view.read();
    let record = view
        .tokens
        .get(&token.id)
        .ok_or_else(|| ApiError::Unavailable("the token is not visible yet".into()))?;
    Ok((
        StatusCode::CREATED,
        axum::Json(IssuedToken {
            info: token_of(record),
            token: Some(token.token.expose().to_owned()),
        }),
    ))
}

/// Revoke a token: refused from now on. The last valid admin token cannot be revoked (issue
/// another first), so the API never locks its operators out.
#[utoipa::path(delete, path = "/v1/tokens/{id}", tag = "tokens", operation_id = "revoke_token",
    security(("token" = ["admin"])),
    params(("id" = String, Path, description = "Token id")),
    responses((status = 204, description = "Revoked"),
              (status = 404, description = "No such token", body = super::problem::Problem),
              (status = 409, description = "The last admin token", body = super::problem::Problem)))]
pub async fn revoke(
    Authorized(caller, _): Authorized<AdminRole>,
    State(api): State<Api>,
    Path(token_id): Path<String>,
) -> ApiResult<StatusCode> {
    let now = Utc::now();
    api.change(&caller, None, |view| {
        let Some(token) = view.tokens.get(&token_id) else {
            return Err(ApiError::NotFound(format!("no token {token_id:?}")));
        };
        if token.revoked_at.is_some() {
            return Ok((Vec::new(), ()));
        }
        let other_admins = view
            .tokens
            .values()
            .filter(|t| t.id != token_id && t.role == Role::Admin && t.is_valid_at(now))
            .count();
        if token.role == Role::Admin && token.is_valid_at(now) && other_admins == 0 {
            return Err(ApiError::Conflict(
                "this is the last valid admin token; issue another admin token first".into(),
            ));
        }
        Ok((
            vec![ConfigChange::of(&TokenRevoked {
                token_id: token_id.clone(),
            })?],
            (),
        ))
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Issues a token directly in the log, for the operator's break-glass command
/// (`warren-control-plane tokens issue`). Returns its id and the token.
pub async fn issue_direct(
    log: &EventLog,
    name: &str,
    role: Role,
    expires_at: Option<DateTime<Utc>>,
    actor: &str,
) -> warren_schema::Result<(String, Secret)> {
    let token = NewToken::generate();
    let mut metadata = Metadata::new(SOURCE);
    metadata.actor = Some(actor.to_owned());
    let event = NewEvent::from_domain(
        EventId::random(),
        &issued_event(&token, name, role, expires_at),
        metadata,
    )
    .map_err(|e| warren_schema::Error::InvalidEvent(e.to_string()))?;
    log.append(&AppendRequest::new(CONFIG_STREAM, vec![event]))
        .await?;
    Ok((token.id, token.token))
}

/// On a log that has never issued a token: issues the first admin token and returns it (to
/// be shown once). Its id is fixed, so replicas starting together issue one between them and
/// only the one whose append stored it gets `Some`.
pub async fn bootstrap(log: &EventLog) -> warren_schema::Result<Option<Secret>> {
    if !log.read_type(TokenIssued::TYPE, 0, 1).await?.is_empty() {
        return Ok(None);
    }
    let token = NewToken::generate();
    let mut metadata = Metadata::new(SOURCE);
    metadata.actor = Some("bootstrap".into());
    let event = NewEvent::from_domain(
        EventId::derive(&["admin-api", "bootstrap-token"]),
        &issued_event(&token, "bootstrap", Role::Admin, None),
        metadata,
    )
    .map_err(|e| warren_schema::Error::InvalidEvent(e.to_string()))?;
    let appended = log
        .append(&AppendRequest::new(CONFIG_STREAM, vec![event]))
        .await?;
    Ok(appended
        .first()
        .is_some_and(|a| !a.duplicate)
        .then_some(token.token))
}
