//! One decision, shared by every front end: a `RateLimitRequest` in, a `RateLimitResponse` out.
//!
//! [`Limiter::decide`] validates the request, finds each descriptor's limits in the rules, drops
//! the limits that others `replaces`, turns the rest into one [`Charge`] per bucket, lets the
//! store apply them all or nothing, and writes the statuses in request order. It knows nothing
//! of sockets or of how a store keeps its buckets.

use std::collections::HashSet;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::bucket::{MICROS_PER_SECOND, Report};
use crate::key::{self, HashTag, KeyEntry};
use crate::proto::{
    Code, DescriptorStatus, HeaderValue, RateLimit, RateLimitDescriptor, RateLimitRequest,
    RateLimitResponse, RateLimitUnit, ResponseUnit,
};
use crate::rules::{Domain, Found, Limit, LimitKind, Rate, RuleSet, Unit};
use crate::store::{Charge, ChargeResult, Mode, Store, StoreError};
use crate::telemetry;

/// Bounds on the size of a request, each answered with `INVALID_ARGUMENT` when exceeded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bounds {
    /// Descriptors in one request.
    pub max_descriptors: usize,
    /// Entries in one descriptor.
    pub max_entries: usize,
    /// Bytes in the domain, and in each entry key.
    pub max_name_bytes: usize,
    /// Bytes in each entry value.
    pub max_value_bytes: usize,
}

impl Default for Bounds {
    fn default() -> Self {
        Bounds {
            max_descriptors: 64,
            max_entries: 32,
            max_name_bytes: 256,
            max_value_bytes: 4096,
        }
    }
}

/// Why a request got no decision.
#[derive(Debug, thiserror::Error)]
pub enum DecideError {
    /// The request itself is wrong; the message says how. Never worth retrying.
    #[error("{0}")]
    Invalid(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The rules and the store, answering decisions.
#[derive(Debug)]
pub struct Limiter {
    rules: ArcSwap<RuleSet>,
    store: Store,
    bounds: Bounds,
    hash_tag: HashTag,
    near_limit_ratio: f64,
    headers: HeaderStyle,
    /// Why the last reload of the rules failed, while the rules before it serve.
    rules_error: arc_swap::ArcSwapOption<String>,
}

impl Limiter {
    /// A limiter over `rules`, keeping buckets in `store`.
    pub fn new(rules: RuleSet, store: Store, bounds: Bounds) -> Limiter {
        Limiter {
            rules: ArcSwap::from_pointee(rules),
            store,
            bounds,
            hash_tag: HashTag::None,
            near_limit_ratio: 0.8,
            headers: HeaderStyle::Off,
            rules_error: arc_swap::ArcSwapOption::empty(),
        }
    }

    /// Records why the last reload failed (`None`: it succeeded).
    pub fn set_rules_error(&self, error: Option<String>) {
        self.rules_error.store(error.map(Arc::new));
    }

    /// Why the last reload failed, if it did.
    pub fn rules_error(&self) -> Option<Arc<String>> {
        self.rules_error.load_full()
    }

    /// Names buckets with this Redis Cluster hash tag (see [`HashTag`]).
    pub fn with_hash_tag(mut self, hash_tag: HashTag) -> Limiter {
        self.hash_tag = hash_tag;
        self
    }

    /// The rules in force.
    pub fn rules(&self) -> Arc<RuleSet> {
        self.rules.load_full()
    }

    /// Puts `rules` in force for every decision that starts from now on; decisions already
    /// running finish on the rules they started with.
    pub fn replace_rules(&self, rules: RuleSet) {
        self.rules.store(Arc::new(rules));
        // A changed limit may hold tokens again: what was known to be empty may not be.
        if let Store::Guarded(guarded) = &self.store {
            guarded.clear_over_limit_cache();
        }
    }

    /// The store decisions are made in.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Decides whether the request may pass, and takes its tokens if it does.
    #[tracing::instrument(name = "decide", skip_all, fields(
        domain = %request.domain,
        descriptors = request.descriptors.len(),
        store = self.store.name(),
        outcome = tracing::field::Empty,
        micros = tracing::field::Empty,
    ))]
    pub async fn decide(
        &self,
        request: &RateLimitRequest,
    ) -> Result<RateLimitResponse, DecideError> {
        let started = std::time::Instant::now();
        tracing::debug!(?request, "deciding");
        let decided = self.decide_timed(request).await;
        let outcome = match &decided {
            Ok(response) if response.overall_code == Code::OverLimit as i32 => "over_limit",
            Ok(_) => "ok",
            Err(DecideError::Invalid(_)) => "invalid",
            Err(DecideError::Store(_)) => "store_error",
        };
        let took = started.elapsed();
        let span = tracing::Span::current();
        span.record("outcome", outcome);
        span.record("micros", took.as_micros() as u64);
        telemetry::decision(outcome, took);
        tracing::debug!(response = ?decided, "decided");
        decided
    }

    async fn decide_timed(
        &self,
        request: &RateLimitRequest,
    ) -> Result<RateLimitResponse, DecideError> {
        validate(request, &self.bounds)?;
        let rules = self.rules.load();
        let Some(domain) = rules.domain(&request.domain) else {
            // An unknown domain limits nothing; a client override needs a known domain.
            telemetry::unknown_domain();
            let statuses = request.descriptors.iter().map(|_| no_limit()).collect();
            return Ok(response(Code::Ok, statuses, Vec::new()));
        };
        let plan = plan(domain, request, self.hash_tag)?;
        let started = std::time::Instant::now();
        let decision = self.store.charge(&plan.charges).await;
        telemetry::store_call(self.store.name(), started.elapsed(), decision.is_ok());
        let decision = decision?;
        plan.record(&domain.name, &decision.results, self.near_limit_ratio);
        Ok(plan.answer(decision.passed, &decision.results, self.headers))
    }

    /// Adds the `RateLimit` headers of the most constrained limit to every answer, in `style`.
    pub fn with_response_headers(mut self, style: HeaderStyle) -> Limiter {
        self.headers = style;
        self
    }

    /// Counts a hit as near the limit when at least this share of the bucket is used.
    pub fn with_near_limit_ratio(mut self, ratio: f64) -> Limiter {
        self.near_limit_ratio = ratio;
        self
    }
}

fn validate(request: &RateLimitRequest, bounds: &Bounds) -> Result<(), DecideError> {
    let invalid = |message: String| Err(DecideError::Invalid(message));
    if request.domain.is_empty() {
        return invalid("the domain must not be empty".into());
    }
    if request.domain.len() > bounds.max_name_bytes {
        let (len, max) = (request.domain.len(), bounds.max_name_bytes);
        return invalid(format!(
            "the domain is {len} bytes; at most {max} are allowed"
        ));
    }
    if request.descriptors.is_empty() {
        return invalid("the request has no descriptors; at least one is required".into());
    }
    if request.descriptors.len() > bounds.max_descriptors {
        let (len, max) = (request.descriptors.len(), bounds.max_descriptors);
        return invalid(format!(
            "the request has {len} descriptors; at most {max} are allowed"
        ));
    }
    for (d, descriptor) in request.descriptors.iter().enumerate() {
        if descriptor.entries.is_empty() {
            return invalid(format!(
                "descriptors[{d}] has no entries; at least one is required"
            ));
        }
        if descriptor.entries.len() > bounds.max_entries {
            let (len, max) = (descriptor.entries.len(), bounds.max_entries);
            return invalid(format!(
                "descriptors[{d}] has {len} entries; at most {max} are allowed"
            ));
        }
        for (e, entry) in descriptor.entries.iter().enumerate() {
            let at = format!("descriptors[{d}].entries[{e}]");
            if entry.key.is_empty() {
                return invalid(format!("{at}.key must not be empty"));
            }
            if entry.key.len() > bounds.max_name_bytes {
                let (len, max) = (entry.key.len(), bounds.max_name_bytes);
                return invalid(format!(
                    "{at}.key is {len} bytes; at most {max} are allowed"
                ));
            }
            if entry.value.len() > bounds.max_value_bytes {
                let (len, max) = (entry.value.len(), bounds.max_value_bytes);
                return invalid(format!(
                    "{at}.value is {len} bytes; at most {max} are allowed"
                ));
            }
        }
        if let Some(limit) = &descriptor.limit
            && unit_of_override(limit.unit).is_none()
        {
            return invalid(format!(
                "descriptors[{d}].limit.unit is {}; a limit override needs a known unit",
                limit.unit
            ));
        }
    }
    Ok(())
}

fn unit_of_override(unit: i32) -> Option<Unit> {
    match RateLimitUnit::try_from(unit).ok()? {
        RateLimitUnit::Unknown => None,
        RateLimitUnit::Second => Some(Unit::Second),
        RateLimitUnit::Minute => Some(Unit::Minute),
        RateLimitUnit::Hour => Some(Unit::Hour),
        RateLimitUnit::Day => Some(Unit::Day),
        RateLimitUnit::Week => Some(Unit::Week),
        RateLimitUnit::Month => Some(Unit::Month),
        RateLimitUnit::Year => Some(Unit::Year),
    }
}

fn response_unit(unit: Unit) -> ResponseUnit {
    match unit {
        Unit::Second => ResponseUnit::Second,
        Unit::Minute => ResponseUnit::Minute,
        Unit::Hour => ResponseUnit::Hour,
        Unit::Day => ResponseUnit::Day,
        Unit::Week => ResponseUnit::Week,
        Unit::Month => ResponseUnit::Month,
        Unit::Year => ResponseUnit::Year,
    }
}

/// A limit that applies to a descriptor: one of the rules', or the client's override.
enum Applied<'r> {
    Rule(&'r Limit),
    Override(Limit),
}

impl Applied<'_> {
    fn limit(&self) -> &Limit {
        match self {
            Applied::Rule(limit) => limit,
            Applied::Override(limit) => limit,
        }
    }
}

/// What one descriptor turned into.
enum Planned {
    /// No rule limits it (or its limits were replaced).
    NoLimit,
    /// Its rule says unlimited.
    Unlimited,
    /// Token-bucket limits: charges `first..first + rates.len()` of the plan.
    Limited {
        first: usize,
        rates: Vec<(Rate, Option<String>)>,
        shadow: bool,
        /// The rule's name in metrics.
        metric: String,
        /// Hits the descriptor asked for.
        hits: u64,
    },
}

/// The charges of one request, and how to turn the store's answer into statuses.
struct Plan {
    charges: Vec<Charge>,
    descriptors: Vec<Planned>,
}

fn plan(
    domain: &Domain,
    request: &RateLimitRequest,
    hash_tag: HashTag,
) -> Result<Plan, DecideError> {
    // Find each descriptor's limits first: `replaces` acts across the whole request.
    let mut matched = Vec::with_capacity(request.descriptors.len());
    for descriptor in &request.descriptors {
        matched.push(match_descriptor(domain, descriptor));
    }
    let replaced: HashSet<&str> = matched
        .iter()
        .flat_map(|(_, applied)| applied.iter())
        .flat_map(|applied| applied.limit().replaces.iter().map(String::as_str))
        .collect();

    let mut charges = Vec::new();
    let mut descriptors = Vec::with_capacity(matched.len());
    for (index, (descriptor, (found, applied))) in
        request.descriptors.iter().zip(&matched).enumerate()
    {
        let kept: Vec<&Limit> = applied
            .iter()
            .map(Applied::limit)
            .filter(|limit| {
                limit
                    .name
                    .as_deref()
                    .is_none_or(|name| !replaced.contains(name))
            })
            .collect();
        if kept.is_empty() {
            descriptors.push(Planned::NoLimit);
            continue;
        }
        if kept.iter().any(|limit| limit.kind == LimitKind::Unlimited) {
            descriptors.push(Planned::Unlimited);
            continue;
        }
        let rule = found.as_ref().map(Found::rule);
        let shadow = rule.is_some_and(|rule| rule.shadow_mode);
        let mode = match rule {
            Some(rule) if rule.shadow_mode => Mode::Shadow,
            Some(rule) if rule.quota_mode => Mode::Quota {
                group: index as u32,
            },
            _ => Mode::Enforce,
        };
        let hits = match descriptor.hits_addend {
            Some(hits) => hits,
            None => u64::from(request.hits_addend.max(1)),
        };
        let first = charges.len();
        let mut rates = Vec::with_capacity(kept.len());
        for limit in kept {
            let LimitKind::Rate(rate) = limit.kind else {
                continue;
            };
            let key = bucket_key(
                &request.domain,
                descriptor,
                found.as_ref(),
                &limit.id,
                hash_tag,
            );
            charges.push(Charge {
                key,
                shape: rate.shape,
                hits,
                mode,
            });
            rates.push((rate, limit.name.clone()));
        }
        let metric = match found.as_ref() {
            Some(found) => metric_name(&domain.name, descriptor, found),
            None => format!("{}.override", domain.name),
        };
        descriptors.push(Planned::Limited {
            first,
            rates,
            shadow,
            metric,
            hits,
        });
    }
    Ok(Plan {
        charges,
        descriptors,
    })
}

/// The rule (if any) and the limits that apply to one descriptor.
fn match_descriptor<'r>(
    domain: &'r Domain,
    descriptor: &RateLimitDescriptor,
) -> (Option<Found<'r>>, Vec<Applied<'r>>) {
    if let Some(limit) = &descriptor.limit {
        // Validated before planning: the unit is known.
        let unit = unit_of_override(limit.unit).unwrap_or(Unit::Second);
        let requests = limit.requests_per_unit;
        let mut id = key::OVERRIDE_LIMIT_ID.to_vec();
        key::push_part(&mut id, format!("{requests}/{unit}").as_bytes());
        let kind = LimitKind::Rate(Rate::new(requests, unit, 1, requests));
        let limit = Limit {
            name: None,
            replaces: Vec::new(),
            kind,
            id,
        };
        return (None, vec![Applied::Override(limit)]);
    }
    let entries = descriptor
        .entries
        .iter()
        .map(|e| (e.key.as_str(), e.value.as_str()));
    match domain.find(entries) {
        None => (None, Vec::new()),
        Some(found) => {
            let applied = found.rule().limits.iter().map(Applied::Rule).collect();
            (Some(found), applied)
        }
    }
}

/// The rule's name in metrics for this descriptor. Values of the request appear only where a
/// rule asks: `detailed_metric` on the matched rule names every entry's value, and
/// `value_to_metric` on a rule names the value of its own level; otherwise the name is the
/// rule's own, so metrics stay as few as the rules.
fn metric_name(domain: &str, descriptor: &RateLimitDescriptor, found: &Found<'_>) -> String {
    let rule = found.rule();
    let asks = rule.detailed_metric || found.path.iter().any(|rule| rule.value_to_metric);
    if !asks {
        return rule.metric_name.clone();
    }
    let mut name = domain.to_owned();
    for (entry, level) in descriptor.entries.iter().zip(&found.path) {
        let shown = if level.share_threshold {
            level.value.as_deref()
        } else if rule.detailed_metric || level.value_to_metric {
            Some(entry.value.as_str())
        } else {
            level.value.as_deref()
        };
        name.push('.');
        name.push_str(&entry.key);
        if let Some(value) = shown {
            name.push('_');
            name.push_str(value);
        }
    }
    name
}

fn bucket_key(
    domain: &str,
    descriptor: &RateLimitDescriptor,
    found: Option<&Found<'_>>,
    limit_id: &[u8],
    hash_tag: HashTag,
) -> Vec<u8> {
    let entries: Vec<KeyEntry<'_>> = descriptor
        .entries
        .iter()
        .enumerate()
        .map(|(i, entry)| {
            let rule = found.and_then(|found| found.path.get(i));
            match rule
                .filter(|rule| rule.share_threshold)
                .and_then(|rule| rule.value.as_deref())
            {
                Some(pattern) => KeyEntry {
                    key: &entry.key,
                    value: pattern,
                    shared: true,
                },
                None => KeyEntry {
                    key: &entry.key,
                    value: &entry.value,
                    shared: false,
                },
            }
        })
        .collect();
    key::bucket_key(domain, &entries, limit_id, hash_tag)
}

impl Plan {
    /// Counts each limited descriptor's hits by outcome, per domain and rule.
    fn record(&self, domain: &str, results: &[ChargeResult], near_ratio: f64) {
        for planned in &self.descriptors {
            let Planned::Limited {
                first,
                rates,
                shadow,
                metric,
                hits,
            } = planned
            else {
                continue;
            };
            let results = &results[*first..*first + rates.len()];
            let over = results.iter().any(|result| !result.held);
            let above_capacity = rates.iter().any(|(rate, _)| *hits > u64::from(rate.burst));
            let near = !over
                && rates.iter().zip(results).any(|((rate, _), result)| {
                    let remaining = result.report.map_or(0, |report| report.remaining);
                    let capacity = f64::from(rate.burst.max(1));
                    (capacity - remaining as f64) / capacity >= near_ratio
                });
            let outcome = match (over, shadow) {
                (true, true) => telemetry::Outcome::Shadow,
                (true, false) => telemetry::Outcome::OverLimit,
                (false, _) if near => telemetry::Outcome::NearLimit,
                (false, _) => telemetry::Outcome::WithinLimit,
            };
            telemetry::rule_hits(domain, metric, *hits, outcome, above_capacity);
        }
    }

    fn answer(
        &self,
        passed: bool,
        results: &[ChargeResult],
        style: HeaderStyle,
    ) -> RateLimitResponse {
        let statuses: Vec<DescriptorStatus> = self
            .descriptors
            .iter()
            .map(|planned| match planned {
                Planned::NoLimit => no_limit(),
                Planned::Unlimited => DescriptorStatus {
                    code: Code::Ok as i32,
                    limit_remaining: u32::MAX,
                    ..Default::default()
                },
                Planned::Limited {
                    first,
                    rates,
                    shadow,
                    ..
                } => {
                    let results = &results[*first..*first + rates.len()];
                    limited_status(rates, results, *shadow)
                }
            })
            .collect();
        let mut headers = Vec::new();
        if !passed && let Some(seconds) = self.retry_after_seconds(results) {
            headers.push(HeaderValue {
                key: "retry-after".into(),
                value: seconds.to_string(),
                raw_value: Vec::new(),
            });
        }
        if style != HeaderStyle::Off {
            headers.extend(rate_limit_headers(&statuses, style));
        }
        response(
            if passed { Code::Ok } else { Code::OverLimit },
            statuses,
            headers,
        )
    }

    /// Whole seconds until every bucket that denied holds its tokens; `None` when one of them
    /// never can.
    fn retry_after_seconds(&self, results: &[ChargeResult]) -> Option<u64> {
        let mut longest = 0;
        for (charge, result) in self.charges.iter().zip(results) {
            if result.held || charge.mode == Mode::Shadow {
                continue;
            }
            longest = longest.max(result.report?.until_hits_us?);
        }
        Some(longest.div_ceil(MICROS_PER_SECOND).max(1))
    }
}

/// The status of a descriptor with token-bucket limits: the first limit that denied, else the
/// one with the fewest tokens left.
fn limited_status(
    rates: &[(Rate, Option<String>)],
    results: &[ChargeResult],
    shadow: bool,
) -> DescriptorStatus {
    let remaining = |result: &ChargeResult| result.report.map_or(0, |report| report.remaining);
    let pick = results
        .iter()
        .position(|result| !result.held)
        .or_else(|| (0..results.len()).min_by_key(|&i| remaining(&results[i])))
        .unwrap_or(0);
    let over = results.iter().any(|result| !result.held);
    let (rate, name) = &rates[pick];
    let result = &results[pick];
    let until_full_us = match result.report {
        Some(Report { until_full_us, .. }) => until_full_us,
        // A limit that denies everything never fills; its period is the honest horizon.
        None => rate.unit.seconds() * u64::from(rate.unit_multiplier) * MICROS_PER_SECOND,
    };
    DescriptorStatus {
        code: if over && !shadow {
            Code::OverLimit
        } else {
            Code::Ok
        } as i32,
        current_limit: Some(RateLimit {
            name: name.clone().unwrap_or_default(),
            requests_per_unit: rate.requests_per_unit,
            unit: response_unit(rate.unit) as i32,
        }),
        limit_remaining: u32::try_from(remaining(result)).unwrap_or(u32::MAX),
        duration_until_reset: Some(duration(until_full_us)),
        quota: None,
    }
}

/// Which `RateLimit` response headers to add, besides `retry-after` (always on OVER_LIMIT).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HeaderStyle {
    /// None.
    #[default]
    Off,
    /// `RateLimit-Limit: 10, 10;w=60`, `RateLimit-Remaining`, `RateLimit-Reset` (seconds), as
    /// in draft-polli-ratelimit-headers-03, which Envoy's own filters follow.
    Draft03,
    /// `RateLimit-Policy: "name";q=10;w=60` and `RateLimit: "name";r=4;t=5`, as in the IETF
    /// HTTPAPI working group's later drafts.
    Ietf,
}

/// The headers of the most constrained limit: the status with a limit and the fewest tokens
/// left (on a tie, the longest wait until full).
fn rate_limit_headers(statuses: &[DescriptorStatus], style: HeaderStyle) -> Vec<HeaderValue> {
    let constrained = statuses
        .iter()
        .filter_map(|s| Some((s, s.current_limit.as_ref()?, s.duration_until_reset?)))
        .min_by_key(|(s, _, reset)| (s.limit_remaining, std::cmp::Reverse(reset.seconds)));
    let Some((status, limit, reset)) = constrained else {
        return Vec::new();
    };
    let window = ResponseUnit::try_from(limit.unit).map_or(0, |unit| match unit {
        ResponseUnit::Second => 1,
        ResponseUnit::Minute => 60,
        ResponseUnit::Hour => 3_600,
        ResponseUnit::Day => 86_400,
        ResponseUnit::Week => 7 * 86_400,
        ResponseUnit::Month => 30 * 86_400,
        ResponseUnit::Year => 365 * 86_400,
        ResponseUnit::Unknown => 0,
    });
    // Whole seconds, rounded up: a client that waits this long finds the bucket full.
    let reset = u64::try_from(reset.seconds).unwrap_or(0) + u64::from(reset.nanos > 0);
    let (quota, remaining) = (limit.requests_per_unit, status.limit_remaining);
    let header = |key: &str, value: String| HeaderValue {
        key: key.into(),
        value,
        raw_value: Vec::new(),
    };
    match style {
        HeaderStyle::Off => Vec::new(),
        HeaderStyle::Draft03 => vec![
            header("RateLimit-Limit", format!("{quota}, {quota};w={window}")),
            header("RateLimit-Remaining", remaining.to_string()),
            header("RateLimit-Reset", reset.to_string()),
        ],
        HeaderStyle::Ietf => {
            let name = if limit.name.is_empty() {
                "default"
            } else {
                limit.name.as_str()
            };
            vec![
                header(
                    "RateLimit-Policy",
                    format!("\"{name}\";q={quota};w={window}"),
                ),
                header("RateLimit", format!("\"{name}\";r={remaining};t={reset}")),
            ]
        }
    }
}

fn duration(us: u64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(us / MICROS_PER_SECOND).unwrap_or(i64::MAX),
        // Below 10⁹, so it fits.
        nanos: ((us % MICROS_PER_SECOND) * 1_000) as i32,
    }
}

fn no_limit() -> DescriptorStatus {
    DescriptorStatus {
        code: Code::Ok as i32,
        ..Default::default()
    }
}

fn response(
    code: Code,
    statuses: Vec<DescriptorStatus>,
    headers: Vec<HeaderValue>,
) -> RateLimitResponse {
    RateLimitResponse {
        overall_code: code as i32,
        statuses,
        response_headers_to_add: headers,
        ..Default::default()
    }
}
