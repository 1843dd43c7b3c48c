//! A private `nats-server` with JetStream, for what the shared server of a test run cannot
//! be put through: a crash, a lost store, operator-mode auth. Used by the runtime's tests
//! and by the NATS-loss drill.
//!
//! The binary is `NATS_SERVER_BIN` (`scripts/lib/services.sh` installs it and sets it), else
//! `nats-server` on the PATH; 2.10 or newer.

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A running server, its store in `{dir}/js` and its log in `{dir}/server.log`. Killed when
/// dropped.
#[derive(Debug)]
pub struct NatsServer {
    bin: PathBuf,
    conf: PathBuf,
    child: tokio::process::Child,
    /// `nats://127.0.0.1:{port}`; the same across restarts.
    pub url: String,
}

impl NatsServer {
    /// `NATS_SERVER_BIN`, else `nats-server`.
    pub fn binary() -> PathBuf {
        std::env::var_os("NATS_SERVER_BIN").map_or_else(|| "nats-server".into(), PathBuf::from)
    }

    /// Starts [`NatsServer::binary`] storing in `dir/js`, with `extra` appended to its
    /// configuration (an `include` of an auth file, say).
    pub async fn start(dir: &Path, extra: &str) -> io::Result<Self> {
        Self::start_with(&Self::binary(), dir, extra).await
    }

    /// Starts `bin` storing in `dir/js`, with `extra` appended to its configuration.
    pub async fn start_with(bin: &Path, dir: &Path, extra: &str) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let conf = dir.join("server.conf");
        std::fs::write(
            &conf,
            format!(
                "listen: 127.0.0.1:{port}\njetstream {{ store_dir: {:?} }}\n{extra}\n",
                dir.join("js")
            ),
        )?;
        let server = Self {
            child: spawn(bin, &conf)?,
            bin: bin.to_owned(),
            conf,
            url: format!("nats://127.0.0.1:{port}"),
        };
        server.wait_listening().await?;
        Ok(server)
    }

    /// SIGKILL (no goodbye to its clients), and the server started again on the same port
    /// and store.
    pub async fn crash_and_restart(&mut self) -> io::Result<()> {
        self.child.kill().await?;
        self.child = spawn(&self.bin, &self.conf)?;
        self.wait_listening().await
    }

    /// SIGKILL, the JetStream store deleted (every stream, consumer and bucket), and a new
    /// server on the same port: a server replaced without its data.
    pub async fn crash_wipe_and_restart(&mut self) -> io::Result<()> {
        self.child.kill().await?;
        std::fs::remove_dir_all(self.conf.with_file_name("js"))?;
        self.child = spawn(&self.bin, &self.conf)?;
        self.wait_listening().await
    }

    pub async fn stop(mut self) -> io::Result<()> {
        self.child.kill().await
    }

    async fn wait_listening(&self) -> io::Result<()> {
        let addr = self.url.trim_start_matches("nats://");
        let deadline = Instant::now() + Duration::from_secs(15);
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "nats-server did not listen on {addr} within 15 s; see {}",
                        self.conf.with_file_name("server.log").display()
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }
}

fn spawn(bin: &Path, conf: &Path) -> io::Result<tokio::process::Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(conf.with_file_name("server.log"))?;
    tokio::process::Command::new(bin)
        .arg("-c")
        .arg(conf)
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "running {} ({e}): set NATS_SERVER_BIN (scripts/test does)",
                    bin.display()
                ),
            )
        })
}
