//! `maas serve` as a user runs it: the real binary, the embedded default pipelines, a request
//! over TCP, and SIGTERM ending it cleanly with exit code 0.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

mod common;
use common::{ServeProcess, TempDir};

#[test]
fn serve_runs_the_embedded_default_and_stops_on_sigterm() {
    let scratch = std::env::temp_dir().join(format!("maas-serve-test-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).unwrap();
    // An empty working directory: no graph, no models, no repository around it.
    let mut child = Command::new(env!("CARGO_BIN_EXE_maas"))
        .args(["serve", "--addr", "127.0.0.1:0"])
        .current_dir(&scratch)
        .env_remove("MAAS_ADMIN_TOKEN")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start maas serve");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut addr = None;
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(rest) = line.split("on http://").nth(1) {
            assert!(line.contains("classify"), "{line}");
            addr = Some(rest.trim().to_string());
            break;
        }
    }
    let addr = addr.expect("serve printed its address");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let c = reqwest::Client::builder().timeout(Duration::from_secs(20)).build().unwrap();
        let ready = c.get(format!("http://{addr}/readyz")).send().await.unwrap();
        assert_eq!(ready.status().as_u16(), 200);
        let pixels =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/inputs/digits.json")).unwrap();
        let r = c
            .post(format!("http://{addr}/v1/pipelines/classify/infer"))
            .body(format!(r#"{{"inputs": {{"pixels": {pixels}}}}}"#))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["outputs"]["label"], serde_json::json!([3, 5]));
        assert_eq!(body["model_versions"]["head"], "v1");
        let r = c.post(format!("http://{addr}/v1/pipelines/embed/infer")).body("{}").send().await.unwrap();
        assert_eq!(r.status().as_u16(), 404, "no MiniLM in an empty directory");
    });
    let killed = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(killed.success());
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "SIGTERM ends serve cleanly");
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(rest.iter().any(|l| l.contains("maas: stopped")), "{rest:?}");
    let _ = std::fs::remove_dir_all(&scratch);
}

/// A running `maas serve` child and its stderr lines.
struct Child {
    p: ServeProcess,
}

impl Child {
    fn start(args: &[&str], dir: &std::path::Path) -> Self {
        let p = ServeProcess::spawn(args, dir, None).unwrap_or_else(|e| panic!("{e}"));
        Self { p }
    }

    /// Stderr lines printed so far (not yet returned).
    fn printed(&mut self) -> Vec<String> {
        let mut out = std::mem::take(&mut self.p.early);
        out.extend(self.p.lines.try_iter());
        out
    }

    fn stop(mut self) {
        let killed = Command::new("kill").args(["-TERM", &self.p.child.id().to_string()]).status().unwrap();
        assert!(killed.success());
        assert_eq!(self.p.child.wait().unwrap().code(), Some(0));
    }

    fn call(&self, method: &str, path: &str, body: Option<String>) -> (u16, serde_json::Value) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let c = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
            let mut r = c.request(method.parse().unwrap(), format!("http://{}{path}", self.p.addr)).bearer_auth("t");
            if let Some(b) = body {
                r = r.body(b);
            }
            let r = r.send().await.unwrap();
            let status = r.status().as_u16();
            let text = r.text().await.unwrap();
            (status, serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)))
        })
    }
}

#[test]
fn a_restart_with_a_state_dir_serves_the_same_versions() {
    let tmp = TempDir::new("state");
    let dir = tmp.0.clone();
    let models = dir.join("models");
    std::fs::create_dir_all(&models).unwrap();
    let head = concat!(env!("CARGO_MANIFEST_DIR"), "/assets/digits/head.safetensors");
    std::fs::copy(head, models.join("head-copy.safetensors")).unwrap();
    let args = ["--state-dir", "state", "--model-root", "models"];

    // Without a state dir, serve says that changes do not outlive it.
    let mut plain = Child::start(&[], &dir);
    let said = plain.printed().join("\n");
    assert!(said.contains("no --state-dir") && said.contains("as written"), "{said}");
    plain.stop();

    let first = Child::start(&args, &dir);
    let (st, body) = first.call(
        "PUT",
        "/v1/submodels/head",
        Some(r#"{"weights": "models/head-copy.safetensors", "version": "v2"}"#.into()),
    );
    assert_eq!(st, 200, "{body}");
    first.stop();

    let mut second = Child::start(&args, &dir);
    assert!(second.printed().join("\n").contains("recorded in"), "says it restores");
    let (_, v) = second.call("GET", "/v1/submodels/head/versions", None);
    assert_eq!(v["serving"]["version"], "v2", "{v}");
    assert_eq!(v["previous"][0]["version"], "v1", "{v}");
    let (_, r) = second.call(
        "POST",
        "/v1/pipelines/classify/infer",
        Some(format!(
            r#"{{"inputs": {{"pixels": {}}}}}"#,
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/inputs/digits.json")).unwrap()
        )),
    );
    assert_eq!(r["model_versions"]["head"], "v2", "{r}");
    let (st, body) = second.call("POST", "/v1/submodels/head/rollback", None);
    assert_eq!(st, 200, "{body}");
    second.stop();

    // The rollback kept v2, and the record keeps it and its label across a restart: the label
    // still names the copy, and naming it alone returns to it.
    std::fs::copy(head, models.join("head-other.safetensors")).unwrap();
    let third = Child::start(&args, &dir);
    let (_, v) = third.call("GET", "/v1/submodels/head/versions", None);
    assert_eq!(v["serving"]["version"], "v1", "{v}");
    let kept: Vec<_> =
        v["previous"].as_array().unwrap().iter().map(|p| (&p["version"], &p["left_by_rollback"])).collect();
    assert_eq!(kept, [(&serde_json::json!("v2"), &serde_json::json!(true))], "{v}");
    let (st, body) = third.call(
        "PUT",
        "/v1/submodels/head",
        Some(r#"{"weights": "models/head-other.safetensors", "version": "v2"}"#.into()),
    );
    assert_eq!((st, body["error"]["kind"].as_str()), (409, Some("version_conflict")), "{body}");
    let (st, body) = third.call("PUT", "/v1/submodels/head", Some(r#"{"version": "v2"}"#.into()));
    assert_eq!((st, body["previous"].as_str(), body["version"].as_str()), (200, Some("v1"), Some("v2")), "{body}");
    let (_, v) = third.call("GET", "/v1/submodels/head/versions", None);
    assert_eq!(v["serving"]["weights"].as_str().map(|w| w.ends_with("head-copy.safetensors")), Some(true), "{v}");
    third.stop();
}

#[test]
fn watch_applies_a_changed_graph_file_and_keeps_serving_an_invalid_one() {
    let tmp = TempDir::new("watch");
    let dir = tmp.0.clone();
    let assets = concat!(env!("CARGO_MANIFEST_DIR"), "/assets/digits");
    let graph = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/pipelines/digits.toml"))
        .unwrap()
        .replace("../../assets/digits", assets);
    std::fs::write(dir.join("g.toml"), &graph).unwrap();
    let mut child = Child::start(&["g.toml", "--watch"], &dir);
    let pipelines = |c: &Child| -> Vec<String> {
        let (_, b) = c.call("GET", "/v1/pipelines", None);
        b["pipelines"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap().to_string()).collect()
    };
    let wait_for = |c: &Child, want: &[&str]| {
        let end = std::time::Instant::now() + Duration::from_secs(20);
        while pipelines(c) != want {
            assert!(std::time::Instant::now() < end, "still serving {:?}", pipelines(c));
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    assert_eq!(pipelines(&child), ["classify"]);
    let added = graph.clone()
        + "\n[pipelines.logits]\ninputs = { pixels = \"f32[B,64]\" }\noutputs = { logits = \"h.out\" }\n\
           nodes.f = { submodel = \"features\", inputs = { x = \"$pixels\" } }\n\
           nodes.h = { submodel = \"head\", inputs = { x = \"f.features\" } }\n";
    std::fs::write(dir.join("g.toml"), &added).unwrap();
    wait_for(&child, &["classify", "logits"]);
    // The change is logged with plain names.
    let end = std::time::Instant::now() + Duration::from_secs(20);
    let mut said = Vec::new();
    let applied = loop {
        said.extend(child.printed());
        if let Some(l) = said.iter().find(|l| l.starts_with("maas: applied the changed graph")) {
            break l.clone();
        }
        assert!(std::time::Instant::now() < end, "no change logged: {said:?}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(applied, "maas: applied the changed graph: pipelines added: logits");
    // An invalid edit is logged with its diagnostics; the served graph stays.
    std::fs::write(dir.join("g.toml"), added.replace("f.features", "f.nope")).unwrap();
    let end = std::time::Instant::now() + Duration::from_secs(20);
    let mut said = Vec::new();
    while !said.iter().any(|l: &String| l.contains("g.toml:") && l.contains("nope")) {
        assert!(std::time::Instant::now() < end, "no diagnostics logged: {said:?}");
        said.extend(child.printed());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(pipelines(&child), ["classify", "logits"]);
    child.stop();
}
