//! The embeddable engine: serves a checked graph with supervised submodel actors.

use std::collections::{BTreeMap, VecDeque};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use candle_core::Tensor;
use futures_util::stream::{FuturesUnordered, StreamExt};
use maas_actors::metrics::SubmodelMetrics;
use maas_actors::{
    BatchPolicy, Job, JobError, RestartPolicy, SubmodelActor, SubmodelArgs, SubmodelMessage, SubmodelQueue,
    SubmodelState, SubmodelStatus,
};
use maas_graphs::{Graph, Pipeline, PortType, Signature, Source, SourceFile, SubmodelSpec};
use maas_kernels::{Kind, Loaded, Registry, Value, Values};
use ractor::{Actor, ActorRef};
use tokio::sync::Semaphore;
use tracing::Instrument;

use crate::change::{ChangeCounts, History};
use crate::error::{EngineError, InferError, Result};
use crate::metrics::{MetricsSnapshot, PipelineMetrics, SubmodelSnapshot};
use crate::sequential::check_pipeline_inputs;

/// Counts a request in flight until dropped (also when the request's future is dropped).
struct InFlight(Arc<std::sync::atomic::AtomicUsize>);

impl InFlight {
    fn enter(counter: &Arc<std::sync::atomic::AtomicUsize>) -> Self {
        counter.fetch_add(1, Relaxed);
        Self(counter.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// Settings of an engine.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Requests admitted at once; more are refused with [`InferError::Overloaded`].
    pub max_in_flight: usize,
    /// How failed replicas are restarted.
    pub restart: RestartPolicy,
    /// How long [`Engine::shutdown`] waits for in-flight requests.
    pub drain_timeout: Duration,
    /// Previous versions kept per submodel for [`Engine::rollback`].
    pub keep_versions: usize,
    /// Where changes may read files from: swaps and recompositions that name a file whose
    /// canonical path (symlinks and `..` resolved) lies outside every one of these directories
    /// are refused with [`ChangeError::Forbidden`](crate::ChangeError::Forbidden). `None`: any
    /// file (an embedding service that trusts its callers).
    pub file_roots: Option<Vec<PathBuf>>,
    /// Where every applied change is recorded (atomically); an engine built with a state
    /// directory that holds a record serves the recorded graph and versions instead of the
    /// graph it was given. `None`: changes live as long as the process.
    pub state_dir: Option<PathBuf>,
    /// The most memory one load may take, in bytes: a build, swap, rollback or recomposition
    /// whose new submodels' estimated memory (each kind's `memory_estimate` times its replicas)
    /// exceeds it, or exceeds the memory available at that moment, is refused
    /// ([`EngineError::TooLarge`], [`ChangeError::TooLarge`](crate::ChangeError::TooLarge))
    /// before anything is allocated. Default: half the machine's memory
    /// ([`default_max_load_bytes`](crate::default_max_load_bytes)); `None`: only the available
    /// memory bounds loads.
    pub max_load_bytes: Option<u64>,
    /// How long an idle execution stream polls its queue before it parks (default 50 us): a
    /// job that arrives meanwhile starts without a thread wake-up. Zero parks at once (no CPU
    /// spent waiting).
    pub stream_spin: Duration,
    /// How this process reaches the nodes its graph places submodels on (the shared secret, the
    /// frame limit).
    pub cluster: crate::cluster::ClusterOptions,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            max_in_flight: 4096,
            restart: RestartPolicy::default(),
            drain_timeout: Duration::from_secs(30),
            keep_versions: 5,
            file_roots: None,
            state_dir: None,
            max_load_bytes: crate::memory::default_max_load_bytes(),
            stream_spin: Duration::from_micros(50),
            cluster: crate::cluster::ClusterOptions::default(),
        }
    }
}

/// Builds an [`Engine`]: choose kinds and options, then load graphs.
pub struct EngineBuilder {
    registry: Registry,
    options: EngineOptions,
}

impl EngineBuilder {
    /// Adds a kind of your own (or replaces a built-in one of the same name).
    pub fn register(mut self, kind: impl Kind + 'static) -> Self {
        self.registry.register(kind);
        self
    }

    /// Sets the options.
    pub fn options(mut self, options: EngineOptions) -> Self {
        self.options = options;
        self
    }

    /// The registry the graphs will be checked and loaded with.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Checks graph files, loads every submodel and starts serving.
    pub async fn from_files<P: AsRef<Path>>(self, paths: &[P]) -> Result<Engine> {
        let checked = crate::load_files(paths, &self.registry).map_err(EngineError::Graph)?;
        for w in &checked.warnings {
            tracing::warn!("{w}");
        }
        self.from_graph(checked.graph).await
    }

    /// Checks graph sources (TOML text) and starts serving.
    pub async fn from_sources(self, sources: Vec<SourceFile>) -> Result<Engine> {
        let checked = crate::load_sources(sources, &self.registry).map_err(EngineError::Graph)?;
        self.from_graph(checked.graph).await
    }

    /// Starts serving a graph that was already checked (or, when the options name a state
    /// directory that holds a record, the recorded graph and versions instead).
    pub async fn from_graph(self, graph: Graph) -> Result<Engine> {
        let mut options = self.options;
        let file_roots = match options.file_roots.take() {
            Some(roots) => Some(crate::change::canonical_roots(&roots).map_err(EngineError::Setup)?),
            None => None,
        };
        options.file_roots = file_roots;
        let restored = match &options.state_dir {
            Some(dir) => crate::state::restore(dir, &self.registry).map_err(EngineError::Setup)?,
            None => None,
        };
        let (graph, history, revision) = match restored {
            Some(r) => {
                tracing::info!(state_dir = %r.dir.display(), revision = r.revision, "serving the graph and versions recorded in the state directory");
                (r.graph, r.history, r.revision)
            }
            None => (graph, History::default(), 0),
        };
        crate::memory::check(&self.registry, graph.submodels.values(), options.max_load_bytes)?;
        let held: Arc<std::sync::atomic::AtomicUsize> = Arc::default();
        let cluster = Arc::new(crate::cluster::Cluster::new(options.cluster.clone()));
        let mut submodels: BTreeMap<String, Arc<Submodel>> = BTreeMap::new();
        for (name, spec) in &graph.submodels {
            let metrics = Arc::new(SubmodelMetrics::default());
            let placed = Some((&*cluster, &graph.nodes));
            match start_submodel(Arc::new(spec.clone()), &self.registry, &options, metrics, &held, placed).await {
                Ok(sub) => {
                    submodels.insert(name.to_string(), Arc::new(sub));
                }
                Err(e) => {
                    // Stop what already started: its threads and loaded weights would leak.
                    for s in submodels.values() {
                        s.stop().await;
                    }
                    drop(submodels);
                    cluster.shutdown().await;
                    return Err(e);
                }
            }
        }
        // Every serving label names what it serves now. A restored label whose files changed
        // while the server was down names other content from now on: say so loudly.
        let mut history = history;
        for s in submodels.values() {
            let now = crate::change::Content::new(&s.spec, &s.stamps);
            if let Some(before) = history.labels.get(s.spec.name.as_str()).and_then(|l| l.get(&s.spec.version))
                && *before != now
            {
                tracing::warn!(
                    submodel = %s.spec.name, version = %s.spec.version, before = %before, now = %now,
                    "a version label now names other content (its files changed while the server was down)"
                );
            }
            history.label(&s.spec, &s.stamps);
        }
        let served = Served::compile(graph, submodels, history, None)?;
        Ok(Engine {
            inner: Arc::new(Inner {
                registry: self.registry,
                served: ArcSwap::from_pointee(served),
                admission: Arc::new(Semaphore::new(options.max_in_flight)),
                in_flight: Arc::default(),
                held_jobs: held,
                shutting_down: AtomicBool::new(false),
                options,
                change_lock: tokio::sync::Mutex::new(()),
                change_counts: ChangeCounts::default(),
                revision: AtomicU64::new(revision),
                trainings: Default::default(),
                cluster,
            }),
        })
    }
}

/// How a submodel computes.
enum Exec {
    /// A trivial kind, run on the request's own task.
    Inline(Loaded),
    /// A supervised actor with replicas; jobs go into its queue, which its streams batch.
    Actor(ActorRef<SubmodelMessage>, Arc<SubmodelQueue>),
    /// Replicas on other processes (nodes); each job is one call to the least busy node up,
    /// which batches it with its other jobs.
    Remote(crate::cluster::Remote),
}

/// A running submodel: one version of it. A swap starts a new one beside it; the old one stops
/// when the last request that holds it (through its plan) ends.
pub(crate) struct Submodel {
    pub(crate) spec: Arc<SubmodelSpec>,
    pub(crate) signature: Arc<Signature>,
    exec: Exec,
    /// Shared by every version of the submodel (counters keep counting across swaps).
    pub(crate) metrics: Arc<SubmodelMetrics>,
    status: Arc<SubmodelStatus>,
    /// When this version started serving.
    pub(crate) since: SystemTime,
    /// Its files as they were when it loaded (what a rollback to it must find again).
    pub(crate) stamps: Vec<crate::change::FileStamp>,
}

impl Drop for Submodel {
    fn drop(&mut self) {
        // Nothing can reach this version any more (plans and requests hold it): drain its actor,
        // which then closes its queue (jobs of cancelled requests still queued are counted out
        // of the shared queue gauge) and stops its replicas and their streams.
        if let Exec::Actor(a, _) = &self.exec {
            let _ = a.drain();
        }
    }
}

impl Submodel {
    /// The demand counters of a submodel whose jobs wait in a queue, here or on a node.
    fn demand(&self) -> Option<&maas_actors::Demand> {
        match &self.exec {
            Exec::Actor(_, q) => Some(q.demand()),
            Exec::Remote(r) => Some(&r.demand),
            Exec::Inline(_) => None,
        }
    }

    /// On a node: the serving process's demand for this submodel, as its latest job said.
    pub(crate) fn hint_demand(&self, upstream: usize, users: usize) {
        if let Exec::Actor(_, q) = &self.exec {
            q.demand().hint(upstream, users);
        }
    }

    async fn stop(&self) {
        match &self.exec {
            Exec::Actor(a, _) => {
                let _ = a.stop_and_wait(None, Some(Duration::from_secs(5))).await;
            }
            Exec::Remote(r) => {
                r.stop();
                self.status.set_stopped();
            }
            Exec::Inline(_) => self.status.set_stopped(),
        }
    }

    /// Its state; a remote submodel's is its nodes': ready when every node is up, degraded when
    /// some are, failed when none is.
    pub(crate) fn state(&self) -> SubmodelState {
        match &self.exec {
            Exec::Remote(r) if self.status.state() != SubmodelState::Stopped => match r.up() {
                0 => SubmodelState::Failed,
                n if n == r.sites.len() => SubmodelState::Ready,
                _ => SubmodelState::Degraded,
            },
            _ => self.status.state(),
        }
    }

    /// Replicas serving now.
    pub(crate) fn ready_replicas(&self) -> usize {
        match &self.exec {
            Exec::Remote(r) => r.up() * self.spec.replicas,
            _ => self.status.ready_replicas(),
        }
    }

    /// The last failure, if any.
    pub(crate) fn last_error(&self) -> Option<String> {
        match &self.exec {
            Exec::Remote(r) if r.up() < r.sites.len() => Some(r.why_down()),
            _ => self.status.last_error(),
        }
    }

    /// Where its replicas run: the nodes, with their states (empty: this process).
    pub(crate) fn placement(&self) -> Vec<crate::cluster::NodeStatus> {
        match &self.exec {
            Exec::Remote(r) => r.sites.iter().map(|l| l.status()).collect(),
            _ => Vec::new(),
        }
    }

    /// Runs one job on this process (what a node does with the jobs it is sent): inline, or
    /// through the queue, batched with the other jobs.
    pub(crate) async fn run_here(
        &self,
        values: Values,
        deadline: Option<Instant>,
    ) -> Result<(Values, String), JobError> {
        match &self.exec {
            Exec::Inline(kernel) => {
                let m = &self.metrics;
                let started = Instant::now();
                let result = catch_unwind(AssertUnwindSafe(|| kernel.forward(&values)));
                m.compute_seconds.observe(started.elapsed().as_secs_f64());
                match result {
                    Ok(Ok(out)) => {
                        m.jobs_ok.fetch_add(1, Relaxed);
                        Ok((out, self.spec.version.clone()))
                    }
                    Ok(Err(e)) if e.is_input() => Err(JobError::InvalidInput(e.to_string())),
                    Ok(Err(e)) => {
                        m.jobs_failed.fetch_add(1, Relaxed);
                        Err(JobError::Failed(e.to_string()))
                    }
                    Err(_) => {
                        m.jobs_failed.fetch_add(1, Relaxed);
                        Err(JobError::Failed("kernel panicked".into()))
                    }
                }
            }
            Exec::Actor(_, queue) => {
                let rows = values.values().next().and_then(Value::rows).unwrap_or(0);
                self.metrics.queued.fetch_add(1, Relaxed);
                let (job, rx) = Job::new(values, rows, deadline);
                queue.push(job);
                match rx.await {
                    Ok(Ok(out)) => Ok((out.values, out.version.to_string())),
                    Ok(Err(e)) => Err(e),
                    Err(_) => Err(JobError::Failed("the replica running this job was lost".into())),
                }
            }
            Exec::Remote(r) => r.run(&values, deadline).await,
        }
    }
}

/// Loads a submodel (every replica loaded and warmed up) and starts serving it.
pub(crate) async fn start_submodel(
    spec: Arc<SubmodelSpec>,
    registry: &Registry,
    options: &EngineOptions,
    metrics: Arc<SubmodelMetrics>,
    held: &Arc<std::sync::atomic::AtomicUsize>,
    cluster: Option<(&crate::cluster::Cluster, &BTreeMap<String, maas_graphs::NodeSpec>)>,
) -> Result<Submodel> {
    let name = spec.name.to_string();
    if spec.is_remote() {
        let (cluster, nodes) = cluster.ok_or_else(|| EngineError::Start {
            submodel: name.clone(),
            message: "placed on a node, where no cluster is set up".into(),
        })?;
        let signature = maas_graphs::Catalog::signature(registry, &spec)
            .map_err(|e| EngineError::Start { submodel: name.clone(), message: format!("{e:?}") })?;
        let remote =
            cluster.start(&spec, nodes).await.map_err(|message| EngineError::Start { submodel: name, message })?;
        let status = Arc::new(SubmodelStatus::default());
        let stamps = crate::change::FileStamp::of(&spec);
        return Ok(Submodel {
            spec,
            signature: Arc::new(signature),
            exec: Exec::Remote(remote),
            metrics,
            status,
            since: SystemTime::now(),
            stamps,
        });
    }
    let kind = registry.get(&spec.kind).ok_or_else(|| EngineError::Start {
        submodel: name.clone(),
        message: format!("unknown kind `{}`", spec.kind),
    })?;
    let status = Arc::new(SubmodelStatus::default());
    let since = SystemTime::now();
    let stamps = crate::change::FileStamp::of(&spec);
    if kind.trivial() {
        let reg = registry.clone();
        let s = spec.clone();
        let loaded = tokio::task::spawn_blocking(move || {
            let loaded = reg.load(&s)?;
            if let Err(e) = loaded.warm_up() {
                tracing::warn!(submodel = %s.name, error = %e, "warm-up failed");
            }
            Ok(loaded)
        })
        .await
        .map_err(|e| EngineError::Start { submodel: name.clone(), message: e.to_string() })?
        .map_err(|source| EngineError::Load { submodel: name.clone(), source: Box::new(source) })?;
        status.set_inline();
        let signature = loaded.signature.clone();
        return Ok(Submodel { spec, signature, exec: Exec::Inline(loaded), metrics, status, since, stamps });
    }
    let signature = maas_graphs::Catalog::signature(registry, &spec)
        .map_err(|e| EngineError::Start { submodel: name.clone(), message: format!("{e:?}") })?;
    let policy = BatchPolicy {
        max_size: spec.batch.map_or(usize::MAX, |b| b.max_size.max(1)),
        max_delay: spec.batch.map_or(Duration::ZERO, |b| b.max_delay),
        spin: options.stream_spin,
    };
    let queue = Arc::new(SubmodelQueue::new(policy, metrics.clone(), held.clone()));
    let args = SubmodelArgs {
        spec: spec.clone(),
        registry: registry.clone(),
        queue: queue.clone(),
        metrics: metrics.clone(),
        status: status.clone(),
        policy: options.restart,
    };
    let (actor, _) = Actor::spawn(None, SubmodelActor, args)
        .await
        .map_err(|e| EngineError::Start { submodel: name, message: e.to_string() })?;
    let exec = Exec::Actor(actor, queue);
    Ok(Submodel { spec, signature: Arc::new(signature), exec, metrics, status, since, stamps })
}

/// Where a node input comes from, compiled.
enum Src {
    Input(String),
    Node(usize, String),
}

struct PlanNode {
    name: String,
    submodel: Arc<Submodel>,
    inputs: Vec<(String, Src)>,
    /// Nodes that read this node's outputs.
    consumers: Vec<usize>,
    /// How many distinct nodes this node waits for.
    deps: usize,
}

/// A pipeline compiled against running submodels: immutable; a request keeps the plan it
/// started with.
struct Plan {
    pipeline: Pipeline,
    nodes: Vec<PlanNode>,
    outputs: Vec<(String, usize, String)>,
    /// Shared by every plan of the pipeline (counters keep counting across changes).
    metrics: Arc<PipelineMetrics>,
    /// What a request of this plan tells the submodels' queues about the jobs it will send.
    demand: DemandPlan,
}

/// How a request announces its jobs to the queues of actor-backed submodels (here, or on nodes:
/// each remote job carries the counts to the node's queue), so that a batch waits for rows that
/// are on their way (see `maas_actors::queue`).
struct DemandPlan {
    /// One per distinct queued submodel of the plan: the request is one of its users.
    users: Vec<Arc<Submodel>>,
    /// Per node: how many of its ancestors use the same submodel. A node is on its way to its
    /// submodel once all of those are done (before, it waits on that very submodel).
    gates: Vec<u16>,
    /// Per node: the descendants that use the same submodel as it (their gates).
    same_after: Vec<Vec<usize>>,
}

impl DemandPlan {
    fn of(nodes: &[PlanNode]) -> Self {
        let queue = |i: usize| nodes[i].submodel.demand().map(|_| nodes[i].submodel.clone());
        let mut users: Vec<Arc<Submodel>> = Vec::new();
        for i in 0..nodes.len() {
            if let Some(q) = queue(i)
                && !users.iter().any(|u| Arc::ptr_eq(u, &q))
            {
                users.push(q);
            }
        }
        // Ancestors by walking inputs (nodes are in topological order, so each node's
        // ancestors are known when it is reached).
        let mut ancestors: Vec<Vec<usize>> = Vec::with_capacity(nodes.len());
        for node in nodes {
            let mut set: Vec<usize> = Vec::new();
            for (_, src) in &node.inputs {
                if let Src::Node(j, _) = src {
                    set.push(*j);
                    set.extend(ancestors[*j].iter().copied());
                }
            }
            set.sort_unstable();
            set.dedup();
            ancestors.push(set);
        }
        let mut gates = vec![0u16; nodes.len()];
        let mut same_after = vec![Vec::new(); nodes.len()];
        for i in 0..nodes.len() {
            let Some(q) = queue(i) else { continue };
            for &j in &ancestors[i] {
                if queue(j).is_some_and(|a| Arc::ptr_eq(&a, &q)) {
                    gates[i] = gates[i].saturating_add(1);
                    same_after[j].push(i);
                }
            }
        }
        Self { users, gates, same_after }
    }
}

/// One request's announcements (undone when it ends, however it ends).
struct Announced<'a> {
    plan: &'a Plan,
    /// Nodes announced to their submodel's queue and not yet sent.
    on_way: Vec<bool>,
    gates: Vec<u16>,
}

impl<'a> Announced<'a> {
    fn start(plan: &'a Plan) -> Self {
        for s in &plan.demand.users {
            s.demand().expect("a queued submodel").enter();
        }
        let mut on_way = vec![false; plan.nodes.len()];
        for (i, node) in plan.nodes.iter().enumerate() {
            if let Some(d) = node.submodel.demand()
                && plan.demand.gates[i] == 0
            {
                d.expect();
                on_way[i] = true;
            }
        }
        Self { plan, on_way, gates: plan.demand.gates.clone() }
    }

    /// Node `i`'s job is about to be queued.
    fn sending(&mut self, i: usize) {
        if std::mem::take(&mut self.on_way[i])
            && let Some(d) = self.plan.nodes[i].submodel.demand()
        {
            d.arrived();
        }
    }

    /// Node `j` is done: later nodes on the same submodel may now be on their way.
    fn done(&mut self, j: usize) {
        for &i in &self.plan.demand.same_after[j] {
            self.gates[i] = self.gates[i].saturating_sub(1);
            if self.gates[i] == 0
                && let Some(d) = self.plan.nodes[i].submodel.demand()
            {
                d.expect();
                self.on_way[i] = true;
            }
        }
    }
}

impl Drop for Announced<'_> {
    fn drop(&mut self) {
        for i in 0..self.on_way.len() {
            self.sending(i);
        }
        for s in &self.plan.demand.users {
            s.demand().expect("a queued submodel").leave();
        }
    }
}

/// What an engine serves: the graph, its plans, its submodels and their previous versions,
/// swapped as a whole (a request keeps the `Served` it started with until it ends).
pub(crate) struct Served {
    pub(crate) graph: Graph,
    plans: BTreeMap<String, Arc<Plan>>,
    pub(crate) submodels: BTreeMap<String, Arc<Submodel>>,
    pub(crate) history: History,
}

impl Served {
    /// Compiles plans for `graph` against running `submodels`; pipelines that `previous` also
    /// serves keep their metrics.
    pub(crate) fn compile(
        graph: Graph,
        submodels: BTreeMap<String, Arc<Submodel>>,
        history: History,
        previous: Option<&Served>,
    ) -> Result<Self> {
        let mut plans = BTreeMap::new();
        for (name, p) in &graph.pipelines {
            let index: BTreeMap<&str, usize> = p.nodes.iter().enumerate().map(|(i, n)| (n.name.as_str(), i)).collect();
            let mut nodes: Vec<PlanNode> = Vec::with_capacity(p.nodes.len());
            for n in &p.nodes {
                let submodel = submodels.get(n.submodel.as_str()).cloned().ok_or_else(|| EngineError::Start {
                    submodel: n.submodel.to_string(),
                    message: "not started".into(),
                })?;
                let inputs = n
                    .inputs
                    .iter()
                    .map(|(port, src)| {
                        let s = match src {
                            Source::Input(i) => Src::Input(i.to_string()),
                            Source::Node { node, port } => Src::Node(index[node.as_str()], port.to_string()),
                        };
                        (port.to_string(), s)
                    })
                    .collect();
                nodes.push(PlanNode { name: n.name.to_string(), submodel, inputs, consumers: Vec::new(), deps: 0 });
            }
            for i in 0..nodes.len() {
                let mut producers: Vec<usize> = nodes[i]
                    .inputs
                    .iter()
                    .filter_map(|(_, s)| if let Src::Node(j, _) = s { Some(*j) } else { None })
                    .collect();
                producers.sort_unstable();
                producers.dedup();
                nodes[i].deps = producers.len();
                for j in producers {
                    nodes[j].consumers.push(i);
                }
            }
            let outputs =
                p.outputs.iter().map(|o| (o.name.to_string(), index[o.node.as_str()], o.port.to_string())).collect();
            let metrics =
                previous.and_then(|s| s.plans.get(name.as_str())).map(|p| p.metrics.clone()).unwrap_or_default();
            let demand = DemandPlan::of(&nodes);
            plans.insert(name.to_string(), Arc::new(Plan { pipeline: p.clone(), nodes, outputs, metrics, demand }));
        }
        Ok(Self { graph, plans, submodels, history })
    }
}

pub(crate) struct Inner {
    pub(crate) registry: Registry,
    pub(crate) served: ArcSwap<Served>,
    admission: Arc<Semaphore>,
    /// Requests admitted and not yet ended (the semaphore cannot say during a shutdown).
    in_flight: Arc<std::sync::atomic::AtomicUsize>,
    /// Jobs held back for fuller batches in every queue of this engine (shared by the queues).
    pub(crate) held_jobs: Arc<std::sync::atomic::AtomicUsize>,
    pub(crate) shutting_down: AtomicBool,
    pub(crate) options: EngineOptions,
    /// Held by every change (swap, rollback, recomposition) from its first check to its switch:
    /// changes are serialised, so no two load the same submodel or build on the same `Served`.
    pub(crate) change_lock: tokio::sync::Mutex<()>,
    pub(crate) change_counts: ChangeCounts,
    /// Changes applied so far (kept in the state directory across restarts).
    pub(crate) revision: AtomicU64,
    /// Training jobs started on this engine, by job name (the latest run of each).
    pub(crate) trainings: crate::training::Trainings,
    /// The nodes submodels are placed on, and this process's endpoint to them.
    pub(crate) cluster: Arc<crate::cluster::Cluster>,
}

/// The engine a service embeds: serves pipelines from a checked graph with supervised,
/// batching submodel actors, and changes what it serves while serving (hot-swap, rollback,
/// recomposition). Cheap to clone (all clones serve the same pipelines).
#[derive(Clone)]
pub struct Engine {
    pub(crate) inner: Arc<Inner>,
}

/// Per-request options.
#[derive(Debug, Clone, Default)]
pub struct InferOptions {
    /// Overrides the pipeline's `deadline_ms`.
    pub deadline: Option<Duration>,
}

/// A request's result: outputs and the version of every submodel that served it.
#[derive(Debug, Clone)]
pub struct Response {
    /// Named outputs, batch first.
    pub outputs: Values,
    /// Submodel -> version that computed this request.
    pub versions: BTreeMap<String, String>,
}

/// A pipeline as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PipelineInfo {
    /// Its name.
    pub name: String,
    /// Inputs with their types.
    pub inputs: Vec<(String, PortType)>,
    /// Outputs with their types.
    pub outputs: Vec<(String, PortType)>,
    /// The submodels it uses.
    pub submodels: Vec<String>,
}

/// A submodel as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubmodelInfo {
    /// Its name.
    pub name: String,
    /// Its kind.
    pub kind: String,
    /// The version serving now.
    pub version: String,
    /// Its device.
    pub device: String,
    /// Replicas configured.
    pub replicas: usize,
    /// Replicas serving now.
    pub ready_replicas: usize,
    /// `starting`, `ready`, `degraded`, `failed`, `stopped`.
    pub state: String,
    /// Runs inline on the request's task (trivial kinds).
    pub inline: bool,
    /// The last failure, if any.
    pub last_error: Option<String>,
    /// The nodes its replicas run on, with their states (empty: this process).
    pub nodes: Vec<crate::cluster::NodeStatus>,
}

impl Engine {
    /// A builder with the built-in kinds and default options.
    pub fn builder() -> EngineBuilder {
        EngineBuilder { registry: Registry::builtin(), options: EngineOptions::default() }
    }

    /// Checks graph files and serves them with the built-in kinds and default options.
    pub async fn from_files<P: AsRef<Path>>(paths: &[P]) -> Result<Self> {
        Self::builder().from_files(paths).await
    }

    /// The registry of kinds this engine uses.
    pub fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    /// The graph served now.
    pub fn graph(&self) -> Graph {
        self.inner.served.load().graph.clone()
    }

    /// Runs a pipeline with its default deadline.
    pub async fn infer(&self, pipeline: &str, inputs: Values) -> Result<Response, InferError> {
        self.infer_with(pipeline, inputs, InferOptions::default()).await
    }

    /// Runs a pipeline. Dropping the returned future cancels the rest of the request's work.
    pub async fn infer_with(
        &self,
        pipeline: &str,
        inputs: Values,
        options: InferOptions,
    ) -> Result<Response, InferError> {
        let started = Instant::now();
        let served = self.inner.served.load_full();
        let plan = served.plans.get(pipeline).cloned().ok_or_else(|| InferError::UnknownPipeline(pipeline.into()))?;
        let span = tracing::debug_span!("request", pipeline);
        let result = async {
            if self.inner.shutting_down.load(Relaxed) {
                return Err(InferError::ShuttingDown);
            }
            let _permit = self.inner.admission.clone().try_acquire_owned().map_err(|_| {
                InferError::Overloaded(format!("{} requests in flight", self.inner.options.max_in_flight))
            })?;
            let _counted = InFlight::enter(&self.inner.in_flight);
            check_pipeline_inputs(&plan.pipeline, &inputs)?;
            let limit = options.deadline.or(plan.pipeline.deadline);
            let deadline = limit.and_then(|d| started.checked_add(d));
            match (limit, deadline) {
                (Some(limit), Some(at)) => {
                    match tokio::time::timeout_at(at.into(), run_plan(&plan, inputs, deadline)).await {
                        // A job that expired on its way reports the request's limit too.
                        Ok(Err(InferError::DeadlineExceeded(_))) | Err(_) => Err(InferError::DeadlineExceeded(limit)),
                        Ok(result) => result,
                    }
                }
                _ => run_plan(&plan, inputs, None).await,
            }
        }
        .instrument(span)
        .await;
        plan.metrics.record(started.elapsed().as_secs_f64(), result.as_ref().map(|_| ()));
        result
    }

    /// The pipelines served, with their types.
    pub fn pipelines(&self) -> Vec<PipelineInfo> {
        self.inner.served.load().plans.values().map(|p| pipeline_info(&p.pipeline)).collect()
    }

    /// One pipeline served, with its types.
    pub fn pipeline(&self, name: &str) -> Option<PipelineInfo> {
        self.inner.served.load().plans.get(name).map(|p| pipeline_info(&p.pipeline))
    }

    /// The submodels served, with their state.
    pub fn submodels(&self) -> Vec<SubmodelInfo> {
        self.inner
            .served
            .load()
            .submodels
            .values()
            .map(|s| SubmodelInfo {
                name: s.spec.name.to_string(),
                kind: s.spec.kind.clone(),
                version: s.spec.version.clone(),
                device: s.spec.device.to_string(),
                replicas: s.spec.replicas,
                ready_replicas: s.ready_replicas(),
                state: s.state().as_str().to_string(),
                inline: matches!(s.exec, Exec::Inline(_)),
                last_error: s.last_error(),
                nodes: s.placement(),
            })
            .collect()
    }

    /// At least one pipeline is served, every submodel serves (none starting or failed), and the
    /// engine is not shutting down.
    pub fn ready(&self) -> bool {
        let served = self.inner.served.load();
        !self.inner.shutting_down.load(Relaxed)
            && !served.plans.is_empty()
            && served.submodels.values().all(|s| s.state().serving())
    }

    /// Every metric now.
    pub fn metrics(&self) -> MetricsSnapshot {
        let served = self.inner.served.load();
        MetricsSnapshot {
            submodels: served.submodels.iter().map(|(n, s)| (n.clone(), SubmodelSnapshot::of(&s.metrics))).collect(),
            pipelines: served.plans.iter().map(|(n, p)| (n.clone(), p.metrics.snapshot())).collect(),
            in_flight: self.inner.in_flight.load(Relaxed) as u64,
            changes: self.inner.change_counts.snapshot(),
            versions: served.submodels.iter().map(|(n, s)| (n.clone(), s.spec.version.clone())).collect(),
        }
    }

    /// Stops taking requests, waits (up to the drain timeout) for those in flight to finish,
    /// then stops every submodel. Returns how many requests were still running at the timeout.
    /// A second call returns 0 at once (the first one does the work).
    pub async fn shutdown(&self) -> usize {
        if self.inner.shutting_down.swap(true, Relaxed) {
            return 0;
        }
        // Training jobs stop (cancelled: nothing of theirs is written or swapped).
        self.inner.trainings.cancel_all();
        // A change in progress either switches before this or is refused: wait for it, so that
        // nothing it started outlives the shutdown.
        drop(self.inner.change_lock.lock().await);
        let all = self.inner.options.max_in_flight as u32;
        let drained =
            tokio::time::timeout(self.inner.options.drain_timeout, self.inner.admission.acquire_many(all)).await;
        let left = match drained {
            Ok(Ok(permits)) => {
                permits.forget();
                0
            }
            _ => self.inner.in_flight.load(Relaxed),
        };
        let served = self.inner.served.load();
        for s in served.submodels.values() {
            s.stop().await;
        }
        self.inner.cluster.shutdown().await;
        left
    }

    /// The nodes this engine's submodels are placed on, with their states.
    pub fn nodes(&self) -> Vec<crate::cluster::NodeStatus> {
        self.inner.cluster.nodes()
    }

    /// What each node last reported of the submodel instances it runs for this engine (asked
    /// every second while it is up): jobs, queue, batch sizes and compute time, measured where
    /// the batching happens.
    pub fn node_metrics(&self) -> Vec<crate::cluster::NodeInstanceMetrics> {
        self.inner.cluster.node_metrics()
    }
}

fn pipeline_info(p: &Pipeline) -> PipelineInfo {
    PipelineInfo {
        name: p.name.to_string(),
        inputs: p.inputs.iter().map(|i| (i.name.to_string(), i.ty.clone())).collect(),
        outputs: p.outputs.iter().map(|o| (o.name.to_string(), o.ty.clone())).collect(),
        submodels: p.submodels().into_iter().map(|s| s.to_string()).collect(),
    }
}

/// Runs a plan's nodes as their inputs become ready; independent branches run concurrently.
async fn run_plan(plan: &Plan, inputs: Values, deadline: Option<Instant>) -> Result<Response, InferError> {
    let n = plan.nodes.len();
    let mut outputs: Vec<Option<Values>> = vec![None; n];
    let mut waiting: Vec<usize> = plan.nodes.iter().map(|p| p.deps).collect();
    let mut versions = BTreeMap::new();
    let mut ready: VecDeque<usize> = (0..n).filter(|&i| waiting[i] == 0).collect();
    let mut running = FuturesUnordered::new();
    let mut done = 0;
    let mut announced = Announced::start(plan);
    while done < n {
        while let Some(i) = ready.pop_front() {
            let node = &plan.nodes[i];
            let mut args = Values::new();
            for (port, src) in &node.inputs {
                let v = match src {
                    Src::Input(name) => inputs[name.as_str()].clone(),
                    Src::Node(j, p) => outputs[*j].as_ref().and_then(|o| o.get(p)).cloned().ok_or_else(|| {
                        InferError::SubmodelFailed {
                            node: plan.nodes[*j].name.clone(),
                            submodel: plan.nodes[*j].submodel.spec.name.to_string(),
                            message: format!("produced no output `{p}`"),
                        }
                    })?,
                };
                args.insert(port.clone(), v);
            }
            match &node.submodel.exec {
                Exec::Inline(kernel) => {
                    let out = run_inline(node, kernel, &args)?;
                    running.push(futures_util::future::Either::Left(std::future::ready((i, Ok(out)))));
                }
                exec => {
                    let span = tracing::debug_span!("node", node = %node.name, submodel = %node.submodel.spec.name);
                    let answers = match exec {
                        Exec::Actor(_, queue) => send_jobs(node, queue, args, deadline, || announced.sending(i))?,
                        _ => send_remote(node, args, deadline, || announced.sending(i))?,
                    };
                    let fut = async move { (i, receive_jobs(node, answers, deadline).await) }.instrument(span);
                    running.push(futures_util::future::Either::Right(fut));
                }
            }
        }
        let Some((i, result)) = running.next().await else { break };
        let (values, version) = result?;
        versions.insert(plan.nodes[i].submodel.spec.name.to_string(), version);
        outputs[i] = Some(values);
        done += 1;
        announced.done(i);
        for &c in &plan.nodes[i].consumers {
            waiting[c] -= 1;
            if waiting[c] == 0 {
                ready.push_back(c);
            }
        }
    }
    let mut out = Values::new();
    for (name, node, port) in &plan.outputs {
        let v =
            outputs[*node].as_ref().and_then(|o| o.get(port)).cloned().ok_or_else(|| InferError::SubmodelFailed {
                node: plan.nodes[*node].name.clone(),
                submodel: plan.nodes[*node].submodel.spec.name.to_string(),
                message: format!("produced no output `{port}`"),
            })?;
        out.insert(name.clone(), v);
    }
    Ok(Response { outputs: out, versions })
}

fn failed(node: &PlanNode, message: impl Into<String>) -> InferError {
    InferError::SubmodelFailed {
        node: node.name.clone(),
        submodel: node.submodel.spec.name.to_string(),
        message: message.into(),
    }
}

/// Inputs a node's kernel refused before running. When the node reads something the request
/// sent, the request is at fault (`InvalidInput`); when it reads only other nodes' outputs, the
/// graph is (e.g. a `topk` whose `k` exceeds what a swapped head now gives): a failure.
fn invalid_at(node: &PlanNode, message: impl std::fmt::Display) -> InferError {
    if node.inputs.iter().any(|(_, src)| matches!(src, Src::Input(_))) {
        InferError::InvalidInput(format!("node `{}` (submodel `{}`): {message}", node.name, node.submodel.spec.name))
    } else {
        failed(node, format!("its inputs from other nodes do not fit: {message}"))
    }
}

/// Runs a trivial kernel on the request's task, catching panics.
fn run_inline(node: &PlanNode, kernel: &Loaded, args: &Values) -> Result<(Values, String), InferError> {
    let m = &node.submodel.metrics;
    let started = Instant::now();
    let result = catch_unwind(AssertUnwindSafe(|| kernel.forward(args)));
    m.compute_seconds.observe(started.elapsed().as_secs_f64());
    m.batch_rows.observe(args.values().next().and_then(Value::rows).unwrap_or(0) as f64);
    match result {
        Ok(Ok(out)) => {
            m.jobs_ok.fetch_add(1, Relaxed);
            Ok((out, node.submodel.spec.version.clone()))
        }
        Ok(Err(e)) if e.is_input() => Err(invalid_at(node, e)),
        Ok(Err(e)) => {
            m.jobs_failed.fetch_add(1, Relaxed);
            Err(failed(node, e.to_string()))
        }
        Err(_) => {
            m.jobs_failed.fetch_add(1, Relaxed);
            Err(failed(node, "kernel panicked"))
        }
    }
}

type Answer = tokio::sync::oneshot::Receiver<Result<maas_actors::JobOutput, JobError>>;

/// Admission to a queued submodel, here or on nodes: a node's rows split into chunks of at most
/// `max` rows, and a slot of the submodel's queue bound reserved for every chunk at once (the
/// `queued` gauge; each chunk gives its slot back when it is taken, or answered remotely), or
/// refused at once.
fn admit(node: &PlanNode, args: Values, max: usize) -> Result<Vec<Values>, InferError> {
    let sub = &node.submodel;
    let rows = args.values().next().and_then(Value::rows).unwrap_or(0);
    let chunks = if rows <= max { vec![args] } else { split_rows(&args, rows, max).map_err(|e| failed(node, e))? };
    let n = chunks.len() as u64;
    if n > sub.spec.queue as u64 {
        return Err(InferError::InvalidInput(format!(
            "{rows} rows need {n} batches of at most {max} at submodel `{}`, more than its queue holds ({})",
            sub.spec.name, sub.spec.queue
        )));
    }
    let before = sub.metrics.queued.fetch_add(n, Relaxed);
    if before + n > sub.spec.queue as u64 {
        sub.metrics.queued.fetch_sub(n, Relaxed);
        sub.metrics.jobs_rejected.fetch_add(n, Relaxed);
        return Err(InferError::Overloaded(format!(
            "submodel `{}` has {} jobs waiting (queue = {})",
            sub.spec.name, before, sub.spec.queue
        )));
    }
    Ok(chunks)
}

/// Queues a node's rows at its submodel (split into chunks of at most `max_size` rows), or
/// refuses at once. `sending` runs just before the jobs enter the queue.
fn send_jobs(
    node: &PlanNode,
    queue: &SubmodelQueue,
    args: Values,
    deadline: Option<Instant>,
    sending: impl FnOnce(),
) -> Result<Vec<Answer>, InferError> {
    let sub = &node.submodel;
    if sub.status.state() == SubmodelState::Failed {
        let why = sub.status.last_error().unwrap_or_default();
        return Err(failed(node, format!("submodel is not serving: {why}")));
    }
    let chunks = admit(node, args, queue.policy().max_size)?;
    sending();
    let mut answers = Vec::with_capacity(chunks.len());
    for chunk in chunks {
        let chunk_rows = chunk.values().next().and_then(Value::rows).unwrap_or(0);
        let (job, rx) = Job::new(chunk, chunk_rows, deadline);
        queue.push(job);
        answers.push(rx);
    }
    Ok(answers)
}

/// Sends a node's rows to the nodes hosting its submodel (split into chunks of at most
/// `max_size` rows, each one call), or refuses at once. The queue bound counts the calls under
/// way, so a slow node pushes back as a local queue does.
fn send_remote(
    node: &PlanNode,
    args: Values,
    deadline: Option<Instant>,
    sending: impl FnOnce(),
) -> Result<Vec<Answer>, InferError> {
    let sub = &node.submodel;
    if sub.state() == SubmodelState::Failed {
        let why = sub.last_error().unwrap_or_default();
        return Err(InferError::NodeLost {
            node: node.name.clone(),
            submodel: sub.spec.name.to_string(),
            message: format!("no node serving it is up: {why}"),
        });
    }
    let chunks = admit(node, args, sub.spec.batch.map_or(usize::MAX, |b| b.max_size.max(1)))?;
    sending();
    let mut answers = Vec::with_capacity(chunks.len());
    for chunk in chunks {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let sub = sub.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let Exec::Remote(remote) = &sub.exec else {
                unreachable!("send_remote is only called for remote submodels")
            };
            let result = remote.run(&chunk, deadline).await;
            sub.metrics.queued.fetch_sub(1, Relaxed);
            sub.metrics.compute_seconds.observe(started.elapsed().as_secs_f64());
            match &result {
                Ok(_) => sub.metrics.jobs_ok.fetch_add(1, Relaxed),
                Err(JobError::Failed(_) | JobError::Lost(_) | JobError::Unavailable(_)) => {
                    sub.metrics.jobs_failed.fetch_add(1, Relaxed)
                }
                Err(_) => 0,
            };
            let _ = tx.send(result.map(|(values, version)| maas_actors::JobOutput { values, version: version.into() }));
        });
        answers.push(rx);
    }
    Ok(answers)
}

/// Waits for a node's answers and joins them.
async fn receive_jobs(
    node: &PlanNode,
    answers: Vec<Answer>,
    deadline: Option<Instant>,
) -> Result<(Values, String), InferError> {
    let mut parts = Vec::with_capacity(answers.len());
    let mut version = String::new();
    for rx in answers {
        match rx.await.map_err(|_| ()) {
            Ok(Ok(out)) => {
                version = out.version.to_string();
                parts.push(out.values);
            }
            Ok(Err(JobError::DeadlineExceeded)) => {
                return Err(InferError::DeadlineExceeded(
                    deadline.map_or(Duration::ZERO, |d| d.saturating_duration_since(Instant::now())),
                ));
            }
            Ok(Err(JobError::InvalidInput(e))) => return Err(invalid_at(node, e)),
            Ok(Err(JobError::Lost(message))) => {
                return Err(InferError::NodeLost {
                    node: node.name.clone(),
                    submodel: node.submodel.spec.name.to_string(),
                    message,
                });
            }
            Ok(Err(e)) => return Err(failed(node, e.to_string())),
            Err(()) => return Err(failed(node, "the replica running this request was lost")),
        }
    }
    let values = if parts.len() == 1 {
        parts.pop().expect("one part")
    } else {
        join_rows(&node.submodel.signature, parts).map_err(|e| failed(node, e))?
    };
    Ok((values, version))
}

/// Splits named values into chunks of at most `max` rows.
fn split_rows(args: &Values, rows: usize, max: usize) -> Result<Vec<Values>, String> {
    let mut chunks = Vec::new();
    let mut start = 0;
    while start < rows {
        let len = max.min(rows - start);
        let mut chunk = Values::new();
        for (port, v) in args {
            let part = match v {
                Value::Tensor(t) => Value::Tensor(t.narrow(0, start, len).map_err(|e| e.to_string())?),
                Value::Text(t) => Value::text(t[start..start + len].iter().cloned()),
            };
            chunk.insert(port.clone(), part);
        }
        chunks.push(chunk);
        start += len;
    }
    Ok(chunks)
}

/// Joins chunk outputs back along the batch dimension (ragged outputs padded to the longest
/// chunk, as if the chunks had shared one batch).
fn join_rows(sig: &Signature, parts: Vec<Values>) -> Result<Values, String> {
    let mut out = Values::new();
    for port in parts[0].keys() {
        let vals: Vec<&Value> = parts.iter().filter_map(|p| p.get(port)).collect();
        let joined = match vals[0] {
            Value::Text(_) => Value::text(vals.iter().filter_map(|v| v.as_text()).flatten().cloned()),
            Value::Tensor(_) => {
                let ts: Vec<Tensor> = vals.iter().filter_map(|v| v.as_tensor()).cloned().collect();
                let ragged = sig.output(port).and_then(|p| p.ragged);
                Value::Tensor(maas_actors::batch::cat_padded(ts, ragged).map_err(|e| e.to_string())?)
            }
        };
        out.insert(port.clone(), joined);
    }
    Ok(out)
}
