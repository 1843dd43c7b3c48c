//! Every failure of the admin API, and the one place it becomes an answer:
//! `application/problem+json` (RFC 9457) with the status the error calls for.
//!
//! Bodies name what the caller can act on (which field, which version is current, which
//! role is needed). Internal failures are logged once here, with their cause, and answered
//! with a generic detail: a database error message can hold a host name or a query.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use super::auth::Role;

pub type ApiResult<T> = Result<T, ApiError>;

/// Why a request was not done.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No token, or one that is unknown, revoked or expired. The same answer for each, so
    /// a caller cannot probe which tokens exist.
    #[error("a valid bearer token is required")]
    Unauthenticated,
    #[error("this needs the {needed} role; the token has {has}")]
    Forbidden { needed: Role, has: Role },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    BadRequest(String),
    /// The request contradicts the current state (a name taken, an agent still routed to).
    #[error("{0}")]
    Conflict(String),
    /// `If-Match` named a version that is no longer current.
    #[error("the resource is at version {current}; the request expected {expected}")]
    PreconditionFailed { expected: String, current: String },
    /// The same `Idempotency-Key` came with a different request.
    #[error(
        "Idempotency-Key {0:?} was used for a different request; use a new key for a new request"
    )]
    IdempotencyKeyReused(String),
    /// The database cannot be reached, or the request could not settle in time.
    #[error("{0}")]
    Unavailable(String),
    #[error("internal error")]
    Internal(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Unauthenticated => StatusCode::UNAUTHORIZED,
            Self::Forbidden { .. } => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::PreconditionFailed { .. } => StatusCode::PRECONDITION_FAILED,
            Self::IdempotencyKeyReused(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// A short, stable label: the problem `type` and the metric label.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Unauthenticated => "unauthenticated",
            Self::Forbidden { .. } => "forbidden",
            Self::NotFound(_) => "not_found",
            Self::BadRequest(_) => "bad_request",
            Self::Conflict(_) => "conflict",
            Self::PreconditionFailed { .. } => "precondition_failed",
            Self::IdempotencyKeyReused(_) => "idempotency_key_reused",
            Self::Unavailable(_) => "unavailable",
            Self::Internal(_) => "internal",
        }
    }
}

impl From<warren_schema::Error> for ApiError {
    fn from(e: warren_schema::Error) -> Self {
        if e.is_unavailable() {
            tracing::warn!(error = %e, "admin API: the event log is unavailable");
            Self::Unavailable("the event log is unavailable; retry shortly".into())
        } else {
            Self::Internal(Box::new(e))
        }
    }
}

/// The body of every error answer (RFC 9457).
#[derive(Debug, Serialize, ToSchema)]
pub struct Problem {
    /// A URI naming the kind of problem: `urn:warren:problem:{kind}`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The status's reason phrase.
    pub title: String,
    pub status: u16,
    /// What went wrong, for a person.
    pub detail: String,
}

/// Seconds a caller told "unavailable" is asked to wait.
const RETRY_AFTER_SECS: &str = "1";

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if let Self::Internal(source) = &self {
            tracing::error!(error = %source, "admin API request failed");
        }
        metrics::counter!("warren_admin_api_errors_total", "kind" => self.kind()).increment(1);
        let problem = Problem {
            kind: format!("urn:warren:problem:{}", self.kind()),
            title: status.canonical_reason().unwrap_or("error").to_owned(),
            status: status.as_u16(),
            detail: self.to_string(),
        };
        let mut response = (status, axum::Json(problem)).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        match self {
            Self::Unauthenticated => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"warren\""),
                );
            }
            Self::Unavailable(_) => {
                headers.insert(
                    header::RETRY_AFTER,
                    HeaderValue::from_static(RETRY_AFTER_SECS),
                );
            }
            _ => {}
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_internal_error_s_cause_stays_out_of_the_body() {
        let e = ApiError::Internal("password authentication failed for user warren".into());
        let response = e.into_response();
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "application/problem+json"
        );
        let body = futures_util::FutureExt::now_or_never(axum::body::to_bytes(
            response.into_body(),
            usize::MAX,
        ))
        .expect("a ready body")
        .expect("bytes");
        let text = String::from_utf8_lossy(&body);
        assert!(!text.contains("password"), "{text}");
        assert!(text.contains("urn:warren:problem:internal"), "{text}");
    }
}
