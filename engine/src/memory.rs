//! The memory guard: before anything loads (at build, swap, rollback and recomposition), the
//! bytes every new submodel version needs are estimated from its params and file headers
//! ([`maas_kernels::Kind::memory_estimate`] times its replicas) and compared with the limit.
//! A load over it is refused with [`TooLarge`] and nothing starts, so a submodel too large for
//! the machine is an error, not an allocation failure that aborts the process (Rust aborts on
//! a failed allocation; `catch_unwind` cannot catch it).
//!
//! The limit is the smaller of [`EngineOptions::max_load_bytes`](crate::EngineOptions) (default
//! [`default_max_load_bytes`]: half the machine's memory) and the memory available when the
//! change is checked (`MemAvailable` in `/proc/meminfo`, which already counts what serves).
//! Where `/proc/meminfo` cannot be read (not Linux), only an explicit limit applies.

use std::fmt;

use maas_graphs::SubmodelSpec;
use maas_kernels::{KernelError, Registry};

use crate::change::ChangeError;
use crate::error::EngineError;

/// A load refused because its estimate exceeds the limit. Nothing was allocated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TooLarge {
    /// The submodel refused (when a change loads several: the largest).
    pub submodel: String,
    /// Its estimate: bytes per replica times its replicas.
    pub submodel_bytes: u64,
    /// Its replica count.
    pub replicas: usize,
    /// How many submodels the change loads.
    pub submodels: usize,
    /// The estimate for everything the change loads, in bytes.
    pub estimate_bytes: u64,
    /// The limit it exceeds, in bytes.
    pub limit_bytes: u64,
    /// Whether that limit is the memory available now (else: the configured maximum).
    pub available: bool,
}

impl fmt::Display for TooLarge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let replicas = if self.replicas == 1 { "1 replica".to_string() } else { format!("{} replicas", self.replicas) };
        if self.submodels <= 1 {
            write!(
                f,
                "submodel `{}` needs an estimated {} to load ({replicas}),",
                self.submodel,
                Bytes(self.estimate_bytes)
            )?;
        } else {
            write!(
                f,
                "loading {} submodels needs an estimated {} (submodel `{}`: {}, {replicas}),",
                self.submodels,
                Bytes(self.estimate_bytes),
                self.submodel,
                Bytes(self.submodel_bytes)
            )?;
        }
        if self.available {
            write!(f, " more than the {} of memory available now", Bytes(self.limit_bytes))
        } else {
            write!(f, " more than the load limit of {} (max_load_bytes, --max-load-memory)", Bytes(self.limit_bytes))
        }
    }
}

impl std::error::Error for TooLarge {}

/// Why a memory check refused a load.
pub(crate) enum Refused {
    /// Over the limit.
    TooLarge(TooLarge),
    /// The kind could not estimate (its settings or headers are wrong).
    Estimate { submodel: String, source: Box<KernelError> },
}

impl From<Refused> for ChangeError {
    fn from(r: Refused) -> Self {
        match r {
            Refused::TooLarge(t) => ChangeError::TooLarge(t),
            Refused::Estimate { submodel, source } => {
                ChangeError::InvalidWeights { submodel, message: format!("cannot estimate its memory: {source}") }
            }
        }
    }
}

impl From<Refused> for EngineError {
    fn from(r: Refused) -> Self {
        match r {
            Refused::TooLarge(t) => EngineError::TooLarge(t),
            Refused::Estimate { submodel, source } => EngineError::Load { submodel, source },
        }
    }
}

/// Checks that loading `specs` (every replica of each) fits under the smaller of `max` and the
/// memory available now; returns the estimate in bytes.
pub(crate) fn check<'a>(
    registry: &Registry,
    specs: impl IntoIterator<Item = &'a SubmodelSpec>,
    max: Option<u64>,
) -> Result<u64, Refused> {
    let mut total = 0u64;
    let mut largest: Option<(String, u64, usize)> = None;
    let mut count = 0;
    // A submodel placed on nodes loads there (and is checked there), not here.
    for spec in specs.into_iter().filter(|s| !s.is_remote()) {
        let one = registry
            .memory_estimate(spec)
            .map_err(|source| Refused::Estimate { submodel: spec.name.to_string(), source: Box::new(source) })?;
        let bytes = one.saturating_mul(spec.replicas as u64);
        total = total.saturating_add(bytes);
        count += 1;
        if largest.as_ref().is_none_or(|(_, b, _)| bytes > *b) {
            largest = Some((spec.name.to_string(), bytes, spec.replicas));
        }
    }
    let Some((submodel, submodel_bytes, replicas)) = largest else { return Ok(0) };
    // Read the available memory only when a load is at stake.
    let (limit_bytes, available) = match (max, available_bytes()) {
        (Some(m), Some(a)) if a < m => (a, true),
        (Some(m), _) => (m, false),
        (None, Some(a)) => (a, true),
        (None, None) => return Ok(total),
    };
    tracing::debug!(submodel = %submodel, estimate = total, limit = limit_bytes, "memory check");
    if total > limit_bytes {
        return Err(Refused::TooLarge(TooLarge {
            submodel,
            submodel_bytes,
            replicas,
            submodels: count,
            estimate_bytes: total,
            limit_bytes,
            available,
        }));
    }
    Ok(total)
}

/// The default of [`EngineOptions::max_load_bytes`](crate::EngineOptions): half the machine's
/// total memory (`MemTotal`, or the process's cgroup v2 `memory.max` when that is smaller),
/// `None` where neither can be read.
pub fn default_max_load_bytes() -> Option<u64> {
    let total = match (meminfo("MemTotal"), cgroup("memory.max")) {
        (Some(t), Some(c)) => Some(t.min(c)),
        (t, c) => t.or(c),
    };
    total.map(|t| t / 2)
}

/// The memory available now: `MemAvailable`, or what the process's cgroup v2 still allows
/// (`memory.max - memory.current`) when that is less.
fn available_bytes() -> Option<u64> {
    let cgroup_left = cgroup("memory.max").zip(cgroup("memory.current")).map(|(max, cur)| max.saturating_sub(cur));
    match (meminfo("MemAvailable"), cgroup_left) {
        (Some(a), Some(c)) => Some(a.min(c)),
        (a, c) => a.or(c),
    }
}

/// A number from the process's own cgroup v2 directory (`None`: no cgroup v2, no limit (`max`),
/// or unreadable).
fn cgroup(file: &str) -> Option<u64> {
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = own.lines().find_map(|l| l.strip_prefix("0::"))?;
    let text = std::fs::read_to_string(format!("/sys/fs/cgroup{}/{file}", path.trim_end_matches('/'))).ok()?;
    text.trim().parse().ok()
}

fn meminfo(key: &str) -> Option<u64> {
    parse_meminfo(&std::fs::read_to_string("/proc/meminfo").ok()?, key)
}

/// A `/proc/meminfo` field in bytes (`MemTotal:  24000000 kB`).
fn parse_meminfo(text: &str, key: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.split(':').next() == Some(key))?;
    let mut words = line.split(':').nth(1)?.split_whitespace();
    let n: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") => n.checked_mul(1024),
        None => Some(n),
        Some(_) => None,
    }
}

/// Parses a size: bytes (`1048576`), or a number with a unit, binary (`512MiB`, `1.5GiB`, `KiB`,
/// `TiB`) or decimal (`500MB`, `2GB`, `kB`, `TB`); case does not matter.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (number, unit) = (&t[..split], t[split..].trim());
    let bad = || format!("`{text}` is not a size (e.g. 8GiB, 512MiB, 1000000)");
    if number.is_empty() {
        return Err(bad());
    }
    let scale: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => return Err(format!("`{text}`: unknown unit `{unit}`; expected B, KiB, MiB, GiB, TiB, kB, MB, GB or TB")),
    };
    if let Ok(n) = number.parse::<u64>() {
        return n.checked_mul(scale).ok_or_else(|| format!("`{text}` is too large"));
    }
    let x: f64 = number.parse().map_err(|_| bad())?;
    let bytes = x * scale as f64;
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(format!("`{text}` is too large"));
    }
    Ok(bytes as u64)
}

/// Bytes in binary units with one decimal (`1.9 TiB`, `512.0 MiB`).
struct Bytes(u64);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 == u64::MAX {
            return f.write_str("more than 16 EiB");
        }
        const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
        if self.0 < 1024 {
            return write!(f, "{} B", self.0);
        }
        let mut x = self.0 as f64 / 1024.0;
        let mut unit = 0;
        while x >= 1024.0 && unit + 1 < UNITS.len() {
            x /= 1024.0;
            unit += 1;
        }
        write!(f, "{x:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_fields_are_read_in_bytes() {
        let text = "MemTotal:       24000000 kB\nMemFree:        1000 kB\nMemAvailable:   2048 kB\n";
        assert_eq!(parse_meminfo(text, "MemTotal"), Some(24_000_000 * 1024));
        assert_eq!(parse_meminfo(text, "MemAvailable"), Some(2048 * 1024));
        assert_eq!(parse_meminfo(text, "Mem"), None);
        assert_eq!(parse_meminfo("MemTotal: lots kB", "MemTotal"), None);
    }

    #[test]
    fn sizes_parse_with_and_without_units() {
        assert_eq!(parse_bytes("1048576"), Ok(1 << 20));
        assert_eq!(parse_bytes("512MiB"), Ok(512 << 20));
        assert_eq!(parse_bytes("8 GiB"), Ok(8 << 30));
        assert_eq!(parse_bytes("1.5gib"), Ok(3 << 29));
        assert_eq!(parse_bytes("2GB"), Ok(2_000_000_000));
        assert!(parse_bytes("8 parsecs").unwrap_err().contains("unknown unit"));
        assert!(parse_bytes("GiB").unwrap_err().contains("not a size"));
        assert!(parse_bytes("99999999999TiB").unwrap_err().contains("too large"));
    }

    #[test]
    fn bytes_are_shown_in_binary_units() {
        assert_eq!(Bytes(512).to_string(), "512 B");
        assert_eq!(Bytes(3 << 29).to_string(), "1.5 GiB");
        assert_eq!(Bytes(2_048_000_000_000).to_string(), "1.9 TiB");
        assert_eq!(Bytes(u64::MAX).to_string(), "more than 16 EiB");
    }
}
