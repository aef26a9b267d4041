//! Metrics: their names, described once, and the Prometheus recorder `/metrics` renders.
//!
//! Only labels of bounded cardinality are used here (a result, a state); nothing names a
//! descriptor value.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, RwLock};

use std::time::Duration;

use metrics::{Counter, Histogram, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Where decisions are made: 0 Redis, 1 the fallback, 2 the fallback with a probe out.
pub const BREAKER_STATE: &str = "sluice_redis_breaker_state";
/// Decisions made without Redis while it was unavailable.
pub const FALLBACK_DECISIONS: &str = "sluice_fallback_decisions_total";
/// Requests denied by the over-limit cache, without a Redis call.
pub const OVER_LIMIT_CACHE_HITS: &str = "sluice_over_limit_cache_hits_total";
/// Reloads of the rules, by `result` (`ok` or `error`).
pub const RULES_RELOADS: &str = "sluice_rules_reloads_total";
/// 1 for the hash of the rules in force, 0 for hashes that were in force before.
pub const RULES_LOADED: &str = "sluice_rules_loaded";

/// Records that the rules with `hash` are in force, instead of those with `previous`.
pub fn rules_in_force(hash: &str, previous: Option<&str>) {
    if let Some(previous) = previous.filter(|previous| *previous != hash) {
        metrics::gauge!(RULES_LOADED, "hash" => previous.to_owned()).set(0.0);
    }
    metrics::gauge!(RULES_LOADED, "hash" => hash.to_owned()).set(1.0);
}

/// Hits on a rule, by domain and rule (`total_hits`, and one of the four below).
pub const RULE_TOTAL_HITS: &str = "sluice_rule_total_hits";
/// Hits denied by a rule.
pub const RULE_OVER_LIMIT: &str = "sluice_rule_over_limit";
/// Hits allowed while the bucket was at least the near-limit share used.
pub const RULE_NEAR_LIMIT: &str = "sluice_rule_near_limit";
/// Hits allowed with room to spare.
pub const RULE_WITHIN_LIMIT: &str = "sluice_rule_within_limit";
/// Hits a shadow-mode rule would have denied.
pub const RULE_SHADOW_MODE: &str = "sluice_rule_shadow_mode";
/// Requests asking for more hits than a limit's capacity: a misconfiguration, not a burst.
pub const RULE_HITS_ABOVE_CAPACITY: &str = "sluice_rule_hits_above_capacity";
/// Time of one store call, by store and result.
pub const STORE_SECONDS: &str = "sluice_store_call_seconds";

/// How a descriptor's hits ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Allowed with room to spare.
    WithinLimit,
    /// Allowed, with the bucket at least the near-limit share used.
    NearLimit,
    /// Denied.
    OverLimit,
    /// Would have been denied, but the rule is in shadow mode.
    Shadow,
}

/// The counters of one rule, registered once.
struct RuleCounters {
    total: Counter,
    within: Counter,
    near: Counter,
    over: Counter,
    shadow: Counter,
    above_capacity: Counter,
}

impl RuleCounters {
    fn register(domain: &str, rule: &str) -> RuleCounters {
        let labels = [("domain", domain.to_owned()), ("rule", rule.to_owned())];
        RuleCounters {
            total: metrics::counter!(RULE_TOTAL_HITS, &labels),
            within: metrics::counter!(RULE_WITHIN_LIMIT, &labels),
            near: metrics::counter!(RULE_NEAR_LIMIT, &labels),
            over: metrics::counter!(RULE_OVER_LIMIT, &labels),
            shadow: metrics::counter!(RULE_SHADOW_MODE, &labels),
            above_capacity: metrics::counter!(RULE_HITS_ABOVE_CAPACITY, &labels),
        }
    }
}

/// Counters by rule name, so that a decision neither builds labels nor searches the
/// recorder. A rule's name starts with its domain, so the name alone is the key. Only filled
/// once the Prometheus recorder is installed: handles taken before it would count nothing.
static RULE_COUNTERS: OnceLock<RwLock<HashMap<String, Arc<RuleCounters>>>> = OnceLock::new();

fn rule_counters(domain: &str, rule: &str) -> Arc<RuleCounters> {
    if !matches!(PROMETHEUS.get(), Some(Some(_))) {
        return Arc::new(RuleCounters::register(domain, rule));
    }
    let cache = RULE_COUNTERS.get_or_init(RwLock::default);
    // Counters are handles: a poisoned lock still holds valid ones.
    if let Some(counters) = cache.read().unwrap_or_else(|p| p.into_inner()).get(rule) {
        return counters.clone();
    }
    let mut cache = cache.write().unwrap_or_else(|p| p.into_inner());
    let counters = cache
        .entry(rule.to_owned())
        .or_insert_with(|| Arc::new(RuleCounters::register(domain, rule)));
    counters.clone()
}

/// Counts `hits` on `rule` of `domain`.
pub fn rule_hits(domain: &str, rule: &str, hits: u64, outcome: Outcome, above_capacity: bool) {
    let counters = rule_counters(domain, rule);
    counters.total.increment(hits);
    let counter = match outcome {
        Outcome::WithinLimit => &counters.within,
        Outcome::NearLimit => &counters.near,
        Outcome::OverLimit => &counters.over,
        Outcome::Shadow => &counters.shadow,
    };
    counter.increment(hits);
    if above_capacity {
        counters.above_capacity.increment(1);
    }
}

/// Decisions, by outcome (`ok`, `over_limit`, `invalid`, `store_error`).
pub const DECISIONS: &str = "sluice_decisions_total";
/// Time of one decision, from request to response.
pub const DECISION_SECONDS: &str = "sluice_decision_seconds";
/// Requests for a domain no rule file defines.
pub const UNKNOWN_DOMAIN: &str = "sluice_unknown_domain_total";

/// The outcomes and stores decisions are counted by, in the order of [`HANDLES`]' arrays.
const OUTCOMES: [&str; 4] = ["ok", "over_limit", "invalid", "store_error"];
const STORES: [&str; 2] = ["memory", "redis"];

/// Handles of the per-decision metrics, made on first use once the recorder is installed, so
/// that a decision does not look its metrics up by name and labels every time.
struct Handles {
    decisions: [OnceLock<Counter>; OUTCOMES.len()],
    decision_seconds: OnceLock<Histogram>,
    /// By store, then `ok` / `error`.
    store_seconds: [[OnceLock<Histogram>; 2]; STORES.len()],
}

static HANDLES: Handles = Handles {
    decisions: [const { OnceLock::new() }; OUTCOMES.len()],
    decision_seconds: OnceLock::new(),
    store_seconds: [const { [const { OnceLock::new() }; 2] }; STORES.len()],
};

/// Handles made before the recorder is installed would stay no-ops: until then, none are kept.
fn recorder_installed() -> bool {
    matches!(PROMETHEUS.get(), Some(Some(_)))
}

/// Records one decision.
pub fn decision(outcome: &'static str, took: Duration) {
    let seconds = took.as_secs_f64();
    match OUTCOMES.iter().position(|known| *known == outcome) {
        Some(index) if recorder_installed() => {
            HANDLES.decisions[index]
                .get_or_init(|| metrics::counter!(DECISIONS, "outcome" => outcome))
                .increment(1);
            HANDLES
                .decision_seconds
                .get_or_init(|| metrics::histogram!(DECISION_SECONDS))
                .record(seconds);
        }
        _ => {
            metrics::counter!(DECISIONS, "outcome" => outcome).increment(1);
            metrics::histogram!(DECISION_SECONDS).record(seconds);
        }
    }
}

/// Counts a request for an unknown domain (the domain is not a label: it is the caller's).
pub fn unknown_domain() {
    metrics::counter!(UNKNOWN_DOMAIN).increment(1);
}

/// Records one store call.
pub fn store_call(store: &'static str, took: Duration, ok: bool) {
    let result = if ok { "ok" } else { "error" };
    let seconds = took.as_secs_f64();
    match STORES.iter().position(|known| *known == store) {
        Some(index) if recorder_installed() => HANDLES.store_seconds[index][usize::from(!ok)]
            .get_or_init(
                || metrics::histogram!(STORE_SECONDS, "store" => store, "result" => result),
            )
            .record(seconds),
        _ => {
            metrics::histogram!(STORE_SECONDS, "store" => store, "result" => result).record(seconds)
        }
    }
}

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
    describe_gauge!(RULES_LOADED, "1 for the hash of the rules in force");
    describe_counter!(RULE_TOTAL_HITS, "Hits on a rule, by domain and rule");
    describe_counter!(RULE_OVER_LIMIT, "Hits denied by a rule");
    describe_counter!(
        RULE_NEAR_LIMIT,
        "Hits allowed with the bucket nearly used up"
    );
    describe_counter!(RULE_WITHIN_LIMIT, "Hits allowed with room to spare");
    describe_counter!(
        RULE_SHADOW_MODE,
        "Hits a shadow-mode rule would have denied"
    );
    describe_counter!(
        RULE_HITS_ABOVE_CAPACITY,
        "Requests asking more hits than a capacity"
    );
    describe_histogram!(STORE_SECONDS, "Time of one store call, by store and result");
    describe_counter!(DECISIONS, "Decisions, by outcome");
    describe_histogram!(DECISION_SECONDS, "Time of one decision");
    describe_counter!(UNKNOWN_DOMAIN, "Requests for a domain no rule file defines");
}
