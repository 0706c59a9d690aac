//! Running a training job: data-parallel workers and parameter servers, each on its own thread,
//! talking only in byte messages (the [`crate::compress`] format: what will cross processes).
//!
//! - The rows are split once into training and held-out rows (a shuffle seeded by
//!   `split_seed`, the last `ceil(held_out * rows)` held out), and the training rows into
//!   `workers` disjoint shards (round robin over a shuffle seeded by `seed`).
//! - The learning tensors are one flat vector ([`crate::partition::Layout`]) cut into `servers`
//!   contiguous ranges; server `k` owns range `k` and its optimizer state.
//! - **Sync** (`mode = "sync"`): each step every worker takes the next `batch_size` rows of its
//!   shard, computes the mean cross-entropy and its gradient with the current parameters,
//!   and sends each server its part of the gradient, compressed (one [`Compressor`] per server
//!   part, so error feedback is per worker and part). Each server decodes the workers'
//!   messages in worker order, averages them, applies its optimizer and sends its new range
//!   back, dense. Deterministic for a seed.
//! - **Async** (`mode = "async"`): each worker loops on its own: pull the parameters, compute,
//!   push; the servers apply each gradient when it arrives (the version counts the updates).
//!   The staleness of a gradient is the number of updates applied between the worker's read
//!   and its own; it never exceeds `staleness`: a worker whose push would leave another
//!   worker's gradient in flight more than `staleness` versions behind waits until that one
//!   has pushed. (When the two oldest gradients in flight were read at the same version and
//!   both are at the bound, each would wait for the other: the lower-numbered worker drops
//!   its gradient unsent and computes it again on fresh parameters; `retries` counts these.)
//!   The staleness of every applied gradient is reported (max, mean).
//!
//! A loss that turns NaN or infinite stops the job with an error; nothing is written.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use candle_core::{Device, Tensor};
use maas_graphs::Graph;
use maas_kernels::Registry;
use rand::SeedableRng;
use rand::seq::SliceRandom;

use crate::compress::{self, Compressor};
use crate::data::{self, Table};
use crate::job::{Job, Mode};
use crate::model::{Model, ModelError};
use crate::optim::OptimizerState;
use crate::partition::{Layout, ranges};

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
    /// A message between workers and servers was refused.
    #[error("message between worker and server: {0}")]
    Message(#[from] compress::MessageError),
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
}

/// Inputs and labels of some rows, as tensors.
fn batch(table: &Table, rows: &[usize]) -> Result<(BTreeMap<String, Tensor>, Tensor), TrainError> {
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
fn scheduled_lr(job: &Job, progress: f64) -> f64 {
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

/// What a worker sends: its loss and batch size, and one message per server.
struct Push {
    worker: usize,
    loss: f32,
    rows: usize,
    /// The parameter version it computed on (async).
    read_version: u64,
    parts: Vec<Vec<u8>>,
}

/// Runs `job` on `graph` and writes the trained submodels into `out`.
pub fn train(
    graph: &Graph,
    job: &Job,
    registry: &Registry,
    out: &Path,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<Report, TrainError> {
    let start = Instant::now();
    let table = Arc::new(data::load(&job.data.path, &job.data.columns)?);
    let (train_rows, test_rows) = split(table.rows(), job.held_out, job.split_seed);
    if train_rows.is_empty() {
        return Err(TrainError::Other("no training rows are left after the held-out split".into()));
    }
    let models: Vec<Model> = (0..job.workers).map(|_| Model::new(graph, job, registry)).collect::<Result<_, _>>()?;
    let layout = Layout::new(&models[0].shapes());
    let mut flat = layout.flatten(&models[0].values()?).map_err(TrainError::Other)?;
    let parts = ranges(layout.len(), job.servers);

    // Shards: round robin over a seeded shuffle of the training rows.
    let mut shuffled = train_rows.clone();
    shuffled.shuffle(&mut rand::rngs::StdRng::seed_from_u64(job.seed));
    let shards: Vec<Vec<usize>> =
        (0..job.workers).map(|w| shuffled.iter().skip(w).step_by(job.workers).copied().collect()).collect();
    let steps_per_epoch = shards.iter().map(|s| s.len().div_ceil(job.batch_size)).max().unwrap_or(1);

    let mut servers: Vec<(OptimizerState, u64)> =
        parts.iter().map(|r| (OptimizerState::new(job.optimizer, r.len()), 0)).collect();
    let mut compressors: Vec<Vec<Compressor>> = (0..job.workers)
        .map(|_| parts.iter().map(|_| Compressor::new(job.compression, job.error_feedback)).collect())
        .collect();

    let mut last_loss = f64::NAN;
    let mut staleness_seen: Vec<u64> = Vec::new();
    let mut retries = 0;
    let samples;
    match job.mode {
        Mode::Sync => {
            let mut seen = 0usize;
            for epoch in 1..=job.epochs {
                let lr = scheduled_lr(job, (epoch - 1) as f64 / (job.epochs.max(2) - 1) as f64);
                servers.iter_mut().for_each(|(state, _)| state.set_lr(lr));
                let orders: Vec<Vec<usize>> = shards
                    .iter()
                    .enumerate()
                    .map(|(w, s)| {
                        let mut o = s.clone();
                        o.shuffle(&mut rand::rngs::StdRng::seed_from_u64(job.seed ^ ((epoch as u64) << 32) ^ w as u64));
                        o
                    })
                    .collect();
                let (mut loss_sum, mut rows_sum) = (0f64, 0usize);
                for step in 0..steps_per_epoch {
                    // Every worker computes on the same parameters, in parallel.
                    let values = layout.unflatten(&flat);
                    let pushes: Vec<Result<Push, TrainError>> = std::thread::scope(|scope| {
                        let handles: Vec<_> = models
                            .iter()
                            .zip(compressors.iter_mut())
                            .enumerate()
                            .map(|(w, (model, comps))| {
                                let (order, values, table, layout, parts) =
                                    (&orders[w], &values, &table, &layout, &parts);
                                scope.spawn(move || -> Result<Push, TrainError> {
                                    // The shard's next rows, wrapping round a shorter shard.
                                    let rows: Vec<usize> = (0..job.batch_size.min(order.len()))
                                        .map(|i| order[(step * job.batch_size + i) % order.len()])
                                        .collect();
                                    model.set_values(values)?;
                                    let (inputs, labels) = batch(table, &rows)?;
                                    let (loss, grads) = model.gradients(&inputs, &labels)?;
                                    let g = layout.flatten(&grads).map_err(TrainError::Other)?;
                                    let parts = parts
                                        .iter()
                                        .zip(comps.iter_mut())
                                        .map(|(r, c)| c.encode(&g[r.clone()]))
                                        .collect::<Result<Vec<_>, _>>()?;
                                    Ok(Push { worker: w, loss, rows: rows.len(), read_version: 0, parts })
                                })
                            })
                            .collect();
                        handles
                            .into_iter()
                            .map(|h| h.join().unwrap_or_else(|_| Err(TrainError::Other("a worker panicked".into()))))
                            .collect()
                    });
                    let pushes = pushes.into_iter().collect::<Result<Vec<_>, _>>()?;
                    for p in &pushes {
                        if !p.loss.is_finite() {
                            return Err(TrainError::Diverged { loss: p.loss, epoch, step: step + 1 });
                        }
                        loss_sum += f64::from(p.loss) * p.rows as f64;
                        rows_sum += p.rows;
                    }
                    // Each server: the workers' parts in worker order, averaged, applied.
                    for (k, (range, (state, version))) in parts.iter().zip(servers.iter_mut()).enumerate() {
                        let mut sum = vec![0f32; range.len()];
                        for p in &pushes {
                            let g = compress::decode(&p.parts[k], range.len())?;
                            for (s, v) in sum.iter_mut().zip(g) {
                                *s += v;
                            }
                        }
                        let scale = 1.0 / pushes.len() as f32;
                        sum.iter_mut().for_each(|s| *s *= scale);
                        state.step(&mut flat[range.clone()], &sum);
                        *version += 1;
                    }
                }
                seen += rows_sum;
                last_loss = loss_sum / rows_sum.max(1) as f64;
                models[0].set_values(&layout.unflatten(&flat))?;
                let acc = accuracy(&models[0], &table, &test_rows)?;
                progress(&format!(
                    "epoch {epoch}/{}: loss {last_loss:.4}, held-out accuracy {:.2}%",
                    job.epochs,
                    100.0 * acc
                ));
            }
            samples = seen;
        }
        Mode::Async => {
            let (seen, loss, stale, r) = run_async(
                job,
                &models,
                &layout,
                &parts,
                &mut flat,
                &mut servers,
                &mut compressors,
                &shards,
                &table,
                &test_rows,
                progress,
            )?;
            samples = seen;
            last_loss = loss;
            staleness_seen = stale;
            retries = r;
        }
    }

    models[0].set_values(&layout.unflatten(&flat))?;
    let accuracy = accuracy(&models[0], &table, &test_rows)?;
    let weights = models[0].save(out)?;
    let (bytes_sent, bytes_dense) =
        compressors.iter().flatten().fold((0, 0), |(s, d), c| (s + c.bytes_sent(), d + c.bytes_dense()));
    let staleness = Staleness {
        max: staleness_seen.iter().copied().max().unwrap_or(0),
        mean: if staleness_seen.is_empty() {
            0.0
        } else {
            staleness_seen.iter().sum::<u64>() as f64 / staleness_seen.len() as f64
        },
        bound: job.staleness,
        retries,
    };
    let elapsed = start.elapsed().as_secs_f64();
    Ok(Report {
        job: job.name.clone(),
        accuracy,
        loss: last_loss,
        epochs: job.epochs,
        steps: servers.first().map(|s| s.1).unwrap_or(0),
        workers: job.workers,
        servers: job.servers,
        mode: match job.mode {
            Mode::Sync => "sync".into(),
            Mode::Async => "async".into(),
        },
        compression: job.compression.to_string(),
        error_feedback: job.error_feedback,
        bytes_sent,
        bytes_dense,
        staleness,
        elapsed_s: elapsed,
        samples_per_s: samples as f64 / elapsed.max(1e-9),
        rows: (train_rows.len(), test_rows.len()),
        weights,
        version: format!("{}-{:016x}", job.name, digest(&flat)),
    })
}

/// The parameter servers' shared state in async mode.
struct AsyncState {
    flat: Vec<f32>,
    servers: Vec<(OptimizerState, u64)>,
    /// Per worker: the version it read, while its gradient is being computed or waits.
    in_flight: Vec<Option<u64>>,
    /// Per worker: waiting to push.
    waiting: Vec<bool>,
    staleness: Vec<u64>,
    retries: u64,
    failed: Option<String>,
}

impl AsyncState {
    fn version(&self) -> u64 {
        self.servers.first().map(|s| s.1).unwrap_or(0)
    }

    /// Whether `w`'s push would leave another gradient in flight more than `bound` behind.
    fn push_blocked(&self, w: usize, bound: u64) -> bool {
        let next = self.version() + 1;
        self.in_flight.iter().enumerate().any(|(j, r)| j != w && r.is_some_and(|r| next - r > bound))
    }

    /// Every gradient in flight waits, and `w` is the lowest-numbered of the oldest: the tie
    /// that would wait forever.
    fn must_retry(&self, w: usize) -> bool {
        let flying: Vec<(usize, u64)> =
            self.in_flight.iter().enumerate().filter_map(|(j, r)| r.map(|r| (j, r))).collect();
        flying.iter().all(|(j, _)| *j == w || self.waiting[*j])
            && flying.iter().min_by_key(|(j, r)| (*r, *j)).is_some_and(|(j, _)| *j == w)
    }
}

#[allow(clippy::too_many_arguments)]
fn run_async(
    job: &Job,
    models: &[Model],
    layout: &Layout,
    parts: &[std::ops::Range<usize>],
    flat: &mut Vec<f32>,
    servers: &mut Vec<(OptimizerState, u64)>,
    compressors: &mut [Vec<Compressor>],
    shards: &[Vec<usize>],
    table: &Table,
    test_rows: &[usize],
    progress: &(dyn Fn(&str) + Sync),
) -> Result<(usize, f64, Vec<u64>, u64), TrainError> {
    let steps_per_epoch = shards.iter().map(|s| s.len().div_ceil(job.batch_size)).max().unwrap_or(1) as u64;
    let total = steps_per_epoch * job.epochs as u64;
    let shared = Mutex::new(AsyncState {
        flat: std::mem::take(flat),
        servers: std::mem::take(servers),
        in_flight: vec![None; job.workers],
        waiting: vec![false; job.workers],
        staleness: Vec::new(),
        retries: 0,
        failed: None,
    });
    let turn = Condvar::new();
    let (tx, rx) = mpsc::channel::<(usize, f32, usize)>();
    let (seen, last) = std::thread::scope(|scope| {
        for (w, (model, comps)) in models.iter().zip(compressors.iter_mut()).enumerate() {
            let (shared, turn, tx, shard) = (&shared, &turn, tx.clone(), &shards[w]);
            scope.spawn(move || {
                let mut order = shard.clone();
                for clock in 0..total {
                    if clock % steps_per_epoch == 0 {
                        order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(job.seed ^ (clock << 32) ^ w as u64));
                    }
                    let step = (clock % steps_per_epoch) as usize;
                    let rows: Vec<usize> = (0..job.batch_size.min(order.len()))
                        .map(|i| order[(step * job.batch_size + i) % order.len()])
                        .collect();
                    'retry: loop {
                        // Pull.
                        let (values, read_version) = {
                            let mut s = shared.lock().expect("async state");
                            if s.failed.is_some() {
                                return;
                            }
                            let v = s.version();
                            s.in_flight[w] = Some(v);
                            (layout.unflatten(&s.flat), v)
                        };
                        let computed = (|| -> Result<(f32, Vec<f32>), TrainError> {
                            model.set_values(&values)?;
                            let (inputs, labels) = batch(table, &rows)?;
                            let (loss, grads) = model.gradients(&inputs, &labels)?;
                            if !loss.is_finite() {
                                return Err(TrainError::Diverged {
                                    loss,
                                    epoch: (clock / steps_per_epoch) as usize + 1,
                                    step: step + 1,
                                });
                            }
                            Ok((loss, layout.flatten(&grads).map_err(TrainError::Other)?))
                        })();
                        let mut s = shared.lock().expect("async state");
                        let (loss, g) = match computed {
                            Ok(c) => c,
                            Err(e) => {
                                s.failed.get_or_insert(e.to_string());
                                turn.notify_all();
                                return;
                            }
                        };
                        // Push, once it leaves no other gradient in flight past the bound.
                        while s.push_blocked(w, job.staleness) {
                            if s.failed.is_some() {
                                return;
                            }
                            if s.must_retry(w) {
                                s.in_flight[w] = None;
                                s.retries += 1;
                                turn.notify_all();
                                continue 'retry;
                            }
                            s.waiting[w] = true;
                            s = turn.wait(s).expect("async state");
                            s.waiting[w] = false;
                        }
                        let encoded = parts
                            .iter()
                            .zip(comps.iter_mut())
                            .map(|(r, c)| c.encode(&g[r.clone()]))
                            .collect::<Result<Vec<_>, _>>();
                        let push = match encoded {
                            Ok(parts) => Push { worker: w, loss, rows: rows.len(), read_version, parts },
                            Err(e) => {
                                s.failed.get_or_insert(e.to_string());
                                turn.notify_all();
                                return;
                            }
                        };
                        // Each server applies its part as it arrives.
                        let stale = s.version() - push.read_version;
                        s.staleness.push(stale);
                        let lr = scheduled_lr(
                            job,
                            s.version() as f64 / total.saturating_mul(job.workers as u64).max(1) as f64,
                        );
                        s.servers.iter_mut().for_each(|(state, _)| state.set_lr(lr));
                        for (k, range) in parts.iter().enumerate() {
                            match compress::decode(&push.parts[k], range.len()) {
                                Ok(g) => {
                                    let AsyncState { flat, servers, .. } = &mut *s;
                                    servers[k].0.step(&mut flat[range.clone()], &g);
                                    servers[k].1 += 1;
                                }
                                Err(e) => {
                                    s.failed.get_or_insert(e.to_string());
                                }
                            }
                        }
                        s.in_flight[w] = None;
                        turn.notify_all();
                        let _ = tx.send((push.worker, push.loss, push.rows));
                        break;
                    }
                }
            });
        }
        drop(tx);
        // Progress: one line per epoch's worth of pushes.
        let (mut loss_sum, mut rows_sum, mut pushes) = (0f64, 0usize, 0u64);
        let mut epoch = 0;
        let mut last = f64::NAN;
        let mut seen = 0usize;
        for (_, loss, rows) in rx {
            loss_sum += f64::from(loss) * rows as f64;
            rows_sum += rows;
            seen += rows;
            pushes += 1;
            if pushes == steps_per_epoch * job.workers as u64 {
                epoch += 1;
                last = loss_sum / rows_sum.max(1) as f64;
                let flat_now = shared.lock().expect("async state").flat.clone();
                let acc = models[0]
                    .set_values(&layout.unflatten(&flat_now))
                    .ok()
                    .and_then(|_| accuracy(&models[0], table, test_rows).ok());
                progress(&format!(
                    "epoch {epoch}/{}: loss {last:.4}, held-out accuracy {}",
                    job.epochs,
                    acc.map(|a| format!("{:.2}%", 100.0 * a)).unwrap_or_else(|| "?".into())
                ));
                (loss_sum, rows_sum, pushes) = (0.0, 0, 0);
            }
        }
        (seen, last)
    });
    let mut s = shared.into_inner().expect("async state");
    if let Some(e) = s.failed.take() {
        return Err(TrainError::Other(e));
    }
    *flat = s.flat;
    *servers = s.servers;
    Ok((seen, last, s.staleness, s.retries))
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
