//! Keeping decisions flowing while Redis is away: a circuit breaker in front of the Redis
//! store, and an in-process store that decides while the breaker is open.
//!
//! - **Closed**: decisions go to Redis. A decision whose call fails transiently (connection
//!   lost, deadline missed, failover under way) is decided again by the fallback, so it still
//!   gets an answer within one Redis deadline, and the breaker opens.
//! - **Open**: decisions go straight to the fallback, without waiting on Redis. After
//!   `probe_interval`, one decision is let through to Redis as a probe.
//! - **Probing**: the probe's success closes the breaker; its failure opens it again.
//!
//! Each change of state is logged once. What the fallback answers depends on the
//! [`FailureMode`]: `fallback` decides with in-process buckets (the memory store, whose limits
//! are scaled by `share`, e.g. 1/N for N instances), `allow` lets everything pass, `deny`
//! answers `UNAVAILABLE`.
//!
//! The fallback is the memory store, not a separate rate-limiting library: it is exact, all or
//! nothing across descriptors, and a denied request costs nothing there too, so a decision
//! means the same thing whichever store made it.
//!
//! In front of Redis sits the over-limit cache: when Redis says an enforcing bucket lacks the
//! one token a request asked for, it also says when that token will be there; until then any
//! request on that bucket is denied here, without a Redis call. For a token bucket this is
//! exact (nothing but time adds tokens), so it saves Redis the load of clients that keep
//! knocking while over their limit.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::{Charge, ChargeResult, Decision, MemoryStore, Mode, RedisStore, StoreError};
use crate::bucket::{Report, Shape};
use crate::telemetry;

/// Buckets the over-limit cache remembers at most, over all its shards.
const OVER_LIMIT_CACHE_ENTRIES: usize = 100_000;
const OVER_LIMIT_CACHE_SHARDS: usize = 16;

/// Buckets known to hold less than one token until a given instant.
struct OverLimitCache {
    origin: Instant,
    shards: Vec<Mutex<HashMap<Vec<u8>, u64>>>,
    hasher: RandomState,
}

impl OverLimitCache {
    fn new() -> OverLimitCache {
        let shards = (0..OVER_LIMIT_CACHE_SHARDS)
            .map(|_| Mutex::new(HashMap::new()))
            .collect();
        OverLimitCache {
            origin: Instant::now(),
            shards,
            hasher: RandomState::new(),
        }
    }

    fn now_us(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    fn shard(&self, key: &[u8]) -> std::sync::MutexGuard<'_, HashMap<Vec<u8>, u64>> {
        let index = (self.hasher.hash_one(key) % self.shards.len() as u64) as usize;
        // Entries are plain numbers replaced whole: a poisoned shard is still consistent.
        self.shards[index]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Microseconds until `key` holds a token, if it is known to be empty now.
    fn empty_for(&self, key: &[u8]) -> Option<u64> {
        let now = self.now_us();
        let mut shard = self.shard(key);
        match shard.get(key) {
            Some(&until) if until > now => Some(until - now),
            Some(_) => {
                shard.remove(key);
                None
            }
            None => None,
        }
    }

    /// Remembers what a Redis decision said of its enforcing buckets that lacked one token.
    fn learn(&self, charges: &[Charge], decision: &Decision) {
        let now = self.now_us();
        for (charge, result) in charges.iter().zip(&decision.results) {
            let lacks_one = charge.mode == Mode::Enforce && !result.held && charge.need() == 1;
            let until = result.report.and_then(|report| report.until_hits_us);
            if let (true, Some(until)) = (lacks_one, until) {
                let mut shard = self.shard(&charge.key);
                if shard.len() >= OVER_LIMIT_CACHE_ENTRIES / OVER_LIMIT_CACHE_SHARDS {
                    shard.retain(|_, &mut until| until > now);
                }
                if shard.len() < OVER_LIMIT_CACHE_ENTRIES / OVER_LIMIT_CACHE_SHARDS {
                    shard.insert(charge.key.clone(), now + until);
                }
            }
        }
    }

    fn clear(&self) {
        for shard in &self.shards {
            shard
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .clear();
        }
    }

    /// The denial of a request one of whose enforcing buckets is known to be empty, or `None`.
    fn deny(&self, charges: &[Charge]) -> Option<Decision> {
        // Nearly always nothing is known to be empty: then nothing is allocated.
        let mut empty: Option<Vec<Option<u64>>> = None;
        for (i, charge) in charges.iter().enumerate() {
            if charge.mode != Mode::Enforce {
                continue;
            }
            if let Some(until) = self.empty_for(&charge.key) {
                empty.get_or_insert_with(|| vec![None; charges.len()])[i] = Some(until);
            }
        }
        let empty = empty?;
        // Only the empty buckets are known; the others are reported as holding, untouched.
        let results = empty
            .iter()
            .map(|empty| match empty {
                Some(until) => ChargeResult {
                    held: false,
                    report: Some(Report {
                        remaining: 0,
                        until_full_us: *until,
                        until_hits_us: Some(*until),
                    }),
                },
                None => ChargeResult {
                    held: true,
                    report: None,
                },
            })
            .collect();
        Some(Decision {
            passed: false,
            results,
        })
    }
}

/// What to do while Redis cannot decide.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureMode {
    /// Decide with in-process buckets, each limit scaled by the share.
    Fallback,
    /// Let every request pass.
    Allow,
    /// Fail the decision: the caller gets `UNAVAILABLE`.
    Deny,
}

/// Where decisions are made now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerState {
    /// Redis.
    Closed,
    /// The fallback, since Redis failed.
    Open,
    /// The fallback, with one probe on its way to Redis.
    Probing,
}

impl BreakerState {
    /// A short name for logs, health and metrics.
    pub fn name(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::Probing => "probing",
        }
    }
}

struct Breaker {
    state: BreakerState,
    /// When the breaker last opened.
    opened: Instant,
    /// When the next probe may go.
    next_probe: Instant,
}

/// Which store a decision goes to.
enum Route {
    Redis,
    Probe,
    Fallback,
}

/// Redis behind a circuit breaker, with an in-process fallback.
pub struct Guarded {
    redis: RedisStore,
    fallback: MemoryStore,
    mode: FailureMode,
    share: f64,
    probe_interval: Duration,
    breaker: Mutex<Breaker>,
    /// Whether the breaker is closed, readable without its lock: the state of nearly every
    /// decision, which then takes no lock shared by all. Written under the lock.
    closed: AtomicBool,
    over_limit: OverLimitCache,
}

impl std::fmt::Debug for Guarded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guarded")
            .field("mode", &self.mode)
            .field("state", &self.state())
            .finish()
    }
}

impl Guarded {
    /// `redis`, falling back as `mode` says; `share` (in (0, 1]) scales the fallback's limits.
    pub fn new(
        redis: RedisStore,
        fallback: MemoryStore,
        mode: FailureMode,
        share: f64,
        probe_interval: Duration,
    ) -> Guarded {
        let now = Instant::now();
        let breaker = Breaker {
            state: BreakerState::Closed,
            opened: now,
            next_probe: now,
        };
        let share = if share.is_finite() && share > 0.0 {
            share.min(1.0)
        } else {
            1.0
        };
        Guarded {
            redis,
            fallback,
            mode,
            share,
            probe_interval,
            breaker: Mutex::new(breaker),
            closed: AtomicBool::new(true),
            over_limit: OverLimitCache::new(),
        }
    }

    /// The Redis store behind the breaker.
    pub fn redis(&self) -> &RedisStore {
        &self.redis
    }

    /// The in-process fallback store.
    pub fn fallback(&self) -> &MemoryStore {
        &self.fallback
    }

    /// Where decisions go now.
    pub fn state(&self) -> BreakerState {
        self.lock().state
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Breaker> {
        // The breaker is three plain fields written whole: a panic cannot leave it torn.
        self.breaker
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn route(&self) -> Route {
        if self.closed.load(Ordering::Acquire) {
            return Route::Redis;
        }
        let mut breaker = self.lock();
        match breaker.state {
            BreakerState::Closed => Route::Redis,
            BreakerState::Open if Instant::now() >= breaker.next_probe => {
                breaker.state = BreakerState::Probing;
                metrics::gauge!(telemetry::BREAKER_STATE).set(2.0);
                Route::Probe
            }
            BreakerState::Open | BreakerState::Probing => Route::Fallback,
        }
    }

    fn succeeded(&self) {
        if self.closed.load(Ordering::Acquire) {
            return;
        }
        let mut breaker = self.lock();
        if breaker.state != BreakerState::Closed {
            let outage_ms = breaker.opened.elapsed().as_millis();
            tracing::info!(outage_ms, "Redis answers again; deciding with Redis");
            breaker.state = BreakerState::Closed;
            self.closed.store(true, Ordering::Release);
            metrics::gauge!(telemetry::BREAKER_STATE).set(0.0);
        }
    }

    fn failed(&self, error: &StoreError) {
        let mut breaker = self.lock();
        let now = Instant::now();
        breaker.next_probe = now + self.probe_interval;
        match breaker.state {
            BreakerState::Closed => {
                breaker.opened = now;
                tracing::warn!(%error, mode = ?self.mode, "Redis failed; deciding without it");
            }
            BreakerState::Probing => {
                tracing::debug!(%error, "Redis probe failed");
            }
            BreakerState::Open => {}
        }
        breaker.state = BreakerState::Open;
        self.closed.store(false, Ordering::Release);
        metrics::gauge!(telemetry::BREAKER_STATE).set(1.0);
    }

    /// Forgets what the over-limit cache knows; for when the rules change.
    pub fn clear_over_limit_cache(&self) {
        self.over_limit.clear();
    }

    /// Decides with Redis while it answers, otherwise as the failure mode says.
    pub async fn charge(&self, charges: &[Charge]) -> Result<Decision, StoreError> {
        match self.route() {
            Route::Fallback => self.without_redis(charges, None),
            Route::Redis | Route::Probe => {
                if let Some(denied) = self.over_limit.deny(charges) {
                    metrics::counter!(telemetry::OVER_LIMIT_CACHE_HITS).increment(1);
                    return Ok(denied);
                }
                self.with_redis(charges).await
            }
        }
    }

    async fn with_redis(&self, charges: &[Charge]) -> Result<Decision, StoreError> {
        match self.redis.charge(charges).await {
            Ok(decision) => {
                self.succeeded();
                if !decision.passed {
                    self.over_limit.learn(charges, &decision);
                }
                Ok(decision)
            }
            Err(error) if error.is_transient() => {
                self.failed(&error);
                self.without_redis(charges, Some(error))
            }
            Err(error) => {
                // Not an outage (a defect, or a script error): the breaker stays as it is.
                self.succeeded();
                Err(error)
            }
        }
    }

    fn without_redis(
        &self,
        charges: &[Charge],
        error: Option<StoreError>,
    ) -> Result<Decision, StoreError> {
        metrics::counter!(telemetry::FALLBACK_DECISIONS).increment(1);
        match self.mode {
            FailureMode::Fallback if self.share >= 1.0 => Ok(self.fallback.charge(charges)),
            FailureMode::Fallback => Ok(self.fallback.charge(&self.scaled(charges))),
            FailureMode::Allow => Ok(Decision {
                passed: true,
                results: charges
                    .iter()
                    .map(|_| ChargeResult {
                        held: true,
                        report: None,
                    })
                    .collect(),
            }),
            FailureMode::Deny => Err(error.unwrap_or_else(|| {
                StoreError::Unavailable("Redis is unavailable (failure mode deny)".to_owned())
            })),
        }
    }

    /// The charges with every limit scaled by the share: R·share per period, capacity
    /// C·share, each at least 1.
    fn scaled(&self, charges: &[Charge]) -> Vec<Charge> {
        charges
            .iter()
            .map(|charge| Charge {
                shape: charge.shape.map(|shape| self.scale(shape)),
                ..charge.clone()
            })
            .collect()
    }

    fn scale(&self, shape: Shape) -> Shape {
        let scale = |n: u64| ((n as f64 * self.share).round() as u64).max(1);
        let requests = scale(shape.requests());
        Shape::new(requests, shape.period_us(), scale(shape.capacity())).unwrap_or(shape)
    }
}
