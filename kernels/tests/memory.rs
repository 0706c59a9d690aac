//! `Kind::memory_estimate`: what loading one replica takes, from params and file headers, for
//! every built-in kind, without overflow on absurd shapes; the default for kinds of one's own;
//! and the seeded init refusing a buffer it cannot have instead of aborting.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use maas_graphs::{KindError, Signature, SubmodelName, SubmodelSpec, ty};
use maas_kernels::{Kernel, KernelError, Kind, Registry};

mod common;

/// A submodel of `kind` with params written as an inline table's inside (`in = 4, out = 2`).
fn spec(kind: &str, params: &str) -> SubmodelSpec {
    let mut s = SubmodelSpec::new(SubmodelName::new("sm").unwrap(), kind);
    let doc = format!("p = {{ {params} }}").parse::<toml::Table>().unwrap();
    s.params = doc["p"].as_table().unwrap().clone();
    s
}

fn estimate(s: &SubmodelSpec) -> u64 {
    Registry::builtin().memory_estimate(s).unwrap_or_else(|e| panic!("estimate of `{}` failed: {e}", s.kind))
}

fn size(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().len()
}

#[test]
fn linear_counts_its_weight_its_copy_and_its_file() {
    // 64 x 10 f32 (2560 bytes) and a bias of 40, loaded then transposed into a copy.
    assert_eq!(estimate(&spec("linear", "in = 64, out = 10, seed = 1")), 2 * (2560 + 40));
    // q8_0 keeps 34 bytes per 32 values: 640 values -> 680 bytes instead of the f32 copy.
    assert_eq!(estimate(&spec("linear", "in = 64, out = 10, quantize = \"q8_0\"")), 2560 + 40 + 680 + 40);
    // q4k: 144 bytes per 256 values.
    assert_eq!(estimate(&spec("linear", "in = 256, out = 4, quantize = \"q4k\"")), 4096 + 16 + 4 * 144 + 16);

    let dir = common::temp_dir("memory", "linear-file");
    let path = dir.join("w.safetensors");
    let w = Tensor::zeros((10, 64), DType::F32, &Device::Cpu).unwrap();
    candle_core::safetensors::save(&HashMap::from([("weight", w)]), &path).unwrap();
    let mut s = spec("linear", "");
    s.weights = Some(path.clone());
    assert_eq!(estimate(&s), size(&path) + 2 * 2560 + 2 * 40);
}

#[test]
fn huge_shapes_saturate_instead_of_wrapping_to_a_small_number() {
    // The issue's layer: 64 x 4e9 f32 is 1.024e12 bytes, twice while loading.
    let big = estimate(&spec("linear", "in = 64, out = 4000000000, seed = 1"));
    assert!(big >= 2 * 1_024_000_000_000, "{big}");
    // 2^40 x 2^40 x 4 bytes overflows u64: the estimate is the largest number, not a wrapped one.
    let side = 1u64 << 40;
    assert_eq!(estimate(&spec("linear", &format!("in = {side}, out = {side}"))), u64::MAX);
    assert_eq!(estimate(&spec("mlp", &format!("layers = [{side}, {side}, 2]"))), u64::MAX);
    assert_eq!(estimate(&spec("linear", &format!("in = {side}, out = {side}, quantize = \"q8_0\""))), u64::MAX);
}

#[test]
fn mlp_and_digits_cnn_count_every_layer() {
    // Layers 4 -> 3 -> 2: weights 48 and 24 bytes (each with its transposed copy), biases 12 and 8.
    assert_eq!(estimate(&spec("mlp", "layers = [4, 3, 2]")), 2 * 48 + 12 + 2 * 24 + 8);
    let params: u64 = (16 * 9 + 16 + 32 * 16 * 9 + 32 + 8 * 512 + 8) * 4;
    assert_eq!(estimate(&spec("digits_cnn", "features = 8")), 2 * params);
}

#[test]
fn bert_counts_its_file_and_every_tensor_as_f32_twice_for_the_fast_encoder() {
    let dir = common::temp_dir("memory", "bert");
    std::fs::write(
        dir.join("config.json"),
        r#"{"vocab_size": 8, "hidden_size": 4, "num_hidden_layers": 1, "num_attention_heads": 1,
            "intermediate_size": 8, "hidden_act": "gelu", "hidden_dropout_prob": 0.0,
            "max_position_embeddings": 16, "type_vocab_size": 2, "initializer_range": 0.02,
            "layer_norm_eps": 1e-12, "pad_token_id": 0, "model_type": "bert"}"#,
    )
    .unwrap();
    let path = dir.join("model.safetensors");
    // Stored as f16 (64 bytes), held as f32 (128 bytes).
    let emb = Tensor::zeros((8, 4), DType::F16, &Device::Cpu).unwrap();
    candle_core::safetensors::save(&HashMap::from([("embeddings.word_embeddings.weight", emb)]), &path).unwrap();
    let mut s = spec("bert", "config = \"config.json\"");
    s.base_dir = dir.to_path_buf();
    s.weights = Some(path.clone());
    // The fast encoder (the default on CPU in f32) holds copies while it builds itself.
    assert_eq!(estimate(&s), size(&path) + 2 * 8 * 4 * 4);
    let mut candle = spec("bert", "config = \"config.json\", implementation = \"candle\"");
    candle.base_dir = dir.to_path_buf();
    candle.weights = Some(path.clone());
    assert_eq!(estimate(&candle), size(&path) + 8 * 4 * 4);
}

#[test]
fn tokenizer_counts_its_decoded_file_and_stateless_kinds_hold_nothing() {
    let dir = common::temp_dir("memory", "tokenizer");
    let path = dir.join("tokenizer.json");
    std::fs::write(&path, "{}").unwrap();
    let s = spec("tokenizer", &format!("path = {:?}", path.display().to_string()));
    assert_eq!(estimate(&s), 2 * 17);
    for kind in ["argmax", "concat", "cosine", "identity", "l2_normalize", "mean_pool", "softmax"] {
        assert_eq!(estimate(&spec(kind, "")), 0, "{kind}");
    }
    assert_eq!(estimate(&spec("topk", "k = 3")), 0);
}

#[test]
fn an_estimate_of_bad_settings_is_an_error_naming_the_key() {
    match Registry::builtin().memory_estimate(&spec("linear", "in = 4")) {
        Err(KernelError::Param { key, .. }) => assert_eq!(key, "params"),
        other => panic!("expected a Param error, got {other:?}"),
    }
    assert!(Registry::builtin().memory_estimate(&spec("no_such_kind", "")).is_err());
}

/// A kind of one's own that does not say how much memory it takes.
struct Own;

impl Kind for Own {
    fn name(&self) -> &str {
        "own"
    }

    fn signature(&self, _: &SubmodelSpec) -> Result<Signature, Vec<KindError>> {
        Ok(Signature { inputs: vec![maas_graphs::PortSpec::new("x", ty("any"))], outputs: vec![] })
    }

    fn load(&self, _: &SubmodelSpec, _: &Device) -> maas_kernels::Result<Arc<dyn Kernel>> {
        unreachable!("not loaded here")
    }
}

#[test]
fn a_kind_of_ones_own_defaults_to_the_size_of_its_files() {
    let dir = common::temp_dir("memory", "own");
    let (weights, vocab) = (dir.join("w.bin"), dir.join("vocab.json"));
    std::fs::write(&weights, vec![0u8; 1000]).unwrap();
    std::fs::write(&vocab, vec![b' '; 24]).unwrap();
    let mut registry = Registry::builtin();
    registry.register(Own);
    let mut s = spec("own", "");
    assert_eq!(registry.memory_estimate(&s).unwrap(), 0, "no files, nothing");
    s.weights = Some(weights);
    s.params = spec("own", &format!("path = {:?}", vocab.display().to_string())).params;
    assert_eq!(registry.memory_estimate(&s).unwrap(), 1024);
}

#[test]
fn a_seeded_init_too_large_to_allocate_is_an_error_not_an_abort() {
    // 2^62 f32 values (2^64 bytes) cannot be reserved anywhere: the init says so instead of
    // aborting (no real allocation is attempted, whatever the machine's overcommit policy).
    let shape = [1usize << 31, 1 << 31];
    match maas_kernels::weights::seeded_uniform(&shape, 1.0, 0, &Device::Cpu) {
        Err(KernelError::Allocation { op, bytes }) => {
            assert_eq!(op, "seeded init");
            assert_eq!(bytes, u64::MAX, "2^64 bytes, saturated");
        }
        other => panic!("expected an allocation error, got {:?}", other.map(|t| t.dims().to_vec())),
    }
    // A shape whose element count overflows usize is refused the same way.
    let err = maas_kernels::weights::seeded_uniform(&[usize::MAX, 2], 1.0, 0, &Device::Cpu).unwrap_err();
    assert!(err.to_string().contains("cannot allocate"), "{err}");
}
