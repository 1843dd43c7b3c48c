//! Command line and configuration: every setting is a flag with an environment variable.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use sqlx::postgres::PgPoolOptions;
use warren_schema::{EventId, EventLog, Secret};

use crate::backend::BackendConfig;
use crate::backend::kubernetes::KubernetesConfig;
use crate::backend::local::{LocalConfig, Users};
use crate::controller::{self, ControllerConfig};
use crate::decide::Policy;
use crate::nats_auth::{Bootstrap, Issuer};
use crate::operator;
use warren_schema::launch::TelemetryLaunch;

#[derive(Debug, Parser)]
#[command(name = "warren-control-plane", version, about)]
pub struct Cli {
    /// File holding the PostgreSQL connection string of Warren's database, instead of the
    /// `DATABASE_URL` variable (every command but `nats-auth` needs one). Secrets are read
    /// from the environment or files, never from flags: a command line is visible to every
    /// user of the machine.
    #[arg(long, env = "DATABASE_URL_FILE")]
    pub database_url_file: Option<std::path::PathBuf>,

    /// Most connections this process opens.
    #[arg(long, env = "WARREN_DB_MAX_CONNECTIONS", default_value_t = 10)]
    pub db_max_connections: u32,

    #[command(flatten)]
    pub telemetry: warren_telemetry::TelemetryOptions,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the controller: wait for the leader lease, then follow the log and record
    /// decisions (several replicas may run; one leads).
    Run(Box<RunArgs>),
    /// Apply pending database migrations (safe to run concurrently and repeatedly).
    Migrate,
    /// Drop the read models (agents, routes, workspaces, messages, replies) and replay the
    /// log from position 0. Run it with the controllers stopped.
    Rebuild,
    /// Show the event log's position, how far readers are held back, and each checkpoint.
    Status,
    /// Print events as JSON lines.
    Events {
        /// Only events after this position.
        #[arg(long, default_value_t = 0)]
        after: i64,
        /// At most this many events.
        #[arg(long, default_value_t = 100)]
        limit: i64,
        /// Only this stream (versions from 1).
        #[arg(long, conflicts_with_all = ["event_type", "correlation"])]
        stream: Option<String>,
        /// Only this event type.
        #[arg(long = "type", conflicts_with = "correlation")]
        event_type: Option<String>,
        /// Only this conversation (correlation id).
        #[arg(long)]
        correlation: Option<uuid::Uuid>,
    },
    /// Print the causation chain of an event, root cause first: why did this happen?
    Explain {
        /// The event id (a message, a reply, a decision).
        #[arg(required_unless_present = "workspace")]
        event_id: Option<uuid::Uuid>,
        /// Instead: why is this workspace running (its latest start decision's chain)?
        #[arg(long, conflicts_with = "event_id")]
        workspace: Option<String>,
    },
    /// NATS credentials (decentralized JWT auth).
    #[command(subcommand)]
    NatsAuth(NatsAuthCommand),
    /// Admin API tokens, written to the database directly: the break-glass path when no
    /// admin token is at hand (the API's `/v1/tokens` is the everyday one).
    #[command(subcommand)]
    Tokens(TokensCommand),
    /// Print the admin API's OpenAPI document (what `docs/openapi.json` holds).
    Openapi,
}

#[derive(Debug, Subcommand)]
pub enum TokensCommand {
    /// Issue a token and print it (once: only its hash is kept).
    Issue {
        /// What it is for (`ci`, `alice`).
        #[arg(long)]
        name: String,
        /// `viewer`, `operator` or `admin`.
        #[arg(long, value_parser = parse_role)]
        role: crate::admin_api::Role,
        /// Days until it expires (unset: never).
        #[arg(long)]
        expires_in_days: Option<u32>,
    },
    /// List tokens (never their secrets) as JSON lines.
    List,
    /// Revoke a token by id.
    Revoke { id: String },
}

fn parse_role(s: &str) -> Result<crate::admin_api::Role, String> {
    crate::admin_api::Role::parse(s).ok_or_else(|| format!("{s:?}: viewer, operator or admin"))
}

#[derive(Debug, Subcommand)]
pub enum NatsAuthCommand {
    /// Make a new trust chain: `auth.conf` for the NATS server (include it), the account key
    /// the control plane signs workspaces' credentials with (`account.seed`, pass it as
    /// `--nats-account-seed`) and the control plane's own credentials
    /// (`control-plane.creds`, pass it as `--nats-creds`). Refuses to overwrite.
    Init {
        /// Where to write the three files.
        #[arg(long)]
        dir: std::path::PathBuf,
        /// The subject prefix the credentials are for.
        #[arg(long, env = "WARREN_NATS_PREFIX", default_value = "warren")]
        nats_prefix: String,
    },
    /// Print credentials for one workspace hosting `agents` (what the control plane issues
    /// at each start), e.g. to check what a workspace may reach.
    Workspace {
        #[arg(long, env = "WARREN_NATS_ACCOUNT_SEED")]
        account_seed: std::path::PathBuf,
        #[arg(long, env = "WARREN_NATS_PREFIX", default_value = "warren")]
        nats_prefix: String,
        name: String,
        #[arg(value_delimiter = ',')]
        agents: Vec<String>,
    },
}

/// Settings of `run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Agents and routes (JSON; see `config_file`). Changes are recorded as events at start.
    #[arg(long, env = "WARREN_CONFIG")]
    pub config: Option<std::path::PathBuf>,
    /// This replica's name in the leader lease (default: host name and process id).
    #[arg(long, env = "WARREN_REPLICA")]
    pub replica: Option<String>,
    /// Seconds a killed leader keeps the lease before a standby takes over.
    #[arg(long, env = "WARREN_LEASE_TTL_SECS", default_value_t = 10)]
    pub lease_ttl_secs: u64,
    /// Milliseconds between checks of time-based decisions (idle stops, restarts).
    #[arg(long, env = "WARREN_TICK_MS", default_value_t = 1000)]
    pub tick_ms: u64,
    /// Most workspaces running at once (unset: no cap).
    #[arg(long, env = "WARREN_MAX_RUNNING")]
    pub max_running: Option<usize>,
    /// Most workspaces running per Slack team (or webhook endpoint).
    #[arg(long, env = "WARREN_MAX_RUNNING_PER_TEAM")]
    pub max_running_per_team: Option<usize>,
    /// Most workspaces running per Slack channel (or webhook endpoint).
    #[arg(long, env = "WARREN_MAX_RUNNING_PER_CHANNEL")]
    pub max_running_per_channel: Option<usize>,
    /// Restarts of a failing workspace before it is marked failed.
    #[arg(long, env = "WARREN_MAX_RESTARTS", default_value_t = 3)]
    pub max_restarts: u32,
    /// Longest agent-to-agent mention chain delivered.
    #[arg(long, env = "WARREN_MENTION_MAX_DEPTH", default_value_t = 5)]
    pub mention_max_depth: usize,
    /// Where workspaces run: `local` (child processes), `kubernetes` (a pod per
    /// workspace) or `none` (record decisions only).
    #[arg(long, env = "WARREN_BACKEND", default_value = "local")]
    pub backend: BackendKind,
    #[command(flatten)]
    pub kubernetes: KubernetesArgs,
    /// Local backend: directory holding each workspace's directory and the shared one.
    #[arg(long, env = "WARREN_LOCAL_ROOT", default_value = ".warren/local")]
    pub local_root: std::path::PathBuf,
    /// Local backend: the workspace runtime command (split on spaces).
    #[arg(
        long,
        env = "WARREN_RUNTIME_COMMAND",
        default_value = "warren-workspace-runtime"
    )]
    pub runtime_command: String,
    /// NATS server (JetStream) for agents' inboxes; unset: decisions are recorded but not
    /// delivered.
    #[arg(long, env = "NATS_URL")]
    pub nats_url: Option<String>,
    /// Prefix of every NATS subject and stream (several installations on one account).
    #[arg(long, env = "WARREN_NATS_PREFIX", default_value = "warren")]
    pub nats_prefix: String,
    /// The control plane's NATS credentials file, when the server requires one.
    #[arg(long, env = "WARREN_NATS_CREDS")]
    pub nats_creds: Option<std::path::PathBuf>,
    /// The NATS account's seed file (`nats-auth init`): each workspace then connects with
    /// credentials of its own, allowed its own subjects only.
    #[arg(long, env = "WARREN_NATS_ACCOUNT_SEED")]
    pub nats_account_seed: Option<std::path::PathBuf>,
    /// Local backend: a directory of model keys, one file per key named like the key
    /// (`OPENAI_API_KEY`, mode 0600). An agent gets only those its `allowed_keys` names.
    #[arg(long, env = "WARREN_MODEL_KEYS_DIR")]
    pub model_keys_dir: Option<std::path::PathBuf>,
    /// Local backend: run every workspace as the control plane's own user even when it is
    /// root (by default, as root, each workspace gets a Unix user of its own).
    #[arg(long, env = "WARREN_LOCAL_SAME_USER")]
    pub same_user: bool,
    /// Seconds a workspace's NATS credentials are valid (0: no expiry). A running workspace
    /// gets new ones at half that, and reconnects with them when the old ones expire; a
    /// stopped workspace's leftover credentials stop working.
    #[arg(long, env = "WARREN_NATS_CREDENTIALS_TTL_SECS", default_value_t = 3600)]
    pub nats_credentials_ttl_secs: u64,
    /// Metrics listener: `GET /metrics` (Prometheus), no authentication.
    #[arg(
        long,
        env = "WARREN_CONTROL_PLANE_METRICS_LISTEN",
        default_value = "127.0.0.1:9465"
    )]
    pub metrics_listen: std::net::SocketAddr,
    /// The admin API's listener (bearer tokens; see docs/admin-api.md). Every replica
    /// serves it, leader or not.
    #[arg(long, env = "WARREN_ADMIN_LISTEN", default_value = "127.0.0.1:9470")]
    pub admin_listen: std::net::SocketAddr,
}

/// Where workspaces run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendKind {
    Local,
    Kubernetes,
    None,
}

/// The kubernetes backend's settings (see docs/kubernetes.md).
#[derive(Debug, Clone, clap::Args)]
pub struct KubernetesArgs {
    /// Kubernetes: a kubeconfig file (unset: in-cluster service account, or KUBECONFIG).
    #[arg(long = "kubeconfig", env = "WARREN_KUBECONFIG")]
    pub kubeconfig: Option<std::path::PathBuf>,
    /// Kubernetes: the namespace workspace pods run in.
    #[arg(
        long = "kube-namespace",
        env = "WARREN_KUBE_NAMESPACE",
        default_value = "workspaces"
    )]
    pub namespace: String,
    /// Kubernetes: the installation's name (prefixes object names; one per namespace).
    #[arg(
        long = "kube-instance",
        env = "WARREN_KUBE_INSTANCE",
        default_value = "warren"
    )]
    pub instance: String,
    /// Kubernetes: the workspace runtime image (agents may name another in settings.pod).
    #[arg(long = "kube-image", env = "WARREN_KUBE_IMAGE")]
    pub image: Option<String>,
    /// Kubernetes: the ReadWriteMany claim holding workspaces/ and shared/.
    #[arg(
        long = "kube-claim",
        env = "WARREN_KUBE_CLAIM",
        default_value = "warren-files"
    )]
    pub claim: String,
    /// Kubernetes: NATS as workspace pods reach it (unset: --nats-url).
    #[arg(long = "kube-nats-url", env = "WARREN_KUBE_NATS_URL")]
    pub kube_nats_url: Option<String>,
    /// Kubernetes: where workspace pods may connect besides DNS, as CIDR:PORT (NATS,
    /// model APIs); comma-separated.
    #[arg(
        long = "kube-egress",
        env = "WARREN_KUBE_EGRESS",
        value_delimiter = ','
    )]
    pub egress: Vec<crate::backend::kubernetes::objects::Egress>,
    /// Kubernetes: a JSON file of pod settings for every workspace (the shape of an agent's
    /// `settings.pod`: image, resources, runtime_class, node_selector, tolerations,
    /// affinity, priority_class); an agent's own settings override it field by field.
    #[arg(long = "kube-pod-defaults", env = "WARREN_KUBE_POD_DEFAULTS")]
    pub pod_defaults: Option<std::path::PathBuf>,
    /// Kubernetes: API writes per second, on average.
    #[arg(
        long = "kube-writes-per-second",
        env = "WARREN_KUBE_WRITES_PER_SECOND",
        default_value_t = 50.0
    )]
    pub writes_per_second: f64,
    /// Kubernetes: API calls in flight at once.
    #[arg(
        long = "kube-concurrency",
        env = "WARREN_KUBE_CONCURRENCY",
        default_value_t = 16
    )]
    pub concurrency: usize,
}

impl RunArgs {
    fn controller_config(
        &self,
        telemetry: &warren_telemetry::TelemetryOptions,
    ) -> anyhow::Result<ControllerConfig> {
        let namespace = warren_schema::nats::Namespace::new(&self.nats_prefix);
        let issuer = self
            .nats_account_seed
            .as_deref()
            .map(|path| {
                Issuer::from_seed_file(path, namespace.clone()).map(|issuer| {
                    Arc::new(match self.nats_credentials_ttl_secs {
                        0 => issuer,
                        secs => issuer.with_lifetime(Duration::from_secs(secs)),
                    })
                })
            })
            .transpose()?;
        if issuer.is_none() && self.nats_url.is_some() && self.backend != BackendKind::None {
            tracing::warn!(
                "no --nats-account-seed: workspaces connect to NATS without credentials of \
                 their own and can reach each other's inboxes and memory (see deploy/nats)"
            );
        }
        let holder = self
            .replica
            .clone()
            .unwrap_or_else(warren_schema::lease::default_holder);
        Ok(ControllerConfig {
            holder,
            lease_ttl: Duration::from_secs(self.lease_ttl_secs.max(1)),
            tick: Duration::from_millis(self.tick_ms.max(10)),
            policy: Policy {
                max_running: self.max_running,
                max_running_per_team: self.max_running_per_team,
                max_running_per_channel: self.max_running_per_channel,
                max_restarts: self.max_restarts,
                mention_max_depth: self.mention_max_depth,
                ..Policy::default()
            },
            config_file: self.config.clone(),
            backend: self.backend_config(issuer, telemetry)?,
            nats: self.nats_url.clone().map(|url| controller::NatsConfig {
                url,
                namespace,
                credentials: self.nats_creds.clone(),
            }),
        })
    }
}

impl RunArgs {
    fn backend_config(
        &self,
        issuer: Option<Arc<Issuer>>,
        telemetry: &warren_telemetry::TelemetryOptions,
    ) -> anyhow::Result<Option<BackendConfig>> {
        let telemetry = TelemetryLaunch {
            log_format: Some(
                match telemetry.log_format {
                    warren_telemetry::LogFormat::Json => "json",
                    warren_telemetry::LogFormat::Text => "text",
                }
                .into(),
            ),
            log_filter: telemetry.log_filter.clone(),
            otlp_endpoint: telemetry.otlp_endpoint.clone(),
            metrics_listen: None,
        };
        Ok(match self.backend {
            BackendKind::None => None,
            BackendKind::Local => Some(BackendConfig::Local(LocalConfig {
                nats_url: self.nats_url.clone(),
                nats_prefix: self.nats_prefix.clone(),
                credentials: issuer,
                model_keys: self.model_keys_dir.clone(),
                telemetry,
                // Where programs are: not a secret, and the agents' CLIs need it.
                path: std::env::var("PATH")
                    .unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into()),
                users: if self.same_user {
                    Users::Same
                } else {
                    Users::Auto
                },
                ..LocalConfig::new(
                    self.local_root.clone(),
                    self.runtime_command
                        .split_whitespace()
                        .map(str::to_owned)
                        .collect(),
                )
            })),
            BackendKind::Kubernetes => {
                let k = &self.kubernetes;
                let nats_url = k
                    .kube_nats_url
                    .clone()
                    .or_else(|| self.nats_url.clone())
                    .ok_or_else(|| {
                        anyhow::anyhow!("--backend kubernetes needs --kube-nats-url or --nats-url")
                    })?;
                if !crate::backend::kubernetes::settings::is_dns_subdomain(&k.namespace) {
                    anyhow::bail!("--kube-namespace {:?} is not a namespace name", k.namespace);
                }
                if !crate::config_file::is_name(&k.instance) || k.instance.len() > 40 {
                    anyhow::bail!(
                        "--kube-instance {:?}: use at most 40 lowercase letters, digits and '-'",
                        k.instance
                    );
                }
                let mut config = KubernetesConfig::new(&k.namespace, nats_url);
                config.kubeconfig = k.kubeconfig.clone();
                config.template.instance = k.instance.clone();
                if let Some(image) = &k.image {
                    config.template.image = image.clone();
                }
                config.template.claim = k.claim.clone();
                if let Some(path) = &k.pod_defaults {
                    config.template.defaults =
                        crate::backend::kubernetes::settings::PodSettings::defaults_from_file(path)
                            .map_err(|e| anyhow::anyhow!("--kube-pod-defaults: {e}"))?;
                }
                config.nats_prefix = self.nats_prefix.clone();
                config.credentials = issuer;
                config.model_keys = self.model_keys_dir.clone();
                config.telemetry = telemetry;
                config.egress = k.egress.clone();
                config.writes_per_second = k.writes_per_second;
                config.concurrency = k.concurrency;
                Some(BackendConfig::from(config))
            }
        })
    }
}

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let telemetry = warren_telemetry::Telemetry::init("warren-control-plane", &cli.telemetry)?;
    let result = execute(cli, &telemetry).await;
    tokio::task::spawn_blocking(move || telemetry.shutdown()).await?;
    result
}

async fn execute(cli: Cli, telemetry: &warren_telemetry::Telemetry) -> anyhow::Result<()> {
    if let Command::NatsAuth(command) = &cli.command {
        return nats_auth_command(command, &mut std::io::stdout().lock());
    }
    if let Command::Openapi = &cli.command {
        let mut out = std::io::stdout().lock();
        serde_json::to_writer_pretty(&mut out, &crate::admin_api::openapi())?;
        writeln!(out)?;
        return Ok(());
    }
    let database_url = Secret::from_env_or_file("DATABASE_URL", cli.database_url_file.as_deref())?
        .ok_or_else(|| anyhow::anyhow!("set DATABASE_URL (or --database-url-file)"))?;
    let pool = PgPoolOptions::new()
        .max_connections(cli.db_max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .connect(database_url.expose())
        .await
        // The URL may hold a password: the error names the operation, not the URL.
        .map_err(|e| anyhow::anyhow!("connecting to PostgreSQL (DATABASE_URL): {e}"))?;
    let log = EventLog::new(pool);
    let mut out = std::io::stdout().lock();
    match cli.command {
        Command::Run(args) => {
            let listener = tokio::net::TcpListener::bind(args.metrics_listen).await?;
            let shutdown = warren_telemetry::shutdown_on_signal()?;
            let admin_listener = tokio::net::TcpListener::bind(args.admin_listen).await?;
            let metrics = telemetry.metrics_router();
            let metrics_shutdown = shutdown.clone();
            tokio::spawn(async move {
                axum::serve(listener, metrics)
                    .with_graceful_shutdown(async move { metrics_shutdown.cancelled().await })
                    .await
            });
            bootstrap_token(&log).await?;
            let config = args.controller_config(&cli.telemetry)?;
            let admin = tokio::spawn(crate::admin_api::serve(
                admin_listener,
                log.clone(),
                crate::admin_api::Settings {
                    policy: config.policy.clone(),
                    nats: config.nats.clone(),
                },
                telemetry.metrics_route(),
                shutdown.clone(),
            ));
            let controlled = controller::run(log, config, shutdown).await;
            admin.abort();
            controlled?;
        }
        Command::Rebuild => {
            let started = std::time::Instant::now();
            let replayed = crate::projection::rebuild(&log).await?;
            tracing::info!(
                replayed,
                seconds = started.elapsed().as_secs_f64(),
                "read models rebuilt"
            );
        }
        Command::Migrate => {
            log.migrate().await?;
            tracing::info!("migrations applied");
        }
        Command::Status => operator::status(&log, &mut out).await?,
        Command::Events {
            after,
            limit,
            stream,
            event_type,
            correlation,
        } => {
            let events = match (stream, event_type, correlation) {
                (Some(s), _, _) => log.read_stream(&s, 1, limit).await?,
                (_, Some(t), _) => log.read_type(&t, after, limit).await?,
                (_, _, Some(c)) => log.read_correlation(EventId(c), limit).await?,
                _ => log.read_positions(after, i64::MAX, limit).await?,
            };
            operator::print_events(&events, &mut out)?;
        }
        Command::Explain {
            event_id,
            workspace,
        } => {
            let chain = match (event_id, &workspace) {
                (Some(id), _) => crate::explain::event(&log, EventId(id)).await?,
                (None, Some(name)) => crate::explain::workspace(&log, name).await?,
                (None, None) => Vec::new(),
            };
            if chain.is_empty() {
                match (event_id, workspace) {
                    (Some(id), _) => anyhow::bail!("no event with id {id}"),
                    (_, Some(name)) => anyhow::bail!("workspace {name} was never started"),
                    _ => anyhow::bail!("give an event id or --workspace"),
                }
            }
            operator::print_chain(&chain, &mut out)?;
        }
        Command::Tokens(command) => tokens_command(&log, command, &mut out).await?,
        Command::NatsAuth(_) | Command::Openapi => unreachable!("handled before connecting"),
    }
    Ok(())
}

/// On a database that never issued a token, issues the first admin token and prints it to
/// stderr, once: the only time it is shown (only its hash is stored).
async fn bootstrap_token(log: &EventLog) -> anyhow::Result<()> {
    if let Some(token) = crate::admin_api::tokens::bootstrap(log).await? {
        let mut err = std::io::stderr().lock();
        writeln!(
            err,
            "\nThe first admin API token (shown once, never again; keep it secret):\n\n    {}\n\n\
             Issue more with POST /v1/tokens, or `warren-control-plane tokens issue`.\n",
            token.expose()
        )?;
        tracing::info!("the first admin API token was issued and printed to stderr");
    }
    Ok(())
}

async fn tokens_command(
    log: &EventLog,
    command: TokensCommand,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    match command {
        TokensCommand::Issue {
            name,
            role,
            expires_in_days,
        } => {
            let expires_at =
                expires_in_days.map(|d| chrono::Utc::now() + chrono::TimeDelta::days(i64::from(d)));
            let (id, token) =
                crate::admin_api::tokens::issue_direct(log, &name, role, expires_at, "break-glass")
                    .await?;
            tracing::info!(token_id = %id, %role, "token issued");
            writeln!(out, "{}", token.expose())?;
        }
        TokensCommand::List => {
            let view = token_view(log).await?;
            for t in view.tokens.values() {
                serde_json::to_writer(
                    &mut *out,
                    &serde_json::json!({"id": t.id, "name": t.name, "role": t.role,
                        "issued_at": t.issued_at, "expires_at": t.expires_at,
                        "revoked_at": t.revoked_at}),
                )?;
                writeln!(out)?;
            }
        }
        TokensCommand::Revoke { id } => {
            let view = token_view(log).await?;
            if !view.tokens.contains_key(&id) {
                anyhow::bail!("no token {id:?}");
            }
            let mut metadata = warren_schema::Metadata::new(crate::admin_api::SOURCE);
            metadata.actor = Some("break-glass".into());
            let event = warren_schema::NewEvent::from_domain(
                EventId::random(),
                &warren_schema::events::TokenRevoked {
                    token_id: id.clone(),
                },
                metadata,
            )?;
            log.append(&warren_schema::AppendRequest::new(
                crate::config_file::CONFIG_STREAM,
                vec![event],
            ))
            .await?;
            writeln!(out, "revoked {id}")?;
        }
    }
    Ok(())
}

/// The tokens as the log has them: only the token events are read, not the whole log.
async fn token_view(log: &EventLog) -> anyhow::Result<crate::admin_api::view::View> {
    use warren_schema::events::{DomainEvent, TokenIssued, TokenRevoked};
    let mut view = crate::admin_api::view::View::default();
    let mut filter = warren_schema::event_log::EventFilter {
        types: vec![TokenIssued::TYPE.into(), TokenRevoked::TYPE.into()],
        ..Default::default()
    };
    loop {
        let page = log.query(&filter, 1000).await?;
        page.iter().for_each(|e| view.apply(e));
        match page.last() {
            Some(last) if page.len() == 1000 => filter.after = Some(last.position),
            _ => return Ok(view),
        }
    }
}

fn nats_auth_command(command: &NatsAuthCommand, out: &mut impl Write) -> anyhow::Result<()> {
    match command {
        NatsAuthCommand::Init { dir, nats_prefix } => {
            let exists = ["auth.conf", "account.seed", "control-plane.creds"]
                .iter()
                .map(|f| dir.join(f))
                .find(|p| p.exists());
            if let Some(path) = exists {
                anyhow::bail!(
                    "{} exists: a new trust chain would lock out every credential issued \
                     from the old one; remove the files first if that is what you want",
                    path.display()
                );
            }
            let boot = Bootstrap::new();
            boot.write(dir, &warren_schema::nats::Namespace::new(nats_prefix))?;
            writeln!(
                out,
                "wrote {dir}/auth.conf (include it in nats-server.conf), \
                 {dir}/account.seed and {dir}/control-plane.creds (keep them secret)",
                dir = dir.display()
            )?;
        }
        NatsAuthCommand::Workspace {
            account_seed,
            nats_prefix,
            name,
            agents,
        } => {
            let issuer = Issuer::from_seed_file(
                account_seed,
                warren_schema::nats::Namespace::new(nats_prefix),
            )?;
            out.write_all(
                issuer
                    .workspace_credentials(name, agents)?
                    .expose()
                    .as_bytes(),
            )?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_subcommand_s_flags_are_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn the_kubernetes_backend_takes_its_own_nats_url_and_refuses_a_bad_instance() {
        let parse = |extra: &[&str]| {
            let mut args = vec!["warren-control-plane", "run", "--backend", "kubernetes"];
            args.extend(extra);
            match Cli::try_parse_from(args).expect("flags").command {
                Command::Run(run) => run.backend_config(None, &Default::default()),
                _ => unreachable!("run"),
            }
        };
        let Some(BackendConfig::Kubernetes(config)) = parse(&[
            "--kube-nats-url",
            "nats://nats.warren:4222",
            "--nats-url",
            "nats://127.0.0.1:4222",
        ])
        .expect("a configuration") else {
            panic!("the kubernetes backend");
        };
        assert_eq!(
            config.nats_url, "nats://nats.warren:4222",
            "the pods' address"
        );
        let e = parse(&[
            "--kube-nats-url",
            "nats://n:4222",
            "--kube-instance",
            "Not_OK",
        ])
        .expect_err("a bad instance name");
        assert!(e.to_string().contains("--kube-instance"), "{e}");
    }

    #[test]
    fn the_database_url_is_not_a_flag() {
        let e = Cli::try_parse_from([
            "warren-control-plane",
            "--database-url",
            "postgres://warren:s3cret@db/warren",
            "run",
        ])
        .expect_err("a secret on the command line");
        assert_eq!(e.kind(), clap::error::ErrorKind::UnknownArgument);
    }
}
