//! A graph written back as TOML in the graph language (paths as resolved at load, so the text
//! means the same from any directory).

use toml::{Table, Value};

use crate::spec::{FILE_PARAMS, Graph, Source, SubmodelSpec};

/// The graph as TOML text that the checker accepts (and that checks back to the same graph).
pub fn to_toml(graph: &Graph) -> String {
    let mut submodels = Table::new();
    for (name, s) in &graph.submodels {
        submodels.insert(name.to_string(), Value::Table(submodel_table(s)));
    }

    let mut pipelines = Table::new();
    for (name, p) in &graph.pipelines {
        let mut t = Table::new();
        let inputs: Table = p.inputs.iter().map(|i| (i.name.to_string(), Value::from(i.ty.to_string()))).collect();
        t.insert("inputs".into(), Value::Table(inputs));
        let outputs: Table =
            p.outputs.iter().map(|o| (o.name.to_string(), Value::from(format!("{}.{}", o.node, o.port)))).collect();
        t.insert("outputs".into(), Value::Table(outputs));
        if let Some(d) = p.deadline {
            t.insert("deadline_ms".into(), Value::from(d.as_millis() as i64));
        }
        let mut nodes = Table::new();
        for n in &p.nodes {
            let mut nt = Table::new();
            nt.insert("submodel".into(), Value::from(n.submodel.to_string()));
            let ins: Table = n
                .inputs
                .iter()
                .map(|(port, src)| {
                    let s = match src {
                        Source::Input(i) => format!("${i}"),
                        Source::Node { node, port } => format!("{node}.{port}"),
                    };
                    (port.to_string(), Value::from(s))
                })
                .collect();
            nt.insert("inputs".into(), Value::Table(ins));
            nodes.insert(n.name.to_string(), Value::Table(nt));
        }
        t.insert("nodes".into(), Value::Table(nodes));
        pipelines.insert(name.to_string(), Value::Table(t));
    }
    let mut root = Table::new();
    if !graph.nodes.is_empty() {
        let nodes: Table = graph
            .nodes
            .values()
            .map(|n| {
                let mut t = Table::new();
                t.insert("addr".into(), Value::from(n.addr.clone()));
                (n.name.clone(), Value::Table(t))
            })
            .collect();
        root.insert("nodes".into(), Value::Table(nodes));
    }
    root.insert("submodels".into(), Value::Table(submodels));
    root.insert("pipelines".into(), Value::Table(pipelines));
    toml::to_string(&root).unwrap_or_default()
}

/// One submodel as a `[submodels.NAME]` table (file paths resolved).
pub fn submodel_table(s: &SubmodelSpec) -> Table {
    let mut t = Table::new();
    t.insert("kind".into(), Value::from(s.kind.clone()));
    if let Some(w) = &s.weights {
        t.insert("weights".into(), Value::from(w.display().to_string()));
    }
    t.insert("version".into(), Value::from(s.version.clone()));
    t.insert("device".into(), Value::from(s.device.to_string()));
    t.insert("replicas".into(), Value::from(s.replicas as i64));
    if let Some(b) = s.batch {
        let mut bt = Table::new();
        bt.insert("max_size".into(), Value::from(b.max_size as i64));
        bt.insert("max_delay_ms".into(), Value::from(b.max_delay.as_millis() as i64));
        t.insert("batch".into(), Value::Table(bt));
    }
    t.insert("queue".into(), Value::from(s.queue as i64));
    if !s.node.is_empty() {
        t.insert("node".into(), Value::Array(s.node.iter().map(|n| Value::from(n.clone())).collect()));
    }
    if !s.params.is_empty() {
        // Relative file params are written resolved, so the TOML means the same anywhere.
        let mut params = s.params.clone();
        for (k, v) in params.iter_mut() {
            if let Value::String(p) = v
                && FILE_PARAMS.contains(&k.as_str())
            {
                *v = Value::from(s.resolve(p.as_str()).display().to_string());
            }
        }
        t.insert("params".into(), Value::Table(params));
    }
    t
}
