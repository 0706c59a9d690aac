//! The actors of a training job: parameter servers, workers and (async) the staleness gate,
//! all spawned by and linked to one job actor, their supervisor.
//!
//! - A **server** ([`ServerActor`]) owns one contiguous range of the learning parameters and
//!   its optimizer state. Workers pull its range and push gradients for it; every payload is a
//!   byte buffer: a gradient is a [`crate::compress`] message, parameters are
//!   `[version: u64 LE][dense compress message]`. In sync mode a server holds the pushes of a
//!   step until every worker's has arrived, sums them in worker order (deterministic), applies
//!   the mean and answers every worker with its new range; at the end of each epoch it also
//!   reports its range to the job. In async mode it applies each push as it arrives and answers
//!   with its version.
//! - A **worker** ([`WorkerActor`]) owns an execution stream: an OS thread that builds the
//!   worker's own replica of the model and runs its shard's steps, talking to the servers and
//!   the gate by messages only. A panic on that thread fails the worker actor.
//! - The **gate** ([`GateActor`], async only) is the parameter clock and keeps the staleness
//!   bound: a worker reads the version before pulling, asks to push when its gradient is ready,
//!   and says when its push has been applied. A push is granted when it leaves no other
//!   gradient in flight more than `staleness` versions behind; pushes are granted one at a
//!   time and reads wait while one is being applied, so a pull never sees half a push.
//! - The **job actor** ([`JobActor`]) spawns the others linked to itself and turns a child's
//!   failure (a panic, a refused message) into [`Event::ActorFailed`] for the coordinator, which
//!   then stops the job: nothing is written. Stopping the job actor stops its children; a
//!   worker waiting on a stopped server sees its reply port dropped and ends.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ops::Range;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use maas_graphs::Graph;
use maas_kernels::Registry;
use ractor::{Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use tokio::sync::mpsc::UnboundedSender;

use crate::compress::{self, Compression, Compressor, MessageError};
use crate::data::Table;
use crate::job::{Job, Mode};
use crate::model::Model;
use crate::optim::OptimizerState;
use crate::partition::Layout;
use crate::trainer::{TrainError, batch, scheduled_lr};

/// What the actors tell the job's coordinator.
#[derive(Debug)]
pub enum Event {
    /// A worker applied a step (its loss and rows).
    Step {
        /// Epoch (from 1).
        epoch: usize,
        /// Mean loss of its batch.
        loss: f32,
        /// Rows in its batch.
        rows: usize,
    },
    /// Sync: a server's range at the end of an epoch.
    Epoch {
        /// Epoch (from 1).
        epoch: usize,
        /// The server.
        server: usize,
        /// Its parameters.
        params: Vec<f32>,
    },
    /// A worker finished its schedule: the bytes its compressors sent.
    Done {
        /// Bytes sent.
        bytes_sent: u64,
        /// Bytes the same gradients take dense.
        bytes_dense: u64,
    },
    /// A worker stopped with an error (divergence, cancellation, a refused message).
    Failed(TrainError),
    /// An actor of the job failed (a panic, a server refusing a message).
    ActorFailed {
        /// Which (`worker 1`, `server 0`, `gate`).
        actor: String,
        /// Why.
        reason: String,
    },
}

/// Parameters as they travel: `[version: u64 LE][dense compress message]`.
pub fn params_message(version: u64, values: &[f32]) -> Vec<u8> {
    let mut m = version.to_le_bytes().to_vec();
    m.extend(compress::encode(Compression::None, values));
    m
}

/// Reads a [`params_message`] of `expected` values.
pub fn read_params(msg: &[u8], expected: usize) -> Result<(u64, Vec<f32>), MessageError> {
    let Some((version, rest)) = msg.split_first_chunk::<8>() else {
        return Err(MessageError::Length { expected: 8, got: msg.len() });
    };
    Ok((u64::from_le_bytes(*version), compress::decode(rest, expected)?))
}

/// Each server's range cut at the tensor boundaries (ranges relative to the server's range):
/// a push carries one compressed message per piece, so every scale (int8's, sign's) and every
/// top-k selection is per tensor.
pub fn segments(layout: &Layout, parts: &[Range<usize>]) -> Vec<Vec<Range<usize>>> {
    parts
        .iter()
        .map(|p| {
            layout
                .tensors()
                .filter_map(|(_, _, t)| {
                    let (start, end) = (t.start.max(p.start), t.end.min(p.end));
                    (start < end).then(|| start - p.start..end - p.start)
                })
                .collect()
        })
        .collect()
}

/// A push: each piece's message prefixed by its length (u32 LE).
pub fn frame(messages: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::with_capacity(messages.iter().map(|m| 4 + m.len()).sum());
    for m in messages {
        out.extend_from_slice(&u32::try_from(m.len()).expect("a message under 4 GiB").to_le_bytes());
        out.extend_from_slice(m);
    }
    out
}

/// Reads a [`frame`]d push for a range cut into `segments`, into one gradient; every length is
/// checked (a short, long or mis-framed push is an error).
pub fn unframe(msg: &[u8], segments: &[Range<usize>]) -> Result<Vec<f32>, MessageError> {
    let total = segments.last().map_or(0, |s| s.end);
    let mut grad = Vec::with_capacity(total);
    let mut rest = msg;
    for seg in segments {
        let Some((len, tail)) = rest.split_first_chunk::<4>() else {
            return Err(MessageError::Length { expected: msg.len() - rest.len() + 4, got: msg.len() });
        };
        let len = u32::from_le_bytes(*len) as usize;
        if tail.len() < len {
            return Err(MessageError::Length { expected: msg.len() - tail.len() + len, got: msg.len() });
        }
        grad.extend(compress::decode(&tail[..len], seg.len())?);
        rest = &tail[len..];
    }
    if !rest.is_empty() {
        return Err(MessageError::Length { expected: msg.len() - rest.len(), got: msg.len() });
    }
    Ok(grad)
}

/// Reads a version (async push answer).
fn read_version(msg: &[u8]) -> Result<u64, MessageError> {
    msg.try_into().map(u64::from_le_bytes).map_err(|_| MessageError::Length { expected: 8, got: msg.len() })
}

/// What every actor of a job shares.
pub struct Shared {
    /// The job (its overrides applied).
    pub job: Job,
    /// The graph trained through.
    pub graph: Arc<Graph>,
    /// Where kinds are looked up.
    pub registry: Registry,
    /// The rows.
    pub table: Arc<Table>,
    /// The learning parameters' layout.
    pub layout: Layout,
    /// Each server's range of it.
    pub parts: Vec<Range<usize>>,
    /// Each server's range cut at tensor boundaries ([`segments`]).
    pub segments: Vec<Vec<Range<usize>>>,
    /// Steps per epoch (the longest shard's batches).
    pub steps_per_epoch: usize,
    /// Entries kept at zero (pruning's fine-tune), over the whole layout.
    pub mask: Option<Vec<bool>>,
    /// Requested to stop the job.
    pub cancel: Arc<crate::trainer::Cancel>,
    /// To the coordinator.
    pub events: UnboundedSender<Event>,
}

impl Shared {
    fn total_updates(&self) -> u64 {
        (self.steps_per_epoch * self.job.epochs * self.job.workers) as u64
    }

    /// The learning rate for the update that makes `version + 1`.
    fn lr(&self, version: u64) -> f64 {
        match self.job.mode {
            Mode::Sync => {
                let epoch = version / self.steps_per_epoch.max(1) as u64;
                scheduled_lr(&self.job, epoch as f64 / (self.job.epochs.max(2) - 1) as f64)
            }
            Mode::Async => {
                scheduled_lr(&self.job, version as f64 / self.total_updates().saturating_sub(1).max(1) as f64)
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Servers

/// A parameter server.
pub struct ServerActor;

/// What a server starts from.
pub struct ServerArgs {
    /// Which server (its range is `shared.parts[index]`).
    pub index: usize,
    /// Its range's initial values.
    pub params: Vec<f32>,
    /// The job.
    pub shared: Arc<Shared>,
}

/// A push a sync server holds until the step is complete: the message and where to answer.
type Pending = (Vec<u8>, RpcReplyPort<Vec<u8>>);

/// A server's state.
pub struct ServerState {
    index: usize,
    params: Vec<f32>,
    optimizer: OptimizerState,
    version: u64,
    /// Sync: the step's pushes so far, by worker.
    pending: Vec<Option<Pending>>,
    /// Its range's mask entries (true: kept at zero).
    mask: Option<Vec<bool>>,
    shared: Arc<Shared>,
}

/// Messages of a server.
pub enum ServerMessage {
    /// Its range: a [`params_message`].
    Pull(RpcReplyPort<Vec<u8>>),
    /// A worker's gradient for its range (a compress message). Answer, sync: its range after
    /// the step (a [`params_message`]); async: the version after the update (8 bytes).
    Push {
        /// The worker.
        worker: usize,
        /// The message.
        message: Vec<u8>,
        /// Where the answer goes.
        reply: RpcReplyPort<Vec<u8>>,
    },
}

// Local only: never sent to another process.
impl ractor::Message for ServerMessage {}

impl ServerState {
    /// One optimizer step; an error when it leaves a parameter NaN or infinite.
    fn apply(&mut self, grad: &[f32]) -> Result<(), String> {
        self.optimizer.set_lr(self.shared.lr(self.version));
        self.optimizer.step(&mut self.params, grad);
        if let Some(mask) = &self.mask {
            for (p, zero) in self.params.iter_mut().zip(mask) {
                if *zero {
                    *p = 0.0;
                }
            }
        }
        self.version += 1;
        if !self.params.iter().all(|p| p.is_finite()) {
            let e = TrainError::ParametersDiverged { server: self.index, update: self.version };
            let message = e.to_string();
            // Before the pending answers are dropped: the coordinator hears why first.
            let _ = self.shared.events.send(Event::Failed(e));
            return Err(message);
        }
        Ok(())
    }
}

impl Actor for ServerActor {
    type Msg = ServerMessage;
    type State = ServerState;
    type Arguments = ServerArgs;

    async fn pre_start(&self, _: ActorRef<Self::Msg>, args: ServerArgs) -> Result<ServerState, ActorProcessingErr> {
        let shared = args.shared;
        let range = shared.parts[args.index].clone();
        Ok(ServerState {
            index: args.index,
            optimizer: OptimizerState::new(shared.job.optimizer, args.params.len()),
            params: args.params,
            version: 0,
            pending: (0..shared.job.workers).map(|_| None).collect(),
            mask: shared.mask.as_ref().map(|m| m[range].to_vec()),
            shared,
        })
    }

    async fn handle(
        &self,
        _: ActorRef<Self::Msg>,
        msg: ServerMessage,
        s: &mut ServerState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ServerMessage::Pull(reply) => {
                let _ = reply.send(params_message(s.version, &s.params));
            }
            ServerMessage::Push { worker, message, reply } => match s.shared.job.mode {
                Mode::Async => {
                    let grad = unframe(&message, &s.shared.segments[s.index])?;
                    s.apply(&grad)?;
                    let _ = reply.send(s.version.to_le_bytes().to_vec());
                }
                Mode::Sync => {
                    let slot = s.pending.get_mut(worker).ok_or_else(|| format!("push from unknown worker {worker}"))?;
                    if slot.is_some() {
                        return Err(format!("worker {worker} pushed twice in step {}", s.version + 1).into());
                    }
                    *slot = Some((message, reply));
                    if s.pending.iter().all(Option::is_some) {
                        let mut sum = vec![0f32; s.params.len()];
                        let mut replies = Vec::with_capacity(s.pending.len());
                        for slot in &mut s.pending {
                            let (message, reply) = slot.take().expect("every worker pushed");
                            for (a, g) in sum.iter_mut().zip(unframe(&message, &s.shared.segments[s.index])?) {
                                *a += g;
                            }
                            replies.push(reply);
                        }
                        let scale = 1.0 / replies.len() as f32;
                        sum.iter_mut().for_each(|a| *a *= scale);
                        s.apply(&sum)?;
                        // The epoch's end goes out before the answers: the coordinator has it
                        // before any worker can say it is done.
                        let per_epoch = s.shared.steps_per_epoch.max(1) as u64;
                        if s.version.is_multiple_of(per_epoch) {
                            let _ = s.shared.events.send(Event::Epoch {
                                epoch: (s.version / per_epoch) as usize,
                                server: s.index,
                                params: s.params.clone(),
                            });
                        }
                        let answer = params_message(s.version, &s.params);
                        for reply in replies {
                            let _ = reply.send(answer.clone());
                        }
                    }
                }
            },
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// The staleness gate (async)

/// The async parameter clock and staleness bound.
pub struct GateActor;

/// The gate's state.
pub struct GateState {
    version: u64,
    bound: u64,
    /// Per worker: the version it read, while its gradient is computed or waits.
    in_flight: Vec<Option<u64>>,
    /// Reads waiting for the push being applied.
    reads: VecDeque<(usize, RpcReplyPort<u64>)>,
    /// Per worker: its request to push, while it waits.
    ready: Vec<Option<RpcReplyPort<Option<u64>>>>,
    /// The worker whose push is being applied.
    holder: Option<usize>,
    /// Workers that read and have not pulled yet: no push is granted meanwhile, so a pull never
    /// sees half of one.
    pulling: usize,
    /// The staleness of every granted push.
    staleness: Vec<u64>,
    retries: u64,
}

/// Messages of the gate.
pub enum GateMessage {
    /// A worker is about to pull: answers the version (and records the read).
    Read {
        /// The worker.
        worker: usize,
        /// The version read.
        reply: RpcReplyPort<u64>,
    },
    /// A worker's gradient is ready: answers `Some(version)` when it may push, `None` when it
    /// must drop it and compute it again on fresh parameters (the tie that would wait forever).
    Ready {
        /// The worker.
        worker: usize,
        /// The answer.
        reply: RpcReplyPort<Option<u64>>,
    },
    /// A worker that read has pulled every server's range: pushes may be granted again.
    Pulled {
        /// The worker.
        worker: usize,
    },
    /// The granted push has been applied by every server.
    Applied {
        /// The worker.
        worker: usize,
    },
    /// The staleness of every applied push and the retries.
    Report(RpcReplyPort<(Vec<u64>, u64)>),
}

// Local only: never sent to another process.
impl ractor::Message for GateMessage {}

impl GateState {
    /// Whether `w`'s push would leave another gradient in flight more than `bound` behind.
    fn push_blocked(&self, w: usize) -> bool {
        let next = self.version + 1;
        self.in_flight.iter().enumerate().any(|(j, r)| j != w && r.is_some_and(|r| next - r > self.bound))
    }

    /// Every gradient in flight waits, and `w` is the lowest-numbered of the oldest.
    fn must_retry(&self, w: usize) -> bool {
        let flying: Vec<(usize, u64)> =
            self.in_flight.iter().enumerate().filter_map(|(j, r)| r.map(|r| (j, r))).collect();
        flying.iter().all(|(j, _)| *j == w || self.ready[*j].is_some())
            && flying.iter().min_by_key(|(j, r)| (*r, *j)).is_some_and(|(j, _)| *j == w)
    }

    /// Answers what can be answered now.
    fn decide(&mut self) {
        loop {
            if self.holder.is_some() {
                return;
            }
            if self.pulling > 0 {
                // Reads go on together; grants wait until every reader has pulled.
                while let Some((w, reply)) = self.reads.pop_front() {
                    self.in_flight[w] = Some(self.version);
                    self.pulling += 1;
                    let _ = reply.send(self.version);
                }
                return;
            }
            let waiting: Vec<usize> = (0..self.ready.len()).filter(|w| self.ready[*w].is_some()).collect();
            if let Some(&w) = waiting.iter().find(|w| !self.push_blocked(**w)) {
                let reply = self.ready[w].take().expect("waiting");
                let read = self.in_flight[w].unwrap_or(self.version);
                self.staleness.push(self.version - read);
                self.holder = Some(w);
                let _ = reply.send(Some(self.version));
                return;
            }
            if let Some(&w) = waiting.iter().find(|w| self.must_retry(**w)) {
                let reply = self.ready[w].take().expect("waiting");
                self.in_flight[w] = None;
                self.retries += 1;
                let _ = reply.send(None);
                continue;
            }
            while let Some((w, reply)) = self.reads.pop_front() {
                self.in_flight[w] = Some(self.version);
                self.pulling += 1;
                let _ = reply.send(self.version);
            }
            return;
        }
    }
}

impl Actor for GateActor {
    type Msg = GateMessage;
    type State = GateState;
    type Arguments = (usize, u64);

    async fn pre_start(
        &self,
        _: ActorRef<Self::Msg>,
        (workers, bound): (usize, u64),
    ) -> Result<GateState, ActorProcessingErr> {
        Ok(GateState {
            version: 0,
            bound,
            in_flight: vec![None; workers],
            reads: VecDeque::new(),
            ready: (0..workers).map(|_| None).collect(),
            holder: None,
            pulling: 0,
            staleness: Vec::new(),
            retries: 0,
        })
    }

    async fn handle(
        &self,
        _: ActorRef<Self::Msg>,
        msg: GateMessage,
        s: &mut GateState,
    ) -> Result<(), ActorProcessingErr> {
        let workers = s.ready.len();
        let known = |w: usize| if w < workers { Ok(()) } else { Err(format!("message from unknown worker {w}")) };
        match msg {
            GateMessage::Read { worker, reply } => {
                known(worker)?;
                s.reads.push_back((worker, reply));
            }
            GateMessage::Ready { worker, reply } => {
                known(worker)?;
                s.ready[worker] = Some(reply);
            }
            GateMessage::Pulled { worker } => {
                known(worker)?;
                s.pulling = s.pulling.checked_sub(1).ok_or_else(|| format!("worker {worker} pulled without a read"))?;
            }
            GateMessage::Applied { worker } => {
                if s.holder != Some(worker) {
                    return Err(format!("worker {worker} applied a push it was not granted").into());
                }
                s.holder = None;
                s.version += 1;
                s.in_flight[worker] = None;
            }
            GateMessage::Report(reply) => {
                let _ = reply.send((s.staleness.clone(), s.retries));
            }
        }
        s.decide();
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Workers

/// A data-parallel worker (configuration only; its stream is started in `pre_start`).
pub struct WorkerActor;

/// What a worker starts from.
pub struct WorkerArgs {
    /// Which worker.
    pub index: usize,
    /// Its shard of the training rows.
    pub shard: Vec<usize>,
    /// The servers, in range order.
    pub servers: Vec<ActorRef<ServerMessage>>,
    /// The gate (async).
    pub gate: Option<ActorRef<GateMessage>>,
    /// The job.
    pub shared: Arc<Shared>,
}

/// Messages of a worker.
#[derive(Debug)]
pub enum WorkerMessage {
    /// Its stream ended: with a panic message if it panicked.
    StreamEnded(Option<String>),
}

// Local only: never sent to another process.
impl ractor::Message for WorkerMessage {}

/// Sends a message built around a reply port and waits for the answer on this (non-runtime)
/// thread. `None`: the actor stopped (the job is ending).
fn ask<M: ractor::Message, T: Send + 'static>(
    actor: &ActorRef<M>,
    make: impl FnOnce(RpcReplyPort<T>) -> M,
) -> Option<tokio::sync::oneshot::Receiver<T>> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    actor.send_message(make(tx.into())).ok()?;
    Some(rx)
}

/// Waits for an answer [`ask`]ed for.
fn answer<T>(shared: &Shared, rx: Option<tokio::sync::oneshot::Receiver<T>>) -> Result<T, TrainError> {
    rx.and_then(|rx| rx.blocking_recv().ok()).ok_or_else(|| stopped(shared))
}

/// The job is ending (a stopped actor, cancellation).
fn stopped(shared: &Shared) -> TrainError {
    if shared.cancel.requested() { TrainError::Cancelled } else { TrainError::Stopped }
}

/// A worker's stream: its model and its shard's steps.
struct Stream {
    index: usize,
    model: Model,
    shard: Vec<usize>,
    servers: Vec<ActorRef<ServerMessage>>,
    gate: Option<ActorRef<GateMessage>>,
    /// Per server, per piece of its range: a compressor (its error-feedback residual).
    compressors: Vec<Vec<Compressor>>,
    /// Bytes of the length prefixes of the pieces' messages, sent so far.
    framing: u64,
    shared: Arc<Shared>,
}

impl Stream {
    fn new(args: WorkerArgs) -> Result<Self, TrainError> {
        let shared = args.shared;
        Ok(Self {
            index: args.index,
            model: Model::new(&shared.graph, &shared.job, &shared.registry)?,
            shard: args.shard,
            servers: args.servers,
            gate: args.gate,
            compressors: shared
                .segments
                .iter()
                .map(|pieces| {
                    pieces.iter().map(|_| Compressor::new(shared.job.compression, shared.job.error_feedback)).collect()
                })
                .collect(),
            framing: 0,
            shared,
        })
    }

    /// Every server's range, concatenated.
    fn pull(&self) -> Result<Vec<f32>, TrainError> {
        let asks: Vec<_> = self.servers.iter().map(|s| ask(s, ServerMessage::Pull)).collect();
        let mut flat = Vec::with_capacity(self.shared.layout.len());
        for (a, range) in asks.into_iter().zip(&self.shared.parts) {
            let msg = answer(&self.shared, a)?;
            flat.extend(read_params(&msg, range.len())?.1);
        }
        Ok(flat)
    }

    /// The loss and flat gradient of `rows` on `flat`.
    fn compute(&self, flat: &[f32], rows: &[usize], epoch: usize, step: usize) -> Result<(f32, Vec<f32>), TrainError> {
        self.model.set_values(&self.shared.layout.unflatten(flat))?;
        let (inputs, labels) = batch(&self.shared.table, rows)?;
        let (loss, grads) = self.model.gradients(&inputs, &labels)?;
        if !loss.is_finite() {
            return Err(TrainError::Diverged { loss, epoch, step });
        }
        let mut grad = self.shared.layout.flatten(&grads).map_err(TrainError::Other)?;
        if !grad.iter().all(|g| g.is_finite()) {
            return Err(TrainError::GradientDiverged { epoch, step });
        }
        // Pruned entries stay at zero: their gradient is not sent (nor kept as a residual, nor
        // counted in a scale or a top-k selection).
        if let Some(mask) = &self.shared.mask {
            grad.iter_mut().zip(mask).filter(|(_, zero)| **zero).for_each(|(g, _)| *g = 0.0);
        }
        Ok((loss, grad))
    }

    /// Sends each server its part of `grad`, compressed; the answers in server order.
    fn push(&mut self, grad: &[f32]) -> Result<Vec<Vec<u8>>, TrainError> {
        let mut asks = Vec::with_capacity(self.servers.len());
        for (k, (server, range)) in self.servers.iter().zip(&self.shared.parts).enumerate() {
            let part = &grad[range.clone()];
            let messages = self.shared.segments[k]
                .iter()
                .zip(&mut self.compressors[k])
                .map(|(piece, c)| c.encode(&part[piece.clone()]))
                .collect::<Result<Vec<_>, _>>()?;
            self.framing += 4 * messages.len() as u64;
            let message = frame(&messages);
            asks.push(ask(server, |reply| ServerMessage::Push { worker: self.index, message, reply }));
        }
        asks.into_iter().map(|a| answer(&self.shared, a)).collect()
    }

    /// The rows of `step` in `order`, wrapping round a shorter shard.
    fn rows(&self, order: &[usize], step: usize) -> Vec<usize> {
        let b = self.shared.job.batch_size;
        (0..b.min(order.len())).map(|i| order[(step * b + i) % order.len()]).collect()
    }

    fn run(&mut self) -> Result<(), TrainError> {
        let job = &self.shared.job.clone();
        let per_epoch = self.shared.steps_per_epoch;
        let mut order = self.shard.clone();
        let mut flat = match job.mode {
            Mode::Sync => self.pull()?,
            Mode::Async => Vec::new(),
        };
        for epoch in 1..=job.epochs {
            // Sync shuffles the shard afresh each epoch; async shuffles on from the last order.
            if job.mode == Mode::Sync {
                order.clone_from(&self.shard);
            }
            order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(self.seed(epoch)));
            for step in 0..per_epoch {
                if self.shared.cancel.requested() {
                    return Err(TrainError::Cancelled);
                }
                let rows = self.rows(&order, step);
                let loss = match job.mode {
                    Mode::Sync => {
                        let (loss, grad) = self.compute(&flat, &rows, epoch, step + 1)?;
                        let answers = self.push(&grad)?;
                        flat.clear();
                        for (msg, range) in answers.iter().zip(&self.shared.parts) {
                            flat.extend(read_params(msg, range.len())?.1);
                        }
                        loss
                    }
                    Mode::Async => self.async_step(&rows, epoch, step + 1)?,
                };
                let _ = self.shared.events.send(Event::Step { epoch, loss, rows: rows.len() });
            }
        }
        Ok(())
    }

    /// The shuffle seed of `epoch` (as the sync and async schedules always had it).
    fn seed(&self, epoch: usize) -> u64 {
        let job = &self.shared.job;
        match job.mode {
            Mode::Sync => job.seed ^ ((epoch as u64) << 32) ^ self.index as u64,
            Mode::Async => job.seed ^ ((((epoch - 1) * self.shared.steps_per_epoch) as u64) << 32) ^ self.index as u64,
        }
    }

    /// Read, pull, compute, wait for the gate, push: again while the gate says retry.
    fn async_step(&mut self, rows: &[usize], epoch: usize, step: usize) -> Result<f32, TrainError> {
        let gate = self.gate.clone().ok_or_else(|| TrainError::Other("async without a gate".into()))?;
        let w = self.index;
        loop {
            answer(&self.shared, ask(&gate, |reply| GateMessage::Read { worker: w, reply }))?;
            let flat = self.pull()?;
            gate.send_message(GateMessage::Pulled { worker: w }).map_err(|_| stopped(&self.shared))?;
            let (loss, grad) = self.compute(&flat, rows, epoch, step)?;
            let granted = answer(&self.shared, ask(&gate, |reply| GateMessage::Ready { worker: w, reply }))?;
            if granted.is_none() {
                continue;
            }
            for msg in self.push(&grad)? {
                read_version(&msg)?;
            }
            gate.send_message(GateMessage::Applied { worker: w }).map_err(|_| stopped(&self.shared))?;
            return Ok(loss);
        }
    }
}

impl Actor for WorkerActor {
    type Msg = WorkerMessage;
    type State = ();
    type Arguments = WorkerArgs;

    async fn pre_start(&self, myself: ActorRef<Self::Msg>, args: WorkerArgs) -> Result<(), ActorProcessingErr> {
        let name = format!("maas-train-{}-{}", args.shared.job.name, args.index);
        std::thread::Builder::new().name(name).spawn(move || {
            let events = args.shared.events.clone();
            let result = catch_unwind(AssertUnwindSafe(move || {
                let mut stream = Stream::new(args)?;
                stream.run()?;
                // The bytes of every push, length prefixes included (also in the dense count).
                let sent =
                    stream.framing + stream.compressors.iter().flatten().map(Compressor::bytes_sent).sum::<u64>();
                let dense =
                    stream.framing + stream.compressors.iter().flatten().map(Compressor::bytes_dense).sum::<u64>();
                Ok::<_, TrainError>((sent, dense))
            }));
            let panic = match result {
                Ok(Ok((bytes_sent, bytes_dense))) => {
                    let _ = events.send(Event::Done { bytes_sent, bytes_dense });
                    None
                }
                Ok(Err(e)) => {
                    let _ = events.send(Event::Failed(e));
                    None
                }
                Err(p) => Some(
                    p.downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_else(|| "panicked".into()),
                ),
            };
            let _ = myself.send_message(WorkerMessage::StreamEnded(panic));
        })?;
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: WorkerMessage,
        _: &mut (),
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            WorkerMessage::StreamEnded(Some(panic)) => Err(format!("its stream panicked: {panic}").into()),
            WorkerMessage::StreamEnded(None) => {
                myself.stop(None);
                Ok(())
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Placement

/// A boxed future (what [`Placement`]'s methods answer).
pub type Spawning<T> = std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, String>> + Send>>;

/// Starts a job's workers and servers on the nodes the job places them on
/// ([`Job::worker_node`], [`Job::server_node`]). Each is represented here by a local actor
/// linked to the job actor: stopping it stops the remote one, and it fails (so the job stops)
/// when the remote one fails or its node is lost.
pub trait Placement: Send + Sync {
    /// Starts worker `index` on `node` with its `shard`; it talks to this process's `servers`
    /// and `gate`. Answers the actor standing for it, linked to `supervisor`.
    #[allow(clippy::too_many_arguments)]
    fn spawn_worker(
        &self,
        node: &str,
        index: usize,
        shard: Vec<usize>,
        servers: Vec<ActorRef<ServerMessage>>,
        gate: Option<ActorRef<GateMessage>>,
        shared: Arc<Shared>,
        supervisor: ActorCell,
    ) -> Spawning<ActorCell>;

    /// Starts server `index` on `node` from `params`. Answers the actor standing for it (its
    /// messages are forwarded to the node), linked to `supervisor`.
    fn spawn_server(
        &self,
        node: &str,
        index: usize,
        params: Vec<f32>,
        shared: Arc<Shared>,
        supervisor: ActorCell,
    ) -> Spawning<ActorRef<ServerMessage>>;
}

// ---------------------------------------------------------------------------------------------
// The job

/// The supervisor of a job's actors.
pub struct JobActor;

/// What the job actor starts: the servers' initial ranges and the workers' shards.
pub struct JobArgs {
    /// The job.
    pub shared: Arc<Shared>,
    /// Each server's initial range.
    pub params: Vec<Vec<f32>>,
    /// Each worker's shard.
    pub shards: Vec<Vec<usize>>,
    /// How workers and servers placed on nodes start there.
    pub placement: Option<Arc<dyn Placement>>,
}

/// The job actor's children.
pub struct JobState {
    servers: Vec<ActorRef<ServerMessage>>,
    gate: Option<ActorRef<GateMessage>>,
    names: HashMap<ActorId, String>,
    children: Vec<ActorCell>,
    events: UnboundedSender<Event>,
}

/// The servers (in range order) and the gate (async).
pub type Children = (Vec<ActorRef<ServerMessage>>, Option<ActorRef<GateMessage>>);

/// Messages of the job actor.
pub enum JobMessage {
    /// Its servers and gate.
    Children(RpcReplyPort<Children>),
}

// Local only: never sent to another process.
impl ractor::Message for JobMessage {}

impl Actor for JobActor {
    type Msg = JobMessage;
    type State = JobState;
    type Arguments = JobArgs;

    async fn pre_start(&self, myself: ActorRef<Self::Msg>, args: JobArgs) -> Result<JobState, ActorProcessingErr> {
        let shared = args.shared;
        let mut state = JobState {
            servers: Vec::new(),
            gate: None,
            names: HashMap::new(),
            children: Vec::new(),
            events: shared.events.clone(),
        };
        let placement = args.placement;
        let elsewhere = |what: &str, node: &str| -> Result<Arc<dyn Placement>, String> {
            placement
                .clone()
                .ok_or_else(|| format!("{what} is placed on node `{node}`, but this job runs without a cluster"))
        };
        let started = async {
            for (index, params) in args.params.into_iter().enumerate() {
                let s = match shared.job.server_node(index) {
                    Some(node) => {
                        let what = format!("server {index}");
                        elsewhere(&what, node)?
                            .spawn_server(node, index, params, shared.clone(), myself.get_cell())
                            .await
                            .map_err(|e| format!("{what} on node `{node}`: {e}"))?
                    }
                    None => {
                        Actor::spawn_linked(
                            None,
                            ServerActor,
                            ServerArgs { index, params, shared: shared.clone() },
                            myself.get_cell(),
                        )
                        .await
                        .map_err(|e| e.to_string())?
                        .0
                    }
                };
                state.names.insert(s.get_id(), format!("server {index}"));
                state.children.push(s.get_cell());
                state.servers.push(s);
            }
            if shared.job.mode == Mode::Async {
                let (g, _) =
                    Actor::spawn_linked(None, GateActor, (shared.job.workers, shared.job.staleness), myself.get_cell())
                        .await
                        .map_err(|e| e.to_string())?;
                state.names.insert(g.get_id(), "gate".into());
                state.children.push(g.get_cell());
                state.gate = Some(g);
            }
            for (index, shard) in args.shards.into_iter().enumerate() {
                let w = match shared.job.worker_node(index) {
                    Some(node) => {
                        let what = format!("worker {index}");
                        elsewhere(&what, node)?
                            .spawn_worker(
                                node,
                                index,
                                shard,
                                state.servers.clone(),
                                state.gate.clone(),
                                shared.clone(),
                                myself.get_cell(),
                            )
                            .await
                            .map_err(|e| format!("{what} on node `{node}`: {e}"))?
                    }
                    None => {
                        let worker_args = WorkerArgs {
                            index,
                            shard,
                            servers: state.servers.clone(),
                            gate: state.gate.clone(),
                            shared: shared.clone(),
                        };
                        Actor::spawn_linked(None, WorkerActor, worker_args, myself.get_cell())
                            .await
                            .map_err(|e| e.to_string())?
                            .0
                            .get_cell()
                    }
                };
                state.names.insert(w.get_id(), format!("worker {index}"));
                state.children.push(w);
            }
            Ok::<_, String>(())
        }
        .await;
        if let Err(e) = started {
            state.children.iter().for_each(|c| c.stop(None));
            // Waited for, as in `post_stop`: what is left when this returns is killed.
            myself.stop_children_and_wait(None, Some(std::time::Duration::from_secs(5))).await;
            return Err(e.into());
        }
        Ok(state)
    }

    async fn post_stop(&self, myself: ActorRef<Self::Msg>, state: &mut JobState) -> Result<(), ActorProcessingErr> {
        state.children.iter().for_each(|c| c.stop(None));
        // Waited for: an actor standing for a worker or server on another process tells it
        // to stop in its own `post_stop`, which the kill of whatever is left when this actor
        // ends would skip.
        myself.stop_children_and_wait(None, Some(std::time::Duration::from_secs(5))).await;
        Ok(())
    }

    async fn handle(
        &self,
        _: ActorRef<Self::Msg>,
        msg: JobMessage,
        state: &mut JobState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            JobMessage::Children(reply) => {
                let _ = reply.send((state.servers.clone(), state.gate.clone()));
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        _: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut JobState,
    ) -> Result<(), ActorProcessingErr> {
        if let SupervisionEvent::ActorFailed(cell, reason) = event {
            let actor = state.names.get(&cell.get_id()).cloned().unwrap_or_else(|| "an actor".into());
            let _ = state.events.send(Event::ActorFailed { actor, reason: reason.to_string() });
        }
        Ok(())
    }
}

/// The servers' ranges concatenated (their versions must agree).
pub async fn snapshot(servers: &[ActorRef<ServerMessage>], parts: &[Range<usize>]) -> Result<Vec<f32>, TrainError> {
    let mut flat = Vec::new();
    for (s, range) in servers.iter().zip(parts) {
        let msg = ractor::call!(s, ServerMessage::Pull).map_err(|_| TrainError::Stopped)?;
        flat.extend(read_params(&msg, range.len())?.1);
    }
    Ok(flat)
}

/// Per-epoch bookkeeping of the coordinator (sync: losses and the servers' epoch-end ranges).
#[derive(Default)]
pub struct EpochLog {
    /// Loss sum, rows, steps.
    pub steps: BTreeMap<usize, (f64, usize, usize)>,
    /// Per epoch, per server: its range.
    pub ranges: BTreeMap<usize, BTreeMap<usize, Vec<f32>>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Layout {
        Layout::new(&BTreeMap::from([("a".to_string(), vec![2, 3]), ("b".to_string(), vec![4])]))
    }

    #[test]
    fn a_servers_range_is_cut_at_tensor_boundaries() {
        let parts = crate::partition::ranges(10, 3);
        let cut = segments(&layout(), &parts);
        // Each server's pieces cover its range exactly, and none crosses from `a` (0..6) to `b`.
        for (p, pieces) in parts.iter().zip(&cut) {
            assert_eq!(pieces.first().unwrap().start, 0);
            assert_eq!(pieces.last().unwrap().end, p.len());
            assert!(pieces.windows(2).all(|w| w[0].end == w[1].start));
            assert!(pieces.iter().all(|s| { p.start + s.end <= 6 || p.start + s.start >= 6 }), "{parts:?} {cut:?}");
        }
    }

    #[test]
    fn framed_pushes_round_trip_and_every_length_is_checked() {
        let pieces = vec![0..6, 6..10];
        let grad: Vec<f32> = (0..10).map(|i| i as f32 - 4.5).collect();
        let messages: Vec<Vec<u8>> =
            pieces.iter().map(|p| compress::encode(Compression::Int8, &grad[p.clone()])).collect();
        let framed = frame(&messages);
        assert_eq!(
            framed.len(),
            8 + messages.iter().map(Vec::len).sum::<usize>(),
            "the bytes counted are the bytes sent"
        );
        let back = unframe(&framed, &pieces).unwrap();
        for (a, b) in back.iter().zip(&grad) {
            assert!((a - b).abs() < 0.05, "{a} vs {b}");
        }
        // Truncated anywhere, one byte too many, or framed for other pieces: refused.
        for cut in [0, 3, 4, framed.len() - 1] {
            assert!(unframe(&framed[..cut], &pieces).is_err(), "cut at {cut}");
        }
        let mut long = framed.clone();
        long.push(0);
        assert!(unframe(&long, &pieces).is_err());
        assert!(unframe(&framed, &[0..5, 5..10]).is_err());
        // Each piece has its own scale: a tiny tensor beside a large one keeps its values.
        let small_and_large = [0.001f32, -0.002, 0.003, 100.0, -200.0];
        let pieces = vec![0..3, 3..5];
        let messages: Vec<Vec<u8>> =
            pieces.iter().map(|p| compress::encode(Compression::Int8, &small_and_large[p.clone()])).collect();
        let back = unframe(&frame(&messages), &pieces).unwrap();
        assert!((back[1] + 0.002).abs() < 1e-4, "{back:?}");
    }

    #[test]
    fn parameters_travel_with_their_version() {
        let msg = params_message(7, &[1.0, -2.0]);
        assert_eq!(read_params(&msg, 2).unwrap(), (7, vec![1.0, -2.0]));
        assert!(read_params(&msg[..7], 2).is_err());
        assert!(read_params(&msg, 3).is_err());
    }
}
