//! Warren's gateway: verifies Slack and webhook signatures, appends each accepted event to
//! the event log, acks once it is durable, and posts agent replies back to Slack.
//!
//! Not built yet (issue 3). The crate exists so the workspace shows the architecture; it
//! has no binary until it does something.
