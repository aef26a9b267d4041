//! Where bucket state lives, and the all-or-nothing rule every store applies.
//!
//! A decision hands a store its [`Charge`]s: one per bucket that the request's descriptors
//! matched. The store, atomically, brings each bucket up to date, sees which hold the tokens
//! asked of them, asks [`verdict`] whether the request passes, and only then takes the tokens,
//! from every bucket that holds them. A denied request takes nothing. Stores know buckets and
//! keys only; rules and the wire protocol are the service's business.
//!
//! - [`memory`]: the embedded default, exact, in this process.
//! - [`redis`]: Redis standalone, Sentinel or Cluster, one atomic script call per decision.

pub mod fallback;
pub mod memory;
pub mod redis;
mod resp;

use crate::bucket::{Report, Shape};
pub use fallback::{BreakerState, FailureMode, Guarded};
pub use memory::MemoryStore;
pub use redis::{RedisSettings, RedisStore, Topology};

/// One bucket a decision touches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Charge {
    /// The bucket's key, from [`crate::key::bucket_key`].
    pub key: Vec<u8>,
    /// The bucket's numbers; `None` for a limit that denies everything and keeps no state.
    pub shape: Option<Shape>,
    /// Tokens to take when the request passes; 0 means check only: the bucket must hold one
    /// token, and none is taken.
    pub hits: u64,
    /// How the bucket's answer counts towards the verdict.
    pub mode: Mode,
}

impl Charge {
    /// Tokens the bucket must hold for this charge to pass.
    pub fn need(&self) -> u64 {
        self.hits.max(1)
    }
}

/// How a bucket's answer counts towards the verdict of its request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// The request passes only if this bucket holds the tokens.
    Enforce,
    /// Reported and charged, never denies.
    Shadow,
    /// One of the buckets of quota-mode descriptor `group`: quota-mode descriptors deny the
    /// request only when every one of them is short.
    Quota {
        /// The index of the descriptor in its request.
        group: u32,
    },
}

/// A store's answer for one charge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChargeResult {
    /// Whether the bucket held the tokens asked of it.
    pub held: bool,
    /// The bucket after the decision; `None` for a limit that denies everything.
    pub report: Option<Report>,
}

/// A store's answer for a whole decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// Whether the request passed, and tokens were taken.
    pub passed: bool,
    /// One result per charge, in the order of the charges.
    pub results: Vec<ChargeResult>,
}

/// Whether a request passes, given which of its charges' buckets hold their tokens.
///
/// Every enforcing bucket must hold; shadow buckets never deny; quota-mode descriptors deny
/// only when none of them holds all of its buckets.
pub fn verdict(charges: &[Charge], held: &[bool]) -> bool {
    let mut quota_groups: Vec<(u32, bool)> = Vec::new();
    for (charge, &held) in charges.iter().zip(held) {
        match charge.mode {
            Mode::Enforce if !held => return false,
            Mode::Enforce | Mode::Shadow => {}
            Mode::Quota { group } => match quota_groups.iter_mut().find(|(g, _)| *g == group) {
                Some((_, all_held)) => *all_held &= held,
                None => quota_groups.push((group, held)),
            },
        }
    }
    quota_groups.is_empty() || quota_groups.iter().any(|&(_, all_held)| all_held)
}

/// Why a store could not decide.
#[derive(Clone, Debug, thiserror::Error)]
pub enum StoreError {
    /// The store cannot be reached or did not answer in time; another attempt may succeed.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The store answered with an error that trying again will not cure.
    #[error("store failed: {0}")]
    Failed(String),
}

impl StoreError {
    /// Whether the failure may pass by itself (a connection, a timeout, a failover).
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

/// The store a service decides with.
#[derive(Debug)]
pub enum Store {
    /// Buckets in this process.
    Memory(MemoryStore),
    /// Buckets in Redis; decisions fail while it is unavailable.
    Redis(RedisStore),
    /// Buckets in Redis, with a circuit breaker and a fallback for when it is unavailable.
    Guarded(Box<Guarded>),
}

impl Store {
    /// Applies one decision's charges atomically.
    pub async fn charge(&self, charges: &[Charge]) -> Result<Decision, StoreError> {
        // The Redis futures are boxed: kept inline, their kilobyte would be copied with every
        // decision's future, whichever the store.
        match self {
            Store::Memory(memory) => Ok(memory.charge(charges)),
            Store::Redis(redis) => Box::pin(redis.charge(charges)).await,
            Store::Guarded(guarded) => Box::pin(guarded.charge(charges)).await,
        }
    }

    /// The in-memory store, if that is what this is.
    pub fn memory(&self) -> Option<&MemoryStore> {
        match self {
            Store::Memory(memory) => Some(memory),
            Store::Redis(_) => None,
            Store::Guarded(guarded) => Some(guarded.fallback()),
        }
    }

    /// The store's name, for logs and health.
    pub fn name(&self) -> &'static str {
        match self {
            Store::Memory(_) => "memory",
            Store::Redis(_) | Store::Guarded(_) => "redis",
        }
    }

    /// Where a Redis store decides now: `closed` (Redis), `open` or `probing` (the fallback);
    /// `None` for a store without a breaker.
    pub fn breaker(&self) -> Option<BreakerState> {
        match self {
            Store::Guarded(guarded) => Some(guarded.state()),
            Store::Memory(_) | Store::Redis(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn charge(mode: Mode) -> Charge {
        Charge {
            key: Vec::new(),
            shape: None,
            hits: 1,
            mode,
        }
    }

    #[test]
    fn enforcing_buckets_must_all_hold() {
        let charges = [charge(Mode::Enforce), charge(Mode::Enforce)];
        assert!(verdict(&charges, &[true, true]));
        assert!(!verdict(&charges, &[true, false]));
    }

    #[test]
    fn shadow_buckets_never_deny() {
        let charges = [charge(Mode::Enforce), charge(Mode::Shadow)];
        assert!(verdict(&charges, &[true, false]));
    }

    #[test]
    fn quota_descriptors_deny_only_when_all_are_short() {
        let q = |group| charge(Mode::Quota { group });
        let charges = [q(0), q(0), q(1)];
        assert!(verdict(&charges, &[true, true, false]));
        assert!(verdict(&charges, &[true, false, true]));
        assert!(!verdict(&charges, &[true, false, false]));
    }
}
