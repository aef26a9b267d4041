//! The in-memory store: exact buckets in this process, the embedded default.
//!
//! Buckets live in shards, each a mutex around a hash map, so that decisions on different keys
//! rarely wait for each other. A decision locks the shards of all its keys, in ascending shard
//! order so that two decisions can never wait on each other in a cycle, and holds them while it
//! reads, decides and writes: that is what makes a decision over several buckets all or nothing.
//!
//! A full bucket is the same as a missing one, so a bucket is dropped once it is full: on write
//! when a decision leaves it full, and by [`MemoryStore::sweep`] once enough time has passed.
//! Memory therefore follows the keys that are in use.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex, MutexGuard};

use super::{Charge, ChargeResult, Decision, verdict};
use crate::bucket::{Probe, State};
use crate::clock::Clock;

type Shard = HashMap<Box<[u8]>, Entry>;

#[derive(Clone, Copy, Debug)]
struct Entry {
    state: State,
    /// When the bucket will be full again, and can be forgotten.
    full_at_us: u64,
}

/// Exact token buckets in process memory.
pub struct MemoryStore {
    shards: Box<[Mutex<Shard>]>,
    hasher: RandomState,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("shards", &self.shards.len())
            .finish()
    }
}

/// The working copy of one bucket during a decision.
struct Working {
    probe: Probe,
    level: u64,
}

impl MemoryStore {
    /// An empty store with `shards` shards (at least one), reading time from `clock`.
    pub fn new(shards: usize, clock: Arc<dyn Clock>) -> MemoryStore {
        let shards = (0..shards.max(1))
            .map(|_| Mutex::new(Shard::new()))
            .collect();
        MemoryStore {
            shards,
            hasher: RandomState::new(),
            clock,
        }
    }

    fn shard_of(&self, key: &[u8]) -> usize {
        // The remainder is below the shard count, which is a usize.
        (self.hasher.hash_one(key) % self.shards.len() as u64) as usize
    }

    fn lock(&self, shard: usize) -> MutexGuard<'_, Shard> {
        // A panic while a shard was held cannot leave an entry half-written (entries are
        // replaced whole), so a poisoned shard is still consistent.
        self.shards[shard]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Applies one decision's charges atomically; see the [module doc](super).
    pub fn charge(&self, charges: &[Charge]) -> Decision {
        let shard_of: Vec<usize> = charges.iter().map(|c| self.shard_of(&c.key)).collect();
        let mut order = shard_of.clone();
        order.sort_unstable();
        order.dedup();
        let mut guards: Vec<(usize, MutexGuard<'_, Shard>)> = order
            .into_iter()
            .map(|shard| (shard, self.lock(shard)))
            .collect();
        let guard_of = |shard: usize, guards: &[(usize, MutexGuard<'_, Shard>)]| {
            guards
                .iter()
                .position(|(s, _)| *s == shard)
                .expect("every charge's shard is locked")
        };
        let now_us = self.clock.now_us();

        // Bring each bucket up to date once, even when several charges share it, then let the
        // charges take from the working copy in order, as if they came one after another.
        // Decisions touch few buckets: a short list searched in turn beats hashing.
        let mut working: Vec<(&[u8], Working)> = Vec::with_capacity(charges.len());
        let mut held = Vec::with_capacity(charges.len());
        // Per charge: the bucket as probed, and its level after this charge's tokens.
        let mut seen: Vec<Option<(Probe, u64)>> = Vec::with_capacity(charges.len());
        for (i, charge) in charges.iter().enumerate() {
            let Some(shape) = charge.shape else {
                held.push(false);
                seen.push(None);
                continue;
            };
            let found = working
                .iter()
                .position(|(key, _)| *key == charge.key.as_slice());
            let slot = found.unwrap_or_else(|| {
                let shard = &guards[guard_of(shard_of[i], &guards)].1;
                let state = shard.get(charge.key.as_slice()).map(|entry| &entry.state);
                let probe = shape.probe(state, now_us);
                let work = Working {
                    probe,
                    level: probe.level,
                };
                working.push((charge.key.as_slice(), work));
                working.len() - 1
            });
            let work = &mut working[slot].1;
            let probe = Probe {
                level: work.level,
                ..work.probe
            };
            let holds = shape.holds(&probe, charge.need());
            if holds {
                work.level -= charge.hits * shape.units_per_token();
            }
            held.push(holds);
            seen.push(Some((work.probe, work.level)));
        }

        let passed = verdict(charges, &held);
        if passed {
            for (i, charge) in charges.iter().enumerate() {
                // The first charge of each bucket writes its final level, once.
                let first = working
                    .iter()
                    .position(|(key, _)| *key == charge.key.as_slice());
                let (Some(shape), Some(first)) = (charge.shape, first) else {
                    continue;
                };
                let (_, work) = working.swap_remove(first);
                if work.level == work.probe.level {
                    continue;
                }
                let state = shape.take(
                    &Probe {
                        level: work.level,
                        ..work.probe
                    },
                    0,
                );
                let g = guard_of(shard_of[i], &guards);
                let shard = &mut guards[g].1;
                if shape.is_full(&state) {
                    shard.remove(charge.key.as_slice());
                } else {
                    let entry = Entry {
                        state,
                        full_at_us: shape.full_at_us(&state),
                    };
                    // A bucket already kept is overwritten in place: no new copy of its key.
                    match shard.get_mut(charge.key.as_slice()) {
                        Some(kept) => *kept = entry,
                        None => {
                            shard.insert(charge.key.clone().into_boxed_slice(), entry);
                        }
                    }
                }
            }
        }
        drop(guards);

        let results = charges
            .iter()
            .zip(seen)
            .zip(held)
            .map(|((charge, seen), held)| {
                let report = charge.shape.zip(seen).map(|(shape, (probe, after))| {
                    // A denied request took nothing: its buckets are as probed.
                    let level = if passed { after } else { probe.level };
                    shape.report(&probe, level, charge.need())
                });
                ChargeResult { held, report }
            })
            .collect();
        Decision { passed, results }
    }

    /// Drops every bucket that is full by now; returns how many were dropped.
    pub fn sweep(&self) -> usize {
        let now_us = self.clock.now_us();
        let mut dropped = 0;
        for shard in 0..self.shards.len() {
            let mut buckets = self.lock(shard);
            let before = buckets.len();
            buckets.retain(|_, entry| entry.full_at_us > now_us);
            dropped += before - buckets.len();
        }
        dropped
    }

    /// How many buckets are kept (buckets that are not full).
    pub fn len(&self) -> usize {
        (0..self.shards.len())
            .map(|shard| self.lock(shard).len())
            .sum()
    }

    /// Whether no bucket is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bucket::{MICROS_PER_SECOND, Shape};
    use crate::clock::ManualClock;
    use crate::store::Mode;

    fn store(clock: &Arc<ManualClock>) -> MemoryStore {
        MemoryStore::new(8, clock.clone())
    }

    fn charge(key: &str, per_second: u64, hits: u64) -> Charge {
        let shape = Shape::new(per_second, MICROS_PER_SECOND, per_second).unwrap();
        Charge {
            key: key.as_bytes().to_vec(),
            shape: Some(shape),
            hits,
            mode: Mode::Enforce,
        }
    }

    #[test]
    fn sixty_four_threads_get_exactly_the_capacity() {
        let clock = ManualClock::starting_at(0);
        let store = Arc::new(store(&clock));
        let threads: Vec<_> = (0..64)
            .map(|_| {
                let store = store.clone();
                std::thread::spawn(move || {
                    (0..10)
                        .filter(|_| store.charge(&[charge("one", 100, 1)]).passed)
                        .count()
                })
            })
            .collect();
        let granted: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(granted, 100);
    }

    #[test]
    fn a_denied_request_takes_from_no_bucket() {
        let clock = ManualClock::starting_at(0);
        let store = store(&clock);
        assert!(store.charge(&[charge("small", 2, 2)]).passed);
        let decision = store.charge(&[charge("big", 10, 1), charge("small", 2, 1)]);
        assert!(!decision.passed);
        assert_eq!(decision.results[0].report.unwrap().remaining, 10);
        assert!(decision.results[0].held && !decision.results[1].held);
        // "big" still holds all of its tokens.
        assert!(store.charge(&[charge("big", 10, 10)]).passed);
    }

    #[test]
    fn two_charges_on_one_bucket_take_in_turn() {
        let clock = ManualClock::starting_at(0);
        let store = store(&clock);
        let decision = store.charge(&[charge("same", 3, 2), charge("same", 3, 2)]);
        assert!(!decision.passed);
        let decision = store.charge(&[charge("same", 3, 2), charge("same", 3, 1)]);
        assert!(decision.passed);
        assert_eq!(decision.results[1].report.unwrap().remaining, 0);
    }

    #[test]
    fn check_only_needs_a_token_and_takes_none() {
        let clock = ManualClock::starting_at(0);
        let store = store(&clock);
        let decision = store.charge(&[charge("c", 1, 0)]);
        assert!(decision.passed);
        assert_eq!(decision.results[0].report.unwrap().remaining, 1);
        assert!(store.charge(&[charge("c", 1, 1)]).passed);
        assert!(!store.charge(&[charge("c", 1, 0)]).passed);
    }

    #[test]
    fn full_buckets_are_forgotten() {
        let clock = ManualClock::starting_at(0);
        let store = store(&clock);
        for key in ["a", "b", "c"] {
            assert!(store.charge(&[charge(key, 10, 5)]).passed);
        }
        assert_eq!(store.len(), 3);
        clock.advance(MICROS_PER_SECOND / 2 - 1);
        assert_eq!(store.sweep(), 0);
        clock.advance(1);
        assert_eq!(store.sweep(), 3);
        assert!(store.is_empty());
        // A decision that leaves a bucket full does not keep it either.
        assert!(store.charge(&[charge("d", 10, 0)]).passed);
        assert!(store.is_empty());
    }
}
