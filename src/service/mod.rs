//! One decision, shared by every front end: a `RateLimitRequest` in, a `RateLimitResponse` out.
//!
//! [`Limiter::decide`] validates the request, finds each descriptor's limits in the rules, drops
//! the limits that others `replaces`, turns the rest into one [`Charge`](crate::store::Charge) per bucket, lets the
//! store apply them all or nothing, and writes the statuses in request order. It knows nothing
//! of sockets or of how a store keeps its buckets.

mod answer;
mod plan;
mod validate;

pub use answer::HeaderStyle;
use answer::{no_limit, response};
use plan::plan;
use validate::validate;

use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::key::HashTag;
use crate::proto::{Code, RateLimitRequest, RateLimitResponse};
use crate::rules::RuleSet;
use crate::store::{Store, StoreError};
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
    #[tracing::instrument(name = "decide", level = "debug", skip_all, fields(
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
