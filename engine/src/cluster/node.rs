//! The node side: a process (`maas node`) that hosts submodel instances for serving processes.
//!
//! One `NodeAgent` actor per node, in the process group [`AGENT_GROUP`] so that connected
//! serving processes find it. It starts instances (each an ordinary local submodel: actors,
//! queue, batching, supervision, on this node's streams), runs jobs on them, and stops them; a
//! serving process's instances stop when its connection ends. Files are read from this node's
//! filesystem, confined to its model roots.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use maas_actors::JobError;
use maas_actors::metrics::SubmodelMetrics;
use maas_graphs::{Catalog, KindError, Signature, SignatureError, SourceFile, SubmodelSpec};
use maas_kernels::Registry;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use ractor_cluster::node::NodeServerSessionInformation;
use ractor_cluster::{NodeEventSubscription, NodeServer, NodeServerMessage};

use super::wire;
use crate::EngineOptions;
use crate::engine::{Submodel, start_submodel};

/// The process group every node's agent joins.
pub const AGENT_GROUP: &str = "maas.node.agent";

/// The largest cluster frame a node or serving process accepts by default (a job or an answer
/// is one frame): 64 MiB.
pub const DEFAULT_MAX_FRAME: u64 = 64 << 20;

/// What a node's agent is asked. Every payload is bytes (see [`wire`]).
#[derive(ractor_cluster::RactorClusterMessage)]
pub enum AgentMessage {
    /// Start an instance ([`wire::Start`] as JSON); answers [`wire::Started`] as JSON.
    #[rpc]
    Start(Vec<u8>, RpcReplyPort<Vec<u8>>),
    /// Run one job ([`wire::encode_job`]); answers [`wire::encode_answer`].
    #[rpc]
    Infer(Vec<u8>, RpcReplyPort<Vec<u8>>),
    /// Stop an instance ([`wire::Stop`] as JSON).
    Stop(Vec<u8>),
    /// A training request (start a worker or a server, a server's pull or push; see
    /// [`super::train`]); answers `[0][bytes]` or `[1][message]`.
    #[rpc]
    Train(Vec<u8>, RpcReplyPort<Vec<u8>>),
    /// Stop a training actor.
    TrainStop(Vec<u8>),
    /// What this node's instances for a serving process (the payload: its name) did so far,
    /// and the node's frame limit: [`wire::NodeStats`] as JSON. Also the serving process's
    /// health check.
    #[rpc]
    Stats(Vec<u8>, RpcReplyPort<Vec<u8>>),
}

/// How a node runs.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Its name (serving processes' graphs name it in `[nodes.NAME]`).
    pub name: String,
    /// Where it listens.
    pub listen: SocketAddr,
    /// The directories its submodels' files must lie under (canonical prefixes).
    pub model_roots: Vec<PathBuf>,
    /// The shared secret every peer must present.
    pub secret: String,
    /// The largest frame accepted from a peer.
    pub max_frame: u64,
    /// Engine settings for the instances (restart policy, stream spin).
    pub options: EngineOptions,
}

/// A running node.
pub struct Node {
    server: ActorRef<NodeServerMessage>,
    agent: ActorRef<AgentMessage>,
    host: Arc<Host>,
}

impl Node {
    /// Starts the node: its cluster listener and its agent.
    pub async fn start(config: NodeConfig, registry: Registry) -> Result<Node, String> {
        if config.secret.is_empty() {
            return Err("the cluster secret may not be empty".into());
        }
        let roots = crate::change::canonical_roots(&config.model_roots)?;
        let host = Arc::new(Host {
            registry,
            roots,
            options: config.options.clone(),
            held: Arc::default(),
            instances: Mutex::default(),
            max_frame: config.max_frame,
            gone: Mutex::default(),
            trainings: super::train::Trainings::default(),
        });
        let server = NodeServer::new(
            config.listen.port(),
            config.secret.clone(),
            config.name.clone(),
            config.listen.ip().to_string(),
            None,
            Some(ractor_cluster::node::NodeConnectionMode::Isolated),
        )
        .with_listen_addr(config.listen.ip())
        .with_max_inbound_frame_size(config.max_frame);
        let (server, _) = Actor::spawn(None, server, ()).await.map_err(|e| format!("cluster listener: {e}"))?;
        server
            .cast(NodeServerMessage::SubscribeToEvents {
                id: "maas-node".into(),
                subscription: Box::new(Watch { host: host.clone(), authenticated: Mutex::default() }),
            })
            .map_err(|e| e.to_string())?;
        let (agent, _) = Actor::spawn(None, NodeAgent, host.clone()).await.map_err(|e| format!("node agent: {e}"))?;
        ractor::pg::join(AGENT_GROUP.to_string(), vec![agent.get_cell()]);
        Ok(Node { server, agent, host })
    }

    /// Instances running now.
    pub fn instances(&self) -> usize {
        self.host.instances.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Training actors (workers, parameter servers) running now.
    pub fn training_actors(&self) -> usize {
        self.host.trainings.len()
    }

    /// Stops the agent, every instance and the listener.
    pub async fn stop(self) {
        let instances: Vec<_> = self.host.instances.lock().unwrap_or_else(|p| p.into_inner()).drain().collect();
        drop(instances);
        self.host.trainings.stop_all();
        let _ = self.agent.stop_and_wait(None, Some(Duration::from_secs(5))).await;
        let _ = self.server.stop_and_wait(None, Some(Duration::from_secs(5))).await;
    }
}

/// What the agent shares with the event watcher.
struct Host {
    registry: Registry,
    roots: Vec<PathBuf>,
    options: EngineOptions,
    held: Arc<std::sync::atomic::AtomicUsize>,
    /// Instances by (owner, id).
    instances: Mutex<HashMap<(String, u64), Arc<Submodel>>>,
    /// The largest frame a peer may send this node (and so the largest answer it sends).
    max_frame: u64,
    /// What must not start any more: owners whose session ended (until they come back), and
    /// instances stopped while they were loading.
    gone: Mutex<Gone>,
    /// Training jobs' workers and servers placed here.
    trainings: super::train::Trainings,
}

#[derive(Default)]
struct Gone {
    owners: std::collections::HashSet<String>,
    instances: std::collections::HashSet<(String, u64)>,
}

impl Host {
    fn instance(&self, owner: &str, id: u64) -> Option<Arc<Submodel>> {
        self.instances.lock().unwrap_or_else(|p| p.into_inner()).get(&(owner.to_string(), id)).cloned()
    }

    async fn start(&self, start: wire::Start) -> Result<(), String> {
        // A start comes over a live session: its owner is back if it was gone.
        self.gone.lock().unwrap_or_else(|p| p.into_inner()).owners.remove(&start.owner);
        if self.instance(&start.owner, start.instance).is_some() {
            return Ok(());
        }
        let catalog = Rooted { registry: &self.registry, roots: &self.roots };
        let source = SourceFile::new(format!("{}#{}", start.owner, start.submodel), start.source, ".");
        let checked = maas_graphs::check(vec![source], &catalog).map_err(|d| d.to_string())?;
        let mut spec = checked
            .graph
            .submodels
            .into_values()
            .find(|s| s.name.as_str() == start.submodel)
            .ok_or_else(|| format!("the source defines no submodel `{}`", start.submodel))?;
        spec.node.clear();
        crate::memory::check(&self.registry, [&spec], self.options.max_load_bytes)
            .map_err(|e| crate::EngineError::from(e).to_string())?;
        let metrics = Arc::new(SubmodelMetrics::default());
        let sub = start_submodel(Arc::new(spec), &self.registry, &self.options, metrics, &self.held, None)
            .await
            .map_err(|e| e.to_string())?;
        {
            // Stopped, or its owner gone, while it loaded: it must not stay.
            let gone = self.gone.lock().unwrap_or_else(|p| p.into_inner());
            let key = (start.owner.clone(), start.instance);
            if gone.owners.contains(&start.owner) || gone.instances.contains(&key) {
                return Err("stopped while it was starting".into());
            }
        }
        tracing::info!(owner = %start.owner, instance = start.instance, submodel = %start.submodel, version = %sub.spec.version, "instance started");
        self.instances.lock().unwrap_or_else(|p| p.into_inner()).insert((start.owner, start.instance), Arc::new(sub));
        Ok(())
    }
}

/// The registry, refusing any submodel whose files lie outside the node's model roots (before
/// its kind reads them).
pub(super) struct Rooted<'a> {
    pub(super) registry: &'a Registry,
    pub(super) roots: &'a [PathBuf],
}

impl Catalog for Rooted<'_> {
    fn kinds(&self) -> Vec<String> {
        self.registry.kinds()
    }

    fn signature(&self, submodel: &SubmodelSpec) -> Result<Signature, SignatureError> {
        for file in submodel.files() {
            if !under_roots(&file, self.roots) {
                let roots = self.roots.iter().map(|r| r.display().to_string()).collect::<Vec<_>>().join(", ");
                return Err(SignatureError::Invalid(vec![KindError::whole(format!(
                    "`{}` is outside this node's model roots ({roots})",
                    file.display()
                ))]));
            }
        }
        Catalog::signature(self.registry, submodel)
    }
}

pub(super) fn under_roots(file: &Path, roots: &[PathBuf]) -> bool {
    std::fs::canonicalize(file).is_ok_and(|c| roots.iter().any(|r| c.starts_with(r)))
}

/// Logs peers that fail to authenticate, and stops a serving process's instances when its
/// connection ends.
struct Watch {
    host: Arc<Host>,
    authenticated: Mutex<std::collections::HashSet<ractor::ActorId>>,
}

impl NodeEventSubscription for Watch {
    fn node_session_opened(&self, _: NodeServerSessionInformation) {}

    fn node_session_authenticated(&self, ses: NodeServerSessionInformation) {
        self.authenticated.lock().unwrap_or_else(|p| p.into_inner()).insert(ses.actor.get_id());
        if let Some(owner) = owner_of(&ses) {
            self.host.gone.lock().unwrap_or_else(|p| p.into_inner()).owners.remove(&owner);
        }
    }

    fn node_session_disconnected(&self, ses: NodeServerSessionInformation) {
        let was = self.authenticated.lock().unwrap_or_else(|p| p.into_inner()).remove(&ses.actor.get_id());
        if !was {
            tracing::warn!(peer = %ses.peer_addr, "refused a peer that did not authenticate (wrong MAAS_CLUSTER_SECRET, or not a maas peer)");
            return;
        }
        let Some(owner) = owner_of(&ses) else { return };
        {
            let mut gone = self.host.gone.lock().unwrap_or_else(|p| p.into_inner());
            gone.instances.retain(|(o, _)| *o != owner);
            gone.owners.insert(owner.clone());
        }
        let gone: Vec<_> = {
            let mut map = self.host.instances.lock().unwrap_or_else(|p| p.into_inner());
            let keys: Vec<_> = map.keys().filter(|(o, _)| *o == owner).cloned().collect();
            keys.into_iter().filter_map(|k| map.remove(&k)).collect()
        };
        self.host.trainings.stop_owner(&owner);
        tracing::info!(peer = %ses.peer_addr, owner = %owner, instances = gone.len(), "a serving process disconnected; its instances stop");
        for sub in &gone {
            log_stopped(&owner, 0, sub);
        }
    }
}

/// What an instance did, logged when it stops.
fn log_stopped(owner: &str, instance: u64, sub: &Submodel) {
    let m = crate::metrics::SubmodelSnapshot::of(&sub.metrics);
    tracing::info!(
        owner, instance, submodel = %sub.spec.name, version = %sub.spec.version,
        jobs = m.jobs_ok, failed = m.jobs_failed, batches = m.batch_rows.count,
        mean_batch_rows = m.batch_rows.mean(), mean_batch_ms = m.compute_seconds.mean() * 1e3,
        batches_waited = m.batches_waited, mean_wait_ms = m.wait_seconds.mean() * 1e3,
        "instance stopped"
    );
}

/// The serving process a session belongs to: peers are named `NAME@HOST`, instances are keyed
/// by NAME.
fn owner_of(ses: &NodeServerSessionInformation) -> Option<String> {
    let name = &ses.peer_name.as_ref()?.name;
    Some(name.split_once('@').map_or(name.as_str(), |(o, _)| o).to_string())
}

/// The node's agent actor.
struct NodeAgent;

impl Actor for NodeAgent {
    type Msg = AgentMessage;
    type State = Arc<Host>;
    type Arguments = Arc<Host>;

    async fn pre_start(&self, _: ActorRef<Self::Msg>, host: Arc<Host>) -> Result<Arc<Host>, ActorProcessingErr> {
        Ok(host)
    }

    async fn handle(
        &self,
        _: ActorRef<Self::Msg>,
        msg: AgentMessage,
        host: &mut Arc<Host>,
    ) -> Result<(), ActorProcessingErr> {
        // Nothing slow runs on the agent itself: loads and jobs run on tasks of their own, so
        // one instance's load never holds up another's jobs.
        match msg {
            AgentMessage::Start(bytes, reply) => {
                let host = host.clone();
                tokio::spawn(async move {
                    let result = match serde_json::from_slice::<wire::Start>(&bytes) {
                        Ok(start) => host.start(start).await,
                        Err(e) => Err(format!("a start message that does not decode: {e}")),
                    };
                    if let Err(e) = &result {
                        tracing::warn!(error = %e, "an instance failed to start");
                    }
                    let answer = wire::Started { error: result.err(), max_frame: Some(host.max_frame) };
                    let _ = reply.send(serde_json::to_vec(&answer).unwrap_or_default());
                });
            }
            AgentMessage::Infer(bytes, reply) => {
                let host = host.clone();
                tokio::spawn(async move {
                    let answer = run_job(&host, &bytes).await;
                    let mut out = wire::encode_answer(&answer);
                    // An answer over the frame limit would close the session (every job on it).
                    if out.len() as u64 + super::FRAME_OVERHEAD > host.max_frame {
                        let why = format!(
                            "its outputs take {} bytes, more than a frame from node may hold ({} bytes)",
                            out.len(),
                            host.max_frame
                        );
                        out = wire::encode_answer(&Err(JobError::Failed(why)));
                    }
                    let _ = reply.send(out);
                });
            }
            AgentMessage::Train(bytes, reply) => {
                let host = host.clone();
                tokio::spawn(async move {
                    let answer = host.trainings.call(&host.registry, &host.roots, host.max_frame, &bytes).await;
                    let _ = reply.send(answer);
                });
            }
            AgentMessage::TrainStop(bytes) => host.trainings.stop(&bytes),
            AgentMessage::Stats(owner, reply) => {
                let owner = String::from_utf8_lossy(&owner);
                let instances: Vec<wire::InstanceStats> = host
                    .instances
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .iter()
                    .filter(|((o, _), _)| *o == owner)
                    .map(|((_, instance), sub)| {
                        let m = crate::metrics::SubmodelSnapshot::of(&sub.metrics);
                        wire::InstanceStats {
                            instance: *instance,
                            submodel: sub.spec.name.to_string(),
                            version: sub.spec.version.clone(),
                            jobs_ok: m.jobs_ok,
                            jobs_failed: m.jobs_failed,
                            queued: m.queued,
                            batch_rows: wire::Hist::of(&m.batch_rows),
                            compute_seconds: wire::Hist::of(&m.compute_seconds),
                        }
                    })
                    .collect();
                let stats = wire::NodeStats { max_frame: host.max_frame, instances };
                let _ = reply.send(serde_json::to_vec(&stats).unwrap_or_default());
            }
            AgentMessage::Stop(bytes) => {
                if let Ok(stop) = serde_json::from_slice::<wire::Stop>(&bytes) {
                    host.gone
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .instances
                        .insert((stop.owner.clone(), stop.instance));
                    let gone = host
                        .instances
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&(stop.owner.clone(), stop.instance));
                    if let Some(sub) = gone {
                        log_stopped(&stop.owner, stop.instance, &sub);
                    }
                }
            }
        }
        Ok(())
    }
}

/// One job: decoded, run on its instance (batched with the instance's other jobs), answered.
async fn run_job(host: &Host, bytes: &[u8]) -> Result<(maas_kernels::Values, String), JobError> {
    let (h, values) = wire::decode_job(bytes).map_err(JobError::Failed)?;
    let deadline = h.deadline.map(|d| Instant::now() + d);
    let sub = host
        .instance(&h.owner, h.instance)
        .ok_or_else(|| JobError::Unavailable(format!("no instance {} on this node (it restarted?)", h.instance)))?;
    sub.hint_demand(h.upstream as usize, h.users as usize);
    sub.run_here(values, deadline).await
}
