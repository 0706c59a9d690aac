//! `maas serve` as a user runs it: the real binary, the embedded default pipelines, a request
//! over TCP, and SIGTERM ending it cleanly with exit code 0.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

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
