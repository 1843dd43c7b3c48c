//! Slack: Events API payloads and the `/warren` slash command.

pub mod commands;
pub mod events;
