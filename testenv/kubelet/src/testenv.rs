//! The test API server as tests find it: `scripts/test` (through `scripts/lib/kube.sh`)
//! starts it and exports `KUBECONFIG` (the tests' admin) and
//! `WARREN_KUBECONFIG_CONTROL_PLANE` (the control plane's identity, bound to the Role
//! `deploy/helm/warren/files/control-plane-role.yaml` and nothing else).

use std::path::PathBuf;

use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Api, DeleteParams, ListParams};

/// The namespace `scripts/lib/kube.sh` makes (Pod Security `restricted` enforced).
pub const NAMESPACE: &str = "workspaces";

/// The label every object of an installation carries (its `--kube-instance`).
pub const INSTANCE_LABEL: &str = "app.kubernetes.io/instance";

fn env_path(name: &str) -> PathBuf {
    std::env::var_os(name).map(PathBuf::from).unwrap_or_else(|| {
        panic!("{name} is not set: run the tests through ./scripts/test, which starts the API server")
    })
}

/// The admin's kubeconfig file.
pub fn admin_kubeconfig() -> PathBuf {
    env_path("KUBECONFIG")
}

/// The control plane's kubeconfig file.
pub fn control_plane_kubeconfig() -> PathBuf {
    env_path("WARREN_KUBECONFIG_CONTROL_PLANE")
}

/// A client as the tests' admin.
pub async fn admin() -> kube::Client {
    let file = kube::config::Kubeconfig::read_from(admin_kubeconfig()).expect("kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(file, &Default::default())
        .await
        .expect("admin kubeconfig");
    kube::Client::try_from(config).expect("client")
}

/// A name of its own for each test's installation (object names, labels), so that tests
/// share the API server without meeting.
pub fn instance(test: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    format!("{test}-{}-{nanos:x}", std::process::id())
}

/// The selector of `instance`'s objects.
pub fn selector(instance: &str) -> String {
    format!("{INSTANCE_LABEL}={instance}")
}

/// `instance`'s pods, as the API server has them.
pub async fn pods(instance: &str) -> Vec<Pod> {
    Api::<Pod>::namespaced(admin().await, NAMESPACE)
        .list(&ListParams::default().labels(&selector(instance)))
        .await
        .expect("list pods")
        .items
}

/// Deletes whatever `instance` left (pods outlive the control plane by design).
pub async fn clean_up(instance: &str) {
    let client = admin().await;
    let list = ListParams::default().labels(&selector(instance));
    let now = DeleteParams {
        grace_period_seconds: Some(0),
        ..DeleteParams::default()
    };
    let _ = Api::<Pod>::namespaced(client.clone(), NAMESPACE)
        .delete_collection(&now, &list)
        .await;
    let _ = Api::<Secret>::namespaced(client.clone(), NAMESPACE)
        .delete_collection(&now, &list)
        .await;
    let _ = Api::<ConfigMap>::namespaced(client.clone(), NAMESPACE)
        .delete_collection(&now, &list)
        .await;
    let _ = Api::<NetworkPolicy>::namespaced(client, NAMESPACE)
        .delete_collection(&now, &list)
        .await;
}

/// A [`FaultProxy`](crate::fault_proxy::FaultProxy) in front of the API server that
/// `kubeconfig` names, and a copy of that kubeconfig (same identity) pointing at the proxy,
/// written to `out`.
pub async fn through_proxy(
    kubeconfig: &std::path::Path,
    out: &std::path::Path,
) -> std::io::Result<crate::fault_proxy::FaultProxy> {
    let text = std::fs::read_to_string(kubeconfig)?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(name))
            .map(str::to_owned)
            .ok_or_else(|| std::io::Error::other(format!("{}: no {name}", kubeconfig.display())))
    };
    let server = field("server: ")?;
    let ca = field("certificate-authority: ")?;
    let proxy = crate::fault_proxy::FaultProxy::start(&server, &std::fs::read(&ca)?).await?;
    let proxied: Vec<&str> = text
        .lines()
        .filter(|l| !l.contains("certificate-authority"))
        .collect();
    std::fs::write(out, proxied.join("\n").replace(&server, &proxy.url))?;
    Ok(proxy)
}
