//! Kernel benchmarks (criterion, `harness = false`).
//!
//! - `minilm_bare`: the baseline, all-MiniLM-L6-v2 embeddings with no maas code: `tokenizers`
//!   (pad to longest, truncate at 256), candle-transformers' `BertModel` (weights loaded with
//!   `candle_core::safetensors::load` + `VarBuilder::from_tensors`), masked mean pooling and L2
//!   normalisation inline with candle ops.
//! - `minilm_maas`: the same work through `Sequential::run("embed", ...)`, so the overhead of
//!   the kernel and engine layers shows next to the baseline.
//! - `bert_encoder`: the `bert` kind alone on a batch of 32 tokenized sentences, each
//!   implementation in the same run: `candle` (candle-transformers' `BertModel`, the previous
//!   implementation and the baseline), `fast` (the default on CPU; candle's global pool) and
//!   `fast_threads_N` (its own pool of N threads).
//! - `linear_head`: the `Linear` kernel, f32 vs q8_0 vs q4k.
//!
//! Before timing, both paths' embeddings are checked against
//! `tests/data/minilm-reference.json`; `minilm_bare/tokenize_only` times tokenizing alone.
//!
//! The MiniLM groups need `scripts/fetch-models`; without the model they are skipped.

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use criterion::{BenchmarkId, Criterion, Throughput};
use maas_engine::Sequential;
use maas_kernels::{Linear, Quantize, Registry, Value, Values};

/// 32 varied sentences of roughly 10-15 words.
const SENTENCES: [&str; 32] = [
    "The quick brown fox jumps over the lazy dog near the quiet river bank.",
    "Researchers published a new study on the migration patterns of arctic terns.",
    "She forgot her umbrella at the cafe and had to walk home in the rain.",
    "Interest rates are expected to remain unchanged until the end of the year.",
    "The orchestra rehearsed the second movement three times before the evening concert.",
    "A small startup in Lisbon is building batteries from recycled phone parts.",
    "Please remember to water the tomatoes every morning while I am away.",
    "The museum's new exhibition explores the history of maps and navigation.",
    "Our flight was delayed by four hours because of a storm over Chicago.",
    "He learned to bake sourdough bread during the long winter of last year.",
    "The committee will review all applications and announce the results next Friday.",
    "Volcanic ash from the eruption grounded flights across northern Europe for days.",
    "My grandmother still writes letters by hand and sends them every single week.",
    "The software update fixed the crash but introduced a strange new memory leak.",
    "Children at the local school planted two hundred trees along the main road.",
    "Scientists detected faint radio signals from a galaxy billions of light years away.",
    "The restaurant on the corner serves the best noodle soup in the whole city.",
    "After the match, the tired players thanked their fans for the loud support.",
    "Regular exercise and enough sleep can greatly improve your mood and concentration.",
    "The old lighthouse was converted into a small hotel with just four rooms.",
    "Engineers are testing a bridge design that can withstand very strong earthquakes.",
    "I could not find my keys until I checked the pocket of my jacket.",
    "The novel follows three sisters who inherit a crumbling vineyard in southern France.",
    "Heavy snowfall closed the mountain pass and stranded dozens of trucks overnight.",
    "The city council approved a plan to add more bike lanes downtown.",
    "A rare comet will be visible to the naked eye early next month.",
    "The bakery sold out of croissants within an hour of opening this morning.",
    "Students debated whether artificial intelligence will change the job market much.",
    "The hikers followed the river upstream until they reached a hidden waterfall.",
    "Her podcast about forgotten inventors has gained a large following this year.",
    "The farmers market moves indoors during the winter months because of the cold.",
    "Doctors recommend drinking plenty of water when the weather is this hot outside.",
];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The baseline: `tokenizers` + candle-transformers' `BertModel` + masked mean pooling and L2
/// normalisation inline. No maas code.
struct Bare {
    tokenizer: tokenizers::Tokenizer,
    bert: BertModel,
}

impl Bare {
    fn load(dir: &Path) -> Self {
        let mut tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).expect("tokenizer.json");
        let mut padding = tokenizer.get_padding().cloned().unwrap_or_default();
        padding.strategy = tokenizers::PaddingStrategy::BatchLongest;
        tokenizer.with_padding(Some(padding));
        tokenizer
            .with_truncation(Some(tokenizers::TruncationParams { max_length: 256, ..Default::default() }))
            .expect("truncation");
        let config: Config =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).expect("config.json"))
                .expect("config");
        let tensors = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).expect("weights");
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
        Self { tokenizer, bert: BertModel::load(vb, &config).expect("BertModel") }
    }

    fn tokenize(&self, text: &Values) -> (Tensor, Tensor, Tensor) {
        let rows: Vec<&str> = text["text"].as_text().expect("text").iter().map(String::as_str).collect();
        let enc = self.tokenizer.encode_batch(rows, true).expect("tokenize");
        let (b, s) = (enc.len(), enc[0].len());
        let t = |f: fn(&tokenizers::Encoding) -> &[u32]| {
            let flat: Vec<u32> = enc.iter().flat_map(|e| f(e).iter().copied()).collect();
            Tensor::from_vec(flat, (b, s), &Device::Cpu).expect("tensor")
        };
        (t(|e| e.get_ids()), t(|e| e.get_attention_mask()), t(|e| e.get_type_ids()))
    }

    /// Text -> L2-normalised embeddings [B,H].
    fn embed(&self, text: &Values) -> candle_core::Result<Tensor> {
        let (ids, mask, types) = self.tokenize(text);
        let hidden = self.bert.forward(&ids, &types, Some(&mask))?;
        let m = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
        let summed = hidden.broadcast_mul(&m)?.sum(1)?;
        let counts = m.sum(1)?.clamp(1e-9f32, f32::MAX)?;
        let pooled = summed.broadcast_div(&counts)?;
        let norms = pooled.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12f32, f32::MAX)?;
        pooled.broadcast_div(&norms)
    }
}

/// The reference texts and embeddings.
fn reference() -> (Vec<String>, Vec<Vec<f32>>) {
    let text = std::fs::read_to_string(root().join("tests/data/minilm-reference.json")).expect("reference file");
    let v: serde_json::Value = serde_json::from_str(&text).expect("reference JSON");
    (
        serde_json::from_value(v["texts"].clone()).expect("texts"),
        serde_json::from_value(v["embeddings"].clone()).expect("embeddings"),
    )
}

fn max_abs_diff(a: &Tensor, b: &[Vec<f32>]) -> f32 {
    let a: Vec<Vec<f32>> = a.to_vec2().expect("f32[B,H]");
    a.iter().zip(b).flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs())).fold(0.0, f32::max)
}

fn batch(n: usize) -> Values {
    Values::from([("text".to_string(), Value::text(SENTENCES.iter().cycle().take(n).copied()))])
}

fn configure<'a>(c: &'a mut Criterion, name: &str) -> criterion::BenchmarkGroup<'a, criterion::measurement::WallTime> {
    let mut g = c.benchmark_group(name);
    g.sample_size(10).measurement_time(Duration::from_secs(5)).warm_up_time(Duration::from_secs(1));
    g
}

fn minilm(c: &mut Criterion) {
    let dir = root().join("models/all-MiniLM-L6-v2");
    if !["config.json", "tokenizer.json", "model.safetensors"].iter().all(|f| dir.join(f).is_file()) {
        eprintln!("skipping minilm_bare and minilm_maas: {} is missing; run `scripts/fetch-models`", dir.display());
        return;
    }
    let registry = Registry::builtin();
    let checked = maas_engine::load_files(&[root().join("examples/pipelines/minilm.toml")], &registry)
        .unwrap_or_else(|d| panic!("minilm.toml does not check:\n{d}"));
    let engine = Sequential::new(&checked.graph, &registry).expect("minilm.toml loads");
    let bare = Bare::load(&dir);

    // Both paths must compute the reference embeddings before their speed means anything.
    let (texts, want) = reference();
    let input = Values::from([("text".to_string(), Value::text(texts.iter().cloned()))]);
    let d_bare = max_abs_diff(&bare.embed(&input).expect("bare embed"), &want);
    let got = engine.run("embed", input).expect("maas embed");
    let d_maas = max_abs_diff(got["embedding"].as_tensor().expect("tensor"), &want);
    eprintln!("reference check: max abs diff bare {d_bare:.2e}, maas {d_maas:.2e}");
    assert!(d_bare < 1e-5 && d_maas < 1e-5, "embeddings do not match the reference");

    let sizes = [1usize, 32];
    let mut g = configure(c, "minilm_bare");
    for n in sizes {
        let input = batch(n);
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::new("embed", n), &input, |b, input| {
            b.iter(|| black_box(bare.embed(black_box(input)).expect("embed")))
        });
    }
    let input = batch(32);
    g.throughput(Throughput::Elements(32));
    g.bench_with_input(BenchmarkId::new("tokenize_only", 32), &input, |b, input| {
        b.iter(|| black_box(bare.tokenize(black_box(input))))
    });
    g.finish();

    let mut g = configure(c, "minilm_maas");
    for n in sizes {
        let input = batch(n);
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::new("embed", n), &input, |b, input| {
            // `run` takes its inputs by value; the clone only bumps reference counts.
            b.iter(|| black_box(engine.run("embed", black_box(input.clone())).expect("embed")))
        });
    }
    g.finish();
}

/// minilm.toml with `extra` added to the encoder's params, loaded.
fn minilm_with(extra: &str, registry: &Registry) -> Sequential {
    let path = root().join("examples/pipelines/minilm.toml");
    let config = r#"params = { config = "../../models/all-MiniLM-L6-v2/config.json" }"#;
    let text = std::fs::read_to_string(&path).expect("minilm.toml");
    assert!(text.contains(config), "minilm.toml's encoder params changed");
    let text = text.replace(config, &config.replace(" }", &format!(", {extra} }}")));
    let dir = path.parent().expect("examples/pipelines");
    let checked = maas_engine::load_sources(vec![maas_graphs::SourceFile::new("minilm.toml", text, dir)], registry)
        .unwrap_or_else(|d| panic!("minilm.toml with {extra}:\n{d}"));
    Sequential::new(&checked.graph, registry).expect("loads")
}

fn bert_encoder(c: &mut Criterion) {
    if !root().join("models/all-MiniLM-L6-v2/model.safetensors").is_file() {
        eprintln!("skipping bert_encoder: run `scripts/fetch-models`");
        return;
    }
    let registry = Registry::builtin();
    let variants = [
        ("candle", r#"implementation = "candle""#),
        ("fast", r#"implementation = "fast""#),
        ("fast_threads_1", r#"implementation = "fast", threads = 1"#),
        ("fast_threads_2", r#"implementation = "fast", threads = 2"#),
    ];
    let engines: Vec<(&str, Sequential)> =
        variants.iter().map(|(n, extra)| (*n, minilm_with(extra, &registry))).collect();
    let ids = engines[0].1.submodel("tokenizer").expect("tokenizer").forward(&batch(32)).expect("tokenize");
    let hidden = |e: &Sequential| -> Tensor {
        let out = e.submodel("encoder").expect("encoder").forward(&ids).expect("encode");
        out["hidden"].as_tensor().expect("tensor").clone()
    };
    // Every variant computes the same hidden states (real tokens; padding is masked downstream).
    let want = hidden(&engines[0].1);
    for (name, e) in &engines[1..] {
        let got = hidden(e);
        let d = (&want - &got).and_then(|t| t.abs()).and_then(|t| t.flatten_all()).and_then(|t| t.max(0));
        let d: f32 = d.and_then(|t| t.to_scalar()).expect("diff");
        eprintln!("bert_encoder: {name} vs candle: max abs diff {d:.2e} (padding included)");
        assert!(d < 1e-3, "{name} differs from candle by {d}");
    }
    let mut g = configure(c, "bert_encoder");
    g.throughput(Throughput::Elements(32));
    for (name, e) in &engines {
        let enc = e.submodel("encoder").expect("encoder");
        g.bench_function(BenchmarkId::new(*name, 32), |b| {
            b.iter(|| black_box(enc.forward(black_box(&ids)).expect("encode")))
        });
    }
    g.finish();
}

/// A bench label and the quantization it measures.
type Variant = (&'static str, Quantize);

fn linear_head(c: &mut Criterion) {
    let dev = Device::Cpu;
    let rows = 32;
    let mut g = configure(c, "linear_head");
    g.throughput(Throughput::Elements(rows as u64));
    let cases: [(usize, usize, &[Variant]); 2] = [
        (1536, 1536, &[("f32", Quantize::None), ("q8_0", Quantize::Q8_0), ("q4k", Quantize::Q4K)]),
        // 384 is a multiple of 32 but not of 256: no q4k.
        (384, 10, &[("f32", Quantize::None), ("q8_0", Quantize::Q8_0)]),
    ];
    for (n_in, n_out, quants) in cases {
        let bound = 1.0 / (n_in as f32).sqrt();
        let w = maas_kernels::weights::seeded_uniform(&[n_out, n_in], bound, 1, &dev).expect("weights");
        let b = maas_kernels::weights::seeded_uniform(&[n_out], bound, 2, &dev).expect("bias");
        let x = maas_kernels::weights::seeded_uniform(&[rows, n_in], 1.0, 3, &dev).expect("input");
        for &(name, q) in quants {
            let layer = Linear::new(w.clone(), Some(b.clone()), q).expect("linear");
            g.bench_function(BenchmarkId::new(format!("{n_in}x{n_out}_{name}"), rows), |bench| {
                bench.iter(|| black_box(layer.forward(black_box(&x)).expect("forward")))
            });
        }
    }
    g.finish();
}

// `criterion_group!` would generate an undocumented `pub fn`; this is what it expands to.
fn main() {
    let mut c = Criterion::default().configure_from_args();
    minilm(&mut c);
    bert_encoder(&mut c);
    linear_head(&mut c);
    c.final_summary();
}
