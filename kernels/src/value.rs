//! Values that flow along pipeline edges.

use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::Tensor;

/// A value on an edge: a tensor whose first dimension is the batch, or text (one string per
/// batch row). Cloning is cheap (reference-counted).
#[derive(Debug, Clone)]
pub enum Value {
    /// A tensor, batch first.
    Tensor(Tensor),
    /// Text, one string per row.
    Text(Arc<Vec<String>>),
}

impl Value {
    /// Text from strings.
    pub fn text<S: Into<String>>(rows: impl IntoIterator<Item = S>) -> Self {
        Value::Text(Arc::new(rows.into_iter().map(Into::into).collect()))
    }

    /// The number of batch rows (`None` for a rank-0 tensor, which has no batch).
    pub fn rows(&self) -> Option<usize> {
        match self {
            Value::Tensor(t) => t.dims().first().copied(),
            Value::Text(v) => Some(v.len()),
        }
    }

    /// The tensor, if this is one. candle copies it out as plain numbers of its dtype:
    /// `value.as_tensor()?.to_vec2::<f32>()` for `f32[B,N]`, `to_vec1::<u32>()` for `u32[B]`
    /// (also `to_vec3`, `to_scalar`).
    pub fn as_tensor(&self) -> Option<&Tensor> {
        match self {
            Value::Tensor(t) => Some(t),
            Value::Text(_) => None,
        }
    }

    /// The text rows, if this is text.
    pub fn as_text(&self) -> Option<&[String]> {
        match self {
            Value::Text(v) => Some(v),
            Value::Tensor(_) => None,
        }
    }
}

impl From<Tensor> for Value {
    fn from(t: Tensor) -> Self {
        Value::Tensor(t)
    }
}

/// Named values: a batch of inputs or the outputs of one forward pass, by port name.
pub type Values = BTreeMap<String, Value>;
