//! Integration tests of the built-in kinds: each stateless kind on tiny hand-checked inputs,
//! `linear`, `mlp`, `digits_cnn` and `tokenizer` on seeded or self-made weights and files, the
//! validation of their params, and the input checks `Loaded::forward` runs before a kernel sees
//! a batch (wrong dtype, rank, size, missing or unknown ports, row counts, symbols).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use maas_graphs::{
    Catalog, DType as GDType, Dim, KindError, PortType, Signature, SignatureError, SubmodelName, SubmodelSpec,
};
use maas_kernels::{KernelError, Loaded, Registry, Value, Values};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

mod common;
use common::TempDir;

fn temp_dir(tag: &str) -> TempDir {
    common::temp_dir("kinds", tag)
}

/// A submodel of `kind` with params parsed from TOML text.
fn spec(kind: &str, params: &str) -> SubmodelSpec {
    let mut s = SubmodelSpec::new(SubmodelName::new("sm").unwrap(), kind);
    s.params = params.parse::<toml::Table>().unwrap();
    s
}

fn load(s: &SubmodelSpec) -> Loaded {
    Registry::builtin().load(s).unwrap_or_else(|e| panic!("loading `{}` failed: {e}", s.kind))
}

fn load_err(s: &SubmodelSpec) -> KernelError {
    match Registry::builtin().load(s) {
        Ok(l) => panic!("loading `{}` should fail, got {l:?}", s.kind),
        Err(e) => e,
    }
}

fn signature(s: &SubmodelSpec) -> Signature {
    Registry::builtin().signature(s).unwrap_or_else(|e| panic!("signature of `{}` failed: {e:?}", s.kind))
}

/// The kind's complaints about `s`, which must be `SignatureError::Invalid`.
fn invalid(s: &SubmodelSpec) -> Vec<KindError> {
    match Registry::builtin().signature(s) {
        Err(SignatureError::Invalid(errs)) => {
            assert!(!errs.is_empty(), "Invalid with no errors");
            errs
        }
        other => panic!("expected SignatureError::Invalid for `{}`, got {other:?}", s.kind),
    }
}

/// The first complaint at `key`, failing the test if there is none.
fn invalid_at(s: &SubmodelSpec, key: &str) -> KindError {
    let errs = invalid(s);
    errs.iter()
        .find(|e| e.key.as_deref() == Some(key))
        .cloned()
        .unwrap_or_else(|| panic!("expected an error at `{key}`, got {errs:?}"))
}

fn t(v: Tensor) -> Value {
    Value::from(v)
}

fn inputs<const N: usize>(pairs: [(&str, Value); N]) -> Values {
    pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

fn f32_2d<const C: usize>(rows: &[[f32; C]]) -> Tensor {
    let data: Vec<f32> = rows.iter().flatten().copied().collect();
    Tensor::from_vec(data, (rows.len(), C), &Device::Cpu).unwrap()
}

fn out_tensor<'a>(out: &'a Values, port: &str) -> &'a Tensor {
    out.get(port).unwrap_or_else(|| panic!("no output `{port}` in {:?}", out.keys())).as_tensor().expect("a tensor")
}

fn vec2(out: &Values, port: &str) -> Vec<Vec<f32>> {
    out_tensor(out, port).to_vec2::<f32>().unwrap()
}

fn vec1(out: &Values, port: &str) -> Vec<f32> {
    out_tensor(out, port).to_vec1::<f32>().unwrap()
}

fn assert_close(actual: &[f32], expected: &[f32], tol: f32) {
    assert_eq!(actual.len(), expected.len(), "lengths differ: {actual:?} vs {expected:?}");
    for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
        assert!(a.is_finite(), "element {i} is not finite: {actual:?}");
        assert!((a - e).abs() <= tol, "element {i}: {a} vs {e} (tol {tol}); {actual:?} vs {expected:?}");
    }
}

fn input_err(e: KernelError) -> (String, String) {
    match e {
        KernelError::Input { port, message } => (port, message),
        other => panic!("expected KernelError::Input, got {other:?}"),
    }
}

fn param_err(e: KernelError) -> (String, String) {
    match e {
        KernelError::Param { key, message } => (key, message),
        other => panic!("expected KernelError::Param, got {other:?}"),
    }
}

fn save(dir: &Path, name: &str, tensors: &[(&str, Tensor)]) -> PathBuf {
    let map: HashMap<String, Tensor> = tensors.iter().map(|(n, t)| (n.to_string(), t.clone())).collect();
    let path = dir.join(name);
    candle_core::safetensors::save(&map, &path).unwrap();
    path
}

fn ported(ty: &PortType) -> (GDType, Vec<Dim>) {
    match ty {
        PortType::Tensor { dtype, shape } => (*dtype, shape.clone()),
        other => panic!("expected a tensor port, got {other}"),
    }
}

fn b_by(n: usize) -> Vec<Dim> {
    vec![Dim::Sym("B".into()), Dim::Fixed(n)]
}

// ---------------------------------------------------------------------------------------------
// The registry's built-in kinds
// ---------------------------------------------------------------------------------------------

#[test]
fn builtin_registry_lists_every_kind() {
    let kinds = Registry::builtin().kinds();
    let want = [
        "argmax",
        "bert",
        "concat",
        "cosine",
        "digits_cnn",
        "identity",
        "l2_normalize",
        "linear",
        "mean_pool",
        "mlp",
        "onnx",
        "softmax",
        "tokenizer",
        "topk",
    ];
    assert_eq!(kinds, want.iter().map(|s| s.to_string()).collect::<Vec<_>>());
}

#[test]
fn stateless_kinds_reject_params_and_weights() {
    for kind in ["argmax", "concat", "cosine", "identity", "l2_normalize", "mean_pool", "softmax"] {
        let e = invalid_at(&spec(kind, "foo = 1"), "params.foo");
        assert!(e.message.contains("foo"), "{kind}: {e:?}");
        let mut s = spec(kind, "");
        s.weights = Some(PathBuf::from("w.safetensors"));
        invalid_at(&s, "weights");
        let (key, _) = param_err(load_err(&s));
        assert_eq!(key, "weights", "{kind}");
    }
}

// ---------------------------------------------------------------------------------------------
// identity
// ---------------------------------------------------------------------------------------------

#[test]
fn identity_passes_a_tensor_through() {
    let k = load(&spec("identity", ""));
    assert!(Registry::builtin().get("identity").unwrap().trivial());
    assert!(!Registry::builtin().get("bert").unwrap().trivial());
    let x = Tensor::new(&[[1u32, 2, 3], [4, 5, 6]], &Device::Cpu).unwrap();
    let out = k.forward(&inputs([("x", t(x))])).unwrap();
    assert_eq!(out.len(), 1);
    let y = out_tensor(&out, "out");
    assert_eq!(y.dtype(), DType::U32);
    assert_eq!(y.to_vec2::<u32>().unwrap(), vec![vec![1, 2, 3], vec![4, 5, 6]]);
}

#[test]
fn identity_passes_text_through() {
    let k = load(&spec("identity", ""));
    let out = k.forward(&inputs([("x", Value::text(["a b", "", "ç"]))])).unwrap();
    assert_eq!(out["out"].as_text().unwrap(), ["a b", "", "ç"]);
}

// ---------------------------------------------------------------------------------------------
// mean_pool
// ---------------------------------------------------------------------------------------------

#[test]
fn mean_pool_ignores_padded_positions() {
    let k = load(&spec("mean_pool", ""));
    // Row 0: tokens [1,2], [3,4], [100,100] (padded) -> mean of the first two = [2,3].
    // Row 1: only the first token counts -> [5,6].
    let hidden =
        Tensor::new(&[[[1f32, 2.], [3., 4.], [100., 100.]], [[5., 6.], [-7., 8.], [9., -10.]]], &Device::Cpu).unwrap();
    let mask = Tensor::new(&[[1u32, 1, 0], [1, 0, 0]], &Device::Cpu).unwrap();
    let out = k.forward(&inputs([("hidden", t(hidden)), ("mask", t(mask))])).unwrap();
    assert_eq!(vec2(&out, "out"), vec![vec![2.0, 3.0], vec![5.0, 6.0]]);
}

#[test]
fn mean_pool_all_zero_mask_gives_zeros_not_nan() {
    let k = load(&spec("mean_pool", ""));
    let hidden = Tensor::new(&[[[1f32, 2.], [3., 4.]], [[5., 6.], [7., 8.]]], &Device::Cpu).unwrap();
    let mask = Tensor::new(&[[0u32, 0], [1, 1]], &Device::Cpu).unwrap();
    let out = k.forward(&inputs([("hidden", t(hidden)), ("mask", t(mask))])).unwrap();
    assert_eq!(vec2(&out, "out"), vec![vec![0.0, 0.0], vec![6.0, 7.0]]);
}

#[test]
fn mean_pool_signature_is_ragged_on_the_sequence() {
    let sig = signature(&spec("mean_pool", ""));
    let hidden = sig.input("hidden").unwrap();
    assert_eq!(hidden.ty, maas_graphs::ty("f32[B,S,H]"));
    assert_eq!(hidden.ragged.map(|r| r.dim), Some(1));
    assert_eq!(sig.input("mask").unwrap().ty, maas_graphs::ty("u32[B,S]"));
    assert_eq!(sig.output("out").unwrap().ty, maas_graphs::ty("f32[B,H]"));
}

// ---------------------------------------------------------------------------------------------
// l2_normalize
// ---------------------------------------------------------------------------------------------

#[test]
fn l2_normalize_gives_unit_rows_and_keeps_zero_rows() {
    let k = load(&spec("l2_normalize", ""));
    let x = f32_2d(&[[3.0, 4.0], [0.0, 0.0], [0.0, -2.0]]);
    let out = vec2(&k.forward(&inputs([("x", t(x))])).unwrap(), "out");
    assert_close(&out[0], &[0.6, 0.8], 1e-6);
    assert_eq!(out[1], vec![0.0, 0.0], "a zero row stays zero (no NaN)");
    assert_close(&out[2], &[0.0, -1.0], 1e-6);
    for row in [&out[0], &out[2]] {
        let norm: f32 = row.iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-6, "{row:?} has norm {norm}");
    }
}

// ---------------------------------------------------------------------------------------------
// cosine
// ---------------------------------------------------------------------------------------------

#[test]
fn cosine_known_values() {
    let k = load(&spec("cosine", ""));
    let a = f32_2d(&[[1.0, 0.0, 0.0], [1.0, 2.0, 3.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]);
    let b = f32_2d(&[[0.0, 5.0, 0.0], [1.0, 2.0, 3.0], [1.0, 0.0, 0.0], [-2.0, 0.0, 0.0], [1.0, 2.0, 3.0]]);
    let out = vec1(&k.forward(&inputs([("a", t(a)), ("b", t(b))])).unwrap(), "out");
    // orthogonal, identical, 45 degrees, opposite, zero vector (0, not NaN).
    assert_close(&out, &[0.0, 1.0, std::f32::consts::FRAC_1_SQRT_2, -1.0, 0.0], 1e-6);
}

// ---------------------------------------------------------------------------------------------
// softmax
// ---------------------------------------------------------------------------------------------

#[test]
fn softmax_rows_sum_to_one() {
    let k = load(&spec("softmax", ""));
    let x = f32_2d(&[[0.0, (2f32).ln(), 0.0], [1000.0, 1000.0, 1000.0], [-1.0, 5.0, 2.0]]);
    let out = vec2(&k.forward(&inputs([("x", t(x))])).unwrap(), "out");
    assert_close(&out[0], &[0.25, 0.5, 0.25], 1e-6);
    assert_close(&out[1], &[1.0 / 3.0; 3], 1e-6);
    for row in &out {
        let s: f32 = row.iter().sum();
        assert!((s - 1.0).abs() < 1e-5, "{row:?} sums to {s}");
        assert!(row.iter().all(|&p| (0.0..=1.0).contains(&p)), "{row:?}");
    }
    assert!(out[2][1] > out[2][2] && out[2][2] > out[2][0]);
}

// ---------------------------------------------------------------------------------------------
// argmax
// ---------------------------------------------------------------------------------------------

#[test]
fn argmax_gives_u32_indices() {
    let k = load(&spec("argmax", ""));
    let x = f32_2d(&[[0.1, 0.7, 0.2], [5.0, -1.0, 4.0], [-3.0, -2.0, -1.0]]);
    let out = k.forward(&inputs([("x", t(x))])).unwrap();
    let y = out_tensor(&out, "out");
    assert_eq!(y.dtype(), DType::U32);
    assert_eq!(y.dims(), &[3]);
    assert_eq!(y.to_vec1::<u32>().unwrap(), vec![1, 0, 2]);
    assert_eq!(signature(&spec("argmax", "")).output("out").unwrap().ty, maas_graphs::ty("u32[B]"));
}

// ---------------------------------------------------------------------------------------------
// topk
// ---------------------------------------------------------------------------------------------

#[test]
fn topk_values_sorted_descending_with_indices() {
    let s = spec("topk", "k = 2");
    let k = load(&s);
    let x = f32_2d(&[[0.1, 0.9, 0.5, 0.3], [4.0, -1.0, 7.0, 6.0]]);
    let out = k.forward(&inputs([("x", t(x))])).unwrap();
    assert_eq!(vec2(&out, "values"), vec![vec![0.9, 0.5], vec![7.0, 6.0]]);
    let idx = out_tensor(&out, "indices");
    assert_eq!(idx.dtype(), DType::U32);
    assert_eq!(idx.to_vec2::<u32>().unwrap(), vec![vec![1, 2], vec![2, 3]]);

    let sig = signature(&s);
    assert_eq!(ported(&sig.output("values").unwrap().ty), (GDType::F32, b_by(2)));
    assert_eq!(ported(&sig.output("indices").unwrap().ty), (GDType::U32, b_by(2)));
}

#[test]
fn topk_k_equal_to_row_length_sorts_the_whole_row() {
    let k = load(&spec("topk", "k = 3"));
    let x = f32_2d(&[[2.0, 3.0, 1.0]]);
    let out = k.forward(&inputs([("x", t(x))])).unwrap();
    assert_eq!(vec2(&out, "values"), vec![vec![3.0, 2.0, 1.0]]);
    assert_eq!(out_tensor(&out, "indices").to_vec2::<u32>().unwrap(), vec![vec![1, 0, 2]]);
}

#[test]
fn topk_k_larger_than_row_is_an_input_error_on_x() {
    let k = load(&spec("topk", "k = 5"));
    let x = f32_2d(&[[1.0, 2.0, 3.0]]);
    let (port, message) = input_err(k.forward(&inputs([("x", t(x))])).unwrap_err());
    assert_eq!(port, "x");
    assert!(message.contains('5') && message.contains('3'), "{message}");
}

#[test]
fn topk_params_are_validated() {
    let e = invalid_at(&spec("topk", "k = 0"), "params.k");
    assert!(e.message.contains('k'), "{e:?}");
    let (key, _) = param_err(load_err(&spec("topk", "k = 0")));
    assert_eq!(key, "params.k");
    // Missing and unknown params point at `params`.
    let e = invalid(&spec("topk", ""));
    assert!(
        e.iter().any(|e| e.key.as_deref().is_some_and(|k| k.starts_with("params")) && e.message.contains('k')),
        "{e:?}"
    );
    let e = invalid(&spec("topk", "k = 1\nkk = 2"));
    assert!(e.iter().any(|e| e.message.contains("kk")), "{e:?}");
}

// ---------------------------------------------------------------------------------------------
// concat
// ---------------------------------------------------------------------------------------------

#[test]
fn concat_joins_along_dimension_one() {
    let k = load(&spec("concat", ""));
    let a = f32_2d(&[[1.0, 2.0], [3.0, 4.0]]);
    let b = f32_2d(&[[5.0, 6.0, 7.0], [8.0, 9.0, 10.0]]);
    let out = k.forward(&inputs([("a", t(a)), ("b", t(b))])).unwrap();
    assert_eq!(out_tensor(&out, "out").dims(), &[2, 5]);
    assert_eq!(vec2(&out, "out"), vec![vec![1.0, 2.0, 5.0, 6.0, 7.0], vec![3.0, 4.0, 8.0, 9.0, 10.0]]);
}

#[test]
fn concat_with_different_row_counts_is_an_input_error() {
    let k = load(&spec("concat", ""));
    let a = f32_2d(&[[1.0, 2.0], [3.0, 4.0]]);
    let b = f32_2d(&[[5.0], [6.0], [7.0]]);
    let (port, message) = input_err(k.forward(&inputs([("a", t(a)), ("b", t(b))])).unwrap_err());
    assert_eq!(port, "b");
    assert!(message.contains("rows") && message.contains('3') && message.contains('2'), "{message}");
}

// ---------------------------------------------------------------------------------------------
// linear
// ---------------------------------------------------------------------------------------------

#[test]
fn linear_seeded_init_is_deterministic() {
    let x = f32_2d(&[[0.5, -1.0, 2.0, 0.25], [1.0, 1.0, 1.0, 1.0]]);
    let run = |params: &str| {
        let k = load(&spec("linear", params));
        vec2(&k.forward(&inputs([("x", t(x.clone()))])).unwrap(), "out")
    };
    let a = run("in = 4\nout = 3\nseed = 7");
    let b = run("in = 4\nout = 3\nseed = 7");
    let c = run("in = 4\nout = 3\nseed = 8");
    assert_eq!(a.len(), 2);
    assert_eq!(a[0].len(), 3);
    assert_eq!(a, b, "same seed, same output");
    assert_ne!(a, c, "different seed, different output");
    assert!(a.iter().flatten().all(|v| v.is_finite()));
}

#[test]
fn linear_signature_from_params() {
    let sig = signature(&spec("linear", "in = 4\nout = 3"));
    assert_eq!(ported(&sig.input("x").unwrap().ty), (GDType::F32, b_by(4)));
    assert_eq!(ported(&sig.output("out").unwrap().ty), (GDType::F32, b_by(3)));
}

#[test]
fn linear_from_safetensors_is_x_times_w_transposed_plus_b() {
    let dir = temp_dir("linear-file");
    let w = f32_2d(&[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]); // [out=3, in=2]
    let b = Tensor::new(&[0.5f32, -1.0, 2.0], &Device::Cpu).unwrap();
    let path = save(&dir, "lin.safetensors", &[("weight", w.clone()), ("bias", b)]);
    let mut s = spec("linear", "");
    s.weights = Some(path);
    let sig = signature(&s);
    assert_eq!(ported(&sig.input("x").unwrap().ty), (GDType::F32, b_by(2)));
    assert_eq!(ported(&sig.output("out").unwrap().ty), (GDType::F32, b_by(3)));
    let k = load(&s);
    let x = f32_2d(&[[1.0, 1.0], [2.0, -1.0]]);
    let out = vec2(&k.forward(&inputs([("x", t(x.clone()))])).unwrap(), "out");
    assert_eq!(out, vec![vec![3.5, 6.0, 13.0], vec![0.5, 1.0, 6.0]]);

    // Without a bias: x·Wᵀ. Matching `in`/`out` params are accepted.
    let path = save(&dir, "nobias.safetensors", &[("weight", w)]);
    let mut s = spec("linear", "in = 2\nout = 3");
    s.weights = Some(path);
    let out = vec2(&load(&s).forward(&inputs([("x", t(x))])).unwrap(), "out");
    assert_eq!(out, vec![vec![3.0, 7.0, 11.0], vec![0.0, 2.0, 4.0]]);
}

#[test]
fn linear_quantize_needs_block_multiples() {
    let e = invalid_at(&spec("linear", "in = 48\nout = 2\nquantize = \"q8_0\""), "params.quantize");
    assert!(e.message.contains("32") && e.message.contains("48"), "{e:?}");
    let e = invalid_at(&spec("linear", "in = 128\nout = 2\nquantize = \"q4k\""), "params.quantize");
    assert!(e.message.contains("256") && e.message.contains("128"), "{e:?}");
    invalid_at(&spec("linear", "in = 64\nout = 2\nquantize = \"q9\""), "params.quantize");
    let (key, _) = param_err(load_err(&spec("linear", "in = 48\nout = 2\nquantize = \"q8_0\"")));
    assert_eq!(key, "params.quantize");
    // Multiples are fine.
    signature(&spec("linear", "in = 64\nout = 2\nquantize = \"q8_0\""));
    signature(&spec("linear", "in = 512\nout = 2\nquantize = \"q4k\""));
}

#[test]
fn linear_quantized_output_is_close_to_f32() {
    for (q, n, tol) in [("q8_0", 64usize, 0.05f32), ("q4k", 256, 0.25)] {
        let x_data: Vec<f32> = (0..2 * n).map(|i| ((i * 37 % 17) as f32 - 8.0) / 8.0).collect();
        let x = Tensor::from_vec(x_data, (2, n), &Device::Cpu).unwrap();
        let full = load(&spec("linear", &format!("in = {n}\nout = 4\nseed = 3")));
        let quant = load(&spec("linear", &format!("in = {n}\nout = 4\nseed = 3\nquantize = \"{q}\"")));
        let a = vec2(&full.forward(&inputs([("x", t(x.clone()))])).unwrap(), "out");
        let b = vec2(&quant.forward(&inputs([("x", t(x))])).unwrap(), "out");
        for (ra, rb) in a.iter().zip(&b) {
            assert_close(rb, ra, tol);
        }
    }
}

#[test]
fn linear_params_must_agree_with_the_file() {
    let dir = temp_dir("linear-disagree");
    let w = Tensor::zeros((3, 2), DType::F32, &Device::Cpu).unwrap();
    let path = save(&dir, "lin.safetensors", &[("weight", w)]);
    let mut s = spec("linear", "in = 4");
    s.weights = Some(path.clone());
    let e = invalid_at(&s, "params.in");
    assert!(e.message.contains('4') && e.message.contains('2'), "{e:?}");
    assert_eq!(param_err(load_err(&s)).0, "params.in");

    let mut s = spec("linear", "out = 5");
    s.weights = Some(path);
    invalid_at(&s, "params.out");

    // A bias of the wrong length, and a file without `weight`.
    let path = save(
        &dir,
        "badbias.safetensors",
        &[
            ("weight", Tensor::zeros((3, 2), DType::F32, &Device::Cpu).unwrap()),
            ("bias", Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap()),
        ],
    );
    let mut s = spec("linear", "");
    s.weights = Some(path);
    let e = invalid_at(&s, "weights");
    assert!(e.message.contains("bias"), "{e:?}");
    let path = save(&dir, "noweight.safetensors", &[("w", Tensor::zeros((3, 2), DType::F32, &Device::Cpu).unwrap())]);
    let mut s = spec("linear", "");
    s.weights = Some(path);
    let e = invalid_at(&s, "weights");
    assert!(e.message.contains("weight"), "{e:?}");
}

#[test]
fn linear_without_weights_needs_in_and_out() {
    for params in ["", "in = 4", "out = 3", "seed = 1"] {
        let e = invalid_at(&spec("linear", params), "params");
        assert!(e.message.contains("in") && e.message.contains("out"), "{params:?}: {e:?}");
        assert_eq!(param_err(load_err(&spec("linear", params))).0, "params", "{params:?}");
    }
    invalid_at(&spec("linear", "in = 0\nout = 3"), "params");
}

#[test]
fn linear_unknown_param_is_an_error() {
    let errs = invalid(&spec("linear", "in = 4\nout = 3\nbias = false"));
    assert!(errs.iter().any(|e| e.message.contains("bias")), "{errs:?}");
    assert!(errs.iter().all(|e| e.key.as_deref().is_some_and(|k| k.starts_with("params"))), "{errs:?}");
    load_err(&spec("linear", "in = 4\nout = 3\nbias = false"));
}

// ---------------------------------------------------------------------------------------------
// mlp
// ---------------------------------------------------------------------------------------------

#[test]
fn mlp_seeded_output_shape_and_determinism() {
    let s = spec("mlp", "layers = [4, 8, 3]\nactivation = \"gelu\"\nseed = 5");
    let sig = signature(&s);
    assert_eq!(ported(&sig.input("x").unwrap().ty), (GDType::F32, b_by(4)));
    assert_eq!(ported(&sig.output("out").unwrap().ty), (GDType::F32, b_by(3)));
    let x = f32_2d(&[[1.0, 2.0, 3.0, 4.0], [0.0, -1.0, 0.5, 2.0]]);
    let a = load(&s).forward(&inputs([("x", t(x.clone()))])).unwrap();
    assert_eq!(out_tensor(&a, "out").dims(), &[2, 3]);
    let b = load(&s).forward(&inputs([("x", t(x))])).unwrap();
    assert_eq!(vec2(&a, "out"), vec2(&b, "out"));
    for act in ["relu", "tanh", "sigmoid"] {
        let s = spec("mlp", &format!("layers = [4, 2]\nactivation = \"{act}\""));
        let out = load(&s).forward(&inputs([("x", t(f32_2d(&[[1.0, 2.0, 3.0, 4.0]])))])).unwrap();
        assert_eq!(out_tensor(&out, "out").dims(), &[1, 2], "{act}");
    }
}

#[test]
fn mlp_params_are_validated() {
    let e = invalid_at(&spec("mlp", "layers = [4, 2]\nactivation = \"swish\""), "params.activation");
    assert!(e.message.contains("swish"), "{e:?}");
    assert_eq!(param_err(load_err(&spec("mlp", "layers = [4, 2]\nactivation = \"swish\""))).0, "params.activation");
    invalid_at(&spec("mlp", "layers = [4]"), "params.layers");
    invalid_at(&spec("mlp", "layers = []"), "params.layers");
    invalid_at(&spec("mlp", "layers = [4, 0, 2]"), "params.layers");
    assert_eq!(param_err(load_err(&spec("mlp", "layers = [4]"))).0, "params.layers");
    // `layers` is required; unknown keys are rejected.
    invalid(&spec("mlp", ""));
    let errs = invalid(&spec("mlp", "layers = [2, 2]\ndropout = 0.1"));
    assert!(errs.iter().any(|e| e.message.contains("dropout")), "{errs:?}");
}

#[test]
fn mlp_from_a_file_applies_the_activation_between_layers_only() {
    let dir = temp_dir("mlp-file");
    let dev = Device::Cpu;
    let path = save(
        &dir,
        "mlp.safetensors",
        &[
            ("layers.0.weight", f32_2d(&[[1.0, 0.0], [0.0, -1.0]])),
            ("layers.0.bias", Tensor::new(&[0f32, 0.0], &dev).unwrap()),
            ("layers.1.weight", f32_2d(&[[-1.0, -1.0]])),
            ("layers.1.bias", Tensor::new(&[0.5f32], &dev).unwrap()),
        ],
    );
    let mut s = spec("mlp", "layers = [2, 2, 1]");
    s.weights = Some(path);
    // h = relu([2, -3]) = [2, 0]; out = -2 - 0 + 0.5 = -1.5 (no activation after the last layer).
    let out = load(&s).forward(&inputs([("x", t(f32_2d(&[[2.0, 3.0]])))])).unwrap();
    assert_eq!(vec2(&out, "out"), vec![vec![-1.5]]);
}

#[test]
fn mlp_wrong_shaped_layer_in_file_names_both_shapes() {
    let dir = temp_dir("mlp-shape");
    let dev = Device::Cpu;
    let path = save(
        &dir,
        "mlp.safetensors",
        &[
            ("layers.0.weight", Tensor::zeros((3, 4), DType::F32, &dev).unwrap()),
            ("layers.0.bias", Tensor::zeros(3, DType::F32, &dev).unwrap()),
            ("layers.1.weight", Tensor::zeros((1, 3), DType::F32, &dev).unwrap()),
            ("layers.1.bias", Tensor::zeros(1, DType::F32, &dev).unwrap()),
        ],
    );
    let mut s = spec("mlp", "layers = [4, 2, 1]");
    s.weights = Some(path);
    let errs = invalid(&s);
    let e = errs.iter().find(|e| e.message.contains("layers.0.weight")).unwrap_or_else(|| panic!("{errs:?}"));
    assert_eq!(e.key.as_deref(), Some("weights"));
    assert!(e.message.contains("[3, 4]") && e.message.contains("[2, 4]"), "{e:?}");
    let (key, message) = param_err(load_err(&s));
    assert_eq!(key, "weights");
    assert!(message.contains("[3, 4]") && message.contains("[2, 4]"), "{message}");
}

#[test]
fn mlp_file_without_a_bias_fails_to_load_with_a_typed_error() {
    let dir = temp_dir("mlp-nobias");
    let path =
        save(&dir, "mlp.safetensors", &[("layers.0.weight", Tensor::zeros((2, 4), DType::F32, &Device::Cpu).unwrap())]);
    let mut s = spec("mlp", "layers = [4, 2]");
    s.weights = Some(path);
    let e = load_err(&s);
    assert!(e.to_string().contains("layers.0.bias"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// digits_cnn
// ---------------------------------------------------------------------------------------------

fn digits_input(rows: usize) -> Tensor {
    let data: Vec<f32> = (0..rows * 64).map(|i| (i * 7 % 17) as f32).collect();
    Tensor::from_vec(data, (rows, 64), &Device::Cpu).unwrap()
}

#[test]
fn digits_cnn_seeded_output_shape() {
    let s = spec("digits_cnn", "features = 10\nseed = 1");
    let sig = signature(&s);
    assert_eq!(ported(&sig.input("x").unwrap().ty), (GDType::F32, b_by(64)));
    assert_eq!(ported(&sig.output("features").unwrap().ty), (GDType::F32, b_by(10)));
    let out = load(&s).forward(&inputs([("x", t(digits_input(3)))])).unwrap();
    let f = out_tensor(&out, "features");
    assert_eq!(f.dims(), &[3, 10]);
    let v = f.to_vec2::<f32>().unwrap();
    assert!(v.iter().flatten().all(|x| x.is_finite() && *x >= 0.0), "relu output: {v:?}");
    // Same seed, same features; default feature size.
    let again = load(&s).forward(&inputs([("x", t(digits_input(3)))])).unwrap();
    assert_eq!(vec2(&again, "features"), v);
    let out = load(&spec("digits_cnn", "")).forward(&inputs([("x", t(digits_input(2)))])).unwrap();
    assert_eq!(out_tensor(&out, "features").dims(), &[2, maas_kernels::kinds::digits_cnn::DEFAULT_FEATURES]);
    invalid_at(&spec("digits_cnn", "features = 0"), "params.features");
}

fn digits_file(dir: &Path, features: usize, skip: &str) -> PathBuf {
    let tensors: Vec<(&str, Tensor)> = maas_kernels::kinds::digits_cnn::tensor_shapes(features)
        .into_iter()
        .filter(|(n, _)| *n != skip)
        .map(|(n, shape)| (n, Tensor::ones(shape, DType::F32, &Device::Cpu).unwrap().affine(0.01, 0.0).unwrap()))
        .collect();
    save(dir, &format!("digits-{skip}.safetensors"), &tensors)
}

#[test]
fn digits_cnn_from_a_file() {
    let dir = temp_dir("digits-file");
    let mut s = spec("digits_cnn", "");
    s.weights = Some(digits_file(&dir, 5, ""));
    assert_eq!(ported(&signature(&s).output("features").unwrap().ty), (GDType::F32, b_by(5)));
    let out = load(&s).forward(&inputs([("x", t(digits_input(2)))])).unwrap();
    assert_eq!(out_tensor(&out, "features").dims(), &[2, 5]);
    let mut s = spec("digits_cnn", "features = 6");
    s.weights = Some(digits_file(&dir, 5, ""));
    invalid_at(&s, "params.features");
}

#[test]
fn digits_cnn_file_missing_fc_bias_names_it() {
    let dir = temp_dir("digits-nobias");
    let mut s = spec("digits_cnn", "");
    s.weights = Some(digits_file(&dir, 5, "fc.bias"));
    let errs = invalid(&s);
    assert!(errs.iter().any(|e| e.key.as_deref() == Some("weights") && e.message.contains("fc.bias")), "{errs:?}");
    let (key, message) = param_err(load_err(&s));
    assert_eq!(key, "weights");
    assert!(message.contains("fc.bias"), "{message}");
}

// ---------------------------------------------------------------------------------------------
// tokenizer (a tiny self-made word-level tokenizer)
// ---------------------------------------------------------------------------------------------

const TINY_TOKENIZER: &str = r#"{
  "version": "1.0",
  "truncation": null,
  "padding": null,
  "added_tokens": [],
  "normalizer": null,
  "pre_tokenizer": { "type": "Whitespace" },
  "post_processor": null,
  "decoder": null,
  "model": { "type": "WordLevel", "vocab": { "[PAD]": 0, "[UNK]": 1, "hello": 2, "world": 3, "again": 4 }, "unk_token": "[UNK]" }
}"#;

#[test]
fn tokenizer_pads_to_the_longest_row_and_truncates() {
    let dir = temp_dir("tokenizer");
    std::fs::write(dir.join("tokenizer.json"), TINY_TOKENIZER).unwrap();
    let mut s = spec("tokenizer", "path = \"tokenizer.json\"");
    s.base_dir = dir.to_path_buf();
    let sig = signature(&s);
    assert_eq!(sig.input("text").unwrap().ty, PortType::Text);
    let k = load(&s);
    let out = k.forward(&inputs([("text", Value::text(["hello world again", "world", "nope"]))])).unwrap();
    let ids = out_tensor(&out, "input_ids");
    assert_eq!(ids.dtype(), DType::U32);
    assert_eq!(ids.to_vec2::<u32>().unwrap(), vec![vec![2, 3, 4], vec![3, 0, 0], vec![1, 0, 0]]);
    assert_eq!(
        out_tensor(&out, "attention_mask").to_vec2::<u32>().unwrap(),
        vec![vec![1, 1, 1], vec![1, 0, 0], vec![1, 0, 0]]
    );
    assert_eq!(out_tensor(&out, "token_type_ids").to_vec2::<u32>().unwrap(), vec![vec![0; 3]; 3]);

    let mut s = spec("tokenizer", "path = \"tokenizer.json\"\nmax_length = 2");
    s.base_dir = dir.to_path_buf();
    let out = load(&s).forward(&inputs([("text", Value::text(["hello world again"]))])).unwrap();
    assert_eq!(out_tensor(&out, "input_ids").to_vec2::<u32>().unwrap(), vec![vec![2, 3]]);

    let mut s = spec("tokenizer", "path = \"tokenizer.json\"\nmax_length = 0");
    s.base_dir = dir.to_path_buf();
    invalid_at(&s, "params.max_length");

    // A tensor into the text port.
    let (port, message) = input_err(k.forward(&inputs([("text", t(f32_2d(&[[1.0]])))])).unwrap_err());
    assert_eq!(port, "text");
    assert!(message.contains("text"), "{message}");
}

// ---------------------------------------------------------------------------------------------
// Input checking by `Loaded::forward`: typed errors, never a panic
// ---------------------------------------------------------------------------------------------

#[test]
fn wrong_dtype_names_the_port_and_the_shape() {
    let k = load(&spec("softmax", ""));
    let ids = Tensor::new(&[[1u32, 2, 3]], &Device::Cpu).unwrap();
    let (port, message) = input_err(k.forward(&inputs([("x", t(ids))])).unwrap_err());
    assert_eq!(port, "x");
    assert!(message.contains("f32[B,N]"), "{message}");
    assert!(message.contains("U32"), "{message}");
    assert!(message.contains("[1, 3]"), "{message}");
}

#[test]
fn wrong_rank_is_an_input_error() {
    let k = load(&spec("softmax", ""));
    for x in [
        Tensor::new(&[1f32, 2.0], &Device::Cpu).unwrap(),
        Tensor::zeros((1, 2, 3), DType::F32, &Device::Cpu).unwrap(),
        Tensor::new(1f32, &Device::Cpu).unwrap(),
    ] {
        let dims = x.dims().to_vec();
        let (port, message) = input_err(k.forward(&inputs([("x", t(x))])).unwrap_err());
        assert_eq!(port, "x");
        assert!(message.contains(&format!("{dims:?}")), "{message}");
    }
}

#[test]
fn wrong_fixed_size_is_an_input_error() {
    let k = load(&spec("linear", "in = 4\nout = 2"));
    let x = Tensor::zeros((2, 5), DType::F32, &Device::Cpu).unwrap();
    let (port, message) = input_err(k.forward(&inputs([("x", t(x))])).unwrap_err());
    assert_eq!(port, "x");
    assert!(message.contains("f32[B,4]") && message.contains("[2, 5]"), "{message}");
}

#[test]
fn missing_required_port_is_missing_input() {
    let k = load(&spec("cosine", ""));
    let a = f32_2d(&[[1.0, 0.0]]);
    match k.forward(&inputs([("a", t(a))])).unwrap_err() {
        KernelError::MissingInput { port } => assert_eq!(port, "b"),
        other => panic!("expected MissingInput, got {other:?}"),
    }
    match k.forward(&Values::new()).unwrap_err() {
        KernelError::MissingInput { port } => assert!(port == "a" || port == "b"),
        other => panic!("expected MissingInput, got {other:?}"),
    }
}

#[test]
fn unknown_port_is_an_input_error() {
    let k = load(&spec("softmax", ""));
    let x = f32_2d(&[[1.0, 2.0]]);
    let (port, message) = input_err(k.forward(&inputs([("x", t(x.clone())), ("y", t(x))])).unwrap_err());
    assert_eq!(port, "y");
    assert!(message.contains('x'), "names the expected ports: {message}");
}

#[test]
fn ports_with_different_row_counts_are_an_input_error() {
    let k = load(&spec("cosine", ""));
    let a = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
    let b = Tensor::zeros((3, 3), DType::F32, &Device::Cpu).unwrap();
    let (port, message) = input_err(k.forward(&inputs([("a", t(a)), ("b", t(b))])).unwrap_err());
    assert_eq!(port, "b");
    assert!(message.contains("rows") && message.contains('2') && message.contains('3'), "{message}");
}

#[test]
fn symbol_mismatch_across_ports_names_the_symbol() {
    let k = load(&spec("mean_pool", ""));
    let hidden = Tensor::zeros((1, 4, 3), DType::F32, &Device::Cpu).unwrap();
    let mask = Tensor::ones((1, 5), DType::U32, &Device::Cpu).unwrap();
    let (port, message) = input_err(k.forward(&inputs([("hidden", t(hidden)), ("mask", t(mask))])).unwrap_err());
    assert_eq!(port, "mask");
    assert!(message.contains("`S`"), "{message}");
    assert!(message.contains('4') && message.contains('5'), "{message}");

    // The same symbol within cosine: `D` of a and b.
    let k = load(&spec("cosine", ""));
    let a = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
    let b = Tensor::zeros((2, 4), DType::F32, &Device::Cpu).unwrap();
    let (_, message) = input_err(k.forward(&inputs([("a", t(a)), ("b", t(b))])).unwrap_err());
    assert!(message.contains("`D`"), "{message}");
}

#[test]
fn text_into_a_tensor_port_is_an_input_error() {
    let k = load(&spec("softmax", ""));
    let (port, message) = input_err(k.forward(&inputs([("x", Value::text(["hi"]))])).unwrap_err());
    assert_eq!(port, "x");
    assert!(message.contains("text"), "{message}");
}

#[test]
fn empty_batches_do_not_panic() {
    // Zero rows through every stateless kind: an empty output (or a typed error), never a panic.
    let dev = Device::Cpu;
    let e2 = || t(Tensor::zeros((0, 3), DType::F32, &dev).unwrap());
    let cases: Vec<(&str, &str, Values)> = vec![
        ("softmax", "", inputs([("x", e2())])),
        ("argmax", "", inputs([("x", e2())])),
        ("l2_normalize", "", inputs([("x", e2())])),
        ("topk", "k = 2", inputs([("x", e2())])),
        ("cosine", "", inputs([("a", e2()), ("b", e2())])),
        ("concat", "", inputs([("a", e2()), ("b", e2())])),
        (
            "mean_pool",
            "",
            inputs([
                ("hidden", t(Tensor::zeros((0, 2, 3), DType::F32, &dev).unwrap())),
                ("mask", t(Tensor::zeros((0, 2), DType::U32, &dev).unwrap())),
            ]),
        ),
        ("linear", "in = 3\nout = 2", inputs([("x", e2())])),
    ];
    for (kind, params, values) in cases {
        let k = load(&spec(kind, params));
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| k.forward(&values)));
        match result {
            Err(_) => panic!("`{kind}` panicked on an empty batch"),
            Ok(Ok(out)) => {
                for (port, v) in &out {
                    assert_eq!(v.rows(), Some(0), "{kind}.{port}");
                }
            }
            // A typed error is acceptable (argmax's reduction refuses empty tensors).
            Ok(Err(_)) => {}
        }
    }
}

#[test]
fn zero_width_rows_do_not_panic() {
    // Rows of length 0 fit `f32[B,N]`; a kernel may refuse them with a typed error, but must
    // not panic (softmax used to, inside candle-nn's `softmax_last_dim`).
    let dev = Device::Cpu;
    let e2 = || t(Tensor::zeros((2, 0), DType::F32, &dev).unwrap());
    let cases: Vec<(&str, &str, Values)> = vec![
        ("softmax", "", inputs([("x", e2())])),
        ("argmax", "", inputs([("x", e2())])),
        ("l2_normalize", "", inputs([("x", e2())])),
        ("topk", "k = 1", inputs([("x", e2())])),
        ("cosine", "", inputs([("a", e2()), ("b", e2())])),
        ("concat", "", inputs([("a", e2()), ("b", e2())])),
        (
            "mean_pool",
            "",
            inputs([
                ("hidden", t(Tensor::zeros((2, 0, 3), DType::F32, &dev).unwrap())),
                ("mask", t(Tensor::zeros((2, 0), DType::U32, &dev).unwrap())),
            ]),
        ),
    ];
    let mut panicked = Vec::new();
    for (kind, params, values) in cases {
        let k = load(&spec(kind, params));
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| k.forward(&values))) {
            Err(_) => panicked.push(kind),
            Ok(Ok(out)) => {
                for (port, v) in &out {
                    assert_eq!(v.rows(), Some(2), "{kind}.{port}");
                }
            }
            Ok(Err(_)) => {}
        }
    }
    assert!(panicked.is_empty(), "kinds that panicked on rows of length 0: {panicked:?}");

    // What the well-defined cases give.
    let out = load(&spec("mean_pool", ""))
        .forward(&inputs([
            ("hidden", t(Tensor::zeros((2, 0, 3), DType::F32, &dev).unwrap())),
            ("mask", t(Tensor::zeros((2, 0), DType::U32, &dev).unwrap())),
        ]))
        .unwrap();
    assert_eq!(vec2(&out, "out"), vec![vec![0.0; 3]; 2]);
    let (port, _) = input_err(load(&spec("topk", "k = 1")).forward(&inputs([("x", e2())])).unwrap_err());
    assert_eq!(port, "x");
}

#[test]
fn linear_and_mlp_with_f16_weights_work_or_are_rejected_up_front() {
    // A half-precision weights file must either be rejected by the signature (at `weights`) or
    // give the right answer; accepting it and then failing every batch with a dtype mismatch
    // in the matmul is wrong.
    let dir = temp_dir("f16");
    let dev = Device::Cpu;
    let w = f32_2d(&[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]).to_dtype(DType::F16).unwrap();
    let b = Tensor::new(&[0.5f32, -1.0, 2.0], &dev).unwrap().to_dtype(DType::F16).unwrap();
    let x = f32_2d(&[[1.0, 1.0], [2.0, -1.0]]);
    let expected = vec![vec![3.5, 6.0, 13.0], vec![0.5, 1.0, 6.0]];

    let mut lin = spec("linear", "");
    lin.weights = Some(save(&dir, "lin.safetensors", &[("weight", w.clone()), ("bias", b.clone())]));
    let mut mlp = spec("mlp", "layers = [2, 3]");
    mlp.weights = Some(save(&dir, "mlp.safetensors", &[("layers.0.weight", w), ("layers.0.bias", b)]));
    for s in [lin, mlp] {
        match Registry::builtin().signature(&s) {
            Err(SignatureError::Invalid(errs)) => {
                assert!(errs.iter().any(|e| e.key.as_deref() == Some("weights")), "{}: {errs:?}", s.kind);
            }
            Err(other) => panic!("{}: {other:?}", s.kind),
            Ok(_) => {
                let out = load(&s)
                    .forward(&inputs([("x", t(x.clone()))]))
                    .unwrap_or_else(|e| panic!("`{}` accepted f16 weights but cannot run: {e}", s.kind));
                assert_eq!(vec2(&out, "out"), expected, "{}", s.kind);
            }
        }
    }
}
