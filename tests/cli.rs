//! The `maas run` and `maas bench` contracts: one JSON object on stdout, nothing else there.

use std::path::Path;
use std::process::Command;

mod common;

fn maas(args: &[&str]) -> (i32, serde_json::Value, String) {
    common::maas_json(args, &[])
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

/// Runs maas with `envs` set (RUST_LOG and NO_COLOR removed first); answers the exit code,
/// stdout and stderr. Its stderr is a pipe, not a terminal, as when logs go to a file.
fn maas_env(args: &[&str], envs: &[(&str, &str)]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_maas"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("RUST_LOG")
        .env_remove("NO_COLOR")
        .envs(envs.iter().copied())
        .output()
        .expect("run maas");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code().unwrap_or(-1), text(&out.stdout), text(&out.stderr))
}

/// A short in-process bench of `linear4` that swaps the `step` submodel's params (no weights)
/// every 0.3 s: swap, rollback, swap.
const PARAMS_SWAP_BENCH: &[&str] = &[
    "bench",
    "examples/pipelines/overhead.toml",
    "--pipeline",
    "linear4",
    "--duration",
    "1.2",
    "--input",
    "x=[[1,2,3,4]]",
    "--swap",
    "step",
    "--swap-params",
    r#"{"seed": 2}"#,
    "--swap-every",
    "0.3",
];

#[test]
fn bench_swaps_params_only() {
    let (code, json, stderr) = maas(PARAMS_SWAP_BENCH);
    assert_eq!(code, 0, "{stderr}");
    let changes = json["changes"].as_array().expect("changes");
    assert!(changes.len() >= 2, "{json}");
    assert_eq!(changes[0]["ok"], "v1 -> bench-1", "{json}");
    assert_eq!(changes[1]["ok"], "bench-1 -> v1", "{json}");
    assert!(changes.iter().all(|c| c.get("error").is_none()), "{json}");
    // Status lines name the change plainly.
    assert!(stderr.lines().any(|l| l.starts_with("bench: change 0 at ") && l.ends_with(": v1 -> bench-1")), "{stderr}");

    // The weights form still works, alone and with params.
    let (code, json, stderr) = maas(&[
        "bench",
        "examples/pipelines/digits.toml",
        "--pipeline",
        "classify",
        "--duration",
        "0.9",
        "--input",
        "pixels=@examples/inputs/digits.json",
        "--swap",
        "head=assets/digits/head.safetensors",
        "--swap-every",
        "0.3",
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(json["changes"][0]["ok"], "v1 -> bench-1", "{json}");

    // A swap must change something.
    let (code, _, stderr) = maas(&[
        "bench",
        "examples/pipelines/overhead.toml",
        "--pipeline",
        "linear4",
        "--input",
        "x=[[1,2,3,4]]",
        "--swap",
        "step",
    ]);
    assert_eq!(code, 1);
    assert!(stderr.contains("--swap `step` changes nothing"), "{stderr}");
    let (code, _, stderr) = maas(&[
        "bench",
        "examples/pipelines/overhead.toml",
        "--pipeline",
        "linear4",
        "--input",
        "x=[[1,2,3,4]]",
        "--swap",
        "step",
        "--swap-params",
        "[1]",
    ]);
    assert_eq!(code, 1);
    assert!(stderr.contains("--swap-params `[1]` is not a JSON object of params"), "{stderr}");
}

#[test]
fn logs_to_a_pipe_carry_no_colour_codes() {
    let (code, _, stderr) = maas_env(PARAMS_SWAP_BENCH, &[("RUST_LOG", "info")]);
    assert_eq!(code, 0, "{stderr}");
    // A tracing event (the engine's swap log), not only the binary's own lines.
    assert!(stderr.lines().any(|l| l.contains("INFO") && l.contains("swap")), "{stderr}");
    assert!(!stderr.contains('\x1b'), "escape codes in redirected logs: {stderr:?}");
}

#[test]
fn log_format_json_writes_one_object_per_line() {
    let mut args = vec!["--log-format", "json"];
    args.extend_from_slice(PARAMS_SWAP_BENCH);
    let (code, stdout, stderr) = maas_env(&args, &[("RUST_LOG", "info")]);
    assert_eq!(code, 0, "{stderr}");
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).expect("stdout is the report");
    assert!(report["changes"].is_array(), "{report}");
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l:?}")))
        .collect();
    for l in &lines {
        assert!(l["timestamp"].is_string() && l["level"].is_string() && l["target"].is_string(), "{l}");
    }
    // Both the engine's tracing events and the binary's own status lines.
    assert!(lines.iter().any(|l| l["target"].as_str().is_some_and(|t| t.starts_with("maas_engine"))), "{stderr}");
    assert!(lines.iter().any(|l| l["target"] == "bench" && l["message"].as_str().unwrap().starts_with("change 0")));
    // The flag is global: after the subcommand too.
    let mut args = PARAMS_SWAP_BENCH.to_vec();
    args.extend_from_slice(&["--log-format", "json"]);
    let (code, _, stderr) = maas_env(&args, &[]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.lines().all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()), "{stderr}");
}

#[test]
fn bench_against_a_closed_port_stops_with_a_clear_error() {
    // A port nothing listens on: bound, then released.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("http://127.0.0.1:{port}");
    let mut child = Command::new(env!("CARGO_BIN_EXE_maas"))
        .args(["bench", "--url", &url, "--pipeline", "classify", "--duration", "600", "--concurrency", "2"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start maas bench");
    // It gives up long before its 600 s run; wait at most a minute, then fail.
    let end = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if std::time::Instant::now() > end {
            let _ = child.kill();
            panic!("bench --url against a closed port still running after 60 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let out = child.wait_with_output().expect("output");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stdout.is_empty(), "{stdout}");
    let want =
        format!("error: could not connect to {url}: {} connection errors in a row", maas::bench::MAX_CONNECTION_ERRORS);
    assert!(stderr.contains(&want) && stderr.contains("is the server running there?"), "{stderr}");
}

/// `maas_protocol_requests_total{protocol="..."}` of the server at `addr`, by protocol.
fn protocol_requests(addr: &str) -> std::collections::BTreeMap<String, u64> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let text = rt
        .block_on(async { reqwest::get(format!("http://{addr}/metrics")).await?.error_for_status()?.text().await })
        .expect("GET /metrics");
    text.lines()
        .filter_map(|l| l.strip_prefix("maas_protocol_requests_total{protocol=\""))
        .filter_map(|l| l.split_once("\"} "))
        .map(|(p, n)| (p.to_string(), n.trim().parse().expect("a count")))
        .collect()
}

#[test]
fn bench_speaks_every_protocol_to_a_served_process() {
    let dir = common::TempDir::new("bench-protocols");
    // In an empty directory: the embedded default graph, `classify` only.
    let server = common::ServeProcess::spawn(&[], &dir.0, None).unwrap_or_else(|e| panic!("{e}"));
    let url = format!("http://{}", server.addr);
    // v2-binary comes in by the same routes as v2, so the server counts it as v2.
    for (protocol, counted_as) in [("json", "json"), ("v2", "v2"), ("v2-binary", "v2"), ("grpc", "grpc")] {
        let before = protocol_requests(&server.addr);
        let (code, json, stderr) = maas(&[
            "bench",
            "--url",
            &url,
            "--pipeline",
            "classify",
            "--input",
            "pixels=@examples/inputs/digits.json",
            "--protocol",
            protocol,
            "--concurrency",
            "2",
            "--duration",
            "1",
        ]);
        assert_eq!(code, 0, "{protocol}: {stderr}");
        assert_eq!(json["protocol"], protocol, "{json}");
        assert_eq!(json["url"], url.as_str(), "{json}");
        let ok = json["ok"].as_u64().expect("ok");
        assert!(ok > 0, "{protocol}: {json}");
        assert_eq!(json["errors"], serde_json::json!({}), "{protocol}: {json}");
        assert_eq!(json["requests"], json["ok"], "{protocol}: {json}");
        // The server saw them come in by that protocol.
        let after = protocol_requests(&server.addr);
        let grew = |p: &str| after.get(p).copied().unwrap_or(0) - before.get(p).copied().unwrap_or(0);
        assert!(grew(counted_as) >= ok, "{protocol}: {before:?} -> {after:?}, {ok} ok");
        for other in ["json", "v2", "grpc"].into_iter().filter(|p| *p != counted_as) {
            assert_eq!(grew(other), 0, "{protocol} sent {other} requests: {before:?} -> {after:?}");
        }
    }
    // The v2 protocols learn the inputs from the model's metadata: a wrong name stops them
    // before any load.
    for protocol in ["v2", "v2-binary", "grpc"] {
        let (code, _, stderr) =
            maas(&["bench", "--url", &url, "--pipeline", "classify", "--input", "pixel=[1]", "--protocol", protocol]);
        assert_eq!(code, 1, "{protocol}: {stderr}");
        assert!(stderr.contains("model `classify` has no input `pixel`; it takes: pixels"), "{protocol}: {stderr}");
    }
}

#[test]
fn bench_protocol_needs_url() {
    let (code, _, stderr) = maas(&[
        "bench",
        "examples/pipelines/digits.toml",
        "--pipeline",
        "classify",
        "--input",
        "pixels=@examples/inputs/digits.json",
        "--protocol",
        "grpc",
    ]);
    assert_eq!(code, 2, "a usage error: {stderr}");
    assert!(stderr.contains("required arguments were not provided") && stderr.contains("--url <URL>"), "{stderr}");
    let (code, _, stderr) = maas(&["bench", "--url", "http://127.0.0.1:1", "--pipeline", "p", "--protocol", "http3"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("[possible values: json, v2, v2-binary, grpc]"), "{stderr}");
}

#[test]
fn bench_backoff_doubles_up_to_its_cap() {
    use maas::bench::{BACKOFF_MAX, BACKOFF_START, backoff};
    assert_eq!(backoff(1), BACKOFF_START);
    assert_eq!(backoff(2), BACKOFF_START * 2);
    assert_eq!(backoff(3), BACKOFF_START * 4);
    assert_eq!(backoff(100), BACKOFF_MAX);
}

#[tokio::test(flavor = "multi_thread")]
async fn bench_swaps_params_only_over_http() {
    let engine = maas_engine::Engine::from_files(&["examples/pipelines/overhead.toml"]).await.expect("engine");
    let config = maas::http::HttpConfig { admin_token: Some("t".into()), ..Default::default() };
    let server = common::serve(engine.clone(), config).await;
    let url = format!("http://{}", server.addr);
    let mut args: Vec<String> = PARAMS_SWAP_BENCH.iter().map(|a| a.to_string()).collect();
    args.drain(1..2); // no graph file: the server's
    args.extend(["--url".to_string(), url]);
    let (code, stdout, stderr) = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        maas_env(&args, &[("MAAS_ADMIN_TOKEN", "t")])
    })
    .await
    .expect("bench");
    assert_eq!(code, 0, "{stderr}");
    let json: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON report");
    let changes = json["changes"].as_array().expect("changes");
    // Over HTTP the labels carry the run's tag: `bench-TAG-N`.
    let first = changes[0]["ok"].as_str().unwrap_or_default();
    assert!(first.starts_with("v1 -> bench-") && first.ends_with("-1"), "{json}");
    assert!(changes.iter().all(|c| c.get("error").is_none()), "{json}");
    // Changes at 0.3, 0.6 and 0.9 s: swap, rollback, swap; the last one serves.
    assert_eq!(changes.len(), 3, "{json}");
    let serving = engine.versions("step").expect("step").serving;
    let run = first.trim_start_matches("v1 -> ").strip_suffix("-1").expect("bench-TAG-1");
    assert_eq!(serving.version, format!("{run}-2"));
    assert_eq!(serving.params.get("seed").and_then(toml::Value::as_integer), Some(2), "{serving:?}");
    assert_eq!(serving.weights, None, "params only");
    server.shut().await;
    engine.shutdown().await;
}

#[test]
fn text_logs_are_coloured_only_on_a_terminal_without_no_color() {
    use maas::logging::use_colour;
    use std::ffi::OsStr;
    assert!(use_colour(true, None));
    assert!(use_colour(true, Some(OsStr::new(""))), "an empty NO_COLOR does not count");
    assert!(!use_colour(true, Some(OsStr::new("1"))));
    assert!(!use_colour(false, None));
}
