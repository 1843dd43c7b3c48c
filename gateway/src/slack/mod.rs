//! Slack: the Events API endpoint's payload handling.

pub mod events;
