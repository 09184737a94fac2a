//! A client for the cluster, found as kubectl finds it.

use anyhow::{Context, Result, anyhow};

/// A client from `kubeconfig`, else `$KUBECONFIG`, `~/.kube/config` or the Pod's
/// ServiceAccount.
pub async fn client(kubeconfig: Option<&std::path::Path>) -> Result<kube::Client> {
    let (config, source) = match kubeconfig {
        Some(path) => {
            let source = format!("--kubeconfig {}", path.display());
            let file = kube::config::Kubeconfig::read_from(path).context(source.clone())?;
            let config = kube::Config::from_custom_kubeconfig(file, &Default::default())
                .await
                .context(source.clone())?;
            (config, source)
        }
        None => (
            kube::Config::infer().await.context(
                "no cluster found: pass --kubeconfig, set KUBECONFIG, or run in a Pod with a ServiceAccount",
            )?,
            "the kubeconfig ($KUBECONFIG or ~/.kube/config)".to_string(),
        ),
    };
    let certificate = match &config.auth_info.client_certificate {
        Some(file) => format!("client-certificate {file}"),
        None => "client-certificate-data".to_string(),
    };
    kube::Client::try_from(config).map_err(|e| {
        // rustls, unlike kubectl's Go TLS, refuses X.509 v1 certificates; its error
        // names neither the certificate nor the fix.
        if format!("{e:?}").contains("UnsupportedCertVersion") {
            anyhow!(
                "{source}: the {certificate} of the current user is an X.509 v1 certificate, \
                 which kubectl accepts but ferrolb's TLS library (rustls) refuses; issue it as \
                 X.509 v3 (with openssl, give `openssl x509 -req` any extension, e.g. \
                 `-extfile <(echo basicConstraints=CA:FALSE)`) or use a token ({e})"
            )
        } else {
            anyhow!(e).context(source)
        }
    })
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;

    /// Runs openssl in `dir`.
    fn openssl(dir: &std::path::Path, args: &str) {
        let out = Command::new("openssl")
            .args(args.split_whitespace())
            .current_dir(dir)
            .output()
            .expect("openssl (apt install openssl)");
        assert!(
            out.status.success(),
            "openssl {args}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn kubeconfig(dir: &std::path::Path, extension: bool) -> std::path::PathBuf {
        openssl(
            dir,
            "req -newkey rsa:2048 -nodes -keyout key.pem -subj /CN=user -out user.csr",
        );
        std::fs::write(dir.join("ext"), "basicConstraints=CA:FALSE\n").unwrap();
        let ext = if extension { " -extfile ext" } else { "" };
        openssl(
            dir,
            &format!("x509 -req -in user.csr -signkey key.pem -days 1 -out cert.pem{ext}"),
        );
        let config = format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: c\n\
             clusters: [{{name: k, cluster: {{server: 'https://127.0.0.1:1', insecure-skip-tls-verify: true}}}}]\n\
             users: [{{name: u, user: {{client-certificate: {0}/cert.pem, client-key: {0}/key.pem}}}}]\n\
             contexts: [{{name: c, context: {{cluster: k, user: u}}}}]\n",
            dir.display()
        );
        let path = dir.join("config");
        std::fs::write(&path, config).unwrap();
        path
    }

    #[tokio::test]
    async fn an_x509_v1_client_certificate_is_named_with_the_fix() {
        let dir = std::env::temp_dir().join(format!("ferrolb-client-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let v1 = kubeconfig(&dir, false);
        let error = client(Some(&v1))
            .await
            .err()
            .expect("rustls refuses v1")
            .to_string();
        assert!(
            error.contains(&format!(
                "{}/cert.pem of the current user is an X.509 v1 certificate",
                dir.display()
            )),
            "{error}"
        );
        assert!(error.contains("issue it as X.509 v3"), "{error}");
        // The same key with a v3 certificate makes a client.
        let v3 = kubeconfig(&dir, true);
        client(Some(&v3))
            .await
            .expect("a v3 certificate is accepted");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
