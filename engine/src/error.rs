//! Errors: [`EngineError`] when an engine is built or changed, [`InferError`] for requests.

use std::time::Duration;

use maas_graphs::Diagnostics;
use maas_kernels::KernelError;

/// Why an engine could not be built.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The graph was rejected; every diagnostic is included.
    #[error("invalid graph:\n{0}")]
    Graph(Diagnostics),
    /// A submodel failed to load.
    #[error("submodel `{submodel}` failed to load: {source}")]
    Load {
        /// The submodel.
        submodel: String,
        /// Why.
        #[source]
        source: Box<KernelError>,
    },
    /// A submodel's actors failed to start (the message carries the loader's error).
    #[error("submodel `{submodel}` failed to start: {message}")]
    Start {
        /// The submodel.
        submodel: String,
        /// Why.
        message: String,
    },
    /// Loading the graph would need more memory than allowed (estimated before anything is
    /// allocated; see [`EngineOptions::max_load_bytes`](crate::EngineOptions)).
    #[error("{0}")]
    TooLarge(crate::TooLarge),
    /// The engine's settings cannot be used: a state directory that cannot be read or whose
    /// record no longer checks, or a file root that does not exist.
    #[error("{0}")]
    Setup(String),
}

/// Why a request ended without outputs. Every request ends with outputs or one of these.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InferError {
    /// No pipeline of that name is served.
    #[error("unknown pipeline `{0}`")]
    UnknownPipeline(String),
    /// The inputs do not fit the pipeline (missing, unknown, or of the wrong type or shape).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// The engine or a submodel's queue is full; try again later.
    #[error("overloaded: {0}")]
    Overloaded(String),
    /// The request's deadline passed.
    #[error("deadline of {0:?} exceeded")]
    DeadlineExceeded(Duration),
    /// A submodel failed on this request (after its retry), or is not serving.
    #[error("node `{node}` (submodel `{submodel}`) failed: {message}")]
    SubmodelFailed {
        /// The node.
        node: String,
        /// Its submodel.
        submodel: String,
        /// Why.
        message: String,
    },
    /// The engine is shutting down and takes no new requests.
    #[error("the engine is shutting down")]
    ShuttingDown,
    /// The node (another process) running this request's job for a submodel was lost, and no
    /// other node hosting the submodel could take it; or none is up.
    #[error("submodel `{submodel}` (pipeline node `{node}`): {message}")]
    NodeLost {
        /// The pipeline node.
        node: String,
        /// Its submodel.
        submodel: String,
        /// Which process was lost, and when.
        message: String,
    },
}

impl InferError {
    /// A short, stable name for the error's kind (`invalid_input`, `overloaded`, ...), used in
    /// metrics and in the HTTP API.
    pub fn kind(&self) -> &'static str {
        match self {
            InferError::UnknownPipeline(_) => "unknown_pipeline",
            InferError::InvalidInput(_) => "invalid_input",
            InferError::Overloaded(_) => "overloaded",
            InferError::DeadlineExceeded(_) => "deadline_exceeded",
            InferError::SubmodelFailed { .. } => "submodel_failed",
            InferError::ShuttingDown => "shutting_down",
            InferError::NodeLost { .. } => "node_lost",
        }
    }

    /// Every kind, in a fixed order (for metrics).
    pub const KINDS: [&'static str; 7] = [
        "unknown_pipeline",
        "invalid_input",
        "overloaded",
        "deadline_exceeded",
        "submodel_failed",
        "shutting_down",
        "node_lost",
    ];
}

/// `Result` with [`EngineError`].
pub type Result<T, E = EngineError> = std::result::Result<T, E>;
