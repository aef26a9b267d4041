//! Loading, rejection messages and matching of rule files.

use std::path::Path;

use super::*;

fn load(text: &str) -> Result<Domain, RuleError> {
    load_str(Path::new("rules.yaml"), text)
}

/// The full message of a rejected file.
fn rejection(text: &str) -> String {
    match load(text) {
        Ok(domain) => panic!("accepted: {domain:?}"),
        Err(error) => error.to_string(),
    }
}

fn rate(limit: &Limit) -> Rate {
    match limit.kind {
        LimitKind::Rate(rate) => rate,
        LimitKind::Unlimited => panic!("unlimited"),
    }
}

/// The `(key, value)` of the rule a descriptor matches, or `None`.
fn matched(domain: &Domain, entries: &[(&str, &str)]) -> Option<(String, Option<String>)> {
    let found = domain.find(entries.iter().copied())?;
    Some((found.rule().key.clone(), found.rule().value.clone()))
}

const MATCHING: &str = "
domain: d
descriptors:
  - key: k
    rate_limit: {unit: second, requests_per_unit: 1}
  - key: k
    value: exact
    rate_limit: {unit: second, requests_per_unit: 2}
  - key: k
    value: ex*
    rate_limit: {unit: second, requests_per_unit: 3}
  - key: k
    value: e*
    rate_limit: {unit: second, requests_per_unit: 4}
  - key: k
    value: allowed
  - key: outer
    descriptors:
      - key: inner
        rate_limit: {unit: minute, requests_per_unit: 5}
";

#[test]
fn exact_beats_wildcard_beats_key_only() {
    let domain = load(MATCHING).unwrap();
    let some = |v: &str| Some(("k".to_owned(), Some(v.to_owned())));
    assert_eq!(matched(&domain, &[("k", "exact")]), some("exact"));
    assert_eq!(matched(&domain, &[("k", "exactly")]), some("ex*"));
    assert_eq!(matched(&domain, &[("k", "eve")]), some("e*"));
    assert_eq!(
        matched(&domain, &[("k", "other")]),
        Some(("k".to_owned(), None))
    );
    assert_eq!(matched(&domain, &[("nope", "x")]), None);
}

#[test]
fn an_allow_listed_value_has_no_limit_and_no_fallback() {
    let domain = load(MATCHING).unwrap();
    let found = domain.find([("k", "allowed")]).unwrap();
    assert!(found.rule().limits.is_empty());
}

#[test]
fn a_descriptor_matches_only_at_its_own_depth() {
    let domain = load(MATCHING).unwrap();
    assert!(
        domain
            .find([("outer", "x")])
            .unwrap()
            .rule()
            .limits
            .is_empty()
    );
    let found = domain.find([("outer", "x"), ("inner", "y")]).unwrap();
    assert_eq!(rate(&found.rule().limits[0]).requests_per_unit, 5);
    assert!(
        domain
            .find([("outer", "x"), ("inner", "y"), ("deeper", "z")])
            .is_none()
    );
    assert!(domain.find([("k", "exact"), ("inner", "y")]).is_none());
}

#[test]
fn reads_every_field_of_the_reference_format() {
    let domain = load(
        "
domain: full
descriptors:
  - key: a
    value: v*
    shadow_mode: true
    quota_mode: true
    detailed_metric: true
    value_to_metric: true
    share_threshold: true
    metadata: {team: payments, tier: 2}
    rate_limit:
      name: per_a
      unit: HOUR
      requests_per_unit: 100
      replaces:
        - name: other
  - key: b
    rate_limit:
      unlimited: true
",
    )
    .unwrap();
    let a = domain.find([("a", "vx")]).unwrap().rule();
    assert!(a.shadow_mode && a.quota_mode && a.detailed_metric);
    assert!(a.value_to_metric && a.share_threshold);
    assert_eq!(
        a.metadata,
        Some(serde_json::json!({"team": "payments", "tier": 2}))
    );
    let limit = &a.limits[0];
    assert_eq!(limit.name.as_deref(), Some("per_a"));
    assert_eq!(limit.replaces, vec!["other".to_owned()]);
    let rate = rate(limit);
    assert_eq!(
        (rate.requests_per_unit, rate.unit, rate.burst),
        (100, Unit::Hour, 100)
    );
    let b = domain.find([("b", "x")]).unwrap().rule();
    assert_eq!(b.limits[0].kind, LimitKind::Unlimited);
}

#[test]
fn reads_the_extensions() {
    let domain = load(
        "
domain: ext
descriptors:
  - key: a
    rate_limit: {unit: second, unit_multiplier: 10, requests_per_unit: 5, burst: 50}
    rate_limits:
      - {unit: hour, requests_per_unit: 1000}
",
    )
    .unwrap();
    let limits = &domain.find([("a", "x")]).unwrap().rule().limits;
    assert_eq!(limits.len(), 2);
    let first = rate(&limits[0]);
    assert_eq!((first.unit_multiplier, first.burst), (10, 50));
    assert_eq!(rate(&limits[1]).unit, Unit::Hour);
    assert_ne!(limits[0].id, limits[1].id);
}

#[test]
fn missing_requests_per_unit_denies_everything() {
    let domain = load("domain: d\ndescriptors:\n  - key: a\n    rate_limit: {unit: second}\n");
    let domain = domain.unwrap();
    let rate = rate(&domain.find([("a", "x")]).unwrap().rule().limits[0]);
    assert_eq!(rate.requests_per_unit, 0);
    assert_eq!(rate.shape, None);
}

#[test]
fn an_empty_value_is_no_value_and_an_empty_rate_limit_is_no_limit() {
    let domain = load("domain: d\ndescriptors:\n  - key: a\n    value: ''\n    rate_limit:\n");
    let domain = domain.unwrap();
    let rule = domain.find([("a", "anything")]).unwrap().rule();
    assert_eq!(rule.value, None);
    assert!(rule.limits.is_empty());
}

#[test]
fn yaml_anchors_and_old_style_booleans_load() {
    let domain = load(
        "
domain: d
descriptors:
  - key: a
    shadow_mode: yes
    rate_limit: &per_second {unit: second, requests_per_unit: 7}
  - key: b
    rate_limit: *per_second
",
    )
    .unwrap();
    assert!(domain.find([("a", "x")]).unwrap().rule().shadow_mode);
    let b = domain.find([("b", "x")]).unwrap().rule();
    assert_eq!(rate(&b.limits[0]).requests_per_unit, 7);
}

#[test]
fn keys_name_the_place_not_the_numbers() {
    let before = load(
        "domain: d\ndescriptors:\n  - key: a\n    rate_limit: {unit: second, requests_per_unit: 1}\n",
    );
    let after = load(
        "domain: d\ndescriptors:\n  - key: a\n    rate_limit: {unit: hour, requests_per_unit: 9}\n",
    );
    let id = |d: Domain| d.find([("a", "x")]).unwrap().rule().limits[0].id.clone();
    assert_eq!(id(before.unwrap()), id(after.unwrap()));
}

#[test]
fn rejects_invalid_yaml() {
    assert_eq!(
        rejection("domain: d\ndescriptors: [\n"),
        "rules.yaml:3:1: invalid YAML: while parsing a node, did not find expected node content"
    );
}

#[test]
fn rejects_an_empty_file() {
    assert_eq!(
        rejection(""),
        "rules.yaml: the file is empty; it must define a domain"
    );
    assert_eq!(
        rejection("# only a comment\n"),
        "rules.yaml: the file is empty; it must define a domain"
    );
}

#[test]
fn rejects_a_top_level_that_is_not_a_mapping() {
    assert_eq!(
        rejection("- a\n- b\n"),
        "rules.yaml:1:1: the top level must be a mapping"
    );
}

#[test]
fn rejects_several_documents() {
    assert_eq!(
        rejection("domain: a\n---\ndomain: b\n"),
        "rules.yaml:3:1: the file holds several YAML documents; one is expected"
    );
}

#[test]
fn rejects_a_missing_or_empty_domain() {
    assert_eq!(
        rejection("descriptors: []\n"),
        "rules.yaml:1:1: `domain` is missing"
    );
    assert_eq!(
        rejection("domain: ''\n"),
        "rules.yaml:1:9: domain: the domain must not be empty"
    );
}

#[test]
fn rejects_unknown_keys_at_every_level() {
    assert_eq!(
        rejection("domain: d\nname: x\n"),
        "rules.yaml:2:1: name: unknown key `name` in the top level \
         (expected one of: domain, descriptors)"
    );
    assert_eq!(
        rejection("domain: d\ndescriptors:\n  - key: a\n    unit: second\n"),
        "rules.yaml:4:5: descriptors[0].unit: unknown key `unit` in a descriptor (expected one \
         of: key, value, rate_limit, rate_limits, descriptors, shadow_mode, detailed_metric, \
         value_to_metric, share_threshold, quota_mode, metadata)"
    );
    assert_eq!(
        rejection("domain: d\ndescriptors:\n  - key: a\n    rate_limit: {unit: second, rps: 1}\n"),
        "rules.yaml:4:32: descriptors[0].rate_limit.rps: unknown key `rps` in a rate limit \
         (expected one of: unit, requests_per_unit, unlimited, name, replaces, burst, \
         unit_multiplier)"
    );
}

#[test]
fn rejects_a_missing_or_empty_key() {
    assert_eq!(
        rejection("domain: d\ndescriptors:\n  - value: a\n"),
        "rules.yaml:3:5: descriptors[0]: `key` is missing"
    );
    assert_eq!(
        rejection("domain: d\ndescriptors:\n  - key: ''\n"),
        "rules.yaml:3:5: descriptors[0].key: the key must not be empty"
    );
}

#[test]
fn rejects_descriptors_that_are_not_a_list_of_mappings() {
    assert_eq!(
        rejection("domain: d\ndescriptors: {key: a}\n"),
        "rules.yaml:2:14: descriptors: `descriptors` must be a list"
    );
    assert_eq!(
        rejection("domain: d\ndescriptors:\n  - a\n"),
        "rules.yaml:3:5: descriptors[0]: a descriptor must be a mapping"
    );
}

#[test]
fn rejects_a_duplicate_key_and_value_at_one_level() {
    assert_eq!(
        rejection(
            "domain: d\ndescriptors:\n  - key: a\n    value: b\n  - key: c\n  - key: a\n    value: b\n"
        ),
        "rules.yaml:6:5: descriptors[2]: duplicate descriptor `a` = `b` at this level \
         (first at descriptors[0])"
    );
    assert_eq!(
        rejection("domain: d\ndescriptors:\n  - key: a\n  - key: a\n"),
        "rules.yaml:4:5: descriptors[1]: duplicate descriptor `a` without a value at this level \
         (first at descriptors[0])"
    );
}

#[test]
fn rejects_a_duplicate_yaml_key() {
    assert_eq!(
        rejection("domain: d\ndomain: e\n"),
        "rules.yaml:2:1: invalid YAML: duplicated key in mapping"
    );
}

#[test]
fn rejects_a_bad_or_missing_unit() {
    assert_eq!(
        rejection(
            "domain: d\ndescriptors:\n  - key: a\n    rate_limit: {unit: fortnight, requests_per_unit: 1}\n"
        ),
        "rules.yaml:4:24: descriptors[0].rate_limit.unit: unknown unit `fortnight` \
         (expected one of: second, minute, hour, day, week, month, year)"
    );
    assert_eq!(
        rejection("domain: d\ndescriptors:\n  - key: a\n    rate_limit: {requests_per_unit: 1}\n"),
        "rules.yaml:4:17: descriptors[0].rate_limit: `unit` is missing \
         (expected one of: second, minute, hour, day, week, month, year)"
    );
}

#[test]
fn rejects_unlimited_with_a_unit() {
    assert_eq!(
        rejection(
            "domain: d\ndescriptors:\n  - key: a\n    rate_limit: {unlimited: true, unit: second}\n"
        ),
        "rules.yaml:4:41: descriptors[0].rate_limit.unit: an unlimited limit takes no `unit`"
    );
}

#[test]
fn rejects_unlimited_beside_other_limits() {
    assert_eq!(
        rejection(
            "domain: d\ndescriptors:\n  - key: a\n    rate_limit: {unlimited: true}\n    \
             rate_limits: [{unit: second, requests_per_unit: 1}]\n"
        ),
        "rules.yaml:3:5: descriptors[0]: an unlimited limit cannot stand beside other limits \
         of one descriptor"
    );
}

#[test]
fn rejects_replaces_naming_itself_or_nothing() {
    let text = "domain: d\ndescriptors:\n  - key: a\n    rate_limit:\n      name: x\n      \
                unit: second\n      requests_per_unit: 1\n      replaces:\n        - name: x\n";
    assert_eq!(
        rejection(text),
        "rules.yaml:9:11: descriptors[0].rate_limit.replaces[0]: limit `x` cannot replace itself"
    );
    let text = "domain: d\ndescriptors:\n  - key: a\n    rate_limit:\n      unit: second\n      \
                requests_per_unit: 1\n      replaces:\n        - name: ''\n";
    assert_eq!(
        rejection(text),
        "rules.yaml:8:11: descriptors[0].rate_limit.replaces[0]: a `replaces` entry needs a name"
    );
}

#[test]
fn rejects_share_threshold_without_a_wildcard() {
    assert_eq!(
        rejection("domain: d\ndescriptors:\n  - key: a\n    value: b\n    share_threshold: true\n"),
        "rules.yaml:5:22: descriptors[0].share_threshold: share_threshold needs a wildcard \
         value (one holding `*`)"
    );
}

#[test]
fn rejects_bad_numbers() {
    let limit = |body: &str| {
        rejection(&format!(
            "domain: d\ndescriptors:\n  - key: a\n    rate_limit: {{{body}}}\n"
        ))
    };
    assert_eq!(
        limit("unit: second, requests_per_unit: -1"),
        "rules.yaml:4:51: descriptors[0].rate_limit.requests_per_unit: must be a whole number \
         from 0 to 4294967295"
    );
    assert_eq!(
        limit("unit: second, requests_per_unit: 1.5"),
        "rules.yaml:4:51: descriptors[0].rate_limit.requests_per_unit: must be a whole number \
         from 0 to 4294967295"
    );
    assert_eq!(
        limit("unit: second, requests_per_unit: 5, burst: 0"),
        "rules.yaml:4:61: descriptors[0].rate_limit.burst: must be a whole number \
         from 1 to 4294967295"
    );
    assert_eq!(
        limit("unit: second, requests_per_unit: 0, burst: 3"),
        "rules.yaml:4:61: descriptors[0].rate_limit.burst: requests_per_unit 0 denies \
         everything; a burst means nothing"
    );
    assert_eq!(
        limit("unit: year, unit_multiplier: 101, requests_per_unit: 1"),
        "rules.yaml:4:17: descriptors[0].rate_limit.unit_multiplier: the period \
         (unit × unit_multiplier) must be at most 100 years"
    );
}

#[test]
fn rejects_bad_flags_and_metadata() {
    assert_eq!(
        rejection("domain: d\ndescriptors:\n  - key: a\n    shadow_mode: maybe\n"),
        "rules.yaml:4:18: descriptors[0].shadow_mode: must be true or false"
    );
    assert_eq!(
        rejection("domain: d\ndescriptors:\n  - key: a\n    metadata: [1]\n"),
        "rules.yaml:4:15: descriptors[0].metadata: must be a mapping"
    );
}

#[test]
fn rejects_an_empty_rate_limits_list() {
    assert_eq!(
        rejection("domain: d\ndescriptors:\n  - key: a\n    rate_limits: []\n"),
        "rules.yaml:4:18: descriptors[0].rate_limits: `rate_limits` must be a non-empty list"
    );
}

#[test]
fn rejects_a_domain_defined_twice_and_binary_files() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.yaml"), "domain: same\n").unwrap();
    std::fs::write(dir.path().join("b.yml"), "domain: same\n").unwrap();
    let error = load_paths(&[dir.path().to_owned()]).unwrap_err();
    assert_eq!(
        error.to_string(),
        format!(
            "{}: domain `same` is already defined in {}",
            dir.path().join("b.yml").display(),
            dir.path().join("a.yaml").display()
        )
    );
    std::fs::write(dir.path().join("b.yml"), [0xff, 0xfe, 0x00, 0x01]).unwrap();
    let error = load_paths(&[dir.path().to_owned()]).unwrap_err();
    assert_eq!(
        error.to_string(),
        format!(
            "{}: not UTF-8 text (is it a binary file?)",
            dir.path().join("b.yml").display()
        )
    );
}

#[test]
fn loads_a_directory_in_name_order_skipping_other_files() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("b.yaml"), "domain: b\n").unwrap();
    std::fs::write(dir.path().join("a.yml"), "domain: a\n").unwrap();
    std::fs::write(dir.path().join("notes.txt"), "not rules").unwrap();
    std::fs::write(dir.path().join(".hidden.yaml"), "broken: [").unwrap();
    let set = load_paths(&[dir.path().to_owned()]).unwrap();
    let names: Vec<&str> = set.domains().iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, ["a", "b"]);
    assert_eq!(set.files().len(), 2);
}

#[test]
fn rejects_an_empty_directory() {
    let dir = tempfile::tempdir().unwrap();
    let error = load_paths(&[dir.path().to_owned()]).unwrap_err();
    assert_eq!(
        error.to_string(),
        format!(
            "{}: the directory holds no *.yaml or *.yml file",
            dir.path().display()
        )
    );
}
