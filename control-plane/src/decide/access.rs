//! Who may address an agent: allow-lists in its settings (`settings.access`). Pure.
//!
//! ```json
//! {"name": "deployer", "workspace": "ops", "driver": "command",
//!  "settings": {"access": {"channels": ["C0OPS"], "users": ["U0ALICE", "U0BOB"],
//!                          "endpoints": ["github"]}}}
//! ```
//!
//! - `channels`: the Slack channels (ids) it answers in. Unset: any channel the app is in.
//! - `users`: the Slack users (ids) who may address it. Unset: anyone in an allowed channel.
//! - Direct messages reach it only from the users listed; with no `users`, from nobody:
//!   a DM comes from anyone in the Slack workspace, not from a channel an operator chose.
//! - `endpoints`: the webhook endpoints that may address it. Unset: any that routes to it.
//! - An agent mentioned by another answers in that conversation, so the conversation's
//!   origin must be one it may be addressed from.
//!
//! A message an agent may not take is not routed; the refusal is recorded
//! (`message.refused`, or `mention.refused` with reason `not_allowed`) for `explain`.

use serde::Deserialize;
use serde_json::Value;
use warren_schema::events::Origin;

/// An agent's allow-lists.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Access {
    pub channels: Option<Vec<String>>,
    pub users: Option<Vec<String>>,
    pub endpoints: Option<Vec<String>>,
}

impl Access {
    /// The allow-lists in an agent's settings (none: [`Access::default`], which allows what
    /// Warren allowed before them, except direct messages).
    pub fn of(settings: &Value) -> Result<Self, String> {
        match settings.get("access") {
            None | Some(Value::Null) => Ok(Self::default()),
            Some(access) => {
                serde_json::from_value(access.clone()).map_err(|e| format!("settings.access: {e}"))
            }
        }
    }

    /// Whether a message from `origin` may reach the agent; the reason if not.
    pub fn check(&self, origin: &Origin) -> Result<(), String> {
        let listed = |list: &Option<Vec<String>>, id: &str| {
            list.as_ref().is_none_or(|l| l.iter().any(|x| x == id))
        };
        match origin {
            Origin::Slack { channel, user, .. } | Origin::SlackCommand { channel, user, .. } => {
                if is_direct_message(channel) {
                    let allowed = self
                        .users
                        .as_ref()
                        .is_some_and(|users| users.iter().any(|u| u == user));
                    return if allowed {
                        Ok(())
                    } else {
                        Err(format!(
                            "a direct message from {user}, who is not in its users"
                        ))
                    };
                }
                if !listed(&self.channels, channel) {
                    return Err(format!("channel {channel} is not in its channels"));
                }
                if !listed(&self.users, user) {
                    return Err(format!("user {user} is not in its users"));
                }
                Ok(())
            }
            Origin::Webhook { endpoint, .. } => {
                if listed(&self.endpoints, endpoint) {
                    Ok(())
                } else {
                    Err(format!("endpoint {endpoint} is not in its endpoints"))
                }
            }
            // A conversation agents started among themselves: nobody outside to check.
            Origin::Agent { .. } => Ok(()),
        }
    }
}

/// Slack's direct-message channel ids start with `D`.
pub fn is_direct_message(channel: &str) -> bool {
    channel.starts_with('D')
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn slack(channel: &str, user: &str) -> Origin {
        Origin::Slack {
            team_id: "T1".into(),
            channel: channel.into(),
            thread_ts: "1.0".into(),
            ts: "1.0".into(),
            user: user.into(),
        }
    }

    fn webhook(endpoint: &str) -> Origin {
        Origin::Webhook {
            endpoint: endpoint.into(),
            delivery_id: "d".into(),
        }
    }

    #[test]
    fn without_lists_channels_and_endpoints_reach_it_and_direct_messages_do_not() {
        let open = Access::of(&json!({})).expect("no access settings");
        assert_eq!(open, Access::default());
        assert!(open.check(&slack("C1", "U1")).is_ok());
        assert!(open.check(&webhook("github")).is_ok());
        let e = open.check(&slack("D1", "U1")).expect_err("a stranger's DM");
        assert!(e.contains("direct message"), "{e}");
    }

    #[test]
    fn lists_allow_what_they_name_and_nothing_else() {
        let access = Access::of(&json!({"access": {
            "channels": ["C1"], "users": ["U1"], "endpoints": ["github"]}}))
        .expect("valid");
        assert!(access.check(&slack("C1", "U1")).is_ok());
        assert!(
            access
                .check(&slack("C2", "U1"))
                .expect_err("refused")
                .contains("C2")
        );
        assert!(
            access
                .check(&slack("C1", "U2"))
                .expect_err("refused")
                .contains("U2")
        );
        assert!(
            access.check(&slack("D9", "U1")).is_ok(),
            "a listed user's DM"
        );
        assert!(access.check(&slack("D9", "U2")).is_err());
        let command = Origin::SlackCommand {
            team_id: "T1".into(),
            channel: "C2".into(),
            user: "U1".into(),
        };
        assert!(
            access.check(&command).is_err(),
            "commands obey the same lists"
        );
        assert!(access.check(&webhook("github")).is_ok());
        assert!(
            access
                .check(&webhook("ci"))
                .expect_err("refused")
                .contains("ci")
        );
    }

    #[test]
    fn malformed_lists_are_refused_by_name() {
        for bad in [
            json!({"access": {"channel": ["C1"]}}),
            json!({"access": {"users": "U1"}}),
            json!({"access": []}),
        ] {
            let e = Access::of(&bad).expect_err("malformed");
            assert!(e.starts_with("settings.access"), "{e}");
        }
    }
}
