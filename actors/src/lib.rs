//! The maas runtime: supervised submodel actors with their own execution streams and dynamic
//! batching.
//!
//! - A [`SubmodelQueue`] per submodel is the data path: requests push jobs into it and the
//!   replicas' streams take batches out of it, across every request of every pipeline, waiting
//!   for a fuller batch only when more rows are expected soon (see [`queue`]).
//! - A [`SubmodelActor`] (ractor) per submodel supervises its replicas and closes its queue
//!   when it stops.
//! - A [`ReplicaActor`] per replica owns one execution stream: an OS thread that holds the
//!   replica's kernel and device, takes batches from the queue and runs them one at a time (so `forward` never blocks the
//!   async runtime). A kernel panic is caught on the stream; the replica fails and the submodel
//!   actor restarts it with backoff, within a restart budget.
//! - [`batch`] pads ragged ports so rows of different lengths share a batch, and trims outputs
//!   back to each job's own length.
//!
//! See `docs/runtime-semantics.md` for ordering, backpressure, deadlines, cancellation, panics
//! and shutdown.

pub mod batch;
pub mod metrics;
mod protocol;
pub mod queue;
mod replica;
mod status;
mod stream;
mod submodel;

pub use protocol::{Job, JobError, JobOutput, SubmodelMessage};
pub use queue::{BatchPolicy, Demand, SubmodelQueue};
pub use replica::{ReplicaActor, ReplicaArgs, ReplicaMessage, Started};
pub use status::{SubmodelState, SubmodelStatus};
pub use submodel::{RestartPolicy, SubmodelActor, SubmodelActorState, SubmodelArgs};
