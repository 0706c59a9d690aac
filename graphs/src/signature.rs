//! Port types and kernel signatures.
//!
//! A value on an edge is either text (a list of strings, one per batch row) or a tensor whose
//! first dimension is the batch. Types are written like `text`, `f32[B,64]`, `u32[B,S]` or
//! `f32[B,S,384]`: a dtype and a shape of dimensions, each a fixed size (`64`), a symbol (`S`,
//! bound per node; `B` is the batch, shared by the whole pipeline), `_` (any size) or a final
//! `...` (any number of further dimensions).

use std::fmt;
use std::str::FromStr;

/// Element type of a tensor port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    /// 32-bit float.
    F32,
    /// 16-bit float.
    F16,
    /// bfloat16.
    BF16,
    /// 64-bit float.
    F64,
    /// Unsigned 8-bit integer.
    U8,
    /// Unsigned 32-bit integer (token ids, masks, class indices).
    U32,
    /// Signed 64-bit integer.
    I64,
}

impl DType {
    /// All dtypes, in the order used in messages.
    pub const ALL: [DType; 7] = [DType::F32, DType::F16, DType::BF16, DType::F64, DType::U8, DType::U32, DType::I64];

    /// The name used in type strings (`f32`, `u32`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::F64 => "f64",
            DType::U8 => "u8",
            DType::U32 => "u32",
            DType::I64 => "i64",
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One dimension of a symbolic shape.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Dim {
    /// A fixed size.
    Fixed(usize),
    /// A named size: equal wherever the same name appears on one node's ports (`B`, the batch,
    /// is shared by a whole pipeline).
    Sym(String),
    /// Any size (`_`).
    Any,
    /// Any number of further dimensions (`...`); only last.
    Rest,
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Fixed(n) => write!(f, "{n}"),
            Dim::Sym(s) => f.write_str(s),
            Dim::Any => f.write_str("_"),
            Dim::Rest => f.write_str("..."),
        }
    }
}

/// The batch symbol: the first dimension of every tensor on an edge.
pub const BATCH: &str = "B";

/// The type of a port or pipeline input.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PortType {
    /// Text: one string per batch row.
    Text,
    /// A tensor of a dtype and symbolic shape; the first dimension is the batch.
    Tensor {
        /// Element type.
        dtype: DType,
        /// Symbolic shape, batch first.
        shape: Vec<Dim>,
    },
    /// Anything (text or any tensor): for pass-through kinds such as `identity`.
    Any,
}

impl PortType {
    /// A tensor type from a dtype and dims.
    pub fn tensor(dtype: DType, shape: impl IntoIterator<Item = Dim>) -> Self {
        PortType::Tensor { dtype, shape: shape.into_iter().collect() }
    }
}

impl fmt::Display for PortType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PortType::Text => f.write_str("text"),
            PortType::Any => f.write_str("any"),
            PortType::Tensor { dtype, shape } => {
                write!(f, "{dtype}[")?;
                for (i, d) in shape.iter().enumerate() {
                    if i > 0 {
                        f.write_str(",")?;
                    }
                    write!(f, "{d}")?;
                }
                f.write_str("]")
            }
        }
    }
}

/// Why a type string did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid type `{input}`: {reason} (expected `text` or a dtype and shape such as `f32[B,64]`)")]
pub struct TypeParseError {
    /// The text that was given.
    pub input: String,
    /// What is wrong with it.
    pub reason: String,
}

impl FromStr for PortType {
    type Err = TypeParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason: String| TypeParseError { input: s.to_string(), reason };
        let t = s.trim();
        match t {
            "text" => return Ok(PortType::Text),
            "any" => return Ok(PortType::Any),
            _ => {}
        }
        let Some(open) = t.find('[') else {
            return Err(err("missing `[shape]`".into()));
        };
        let Some(inner) = t[open..].strip_prefix('[').and_then(|r| r.strip_suffix(']')) else {
            return Err(err("the shape must end with `]`".into()));
        };
        let dname = t[..open].trim();
        let dtype = DType::ALL.into_iter().find(|d| d.as_str() == dname).ok_or_else(|| {
            let all: Vec<_> = DType::ALL.iter().map(|d| d.as_str()).collect();
            err(format!("unknown dtype `{dname}`; expected one of {}", all.join(", ")))
        })?;
        let parts: Vec<&str> = inner.split(',').map(str::trim).collect();
        if parts.len() == 1 && parts[0].is_empty() {
            return Err(err("a tensor has at least the batch dimension".into()));
        }
        let mut shape = Vec::with_capacity(parts.len());
        for (i, p) in parts.iter().enumerate() {
            let dim = if p.is_empty() {
                return Err(err(format!("dimension {i} is empty")));
            } else if *p == "_" {
                Dim::Any
            } else if *p == "..." {
                if i + 1 != parts.len() {
                    return Err(err("`...` may only be the last dimension".into()));
                }
                Dim::Rest
            } else if let Ok(n) = p.parse::<usize>() {
                if n == 0 {
                    return Err(err(format!("dimension {i} is 0")));
                }
                Dim::Fixed(n)
            } else if p.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
                && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            {
                Dim::Sym((*p).to_string())
            } else {
                return Err(err(format!("dimension `{p}` is not a size, a symbol, `_` or `...`")));
            };
            shape.push(dim);
        }
        match &shape[0] {
            Dim::Sym(s) if s == BATCH => {}
            Dim::Rest => {}
            other => {
                return Err(err(format!("the first dimension is the batch `B`, not `{other}`")));
            }
        }
        Ok(PortType::Tensor { dtype, shape })
    }
}

/// How a ragged dimension of a port is padded when rows of different length share a batch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ragged {
    /// The dimension whose length varies per row (e.g. 1 for `[B,S]`).
    pub dim: usize,
    /// The value that fills the padding.
    pub pad: f64,
}

/// A named, typed port of a kernel.
#[derive(Debug, Clone, PartialEq)]
pub struct PortSpec {
    /// The port's name (`input_ids`, `hidden`, `out`, ...).
    pub name: String,
    /// Its type.
    pub ty: PortType,
    /// Whether an input port may be left unconnected.
    pub optional: bool,
    /// Set when the port's length varies per row and must be padded to batch rows together.
    pub ragged: Option<Ragged>,
}

impl PortSpec {
    /// A required port.
    pub fn new(name: impl Into<String>, ty: PortType) -> Self {
        Self { name: name.into(), ty, optional: false, ragged: None }
    }

    /// Marks an input port optional.
    pub fn optional(mut self) -> Self {
        self.optional = true;
        self
    }

    /// Marks dimension `dim` ragged, padded with `pad`.
    pub fn ragged(mut self, dim: usize, pad: f64) -> Self {
        self.ragged = Some(Ragged { dim, pad });
        self
    }
}

/// What a kernel consumes and produces: the contract the graph checker enforces.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Signature {
    /// Input ports.
    pub inputs: Vec<PortSpec>,
    /// Output ports.
    pub outputs: Vec<PortSpec>,
}

impl Signature {
    /// An input port by name.
    pub fn input(&self, name: &str) -> Option<&PortSpec> {
        self.inputs.iter().find(|p| p.name == name)
    }

    /// An output port by name.
    pub fn output(&self, name: &str) -> Option<&PortSpec> {
        self.outputs.iter().find(|p| p.name == name)
    }
}

/// Shorthand for building types in signatures: `ty("f32[B,S,384]")`.
///
/// # Panics
/// On a malformed type string: meant for literal strings in kernel code, checked by tests.
pub fn ty(s: &str) -> PortType {
    match s.parse() {
        Ok(t) => t,
        Err(e) => panic!("bad type literal: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_types() {
        for s in ["text", "any", "f32[B,64]", "u32[B,S]", "f32[B,S,384]", "f32[B,_]", "f32[B,...]"] {
            assert_eq!(s.parse::<PortType>().unwrap().to_string(), s);
        }
        assert_eq!(" f32[ B , 64 ] ".parse::<PortType>().unwrap(), ty("f32[B,64]"));
    }

    #[test]
    fn rejects_bad_types_with_reasons() {
        let cases = [
            ("f33[B,3]", "unknown dtype `f33`"),
            ("f32", "missing `[shape]`"),
            ("f32[B,3", "must end with `]`"),
            ("f32[]", "at least the batch"),
            ("f32[B,0]", "dimension 1 is 0"),
            ("f32[3,B]", "first dimension is the batch"),
            ("f32[B,...,3]", "`...` may only be the last"),
            ("f32[B,-1]", "dimension `-1`"),
            ("f32[B,,3]", "dimension 1 is empty"),
        ];
        for (s, want) in cases {
            let e = s.parse::<PortType>().unwrap_err().to_string();
            assert!(e.contains(want), "{s}: {e}");
        }
    }
}
