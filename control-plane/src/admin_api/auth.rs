//! Who is calling, and may they: bearer tokens with roles.
//!
//! A token is `wrn_{id}_{secret}`: `id` (12 hex digits) names it in the log and the audit
//! trail; `secret` (32 random bytes, base64url) is shown once, when it is issued, and only
//! its SHA-256 is recorded (`token.issued`). The secret is high-entropy, so a plain hash is
//! enough: there is nothing to guess that a slow hash would protect.
//!
//! [`Authenticator`] is the seam: handlers see a [`Caller`] and never how it was proved, so
//! OIDC (a JWT verified against an issuer's keys, its groups mapped to roles) is another
//! implementation chosen in one place, not a change to any handler.

use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;

use axum::extract::FromRequestParts;
use axum::http::HeaderMap;
use axum::http::request::Parts;
use base64::Engine;
use chrono::{DateTime, Utc};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use utoipa::ToSchema;

use super::Api;
use super::problem::ApiError;
use super::view::ViewHandle;

/// What a token may do. Each role includes the ones before it.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Reads everything but tokens.
    Viewer,
    /// Also starts, stops and restarts workspaces.
    Operator,
    /// Also manages agents, routes, webhook endpoints and tokens.
    Admin,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Viewer, Role::Operator, Role::Admin];

    pub fn name(self) -> &'static str {
        match self {
            Self::Viewer => "viewer",
            Self::Operator => "operator",
            Self::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.name() == s)
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A proved caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The token's id (or the identity provider's subject).
    pub id: String,
    pub role: Role,
}

impl Caller {
    /// `metadata.actor` of the events this caller's requests record: `token:{id}:{role}`.
    pub fn actor(&self) -> String {
        format!("token:{}:{}", self.id, self.role)
    }

    /// The token id and role an event's `actor` names, when a token made it
    /// ([`Caller::actor`]'s form).
    pub fn from_actor(actor: &str) -> Option<(&str, Option<Role>)> {
        let (id, role) = actor.strip_prefix("token:")?.rsplit_once(':')?;
        Some((id, Role::parse(role)))
    }
}

/// Proves who sent a request. Implementations must answer
/// [`ApiError::Unauthenticated`] alike for a missing, unknown, revoked or expired credential.
pub trait Authenticator: Send + Sync + std::fmt::Debug + 'static {
    fn authenticate<'a>(
        &'a self,
        headers: &'a HeaderMap,
    ) -> Pin<Box<dyn Future<Output = Result<Caller, ApiError>> + Send + 'a>>;
}

/// A token as the log knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRecord {
    pub id: String,
    pub name: String,
    pub role: Role,
    pub secret_sha256: [u8; 32],
    pub issued_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

impl TokenRecord {
    pub fn is_valid_at(&self, now: DateTime<Utc>) -> bool {
        self.revoked_at.is_none() && self.expires_at.is_none_or(|t| now < t)
    }
}

/// A token freshly made: its parts, before anything is recorded.
#[derive(Debug)]
pub struct NewToken {
    pub id: String,
    /// The whole token, to show once.
    pub token: warren_schema::Secret,
    pub secret_sha256: String,
}

impl NewToken {
    pub fn generate() -> Self {
        let mut rng = rand::rng();
        let mut id = [0u8; 6];
        let mut secret = [0u8; 32];
        rng.fill_bytes(&mut id);
        rng.fill_bytes(&mut secret);
        let id = hex::encode(id);
        let secret = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret);
        Self {
            secret_sha256: hex::encode(Sha256::digest(secret.as_bytes())),
            token: warren_schema::Secret::new(format!("wrn_{id}_{secret}")),
            id,
        }
    }
}

/// `wrn_{id}_{secret}` → (id, SHA-256 of the secret).
fn parse_token(token: &str) -> Option<(&str, [u8; 32])> {
    let rest = token.strip_prefix("wrn_")?;
    let (id, secret) = rest.split_once('_')?;
    if id.len() != 12 || !id.bytes().all(|b| b.is_ascii_hexdigit()) || secret.is_empty() {
        return None;
    }
    Some((id, Sha256::digest(secret.as_bytes()).into()))
}

/// Compares digests without an early exit.
fn same_digest(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Bearer tokens checked against the tokens the log records (via the view).
#[derive(Debug, Clone)]
pub struct TokenAuthenticator {
    pub view: ViewHandle,
}

impl TokenAuthenticator {
    /// The caller a bearer token proves, at `now`.
    pub fn check(&self, token: &str, now: DateTime<Utc>) -> Option<Caller> {
        let (id, digest) = parse_token(token)?;
        let view = self.view.read();
        let record = view.tokens.get(id)?;
        (same_digest(&record.secret_sha256, &digest) && record.is_valid_at(now)).then(|| Caller {
            id: record.id.clone(),
            role: record.role,
        })
    }
}

impl Authenticator for TokenAuthenticator {
    fn authenticate<'a>(
        &'a self,
        headers: &'a HeaderMap,
    ) -> Pin<Box<dyn Future<Output = Result<Caller, ApiError>> + Send + 'a>> {
        Box::pin(async move {
            let token = headers
                .get(http::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| {
                    v.strip_prefix("Bearer ")
                        .or_else(|| v.strip_prefix("bearer "))
                })
                .ok_or(ApiError::Unauthenticated)?;
            self.check(token.trim(), Utc::now())
                .ok_or(ApiError::Unauthenticated)
        })
    }
}

/// The role an endpoint needs, as a type ([`Authorized`]).
pub trait Needs: Send + Sync + 'static {
    const ROLE: Role;
}
#[derive(Debug)]
pub struct ViewerRole;
#[derive(Debug)]
pub struct OperatorRole;
#[derive(Debug)]
pub struct AdminRole;
impl Needs for ViewerRole {
    const ROLE: Role = Role::Viewer;
}
impl Needs for OperatorRole {
    const ROLE: Role = Role::Operator;
}
impl Needs for AdminRole {
    const ROLE: Role = Role::Admin;
}

/// Extractor: a caller holding at least `R`'s role. Put it first in a handler's arguments,
/// so an unauthenticated request is refused before its body is read.
#[derive(Debug)]
pub struct Authorized<R>(pub Caller, pub PhantomData<R>);

impl<R: Needs> FromRequestParts<Api> for Authorized<R> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, api: &Api) -> Result<Self, ApiError> {
        let caller = api.auth.authenticate(&parts.headers).await?;
        if caller.role < R::ROLE {
            return Err(ApiError::Forbidden {
                needed: R::ROLE,
                has: caller.role,
            });
        }
        tracing::Span::current().record("actor", caller.actor());
        Ok(Self(caller, PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_token_parses_to_its_id_and_digest() {
        let t = NewToken::generate();
        let (id, digest) = parse_token(t.token.expose()).expect("well formed");
        assert_eq!(id, t.id);
        assert_eq!(hex::encode(digest), t.secret_sha256);
        assert!(t.token.expose().len() > 50);
    }

    #[test]
    fn malformed_tokens_are_refused_before_any_lookup() {
        for bad in [
            "",
            "wrn_",
            "wrn_abc_def",
            "wrn_zzzzzzzzzzzz_secret",
            "xyz_0123456789ab_secret",
            "wrn_0123456789ab_",
        ] {
            assert!(parse_token(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn an_actor_names_its_token_and_role_back() {
        let caller = Caller {
            id: "0123456789ab".into(),
            role: Role::Operator,
        };
        assert_eq!(
            Caller::from_actor(&caller.actor()),
            Some(("0123456789ab", Some(Role::Operator)))
        );
        assert_eq!(Caller::from_actor("bootstrap"), None);
    }

    #[test]
    fn roles_include_the_ones_below() {
        assert!(Role::Admin > Role::Operator && Role::Operator > Role::Viewer);
        for r in Role::ALL {
            assert_eq!(Role::parse(r.name()), Some(r));
        }
    }
}
