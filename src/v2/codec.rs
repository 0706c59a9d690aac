//! Tensors of the Open Inference Protocol to engine values and back: datatypes, shapes, and the
//! three forms elements arrive in (JSON `data`, raw little-endian bytes from the binary
//! extension or gRPC's `raw_input_contents`, and gRPC's typed `contents`).
//!
//! Every size is checked before anything is allocated: a shape's element count is computed
//! with overflow checks and compared with the bytes or elements actually sent, and a BYTES
//! element's length prefix is checked against what is left. A tensor that does not fit its
//! port is refused with a message that names the input, the expected datatype and shape, and
//! what was sent.

use candle_core::{DType as CDType, Device, Tensor};
use maas_graphs::{DType, Dim, PortType};
use maas_kernels::{Value, Values};
use serde_json::Value as Json;

use super::pb::InferTensorContents;

/// A datatype of the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Datatype {
    /// `BOOL`.
    Bool,
    /// `UINT8`.
    Uint8,
    /// `UINT16`.
    Uint16,
    /// `UINT32`.
    Uint32,
    /// `UINT64`.
    Uint64,
    /// `INT8`.
    Int8,
    /// `INT16`.
    Int16,
    /// `INT32`.
    Int32,
    /// `INT64`.
    Int64,
    /// `FP16`.
    Fp16,
    /// `FP32`.
    Fp32,
    /// `FP64`.
    Fp64,
    /// `BF16`.
    Bf16,
    /// `BYTES`: byte strings (maas's text ports, UTF-8).
    Bytes,
}

const NAMES: [(Datatype, &str); 14] = [
    (Datatype::Bool, "BOOL"),
    (Datatype::Uint8, "UINT8"),
    (Datatype::Uint16, "UINT16"),
    (Datatype::Uint32, "UINT32"),
    (Datatype::Uint64, "UINT64"),
    (Datatype::Int8, "INT8"),
    (Datatype::Int16, "INT16"),
    (Datatype::Int32, "INT32"),
    (Datatype::Int64, "INT64"),
    (Datatype::Fp16, "FP16"),
    (Datatype::Fp32, "FP32"),
    (Datatype::Fp64, "FP64"),
    (Datatype::Bf16, "BF16"),
    (Datatype::Bytes, "BYTES"),
];

impl Datatype {
    /// The datatype named `s` (exact, upper case, as the protocol writes them).
    pub fn parse(s: &str) -> Option<Self> {
        NAMES.iter().find(|(_, n)| *n == s).map(|(d, _)| *d)
    }

    /// The protocol's name.
    pub fn as_str(self) -> &'static str {
        NAMES.iter().find(|(d, _)| *d == self).map_or("BYTES", |(_, n)| n)
    }

    /// Bytes per element in raw form (`None` for BYTES, whose elements carry their length).
    pub fn size(self) -> Option<usize> {
        Some(match self {
            Self::Bool | Self::Uint8 | Self::Int8 => 1,
            Self::Uint16 | Self::Int16 | Self::Fp16 | Self::Bf16 => 2,
            Self::Uint32 | Self::Int32 | Self::Fp32 => 4,
            Self::Uint64 | Self::Int64 | Self::Fp64 => 8,
            Self::Bytes => return None,
        })
    }

    /// The datatype of an engine dtype.
    pub fn of(dtype: DType) -> Self {
        match dtype {
            DType::F32 => Self::Fp32,
            DType::F16 => Self::Fp16,
            DType::BF16 => Self::Bf16,
            DType::F64 => Self::Fp64,
            DType::U8 => Self::Uint8,
            DType::U32 => Self::Uint32,
            DType::I64 => Self::Int64,
        }
    }

    /// The engine dtype this datatype carries, if the engine has one.
    pub fn dtype(self) -> Option<DType> {
        DType::ALL.into_iter().find(|d| Self::of(*d) == self)
    }

    fn candle(dtype: DType) -> CDType {
        match dtype {
            DType::F32 => CDType::F32,
            DType::F16 => CDType::F16,
            DType::BF16 => CDType::BF16,
            DType::F64 => CDType::F64,
            DType::U8 => CDType::U8,
            DType::U32 => CDType::U32,
            DType::I64 => CDType::I64,
        }
    }
}

impl std::fmt::Display for Datatype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The datatype and shape a port advertises (`-1` for the batch and every symbolic dimension;
/// a text port is `BYTES [-1]`). `None` for ports of any type.
pub fn port_metadata(ty: &PortType) -> Option<(Datatype, Vec<i64>)> {
    match ty {
        PortType::Text => Some((Datatype::Bytes, vec![-1])),
        PortType::Any => None,
        PortType::Tensor { dtype, shape } => Some((
            Datatype::of(*dtype),
            shape
                .iter()
                .filter(|d| **d != Dim::Rest)
                .map(|d| match d {
                    Dim::Fixed(n) => i64::try_from(*n).unwrap_or(-1),
                    _ => -1,
                })
                .collect(),
        )),
    }
}

/// How a port is described in messages: `FP32 [-1, 64]`.
fn describe_port(ty: &PortType) -> String {
    match (ty, port_metadata(ty)) {
        (PortType::Text, _) => "BYTES [-1] or [-1, 1]".into(),
        (PortType::Tensor { shape, .. }, Some((d, dims))) => {
            let rest = if shape.contains(&Dim::Rest) { ", ..." } else { "" };
            format!("{d} {}{rest}]", fmt_dims(&dims).trim_end_matches(']'))
        }
        _ => "any datatype".into(),
    }
}

fn fmt_dims(dims: &[i64]) -> String {
    let inner: Vec<String> = dims.iter().map(ToString::to_string).collect();
    format!("[{}]", inner.join(", "))
}

/// Where one input tensor's elements are.
#[derive(Debug, Clone, Copy)]
pub enum Elements<'a> {
    /// Row-major little-endian elements; BYTES elements each a 4-byte little-endian length and
    /// that many bytes.
    Raw(&'a [u8]),
    /// JSON `data`: a flat (row-major) or nested array.
    Json(&'a Json),
    /// gRPC's typed contents.
    Contents(&'a InferTensorContents),
}

/// One input tensor of a request, as sent.
#[derive(Debug, Clone, Copy)]
pub struct InputTensor<'a> {
    /// The input's name.
    pub name: &'a str,
    /// Its datatype, as sent.
    pub datatype: &'a str,
    /// Its shape, as sent.
    pub shape: &'a [i64],
    /// Its elements.
    pub elements: Elements<'a>,
}

/// Decodes a request's input tensors for a model with inputs `ports` into engine values. Every
/// port must be given once; the error names the problem (it is the client's: a 400).
pub fn decode_inputs(ports: &[(String, PortType)], inputs: &[InputTensor<'_>]) -> Result<Values, String> {
    let mut values = Values::new();
    for input in inputs {
        let Some((_, ty)) = ports.iter().find(|(n, _)| n == input.name) else {
            let names: Vec<&str> = ports.iter().map(|(n, _)| n.as_str()).collect();
            return Err(format!("unknown input `{}`; the model's inputs are {}", input.name, names.join(", ")));
        };
        if values.contains_key(input.name) {
            return Err(format!("input `{}` is given twice", input.name));
        }
        values.insert(input.name.to_string(), decode_input(ty, input)?);
    }
    if let Some((missing, ty)) = ports.iter().find(|(n, _)| !values.contains_key(n)) {
        return Err(format!("input `{missing}` ({}) is missing", describe_port(ty)));
    }
    Ok(values)
}

/// Decodes one input for a port of type `ty`.
pub fn decode_input(ty: &PortType, input: &InputTensor<'_>) -> Result<Value, String> {
    let name = input.name;
    let sent = || format!("{} {}", input.datatype, fmt_dims(input.shape));
    let mismatch = || format!("input `{name}`: expected {}, got {}", describe_port(ty), sent());
    let Some(datatype) = Datatype::parse(input.datatype) else {
        return Err(format!(
            "input `{name}`: unknown datatype `{}`; expected {}",
            input.datatype.escape_debug(),
            describe_port(ty)
        ));
    };
    let mut dims = Vec::with_capacity(input.shape.len());
    for &d in input.shape {
        dims.push(
            usize::try_from(d)
                .map_err(|_| format!("input `{name}`: shape {} has a negative dimension", fmt_dims(input.shape)))?,
        );
    }
    let count = dims
        .iter()
        .try_fold(1usize, |n, d| n.checked_mul(*d))
        .ok_or_else(|| format!("input `{name}`: shape {} has too many elements", fmt_dims(input.shape)))?;
    if count == 0 {
        // As the engine refuses an empty tensor, and before any size is trusted: with a zero
        // dimension the others could be anything.
        return Err(format!(
            "input `{name}` is empty (shape {}); every input needs at least one element",
            fmt_dims(input.shape)
        ));
    }
    match ty {
        PortType::Text => {
            let fits = matches!(dims.as_slice(), [_] | [_, 1]);
            if datatype != Datatype::Bytes || !fits {
                return Err(mismatch());
            }
            Ok(Value::text(strings(name, input.elements, count)?))
        }
        PortType::Tensor { dtype, shape } => {
            if datatype != Datatype::of(*dtype) || !shape_fits(shape, &dims) {
                return Err(mismatch());
            }
            tensor(name, *dtype, &dims, count, input.elements).map(Value::Tensor)
        }
        PortType::Any => match datatype {
            Datatype::Bytes => Ok(Value::text(strings(name, input.elements, count)?)),
            d => match d.dtype() {
                Some(dtype) if !dims.is_empty() => tensor(name, dtype, &dims, count, input.elements).map(Value::Tensor),
                _ => Err(format!(
                    "input `{name}`: {} is not served; use one of FP32 FP16 BF16 FP64 UINT8 UINT32 INT64 BYTES with a batch dimension",
                    sent()
                )),
            },
        },
    }
}

/// Whether concrete `dims` fit a port's symbolic shape (symbols are checked by the engine).
fn shape_fits(shape: &[Dim], dims: &[usize]) -> bool {
    let rest = shape.last() == Some(&Dim::Rest);
    let fixed = if rest { &shape[..shape.len() - 1] } else { shape };
    if dims.len() < fixed.len() || (!rest && dims.len() != fixed.len()) || dims.is_empty() {
        return false;
    }
    fixed.iter().zip(dims).all(|(s, d)| match s {
        Dim::Fixed(n) => n == d,
        _ => true,
    })
}

/// A tensor of `dtype` and `dims` (`count` elements) from its elements.
fn tensor(name: &str, dtype: DType, dims: &[usize], count: usize, elements: Elements<'_>) -> Result<Tensor, String> {
    let datatype = Datatype::of(dtype);
    let size = datatype.size().unwrap_or(1);
    let built = match elements {
        Elements::Raw(bytes) => {
            let want = count.checked_mul(size);
            if want != Some(bytes.len()) {
                return Err(format!(
                    "input `{name}`: {} {} needs {} bytes, got {}",
                    datatype,
                    fmt_dims(&dims.iter().map(|d| *d as i64).collect::<Vec<_>>()),
                    want.map_or_else(|| "too many".into(), |w| w.to_string()),
                    bytes.len()
                ));
            }
            Tensor::from_raw_buffer(bytes, Datatype::candle(dtype), dims, &Device::Cpu)
        }
        Elements::Json(json) => {
            let leaves = json_leaves(name, json, count)?;
            numbers_tensor(name, dtype, dims, &leaves)?
        }
        Elements::Contents(c) => {
            let wrong_count = |n: usize| format!("input `{name}`: shape needs {count} elements, got {n}");
            match dtype {
                DType::F32 if c.fp32_contents.len() == count => {
                    Tensor::from_slice(&c.fp32_contents, dims, &Device::Cpu)
                }
                DType::F64 if c.fp64_contents.len() == count => {
                    Tensor::from_slice(&c.fp64_contents, dims, &Device::Cpu)
                }
                DType::I64 if c.int64_contents.len() == count => {
                    Tensor::from_slice(&c.int64_contents, dims, &Device::Cpu)
                }
                DType::U32 if c.uint_contents.len() == count => {
                    Tensor::from_slice(&c.uint_contents, dims, &Device::Cpu)
                }
                DType::U8 if c.uint_contents.len() == count => {
                    let bytes = c
                        .uint_contents
                        .iter()
                        .map(|v| u8::try_from(*v).map_err(|_| format!("input `{name}`: {v} does not fit UINT8")))
                        .collect::<Result<Vec<u8>, _>>()?;
                    Tensor::from_vec(bytes, dims, &Device::Cpu)
                }
                DType::F16 | DType::BF16 => {
                    return Err(format!("input `{name}`: {datatype} elements must be sent as raw_input_contents"));
                }
                DType::F32 => return Err(wrong_count(c.fp32_contents.len())),
                DType::F64 => return Err(wrong_count(c.fp64_contents.len())),
                DType::I64 => return Err(wrong_count(c.int64_contents.len())),
                DType::U8 | DType::U32 => return Err(wrong_count(c.uint_contents.len())),
            }
        }
    };
    built.map_err(|e| format!("input `{name}`: {e}"))
}

/// A JSON leaf (number or string), kept as written.
fn json_leaves<'a>(name: &str, json: &'a Json, count: usize) -> Result<Vec<&'a Json>, String> {
    // Iterative flattening (no recursion for a hostile nesting depth); never more leaves than
    // the shape allows, and the buffer grows with what was sent, not with what the shape claims.
    let mut out = Vec::with_capacity(count.min(4096));
    let mut stack: Vec<std::slice::Iter<'a, Json>> = Vec::new();
    match json {
        Json::Array(a) => stack.push(a.iter()),
        leaf => out.push(leaf),
    }
    while let Some(top) = stack.last_mut() {
        match top.next() {
            None => {
                stack.pop();
            }
            Some(Json::Array(a)) => stack.push(a.iter()),
            Some(leaf) => {
                if out.len() == count {
                    return Err(format!("input `{name}`: `data` has more than the {count} elements its shape needs"));
                }
                out.push(leaf);
            }
        }
    }
    if out.len() != count {
        return Err(format!("input `{name}`: shape needs {count} elements, `data` has {}", out.len()));
    }
    Ok(out)
}

fn numbers_tensor(
    name: &str,
    dtype: DType,
    dims: &[usize],
    leaves: &[&Json],
) -> Result<candle_core::Result<Tensor>, String> {
    let bad = |i: usize, v: &Json, what: &str| format!("input `{name}`: element {i} ({v}) is not {what}");
    let dev = &Device::Cpu;
    Ok(match dtype {
        DType::F32 | DType::F16 | DType::BF16 => {
            let v = leaves
                .iter()
                .enumerate()
                .map(|(i, x)| x.as_f64().map(|f| f as f32).ok_or_else(|| bad(i, x, "a number")))
                .collect::<Result<Vec<f32>, _>>()?;
            Tensor::from_vec(v, dims, dev).and_then(|t| t.to_dtype(Datatype::candle(dtype)))
        }
        DType::F64 => {
            let v = leaves
                .iter()
                .enumerate()
                .map(|(i, x)| x.as_f64().ok_or_else(|| bad(i, x, "a number")))
                .collect::<Result<Vec<f64>, _>>()?;
            Tensor::from_vec(v, dims, dev)
        }
        DType::U8 => {
            let v = leaves
                .iter()
                .enumerate()
                .map(|(i, x)| x.as_u64().and_then(|n| u8::try_from(n).ok()).ok_or_else(|| bad(i, x, "a UINT8")))
                .collect::<Result<Vec<u8>, _>>()?;
            Tensor::from_vec(v, dims, dev)
        }
        DType::U32 => {
            let v = leaves
                .iter()
                .enumerate()
                .map(|(i, x)| x.as_u64().and_then(|n| u32::try_from(n).ok()).ok_or_else(|| bad(i, x, "a UINT32")))
                .collect::<Result<Vec<u32>, _>>()?;
            Tensor::from_vec(v, dims, dev)
        }
        DType::I64 => {
            let v = leaves
                .iter()
                .enumerate()
                .map(|(i, x)| x.as_i64().ok_or_else(|| bad(i, x, "an INT64")))
                .collect::<Result<Vec<i64>, _>>()?;
            Tensor::from_vec(v, dims, dev)
        }
    })
}

/// `count` UTF-8 strings from BYTES elements.
fn strings(name: &str, elements: Elements<'_>, count: usize) -> Result<Vec<String>, String> {
    let utf8 = |i: usize, b: &[u8]| {
        std::str::from_utf8(b)
            .map(str::to_string)
            .map_err(|e| format!("input `{name}`: element {i} is not valid UTF-8 ({e})"))
    };
    match elements {
        Elements::Raw(bytes) => {
            let mut out = Vec::with_capacity(count.min(bytes.len() / 4));
            let mut rest = bytes;
            for i in 0..count {
                let Some((len, tail)) = rest.split_first_chunk::<4>() else {
                    return Err(format!(
                        "input `{name}`: BYTES element {i} of {count} is truncated (its 4-byte length is missing)"
                    ));
                };
                let len = u32::from_le_bytes(*len) as usize;
                if len > tail.len() {
                    return Err(format!(
                        "input `{name}`: BYTES element {i} claims {len} bytes but only {} are left",
                        tail.len()
                    ));
                }
                let (s, tail) = tail.split_at(len);
                out.push(utf8(i, s)?);
                rest = tail;
            }
            if !rest.is_empty() {
                return Err(format!(
                    "input `{name}`: {} bytes left after the {count} BYTES elements of its shape",
                    rest.len()
                ));
            }
            Ok(out)
        }
        Elements::Json(json) => json_leaves(name, json, count)?
            .into_iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| format!("input `{name}`: element {i} ({v}) is not a string"))
            })
            .collect(),
        Elements::Contents(c) => {
            if c.bytes_contents.len() != count {
                return Err(format!("input `{name}`: shape needs {count} elements, got {}", c.bytes_contents.len()));
            }
            c.bytes_contents.iter().enumerate().map(|(i, b)| utf8(i, b)).collect()
        }
    }
}

/// One output tensor, encoded.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputTensor {
    /// Its datatype.
    pub datatype: Datatype,
    /// Its shape.
    pub shape: Vec<i64>,
    /// Its elements in raw form (little-endian; BYTES length-prefixed).
    pub raw: Vec<u8>,
}

/// Encodes an output value.
pub fn encode_output(value: &Value) -> candle_core::Result<OutputTensor> {
    match value {
        Value::Text(rows) => {
            let mut raw = Vec::with_capacity(rows.iter().map(|s| s.len() + 4).sum());
            for s in rows.iter() {
                raw.extend_from_slice(&(s.len() as u32).to_le_bytes());
                raw.extend_from_slice(s.as_bytes());
            }
            Ok(OutputTensor { datatype: Datatype::Bytes, shape: vec![rows.len() as i64], raw })
        }
        Value::Tensor(t) => {
            let t = t.to_device(&Device::Cpu)?;
            let shape = t.dims().iter().map(|d| *d as i64).collect();
            let flat = t.flatten_all()?;
            let (datatype, raw) = match t.dtype() {
                CDType::F32 => (Datatype::Fp32, le(flat.to_vec1::<f32>()?, f32::to_le_bytes)),
                CDType::F64 => (Datatype::Fp64, le(flat.to_vec1::<f64>()?, f64::to_le_bytes)),
                CDType::F16 => (Datatype::Fp16, le(flat.to_vec1::<half::f16>()?, half::f16::to_le_bytes)),
                CDType::BF16 => (Datatype::Bf16, le(flat.to_vec1::<half::bf16>()?, half::bf16::to_le_bytes)),
                CDType::U8 => (Datatype::Uint8, flat.to_vec1::<u8>()?),
                CDType::U32 => (Datatype::Uint32, le(flat.to_vec1::<u32>()?, u32::to_le_bytes)),
                CDType::I64 => (Datatype::Int64, le(flat.to_vec1::<i64>()?, i64::to_le_bytes)),
                other => {
                    // Kinds only produce the dtypes above; anything else is served as FP32.
                    let v = flat.to_dtype(CDType::F32).map_err(|_| candle_core::Error::Msg(format!("{other:?}")))?;
                    (Datatype::Fp32, le(v.to_vec1::<f32>()?, f32::to_le_bytes))
                }
            };
            Ok(OutputTensor { datatype, shape, raw })
        }
    }
}

fn le<T: Copy, const N: usize>(v: Vec<T>, f: fn(T) -> [u8; N]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len() * N);
    for x in v {
        out.extend_from_slice(&f(x));
    }
    out
}

impl OutputTensor {
    /// The elements as a flat JSON array (numbers; BYTES as strings, lossy for invalid UTF-8).
    pub fn json_data(&self) -> Json {
        let nums = |v: Vec<f64>| {
            Json::Array(
                v.into_iter().map(|x| serde_json::Number::from_f64(x).map_or(Json::Null, Json::Number)).collect(),
            )
        };
        let raw = &self.raw;
        match self.datatype {
            Datatype::Fp32 => nums(
                raw.chunks_exact(4).map(|c| f64::from(f32::from_le_bytes(c.try_into().unwrap_or_default()))).collect(),
            ),
            Datatype::Fp64 => {
                nums(raw.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap_or_default())).collect())
            }
            Datatype::Fp16 => {
                nums(raw.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f64()).collect())
            }
            Datatype::Bf16 => {
                nums(raw.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f64()).collect())
            }
            Datatype::Uint8 | Datatype::Bool => Json::Array(raw.iter().map(|b| Json::from(*b)).collect()),
            Datatype::Uint32 => Json::Array(
                raw.chunks_exact(4).map(|c| Json::from(u32::from_le_bytes(c.try_into().unwrap_or_default()))).collect(),
            ),
            Datatype::Int64 => Json::Array(
                raw.chunks_exact(8).map(|c| Json::from(i64::from_le_bytes(c.try_into().unwrap_or_default()))).collect(),
            ),
            Datatype::Bytes => {
                let mut out = Vec::new();
                let mut rest = raw.as_slice();
                while let Some((len, tail)) = rest.split_first_chunk::<4>() {
                    let len = (u32::from_le_bytes(*len) as usize).min(tail.len());
                    out.push(Json::String(String::from_utf8_lossy(&tail[..len]).into_owned()));
                    rest = &tail[len..];
                }
                Json::Array(out)
            }
            // Never produced by `encode_output`.
            Datatype::Uint16 | Datatype::Uint64 | Datatype::Int8 | Datatype::Int16 | Datatype::Int32 => {
                Json::Array(vec![])
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use maas_graphs::ty;
    use serde_json::json;

    fn raw<'a>(name: &'a str, datatype: &'a str, shape: &'a [i64], bytes: &'a [u8]) -> InputTensor<'a> {
        InputTensor { name, datatype, shape, elements: Elements::Raw(bytes) }
    }

    fn le_bytes<T: Copy, const N: usize>(v: &[T], f: fn(T) -> [u8; N]) -> Vec<u8> {
        le(v.to_vec(), f)
    }

    #[test]
    fn every_datatype_round_trips_through_raw_bytes() {
        let cases: Vec<(&str, &str, Vec<u8>)> = vec![
            ("f32[B,2]", "FP32", le_bytes(&[1.5f32, -2.0, 3.25, 4.0], f32::to_le_bytes)),
            ("f64[B,2]", "FP64", le_bytes(&[1.5f64, -2.0, 3.25, 1e300], f64::to_le_bytes)),
            ("f16[B,2]", "FP16", le_bytes(&[1.5f32, -2.0, 3.25, 4.0].map(half::f16::from_f32), half::f16::to_le_bytes)),
            (
                "bf16[B,2]",
                "BF16",
                le_bytes(&[1.5f32, -2.0, 3.25, 4.0].map(half::bf16::from_f32), half::bf16::to_le_bytes),
            ),
            ("u8[B,2]", "UINT8", vec![0, 1, 254, 255]),
            ("u32[B,2]", "UINT32", le_bytes(&[0u32, 7, u32::MAX, 30522], u32::to_le_bytes)),
            ("i64[B,2]", "INT64", le_bytes(&[i64::MIN, -1, 0, i64::MAX], i64::to_le_bytes)),
        ];
        for (port, datatype, bytes) in cases {
            let v = decode_input(&ty(port), &raw("x", datatype, &[2, 2], &bytes)).expect(port);
            assert_eq!(v.as_tensor().unwrap().dims(), &[2, 2], "{port}");
            let out = encode_output(&v).unwrap();
            assert_eq!(out.datatype.as_str(), datatype);
            assert_eq!(out.shape, vec![2, 2]);
            assert_eq!(out.raw, bytes, "{port} round-trips bit for bit");
            assert_eq!(port_metadata(&ty(port)), Some((out.datatype, vec![-1, 2])));
        }
    }

    #[test]
    fn json_data_may_be_flat_or_nested_and_is_checked_per_datatype() {
        let t = ty("f32[B,2]");
        for data in [json!([1, 2.5, 3, 4]), json!([[1, 2.5], [3, 4]])] {
            let v = decode_input(
                &t,
                &InputTensor { name: "x", datatype: "FP32", shape: &[2, 2], elements: Elements::Json(&data) },
            )
            .unwrap();
            assert_eq!(v.as_tensor().unwrap().to_vec2::<f32>().unwrap(), vec![vec![1.0, 2.5], vec![3.0, 4.0]]);
            let out = encode_output(&v).unwrap();
            assert_eq!(out.json_data(), json!([1.0, 2.5, 3.0, 4.0]));
        }
        let decode = |port: &str, datatype: &str, data: Json| {
            decode_input(
                &ty(port),
                &InputTensor { name: "x", datatype, shape: &[1, 2], elements: Elements::Json(&data) },
            )
        };
        assert!(decode("u8[B,2]", "UINT8", json!([0, 255])).is_ok());
        assert!(decode("u8[B,2]", "UINT8", json!([0, 256])).unwrap_err().contains("element 1 (256) is not a UINT8"));
        assert!(decode("u32[B,2]", "UINT32", json!([1, -1])).unwrap_err().contains("not a UINT32"));
        assert!(decode("i64[B,2]", "INT64", json!([1, 1.5])).unwrap_err().contains("not an INT64"));
        assert!(decode("f32[B,2]", "FP32", json!([1, "a"])).unwrap_err().contains("not a number"));
        assert!(decode("f16[B,2]", "FP16", json!([1, 2])).is_ok());
        assert!(decode("f32[B,2]", "FP32", json!([1, 2, 3])).unwrap_err().contains("more than the 2 elements"));
        assert!(decode("f32[B,2]", "FP32", json!([[1]])).unwrap_err().contains("shape needs 2 elements, `data` has 1"));
    }

    #[test]
    fn a_tensor_that_does_not_fit_its_port_names_the_input_and_both_types() {
        let t = ty("f32[B,64]");
        let bytes = vec![0u8; 2 * 64 * 8];
        let e = decode_input(&t, &raw("pixels", "FP64", &[2, 64], &bytes)).unwrap_err();
        assert_eq!(e, "input `pixels`: expected FP32 [-1, 64], got FP64 [2, 64]");
        let e = decode_input(&t, &raw("pixels", "FP32", &[2, 63], &bytes)).unwrap_err();
        assert_eq!(e, "input `pixels`: expected FP32 [-1, 64], got FP32 [2, 63]");
        let e = decode_input(&t, &raw("pixels", "FP32", &[128], &bytes)).unwrap_err();
        assert!(e.contains("got FP32 [128]"), "{e}");
        let e = decode_input(&t, &raw("pixels", "FLOAT", &[2, 64], &bytes)).unwrap_err();
        assert!(e.contains("unknown datatype `FLOAT`; expected FP32 [-1, 64]"), "{e}");
        let e = decode_input(&ty("text"), &raw("text", "FP32", &[2], &bytes)).unwrap_err();
        assert!(e.contains("expected BYTES [-1] or [-1, 1], got FP32 [2]"), "{e}");
    }

    #[test]
    fn malformed_raw_tensors_are_refused_before_any_allocation() {
        let t = ty("f32[B,2]");
        // Fewer and more bytes than the shape needs.
        assert!(decode_input(&t, &raw("x", "FP32", &[2, 2], &[0; 15])).unwrap_err().contains("needs 16 bytes, got 15"));
        assert!(decode_input(&t, &raw("x", "FP32", &[2, 2], &[0; 17])).unwrap_err().contains("needs 16 bytes, got 17"));
        // A shape whose element count overflows, and one that needs more bytes than exist.
        let huge = [i64::MAX, i64::MAX];
        let e = decode_input(&ty("f32[B,_]"), &raw("x", "FP32", &huge, &[0; 16])).unwrap_err();
        assert!(e.contains("too many elements"), "{e}");
        let e = decode_input(&ty("f32[B,_]"), &raw("x", "FP32", &[1 << 40, 1 << 22], &[0; 16])).unwrap_err();
        assert!(e.contains("needs too many bytes") || e.contains("too many elements"), "{e}");
        let e = decode_input(&t, &raw("x", "FP32", &[-1, 2], &[0; 16])).unwrap_err();
        assert!(e.contains("negative dimension"), "{e}");
        // A zero dimension makes the count 0 whatever the others say: refused as empty.
        let e = decode_input(&ty("f32[B,...]"), &raw("x", "FP32", &[0, 1 << 32, 1 << 32], &[])).unwrap_err();
        assert!(e.contains("is empty (shape [0, 4294967296, 4294967296])"), "{e}");
        let e = decode_input(&ty("text"), &raw("t", "BYTES", &[0], &[])).unwrap_err();
        assert!(e.contains("is empty"), "{e}");
    }

    #[test]
    fn bytes_elements_are_length_prefixed_utf8_and_every_length_is_checked() {
        let text = ty("text");
        let mut ok = Vec::new();
        for s in ["hello", "Ünïcödé ✓", ""] {
            ok.extend_from_slice(&(s.len() as u32).to_le_bytes());
            ok.extend_from_slice(s.as_bytes());
        }
        for shape in [&[3][..], &[3, 1][..]] {
            let v = decode_input(&text, &raw("text", "BYTES", shape, &ok)).unwrap();
            let Value::Text(rows) = &v else { panic!("text") };
            assert_eq!(rows.as_slice(), ["hello", "Ünïcödé ✓", ""]);
            let out = encode_output(&v).unwrap();
            assert_eq!((out.datatype, out.shape.as_slice(), &out.raw), (Datatype::Bytes, &[3i64][..], &ok));
            assert_eq!(out.json_data(), json!(["hello", "Ünïcödé ✓", ""]));
        }
        // A truncated length prefix, a length past the end, bytes left over, invalid UTF-8.
        let e = decode_input(&text, &raw("text", "BYTES", &[4], &ok)).unwrap_err();
        assert!(e.contains("element 3 of 4 is truncated"), "{e}");
        let e = decode_input(&text, &raw("text", "BYTES", &[1], &[255, 255, 255, 255, b'a'])).unwrap_err();
        assert!(e.contains("claims 4294967295 bytes but only 1 are left"), "{e}");
        let e = decode_input(&text, &raw("text", "BYTES", &[2], &ok)).unwrap_err();
        assert!(e.contains("bytes left after the 2 BYTES elements"), "{e}");
        let e = decode_input(&text, &raw("text", "BYTES", &[1], &[2, 0, 0, 0, 0xff, 0xfe])).unwrap_err();
        assert!(e.contains("element 0 is not valid UTF-8"), "{e}");
        let e = decode_input(&text, &raw("text", "BYTES", &[2, 2], &ok)).unwrap_err();
        assert!(e.contains("got BYTES [2, 2]"), "{e}");
        // JSON strings and gRPC bytes_contents.
        let data = json!(["a", "b"]);
        let v = decode_input(
            &text,
            &InputTensor { name: "t", datatype: "BYTES", shape: &[2], elements: Elements::Json(&data) },
        );
        assert!(matches!(v, Ok(Value::Text(r)) if r.as_slice() == ["a", "b"]));
        let c = InferTensorContents { bytes_contents: vec![vec![0xc3, 0x28]], ..Default::default() };
        let e = decode_input(
            &text,
            &InputTensor { name: "t", datatype: "BYTES", shape: &[1], elements: Elements::Contents(&c) },
        )
        .unwrap_err();
        assert!(e.contains("not valid UTF-8"), "{e}");
    }

    #[test]
    fn typed_grpc_contents_decode_per_datatype() {
        let contents = |c: InferTensorContents, port: &str, datatype: &str| {
            decode_input(
                &ty(port),
                &InputTensor { name: "x", datatype, shape: &[1, 2], elements: Elements::Contents(&c) },
            )
        };
        let c = InferTensorContents { fp32_contents: vec![1.0, 2.0], ..Default::default() };
        assert_eq!(
            contents(c, "f32[B,2]", "FP32").unwrap().as_tensor().unwrap().to_vec2::<f32>().unwrap(),
            [[1.0, 2.0]]
        );
        let c = InferTensorContents { fp64_contents: vec![1.0, 2.0], ..Default::default() };
        assert!(contents(c, "f64[B,2]", "FP64").is_ok());
        let c = InferTensorContents { int64_contents: vec![-1, 2], ..Default::default() };
        assert!(contents(c, "i64[B,2]", "INT64").is_ok());
        let c = InferTensorContents { uint_contents: vec![1, 70000], ..Default::default() };
        assert!(contents(c.clone(), "u32[B,2]", "UINT32").is_ok());
        assert!(contents(c, "u8[B,2]", "UINT8").unwrap_err().contains("70000 does not fit UINT8"));
        let c = InferTensorContents { fp32_contents: vec![1.0], ..Default::default() };
        assert!(contents(c, "f32[B,2]", "FP32").unwrap_err().contains("needs 2 elements, got 1"));
        let c = InferTensorContents::default();
        assert!(contents(c, "f16[B,2]", "FP16").unwrap_err().contains("raw_input_contents"));
    }

    #[test]
    fn inputs_are_matched_to_ports_by_name() {
        let ports = vec![("a".to_string(), ty("f32[B,1]")), ("b".to_string(), ty("text"))];
        let one = 1f32.to_le_bytes();
        let e = decode_inputs(&ports, &[raw("a", "FP32", &[1, 1], &one)]).unwrap_err();
        assert_eq!(e, "input `b` (BYTES [-1] or [-1, 1]) is missing");
        let e = decode_inputs(&ports, &[raw("c", "FP32", &[1, 1], &one)]).unwrap_err();
        assert_eq!(e, "unknown input `c`; the model's inputs are a, b");
        let e = decode_inputs(&ports, &[raw("a", "FP32", &[1, 1], &one), raw("a", "FP32", &[1, 1], &one)]).unwrap_err();
        assert_eq!(e, "input `a` is given twice");
    }
}
