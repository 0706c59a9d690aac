//! maas serves machine-learning models as compositions of submodels.
//!
//! This crate is the facade: it re-exports the layers ([`graphs`], [`kernels`], [`engine`])
//! and holds what the `maas` binary and the examples share.

pub mod bench;
pub mod digits;

pub use maas_engine as engine;
pub use maas_graphs as graphs;
pub use maas_kernels as kernels;
