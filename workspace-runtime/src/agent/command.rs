//! The `command` driver: runs a program per turn, the way CLI agents (Claude Code, Codex)
//! are run.
//!
//! Settings: `{"command": ["claude", "-p"], "input": "argument" | "stdin", "output": "text"
//! | "codex-json" | "claude-json", "resume": ["--resume", "{session}"], "timeout_secs": 600,
//! "kill_grace_secs": 5, "max_output_bytes": 1048576}`.
//!
//! - With `resume` (and a JSON `output` that reports a session id), a conversation's next
//!   message resumes the CLI session of its last turn: the `resume` arguments, with
//!   `{session}` replaced by the id, go after the command's own ([`super::sessions`]).
//!
//! - The message goes on stdin (default) or as the last argument, after `--` so that it is
//!   never read as an option; a message longer than [`MAX_ARGUMENT_BYTES`] is refused.
//! - The environment is built from nothing: `PATH`, `HOME` (the workspace directory), the
//!   turn's context (`WARREN_AGENT`, `WARREN_WORKSPACE`, `WARREN_MESSAGE_ID`,
//!   `WARREN_ROUTING_ID`, `WARREN_CONVERSATION`, `WARREN_CHAIN`, `WARREN_REPLY_TO`,
//!   `TRACEPARENT`), `WARREN_SHARED_DIR`, the launch contract (what
//!   `warren-workspace-runtime --mcp` reads when the program starts it as its MCP server)
//!   and the model keys this agent is allowed (`OPENAI_API_KEY=...`, read from the files
//!   the backend wrote). Nothing of the runtime's own environment is inherited.
//! - The working directory is the workspace directory.
//! - Stdout is the reply (or, with `output`, a CLI's JSON that holds the reply and the
//!   model usage: [`super::cli_output`]); stderr goes to the runtime's log. More than `max_output_bytes` of
//!   stdout fails the turn and kills the program.
//! - The program runs in a process group of its own, and the turn's processes end with the
//!   turn: on a timeout the group gets SIGTERM, then SIGKILL after `kill_grace_secs`; what is
//!   left of the group when the program exits is killed. A tool the program started in the
//!   background therefore cannot hold the turn (or its stdout) open.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::AsyncWriteExt;
use tracing::{info, warn};

use super::cli_output::{self, Output, Said};
use super::sessions;
use super::{DriverError, TurnContext, strings};

/// How a `command` agent receives the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input {
    Stdin,
    /// Appended as the last argument (`claude -p MESSAGE`).
    Argument,
}

/// A program run per turn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    pub argv: Vec<String>,
    pub input: Input,
    /// How stdout is read.
    pub output: Output,
    /// Arguments that resume a conversation's session (`{session}`: its id); empty: each
    /// turn is a new session.
    pub resume: Vec<String>,
    /// The whole turn, program and children.
    pub timeout: Duration,
    /// Between SIGTERM and SIGKILL when the turn times out.
    pub kill_grace: Duration,
    /// Most bytes of stdout a turn may write; more fails the turn (and kills the program)
    /// rather than filling the runtime's memory.
    pub max_output_bytes: u64,
    /// The model keys this agent may use: name → file (from its launch contract).
    pub keys: BTreeMap<String, PathBuf>,
}

/// Longest message passed as an argument. Linux refuses one argument over 128 KiB
/// (`MAX_ARG_STRLEN`) with a bare E2BIG; refusing it here says why.
pub const MAX_ARGUMENT_BYTES: usize = 128 * 1024 - 1;

/// What the program runs with besides its own context.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Environment {
    /// Where programs are found.
    pub path: String,
    /// The launch contract (for `--mcp`).
    pub launch: String,
}

impl Command {
    pub fn from_settings(settings: &serde_json::Value) -> Result<Self, DriverError> {
        let argv = strings(&settings["command"]);
        if argv.is_empty() {
            return Err(DriverError::Settings(
                "a command agent needs settings.command, e.g. [\"claude\", \"-p\"]".into(),
            ));
        }
        let input = match settings["input"].as_str().unwrap_or("stdin") {
            "stdin" => Input::Stdin,
            "argument" => Input::Argument,
            other => {
                return Err(DriverError::Settings(format!(
                    "settings.input {other:?}: use stdin or argument"
                )));
            }
        };
        let output_name = settings["output"].as_str().unwrap_or("text");
        let output = Output::named(output_name).ok_or_else(|| {
            DriverError::Settings(format!(
                "settings.output {output_name:?}: use text, codex-json or claude-json"
            ))
        })?;
        let secs = |key: &str, default: u64| {
            Duration::from_secs(settings[key].as_u64().unwrap_or(default))
        };
        let resume = strings(&settings["resume"]);
        if !resume.is_empty() && !resume.iter().any(|a| a.contains("{session}")) {
            return Err(DriverError::Settings(
                "settings.resume must name {session}, e.g. [\"--resume\", \"{session}\"]".into(),
            ));
        }
        Ok(Self {
            argv,
            input,
            output,
            resume,
            timeout: secs("timeout_secs", 600),
            kill_grace: secs("kill_grace_secs", 5),
            max_output_bytes: settings["max_output_bytes"].as_u64().unwrap_or(1 << 20),
            keys: BTreeMap::new(),
        })
    }

    /// The same program, with these model keys in its environment.
    pub fn with_keys(mut self, keys: BTreeMap<String, PathBuf>) -> Self {
        self.keys = keys;
        self
    }

    /// The allowed keys, read now (a rotated key file is picked up at the next turn).
    fn key_values(&self) -> Result<Vec<(String, String)>, DriverError> {
        self.keys
            .iter()
            .map(|(name, path)| {
                std::fs::read_to_string(path)
                    .map(|v| (name.clone(), v.trim().to_owned()))
                    .map_err(|e| {
                        DriverError::Settings(format!(
                            "reading the allowed key {name} from {}: {e}",
                            path.display()
                        ))
                    })
            })
            .collect()
    }

    /// Runs the program for one turn: what it said (the reply, and the usage a CLI
    /// reported).
    pub async fn run(&self, ctx: &TurnContext) -> Result<Said, DriverError> {
        let program = self.argv[0].clone();
        let io = |source| DriverError::Io {
            program: program.clone(),
            source,
        };
        if self.input == Input::Argument && ctx.text.len() > MAX_ARGUMENT_BYTES {
            return Err(DriverError::Failed {
                program,
                status: format!(
                    "the message is {} bytes, more than an argument may hold ({MAX_ARGUMENT_BYTES}); \
                     use \"input\": \"stdin\"",
                    ctx.text.len()
                ),
            });
        }
        // The turn's MCP server, in the runtime: what the program says through it is said
        // as this turn, whatever the program's environment claims. Closed with the turn.
        let mcp = match &ctx.outbox {
            Some(outbox) => Some(
                crate::mcp::TurnSocket::open(
                    &ctx.workspace_dir.join(".warren-mcp"),
                    crate::mcp::McpTurn::of(ctx),
                    outbox.clone(),
                )
                .map_err(io)?,
            ),
            None => None,
        };
        let conversation = ctx
            .conversation
            .as_deref()
            .filter(|_| !self.resume.is_empty());
        let session = conversation.and_then(|c| sessions::load(&ctx.workspace_dir, &ctx.agent, c));
        let resume = session
            .iter()
            .flat_map(|id| self.resume.iter().map(move |a| a.replace("{session}", id)));
        let mut command = tokio::process::Command::new(&program);
        command
            .args(&self.argv[1..])
            .args(resume)
            .current_dir(&ctx.workspace_dir)
            .env_clear()
            .env("PATH", &ctx.environment.path)
            .env("HOME", &ctx.workspace_dir)
            .env(warren_schema::launch::ENV, &ctx.environment.launch)
            .envs(self.key_values()?)
            .env("WARREN_AGENT", &ctx.agent)
            .env("WARREN_WORKSPACE", &ctx.workspace)
            .env("WARREN_MESSAGE_ID", &ctx.message_id)
            .env("WARREN_ROUTING_ID", &ctx.routing_id)
            .env(
                "WARREN_CONVERSATION",
                ctx.conversation.as_deref().unwrap_or(""),
            )
            .env("WARREN_CHAIN", ctx.chain.join(","))
            .env("TRACEPARENT", ctx.traceparent.as_deref().unwrap_or(""))
            .env("WARREN_REPLY_TO", ctx.reply_to.as_deref().unwrap_or(""))
            .env(
                "WARREN_SHARED_DIR",
                ctx.shared_dir
                    .as_deref()
                    .unwrap_or(std::path::Path::new("")),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .process_group(0)
            .kill_on_drop(true);
        // (After `env_clear` above, which would take it away again.)
        if let Some(socket) = &mcp {
            command.env(crate::mcp::SOCKET_ENV, socket.path());
        }
        if self.input == Input::Argument {
            command.arg("--").arg(&ctx.text);
        }
        let mut child = command.spawn().map_err(|source| DriverError::Spawn {
            program: program.clone(),
            source,
        })?;
        // From here on, however the turn ends (even dropped mid-way), the group is killed.
        let group = child.id().map(ProcessGroup::new);
        let mut stdin = child.stdin.take();
        let mut stdout = child.stdout.take();
        let text = ctx.text.clone();
        let input = self.input;
        let feed = async move {
            if let (Some(stdin), Input::Stdin) = (stdin.as_mut(), input) {
                stdin.write_all(text.as_bytes()).await?;
                stdin.write_all(b"\n").await?;
            }
            drop(stdin);
            Ok::<(), std::io::Error>(())
        };
        let limit = self.max_output_bytes;
        let read = async {
            let mut out = Vec::new();
            if let Some(stdout) = stdout.as_mut() {
                let mut bounded = tokio::io::AsyncReadExt::take(stdout, limit + 1);
                tokio::io::AsyncReadExt::read_to_end(&mut bounded, &mut out).await?;
            }
            if out.len() as u64 > limit
                && let Some(group) = &group
            {
                // Not read any further: the program would block on a full pipe.
                group.signal(Signal::SIGKILL);
            }
            Ok::<_, std::io::Error>(out)
        };
        let exit = async {
            let status = child.wait().await;
            // The program is done: what it left running goes with it, so nothing holds
            // its stdout (and the turn) open.
            if let Some(group) = &group {
                group.signal(Signal::SIGKILL);
            }
            status
        };
        let run = async {
            // A program that does not read its stdin is not an error.
            let (fed, status, out) = tokio::join!(feed, exit, read);
            if let Err(e) = fed {
                warn!(error = %e, "the command did not take its input");
            }
            Ok::<_, std::io::Error>((status?, out?))
        };
        let (status, out) = match tokio::time::timeout(self.timeout, run).await {
            Ok(done) => done.map_err(io)?,
            Err(_) => {
                if let Some(group) = &group {
                    group.terminate(&mut child, self.kill_grace).await;
                }
                return Err(DriverError::Timeout {
                    program,
                    timeout: self.timeout,
                });
            }
        };
        if out.len() as u64 > limit {
            return Err(DriverError::Failed {
                program,
                status: format!("wrote more than {limit} bytes on stdout (max_output_bytes)"),
            });
        }
        if !status.success() {
            return Err(DriverError::Failed {
                program,
                status: status.to_string(),
            });
        }
        let said = cli_output::read(self.output, &String::from_utf8_lossy(&out))
            .map_err(|status| DriverError::Failed { program, status })?;
        if let (Some(conversation), Some(id)) = (conversation, &said.session) {
            sessions::store(&ctx.workspace_dir, &ctx.agent, conversation, id);
        }
        info!(bytes = said.reply.len(), "command turn finished");
        Ok(said)
    }
}

/// A turn's process group (its id is the program's pid). Dropping it kills whatever is
/// left in it, unless it was killed already: once its members are gone its id may be
/// reused, and a second SIGKILL could reach someone else's group.
#[derive(Debug)]
struct ProcessGroup {
    pgid: u32,
    killed: std::sync::atomic::AtomicBool,
}

impl ProcessGroup {
    fn new(pgid: u32) -> Self {
        Self {
            pgid,
            killed: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn signal(&self, signal: Signal) {
        if self.killed.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        if signal == Signal::SIGKILL {
            self.killed
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        let Ok(pgid) = i32::try_from(self.pgid) else {
            return;
        };
        // ESRCH: nothing is left in the group, which is the usual case.
        if let Err(e) = killpg(Pid::from_raw(pgid), signal)
            && e != nix::errno::Errno::ESRCH
        {
            warn!(pgid, ?signal, error = %e, "could not signal the turn's processes");
        }
    }

    /// SIGTERM to the group, then (after `grace`, or as soon as the program has exited)
    /// SIGKILL to what is left of it when this is dropped.
    async fn terminate(&self, child: &mut tokio::process::Child, grace: Duration) {
        warn!(
            pgid = self.pgid,
            "the command timed out; terminating its processes"
        );
        self.signal(Signal::SIGTERM);
        let _ = tokio::time::timeout(grace, child.wait()).await;
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        self.signal(Signal::SIGKILL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command(script: &str, input: Input, timeout_ms: u64) -> Command {
        Command {
            argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
            input,
            output: Output::Text,
            resume: Vec::new(),
            timeout: Duration::from_millis(timeout_ms),
            kill_grace: Duration::from_millis(200),
            max_output_bytes: 1 << 20,
            keys: BTreeMap::new(),
        }
    }

    fn ctx(text: &str) -> TurnContext {
        TurnContext {
            workspace: "research".into(),
            agent: "alice".into(),
            text: text.into(),
            chain: vec!["bob".into()],
            workspace_dir: std::env::temp_dir(),
            environment: Environment {
                path: "/usr/bin:/bin".into(),
                launch: "{}".into(),
            },
            ..TurnContext::default()
        }
    }

    /// Whether `pid` is still a live process (a zombie waiting for its reaper is not).
    fn alive(pid: u32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|stat| {
                stat.rsplit_once(") ")
                    .map(|(_, rest)| !rest.starts_with('Z'))
            })
            .unwrap_or(false)
    }

    async fn gone_within(pid: u32, deadline: Duration) -> bool {
        let until = tokio::time::Instant::now() + deadline;
        while alive(pid) {
            if tokio::time::Instant::now() > until {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    /// The process whose pid the script wrote to `pidfile` ends within 5 s of the turn.
    async fn assert_gone(pidfile: &std::path::Path, what: &str) {
        let pid: u32 = std::fs::read_to_string(pidfile)
            .expect("the program wrote the pid")
            .trim()
            .parse()
            .expect("a pid");
        assert!(
            gone_within(pid, Duration::from_secs(5)).await,
            "{what} ({pid}) outlived the turn"
        );
    }

    #[test]
    fn settings_are_checked_when_the_runtime_starts() {
        let c = Command::from_settings(&serde_json::json!({
            "command": ["claude", "-p"], "input": "argument", "timeout_secs": 60
        }))
        .expect("valid");
        assert_eq!(c.argv, ["claude", "-p"]);
        assert_eq!(c.input, Input::Argument);
        assert_eq!(c.timeout, Duration::from_secs(60));
        assert_eq!(c.kill_grace, Duration::from_secs(5), "the default grace");
        let e = Command::from_settings(&serde_json::json!({"command": ["x"], "input": "file"}))
            .expect_err("no such input");
        assert!(e.to_string().contains("stdin or argument"), "{e}");
    }

    #[tokio::test]
    async fn a_command_agent_reads_stdin_with_its_context_and_replies_on_stdout() {
        let c = command(
            r#"read line; echo "$WARREN_AGENT in $WARREN_WORKSPACE (asked by $WARREN_CHAIN) heard: $line; cc @carol""#,
            Input::Stdin,
            5_000,
        );
        let reply = c.run(&ctx("hello")).await.expect("turn").reply;
        assert_eq!(
            reply,
            "alice in research (asked by bob) heard: hello; cc @carol"
        );
        let pwd = command("pwd", Input::Stdin, 5_000);
        let dir = pwd.run(&ctx("x")).await.expect("turn").reply;
        assert_eq!(
            std::fs::canonicalize(dir).expect("dir"),
            std::fs::canonicalize(std::env::temp_dir()).expect("tmp"),
            "runs in the workspace directory"
        );
    }

    #[tokio::test]
    async fn a_command_agent_can_take_the_message_as_its_last_argument() {
        // After `--`: a message that looks like an option is still the message.
        let c = command(r#"echo "$# args: $0 $1""#, Input::Argument, 5_000);
        assert_eq!(
            c.run(&ctx("summarise")).await.expect("turn").reply,
            "1 args: -- summarise"
        );
        assert_eq!(
            c.run(&ctx("--help")).await.expect("turn").reply,
            "1 args: -- --help"
        );
        let too_long = "x".repeat(MAX_ARGUMENT_BYTES + 1);
        let e = c.run(&ctx(&too_long)).await.expect_err("refused");
        assert!(e.to_string().contains("use \"input\": \"stdin\""), "{e}");
    }

    #[tokio::test]
    async fn a_command_agent_sees_only_its_context_and_its_allowed_keys() {
        let dir = std::env::temp_dir().join(format!("warren-cmd-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("OPENAI_API_KEY"), "sk-allowed\n").expect("key");
        // Set in the runtime's own environment: never passed on.
        let c = command(
            "env | cut -d= -f1 | sort | tr '\\n' ' '; echo; echo \"$OPENAI_API_KEY\"",
            Input::Stdin,
            5_000,
        )
        .with_keys(BTreeMap::from([(
            "OPENAI_API_KEY".to_owned(),
            dir.join("OPENAI_API_KEY"),
        )]));
        let reply = c.run(&ctx("x")).await.expect("turn").reply;
        let (names, key) = reply.split_once('\n').expect("two lines");
        assert_eq!(
            names.trim(),
            "HOME OPENAI_API_KEY PATH PWD TRACEPARENT WARREN_AGENT WARREN_CHAIN \
             WARREN_CONVERSATION WARREN_LAUNCH WARREN_MESSAGE_ID WARREN_REPLY_TO \
             WARREN_ROUTING_ID WARREN_SHARED_DIR WARREN_WORKSPACE",
            "nothing of the runtime's environment (it has CARGO_*, DATABASE_URL...)"
        );
        assert_eq!(key, "sk-allowed");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_failing_or_hanging_command_is_an_error_not_a_reply() {
        let failing = command("echo partial; exit 4", Input::Stdin, 5_000);
        let e = failing.run(&ctx("x")).await.expect_err("fails");
        assert!(e.to_string().contains("exit status: 4"), "{e}");
        let hanging = command("sleep 30", Input::Stdin, 200);
        let started = std::time::Instant::now();
        let e = hanging.run(&ctx("x")).await.expect_err("times out");
        assert!(matches!(e, DriverError::Timeout { .. }), "{e}");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "killed, not waited for"
        );
    }

    #[tokio::test]
    async fn a_turn_that_writes_without_end_fails_at_its_output_limit() {
        let mut endless = command("yes warren", Input::Stdin, 20_000);
        endless.max_output_bytes = 4096;
        let started = std::time::Instant::now();
        let e = endless.run(&ctx("x")).await.expect_err("too much output");
        assert!(e.to_string().contains("more than 4096 bytes"), "{e}");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "stopped at the limit, not at the timeout: {:?}",
            started.elapsed()
        );
        let mut exact = command("printf 1234", Input::Stdin, 5_000);
        exact.max_output_bytes = 4;
        assert_eq!(
            exact.run(&ctx("x")).await.expect("at the limit").reply,
            "1234"
        );
    }

    #[tokio::test]
    async fn a_timed_out_turn_takes_the_programs_children_with_it() {
        let dir = std::env::temp_dir().join(format!("warren-pg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let pidfile = dir.join("child.pid");
        // The child ignores SIGTERM: only the SIGKILL after the grace ends it.
        let script = format!(
            "sh -c 'trap \"\" TERM; sleep 30' & echo $! > {}; wait",
            pidfile.display()
        );
        let e = command(&script, Input::Stdin, 500)
            .run(&ctx("x"))
            .await
            .expect_err("times out");
        assert!(matches!(e, DriverError::Timeout { .. }), "{e}");
        assert_gone(&pidfile, "the program's child").await;
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn a_background_process_cannot_hold_a_finished_turn_open() {
        let dir = std::env::temp_dir().join(format!("warren-bg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let pidfile = dir.join("bg.pid");
        // The background sleep keeps stdout open; the turn ends when the program does.
        let script = format!("sleep 30 & echo $! > {}; echo done", pidfile.display());
        let started = std::time::Instant::now();
        let reply = command(&script, Input::Stdin, 20_000).run(&ctx("x")).await;
        assert_gone(&pidfile, "the background process").await;
        let _ = std::fs::remove_dir_all(dir);
        // The program's exit ended the turn, not the timeout.
        assert_eq!(reply.expect("answered").reply, "done");
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "{:?}",
            started.elapsed()
        );
    }
}
