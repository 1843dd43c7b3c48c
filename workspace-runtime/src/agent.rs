//! Agents: a driver turns a message into what the agent says; the `@name` tokens in what it
//! says are mentions of other agents.

/// What an agent said in one turn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Turn {
    pub reply: String,
    /// Agents it addressed (`@name`), in order, without itself or repeats.
    pub mentions: Vec<String>,
}

/// How an agent turns a message into a reply (chosen per agent in the configuration).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Driver {
    /// Says what it got; with `settings.cc` (agent names) it also addresses them, which
    /// makes the demo's agent-to-agent mention.
    Echo { cc: Vec<String> },
}

impl Driver {
    /// The driver described by `{"driver": ..., "settings": {...}}` (missing: `echo`).
    pub fn from_settings(agent: &serde_json::Value) -> anyhow::Result<Self> {
        match agent["driver"].as_str().unwrap_or("echo") {
            "echo" => Ok(Self::Echo {
                cc: agent["settings"]["cc"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|v| v.as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default(),
            }),
            other => {
                anyhow::bail!("driver {other:?} is not available in this runtime yet (only echo)")
            }
        }
    }

    pub fn turn(&self, agent: &str, text: &str) -> Turn {
        match self {
            Self::Echo { cc } => echo(agent, text, cc),
        }
    }
}

/// The `echo` driver: says what it got (and addresses `cc`). For demos and tests.
pub fn echo(agent: &str, text: &str, cc: &[String]) -> Turn {
    let mut reply = format!("{agent} got: {text}");
    if !cc.is_empty() {
        let names: Vec<String> = cc.iter().map(|n| format!("@{n}")).collect();
        reply.push_str(&format!(" (cc {})", names.join(" ")));
    }
    let mentions = mentions(agent, &reply);
    Turn { reply, mentions }
}

/// `@name` tokens in `text` (names are lowercase letters, digits and `-`), except `me`.
pub fn mentions(me: &str, text: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for token in text.split(|c: char| c.is_whitespace()) {
        let Some(name) = token.strip_prefix('@') else {
            continue;
        };
        let name: String = name
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-')
            .collect();
        if !name.is_empty() && name != me && !out.contains(&name) {
            out.push(name);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mentions_are_the_other_agents_named_once_in_order() {
        assert_eq!(
            mentions(
                "alice",
                "@alice ask @bob, then @carol and @bob again; mail@example"
            ),
            ["bob", "carol"]
        );
        assert!(mentions("alice", "no one here @ all").is_empty());
    }

    #[test]
    fn echo_repeats_and_passes_mentions_on() {
        let t = echo("alice", "@alice please ask @bob", &[]);
        assert_eq!(t.reply, "alice got: @alice please ask @bob");
        assert_eq!(t.mentions, ["bob"]);
        let t = echo("alice", "hello", &["bob".to_owned()]);
        assert_eq!(t.reply, "alice got: hello (cc @bob)");
        assert_eq!(t.mentions, ["bob"]);
    }

    #[test]
    fn drivers_come_from_the_agent_settings() {
        let d = Driver::from_settings(
            &serde_json::json!({"driver": "echo", "settings": {"cc": ["bob"]}}),
        )
        .expect("echo");
        assert_eq!(
            d,
            Driver::Echo {
                cc: vec!["bob".into()]
            }
        );
        assert!(Driver::from_settings(&serde_json::json!({"driver": "anthropic"})).is_err());
    }
}
