//! The rules: which limits apply to a request's descriptors.
//!
//! Rules are read from YAML files in the format of Envoy's reference rate-limit service
//! ([`load`]), validated whole, and indexed so that finding the rule of a descriptor costs one
//! hash lookup per entry (plus the wildcard patterns of that one level when no exact value
//! matches). This module does no I/O beyond reading the files, and knows nothing of buckets'
//! state, stores or the wire protocol.
//!
//! Matching at each level of the tree: the rule with the entry's exact key and value, then the
//! wildcard values of that key in file order, then the rule with the key alone. A descriptor
//! matches only a rule at exactly its depth; the rule found for its last entry decides.

mod describe;
mod glob;
mod load;

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;

pub use describe::describe;
pub use glob::Glob;
pub use load::{RuleError, load_paths, load_str};

use crate::bucket::{MICROS_PER_SECOND, Shape};

/// Every domain of the loaded rule files.
#[derive(Debug, Default)]
pub struct RuleSet {
    domains: HashMap<String, Domain>,
    files: Vec<PathBuf>,
    hash: String,
}

impl RuleSet {
    /// The rules of `domain`, if any file defines it.
    pub fn domain(&self, domain: &str) -> Option<&Domain> {
        self.domains.get(domain)
    }

    /// All domains, sorted by name.
    pub fn domains(&self) -> Vec<&Domain> {
        let mut domains: Vec<&Domain> = self.domains.values().collect();
        domains.sort_by(|a, b| a.name.cmp(&b.name));
        domains
    }

    /// The files the rules were read from.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// A hash of the files' names and contents (16 hex digits), to tell rule sets apart.
    pub fn hash(&self) -> &str {
        &self.hash
    }
}

/// The rules of one domain.
#[derive(Debug)]
pub struct Domain {
    /// The domain's name, as requests give it.
    pub name: String,
    /// The file that defines it.
    pub file: PathBuf,
    /// The top level of descriptors.
    pub root: Level,
}

/// A rule matched for a descriptor, with the rules met on the way to it.
#[derive(Debug)]
pub struct Found<'a> {
    /// One rule per entry of the descriptor; the last one is the match.
    pub path: Vec<&'a Rule>,
}

impl<'a> Found<'a> {
    /// The rule that decides the descriptor.
    pub fn rule(&self) -> &'a Rule {
        // A descriptor has at least one entry, so a match has at least one rule.
        self.path.last().expect("a match has at least one rule")
    }
}

impl Domain {
    /// The rule for a descriptor given as its `(key, value)` entries, outermost first.
    pub fn find<'a, 'e>(
        &'a self,
        entries: impl IntoIterator<Item = (&'e str, &'e str)>,
    ) -> Option<Found<'a>> {
        let mut level = &self.root;
        let mut path = Vec::new();
        for (key, value) in entries {
            if !path.is_empty() {
                let last: &Rule = path[path.len() - 1];
                level = &last.children;
            }
            path.push(level.find(key, value)?);
        }
        (!path.is_empty()).then_some(Found { path })
    }
}

/// The rules of one level of the tree, indexed by key.
#[derive(Debug, Default)]
pub struct Level {
    keys: HashMap<String, KeyRules>,
    /// `(key, value)` of the rules of this level in file order, for listing them.
    order: Vec<(String, Option<String>)>,
}

#[derive(Debug, Default)]
struct KeyRules {
    exact: HashMap<String, Rule>,
    wildcards: Vec<(Glob, Rule)>,
    key_only: Option<Box<Rule>>,
}

impl KeyRules {
    /// The rule written with exactly this value (`None`: the key-only rule).
    fn written(&self, value: Option<&str>) -> Option<&Rule> {
        match value {
            None => self.key_only.as_deref(),
            Some(value) => self.exact.get(value).or_else(|| {
                let mut wildcards = self.wildcards.iter().map(|(_, rule)| rule);
                wildcards.find(|rule| rule.value.as_deref() == Some(value))
            }),
        }
    }
}

impl Level {
    fn find(&self, key: &str, value: &str) -> Option<&Rule> {
        let rules = self.keys.get(key)?;
        if let Some(rule) = rules.exact.get(value) {
            return Some(rule);
        }
        if let Some((_, rule)) = rules.wildcards.iter().find(|(glob, _)| glob.matches(value)) {
            return Some(rule);
        }
        rules.key_only.as_deref()
    }

    /// The rules of this level, in file order.
    pub fn rules(&self) -> impl Iterator<Item = &Rule> {
        self.order
            .iter()
            .filter_map(|(key, value)| self.written(key, value.as_deref()))
    }

    /// The rule written with exactly this key and value, if it is at this level.
    fn written(&self, key: &str, value: Option<&str>) -> Option<&Rule> {
        self.keys.get(key)?.written(value)
    }

    fn insert(&mut self, rule: Rule) {
        self.order.push((rule.key.clone(), rule.value.clone()));
        let rules = self.keys.entry(rule.key.clone()).or_default();
        match rule
            .value
            .as_deref()
            .map(|value| (value.to_owned(), Glob::new(value)))
        {
            None => rules.key_only = Some(Box::new(rule)),
            Some((_, Some(glob))) => rules.wildcards.push((glob, rule)),
            Some((value, None)) => {
                rules.exact.insert(value, rule);
            }
        }
    }
}

/// One descriptor rule of the YAML: a key, an optional value, and what it limits.
#[derive(Debug)]
pub struct Rule {
    /// The descriptor key.
    pub key: String,
    /// The value, `None` for a rule of the key alone; may hold `*` wildcards.
    pub value: Option<String>,
    /// The limits of the descriptor; empty when the rule has none (its value is allow-listed,
    /// or it only groups deeper rules).
    pub limits: Vec<Limit>,
    /// Count and report, but never deny.
    pub shadow_mode: bool,
    /// Over limit only when every quota-mode descriptor of the request is over limit.
    pub quota_mode: bool,
    /// Metrics name the descriptor's values.
    pub detailed_metric: bool,
    /// Metrics name this level's value.
    pub value_to_metric: bool,
    /// All values matching this wildcard share one bucket.
    pub share_threshold: bool,
    /// Free-form metadata of the rule, as JSON.
    pub metadata: Option<serde_json::Value>,
    /// Rules one level deeper.
    pub children: Level,
    /// Where the rule is written: its YAML path, e.g. `descriptors[0].descriptors[2]`.
    pub yaml_path: String,
    /// The rule's name in metrics: the domain, then `key` or `key_value` of each rule from
    /// the top down, joined with `.` (e.g. `web.remote_address.path_/login`). One per rule,
    /// so metrics stay as few as the rules.
    pub metric_name: String,
    /// The rule's place in the tree as unambiguous bytes (keys and values from the root down),
    /// used to name its buckets.
    pub place: Vec<u8>,
}

/// One limit of a rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limit {
    /// The limit's name, for `replaces` and for metrics.
    pub name: Option<String>,
    /// Names of limits this one replaces when both match one request.
    pub replaces: Vec<String>,
    /// What the limit allows.
    pub kind: LimitKind,
    /// Identity of the limit within the rules (its rule's place and its index), stable across
    /// changes of its numbers; part of its buckets' keys.
    pub id: Vec<u8>,
}

/// What a limit allows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LimitKind {
    /// Everything passes, no bucket is kept.
    Unlimited,
    /// `requests_per_unit` requests per `unit × unit_multiplier`, with `burst` tokens at most.
    Rate(Rate),
}

/// The numbers of a token-bucket limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    /// Requests per period; 0 denies everything.
    pub requests_per_unit: u32,
    /// The time unit.
    pub unit: Unit,
    /// The period is `unit × unit_multiplier`.
    pub unit_multiplier: u32,
    /// Capacity of the bucket in tokens.
    pub burst: u32,
    /// The bucket, `None` when the limit denies everything.
    pub shape: Option<Shape>,
}

impl Rate {
    /// The rate of `requests_per_unit` per `unit × unit_multiplier`, holding `burst` tokens.
    pub fn new(requests_per_unit: u32, unit: Unit, unit_multiplier: u32, burst: u32) -> Rate {
        let period_us = unit.seconds() * u64::from(unit_multiplier) * MICROS_PER_SECOND;
        let shape = Shape::new(u64::from(requests_per_unit), period_us, u64::from(burst)).ok();
        Rate {
            requests_per_unit,
            unit,
            unit_multiplier,
            burst,
            shape,
        }
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} per ", self.requests_per_unit)?;
        if self.unit_multiplier == 1 {
            write!(f, "{}", self.unit)?;
        } else {
            write!(f, "{} {}s", self.unit_multiplier, self.unit)?;
        }
        if self.burst != self.requests_per_unit {
            write!(f, ", burst {}", self.burst)?;
        }
        Ok(())
    }
}

/// The time unit of a limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Unit {
    /// One second.
    Second,
    /// 60 seconds.
    Minute,
    /// 3 600 seconds.
    Hour,
    /// 86 400 seconds.
    Day,
    /// 7 days.
    Week,
    /// 30 days, as in Envoy's reference service.
    Month,
    /// 365 days, as in Envoy's reference service.
    Year,
}

impl Unit {
    /// All units, shortest first.
    pub const ALL: [Unit; 7] = [
        Unit::Second,
        Unit::Minute,
        Unit::Hour,
        Unit::Day,
        Unit::Week,
        Unit::Month,
        Unit::Year,
    ];

    /// The unit named `name`, ignoring case.
    pub fn parse(name: &str) -> Option<Unit> {
        Unit::ALL
            .into_iter()
            .find(|unit| unit.name().eq_ignore_ascii_case(name))
    }

    /// The unit's lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Unit::Second => "second",
            Unit::Minute => "minute",
            Unit::Hour => "hour",
            Unit::Day => "day",
            Unit::Week => "week",
            Unit::Month => "month",
            Unit::Year => "year",
        }
    }

    /// Length of the unit in seconds.
    pub fn seconds(self) -> u64 {
        match self {
            Unit::Second => 1,
            Unit::Minute => 60,
            Unit::Hour => 3_600,
            Unit::Day => 86_400,
            Unit::Week => 7 * 86_400,
            Unit::Month => 30 * 86_400,
            Unit::Year => 365 * 86_400,
        }
    }
}

impl fmt::Display for Unit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests;
