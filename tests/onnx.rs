//! The `onnx` kind: ONNX Runtime (its library from the registry wheel, loaded at run time)
//! running an ONNX export of all-MiniLM-L6-v2 inside the engine. Needs `scripts/fetch-models`,
//! `scripts/client-env` and `scripts/fetch-onnx` (which `scripts/test` runs); fails, never
//! skips, without them.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use candle_core::{Device, Tensor};
use maas_engine::{Engine, InferError, SwapRequest};
use maas_graphs::SourceFile;
use maas_kernels::{Value, Values};

/// Largest accepted max abs difference to the reference embeddings.
const TOL: f32 = 1e-5;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn require_files() {
    for f in ["models/onnxruntime/libonnxruntime.so", "models/all-MiniLM-L6-v2-onnx/model.onnx"] {
        assert!(
            root().join(f).is_file(),
            "`{f}` is missing: run scripts/fetch-models, scripts/client-env and scripts/fetch-onnx first"
        );
    }
}

struct Reference {
    texts: Vec<String>,
    embeddings: Vec<Vec<f32>>,
}

fn reference() -> &'static Reference {
    static REF: OnceLock<Reference> = OnceLock::new();
    REF.get_or_init(|| {
        let text = std::fs::read_to_string(root().join("tests/data/minilm-reference.json")).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let texts = v["texts"].as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_string()).collect();
        let embeddings = v["embeddings"]
            .as_array()
            .unwrap()
            .iter()
            .map(|row| row.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect())
            .collect();
        Reference { texts, embeddings }
    })
}

async fn engine() -> Engine {
    require_files();
    Engine::from_files(&[root().join("examples/pipelines/minilm-onnx.toml")]).await.expect("the onnx graph loads")
}

fn text(rows: &[&str]) -> Values {
    Values::from([("text".to_string(), Value::text(rows.iter().copied()))])
}

fn embeddings(r: &maas_engine::Response) -> Vec<Vec<f32>> {
    r.outputs["embedding"].as_tensor().unwrap().to_vec2::<f32>().unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_onnx_encoder_matches_the_reference_alone_batched_and_across_requests() {
    let e = engine().await;
    let r = reference();
    let rows: Vec<&str> = r.texts.iter().map(String::as_str).collect();
    // Each text alone, both in one request (padded to the longer), and both as concurrent
    // requests (batched by the engine across requests, with ragged padding).
    for (i, t) in rows.iter().enumerate() {
        let got = embeddings(&e.infer("embed", text(&[t])).await.expect("embed"));
        let d = max_abs_diff(&got[0], &r.embeddings[i]);
        assert!(d < TOL, "row {i} alone: {d:e}");
    }
    let got = embeddings(&e.infer("embed", text(&rows)).await.expect("embed"));
    for (i, want) in r.embeddings.iter().enumerate() {
        let d = max_abs_diff(&got[i], want);
        assert!(d < TOL, "row {i} in one request: {d:e}");
    }
    let calls: Vec<_> = (0..8)
        .map(|k| {
            let (e, t) = (e.clone(), rows[k % rows.len()].to_string());
            tokio::spawn(async move { (k, e.infer("embed", text(&[&t])).await) })
        })
        .collect();
    for c in calls {
        let (k, got) = c.await.unwrap();
        let d = max_abs_diff(&embeddings(&got.expect("embed"))[0], &r.embeddings[k % rows.len()]);
        assert!(d < TOL, "concurrent request {k}: {d:e}");
    }
    e.shutdown().await;
}

/// A graph around the ONNX encoder alone, for type checks.
fn raw_graph(input_type: &str, model: &str) -> String {
    format!(
        r#"
[submodels.encoder]
kind = "onnx"
weights = "{model}"
params = {{ runtime = "{runtime}", u32_inputs = ["input_ids", "attention_mask", "token_type_ids"], ragged = ["sequence"] }}

[pipelines.raw]
inputs = {{ ids = "{input_type}", mask = "u32[B,S]", types = "u32[B,S]" }}
outputs = {{ hidden = "enc.last_hidden_state" }}
nodes.enc = {{ submodel = "encoder", inputs = {{ input_ids = "$ids", attention_mask = "$mask", token_type_ids = "$types" }} }}
"#,
        runtime = root().join("models/onnxruntime/libonnxruntime.so").display(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_signature_comes_from_the_model_and_wrong_types_are_refused() {
    require_files();
    let model = root().join("models/all-MiniLM-L6-v2-onnx/model.onnx").display().to_string();
    // At check time: an f32 tensor wired into the (u32-widened int64) `input_ids`.
    let bad =
        Engine::builder().from_sources(vec![SourceFile::new("raw.toml", raw_graph("f32[B,S]", &model), ".")]).await;
    let message = format!("{:#}", bad.err().expect("refused at check time"));
    assert!(message.contains("input_ids") && message.contains("u32") && message.contains("f32"), "{message}");
    // The model's own declaration: three u32[B,sequence] inputs, a f32[B,sequence,384] output.
    let e = Engine::builder()
        .from_sources(vec![SourceFile::new("raw.toml", raw_graph("u32[B,S]", &model), ".")])
        .await
        .expect("the model's declared types fit");
    let p = e.pipeline("raw").unwrap();
    assert_eq!(p.outputs[0].1.to_string(), "f32[B,sequence,384]");
    // At request time: a tensor of the wrong dtype for the pipeline's input.
    let wrong = Tensor::zeros((1, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
    let ok = Tensor::new(&[[101u32, 7592, 2088, 102]], &Device::Cpu).unwrap();
    let inputs = Values::from([
        ("ids".to_string(), Value::Tensor(wrong)),
        ("mask".to_string(), Value::Tensor(ok.ones_like().unwrap())),
        ("types".to_string(), Value::Tensor(ok.zeros_like().unwrap())),
    ]);
    match e.infer("raw", inputs).await {
        Err(InferError::InvalidInput(m)) => assert!(m.contains("ids"), "{m}"),
        other => panic!("an f32 id tensor: {other:?}"),
    }
    let inputs = Values::from([
        ("ids".to_string(), Value::Tensor(ok.clone())),
        ("mask".to_string(), Value::Tensor(ok.ones_like().unwrap())),
        ("types".to_string(), Value::Tensor(ok.zeros_like().unwrap())),
    ]);
    let r = e.infer("raw", inputs).await.expect("u32 ids");
    assert_eq!(r.outputs["hidden"].as_tensor().unwrap().dims(), &[1, 4, 384]);
    e.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_or_missing_model_file_is_refused_with_a_clear_error() {
    require_files();
    let dir = std::env::temp_dir().join(format!("maas-onnx-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let corrupt = dir.join("corrupt.onnx");
    std::fs::write(&corrupt, b"this is not an ONNX model").unwrap();
    let start = |model: String| {
        Engine::builder().from_sources(vec![SourceFile::new("raw.toml", raw_graph("u32[B,S]", &model), ".")])
    };
    let message = format!("{:#}", start(corrupt.display().to_string()).await.err().expect("corrupt"));
    assert!(message.contains("corrupt.onnx") && message.contains("is not a model ONNX Runtime can load"), "{message}");
    let missing = dir.join("missing.onnx");
    let message = format!("{:#}", start(missing.display().to_string()).await.err().expect("missing"));
    assert!(message.contains("missing.onnx"), "{message}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_onnx_encoder_is_hot_swapped_under_load_without_losing_a_request() {
    let e = engine().await;
    let r = reference();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load: Vec<_> = (0..4)
        .map(|k| {
            let (e, stop, t) = (e.clone(), stop.clone(), r.texts[k % 2].clone());
            tokio::spawn(async move {
                let mut versions = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let got = e.infer("embed", text(&[&t])).await.expect("no request is lost during the swap");
                    versions.push(got.versions["encoder"].clone());
                }
                versions
            })
        })
        .collect();
    tokio::time::timeout(Duration::from_secs(60), async {
        while e.metrics().pipelines.get("embed").is_none_or(|p| p.ok < 8) {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("requests flow");
    let swapped = e.swap("encoder", SwapRequest { version: Some("v2".into()), ..SwapRequest::default() }).await;
    assert_eq!(swapped.expect("swap").version, "v2");
    let after = e.metrics().pipelines["embed"].ok;
    tokio::time::timeout(Duration::from_secs(60), async {
        while e.metrics().pipelines["embed"].ok < after + 8 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("requests flow after the swap");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut seen = std::collections::BTreeSet::new();
    for l in load {
        seen.extend(l.await.unwrap());
    }
    assert!(seen.contains("v1") && seen.contains("v2"), "{seen:?}");
    assert!(e.metrics().pipelines["embed"].errors.is_empty(), "{:?}", e.metrics().pipelines["embed"].errors);
    e.shutdown().await;
}
