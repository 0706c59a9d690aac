//! Lock-free metrics: counters and fixed-bucket histograms, cheap enough for the hot path.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Bucket bounds for durations, in seconds.
pub const LATENCY_BUCKETS: &[f64] =
    &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
/// Bucket bounds for batch sizes, in rows.
pub const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];

/// A histogram with fixed bucket bounds (plus an overflow bucket).
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    /// Sum of observations, in millionths.
    sum_micro: AtomicU64,
}

/// A copy of a histogram's state.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    /// Upper bounds of the buckets (the last bucket, not listed, is unbounded).
    pub bounds: &'static [f64],
    /// Observations per bucket (one more than `bounds`).
    pub counts: Vec<u64>,
    /// Number of observations.
    pub count: u64,
    /// Sum of observations.
    pub sum: f64,
}

impl HistogramSnapshot {
    /// Mean of the observations (0 when empty).
    pub fn mean(&self) -> f64 {
        if self.count == 0 { 0.0 } else { self.sum / self.count as f64 }
    }

    /// The upper bound of the bucket holding quantile `q` (an upper estimate).
    pub fn quantile(&self, q: f64) -> f64 {
        let target = (q * self.count as f64).ceil() as u64;
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= target && *c > 0 {
                return self.bounds.get(i).copied().unwrap_or(f64::INFINITY);
            }
        }
        0.0
    }
}

impl Histogram {
    /// A histogram over `bounds` (ascending).
    pub fn new(bounds: &'static [f64]) -> Self {
        Self { bounds, counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(), sum_micro: AtomicU64::new(0) }
    }

    /// Records one observation.
    pub fn observe(&self, v: f64) {
        let i = self.bounds.partition_point(|b| *b < v);
        self.counts[i].fetch_add(1, Relaxed);
        self.sum_micro.fetch_add((v.max(0.0) * 1e6) as u64, Relaxed);
    }

    /// A copy of the current state.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let counts: Vec<u64> = self.counts.iter().map(|c| c.load(Relaxed)).collect();
        HistogramSnapshot {
            bounds: self.bounds,
            count: counts.iter().sum(),
            counts,
            sum: self.sum_micro.load(Relaxed) as f64 / 1e6,
        }
    }
}

/// What a submodel records.
#[derive(Debug)]
pub struct SubmodelMetrics {
    /// Jobs waiting in the queue now.
    pub queued: AtomicU64,
    /// Of those, jobs a stream is holding back now for a fuller batch.
    pub held: AtomicU64,
    /// Rows per batch.
    pub batch_rows: Histogram,
    /// Seconds of compute per batch (assembly, forward, split).
    pub compute_seconds: Histogram,
    /// Replica restarts.
    pub restarts: AtomicU64,
    /// Jobs answered with outputs.
    pub jobs_ok: AtomicU64,
    /// Jobs answered with an error.
    pub jobs_failed: AtomicU64,
    /// Jobs refused because the queue was full.
    pub jobs_rejected: AtomicU64,
    /// Jobs dropped before compute (cancelled or expired).
    pub jobs_dropped: AtomicU64,
    /// Batches dispatched as soon as a stream was free (nothing expected soon, or full).
    pub batches_at_once: AtomicU64,
    /// Batches held back for rows expected soon, then dispatched.
    pub batches_waited: AtomicU64,
    /// How long each held-back batch waited.
    pub wait_seconds: Histogram,
}

impl Default for SubmodelMetrics {
    fn default() -> Self {
        Self {
            queued: AtomicU64::new(0),
            held: AtomicU64::new(0),
            batch_rows: Histogram::new(BATCH_BUCKETS),
            compute_seconds: Histogram::new(LATENCY_BUCKETS),
            restarts: AtomicU64::new(0),
            jobs_ok: AtomicU64::new(0),
            jobs_failed: AtomicU64::new(0),
            jobs_rejected: AtomicU64::new(0),
            jobs_dropped: AtomicU64::new(0),
            batches_at_once: AtomicU64::new(0),
            batches_waited: AtomicU64::new(0),
            wait_seconds: Histogram::new(LATENCY_BUCKETS),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_and_quantiles() {
        let h = Histogram::new(BATCH_BUCKETS);
        for v in [1.0, 1.0, 3.0, 32.0, 1000.0] {
            h.observe(v);
        }
        let s = h.snapshot();
        assert_eq!(s.count, 5);
        assert_eq!(s.counts[0], 2);
        assert_eq!(s.counts[2], 1);
        assert_eq!(s.counts[5], 1);
        assert_eq!(*s.counts.last().unwrap(), 1);
        assert!((s.mean() - 207.4).abs() < 1e-9);
        assert_eq!(s.quantile(0.5), 4.0);
        assert_eq!(s.quantile(1.0), f64::INFINITY);
    }
}
