//! The maas engine: serves checked graphs with supervised, batching submodel actors.
//!
//! This crate is the only one that knows graphs, kernels and actors together. An [`Engine`]
//! checks graph files against the kernel registry, starts a [`maas_actors::SubmodelActor`] per
//! submodel (trivial kinds run inline), compiles one immutable plan per pipeline, and runs
//! requests through the DAG: bounded admission, deadlines, cancellation on drop, typed errors
//! ([`InferError`]), metrics, graceful shutdown. See `docs/runtime-semantics.md`.
//!
//! [`Sequential`] is the reference executor: every node in order on the calling thread, no
//! actors. It is the oracle concurrent execution is tested against, and `maas bench`'s
//! baseline.
//!
//! ```
//! use maas_engine::Engine;
//! use maas_kernels::{Value, Values};
//! use candle_core::{Device, Tensor};
//!
//! # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let engine = Engine::from_files(&["../examples/pipelines/digits.toml"]).await?;
//! let pixels = Tensor::zeros((2, 64), candle_core::DType::F32, &Device::Cpu)?;
//! let response = engine.infer("classify", Values::from([("pixels".to_string(), Value::Tensor(pixels))])).await?;
//! assert_eq!(response.outputs["label"].as_tensor().unwrap().dims(), &[2]);
//! assert_eq!(response.versions["head"], "v1");
//!
//! // Bad input is a typed error naming the port; the engine keeps serving.
//! let wrong = Tensor::zeros((1, 63), candle_core::DType::F32, &Device::Cpu)?;
//! let err = engine.infer("classify", Values::from([("pixels".to_string(), Value::Tensor(wrong))])).await.unwrap_err();
//! assert_eq!(err.kind(), "invalid_input");
//! engine.shutdown().await;
//! # Ok(())
//! # }
//! ```

mod change;
pub mod cluster;
mod engine;
mod error;
pub mod json;
mod memory;
mod metrics;
mod sequential;
mod state;
mod training;

pub use change::{
    ChangeError, OutputTypeChange, RecomposeOptions, Recomposed, SwapRequest, Swapped, VersionInfo, Versions,
};
pub use cluster::{ClusterOptions, Node, NodeConfig, NodeStatus};
pub use engine::{Engine, EngineBuilder, EngineOptions, InferOptions, PipelineInfo, Response, SubmodelInfo};
pub use error::{EngineError, InferError, Result};
pub use maas_actors::RestartPolicy;
pub use maas_actors::metrics::HistogramSnapshot;
pub use memory::{TooLarge, default_max_load_bytes, parse_bytes};
pub use metrics::{MetricsSnapshot, PipelineSnapshot, SubmodelSnapshot};
pub use sequential::Sequential;
pub use state::{STATE_FILE, has_record};
pub use training::{TrainingError, TrainingOptions, TrainingState, TrainingStatus};

use std::path::Path;

use maas_graphs::{Checked, Diagnostics, SourceFile};
use maas_kernels::Registry;

/// Reads and checks graph files against the registry's kinds.
pub fn load_files<P: AsRef<Path>>(paths: &[P], registry: &Registry) -> Result<Checked, Diagnostics> {
    maas_graphs::check_files(paths, registry)
}

/// Checks graph sources already in memory against the registry's kinds.
pub fn load_sources(sources: Vec<SourceFile>, registry: &Registry) -> Result<Checked, Diagnostics> {
    maas_graphs::check(sources, registry)
}
