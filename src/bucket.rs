//! Token-bucket arithmetic: pure functions over integers and a time in microseconds.
//!
//! This module is the reference model of a bucket. It owns no state and reads no clock: every
//! store (memory now, the Redis script later) keeps a [`State`] per bucket and asks a [`Shape`]
//! what a decision does to it. It knows nothing of rules, descriptors or keys.
//!
//! # Representation
//!
//! A limit of `R` requests per period `P` with capacity `C` refills continuously at `R/P` tokens
//! per second. To keep that exact in integers, time is counted in *ticks* of `tick_us`
//! microseconds and tokens in *units* such that one tick adds exactly `refill_per_tick` units and
//! one token costs exactly `units_per_token` units:
//!
//! ```text
//! P_t             = P / tick_us                 (the period in ticks)
//! g               = gcd(R, P_t)
//! refill_per_tick = R / g
//! units_per_token = P_t / g
//! ```
//!
//! so `refill_per_tick / units_per_token = R / P_t` tokens per tick, with no remainder anywhere.
//! The tick is the smallest power of ten (1 µs, 10 µs, …) for which the capacity in units,
//! `C × units_per_token`, stays at or below 2⁵³: every value a bucket holds is then exact in an
//! IEEE double as well, which is what Lua numbers are inside Redis, so the script and this model
//! compute the same integers. For every limit whose `C × R / gcd` is below 2⁵³ (any `R` up to
//! 10⁶ per second with its own rate as burst, for instance) the tick is at most `P / R`, and a
//! bucket grants `C + R·t/P` tokens over `t` seconds give or take one. Beyond that the refill is
//! quantized to coarser ticks; it then lags by less than one tick and never grants more.
//!
//! A bucket that is missing is full. A bucket's [`State`] is its level in units at a tick
//! boundary, plus the unit scale it was written with, so a limit whose numbers change keeps its
//! tokens (rescaled, and clamped to the new capacity).

/// The largest integer every value of a bucket may reach: 2⁵³, exact in an IEEE double.
pub const MAX_EXACT: u64 = 1 << 53;

/// Microseconds in one second.
pub const MICROS_PER_SECOND: u64 = 1_000_000;

/// The fixed numbers of one limit: capacity and refill rate, in ticks and units.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Shape {
    requests: u64,
    period_us: u64,
    tick_us: u64,
    refill_per_tick: u64,
    units_per_token: u64,
    capacity: u64,
}

/// Why a limit's numbers cannot make a bucket.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ShapeError {
    /// `requests` was 0: such a limit denies everything and needs no bucket.
    #[error("a bucket needs at least one request per period")]
    NoRefill,
    /// The capacity was 0: such a limit denies everything and needs no bucket.
    #[error("a bucket needs a capacity of at least one token")]
    NoCapacity,
    /// The period was not a whole, positive number of seconds.
    #[error("the period must be a whole, positive number of seconds")]
    BadPeriod,
    /// The capacity is beyond what can be counted exactly.
    #[error("a capacity of {0} tokens is too large (at most 2^53)")]
    CapacityTooLarge(u64),
}

/// What a bucket holds between decisions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct State {
    /// Level in units (see the module doc), at most the capacity in units.
    pub level: u64,
    /// When the level was measured, in microseconds; always at a tick boundary.
    pub at_us: u64,
    /// The `units_per_token` of the shape the level was written with.
    pub units_per_token: u64,
}

/// A bucket brought up to date at one instant: the input of a decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Probe {
    /// Level in units, refilled up to `now_tick`.
    pub level: u64,
    /// The tick of the instant of the probe.
    pub now_tick: u64,
    /// The instant of the probe in microseconds.
    pub now_us: u64,
}

/// What a decision tells the caller about one bucket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Report {
    /// Whole tokens left after the decision.
    pub remaining: u64,
    /// Microseconds until the bucket is full again.
    pub until_full_us: u64,
    /// Microseconds until the requested hits are available, or `None` if they never can be
    /// (more hits than the capacity).
    pub until_hits_us: Option<u64>,
}

impl Shape {
    /// The bucket of `requests` per `period_us` microseconds holding at most `capacity` tokens.
    pub fn new(requests: u64, period_us: u64, capacity: u64) -> Result<Shape, ShapeError> {
        if requests == 0 {
            return Err(ShapeError::NoRefill);
        }
        if capacity == 0 {
            return Err(ShapeError::NoCapacity);
        }
        if period_us == 0 || !period_us.is_multiple_of(MICROS_PER_SECOND) {
            return Err(ShapeError::BadPeriod);
        }
        if capacity > MAX_EXACT {
            return Err(ShapeError::CapacityTooLarge(capacity));
        }
        let mut tick_us = 1;
        loop {
            let period_ticks = period_us / tick_us;
            let g = gcd(requests, period_ticks);
            let units_per_token = period_ticks / g;
            let refill_per_tick = requests / g;
            let fits = capacity
                .checked_mul(units_per_token)
                .is_some_and(|units| units <= MAX_EXACT)
                && refill_per_tick <= MAX_EXACT;
            // A tick of the whole period always fits: then units_per_token is 1.
            if fits || tick_us == period_us {
                return Ok(Shape {
                    requests,
                    period_us,
                    tick_us,
                    refill_per_tick,
                    units_per_token,
                    capacity,
                });
            }
            tick_us = next_tick(tick_us, period_us);
        }
    }

    /// Requests per period.
    pub fn requests(&self) -> u64 {
        self.requests
    }

    /// The period in microseconds.
    pub fn period_us(&self) -> u64 {
        self.period_us
    }

    /// Capacity in whole tokens.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Length of a tick in microseconds.
    pub fn tick_us(&self) -> u64 {
        self.tick_us
    }

    /// Units added per tick.
    pub fn refill_per_tick(&self) -> u64 {
        self.refill_per_tick
    }

    /// Units one token costs.
    pub fn units_per_token(&self) -> u64 {
        self.units_per_token
    }

    /// Capacity in units.
    pub fn capacity_units(&self) -> u64 {
        self.capacity * self.units_per_token
    }

    /// The bucket `state` (`None`: never used, or expired, so full) brought up to `now_us`.
    pub fn probe(&self, state: Option<&State>, now_us: u64) -> Probe {
        let now_tick = now_us / self.tick_us;
        let cap = self.capacity_units();
        let level = match state {
            None => cap,
            Some(state) => {
                let stored = self.rescale(state);
                let last_tick = state.at_us / self.tick_us;
                // A clock that went backwards refills nothing rather than failing.
                let gap = now_tick.saturating_sub(last_tick);
                let missing = cap - stored;
                if gap >= missing.div_ceil(self.refill_per_tick) {
                    cap
                } else {
                    stored + gap * self.refill_per_tick
                }
            }
        };
        Probe {
            level,
            now_tick,
            now_us,
        }
    }

    /// The level of `state` in this shape's units, clamped to the capacity.
    ///
    /// A level written with other units (the limit's numbers changed) keeps its whole tokens
    /// and drops the fraction of a token: every step then stays within exact integers, in
    /// this model as in the Lua script.
    fn rescale(&self, state: &State) -> u64 {
        if state.units_per_token == self.units_per_token || state.units_per_token == 0 {
            return state.level.min(self.capacity_units());
        }
        let tokens = (state.level / state.units_per_token).min(self.capacity);
        tokens * self.units_per_token
    }

    /// Whether `hits` tokens are in the bucket. Hits above the capacity never are.
    pub fn holds(&self, probe: &Probe, hits: u64) -> bool {
        hits <= self.capacity && probe.level >= hits * self.units_per_token
    }

    /// The state after taking `hits` tokens; the caller has checked [`Shape::holds`].
    pub fn take(&self, probe: &Probe, hits: u64) -> State {
        State {
            level: probe.level.saturating_sub(hits * self.units_per_token),
            at_us: probe.now_tick * self.tick_us,
            units_per_token: self.units_per_token,
        }
    }

    /// Whether a state holds a full bucket, which is the same as no state at all.
    pub fn is_full(&self, state: &State) -> bool {
        self.rescale(state) >= self.capacity_units()
    }

    /// The instant, in microseconds, at which `state` will be full again.
    pub fn full_at_us(&self, state: &State) -> u64 {
        let missing = self.capacity_units() - self.rescale(state);
        let ticks = missing.div_ceil(self.refill_per_tick);
        (state.at_us / self.tick_us + ticks).saturating_mul(self.tick_us)
    }

    /// What a caller is told about a bucket whose level is `level` at `probe`, having asked
    /// for `hits` tokens.
    pub fn report(&self, probe: &Probe, level: u64, hits: u64) -> Report {
        let tick_start = probe.now_tick * self.tick_us;
        let until = |units: u64| -> u64 {
            if level >= units {
                return 0;
            }
            let ticks = (units - level).div_ceil(self.refill_per_tick);
            (tick_start + ticks * self.tick_us).saturating_sub(probe.now_us)
        };
        Report {
            remaining: level / self.units_per_token,
            until_full_us: until(self.capacity_units()),
            until_hits_us: (hits <= self.capacity).then(|| until(hits * self.units_per_token)),
        }
    }
}

/// The next candidate tick: ten times longer, capped at the period, and always a divisor of it.
fn next_tick(tick_us: u64, period_us: u64) -> u64 {
    let next = tick_us * 10;
    if next < period_us && period_us.is_multiple_of(next) {
        next
    } else {
        period_us
    }
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: u64 = MICROS_PER_SECOND;
    const YEAR: u64 = 365 * 24 * 3600 * SECOND;

    /// Takes `hits` if they are there, as a store does, and says whether it did.
    fn try_take(shape: &Shape, state: &mut Option<State>, now_us: u64, hits: u64) -> bool {
        let probe = shape.probe(state.as_ref(), now_us);
        if !shape.holds(&probe, hits) {
            return false;
        }
        *state = Some(shape.take(&probe, hits));
        true
    }

    #[test]
    fn a_new_bucket_is_full_and_empties_after_capacity_hits() {
        let shape = Shape::new(10, SECOND, 10).unwrap();
        let mut state = None;
        for _ in 0..10 {
            assert!(try_take(&shape, &mut state, 0, 1));
        }
        assert!(!try_take(&shape, &mut state, 0, 1));
    }

    #[test]
    fn refills_continuously_at_the_rate() {
        let shape = Shape::new(10, SECOND, 10).unwrap();
        let mut state = None;
        assert!(try_take(&shape, &mut state, 0, 10));
        assert!(!try_take(&shape, &mut state, 99_999, 1));
        assert!(try_take(&shape, &mut state, 100_000, 1));
        assert!(!try_take(&shape, &mut state, 100_000, 1));
        assert!(try_take(&shape, &mut state, 350_000, 2));
    }

    #[test]
    fn thirds_of_a_token_do_not_drift() {
        // 3 per second: a token every 333 333.3 µs. A capacity of 2 is never reached again
        // once the first token is gone, so no refill is lost to the cap.
        let shape = Shape::new(3, SECOND, 2).unwrap();
        let mut state = None;
        let mut granted = 0;
        for step in 0..=3_000_000u64 {
            if try_take(&shape, &mut state, step * 1_000, 1) {
                granted += 1;
            }
        }
        // 3000 seconds at 3/s, plus the two tokens the bucket started with.
        assert_eq!(granted, 9_002);
    }

    #[test]
    fn one_per_year_is_exact() {
        let shape = Shape::new(1, YEAR, 1).unwrap();
        let mut state = None;
        assert!(try_take(&shape, &mut state, 5, 1));
        assert!(!try_take(&shape, &mut state, YEAR + 4, 1));
        assert!(try_take(&shape, &mut state, YEAR + 5, 1));
    }

    #[test]
    fn a_million_per_second_is_exact() {
        let shape = Shape::new(1_000_000, SECOND, 1_000_000).unwrap();
        assert_eq!(shape.tick_us(), 1);
        let mut state = None;
        assert!(try_take(&shape, &mut state, 0, 1_000_000));
        assert!(!try_take(&shape, &mut state, 0, 1));
        assert!(try_take(&shape, &mut state, 1, 1));
        assert!(!try_take(&shape, &mut state, 1, 1));
        assert!(try_take(&shape, &mut state, 1 + 250_000, 250_000));
    }

    #[test]
    fn a_year_long_gap_refills_to_capacity_only() {
        let shape = Shape::new(1_000, SECOND, 50).unwrap();
        let mut state = None;
        assert!(try_take(&shape, &mut state, 0, 50));
        assert!(try_take(&shape, &mut state, YEAR, 50));
        assert!(!try_take(&shape, &mut state, YEAR, 1));
    }

    #[test]
    fn hits_above_capacity_never_fit_and_have_no_retry_time() {
        let shape = Shape::new(10, SECOND, 5).unwrap();
        let probe = shape.probe(None, 0);
        assert!(!shape.holds(&probe, 6));
        assert_eq!(shape.report(&probe, probe.level, 6).until_hits_us, None);
    }

    #[test]
    fn report_counts_whole_tokens_and_times() {
        let shape = Shape::new(10, SECOND, 10).unwrap();
        let probe = shape.probe(None, 1_000);
        let after = shape.take(&probe, 4);
        let report = shape.report(&probe, after.level, 7);
        assert_eq!(report.remaining, 6);
        assert_eq!(report.until_full_us, 400_000);
        assert_eq!(report.until_hits_us, Some(100_000));
    }

    #[test]
    fn a_state_survives_a_change_of_numbers_clamped_to_the_new_capacity() {
        let old = Shape::new(10, SECOND, 10).unwrap();
        let probe = old.probe(None, 0);
        let state = old.take(&probe, 2);
        let smaller = Shape::new(3, 60 * SECOND, 5).unwrap();
        assert_eq!(
            smaller
                .report(&smaller.probe(Some(&state), 0), 0, 1)
                .remaining,
            0
        );
        let level = smaller.probe(Some(&state), 0).level;
        assert_eq!(level / smaller.units_per_token(), 5);
        let larger = Shape::new(7, SECOND, 100).unwrap();
        let level = larger.probe(Some(&state), 0).level;
        assert_eq!(level / larger.units_per_token(), 8);
    }

    #[test]
    fn every_shape_stays_within_exact_integers() {
        for (r, p, c) in [
            (u64::from(u32::MAX), YEAR, u64::from(u32::MAX)),
            (999_983, 86_400 * SECOND, 999_983),
            (1, SECOND, 1),
            (7, 7 * SECOND, u64::from(u32::MAX)),
        ] {
            let shape = Shape::new(r, p, c).unwrap();
            assert!(
                shape.capacity_units() <= MAX_EXACT,
                "{r}/{p}/{c}: {shape:?}"
            );
            assert_eq!(p % shape.tick_us(), 0);
        }
    }

    #[test]
    fn rejects_shapes_that_deny_everything() {
        assert_eq!(Shape::new(0, SECOND, 1), Err(ShapeError::NoRefill));
        assert_eq!(Shape::new(1, SECOND, 0), Err(ShapeError::NoCapacity));
        assert_eq!(Shape::new(1, 1_500, 1), Err(ShapeError::BadPeriod));
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;

        /// A period, in seconds.
        fn periods_s() -> impl Strategy<Value = u64> {
            prop_oneof![Just(1u64), Just(60), Just(3_600), Just(86_400)]
        }

        /// A limit: requests per period, period in seconds, capacity.
        fn limits() -> impl Strategy<Value = (u64, u64, u64)> {
            (1..=1_000_000u64, periods_s()).prop_flat_map(|(r, p)| (Just(r), Just(p), 1..=2 * r))
        }

        /// Steps of (microseconds to wait, hits to ask for).
        fn steps(capacity: u64) -> impl Strategy<Value = Vec<(u64, u64)>> {
            prop::collection::vec((0..5 * SECOND, 0..=capacity + 1), 1..200)
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(128))]

            #[test]
            fn never_grants_more_than_capacity_plus_refill(
                (r, p, c) in limits(),
                seed in any::<u64>(),
                waits in steps(1_000),
            ) {
                let shape = Shape::new(r, p * SECOND, c).unwrap();
                let mut state = None;
                let start = seed % (1 << 40);
                let mut now = start;
                let mut granted: u128 = 0;
                for (wait, hits) in waits {
                    now += wait;
                    let hits = hits % (c + 2);
                    if try_take(&shape, &mut state, now, hits) {
                        granted += u128::from(hits);
                    }
                    let level = shape.probe(state.as_ref(), now).level;
                    prop_assert!(level <= shape.capacity_units());
                    let refill = u128::from(r) * u128::from(now - start) / u128::from(p * SECOND);
                    prop_assert!(granted <= u128::from(c) + refill);
                }
            }

            #[test]
            fn a_denied_request_changes_nothing(
                (r, p, c) in limits(),
                waits in steps(1_000),
            ) {
                let shape = Shape::new(r, p * SECOND, c).unwrap();
                let mut state = None;
                let mut now = 0;
                for (wait, hits) in waits {
                    now += wait;
                    let probe = shape.probe(state.as_ref(), now);
                    if shape.holds(&probe, hits) {
                        state = Some(shape.take(&probe, hits));
                    } else {
                        // Asking again, at once, sees the very same bucket.
                        prop_assert_eq!(shape.probe(state.as_ref(), now), probe);
                    }
                    let report = shape.report(&probe, probe.level, hits);
                    prop_assert!(report.remaining <= c);
                }
            }

            #[test]
            fn grants_the_refill_to_a_steady_caller(
                (r, p, c) in (1..=20_000u64, periods_s())
                    .prop_flat_map(|(r, p)| (Just(r), Just(p), 2..=2 * r)),
                periods in 1..4u64,
            ) {
                // Asking for one token at steps no longer than a token's refill never lets a
                // bucket of two tokens or more cap a refill away once it has been emptied, so the
                // grant is C + R·t/P give or take one. (A bucket of one token does cap: its level
                // stays just under one between steps, and the next step overflows it.)
                let shape = Shape::new(r, p * SECOND, c).unwrap();
                let mut state = None;
                prop_assert!(try_take(&shape, &mut state, 0, c));
                let end = periods * p * SECOND;
                let step = (p * SECOND / r).max(1);
                let mut granted = c;
                let mut now = 0;
                while now < end {
                    now = (now + step).min(end);
                    while try_take(&shape, &mut state, now, 1) {
                        granted += 1;
                    }
                }
                let exact = c + r * periods;
                prop_assert!(granted + 1 >= exact && granted <= exact, "{granted} vs {exact}");
            }
        }
    }
}
