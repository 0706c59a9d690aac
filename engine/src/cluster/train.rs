//! Training across processes: a job's workers and parameter servers placed on nodes
//! (`worker_nodes`, `server_nodes` in `[training.NAME]`).
//!
//! The job's actors keep talking by messages, as in one process; what crosses a process is
//! bytes. In the process that runs the job, each worker or server placed on a node is a local
//! actor linked to the job actor:
//! - a worker placed on a node is its **port** ([`PortMessage`], a cluster actor in a process
//!   group the node looks up): the worker's pulls, pushes and gate requests arrive there as
//!   calls and go to this process's servers and gate; its events (steps, done, failures)
//!   arrive as casts and go to the coordinator;
//! - a server placed on a node is a `RemoteServer` with the server's own message type: pulls
//!   and pushes become RPCs to the node's agent; its events arrive at a port of its own.
//!
//! On the node, the worker or server is the ordinary actor ([`WorkerActor`], [`ServerActor`])
//! under a small supervisor that reports its failure to the port; the worker's servers and gate
//! are local proxy actors that forward to the port. Files (the graph's weights, the data) are
//! read from the node's filesystem, confined to its model roots.
//!
//! Failure: a node lost under a job fails the actor standing for its worker or server (the
//! job stops and writes nothing, as for any failed actor); the node stops a job's actors when
//! the job stops them or when the process that runs the job goes away.
//!
//! Messages: `[json length u32 LE][Op as JSON][payload]`; answers `[0][bytes]` or
//! `[1][message]`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use maas_graphs::{Graph, NodeSpec, SourceFile, SubmodelSpec};
use maas_kernels::Registry;
use maas_train::actors::{
    Event, GateMessage, Placement, ServerActor, ServerArgs, ServerMessage, Shared, Spawning, WorkerActor, WorkerArgs,
    segments,
};
use maas_train::data::Table;
use maas_train::job::Job;
use maas_train::partition::{Layout, ranges};
use maas_train::trainer::{Cancel, TrainError};
use ractor::rpc::CallResult;
use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, ActorStatus, RpcReplyPort, SupervisionEvent};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc::UnboundedSender;

use super::node::{AgentMessage, Rooted, under_roots};
use super::{Cluster, ClusterOptions, Endpoint, NodeLink, START_TIMEOUT, endpoint};

/// How long a node waits for the port of the job that starts an actor on it to be visible.
const PORT_TIMEOUT: Duration = Duration::from_secs(5);

/// What a training actor's node sends to the actor standing for it.
#[derive(ractor_cluster::RactorClusterMessage)]
pub enum PortMessage {
    /// A request that waits for its answer (a pull, a push, the gate).
    #[rpc]
    Call(Vec<u8>, RpcReplyPort<Vec<u8>>),
    /// An event, or a gate notice.
    Cast(Vec<u8>),
}

/// What a node's actor starts from.
#[derive(Debug, Serialize, Deserialize)]
struct Setup {
    /// The job (this phase's settings).
    job: Job,
    /// The graph trained through (`to_toml`, canonical paths, no placements).
    graph: String,
    /// The learning tensors' shapes (the layout).
    shapes: BTreeMap<String, Vec<usize>>,
    /// Steps per epoch (the longest shard's).
    steps_per_epoch: usize,
    /// Whether the payload ends with the pruning mask (one byte per parameter).
    masked: bool,
    /// The largest frame the job's process accepts (what the node sends it must fit).
    owner_max_frame: u64,
}

#[derive(Debug, Serialize, Deserialize)]
enum Role {
    /// A worker: its rows.
    Worker { index: usize, shard: Vec<usize> },
    /// A server: the payload starts with its range's initial values.
    Server { index: usize },
}

#[derive(Debug, Serialize, Deserialize)]
enum Op {
    // To a node's agent.
    Start { owner: String, uid: u64, group: String, role: Role, setup: Box<Setup> },
    Pull { owner: String, uid: u64 },
    Push { owner: String, uid: u64, worker: usize },
    Stop { owner: String, uid: u64 },
    // To a port.
    ServerPull { server: usize },
    ServerPush { server: usize, worker: usize },
    GateRead { worker: usize },
    GateReady { worker: usize },
    GatePulled { worker: usize },
    GateApplied { worker: usize },
    Step { epoch: usize, loss: f32, rows: usize },
    Epoch { epoch: usize, server: usize },
    Done { bytes_sent: u64, bytes_dense: u64 },
    Failed { stopped: bool, cancelled: bool, message: String },
    ActorFailed { actor: String, reason: String },
    Lost { reason: String },
}

fn encode(op: &Op, payload: &[u8]) -> Vec<u8> {
    let json = serde_json::to_vec(op).expect("a training message serializes");
    let mut out = Vec::with_capacity(4 + json.len() + payload.len());
    out.extend_from_slice(&(json.len() as u32).to_le_bytes());
    out.extend_from_slice(&json);
    out.extend_from_slice(payload);
    out
}

fn decode(bytes: &[u8]) -> Result<(Op, &[u8]), String> {
    let n = bytes.get(..4).ok_or("a training message shorter than its header")?;
    let n = u32::from_le_bytes(n.try_into().expect("4 bytes")) as usize;
    let json = bytes.get(4..4 + n).ok_or("a training message whose header is truncated")?;
    let op = serde_json::from_slice(json).map_err(|e| format!("a training message that does not decode: {e}"))?;
    Ok((op, &bytes[4 + n..]))
}

fn ok(bytes: Vec<u8>) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + bytes.len());
    out.push(0);
    out.extend(bytes);
    out
}

fn err(message: &str) -> Vec<u8> {
    let mut out = vec![1];
    out.extend_from_slice(message.as_bytes());
    out
}

fn answer_of(bytes: Vec<u8>) -> Result<Vec<u8>, String> {
    match bytes.split_first() {
        Some((0, rest)) => Ok(rest.to_vec()),
        Some((_, rest)) => Err(String::from_utf8_lossy(rest).into_owned()),
        None => Err("an empty answer".into()),
    }
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn f32s(bytes: &[u8]) -> Result<Vec<f32>, String> {
    if !bytes.len().is_multiple_of(4) {
        return Err(format!("{} bytes are not f32 values", bytes.len()));
    }
    Ok(bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect())
}

/// Whether a message of `len` bytes fits in a cluster frame of `limit` bytes (a larger one
/// would close the whole session, and with it everything on it).
fn fits(what: &str, len: usize, limit: u64) -> Result<(), String> {
    if len as u64 + super::FRAME_OVERHEAD > limit {
        return Err(format!(
            "{what} takes {len} bytes, more than a cluster frame may hold ({limit} bytes; see --max-frame)"
        ));
    }
    Ok(())
}

/// An RPC's answer, or why there is none.
fn called<T>(r: Result<CallResult<T>, impl std::fmt::Display>, what: &str) -> Result<T, String> {
    match r {
        Ok(CallResult::Success(v)) => Ok(v),
        Ok(CallResult::Timeout) => Err(format!("{what}: timed out")),
        Ok(CallResult::SenderError) => Err(format!("{what}: the connection was lost")),
        Err(e) => Err(format!("{what}: {e}")),
    }
}

/// An event of a node's actor, for its port.
fn event_op(e: Event) -> (Op, Vec<u8>) {
    match e {
        Event::Step { epoch, loss, rows } => (Op::Step { epoch, loss, rows }, Vec::new()),
        Event::Epoch { epoch, server, params } => (Op::Epoch { epoch, server }, f32_bytes(&params)),
        Event::Done { bytes_sent, bytes_dense } => (Op::Done { bytes_sent, bytes_dense }, Vec::new()),
        Event::Failed(e) => (
            Op::Failed {
                stopped: matches!(e, TrainError::Stopped),
                cancelled: matches!(e, TrainError::Cancelled),
                message: e.to_string(),
            },
            Vec::new(),
        ),
        Event::ActorFailed { actor, reason } => (Op::ActorFailed { actor, reason }, Vec::new()),
    }
}

// ---------------------------------------------------------------------------------------------
// The process that runs the job

/// Starts a job's workers and servers on the nodes of the graph it trains through.
pub struct ClusterPlacement {
    cluster: Cluster,
    /// The largest frame this process accepts.
    max_frame: u64,
    endpoint: Arc<Endpoint>,
    nodes: BTreeMap<String, NodeSpec>,
    /// The graph as the nodes read it: canonical paths, no placements.
    graph: String,
}

impl ClusterPlacement {
    /// A placement for jobs on `graph` (its `[nodes]`), over this process's cluster endpoint
    /// (started with `options`' secret on first use).
    pub async fn new(graph: &Graph, options: ClusterOptions) -> Result<Arc<Self>, String> {
        let o = options.clone();
        let endpoint = tokio::task::spawn_blocking(move || endpoint(&o)).await.map_err(|e| e.to_string())??;
        let mut plain = Graph { pipelines: graph.pipelines.clone(), ..Graph::default() };
        for (name, spec) in &graph.submodels {
            plain.submodels.insert(name.clone(), SubmodelSpec { node: Vec::new(), ..spec.normalized() });
        }
        Ok(Arc::new(Self {
            max_frame: options.max_frame.unwrap_or(super::DEFAULT_MAX_FRAME),
            cluster: Cluster::new(options),
            endpoint,
            nodes: graph.nodes.clone(),
            graph: maas_graphs::to_toml(&plain),
        }))
    }

    /// The link to `node`.
    fn link(&self, node: &str) -> Result<Arc<NodeLink>, String> {
        let spec = self.nodes.get(node).ok_or_else(|| format!("node `{node}` is not declared in the graph"))?;
        Ok(self.cluster.link(&self.endpoint, spec))
    }

    /// A start message's setup for `shared`'s phase, and the mask's bytes.
    fn setup(&self, shared: &Shared) -> Result<(Box<Setup>, Vec<u8>), String> {
        let mut job = shared.job.clone();
        // The node reads the data from its own filesystem: no path relative to this process.
        job.data.path = std::fs::canonicalize(&job.data.path)
            .map_err(|e| format!("data file `{}`: {e}", job.data.path.display()))?;
        let shapes = shared.layout.tensors().map(|(n, s, _)| (n.to_string(), s.to_vec())).collect();
        let mask = shared.mask.as_ref().map(|m| m.iter().map(|z| u8::from(*z)).collect()).unwrap_or_default();
        let setup = Setup {
            job,
            graph: self.graph.clone(),
            shapes,
            steps_per_epoch: shared.steps_per_epoch,
            masked: shared.mask.is_some(),
            owner_max_frame: self.max_frame,
        };
        Ok((Box::new(setup), mask))
    }

    /// A fresh id and the process group of its port.
    fn uid(&self) -> (u64, String) {
        let uid = self.endpoint.next_instance.fetch_add(1, Relaxed);
        (uid, format!("maas.train.{}.{uid}", self.endpoint.name))
    }
}

/// The link's node's agent once it is up.
async fn agent(link: &NodeLink) -> Result<ActorRef<AgentMessage>, String> {
    link.wait_up(super::READY_TIMEOUT * 2).await.ok_or_else(|| {
        format!(
            "node `{}` ({}) is not up: {}",
            link.name,
            link.addr,
            link.status().last_error.unwrap_or_else(|| "not connected".into())
        )
    })
}

/// Starts an actor on a node; answers when it runs.
async fn start_remote(agent: &ActorRef<AgentMessage>, start: Vec<u8>) -> Result<(), String> {
    let r = agent.call(|port| AgentMessage::Train(start, port), Some(START_TIMEOUT)).await;
    answer_of(called(r, "starting it")?).map(|_| ())
}

/// Fails `port` once `link`'s node is lost (or answers through another agent: it restarted),
/// and stops watching when the port stops.
fn watch_link(link: Arc<NodeLink>, agent: ActorRef<AgentMessage>, port: ActorRef<PortMessage>) {
    tokio::spawn(async move {
        let mut up = link.up.subscribe();
        loop {
            let same = up.borrow_and_update().as_ref().is_some_and(|a| a.get_id() == agent.get_id());
            if !same {
                let reason = format!("node `{}` ({}) was lost", link.name, link.addr);
                let _ = port.cast(PortMessage::Cast(encode(&Op::Lost { reason }, &[])));
                return;
            }
            if matches!(port.get_status(), ActorStatus::Stopping | ActorStatus::Stopped) {
                return;
            }
            let _ = tokio::time::timeout(Duration::from_millis(250), up.changed()).await;
        }
    });
}

impl Placement for ClusterPlacement {
    fn spawn_worker(
        &self,
        node: &str,
        index: usize,
        shard: Vec<usize>,
        servers: Vec<ActorRef<ServerMessage>>,
        gate: Option<ActorRef<GateMessage>>,
        shared: Arc<Shared>,
        supervisor: ActorCell,
    ) -> Spawning<ActorCell> {
        let setup = self.setup(&shared);
        let link = self.link(node);
        let own = self.max_frame;
        let (uid, group) = self.uid();
        let owner = self.endpoint.name.clone();
        let node = node.to_string();
        Box::pin(async move {
            let (setup, mask) = setup?;
            let link = link?;
            let agent = agent(&link).await?;
            // The node's limit is known once it is up.
            let limit = own.min(link.max_frame.load(Relaxed));
            let stop = encode(&Op::Stop { owner: owner.clone(), uid }, &[]);
            let args = PortArgs {
                servers,
                gate,
                events: shared.events.clone(),
                _stop: StopOnDrop(Some((agent.clone(), stop))),
                node: node.clone(),
                parts: shared.parts.clone(),
                limit,
            };
            let (port, _) = Actor::spawn_linked(None, Port, args, supervisor).await.map_err(|e| e.to_string())?;
            ractor::pg::join(group.clone(), vec![port.get_cell()]);
            let start = encode(&Op::Start { owner, uid, group, role: Role::Worker { index, shard }, setup }, &mask);
            if let Err(e) = fits("its start", start.len(), limit) {
                port.stop(None);
                return Err(e);
            }
            if let Err(e) = start_remote(&agent, start).await {
                port.stop(None);
                return Err(e);
            }
            watch_link(link, agent, port.clone());
            Ok(port.get_cell())
        })
    }

    fn spawn_server(
        &self,
        node: &str,
        index: usize,
        params: Vec<f32>,
        shared: Arc<Shared>,
        supervisor: ActorCell,
    ) -> Spawning<ActorRef<ServerMessage>> {
        let setup = self.setup(&shared);
        let link = self.link(node);
        let own = self.max_frame;
        let (uid, group) = self.uid();
        let owner = self.endpoint.name.clone();
        let node = node.to_string();
        Box::pin(async move {
            let (setup, mask) = setup?;
            let link = link?;
            let agent = agent(&link).await?;
            // The node's limit is known once it is up.
            let limit = own.min(link.max_frame.load(Relaxed));
            let mut payload = f32_bytes(&params);
            payload.extend(mask);
            let start = encode(
                &Op::Start { owner: owner.clone(), uid, group: group.clone(), role: Role::Server { index }, setup },
                &payload,
            );
            fits("its start (its range of the parameters)", start.len(), limit)?;
            let args = RemoteServerArgs {
                limit,
                agent,
                link,
                owner,
                uid,
                group,
                start,
                events: shared.events.clone(),
                node,
                parts: shared.parts.clone(),
            };
            let (server, _) = Actor::spawn_linked(None, RemoteServer, args, supervisor).await.map_err(|e| match e {
                // What its start said, not ractor's wrapping of it.
                ractor::SpawnErr::StartupFailed(why) => why.to_string(),
                other => other.to_string(),
            })?;
            Ok(server)
        })
    }
}

/// What a port forwards to, and where it stops its node's actor.
struct PortArgs {
    /// This process's servers (a worker's port).
    servers: Vec<ActorRef<ServerMessage>>,
    /// This process's gate (a worker's port, async).
    gate: Option<ActorRef<GateMessage>>,
    /// To the coordinator.
    events: UnboundedSender<Event>,
    /// Stops the actor on the node when the port ends (a worker's port).
    _stop: StopOnDrop,
    /// The node (for messages).
    node: String,
    /// Each server's range (to check what a node reports).
    parts: Vec<std::ops::Range<usize>>,
    /// The largest frame this process and the node accept.
    limit: u64,
}

/// The actor standing for a worker on a node (and a remote server's event inbox).
struct Port;

impl Actor for Port {
    type Msg = PortMessage;
    type State = PortArgs;
    type Arguments = PortArgs;

    async fn pre_start(&self, _: ActorRef<Self::Msg>, args: PortArgs) -> Result<PortArgs, ActorProcessingErr> {
        Ok(args)
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: PortMessage,
        s: &mut PortArgs,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            PortMessage::Call(bytes, reply) => {
                let (op, payload) = match decode(&bytes) {
                    Ok(d) => d,
                    Err(e) => {
                        let _ = reply.send(err(&e));
                        return Ok(());
                    }
                };
                let payload = payload.to_vec();
                let (servers, gate, limit) = (s.servers.clone(), s.gate.clone(), s.limit);
                // Answers run on tasks: a sync push waits for the step's other pushes.
                tokio::spawn(async move {
                    let server = |i: usize| servers.get(i).cloned().ok_or_else(|| format!("no server {i}"));
                    let gate = || gate.clone().ok_or_else(|| "no gate (the job is sync)".to_string());
                    let answer = match op {
                        Op::ServerPull { server: i } => match server(i) {
                            Ok(s) => called(s.call(ServerMessage::Pull, None).await, "a pull"),
                            Err(e) => Err(e),
                        },
                        Op::ServerPush { server: i, worker } => match server(i) {
                            Ok(s) => called(
                                s.call(|reply| ServerMessage::Push { worker, message: payload, reply }, None).await,
                                "a push",
                            ),
                            Err(e) => Err(e),
                        },
                        Op::GateRead { worker } => match gate() {
                            Ok(g) => {
                                called(g.call(|reply| GateMessage::Read { worker, reply }, None).await, "the gate")
                                    .map(|v| v.to_le_bytes().to_vec())
                            }
                            Err(e) => Err(e),
                        },
                        Op::GateReady { worker } => match gate() {
                            Ok(g) => {
                                called(g.call(|reply| GateMessage::Ready { worker, reply }, None).await, "the gate")
                                    .map(|v| v.map(|v| v.to_le_bytes().to_vec()).unwrap_or_default())
                            }
                            Err(e) => Err(e),
                        },
                        other => Err(format!("not a call: {other:?}")),
                    };
                    let answer = answer.and_then(|a| match fits("an answer to the node", a.len(), limit) {
                        Ok(()) => Ok(a),
                        // The job cannot go on: it stops with why.
                        Err(reason) => {
                            let _ = myself.cast(PortMessage::Cast(encode(&Op::Lost { reason: reason.clone() }, &[])));
                            Err(reason)
                        }
                    });
                    let _ = reply.send(match answer {
                        Ok(bytes) => ok(bytes),
                        Err(e) => err(&e),
                    });
                });
            }
            PortMessage::Cast(bytes) => {
                let (op, payload) = decode(&bytes)?;
                let event = match op {
                    Op::GatePulled { worker } => {
                        if let Some(g) = &s.gate {
                            let _ = g.send_message(GateMessage::Pulled { worker });
                        }
                        None
                    }
                    Op::GateApplied { worker } => {
                        if let Some(g) = &s.gate {
                            let _ = g.send_message(GateMessage::Applied { worker });
                        }
                        None
                    }
                    Op::Step { epoch, loss, rows } => Some(Event::Step { epoch, loss, rows }),
                    Op::Epoch { epoch, server } => {
                        let params = f32s(payload)?;
                        match s.parts.get(server) {
                            Some(range) if range.len() == params.len() => {}
                            _ => {
                                return Err(format!(
                                    "node `{}` reported {} parameters for server {server}, which is not its range",
                                    s.node,
                                    params.len()
                                )
                                .into());
                            }
                        }
                        Some(Event::Epoch { epoch, server, params })
                    }
                    Op::Done { bytes_sent, bytes_dense } => Some(Event::Done { bytes_sent, bytes_dense }),
                    Op::Failed { stopped: true, .. } => Some(Event::Failed(TrainError::Stopped)),
                    Op::Failed { cancelled: true, .. } => Some(Event::Failed(TrainError::Cancelled)),
                    Op::Failed { message, .. } => {
                        Some(Event::Failed(TrainError::Other(format!("on node `{}`: {message}", s.node))))
                    }
                    Op::ActorFailed { actor, reason } => {
                        return Err(format!("on node `{}`, its {actor} failed: {reason}", s.node).into());
                    }
                    Op::Lost { reason } => return Err(reason.into()),
                    other => return Err(format!("not an event: {other:?}").into()),
                };
                if let Some(e) = event {
                    let _ = s.events.send(e);
                }
            }
        }
        Ok(())
    }
}

/// Stops the node's actor however its stand-in ends: stopped, failed or killed (ractor runs no
/// `post_stop` for the last two), or never started.
struct StopOnDrop(Option<(ActorRef<AgentMessage>, Vec<u8>)>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        if let Some((agent, stop)) = self.0.take() {
            let _ = agent.cast(AgentMessage::TrainStop(stop));
        }
    }
}

/// What a remote server's stand-in starts from.
struct RemoteServerArgs {
    agent: ActorRef<AgentMessage>,
    link: Arc<NodeLink>,
    owner: String,
    uid: u64,
    group: String,
    start: Vec<u8>,
    events: UnboundedSender<Event>,
    node: String,
    parts: Vec<std::ops::Range<usize>>,
    limit: u64,
}

struct RemoteServerState {
    /// The largest frame the node and this process accept.
    limit: u64,
    agent: ActorRef<AgentMessage>,
    owner: String,
    uid: u64,
    port: ActorRef<PortMessage>,
    /// Stops the server on the node when this state goes, however the actor ends.
    _stop: StopOnDrop,
    /// Dropped with the state: the RPCs under way end (their callers see the job stopping).
    ended: tokio::sync::watch::Sender<()>,
}

/// The actor standing for a server on a node: its pulls and pushes are RPCs to the node.
struct RemoteServer;

impl Actor for RemoteServer {
    type Msg = ServerMessage;
    type State = RemoteServerState;
    type Arguments = RemoteServerArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        a: RemoteServerArgs,
    ) -> Result<RemoteServerState, ActorProcessingErr> {
        // Stops the server on the node if this fails to start (a start that finishes later is
        // dropped there), and when this ends.
        let stop = StopOnDrop(Some((a.agent.clone(), encode(&Op::Stop { owner: a.owner.clone(), uid: a.uid }, &[]))));
        let args = PortArgs {
            servers: Vec::new(),
            gate: None,
            events: a.events,
            _stop: StopOnDrop(None),
            node: a.node,
            parts: a.parts,
            limit: a.limit,
        };
        let (port, _) = Actor::spawn_linked(None, Port, args, myself.get_cell()).await?;
        ractor::pg::join(a.group, vec![port.get_cell()]);
        if let Err(e) = start_remote(&a.agent, a.start).await {
            port.stop(None);
            return Err(e.into());
        }
        watch_link(a.link, a.agent.clone(), port.clone());
        let (ended, _) = tokio::sync::watch::channel(());
        Ok(RemoteServerState { limit: a.limit, agent: a.agent, owner: a.owner, uid: a.uid, port, _stop: stop, ended })
    }

    async fn handle(
        &self,
        _: ActorRef<Self::Msg>,
        msg: ServerMessage,
        s: &mut RemoteServerState,
    ) -> Result<(), ActorProcessingErr> {
        let (op, payload, reply) = match msg {
            ServerMessage::Pull(reply) => (Op::Pull { owner: s.owner.clone(), uid: s.uid }, Vec::new(), reply),
            ServerMessage::Push { worker, message, reply } => {
                (Op::Push { owner: s.owner.clone(), uid: s.uid, worker }, message, reply)
            }
        };
        let (agent, port) = (s.agent.clone(), s.port.clone());
        let request = encode(&op, &payload);
        if let Err(reason) = fits("a push to the server", request.len(), s.limit) {
            let _ = port.cast(PortMessage::Cast(encode(&Op::Lost { reason }, &[])));
            return Ok(());
        }
        let mut ended = s.ended.subscribe();
        tokio::spawn(async move {
            let r = tokio::select! {
                r = agent.call(|p| AgentMessage::Train(request, p), None) => r,
                // This stand-in is gone: drop the reply (a worker waiting on it sees the job end).
                _ = ended.changed() => return,
            };
            match called(r, "the server's node").and_then(answer_of) {
                Ok(bytes) => {
                    let _ = reply.send(bytes);
                }
                // The server (or its node) is gone: the job stops with why.
                Err(reason) => {
                    let _ = port.cast(PortMessage::Cast(encode(&Op::Lost { reason }, &[])));
                }
            }
        });
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        _: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        _: &mut RemoteServerState,
    ) -> Result<(), ActorProcessingErr> {
        if let SupervisionEvent::ActorFailed(_, reason) = event {
            return Err(reason.to_string().into());
        }
        Ok(())
    }

    async fn post_stop(&self, _: ActorRef<Self::Msg>, s: &mut RemoteServerState) -> Result<(), ActorProcessingErr> {
        let _ = s.port.stop_and_wait(None, Some(Duration::from_secs(5))).await;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// The node

/// A node's training actors, by (owner, id).
#[derive(Default)]
pub(super) struct Trainings {
    entries: Mutex<HashMap<(String, u64), Hosted>>,
    /// Stopped before (or while) they started.
    stopped: Mutex<HashSet<(String, u64)>>,
    /// Owners whose session ended.
    gone: Mutex<HashSet<String>>,
}

struct Hosted {
    /// The largest frame it may send to its job's process (and this node accepts).
    max_frame: u64,
    supervisor: ActorRef<HostMessage>,
    server: Option<ActorRef<ServerMessage>>,
    cancel: Arc<Cancel>,
}

impl Hosted {
    fn stop(self) {
        self.cancel.request();
        self.supervisor.stop(None);
    }
}

impl Trainings {
    /// Handles a training RPC from a job's process.
    pub(super) async fn call(&self, registry: &Registry, roots: &[PathBuf], max_frame: u64, bytes: &[u8]) -> Vec<u8> {
        let (op, payload) = match decode(bytes) {
            Ok(d) => d,
            Err(e) => return err(&e),
        };
        let answer = match op {
            Op::Start { owner, uid, group, role, setup } => self
                .start(registry, roots, max_frame, owner, uid, group, role, *setup, payload)
                .await
                .map(|()| Vec::new()),
            Op::Pull { owner, uid } => match self.server(&owner, uid) {
                Ok((s, limit)) => called(s.call(ServerMessage::Pull, None).await, "a pull")
                    .and_then(|a| fits("the server's answer", a.len(), limit).map(|()| a)),
                Err(e) => Err(e),
            },
            Op::Push { owner, uid, worker } => match self.server(&owner, uid) {
                Ok((s, limit)) => {
                    let message = payload.to_vec();
                    called(s.call(|reply| ServerMessage::Push { worker, message, reply }, None).await, "a push")
                        .and_then(|a| fits("the server's answer", a.len(), limit).map(|()| a))
                }
                Err(e) => Err(e),
            },
            other => Err(format!("not a node request: {other:?}")),
        };
        match answer {
            Ok(bytes) => ok(bytes),
            Err(e) => err(&e),
        }
    }

    fn server(&self, owner: &str, uid: u64) -> Result<(ActorRef<ServerMessage>, u64), String> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries
            .get(&(owner.to_string(), uid))
            .and_then(|h| h.server.clone().map(|s| (s, h.max_frame)))
            .ok_or_else(|| format!("no parameter server {uid} of this job on this node (it stopped?)"))
    }

    /// Stops one job's actor (a [`Op::Stop`]).
    pub(super) fn stop(&self, bytes: &[u8]) {
        let Ok((Op::Stop { owner, uid }, _)) = decode(bytes) else { return };
        let key = (owner, uid);
        let running = {
            let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
            let running = entries.remove(&key);
            if running.is_none() {
                // Not running (yet): a start under way must not stay.
                self.stopped.lock().unwrap_or_else(|p| p.into_inner()).insert(key.clone());
            }
            running
        };
        if let Some(h) = running {
            tracing::info!(owner = %key.0, id = key.1, "training actor stopped");
            h.stop();
        }
    }

    /// Stops every training actor (the node is stopping).
    pub(super) fn stop_all(&self) {
        let all: Vec<Hosted> = self.entries.lock().unwrap_or_else(|p| p.into_inner()).drain().map(|(_, h)| h).collect();
        all.into_iter().for_each(Hosted::stop);
    }

    /// Stops every actor of an owner whose session ended.
    pub(super) fn stop_owner(&self, owner: &str) {
        self.gone.lock().unwrap_or_else(|p| p.into_inner()).insert(owner.to_string());
        self.stopped.lock().unwrap_or_else(|p| p.into_inner()).retain(|(o, _)| o != owner);
        let gone: Vec<Hosted> = {
            let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
            let keys: Vec<_> = entries.keys().filter(|(o, _)| o == owner).cloned().collect();
            keys.into_iter().filter_map(|k| entries.remove(&k)).collect()
        };
        if !gone.is_empty() {
            tracing::info!(owner, actors = gone.len(), "a job's process disconnected; its training actors stop");
        }
        gone.into_iter().for_each(Hosted::stop);
    }

    /// The number of training actors running.
    pub(super) fn len(&self) -> usize {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries
            .values()
            .filter(|h| !matches!(h.supervisor.get_status(), ActorStatus::Stopping | ActorStatus::Stopped))
            .count()
    }

    #[allow(clippy::too_many_arguments)]
    async fn start(
        &self,
        registry: &Registry,
        roots: &[PathBuf],
        max_frame: u64,
        owner: String,
        uid: u64,
        group: String,
        role: Role,
        setup: Setup,
        payload: &[u8],
    ) -> Result<(), String> {
        self.gone.lock().unwrap_or_else(|p| p.into_inner()).remove(&owner);
        let catalog = Rooted { registry, roots };
        let source = SourceFile::new(format!("{owner}#training-{uid}"), setup.graph, ".");
        let checked = maas_graphs::check(vec![source], &catalog).map_err(|d| d.to_string())?;
        // What goes back to the job's process must fit its frames as well as this node's.
        let max_frame = max_frame.min(setup.owner_max_frame);
        let job = setup.job;
        if job.workers > maas_train::job::MAX_WORKERS || job.servers > maas_train::job::MAX_WORKERS || job.servers == 0
        {
            return Err(format!("a job of {} workers and {} servers", job.workers, job.servers));
        }
        if let Role::Worker { index, .. } = &role
            && *index >= job.workers
        {
            return Err(format!("worker {index} of a job of {} workers", job.workers));
        }
        let mut total = 0usize;
        for shape in setup.shapes.values() {
            let n = shape.iter().try_fold(1usize, |a, d| a.checked_mul(*d));
            total =
                n.and_then(|n| total.checked_add(n)).filter(|t| *t <= 1 << 32).ok_or("learning tensors too large")?;
        }
        let layout = Layout::new(&setup.shapes);
        let parts = ranges(layout.len(), job.servers);
        let segments = segments(&layout, &parts);
        let (params, mask) = match &role {
            Role::Server { index } => {
                let range = parts.get(*index).ok_or_else(|| format!("no server {index} of {}", job.servers))?;
                let n = range.len() * 4;
                let params = payload.get(..n).ok_or("a server start without its parameters")?;
                (f32s(params)?, &payload[n..])
            }
            Role::Worker { .. } => (Vec::new(), payload),
        };
        let mask = if setup.masked {
            if mask.len() != layout.len() {
                return Err(format!("a mask of {} entries for {} parameters", mask.len(), layout.len()));
            }
            Some(mask.iter().map(|b| *b != 0).collect())
        } else {
            None
        };
        let table = match &role {
            Role::Worker { .. } => {
                // Read from the canonical path checked, not one a link could redirect meanwhile.
                let path = std::fs::canonicalize(&job.data.path)
                    .map_err(|e| format!("data file `{}`: {e}", job.data.path.display()))?;
                if !under_roots(&path, roots) {
                    return Err(format!("data file `{}` is outside this node's model roots", path.display()));
                }
                let columns = job.data.columns.clone();
                tokio::task::spawn_blocking(move || maas_train::data::load(&path, &columns))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())?
            }
            Role::Server { .. } => Table { inputs: Vec::new(), labels: Vec::new() },
        };
        let port = find_port(&group).await?;
        let (events, mut rx) = tokio::sync::mpsc::unbounded_channel::<Event>();
        let forward = port.clone();
        tokio::spawn(async move {
            while let Some(e) = rx.recv().await {
                let (op, payload) = event_op(e);
                let mut message = encode(&op, &payload);
                if let Err(reason) = fits("an epoch's parameters", message.len(), max_frame) {
                    message = encode(&Op::Lost { reason }, &[]);
                }
                if forward.cast(PortMessage::Cast(message)).is_err() {
                    break;
                }
            }
        });
        let cancel = Arc::new(Cancel::default());
        let shared = Arc::new(Shared {
            steps_per_epoch: setup.steps_per_epoch,
            graph: Arc::new(checked.graph),
            registry: registry.clone(),
            table: Arc::new(table),
            layout,
            parts,
            segments,
            mask,
            cancel: cancel.clone(),
            events,
            job,
        });
        let label = match &role {
            Role::Worker { index, .. } => format!("worker {index}"),
            Role::Server { index } => format!("server {index}"),
        };
        let (supervisor, _) =
            Actor::spawn(None, HostActor, (port.clone(), label.clone())).await.map_err(|e| e.to_string())?;
        let cell = supervisor.get_cell();
        let spawned = async {
            match role {
                Role::Worker { index, shard } => {
                    let mut servers = Vec::new();
                    for i in 0..shared.job.servers {
                        let (p, _) =
                            Actor::spawn_linked(None, ServerProxy, (port.clone(), i, max_frame), cell.clone()).await?;
                        servers.push(p);
                    }
                    let gate = match shared.job.mode {
                        maas_train::job::Mode::Async => {
                            Some(Actor::spawn_linked(None, GateProxy, port.clone(), cell.clone()).await?.0)
                        }
                        maas_train::job::Mode::Sync => None,
                    };
                    let args = WorkerArgs { index, shard, servers, gate, shared };
                    Actor::spawn_linked(None, WorkerActor, args, cell.clone()).await?;
                    Ok::<_, ractor::SpawnErr>(None)
                }
                Role::Server { index } => {
                    let args = ServerArgs { index, params, shared };
                    Ok(Some(Actor::spawn_linked(None, ServerActor, args, cell.clone()).await?.0))
                }
            }
        }
        .await;
        let server = match spawned {
            Ok(s) => s,
            Err(e) => {
                supervisor.stop(None);
                return Err(e.to_string());
            }
        };
        let key = (owner.clone(), uid);
        let hosted = Hosted { max_frame, supervisor, server, cancel };
        {
            // Under the entries lock, which a stop also takes: a stop is either seen here or
            // finds the entry.
            let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
            let gone = self.gone.lock().unwrap_or_else(|p| p.into_inner()).contains(&owner);
            if gone || self.stopped.lock().unwrap_or_else(|p| p.into_inner()).remove(&key) {
                drop(entries);
                hosted.stop();
                return Err("stopped while it was starting".into());
            }
            entries.insert(key, hosted);
        }
        tracing::info!(owner = %owner, id = uid, actor = %label, "training actor started");
        Ok(())
    }
}

/// The port of the job that starts an actor here, once its process group reached this node.
async fn find_port(group: &str) -> Result<ActorRef<PortMessage>, String> {
    let started = Instant::now();
    loop {
        if let Some(cell) = ractor::pg::get_members(&group.to_string()).into_iter().next() {
            return Ok(ActorRef::from(cell));
        }
        if started.elapsed() > PORT_TIMEOUT {
            return Err(format!("the job's port (`{group}`) did not appear within {PORT_TIMEOUT:?}"));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Supervises a node's training actor (and a worker's proxies): a failure goes to the port.
struct HostActor;

/// The host takes no messages.
enum HostMessage {}

// Local only: never sent to another process.
impl ractor::Message for HostMessage {}

impl Actor for HostActor {
    type Msg = HostMessage;
    type State = (ActorRef<PortMessage>, String);
    type Arguments = (ActorRef<PortMessage>, String);

    async fn pre_start(
        &self,
        _: ActorRef<Self::Msg>,
        args: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(args)
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        (port, label): &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        if let SupervisionEvent::ActorFailed(_, reason) = event {
            let op = Op::ActorFailed { actor: label.clone(), reason: reason.to_string() };
            let _ = port.cast(PortMessage::Cast(encode(&op, &[])));
            myself.stop(None);
        }
        Ok(())
    }

    async fn post_stop(&self, myself: ActorRef<Self::Msg>, _: &mut Self::State) -> Result<(), ActorProcessingErr> {
        myself.stop_children(None);
        Ok(())
    }
}

/// A worker's server on the job's process, seen from the node.
struct ServerProxy;

impl Actor for ServerProxy {
    type Msg = ServerMessage;
    type State = (ActorRef<PortMessage>, usize, u64);
    type Arguments = (ActorRef<PortMessage>, usize, u64);

    async fn pre_start(
        &self,
        _: ActorRef<Self::Msg>,
        args: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(args)
    }

    async fn handle(
        &self,
        _: ActorRef<Self::Msg>,
        msg: ServerMessage,
        (port, server, limit): &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let (request, reply) = match msg {
            ServerMessage::Pull(reply) => (encode(&Op::ServerPull { server: *server }, &[]), reply),
            ServerMessage::Push { worker, message, reply } => {
                (encode(&Op::ServerPush { server: *server, worker }, &message), reply)
            }
        };
        if let Err(reason) = fits("a push", request.len(), *limit) {
            port.cast(PortMessage::Cast(encode(&Op::Lost { reason }, &[])))?;
            return Ok(());
        }
        let port = port.clone();
        tokio::spawn(async move {
            // No answer (the job's process is gone, the job stopped): the worker sees its
            // reply port dropped and ends.
            if let Ok(bytes) = called(port.call(|p| PortMessage::Call(request, p), None).await, "").and_then(answer_of)
            {
                let _ = reply.send(bytes);
            }
        });
        Ok(())
    }
}

/// A worker's gate on the job's process, seen from the node.
struct GateProxy;

impl Actor for GateProxy {
    type Msg = GateMessage;
    type State = ActorRef<PortMessage>;
    type Arguments = ActorRef<PortMessage>;

    async fn pre_start(
        &self,
        _: ActorRef<Self::Msg>,
        port: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(port)
    }

    async fn handle(
        &self,
        _: ActorRef<Self::Msg>,
        msg: GateMessage,
        port: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let call = |op: Op| {
            let (port, request) = (port.clone(), encode(&op, &[]));
            async move { called(port.call(|p| PortMessage::Call(request, p), None).await, "").and_then(answer_of) }
        };
        match msg {
            GateMessage::Read { worker, reply } => {
                let answer = call(Op::GateRead { worker });
                tokio::spawn(async move {
                    if let Ok(b) = answer.await
                        && let Ok(b) = <[u8; 8]>::try_from(b.as_slice())
                    {
                        let _ = reply.send(u64::from_le_bytes(b));
                    }
                });
            }
            GateMessage::Ready { worker, reply } => {
                let answer = call(Op::GateReady { worker });
                tokio::spawn(async move {
                    if let Ok(b) = answer.await {
                        let v = <[u8; 8]>::try_from(b.as_slice()).ok().map(u64::from_le_bytes);
                        let _ = reply.send(v);
                    }
                });
            }
            GateMessage::Pulled { worker } => {
                port.cast(PortMessage::Cast(encode(&Op::GatePulled { worker }, &[])))?;
            }
            GateMessage::Applied { worker } => {
                port.cast(PortMessage::Cast(encode(&Op::GateApplied { worker }, &[])))?;
            }
            // Only the job's coordinator asks for the report.
            GateMessage::Report(_) => {}
        }
        Ok(())
    }
}
