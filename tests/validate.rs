//! `maas validate` on the graph fixtures and the example graphs.
//!
//! Every `graphs/tests/cases/{valid,invalid}-*.toml` is validated by the real binary, from the
//! cases directory; its stderr must equal the `.stderr` file beside it, line for line (file,
//! line, column and message), and its exit code must be 0 for `valid-*` and 1 for `invalid-*`.
//! Run with `UPDATE_EXPECT=1` to rewrite the `.stderr` files after a deliberate change, then
//! review the diff.

use std::path::{Path, PathBuf};
use std::process::Command;

fn cases_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("graphs/tests/cases")
}

fn maas(args: &[&str], dir: &Path) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_maas"))
        .args(args)
        .current_dir(dir)
        .env_remove("RUST_LOG")
        .output()
        .expect("run maas");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn fixtures_give_exactly_the_expected_diagnostics() {
    let dir = cases_dir();
    let mut cases: Vec<String> = std::fs::read_dir(&dir)
        .expect("cases dir")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".toml"))
        .collect();
    cases.sort();
    assert!(cases.iter().filter(|c| c.starts_with("invalid-")).count() >= 10, "fixtures missing: {cases:?}");
    assert!(cases.iter().any(|c| c.starts_with("valid-")));
    let update = std::env::var_os("UPDATE_EXPECT").is_some();
    let mut failures = Vec::new();
    for case in &cases {
        let (code, stdout, stderr) = maas(&["validate", case], &dir);
        let want_code = if case.starts_with("valid-") { 0 } else { 1 };
        let expected_path = dir.join(case.replace(".toml", ".stderr"));
        if update {
            std::fs::write(&expected_path, &stderr).expect("write expectation");
        }
        let expected =
            std::fs::read_to_string(&expected_path).unwrap_or_else(|_| panic!("missing {}", expected_path.display()));
        if code != want_code {
            failures.push(format!("{case}: exit code {code}, expected {want_code}\n{stderr}"));
        }
        if !stdout.is_empty() {
            failures.push(format!("{case}: validate wrote to stdout: {stdout}"));
        }
        if stderr != expected {
            failures.push(format!("{case}: diagnostics differ\n--- expected\n{expected}--- got\n{stderr}"));
        }
        if case.starts_with("invalid-") && !stderr.lines().any(|l| l.contains(": error: ")) {
            failures.push(format!("{case}: no error line"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn every_example_graph_validates_with_the_stock_binary() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut n = 0;
    let entries = ["examples/pipelines", "examples/training"]
        .iter()
        .flat_map(|d| std::fs::read_dir(root.join(d)).unwrap_or_else(|e| panic!("{d}: {e}")));
    for entry in entries {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "toml") {
            let (code, _, stderr) = maas(&["validate", path.to_str().expect("utf-8 path")], root);
            assert_eq!(code, 0, "{} does not validate:\n{stderr}", path.display());
            assert!(!stderr.contains("warning"), "{} has warnings:\n{stderr}", path.display());
            n += 1;
        }
    }
    assert!(n >= 3, "expected the example graphs, found {n}");
}

#[test]
fn several_files_share_one_namespace() {
    let dir = cases_dir();
    let (code, _, stderr) = maas(&["validate", "valid-minimal.toml", "valid-minimal.toml"], &dir);
    assert_eq!(code, 1);
    assert!(
        stderr.contains(
            "valid-minimal.toml:1:12: error: submodel `id` is defined twice (first at valid-minimal.toml:1:12)"
        ),
        "{stderr}"
    );
    assert!(stderr.contains("error: pipeline `echo` is defined twice"), "{stderr}");
    let (code, _, stderr) = maas(&["validate", "no-such-file.toml"], &dir);
    assert_eq!(code, 1);
    assert!(stderr.starts_with("error: no-such-file.toml: cannot read:"), "{stderr}");
}

#[test]
fn graph_prints_dot_on_stdout_only() {
    let dir = cases_dir();
    let (code, stdout, stderr) = maas(&["graph", "valid-shared.toml", "--pipeline", "classify"], &dir);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.starts_with("digraph \"classify\" {"), "{stdout}");
    for needle in [
        "label = \"trunk\\nsubmodel: trunk\\nkind: mlp\", shape = box",
        "label = \"$x\\nf32[B,64]\", shape = ellipse",
        "label = \"top\\nu32[B,3]\"",
        "label = \"out -> a\"",
        "label = \"indices\"",
    ] {
        assert!(stdout.contains(needle), "missing {needle} in\n{stdout}");
    }
    // Every edge of the DAG is drawn: 1 input + 6 node inputs + 3 outputs.
    assert_eq!(stdout.matches(" -> ").count() - stdout.matches("label = \"out -> ").count(), 10, "{stdout}");
    let (code, stdout, stderr) = maas(&["graph", "valid-shared.toml", "--pipeline", "nope"], &dir);
    assert_eq!(code, 1);
    assert!(stdout.is_empty());
    assert!(stderr.contains("no pipeline `nope`"), "{stderr}");
}
