//! The end-to-end suite against a real cluster with ferrolb installed by its Helm chart
//! (the kind workflow in .github/workflows/kind.yml runs it):
//!
//! ```sh
//! FERROLB_E2E_KUBECONFIG=~/.kube/config FERROLB_E2E_POOL=172.18.255.200-172.18.255.250 \
//!   cargo test --test real_cluster -- --ignored
//! ```
//!
//! The pool must be on a network this machine reaches (kind: the docker network's
//! subnet), as the test connects to the Service's IP. Ignored by default, as it needs
//! that cluster; run with the variable unset or the cluster unreachable, it fails.

use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use kube::Api;
use kube::api::{DeleteParams, ListParams};

const NAMESPACE: &str = "ferrolb-system";
const DEADLINE: Duration = Duration::from_secs(120);

fn env(name: &str, example: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: this suite runs against a real cluster ({name}={example})")
    })
}

async fn kubectl(kubeconfig: &str, args: &[&str], input: Option<&str>) -> String {
    let kubectl = ferrolb_control_plane::binary("kubectl").unwrap_or_else(|e| panic!("{e:#}"));
    let mut cmd = std::process::Command::new(kubectl);
    cmd.arg("--kubeconfig").arg(kubeconfig).args(args);
    let out = ferrolb_control_plane::run(&mut cmd, input).unwrap();
    assert!(
        out.status.success(),
        "kubectl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn poll<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn connects(ip: IpAddr) -> bool {
    TcpStream::connect_timeout(&SocketAddr::new(ip, 80), Duration::from_millis(500)).is_ok()
}

#[tokio::test]
#[ignore = "needs a real cluster: FERROLB_E2E_KUBECONFIG=... FERROLB_E2E_POOL=... cargo test --test real_cluster -- --ignored"]
async fn a_service_gets_an_ip_that_answers_and_survives_its_speaker() {
    let kubeconfig = env("FERROLB_E2E_KUBECONFIG", "~/.kube/config");
    let pool = env("FERROLB_E2E_POOL", "172.18.255.200-172.18.255.250");
    let image = std::env::var("FERROLB_E2E_BACKEND_IMAGE")
        .unwrap_or_else(|_| "registry.k8s.io/e2e-test-images/agnhost:2.53".into());
    let client = ferrolb_control_plane::client_for(&PathBuf::from(&kubeconfig))
        .await
        .unwrap_or_else(|e| panic!("FERROLB_E2E_KUBECONFIG={kubeconfig}: {e:#}"));
    let nodes = Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await
        .unwrap_or_else(|e| panic!("the cluster in {kubeconfig} is unreachable: {e}"));
    assert!(!nodes.items.is_empty());
    let controller = Api::<Deployment>::namespaced(client.clone(), NAMESPACE)
        .get("ferrolb-controller")
        .await
        .unwrap_or_else(|e| panic!("ferrolb is not installed in {NAMESPACE} (helm install ferrolb charts/ferrolb -n {NAMESPACE} --create-namespace): {e}"));
    assert!(
        controller
            .status
            .and_then(|s| s.ready_replicas)
            .unwrap_or(0)
            >= 1
    );

    kubectl(
        &kubeconfig,
        &["apply", "-f", "-"],
        Some(&format!(
            "apiVersion: ferrolb.io/v1beta1\nkind: IPAddressPool\nmetadata: {{name: e2e}}\n\
             spec: {{addresses: [{pool}]}}\n---\n\
             apiVersion: ferrolb.io/v1beta1\nkind: L2Advertisement\nmetadata: {{name: e2e}}\n\
             spec: {{ipAddressPools: [e2e]}}\n---\n\
             apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: e2e-web, namespace: default}}\n\
             spec:\n  replicas: 2\n  selector: {{matchLabels: {{app: e2e-web}}}}\n  template:\n    \
             metadata: {{labels: {{app: e2e-web}}}}\n    spec:\n      containers:\n      \
             - {{name: web, image: \"{image}\", args: [netexec, --http-port=8080], ports: [{{containerPort: 8080}}]}}\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {{name: e2e-web, namespace: default}}\n\
             spec: {{type: LoadBalancer, selector: {{app: e2e-web}}, ports: [{{port: 80, targetPort: 8080}}]}}\n"
        )),
    )
    .await;
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    let ip = poll("an EXTERNAL-IP", || async {
        let svc = services.get("e2e-web").await.ok()?;
        ferrolb_controller::reconcile::ingress_ips(&svc)
            .first()
            .copied()
    })
    .await;
    poll("TCP through the VIP", || async {
        connects(ip).then_some(())
    })
    .await;
    let owner = poll("the announcing node", || async {
        let svc = services.get("e2e-web").await.ok()?;
        let c = svc
            .status?
            .conditions?
            .into_iter()
            .find(|c| c.type_ == "ferrolb.io/AnnouncedIPv4" && c.status == "True")?;
        Some(
            c.message
                .split(" is announced by ")
                .nth(1)?
                .split(' ')
                .next()?
                .to_string(),
        )
    })
    .await;
    eprintln!("{ip} answers, announced by {owner}");

    // Kill the owner's speaker: traffic comes back through another node or the
    // restarted speaker.
    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    let speaker = pods
        .list(&ListParams::default().labels("app.kubernetes.io/component=speaker"))
        .await
        .unwrap()
        .items
        .into_iter()
        .find(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(owner.as_str()))
        .expect("a speaker Pod on the announcing node");
    let killed = Instant::now();
    pods.delete(
        speaker.metadata.name.as_deref().unwrap(),
        &DeleteParams {
            grace_period_seconds: Some(0),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    poll("TCP through the VIP after the kill", || async {
        connects(ip).then_some(())
    })
    .await;
    eprintln!("traffic back {:?} after the kill", killed.elapsed());
}
