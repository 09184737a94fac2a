//! `/metrics`, `/healthz` and `/readyz` on one small HTTP server (the speaker uses it
//! too), with bounded connections ([`connections`]).

mod address;
mod connections;

pub use address::parse_address;
pub use connections::Limits;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

/// Renders the Prometheus text exposition.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;
/// Ok when ready, else why not.
pub type Ready = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// What `/readyz` answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Readiness {
    /// 200 `ok`.
    Ready,
    /// 200 `ok, degraded: <why>`: serving, but something it depends on is failing.
    Degraded(String),
    /// 503 `<why>`.
    NotReady(String),
}

/// Binds `address` (port 0: any) and serves in the background; returns the bound address.
pub async fn serve(
    address: SocketAddr,
    metrics: Render,
    ready: Ready,
) -> std::io::Result<SocketAddr> {
    let readiness = move || match ready() {
        Ok(()) => Readiness::Ready,
        Err(why) => Readiness::NotReady(why),
    };
    serve_readiness(address, metrics, Arc::new(readiness)).await
}

/// As [`serve`], with a `/readyz` that may also say it is degraded.
pub async fn serve_readiness(
    address: SocketAddr,
    metrics: Render,
    ready: Arc<dyn Fn() -> Readiness + Send + Sync>,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(address).await?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let body = metrics();
                async move {
                    (
                        [(
                            header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        body,
                    )
                }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let answer = match ready() {
                    Readiness::Ready => (StatusCode::OK, "ok\n".to_string()),
                    Readiness::Degraded(why) => (StatusCode::OK, format!("ok, degraded: {why}\n")),
                    Readiness::NotReady(why) => {
                        (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n"))
                    }
                };
                async move { answer.into_response() }
            }),
        );
    tokio::spawn(connections::serve(listener, app, Limits::default()));
    Ok(bound)
}
/// ferrolb's gauges in a Prometheus text exposition that are named like counters
/// (`_total`), which the naming conventions forbid. MetalLB's aliases keep MetalLB's names.
pub fn gauges_named_like_counters(exposition: &str) -> Vec<&str> {
    exposition
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ferrolb_"))
        .filter_map(|l| l.split_once(' '))
        .filter(|(name, kind)| *kind == "gauge" && name.ends_with("_total"))
        .map(|(name, _)| name)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gauge_named_total_is_found_and_metallbs_aliases_are_not() {
        let text = "# TYPE ferrolb_a_total counter\n# TYPE ferrolb_b_total gauge\n\
                    # TYPE ferrolb_c gauge\n# TYPE metallb_x_total gauge\n";
        assert_eq!(gauges_named_like_counters(text), ["b_total"]);
    }
}
