//! Values as JSON: tensors are nested arrays of numbers (batch first), text is a string (one
//! row) or a list of strings. Shared by the CLI and the HTTP API.

use candle_core::{DType as CDType, Device, Tensor};
use maas_graphs::{DType, Dim, PortType};
use maas_kernels::Value;
use serde_json::Value as Json;

/// Why a JSON value does not fit a port.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("input `{port}`: {message}")]
pub struct JsonError {
    /// The port (pipeline input) it was for.
    pub port: String,
    /// What does not fit.
    pub message: String,
}

/// Converts JSON to a value of type `ty` for port `port`.
///
/// A tensor given without its batch dimension (one rank less than declared) is taken as a
/// batch of one row; text may be one string (one row) or a list of strings.
pub fn value_from_json(port: &str, ty: &PortType, json: &Json) -> Result<Value, JsonError> {
    let err = |message: String| JsonError { port: port.to_string(), message };
    match ty {
        PortType::Text => text_from_json(json).ok_or_else(|| err("expected a string or a list of strings".into())),
        PortType::Any => match json {
            Json::String(_) => text_from_json(json).ok_or_else(|| err("bad text".into())),
            Json::Array(a) if a.iter().all(Json::is_string) => {
                text_from_json(json).ok_or_else(|| err("bad text".into()))
            }
            _ => tensor_from_json(json, DType::F32, None).map(Value::Tensor).map_err(err),
        },
        PortType::Tensor { dtype, shape } => {
            let rank = (!shape.contains(&Dim::Rest)).then_some(shape.len());
            tensor_from_json(json, *dtype, rank).map(Value::Tensor).map_err(err)
        }
    }
}

fn text_from_json(json: &Json) -> Option<Value> {
    match json {
        Json::String(s) => Some(Value::text([s.clone()])),
        Json::Array(a) => {
            let rows: Option<Vec<String>> = a.iter().map(|v| v.as_str().map(str::to_string)).collect();
            rows.map(Value::text)
        }
        _ => None,
    }
}

/// Walks nested arrays: collects the shape and the numbers in row-major order.
fn flatten(json: &Json, depth: usize, shape: &mut Vec<usize>, out: &mut Vec<f64>) -> Result<(), String> {
    match json {
        Json::Array(items) => {
            if shape.len() == depth {
                shape.push(items.len());
            } else if shape.len() > depth && shape[depth] != items.len() {
                return Err(format!(
                    "ragged nested arrays: {} vs {} elements at depth {depth}",
                    items.len(),
                    shape[depth]
                ));
            } else if shape.len() < depth {
                return Err(format!("mixed nesting at depth {depth}"));
            }
            for item in items {
                flatten(item, depth + 1, shape, out)?;
            }
            Ok(())
        }
        Json::Number(n) => {
            if shape.len() != depth {
                return Err(format!("a number where an array of {} was expected", shape[depth]));
            }
            let v = n.as_f64().ok_or_else(|| format!("number {n} is not representable"))?;
            if !v.is_finite() {
                return Err(format!("number {n} is not finite"));
            }
            out.push(v);
            Ok(())
        }
        other => Err(format!("expected a number or an array, found {}", kind(other))),
    }
}

fn kind(j: &Json) -> &'static str {
    match j {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "an array",
        Json::Object(_) => "an object",
    }
}

fn tensor_from_json(json: &Json, dtype: DType, rank: Option<usize>) -> Result<Tensor, String> {
    let mut shape = Vec::new();
    let mut data = Vec::new();
    flatten(json, 0, &mut shape, &mut data)?;
    if shape.is_empty() {
        return Err("expected an array (batch first), found a single number".into());
    }
    // An empty row list leaves inner sizes unknown; only [] with rank 1 is meaningful then.
    if let Some(rank) = rank {
        if shape.len() + 1 == rank {
            shape.insert(0, 1);
        } else if shape.len() != rank {
            return Err(format!(
                "expected {rank} nested levels (batch first), found {} (shape {shape:?})",
                shape.len()
            ));
        }
    }
    let dev = Device::Cpu;
    let t = match dtype {
        DType::U32 | DType::U8 | DType::I64 => {
            if let Some(bad) = data.iter().find(|v| v.fract() != 0.0 || (**v < 0.0 && dtype != DType::I64)) {
                return Err(format!("{bad} is not a valid {dtype}"));
            }
            match dtype {
                DType::U32 => {
                    Tensor::from_vec(data.iter().map(|v| *v as u32).collect::<Vec<_>>(), shape.as_slice(), &dev)
                }
                DType::U8 => {
                    Tensor::from_vec(data.iter().map(|v| *v as u8).collect::<Vec<_>>(), shape.as_slice(), &dev)
                }
                _ => Tensor::from_vec(data.iter().map(|v| *v as i64).collect::<Vec<_>>(), shape.as_slice(), &dev),
            }
        }
        DType::F64 => Tensor::from_vec(data, shape.as_slice(), &dev),
        DType::F32 | DType::F16 | DType::BF16 => {
            Tensor::from_vec(data.iter().map(|v| *v as f32).collect::<Vec<_>>(), shape.as_slice(), &dev)
                .and_then(|t| t.to_dtype(maas_kernels::candle_dtype(dtype)))
        }
    };
    t.map_err(|e| e.to_string())
}

/// Converts a value to JSON (tensors as nested arrays, batch first; text as a list).
pub fn value_to_json(v: &Value) -> Result<Json, candle_core::Error> {
    match v {
        Value::Text(rows) => Ok(Json::Array(rows.iter().cloned().map(Json::String).collect())),
        Value::Tensor(t) => {
            let t = t.to_device(&Device::Cpu)?;
            let dims = t.dims().to_vec();
            let flat = t.flatten_all()?;
            let leaves: Vec<Json> = match t.dtype() {
                CDType::U8 | CDType::U32 | CDType::I64 => {
                    flat.to_dtype(CDType::I64)?.to_vec1::<i64>()?.into_iter().map(Json::from).collect()
                }
                _ => flat
                    .to_dtype(CDType::F64)?
                    .to_vec1::<f64>()?
                    .into_iter()
                    .map(|x| serde_json::Number::from_f64(x).map_or(Json::Null, Json::Number))
                    .collect(),
            };
            Ok(nest(&leaves, &dims))
        }
    }
}

fn nest(leaves: &[Json], dims: &[usize]) -> Json {
    match dims.split_first() {
        None => leaves.first().cloned().unwrap_or(Json::Null),
        Some((_, rest)) => {
            let step: usize = rest.iter().product();
            if step == 0 {
                return Json::Array(vec![Json::Array(vec![]); dims[0]]);
            }
            Json::Array(leaves.chunks(step).map(|c| nest(c, rest)).collect())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use maas_graphs::ty;
    use serde_json::json;

    #[test]
    fn tensors_round_trip_and_keep_the_batch() {
        let v = value_from_json("x", &ty("f32[B,2]"), &json!([[1, 2.5], [3, 4]])).unwrap();
        assert_eq!(value_to_json(&v).unwrap(), json!([[1.0, 2.5], [3.0, 4.0]]));
        let one = value_from_json("x", &ty("f32[B,2]"), &json!([1, 2])).unwrap();
        assert_eq!(one.as_tensor().unwrap().dims(), &[1, 2]);
        let ids = value_from_json("x", &ty("u32[B]"), &json!([7, 8])).unwrap();
        assert_eq!(value_to_json(&ids).unwrap(), json!([7, 8]));
    }

    #[test]
    fn bad_json_is_an_error_naming_the_port() {
        let cases = [
            (json!([[1, 2], [3]]), "ragged"),
            (json!([[1, "a"]]), "found a string"),
            (json!(5), "single number"),
            (json!([[[1]]]), "expected 2 nested levels"),
        ];
        for (j, want) in cases {
            let e = value_from_json("pixels", &ty("f32[B,2]"), &j).unwrap_err();
            assert_eq!(e.port, "pixels");
            assert!(e.to_string().contains(want), "{e}");
        }
        let e = value_from_json("ids", &ty("u32[B]"), &json!([1.5])).unwrap_err();
        assert!(e.message.contains("not a valid u32"));
        assert!(value_from_json("t", &ty("text"), &json!(3)).is_err());
        let t = value_from_json("t", &ty("text"), &json!("hi")).unwrap();
        assert_eq!(t.as_text().unwrap(), ["hi"]);
    }
}
