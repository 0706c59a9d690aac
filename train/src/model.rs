//! A pipeline as a trainable model: the nodes up to the loss's node, in order, each either a
//! learning submodel (its tensors are candle `Var`s in a `VarMap` named as in its weights
//! file, so what it learns is saved as a file its kind serves unchanged) or a frozen one (its
//! serving kernel, loaded by the registry, run forward only).
//!
//! The kinds that learn and their training forwards: `linear` (`weight` `[out,in]`, optional
//! `bias`), `mlp` (`layers.{i}.weight`/`bias`, the activation between layers) and
//! `digits_cnn` (`DigitsCnn`, the very code its kernel runs). A learning submodel starts from
//! its weights file (`init = "weights"`), or from a seeded He-uniform init with zero biases
//! (`init = "random"`, or a submodel without a weights file). A frozen submodel must not
//! depend on a learning one (its gradient would stop there).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use maas_graphs::{Graph, NodeName, Source, SubmodelName, SubmodelSpec};
use maas_kernels::kinds::digits_cnn::{DEFAULT_FEATURES, DigitsCnn};
use maas_kernels::{Loaded, Registry, Value, Values};

use crate::job::{Init, Job};

/// Why a model could not be built or run.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The pipeline's shape or a submodel's settings do not allow training.
    #[error("{0}")]
    Unsupported(String),
    /// candle failed (a shape, a weights file).
    #[error("{context}: {source}")]
    Candle {
        /// What was being done.
        context: String,
        /// The error.
        #[source]
        source: candle_core::Error,
    },
    /// A frozen submodel's kernel failed.
    #[error("{0}")]
    Kernel(#[from] maas_kernels::KernelError),
}

trait Ctx<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T, ModelError>;
}

impl<T> Ctx<T> for candle_core::Result<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T, ModelError> {
        self.map_err(|source| ModelError::Candle { context: what(), source })
    }
}

/// A learning submodel's forward.
enum Learner {
    Linear { weight: Tensor, bias: Option<Tensor> },
    Mlp { layers: Vec<(Tensor, Tensor)>, activation: String },
    Cnn(DigitsCnn),
}

impl Learner {
    /// The output port it writes.
    fn output(&self) -> &'static str {
        match self {
            Self::Cnn(_) => "features",
            _ => "out",
        }
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Linear { weight, bias } => {
                let y = x.matmul(&weight.t()?)?;
                match bias {
                    Some(b) => y.broadcast_add(b),
                    None => Ok(y),
                }
            }
            Self::Mlp { layers, activation } => {
                let mut x = x.clone();
                for (i, (w, b)) in layers.iter().enumerate() {
                    x = x.matmul(&w.t()?)?.broadcast_add(b)?;
                    if i + 1 < layers.len() {
                        x = match activation.as_str() {
                            "gelu" => x.gelu_erf()?,
                            "tanh" => x.tanh()?,
                            "sigmoid" => candle_nn::ops::sigmoid(&x)?,
                            _ => x.relu()?,
                        };
                    }
                }
                Ok(x)
            }
            Self::Cnn(net) => net.forward(x),
        }
    }
}

enum Step {
    Frozen { node: NodeName, kernel: Loaded, inputs: BTreeMap<String, Source> },
    Learn { node: NodeName, submodel: SubmodelName, learner: Learner, input: Source },
}

/// One replica of the trainable pipeline (each worker builds its own).
pub struct Model {
    steps: Vec<Step>,
    /// Learning submodel -> its variables (names as in its weights file).
    varmaps: BTreeMap<SubmodelName, VarMap>,
    loss: (NodeName, String),
}

/// The nodes the loss's node depends on (itself included), in an order where every node comes
/// after the nodes it reads.
fn upstream(graph: &Graph, job: &Job) -> Result<Vec<maas_graphs::Node>, ModelError> {
    let pipeline = &graph.pipelines[&job.pipeline];
    let by_name: HashMap<&NodeName, &maas_graphs::Node> = pipeline.nodes.iter().map(|n| (&n.name, n)).collect();
    let mut order = Vec::new();
    let mut done = std::collections::HashSet::new();
    fn visit<'a>(
        n: &'a maas_graphs::Node,
        by_name: &HashMap<&NodeName, &'a maas_graphs::Node>,
        done: &mut std::collections::HashSet<NodeName>,
        order: &mut Vec<maas_graphs::Node>,
    ) {
        if done.contains(&n.name) {
            return;
        }
        for src in n.inputs.values() {
            if let Source::Node { node, .. } = src
                && let Some(m) = by_name.get(node)
            {
                visit(m, by_name, done, order);
            }
        }
        done.insert(n.name.clone());
        order.push(n.clone());
    }
    let last = by_name
        .get(&job.loss.node)
        .ok_or_else(|| ModelError::Unsupported(format!("no node `{}` in the pipeline", job.loss.node)))?;
    visit(last, &by_name, &mut done, &mut order);
    Ok(order)
}

/// He-uniform for weights (`fan_in` from the shape's trailing dims), zeros for biases, seeded.
fn seeded_init(varmap: &mut VarMap, seed: u64) -> Result<(), ModelError> {
    let mut vars: Vec<(String, Vec<usize>)> = {
        let data = varmap.data().lock().map_err(|_| ModelError::Unsupported("VarMap lock poisoned".into()))?;
        data.iter().map(|(name, var)| (name.clone(), var.dims().to_vec())).collect()
    };
    vars.sort();
    for (i, (name, shape)) in vars.iter().enumerate() {
        let value = if name.ends_with("bias") {
            Tensor::zeros(shape.as_slice(), DType::F32, &Device::Cpu).ctx(|| format!("initialising `{name}`"))?
        } else {
            let fan_in: usize = shape[1..].iter().product::<usize>().max(1);
            let bound = 6f32.sqrt() / (fan_in as f32).sqrt();
            maas_kernels::weights::seeded_uniform(shape, bound, seed.wrapping_add(i as u64), &Device::Cpu)?
        };
        varmap.set_one(name, value).ctx(|| format!("initialising `{name}`"))?;
    }
    Ok(())
}

fn learner(
    spec: &SubmodelSpec,
    vb: VarBuilder,
    header: Option<&BTreeMap<String, Vec<usize>>>,
) -> Result<Learner, ModelError> {
    let param = |k: &str| spec.params.get(k);
    let int = |k: &str| param(k).and_then(|v| v.as_integer()).map(|v| v as usize);
    let shape = |name: &str| header.and_then(|h| h.get(name)).cloned();
    let c = |what: &str| format!("building `{}` ({})", spec.name, what);
    match spec.kind.as_str() {
        "linear" => {
            let (out, inp) = match shape("weight") {
                Some(s) if s.len() == 2 => (s[0], s[1]),
                _ => (
                    int("out").ok_or_else(|| ModelError::Unsupported(format!("`{}`: no `out`", spec.name)))?,
                    int("in").ok_or_else(|| ModelError::Unsupported(format!("`{}`: no `in`", spec.name)))?,
                ),
            };
            let weight = vb.get((out, inp), "weight").ctx(|| c("weight"))?;
            let has_bias = header.is_none_or(|h| h.contains_key("bias"));
            let bias = if has_bias { Some(vb.get(out, "bias").ctx(|| c("bias"))?) } else { None };
            Ok(Learner::Linear { weight, bias })
        }
        "mlp" => {
            let sizes: Vec<usize> = param("layers")
                .and_then(|v| v.as_array())
                .map(|a| a.iter().filter_map(|v| v.as_integer().map(|i| i as usize)).collect())
                .unwrap_or_default();
            if sizes.len() < 2 {
                return Err(ModelError::Unsupported(format!("`{}`: `layers` lists at least two sizes", spec.name)));
            }
            let activation = param("activation").and_then(|v| v.as_str()).unwrap_or("relu").to_string();
            let mut layers = Vec::new();
            for (i, pair) in sizes.windows(2).enumerate() {
                let l = vb.pp(format!("layers.{i}"));
                layers.push((
                    l.get((pair[1], pair[0]), "weight").ctx(|| c("weight"))?,
                    l.get(pair[1], "bias").ctx(|| c("bias"))?,
                ));
            }
            Ok(Learner::Mlp { layers, activation })
        }
        "digits_cnn" => {
            let features = shape("fc.weight").map(|s| s[0]).or_else(|| int("features")).unwrap_or(DEFAULT_FEATURES);
            Ok(Learner::Cnn(DigitsCnn::new(vb, features).ctx(|| c("network"))?))
        }
        other => Err(ModelError::Unsupported(format!("kind `{other}` has no training forward"))),
    }
}

impl Model {
    /// Builds the trainable pipeline of `job` (learning submodels initialised, frozen ones
    /// loaded).
    pub fn new(graph: &Graph, job: &Job, registry: &Registry) -> Result<Self, ModelError> {
        let nodes = upstream(graph, job)?;
        let mut steps = Vec::new();
        let mut varmaps = BTreeMap::new();
        let mut learning_nodes = std::collections::HashSet::new();
        for node in nodes {
            let spec = &graph.submodels[&node.submodel];
            let reads_learning =
                node.inputs.values().any(|s| matches!(s, Source::Node { node, .. } if learning_nodes.contains(node)));
            if job.learn.contains(&node.submodel) {
                let varmap = varmaps.entry(node.submodel.clone()).or_insert_with(VarMap::new);
                // Shapes from the weights file when there is one (whatever the init), values
                // from it only with `init = "weights"`.
                let header = match &spec.weights {
                    Some(w) => {
                        let path = w.clone();
                        Some((path.clone(), maas_kernels::weights::read_header(&path)?))
                    }
                    None => None,
                };
                let shapes =
                    header.as_ref().map(|(_, h)| h.iter().map(|(k, t)| (k.clone(), t.shape.clone())).collect());
                let vb = VarBuilder::from_varmap(varmap, DType::F32, &Device::Cpu);
                let learner = learner(spec, vb, shapes.as_ref())?;
                match &header {
                    Some((path, _)) if job.init == Init::Weights => {
                        varmap.load(path).ctx(|| format!("loading `{}`", path.display()))?
                    }
                    _ => seeded_init(varmap, job.seed.wrapping_add(steps.len() as u64 * 1000))?,
                }
                let input = node
                    .inputs
                    .get("x")
                    .cloned()
                    .ok_or_else(|| ModelError::Unsupported(format!("node `{}` has no input `x`", node.name)))?;
                learning_nodes.insert(node.name.clone());
                steps.push(Step::Learn { node: node.name.clone(), submodel: node.submodel.clone(), learner, input });
            } else {
                if reads_learning {
                    return Err(ModelError::Unsupported(format!(
                        "frozen submodel `{}` (node `{}`) reads a learning one: the gradient would stop there; let it learn too",
                        node.submodel, node.name
                    )));
                }
                let kernel = registry.load(spec)?;
                let inputs = node.inputs.iter().map(|(p, s)| (p.to_string(), s.clone())).collect();
                steps.push(Step::Frozen { node: node.name.clone(), kernel, inputs });
            }
        }
        Ok(Self { steps, varmaps, loss: (job.loss.node.clone(), job.loss.port.to_string()) })
    }

    /// The learning tensors by `submodel/tensor` name, with their shapes.
    pub fn shapes(&self) -> BTreeMap<String, Vec<usize>> {
        self.vars().into_iter().map(|(n, v)| (n, v.dims().to_vec())).collect()
    }

    fn vars(&self) -> BTreeMap<String, Var> {
        let mut out = BTreeMap::new();
        for (sub, vm) in &self.varmaps {
            let data = vm.data().lock().expect("VarMap lock");
            for (name, var) in data.iter() {
                out.insert(format!("{sub}/{name}"), var.clone());
            }
        }
        out
    }

    /// The learning tensors' values, by `submodel/tensor` name.
    pub fn values(&self) -> Result<BTreeMap<String, Vec<f32>>, ModelError> {
        self.vars()
            .into_iter()
            .map(|(n, v)| {
                Ok((n.clone(), v.as_tensor().flatten_all().and_then(|t| t.to_vec1()).ctx(|| format!("reading `{n}`"))?))
            })
            .collect()
    }

    /// Sets every learning tensor from `values` (by `submodel/tensor` name).
    pub fn set_values(&self, values: &BTreeMap<String, Vec<f32>>) -> Result<(), ModelError> {
        for (name, var) in self.vars() {
            let v = values.get(&name).ok_or_else(|| ModelError::Unsupported(format!("no values for `{name}`")))?;
            let t = Tensor::from_slice(v, var.dims(), &Device::Cpu).ctx(|| format!("shaping `{name}`"))?;
            var.set(&t).ctx(|| format!("setting `{name}`"))?;
        }
        Ok(())
    }

    /// The loss node's output (logits) for a batch of pipeline inputs.
    pub fn logits(&self, inputs: &BTreeMap<String, Tensor>) -> Result<Tensor, ModelError> {
        let mut outputs: HashMap<(NodeName, String), Tensor> = HashMap::new();
        let read = |src: &Source, outputs: &HashMap<(NodeName, String), Tensor>| -> Result<Tensor, ModelError> {
            match src {
                Source::Input(name) => inputs
                    .get(name.as_str())
                    .cloned()
                    .ok_or_else(|| ModelError::Unsupported(format!("no data for pipeline input `{name}`"))),
                Source::Node { node, port } => outputs
                    .get(&(node.clone(), port.to_string()))
                    .cloned()
                    .ok_or_else(|| ModelError::Unsupported(format!("`{node}.{port}` is not computed"))),
            }
        };
        for step in &self.steps {
            match step {
                Step::Learn { node, learner, input, submodel } => {
                    let x = read(input, &outputs)?;
                    let y = learner.forward(&x).ctx(|| format!("forward of `{submodel}`"))?;
                    outputs.insert((node.clone(), learner.output().to_string()), y);
                }
                Step::Frozen { node, kernel, inputs: bindings } => {
                    let mut values = Values::new();
                    for (port, src) in bindings {
                        values.insert(port.clone(), Value::Tensor(read(src, &outputs)?));
                    }
                    for (port, v) in kernel.forward(&values)? {
                        if let Value::Tensor(t) = v {
                            outputs.insert((node.clone(), port), t);
                        }
                    }
                }
            }
        }
        outputs.remove(&self.loss).ok_or_else(|| {
            ModelError::Unsupported(format!("the loss output `{}.{}` was not computed", self.loss.0, self.loss.1))
        })
    }

    /// Mean cross-entropy of a batch and the gradient of every learning tensor (by name,
    /// flattened).
    pub fn gradients(
        &self,
        inputs: &BTreeMap<String, Tensor>,
        labels: &Tensor,
    ) -> Result<(f32, BTreeMap<String, Vec<f32>>), ModelError> {
        let logits = self.logits(inputs)?;
        let loss = candle_nn::loss::cross_entropy(&logits, labels).ctx(|| "cross-entropy".into())?;
        let value = loss.to_scalar::<f32>().ctx(|| "loss".into())?;
        let grads = loss.backward().ctx(|| "backward".into())?;
        let mut out = BTreeMap::new();
        for (name, var) in self.vars() {
            let g = match grads.get(var.as_tensor()) {
                Some(g) => g.flatten_all().and_then(|t| t.to_vec1()).ctx(|| format!("gradient of `{name}`"))?,
                None => vec![0.0; var.elem_count()],
            };
            out.insert(name, g);
        }
        Ok((value, out))
    }

    /// Writes each learning submodel's tensors to `dir/<submodel>.safetensors` (the names its
    /// kind loads); returns submodel -> path.
    pub fn save(&self, dir: &Path) -> Result<BTreeMap<String, std::path::PathBuf>, ModelError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| ModelError::Unsupported(format!("creating {}: {e}", dir.display())))?;
        let mut out = BTreeMap::new();
        for (sub, vm) in &self.varmaps {
            let path = dir.join(format!("{sub}.safetensors"));
            vm.save(&path).ctx(|| format!("writing {}", path.display()))?;
            out.insert(sub.to_string(), path);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The gradient candle computes for one weight, against a central finite difference of the
    /// mean cross-entropy (in f64 arithmetic on f32 values, so the step is not too small).
    fn check_gradients(varmap: &VarMap, learner: &Learner, x: &Tensor, y: &Tensor) {
        let loss = |l: &Learner| -> f64 {
            let logits = l.forward(x).unwrap();
            f64::from(candle_nn::loss::cross_entropy(&logits, y).unwrap().to_scalar::<f32>().unwrap())
        };
        let logits = learner.forward(x).unwrap();
        let grads = candle_nn::loss::cross_entropy(&logits, y).unwrap().backward().unwrap();
        let vars: Vec<(String, Var)> =
            varmap.data().lock().unwrap().iter().map(|(n, v)| (n.clone(), v.clone())).collect();
        assert!(!vars.is_empty());
        for (name, var) in vars {
            let g: Vec<f32> = grads.get(var.as_tensor()).expect("a gradient").flatten_all().unwrap().to_vec1().unwrap();
            let base: Vec<f32> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            // A few entries spread over the tensor.
            for i in [0, base.len() / 3, base.len() / 2, base.len() - 1] {
                let eps = 1e-3f32;
                let mut v = base.clone();
                v[i] = base[i] + eps;
                var.set(&Tensor::from_slice(&v, var.dims(), &Device::Cpu).unwrap()).unwrap();
                let up = loss(learner);
                v[i] = base[i] - eps;
                var.set(&Tensor::from_slice(&v, var.dims(), &Device::Cpu).unwrap()).unwrap();
                let down = loss(learner);
                var.set(&Tensor::from_slice(&base, var.dims(), &Device::Cpu).unwrap()).unwrap();
                let numeric = (up - down) / (2.0 * f64::from(eps));
                let analytic = f64::from(g[i]);
                assert!(
                    (numeric - analytic).abs() <= 2e-3 + 0.05 * analytic.abs(),
                    "{name}[{i}]: finite difference {numeric:.6} vs gradient {analytic:.6}"
                );
            }
        }
    }

    fn spec(kind: &str, params: &str) -> SubmodelSpec {
        let mut s = SubmodelSpec::new(SubmodelName::new("s").unwrap(), kind);
        s.params = toml::from_str(params).unwrap();
        s
    }

    fn inputs(rows: usize, width: usize, scale: f32) -> (Tensor, Tensor) {
        let x: Vec<f32> = (0..rows * width).map(|i| ((i as f32 * 0.7).sin() + 1.0) * scale).collect();
        let y: Vec<u32> = (0..rows as u32).map(|r| r % 3).collect();
        (Tensor::from_vec(x, (rows, width), &Device::Cpu).unwrap(), Tensor::from_vec(y, rows, &Device::Cpu).unwrap())
    }

    #[test]
    fn every_learning_kind_has_the_gradient_of_its_loss() {
        let cases = [
            (spec("linear", "in = 6\nout = 3"), 6, 1.0),
            (spec("mlp", "layers = [6, 5, 3]\nactivation = \"tanh\""), 6, 1.0),
            (spec("digits_cnn", "features = 3"), 64, 8.0),
        ];
        for (spec, width, scale) in cases {
            let mut varmap = VarMap::new();
            let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
            let learner = learner(&spec, vb, None).unwrap();
            seeded_init(&mut varmap, 3).unwrap();
            let (x, y) = inputs(4, width, scale);
            check_gradients(&varmap, &learner, &x, &y);
        }
    }
}
