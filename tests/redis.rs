//! The Redis store against real `redis-server` processes: the script agrees with the model,
//! several instances share one limit exactly, a flushed script cache costs no decision.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::redis::RedisProcess;
use common::{Backend, Harness, codes, descriptor, request};
use proptest::prelude::*;
use sluice::bucket::Shape;
use sluice::clock::ManualClock;
use sluice::proto::Code;
use sluice::store::{Charge, MemoryStore, Mode, RedisSettings, RedisStore, Topology};

fn settings(topology: Topology) -> RedisSettings {
    RedisSettings {
        topology,
        password: None,
        timeout: Duration::from_secs(2),
        connections: 2,
        tls_ca: None,
    }
}

async fn standalone(server: &RedisProcess) -> RedisStore {
    let url = server.url();
    RedisStore::connect(&settings(Topology::Standalone { url }))
        .await
        .expect("Redis answers")
}

/// One step of a property run: wait, then ask each bucket for hits (0: check only).
#[derive(Clone, Debug)]
struct Step {
    wait_us: u64,
    hits: Vec<u64>,
    modes: Vec<u8>,
    /// Charges in this decision: the first 1 to 3 of the three buckets.
    count: usize,
    /// Which of the three buckets each charge takes from; two charges may share one.
    buckets: Vec<usize>,
}

fn steps() -> impl Strategy<Value = Vec<Step>> {
    let step = (
        0..3_000_000u64,
        prop::collection::vec(0..6u64, 3),
        prop::collection::vec(0..3u8, 3),
        1..=3usize,
        prop::collection::vec(0..3usize, 3),
    )
        .prop_map(|(wait_us, hits, modes, count, buckets)| Step {
            wait_us,
            hits,
            modes,
            count,
            buckets,
        });
    prop::collection::vec(step, 1..40)
}

/// Three limits; now and then one that denies everything (`None`).
fn shapes() -> impl Strategy<Value = Vec<Option<(u64, u64, u64)>>> {
    let shape = (
        1..=1_000u64,
        prop_oneof![Just(1u64), Just(60), Just(3_600)],
        1..=10u64,
    );
    prop::collection::vec(prop::option::weighted(0.9, shape), 3)
}

/// The script and the Rust model (the memory store) give the same answers, decision by
/// decision, for random limits (deny-all ones among them), waits, hits, check-only requests,
/// modes, and decisions of one bucket (the script's own path) or several, some of them
/// charging one bucket twice.
#[test]
fn the_script_agrees_with_the_model() {
    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    let server = RedisProcess::on_socket();
    let run = AtomicUsize::new(0);
    let config = ProptestConfig {
        cases: 48,
        ..ProptestConfig::default()
    };
    proptest!(config, |(shapes in shapes(), steps in steps())| {
        let run = run.fetch_add(1, Ordering::Relaxed);
        let clock = ManualClock::starting_at(1_700_000_000_000_000);
        let memory = MemoryStore::new(4, clock.clone());
        let shapes: Vec<Option<Shape>> = shapes
            .iter()
            .map(|shape| shape.map(|(r, p, c)| Shape::new(r, p * 1_000_000, c).expect("a shape")))
            .collect();
        let settings = settings(Topology::Standalone { url: server.url() });
        let redis = RedisStore::connect_with_clock(&settings, Some(clock.clone()));
        let redis = runtime.block_on(redis).expect("Redis answers");
        for step in steps {
            clock.advance(step.wait_us);
            let charges: Vec<Charge> = (0..step.count)
                .map(|b| Charge {
                    key: format!("prop:{run}:{}", step.buckets[b]).into_bytes(),
                    shape: shapes[step.buckets[b]],
                    hits: step.hits[b],
                    mode: match step.modes[b] {
                        0 => Mode::Enforce,
                        1 => Mode::Shadow,
                        _ => Mode::Quota { group: b as u32 },
                    },
                })
                .collect();
            let expected = memory.charge(&charges);
            let actual = runtime.block_on(redis.charge(&charges)).expect("a decision");
            prop_assert_eq!(actual, expected);
        }
    });
}

/// Four service instances share one Redis: hundreds of concurrent requests against one bucket
/// of 100 grant exactly 100.
async fn four_instances_grant_exactly_the_limit(backend: Backend) {
    let rules = "domain: shared\ndescriptors:\n  - key: k\n    rate_limit: {unit: day, requests_per_unit: 100}\n";
    // The harness starts Redis; its own server decides on the test's clock, so it is not
    // one of the four.
    let first = Harness::start(backend, rules).await;
    let mut instances = Vec::new();
    let mut servers = Vec::new();
    for _ in 0..4 {
        // Every instance has its own store and connections to the same Redis, and reads
        // Redis's own clock.
        let store = match &first.redis {
            common::RedisProcesses::Standalone(server) => {
                sluice::store::Store::Redis(standalone(server).await)
            }
            common::RedisProcesses::Cluster(cluster) => {
                let nodes = cluster.seeds();
                let store = RedisStore::connect(&settings(Topology::Cluster { nodes })).await;
                sluice::store::Store::Redis(store.expect("the cluster answers"))
            }
            _ => unreachable!("a standalone or Cluster backend"),
        };
        let set = sluice::rules::load_paths(&[first.rules_path()]).expect("valid rules");
        let limiter = Arc::new(sluice::service::Limiter::new(
            set,
            store,
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
        instances.push(common::connect(&server).await);
        servers.push(server);
    }
    let tasks: Vec<_> = (0..256)
        .map(|i| {
            let mut client = instances[i % instances.len()].clone();
            tokio::spawn(async move {
                let ask = request("shared", vec![descriptor(&[("k", "one")])]);
                let response = client.should_rate_limit(ask).await.expect("a decision");
                usize::from(response.into_inner().overall_code == Code::Ok as i32)
            })
        })
        .collect();
    let mut granted = 0;
    for task in tasks {
        granted += task.await.expect("the task ends");
    }
    assert_eq!(granted, 100);
    for server in servers {
        server.shutdown(Duration::from_secs(1)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_instances_on_one_redis_grant_exactly_the_limit() {
    four_instances_grant_exactly_the_limit(Backend::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_instances_on_a_cluster_grant_exactly_the_limit() {
    four_instances_grant_exactly_the_limit(Backend::Cluster).await;
}

/// `SCRIPT FLUSH` in the middle of a run: the script is loaded again and no decision fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flushed_script_cache_costs_no_decision() {
    let server = RedisProcess::on_socket();
    let store = Arc::new(standalone(&server).await);
    let shape = Shape::new(1_000_000, 1_000_000, 1_000_000).expect("a shape");
    let done = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..8)
        .map(|w| {
            let (store, done) = (store.clone(), done.clone());
            tokio::spawn(async move {
                let mut decided = 0;
                while !done.load(Ordering::Relaxed) {
                    let key = format!("flush:{w}").into_bytes();
                    let charge = Charge {
                        key,
                        shape: Some(shape),
                        hits: 1,
                        mode: Mode::Enforce,
                    };
                    let decision = store.charge(&[charge]).await.expect("no decision fails");
                    assert!(decision.passed);
                    decided += 1;
                }
                decided
            })
        })
        .collect();
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(server.cli(&["SCRIPT", "FLUSH"]).trim(), "OK");
    }
    done.store(true, Ordering::Relaxed);
    let mut decided = 0;
    for worker in workers {
        decided += worker.await.expect("the worker ends");
    }
    assert!(decided > 0);
}

/// A bucket's key holding something else (another type, a string of another length) counts
/// as a full bucket, in one-bucket decisions and in the others, and fails no decision of the
/// call it shares.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_holding_something_else_is_a_full_bucket() {
    let server = RedisProcess::on_socket();
    let store = standalone(&server).await;
    let shape = Shape::new(5, 1_000_000, 5).expect("a shape");
    let charge = |key: &str| Charge {
        key: key.as_bytes().to_vec(),
        shape: Some(shape),
        hits: 1,
        mode: Mode::Enforce,
    };
    server.cli(&["HSET", "other:hash", "field", "value"]);
    server.cli(&["SET", "other:string", "not a bucket"]);
    for key in ["other:hash", "other:string"] {
        let alone = store.charge(&[charge(key)]).await.expect("a decision");
        assert!(alone.passed, "{key}: {alone:?}");
        let report = alone.results[0].report.expect("a report");
        assert_eq!(report.remaining, 4, "{key}");
    }
    server.cli(&["HSET", "other:hash2", "field", "value"]);
    let together = store
        .charge(&[charge("other:hash2"), charge("other:fresh")])
        .await
        .expect("a decision");
    assert!(together.passed, "{together:?}");
}

/// Redis (or a proxy) closes connections that sit idle; the next decisions open new ones
/// and none of them fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_closed_while_idle_cost_no_decision() {
    let server = RedisProcess::on_socket();
    let store = standalone(&server).await;
    let shape = Shape::new(100, 1_000_000, 100).expect("a shape");
    let charge = |n: usize| Charge {
        key: format!("idle:{n}").into_bytes(),
        shape: Some(shape),
        hits: 1,
        mode: Mode::Enforce,
    };
    // Every lane's connection is open and in use.
    for n in 0..16 {
        store.charge(&[charge(n)]).await.expect("a decision");
    }
    let before = server.cli(&["CLIENT", "LIST"]).lines().count();
    let killed: usize = server
        .cli(&["CLIENT", "KILL", "TYPE", "normal"])
        .trim()
        .parse()
        .expect("a count");
    assert!(killed >= 1, "{killed}");
    assert!(server.cli(&["CLIENT", "LIST"]).lines().count() < before);
    for n in 0..16 {
        let decision = store.charge(&[charge(n)]).await;
        assert!(
            decision.is_ok(),
            "decision {n} after the kill: {decision:?}"
        );
    }
}

/// A bucket is a key with a time to live: it disappears when it would be full again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buckets_expire_when_full() {
    let rules = "domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: minute, requests_per_unit: 60}\n";
    let mut h = Harness::start(Backend::Redis, rules).await;
    assert_eq!(codes(&h.one("d", &[("k", "v")]).await), [(Code::Ok, 59)]);
    let common::RedisProcesses::Standalone(server) = &h.redis else {
        unreachable!()
    };
    let keys = server.cli(&["KEYS", "sl:*"]);
    let key = keys.trim();
    assert!(key.starts_with("sl:1:d"), "{keys}");
    // One token of 60 per minute: full again in a second, the shortest time to live.
    let ttl: i64 = server
        .cli(&["PTTL", key])
        .trim()
        .parse()
        .expect("a time to live");
    assert!((1..=1_000).contains(&ttl), "{ttl}");
}

/// With the first-entry hash tag, every bucket of one identity lands on one Cluster node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hash_tag_keeps_an_identity_in_one_slot() {
    let cluster = common::redis::RedisCluster::start();
    let nodes = cluster.seeds();
    let store = RedisStore::connect(&settings(Topology::Cluster { nodes })).await;
    let rules = sluice::rules::load_str(
        std::path::Path::new("tag.yaml"),
        "domain: d\ndescriptors:\n  - key: user\n    rate_limit: {unit: hour, requests_per_unit: 9}\n    \
         descriptors:\n      - key: path\n        rate_limits:\n          - {unit: hour, requests_per_unit: 5}\n          \
         - {unit: day, requests_per_unit: 50}\n",
    )
    .expect("valid rules");
    let set = sluice::rules::RuleSet::from_domains(vec![rules]).expect("one domain");
    let limiter = sluice::service::Limiter::new(
        set,
        sluice::store::Store::Redis(store.expect("the cluster answers")),
        Default::default(),
    )
    .with_hash_tag(sluice::key::HashTag::FirstEntry);
    for path in ["/a", "/b", "/c"] {
        let ask = request(
            "d",
            vec![
                descriptor(&[("user", "alice")]),
                descriptor(&[("user", "alice"), ("path", path)]),
            ],
        );
        let response = limiter.decide(&ask).await.expect("a decision");
        assert_eq!(response.overall_code, Code::Ok as i32);
    }
    let holding: Vec<usize> = cluster
        .nodes
        .iter()
        .map(|node| {
            node.cli(&["KEYS", "sl:*"])
                .lines()
                .filter(|l| !l.is_empty())
                .count()
        })
        .collect();
    // One bucket for user=alice, two for each of the three paths, all on one node.
    assert_eq!(holding.iter().sum::<usize>(), 7, "{holding:?}");
    assert_eq!(holding.iter().filter(|&&n| n > 0).count(), 1, "{holding:?}");
}
