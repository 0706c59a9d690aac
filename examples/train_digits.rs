//! Trains the committed digits model: a [`DigitsCnn`] feature extractor (64 features) and a
//! linear head (64 -> 10), jointly, with candle-nn on the train part of the fixed split
//! [`maas::digits::split`]; prints the loss per epoch and the held-out test accuracy, then writes
//! the two weight files that `examples/pipelines/digits.toml` loads:
//!
//! ```text
//! cargo run --release --example train_digits [-- --out assets/digits --epochs 20 --seed 7]
//! ```
//!
//! `features.safetensors` holds the tensors of `digits_cnn::tensor_shapes(64)`;
//! `head.safetensors` holds `weight` [10,64] and `bias` [10]. Init and batch order are seeded
//! (`--seed`), so a rerun on the same machine gives the same weights.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use candle_core::{D, DType, Device, Module, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use clap::Parser;
use maas::digits::{self, CLASSES, Digits, PIXELS};
use maas_kernels::kinds::digits_cnn::{DigitsCnn, tensor_shapes};
use rand::SeedableRng;
use rand::seq::SliceRandom;

/// Feature size of the committed model.
const FEATURES: usize = 64;
/// VarMap prefix of the feature extractor's variables.
const FEATURES_PREFIX: &str = "features";
/// VarMap prefix of the head's variables.
const HEAD_PREFIX: &str = "head";

#[derive(Parser, Debug)]
#[command(about = "Train the digits CNN + linear head and write their safetensors files")]
struct Args {
    /// Directory the two weight files are written to.
    #[arg(long, default_value = "assets/digits")]
    out: PathBuf,
    /// Passes over the training set.
    #[arg(long, default_value_t = 20)]
    epochs: usize,
    /// Seed of the weight init and of the batch shuffling.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Mini-batch size.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Peak learning rate (AdamW), decayed linearly to a tenth over the epochs.
    #[arg(long, default_value_t = 3e-3)]
    lr: f64,
}

/// The feature extractor and the head, built on one `VarMap` under two prefixes.
struct Model {
    features: DigitsCnn,
    head: candle_nn::Linear,
}

impl Model {
    fn new(vb: &VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            features: DigitsCnn::new(vb.pp(FEATURES_PREFIX), FEATURES)?,
            head: candle_nn::linear(FEATURES, CLASSES, vb.pp(HEAD_PREFIX))?,
        })
    }

    /// Pixels [B,64] -> logits [B,10].
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.head.forward(&self.features.forward(x)?)
    }
}

/// Overwrites every variable with a seeded init (candle's CPU rng cannot be seeded): He-uniform
/// weights for the layers followed by a relu, 1/sqrt(fan_in) for the head, zero biases.
fn seeded_init(varmap: &mut VarMap, seed: u64) -> anyhow::Result<()> {
    let mut vars: Vec<(String, Vec<usize>)> = {
        let data = varmap.data().lock().map_err(|_| anyhow::anyhow!("VarMap lock poisoned"))?;
        data.iter().map(|(name, var)| (name.clone(), var.dims().to_vec())).collect()
    };
    vars.sort();
    for (i, (name, shape)) in vars.iter().enumerate() {
        let value = if name.ends_with(".bias") {
            Tensor::zeros(shape.as_slice(), DType::F32, &Device::Cpu)?
        } else {
            let fan_in: usize = shape[1..].iter().product();
            let gain = if name.starts_with(HEAD_PREFIX) { 1.0 } else { 6f32.sqrt() };
            let bound = gain / (fan_in as f32).sqrt();
            maas_kernels::weights::seeded_uniform(shape, bound, seed.wrapping_add(i as u64), &Device::Cpu)?
        };
        varmap.set_one(name, value)?;
    }
    Ok(())
}

/// Pixels [N,64] f32 and labels [N] u32 as tensors.
fn tensors(d: &Digits) -> anyhow::Result<(Tensor, Tensor)> {
    let x = Tensor::from_slice(&d.pixels, (d.len(), PIXELS), &Device::Cpu)?;
    let y = Tensor::from_slice(&d.labels, d.len(), &Device::Cpu)?;
    Ok((x, y))
}

/// Fraction of rows whose argmax logit is the label.
fn accuracy(model: &Model, x: &Tensor, y: &Tensor) -> anyhow::Result<f64> {
    let pred = model.forward(x)?.argmax(D::Minus1)?;
    let correct = pred.eq(y)?.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()?;
    Ok(f64::from(correct) / y.dim(0)? as f64)
}

/// Writes the variables under `prefix.` to `path`, with the prefix stripped from their names.
fn save_group(varmap: &VarMap, prefix: &str, path: &Path) -> anyhow::Result<Vec<String>> {
    let data = varmap.data().lock().map_err(|_| anyhow::anyhow!("VarMap lock poisoned"))?;
    let group: HashMap<String, Tensor> = data
        .iter()
        .filter_map(|(name, var)| {
            let short = name.strip_prefix(prefix)?.strip_prefix('.')?;
            Some((short.to_string(), var.as_tensor().detach()))
        })
        .collect();
    candle_core::safetensors::save(&group, path).with_context(|| format!("writing {}", path.display()))?;
    let mut names: Vec<String> = group.into_keys().collect();
    names.sort();
    Ok(names)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.epochs == 0 || args.batch == 0 {
        bail!("--epochs and --batch must be at least 1");
    }
    let start = Instant::now();
    let all = digits::load(&digits::default_path())?;
    let (train, test) = digits::split(&all);
    println!("digits: {} train / {} test images", train.len(), test.len());
    let (train_x, train_y) = tensors(&train)?;
    let (test_x, test_y) = tensors(&test)?;

    let mut varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let model = Model::new(&vb)?;
    seeded_init(&mut varmap, args.seed)?;

    let params = ParamsAdamW { lr: args.lr, weight_decay: 1e-4, ..Default::default() };
    let mut opt = AdamW::new(varmap.all_vars(), params)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed);
    let mut order: Vec<u32> = (0..train.len() as u32).collect();
    for epoch in 0..args.epochs {
        // Linear decay from lr to lr/10 over the run.
        let t = epoch as f64 / (args.epochs.max(2) - 1) as f64;
        opt.set_learning_rate(args.lr * (1.0 - 0.9 * t));
        order.shuffle(&mut rng);
        let (mut loss_sum, mut seen) = (0f64, 0usize);
        for chunk in order.chunks(args.batch) {
            let idx = Tensor::from_slice(chunk, chunk.len(), &Device::Cpu)?;
            let x = train_x.index_select(&idx, 0)?;
            let y = train_y.index_select(&idx, 0)?;
            let loss = candle_nn::loss::cross_entropy(&model.forward(&x)?, &y)?;
            opt.backward_step(&loss)?;
            loss_sum += f64::from(loss.to_scalar::<f32>()?) * chunk.len() as f64;
            seen += chunk.len();
        }
        println!("epoch {:>3}: loss {:.4}", epoch + 1, loss_sum / seen as f64);
    }
    let train_acc = accuracy(&model, &train_x, &train_y)?;
    let test_acc = accuracy(&model, &test_x, &test_y)?;
    println!("train accuracy: {:.2}%", 100.0 * train_acc);
    println!("held-out test accuracy: {:.2}% ({} images)", 100.0 * test_acc, test.len());

    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let features_path = args.out.join("features.safetensors");
    let names = save_group(&varmap, FEATURES_PREFIX, &features_path)?;
    let mut want: Vec<String> = tensor_shapes(FEATURES).into_iter().map(|(n, _)| n.to_string()).collect();
    want.sort();
    if names != want {
        bail!("feature tensors {names:?} do not match the digits_cnn names {want:?}");
    }
    let head_path = args.out.join("head.safetensors");
    save_group(&varmap, HEAD_PREFIX, &head_path)?;
    println!("wrote {} and {}", features_path.display(), head_path.display());
    println!("done in {:.1}s", start.elapsed().as_secs_f64());
    Ok(())
}
