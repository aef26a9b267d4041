//! Metrics: their names, described once, and the Prometheus recorder `/metrics` renders.
//!
//! Only labels of bounded cardinality are used here (a result, a state); nothing names a
//! descriptor value.

use std::sync::OnceLock;

use metrics::{describe_counter, describe_gauge};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Where decisions are made: 0 Redis, 1 the fallback, 2 the fallback with a probe out.
pub const BREAKER_STATE: &str = "sluice_redis_breaker_state";
/// Decisions made without Redis while it was unavailable.
pub const FALLBACK_DECISIONS: &str = "sluice_fallback_decisions_total";
/// Requests denied by the over-limit cache, without a Redis call.
pub const OVER_LIMIT_CACHE_HITS: &str = "sluice_over_limit_cache_hits_total";
/// Reloads of the rules, by `result` (`ok` or `error`).
pub const RULES_RELOADS: &str = "sluice_rules_reloads_total";

static PROMETHEUS: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// The process's Prometheus recorder, installed (and every metric described) on first use;
/// `None` if another recorder was installed first.
pub fn prometheus() -> Option<&'static PrometheusHandle> {
    PROMETHEUS
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).ok()?;
            describe();
            Some(handle)
        })
        .as_ref()
}

fn describe() {
    describe_gauge!(
        BREAKER_STATE,
        "Where decisions are made: 0 Redis, 1 fallback, 2 probing"
    );
    describe_counter!(
        FALLBACK_DECISIONS,
        "Decisions made without Redis while it was unavailable"
    );
    describe_counter!(
        OVER_LIMIT_CACHE_HITS,
        "Requests denied by the over-limit cache"
    );
    describe_counter!(RULES_RELOADS, "Reloads of the rules, by result");
}
