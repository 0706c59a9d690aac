//! The `maas run` and `maas bench` contracts: one JSON object on stdout, nothing else there.

use std::path::Path;
use std::process::Command;

fn maas(args: &[&str]) -> (i32, serde_json::Value, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_maas"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("RUST_LOG")
        .output()
        .expect("run maas");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let json = if out.status.success() {
        serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("stdout is not one JSON object ({e}): {stdout}"))
    } else {
        assert!(stdout.is_empty(), "a failed command wrote to stdout: {stdout}");
        serde_json::Value::Null
    };
    (out.status.code().unwrap_or(-1), json, stderr)
}

#[test]
fn run_prints_outputs_and_model_versions() {
    assert!(Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/digits/head.safetensors").is_file());
    let (code, json, stderr) = maas(&[
        "run",
        "examples/pipelines/digits.toml",
        "--pipeline",
        "classify",
        "--input",
        "pixels=@examples/inputs/digits.json",
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(json["outputs"]["label"], serde_json::json!([3, 5]));
    let probs = json["outputs"]["probs"].as_array().expect("probs");
    assert_eq!(probs.len(), 2, "outputs keep the batch dimension");
    assert_eq!(probs[0].as_array().expect("row").len(), 10);
    assert_eq!(json["model_versions"]["features"], "v1");
    assert_eq!(json["model_versions"]["head"], "v1");
}

#[test]
fn run_reports_bad_input_on_stderr_and_fails() {
    let (code, _, stderr) =
        maas(&["run", "examples/pipelines/digits.toml", "--pipeline", "classify", "--input", "pixels=[[1,2,3]]"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("input port `pixels`") && stderr.contains("f32[B,64]"), "{stderr}");
    let (code, _, stderr) =
        maas(&["run", "examples/pipelines/digits.toml", "--pipeline", "classify", "--input", "pixel=[1]"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("has no input `pixel`; it takes: pixels"), "{stderr}");
}

#[test]
fn bench_prints_one_json_report() {
    let (code, json, stderr) = maas(&[
        "bench",
        "examples/pipelines/overhead.toml",
        "--pipeline",
        "identity4",
        "--concurrency",
        "2",
        "--duration",
        "0.3",
        "--input",
        "x=[[1,2,3,4]]",
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(json["requests"].as_u64().expect("requests") > 0);
    assert_eq!(json["requests"], json["ok"]);
    assert_eq!(json["errors"], serde_json::json!({}));
    assert!(json["throughput_rps"].as_f64().expect("rps") > 0.0);
    let lat = &json["latency_ms"];
    let (p50, p99, max) = (lat["p50"].as_f64().unwrap(), lat["p99"].as_f64().unwrap(), lat["max"].as_f64().unwrap());
    assert!(0.0 < p50 && p50 <= p99 && p99 <= max, "{lat}");
    assert_eq!(json["mean_batch_rows"]["id"], 1.0);
    assert_eq!(json["mode"], "closed");

    let (code, json, stderr) = maas(&[
        "bench",
        "examples/pipelines/overhead.toml",
        "--pipeline",
        "linear4",
        "--rate",
        "200",
        "--duration",
        "0.3",
        "--input",
        "x=[[1,2,3,4]]",
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(json["mode"], "open");
    // An open loop sends on schedule whatever happens: 200/s for 0.3 s is exactly 60 sends.
    assert_eq!(json["requests"], 60, "{json}");
}
