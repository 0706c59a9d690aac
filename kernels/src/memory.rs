//! Memory estimates: the bytes loading one replica of a submodel takes, computed from its
//! params and file headers before anything is allocated (see [`Kind::memory_estimate`]).
//!
//! Every helper saturates instead of overflowing: a layer of `out = 4000000000` by `in = 64`
//! is 1 TB, never a small number after a wrap, and an absurd shape is `u64::MAX`.
//!
//! [`Kind::memory_estimate`]: crate::Kind::memory_estimate

use std::path::Path;

use maas_graphs::SubmodelSpec;

/// Bytes of one f32.
pub const F32_BYTES: u64 = 4;

/// Bytes of a tensor of `shape` with elements of `elem` bytes (saturating).
pub fn tensor_bytes(shape: &[usize], elem: u64) -> u64 {
    shape.iter().fold(elem, |acc, &d| acc.saturating_mul(d as u64))
}

/// Bytes of `numel` values stored in a block format of `block` values per `block_bytes` bytes
/// (ggml's q8_0: 32 values in 34 bytes; q4k: 256 in 144), rounding up to whole blocks.
pub fn block_bytes(numel: u64, block: u64, block_bytes: u64) -> u64 {
    numel.div_ceil(block.max(1)).saturating_mul(block_bytes)
}

/// The size of a file in bytes (0 when it cannot be read: its load fails on its own).
pub fn file_size(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

/// The total size of every file a submodel reads (its weights and file params): the default
/// estimate of a kind that does not give its own.
pub fn files_size(spec: &SubmodelSpec) -> u64 {
    spec.files().iter().map(|f| file_size(f)).fold(0, u64::saturating_add)
}

/// `a + b + ...`, saturating.
pub fn sum(parts: impl IntoIterator<Item = u64>) -> u64 {
    parts.into_iter().fold(0, u64::saturating_add)
}
