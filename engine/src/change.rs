//! Changing what an engine serves while it serves: hot-swap, rollback and recomposition.
//!
//! Every change is built beside what serves, then switched in one atomic store:
//!
//! 1. the change lock is taken (changes are serialised: no double load, no lost update);
//! 2. files are confined to the engine's file roots, then checked from their headers (missing,
//!    truncated, corrupt or wrongly shaped weights are rejected here);
//! 3. a changed signature is checked against every pipeline that uses the submodel;
//! 4. new versions are loaded and warmed up on their own replicas (new actors beside the old
//!    ones), off the serving path;
//! 5. new plans are compiled, the change is recorded in the state directory (if any), and the
//!    `Served` pointer is swapped.
//!
//! A request holds the `Served` it was admitted with, so it sees one version of every submodel
//! from start to end (a `similarity` request never mixes two encoders); an old version stops when
//! its last request ends. Any failure before step 5 drops what was started, and nothing changes.
//! Step 5 happens before a change returns: a request admitted after a change returned is served
//! by the new version (one admitted before may still finish on the old one).
//!
//! Two contracts are kept across changes:
//!
//! - **A pipeline's output types change only on purpose**: a swap or recomposition after which a
//!   pipeline output that stays would have another type is refused
//!   ([`ChangeError::OutputTypeChanged`]) unless it says `allow_signature_change`; when applied,
//!   the pipeline listing shows the new types. A rollback returns to the types its version
//!   served with, without asking.
//! - **A version label names one content** (kind, weights, params, and the size and
//!   modification time of its files): a swap that gives a label already used for other content
//!   is refused ([`ChangeError::VersionConflict`]). A swap that names a kept version (its label
//!   alone, or its label with the same content) returns to it; a rollback keeps the version it
//!   leaves, so it can be returned to.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use maas_graphs::{
    Catalog, Diagnostics, FILE_PARAMS, Graph, GraphDiff, KindError, PortType, Signature, SignatureError, SourceFile,
    SubmodelName, SubmodelSpec,
};

use crate::engine::{Engine, Served, Submodel, start_submodel};

/// A version that served before the current one.
#[derive(Debug, Clone)]
pub(crate) struct PastVersion {
    pub(crate) spec: Arc<SubmodelSpec>,
    pub(crate) since: SystemTime,
    pub(crate) until: SystemTime,
    /// Its files as they were when it served (empty: unknown, not checked).
    pub(crate) stamps: Vec<FileStamp>,
    /// A rollback left it (it served after the version the rollback returned to): a later
    /// rollback does not return to it, a swap naming its label does.
    pub(crate) left_by_rollback: bool,
}

/// A file's size and modification time: a rollback refuses a version whose files changed since
/// it served (it would load other weights under the old label).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FileStamp {
    pub(crate) path: PathBuf,
    pub(crate) size: u64,
    /// Modification time, in nanoseconds since the Unix epoch.
    pub(crate) modified_ns: u128,
}

impl FileStamp {
    fn read(path: &Path) -> Option<Self> {
        let m = std::fs::metadata(path).ok()?;
        let modified_ns = m.modified().ok()?.duration_since(std::time::UNIX_EPOCH).ok()?.as_nanos();
        Some(Self { path: path.to_path_buf(), size: m.len(), modified_ns })
    }

    /// The stamps of every file of `spec` (files that cannot be read are left out).
    pub(crate) fn of(spec: &SubmodelSpec) -> Vec<Self> {
        spec.files()
            .iter()
            .filter_map(|f| Self::read(&std::fs::canonicalize(f).unwrap_or_else(|_| f.clone())))
            .collect()
    }
}

/// What a version label names: a submodel's kind, weights and params (file paths canonical)
/// and its files' stamps. Two versions compute the same thing when their contents are equal.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Content {
    pub(crate) kind: String,
    pub(crate) weights: Option<PathBuf>,
    pub(crate) params: toml::Table,
    pub(crate) files: Vec<FileStamp>,
}

impl Content {
    /// The content of `spec`, whose files had `stamps`.
    pub(crate) fn new(spec: &SubmodelSpec, stamps: &[FileStamp]) -> Self {
        let n = spec.normalized();
        Self { kind: n.kind, weights: n.weights, params: n.params, files: stamps.to_vec() }
    }

    /// The content of `spec` with its files as they are now.
    fn now(spec: &SubmodelSpec) -> Self {
        Self::new(spec, &FileStamp::of(spec))
    }
}

impl std::fmt::Display for Content {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "kind `{}`", self.kind)?;
        if let Some(w) = &self.weights {
            write!(f, ", weights `{}`", w.display())?;
        }
        write!(f, ", params {}", toml::Value::Table(self.params.clone()))?;
        for s in &self.files {
            write!(f, ", `{}` of {} bytes modified at {} ns", s.path.display(), s.size, s.modified_ns)?;
        }
        Ok(())
    }
}

/// Per submodel, every label its versions had (serving, kept, or forgotten since) and what it
/// names.
pub(crate) type Labels = BTreeMap<String, BTreeMap<String, Content>>;

/// The longest version label a swap accepts, in bytes (labels are remembered for good).
const MAX_LABEL: usize = 128;

/// What an engine remembers of the versions that served.
#[derive(Debug, Clone, Default)]
pub(crate) struct History {
    /// Versions kept per submodel, in the order they stopped serving (oldest first).
    pub(crate) past: BTreeMap<String, Vec<PastVersion>>,
    /// The content each label names (kept beyond `keep_versions`: a label is never reused).
    pub(crate) labels: Labels,
}

impl History {
    /// Records that `spec`'s label names its content (its files had `stamps`).
    pub(crate) fn label(&mut self, spec: &SubmodelSpec, stamps: &[FileStamp]) {
        self.labels.entry(spec.name.to_string()).or_default().insert(spec.version.clone(), Content::new(spec, stamps));
    }

    /// The kept versions of `submodel`, oldest first.
    fn kept(&self, submodel: &str) -> &[PastVersion] {
        self.past.get(submodel).map(Vec::as_slice).unwrap_or_default()
    }

    /// Where a rollback of `submodel` returns: its newest kept version no rollback left.
    fn rollback_target(&self, submodel: &str) -> Option<usize> {
        self.kept(submodel).iter().rposition(|p| !p.left_by_rollback)
    }
}

/// A pipeline output whose type a change alters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputTypeChange {
    /// The pipeline.
    pub pipeline: String,
    /// The output.
    pub output: String,
    /// Its type before the change.
    pub from: PortType,
    /// Its type after the change.
    pub to: PortType,
}

impl std::fmt::Display for OutputTypeChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pipeline `{}` output `{}`: {} -> {}", self.pipeline, self.output, self.from, self.to)
    }
}

/// The outputs that both graphs' pipelines have, with types that differ.
fn output_type_changes(old: &Graph, new: &Graph) -> Vec<OutputTypeChange> {
    let mut changes = Vec::new();
    for (name, p) in &old.pipelines {
        let Some(q) = new.pipelines.get(name) else { continue };
        for o in &p.outputs {
            if let Some(n) = q.outputs.iter().find(|n| n.name == o.name)
                && n.ty != o.ty
            {
                changes.push(OutputTypeChange {
                    pipeline: name.to_string(),
                    output: o.name.to_string(),
                    from: o.ty.clone(),
                    to: n.ty.clone(),
                });
            }
        }
    }
    changes
}

/// Options of [`Engine::recompose_with_options`].
#[derive(Debug, Clone, Copy, Default)]
pub struct RecomposeOptions {
    /// Only check and diff; change nothing.
    pub dry_run: bool,
    /// Apply the graph even if an output of a pipeline that stays changes its type (otherwise
    /// [`ChangeError::OutputTypeChanged`]).
    pub allow_signature_change: bool,
}

/// What a swap changes; what it leaves out stays as it is.
#[derive(Debug, Clone, Default)]
pub struct SwapRequest {
    /// New weights file (absolute, or relative to the working directory).
    pub weights: Option<PathBuf>,
    /// The new version's label, reported in `model_versions`. Must differ from the serving one;
    /// `None`: `r<N>`, N being the engine's change number.
    pub version: Option<String>,
    /// Params to set, key by key (the others are kept). File params (`path`, `config`) that are
    /// relative resolve against the working directory.
    pub params: Option<toml::Table>,
    /// Apply the swap even if it changes the type of a pipeline output (otherwise
    /// [`ChangeError::OutputTypeChanged`]).
    pub allow_signature_change: bool,
}

/// A swap or rollback that was applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Swapped {
    /// The submodel.
    pub submodel: String,
    /// The version that served before.
    pub previous: String,
    /// The version serving now.
    pub version: String,
    /// Replicas now serving the new version.
    pub replicas: usize,
    /// From the request to the switch (checks, load, warm-up).
    pub elapsed: Duration,
}

/// One version of a submodel, as listed.
#[derive(Debug, Clone, PartialEq)]
pub struct VersionInfo {
    /// Its label.
    pub version: String,
    /// Its weights file.
    pub weights: Option<PathBuf>,
    /// Its params.
    pub params: toml::Table,
    /// When it started serving.
    pub since: SystemTime,
    /// When it stopped serving (`None`: it serves now).
    pub until: Option<SystemTime>,
    /// A rollback left it: a rollback does not return to it, a swap naming its label does.
    pub left_by_rollback: bool,
}

/// A submodel's versions: the one serving and the kept ones, which a swap naming their label
/// returns to ([`Engine::rollback`] to the newest that no rollback left).
#[derive(Debug, Clone, PartialEq)]
pub struct Versions {
    /// The submodel.
    pub submodel: String,
    /// The version serving now.
    pub serving: VersionInfo,
    /// Kept versions, the one that stopped serving last first.
    pub previous: Vec<VersionInfo>,
    /// The version a rollback returns to (`None`: a rollback is refused).
    pub rollback_to: Option<String>,
}

/// The outcome of a recomposition (or of its dry run).
#[derive(Debug, Clone)]
pub struct Recomposed {
    /// What changed (or would change) against the graph that served.
    pub diff: GraphDiff,
    /// The new graph serves now (`false` for a dry run, or when nothing differs).
    pub applied: bool,
    /// The checker's warnings about the new graph.
    pub warnings: Vec<String>,
    /// Outputs of pipelines that stay whose type changes (or would change).
    pub output_type_changes: Vec<OutputTypeChange>,
    /// From the request to the switch.
    pub elapsed: Duration,
}

/// Why a change was refused. Nothing changed: what served before still serves.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ChangeError {
    /// No submodel of that name is served.
    #[error("unknown submodel `{0}`")]
    UnknownSubmodel(String),
    /// A file lies outside the directories this engine may read.
    #[error("`{path}` is outside the directories changes may read from ({roots})")]
    Forbidden {
        /// The path as given.
        path: String,
        /// The allowed directories.
        roots: String,
    },
    /// The change itself is malformed (an empty version label or the serving one, an unknown kind).
    #[error("invalid change: {0}")]
    InvalidRequest(String),
    /// A param the kind does not take (a typo such as `sed` for `seed`); the message names the
    /// key, the params the kind takes and the closest of them.
    #[error("submodel `{submodel}` (kind `{kind}`): {message}")]
    InvalidParams {
        /// The submodel.
        submodel: String,
        /// Its kind.
        kind: String,
        /// What is wrong.
        message: String,
    },
    /// The new version's files are missing, truncated, corrupt or of the wrong shapes, or it
    /// failed to load.
    #[error("submodel `{submodel}`: {message}")]
    InvalidWeights {
        /// The submodel.
        submodel: String,
        /// What is wrong.
        message: String,
    },
    /// The new version's signature does not fit a pipeline that uses the submodel.
    #[error("submodel `{submodel}`: the new version does not fit the pipelines that use it:\n{diagnostics}")]
    Incompatible {
        /// The submodel.
        submodel: String,
        /// The checker's diagnostics for the graph with the new version in it.
        diagnostics: Diagnostics,
    },
    /// After the change, an output of a pipeline that stays would have another type, and the
    /// change did not say `allow_signature_change`.
    #[error(
        "the change alters the type of pipeline outputs clients read ({}); say `allow_signature_change` to apply it",
        changes.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
    )]
    OutputTypeChanged {
        /// Every output whose type would change.
        changes: Vec<OutputTypeChange>,
    },
    /// The version label names other content already (a label names one content).
    #[error(
        "version `{version}` of `{submodel}` names other content already ({named}); label the new version differently"
    )]
    VersionConflict {
        /// The submodel.
        submodel: String,
        /// The label.
        version: String,
        /// What the label names.
        named: String,
    },
    /// A rollback with nothing to return to.
    #[error("submodel `{0}` has no previous version to roll back to")]
    NoPreviousVersion(String),
    /// The new graph does not check; every diagnostic is included.
    #[error("invalid graph:\n{0}")]
    InvalidGraph(Diagnostics),
    /// The engine is shutting down.
    #[error("the engine is shutting down")]
    ShuttingDown,
    /// Loading the new version(s) would need more memory than allowed: the estimate from
    /// params and file headers exceeds the load limit or the memory available. Nothing loaded.
    #[error("{0}")]
    TooLarge(crate::TooLarge),
    /// The change could not be recorded in the state directory, so it was not applied.
    #[error("the change was not applied: recording it failed: {0}")]
    NotRecorded(String),
}

impl ChangeError {
    /// A short, stable name for the error's kind (used in the HTTP API).
    pub fn kind(&self) -> &'static str {
        match self {
            ChangeError::UnknownSubmodel(_) => "unknown_submodel",
            ChangeError::Forbidden { .. } => "forbidden",
            ChangeError::InvalidRequest(_) => "invalid_request",
            ChangeError::InvalidParams { .. } => "invalid_params",
            ChangeError::InvalidWeights { .. } => "invalid_weights",
            ChangeError::Incompatible { .. } => "incompatible_signature",
            ChangeError::OutputTypeChanged { .. } => "output_type_changed",
            ChangeError::VersionConflict { .. } => "version_conflict",
            ChangeError::NoPreviousVersion(_) => "no_previous_version",
            ChangeError::InvalidGraph(_) => "invalid_graph",
            ChangeError::ShuttingDown => "shutting_down",
            ChangeError::NotRecorded(_) => "not_recorded",
            ChangeError::TooLarge(_) => "too_large",
        }
    }
}

/// Changes attempted, by kind of change and result.
#[derive(Debug, Default)]
pub(crate) struct ChangeCounts(Mutex<BTreeMap<(String, String), u64>>);

impl ChangeCounts {
    fn record<T>(&self, change: &str, result: &Result<T, ChangeError>) {
        let outcome = if result.is_ok() { "ok" } else { "rejected" };
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        *m.entry((change.to_string(), outcome.to_string())).or_default() += 1;
    }

    pub(crate) fn snapshot(&self) -> BTreeMap<(String, String), u64> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// The canonical form of each file root (they must exist).
pub(crate) fn canonical_roots(roots: &[PathBuf]) -> Result<Vec<PathBuf>, String> {
    roots.iter().map(|r| std::fs::canonicalize(r).map_err(|e| format!("file root `{}`: {e}", r.display()))).collect()
}

/// What a switch does with the history.
enum Mode {
    /// A new version: the serving one is kept, as the one a rollback returns to.
    Swap,
    /// Back to the kept version at this index, by a swap naming it: the serving one is kept as
    /// by a swap.
    Return(usize),
    /// Back to the kept version at this index, by a rollback: the serving one is kept as left by
    /// a rollback.
    Rollback(usize),
}

fn log_swap_together(result: &Result<Recomposed, ChangeError>) {
    match result {
        Ok(r) => {
            tracing::info!(changed = ?r.diff.submodels.changed, elapsed = ?r.elapsed, "submodels swapped together")
        }
        Err(e) => tracing::warn!(error = %e, "swap of several submodels refused"),
    }
}

impl Engine {
    /// Hot-swaps a submodel: checks and loads the new version on its own replicas (warmed up,
    /// off the serving path), checks it against every pipeline that uses it, then switches.
    /// Returns once every replica serves the new version (a request admitted from then on runs
    /// it); requests admitted before the switch finish on the old one. On any error the old
    /// version keeps serving. A request that names a kept version returns to it (see
    /// [`SwapRequest::version`]).
    pub async fn swap(&self, submodel: &str, request: SwapRequest) -> Result<Swapped, ChangeError> {
        let started = Instant::now();
        let result = self.swap_locked(submodel, request, started).await;
        self.inner.change_counts.record("swap", &result);
        log_swap("swap", submodel, &result);
        result
    }

    /// Returns a submodel to the version that served before it, as safely as a swap. The
    /// version it leaves is kept (a swap naming its label returns to it); a second rollback goes
    /// one version further back. A rollback may change the type of pipeline outputs back to
    /// what its version served with: it is not refused for that.
    pub async fn rollback(&self, submodel: &str) -> Result<Swapped, ChangeError> {
        let started = Instant::now();
        let result = async {
            let _lock = self.inner.change_lock.lock().await;
            self.not_shutting_down()?;
            let served = self.inner.served.load_full();
            let current =
                served.submodels.get(submodel).ok_or_else(|| ChangeError::UnknownSubmodel(submodel.into()))?;
            let index = served
                .history
                .rollback_target(submodel)
                .ok_or_else(|| ChangeError::NoPreviousVersion(submodel.into()))?;
            let previous = &served.history.kept(submodel)[index];
            unchanged_since(previous)?;
            let spec = (*previous.spec).clone();
            self.replace(&served, current, spec, Mode::Rollback(index), true, started).await
        }
        .await;
        self.inner.change_counts.record("rollback", &result);
        log_swap("rollback", submodel, &result);
        result
    }

    /// A submodel's serving and kept versions.
    pub fn versions(&self, submodel: &str) -> Option<Versions> {
        let served = self.inner.served.load();
        let current = served.submodels.get(submodel)?;
        let info = |spec: &SubmodelSpec, since, until, left_by_rollback| VersionInfo {
            version: spec.version.clone(),
            weights: spec.weights.clone(),
            params: spec.params.clone(),
            since,
            until,
            left_by_rollback,
        };
        let kept = served.history.kept(submodel);
        let previous = kept.iter().rev().map(|p| info(&p.spec, p.since, Some(p.until), p.left_by_rollback)).collect();
        let rollback_to = served.history.rollback_target(submodel).map(|i| kept[i].spec.version.clone());
        Some(Versions {
            submodel: submodel.into(),
            serving: info(&current.spec, current.since, None, false),
            previous,
            rollback_to,
        })
    }

    /// Applies a new graph while serving: checks it whole, starts (and warms up) what is new or
    /// changed beside what serves, compiles new plans and switches every pipeline at once.
    /// Requests already running finish on the plans they started with; submodels no longer used
    /// stop when their last request ends. With `dry_run`, only checks and diffs.
    /// Every file the sources name must lie under the file roots or be served already
    /// ([`ChangeError::Forbidden`] otherwise, before any file is read). A graph that changes the
    /// type of an output of a pipeline that stays is refused
    /// ([`ChangeError::OutputTypeChanged`]; see [`Engine::recompose_with_options`]).
    pub async fn recompose(&self, sources: Vec<SourceFile>, dry_run: bool) -> Result<Recomposed, ChangeError> {
        self.recompose_with_options(sources, RecomposeOptions { dry_run, ..RecomposeOptions::default() }).await
    }

    /// [`Engine::recompose`] with options (such as allowing output types to change).
    pub async fn recompose_with_options(
        &self,
        sources: Vec<SourceFile>,
        options: RecomposeOptions,
    ) -> Result<Recomposed, ChangeError> {
        self.recompose_inner(sources, options, true).await
    }

    /// [`Engine::recompose`] for graph files the operator wrote (such as `maas serve --watch`'s):
    /// their files are not confined to the file roots, and they are the truth: output types
    /// may change (the changes are listed in [`Recomposed::output_type_changes`] and warned of).
    pub async fn recompose_trusted(&self, sources: Vec<SourceFile>) -> Result<Recomposed, ChangeError> {
        self.recompose_inner(sources, RecomposeOptions { dry_run: false, allow_signature_change: true }, false).await
    }

    async fn recompose_inner(
        &self,
        sources: Vec<SourceFile>,
        options: RecomposeOptions,
        confine: bool,
    ) -> Result<Recomposed, ChangeError> {
        let started = Instant::now();
        let dry_run = options.dry_run;
        let result = self.recompose_locked(|_| Ok(sources), options, confine, started).await;
        if !dry_run {
            self.inner.change_counts.record("recompose", &result);
        }
        match &result {
            Ok(r) if r.applied => tracing::info!(
                added = ?r.diff.submodels.added, changed = ?r.diff.submodels.changed, removed = ?r.diff.submodels.removed,
                pipelines_added = ?r.diff.pipelines.added, pipelines_changed = ?r.diff.pipelines.changed,
                pipelines_removed = ?r.diff.pipelines.removed, elapsed = ?r.elapsed, "recomposed"
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, dry_run, "recomposition rejected"),
        }
        result
    }

    fn not_shutting_down(&self) -> Result<(), ChangeError> {
        if self.inner.shutting_down.load(Relaxed) { Err(ChangeError::ShuttingDown) } else { Ok(()) }
    }

    async fn swap_locked(&self, name: &str, request: SwapRequest, started: Instant) -> Result<Swapped, ChangeError> {
        let _lock = self.inner.change_lock.lock().await;
        self.not_shutting_down()?;
        let served = self.inner.served.load_full();
        let current = served.submodels.get(name).ok_or_else(|| ChangeError::UnknownSubmodel(name.into()))?;
        let label = match request.version {
            Some(v) if v.trim().is_empty() => return Err(ChangeError::InvalidRequest("`version` is empty".into())),
            Some(v) if v.len() > MAX_LABEL => {
                return Err(ChangeError::InvalidRequest(format!(
                    "`version` is {} bytes long; a label has at most {MAX_LABEL}",
                    v.len()
                )));
            }
            Some(v) if v == current.spec.version => {
                return Err(ChangeError::InvalidRequest(format!(
                    "version `{v}` of `{name}` is serving already; label the new version differently"
                )));
            }
            v => v,
        };
        let allow = request.allow_signature_change;
        let name_only = request.weights.is_none() && request.params.as_ref().is_none_or(toml::Table::is_empty);
        // A kept version's label alone: back to that version, as it served.
        if name_only
            && let Some(label) = &label
            && let Some(index) = served.history.kept(name).iter().rposition(|p| &p.spec.version == label)
        {
            let kept = &served.history.kept(name)[index];
            unchanged_since(kept)?;
            let spec = (*kept.spec).clone();
            return self.replace(&served, current, spec, Mode::Return(index), allow, started).await;
        }
        let mut spec = (*current.spec).clone();
        let known = served_files(&served);
        if let Some(w) = &request.weights {
            spec.weights = Some(self.allowed_file(w, &known)?);
        }
        for (key, value) in request.params.unwrap_or_default() {
            let value = match value {
                toml::Value::String(p) if FILE_PARAMS.contains(&key.as_str()) => {
                    toml::Value::String(self.allowed_file(Path::new(&p), &known)?.display().to_string())
                }
                v => v,
            };
            spec.params.insert(key, value);
        }
        spec.version = match label {
            Some(v) => v,
            None => {
                // `r<N>`, made unique among the labels this submodel had.
                let n = self.inner.revision.load(Relaxed) + 1;
                let used = served.history.labels.get(name);
                let taken = |l: &String| *l == current.spec.version || used.is_some_and(|u| u.contains_key(l));
                let mut label = format!("r{n}");
                let mut i = 0;
                while taken(&label) {
                    i += 1;
                    label = format!("r{n}.{i}");
                }
                label
            }
        };
        self.replace(&served, current, spec, Mode::Swap, allow, started).await
    }

    /// Checks, loads and switches in a new version of `current` (the change lock is held).
    /// `allow`: the switch may change the type of pipeline outputs.
    async fn replace(
        &self,
        served: &Arc<Served>,
        current: &Arc<Submodel>,
        spec: SubmodelSpec,
        mut mode: Mode,
        allow: bool,
        started: Instant,
    ) -> Result<Swapped, ChangeError> {
        let name = spec.name.to_string();
        let invalid = |message: String| ChangeError::InvalidWeights { submodel: name.clone(), message };
        if let Some(w) = &spec.weights
            && let Some(problem) = maas_graphs::file_problem(w)
        {
            return Err(invalid(format!("weights file `{}` {problem}", w.display())));
        }
        let signature = match Catalog::signature(&self.inner.registry, &spec) {
            Ok(s) => s,
            Err(SignatureError::UnknownKind) => {
                return Err(ChangeError::InvalidRequest(format!("unknown kind `{}`", spec.kind)));
            }
            Err(SignatureError::Invalid(errors)) if errors.iter().any(|e| e.unknown_param) => {
                let msgs: Vec<&str> = errors.iter().filter(|e| e.unknown_param).map(|e| e.message.as_str()).collect();
                return Err(ChangeError::InvalidParams {
                    submodel: name.clone(),
                    kind: spec.kind.clone(),
                    message: msgs.join("; "),
                });
            }
            Err(SignatureError::Invalid(errors)) => {
                let msgs: Vec<String> = errors
                    .iter()
                    .map(|e| match &e.key {
                        Some(k) => format!("{k}: {}", e.message),
                        None => e.message.clone(),
                    })
                    .collect();
                return Err(invalid(msgs.join("; ")));
            }
        };
        if let Mode::Swap = mode {
            // A label names one content; a label with the content it names is a return to it
            // (when it is kept) or a reload of it (when it was forgotten).
            let content = Content::now(&spec);
            if let Some(named) = served.history.labels.get(&name).and_then(|l| l.get(&spec.version)) {
                if *named != content {
                    return Err(ChangeError::VersionConflict {
                        submodel: name,
                        version: spec.version.clone(),
                        named: named.to_string(),
                    });
                }
                if let Some(i) = served
                    .history
                    .kept(&name)
                    .iter()
                    .rposition(|p| p.spec.version == spec.version && Content::new(&p.spec, &p.stamps) == content)
                {
                    mode = Mode::Return(i);
                }
            }
        }
        let mut graph = served.graph.clone();
        graph.submodels.insert(spec.name.clone(), spec.clone());
        if signature != *current.signature {
            let checked = check_graph(&graph, &self.inner.registry)
                .map_err(|diagnostics| ChangeError::Incompatible { submodel: name.clone(), diagnostics })?;
            // The pipelines' output types as the new signature makes them.
            for (pipeline, p) in &mut graph.pipelines {
                let Some(q) = checked.graph.pipelines.get(pipeline) else { continue };
                for o in &mut p.outputs {
                    if let Some(n) = q.outputs.iter().find(|n| n.name == o.name) {
                        o.ty = n.ty.clone();
                    }
                }
            }
            let changes = output_type_changes(&served.graph, &graph);
            if !changes.is_empty() {
                if !allow {
                    return Err(ChangeError::OutputTypeChanged { changes });
                }
                for c in &changes {
                    tracing::warn!(submodel = %name, "output type changed: {c}");
                }
            }
        }
        let replicas = spec.replicas;
        let version = spec.version.clone();
        let options = &self.inner.options;
        crate::memory::check(&self.inner.registry, [&spec], options.max_load_bytes)?;
        let new = start_submodel(
            Arc::new(spec),
            &self.inner.registry,
            options,
            current.metrics.clone(),
            &self.inner.held_jobs,
            Some((&*self.inner.cluster, &served.graph.nodes)),
        )
        .await
        .map_err(|e| invalid(load_error(e)))?;
        let mut history = served.history.clone();
        let now = SystemTime::now();
        match mode {
            Mode::Swap => retire(&mut history, current, now, false, options.keep_versions),
            Mode::Return(i) => {
                history.past.entry(name.clone()).or_default().remove(i);
                retire(&mut history, current, now, false, options.keep_versions);
            }
            Mode::Rollback(i) => {
                history.past.entry(name.clone()).or_default().remove(i);
                retire(&mut history, current, now, true, options.keep_versions);
            }
        }
        history.label(&new.spec, &new.stamps);
        let mut submodels = served.submodels.clone();
        submodels.insert(name.clone(), Arc::new(new));
        let next = Served::compile(graph, submodels, history, Some(served)).map_err(|e| invalid(e.to_string()))?;
        self.commit(next)?;
        Ok(Swapped {
            submodel: name,
            previous: current.spec.version.clone(),
            version,
            replicas,
            elapsed: started.elapsed(),
        })
    }

    /// Swaps several submodels at once, each to new weights (absolute, or relative to the
    /// working directory) under a new version label: the graph served now with those replaced,
    /// applied as one recomposition, so every pipeline switches at once and no request runs one
    /// new and one old. Files are confined to the file roots; each swap must name its version
    /// (different from the one serving). Answers `(submodel, previous, version)` for each.
    pub async fn swap_together(
        &self,
        swaps: BTreeMap<String, (PathBuf, String)>,
    ) -> Result<Vec<(String, String, String)>, ChangeError> {
        if swaps.is_empty() {
            return Err(ChangeError::InvalidRequest("no submodel to swap".into()));
        }
        let mut resolved = BTreeMap::new();
        for (submodel, (weights, version)) in swaps {
            if version.trim().is_empty() || version.len() > MAX_LABEL {
                return Err(ChangeError::InvalidRequest(format!(
                    "`{submodel}`: a version label of 1 to {MAX_LABEL} bytes is needed"
                )));
            }
            let path =
                if weights.is_absolute() { weights } else { std::env::current_dir().unwrap_or_default().join(weights) };
            resolved.insert(submodel, (path, version));
        }
        let noted = Arc::new(Mutex::new(Vec::new()));
        let answer = noted.clone();
        let edit = move |served: &maas_graphs::Graph| {
            let mut graph = served.clone();
            let mut noted = noted.lock().unwrap_or_else(|p| p.into_inner());
            for (submodel, (path, version)) in resolved {
                let spec = graph
                    .submodels
                    .iter_mut()
                    .find(|(n, _)| n.as_str() == submodel)
                    .map(|(_, s)| s)
                    .ok_or_else(|| ChangeError::UnknownSubmodel(submodel.clone()))?;
                if spec.version == version {
                    return Err(ChangeError::InvalidRequest(format!(
                        "version `{version}` of `{submodel}` is serving already; label the new version differently"
                    )));
                }
                noted.push((submodel, spec.version.clone(), version.clone()));
                spec.weights = Some(path);
                spec.version = version;
            }
            Ok(vec![SourceFile::new(
                "the graph served, with the submodels swapped together",
                maas_graphs::to_toml(&graph),
                std::env::current_dir().unwrap_or_default(),
            )])
        };
        let options = RecomposeOptions { dry_run: false, allow_signature_change: false };
        let result = self.recompose_from_served(edit, options).await;
        log_swap_together(&result);
        result?;
        let answer = std::mem::take(&mut *answer.lock().unwrap_or_else(|p| p.into_inner()));
        Ok(answer)
    }

    /// Recomposes to the graph `sources` makes of the graph served now (read under the change
    /// lock, so no other change comes between the reading and the switch).
    pub(crate) async fn recompose_from_served(
        &self,
        sources: impl FnOnce(&maas_graphs::Graph) -> Result<Vec<SourceFile>, ChangeError> + Send,
        options: RecomposeOptions,
    ) -> Result<Recomposed, ChangeError> {
        let result = self.recompose_locked(sources, options, true, Instant::now()).await;
        self.inner.change_counts.record("recompose", &result);
        result
    }

    async fn recompose_locked(
        &self,
        sources: impl FnOnce(&maas_graphs::Graph) -> Result<Vec<SourceFile>, ChangeError> + Send,
        options: RecomposeOptions,
        confine: bool,
        started: Instant,
    ) -> Result<Recomposed, ChangeError> {
        let _lock = self.inner.change_lock.lock().await;
        self.not_shutting_down()?;
        let served = self.inner.served.load_full();
        let sources = sources(&served.graph)?;
        // Confine before reading anything: the files the sources declare, then (for what a
        // broken source hides from that scan) every file the checker would open.
        let known = served_files(&served);
        if confine {
            for file in sources.iter().flat_map(declared_files) {
                self.allowed_file(&file, &known)?;
            }
        }
        let catalog = Confined { engine: self, known: &known, confine, refused: Mutex::new(None) };
        let checked = maas_graphs::check(sources, &catalog);
        if let Some(refused) = catalog.refused.into_inner().unwrap_or_else(|p| p.into_inner()) {
            return Err(refused);
        }
        let checked = checked.map_err(ChangeError::InvalidGraph)?;
        let mut warnings: Vec<String> = checked.warnings.iter().map(ToString::to_string).collect();
        let diff = served.graph.diff(&checked.graph);
        let fresh: Vec<&SubmodelName> = diff.submodels.added.iter().chain(&diff.submodels.changed).collect();
        for name in &diff.submodels.changed {
            let (old, new) = (&served.graph.submodels[name], &checked.graph.submodels[name]);
            let (o, n) = (old.normalized(), new.normalized());
            if old.version == new.version && (o.weights != n.weights || o.params != n.params || o.kind != n.kind) {
                warnings.push(format!(
                    "submodel `{name}` changes its weights or params but keeps version `{}`: the version it replaces is kept as `{}~r{}`",
                    new.version,
                    old.version,
                    self.inner.revision.load(Relaxed) + 1
                ));
            }
        }
        for name in &fresh {
            let new = &checked.graph.submodels[*name];
            let named = served.history.labels.get(name.as_str()).and_then(|l| l.get(&new.version));
            let serving = served.graph.submodels.get(*name).is_some_and(|s| s.version == new.version);
            if let Some(named) = named
                && !serving
                && *named != Content::now(new)
            {
                warnings.push(format!(
                    "submodel `{name}`: version `{}` named other content before ({named}); the graph redefines it",
                    new.version
                ));
            }
        }
        // The static check first (as a swap does), then the memory guard (reads file headers).
        let output_type_changes = output_type_changes(&served.graph, &checked.graph);
        if !output_type_changes.is_empty() {
            if !options.allow_signature_change {
                return Err(ChangeError::OutputTypeChanged { changes: output_type_changes });
            }
            warnings.extend(output_type_changes.iter().map(|c| format!("{c}: the output changes its type")));
        }
        let loads = fresh.iter().map(|name| &checked.graph.submodels[*name]);
        crate::memory::check(&self.inner.registry, loads, self.inner.options.max_load_bytes)?;
        if options.dry_run || diff.is_empty() {
            return Ok(Recomposed { diff, applied: false, warnings, output_type_changes, elapsed: started.elapsed() });
        }
        let keep = self.inner.options.keep_versions;
        let mut submodels = BTreeMap::new();
        for (name, spec) in &checked.graph.submodels {
            let running = served.submodels.get(name.as_str());
            let sub = match running {
                Some(s) if !fresh.contains(&name) => s.clone(),
                _ => {
                    let metrics = running.map(|s| s.metrics.clone()).unwrap_or_default();
                    // A failure drops (and so stops) what this change started so far.
                    let options = &self.inner.options;
                    let s = start_submodel(
                        Arc::new(spec.clone()),
                        &self.inner.registry,
                        options,
                        metrics,
                        &self.inner.held_jobs,
                        Some((&*self.inner.cluster, &checked.graph.nodes)),
                    )
                    .await
                    .map_err(|e| ChangeError::InvalidWeights { submodel: name.to_string(), message: load_error(e) })?;
                    Arc::new(s)
                }
            };
            submodels.insert(name.to_string(), sub);
        }
        let mut history = served.history.clone();
        history.past.retain(|name, _| checked.graph.submodels.contains_key(name.as_str()));
        history.labels.retain(|name, _| checked.graph.submodels.contains_key(name.as_str()));
        let now = SystemTime::now();
        let revision = self.inner.revision.load(Relaxed) + 1;
        for name in &diff.submodels.changed {
            let old = &served.submodels[name.as_str()];
            if checked.graph.submodels.get(name.as_str()).is_some_and(|new| new.version == old.spec.version) {
                // The graph redefines the label: the version it replaces is kept under a label of
                // its own, so a rollback to it never reports the new content's label.
                let mut spec = (*old.spec).clone();
                spec.version = format!("{}~r{revision}", spec.version);
                retire_as(&mut history, old, Arc::new(spec), now, false, keep);
            } else {
                retire(&mut history, old, now, false, keep);
            }
        }
        for name in &fresh {
            let s = &submodels[name.as_str()];
            history.label(&s.spec, &s.stamps);
        }
        let next = Served::compile(checked.graph, submodels, history, Some(&served))
            .map_err(|e| ChangeError::InvalidRequest(e.to_string()))?;
        self.commit(next)?;
        Ok(Recomposed { diff, applied: true, warnings, output_type_changes, elapsed: started.elapsed() })
    }

    /// Records `next` (when there is a state directory) and switches to it.
    fn commit(&self, next: Served) -> Result<(), ChangeError> {
        // A shutdown that began while this change loaded has stopped what served; do not
        // bring anything new up behind it (`next`'s new submodels stop as it drops).
        self.not_shutting_down()?;
        let revision = self.inner.revision.load(Relaxed) + 1;
        if let Some(dir) = &self.inner.options.state_dir {
            crate::state::save(dir, &next, revision).map_err(ChangeError::NotRecorded)?;
        }
        self.inner.served.store(Arc::new(next));
        self.inner.revision.store(revision, Relaxed);
        Ok(())
    }

    /// The canonical form of a file a change names, if it lies under the file roots or is
    /// already served (`known`). A relative path resolves against the working directory.
    fn allowed_file(&self, path: &Path, known: &HashSet<PathBuf>) -> Result<PathBuf, ChangeError> {
        let absolute = if path.is_absolute() {
            path.to_path_buf()
        } else {
            std::env::current_dir().map(|d| d.join(path)).unwrap_or_else(|_| path.to_path_buf())
        };
        // The file's canonical path, or (for a file that does not exist) its directory's.
        let canonical = std::fs::canonicalize(&absolute).ok().or_else(|| {
            let dir = std::fs::canonicalize(absolute.parent()?).ok()?;
            Some(dir.join(absolute.file_name()?))
        });
        let Some(roots) = &self.inner.options.file_roots else {
            return Ok(canonical.unwrap_or(absolute));
        };
        match canonical {
            Some(c) if known.contains(&c) || roots.iter().any(|r| c.starts_with(r)) => Ok(c),
            _ => Err(ChangeError::Forbidden {
                path: path.display().to_string(),
                roots: roots.iter().map(|r| r.display().to_string()).collect::<Vec<_>>().join(", "),
            }),
        }
    }
}

/// Keeps `old` (which stops serving at `until`) as its submodel's newest kept version (left by a
/// rollback or not), forgetting the oldest beyond `keep` (their labels stay taken).
fn retire(history: &mut History, old: &Submodel, until: SystemTime, left_by_rollback: bool, keep: usize) {
    retire_as(history, old, old.spec.clone(), until, left_by_rollback, keep);
}

/// [`retire`], keeping `old` as `spec` (the same content under another label).
fn retire_as(
    history: &mut History,
    old: &Submodel,
    spec: Arc<SubmodelSpec>,
    until: SystemTime,
    left_by_rollback: bool,
    keep: usize,
) {
    history.label(&spec, &old.stamps);
    let past = history.past.entry(old.spec.name.to_string()).or_default();
    past.push(PastVersion { spec, since: old.since, until, stamps: old.stamps.clone(), left_by_rollback });
    let excess = past.len().saturating_sub(keep);
    past.drain(..excess);
}

/// Refuses to return to a kept version whose files changed since it served: it would load other
/// weights under its label.
fn unchanged_since(kept: &PastVersion) -> Result<(), ChangeError> {
    for stamp in &kept.stamps {
        if FileStamp::read(&stamp.path).as_ref() != Some(stamp) {
            return Err(ChangeError::InvalidWeights {
                submodel: kept.spec.name.to_string(),
                message: format!(
                    "`{}` changed since version `{}` served; returning to it would load other weights under its label (swap to it with a new version instead)",
                    stamp.path.display(),
                    kept.spec.version
                ),
            });
        }
    }
    Ok(())
}

/// The canonical paths of every file the served graph and its kept versions read: a change may
/// name them wherever they lie (they are read already).
fn served_files(served: &Served) -> HashSet<PathBuf> {
    let past = served.history.past.values().flatten().map(|p| &*p.spec);
    served
        .graph
        .submodels
        .values()
        .chain(past)
        .flat_map(SubmodelSpec::files)
        .filter_map(|f| std::fs::canonicalize(f).ok())
        .collect()
}

/// The files a graph source names (`weights` and file params of each submodel), resolved
/// against its directory; found by a plain TOML parse, without reading any of them. A source
/// that does not parse names none here (the checker then rejects it, through [`Confined`]).
fn declared_files(source: &SourceFile) -> Vec<PathBuf> {
    let Ok(doc) = toml::from_str::<toml::Table>(&source.text) else { return Vec::new() };
    let Some(submodels) = doc.get("submodels").and_then(toml::Value::as_table) else { return Vec::new() };
    let mut files = Vec::new();
    for s in submodels.values().filter_map(toml::Value::as_table) {
        files.extend(s.get("weights").and_then(toml::Value::as_str).map(|w| source.base_dir.join(w)));
        if let Some(params) = s.get("params").and_then(toml::Value::as_table) {
            for k in FILE_PARAMS {
                files.extend(params.get(*k).and_then(toml::Value::as_str).map(|p| source.base_dir.join(p)));
            }
        }
    }
    files
}

/// The registry as the checker sees it during a confined recomposition: a submodel whose files
/// lie outside the roots is refused before its kind reads them.
struct Confined<'a> {
    engine: &'a Engine,
    known: &'a HashSet<PathBuf>,
    confine: bool,
    refused: Mutex<Option<ChangeError>>,
}

impl Catalog for Confined<'_> {
    fn kinds(&self) -> Vec<String> {
        self.engine.inner.registry.kinds()
    }

    fn signature(&self, submodel: &SubmodelSpec) -> Result<Signature, SignatureError> {
        if self.confine {
            for file in submodel.files() {
                if let Err(e) = self.engine.allowed_file(&file, self.known) {
                    let message = e.to_string();
                    self.refused.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
                    return Err(SignatureError::Invalid(vec![KindError::whole(message)]));
                }
            }
        }
        Catalog::signature(&self.engine.inner.registry, submodel)
    }
}

/// Why a version failed to start, without the submodel's name (the change error names it).
fn load_error(e: crate::EngineError) -> String {
    match e {
        crate::EngineError::Load { source, .. } => format!("failed to load: {source}"),
        crate::EngineError::Start { message, .. } => format!("failed to start: {message}"),
        other => other.to_string(),
    }
}

/// Checks a graph (as if written as TOML) against the registry's kinds.
pub(crate) fn check_graph(graph: &Graph, catalog: &dyn Catalog) -> Result<maas_graphs::Checked, Diagnostics> {
    maas_graphs::check(vec![SourceFile::new("<served graph>", maas_graphs::to_toml(graph), "")], catalog)
}

fn log_swap(change: &str, submodel: &str, result: &Result<Swapped, ChangeError>) {
    match result {
        Ok(s) => tracing::info!(
            change, submodel, from = %s.previous, to = %s.version, replicas = s.replicas, elapsed = ?s.elapsed,
            "submodel version switched"
        ),
        Err(e) => tracing::warn!(change, submodel, error = %e, "change rejected; the serving version is unchanged"),
    }
}
