//! The Grafana dashboard in config/ queries only metrics that Sluice exports.

use sluice::telemetry;

#[test]
fn the_dashboard_queries_only_exported_metrics() {
    let text = std::fs::read_to_string("config/grafana-dashboard.json").expect("the dashboard");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    let exported = [
        telemetry::BREAKER_STATE,
        telemetry::FALLBACK_DECISIONS,
        telemetry::OVER_LIMIT_CACHE_HITS,
        telemetry::RULES_RELOADS,
        telemetry::RULE_TOTAL_HITS,
        telemetry::RULE_OVER_LIMIT,
        telemetry::RULE_NEAR_LIMIT,
        telemetry::RULE_WITHIN_LIMIT,
        telemetry::RULE_SHADOW_MODE,
        telemetry::RULE_HITS_ABOVE_CAPACITY,
        telemetry::STORE_SECONDS,
        telemetry::DECISIONS,
        telemetry::DECISION_SECONDS,
        telemetry::UNKNOWN_DOMAIN,
    ];
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(!panels.is_empty());
    for panel in panels {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("an expression");
            let queried: Vec<&str> = expr
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|word| word.starts_with("sluice_"))
                .collect();
            assert!(!queried.is_empty(), "{expr}");
            for name in queried {
                assert!(
                    exported.contains(&name),
                    "{name} in `{expr}` is not exported"
                );
            }
        }
    }
}
