//! Errors of running pipelines.

use maas_kernels::KernelError;

/// Why a request or a load failed.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// No pipeline of that name is served.
    #[error("unknown pipeline `{0}`")]
    UnknownPipeline(String),
    /// The request's inputs do not fit the pipeline (missing, unknown, or of the wrong type).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// A submodel failed to load.
    #[error("submodel `{submodel}` failed to load: {source}")]
    Load {
        /// The submodel.
        submodel: String,
        /// Why.
        #[source]
        source: KernelError,
    },
    /// A submodel failed while computing a node.
    #[error("node `{node}` (submodel `{submodel}`) failed: {source}")]
    SubmodelFailed {
        /// The node.
        node: String,
        /// Its submodel.
        submodel: String,
        /// Why.
        #[source]
        source: KernelError,
    },
}

/// `Result` with [`EngineError`].
pub type Result<T, E = EngineError> = std::result::Result<T, E>;
