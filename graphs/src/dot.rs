//! Graphviz DOT export of a pipeline (petgraph's `Dot` with our labels).

use petgraph::dot::{Config, Dot};

use crate::spec::{Graph, Pipeline, Vertex};

/// The pipeline as a Graphviz DOT digraph: inputs and outputs as ellipses, nodes as boxes
/// labelled with their name, submodel and kind, edges labelled with the ports they connect.
pub fn to_dot(graph: &Graph, pipeline: &Pipeline) -> String {
    let g = pipeline.dag();
    let edge = |_, e: petgraph::graph::EdgeReference<'_, crate::spec::Edge>| {
        let w = e.weight();
        let label = match (&w.from_port, &w.to_port) {
            (Some(f), Some(t)) if f == t => f.to_string(),
            (Some(f), Some(t)) => format!("{f} -> {t}"),
            (Some(p), None) | (None, Some(p)) => p.to_string(),
            (None, None) => String::new(),
        };
        format!("label = \"{}\"", escape(&label))
    };
    let node = |_, (_, v): (petgraph::graph::NodeIndex, &Vertex)| match v {
        Vertex::Input(name) => {
            let ty = pipeline.inputs.iter().find(|i| &i.name == name).map(|i| i.ty.to_string()).unwrap_or_default();
            format!("label = \"${}\\n{}\", shape = ellipse", escape(name.as_str()), escape(&ty))
        }
        Vertex::Output(name) => {
            let ty = pipeline.outputs.iter().find(|o| &o.name == name).map(|o| o.ty.to_string()).unwrap_or_default();
            format!("label = \"{}\\n{}\", shape = ellipse, style = bold", escape(name.as_str()), escape(&ty))
        }
        Vertex::Node(i) => {
            let n = &pipeline.nodes[*i];
            let kind = graph.submodels.get(&n.submodel).map_or("?", |s| s.kind.as_str());
            format!(
                "label = \"{}\\nsubmodel: {}\\nkind: {}\", shape = box",
                escape(n.name.as_str()),
                escape(n.submodel.as_str()),
                escape(kind)
            )
        }
    };
    let dot = Dot::with_attr_getters(&g, &[Config::EdgeNoLabel, Config::NodeNoLabel], &edge, &node);
    let body = format!("{dot:?}");
    // Name the graph after the pipeline; keep petgraph's body.
    match body.strip_prefix("digraph {") {
        Some(rest) => format!("digraph \"{}\" {{\n    rankdir = LR{rest}", escape(pipeline.name.as_str())),
        None => body,
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}
