//! `linear`: `x: f32[B,in]` -> `out: f32[B,out]` = x·Wᵀ + b.
//!
//! Weights come from a safetensors file (`weight: [out,in]`, optional `bias: [out]`) or, without
//! a file, from a seeded random init (`params = { in, out, seed }`). `params.quantize = "q8_0"`
//! or `"q4k"` keeps the weight quantized (candle `QMatMul`); q8_0 needs `in` divisible by 32,
//! q4k by 256.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use maas_graphs::{DType, Dim, KindError, PortSpec, PortType, Signature, SubmodelSpec};

use super::{out, tensor};
use crate::error::{CandleContext, KernelError, Result};
use crate::kernel::{Kernel, Kind};
use crate::memory::{F32_BYTES, block_bytes, file_size, sum, tensor_bytes};
use crate::value::Values;
use crate::weights::{Weights, parse_params, read_header, seeded_uniform};

pub(crate) struct LinearKind;

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Params {
    #[serde(rename = "in")]
    input: Option<usize>,
    #[serde(rename = "out")]
    output: Option<usize>,
    seed: Option<u64>,
    quantize: Option<String>,
}

/// How a linear layer's weight is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quantize {
    /// Full f32.
    None,
    /// ggml q8_0 (blocks of 32).
    Q8_0,
    /// ggml q4k (blocks of 256).
    Q4K,
}

impl Quantize {
    fn parse(s: Option<&str>) -> Result<Self, KindError> {
        match s {
            None | Some("f32") | Some("none") => Ok(Quantize::None),
            Some("q8_0") => Ok(Quantize::Q8_0),
            Some("q4k") => Ok(Quantize::Q4K),
            Some(other) => Err(KindError::at(
                "params.quantize",
                format!("unknown quantization `{other}`; expected \"q8_0\" or \"q4k\""),
            )),
        }
    }

    /// Bytes of an `[out, in]` weight stored this way.
    fn stored_bytes(self, output: usize, input: usize) -> u64 {
        let numel = crate::memory::tensor_bytes(&[output, input], 1);
        match self.block() {
            None => numel.saturating_mul(F32_BYTES),
            Some((dtype, _)) => block_bytes(numel, dtype.block_size() as u64, dtype.type_size() as u64),
        }
    }

    fn block(self) -> Option<(GgmlDType, usize)> {
        match self {
            Quantize::None => None,
            Quantize::Q8_0 => Some((GgmlDType::Q8_0, 32)),
            Quantize::Q4K => Some((GgmlDType::Q4K, 256)),
        }
    }
}

/// The resolved shape of a linear submodel.
struct Plan {
    input: usize,
    output: usize,
    seed: u64,
    quantize: Quantize,
}

fn plan(spec: &SubmodelSpec) -> Result<Plan, Vec<KindError>> {
    let p: Params = parse_params(&spec.params).map_err(|e| vec![e])?;
    let quantize = Quantize::parse(p.quantize.as_deref()).map_err(|e| vec![e])?;
    let (input, output) = match &spec.weights {
        Some(path) => {
            let header = read_header(path).map_err(|e| vec![KindError::at("weights", e.to_string())])?;
            let w = header.get("weight").ok_or_else(|| {
                vec![KindError::at("weights", format!("`{}` has no tensor `weight` ([out, in])", path.display()))]
            })?;
            let [o, i] = w.shape[..] else {
                return Err(vec![KindError::at(
                    "weights",
                    format!("tensor `weight` has shape {:?}, expected [out, in]", w.shape),
                )]);
            };
            if let Some(b) = header.get("bias")
                && b.shape != [o]
            {
                return Err(vec![KindError::at(
                    "weights",
                    format!("tensor `bias` has shape {:?}, expected [{o}]", b.shape),
                )]);
            }
            let mut errs = Vec::new();
            if let Some(want) = p.input.filter(|&x| x != i) {
                errs.push(KindError::at("params.in", format!("`in = {want}` but the weights take {i} inputs")));
            }
            if let Some(want) = p.output.filter(|&x| x != o) {
                errs.push(KindError::at("params.out", format!("`out = {want}` but the weights give {o} outputs")));
            }
            if !errs.is_empty() {
                return Err(errs);
            }
            (i, o)
        }
        None => match (p.input, p.output) {
            (Some(i), Some(o)) if i > 0 && o > 0 => (i, o),
            (Some(_), Some(_)) => return Err(vec![KindError::at("params", "`in` and `out` must be at least 1")]),
            _ => {
                return Err(vec![KindError::at(
                    "params",
                    "without `weights`, `linear` needs `params.in` and `params.out` (and optionally `seed`)",
                )]);
            }
        },
    };
    if let Some((_, block)) = quantize.block()
        && input % block != 0
    {
        return Err(vec![KindError::at(
            "params.quantize",
            format!(
                "{} needs the input size to be a multiple of {block}, but it is {input}",
                p.quantize.unwrap_or_default()
            ),
        )]);
    }
    Ok(Plan { input, output, seed: p.seed.unwrap_or(0), quantize })
}

impl Kind for LinearKind {
    fn name(&self) -> &str {
        "linear"
    }

    /// In f32 only: a quantized weight is blocks of integers that have no gradient.
    fn learnable(&self, spec: &SubmodelSpec) -> std::result::Result<(), String> {
        match spec.params.get("quantize").and_then(|v| v.as_str()) {
            Some(q) => Err(format!(
                "a quantized `linear` ({q}) cannot learn: its weight is blocks of integers; train it in f32, then quantize"
            )),
            None => Ok(()),
        }
    }

    fn signature(&self, spec: &SubmodelSpec) -> Result<Signature, Vec<KindError>> {
        let p = plan(spec)?;
        let t = |n| PortType::tensor(DType::F32, [Dim::Sym("B".into()), Dim::Fixed(n)]);
        Ok(Signature { inputs: vec![PortSpec::new("x", t(p.input))], outputs: vec![PortSpec::new("out", t(p.output))] })
    }

    fn load(&self, spec: &SubmodelSpec, device: &Device) -> Result<Arc<dyn Kernel>> {
        let p = plan(spec).map_err(super::settings_error)?;
        let (weight, bias) = match &spec.weights {
            Some(path) => {
                let w = Weights::load(path, device)?;
                let weight = w.get("weight", &[p.output, p.input])?;
                let bias = if w.contains("bias") { Some(w.get("bias", &[p.output])?) } else { None };
                (weight, bias)
            }
            None => {
                let bound = 1.0 / (p.input as f32).sqrt();
                let weight = seeded_uniform(&[p.output, p.input], bound, p.seed, device)?;
                let bias = seeded_uniform(&[p.output], bound, p.seed.wrapping_add(1), device)?;
                (weight, Some(bias))
            }
        };
        Ok(Arc::new(Linear::new(weight, bias, p.quantize)?))
    }

    /// The file read whole (while its tensors are decoded), the weight and bias as f32, and
    /// the copy the layer keeps (the transposed weight, or its quantized blocks).
    fn memory_estimate(&self, spec: &SubmodelSpec) -> Result<u64> {
        let p = plan(spec).map_err(super::settings_error)?;
        let weight = tensor_bytes(&[p.output, p.input], F32_BYTES);
        let bias = tensor_bytes(&[p.output], F32_BYTES);
        let file = spec.weights.as_deref().map_or(0, file_size);
        Ok(sum([file, weight, bias, p.quantize.stored_bytes(p.output, p.input), bias]))
    }
}

/// A dense layer, f32 or quantized. Public so that benchmarks and training use the same code.
pub struct Linear {
    matmul: Matmul,
    bias: Option<Tensor>,
}

enum Matmul {
    F32(Tensor),
    Quantized(QMatMul),
}

impl Linear {
    /// A layer from `weight: [out,in]` and an optional `bias: [out]`, in any float dtype
    /// (computed in f32).
    pub fn new(weight: Tensor, bias: Option<Tensor>, quantize: Quantize) -> Result<Self> {
        let weight = weight.to_dtype(candle_core::DType::F32).ctx("linear weight dtype")?;
        let bias = bias.map(|b| b.to_dtype(candle_core::DType::F32)).transpose().ctx("linear bias dtype")?;
        let matmul = match quantize.block() {
            None => Matmul::F32(weight.t().and_then(|w| w.contiguous()).ctx("linear weight")?),
            Some((dtype, _)) => {
                let q = QTensor::quantize(&weight, dtype).ctx("linear quantize")?;
                Matmul::Quantized(QMatMul::from_qtensor(q).ctx("linear quantize")?)
            }
        };
        Ok(Self { matmul, bias })
    }

    /// `x: [B,in]` -> `[B,out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.matmul {
            Matmul::F32(wt) => x.matmul(wt).ctx("linear matmul")?,
            Matmul::Quantized(q) => q.forward(x).ctx("linear qmatmul")?,
        };
        match &self.bias {
            Some(b) => y.broadcast_add(b).ctx("linear bias"),
            None => Ok(y),
        }
    }
}

impl Kernel for Linear {
    fn forward(&self, inputs: &Values) -> Result<Values> {
        let x = tensor(inputs, "x")?;
        let x = x.contiguous().map_err(|source| KernelError::Candle { op: "linear input", source })?;
        Ok(out("out", Linear::forward(self, &x)?))
    }
}
