//! `softmax`: `x` f32[B,N] -> `out` f32[B,N], softmax over the last dimension.

use std::sync::Arc;

use candle_core::Device;
use maas_graphs::{KindError, PortSpec, Signature, SubmodelSpec, ty};

use super::{out, tensor};
use crate::error::{CandleContext, Result};
use crate::kernel::{Kernel, Kind};
use crate::value::Values;

pub(crate) struct Softmax;

struct SoftmaxKernel;

impl Kind for Softmax {
    fn name(&self) -> &str {
        "softmax"
    }

    fn trivial(&self) -> bool {
        true
    }

    fn signature(&self, spec: &SubmodelSpec) -> Result<Signature, Vec<KindError>> {
        super::no_settings(spec)?;
        Ok(Signature {
            inputs: vec![PortSpec::new("x", ty("f32[B,N]"))],
            outputs: vec![PortSpec::new("out", ty("f32[B,N]"))],
        })
    }

    fn load(&self, _spec: &SubmodelSpec, _device: &Device) -> Result<Arc<dyn Kernel>> {
        Ok(Arc::new(SoftmaxKernel))
    }

    /// Nothing: it holds no parameters.
    fn memory_estimate(&self, _spec: &SubmodelSpec) -> Result<u64> {
        Ok(0)
    }
}

impl Kernel for SoftmaxKernel {
    fn forward(&self, inputs: &Values) -> Result<Values> {
        let x = tensor(inputs, "x")?;
        // candle's softmax panics on empty rows; a softmax over nothing is nothing.
        if x.elem_count() == 0 {
            return Ok(out("out", x.clone()));
        }
        Ok(out("out", candle_nn::ops::softmax_last_dim(x).ctx("softmax")?))
    }
}
