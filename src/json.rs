//! The proto3 JSON form of `RateLimitRequest` and `RateLimitResponse`, for `POST /json`.
//!
//! Field names are accepted in lowerCamelCase and in their proto spelling (`hits_addend`);
//! 64-bit and 32-bit numbers as JSON numbers or strings; enums by name or number. Unknown
//! fields are refused, naming them. Responses follow proto3 JSON: camelCase names, enums by
//! name, durations as `"1.500s"`, and fields at their default value left out.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::proto::{
    Code, DescriptorStatus, Entry, RateLimitDescriptor, RateLimitOverride, RateLimitRequest,
    RateLimitResponse, RateLimitUnit, ResponseUnit,
};

/// A number written as a JSON number or a string, as proto3 JSON allows.
#[derive(Deserialize)]
#[serde(untagged)]
enum Number {
    Number(u64),
    Text(String),
}

impl Number {
    fn value(&self, field: &str) -> Result<u64, String> {
        match self {
            Number::Number(n) => Ok(*n),
            Number::Text(text) => text
                .parse()
                .map_err(|_| format!("{field}: `{text}` is not a whole number")),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Request {
    #[serde(default)]
    domain: String,
    #[serde(default)]
    descriptors: Vec<Descriptor>,
    #[serde(default, alias = "hits_addend")]
    hits_addend: Option<Number>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Descriptor {
    #[serde(default)]
    entries: Vec<DescriptorEntry>,
    #[serde(default)]
    limit: Option<Override>,
    #[serde(default, alias = "hits_addend")]
    hits_addend: Option<Number>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DescriptorEntry {
    #[serde(default)]
    key: String,
    #[serde(default)]
    value: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Override {
    #[serde(default, alias = "requests_per_unit")]
    requests_per_unit: Option<Number>,
    #[serde(default)]
    unit: Option<Value>,
}

/// Reads a request from its JSON form; the error names what is wrong.
pub fn request_from_json(body: &[u8]) -> Result<RateLimitRequest, String> {
    let request: Request =
        serde_json::from_slice(body).map_err(|error| format!("invalid JSON request: {error}"))?;
    let hits_addend = match &request.hits_addend {
        None => 0,
        Some(n) => u32::try_from(n.value("hitsAddend")?)
            .map_err(|_| "hitsAddend: above 4294967295".to_owned())?,
    };
    let mut descriptors = Vec::with_capacity(request.descriptors.len());
    for (i, descriptor) in request.descriptors.iter().enumerate() {
        let entries = descriptor
            .entries
            .iter()
            .map(|e| Entry {
                key: e.key.clone(),
                value: e.value.clone(),
            })
            .collect();
        let limit = match &descriptor.limit {
            None => None,
            Some(limit) => {
                let at = format!("descriptors[{i}].limit");
                let requests = match &limit.requests_per_unit {
                    None => 0,
                    Some(n) => u32::try_from(n.value(&format!("{at}.requestsPerUnit"))?)
                        .map_err(|_| format!("{at}.requestsPerUnit: above 4294967295"))?,
                };
                let unit = match &limit.unit {
                    None => RateLimitUnit::Unknown as i32,
                    Some(unit) => unit_from_json(unit).ok_or_else(|| {
                        format!("{at}.unit: `{unit}` is not a unit (SECOND, MINUTE, …)")
                    })?,
                };
                Some(RateLimitOverride {
                    requests_per_unit: requests,
                    unit,
                })
            }
        };
        let hits_addend = match &descriptor.hits_addend {
            None => None,
            Some(n) => Some(n.value(&format!("descriptors[{i}].hitsAddend"))?),
        };
        descriptors.push(RateLimitDescriptor {
            entries,
            limit,
            hits_addend,
        });
    }
    Ok(RateLimitRequest {
        domain: request.domain,
        descriptors,
        hits_addend,
    })
}

fn unit_from_json(unit: &Value) -> Option<i32> {
    match unit {
        Value::String(name) => RateLimitUnit::from_str_name(name).map(|unit| unit as i32),
        Value::Number(n) => {
            let n = i32::try_from(n.as_i64()?).ok()?;
            RateLimitUnit::try_from(n).ok().map(|unit| unit as i32)
        }
        _ => None,
    }
}

/// The JSON form of a response.
pub fn response_to_json(response: &RateLimitResponse) -> Value {
    let mut out = Map::new();
    out.insert(
        "overallCode".into(),
        code_name(response.overall_code).into(),
    );
    if !response.statuses.is_empty() {
        let statuses = response.statuses.iter().map(status_to_json).collect();
        out.insert("statuses".into(), Value::Array(statuses));
    }
    if !response.response_headers_to_add.is_empty() {
        let headers = response
            .response_headers_to_add
            .iter()
            .map(|h| serde_json::json!({ "key": h.key, "value": h.value }))
            .collect();
        out.insert("responseHeadersToAdd".into(), Value::Array(headers));
    }
    Value::Object(out)
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct CurrentLimit<'a> {
    #[serde(skip_serializing_if = "str::is_empty")]
    name: &'a str,
    #[serde(skip_serializing_if = "is_zero")]
    requests_per_unit: u32,
    unit: &'static str,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

fn status_to_json(status: &DescriptorStatus) -> Value {
    let mut out = Map::new();
    out.insert("code".into(), code_name(status.code).into());
    if let Some(limit) = &status.current_limit {
        let unit = ResponseUnit::try_from(limit.unit).map_or("UNKNOWN", |u| u.as_str_name());
        let limit = CurrentLimit {
            name: &limit.name,
            requests_per_unit: limit.requests_per_unit,
            unit,
        };
        out.insert(
            "currentLimit".into(),
            serde_json::to_value(limit).unwrap_or_default(),
        );
    }
    if status.limit_remaining != 0 {
        out.insert("limitRemaining".into(), status.limit_remaining.into());
    }
    if let Some(duration) = &status.duration_until_reset {
        // 0, 3, 6 or 9 fractional digits, as proto3 JSON writes durations.
        let (seconds, nanos) = (duration.seconds, duration.nanos);
        let text = if nanos == 0 {
            format!("{seconds}s")
        } else if nanos % 1_000_000 == 0 {
            format!("{seconds}.{:03}s", nanos / 1_000_000)
        } else if nanos % 1_000 == 0 {
            format!("{seconds}.{:06}s", nanos / 1_000)
        } else {
            format!("{seconds}.{nanos:09}s")
        };
        out.insert("durationUntilReset".into(), text.into());
    }
    Value::Object(out)
}

fn code_name(code: i32) -> &'static str {
    Code::try_from(code).map_or("UNKNOWN", |code| code.as_str_name())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_camel_case_and_proto_names_numbers_as_strings_and_enum_names() {
        let body = br#"{"domain": "d", "hits_addend": "3", "descriptors": [
            {"entries": [{"key": "k", "value": "v"}], "hitsAddend": 0,
             "limit": {"requestsPerUnit": 5, "unit": "MINUTE"}}]}"#;
        let request = request_from_json(body).unwrap();
        assert_eq!((request.domain.as_str(), request.hits_addend), ("d", 3));
        let descriptor = &request.descriptors[0];
        assert_eq!(descriptor.hits_addend, Some(0));
        let limit = descriptor.limit.unwrap();
        assert_eq!(
            (limit.requests_per_unit, limit.unit),
            (5, RateLimitUnit::Minute as i32)
        );
    }

    #[test]
    fn names_what_is_wrong() {
        let unknown = request_from_json(br#"{"domain": "d", "descriptor": []}"#).unwrap_err();
        assert!(unknown.contains("unknown field `descriptor`"), "{unknown}");
        let unit =
            br#"{"domain": "d", "descriptors": [{"entries": [], "limit": {"unit": "FORTNIGHT"}}]}"#;
        assert_eq!(
            request_from_json(unit).unwrap_err(),
            "descriptors[0].limit.unit: `\"FORTNIGHT\"` is not a unit (SECOND, MINUTE, …)"
        );
        assert!(
            request_from_json(b"{")
                .unwrap_err()
                .starts_with("invalid JSON request")
        );
    }
}
