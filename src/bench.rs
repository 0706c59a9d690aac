//! The load generator behind `maas bench`.
//!
//! In process ([`run`]) or against a running server ([`run_http`]), with one JSON report.
//! Closed loop: `concurrency` callers each send the next request as soon as the previous one
//! ends. Open loop (`rate`): requests are sent on a fixed schedule whatever happens, and each
//! latency is measured from its *scheduled* send time, so queueing is not hidden.
//!
//! A server is spoken to in one of four [`Protocol`]s, so that they can be compared under the
//! same load: maas's own JSON API, or the Open Inference Protocol over HTTP (JSON `data`, or
//! the binary tensor extension) or over gRPC. The request is built once, before the load
//! starts (the bench measures the server, not the client's encoding), and every answer is read
//! whole; an answer that is not a success counts as an error.
//!
//! Against a server, a caller whose request gets no answer (connection refused or reset) waits
//! before its next one ([`BACKOFF_START`], doubling up to [`BACKOFF_MAX`]), and after
//! [`MAX_CONNECTION_ERRORS`] such errors in a row with no answer in between the bench stops
//! with an error instead of measuring a server that is not there.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use axum::body::Bytes;
use maas_engine::{Engine, InferError, Sequential};
use maas_graphs::{Dim, PortType};
use maas_kernels::Values;
use serde::{Deserialize, Serialize};
use serde_json::{Value as Json, json};
use tonic::transport::Endpoint;

use crate::v2::codec::{self, Datatype, OutputTensor};
use crate::v2::http::HEADER_LENGTH;
use crate::v2::pb::grpc_inference_service_client::GrpcInferenceServiceClient;
use crate::v2::pb::{self, model_infer_request::InferInputTensor};

/// What to drive and how hard.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// The pipeline.
    pub pipeline: String,
    /// Concurrent callers (closed loop), or the most requests outstanding (open loop).
    pub concurrency: usize,
    /// How long to run.
    pub duration: Duration,
    /// Requests per second for an open loop; `None` for a closed loop.
    pub rate: Option<f64>,
}

#[derive(Default)]
struct Tally {
    latencies: Vec<f64>,
    /// (start offset, latency) of every successful request, in seconds.
    samples: Vec<(f64, f64)>,
    errors: BTreeMap<String, u64>,
}

impl Tally {
    fn record(&mut self, start: f64, seconds: f64, result: Result<(), String>) {
        match result {
            Ok(()) => {
                self.latencies.push(seconds);
                self.samples.push((start, seconds));
            }
            Err(kind) => *self.errors.entry(kind).or_default() += 1,
        }
    }
}

/// Makes the `n`th change while a bench runs (a swap when `n` is even, a rollback when odd);
/// answers a short description or why it failed.
pub type Changer =
    Arc<dyn Fn(usize) -> std::pin::Pin<Box<dyn Future<Output = Result<String, String>> + Send>> + Send + Sync>;

/// Changes made while a bench runs: one every `every`, starting after one `every`.
#[derive(Clone)]
pub struct Changes {
    /// Time between changes.
    pub every: Duration,
    /// Makes them.
    pub changer: Changer,
}

/// How far before a change's start and after its end a request counts as "around" it: the
/// second around a change is `[start - 0.5 s, end + 0.5 s]`.
pub const AROUND: f64 = 0.5;

/// Requests started in the first second of a bench with changes count in neither window.
pub const WARM_UP: f64 = 1.0;

/// What `maas bench --swap` changes: a submodel's weights, its params, or both (what is left
/// out stays as it is).
#[derive(Debug, Clone, PartialEq)]
pub struct Swap {
    /// The submodel.
    pub submodel: String,
    /// New weights file.
    pub weights: Option<PathBuf>,
    /// Params to set, key by key.
    pub params: Option<toml::Table>,
}

impl Swap {
    /// Parses `--swap SUBMODEL[=WEIGHTS]` and `--swap-params JSON` (a JSON object of params,
    /// e.g. `{"seed": 2}`); a swap needs weights, params or both.
    pub fn parse(swap: &str, params: Option<&str>) -> anyhow::Result<Swap> {
        let (submodel, weights) = match swap.split_once('=') {
            Some((submodel, weights)) => (submodel, Some(PathBuf::from(weights))),
            None => (swap, None),
        };
        if submodel.is_empty() || weights.as_ref().is_some_and(|w| w.as_os_str().is_empty()) {
            bail!("--swap `{swap}` is not SUBMODEL=WEIGHTS or SUBMODEL (with --swap-params)");
        }
        let params = params
            .map(|text| {
                serde_json::from_str::<toml::Table>(text)
                    .with_context(|| format!("--swap-params `{text}` is not a JSON object of params"))
            })
            .transpose()?;
        if weights.is_none() && params.is_none() {
            bail!("--swap `{submodel}` changes nothing: give SUBMODEL=WEIGHTS, --swap-params JSON, or both");
        }
        Ok(Swap { submodel: submodel.to_string(), weights, params })
    }
}

/// A [`Changer`] that hot-swaps a submodel of `engine` as `swap` says (version `bench-N`), then
/// rolls it back, alternately.
pub fn engine_changer(engine: Engine, swap: Swap) -> Changer {
    Arc::new(move |n| {
        let (engine, swap) = (engine.clone(), swap.clone());
        Box::pin(async move {
            let r = if n % 2 == 0 {
                let req = maas_engine::SwapRequest {
                    weights: swap.weights,
                    version: Some(format!("bench-{}", n / 2 + 1)),
                    params: swap.params.clone(),
                    ..maas_engine::SwapRequest::default()
                };
                engine.swap(&swap.submodel, req).await
            } else {
                engine.rollback(&swap.submodel).await
            };
            r.map(|s| format!("{} -> {}", s.previous, s.version)).map_err(|e| e.to_string())
        })
    })
}

/// A [`Changer`] that does the same through a server's admin API (`token` as bearer). A
/// server outlives bench runs, so its labels carry a tag of this run (`bench-TAG-N`): a label
/// names one content, and another run may swap in other content. A rollback follows only a
/// swap that succeeded, so a refused swap never moves the server back past where it started.
pub fn http_changer(url: &str, token: String, swap: Swap) -> Changer {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let tag = format!("{:04x}", (u64::from(std::process::id()) ^ secs) & 0xffff);
    let swapped = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let base = format!("{}/v1/submodels/{}", url.trim_end_matches('/'), swap.submodel);
    let client = reqwest::Client::new();
    let mut fields = serde_json::Map::new();
    if let Some(weights) = &swap.weights {
        fields.insert("weights".into(), json!(weights));
    }
    if let Some(params) = &swap.params {
        fields.insert("params".into(), serde_json::to_value(params).unwrap_or(Json::Null));
    }
    Arc::new(move |n| {
        let (client, base, token, mut body) = (client.clone(), base.clone(), token.clone(), fields.clone());
        let (tag, swapped) = (tag.clone(), swapped.clone());
        Box::pin(async move {
            use std::sync::atomic::Ordering::SeqCst;
            let is_swap = n % 2 == 0;
            let req = if is_swap {
                body.insert("version".into(), json!(format!("bench-{tag}-{}", n / 2 + 1)));
                client.put(&base).header("content-type", "application/json").body(Json::Object(body).to_string())
            } else if swapped.swap(false, SeqCst) {
                client.post(format!("{base}/rollback"))
            } else {
                return Err("no rollback: the swap before it did not apply".to_string());
            };
            let r = req.bearer_auth(token).send().await.map_err(|e| e.to_string())?;
            let status = r.status();
            let body: Json = r.json().await.map_err(|e| e.to_string())?;
            if is_swap {
                swapped.store(status.is_success(), SeqCst);
            }
            if status.is_success() {
                Ok(format!(
                    "{} -> {}",
                    body["previous"].as_str().unwrap_or("?"),
                    body["version"].as_str().unwrap_or("?")
                ))
            } else {
                Err(format!("{status}: {body}"))
            }
        })
    })
}

/// Percentile (0..=100) of sorted values, nearest rank.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Drives `engine` in process and returns the JSON report (with mean batch rows per
/// submodel, from the engine's metrics).
pub async fn run(engine: &Engine, inputs: Values, cfg: &BenchConfig, changes: Option<Changes>) -> Json {
    let before = engine.metrics();
    let (e, p) = (engine.clone(), cfg.pipeline.clone());
    let call = move || {
        let (e, p, inputs) = (e.clone(), p.clone(), inputs.clone());
        async move { e.infer(&p, inputs).await.map(|_| ()).map_err(|e: InferError| e.kind().to_string()) }
    };
    let mut report = drive_changing(cfg, call, changes).await;
    let after = engine.metrics();
    let mut batches = serde_json::Map::new();
    let mut dispatch = serde_json::Map::new();
    for (name, m) in &after.submodels {
        let b = before.submodels.get(name);
        let count = m.batch_rows.count - b.map_or(0, |b| b.batch_rows.count);
        let rows = m.batch_rows.sum - b.map_or(0.0, |b| b.batch_rows.sum);
        if count > 0 {
            batches.insert(name.clone(), json!((rows / count as f64 * 100.0).round() / 100.0));
        }
        let at_once = m.batches_at_once - b.map_or(0, |b| b.batches_at_once);
        let waited = m.batches_waited - b.map_or(0, |b| b.batches_waited);
        if at_once + waited > 0 {
            let wait = m.wait_seconds.sum - b.map_or(0.0, |b| b.wait_seconds.sum);
            let mean_wait_ms = if waited > 0 { wait / waited as f64 * 1e3 } else { 0.0 };
            dispatch.insert(
                name.clone(),
                json!({"at_once": at_once, "after_wait": waited, "mean_wait_ms": (mean_wait_ms * 1e3).round() / 1e3}),
            );
        }
    }
    report["mean_batch_rows"] = Json::Object(batches);
    report["batches"] = Json::Object(dispatch);
    report
}

/// Connection errors in a row (no answer in between, counted over all callers) after which a
/// bench over HTTP stops and fails; with more callers than this, one error per caller (a blip
/// that reaches every pooled connection at once is not a server gone).
pub const MAX_CONNECTION_ERRORS: u32 = 8;

/// How long a caller waits after its first connection error in a row; doubled for each further
/// one, up to [`BACKOFF_MAX`].
pub const BACKOFF_START: Duration = Duration::from_millis(50);

/// The longest wait after a connection error.
pub const BACKOFF_MAX: Duration = Duration::from_millis(500);

/// The wait after the `n`th connection error in a row (`n` from 1).
pub fn backoff(n: u32) -> Duration {
    BACKOFF_START.saturating_mul(1 << n.saturating_sub(1).min(16)).min(BACKOFF_MAX)
}

/// Connection errors in a row over all callers of [`run_http`], and whether to stop.
#[derive(Default)]
struct Connection {
    /// Errors in a row at which to give up.
    limit: u32,
    in_a_row: AtomicU32,
    answered: AtomicU32,
    gave_up: AtomicBool,
    last_error: Mutex<String>,
}

impl Connection {
    /// Records an answer (any HTTP status or gRPC status the server sent): the server is there.
    fn answered(&self) {
        self.in_a_row.store(0, Ordering::Relaxed);
        self.answered.fetch_add(1, Ordering::Relaxed);
    }

    /// Records a connection error (`cause`: what happened); answers how many there have been in
    /// a row, and gives up at the limit.
    fn failed(&self, cause: String) -> u32 {
        *self.last_error.lock().expect("last error") = cause;
        let n = self.in_a_row.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= self.limit {
            self.gave_up.store(true, Ordering::Relaxed);
        }
        n
    }
}

/// The innermost cause of an error: what happened ("Connection refused (os error 111)").
fn innermost(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

/// The protocol `maas bench --url` speaks to the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Protocol {
    /// maas's own JSON API: `POST /v1/pipelines/{pipeline}/infer` with `{"inputs": ...}`.
    #[default]
    Json,
    /// The Open Inference Protocol over HTTP: `POST /v2/models/{pipeline}/infer` with JSON `data`.
    V2,
    /// The same route with the binary tensor extension: inputs as raw bytes after the JSON
    /// header, outputs asked for binary (as tritonclient.http does by default).
    V2Binary,
    /// The Open Inference Protocol over gRPC: `ModelInfer` with `raw_input_contents`, every
    /// caller on one HTTP/2 connection.
    Grpc,
}

impl Protocol {
    /// Its name, as on the command line and in the report.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Json => "json",
            Self::V2 => "v2",
            Self::V2Binary => "v2-binary",
            Self::Grpc => "grpc",
        }
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An input as a model's metadata (`GET /v2/models/{m}` or gRPC `ModelMetadata`) describes it.
#[derive(Debug, Deserialize)]
struct TensorMetadata {
    name: String,
    datatype: String,
    /// `-1` for a dimension of any size.
    shape: Vec<i64>,
}

/// The part of a model's metadata the bench needs.
#[derive(Debug, Deserialize)]
struct ModelMetadata {
    inputs: Vec<TensorMetadata>,
}

impl From<pb::model_metadata_response::TensorMetadata> for TensorMetadata {
    fn from(t: pb::model_metadata_response::TensorMetadata) -> Self {
        Self { name: t.name, datatype: t.datatype, shape: t.shape }
    }
}

impl TensorMetadata {
    /// The port type to read a `--input` value as: a tensor of the datatype's dtype and the
    /// advertised rank; BYTES (what text ports and ports of any type advertise) reads text as
    /// text and numbers as an FP32 tensor.
    fn port_type(&self) -> anyhow::Result<PortType> {
        let name = &self.name;
        let datatype = Datatype::parse(&self.datatype).with_context(|| {
            format!("input `{name}`: the model's metadata has an unknown datatype `{}`", self.datatype)
        })?;
        if datatype == Datatype::Bytes {
            return Ok(PortType::Any);
        }
        let dtype =
            datatype.dtype().with_context(|| format!("input `{name}`: maas cannot send {datatype} elements"))?;
        Ok(PortType::tensor(dtype, self.shape.iter().map(|&d| usize::try_from(d).map_or(Dim::Any, Dim::Fixed))))
    }
}

/// The `--input` values as tensors of the model's inputs, in the metadata's order: every input
/// given, none unknown.
fn encode_inputs(
    pipeline: &str,
    ports: &[TensorMetadata],
    inputs: &serde_json::Map<String, Json>,
) -> anyhow::Result<Vec<(String, OutputTensor)>> {
    let names = || ports.iter().map(|p| p.name.as_str()).collect::<Vec<_>>().join(", ");
    if let Some(unknown) = inputs.keys().find(|k| !ports.iter().any(|p| &p.name == *k)) {
        bail!("model `{pipeline}` has no input `{unknown}`; it takes: {}", names());
    }
    ports
        .iter()
        .map(|port| {
            let value = inputs.get(&port.name).with_context(|| {
                format!(
                    "model `{pipeline}` needs input `{}` ({} {:?}): give --input {}=VALUE",
                    port.name, port.datatype, port.shape, port.name
                )
            })?;
            let value = maas_engine::json::value_from_json(&port.name, &port.port_type()?, value)?;
            let tensor = codec::encode_output(&value).with_context(|| format!("encoding input `{}`", port.name))?;
            Ok((port.name.clone(), tensor))
        })
        .collect()
}

/// A v2 inference request's JSON (header).
#[derive(Serialize)]
struct V2Request<'a> {
    inputs: Vec<V2Input<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters: Option<V2RequestParameters>,
}

/// A v2 request's parameters: all outputs binary.
#[derive(Serialize)]
struct V2RequestParameters {
    binary_data_output: bool,
}

/// One input of a v2 request: its elements as JSON `data` or as `binary_data_size` raw bytes
/// after the header.
#[derive(Serialize)]
struct V2Input<'a> {
    name: &'a str,
    datatype: &'static str,
    shape: &'a [i64],
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters: Option<V2InputParameters>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<Json>,
}

/// A binary input's parameters.
#[derive(Serialize)]
struct V2InputParameters {
    binary_data_size: usize,
}

/// One inference request, built once before the load starts, and where it goes.
enum Request {
    /// A POST; `header_length`: the binary tensor extension's `Inference-Header-Content-Length`
    /// (the answer must be binary too), `None` for JSON.
    Http { client: reqwest::Client, endpoint: String, body: Bytes, header_length: Option<usize> },
    /// A gRPC `ModelInfer` on one HTTP/2 connection all callers share, sent as its encoded
    /// frame (length-prefixed protobuf, built once) over a bare `h2` client: the load measures
    /// the server, not the client's encoding or tonic's channel machinery.
    Grpc { sender: h2::client::SendRequest<Bytes>, uri: axum::http::Uri, frame: Bytes },
}

/// How one request ended.
enum Outcome {
    /// The server answered: success, or the kind of error to count.
    Answered(Result<(), String>),
    /// No answer (connection refused, reset, ...): the innermost cause.
    Unreachable(String),
}

impl Request {
    /// `POST {base}/v1/pipelines/{pipeline}/infer` with `{"inputs": inputs}`, as given.
    fn json(client: reqwest::Client, base: &str, pipeline: &str, inputs: serde_json::Map<String, Json>) -> Self {
        let body = Bytes::from(json!({ "inputs": inputs }).to_string());
        let endpoint = format!("{base}/v1/pipelines/{pipeline}/infer");
        Self::Http { client, endpoint, body, header_length: None }
    }

    /// `POST {base}/v2/models/{pipeline}/infer` with every input as flat JSON `data`.
    fn v2(
        client: reqwest::Client,
        base: &str,
        pipeline: &str,
        tensors: &[(String, OutputTensor)],
    ) -> anyhow::Result<Self> {
        let inputs = tensors
            .iter()
            .map(|(name, t)| V2Input {
                name,
                datatype: t.datatype.as_str(),
                shape: &t.shape,
                parameters: None,
                data: Some(t.json_data()),
            })
            .collect();
        let body = Bytes::from(serde_json::to_vec(&V2Request { inputs, parameters: None })?);
        Ok(Self::Http { client, endpoint: format!("{base}/v2/models/{pipeline}/infer"), body, header_length: None })
    }

    /// The same route with every input as binary tensor data and the outputs asked binary.
    fn v2_binary(
        client: reqwest::Client,
        base: &str,
        pipeline: &str,
        tensors: &[(String, OutputTensor)],
    ) -> anyhow::Result<Self> {
        let inputs = tensors
            .iter()
            .map(|(name, t)| V2Input {
                name,
                datatype: t.datatype.as_str(),
                shape: &t.shape,
                parameters: Some(V2InputParameters { binary_data_size: t.raw.len() }),
                data: None,
            })
            .collect();
        let header = V2Request { inputs, parameters: Some(V2RequestParameters { binary_data_output: true }) };
        let mut body = serde_json::to_vec(&header)?;
        let header_length = body.len();
        for (_, t) in tensors {
            body.extend_from_slice(&t.raw);
        }
        let endpoint = format!("{base}/v2/models/{pipeline}/infer");
        Ok(Self::Http { client, endpoint, body: Bytes::from(body), header_length: Some(header_length) })
    }

    /// `ModelInfer` with every input in `raw_input_contents`, as one gRPC frame on `sender`.
    fn grpc(
        sender: h2::client::SendRequest<Bytes>,
        base: &str,
        pipeline: &str,
        tensors: Vec<(String, OutputTensor)>,
    ) -> anyhow::Result<Self> {
        use prost::Message;
        let (inputs, raw) = tensors
            .into_iter()
            .map(|(name, t)| {
                let datatype = t.datatype.as_str().to_string();
                (InferInputTensor { name, datatype, shape: t.shape, ..InferInputTensor::default() }, t.raw)
            })
            .unzip();
        let request = pb::ModelInferRequest {
            model_name: pipeline.to_string(),
            inputs,
            raw_input_contents: raw,
            ..pb::ModelInferRequest::default()
        };
        let message = request.encode_to_vec();
        let mut frame = Vec::with_capacity(5 + message.len());
        frame.push(0); // not compressed
        frame.extend_from_slice(&u32::try_from(message.len()).context("the request is over 4 GiB")?.to_be_bytes());
        frame.extend_from_slice(&message);
        let uri = format!("{base}/inference.GRPCInferenceService/ModelInfer")
            .parse()
            .with_context(|| format!("`{base}` is not a URL"))?;
        Ok(Self::Grpc { sender, uri, frame: Bytes::from(frame) })
    }

    /// Builds the request `protocol` sends, asking the server for the model's inputs first
    /// where the protocol needs their datatypes.
    async fn build(
        url: &str,
        protocol: Protocol,
        pipeline: &str,
        inputs: serde_json::Map<String, Json>,
        concurrency: usize,
    ) -> anyhow::Result<Self> {
        let base = url.trim_end_matches('/');
        if protocol == Protocol::Grpc {
            let channel = Endpoint::from_shared(base.to_string())
                .with_context(|| format!("`{url}` is not a URL"))?
                .connect()
                .await
                .map_err(|e| {
                    anyhow!("could not connect to {url} for gRPC: {}; is the server running there?", innermost(&e))
                })?;
            let mut client = GrpcInferenceServiceClient::new(channel).max_decoding_message_size(usize::MAX);
            let metadata = pb::ModelMetadataRequest { name: pipeline.to_string(), version: String::new() };
            let ports: Vec<TensorMetadata> = match client.model_metadata(metadata).await {
                Ok(m) => m.into_inner().inputs.into_iter().map(TensorMetadata::from).collect(),
                Err(s) => bail!("ModelMetadata of `{pipeline}` at {url} failed: {:?}: {}", s.code(), s.message()),
            };
            let sender = h2_connect(base).await?;
            return Self::grpc(sender, base, pipeline, encode_inputs(pipeline, &ports, &inputs)?);
        }
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(concurrency.max(1) * 2)
            .build()
            .context("building the HTTP client")?;
        if protocol == Protocol::Json {
            return Ok(Self::json(client, base, pipeline, inputs));
        }
        let at = format!("{base}/v2/models/{pipeline}");
        let r = client
            .get(&at)
            .send()
            .await
            .map_err(|e| anyhow!("could not connect to {url}: {}; is the server running there?", innermost(&e)))?;
        let status = r.status();
        let text = r.text().await.with_context(|| format!("reading the answer of GET {at}"))?;
        if !status.is_success() {
            bail!("GET {at} answered {status}: {text}");
        }
        let metadata: ModelMetadata =
            serde_json::from_str(&text).with_context(|| format!("GET {at} did not answer a model's metadata"))?;
        let tensors = encode_inputs(pipeline, &metadata.inputs, &inputs)?;
        match protocol {
            Protocol::V2Binary => Self::v2_binary(client, base, pipeline, &tensors),
            _ => Self::v2(client, base, pipeline, &tensors),
        }
    }

    /// Sends the request once and reads the whole answer.
    async fn send(&self) -> Outcome {
        match self {
            Self::Http { client, endpoint, body, header_length } => {
                let request = match header_length {
                    None => client.post(endpoint).header(reqwest::header::CONTENT_TYPE, "application/json"),
                    Some(n) => client
                        .post(endpoint)
                        .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
                        .header(HEADER_LENGTH, *n),
                };
                let answer = async {
                    let r = request.body(body.clone()).send().await?;
                    let (status, header) = (r.status(), r.headers().get(HEADER_LENGTH).cloned());
                    Ok::<_, reqwest::Error>((status, header, r.bytes().await?))
                };
                match answer.await {
                    Ok((status, header, body)) => {
                        Outcome::Answered(http_answer(status, header.as_ref(), &body, header_length.is_some()))
                    }
                    Err(e) => Outcome::Unreachable(innermost(&e)),
                }
            }
            Self::Grpc { sender, uri, frame } => match grpc_call(sender.clone(), uri, frame.clone()).await {
                Ok(0) => Outcome::Answered(Ok(())),
                Ok(code) => Outcome::Answered(Err(grpc_kind(tonic::Code::from(code)))),
                Err(e) => Outcome::Unreachable(innermost(&e)),
            },
        }
    }
}

/// An HTTP/2 (prior knowledge) connection to `base`, driven by its own task.
async fn h2_connect(base: &str) -> anyhow::Result<h2::client::SendRequest<Bytes>> {
    let url = reqwest::Url::parse(base).with_context(|| format!("`{base}` is not a URL"))?;
    let host = url.host_str().with_context(|| format!("`{base}` has no host"))?;
    let port = url.port_or_known_default().unwrap_or(80);
    let tcp = tokio::net::TcpStream::connect((host, port))
        .await
        .with_context(|| format!("could not connect to {base} for gRPC; is the server running there?"))?;
    tcp.set_nodelay(true)?;
    let (sender, connection) = h2::client::handshake(tcp).await.context("HTTP/2 handshake")?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "the gRPC connection ended");
        }
    });
    Ok(sender)
}

/// One unary gRPC call: sends `frame`, reads the whole answer (giving its flow-control window
/// back), and returns the `grpc-status` (0: OK).
async fn grpc_call(
    sender: h2::client::SendRequest<Bytes>,
    uri: &axum::http::Uri,
    frame: Bytes,
) -> Result<i32, h2::Error> {
    let mut sender = sender.ready().await?;
    let request = axum::http::Request::post(uri.clone())
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .expect("a valid request");
    let (response, mut send) = sender.send_request(request, false)?;
    send.send_data(frame, true)?;
    let (parts, mut body) = response.await?.into_parts();
    while let Some(chunk) = body.data().await {
        let n = chunk?.len();
        let _ = body.flow_control().release_capacity(n);
    }
    let trailers = body.trailers().await?;
    let status = trailers
        .as_ref()
        .and_then(|t| t.get("grpc-status"))
        .or_else(|| parts.headers.get("grpc-status"))
        .and_then(|v| v.to_str().ok()?.parse().ok())
        // An answer without a status is not a gRPC answer: count it as UNKNOWN.
        .unwrap_or(2);
    Ok(status)
}

/// Whether an HTTP answer succeeded, or the kind of error to count: the `error.kind` the JSON
/// API answers, else `http_<status>`; a binary answer (`binary`) must say where its JSON header
/// ends, within the body.
fn http_answer(
    status: reqwest::StatusCode,
    header_length: Option<&reqwest::header::HeaderValue>,
    body: &[u8],
    binary: bool,
) -> Result<(), String> {
    if !status.is_success() {
        let kind =
            serde_json::from_slice::<Json>(body).ok().and_then(|j| j["error"]["kind"].as_str().map(str::to_string));
        return Err(kind.unwrap_or_else(|| format!("http_{}", status.as_u16())));
    }
    if binary {
        let length = header_length.and_then(|v| v.to_str().ok()).and_then(|s| s.trim().parse::<usize>().ok());
        match length {
            None => return Err("no_inference_header_content_length".to_string()),
            Some(n) if n > body.len() => return Err("inference_header_past_body".to_string()),
            Some(_) => {}
        }
    }
    Ok(())
}

/// The kind of error a gRPC status counts as: `grpc_` and its code in snake case
/// (`grpc_resource_exhausted`).
fn grpc_kind(code: tonic::Code) -> String {
    let mut kind = String::from("grpc");
    for c in format!("{code:?}").chars() {
        if c.is_ascii_uppercase() {
            kind.push('_');
        }
        kind.push(c.to_ascii_lowercase());
    }
    kind
}

/// Drives a running server in `protocol` (see [`Protocol`]): the `inputs` (JSON values by input
/// name, as `--input` gives them) are encoded once, for the v2 protocols against the model's
/// metadata, asked for once before the load. Errors are counted by the `error.kind` the JSON
/// API answers (or `http_<status>`, `grpc_<code>`, or `connection`). Fails after
/// [`MAX_CONNECTION_ERRORS`] (or, with more callers, as many as there are callers) connection
/// errors in a row (each caller backs off between them).
pub async fn run_http(
    url: &str,
    protocol: Protocol,
    inputs: serde_json::Map<String, Json>,
    cfg: &BenchConfig,
    changes: Option<Changes>,
) -> anyhow::Result<Json> {
    let request = Arc::new(Request::build(url, protocol, &cfg.pipeline, inputs, cfg.concurrency).await?);
    let limit = MAX_CONNECTION_ERRORS.max(u32::try_from(cfg.concurrency).unwrap_or(u32::MAX));
    let connection = Arc::new(Connection { limit, ..Connection::default() });
    let conn = connection.clone();
    let call = move || {
        let (request, conn) = (request.clone(), conn.clone());
        async move {
            match request.send().await {
                Outcome::Answered(result) => {
                    conn.answered();
                    result
                }
                Outcome::Unreachable(cause) => {
                    let n = conn.failed(cause);
                    if n < conn.limit {
                        tokio::time::sleep(backoff(n)).await;
                    }
                    Err("connection".to_string())
                }
            }
        }
    };
    let stop = {
        let connection = connection.clone();
        move || connection.gave_up.load(Ordering::Relaxed)
    };
    let mut report = drive_until(cfg, call, changes, stop).await;
    if connection.gave_up.load(Ordering::Relaxed) {
        let last = connection.last_error.lock().expect("last error").clone();
        let answered = connection.answered.load(Ordering::Relaxed);
        let what = if answered == 0 {
            format!("could not connect to {url}")
        } else {
            format!("{url} stopped answering after {answered} answers")
        };
        bail!("{what}: {limit} connection errors in a row (the last: {last}); is the server running there?");
    }
    report["url"] = json!(url);
    report["protocol"] = json!(protocol.as_str());
    Ok(report)
}

/// Runs `call` closed-loop or open-loop as `cfg` says and reports latency and errors.
pub async fn drive<F, Fut>(cfg: &BenchConfig, call: F) -> Json
where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(), String>> + Send,
{
    drive_changing(cfg, call, None).await
}

/// [`drive`], making `changes` while the load runs; the report then compares the latency of
/// requests started in the second around each change with the steady state (every other
/// request).
pub async fn drive_changing<F, Fut>(cfg: &BenchConfig, call: F, changes: Option<Changes>) -> Json
where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(), String>> + Send,
{
    drive_until(cfg, call, changes, || false).await
}

/// [`drive_changing`] that also ends early, sending nothing more, once `stop` answers `true`.
async fn drive_until<F, Fut, S>(cfg: &BenchConfig, call: F, changes: Option<Changes>, stop: S) -> Json
where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(), String>> + Send,
    S: Fn() -> bool + Clone + Send + Sync + 'static,
{
    let tally = Arc::new(Mutex::new(Tally::default()));
    let start = Instant::now();
    let end = start + cfg.duration;
    let progress = tokio::spawn(report_progress(tally.clone(), start, cfg.duration));
    let changing = changes.map(|c| {
        tokio::spawn(async move {
            let mut done = Vec::new();
            let mut n = 0;
            loop {
                let at = start + c.every * (n as u32 + 1);
                if at + c.every / 2 >= end {
                    break done;
                }
                tokio::time::sleep_until(at.into()).await;
                let t0 = start.elapsed().as_secs_f64();
                let r = (c.changer)(n).await;
                let t1 = start.elapsed().as_secs_f64();
                let what = match &r {
                    Ok(what) => what.clone(),
                    Err(e) => format!("failed: {e}"),
                };
                crate::logging::notice_as(
                    "bench",
                    format_args!("change {n} at {t0:.2} s took {:.1} ms: {what}", (t1 - t0) * 1e3),
                );
                done.push((t0, t1, r));
                n += 1;
            }
        })
    });
    match cfg.rate {
        None => {
            let mut callers = Vec::new();
            for _ in 0..cfg.concurrency.max(1) {
                let (call, tally, stop) = (call.clone(), tally.clone(), stop.clone());
                callers.push(tokio::spawn(async move {
                    while Instant::now() < end && !stop() {
                        let t = Instant::now();
                        let r = call().await;
                        let at = t.duration_since(start).as_secs_f64();
                        tally.lock().expect("tally").record(at, t.elapsed().as_secs_f64(), r);
                    }
                }));
            }
            for c in callers {
                let _ = c.await;
            }
        }
        Some(rate) => {
            let interval = Duration::from_secs_f64(1.0 / rate.max(1e-3));
            let mut tasks = tokio::task::JoinSet::new();
            let mut k: u32 = 0;
            loop {
                let scheduled = start + interval * k;
                if scheduled >= end || stop() {
                    break;
                }
                tokio::time::sleep_until(scheduled.into()).await;
                let (call, tally) = (call.clone(), tally.clone());
                tasks.spawn(async move {
                    let r = call().await;
                    let at = scheduled.duration_since(start).as_secs_f64();
                    tally.lock().expect("tally").record(at, scheduled.elapsed().as_secs_f64(), r);
                });
                while tasks.try_join_next().is_some() {}
                k += 1;
            }
            while tasks.join_next().await.is_some() {}
        }
    }
    progress.abort();
    let elapsed = start.elapsed().as_secs_f64();
    let changes = match changing {
        Some(task) => {
            if stop() {
                task.abort(); // its remaining changes would only wait for the end
            }
            Some(task.await.unwrap_or_default())
        }
        None => None,
    };
    let mut tally = std::mem::take(&mut *tally.lock().expect("tally"));
    tally.latencies.sort_by(f64::total_cmp);
    let ms = |p: f64| percentile(&tally.latencies, p) * 1e3;
    let ok = tally.latencies.len() as u64;
    let errors: u64 = tally.errors.values().sum();
    let mut report = json!({
        "pipeline": cfg.pipeline,
        "mode": if cfg.rate.is_some() { "open" } else { "closed" },
        "concurrency": cfg.concurrency,
        "rate": cfg.rate,
        "duration_s": (elapsed * 1000.0).round() / 1000.0,
        "requests": ok + errors,
        "ok": ok,
        "errors": tally.errors,
        "throughput_rps": ((ok as f64 / elapsed) * 100.0).round() / 100.0,
        "latency_ms": { "p50": ms(50.0), "p90": ms(90.0), "p99": ms(99.0), "max": ms(100.0) },
    });
    if let Some(changes) = changes {
        let around = |t: f64| changes.iter().any(|(t0, t1, _)| t >= t0 - AROUND && t <= t1 + AROUND);
        let (mut near, mut steady): (Vec<f64>, Vec<f64>) = (Vec::new(), Vec::new());
        // The first second is warm-up (every caller's first request queues at once): neither.
        for &(t, latency) in tally.samples.iter().filter(|(t, _)| *t >= WARM_UP) {
            if around(t) { near.push(latency) } else { steady.push(latency) }
        }
        near.sort_by(f64::total_cmp);
        steady.sort_by(f64::total_cmp);
        let summary = |v: &[f64]| json!({ "requests": v.len(), "p50": percentile(v, 50.0) * 1e3, "p99": percentile(v, 99.0) * 1e3, "max": percentile(v, 100.0) * 1e3 });
        let list: Vec<Json> = changes
            .iter()
            .map(|(t0, t1, r)| match r {
                Ok(what) => json!({ "at_s": t0, "took_ms": (t1 - t0) * 1e3, "ok": what }),
                Err(e) => json!({ "at_s": t0, "took_ms": (t1 - t0) * 1e3, "error": e }),
            })
            .collect();
        let ratio = percentile(&near, 99.0) / percentile(&steady, 99.0).max(f64::MIN_POSITIVE);
        report["changes"] = json!(list);
        report["latency_steady_ms"] = summary(&steady);
        report["latency_around_changes_ms"] = summary(&near);
        report["p99_around_changes_over_steady"] = json!((ratio * 100.0).round() / 100.0);
    }
    report
}

async fn report_progress(tally: Arc<Mutex<Tally>>, start: Instant, total: Duration) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    tick.tick().await;
    loop {
        tick.tick().await;
        let (ok, err) = {
            let t = tally.lock().expect("tally");
            (t.latencies.len(), t.errors.values().sum::<u64>())
        };
        let (at, total) = (start.elapsed().as_secs_f64(), total.as_secs_f64());
        crate::logging::notice_as("bench", format_args!("{at:.0}/{total:.0} s, {ok} ok, {err} errors"));
    }
}

/// The baseline: the same pipeline run by the sequential executor on one batch of
/// `batch` copies of the inputs' rows (no actors, no queues, no batching logic), repeated for
/// `duration`. Returns rows per second and seconds per batch (median).
pub fn baseline(
    engine: &Sequential,
    pipeline: &str,
    inputs: &Values,
    batch: usize,
    duration: Duration,
) -> anyhow::Result<Json> {
    let rows = inputs.values().next().and_then(maas_kernels::Value::rows).unwrap_or(1);
    let mut big = Values::new();
    for (name, v) in inputs {
        let joined = match v {
            maas_kernels::Value::Text(t) => maas_kernels::Value::text((0..batch).flat_map(|_| t.iter().cloned())),
            maas_kernels::Value::Tensor(t) => {
                let copies: Vec<&candle_core::Tensor> = (0..batch).map(|_| t).collect();
                maas_kernels::Value::Tensor(candle_core::Tensor::cat(&copies, 0)?)
            }
        };
        big.insert(name.clone(), joined);
    }
    engine.run(pipeline, big.clone())?; // warm-up
    let mut times = Vec::new();
    let start = Instant::now();
    while start.elapsed() < duration || times.len() < 3 {
        let t = Instant::now();
        engine.run(pipeline, big.clone())?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let median = percentile(&times, 50.0);
    Ok(json!({
        "batch_requests": batch,
        "rows_per_batch": batch * rows,
        "batches": times.len(),
        "batch_ms_p50": median * 1e3,
        "requests_per_s": ((batch as f64 / median) * 100.0).round() / 100.0,
    }))
}
