//! Embedding maas in a service of your own, with a kind of your own.
//!
//! The service registers `text_stats` (text -> three numeric features per message), builds an
//! engine from `examples/embedded_service.toml` (stats -> seeded linear head -> softmax), and
//! serves a burst of concurrent "clients" the way a tokio service would. It prints each answer,
//! then the engine's view of its submodels and metrics, and shuts down gracefully.
//!
//! ```sh
//! cargo run --example embedded_service
//! ```

use std::sync::Arc;

use candle_core::{Device, Tensor};
use maas_engine::Engine;
use maas_graphs::{KindError, PortSpec, Signature, SubmodelSpec, ty};
use maas_kernels::{Kernel, Kind, Value, Values};

/// `text` -> `features` f32[B,3]: length in characters / 100, words / 10, and `!` count.
struct TextStats;

impl Kind for TextStats {
    fn name(&self) -> &str {
        "text_stats"
    }

    fn signature(&self, spec: &SubmodelSpec) -> Result<Signature, Vec<KindError>> {
        if let Some(k) = spec.params.keys().next() {
            return Err(vec![KindError::at(format!("params.{k}"), "text_stats takes no params")]);
        }
        Ok(Signature {
            inputs: vec![PortSpec::new("text", ty("text"))],
            outputs: vec![PortSpec::new("features", ty("f32[B,3]"))],
        })
    }

    fn load(&self, _: &SubmodelSpec, device: &Device) -> maas_kernels::Result<Arc<dyn Kernel>> {
        Ok(Arc::new(TextStatsKernel(device.clone())))
    }
}

struct TextStatsKernel(Device);

impl Kernel for TextStatsKernel {
    fn forward(&self, inputs: &Values) -> maas_kernels::Result<Values> {
        let text = inputs["text"].as_text().unwrap_or_default();
        let rows: Vec<f32> = text
            .iter()
            .flat_map(|t| {
                [
                    t.chars().count() as f32 / 100.0,
                    t.split_whitespace().count() as f32 / 10.0,
                    t.matches('!').count() as f32,
                ]
            })
            .collect();
        let features = Tensor::from_vec(rows, (text.len(), 3), &self.0)
            .map_err(|source| maas_kernels::KernelError::Candle { op: "text_stats", source })?;
        Ok(Values::from([("features".to_string(), Value::Tensor(features))]))
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let graph = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/embedded_service.toml");
    let engine = Engine::builder().register(TextStats).from_files(&[graph]).await?;

    let messages = [
        "the build is green",
        "URGENT!!! production is down!",
        "lunch at noon?",
        "please review my pull request when you have a minute",
        "everything is on fire!!!!",
    ];
    // Each message is its own client request; they run concurrently and share batches.
    let clients: Vec<_> = messages
        .iter()
        .map(|m| {
            let engine = engine.clone();
            let m = m.to_string();
            tokio::spawn(async move {
                let inputs = Values::from([("message".to_string(), Value::text([m.clone()]))]);
                (m, engine.infer("triage", inputs).await)
            })
        })
        .collect();
    for c in clients {
        let (message, result) = c.await?;
        let response = result?;
        let probs: Vec<Vec<f32>> = response.outputs["probs"].as_tensor().expect("tensor").to_vec2()?;
        println!("{message:<55} -> probs {:?} (versions {:?})", probs[0], response.versions);
    }
    for s in engine.submodels() {
        println!("submodel {:<6} kind {:<10} state {:<8} inline {}", s.name, s.kind, s.state, s.inline);
    }
    let m = engine.metrics();
    let stats = &m.submodels["stats"];
    println!("text_stats: {} batches, mean {:.1} rows per batch", stats.batch_rows.count, stats.batch_rows.mean());
    println!("triage: {} requests ok", m.pipelines["triage"].ok);
    engine.shutdown().await;
    Ok(())
}
