//! A replica: a supervised actor that owns one execution stream (an OS thread holding the
//! kernel and its device). It is not on the data path — the stream takes batches from the
//! submodel's queue itself — but it ties the stream's life to ractor's supervision: when the
//! stream ends because a kernel panicked, the replica fails, and its supervisor (the submodel
//! actor) restarts it.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use maas_graphs::SubmodelSpec;
use maas_kernels::Registry;
use ractor::{Actor, ActorProcessingErr, ActorRef};

use crate::metrics::SubmodelMetrics;
use crate::queue::SubmodelQueue;
use crate::stream::Stream;

/// The replica actor (configuration only; state is built in `pre_start`).
pub struct ReplicaActor;

/// What a replica starts from.
pub struct ReplicaArgs {
    /// The submodel's current spec (a restart loads the version served now).
    pub spec: Arc<SubmodelSpec>,
    /// Where kinds are looked up.
    pub registry: Registry,
    /// Which replica of the submodel.
    pub replica: usize,
    /// The submodel's queue, where the stream takes its batches.
    pub queue: Arc<SubmodelQueue>,
    /// The submodel's metrics.
    pub metrics: Arc<SubmodelMetrics>,
}

/// Messages of a replica.
#[derive(Debug)]
pub enum ReplicaMessage {
    /// The stream thread ended: with a panic message if a kernel panicked, `None` when its
    /// channel closed (shutdown).
    StreamEnded(Option<String>),
}

// Local only: never sent to another process.
impl ractor::Message for ReplicaMessage {}

/// A started replica, as its supervisor keeps it.
#[derive(Debug)]
pub struct Started {
    /// The replica actor.
    pub actor: ActorRef<ReplicaMessage>,
}

impl Actor for ReplicaActor {
    type Msg = ReplicaMessage;
    type State = ();
    type Arguments = ReplicaArgs;

    async fn pre_start(&self, myself: ActorRef<Self::Msg>, args: ReplicaArgs) -> Result<(), ActorProcessingErr> {
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<Result<(), String>>();
        let name = format!("maas-{}-{}", args.spec.name, args.replica);
        std::thread::Builder::new().name(name).spawn(move || {
            // Load on the stream's own thread: it owns the kernel and its device from birth. Then
            // warm it up there, before it is reported ready: lazy device initialisation is paid
            // here, off the serving path. A warm-up that fails on synthetic input is only logged
            // (real inputs may differ); one that panics fails the load.
            let loaded = catch_unwind(AssertUnwindSafe(|| {
                let kernel = args.registry.load(&args.spec)?;
                if let Err(e) = kernel.warm_up() {
                    tracing::warn!(submodel = %args.spec.name, replica = args.replica, error = %e, "warm-up failed");
                }
                Ok::<_, maas_kernels::KernelError>(kernel)
            }));
            let kernel = match loaded {
                Ok(Ok(k)) => k,
                Ok(Err(e)) => {
                    let _ = ready_tx.send(Err(e.to_string()));
                    return;
                }
                Err(_) => {
                    let _ = ready_tx.send(Err("loading or warming up the kernel panicked".into()));
                    return;
                }
            };
            let _ = ready_tx.send(Ok(()));
            let stream = Stream {
                kernel,
                version: Arc::from(args.spec.version.as_str()),
                queue: args.queue,
                metrics: args.metrics,
            };
            let panic = stream.run();
            let _ = myself.cast(ReplicaMessage::StreamEnded(panic));
        })?;
        match ready_rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err("the stream thread ended while loading".into()),
        }
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: ReplicaMessage,
        _: &mut (),
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ReplicaMessage::StreamEnded(Some(panic)) => Err(format!("stream died: {panic}").into()),
            ReplicaMessage::StreamEnded(None) => {
                myself.stop(None);
                Ok(())
            }
        }
    }
}
