//! The submodel actor: one per submodel. It supervises the submodel's replicas (restart with
//! backoff, within a budget), refuses work while every replica has failed, and closes the
//! submodel's queue when it stops. It is not on the data path: requests push jobs into the
//! [`SubmodelQueue`] and the replicas' streams take batches from it (see [`crate::queue`] for
//! the batching policy).

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use maas_graphs::SubmodelSpec;
use maas_kernels::Registry;
use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, SupervisionEvent};

use crate::metrics::SubmodelMetrics;
use crate::protocol::SubmodelMessage;
use crate::queue::SubmodelQueue;
use crate::replica::{ReplicaActor, ReplicaArgs, ReplicaMessage, Started};
use crate::status::{SubmodelState, SubmodelStatus};

/// How failed replicas are restarted.
#[derive(Debug, Clone, Copy)]
pub struct RestartPolicy {
    /// Restarts allowed per replica within `window` before it is given up.
    pub max_restarts: usize,
    /// The window over which restarts are counted.
    pub window: Duration,
    /// Delay before the first restart; doubled for each recent restart.
    pub backoff: Duration,
    /// The longest delay.
    pub max_backoff: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        Self {
            max_restarts: 5,
            window: Duration::from_secs(60),
            backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(2),
        }
    }
}

/// The submodel actor (configuration only).
pub struct SubmodelActor;

/// What a submodel actor starts from.
pub struct SubmodelArgs {
    /// The submodel.
    pub spec: Arc<SubmodelSpec>,
    /// Where its kind is looked up.
    pub registry: Registry,
    /// Its queue (shared with the engine, which pushes jobs into it).
    pub queue: Arc<SubmodelQueue>,
    /// Its metrics (shared with the engine).
    pub metrics: Arc<SubmodelMetrics>,
    /// Its health (shared with the engine).
    pub status: Arc<SubmodelStatus>,
    /// Restart policy for its replicas.
    pub policy: RestartPolicy,
}

struct Replica {
    actor: Option<ActorRef<ReplicaMessage>>,
    generation: u64,
    restarts: VecDeque<Instant>,
    failed: bool,
}

/// The submodel actor's state.
pub struct SubmodelActorState {
    spec: Arc<SubmodelSpec>,
    registry: Registry,
    queue: Arc<SubmodelQueue>,
    metrics: Arc<SubmodelMetrics>,
    status: Arc<SubmodelStatus>,
    policy: RestartPolicy,
    replicas: Vec<Replica>,
    /// Replicas that ended before their `Started` message arrived (a restarted stream can take
    /// a poison job and die within microseconds of loading, before the task that spawned it
    /// reports back): their end is applied when `Started` comes. Oldest first, at most
    /// [`ENDED_EARLY`].
    ended_early: VecDeque<(ActorId, String)>,
    /// Replicas stopped on purpose (started for a generation that had moved on): their end is
    /// expected and ignored.
    stopped: HashSet<ActorId>,
}

/// The most early ends remembered (each is claimed by its `Started` within moments; more would
/// mean a leak, so the oldest goes).
const ENDED_EARLY: usize = 64;

impl SubmodelActorState {
    fn replica_args(&self, replica: usize) -> ReplicaArgs {
        ReplicaArgs {
            spec: self.spec.clone(),
            registry: self.registry.clone(),
            replica,
            queue: self.queue.clone(),
            metrics: self.metrics.clone(),
        }
    }

    fn publish(&self) {
        let ready = self.replicas.iter().filter(|r| r.actor.is_some()).count();
        let state = if ready == self.replicas.len() {
            SubmodelState::Ready
        } else if ready > 0 {
            SubmodelState::Degraded
        } else if self.replicas.iter().all(|r| r.failed) {
            SubmodelState::Failed
        } else {
            SubmodelState::Starting
        };
        self.status.set(state, ready);
    }

    fn failed(&self) -> bool {
        self.replicas.iter().all(|r| r.failed)
    }

    fn replica_down(&mut self, myself: &ActorRef<SubmodelMessage>, i: usize, reason: String) {
        let now = Instant::now();
        let policy = self.policy;
        let name = self.spec.name.clone();
        let r = &mut self.replicas[i];
        r.actor = None;
        r.generation += 1;
        self.metrics.restarts.fetch_add(1, Relaxed);
        self.status.set_error(format!("replica {i}: {reason}"));
        r.restarts.retain(|t| now.duration_since(*t) < policy.window);
        if r.restarts.len() >= policy.max_restarts {
            // Crash loop: stop restarting for a whole window (the submodel reports `failed`
            // when no replica is left), then try once more, so that a burst of bad requests
            // cannot take a submodel down for good.
            r.failed = true;
            tracing::error!(submodel = %name, replica = i, %reason, retry_in = ?policy.window, "replica failed; restart budget spent");
            myself.send_after(policy.window, move || SubmodelMessage::Restart(i));
        } else {
            let delay = policy.backoff.saturating_mul(1 << r.restarts.len().min(16)).min(policy.max_backoff);
            r.restarts.push_back(now);
            tracing::warn!(submodel = %name, replica = i, %reason, ?delay, "replica failed; restarting");
            myself.send_after(delay, move || SubmodelMessage::Restart(i));
        }
        if self.failed() {
            self.queue.fail(format!("submodel `{name}` failed: {reason}"));
        }
        self.publish();
    }
}

impl Actor for SubmodelActor {
    type Msg = SubmodelMessage;
    type State = SubmodelActorState;
    type Arguments = SubmodelArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: SubmodelArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let mut state = SubmodelActorState {
            replicas: (0..args.spec.replicas)
                .map(|_| Replica { actor: None, generation: 0, restarts: VecDeque::new(), failed: false })
                .collect(),
            spec: args.spec,
            registry: args.registry,
            queue: args.queue,
            metrics: args.metrics,
            status: args.status,
            policy: args.policy,
            ended_early: VecDeque::new(),
            stopped: HashSet::new(),
        };
        state.publish();
        // Load every replica before the submodel counts as started: a bad weights file fails
        // the start with its error.
        for i in 0..state.replicas.len() {
            let started = Actor::spawn_linked(None, ReplicaActor, state.replica_args(i), myself.get_cell()).await;
            match started {
                Ok((actor, _)) => state.replicas[i].actor = Some(actor),
                Err(e) => {
                    state.queue.close(format!("submodel `{}` failed to start", state.spec.name));
                    for r in &mut state.replicas {
                        if let Some(a) = r.actor.take() {
                            a.stop(None);
                        }
                    }
                    return Err(e.to_string().into());
                }
            }
        }
        state.publish();
        Ok(state)
    }

    async fn post_stop(&self, _: ActorRef<Self::Msg>, state: &mut Self::State) -> Result<(), ActorProcessingErr> {
        // Queued jobs are answered (or dropped when nobody waits); streams end after their batch.
        state.queue.close(format!("submodel `{}` stopped", state.spec.name));
        for r in &mut state.replicas {
            if let Some(a) = r.actor.take() {
                a.stop(None);
            }
        }
        state.status.set(SubmodelState::Stopped, 0);
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SubmodelMessage::Restart(i) => {
                let generation = state.replicas[i].generation;
                let args = state.replica_args(i);
                // Load off the actor: other replicas keep being served meanwhile.
                let me = myself.clone();
                tokio::spawn(async move {
                    let result = Actor::spawn_linked(None, ReplicaActor, args, me.get_cell())
                        .await
                        .map(|(actor, _)| Started { actor })
                        .map_err(|e| e.to_string());
                    let _ = me.cast(SubmodelMessage::Started { replica: i, generation, result });
                });
            }
            SubmodelMessage::Started { replica, generation, result } => {
                let ended = result.as_ref().ok().and_then(|s| {
                    let id = s.actor.get_id();
                    let i = state.ended_early.iter().position(|(e, _)| *e == id)?;
                    state.ended_early.remove(i).map(|(_, reason)| reason)
                });
                if state.replicas[replica].generation != generation {
                    if let Ok(s) = result
                        && ended.is_none()
                    {
                        state.stopped.insert(s.actor.get_id());
                        s.actor.stop(None);
                    }
                    return Ok(());
                }
                match (result, ended) {
                    (Ok(_), Some(reason)) => {
                        // It started and already died: a failure like any other.
                        state.replicas[replica].failed = false;
                        state.queue.serve_again();
                        state.replica_down(&myself, replica, reason);
                    }
                    (Ok(s), None) => {
                        let r = &mut state.replicas[replica];
                        r.failed = false;
                        r.actor = Some(s.actor);
                        state.queue.serve_again();
                        tracing::info!(submodel = %state.spec.name, replica, "replica restarted");
                        state.publish();
                    }
                    (Err(e), _) => state.replica_down(&myself, replica, format!("restart failed: {e}")),
                }
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        // Decide deliberately: a replica's failure is this actor's to handle, never a reason to
        // stop the submodel.
        let (cell, reason) = match event {
            SupervisionEvent::ActorFailed(cell, err) => (cell, err.to_string()),
            SupervisionEvent::ActorTerminated(cell, _, reason) => (cell, reason.unwrap_or_else(|| "stopped".into())),
            _ => return Ok(()),
        };
        let id = cell.get_id();
        if let Some(i) = state.replicas.iter().position(|r| r.actor.as_ref().is_some_and(|a| a.get_id() == id)) {
            state.replica_down(&myself, i, reason);
        } else if !state.stopped.remove(&id) {
            // Not known yet: its `Started` message is still on its way (see `ended_early`).
            if state.ended_early.len() >= ENDED_EARLY {
                state.ended_early.pop_front();
            }
            state.ended_early.push_back((id, reason));
        }
        Ok(())
    }
}
