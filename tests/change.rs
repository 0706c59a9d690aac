//! Change while serving, under real concurrent load over TCP: hot-swap and rollback of the
//! digits head and of the MiniLM encoder, rejected swaps (truncated, corrupt, wrongly shaped,
//! missing, outside the file roots, unknown), version pinning inside one request, and
//! recomposition (add, rewire, remove pipelines).
//!
//! The MiniLM test needs the model: `scripts/fetch-models` (the test command runs it).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use maas::http::HttpConfig;
use maas_engine::{Engine, EngineOptions, SwapRequest};
use maas_graphs::{KindError, PortSpec, Signature, SourceFile, SubmodelSpec, ty};
use maas_kernels::{Kernel, Kind, Value, Values};
use serde_json::{Value as Json, json};

mod common;
use common::{Server, TempDir};

const TOKEN: &str = "change-token";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Serves `engine` with the admin routes on (token [`TOKEN`]).
async fn serve(engine: Engine) -> Server {
    let config = HttpConfig { admin_token: Some(TOKEN.into()), ..HttpConfig::default() };
    common::serve(engine, config).await
}

impl Server {
    /// An admin request: (status, JSON body).
    async fn admin(&self, method: reqwest::Method, path: &str, body: Option<String>) -> (u16, Json) {
        let mut r = client().request(method, format!("http://{}{path}", self.addr)).bearer_auth(TOKEN);
        if let Some(b) = body {
            r = r.body(b);
        }
        let r = r.send().await.expect("admin request");
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Json::String(text)))
    }

    async fn swap(&self, submodel: &str, body: Json) -> (u16, Json) {
        self.admin(reqwest::Method::PUT, &format!("/v1/submodels/{submodel}"), Some(body.to_string())).await
    }

    async fn infer(&self, pipeline: &str, inputs: &Json) -> (u16, Json) {
        let r = client()
            .post(format!("http://{}/v1/pipelines/{pipeline}/infer", self.addr))
            .body(json!({ "inputs": inputs }).to_string())
            .send()
            .await
            .expect("request lost");
        (r.status().as_u16(), r.json().await.unwrap_or(Json::Null))
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(30)).build().expect("client")
}

/// One answered request of a load run.
#[derive(Debug, Clone)]
struct Answer {
    /// Before the request was sent.
    started: Instant,
    /// After its answer was read. A request that started after a change answered is served by
    /// the new version only if it reached the server before the next change: one that finished
    /// before the next change was sent did.
    finished: Instant,
    status: u16,
    body: Json,
}

/// `callers` clients sending `pipeline` requests back to back until `stop` is set.
struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Vec<Answer>>>,
    count: Arc<AtomicUsize>,
}

impl Load {
    fn start(addr: SocketAddr, pipeline: &str, callers: usize, inputs: Json) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(AtomicUsize::new(0));
        let tasks = (0..callers)
            .map(|_| {
                let (stop, count, inputs) = (stop.clone(), count.clone(), inputs.clone());
                let url = format!("http://{addr}/v1/pipelines/{pipeline}/infer");
                tokio::spawn(async move {
                    let c = client();
                    let body = json!({ "inputs": inputs }).to_string();
                    let mut out = Vec::new();
                    while !stop.load(SeqCst) {
                        let started = Instant::now();
                        let r = c.post(&url).body(body.clone()).send().await.expect("request lost");
                        let status = r.status().as_u16();
                        let body = r.json().await.unwrap_or(Json::Null);
                        out.push(Answer { started, finished: Instant::now(), status, body });
                        count.fetch_add(1, SeqCst);
                    }
                    out
                })
            })
            .collect();
        Self { stop, tasks, count }
    }

    /// Waits until `n` more requests were answered.
    async fn wait_for(&self, n: usize) {
        let target = self.count.load(SeqCst) + n;
        let end = Instant::now() + Duration::from_secs(60);
        while self.count.load(SeqCst) < target {
            assert!(Instant::now() < end, "load made no progress");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn finish(self) -> Vec<Answer> {
        self.stop.store(true, SeqCst);
        let mut all = Vec::new();
        for t in self.tasks {
            all.extend(t.await.unwrap());
        }
        all
    }
}

fn digits_pixels() -> Json {
    serde_json::from_str(&std::fs::read_to_string(root().join("examples/inputs/digits.json")).unwrap()).unwrap()
}

/// The committed head with its rows rolled by one: it predicts `(label + 1) % 10`.
fn write_rolled_head(dir: &Path) -> PathBuf {
    let t = candle_core::safetensors::load(root().join("assets/digits/head.safetensors"), &Device::Cpu).unwrap();
    let roll = |x: &Tensor| Tensor::cat(&[x.narrow(0, 9, 1).unwrap(), x.narrow(0, 0, 9).unwrap()], 0).unwrap();
    let rolled: HashMap<String, Tensor> = t.iter().map(|(k, v)| (k.clone(), roll(v))).collect();
    let path = dir.join("head-rolled.safetensors");
    candle_core::safetensors::save(&rolled, &path).unwrap();
    path
}

async fn digits_engine(roots: Vec<PathBuf>) -> Engine {
    let options = EngineOptions { file_roots: Some(roots), ..EngineOptions::default() };
    Engine::builder().options(options).from_files(&[root().join("examples/pipelines/digits.toml")]).await.unwrap()
}

/// Every answer succeeded; returns (version of `submodel`, `output`) per answer.
fn versions_of<'a>(answers: &'a [Answer], submodel: &str, output: &str) -> Vec<(&'a Answer, String, Json)> {
    answers
        .iter()
        .map(|a| {
            assert_eq!(a.status, 200, "a request failed during the change: {}", a.body);
            let v = a.body["model_versions"][submodel].as_str().expect("version reported").to_string();
            (a, v, a.body["outputs"][output].clone())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swap_and_rollback_of_the_digits_head_under_load_lose_no_request() {
    let tmp = TempDir::new("swap-digits");
    let rolled = write_rolled_head(&tmp.0);
    let engine = digits_engine(vec![tmp.0.clone()]).await;
    let server = serve(engine.clone()).await;
    let load = Load::start(server.addr, "classify", 16, json!({ "pixels": digits_pixels() }));
    load.wait_for(50).await;

    let (st, body) = server.swap("head", json!({ "weights": rolled, "version": "v2" })).await;
    assert_eq!(st, 200, "{body}");
    assert_eq!((body["previous"].as_str(), body["version"].as_str()), (Some("v1"), Some("v2")));
    let swapped = Instant::now();
    // At least 100 - 16 of these were sent after the swap answered.
    load.wait_for(100).await;
    let (st, v) = server.admin(reqwest::Method::GET, "/v1/submodels/head/versions", None).await;
    assert_eq!(st, 200);
    assert_eq!(v["serving"]["version"], "v2");
    assert_eq!(v["previous"][0]["version"], "v1");

    // Rollback under the same load, with a body and content type it ignores.
    let rollback_sent = Instant::now();
    let (st, body) = server.admin(reqwest::Method::POST, "/v1/submodels/head/rollback", Some("whatever".into())).await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["version"], "v1");
    let rolled_back = Instant::now();
    load.wait_for(50).await;
    let answers = load.finish().await;

    let mut seen = HashMap::<String, usize>::new();
    let mut between = 0;
    for (a, version, labels) in versions_of(&answers, "head", "label") {
        match version.as_str() {
            "v1" => assert_eq!(labels, json!([3, 5]), "v1 computes v1's labels"),
            "v2" => assert_eq!(labels, json!([4, 6]), "v2 computes the rolled head's labels"),
            other => panic!("unknown version {other}"),
        }
        // Sent after the swap answered and answered before the rollback was sent: admitted
        // between the two switches. (One still on its way when the rollback was sent may reach
        // the server after the rollback switched, and rightly get v1.)
        if a.started > swapped && a.finished < rollback_sent {
            assert_eq!(version, "v2", "a request sent after the swap answered got the old version");
            between += 1;
        }
        if a.started > rolled_back {
            assert_eq!(version, "v1", "a request sent after the rollback answered got the new version");
        }
        *seen.entry(version).or_default() += 1;
    }
    // 100 answers came between the swap's answer and the rollback; at most one per caller (16)
    // had been sent before the swap answered.
    assert!(between >= 100 - 16, "only {between} requests were admitted between the swap and the rollback");
    assert!(seen.get("v1").is_some_and(|n| *n >= 50) && seen.get("v2").is_some_and(|n| *n >= 50), "{seen:?}");
    let (_, v) = server.admin(reqwest::Method::GET, "/v1/submodels/head/versions", None).await;
    assert_eq!(v["serving"]["version"], "v1");
    let left: Vec<_> =
        v["previous"].as_array().unwrap().iter().map(|p| (&p["version"], &p["left_by_rollback"])).collect();
    assert_eq!(left, [(&json!("v2"), &json!(true))], "a rollback keeps the version it left: {v}");
    assert_eq!(v["rollback_to"], Json::Null, "{v}");
    let (st, body) = server.admin(reqwest::Method::POST, "/v1/submodels/head/rollback", None).await;
    assert_eq!((st, body["error"]["kind"].as_str()), (409, Some("no_previous_version")), "{body}");
    let metrics = client().get(format!("http://{}/metrics", server.addr)).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("maas_changes_total{change=\"swap\",result=\"ok\"} 1"), "{metrics}");
    assert!(metrics.contains("maas_changes_total{change=\"rollback\",result=\"ok\"} 1"), "{metrics}");
    assert!(metrics.contains("maas_submodel_version_info{submodel=\"head\",version=\"v1\"} 1"), "{metrics}");
    server.shut().await;
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_swaps_are_rejected_and_traffic_is_unaffected() {
    let tmp = TempDir::new("swap-bad");
    let outside = TempDir::new("swap-outside");
    let good = std::fs::read(root().join("assets/digits/head.safetensors")).unwrap();
    std::fs::write(tmp.0.join("truncated.safetensors"), &good[..good.len() / 2]).unwrap();
    std::fs::write(tmp.0.join("corrupt.safetensors"), b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header!}").unwrap();
    let save = |name: &str, w: (usize, usize), b: usize| {
        let t = HashMap::from([
            ("weight".to_string(), Tensor::zeros(w, candle_core::DType::F32, &Device::Cpu).unwrap()),
            ("bias".to_string(), Tensor::zeros(b, candle_core::DType::F32, &Device::Cpu).unwrap()),
        ]);
        candle_core::safetensors::save(&t, tmp.0.join(name)).unwrap();
    };
    save("bad-bias.safetensors", (10, 64), 7);
    save("narrow.safetensors", (10, 32), 10);
    std::fs::copy(root().join("assets/digits/head.safetensors"), outside.0.join("head.safetensors")).unwrap();
    #[cfg(unix)]
    std::os::unix::fs::symlink(outside.0.join("head.safetensors"), tmp.0.join("link.safetensors")).unwrap();

    let engine = digits_engine(vec![tmp.0.clone()]).await;
    let server = serve(engine.clone()).await;
    let load = Load::start(server.addr, "classify", 16, json!({ "pixels": digits_pixels() }));
    load.wait_for(20).await;
    let p = |name: &str| tmp.0.join(name).display().to_string();
    let cases = [
        ("head", json!({ "weights": p("truncated.safetensors"), "version": "v2" }), 422, "invalid_weights"),
        ("head", json!({ "weights": p("corrupt.safetensors"), "version": "v2" }), 422, "invalid_weights"),
        ("head", json!({ "weights": p("bad-bias.safetensors"), "version": "v2" }), 422, "invalid_weights"),
        ("head", json!({ "weights": p("missing.safetensors"), "version": "v2" }), 422, "invalid_weights"),
        ("head", json!({ "weights": p("narrow.safetensors"), "version": "v2" }), 409, "incompatible_signature"),
        ("head", json!({ "weights": outside.0.join("head.safetensors"), "version": "v2" }), 403, "forbidden"),
        (
            "head",
            json!({ "weights": format!("{}/../{}/head.safetensors", tmp.0.display(), outside.0.file_name().unwrap().to_str().unwrap()), "version": "v2" }),
            403,
            "forbidden",
        ),
        ("head", json!({ "weights": "/etc/passwd", "version": "v2" }), 403, "forbidden"),
        ("head", json!({ "weights": p("head.safetensors"), "version": "v1" }), 400, "invalid_request"),
        ("head", json!({ "weights": 7 }), 400, "invalid_json"),
        ("head", json!({ "params": { "sed": 2 }, "version": "v2" }), 400, "invalid_params"),
        ("nope", json!({ "version": "v2" }), 404, "unknown_submodel"),
    ];
    for (submodel, body, status, kind) in cases {
        let (st, answer) = server.swap(submodel, body.clone()).await;
        assert_eq!((st, answer["error"]["kind"].as_str()), (status, Some(kind)), "{body} -> {answer}");
        load.wait_for(5).await;
    }
    #[cfg(unix)]
    {
        let (st, answer) = server.swap("head", json!({ "weights": p("link.safetensors"), "version": "v2" })).await;
        assert_eq!(st, 403, "a symlink out of the roots: {answer}");
    }
    // A params typo names the key, the kind, what the kind takes and the closest of them.
    let (_, answer) = server.swap("head", json!({ "params": { "sed": 2 }, "version": "v2" })).await;
    let message = answer["error"]["message"].as_str().unwrap_or_default();
    assert_eq!(
        message,
        "submodel `head` (kind `linear`): unknown param `sed`; it takes: in, out, seed, quantize; did you mean `seed`?"
    );
    // The narrow head's diagnostics name the shapes that no longer fit.
    let (_, answer) = server.swap("head", json!({ "weights": p("narrow.safetensors"), "version": "v2" })).await;
    let diags = answer["error"]["diagnostics"].to_string();
    assert!(diags.contains("64") && diags.contains("32"), "{answer}");
    // Without the token, nothing is looked up.
    let r = client()
        .put(format!("http://{}/v1/submodels/head", server.addr))
        .body(json!({ "weights": p("truncated.safetensors") }).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);

    let answers = load.finish().await;
    for (_, version, labels) in versions_of(&answers, "head", "label") {
        assert_eq!((version.as_str(), labels), ("v1", json!([3, 5])), "the old version kept serving");
    }
    let (_, v) = server.admin(reqwest::Method::GET, "/v1/submodels/head/versions", None).await;
    assert_eq!((v["serving"]["version"].as_str(), v["previous"].clone()), (Some("v1"), json!([])));
    let m = engine.metrics();
    assert_eq!(m.changes.get(&("swap".into(), "ok".into())), None);
    assert!(m.changes[&("swap".into(), "rejected".into())] >= 11);

    // Recomposition is confined the same way, before any file is read; files already served
    // may be named wherever they lie (the committed head is outside the roots).
    let (_, served) = server.admin(reqwest::Method::GET, "/v1/graph", None).await;
    let served = served.as_str().expect("TOML text").to_string();
    let committed = std::fs::canonicalize(root().join("assets/digits/head.safetensors")).unwrap();
    let outside_head = outside.0.join("head.safetensors").display().to_string();
    let moved = served.replace(&committed.display().to_string(), &outside_head);
    let moved =
        if moved == served { served.replace("../../assets/digits/head.safetensors", &outside_head) } else { moved };
    assert_ne!(moved, served, "the head's weights path was found in:\n{served}");
    let (st, body) = server.admin(reqwest::Method::PUT, "/v1/graph?dry_run=true", Some(moved)).await;
    assert_eq!((st, body["error"]["kind"].as_str()), (403, Some("forbidden")), "{body}");
    // The served graph put back as it is changes nothing.
    let (st, body) = server.admin(reqwest::Method::PUT, "/v1/graph", Some(served.clone())).await;
    assert_eq!((st, body["applied"].as_bool()), (200, Some(false)), "{body}");
    assert_eq!(body["pipelines"], json!({ "added": [], "removed": [], "changed": [] }), "{body}");
    assert_eq!(body["submodels"], json!({ "added": [], "removed": [], "changed": [] }), "{body}");
    let two = served.replacen("replicas = 1", "replicas = 2", 1);
    let (st, body) = server.admin(reqwest::Method::PUT, "/v1/graph", Some(two)).await;
    assert_eq!((st, body["applied"].as_bool()), (200, Some(true)), "{body}");
    assert_eq!(body["submodels"]["changed"].as_array().map(Vec::len), Some(1), "{body}");
    server.shut().await;
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_refuses_a_version_whose_weights_changed_since() {
    let tmp = TempDir::new("rollback-changed");
    let copy = tmp.0.join("head-copy.safetensors");
    std::fs::copy(root().join("assets/digits/head.safetensors"), &copy).unwrap();
    let rolled = write_rolled_head(&tmp.0);
    let engine = digits_engine(vec![tmp.0.clone()]).await;
    let swap = |weights: &Path, version: &str| {
        let request =
            SwapRequest { weights: Some(weights.into()), version: Some(version.into()), ..Default::default() };
        engine.swap("head", request)
    };
    swap(&copy, "v2").await.expect("swap to the copy");
    swap(&rolled, "v3").await.expect("swap to the rolled head");
    // v2's file is overwritten in place (other weights, same size); its modification time moves
    // on by a second, whatever the file system's timestamp granularity.
    let before = std::fs::metadata(&copy).unwrap().modified().unwrap();
    std::fs::copy(&rolled, &copy).unwrap();
    let file = std::fs::OpenOptions::new().write(true).open(&copy).unwrap();
    file.set_modified(before + Duration::from_secs(1)).unwrap();
    let err = engine.rollback("head").await.unwrap_err();
    assert_eq!(err.kind(), "invalid_weights", "{err}");
    assert!(err.to_string().contains("changed since version `v2`"), "{err}");
    assert_eq!(engine.versions("head").unwrap().serving.version, "v3", "v3 keeps serving");
    engine.shutdown().await;
}

/// `x` -> `out` = x * `params.factor`.
struct Scale;

impl Kind for Scale {
    fn name(&self) -> &str {
        "scale"
    }

    fn signature(&self, _: &SubmodelSpec) -> Result<Signature, Vec<KindError>> {
        Ok(Signature {
            inputs: vec![PortSpec::new("x", ty("f32[B,N]"))],
            outputs: vec![PortSpec::new("out", ty("f32[B,N]"))],
        })
    }

    fn load(&self, spec: &SubmodelSpec, _: &Device) -> maas_kernels::Result<Arc<dyn Kernel>> {
        let factor = spec.params.get("factor").and_then(|v| v.as_float()).unwrap_or(1.0);
        Ok(Arc::new(ScaleKernel(factor)))
    }
}

struct ScaleKernel(f64);

impl Kernel for ScaleKernel {
    fn forward(&self, inputs: &Values) -> maas_kernels::Result<Values> {
        let x = inputs["x"].as_tensor().expect("checked");
        Ok(Values::from([("out".to_string(), Value::Tensor((x * self.0).expect("scale")))]))
    }
}

/// `x` -> `out` unchanged, once the test lets a batch through; counts batches started (`.1`) and
/// kernels dropped (`.2`: a replica's stream ended).
struct Hold(flume::Receiver<()>, Arc<AtomicUsize>, Arc<AtomicUsize>);

impl Drop for Hold {
    fn drop(&mut self) {
        self.2.fetch_add(1, SeqCst);
    }
}

impl Kind for Hold {
    fn name(&self) -> &str {
        "hold"
    }

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
        Ok(Arc::new(Hold(self.0.clone(), self.1.clone(), self.2.clone())))
    }
}

impl Kernel for Hold {
    fn forward(&self, inputs: &Values) -> maas_kernels::Result<Values> {
        self.1.fetch_add(1, SeqCst);
        let _ = self.0.recv_timeout(Duration::from_secs(20));
        Ok(Values::from([("out".to_string(), inputs["x"].clone())]))
    }
}

const TWICE: &str = r#"
[submodels.scale]
kind = "scale"
params = { factor = 2.0 }

[submodels.hold]
kind = "hold"

[pipelines.twice]
inputs = { x = "f32[B,1]" }
outputs = { y = "second.out" }
nodes.first = { submodel = "scale", inputs = { x = "$x" } }
nodes.wait = { submodel = "hold", inputs = { x = "first.out" } }
nodes.second = { submodel = "scale", inputs = { x = "wait.out" } }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_sees_one_version_of_a_submodel_it_uses_twice() {
    let (open, gate) = flume::unbounded();
    let held = Arc::new(AtomicUsize::new(0));
    let engine = Engine::builder()
        .register(Scale)
        .register(Hold(gate, held.clone(), Arc::default()))
        .from_sources(vec![SourceFile::new("twice.toml", TWICE, ".")])
        .await
        .unwrap();
    let x = || Values::from([("x".to_string(), Value::Tensor(Tensor::new(&[[1.0f32]], &Device::Cpu).unwrap()))]);
    let first = tokio::spawn({
        let e = engine.clone();
        async move { e.infer("twice", x()).await }
    });
    // The request has used `scale` once and waits at `hold`: swap `scale` now.
    until("the request reaches `hold`", || held.load(SeqCst) > 0).await;
    let params = toml::Table::from_iter([("factor".to_string(), toml::Value::Float(3.0))]);
    let swapped = engine
        .swap("scale", SwapRequest { params: Some(params), version: Some("v2".into()), ..SwapRequest::default() })
        .await
        .expect("swap");
    assert_eq!(swapped.version, "v2");
    open.send(()).unwrap();
    let r = first.await.unwrap().expect("the request admitted before the swap completes");
    let y: Vec<f32> = r.outputs["y"].as_tensor().unwrap().flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!((y, r.versions["scale"].as_str()), (vec![4.0], "v1"), "both uses of `scale` ran v1 (2 x 2)");
    open.send(()).unwrap();
    let r = engine.infer("twice", x()).await.unwrap();
    let y: Vec<f32> = r.outputs["y"].as_tensor().unwrap().flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!((y, r.versions["scale"].as_str()), (vec![9.0], "v2"), "a new request runs v2 twice (3 x 3)");
    assert_eq!(engine.versions("scale").unwrap().previous[0].version, "v1");
    engine.shutdown().await;
}

/// Polls `cond`; fails the test after 10 s.
async fn until(what: &str, cond: impl Fn() -> bool) {
    assert!(common::eventually(Duration::from_secs(10), cond).await, "never: {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_version_stops_once_its_last_request_ends() {
    let (open, gate) = flume::unbounded();
    let (held, dropped) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let graph = "[submodels.hold]\nkind = \"hold\"\nbatch = { max_size = 1 }\n\n[pipelines.p]\n\
                 inputs = { x = \"f32[B,1]\" }\noutputs = { y = \"n.out\" }\n\
                 nodes.n = { submodel = \"hold\", inputs = { x = \"$x\" } }\n";
    let engine = Engine::builder()
        .register(Hold(gate, held.clone(), dropped.clone()))
        .from_sources(vec![SourceFile::new("p.toml", graph, ".")])
        .await
        .unwrap();
    // The kind keeps one instance; only kernels count.
    let kind_drops = dropped.load(SeqCst);
    let x = || Values::from([("x".to_string(), Value::Tensor(Tensor::new(&[[1.0f32]], &Device::Cpu).unwrap()))]);
    let infer = || {
        let e = engine.clone();
        tokio::spawn(async move { e.infer("p", x()).await })
    };
    let running = infer();
    until("the first request runs", || held.load(SeqCst) == 1).await;
    let waiting = infer();
    until("the second request queues", || engine.metrics().submodels["hold"].queued == 1).await;
    let swapped = engine.swap("hold", SwapRequest { version: Some("v2".into()), ..SwapRequest::default() }).await;
    assert_eq!(swapped.unwrap().version, "v2");
    // The queued request gives up; the running one finishes on v1.
    waiting.abort();
    assert!(waiting.await.unwrap_err().is_cancelled());
    assert_eq!(dropped.load(SeqCst), kind_drops, "v1 still serves a request");
    open.send(()).unwrap();
    assert_eq!(running.await.unwrap().unwrap().versions["hold"], "v1");
    // Nothing holds v1 any more: its actor drains (the abandoned job leaves the queue gauge)
    // and stops, and its replica's kernel is dropped.
    until("v1's kernel is dropped", || dropped.load(SeqCst) == kind_drops + 1).await;
    until("the queue gauge is back to 0", || engine.metrics().submodels["hold"].queued == 0).await;
    open.send(()).unwrap();
    assert_eq!(infer().await.unwrap().unwrap().versions["hold"], "v2");
    assert_eq!(dropped.load(SeqCst), kind_drops + 1, "v2 serves on");
    engine.shutdown().await;
}

/// `scale`, counting loads in progress (and the most seen at once); each load takes 50 ms (a
/// slow load, so that two unserialised swaps would overlap; not a wait for some state).
struct SlowScale(Arc<(AtomicUsize, AtomicUsize)>);

impl Kind for SlowScale {
    fn name(&self) -> &str {
        "scale"
    }

    fn signature(&self, spec: &SubmodelSpec) -> Result<Signature, Vec<KindError>> {
        Scale.signature(spec)
    }

    fn load(&self, spec: &SubmodelSpec, device: &Device) -> maas_kernels::Result<Arc<dyn Kernel>> {
        let now = self.0.0.fetch_add(1, SeqCst) + 1;
        self.0.1.fetch_max(now, SeqCst);
        std::thread::sleep(Duration::from_millis(50));
        self.0.0.fetch_sub(1, SeqCst);
        Scale.load(spec, device)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_swaps_of_one_submodel_are_serialised() {
    let loads = Arc::new((AtomicUsize::new(0), AtomicUsize::new(0)));
    let graph = "[submodels.scale]\nkind = \"scale\"\nparams = { factor = 2.0 }\n\n[pipelines.p]\n\
                 inputs = { x = \"f32[B,1]\" }\noutputs = { y = \"n.out\" }\n\
                 nodes.n = { submodel = \"scale\", inputs = { x = \"$x\" } }\n";
    let engine = Engine::builder()
        .register(SlowScale(loads.clone()))
        .from_sources(vec![SourceFile::new("p.toml", graph, ".")])
        .await
        .unwrap();
    let swap = |version: &str| {
        let (e, version) = (engine.clone(), version.to_string());
        tokio::spawn(async move {
            let params = toml::Table::from_iter([("factor".to_string(), toml::Value::Float(3.0))]);
            e.swap("scale", SwapRequest { params: Some(params), version: Some(version), ..SwapRequest::default() })
                .await
        })
    };
    let (a, b) = (swap("a"), swap("b"));
    let (a, b) = (a.await.unwrap().expect("swap a"), b.await.unwrap().expect("swap b"));
    assert_eq!(loads.1.load(SeqCst), 1, "two versions were loading at once");
    // Whichever went second replaced the first: both are in the history, in order.
    let (first, second) = if a.previous == "v1" { (a, b) } else { (b, a) };
    assert_eq!((first.previous.as_str(), second.previous.as_str()), ("v1", first.version.as_str()));
    let v = engine.versions("scale").unwrap();
    assert_eq!(v.serving.version, second.version);
    let previous: Vec<&str> = v.previous.iter().map(|p| p.version.as_str()).collect();
    assert_eq!(previous, [first.version.as_str(), "v1"]);
    engine.shutdown().await;
}

const LINEARS: &str = r#"
[submodels.a]
kind = "linear"
params = { in = 4, out = 2, seed = 1 }

[submodels.b]
kind = "linear"
params = { in = 4, out = 2, seed = 2 }

[submodels.head1]
kind = "linear"
params = { in = 4, out = 3, seed = 3 }

[pipelines.keep]
inputs = { x = "f32[B,4]" }
outputs = { y = "n.out" }
nodes.n = { submodel = "a", inputs = { x = "$x" } }

[pipelines.gone]
inputs = { x = "f32[B,4]" }
outputs = { y = "n.out" }
nodes.n = { submodel = "b", inputs = { x = "$x" } }

[pipelines.rewire]
inputs = { x = "f32[B,4]" }
outputs = { y = "h.out" }
nodes.n = { submodel = "a", inputs = { x = "$x" } }
nodes.h = { submodel = "head1", inputs = { x = "$x" } }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recompose_under_load_adds_rewires_and_removes_pipelines() {
    let engine = Engine::builder().from_sources(vec![SourceFile::new("linears.toml", LINEARS, ".")]).await.unwrap();
    let server = serve(engine.clone()).await;
    let x = json!({ "x": [[1.0, 2.0, 3.0, 4.0]] });
    let keep = Load::start(server.addr, "keep", 8, x.clone());
    let rewire = Load::start(server.addr, "rewire", 8, x.clone());
    keep.wait_for(30).await;
    let (st, _) = server.infer("gone", &x).await;
    assert_eq!(st, 200);

    // `new` added, `rewire` moved to a new head (and off `a`), `gone` and its submodel removed.
    let next = LINEARS
        .replace("[submodels.b]\nkind = \"linear\"\nparams = { in = 4, out = 2, seed = 2 }\n", "")
        .replace(
            "[pipelines.gone]\ninputs = { x = \"f32[B,4]\" }\noutputs = { y = \"n.out\" }\nnodes.n = { submodel = \"b\", inputs = { x = \"$x\" } }\n",
            "",
        )
        .replace(
            "nodes.n = { submodel = \"a\", inputs = { x = \"$x\" } }\nnodes.h = { submodel = \"head1\", inputs = { x = \"$x\" } }",
            "nodes.h = { submodel = \"head2\", inputs = { x = \"$x\" } }",
        )
        + r#"
[submodels.head2]
kind = "linear"
params = { in = 4, out = 5, seed = 4 }

[pipelines.new]
inputs = { x = "f32[B,4]" }
outputs = { y = "n.out" }
nodes.n = { submodel = "head2", inputs = { x = "$x" } }
"#;
    let put = |body: String, query: &'static str| {
        let addr = server.addr;
        async move {
            let r = client()
                .put(format!("http://{addr}/v1/graph{query}"))
                .bearer_auth(TOKEN)
                .body(body)
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.json::<Json>().await.unwrap())
        }
    };
    // An invalid graph is rejected whole, with the checker's diagnostics.
    let (st, body) =
        put(next.replace("seed = 4 }\n\n[pipelines.new]", "seed = 4 }\n\n[pipelines.new]\nbogus = 1"), "").await;
    assert_eq!((st, body["error"]["kind"].as_str()), (422, Some("invalid_graph")), "{body}");
    assert!(body["error"]["diagnostics"][0].as_str().unwrap().contains("request.toml:"), "{body}");
    // `rewire`'s output widens from 3 to 5: refused unless the request says it means it.
    let (st, body) = put(next.clone(), "?dry_run=true").await;
    assert_eq!((st, body["error"]["kind"].as_str()), (409, Some("output_type_changed")), "{body}");
    assert_eq!(body["error"]["diagnostics"], json!(["pipeline `rewire` output `y`: f32[B,3] -> f32[B,5]"]));
    // A dry run diffs and changes nothing.
    let (st, body) = put(next.clone(), "?dry_run=true&allow_signature_change=true").await;
    assert_eq!(st, 200, "{body}");
    assert_eq!((body["applied"].as_bool(), body["dry_run"].as_bool()), (Some(false), Some(true)));
    assert_eq!(body["pipelines"], json!({ "added": ["new"], "removed": ["gone"], "changed": ["rewire"] }));
    assert_eq!(body["submodels"], json!({ "added": ["head2"], "removed": ["b"], "changed": [] }));
    assert_eq!(server.infer("gone", &x).await.0, 200, "a dry run changes nothing");
    assert_eq!(server.infer("new", &x).await.0, 404);

    let (st, body) = put(next, "?allow_signature_change=true").await;
    assert_eq!((st, body["applied"].as_bool()), (200, Some(true)), "{body}");
    let applied = Instant::now();
    assert_eq!(server.output_type("rewire", "y").await, "f32[B,5]");
    rewire.wait_for(30).await;
    let (st, body) = server.infer("gone", &x).await;
    assert_eq!((st, body["error"]["kind"].as_str()), (404, Some("unknown_pipeline")));
    let (st, body) = server.infer("new", &x).await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["outputs"]["y"][0].as_array().map(Vec::len), Some(5));

    let keep = keep.finish().await;
    let rewire = rewire.finish().await;
    assert!(keep.iter().all(|a| a.status == 200), "`keep` lost requests");
    for a in &rewire {
        assert_eq!(a.status, 200, "`rewire` lost a request: {}", a.body);
        let width = a.body["outputs"]["y"][0].as_array().map(Vec::len);
        let versions = a.body["model_versions"].as_object().unwrap();
        // Old plan: `a` and `head1` (3 wide); new plan: `head2` alone (5 wide); never a mix.
        match width {
            Some(3) => assert!(versions.contains_key("head1") && versions.contains_key("a") && a.started < applied),
            Some(5) => assert!(versions.contains_key("head2") && versions.len() == 1),
            other => panic!("unexpected output width {other:?}"),
        }
    }
    assert!(rewire.iter().any(|a| a.body["model_versions"].get("head2").is_some()), "the rewire took effect");
    let names: Vec<String> = engine.submodels().into_iter().map(|s| s.name).collect();
    assert_eq!(names, ["a", "head1", "head2"].map(String::from), "`b` is stopped and gone");
    assert!(engine.graph().pipelines.contains_key("new"));
    server.shut().await;
    engine.shutdown().await;
}

fn minilm_graph() -> PathBuf {
    let g = root().join("examples/pipelines/minilm.toml");
    assert!(
        root().join("models/all-MiniLM-L6-v2/model.safetensors").is_file(),
        "the MiniLM model is missing: run scripts/fetch-models"
    );
    g
}

/// The MiniLM weights with the last layer's output projection tripled: embeddings change,
/// shapes don't.
fn write_shifted_encoder(dir: &Path) -> PathBuf {
    let path = root().join("models/all-MiniLM-L6-v2/model.safetensors");
    let mut t = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let key = t.keys().find(|k| k.ends_with("layer.5.output.dense.weight")).expect("last layer's output").clone();
    let shifted = (&t[&key] * 3.0).unwrap();
    t.insert(key, shifted);
    let out = dir.join("encoder-shifted.safetensors");
    candle_core::safetensors::save(&t, &out).unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swapping_the_minilm_encoder_under_load_never_mixes_versions_in_a_similarity_request() {
    let graph = minilm_graph();
    let tmp = TempDir::new("swap-minilm");
    let shifted = write_shifted_encoder(&tmp.0);
    let options = EngineOptions { file_roots: Some(vec![tmp.0.clone()]), ..EngineOptions::default() };
    let engine = Engine::builder().options(options).from_files(&[graph]).await.unwrap();
    let server = serve(engine.clone()).await;
    let text = "a submodel can be replaced while it serves";
    let (_, before) = server.infer("embed", &json!({ "text": [text] })).await;
    // Identical texts: a request whose two branches ran on one encoder scores 1; a request that
    // mixed two encoders would not.
    let load = Load::start(server.addr, "similarity", 16, json!({ "a": [text], "b": [text] }));
    load.wait_for(16).await;
    let (st, body) = server.swap("encoder", json!({ "weights": shifted, "version": "shifted" })).await;
    assert_eq!(st, 200, "{body}");
    let swapped = Instant::now();
    load.wait_for(32).await;
    let rollback_sent = Instant::now();
    let (st, body) = server.admin(reqwest::Method::POST, "/v1/submodels/encoder/rollback", None).await;
    assert_eq!(st, 200, "{body}");
    let rolled_back = Instant::now();
    load.wait_for(16).await;
    let again_sent = Instant::now();
    let (st, body) = server.swap("encoder", json!({ "weights": shifted, "version": "shifted-again" })).await;
    assert_eq!(st, 200, "{body}");
    let last = Instant::now();
    load.wait_for(32).await;
    let answers = load.finish().await;
    let mut by_version = HashMap::<String, usize>::new();
    for (a, version, score) in versions_of(&answers, "encoder", "score") {
        let s = score[0].as_f64().unwrap();
        assert!((s - 1.0).abs() < 1e-4, "version {version}: similarity of a text with itself is {s}");
        // Sent after a change answered, and answered before the next one was sent.
        if a.started > last {
            assert_eq!(version, "shifted-again");
        } else if a.started > rolled_back && a.finished < again_sent {
            assert_eq!(version, "v1", "sent after the rollback answered");
        } else if a.started > swapped && a.finished < rollback_sent {
            assert_eq!(version, "shifted", "sent after the swap answered");
        }
        *by_version.entry(version).or_default() += 1;
    }
    assert!(by_version.len() >= 2, "requests saw more than one version: {by_version:?}");
    assert!(by_version.get("shifted").is_some_and(|n| *n > 0), "{by_version:?}");
    let (_, after) = server.infer("embed", &json!({ "text": [text] })).await;
    assert_eq!(after["model_versions"]["encoder"], "shifted-again");
    let (e0, e1) = (&before["outputs"]["embedding"][0], &after["outputs"]["embedding"][0]);
    let dot: f64 = e0
        .as_array()
        .unwrap()
        .iter()
        .zip(e1.as_array().unwrap())
        .map(|(a, b)| a.as_f64().unwrap() * b.as_f64().unwrap())
        .sum();
    assert!(dot < 0.999, "the shifted encoder computes other embeddings (cosine {dot})");
    server.shut().await;
    engine.shutdown().await;
}

/// A linear head (4 -> 4) and a softmax: `probs` is `f32[B,4]` as long as the head's `out` is 4.
const PROBS: &str = r#"
[submodels.head]
kind = "linear"
params = { in = 4, out = 4, seed = 1 }

[submodels.probs]
kind = "softmax"

[pipelines.p]
inputs = { x = "f32[B,4]" }
outputs = { probs = "probs.out" }
nodes.head = { submodel = "head", inputs = { x = "$x" } }
nodes.probs = { submodel = "probs", inputs = { x = "head.out" } }
"#;

async fn probs_server(options: EngineOptions) -> (Engine, Server) {
    let engine =
        Engine::builder().options(options).from_sources(vec![SourceFile::new("probs.toml", PROBS, ".")]).await.unwrap();
    let server = serve(engine.clone()).await;
    (engine, server)
}

impl Server {
    /// The type `GET /v1/pipelines` gives `pipeline`'s `output`.
    async fn output_type(&self, pipeline: &str, output: &str) -> String {
        let (st, body) = self.admin(reqwest::Method::GET, "/v1/pipelines", None).await;
        assert_eq!(st, 200, "{body}");
        let p = body["pipelines"].as_array().unwrap().iter().find(|p| p["name"] == pipeline).expect("listed").clone();
        p["outputs"][output].as_str().unwrap_or_else(|| panic!("no output `{output}`: {p}")).to_string()
    }

    /// `p`'s answer to one row: (width of `probs`, version of `head`).
    async fn probs(&self) -> (usize, String) {
        let (st, body) = self.infer("p", &json!({ "x": [[1.0, 2.0, 3.0, 4.0]] })).await;
        assert_eq!(st, 200, "{body}");
        let width = body["outputs"]["probs"][0].as_array().map_or(0, Vec::len);
        (width, body["model_versions"]["head"].as_str().unwrap_or_default().to_string())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swap_that_changes_an_output_type_is_refused_unless_it_says_so() {
    let (engine, server) = probs_server(EngineOptions::default()).await;
    assert_eq!(server.output_type("p", "probs").await, "f32[B,4]");

    let (st, body) = server.swap("head", json!({ "params": { "out": 5 }, "version": "v2" })).await;
    assert_eq!((st, body["error"]["kind"].as_str()), (409, Some("output_type_changed")), "{body}");
    assert_eq!(body["error"]["diagnostics"], json!(["pipeline `p` output `probs`: f32[B,4] -> f32[B,5]"]), "{body}");
    assert_eq!(server.probs().await, (4, "v1".into()), "the refused swap changed nothing");
    assert_eq!(server.output_type("p", "probs").await, "f32[B,4]");

    // Said on purpose: applied, and the listing describes what serves.
    let body = json!({ "params": { "out": 5 }, "version": "v2", "allow_signature_change": true });
    let (st, answer) = server.swap("head", body).await;
    assert_eq!(st, 200, "{answer}");
    assert_eq!(server.probs().await, (5, "v2".into()));
    assert_eq!(server.output_type("p", "probs").await, "f32[B,5]");
    assert_eq!(engine.pipeline("p").unwrap().outputs[0].1.to_string(), "f32[B,5]");

    // A swap that keeps the types needs no permission.
    let (st, answer) = server.swap("head", json!({ "params": { "seed": 2 }, "version": "v3" })).await;
    assert_eq!(st, 200, "{answer}");
    assert_eq!(server.output_type("p", "probs").await, "f32[B,5]");

    // A rollback returns to the types its version served with.
    let (st, answer) = server.admin(reqwest::Method::POST, "/v1/submodels/head/rollback", None).await;
    assert_eq!((st, answer["version"].as_str()), (200, Some("v2")), "{answer}");
    let (st, answer) = server.admin(reqwest::Method::POST, "/v1/submodels/head/rollback", None).await;
    assert_eq!((st, answer["version"].as_str()), (200, Some("v1")), "{answer}");
    assert_eq!(server.probs().await, (4, "v1".into()));
    assert_eq!(server.output_type("p", "probs").await, "f32[B,4]");
    // Going forward again to a 5-wide version is a swap like any other: it must say so.
    let (st, body) = server.swap("head", json!({ "version": "v3" })).await;
    assert_eq!((st, body["error"]["kind"].as_str()), (409, Some("output_type_changed")), "{body}");
    let (st, answer) = server.swap("head", json!({ "version": "v3", "allow_signature_change": true })).await;
    assert_eq!(st, 200, "{answer}");
    assert_eq!(server.probs().await, (5, "v3".into()));
    assert_eq!(server.output_type("p", "probs").await, "f32[B,5]");
    server.shut().await;
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recomposition_that_changes_an_output_type_is_refused_unless_it_says_so() {
    let (engine, server) = probs_server(EngineOptions::default()).await;
    let wider = PROBS.replace("out = 4", "out = 6");
    for query in ["", "?dry_run=true"] {
        let (st, body) = server.admin(reqwest::Method::PUT, &format!("/v1/graph{query}"), Some(wider.clone())).await;
        assert_eq!((st, body["error"]["kind"].as_str()), (409, Some("output_type_changed")), "{query}: {body}");
        assert_eq!(body["error"]["diagnostics"], json!(["pipeline `p` output `probs`: f32[B,4] -> f32[B,6]"]));
    }
    assert_eq!(server.probs().await, (4, "v1".into()));
    let (st, body) =
        server.admin(reqwest::Method::PUT, "/v1/graph?allow_signature_change=maybe", Some(wider.clone())).await;
    assert_eq!((st, body["error"]["kind"].as_str()), (400, Some("invalid_query")), "{body}");
    let (st, body) =
        server.admin(reqwest::Method::PUT, "/v1/graph?allow_signature_change=true", Some(wider.clone())).await;
    assert_eq!((st, body["applied"].as_bool()), (200, Some(true)), "{body}");
    let change = json!([{ "pipeline": "p", "output": "probs", "from": "f32[B,4]", "to": "f32[B,6]" }]);
    assert_eq!(body["output_type_changes"], change, "{body}");
    assert_eq!(server.probs().await.0, 6);
    assert_eq!(server.output_type("p", "probs").await, "f32[B,6]");
    server.shut().await;
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_label_names_one_content() {
    // One kept version: labels outlive the history.
    let (engine, server) = probs_server(EngineOptions { keep_versions: 1, ..EngineOptions::default() }).await;
    let (st, body) = server.swap("head", json!({ "params": { "seed": 2 }, "version": "v2" })).await;
    assert_eq!(st, 200, "{body}");
    let (st, body) = server.admin(reqwest::Method::POST, "/v1/submodels/head/rollback", None).await;
    assert_eq!((st, body["version"].as_str()), (200, Some("v1")), "{body}");
    // `v2` is seed 2: another seed, or another width (even said on purpose), under that label is
    // refused.
    let another_width = json!({ "params": { "out": 5 }, "version": "v2", "allow_signature_change": true });
    for request in [json!({ "params": { "seed": 3 }, "version": "v2" }), another_width] {
        let (st, body) = server.swap("head", request.clone()).await;
        assert_eq!((st, body["error"]["kind"].as_str()), (409, Some("version_conflict")), "{request}: {body}");
        assert!(body["error"]["message"].as_str().unwrap().contains("seed = 2"), "{body}");
    }
    // So is `v1` (not serving any more) for other content.
    let (st, body) = server.swap("head", json!({ "params": { "seed": 3 }, "version": "v3" })).await;
    assert_eq!(st, 200, "{body}");
    let (st, body) = server.swap("head", json!({ "params": { "seed": 4 }, "version": "v1" })).await;
    assert_eq!((st, body["error"]["kind"].as_str()), (409, Some("version_conflict")), "{body}");
    // `v2` was forgotten (one version kept), but its label still names seed 2: the same
    // content under it loads again.
    let v = engine.versions("head").unwrap();
    assert_eq!(v.previous.iter().map(|p| p.version.as_str()).collect::<Vec<_>>(), ["v1"]);
    let (st, body) = server.swap("head", json!({ "params": { "seed": 5 }, "version": "v2" })).await;
    assert_eq!((st, body["error"]["kind"].as_str()), (409, Some("version_conflict")), "{body}");
    let (st, body) = server.swap("head", json!({ "params": { "seed": 2 }, "version": "v2" })).await;
    assert_eq!(st, 200, "{body}");
    let (_, with_v2) = server.infer("p", &json!({ "x": [[1.0, 2.0, 3.0, 4.0]] })).await;
    let seed2 = with_v2["outputs"]["probs"].clone();
    // Labels without one given never take a used label.
    let (st, body) = server.swap("head", json!({ "params": { "seed": 6 } })).await;
    assert_eq!(st, 200, "{body}");
    let auto = body["version"].as_str().unwrap().to_string();
    assert!(!["v1", "v2", "v3"].contains(&auto.as_str()), "{auto}");
    // Every refusal left what served alone; `v2` computes what it computed before.
    let (st, body) = server.swap("head", json!({ "params": { "seed": 2 }, "version": "v2" })).await;
    assert_eq!(st, 200, "{body}");
    let (_, again) = server.infer("p", &json!({ "x": [[1.0, 2.0, 3.0, 4.0]] })).await;
    assert_eq!((&again["outputs"]["probs"], &again["model_versions"]["head"]), (&seed2, &json!("v2")));
    let m = engine.metrics();
    assert_eq!(m.changes[&("swap".into(), "rejected".into())], 4);
    server.shut().await;
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_keeps_the_version_it_leaves_and_a_swap_returns_to_it() {
    let tmp = TempDir::new("return");
    let rolled = write_rolled_head(&tmp.0);
    let engine = digits_engine(vec![tmp.0.clone()]).await;
    let server = serve(engine.clone()).await;
    let pixels = json!({ "pixels": digits_pixels() });
    let label = |body: &Json| (body["outputs"]["label"].clone(), body["model_versions"]["head"].clone());
    let (st, body) = server.swap("head", json!({ "weights": rolled, "version": "v2" })).await;
    assert_eq!(st, 200, "{body}");
    let (st, body) = server.swap("head", json!({ "weights": rolled, "version": "v3" })).await;
    assert_eq!(st, 200, "{body}");
    // Two rollbacks: back to v2, then to v1; both versions left are kept.
    for to in ["v2", "v1"] {
        let (st, body) = server.admin(reqwest::Method::POST, "/v1/submodels/head/rollback", None).await;
        assert_eq!((st, body["version"].as_str()), (200, Some(to)), "{body}");
    }
    let (_, v) = server.admin(reqwest::Method::GET, "/v1/submodels/head/versions", None).await;
    let kept: Vec<_> =
        v["previous"].as_array().unwrap().iter().map(|p| (&p["version"], &p["left_by_rollback"])).collect();
    assert_eq!(kept, [(&json!("v2"), &json!(true)), (&json!("v3"), &json!(true))], "{v}");
    assert_eq!(v["rollback_to"], Json::Null, "{v}");
    assert_eq!(label(&server.infer("classify", &pixels).await.1), (json!([3, 5]), json!("v1")));

    // Forward again, by label: v2 serves the rolled head it served before.
    let (st, body) = server.swap("head", json!({ "version": "v2" })).await;
    assert_eq!((st, body["previous"].as_str(), body["version"].as_str()), (200, Some("v1"), Some("v2")), "{body}");
    assert_eq!(label(&server.infer("classify", &pixels).await.1), (json!([4, 6]), json!("v2")));
    let v = engine.versions("head").unwrap();
    let kept: Vec<(&str, bool)> = v.previous.iter().map(|p| (p.version.as_str(), p.left_by_rollback)).collect();
    assert_eq!(kept, [("v1", false), ("v3", true)]);
    assert_eq!(v.rollback_to.as_deref(), Some("v1"));
    // A rollback undoes that return; the label with its own content is a return too.
    let (st, body) = server.admin(reqwest::Method::POST, "/v1/submodels/head/rollback", None).await;
    assert_eq!((st, body["version"].as_str()), (200, Some("v1")), "{body}");
    let (st, body) = server.swap("head", json!({ "weights": rolled, "version": "v3" })).await;
    assert_eq!((st, body["version"].as_str()), (200, Some("v3")), "{body}");
    assert_eq!(label(&server.infer("classify", &pixels).await.1), (json!([4, 6]), json!("v3")));
    let v = engine.versions("head").unwrap();
    let kept: Vec<(&str, bool)> = v.previous.iter().map(|p| (p.version.as_str(), p.left_by_rollback)).collect();
    assert_eq!(kept, [("v1", false), ("v2", true)], "each version is kept once");
    let metrics = client().get(format!("http://{}/metrics", server.addr)).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("maas_changes_total{change=\"swap\",result=\"ok\"} 4"), "{metrics}");
    assert!(metrics.contains("maas_changes_total{change=\"rollback\",result=\"ok\"} 3"), "{metrics}");
    server.shut().await;
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labels_outlive_a_restart_with_a_state_dir() {
    let tmp = TempDir::new("labels-state");
    let options =
        || EngineOptions { keep_versions: 1, state_dir: Some(tmp.0.join("state")), ..EngineOptions::default() };
    let start = || async {
        Engine::builder()
            .options(options())
            .from_sources(vec![SourceFile::new("probs.toml", PROBS, ".")])
            .await
            .unwrap()
    };
    let seed = |s: i64, version: &str| SwapRequest {
        params: Some(toml::Table::from_iter([("seed".to_string(), toml::Value::Integer(s))])),
        version: Some(version.into()),
        ..SwapRequest::default()
    };
    let engine = start().await;
    engine.swap("head", seed(2, "v2")).await.expect("v2");
    engine.swap("head", seed(3, "v3")).await.expect("v3");
    assert_eq!(engine.versions("head").unwrap().previous.len(), 1, "v1 is forgotten, its label is not");
    engine.shutdown().await;

    let engine = start().await;
    assert_eq!(engine.versions("head").unwrap().serving.version, "v3");
    let err = engine.swap("head", seed(9, "v1")).await.unwrap_err();
    assert_eq!(err.kind(), "version_conflict", "{err}");
    // The recorded content compares equal to the same content given again.
    let back = engine.swap("head", seed(1, "v1")).await.expect("v1's own content under its label");
    assert_eq!((back.previous.as_str(), back.version.as_str()), ("v3", "v1"));
    engine.shutdown().await;
}
