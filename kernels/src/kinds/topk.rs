//! `topk`: `x` f32[B,N] -> `values` f32[B,K], `indices` u32[B,K]: each row's `params.k`
//! largest values, largest first.

use std::sync::Arc;

use candle_core::Device;
use maas_graphs::{DType, Dim, KindError, PortSpec, PortType, Signature, SubmodelSpec, ty};

use super::tensor;
use crate::error::{CandleContext, KernelError, Result};
use crate::kernel::{Kernel, Kind};
use crate::value::{Value, Values};
use crate::weights::parse_params;

pub(crate) struct TopK;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    k: usize,
}

struct TopKKernel {
    k: usize,
}

fn params(spec: &SubmodelSpec) -> Result<Params, Vec<KindError>> {
    if spec.weights.is_some() {
        return Err(vec![KindError::at("weights", "kind `topk` takes no weights")]);
    }
    let p: Params = parse_params(&spec.params).map_err(|e| vec![e])?;
    if p.k == 0 {
        return Err(vec![KindError::at("params.k", "`k` must be at least 1")]);
    }
    Ok(p)
}

impl Kind for TopK {
    fn name(&self) -> &str {
        "topk"
    }

    fn trivial(&self) -> bool {
        true
    }

    fn signature(&self, spec: &SubmodelSpec) -> Result<Signature, Vec<KindError>> {
        let k = params(spec)?.k;
        let out = |dtype| PortType::tensor(dtype, [Dim::Sym("B".into()), Dim::Fixed(k)]);
        Ok(Signature {
            inputs: vec![PortSpec::new("x", ty("f32[B,N]"))],
            outputs: vec![PortSpec::new("values", out(DType::F32)), PortSpec::new("indices", out(DType::U32))],
        })
    }

    fn load(&self, spec: &SubmodelSpec, _device: &Device) -> Result<Arc<dyn Kernel>> {
        let k = params(spec).map_err(super::settings_error)?.k;
        Ok(Arc::new(TopKKernel { k }))
    }

    /// Nothing: it holds no parameters.
    fn memory_estimate(&self, _spec: &SubmodelSpec) -> Result<u64> {
        Ok(0)
    }
}

impl Kernel for TopKKernel {
    fn forward(&self, inputs: &Values) -> Result<Values> {
        let x = tensor(inputs, "x")?;
        let n = x.dim(1).ctx("topk")?;
        if self.k > n {
            return Err(KernelError::Input {
                port: "x".into(),
                message: format!("k = {} is larger than the row length {n} (shape {:?})", self.k, x.dims()),
            });
        }
        let indices = x.arg_sort_last_dim(false).and_then(|i| i.narrow(1, 0, self.k)).ctx("topk sort")?;
        let values = x.gather(&indices.contiguous().ctx("topk")?, 1).ctx("topk gather")?;
        Ok(Values::from([
            ("values".to_string(), Value::Tensor(values)),
            ("indices".to_string(), Value::Tensor(indices)),
        ]))
    }
}
