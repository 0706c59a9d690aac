//! The built-in kinds, one per file.

pub(crate) mod argmax;
pub(crate) mod bert;
pub(crate) mod concat;
pub(crate) mod cosine;
pub mod digits_cnn;
pub mod fixed_cost;
pub(crate) mod identity;
pub(crate) mod l2_normalize;
pub mod linear;
pub(crate) mod mean_pool;
pub(crate) mod mlp;
pub(crate) mod onnx;
pub(crate) mod softmax;
pub(crate) mod tokenizer;
pub(crate) mod topk;

use std::path::PathBuf;
use std::sync::Arc;

use maas_graphs::{KindError, SubmodelSpec};

use crate::error::{KernelError, Result};
use crate::kernel::Kind;
use crate::value::{Value, Values};

/// Every built-in kind.
pub(crate) fn builtin() -> Vec<Arc<dyn Kind>> {
    vec![
        Arc::new(argmax::Argmax),
        Arc::new(bert::Bert),
        Arc::new(concat::Concat),
        Arc::new(cosine::Cosine),
        Arc::new(digits_cnn::DigitsCnnKind),
        Arc::new(identity::Identity),
        Arc::new(l2_normalize::L2Normalize),
        Arc::new(linear::LinearKind),
        Arc::new(mean_pool::MeanPool),
        Arc::new(mlp::MlpKind),
        Arc::new(onnx::OnnxKind),
        Arc::new(softmax::Softmax),
        Arc::new(tokenizer::TokenizerKind),
        Arc::new(topk::TopK),
    ]
}

/// For kinds without weights or params: reject any that are given.
pub(crate) fn no_settings(spec: &SubmodelSpec) -> Result<(), Vec<KindError>> {
    let mut errs = Vec::new();
    if spec.weights.is_some() {
        errs.push(KindError::at("weights", format!("kind `{}` takes no weights", spec.kind)));
    }
    if let Some(k) = spec.params.keys().next() {
        errs.push(KindError::unknown_param(k, &[]));
    }
    if errs.is_empty() { Ok(()) } else { Err(errs) }
}

/// Turns signature-time errors into a load error.
pub(crate) fn settings_error(mut errs: Vec<KindError>) -> KernelError {
    let first = errs.remove(0);
    KernelError::Param { key: first.key.unwrap_or_else(|| "params".into()), message: first.message }
}

/// An input tensor the signature guarantees.
pub(crate) fn tensor<'a>(inputs: &'a Values, port: &str) -> Result<&'a candle_core::Tensor> {
    match inputs.get(port) {
        Some(Value::Tensor(t)) => Ok(t),
        Some(Value::Text(_)) => {
            Err(KernelError::Input { port: port.into(), message: "expected a tensor, got text".into() })
        }
        None => Err(KernelError::MissingInput { port: port.into() }),
    }
}

/// One named output.
pub(crate) fn out(port: &str, t: candle_core::Tensor) -> Values {
    Values::from([(port.to_string(), Value::Tensor(t))])
}

/// A path param resolved against the graph file, which must be a regular file.
pub(crate) fn existing_file(spec: &SubmodelSpec, key: &str, raw: &str) -> Result<PathBuf, KindError> {
    let p = spec.resolve(raw);
    match maas_graphs::file_problem(&p) {
        None => Ok(p),
        Some(problem) => Err(KindError::at(format!("params.{key}"), format!("file `{}` {problem}", p.display()))),
    }
}

/// The weights file, which this kind requires.
pub(crate) fn required_weights(spec: &SubmodelSpec) -> Result<PathBuf, KindError> {
    spec.weights.clone().ok_or_else(|| KindError::at("weights", format!("kind `{}` needs `weights`", spec.kind)))
}
