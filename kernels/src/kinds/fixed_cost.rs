//! `fixed_cost`: a stand-in for a device of a given speed, for benchmarks and tests. Not a
//! built-in kind: register it ([`FixedCost`]) where you want it (`maas bench` does).
//!
//! `x` (`f32[B,N]`) -> `out` = x, after a cost of `per_batch_us + rows * per_row_us` microseconds
//! during which the stream thread waits as it would for a GPU: it sleeps (leaving the CPU to
//! others) and only polls the last `POLL` of the cost, with yields, so the cost is met to within
//! a few microseconds. A batch of up to `max_size` rows every `per_batch_us` is then the ideal
//! throughput of that device, and the engine's own costs are whatever falls short of it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::Device;
use maas_graphs::{KindError, PortSpec, Signature, SubmodelSpec, ty};

use crate::error::Result;
use crate::kernel::{Kernel, Kind};
use crate::value::{Value, Values};
use crate::weights::parse_params;

/// How much of a cost is polled rather than slept (a sleep overshoots by tens of microseconds).
const POLL: Duration = Duration::from_micros(80);

/// The `fixed_cost` kind: `params = { per_batch_us = 500, per_row_us = 0 }`.
#[derive(Debug, Clone, Copy, Default)]
pub struct FixedCost;

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Params {
    per_batch_us: Option<f64>,
    per_row_us: Option<f64>,
}

fn costs(spec: &SubmodelSpec) -> Result<(Duration, Duration), Vec<KindError>> {
    if spec.weights.is_some() {
        return Err(vec![KindError::at("weights", "kind `fixed_cost` takes no weights")]);
    }
    let p: Params = parse_params(&spec.params).map_err(|e| vec![e])?;
    let micros = |key: &str, v: Option<f64>| -> Result<Duration, KindError> {
        let v = v.unwrap_or(0.0);
        if !(0.0..=10_000_000.0).contains(&v) {
            return Err(KindError::at(
                format!("params.{key}"),
                format!("{v} is out of range: microseconds from 0 to 10000000"),
            ));
        }
        Ok(Duration::from_secs_f64(v / 1e6))
    };
    let batch = micros("per_batch_us", p.per_batch_us);
    let row = micros("per_row_us", p.per_row_us);
    match (batch, row) {
        (Ok(b), Ok(r)) => Ok((b, r)),
        (b, r) => Err([b.err(), r.err()].into_iter().flatten().collect()),
    }
}

impl Kind for FixedCost {
    fn name(&self) -> &str {
        "fixed_cost"
    }

    fn signature(&self, spec: &SubmodelSpec) -> Result<Signature, Vec<KindError>> {
        costs(spec)?;
        Ok(Signature {
            inputs: vec![PortSpec::new("x", ty("f32[B,N]"))],
            outputs: vec![PortSpec::new("out", ty("f32[B,N]"))],
        })
    }

    fn load(&self, spec: &SubmodelSpec, _device: &Device) -> Result<Arc<dyn Kernel>> {
        let (per_batch, per_row) = costs(spec).map_err(super::settings_error)?;
        Ok(Arc::new(FixedCostKernel { per_batch, per_row }))
    }

    /// Nothing: it holds no parameters.
    fn memory_estimate(&self, _spec: &SubmodelSpec) -> Result<u64> {
        Ok(0)
    }
}

struct FixedCostKernel {
    per_batch: Duration,
    per_row: Duration,
}

impl Kernel for FixedCostKernel {
    fn forward(&self, inputs: &Values) -> Result<Values> {
        let started = Instant::now();
        let x =
            inputs.get("x").and_then(Value::as_tensor).ok_or(crate::KernelError::MissingInput { port: "x".into() })?;
        let rows = x.dims().first().copied().unwrap_or(0) as u32;
        let cost = self.per_batch.saturating_add(self.per_row.saturating_mul(rows));
        let until = started + cost;
        if cost > POLL {
            std::thread::sleep(cost - POLL);
        }
        while Instant::now() < until {
            std::thread::yield_now();
        }
        Ok(Values::from([("out".to_string(), Value::Tensor(x.clone()))]))
    }
}
