//! Submodels on other processes and machines, over ractor's distributed layer
//! (`ractor_cluster`).
//!
//! A node (`maas node`, [`Node`]) hosts submodel instances; the serving process keeps one
//! cluster endpoint, and a link per declared node that connects,
//! authenticates (the shared secret), finds the node's agent, (re)starts the instances placed
//! there, and watches the connection. A submodel placed on nodes is a `Remote`: each job goes
//! to the least busy node that is up, as one RPC; the node batches it with its other jobs. A node
//! that goes away is marked down as soon as its connection ends, and jobs go to the others; a
//! job whose node was lost under it is tried once more elsewhere, else ends with
//! `JobError::Lost`. A link keeps reconnecting, so a node that comes back serves again.

pub mod node;
pub mod train;
pub mod wire;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime};

use maas_actors::JobError;
use maas_graphs::{Graph, NodeSpec, SubmodelSpec};
use maas_kernels::Values;
use ractor::rpc::CallResult;
use ractor::{Actor, ActorRef};
use ractor_cluster::node::NodeServerSessionInformation;
use ractor_cluster::{NodeEventSubscription, NodeServer, NodeServerMessage};
use tokio::sync::{broadcast, watch};

pub use node::{AgentMessage, DEFAULT_MAX_FRAME, Node, NodeConfig};
pub use train::{ClusterPlacement, PortMessage};
pub use wire::{Hist, InstanceStats};

/// How long a link waits for a connection to become ready (authenticated, state exchanged).
const READY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a link waits before reconnecting.
const RETRY: Duration = Duration::from_millis(250);
/// How long an instance may take to load on a node.
const START_TIMEOUT: Duration = Duration::from_secs(300);
/// The longest a job without a deadline waits for its node.
const NO_DEADLINE: Duration = Duration::from_secs(600);
/// What a frame holds besides a job's or an answer's bytes (the RPC envelope), at most.
pub(crate) const FRAME_OVERHEAD: u64 = 4096;

/// Cluster settings of a serving process.
#[derive(Debug, Clone, Default)]
pub struct ClusterOptions {
    /// The shared secret (`MAAS_CLUSTER_SECRET`); needed once a graph places a submodel on a node.
    pub secret: Option<String>,
    /// The largest frame accepted from a node (default [`DEFAULT_MAX_FRAME`]).
    pub max_frame: Option<u64>,
}

/// A node as the serving process sees it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct NodeStatus {
    /// Its name.
    pub name: String,
    /// Its address.
    pub addr: String,
    /// `up`, `connecting` or `down`.
    pub state: String,
    /// Why it is not up, if it is not.
    pub last_error: Option<String>,
    /// Instances it should host for this process.
    pub instances: usize,
    /// Jobs it answered for this process.
    pub jobs: u64,
}

#[derive(Clone, Debug)]
enum Event {
    Ready { addr: String, node_id: u64, name: String },
    Down { addr: String, node_id: u64 },
}

/// This process's one cluster endpoint, shared by every engine in it: `ractor_cluster` numbers
/// the sessions of each `NodeServer` from 0 and registers remote actors process-wide by that
/// number, so two endpoints in one process would mix up their nodes' actors (and two sessions
/// to one node are refused as duplicates). It runs on a runtime of its own, so it outlives the
/// runtime of the engine that started it.
struct Endpoint {
    /// This process's name in the cluster (nodes key its instances by it).
    name: String,
    secret: String,
    server: ActorRef<NodeServerMessage>,
    events: broadcast::Sender<Event>,
    handle: tokio::runtime::Handle,
    /// Links by node name and address, shared by the engines of the process and kept for its
    /// life: a link's session to its node stays open between engines (a second session from
    /// the same process would be refused as a duplicate).
    links: Mutex<BTreeMap<(String, String), Arc<NodeLink>>>,
    next_instance: AtomicU64,
}

static ENDPOINT: Mutex<Option<Arc<Endpoint>>> = Mutex::new(None);

/// The process's endpoint, started on first use with `options`' secret.
fn endpoint(options: &ClusterOptions) -> Result<Arc<Endpoint>, String> {
    let secret = options.secret.clone().filter(|s| !s.is_empty()).ok_or(
        "the graph places submodels on nodes: set the cluster secret (MAAS_CLUSTER_SECRET) to the one the nodes use",
    )?;
    let mut slot = ENDPOINT.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(e) = slot.as_ref() {
        if e.secret != secret {
            return Err("this process's cluster endpoint already runs with another cluster secret".into());
        }
        return Ok(e.clone());
    }
    let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let name = format!("maas-serve-{}-{:x}", std::process::id(), nanos & 0xffff_ffff);
    let max_frame = options.max_frame.unwrap_or(DEFAULT_MAX_FRAME);
    let (tx, rx) = std::sync::mpsc::channel();
    let (n, s) = (name.clone(), secret.clone());
    std::thread::Builder::new()
        .name("maas-cluster".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("maas-cluster")
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = tx.send(Err(format!("cluster runtime: {e}")));
                    return;
                }
            };
            rt.block_on(async move {
                // Nobody connects to a serving process: it listens on an ephemeral loopback port.
                let server = NodeServer::new(
                    0,
                    s,
                    n,
                    "127.0.0.1".into(),
                    None,
                    Some(ractor_cluster::node::NodeConnectionMode::Isolated),
                )
                .with_listen_addr(std::net::Ipv4Addr::LOCALHOST.into())
                .with_max_inbound_frame_size(max_frame);
                let started = async {
                    let (server, _) =
                        Actor::spawn(None, server, ()).await.map_err(|e| format!("cluster endpoint: {e}"))?;
                    let (events, _) = broadcast::channel(1024);
                    server
                        .cast(NodeServerMessage::SubscribeToEvents {
                            id: "maas-serve".into(),
                            subscription: Box::new(Forward(events.clone())),
                        })
                        .map_err(|e| e.to_string())?;
                    Ok::<_, String>((server, events, tokio::runtime::Handle::current()))
                }
                .await;
                let _ = tx.send(started);
                // The endpoint lives as long as the process.
                std::future::pending::<()>().await;
            });
        })
        .map_err(|e| format!("cluster thread: {e}"))?;
    let (server, events, handle) = rx.recv().map_err(|_| "the cluster endpoint did not start".to_string())??;
    let e = Arc::new(Endpoint {
        name,
        secret,
        server,
        events,
        handle,
        links: Mutex::default(),
        next_instance: AtomicU64::new(1),
    });
    *slot = Some(e.clone());
    Ok(e)
}

/// An engine's side of the cluster: the links to the nodes its submodels are placed on.
pub(crate) struct Cluster {
    options: ClusterOptions,
    links: Mutex<BTreeMap<String, Arc<NodeLink>>>,
}

impl Cluster {
    pub(crate) fn new(options: ClusterOptions) -> Self {
        Self { options, links: Mutex::default() }
    }

    /// Its settings.
    pub(crate) fn options(&self) -> &ClusterOptions {
        &self.options
    }

    /// The link to a node, started on first use in this process (and a new one when its address
    /// changed).
    fn link(&self, endpoint: &Endpoint, node: &NodeSpec) -> Arc<NodeLink> {
        let mut shared = endpoint.links.lock().unwrap_or_else(|p| p.into_inner());
        let key = (node.name.clone(), node.addr.clone());
        let link = match shared.get(&key) {
            Some(l) => l.clone(),
            None => {
                let link = Arc::new(NodeLink::new(node));
                endpoint.handle.spawn(run_link(
                    Arc::downgrade(&link),
                    endpoint.server.clone(),
                    endpoint.events.clone(),
                    endpoint.name.clone(),
                ));
                shared.insert(key, link.clone());
                link
            }
        };
        self.links.lock().unwrap_or_else(|p| p.into_inner()).insert(node.name.clone(), link.clone());
        link
    }

    /// Starts a submodel's instance on every node it is placed on: a `Remote` once at least
    /// one of them serves it (the others start it when they come up).
    pub(crate) async fn start(
        &self,
        spec: &SubmodelSpec,
        graph_nodes: &BTreeMap<String, NodeSpec>,
    ) -> Result<Remote, String> {
        let options = self.options.clone();
        let endpoint = tokio::task::spawn_blocking(move || endpoint(&options)).await.map_err(|e| e.to_string())??;
        let instance = endpoint.next_instance.fetch_add(1, Relaxed);
        let mut one = Graph::default();
        // Paths canonical: the node resolves nothing against its own working directory.
        one.submodels.insert(spec.name.clone(), SubmodelSpec { node: Vec::new(), ..spec.normalized() });
        let start = wire::Start {
            owner: endpoint.name.clone(),
            instance,
            source: maas_graphs::to_toml(&one),
            submodel: spec.name.to_string(),
        };
        let payload = Arc::new(serde_json::to_vec(&start).map_err(|e| e.to_string())?);
        let mut sites = Vec::new();
        for name in spec.remote_nodes() {
            let node = graph_nodes.get(name).ok_or_else(|| format!("node `{name}` is not declared"))?;
            sites.push(self.link(&endpoint, node));
        }
        let remote = Remote {
            max_frame: self.options.max_frame.unwrap_or(DEFAULT_MAX_FRAME),
            demand: maas_actors::Demand::default(),
            owner: endpoint.name.clone(),
            instance,
            sites,
            next: AtomicUsize::new(0),
        };
        let mut errors = Vec::new();
        for link in &remote.sites {
            link.instances.lock().unwrap_or_else(|p| p.into_inner()).insert(instance, payload.clone());
            match link.wait_up(READY_TIMEOUT * 2).await {
                Some(agent) => match link.start(&agent, instance, &payload).await {
                    Ok(()) => {}
                    Err(e) => errors.push(format!("node `{}` ({}): {e}", link.name, link.addr)),
                },
                None => errors.push(format!(
                    "node `{}` ({}): {}",
                    link.name,
                    link.addr,
                    link.status().last_error.unwrap_or_default()
                )),
            }
        }
        if errors.len() == remote.sites.len() {
            // Nothing serves it: forget the instance everywhere (dropping `remote` does).
            return Err(errors.join("; "));
        }
        for e in &errors {
            tracing::warn!(submodel = %spec.name, error = %e, "a node did not start its replica; it will when it comes back");
        }
        Ok(remote)
    }

    /// What the nodes last reported of the instances this process runs there.
    pub(crate) fn node_metrics(&self) -> Vec<NodeInstanceMetrics> {
        let links: Vec<_> = self.links.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
        let mut out = Vec::new();
        for l in links {
            for stats in l.stats.lock().unwrap_or_else(|p| p.into_inner()).iter() {
                out.push(NodeInstanceMetrics { node: l.name.clone(), addr: l.addr.clone(), stats: stats.clone() });
            }
        }
        out
    }

    /// Every node this engine linked, with its state.
    pub(crate) fn nodes(&self) -> Vec<NodeStatus> {
        self.links.lock().unwrap_or_else(|p| p.into_inner()).values().map(|l| l.status()).collect()
    }

    /// Lets go of the links (a link no engine uses stops; the process's endpoint stays).
    pub(crate) async fn shutdown(&self) {
        self.links.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

/// Starts an instance; answers the node's frame limit.
async fn start_on(agent: &ActorRef<AgentMessage>, payload: &[u8]) -> Result<u64, String> {
    let bytes = payload.to_vec();
    match agent.call(|port| AgentMessage::Start(bytes, port), Some(START_TIMEOUT)).await {
        Ok(CallResult::Success(answer)) => {
            let started: wire::Started = serde_json::from_slice(&answer).map_err(|e| e.to_string())?;
            match started.error {
                Some(e) => Err(e),
                None => Ok(started.max_frame.unwrap_or(DEFAULT_MAX_FRAME)),
            }
        }
        Ok(CallResult::Timeout) => Err("timed out starting the instance".into()),
        Ok(CallResult::SenderError) | Err(_) => Err("the connection was lost while starting the instance".into()),
    }
}

/// Forwards the endpoint's session events to the links.
struct Forward(broadcast::Sender<Event>);

impl NodeEventSubscription for Forward {
    fn node_session_opened(&self, _: NodeServerSessionInformation) {}
    fn node_session_authenticated(&self, _: NodeServerSessionInformation) {}
    fn node_session_disconnected(&self, ses: NodeServerSessionInformation) {
        let _ = self.0.send(Event::Down { addr: ses.peer_addr, node_id: ses.node_id });
    }
    fn node_session_ready(&self, ses: NodeServerSessionInformation) {
        // Peers are named `NAME@HOST`.
        let name = ses.peer_name.map(|n| n.name).unwrap_or_default();
        let name = name.split_once('@').map_or(name.as_str(), |(n, _)| n).to_string();
        let _ = self.0.send(Event::Ready { addr: ses.peer_addr, node_id: ses.node_id, name });
    }
}

#[derive(Default)]
struct LinkState {
    agent: Option<ActorRef<AgentMessage>>,
    connecting: bool,
    last_error: Option<String>,
}

/// The serving process's connection to one node.
pub(crate) struct NodeLink {
    pub(crate) name: String,
    pub(crate) addr: String,
    state: Mutex<LinkState>,
    up: watch::Sender<Option<ActorRef<AgentMessage>>>,
    /// Instances this process placed there: started again whenever the node comes back.
    instances: Mutex<BTreeMap<u64, Arc<Vec<u8>>>>,
    /// Jobs sent and not answered.
    busy: AtomicUsize,
    /// Jobs answered.
    jobs: AtomicU64,
    /// Attempts to reach the node that failed.
    failures: AtomicU64,
    /// Instances running there now (started since the node last came up).
    started: Mutex<std::collections::HashSet<u64>>,
    /// The largest frame the node accepts (from its answer to a start).
    max_frame: AtomicU64,
    /// What the node last said of this process's instances there.
    stats: Mutex<Vec<wire::InstanceStats>>,
    /// Instances that did not start there are being started again now.
    retrying: std::sync::atomic::AtomicBool,
    /// Instances whose start is under way (never started twice at once).
    starting: Mutex<std::collections::HashSet<u64>>,
}

impl NodeLink {
    fn new(node: &NodeSpec) -> Self {
        Self {
            name: node.name.clone(),
            addr: node.addr.clone(),
            state: Mutex::new(LinkState { connecting: true, ..Default::default() }),
            up: watch::channel(None).0,
            instances: Mutex::default(),
            busy: AtomicUsize::new(0),
            jobs: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            started: Mutex::default(),
            max_frame: AtomicU64::new(DEFAULT_MAX_FRAME),
            stats: Mutex::default(),
            retrying: std::sync::atomic::AtomicBool::new(false),
            starting: Mutex::default(),
        }
    }

    /// Whether the node is up and runs `instance`.
    fn serves(&self, instance: u64) -> Option<ActorRef<AgentMessage>> {
        let agent = self.agent()?;
        self.started.lock().unwrap_or_else(|p| p.into_inner()).contains(&instance).then_some(agent)
    }

    /// Starts `instance` on the node; remembers whether it runs.
    async fn start(&self, agent: &ActorRef<AgentMessage>, instance: u64, payload: &[u8]) -> Result<(), String> {
        // One start of an instance at a time: another one under way (a retry) is waited for.
        while !self.starting.lock().unwrap_or_else(|p| p.into_inner()).insert(instance) {
            tokio::time::sleep(Duration::from_millis(20)).await;
            if self.started.lock().unwrap_or_else(|p| p.into_inner()).contains(&instance) {
                return Ok(());
            }
        }
        // Cleared however this ends (also when this future is dropped mid-start).
        struct Starting<'a>(&'a Mutex<std::collections::HashSet<u64>>, u64);
        impl Drop for Starting<'_> {
            fn drop(&mut self) {
                self.0.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.1);
            }
        }
        let starting = Starting(&self.starting, instance);
        let result = start_on(agent, payload).await;
        drop(starting);
        let mut started = self.started.lock().unwrap_or_else(|p| p.into_inner());
        match &result {
            Ok(max_frame) => {
                started.insert(instance);
                self.max_frame.store(*max_frame, Relaxed);
            }
            Err(_) => {
                started.remove(&instance);
            }
        }
        result.map(|_| ())
    }

    pub(crate) fn agent(&self) -> Option<ActorRef<AgentMessage>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).agent.clone()
    }

    fn set(&self, agent: Option<ActorRef<AgentMessage>>, connecting: bool, error: Option<String>) {
        if agent.is_none() {
            // A node that comes back starts its instances afresh.
            self.started.lock().unwrap_or_else(|p| p.into_inner()).clear();
            self.stats.lock().unwrap_or_else(|p| p.into_inner()).clear();
            if error.is_some() {
                self.failures.fetch_add(1, Relaxed);
            }
        }
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.agent = agent.clone();
        s.connecting = connecting;
        if error.is_some() || agent.is_some() {
            s.last_error = error;
        }
        drop(s);
        self.up.send_replace(agent);
    }

    /// The agent once the node is up; `None` after `timeout`, or as soon as an attempt to reach
    /// it fails (a refused secret, a wrong name, nothing listening).
    async fn wait_up(&self, timeout: Duration) -> Option<ActorRef<AgentMessage>> {
        let failures = self.failures.load(Relaxed);
        let until = Instant::now() + timeout;
        let mut rx = self.up.subscribe();
        loop {
            if let Some(a) = rx.borrow_and_update().clone() {
                return Some(a);
            }
            if self.failures.load(Relaxed) > failures || Instant::now() >= until {
                return None;
            }
            let _ = tokio::time::timeout(Duration::from_millis(20), rx.changed()).await;
        }
    }

    pub(crate) fn status(&self) -> NodeStatus {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let state = if s.agent.is_some() {
            "up"
        } else if s.connecting {
            "connecting"
        } else {
            "down"
        };
        NodeStatus {
            name: self.name.clone(),
            addr: self.addr.clone(),
            state: state.into(),
            last_error: if s.agent.is_some() { None } else { s.last_error.clone() },
            instances: self.instances.lock().unwrap_or_else(|p| p.into_inner()).len(),
            jobs: self.jobs.load(Relaxed),
        }
    }
}

/// Connects, finds the agent, (re)starts the instances, watches; again after every loss, for as
/// long as the link is in use.
async fn run_link(
    link: Weak<NodeLink>,
    server: ActorRef<NodeServerMessage>,
    events: broadcast::Sender<Event>,
    owner: String,
) {
    let mut first = true;
    // The session before this one: its end may be reported while the next one is set up.
    let mut previous: Option<u64> = None;
    loop {
        if !first {
            // A link no submodel uses now retries less often.
            let idle = link.upgrade().is_none_or(|l| l.instances.lock().unwrap_or_else(|p| p.into_inner()).is_empty());
            tokio::time::sleep(if idle { RETRY * 8 } else { RETRY }).await;
        }
        first = false;
        let Some(l) = link.upgrade() else { return };
        let mut rx = events.subscribe();
        let addr = match tokio::net::lookup_host(l.addr.as_str()).await.ok().and_then(|mut a| a.next()) {
            Some(a) => a,
            None => {
                l.set(None, false, Some(format!("cannot resolve `{}`", l.addr)));
                continue;
            }
        };
        let peer = addr.to_string();
        if let Err(e) = ractor_cluster::client_connect(&server, addr).await {
            let why = match e {
                ractor_cluster::ClientConnectErr::Socket(io) => io.to_string(),
                other => other.to_string(),
            };
            l.set(None, false, Some(format!("cannot connect: {why}")));
            continue;
        }
        let ready = tokio::time::timeout(READY_TIMEOUT, async {
            loop {
                match rx.recv().await {
                    Ok(Event::Ready { addr, node_id, name }) if addr == peer => return Ok((node_id, name)),
                    Ok(Event::Down { addr, node_id }) if addr == peer && Some(node_id) != previous => {
                        return Err("it closed the connection during authentication (is MAAS_CLUSTER_SECRET the same on both sides?)".to_string());
                    }
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => return Err("the cluster endpoint stopped".to_string()),
                }
            }
        })
        .await;
        let (node_id, name) = match ready {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                tracing::warn!(node = %l.name, addr = %l.addr, error = %e, "node refused");
                l.set(None, false, Some(e));
                // A refusal repeats until someone fixes the secret: retry less often.
                drop(l);
                tokio::time::sleep(RETRY * 8).await;
                continue;
            }
            Err(_) => {
                l.set(None, false, Some("no answer to the cluster handshake in time".into()));
                continue;
            }
        };
        if name != l.name {
            let e = format!("the process at {} is node `{name}`, not `{}`", l.addr, l.name);
            tracing::warn!(error = %e, "wrong node");
            l.set(None, false, Some(e));
            // Leave the session; retry later (the right node may take the address).
            tokio::time::sleep(READY_TIMEOUT).await;
            continue;
        }
        let Some(agent) = find_agent(node_id).await else {
            l.set(None, false, Some(format!("node `{name}` runs no maas agent")));
            continue;
        };
        // Its frame limit, before anything is sent that might exceed it.
        let asked = owner.as_bytes().to_vec();
        if let Ok(CallResult::Success(bytes)) = agent.call(|p| AgentMessage::Stats(asked, p), Some(POLL_TIMEOUT)).await
            && let Ok(stats) = serde_json::from_slice::<wire::NodeStats>(&bytes)
        {
            l.max_frame.store(stats.max_frame, Relaxed);
        }
        // (Re)start every instance placed there before it takes jobs.
        let payloads: Vec<_> =
            l.instances.lock().unwrap_or_else(|p| p.into_inner()).iter().map(|(i, p)| (*i, p.clone())).collect();
        for (instance, p) in payloads {
            if let Err(e) = l.start(&agent, instance, &p).await {
                tracing::warn!(node = %l.name, error = %e, "an instance did not start again on a returning node");
            }
        }
        tracing::info!(node = %l.name, addr = %l.addr, "node up");
        l.set(Some(agent.clone()), false, None);
        let owner_alive = Arc::downgrade(&l);
        drop(l);
        // Watch until the connection ends (or the link is no longer used). The session's end
        // stops the node's actors here too: that is checked as well, in case its event was
        // lost in a lagging channel. A node that stops answering the polls (a half-open
        // connection: its machine gone without a reset) is lost too.
        let (silent_tx, mut silent_rx) = tokio::sync::oneshot::channel::<()>();
        let poll = tokio::spawn(poll_node(owner_alive.clone(), agent.clone(), owner.clone(), silent_tx));
        let (mut silent, mut poll_ended) = (false, false);
        loop {
            tokio::select! {
                r = tokio::time::timeout(Duration::from_secs(1), rx.recv()) => match r {
                    Ok(Ok(Event::Down { node_id: id, .. })) if id == node_id => break,
                    Ok(Err(broadcast::error::RecvError::Closed)) => {
                        poll.abort();
                        return;
                    }
                    _ => {
                        if owner_alive.strong_count() == 0 {
                            poll.abort();
                            return;
                        }
                        if matches!(agent.get_status(), ractor::ActorStatus::Stopped | ractor::ActorStatus::Stopping) {
                            break;
                        }
                    }
                },
                r = &mut silent_rx, if !poll_ended => {
                    // Polled once only: the poll ends with `silent`, or stops without it when
                    // the session ends (which the other branch sees).
                    poll_ended = true;
                    if r.is_ok() {
                        silent = true;
                        break;
                    }
                }
            }
        }
        poll.abort();
        previous = Some(node_id);
        if silent {
            // Close the session: the node is reconnected to (and its instances started again)
            // when it answers again.
            if let Ok(sessions) = ractor::call!(server, NodeServerMessage::GetSessions)
                && let Some(s) = sessions.get(&node_id)
            {
                s.actor.stop(Some("the node stopped answering".into()));
            }
        }
        let Some(l) = link.upgrade() else { return };
        tracing::warn!(node = %l.name, addr = %l.addr, "node lost");
        let at = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
        l.set(None, true, Some(format!("the connection was lost (unix time {at:.3}); reconnecting")));
    }
}

/// How often a link asks its node for its instances' figures (also the health check).
const POLL: Duration = Duration::from_secs(1);
/// How long a poll waits for its answer.
const POLL_TIMEOUT: Duration = Duration::from_secs(3);
/// Polls in a row without an answer after which the node is lost.
const POLL_MISSES: u32 = 3;
/// How often instances that did not start on a node that is up are started again.
const START_RETRY: Duration = Duration::from_secs(5);

/// While its node is up: asks it for this process's instances' figures every [`POLL`] (kept for
/// `/metrics`), says on `silent` when it stopped answering, and starts again, every
/// [`START_RETRY`], the instances that did not start there (a file missing then, the node short
/// of memory then).
async fn poll_node(
    link: Weak<NodeLink>,
    agent: ActorRef<AgentMessage>,
    owner: String,
    silent: tokio::sync::oneshot::Sender<()>,
) {
    let mut misses = 0;
    let mut last_retry = Instant::now();
    loop {
        tokio::time::sleep(POLL).await;
        let Some(l) = link.upgrade() else { return };
        let asked = owner.as_bytes().to_vec();
        match agent.call(|p| AgentMessage::Stats(asked, p), Some(POLL_TIMEOUT)).await {
            Ok(CallResult::Success(bytes)) => {
                misses = 0;
                if let Ok(stats) = serde_json::from_slice::<wire::NodeStats>(&bytes) {
                    l.max_frame.store(stats.max_frame, Relaxed);
                    *l.stats.lock().unwrap_or_else(|p| p.into_inner()) = stats.instances;
                }
            }
            // No answer in time, or none at all (a session that ended is also seen by the
            // watcher, which then stops this poll).
            other => {
                misses += 1;
                tracing::debug!(node = %l.name, misses, answer = ?other.map(|r| matches!(r, CallResult::Timeout)), "a node poll got no answer");
                if misses >= POLL_MISSES {
                    tracing::warn!(node = %l.name, addr = %l.addr, polls = misses, "the node stopped answering");
                    let _ = silent.send(());
                    return;
                }
            }
        }
        if last_retry.elapsed() >= START_RETRY && !l.retrying.swap(true, Relaxed) {
            last_retry = Instant::now();
            let missing: Vec<(u64, Arc<Vec<u8>>)> = {
                let started = l.started.lock().unwrap_or_else(|p| p.into_inner());
                let starting = l.starting.lock().unwrap_or_else(|p| p.into_inner());
                l.instances
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .iter()
                    .filter(|(i, _)| !started.contains(i) && !starting.contains(i))
                    .map(|(i, p)| (*i, p.clone()))
                    .collect()
            };
            if missing.is_empty() {
                l.retrying.store(false, Relaxed);
                continue;
            }
            let agent = agent.clone();
            tokio::spawn(async move {
                for (instance, payload) in missing {
                    match l.start(&agent, instance, &payload).await {
                        Ok(()) => tracing::info!(node = %l.name, instance, "an instance started on a retry"),
                        Err(e) => {
                            tracing::debug!(node = %l.name, instance, error = %e, "an instance still does not start")
                        }
                    }
                }
                l.retrying.store(false, Relaxed);
            });
        }
    }
}

/// A node's figures for one instance of this process, as it last reported them.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeInstanceMetrics {
    /// The node.
    pub node: String,
    /// Its address.
    pub addr: String,
    /// What it said.
    pub stats: wire::InstanceStats,
}

/// The node's agent among the remote members of the agent group.
async fn find_agent(node_id: u64) -> Option<ActorRef<AgentMessage>> {
    let started = Instant::now();
    while started.elapsed() < READY_TIMEOUT {
        let found = ractor::pg::get_members(&node::AGENT_GROUP.to_string())
            .into_iter()
            .find(|c| !c.get_id().is_local() && c.get_id().node() == node_id);
        if let Some(cell) = found {
            return Some(ActorRef::from(cell));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    None
}

/// A submodel version whose replicas run on nodes: one instance per node.
pub(crate) struct Remote {
    /// The largest frame this process accepts (an answer over it would close the session).
    max_frame: u64,
    /// The demand for it counted here (requests that use it, jobs on their way), sent with
    /// each job so that the node's batching waits for what is coming.
    pub(crate) demand: maas_actors::Demand,
    owner: String,
    instance: u64,
    pub(crate) sites: Vec<Arc<NodeLink>>,
    next: AtomicUsize,
}

impl Drop for Remote {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Remote {
    /// Stops its instance on every node (idempotent).
    pub(crate) fn stop(&self) {
        let stop =
            serde_json::to_vec(&wire::Stop { owner: self.owner.clone(), instance: self.instance }).unwrap_or_default();
        for link in &self.sites {
            link.instances.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.instance);
            link.started.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.instance);
            if let Some(agent) = link.agent() {
                let _ = agent.cast(AgentMessage::Stop(stop.clone()));
            }
        }
    }
}

impl Remote {
    /// Nodes serving it now.
    pub(crate) fn up(&self) -> usize {
        self.sites.iter().filter(|l| l.serves(self.instance).is_some()).count()
    }

    /// Why it cannot serve, if no node serves it.
    pub(crate) fn why_down(&self) -> String {
        self.sites
            .iter()
            .map(|l| {
                format!(
                    "node `{}` ({}): {}",
                    l.name,
                    l.addr,
                    l.status().last_error.unwrap_or_else(|| "connecting".into())
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// The least busy node that is up (ties go round robin), other than `not`.
    fn pick(&self, not: Option<&str>) -> Option<(Arc<NodeLink>, ActorRef<AgentMessage>)> {
        let n = self.sites.len();
        let start = self.next.fetch_add(1, Relaxed);
        let mut best: Option<(usize, Arc<NodeLink>, ActorRef<AgentMessage>)> = None;
        for k in 0..n {
            let l = &self.sites[(start + k) % n];
            if Some(l.name.as_str()) == not {
                continue;
            }
            let Some(agent) = l.serves(self.instance) else { continue };
            let busy = l.busy.load(Relaxed);
            if best.as_ref().is_none_or(|(b, _, _)| busy < *b) {
                best = Some((busy, l.clone(), agent));
            }
        }
        best.map(|(_, l, a)| (l, a))
    }

    /// Runs one job on a node. A job whose node was lost under it is tried once more on another
    /// node that is up (jobs are pure functions of their inputs).
    pub(crate) async fn run(&self, values: &Values, deadline: Option<Instant>) -> Result<(Values, String), JobError> {
        let mut lost: Option<(String, String)> = None;
        for _ in 0..2 {
            let Some((link, agent)) = self.pick(lost.as_ref().map(|(n, _)| n.as_str())) else {
                return Err(match lost {
                    Some((_, why)) => JobError::Lost(why),
                    None => JobError::Lost(format!("no node serving it is up: {}", self.why_down())),
                });
            };
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            if left == Some(Duration::ZERO) {
                return Err(JobError::DeadlineExceeded);
            }
            let header = wire::JobHeader {
                owner: self.owner.clone(),
                instance: self.instance,
                deadline: left,
                upstream: self.demand.upstream().min(u32::MAX as usize) as u32,
                users: self.demand.users().min(u32::MAX as usize) as u32,
            };
            let job = wire::encode_job(&header, values).map_err(JobError::Failed)?;
            // A frame over the node's limit would close the whole session (every job on it):
            // refuse the job instead.
            let limit = link.max_frame.load(Relaxed).min(self.max_frame);
            if job.len() as u64 + FRAME_OVERHEAD > limit {
                return Err(JobError::InvalidInput(format!(
                    "its inputs take {} bytes, more than a frame to node `{}` may hold ({limit} bytes)",
                    job.len(),
                    link.name
                )));
            }
            link.busy.fetch_add(1, Relaxed);
            let answer = agent.call(|port| AgentMessage::Infer(job, port), Some(left.unwrap_or(NO_DEADLINE))).await;
            link.busy.fetch_sub(1, Relaxed);
            match answer {
                Ok(CallResult::Success(bytes)) => {
                    link.jobs.fetch_add(1, Relaxed);
                    match wire::decode_answer(&bytes, &candle_core::Device::Cpu) {
                        // The node lost the instance (it restarted between two of our looks):
                        // another node may have it.
                        Err(JobError::Unavailable(why)) => {
                            lost = Some((link.name.clone(), format!("node `{}` ({}): {why}", link.name, link.addr)));
                            link.started.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.instance);
                        }
                        answer => return answer,
                    }
                }
                Ok(CallResult::Timeout) => return Err(JobError::DeadlineExceeded),
                Ok(CallResult::SenderError) | Err(_) => {
                    let why = format!("node `{}` ({}) was lost while running this job", link.name, link.addr);
                    lost = Some((link.name.clone(), why));
                }
            }
        }
        Err(JobError::Lost(lost.map(|(_, w)| w).unwrap_or_default()))
    }
}
