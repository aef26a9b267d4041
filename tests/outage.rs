//! Redis going away under load: killed, or hung with SIGSTOP. Decisions keep coming from the
//! in-process fallback, none fails, and Redis takes over again when it is back.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::redis::RedisProcess;
use common::{connect, descriptor, request};
use sluice::proto::{Code, RateLimitServiceClient};
use sluice::server::{Addresses, Server};
use sluice::service::Limiter;
use sluice::store::{
    BreakerState, FailureMode, Guarded, MemoryStore, RedisSettings, RedisStore, Store, Topology,
};
use tonic::transport::Channel;

const RULES: &str = "domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: second, requests_per_unit: 1000000}\n  - key: small\n    rate_limit: {unit: minute, requests_per_unit: 2}\n";

async fn start(redis: &RedisProcess, mode: FailureMode) -> (Server, Arc<Limiter>) {
    let settings = RedisSettings {
        topology: Topology::Standalone { url: redis.url() },
        password: None,
        timeout: Duration::from_millis(10),
        connections: 2,
        tls_ca: None,
    };
    let store = RedisStore::connect(&settings).await.expect("Redis answers");
    let fallback = MemoryStore::new(8, Arc::new(sluice::clock::MonotonicClock::new()));
    let guarded = Guarded::new(store, fallback, mode, 1.0, Duration::from_millis(100));
    let domain = sluice::rules::load_str(std::path::Path::new("d.yaml"), RULES).expect("valid");
    let rules = sluice::rules::RuleSet::from_domains(vec![domain]).expect("one domain");
    let limiter = Arc::new(Limiter::new(
        rules,
        Store::Guarded(Box::new(guarded)),
        Default::default(),
    ));
    let loopback = "127.0.0.1:0".parse().expect("an address");
    let addresses = Addresses {
        grpc: loopback,
        http: loopback,
    };
    let server = Server::start(limiter.clone(), addresses)
        .await
        .expect("it starts");
    (server, limiter)
}

/// Callers asking without pause until told to stop; returns (decisions, failures, slowest).
fn load(
    client: RateLimitServiceClient<Channel>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(usize, usize, Duration)> {
    tokio::spawn(async move {
        let tasks: Vec<_> = (0..8)
            .map(|t| {
                let (mut client, stop) = (client.clone(), stop.clone());
                tokio::spawn(async move {
                    let (mut decided, mut failed, mut slowest) = (0, 0, Duration::ZERO);
                    let mut i = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        i += 1;
                        let value = format!("{t}-{}", i % 50);
                        let ask = request("d", vec![descriptor(&[("k", &value)])]);
                        let sent = Instant::now();
                        match client.should_rate_limit(ask).await {
                            Ok(answer) if answer.get_ref().overall_code == Code::Ok as i32 => {
                                decided += 1;
                            }
                            _ => failed += 1,
                        }
                        slowest = slowest.max(sent.elapsed());
                    }
                    (decided, failed, slowest)
                })
            })
            .collect();
        let mut total = (0, 0, Duration::ZERO);
        for task in tasks {
            let (decided, failed, slowest) = task.await.expect("a load task ends");
            total = (total.0 + decided, total.1 + failed, total.2.max(slowest));
        }
        total
    })
}

async fn wait_for(limiter: &Limiter, state: BreakerState, within: Duration) {
    let deadline = Instant::now() + within;
    while limiter.store().breaker() != Some(state) {
        assert!(
            Instant::now() < deadline,
            "the breaker did not become {state:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The outage of `break_redis`, then `mend_redis`, under load: no decision fails.
async fn survive(
    break_redis: impl FnOnce(&mut RedisProcess),
    mend_redis: impl FnOnce(&mut RedisProcess),
) {
    let mut redis = RedisProcess::on_socket();
    let (server, limiter) = start(&redis, FailureMode::Fallback).await;
    let stop = Arc::new(AtomicBool::new(false));
    let load = load(connect(&server).await, stop.clone());

    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(limiter.store().breaker(), Some(BreakerState::Closed));
    break_redis(&mut redis);
    wait_for(&limiter, BreakerState::Open, Duration::from_secs(5)).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    mend_redis(&mut redis);
    wait_for(&limiter, BreakerState::Closed, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);

    let (decided, failed, slowest) = load.await.expect("the load ends");
    println!("decisions {decided}, failed {failed}, slowest {slowest:?}");
    assert_eq!(failed, 0);
    assert!(decided > 100, "{decided}");
    // Decisions reach Redis again.
    assert!(
        redis.cli(&["KEYS", "sl:*"]).contains("sl:"),
        "no bucket in Redis after it came back"
    );
    server.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_redis_fails_no_decision() {
    survive(RedisProcess::kill, RedisProcess::restart).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_redis_fails_no_decision() {
    survive(|redis| redis.signal("STOP"), |redis| redis.signal("CONT")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_modes_allow_and_deny() {
    for (mode, expected) in [
        (FailureMode::Allow, Ok(Code::Ok)),
        (FailureMode::Deny, Err(tonic::Code::Unavailable)),
    ] {
        let mut redis = RedisProcess::on_socket();
        let (server, _limiter) = start(&redis, mode).await;
        let mut client = connect(&server).await;
        redis.kill();
        for _ in 0..3 {
            let ask = request("d", vec![descriptor(&[("k", "v")])]);
            let answer = client.should_rate_limit(ask).await;
            let got = answer
                .map(|a| Code::try_from(a.get_ref().overall_code).expect("a code"))
                .map_err(|status| status.code());
            assert_eq!(got, expected, "{mode:?}");
        }
        server.shutdown(Duration::from_secs(1)).await;
    }
}

/// A bucket Redis said is empty is denied locally until it refills: no Redis call, so a hung
/// Redis does not even notice. A reload of the rules forgets what the cache knew.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_over_limit_cache_answers_without_redis() {
    let redis = RedisProcess::on_socket();
    let (server, limiter) = start(&redis, FailureMode::Fallback).await;
    let client = connect(&server).await;
    let ask = |value: &'static str| {
        let mut client = client.clone();
        async move {
            let ask = request("d", vec![descriptor(&[("small", value)])]);
            let answer = client
                .should_rate_limit(ask)
                .await
                .expect("a decision")
                .into_inner();
            Code::try_from(answer.overall_code).expect("a code")
        }
    };
    assert_eq!(ask("x").await, Code::Ok);
    assert_eq!(ask("x").await, Code::Ok);
    assert_eq!(ask("x").await, Code::OverLimit);

    redis.signal("STOP");
    for _ in 0..5 {
        assert_eq!(ask("x").await, Code::OverLimit);
    }
    assert_eq!(limiter.store().breaker(), Some(BreakerState::Closed));
    // Another bucket needs Redis, which does not answer: the fallback decides.
    assert_eq!(ask("y").await, Code::Ok);
    assert_eq!(limiter.store().breaker(), Some(BreakerState::Open));
    redis.signal("CONT");
    // Probes ride on decisions: keep asking until one finds Redis back.
    let deadline = Instant::now() + Duration::from_secs(10);
    while limiter.store().breaker() != Some(BreakerState::Closed) {
        assert!(Instant::now() < deadline, "Redis was not probed back");
        ask("z").await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // New rules: the cache is cleared and Redis decides again (its bucket is still empty).
    let domain = sluice::rules::load_str(std::path::Path::new("d.yaml"), RULES).expect("valid");
    limiter.replace_rules(sluice::rules::RuleSet::from_domains(vec![domain]).expect("one"));
    redis.signal("STOP");
    assert_eq!(
        ask("x").await,
        Code::Ok,
        "decided by the fallback, after Redis missed its deadline"
    );
    redis.signal("CONT");
    server.shutdown(Duration::from_secs(1)).await;
}
