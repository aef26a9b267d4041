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

use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{Charge, ChargeResult, Decision, MemoryStore, RedisStore, StoreError};
use crate::bucket::Shape;

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
        let mut breaker = self.lock();
        match breaker.state {
            BreakerState::Closed => Route::Redis,
            BreakerState::Open if Instant::now() >= breaker.next_probe => {
                breaker.state = BreakerState::Probing;
                Route::Probe
            }
            BreakerState::Open | BreakerState::Probing => Route::Fallback,
        }
    }

    fn succeeded(&self) {
        let mut breaker = self.lock();
        if breaker.state != BreakerState::Closed {
            let outage_ms = breaker.opened.elapsed().as_millis();
            tracing::info!(outage_ms, "Redis answers again; deciding with Redis");
            breaker.state = BreakerState::Closed;
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
    }

    /// Decides with Redis while it answers, otherwise as the failure mode says.
    pub async fn charge(&self, charges: &[Charge]) -> Result<Decision, StoreError> {
        match self.route() {
            Route::Fallback => self.without_redis(charges, None),
            Route::Redis | Route::Probe => match self.redis.charge(charges).await {
                Ok(decision) => {
                    self.succeeded();
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
            },
        }
    }

    fn without_redis(
        &self,
        charges: &[Charge],
        error: Option<StoreError>,
    ) -> Result<Decision, StoreError> {
        match self.mode {
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
        if self.share >= 1.0 {
            return shape;
        }
        let scale = |n: u64| ((n as f64 * self.share).round() as u64).max(1);
        let requests = scale(shape.requests());
        Shape::new(requests, shape.period_us(), scale(shape.capacity())).unwrap_or(shape)
    }
}
