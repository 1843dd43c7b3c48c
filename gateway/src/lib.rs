//! Warren's gateway: verifies Slack and webhook signatures, appends each accepted event to
//! the event log, acks once it is durable, and posts agent replies back to Slack.
//!
//! In progress (issue 3): [`verify`] (signature verification for Slack, GitHub, Standard
//! Webhooks and plain HMAC) is done. The HTTP service, event normalisation and reply
//! delivery are not built yet, so the crate has no binary.

pub mod verify;
