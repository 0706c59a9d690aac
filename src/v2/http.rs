//! The Open Inference Protocol's HTTP routes, with the binary tensor data extension.
//!
//! - `GET /v2`: server metadata (`name`, `version`, `extensions`).
//! - `GET /v2/health/live`, `GET /v2/health/ready` (503 when not ready).
//! - `GET /v2/models/{m}[/versions/{v}]`: model metadata; `GET .../ready` (503 when not).
//! - `POST /v2/models/{m}[/versions/{v}]/infer`: inference. Input elements come as JSON `data`
//!   (flat or nested) or, with `parameters.binary_data_size` and the
//!   `Inference-Header-Content-Length` header, as raw bytes after the JSON header. Outputs are
//!   raw (binary) when the requested output says `binary_data: true`, or, with no outputs
//!   named, when the request says `binary_data_output: true`; JSON `data` otherwise.
//!   A request's `timeout` parameter (microseconds, as Triton's clients send it) or the
//!   `x-maas-deadline-ms` header sets its deadline.
//!
//! Errors are `{"error": "message"}` (the JSON API's statuses; the body is rewritten from the
//! JSON API's shape in [`crate::http`]).

use std::collections::BTreeMap;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use maas_engine::{InferError, InferOptions, PipelineInfo};
use maas_graphs::PortType;
use maas_kernels::Values;
use serde::{Deserialize, Serialize};
use serde_json::{Value as Json, json};

use super::codec::{self, Elements, InputTensor};
use crate::http::{ApiError, AppState, BLOCKING_DECODE_BYTES, json_response};

/// The header that gives the JSON header's length when binary tensor data follows it.
pub const HEADER_LENGTH: &str = "inference-header-content-length";

/// The v2 routes (merged into [`crate::http::router_with`]'s router).
pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/v2", get(server_metadata))
        .route("/v2/health/live", get(|| async { json_response(StatusCode::OK, json!(Live { live: true })) }))
        .route("/v2/health/ready", get(server_ready))
        .route("/v2/models/{model}", get(metadata))
        .route("/v2/models/{model}/versions/{version}", get(metadata_version))
        .route("/v2/models/{model}/ready", get(ready))
        .route("/v2/models/{model}/versions/{version}/ready", get(ready_version))
        .route("/v2/models/{model}/infer", post(infer))
        .route("/v2/models/{model}/versions/{version}/infer", post(infer_version))
}

/// `GET /v2/health/live`.
#[derive(Debug, Serialize)]
struct Live {
    live: bool,
}

/// `GET /v2/health/ready` and a model's `ready`.
#[derive(Debug, Serialize)]
struct Ready {
    ready: bool,
}

/// An error answer on a `/v2` route: the message as a string (the protocol's clients read it
/// so; a nested object breaks `tritonclient`).
#[derive(Debug, Serialize)]
pub(crate) struct ErrorBody {
    pub(crate) error: String,
}

/// Server metadata.
#[derive(Debug, Serialize)]
struct ServerMetadata {
    name: &'static str,
    version: &'static str,
    extensions: Vec<&'static str>,
}

async fn server_metadata() -> Response {
    let body = ServerMetadata {
        name: super::SERVER_NAME,
        version: env!("CARGO_PKG_VERSION"),
        extensions: super::EXTENSIONS.to_vec(),
    };
    json_response(StatusCode::OK, json!(body))
}

async fn server_ready(State(st): State<AppState>) -> Response {
    readiness(st.engine.ready())
}

fn readiness(ready: bool) -> Response {
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let mut r = json_response(status, json!(Ready { ready }));
    if !ready {
        r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    r
}

fn not_found(message: String) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "unknown_model", message)
}

/// The pipeline `model` at `version` (empty: any), or a 404.
fn lookup(st: &AppState, model: &str, version: &str) -> Result<PipelineInfo, ApiError> {
    let pipeline = st.engine.pipeline(model).ok_or_else(|| not_found(format!("unknown model `{model}`")))?;
    super::check_version(&st.engine, &pipeline, version).map_err(not_found)?;
    Ok(pipeline)
}

async fn metadata(State(st): State<AppState>, Path(model): Path<String>) -> Result<Response, ApiError> {
    metadata_of(&st, &model, "")
}

async fn metadata_version(
    State(st): State<AppState>,
    Path((model, version)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    metadata_of(&st, &model, &version)
}

fn metadata_of(st: &AppState, model: &str, version: &str) -> Result<Response, ApiError> {
    let pipeline = lookup(st, model, version)?;
    Ok(json_response(StatusCode::OK, json!(super::model_metadata(&st.engine, &pipeline))))
}

async fn ready(State(st): State<AppState>, Path(model): Path<String>) -> Result<Response, ApiError> {
    lookup(&st, &model, "")?;
    Ok(readiness(super::model_ready(&st.engine, &model)))
}

async fn ready_version(
    State(st): State<AppState>,
    Path((model, version)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    lookup(&st, &model, &version)?;
    Ok(readiness(super::model_ready(&st.engine, &model)))
}

/// Parameters of a request, an input or an output.
type Parameters = serde_json::Map<String, Json>;

/// An inference request's JSON (header).
#[derive(Debug, Deserialize)]
struct InferRequest {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    parameters: Parameters,
    inputs: Vec<InferInput>,
    #[serde(default)]
    outputs: Option<Vec<RequestedOutput>>,
}

/// One input tensor as sent.
#[derive(Debug, Deserialize)]
struct InferInput {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    #[serde(default)]
    parameters: Parameters,
    #[serde(default)]
    data: Option<Json>,
}

/// One output asked for.
#[derive(Debug, Deserialize)]
struct RequestedOutput {
    name: String,
    #[serde(default)]
    parameters: Parameters,
}

/// An inference response's JSON (header).
#[derive(Debug, Serialize)]
struct InferResponse<'a> {
    model_name: &'a str,
    model_version: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    parameters: BTreeMap<String, Json>,
    outputs: Vec<InferOutput>,
}

/// One output tensor as answered.
#[derive(Debug, Serialize)]
struct InferOutput {
    name: String,
    datatype: &'static str,
    shape: Vec<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters: Option<BTreeMap<&'static str, Json>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<Json>,
}

/// A decoded request: its values and how to answer it.
struct Decoded {
    id: Option<String>,
    values: Values,
    /// The outputs asked for, with whether each is wanted binary; `None`: all.
    outputs: Option<Vec<(String, bool)>>,
    /// With no outputs named: whether they are answered binary.
    binary_default: bool,
    timeout: Option<Duration>,
}

fn bad(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "invalid_input", message)
}

fn flag(params: &Parameters, key: &str, what: &str) -> Result<bool, ApiError> {
    match params.get(key) {
        None => Ok(false),
        Some(Json::Bool(b)) => Ok(*b),
        Some(other) => Err(bad(format!("{what}: parameter `{key}` must be true or false, got {other}"))),
    }
}

/// Splits and decodes a request body: the JSON header (all of it without `header_len`), then
/// each binary input's bytes in input order. Every length is checked against the body first.
fn decode(
    body: &[u8],
    header_len: Option<usize>,
    model: &str,
    ports: &[(String, PortType)],
) -> Result<Decoded, ApiError> {
    let (head, mut binary) = match header_len {
        None => (body, &[][..]),
        Some(n) if n <= body.len() => body.split_at(n),
        Some(n) => {
            return Err(bad(format!("{HEADER_LENGTH} is {n} but the body has only {} bytes", body.len())));
        }
    };
    let request: InferRequest = serde_json::from_slice(head).map_err(|e| {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_json", format!("invalid inference request: {e}"))
    })?;
    let mut tensors = Vec::with_capacity(request.inputs.len());
    for input in &request.inputs {
        let elements = match (input.parameters.get("binary_data_size"), &input.data) {
            (Some(_), Some(_)) => {
                return Err(bad(format!("input `{}`: both `data` and `binary_data_size` are given", input.name)));
            }
            (Some(size), None) => {
                let size = size.as_u64().and_then(|s| usize::try_from(s).ok()).ok_or_else(|| {
                    bad(format!("input `{}`: binary_data_size must be a non-negative integer, got {size}", input.name))
                })?;
                if header_len.is_none() {
                    return Err(bad(format!(
                        "input `{}` has binary_data_size but the request has no {HEADER_LENGTH} header",
                        input.name
                    )));
                }
                if size > binary.len() {
                    return Err(bad(format!(
                        "input `{}`: binary_data_size is {size} but only {} bytes of binary data are left in the body",
                        input.name,
                        binary.len()
                    )));
                }
                let (mine, rest) = binary.split_at(size);
                binary = rest;
                Elements::Raw(mine)
            }
            (None, Some(data)) => Elements::Json(data),
            (None, None) => {
                return Err(bad(format!("input `{}` has neither `data` nor binary_data_size", input.name)));
            }
        };
        tensors.push(InputTensor { name: &input.name, datatype: &input.datatype, shape: &input.shape, elements });
    }
    if !binary.is_empty() {
        return Err(bad(format!("{} bytes of binary data in the body belong to no input", binary.len())));
    }
    let values = codec::decode_inputs(ports, &tensors).map_err(|e| bad(format!("model `{model}`: {e}")))?;
    // `binary_data_output` is the default of every output that does not say `binary_data`;
    // an empty list asks for every output, as no list does.
    let binary_default = flag(&request.parameters, "binary_data_output", "the request")?;
    let outputs = match &request.outputs {
        None => None,
        Some(list) if list.is_empty() => None,
        Some(list) => Some(
            list.iter()
                .map(|o| {
                    let binary = match o.parameters.get("binary_data") {
                        None => binary_default,
                        Some(_) => flag(&o.parameters, "binary_data", &format!("output `{}`", o.name))?,
                    };
                    Ok((o.name.clone(), binary))
                })
                .collect::<Result<Vec<_>, ApiError>>()?,
        ),
    };
    let timeout =
        match request.parameters.get("timeout") {
            None => None,
            Some(t) => Some(t.as_u64().filter(|us| *us > 0).map(Duration::from_micros).ok_or_else(|| {
                bad(format!("parameter `timeout` must be a positive number of microseconds, got {t}"))
            })?),
        };
    Ok(Decoded { id: request.id, values, outputs, binary_default, timeout })
}

async fn infer(
    State(st): State<AppState>,
    Path(model): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    infer_at(st, model, String::new(), headers, body?).await
}

async fn infer_version(
    State(st): State<AppState>,
    Path((model, version)): Path<(String, String)>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    infer_at(st, model, version, headers, body?).await
}

async fn infer_at(
    st: AppState,
    model: String,
    version: String,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    st.config.metrics.request(crate::http::Protocol::V2);
    let pipeline = lookup(&st, &model, &version)?;
    let header_len = match headers.get(HEADER_LENGTH) {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<usize>().ok())
                .ok_or_else(|| bad(format!("{HEADER_LENGTH} must be a non-negative integer")))?,
        ),
    };
    let ports = pipeline.inputs.clone();
    let decoded = if body.len() < BLOCKING_DECODE_BYTES {
        decode(&body, header_len, &model, &ports)?
    } else {
        let permit = st.decoding.clone().acquire_owned().await.map_err(|_| InferError::ShuttingDown)?;
        let name = model.clone();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            decode(&body, header_len, &name, &ports)
        })
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))??
    };
    for (input, value) in &decoded.values {
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
    let wanted: Vec<(String, bool)> = match decoded.outputs {
        Some(list) => {
            for (name, _) in &list {
                if !pipeline.outputs.iter().any(|(n, _)| n == name) {
                    let names: Vec<&str> = pipeline.outputs.iter().map(|(n, _)| n.as_str()).collect();
                    return Err(bad(format!(
                        "model `{model}` has no output `{name}`; its outputs are {}",
                        names.join(", ")
                    )));
                }
            }
            list
        }
        None => pipeline.outputs.iter().map(|(n, _)| (n.clone(), decoded.binary_default)).collect(),
    };
    let mut options = InferOptions::default();
    if let Some(v) = headers.get("x-maas-deadline-ms") {
        let ms = v.to_str().ok().and_then(|s| s.trim().parse::<u64>().ok()).filter(|ms| *ms > 0).ok_or_else(|| {
            ApiError::new(StatusCode::BAD_REQUEST, "invalid_header", "x-maas-deadline-ms must be a positive integer")
        })?;
        options.deadline = Some(Duration::from_millis(ms));
    }
    if let Some(t) = decoded.timeout {
        options.deadline = Some(options.deadline.map_or(t, |d| d.min(t)));
    }
    let response = st.engine.infer_with(&model, decoded.values, options).await?;

    let internal = |e: candle_core::Error| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string());
    let mut outputs = Vec::with_capacity(wanted.len());
    let mut binary: Vec<Vec<u8>> = Vec::new();
    for (name, as_binary) in wanted {
        let value = response.outputs.get(&name).ok_or_else(|| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", format!("output `{name}` was not computed"))
        })?;
        let t = codec::encode_output(value).map_err(internal)?;
        let (parameters, data) = if as_binary {
            let size = t.raw.len();
            (Some(BTreeMap::from([("binary_data_size", Json::from(size))])), None)
        } else {
            (None, Some(t.json_data()))
        };
        outputs.push(InferOutput { name, datatype: t.datatype.as_str(), shape: t.shape, parameters, data });
        if as_binary {
            binary.push(t.raw);
        }
    }
    let versions = response.versions.iter().map(|(s, v)| (s.as_str(), v.as_str()));
    let body = InferResponse {
        model_name: &model,
        model_version: super::model_version(&model, versions),
        id: decoded.id,
        parameters: response.versions.iter().map(|(s, v)| (s.clone(), Json::from(v.as_str()))).collect(),
        outputs,
    };
    let head = serde_json::to_vec(&body)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    if binary.is_empty() {
        return Ok((StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], head).into_response());
    }
    let mut out = Vec::with_capacity(head.len() + binary.iter().map(Vec::len).sum::<usize>());
    out.extend_from_slice(&head);
    for b in &binary {
        out.extend_from_slice(b);
    }
    let mut r = (StatusCode::OK, [(header::CONTENT_TYPE, "application/octet-stream")], out).into_response();
    r.headers_mut().insert(HEADER_LENGTH, HeaderValue::from(head.len()));
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use maas_graphs::ty;

    fn ports() -> Vec<(String, PortType)> {
        vec![("x".to_string(), ty("f32[B,2]")), ("t".to_string(), ty("text"))]
    }

    /// A binary request: the JSON header, then the binary parts.
    fn body(header: &Json, parts: &[&[u8]]) -> (Vec<u8>, usize) {
        let mut b = serde_json::to_vec(header).unwrap();
        let n = b.len();
        for p in parts {
            b.extend_from_slice(p);
        }
        (b, n)
    }

    fn message(e: ApiError) -> String {
        format!("{e:?}")
    }

    #[test]
    fn binary_inputs_are_cut_from_the_body_in_input_order() {
        let x: Vec<u8> = [1f32, 2.0, 3.0, 4.0].iter().flat_map(|f| f.to_le_bytes()).collect();
        let t = [&3u32.to_le_bytes()[..], b"abc", &2u32.to_le_bytes()[..], b"de"].concat();
        let header = json!({"inputs": [
            {"name": "x", "datatype": "FP32", "shape": [2, 2], "parameters": {"binary_data_size": x.len()}},
            {"name": "t", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": t.len()}},
        ], "outputs": [{"name": "y", "parameters": {"binary_data": true}}], "parameters": {"timeout": 5000}});
        let (b, n) = body(&header, &[&x, &t]);
        let d = decode(&b, Some(n), "m", &ports()).map_err(message).unwrap();
        assert_eq!(d.values["x"].as_tensor().unwrap().to_vec2::<f32>().unwrap(), [[1.0, 2.0], [3.0, 4.0]]);
        assert_eq!(d.values["t"].rows(), Some(2));
        assert_eq!(d.outputs, Some(vec![("y".to_string(), true)]));
        assert_eq!(d.timeout, Some(Duration::from_millis(5)));
    }

    #[test]
    fn every_lying_length_is_a_400_that_says_which() {
        let x = [0u8; 16];
        let t = [&1u32.to_le_bytes()[..], b"a"].concat();
        let input = |size: usize| {
            json!({"inputs": [
                {"name": "x", "datatype": "FP32", "shape": [2, 2], "parameters": {"binary_data_size": size}},
                {"name": "t", "datatype": "BYTES", "shape": [1], "data": ["a"]},
            ]})
        };
        let cases: Vec<(Vec<u8>, Option<usize>, &str)> = vec![
            // A claimed size larger than the body.
            (
                { body(&input(999_999), &[&x]).0 },
                Some(body(&input(999_999), &[]).1),
                "binary_data_size is 999999 but only 16 bytes",
            ),
            // A header length past the end of the body.
            ({ body(&input(16), &[&x]).0 }, Some(1 << 40), "but the body has only"),
            // Binary data left over.
            ({ body(&input(16), &[&x, &t]).0 }, Some(body(&input(16), &[]).1), "belong to no input"),
            // A size with no header.
            ({ body(&input(16), &[]).0 }, None, "has no inference-header-content-length header"),
            // A size that is not the shape's.
            ({ body(&input(12), &[&x[..12]]).0 }, Some(body(&input(12), &[]).1), "needs 16 bytes, got 12"),
        ];
        for (b, n, want) in cases {
            let e = message(decode(&b, n, "m", &ports()).err().expect(want));
            assert!(e.contains(want) && e.contains("400"), "{want}: {e}");
        }
        // A truncated BYTES element inside binary data.
        let header = json!({"inputs": [
            {"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]},
            {"name": "t", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 6}},
        ]});
        let (b, n) = body(&header, &[&[9, 0, 0, 0, b'a', b'b']]);
        let e = message(decode(&b, Some(n), "m", &ports()).err().unwrap());
        assert!(e.contains("claims 9 bytes but only 2 are left"), "{e}");
    }

    #[test]
    fn outputs_default_to_binary_data_output_and_an_empty_list_means_all() {
        let header = |outputs: Json| {
            serde_json::to_vec(&json!({"inputs": [
                {"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]},
                {"name": "t", "datatype": "BYTES", "shape": [1], "data": ["a"]},
            ], "parameters": {"binary_data_output": true}, "outputs": outputs}))
            .unwrap()
        };
        let d = decode(
            &header(json!([{"name": "y"}, {"name": "z", "parameters": {"binary_data": false}}])),
            None,
            "m",
            &ports(),
        )
        .map_err(message)
        .unwrap();
        assert_eq!(d.outputs, Some(vec![("y".to_string(), true), ("z".to_string(), false)]));
        let d = decode(&header(json!([])), None, "m", &ports()).map_err(message).unwrap();
        assert_eq!((d.outputs, d.binary_default), (None, true));
    }

    #[test]
    fn malformed_headers_and_parameters_are_refused() {
        let e = message(decode(b"{not json", None, "m", &ports()).err().unwrap());
        assert!(e.contains("invalid_json"), "{e}");
        let header = json!({"inputs": [
            {"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1, 2], "parameters": {"binary_data_size": -1}},
        ]});
        let e = message(decode(&serde_json::to_vec(&header).unwrap(), None, "m", &ports()).err().unwrap());
        assert!(e.contains("both `data` and `binary_data_size`"), "{e}");
        let header = json!({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2]}]});
        let e = message(decode(&serde_json::to_vec(&header).unwrap(), None, "m", &ports()).err().unwrap());
        assert!(e.contains("neither `data` nor binary_data_size"), "{e}");
        let header = json!({"inputs": [
            {"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]},
            {"name": "t", "datatype": "BYTES", "shape": [1], "data": ["a"]},
        ], "parameters": {"binary_data_output": "yes"}});
        let e = message(decode(&serde_json::to_vec(&header).unwrap(), None, "m", &ports()).err().unwrap());
        assert!(e.contains("`binary_data_output` must be true or false"), "{e}");
    }
}
