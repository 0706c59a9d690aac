//! Submodels on other processes: real `maas node` processes on loopback, a serving engine in
//! this process, and the same answers as the single-process pipeline; a node killed under load,
//! restarted, refused for a wrong secret or an oversized frame.

mod common;

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use maas_engine::{Engine, EngineOptions, InferError, SwapRequest};
use maas_kernels::{Value, Values};

const SECRET: &str = "test-cluster-secret";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// A `maas node` process, killed when dropped.
struct NodeProc {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl NodeProc {
    /// Starts a node on `port` (a first start picks another free port if that one was taken
    /// meanwhile; a restart must get its own port back).
    fn start(name: &str, port: u16, secret: &str, dir: &Path, extra: &[&str]) -> Self {
        Self::try_start(name, port, secret, dir, extra)
            .unwrap_or_else(|log| panic!("node {name} did not start:\n{log}"))
    }

    fn start_anywhere(name: &str, secret: &str, dir: &Path, extra: &[&str]) -> Self {
        let mut last = String::new();
        for _ in 0..5 {
            match Self::try_start(name, free_port(), secret, dir, extra) {
                Ok(node) => return node,
                Err(log) => last = log,
            }
        }
        panic!("node {name} did not start:\n{last}");
    }

    fn try_start(name: &str, port: u16, secret: &str, dir: &Path, extra: &[&str]) -> Result<Self, String> {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        let log = dir.join(format!("{name}-{port}-{nanos}.log"));
        let file = std::fs::File::create(&log).expect("log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_maas"));
        cmd.args(["node", "--name", name, "--listen", &format!("127.0.0.1:{port}")])
            .args(["--model-root", root().join("assets").to_str().unwrap()])
            .args(["--model-root", root().join("models").to_str().unwrap()])
            .args(extra)
            .env("MAAS_CLUSTER_SECRET", secret)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file);
        let child = cmd.spawn().expect("spawn maas node");
        let mut node = NodeProc { child, port, log };
        // Listening once it says so (it binds before it prints), unless it exited.
        let until = Instant::now() + Duration::from_secs(30);
        let said = format!("listening on 127.0.0.1:{port}");
        while Instant::now() < until {
            if node.log_text().contains(&said) {
                return Ok(node);
            }
            if let Ok(Some(_)) = node.child.try_wait() {
                return Err(node.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        node.kill();
        Err(format!("no `{said}` within 30 s:\n{}", node.log_text()))
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn kill(&mut self) {
        let _ = self.child.kill(); // SIGKILL
        let _ = self.child.wait();
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits until `count` has grown by `more` (requests served meanwhile), at most 20 s.
async fn served_more(count: &AtomicUsize, more: usize) {
    let target = count.load(Relaxed) + more;
    let until = Instant::now() + Duration::from_secs(20);
    while count.load(Relaxed) < target {
        assert!(Instant::now() < until, "fewer than {more} requests served in 20 s");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn options() -> EngineOptions {
    let mut o = EngineOptions::default();
    o.cluster.secret = Some(SECRET.into());
    o
}

/// The digits graph (paths absolute), with `[nodes]` and placements added.
fn digits_graph(nodes: &[(&str, u16)], features: &str, head: &str) -> String {
    let assets = root().join("assets/digits");
    let mut s = String::new();
    for (name, port) in nodes {
        s += &format!("[nodes.{name}]\naddr = \"127.0.0.1:{port}\"\n\n");
    }
    s += &format!(
        r#"
[submodels.features]
kind = "digits_cnn"
weights = "{f}"
batch = {{ max_size = 64, max_delay_ms = 1 }}
{features}

[submodels.head]
kind = "linear"
weights = "{h}"
{head}

[submodels.probs]
kind = "softmax"

[submodels.label]
kind = "argmax"

[pipelines.classify]
inputs = {{ pixels = "f32[B,64]" }}
outputs = {{ label = "label.out", probs = "probs.out" }}
deadline_ms = 5000

[pipelines.classify.nodes]
features = {{ submodel = "features", inputs = {{ x = "$pixels" }} }}
head = {{ submodel = "head", inputs = {{ x = "features.features" }} }}
probs = {{ submodel = "probs", inputs = {{ x = "head.out" }} }}
label = {{ submodel = "label", inputs = {{ x = "head.out" }} }}
"#,
        f = assets.join("features.safetensors").display(),
        h = assets.join("head.safetensors").display(),
    );
    s
}

async fn engine_of(text: &str) -> Result<Engine, maas_engine::EngineError> {
    let src = maas_graphs::SourceFile::new("cluster.toml", text, root());
    Engine::builder().options(options()).from_sources(vec![src]).await
}

/// The held-out digits rows (pixels 0..16) used across the tests.
fn digits_rows(n: usize) -> Tensor {
    let all = maas::digits::load(&maas::digits::default_path()).expect("digits data");
    let n = n.min(all.len());
    Tensor::from_slice(&all.pixels[..n * maas::digits::PIXELS], (n, maas::digits::PIXELS), &Device::Cpu).expect("rows")
}

fn pixels(t: Tensor) -> Values {
    Values::from([("pixels".to_string(), Value::Tensor(t))])
}

fn labels(v: &Values) -> Vec<u32> {
    v["label"].as_tensor().unwrap().to_vec1::<u32>().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn digits_on_two_nodes_answer_as_the_single_process_pipeline() {
    let dir = common::TempDir::new("cluster-digits");
    let _a = NodeProc::start_anywhere("dga", SECRET, &dir.0, &[]);
    let pa = _a.port;
    let _b = NodeProc::start_anywhere("dgb", SECRET, &dir.0, &[]);
    let pb = _b.port;
    let local = engine_of(&digits_graph(&[], "", "")).await.unwrap();
    let remote =
        engine_of(&digits_graph(&[("dga", pa), ("dgb", pb)], "node = \"dga\"", "node = \"dgb\"")).await.unwrap();
    let x = digits_rows(100);
    let want = local.infer("classify", pixels(x.clone())).await.unwrap();
    let got = remote.infer("classify", pixels(x)).await.unwrap();
    assert_eq!(labels(&got.outputs), labels(&want.outputs));
    let diff = (got.outputs["probs"].as_tensor().unwrap() - want.outputs["probs"].as_tensor().unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff <= 1e-6, "probabilities differ by {diff}");
    assert_eq!(got.versions, want.versions);
    // Where each replica lives is listed.
    let subs = remote.submodels();
    let head = subs.iter().find(|s| s.name == "head").unwrap();
    assert_eq!(head.nodes.len(), 1);
    assert_eq!((head.nodes[0].name.as_str(), head.nodes[0].state.as_str()), ("dgb", "up"));
    assert!(subs.iter().find(|s| s.name == "probs").unwrap().nodes.is_empty());
    assert!(remote.ready());
    // The nodes' own figures (jobs, batches, compute) reach this process and its `/metrics`.
    assert!(
        common::eventually(Duration::from_secs(10), || {
            let m = remote.node_metrics();
            let f = m.iter().find(|m| m.node == "dga" && m.stats.submodel == "features");
            let h = m.iter().find(|m| m.node == "dgb" && m.stats.submodel == "head");
            f.is_some_and(|f| f.stats.jobs_ok >= 1 && f.stats.batch_rows.count >= 1 && f.stats.batch_rows.sum >= 100.0)
                && h.is_some_and(|h| h.stats.jobs_ok >= 1)
        })
        .await,
        "{:?}",
        remote.node_metrics()
    );
    let text = maas::prometheus::render(&remote);
    for want in [
        "maas_node_jobs_total{node=\"dga\",submodel=\"features\",version=\"v1\",outcome=\"ok\"}",
        "maas_node_batch_rows_count{node=\"dgb\",submodel=\"head\",version=\"v1\"}",
        "maas_node_batch_duration_seconds_sum{node=\"dga\",submodel=\"features\",version=\"v1\"}",
    ] {
        assert!(text.contains(want), "no `{want}` in:\n{text}");
    }
    remote.shutdown().await;
    local.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn minilm_embed_with_tokenizer_and_encoder_on_a_node_matches_one_process() {
    let models = root().join("models/all-MiniLM-L6-v2");
    assert!(models.join("model.safetensors").is_file(), "run scripts/fetch-models first");
    let dir = common::TempDir::new("cluster-minilm");
    let _a = NodeProc::start_anywhere("mla", SECRET, &dir.0, &[]);
    let pa = _a.port;
    let text = std::fs::read_to_string(root().join("examples/pipelines/minilm.toml")).unwrap();
    let local_src = maas_graphs::SourceFile::new("minilm.toml", text.clone(), root().join("examples/pipelines"));
    let placed = format!("[nodes.mla]\naddr = \"127.0.0.1:{pa}\"\n\n{text}")
        .replace("[submodels.tokenizer]\n", "[submodels.tokenizer]\nnode = \"mla\"\n")
        .replace("[submodels.encoder]\n", "[submodels.encoder]\nnode = \"mla\"\n");
    let remote_src = maas_graphs::SourceFile::new("minilm-nodes.toml", placed, root().join("examples/pipelines"));
    let local = Engine::builder().options(options()).from_sources(vec![local_src]).await.unwrap();
    let remote = Engine::builder().options(options()).from_sources(vec![remote_src]).await.unwrap();
    let sentences = ["A man is eating food.", "The new movie is awesome", "ünïcode and a much longer sentence here"];
    let input = Values::from([("text".to_string(), Value::text(sentences))]);
    let want = local.infer("embed", input.clone()).await.unwrap();
    let got = remote.infer("embed", input).await.unwrap();
    let (w, g) = (want.outputs["embedding"].as_tensor().unwrap(), got.outputs["embedding"].as_tensor().unwrap());
    assert_eq!(w.dims(), g.dims());
    let diff = (w - g).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(diff <= 1e-6, "embeddings differ by {diff}");
    assert_eq!(remote.submodels().iter().find(|s| s.name == "encoder").unwrap().nodes[0].name, "mla");
    remote.shutdown().await;
    local.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_killed_under_load_fails_only_its_in_flight_requests_and_serves_again_after_restart() {
    let dir = common::TempDir::new("cluster-kill");
    let _a = NodeProc::start_anywhere("kla", SECRET, &dir.0, &[]);
    let pa = _a.port;
    let mut b = NodeProc::start_anywhere("klb", SECRET, &dir.0, &[]);
    let pb = b.port;
    // The head has a replica on each node; the features run here.
    let engine = engine_of(&digits_graph(&[("kla", pa), ("klb", pb)], "", "node = [\"kla\", \"klb\"]")).await.unwrap();
    let x = digits_rows(8);
    let want = labels(&engine.infer("classify", pixels(x.clone())).await.unwrap().outputs);

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    // Failures, each with when it was admitted (relative to the kill) and its kind.
    let failures = Arc::new(std::sync::Mutex::new(Vec::<(Instant, InferError)>::new()));
    let mut callers = Vec::new();
    for _ in 0..16 {
        let (engine, x, want, stop, ok, failures) =
            (engine.clone(), x.clone(), want.clone(), stop.clone(), ok.clone(), failures.clone());
        callers.push(tokio::spawn(async move {
            while !stop.load(Relaxed) {
                let admitted = Instant::now();
                match engine.infer("classify", pixels(x.clone())).await {
                    Ok(r) => {
                        assert_eq!(labels(&r.outputs), want);
                        ok.fetch_add(1, Relaxed);
                    }
                    Err(e) => failures.lock().unwrap().push((admitted, e)),
                }
            }
        }));
    }
    served_more(&ok, 200).await;
    let before_kill = ok.load(Relaxed);
    assert!(before_kill > 0, "no request served before the kill");
    let killed = Instant::now();
    b.kill();
    // Detected within 2 s: the head degrades to one node.
    let detected = loop {
        let head = engine.submodels().into_iter().find(|s| s.name == "head").unwrap();
        if head.state == "degraded" {
            break Instant::now();
        }
        assert!(killed.elapsed() < Duration::from_secs(2), "the kill was not detected within 2 s: {head:?}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    let head = engine.submodels().into_iter().find(|s| s.name == "head").unwrap();
    assert_eq!(head.ready_replicas, 1);
    assert!(head.last_error.as_deref().unwrap_or("").contains("node `klb`"), "{head:?}");
    assert!(engine.ready(), "a degraded submodel still serves");
    // The survivor serves after the detection.
    served_more(&ok, 200).await;

    // Restart b (same name, same address): it rejoins and serves again without any action.
    let _b2 = NodeProc::start("klb", pb, SECRET, &dir.0, &[]);
    let until = Instant::now() + Duration::from_secs(15);
    loop {
        let head = engine.submodels().into_iter().find(|s| s.name == "head").unwrap();
        if head.state == "ready" && head.nodes.iter().all(|n| n.state == "up") {
            break;
        }
        assert!(Instant::now() < until, "node b did not rejoin: {head:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let b_jobs_at_rejoin = engine
        .submodels()
        .into_iter()
        .find(|s| s.name == "head")
        .unwrap()
        .nodes
        .iter()
        .find(|n| n.name == "klb")
        .unwrap()
        .jobs;
    served_more(&ok, 400).await;
    stop.store(true, Relaxed);
    for c in callers {
        c.await.unwrap();
    }
    let failures = std::mem::take(&mut *failures.lock().unwrap());
    for (admitted, e) in failures.iter() {
        assert_eq!(e.kind(), "node_lost", "{e}");
        assert!(*admitted < detected, "a request admitted after the detection failed: {e}");
    }
    // b took jobs again after the rejoin: its replica serves.
    let b_jobs = |engine: &Engine| {
        let head = engine.submodels().into_iter().find(|s| s.name == "head").unwrap();
        head.nodes.iter().find(|n| n.name == "klb").unwrap().jobs
    };
    assert!(b_jobs(&engine) > b_jobs_at_rejoin, "node b served nothing after it rejoined");
    let metrics_ok = ok.load(Relaxed);
    assert!(metrics_ok > before_kill);
    eprintln!("served {metrics_ok}, failed {} (in flight on the killed node)", failures.len());
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rejoined_node_serves_alone_when_the_other_is_gone() {
    // Only b hosts the head: while it is down every request fails fast with `node_lost` (no
    // hang), and once it is back the same engine serves again.
    let dir = common::TempDir::new("cluster-rejoin");
    let mut b = NodeProc::start_anywhere("rjb", SECRET, &dir.0, &[]);
    let pb = b.port;
    let engine = engine_of(&digits_graph(&[("rjb", pb)], "", "node = \"rjb\"")).await.unwrap();
    let x = digits_rows(4);
    engine.infer("classify", pixels(x.clone())).await.unwrap();
    b.kill();
    let until = Instant::now() + Duration::from_secs(2);
    while engine.ready() {
        assert!(Instant::now() < until, "the loss was not detected in 2 s");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let started = Instant::now();
    let e = engine.infer("classify", pixels(x.clone())).await.unwrap_err();
    assert_eq!(e.kind(), "node_lost", "{e}");
    assert!(e.to_string().contains("node `rjb`"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(1), "a request to a lost node must fail fast");
    let _b2 = NodeProc::start("rjb", pb, SECRET, &dir.0, &[]);
    let until = Instant::now() + Duration::from_secs(15);
    while !engine.ready() {
        assert!(Instant::now() < until, "b did not rejoin");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    engine.infer("classify", pixels(x)).await.unwrap();
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wrong_secret_is_refused_and_logged_and_an_oversized_frame_closes_only_that_peer() {
    let dir = common::TempDir::new("cluster-auth");
    let a = NodeProc::start_anywhere("wsa", "another-secret", &dir.0, &["--max-frame", "1MiB"]);
    let pa = a.port;
    let err = engine_of(&digits_graph(&[("wsa", pa)], "", "node = \"wsa\"")).await.err().expect("refused");
    let msg = err.to_string();
    assert!(msg.contains("node `wsa`") && msg.contains("MAAS_CLUSTER_SECRET"), "{msg}");
    let until = Instant::now() + Duration::from_secs(5);
    while !a.log_text().contains("did not authenticate") {
        assert!(Instant::now() < until, "the node did not log the refusal:\n{}", a.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(a);

    // A frame over the node's limit: the node closes that connection and keeps serving.
    let b = NodeProc::start_anywhere("wsb", SECRET, &dir.0, &["--max-frame", "1MiB"]);
    let pb = b.port;
    let mut raw = std::net::TcpStream::connect(("127.0.0.1", pb)).unwrap();
    raw.write_all(&(2u64 << 20).to_be_bytes()).unwrap();
    raw.write_all(&[0u8; 1024]).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 16];
    let n = std::io::Read::read(&mut raw, &mut buf).unwrap_or(0);
    assert_eq!(n, 0, "the node must close a connection that sent an oversized frame");
    let engine = engine_of(&digits_graph(&[("wsb", pb)], "", "node = \"wsb\"")).await.unwrap();
    engine.infer("classify", pixels(digits_rows(4))).await.unwrap();
    // A job over the node's frame limit is refused before it is sent (a frame that large would
    // close the session), and the node serves the next request at once. (The head reads only
    // the features' output, so the graph is at fault, not the caller: `submodel_failed`.)
    let big = Tensor::zeros((8192, 64), candle_core::DType::F32, &Device::Cpu).unwrap();
    let e = engine.infer("classify", pixels(big)).await.unwrap_err();
    assert_eq!(e.kind(), "submodel_failed", "{e}");
    assert!(e.to_string().contains("frame to node `wsb`"), "{e}");
    assert!(engine.ready());
    engine.infer("classify", pixels(digits_rows(4))).await.unwrap();
    engine.shutdown().await;
    drop(b);
}

#[test]
fn a_node_refuses_to_start_without_a_secret_and_validate_names_undeclared_nodes() {
    let out = Command::new(env!("CARGO_BIN_EXE_maas"))
        .args(["node", "--name", "a", "--listen", "127.0.0.1:0"])
        .env_remove("MAAS_CLUSTER_SECRET")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("MAAS_CLUSTER_SECRET"));

    let dir = common::TempDir::new("cluster-validate");
    let file = dir.0.join("placed.toml");
    let text = digits_graph(&[("a", 7101)], "node = \"a\"", "node = [\"a\", \"bb\"]");
    std::fs::write(&file, &text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_maas")).arg("validate").arg(&file).output().unwrap();
    assert!(!out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    let line = text.lines().position(|l| l.contains("\"bb\"")).unwrap() + 1;
    let col = text.lines().nth(line - 1).unwrap().find("\"bb\"").unwrap() + 1;
    let want = format!(
        "placed.toml:{line}:{col}: error: submodel `head` is placed on node `bb`, which no `[nodes.bb]` declares"
    );
    assert!(stdout.contains(&want), "{stdout}\nwanted: {want}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hot_swap_of_a_remote_submodel_under_load_loses_no_request() {
    let dir = common::TempDir::new("cluster-swap");
    let _a = NodeProc::start_anywhere("hsa", SECRET, &dir.0, &[]);
    let pa = _a.port;
    let _b = NodeProc::start_anywhere("hsb", SECRET, &dir.0, &[]);
    let pb = _b.port;
    let engine = engine_of(&digits_graph(&[("hsa", pa), ("hsb", pb)], "node = \"hsa\"", "node = [\"hsa\", \"hsb\"]"))
        .await
        .unwrap();
    let x = digits_rows(8);
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let mut callers = Vec::new();
    for _ in 0..16 {
        let (engine, x, stop, ok) = (engine.clone(), x.clone(), stop.clone(), ok.clone());
        callers.push(tokio::spawn(async move {
            let mut versions = Vec::new();
            while !stop.load(Relaxed) {
                let r = engine.infer("classify", pixels(x.clone())).await.expect("no request fails during a swap");
                versions.push(r.versions["head"].clone());
                ok.fetch_add(1, Relaxed);
            }
            versions
        }));
    }
    served_more(&ok, 200).await;
    let weights = root().join("assets/digits/head.safetensors");
    let swapped = engine
        .swap("head", SwapRequest { weights: Some(weights), version: Some("v2".into()), ..Default::default() })
        .await
        .unwrap();
    assert_eq!(swapped.version, "v2");
    served_more(&ok, 200).await;
    let rolled = engine.rollback("head").await.unwrap();
    assert_eq!(rolled.version, "v1");
    served_more(&ok, 200).await;
    stop.store(true, Relaxed);
    let mut seen = std::collections::BTreeSet::new();
    for c in callers {
        seen.extend(c.await.unwrap());
    }
    assert!(seen.contains("v1") && seen.contains("v2"), "{seen:?}");
    let r = engine.infer("classify", pixels(x)).await.unwrap();
    assert_eq!(r.versions["head"], "v1");
    // The versions that stopped serving stopped on the nodes too (once their last request ended).
    let until = Instant::now() + Duration::from_secs(10);
    let stopped = |node: &NodeProc, version: &str| {
        node.log_text().lines().any(|l| {
            l.contains("instance stopped") && l.contains("submodel=head") && l.contains(&format!("version={version}"))
        })
    };
    while !(stopped(&_a, "v1") && stopped(&_a, "v2") && stopped(&_b, "v1") && stopped(&_b, "v2")) {
        assert!(
            Instant::now() < until,
            "old head instances still run on the nodes:\n{}\n{}",
            _a.log_text(),
            _b.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn remote_versions_survive_a_restart_with_a_state_dir_and_a_recomposition_moves_a_submodel_home() {
    let dir = common::TempDir::new("cluster-state");
    let _b = NodeProc::start_anywhere("sdb", SECRET, &dir.0, &[]);
    let pb = _b.port;
    let text = digits_graph(&[("sdb", pb)], "", "node = \"sdb\"");
    let state = dir.0.join("state");
    let build = |text: String| {
        let state = state.clone();
        async move {
            let mut o = options();
            o.state_dir = Some(state);
            let src = maas_graphs::SourceFile::new("cluster.toml", text, root());
            Engine::builder().options(o).from_sources(vec![src]).await.unwrap()
        }
    };
    let engine = build(text.clone()).await;
    let weights = root().join("assets/digits/head.safetensors");
    engine
        .swap("head", SwapRequest { weights: Some(weights), version: Some("v2".into()), ..Default::default() })
        .await
        .unwrap();
    let x = digits_rows(4);
    let want = labels(&engine.infer("classify", pixels(x.clone())).await.unwrap().outputs);
    engine.shutdown().await;
    drop(engine);

    // A new process would serve the recorded graph: the head, still on node b, at v2.
    let engine = build(text.clone()).await;
    let r = engine.infer("classify", pixels(x.clone())).await.unwrap();
    assert_eq!(r.versions["head"], "v2");
    assert_eq!(labels(&r.outputs), want);
    let head = engine.submodels().into_iter().find(|s| s.name == "head").unwrap();
    assert_eq!(head.nodes.iter().map(|n| n.name.as_str()).collect::<Vec<_>>(), ["sdb"]);
    assert!(maas_graphs::to_toml(&engine.graph()).contains(&format!("addr = \"127.0.0.1:{pb}\"")));

    // Recompose with the head back on the serving process: same answers, no node.
    let home = digits_graph(&[("sdb", pb)], "", "");
    let src = maas_graphs::SourceFile::new("home.toml", home, root());
    let done = engine.recompose(vec![src], false).await.unwrap();
    assert!(done.applied);
    let r = engine.infer("classify", pixels(x)).await.unwrap();
    assert_eq!(labels(&r.outputs), want);
    let head = engine.submodels().into_iter().find(|s| s.name == "head").unwrap();
    assert!(head.nodes.is_empty(), "{head:?}");
    engine.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Training with workers and parameter servers on nodes

/// The digits training graph (paths absolute), with `[nodes]` and the `head` job placed by
/// `placement` (extra job keys).
fn training_graph(nodes: &[(&str, u16)], job: &str, placement: &str, epochs: usize) -> String {
    let mut s = String::new();
    for (name, port) in nodes {
        s += &format!("[nodes.{name}]\naddr = \"127.0.0.1:{port}\"\n\n");
    }
    let (assets, data) = (root().join("assets/digits"), root().join("data/digits.csv.gz"));
    s += &format!(
        r#"
[submodels.features]
kind = "digits_cnn"
weights = "{f}"

[submodels.head]
kind = "linear"
weights = "{h}"

[pipelines.classify]
inputs = {{ pixels = "f32[B,64]" }}
outputs = {{ logits = "head.out" }}

[pipelines.classify.nodes]
features = {{ submodel = "features", inputs = {{ x = "$pixels" }} }}
head = {{ submodel = "head", inputs = {{ x = "features.features" }} }}

[training.{job}]
pipeline = "classify"
learn = ["head"]
init = "random"
loss = {{ output = "head.out" }}
data = {{ path = "{d}", inputs = {{ pixels = "0..64" }}, label = 64 }}
optimizer = {{ kind = "sgd", lr = 0.05, momentum = 0.9 }}
epochs = {epochs}
split_seed = 1797
seed = 7
{placement}
"#,
        f = assets.join("features.safetensors").display(),
        h = assets.join("head.safetensors").display(),
        d = data.display(),
    );
    s
}

/// `maas train FILE --job JOB --out OUT`: its report, or its stderr when it fails.
fn train(file: &Path, job: &str, out: &Path) -> Result<serde_json::Value, String> {
    let o = Command::new(env!("CARGO_BIN_EXE_maas"))
        .arg("train")
        .arg(file)
        .args(["--job", job, "--out"])
        .arg(out)
        .env("MAAS_CLUSTER_SECRET", SECRET)
        .output()
        .expect("maas train");
    if o.status.success() {
        Ok(serde_json::from_slice(&o.stdout).expect("a JSON report"))
    } else {
        Err(String::from_utf8_lossy(&o.stderr).into_owned())
    }
}

/// A sync job whose two workers run on two nodes trains exactly what the same job trains in
/// one process (same parameters, bit for bit: the version is their digest); an async job
/// with its two parameter servers on one node and a worker on another reaches the accuracy.
#[test]
fn training_workers_and_parameter_servers_run_on_nodes() {
    let dir = common::TempDir::new("cluster-train");
    let data = root().join("data");
    let extra = ["--model-root", data.to_str().unwrap()];
    let a = NodeProc::start_anywhere("train-a", SECRET, &dir.0, &extra);
    let b = NodeProc::start_anywhere("train-b", SECRET, &dir.0, &extra);
    let nodes = [("train-a", a.port), ("train-b", b.port)];

    let here = dir.0.join("here.toml");
    std::fs::write(&here, training_graph(&nodes, "head", "workers = 2", 4)).unwrap();
    let expected = train(&here, "head", &dir.0.join("out-here")).unwrap();

    let placed = dir.0.join("placed.toml");
    std::fs::write(
        &placed,
        training_graph(&nodes, "head", "workers = 2\nworker_nodes = [\"train-a\", \"train-b\"]", 4),
    )
    .unwrap();
    let got = train(&placed, "head", &dir.0.join("out-placed")).unwrap();
    assert_eq!(got["version"], expected["version"], "{got}\n{expected}");
    assert_eq!(got["accuracy"], expected["accuracy"]);
    assert!(got["accuracy"].as_f64().unwrap() > 0.95, "{got}");
    for node in [&a, &b] {
        assert!(node.log_text().contains("training actor started") && node.log_text().contains("actor=worker"));
    }

    let async_job = "workers = 2\nworker_nodes = [\"local\", \"train-b\"]\nservers = 2\nserver_nodes = \"train-a\"\nmode = \"async\"\nstaleness = 2\ncompression = \"topk:0.1\"";
    let file = dir.0.join("async.toml");
    std::fs::write(&file, training_graph(&nodes, "head", async_job, 6)).unwrap();
    let got = train(&file, "head", &dir.0.join("out-async")).unwrap();
    assert!(got["accuracy"].as_f64().unwrap() > 0.95, "{got}");
    assert!(got["staleness"]["max"].as_u64().unwrap() <= 2, "{got}");
    assert!(got["bytes_sent"].as_u64().unwrap() * 4 < got["bytes_dense"].as_u64().unwrap(), "{got}");
    assert!(dir.0.join("out-async/head.safetensors").exists());
    assert_eq!(a.log_text().matches("actor=server").count(), 2, "{}", a.log_text());
}

/// A node reads the data itself, from under its model roots: without them the worker is
/// refused, the job says why, nothing is written, and the parameter server it had already
/// started on another node is stopped there.
#[test]
fn a_node_refuses_a_worker_whose_data_lies_outside_its_roots() {
    let dir = common::TempDir::new("cluster-train-roots");
    let data = root().join("data");
    let ps = NodeProc::start_anywhere("train-ps", SECRET, &dir.0, &["--model-root", data.to_str().unwrap()]);
    let a = NodeProc::start_anywhere("train-noroot", SECRET, &dir.0, &[]);
    let placement = "workers = 2\nworker_nodes = [\"local\", \"train-noroot\"]\nserver_nodes = \"train-ps\"";
    let file = dir.0.join("placed.toml");
    std::fs::write(&file, training_graph(&[("train-noroot", a.port), ("train-ps", ps.port)], "head", placement, 2))
        .unwrap();
    let out = dir.0.join("out");
    let err = train(&file, "head", &out).unwrap_err();
    assert!(
        err.contains("worker 1 on node `train-noroot`") && err.contains("outside this node's model roots"),
        "{err}"
    );
    assert!(!out.join("head.safetensors").exists());
    // Stopped by the job, or (the job's process having exited first) by its disconnection.
    let stopped = || {
        let log = ps.log_text();
        log.contains("actor=server 0")
            && (log.contains("training actor stopped") || log.contains("its training actors stop"))
    };
    let until = Instant::now() + Duration::from_secs(10);
    while !stopped() {
        assert!(Instant::now() < until, "{}", ps.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Cancelling a job whose workers all run on nodes stops it promptly (not after its epochs),
/// writes nothing, and stops the workers there.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_with_every_worker_on_nodes_is_cancelled_promptly() {
    use maas_engine::{TrainingOptions, TrainingState};
    let dir = common::TempDir::new("cluster-train-cancel");
    let data = root().join("data");
    let a = NodeProc::start_anywhere("train-cancel", SECRET, &dir.0, &["--model-root", data.to_str().unwrap()]);
    let text =
        training_graph(&[("train-cancel", a.port)], "head", "workers = 2\nworker_nodes = \"train-cancel\"", 100_000);
    let source = maas_graphs::SourceFile::new("train.toml", text.clone(), dir.0.clone());
    let engine = Engine::builder().options(options()).from_sources(vec![source.clone()]).await.unwrap();
    let registry = maas_kernels::Registry::builtin();
    let checked = maas_graphs::check(vec![source.clone()], &registry).unwrap();
    let job = maas_train::job::check(&[source], &checked, &registry).unwrap().remove(0);
    let out = dir.0.join("trained");
    engine.start_training(job, TrainingOptions { out: out.clone(), swap: true }).unwrap();
    assert!(
        common::eventually(Duration::from_secs(60), || engine.training("head").unwrap().epoch >= 1).await,
        "no epoch reported"
    );
    engine.cancel_training("head").unwrap();
    let status = tokio::time::timeout(Duration::from_secs(30), engine.wait_training("head")).await.unwrap().unwrap();
    assert_eq!(status.state, TrainingState::Cancelled, "{status:?}");
    assert!(status.epoch < 100_000);
    assert!(!out.exists());
    assert!(
        common::eventually(Duration::from_secs(10), || a.log_text().matches("training actor stopped").count() == 2)
            .await,
        "{}",
        a.log_text()
    );
    engine.shutdown().await;
}

/// A node killed while it hosts a worker stops the job with a typed error naming the node,
/// promptly, and nothing is written.
#[test]
fn a_node_killed_under_training_stops_the_job_and_nothing_is_written() {
    let dir = common::TempDir::new("cluster-train-kill");
    let data = root().join("data");
    let mut a = NodeProc::start_anywhere("train-kill", SECRET, &dir.0, &["--model-root", data.to_str().unwrap()]);
    let file = dir.0.join("placed.toml");
    std::fs::write(
        &file,
        training_graph(
            &[("train-kill", a.port)],
            "head",
            "workers = 2\nworker_nodes = [\"local\", \"train-kill\"]",
            1000,
        ),
    )
    .unwrap();
    let out = dir.0.join("out");
    let log = dir.0.join("train.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_maas"))
        .arg("train")
        .arg(&file)
        .args(["--job", "head", "--out"])
        .arg(&out)
        .env("MAAS_CLUSTER_SECRET", SECRET)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    // Training (an epoch reported), then the node is killed.
    let until = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(&log).unwrap_or_default().contains("epoch 2/1000") {
        assert!(Instant::now() < until, "no epoch in 60 s: {}", std::fs::read_to_string(&log).unwrap_or_default());
        assert!(child.try_wait().unwrap().is_none(), "{}", std::fs::read_to_string(&log).unwrap_or_default());
        std::thread::sleep(Duration::from_millis(20));
    }
    a.kill();
    // The job ends (it would otherwise run 1000 epochs), failed, naming the node.
    let until = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > until {
            let _ = child.kill();
            panic!("the job did not stop within 30 s of its node's loss");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!status.success(), "{text}");
    assert!(
        text.contains("worker 1 failed") && text.contains("node `train-kill`") && text.contains("was lost"),
        "{text}"
    );
    assert!(!out.join("head.safetensors").exists());
}

/// A serving engine trains a job whose workers run on two nodes (`POST /v1/training/{job}`'s
/// path) and swaps the trained head into the pipeline it serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_engine_trains_on_nodes_and_swaps_in_what_they_trained() {
    use maas_engine::{TrainingOptions, TrainingState};
    let dir = common::TempDir::new("cluster-train-engine");
    let data = root().join("data");
    let extra = ["--model-root", data.to_str().unwrap()];
    let a = NodeProc::start_anywhere("train-engine-a", SECRET, &dir.0, &extra);
    let b = NodeProc::start_anywhere("train-engine-b", SECRET, &dir.0, &extra);
    let nodes = [("train-engine-a", a.port), ("train-engine-b", b.port)];
    let placement =
        "workers = 2\nworker_nodes = [\"train-engine-a\", \"train-engine-b\"]\nserver_nodes = \"train-engine-a\"";
    let text = training_graph(&nodes, "head", placement, 3);
    let mut o = options();
    o.file_roots = Some(vec![root().join("assets"), dir.0.clone()]);
    let source = maas_graphs::SourceFile::new("train.toml", text.clone(), dir.0.clone());
    let engine = Engine::builder().options(o).from_sources(vec![source.clone()]).await.expect("the graph serves");
    let registry = maas_kernels::Registry::builtin();
    let checked = maas_graphs::check(vec![source.clone()], &registry).unwrap();
    let job = maas_train::job::check(&[source], &checked, &registry).unwrap().remove(0);
    assert!(job.is_placed());
    let before = engine.versions("head").unwrap().serving.version.clone();
    let out = dir.0.join("trained");
    engine.start_training(job, TrainingOptions { out: out.clone(), swap: true }).unwrap();
    let status = tokio::time::timeout(Duration::from_secs(120), engine.wait_training("head")).await.unwrap().unwrap();
    assert_eq!(status.state, TrainingState::Succeeded, "{status:?}");
    let report = status.report.expect("a report");
    assert!(report.accuracy > 0.95, "{report:?}");
    let serving = engine.versions("head").unwrap().serving.version.clone();
    assert_ne!(serving, before);
    assert_eq!(serving, report.version);
    for node in [&a, &b] {
        assert!(node.log_text().contains("training actor started"), "{}", node.log_text());
    }
    assert_eq!(a.log_text().matches("actor=server 0").count(), 1);
    // Every epoch reported, the last one included (the server's ranges come from another
    // process than the workers' answers).
    assert_eq!(status.history.iter().map(|p| p.epoch).collect::<Vec<_>>(), [1, 2, 3], "{:?}", status.history);
    // The job over, its actors on the nodes stop (the engine's connection stays open).
    for node in [&a, &b] {
        assert!(
            common::eventually(Duration::from_secs(10), || node.log_text().contains("training actor stopped")).await,
            "{}",
            node.log_text()
        );
    }
    engine.shutdown().await;
}

/// A node that refused an instance (its weights outside that node's roots at the time) starts
/// it on its own once the cause is fixed (the file moved under its root), without
/// reconnecting, and then serves it alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refused_instance_is_started_again_once_its_node_can() {
    let dir = common::TempDir::new("cluster-retry");
    let (data, root_b) = (dir.0.join("data"), dir.0.join("root-b"));
    std::fs::create_dir_all(&data).unwrap();
    std::fs::create_dir_all(&root_b).unwrap();
    let committed = root().join("assets/digits/head.safetensors");
    let head = data.join("head.safetensors");
    std::fs::copy(&committed, &head).unwrap();
    let (data_s, root_b_s) = (data.to_str().unwrap(), root_b.to_str().unwrap());
    let mut a = NodeProc::start_anywhere("rta", SECRET, &dir.0, &["--model-root", data_s, "--model-root", root_b_s]);
    let b = NodeProc::start_anywhere("rtb", SECRET, &dir.0, &["--model-root", root_b_s]);
    let text = digits_graph(&[("rta", a.port), ("rtb", b.port)], "", "node = [\"rta\", \"rtb\"]")
        .replace(committed.to_str().unwrap(), head.to_str().unwrap());
    assert!(text.contains(head.to_str().unwrap()));
    let engine = engine_of(&text).await.unwrap();
    assert!(b.log_text().contains("outside this node's model roots"), "{}", b.log_text());
    assert!(!b.log_text().contains("instance started"));
    // Fixed: the file moved under `b`'s root (its old directory now a link there).
    std::fs::copy(&committed, root_b.join("head.safetensors")).unwrap();
    std::fs::remove_dir_all(&data).unwrap();
    std::os::unix::fs::symlink(&root_b, &data).unwrap();
    assert!(
        common::eventually(Duration::from_secs(20), || b.log_text().contains("instance started")).await,
        "{}",
        b.log_text()
    );
    // `b` alone serves it now.
    a.kill();
    let x = digits_rows(4);
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        match engine.infer("classify", pixels(x.clone())).await {
            Ok(r) => {
                assert_eq!(labels(&r.outputs).len(), 4);
                break;
            }
            Err(e) => assert!(Instant::now() < until, "not served by `rtb` after `rta` was killed: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    engine.shutdown().await;
}

/// A node that stops answering without its connection closing (a frozen process, as a machine
/// gone without a reset looks) is marked lost after its missed health polls, its replicas'
/// work goes to the other node, and it rejoins when it answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_that_stops_answering_is_lost_and_rejoins_when_it_answers() {
    let dir = common::TempDir::new("cluster-frozen");
    let a = NodeProc::start_anywhere("fza", SECRET, &dir.0, &[]);
    let b = NodeProc::start_anywhere("fzb", SECRET, &dir.0, &[]);
    let text = digits_graph(&[("fza", a.port), ("fzb", b.port)], "", "node = [\"fza\", \"fzb\"]");
    let engine = engine_of(&text).await.unwrap();
    let state = |name: &str| engine.nodes().into_iter().find(|n| n.name == name).map(|n| n.state).unwrap_or_default();
    assert_eq!((state("fza").as_str(), state("fzb").as_str()), ("up", "up"));
    let signal = |sig: &str| {
        let ok = Command::new("kill").args([sig, &a.child.id().to_string()]).status().unwrap().success();
        assert!(ok, "kill {sig}");
    };
    signal("-STOP");
    assert!(
        common::eventually(Duration::from_secs(40), || state("fza") != "up").await,
        "a frozen node is still up: {:?}",
        engine.nodes()
    );
    // New requests go to `fzb`.
    for _ in 0..5 {
        let r = engine.infer("classify", pixels(digits_rows(4))).await.expect("served by the node that answers");
        assert_eq!(labels(&r.outputs).len(), 4);
    }
    signal("-CONT");
    assert!(
        common::eventually(Duration::from_secs(20), || state("fza") == "up").await,
        "the node did not rejoin: {:?}",
        engine.nodes()
    );
    engine.shutdown().await;
    drop(b);
}

/// A training message that would not fit the node's frame limit is refused before it is sent,
/// naming its size (sending it would close the session, and with it everything on it).
#[test]
fn a_parameter_range_over_the_nodes_frame_limit_is_refused_with_its_size() {
    let dir = common::TempDir::new("cluster-train-frame");
    let data = root().join("data");
    let small = NodeProc::start_anywhere(
        "train-small",
        SECRET,
        &dir.0,
        &["--model-root", data.to_str().unwrap(), "--max-frame", "64KiB"],
    );
    // Every parameter of the CNN and the head (about 150 KB) on one server on that node.
    let text = training_graph(&[("train-small", small.port)], "all", "server_nodes = \"train-small\"", 1)
        .replace("learn = [\"head\"]", "learn = [\"features\", \"head\"]");
    let file = dir.0.join("placed.toml");
    std::fs::write(&file, text).unwrap();
    let err = train(&file, "all", &dir.0.join("out")).unwrap_err();
    assert!(
        err.contains("server 0 on node `train-small`")
            && err.contains("more than a cluster frame may hold (65536 bytes"),
        "{err}"
    );
    assert!(!small.log_text().contains("training actor started"), "{}", small.log_text());
}
