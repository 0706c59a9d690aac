//! Weight files (safetensors): a cheap header check for signatures and validation, and a full
//! load whose errors name the file, the tensor and both shapes.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde::de::DeserializeOwned;

use crate::error::{KernelError, Result};

/// Dtype and shape of one tensor, from a safetensors header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// The dtype as safetensors names it (`F32`, `I64`, ...).
    pub dtype: String,
    /// The shape.
    pub shape: Vec<usize>,
}

#[derive(serde::Deserialize)]
struct RawInfo {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: (usize, usize),
}

/// Largest header we accept (safetensors' own limit).
const MAX_HEADER: u64 = 100_000_000;

fn dtype_size(dtype: &str) -> Option<usize> {
    Some(match dtype {
        "BOOL" | "U8" | "I8" | "F8_E5M2" | "F8_E4M3" => 1,
        "U16" | "I16" | "F16" | "BF16" => 2,
        "U32" | "I32" | "F32" => 4,
        "U64" | "I64" | "F64" => 8,
        _ => return None,
    })
}

/// Reads and checks a safetensors header without reading the data: the header parses, every
/// tensor's byte range fits its dtype and shape, and the file is exactly as long as the header
/// says (a truncated or padded file is rejected).
pub fn read_header(path: &Path) -> Result<BTreeMap<String, TensorInfo>> {
    let io = |source| KernelError::Io { path: path.to_path_buf(), source };
    let corrupt = |reason: String| KernelError::Corrupt { path: path.to_path_buf(), reason };
    // Never open a FIFO (it would block until a writer came) or a directory.
    if let Some(problem) = maas_graphs::file_problem(path)
        && path.exists()
    {
        return Err(KernelError::NotAFile { path: path.to_path_buf(), problem });
    }
    let mut f = std::fs::File::open(path).map_err(io)?;
    let len = f.metadata().map_err(io)?.len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n).map_err(|_| corrupt(format!("the file is {len} bytes, too short for a header")))?;
    let n = u64::from_le_bytes(n);
    if n > MAX_HEADER || 8 + n > len {
        return Err(corrupt(format!("header length {n} does not fit a file of {len} bytes")));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(io)?;
    let raw: HashMap<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| corrupt(format!("header is not valid JSON: {e}")))?;
    let mut out = BTreeMap::new();
    let mut end = 0usize;
    for (name, v) in raw {
        if name == "__metadata__" {
            continue;
        }
        let info: RawInfo =
            serde_json::from_value(v).map_err(|e| corrupt(format!("entry `{name}` is malformed: {e}")))?;
        let size = dtype_size(&info.dtype)
            .ok_or_else(|| corrupt(format!("tensor `{name}` has unknown dtype {}", info.dtype)))?;
        let (a, b) = info.data_offsets;
        let want = info.shape.iter().try_fold(size, |acc, &d| acc.checked_mul(d));
        if b < a || want != Some(b - a) {
            return Err(corrupt(format!(
                "tensor `{name}` ({} {:?}) has a byte range {a}..{b} that does not match its shape",
                info.dtype, info.shape
            )));
        }
        if b as u64 > len {
            return Err(corrupt(format!(
                "tensor `{name}` ends at byte {b}, past the end of a {len}-byte file (truncated)"
            )));
        }
        end = end.max(b);
        out.insert(name, TensorInfo { dtype: info.dtype, shape: info.shape });
    }
    // Cannot overflow: n + 8 <= len and end <= len were checked above.
    let expected = 8 + n + end as u64;
    if expected != len {
        return Err(corrupt(format!(
            "the file is {len} bytes but its header describes {expected} bytes{}",
            if len < expected { " (truncated)" } else { "" }
        )));
    }
    Ok(out)
}

/// Tensors loaded from one safetensors file, looked up with checked names and shapes.
pub struct Weights {
    path: PathBuf,
    tensors: HashMap<String, Tensor>,
}

impl Weights {
    /// Loads every tensor of a file onto `device`, after checking its header.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        read_header(path)?;
        let tensors = candle_core::safetensors::load(path, device)
            .map_err(|e| KernelError::Corrupt { path: path.to_path_buf(), reason: e.to_string() })?;
        Ok(Self { path: path.to_path_buf(), tensors })
    }

    /// Wraps tensors already in memory (for tests and training).
    pub fn from_tensors(path: impl Into<PathBuf>, tensors: HashMap<String, Tensor>) -> Self {
        Self { path: path.into(), tensors }
    }

    /// The file they came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A tensor that must exist with exactly `shape`.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.get_any(name)?;
        if t.dims() != shape {
            return Err(KernelError::TensorShape {
                path: self.path.clone(),
                name: name.to_string(),
                expected: shape.to_vec(),
                actual: t.dims().to_vec(),
            });
        }
        Ok(t)
    }

    /// Whether the file has a tensor of this name.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// A tensor that must exist, of any shape.
    pub fn get_any(&self, name: &str) -> Result<Tensor> {
        self.tensors
            .get(name)
            .cloned()
            .ok_or_else(|| KernelError::MissingTensor { path: self.path.clone(), name: name.to_string() })
    }

    /// A candle `VarBuilder` over these tensors (for model code written against candle-nn).
    pub fn var_builder(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_tensors(self.tensors.clone(), dtype, device)
    }
}

/// Parses a submodel's `params` into a kind's params struct (which should deny unknown
/// fields), with the error pointing at `params`. A key the struct does not have is a
/// [`KindError::unknown_param`](maas_graphs::KindError::unknown_param) naming it, the params
/// the kind takes and the closest of them.
pub fn parse_params<T: DeserializeOwned>(params: &toml::Table) -> std::result::Result<T, maas_graphs::KindError> {
    if let Some(fields) = struct_fields::<T>()
        && let Some(key) = params.keys().find(|k| !fields.contains(&k.as_str()))
    {
        return Err(maas_graphs::KindError::unknown_param(key, fields));
    }
    toml::Value::Table(params.clone())
        .try_into()
        .map_err(|e: toml::de::Error| maas_graphs::KindError::at("params", format!("invalid params: {}", e.message())))
}

/// The field names (as written, after renames) of a struct that derives `Deserialize`: serde
/// hands them to `deserialize_struct`, where a deserializer that holds no data catches them.
fn struct_fields<T: DeserializeOwned>() -> Option<&'static [&'static str]> {
    use serde::de::{self, Visitor};

    struct Fields<'a>(&'a mut Option<&'static [&'static str]>);

    impl<'de> de::Deserializer<'de> for Fields<'_> {
        type Error = de::value::Error;

        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> std::result::Result<V::Value, Self::Error> {
            Err(de::Error::custom("not a struct"))
        }

        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> std::result::Result<V::Value, Self::Error> {
            *self.0 = Some(fields);
            Err(de::Error::custom("fields read"))
        }

        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
            option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
            ignored_any
        }
    }

    let mut fields = None;
    let _ = T::deserialize(Fields(&mut fields));
    fields
}

/// Reads and parses a JSON config file (e.g. a model's `config.json`).
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|source| KernelError::Io { path: path.to_path_buf(), source })?;
    serde_json::from_str(&text).map_err(|e| KernelError::Config { path: path.to_path_buf(), message: e.to_string() })
}

/// A deterministic uniform(-bound, bound) tensor from a seed, for seeded random init
/// (`params.seed`): the same seed gives the same weights on every machine.
pub fn seeded_uniform(shape: &[usize], bound: f32, seed: u64, device: &Device) -> Result<Tensor> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    // A buffer that cannot be had is an error, not an abort (the engine's memory estimate
    // refuses such loads before they start; this catches what slips past it).
    let too_large = || KernelError::Allocation { op: "seeded init", bytes: crate::memory::tensor_bytes(shape, 4) };
    let n = shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d)).ok_or_else(too_large)?;
    let mut data: Vec<f32> = Vec::new();
    data.try_reserve_exact(n).map_err(|_| too_large())?;
    data.extend((0..n).map(|_| rng.random_range(-bound..=bound)));
    Tensor::from_vec(data, shape, device).map_err(|source| KernelError::Candle { op: "seeded init", source })
}
