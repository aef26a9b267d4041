//! The hot path without the network: rule matching, bucket arithmetic, and whole decisions on
//! the in-memory store with 1 and 5 descriptors.

use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use sluice::bucket::Shape;
use sluice::clock::MonotonicClock;
use sluice::proto::{Entry, RateLimitDescriptor, RateLimitRequest};
use sluice::rules;
use sluice::service::{Bounds, Limiter};
use sluice::store::{MemoryStore, Store};

/// A domain with 1 000 exact values, 50 wildcards and a nested level, like a busy real file.
fn rules_text() -> String {
    let mut text = String::from("domain: bench\ndescriptors:\n");
    for i in 0..1_000 {
        text.push_str(&format!(
            "  - key: user\n    value: user{i}\n    rate_limit: {{unit: second, requests_per_unit: 100}}\n"
        ));
    }
    for i in 0..50 {
        text.push_str(&format!(
            "  - key: user\n    value: team{i}-*\n    rate_limit: {{unit: minute, requests_per_unit: 600}}\n"
        ));
    }
    text.push_str(
        "  - key: user\n    rate_limit: {unit: second, requests_per_unit: 1000000}\n    \
         descriptors:\n      - key: path\n        rate_limit: {unit: second, requests_per_unit: 1000000}\n",
    );
    text
}

fn descriptor(entries: &[(&str, &str)]) -> RateLimitDescriptor {
    RateLimitDescriptor {
        entries: entries
            .iter()
            .map(|(k, v)| Entry {
                key: (*k).to_owned(),
                value: (*v).to_owned(),
            })
            .collect(),
        ..Default::default()
    }
}

fn bench_rules(c: &mut Criterion) {
    let domain = rules::load_str(Path::new("bench.yaml"), &rules_text()).expect("valid rules");
    c.bench_function("rules/find exact of 1000", |b| {
        b.iter(|| domain.find(black_box([("user", "user777")])))
    });
    c.bench_function("rules/find wildcard 50th", |b| {
        b.iter(|| domain.find(black_box([("user", "team49-x")])))
    });
    c.bench_function("rules/find depth 2", |b| {
        b.iter(|| domain.find(black_box([("user", "nobody"), ("path", "/a")])))
    });
}

fn bench_bucket(c: &mut Criterion) {
    let shape = Shape::new(1_000, 1_000_000, 1_000).expect("a shape");
    let probe = shape.probe(None, 1_000_000);
    let state = shape.take(&probe, 1);
    c.bench_function("bucket/probe and take", |b| {
        let mut now = 1_000_000;
        b.iter(|| {
            now += 7;
            let probe = shape.probe(Some(black_box(&state)), now);
            shape.holds(&probe, 1).then(|| shape.take(&probe, 1))
        })
    });
}

fn bench_decide(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime");
    let set = {
        let domain = rules::load_str(Path::new("bench.yaml"), &rules_text()).expect("valid");
        rules::RuleSet::from_domains(vec![domain]).expect("one domain")
    };
    let store = Store::Memory(MemoryStore::new(64, Arc::new(MonotonicClock::new())));
    let limiter = Limiter::new(set, store, Bounds::default());
    // As `serve` does: with the recorder installed, decisions count on cached handles.
    sluice::telemetry::prometheus().expect("the only recorder");
    let one = RateLimitRequest {
        domain: "bench".into(),
        descriptors: vec![descriptor(&[("user", "nobody")])],
        hits_addend: 1,
    };
    let five = RateLimitRequest {
        domain: "bench".into(),
        descriptors: vec![
            descriptor(&[("user", "user1")]),
            descriptor(&[("user", "user2")]),
            descriptor(&[("user", "team3-a")]),
            descriptor(&[("user", "nobody")]),
            descriptor(&[("user", "nobody"), ("path", "/a")]),
        ],
        hits_addend: 1,
    };
    c.bench_function("decide/memory 1 descriptor", |b| {
        b.to_async(&runtime)
            .iter(|| limiter.decide(black_box(&one)))
    });
    c.bench_function("decide/memory 5 descriptors", |b| {
        b.to_async(&runtime)
            .iter(|| limiter.decide(black_box(&five)))
    });
}

criterion_group!(benches, bench_rules, bench_bucket, bench_decide);
criterion_main!(benches);
