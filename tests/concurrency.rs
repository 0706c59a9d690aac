//! Many concurrent callers on the real MiniLM `similarity` and `embed` pipelines get the
//! outputs of sequential calls (within 1e-5: batch shape changes float summation order), while
//! the encoder really batches across requests (mean batch > 1).
//!
//! Needs the model: `scripts/fetch-models` (the test command runs it).

use std::path::Path;
use std::sync::Arc;

use maas_engine::{Engine, Sequential};
use maas_kernels::{Registry, Value, Values};

const SENTENCES: &[&str] = &[
    "hello world",
    "The quick brown fox jumps over the lazy dog",
    "a cat sits on the mat",
    "Rust makes systems programming safer without giving up speed",
    "batching rows of different lengths needs padding",
    "the weather is nice today",
    "I would like a cup of coffee, please",
    "machine learning models can be composed of smaller submodels",
];

fn graph() -> std::path::PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    assert!(
        root.join("models/all-MiniLM-L6-v2/model.safetensors").is_file(),
        "the MiniLM model is missing: run scripts/fetch-models"
    );
    root.join("examples/pipelines/minilm.toml")
}

fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_similarity_matches_sequential_and_batches() {
    let graph = graph();
    let registry = Registry::builtin();
    let checked = maas_engine::load_files(&[&graph], &registry).expect("valid");
    let seq = Arc::new(Sequential::new(&checked.graph, &registry).expect("loads"));
    let engine = Engine::from_files(&[&graph]).await.expect("starts");

    // Every (a, b) pair, 32 concurrent callers, each a single-row request.
    let pairs: Vec<(usize, usize)> =
        (0..SENTENCES.len()).flat_map(|a| (0..SENTENCES.len()).map(move |b| (a, b))).take(48).collect();
    let inputs = |a: usize, b: usize| {
        Values::from([("a".to_string(), Value::text([SENTENCES[a]])), ("b".to_string(), Value::text([SENTENCES[b]]))])
    };
    let mut tasks = Vec::new();
    for chunk in pairs.chunks(pairs.len().div_ceil(32)) {
        let (engine, chunk) = (engine.clone(), chunk.to_vec());
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for (a, b) in chunk {
                let r = engine.infer("similarity", inputs(a, b)).await.expect("ok");
                out.push(((a, b), r.outputs["score"].as_tensor().unwrap().clone(), r.versions));
            }
            out
        }));
    }
    let mut worst = 0f32;
    let mut n = 0;
    for t in tasks {
        for ((a, b), score, versions) in t.await.unwrap() {
            let want = seq.run("similarity", inputs(a, b)).expect("sequential");
            worst = worst.max(max_abs_diff(&score, want["score"].as_tensor().unwrap()));
            assert_eq!(versions["encoder"], "v1");
            assert_eq!(versions.len(), 5, "{versions:?}");
            n += 1;
        }
    }
    eprintln!("similarity: {n} concurrent requests, max |engine - sequential| = {worst:e}");
    assert_eq!(n, pairs.len());
    assert!(worst <= 1e-5, "max abs diff {worst}");
    let m = engine.metrics();
    let enc = &m.submodels["encoder"].batch_rows;
    eprintln!("encoder: {} batches, mean {:.2} rows", enc.count, enc.mean());
    assert!(enc.mean() > 1.0, "the encoder never batched across requests: {enc:?}");
    assert_eq!(m.pipelines["similarity"].ok, pairs.len() as u64);
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_embed_of_ragged_rows_matches_sequential() {
    let graph = graph();
    let registry = Registry::builtin();
    let checked = maas_engine::load_files(&[&graph], &registry).expect("valid");
    let seq = Sequential::new(&checked.graph, &registry).expect("loads");
    let engine = Engine::from_files(&[&graph]).await.expect("starts");
    let tasks: Vec<_> = (0..24)
        .map(|i| {
            let engine = engine.clone();
            // Requests of 1-3 rows of different lengths, batched together by the encoder.
            let rows: Vec<&str> = (0..1 + i % 3).map(|k| SENTENCES[(i + k) % SENTENCES.len()]).collect();
            tokio::spawn(async move {
                let inputs = Values::from([("text".to_string(), Value::text(rows.clone()))]);
                (rows, engine.infer("embed", inputs).await.expect("ok"))
            })
        })
        .collect();
    let mut worst = 0f32;
    for t in tasks {
        let (rows, r) = t.await.unwrap();
        let want = seq.run("embed", Values::from([("text".to_string(), Value::text(rows))])).unwrap();
        worst = worst
            .max(max_abs_diff(r.outputs["embedding"].as_tensor().unwrap(), want["embedding"].as_tensor().unwrap()));
    }
    eprintln!("embed: max |engine - sequential| = {worst:e}");
    assert!(worst <= 1e-5, "max abs diff {worst}");
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_split_into_chunks_matches_sequential() {
    // A tokenizer batch of at most 2 rows: a 5-row request becomes 3 chunks whose padded
    // lengths differ; they are joined back padded to the longest, as one batch would be.
    let graph = graph();
    let text = std::fs::read_to_string(&graph).unwrap().replace(
        "params = { path = \"../../models/all-MiniLM-L6-v2/tokenizer.json\", max_length = 256 }",
        "params = { path = \"../../models/all-MiniLM-L6-v2/tokenizer.json\", max_length = 256 }\nbatch = { max_size = 2 }",
    );
    assert!(text.contains("batch = { max_size = 2 }"));
    let src = maas_graphs::SourceFile::new("chunked.toml", text, graph.parent().unwrap());
    let engine = Engine::builder().from_sources(vec![src]).await.expect("starts");
    let registry = Registry::builtin();
    let seq = Sequential::new(&maas_engine::load_files(&[&graph], &registry).unwrap().graph, &registry).unwrap();
    let rows = ["hi", "a much longer sentence than the others here", "ok", "medium length text", "x"];
    let inputs = Values::from([("text".to_string(), Value::text(rows))]);
    let got = engine.infer("embed", inputs.clone()).await.expect("chunked request");
    let want = seq.run("embed", inputs).unwrap();
    let d = max_abs_diff(got.outputs["embedding"].as_tensor().unwrap(), want["embedding"].as_tensor().unwrap());
    assert!(d <= 1e-5, "max abs diff {d}");
    assert!(engine.metrics().submodels["tokenizer"].batch_rows.count >= 3);
    engine.shutdown().await;
}
