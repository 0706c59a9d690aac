//! The Open Inference Protocol over gRPC: `inference.GRPCInferenceService`, served on the same
//! address as HTTP (HTTP/2 cleartext; [`crate::http::router_with`] reads the body of HTTP/2
//! requests whose content type is `application/grpc` within the body timeout and size limit,
//! then hands them to the router made here).
//!
//! Inputs come as typed `contents` or as `raw_input_contents` (one entry per input, in order);
//! outputs are answered as `raw_output_contents`, as Triton does. `grpc-timeout` (or the
//! request's `timeout` parameter, in microseconds) sets the request's deadline; `x-request-id`
//! is echoed (or generated) in the response metadata. Errors: `NOT_FOUND` (unknown model or version), `INVALID_ARGUMENT`
//! (inputs that do not fit), `RESOURCE_EXHAUSTED` (queue full, too many rows, a message over
//! the size limit), `DEADLINE_EXCEEDED`, `UNAVAILABLE` (shutting down), `INTERNAL` (a
//! submodel failed), each with the same message the HTTP routes give.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use maas_engine::{Engine, InferError, InferOptions, PipelineInfo};
use maas_kernels::Values;
use tokio::sync::Semaphore;
use tonic::{Code, Request, Response, Status};
use tracing::Instrument;

use super::codec::{self, Elements, InputTensor};
use super::pb::grpc_inference_service_server::{GrpcInferenceService, GrpcInferenceServiceServer};
use super::pb::{
    InferParameter, ModelInferRequest, ModelInferResponse, ModelMetadataRequest, ModelMetadataResponse,
    ModelReadyRequest, ModelReadyResponse, ServerLiveRequest, ServerLiveResponse, ServerMetadataRequest,
    ServerMetadataResponse, ServerReadyRequest, ServerReadyResponse, infer_parameter, model_infer_response,
    model_metadata_response,
};
use crate::http::{BLOCKING_DECODE_BYTES, HttpConfig, Protocol};

/// The gRPC service as an axum router (what [`crate::http::router_with`] dispatches to).
pub(crate) fn router(engine: Engine, config: HttpConfig, decoding: Arc<Semaphore>) -> axum::Router {
    let limit = config.max_body;
    let service = GrpcInferenceServiceServer::new(Service { engine, config, decoding })
        .max_decoding_message_size(limit)
        .max_encoding_message_size(usize::MAX);
    tonic::service::Routes::new(service)
        .into_axum_router()
        .layer(axum::middleware::map_response(too_large_is_exhausted))
}

/// tonic answers a message over the size limit with `OUT_OF_RANGE`; the protocol's table (and
/// the HTTP 413) make it `RESOURCE_EXHAUSTED`.
async fn too_large_is_exhausted(mut response: axum::response::Response) -> axum::response::Response {
    let headers = response.headers_mut();
    let too_large = headers.get("grpc-status").is_some_and(|s| s == "11")
        // The message is percent-encoded: "decoded message length too large: ...".
        && headers.get("grpc-message").and_then(|m| m.to_str().ok()).is_some_and(|m| m.contains("too%20large"));
    if too_large {
        headers.insert("grpc-status", axum::http::HeaderValue::from_static("8"));
    }
    response
}

struct Service {
    engine: Engine,
    config: HttpConfig,
    /// Shared with the HTTP routes: bounds how many large requests are decoded at once, off the
    /// async workers.
    decoding: Arc<Semaphore>,
}

/// How a gRPC error is counted with the HTTP layer's (`maas_http_errors_total{kind,status}`):
/// `grpc_<code>` and the HTTP status the JSON API gives the same failure.
fn counted(code: Code) -> (&'static str, StatusCode) {
    match code {
        Code::NotFound => ("grpc_not_found", StatusCode::NOT_FOUND),
        Code::InvalidArgument => ("grpc_invalid_argument", StatusCode::BAD_REQUEST),
        Code::ResourceExhausted => ("grpc_resource_exhausted", StatusCode::SERVICE_UNAVAILABLE),
        Code::DeadlineExceeded => ("grpc_deadline_exceeded", StatusCode::GATEWAY_TIMEOUT),
        Code::Unavailable => ("grpc_unavailable", StatusCode::SERVICE_UNAVAILABLE),
        _ => ("grpc_internal", StatusCode::INTERNAL_SERVER_ERROR),
    }
}

/// An engine error as a gRPC status.
fn status(e: InferError) -> Status {
    let message = e.to_string();
    match e {
        InferError::UnknownPipeline(_) => Status::not_found(message),
        InferError::InvalidInput(_) => Status::invalid_argument(message),
        InferError::Overloaded(_) => Status::resource_exhausted(message),
        InferError::ShuttingDown | InferError::NodeLost { .. } => Status::unavailable(message),
        InferError::DeadlineExceeded(_) => Status::deadline_exceeded(message),
        InferError::SubmodelFailed { .. } => Status::internal(message),
    }
}

/// A `grpc-timeout` header's duration (`<digits><unit>`, unit one of `H M S m u n`).
fn grpc_timeout(value: &str) -> Option<Duration> {
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

impl Service {
    fn pipeline(&self, name: &str, version: &str) -> Result<PipelineInfo, Status> {
        let pipeline =
            self.engine.pipeline(name).ok_or_else(|| Status::not_found(format!("unknown model `{name}`")))?;
        super::check_version(&self.engine, &pipeline, version).map_err(Status::not_found)?;
        Ok(pipeline)
    }
}

fn string_param(s: &str) -> InferParameter {
    InferParameter { parameter_choice: Some(infer_parameter::ParameterChoice::StringParam(s.to_string())) }
}

#[tonic::async_trait]
impl GrpcInferenceService for Service {
    async fn server_live(&self, _: Request<ServerLiveRequest>) -> Result<Response<ServerLiveResponse>, Status> {
        Ok(Response::new(ServerLiveResponse { live: true }))
    }

    async fn server_ready(&self, _: Request<ServerReadyRequest>) -> Result<Response<ServerReadyResponse>, Status> {
        Ok(Response::new(ServerReadyResponse { ready: self.engine.ready() }))
    }

    async fn model_ready(&self, request: Request<ModelReadyRequest>) -> Result<Response<ModelReadyResponse>, Status> {
        let r = request.into_inner();
        self.pipeline(&r.name, &r.version)?;
        Ok(Response::new(ModelReadyResponse { ready: super::model_ready(&self.engine, &r.name) }))
    }

    async fn server_metadata(
        &self,
        _: Request<ServerMetadataRequest>,
    ) -> Result<Response<ServerMetadataResponse>, Status> {
        Ok(Response::new(ServerMetadataResponse {
            name: super::SERVER_NAME.to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            extensions: super::EXTENSIONS.iter().map(ToString::to_string).collect(),
        }))
    }

    async fn model_metadata(
        &self,
        request: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        let r = request.into_inner();
        let pipeline = self.pipeline(&r.name, &r.version)?;
        let m = super::model_metadata(&self.engine, &pipeline);
        let tensors = |t: Vec<super::TensorMetadata>| {
            t.into_iter()
                .map(|t| model_metadata_response::TensorMetadata { name: t.name, datatype: t.datatype, shape: t.shape })
                .collect()
        };
        Ok(Response::new(ModelMetadataResponse {
            name: m.name,
            versions: m.versions,
            platform: m.platform,
            inputs: tensors(m.inputs),
            outputs: tensors(m.outputs),
        }))
    }

    async fn model_infer(&self, request: Request<ModelInferRequest>) -> Result<Response<ModelInferResponse>, Status> {
        self.config.metrics.request(Protocol::Grpc);
        let started = Instant::now();
        let id = request
            .metadata()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty() && v.len() <= 128)
            .map_or_else(|| format!("{:016x}", rand::random::<u64>()), str::to_string);
        let span = tracing::info_span!("grpc", request_id = %id, model = %request.get_ref().model_name);
        let result = self.infer(request).instrument(span.clone()).await;
        let code = result.as_ref().map_or_else(Status::code, |_| Code::Ok);
        span.in_scope(|| tracing::info!(code = ?code, ms = started.elapsed().as_secs_f64() * 1e3, "request"));
        let mut response = result.inspect_err(|s| {
            let (kind, status) = counted(s.code());
            self.config.metrics.error(kind, status);
        })?;
        if let Ok(v) = id.parse() {
            response.metadata_mut().insert("x-request-id", v);
        }
        Ok(response)
    }
}

impl Service {
    /// `ModelInfer`'s work (see the module documentation).
    async fn infer(&self, request: Request<ModelInferRequest>) -> Result<Response<ModelInferResponse>, Status> {
        let mut options = InferOptions::default();
        if let Some(t) = request.metadata().get("grpc-timeout") {
            let t = t.to_str().ok().and_then(grpc_timeout).ok_or_else(|| {
                Status::invalid_argument("grpc-timeout must be up to 8 digits and a unit (H, M, S, m, u or n)")
            })?;
            options.deadline = Some(t);
        }
        let r = request.into_inner();
        // Triton's clients send a server-side timeout in microseconds as the `timeout` parameter.
        if let Some(p) = r.parameters.get("timeout") {
            let us = match p.parameter_choice {
                Some(infer_parameter::ParameterChoice::Int64Param(us)) if us > 0 => us as u64,
                Some(infer_parameter::ParameterChoice::Uint64Param(us)) if us > 0 => us,
                _ => {
                    return Err(Status::invalid_argument(
                        "parameter `timeout` must be a positive number of microseconds",
                    ));
                }
            };
            let t = Duration::from_micros(us);
            options.deadline = Some(options.deadline.map_or(t, |d| d.min(t)));
        }
        let model = r.model_name.clone();
        let pipeline = self.pipeline(&model, &r.model_version)?;
        let wanted: Vec<String> = if r.outputs.is_empty() {
            pipeline.outputs.iter().map(|(n, _)| n.clone()).collect()
        } else {
            let mut wanted = Vec::with_capacity(r.outputs.len());
            for o in &r.outputs {
                if !pipeline.outputs.iter().any(|(n, _)| *n == o.name) {
                    let names: Vec<&str> = pipeline.outputs.iter().map(|(n, _)| n.as_str()).collect();
                    return Err(invalid(
                        &model,
                        format!("no output `{}`; the model's outputs are {}", o.name, names.join(", ")),
                    ));
                }
                wanted.push(o.name.clone());
            }
            wanted
        };
        let size: usize = r.raw_input_contents.iter().map(Vec::len).sum::<usize>()
            + r.inputs.iter().filter_map(|i| i.contents.as_ref()).map(prost::Message::encoded_len).sum::<usize>();
        let (r, values) = if size < BLOCKING_DECODE_BYTES {
            let values = decode(&r, &pipeline)?;
            (r, values)
        } else {
            // Large inputs are decoded off the async workers, a few at a time.
            let permit = self.decoding.clone().acquire_owned().await.map_err(|_| status(InferError::ShuttingDown))?;
            tokio::task::spawn_blocking(move || {
                let _permit = permit;
                let values = decode(&r, &pipeline)?;
                Ok::<_, Status>((r, values))
            })
            .await
            .map_err(|e| Status::internal(format!("decoding the request failed: {e}")))??
        };
        for (input, value) in &values {
            if let Some(rows) = value.rows()
                && rows > self.config.max_rows
            {
                return Err(Status::resource_exhausted(format!(
                    "input `{input}` has {rows} rows; at most {} per request",
                    self.config.max_rows
                )));
            }
        }
        let response = self.engine.infer_with(&model, values, options).await.map_err(status)?;
        let mut outputs = Vec::with_capacity(wanted.len());
        let mut raw = Vec::with_capacity(wanted.len());
        for name in wanted {
            let value = response
                .outputs
                .get(&name)
                .ok_or_else(|| Status::internal(format!("output `{name}` was not computed")))?;
            let t = codec::encode_output(value).map_err(|e| Status::internal(e.to_string()))?;
            outputs.push(model_infer_response::InferOutputTensor {
                name,
                datatype: t.datatype.as_str().to_string(),
                shape: t.shape,
                parameters: HashMap::new(),
                contents: None,
            });
            raw.push(t.raw);
        }
        let versions = response.versions.iter().map(|(s, v)| (s.as_str(), v.as_str()));
        Ok(Response::new(ModelInferResponse {
            model_version: super::model_version(&model, versions),
            model_name: model,
            id: r.id,
            parameters: response.versions.iter().map(|(s, v)| (s.clone(), string_param(v))).collect(),
            outputs,
            raw_output_contents: raw,
        }))
    }
}

fn invalid(model: &str, message: String) -> Status {
    Status::invalid_argument(format!("invalid input: model `{model}`: {message}"))
}

/// A request's inputs as engine values, checked against the pipeline's ports.
fn decode(r: &ModelInferRequest, pipeline: &PipelineInfo) -> Result<Values, Status> {
    let model = &r.model_name;
    if !r.raw_input_contents.is_empty() {
        if r.raw_input_contents.len() != r.inputs.len() {
            return Err(invalid(
                model,
                format!(
                    "{} raw_input_contents for {} inputs; give one per input, in order",
                    r.raw_input_contents.len(),
                    r.inputs.len()
                ),
            ));
        }
        if let Some(i) = r.inputs.iter().find(|i| i.contents.is_some()) {
            return Err(invalid(model, format!("input `{}` has contents while raw_input_contents is used", i.name)));
        }
    }
    let empty = super::pb::InferTensorContents::default();
    let tensors: Vec<InputTensor<'_>> = r
        .inputs
        .iter()
        .enumerate()
        .map(|(i, input)| InputTensor {
            name: &input.name,
            datatype: &input.datatype,
            shape: &input.shape,
            elements: match r.raw_input_contents.get(i) {
                Some(raw) => Elements::Raw(raw),
                None => Elements::Contents(input.contents.as_ref().unwrap_or(&empty)),
            },
        })
        .collect();
    codec::decode_inputs(&pipeline.inputs, &tensors).map_err(|e| invalid(model, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_per_the_protocol() {
        assert_eq!(grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(grpc_timeout("99999999n"), Some(Duration::from_nanos(99_999_999)));
        for bad in ["", "m", "100", "100x", "123456789S", "-1S", "1.5S"] {
            assert_eq!(grpc_timeout(bad), None, "{bad}");
        }
    }

    #[test]
    fn engine_errors_map_to_the_protocols_codes() {
        use tonic::Code;
        let cases = [
            (InferError::UnknownPipeline("m".into()), Code::NotFound),
            (InferError::InvalidInput("x".into()), Code::InvalidArgument),
            (InferError::Overloaded("full".into()), Code::ResourceExhausted),
            (InferError::ShuttingDown, Code::Unavailable),
            (
                InferError::NodeLost {
                    node: "enc".into(),
                    submodel: "encoder".into(),
                    message: "node `a` lost".into(),
                },
                Code::Unavailable,
            ),
            (InferError::DeadlineExceeded(Duration::from_millis(5)), Code::DeadlineExceeded),
            (
                InferError::SubmodelFailed { node: "n".into(), submodel: "s".into(), message: "m".into() },
                Code::Internal,
            ),
        ];
        for (e, code) in cases {
            let message = e.to_string();
            let s = status(e);
            assert_eq!((s.code(), s.message()), (code, message.as_str()));
        }
    }
}
