//! Loading can never take the process down: a submodel too large for memory is refused from its
//! estimate (422 `too_large` over HTTP, `EngineError::TooLarge` at build) before anything is
//! allocated, and the graph that served keeps serving; a FIFO given as a file is reported as
//! what it is.
//!
//! A regression here would abort the process (an allocation failure cannot be caught), so the
//! HTTP cases run the real `maas serve` binary, where an abort is a dead server, and the
//! in-process cases run in a child process of this test binary ([`isolated`]), where an abort
//! fails one test instead of ending the whole run.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use maas_engine::{ChangeError, Engine, EngineError, EngineOptions, SwapRequest};
use maas_kernels::{Value, Values};

mod common;
use common::{ServeProcess, TempDir};

/// A seeded `linear` head (64 -> 10) in a pipeline `p` whose output is untyped, so that a head
/// of any size fits it.
const GRAPH: &str = r#"
[submodels.head]
kind = "linear"
params = { in = 64, out = 10, seed = 1 }

[pipelines.p]
inputs = { x = "f32[B,64]" }
outputs = { y = "n.out" }

[pipelines.p.nodes]
n = { submodel = "head", inputs = { x = "$x" } }
"#;

/// [`GRAPH`] plus a submodel `big`, a seeded `linear` of 64 x 4,000,000,000 (about 1 TB of
/// f32), used by a second pipeline.
fn graph_with_big() -> String {
    format!(
        "{GRAPH}\n[submodels.big]\nkind = \"linear\"\nparams = {{ in = 64, out = 4000000000, seed = 1 }}\n\n\
         [pipelines.q]\ninputs = {{ x = \"f32[B,64]\" }}\noutputs = {{ y = \"n.out\" }}\n\n\
         [pipelines.q.nodes]\nn = {{ submodel = \"big\", inputs = {{ x = \"$x\" }} }}\n"
    )
}

/// Runs `body` in a child process (this test binary, filtered to the test `name`), so that an
/// abort fails this test instead of every test of the binary. In the child, runs `body`.
fn isolated(name: &str, body: impl FnOnce()) {
    if std::env::var_os("MAAS_LOADING_ISOLATED").is_some() {
        body();
        return;
    }
    let out = Command::new(std::env::current_exe().expect("test binary"))
        .args([name, "--exact", "--test-threads=1", "--nocapture"])
        .env("MAAS_LOADING_ISOLATED", "1")
        .output()
        .expect("run the test in a child process");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "`{name}` ended with {} in its own process:\n{stdout}\n{stderr}", out.status);
    assert!(stdout.contains("1 passed"), "`{name}` did not run in the child:\n{stdout}");
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

fn write_graph(dir: &Path, text: &str) -> std::path::PathBuf {
    let path = dir.join("g.toml");
    std::fs::write(&path, text).unwrap();
    path
}

async fn infer_ok(engine: &Engine) {
    let x = candle_core::Tensor::zeros((2, 64), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
    let r = engine.infer("p", Values::from([("x".to_string(), Value::Tensor(x))])).await.expect("p still serves");
    assert_eq!(r.outputs["y"].as_tensor().unwrap().dims(), &[2, 10]);
    assert_eq!(r.versions["head"], "v1");
}

#[test]
fn building_an_engine_with_a_submodel_too_large_for_memory_is_a_typed_error() {
    isolated("building_an_engine_with_a_submodel_too_large_for_memory_is_a_typed_error", || {
        let tmp = TempDir::new("loading-build");
        let path = write_graph(&tmp.0, &graph_with_big());
        runtime().block_on(async {
            // The default limit: half the machine's memory, and what is available.
            let err = match Engine::from_files(&[&path]).await {
                Ok(_) => panic!("a 1 TB submodel was loaded"),
                Err(e) => e,
            };
            let EngineError::TooLarge(t) = &err else { panic!("expected TooLarge, got {err}") };
            assert_eq!(t.submodel, "big");
            // 64 x 4e9 f32 is 1.024e12 bytes; loading also makes the transposed copy.
            assert!(t.estimate_bytes >= 2 * 1_024_000_000_000, "{t:?}");
            assert!(t.estimate_bytes > t.limit_bytes);
            let msg = err.to_string();
            assert!(msg.contains("loading 2 submodels needs an estimated 1.9 TiB (submodel `big`: 1.9 TiB"), "{msg}");

            // An explicit limit is named as such.
            let options = EngineOptions { max_load_bytes: Some(1 << 20), ..EngineOptions::default() };
            let err = match Engine::builder().options(options).from_files(&[&path]).await {
                Ok(_) => panic!("a 1 TB submodel was loaded under a 1 MiB limit"),
                Err(e) => e.to_string(),
            };
            assert!(err.contains("more than the load limit of 1.0 MiB"), "{err}");
        });
    });
}

#[test]
fn an_oversized_swap_or_recomposition_in_process_is_refused_and_the_old_graph_serves() {
    isolated("an_oversized_swap_or_recomposition_in_process_is_refused_and_the_old_graph_serves", || {
        let tmp = TempDir::new("loading-engine");
        let path = write_graph(&tmp.0, GRAPH);
        runtime().block_on(async {
            let engine = Engine::from_files(&[&path]).await.unwrap();
            let params: toml::Table = "out = 4000000000".parse().unwrap();
            let err = engine
                .swap(
                    "head",
                    SwapRequest { params: Some(params), allow_signature_change: true, ..SwapRequest::default() },
                )
                .await
                .expect_err("a 1 TB head was swapped in");
            assert!(matches!(err, ChangeError::TooLarge(_)), "{err}");
            assert_eq!(err.kind(), "too_large");
            infer_ok(&engine).await;

            let source = maas_graphs::SourceFile::new("big.toml", graph_with_big(), "");
            for dry_run in [true, false] {
                let err = engine.recompose(vec![source.clone()], dry_run).await.expect_err("a 1 TB submodel was added");
                assert_eq!(err.kind(), "too_large", "{err}");
                assert!(err.to_string().contains("submodel `big`"), "{err}");
            }
            infer_ok(&engine).await;
            engine.shutdown().await;
        });
    });
}

#[test]
fn a_swap_to_a_fifo_says_it_is_not_a_regular_file() {
    let tmp = TempDir::new("loading-fifo-swap");
    let fifo = tmp.0.join("weights.safetensors");
    mkfifo(&fifo);
    let head = concat!(env!("CARGO_MANIFEST_DIR"), "/assets/digits/head.safetensors");
    let graph = format!(
        "[submodels.head]\nkind = \"linear\"\nweights = \"{head}\"\n\n[pipelines.p]\ninputs = {{ x = \"f32[B,64]\" }}\n\
         outputs = {{ y = \"n.out\" }}\n\n[pipelines.p.nodes]\nn = {{ submodel = \"head\", inputs = {{ x = \"$x\" }} }}\n"
    );
    let path = write_graph(&tmp.0, &graph);
    runtime().block_on(async {
        let engine = Engine::from_files(&[&path]).await.unwrap();
        let err = engine
            .swap("head", SwapRequest { weights: Some(fifo.clone()), ..SwapRequest::default() })
            .await
            .expect_err("a FIFO was loaded as weights");
        let msg = err.to_string();
        assert!(msg.contains("is not a regular file (a FIFO)"), "{msg}");
        assert!(!msg.contains("does not exist"), "{msg}");
        engine.shutdown().await;
    });
}

#[test]
fn a_graph_naming_a_fifo_says_it_is_not_a_regular_file() {
    let tmp = TempDir::new("loading-fifo-graph");
    let fifo = tmp.0.join("pipe");
    mkfifo(&fifo);
    let graph = "[submodels.head]\nkind = \"linear\"\nweights = \"pipe\"\n\n\
                 [submodels.tok]\nkind = \"tokenizer\"\nparams = { path = \"pipe\" }\n\n\
                 [pipelines.p]\ninputs = { x = \"f32[B,64]\", t = \"text\" }\n\
                 outputs = { y = \"n.out\", ids = \"k.input_ids\" }\n\n[pipelines.p.nodes]\n\
                 n = { submodel = \"head\", inputs = { x = \"$x\" } }\nk = { submodel = \"tok\", inputs = { text = \"$t\" } }\n";
    let path = write_graph(&tmp.0, graph);
    let out = Command::new(env!("CARGO_BIN_EXE_maas")).arg("validate").arg(&path).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    let pipe = fifo.display();
    assert!(
        stderr.contains(&format!("weights file `{pipe}` of submodel `head` is not a regular file (a FIFO)")),
        "{stderr}"
    );
    assert!(stderr.contains(&format!("file `{pipe}` is not a regular file (a FIFO)")), "{stderr}");
    assert!(!stderr.contains("does not exist"), "{stderr}");
}

fn mkfifo(path: &Path) {
    let status = Command::new("mkfifo").arg(path).status().expect("run mkfifo");
    assert!(status.success(), "mkfifo {}", path.display());
}

/// A running `maas serve` child.
struct Server {
    p: ServeProcess,
}

impl Server {
    /// Starts `maas serve` with `args` in `dir` (admin token `t`); `Err` with what it printed if
    /// it exits before serving.
    fn start(args: &[&str], dir: &Path) -> Result<Self, String> {
        ServeProcess::spawn(args, dir, None).map(|p| Self { p })
    }

    /// One admin-authorised request; `Err` when the server does not answer (it died).
    fn call(&mut self, method: &str, path: &str, body: String) -> Result<(u16, serde_json::Value), String> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let answer = rt.block_on(async {
            let c = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
            let url = format!("http://{}{path}", self.p.addr);
            let r = c.request(method.parse().unwrap(), url).bearer_auth("t").body(body).send().await?;
            let status = r.status().as_u16();
            let text = r.text().await?;
            Ok::<_, reqwest::Error>((status, serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text))))
        });
        answer.map_err(|e| match self.p.child.try_wait() {
            Ok(Some(status)) => format!("the server died ({status}): {e}"),
            _ => format!("no answer: {e}"),
        })
    }

    /// `p` answers with the head's serving version.
    fn infer(&mut self) -> String {
        let (st, body) = self
            .call("POST", "/v1/pipelines/p/infer", format!(r#"{{"inputs": {{"x": [{:?}]}}}}"#, [0.5f32; 64]))
            .unwrap();
        assert_eq!(st, 200, "{body}");
        assert_eq!(body["outputs"]["y"][0].as_array().map(Vec::len), Some(10), "{body}");
        body["model_versions"]["head"].as_str().unwrap().to_string()
    }

    /// SIGTERM; it must end cleanly (it did not crash).
    fn stop(mut self) {
        let killed = Command::new("kill").args(["-TERM", &self.p.child.id().to_string()]).status().unwrap();
        assert!(killed.success());
        let status = self.p.child.wait().unwrap();
        assert_eq!(status.code(), Some(0), "serve ended with {status}");
    }
}

#[test]
fn serve_refuses_an_oversized_linear_through_both_change_routes_and_keeps_serving() {
    let tmp = TempDir::new("loading-serve");
    write_graph(&tmp.0, GRAPH);
    let mut server = Server::start(&["g.toml"], &tmp.0).unwrap();
    assert_eq!(server.infer(), "v1");

    let (st, body) = server
        .call(
            "PUT",
            "/v1/submodels/head",
            r#"{"params": {"out": 4000000000}, "version": "huge", "allow_signature_change": true}"#.into(),
        )
        .unwrap();
    assert_eq!(st, 422, "{body}");
    assert_eq!(body["error"]["kind"], "too_large", "{body}");
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("submodel `head` needs an estimated 1.9 TiB to load"), "{msg}");
    assert_eq!(server.infer(), "v1");

    let (st, body) = server.call("PUT", "/v1/graph", graph_with_big()).unwrap();
    assert_eq!(st, 422, "{body}");
    assert_eq!(body["error"]["kind"], "too_large", "{body}");
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("submodel `big` needs an estimated 1.9 TiB to load"), "{msg}");
    assert_eq!(server.infer(), "v1");
    let (_, pipelines) = server.call("GET", "/v1/pipelines", String::new()).unwrap();
    assert_eq!(pipelines["pipelines"].as_array().map(Vec::len), Some(1), "{pipelines}");

    // A change that fits still applies.
    let (st, body) =
        server.call("PUT", "/v1/submodels/head", r#"{"params": {"seed": 7}, "version": "v2"}"#.into()).unwrap();
    assert_eq!(st, 200, "{body}");
    assert_eq!(server.infer(), "v2");
    server.stop();
}

#[test]
fn serve_max_load_memory_bounds_the_graph_at_start_and_every_swap() {
    let tmp = TempDir::new("loading-flag");
    write_graph(&tmp.0, GRAPH);
    // The head (64 x 10) needs a few KiB; 1000 outputs need about half a MiB.
    let mut server = Server::start(&["g.toml", "--max-load-memory", "64KiB"], &tmp.0).unwrap();
    let (st, body) = server
        .call("PUT", "/v1/submodels/head", r#"{"params": {"out": 1000}, "allow_signature_change": true}"#.into())
        .unwrap();
    assert_eq!(st, 422, "{body}");
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("more than the load limit of 64.0 KiB"), "{msg}");
    assert_eq!(server.infer(), "v1");
    server.stop();

    let refused = match Server::start(&["g.toml", "--max-load-memory", "1KiB"], &tmp.0) {
        Ok(s) => {
            s.stop();
            panic!("serve started with a graph over --max-load-memory");
        }
        Err(printed) => printed,
    };
    assert!(refused.contains("submodel `head` needs an estimated") && refused.contains("1.0 KiB"), "{refused}");

    let bad = Server::start(&["g.toml", "--max-load-memory", "lots"], &tmp.0).err().unwrap_or_default();
    assert!(bad.contains("not a size"), "{bad}");
}
