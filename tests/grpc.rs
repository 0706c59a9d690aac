//! The Open Inference Protocol over gRPC, driven with the generated tonic client against maas's
//! own server loop on TCP (the same address serves HTTP): typed and raw contents, the size
//! limit, `grpc-timeout`, the status codes, and the per-protocol request counts.

use std::collections::HashMap;
use std::time::Duration;

use maas::http::{HttpConfig, Protocol};
use maas::v2::pb::grpc_inference_service_client::GrpcInferenceServiceClient;
use maas::v2::pb::model_infer_request::InferInputTensor;
use maas::v2::pb::{InferTensorContents, ModelInferRequest, ModelReadyRequest, ServerReadyRequest};
use maas_engine::Engine;
use maas_graphs::SourceFile;
use tonic::Code;
use tonic::transport::Channel;

mod common;

const GRAPH: &str = r#"
[submodels.lin]
kind = "linear"
params = { in = 4, out = 2, seed = 7 }

[submodels.slow]
kind = "fixed_cost"
params = { per_batch_us = 300000, per_row_us = 0 }

[pipelines.lin]
inputs = { x = "f32[B,4]" }
outputs = { y = "n.out" }
nodes.n = { submodel = "lin", inputs = { x = "$x" } }

[pipelines.slow]
inputs = { x = "f32[B,4]" }
outputs = { y = "n.out" }
nodes.n = { submodel = "slow", inputs = { x = "$x" } }
"#;

async fn engine() -> Engine {
    Engine::builder()
        .register(maas_kernels::FixedCost)
        .from_sources(vec![SourceFile::new("grpc.toml", GRAPH, ".")])
        .await
        .expect("engine starts")
}

async fn client(addr: std::net::SocketAddr) -> GrpcInferenceServiceClient<Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect()
        .await
        .expect("connects over HTTP/2 cleartext to the HTTP port");
    GrpcInferenceServiceClient::new(channel).max_decoding_message_size(64 << 20)
}

fn input(name: &str, shape: &[i64], contents: Option<InferTensorContents>) -> InferInputTensor {
    InferInputTensor {
        name: name.into(),
        datatype: "FP32".into(),
        shape: shape.to_vec(),
        parameters: HashMap::new(),
        contents,
    }
}

fn request(model: &str, inputs: Vec<InferInputTensor>, raw: Vec<Vec<u8>>) -> ModelInferRequest {
    ModelInferRequest {
        model_name: model.into(),
        model_version: String::new(),
        id: "req-1".into(),
        parameters: HashMap::new(),
        inputs,
        outputs: vec![],
        raw_input_contents: raw,
    }
}

fn le(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|f| f.to_le_bytes()).collect()
}

fn floats(raw: &[u8]) -> Vec<f32> {
    raw.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_and_raw_contents_give_the_engines_answer() {
    let e = engine().await;
    let server = common::serve(e.clone(), HttpConfig::default()).await;
    let mut c = client(server.addr).await;
    let x = [1.0f32, 2.0, 3.0, 4.0, -1.0, 0.5, 0.0, 2.0];
    let typed = InferTensorContents { fp32_contents: x.to_vec(), ..Default::default() };
    let mut with_id = tonic::Request::new(request("lin", vec![input("x", &[2, 4], Some(typed))], vec![]));
    with_id.metadata_mut().insert("x-request-id", "abc-123".parse().unwrap());
    let a = c.model_infer(with_id).await.expect("typed");
    assert_eq!(a.metadata().get("x-request-id").map(|v| v.to_str().unwrap()), Some("abc-123"), "the id is echoed");
    let a = a.into_inner();
    let b =
        c.model_infer(request("lin", vec![input("x", &[2, 4], None)], vec![le(&x)])).await.expect("raw").into_inner();
    assert_eq!(a.raw_output_contents, b.raw_output_contents);
    assert_eq!((a.model_name.as_str(), a.id.as_str()), ("lin", "req-1"));
    assert_eq!(a.outputs[0].name, "y");
    assert_eq!(a.outputs[0].datatype, "FP32");
    assert_eq!(a.outputs[0].shape, [2, 2]);
    let t = candle_core::Tensor::from_slice(&x, (2, 4), &candle_core::Device::Cpu).unwrap();
    let values = maas_kernels::Values::from([("x".to_string(), maas_kernels::Value::Tensor(t))]);
    let direct = e.infer("lin", values).await.expect("in process");
    let want = direct.outputs["y"].as_tensor().unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(floats(&a.raw_output_contents[0]), want);
    assert_eq!(
        a.parameters["lin"].parameter_choice,
        Some(maas::v2::pb::infer_parameter::ParameterChoice::StringParam("v1".into()))
    );
    let version = maas::v2::model_version("lin", [("lin", "v1")]);
    assert_eq!(a.model_version, version);
    // The version served is accepted; another one is not found.
    let mut pinned = request("lin", vec![input("x", &[2, 4], None)], vec![le(&x)]);
    pinned.model_version = version;
    assert!(c.model_infer(pinned.clone()).await.is_ok());
    pinned.model_version = "0000000000000000".into();
    let s = c.model_infer(pinned).await.expect_err("another version");
    assert_eq!(s.code(), Code::NotFound, "{s:?}");
    assert!(s.message().contains("has no version `0000000000000000`"), "{}", s.message());
    assert!(c.server_ready(ServerReadyRequest {}).await.unwrap().into_inner().ready);
    let ready = c.model_ready(ModelReadyRequest { name: "lin".into(), version: String::new() }).await.unwrap();
    assert!(ready.into_inner().ready);
    assert_eq!(server.engine.metrics().pipelines["lin"].ok, 4);
    server.shut().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_failure_has_its_code_and_a_message_that_names_the_problem() {
    let config = HttpConfig { max_body: 64 << 10, max_rows: 100, ..HttpConfig::default() };
    let metrics = config.metrics.clone();
    let server = common::serve(engine().await, config).await;
    let mut c = client(server.addr).await;
    let cases: Vec<(ModelInferRequest, Code, &str)> = vec![
        (request("nope", vec![input("x", &[1, 4], None)], vec![le(&[0.0; 4])]), Code::NotFound, "unknown model `nope`"),
        (
            request("lin", vec![input("x", &[1, 3], None)], vec![le(&[0.0; 3])]),
            Code::InvalidArgument,
            "input `x`: expected FP32 [-1, 4], got FP32 [1, 3]",
        ),
        (
            request("lin", vec![input("x", &[1, 4], None)], vec![le(&[0.0; 3])]),
            Code::InvalidArgument,
            "needs 16 bytes, got 12",
        ),
        (
            request("lin", vec![input("x", &[i64::MAX, 4], None)], vec![le(&[0.0; 4])]),
            Code::InvalidArgument,
            "too many",
        ),
        (
            request("lin", vec![input("x", &[1, 4], None)], vec![le(&[0.0; 4]), vec![]]),
            Code::InvalidArgument,
            "2 raw_input_contents for 1 inputs",
        ),
        (
            request("lin", vec![input("x", &[101, 4], None)], vec![le(&[0.0; 404])]),
            Code::ResourceExhausted,
            "at most 100",
        ),
        // A message over --max-body (64 KiB here).
        (
            request("lin", vec![input("x", &[5000, 4], None)], vec![le(&[0.0; 20000])]),
            Code::ResourceExhausted,
            "the request is over 65536 bytes (--max-body)",
        ),
    ];
    for (req, code, want) in cases {
        let s = c.model_infer(req).await.expect_err(want);
        assert_eq!(s.code(), code, "{want}: {s:?}");
        assert!(s.message().contains(want), "{want}: {}", s.message());
    }
    // The connection is still good after every refusal.
    assert!(c.model_infer(request("lin", vec![input("x", &[1, 4], None)], vec![le(&[0.0; 4])])).await.is_ok());
    assert!(metrics.requests(Protocol::Grpc) >= 7, "{}", metrics.requests(Protocol::Grpc));
    assert_eq!(metrics.requests(Protocol::Json), 0);
    server.shut().await;
}

/// One unary gRPC call over a bare HTTP/2 connection with extra headers, without tonic's
/// client (whose channel enforces `grpc-timeout` itself, racing the server): the status code
/// and message the server answered.
async fn raw_call(addr: std::net::SocketAddr, req: &ModelInferRequest, headers: &[(&str, &str)]) -> (String, String) {
    use prost::Message;
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.expect("HTTP/2 prior knowledge");
    tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();
    let mut builder = axum::http::Request::post(format!("http://{addr}/inference.GRPCInferenceService/ModelInfer"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (k, v) in headers {
        builder = builder.header(*k, *v);
    }
    let (response, mut send) = client.send_request(builder.body(()).unwrap(), false).unwrap();
    let msg = req.encode_to_vec();
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    frame.extend_from_slice(&msg);
    send.send_data(frame.into(), true).unwrap();
    let response = response.await.unwrap();
    let (parts, mut body) = response.into_parts();
    while let Some(chunk) = body.data().await {
        chunk.unwrap();
    }
    let trailers = body.trailers().await.unwrap().unwrap_or_default();
    let get = |k: &str| {
        trailers.get(k).or_else(|| parts.headers.get(k)).map(|v| v.to_str().unwrap().to_string()).unwrap_or_default()
    };
    (get("grpc-status"), get("grpc-message"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_timeout_is_the_requests_deadline() {
    let server = common::serve(engine().await, HttpConfig::default()).await;
    // `slow` takes 300 ms a batch; a 50 ms deadline ends the request first, from the server's side.
    let req = request("slow", vec![input("x", &[1, 4], None)], vec![le(&[0.0; 4])]);
    let started = std::time::Instant::now();
    let (code, message) = raw_call(server.addr, &req, &[("grpc-timeout", "50m")]).await;
    assert_eq!(code, (Code::DeadlineExceeded as i32).to_string(), "{message}");
    assert!(message.contains("deadline"), "{message}");
    assert!(started.elapsed() < Duration::from_millis(290), "ended by the deadline, not the batch");
    let (code, message) = raw_call(server.addr, &req, &[("grpc-timeout", "soon")]).await;
    assert_eq!(code, (Code::InvalidArgument as i32).to_string(), "{message}");
    // Without one it completes.
    let mut c = client(server.addr).await;
    let ok = c.model_infer(request("slow", vec![input("x", &[1, 4], None)], vec![le(&[1.0; 4])])).await;
    assert_eq!(floats(&ok.expect("no deadline").into_inner().raw_output_contents[0]), [1.0; 4]);
    assert_eq!(server.engine.metrics().pipelines["slow"].errors.get("deadline_exceeded"), Some(&1));
    server.shut().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_and_grpc_share_the_address_and_the_counts() {
    let config = HttpConfig::default();
    let metrics = config.metrics.clone();
    let server = common::serve(engine().await, config).await;
    let mut c = client(server.addr).await;
    let http = reqwest::Client::new();
    for _ in 0..3 {
        assert!(c.model_infer(request("lin", vec![input("x", &[1, 4], None)], vec![le(&[0.0; 4])])).await.is_ok());
        let r = http
            .post(format!("http://{}/v2/models/lin/infer", server.addr))
            .body(r#"{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [0, 0, 0, 0]}]}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let r = http
            .post(format!("http://{}/v1/pipelines/lin/infer", server.addr))
            .body(r#"{"inputs": {"x": [[0, 0, 0, 0]]}}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let text = http.get(format!("http://{}/metrics", server.addr)).send().await.unwrap().text().await.unwrap();
    for p in ["json", "v2", "grpc"] {
        assert!(text.contains(&format!("maas_protocol_requests_total{{protocol=\"{p}\"}} 3")), "{p}: {text}");
    }
    assert_eq!(metrics.requests(Protocol::V2), 3);
    server.shut().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_grpc_body_ends_at_the_body_timeout_and_http1_is_never_grpc() {
    let config = HttpConfig { body_timeout: Duration::from_millis(300), ..HttpConfig::default() };
    let server = common::serve(engine().await, config).await;
    // A frame prefix that promises 1,000 bytes, then nothing: answered, not held.
    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();
    let req = axum::http::Request::post(format!("http://{}/inference.GRPCInferenceService/ModelInfer", server.addr))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (response, mut send) = client.send_request(req, false).unwrap();
    let mut prefix = vec![0u8];
    prefix.extend_from_slice(&1000u32.to_be_bytes());
    send.send_data(prefix.into(), false).unwrap();
    let started = std::time::Instant::now();
    let response = tokio::time::timeout(Duration::from_secs(10), response).await.expect("answered").unwrap();
    assert!(started.elapsed() >= Duration::from_millis(250), "{:?}", started.elapsed());
    let status = response.headers().get("grpc-status").map(|v| v.to_str().unwrap().to_string());
    assert_eq!(status, Some((Code::DeadlineExceeded as i32).to_string()), "{response:?}");
    // Over HTTP/1.1 a gRPC content type is an ordinary (unknown) route of the HTTP API.
    let r = reqwest::Client::new()
        .post(format!("http://{}/inference.GRPCInferenceService/ModelInfer", server.addr))
        .header("content-type", "application/grpc")
        .body(vec![0u8; 5])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    server.shut().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_stream_does_not_keep_its_connection_open() {
    let limits = maas::server::ServerConfig { idle_timeout: Duration::from_millis(500), ..Default::default() };
    let config = HttpConfig::default();
    let metrics = config.metrics.clone();
    let server = common::serve_with(engine().await, config, limits).await;
    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    let conn = tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();
    // A request to the slow pipeline (300 ms a batch), reset by the client while it runs.
    let req = axum::http::Request::post(format!("http://{}/inference.GRPCInferenceService/ModelInfer", server.addr))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (_response, mut send) = client.send_request(req, false).unwrap();
    use prost::Message;
    let msg = request("slow", vec![input("x", &[1, 4], None)], vec![le(&[0.0; 4])]).encode_to_vec();
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    frame.extend_from_slice(&msg);
    send.send_data(frame.into(), true).unwrap();
    // Reset once the request is being served (it has reached the gRPC service).
    assert!(common::eventually(Duration::from_secs(5), || metrics.requests(Protocol::Grpc) == 1).await);
    send.send_reset(h2::Reason::CANCEL);
    // The connection is then idle: the server closes it after its idle timeout.
    let ended = tokio::time::timeout(Duration::from_secs(5), conn).await;
    assert!(ended.is_ok(), "the server kept a connection with only a reset stream open");
    drop(client);
    server.shut().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_share_one_memory_budget_over_http_and_grpc() {
    // Room for one 40 KiB body: while a request with one is being served (the slow pipeline
    // takes 300 ms a batch), a second is refused at once, over HTTP and over gRPC; after it,
    // bodies are taken again.
    let config = HttpConfig { body_memory: 64 << 10, max_body: 48 << 10, ..HttpConfig::default() };
    let metrics = config.metrics.clone();
    let server = common::serve(engine().await, config).await;
    let rows = vec![[0.5f32; 4]; 2400];
    let body = serde_json::json!({ "inputs": { "x": rows } }).to_string();
    assert!(body.len() > 40 << 10 && body.len() < 64 << 10, "{}", body.len());
    let http = reqwest::Client::new();
    let url = format!("http://{}/v1/pipelines/slow/infer", server.addr);
    let first = tokio::spawn({
        let (http, url, body) = (http.clone(), url.clone(), body.clone());
        async move { http.post(url).body(body).send().await.unwrap().status() }
    });
    assert!(
        common::eventually(Duration::from_secs(5), || metrics.requests(Protocol::Json) == 1).await,
        "the first request is being served"
    );
    let second = http.post(&url).body(body.clone()).send().await.unwrap();
    assert_eq!(second.status(), 503);
    assert!(second.headers().contains_key("retry-after"));
    assert!(second.text().await.unwrap().contains("of request bodies already"));
    let mut c = client(server.addr).await;
    let big = request("lin", vec![input("x", &[2400, 4], None)], vec![le(&[0.5; 9600])]);
    let s = c.model_infer(big.clone()).await.expect_err("over the budget");
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
    assert_eq!(first.await.unwrap(), 200);
    assert!(c.model_infer(big).await.is_ok(), "the budget is free again once the first is answered");
    server.shut().await;
}
