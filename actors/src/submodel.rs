//! The submodel actor: one per submodel. It owns the submodel's queue, forms batches across all
//! requests of all pipelines, dispatches each batch to an idle replica's stream, retries failed
//! batches job by job, and supervises its replicas (restart with backoff, within a budget).
//!
//! Batching policy: a replica that is idle takes a batch at once. A replica that has *just*
//! finished a batch (idle for less than `max_delay`) waits up to `max_delay` for the batch to
//! fill to `max_size`, because under load more rows are on their way; while every replica is
//! busy, rows accumulate. A timer started at the first arrival would instead fragment batches
//! in closed-loop multi-stage pipelines.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use maas_graphs::SubmodelSpec;
use maas_kernels::Registry;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};

use crate::metrics::SubmodelMetrics;
use crate::protocol::{Job, JobError, SubmodelMessage};
use crate::replica::{ReplicaActor, ReplicaArgs, ReplicaMessage, Started};
use crate::status::{SubmodelState, SubmodelStatus};

/// How failed replicas are restarted.
#[derive(Debug, Clone, Copy)]
pub struct RestartPolicy {
    /// Restarts allowed per replica within `window` before it is given up.
    pub max_restarts: usize,
    /// The window over which restarts are counted.
    pub window: Duration,
    /// Delay before the first restart; doubled for each recent restart.
    pub backoff: Duration,
    /// The longest delay.
    pub max_backoff: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        Self {
            max_restarts: 5,
            window: Duration::from_secs(60),
            backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(2),
        }
    }
}

/// The submodel actor (configuration only).
pub struct SubmodelActor;

/// What a submodel actor starts from.
pub struct SubmodelArgs {
    /// The submodel.
    pub spec: Arc<SubmodelSpec>,
    /// Where its kind is looked up.
    pub registry: Registry,
    /// Its metrics (shared with the engine).
    pub metrics: Arc<SubmodelMetrics>,
    /// Its health (shared with the engine).
    pub status: Arc<SubmodelStatus>,
    /// Restart policy for its replicas.
    pub policy: RestartPolicy,
}

struct Replica {
    actor: Option<ActorRef<ReplicaMessage>>,
    batches: Option<flume::Sender<Vec<Job>>>,
    busy: bool,
    idle_since: Instant,
    generation: u64,
    restarts: VecDeque<Instant>,
    failed: bool,
}

/// The submodel actor's state.
pub struct SubmodelActorState {
    spec: Arc<SubmodelSpec>,
    registry: Registry,
    metrics: Arc<SubmodelMetrics>,
    status: Arc<SubmodelStatus>,
    policy: RestartPolicy,
    replicas: Vec<Replica>,
    queue: VecDeque<Job>,
    max_size: usize,
    max_delay: Duration,
    flush_pending: bool,
    drains: Vec<RpcReplyPort<()>>,
}

async fn start_replica(
    myself: &ActorRef<SubmodelMessage>,
    s: &SubmodelActorState,
    replica: usize,
    generation: u64,
) -> Result<Started, String> {
    let (tx, rx) = flume::bounded(1);
    let args = ReplicaArgs {
        spec: s.spec.clone(),
        registry: s.registry.clone(),
        replica,
        generation,
        submodel: myself.clone(),
        batches: rx,
        metrics: s.metrics.clone(),
    };
    match Actor::spawn_linked(None, ReplicaActor, args, myself.get_cell()).await {
        Ok((actor, _)) => Ok(Started { actor, batches: tx }),
        Err(e) => Err(e.to_string()),
    }
}

impl SubmodelActorState {
    fn publish(&self) {
        let ready = self.replicas.iter().filter(|r| r.batches.is_some()).count();
        let state = if ready == self.replicas.len() {
            SubmodelState::Ready
        } else if ready > 0 {
            SubmodelState::Degraded
        } else if self.replicas.iter().all(|r| r.failed) {
            SubmodelState::Failed
        } else {
            SubmodelState::Starting
        };
        self.status.set(state, ready);
    }

    fn failed(&self) -> bool {
        self.replicas.iter().all(|r| r.failed)
    }

    fn dequeued(&self, n: usize) {
        self.metrics.queued.fetch_sub(n as u64, Relaxed);
    }

    fn fail_job(&self, job: Job, error: JobError) {
        self.metrics.jobs_failed.fetch_add(1, Relaxed);
        job.answer(Err(error));
    }

    /// Sends batches to idle replicas while there is work.
    fn dispatch(&mut self, myself: &ActorRef<SubmodelMessage>) {
        loop {
            // Drop what nobody waits for, answer what expired.
            let now = Instant::now();
            while let Some(front) = self.queue.front() {
                if front.cancelled() || front.expired(now) {
                    let job = self.queue.pop_front().expect("front exists");
                    self.dequeued(1);
                    self.metrics.jobs_dropped.fetch_add(1, Relaxed);
                    if !job.cancelled() {
                        job.answer(Err(JobError::DeadlineExceeded));
                    }
                } else {
                    break;
                }
            }
            let Some(front) = self.queue.front() else { break };
            // The replica idle longest: it waits the least (or not at all) for a fuller batch.
            let Some(r) = (0..self.replicas.len())
                .filter(|&i| self.replicas[i].batches.is_some() && !self.replicas[i].busy)
                .min_by_key(|&i| self.replicas[i].idle_since)
            else {
                break;
            };
            let idle_for = self.replicas[r].idle_since.elapsed();
            if !front.alone && idle_for < self.max_delay {
                let queued_rows = self.queue.iter().fold(0usize, |n, j| n.saturating_add(j.rows));
                if queued_rows < self.max_size {
                    if !self.flush_pending {
                        self.flush_pending = true;
                        myself.send_after(self.max_delay - idle_for, || SubmodelMessage::Flush);
                    }
                    break;
                }
            }
            let mut batch = vec![self.queue.pop_front().expect("front exists")];
            if !batch[0].alone {
                let mut rows = batch[0].rows;
                let ports: Vec<&String> = batch[0].inputs.keys().collect();
                let ports: Vec<String> = ports.into_iter().cloned().collect();
                while let Some(next) = self.queue.front() {
                    let same_ports =
                        next.inputs.len() == ports.len() && next.inputs.keys().zip(&ports).all(|(a, b)| a == b);
                    if next.alone || rows.saturating_add(next.rows) > self.max_size || !same_ports {
                        break;
                    }
                    rows = rows.saturating_add(next.rows);
                    batch.push(self.queue.pop_front().expect("front exists"));
                }
            }
            self.dequeued(batch.len());
            let replica = &mut self.replicas[r];
            let sender = replica.batches.as_ref().expect("idle replica has a stream");
            match sender.try_send(batch) {
                Ok(()) => replica.busy = true,
                Err(e) => {
                    // The stream is gone (its failure is on the way) or, impossibly, full.
                    let jobs = match e {
                        flume::TrySendError::Full(j) | flume::TrySendError::Disconnected(j) => j,
                    };
                    self.metrics.queued.fetch_add(jobs.len() as u64, Relaxed);
                    for job in jobs.into_iter().rev() {
                        self.queue.push_front(job);
                    }
                    replica.batches = None;
                    self.publish();
                }
            }
        }
        self.check_drains();
    }

    fn check_drains(&mut self) {
        if self.queue.is_empty() && self.replicas.iter().all(|r| !r.busy) {
            for port in self.drains.drain(..) {
                let _ = port.send(());
            }
        }
    }

    fn replica_down(&mut self, myself: &ActorRef<SubmodelMessage>, i: usize, reason: String) {
        let now = Instant::now();
        let policy = self.policy;
        let name = self.spec.name.clone();
        let r = &mut self.replicas[i];
        r.actor = None;
        r.batches = None;
        r.busy = false;
        r.generation += 1;
        self.metrics.restarts.fetch_add(1, Relaxed);
        self.status.set_error(format!("replica {i}: {reason}"));
        r.restarts.retain(|t| now.duration_since(*t) < policy.window);
        if r.restarts.len() >= policy.max_restarts {
            // Crash loop: stop restarting for a whole window (the submodel reports `failed`
            // when no replica is left), then try once more, so that a burst of bad requests
            // cannot take a submodel down for good.
            r.failed = true;
            tracing::error!(submodel = %name, replica = i, %reason, retry_in = ?policy.window, "replica failed; restart budget spent");
            myself.send_after(policy.window, move || SubmodelMessage::Restart(i));
        } else {
            let delay = policy.backoff.saturating_mul(1 << r.restarts.len().min(16)).min(policy.max_backoff);
            r.restarts.push_back(now);
            tracing::warn!(submodel = %name, replica = i, %reason, ?delay, "replica failed; restarting");
            myself.send_after(delay, move || SubmodelMessage::Restart(i));
        }
        if self.failed() {
            let error = format!("submodel `{name}` failed: {reason}");
            while let Some(job) = self.queue.pop_front() {
                self.dequeued(1);
                self.fail_job(job, JobError::Unavailable(error.clone()));
            }
        }
        self.publish();
        self.check_drains();
    }
}

impl Actor for SubmodelActor {
    type Msg = SubmodelMessage;
    type State = SubmodelActorState;
    type Arguments = SubmodelArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: SubmodelArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let (max_size, max_delay) = match args.spec.batch {
            Some(b) => (b.max_size, b.max_delay),
            None => (usize::MAX, Duration::ZERO),
        };
        let long_ago = Instant::now().checked_sub(max_delay).unwrap_or_else(Instant::now);
        let mut state = SubmodelActorState {
            replicas: (0..args.spec.replicas)
                .map(|_| Replica {
                    actor: None,
                    batches: None,
                    busy: false,
                    idle_since: long_ago,
                    generation: 0,
                    restarts: VecDeque::new(),
                    failed: false,
                })
                .collect(),
            spec: args.spec,
            registry: args.registry,
            metrics: args.metrics,
            status: args.status,
            policy: args.policy,
            queue: VecDeque::new(),
            max_size,
            max_delay,
            flush_pending: false,
            drains: Vec::new(),
        };
        state.publish();
        // Load every replica before the submodel counts as started: a bad weights file fails
        // the start with its error.
        for i in 0..state.replicas.len() {
            let started = start_replica(&myself, &state, i, 0).await?;
            state.replicas[i].actor = Some(started.actor);
            state.replicas[i].batches = Some(started.batches);
        }
        state.publish();
        Ok(state)
    }

    async fn post_stop(&self, _: ActorRef<Self::Msg>, state: &mut Self::State) -> Result<(), ActorProcessingErr> {
        while let Some(job) = state.queue.pop_front() {
            state.dequeued(1);
            if job.cancelled() {
                state.metrics.jobs_dropped.fetch_add(1, Relaxed);
            } else {
                state.fail_job(job, JobError::Unavailable(format!("submodel `{}` stopped", state.spec.name)));
            }
        }
        for r in &mut state.replicas {
            r.batches = None; // the stream finishes its batch and ends
            if let Some(a) = r.actor.take() {
                a.stop(None);
            }
        }
        state.status.set(SubmodelState::Stopped, 0);
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SubmodelMessage::Infer(job) => {
                if state.failed() {
                    state.dequeued(1);
                    let error = format!("submodel `{}` failed and is not serving", state.spec.name);
                    state.fail_job(job, JobError::Unavailable(error));
                } else {
                    state.queue.push_back(job);
                    state.dispatch(&myself);
                }
            }
            SubmodelMessage::BatchDone { replica, generation, failed, error, panicked, invalid } => {
                let stale = state.replicas.get(replica).is_none_or(|r| r.generation != generation);
                if !stale {
                    let r = &mut state.replicas[replica];
                    r.busy = false;
                    r.idle_since = Instant::now();
                    if panicked {
                        r.batches = None; // the stream has ended; the failure event restarts it
                    }
                }
                let error = error.unwrap_or_default();
                let alone = failed.len() == 1;
                let mut retry = Vec::new();
                for mut job in failed {
                    job.attempts += 1;
                    if !alone || (panicked && job.attempts < 2) {
                        // Row by row: a poison job then fails only itself; a panic is retried once.
                        job.alone = true;
                        retry.push(job);
                    } else if invalid {
                        // The caller's inputs, not the kernel: answered, not counted as failed.
                        job.answer(Err(JobError::InvalidInput(error.clone())));
                    } else {
                        state.fail_job(job, JobError::Failed(error.clone()));
                    }
                }
                if !retry.is_empty() {
                    state.metrics.queued.fetch_add(retry.len() as u64, Relaxed);
                    for job in retry.into_iter().rev() {
                        state.queue.push_front(job);
                    }
                }
                if state.failed() {
                    while let Some(job) = state.queue.pop_front() {
                        state.dequeued(1);
                        state.fail_job(job, JobError::Unavailable(error.clone()));
                    }
                }
                state.publish();
                state.dispatch(&myself);
            }
            SubmodelMessage::Flush => {
                state.flush_pending = false;
                state.dispatch(&myself);
            }
            SubmodelMessage::Restart(i) => {
                let generation = state.replicas[i].generation;
                let (tx, rx) = flume::bounded(1);
                let args = ReplicaArgs {
                    spec: state.spec.clone(),
                    registry: state.registry.clone(),
                    replica: i,
                    generation,
                    submodel: myself.clone(),
                    batches: rx,
                    metrics: state.metrics.clone(),
                };
                // Load off the actor: other replicas keep being served meanwhile.
                let me = myself.clone();
                tokio::spawn(async move {
                    let result = Actor::spawn_linked(None, ReplicaActor, args, me.get_cell())
                        .await
                        .map(|(actor, _)| Started { actor, batches: tx })
                        .map_err(|e| e.to_string());
                    let _ = me.cast(SubmodelMessage::Started { replica: i, generation, result });
                });
            }
            SubmodelMessage::Started { replica, generation, result } => {
                if state.replicas[replica].generation != generation {
                    if let Ok(s) = result {
                        s.actor.stop(None);
                    }
                    return Ok(());
                }
                match result {
                    Ok(s) => {
                        let r = &mut state.replicas[replica];
                        r.failed = false;
                        r.actor = Some(s.actor);
                        r.batches = Some(s.batches);
                        r.busy = false;
                        r.idle_since = Instant::now();
                        tracing::info!(submodel = %state.spec.name, replica, "replica restarted");
                        state.publish();
                        state.dispatch(&myself);
                    }
                    Err(e) => state.replica_down(&myself, replica, format!("restart failed: {e}")),
                }
            }
            SubmodelMessage::Drain(port) => {
                state.drains.push(port);
                state.check_drains();
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        // Decide deliberately: a replica's failure is this actor's to handle, never a reason to
        // stop the submodel.
        let (cell, reason) = match event {
            SupervisionEvent::ActorFailed(cell, err) => (cell, err.to_string()),
            SupervisionEvent::ActorTerminated(cell, _, reason) => (cell, reason.unwrap_or_else(|| "stopped".into())),
            _ => return Ok(()),
        };
        let id = cell.get_id();
        if let Some(i) = state.replicas.iter().position(|r| r.actor.as_ref().is_some_and(|a| a.get_id() == id)) {
            state.replica_down(&myself, i, reason);
        }
        Ok(())
    }
}
