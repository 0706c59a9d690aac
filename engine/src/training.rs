//! Training on a live engine: a job (`[training.NAME]`, checked by `maas_train::job`) runs on
//! the engine's runtime as its own actors (workers, parameter servers, gate: see
//! `maas_train::actors`), through the graph the engine serves now (a frozen submodel runs the
//! version serving now; `init = "weights"` starts from the serving weights). Its state is kept
//! per job name and can be watched and cancelled. On success, unless the job's `min_accuracy`
//! is not reached or it was cancelled, the trained submodel is hot-swapped in as a new version
//! through [`Engine::swap`]: every guarantee of a swap holds (no request fails, each request
//! runs one version). A job that trains several submodels swaps them in together: the graph
//! served now with their weights and versions replaced, applied as one recomposition (every
//! pipeline switches at once, so no request sees one new and one old).

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures_util::FutureExt;
use maas_train::job::Job;
use maas_train::trainer::{Cancel, Progress, Report, TrainError};

use crate::change::{ChangeError, SwapRequest};
use crate::engine::Engine;

/// How a job started on the engine runs.
#[derive(Debug, Clone)]
pub struct TrainingOptions {
    /// Where the trained weights are written (`<submodel>.safetensors`). To be swapped in, it
    /// must lie under the engine's file roots.
    pub out: PathBuf,
    /// Swap the trained submodel in on success (gated by the job's `min_accuracy`).
    pub swap: bool,
}

/// Where a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TrainingState {
    /// Training (or swapping in what it trained).
    Running,
    /// Trained (and swapped in, unless `swap_refused` says why not).
    Succeeded,
    /// Stopped by an error: nothing swapped.
    Failed,
    /// Cancelled: nothing written or swapped.
    Cancelled,
}

/// A swap a job made.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TrainedSwap {
    /// The version that served before.
    pub previous: String,
    /// The version serving now (the report's `version`).
    pub version: String,
}

/// A job's state, as `GET /v1/training/{job}` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TrainingStatus {
    /// The job.
    pub job: String,
    /// Where it is.
    pub state: TrainingState,
    /// `train`, `fine_tune` (after pruning) or `swap`.
    pub phase: String,
    /// Epochs done in the phase.
    pub epoch: usize,
    /// Epochs of the phase.
    pub epochs: usize,
    /// Mean training loss of the last epoch done.
    pub loss: Option<f64>,
    /// Held-out accuracy after the last epoch done (0..1).
    pub accuracy: Option<f64>,
    /// Every epoch done so far.
    pub history: Vec<Progress>,
    /// Since the start.
    pub elapsed_s: f64,
    /// Where the weights are written.
    pub out: PathBuf,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The finished job's report.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub report: Option<Report>,
    /// Submodel -> the swap made.
    pub swapped: BTreeMap<String, TrainedSwap>,
    /// Why nothing was swapped, on success.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub swap_refused: Option<String>,
}

/// Why a training request was refused.
#[derive(Debug, thiserror::Error)]
pub enum TrainingError {
    /// The job runs already.
    #[error("training job `{0}` is running already")]
    AlreadyRunning(String),
    /// No job of that name was started on this engine.
    #[error("training job `{0}` has not been started on this engine")]
    NotStarted(String),
    /// The job has ended.
    #[error("training job `{0}` is not running")]
    NotRunning(String),
    /// The job has finished training and is writing (and swapping in) its results.
    #[error("training job `{0}` has finished training and is writing its results; it can no longer be cancelled")]
    NotCancellable(String),
    /// The job does not fit the graph served now.
    #[error("training job `{job}`: {reason}")]
    Invalid {
        /// The job.
        job: String,
        /// Why.
        reason: String,
    },
    /// The engine is shutting down.
    #[error("the engine is shutting down")]
    ShuttingDown,
}

impl TrainingError {
    /// A short, stable name for the error's kind (used in the HTTP API).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::AlreadyRunning(_) => "already_running",
            Self::NotStarted(_) => "unknown_training",
            Self::NotRunning(_) => "not_running",
            Self::NotCancellable(_) => "not_cancellable",
            Self::Invalid { .. } => "invalid_training",
            Self::ShuttingDown => "shutting_down",
        }
    }
}

struct Entry {
    status: TrainingStatus,
    started: Instant,
    cancel: Arc<Cancel>,
    done: tokio::sync::watch::Sender<bool>,
}

impl Entry {
    fn snapshot(&self) -> TrainingStatus {
        let mut s = self.status.clone();
        if s.state == TrainingState::Running {
            s.elapsed_s = self.started.elapsed().as_secs_f64();
        }
        s
    }
}

/// The engine's jobs (the latest run of each name).
#[derive(Default)]
pub(crate) struct Trainings(Mutex<BTreeMap<String, Entry>>);

impl Trainings {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Entry>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Cancels every running job (shutdown).
    pub(crate) fn cancel_all(&self) {
        for e in self.lock().values() {
            e.cancel.request();
        }
    }

    fn update(&self, job: &str, f: impl FnOnce(&mut TrainingStatus)) {
        if let Some(e) = self.lock().get_mut(job) {
            f(&mut e.status);
        }
    }

    fn finish(&self, job: &str, f: impl FnOnce(&mut TrainingStatus)) {
        if let Some(e) = self.lock().get_mut(job) {
            f(&mut e.status);
            e.status.elapsed_s = e.started.elapsed().as_secs_f64();
            // Kept even with nobody subscribed yet: a later `wait_training` sees it.
            e.done.send_replace(true);
        }
    }
}

impl Engine {
    /// Starts `job` on this engine's runtime, through the graph served now; returns its
    /// status at once. See the module documentation for what happens on success. Call it from
    /// within the tokio runtime the engine serves on (the job is a task on it).
    pub fn start_training(&self, job: Job, options: TrainingOptions) -> Result<TrainingStatus, TrainingError> {
        let graph = self.graph();
        let invalid = |reason: String| TrainingError::Invalid { job: job.name.clone(), reason };
        if !graph.pipelines.contains_key(&job.pipeline) {
            return Err(invalid(format!("the engine serves no pipeline `{}` now", job.pipeline)));
        }
        for s in &job.learn {
            if !graph.submodels.contains_key(s) {
                return Err(invalid(format!("the engine serves no submodel `{s}` now")));
            }
        }
        for node in job.worker_nodes.iter().chain(&job.server_nodes) {
            if node != maas_graphs::LOCAL_NODE && !graph.nodes.contains_key(node) {
                return Err(invalid(format!(
                    "the job places actors on node `{node}`, which the graph served now does not declare"
                )));
            }
        }
        let name = job.name.clone();
        let cancel = Arc::new(Cancel::default());
        let status = {
            let mut all = self.inner.trainings.lock();
            // Under the lock `shutdown`'s `cancel_all` takes: a job starts before it (and is
            // cancelled by it) or not at all.
            if self.inner.shutting_down.load(Ordering::SeqCst) {
                return Err(TrainingError::ShuttingDown);
            }
            if all.get(&name).is_some_and(|e| e.status.state == TrainingState::Running) {
                return Err(TrainingError::AlreadyRunning(name));
            }
            let status = TrainingStatus {
                job: name.clone(),
                state: TrainingState::Running,
                phase: "train".into(),
                epoch: 0,
                epochs: job.epochs,
                loss: None,
                accuracy: None,
                history: Vec::new(),
                elapsed_s: 0.0,
                out: options.out.clone(),
                error: None,
                report: None,
                swapped: BTreeMap::new(),
                swap_refused: None,
            };
            let (done, _) = tokio::sync::watch::channel(false);
            all.insert(
                name.clone(),
                Entry { status: status.clone(), started: Instant::now(), cancel: cancel.clone(), done },
            );
            status
        };
        tracing::info!(job = %name, out = %options.out.display(), "training started");
        let engine = self.clone();
        tokio::spawn(async move {
            let run = engine.clone().run_training(name.clone(), job, options, graph, cancel);
            // A panic here must not leave the job `running` for ever (every later start refused).
            if let Err(panic) = AssertUnwindSafe(run).catch_unwind().await {
                let why = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "panicked".into());
                tracing::error!(job = %name, "training panicked: {why}");
                engine.inner.trainings.finish(&name, |s| {
                    s.state = TrainingState::Failed;
                    s.error = Some(format!("the training task panicked: {why}"));
                });
            }
        });
        Ok(status)
    }

    /// The body of a started job: train, then swap (see the module documentation).
    async fn run_training(
        self,
        name: String,
        job: Job,
        options: TrainingOptions,
        graph: maas_graphs::Graph,
        cancel: Arc<Cancel>,
    ) {
        let engine = self;
        let progress = {
            let engine = engine.clone();
            let name = name.clone();
            move |p: &Progress| {
                tracing::info!(job = %name, "{p}");
                engine.inner.trainings.update(&name, |s| {
                    s.phase = p.phase.to_string();
                    s.epoch = p.epoch;
                    s.epochs = p.epochs;
                    s.loss = Some(p.loss);
                    s.accuracy = Some(p.accuracy);
                    s.history.push(p.clone());
                });
            }
        };
        let registry = engine.registry().clone();
        let placement = match job.is_placed() {
            false => Ok(None),
            true => crate::cluster::ClusterPlacement::new(&graph, engine.inner.cluster.options().clone())
                .await
                .map(|p| Some(p as Arc<dyn maas_train::actors::Placement>)),
        };
        let result = match placement {
            Ok(placement) => {
                maas_train::trainer::run_placed(
                    Arc::new(graph),
                    job.clone(),
                    registry,
                    options.out,
                    cancel,
                    &progress,
                    placement,
                )
                .await
            }
            Err(e) => Err(TrainError::Other(e)),
        };
        let report = match result {
            Ok(report) => report,
            Err(TrainError::Cancelled) => {
                tracing::info!(job = %name, "training cancelled");
                engine.inner.trainings.finish(&name, |s| s.state = TrainingState::Cancelled);
                return;
            }
            Err(e) => {
                tracing::warn!(job = %name, error = %e, "training failed");
                engine.inner.trainings.finish(&name, |s| {
                    s.state = TrainingState::Failed;
                    s.error = Some(e.to_string());
                });
                return;
            }
        };
        // The job committed before writing: it can no longer be cancelled.
        let mut refused = if !options.swap {
            Some("the job was started without swapping".to_string())
        } else if let Some(min) = job.min_accuracy.filter(|m| report.accuracy < *m) {
            Some(format!("held-out accuracy {:.4} is below min_accuracy {min}: nothing swapped", report.accuracy))
        } else {
            None
        };
        let mut swapped = BTreeMap::new();
        if refused.is_none() && report.weights.len() > 1 {
            // Several submodels: one recomposition switches them all at once, so no request
            // sees one new and one old.
            engine.inner.trainings.update(&name, |s| s.phase = "swap".into());
            match engine.swap_trained(&report).await {
                Ok(s) => {
                    tracing::info!(job = %name, swapped = ?s, "trained submodels swapped in together");
                    swapped = s;
                }
                Err(e) => refused = Some(format!("the trained submodels were not swapped in: {e}")),
            }
        } else if refused.is_none() {
            engine.inner.trainings.update(&name, |s| s.phase = "swap".into());
            let (submodel, path) = report.weights.iter().next().expect("one submodel");
            let request = SwapRequest {
                weights: Some(path.clone()),
                version: Some(report.version.clone()),
                params: None,
                allow_signature_change: false,
            };
            match engine.swap(submodel, request).await {
                Ok(s) => {
                    tracing::info!(job = %name, submodel = %submodel, previous = %s.previous, version = %s.version, "trained submodel swapped in");
                    swapped.insert(submodel.clone(), TrainedSwap { previous: s.previous, version: s.version });
                }
                Err(e) => refused = Some(format!("the swap of `{submodel}` was refused: {e}")),
            }
        }
        engine.inner.trainings.finish(&name, |s| {
            s.state = TrainingState::Succeeded;
            s.report = Some(report);
            s.swapped = swapped;
            s.swap_refused = refused;
        });
    }

    /// Swaps every submodel of `report` in at once, as versions named `report.version`
    /// ([`Engine::swap_together`]).
    async fn swap_trained(&self, report: &Report) -> Result<BTreeMap<String, TrainedSwap>, ChangeError> {
        let mut swaps = BTreeMap::new();
        for (submodel, path) in &report.weights {
            let path = path.canonicalize().map_err(|e| ChangeError::InvalidWeights {
                submodel: submodel.clone(),
                message: format!("{}: {e}", path.display()),
            })?;
            swaps.insert(submodel.clone(), (path, report.version.clone()));
        }
        Ok(self
            .swap_together(swaps)
            .await?
            .into_iter()
            .map(|(submodel, previous, version)| (submodel, TrainedSwap { previous, version }))
            .collect())
    }

    /// A job's status (its latest run on this engine).
    pub fn training(&self, job: &str) -> Option<TrainingStatus> {
        self.inner.trainings.lock().get(job).map(Entry::snapshot)
    }

    /// Every job started on this engine (the latest run of each).
    pub fn trainings(&self) -> Vec<TrainingStatus> {
        self.inner.trainings.lock().values().map(Entry::snapshot).collect()
    }

    /// Cancels a running job: it stops at its workers' next step, writes and swaps nothing.
    pub fn cancel_training(&self, job: &str) -> Result<TrainingStatus, TrainingError> {
        let all = self.inner.trainings.lock();
        let e = all.get(job).ok_or_else(|| TrainingError::NotStarted(job.into()))?;
        if e.status.state != TrainingState::Running {
            return Err(TrainingError::NotRunning(job.into()));
        }
        if !e.cancel.request() {
            return Err(TrainingError::NotCancellable(job.into()));
        }
        tracing::info!(job, "training cancel requested");
        Ok(e.snapshot())
    }

    /// Waits until the job's latest run has ended; its final status.
    pub async fn wait_training(&self, job: &str) -> Option<TrainingStatus> {
        let mut done = self.inner.trainings.lock().get(job)?.done.subscribe();
        let _ = done.wait_for(|d| *d).await;
        self.training(job)
    }
}
