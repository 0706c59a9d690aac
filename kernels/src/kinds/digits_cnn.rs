//! `digits_cnn`: a small convolutional feature extractor for 8x8 digit images.
//! `x: f32[B,64]` (pixels 0..16, row-major) -> `features: f32[B,F]`.
//!
//! `x/16 -> [B,1,8,8]` -> conv3x3(16) -> relu -> conv3x3(32) -> relu -> maxpool2 -> flatten(512)
//! -> linear(F) -> relu. Weights: `conv1.*`, `conv2.*`, `fc.*` (F from `fc.weight`), or a seeded
//! random init with `params = { features, seed }`.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType as CDType, Device, Module, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, VarBuilder};
use maas_graphs::{DType, Dim, KindError, PortSpec, PortType, Signature, SubmodelSpec, ty};

use super::{out, tensor};
use crate::error::{CandleContext, Result};
use crate::kernel::{Kernel, Kind};
use crate::memory::{F32_BYTES, file_size, sum, tensor_bytes};
use crate::value::Values;
use crate::weights::{Weights, parse_params, read_header, seeded_uniform};

/// Pixels per image (8x8).
pub const PIXELS: usize = 64;
/// Flattened size after the convolutions and pooling (32 channels x 4 x 4).
pub const FLAT: usize = 32 * 4 * 4;
/// Feature size of the seeded init when `params.features` is not given.
pub const DEFAULT_FEATURES: usize = 64;

/// The tensors of a `digits_cnn` weights file and their shapes.
pub fn tensor_shapes(features: usize) -> Vec<(&'static str, Vec<usize>)> {
    vec![
        ("conv1.weight", vec![16, 1, 3, 3]),
        ("conv1.bias", vec![16]),
        ("conv2.weight", vec![32, 16, 3, 3]),
        ("conv2.bias", vec![32]),
        ("fc.weight", vec![features, FLAT]),
        ("fc.bias", vec![features]),
    ]
}

/// The network, candle-nn style: `new(vb, features)` then `forward`. The trainer builds it on a
/// `VarMap` and the kernel on loaded weights, so both run the same code.
pub struct DigitsCnn {
    conv1: Conv2d,
    conv2: Conv2d,
    fc: candle_nn::Linear,
}

impl DigitsCnn {
    /// Builds the network from `vb` (names as in [`tensor_shapes`]).
    pub fn new(vb: VarBuilder, features: usize) -> candle_core::Result<Self> {
        let cfg = Conv2dConfig { padding: 1, ..Default::default() };
        Ok(Self {
            conv1: candle_nn::conv2d(1, 16, 3, cfg, vb.pp("conv1"))?,
            conv2: candle_nn::conv2d(16, 32, 3, cfg, vb.pp("conv2"))?,
            fc: candle_nn::linear(FLAT, features, vb.pp("fc"))?,
        })
    }

    /// `x: [B,64]` pixels 0..16 -> features `[B,F]`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let b = x.dim(0)?;
        let x = (x / 16.0)?.reshape((b, 1, 8, 8))?;
        let x = self.conv1.forward(&x)?.relu()?;
        let x = self.conv2.forward(&x)?.relu()?;
        // The 2x2 max-pool as a reshape and two maxima: the same values as `max_pool2d(2)`, and a
        // gradient that reaches each window's maximum whole (candle 0.11's `max_pool2d` backward
        // scales it by the share of maxima in the window, 1/4; found by the finite-difference
        // test in maas-train).
        let (b, c, h, w) = x.dims4()?;
        let x = x.reshape((b, c, h / 2, 2, w / 2, 2))?.max(5)?.max(3)?;
        self.fc.forward(&x.flatten_from(1)?)?.relu()
    }
}

pub(crate) struct DigitsCnnKind;

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Params {
    features: Option<usize>,
    seed: Option<u64>,
}

fn features(spec: &SubmodelSpec) -> Result<(usize, u64), Vec<KindError>> {
    let p: Params = parse_params(&spec.params).map_err(|e| vec![e])?;
    let seed = p.seed.unwrap_or(0);
    match &spec.weights {
        None => match p.features.unwrap_or(DEFAULT_FEATURES) {
            0 => Err(vec![KindError::at("params.features", "`features` must be at least 1")]),
            f => Ok((f, seed)),
        },
        Some(path) => {
            let h = read_header(path).map_err(|e| vec![KindError::at("weights", e.to_string())])?;
            let f = match h.get("fc.weight").map(|t| t.shape.as_slice()) {
                Some(&[f, FLAT]) => f,
                Some(s) => {
                    return Err(vec![KindError::at(
                        "weights",
                        format!("tensor `fc.weight` has shape {s:?}, expected [F, {FLAT}]"),
                    )]);
                }
                None => {
                    return Err(vec![KindError::at(
                        "weights",
                        format!("`{}` has no tensor `fc.weight`", path.display()),
                    )]);
                }
            };
            if let Some(want) = p.features.filter(|&w| w != f) {
                return Err(vec![KindError::at(
                    "params.features",
                    format!("`features = {want}` but the weights give {f}"),
                )]);
            }
            let mut errs = Vec::new();
            for (name, shape) in tensor_shapes(f) {
                match h.get(name) {
                    None => errs.push(KindError::at("weights", format!("`{}` has no tensor `{name}`", path.display()))),
                    Some(t) if t.shape != shape => errs.push(KindError::at(
                        "weights",
                        format!("tensor `{name}` has shape {:?}, expected {shape:?}", t.shape),
                    )),
                    Some(_) => {}
                }
            }
            if errs.is_empty() { Ok((f, seed)) } else { Err(errs) }
        }
    }
}

impl Kind for DigitsCnnKind {
    fn name(&self) -> &str {
        "digits_cnn"
    }

    fn learnable(&self, _spec: &SubmodelSpec) -> std::result::Result<(), String> {
        Ok(())
    }

    fn signature(&self, spec: &SubmodelSpec) -> Result<Signature, Vec<KindError>> {
        let (f, _) = features(spec)?;
        Ok(Signature {
            inputs: vec![PortSpec::new("x", ty("f32[B,64]"))],
            outputs: vec![PortSpec::new(
                "features",
                PortType::tensor(DType::F32, [Dim::Sym("B".into()), Dim::Fixed(f)]),
            )],
        })
    }

    fn load(&self, spec: &SubmodelSpec, device: &Device) -> Result<Arc<dyn Kernel>> {
        let (f, seed) = features(spec).map_err(super::settings_error)?;
        let mut tensors = HashMap::new();
        match &spec.weights {
            Some(path) => {
                let w = Weights::load(path, device)?;
                for (name, shape) in tensor_shapes(f) {
                    tensors.insert(name.to_string(), w.get(name, &shape)?);
                }
            }
            None => {
                for (i, (name, shape)) in tensor_shapes(f).into_iter().enumerate() {
                    let fan_in: usize = if shape.len() > 1 { shape[1..].iter().product() } else { shape[0] };
                    let bound = 1.0 / (fan_in as f32).sqrt();
                    tensors
                        .insert(name.to_string(), seeded_uniform(&shape, bound, seed.wrapping_add(i as u64), device)?);
                }
            }
        }
        let vb = VarBuilder::from_tensors(tensors, CDType::F32, device);
        Ok(Arc::new(DigitsCnnKernel(DigitsCnn::new(vb, f).ctx("digits_cnn load")?)))
    }

    /// The file read whole and twice its tensors as f32 (loaded, and the copies the layers
    /// may make).
    fn memory_estimate(&self, spec: &SubmodelSpec) -> Result<u64> {
        let (f, _) = features(spec).map_err(super::settings_error)?;
        let tensors = sum(tensor_shapes(f).iter().map(|(_, shape)| tensor_bytes(shape, F32_BYTES)));
        Ok(sum([tensors, tensors, spec.weights.as_deref().map_or(0, file_size)]))
    }
}

struct DigitsCnnKernel(DigitsCnn);

impl Kernel for DigitsCnnKernel {
    fn forward(&self, inputs: &Values) -> Result<Values> {
        let x = tensor(inputs, "x")?;
        Ok(out("features", self.0.forward(x).ctx("digits_cnn")?))
    }
}
