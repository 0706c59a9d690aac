//! `tokenizer`: `text` -> `input_ids`, `attention_mask`, `token_type_ids` u32[B,S].
//!
//! A Hugging Face `tokenizers` tokenizer from `params.path` (tokenizer.json). Rows are padded to
//! the longest row of the batch (any fixed padding stored in the file is overridden) and
//! truncated at `params.max_length` tokens (default 256, sentence-transformers' setting for
//! all-MiniLM-L6-v2).

use std::sync::Arc;

use candle_core::{Device, Tensor};
use maas_graphs::{KindError, PortSpec, Signature, SubmodelSpec, ty};
use tokenizers::{PaddingStrategy, Tokenizer, TruncationParams};

use crate::error::{CandleContext, KernelError, Result};
use crate::kernel::{Kernel, Kind};
use crate::value::{Value, Values};
use crate::weights::parse_params;

/// How many times its file's size a decoded tokenizer takes (vocabulary maps, merges, the
/// normalizer and pre-tokenizer state): a generous bound for `tokenizer.json` files.
pub(crate) const DECODED_FACTOR: u64 = 16;

/// Default truncation length.
pub(crate) const DEFAULT_MAX_LENGTH: usize = 256;

pub(crate) struct TokenizerKind;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    path: String,
    max_length: Option<usize>,
}

fn params(spec: &SubmodelSpec) -> Result<(std::path::PathBuf, usize), Vec<KindError>> {
    if spec.weights.is_some() {
        return Err(vec![KindError::at("weights", "kind `tokenizer` takes no weights; give `params.path`")]);
    }
    let p: Params = parse_params(&spec.params).map_err(|e| vec![e])?;
    let path = super::existing_file(spec, "path", &p.path).map_err(|e| vec![e])?;
    match p.max_length.unwrap_or(DEFAULT_MAX_LENGTH) {
        0 => Err(vec![KindError::at("params.max_length", "`max_length` must be at least 1")]),
        n => Ok((path, n)),
    }
}

impl Kind for TokenizerKind {
    fn name(&self) -> &str {
        "tokenizer"
    }

    fn signature(&self, spec: &SubmodelSpec) -> Result<Signature, Vec<KindError>> {
        params(spec)?;
        let ids = |name| PortSpec::new(name, ty("u32[B,S]")).ragged(1, 0.0);
        Ok(Signature {
            inputs: vec![PortSpec::new("text", ty("text"))],
            outputs: vec![ids("input_ids"), ids("attention_mask"), ids("token_type_ids")],
        })
    }

    fn load(&self, spec: &SubmodelSpec, device: &Device) -> Result<Arc<dyn Kernel>> {
        let (path, max_length) = params(spec).map_err(super::settings_error)?;
        let mut tok =
            Tokenizer::from_file(&path).map_err(|e| KernelError::Tokenizer(format!("`{}`: {e}", path.display())))?;
        let mut padding = tok.get_padding().cloned().unwrap_or_default();
        padding.strategy = PaddingStrategy::BatchLongest;
        tok.with_padding(Some(padding));
        tok.with_truncation(Some(TruncationParams { max_length, ..Default::default() }))
            .map_err(|e| KernelError::Tokenizer(e.to_string()))?;
        Ok(Arc::new(TokenizerKernel { tok, device: device.clone() }))
    }

    /// The file's size times [`DECODED_FACTOR`] (its text is read whole and decoded).
    fn memory_estimate(&self, spec: &SubmodelSpec) -> Result<u64> {
        let (path, _) = params(spec).map_err(super::settings_error)?;
        Ok(crate::memory::file_size(&path).saturating_mul(DECODED_FACTOR + 1))
    }
}

struct TokenizerKernel {
    tok: Tokenizer,
    device: Device,
}

impl Kernel for TokenizerKernel {
    fn forward(&self, inputs: &Values) -> Result<Values> {
        let Some(Value::Text(text)) = inputs.get("text") else {
            return Err(KernelError::Input { port: "text".into(), message: "expected text".into() });
        };
        let encodings = self
            .tok
            .encode_batch(text.iter().map(String::as_str).collect::<Vec<_>>(), true)
            .map_err(|e| KernelError::Tokenizer(e.to_string()))?;
        let b = encodings.len();
        let s = encodings.first().map_or(0, |e| e.len());
        let mut ids = Vec::with_capacity(b * s);
        let mut mask = Vec::with_capacity(b * s);
        let mut types = Vec::with_capacity(b * s);
        for e in &encodings {
            ids.extend_from_slice(e.get_ids());
            mask.extend_from_slice(e.get_attention_mask());
            types.extend_from_slice(e.get_type_ids());
        }
        let t = |v: Vec<u32>| Tensor::from_vec(v, (b, s), &self.device).ctx("tokenizer output");
        Ok(Values::from([
            ("input_ids".to_string(), Value::Tensor(t(ids)?)),
            ("attention_mask".to_string(), Value::Tensor(t(mask)?)),
            ("token_type_ids".to_string(), Value::Tensor(t(types)?)),
        ]))
    }
}
