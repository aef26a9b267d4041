//! The parts of a response: one status per descriptor, and the headers to add.

use crate::bucket::{MICROS_PER_SECOND, Report};
use crate::proto::{
    Code, DescriptorStatus, HeaderValue, RateLimit, RateLimitResponse, ResponseUnit,
};
use crate::rules::{Rate, Unit};
use crate::store::ChargeResult;

pub(super) fn response_unit(unit: Unit) -> ResponseUnit {
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
pub(super) fn limited_status(
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
pub(super) fn rate_limit_headers(
    statuses: &[DescriptorStatus],
    style: HeaderStyle,
) -> Vec<HeaderValue> {
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

pub(super) fn duration(us: u64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(us / MICROS_PER_SECOND).unwrap_or(i64::MAX),
        // Below 10⁹, so it fits.
        nanos: ((us % MICROS_PER_SECOND) * 1_000) as i32,
    }
}

pub(super) fn no_limit() -> DescriptorStatus {
    DescriptorStatus {
        code: Code::Ok as i32,
        ..Default::default()
    }
}

pub(super) fn response(
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
