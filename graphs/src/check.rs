//! Step two of checking: raw pieces -> a validated [`Graph`], or every diagnostic at once.
//!
//! Checks, per graph set: duplicate names across files, unknown kinds, kind-specific settings
//! (via the [`Catalog`]), missing weight files, unused submodels (warning); per pipeline:
//! references to unknown submodels, nodes, ports and inputs, unconnected required ports, cycles
//! (naming the nodes), nodes unreachable from the inputs, nodes that feed no output (warning),
//! and dtype/shape agreement of every connection by unifying the symbolic shapes of the ports.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::Path;
use std::sync::Arc;

use petgraph::algo::{tarjan_scc, toposort};
use petgraph::graph::{DiGraph, NodeIndex};

use crate::catalog::{Catalog, SignatureError};
use crate::diagnostic::{self, Diagnostic, Diagnostics, SourceFile};
use crate::names::{PipelineName, PortName, SubmodelName};
use crate::parse::{self, RawPipeline, RawSubmodel, Span};
use crate::signature::{BATCH, Dim, PortType, Signature};
use crate::spec::{Graph, Node, Pipeline, PipelineInput, PipelineOutput, Source};
use crate::suggest::hint;

/// An accepted graph and the warnings found on the way.
#[derive(Debug, Clone)]
pub struct Checked {
    /// The validated graph.
    pub graph: Graph,
    /// Warnings (the graph runs regardless).
    pub warnings: Vec<Diagnostic>,
    /// The signature of every submodel, as its kind declared it.
    pub signatures: BTreeMap<SubmodelName, Signature>,
}

/// Reads and checks graph files together (names are shared across them).
pub fn check_files<P: AsRef<Path>>(paths: &[P], catalog: &dyn Catalog) -> Result<Checked, Diagnostics> {
    let mut sources = Vec::new();
    let mut diags = Vec::new();
    for p in paths {
        let p = p.as_ref();
        match SourceFile::read(p) {
            Ok(s) => sources.push(s),
            Err(e) => diags.push(Diagnostic::error(None, format!("{}: cannot read: {e}", p.display()))),
        }
    }
    match check(sources, catalog) {
        Ok(c) if diags.is_empty() => Ok(c),
        Ok(c) => {
            diags.extend(c.warnings);
            Err(Diagnostics(diags))
        }
        Err(Diagnostics(more)) => {
            diags.extend(more);
            Err(Diagnostics(diags))
        }
    }
}

/// Checks TOML sources together; on success the graph, else every diagnostic (sorted by place).
pub fn check(sources: Vec<SourceFile>, catalog: &dyn Catalog) -> Result<Checked, Diagnostics> {
    let mut diags = Vec::new();
    let mut submodels: BTreeMap<SubmodelName, RawSubmodel> = BTreeMap::new();
    let mut pipelines: BTreeMap<PipelineName, RawPipeline> = BTreeMap::new();
    let mut nodes: BTreeMap<String, parse::RawNodeDecl> = BTreeMap::new();
    for src in sources {
        let file = Arc::new(src);
        let raw = parse::parse_file(&file, &mut diags);
        for n in raw.nodes {
            if let Some(first) = nodes.get(&n.spec.name) {
                let at = first.file.locate(&first.name_span);
                diags.push(Diagnostic::error(
                    Some(n.file.locate(&n.name_span)),
                    format!("node `{}` is declared twice (first at {at})", n.spec.name),
                ));
            } else {
                nodes.insert(n.spec.name.clone(), n);
            }
        }
        for s in raw.submodels {
            if let Some(first) = submodels.get(&s.spec.name) {
                let at = first.file.locate(&first.name_span);
                diags.push(Diagnostic::error(
                    Some(s.file.locate(&s.name_span)),
                    format!("submodel `{}` is defined twice (first at {at})", s.spec.name),
                ));
            } else {
                submodels.insert(s.spec.name.clone(), s);
            }
        }
        for p in raw.pipelines {
            if let Some(first) = pipelines.get(&p.name) {
                let at = first.file.locate(&first.name_span);
                diags.push(Diagnostic::error(
                    Some(p.file.locate(&p.name_span)),
                    format!("pipeline `{}` is defined twice (first at {at})", p.name),
                ));
            } else {
                pipelines.insert(p.name.clone(), p);
            }
        }
    }

    check_placements(&submodels, &nodes, &mut diags);
    let signatures = submodel_signatures(&submodels, catalog, &mut diags);

    let mut used: HashSet<&SubmodelName> = HashSet::new();
    let mut graph = Graph::default();
    for p in pipelines.values() {
        for n in &p.nodes {
            if let Some((s, _)) = &n.submodel {
                used.insert(s);
            }
        }
        if let Some(pipeline) = check_pipeline(p, &submodels, &signatures, &mut diags) {
            graph.pipelines.insert(p.name.clone(), pipeline);
        }
    }
    for (name, s) in &submodels {
        if !used.contains(name) {
            diags.push(Diagnostic::warning(
                Some(s.file.locate(&s.name_span)),
                format!("submodel `{name}` is not used by any pipeline"),
            ));
        }
        graph.submodels.insert(name.clone(), s.spec.clone());
    }
    graph.nodes = nodes.into_iter().map(|(name, n)| (name, n.spec)).collect();

    diagnostic::sort(&mut diags);
    if diags.iter().any(Diagnostic::is_error) {
        return Err(Diagnostics(diags));
    }
    Ok(Checked { graph, warnings: diags, signatures })
}

/// Every node a submodel names is declared (or is the serving process, `local`), and no two
/// nodes share an address. (A remote submodel's `device` is one of its node's.)
fn check_placements(
    submodels: &BTreeMap<SubmodelName, RawSubmodel>,
    nodes: &BTreeMap<String, parse::RawNodeDecl>,
    diags: &mut Vec<Diagnostic>,
) {
    let mut addrs: BTreeMap<&str, &str> = BTreeMap::new();
    for (name, n) in nodes.iter().filter(|(_, n)| !n.spec.addr.is_empty()) {
        if let Some(first) = addrs.insert(n.spec.addr.as_str(), name.as_str()) {
            diags.push(Diagnostic::error(
                Some(n.file.locate(&n.name_span)),
                format!(
                    "nodes `{first}` and `{name}` have the same address `{}`; one process is one node",
                    n.spec.addr
                ),
            ));
        }
    }
    for (name, s) in submodels {
        for n in &s.spec.node {
            if n == crate::spec::LOCAL_NODE || nodes.contains_key(n) {
                continue;
            }
            let mut known: Vec<&str> = nodes.keys().map(String::as_str).collect();
            known.push(crate::spec::LOCAL_NODE);
            diags.push(Diagnostic::error(
                Some(s.file.locate(&s.span_of(Some(&format!("node.{n}"))))),
                format!(
                    "submodel `{name}` is placed on node `{n}`, which no `[nodes.{n}]` declares; known: {}{}",
                    known.join(", "),
                    hint(n, known.iter().copied())
                ),
            ));
        }
        if s.spec.is_remote() && s.spec.node.iter().any(|n| n == crate::spec::LOCAL_NODE) {
            diags.push(Diagnostic::error(
                Some(s.file.locate(&s.span_of(Some("node")))),
                format!(
                    "submodel `{name}` mixes `local` with other nodes; place it on the serving process or on nodes"
                ),
            ));
        }
    }
}

fn submodel_signatures(
    submodels: &BTreeMap<SubmodelName, RawSubmodel>,
    catalog: &dyn Catalog,
    diags: &mut Vec<Diagnostic>,
) -> BTreeMap<SubmodelName, Signature> {
    let mut out = BTreeMap::new();
    for (name, s) in submodels {
        if !s.complete {
            continue;
        }
        if let Some(w) = &s.spec.weights
            && let Some(problem) = crate::file_problem(w)
        {
            diags.push(Diagnostic::error(
                Some(s.file.locate(&s.span_of(Some("weights")))),
                format!("weights file `{}` of submodel `{name}` {problem}", w.display()),
            ));
            continue;
        }
        match catalog.signature(&s.spec) {
            Ok(sig) => {
                out.insert(name.clone(), sig);
            }
            Err(SignatureError::UnknownKind) => {
                let mut kinds = catalog.kinds();
                kinds.sort();
                diags.push(Diagnostic::error(
                    Some(s.file.locate(&s.span_of(Some("kind")))),
                    format!(
                        "unknown kind `{}`; expected one of: {}{}",
                        s.spec.kind,
                        kinds.join(", "),
                        hint(&s.spec.kind, kinds.iter().map(String::as_str))
                    ),
                ));
            }
            Err(SignatureError::Invalid(errors)) => {
                for e in errors {
                    diags.push(Diagnostic::error(
                        Some(s.file.locate(&s.span_of(e.key.as_deref()))),
                        format!("submodel `{name}` (kind `{}`): {}", s.spec.kind, e.message),
                    ));
                }
            }
        }
    }
    out
}

fn port_list<'a>(ports: impl Iterator<Item = &'a str>) -> String {
    let v: Vec<&str> = ports.collect();
    if v.is_empty() { "none".into() } else { v.join(", ") }
}

fn check_pipeline(
    p: &RawPipeline,
    submodels: &BTreeMap<SubmodelName, RawSubmodel>,
    signatures: &BTreeMap<SubmodelName, Signature>,
    diags: &mut Vec<Diagnostic>,
) -> Option<Pipeline> {
    let before = diags.iter().filter(|d| d.is_error()).count();
    let err = |diags: &mut Vec<Diagnostic>, span: &Span, msg: String| {
        diags.push(Diagnostic::error(Some(p.file.locate(span)), msg));
    };
    let inputs: HashMap<&PortName, &parse::RawInput> = p.inputs.iter().map(|i| (&i.name, i)).collect();
    let nodes: HashMap<&str, usize> = p.nodes.iter().enumerate().map(|(i, n)| (n.name.as_str(), i)).collect();
    // The signature of each node's submodel, where known.
    let sig_of = |i: usize| p.nodes[i].submodel.as_ref().and_then(|(s, _)| signatures.get(s));
    let kind_of = |i: usize| {
        p.nodes[i].submodel.as_ref().and_then(|(s, _)| submodels.get(s)).map_or("?", |s| s.spec.kind.as_str())
    };

    // References.
    let mut g: DiGraph<usize, ()> = DiGraph::new();
    let idx: Vec<NodeIndex> = (0..p.nodes.len()).map(|i| g.add_node(i)).collect();
    for (i, n) in p.nodes.iter().enumerate() {
        if let Some((s, span)) = &n.submodel
            && !submodels.contains_key(s)
        {
            let known = hint(s.as_str(), submodels.keys().map(|k| k.as_str()));
            err(diags, span, format!("node `{}` uses unknown submodel `{s}`{known}", n.name));
        }
        let sig = sig_of(i);
        for b in &n.inputs {
            if let Some(sig) = sig
                && sig.input(b.port.as_str()).is_none()
            {
                err(
                    diags,
                    &b.port_span,
                    format!(
                        "node `{}` has no input port `{}`; kind `{}` takes: {}{}",
                        n.name,
                        b.port,
                        kind_of(i),
                        port_list(sig.inputs.iter().map(|p| p.name.as_str())),
                        hint(b.port.as_str(), sig.inputs.iter().map(|p| p.name.as_str()))
                    ),
                );
            }
            match &b.source {
                Source::Input(name) => {
                    if !inputs.contains_key(name) {
                        err(
                            diags,
                            &b.span,
                            format!(
                                "unknown pipeline input `${name}`; pipeline `{}` declares: {}{}",
                                p.name,
                                port_list(p.inputs.iter().map(|i| i.name.as_str())),
                                hint(name.as_str(), p.inputs.iter().map(|i| i.name.as_str()))
                            ),
                        );
                    }
                }
                Source::Node { node, port } => match nodes.get(node.as_str()) {
                    None => err(
                        diags,
                        &b.span,
                        format!(
                            "unknown node `{node}` in `{}`{}",
                            b.source,
                            hint(node.as_str(), p.nodes.iter().map(|n| n.name.as_str()))
                        ),
                    ),
                    Some(&j) => {
                        g.add_edge(idx[j], idx[i], ());
                        if let Some(sj) = sig_of(j)
                            && sj.output(port.as_str()).is_none()
                        {
                            err(diags, &b.span, no_output(&p.nodes[j].name, port, kind_of(j), sj));
                        }
                    }
                },
            }
        }
        if let Some(sig) = sig {
            for required in sig.inputs.iter().filter(|p| !p.optional) {
                let connected = n.inputs.iter().any(|b| b.port.as_str() == required.name)
                    || n.broken.iter().any(|b| b.as_str() == required.name);
                if !connected {
                    err(
                        diags,
                        &n.span,
                        format!("node `{}` does not connect the required input port `{}`", n.name, required.name),
                    );
                }
            }
        }
    }
    for o in &p.outputs {
        let Some((node, port)) = &o.target else { continue };
        match nodes.get(node.as_str()) {
            None => err(
                diags,
                &o.span,
                format!(
                    "output `{}` is bound to unknown node `{node}`{}",
                    o.name,
                    hint(node.as_str(), p.nodes.iter().map(|n| n.name.as_str()))
                ),
            ),
            Some(&j) => {
                if let Some(sj) = sig_of(j)
                    && sj.output(port.as_str()).is_none()
                {
                    err(diags, &o.span, no_output(node, port, kind_of(j), sj));
                }
            }
        }
    }

    // Cycles. The rest of the checks still run on the graph without the edges inside cycles
    // (nodes on a cycle count as reached and as feeding an output: the cycle is their error).
    let mut in_cycle = vec![false; p.nodes.len()];
    for scc in tarjan_scc(&g) {
        let self_loop = scc.len() == 1 && g.contains_edge(scc[0], scc[0]);
        if scc.len() < 2 && !self_loop {
            continue;
        }
        for v in &scc {
            in_cycle[g[*v]] = true;
        }
        let start = *scc.iter().min_by_key(|v| g[**v]).expect("an SCC is never empty");
        let cycle = cycle_through(&g, start, &scc);
        let names: Vec<&str> = cycle.iter().map(|v| p.nodes[g[*v]].name.as_str()).collect();
        err(
            diags,
            &p.nodes[g[start]].span,
            format!("pipeline `{}` has a cycle: {} -> {}", p.name, names.join(" -> "), names[0]),
        );
    }
    let cyclic = in_cycle.contains(&true);
    let mut acyclic = g.clone();
    acyclic.retain_edges(|a, e| {
        let (from, to) = a.edge_endpoints(e).expect("an edge of this graph");
        !(in_cycle[a[from]] && in_cycle[a[to]])
    });

    // Reachability: from inputs forward, and back from outputs.
    let order: Vec<usize> = toposort(&acyclic, None).expect("cycles removed").into_iter().map(|v| acyclic[v]).collect();
    let mut reached = vec![false; p.nodes.len()];
    for &i in &order {
        let n = &p.nodes[i];
        // A broken or dangling reference, or a cycle, was reported already: count it as reached.
        reached[i] = in_cycle[i]
            || !n.broken.is_empty()
            || n.inputs.iter().any(|b| match &b.source {
                Source::Input(_) => true,
                Source::Node { node, .. } => nodes.get(node.as_str()).is_none_or(|&j| reached[j]),
            });
        if !reached[i] {
            err(
                diags,
                &n.span,
                format!("node `{}` is unreachable: none of its inputs comes from the pipeline's inputs", n.name),
            );
        }
    }
    let mut feeds = vec![false; p.nodes.len()];
    for o in &p.outputs {
        if let Some(&j) = o.target.as_ref().and_then(|(n, _)| nodes.get(n.as_str())) {
            feeds[j] = true;
        }
    }
    for &i in order.iter().rev() {
        if !feeds[i] && !in_cycle[i] && !p.outputs.is_empty() {
            let n = &p.nodes[i];
            diags.push(Diagnostic::warning(
                Some(p.file.locate(&n.span)),
                format!("node `{}` does not contribute to any output of pipeline `{}`", n.name, p.name),
            ));
            continue;
        }
        for b in &p.nodes[i].inputs {
            if let Source::Node { node, .. } = &b.source
                && let Some(&j) = nodes.get(node.as_str())
            {
                feeds[j] = true;
            }
        }
    }
    for i in &p.inputs {
        let used = p.nodes.iter().any(|n| n.inputs.iter().any(|b| b.source == Source::Input(i.name.clone())));
        if !used {
            diags.push(Diagnostic::warning(
                Some(p.file.locate(&i.span)),
                format!("input `{}` of pipeline `{}` is not used by any node", i.name, p.name),
            ));
        }
    }

    if cyclic {
        return None;
    }

    // A pipeline with a part that did not parse (reported already) is never built.
    let incomplete = p.nodes.iter().any(|n| n.submodel.is_none() || !n.broken.is_empty())
        || p.inputs.iter().any(|i| i.ty.is_none())
        || p.outputs.iter().any(|o| o.target.is_none());
    if incomplete || diags.iter().filter(|d| d.is_error()).count() > before {
        return None;
    }

    // Types: unify symbolic shapes along every connection, in topological order.
    let mut u = Unifier::default();
    let batch = u.fresh(None);
    let input_scope = usize::MAX;
    let mut errors = Vec::new();
    for &i in &order {
        let n = &p.nodes[i];
        let Some(sig) = sig_of(i) else { continue };
        for b in &n.inputs {
            let Some(want) = sig.input(b.port.as_str()) else { continue };
            let (label, got) = match &b.source {
                Source::Input(name) => {
                    let Some(t) = inputs.get(name).and_then(|inp| inp.ty.as_ref()) else { continue };
                    (format!("${name}"), u.instantiate(t, input_scope, batch))
                }
                Source::Node { node, port } => {
                    let j = nodes[node.as_str()];
                    let Some(t) = sig_of(j).and_then(|s| s.output(port.as_str())) else { continue };
                    (b.source.to_string(), u.instantiate(&t.ty, j, batch))
                }
            };
            let want_t = u.instantiate(&want.ty, i, batch);
            if !u.unify(&got, &want_t) {
                errors.push((
                    b.span.clone(),
                    format!(
                        "`{label}` gives {} but input `{}` of node `{}` expects {}",
                        u.show(&got),
                        b.port,
                        n.name,
                        u.show(&want_t)
                    ),
                ));
            }
        }
    }
    for (span, msg) in errors {
        err(diags, &span, msg);
    }
    if diags.iter().filter(|d| d.is_error()).count() > before {
        return None;
    }

    let outputs = p
        .outputs
        .iter()
        .filter_map(|o| {
            let (node, port) = o.target.clone()?;
            let j = nodes[node.as_str()];
            let ty = sig_of(j).and_then(|s| s.output(port.as_str())).map_or(PortType::Any, |t| {
                let term = u.instantiate(&t.ty, j, batch);
                u.resolve(&term)
            });
            Some(PipelineOutput { name: o.name.clone(), node, port, ty })
        })
        .collect();
    Some(Pipeline {
        name: p.name.clone(),
        inputs: p
            .inputs
            .iter()
            .map(|i| PipelineInput { name: i.name.clone(), ty: i.ty.clone().unwrap_or(PortType::Any) })
            .collect(),
        outputs,
        deadline: p.deadline,
        nodes: order
            .iter()
            .map(|&i| {
                let n = &p.nodes[i];
                Node {
                    name: n.name.clone(),
                    submodel: n.submodel.as_ref().map(|s| s.0.clone()).expect("complete: checked above"),
                    inputs: n.inputs.iter().map(|b| (b.port.clone(), b.source.clone())).collect(),
                }
            })
            .collect(),
    })
}

fn no_output(node: &impl std::fmt::Display, port: &PortName, kind: &str, sig: &Signature) -> String {
    format!(
        "node `{node}` has no output port `{port}`; kind `{kind}` produces: {}{}",
        port_list(sig.outputs.iter().map(|p| p.name.as_str())),
        hint(port.as_str(), sig.outputs.iter().map(|p| p.name.as_str()))
    )
}

/// A shortest cycle through `start` inside its strongly connected component.
fn cycle_through(g: &DiGraph<usize, ()>, start: NodeIndex, scc: &[NodeIndex]) -> Vec<NodeIndex> {
    if g.contains_edge(start, start) {
        return vec![start];
    }
    let inside: HashSet<NodeIndex> = scc.iter().copied().collect();
    let mut prev: HashMap<NodeIndex, NodeIndex> = HashMap::new();
    let mut queue = VecDeque::from([start]);
    while let Some(v) = queue.pop_front() {
        let mut next: Vec<NodeIndex> = g.neighbors(v).filter(|w| inside.contains(w)).collect();
        next.sort_by_key(|w| g[*w]);
        for w in next {
            if w == start {
                let mut path = vec![v];
                while let Some(&u) = prev.get(path.last().expect("non-empty")) {
                    path.push(u);
                }
                path.reverse();
                return path;
            }
            if let std::collections::hash_map::Entry::Vacant(e) = prev.entry(w) {
                e.insert(v);
                queue.push_back(w);
            }
        }
    }
    scc.to_vec()
}

/// A port type with each dimension replaced by a unification variable.
#[derive(Debug, Clone)]
enum Term {
    Any,
    Text,
    Tensor { dtype: crate::signature::DType, dims: Vec<usize>, names: Vec<Dim>, rest: bool },
}

/// Union-find over dimension variables, each class optionally bound to a size.
#[derive(Default)]
struct Unifier {
    parent: Vec<usize>,
    size: Vec<Option<usize>>,
    /// (scope, symbol) -> variable; scope is a node index or the pipeline-input scope.
    symbols: HashMap<(usize, String), usize>,
}

impl Unifier {
    fn fresh(&mut self, size: Option<usize>) -> usize {
        self.parent.push(self.parent.len());
        self.size.push(size);
        self.parent.len() - 1
    }

    fn find(&mut self, mut v: usize) -> usize {
        while self.parent[v] != v {
            self.parent[v] = self.parent[self.parent[v]];
            v = self.parent[v];
        }
        v
    }

    fn instantiate(&mut self, t: &PortType, scope: usize, batch: usize) -> Term {
        match t {
            PortType::Any => Term::Any,
            PortType::Text => Term::Text,
            PortType::Tensor { dtype, shape } => {
                let mut dims = Vec::new();
                let mut names = Vec::new();
                let mut rest = false;
                for d in shape {
                    let v = match d {
                        Dim::Rest => {
                            rest = true;
                            break;
                        }
                        Dim::Fixed(n) => self.fresh(Some(*n)),
                        Dim::Any => self.fresh(None),
                        Dim::Sym(s) if s == BATCH => batch,
                        Dim::Sym(s) => match self.symbols.get(&(scope, s.clone())) {
                            Some(v) => *v,
                            None => {
                                let v = self.fresh(None);
                                self.symbols.insert((scope, s.clone()), v);
                                v
                            }
                        },
                    };
                    dims.push(v);
                    names.push(d.clone());
                }
                Term::Tensor { dtype: *dtype, dims, names, rest }
            }
        }
    }

    fn unify(&mut self, a: &Term, b: &Term) -> bool {
        match (a, b) {
            (Term::Any, _) | (_, Term::Any) | (Term::Text, Term::Text) => true,
            (
                Term::Tensor { dtype: da, dims: xa, rest: ra, .. },
                Term::Tensor { dtype: db, dims: xb, rest: rb, .. },
            ) => {
                if da != db {
                    return false;
                }
                if !ra && !rb && xa.len() != xb.len() {
                    return false;
                }
                if (!ra && xa.len() < xb.len()) || (!rb && xb.len() < xa.len()) {
                    return false;
                }
                for (x, y) in xa.iter().zip(xb) {
                    let (x, y) = (self.find(*x), self.find(*y));
                    if x == y {
                        continue;
                    }
                    match (self.size[x], self.size[y]) {
                        (Some(m), Some(n)) if m != n => return false,
                        (None, Some(n)) => self.size[x] = Some(n),
                        _ => {}
                    }
                    self.parent[y] = x;
                }
                true
            }
            _ => false,
        }
    }

    fn resolve(&mut self, t: &Term) -> PortType {
        match t {
            Term::Any => PortType::Any,
            Term::Text => PortType::Text,
            Term::Tensor { dtype, dims, names, rest } => {
                let mut shape: Vec<Dim> = dims
                    .iter()
                    .zip(names)
                    .map(|(v, name)| {
                        let r = self.find(*v);
                        match (self.size[r], name) {
                            (Some(n), _) => Dim::Fixed(n),
                            (None, d) => d.clone(),
                        }
                    })
                    .collect();
                if *rest {
                    shape.push(Dim::Rest);
                }
                PortType::Tensor { dtype: *dtype, shape }
            }
        }
    }

    fn show(&mut self, t: &Term) -> String {
        self.resolve(t).to_string()
    }
}
