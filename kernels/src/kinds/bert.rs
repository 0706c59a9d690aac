//! `bert`: a BERT-family text encoder (candle-transformers' `BertModel`), e.g.
//! all-MiniLM-L6-v2. `input_ids`, `attention_mask`, optional `token_type_ids` u32[B,S] ->
//! `hidden` f32[B,S,H], with H the config's `hidden_size`.
//!
//! `weights` is the model's safetensors file and `params.config` its `config.json`;
//! `params.dtype` (`f32`, default, `f16` or `bf16`) is the precision it computes in (its output
//! stays f32).
//!
//! Two implementations of the same model:
//! - `params.implementation = "fast"` (the default on CPU in f32): [`fast::FastBert`], the
//!   encoder in a few fused passes over plain buffers; `params.threads`, when set, gives it a
//!   pool of that many threads of its own for its matrix products and attention (unset: the
//!   submodel's stream thread and candle's global pool, `RAYON_NUM_THREADS`).
//! - `"candle"`: candle-transformers' `BertModel` (the default on a GPU and in f16/bf16; on CPU
//!   in f32 it is the reference the fast one is checked and measured against).

mod fast;

use std::sync::Arc;

use candle_core::{Device, Tensor};
use candle_transformers::models::bert::{BertEncoder, BertModel, Config};
use maas_graphs::{DType, Dim, KindError, PortSpec, PortType, Signature, SubmodelSpec, ty};

use super::{out, tensor};
use crate::error::{CandleContext, KernelError, Result};
use crate::kernel::{Kernel, Kind};
use crate::memory::{F32_BYTES, file_size, sum, tensor_bytes};
use crate::value::Values;
use crate::weights::{Weights, parse_params, read_header, read_json};

pub(crate) struct Bert;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    config: String,
    dtype: Option<String>,
    implementation: Option<String>,
    threads: Option<usize>,
}

/// Which implementation computes the encoder (`params.implementation`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Implementation {
    /// Chosen by the device and dtype: `Fast` on CPU in f32, `Candle` otherwise.
    Auto,
    Fast,
    Candle,
}

/// `params.implementation` and `params.threads`, checked against `params.dtype`.
fn implementation(spec: &SubmodelSpec) -> Result<(Implementation, Option<usize>), KindError> {
    let p: Params = parse_params(&spec.params)?;
    let imp = match p.implementation.as_deref() {
        None => Implementation::Auto,
        Some("fast") => Implementation::Fast,
        Some("candle") => Implementation::Candle,
        Some(other) => {
            return Err(KindError::at(
                "params.implementation",
                format!("unknown implementation `{other}`; expected \"fast\" or \"candle\""),
            ));
        }
    };
    if imp == Implementation::Fast && compute_dtype(spec)? != candle_core::DType::F32 {
        return Err(KindError::at(
            "params.implementation",
            "the fast implementation computes in f32 only; use `implementation = \"candle\"` for f16 or bf16",
        ));
    }
    match p.threads {
        Some(0) => Err(KindError::at("params.threads", "`threads` must be at least 1")),
        Some(_) if imp == Implementation::Candle => Err(KindError::at(
            "params.threads",
            "`threads` applies to the fast implementation; candle's follows RAYON_NUM_THREADS",
        )),
        t => Ok((imp, t)),
    }
}

/// The precision the encoder computes in (`params.dtype`): `f32` (default), or `f16` / `bf16`
/// (half the weights' memory, and tensor cores on a GPU; slow on most CPUs).
fn compute_dtype(spec: &SubmodelSpec) -> Result<candle_core::DType, KindError> {
    let p: Params = parse_params(&spec.params)?;
    match p.dtype.as_deref() {
        None | Some("f32") => Ok(candle_core::DType::F32),
        Some("f16") => Ok(candle_core::DType::F16),
        Some("bf16") => Ok(candle_core::DType::BF16),
        Some(other) => Err(KindError::at(
            "params.dtype",
            format!("unknown dtype `{other}`; expected \"f32\", \"f16\" or \"bf16\""),
        )),
    }
}

fn settings(spec: &SubmodelSpec) -> Result<(Config, std::path::PathBuf), Vec<KindError>> {
    let p: Params = parse_params(&spec.params).map_err(|e| vec![e])?;
    compute_dtype(spec).map_err(|e| vec![e])?;
    implementation(spec).map_err(|e| vec![e])?;
    let config_path = super::existing_file(spec, "config", &p.config).map_err(|e| vec![e])?;
    let config: Config = read_json(&config_path).map_err(|e| vec![KindError::at("params.config", e.to_string())])?;
    let weights = super::required_weights(spec).map_err(|e| vec![e])?;
    let header = read_header(&weights).map_err(|e| vec![KindError::at("weights", e.to_string())])?;
    let emb = ["embeddings.word_embeddings.weight", "bert.embeddings.word_embeddings.weight"]
        .iter()
        .find_map(|n| header.get(*n).map(|t| (*n, t)));
    match emb {
        None => Err(vec![KindError::at("weights", format!("`{}` has no BERT word embeddings", weights.display()))]),
        Some((name, t)) if t.shape != [config.vocab_size, config.hidden_size] => Err(vec![KindError::at(
            "weights",
            format!(
                "tensor `{name}` has shape {:?} but the config needs [{}, {}]",
                t.shape, config.vocab_size, config.hidden_size
            ),
        )]),
        Some(_) => Ok((config, weights)),
    }
}

impl Kind for Bert {
    fn name(&self) -> &str {
        "bert"
    }

    fn learnable(&self, _spec: &SubmodelSpec) -> std::result::Result<(), String> {
        Err("kind `bert` cannot learn here: its encoder runs forward only (fine-tune it elsewhere and hot-swap the weights in)".into())
    }

    fn signature(&self, spec: &SubmodelSpec) -> Result<Signature, Vec<KindError>> {
        let (config, _) = settings(spec)?;
        let ids = |name| PortSpec::new(name, ty("u32[B,S]")).ragged(1, 0.0);
        let hidden =
            PortType::tensor(DType::F32, [Dim::Sym("B".into()), Dim::Sym("S".into()), Dim::Fixed(config.hidden_size)]);
        Ok(Signature {
            inputs: vec![ids("input_ids"), ids("attention_mask"), ids("token_type_ids").optional()],
            outputs: vec![PortSpec::new("hidden", hidden).ragged(1, 0.0)],
        })
    }

    fn load(&self, spec: &SubmodelSpec, device: &Device) -> Result<Arc<dyn Kernel>> {
        let (config, path) = settings(spec).map_err(super::settings_error)?;
        let dtype = compute_dtype(spec).map_err(|e| super::settings_error(vec![e]))?;
        let (imp, threads) = implementation(spec).map_err(|e| super::settings_error(vec![e]))?;
        let fast = match imp {
            Implementation::Fast if !device.is_cpu() => {
                return Err(KernelError::Param {
                    key: "params.implementation".into(),
                    message: format!(
                        "the fast implementation runs on CPU only, not on {device:?}; use `implementation = \"candle\"`"
                    ),
                });
            }
            Implementation::Fast => true,
            Implementation::Auto => device.is_cpu() && dtype == candle_core::DType::F32,
            Implementation::Candle => false,
        };
        let weights = Weights::load(&path, device)?;
        let vb = weights.var_builder(dtype, device);
        let corrupt = |e: candle_core::Error| KernelError::Corrupt { path: path.clone(), reason: e.to_string() };
        let model = match dtype {
            _ if fast => Model::Fast(fast::FastBert::load(vb, &config, threads).map_err(corrupt)?),
            candle_core::DType::F32 => Model::Full(BertModel::load(vb, &config).map_err(corrupt)?),
            _ => Model::Half(HalfBert::load(vb, &config, dtype).map_err(corrupt)?),
        };
        Ok(Arc::new(BertKernel {
            model,
            max_positions: config.max_position_embeddings,
            vocab_size: config.vocab_size,
            type_vocab_size: config.type_vocab_size,
        }))
    }

    /// The file read whole, and every tensor of its header as f32 (what the model holds; a
    /// tensor stored as f16 doubles); the fast encoder (on CPU in f32) counts the tensors twice:
    /// it copies the embeddings and builds the stacked QKV weights while the loaded tensors are
    /// still alive (an upper bound of that peak).
    fn memory_estimate(&self, spec: &SubmodelSpec) -> Result<u64> {
        let (_, path) = settings(spec).map_err(super::settings_error)?;
        let header = read_header(&path)?;
        let tensors = sum(header.values().map(|t| tensor_bytes(&t.shape, F32_BYTES)));
        let dtype = compute_dtype(spec).map_err(|e| super::settings_error(vec![e]))?;
        let (imp, _) = implementation(spec).map_err(|e| super::settings_error(vec![e]))?;
        let cpu = spec.device == maas_graphs::DeviceSpec::Cpu;
        let fast =
            imp == Implementation::Fast || (imp == Implementation::Auto && cpu && dtype == candle_core::DType::F32);
        let held = if fast { tensors.saturating_mul(2) } else { tensors };
        Ok(held.saturating_add(file_size(&path)))
    }
}

/// The fast CPU encoder; candle-transformers' model in f32; [`HalfBert`] in f16 and bf16.
enum Model {
    Fast(fast::FastBert),
    Full(BertModel),
    Half(HalfBert),
}

struct BertKernel {
    model: Model,
    max_positions: usize,
    vocab_size: usize,
    type_vocab_size: usize,
}

/// Every id of `port` must be below `limit`; the first that is not is named with its place.
fn ids_below(inputs: &Values, port: &str, limit: usize, noun: &str, limit_name: &str) -> Result<()> {
    let Some(ids) = inputs.get(port).and_then(|v| v.as_tensor()) else { return Ok(()) };
    let rows: Vec<Vec<u32>> = ids.to_vec2().ctx("bert input check")?;
    for (r, row) in rows.iter().enumerate() {
        if let Some((pos, &id)) = row.iter().enumerate().find(|(_, id)| **id as usize >= limit) {
            return Err(KernelError::Input {
                port: port.into(),
                message: format!(
                    "{noun} {id} at row {r}, position {pos} is out of range: the model's {limit_name} is {limit}, so ids must be below {limit}"
                ),
            });
        }
    }
    Ok(())
}

impl Kernel for BertKernel {
    fn check(&self, inputs: &Values) -> Result<()> {
        let ids = tensor(inputs, "input_ids")?;
        let seq = ids.dim(1).ctx("bert")?;
        if seq > self.max_positions {
            return Err(KernelError::Input {
                port: "input_ids".into(),
                message: format!(
                    "sequence length {seq} exceeds the model's maximum of {} positions (shape {:?})",
                    self.max_positions,
                    ids.dims()
                ),
            });
        }
        ids_below(inputs, "input_ids", self.vocab_size, "token id", "vocabulary size")?;
        ids_below(inputs, "token_type_ids", self.type_vocab_size, "token type id", "number of token types")
    }

    fn forward(&self, inputs: &Values) -> Result<Values> {
        let ids = tensor(inputs, "input_ids")?;
        let mask = tensor(inputs, "attention_mask")?;
        let types = match inputs.get("token_type_ids").and_then(|v| v.as_tensor()) {
            Some(t) => t.clone(),
            None => ids.zeros_like().ctx("bert token types")?,
        };
        let hidden = match &self.model {
            Model::Fast(m) => m.forward(ids, &types, mask).ctx("bert forward")?,
            Model::Full(m) => m.forward(ids, &types, Some(mask)).ctx("bert forward")?,
            Model::Half(m) => {
                m.forward(ids, &types, mask).and_then(|h| h.to_dtype(candle_core::DType::F32)).ctx("bert forward")?
            }
        };
        Ok(out("hidden", hidden))
    }
}

/// BERT in f16 or bf16. candle-transformers' `BertModel` builds its attention mask from
/// `f32::MIN`, which is `-inf` in these dtypes, and multiplies it by zero for the tokens kept
/// (NaN everywhere). This runs its public `BertEncoder` with embeddings and a mask built here,
/// using the dtype's own finite minimum. Same weights, same names, same layout.
struct HalfBert {
    word: candle_nn::Embedding,
    position: candle_nn::Embedding,
    token_type: candle_nn::Embedding,
    norm: candle_nn::LayerNorm,
    encoder: BertEncoder,
    dtype: candle_core::DType,
}

impl HalfBert {
    fn load(vb: candle_nn::VarBuilder, config: &Config, dtype: candle_core::DType) -> candle_core::Result<Self> {
        let vb = if vb.contains_tensor("bert.embeddings.word_embeddings.weight") { vb.pp("bert") } else { vb };
        let e = vb.pp("embeddings");
        let h = config.hidden_size;
        Ok(Self {
            word: candle_nn::embedding(config.vocab_size, h, e.pp("word_embeddings"))?,
            position: candle_nn::embedding(config.max_position_embeddings, h, e.pp("position_embeddings"))?,
            token_type: candle_nn::embedding(config.type_vocab_size, h, e.pp("token_type_embeddings"))?,
            norm: candle_nn::layer_norm(h, config.layer_norm_eps, e.pp("LayerNorm"))?,
            encoder: BertEncoder::load(vb.pp("encoder"), config)?,
            dtype,
        })
    }

    fn forward(&self, ids: &Tensor, types: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        use candle_core::Module;
        let (_, seq) = ids.dims2()?;
        let positions = Tensor::arange(0u32, seq as u32, ids.device())?;
        let x = (self.word.forward(ids)? + self.token_type.forward(types)?)?
            .broadcast_add(&self.position.forward(&positions)?)?;
        let x = self.norm.forward(&x)?;
        // [B, S] -> [B, 1, 1, S]: 0 where a token is kept, the dtype's minimum where it is padding.
        let min = match self.dtype {
            candle_core::DType::F16 => -65504.0,
            candle_core::DType::BF16 => -3.389_531_389_251_535_5e38,
            _ => f64::from(f32::MIN),
        };
        let keep = mask.to_dtype(self.dtype)?.unsqueeze(1)?.unsqueeze(1)?;
        let extended = ((keep.ones_like()? - &keep)? * min)?;
        self.encoder.forward(&x, &extended)
    }
}
