//! Running a training job: the coordinator of its actors ([`crate::actors`]: data-parallel
//! workers, parameter servers and, in async mode, the staleness gate), which talk only in byte
//! messages (the [`crate::compress`] format: what will cross processes).
//!
//! - The rows are split once into training and held-out rows (a shuffle seeded by
//!   `split_seed`, the last `ceil(held_out * rows)` held out), and the training rows into
//!   `workers` disjoint shards (round robin over a shuffle seeded by `seed`).
//! - The learning tensors are one flat vector ([`crate::partition::Layout`]) cut into `servers`
//!   contiguous ranges; server `k` owns range `k` and its optimizer state. A worker sends a
//!   server one compressed message per tensor piece of its range (one `Compressor`, so one
//!   error-feedback residual and one scale, per worker, server and tensor).
//! - **Sync** (`mode = "sync"`): each step every worker takes the next `batch_size` rows of its
//!   shard, computes the mean cross-entropy and its gradient with the current parameters and
//!   pushes; each server waits for every worker's push, decodes them in worker order, averages,
//!   applies its optimizer and answers every worker with its new range. Deterministic for a
//!   seed.
//! - **Async** (`mode = "async"`): each worker loops on its own: read the version from the
//!   gate, pull, compute, ask the gate to push, push; the servers apply each gradient when it
//!   arrives (the version counts the updates). The staleness of a gradient is the number of
//!   updates applied between the worker's read and its own; it never exceeds `staleness`: a
//!   worker whose push would leave another worker's gradient in flight more than `staleness`
//!   versions behind waits until that one has pushed. (When the two oldest gradients in flight
//!   were read at the same version and both are at the bound, each would wait for the other:
//!   the lower-numbered worker drops its gradient unsent and computes it again on fresh
//!   parameters; `retries` counts these.) The staleness of every applied gradient is reported.
//! - **Pruning** (`prune`): after training, the smallest-magnitude fraction of every tensor of
//!   rank 2 or more is zeroed, then a fine-tune phase runs with the servers holding those
//!   entries at zero.
//!
//! A loss, gradient or parameter that turns NaN or infinite, a failed actor, or a cancellation
//! stops the job with an error; nothing is written.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{Device, Tensor};
use maas_graphs::Graph;
use maas_kernels::Registry;
use ractor::{Actor, ActorRef};
use rand::SeedableRng;
use rand::seq::SliceRandom;

use crate::actors::{
    EpochLog, Event, GateMessage, JobActor, JobArgs, JobMessage, Placement, ServerMessage, Shared, read_params,
    segments, snapshot,
};
use crate::compress;
use crate::data::{self, Table};
use crate::job::{Job, Mode};
use crate::model::{Model, ModelError};
use crate::partition::{Layout, ranges};

/// A job's cancellation: requested by its owner, checked by the workers at each step, and
/// closed by the job itself when it starts writing (from then on a request is refused: the
/// job finishes). Shared between the owner and the job.
#[derive(Debug, Default)]
pub struct Cancel(std::sync::atomic::AtomicU8);

const RUNNING: u8 = 0;
const REQUESTED: u8 = 1;
const COMMITTED: u8 = 2;

impl Cancel {
    /// Asks the job to stop; `false` when it is writing its results already (too late).
    pub fn request(&self) -> bool {
        use std::sync::atomic::Ordering::SeqCst;
        matches!(self.0.compare_exchange(RUNNING, REQUESTED, SeqCst, SeqCst), Ok(_) | Err(REQUESTED))
    }

    /// Whether a stop was asked for.
    pub fn requested(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::SeqCst) == REQUESTED
    }

    /// The job starts writing: `false` when a stop was asked for first.
    pub fn commit(&self) -> bool {
        use std::sync::atomic::Ordering::SeqCst;
        matches!(self.0.compare_exchange(RUNNING, COMMITTED, SeqCst, SeqCst), Ok(_) | Err(COMMITTED))
    }
}

/// Why a job failed (nothing is written then).
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The data could not be read or is invalid.
    #[error(transparent)]
    Data(#[from] data::DataError),
    /// The model could not be built or run.
    #[error(transparent)]
    Model(Box<ModelError>),
    /// The loss stopped being a number.
    #[error("the loss became {loss} at epoch {epoch}, step {step}: stopped; nothing was written")]
    Diverged {
        /// The loss value.
        loss: f32,
        /// Epoch (from 1).
        epoch: usize,
        /// Step within it (from 1).
        step: usize,
    },
    /// A gradient stopped being finite (before the loss did).
    #[error("the gradient became NaN or infinite at epoch {epoch}, step {step}: stopped; nothing was written")]
    GradientDiverged {
        /// Epoch (from 1).
        epoch: usize,
        /// Step within it (from 1).
        step: usize,
    },
    /// A server's parameters stopped being finite (the learning rate is too high for them).
    #[error(
        "the parameters of server {server} became NaN or infinite at update {update}: stopped; nothing was written (lower the learning rate)"
    )]
    ParametersDiverged {
        /// The server.
        server: usize,
        /// The update that made them so (from 1).
        update: u64,
    },
    /// A message between workers and servers was refused.
    #[error("message between worker and server: {0}")]
    Message(#[from] compress::MessageError),
    /// The job was cancelled.
    #[error("the job was cancelled; nothing was written")]
    Cancelled,
    /// An actor of the job stopped while another waited for it (the job is ending).
    #[error("the job's actors stopped")]
    Stopped,
    /// A worker, server or the gate failed (a panic, a refused message); the job stopped.
    #[error("{actor} failed: {reason}; the job stopped and nothing was written")]
    ActorFailed {
        /// Which actor.
        actor: String,
        /// Why.
        reason: String,
    },
    /// Something else (a thread, the output directory).
    #[error("{0}")]
    Other(String),
}

impl From<ModelError> for TrainError {
    fn from(e: ModelError) -> Self {
        Self::Model(Box::new(e))
    }
}

/// Observed staleness of applied gradients (async; zero in sync).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Staleness {
    /// The largest.
    pub max: u64,
    /// The mean.
    pub mean: f64,
    /// The bound (`staleness`).
    pub bound: u64,
    /// Gradients dropped unsent and computed again to keep the bound (async).
    pub retries: u64,
}

/// What a finished job reports (`maas train` prints it as JSON).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    /// The job's name.
    pub job: String,
    /// Held-out accuracy, 0..1.
    pub accuracy: f64,
    /// Mean training loss of the last epoch.
    pub loss: f64,
    /// Epochs run.
    pub epochs: usize,
    /// Gradient steps applied (per server).
    pub steps: u64,
    /// Workers.
    pub workers: usize,
    /// Parameter servers.
    pub servers: usize,
    /// `sync` or `async`.
    pub mode: String,
    /// As written (`none`, `topk:0.01`, ...).
    pub compression: String,
    /// Whether error feedback was on.
    pub error_feedback: bool,
    /// Bytes of every gradient message workers sent.
    pub bytes_sent: u64,
    /// Bytes the same gradients take as dense messages.
    pub bytes_dense: u64,
    /// Observed staleness.
    pub staleness: Staleness,
    /// Wall time of the training (data loading and saving included).
    pub elapsed_s: f64,
    /// Training rows processed per second.
    pub samples_per_s: f64,
    /// Rows trained on and held out.
    pub rows: (usize, usize),
    /// Learning submodel -> the safetensors file written.
    pub weights: BTreeMap<String, PathBuf>,
    /// A version for the trained weights: the job's name and a digest of their values.
    pub version: String,
    /// What pruning did (`prune` set).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pruning: Option<Pruning>,
}

/// Inputs and labels of some rows, as tensors.
pub(crate) fn batch(table: &Table, rows: &[usize]) -> Result<(BTreeMap<String, Tensor>, Tensor), TrainError> {
    let part = table.select(rows);
    let mut inputs = BTreeMap::new();
    for (name, width, values) in part.inputs {
        let t = Tensor::from_vec(values, (rows.len(), width), &Device::Cpu)
            .map_err(|e| TrainError::Other(format!("input `{name}`: {e}")))?;
        inputs.insert(name, t);
    }
    let labels =
        Tensor::from_vec(part.labels, rows.len(), &Device::Cpu).map_err(|e| TrainError::Other(e.to_string()))?;
    Ok((inputs, labels))
}

/// Fraction of `rows` whose highest logit is their label.
fn accuracy(model: &Model, table: &Table, rows: &[usize]) -> Result<f64, TrainError> {
    if rows.is_empty() {
        return Ok(0.0);
    }
    let mut correct = 0usize;
    for chunk in rows.chunks(256) {
        let (inputs, labels) = batch(table, chunk)?;
        let logits = model.logits(&inputs)?;
        let pred: Vec<u32> = logits
            .argmax(candle_core::D::Minus1)
            .and_then(|p| p.to_vec1())
            .map_err(|e| TrainError::Other(e.to_string()))?;
        let want: Vec<u32> = labels.to_vec1().map_err(|e| TrainError::Other(e.to_string()))?;
        correct += pred.iter().zip(&want).filter(|(a, b)| a == b).count();
    }
    Ok(correct as f64 / rows.len() as f64)
}

/// FNV-1a over the parameters' bytes.
fn digest(values: &[f32]) -> u64 {
    values
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
}

/// The learning rate at `progress` (0 at the start, 1 at the end of training): `lr` decaying
/// linearly to `lr * lr_decay_to`.
pub(crate) fn scheduled_lr(job: &Job, progress: f64) -> f64 {
    job.optimizer.lr() * (1.0 - (1.0 - job.lr_decay_to) * progress.clamp(0.0, 1.0))
}

/// The training and held-out rows: a shuffle seeded by `split_seed`, the last
/// `ceil(held_out * rows)` held out.
pub fn split(rows: usize, held_out: f64, split_seed: u64) -> (Vec<usize>, Vec<usize>) {
    let mut order: Vec<usize> = (0..rows).collect();
    order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(split_seed));
    let test = ((held_out * rows as f64).ceil() as usize).min(rows);
    let test_rows = order.split_off(rows - test);
    (order, test_rows)
}

/// How a training goes, once per epoch.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Progress {
    /// `train`, or `fine_tune` (after pruning).
    pub phase: &'static str,
    /// Epochs done in this phase (from 1).
    pub epoch: usize,
    /// Epochs of this phase.
    pub epochs: usize,
    /// Mean training loss of the epoch.
    pub loss: f64,
    /// Held-out accuracy after it, 0..1.
    pub accuracy: f64,
}

impl std::fmt::Display for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let phase = if self.phase == "train" { "epoch" } else { "fine-tune epoch" };
        write!(
            f,
            "{phase} {}/{}: loss {:.4}, held-out accuracy {:.2}%",
            self.epoch,
            self.epochs,
            self.loss,
            100.0 * self.accuracy
        )
    }
}

/// What pruning did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Pruning {
    /// The fraction of each weight matrix zeroed.
    pub sparsity: f64,
    /// Held-out accuracy before pruning.
    pub accuracy_before: f64,
    /// Right after zeroing, before the fine-tune.
    pub accuracy_pruned: f64,
    /// After the fine-tune (the job's `accuracy`).
    pub accuracy_after: f64,
    /// Fine-tune epochs.
    pub fine_tune_epochs: usize,
    /// Non-zero entries of the pruned tensors (every learning tensor of rank 2 or more) after
    /// the fine-tune.
    pub nonzero: usize,
    /// Entries of those tensors.
    pub total: usize,
    /// Non-zero entries of every learning tensor (biases included) after the fine-tune.
    pub nonzero_all: usize,
}

/// The `sparsity` smallest-magnitude entries of every tensor of rank 2 or more, over the
/// flat layout (true: zeroed).
pub fn magnitude_mask(layout: &Layout, flat: &[f32], sparsity: f64) -> Vec<bool> {
    let mut mask = vec![false; flat.len()];
    for (_, shape, range) in layout.tensors() {
        if shape.len() < 2 {
            continue;
        }
        let mut order: Vec<usize> = range.clone().collect();
        order.sort_by(|a, b| flat[*a].abs().total_cmp(&flat[*b].abs()).then(a.cmp(b)));
        let k = (sparsity * range.len() as f64).floor() as usize;
        for &i in &order[..k.min(order.len())] {
            mask[i] = true;
        }
    }
    mask
}

/// Runs `job` on `graph` and writes the trained submodels into `out`: the job's actors on a
/// runtime of its own (call it from outside any async runtime; inside one, use [`run`]).
pub fn train(
    graph: &Graph,
    job: &Job,
    registry: &Registry,
    out: &Path,
    progress: &(dyn Fn(&Progress) + Send + Sync),
) -> Result<Report, TrainError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("maas-train-rt")
        .enable_all()
        .build()
        .map_err(|e| TrainError::Other(format!("the training runtime: {e}")))?;
    let cancel = Arc::new(Cancel::default());
    runtime.block_on(run(Arc::new(graph.clone()), job.clone(), registry.clone(), out.to_path_buf(), cancel, progress))
}

/// What the coordinator knows before the actors start.
struct Setup {
    table: Arc<Table>,
    model: Arc<Model>,
    layout: Layout,
    init: Vec<f32>,
    train_rows: Vec<usize>,
    test_rows: Arc<Vec<usize>>,
    shards: Vec<Vec<usize>>,
}

/// What one phase (training, or pruning's fine-tune) ends with.
struct Phase {
    flat: Vec<f32>,
    loss: f64,
    samples: usize,
    steps: u64,
    bytes_sent: u64,
    bytes_dense: u64,
    staleness: Vec<u64>,
    retries: u64,
}

/// Held-out accuracy of `flat`, off the async threads.
async fn evaluate(setup: &Setup, flat: Vec<f32>) -> Result<f64, TrainError> {
    let (model, table, rows, values) =
        (setup.model.clone(), setup.table.clone(), setup.test_rows.clone(), setup.layout.unflatten(&flat));
    tokio::task::spawn_blocking(move || {
        model.set_values(&values)?;
        accuracy(&model, &table, &rows)
    })
    .await
    .map_err(|e| TrainError::Other(format!("evaluation: {e}")))?
}

/// Runs `job` on `graph`, its workers, parameter servers and gate as actors on the current
/// runtime, and writes the trained submodels into `out`. Requesting `cancel` stops it with
/// [`TrainError::Cancelled`]; a failed or cancelled job writes nothing. The files are written
/// under temporary names and renamed into `out` once all are written.
pub async fn run(
    graph: Arc<Graph>,
    job: Job,
    registry: Registry,
    out: PathBuf,
    cancel: Arc<Cancel>,
    progress: &(dyn Fn(&Progress) + Send + Sync),
) -> Result<Report, TrainError> {
    run_placed(graph, job, registry, out, cancel, progress, None).await
}

/// [`run`], with the workers and servers the job places on nodes started there by `placement`.
pub async fn run_placed(
    graph: Arc<Graph>,
    job: Job,
    registry: Registry,
    out: PathBuf,
    cancel: Arc<Cancel>,
    progress: &(dyn Fn(&Progress) + Send + Sync),
    placement: Option<Arc<dyn Placement>>,
) -> Result<Report, TrainError> {
    let start = Instant::now();
    let setup = {
        let (graph, job, registry) = (graph.clone(), job.clone(), registry.clone());
        tokio::task::spawn_blocking(move || -> Result<Setup, TrainError> {
            let table = Arc::new(data::load(&job.data.path, &job.data.columns)?);
            let (train_rows, test_rows) = split(table.rows(), job.held_out, job.split_seed);
            if train_rows.len() < job.workers {
                return Err(TrainError::Other(format!(
                    "{} training rows are left after the held-out split, fewer than the {} workers (each needs a shard)",
                    train_rows.len(),
                    job.workers
                )));
            }
            let model = Model::new(&graph, &job, &registry)?;
            let layout = Layout::new(&model.shapes());
            if layout.len() < job.servers {
                return Err(TrainError::Other(format!(
                    "the learning submodels have {} parameters, fewer than the {} servers (each needs a range)",
                    layout.len(),
                    job.servers
                )));
            }
            let init = layout.flatten(&model.values()?).map_err(TrainError::Other)?;
            // Shards: round robin over a seeded shuffle of the training rows.
            let mut shuffled = train_rows.clone();
            shuffled.shuffle(&mut rand::rngs::StdRng::seed_from_u64(job.seed));
            let shards =
                (0..job.workers).map(|w| shuffled.iter().skip(w).step_by(job.workers).copied().collect()).collect();
            Ok(Setup {
                table,
                model: Arc::new(model),
                layout,
                init,
                train_rows,
                test_rows: Arc::new(test_rows),
                shards,
            })
        })
        .await
        .map_err(|e| TrainError::Other(format!("setting up: {e}")))??
    };

    let placed = Placed { placement: placement.as_ref(), cancel: &cancel, progress };
    let trained = phase(&graph, &job, &registry, &setup, setup.init.clone(), None, "train", &placed).await?;
    let mut accuracy = evaluate(&setup, trained.flat.clone()).await?;
    let mut last = trained;
    let mut total = last.clone_counts();
    let mut pruning = None;
    if let Some(sparsity) = job.prune {
        let mask = magnitude_mask(&setup.layout, &last.flat, sparsity);
        let mut pruned = last.flat.clone();
        pruned.iter_mut().zip(&mask).filter(|(_, z)| **z).for_each(|(p, _)| *p = 0.0);
        let accuracy_pruned = evaluate(&setup, pruned.clone()).await?;
        // The fine-tune: the job's final learning rate, constant, the pruned entries held at 0.
        let mut tune = job.clone();
        tune.epochs = job.prune_epochs;
        tune.optimizer = job.optimizer.with_lr(job.optimizer.lr() * job.lr_decay_to);
        tune.lr_decay_to = 1.0;
        let tuned = phase(&graph, &tune, &registry, &setup, pruned, Some(mask), "fine_tune", &placed).await?;
        let accuracy_after = evaluate(&setup, tuned.flat.clone()).await?;
        let (mut nonzero, mut entries) = (0, 0);
        for (_, shape, range) in setup.layout.tensors() {
            if shape.len() >= 2 {
                nonzero += tuned.flat[range.clone()].iter().filter(|v| **v != 0.0).count();
                entries += range.len();
            }
        }
        pruning = Some(Pruning {
            sparsity,
            accuracy_before: accuracy,
            accuracy_pruned,
            accuracy_after,
            fine_tune_epochs: tune.epochs,
            nonzero,
            total: entries,
            nonzero_all: tuned.flat.iter().filter(|v| **v != 0.0).count(),
        });
        accuracy = accuracy_after;
        total.add(&tuned);
        last = tuned;
    }

    let flat = last.flat;
    // The point of no return: from here a cancellation is refused and the job finishes.
    if !cancel.commit() {
        return Err(TrainError::Cancelled);
    }
    let weights = {
        let (model, values, out) = (setup.model.clone(), setup.layout.unflatten(&flat), out.clone());
        tokio::task::spawn_blocking(move || save(&model, &values, &out))
            .await
            .map_err(|e| TrainError::Other(format!("saving: {e}")))??
    };
    let staleness = Staleness {
        max: total.staleness.iter().copied().max().unwrap_or(0),
        mean: if total.staleness.is_empty() {
            0.0
        } else {
            total.staleness.iter().sum::<u64>() as f64 / total.staleness.len() as f64
        },
        bound: job.staleness,
        retries: total.retries,
    };
    let elapsed = start.elapsed().as_secs_f64();
    Ok(Report {
        job: job.name.clone(),
        accuracy,
        loss: last.loss,
        epochs: job.epochs,
        steps: total.steps,
        workers: job.workers,
        servers: job.servers,
        mode: match job.mode {
            Mode::Sync => "sync".into(),
            Mode::Async => "async".into(),
        },
        compression: job.compression.to_string(),
        error_feedback: job.error_feedback,
        bytes_sent: total.bytes_sent,
        bytes_dense: total.bytes_dense,
        staleness,
        elapsed_s: elapsed,
        samples_per_s: total.samples as f64 / elapsed.max(1e-9),
        rows: (setup.train_rows.len(), setup.test_rows.len()),
        weights,
        version: format!("{}-{:016x}", job.name, digest(&flat)),
        pruning,
    })
}

/// Writes every learning submodel's file into a fresh directory inside `out`, then renames
/// each into `out`: a failure leaves no file of this job in `out`.
fn save(
    model: &Model,
    values: &BTreeMap<String, Vec<f32>>,
    out: &Path,
) -> Result<BTreeMap<String, PathBuf>, TrainError> {
    model.set_values(values)?;
    std::fs::create_dir_all(out).map_err(|e| TrainError::Other(format!("creating {}: {e}", out.display())))?;
    let stage = out.join(format!(".maas-train-{}-{}", std::process::id(), start_nanos()));
    let written = model.save(&stage);
    let result = written.map_err(TrainError::from).and_then(|files| {
        let mut done = BTreeMap::new();
        for (submodel, staged) in files {
            let path = out.join(staged.file_name().expect("a file name"));
            std::fs::rename(&staged, &path)
                .map_err(|e| TrainError::Other(format!("moving {} into place: {e}", path.display())))?;
            done.insert(submodel, path);
        }
        Ok(done)
    });
    let _ = std::fs::remove_dir_all(&stage);
    result
}

/// Nanoseconds since the epoch (a unique-enough name for a staging directory).
fn start_nanos() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos())
}

impl Phase {
    /// Its counters, without the parameters.
    fn clone_counts(&self) -> Self {
        Self {
            flat: Vec::new(),
            loss: self.loss,
            samples: self.samples,
            steps: self.steps,
            bytes_sent: self.bytes_sent,
            bytes_dense: self.bytes_dense,
            staleness: self.staleness.clone(),
            retries: self.retries,
        }
    }

    /// Adds `other`'s counters.
    fn add(&mut self, other: &Phase) {
        self.samples += other.samples;
        self.steps += other.steps;
        self.bytes_sent += other.bytes_sent;
        self.bytes_dense += other.bytes_dense;
        self.staleness.extend(&other.staleness);
        self.retries += other.retries;
    }
}

/// What every phase of a run shares: where its actors start, its cancellation, its progress.
struct Placed<'a> {
    placement: Option<&'a Arc<dyn Placement>>,
    cancel: &'a Arc<Cancel>,
    progress: &'a (dyn Fn(&Progress) + Send + Sync),
}

/// One phase: the job's actors started from `init` (with `mask`'s entries held at zero), run
/// to the end of `job.epochs`, their parameters read back, the actors stopped.
#[allow(clippy::too_many_arguments)]
async fn phase(
    graph: &Arc<Graph>,
    job: &Job,
    registry: &Registry,
    setup: &Setup,
    init: Vec<f32>,
    mask: Option<Vec<bool>>,
    name: &'static str,
    placed: &Placed<'_>,
) -> Result<Phase, TrainError> {
    let (cancel, progress) = (placed.cancel, placed.progress);
    let parts = ranges(setup.layout.len(), job.servers);
    let steps_per_epoch = setup.shards.iter().map(|s| s.len().div_ceil(job.batch_size)).max().unwrap_or(1);
    let (events, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        job: job.clone(),
        graph: graph.clone(),
        registry: registry.clone(),
        table: setup.table.clone(),
        layout: setup.layout.clone(),
        segments: segments(&setup.layout, &parts),
        parts: parts.clone(),
        steps_per_epoch,
        mask,
        cancel: cancel.clone(),
        events,
    });
    let args = JobArgs {
        params: parts.iter().map(|r| init[r.clone()].to_vec()).collect(),
        shards: setup.shards.clone(),
        shared: shared.clone(),
        placement: placed.placement.cloned(),
    };
    drop(shared);
    let (actor, handle) = Actor::spawn(None, JobActor, args).await.map_err(|e| {
        let reason = match e {
            ractor::SpawnErr::StartupFailed(why) => why.to_string(),
            other => other.to_string(),
        };
        TrainError::ActorFailed { actor: "the job".into(), reason }
    })?;
    let result = drive(job, setup, &parts, steps_per_epoch, name, &actor, &mut rx, progress, cancel).await;
    actor.stop(None);
    let _ = handle.await;
    result
}

/// The coordinator's loop: events until every worker is done, then the parameters.
#[allow(clippy::too_many_arguments)]
async fn drive(
    job: &Job,
    setup: &Setup,
    parts: &[std::ops::Range<usize>],
    steps_per_epoch: usize,
    name: &'static str,
    actor: &ActorRef<JobMessage>,
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<Event>,
    progress: &(dyn Fn(&Progress) + Send + Sync),
    cancel: &Cancel,
) -> Result<Phase, TrainError> {
    let (servers, gate) = ractor::call!(actor, JobMessage::Children).map_err(|_| TrainError::Stopped)?;
    let mut log = EpochLog::default();
    let mut out = Phase {
        flat: Vec::new(),
        loss: f64::NAN,
        samples: 0,
        steps: 0,
        bytes_sent: 0,
        bytes_dense: 0,
        staleness: Vec::new(),
        retries: 0,
    };
    let (mut done, mut reported) = (0, 0);
    let per_epoch = steps_per_epoch * job.workers;
    // Sync: after the last worker is done, the epochs not yet reported wait for their servers'
    // ranges too (a server on another process may report its last epoch after the workers'
    // answers arrived), for a while.
    while done < job.workers || (job.mode == Mode::Sync && reported < job.epochs) {
        if cancel.requested() {
            return Err(TrainError::Cancelled);
        }
        let event = if done < job.workers {
            // A cancellation is seen here too (workers on other processes check their own).
            match tokio::time::timeout(std::time::Duration::from_millis(100), rx.recv()).await {
                Ok(e) => e,
                Err(_) if cancel.requested() => return Err(TrainError::Cancelled),
                Err(_) => continue,
            }
        } else {
            match tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv()).await {
                Ok(e) => e,
                Err(_) => {
                    tracing::warn!(job = %job.name, reported, epochs = job.epochs, "the servers did not report every epoch's end; the parameters are read from them directly");
                    break;
                }
            }
        };
        let Some(event) = event else {
            return Err(TrainError::Stopped);
        };
        match event {
            Event::Step { epoch, loss, rows } => {
                let e = log.steps.entry(epoch).or_default();
                e.0 += f64::from(loss) * rows as f64;
                e.1 += rows;
                e.2 += 1;
                out.samples += rows;
            }
            Event::Epoch { epoch, server, params } => {
                log.ranges.entry(epoch).or_default().insert(server, params);
            }
            Event::Done { bytes_sent, bytes_dense } => {
                done += 1;
                out.bytes_sent += bytes_sent;
                out.bytes_dense += bytes_dense;
            }
            // A worker that found an actor stopped: the actor's own failure, if it comes soon,
            // says more.
            Event::Failed(TrainError::Stopped) => {
                return match tokio::time::timeout(std::time::Duration::from_secs(1), async {
                    loop {
                        match rx.recv().await {
                            Some(Event::Failed(TrainError::Stopped)) => continue,
                            Some(Event::Failed(e)) => return e,
                            Some(Event::ActorFailed { actor, reason }) => {
                                return TrainError::ActorFailed { actor, reason };
                            }
                            Some(_) => continue,
                            None => return TrainError::Stopped,
                        }
                    }
                })
                .await
                {
                    Ok(e) => Err(e),
                    Err(_) => Err(TrainError::Stopped),
                };
            }
            Event::Failed(e) => return Err(e),
            Event::ActorFailed { actor, reason } => return Err(TrainError::ActorFailed { actor, reason }),
        }
        // Report the epochs complete, in order.
        while let Some(&(loss_sum, rows, steps)) = log.steps.get(&(reported + 1)) {
            if steps < per_epoch {
                break;
            }
            let epoch = reported + 1;
            let flat = match job.mode {
                Mode::Sync => match log.ranges.get(&epoch) {
                    Some(r) if r.len() == parts.len() => r.values().flatten().copied().collect(),
                    _ => break,
                },
                // Async: the parameters as they are when the epoch's last push is in.
                Mode::Async => snapshot(&servers, parts).await?,
            };
            out.loss = loss_sum / rows.max(1) as f64;
            let accuracy = evaluate(setup, flat).await?;
            progress(&Progress { phase: name, epoch, epochs: job.epochs, loss: out.loss, accuracy });
            log.ranges.remove(&epoch);
            reported = epoch;
        }
    }
    out.flat = snapshot(&servers, parts).await?;
    out.steps = match servers.first() {
        Some(s) => {
            let msg = ractor::call!(s, ServerMessage::Pull).map_err(|_| TrainError::Stopped)?;
            read_params(&msg, parts[0].len())?.0
        }
        None => 0,
    };
    if let Some(gate) = gate {
        let (staleness, retries) = ractor::call!(gate, GateMessage::Report).map_err(|_| TrainError::Stopped)?;
        out.staleness = staleness;
        out.retries = retries;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_learning_rate_decays_linearly_to_its_fraction() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/training/digits.toml");
        let source = maas_graphs::SourceFile::read(&path).unwrap();
        let registry = Registry::builtin();
        let checked = maas_graphs::check(vec![source.clone()], &registry).unwrap();
        let mut job = crate::job::check(&[source], &checked, &registry).unwrap().remove(0);
        job.optimizer = crate::optim::Optimizer::adamw(0.01);
        job.lr_decay_to = 0.1;
        let lr = |p| scheduled_lr(&job, p);
        assert!((lr(0.0) - 0.01).abs() < 1e-12 && (lr(1.0) - 0.001).abs() < 1e-12 && (lr(0.5) - 0.0055).abs() < 1e-12);
        assert_eq!(lr(2.0), lr(1.0), "never below the end value");
        job.lr_decay_to = 1.0;
        assert_eq!(scheduled_lr(&job, 0.7), 0.01, "constant by default");
    }
}
