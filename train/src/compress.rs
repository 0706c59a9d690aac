//! Gradient compression on the worker-to-server path, with error feedback.
//!
//! A worker turns each gradient it sends into one message with a [`Compressor`] (one per
//! gradient tensor it pushes, since the residual is per tensor); the server reads it back with
//! [`decode`]. Methods ([`Compression`], written as in `--compression`):
//!
//! | method | keeps | message bytes for `n` values |
//! |---|---|---|
//! | `none` | every value | `5 + 4n` |
//! | `topk:D` | the `k = ceil(D n)` values of largest magnitude, as index/value pairs | `9 + 8k` |
//! | `int8` | every value as `round(x / s)`, `s = max abs / 127` | `9 + n` |
//! | `sign` | the sign of every value, one bit each, times `s = mean abs` | `9 + ceil(n / 8)` |
//!
//! **Error feedback** (on by default): what a message leaves out (the gradient plus the last
//! residual, minus what the message decodes to) is kept and added to the next gradient, so
//! that over many steps everything is sent eventually: the sum of what the server received
//! plus the residual still held equals the sum of the gradients.
//!
//! **Wire format** (little-endian; the same bytes whether the server is a thread away or on
//! another machine): a tag byte (0 dense, 1 top-k, 2 int8, 3 sign), the value count `n` as
//! u32, then for top-k the count `k` as u32, `k` strictly increasing u32 indices and `k` f32
//! values; for int8 the f32 scale and `n` i8; for sign the f32 scale and `ceil(n / 8)` bytes
//! (bit `i % 8` of byte `i / 8` set: `+s`, clear: `-s`); for dense `n` f32. [`decode`] checks
//! the count against the tensor the server holds and every length, index and float before it
//! allocates, so a truncated, padded or hostile message is a [`MessageError`].

use std::fmt;
use std::str::FromStr;

/// How a gradient is compressed (`--compression`, `compression = "..."`).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Compression {
    /// Every value as f32.
    None,
    /// The largest `density` fraction of the values by magnitude, as index/value pairs.
    TopK {
        /// The fraction of values sent, in (0, 1].
        density: f32,
    },
    /// Every value as an i8 times one f32 scale per tensor.
    Int8,
    /// One bit per value (its sign) times one f32 scale per tensor (the mean magnitude).
    Sign,
}

/// A `--compression` value that is not one of the methods.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown compression `{0}`: expected none, topk:DENSITY (0 < DENSITY <= 1), int8 or sign")]
pub struct ParseCompressionError(pub String);

impl FromStr for Compression {
    type Err = ParseCompressionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseCompressionError(s.to_string());
        match s {
            "none" => Ok(Self::None),
            "int8" => Ok(Self::Int8),
            "sign" => Ok(Self::Sign),
            _ => {
                let density: f32 = s.strip_prefix("topk:").ok_or_else(err)?.parse().map_err(|_| err())?;
                if density > 0.0 && density <= 1.0 { Ok(Self::TopK { density }) } else { Err(err()) }
            }
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::None => f.write_str("none"),
            Self::TopK { density } => write!(f, "topk:{density}"),
            Self::Int8 => f.write_str("int8"),
            Self::Sign => f.write_str("sign"),
        }
    }
}

const DENSE: u8 = 0;
const TOPK: u8 = 1;
const INT8: u8 = 2;
const SIGN: u8 = 3;

/// The size of the dense message for `n` values: what a gradient costs uncompressed.
pub fn dense_bytes(n: usize) -> usize {
    5 + 4 * n
}

/// The values a top-k message keeps out of `n` at `density`: `ceil(density * n)`, at least one
/// (when there is one) and at most `n`.
pub fn topk_count(n: usize, density: f32) -> usize {
    // In f32, as the density was written: 0.05 of 1000 is 50 (in f64, 0.05f32 is a hair
    // above 0.05 and the product rounds up to 51).
    ((density * n as f32).ceil() as usize).clamp(n.min(1), n)
}

/// Compresses one gradient tensor's successive gradients, keeping its error-feedback residual
/// and counting the bytes it produced.
#[derive(Debug, Clone)]
pub struct Compressor {
    method: Compression,
    error_feedback: bool,
    /// What earlier messages left out (error feedback); empty when off or before the first.
    residual: Vec<f32>,
    bytes_sent: u64,
    bytes_dense: u64,
    messages: u64,
}

impl Compressor {
    /// A compressor for `method`, with error feedback or without.
    pub fn new(method: Compression, error_feedback: bool) -> Self {
        Self { method, error_feedback, residual: Vec::new(), bytes_sent: 0, bytes_dense: 0, messages: 0 }
    }

    /// The method.
    pub fn method(&self) -> Compression {
        self.method
    }

    /// The message for `grad` (plus the residual, with error feedback); the residual becomes
    /// what this message leaves out. A gradient of another length than the last restarts the
    /// residual. A NaN or infinite value is refused (nothing is sent or kept).
    pub fn encode(&mut self, grad: &[f32]) -> Result<Vec<u8>, MessageError> {
        let mut g = grad.to_vec();
        if self.error_feedback && self.residual.len() == g.len() {
            for (g, r) in g.iter_mut().zip(&self.residual) {
                *g += r;
            }
        }
        if !g.iter().all(|v| v.is_finite()) {
            return Err(MessageError::NonFinite("gradient"));
        }
        let msg = encode(self.method, &g);
        if self.error_feedback {
            let sent = decode(&msg, g.len())?;
            for (g, s) in g.iter_mut().zip(&sent) {
                *g -= s;
            }
            self.residual = g;
        }
        self.bytes_sent += msg.len() as u64;
        self.bytes_dense += dense_bytes(grad.len()) as u64;
        self.messages += 1;
        Ok(msg)
    }

    /// What the messages so far left out (empty without error feedback).
    pub fn residual(&self) -> &[f32] {
        &self.residual
    }

    /// Bytes of every message produced, counted from the messages themselves.
    pub fn bytes_sent(&self) -> u64 {
        self.bytes_sent
    }

    /// Bytes the same gradients would have taken as dense messages.
    pub fn bytes_dense(&self) -> u64 {
        self.bytes_dense
    }

    /// Messages produced.
    pub fn messages(&self) -> u64 {
        self.messages
    }
}

/// One message for `values` with `method` (no error feedback: see [`Compressor`]).
///
/// # Panics
/// If `values` has more than `u32::MAX` elements.
pub fn encode(method: Compression, values: &[f32]) -> Vec<u8> {
    let n = u32::try_from(values.len()).expect("a gradient of at most u32::MAX values");
    let header = |tag: u8, extra: usize| {
        let mut m = Vec::with_capacity(5 + extra);
        m.push(tag);
        m.extend_from_slice(&n.to_le_bytes());
        m
    };
    match method {
        Compression::None => {
            let mut m = header(DENSE, 4 * values.len());
            for v in values {
                m.extend_from_slice(&v.to_le_bytes());
            }
            m
        }
        Compression::TopK { density } => {
            let k = topk_count(values.len(), density);
            let mut order: Vec<u32> = (0..n).collect();
            if k < values.len() {
                // The k largest magnitudes first (ties broken by index, so the choice is
                // deterministic), then in index order.
                let key = |i: &u32| (values[*i as usize].abs(), std::cmp::Reverse(*i));
                order.select_nth_unstable_by(k - 1, |a, b| {
                    key(b).partial_cmp(&key(a)).unwrap_or(std::cmp::Ordering::Equal)
                });
                order.truncate(k);
                order.sort_unstable();
            }
            let mut m = header(TOPK, 4 + 8 * k);
            m.extend_from_slice(&(k as u32).to_le_bytes());
            for i in &order {
                m.extend_from_slice(&i.to_le_bytes());
            }
            for i in &order {
                m.extend_from_slice(&values[*i as usize].to_le_bytes());
            }
            m
        }
        Compression::Int8 => {
            let max = values.iter().fold(0f32, |m, v| m.max(v.abs()));
            let scale = max / 127.0;
            let mut m = header(INT8, 4 + values.len());
            m.extend_from_slice(&scale.to_le_bytes());
            for v in values {
                let q = if scale > 0.0 { (v / scale).round().clamp(-127.0, 127.0) as i8 } else { 0 };
                m.push(q as u8);
            }
            m
        }
        Compression::Sign => {
            let scale = if values.is_empty() {
                0.0
            } else {
                (values.iter().map(|v| f64::from(v.abs())).sum::<f64>() / values.len() as f64) as f32
            };
            let mut m = header(SIGN, 4 + values.len().div_ceil(8));
            m.extend_from_slice(&scale.to_le_bytes());
            for chunk in values.chunks(8) {
                let byte = chunk.iter().enumerate().fold(0u8, |b, (i, v)| if *v >= 0.0 { b | (1 << i) } else { b });
                m.push(byte);
            }
            m
        }
    }
}

/// Why a message was refused (or, for a NaN or infinite gradient, not made).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    /// Shorter than its header, or than what its header announces, or longer.
    #[error("message of {got} bytes, expected {expected}")]
    Length {
        /// The length the header implies.
        expected: usize,
        /// The message's length.
        got: usize,
    },
    /// An unknown method tag.
    #[error("unknown message tag {0}")]
    Tag(u8),
    /// The message is for a tensor of another size.
    #[error("message of {got} values for a tensor of {expected}")]
    Count {
        /// The tensor's size.
        expected: usize,
        /// The message's value count.
        got: usize,
    },
    /// A top-k index out of range or not after the previous one.
    #[error("top-k index {index} at position {position} is out of range or out of order")]
    Index {
        /// The index.
        index: u32,
        /// Its position among the message's indices.
        position: usize,
    },
    /// A NaN or infinite value or scale.
    #[error("non-finite {0} in the message")]
    NonFinite(&'static str),
}

fn u32_at(msg: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([msg[at], msg[at + 1], msg[at + 2], msg[at + 3]])
}

fn f32_at(msg: &[u8], at: usize) -> f32 {
    f32::from_le_bytes([msg[at], msg[at + 1], msg[at + 2], msg[at + 3]])
}

/// The gradient a message carries, for a tensor of `expected` values.
pub fn decode(msg: &[u8], expected: usize) -> Result<Vec<f32>, MessageError> {
    let length = |want: usize| {
        if msg.len() == want { Ok(()) } else { Err(MessageError::Length { expected: want, got: msg.len() }) }
    };
    if msg.len() < 5 {
        return Err(MessageError::Length { expected: 5, got: msg.len() });
    }
    let n = u32_at(msg, 1) as usize;
    if n != expected {
        return Err(MessageError::Count { expected, got: n });
    }
    let finite = |v: f32, what| if v.is_finite() { Ok(v) } else { Err(MessageError::NonFinite(what)) };
    match msg[0] {
        DENSE => {
            length(5 + 4 * n)?;
            (0..n).map(|i| finite(f32_at(msg, 5 + 4 * i), "value")).collect()
        }
        TOPK => {
            if msg.len() < 9 {
                return Err(MessageError::Length { expected: 9, got: msg.len() });
            }
            let k = u32_at(msg, 5) as usize;
            if k > n {
                return Err(MessageError::Count { expected: n, got: k });
            }
            length(9 + 8 * k)?;
            let mut out = vec![0f32; n];
            let mut next = 0usize;
            for p in 0..k {
                let index = u32_at(msg, 9 + 4 * p);
                let i = index as usize;
                if i < next || i >= n {
                    return Err(MessageError::Index { index, position: p });
                }
                next = i + 1;
                out[i] = finite(f32_at(msg, 9 + 4 * k + 4 * p), "value")?;
            }
            Ok(out)
        }
        INT8 => {
            length(9 + n)?;
            let scale = finite(f32_at(msg, 5), "scale")?;
            Ok(msg[9..].iter().map(|q| f32::from(*q as i8) * scale).collect())
        }
        SIGN => {
            length(9 + n.div_ceil(8))?;
            let scale = finite(f32_at(msg, 5), "scale")?;
            Ok((0..n).map(|i| if msg[9 + i / 8] >> (i % 8) & 1 == 1 { scale } else { -scale }).collect())
        }
        tag => Err(MessageError::Tag(tag)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wave(n: usize, seed: f32) -> Vec<f32> {
        (0..n).map(|i| ((i as f32 * 0.37 + seed).sin() * (1.0 + (i % 7) as f32)).powi(3)).collect()
    }

    #[test]
    fn methods_parse_and_print_as_written() {
        for s in ["none", "int8", "sign", "topk:0.01", "topk:1"] {
            assert_eq!(s.parse::<Compression>().unwrap().to_string(), s);
        }
        for bad in ["topk", "topk:0", "topk:1.5", "topk:-0.1", "topk:x", "int4", ""] {
            let e = bad.parse::<Compression>().unwrap_err();
            assert!(e.to_string().contains(&format!("`{bad}`")), "{e}");
        }
    }

    #[test]
    fn dense_round_trip_is_exact() {
        let g = wave(1000, 0.3);
        let m = encode(Compression::None, &g);
        assert_eq!(m.len(), dense_bytes(g.len()));
        assert_eq!(decode(&m, g.len()).unwrap(), g);
    }

    #[test]
    fn topk_keeps_exactly_the_largest_magnitudes() {
        let g = wave(1000, 1.1);
        let m = encode(Compression::TopK { density: 0.05 }, &g);
        assert_eq!(m.len(), 9 + 8 * 50);
        let d = decode(&m, g.len()).unwrap();
        let kept: Vec<usize> = (0..g.len()).filter(|&i| d[i] != 0.0).collect();
        assert_eq!(kept.len(), 50);
        let smallest_kept = kept.iter().map(|&i| g[i].abs()).fold(f32::INFINITY, f32::min);
        for i in 0..g.len() {
            if d[i] != 0.0 {
                assert_eq!(d[i], g[i], "a kept value is sent exactly");
            } else {
                assert!(g[i].abs() <= smallest_kept, "value {i} ({}) larger than a kept one", g[i]);
            }
        }
    }

    #[test]
    fn int8_is_within_half_a_step_and_sign_is_the_mean_magnitude() {
        let g = wave(999, 2.0);
        let max = g.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = decode(&encode(Compression::Int8, &g), g.len()).unwrap();
        for (a, b) in g.iter().zip(&d) {
            assert!((a - b).abs() <= max / 127.0 * 0.5 + 1e-6, "{a} vs {b}");
        }
        let m = encode(Compression::Sign, &g);
        assert_eq!(m.len(), 9 + 999usize.div_ceil(8));
        let mean = g.iter().map(|v| v.abs()).sum::<f32>() / g.len() as f32;
        let d = decode(&m, g.len()).unwrap();
        for (a, b) in g.iter().zip(&d) {
            assert!((b.abs() - mean).abs() < 1e-4 && (*a >= 0.0) == (*b > 0.0), "{a} -> {b}");
        }
        // All zeros: scale zero, nothing divides by it.
        assert_eq!(decode(&encode(Compression::Int8, &[0.0; 5]), 5).unwrap(), vec![0.0; 5]);
    }

    #[test]
    fn with_error_feedback_nothing_is_lost_over_many_steps() {
        for method in [Compression::TopK { density: 0.01 }, Compression::Int8, Compression::Sign, Compression::None] {
            let mut c = Compressor::new(method, true);
            let n = 500;
            let (mut sent, mut total) = (vec![0f64; n], vec![0f64; n]);
            let mut bytes = 0u64;
            for step in 0..60 {
                let g = wave(n, step as f32 * 0.1);
                let m = c.encode(&g).unwrap();
                bytes += m.len() as u64;
                for (s, v) in sent.iter_mut().zip(decode(&m, n).unwrap()) {
                    *s += f64::from(v);
                }
                for (t, v) in total.iter_mut().zip(&g) {
                    *t += f64::from(*v);
                }
            }
            // received + still held == everything the worker computed.
            let worst = (0..n).map(|i| (sent[i] + f64::from(c.residual()[i]) - total[i]).abs()).fold(0.0, f64::max);
            assert!(worst < 1e-3, "{method}: received + residual differs from the sum by {worst}");
            assert_eq!(c.bytes_sent(), bytes, "{method}: bytes counted are the messages' bytes");
            assert_eq!(c.bytes_dense(), 60 * dense_bytes(n) as u64);
            assert_eq!(c.messages(), 60);
        }
    }

    #[test]
    fn without_error_feedback_top_k_drops_the_rest_for_good() {
        let mut c = Compressor::new(Compression::TopK { density: 0.01 }, false);
        let n = 500;
        let g = wave(n, 0.0);
        let mut sent = vec![0f32; n];
        for _ in 0..10 {
            for (s, v) in sent.iter_mut().zip(decode(&c.encode(&g).unwrap(), n).unwrap()) {
                *s += v;
            }
        }
        assert!(c.residual().is_empty());
        assert_eq!(c.encode(&[1.0, f32::NAN]), Err(MessageError::NonFinite("gradient")));
        // The same 5 values every time: the other 495 never arrive.
        assert_eq!(sent.iter().filter(|v| **v != 0.0).count(), 5);
    }

    #[test]
    fn compression_ratios_at_the_sizes_of_a_layer() {
        let n = 64 * 64 * 9;
        let g = wave(n, 0.5);
        let dense = dense_bytes(n);
        let topk = encode(Compression::TopK { density: 0.01 }, &g).len();
        let sign = encode(Compression::Sign, &g).len();
        assert!(topk * 40 <= dense, "topk:0.01 {topk} of {dense}");
        assert!(sign * 25 <= dense, "sign {sign} of {dense}");
        assert!(encode(Compression::Int8, &g).len() * 3 < dense);
    }

    #[test]
    fn bad_messages_are_errors() {
        let g = wave(20, 0.0);
        let dense = encode(Compression::None, &g);
        assert_eq!(decode(&dense[..3], 20), Err(MessageError::Length { expected: 5, got: 3 }));
        assert_eq!(decode(&dense[..dense.len() - 1], 20), Err(MessageError::Length { expected: 85, got: 84 }));
        let mut longer = dense.clone();
        longer.push(0);
        assert!(matches!(decode(&longer, 20), Err(MessageError::Length { .. })));
        assert_eq!(decode(&dense, 21), Err(MessageError::Count { expected: 21, got: 20 }));
        let mut tag = dense.clone();
        tag[0] = 9;
        assert_eq!(decode(&tag, 20), Err(MessageError::Tag(9)));
        let mut nan = dense.clone();
        nan[5..9].copy_from_slice(&f32::NAN.to_le_bytes());
        assert_eq!(decode(&nan, 20), Err(MessageError::NonFinite("value")));

        let topk = encode(Compression::TopK { density: 0.2 }, &g); // k = 4
        let mut swapped = topk.clone();
        let (a, b) = (u32_at(&topk, 9), u32_at(&topk, 13));
        swapped[9..13].copy_from_slice(&b.to_le_bytes());
        swapped[13..17].copy_from_slice(&a.to_le_bytes());
        assert!(matches!(decode(&swapped, 20), Err(MessageError::Index { position: 1, .. })));
        let mut far = topk.clone();
        far[21..25].copy_from_slice(&20u32.to_le_bytes());
        assert!(matches!(decode(&far, 20), Err(MessageError::Index { index: 20, position: 3 })));
        let mut many = topk.clone();
        many[5..9].copy_from_slice(&21u32.to_le_bytes());
        assert_eq!(decode(&many, 20), Err(MessageError::Count { expected: 20, got: 21 }));

        let mut scale = encode(Compression::Sign, &g);
        scale[5..9].copy_from_slice(&f32::INFINITY.to_le_bytes());
        assert_eq!(decode(&scale, 20), Err(MessageError::NonFinite("scale")));
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..64), n in 0usize..40) {
            let _ = decode(&bytes, n);
        }

        #[test]
        fn every_method_round_trips_its_own_messages(values in proptest::collection::vec(-1e3f32..1e3, 0..200), density in 0.001f32..1.0) {
            for method in [Compression::None, Compression::TopK { density }, Compression::Int8, Compression::Sign] {
                let m = encode(method, &values);
                let d = decode(&m, values.len()).unwrap();
                proptest::prop_assert_eq!(d.len(), values.len());
            }
        }
    }
}
