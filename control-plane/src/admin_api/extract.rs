//! Request parts read the API's way: a body or query that does not parse is a
//! problem+json 400 naming the field, like every other refusal.

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use base64::Engine;
use serde::de::DeserializeOwned;

use super::problem::ApiError;

/// A JSON body.
#[derive(Debug)]
pub struct Body<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        axum::Json::<T>::from_request(req, state)
            .await
            .map(|axum::Json(v)| Self(v))
            .map_err(|e| ApiError::BadRequest(e.body_text()))
    }
}

/// Query parameters.
#[derive(Debug)]
pub struct Query<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Query(v)| Self(v))
            .map_err(|e| ApiError::BadRequest(e.body_text()))
    }
}

/// Most items a page holds, and the default.
pub const MAX_LIMIT: usize = 1000;
pub const DEFAULT_LIMIT: usize = 100;

/// The page size asked for, checked.
pub fn limit(asked: Option<usize>) -> Result<usize, ApiError> {
    match asked.unwrap_or(DEFAULT_LIMIT) {
        0 => Err(ApiError::BadRequest("limit: at least 1".into())),
        n if n > MAX_LIMIT => Err(ApiError::BadRequest(format!("limit: at most {MAX_LIMIT}"))),
        n => Ok(n),
    }
}

/// Cursors are opaque to callers (base64url of the last key returned), so their form may
/// change without breaking a client.
pub fn encode_cursor(key: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(key)
}

pub fn decode_cursor(cursor: Option<&str>) -> Result<Option<String>, ApiError> {
    cursor
        .map(|c| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(c)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(|| {
                    ApiError::BadRequest("cursor: use a next_cursor this API returned".into())
                })
        })
        .transpose()
}

/// One page of a name-ordered map after `cursor`.
pub fn page_of<'a, V: 'a, T>(
    map: &'a std::collections::BTreeMap<String, V>,
    cursor: Option<&str>,
    limit: usize,
    mut item: impl FnMut(&'a String, &'a V) -> Option<T>,
) -> Result<super::Page<T>, ApiError> {
    use std::ops::Bound;
    let after = decode_cursor(cursor)?;
    let start = after.as_deref().map_or(Bound::Unbounded, Bound::Excluded);
    let mut items = Vec::with_capacity(limit.min(64));
    let mut last = None;
    let mut more = false;
    for (key, value) in map.range::<str, _>((start, Bound::Unbounded)) {
        let Some(t) = item(key, value) else { continue };
        if items.len() == limit {
            more = true;
            break;
        }
        items.push(t);
        last = Some(key);
    }
    Ok(super::Page {
        items,
        next_cursor: more.then(|| last.map(|k| encode_cursor(k))).flatten(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_follow_each_other_without_gaps_or_repeats() {
        let map: std::collections::BTreeMap<String, u32> =
            (0..25).map(|i| (format!("a{i:02}"), i)).collect();
        let mut seen = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let page = page_of(&map, cursor.as_deref(), 10, |_, v| {
                (v % 5 != 0).then_some(*v)
            })
            .expect("a page");
            seen.extend(page.items);
            match page.next_cursor {
                Some(c) => cursor = Some(c),
                None => break,
            }
        }
        let expected: Vec<u32> = (0..25).filter(|v| v % 5 != 0).collect();
        assert_eq!(seen, expected);
        assert!(decode_cursor(Some("%%%")).is_err());
    }
}
