//! Jobs (what the engine queues and streams answer) and the submodel actor's messages.

use std::sync::Arc;
use std::time::Instant;

use maas_kernels::Values;
use tokio::sync::oneshot;

/// What a submodel answers for one job.
#[derive(Debug)]
pub struct JobOutput {
    /// The job's outputs, its own rows only (ragged dimensions trimmed back to its length).
    pub values: Values,
    /// The version of the submodel that computed them.
    pub version: Arc<str>,
}

/// Why a job ended without outputs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JobError {
    /// Its deadline passed before it could run.
    #[error("deadline exceeded")]
    DeadlineExceeded,
    /// The kernel failed on it (after a retry, if it panicked).
    #[error("{0}")]
    Failed(String),
    /// Its inputs were refused before the kernel ran (an id past the vocabulary, a sequence
    /// longer than the model's positions, an empty tensor): the caller's fault, not the
    /// submodel's, so it does not count as a failed job.
    #[error("{0}")]
    InvalidInput(String),
    /// The submodel cannot serve (every replica failed, or it is shutting down).
    #[error("{0}")]
    Unavailable(String),
    /// The process hosting it was lost while it ran the job, or no process hosting it is up.
    #[error("{0}")]
    Lost(String),
}

/// One request's rows for one node: the unit that is queued, batched and answered.
#[derive(Debug)]
pub struct Job {
    /// Named inputs, batch first (all with the same row count).
    pub inputs: Values,
    /// Row count.
    pub rows: usize,
    /// When the job's request must be done; an expired job is answered without computing.
    pub deadline: Option<Instant>,
    /// When it entered the queue.
    pub enqueued: Instant,
    /// Failed runs so far: a job is run alone after a batch failure, and retried once after a
    /// panic.
    pub attempts: u32,
    /// Run this job in a batch of its own (set after a batch failure: row-by-row retry).
    pub alone: bool,
    /// Where the answer goes; closed when the caller gave up (then the job is dropped).
    pub reply: oneshot::Sender<Result<JobOutput, JobError>>,
}

impl Job {
    /// A new job and the receiver of its answer.
    pub fn new(
        inputs: Values,
        rows: usize,
        deadline: Option<Instant>,
    ) -> (Self, oneshot::Receiver<Result<JobOutput, JobError>>) {
        let (reply, rx) = oneshot::channel();
        (Job { inputs, rows, deadline, enqueued: Instant::now(), attempts: 0, alone: false, reply }, rx)
    }

    /// The caller dropped its receiver: nobody waits for this job.
    pub fn cancelled(&self) -> bool {
        self.reply.is_closed()
    }

    /// The deadline has passed.
    pub fn expired(&self, now: Instant) -> bool {
        self.deadline.is_some_and(|d| now >= d)
    }

    /// Answers the job (a caller that went away is not an error).
    pub fn answer(self, result: Result<JobOutput, JobError>) {
        let _ = self.reply.send(result);
    }
}

/// Messages of a submodel actor (its supervision; jobs go through its [`SubmodelQueue`]).
///
/// [`SubmodelQueue`]: crate::SubmodelQueue
#[derive(Debug)]
pub enum SubmodelMessage {
    /// Time to start replica `usize` again.
    Restart(usize),
    /// A replica finished starting (or failed to).
    Started {
        /// Which replica.
        replica: usize,
        /// Its incarnation.
        generation: u64,
        /// Its actor, or why it failed to start.
        result: Result<crate::replica::Started, String>,
    },
}

// Local only: never sent to another process.
impl ractor::Message for SubmodelMessage {}
