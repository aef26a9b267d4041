//! Turning a request into charges on buckets, and the store's answer into a response.

use std::borrow::Cow;
use std::collections::HashSet;

use super::DecideError;
use super::answer::{HeaderStyle, limited_status, no_limit, rate_limit_headers, response};
use super::validate::unit_of_override;
use crate::bucket::MICROS_PER_SECOND;
use crate::key::{self, HashTag, KeyEntry};
use crate::proto::{
    Code, DescriptorStatus, HeaderValue, RateLimitDescriptor, RateLimitRequest, RateLimitResponse,
};
use crate::rules::{Domain, Found, Limit, LimitKind, Rate, Unit};
use crate::store::{Charge, ChargeResult, Mode};
use crate::telemetry;

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
enum Planned<'r> {
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
        metric: Cow<'r, str>,
        /// Hits the descriptor asked for.
        hits: u64,
    },
}

/// The charges of one request, and how to turn the store's answer into statuses.
pub(super) struct Plan<'r> {
    pub(super) charges: Vec<Charge>,
    descriptors: Vec<Planned<'r>>,
}

pub(super) fn plan<'r>(
    domain: &'r Domain,
    request: &RateLimitRequest,
    hash_tag: HashTag,
) -> Result<Plan<'r>, DecideError> {
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
            None => Cow::Owned(format!("{}.override", domain.name)),
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
fn metric_name<'r>(
    domain: &str,
    descriptor: &RateLimitDescriptor,
    found: &Found<'r>,
) -> Cow<'r, str> {
    let rule = found.rule();
    let asks = rule.detailed_metric || found.path.iter().any(|rule| rule.value_to_metric);
    if !asks {
        return Cow::Borrowed(&rule.metric_name);
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
    Cow::Owned(name)
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

impl Plan<'_> {
    /// Counts each limited descriptor's hits by outcome, per domain and rule.
    pub(super) fn record(&self, domain: &str, results: &[ChargeResult], near_ratio: f64) {
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

    pub(super) fn answer(
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
