//! Reloading the rules: when a rule file changes, and on demand (SIGHUP).
//!
//! The files are watched by polling their metadata, following symbolic links: a file edited in
//! place, replaced by an atomic `mv`, or swapped in by Kubernetes (which repoints the `..data`
//! symbolic link of a ConfigMap mount) all change what the paths resolve to. A new set of
//! files is validated whole first; only a valid set replaces the rules in force, atomically,
//! and decisions already running finish on the rules they started with. A set that fails keeps
//! the old rules serving, and the failure is logged once and shown by `/healthcheck`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use crate::rules;
use crate::service::Limiter;

/// What the rule paths resolve to: each file's resolved path, size and modification time.
/// Take it before loading the rules it describes, so that a change made while they load is
/// seen as a change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fingerprint(Vec<(PathBuf, PathBuf, u64, Option<SystemTime>)>);

/// The fingerprint of the files at `paths` now.
pub fn fingerprint(paths: &[PathBuf]) -> Fingerprint {
    let mut seen = Vec::new();
    for path in paths {
        let files: Vec<PathBuf> = match std::fs::read_dir(path) {
            Ok(entries) => {
                let mut files: Vec<PathBuf> = entries.flatten().map(|entry| entry.path()).collect();
                files.sort();
                files
            }
            Err(_) => vec![path.clone()],
        };
        for file in files {
            let resolved = std::fs::canonicalize(&file).unwrap_or_default();
            let (size, modified) = match std::fs::metadata(&file) {
                Ok(meta) => (meta.len(), meta.modified().ok()),
                Err(_) => (0, None),
            };
            seen.push((file, resolved, size, modified));
        }
    }
    Fingerprint(seen)
}

/// Loads the rules at `paths` and, if they are valid, puts them in force.
pub fn reload(limiter: &Limiter, paths: &[PathBuf]) -> Result<(), rules::RuleError> {
    match rules::load_paths(paths) {
        Ok(set) => {
            let domains = set.domains().len();
            let hash = set.hash().to_owned();
            let previous = limiter.rules().hash().to_owned();
            limiter.replace_rules(set);
            crate::telemetry::rules_in_force(&hash, Some(&previous));
            limiter.set_rules_error(None);
            metrics::counter!(crate::telemetry::RULES_RELOADS, "result" => "ok").increment(1);
            tracing::info!(domains, %hash, "rules reloaded");
            Ok(())
        }
        Err(error) => {
            let message = error.to_string();
            if limiter.rules_error().as_deref() != Some(&message) {
                tracing::error!(%error, "rules not reloaded; the previous rules stay in force");
            }
            limiter.set_rules_error(Some(message));
            metrics::counter!(crate::telemetry::RULES_RELOADS, "result" => "error").increment(1);
            Err(error)
        }
    }
}

/// Polls `paths` every `every` and reloads when what they resolve to differs from `last` (the
/// fingerprint taken before the rules in force were loaded), until `stop`.
pub async fn watch_files(
    limiter: Arc<Limiter>,
    paths: Vec<PathBuf>,
    mut last: Fingerprint,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|stop| *stop) => return,
        }
        let paths_now = paths.clone();
        let current = tokio::task::spawn_blocking(move || fingerprint(&paths_now)).await;
        let Ok(current) = current else { continue };
        if current != last {
            last = current;
            let _ = reload(&limiter, &paths);
        }
    }
}
