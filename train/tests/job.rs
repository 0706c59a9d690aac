//! `[training.NAME]` sections checked against the digits graph and the built-in kinds.

use std::path::PathBuf;

use maas_graphs::SourceFile;
use maas_kernels::Registry;
use maas_train::compress::Compression;
use maas_train::job::{self, Init, Mode};
use maas_train::optim::Optimizer;

fn pipelines_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/pipelines")
}

/// digits.toml with `extra` appended, as one source in examples/pipelines.
fn check(extra: &str) -> Result<Vec<job::Job>, String> {
    let graph = std::fs::read_to_string(pipelines_dir().join("digits.toml")).expect("digits.toml");
    let text = format!(
        "{graph}\n[submodels.q]\nkind = \"linear\"\nparams = {{ in = 64, out = 10, seed = 1, quantize = \"q8_0\" }}\n{extra}"
    );
    let source = SourceFile::new("train.toml", text, pipelines_dir());
    let registry = Registry::builtin();
    let checked = maas_graphs::check(vec![source.clone()], &registry).map_err(|d| format!("graph: {d}"))?;
    job::check(&[source], &checked, &registry).map_err(|d| d.to_string())
}

const HEAD: &str = r#"
[training.head]
pipeline = "classify"
learn = ["head"]
loss = { output = "head.out" }
data = { path = "../../data/digits.csv.gz", inputs = { pixels = "0..64" }, label = 64 }
optimizer = { kind = "sgd", lr = 0.05, momentum = 0.9 }
epochs = 5
workers = 2
servers = 2
mode = "async"
staleness = 1
compression = "topk:0.01"
split_seed = 1797
seed = 7
min_accuracy = 0.97
"#;

#[test]
fn a_job_is_read_with_its_settings() {
    let jobs = check(HEAD).unwrap();
    assert_eq!(jobs.len(), 1);
    let j = &jobs[0];
    assert_eq!((j.name.as_str(), j.pipeline.as_str()), ("head", "classify"));
    assert_eq!(j.learn.iter().map(|s| s.as_str()).collect::<Vec<_>>(), ["head"]);
    assert_eq!((j.loss.node.as_str(), j.loss.port.as_str(), j.loss.classes), ("head", "out", 10));
    assert!(j.data.path.ends_with("data/digits.csv.gz"));
    assert_eq!(j.data.columns.inputs[0].1.0, 0..64);
    assert_eq!((j.data.columns.label, j.data.columns.classes), (64, 10));
    assert_eq!(j.optimizer, Optimizer::Sgd { lr: 0.05, momentum: 0.9, weight_decay: 0.0 });
    assert_eq!((j.epochs, j.batch_size, j.workers, j.servers, j.staleness), (5, 32, 2, 2, 1));
    assert_eq!((j.mode, j.init, j.compression), (Mode::Async, Init::Weights, Compression::TopK { density: 0.01 }));
    assert_eq!((j.split_seed, j.seed, j.error_feedback, j.min_accuracy), (1797, 7, true, Some(0.97)));
    assert_eq!(j.lr_decay_to, 1.0, "constant by default");
    // The data the job names loads with its columns.
    let table = maas_train::data::load(&j.data.path, &j.data.columns).unwrap();
    assert_eq!(table.rows(), 1797);
}

#[test]
fn graph_files_with_training_jobs_still_check_as_graphs() {
    let graph = std::fs::read_to_string(pipelines_dir().join("digits.toml")).unwrap();
    let source = SourceFile::new("train.toml", format!("{graph}\n{HEAD}"), pipelines_dir());
    assert!(maas_graphs::check(vec![source], &Registry::builtin()).is_ok());
}

/// Each mistake is reported at the line and column of the value at fault.
#[test]
fn every_mistake_is_located_and_named() {
    let cases: &[(&str, &str, &str)] = &[
        ("pipeline = \"classify\"", "pipeline = \"clasify\"", "unknown pipeline `clasify`; did you mean `classify`?"),
        ("learn = [\"head\"]", "learn = [\"haed\"]", "unknown submodel `haed`; did you mean `head`?"),
        ("learn = [\"head\"]", "learn = [\"q\"]", "submodel `q` is not used by pipeline `classify`"),
        ("learn = [\"head\"]", "learn = []", "`learn` names no submodel"),
        ("loss = { output = \"head.out\" }", "loss = { output = \"head\" }", "loss output `head` is not `node.port`"),
        (
            "loss = { output = \"head.out\" }",
            "loss = { output = \"label.out\" }",
            "loss output `label.out` is u32[B]; cross-entropy needs logits f32[B,C]",
        ),
        (
            "loss = { output = \"head.out\" }",
            "loss = { output = \"head.logits\" }",
            "node `head` has no output port `logits`",
        ),
        ("loss = { output = \"head.out\" }", "loss = { output = \"head.out\", kind = \"mse\" }", "unknown loss `mse`"),
        (
            "inputs = { pixels = \"0..64\" }",
            "inputs = { pixels = \"0..63\" }",
            "columns 0..63 are 63 values per row, but the pipeline input is f32[B,64]",
        ),
        (
            "inputs = { pixels = \"0..64\" }",
            "inputs = { pixel = \"0..64\" }",
            "pipeline `classify` has no input `pixel`",
        ),
        ("../../data/digits.csv.gz", "../../data/nope.csv", "nope.csv` does not exist"),
        (
            "kind = \"sgd\", lr = 0.05, momentum = 0.9",
            "kind = \"sgd\", lr = 0.05, momentum = 1.5",
            "optimizer: `momentum` must be in [0, 1)",
        ),
        ("kind = \"sgd\", lr = 0.05, momentum = 0.9", "kind = \"adam\"", "unknown optimizer `adam`"),
        ("epochs = 5", "epochs = 0", "`epochs` must be at least 1, got 0"),
        ("mode = \"async\"", "mode = \"gossip\"", "unknown mode `gossip`"),
        ("compression = \"topk:0.01\"", "compression = \"topk:2\"", "unknown compression `topk:2`"),
        ("min_accuracy = 0.97", "min_accuracy = 97", "`min_accuracy` is a fraction"),
        ("seed = 7", "seed = 7\nlearning_rate = 1", "unknown field `learning_rate`"),
        ("seed = 7", "seed = 7\nlr_decay_to = 0.0", "`lr_decay_to` is a fraction of `lr`"),
        (
            "seed = 7",
            "seed = 7\nworker_nodes = [\"local\", \"gpu1\"]",
            "`worker_nodes` names undeclared node `gpu1` (declare it with `[nodes.NAME]",
        ),
        ("seed = 7", "seed = 7\nserver_nodes = \"ps\"", "`server_nodes` names undeclared node `ps`"),
        ("seed = 7", "seed = 7\nserver_nodes = []", "`server_nodes` names no node"),
        ("seed = 7", "seed = 7\nworker_nodes = 2", "a node name (\"a\") or a list of node names"),
    ];
    for (from, to, want) in cases {
        assert!(HEAD.contains(from), "{from}");
        let text = HEAD.replace(from, to);
        let err = check(&text).map(|_| ()).expect_err(to);
        assert!(err.contains(want), "{to}: `{want}` not in:\n{err}");
        // Located: `train.toml:LINE:COL:` on the line of the value at fault (the graph's own
        // lines come first, so any line of the job is past them).
        let at = err.split(": ").next().unwrap_or_default();
        let mut parts = at.split(':');
        assert_eq!(parts.next(), Some("train.toml"), "{err}");
        let line: usize = parts.next().and_then(|l| l.parse().ok()).unwrap_or_else(|| panic!("no line in {err}"));
        assert!(line > 25, "{to}: line {line} is not in the job:\n{err}");
    }
}

/// `worker_nodes` and `server_nodes` place workers and servers round robin over declared nodes
/// (`local`: the process that runs the job); a misspelt node is a located did-you-mean.
#[test]
fn workers_and_servers_are_placed_on_declared_nodes() {
    let nodes = "[nodes.gpu1]\naddr = \"127.0.0.1:7101\"\n[nodes.gpu2]\naddr = \"127.0.0.1:7102\"\n";
    let placed = HEAD.replace("seed = 7", "seed = 7\nworker_nodes = [\"local\", \"gpu1\"]\nserver_nodes = \"gpu2\"");
    let j = check(&format!("{nodes}{placed}")).unwrap().remove(0);
    assert_eq!((j.worker_node(0), j.worker_node(1), j.worker_node(2)), (None, Some("gpu1"), None));
    assert_eq!((j.server_node(0), j.server_node(1)), (Some("gpu2"), Some("gpu2")));
    assert!(j.is_placed());
    // A job sent to a node arrives as it left.
    let back: job::Job = serde_json::from_str(&serde_json::to_string(&j).unwrap()).unwrap();
    assert_eq!(
        (back.worker_nodes, back.server_nodes, back.optimizer),
        (j.worker_nodes.clone(), j.server_nodes, j.optimizer)
    );
    // Unplaced, or only `local`: nothing leaves the process.
    assert!(!check(HEAD).unwrap()[0].is_placed());
    let local = HEAD.replace("seed = 7", "seed = 7\nworker_nodes = \"local\"");
    assert!(!check(&local).unwrap()[0].is_placed());
    let typo = HEAD.replace("seed = 7", "seed = 7\nworker_nodes = [\"gpu3\"]");
    let err = check(&format!("{nodes}{typo}")).unwrap_err();
    assert!(err.contains("undeclared node `gpu3`; did you mean `gpu1`?") && err.starts_with("train.toml:"), "{err}");
}

#[test]
fn kinds_that_cannot_learn_say_why() {
    // A quantized `linear` (the `q` submodel) in a pipeline of its own.
    let text = HEAD
        .replace("learn = [\"head\"]", "learn = [\"q\"]")
        .replace("pipeline = \"classify\"", "pipeline = \"qclassify\"")
        .replace("loss = { output = \"head.out\" }", "loss = { output = \"qhead.out\" }");
    let extra = format!(
        "{text}\n[pipelines.qclassify]\ninputs = {{ pixels = \"f32[B,64]\" }}\noutputs = {{ out = \"qhead.out\" }}\n[pipelines.qclassify.nodes]\nqhead = {{ submodel = \"q\", inputs = {{ x = \"$pixels\" }} }}\n"
    );
    let err = check(&extra).map(|_| ()).expect_err("a quantized linear cannot learn");
    assert!(err.contains("submodel `q` cannot learn: a quantized `linear` (q8_0) cannot learn"), "{err}");
    let ok = check(&HEAD.replace("learn = [\"head\"]", "learn = [\"features\", \"head\"]")).unwrap();
    assert_eq!(ok[0].learn.len(), 2);
}
