//! The server as an attacker and a careless operator meet it: slow and idle connections, a
//! slowloris under a low file-descriptor limit, SIGTERM with a slow client, empty graphs,
//! numbers out of range, big bodies, framework-level rejections and how they are counted.
//!
//! Connection-level cases run the real `maas serve` binary (timeouts, the connection cap and
//! shutdown are its server loop's); request-level ones run the router in process.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use maas::http::HttpConfig;
use maas_engine::Engine;
use serde_json::{Value as Json, json};

mod common;
use common::{ServeProcess, TempDir, serve};

/// A `maas serve` child with the embedded default graph (see [`ServeProcess`]).
struct Serve(ServeProcess);

impl Serve {
    fn start(args: &[&str], fd_limit: Option<u32>, dir: &std::path::Path) -> Self {
        Self(ServeProcess::spawn(args, dir, fd_limit).unwrap_or_else(|e| panic!("{e}")))
    }

    fn pid(&self) -> u32 {
        self.0.child.id()
    }

    /// A kB figure from /proc/PID/status (`VmRSS`, `VmHWM`).
    fn status_kb(&self, key: &str) -> u64 {
        let text = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let line = text.lines().find(|l| l.starts_with(key)).unwrap_or_else(|| panic!("no {key}"));
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }
}

impl std::ops::Deref for Serve {
    type Target = ServeProcess;

    fn deref(&self) -> &ServeProcess {
        &self.0
    }
}

impl std::ops::DerefMut for Serve {
    fn deref_mut(&mut self) -> &mut ServeProcess {
        &mut self.0
    }
}

/// One request on a fresh connection (`connection: close`); the status and the body, or the
/// I/O error that ended it.
fn request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<(u16, Json)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut head =
        format!("{method} {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: {}\r\n", body.len());
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes())?;
    s.write_all(body)?;
    let mut answer = Vec::new();
    s.read_to_end(&mut answer)?;
    let text = String::from_utf8_lossy(&answer);
    let status = text
        .get(9..12)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not HTTP: {text:?}")))?;
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Ok((status, serde_json::from_str(body).unwrap_or(Json::String(body.to_string()))))
}

/// Seconds until the server closes `s` (reads until EOF), at most `limit`; `None` if still open.
fn closed_after(s: &mut TcpStream, limit: Duration) -> Option<f64> {
    let start = Instant::now();
    s.set_read_timeout(Some(limit)).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Some(start.elapsed().as_secs_f64()),
            Ok(_) => continue, // an answer (e.g. a 408) before the close
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return None;
            }
            Err(_) => return Some(start.elapsed().as_secs_f64()), // reset
        }
    }
}

#[test]
fn slow_headers_slow_bodies_and_idle_connections_are_closed() {
    let tmp = TempDir::new("timeouts");
    let server = Serve::start(&["--header-timeout", "1", "--body-timeout", "1", "--idle-timeout", "2"], None, &tmp.0);
    let addr = server.addr.as_str();

    // Half a header, then nothing.
    let mut slow_header = TcpStream::connect(addr).unwrap();
    slow_header.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n").unwrap();
    // Nothing at all.
    let mut silent = TcpStream::connect(addr).unwrap();
    let silent_opened = Instant::now();
    // A keep-alive connection left idle after one answered request.
    let mut kept = TcpStream::connect(addr).unwrap();
    kept.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
    // A body sent one byte a second.
    let mut slow_body = TcpStream::connect(addr).unwrap();
    slow_body
        .write_all(b"POST /v1/pipelines/classify/infer HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\n\r\n{")
        .unwrap();
    let dripping = {
        let mut s = slow_body.try_clone().unwrap();
        std::thread::spawn(move || {
            for _ in 0..8 {
                std::thread::sleep(Duration::from_secs(1));
                if s.write_all(b" ").is_err() {
                    break;
                }
            }
        })
    };

    let header = closed_after(&mut slow_header, Duration::from_secs(15)).expect("a slow header is cut");
    assert!(header < 5.0, "closed after {header} s");
    closed_after(&mut silent, Duration::from_secs(15)).expect("a silent connection is cut");
    let silent_for = silent_opened.elapsed().as_secs_f64();
    assert!(silent_for < 5.0, "a connection that sends nothing owes its header: closed after {silent_for} s");
    let keep_alive = closed_after(&mut kept, Duration::from_secs(15)).expect("an idle keep-alive connection is cut");
    assert!(keep_alive > 1.0 && keep_alive < 8.0, "closed after {keep_alive} s, with a 2 s idle timeout");
    let mut answer = Vec::new();
    slow_body.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let _ = slow_body.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains(r#""kind":"body_timeout""#), "{answer}");
    dripping.join().unwrap();

    // The server still answers, and counted what it closed.
    let (status, _) = request(addr, "GET", "/healthz", &[], b"").unwrap();
    assert_eq!(status, 200);
    let (_, metrics) = request(addr, "GET", "/metrics", &[], b"").unwrap();
    let metrics = metrics.as_str().unwrap().to_string();
    assert!(metrics.contains(r#"maas_http_connections_timed_out_total{timeout="header"} 2"#), "{metrics}");
    assert!(metrics.contains(r#"maas_http_connections_timed_out_total{timeout="idle"} 1"#), "{metrics}");
    assert!(metrics.contains(r#"maas_http_errors_total{kind="body_timeout",status="408"} 1"#), "{metrics}");
}

#[test]
fn a_slowloris_under_a_low_descriptor_limit_does_not_lock_out_other_clients() {
    let tmp = TempDir::new("slowloris");
    // 256 descriptors: the default cap leaves 64 of them for everything but connections.
    let server = Serve::start(&["--header-timeout", "2"], Some(256), &tmp.0);
    let addr = server.addr.as_str();
    let mut attack = Vec::new();
    for _ in 0..400 {
        if let Ok(mut s) = TcpStream::connect(addr) {
            let _ = s.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-slow: ");
            attack.push(s);
        }
    }
    // While every attacking socket stays open on the client's side, a well-behaved client gets
    // through: at once with a 503 (over the cap) and, once the slow headers are cut, a 200.
    let start = Instant::now();
    let mut statuses = Vec::new();
    let served = loop {
        match request(addr, "GET", "/healthz", &[], b"") {
            Ok((200, _)) => break true,
            Ok((status, body)) => statuses.push(format!("{status} {body}")),
            Err(e) => statuses.push(e.to_string()),
        }
        if start.elapsed() > Duration::from_secs(20) {
            break false;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(served, "locked out for 20 s by {} slow connections: {statuses:?}", attack.len());
    // Over the cap a client is told so (or, when many refusals are in progress at once, its
    // connection is closed); it is never answered anything else.
    assert!(
        statuses.iter().all(|s| (s.starts_with("503") && s.contains("overloaded")) || !s.starts_with(char::is_numeric)),
        "{statuses:?}"
    );
    let (_, metrics) = request(addr, "GET", "/metrics", &[], b"").unwrap();
    let metrics = metrics.as_str().unwrap().to_string();
    let refused = metrics.lines().find_map(|l| l.strip_prefix("maas_http_connections_refused_total ")).unwrap();
    assert!(refused.parse::<u64>().unwrap() > 0, "{metrics}");
    drop(attack);
}

#[test]
fn sigterm_with_slow_clients_connected_exits_after_the_grace_period() {
    let tmp = TempDir::new("sigterm-slow");
    let mut server = Serve::start(
        &["--header-timeout", "60", "--body-timeout", "60", "--idle-timeout", "60", "--shutdown-grace", "1"],
        None,
        &tmp.0,
    );
    let addr = server.addr.clone();
    let mut partial_header = TcpStream::connect(&addr).unwrap();
    partial_header.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n").unwrap();
    let mut slow_body = TcpStream::connect(&addr).unwrap();
    slow_body
        .write_all(b"POST /v1/pipelines/classify/infer HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{")
        .unwrap();
    let idle = TcpStream::connect(&addr).unwrap();
    // Give the server time to see the bytes (they are on their way already).
    let (status, _) = request(&addr, "GET", "/healthz", &[], b"").unwrap();
    assert_eq!(status, 200);
    let sent = Instant::now();
    server.sigterm();
    let code = server.wait(Duration::from_secs(20));
    assert_eq!(code, Some(0), "SIGTERM with slow clients connected must end the process with 0 (within 20 s)");
    let took = sent.elapsed().as_secs_f64();
    let lines: Vec<String> = server.lines.try_iter().collect();
    assert!(lines.iter().any(|l| l.contains("maas: stopped")), "{lines:?}");
    assert!(took < 15.0, "took {took} s");
    drop((partial_header, slow_body, idle));
}

#[test]
fn a_16_mib_body_costs_a_small_multiple_of_its_size() {
    let tmp = TempDir::new("big-body");
    let server = Serve::start(&[], None, &tmp.0);
    let addr = server.addr.as_str();
    // 16 MiB of pixel rows (more rows than a request may have, so it is decoded, then refused).
    let row =
        format!("[{}]", (0..64).map(|i| format!("{:.6}", f64::from(i % 17) * 0.937)).collect::<Vec<_>>().join(","));
    let mut body = String::from(r#"{"inputs": {"pixels": ["#);
    while body.len() + row.len() + 4 < (16 << 20) {
        body.push_str(&row);
        body.push(',');
    }
    body.pop();
    body.push_str("]}}");
    // Warm up the path (allocator arenas, the decode thread) with a small request first.
    let (status, _) = request(
        addr,
        "POST",
        "/v1/pipelines/classify/infer",
        &[],
        format!(r#"{{"inputs": {{"pixels": [{row}]}}}}"#).as_bytes(),
    )
    .unwrap();
    assert_eq!(status, 200);
    // Reset the peak to what is resident now, so the start-up peak cannot hide growth.
    std::fs::write(format!("/proc/{}/clear_refs", server.pid()), "5").unwrap();
    let before = server.status_kb("VmRSS");
    let (status, answer) = request(addr, "POST", "/v1/pipelines/classify/infer", &[], body.as_bytes()).unwrap();
    assert_eq!(status, 413, "{answer}");
    assert_eq!(answer["error"]["kind"], "too_many_rows", "the body was decoded whole before the row limit: {answer}");
    let peak = server.status_kb("VmHWM");
    let grew_mib = peak.saturating_sub(before) as f64 / 1024.0;
    eprintln!("a {} MiB body: peak resident grew by {grew_mib:.1} MiB", body.len() >> 20);
    assert!(grew_mib < 4.0 * 16.0, "a 16 MiB body raised the peak by {grew_mib:.1} MiB (more than 4x its size)");
}

async fn digits_engine() -> Engine {
    Engine::from_files(&[concat!(env!("CARGO_MANIFEST_DIR"), "/examples/pipelines/digits.toml")]).await.unwrap()
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap()
}

async fn call(
    addr: std::net::SocketAddr,
    method: reqwest::Method,
    path: &str,
    auth: Option<&str>,
    body: &str,
) -> (u16, Json) {
    let mut r = client().request(method, format!("http://{addr}{path}")).body(body.to_string());
    if let Some(a) = auth {
        r = r.header("authorization", a);
    }
    let r = r.send().await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Json::String(text)))
}

fn admin() -> HttpConfig {
    HttpConfig { admin_token: Some("secret".into()), ..HttpConfig::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_graph_is_refused_unless_asked_for_and_then_nothing_is_ready() {
    let server = serve(digits_engine().await, admin()).await;
    let auth = Some("Bearer secret");
    for body in ["", "  \n"] {
        let (status, answer) = call(server.addr, reqwest::Method::PUT, "/v1/graph", auth, body).await;
        assert_eq!((status, answer["error"]["kind"].as_str()), (400, Some("empty_graph")), "{answer}");
    }
    let no_pipelines = "# nothing served\n[submodels.x]\nkind = \"identity\"\n";
    let (status, answer) = call(server.addr, reqwest::Method::PUT, "/v1/graph", auth, no_pipelines).await;
    assert_eq!((status, answer["error"]["kind"].as_str()), (400, Some("empty_graph")), "{answer}");
    let (status, _) = call(server.addr, reqwest::Method::POST, "/v1/pipelines/classify/infer", None, "{}").await;
    assert_ne!(status, 404, "classify still serves");
    let (status, _) = call(server.addr, reqwest::Method::GET, "/readyz", None, "").await;
    assert_eq!(status, 200);

    let (status, answer) =
        call(server.addr, reqwest::Method::PUT, "/v1/graph?allow_empty=true", auth, "# nothing served\n").await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["pipelines"]["removed"], json!(["classify"]));
    let (status, answer) = call(server.addr, reqwest::Method::GET, "/readyz", None, "").await;
    assert_eq!(status, 503, "nothing served is not ready: {answer}");
    server.shut().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn numbers_that_do_not_fit_the_ports_dtype_are_400_naming_input_row_and_value() {
    let dir = TempDir::new("strict-numbers");
    let graph = dir.0.join("pool.toml");
    std::fs::write(
        &graph,
        r#"
[submodels.pool]
kind = "mean_pool"

[pipelines.pool]
inputs = { hidden = "f32[B,S,2]", mask = "u32[B,S]" }
outputs = { out = "p.out" }

[pipelines.pool.nodes]
p = { submodel = "pool", inputs = { hidden = "$hidden", mask = "$mask" } }
"#,
    )
    .unwrap();
    let pool = Engine::from_files(&[graph]).await.unwrap();
    let digits = digits_engine().await;
    let server = serve(digits.clone(), HttpConfig::default()).await;
    let pixels = |bad: &str| {
        format!(r#"{{"inputs": {{"pixels": [[{}], [{bad}{}]]}}}}"#, ["0"; 64].join(","), [",0"; 63].concat())
    };
    let (status, answer) =
        call(server.addr, reqwest::Method::POST, "/v1/pipelines/classify/infer", None, &pixels("-1e39")).await;
    assert_eq!((status, answer["error"]["kind"].as_str()), (400, Some("invalid_input")), "{answer}");
    let message = answer["error"]["message"].as_str().unwrap();
    assert!(message.contains("input `pixels`: row 1: -1e39 is outside f32's finite range"), "{message}");
    let (status, _) =
        call(server.addr, reqwest::Method::POST, "/v1/pipelines/classify/infer", None, &pixels("16")).await;
    assert_eq!(status, 200);
    server.shut().await;

    let server = serve(pool.clone(), HttpConfig::default()).await;
    let body = r#"{"inputs": {"hidden": [[[1, 2], [3, 4]]], "mask": [[1, 1099511627776]]}}"#;
    let (status, answer) = call(server.addr, reqwest::Method::POST, "/v1/pipelines/pool/infer", None, body).await;
    assert_eq!(status, 400, "{answer}");
    let message = answer["error"]["message"].as_str().unwrap();
    assert!(message.contains("input `mask`: row 0: 1099511627776 is outside u32's range 0..=4294967295"), "{message}");
    let body = r#"{"inputs": {"hidden": [[[1, 2], [3, 4]]], "mask": [[1, 0]]}}"#;
    let (status, answer) = call(server.addr, reqwest::Method::POST, "/v1/pipelines/pool/infer", None, body).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["outputs"]["out"], json!([[1.0, 2.0]]));
    server.shut().await;
    pool.shutdown().await;
    digits.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn framework_rejections_are_json_counted_by_kind_and_the_bearer_scheme_is_case_insensitive() {
    let server = serve(digits_engine().await, admin()).await;
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let auth = format!("{scheme} secret");
        let (status, _) = call(server.addr, reqwest::Method::GET, "/v1/submodels/head/versions", Some(&auth), "").await;
        assert_eq!(status, 200, "{scheme}");
    }
    let (status, _) =
        call(server.addr, reqwest::Method::GET, "/v1/submodels/head/versions", Some("Basic secret"), "").await;
    assert_eq!(status, 401);

    // Too many header fields: the JSON error shape, not an empty body.
    let mut r = client().get(format!("http://{}/healthz", server.addr));
    for i in 0..150 {
        r = r.header(format!("x-h{i}"), "v");
    }
    let r = r.send().await.unwrap();
    assert_eq!(r.status().as_u16(), 431);
    let answer: Json = r.json().await.unwrap();
    assert_eq!(answer["error"]["kind"], "headers_too_large", "{answer}");

    let bad = [("{", "invalid_json"), (r#"{"inputs": {"pixels": [[1e39]]}}"#, "invalid_input")];
    for (body, kind) in bad {
        let (status, answer) =
            call(server.addr, reqwest::Method::POST, "/v1/pipelines/classify/infer", None, body).await;
        assert_eq!((status, answer["error"]["kind"].as_str()), (400, Some(kind)), "{answer}");
    }
    let r = client()
        .post(format!("http://{}/v1/pipelines/classify/infer", server.addr))
        .header("x-maas-deadline-ms", "soon")
        .body(r#"{"inputs": {"pixels": [[0]]}}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let metrics = client().get(format!("http://{}/metrics", server.addr)).send().await.unwrap().text().await.unwrap();
    for line in [
        r#"maas_http_errors_total{kind="invalid_json",status="400"} 1"#,
        r#"maas_http_errors_total{kind="invalid_input",status="400"} 1"#,
        r#"maas_http_errors_total{kind="invalid_header",status="400"} 1"#,
        r#"maas_http_errors_total{kind="headers_too_large",status="431"} 1"#,
        r#"maas_http_errors_total{kind="unauthorized",status="401"} 1"#,
    ] {
        assert!(metrics.contains(line), "{line} missing from:\n{metrics}");
    }
    server.shut().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_takes_no_byte_of_its_answer_is_cut_after_the_idle_timeout() {
    let dir = TempDir::new("write-timeout");
    let graph = dir.0.join("echo.toml");
    std::fs::write(
        &graph,
        "[submodels.id]\nkind = \"identity\"\n\n[pipelines.echo]\ninputs = { x = \"f32[B,512]\" }\n\
         outputs = { y = \"a.out\" }\nnodes.a = { submodel = \"id\", inputs = { x = \"$x\" } }\n",
    )
    .unwrap();
    let engine = Engine::from_files(&[graph]).await.unwrap();
    let config = HttpConfig::default();
    let metrics = config.metrics.clone();
    let limits = maas::server::ServerConfig {
        header_timeout: Duration::from_secs(5),
        idle_timeout: Duration::from_millis(500),
        max_connections: 8,
        shutdown_grace: Duration::from_secs(1),
    };
    let server = common::serve_with(engine.clone(), config, limits).await;
    // A 9 MB request whose answer is ~21 MB (2048 rows of 512 numbers, each written back as
    // 0.12345600128173828), far more than the socket buffers hold.
    let row = format!("[{}]", vec!["0.123456"; 512].join(","));
    let body = format!(r#"{{"inputs": {{"x": [{}]}}}}"#, vec![row.as_str(); 2048].join(","));
    let addr = server.addr;
    let reader = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        let head =
            format!("POST /v1/pipelines/echo/infer HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n", body.len());
        s.write_all(head.as_bytes()).unwrap();
        s.write_all(body.as_bytes()).unwrap();
        // Take nothing for 3 s (six idle timeouts), then read what is left: the server must
        // have given up on the answer and closed the connection.
        std::thread::sleep(Duration::from_secs(3));
        let mut answer = Vec::new();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = s.read_to_end(&mut answer);
        answer.len()
    });
    let got = reader.await.unwrap();
    assert!(got < 20_000_000, "the answer was not cut: {got} bytes read");
    assert!(
        common::eventually(Duration::from_secs(5), || metrics.render_to_string().contains(r#"timeout="write"} 1"#))
            .await,
        "{}",
        metrics.render_to_string()
    );
    server.shut().await;
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_internal_edge_that_does_not_fit_is_a_failure_not_the_clients_fault() {
    let dir = TempDir::new("internal-edge");
    let graph = dir.0.join("top.toml");
    // `topk` takes any width N, so the checker accepts k = 5 after a 3-wide head; the request
    // is well-formed, and the fault is the graph's.
    std::fs::write(
        &graph,
        r#"
[submodels.head]
kind = "linear"
params = { in = 4, out = 3, seed = 1 }

[submodels.top]
kind = "topk"
params = { k = 5 }

[pipelines.p]
inputs = { x = "f32[B,4]" }
outputs = { values = "t.values" }

[pipelines.p.nodes]
h = { submodel = "head", inputs = { x = "$x" } }
t = { submodel = "top", inputs = { x = "h.out" } }
"#,
    )
    .unwrap();
    let engine = Engine::from_files(&[graph]).await.unwrap();
    let err = engine.infer("p", one_row_x()).await.unwrap_err();
    assert_eq!(err.kind(), "submodel_failed", "{err}");
    assert!(err.to_string().contains("node `t`"), "{err}");
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_label_has_a_bounded_length() {
    let server = serve(digits_engine().await, admin()).await;
    let long = "v".repeat(129);
    let body = json!({ "params": { "seed": 3 }, "version": long }).to_string();
    let (status, answer) =
        call(server.addr, reqwest::Method::PUT, "/v1/submodels/head", Some("Bearer secret"), &body).await;
    assert_eq!((status, answer["error"]["kind"].as_str()), (400, Some("invalid_request")), "{answer}");
    assert!(answer["error"]["message"].as_str().unwrap().contains("at most 128"), "{answer}");
    server.shut().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recomposition_that_keeps_a_label_for_new_content_keeps_the_old_one_under_its_own() {
    let dir = TempDir::new("relabel");
    let graph = |seed: u32| {
        format!(
            "[submodels.head]\nkind = \"linear\"\nparams = {{ in = 4, out = 2, seed = {seed} }}\n\n[pipelines.p]\n\
             inputs = {{ x = \"f32[B,4]\" }}\noutputs = {{ y = \"h.out\" }}\nnodes.h = {{ submodel = \"head\", inputs = {{ x = \"$x\" }} }}\n"
        )
    };
    let file = dir.0.join("g.toml");
    std::fs::write(&file, graph(1)).unwrap();
    let engine = Engine::from_files(&[&file]).await.unwrap();
    let before = engine.infer("p", one_row_x()).await.unwrap();
    let source = maas_graphs::SourceFile::new("g.toml", graph(2), dir.0.clone());
    let r = engine.recompose(vec![source], false).await.unwrap();
    assert!(r.applied);
    assert!(r.warnings.iter().any(|w| w.contains("kept as `v1~r")), "{:?}", r.warnings);
    let after = engine.infer("p", one_row_x()).await.unwrap();
    assert_eq!(after.versions["head"], "v1");
    let kept = engine.versions("head").unwrap().previous[0].version.clone();
    assert!(kept.starts_with("v1~r"), "{kept}");
    // Back to the first weights: reported under their own label, not the new content's.
    let back = engine.rollback("head").await.unwrap();
    assert_eq!(back.version, kept);
    let again = engine.infer("p", one_row_x()).await.unwrap();
    assert_eq!(again.versions["head"], kept);
    let y = |r: &maas_engine::Response| r.outputs["y"].as_tensor().unwrap().to_vec2::<f32>().unwrap();
    assert_eq!(y(&again), y(&before), "the kept version computes what v1 computed before");
    assert_ne!(y(&after), y(&before), "seed 2 computes something else");
    engine.shutdown().await;
}

#[test]
fn a_connection_over_the_cap_is_told_503_overloaded() {
    let tmp = TempDir::new("cap");
    let server = Serve::start(&["--max-connections", "1", "--header-timeout", "30"], None, &tmp.0);
    let addr = server.addr.as_str();
    let (status, _) = request(addr, "GET", "/healthz", &[], b"").unwrap();
    assert_eq!(status, 200, "one connection at a time is served");
    // The one slot is held by a connection that is still sending its header.
    let mut held = TcpStream::connect(addr).unwrap();
    held.write_all(b"GET /healthz HTTP/1.1\r\n").unwrap();
    let refused = (0..50).find_map(|_| {
        let answer = request(addr, "POST", "/v1/pipelines/classify/infer", &[], br#"{"inputs": {}}"#);
        match answer {
            Ok((503, body)) => Some(body),
            _ => {
                std::thread::sleep(Duration::from_millis(20)); // until the held one has its slot
                None
            }
        }
    });
    let body = refused.expect("a client over the cap gets an answer, not a reset");
    assert_eq!(body["error"]["kind"], "overloaded", "{body}");
    drop(held);
}

/// Input `x` with one row, `[1, 2, 3, 4]`.
fn one_row_x() -> maas_kernels::Values {
    let t = candle_core::Tensor::new(&[[1f32, 2., 3., 4.]], &candle_core::Device::Cpu).unwrap();
    maas_kernels::Values::from([("x".to_string(), maas_kernels::Value::Tensor(t))])
}
