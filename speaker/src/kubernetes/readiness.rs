//! What `/readyz` and the API metrics say of the watches. The speaker serves on the
//! last objects it saw while the API server is unreachable: it stays ready then, and
//! says it is degraded (in `/readyz`'s text and `ferrolb_speaker_api_connected`).

use ferrolb_kubernetes::http::Readiness;

use super::objects::WatchHealth;
use crate::metrics::Metrics;

/// Not ready until every watch has listed (nothing is announced before); then ready,
/// degraded while a watch fails.
pub fn readiness(health: &WatchHealth) -> Readiness {
    let failing = || {
        let lines: Vec<String> = health
            .errors
            .iter()
            .map(|(r, e)| format!("{r}: {e}"))
            .collect();
        lines.join("; ")
    };
    match (health.synced, health.errors.is_empty()) {
        (false, true) => Readiness::NotReady("watches have not listed yet".into()),
        (false, false) => Readiness::NotReady(format!(
            "watches have not listed yet; failing: {}",
            failing()
        )),
        (true, true) => Readiness::Ready,
        (true, false) => Readiness::Degraded(format!(
            "answering on the last objects seen; watch failing: {}",
            failing()
        )),
    }
}

/// Sets `ferrolb_speaker_api_connected` and MetalLB's `config_loaded_bool`.
pub fn record(metrics: &Metrics, health: &WatchHealth) {
    let connected = health.synced && health.errors.is_empty();
    metrics.api_connected.set(connected as i64);
    metrics.metallb_config_loaded.set(health.synced as i64);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outage_after_the_first_list_is_degraded_not_unready() {
        let mut health = WatchHealth::default();
        let metrics = Metrics::default();
        assert_eq!(
            readiness(&health),
            Readiness::NotReady("watches have not listed yet".into())
        );
        health.synced = true;
        assert_eq!(readiness(&health), Readiness::Ready);
        record(&metrics, &health);
        assert!(metrics.encode().contains("ferrolb_speaker_api_connected 1"));

        health
            .errors
            .insert("services", "connection refused".into());
        assert_eq!(
            readiness(&health),
            Readiness::Degraded(
                "answering on the last objects seen; watch failing: services: connection refused"
                    .into()
            )
        );
        record(&metrics, &health);
        let text = metrics.encode();
        assert!(text.contains("ferrolb_speaker_api_connected 0"), "{text}");
        assert!(
            text.contains("metallb_k8s_client_config_loaded_bool 1"),
            "{text}"
        );
    }

    #[test]
    fn failing_before_the_first_list_is_unready_and_says_why() {
        let mut health = WatchHealth::default();
        health.errors.insert("nodes", "403 Forbidden".into());
        assert_eq!(
            readiness(&health),
            Readiness::NotReady(
                "watches have not listed yet; failing: nodes: 403 Forbidden".into()
            )
        );
        let metrics = Metrics::default();
        record(&metrics, &health);
        let text = metrics.encode();
        assert!(text.contains("ferrolb_speaker_api_connected 0"), "{text}");
        assert!(
            text.contains("metallb_k8s_client_config_loaded_bool 0"),
            "{text}"
        );
    }
}
