//! The README's library quick start: it is `examples/quickstart.rs` verbatim (so `cargo test`
//! compiles it), its dependency lines name every crate it uses, and it runs.

use maas_engine::Engine;

#[path = "../examples/quickstart.rs"]
#[allow(dead_code, unreachable_pub)] // the example's own `main`; `pub` for this test
mod quickstart;

const README: &str = include_str!("../README.md");
const EXAMPLE: &str = include_str!("../examples/quickstart.rs");
const MANIFEST: &str = include_str!("../Cargo.toml");

/// The code blocks of the README's "Using maas as a library" section, by fence language.
fn library_section_blocks() -> Vec<(String, String)> {
    let section = README.split("\n## Using maas as a library\n").nth(1).expect("README has the library section");
    let section = section.split("\n## ").next().unwrap_or(section);
    let mut blocks = Vec::new();
    let mut rest = section;
    while let Some(start) = rest.find("```") {
        let after = &rest[start + 3..];
        let (lang, body) = after.split_once('\n').expect("a fence line");
        let end = body.find("\n```").expect("a closing fence");
        blocks.push((lang.trim().to_string(), body[..=end].to_string()));
        rest = &body[end + 4..];
    }
    blocks
}

#[test]
fn readme_quick_start_is_the_example_verbatim() {
    let blocks = library_section_blocks();
    let rust: Vec<&String> = blocks.iter().filter(|(lang, _)| lang == "rust").map(|(_, b)| b).collect();
    assert_eq!(rust.len(), 1, "one rust block in the library section: {blocks:?}");
    assert_eq!(rust[0].as_str(), EXAMPLE, "README's quick start differs from examples/quickstart.rs");
}

#[test]
fn readme_quick_start_lists_its_dependencies() {
    let blocks = library_section_blocks();
    let toml = blocks.iter().find(|(lang, _)| lang == "toml").map(|(_, b)| b.as_str()).expect("a toml block");
    assert!(toml.starts_with("[dependencies]\n"), "{toml}");
    let deps: toml::Table = toml::from_str::<toml::Table>(toml).expect("the dependency lines are TOML")["dependencies"]
        .as_table()
        .expect("a [dependencies] table")
        .clone();
    // Every crate the example names.
    for krate in ["maas", "anyhow", "candle-core", "tokio"] {
        assert!(EXAMPLE.contains(&format!("{}::", krate.replace('-', "_"))), "the example uses {krate}");
        assert!(deps.contains_key(krate), "README's dependencies lack {krate}: {toml}");
    }
    assert!(deps["maas"].get("path").or(deps["maas"].get("git")).is_some(), "maas is not published: {toml}");
    // `#[tokio::main]` on a multi-threaded runtime.
    let features = deps["tokio"]["features"].as_array().expect("tokio features");
    for f in ["macros", "rt-multi-thread"] {
        assert!(features.iter().any(|x| x.as_str() == Some(f)), "tokio needs feature {f}: {toml}");
    }
    // The same candle as maas (tensors cross the API).
    let candle = MANIFEST.lines().find(|l| l.starts_with("candle-core = ")).expect("the workspace's candle-core");
    assert!(toml.lines().any(|l| l == candle), "README's candle-core differs from the workspace's `{candle}`");
}

#[tokio::test]
async fn quickstart_classifies_its_digit() {
    // The example's default graph, relative to the working directory (the package root here).
    let engine = Engine::from_files(&["examples/pipelines/digits.toml"]).await.expect("the digits graph loads");
    let (label, p) = quickstart::classify(&engine, &quickstart::THREE).await.expect("classify");
    assert_eq!(label, 3);
    assert!(p > 0.5 && p <= 1.0, "p = {p}");
    assert_eq!(engine.versions("head").expect("head is served").serving.version, "v1");
    assert!(engine.versions("nope").is_none());
    engine.shutdown().await;
}
