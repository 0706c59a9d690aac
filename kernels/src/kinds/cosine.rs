//! `cosine`: `a`, `b` f32[B,D] -> `out` f32[B], the cosine similarity of each pair of rows
//! (norm product at least 1e-8, as `torch.nn.functional.cosine_similarity`).

use std::sync::Arc;

use candle_core::Device;
use maas_graphs::{KindError, PortSpec, Signature, SubmodelSpec, ty};

use super::{out, tensor};
use crate::error::{CandleContext, Result};
use crate::kernel::{Kernel, Kind};
use crate::value::Values;

pub(crate) struct Cosine;

struct CosineKernel;

impl Kind for Cosine {
    fn name(&self) -> &str {
        "cosine"
    }

    fn trivial(&self) -> bool {
        true
    }

    fn signature(&self, spec: &SubmodelSpec) -> Result<Signature, Vec<KindError>> {
        super::no_settings(spec)?;
        Ok(Signature {
            inputs: vec![PortSpec::new("a", ty("f32[B,D]")), PortSpec::new("b", ty("f32[B,D]"))],
            outputs: vec![PortSpec::new("out", ty("f32[B]"))],
        })
    }

    fn load(&self, _spec: &SubmodelSpec, _device: &Device) -> Result<Arc<dyn Kernel>> {
        Ok(Arc::new(CosineKernel))
    }

    /// Nothing: it holds no parameters.
    fn memory_estimate(&self, _spec: &SubmodelSpec) -> Result<u64> {
        Ok(0)
    }
}

impl Kernel for CosineKernel {
    fn forward(&self, inputs: &Values) -> Result<Values> {
        let (a, b) = (tensor(inputs, "a")?, tensor(inputs, "b")?);
        let score = (|| {
            let dot = (a * b)?.sum(1)?;
            let na = a.sqr()?.sum(1)?.sqrt()?;
            let nb = b.sqr()?.sum(1)?.sqrt()?;
            dot / (na * nb)?.clamp(1e-8f32, f32::MAX)?
        })()
        .ctx("cosine")?;
        Ok(out("out", score))
    }
}
