//! The committed digits model end to end: `examples/pipelines/digits.toml` classifies the
//! held-out part of the fixed split ([`maas::digits::split`]) at >= 97% accuracy, its weight files
//! load through the registry, and a head of the wrong shape is rejected by the graph checker with
//! a diagnostic that names the shape.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use maas_engine::{Sequential, load_files};
use maas_graphs::{Dim, PortType, SubmodelName, SubmodelSpec};
use maas_kernels::{Registry, Value, Values};

mod common;
use common::TempDir;

/// Images per request; the `features` submodel batches at most 64.
const BATCH: usize = 64;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn classify_pipeline_is_accurate_on_the_held_out_split() {
    let registry = Registry::builtin();
    let checked = load_files(&[root().join("examples/pipelines/digits.toml")], &registry).expect("digits.toml checks");
    let engine = Sequential::new(&checked.graph, &registry).expect("digits weights load");

    let all = maas::digits::load(&maas::digits::default_path()).expect("digits data loads");
    let (_, test) = maas::digits::split(&all);
    assert_eq!(test.len(), maas::digits::TEST_ROWS);

    let mut correct = 0usize;
    for start in (0..test.len()).step_by(BATCH) {
        let end = (start + BATCH).min(test.len());
        let n = end - start;
        let pixels = &test.pixels[start * maas::digits::PIXELS..end * maas::digits::PIXELS];
        let x = Tensor::from_slice(pixels, (n, maas::digits::PIXELS), &Device::Cpu).unwrap();
        let out =
            engine.run("classify", Values::from([("pixels".to_string(), Value::Tensor(x))])).expect("classify runs");

        let labels: Vec<u32> = out["label"].as_tensor().expect("label is a tensor").to_vec1().unwrap();
        let probs: Vec<Vec<f32>> = out["probs"].as_tensor().expect("probs is a tensor").to_vec2().unwrap();
        assert_eq!(labels.len(), n);
        assert_eq!(probs.len(), n);
        for (row, (p, &label)) in probs.iter().zip(&labels).enumerate() {
            assert_eq!(p.len(), maas::digits::CLASSES);
            let sum: f32 = p.iter().sum();
            assert!((sum - 1.0).abs() <= 1e-5, "image {}: probs sum to {sum}", start + row);
            let argmax = p.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i as u32).unwrap();
            assert_eq!(argmax, label, "image {}: argmax(probs) != label", start + row);
        }
        correct += labels.iter().zip(&test.labels[start..end]).filter(|(a, b)| a == b).count();
    }
    let accuracy = correct as f64 / test.len() as f64;
    eprintln!("digits classify: held-out accuracy {:.2}% ({correct}/{})", 100.0 * accuracy, test.len());
    assert!(accuracy >= 0.97, "held-out accuracy {accuracy:.4} < 0.97");
}

#[test]
fn weight_files_load_and_a_wrong_shaped_head_is_rejected() {
    let registry = Registry::builtin();
    let assets = root().join("assets/digits");
    let batch_by = |n: usize| PortType::tensor(maas_graphs::DType::F32, [Dim::Sym("B".into()), Dim::Fixed(n)]);

    let mut features = SubmodelSpec::new(SubmodelName::new("features").unwrap(), "digits_cnn");
    features.weights = Some(assets.join("features.safetensors"));
    let features = registry.load(&features).expect("features.safetensors loads as digits_cnn");
    assert_eq!(features.signature.outputs[0].ty, batch_by(64));

    let mut head = SubmodelSpec::new(SubmodelName::new("head").unwrap(), "linear");
    head.weights = Some(assets.join("head.safetensors"));
    let head = registry.load(&head).expect("head.safetensors loads as linear");
    assert_eq!(head.signature.inputs[0].ty, batch_by(64));
    assert_eq!(head.signature.outputs[0].ty, batch_by(10));

    // A head that takes 63 features cannot follow the 64-wide input.
    let tmp = TempDir::new("digits-bad-head");
    let bad = HashMap::from([
        ("weight".to_string(), Tensor::zeros((10, 63), candle_core::DType::F32, &Device::Cpu).unwrap()),
        ("bias".to_string(), Tensor::zeros(10, candle_core::DType::F32, &Device::Cpu).unwrap()),
    ]);
    candle_core::safetensors::save(&bad, tmp.0.join("head.safetensors")).unwrap();
    let graph = tmp.0.join("bad.toml");
    std::fs::write(
        &graph,
        r#"
[submodels.head]
kind = "linear"
weights = "head.safetensors"

[pipelines.classify]
inputs = { pixels = "f32[B,64]" }
outputs = { logits = "head.out" }

[pipelines.classify.nodes]
head = { submodel = "head", inputs = { x = "$pixels" } }
"#,
    )
    .unwrap();
    let diags = match load_files(&[&graph], &registry) {
        Ok(_) => panic!("a [10,63] head behind a 64-wide input must be rejected"),
        Err(d) => d,
    };
    let text = diags.to_string();
    eprintln!("wrong-shape head diagnostics:\n{text}");
    assert!(diags.errors().count() >= 1, "{text}");
    assert!(diags.errors().any(|d| d.message.contains("[B,63]")), "no diagnostic names the shape: {text}");
}
