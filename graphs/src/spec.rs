//! The validated graph: submodels and pipelines, free of source spans.
//!
//! A [`Graph`] only exists after [`crate::check`] accepted it: every reference resolves, every
//! pipeline is acyclic, every connected pair of ports has compatible types, and pipeline nodes
//! are stored in a topological order.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use petgraph::graph::DiGraph;

use crate::names::{NodeName, PipelineName, PortName, SubmodelName};
use crate::signature::PortType;

/// Default `version` of a submodel.
pub const DEFAULT_VERSION: &str = "v1";
/// Default `queue` of a submodel: requests that may wait at it.
pub const DEFAULT_QUEUE: usize = 1024;
/// The `params` keys that name files (resolved against the graph file's directory), by the
/// convention every built-in kind follows: `path` (e.g. a tokenizer), `config`, and `runtime`
/// (the ONNX Runtime library an `onnx` submodel loads).
pub const FILE_PARAMS: &[&str] = &["path", "config", "runtime"];

/// A validated set of submodels and the pipelines that wire them.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Graph {
    /// Submodels by name.
    pub submodels: BTreeMap<SubmodelName, SubmodelSpec>,
    /// Pipelines by name.
    pub pipelines: BTreeMap<PipelineName, Pipeline>,
    /// Nodes (other processes that host submodels) by name (`[nodes.NAME]`).
    pub nodes: BTreeMap<String, NodeSpec>,
}

/// The name that places a submodel on the serving process itself (`node = "local"`).
pub const LOCAL_NODE: &str = "local";

/// A node: a `maas node` process that hosts submodels for the serving process
/// (`[nodes.NAME] addr = "HOST:PORT"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSpec {
    /// Its name, as submodels' `node` keys name it.
    pub name: String,
    /// Where it listens, `HOST:PORT`.
    pub addr: String,
}

/// Where a submodel runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum DeviceSpec {
    /// The CPU (default).
    #[default]
    Cpu,
    /// A CUDA GPU by ordinal (`cuda:N`; `cuda` means `cuda:0`).
    Cuda(usize),
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl FromStr for DeviceSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse::<usize>().ok())
                .map(DeviceSpec::Cuda)
                .ok_or_else(|| format!("invalid device `{s}`; expected \"cpu\" or \"cuda:N\"")),
        }
    }
}

/// Dynamic batching of a submodel (`batch = { max_size, max_delay_ms }`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchSpec {
    /// The most rows one batch may hold (>= 1).
    pub max_size: usize,
    /// How long a batch may wait for more rows while the stream is busy.
    pub max_delay: Duration,
}

/// A named, shareable submodel: one kernel kind with its weights and settings.
#[derive(Debug, Clone, PartialEq)]
pub struct SubmodelSpec {
    /// Its name.
    pub name: SubmodelName,
    /// The registered kernel kind (`bert`, `linear`, ...).
    pub kind: String,
    /// The weights file, resolved against the graph file's directory.
    pub weights: Option<PathBuf>,
    /// Version label reported with every result it served.
    pub version: String,
    /// Where it runs.
    pub device: DeviceSpec,
    /// How many replicas (actors) serve it (>= 1).
    pub replicas: usize,
    /// Dynamic batching; `None`: no waiting, a batch is whatever queued while the stream ran.
    pub batch: Option<BatchSpec>,
    /// Requests that may wait at this submodel before new ones are refused (>= 1).
    pub queue: usize,
    /// Kind-specific parameters, checked by the kind.
    pub params: toml::Table,
    /// The directory relative paths in `params` resolve against (the graph file's directory).
    pub base_dir: PathBuf,
    /// The nodes its replicas run on (`node = "a"` or `node = ["a", "b"]`), each hosting
    /// `replicas` of them; empty (or `["local"]`): the serving process.
    pub node: Vec<String>,
}

impl SubmodelSpec {
    /// A submodel of `kind` with every setting at its default.
    pub fn new(name: SubmodelName, kind: impl Into<String>) -> Self {
        Self {
            name,
            kind: kind.into(),
            weights: None,
            version: DEFAULT_VERSION.to_string(),
            device: DeviceSpec::Cpu,
            replicas: 1,
            batch: None,
            queue: DEFAULT_QUEUE,
            params: toml::Table::new(),
            base_dir: PathBuf::from("."),
            node: Vec::new(),
        }
    }

    /// The nodes this submodel is placed on other than the serving process (empty: it runs
    /// in the serving process).
    pub fn remote_nodes(&self) -> impl Iterator<Item = &str> {
        self.node.iter().map(String::as_str).filter(|n| *n != LOCAL_NODE)
    }

    /// Whether any of its replicas runs on another process.
    pub fn is_remote(&self) -> bool {
        self.remote_nodes().next().is_some()
    }

    /// Resolves a path written in this submodel's graph file.
    pub fn resolve(&self, path: impl AsRef<Path>) -> PathBuf {
        self.base_dir.join(path)
    }

    /// Every file this submodel reads: its weights and its file params ([`FILE_PARAMS`]),
    /// resolved.
    pub fn files(&self) -> Vec<PathBuf> {
        let params = FILE_PARAMS.iter().filter_map(|k| self.params.get(*k)?.as_str().map(|p| self.resolve(p)));
        self.weights.iter().cloned().chain(params).collect()
    }

    /// The same submodel, written so that two specs compare equal exactly when they serve the
    /// same thing: file paths made canonical (where they exist) and `base_dir` dropped, so that a
    /// graph read from another directory, or written back by [`crate::to_toml`], is not a change.
    pub fn normalized(&self) -> SubmodelSpec {
        let canon = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
        let mut s = self.clone();
        s.weights = self.weights.as_deref().map(canon);
        for k in FILE_PARAMS {
            if let Some(toml::Value::String(p)) = s.params.get_mut(*k) {
                *p = canon(&self.resolve(p.as_str())).display().to_string();
            }
        }
        s.base_dir = PathBuf::new();
        s
    }
}

/// Where a node input comes from.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Source {
    /// A pipeline input (`"$name"`).
    Input(PortName),
    /// An output port of another node (`"node.port"`).
    Node {
        /// The producing node.
        node: NodeName,
        /// Its output port.
        port: PortName,
    },
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Input(n) => write!(f, "${n}"),
            Source::Node { node, port } => write!(f, "{node}.{port}"),
        }
    }
}

/// One step of a pipeline: a submodel applied to named inputs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// Its name, unique in the pipeline.
    pub name: NodeName,
    /// The submodel that computes it.
    pub submodel: SubmodelName,
    /// Input port -> where its value comes from.
    pub inputs: BTreeMap<PortName, Source>,
}

/// A typed pipeline input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PipelineInput {
    /// Its name (`$name` in node inputs).
    pub name: PortName,
    /// Its declared type.
    pub ty: PortType,
}

/// A pipeline output bound to a node's output port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PipelineOutput {
    /// Its name in results.
    pub name: PortName,
    /// The node that produces it.
    pub node: NodeName,
    /// That node's output port.
    pub port: PortName,
    /// Its type, as far as the checker could resolve it.
    pub ty: PortType,
}

/// A checked pipeline: a DAG of nodes from typed inputs to named outputs.
#[derive(Debug, Clone, PartialEq)]
pub struct Pipeline {
    /// Its name.
    pub name: PipelineName,
    /// Declared inputs.
    pub inputs: Vec<PipelineInput>,
    /// Declared outputs.
    pub outputs: Vec<PipelineOutput>,
    /// Default deadline of a request (`deadline_ms`).
    pub deadline: Option<Duration>,
    /// Nodes in a topological order: every node comes after the nodes it reads from.
    pub nodes: Vec<Node>,
}

/// A vertex of a pipeline's DAG.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Vertex {
    /// A pipeline input.
    Input(PortName),
    /// A node (index into [`Pipeline::nodes`]).
    Node(usize),
    /// A pipeline output.
    Output(PortName),
}

/// An edge of a pipeline's DAG: which port feeds which.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Edge {
    /// The producing port (`None` from a pipeline input).
    pub from_port: Option<PortName>,
    /// The consuming port (`None` into a pipeline output).
    pub to_port: Option<PortName>,
}

impl Pipeline {
    /// A node by name.
    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.name.as_str() == name)
    }

    /// The submodels this pipeline uses, each once.
    pub fn submodels(&self) -> std::collections::BTreeSet<&SubmodelName> {
        self.nodes.iter().map(|n| &n.submodel).collect()
    }

    /// The pipeline as a petgraph DAG, inputs and outputs included.
    pub fn dag(&self) -> DiGraph<Vertex, Edge> {
        let mut g = DiGraph::new();
        let inputs: BTreeMap<&PortName, _> =
            self.inputs.iter().map(|i| (&i.name, g.add_node(Vertex::Input(i.name.clone())))).collect();
        let nodes: BTreeMap<&NodeName, _> =
            self.nodes.iter().enumerate().map(|(i, n)| (&n.name, g.add_node(Vertex::Node(i)))).collect();
        for n in &self.nodes {
            for (port, src) in &n.inputs {
                let (from, from_port) = match src {
                    Source::Input(i) => (inputs[i], None),
                    Source::Node { node, port } => (nodes[node], Some(port.clone())),
                };
                g.add_edge(from, nodes[&n.name], Edge { from_port, to_port: Some(port.clone()) });
            }
        }
        for o in &self.outputs {
            let v = g.add_node(Vertex::Output(o.name.clone()));
            g.add_edge(nodes[&o.node], v, Edge { from_port: Some(o.port.clone()), to_port: None });
        }
        g
    }
}
