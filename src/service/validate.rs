//! Request checks made before any rule or store is consulted: each failure names what is wrong.

use super::{Bounds, DecideError};
use crate::proto::{RateLimitRequest, RateLimitUnit};
use crate::rules::Unit;

pub(super) fn validate(request: &RateLimitRequest, bounds: &Bounds) -> Result<(), DecideError> {
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

pub(super) fn unit_of_override(unit: i32) -> Option<Unit> {
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
