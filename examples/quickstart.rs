//! maas as a library: load a graph, classify one handwritten digit, read the answer as plain
//! numbers, and ask which version of a submodel serves.
//!
//! Usage: `quickstart [GRAPH]`; GRAPH defaults to `examples/pipelines/digits.toml`, which is
//! relative to the working directory (the maas checkout). The weights a graph names are
//! relative to the graph file itself, so it runs from anywhere once GRAPH is right.

use anyhow::Context;
use candle_core::{Device, Tensor};
use maas::engine::Engine;
use maas::kernels::{Value, Values};

/// An 8x8 image of a handwritten 3, row by row, pixel intensities 0..16.
#[rustfmt::skip]
pub const THREE: [f32; 64] = [
    0., 0., 7., 15., 13., 1., 0., 0.,
    0., 8., 13., 6., 15., 4., 0., 0.,
    0., 2., 1., 13., 13., 0., 0., 0.,
    0., 0., 2., 15., 11., 1., 0., 0.,
    0., 0., 0., 1., 12., 12., 1., 0.,
    0., 0., 0., 0., 1., 10., 8., 0.,
    0., 0., 8., 4., 5., 14., 9., 0.,
    0., 0., 7., 13., 13., 9., 0., 0.,
];

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let graph = std::env::args().nth(1).unwrap_or_else(|| "examples/pipelines/digits.toml".to_string());
    let engine = Engine::from_files(&[&graph]).await.with_context(|| format!("loading {graph}"))?;

    let (label, p) = classify(&engine, &THREE).await?;
    println!("label {label} (p = {p:.3})");

    // `versions` is `None` when the engine serves no submodel of that name.
    let head = engine.versions("head").context("no submodel `head`")?;
    println!("head serves version {} ({} earlier)", head.serving.version, head.previous.len());

    engine.shutdown().await;
    Ok(())
}

/// Runs the `classify` pipeline on one image; answers its label and that label's probability.
pub async fn classify(engine: &Engine, pixels: &[f32; 64]) -> anyhow::Result<(u32, f32)> {
    // Inputs are named values: tensors batch first (here one row of 64), or `Value::text(...)`.
    let x = Tensor::from_slice(pixels, (1, 64), &Device::Cpu)?;
    let inputs = Values::from([("pixels".to_string(), Value::from(x))]);
    let response = engine.infer("classify", inputs).await?;

    // Outputs are candle tensors, batch first: `to_vec1`, `to_vec2` (or `to_scalar`) give plain
    // numbers, in the dtype the pipeline declares (`label` is u32[B], `probs` f32[B,10]).
    let tensor = |name: &str| {
        let value = response.outputs.get(name).and_then(Value::as_tensor);
        value.with_context(|| format!("no tensor output `{name}`"))
    };
    let labels: Vec<u32> = tensor("label")?.to_vec1()?;
    let probs: Vec<Vec<f32>> = tensor("probs")?.to_vec2()?;
    // Which version of each submodel computed this answer: {"features": "v1", "head": "v1", ...}.
    println!("served by {:?}", response.versions);

    let label = labels[0];
    Ok((label, probs[0][label as usize]))
}
