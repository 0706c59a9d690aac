//! `mean_pool`: masked mean over the sequence, as sentence-transformers pools token embeddings.
//! `hidden` f32[B,S,H], `mask` u32[B,S] -> `out` f32[B,H]; padded positions (mask 0) are
//! ignored, and a row whose mask is all zero gives zeros.

use std::sync::Arc;

use candle_core::{DType, Device};
use maas_graphs::{KindError, PortSpec, Signature, SubmodelSpec, ty};

use super::{out, tensor};
use crate::error::{CandleContext, Result};
use crate::kernel::{Kernel, Kind};
use crate::value::Values;

pub(crate) struct MeanPool;

struct MeanPoolKernel;

impl Kind for MeanPool {
    fn name(&self) -> &str {
        "mean_pool"
    }

    fn trivial(&self) -> bool {
        true
    }

    fn signature(&self, spec: &SubmodelSpec) -> Result<Signature, Vec<KindError>> {
        super::no_settings(spec)?;
        Ok(Signature {
            inputs: vec![
                PortSpec::new("hidden", ty("f32[B,S,H]")).ragged(1, 0.0),
                PortSpec::new("mask", ty("u32[B,S]")).ragged(1, 0.0),
            ],
            outputs: vec![PortSpec::new("out", ty("f32[B,H]"))],
        })
    }

    fn load(&self, _spec: &SubmodelSpec, _device: &Device) -> Result<Arc<dyn Kernel>> {
        Ok(Arc::new(MeanPoolKernel))
    }

    /// Nothing: it holds no parameters.
    fn memory_estimate(&self, _spec: &SubmodelSpec) -> Result<u64> {
        Ok(0)
    }
}

impl Kernel for MeanPoolKernel {
    fn forward(&self, inputs: &Values) -> Result<Values> {
        let hidden = tensor(inputs, "hidden")?;
        let mask = tensor(inputs, "mask")?.to_dtype(DType::F32).ctx("mean_pool mask")?.unsqueeze(2).ctx("mean_pool")?;
        let summed = hidden.broadcast_mul(&mask).and_then(|t| t.sum(1)).ctx("mean_pool sum")?;
        let counts = mask.sum(1).and_then(|c| c.clamp(1e-9f32, f32::MAX)).ctx("mean_pool count")?;
        Ok(out("out", summed.broadcast_div(&counts).ctx("mean_pool div")?))
    }
}
