//! The HTTP API, as an axum [`Router`] a service can mount inside its own app.
//!
//! - `POST /v1/pipelines/{name}/infer` `{"inputs": {...}}` -> `{"outputs": {...},
//!   "model_versions": {...}}`; optional headers `x-maas-deadline-ms` (per-request deadline) and
//!   `x-request-id` (echoed, or generated, and logged).
//! - `GET /v1/pipelines`, `GET /v1/submodels`, `GET /healthz`, `GET /readyz`, `GET /metrics`.
//! - Admin routes sit behind one bearer-token layer that runs before any lookup: disabled (404)
//!   without a token configured, 401 for a missing or wrong token, compared in constant time:
//!   - `PUT /v1/submodels/{name}` `{"weights": "...", "version": "...", "params": {...},
//!     "allow_signature_change": false}`: hot-swap; 200 once every replica serves the new
//!     version (422 bad weights, 404 unknown submodel, 409 a signature the pipelines cannot
//!     accept, a pipeline output type change not allowed, or a label that names other content,
//!     403 a file outside the roots); a kept version's label alone returns to it;
//!   - `POST /v1/swaps` `{"submodels": {"<name>": {"weights": "...", "version": "..."}, ...}}`:
//!     several submodels swapped at once (one recomposition: no request sees one new and one
//!     old); 200 `{"swapped": {"<name>": {"previous", "version"}}, "elapsed_ms"}`;
//!   - `POST /v1/submodels/{name}/rollback` (any body, ignored): back to the previous version;
//!   - `GET /v1/submodels/{name}/versions`: the serving and kept versions;
//!   - `GET /v1/graph`: the graph served now, as TOML; `PUT /v1/graph` (TOML body,
//!     `?dry_run=true` to only check and diff, `?allow_signature_change=true` to let pipeline
//!     output types change): recompose, answering what changed.
//!   - `POST /v1/training/{job}` (optional JSON body of overrides: `workers`, `servers`,
//!     `mode`, `staleness`, `compression`, `error_feedback`, `epochs`, `seed`, `prune`,
//!     `prune_epochs`, and `swap`, default true): start a training job of the served graph
//!     files on the live engine; 202 with its status (404 no such job, 409 running already);
//!   - `GET /v1/training/{job}`: its status (state, phase, epoch, loss, accuracy so far, the
//!     report and swap once done); `GET /v1/training`: the jobs and their latest runs;
//!   - `DELETE /v1/training/{job}` (or `POST /v1/training/{job}/cancel`): cancel it (it writes
//!     and swaps nothing).
//!
//! Every error, including the ones axum raises itself (bad JSON, body too large, unknown route),
//! is `{"error": {"kind": "...", "message": "..."}}` with a status that fits it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use maas_engine::json::{self as values_json, RequestError};
use maas_engine::{
    ChangeError, Engine, InferError, InferOptions, SwapRequest, TrainingError, TrainingOptions, VersionInfo,
};
use maas_kernels::Values;
use serde_json::{Value as Json, json};
use tracing::Instrument;

/// Default largest request body (16 MiB).
pub const DEFAULT_MAX_BODY: usize = 16 << 20;
/// Default most rows in one request.
pub const DEFAULT_MAX_ROWS: usize = 4096;
/// Default most bytes of request bodies held at once (16 bodies of the default largest).
pub const DEFAULT_BODY_MEMORY: usize = 256 << 20;
/// The unit request bodies are counted in against [`HttpConfig::body_memory`].
const BODY_UNIT: usize = 4 << 10;
/// Default time for a request's whole body to arrive.
pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// Most header fields in one request; more -> 431.
pub const MAX_HEADERS: usize = 100;
/// Most bytes of header fields (names and values) in one request; more -> 431.
pub const MAX_HEADER_BYTES: usize = 32 << 10;
/// Bodies at least this large are decoded off the async workers.
pub(crate) const BLOCKING_DECODE_BYTES: usize = 256 << 10;

/// Settings of the HTTP layer.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// Largest request body in bytes; larger -> 413.
    pub max_body: usize,
    /// Most rows (batch size) in one request; more -> 413.
    pub max_rows: usize,
    /// The admin bearer token; `None` disables the admin routes.
    pub admin_token: Option<String>,
    /// The most time a request's whole body may take to arrive; slower -> 408 and the
    /// connection closes.
    pub body_timeout: Duration,
    /// Counters of the HTTP layer (rejections by kind, connections), shown in `/metrics`;
    /// share it with [`crate::server::serve`] to count connections too.
    pub metrics: Arc<HttpMetrics>,
    /// The most bytes of request bodies held at once, over every connection and HTTP/2 stream
    /// (a body counts from its first byte until its request is answered); a body that would
    /// go over is answered 503 `overloaded` with `Retry-After`. At least `max_body`.
    pub body_memory: usize,
    /// Training jobs `POST /v1/training/{job}` may start (the served graph files' own), by name.
    pub training_jobs: Arc<BTreeMap<String, maas_train::job::Job>>,
    /// Where jobs started on the server write their weights: `<dir>/<job>-<unix ms>/`. To be
    /// swapped in, it must lie under the engine's file roots.
    pub training_dir: std::path::PathBuf,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            max_body: DEFAULT_MAX_BODY,
            max_rows: DEFAULT_MAX_ROWS,
            admin_token: None,
            body_timeout: DEFAULT_BODY_TIMEOUT,
            metrics: Arc::default(),
            body_memory: DEFAULT_BODY_MEMORY,
            training_jobs: Arc::default(),
            training_dir: std::path::PathBuf::from("trained"),
        }
    }
}

/// Counters of the HTTP layer: error answers by kind, and connections (when served by
/// [`crate::server::serve`]).
#[derive(Debug, Default)]
pub struct HttpMetrics {
    errors: Mutex<BTreeMap<(&'static str, u16), u64>>,
    open: AtomicU64,
    opened: AtomicU64,
    refused: AtomicU64,
    header_timeouts: AtomicU64,
    idle_timeouts: AtomicU64,
    write_timeouts: AtomicU64,
    requests: [AtomicU64; 3],
}

/// The protocols inference requests come in by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// maas's own JSON API (`/v1/pipelines/{name}/infer`).
    Json,
    /// The Open Inference Protocol over HTTP (`/v2/models/{m}/infer`, JSON or binary).
    V2,
    /// The Open Inference Protocol over gRPC (`ModelInfer`).
    Grpc,
}

impl Protocol {
    const ALL: [Protocol; 3] = [Protocol::Json, Protocol::V2, Protocol::Grpc];

    fn as_str(self) -> &'static str {
        match self {
            Protocol::Json => "json",
            Protocol::V2 => "v2",
            Protocol::Grpc => "grpc",
        }
    }
}

impl HttpMetrics {
    /// Counts an inference request that came in by `protocol`.
    pub fn request(&self, protocol: Protocol) {
        self.requests[protocol as usize].fetch_add(1, Relaxed);
    }

    /// Inference requests so far by `protocol`.
    pub fn requests(&self, protocol: Protocol) -> u64 {
        self.requests[protocol as usize].load(Relaxed)
    }

    pub(crate) fn error(&self, kind: &'static str, status: StatusCode) {
        let mut errors = self.errors.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        *errors.entry((kind, status.as_u16())).or_default() += 1;
    }

    pub(crate) fn connection_opened(&self) {
        self.open.fetch_add(1, Relaxed);
        self.opened.fetch_add(1, Relaxed);
    }

    pub(crate) fn connection_closed(&self) {
        self.open.fetch_sub(1, Relaxed);
    }

    pub(crate) fn connection_refused(&self) {
        self.refused.fetch_add(1, Relaxed);
    }

    pub(crate) fn connection_timed_out(&self, why: crate::server::Closed) {
        match why {
            crate::server::Closed::Header => self.header_timeouts.fetch_add(1, Relaxed),
            crate::server::Closed::Idle => self.idle_timeouts.fetch_add(1, Relaxed),
            crate::server::Closed::Write => self.write_timeouts.fetch_add(1, Relaxed),
        };
    }

    /// Error answers so far, by kind and status.
    pub fn errors(&self) -> Vec<(&'static str, u16, u64)> {
        let errors = self.errors.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        errors.iter().map(|((k, s), n)| (*k, *s, *n)).collect()
    }

    /// The counters in Prometheus text format, as a new string.
    pub fn render_to_string(&self) -> String {
        let mut out = String::new();
        self.render(&mut out);
        out
    }

    /// The counters in Prometheus text format.
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write;
        let mut counter = |name: &str, help: &str, kind: &str, v: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
        };
        counter("maas_http_connections_open", "Connections open now.", "gauge", self.open.load(Relaxed));
        counter("maas_http_connections_total", "Connections accepted.", "counter", self.opened.load(Relaxed));
        counter(
            "maas_http_connections_refused_total",
            "Connections answered 503 and closed because the connection cap was reached.",
            "counter",
            self.refused.load(Relaxed),
        );
        let _ = writeln!(
            out,
            "# HELP maas_http_connections_timed_out_total Connections closed by a timeout.\n# TYPE maas_http_connections_timed_out_total counter"
        );
        let _ = writeln!(
            out,
            "maas_http_connections_timed_out_total{{timeout=\"header\"}} {}",
            self.header_timeouts.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "maas_http_connections_timed_out_total{{timeout=\"idle\"}} {}",
            self.idle_timeouts.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "maas_http_connections_timed_out_total{{timeout=\"write\"}} {}",
            self.write_timeouts.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP maas_http_errors_total Error answers by kind and status (every rejected request).\n# TYPE maas_http_errors_total counter"
        );
        for (kind, status, n) in self.errors() {
            let _ = writeln!(out, "maas_http_errors_total{{kind=\"{kind}\",status=\"{status}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "# HELP maas_protocol_requests_total Inference requests received, by protocol.\n# TYPE maas_protocol_requests_total counter"
        );
        for p in Protocol::ALL {
            let _ = writeln!(out, "maas_protocol_requests_total{{protocol=\"{}\"}} {}", p.as_str(), self.requests(p));
        }
    }
}

impl HttpConfig {
    /// Defaults, with the admin token from `MAAS_ADMIN_TOKEN` (unset or empty: admin disabled).
    pub fn from_env() -> Self {
        let admin_token = std::env::var("MAAS_ADMIN_TOKEN").ok().filter(|t| !t.is_empty());
        Self { admin_token, ..Self::default() }
    }
}

#[derive(Clone)]
pub(crate) struct AppState {
    pub(crate) engine: Engine,
    pub(crate) config: Arc<HttpConfig>,
    /// Bounds how many large bodies are decoded at once (off the async workers).
    pub(crate) decoding: Arc<tokio::sync::Semaphore>,
    /// Bytes of request bodies held now (see [`HttpConfig::body_memory`]).
    pub(crate) bodies: BodyBudget,
}

/// Bytes of request bodies held at once, counted in [`BODY_UNIT`]s (shared by the HTTP routes
/// and gRPC).
#[derive(Debug, Clone)]
pub(crate) struct BodyBudget {
    units: Arc<tokio::sync::Semaphore>,
    bytes: usize,
}

impl BodyBudget {
    fn new(bytes: usize) -> Self {
        let units = bytes.div_ceil(BODY_UNIT).min(tokio::sync::Semaphore::MAX_PERMITS);
        Self { units: Arc::new(tokio::sync::Semaphore::new(units)), bytes }
    }

    /// Grows `held` to cover a body of `len` bytes; `false` when that would go over the budget.
    fn cover(&self, held: &mut Option<tokio::sync::OwnedSemaphorePermit>, len: usize) -> bool {
        let want = len.div_ceil(BODY_UNIT).max(1);
        let have = held.as_ref().map_or(0, tokio::sync::OwnedSemaphorePermit::num_permits);
        if want <= have {
            return true;
        }
        let Ok(more) = u32::try_from(want - have) else { return false };
        match self.units.clone().try_acquire_many_owned(more) {
            Ok(p) => {
                match held {
                    Some(h) => h.merge(p),
                    None => *held = Some(p),
                }
                true
            }
            Err(_) => false,
        }
    }

    fn refusal(&self) -> String {
        format!("the server holds {} MiB of request bodies already; retry later", self.bytes >> 20)
    }
}

/// The API over `engine`, configured from the environment ([`HttpConfig::from_env`]).
pub fn router(engine: Engine) -> Router {
    router_with(engine, HttpConfig::from_env())
}

/// The API over `engine` with explicit settings.
pub fn router_with(engine: Engine, config: HttpConfig) -> Router {
    let decoders = std::thread::available_parallelism().map_or(2, std::num::NonZero::get);
    let decoding = Arc::new(tokio::sync::Semaphore::new(decoders));
    let bodies = BodyBudget::new(config.body_memory.max(config.max_body));
    let grpc = GrpcRoute {
        router: crate::v2::grpc::router(engine.clone(), config.clone(), decoding.clone()),
        max_body: config.max_body,
        body_timeout: config.body_timeout,
        bodies: bodies.clone(),
    };
    let state = AppState { engine, config: Arc::new(config.clone()), decoding, bodies };
    let admin = Router::new()
        .route("/v1/graph", get(get_graph).put(put_graph))
        .route("/v1/submodels/{name}", axum::routing::put(swap))
        .route("/v1/swaps", post(swap_together))
        .route("/v1/submodels/{name}/rollback", post(rollback))
        .route("/v1/submodels/{name}/versions", get(versions))
        .route("/v1/training", get(list_trainings))
        .route("/v1/training/{job}", get(training_status).post(start_training).delete(cancel_training))
        .route("/v1/training/{job}/cancel", post(cancel_training))
        // Bodies are read only once the caller is authenticated.
        .route_layer(middleware::from_fn_with_state(state.clone(), read_body))
        .route_layer(middleware::from_fn_with_state(state.clone(), admin_auth));
    Router::new()
        .route("/v1/pipelines/{name}/infer", post(infer))
        .route("/v1/pipelines", get(list_pipelines))
        .route("/v1/submodels", get(list_submodels))
        .route("/healthz", get(|| async { json_response(StatusCode::OK, json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .merge(crate::v2::http::routes())
        // Only routes read bodies: an unknown route or method is answered without reading one.
        .route_layer(middleware::from_fn_with_state(state.clone(), read_body))
        .merge(admin)
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "method not allowed on this route")
        })
        .layer(DefaultBodyLimit::max(config.max_body))
        .layer(middleware::from_fn_with_state(state.clone(), request_id))
        .layer(middleware::from_fn_with_state(grpc, route_grpc))
        .with_state(state)
}

/// Where [`route_grpc`] sends gRPC requests, and the limits it reads their bodies within.
#[derive(Clone)]
struct GrpcRoute {
    router: Router,
    max_body: usize,
    body_timeout: Duration,
    bodies: BodyBudget,
}

/// Hands gRPC requests (HTTP/2, `content-type: application/grpc...`) to the gRPC service,
/// before any HTTP layer: they have their own deadline header and status codes. The body is read
/// first, as for HTTP, within the body timeout and the size limit (a stalled or oversized
/// message is answered `DEADLINE_EXCEEDED` or `RESOURCE_EXHAUSTED` and holds nothing).
async fn route_grpc(State(mut grpc): State<GrpcRoute>, req: Request, next: Next) -> Response {
    let is_grpc = req.version() == axum::http::Version::HTTP_2
        && req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/grpc"));
    if !is_grpc {
        return next.run(req).await;
    }
    let (parts, body) = req.into_parts();
    // A unary call is one message: its 5-byte frame prefix, then at most `max_body` bytes.
    let limit = grpc.max_body.saturating_add(5);
    let budget = grpc.bodies.clone();
    let read = async move {
        use http_body_util::BodyExt;
        let mut body = body;
        let mut buf = Vec::new();
        let mut held = None;
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame
                .map_err(|e| tonic::Status::invalid_argument(format!("the request could not be read: {e}")))?
                .into_data()
            {
                if buf.len() + data.len() > limit {
                    return Err(tonic::Status::resource_exhausted(format!(
                        "the request is over {} bytes (--max-body)",
                        grpc.max_body
                    )));
                }
                if !budget.cover(&mut held, buf.len() + data.len()) {
                    return Err(tonic::Status::resource_exhausted(budget.refusal()));
                }
                buf.extend_from_slice(&data);
            }
        }
        Ok((Bytes::from(buf), held))
    };
    let (bytes, _held) = match tokio::time::timeout(grpc.body_timeout, read).await {
        Ok(Ok(read)) => read,
        Ok(Err(status)) => return status.into_http(),
        Err(_) => {
            return tonic::Status::deadline_exceeded(format!(
                "the request did not arrive within {:?}",
                grpc.body_timeout
            ))
            .into_http();
        }
    };
    let req = Request::from_parts(parts, axum::body::Body::from(bytes));
    match tower_service::Service::call(&mut grpc.router, req).await {
        Ok(r) => r,
        Err(never) => match never {},
    }
}

/// An error as the API answers it.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
    /// The checker's diagnostics, one line each (for graphs and signatures that do not check).
    diagnostics: Option<Vec<String>>,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self { status, kind, message: message.into(), diagnostics: None }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut error = json!({ "kind": self.kind, "message": self.message });
        if let Some(d) = self.diagnostics {
            error["diagnostics"] = json!(d);
        }
        let body = json!({ "error": error }).to_string();
        let mut r = (self.status, [(header::CONTENT_TYPE, "application/json")], body).into_response();
        r.extensions_mut().insert(ErrorKind(self.kind));
        r.extensions_mut().insert(ErrorMessage(self.message));
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        r
    }
}

impl From<InferError> for ApiError {
    fn from(e: InferError) -> Self {
        let status = match &e {
            InferError::UnknownPipeline(_) => StatusCode::NOT_FOUND,
            InferError::InvalidInput(_) => StatusCode::BAD_REQUEST,
            InferError::Overloaded(_) | InferError::ShuttingDown | InferError::NodeLost { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            InferError::DeadlineExceeded(_) => StatusCode::GATEWAY_TIMEOUT,
            InferError::SubmodelFailed { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self::new(status, e.kind(), e.to_string())
    }
}

impl From<ChangeError> for ApiError {
    fn from(e: ChangeError) -> Self {
        let status = match &e {
            ChangeError::UnknownSubmodel(_) => StatusCode::NOT_FOUND,
            ChangeError::Forbidden { .. } => StatusCode::FORBIDDEN,
            ChangeError::InvalidRequest(_) | ChangeError::InvalidParams { .. } => StatusCode::BAD_REQUEST,
            ChangeError::InvalidWeights { .. } | ChangeError::InvalidGraph(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ChangeError::TooLarge(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ChangeError::Incompatible { .. }
            | ChangeError::OutputTypeChanged { .. }
            | ChangeError::VersionConflict { .. }
            | ChangeError::NoPreviousVersion(_) => StatusCode::CONFLICT,
            ChangeError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            ChangeError::NotRecorded(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let diagnostics = match &e {
            ChangeError::InvalidGraph(d) | ChangeError::Incompatible { diagnostics: d, .. } => {
                Some(d.0.iter().map(ToString::to_string).collect())
            }
            ChangeError::OutputTypeChanged { changes } => Some(changes.iter().map(ToString::to_string).collect()),
            _ => None,
        };
        Self { status, kind: e.kind(), message: e.to_string(), diagnostics }
    }
}

impl From<TrainingError> for ApiError {
    fn from(e: TrainingError) -> Self {
        let status = match &e {
            TrainingError::NotStarted(_) => StatusCode::NOT_FOUND,
            TrainingError::AlreadyRunning(_) | TrainingError::NotRunning(_) | TrainingError::NotCancellable(_) => {
                StatusCode::CONFLICT
            }
            TrainingError::Invalid { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            TrainingError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
        };
        Self::new(status, e.kind(), e.to_string())
    }
}

impl From<BytesRejection> for ApiError {
    fn from(r: BytesRejection) -> Self {
        let status = r.status();
        let kind = if status == StatusCode::PAYLOAD_TOO_LARGE { "payload_too_large" } else { "invalid_body" };
        Self::new(status, kind, r.body_text())
    }
}

/// The kind of an error answer, for the counters (set by [`ApiError`]'s response).
#[derive(Debug, Clone, Copy)]
struct ErrorKind(&'static str);

/// The message of an error answer (set by [`ApiError`]'s response), for the Open Inference
/// Protocol's error shape.
#[derive(Debug, Clone)]
struct ErrorMessage(String);

/// An error answer on a `/v2` route in the Open Inference Protocol's shape,
/// `{"error": "message"}` (a string: its clients read it so), same status and headers.
fn v2_error_shape(response: Response) -> Response {
    let Some(ErrorMessage(message)) = response.extensions().get::<ErrorMessage>().cloned() else {
        return response;
    };
    let (mut parts, _) = response.into_parts();
    parts.headers.remove(header::CONTENT_LENGTH);
    let body = serde_json::to_string(&crate::v2::http::ErrorBody { error: message }).unwrap_or_default();
    Response::from_parts(parts, axum::body::Body::from(body))
}

/// Why a body was not read.
enum BodyError {
    Read(axum::Error),
    TooLarge,
    Budget,
}

/// Reads the whole body within the body timeout and the size limit before a route's handler
/// runs (after the admin gate on admin routes): a slow body is a 408 and a large one a 413, each
/// with the JSON error shape, and the connection closes.
async fn read_body(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let limit = st.config.max_body;
    let too_large = || {
        ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", format!("the body is over {limit} bytes"))
            .into_response()
    };
    let declared = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        let mut r = too_large();
        r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        return r;
    }
    let (parts, body) = req.into_parts();
    let budget = st.bodies.clone();
    // Copied frame by frame into one buffer sized from content-length: a chunk of the body
    // never pins a larger read buffer, so a body costs its own size once. Its bytes count
    // against the body budget until its request is answered.
    let read = async move {
        use http_body_util::BodyExt;
        let mut body = body;
        // Trust content-length for at most 1 MiB up front: it is only what the client claims.
        let mut buf = Vec::with_capacity(declared.map_or(0, |n| n as usize).min(limit).min(1 << 20));
        let mut held = None;
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.map_err(BodyError::Read)?.into_data() {
                if buf.len() + data.len() > limit {
                    return Err(BodyError::TooLarge);
                }
                if !budget.cover(&mut held, buf.len() + data.len()) {
                    return Err(BodyError::Budget);
                }
                buf.extend_from_slice(&data);
            }
        }
        Ok((Bytes::from(buf), held))
    };
    let (bytes, _held) = match tokio::time::timeout(st.config.body_timeout, read).await {
        Ok(Ok(read)) => read,
        Ok(Err(e)) => {
            let mut r = match e {
                BodyError::TooLarge => too_large(),
                BodyError::Budget => {
                    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "overloaded", st.bodies.refusal()).into_response()
                }
                BodyError::Read(e) => {
                    ApiError::new(StatusCode::BAD_REQUEST, "invalid_body", format!("the body could not be read: {e}"))
                        .into_response()
                }
            };
            r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
            return r;
        }
        Err(_) => {
            let mut r = ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "body_timeout",
                format!("the body did not arrive within {:?}", st.config.body_timeout),
            )
            .into_response();
            r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
            return r;
        }
    };
    next.run(Request::from_parts(parts, axum::body::Body::from(bytes))).await
}

pub(crate) fn json_response(status: StatusCode, body: Json) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

pub(crate) const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Echoes `x-request-id` (or makes one), runs the request inside a span that carries it, and
/// counts error answers by kind. Too many or too large header fields are a 431 here, before
/// any route.
async fn request_id(State(st): State<AppState>, mut req: Request, next: Next) -> Response {
    let header_bytes: usize = req.headers().iter().map(|(n, v)| n.as_str().len() + v.len()).sum();
    if req.headers().len() > MAX_HEADERS || header_bytes > MAX_HEADER_BYTES {
        let response = ApiError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers_too_large",
            format!(
                "{} header fields of {header_bytes} bytes; at most {MAX_HEADERS} fields and {MAX_HEADER_BYTES} bytes",
                req.headers().len()
            ),
        )
        .into_response();
        st.config.metrics.error("headers_too_large", response.status());
        return response;
    }

    let id = req
        .headers()
        .get(&REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128)
        .map(str::to_string)
        .unwrap_or_else(|| format!("{:016x}", rand::random::<u64>()));
    let value = HeaderValue::from_str(&id).unwrap_or_else(|_| HeaderValue::from_static("invalid"));
    req.headers_mut().insert(REQUEST_ID, value.clone());
    let span = tracing::info_span!("http", request_id = %id, method = %req.method(), path = %req.uri().path());
    let v2 = req.uri().path() == "/v2" || req.uri().path().starts_with("/v2/");
    let started = std::time::Instant::now();
    let mut response = next.run(req).instrument(span.clone()).await;
    if v2 {
        response = v2_error_shape(response);
    }
    if let Some(ErrorKind(kind)) = response.extensions().get::<ErrorKind>() {
        st.config.metrics.error(kind, response.status());
    }
    span.in_scope(|| {
        tracing::info!(status = response.status().as_u16(), ms = started.elapsed().as_secs_f64() * 1e3, "request")
    });
    response.headers_mut().insert(REQUEST_ID, value);
    response
}

/// The admin gate: runs before the route's handler, so nothing is looked up unauthenticated.
async fn admin_auth(State(st): State<AppState>, req: Request, next: Next) -> Response {
    use subtle::ConstantTimeEq;
    let Some(token) = st.config.admin_token.as_deref() else {
        return ApiError::new(StatusCode::NOT_FOUND, "not_found", "admin routes are disabled (set MAAS_ADMIN_TOKEN)")
            .into_response();
    };
    // The scheme name is case-insensitive (RFC 7235); the token is compared exactly.
    let given = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| {
        let (scheme, token) = v.trim().split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| token.trim_start())
    });
    match given {
        Some(g) if bool::from(g.as_bytes().ct_eq(token.as_bytes())) => next.run(req).await,
        _ => {
            let mut r =
                ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "a valid admin bearer token is required")
                    .into_response();
            r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            r
        }
    }
}

async fn infer(
    State(st): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body?;
    st.config.metrics.request(Protocol::Json);
    let pipeline =
        st.engine.pipeline(&name).ok_or_else(|| ApiError::from(InferError::UnknownPipeline(name.clone())))?;
    // Decoded straight into tensors (no document tree); a large body off the async workers,
    // a few at a time, so health checks and small requests are never stuck behind it.
    let inputs = pipeline.inputs.clone();
    let decoded = if body.len() < BLOCKING_DECODE_BYTES {
        values_json::request_from_slice(&body, &inputs)
    } else {
        let permit = st.decoding.clone().acquire_owned().await.map_err(|_| InferError::ShuttingDown)?;
        // The permit goes with the decode: a client that leaves does not free its slot early.
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            values_json::request_from_slice(&body, &inputs)
        })
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?
    };
    let values: Values = decoded.map_err(|e| match e {
        RequestError::Json(_) => ApiError::new(StatusCode::BAD_REQUEST, "invalid_json", e.to_string()),
        RequestError::Input(e) => ApiError::from(InferError::InvalidInput(format!("pipeline `{name}`: {e}"))),
    })?;
    for (input, value) in &values {
        if let Some(rows) = value.rows()
            && rows > st.config.max_rows
        {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_many_rows",
                format!("input `{input}` has {rows} rows; at most {} per request", st.config.max_rows),
            ));
        }
    }
    let mut options = InferOptions::default();
    if let Some(v) = headers.get("x-maas-deadline-ms") {
        let ms = v.to_str().ok().and_then(|s| s.trim().parse::<u64>().ok()).filter(|ms| *ms > 0).ok_or_else(|| {
            ApiError::new(StatusCode::BAD_REQUEST, "invalid_header", "x-maas-deadline-ms must be a positive integer")
        })?;
        options.deadline = Some(std::time::Duration::from_millis(ms));
    }
    let response = st.engine.infer_with(&name, values, options).await?;
    let mut outputs = serde_json::Map::new();
    for (k, v) in &response.outputs {
        let j = values_json::value_to_json(v)
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
        outputs.insert(k.clone(), j);
    }
    Ok(json_response(StatusCode::OK, json!({ "outputs": outputs, "model_versions": response.versions })))
}

async fn list_pipelines(State(st): State<AppState>) -> Response {
    let list: Vec<Json> = st
        .engine
        .pipelines()
        .into_iter()
        .map(|p| {
            let ports =
                |v: &[(String, maas_graphs::PortType)]| v.iter().map(|(n, t)| (n.clone(), Json::from(t.to_string()))).collect::<serde_json::Map<_, _>>();
            json!({ "name": p.name, "inputs": ports(&p.inputs), "outputs": ports(&p.outputs), "submodels": p.submodels })
        })
        .collect();
    json_response(StatusCode::OK, json!({ "pipelines": list }))
}

async fn list_submodels(State(st): State<AppState>) -> Response {
    let list: Vec<Json> = st
        .engine
        .submodels()
        .into_iter()
        .map(|s| {
            json!({
                "name": s.name, "kind": s.kind, "version": s.version, "device": s.device,
                "replicas": s.replicas, "ready_replicas": s.ready_replicas, "state": s.state,
                "inline": s.inline, "last_error": s.last_error, "nodes": s.nodes,
            })
        })
        .collect();
    json_response(StatusCode::OK, json!({ "submodels": list, "nodes": st.engine.nodes() }))
}

async fn readyz(State(st): State<AppState>) -> Response {
    let not_ready: Vec<Json> = st
        .engine
        .submodels()
        .into_iter()
        .filter(|s| s.state != "ready" && s.state != "degraded")
        .map(|s| json!({ "name": s.name, "state": s.state, "last_error": s.last_error }))
        .collect();
    if st.engine.ready() {
        json_response(StatusCode::OK, json!({ "ready": true }))
    } else {
        let mut r = json_response(StatusCode::SERVICE_UNAVAILABLE, json!({ "ready": false, "submodels": not_ready }));
        r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        r
    }
}

async fn metrics(State(st): State<AppState>) -> Response {
    let mut body = crate::prometheus::render(&st.engine);
    st.config.metrics.render(&mut body);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

async fn get_graph(State(st): State<AppState>) -> Response {
    let text = maas_graphs::to_toml(&st.engine.graph());
    ([(header::CONTENT_TYPE, "application/toml")], text).into_response()
}

/// A hot-swap request body.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SwapBody {
    weights: Option<std::path::PathBuf>,
    version: Option<String>,
    params: Option<serde_json::Map<String, Json>>,
    #[serde(default)]
    allow_signature_change: bool,
}

/// The body of `POST /v1/swaps`: each submodel's new weights and version.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SwapsBody {
    submodels: BTreeMap<String, SwapTo>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SwapTo {
    weights: std::path::PathBuf,
    version: String,
}

async fn swap_together(State(st): State<AppState>, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let body = body?;
    let req: SwapsBody = serde_json::from_slice(&body).map_err(bad_body)?;
    let started = std::time::Instant::now();
    let swaps = req.submodels.into_iter().map(|(name, to)| (name, (to.weights, to.version))).collect();
    let swapped = detached(async move { st.engine.swap_together(swaps).await }).await??;
    let swapped: serde_json::Map<String, Json> = swapped
        .into_iter()
        .map(|(name, previous, version)| (name, json!({ "previous": previous, "version": version })))
        .collect();
    Ok(json_response(
        StatusCode::OK,
        json!({ "swapped": swapped, "elapsed_ms": started.elapsed().as_secs_f64() * 1e3 }),
    ))
}

fn bad_body(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "invalid_json", format!("invalid request body: {e}"))
}

/// A JSON value as TOML (params are TOML tables); `null` has no TOML form.
fn json_to_toml(key: &str, v: &Json) -> Result<toml::Value, ApiError> {
    Ok(match v {
        Json::Null => return Err(bad_body(format!("params.{key}: null is not a parameter value"))),
        Json::Bool(b) => toml::Value::Boolean(*b),
        Json::Number(n) => match n.as_i64() {
            Some(i) => toml::Value::Integer(i),
            None => toml::Value::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        Json::String(s) => toml::Value::String(s.clone()),
        Json::Array(a) => toml::Value::Array(a.iter().map(|x| json_to_toml(key, x)).collect::<Result<_, _>>()?),
        Json::Object(o) => toml::Value::Table(
            o.iter()
                .map(|(k, x)| Ok((k.clone(), json_to_toml(&format!("{key}.{k}"), x)?)))
                .collect::<Result<_, ApiError>>()?,
        ),
    })
}

fn swapped_json(s: &maas_engine::Swapped) -> Json {
    json!({
        "submodel": s.submodel, "previous": s.previous, "version": s.version, "replicas": s.replicas,
        "elapsed_ms": s.elapsed.as_secs_f64() * 1e3,
    })
}

async fn swap(
    State(st): State<AppState>,
    Path(name): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body?;
    let req: SwapBody = serde_json::from_slice(&body).map_err(bad_body)?;
    let params = match &req.params {
        Some(p) => Some(p.iter().map(|(k, v)| Ok((k.clone(), json_to_toml(k, v)?))).collect::<Result<_, ApiError>>()?),
        None => None,
    };
    let request = SwapRequest {
        weights: req.weights,
        version: req.version,
        params,
        allow_signature_change: req.allow_signature_change,
    };
    let swapped = detached(async move { st.engine.swap(&name, request).await }).await??;
    Ok(json_response(StatusCode::OK, swapped_json(&swapped)))
}

async fn rollback(State(st): State<AppState>, Path(name): Path<String>) -> Result<Response, ApiError> {
    let swapped = detached(async move { st.engine.rollback(&name).await }).await??;
    Ok(json_response(StatusCode::OK, swapped_json(&swapped)))
}

/// Runs a change on its own task: a client that disconnects does not cut it short (it runs to
/// its switch or its error, and is logged and counted either way).
async fn detached<T: Send + 'static>(change: impl Future<Output = T> + Send + 'static) -> Result<T, ApiError> {
    tokio::spawn(change)
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", format!("the change failed: {e}")))
}

fn unknown_job(st: &AppState, job: &str) -> ApiError {
    let known: Vec<&str> = st.config.training_jobs.keys().map(String::as_str).collect();
    ApiError::new(
        StatusCode::NOT_FOUND,
        "unknown_training",
        if known.is_empty() {
            format!("no training job `{job}`: the served graph files define none")
        } else {
            format!("no training job `{job}`; the served graph files define {}", known.join(", "))
        },
    )
}

async fn start_training(
    State(st): State<AppState>,
    Path(job): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body?;
    let spec = st.config.training_jobs.get(&job).cloned().ok_or_else(|| unknown_job(&st, &job))?;
    // The body: the job's overrides, and `swap` (default true).
    let mut fields: serde_json::Map<String, Json> = if body.iter().all(u8::is_ascii_whitespace) {
        Default::default()
    } else {
        serde_json::from_slice(&body).map_err(bad_body)?
    };
    let swap = match fields.remove("swap") {
        None => true,
        Some(Json::Bool(b)) => b,
        Some(other) => return Err(bad_body(format!("`swap` must be true or false, got {other}"))),
    };
    let overrides: maas_train::job::Overrides = serde_json::from_value(Json::Object(fields)).map_err(bad_body)?;
    let spec = overrides.apply(spec).map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", e))?;
    let out = st.config.training_dir.join(format!("{job}-{}", unix_ms(std::time::SystemTime::now())));
    let status = st.engine.start_training(spec, TrainingOptions { out, swap })?;
    Ok(json_response(StatusCode::ACCEPTED, serde_json::to_value(status).unwrap_or(Json::Null)))
}

async fn training_status(State(st): State<AppState>, Path(job): Path<String>) -> Result<Response, ApiError> {
    match st.engine.training(&job) {
        Some(status) => Ok(json_response(StatusCode::OK, serde_json::to_value(status).unwrap_or(Json::Null))),
        None if st.config.training_jobs.contains_key(&job) => Err(TrainingError::NotStarted(job).into()),
        None => Err(unknown_job(&st, &job)),
    }
}

async fn cancel_training(State(st): State<AppState>, Path(job): Path<String>) -> Result<Response, ApiError> {
    let status = st.engine.cancel_training(&job)?;
    Ok(json_response(StatusCode::ACCEPTED, serde_json::to_value(status).unwrap_or(Json::Null)))
}

async fn list_trainings(State(st): State<AppState>) -> Response {
    let jobs: Vec<Json> = st
        .config
        .training_jobs
        .values()
        .map(|j| {
            json!({
                "name": j.name, "pipeline": j.pipeline.as_str(),
                "learn": j.learn.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
                "state": st.engine.training(&j.name).map(|s| s.state),
            })
        })
        .collect();
    json_response(StatusCode::OK, json!({ "jobs": jobs, "runs": st.engine.trainings() }))
}

fn unix_ms(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn version_json(v: &VersionInfo) -> Json {
    json!({
        "version": v.version,
        "weights": v.weights.as_ref().map(|w| w.display().to_string()),
        "params": serde_json::to_value(&v.params).unwrap_or(Json::Null),
        "since_unix_ms": unix_ms(v.since),
        "until_unix_ms": v.until.map(unix_ms),
        "left_by_rollback": v.left_by_rollback,
    })
}

async fn versions(State(st): State<AppState>, Path(name): Path<String>) -> Result<Response, ApiError> {
    let v = st.engine.versions(&name).ok_or_else(|| ApiError::from(ChangeError::UnknownSubmodel(name)))?;
    let previous: Vec<Json> = v.previous.iter().map(version_json).collect();
    Ok(json_response(
        StatusCode::OK,
        json!({
            "submodel": v.submodel, "serving": version_json(&v.serving), "previous": previous,
            "rollback_to": v.rollback_to,
        }),
    ))
}

async fn put_graph(
    State(st): State<AppState>,
    uri: axum::http::Uri,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body?;
    let mut options = maas_engine::RecomposeOptions::default();
    let mut allow_empty = false;
    for pair in uri.query().unwrap_or_default().split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, "true"));
        let value = match value {
            "true" | "1" => Some(true),
            "false" | "0" => Some(false),
            _ => None,
        };
        match (key, value) {
            ("dry_run", Some(v)) => options.dry_run = v,
            ("allow_signature_change", Some(v)) => options.allow_signature_change = v,
            ("allow_empty", Some(v)) => allow_empty = v,
            _ => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_query",
                    format!(
                        "unknown query `{pair}`; expected dry_run, allow_signature_change or allow_empty, each =true or =false"
                    ),
                ));
            }
        }
    }
    let dry_run = options.dry_run;
    let text = String::from_utf8(body.to_vec())
        .map_err(|_| ApiError::new(StatusCode::BAD_REQUEST, "invalid_body", "the graph must be UTF-8 TOML text"))?;
    if !allow_empty && text.trim().is_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "empty_graph",
            "the body is empty: PUT /v1/graph takes the whole graph as TOML (an empty graph would remove every pipeline; add ?allow_empty=true to mean that)",
        ));
    }
    // A graph without pipelines would stop serving everything: only when asked for. (A graph
    // with other problems, e.g. a misspelt `[pipeline.x]`, is left to the checker to report.)
    if !allow_empty
        && let Ok(table) = text.parse::<toml::Table>()
        && table.keys().all(|k| k == "submodels" || k == "pipelines")
        && table.get("pipelines").and_then(toml::Value::as_table).is_none_or(toml::Table::is_empty)
        && table.get("pipelines").is_none_or(toml::Value::is_table)
    {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "empty_graph",
            "the graph has no pipelines, so applying it would remove every pipeline served; add ?allow_empty=true to mean that",
        ));
    }
    // Relative paths in the body resolve against the server's working directory.
    let source = maas_graphs::SourceFile::new("request.toml", text, "");
    let r = detached(async move { st.engine.recompose_with_options(vec![source], options).await }).await??;
    Ok(json_response(
        StatusCode::OK,
        json!({
            "applied": r.applied,
            "dry_run": dry_run,
            "submodels": changes_json(&r.diff.submodels),
            "pipelines": changes_json(&r.diff.pipelines),
            "affected_pipelines": names(&r.diff.affected),
            "warnings": r.warnings,
            "output_type_changes": r.output_type_changes.iter().map(|c| json!({
                "pipeline": c.pipeline, "output": c.output, "from": c.from.to_string(), "to": c.to.to_string(),
            })).collect::<Vec<_>>(),
            "elapsed_ms": r.elapsed.as_secs_f64() * 1e3,
        }),
    ))
}

fn names<T: ToString>(v: &[T]) -> Vec<String> {
    v.iter().map(ToString::to_string).collect()
}

fn changes_json<T: ToString>(c: &maas_graphs::Changes<T>) -> Json {
    json!({ "added": names(&c.added), "removed": names(&c.removed), "changed": names(&c.changed) })
}
