//! A port of candle-transformers 0.11.1 bert.rs (BertModel forward, no tracing spans) with switchable
//! optimisations (env OPTS=comma list) and per-op wall-clock timers (env TIMERS=1).
use candle_core::{CpuStorage, DType, Layout, Module, Result, Shape, Tensor, D};
use candle_nn::{Embedding, LayerNorm, Linear, VarBuilder};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::time::Instant;

#[derive(Default, Clone, Copy)]
pub struct Opts {
    pub qkv: bool,      // fused QKV projection, one permute+contiguous copy
    pub gelu: bool,     // vectorised erf GELU custom op (bias fused in when `bias` too)
    pub softmax: bool,  // single-pass scale+mask+softmax custom op
    pub bias: bool,     // bias folded into gemm (dst prefilled, read_dst)
    pub ln: bool,       // fused residual add + layer norm custom op, single-threaded
    pub ctx: bool,      // run forward inside Device::with_context (candle's private rayon pool)
    pub scale: bool,    // fold 1/sqrt(d) into Wq, bq
}

impl Opts {
    pub fn from_env() -> Self {
        let s = std::env::var("OPTS").unwrap_or_default();
        let has = |k: &str| s.split(',').any(|x| x == k || x == "all");
        Opts { qkv: has("qkv"), gelu: has("gelu"), softmax: has("softmax"), bias: has("bias"), ln: has("ln"), ctx: has("ctx"), scale: has("scale") }
    }
}

thread_local! { static TIMES: RefCell<BTreeMap<&'static str, (f64, usize)>> = RefCell::new(BTreeMap::new()); }
static TIMERS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
fn timers() -> bool {
    *TIMERS.get_or_init(|| std::env::var("TIMERS").is_ok())
}
fn t<R>(name: &'static str, f: impl FnOnce() -> Result<R>) -> Result<R> {
    if !timers() {
        return f();
    }
    let s = Instant::now();
    let r = f();
    let e = s.elapsed().as_secs_f64();
    TIMES.with(|m| {
        let mut m = m.borrow_mut();
        let v = m.entry(name).or_insert((0.0, 0));
        v.0 += e;
        v.1 += 1;
    });
    r
}
pub fn take_times() -> BTreeMap<&'static str, (f64, usize)> {
    TIMES.with(|m| std::mem::take(&mut *m.borrow_mut()))
}

// ---------- custom ops ----------

fn contig<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    let v = match s {
        CpuStorage::F32(v) => v,
        _ => candle_core::bail!("f32 only"),
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("contiguous only"),
    }
}

/// Eigen's rational erf approximation for f32 (clamped at |x|=4), vectorisable.
#[inline(always)]
fn erf_fast(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = -2.72614225801306e-10f32;
    p = p * x2 + 2.77068142495902e-08;
    p = p * x2 - 2.10102402082508e-06;
    p = p * x2 - 5.69250639462346e-05;
    p = p * x2 - 7.34990630326855e-04;
    p = p * x2 - 2.95459980854025e-03;
    p = p * x2 - 1.60960333262415e-02;
    p *= x;
    let mut q = -1.45660718464996e-05f32;
    q = q * x2 - 2.13374055278905e-04;
    q = q * x2 - 1.68282697438203e-03;
    q = q * x2 - 7.37332916720468e-03;
    q = q * x2 - 1.42647390514189e-02;
    p / q
}
#[inline(always)]
fn gelu_fast(v: f32) -> f32 {
    0.5 * v * (1.0 + erf_fast(v * std::f32::consts::FRAC_1_SQRT_2))
}
#[target_feature(enable = "avx2,fma")]
unsafe fn gelu_rows_avx2(src: &[f32], bias: Option<&[f32]>, dst: &mut [f32]) {
    match bias {
        None => {
            for (d, s) in dst.iter_mut().zip(src) {
                *d = gelu_fast(*s)
            }
        }
        Some(b) => {
            for (drow, srow) in dst.chunks_exact_mut(b.len()).zip(src.chunks_exact(b.len())) {
                for ((d, s), bb) in drow.iter_mut().zip(srow).zip(b) {
                    *d = gelu_fast(*s + *bb)
                }
            }
        }
    }
}
pub fn gelu_slice(src: &[f32], bias: Option<&[f32]>, dst: &mut [f32]) {
    unsafe { gelu_rows_avx2(src, bias, dst) }
}

pub struct FastGelu;
impl candle_core::CustomOp1 for FastGelu {
    fn name(&self) -> &'static str {
        "fast-gelu"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let src = contig(s, l)?;
        let mut dst = vec![0f32; src.len()];
        gelu_slice(src, None, &mut dst);
        Ok((CpuStorage::F32(dst), l.shape().clone()))
    }
}

/// exp for x <= 0 (softmax after max subtraction), vectorisable (Cephes-style).
#[inline(always)]
fn exp_fast(x: f32) -> f32 {
    let x = x.max(-87.0);
    let n = (x * std::f32::consts::LOG2_E).round_ties_even();
    let r = x - n * 0.693_145_75 - n * 1.428_606_8e-6;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5.000_000_1e-1;
    let e = p * r * r + r + 1.0;
    f32::from_bits(((n as i32 + 127) as u32) << 23) * e
}
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_rows(src: &[f32], mask: &[f32], s: usize, rows_per_b: usize, scale: f32, dst: &mut [f32]) {
    for (i, (srow, drow)) in src.chunks_exact(s).zip(dst.chunks_exact_mut(s)).enumerate() {
        let b = i / rows_per_b;
        let m = &mask[b * s..(b + 1) * s];
        let mut mx = f32::NEG_INFINITY;
        for j in 0..s {
            let v = srow[j] * scale + m[j];
            drow[j] = v;
            mx = mx.max(v);
        }
        let mut sum = 0f32;
        for d in drow.iter_mut() {
            *d = exp_fast(*d - mx);
            sum += *d;
        }
        let inv = 1.0 / sum;
        for d in drow.iter_mut() {
            *d *= inv;
        }
    }
}
/// scores [b, h, s, s] * scale + mask[b, s] (additive), softmax over the last dim.
pub struct MaskedSoftmax {
    pub scale: f32,
}
impl candle_core::CustomOp2 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "masked-softmax"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let src = contig(s1, l1)?;
        let mask = contig(s2, l2)?;
        let (_b, h, s, _) = l1.shape().dims4()?;
        let mut dst = vec![0f32; src.len()];
        unsafe { softmax_rows(src, mask, s, h * s, self.scale, &mut dst) };
        Ok((CpuStorage::F32(dst), l1.shape().clone()))
    }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn add_ln_rows(x: &[f32], r: &[f32], w: &[f32], b: &[f32], eps: f32, dst: &mut [f32]) {
    let n = w.len();
    for ((xr, rr), dr) in x.chunks_exact(n).zip(r.chunks_exact(n)).zip(dst.chunks_exact_mut(n)) {
        let mut acc = [0f32; 16];
        let mut acc2 = [0f32; 16];
        for ((xc, rc), dc) in xr.chunks_exact(16).zip(rr.chunks_exact(16)).zip(dr.chunks_exact_mut(16)) {
            for l in 0..16 {
                let v = xc[l] + rc[l];
                dc[l] = v;
                acc[l] += v;
                acc2[l] += v * v;
            }
        }
        let sum: f32 = acc.iter().sum();
        let sum2: f32 = acc2.iter().sum();
        let mean = sum / n as f32;
        let var = (sum2 / n as f32 - mean * mean).max(0.0);
        let inv = 1.0 / (var + eps).sqrt();
        for j in 0..n {
            dr[j] = (dr[j] - mean) * inv * w[j] + b[j];
        }
    }
}
/// layer_norm(x + residual) over the last dim.
pub struct AddLayerNorm {
    pub w: Vec<f32>,
    pub b: Vec<f32>,
    pub eps: f32,
}
impl candle_core::CustomOp2 for AddLayerNorm {
    fn name(&self) -> &'static str {
        "add-layer-norm"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contig(s1, l1)?;
        let r = contig(s2, l2)?;
        let mut dst = vec![0f32; x.len()];
        unsafe { add_ln_rows(x, r, &self.w, &self.b, self.eps, &mut dst) };
        Ok((CpuStorage::F32(dst), l1.shape().clone()))
    }
}

/// Row-split variant: each of the 2 rayon threads runs gemm (Parallelism::None) on half the rows.
pub struct LinearBiasSplit {
    pub bias: Vec<f32>,
}
impl candle_core::CustomOp2 for LinearBiasSplit {
    fn name(&self) -> &'static str {
        "linear-bias-split"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contig(s1, l1)?;
        let w = contig(s2, l2)?;
        let dims = l1.shape().dims();
        let k = *dims.last().unwrap();
        let m = x.len() / k;
        let n = self.bias.len();
        let mut dst = Vec::with_capacity(m * n);
        for _ in 0..m {
            dst.extend_from_slice(&self.bias);
        }
        let half = (m / 2 + 7) / 8 * 8;
        let (d1, d2) = dst.split_at_mut(half * n);
        let (x1, x2) = x.split_at(half * k);
        let run = |d: &mut [f32], xs: &[f32]| {
            let mm = xs.len() / k;
            unsafe {
                gemm::gemm(mm, n, k, d.as_mut_ptr(), 1, n as isize, true, xs.as_ptr(), 1, k as isize,
                    w.as_ptr(), k as isize, 1, 1.0f32, 1.0f32, false, false, false, gemm::Parallelism::None)
            }
        };
        rayon::join(|| run(d1, x1), || run(d2, x2));
        let mut od = dims.to_vec();
        *od.last_mut().unwrap() = n;
        Ok((CpuStorage::F32(dst), Shape::from_dims(&od)))
    }
}

/// x[m, k] @ w[n, k]^T + bias[n] via one gemm call, bias pre-filled into dst (read_dst).
/// With `gelu`, applies the fast GELU afterwards in the same op.
pub struct LinearBias {
    pub bias: Vec<f32>,
    pub gelu: bool,
}
impl candle_core::CustomOp2 for LinearBias {
    fn name(&self) -> &'static str {
        "linear-bias"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contig(s1, l1)?;
        let w = contig(s2, l2)?; // [n, k] row-major
        let dims = l1.shape().dims();
        let k = *dims.last().unwrap();
        let m = x.len() / k;
        let n = self.bias.len();
        let mut dst = Vec::with_capacity(m * n);
        for _ in 0..m {
            dst.extend_from_slice(&self.bias);
        }
        let nt = candle_core::utils::get_num_threads();
        let par = if nt > 1 { gemm::Parallelism::Rayon(nt) } else { gemm::Parallelism::None };
        unsafe {
            gemm::gemm(
                m, n, k,
                dst.as_mut_ptr(), 1, n as isize, true,
                x.as_ptr(), 1, k as isize,
                w.as_ptr(), k as isize, 1, // rhs = w^T: element (kk, j) at w[j*k + kk]
                1.0f32, 1.0f32, false, false, false, par,
            )
        }
        if self.gelu {
            let src = dst.clone();
            gelu_slice(&src, None, &mut dst);
        }
        let mut od = dims.to_vec();
        *od.last_mut().unwrap() = n;
        Ok((CpuStorage::F32(dst), Shape::from_dims(&od)))
    }
}

// ---------- model ----------

struct Lin {
    lin: Linear,
    bias_vec: Vec<f32>,
}
impl Lin {
    fn new(w: Tensor, b: Tensor) -> Result<Self> {
        let bias_vec = b.to_vec1::<f32>()?;
        Ok(Lin { lin: Linear::new(w, Some(b)), bias_vec })
    }
    fn load(vb: VarBuilder, i: usize, o: usize) -> Result<Self> {
        let w = vb.get((o, i), "weight")?;
        let b = vb.get(o, "bias")?;
        Self::new(w, b)
    }
    fn fwd(&self, x: &Tensor, o: &Opts, gelu: bool) -> Result<Tensor> {
        if o.bias {
            let op = LinearBias { bias: self.bias_vec.clone(), gelu: gelu && o.gelu };
            let y = x.apply_op2_no_bwd(self.lin.weight(), &op)?;
            if gelu && !o.gelu {
                return y.gelu_erf();
            }
            return Ok(y);
        }
        let y = t(if gelu { "FFN1 linear" } else { "linear" }, || self.lin.forward(x))?;
        if gelu {
            if o.gelu {
                return t("gelu", || y.apply_op1_no_bwd(&FastGelu));
            }
            return t("gelu", || y.gelu_erf());
        }
        Ok(y)
    }
}

struct Ln {
    ln: LayerNorm,
    w: Vec<f32>,
    b: Vec<f32>,
    eps: f32,
}
impl Ln {
    fn load(vb: VarBuilder, h: usize, eps: f64) -> Result<Self> {
        let ln = candle_nn::layer_norm(h, eps, vb)?;
        let w = ln.weight().to_vec1::<f32>()?;
        let b = ln.bias().unwrap().to_vec1::<f32>()?;
        Ok(Ln { ln, w, b, eps: eps as f32 })
    }
    fn add_fwd(&self, x: &Tensor, r: &Tensor, o: &Opts) -> Result<Tensor> {
        if o.ln {
            return t("add+LN", || x.apply_op2_no_bwd(r, &AddLayerNorm { w: self.w.clone(), b: self.b.clone(), eps: self.eps }));
        }
        let s = t("residual add", || x + r)?;
        t("layernorm", || self.ln.forward(&s))
    }
}

struct Layer {
    q: Lin,
    k: Lin,
    v: Lin,
    qkv: Lin,
    ao: Lin,
    ln1: Ln,
    i: Lin,
    out: Lin,
    ln2: Ln,
}

pub struct MyBert {
    word: Embedding,
    pos: Embedding,
    tt: Embedding,
    eln: LayerNorm,
    layers: Vec<Layer>,
    nh: usize,
    hd: usize,
    pub opts: Opts,
}

impl MyBert {
    pub fn load(vb: VarBuilder, h: usize, inter: usize, nl: usize, nh: usize, vocab: usize, opts: Opts) -> Result<Self> {
        let e = vb.pp("embeddings");
        let hd = h / nh;
        let sc = 1.0 / (hd as f64).sqrt();
        let mut layers = vec![];
        for l in 0..nl {
            let lv = vb.pp(format!("encoder.layer.{l}"));
            let a = lv.pp("attention");
            let (wq, bq) = (a.pp("self.query").get((h, h), "weight")?, a.pp("self.query").get(h, "bias")?);
            let (wq, bq) = if opts.scale { ((wq * sc)?, (bq * sc)?) } else { (wq, bq) };
            let (wk, bk) = (a.pp("self.key").get((h, h), "weight")?, a.pp("self.key").get(h, "bias")?);
            let (wv, bv) = (a.pp("self.value").get((h, h), "weight")?, a.pp("self.value").get(h, "bias")?);
            let qkv = Lin::new(Tensor::cat(&[&wq, &wk, &wv], 0)?, Tensor::cat(&[&bq, &bk, &bv], 0)?)?;
            layers.push(Layer {
                q: Lin::new(wq, bq)?,
                k: Lin::new(wk, bk)?,
                v: Lin::new(wv, bv)?,
                qkv,
                ao: Lin::load(a.pp("output.dense"), h, h)?,
                ln1: Ln::load(a.pp("output.LayerNorm"), h, 1e-12)?,
                i: Lin::load(lv.pp("intermediate.dense"), h, inter)?,
                out: Lin::load(lv.pp("output.dense"), inter, h)?,
                ln2: Ln::load(lv.pp("output.LayerNorm"), h, 1e-12)?,
            });
        }
        Ok(MyBert {
            word: candle_nn::embedding(vocab, h, e.pp("word_embeddings"))?,
            pos: candle_nn::embedding(512, h, e.pp("position_embeddings"))?,
            tt: candle_nn::embedding(2, h, e.pp("token_type_embeddings"))?,
            eln: candle_nn::layer_norm(h, 1e-12, e.pp("LayerNorm"))?,
            layers,
            nh,
            hd,
            opts,
        })
    }

    pub fn forward(&self, ids: &Tensor, types: &Tensor, mask: &Tensor) -> Result<Tensor> {
        if self.opts.ctx {
            let dev = ids.device().clone();
            return dev.with_context(|| self.forward_inner(ids, types, mask));
        }
        self.forward_inner(ids, types, mask)
    }

    fn forward_inner(&self, ids: &Tensor, types: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let o = &self.opts;
        let (b, s) = ids.dims2()?;
        let (nh, hd) = (self.nh, self.hd);
        let x = t("embeddings", || {
            let x = (self.word.forward(ids)? + self.tt.forward(types)?)?;
            let p = Tensor::arange(0u32, s as u32, ids.device())?;
            x.broadcast_add(&self.pos.forward(&p)?)
        })?;
        let mut x = t("embeddings", || self.eln.forward(&x))?;
        // additive mask: [b, s] (fused softmax) or [b,1,1,s] (candle path)
        let m = mask.to_dtype(DType::F32)?;
        let add_mask = ((m.ones_like()? - &m)? * f32::MIN as f64)?;
        let add_mask4 = add_mask.unsqueeze(1)?.unsqueeze(1)?;
        let scale = 1.0 / (hd as f64).sqrt();
        for l in &self.layers {
            let (q, k, v) = if o.qkv {
                let y = t("QKV linear", || l.qkv.fwd(&x, o, false))?; // [b, s, 3h]
                let y = t("QKV split copy", || y.reshape((b, s, 3, nh, hd))?.permute((2, 0, 3, 1, 4))?.contiguous())?;
                (y.get(0)?, y.get(1)?, y.get(2)?)
            } else {
                let q = t("QKV linear", || l.q.fwd(&x, o, false))?;
                let k = t("QKV linear", || l.k.fwd(&x, o, false))?;
                let v = t("QKV linear", || l.v.fwd(&x, o, false))?;
                let tr = |y: Tensor| t("head transpose copy", || y.reshape((b, s, nh, hd))?.transpose(1, 2)?.contiguous());
                (tr(q)?, tr(k)?, tr(v)?)
            };
            let sc = t("attn QK^T", || q.matmul(&k.t()?))?;
            let probs = if o.softmax {
                let scl = if o.scale { 1.0 } else { scale as f32 };
                t("attn softmax(+scale,mask)", || sc.apply_op2_no_bwd(&add_mask, &MaskedSoftmax { scale: scl }))?
            } else {
                let sc = if o.scale { sc } else { t("attn scale", || sc / scale.recip())? };
                let sc = t("attn mask add", || sc.broadcast_add(&add_mask4))?;
                t("attn softmax", || candle_nn::ops::softmax(&sc, D::Minus1))?
            };
            let ctx = t("attn PV", || probs.matmul(&v))?;
            let ctx = t("context transpose copy", || ctx.transpose(1, 2)?.contiguous()?.flatten_from(D::Minus2))?;
            let a = t("attn-out linear", || l.ao.fwd(&ctx, o, false))?;
            let a = l.ln1.add_fwd(&a, &x, o)?;
            let i = t("FFN1 linear(+gelu)", || l.i.fwd(&a, o, true))?;
            let y = t("FFN2 linear", || l.out.fwd(&i, o, false))?;
            x = l.ln2.add_fwd(&y, &a, o)?;
        }
        Ok(x)
    }
}
