//! `concat`: `a` f32[B,N], `b` f32[B,M] -> `out` f32[B,_], joined along dimension 1.

use std::sync::Arc;

use candle_core::{Device, Tensor};
use maas_graphs::{KindError, PortSpec, Signature, SubmodelSpec, ty};

use super::{out, tensor};
use crate::error::{CandleContext, Result};
use crate::kernel::{Kernel, Kind};
use crate::value::Values;

pub(crate) struct Concat;

struct ConcatKernel;

impl Kind for Concat {
    fn name(&self) -> &str {
        "concat"
    }

    fn trivial(&self) -> bool {
        true
    }

    fn signature(&self, spec: &SubmodelSpec) -> Result<Signature, Vec<KindError>> {
        super::no_settings(spec)?;
        Ok(Signature {
            inputs: vec![PortSpec::new("a", ty("f32[B,N]")), PortSpec::new("b", ty("f32[B,M]"))],
            outputs: vec![PortSpec::new("out", ty("f32[B,_]"))],
        })
    }

    fn load(&self, _spec: &SubmodelSpec, _device: &Device) -> Result<Arc<dyn Kernel>> {
        Ok(Arc::new(ConcatKernel))
    }

    /// Nothing: it holds no parameters.
    fn memory_estimate(&self, _spec: &SubmodelSpec) -> Result<u64> {
        Ok(0)
    }
}

impl Kernel for ConcatKernel {
    fn forward(&self, inputs: &Values) -> Result<Values> {
        let (a, b) = (tensor(inputs, "a")?, tensor(inputs, "b")?);
        Ok(out("out", Tensor::cat(&[a, b], 1).ctx("concat")?))
    }
}
