//! The reference executor: every node in topological order on the calling thread.

use std::collections::BTreeMap;

use maas_graphs::{Graph, Pipeline, Source, SubmodelName};
use maas_kernels::{KernelError, Loaded, Registry, Value, Values, check_inputs};

use crate::error::{EngineError, InferError, Result};

/// Every submodel of a graph loaded once, and the graph's pipelines, run synchronously.
pub struct Sequential {
    graph: Graph,
    submodels: BTreeMap<SubmodelName, Loaded>,
}

impl Sequential {
    /// Loads every submodel of `graph` with `registry` (refused with [`EngineError::TooLarge`]
    /// when their estimated memory exceeds half the machine's or what is available).
    pub fn new(graph: &Graph, registry: &Registry) -> Result<Self> {
        crate::memory::check(registry, graph.submodels.values(), crate::default_max_load_bytes())?;
        let mut submodels = BTreeMap::new();
        for (name, spec) in &graph.submodels {
            let loaded = registry
                .load(spec)
                .map_err(|source| EngineError::Load { submodel: name.to_string(), source: Box::new(source) })?;
            submodels.insert(name.clone(), loaded);
        }
        Ok(Self { graph: graph.clone(), submodels })
    }

    /// The graph it serves.
    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    /// A loaded submodel.
    pub fn submodel(&self, name: &str) -> Option<&Loaded> {
        self.submodels.get(name)
    }

    /// The version label of every submodel a pipeline uses.
    pub fn versions(&self, pipeline: &Pipeline) -> BTreeMap<String, String> {
        pipeline
            .submodels()
            .into_iter()
            .filter_map(|s| self.graph.submodels.get(s).map(|spec| (s.to_string(), spec.version.clone())))
            .collect()
    }

    /// Runs a pipeline on named inputs; returns its named outputs.
    pub fn run(&self, pipeline: &str, inputs: Values) -> Result<Values, InferError> {
        let p = self.graph.pipelines.get(pipeline).ok_or_else(|| InferError::UnknownPipeline(pipeline.to_string()))?;
        check_pipeline_inputs(p, &inputs)?;
        let mut produced: BTreeMap<(&str, &str), maas_kernels::Value> = BTreeMap::new();
        for node in &p.nodes {
            let mut args = Values::new();
            for (port, src) in &node.inputs {
                let v = match src {
                    Source::Input(name) => inputs[name.as_str()].clone(),
                    Source::Node { node, port } => produced[&(node.as_str(), port.as_str())].clone(),
                };
                args.insert(port.to_string(), v);
            }
            let loaded = &self.submodels[&node.submodel];
            let fail = |e: KernelError| match e.is_input() {
                true => InferError::InvalidInput(format!("node `{}` (submodel `{}`): {e}", node.name, node.submodel)),
                false => InferError::SubmodelFailed {
                    node: node.name.to_string(),
                    submodel: node.submodel.to_string(),
                    message: e.to_string(),
                },
            };
            let mut out = loaded.forward(&args).map_err(fail)?;
            for port in &loaded.signature.outputs {
                if let Some(v) = out.remove(&port.name) {
                    produced.insert((node.name.as_str(), port.name.as_str()), v);
                }
            }
        }
        Ok(p.outputs
            .iter()
            .map(|o| (o.name.to_string(), produced[&(o.node.as_str(), o.port.as_str())].clone()))
            .collect())
    }
}

/// Checks a request's inputs against the pipeline's declared inputs.
pub(crate) fn check_pipeline_inputs(p: &Pipeline, inputs: &Values) -> Result<(), InferError> {
    for name in inputs.keys() {
        if !p.inputs.iter().any(|i| i.name.as_str() == name) {
            let known: Vec<&str> = p.inputs.iter().map(|i| i.name.as_str()).collect();
            return Err(InferError::InvalidInput(format!(
                "pipeline `{}` has no input `{name}`; it takes: {}",
                p.name,
                known.join(", ")
            )));
        }
    }
    // An empty tensor (`"pixels": []`) would otherwise be described by its odd shape.
    for i in &p.inputs {
        if let (maas_graphs::PortType::Tensor { .. }, Some(Value::Tensor(t))) = (&i.ty, inputs.get(i.name.as_str()))
            && t.elem_count() == 0
        {
            let e = KernelError::EmptyInput {
                port: i.name.to_string(),
                expected: i.ty.to_string(),
                shape: t.dims().to_vec(),
            };
            return Err(InferError::InvalidInput(e.to_string()));
        }
    }
    let sig = maas_graphs::Signature {
        inputs: p.inputs.iter().map(|i| maas_graphs::PortSpec::new(i.name.as_str(), i.ty.clone())).collect(),
        outputs: Vec::new(),
    };
    let rows = check_inputs(&sig, inputs).map_err(|e| InferError::InvalidInput(e.to_string()))?;
    if rows == Some(0) {
        return Err(InferError::InvalidInput("the request has no rows (the batch dimension is 0)".into()));
    }
    Ok(())
}
