//! The execution stream: one OS thread per replica that owns the replica's kernel (and its
//! device) and runs batches one at a time. It takes batches from the submodel's queue
//! ([`SubmodelQueue::take`]) and answers each job's caller directly.
//!
//! A batch the kernel fails on is run again job by job on the spot, so a poison job fails only
//! itself. A panic anywhere in a batch is caught: the batch's jobs go back to the queue to run
//! alone (a job whose solo run panicked is retried once) and the stream ends, which the replica
//! actor turns into an actor failure (a restart).

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use maas_kernels::{Loaded, Values};

use crate::batch::{assemble, job_shape, split};
use crate::metrics::SubmodelMetrics;
use crate::protocol::{Job, JobError, JobOutput};
use crate::queue::SubmodelQueue;

/// Everything a stream thread needs.
pub(crate) struct Stream {
    pub(crate) kernel: Loaded,
    pub(crate) version: Arc<str>,
    pub(crate) queue: Arc<SubmodelQueue>,
    pub(crate) metrics: Arc<SubmodelMetrics>,
}

/// Why a batch produced no outputs.
enum Failure {
    Error { message: String, invalid: bool },
    Panic(String),
}

impl Stream {
    /// Runs batches until the queue closes or a kernel panics. Returns the panic message.
    pub(crate) fn run(self) -> Option<String> {
        while let Some(jobs) = self.queue.take() {
            if let Err(panic) = self.serve(jobs) {
                return Some(panic);
            }
        }
        None
    }

    /// Runs one batch and answers its jobs. `Err` (the panic message) when the kernel panicked:
    /// the jobs are back in the queue or answered, and this stream must end.
    fn serve(&self, jobs: Vec<Job>) -> Result<(), String> {
        let now = Instant::now();
        let mut live = Vec::with_capacity(jobs.len());
        let mut gone = 0;
        for job in jobs {
            if job.cancelled() {
                self.metrics.jobs_dropped.fetch_add(1, Relaxed);
                gone += 1;
            } else if job.expired(now) {
                self.metrics.jobs_dropped.fetch_add(1, Relaxed);
                job.answer(Err(JobError::DeadlineExceeded));
                gone += 1;
            } else {
                live.push(job);
            }
        }
        self.queue.finished(gone);
        if live.is_empty() {
            return Ok(());
        }
        let n = live.len();
        match self.compute(&live) {
            Ok(parts) => {
                self.answer_all(live, parts);
                Ok(())
            }
            Err(Failure::Error { message, invalid }) if n == 1 => {
                let job = live.pop().expect("one job");
                self.answer_error(job, message, invalid);
                Ok(())
            }
            Err(Failure::Error { .. }) => {
                // Row by row: a poison job then fails only itself.
                let mut rest = live.into_iter();
                while let Some(mut job) = rest.next() {
                    match self.compute(std::slice::from_ref(&job)) {
                        Ok(parts) => self.answer_all(vec![job], parts),
                        Err(Failure::Error { message, invalid }) => self.answer_error(job, message, invalid),
                        Err(Failure::Panic(panic)) => {
                            job.attempts += 1;
                            let mut back: Vec<Job> = Vec::new();
                            if job.attempts < 2 {
                                back.push(job);
                            } else {
                                self.answer_error(job, format!("kernel panicked: {panic}"), false);
                            }
                            back.extend(rest);
                            self.queue.requeue(back);
                            return Err(panic);
                        }
                    }
                }
                Ok(())
            }
            Err(Failure::Panic(panic)) => {
                let alone = n == 1;
                let mut back = Vec::with_capacity(n);
                for mut job in live {
                    job.attempts += 1;
                    if !alone || job.attempts < 2 {
                        back.push(job);
                    } else {
                        self.answer_error(job, format!("kernel panicked: {panic}"), false);
                    }
                }
                self.queue.requeue(back);
                Err(panic)
            }
        }
    }

    fn answer_all(&self, jobs: Vec<Job>, parts: Vec<Values>) {
        let n = jobs.len();
        for (job, values) in jobs.into_iter().zip(parts) {
            job.answer(Ok(JobOutput { values, version: self.version.clone() }));
        }
        self.metrics.jobs_ok.fetch_add(n as u64, Relaxed);
        self.queue.finished(n);
    }

    fn answer_error(&self, job: Job, message: String, invalid: bool) {
        if invalid {
            // The caller's inputs, not the kernel: answered, not counted as failed.
            job.answer(Err(JobError::InvalidInput(message)));
        } else {
            self.metrics.jobs_failed.fetch_add(1, Relaxed);
            job.answer(Err(JobError::Failed(message)));
        }
        self.queue.finished(1);
    }

    /// Assembles, runs and splits one batch, catching panics.
    fn compute(&self, jobs: &[Job]) -> Result<Vec<Values>, Failure> {
        let started = Instant::now();
        let sig = &self.kernel.signature;
        let result = catch_unwind(AssertUnwindSafe(|| {
            let inputs: Vec<&Values> = jobs.iter().map(|j| &j.inputs).collect();
            let batch = assemble(sig, &inputs, &self.kernel.device)?;
            let out = self.kernel.forward(&batch)?;
            if let [job] = jobs {
                split(sig, out, &[job_shape(sig, &job.inputs, job.rows)])
            } else {
                let shapes: Vec<_> = jobs.iter().map(|j| job_shape(sig, &j.inputs, j.rows)).collect();
                split(sig, out, &shapes)
            }
        }));
        let rows: usize = jobs.iter().map(|j| j.rows).sum();
        self.metrics.batch_rows.observe(rows as f64);
        self.metrics.compute_seconds.observe(started.elapsed().as_secs_f64());
        match result {
            Ok(Ok(parts)) => Ok(parts),
            Ok(Err(e)) => Err(Failure::Error { message: e.to_string(), invalid: e.is_input() }),
            Err(panic) => {
                let msg = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                Err(Failure::Panic(msg))
            }
        }
    }
}
