//! Training jobs as written in graph files, `[training.NAME]`, checked against the graph they
//! sit in (the same files as the submodels and pipelines) and the registry's kinds.
//!
//! ```toml
//! [training.head]
//! pipeline = "classify"               # the pipeline trained through
//! learn = ["head"]                    # the submodels that learn; the others are frozen
//! init = "weights"                    # start from their weights, or "random" (seeded)
//! loss = { output = "head.out", kind = "cross_entropy" }   # node.port of the pipeline: logits
//! data = { path = "../../data/digits.csv.gz", inputs = { pixels = "0..64" }, label = 64 }
//! optimizer = { kind = "adamw", lr = 0.003, weight_decay = 0.0001 }  # or kind = "sgd", momentum
//! lr_decay_to = 0.1                   # lr decays linearly to this fraction of itself (default 1)
//! epochs = 20
//! batch_size = 32
//! held_out = 0.2                      # fraction of the rows kept for the accuracy
//! split_seed = 1797                   # the held-out shuffle (default: `seed`)
//! seed = 7                            # init and batch order
//! workers = 1                         # data-parallel workers
//! servers = 1                         # parameter servers the parameters are split across
//! mode = "sync"                       # or "async"
//! staleness = 2                       # async: versions a worker may fall behind
//! compression = "none"                # topk:DENSITY, int8, sign
//! error_feedback = true
//! min_accuracy = 0.97                 # optional: below it, nothing is swapped in
//! prune = 0.5                         # optional: zero the smallest half of each weight matrix,
//! prune_epochs = 4                    #   then fine-tune this long (default epochs / 5)
//! ```
//!
//! Every problem is a diagnostic at `file:line:col`: an unknown key, a value of the wrong
//! type, an unknown pipeline or submodel, a submodel that is not in the pipeline or whose kind
//! cannot learn (with the kind's reason), a loss output that is not a node's port or not
//! `f32[B,C]`, data columns that do not match the pipeline's inputs, a missing data file, and
//! settings out of range.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;

use maas_graphs::{
    Checked, Diagnostic, Diagnostics, Dim, NodeName, PipelineName, PortName, PortType, SourceFile, SubmodelName,
};
use maas_kernels::Registry;
use serde::{Deserialize, Serialize};
use toml::Spanned;

use crate::compress::Compression;
use crate::data::{ColumnRange, Columns};
use crate::optim::Optimizer;

/// How the learning submodels start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Init {
    /// From the weights each submodel serves with.
    Weights,
    /// From a seeded random initialisation (`seed`).
    Random,
}

/// How workers and servers step together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Mode {
    /// Every step waits for every worker (deterministic for a seed).
    Sync,
    /// Workers push and pull without waiting for each other, within `staleness` versions.
    Async,
}

/// What the loss is computed on: a node's output port, logits over `classes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Loss {
    /// The node.
    pub node: NodeName,
    /// Its output port.
    pub port: PortName,
    /// The classes (the port's fixed last dimension).
    pub classes: usize,
}

/// The training data and how its columns map to the pipeline's inputs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DataSpec {
    /// The CSV or gzip-CSV file (resolved against the graph file's directory).
    pub path: PathBuf,
    /// Columns per input and the label.
    pub columns: Columns,
}

/// A checked training job.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Job {
    /// `[training.NAME]`.
    pub name: String,
    /// The pipeline trained through.
    pub pipeline: PipelineName,
    /// The submodels that learn.
    pub learn: Vec<SubmodelName>,
    /// How they start.
    pub init: Init,
    /// The cross-entropy loss's input.
    pub loss: Loss,
    /// The data.
    pub data: DataSpec,
    /// The optimizer the parameter servers apply.
    pub optimizer: Optimizer,
    /// The learning rate decays linearly over the training to this fraction of `lr` (1: constant).
    pub lr_decay_to: f64,
    /// Passes over the training rows.
    pub epochs: usize,
    /// Rows per step (per worker).
    pub batch_size: usize,
    /// Fraction of the rows held out for the accuracy.
    pub held_out: f64,
    /// Seed of the held-out shuffle.
    pub split_seed: u64,
    /// Seed of the init and the batch order.
    pub seed: u64,
    /// Data-parallel workers.
    pub workers: usize,
    /// Parameter servers.
    pub servers: usize,
    /// Sync or async.
    pub mode: Mode,
    /// Async: how many versions behind a worker may be before it waits.
    pub staleness: u64,
    /// Gradient compression on the worker-to-server path.
    pub compression: Compression,
    /// Whether what compression leaves out is carried to the next step.
    pub error_feedback: bool,
    /// Below this held-out accuracy (0..1) the job swaps nothing in.
    pub min_accuracy: Option<f64>,
    /// After training, zero this fraction (0..1) of each learning weight matrix's entries, the
    /// smallest in magnitude, then fine-tune with them held at zero.
    pub prune: Option<f64>,
    /// Epochs of that fine-tune (default: a fifth of `epochs`, at least 1).
    pub prune_epochs: usize,
    /// Where the workers run: worker `i` on `worker_nodes[i % len]` (a `[nodes.NAME]` of the
    /// graph, or `local`); empty: all in the process that runs the job.
    #[serde(default)]
    pub worker_nodes: Vec<String>,
    /// Where the parameter servers run, the same way.
    #[serde(default)]
    pub server_nodes: Vec<String>,
}

impl Job {
    /// Where worker `index` runs (`None`: in the process that runs the job).
    pub fn worker_node(&self, index: usize) -> Option<&str> {
        placed(&self.worker_nodes, index)
    }

    /// Where server `index` runs (`None`: in the process that runs the job).
    pub fn server_node(&self, index: usize) -> Option<&str> {
        placed(&self.server_nodes, index)
    }

    /// Whether any of its actors runs on a node.
    pub fn is_placed(&self) -> bool {
        (0..self.workers).any(|i| self.worker_node(i).is_some())
            || (0..self.servers).any(|i| self.server_node(i).is_some())
    }
}

fn placed(nodes: &[String], index: usize) -> Option<&str> {
    if nodes.is_empty() {
        return None;
    }
    let n = nodes[index % nodes.len()].as_str();
    (n != maas_graphs::LOCAL_NODE).then_some(n)
}

/// `worker_nodes = "a"` or `["a", "b"]`.
#[derive(Deserialize)]
#[serde(untagged, expecting = "a node name (\"a\") or a list of node names ([\"a\", \"b\"])")]
enum NodesToml {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize, Default)]
struct FileToml {
    #[serde(default)]
    training: BTreeMap<String, Spanned<JobToml>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JobToml {
    pipeline: Spanned<String>,
    learn: Spanned<Vec<Spanned<String>>>,
    init: Option<Spanned<String>>,
    loss: Spanned<LossToml>,
    data: Spanned<DataToml>,
    optimizer: Option<Spanned<OptimizerToml>>,
    lr_decay_to: Option<Spanned<f64>>,
    epochs: Option<Spanned<i64>>,
    batch_size: Option<Spanned<i64>>,
    held_out: Option<Spanned<f64>>,
    split_seed: Option<u64>,
    seed: Option<u64>,
    workers: Option<Spanned<i64>>,
    servers: Option<Spanned<i64>>,
    mode: Option<Spanned<String>>,
    staleness: Option<Spanned<i64>>,
    compression: Option<Spanned<String>>,
    error_feedback: Option<bool>,
    min_accuracy: Option<Spanned<f64>>,
    prune: Option<Spanned<f64>>,
    prune_epochs: Option<Spanned<i64>>,
    worker_nodes: Option<Spanned<NodesToml>>,
    server_nodes: Option<Spanned<NodesToml>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LossToml {
    output: Spanned<String>,
    kind: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DataToml {
    path: Spanned<String>,
    inputs: Spanned<BTreeMap<String, Spanned<String>>>,
    label: Spanned<i64>,
    header: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OptimizerToml {
    kind: Spanned<String>,
    lr: Option<f64>,
    momentum: Option<f64>,
    weight_decay: Option<f64>,
    beta1: Option<f64>,
    beta2: Option<f64>,
    eps: Option<f64>,
}

/// Collects diagnostics at spans of one file.
struct Report<'a> {
    file: &'a Arc<SourceFile>,
    diags: &'a mut Vec<Diagnostic>,
}

impl Report<'_> {
    fn error(&mut self, span: Range<usize>, message: impl Into<String>) {
        self.diags.push(Diagnostic::error(Some(self.file.locate(&span)), message));
    }
}

/// The training jobs of `sources` (the graph's files), checked; every problem of every job.
pub fn check(sources: &[SourceFile], checked: &Checked, registry: &Registry) -> Result<Vec<Job>, Diagnostics> {
    let mut diags = Vec::new();
    let mut jobs = Vec::new();
    for source in sources {
        let file = Arc::new(source.clone());
        let mut report = Report { file: &file, diags: &mut diags };
        let parsed: FileToml = match toml::from_str(&file.text) {
            Ok(f) => f,
            Err(e) => {
                // Only the `[training]` part can fail here: the graph check read the rest.
                report.error(e.span().unwrap_or(0..0), format!("in a training job: {}", e.message()));
                continue;
            }
        };
        for (name, job) in parsed.training {
            if let Some(j) = check_job(&name, job, checked, registry, &mut report) {
                jobs.push(j);
            }
        }
    }
    if diags.is_empty() { Ok(jobs) } else { Err(Diagnostics(diags)) }
}

/// The most workers, and the most parameter servers, a job may have (each is a thread or an
/// actor with its own copy of state).
pub const MAX_WORKERS: usize = 64;

/// A positive integer setting.
fn count(v: Option<Spanned<i64>>, default: usize, key: &str, report: &mut Report<'_>) -> usize {
    match v {
        None => default,
        Some(v) if *v.get_ref() >= 1 => *v.get_ref() as usize,
        Some(v) => {
            report.error(v.span(), format!("`{key}` must be at least 1, got {}", v.get_ref()));
            default
        }
    }
}

fn check_job(
    name: &str,
    job: Spanned<JobToml>,
    checked: &Checked,
    registry: &Registry,
    report: &mut Report<'_>,
) -> Option<Job> {
    let errors_before = report.diags.len();
    let job_span = job.span();
    let job = job.into_inner();
    let graph = &checked.graph;

    // The pipeline.
    let pipeline_name = job.pipeline.get_ref().as_str();
    let pipeline = graph.pipelines.iter().find(|(n, _)| n.as_str() == pipeline_name).map(|(_, p)| p);
    if pipeline.is_none() {
        let hint = maas_graphs::did_you_mean(pipeline_name, graph.pipelines.keys().map(PipelineName::as_str))
            .map(|s| format!("; did you mean `{s}`?"))
            .unwrap_or_default();
        report.error(job.pipeline.span(), format!("training job `{name}`: unknown pipeline `{pipeline_name}`{hint}"));
    }

    // The learning submodels.
    let mut learn = Vec::new();
    if job.learn.get_ref().is_empty() {
        report.error(job.learn.span(), format!("training job `{name}`: `learn` names no submodel"));
    }
    for s in job.learn.get_ref() {
        let sname = s.get_ref().as_str();
        let Some((key, spec)) = graph.submodels.iter().find(|(n, _)| n.as_str() == sname) else {
            let hint = maas_graphs::did_you_mean(sname, graph.submodels.keys().map(SubmodelName::as_str))
                .map(|s| format!("; did you mean `{s}`?"))
                .unwrap_or_default();
            report.error(s.span(), format!("training job `{name}`: unknown submodel `{sname}`{hint}"));
            continue;
        };
        if let Some(p) = pipeline
            && !p.nodes.iter().any(|n| n.submodel == *key)
        {
            report.error(
                s.span(),
                format!("training job `{name}`: submodel `{sname}` is not used by pipeline `{pipeline_name}`"),
            );
        }
        match registry.get(&spec.kind).map(|k| k.learnable(spec)) {
            Some(Ok(())) => learn.push(key.clone()),
            Some(Err(why)) => {
                report.error(s.span(), format!("training job `{name}`: submodel `{sname}` cannot learn: {why}"))
            }
            None => report
                .error(s.span(), format!("training job `{name}`: submodel `{sname}` has unknown kind `{}`", spec.kind)),
        }
    }

    let init = match job.init.as_ref().map(|i| (i.get_ref().as_str(), i.span())) {
        None | Some(("weights", _)) => Init::Weights,
        Some(("random", _)) => Init::Random,
        Some((other, span)) => {
            report.error(span, format!("unknown init `{other}`; expected \"weights\" or \"random\""));
            Init::Weights
        }
    };

    // The loss: node.port of the pipeline, f32[B,C].
    let loss = job.loss.into_inner();
    if let Some(k) = &loss.kind
        && k.get_ref() != "cross_entropy"
    {
        report.error(k.span(), format!("unknown loss `{}`; expected \"cross_entropy\"", k.get_ref()));
    }
    let mut classes = None;
    let mut loss_at = None;
    let out = loss.output.get_ref().as_str();
    match out.split_once('.') {
        None => report.error(loss.output.span(), format!("loss output `{out}` is not `node.port`")),
        Some((node, port)) => {
            if let Some(p) = pipeline {
                match p.nodes.iter().find(|n| n.name.as_str() == node) {
                    None => report.error(
                        loss.output.span(),
                        format!("loss output `{out}`: pipeline `{pipeline_name}` has no node `{node}`"),
                    ),
                    Some(n) => {
                        let ty = checked
                            .signatures
                            .get(&n.submodel)
                            .and_then(|sig| sig.outputs.iter().find(|o| o.name == port))
                            .map(|o| o.ty.clone());
                        match ty {
                            None => report.error(loss.output.span(), format!("loss output `{out}`: node `{node}` has no output port `{port}`")),
                            Some(PortType::Tensor { dtype: maas_graphs::DType::F32, shape }) if shape.len() == 2 => {
                                match shape[1] {
                                    Dim::Fixed(c) if c >= 2 => {
                                        classes = Some(c);
                                        loss_at = Some((n.name.clone(), PortName::new(port).ok()?));
                                    }
                                    _ => report.error(
                                        loss.output.span(),
                                        format!("loss output `{out}` is f32[B,{}]: cross-entropy needs a fixed number of classes (at least 2)", shape[1]),
                                    ),
                                }
                            }
                            Some(other) => report.error(
                                loss.output.span(),
                                format!("loss output `{out}` is {other}; cross-entropy needs logits f32[B,C]"),
                            ),
                        }
                    }
                }
            }
        }
    }

    // The data: a file, and columns for exactly the pipeline's inputs.
    let data = job.data.into_inner();
    let path = report.file.base_dir.join(data.path.get_ref());
    if let Some(problem) = maas_graphs::file_problem(&path) {
        report.error(data.path.span(), format!("data file `{}` {problem}", path.display()));
    }
    let mut inputs = Vec::new();
    for (input, cols) in data.inputs.get_ref() {
        let range: ColumnRange = match cols.get_ref().parse() {
            Ok(r) => r,
            Err(e) => {
                report.error(cols.span(), format!("data input `{input}`: {e}"));
                continue;
            }
        };
        if let Some(p) = pipeline {
            match p.inputs.iter().find(|i| i.name.as_str() == input) {
                None => report.error(
                    cols.span(),
                    format!("data input `{input}`: pipeline `{pipeline_name}` has no input `{input}`"),
                ),
                Some(i) => match &i.ty {
                    PortType::Tensor { shape, .. } if shape.len() == 2 && shape[1] == Dim::Fixed(range.0.len()) => {}
                    ty => report.error(
                        cols.span(),
                        format!(
                            "data input `{input}`: columns {} are {} values per row, but the pipeline input is {ty}",
                            cols.get_ref(),
                            range.0.len()
                        ),
                    ),
                },
            }
        }
        inputs.push((input.clone(), range));
    }
    if let Some(p) = pipeline {
        for i in &p.inputs {
            if !data.inputs.get_ref().contains_key(i.name.as_str()) {
                report.error(data.inputs.span(), format!("data gives no columns for pipeline input `{}`", i.name));
            }
        }
    }
    if *data.label.get_ref() < 0 {
        report.error(data.label.span(), format!("`label` is a column number, got {}", data.label.get_ref()));
    }

    // Settings.
    let optimizer = match job.optimizer {
        None => Optimizer::adamw(1e-3),
        Some(o) => {
            let span = o.span();
            let o = o.into_inner();
            let opt = match o.kind.get_ref().as_str() {
                "sgd" => {
                    for (k, v) in [("beta1", o.beta1), ("beta2", o.beta2), ("eps", o.eps)] {
                        if v.is_some() {
                            report.error(
                                span.clone(),
                                format!("`{k}` is an adamw setting; sgd takes lr, momentum, weight_decay"),
                            );
                        }
                    }
                    Some(Optimizer::Sgd {
                        lr: o.lr.unwrap_or(0.01),
                        momentum: o.momentum.unwrap_or(0.0),
                        weight_decay: o.weight_decay.unwrap_or(0.0),
                    })
                }
                "adamw" => {
                    if o.momentum.is_some() {
                        report.error(
                            span.clone(),
                            "`momentum` is an sgd setting; adamw takes lr, beta1, beta2, eps, weight_decay",
                        );
                    }
                    let d = Optimizer::adamw(o.lr.unwrap_or(1e-3));
                    let Optimizer::AdamW { lr, beta1, beta2, eps, weight_decay } = d else { unreachable!() };
                    Some(Optimizer::AdamW {
                        lr,
                        beta1: o.beta1.unwrap_or(beta1),
                        beta2: o.beta2.unwrap_or(beta2),
                        eps: o.eps.unwrap_or(eps),
                        weight_decay: o.weight_decay.unwrap_or(weight_decay),
                    })
                }
                other => {
                    report.error(o.kind.span(), format!("unknown optimizer `{other}`; expected \"sgd\" or \"adamw\""));
                    None
                }
            };
            if let Some(Err(e)) = opt.map(|o| o.validate()) {
                report.error(span, format!("optimizer: {e}"));
            }
            opt.unwrap_or(Optimizer::adamw(1e-3))
        }
    };
    let lr_decay_to = match job.lr_decay_to {
        None => 1.0,
        Some(f) if *f.get_ref() > 0.0 && *f.get_ref() <= 1.0 => *f.get_ref(),
        Some(f) => {
            report.error(
                f.span(),
                format!("`lr_decay_to` is a fraction of `lr`, 0 < lr_decay_to <= 1; got {}", f.get_ref()),
            );
            1.0
        }
    };
    let epochs = count(job.epochs, 10, "epochs", report);
    let batch_size = count(job.batch_size, 32, "batch_size", report);
    let spans = (job.workers.as_ref().map(Spanned::span), job.servers.as_ref().map(Spanned::span));
    let workers = count(job.workers, 1, "workers", report);
    let servers = count(job.servers, 1, "servers", report);
    for (key, span, n) in [("workers", spans.0, workers), ("servers", spans.1, servers)] {
        if n > MAX_WORKERS
            && let Some(span) = span
        {
            report.error(span, format!("`{key}` is at most {MAX_WORKERS}, got {n}"));
        }
    }
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') || name.is_empty() {
        report.error(
            job_span.clone(),
            format!("training job name `{name}`: use letters, digits, `_` and `-` only (it names files and threads)"),
        );
    }
    let held_out = match job.held_out {
        None => 0.2,
        Some(h) if *h.get_ref() > 0.0 && *h.get_ref() < 1.0 => *h.get_ref(),
        Some(h) => {
            report.error(
                h.span(),
                format!("`held_out` is a fraction of the rows, 0 < held_out < 1; got {}", h.get_ref()),
            );
            0.2
        }
    };
    let mode = match job.mode.as_ref().map(|m| (m.get_ref().as_str(), m.span())) {
        None | Some(("sync", _)) => Mode::Sync,
        Some(("async", _)) => Mode::Async,
        Some((other, span)) => {
            report.error(span, format!("unknown mode `{other}`; expected \"sync\" or \"async\""));
            Mode::Sync
        }
    };
    let staleness = match job.staleness {
        None => 2,
        Some(s) if *s.get_ref() >= 0 => *s.get_ref() as u64,
        Some(s) => {
            report.error(s.span(), format!("`staleness` must be at least 0, got {}", s.get_ref()));
            0
        }
    };
    let compression = match job.compression {
        None => Compression::None,
        Some(c) => c.get_ref().parse().unwrap_or_else(|e: crate::compress::ParseCompressionError| {
            report.error(c.span(), e.to_string());
            Compression::None
        }),
    };
    let min_accuracy = match job.min_accuracy {
        None => None,
        Some(a) if (0.0..=1.0).contains(a.get_ref()) => Some(*a.get_ref()),
        Some(a) => {
            report.error(a.span(), format!("`min_accuracy` is a fraction, 0..1; got {}", a.get_ref()));
            None
        }
    };
    let prune = match job.prune {
        None => None,
        Some(p) if (0.0..1.0).contains(p.get_ref()) => Some(*p.get_ref()),
        Some(p) => {
            report.error(
                p.span(),
                format!("`prune` is the fraction of weights zeroed, 0 <= prune < 1; got {}", p.get_ref()),
            );
            None
        }
    };
    let prune_epochs = count(job.prune_epochs, (epochs / 5).max(1), "prune_epochs", report);
    let seed = job.seed.unwrap_or(0);
    let worker_nodes = nodes(name, "worker_nodes", job.worker_nodes, graph, report);
    let server_nodes = nodes(name, "server_nodes", job.server_nodes, graph, report);

    if report.diags.len() > errors_before {
        return None;
    }
    let (node, port) = loss_at?;
    let classes = classes?;
    if pipeline.is_none() {
        report.error(job_span, format!("training job `{name}` is incomplete"));
        return None;
    }
    Some(Job {
        name: name.to_string(),
        pipeline: PipelineName::new(pipeline_name).ok()?,
        learn,
        init,
        loss: Loss { node, port, classes },
        data: DataSpec {
            path,
            columns: Columns {
                inputs,
                label: *data.label.get_ref() as usize,
                classes,
                header: data.header.unwrap_or(false),
            },
        },
        optimizer,
        lr_decay_to,
        epochs,
        batch_size,
        held_out,
        split_seed: job.split_seed.unwrap_or(seed),
        seed,
        workers,
        servers,
        mode,
        staleness,
        compression,
        error_feedback: job.error_feedback.unwrap_or(true),
        min_accuracy,
        prune,
        prune_epochs,
        worker_nodes,
        server_nodes,
    })
}

/// A placement key's nodes, each declared in the graph's `[nodes]` (or `local`).
fn nodes(
    job: &str,
    key: &str,
    value: Option<Spanned<NodesToml>>,
    graph: &maas_graphs::Graph,
    report: &mut Report<'_>,
) -> Vec<String> {
    let Some(value) = value else { return Vec::new() };
    let span = value.span();
    let names = match value.into_inner() {
        NodesToml::One(n) => vec![n],
        NodesToml::Many(ns) => ns,
    };
    if names.is_empty() {
        report.error(span.clone(), format!("training job `{job}`: `{key}` names no node"));
    }
    let mut out = Vec::new();
    for name in &names {
        let name = name.as_str();
        if name != maas_graphs::LOCAL_NODE && !graph.nodes.contains_key(name) {
            let hint = maas_graphs::did_you_mean(name, graph.nodes.keys().map(String::as_str))
                .map(|s| format!("; did you mean `{s}`?"))
                .unwrap_or_else(|| " (declare it with `[nodes.NAME] addr = \"HOST:PORT\"`)".into());
            report.error(span.clone(), format!("training job `{job}`: `{key}` names undeclared node `{name}`{hint}"));
        }
        out.push(name.to_string());
    }
    out
}

/// Settings a run may change from what its job says (`maas train`'s flags, the body of
/// `POST /v1/training/{job}`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Overrides {
    /// Data-parallel workers.
    pub workers: Option<usize>,
    /// Parameter servers.
    pub servers: Option<usize>,
    /// `sync` or `async`.
    pub mode: Option<String>,
    /// Async staleness bound.
    pub staleness: Option<u64>,
    /// `none`, `topk:DENSITY`, `int8`, `sign`.
    pub compression: Option<String>,
    /// Error feedback on or off.
    pub error_feedback: Option<bool>,
    /// Passes over the training rows.
    pub epochs: Option<usize>,
    /// Seed of the init and the batch order.
    pub seed: Option<u64>,
    /// Prune to this sparsity after training (0..1), then fine-tune.
    pub prune: Option<f64>,
    /// Epochs of that fine-tune.
    pub prune_epochs: Option<usize>,
}

impl Overrides {
    /// `job` with these settings; the first bad value says why.
    pub fn apply(&self, mut job: Job) -> Result<Job, String> {
        let positive = |v: usize, key: &str| if v == 0 { Err(format!("`{key}` must be at least 1")) } else { Ok(v) };
        let bounded = |v: usize, key: &str| {
            if v > MAX_WORKERS { Err(format!("`{key}` is at most {MAX_WORKERS}, got {v}")) } else { positive(v, key) }
        };
        if let Some(w) = self.workers {
            job.workers = bounded(w, "workers")?;
        }
        if let Some(k) = self.servers {
            job.servers = bounded(k, "servers")?;
        }
        if let Some(e) = self.epochs {
            job.epochs = positive(e, "epochs")?;
        }
        if let Some(e) = self.prune_epochs {
            job.prune_epochs = positive(e, "prune_epochs")?;
        }
        if let Some(m) = &self.mode {
            job.mode = match m.as_str() {
                "sync" => Mode::Sync,
                "async" => Mode::Async,
                other => return Err(format!("mode `{other}`: expected sync or async")),
            };
        }
        if let Some(s) = self.staleness {
            job.staleness = s;
        }
        if let Some(c) = &self.compression {
            job.compression = c.parse().map_err(|e: crate::compress::ParseCompressionError| e.to_string())?;
        }
        if let Some(f) = self.error_feedback {
            job.error_feedback = f;
        }
        if let Some(s) = self.seed {
            job.seed = s;
        }
        if let Some(p) = self.prune {
            if !(0.0..1.0).contains(&p) {
                return Err(format!("prune is the fraction of weights zeroed, 0 <= prune < 1; got {p}"));
            }
            job.prune = Some(p);
        }
        Ok(job)
    }
}
