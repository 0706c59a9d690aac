//! The HTTP API over real TCP on loopback: every status code, the JSON error shape (also for
//! axum's own rejections), metrics exposition, readiness, admin auth, concurrent clients,
//! graceful shutdown with requests in flight, and random bodies that must never crash it.

use std::time::Duration;

use maas::http::HttpConfig;
use maas_engine::Engine;
use maas_graphs::SourceFile;
use serde_json::{Value, json};

mod common;
use common::{Server, serve};

const GRAPH: &str = r#"
[submodels.step]
kind = "linear"
params = { in = 4, out = 2, seed = 1 }

[submodels.id]
kind = "identity"

[pipelines.lin]
inputs = { x = "f32[B,4]" }
outputs = { y = "a.out" }
nodes.a = { submodel = "step", inputs = { x = "$x" } }

[pipelines.echo]
inputs = { t = "text" }
outputs = { t = "a.out" }
nodes.a = { submodel = "id", inputs = { x = "$t" } }
"#;

async fn start(config: HttpConfig) -> Server {
    let engine = Engine::builder().from_sources(vec![SourceFile::new("http.toml", GRAPH, ".")]).await.expect("engine");
    serve(engine, config).await
}

/// Polls `cond` until it holds or 10 s pass.
async fn eventually(cond: impl FnMut() -> bool) -> bool {
    common::eventually(Duration::from_secs(10), cond).await
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(20)).build().expect("client")
}

async fn post(s: &Server, path: &str, body: impl Into<reqwest::Body>) -> (u16, reqwest::header::HeaderMap, Value) {
    let r = client()
        .post(format!("http://{}{path}", s.addr))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("send");
    let (status, headers) = (r.status().as_u16(), r.headers().clone());
    let text = r.text().await.expect("body");
    (status, headers, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

async fn get(s: &Server, path: &str, token: Option<&str>) -> (u16, String) {
    let mut req = client().get(format!("http://{}{path}", s.addr));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let r = req.send().await.expect("send");
    (r.status().as_u16(), r.text().await.expect("body"))
}

fn assert_error(status: u16, body: &Value, want_status: u16, kind: &str) {
    assert_eq!(status, want_status, "{body}");
    assert_eq!(body["error"]["kind"], kind, "{body}");
    assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn infer_and_every_error_status() {
    let s = start(HttpConfig { max_body: 4096, max_rows: 8, ..HttpConfig::default() }).await;
    let (st, h, body) = post(&s, "/v1/pipelines/lin/infer", r#"{"inputs": {"x": [[1, 2, 3, 4], [0, 0, 0, 0]]}}"#).await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["outputs"]["y"].as_array().unwrap().len(), 2);
    assert_eq!(body["model_versions"]["step"], "v1");
    assert!(h.contains_key("x-request-id"));
    let (st, _, body) = post(&s, "/v1/pipelines/echo/infer", r#"{"inputs": {"t": "hello"}}"#).await;
    assert_eq!((st, body["outputs"]["t"].clone()), (200, json!(["hello"])));

    let cases: &[(&str, &str, u16, &str)] = &[
        ("/v1/pipelines/lin/infer", "{not json", 400, "invalid_json"),
        ("/v1/pipelines/lin/infer", r#"{"inputs": {"x": [[1, 2, 3]]}}"#, 400, "invalid_input"),
        ("/v1/pipelines/lin/infer", r#"{"inputs": {"x": [["a", 2, 3, 4]]}}"#, 400, "invalid_input"),
        ("/v1/pipelines/lin/infer", r#"{"inputs": {"z": [[1, 2, 3, 4]]}}"#, 400, "invalid_input"),
        ("/v1/pipelines/lin/infer", r#"{"inputs": {}}"#, 400, "invalid_input"),
        ("/v1/pipelines/lin/infer", r#"{"inputs": {"x": [[1, 2, 3, 4]]}, "extra": 1}"#, 400, "invalid_json"),
        ("/v1/pipelines/lin/infer", r#"{"inputs": {"x": [[1e999, 2, 3, 4]]}}"#, 400, "invalid_json"),
        ("/v1/pipelines/nope/infer", r#"{"inputs": {}}"#, 404, "unknown_pipeline"),
        ("/v1/nowhere", "{}", 404, "not_found"),
    ];
    for (path, body, status, kind) in cases {
        let (st, _, b) = post(&s, path, body.to_string()).await;
        assert_error(st, &b, *status, kind);
    }
    // Too many rows, and a body over the limit: 413 in the JSON shape.
    let rows: Vec<[f32; 4]> = vec![[1.0; 4]; 9];
    let (st, _, b) = post(&s, "/v1/pipelines/lin/infer", json!({"inputs": {"x": rows}}).to_string()).await;
    assert_error(st, &b, 413, "too_many_rows");
    let big = format!(r#"{{"inputs": {{"t": "{}"}}}}"#, "a".repeat(5000));
    let (st, _, b) = post(&s, "/v1/pipelines/echo/infer", big).await;
    assert_error(st, &b, 413, "payload_too_large");
    // Wrong method: JSON too.
    let r = client().get(format!("http://{}/v1/pipelines/lin/infer", s.addr)).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 405);
    let b: Value = r.json().await.unwrap();
    assert_eq!(b["error"]["kind"], "method_not_allowed");
    // A bad deadline header is a 400; a request id is echoed.
    let r = client()
        .post(format!("http://{}/v1/pipelines/lin/infer", s.addr))
        .header("x-maas-deadline-ms", "soon")
        .header("x-request-id", "abc-123")
        .body(r#"{"inputs": {"x": [[1, 2, 3, 4]]}}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    assert_eq!(r.headers()["x-request-id"], "abc-123");
    s.stop.send(()).unwrap();
    s.done.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listings_health_metrics_and_readiness() {
    let s = start(HttpConfig::default()).await;
    let (st, body) = get(&s, "/v1/pipelines", None).await;
    assert_eq!(st, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    let lin = v["pipelines"].as_array().unwrap().iter().find(|p| p["name"] == "lin").unwrap().clone();
    assert_eq!(lin["inputs"]["x"], "f32[B,4]");
    assert_eq!(lin["outputs"]["y"], "f32[B,2]");
    let (st, body) = get(&s, "/v1/submodels", None).await;
    assert_eq!(st, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    let step = v["submodels"].as_array().unwrap().iter().find(|p| p["name"] == "step").unwrap().clone();
    assert_eq!(
        (step["kind"].as_str(), step["state"].as_str(), step["replicas"].as_u64()),
        (Some("linear"), Some("ready"), Some(1))
    );
    assert_eq!(get(&s, "/healthz", None).await.0, 200);
    assert_eq!(get(&s, "/readyz", None).await.0, 200);
    post(&s, "/v1/pipelines/lin/infer", r#"{"inputs": {"x": [[1, 2, 3, 4]]}}"#).await;
    post(&s, "/v1/pipelines/lin/infer", r#"{"inputs": {"x": [[1]]}}"#).await;
    let (st, text) = get(&s, "/metrics", None).await;
    assert_eq!(st, 200);
    // Every sample line parses as `name{labels} value`, names prefixed `maas_`.
    let mut samples = std::collections::BTreeMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("bad line {line}"));
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("bad value in {line}"));
        assert!(series.starts_with("maas_"), "{line}");
        samples.insert(series.to_string(), value);
    }
    assert_eq!(samples[r#"maas_requests_total{pipeline="lin",outcome="ok"}"#], 1.0);
    assert_eq!(samples[r#"maas_requests_total{pipeline="lin",outcome="invalid_input"}"#], 1.0);
    assert_eq!(samples[r#"maas_request_duration_seconds_count{pipeline="lin"}"#], 2.0);
    assert_eq!(samples[r#"maas_submodel_batch_rows_count{submodel="step"}"#], 1.0);
    // A lone request's batch went at once.
    assert_eq!(samples[r#"maas_submodel_batches_total{submodel="step",dispatch="at_once"}"#], 1.0);
    assert_eq!(samples[r#"maas_submodel_batches_total{submodel="step",dispatch="after_wait"}"#], 0.0);
    assert_eq!(samples[r#"maas_submodel_batch_wait_seconds_count{submodel="step"}"#], 0.0);
    assert_eq!(samples[r#"maas_submodel_up{submodel="step",state="ready"}"#], 1.0);
    // Readiness flips once the engine is shutting down.
    s.engine.shutdown().await;
    let (st, body) = get(&s, "/readyz", None).await;
    assert_eq!(st, 503, "{body}");
    let (st, _, b) = post(&s, "/v1/pipelines/lin/infer", r#"{"inputs": {"x": [[1, 2, 3, 4]]}}"#).await;
    assert_error(st, &b, 503, "shutting_down");
    s.stop.send(()).unwrap();
    s.done.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_routes_need_the_token_and_are_off_without_one() {
    let off = start(HttpConfig::default()).await;
    let (st, body) = get(&off, "/v1/graph", Some("anything")).await;
    assert_eq!(st, 404, "admin is disabled without a token: {body}");
    off.stop.send(()).unwrap();

    let on = start(HttpConfig { admin_token: Some("s3cret".into()), ..HttpConfig::default() }).await;
    assert_eq!(get(&on, "/v1/graph", None).await.0, 401);
    assert_eq!(get(&on, "/v1/graph", Some("wrong")).await.0, 401);
    let (st, text) = get(&on, "/v1/graph", Some("s3cret")).await;
    assert_eq!(st, 200);
    // The served graph comes back as TOML that checks again to the same graph.
    let again =
        maas_engine::load_sources(vec![SourceFile::new("served.toml", text.clone(), ".")], on.engine.registry())
            .unwrap_or_else(|d| panic!("{d}\n{text}"));
    assert!(on.engine.graph().diff(&again.graph).is_empty(), "{text}");
    on.stop.send(()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_clients_all_succeed() {
    let s = start(HttpConfig::default()).await;
    let addr = s.addr;
    let clients: Vec<_> = (0..16)
        .map(|i| {
            tokio::spawn(async move {
                let c = client();
                let mut ok = 0;
                for k in 0..20 {
                    let body = json!({"inputs": {"x": [[i as f32, k as f32, 1.0, 2.0]]}});
                    let r = c.post(format!("http://{addr}/v1/pipelines/lin/infer")).body(body.to_string()).send().await;
                    match r {
                        Ok(r) if r.status().is_success() => ok += 1,
                        Ok(r) => panic!("status {}: {}", r.status(), r.text().await.unwrap_or_default()),
                        Err(e) => panic!("request lost: {e}"),
                    }
                }
                ok
            })
        })
        .collect();
    let total: usize = {
        let mut sum = 0;
        for c in clients {
            sum += c.await.expect("client");
        }
        sum
    };
    assert_eq!(total, 16 * 20);
    s.stop.send(()).unwrap();
    s.done.await.unwrap();
    assert_eq!(s.engine.shutdown().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_and_truncated_bodies_never_crash_the_server() {
    use rand::{Rng, SeedableRng};
    let s = start(HttpConfig::default()).await;
    let valid = r#"{"inputs": {"x": [[1, 2, 3, 4], [5, 6, 7, 8]]}}"#;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for i in 0..300 {
        let body: Vec<u8> = match i % 3 {
            0 => valid.as_bytes()[..rng.random_range(0..valid.len())].to_vec(),
            1 => (0..rng.random_range(0..64)).map(|_| rng.random::<u8>()).collect(),
            _ => {
                let mut b = valid.as_bytes().to_vec();
                for _ in 0..3 {
                    let at = rng.random_range(0..b.len());
                    let alphabet = b"{}[],:\"0a-e.";
                    b[at] = alphabet[rng.random_range(0..alphabet.len())];
                }
                b
            }
        };
        let (st, _, b) = post(&s, "/v1/pipelines/lin/infer", body).await;
        assert!(st == 200 || st == 400, "status {st}: {b}");
        if st == 400 {
            assert!(b["error"]["kind"].is_string(), "{b}");
        }
    }
    let (st, _, _) = post(&s, "/v1/pipelines/lin/infer", valid).await;
    assert_eq!(st, 200, "still serving");
    s.stop.send(()).unwrap();
    s.done.await.unwrap();
}

/// `x` -> `out`, each batch waiting for a permit from the test.
struct Gate(flume::Receiver<()>);

impl maas_kernels::Kind for Gate {
    fn name(&self) -> &str {
        "gate"
    }

    /// Its forward counts calls and waits on a gate: no synthetic warm-up batch.
    fn warm_up(&self) -> bool {
        false
    }

    fn signature(&self, _: &maas_graphs::SubmodelSpec) -> Result<maas_graphs::Signature, Vec<maas_graphs::KindError>> {
        use maas_graphs::{PortSpec, ty};
        Ok(maas_graphs::Signature {
            inputs: vec![PortSpec::new("x", ty("f32[B,N]"))],
            outputs: vec![PortSpec::new("out", ty("f32[B,N]"))],
        })
    }

    fn load(
        &self,
        _: &maas_graphs::SubmodelSpec,
        _: &candle_core::Device,
    ) -> maas_kernels::Result<std::sync::Arc<dyn maas_kernels::Kernel>> {
        Ok(std::sync::Arc::new(GateKernel(self.0.clone())))
    }
}

struct GateKernel(flume::Receiver<()>);

impl maas_kernels::Kernel for GateKernel {
    fn forward(&self, inputs: &maas_kernels::Values) -> maas_kernels::Result<maas_kernels::Values> {
        let _ = self.0.recv_timeout(Duration::from_secs(20));
        Ok(maas_kernels::Values::from([("out".to_string(), inputs["x"].clone())]))
    }
}

/// An engine serving pipeline `p` (`x: f32[B,2]`) through one gated submodel `g`.
async fn gate_engine(gate: flume::Receiver<()>, settings: &str) -> Engine {
    let graph = format!(
        "[submodels.g]\nkind = \"gate\"\n{settings}\n[pipelines.p]\ninputs = {{ x = \"f32[B,2]\" }}\n\
         outputs = {{ y = \"n.out\" }}\nnodes.n = {{ submodel = \"g\", inputs = {{ x = \"$x\" }} }}\n"
    );
    Engine::builder()
        .register(Gate(gate))
        .from_sources(vec![SourceFile::new("gate.toml", graph, ".")])
        .await
        .expect("engine")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_requests_in_flight() {
    let (open, gate) = flume::unbounded();
    let engine = gate_engine(gate, "batch = { max_size = 1 }").await;
    let Server { addr, stop, done: server, .. } = serve(engine.clone(), HttpConfig::default()).await;
    let inflight: Vec<_> = (0..4)
        .map(|i| {
            tokio::spawn(async move {
                let r = client()
                    .post(format!("http://{addr}/v1/pipelines/p/infer"))
                    .body(json!({"inputs": {"x": [[i as f32, 0.0]]}}).to_string())
                    .send()
                    .await
                    .expect("request lost");
                (r.status().as_u16(), r.json::<Value>().await.unwrap())
            })
        })
        .collect();
    assert!(eventually(|| engine.metrics().in_flight == 4).await, "the four requests never arrived");
    stop.send(()).unwrap();
    for _ in 0..4 {
        open.send(()).unwrap();
    }
    for (i, r) in inflight.into_iter().enumerate() {
        let (status, body) = r.await.unwrap();
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["outputs"]["y"], json!([[i as f64, 0.0]]));
    }
    server.await.unwrap();
    assert_eq!(engine.shutdown().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadline_is_504_and_overload_is_503_with_retry_after() {
    let (open, gate) = flume::unbounded();
    let engine = gate_engine(gate, "queue = 1\nbatch = { max_size = 1 }").await;
    let s = serve(engine.clone(), HttpConfig::default()).await;
    let body = r#"{"inputs": {"x": [[1, 2]]}}"#;
    // The stream is held by the gate: a 50 ms deadline passes -> 504.
    let r = client()
        .post(format!("http://{}/v1/pipelines/p/infer", s.addr))
        .header("x-maas-deadline-ms", "50")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 504);
    let b: Value = r.json().await.unwrap();
    assert_eq!(b["error"]["kind"], "deadline_exceeded");
    // The expired request's batch still holds the stream (a computing batch is not
    // interrupted); one request waits in the queue (queue = 1); the next is refused.
    let addr = s.addr;
    let held: Vec<_> = (0..1)
        .map(|_| {
            tokio::spawn(
                async move { client().post(format!("http://{addr}/v1/pipelines/p/infer")).body(body).send().await },
            )
        })
        .collect();
    assert!(eventually(|| engine.metrics().submodels["g"].queued == 1).await, "the held request never queued");
    let (st, h, b) = post(&s, "/v1/pipelines/p/infer", body).await;
    assert_error(st, &b, 503, "overloaded");
    assert_eq!(h["retry-after"], "1");
    for _ in 0..4 {
        open.send(()).unwrap();
    }
    for r in held {
        assert_eq!(r.await.unwrap().unwrap().status().as_u16(), 200);
    }
    s.stop.send(()).unwrap();
    s.done.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_computing_past_the_connection_timeouts_is_answered() {
    let (open, gate) = flume::unbounded();
    let engine = gate_engine(gate, "").await;
    let limits = maas::server::ServerConfig {
        header_timeout: Duration::from_millis(200),
        idle_timeout: Duration::from_millis(200),
        max_connections: 8,
        shutdown_grace: Duration::from_millis(300),
    };
    let s = common::serve_with(engine.clone(), HttpConfig::default(), limits).await;
    let addr = s.addr;
    let call = tokio::spawn(async move {
        let r = client()
            .post(format!("http://{addr}/v1/pipelines/p/infer"))
            .body(json!({"inputs": {"x": [[1.0, 2.0]]}}).to_string())
            .send()
            .await;
        match r {
            Ok(r) => Ok(r.status().as_u16()),
            Err(e) => Err(e.to_string()),
        }
    });
    // The request computes for five times the header and idle timeouts: neither applies to it.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(!call.is_finished(), "the connection was cut while its request computed");
    open.send(()).unwrap();
    assert_eq!(call.await.unwrap(), Ok(200));

    // At shutdown, a request still computing after the grace period has its connection closed
    // and the server returns, instead of waiting for it.
    let addr = s.addr;
    let stuck = tokio::spawn(async move {
        client().post(format!("http://{addr}/v1/pipelines/p/infer")).body(r#"{"inputs": {"x": [[0, 0]]}}"#).send().await
    });
    assert!(common::eventually(Duration::from_secs(10), || engine.metrics().in_flight == 1).await);
    let started = std::time::Instant::now();
    s.stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), s.done).await.expect("serve returned after the grace").unwrap();
    assert!(started.elapsed() >= Duration::from_millis(300), "the grace period was given");
    assert!(stuck.await.unwrap().is_err(), "the stuck request's connection was closed");
    open.send(()).unwrap();
    engine.shutdown().await;
}
