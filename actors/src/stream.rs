//! The execution stream: one OS thread per replica that owns the replica's kernel (and its
//! device) and runs batches one at a time. Batches arrive over a bounded flume channel; answers
//! go straight to each job's caller, and a report goes back to the submodel actor.
//!
//! A panic anywhere in a batch is caught: the batch's jobs go back to the actor for a retry and
//! the stream ends, which the replica actor turns into an actor failure (a restart).

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::Instant;

use maas_kernels::Loaded;
use ractor::ActorRef;

use crate::batch::{assemble, job_shape, split};
use crate::metrics::SubmodelMetrics;
use crate::protocol::{Job, JobError, JobOutput, SubmodelMessage};

/// Everything a stream thread needs.
pub(crate) struct Stream {
    pub(crate) kernel: Loaded,
    pub(crate) version: Arc<str>,
    pub(crate) replica: usize,
    pub(crate) generation: u64,
    pub(crate) submodel: ActorRef<SubmodelMessage>,
    pub(crate) metrics: Arc<SubmodelMetrics>,
}

/// The outcome of one batch on the stream.
enum Outcome {
    Done,
    Failed { jobs: Vec<Job>, error: String, panicked: bool, invalid: bool },
}

impl Stream {
    /// Runs batches until the channel closes or a kernel panics. Returns the panic message.
    pub(crate) fn run(self, batches: flume::Receiver<Vec<Job>>) -> Option<String> {
        while let Ok(jobs) = batches.recv() {
            let outcome = self.run_batch(jobs);
            let (failed, error, panicked, invalid) = match outcome {
                Outcome::Done => (Vec::new(), None, false, false),
                Outcome::Failed { jobs, error, panicked, invalid } => (jobs, Some(error), panicked, invalid),
            };
            let panic = panicked.then(|| error.clone().unwrap_or_default());
            let _ = self.submodel.cast(SubmodelMessage::BatchDone {
                replica: self.replica,
                generation: self.generation,
                failed,
                error,
                panicked,
                invalid,
            });
            if panic.is_some() {
                return panic;
            }
        }
        None
    }

    fn run_batch(&self, jobs: Vec<Job>) -> Outcome {
        let now = Instant::now();
        let mut live = Vec::with_capacity(jobs.len());
        for job in jobs {
            if job.cancelled() {
                self.metrics.jobs_dropped.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            } else if job.expired(now) {
                self.metrics.jobs_dropped.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                job.answer(Err(JobError::DeadlineExceeded));
            } else {
                live.push(job);
            }
        }
        if live.is_empty() {
            return Outcome::Done;
        }
        let started = Instant::now();
        let sig = &self.kernel.signature;
        let result = catch_unwind(AssertUnwindSafe(|| {
            let inputs: Vec<&maas_kernels::Values> = live.iter().map(|j| &j.inputs).collect();
            let shapes: Vec<_> = live.iter().map(|j| job_shape(sig, &j.inputs, j.rows)).collect();
            let batch = assemble(sig, &inputs)?;
            let out = self.kernel.forward(&batch)?;
            split(sig, out, &shapes)
        }));
        let rows: usize = live.iter().map(|j| j.rows).sum();
        self.metrics.batch_rows.observe(rows as f64);
        self.metrics.compute_seconds.observe(started.elapsed().as_secs_f64());
        match result {
            Ok(Ok(parts)) => {
                for (job, values) in live.into_iter().zip(parts) {
                    self.metrics.jobs_ok.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    job.answer(Ok(JobOutput { values, version: self.version.clone() }));
                }
                Outcome::Done
            }
            Ok(Err(e)) => Outcome::Failed { jobs: live, error: e.to_string(), panicked: false, invalid: e.is_input() },
            Err(panic) => {
                let msg = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                Outcome::Failed { jobs: live, error: format!("kernel panicked: {msg}"), panicked: true, invalid: false }
            }
        }
    }
}
