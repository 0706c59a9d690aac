//! What changes between two graphs: the input to runtime recomposition.

use std::collections::BTreeMap;

use crate::names::{PipelineName, SubmodelName};
use crate::spec::Graph;

/// Names added, removed and changed between two graphs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Changes<T> {
    /// Present only in the new graph.
    pub added: Vec<T>,
    /// Present only in the old graph.
    pub removed: Vec<T>,
    /// Present in both, defined differently.
    pub changed: Vec<T>,
}

impl<T> Default for Changes<T> {
    fn default() -> Self {
        Self { added: Vec::new(), removed: Vec::new(), changed: Vec::new() }
    }
}

impl<T> Changes<T> {
    /// Nothing added, removed or changed.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }
}

/// The difference between a running graph and a new one.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GraphDiff {
    /// Submodels added, removed, or changed (kind, weights, version, device, replicas,
    /// batching, queue or params; file paths compared after resolving them).
    pub submodels: Changes<SubmodelName>,
    /// Pipelines added, removed, or changed (inputs, outputs, deadline or wiring).
    pub pipelines: Changes<PipelineName>,
    /// Pipelines in both graphs whose definition is unchanged but that use a changed submodel:
    /// they need new plans too.
    pub affected: Vec<PipelineName>,
}

impl GraphDiff {
    /// The two graphs are the same.
    pub fn is_empty(&self) -> bool {
        self.submodels.is_empty() && self.pipelines.is_empty()
    }
}

fn changes<K: Ord + Clone, V: PartialEq>(old: &BTreeMap<K, V>, new: &BTreeMap<K, V>) -> Changes<K> {
    let mut c = Changes::default();
    for (k, v) in new {
        match old.get(k) {
            None => c.added.push(k.clone()),
            Some(o) if o != v => c.changed.push(k.clone()),
            Some(_) => {}
        }
    }
    c.removed = old.keys().filter(|k| !new.contains_key(*k)).cloned().collect();
    c
}

impl Graph {
    /// What must change to go from `self` (running) to `new`.
    pub fn diff(&self, new: &Graph) -> GraphDiff {
        // A submodel on a node whose address changed is a changed submodel (it must start
        // there).
        let norm = |g: &Graph| -> BTreeMap<SubmodelName, _> {
            g.submodels
                .iter()
                .map(|(k, v)| {
                    let addrs: Vec<Option<String>> =
                        v.node.iter().map(|n| g.nodes.get(n).map(|d| d.addr.clone())).collect();
                    (k.clone(), (v.normalized(), addrs))
                })
                .collect()
        };
        let submodels = changes(&norm(self), &norm(new));
        // Nodes are stored in a topological order, and a DAG has many: compare them by name.
        let by_name = |g: &Graph| -> BTreeMap<PipelineName, _> {
            g.pipelines
                .iter()
                .map(|(k, p)| {
                    let mut p = p.clone();
                    p.nodes.sort_by(|a, b| a.name.cmp(&b.name));
                    (k.clone(), p)
                })
                .collect()
        };
        let pipelines = changes(&by_name(self), &by_name(new));
        let changed: Vec<&SubmodelName> = submodels.changed.iter().collect();
        let affected = new
            .pipelines
            .iter()
            .filter(|(name, p)| {
                self.pipelines.get(*name) == Some(*p) && p.nodes.iter().any(|n| changed.contains(&&n.submodel))
            })
            .map(|(name, _)| name.clone())
            .collect();
        GraphDiff { submodels, pipelines, affected }
    }
}
