//! `maas train` on examples/training/digits.toml: the jobs reach their accuracy through the CLI,
//! the sync job is reproducible for a seed, async stays within its staleness bound, compression
//! sends fewer bytes than dense, the written weights serve unchanged (the served pipeline gives
//! the accuracy the report claims), bad data is refused before training, and `--swap-into`
//! puts the trained head into a live server while 16 callers use it (none fails; afterwards
//! every response carries the new version and the trained weights' outputs), unless the job's
//! `min_accuracy` is not reached.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use maas_engine::Sequential;
use maas_graphs::SourceFile;
use maas_kernels::{Registry, Value, Values};

mod common;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn out_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("maas-train-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// Runs `maas train` and answers (exit code, the JSON report or Null, stderr).
fn train(args: &[&str]) -> (i32, serde_json::Value, String) {
    common::maas_json(&[&["train"], args].concat(), &[])
}

/// The accuracy of `examples/pipelines/digits.toml` served with its head's weights from
/// `head`, on the held-out rows of the split the jobs use.
fn served_accuracy(head: &Path) -> f64 {
    let dir = root().join("examples/pipelines");
    let text = std::fs::read_to_string(dir.join("digits.toml")).unwrap();
    let from = "weights = \"../../assets/digits/head.safetensors\"";
    assert!(text.contains(from));
    let text = text.replace(from, &format!("weights = {:?}", head.display().to_string()));
    let registry = Registry::builtin();
    let checked = maas_engine::load_sources(vec![SourceFile::new("digits.toml", text, dir)], &registry).unwrap();
    let engine = Sequential::new(&checked.graph, &registry).unwrap();
    let all = maas::digits::load(&maas::digits::default_path()).unwrap();
    let (_, test_rows) = maas_train::trainer::split(all.len(), 0.2, 1797);
    let mut pixels = Vec::new();
    for &i in &test_rows {
        pixels.extend_from_slice(all.image(i));
    }
    let x = Tensor::from_vec(pixels, (test_rows.len(), 64), &Device::Cpu).unwrap();
    let out = engine.run("classify", Values::from([("pixels".to_string(), Value::Tensor(x))])).unwrap();
    let labels: Vec<u32> = out["label"].as_tensor().unwrap().to_vec1().unwrap();
    let correct = labels.iter().zip(&test_rows).filter(|(l, i)| **l == all.labels[**i]).count();
    correct as f64 / test_rows.len() as f64
}

#[test]
fn the_head_job_trains_a_head_that_serves_with_its_reported_accuracy() {
    let dir = out_dir("head");
    let (code, report, stderr) =
        train(&["examples/training/digits.toml", "--job", "head", "--out", dir.to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("head: epoch 10/10: loss"), "progress on stderr: {stderr}");
    let accuracy = report["accuracy"].as_f64().unwrap();
    assert!(accuracy >= 0.97, "held-out accuracy {accuracy}");
    assert_eq!(report["rows"], serde_json::json!([1437, 360]), "the split of the committed model's test");
    for key in [
        "job",
        "loss",
        "epochs",
        "steps",
        "workers",
        "servers",
        "mode",
        "compression",
        "error_feedback",
        "bytes_sent",
        "bytes_dense",
        "staleness",
        "elapsed_s",
        "samples_per_s",
        "weights",
        "version",
    ] {
        assert!(!report[key].is_null(), "report has no `{key}`: {report}");
    }
    let head = PathBuf::from(report["weights"]["head"].as_str().unwrap());
    assert_eq!(head, dir.join("head.safetensors"));
    // The file serves unchanged, and the served pipeline agrees with the report.
    let served = served_accuracy(&head);
    assert!((served - accuracy).abs() <= 1.0 / 360.0 + 1e-9, "served {served} vs reported {accuracy}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sync_training_is_reproducible_for_a_seed_and_changes_with_it() {
    let run = |seed: &str, name: &str| {
        let dir = out_dir(name);
        let (code, report, stderr) = train(&[
            "examples/training/digits.toml",
            "--job",
            "head",
            "--epochs",
            "2",
            "--workers",
            "2",
            "--servers",
            "2",
            "--seed",
            seed,
            "--out",
            dir.to_str().unwrap(),
        ]);
        assert_eq!(code, 0, "{stderr}");
        let _ = std::fs::remove_dir_all(&dir);
        report["version"].as_str().unwrap().to_string()
    };
    let (a, b, c) = (run("3", "a"), run("3", "b"), run("4", "c"));
    assert_eq!(a, b, "same seed, same weights");
    assert_ne!(a, c, "another seed, other weights");
}

#[test]
fn async_workers_stay_within_the_staleness_bound_and_compression_sends_less() {
    let dir = out_dir("async");
    let (code, report, stderr) = train(&[
        "examples/training/digits.toml",
        "--job",
        "head",
        "--workers",
        "2",
        "--servers",
        "2",
        "--mode",
        "async",
        "--staleness",
        "1",
        "--compression",
        "topk:0.05",
        "--epochs",
        "4",
        "--out",
        dir.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(report["mode"], "async");
    let max = report["staleness"]["max"].as_u64().unwrap();
    assert!(max <= 1, "observed staleness {max} over the bound 1: {report}");
    let (sent, dense) = (report["bytes_sent"].as_u64().unwrap(), report["bytes_dense"].as_u64().unwrap());
    // 8 bytes per value kept (index and value) against 4 per value dense: about 2 x 0.05.
    assert!(sent * 8 < dense, "topk:0.05 sent {sent} of {dense} bytes");
    assert!(report["accuracy"].as_f64().unwrap() > 0.9, "{report}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_data_is_refused_before_training_with_its_line() {
    let dir = out_dir("bad");
    std::fs::create_dir_all(&dir).unwrap();
    let row = |label: &str| format!("{}{label}\n", "1,".repeat(64));
    std::fs::write(dir.join("bad.csv"), format!("{}{}{}", row("3"), row("4"), row("12"))).unwrap();
    let graph = std::fs::read_to_string(root().join("examples/training/digits.toml"))
        .unwrap()
        .replace("../../data/digits.csv.gz", dir.join("bad.csv").to_str().unwrap())
        .replace("../../assets", root().join("assets").to_str().unwrap());
    std::fs::write(dir.join("job.toml"), graph).unwrap();
    let (code, _, stderr) =
        train(&[dir.join("job.toml").to_str().unwrap(), "--job", "head", "--out", dir.join("out").to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(stderr.contains("bad.csv:3: label 12 (column 64) is outside the 10 classes"), "{stderr}");
    assert!(!dir.join("out").exists(), "nothing is written");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `maas train` with `MAAS_ADMIN_TOKEN` set.
fn train_with_token(args: Vec<String>) -> (i32, serde_json::Value, String) {
    let args: Vec<&str> = std::iter::once("train").chain(args.iter().map(String::as_str)).collect();
    common::maas_json(&args, &[("MAAS_ADMIN_TOKEN", "train-secret")])
}

/// 16 callers posting `body` to `classify` in a loop until stopped, counting answers.
struct Callers {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ok: std::sync::Arc<std::sync::atomic::AtomicU64>,
    failed: std::sync::Arc<std::sync::atomic::AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Callers {
    fn start(url: &str, body: &str) -> Self {
        use std::sync::atomic::Ordering::SeqCst;
        let client = reqwest::Client::new();
        let mut callers =
            Self { stop: Default::default(), ok: Default::default(), failed: Default::default(), tasks: Vec::new() };
        for _ in 0..16 {
            let (stop, ok, failed) = (callers.stop.clone(), callers.ok.clone(), callers.failed.clone());
            let (client, body, endpoint) =
                (client.clone(), body.to_string(), format!("{url}/v1/pipelines/classify/infer"));
            callers.tasks.push(tokio::spawn(async move {
                while !stop.load(SeqCst) {
                    let r = client
                        .post(&endpoint)
                        .header("content-type", "application/json")
                        .body(body.clone())
                        .send()
                        .await;
                    match r {
                        Ok(r) if r.status().is_success() => ok.fetch_add(1, SeqCst),
                        _ => failed.fetch_add(1, SeqCst),
                    };
                }
            }));
        }
        callers
    }

    /// Stops them; (answered, failed).
    async fn stop(self) -> (u64, u64) {
        use std::sync::atomic::Ordering::SeqCst;
        self.stop.store(true, SeqCst);
        for t in self.tasks {
            t.await.unwrap();
        }
        (self.ok.load(SeqCst), self.failed.load(SeqCst))
    }
}

/// `classify` at `url` answers `body` with `version` of `head`, computing what the weights in
/// `head` compute.
async fn serves_the_trained_head(url: &str, body: &str, version: &str, head: &Path) {
    let r: serde_json::Value = reqwest::Client::new()
        .post(format!("{url}/v1/pipelines/classify/infer"))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["model_versions"]["head"], version, "{r}");
    let want = probs_with_head(head);
    let got: Vec<Vec<f32>> = serde_json::from_value(r["outputs"]["probs"].clone()).unwrap();
    for (g, w) in got.iter().flatten().zip(want.iter().flatten()) {
        assert!((g - w).abs() < 1e-5, "served {g} vs trained weights {w}");
    }
}

/// examples/pipelines/digits.toml served over HTTP (admin token `train-secret`), its swaps
/// allowed to read `trained`: the engine, the server and its URL.
async fn pipelines_server(trained: &Path) -> (maas_engine::Engine, common::Server, String) {
    let options = maas_engine::EngineOptions {
        file_roots: Some(vec![root().join("examples/pipelines"), root().join("assets"), trained.to_path_buf()]),
        ..Default::default()
    };
    let engine = maas_engine::Engine::builder()
        .options(options)
        .from_files(&[root().join("examples/pipelines/digits.toml")])
        .await
        .expect("digits serves");
    let config = maas::http::HttpConfig { admin_token: Some("train-secret".into()), ..Default::default() };
    let server = common::serve(engine.clone(), config).await;
    let url = format!("http://{}", server.addr);
    (engine, server, url)
}

/// The committed two-image input of examples/inputs/digits.json.
fn two_images() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(root().join("examples/inputs/digits.json")).unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trained_head_is_swapped_into_a_live_server_with_no_failed_request() {
    let out = common::TempDir::new("swap-into");
    let (_, server, url) = pipelines_server(&out.0).await;
    let body = serde_json::json!({ "inputs": { "pixels": two_images() } }).to_string();

    // 16 callers on `classify` for as long as the job trains and swaps.
    let callers = Callers::start(&url, &body);

    let args: Vec<String> =
        ["examples/training/digits.toml", "--job", "head", "--epochs", "3", "--swap-into", &url, "--out"]
            .iter()
            .map(|s| s.to_string())
            .chain([out.0.join("head").display().to_string()])
            .collect();
    let (code, report, stderr) = tokio::task::spawn_blocking(move || train_with_token(args)).await.unwrap();
    let (ok, failed) = callers.stop().await;
    assert_eq!(code, 0, "{stderr}");
    let version = report["version"].as_str().unwrap().to_string();
    assert_eq!(report["swapped"]["head"]["version"], version.as_str(), "{report}");
    assert_eq!(failed, 0, "requests failed while the job trained and swapped");
    assert!(ok > 0);

    serves_the_trained_head(&url, &body, &version, &PathBuf::from(report["weights"]["head"].as_str().unwrap())).await;
    server.shut().await;
}

#[test]
fn a_job_below_its_min_accuracy_swaps_nothing() {
    let dir = out_dir("gate");
    std::fs::create_dir_all(&dir).unwrap();
    let graph = std::fs::read_to_string(root().join("examples/training/digits.toml"))
        .unwrap()
        .replace("../../", &format!("{}/", root().display()))
        .replace("seed = 7\n\n# Everything", "seed = 7\nmin_accuracy = 1.0\n\n# Everything");
    std::fs::write(dir.join("job.toml"), graph).unwrap();
    // Nothing listens at this URL: a swap attempt would fail the command.
    let args = vec![
        dir.join("job.toml").display().to_string(),
        "--job".into(),
        "head".into(),
        "--epochs".into(),
        "1".into(),
        "--swap-into".into(),
        "http://127.0.0.1:9".into(),
        "--out".into(),
        dir.join("out").display().to_string(),
    ];
    let (code, report, stderr) = train_with_token(args);
    assert_eq!(code, 0, "{stderr}");
    assert!(report["swap_refused"].as_str().unwrap().contains("below min_accuracy 1"), "{report}");
    assert!(report["swapped"].is_null());
    let _ = std::fs::remove_dir_all(&dir);
}

/// The jobs of examples/training/digits.toml, checked, by name.
fn digits_jobs() -> std::collections::BTreeMap<String, maas_train::job::Job> {
    let path = root().join("examples/training/digits.toml");
    let source = SourceFile::read(&path).unwrap();
    let registry = Registry::builtin();
    let checked = maas_engine::load_sources(vec![source.clone()], &registry).unwrap();
    maas_train::job::check(&[source], &checked, &registry).unwrap().into_iter().map(|j| (j.name.clone(), j)).collect()
}

/// An engine serving examples/training/digits.toml whose swaps may read `trained`.
async fn digits_engine(trained: &Path) -> maas_engine::Engine {
    let options = maas_engine::EngineOptions {
        file_roots: Some(vec![root().join("examples/training"), root().join("assets"), trained.to_path_buf()]),
        ..Default::default()
    };
    maas_engine::Engine::builder()
        .options(options)
        .from_files(&[root().join("examples/training/digits.toml")])
        .await
        .expect("digits serves")
}

/// What examples/pipelines/digits.toml's `classify` computes for the two committed images with
/// its head's weights from `head`.
fn probs_with_head(head: &Path) -> Vec<Vec<f32>> {
    let dir = root().join("examples/pipelines");
    let text = std::fs::read_to_string(dir.join("digits.toml")).unwrap().replace(
        "weights = \"../../assets/digits/head.safetensors\"",
        &format!("weights = {:?}", head.display().to_string()),
    );
    let registry = Registry::builtin();
    let checked = maas_engine::load_sources(vec![SourceFile::new("digits.toml", text, dir)], &registry).unwrap();
    let direct = Sequential::new(&checked.graph, &registry).unwrap();
    let pixels: Vec<Vec<f32>> = serde_json::from_value(two_images()).unwrap();
    let x = Tensor::new(pixels, &Device::Cpu).unwrap();
    direct.run("classify", Values::from([("pixels".to_string(), Value::Tensor(x))])).unwrap()["probs"]
        .as_tensor()
        .unwrap()
        .to_vec2()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_started_on_the_live_server_swaps_its_head_in_with_no_failed_request() {
    use std::sync::Arc;
    use std::sync::atomic::Ordering::SeqCst;
    let trained = common::TempDir::new("live-training");
    let engine = digits_engine(&trained.0).await;
    let config = maas::http::HttpConfig {
        admin_token: Some("train-secret".into()),
        training_jobs: Arc::new(digits_jobs()),
        training_dir: trained.0.clone(),
        ..Default::default()
    };
    let server = common::serve(engine, config).await;
    let url = format!("http://{}", server.addr);
    let client = reqwest::Client::new();
    let admin = |r: reqwest::RequestBuilder| r.bearer_auth("train-secret");
    let body = serde_json::json!({ "inputs": { "pixels": two_images() } }).to_string();

    // Admin only; unknown jobs and bad overrides are refused with their reason.
    let r = client.post(format!("{url}/v1/training/head")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = admin(client.post(format!("{url}/v1/training/nope"))).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let e: serde_json::Value = r.json().await.unwrap();
    assert!(e["error"]["message"].as_str().unwrap().contains("end_to_end, head"), "{e}");
    let r = admin(client.post(format!("{url}/v1/training/head"))).body(r#"{"workers": 0}"#).send().await.unwrap();
    assert_eq!(r.status(), 400);
    let r = admin(client.post(format!("{url}/v1/training/head"))).body(r#"{"wrokers": 2}"#).send().await.unwrap();
    assert_eq!(r.status(), 400);
    let r = admin(client.get(format!("{url}/v1/training/head"))).send().await.unwrap();
    assert_eq!(r.status(), 404, "not started yet");

    // 16 callers on `classify` while the job trains on the server and swaps.
    let callers = Callers::start(&url, &body);
    let through = callers.ok.clone();
    assert!(
        common::eventually(std::time::Duration::from_secs(30), || through.load(SeqCst) > 0).await,
        "no caller got through"
    );
    let r = admin(client.post(format!("{url}/v1/training/head")))
        .body(r#"{"epochs": 4, "workers": 2, "servers": 2}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let started: serde_json::Value = r.json().await.unwrap();
    assert_eq!(started["state"], "running", "{started}");
    // The route answers while it runs; then wait for its end (a hang guard, not a speed check)
    // and read the final status over HTTP.
    let running: serde_json::Value =
        admin(client.get(format!("{url}/v1/training/head"))).send().await.unwrap().json().await.unwrap();
    assert!(["running", "succeeded"].contains(&running["state"].as_str().unwrap()), "{running}");
    tokio::time::timeout(std::time::Duration::from_secs(120), server.engine.wait_training("head"))
        .await
        .expect("the job ends")
        .unwrap();
    let status: serde_json::Value =
        admin(client.get(format!("{url}/v1/training/head"))).send().await.unwrap().json().await.unwrap();
    let (ok, failed) = callers.stop().await;
    assert_eq!(status["state"], "succeeded", "{status}");
    let history = status["history"].as_array().unwrap();
    assert_eq!(history.len(), 4, "one entry per epoch: {status}");
    assert!(history.iter().all(|h| h["accuracy"].as_f64().unwrap() > 0.5), "{status}");
    let version = status["report"]["version"].as_str().unwrap().to_string();
    assert_eq!(status["report"]["workers"], 2);
    assert_eq!(status["report"]["servers"], 2);
    assert_eq!(status["swapped"]["head"]["version"], version.as_str(), "{status}");
    assert_eq!(failed, 0, "requests failed while the job trained and swapped");
    assert!(ok > 0);
    let listed: serde_json::Value =
        admin(client.get(format!("{url}/v1/training"))).send().await.unwrap().json().await.unwrap();
    assert_eq!(listed["runs"][0]["job"], "head", "{listed}");

    let head = PathBuf::from(status["report"]["weights"]["head"].as_str().unwrap());
    assert!(head.starts_with(&trained.0), "{}", head.display());
    serves_the_trained_head(&url, &body, &version, &head).await;
    server.shut().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_job_writes_and_swaps_nothing() {
    use maas_engine::{TrainingError, TrainingOptions, TrainingState};
    let trained = common::TempDir::new("cancel-training");
    let engine = digits_engine(&trained.0).await;
    let before = engine.versions("head").unwrap().serving.version.clone();
    let mut job = digits_jobs().remove("head").unwrap();
    job.epochs = 10_000;
    let out = trained.0.join("head");
    let options = TrainingOptions { out: out.clone(), swap: true };
    assert!(matches!(engine.cancel_training("head"), Err(TrainingError::NotStarted(_))));
    engine.start_training(job.clone(), options.clone()).unwrap();
    assert!(matches!(engine.start_training(job, options), Err(TrainingError::AlreadyRunning(_))));
    assert!(
        common::eventually(std::time::Duration::from_secs(60), || engine.training("head").unwrap().epoch >= 1).await,
        "no epoch reported"
    );
    engine.cancel_training("head").unwrap();
    let status = engine.wait_training("head").await.unwrap();
    assert_eq!(status.state, TrainingState::Cancelled, "{status:?}");
    assert!(status.epoch < 10_000);
    assert!(!out.exists(), "a cancelled job wrote {}", out.display());
    assert_eq!(engine.versions("head").unwrap().serving.version, before);
    assert!(matches!(engine.cancel_training("head"), Err(TrainingError::NotRunning(_))));
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_diverging_job_fails_on_the_engine_and_swaps_nothing() {
    use maas_engine::{TrainingOptions, TrainingState};
    let trained = common::TempDir::new("diverge-training");
    let engine = digits_engine(&trained.0).await;
    let before = engine.versions("head").unwrap().serving.version.clone();
    let mut job = digits_jobs().remove("head").unwrap();
    job.optimizer = maas_train::optim::Optimizer::Sgd { lr: 1e38, momentum: 0.9, weight_decay: 0.0 };
    job.epochs = 3;
    let out = trained.0.join("head");
    engine.start_training(job, TrainingOptions { out: out.clone(), swap: true }).unwrap();
    let status = engine.wait_training("head").await.unwrap();
    assert_eq!(status.state, TrainingState::Failed, "{status:?}");
    let error = status.error.unwrap();
    assert!(error.contains("became NaN") && error.contains("nothing was written"), "{error}");
    assert!(!out.exists());
    assert_eq!(engine.versions("head").unwrap().serving.version, before);
    engine.shutdown().await;
}

#[test]
fn pruning_zeroes_the_smallest_weights_and_the_fine_tune_keeps_them_zero() {
    let out = out_dir("prune");
    let (code, report, stderr) = train(&[
        "examples/training/digits.toml",
        "--job",
        "head",
        "--epochs",
        "6",
        "--prune",
        "0.7",
        "--prune-epochs",
        "2",
        "--out",
        &out.display().to_string(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("fine-tune epoch 2/2"), "{stderr}");
    let p = &report["pruning"];
    let total = p["total"].as_u64().unwrap();
    let nonzero = p["nonzero"].as_u64().unwrap();
    assert!(nonzero <= total - (total as f64 * 0.7).floor() as u64, "{report}");
    assert_eq!(p["accuracy_after"], report["accuracy"]);
    assert!(p["accuracy_after"].as_f64().unwrap() >= 0.9, "{report}");
    assert!(p["accuracy_before"].as_f64().unwrap() >= 0.9, "{report}");
    // The file written holds exactly those zeros, and serves with the accuracy reported.
    let head = PathBuf::from(report["weights"]["head"].as_str().unwrap());
    let tensors = candle_core::safetensors::load(&head, &Device::Cpu).unwrap();
    let weight: Vec<f32> = tensors["weight"].flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(weight.len() as u64, total, "the pruned tensors are the head's weight matrix: {report}");
    assert_eq!(weight.iter().filter(|v| **v != 0.0).count() as u64, nonzero);
    let served = served_accuracy(&head);
    assert!((served - report["accuracy"].as_f64().unwrap()).abs() < 1e-9, "served {served} vs {report}");
    let _ = std::fs::remove_dir_all(&out);
}

/// `x` f32[B,2] -> `out` = x, panicking on a row whose first value is 13.
struct Panicky;

impl maas_kernels::Kind for Panicky {
    fn name(&self) -> &str {
        "panicky"
    }

    fn warm_up(&self) -> bool {
        false
    }

    fn signature(&self, _: &maas_graphs::SubmodelSpec) -> Result<maas_graphs::Signature, Vec<maas_graphs::KindError>> {
        Ok(maas_graphs::Signature {
            inputs: vec![maas_graphs::PortSpec::new("x", maas_graphs::ty("f32[B,2]"))],
            outputs: vec![maas_graphs::PortSpec::new("out", maas_graphs::ty("f32[B,2]"))],
        })
    }

    fn load(
        &self,
        _: &maas_graphs::SubmodelSpec,
        _: &Device,
    ) -> maas_kernels::Result<std::sync::Arc<dyn maas_kernels::Kernel>> {
        Ok(std::sync::Arc::new(Panicky))
    }
}

impl maas_kernels::Kernel for Panicky {
    fn forward(&self, inputs: &Values) -> maas_kernels::Result<Values> {
        let x = inputs["x"].as_tensor().expect("checked");
        let first: Vec<f32> = x.narrow(1, 0, 1).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        if first.contains(&13.0) {
            panic!("row of 13");
        }
        Ok(Values::from([("out".to_string(), Value::Tensor(x.clone()))]))
    }
}

#[test]
fn a_worker_whose_stream_panics_fails_the_job_with_its_reason_and_writes_nothing() {
    let dir = common::TempDir::new("panicking-worker");
    std::fs::write(dir.0.join("rows.csv"), "13,1,0\n13,2,1\n13,3,0\n13,4,1\n13,5,0\n13,6,1\n").unwrap();
    let graph = r#"
[submodels.pre]
kind = "panicky"

[submodels.head]
kind = "linear"
params = { in = 2, out = 2, seed = 1 }

[pipelines.p]
inputs = { x = "f32[B,2]" }
outputs = { y = "head.out" }
nodes.pre = { submodel = "pre", inputs = { x = "$x" } }
nodes.head = { submodel = "head", inputs = { x = "pre.out" } }

[training.t]
pipeline = "p"
learn = ["head"]
loss = { output = "head.out" }
data = { path = "rows.csv", inputs = { x = "0..2" }, label = 2 }
epochs = 2
batch_size = 2
workers = 2
"#;
    let mut registry = Registry::builtin();
    registry.register(Panicky);
    let source = SourceFile::new("t.toml", graph, &dir.0);
    let checked = maas_engine::load_sources(vec![source.clone()], &registry).unwrap();
    let job = maas_train::job::check(&[source], &checked, &registry).unwrap().remove(0);
    let out = dir.0.join("out");
    let err = maas_train::trainer::train(&checked.graph, &job, &registry, &out, &|_| {}).unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, maas_train::trainer::TrainError::ActorFailed { .. }), "{message}");
    assert!(message.starts_with("worker ") && message.contains("row of 13"), "{message}");
    assert!(!out.exists());
}

#[test]
fn the_jobs_held_out_rows_are_the_committed_models_test_split() {
    let all = maas::digits::load(&maas::digits::default_path()).unwrap();
    let (_, test) = maas::digits::split(&all);
    let job = digits_jobs().remove("end_to_end").unwrap();
    let (_, rows) = maas_train::trainer::split(all.len(), job.held_out, job.split_seed);
    assert_eq!(rows.len(), test.len());
    for (k, &i) in rows.iter().enumerate() {
        assert_eq!(all.image(i), &test.pixels[k * maas::digits::PIXELS..(k + 1) * maas::digits::PIXELS]);
        assert_eq!(all.labels[i], test.labels[k]);
    }
}

#[test]
fn the_end_to_end_job_trains_features_and_head_from_scratch_to_97_percent() {
    let dir = out_dir("end-to-end");
    let (code, report, stderr) =
        train(&["examples/training/digits.toml", "--job", "end_to_end", "--out", dir.to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
    let accuracy = report["accuracy"].as_f64().unwrap();
    assert!(accuracy >= 0.97, "held-out accuracy {accuracy}: {report}");
    let weights = report["weights"].as_object().unwrap();
    assert_eq!(weights.keys().collect::<Vec<_>>(), ["features", "head"]);
    // Both files serve unchanged in place of the committed ones, with the accuracy reported.
    let dir_p = root().join("examples/pipelines");
    let text = std::fs::read_to_string(dir_p.join("digits.toml"))
        .unwrap()
        .replace(
            "weights = \"../../assets/digits/features.safetensors\"",
            &format!("weights = {:?}", weights["features"].as_str().unwrap()),
        )
        .replace(
            "weights = \"../../assets/digits/head.safetensors\"",
            &format!("weights = {:?}", weights["head"].as_str().unwrap()),
        );
    assert!(!text.contains("assets/digits"), "both files replaced");
    let registry = Registry::builtin();
    let checked = maas_engine::load_sources(vec![SourceFile::new("digits.toml", text, dir_p)], &registry).unwrap();
    let served = Sequential::new(&checked.graph, &registry).unwrap();
    let all = maas::digits::load(&maas::digits::default_path()).unwrap();
    let (_, test) = maas::digits::split(&all);
    let x = Tensor::from_slice(&test.pixels, (test.len(), maas::digits::PIXELS), &Device::Cpu).unwrap();
    let labels: Vec<u32> =
        served.run("classify", Values::from([("pixels".to_string(), Value::Tensor(x))])).unwrap()["label"]
            .as_tensor()
            .unwrap()
            .to_vec1()
            .unwrap();
    let correct = labels.iter().zip(&test.labels).filter(|(a, b)| a == b).count();
    let served_accuracy = correct as f64 / test.len() as f64;
    assert!((served_accuracy - accuracy).abs() < 1e-9, "served {served_accuracy} vs reported {accuracy}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn overrides_and_job_settings_are_bounded_and_job_names_checked() {
    let mut job = digits_jobs().remove("head").unwrap();
    job.workers = 1;
    let over = |json: &str| serde_json::from_str::<maas_train::job::Overrides>(json).unwrap().apply(job.clone());
    assert!(over(r#"{"workers": 65}"#).unwrap_err().contains("at most 64"));
    assert!(over(r#"{"servers": 1000000}"#).unwrap_err().contains("at most 64"));
    assert!(over(r#"{"workers": 0}"#).unwrap_err().contains("at least 1"));
    assert!(over(r#"{"mode": "sometimes"}"#).unwrap_err().contains("sync or async"));
    assert!(over(r#"{"prune": 1.0}"#).unwrap_err().contains("prune"));
    assert_eq!(over(r#"{"workers": 64, "compression": "int8"}"#).unwrap().workers, 64);
    assert!(serde_json::from_str::<maas_train::job::Overrides>(r#"{"wrokers": 2}"#).is_err());

    let text = std::fs::read_to_string(root().join("examples/training/digits.toml")).unwrap();
    let bad = text
        .replace("[training.head]", "[training.\"../head\"]")
        .replace("seed = 7\n\n# Every", "seed = 7\nworkers = 100\n\n# Every");
    let source = SourceFile::new("digits.toml", bad, root().join("examples/training"));
    let registry = Registry::builtin();
    let checked = maas_engine::load_sources(vec![source.clone()], &registry).unwrap();
    let diags = maas_train::job::check(&[source], &checked, &registry).unwrap_err().to_string();
    assert!(diags.contains("training job name `../head`"), "{diags}");
    assert!(diags.contains("`workers` is at most 64, got 100"), "{diags}");
    assert!(diags.contains("digits.toml:"), "located: {diags}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_jobs_status_is_there_for_a_late_waiter() {
    use maas_engine::{TrainingOptions, TrainingState};
    let trained = common::TempDir::new("late-waiter");
    let engine = digits_engine(&trained.0).await;
    let mut job = digits_jobs().remove("head").unwrap();
    job.epochs = 1;
    engine.start_training(job, TrainingOptions { out: trained.0.join("head"), swap: false }).unwrap();
    assert!(
        common::eventually(std::time::Duration::from_secs(60), || engine.training("head").unwrap().state
            != TrainingState::Running)
        .await
    );
    // Asked after the end: answers at once (a hang here fails the test by its timeout).
    let status = tokio::time::timeout(std::time::Duration::from_secs(10), engine.wait_training("head"))
        .await
        .expect("wait_training after the end returns")
        .unwrap();
    assert_eq!(status.state, TrainingState::Succeeded, "{status:?}");
    assert_eq!(status.swap_refused.as_deref(), Some("the job was started without swapping"));
    assert!(status.swapped.is_empty());
    assert!(trained.0.join("head/head.safetensors").exists());
    // Nothing but the weights in the output directory (the staging directory is gone).
    let names: Vec<_> = std::fs::read_dir(trained.0.join("head")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, ["head.safetensors"]);
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_training_two_submodels_swaps_them_in_together_with_no_mixed_response() {
    use maas_engine::{TrainingOptions, TrainingState};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
    let trained = common::TempDir::new("together");
    let engine = digits_engine(&trained.0).await;
    let mut job = digits_jobs().remove("end_to_end").unwrap();
    job.epochs = 2;
    let pixels: Vec<Vec<f32>> = serde_json::from_value(two_images()).unwrap();
    let x = Tensor::new(pixels, &Device::Cpu).unwrap();
    // 8 callers: every answer must come from one consistent pair (both old or both new).
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, mixed, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let callers: Vec<_> = (0..8)
        .map(|_| {
            let (engine, x, stop, ok, mixed, failed) =
                (engine.clone(), x.clone(), stop.clone(), ok.clone(), mixed.clone(), failed.clone());
            tokio::spawn(async move {
                while !stop.load(SeqCst) {
                    match engine
                        .infer("classify", Values::from([("pixels".to_string(), Value::Tensor(x.clone()))]))
                        .await
                    {
                        Ok(r) if r.versions["features"] == r.versions["head"] => ok.fetch_add(1, SeqCst),
                        Ok(_) => mixed.fetch_add(1, SeqCst),
                        Err(_) => failed.fetch_add(1, SeqCst),
                    };
                }
            })
        })
        .collect();
    let out = trained.0.join("e2e");
    engine.start_training(job, TrainingOptions { out: out.clone(), swap: true }).unwrap();
    let status = tokio::time::timeout(std::time::Duration::from_secs(300), engine.wait_training("end_to_end"))
        .await
        .expect("the job ends")
        .unwrap();
    // A little more traffic after the switch.
    let after = ok.load(SeqCst);
    assert!(common::eventually(std::time::Duration::from_secs(30), || ok.load(SeqCst) > after + 50).await);
    stop.store(true, SeqCst);
    for c in callers {
        c.await.unwrap();
    }
    assert_eq!(status.state, TrainingState::Succeeded, "{status:?}");
    assert_eq!(status.swap_refused, None, "{status:?}");
    let version = status.report.as_ref().unwrap().version.clone();
    assert_eq!(status.swapped.keys().collect::<Vec<_>>(), ["features", "head"], "{status:?}");
    for s in ["features", "head"] {
        assert_eq!(status.swapped[s].version, version);
        assert_eq!(engine.versions(s).unwrap().serving.version, version);
    }
    assert_eq!(failed.load(SeqCst), 0, "requests failed during the swap");
    assert_eq!(mixed.load(SeqCst), 0, "a response mixed an old and a new submodel");
    let r = engine.infer("classify", Values::from([("pixels".to_string(), Value::Tensor(x))])).await.unwrap();
    assert_eq!((r.versions["features"].as_str(), r.versions["head"].as_str()), (version.as_str(), version.as_str()));
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swap_into_puts_both_submodels_of_end_to_end_in_together() {
    let out = common::TempDir::new("swap-into-together");
    let (engine, server, url) = pipelines_server(&out.0).await;
    let args: Vec<String> =
        ["examples/training/digits.toml", "--job", "end_to_end", "--epochs", "1", "--swap-into", &url, "--out"]
            .iter()
            .map(|s| s.to_string())
            .chain([out.0.join("e2e").display().to_string()])
            .collect();
    let (code, report, stderr) = tokio::task::spawn_blocking(move || train_with_token(args)).await.unwrap();
    assert_eq!(code, 0, "{stderr}");
    let version = report["version"].as_str().unwrap();
    for s in ["features", "head"] {
        assert_eq!(report["swapped"][s]["version"], version, "{report}");
        assert_eq!(report["swapped"][s]["previous"], "v1", "{report}");
        assert_eq!(engine.versions(s).unwrap().serving.version, version);
    }
    // Refused as a whole: an unknown submodel, or a label serving already, changes nothing.
    let client = reqwest::Client::new();
    let w = report["weights"]["head"].as_str().unwrap();
    for (body, status) in [
        (
            serde_json::json!({"submodels": {"head": {"weights": w, "version": "x2"}, "nope": {"weights": w, "version": "x2"}}}),
            404,
        ),
        (serde_json::json!({"submodels": {"head": {"weights": w, "version": version}}}), 400),
        (serde_json::json!({"submodels": {}}), 400),
    ] {
        let r = client
            .post(format!("{url}/v1/swaps"))
            .bearer_auth("train-secret")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), status, "{body}: {}", r.text().await.unwrap());
        assert_eq!(engine.versions("head").unwrap().serving.version, version);
    }
    server.shut().await;
}
