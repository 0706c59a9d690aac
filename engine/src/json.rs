//! Values as JSON: tensors are nested arrays of numbers (batch first), text is a string (one
//! row) or a list of strings. Shared by the CLI and the HTTP API.

use candle_core::{DType as CDType, Device, Tensor};
use maas_graphs::{DType, Dim, PortType};
use maas_kernels::{Value, Values};
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

/// The element buffer of a tensor being decoded, in the port's own element type, so that a
/// request never holds its numbers twice (no intermediate `f64` copy, no document tree).
enum Elements {
    F32(Vec<f32>),
    F64(Vec<f64>),
    U8(Vec<u8>),
    U32(Vec<u32>),
    I64(Vec<i64>),
}

impl Elements {
    fn new(dtype: DType) -> Self {
        match dtype {
            DType::F32 | DType::F16 | DType::BF16 => Self::F32(Vec::new()),
            DType::F64 => Self::F64(Vec::new()),
            DType::U8 => Self::U8(Vec::new()),
            DType::U32 => Self::U32(Vec::new()),
            DType::I64 => Self::I64(Vec::new()),
        }
    }

    fn len(&self) -> usize {
        match self {
            Self::F32(v) => v.len(),
            Self::F64(v) => v.len(),
            Self::U8(v) => v.len(),
            Self::U32(v) => v.len(),
            Self::I64(v) => v.len(),
        }
    }
}

/// A JSON number as it was written: an integer keeps its exact value.
#[derive(Clone, Copy)]
enum Number {
    U(u64),
    I(i64),
    F(f64),
}

impl std::fmt::Display for Number {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::U(v) => write!(f, "{v}"),
            Self::I(v) => write!(f, "{v}"),
            Self::F(v) => write!(f, "{v:?}"),
        }
    }
}

/// Magnitudes from which f16 and bf16 round to infinity (halfway past their largest finite
/// value, 65504 and 3.3895e38; a tie rounds to even, which is infinity): anything below rounds
/// to a finite value.
const F16_OVERFLOW: f64 = 65520.0;
const BF16_OVERFLOW: f64 = 3.396_177_529_230_426_6e38;

/// Converts `n` to `dtype`, or says why it is not representable there.
fn push_number(out: &mut Elements, dtype: DType, n: Number) -> Result<(), String> {
    let float = match n {
        Number::U(v) => v as f64,
        Number::I(v) => v as f64,
        Number::F(v) => v,
    };
    let integral = |lo: f64, hi: f64| -> Result<i128, String> {
        match n {
            Number::U(v) => Ok(i128::from(v)),
            Number::I(v) => Ok(i128::from(v)),
            Number::F(v) if v.fract() == 0.0 && v >= lo && v <= hi => Ok(v as i128),
            Number::F(v) if v.fract() != 0.0 => Err(format!("{v:?} is not an integer, as {dtype} requires")),
            Number::F(v) => Err(format!("{v:?} is outside {dtype}'s range")),
        }
    };
    let out_of_range =
        |lo: &dyn std::fmt::Display, hi: &dyn std::fmt::Display| format!("{n} is outside {dtype}'s range {lo}..={hi}");
    match out {
        Elements::F32(v) => {
            // Rounding to the nearest value of the dtype must stay finite (so f32::MAX written
            // in its shortest form, 3.4028235e38, is accepted).
            let (finite, max) = match dtype {
                DType::F16 => (float.abs() < F16_OVERFLOW, 65504.0),
                DType::BF16 => (float.abs() < BF16_OVERFLOW, 3.389_531_389_251_535e38),
                _ => ((float as f32).is_finite(), f64::from(f32::MAX)),
            };
            if !float.is_finite() || !finite {
                return Err(format!("{n} is outside {dtype}'s finite range (largest magnitude {max:e})"));
            }
            v.push(float as f32);
        }
        Elements::F64(v) => {
            if !float.is_finite() {
                return Err(format!("{n} is not a finite {dtype}"));
            }
            v.push(float);
        }
        Elements::U8(v) => {
            let i = integral(0.0, 255.0)?;
            v.push(u8::try_from(i).map_err(|_| out_of_range(&0, &u8::MAX))?);
        }
        Elements::U32(v) => {
            let i = integral(0.0, f64::from(u32::MAX))?;
            v.push(u32::try_from(i).map_err(|_| out_of_range(&0, &u32::MAX))?);
        }
        Elements::I64(v) => {
            // 2^63 as f64 is already out of range; smaller floats convert exactly.
            let i = integral(-9.223_372_036_854_776e18, 9.223_372_036_854_775e18)?;
            v.push(i64::try_from(i).map_err(|_| out_of_range(&i64::MIN, &i64::MAX))?);
        }
    }
    Ok(())
}

/// Nested arrays being decoded: the shape found so far and the numbers in row-major order.
struct Tensorizer {
    dtype: DType,
    shape: Vec<usize>,
    data: Elements,
    /// The index at depth 0.
    row: usize,
    /// The port's rank, when fixed: tells whether depth 0 is the batch (rows) or the request
    /// gave one row without its batch dimension.
    rank: Option<usize>,
}

impl Tensorizer {
    fn new(dtype: DType, rank: Option<usize>) -> Self {
        Self { dtype, shape: Vec::new(), data: Elements::new(dtype), row: 0, rank }
    }

    /// The batch row being decoded, when it is known.
    fn current_row(&self) -> Option<usize> {
        match self.rank {
            Some(r) if r == self.shape.len() => Some(self.row),
            Some(r) if r == self.shape.len() + 1 => Some(0),
            _ => None,
        }
    }

    /// Records that an array of `len` items opens at `depth`.
    fn open(&mut self, depth: usize, len: Option<usize>) -> Result<(), String> {
        if self.shape.len() < depth {
            return Err(format!("mixed nesting at depth {depth}"));
        }
        if self.shape.len() == depth {
            if self.data.len() > 0 {
                return Err(format!("mixed nesting: an array at depth {depth} where numbers were found before"));
            }
            self.shape.push(len.unwrap_or(0));
        }
        Ok(())
    }

    /// Checks the item count of a closed array at `depth`.
    fn close(&mut self, depth: usize, count: usize, first: bool) -> Result<(), String> {
        if first && self.shape[depth] == 0 {
            self.shape[depth] = count;
        } else if self.shape[depth] != count {
            return Err(format!("ragged nested arrays: {count} vs {} elements at depth {depth}", self.shape[depth]));
        }
        Ok(())
    }

    fn number(&mut self, depth: usize, n: Number) -> Result<(), String> {
        if self.shape.len() != depth {
            return Err(match self.shape.get(depth) {
                Some(len) => format!("a number where an array of {len} was expected"),
                None => "expected an array (batch first), found a single number".into(),
            });
        }
        push_number(&mut self.data, self.dtype, n)
    }

    /// The tensor, with the batch dimension added when `rank` says it was left out.
    fn finish(self) -> Result<Tensor, String> {
        let rank = self.rank;
        let mut shape = self.shape;
        if shape.is_empty() {
            return Err("expected an array (batch first), found a single number".into());
        }
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
        let t = match self.data {
            Elements::F32(v) => Tensor::from_vec(v, shape.as_slice(), &dev).and_then(|t| match self.dtype {
                DType::F32 => Ok(t),
                other => t.to_dtype(maas_kernels::candle_dtype(other)),
            }),
            Elements::F64(v) => Tensor::from_vec(v, shape.as_slice(), &dev),
            Elements::U8(v) => Tensor::from_vec(v, shape.as_slice(), &dev),
            Elements::U32(v) => Tensor::from_vec(v, shape.as_slice(), &dev),
            Elements::I64(v) => Tensor::from_vec(v, shape.as_slice(), &dev),
        };
        t.map_err(|e| e.to_string())
    }
}

/// Decodes one nested-array level of a tensor straight from the JSON text.
struct Level<'a> {
    t: &'a mut Tensorizer,
    depth: usize,
    /// The first error that was not JSON syntax (kept apart so it is reported as bad input).
    error: &'a mut Option<String>,
}

impl Level<'_> {
    fn fail<E: serde::de::Error>(self, message: String) -> E {
        let at = match self.t.current_row() {
            Some(row) if self.depth > 0 => format!("row {row}: "),
            _ => String::new(),
        };
        let message = format!("{at}{message}");
        let e = E::custom(&message);
        self.error.get_or_insert(message);
        e
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for Level<'_> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Level<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a number or an array")
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<(), E> {
        match self.t.number(self.depth, Number::U(v)) {
            Ok(()) => Ok(()),
            Err(m) => Err(self.fail(m)),
        }
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<(), E> {
        match self.t.number(self.depth, Number::I(v)) {
            Ok(()) => Ok(()),
            Err(m) => Err(self.fail(m)),
        }
    }

    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<(), E> {
        match self.t.number(self.depth, Number::F(v)) {
            Ok(()) => Ok(()),
            Err(m) => Err(self.fail(m)),
        }
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let Level { t, depth, error } = self;
        let first = t.shape.len() == depth;
        if let Err(m) = t.open(depth, None) {
            return Err(Level { t, depth, error }.fail(m));
        }
        let mut count = 0;
        loop {
            if depth == 0 {
                t.row = count;
            }
            match seq.next_element_seed(Level { t: &mut *t, depth: depth + 1, error: &mut *error })? {
                Some(()) => count += 1,
                None => break,
            }
        }
        match t.close(depth, count, first) {
            Ok(()) => Ok(()),
            Err(m) => Err(Level { t, depth, error }.fail(m)),
        }
    }

    fn visit_str<E: serde::de::Error>(self, _: &str) -> Result<(), E> {
        Err(self.fail("expected a number or an array, found a string".into()))
    }

    fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<(), E> {
        Err(self.fail("expected a number or an array, found a boolean".into()))
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<(), E> {
        Err(self.fail("expected a number or an array, found null".into()))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        Err(self.fail("expected a number or an array, found an object".into()))
    }
}

/// Why a request body could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// Not JSON, or not the request's JSON shape (`{"inputs": {...}}`, nothing else).
    #[error("invalid request body: {0}")]
    Json(String),
    /// Well-formed JSON whose values do not fit the pipeline's inputs.
    #[error(transparent)]
    Input(#[from] JsonError),
}

/// Decodes an infer request body `{"inputs": {NAME: VALUE, ...}}` against the pipeline's
/// declared inputs, straight from the bytes: tensors are decoded into their final element
/// buffers as the text is read (no document tree), and every number is checked against its
/// port's dtype (range, finiteness, integrality), naming the input, row and value.
pub fn request_from_slice(body: &[u8], inputs: &[(String, PortType)]) -> Result<Values, RequestError> {
    let mut input_error = None;
    let mut de = serde_json::Deserializer::from_slice(body);
    let result = serde::de::DeserializeSeed::deserialize(Body { inputs, error: &mut input_error }, &mut de)
        .and_then(|values| de.end().map(|()| values));
    match result {
        Ok(values) => Ok(values),
        Err(e) => Err(match input_error {
            Some(input) => RequestError::Input(input),
            None => RequestError::Json(e.to_string()),
        }),
    }
}

/// The body object: exactly one key, `inputs`.
struct Body<'a> {
    inputs: &'a [(String, PortType)],
    error: &'a mut Option<JsonError>,
}

impl<'de> serde::de::DeserializeSeed<'de> for Body<'_> {
    type Value = Values;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Values, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Body<'_> {
    type Value = Values;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(r#"an object {"inputs": {...}}"#)
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Values, A::Error> {
        use serde::de::Error;
        let mut values = None;
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            if key != "inputs" {
                return Err(A::Error::custom(format!("unknown field `{key}`, expected `inputs`")));
            }
            if values.is_some() {
                return Err(A::Error::custom("duplicate field `inputs`"));
            }
            values = Some(map.next_value_seed(Inputs { inputs: self.inputs, error: &mut *self.error })?);
        }
        values.ok_or_else(|| A::Error::custom("missing field `inputs`"))
    }
}

/// The `inputs` object: one value per declared input.
struct Inputs<'a> {
    inputs: &'a [(String, PortType)],
    error: &'a mut Option<JsonError>,
}

impl<'de> serde::de::DeserializeSeed<'de> for Inputs<'_> {
    type Value = Values;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Values, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Inputs<'_> {
    type Value = Values;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an object of inputs")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Values, A::Error> {
        use serde::de::Error;
        let mut values = Values::new();
        while let Some(name) = map.next_key::<String>()? {
            let fail = |error: &mut Option<JsonError>, message: String| {
                let e = JsonError { port: name.clone(), message };
                let text = e.to_string();
                error.get_or_insert(e);
                A::Error::custom(text)
            };
            let Some((_, ty)) = self.inputs.iter().find(|(n, _)| *n == name) else {
                let known: Vec<&str> = self.inputs.iter().map(|(n, _)| n.as_str()).collect();
                let message = format!("no such input; this pipeline takes: {}", known.join(", "));
                return Err(fail(self.error, message));
            };
            if values.contains_key(&name) {
                return Err(fail(self.error, "given twice".into()));
            }
            let value = match ty {
                PortType::Tensor { dtype, shape } => {
                    let rank = (!shape.contains(&Dim::Rest)).then_some(shape.len());
                    let mut t = Tensorizer::new(*dtype, rank);
                    let mut message = None;
                    let level = Level { t: &mut t, depth: 0, error: &mut message };
                    if let Err(e) = map.next_value_seed(level) {
                        return Err(match message {
                            Some(m) => fail(self.error, m),
                            None => e,
                        });
                    }
                    t.finish().map(Value::Tensor).map_err(|m| fail(self.error, m))?
                }
                // `any`: text when the value is a string or starts with one, else an f32 tensor.
                PortType::Any => {
                    let mut t = Tensorizer::new(DType::F32, None);
                    let mut message = None;
                    let seed = AnyValue { t: &mut t, error: &mut message };
                    let text = match map.next_value_seed(seed) {
                        Ok(text) => text,
                        Err(e) => {
                            return Err(match message {
                                Some(m) => fail(self.error, m),
                                None => e,
                            });
                        }
                    };
                    match text {
                        Some(rows) => Value::text(rows),
                        None => t.finish().map(Value::Tensor).map_err(|m| fail(self.error, m))?,
                    }
                }
                PortType::Text => {
                    let mut message = None;
                    match map.next_value_seed(TextValue { error: &mut message }) {
                        Ok(rows) => Value::text(rows),
                        Err(e) => {
                            return Err(match message {
                                Some(m) => fail(self.error, m),
                                None => e,
                            });
                        }
                    }
                }
            };
            values.insert(name, value);
        }
        Ok(values)
    }
}

/// A text value straight from the JSON: one string (one row) or a list of strings; anything
/// else is refused without decoding it into a tree.
struct TextValue<'a> {
    error: &'a mut Option<String>,
}

impl TextValue<'_> {
    fn fail<E: serde::de::Error>(self, message: String) -> E {
        let e = E::custom(&message);
        self.error.get_or_insert(message);
        e
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for TextValue<'_> {
    type Value = Vec<String>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for TextValue<'_> {
    type Value = Vec<String>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a string or a list of strings")
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(vec![v.to_string()])
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        strings(seq, Vec::new(), self.error)
    }

    fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Err(self.fail("expected a string or a list of strings, found a number".into()))
    }

    fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Err(self.fail("expected a string or a list of strings, found a number".into()))
    }

    fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Err(self.fail("expected a string or a list of strings, found a number".into()))
    }

    fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Err(self.fail("expected a string or a list of strings, found a boolean".into()))
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
        Err(self.fail("expected a string or a list of strings, found null".into()))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, _: A) -> Result<Self::Value, A::Error> {
        Err(self.fail("expected a string or a list of strings, found an object".into()))
    }
}

/// The rest of a list of strings after `rows`; an item that is not a string is named by its row.
fn strings<'de, A: serde::de::SeqAccess<'de>>(
    mut seq: A,
    mut rows: Vec<String>,
    error: &mut Option<String>,
) -> Result<Vec<String>, A::Error> {
    loop {
        let row = rows.len();
        match seq.next_element_seed(OneString { row, error: &mut *error })? {
            Some(s) => rows.push(s),
            None => return Ok(rows),
        }
    }
}

/// One row of a list of strings.
struct OneString<'a> {
    row: usize,
    error: &'a mut Option<String>,
}

impl<'de> serde::de::DeserializeSeed<'de> for OneString<'_> {
    type Value = String;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<String, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for OneString<'_> {
    type Value = String;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a string")
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<String, E> {
        Ok(v.to_string())
    }

    fn visit_string<E: serde::de::Error>(self, v: String) -> Result<String, E> {
        Ok(v)
    }

    fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<String, E> {
        Err(self.fail("a number"))
    }

    fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<String, E> {
        Err(self.fail("a number"))
    }

    fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<String, E> {
        Err(self.fail("a number"))
    }

    fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<String, E> {
        Err(self.fail("a boolean"))
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<String, E> {
        Err(self.fail("null"))
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, _: A) -> Result<String, A::Error> {
        Err(self.fail("an array"))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, _: A) -> Result<String, A::Error> {
        Err(self.fail("an object"))
    }
}

impl OneString<'_> {
    fn fail<E: serde::de::Error>(self, found: &str) -> E {
        let message = format!("row {}: expected a string like every text row, found {found}", self.row);
        let e = E::custom(&message);
        self.error.get_or_insert(message);
        e
    }
}

/// A value for an `any` port, decided by its first leaf: a string (or a list of strings) is
/// text, the result; anything else is decoded as an f32 tensor into the [`Tensorizer`].
struct AnyValue<'a> {
    t: &'a mut Tensorizer,
    error: &'a mut Option<String>,
}

impl<'de> serde::de::DeserializeSeed<'de> for AnyValue<'_> {
    type Value = Option<Vec<String>>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for AnyValue<'_> {
    type Value = Option<Vec<String>>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("text or nested arrays of numbers")
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Some(vec![v.to_string()]))
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Self::Value, E> {
        Level { t: self.t, depth: 0, error: self.error }.visit_u64(v).map(|()| None)
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Self::Value, E> {
        Level { t: self.t, depth: 0, error: self.error }.visit_i64(v).map(|()| None)
    }

    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Self::Value, E> {
        Level { t: self.t, depth: 0, error: self.error }.visit_f64(v).map(|()| None)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        use serde::de::Error;
        let AnyValue { t, error } = self;
        if let Err(m) = t.open(0, None) {
            error.get_or_insert(m.clone());
            return Err(A::Error::custom(m));
        }
        // The first item decides: a string makes the whole value text.
        let first = match seq.next_element_seed(FirstItem { t: &mut *t, error: &mut *error })? {
            // `[]`: no rows of text, as the CLI reads it too.
            None => return Ok(Some(Vec::new())),
            Some(first) => first,
        };
        if let Some(s) = first {
            return strings(seq, vec![s], error).map(Some);
        }
        let mut count = 1;
        loop {
            t.row = count;
            match seq.next_element_seed(Level { t: &mut *t, depth: 1, error: &mut *error })? {
                Some(()) => count += 1,
                None => break,
            }
        }
        if let Err(m) = t.close(0, count, true) {
            error.get_or_insert(m.clone());
            return Err(A::Error::custom(m));
        }
        Ok(None)
    }

    fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Err(self.fail("a boolean"))
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
        Err(self.fail("null"))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, _: A) -> Result<Self::Value, A::Error> {
        Err(self.fail("an object"))
    }
}

impl AnyValue<'_> {
    fn fail<E: serde::de::Error>(self, found: &str) -> E {
        let message = format!("expected text or an array of numbers, found {found}");
        let e = E::custom(&message);
        self.error.get_or_insert(message);
        e
    }
}

/// The first item of an `any` array: a string (returned), or the first row of a tensor
/// (decoded into the [`Tensorizer`] at depth 1).
struct FirstItem<'a> {
    t: &'a mut Tensorizer,
    error: &'a mut Option<String>,
}

impl<'de> serde::de::DeserializeSeed<'de> for FirstItem<'_> {
    type Value = Option<String>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for FirstItem<'_> {
    type Value = Option<String>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a string, a number or an array")
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Some(v.to_string()))
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Self::Value, E> {
        Level { t: self.t, depth: 1, error: self.error }.visit_u64(v).map(|()| None)
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Self::Value, E> {
        Level { t: self.t, depth: 1, error: self.error }.visit_i64(v).map(|()| None)
    }

    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Self::Value, E> {
        Level { t: self.t, depth: 1, error: self.error }.visit_f64(v).map(|()| None)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        Level { t: self.t, depth: 1, error: self.error }.visit_seq(seq).map(|()| None)
    }

    fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Err(self.error_at("a boolean"))
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
        Err(self.error_at("null"))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, _: A) -> Result<Self::Value, A::Error> {
        Err(self.error_at("an object"))
    }
}

impl FirstItem<'_> {
    fn error_at<E: serde::de::Error>(self, found: &str) -> E {
        Level { t: self.t, depth: 1, error: self.error }.fail(format!("expected a number or an array, found {found}"))
    }
}

fn tensor_from_json(json: &Json, dtype: DType, rank: Option<usize>) -> Result<Tensor, String> {
    let mut t = Tensorizer::new(dtype, rank);
    let mut message = None;
    serde::de::DeserializeSeed::deserialize(Level { t: &mut t, depth: 0, error: &mut message }, json)
        .map_err(|e: serde_json::Error| message.unwrap_or_else(|| e.to_string()))?;
    t.finish()
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
        assert!(e.message.contains("1.5 is not an integer, as u32 requires"), "{e}");
        assert!(value_from_json("t", &ty("text"), &json!(3)).is_err());
        let t = value_from_json("t", &ty("text"), &json!("hi")).unwrap();
        assert_eq!(t.as_text().unwrap(), ["hi"]);
    }

    fn ports() -> Vec<(String, PortType)> {
        vec![("pixels".into(), ty("f32[B,2]")), ("ids".into(), ty("u32[B]")), ("t".into(), ty("text"))]
    }

    #[test]
    fn a_request_body_decodes_straight_into_tensors() {
        let body = br#"{"inputs": {"pixels": [[1, 2.5], [3, -4e3]], "ids": [7, 8], "t": ["a", "b"]}}"#;
        let v = request_from_slice(body, &ports()).unwrap();
        assert_eq!(value_to_json(&v["pixels"]).unwrap(), json!([[1.0, 2.5], [3.0, -4000.0]]));
        assert_eq!(value_to_json(&v["ids"]).unwrap(), json!([7, 8]));
        assert_eq!(v["t"].as_text().unwrap(), ["a", "b"]);
        let one = request_from_slice(br#"{"inputs": {"pixels": [1, 2]}}"#, &ports()).unwrap();
        assert_eq!(one["pixels"].as_tensor().unwrap().dims(), &[1, 2]);
    }

    #[test]
    fn numbers_outside_the_ports_dtype_are_refused_naming_input_row_and_value() {
        let cases: [(&[u8], &str, &str); 8] = [
            (
                br#"{"inputs": {"pixels": [[1, 2], [3, -1e39]]}}"#,
                "pixels",
                "row 1: -1e39 is outside f32's finite range",
            ),
            (
                br#"{"inputs": {"ids": [1, 1099511627776]}}"#,
                "ids",
                "row 1: 1099511627776 is outside u32's range 0..=4294967295",
            ),
            (br#"{"inputs": {"ids": [-1]}}"#, "ids", "row 0: -1 is outside u32's range"),
            (br#"{"inputs": {"ids": [1.5]}}"#, "ids", "row 0: 1.5 is not an integer"),
            (br#"{"inputs": {"pixels": [[1, 2], [3]]}}"#, "pixels", "ragged"),
            (br#"{"inputs": {"pixels": [[1, "a"]]}}"#, "pixels", "found a string"),
            (br#"{"inputs": {"nope": [1]}}"#, "nope", "no such input; this pipeline takes: pixels, ids, t"),
            (br#"{"inputs": {"ids": [1], "ids": [2]}}"#, "ids", "given twice"),
        ];
        for (body, port, want) in cases {
            match request_from_slice(body, &ports()) {
                Err(RequestError::Input(e)) => {
                    assert_eq!(e.port, port);
                    assert!(e.message.contains(want), "{e} does not contain {want}");
                }
                other => panic!("{}: {other:?}", String::from_utf8_lossy(body)),
            }
        }
        // Written as ryu writes f32::MAX: rounds to it, so it is in range.
        assert!(request_from_slice(br#"{"inputs": {"pixels": [[3.4028235e38, -3.4028235e38]]}}"#, &ports()).is_ok());
        let e = request_from_slice(br#"{"inputs": {"t": ["a", 2]}}"#, &ports()).unwrap_err();
        assert!(matches!(&e, RequestError::Input(e) if e.port == "t" && e.message.contains("row 1")), "{e:?}");
        let e = request_from_slice(br#"{"inputs": {"t": [[1, 2, 3]]}}"#, &ports()).unwrap_err();
        assert!(matches!(&e, RequestError::Input(e) if e.port == "t"), "{e:?}");
        let f16 = vec![("h".to_string(), ty("f16[B]"))];
        let e = request_from_slice(br#"{"inputs": {"h": [70000]}}"#, &f16).unwrap_err();
        assert!(e.to_string().contains("outside f16's finite range"), "{e}");
        assert!(request_from_slice(br#"{"inputs": {"h": [65504, 65519]}}"#, &f16).is_ok());
        assert!(request_from_slice(br#"{"inputs": {"h": [65520]}}"#, &f16).is_err());
    }

    #[test]
    fn malformed_bodies_are_json_errors() {
        for body in [&b""[..], b"{", br#"{"inputs": {}, "x": 1}"#, br#"{"input": {}}"#, b"[]", br#"{"inputs": {}} x"#] {
            match request_from_slice(body, &ports()) {
                Err(RequestError::Json(_)) => {}
                other => panic!("{}: {other:?}", String::from_utf8_lossy(body)),
            }
        }
        // A number beyond f64 is a syntax-level error of the JSON parser.
        assert!(matches!(
            request_from_slice(br#"{"inputs": {"pixels": [1e400, 1]}}"#, &ports()),
            Err(RequestError::Json(_))
        ));
    }

    #[test]
    fn any_ports_decode_text_or_tensors_without_a_tree() {
        let any = vec![("x".to_string(), ty("any"))];
        let v = request_from_slice(br#"{"inputs": {"x": [[1, 2], [3, 4]]}}"#, &any).unwrap();
        assert_eq!(value_to_json(&v["x"]).unwrap(), json!([[1.0, 2.0], [3.0, 4.0]]));
        let v = request_from_slice(br#"{"inputs": {"x": [1, 2, 3]}}"#, &any).unwrap();
        assert_eq!(v["x"].as_tensor().unwrap().dims(), &[3]);
        let v = request_from_slice(br#"{"inputs": {"x": ["a", "b"]}}"#, &any).unwrap();
        assert_eq!(v["x"].as_text().unwrap(), ["a", "b"]);
        let v = request_from_slice(br#"{"inputs": {"x": "a"}}"#, &any).unwrap();
        assert_eq!(v["x"].as_text().unwrap(), ["a"]);
        for (body, want) in [
            (&br#"{"inputs": {"x": ["a", 1]}}"#[..], "row 1: expected a string"),
            (br#"{"inputs": {"x": true}}"#, "found a boolean"),
            (br#"{"inputs": {"x": [[1], ["a"]]}}"#, "found a string"),
        ] {
            match request_from_slice(body, &any) {
                Err(RequestError::Input(e)) => assert!(e.message.contains(want), "{e}"),
                other => panic!("{}: {other:?}", String::from_utf8_lossy(body)),
            }
        }
        let v = request_from_slice(br#"{"inputs": {"x": []}}"#, &any).unwrap();
        assert_eq!(v["x"].as_text().unwrap().len(), 0, "[] is no rows of text, as on the CLI");
        let e = request_from_slice(br#"{"inputs": {"x": [[1], [1e39]]}}"#, &any).unwrap_err();
        assert!(e.to_string().contains("1e39 is outside f32's finite range"), "{e}");
        assert!(request_from_slice(br#"{"inputs": {"x": [[1], [2, 3]]}}"#, &any).is_err());
    }

    #[test]
    fn the_cli_path_is_as_strict() {
        let e = value_from_json("x", &ty("f32[B,1]"), &json!([[-1e39]])).unwrap_err();
        assert!(e.message.contains("outside f32's finite range"), "{e}");
        let e = value_from_json("x", &ty("u8[B]"), &json!([256])).unwrap_err();
        assert!(e.message.contains("outside u8's range"), "{e}");
    }
}
