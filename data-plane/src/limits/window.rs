//! Sliding-window counters in fixed-width buckets.

use aigw_shared::proto::limits::v1::Measure;

/// What a window counts and how it is bucketed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    RequestsPerMinute,
    TokensPerMinute,
    RequestsPerDay,
    TokensPerDay,
}

impl Kind {
    pub const ALL: [Kind; 4] = [
        Kind::RequestsPerMinute,
        Kind::TokensPerMinute,
        Kind::RequestsPerDay,
        Kind::TokensPerDay,
    ];

    pub fn index(self) -> usize {
        self as usize
    }

    /// Bucket width: the window's resolution, hence its error at the trailing edge.
    pub fn bucket_ms(self) -> u64 {
        match self {
            Kind::RequestsPerMinute | Kind::TokensPerMinute => 100,
            Kind::RequestsPerDay | Kind::TokensPerDay => 300_000,
        }
    }

    pub fn buckets(self) -> usize {
        match self {
            Kind::RequestsPerMinute | Kind::TokensPerMinute => 600,
            Kind::RequestsPerDay | Kind::TokensPerDay => 288,
        }
    }

    pub fn is_tokens(self) -> bool {
        matches!(self, Kind::TokensPerMinute | Kind::TokensPerDay)
    }

    pub fn bucket_of(self, unix_ms: u64) -> u64 {
        unix_ms / self.bucket_ms()
    }

    pub fn measure(self) -> Measure {
        match self {
            Kind::RequestsPerMinute => Measure::RequestsPerMinute,
            Kind::TokensPerMinute => Measure::TokensPerMinute,
            Kind::RequestsPerDay => Measure::RequestsPerDay,
            Kind::TokensPerDay => Measure::TokensPerDay,
        }
    }

    pub fn from_measure(m: Measure) -> Option<Self> {
        match m {
            Measure::RequestsPerMinute => Some(Kind::RequestsPerMinute),
            Measure::TokensPerMinute => Some(Kind::TokensPerMinute),
            Measure::RequestsPerDay => Some(Kind::RequestsPerDay),
            Measure::TokensPerDay => Some(Kind::TokensPerDay),
            Measure::Unspecified => None,
        }
    }

    /// `rpm`, `tpm`, … as the config spells them.
    pub fn name(self) -> &'static str {
        match self {
            Kind::RequestsPerMinute => "rpm",
            Kind::TokensPerMinute => "tpm",
            Kind::RequestsPerDay => "rpd",
            Kind::TokensPerDay => "tpd",
        }
    }
}

/// Largest magnitude of one bucket's count. A call costs at most
/// [`MAX_COST`], so this is far beyond any real traffic, and with it the sum
/// of a window (at most 600 buckets) can never overflow an `i64`: a count
/// from a buggy or hostile peer is clamped rather than wrapping the total.
pub const MAX_BUCKET: i64 = 1 << 50;

/// Largest cost one call can have in a window (tokens, after clamping the
/// estimate and the reported usage).
pub const MAX_COST: i64 = 1 << 40;

/// A cost in a window's unit: `n` clamped to [`MAX_COST`].
pub fn cost_of(n: u64) -> i64 {
    i64::try_from(n).map_or(MAX_COST, |n| n.min(MAX_COST))
}

/// Counts per bucket over the last `len` buckets, with a running total.
/// Buckets are absolute (`unix_ms / bucket_ms`), so every node of the fleet
/// agrees on them.
#[derive(Debug, Clone)]
pub struct Ring {
    counts: Box<[i64]>,
    /// Absolute number of the newest bucket.
    head: u64,
    total: i64,
}

impl Ring {
    pub fn new(kind: Kind) -> Self {
        Self {
            counts: vec![0; kind.buckets()].into_boxed_slice(),
            head: 0,
            total: 0,
        }
    }

    fn len(&self) -> u64 {
        self.counts.len() as u64
    }

    /// Moves the window so `bucket` is the newest, dropping what fell out.
    pub fn advance(&mut self, bucket: u64) {
        if bucket <= self.head {
            return;
        }
        if bucket - self.head >= self.len() {
            self.counts.iter_mut().for_each(|c| *c = 0);
            self.total = 0;
        } else {
            for b in self.head + 1..=bucket {
                let i = (b % self.len()) as usize;
                self.total -= self.counts[i];
                self.counts[i] = 0;
            }
        }
        self.head = bucket;
    }

    /// Whether `bucket` is inside the window (not expired, not ahead).
    fn holds(&self, bucket: u64) -> bool {
        bucket <= self.head && self.head - bucket < self.len()
    }

    /// Adds `delta` to `bucket`; false (and nothing changes) if it has expired.
    pub fn add(&mut self, bucket: u64, delta: i64) -> bool {
        self.advance(bucket);
        if !self.holds(bucket) {
            return false;
        }
        let i = (bucket % self.len()) as usize;
        let value = self.counts[i].saturating_add(delta);
        self.put(i, value);
        true
    }

    /// Sets slot `i`, clamped to [`MAX_BUCKET`], keeping the total exact.
    fn put(&mut self, i: usize, value: i64) {
        let value = value.clamp(-MAX_BUCKET, MAX_BUCKET);
        self.total += value - self.counts[i];
        self.counts[i] = value;
    }

    /// Sets `bucket` to `value` (a peer's absolute count).
    pub fn set(&mut self, bucket: u64, value: i64) {
        self.advance(bucket);
        if self.holds(bucket) {
            self.put((bucket % self.len()) as usize, value);
        }
    }

    pub fn get(&self, bucket: u64) -> i64 {
        if self.holds(bucket) {
            self.counts[(bucket % self.len()) as usize]
        } else {
            0
        }
    }

    /// The window's sum; corrections can push a bucket below zero, never the sum.
    pub fn total(&self) -> i64 {
        self.total.max(0)
    }

    /// The oldest bucket still in the window.
    pub fn oldest(&self) -> u64 {
        (self.head + 1).saturating_sub(self.len())
    }

    pub fn head(&self) -> u64 {
        self.head
    }

    /// The counts from `from` (clamped to the window) to the newest bucket.
    pub fn range(&self, from: u64) -> (u64, Vec<i64>) {
        let from = from.max(self.oldest());
        let counts = (from..=self.head).map(|b| self.get(b)).collect();
        (from, counts)
    }

    /// The first non-empty bucket, if any.
    pub fn first_nonzero(&self) -> Option<u64> {
        (self.oldest()..=self.head).find(|&b| self.get(b) != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K: Kind = Kind::RequestsPerMinute;

    #[test]
    fn counts_fall_out_after_the_window() {
        let mut r = Ring::new(K);
        assert!(r.add(1_000, 3));
        assert!(r.add(1_300, 2));
        assert_eq!(r.total(), 5);
        r.advance(1_599);
        assert_eq!(r.total(), 5, "bucket 1000 is still the oldest");
        r.advance(1_600);
        assert_eq!(r.total(), 2);
        r.advance(1_900);
        assert_eq!(r.total(), 0);
        assert!(!r.add(1_000, 1), "an expired bucket takes nothing");
        assert_eq!(r.total(), 0);
    }

    #[test]
    fn a_long_gap_clears_everything() {
        let mut r = Ring::new(K);
        r.add(10, 7);
        r.advance(10_000);
        assert_eq!(r.total(), 0);
        assert_eq!(r.first_nonzero(), None);
    }

    #[test]
    fn set_replaces_and_corrections_never_make_the_total_negative() {
        let mut r = Ring::new(K);
        r.set(50, 4);
        r.set(50, 6);
        assert_eq!(r.total(), 6);
        r.add(50, -10);
        assert_eq!(r.total(), 0);
        r.add(51, 3);
        assert_eq!(r.total(), 0, "-4 + 3");
        let (from, counts) = r.range(0);
        assert_eq!(from, 0);
        assert_eq!(counts[50..], [-4, 3]);
    }
}
