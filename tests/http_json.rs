//! `POST /json` on the HTTP listener: the proto3 JSON form of the RLS call, with the
//! documented status codes.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Backend, Harness, http};
use serde_json::{Value, json};

const RULES: &str =
    "domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: minute, requests_per_unit: 3}\n";

async fn post(addr: std::net::SocketAddr, body: &str) -> (u16, Value) {
    let headers = [("content-type", "application/json")];
    let reply = http::request(addr, "POST", "/json", &headers, body)
        .await
        .expect("an answer");
    let value = serde_json::from_str(&reply.body).unwrap_or(Value::Null);
    (reply.status, value)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decisions_over_json_with_their_status_codes() {
    let h = Harness::start(Backend::Memory, RULES).await;
    let addr = h.server().http_addr();
    let ask = r#"{"domain": "d", "descriptors": [{"entries": [{"key": "k", "value": "v"}]}]}"#;
    let (status, body) = post(addr, ask).await;
    assert_eq!(status, 200);
    assert_eq!(
        body,
        json!({"overallCode": "OK", "statuses": [{"code": "OK",
            "currentLimit": {"requestsPerUnit": 3, "unit": "MINUTE"},
            "limitRemaining": 2, "durationUntilReset": "20s"}]})
    );
    post(addr, ask).await;
    post(addr, ask).await;
    let (status, body) = post(addr, ask).await;
    assert_eq!(status, 429);
    assert_eq!(body["overallCode"], "OVER_LIMIT");
    assert_eq!(body["statuses"][0]["code"], "OVER_LIMIT");
    assert_eq!(
        body["responseHeadersToAdd"],
        json!([{"key": "retry-after", "value": "20"}])
    );

    let (status, body) = post(addr, "{not json").await;
    assert_eq!(status, 400);
    assert!(
        body["error"]
            .as_str()
            .unwrap_or_default()
            .starts_with("invalid JSON request"),
        "{body}"
    );
    let (status, body) = post(addr, r#"{"domain": "", "descriptors": []}"#).await;
    assert_eq!(
        (status, body),
        (400, json!({"error": "the domain must not be empty"}))
    );
    let (status, body) = post(addr, r#"{"domain": "d", "descriptors": [{"entries": []}]}"#).await;
    assert_eq!(status, 400);
    assert_eq!(
        body["error"],
        "descriptors[0] has no entries; at least one is required"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_failure_in_deny_mode_is_503() {
    use sluice::store::{
        FailureMode, Guarded, MemoryStore, RedisSettings, RedisStore, Store, Topology,
    };
    let mut redis = common::redis::RedisProcess::on_socket();
    let settings = RedisSettings {
        topology: Topology::Standalone { url: redis.url() },
        password: None,
        timeout: Duration::from_millis(200),
        connections: 1,
        tls_ca: None,
    };
    let store = RedisStore::connect(&settings).await.expect("Redis answers");
    let fallback = MemoryStore::new(4, Arc::new(sluice::clock::MonotonicClock::new()));
    let guarded = Guarded::new(
        store,
        fallback,
        FailureMode::Deny,
        1.0,
        Duration::from_secs(1),
    );
    let domain = sluice::rules::load_str(std::path::Path::new("d.yaml"), RULES).expect("valid");
    let rules = sluice::rules::RuleSet::from_domains(vec![domain]).expect("one domain");
    let limiter = Arc::new(sluice::service::Limiter::new(
        rules,
        Store::Guarded(Box::new(guarded)),
        Default::default(),
    ));
    let loopback = "127.0.0.1:0".parse().expect("an address");
    let addresses = sluice::server::Addresses {
        grpc: loopback,
        http: loopback,
    };
    let server = sluice::server::Server::start(limiter, addresses)
        .await
        .expect("it starts");
    redis.kill();
    let ask = r#"{"domain": "d", "descriptors": [{"entries": [{"key": "k", "value": "v"}]}]}"#;
    let (status, body) = post(server.http_addr(), ask).await;
    assert_eq!(status, 503);
    assert!(
        body["error"]
            .as_str()
            .unwrap_or_default()
            .starts_with("store unavailable"),
        "{body}"
    );
    server.shutdown(Duration::from_secs(1)).await;
}

async fn serve_with_headers(style: sluice::service::HeaderStyle) -> sluice::server::Server {
    use sluice::store::{MemoryStore, Store};
    let rules = "domain: d\ndescriptors:\n  - key: k\n    rate_limits:\n      - {unit: minute, requests_per_unit: 3, name: per_minute}\n      - {unit: hour, requests_per_unit: 100}\n";
    let domain = sluice::rules::load_str(std::path::Path::new("d.yaml"), rules).expect("valid");
    let set = sluice::rules::RuleSet::from_domains(vec![domain]).expect("one domain");
    let clock = sluice::clock::ManualClock::starting_at(1_000_000_000);
    let store = Store::Memory(MemoryStore::new(4, clock));
    let limiter =
        sluice::service::Limiter::new(set, store, Default::default()).with_response_headers(style);
    let loopback = "127.0.0.1:0".parse().expect("an address");
    let addresses = sluice::server::Addresses {
        grpc: loopback,
        http: loopback,
    };
    sluice::server::Server::start(Arc::new(limiter), addresses)
        .await
        .expect("it starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_headers_of_the_most_constrained_limit() {
    use sluice::service::HeaderStyle;
    let ask = r#"{"domain": "d", "descriptors": [{"entries": [{"key": "k", "value": "v"}]}]}"#;

    let server = serve_with_headers(HeaderStyle::Draft03).await;
    let (_, body) = post(server.http_addr(), ask).await;
    // 3 per minute leaves 2 and is full again in 20 s; 100 per hour leaves 99.
    assert_eq!(
        body["responseHeadersToAdd"],
        json!([
            {"key": "RateLimit-Limit", "value": "3, 3;w=60"},
            {"key": "RateLimit-Remaining", "value": "2"},
            {"key": "RateLimit-Reset", "value": "20"}
        ])
    );
    server.shutdown(Duration::from_secs(1)).await;

    let server = serve_with_headers(HeaderStyle::Ietf).await;
    post(server.http_addr(), ask).await;
    let (status, body) = post(server.http_addr(), ask).await;
    assert_eq!(status, 200);
    assert_eq!(
        body["responseHeadersToAdd"],
        json!([
            {"key": "RateLimit-Policy", "value": "\"per_minute\";q=3;w=60"},
            {"key": "RateLimit", "value": "\"per_minute\";r=1;t=40"}
        ])
    );
    post(server.http_addr(), ask).await;
    let (status, body) = post(server.http_addr(), ask).await;
    assert_eq!(status, 429);
    let headers = body["responseHeadersToAdd"]
        .as_array()
        .expect("headers")
        .clone();
    assert_eq!(headers[0], json!({"key": "retry-after", "value": "20"}));
    assert_eq!(
        headers[2],
        json!({"key": "RateLimit", "value": "\"per_minute\";r=0;t=60"})
    );
    server.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthcheck_flips_to_500_when_shutdown_begins() {
    let mut h = Harness::start(Backend::Memory, RULES).await;
    let addr = h.server().http_addr();
    let health = http::get(addr, "/healthcheck").await.expect("an answer");
    assert_eq!(health.status, 200);
    let body: Value = serde_json::from_str(&health.body).expect("JSON");
    assert_eq!(body["status"], "serving");

    h.server().drain();
    let health = http::get(addr, "/healthcheck").await.expect("an answer");
    assert_eq!(health.status, 500);
    let body: Value = serde_json::from_str(&health.body).expect("JSON");
    assert_eq!(body["status"], "shutting_down");
    // Decisions are still answered while draining.
    let ask = r#"{"domain": "d", "descriptors": [{"entries": [{"key": "k", "value": "v"}]}]}"#;
    assert_eq!(post(addr, ask).await.0, 200);
    h.stop().await;
}
