//! `mlp`: `x` f32[B,layers[0]] -> `out` f32[B,layers[-1]], dense layers with an activation
//! between them (not after the last).
//!
//! `params.layers = [in, hidden..., out]`, `params.activation = "relu" | "gelu" | "tanh" |
//! "sigmoid"` (default relu). Weights: `layers.{i}.weight` [out,in] and `layers.{i}.bias`, or a
//! seeded random init (`params.seed`) without a file.

use std::sync::Arc;

use candle_core::{Device, Tensor};
use maas_graphs::{DType, Dim, KindError, PortSpec, PortType, Signature, SubmodelSpec};

use super::linear::{Linear, Quantize};
use super::{out, tensor};
use crate::error::{CandleContext, Result};
use crate::kernel::{Kernel, Kind};
use crate::memory::{F32_BYTES, file_size, sum, tensor_bytes};
use crate::value::Values;
use crate::weights::{Weights, parse_params, read_header, seeded_uniform};

pub(crate) struct MlpKind;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    layers: Vec<usize>,
    #[serde(default)]
    activation: Option<String>,
    #[serde(default)]
    seed: Option<u64>,
}

#[derive(Clone, Copy)]
enum Activation {
    Relu,
    Gelu,
    Tanh,
    Sigmoid,
}

impl Activation {
    fn apply(self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Activation::Relu => x.relu(),
            Activation::Gelu => x.gelu_erf(),
            Activation::Tanh => x.tanh(),
            Activation::Sigmoid => candle_nn::ops::sigmoid(x),
        }
    }
}

fn params(spec: &SubmodelSpec) -> Result<(Vec<usize>, Activation, u64), Vec<KindError>> {
    let p: Params = parse_params(&spec.params).map_err(|e| vec![e])?;
    let mut errs = Vec::new();
    if p.layers.len() < 2 || p.layers.contains(&0) {
        errs.push(KindError::at("params.layers", "`layers` lists at least two sizes, [in, ..., out], each at least 1"));
    }
    let act = match p.activation.as_deref().unwrap_or("relu") {
        "relu" => Activation::Relu,
        "gelu" => Activation::Gelu,
        "tanh" => Activation::Tanh,
        "sigmoid" => Activation::Sigmoid,
        other => {
            errs.push(KindError::at(
                "params.activation",
                format!("unknown activation `{other}`; expected relu, gelu, tanh or sigmoid"),
            ));
            Activation::Relu
        }
    };
    if let (Some(path), true) = (&spec.weights, errs.is_empty()) {
        match read_header(path) {
            Err(e) => errs.push(KindError::at("weights", e.to_string())),
            Ok(h) => {
                for (i, w) in p.layers.windows(2).enumerate() {
                    let wanted =
                        [(format!("layers.{i}.weight"), vec![w[1], w[0]]), (format!("layers.{i}.bias"), vec![w[1]])];
                    for (name, shape) in wanted {
                        match h.get(&name) {
                            None => errs
                                .push(KindError::at("weights", format!("`{}` has no tensor `{name}`", path.display()))),
                            Some(t) if t.shape != shape => errs.push(KindError::at(
                                "weights",
                                format!("tensor `{name}` has shape {:?}, but `layers` needs {shape:?}", t.shape),
                            )),
                            Some(_) => {}
                        }
                    }
                }
            }
        }
    }
    if errs.is_empty() { Ok((p.layers, act, p.seed.unwrap_or(0))) } else { Err(errs) }
}

impl Kind for MlpKind {
    fn name(&self) -> &str {
        "mlp"
    }

    fn learnable(&self, _spec: &SubmodelSpec) -> std::result::Result<(), String> {
        Ok(())
    }

    fn signature(&self, spec: &SubmodelSpec) -> Result<Signature, Vec<KindError>> {
        let (layers, _, _) = params(spec)?;
        let t = |n| PortType::tensor(DType::F32, [Dim::Sym("B".into()), Dim::Fixed(n)]);
        Ok(Signature {
            inputs: vec![PortSpec::new("x", t(layers[0]))],
            outputs: vec![PortSpec::new("out", t(*layers.last().expect("checked: at least two")))],
        })
    }

    fn load(&self, spec: &SubmodelSpec, device: &Device) -> Result<Arc<dyn Kernel>> {
        let (sizes, activation, seed) = params(spec).map_err(super::settings_error)?;
        let weights = spec.weights.as_ref().map(|p| Weights::load(p, device)).transpose()?;
        let mut layers = Vec::new();
        for (i, w) in sizes.windows(2).enumerate() {
            let (input, output) = (w[0], w[1]);
            let (weight, bias) = match &weights {
                Some(ws) => (
                    ws.get(&format!("layers.{i}.weight"), &[output, input])?,
                    Some(ws.get(&format!("layers.{i}.bias"), &[output])?),
                ),
                None => {
                    let bound = 1.0 / (input as f32).sqrt();
                    let s = seed.wrapping_add(2 * i as u64);
                    (
                        seeded_uniform(&[output, input], bound, s, device)?,
                        Some(seeded_uniform(&[output], bound, s + 1, device)?),
                    )
                }
            };
            layers.push(Linear::new(weight, bias, Quantize::None)?);
        }
        Ok(Arc::new(Mlp { layers, activation }))
    }

    /// The file read whole, every layer's weight and bias as f32, and the transposed copy of
    /// each weight the layers keep.
    fn memory_estimate(&self, spec: &SubmodelSpec) -> Result<u64> {
        let (sizes, _, _) = params(spec).map_err(super::settings_error)?;
        let layers = sizes.windows(2).map(|w| {
            let (input, output) = (w[0], w[1]);
            let weight = tensor_bytes(&[output, input], F32_BYTES);
            sum([weight, weight, tensor_bytes(&[output], F32_BYTES)])
        });
        Ok(sum(layers).saturating_add(spec.weights.as_deref().map_or(0, file_size)))
    }
}

struct Mlp {
    layers: Vec<Linear>,
    activation: Activation,
}

impl Kernel for Mlp {
    fn forward(&self, inputs: &Values) -> Result<Values> {
        let mut x = tensor(inputs, "x")?.contiguous().ctx("mlp input")?;
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(&x)?;
            if i + 1 < self.layers.len() {
                x = self.activation.apply(&x).ctx("mlp activation")?;
            }
        }
        Ok(out("out", x))
    }
}
