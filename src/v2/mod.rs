//! The Open Inference Protocol (KServe v2): every pipeline is a model named after it, served
//! over HTTP (routes under `/v2`, in [`http`]) and gRPC (`inference.GRPCInferenceService`, in
//! [`grpc`]) on the same address as maas's own JSON API.
//!
//! The protocol layers only translate: requests go through the same engine path as the JSON
//! API (the same admission, limits, deadlines and metrics), and errors follow its table. What
//! both protocols share lives here: model metadata, readiness, model versions, and the
//! datatype codec ([`codec`]).
//!
//! **Model versions.** A pipeline has no version of its own; what computes a request is the
//! set of its submodels' versions. The model version is a short digest of the pipeline's name
//! and those versions (`GET /v2/models/{m}` lists the one served now), so it changes exactly
//! when a hot-swap or rollback changes what the pipeline computes; a response names the
//! version that computed it, and its `parameters` carry each submodel's version under the
//! submodel's name.

pub mod codec;
pub mod grpc;
pub mod http;
#[allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic, rustdoc::all)]
pub mod pb;

use std::collections::BTreeMap;

use maas_engine::{Engine, PipelineInfo};

use codec::port_metadata;

/// The server's name in metadata.
pub const SERVER_NAME: &str = "maas";
/// The protocol extensions served.
pub const EXTENSIONS: [&str; 1] = ["binary_tensor_data"];
/// The platform reported for every model.
pub const PLATFORM: &str = "maas_pipeline";

/// A model's version from its pipeline's name and its submodels' versions (see the module
/// documentation): 16 hex digits of a 64-bit FNV-1a digest, stable across processes.
pub fn model_version<'a>(pipeline: &str, versions: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        // A separator no name contains, so ("ab", "c") and ("a", "bc") differ.
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    };
    eat(pipeline.as_bytes());
    let sorted: BTreeMap<&str, &str> = versions.into_iter().collect();
    for (s, v) in sorted {
        eat(s.as_bytes());
        eat(v.as_bytes());
    }
    format!("{h:016x}")
}

/// The version a pipeline has now (from the versions its submodels serve).
pub fn current_version(engine: &Engine, pipeline: &PipelineInfo) -> String {
    let submodels = engine.submodels();
    let versions = pipeline
        .submodels
        .iter()
        .filter_map(|name| submodels.iter().find(|s| &s.name == name).map(|s| (name.as_str(), s.version.as_str())));
    model_version(&pipeline.name, versions)
}

/// Whether a pipeline is served and every submodel it uses serves.
pub fn model_ready(engine: &Engine, name: &str) -> bool {
    let Some(pipeline) = engine.pipeline(name) else { return false };
    let submodels = engine.submodels();
    pipeline
        .submodels
        .iter()
        .all(|name| submodels.iter().any(|s| &s.name == name && (s.state == "ready" || s.state == "degraded")))
}

/// One tensor's metadata.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TensorMetadata {
    /// Port name.
    pub name: String,
    /// Protocol datatype.
    pub datatype: String,
    /// Shape, `-1` for the batch and every symbolic dimension.
    pub shape: Vec<i64>,
}

/// A model's metadata.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ModelMetadata {
    /// The pipeline's name.
    pub name: String,
    /// The version served now.
    pub versions: Vec<String>,
    /// [`PLATFORM`].
    pub platform: String,
    /// Inputs.
    pub inputs: Vec<TensorMetadata>,
    /// Outputs.
    pub outputs: Vec<TensorMetadata>,
}

/// The metadata of pipeline `pipeline`.
pub fn model_metadata(engine: &Engine, pipeline: &PipelineInfo) -> ModelMetadata {
    let tensors = |ports: &[(String, maas_graphs::PortType)]| {
        ports
            .iter()
            .map(|(name, ty)| {
                // A port of any type is advertised as BYTES of any shape (text is what it
                // takes most often); numeric datatypes are accepted too.
                let (datatype, shape) = port_metadata(ty).unwrap_or((codec::Datatype::Bytes, vec![-1]));
                TensorMetadata { name: name.clone(), datatype: datatype.as_str().to_string(), shape }
            })
            .collect()
    };
    ModelMetadata {
        name: pipeline.name.clone(),
        versions: vec![current_version(engine, pipeline)],
        platform: PLATFORM.to_string(),
        inputs: tensors(&pipeline.inputs),
        outputs: tensors(&pipeline.outputs),
    }
}

/// Checks a requested model version (empty: any) against the one served now; the error is the
/// message of a "not found" answer.
pub fn check_version(engine: &Engine, pipeline: &PipelineInfo, requested: &str) -> Result<(), String> {
    if requested.is_empty() {
        return Ok(());
    }
    let current = current_version(engine, pipeline);
    if requested == current {
        Ok(())
    } else {
        Err(format!("model `{}` has no version `{requested}`; the version served is `{current}`", pipeline.name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_model_version_changes_exactly_with_its_submodels_versions() {
        let v = model_version("classify", [("head", "v1"), ("features", "v1")]);
        assert_eq!(v.len(), 16);
        assert_eq!(v, model_version("classify", [("features", "v1"), ("head", "v1")]), "order does not matter");
        assert_ne!(v, model_version("classify", [("features", "v1"), ("head", "v2")]));
        assert_ne!(v, model_version("other", [("features", "v1"), ("head", "v1")]));
        assert_ne!(model_version("p", [("ab", "c")]), model_version("p", [("a", "bc")]));
    }
}
