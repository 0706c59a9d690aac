//! all-MiniLM-L6-v2 parity through the real pipeline graph (`examples/pipelines/minilm.toml`):
//! token ids, embeddings (batched and unbatched), similarity, truncation and typed input
//! errors (ids past the vocabulary, sequences past the model's positions), against `tests/data/minilm-reference.json` (computed independently by
//! sentence-transformers). Also measures the error of q8_0/q4k `Linear` layers against f32.
//!
//! The model must have been fetched with `scripts/fetch-models`; without it these tests fail
//! (they do not skip).

use std::path::PathBuf;
use std::sync::OnceLock;

use candle_core::{Device, Tensor};
use maas_engine::{Engine, InferError, Sequential};
use maas_graphs::SourceFile;
use maas_kernels::{Linear, Quantize, Registry, Value, Values};

/// Largest accepted max abs difference to the reference embeddings.
const TOL: f32 = 1e-5;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Fails (never skips) when the model has not been fetched.
fn require_model() {
    let dir = root().join("models/all-MiniLM-L6-v2");
    for f in ["config.json", "tokenizer.json", "model.safetensors"] {
        assert!(
            dir.join(f).is_file(),
            "`{}` is missing: run `scripts/fetch-models` first (from {})",
            dir.join(f).display(),
            root().display()
        );
    }
}

struct Reference {
    texts: Vec<String>,
    token_ids: Vec<Vec<u32>>,
    embeddings: Vec<Vec<f32>>,
}

fn reference() -> &'static Reference {
    static REF: OnceLock<Reference> = OnceLock::new();
    REF.get_or_init(|| {
        let path = root().join("tests/data/minilm-reference.json");
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        let v: serde_json::Value = serde_json::from_str(&text).expect("reference is valid JSON");
        let texts: Vec<String> = serde_json::from_value(v["texts"].clone()).expect("`texts`: strings");
        let token_ids: Vec<Vec<u32>> = serde_json::from_value(v["token_ids"].clone()).expect("`token_ids`: ids");
        let embeddings: Vec<Vec<f32>> = serde_json::from_value(v["embeddings"].clone()).expect("`embeddings`: floats");
        assert_eq!(texts.len(), 2, "the reference has two texts");
        assert_eq!(token_ids.len(), texts.len());
        assert_eq!(embeddings.len(), texts.len());
        assert!(embeddings.iter().all(|e| e.len() == 384), "reference embeddings are 384-dim");
        Reference { texts, token_ids, embeddings }
    })
}

/// The minilm graph, loaded once for all tests.
fn engine() -> &'static Sequential {
    static ENGINE: OnceLock<Sequential> = OnceLock::new();
    ENGINE.get_or_init(|| {
        require_model();
        let registry = Registry::builtin();
        let graph = root().join("examples/pipelines/minilm.toml");
        let checked = maas_engine::load_files(&[graph.as_path()], &registry)
            .unwrap_or_else(|d| panic!("minilm.toml does not check:\n{d}"));
        Sequential::new(&checked.graph, &registry).unwrap_or_else(|e| panic!("minilm.toml does not load: {e}"))
    })
}

fn text(rows: &[&str]) -> Value {
    Value::text(rows.iter().copied())
}

fn tensor_of<'a>(out: &'a Values, port: &str) -> &'a Tensor {
    out.get(port)
        .unwrap_or_else(|| panic!("no output `{port}`"))
        .as_tensor()
        .unwrap_or_else(|| panic!("`{port}` is not a tensor"))
}

/// `embed` on `rows`, as [B][384].
fn embed(rows: &[&str]) -> Vec<Vec<f32>> {
    let out = engine().run("embed", Values::from([("text".to_string(), text(rows))])).expect("embed runs");
    let t = tensor_of(&out, "embedding");
    assert_eq!(t.dims(), &[rows.len(), 384], "embedding shape");
    t.to_vec2().expect("embedding is f32[B,384]")
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn norm(v: &[f32]) -> f32 {
    v.iter().map(|x| x * x).sum::<f32>().sqrt()
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// The tokenizer's outputs, as [B][S].
struct Tokens {
    ids: Vec<Vec<u32>>,
    mask: Vec<Vec<u32>>,
    types: Vec<Vec<u32>>,
}

/// Runs the tokenizer submodel.
fn tokenize(rows: &[&str]) -> Tokens {
    let tok = engine().submodel("tokenizer").expect("graph has a `tokenizer` submodel");
    let out = tok.forward(&Values::from([("text".to_string(), text(rows))])).expect("tokenizer runs");
    let get = |p: &str| -> Vec<Vec<u32>> { tensor_of(&out, p).to_vec2().expect("u32[B,S]") };
    Tokens { ids: get("input_ids"), mask: get("attention_mask"), types: get("token_type_ids") }
}

#[test]
fn token_ids_match_reference() {
    let r = reference();
    // Each text alone: no padding, ids exactly as sentence-transformers.
    for (t, want) in r.texts.iter().zip(&r.token_ids) {
        let Tokens { ids, mask, types } = tokenize(&[t]);
        assert_eq!(ids, vec![want.clone()], "ids of {t:?}");
        assert_eq!(mask, vec![vec![1; want.len()]], "mask of {t:?}");
        assert_eq!(types, vec![vec![0; want.len()]], "token types of {t:?}");
    }
    // Both in one batch: padded to the longest row with id 0 and mask 0; the mask trims each
    // row back to the reference ids.
    let rows: Vec<&str> = r.texts.iter().map(String::as_str).collect();
    let Tokens { ids, mask, .. } = tokenize(&rows);
    let longest = r.token_ids.iter().map(Vec::len).max().unwrap();
    assert_ne!(r.token_ids[0].len(), r.token_ids[1].len(), "the reference rows differ in length");
    for (i, want) in r.token_ids.iter().enumerate() {
        assert_eq!(ids[i].len(), longest, "row {i} is padded to the longest row");
        let kept: Vec<u32> = ids[i].iter().zip(&mask[i]).filter(|&(_, &m)| m == 1).map(|(&id, _)| id).collect();
        assert_eq!(&kept, want, "row {i}: ids where mask is 1");
        assert!(mask[i].iter().all(|&m| m == 0 || m == 1), "row {i}: mask is 0/1");
        assert_eq!(mask[i].iter().filter(|&&m| m == 1).count(), want.len(), "row {i}: mask count");
        // Padding is a suffix: ones then zeros, with pad id 0.
        assert!(mask[i][..want.len()].iter().all(|&m| m == 1), "row {i}: real tokens first");
        assert!(mask[i][want.len()..].iter().all(|&m| m == 0), "row {i}: padding masked out");
        assert!(ids[i][want.len()..].iter().all(|&id| id == 0), "row {i}: pad id is 0");
    }
}

#[test]
fn embed_matches_reference_unbatched_and_batched() {
    let r = reference();
    let rows: Vec<&str> = r.texts.iter().map(String::as_str).collect();

    let mut unbatched = Vec::new();
    for (i, t) in rows.iter().enumerate() {
        let e = embed(&[t]).remove(0);
        let d = max_abs_diff(&e, &r.embeddings[i]);
        eprintln!("embed unbatched row {i} ({t:?}): max abs diff to reference = {d:.3e}");
        assert!(d < TOL, "unbatched row {i}: max abs diff {d:e} >= {TOL:e}");
        assert!((norm(&e) - 1.0).abs() < TOL, "unbatched row {i} is unit-norm, got {}", norm(&e));
        unbatched.push(e);
    }

    let batched = embed(&rows);
    for (i, e) in batched.iter().enumerate() {
        let d = max_abs_diff(e, &r.embeddings[i]);
        let du = max_abs_diff(e, &unbatched[i]);
        eprintln!("embed batched row {i}: max abs diff to reference = {d:.3e}, to unbatched = {du:.3e}");
        assert!(d < TOL, "batched row {i}: max abs diff {d:e} >= {TOL:e}");
        assert!(du < TOL, "batched row {i} vs unbatched: max abs diff {du:e} >= {TOL:e}");
    }

    // The two sentences are different: a broken model that returns one vector fails here.
    let apart = max_abs_diff(&batched[0], &batched[1]);
    assert!(apart > 0.05, "the two embeddings should differ, max abs diff {apart}");
}

#[test]
fn similarity_matches_reference_dot_product() {
    let r = reference();
    let run = |a: &str, b: &str| -> f32 {
        let inputs = Values::from([("a".to_string(), text(&[a])), ("b".to_string(), text(&[b]))]);
        let out = engine().run("similarity", inputs).expect("similarity runs");
        let s = tensor_of(&out, "score");
        assert_eq!(s.dims(), &[1], "score shape");
        s.to_vec1::<f32>().expect("f32[B]")[0]
    };
    let want = dot(&r.embeddings[0], &r.embeddings[1]);
    let got = run(&r.texts[0], &r.texts[1]);
    eprintln!("similarity: {got} vs reference dot product {want} (diff {:.3e})", (got - want).abs());
    assert!((got - want).abs() < TOL, "similarity {got} vs reference {want}");

    for t in &r.texts {
        let s = run(t, t);
        eprintln!("similarity of {t:?} with itself: {s} (diff to 1: {:.3e})", (s - 1.0).abs());
        assert!((s - 1.0).abs() < TOL, "self-similarity of {t:?} is {s}");
    }

    // Batched similarity: rows are scored pairwise.
    let inputs = Values::from([
        ("a".to_string(), text(&[&r.texts[0], &r.texts[1]])),
        ("b".to_string(), text(&[&r.texts[1], &r.texts[1]])),
    ]);
    let out = engine().run("similarity", inputs).expect("batched similarity runs");
    let s: Vec<f32> = tensor_of(&out, "score").to_vec1().expect("f32[B]");
    assert!((s[0] - want).abs() < TOL, "batched pair 0: {} vs {want}", s[0]);
    assert!((s[1] - 1.0).abs() < TOL, "batched pair 1: {} vs 1", s[1]);
}

#[test]
fn long_text_is_truncated_at_256_tokens() {
    // ~600 words, each one token: far past 256 (and past the model's 512 positions).
    let long = "the quick brown fox jumps over the lazy dog ".repeat(70);
    let Tokens { ids, mask, .. } = tokenize(&[&long]);
    assert_eq!(ids[0].len(), 256, "truncated to 256 tokens");
    assert!(mask[0].iter().all(|&m| m == 1), "no padding in a single truncated row");
    assert_eq!(ids[0][0], 101, "starts with [CLS]");
    assert_eq!(ids[0][255], 102, "still ends with [SEP] after truncation");

    // In a batch with a short text, and alone: no error, unit-norm embeddings.
    let out = embed(&[&long, "hello world"]);
    let alone = embed(&[&long]).remove(0);
    for (i, e) in out.iter().enumerate() {
        assert!((norm(e) - 1.0).abs() < TOL, "row {i} is unit-norm, got {}", norm(e));
        assert!(e.iter().all(|x| x.is_finite()), "row {i} is finite");
    }
    let d = max_abs_diff(&out[0], &alone);
    assert!(d < TOL, "truncated text: batched vs alone differ by {d:e}");
    // Truncation keeps the first 256 tokens: a text with a different tail embeds the same.
    let other_tail = format!("{long} completely different words at the end that are cut off");
    let tail = embed(&[&other_tail]).remove(0);
    let d = max_abs_diff(&tail, &alone);
    assert!(d < TOL, "tokens past 256 must not matter, diff {d:e}");
}

#[test]
fn tensor_on_text_port_is_a_typed_error() {
    let t = Tensor::new(&[[1u32, 2, 3]], &Device::Cpu).unwrap();
    let err = engine()
        .run("embed", Values::from([("text".to_string(), Value::from(t))]))
        .expect_err("a tensor on a text port must be rejected");
    match &err {
        InferError::InvalidInput(msg) => {
            assert!(msg.contains("`text`"), "message should name the port `text`: {msg}");
        }
        other => panic!("expected InferError::InvalidInput, got {other:?}"),
    }
    eprintln!("tensor on `text`: {err}");

    // Neighbouring mistakes are typed too.
    let err = engine().run("embed", Values::new()).expect_err("missing input");
    assert!(matches!(&err, InferError::InvalidInput(m) if m.contains("`text`")), "missing input: {err:?}");
    let err = engine()
        .run("embed", Values::from([("text".to_string(), text(&["a"])), ("txt".to_string(), text(&["b"]))]))
        .expect_err("unknown input");
    assert!(matches!(&err, InferError::InvalidInput(m) if m.contains("`txt`")), "unknown input: {err:?}");
    let err = engine().run("no_such_pipeline", Values::new()).expect_err("unknown pipeline");
    assert!(matches!(&err, InferError::UnknownPipeline(p) if p == "no_such_pipeline"), "unknown pipeline: {err:?}");
}

/// Max abs error of a quantized 1536x1536 `Linear` against f32 on the same seeded weights.
fn quantized_error(q: Quantize) -> (f32, f32) {
    let (n_in, n_out, batch) = (1536, 1536, 32);
    let dev = Device::Cpu;
    let bound = 1.0 / (n_in as f32).sqrt();
    let w = maas_kernels::weights::seeded_uniform(&[n_out, n_in], bound, 7, &dev).unwrap();
    let b = maas_kernels::weights::seeded_uniform(&[n_out], bound, 8, &dev).unwrap();
    let x = maas_kernels::weights::seeded_uniform(&[batch, n_in], 1.0, 9, &dev).unwrap();
    let exact = Linear::new(w.clone(), Some(b.clone()), Quantize::None).unwrap().forward(&x).unwrap();
    let approx = Linear::new(w, Some(b), q).unwrap().forward(&x).unwrap();
    assert_eq!(approx.dims(), &[batch, n_out]);
    let exact: Vec<f32> = exact.flatten_all().unwrap().to_vec1().unwrap();
    let approx: Vec<f32> = approx.flatten_all().unwrap().to_vec1().unwrap();
    let scale = exact.iter().fold(0f32, |m, x| m.max(x.abs()));
    (max_abs_diff(&exact, &approx), scale)
}

#[test]
fn quantized_linear_error_is_bounded() {
    // Bounds set from measurement (see the eprintln) with margin: a wrong block layout or
    // a transposed weight gives errors of the order of the outputs themselves (~0.5+).
    for (q, bound) in [(Quantize::Q8_0, 0.05), (Quantize::Q4K, 0.3)] {
        let (err, scale) = quantized_error(q);
        eprintln!("linear 1536x1536 {q:?} vs f32: max abs error {err:.4e} (max |output| {scale:.3})");
        assert!(err > 0.0, "{q:?} should not be exact (is it quantizing at all?)");
        assert!(err < bound, "{q:?} max abs error {err} >= {bound}");
    }
}

/// The encoder fed u32 ids directly (no tokenizer to truncate them), on its actor.
const IDS_GRAPH: &str = r#"
[submodels.encoder]
kind = "bert"
weights = "models/all-MiniLM-L6-v2/model.safetensors"
params = { config = "models/all-MiniLM-L6-v2/config.json" }
batch = { max_size = 8 }

[pipelines.ids]
inputs = { ids = "u32[B,S]", mask = "u32[B,S]", types = "u32[B,S]" }
outputs = { hidden = "enc.hidden" }

[pipelines.ids.nodes]
enc = { submodel = "encoder", inputs = { input_ids = "$ids", attention_mask = "$mask", token_type_ids = "$types" } }
"#;

fn ids_request(ids: &[u32], types: &[u32]) -> Values {
    let row = |v: &[u32]| Value::Tensor(Tensor::new(v, &Device::Cpu).and_then(|t| t.unsqueeze(0)).expect("ids"));
    Values::from([
        ("ids".to_string(), row(ids)),
        ("mask".to_string(), row(&vec![1; ids.len()])),
        ("types".to_string(), row(types)),
    ])
}

fn invalid_input(result: Result<maas_engine::Response, InferError>) -> String {
    match result {
        Err(InferError::InvalidInput(m)) => m,
        other => panic!("expected invalid_input, got {:?}", other.map(|r| r.versions)),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_past_the_vocabulary_or_the_positions_are_invalid_input_not_a_failure() {
    require_model();
    let src = SourceFile::new("ids.toml", IDS_GRAPH, root());
    let e = Engine::builder().from_sources(vec![src]).await.expect("the ids graph serves");

    let m = invalid_input(e.infer("ids", ids_request(&[101, 999_999, 102], &[0, 0, 0])).await);
    for part in ["node `enc`", "input port `input_ids`", "999999", "position 1", "vocabulary size is 30522"] {
        assert!(m.contains(part), "`{part}` not in: {m}");
    }
    let long = vec![1000; 1000];
    let m = invalid_input(e.infer("ids", ids_request(&long, &vec![0; 1000])).await);
    for part in ["input port `input_ids`", "sequence length 1000", "maximum of 512 positions"] {
        assert!(m.contains(part), "`{part}` not in: {m}");
    }
    let m = invalid_input(e.infer("ids", ids_request(&[101, 7592, 102], &[0, 5, 0])).await);
    for part in ["input port `token_type_ids`", "token type id 5", "number of token types is 2"] {
        assert!(m.contains(part), "`{part}` not in: {m}");
    }

    // The encoder is healthy: it was never counted as failing, and it serves the next request.
    let ok = e.infer("ids", ids_request(&[101, 7592, 102], &[0, 0, 0])).await.expect("valid ids are served");
    assert_eq!(tensor_of(&ok.outputs, "hidden").dims(), [1, 3, 384]);
    let m = e.metrics();
    assert_eq!((m.submodels["encoder"].jobs_failed, m.submodels["encoder"].restarts), (0, 0), "{m:?}");
    e.shutdown().await;
}

/// minilm.toml with `extra` (`key = value, ...`) added to the encoder's params.
fn minilm_with(extra: &str) -> Result<maas_graphs::Checked, String> {
    require_model();
    let registry = Registry::builtin();
    let path = root().join("examples/pipelines/minilm.toml");
    let text = std::fs::read_to_string(&path).expect("minilm.toml");
    let config = r#"params = { config = "../../models/all-MiniLM-L6-v2/config.json" }"#;
    assert!(text.contains(config), "minilm.toml's encoder params changed");
    let text = text.replace(config, &config.replace(" }", &format!(", {extra} }}")));
    let dir = path.parent().expect("examples/pipelines");
    maas_engine::load_sources(vec![SourceFile::new("minilm.toml", text, dir)], &registry).map_err(|d| d.to_string())
}

/// The minilm graph with `extra` encoder params, loaded.
fn engine_with(extra: &str) -> Sequential {
    let checked = minilm_with(extra).unwrap_or_else(|d| panic!("minilm.toml with {extra} does not check:\n{d}"));
    Sequential::new(&checked.graph, &Registry::builtin()).unwrap_or_else(|e| panic!("with {extra}: {e}"))
}

/// The minilm graph with the encoder computing in `dtype`.
fn engine_in(dtype: &str) -> Sequential {
    engine_with(&format!("dtype = \"{dtype}\""))
}

/// Sentences of very different lengths (1 to 40-odd tokens), so a batch of them is mostly
/// padding for the short ones.
const MIXED: [&str; 7] = [
    "Hi.",
    "A man is eating food.",
    "The quick brown fox jumps over the lazy dog near the quiet river bank.",
    "ok",
    "Researchers published a new study on the migration patterns of arctic terns, which fly from pole to pole every year and see more daylight than any other animal on the planet.",
    "Interest rates are expected to remain unchanged until the end of the year.",
    "?",
];

/// The encoder's hidden states for `rows` (one batch), through `engine`'s own submodels.
fn hidden(engine: &Sequential, rows: &[&str]) -> Tensor {
    let tok = engine.submodel("tokenizer").expect("tokenizer");
    let enc = engine.submodel("encoder").expect("encoder");
    let ids = tok.forward(&Values::from([("text".to_string(), text(rows))])).expect("tokenizer runs");
    let out = enc.forward(&ids).expect("encoder runs");
    tensor_of(&out, "hidden").clone()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.max(0))
        .and_then(|d| d.to_scalar())
        .expect("diff")
}

#[test]
fn the_fast_encoder_matches_candle_transformers_batched_unbatched_and_padded() {
    let candle = engine_with(r#"implementation = "candle""#);
    let mut checked = 0;
    for fast in [engine_with(r#"implementation = "fast""#), engine_with(r#"implementation = "fast", threads = 2"#)] {
        // One batch of mixed lengths: every row but the longest is padded.
        let (want, got) = (hidden(&candle, &MIXED), hidden(&fast, &MIXED));
        assert_eq!(got.dims()[..2], [MIXED.len(), want.dims()[1]]);
        // Padding positions' states are used by nothing downstream (pooling masks them) and
        // agree less closely (measured 1.3e-4); a broken mask would be off by far more.
        let d = max_diff(&want, &got);
        assert!(d < 1e-3, "batched, padding included: max abs diff {d:e}");
        let kept = |t: &Tensor, i: usize, len: usize| t.get(i).and_then(|t| t.narrow(0, 0, len)).expect("row");
        for (i, row) in MIXED.iter().enumerate() {
            let alone = hidden(&fast, &[row]);
            let len = alone.dims()[1];
            let reference = hidden(&candle, &[row]);
            let diffs = [
                ("alone, vs candle alone", max_diff(&reference, &alone)),
                ("in the batch, vs candle in the batch", max_diff(&kept(&want, i, len), &kept(&got, i, len))),
                ("in the batch, vs alone", max_diff(&kept(&alone, 0, len), &kept(&got, i, len))),
            ];
            for (what, d) in diffs {
                eprintln!("row {i} ({len} tokens) {what}: max abs diff {d:.3e}");
                assert!(d < TOL, "row {i} {what}: max abs diff {d:e}");
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 2 * MIXED.len());
    // The embeddings of the reference texts, through the fast encoder.
    let r = reference();
    let rows: Vec<&str> = r.texts.iter().map(String::as_str).collect();
    let out = engine_with(r#"implementation = "fast", threads = 1"#)
        .run("embed", Values::from([("text".to_string(), text(&rows))]))
        .expect("embed");
    let got: Vec<Vec<f32>> = tensor_of(&out, "embedding").to_vec2().expect("f32[B,384]");
    for (i, g) in got.iter().enumerate() {
        let d = max_abs_diff(g, &r.embeddings[i]);
        assert!(d < TOL, "reference row {i}: max abs diff {d:e}");
    }
}

#[test]
fn encoder_implementation_and_threads_are_checked() {
    for (extra, want) in [
        (r#"implementation = "onnx""#, "unknown implementation `onnx`; expected \"fast\" or \"candle\""),
        (r#"implementation = "fast", dtype = "f16""#, "the fast implementation computes in f32 only"),
        ("threads = 0", "`threads` must be at least 1"),
        (r#"implementation = "candle", threads = 2"#, "`threads` applies to the fast implementation"),
    ] {
        let err = minilm_with(extra).map(|_| ()).expect_err(extra);
        assert!(err.starts_with("minilm.toml:") && err.contains(want), "{extra}: {err}");
    }
}

#[test]
fn the_encoder_in_f16_and_bf16_matches_f32_padded_rows_included() {
    let r = reference();
    // Two rows of different lengths in one batch: the shorter is padded, so the attention mask
    // is exercised (a mask built from -inf would make every value NaN).
    let rows: Vec<&str> = r.texts.iter().map(String::as_str).collect();
    let lens: Vec<usize> = r.token_ids.iter().map(Vec::len).collect();
    assert_ne!(lens[0], lens[1], "the reference texts have different lengths");
    for (dtype, tol) in [("f16", 5e-3), ("bf16", 3e-2)] {
        let e = engine_in(dtype);
        let out = e.run("embed", Values::from([("text".to_string(), text(&rows))])).expect("embed runs");
        let got: Vec<Vec<f32>> = tensor_of(&out, "embedding").to_vec2().expect("f32[B,384]");
        for (i, g) in got.iter().enumerate() {
            assert!(g.iter().all(|x| x.is_finite()), "{dtype} row {i} has non-finite values");
            let cos = dot(g, &r.embeddings[i]) / (norm(g) * norm(&r.embeddings[i]));
            let d = max_abs_diff(g, &r.embeddings[i]);
            eprintln!("{dtype} row {i}: cosine to reference {cos:.6}, max abs diff {d:.3e}");
            assert!(d < tol, "{dtype} row {i}: max abs diff {d:e} >= {tol:e}");
            assert!(cos > 0.999, "{dtype} row {i}: cosine {cos}");
        }
    }
}

#[test]
fn an_unknown_encoder_dtype_is_named() {
    require_model();
    let registry = Registry::builtin();
    let path = root().join("examples/pipelines/minilm.toml");
    let text = std::fs::read_to_string(&path)
        .expect("minilm.toml")
        .replace(r#"config.json" }"#, r#"config.json", dtype = "f8" }"#);
    let dir = path.parent().expect("examples/pipelines");
    let err = maas_engine::load_sources(vec![SourceFile::new("minilm.toml", text, dir)], &registry)
        .map(|_| ())
        .expect_err("refused")
        .to_string();
    // Located at the key in the file, and naming the choices.
    assert!(err.starts_with("minilm.toml:") && err.contains("unknown dtype `f8`; expected"), "{err}");
}
