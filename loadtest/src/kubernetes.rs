//! Kubernetes backend benchmarks, against the real API server `scripts/lib/kube.sh` starts
//! (found through `KUBECONFIG`, the admin's, and `WARREN_KUBECONFIG_CONTROL_PLANE`, the
//! control plane's identity) and the test kubelet. Each beside a baseline from the same run.
//!
//! Calls are timed where the API server answers them: the control plane reaches the server
//! through a [`FaultProxy`] (injecting nothing) that notes when each write's answer came.
//!
//! - `create`: an open loop of signed GitHub webhooks at `--rate`, each to an agent in a
//!   workspace of its own; per webhook, the time from its *scheduled* send until the API
//!   server accepted the apply of its workspace's pod, with the stages in between (message
//!   recorded, start decided). Baseline: bare applies of the same pods from the same kind
//!   of client at the same rate, timed at the same proxy.
//! - `cold-start`: one workspace at a time, decision -> pod Ready as the control plane
//!   records it: with the kubelet running the real runtime (NATS at `NATS_URL`), and with
//!   it reporting Ready at once (the baseline: everything but the container).
//! - `scale`: `--workspaces` workspaces in one control-plane process (the release binary):
//!   its peak RSS, and the time a backlog of that many starts takes to drain at
//!   `--writes-per-second`, beside writes / rate.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use hmac::{Hmac, KeyInit, Mac};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret as KubeSecret};
use kube::api::{Api, Patch, PatchParams};
use sha2::Sha256;
use tokio_util::sync::CancellationToken;
use warren_control_plane::backend::BackendConfig;
use warren_control_plane::backend::kubernetes::{KubernetesConfig, objects};
use warren_control_plane::controller::{self, ControllerConfig, NatsConfig};
use warren_control_plane::decide::Policy;
use warren_gateway::http::{AppState, router};
use warren_gateway::webhook::{Endpoint, Scheme};
use warren_schema::event_log::{Appender, AppenderConfig};
use warren_schema::events::*;
use warren_schema::nats::Namespace;
use warren_schema::testing::TestDatabase;
use warren_schema::{AppendRequest, EventId, Metadata, NewEvent, Secret};
use warren_test_kubelet::fault_proxy::Answered;
use warren_test_kubelet::testenv;
use warren_test_kubelet::{Kubelet, KubeletConfig, Mode};

use crate::report;

const WEBHOOK_SECRET: &str = "loadtest-webhook-secret";
/// The image the pods name; the kubelet maps it to the directory of this build's runtime.
const IMAGE: &str = "warren.test/workspace-runtime:bench";

#[derive(Debug, Clone, clap::Parser)]
pub struct Args {
    /// `create`, `cold-start`, `scale` or `all`.
    #[arg(default_value = "all")]
    pub which: String,
    /// Create: webhooks per second.
    #[arg(long, default_value_t = 100)]
    pub rate: u64,
    /// Create: seconds of load.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Cold start: workspaces started, one after another, per mode.
    #[arg(long, default_value_t = 20)]
    pub cold_starts: usize,
    /// Cold start: the directory holding `warren-workspace-runtime` (default: this
    /// program's own directory, `target/release`).
    #[arg(long)]
    pub runtime_dir: Option<PathBuf>,
    /// Scale: workspaces.
    #[arg(long, default_value_t = 10_000)]
    pub workspaces: usize,
    /// Scale: the control plane's `--kube-writes-per-second`.
    #[arg(long, default_value_t = 200.0)]
    pub writes_per_second: f64,
    /// Scale: the `warren-control-plane` binary (default: beside this program).
    #[arg(long)]
    pub control_plane_binary: Option<PathBuf>,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    if matches!(args.which.as_str(), "create" | "all") {
        create(&args).await?;
    }
    if matches!(args.which.as_str(), "cold-start" | "all") {
        cold_start(&args).await?;
    }
    if matches!(args.which.as_str(), "scale" | "all") {
        scale(&args).await?;
    }
    Ok(())
}

fn histogram() -> anyhow::Result<Histogram<u64>> {
    Ok(Histogram::new_with_bounds(1, 600_000_000, 3)?)
}

fn percentiles(name: &str, h: &Histogram<u64>) {
    for (label, q) in [("p50", 0.5), ("p99", 0.99)] {
        report::figure(
            &format!("{name} {label}"),
            h.value_at_quantile(q) as f64 / 1000.0,
            "ms",
        );
    }
}

fn micros(d: Duration) -> u64 {
    d.as_micros().max(1) as u64
}

fn wall_micros(d: chrono::TimeDelta) -> u64 {
    d.num_microseconds().unwrap_or(1).max(1) as u64
}

/// A scratch directory for one benchmark.
fn scratch(name: &str) -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("warren-bench-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// An agents file: agent `{agent}{i}` alone in workspace `{workspace}{i}`, for i < n.
fn agents_file(dir: &Path, agent: &str, workspace: &str, n: usize) -> anyhow::Result<PathBuf> {
    let agents: Vec<serde_json::Value> = (0..n)
        .map(|i| serde_json::json!({"name": format!("{agent}{i}"), "workspace": format!("{workspace}{i}")}))
        .collect();
    let path = dir.join("agents.json");
    std::fs::write(&path, serde_json::json!({ "agents": agents }).to_string())?;
    Ok(path)
}

/// A kubelet for `instance`'s pods.
async fn kubelet(instance: &str, root: &Path, mode: Mode) -> Kubelet {
    let mut config = KubeletConfig::new(testenv::NAMESPACE, root, mode);
    config.selector = Some(testenv::selector(instance));
    Kubelet::start(testenv::admin().await, config)
}

/// Waits until `sql` (a count) reaches `n`, at most `limit`.
async fn wait_count(db: &TestDatabase, sql: &str, n: i64, limit: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        let count: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .fetch_one(&db.pool)
            .await?;
        if count >= n {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{count} of {n} after {limit:?}: {sql}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The first successful write to each pod of `instance` (`{instance}-{workspace}`), by
/// workspace.
fn pod_writes(answered: &[Answered], instance: &str) -> HashMap<String, Instant> {
    first_writes(answered, "pods", instance)
}

/// The first successful write to each object of `resource` of `instance`, by workspace.
fn first_writes(answered: &[Answered], resource: &str, instance: &str) -> HashMap<String, Instant> {
    let prefix = format!(
        "/api/v1/namespaces/{}/{resource}/{instance}-",
        testenv::NAMESPACE
    );
    let mut first = HashMap::new();
    for a in answered {
        if a.method == "PATCH"
            && a.status < 300
            && let Some(workspace) = a.path.strip_prefix(&prefix)
            && !workspace.contains('/')
        {
            first.entry(workspace.to_owned()).or_insert(a.at);
        }
    }
    first
}

/// The wall-clock time each event of `event_type` was recorded, by `key` (a JSON path in
/// its payload); the first of each.
async fn recorded_at(
    db: &TestDatabase,
    event_type: &str,
    key: &str,
) -> anyhow::Result<HashMap<String, chrono::DateTime<chrono::Utc>>> {
    let rows: Vec<(Option<String>, chrono::DateTime<chrono::Utc>)> = sqlx::query_as(
        "SELECT payload #>> $2::text[], received_at FROM events WHERE event_type = $1 \
         ORDER BY position",
    )
    .bind(event_type)
    .bind(key.split('.').collect::<Vec<_>>())
    .fetch_all(&db.pool)
    .await?;
    let mut first = HashMap::new();
    for (k, at) in rows {
        if let Some(k) = k {
            first.entry(k).or_insert(at);
        }
    }
    Ok(first)
}

/// A GitHub delivery to endpoint `w{n}`, signed.
fn github_delivery(client: &reqwest::Client, base: &str, n: u64) -> reqwest::RequestBuilder {
    let body =
        serde_json::json!({"ref": "refs/heads/main", "after": format!("{n:040x}")}).to_string();
    let mut mac = Hmac::<Sha256>::new_from_slice(WEBHOOK_SECRET.as_bytes()).expect("any key");
    mac.update(body.as_bytes());
    let signature = hex::encode(mac.finalize().into_bytes());
    client
        .post(format!("{base}/webhooks/w{n}"))
        .header("content-type", "application/json")
        .header("x-github-event", "push")
        .header("x-github-delivery", EventId::random().to_string())
        .header("x-hub-signature-256", format!("sha256={signature}"))
        .body(body)
}

/// A control plane in this process, leading at once (a fresh database), until `shutdown`.
fn in_process_control_plane(
    log: &warren_schema::EventLog,
    agents: PathBuf,
    kubernetes: KubernetesConfig,
    nats: Option<NatsConfig>,
    shutdown: &CancellationToken,
) -> tokio::task::JoinHandle<warren_control_plane::error::Result<()>> {
    tokio::spawn(controller::run(
        log.clone(),
        ControllerConfig {
            holder: "bench".into(),
            lease_ttl: Duration::from_secs(10),
            tick: Duration::from_millis(200),
            policy: Policy::default(),
            config_file: Some(agents),
            backend: Some(BackendConfig::from(kubernetes)),
            nats,
        },
        shutdown.clone(),
    ))
}

/// The kubernetes backend's configuration for `instance`, through `kubeconfig`.
fn backend(instance: &str, kubeconfig: &Path, nats_url: &str, prefix: &str) -> KubernetesConfig {
    let mut config = KubernetesConfig::new(testenv::NAMESPACE, nats_url);
    config.kubeconfig = Some(kubeconfig.to_owned());
    config.template.instance = instance.to_owned();
    config.template.image = IMAGE.to_owned();
    config.template.stop_grace_secs = 5;
    config.nats_prefix = prefix.to_owned();
    config
}

async fn create(args: &Args) -> anyhow::Result<()> {
    let n = args.rate * args.seconds;
    report::heading(&format!(
        "kubernetes: webhook received -> pod create accepted, open loop at {} webhooks/s for {} s ({n} workspaces)",
        args.rate, args.seconds
    ));
    let dir = scratch("create")?;
    let db = TestDatabase::with_pool_size(16).await;
    let log = db.log();
    let agents = agents_file(&dir, "a", "w", n as usize)?;
    let proxied = dir.join("proxied.kubeconfig");
    let proxy = testenv::through_proxy(&testenv::control_plane_kubeconfig(), &proxied).await?;
    let instance = testenv::instance("bench-create");
    let _kubelet = kubelet(&instance, &dir, Mode::Simulate).await;

    let mut kubernetes = backend(&instance, &proxied, "nats://127.0.0.1:1", "bench");
    // Each start is two writes (Secret, pod): room for the offered rate, so that the
    // figure is the path's latency, not the budget's queue.
    kubernetes.writes_per_second = 4.0 * args.rate as f64;
    // Calls in flight as the baseline has them (unbounded there): what is measured is the
    // path, not a limit sized for another server.
    kubernetes.concurrency = 256;
    let shutdown = CancellationToken::new();
    let control_plane = in_process_control_plane(&log, agents, kubernetes, None, &shutdown);
    wait_count(
        &db,
        "SELECT count(*) FROM events WHERE event_type = 'agent.configured'",
        n as i64,
        Duration::from_secs(120),
    )
    .await?;

    // The gateway, in this process, with an endpoint per workspace.
    let webhooks: HashMap<String, Endpoint> = (0..n)
        .map(|i| {
            (
                format!("w{i}"),
                Endpoint {
                    name: format!("w{i}"),
                    scheme: Scheme::Github,
                    secret: Secret::new(WEBHOOK_SECRET),
                    previous: None,
                    agent: format!("a{i}"),
                    signature_header: "x-hub-signature-256",
                    delivery_header: None,
                },
            )
        })
        .collect();
    let (appender, writers) = Appender::start(db.pool.clone(), AppenderConfig::default());
    let app = router(
        AppState {
            appender,
            pool: db.pool.clone(),
            slack_signing_secret: None,
            webhooks: warren_gateway::webhook::registry::Registry::new(webhooks),
            append_timeout: Duration::from_secs(2),
            retry_after_secs: 1,
            queued_bytes: warren_gateway::http::QueuedBytes::new(64 << 20),
        },
        1024 * 1024,
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let stop_gateway = CancellationToken::new();
    let gateway = tokio::spawn(warren_gateway::http::serve(
        listener,
        app,
        warren_gateway::http::Limits::default(),
        stop_gateway.clone().cancelled_owned(),
    ));

    // The load.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .tcp_nodelay(true)
        .build()?;
    let interval = Duration::from_secs_f64(1.0 / args.rate as f64);
    let start = Instant::now() + Duration::from_millis(100);
    let mut scheduled = Vec::with_capacity(n as usize);
    let mut sends = Vec::with_capacity(n as usize);
    for i in 0..n {
        let at = start + interval * i as u32;
        tokio::time::sleep_until(at.into()).await;
        scheduled.push((at, chrono::Utc::now()));
        let request = github_delivery(&client, &base, i);
        sends.push(tokio::spawn(async move {
            request.send().await.map(|r| r.status().as_u16())
        }));
    }
    let mut refused = 0;
    for s in sends {
        if s.await?.map_or(true, |status| status != 200) {
            refused += 1;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    let created = loop {
        let created = pod_writes(&proxy.answered(), &instance);
        if created.len() as u64 >= n || Instant::now() > deadline {
            break created;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let secrets = first_writes(&proxy.answered(), "secrets", &instance);
    let messages = recorded_at(&db, "message.received", "origin.endpoint").await?;
    let decisions = recorded_at(&db, "workspace.start_requested", "workspace").await?;
    let (mut to_pod, mut to_message, mut to_decision) = (histogram()?, histogram()?, histogram()?);
    let mut to_secret = histogram()?;
    for (i, (at, wall)) in scheduled.iter().enumerate() {
        let workspace = format!("w{i}");
        if let Some(done) = created.get(&workspace) {
            to_pod.record(micros(done.duration_since(*at)))?;
        }
        if let Some(done) = secrets.get(&workspace) {
            to_secret.record(micros(done.duration_since(*at)))?;
        }
        if let Some(recorded) = messages.get(&workspace) {
            to_message.record(wall_micros(*recorded - *wall))?;
        }
        if let Some(decided) = decisions.get(&workspace) {
            to_decision.record(wall_micros(*decided - *wall))?;
        }
    }
    shutdown.cancel();
    control_plane.await??;
    stop_gateway.cancel();
    gateway.await??;
    writers.join().await;

    // Baseline: the same pods, applied bare, at the same rate, from a client of the same
    // identity through the same proxy.
    let own = warren_control_plane::backend::kubernetes::client(Some(&proxied)).await?;
    let pods: Api<Pod> = Api::namespaced(own, testenv::NAMESPACE);
    let anchor = Api::<ConfigMap>::namespaced(testenv::admin().await, testenv::NAMESPACE)
        .get(&format!("{instance}-workspaces"))
        .await?;
    let owner = objects::owner_reference(&anchor);
    let template = backend(&instance, &proxied, "nats://127.0.0.1:1", "bench").template;
    let apply = PatchParams::apply(objects::FIELD_MANAGER).force();
    let start = Instant::now() + Duration::from_millis(100);
    let mut bare_scheduled = Vec::with_capacity(n as usize);
    let mut applies = Vec::with_capacity(n as usize);
    for i in 0..n {
        let at = start + interval * i as u32;
        tokio::time::sleep_until(at.into()).await;
        bare_scheduled.push(at);
        let workspace = format!("b{i}");
        let pod = template.pod(
            &workspace,
            None,
            &[format!("a{i}")],
            &Default::default(),
            &owner,
        );
        let name = template.object_name(&workspace);
        let (pods, apply) = (pods.clone(), apply.clone());
        applies.push(tokio::spawn(async move {
            pods.patch(&name, &apply, &Patch::Apply(&pod))
                .await
                .map(|_| ())
        }));
    }
    for a in applies {
        a.await??;
    }
    let bare_created = pod_writes(&proxy.answered(), &instance);
    let mut bare = histogram()?;
    for (i, at) in bare_scheduled.iter().enumerate() {
        if let Some(done) = bare_created.get(&format!("b{i}")) {
            bare.record(micros(done.duration_since(*at)))?;
        }
    }
    testenv::clean_up(&instance).await;

    report::figure("webhooks sent", n as f64, "");
    report::figure("webhooks refused (not 200)", refused as f64, "");
    report::figure("pods created", to_pod.len() as f64, "");
    percentiles("send -> message recorded", &to_message);
    percentiles("send -> start decision recorded", &to_decision);
    percentiles("send -> its Secret accepted", &to_secret);
    percentiles("send -> pod create accepted", &to_pod);
    percentiles("baseline: bare pod apply accepted", &bare);
    report::ratio(
        "pod accepted p99 / bare apply p99",
        to_pod.value_at_quantile(0.99) as f64 / bare.value_at_quantile(0.99).max(1) as f64,
        &[],
    );
    report::ratio(
        "p99 goal 50 ms: goal / p99",
        50_000.0 / to_pod.value_at_quantile(0.99).max(1) as f64,
        &[1.0],
    );
    Ok(())
}

async fn cold_start(args: &Args) -> anyhow::Result<()> {
    report::heading(&format!(
        "kubernetes: cold start, decision -> pod Ready, {} workspaces one at a time",
        args.cold_starts
    ));
    let nats_url = std::env::var("NATS_URL")
        .map_err(|_| anyhow::anyhow!("cold-start needs NATS_URL (the runtime connects to it)"))?;
    let runtime_dir = match &args.runtime_dir {
        Some(dir) => dir.clone(),
        None => std::env::current_exe()?
            .parent()
            .map(Path::to_owned)
            .ok_or_else(|| anyhow::anyhow!("no directory for this program"))?,
    };
    anyhow::ensure!(
        runtime_dir.join("warren-workspace-runtime").exists(),
        "no warren-workspace-runtime in {} (cargo build --release -p warren-workspace-runtime, or --runtime-dir)",
        runtime_dir.display()
    );
    let modes = [
        ("baseline: kubelet reports Ready at once", Mode::Simulate),
        (
            "kubelet runs the runtime",
            Mode::Run {
                images: BTreeMap::from([(IMAGE.to_owned(), runtime_dir)]),
            },
        ),
    ];
    let mut p50s = Vec::new();
    for (name, mode) in modes {
        let (applied, ready) = cold_starts(args.cold_starts, &nats_url, mode).await?;
        percentiles(&format!("{name}: decision -> pod accepted"), &applied);
        percentiles(&format!("{name}: decision -> Ready recorded"), &ready);
        p50s.push(ready.value_at_quantile(0.5));
    }
    report::ratio(
        "Ready p50, runtime / simulated",
        p50s[1] as f64 / p50s[0].max(1) as f64,
        &[],
    );
    Ok(())
}

/// Starts `count` workspaces one after another (a message each, the next once the previous
/// one is Ready) with the kubelet in `mode`. Returns decision -> pod accepted and
/// decision -> Ready recorded.
async fn cold_starts(
    count: usize,
    nats_url: &str,
    mode: Mode,
) -> anyhow::Result<(Histogram<u64>, Histogram<u64>)> {
    let dir = scratch("cold")?;
    let db = TestDatabase::with_pool_size(8).await;
    let log = db.log();
    let agents = agents_file(&dir, "c", "cold", count)?;
    let proxied = dir.join("proxied.kubeconfig");
    let proxy = testenv::through_proxy(&testenv::control_plane_kubeconfig(), &proxied).await?;
    let instance = testenv::instance("bench-cold");
    let prefix = format!("benchcold{}", std::process::id());
    let _kubelet = kubelet(&instance, &dir, mode).await;
    let shutdown = CancellationToken::new();
    let control_plane = in_process_control_plane(
        &log,
        agents,
        backend(&instance, &proxied, nats_url, &prefix),
        Some(NatsConfig {
            url: nats_url.to_owned(),
            namespace: Namespace::new(&prefix),
            credentials: None,
        }),
        &shutdown,
    );
    wait_count(
        &db,
        "SELECT count(*) FROM events WHERE event_type = 'agent.configured'",
        count as i64,
        Duration::from_secs(60),
    )
    .await?;
    for i in 0..count {
        let message = MessageReceived {
            origin: Origin::Slack {
                team_id: "T1".into(),
                channel: "C1".into(),
                thread_ts: format!("{i}.0"),
                ts: format!("{i}.0"),
                user: "U1".into(),
            },
            text: format!("@c{i} hello"),
            addressed_agents: vec![format!("c{i}")],
            files: vec![],
        };
        let event = NewEvent::from_domain(EventId::random(), &message, Metadata::new("bench"))?;
        log.append(&AppendRequest::new("slack:T1:C1", vec![event]))
            .await?;
        wait_count(
            &db,
            &format!(
                "SELECT count(*) FROM events WHERE event_type = 'workspace.observed' \
                 AND payload->>'phase' = 'ready' AND payload->>'workspace' = 'cold{i}'"
            ),
            1,
            Duration::from_secs(60),
        )
        .await?;
    }
    shutdown.cancel();
    control_plane.await??;
    testenv::clean_up(&instance).await;

    let decisions = recorded_at(&db, "workspace.start_requested", "workspace").await?;
    let rows: Vec<(String, chrono::DateTime<chrono::Utc>)> = sqlx::query_as(
        "SELECT payload->>'workspace', received_at FROM events \
         WHERE event_type = 'workspace.observed' AND payload->>'phase' = 'ready'",
    )
    .fetch_all(&db.pool)
    .await?;
    // The proxy's clock is monotonic; the log's is the wall clock. Pod acceptance is put on
    // the wall clock through one reading of both.
    let (mono, wall) = (Instant::now(), chrono::Utc::now());
    let applied_at = pod_writes(&proxy.answered(), &instance);
    let (mut applied, mut ready) = (histogram()?, histogram()?);
    for (workspace, at) in rows {
        let Some(decided) = decisions.get(&workspace) else {
            continue;
        };
        ready.record(wall_micros(at - *decided))?;
        if let Some(accepted) = applied_at.get(&workspace) {
            let accepted = wall - chrono::TimeDelta::from_std(mono.duration_since(*accepted))?;
            applied.record(wall_micros(accepted - *decided))?;
        }
    }
    let js = async_nats::jetstream::new(async_nats::connect(nats_url).await?);
    let namespace = Namespace::new(&prefix);
    let _ = js.delete_stream(namespace.inbox_stream()).await;
    let _ = js.delete_stream(namespace.outbox_stream()).await;
    let _ = js.delete_key_value(namespace.shared_bucket()).await;
    for i in 0..count {
        let _ = js
            .delete_key_value(namespace.workspace_bucket(&format!("cold{i}")))
            .await;
    }
    Ok((applied, ready))
}

/// Peak and current resident memory of process `pid`, in bytes.
fn memory_of(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
    };
    Some((field("VmHWM:")?, field("VmRSS:")?))
}

async fn scale(args: &Args) -> anyhow::Result<()> {
    let n = args.workspaces;
    report::heading(&format!(
        "kubernetes: {n} workspaces in one control plane, backlog drained at {} writes/s",
        args.writes_per_second
    ));
    let binary = match &args.control_plane_binary {
        Some(path) => path.clone(),
        None => std::env::current_exe()?
            .parent()
            .map(|d| d.join("warren-control-plane"))
            .ok_or_else(|| anyhow::anyhow!("no directory for this program"))?,
    };
    anyhow::ensure!(
        binary.exists(),
        "no control plane at {} (cargo build --release -p warren-control-plane, or --control-plane-binary)",
        binary.display()
    );
    let dir = scratch("scale")?;
    let db = TestDatabase::with_pool_size(8).await;
    let agents = agents_file(&dir, "s", "s", n)?;
    let proxied = dir.join("proxied.kubeconfig");
    let proxy = testenv::through_proxy(&testenv::control_plane_kubeconfig(), &proxied).await?;
    let instance = testenv::instance("bench-scale");
    let _kubelet = kubelet(&instance, &dir, Mode::Simulate).await;

    // The baseline: what this API server (and the kubelet answering it) takes, the same two
    // writes per workspace (Secret, then pod) with the control plane's calls in flight and
    // no pacing, in this run.
    let capacity = {
        const SAMPLE: usize = 500;
        let base = testenv::instance("bench-capacity");
        let _base_kubelet = kubelet(&base, &dir, Mode::Simulate).await;
        let config = backend(&base, &proxied, "nats://127.0.0.1:1", "bench");
        // The control plane's identity, through the same proxy.
        let client = warren_control_plane::backend::kubernetes::client(Some(&proxied)).await?;
        let anchor = Api::<ConfigMap>::namespaced(client.clone(), testenv::NAMESPACE)
            .patch(
                &config.template.anchor_name(),
                &PatchParams::apply(objects::FIELD_MANAGER).force(),
                &Patch::Apply(config.template.anchor()),
            )
            .await?;
        let owner = objects::owner_reference(&anchor);
        let pods = Api::<Pod>::namespaced(client.clone(), testenv::NAMESPACE);
        let secrets = Api::<KubeSecret>::namespaced(client, testenv::NAMESPACE);
        let in_flight = Arc::new(tokio::sync::Semaphore::new(32));
        let started = Instant::now();
        let mut writes = tokio::task::JoinSet::new();
        for i in 0..SAMPLE {
            let permit = in_flight.clone().acquire_owned().await?;
            let workspace = format!("c{i}");
            let secret = config
                .template
                .secret(&workspace, Default::default(), &owner);
            let pod = config
                .template
                .pod(&workspace, None, &[], &Default::default(), &owner);
            let name = config.template.object_name(&workspace);
            let (pods, secrets) = (pods.clone(), secrets.clone());
            let apply = PatchParams::apply(objects::FIELD_MANAGER).force();
            writes.spawn(async move {
                secrets.patch(&name, &apply, &Patch::Apply(&secret)).await?;
                pods.patch(&name, &apply, &Patch::Apply(&pod)).await?;
                drop(permit);
                Ok::<_, kube::Error>(())
            });
        }
        while let Some(w) = writes.join_next().await {
            w??;
        }
        let rate = (2 * SAMPLE) as f64 / started.elapsed().as_secs_f64();
        testenv::clean_up(&base).await;
        rate
    };

    let mut child = tokio::process::Command::new(&binary)
        .arg("run")
        .args(["--config", &agents.display().to_string()])
        .args(["--backend", "kubernetes"])
        .args(["--kubeconfig", &proxied.display().to_string()])
        .args(["--kube-instance", &instance])
        .args(["--kube-image", IMAGE])
        .args(["--kube-nats-url", "nats://127.0.0.1:1"])
        .args([
            "--kube-writes-per-second",
            &args.writes_per_second.to_string(),
        ])
        .args(["--kube-concurrency", "32"])
        .args(["--metrics-listen", "127.0.0.1:0"])
        .env("DATABASE_URL", db.url())
        .env("RUST_LOG", "warn")
        .env_remove("NATS_URL")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.join("control-plane.log"))?)
        .kill_on_drop(true)
        .spawn()?;
    let pid = child
        .id()
        .ok_or_else(|| anyhow::anyhow!("the control plane exited at once"))?;
    wait_count(
        &db,
        "SELECT count(*) FROM events WHERE event_type = 'agent.configured'",
        n as i64,
        Duration::from_secs(300),
    )
    .await?;
    let idle = memory_of(pid).map(|(_, rss)| rss).unwrap_or_default();

    // The backlog: a message for every workspace, all at once.
    let (appender, writers) = Appender::start(db.pool.clone(), AppenderConfig::default());
    let mut appends = Vec::with_capacity(n);
    for i in 0..n {
        let message = MessageReceived {
            origin: Origin::Slack {
                team_id: "T1".into(),
                channel: format!("C{}", i % 50),
                thread_ts: format!("{i}.0"),
                ts: format!("{i}.0"),
                user: "U1".into(),
            },
            text: format!("@s{i} hello"),
            addressed_agents: vec![format!("s{i}")],
            files: vec![],
        };
        let event = NewEvent::from_domain(EventId::random(), &message, Metadata::new("bench"))?;
        let appender = appender.clone();
        appends.push(tokio::spawn(async move {
            appender
                .append(AppendRequest::new(
                    format!("slack:T1:C{}", i % 50),
                    vec![event],
                ))
                .await
        }));
    }
    for a in appends {
        a.await??;
    }
    drop(appender);
    writers.join().await;
    // Waited for as long as the backlog takes at the slower of the configured rate and the
    // server's capacity, three times over; what is not done by then is reported, not hidden.
    let expected = Duration::from_secs_f64(2.0 * n as f64 / args.writes_per_second.min(capacity));
    let limit = expected * 3 + Duration::from_secs(120);
    let deadline = Instant::now() + limit;
    let mut peak_sampled = 0;
    let complete = loop {
        if let Some((_, rss)) = memory_of(pid) {
            peak_sampled = peak_sampled.max(rss);
        }
        if pod_writes(&proxy.answered(), &instance).len() >= n {
            break true;
        }
        if let Some(status) = child.try_wait()? {
            anyhow::bail!(
                "the control plane exited ({status}); see {}",
                dir.join("control-plane.log").display()
            );
        }
        if Instant::now() >= deadline {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    if complete {
        wait_count(
            &db,
            "SELECT count(*) FROM events WHERE event_type = 'workspace.observed' AND payload->>'phase' = 'ready'",
            n as i64,
            Duration::from_secs(300),
        )
        .await?;
    }
    let (peak, end) = memory_of(pid).unwrap_or_default();
    let _ = child.start_kill();
    let _ = child.wait().await;
    let writes: Vec<Instant> = proxy
        .answered()
        .iter()
        .filter(|a| a.path.contains(&format!("/{instance}-s")) && a.status < 300)
        .map(|a| a.at)
        .collect();
    let pods = pod_writes(&proxy.answered(), &instance).len();
    let (first, last) = (writes.iter().min().copied(), writes.iter().max().copied());
    testenv::clean_up(&instance).await;
    let (Some(first), Some(last)) = (first, last) else {
        anyhow::bail!("no writes seen");
    };
    let drained = last.duration_since(first);
    let achieved = writes.len() as f64 / drained.as_secs_f64().max(1e-9);
    let at_rate = Duration::from_secs_f64(writes.len() as f64 / args.writes_per_second);
    report::figure("workspaces", n as f64, "");
    report::figure(
        "RSS with every workspace configured, idle",
        idle as f64 / 1e6,
        "MB",
    );
    report::figure(
        if complete {
            "RSS at the end (every pod Ready)"
        } else {
            "RSS at the time limit"
        },
        end as f64 / 1e6,
        "MB",
    );
    report::figure(
        "peak RSS (VmHWM)",
        peak.max(peak_sampled) as f64 / 1e6,
        "MB",
    );
    report::ratio(
        "RSS goal 200 MB: goal / peak",
        200e6 / peak.max(peak_sampled).max(1) as f64,
        &[1.0],
    );
    report::figure(
        "baseline: the API server's capacity (Secret + pod, 32 in flight, unpaced)",
        capacity,
        "writes/s",
    );
    report::figure("configured write rate", args.writes_per_second, "writes/s");
    report::figure("pods written", pods as f64, "");
    if !complete {
        report::figure(
            "NOT DRAINED: time limit (3 x expected + 2 min)",
            limit.as_secs_f64(),
            "s",
        );
    }
    report::figure("workspace writes (Secret + pod)", writes.len() as f64, "");
    report::figure("first to last write", drained.as_secs_f64(), "s");
    report::figure("achieved write rate", achieved, "writes/s");
    report::ratio(
        "achieved / the API server's capacity",
        achieved / capacity,
        &[],
    );
    report::figure("writes / configured rate", at_rate.as_secs_f64(), "s");
    report::ratio(
        "drain / (writes / configured rate), goal <= 1.1: 1.1 / that",
        1.1 / (drained.as_secs_f64() / at_rate.as_secs_f64()).max(1e-9),
        &[1.0],
    );
    Ok(())
}
