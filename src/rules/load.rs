//! Reading and validating rule files.
//!
//! A file is parsed into a YAML tree that remembers where each node was written, then walked
//! once; every rejection names the file, the line and column, the YAML path and the reason. A
//! set of files is rejected whole when any one of them is wrong.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use saphyr::{AnnotatedMapping, MarkedYaml, ScalarStyle, YamlData, YamlLoader};
use saphyr_parser::Parser;

use super::{Domain, Level, Limit, LimitKind, Rate, Rule, RuleSet, Unit};
use crate::key;

/// The longest period a limit may have: 100 years of seconds.
const MAX_PERIOD_SECONDS: u64 = 100 * 365 * 86_400;

const TOP_KEYS: &[&str] = &["domain", "descriptors"];
const DESCRIPTOR_KEYS: &[&str] = &[
    "key",
    "value",
    "rate_limit",
    "rate_limits",
    "descriptors",
    "shadow_mode",
    "detailed_metric",
    "value_to_metric",
    "share_threshold",
    "quota_mode",
    "metadata",
];
const RATE_LIMIT_KEYS: &[&str] = &[
    "unit",
    "requests_per_unit",
    "unlimited",
    "name",
    "replaces",
    "burst",
    "unit_multiplier",
];
const REPLACES_KEYS: &[&str] = &["name"];

/// Why a set of rule files was rejected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct RuleError {
    /// The file at fault.
    pub file: PathBuf,
    /// Line and column (both from 1) of the node at fault, when known.
    pub position: Option<(usize, usize)>,
    /// The YAML path of the node at fault, e.g. `descriptors[0].rate_limit.unit`; empty for the
    /// file as a whole.
    pub yaml_path: String,
    /// What is wrong.
    pub reason: String,
}

impl fmt::Display for RuleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some((line, column)) = self.position {
            write!(f, ":{line}:{column}")?;
        }
        if !self.yaml_path.is_empty() {
            write!(f, ": {}", self.yaml_path)?;
        }
        write!(f, ": {}", self.reason)
    }
}

/// Loads every rule file named by `paths`: files, or directories whose `*.yaml` and `*.yml`
/// files (not hidden ones) are read in name order. Symbolic links are followed, so a Kubernetes
/// ConfigMap mount reads as a plain directory.
pub fn load_paths(paths: &[PathBuf]) -> Result<RuleSet, RuleError> {
    let mut files = Vec::new();
    for path in paths {
        files.extend(rule_files(path)?);
    }
    let mut domains = Vec::new();
    let mut hash = key::FNV_START;
    for file in &files {
        let bytes =
            std::fs::read(file).map_err(|e| whole_file(file, format!("cannot read: {e}")))?;
        hash = key::fnv1a(hash, file.display().to_string().as_bytes());
        hash = key::fnv1a(hash, &bytes);
        let text = String::from_utf8(bytes)
            .map_err(|_| whole_file(file, "not UTF-8 text (is it a binary file?)".to_owned()))?;
        domains.push(load_str(file, &text)?);
    }
    let mut set = RuleSet::from_domains(domains)?;
    set.files = files;
    set.hash = format!("{hash:016x}");
    Ok(set)
}

fn rule_files(path: &Path) -> Result<Vec<PathBuf>, RuleError> {
    let meta =
        std::fs::metadata(path).map_err(|e| whole_file(path, format!("cannot read: {e}")))?;
    if !meta.is_dir() {
        return Ok(vec![path.to_owned()]);
    }
    let entries =
        std::fs::read_dir(path).map_err(|e| whole_file(path, format!("cannot list: {e}")))?;
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| whole_file(path, format!("cannot list: {e}")))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let is_yaml = name.ends_with(".yaml") || name.ends_with(".yml");
        let file = entry.path();
        if is_yaml && !name.starts_with('.') && file.is_file() {
            files.push(file);
        }
    }
    if files.is_empty() {
        return Err(whole_file(
            path,
            "the directory holds no *.yaml or *.yml file".to_owned(),
        ));
    }
    files.sort();
    Ok(files)
}

fn whole_file(file: &Path, reason: String) -> RuleError {
    RuleError {
        file: file.to_owned(),
        position: None,
        yaml_path: String::new(),
        reason,
    }
}

/// Parses and validates the text of one rule file, which defines one domain.
pub fn load_str(file: &Path, text: &str) -> Result<Domain, RuleError> {
    let mut loader = YamlLoader::<MarkedYaml>::default();
    // Keep scalars as written: a value `010` stays the text "010".
    loader.early_parse(false);
    let mut parser = Parser::new_from_str(text);
    let scanned = parser.load(&mut loader, true);
    if let Some(e) = scanned.err().as_ref().or(loader.error()) {
        let marker = e.marker();
        return Err(RuleError {
            file: file.to_owned(),
            position: Some((marker.line(), marker.col() + 1)),
            yaml_path: String::new(),
            reason: format!("invalid YAML: {}", e.info()),
        });
    }
    let docs = loader.into_documents();
    let reader = Reader { file };
    match docs.as_slice() {
        [] => Err(whole_file(
            file,
            "the file is empty; it must define a domain".to_owned(),
        )),
        [doc] => reader.domain(doc),
        [_, second, ..] => Err(reader.error(
            second,
            "",
            "the file holds several YAML documents; one is expected",
        )),
    }
}

/// Walks one file's YAML tree, building rules and naming what is wrong.
struct Reader<'f> {
    file: &'f Path,
}

type Mapping<'a> = AnnotatedMapping<'a, MarkedYaml<'a>>;

impl Reader<'_> {
    fn error(&self, node: &MarkedYaml<'_>, path: &str, reason: impl Into<String>) -> RuleError {
        let start = node.span.start;
        RuleError {
            file: self.file.to_owned(),
            position: Some((start.line(), start.col() + 1)),
            yaml_path: path.to_owned(),
            reason: reason.into(),
        }
    }

    fn domain(&self, doc: &MarkedYaml<'_>) -> Result<Domain, RuleError> {
        if is_null(doc) {
            return Err(whole_file(
                self.file,
                "the file is empty; it must define a domain".into(),
            ));
        }
        let top = self.mapping(doc, "", TOP_KEYS, "the top level")?;
        let name = match field(top, "domain") {
            None => return Err(self.error(doc, "", "`domain` is missing")),
            Some(node) => self.string(node, "domain")?,
        };
        if name.is_empty() {
            let node = field(top, "domain").unwrap_or(doc);
            return Err(self.error(node, "domain", "the domain must not be empty"));
        }
        let mut root = Level::default();
        let mut place = Vec::new();
        key::push_part(&mut place, name.as_bytes());
        if let Some(list) = field(top, "descriptors") {
            self.descriptors(list, "descriptors", (&place, &name), &mut root)?;
        }
        Ok(Domain {
            name,
            file: self.file.to_owned(),
            root,
        })
    }

    fn descriptors(
        &self,
        node: &MarkedYaml<'_>,
        path: &str,
        parent: (&[u8], &str),
        level: &mut Level,
    ) -> Result<(), RuleError> {
        if is_null(node) {
            return Ok(());
        }
        let YamlData::Sequence(items) = &node.data else {
            return Err(self.error(node, path, "`descriptors` must be a list"));
        };
        for (i, item) in items.iter().enumerate() {
            let rule = self.descriptor(item, &format!("{path}[{i}]"), parent, level)?;
            level.insert(rule);
        }
        Ok(())
    }

    fn descriptor(
        &self,
        node: &MarkedYaml<'_>,
        path: &str,
        (parent_place, parent_metric): (&[u8], &str),
        level: &Level,
    ) -> Result<Rule, RuleError> {
        let map = self.mapping(node, path, DESCRIPTOR_KEYS, "a descriptor")?;
        let key = match field(map, "key") {
            None => return Err(self.error(node, path, "`key` is missing")),
            Some(key) => self.string(key, &format!("{path}.key"))?,
        };
        if key.is_empty() {
            return Err(self.error(node, &format!("{path}.key"), "the key must not be empty"));
        }
        let value = match field(map, "value") {
            None => None,
            Some(value) => Some(self.string(value, &format!("{path}.value"))?),
        };
        // An empty value is the same as none, as in Envoy's reference service.
        let value = value.filter(|value| !value.is_empty());
        if let Some(first) = level.written(&key, value.as_deref()) {
            let what = match &value {
                Some(value) => format!("`{key}` = `{value}`"),
                None => format!("`{key}` without a value"),
            };
            let reason = format!("duplicate descriptor {what} at this level (first at {})", {
                &first.yaml_path
            });
            return Err(self.error(node, path, reason));
        }

        // As the reference service names its stats: domain.key or domain.key_value, joined.
        let metric_name = match &value {
            Some(value) => format!("{parent_metric}.{key}_{value}"),
            None => format!("{parent_metric}.{key}"),
        };
        let mut place = parent_place.to_vec();
        key::push_part(&mut place, key.as_bytes());
        match &value {
            None => key::push_part(&mut place, b"k"),
            Some(value) => key::push_part(&mut place, format!("v{value}").as_bytes()),
        }

        let flag = |name: &str| match field(map, name) {
            None => Ok(false),
            Some(node) => self.boolean(node, &format!("{path}.{name}")),
        };
        let share_threshold = flag("share_threshold")?;
        if share_threshold && !value.as_deref().is_some_and(|v| v.contains('*')) {
            let at = field(map, "share_threshold").unwrap_or(node);
            let reason = "share_threshold needs a wildcard value (one holding `*`)";
            return Err(self.error(at, &format!("{path}.share_threshold"), reason));
        }

        let mut limits = Vec::new();
        if let Some(limit) = field(map, "rate_limit").filter(|limit| !is_null(limit)) {
            limits.push(self.limit(limit, &format!("{path}.rate_limit"), &place, 0)?);
        }
        if let Some(list) = field(map, "rate_limits") {
            let list_path = format!("{path}.rate_limits");
            let items = match &list.data {
                YamlData::Sequence(items) if !items.is_empty() => items,
                _ => {
                    return Err(self.error(
                        list,
                        &list_path,
                        "`rate_limits` must be a non-empty list",
                    ));
                }
            };
            for (i, item) in items.iter().enumerate() {
                let index = limits.len();
                limits.push(self.limit(item, &format!("{list_path}[{i}]"), &place, index)?);
            }
        }
        if limits.len() > 1 && limits.iter().any(|l| l.kind == LimitKind::Unlimited) {
            let reason = "an unlimited limit cannot stand beside other limits of one descriptor";
            return Err(self.error(node, path, reason));
        }

        let metadata = match field(map, "metadata") {
            None => None,
            Some(meta) if matches!(meta.data, YamlData::Mapping(_)) => Some(to_json(meta)),
            Some(meta) => {
                return Err(self.error(meta, &format!("{path}.metadata"), "must be a mapping"));
            }
        };

        let mut children = Level::default();
        if let Some(list) = field(map, "descriptors") {
            let parent = (place.as_slice(), metric_name.as_str());
            self.descriptors(list, &format!("{path}.descriptors"), parent, &mut children)?;
        }

        Ok(Rule {
            key,
            value,
            limits,
            shadow_mode: flag("shadow_mode")?,
            quota_mode: flag("quota_mode")?,
            detailed_metric: flag("detailed_metric")?,
            value_to_metric: flag("value_to_metric")?,
            share_threshold,
            metadata,
            children,
            yaml_path: path.to_owned(),
            metric_name,
            place,
        })
    }

    fn limit(
        &self,
        node: &MarkedYaml<'_>,
        path: &str,
        rule_place: &[u8],
        index: usize,
    ) -> Result<Limit, RuleError> {
        let map = self.mapping(node, path, RATE_LIMIT_KEYS, "a rate limit")?;
        let at = |name: &str| format!("{path}.{name}");
        let unlimited = match field(map, "unlimited") {
            None => false,
            Some(flag) => self.boolean(flag, &at("unlimited"))?,
        };
        let name = match field(map, "name") {
            None => None,
            Some(name) => Some(self.string(name, &at("name"))?),
        };
        let replaces = match field(map, "replaces") {
            None => Vec::new(),
            Some(list) => self.replaces(list, &at("replaces"), name.as_deref())?,
        };
        let unit = field(map, "unit");
        let kind = if unlimited {
            for extra in ["unit", "burst", "unit_multiplier"] {
                if let Some(node) = field(map, extra) {
                    let reason = format!("an unlimited limit takes no `{extra}`");
                    return Err(self.error(node, &at(extra), reason));
                }
            }
            LimitKind::Unlimited
        } else {
            let Some(unit_node) = unit else {
                return Err(self.error(node, path, format!("`unit` is missing ({})", unit_list())));
            };
            let unit_text = self.string(unit_node, &at("unit"))?;
            let Some(unit) = Unit::parse(&unit_text) else {
                let reason = format!("unknown unit `{unit_text}` ({})", unit_list());
                return Err(self.error(unit_node, &at("unit"), reason));
            };
            // Missing means 0, which denies everything, as in Envoy's reference service.
            let requests = match field(map, "requests_per_unit") {
                None => 0,
                Some(n) => self.number(n, &at("requests_per_unit"), 0)?,
            };
            let multiplier = match field(map, "unit_multiplier") {
                None => 1,
                Some(n) => self.number(n, &at("unit_multiplier"), 1)?,
            };
            if unit.seconds() * u64::from(multiplier) > MAX_PERIOD_SECONDS {
                let reason = "the period (unit × unit_multiplier) must be at most 100 years";
                return Err(self.error(node, &at("unit_multiplier"), reason));
            }
            let burst = match field(map, "burst") {
                None => requests,
                Some(n) if requests == 0 => {
                    let reason = "requests_per_unit 0 denies everything; a burst means nothing";
                    return Err(self.error(n, &at("burst"), reason));
                }
                Some(n) => self.number(n, &at("burst"), 1)?,
            };
            LimitKind::Rate(Rate::new(requests, unit, multiplier, burst))
        };
        let mut id = rule_place.to_vec();
        key::push_part(&mut id, index.to_string().as_bytes());
        Ok(Limit {
            name,
            replaces,
            kind,
            id,
        })
    }

    fn replaces(
        &self,
        node: &MarkedYaml<'_>,
        path: &str,
        own_name: Option<&str>,
    ) -> Result<Vec<String>, RuleError> {
        let YamlData::Sequence(items) = &node.data else {
            return Err(self.error(node, path, "`replaces` must be a list of `name:` entries"));
        };
        let mut names = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let item_path = format!("{path}[{i}]");
            let map = self.mapping(item, &item_path, REPLACES_KEYS, "a `replaces` entry")?;
            let name = match field(map, "name") {
                Some(name) => self.string(name, &format!("{item_path}.name"))?,
                None => String::new(),
            };
            if name.is_empty() {
                return Err(self.error(item, &item_path, "a `replaces` entry needs a name"));
            }
            if own_name == Some(name.as_str()) {
                let reason = format!("limit `{name}` cannot replace itself");
                return Err(self.error(item, &item_path, reason));
            }
            names.push(name);
        }
        Ok(names)
    }

    /// The node as a mapping whose keys are all among `allowed`.
    fn mapping<'n, 'a>(
        &self,
        node: &'n MarkedYaml<'a>,
        path: &str,
        allowed: &[&str],
        what: &str,
    ) -> Result<&'n Mapping<'a>, RuleError> {
        let YamlData::Mapping(map) = &node.data else {
            return Err(self.error(node, path, format!("{what} must be a mapping")));
        };
        for key in map.keys() {
            let name = scalar(key).unwrap_or_default();
            if !allowed.contains(&name) {
                let expected = allowed.join(", ");
                let reason =
                    format!("unknown key `{name}` in {what} (expected one of: {expected})");
                let key_path = if path.is_empty() {
                    name.to_owned()
                } else {
                    format!("{path}.{name}")
                };
                return Err(self.error(key, &key_path, reason));
            }
        }
        Ok(map)
    }

    fn string(&self, node: &MarkedYaml<'_>, path: &str) -> Result<String, RuleError> {
        if is_null(node) {
            return Ok(String::new());
        }
        scalar(node)
            .map(str::to_owned)
            .ok_or_else(|| self.error(node, path, "must be text"))
    }

    fn boolean(&self, node: &MarkedYaml<'_>, path: &str) -> Result<bool, RuleError> {
        // YAML 1.1 spellings too, which Envoy's reference service accepts.
        match plain(node) {
            Some("true" | "True" | "TRUE" | "yes" | "Yes" | "YES" | "on" | "On" | "ON") => Ok(true),
            Some("false" | "False" | "FALSE" | "no" | "No" | "NO" | "off" | "Off" | "OFF") => {
                Ok(false)
            }
            _ => Err(self.error(node, path, "must be true or false")),
        }
    }

    fn number(&self, node: &MarkedYaml<'_>, path: &str, min: u32) -> Result<u32, RuleError> {
        let text = scalar(node).unwrap_or_default().replace('_', "");
        let reason = || format!("must be a whole number from {min} to {}", u32::MAX);
        let digits = text.strip_prefix('+').unwrap_or(&text);
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(self.error(node, path, reason()));
        }
        match digits.parse::<u32>() {
            Ok(n) if n >= min => Ok(n),
            _ => Err(self.error(node, path, reason())),
        }
    }
}

fn unit_list() -> String {
    let names: Vec<&str> = Unit::ALL.iter().map(|unit| unit.name()).collect();
    format!("expected one of: {}", names.join(", "))
}

fn field<'n, 'a>(map: &'n Mapping<'a>, name: &str) -> Option<&'n MarkedYaml<'a>> {
    map.iter()
        .find(|(key, _)| scalar(key) == Some(name))
        .map(|(_, value)| value)
}

/// The text of a scalar node, however it was quoted.
fn scalar<'n>(node: &'n MarkedYaml<'_>) -> Option<&'n str> {
    match &node.data {
        YamlData::Representation(text, _, _) => Some(text),
        YamlData::Tagged(_, inner) => scalar(inner),
        _ => None,
    }
}

/// The text of an unquoted scalar node.
fn plain<'n>(node: &'n MarkedYaml<'_>) -> Option<&'n str> {
    match &node.data {
        YamlData::Representation(text, ScalarStyle::Plain, _) => Some(text),
        _ => None,
    }
}

fn is_null(node: &MarkedYaml<'_>) -> bool {
    matches!(plain(node), Some("" | "~" | "null" | "Null" | "NULL"))
}

/// A YAML tree as JSON, for rule metadata: plain scalars become numbers, booleans or null where
/// they read as such, everything else text.
fn to_json(node: &MarkedYaml<'_>) -> serde_json::Value {
    use serde_json::Value;
    match &node.data {
        YamlData::Mapping(map) => {
            let object: serde_json::Map<String, Value> = map
                .iter()
                .map(|(k, v)| (scalar(k).unwrap_or_default().to_owned(), to_json(v)))
                .collect();
            Value::Object(object)
        }
        YamlData::Sequence(items) => Value::Array(items.iter().map(to_json).collect()),
        _ if is_null(node) => Value::Null,
        _ => {
            let text = scalar(node).unwrap_or_default();
            match plain(node) {
                Some("true") => Value::Bool(true),
                Some("false") => Value::Bool(false),
                Some(p) => serde_json::from_str::<serde_json::Number>(p)
                    .map(Value::Number)
                    .unwrap_or_else(|_| Value::String(text.to_owned())),
                None => Value::String(text.to_owned()),
            }
        }
    }
}

impl RuleSet {
    /// Builds a rule set from domains already loaded, rejecting a domain defined twice.
    pub fn from_domains(domains: Vec<Domain>) -> Result<RuleSet, RuleError> {
        let mut map: HashMap<String, Domain> = HashMap::new();
        for domain in domains {
            if let Some(other) = map.get(&domain.name) {
                let reason = format!(
                    "domain `{}` is already defined in {}",
                    domain.name,
                    other.file.display()
                );
                return Err(whole_file(&domain.file, reason));
            }
            map.insert(domain.name.clone(), domain);
        }
        Ok(RuleSet {
            domains: map,
            files: Vec::new(),
            hash: String::new(),
        })
    }
}
