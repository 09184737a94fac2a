//! A client for the cluster.

use anyhow::{Context, Result};

/// A client for the cluster, found as kubectl finds it.
pub async fn client(kubeconfig: Option<&std::path::Path>) -> Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("--kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &Default::default())
                .await
                .with_context(|| format!("--kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer().await.context(
            "no cluster found: pass --kubeconfig, set KUBECONFIG, or run in a Pod with a ServiceAccount",
        )?,
    };
    Ok(kube::Client::try_from(config)?)
}
