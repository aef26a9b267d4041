//! A readable summary of loaded rules, for `sluice check-config`.

use std::fmt::Write;

use super::{Level, LimitKind, Rule, RuleSet};

/// One block per domain, one line per rule, indented by depth.
pub fn describe(set: &RuleSet) -> String {
    let mut out = String::new();
    for domain in set.domains() {
        let _ = writeln!(out, "domain {} ({})", domain.name, domain.file.display());
        if domain.root.rules().next().is_none() {
            out.push_str("  (no descriptors)\n");
        }
        level(&mut out, &domain.root, 1);
    }
    out
}

fn level(out: &mut String, level_rules: &Level, depth: usize) {
    for rule in level_rules.rules() {
        let _ = writeln!(
            out,
            "{}{}: {}",
            "  ".repeat(depth),
            selector(rule),
            summary(rule)
        );
        level(out, &rule.children, depth + 1);
    }
}

fn selector(rule: &Rule) -> String {
    match &rule.value {
        Some(value) => format!("{}={}", rule.key, value),
        None => rule.key.clone(),
    }
}

fn summary(rule: &Rule) -> String {
    let mut parts: Vec<String> = rule
        .limits
        .iter()
        .map(|limit| {
            let mut text = match &limit.kind {
                LimitKind::Unlimited => "unlimited".to_owned(),
                LimitKind::Rate(rate) if rate.requests_per_unit == 0 => "denies all".to_owned(),
                LimitKind::Rate(rate) => rate.to_string(),
            };
            if let Some(name) = &limit.name {
                let _ = write!(text, " (name {name})");
            }
            if !limit.replaces.is_empty() {
                let _ = write!(text, " (replaces {})", limit.replaces.join(", "));
            }
            text
        })
        .collect();
    if parts.is_empty() {
        parts.push(if rule.children.rules().next().is_some() {
            "no limit of its own".to_owned()
        } else {
            "allow-listed (no limit)".to_owned()
        });
    }
    let flags = [
        (rule.shadow_mode, "shadow"),
        (rule.quota_mode, "quota"),
        (rule.share_threshold, "shared bucket"),
    ];
    for (on, flag) in flags {
        if on {
            parts.push(format!("[{flag}]"));
        }
    }
    parts.join("; ")
}
