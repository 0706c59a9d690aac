//! maas training, from the bottom up.
//!
//! - [`compress`]: what a worker sends a parameter server for one gradient: dense, top-k,
//!   int8 or sign, each with error feedback, as self-describing byte messages decoded
//!   strictly (a hostile or truncated message is an error, never a panic or a huge allocation).
//! - [`data`]: training data from CSV or gzip-CSV files, with the columns that feed each input
//!   and the label column, every bad row refused with `file:line` and the reason.
//! - [`job`]: training jobs as written in graph files (`[training.NAME]`), checked against the
//!   graph and the kinds, every problem at `file:line:col`.
//! - [`partition`]: the learning parameters as one flat vector and its contiguous ranges, one
//!   per parameter server.
//! - [`optim`]: SGD with momentum and AdamW on a server's slice of the parameters.
//!
//! - [`model`]: a pipeline up to its loss as a trainable model (learning submodels as candle
//!   `Var`s named as in their weights files; frozen ones through their serving kernels).
//! - [`actors`]: a job's workers, parameter servers and staleness gate as ractor actors under
//!   one supervisor, exchanging byte messages.
//! - [`trainer`]: the coordinator: runs a job's actors (sync, or async within a staleness
//!   bound; optionally pruning and a fine-tune), reports progress, writes the trained weights.

pub mod actors;
pub mod compress;
pub mod data;
pub mod job;
pub mod model;
pub mod optim;
pub mod partition;
pub mod trainer;
