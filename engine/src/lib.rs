//! The maas engine: loads graphs against the kernel registry and runs pipelines.
//!
//! This crate is the only one that knows graphs and kernels (and, later, actors) together.
//! [`load_files`]/[`load_sources`] check graph files with the registry's signatures;
//! [`Sequential`] is the reference executor: it loads every submodel once and runs a
//! pipeline's nodes one after another on the calling thread. It is what `maas run` uses, and
//! the oracle that concurrent execution is tested against.
//!
//! ```no_run
//! use maas_engine::{Sequential, load_files};
//! use maas_kernels::{Registry, Value, Values};
//!
//! let registry = Registry::builtin();
//! let checked = load_files(&["examples/pipelines/minilm.toml"], &registry).expect("valid graph");
//! let engine = Sequential::new(&checked.graph, &registry).expect("weights load");
//! let out = engine
//!     .run("embed", Values::from([("text".to_string(), Value::text(["hello world"]))]))
//!     .expect("runs");
//! assert_eq!(out["embedding"].as_tensor().unwrap().dims(), &[1, 384]);
//! ```

mod engine;
mod error;
pub mod json;
mod metrics;
mod sequential;

pub use engine::{Engine, EngineBuilder, EngineOptions, InferOptions, PipelineInfo, Response, SubmodelInfo};
pub use error::{EngineError, InferError, Result};
pub use maas_actors::RestartPolicy;
pub use maas_actors::metrics::HistogramSnapshot;
pub use metrics::{MetricsSnapshot, PipelineSnapshot, SubmodelSnapshot};
pub use sequential::Sequential;

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
