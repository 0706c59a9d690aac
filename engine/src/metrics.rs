//! Pipeline metrics and the engine's metrics snapshot.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use maas_actors::metrics::{Histogram, HistogramSnapshot, LATENCY_BUCKETS, SubmodelMetrics};

use crate::error::InferError;

/// What a pipeline records.
#[derive(Debug)]
pub(crate) struct PipelineMetrics {
    pub(crate) latency: Histogram,
    pub(crate) ok: AtomicU64,
    pub(crate) errors: [AtomicU64; InferError::KINDS.len()],
}

impl Default for PipelineMetrics {
    fn default() -> Self {
        Self { latency: Histogram::new(LATENCY_BUCKETS), ok: AtomicU64::new(0), errors: Default::default() }
    }
}

impl PipelineMetrics {
    pub(crate) fn record(&self, seconds: f64, result: Result<(), &InferError>) {
        self.latency.observe(seconds);
        match result {
            Ok(()) => {
                self.ok.fetch_add(1, Relaxed);
            }
            Err(e) => {
                let i = InferError::KINDS.iter().position(|k| *k == e.kind()).unwrap_or(0);
                self.errors[i].fetch_add(1, Relaxed);
            }
        }
    }

    pub(crate) fn snapshot(&self) -> PipelineSnapshot {
        PipelineSnapshot {
            latency_seconds: self.latency.snapshot(),
            ok: self.ok.load(Relaxed),
            errors: InferError::KINDS
                .iter()
                .zip(&self.errors)
                .map(|(k, c)| (k.to_string(), c.load(Relaxed)))
                .filter(|(_, n)| *n > 0)
                .collect(),
        }
    }
}

/// A pipeline's metrics at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct PipelineSnapshot {
    /// Request latency (seconds), successes and failures.
    pub latency_seconds: HistogramSnapshot,
    /// Requests that ended with outputs.
    pub ok: u64,
    /// Requests that ended with an error, by kind (only kinds that occurred).
    pub errors: BTreeMap<String, u64>,
}

/// A submodel's metrics at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct SubmodelSnapshot {
    /// Jobs waiting now.
    pub queued: u64,
    /// Of those, jobs held back now for a fuller batch.
    pub held: u64,
    /// Rows per batch.
    pub batch_rows: HistogramSnapshot,
    /// Compute time per batch (seconds).
    pub compute_seconds: HistogramSnapshot,
    /// Replica restarts.
    pub restarts: u64,
    /// Jobs answered with outputs.
    pub jobs_ok: u64,
    /// Jobs answered with an error.
    pub jobs_failed: u64,
    /// Jobs refused because the queue was full.
    pub jobs_rejected: u64,
    /// Jobs dropped before compute (cancelled or expired).
    pub jobs_dropped: u64,
    /// Batches dispatched as soon as a stream was free.
    pub batches_at_once: u64,
    /// Batches held back for rows expected soon, then dispatched.
    pub batches_waited: u64,
    /// How long each held-back batch waited (seconds).
    pub wait_seconds: HistogramSnapshot,
}

impl SubmodelSnapshot {
    pub(crate) fn of(m: &SubmodelMetrics) -> Self {
        Self {
            queued: m.queued.load(Relaxed),
            held: m.held.load(Relaxed),
            batch_rows: m.batch_rows.snapshot(),
            compute_seconds: m.compute_seconds.snapshot(),
            restarts: m.restarts.load(Relaxed),
            jobs_ok: m.jobs_ok.load(Relaxed),
            jobs_failed: m.jobs_failed.load(Relaxed),
            jobs_rejected: m.jobs_rejected.load(Relaxed),
            jobs_dropped: m.jobs_dropped.load(Relaxed),
            batches_at_once: m.batches_at_once.load(Relaxed),
            batches_waited: m.batches_waited.load(Relaxed),
            wait_seconds: m.wait_seconds.snapshot(),
        }
    }
}

/// Every metric of an engine at one moment.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct MetricsSnapshot {
    /// Per submodel.
    pub submodels: BTreeMap<String, SubmodelSnapshot>,
    /// Per pipeline.
    pub pipelines: BTreeMap<String, PipelineSnapshot>,
    /// Requests in flight now.
    pub in_flight: u64,
    /// Changes attempted, by (`swap` | `rollback` | `recompose`, `ok` | `rejected`).
    pub changes: BTreeMap<(String, String), u64>,
    /// The version each submodel serves now.
    pub versions: BTreeMap<String, String>,
}
