//! `warren-test-kubelet`: runs the test kubelet (see the library) until SIGTERM or Ctrl-C.
//! `./scripts/up --backend kubernetes` starts it beside the test API server.

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::Parser;
use warren_test_kubelet::{Kubelet, KubeletConfig, Mode};

/// A kubelet for the test API server: binds pods, runs their containers as local
/// processes, reports their status.
#[derive(Debug, Parser)]
struct Args {
    /// The kubeconfig of an identity allowed to bind pods and patch their status.
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: PathBuf,
    #[arg(long, default_value = "workspaces")]
    namespace: String,
    /// Holds claims/{claim}/ (each claim's files) and pods/{uid}/.
    #[arg(long)]
    root: PathBuf,
    /// IMAGE=DIR: the programs of an image (repeatable).
    #[arg(long = "image", value_parser = parse_image)]
    images: Vec<(String, PathBuf)>,
    /// Only pods matching this label selector (for example
    /// `app.kubernetes.io/instance=warren`); unset: every pod of the namespace.
    #[arg(long)]
    selector: Option<String>,
    /// Report pods ready without running them.
    #[arg(long)]
    simulate: bool,
}

fn parse_image(s: &str) -> Result<(String, PathBuf), String> {
    s.split_once('=')
        .map(|(image, dir)| (image.to_owned(), PathBuf::from(dir)))
        .ok_or_else(|| format!("{s:?}: use IMAGE=DIR"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _telemetry = warren_telemetry::Telemetry::init("warren-test-kubelet", &Default::default())?;
    let file = kube::config::Kubeconfig::read_from(&args.kubeconfig)?;
    let config = kube::Config::from_custom_kubeconfig(file, &Default::default()).await?;
    let client = kube::Client::try_from(config)?;
    let mode = if args.simulate {
        Mode::Simulate
    } else {
        Mode::Run {
            images: args.images.into_iter().collect::<BTreeMap<_, _>>(),
        }
    };
    let mut config = KubeletConfig::new(args.namespace, args.root, mode);
    config.selector = args.selector;
    let kubelet = Kubelet::start(client, config);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    kubelet.shutdown();
    Ok(())
}
