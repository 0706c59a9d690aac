//! Integration tests of weight files and the registry: `weights::read_header` and
//! `Weights::load` on valid, missing, truncated, garbage and hand-crafted inconsistent
//! safetensors files; `Weights::get` lookups; and the registry's typed errors for broken
//! `bert` and `tokenizer` settings, unknown kinds, and a custom kind registered at run time.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use maas_graphs::{Catalog, KindError, PortSpec, Signature, SignatureError, SubmodelName, SubmodelSpec, ty};
use maas_kernels::weights::{TensorInfo, Weights, read_header};
use maas_kernels::{Kernel, KernelError, Kind, Registry, Value, Values};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

mod common;
use common::TempDir;

fn temp_dir(tag: &str) -> TempDir {
    common::temp_dir("weights", tag)
}

/// Writes a small valid file: `w` f32 [2,3] = 0..6 and `b` f32 [2] = [10, 20].
fn write_valid(dir: &Path) -> PathBuf {
    let dev = Device::Cpu;
    let w = Tensor::arange(0f32, 6.0, &dev).unwrap().reshape((2, 3)).unwrap();
    let b = Tensor::new(&[10f32, 20.0], &dev).unwrap();
    let map = HashMap::from([("w".to_string(), w), ("b".to_string(), b)]);
    let path = dir.join("valid.safetensors");
    candle_core::safetensors::save(&map, &path).unwrap();
    path
}

/// A safetensors file by hand: the 8-byte little-endian header length, the header, the data.
fn craft(dir: &Path, name: &str, header: &str, data: &[u8]) -> PathBuf {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(data);
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// Runs `f`, failing the test with `what` if it panics.
fn no_panic<T>(what: &str, f: impl FnOnce() -> T) -> T {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(v) => v,
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            panic!("{what} panicked: {msg}")
        }
    }
}

/// `read_header` and `Weights::load` must both reject `path` as corrupt; returns both reasons.
fn both_corrupt(path: &Path) -> (String, String) {
    let header = no_panic("read_header", || read_header(path));
    let r1 = match header {
        Err(KernelError::Corrupt { path: p, reason }) => {
            assert_eq!(p, path);
            reason
        }
        other => panic!("read_header: expected Corrupt, got {other:?}"),
    };
    let load = no_panic("Weights::load", || Weights::load(path, &Device::Cpu));
    let r2 = match load {
        Err(KernelError::Corrupt { path: p, reason }) => {
            assert_eq!(p, path);
            reason
        }
        Err(other) => panic!("Weights::load: expected Corrupt, got {other:?}"),
        Ok(_) => panic!("Weights::load accepted a corrupt file"),
    };
    (r1, r2)
}

fn spec(kind: &str, params: &str) -> SubmodelSpec {
    let mut s = SubmodelSpec::new(SubmodelName::new("sm").unwrap(), kind);
    s.params = params.parse::<toml::Table>().unwrap();
    s
}

fn invalid(s: &SubmodelSpec) -> Vec<KindError> {
    match Registry::builtin().signature(s) {
        Err(SignatureError::Invalid(errs)) => {
            assert!(!errs.is_empty());
            errs
        }
        other => panic!("expected SignatureError::Invalid for `{}`, got {other:?}", s.kind),
    }
}

fn load_err(s: &SubmodelSpec) -> KernelError {
    match no_panic("Registry::load", || Registry::builtin().load(s)) {
        Ok(l) => panic!("loading `{}` should fail, got {l:?}", s.kind),
        Err(e) => e,
    }
}

// ---------------------------------------------------------------------------------------------
// read_header / Weights::load
// ---------------------------------------------------------------------------------------------

#[test]
fn valid_file_header_and_load() {
    let dir = temp_dir("valid");
    let path = write_valid(&dir);
    let header = read_header(&path).unwrap();
    assert_eq!(header.len(), 2);
    assert_eq!(header["w"], TensorInfo { dtype: "F32".into(), shape: vec![2, 3] });
    assert_eq!(header["b"], TensorInfo { dtype: "F32".into(), shape: vec![2] });

    let w = Weights::load(&path, &Device::Cpu).unwrap();
    assert_eq!(w.path(), path.as_path());
    let t = w.get("w", &[2, 3]).unwrap();
    assert_eq!(t.to_vec2::<f32>().unwrap(), vec![vec![0.0, 1.0, 2.0], vec![3.0, 4.0, 5.0]]);
    assert_eq!(w.get_any("b").unwrap().to_vec1::<f32>().unwrap(), vec![10.0, 20.0]);
}

#[test]
fn header_metadata_is_skipped() {
    let dir = temp_dir("metadata");
    let header = r#"{"__metadata__":{"format":"pt"},"x":{"dtype":"I64","shape":[2],"data_offsets":[0,16]}}"#;
    let data: Vec<u8> = [7i64, -1].iter().flat_map(|v| v.to_le_bytes()).collect();
    let path = craft(&dir, "meta.safetensors", header, &data);
    let h = read_header(&path).unwrap();
    assert_eq!(h.keys().collect::<Vec<_>>(), ["x"]);
    assert_eq!(h["x"], TensorInfo { dtype: "I64".into(), shape: vec![2] });
    let w = Weights::load(&path, &Device::Cpu).unwrap();
    assert_eq!(w.get("x", &[2]).unwrap().to_vec1::<i64>().unwrap(), vec![7, -1]);
}

#[test]
fn missing_file_is_io() {
    let dir = temp_dir("missing");
    let path = dir.join("nope.safetensors");
    match read_header(&path) {
        Err(KernelError::Io { path: p, source }) => {
            assert_eq!(p, path);
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("expected Io, got {other:?}"),
    }
    match Weights::load(&path, &Device::Cpu) {
        Err(e @ KernelError::Io { .. }) => assert!(e.to_string().contains("nope.safetensors"), "{e}"),
        Err(other) => panic!("expected Io, got {other:?}"),
        Ok(_) => panic!("loaded a missing file"),
    }
}

#[test]
fn truncated_file_is_corrupt_and_says_truncated() {
    let dir = temp_dir("truncated");
    let path = write_valid(&dir);
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 5]).unwrap();
    let (r1, r2) = both_corrupt(&path);
    assert!(r1.contains("truncated"), "{r1}");
    assert!(r2.contains("truncated"), "{r2}");
}

#[test]
fn file_cut_inside_the_header_is_corrupt() {
    let dir = temp_dir("cut-header");
    let path = write_valid(&dir);
    let bytes = std::fs::read(&path).unwrap();
    for keep in [0, 3, 8, 20] {
        std::fs::write(&path, &bytes[..keep]).unwrap();
        both_corrupt(&path);
    }
}

#[test]
fn padded_file_is_corrupt_but_not_called_truncated() {
    let dir = temp_dir("padded");
    let path = write_valid(&dir);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.extend_from_slice(&[0u8; 4]);
    std::fs::write(&path, &bytes).unwrap();
    let (r1, _) = both_corrupt(&path);
    assert!(!r1.contains("truncated"), "{r1}");
}

#[test]
fn garbage_bytes_are_corrupt() {
    let dir = temp_dir("garbage");
    let path = dir.join("garbage.safetensors");
    std::fs::write(&path, b"this is definitely not a safetensors file, just some text").unwrap();
    both_corrupt(&path);
    // A plausible length followed by something that is not JSON.
    let path = craft(&dir, "notjson.safetensors", "{{{{ not json", &[]);
    let (r1, _) = both_corrupt(&path);
    assert!(r1.contains("JSON"), "{r1}");
}

#[test]
fn header_length_beyond_the_file_is_corrupt() {
    let dir = temp_dir("long-header");
    let mut bytes = 1000u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}");
    let path = dir.join("long.safetensors");
    std::fs::write(&path, &bytes).unwrap();
    let (r1, _) = both_corrupt(&path);
    assert!(r1.contains("1000") && r1.contains("10"), "{r1}");
    // A huge length field must not make the reader allocate or overflow.
    let mut bytes = u64::MAX.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}");
    std::fs::write(&path, &bytes).unwrap();
    both_corrupt(&path);
}

#[test]
fn byte_range_not_matching_the_shape_is_corrupt() {
    let dir = temp_dir("range");
    // F32 [2,2] needs 16 bytes, the range holds 12.
    let header = r#"{"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,12]}}"#;
    let path = craft(&dir, "short-range.safetensors", header, &[0u8; 12]);
    let (r1, _) = both_corrupt(&path);
    assert!(r1.contains("`w`") && r1.contains("[2, 2]") && r1.contains("0..12"), "{r1}");
    // An inverted range.
    let header = r#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[8,4]}}"#;
    both_corrupt(&craft(&dir, "inverted.safetensors", header, &[0u8; 8]));
    // An unknown dtype and a malformed entry.
    let header = r#"{"w":{"dtype":"F33","shape":[1],"data_offsets":[0,4]}}"#;
    let (r1, _) = both_corrupt(&craft(&dir, "dtype.safetensors", header, &[0u8; 4]));
    assert!(r1.contains("F33"), "{r1}");
    let header = r#"{"w":{"dtype":"F32","shape":[1]}}"#;
    both_corrupt(&craft(&dir, "malformed.safetensors", header, &[0u8; 4]));
    // Overlapping tensors: the header's ranges and length add up, the layout does not.
    let header = r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#;
    let path = craft(&dir, "overlap.safetensors", header, &[0u8; 4]);
    match no_panic("Weights::load", || Weights::load(&path, &Device::Cpu)) {
        Err(KernelError::Corrupt { .. }) => {}
        Err(other) => panic!("expected Corrupt, got {other:?}"),
        Ok(_) => panic!("loaded overlapping tensors"),
    }
}

#[test]
fn huge_shapes_and_offsets_do_not_overflow() {
    // Hand-crafted headers whose sizes overflow 64-bit arithmetic must be Corrupt, not a panic.
    let dir = temp_dir("overflow");
    let max = u64::MAX;
    let header = format!(r#"{{"w":{{"dtype":"F32","shape":[{max},{max}],"data_offsets":[0,4]}}}}"#);
    both_corrupt(&craft(&dir, "shape.safetensors", &header, &[0u8; 4]));
    // A byte range consistent with its shape but ending at usize::MAX.
    let header = format!(r#"{{"w":{{"dtype":"U8","shape":[{max}],"data_offsets":[0,{max}]}}}}"#);
    both_corrupt(&craft(&dir, "offsets.safetensors", &header, &[0u8; 4]));
}

#[test]
fn get_missing_tensor_and_wrong_shape() {
    let dir = temp_dir("get");
    let path = write_valid(&dir);
    let w = Weights::load(&path, &Device::Cpu).unwrap();
    match w.get("nope", &[2]) {
        Err(KernelError::MissingTensor { path: p, name }) => {
            assert_eq!(p, path);
            assert_eq!(name, "nope");
        }
        other => panic!("expected MissingTensor, got {other:?}"),
    }
    assert!(matches!(w.get_any("nope"), Err(KernelError::MissingTensor { .. })));
    match w.get("w", &[3, 2]) {
        Err(e @ KernelError::TensorShape { .. }) => {
            let text = e.to_string();
            let KernelError::TensorShape { path: p, name, expected, actual } = e else { unreachable!() };
            assert_eq!(p, path);
            assert_eq!(name, "w");
            assert_eq!(expected, vec![3, 2]);
            assert_eq!(actual, vec![2, 3]);
            assert!(text.contains("[2, 3]") && text.contains("[3, 2]"), "{text}");
        }
        other => panic!("expected TensorShape, got {other:?}"),
    }
    // In-memory weights behave the same.
    let mem = Weights::from_tensors(
        "mem",
        HashMap::from([("t".to_string(), Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap())]),
    );
    assert!(mem.get("t", &[4]).is_ok());
    assert!(matches!(mem.get("t", &[2, 2]), Err(KernelError::TensorShape { .. })));
}

#[test]
fn seeded_uniform_is_deterministic_and_bounded() {
    let dev = Device::Cpu;
    let a = maas_kernels::weights::seeded_uniform(&[4, 5], 0.5, 9, &dev).unwrap();
    let b = maas_kernels::weights::seeded_uniform(&[4, 5], 0.5, 9, &dev).unwrap();
    let c = maas_kernels::weights::seeded_uniform(&[4, 5], 0.5, 10, &dev).unwrap();
    let (a, b, c) = (a.to_vec2::<f32>().unwrap(), b.to_vec2::<f32>().unwrap(), c.to_vec2::<f32>().unwrap());
    assert_eq!(a, b);
    assert_ne!(a, c);
    assert!(a.iter().flatten().all(|v| (-0.5..=0.5).contains(v)));
}

// ---------------------------------------------------------------------------------------------
// Registry: bert, tokenizer, unknown kinds
// ---------------------------------------------------------------------------------------------

/// A tiny BERT config (vocab 8, hidden 4, one layer, one head).
const TINY_BERT_CONFIG: &str = r#"{
  "vocab_size": 8, "hidden_size": 4, "num_hidden_layers": 1, "num_attention_heads": 1,
  "intermediate_size": 8, "hidden_act": "gelu", "hidden_dropout_prob": 0.0,
  "max_position_embeddings": 16, "type_vocab_size": 2, "initializer_range": 0.02,
  "layer_norm_eps": 1e-12, "pad_token_id": 0, "classifier_dropout": null, "model_type": "bert"
}"#;

fn bert_spec(dir: &Path, weights: &Path) -> SubmodelSpec {
    let mut s = spec("bert", "config = \"config.json\"");
    s.base_dir = dir.to_path_buf();
    s.weights = Some(weights.to_path_buf());
    s
}

#[test]
fn bert_with_a_corrupt_weights_file_is_a_typed_error() {
    let dir = temp_dir("bert-corrupt");
    std::fs::write(dir.join("config.json"), TINY_BERT_CONFIG).unwrap();
    let weights = dir.join("model.safetensors");
    std::fs::write(&weights, b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": garbage!!}").unwrap();
    let s = bert_spec(&dir, &weights);
    let errs = invalid(&s);
    assert!(errs.iter().any(|e| e.key.as_deref() == Some("weights")), "{errs:?}");
    match load_err(&s) {
        KernelError::Param { key, message } => {
            assert_eq!(key, "weights");
            assert!(message.contains("model.safetensors"), "{message}");
        }
        other => panic!("expected Param at `weights`, got {other:?}"),
    }
}

#[test]
fn bert_with_a_valid_file_lacking_layers_fails_to_load_without_panicking() {
    // The header check finds the word embeddings, so the signature is fine; loading the model
    // then misses every other tensor, which must be an error, not a panic.
    let dir = temp_dir("bert-partial");
    std::fs::write(dir.join("config.json"), TINY_BERT_CONFIG).unwrap();
    let weights = dir.join("model.safetensors");
    let emb = Tensor::zeros((8, 4), DType::F32, &Device::Cpu).unwrap();
    candle_core::safetensors::save(&HashMap::from([("embeddings.word_embeddings.weight", emb)]), &weights).unwrap();
    let s = bert_spec(&dir, &weights);
    let sig = Registry::builtin().signature(&s).unwrap();
    assert_eq!(sig.output("hidden").unwrap().ty, ty("f32[B,S,4]"));
    assert!(sig.input("token_type_ids").unwrap().optional);
    let e = load_err(&s);
    assert!(matches!(e, KernelError::Corrupt { .. } | KernelError::MissingTensor { .. }), "{e:?}");

    // Embeddings that disagree with the config.
    let emb = Tensor::zeros((9, 4), DType::F32, &Device::Cpu).unwrap();
    candle_core::safetensors::save(&HashMap::from([("embeddings.word_embeddings.weight", emb)]), &weights).unwrap();
    let errs = invalid(&s);
    assert!(errs.iter().any(|e| e.key.as_deref() == Some("weights") && e.message.contains("[9, 4]")), "{errs:?}");
}

#[test]
fn bert_config_missing_or_invalid_is_a_typed_error() {
    let dir = temp_dir("bert-config");
    let weights = dir.join("model.safetensors");
    let emb = Tensor::zeros((8, 4), DType::F32, &Device::Cpu).unwrap();
    candle_core::safetensors::save(&HashMap::from([("embeddings.word_embeddings.weight", emb)]), &weights).unwrap();
    let s = bert_spec(&dir, &weights);
    let errs = invalid(&s);
    let e = errs.iter().find(|e| e.key.as_deref() == Some("params.config")).unwrap_or_else(|| panic!("{errs:?}"));
    assert!(e.message.contains("config.json"), "{e:?}");
    assert_eq!(
        match load_err(&s) {
            KernelError::Param { key, .. } => key,
            other => panic!("{other:?}"),
        },
        "params.config"
    );

    std::fs::write(dir.join("config.json"), "{ \"vocab_size\": ").unwrap();
    let errs = invalid(&s);
    assert!(errs.iter().any(|e| e.key.as_deref() == Some("params.config")), "{errs:?}");
    load_err(&s);

    // Without `params.config` at all, and without weights.
    invalid(&spec("bert", ""));
    std::fs::write(dir.join("config.json"), TINY_BERT_CONFIG).unwrap();
    let mut s = spec("bert", "config = \"config.json\"");
    s.base_dir = dir.to_path_buf();
    let errs = invalid(&s);
    assert!(errs.iter().any(|e| e.message.contains("weights")), "{errs:?}");
    assert!(load_err(&s).to_string().contains("weights"));
}

#[test]
fn tokenizer_path_errors() {
    let dir = temp_dir("tokenizer");
    // A path to a file that does not exist.
    let mut s = spec("tokenizer", "path = \"tokenizer.json\"");
    s.base_dir = dir.to_path_buf();
    let errs = invalid(&s);
    let e = errs.iter().find(|e| e.key.as_deref() == Some("params.path")).unwrap_or_else(|| panic!("{errs:?}"));
    assert!(e.message.contains("tokenizer.json"), "{e:?}");
    match load_err(&s) {
        KernelError::Param { key, .. } => assert_eq!(key, "params.path"),
        other => panic!("expected Param, got {other:?}"),
    }
    // No `path` at all: an error about `path` under `params`.
    let errs = invalid(&spec("tokenizer", ""));
    assert!(
        errs.iter().any(|e| e.key.as_deref().is_some_and(|k| k.starts_with("params")) && e.message.contains("path")),
        "{errs:?}"
    );
    // A file that exists but is not a tokenizer: the signature is fine, loading is a typed error.
    std::fs::write(dir.join("tokenizer.json"), "not json").unwrap();
    assert!(Registry::builtin().signature(&s).is_ok());
    assert!(matches!(load_err(&s), KernelError::Tokenizer(_)));
}

#[test]
fn unknown_kind() {
    let r = Registry::builtin();
    let s = spec("no_such_kind", "");
    assert_eq!(r.signature(&s), Err(SignatureError::UnknownKind));
    assert!(r.get("no_such_kind").is_none());
    match load_err(&s) {
        KernelError::Param { key, message } => {
            assert_eq!(key, "kind");
            assert!(message.contains("no_such_kind"), "{message}");
        }
        other => panic!("expected Param at `kind`, got {other:?}"),
    }
    assert_eq!(Registry::empty().signature(&spec("identity", "")), Err(SignatureError::UnknownKind));
}

// ---------------------------------------------------------------------------------------------
// Registry: a custom kind
// ---------------------------------------------------------------------------------------------

/// `scale`: `x` f32[B,N] -> `out` f32[B,N] times `params.factor`. `rows` breaks the contract.
struct Scale {
    name: &'static str,
}

#[derive(serde::Deserialize)]
struct ScaleParams {
    factor: f64,
}

struct ScaleKernel {
    factor: f64,
    mode: &'static str,
}

impl Kind for Scale {
    fn name(&self) -> &str {
        self.name
    }

    fn signature(&self, spec: &SubmodelSpec) -> Result<Signature, Vec<KindError>> {
        maas_kernels::weights::parse_params::<ScaleParams>(&spec.params).map_err(|e| vec![e])?;
        Ok(Signature {
            inputs: vec![PortSpec::new("x", ty("f32[B,N]"))],
            outputs: vec![PortSpec::new("out", ty("f32[B,N]"))],
        })
    }

    fn load(&self, spec: &SubmodelSpec, _device: &Device) -> maas_kernels::Result<Arc<dyn Kernel>> {
        let p = maas_kernels::weights::parse_params::<ScaleParams>(&spec.params)
            .map_err(|e| KernelError::Param { key: e.key.unwrap_or_default(), message: e.message })?;
        Ok(Arc::new(ScaleKernel { factor: p.factor, mode: self.name }))
    }
}

impl Kernel for ScaleKernel {
    fn forward(&self, inputs: &Values) -> maas_kernels::Result<Values> {
        let x = inputs["x"].as_tensor().unwrap();
        let y = x.affine(self.factor, 0.0).map_err(|source| KernelError::Candle { op: "scale", source })?;
        Ok(match self.mode {
            // Drops its output.
            "silent" => Values::new(),
            // Returns one row too many.
            "extra_row" => {
                let y = Tensor::cat(&[&y, &y.narrow(0, 0, 1).unwrap()], 0).unwrap();
                Values::from([("out".to_string(), Value::from(y))])
            }
            _ => Values::from([("out".to_string(), Value::from(y))]),
        })
    }
}

#[test]
fn custom_kind_is_loadable_and_in_the_catalog() {
    let mut r = Registry::builtin();
    assert!(r.register(Scale { name: "scale" }).is_none());
    assert!(r.kinds().contains(&"scale".to_string()));
    let s = spec("scale", "factor = 2.5");
    let sig = r.signature(&s).unwrap();
    assert_eq!(sig.input("x").unwrap().ty, ty("f32[B,N]"));
    assert_eq!(sig.output("out").unwrap().ty, ty("f32[B,N]"));
    let loaded = r.load(&s).unwrap();
    assert_eq!(*loaded.signature, sig);
    let x = Tensor::new(&[[1f32, -2.0]], &Device::Cpu).unwrap();
    let out = loaded.forward(&Values::from([("x".to_string(), Value::from(x))])).unwrap();
    assert_eq!(out["out"].as_tensor().unwrap().to_vec2::<f32>().unwrap(), vec![vec![2.5, -5.0]]);
    // Its inputs are checked like a built-in's.
    let ids = Tensor::new(&[[1u32, 2]], &Device::Cpu).unwrap();
    assert!(matches!(
        loaded.forward(&Values::from([("x".to_string(), Value::from(ids))])),
        Err(KernelError::Input { port, .. }) if port == "x"
    ));
    // Its params are checked through the catalog.
    assert!(matches!(r.signature(&spec("scale", "")), Err(SignatureError::Invalid(_))));
    assert!(matches!(r.load(&spec("scale", "")), Err(KernelError::Param { .. })));

    // Registering under an existing name replaces the kind and returns the old one.
    let old = r.register(Scale { name: "scale" }).expect("replaced");
    assert_eq!(old.name(), "scale");
    // A custom kind may even shadow a built-in.
    let old = r.register(Scale { name: "softmax" }).expect("replaced the built-in");
    assert_eq!(old.name(), "softmax");
    assert!(r.signature(&spec("softmax", "")).is_err(), "now needs `factor`");
    assert!(Registry::builtin().signature(&spec("softmax", "")).is_ok(), "other registries are unaffected");
}

#[test]
fn loaded_checks_the_kernels_outputs() {
    let mut r = Registry::empty();
    r.register(Scale { name: "silent" });
    r.register(Scale { name: "extra_row" });
    let x = || {
        Values::from([("x".to_string(), Value::from(Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &Device::Cpu).unwrap()))])
    };
    let e = r.load(&spec("silent", "factor = 1.0")).unwrap().forward(&x()).unwrap_err();
    assert!(matches!(&e, KernelError::Panicked(m) if m.contains("`out`")), "{e:?}");
    let e = r.load(&spec("extra_row", "factor = 1.0")).unwrap().forward(&x()).unwrap_err();
    assert!(
        matches!(&e, KernelError::Panicked(m) if m.contains("`out`") && m.contains('3') && m.contains('2')),
        "{e:?}"
    );
}
