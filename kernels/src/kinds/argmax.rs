//! `argmax`: `x` f32[B,N] -> `out` u32[B], the index of each row's largest value.

use std::sync::Arc;

use candle_core::{D, DType, Device, Tensor};
use maas_graphs::{KindError, PortSpec, Signature, SubmodelSpec, ty};

use super::{out, tensor};
use crate::error::{CandleContext, KernelError, Result};
use crate::kernel::{Kernel, Kind};
use crate::value::Values;

pub(crate) struct Argmax;

struct ArgmaxKernel;

impl Kind for Argmax {
    fn name(&self) -> &str {
        "argmax"
    }

    fn trivial(&self) -> bool {
        true
    }

    fn signature(&self, spec: &SubmodelSpec) -> Result<Signature, Vec<KindError>> {
        super::no_settings(spec)?;
        Ok(Signature {
            inputs: vec![PortSpec::new("x", ty("f32[B,N]"))],
            outputs: vec![PortSpec::new("out", ty("u32[B]"))],
        })
    }

    fn load(&self, _spec: &SubmodelSpec, _device: &Device) -> Result<Arc<dyn Kernel>> {
        Ok(Arc::new(ArgmaxKernel))
    }

    /// Nothing: it holds no parameters.
    fn memory_estimate(&self, _spec: &SubmodelSpec) -> Result<u64> {
        Ok(0)
    }
}

impl Kernel for ArgmaxKernel {
    fn forward(&self, inputs: &Values) -> Result<Values> {
        let x = tensor(inputs, "x")?;
        let (b, n) = x.dims2().ctx("argmax")?;
        if b == 0 {
            return Ok(out("out", Tensor::zeros(0, DType::U32, x.device()).ctx("argmax")?));
        }
        if n == 0 {
            return Err(KernelError::Input {
                port: "x".into(),
                message: format!("rows are empty (shape {:?}): no largest value", x.dims()),
            });
        }
        Ok(out("out", x.argmax(D::Minus1).ctx("argmax")?))
    }
}
