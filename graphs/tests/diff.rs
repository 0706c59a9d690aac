//! Diffing two graphs: what recomposition will add, remove and change.

use maas_graphs::{Catalog, Graph, PortSpec, Signature, SignatureError, SourceFile, SubmodelSpec, check, ty};

struct Kinds;

impl Catalog for Kinds {
    fn kinds(&self) -> Vec<String> {
        vec!["double".into()]
    }

    fn signature(&self, _: &SubmodelSpec) -> Result<Signature, SignatureError> {
        Ok(Signature {
            inputs: vec![PortSpec::new("x", ty("f32[B,N]"))],
            outputs: vec![PortSpec::new("out", ty("f32[B,N]"))],
        })
    }
}

fn graph(text: &str) -> Graph {
    check(vec![SourceFile::new("g.toml", text, ".")], &Kinds).expect("valid").graph
}

const BASE: &str = r#"
[submodels.a]
kind = "double"
[submodels.b]
kind = "double"
[pipelines.one]
inputs = { x = "f32[B,4]" }
outputs = { y = "n.out" }
nodes.n = { submodel = "a", inputs = { x = "$x" } }
[pipelines.two]
inputs = { x = "f32[B,4]" }
outputs = { y = "n.out" }
nodes.n = { submodel = "b", inputs = { x = "$x" } }
"#;

#[test]
fn identical_graphs_have_an_empty_diff() {
    assert!(graph(BASE).diff(&graph(BASE)).is_empty());
}

#[test]
fn diff_names_added_removed_changed_and_affected() {
    let new = BASE
        .replace("[submodels.b]\nkind = \"double\"", "[submodels.b]\nkind = \"double\"\nversion = \"v2\"")
        .replace("[pipelines.one]", "[pipelines.three]")
        + "[submodels.c]\nkind = \"double\"\n";
    let d = graph(BASE).diff(&graph(&new));
    let names = |v: &[maas_graphs::SubmodelName]| v.iter().map(|n| n.to_string()).collect::<Vec<_>>();
    assert_eq!(names(&d.submodels.added), ["c"]);
    assert_eq!(names(&d.submodels.changed), ["b"]);
    assert!(d.submodels.removed.is_empty());
    let p = |v: &[maas_graphs::PipelineName]| v.iter().map(|n| n.to_string()).collect::<Vec<_>>();
    assert_eq!(p(&d.pipelines.added), ["three"]);
    assert_eq!(p(&d.pipelines.removed), ["one"]);
    assert!(d.pipelines.changed.is_empty());
    // `two` is unchanged itself but runs on the changed submodel `b`.
    assert_eq!(p(&d.affected), ["two"]);
}

#[test]
fn rewiring_a_pipeline_changes_it() {
    let new = BASE.replace("nodes.n = { submodel = \"b\"", "nodes.n = { submodel = \"a\"");
    let d = graph(BASE).diff(&graph(&new));
    assert_eq!(d.pipelines.changed.len(), 1);
    assert_eq!(d.pipelines.changed[0].as_str(), "two");
    assert!(d.submodels.is_empty());
}

#[test]
fn a_graph_written_back_as_toml_is_no_change() {
    // Nodes declared out of alphabetical order, with two valid topological orders.
    let text = r#"
[submodels.a]
kind = "double"
[pipelines.fan]
inputs = { x = "f32[B,4]" }
outputs = { y = "z.out", w = "b.out" }
nodes.z = { submodel = "a", inputs = { x = "$x" } }
nodes.b = { submodel = "a", inputs = { x = "$x" } }
"#;
    let g = graph(text);
    let back = graph(&maas_graphs::to_toml(&g));
    assert!(g.diff(&back).is_empty(), "{:?}", g.diff(&back));
    let rewired = graph(&text.replace(
        "nodes.b = { submodel = \"a\", inputs = { x = \"$x\" } }",
        "nodes.b = { submodel = \"a\", inputs = { x = \"z.out\" } }",
    ));
    assert_eq!(g.diff(&rewired).pipelines.changed.len(), 1);
}

#[test]
fn moving_a_node_to_another_address_changes_the_submodels_placed_on_it() {
    let placed = |addr: &str| {
        format!(
            "[nodes.n1]\naddr = \"{addr}\"\n{}",
            BASE.replacen("kind = \"double\"", "kind = \"double\"\nnode = \"n1\"", 1)
        )
    };
    let old = graph(&placed("127.0.0.1:7101"));
    assert!(old.diff(&graph(&placed("127.0.0.1:7101"))).is_empty());
    let d = old.diff(&graph(&placed("127.0.0.1:7102")));
    assert_eq!(d.submodels.changed.iter().map(|s| s.as_str()).collect::<Vec<_>>(), ["a"]);
    assert_eq!(d.affected.iter().map(|p| p.as_str()).collect::<Vec<_>>(), ["one"]);
    // And a submodel moved home is changed too.
    let d = old.diff(&graph(&format!("[nodes.n1]\naddr = \"127.0.0.1:7101\"\n{BASE}")));
    assert_eq!(d.submodels.changed.iter().map(|s| s.as_str()).collect::<Vec<_>>(), ["a"]);
    // The graph round-trips through TOML with its nodes and placements.
    let text = maas_graphs::to_toml(&old);
    assert_eq!(graph(&text), old);
}
