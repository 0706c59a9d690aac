//! maas serves machine-learning models as compositions of submodels.
//!
//! This crate is the facade: it re-exports the layers ([`graphs`], [`kernels`], [`engine`])
//! and holds what the `maas` binary and the examples share.

pub mod bench;
pub mod default_graph;
pub mod digits;
/// A served graph written back as TOML (kept here for compatibility; lives in [`graphs`]).
pub mod graph_toml {
    pub use maas_graphs::to_toml;
}
pub mod http;
pub mod logging;
pub mod prometheus;
pub mod server;

pub use maas_engine as engine;
pub use maas_graphs as graphs;
pub use maas_kernels as kernels;
pub mod v2;
