//! `onnx`: any ONNX model as a submodel, run by ONNX Runtime (the `ort` crate, loading the
//! runtime's shared library at run time: nothing is linked or downloaded at build time).
//!
//! ```toml
//! [submodels.encoder]
//! kind = "onnx"
//! weights = "model.onnx"                  # the model file
//! params = { runtime = "libonnxruntime.so", threads = 1, u32_inputs = ["input_ids"], ragged = ["sequence"] }
//! ```
//!
//! The signature comes from the model's declared inputs and outputs: names, element types
//! (`float` f32, `double` f64, `int64` i64, `uint8` u8, `uint32` u32) and dimensions (the first
//! dynamic dimension is the batch `B`, other dynamic ones keep the model's symbol, or `_`).
//! `params`:
//! - `runtime`: ONNX Runtime's shared library (one per process: every `onnx` submodel must name
//!   the same file);
//! - `threads`: intra-op threads of the session (default 1);
//! - `u32_inputs`: `int64` inputs declared `u32` and widened when run (token ids from the
//!   `tokenizer` kind);
//! - `ragged`: symbolic dimensions that rows of a batch may differ in (padded with zeros, and
//!   trimmed back on the outputs), such as a sequence length.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::{DType as CDType, Device, Tensor};
use maas_graphs::{DType, Dim, KindError, PortSpec, PortType, Signature, SubmodelSpec};
use ort::session::Session;
use ort::value::{TensorElementType, ValueType};

use crate::error::{CandleContext, KernelError, Result};
use crate::kernel::{Kernel, Kind};
use crate::value::{Value, Values};
use crate::weights::parse_params;

pub(crate) struct OnnxKind;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    runtime: String,
    threads: Option<usize>,
    #[serde(default)]
    u32_inputs: Vec<String>,
    #[serde(default)]
    ragged: Vec<String>,
}

/// The runtime loaded in this process (ONNX Runtime allows one environment per process).
static RUNTIME: OnceLock<std::result::Result<(PathBuf, ort::environment::Environment), String>> = OnceLock::new();

/// The environment of the runtime at `path`, loading it on first use.
fn environment(path: &Path) -> std::result::Result<ort::environment::Environment, String> {
    let loaded = RUNTIME.get_or_init(|| {
        let env = ort::init_from(path)
            .map_err(|e| e.to_string())
            .and_then(|b| b.with_name("maas").build().map_err(|e| e.to_string()));
        env.map(|e| (path.to_path_buf(), e))
            .map_err(|e| format!("could not load ONNX Runtime from `{}`: {e}", path.display()))
    });
    match loaded {
        Ok((p, env)) if same_file(p, path) => Ok(env.clone()),
        Ok((p, _)) => Err(format!(
            "ONNX Runtime is already loaded from `{}` in this process; every onnx submodel must name the same `runtime`",
            p.display()
        )),
        Err(e) => Err(e.clone()),
    }
}

fn same_file(a: &Path, b: &Path) -> bool {
    a == b || std::fs::canonicalize(a).ok().is_some_and(|x| std::fs::canonicalize(b).ok().is_some_and(|y| x == y))
}

/// What a submodel's settings name, checked.
struct Settings {
    model: PathBuf,
    runtime: PathBuf,
    threads: usize,
    u32_inputs: Vec<String>,
    ragged: Vec<String>,
}

fn settings(spec: &SubmodelSpec) -> std::result::Result<Settings, Vec<KindError>> {
    let p: Params = parse_params(&spec.params).map_err(|e| vec![e])?;
    let model = super::required_weights(spec).map_err(|e| vec![e])?;
    let runtime = super::existing_file(spec, "runtime", &p.runtime).map_err(|e| vec![e])?;
    let threads = p.threads.unwrap_or(1);
    if threads == 0 {
        return Err(vec![KindError::at("params.threads", "`threads` must be at least 1")]);
    }
    Ok(Settings { model, runtime, threads, u32_inputs: p.u32_inputs, ragged: p.ragged })
}

fn session(s: &Settings) -> std::result::Result<Session, String> {
    let env = environment(&s.runtime)?;
    let mut builder = Session::builder(&env)
        .map_err(|e| e.to_string())?
        .with_intra_threads(s.threads)
        .map_err(|e| e.to_string())?
        .with_inter_threads(1)
        .map_err(|e| e.to_string())?;
    builder
        .commit_from_file(&s.model)
        .map_err(|e| format!("`{}` is not a model ONNX Runtime can load: {e}", s.model.display()))
}

/// A model input or output as a port: its type and which dimensions are ragged.
fn port(name: &str, ty: &ValueType, s: &Settings, input: bool) -> std::result::Result<PortSpec, String> {
    let ValueType::Tensor { ty, shape, dimension_symbols } = ty else {
        return Err(format!("`{name}` is not a tensor ({ty:?}); only tensors are served"));
    };
    let widened = input && s.u32_inputs.iter().any(|n| n == name);
    let dtype = match ty {
        TensorElementType::Float32 => DType::F32,
        TensorElementType::Float64 => DType::F64,
        TensorElementType::Int64 if widened => DType::U32,
        TensorElementType::Int64 => DType::I64,
        TensorElementType::Uint8 => DType::U8,
        TensorElementType::Uint32 => DType::U32,
        other => {
            return Err(format!(
                "`{name}` has element type {other:?}; served are float, double, int64, uint8 and uint32"
            ));
        }
    };
    if widened && *ty != TensorElementType::Int64 {
        return Err(format!("`{name}` is in `u32_inputs` but its element type is {ty:?}, not int64"));
    }
    let mut ragged = Vec::new();
    let dims: Vec<Dim> = shape
        .iter()
        .enumerate()
        .map(|(i, &d)| {
            let symbol = dimension_symbols.get(i).map(String::as_str).unwrap_or_default();
            if s.ragged.iter().any(|r| r == symbol) && i > 0 {
                ragged.push(i);
            }
            match (i, d) {
                (0, _) if d < 0 => Dim::Sym(maas_graphs::BATCH.into()),
                (_, d) if d >= 0 => Dim::Fixed(d as usize),
                _ if !symbol.is_empty() => Dim::Sym(symbol.to_string()),
                _ => Dim::Any,
            }
        })
        .collect();
    if dims.first() != Some(&Dim::Sym(maas_graphs::BATCH.into())) {
        return Err(format!("`{name}` has no dynamic first (batch) dimension: shape {:?}", &shape[..]));
    }
    let mut spec = PortSpec::new(name, PortType::tensor(dtype, dims));
    for dim in ragged {
        spec = spec.ragged(dim, 0.0);
    }
    Ok(spec)
}

fn signature_of(session: &Session, s: &Settings) -> std::result::Result<Signature, Vec<KindError>> {
    let err = |e: String| vec![KindError::at("weights", e)];
    let inputs =
        session.inputs().iter().map(|o| port(o.name(), o.dtype(), s, true)).collect::<std::result::Result<_, _>>();
    let outputs =
        session.outputs().iter().map(|o| port(o.name(), o.dtype(), s, false)).collect::<std::result::Result<_, _>>();
    let (inputs, outputs): (Vec<PortSpec>, Vec<PortSpec>) = (inputs.map_err(err)?, outputs.map_err(err)?);
    for name in &s.u32_inputs {
        if !inputs.iter().any(|p| &p.name == name) {
            return Err(vec![KindError::at("params.u32_inputs", format!("the model has no input `{name}`"))]);
        }
    }
    Ok(Signature { inputs, outputs })
}

impl Kind for OnnxKind {
    fn name(&self) -> &str {
        "onnx"
    }

    /// Builds a session to read the model's declared inputs and outputs (ONNX Runtime parses
    /// the file; MiniLM takes about 0.2 s).
    fn signature(&self, spec: &SubmodelSpec) -> std::result::Result<Signature, Vec<KindError>> {
        let s = settings(spec)?;
        let session = session(&s).map_err(|e| vec![KindError::at("weights", e)])?;
        signature_of(&session, &s)
    }

    fn load(&self, spec: &SubmodelSpec, _device: &Device) -> Result<Arc<dyn Kernel>> {
        let s = settings(spec).map_err(super::settings_error)?;
        let session = session(&s).map_err(KernelError::Runtime)?;
        let signature = signature_of(&session, &s).map_err(super::settings_error)?;
        let inputs = session.inputs().iter().map(|o| o.name().to_string()).collect();
        let outputs = signature.outputs.iter().map(|p| (p.name.clone(), p.ty.clone())).collect();
        Ok(Arc::new(OnnxKernel { session: Mutex::new(session), inputs, outputs, widened: s.u32_inputs }))
    }

    /// The model file three times over: ONNX Runtime reads it, then holds the weights in its
    /// own (optimised) form.
    fn memory_estimate(&self, spec: &SubmodelSpec) -> Result<u64> {
        let s = settings(spec).map_err(super::settings_error)?;
        Ok(crate::memory::file_size(&s.model).saturating_mul(3))
    }
}

struct OnnxKernel {
    session: Mutex<Session>,
    /// The model's inputs, in its order.
    inputs: Vec<String>,
    /// Its outputs with their port types.
    outputs: Vec<(String, PortType)>,
    /// Its int64 inputs taken as u32 (`params.u32_inputs`), widened before a run.
    widened: Vec<String>,
}

fn ort_error(e: impl std::fmt::Display) -> KernelError {
    KernelError::Runtime(format!("ONNX Runtime: {e}"))
}

impl Kernel for OnnxKernel {
    fn forward(&self, inputs: &Values) -> Result<Values> {
        let mut feed: Vec<(std::borrow::Cow<'_, str>, ort::session::SessionInputValue<'_>)> = Vec::new();
        for name in &self.inputs {
            let t = super::tensor(inputs, name)?;
            let shape: Vec<i64> = t.dims().iter().map(|d| *d as i64).collect();
            let flat = t.flatten_all().ctx("onnx input")?;
            let widened = self.widened.contains(name);
            let value: ort::value::DynValue = match t.dtype() {
                CDType::U32 if widened => {
                    let v = flat.to_dtype(CDType::I64).and_then(|x| x.to_vec1::<i64>()).ctx("onnx input")?;
                    ort::value::Tensor::from_array((shape, v)).map_err(ort_error)?.into_dyn()
                }
                CDType::F32 => ort::value::Tensor::from_array((shape, flat.to_vec1::<f32>().ctx("onnx input")?))
                    .map_err(ort_error)?
                    .into_dyn(),
                CDType::F64 => ort::value::Tensor::from_array((shape, flat.to_vec1::<f64>().ctx("onnx input")?))
                    .map_err(ort_error)?
                    .into_dyn(),
                CDType::I64 => ort::value::Tensor::from_array((shape, flat.to_vec1::<i64>().ctx("onnx input")?))
                    .map_err(ort_error)?
                    .into_dyn(),
                CDType::U8 => ort::value::Tensor::from_array((shape, flat.to_vec1::<u8>().ctx("onnx input")?))
                    .map_err(ort_error)?
                    .into_dyn(),
                CDType::U32 => ort::value::Tensor::from_array((shape, flat.to_vec1::<u32>().ctx("onnx input")?))
                    .map_err(ort_error)?
                    .into_dyn(),
                other => {
                    return Err(KernelError::Input {
                        port: name.clone(),
                        message: format!("dtype {other:?} is not served by the onnx kind"),
                    });
                }
            };
            feed.push((name.clone().into(), value.into()));
        }
        let mut session = self.session.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let results = session.run(feed).map_err(ort_error)?;
        let mut out = Values::new();
        for (name, ty) in &self.outputs {
            let value = &results[name.as_str()];
            let t = match ty {
                PortType::Tensor { dtype: DType::F32, .. } => {
                    let (shape, data) = value.try_extract_tensor::<f32>().map_err(ort_error)?;
                    Tensor::from_slice(data, dims(shape), &Device::Cpu)
                }
                PortType::Tensor { dtype: DType::F64, .. } => {
                    let (shape, data) = value.try_extract_tensor::<f64>().map_err(ort_error)?;
                    Tensor::from_slice(data, dims(shape), &Device::Cpu)
                }
                PortType::Tensor { dtype: DType::I64, .. } => {
                    let (shape, data) = value.try_extract_tensor::<i64>().map_err(ort_error)?;
                    Tensor::from_slice(data, dims(shape), &Device::Cpu)
                }
                PortType::Tensor { dtype: DType::U8, .. } => {
                    let (shape, data) = value.try_extract_tensor::<u8>().map_err(ort_error)?;
                    Tensor::from_slice(data, dims(shape), &Device::Cpu)
                }
                PortType::Tensor { dtype: DType::U32, .. } => {
                    let (shape, data) = value.try_extract_tensor::<u32>().map_err(ort_error)?;
                    Tensor::from_slice(data, dims(shape), &Device::Cpu)
                }
                _ => {
                    return Err(KernelError::Runtime(format!(
                        "output `{name}` has a type the onnx kind does not serve"
                    )));
                }
            }
            .ctx("onnx output")?;
            out.insert(name.clone(), Value::Tensor(t));
        }
        Ok(out)
    }
}

fn dims(shape: &ort::value::Shape) -> Vec<usize> {
    shape.iter().map(|d| usize::try_from(*d).unwrap_or(0)).collect()
}
