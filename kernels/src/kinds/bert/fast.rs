//! The `bert` kind's CPU encoder in f32 (`params.implementation = "fast"`, the default on CPU):
//! the same model as candle-transformers' `BertModel`, computed in a few passes over plain
//! buffers instead of one candle operation (and one temporary) per step.
//!
//! Per layer:
//! 1. `qkv = x Wqkv^T`: one matrix product for the three projections (their weights stacked
//!    at load, the query's pre-multiplied by `1/sqrt(head_dim)`);
//! 2. attention read straight from `qkv` plus its bias (no head transposes), one pass per head
//!    and query row: scores, additive mask, softmax, weighted sum of the values, written to
//!    the context's place in `[rows, hidden]` (no transpose back);
//! 3. `a = layer_norm(ctx Wo^T + bo + x)`: bias and residual added inside the layer-norm pass;
//! 4. `i = act(a Wi^T + bi)`: bias and activation (erf GELU by default) in one pass;
//! 5. `x = layer_norm(i Wout^T + bout + a)`.
//!
//! The matrix products are candle's (`gemm` underneath) with the weights read transposed in
//! place. The passes around them are written so that the compiler vectorises them (independent
//! lanes, branch-free polynomials for erf and exp) and there is no `unsafe` here: CPU features
//! are those of the build target. With `params.threads` the whole forward pass runs on a
//! thread pool of that size owned by this submodel, so its products never compete with
//! another submodel's for the global pool; without it, on the calling thread and the global
//! pool (`RAYON_NUM_THREADS`), like every candle operation.
//! Outputs match `BertModel` within about 2e-6.

use candle_core::{Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{Config, HiddenAct};

/// The encoder's weights, as plain row-major buffers.
pub(super) struct FastBert {
    word: Vec<f32>,
    position: Vec<f32>,
    token_type: Vec<f32>,
    norm: Norm,
    layers: Vec<Layer>,
    hidden: usize,
    heads: usize,
    act: Act,
    /// The submodel's own pool (`params.threads`); `None`: the caller's thread and the global pool.
    pool: Option<rayon::ThreadPool>,
}

struct Norm {
    weight: Vec<f32>,
    bias: Vec<f32>,
    eps: f32,
}

/// `y = x W^T + b` with `W` stored `[out, in]` as in the file; the bias is added by the pass
/// that reads the product.
struct Dense {
    /// `[out, in]`, contiguous; multiplied as its transpose (a view, no copy).
    weight: Tensor,
    bias: Vec<f32>,
}

struct Layer {
    qkv: Dense,
    attn_out: Dense,
    norm1: Norm,
    inter: Dense,
    out: Dense,
    norm2: Norm,
}

#[derive(Clone, Copy)]
enum Act {
    GeluErf,
    GeluTanh,
    Relu,
}

fn vec1(t: Tensor) -> candle_core::Result<Vec<f32>> {
    t.flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()
}

impl Dense {
    fn load(vb: VarBuilder, inputs: usize, outputs: usize) -> candle_core::Result<Self> {
        Self::new(vb.get((outputs, inputs), "weight")?, vb.get(outputs, "bias")?)
    }

    fn new(weight: Tensor, bias: Tensor) -> candle_core::Result<Self> {
        Ok(Self { weight: weight.to_dtype(candle_core::DType::F32)?.contiguous()?, bias: vec1(bias)? })
    }

    /// `x [rows, in]` times `W^T`: `[rows, out]`, without the bias.
    fn product(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.matmul(&self.weight.t()?)
    }
}

/// Runs `f` on the f32 values of a contiguous CPU tensor (no copy).
fn with_values<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(candle_core::CpuStorage::F32(values)) = &*storage else {
        candle_core::bail!("expected an f32 CPU tensor");
    };
    let Some((start, end)) = layout.contiguous_offsets() else { candle_core::bail!("expected a contiguous tensor") };
    Ok(f(&values[start..end]))
}

impl Norm {
    fn load(vb: VarBuilder, size: usize, eps: f64) -> candle_core::Result<Self> {
        Ok(Self { weight: vec1(vb.get(size, "weight")?)?, bias: vec1(vb.get(size, "bias")?)?, eps: eps as f32 })
    }
}

impl FastBert {
    /// Loads from the same tensor names as `BertModel` (with or without the `bert.` prefix).
    pub(super) fn load(vb: VarBuilder, config: &Config, threads: Option<usize>) -> candle_core::Result<Self> {
        let pool = match threads {
            None => None,
            Some(n) => Some(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(n.max(1))
                    .thread_name(|i| format!("maas-bert-{i}"))
                    .build()
                    .map_err(|e| candle_core::Error::Msg(format!("cannot start {n} encoder threads: {e}")))?,
            ),
        };
        let vb = if vb.contains_tensor("bert.embeddings.word_embeddings.weight") { vb.pp("bert") } else { vb };
        let h = config.hidden_size;
        let heads = config.num_attention_heads;
        if heads == 0 || !h.is_multiple_of(heads) {
            candle_core::bail!("hidden_size {h} is not a multiple of num_attention_heads {heads}");
        }
        let scale = 1.0 / ((h / heads) as f64).sqrt();
        let e = vb.pp("embeddings");
        let eps = config.layer_norm_eps;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for l in 0..config.num_hidden_layers {
            let lv = vb.pp(format!("encoder.layer.{l}"));
            let a = lv.pp("attention");
            let s = a.pp("self");
            let get = |name: &str| -> candle_core::Result<(Tensor, Tensor)> {
                Ok((s.pp(name).get((h, h), "weight")?, s.pp(name).get(h, "bias")?))
            };
            let (wq, bq) = get("query")?;
            let (wk, bk) = get("key")?;
            let (wv, bv) = get("value")?;
            let (wq, bq) = ((wq * scale)?, (bq * scale)?);
            let qkv = Dense::new(Tensor::cat(&[&wq, &wk, &wv], 0)?, Tensor::cat(&[&bq, &bk, &bv], 0)?)?;
            let inter = config.intermediate_size;
            layers.push(Layer {
                qkv,
                attn_out: Dense::load(a.pp("output.dense"), h, h)?,
                norm1: Norm::load(a.pp("output.LayerNorm"), h, eps)?,
                inter: Dense::load(lv.pp("intermediate.dense"), h, inter)?,
                out: Dense::load(lv.pp("output.dense"), inter, h)?,
                norm2: Norm::load(lv.pp("output.LayerNorm"), h, eps)?,
            });
        }
        Ok(Self {
            word: vec1(e.pp("word_embeddings").get((config.vocab_size, h), "weight")?)?,
            position: vec1(e.pp("position_embeddings").get((config.max_position_embeddings, h), "weight")?)?,
            token_type: vec1(e.pp("token_type_embeddings").get((config.type_vocab_size, h), "weight")?)?,
            norm: Norm::load(e.pp("LayerNorm"), h, eps)?,
            layers,
            hidden: h,
            heads,
            act: match config.hidden_act {
                HiddenAct::Gelu => Act::GeluErf,
                HiddenAct::GeluApproximate => Act::GeluTanh,
                HiddenAct::Relu => Act::Relu,
            },
            pool,
        })
    }

    /// `ids`, `types`, `mask`: u32 `[batch, seq]` -> hidden states f32 `[batch, seq, hidden]`.
    pub(super) fn forward(&self, ids: &Tensor, types: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        match &self.pool {
            Some(pool) => pool.install(|| self.forward_here(ids, types, mask)),
            None => self.forward_here(ids, types, mask),
        }
    }

    fn forward_here(&self, ids: &Tensor, types: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        let (b, s) = ids.dims2()?;
        let h = self.hidden;
        let ids = ids.flatten_all()?.to_vec1::<u32>()?;
        let types = types.flatten_all()?.to_vec1::<u32>()?;
        let mask = mask.flatten_all()?.to_vec1::<u32>()?;
        if types.len() != ids.len() || mask.len() != ids.len() {
            candle_core::bail!("input_ids, token_type_ids and attention_mask differ in shape");
        }
        // The additive mask `BertModel` uses: 0 where a token is kept, (1 - m) * f32::MIN otherwise.
        let add_mask: Vec<f32> = mask.iter().map(|&m| (1.0 - m as f32) * f32::MIN).collect();

        let row = |table: &[f32], i: u32, what: &str| -> candle_core::Result<std::ops::Range<usize>> {
            let start = i as usize * h;
            if start + h > table.len() {
                candle_core::bail!("{what} {i} is out of range");
            }
            Ok(start..start + h)
        };
        let mut sum = vec![0f32; b * s * h];
        for (r, out) in sum.chunks_exact_mut(h).enumerate() {
            let w = &self.word[row(&self.word, ids[r], "token id")?];
            let t = &self.token_type[row(&self.token_type, types[r], "token type id")?];
            let p = &self.position[row(&self.position, (r % s) as u32, "position")?];
            for (((o, w), t), p) in out.iter_mut().zip(w).zip(t).zip(p) {
                *o = w + t + p;
            }
        }
        let rows = b * s;
        let matrix = |v: Vec<f32>, cols: usize| Tensor::from_vec(v, (rows, cols), &Device::Cpu);
        let mut x = vec![0f32; rows * h];
        add_layer_norm(&sum, None, None, &self.norm, &mut x);
        let mut x = matrix(x, h)?;

        let heads = self.heads;
        for layer in &self.layers {
            let qkv = layer.qkv.product(&x)?;
            let mut ctx = vec![0f32; rows * h];
            with_values(&qkv, |qkv| attention(qkv, &layer.qkv.bias, &add_mask, b, s, h, heads, &mut ctx))?;
            let a_lin = layer.attn_out.product(&matrix(ctx, h)?)?;
            let mut a = vec![0f32; rows * h];
            with_values(&a_lin, |y| {
                with_values(&x, |x| add_layer_norm(y, Some(&layer.attn_out.bias), Some(x), &layer.norm1, &mut a))
            })??;
            let a = matrix(a, h)?;
            let i = layer.inter.product(&a)?;
            let i = with_values(&i, |y| activate(y, &layer.inter.bias, self.act))?;
            let y = layer.out.product(&matrix(i, layer.inter.bias.len())?)?;
            let mut next = vec![0f32; rows * h];
            with_values(&y, |y| {
                with_values(&a, |a| add_layer_norm(y, Some(&layer.out.bias), Some(a), &layer.norm2, &mut next))
            })??;
            x = matrix(next, h)?;
        }
        x.reshape((b, s, h))
    }
}

/// How many rows each task of a pass over `rows` rows takes: the rows split evenly over the
/// current rayon pool's threads (all of them in one task on a pool of one, or a tiny input).
fn rows_per_task(rows: usize, cols: usize) -> usize {
    const MIN_VALUES: usize = 16 * 1024;
    let threads = rayon::current_num_threads();
    if threads <= 1 || rows * cols < 2 * MIN_VALUES {
        return rows.max(1);
    }
    rows.div_ceil(threads).max(MIN_VALUES.div_ceil(cols))
}

/// `dst = layer_norm(x + bias + residual)` row by row (`bias`, `residual` optional), split
/// over the current pool.
fn add_layer_norm(x: &[f32], bias: Option<&[f32]>, residual: Option<&[f32]>, norm: &Norm, dst: &mut [f32]) {
    use rayon::prelude::*;
    let n = norm.weight.len();
    let per = rows_per_task(x.len() / n, n) * n;
    dst.par_chunks_mut(per).zip(x.par_chunks(per)).enumerate().for_each(|(t, (dst, x))| {
        add_layer_norm_rows(x, bias, residual.map(|r| &r[t * per..t * per + x.len()]), norm, dst)
    });
}

fn add_layer_norm_rows(x: &[f32], bias: Option<&[f32]>, residual: Option<&[f32]>, norm: &Norm, dst: &mut [f32]) {
    let n = norm.weight.len();
    for (r, (xr, dr)) in x.chunks_exact(n).zip(dst.chunks_exact_mut(n)).enumerate() {
        dr.copy_from_slice(xr);
        if let Some(bias) = bias {
            for (d, b) in dr.iter_mut().zip(bias) {
                *d += b;
            }
        }
        if let Some(res) = residual {
            for (d, b) in dr.iter_mut().zip(&res[r * n..(r + 1) * n]) {
                *d += b;
            }
        }
        let mean = lanes_sum(dr) / n as f32;
        let mut acc = [0f32; 8];
        let mut chunks = dr.chunks_exact_mut(8);
        for c in &mut chunks {
            for (a, v) in acc.iter_mut().zip(c.iter_mut()) {
                *v -= mean;
                *a += *v * *v;
            }
        }
        let mut var = acc.iter().sum::<f32>();
        for v in chunks.into_remainder() {
            *v -= mean;
            var += *v * *v;
        }
        let inv = 1.0 / (var / n as f32 + norm.eps).sqrt();
        for ((d, w), b) in dr.iter_mut().zip(&norm.weight).zip(&norm.bias) {
            *d = *d * inv * w + b;
        }
    }
}

/// Sum with eight independent accumulators (vectorisable, unlike a sequential fold).
#[inline(always)]
fn lanes_sum(v: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let mut chunks = v.chunks_exact(8);
    for c in &mut chunks {
        for (a, x) in acc.iter_mut().zip(c) {
            *a += x;
        }
    }
    acc.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}

/// Dot product with eight independent accumulators.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let mut ca = a.chunks_exact(8);
    let mut cb = b.chunks_exact(8);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for ((s, x), y) in acc.iter_mut().zip(x).zip(y) {
            *s += x * y;
        }
    }
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

/// `act(x + bias)` row by row, into a new buffer, split over the current pool.
fn activate(x: &[f32], bias: &[f32], act: Act) -> Vec<f32> {
    use rayon::prelude::*;
    let n = bias.len();
    let mut out = vec![0f32; x.len()];
    let per = rows_per_task(x.len() / n, n) * n;
    out.par_chunks_mut(per).zip(x.par_chunks(per)).for_each(|(out, x)| activate_rows(x, bias, act, out));
    out
}

fn activate_rows(x: &[f32], bias: &[f32], act: Act, out: &mut [f32]) {
    for (orow, xrow) in out.chunks_exact_mut(bias.len()).zip(x.chunks_exact(bias.len())) {
        let pairs = orow.iter_mut().zip(xrow.iter().zip(bias));
        match act {
            Act::GeluErf => pairs.for_each(|(o, (x, b))| {
                let v = x + b;
                *o = 0.5 * v * (1.0 + erf(v * std::f32::consts::FRAC_1_SQRT_2));
            }),
            Act::GeluTanh => pairs.for_each(|(o, (x, b))| {
                const C: f32 = 0.797_884_6; // sqrt(2 / pi)
                let v = x + b;
                *o = 0.5 * v * (1.0 + (C * (v + 0.044_715 * v * v * v)).tanh());
            }),
            Act::Relu => pairs.for_each(|(o, (x, b))| *o = (x + b).max(0.0)),
        }
    }
}

/// erf for f32: a rational approximation (Eigen's `generic_fast_erf_float`, clamped at
/// |x| = 4 where erf is 1 in f32), absolute error below 4e-7 (a few f32 ulps); branch-free, so it vectorises.
#[inline(always)]
fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = -2.726_142_3e-10f32;
    p = p * x2 + 2.770_681_4e-8;
    p = p * x2 - 2.101_024e-6;
    p = p * x2 - 5.692_506_4e-5;
    p = p * x2 - 7.349_906_3e-4;
    p = p * x2 - 2.954_6e-3;
    p = p * x2 - 1.609_603_3e-2;
    p *= x;
    let mut q = -1.456_607_2e-5f32;
    q = q * x2 - 2.133_740_6e-4;
    q = q * x2 - 1.682_827e-3;
    q = q * x2 - 7.373_329_2e-3;
    q = q * x2 - 1.426_474e-2;
    p / q
}

/// e^x for x <= 0 (scores after subtracting their maximum): Cody-Waite range reduction and a
/// degree-6 polynomial (Cephes' `expf`), relative error about 1e-7; branch-free.
#[inline(always)]
fn exp_neg(x: f32) -> f32 {
    let x = x.max(-87.0);
    // Round to nearest by adding and subtracting 1.5 * 2^23 (exact for |t| < 2^22; a call to
    // `round` would stop the loop from vectorising on targets without a rounding instruction).
    const MAGIC: f32 = 12_582_912.0;
    let n = (x * std::f32::consts::LOG2_E + MAGIC) - MAGIC;
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    f32::from_bits(((n as i32 + 127) as u32) << 23) * e
}

/// Multi-head attention of one batch row: `qkv [seq, 3 * hidden]` (bias added, queries
/// already scaled), `mask [seq]` additive, into `ctx [seq, hidden]`. `scores` is scratch of
/// `seq` floats.
fn attend_row(qkv: &[f32], mask: &[f32], seq: usize, hidden: usize, heads: usize, ctx: &mut [f32], scores: &mut [f32]) {
    let d = hidden / heads;
    let stride = 3 * hidden;
    for head in 0..heads {
        let (qo, ko, vo) = (head * d, hidden + head * d, 2 * hidden + head * d);
        for i in 0..seq {
            let q = &qkv[i * stride + qo..i * stride + qo + d];
            let mut max = f32::NEG_INFINITY;
            for (j, sc) in scores.iter_mut().enumerate() {
                let v = dot(q, &qkv[j * stride + ko..j * stride + ko + d]) + mask[j];
                *sc = v;
                max = max.max(v);
            }
            let mut sum = 0f32;
            for sc in scores.iter_mut() {
                *sc = exp_neg(*sc - max);
                sum += *sc;
            }
            let inv = 1.0 / sum;
            let out = &mut ctx[i * hidden + qo..i * hidden + qo + d];
            out.fill(0.0);
            for (j, p) in scores.iter().enumerate() {
                let p = p * inv;
                for (o, v) in out.iter_mut().zip(&qkv[j * stride + vo..j * stride + vo + d]) {
                    *o += p * v;
                }
            }
        }
    }
}

/// Attention of consecutive batch rows: `qkv` without its bias, which is added row by row into
/// a scratch copy first.
fn attend_rows(qkv: &[f32], bias: &[f32], mask: &[f32], seq: usize, hidden: usize, heads: usize, ctx: &mut [f32]) {
    let mut scores = vec![0f32; seq];
    let mut biased = vec![0f32; seq * 3 * hidden];
    for ((qkv, mask), ctx) in
        qkv.chunks_exact(3 * seq * hidden).zip(mask.chunks_exact(seq)).zip(ctx.chunks_exact_mut(seq * hidden))
    {
        for (brow, row) in biased.chunks_exact_mut(3 * hidden).zip(qkv.chunks_exact(3 * hidden)) {
            for ((o, x), b) in brow.iter_mut().zip(row).zip(bias) {
                *o = x + b;
            }
        }
        attend_row(&biased, mask, seq, hidden, heads, ctx, &mut scores);
    }
}

/// Multi-head attention of the whole batch, split over the current rayon pool by batch rows
/// when it has more than one thread.
#[allow(clippy::too_many_arguments)]
fn attention(
    qkv: &[f32],
    bias: &[f32],
    mask: &[f32],
    batch: usize,
    seq: usize,
    hidden: usize,
    heads: usize,
    ctx: &mut [f32],
) {
    use rayon::prelude::*;
    let threads = rayon::current_num_threads();
    if threads <= 1 || batch <= 1 {
        return attend_rows(qkv, bias, mask, seq, hidden, heads, ctx);
    }
    let per = batch.div_ceil(threads);
    ctx.par_chunks_mut(per * seq * hidden)
        .zip(qkv.par_chunks(per * seq * 3 * hidden))
        .zip(mask.par_chunks(per * seq))
        .for_each(|((ctx, qkv), mask)| attend_rows(qkv, bias, mask, seq, hidden, heads, ctx));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erf_is_within_4e_7_of_the_f64_erf() {
        let mut worst = 0f64;
        let mut x = -6.0f32;
        while x < 6.0 {
            let want = candle_core::cpu::erf::erf_f64(f64::from(x));
            worst = worst.max((f64::from(erf(x)) - want).abs());
            x += 1e-3;
        }
        assert!(worst < 4e-7, "worst erf error {worst:e}");
    }

    #[test]
    fn exp_neg_is_within_2e_7_relative_of_exp() {
        let mut worst = 0f64;
        let mut x = -80.0f32;
        while x <= 0.0 {
            let want = f64::from(x).exp();
            worst = worst.max(((f64::from(exp_neg(x)) - want) / want).abs());
            x += 1e-3;
        }
        assert!(worst < 2e-7, "worst relative exp error {worst:e}");
        assert_eq!(exp_neg(-1e30), exp_neg(-87.0));
    }

    #[test]
    fn layer_norm_with_residual_matches_the_definition() {
        let n = 13; // not a multiple of the 8 lanes
        let x: Vec<f32> = (0..2 * n).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let r: Vec<f32> = (0..2 * n).map(|i| (i as f32 * 0.11).cos()).collect();
        let norm = Norm {
            weight: (0..n).map(|i| 1.0 + i as f32 * 0.1).collect(),
            bias: (0..n).map(|i| i as f32 * -0.05).collect(),
            eps: 1e-12,
        };
        let mut got = vec![0f32; 2 * n];
        add_layer_norm(&x, None, Some(&r), &norm, &mut got);
        for row in 0..2 {
            let v: Vec<f64> = (0..n).map(|j| f64::from(x[row * n + j] + r[row * n + j])).collect();
            let mean = v.iter().sum::<f64>() / n as f64;
            let var = v.iter().map(|a| (a - mean).powi(2)).sum::<f64>() / n as f64;
            for j in 0..n {
                let want = (v[j] - mean) / (var + 1e-12).sqrt() * f64::from(norm.weight[j]) + f64::from(norm.bias[j]);
                assert!((f64::from(got[row * n + j]) - want).abs() < 1e-5, "row {row} col {j}");
            }
        }
    }
}
