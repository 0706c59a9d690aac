//! Property tests of the checker: whatever the input, no panic; a rejected graph always comes
//! with at least one located error; generated DAGs are accepted and a back edge is a cycle.

use maas_graphs::{Catalog, KindError, PortSpec, Signature, SignatureError, SourceFile, SubmodelSpec, check, ty};
use proptest::prelude::*;

/// A few kinds with the shapes of the built-in ones (the real registry lives in a crate above).
struct Kinds;

impl Catalog for Kinds {
    fn kinds(&self) -> Vec<String> {
        ["identity", "softmax", "argmax", "cosine", "add", "linear"].map(String::from).to_vec()
    }

    fn signature(&self, s: &SubmodelSpec) -> Result<Signature, SignatureError> {
        let sig = |i: Vec<PortSpec>, o: Vec<PortSpec>| Ok(Signature { inputs: i, outputs: o });
        let pair = |out: &str| {
            sig(
                vec![PortSpec::new("a", ty("f32[B,D]")), PortSpec::new("b", ty("f32[B,D]"))],
                vec![PortSpec::new("out", ty(out))],
            )
        };
        match s.kind.as_str() {
            "identity" => sig(vec![PortSpec::new("x", ty("any"))], vec![PortSpec::new("out", ty("any"))]),
            "softmax" => sig(vec![PortSpec::new("x", ty("f32[B,N]"))], vec![PortSpec::new("out", ty("f32[B,N]"))]),
            "argmax" => sig(vec![PortSpec::new("x", ty("f32[B,N]"))], vec![PortSpec::new("out", ty("u32[B]"))]),
            "cosine" => pair("f32[B]"),
            "add" => pair("f32[B,D]"),
            "linear" => {
                let n = |k: &str| s.params.get(k).and_then(|v| v.as_integer()).filter(|n| *n > 0);
                match (n("in"), n("out")) {
                    (Some(i), Some(o)) => sig(
                        vec![PortSpec::new("x", ty(&format!("f32[B,{i}]")))],
                        vec![PortSpec::new("out", ty(&format!("f32[B,{o}]")))],
                    ),
                    _ => Err(SignatureError::Invalid(vec![KindError::at("params", "needs in and out")])),
                }
            }
            _ => Err(SignatureError::UnknownKind),
        }
    }
}

fn fixtures() -> Vec<String> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cases");
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .expect("cases")
        .filter_map(|e| {
            let p = e.ok()?.path();
            (p.extension()? == "toml").then(|| std::fs::read_to_string(p).expect("read"))
        })
        .collect();
    v.sort();
    v
}

/// Checks `text`; asserts the invariants that hold for any input.
fn check_any(text: &str) {
    let lines = text.split('\n').count();
    let result = check(vec![SourceFile::new("fuzz.toml", text, "/nonexistent")], &Kinds);
    match result {
        Ok(c) => assert!(c.warnings.iter().all(|w| !w.is_error())),
        Err(d) => {
            assert!(d.errors().count() > 0, "rejected without an error: {d}");
            for diag in &d.0 {
                if let Some(loc) = &diag.location {
                    assert!(loc.line >= 1 && loc.line <= lines && loc.col >= 1, "bad location {loc} for {lines} lines");
                }
                assert!(!diag.message.is_empty());
            }
        }
    }
}

const SNIPPETS: &[&str] = &[
    "[",
    "]",
    "{",
    "}",
    "=",
    "\"",
    "'",
    ",",
    ".",
    "$",
    "\n",
    "#",
    "[[x]]",
    "nodes",
    "inputs",
    "outputs",
    "submodel",
    "kind",
    "\"$x\"",
    "\"a.out\"",
    "0",
    "-1",
    "99999999999999999999",
    "f32[B,",
    "\u{e9}",
    "[pipelines.p.nodes]",
    "[submodels.s]",
    "x = 1",
    "true",
    "1979-05-27",
    "inf",
    "nan",
];

/// A generated pipeline: node i reads from the pipeline input or from earlier nodes.
struct Dag {
    /// For each node, its sources: 0 = the pipeline input `$x`, j > 0 = node j-1.
    sources: Vec<Vec<usize>>,
}

impl Dag {
    fn node_line(&self, i: usize, sources: &[String]) -> String {
        match sources {
            [a, b] => format!("n{i} = {{ submodel = \"add\", inputs = {{ a = {a}, b = {b} }} }}"),
            _ => format!("n{i} = {{ submodel = \"id\", inputs = {{ x = {} }} }}", sources[0]),
        }
    }

    fn source(j: usize) -> String {
        if j == 0 { "\"$x\"".into() } else { format!("\"n{}.out\"", j - 1) }
    }

    /// The TOML; with `back_edge`, node 0's first input reads from the last node instead.
    fn toml(&self, back_edge: bool) -> String {
        let n = self.sources.len();
        let nodes: Vec<String> = self
            .sources
            .iter()
            .enumerate()
            .map(|(i, srcs)| {
                let mut s: Vec<String> = srcs.iter().map(|&j| Self::source(j)).collect();
                if back_edge && i == 0 {
                    s[0] = Self::source(n);
                }
                self.node_line(i, &s)
            })
            .collect();
        let outputs: Vec<String> = (0..n).map(|i| format!("o{i} = \"n{i}.out\"")).collect();
        format!(
            "[submodels.id]\nkind = \"identity\"\n[submodels.add]\nkind = \"add\"\n\
             [pipelines.p]\ninputs = {{ x = \"f32[B,8]\" }}\noutputs = {{ {} }}\n[pipelines.p.nodes]\n{}\n",
            outputs.join(", "),
            nodes.join("\n")
        )
    }

    /// Whether node `i` reads, directly or not, from node 0.
    fn reads_n0(&self, i: usize) -> bool {
        self.sources[i].iter().any(|&j| j == 1 || (j > 1 && self.reads_n0(j - 1)))
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_text_never_panics(text in "\\PC{0,300}") {
        check_any(&text);
    }

    #[test]
    fn mutated_fixtures_never_panic(
        which in any::<prop::sample::Index>(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), 0usize..4, any::<prop::sample::Index>(), 0usize..40), 1..6),
    ) {
        let all = fixtures();
        let mut text: Vec<char> = which.get(&all).chars().collect();
        for (at, op, snippet, len) in edits {
            let pos = if text.is_empty() { 0 } else { at.index(text.len() + 1) };
            match op {
                0 => { text.drain(pos..(pos + len).min(text.len())); }
                1 => { let s = snippet.get(SNIPPETS); text.splice(pos..pos, s.chars()); }
                2 => {
                    let end = (pos + len).min(text.len());
                    let copy: Vec<char> = text[pos..end].to_vec();
                    text.splice(pos..pos, copy);
                }
                _ => { text.truncate(pos); }
            }
        }
        check_any(&text.into_iter().collect::<String>());
    }

    /// A random DAG is accepted with its nodes in a topological order; pointing node 0 at the
    /// last node is rejected as a cycle exactly when the last node reads from node 0.
    #[test]
    fn generated_dags_are_accepted_and_back_edges_are_cycles(
        picks in prop::collection::vec(prop::collection::vec(any::<prop::sample::Index>(), 1..3), 1..12),
    ) {
        let dag = Dag {
            sources: picks.iter().enumerate().map(|(i, ps)| ps.iter().map(|ix| ix.index(i + 1)).collect()).collect(),
        };
        let n = dag.sources.len();
        let graph = dag.toml(false);
        let checked = match check(vec![SourceFile::new("dag.toml", graph.clone(), ".")], &Kinds) {
            Ok(c) => c,
            Err(e) => panic!("{e}\n{graph}"),
        };
        let p = &checked.graph.pipelines["p"];
        let pos = |name: &str| p.nodes.iter().position(|x| x.name.as_str() == name).expect("node");
        for node in &p.nodes {
            for src in node.inputs.values() {
                if let maas_graphs::Source::Node { node: from, .. } = src {
                    prop_assert!(pos(from.as_str()) < pos(node.name.as_str()));
                }
            }
        }
        if n > 1 {
            let cyclic = dag.toml(true);
            let result = check(vec![SourceFile::new("dag.toml", cyclic.clone(), ".")], &Kinds);
            match (dag.reads_n0(n - 1), result) {
                (true, Err(e)) => {
                    let text = e.to_string();
                    prop_assert!(text.contains("has a cycle: n0 -> "), "{text}");
                    prop_assert!(text.contains(&format!("n{} -> n0", n - 1)), "{text}");
                }
                (true, Ok(_)) => prop_assert!(false, "cycle not found:\n{cyclic}"),
                (false, Err(e)) => prop_assert!(false, "no cycle, yet rejected: {e}\n{cyclic}"),
                (false, Ok(_)) => {}
            }
        }
    }
}
