//! The install, run: the Helm chart rendered (by the helm `./scripts/test` builds), applied
//! to the test API server, and the control plane's Deployment pod run by the test kubelet
//! from the rendered manifest: its command and args, its init container, its environment,
//! its mounted ConfigMap and Secrets, and its ServiceAccount token (the in-cluster
//! identity the chart's Role is bound to). A webhook message must then start a workspace
//! pod that answers. This is what proves the chart's wiring, not only its shape.

mod support;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use kube::api::{Api, Patch, PatchParams, PostParams};
use warren_control_plane::nats_auth::Bootstrap;
use warren_schema::nats::Namespace;
use warren_schema::testing::TestDatabase;
use warren_test_kubelet::testenv::{self, NAMESPACE};
use warren_test_kubelet::{Kubelet, KubeletConfig, Mode};

const REGISTRY: &str = "warren.test";
const TAG: &str = "dev";

fn repo() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// The helm `./scripts/test` builds (scripts/lib/deploy.sh), or `WARREN_HELM`.
fn helm() -> PathBuf {
    let path = std::env::var_os("WARREN_HELM")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(".warren/tools/helm"));
    assert!(
        path.exists(),
        "no helm at {} (./scripts/test builds it)",
        path.display()
    );
    path
}

fn run(command: &mut Command, input: Option<&str>) -> String {
    use std::io::Write;
    command
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = command.spawn().expect("spawn");
    if let Some(input) = input {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write");
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().expect("wait");
    assert!(
        out.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn apply<K>(api: &Api<K>, name: &str, object: serde_json::Value)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    api.patch(
        name,
        &PatchParams::apply("warren-test").force(),
        &Patch::Apply(&object),
    )
    .await
    .expect("apply");
}

async fn until<F: AsyncFnMut() -> bool>(what: &str, limit: Duration, mut done: F) {
    let deadline = Instant::now() + limit;
    while !done().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rendered_control_plane_runs_under_its_role_and_starts_a_workspace_that_answers() {
    let release = testenv::instance("chart");
    let dir = std::env::temp_dir().join(format!("warren-{release}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let client = testenv::admin().await;

    // What the operator makes before installing (docs/install.md): the NATS trust chain
    // and a NATS of theirs (nats.enabled=false), the database URL, as Secrets.
    let ns = Namespace::new(&format!("c{}", std::process::id()));
    Bootstrap::new().write(&dir, &ns).expect("nats-auth init");
    let nats = warren_test_nats::NatsServer::start(&dir, "include ./auth.conf")
        .await
        .expect("a private nats-server");
    let db = TestDatabase::new().await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NAMESPACE);
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).expect("nats-auth file");
    let labels = serde_json::json!({testenv::INSTANCE_LABEL: release});
    apply(
        &secrets,
        &format!("{release}-nats-auth"),
        serde_json::json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": format!("{release}-nats-auth"), "labels": labels},
            "stringData": {"auth.conf": read("auth.conf"), "account.seed": read("account.seed"),
                           "control-plane.creds": read("control-plane.creds")},
        }),
    )
    .await;
    apply(
        &secrets,
        &format!("{release}-db"),
        serde_json::json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": format!("{release}-db"), "labels": labels},
            "stringData": {"uri": db.url()},
        }),
    )
    .await;
    // What the root-CA publisher (kube-controller-manager) would put in every namespace:
    // the CA the in-cluster identity checks the API server with.
    let kubeconfig = std::fs::read_to_string(testenv::admin_kubeconfig()).expect("kubeconfig");
    let field = |name: &str| {
        kubeconfig
            .lines()
            .find_map(|l| l.trim().strip_prefix(name))
            .expect("kubeconfig field")
            .to_owned()
    };
    let ca = std::fs::read_to_string(field("certificate-authority: ")).expect("the CA");
    let server = field("server: ");
    let port: u16 = server
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("the API server's port");
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), NAMESPACE);
    apply(
        &maps,
        "kube-root-ca.crt",
        serde_json::json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "kube-root-ca.crt"}, "data": {"ca.crt": ca},
        }),
    )
    .await;

    // The chart, rendered with a values file an operator would write, and applied.
    let values = dir.join("values.yaml");
    std::fs::write(
        &values,
        serde_json::to_string(&serde_json::json!({
            "image": {"registry": REGISTRY, "tag": TAG},
            "database": {"existingSecret": format!("{release}-db")},
            "secrets": {"slack": "", "nats": format!("{release}-nats-auth")},
            "controlPlane": {"replicas": 1},
            "nats": {"enabled": false, "url": nats.url, "prefix": ns_prefix(&ns)},
            // A claim of the operator's (deploy/nfs): no PersistentVolumeClaim in the
            // render, which could not be deleted here (no controller removes its finalizer).
            "storage": {"existingClaim": format!("{release}-files")},
            "agents": [{"name": "alice", "workspace": "research", "driver": "echo"}],
        }))
        .expect("json"),
    )
    .expect("values");
    let rendered = run(
        Command::new(helm())
            .args(["template", &release])
            .arg(repo().join("deploy/helm/warren"))
            .args(["--namespace", NAMESPACE, "-f"])
            .arg(&values),
        None,
    );
    run(
        Command::new("kubectl").args([
            "apply",
            "--server-side",
            "--field-manager=helm",
            "-n",
            NAMESPACE,
            "-f",
            "-",
        ]),
        Some(&rendered),
    );

    // No controller manager runs here: the pod the Deployment's ReplicaSet would make, from
    // its template. The ServiceAccount admission adds its token volume.
    let deployment = Api::<Deployment>::namespaced(client.clone(), NAMESPACE)
        .get(&format!("{release}-control-plane"))
        .await
        .expect("the control plane's Deployment");
    let template = deployment.spec.expect("spec").template;
    let mut pod = Pod {
        metadata: template.metadata.unwrap_or_default(),
        spec: template.spec,
        status: None,
    };
    pod.metadata.name = Some(format!("{release}-control-plane-0"));
    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("the control plane's pod");

    let binaries = PathBuf::from(env!("CARGO_BIN_EXE_warren-workspace-runtime"))
        .parent()
        .expect("target dir")
        .to_owned();
    assert!(
        binaries.join("warren-control-plane").exists(),
        "no {} (cargo build -p warren-control-plane; cargo test --workspace builds it)",
        binaries.join("warren-control-plane").display()
    );
    let mut config = KubeletConfig::new(
        NAMESPACE,
        dir.join("kubelet"),
        Mode::Run {
            images: BTreeMap::from([
                (
                    format!("{REGISTRY}/warren-control-plane:{TAG}"),
                    binaries.clone(),
                ),
                (
                    format!("{REGISTRY}/warren-workspace-runtime:{TAG}"),
                    binaries,
                ),
            ]),
        },
    );
    config.selector = Some(testenv::selector(&release));
    config.api_server = Some(("127.0.0.1".into(), port));
    let kubelet = Kubelet::start(client.clone(), config);

    // The configuration in the chart's values reached the log through the mounted
    // ConfigMap; then a webhook message for alice.
    let log = db.log();
    until(
        "alice configured from the chart's values",
        Duration::from_secs(60),
        async || {
            log.read_type("agent.configured", 0, 10)
                .await
                .is_ok_and(|events| events.len() == 1)
        },
    )
    .await;
    support::ask_webhook(&log, "alice", "1", "hello from the chart").await;

    // Her workspace's pod, made by the control plane as its ServiceAccount, and her answer.
    let workspace_pod = format!("{release}-research");
    until("the workspace's pod", Duration::from_secs(60), async || {
        pods.get_opt(&workspace_pod).await.ok().flatten().is_some()
    })
    .await;
    until("alice's answer", Duration::from_secs(60), async || {
        log.read_type("agent.replied", 0, 10)
            .await
            .is_ok_and(|events| {
                events.iter().any(|e| {
                    e.payload["text"]
                        .as_str()
                        .is_some_and(|t| t.contains("hello from the chart"))
                })
            })
    })
    .await;
    let made = pods.get(&workspace_pod).await.expect("the workspace pod");
    assert!(
        made.metadata
            .annotations
            .unwrap_or_default()
            .contains_key("warren.dev/decision"),
        "the pod carries the decision that made it"
    );

    kubelet.shutdown();
    testenv::clean_up(&release).await;
    run(
        Command::new("kubectl").args([
            "delete",
            "--wait=false",
            "--ignore-not-found",
            "-n",
            NAMESPACE,
            "-f",
            "-",
        ]),
        Some(&rendered),
    );
    nats.stop().await.expect("stop nats-server");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The NATS prefix of `ns` (the chart's `nats.prefix`).
fn ns_prefix(ns: &Namespace) -> String {
    ns.outbox_subject("x")
        .strip_suffix(".outbox.x")
        .expect("prefix")
        .to_owned()
}
