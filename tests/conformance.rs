//! The conformance scenarios: every rule feature, end to end through gRPC, with exact codes and
//! remaining counts. Each scenario runs once per store (see the `scenarios!` lists at the end),
//! and every store must give the same answers.

mod common;

use common::*;
use sluice::proto::{Code, RateLimitUnit, ResponseUnit};
use tonic::Code as Status;

const RULES: &str = r#"
domain: conformance
descriptors:
  - key: plain
    rate_limit: {unit: minute, requests_per_unit: 3}

  - key: tier
    value: gold
    rate_limit: {unit: minute, requests_per_unit: 5}
  - key: tier
    value: go*
    rate_limit: {unit: minute, requests_per_unit: 4}
  - key: tier
    value: "*ver"
    rate_limit: {unit: minute, requests_per_unit: 6}
  - key: tier
    value: free
  - key: tier
    rate_limit: {unit: minute, requests_per_unit: 2}

  - key: org
    rate_limit: {unit: minute, requests_per_unit: 10}
    descriptors:
      - key: team
        rate_limit: {unit: minute, requests_per_unit: 2}

  - key: blocked
    rate_limit: {unit: second, requests_per_unit: 0}

  - key: internal
    rate_limit: {unlimited: true}

  - key: watched
    shadow_mode: true
    rate_limit: {unit: minute, requests_per_unit: 1}

  - key: route
    value: /api/*
    share_threshold: true
    rate_limit: {unit: minute, requests_per_unit: 2}
  - key: route
    value: /web/*
    rate_limit: {unit: minute, requests_per_unit: 2}

  - key: general
    rate_limit: {name: general, unit: minute, requests_per_unit: 1}
  - key: special
    rate_limit:
      name: special
      unit: minute
      requests_per_unit: 5
      replaces: [{name: general}]

  - key: bursty
    rate_limit: {unit: second, requests_per_unit: 1, burst: 5}

  - key: tensec
    rate_limit: {unit: second, unit_multiplier: 10, requests_per_unit: 2}

  - key: layered
    rate_limits:
      - {unit: second, requests_per_unit: 3}
      - {unit: hour, requests_per_unit: 4}

  - key: a
    rate_limit: {unit: minute, requests_per_unit: 1}
  - key: a_b
    rate_limit: {unit: minute, requests_per_unit: 1}

  - key: hundred
    rate_limit: {unit: hour, requests_per_unit: 100}

  - key: q1
    quota_mode: true
    rate_limit: {unit: minute, requests_per_unit: 1}
  - key: q2
    quota_mode: true
    rate_limit: {unit: minute, requests_per_unit: 1}
"#;

const D: &str = "conformance";
const OK: Code = Code::Ok;
const OVER: Code = Code::OverLimit;

async fn start(backend: Backend) -> Harness {
    Harness::start(backend, RULES).await
}

/// A key-only rule limits every value of its key, each value in its own bucket.
async fn key_only_rule(backend: Backend) {
    let mut h = start(backend).await;
    let first = h.one(D, &[("plain", "x")]).await;
    assert_eq!(codes(&first), [(OK, 2)]);
    let status = &first.statuses[0];
    let limit = status.current_limit.as_ref().expect("a current limit");
    assert_eq!(limit.requests_per_unit, 3);
    assert_eq!(limit.unit, ResponseUnit::Minute as i32);
    // One token of three per minute is 20 seconds of refill.
    let reset = status.duration_until_reset.expect("a duration until reset");
    assert_eq!((reset.seconds, reset.nanos), (20, 0));
    assert_eq!(codes(&h.one(D, &[("plain", "x")]).await), [(OK, 1)]);
    assert_eq!(codes(&h.one(D, &[("plain", "x")]).await), [(OK, 0)]);
    let denied = h.one(D, &[("plain", "x")]).await;
    assert_eq!(overall(&denied), OVER);
    assert_eq!(codes(&denied), [(OVER, 0)]);
    assert_eq!(header(&denied, "retry-after"), Some("20"));
    assert_eq!(codes(&h.one(D, &[("plain", "y")]).await), [(OK, 2)]);
}

/// Exact value, then wildcards in file order, then the key alone.
async fn exact_beats_wildcard_beats_key_only(backend: Backend) {
    let mut h = start(backend).await;
    let limit_of = |r: &sluice::proto::RateLimitResponse| {
        r.statuses[0]
            .current_limit
            .as_ref()
            .map(|l| l.requests_per_unit)
    };
    assert_eq!(limit_of(&h.one(D, &[("tier", "gold")]).await), Some(5));
    assert_eq!(limit_of(&h.one(D, &[("tier", "goose")]).await), Some(4));
    assert_eq!(limit_of(&h.one(D, &[("tier", "silver")]).await), Some(6));
    // "gover" matches both wildcards; the first in the file wins.
    assert_eq!(limit_of(&h.one(D, &[("tier", "gover")]).await), Some(4));
    assert_eq!(limit_of(&h.one(D, &[("tier", "bronze")]).await), Some(2));
}

/// A value listed without a limit is allow-listed: no fallback to the key-only rule.
async fn allow_listed_value(backend: Backend) {
    let mut h = start(backend).await;
    for _ in 0..5 {
        let response = h.one(D, &[("tier", "free")]).await;
        assert_eq!(codes(&response), [(OK, 0)]);
        assert_eq!(response.statuses[0].current_limit, None);
    }
}

/// A descriptor matches only the rule at exactly its depth.
async fn depth(backend: Backend) {
    let mut h = start(backend).await;
    assert_eq!(codes(&h.one(D, &[("org", "o")]).await), [(OK, 9)]);
    assert_eq!(
        codes(&h.one(D, &[("org", "o"), ("team", "t")]).await),
        [(OK, 1)]
    );
    assert_eq!(
        codes(&h.one(D, &[("org", "o"), ("team", "t")]).await),
        [(OK, 0)]
    );
    assert_eq!(
        codes(&h.one(D, &[("org", "o"), ("team", "t")]).await),
        [(OVER, 0)]
    );
    // Deeper than the rules: no limit. The parent's bucket was not touched by the children.
    let deeper = h
        .one(D, &[("org", "o"), ("team", "t"), ("member", "m")])
        .await;
    assert_eq!(codes(&deeper), [(OK, 0)]);
    assert_eq!(deeper.statuses[0].current_limit, None);
    assert_eq!(codes(&h.one(D, &[("org", "o")]).await), [(OK, 8)]);
    // An entry the rules do not know at the second level: no limit.
    assert_eq!(
        codes(&h.one(D, &[("org", "o"), ("other", "t")]).await),
        [(OK, 0)]
    );
}

/// `requests_per_unit: 0` denies everything, with its limit reported.
async fn zero_requests_per_unit(backend: Backend) {
    let mut h = start(backend).await;
    let response = h.one(D, &[("blocked", "x")]).await;
    assert_eq!(codes(&response), [(OVER, 0)]);
    let status = &response.statuses[0];
    assert_eq!(
        status.current_limit.as_ref().map(|l| l.requests_per_unit),
        Some(0)
    );
    assert!(status.duration_until_reset.is_some());
    // It can never pass, so there is no time to wait for.
    assert_eq!(header(&response, "retry-after"), None);
}

/// `unlimited` passes everything, with the largest remaining count and no current limit.
async fn unlimited(backend: Backend) {
    let mut h = start(backend).await;
    for _ in 0..3 {
        let response = h.one(D, &[("internal", "svc")]).await;
        assert_eq!(codes(&response), [(OK, u32::MAX)]);
        assert_eq!(response.statuses[0].current_limit, None);
        assert_eq!(response.statuses[0].duration_until_reset, None);
    }
}

/// A shadow-mode rule counts and reports, but never denies.
async fn shadow_mode(backend: Backend) {
    let mut h = start(backend).await;
    assert_eq!(codes(&h.one(D, &[("watched", "w")]).await), [(OK, 0)]);
    let second = h.one(D, &[("watched", "w")]).await;
    assert_eq!(overall(&second), OK);
    assert_eq!(codes(&second), [(OK, 0)]);
    // A shadow bucket that is short does not stop another descriptor from being charged.
    let both = request(
        D,
        vec![
            descriptor(&[("watched", "w")]),
            descriptor(&[("plain", "p")]),
        ],
    );
    assert_eq!(codes(&h.ask(both).await), [(OK, 0), (OK, 2)]);
}

/// `replaces` drops the named limit of another descriptor in the same request.
async fn replaces(backend: Backend) {
    let mut h = start(backend).await;
    let both = || {
        request(
            D,
            vec![
                descriptor(&[("general", "g")]),
                descriptor(&[("special", "s")]),
            ],
        )
    };
    for remaining in [4, 3, 2] {
        let response = h.ask(both()).await;
        assert_eq!(overall(&response), OK);
        // The replaced limit reports no limit, and its bucket is untouched.
        assert_eq!(codes(&response), [(OK, 0), (OK, remaining)]);
        assert_eq!(response.statuses[0].current_limit, None);
    }
    assert_eq!(codes(&h.one(D, &[("general", "g")]).await), [(OK, 0)]);
    assert_eq!(codes(&h.one(D, &[("general", "g")]).await), [(OVER, 0)]);
}

/// `share_threshold`: every value matching the wildcard shares one bucket; without it each
/// value has its own.
async fn share_threshold(backend: Backend) {
    let mut h = start(backend).await;
    assert_eq!(codes(&h.one(D, &[("route", "/api/a")]).await), [(OK, 1)]);
    assert_eq!(codes(&h.one(D, &[("route", "/api/b")]).await), [(OK, 0)]);
    assert_eq!(codes(&h.one(D, &[("route", "/api/c")]).await), [(OVER, 0)]);
    // The literal value "/api/*" is not the shared bucket either: it matches the same pattern,
    // so it shares it too.
    assert_eq!(codes(&h.one(D, &[("route", "/api/*")]).await), [(OVER, 0)]);
    assert_eq!(codes(&h.one(D, &[("route", "/web/a")]).await), [(OK, 1)]);
    assert_eq!(codes(&h.one(D, &[("route", "/web/b")]).await), [(OK, 1)]);
}

/// A client's `limit` override applies instead of the rule, even where no rule matches, but
/// never in an unknown domain.
async fn client_override(backend: Backend) {
    let mut h = start(backend).await;
    let with_override = |entries: &[(&str, &str)], domain: &str| {
        request(
            domain,
            vec![descriptor_with_override(entries, 2, RateLimitUnit::Hour)],
        )
    };
    let response = h.ask(with_override(&[("plain", "o")], D)).await;
    assert_eq!(codes(&response), [(OK, 1)]);
    let limit = response.statuses[0]
        .current_limit
        .clone()
        .expect("a current limit");
    assert_eq!(
        (limit.requests_per_unit, limit.unit),
        (2, ResponseUnit::Hour as i32)
    );
    assert_eq!(
        codes(&h.ask(with_override(&[("plain", "o")], D)).await),
        [(OK, 0)]
    );
    assert_eq!(
        codes(&h.ask(with_override(&[("plain", "o")], D)).await),
        [(OVER, 0)]
    );
    // The rule's own bucket for the same entries was not touched.
    assert_eq!(codes(&h.one(D, &[("plain", "o")]).await), [(OK, 2)]);
    // No rule for this key: the override still applies.
    assert_eq!(
        codes(&h.ask(with_override(&[("nobody", "x")], D)).await),
        [(OK, 1)]
    );
    // Unknown domain: nothing applies.
    assert_eq!(
        codes(&h.ask(with_override(&[("nobody", "x")], "elsewhere")).await),
        [(OK, 0)]
    );
    // An override without a unit is a bad request.
    let bad = request(
        D,
        vec![descriptor_with_override(
            &[("plain", "o")],
            2,
            RateLimitUnit::Unknown,
        )],
    );
    let status = h.call(bad).await.expect_err("an unknown unit is refused");
    assert_eq!(status.code(), Status::InvalidArgument);
    assert!(
        status.message().contains("descriptors[0].limit.unit"),
        "{}",
        status.message()
    );
}

/// The request's `hits_addend` (0 means 1) and a descriptor's own (0 means check only).
async fn hits_addend(backend: Backend) {
    let mut h = start(backend).await;
    let mut heavy = request(D, vec![descriptor(&[("plain", "h")])]);
    heavy.hits_addend = 2;
    assert_eq!(codes(&h.ask(heavy.clone()).await), [(OK, 1)]);
    // Two more do not fit in the one left: denied, and the one token stays.
    assert_eq!(codes(&h.ask(heavy).await), [(OVER, 1)]);
    // Check only: reports, takes nothing.
    for _ in 0..3 {
        let check = request(D, vec![descriptor_with_hits(&[("plain", "h")], 0)]);
        assert_eq!(codes(&h.ask(check).await), [(OK, 1)]);
    }
    let last = request(D, vec![descriptor_with_hits(&[("plain", "h")], 1)]);
    assert_eq!(codes(&h.ask(last).await), [(OK, 0)]);
    let check = request(D, vec![descriptor_with_hits(&[("plain", "h")], 0)]);
    assert_eq!(codes(&h.ask(check).await), [(OVER, 0)]);
    // A descriptor's own hits override the request's.
    let mut mixed = request(D, vec![descriptor_with_hits(&[("plain", "m")], 3)]);
    mixed.hits_addend = 1;
    assert_eq!(codes(&h.ask(mixed).await), [(OK, 0)]);
}

/// More hits than the capacity can never pass, and say so: no retry time.
async fn hits_above_capacity(backend: Backend) {
    let mut h = start(backend).await;
    let mut huge = request(D, vec![descriptor(&[("plain", "big")])]);
    huge.hits_addend = 4;
    let response = h.ask(huge).await;
    assert_eq!(codes(&response), [(OVER, 3)]);
    assert_eq!(header(&response, "retry-after"), None);
    // Nothing was taken.
    assert_eq!(codes(&h.one(D, &[("plain", "big")]).await), [(OK, 2)]);
}

/// Several descriptors pass all together or not at all: a denied request costs nothing.
async fn all_or_nothing(backend: Backend) {
    let mut h = start(backend).await;
    assert_eq!(h.passes(D, &[("general", "x")], 1).await, 1);
    let both = || {
        request(
            D,
            vec![
                descriptor(&[("plain", "p")]),
                descriptor(&[("general", "x")]),
            ],
        )
    };
    for _ in 0..5 {
        let response = h.ask(both()).await;
        assert_eq!(overall(&response), OVER);
        // "plain" had the tokens: its status is OK, and it keeps all three.
        assert_eq!(codes(&response), [(OK, 3), (OVER, 0)]);
    }
    assert_eq!(codes(&h.one(D, &[("plain", "p")]).await), [(OK, 2)]);
}

/// `burst` sets the capacity; the rate refills it.
async fn burst(backend: Backend) {
    let mut h = start(backend).await;
    assert_eq!(h.passes(D, &[("bursty", "b")], 7).await, 5);
    h.advance_ms(1_000);
    assert_eq!(h.passes(D, &[("bursty", "b")], 3).await, 1);
    h.advance_ms(2_500);
    assert_eq!(h.passes(D, &[("bursty", "b")], 3).await, 2);
    h.advance_ms(60_000);
    let response = h.one(D, &[("bursty", "b")]).await;
    assert_eq!(codes(&response), [(OK, 4)]);
    assert_eq!(
        response.statuses[0]
            .current_limit
            .as_ref()
            .map(|l| l.requests_per_unit),
        Some(1)
    );
}

/// `unit_multiplier`: 2 per 10 seconds is a token every 5 seconds.
async fn unit_multiplier(backend: Backend) {
    let mut h = start(backend).await;
    assert_eq!(h.passes(D, &[("tensec", "t")], 3).await, 2);
    h.advance_ms(4_999);
    assert_eq!(h.passes(D, &[("tensec", "t")], 1).await, 0);
    h.advance_ms(1);
    let response = h.one(D, &[("tensec", "t")]).await;
    assert_eq!(codes(&response), [(OK, 0)]);
    let reset = response.statuses[0]
        .duration_until_reset
        .expect("a duration");
    assert_eq!((reset.seconds, reset.nanos), (10, 0));
}

/// A `rate_limits` list: every limit must pass; the most constrained one is reported.
async fn rate_limits_list(backend: Backend) {
    let mut h = start(backend).await;
    let response = h.one(D, &[("layered", "l")]).await;
    // 3/second leaves 2, 4/hour leaves 3: the second-limit is the tighter.
    assert_eq!(codes(&response), [(OK, 2)]);
    assert_eq!(h.passes(D, &[("layered", "l")], 3).await, 2);
    h.advance_ms(1_000);
    // The per-second bucket is full again, the hourly one holds one token.
    assert_eq!(h.passes(D, &[("layered", "l")], 3).await, 1);
    let denied = h.one(D, &[("layered", "l")]).await;
    assert_eq!(codes(&denied), [(OVER, 0)]);
    let limit = denied.statuses[0]
        .current_limit
        .clone()
        .expect("a current limit");
    assert_eq!(
        (limit.requests_per_unit, limit.unit),
        (4, ResponseUnit::Hour as i32)
    );
    // One token of 4/hour takes 900 seconds, and one of them has already gone by.
    assert_eq!(header(&denied, "retry-after"), Some("899"));
}

/// Quota-mode descriptors deny only when all of them are over.
async fn quota_mode(backend: Backend) {
    let mut h = start(backend).await;
    let both = || {
        request(
            D,
            vec![descriptor(&[("q1", "a")]), descriptor(&[("q2", "a")])],
        )
    };
    assert_eq!(h.passes(D, &[("q1", "a")], 1).await, 1);
    let response = h.ask(both()).await;
    assert_eq!(overall(&response), OK);
    assert_eq!(codes(&response), [(OVER, 0), (OK, 0)]);
    let response = h.ask(both()).await;
    assert_eq!(overall(&response), OVER);
}

/// An unknown domain limits nothing; an empty domain or descriptor list is a bad request.
async fn unknown_and_empty_domain(backend: Backend) {
    let mut h = start(backend).await;
    let response = h.one("nowhere", &[("plain", "x")]).await;
    assert_eq!(overall(&response), OK);
    assert_eq!(codes(&response), [(OK, 0)]);

    let status = h
        .call(request("", vec![descriptor(&[("plain", "x")])]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Status::InvalidArgument);
    assert_eq!(status.message(), "the domain must not be empty");

    let status = h.call(request(D, vec![])).await.unwrap_err();
    assert_eq!(status.code(), Status::InvalidArgument);
    assert_eq!(
        status.message(),
        "the request has no descriptors; at least one is required"
    );

    let status = h.call(request(D, vec![descriptor(&[])])).await.unwrap_err();
    assert_eq!(status.code(), Status::InvalidArgument);
    assert_eq!(
        status.message(),
        "descriptors[0] has no entries; at least one is required"
    );
}

/// Bounds on request size are answered with a message naming the bound.
async fn request_bounds(backend: Backend) {
    let mut h = start(backend).await;
    let many = (0..65).map(|_| descriptor(&[("plain", "x")])).collect();
    let status = h.call(request(D, many)).await.unwrap_err();
    assert_eq!(status.code(), Status::InvalidArgument);
    assert_eq!(
        status.message(),
        "the request has 65 descriptors; at most 64 are allowed"
    );

    let long = "v".repeat(4097);
    let status = h
        .call(request(D, vec![descriptor(&[("plain", &long)])]))
        .await
        .unwrap_err();
    assert_eq!(
        status.message(),
        "descriptors[0].entries[0].value is 4097 bytes; at most 4096 are allowed"
    );

    let status = h
        .call(request(D, vec![descriptor(&[("", "x")])]))
        .await
        .unwrap_err();
    assert_eq!(
        status.message(),
        "descriptors[0].entries[0].key must not be empty"
    );
}

/// Values that would share a counter if keys were joined with `_` have their own buckets.
async fn colliding_values(backend: Backend) {
    let mut h = start(backend).await;
    assert_eq!(codes(&h.one(D, &[("a", "b_c")]).await), [(OK, 0)]);
    // ("a_b", "c") joins to the same "a_b_c" in the reference service.
    assert_eq!(codes(&h.one(D, &[("a_b", "c")]).await), [(OK, 0)]);
    assert_eq!(codes(&h.one(D, &[("a", "b_c")]).await), [(OVER, 0)]);
    assert_eq!(codes(&h.one(D, &[("a_b", "c")]).await), [(OVER, 0)]);
}

/// Two descriptors in one request that are the same bucket take from it in turn.
async fn same_bucket_twice(backend: Backend) {
    let mut h = start(backend).await;
    let twice = || {
        request(
            D,
            vec![descriptor(&[("plain", "t")]), descriptor(&[("plain", "t")])],
        )
    };
    assert_eq!(codes(&h.ask(twice()).await), [(OK, 2), (OK, 1)]);
    let response = h.ask(twice()).await;
    assert_eq!(overall(&response), OVER);
    assert_eq!(codes(&h.one(D, &[("plain", "t")]).await), [(OK, 0)]);
}

/// Statuses come back in request order, one per descriptor, whatever each matched.
async fn statuses_in_request_order(backend: Backend) {
    let mut h = start(backend).await;
    let mixed = request(
        D,
        vec![
            descriptor(&[("internal", "i")]),
            descriptor(&[("nobody", "n")]),
            descriptor(&[("plain", "p")]),
            descriptor(&[("tier", "free")]),
        ],
    );
    assert_eq!(
        codes(&h.ask(mixed).await),
        [(OK, u32::MAX), (OK, 0), (OK, 2), (OK, 0)]
    );
}

/// 64 concurrent callers against one bucket of 100: exactly 100 pass.
async fn exact_under_concurrency(backend: Backend) {
    let h = start(backend).await;
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let mut client = h.client.clone();
            tokio::spawn(async move {
                let mut passed = 0;
                for _ in 0..4 {
                    let ask = request(D, vec![descriptor(&[("hundred", "shared")])]);
                    let response = client.should_rate_limit(ask).await.expect("a decision");
                    if response.into_inner().overall_code == Code::Ok as i32 {
                        passed += 1;
                    }
                }
                passed
            })
        })
        .collect();
    let mut granted = 0;
    for task in tasks {
        granted += task.await.expect("the task finishes");
    }
    assert_eq!(granted, 100);
}

macro_rules! scenarios {
    ($backend:expr => $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                super::$name($backend).await;
            }
        )*
    };
}

macro_rules! every_scenario {
    ($backend:expr) => {
        scenarios!($backend =>
            key_only_rule,
            exact_beats_wildcard_beats_key_only,
            allow_listed_value,
            depth,
            zero_requests_per_unit,
            unlimited,
            shadow_mode,
            replaces,
            share_threshold,
            client_override,
            hits_addend,
            hits_above_capacity,
            all_or_nothing,
            burst,
            unit_multiplier,
            rate_limits_list,
            quota_mode,
            unknown_and_empty_domain,
            request_bounds,
            colliding_values,
            same_bucket_twice,
            statuses_in_request_order,
            exact_under_concurrency,
        );
    };
}

mod memory {
    use super::common::Backend;
    every_scenario!(Backend::Memory);
}

mod redis {
    use super::common::Backend;
    every_scenario!(Backend::Redis);
}

mod cluster {
    use super::common::Backend;
    every_scenario!(Backend::Cluster);
}

mod sentinel {
    use super::common::Backend;
    every_scenario!(Backend::Sentinel);
}
