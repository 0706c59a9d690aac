//! `l2_normalize`: `x` f32[B,D] -> `out` f32[B,D], each row divided by its L2 norm
//! (at least 1e-12, as `torch.nn.functional.normalize`).

use std::sync::Arc;

use candle_core::Device;
use maas_graphs::{KindError, PortSpec, Signature, SubmodelSpec, ty};

use super::{out, tensor};
use crate::error::{CandleContext, Result};
use crate::kernel::{Kernel, Kind};
use crate::value::Values;

pub(crate) struct L2Normalize;

struct L2NormalizeKernel;

impl Kind for L2Normalize {
    fn name(&self) -> &str {
        "l2_normalize"
    }

    fn trivial(&self) -> bool {
        true
    }

    fn signature(&self, spec: &SubmodelSpec) -> Result<Signature, Vec<KindError>> {
        super::no_settings(spec)?;
        Ok(Signature {
            inputs: vec![PortSpec::new("x", ty("f32[B,D]"))],
            outputs: vec![PortSpec::new("out", ty("f32[B,D]"))],
        })
    }

    fn load(&self, _spec: &SubmodelSpec, _device: &Device) -> Result<Arc<dyn Kernel>> {
        Ok(Arc::new(L2NormalizeKernel))
    }

    /// Nothing: it holds no parameters.
    fn memory_estimate(&self, _spec: &SubmodelSpec) -> Result<u64> {
        Ok(0)
    }
}

/// Row-wise L2 norms of a [B,D] tensor, as [B,1], at least `eps`.
pub(crate) fn row_norms(x: &candle_core::Tensor, eps: f32) -> candle_core::Result<candle_core::Tensor> {
    x.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(eps, f32::MAX)
}

impl Kernel for L2NormalizeKernel {
    fn forward(&self, inputs: &Values) -> Result<Values> {
        let x = tensor(inputs, "x")?;
        let norms = row_norms(x, 1e-12).ctx("l2_normalize norm")?;
        Ok(out("out", x.broadcast_div(&norms).ctx("l2_normalize div")?))
    }
}
