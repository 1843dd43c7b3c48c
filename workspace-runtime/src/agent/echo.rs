//! The `echo` driver: says what it got, and addresses the agents in `settings.cc`. For
//! demos, tests and the benchmarks: a turn with no cost of its own.

use super::Turn;

/// Says what it got (and addresses `cc`).
pub fn turn(agent: &str, text: &str, cc: &[String]) -> Turn {
    let mut reply = format!("{agent} got: {text}");
    if !cc.is_empty() {
        let names: Vec<String> = cc.iter().map(|n| format!("@{n}")).collect();
        reply.push_str(&format!(" (cc {})", names.join(" ")));
    }
    Turn::answer(agent, reply)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_repeats_and_passes_mentions_on() {
        let t = turn("alice", "@alice please ask @bob", &[]);
        assert_eq!(t.reply, "alice got: @alice please ask @bob");
        assert_eq!(t.mentions, ["bob"]);
        let t = turn("alice", "hello", &["bob".to_owned()]);
        assert_eq!(t.reply, "alice got: hello (cc @bob)");
        assert_eq!(t.mentions, ["bob"]);
    }
}
