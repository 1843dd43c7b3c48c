//! The Kubernetes side of a test: the real API server `scripts/test` starts (see
//! `warren_test_kubelet::testenv`), and the test kubelet running pods with this build's
//! runtime.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use warren_control_plane::backend::kubernetes::KubernetesConfig;
use warren_test_kubelet::testenv::{NAMESPACE, admin, selector};
use warren_test_kubelet::{Kubelet, KubeletConfig, Mode};

/// The image pods name; the test kubelet maps it to this build's binaries.
pub const IMAGE: &str = "warren.test/workspace-runtime:dev";

/// The kubernetes backend's configuration for `instance`, as the control plane's identity.
pub fn backend_config(instance: &str, nats_url: &str, prefix: &str) -> KubernetesConfig {
    let mut config = KubernetesConfig::new(NAMESPACE, nats_url);
    config.kubeconfig = Some(warren_test_kubelet::testenv::control_plane_kubeconfig());
    config.template.instance = instance.to_owned();
    config.template.image = IMAGE.to_owned();
    config.template.stop_grace_secs = 5;
    config.nats_prefix = prefix.to_owned();
    config.telemetry = super::text_logs();
    config
}

/// A test kubelet for `instance`'s pods, running them with this build's runtime; the
/// claim's files under `root/claims/`.
pub async fn kubelet(instance: &str, root: &Path) -> Kubelet {
    let runtime = PathBuf::from(env!("CARGO_BIN_EXE_warren-workspace-runtime"));
    let dir = runtime.parent().expect("the binary's directory").to_owned();
    let mut config = KubeletConfig::new(
        NAMESPACE,
        root,
        Mode::Run {
            images: BTreeMap::from([(IMAGE.to_owned(), dir)]),
        },
    );
    config.selector = Some(selector(instance));
    Kubelet::start(admin().await, config)
}
