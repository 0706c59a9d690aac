//! maas as NVIDIA's own client sees it: `tests/clients/v2_check.py`, run with the real Python
//! `tritonclient` (HTTP and gRPC) that `scripts/client-env` installs into `.venv-clients`,
//! against the Open Inference Protocol (KServe v2) on maas's one address: the `/v2` routes and
//! the gRPC service `inference.GRPCInferenceService` (HTTP/2 cleartext, same port).
//!
//! The script compares every v2 answer with maas's own JSON API on the same server; what it
//! checks is listed in its docstring. A missing `.venv-clients` fails these tests (run
//! `scripts/client-env`; `scripts/test` does), it never skips them.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use maas::http::HttpConfig;
use maas_engine::{EngineOptions, RestartPolicy};
use maas_graphs::{KindError, PortSpec, Signature, SourceFile, SubmodelSpec, ty};
use maas_kernels::{Kernel, Kind, Value, Values};

mod common;
use common::{ServeProcess, eventually, serve};

const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// The most time one run of the script may take before it is killed.
const SCRIPT_LIMIT: Duration = Duration::from_secs(300);

/// Runs `v2_check.py ARGS` with the client venv's python: its stdout when it exits 0, otherwise
/// why not, with everything it printed.
fn v2_check(args: &[&str]) -> Result<String, String> {
    let python = Path::new(REPO).join(".venv-clients/bin/python");
    assert!(
        python.is_file(),
        "{} is missing: run scripts/client-env (scripts/test runs it) to install the Python Triton client",
        python.display()
    );
    let mut child = Command::new(&python)
        .arg(Path::new(REPO).join("tests/clients/v2_check.py"))
        .args(args)
        .current_dir(REPO)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("start {}: {e}", python.display()));
    // Read both pipes on threads, so a chatty failure never blocks the script on a full pipe.
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        })
    };
    let stdout = drain(Box::new(child.stdout.take().expect("stdout piped")));
    let stderr = drain(Box::new(child.stderr.take().expect("stderr piped")));
    let end = Instant::now() + SCRIPT_LIMIT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break Some(status);
        }
        if Instant::now() >= end {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let (out, err) = (stdout.join().expect("stdout reader"), stderr.join().expect("stderr reader"));
    match status {
        Some(s) if s.success() && out.contains("v2_check: ") => Ok(out),
        _ => {
            let how = status
                .map_or_else(|| format!("ran past {SCRIPT_LIMIT:?} and was killed"), |s| format!("ended with {s}"));
            Err(format!("v2_check.py {args:?} {how}\n--- its stdout:\n{out}\n--- its stderr:\n{err}"))
        }
    }
}

/// The pipelines `addr` serves, from maas's own `GET /v1/pipelines`.
fn served_pipelines(addr: &str) -> Vec<String> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let c = reqwest::Client::builder().timeout(Duration::from_secs(20)).build().unwrap();
        let r = c.get(format!("http://{addr}/v1/pipelines")).send().await.expect("GET /v1/pipelines");
        assert_eq!(r.status().as_u16(), 200);
        let body: serde_json::Value = r.json().await.unwrap();
        let list = body["pipelines"].as_array().unwrap_or_else(|| panic!("no pipelines: {body}"));
        list.iter().map(|p| p["name"].as_str().unwrap_or_default().to_string()).collect()
    })
}

#[test]
fn tritonclient_drives_the_default_pipelines_over_http_and_grpc() {
    let minilm = Path::new(REPO).join("models/all-MiniLM-L6-v2");
    assert!(
        ["model.safetensors", "config.json", "tokenizer.json"].iter().all(|f| minilm.join(f).is_file()),
        "{} is incomplete: run scripts/fetch-models (scripts/test runs it)",
        minilm.display()
    );
    // `maas serve` in the repository root: the default graph, with MiniLM from ./models.
    let server = ServeProcess::spawn(&[], Path::new(REPO), None).unwrap_or_else(|e| panic!("{e}"));
    let served = served_pipelines(&server.addr);
    assert!(served.iter().any(|p| p == "classify") && served.iter().any(|p| p == "embed"), "serves {served:?}");
    if let Err(e) = v2_check(&["--url", &server.addr, "--checks", "main"]) {
        let log: Vec<String> = server.lines.try_iter().collect();
        panic!("{e}\n--- maas serve's stderr:\n{}", log.join("\n"));
    }
}

/// `x` f32[B,N] -> `out`, but its forward panics on every batch.
struct Boom;

impl Kind for Boom {
    fn name(&self) -> &str {
        "boom"
    }

    /// The synthetic warm-up row would panic while loading; requests fail it instead.
    fn warm_up(&self) -> bool {
        false
    }

    fn signature(&self, _: &SubmodelSpec) -> Result<Signature, Vec<KindError>> {
        Ok(Signature {
            inputs: vec![PortSpec::new("x", ty("f32[B,N]"))],
            outputs: vec![PortSpec::new("out", ty("f32[B,N]"))],
        })
    }

    fn load(&self, _: &SubmodelSpec, _: &Device) -> maas_kernels::Result<Arc<dyn Kernel>> {
        Ok(Arc::new(Boom))
    }
}

impl Kernel for Boom {
    fn forward(&self, _: &Values) -> maas_kernels::Result<Values> {
        panic!("boom: this test kernel panics on every batch");
    }
}

const BROKEN: &str = r#"
[submodels.boom]
kind = "boom"

[pipelines.broken]
inputs = { x = "f32[B,2]" }
outputs = { y = "n.out" }
nodes.n = { submodel = "boom", inputs = { x = "$x" } }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tritonclient_sees_a_failed_submodel_as_not_ready() {
    // One restart allowed in a window far longer than the test: once given up, it stays failed.
    let restart = RestartPolicy {
        max_restarts: 1,
        window: Duration::from_secs(3600),
        backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(1),
    };
    let engine = maas_engine::Engine::builder()
        .register(Boom)
        .options(EngineOptions { restart, ..EngineOptions::default() })
        .from_sources(vec![SourceFile::new("broken.toml", BROKEN, ".")])
        .await
        .expect("engine starts");
    assert!(engine.ready(), "{:?}", engine.submodels());
    let server = serve(engine, HttpConfig::default()).await;
    let engine = &server.engine;
    let failed = || engine.submodels().iter().any(|s| s.name == "boom" && s.state == "failed");
    // Each request panics the stream (its job is retried alone on the restarted replica and
    // panics again) until the restart budget is spent and the submodel is given up.
    for _ in 0..5 {
        if failed() {
            break;
        }
        let x = Tensor::new(&[[1f32, 2.0]], &Device::Cpu).unwrap();
        let r = tokio::time::timeout(
            Duration::from_secs(20),
            engine.infer("broken", Values::from([("x".to_string(), Value::Tensor(x))])),
        )
        .await
        .expect("a request to a panicking submodel ends");
        assert!(r.is_err(), "a panicking submodel answered");
        // Before the next request: the replica is back, or given up.
        assert!(
            eventually(Duration::from_secs(10), || failed() || engine.submodels()[0].ready_replicas == 1).await,
            "{:?}",
            engine.submodels()
        );
    }
    assert!(eventually(Duration::from_secs(10), failed).await, "never failed: {:?}", engine.submodels());
    assert!(!engine.ready());

    let addr = server.addr.to_string();
    let run =
        tokio::task::spawn_blocking(move || v2_check(&["--url", &addr, "--checks", "failed", "--model", "broken"]))
            .await
            .expect("v2_check thread");
    if let Err(e) = run {
        panic!("{e}\n--- submodels: {:?}", engine.submodels());
    }
    server.shut().await;
}
