//! The bytes that cross processes between the serving process and its nodes.
//!
//! Values are one safetensors buffer (tensors by port name, any dtype, shapes as they are) with
//! text ports in its metadata (`text:PORT` = a JSON array of strings): the format the weights
//! already use, read and written by the `safetensors` crate, checked on the way in (header,
//! offsets, lengths) before a tensor is built. A job is `[deadline ms u64][instance u64]
//! [upstream u32][users u32][owner len u16][owner][values]` (upstream and users: the serving
//! process's demand for the submodel, so the node's batching waits for rows that are coming);
//! an answer is `[0][version len u32][version][values]` or `[code][message]`.
//! Control messages (start, stop) are JSON.

use std::collections::HashMap;
use std::time::Duration;

use candle_core::{Device, Tensor};
use maas_actors::JobError;
use maas_kernels::{Value, Values};
use serde::{Deserialize, Serialize};

/// The metadata key prefix of a text port.
const TEXT: &str = "text:";

/// Encodes named values (tensors moved to the CPU) as one safetensors buffer.
pub fn encode_values(values: &Values) -> Result<Vec<u8>, String> {
    let mut tensors: Vec<(&str, Tensor)> = Vec::new();
    let mut meta = HashMap::new();
    for (port, v) in values {
        match v {
            Value::Tensor(t) => {
                let t = t.to_device(&Device::Cpu).map_err(|e| format!("port `{port}`: {e}"))?;
                tensors.push((port.as_str(), t));
            }
            Value::Text(rows) => {
                let json = serde_json::to_string(&**rows).map_err(|e| format!("port `{port}`: {e}"))?;
                meta.insert(format!("{TEXT}{port}"), json);
            }
        }
    }
    let meta = if meta.is_empty() { None } else { Some(meta) };
    safetensors::tensor::serialize(tensors, meta).map_err(|e| e.to_string())
}

/// Decodes values written by [`encode_values`] (tensors on `device`).
pub fn decode_values(bytes: &[u8], device: &Device) -> Result<Values, String> {
    let (_, metadata) = safetensors::SafeTensors::read_metadata(bytes).map_err(|e| format!("values: {e}"))?;
    let mut out = Values::new();
    if let Some(meta) = metadata.metadata() {
        for (key, json) in meta {
            let Some(port) = key.strip_prefix(TEXT) else { continue };
            let rows: Vec<String> = serde_json::from_str(json).map_err(|e| format!("text port `{port}`: {e}"))?;
            out.insert(port.to_string(), Value::text(rows));
        }
    }
    let tensors = candle_core::safetensors::load_buffer(bytes, device).map_err(|e| format!("values: {e}"))?;
    for (port, t) in tensors {
        out.insert(port, Value::Tensor(t));
    }
    Ok(out)
}

/// What a job says besides its values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobHeader {
    /// The serving process that owns the instance.
    pub owner: String,
    /// The instance.
    pub instance: u64,
    /// The time left (`None`: no deadline).
    pub deadline: Option<Duration>,
    /// Jobs for this submodel on their way at the serving process (see `maas_actors::Demand`).
    pub upstream: u32,
    /// Requests admitted there that use this submodel.
    pub users: u32,
}

/// One job for a submodel instance on a node.
pub fn encode_job(h: &JobHeader, values: &Values) -> Result<Vec<u8>, String> {
    let body = encode_values(values)?;
    let owner = h.owner.as_bytes();
    let mut out = Vec::with_capacity(26 + owner.len() + body.len());
    out.extend_from_slice(
        &h.deadline.map_or(u64::MAX, |d| d.as_millis().min(u64::MAX as u128 - 1) as u64).to_le_bytes(),
    );
    out.extend_from_slice(&h.instance.to_le_bytes());
    out.extend_from_slice(&h.upstream.to_le_bytes());
    out.extend_from_slice(&h.users.to_le_bytes());
    out.extend_from_slice(&(owner.len().min(u16::MAX as usize) as u16).to_le_bytes());
    out.extend_from_slice(&owner[..owner.len().min(u16::MAX as usize)]);
    out.extend_from_slice(&body);
    Ok(out)
}

/// A decoded job.
pub fn decode_job(bytes: &[u8]) -> Result<(JobHeader, Values), String> {
    const FIXED: usize = 26;
    if bytes.len() < FIXED {
        return Err(format!("a job of {} bytes is shorter than its {FIXED}-byte header", bytes.len()));
    }
    let u64_at = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().expect("8 bytes"));
    let u32_at = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().expect("4 bytes"));
    let ms = u64_at(0);
    let n = u16::from_le_bytes(bytes[24..26].try_into().expect("2 bytes")) as usize;
    let owner = bytes.get(FIXED..FIXED + n).ok_or("a job whose owner is truncated")?;
    let owner = String::from_utf8(owner.to_vec()).map_err(|e| format!("a job's owner: {e}"))?;
    let header = JobHeader {
        owner,
        instance: u64_at(8),
        deadline: (ms != u64::MAX).then(|| Duration::from_millis(ms)),
        upstream: u32_at(16),
        users: u32_at(20),
    };
    Ok((header, decode_values(&bytes[FIXED + n..], &Device::Cpu)?))
}

/// Answer codes after the leading byte.
const OK: u8 = 0;
const DEADLINE: u8 = 1;
const FAILED: u8 = 2;
const INVALID: u8 = 3;
const UNAVAILABLE: u8 = 4;

/// A node's answer to one job.
pub fn encode_answer(answer: &Result<(Values, String), JobError>) -> Vec<u8> {
    let fail = |code: u8, message: &str| {
        let mut out = vec![code];
        out.extend_from_slice(message.as_bytes());
        out
    };
    match answer {
        Ok((values, version)) => match encode_values(values) {
            Ok(body) => {
                let mut out = Vec::with_capacity(5 + version.len() + body.len());
                out.push(OK);
                out.extend_from_slice(&(version.len() as u32).to_le_bytes());
                out.extend_from_slice(version.as_bytes());
                out.extend_from_slice(&body);
                out
            }
            Err(e) => fail(FAILED, &format!("its outputs could not be encoded: {e}")),
        },
        Err(JobError::DeadlineExceeded) => fail(DEADLINE, ""),
        Err(JobError::Failed(m)) => fail(FAILED, m),
        Err(JobError::InvalidInput(m)) => fail(INVALID, m),
        Err(JobError::Unavailable(m) | JobError::Lost(m)) => fail(UNAVAILABLE, m),
    }
}

/// Decodes a node's answer (tensors on `device`).
pub fn decode_answer(bytes: &[u8], device: &Device) -> Result<(Values, String), JobError> {
    let Some((&code, rest)) = bytes.split_first() else {
        return Err(JobError::Failed("the node sent an empty answer".into()));
    };
    let text = || String::from_utf8_lossy(rest).into_owned();
    match code {
        OK => {
            let bad = |m: String| JobError::Failed(format!("the node's answer does not decode: {m}"));
            if rest.len() < 4 {
                return Err(bad("truncated".into()));
            }
            let n = u32::from_le_bytes(rest[..4].try_into().expect("4 bytes")) as usize;
            let version = rest.get(4..4 + n).ok_or_else(|| bad("truncated version".into()))?;
            let version = String::from_utf8(version.to_vec()).map_err(|e| bad(e.to_string()))?;
            let values = decode_values(&rest[4 + n..], device).map_err(bad)?;
            Ok((values, version))
        }
        DEADLINE => Err(JobError::DeadlineExceeded),
        INVALID => Err(JobError::InvalidInput(text())),
        UNAVAILABLE => Err(JobError::Unavailable(text())),
        _ => Err(JobError::Failed(text())),
    }
}

/// Start one submodel instance on a node.
#[derive(Debug, Serialize, Deserialize)]
pub struct Start {
    /// The serving process that owns it (its instances stop when it disconnects).
    pub owner: String,
    /// The instance id, unique within the owner.
    pub instance: u64,
    /// A graph file holding the one submodel (paths absolute), as the node checks it.
    pub source: String,
    /// The submodel's name in it.
    pub submodel: String,
}

/// Stop one submodel instance.
#[derive(Debug, Serialize, Deserialize)]
pub struct Stop {
    /// The serving process that owns it.
    pub owner: String,
    /// The instance id.
    pub instance: u64,
}

/// A node's answer to [`Start`]: the version it serves, or why it could not.
#[derive(Debug, Serialize, Deserialize)]
pub struct Started {
    /// The error, if it did not start.
    pub error: Option<String>,
    /// The largest frame the node accepts.
    #[serde(default)]
    pub max_frame: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    #[test]
    fn values_round_trip_every_kind_of_port() {
        let f = Tensor::arange(0f32, 6.0, &Device::Cpu).unwrap().reshape((2, 3)).unwrap();
        let u = Tensor::new(&[[1u32, 2], [3, 4]], &Device::Cpu).unwrap();
        let empty = Tensor::zeros((0, 4), DType::F32, &Device::Cpu).unwrap();
        let values = Values::from([
            ("f".to_string(), Value::Tensor(f.clone())),
            ("ids".to_string(), Value::Tensor(u.clone())),
            ("none".to_string(), Value::Tensor(empty)),
            ("text".to_string(), Value::text(["a \"quoted\" row", "ünïcode"])),
        ]);
        let back = decode_values(&encode_values(&values).unwrap(), &Device::Cpu).unwrap();
        assert_eq!(back.len(), 4);
        assert_eq!(back["f"].as_tensor().unwrap().to_vec2::<f32>().unwrap(), f.to_vec2::<f32>().unwrap());
        assert_eq!(back["ids"].as_tensor().unwrap().to_vec2::<u32>().unwrap(), u.to_vec2::<u32>().unwrap());
        assert_eq!(back["none"].as_tensor().unwrap().dims(), &[0, 4]);
        assert_eq!(back["text"].as_text().unwrap(), ["a \"quoted\" row", "ünïcode"]);
    }

    #[test]
    fn jobs_and_answers_round_trip_and_garbage_is_an_error() {
        let v = Values::from([("x".to_string(), Value::text(["row"]))]);
        let h = JobHeader {
            owner: "serve-1".into(),
            instance: 7,
            deadline: Some(Duration::from_millis(1500)),
            upstream: 3,
            users: 31,
        };
        let (back_h, back) = decode_job(&encode_job(&h, &v).unwrap()).unwrap();
        assert_eq!(back_h, h);
        assert_eq!(back["x"].as_text().unwrap(), ["row"]);
        let none = JobHeader { deadline: None, ..h };
        assert_eq!(decode_job(&encode_job(&none, &v).unwrap()).unwrap().0.deadline, None);
        let ok = decode_answer(&encode_answer(&Ok((v.clone(), "v2".into()))), &Device::Cpu).unwrap();
        assert_eq!(ok.1, "v2");
        let err = decode_answer(&encode_answer(&Err(JobError::InvalidInput("bad ids".into()))), &Device::Cpu);
        assert_eq!(err.unwrap_err(), JobError::InvalidInput("bad ids".into()));
        assert!(decode_job(&[1, 2, 3]).is_err());
        assert!(decode_job(&[0u8; 40]).is_err());
        assert!(decode_job(&[0u8; 25]).is_err());
        assert!(matches!(decode_answer(&[0, 200, 0, 0, 0, 1], &Device::Cpu), Err(JobError::Failed(_))));
        assert!(decode_answer(&[], &Device::Cpu).is_err());
    }
}

/// A histogram's counts; its bounds are constants both sides share
/// (`maas_actors::metrics::BATCH_BUCKETS`, `LATENCY_BUCKETS`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hist {
    /// Observations per bucket.
    pub counts: Vec<u64>,
    /// Observations.
    pub count: u64,
    /// Their sum.
    pub sum: f64,
}

impl Hist {
    /// The counts of `h`.
    pub fn of(h: &maas_actors::metrics::HistogramSnapshot) -> Self {
        Self { counts: h.counts.clone(), count: h.count, sum: h.sum }
    }

    /// The histogram over `bounds` (`None`: the counts were made for other bounds).
    pub fn snapshot(&self, bounds: &'static [f64]) -> Option<maas_actors::metrics::HistogramSnapshot> {
        (self.counts.len() == bounds.len() + 1).then(|| maas_actors::metrics::HistogramSnapshot {
            bounds,
            counts: self.counts.clone(),
            count: self.count,
            sum: self.sum,
        })
    }
}

/// What a node answers a serving process's `Stats` RPC (the request is the process's name).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeStats {
    /// The largest frame the node accepts.
    pub max_frame: u64,
    /// The instances it runs for that process.
    pub instances: Vec<InstanceStats>,
}

/// What a node reports of one instance it runs for a serving process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceStats {
    /// The instance.
    pub instance: u64,
    /// Its submodel.
    pub submodel: String,
    /// Its version.
    pub version: String,
    /// Jobs answered.
    pub jobs_ok: u64,
    /// Jobs failed.
    pub jobs_failed: u64,
    /// Jobs in its queue now.
    pub queued: u64,
    /// Rows per batch.
    pub batch_rows: Hist,
    /// Seconds per batch.
    pub compute_seconds: Hist,
}

impl InstanceStats {
    /// Rows per batch, as a histogram (`None`: the node's buckets differ from this process's).
    pub fn batch_rows_histogram(&self) -> Option<maas_actors::metrics::HistogramSnapshot> {
        self.batch_rows.snapshot(maas_actors::metrics::BATCH_BUCKETS)
    }

    /// Seconds per batch, as a histogram (`None` as above).
    pub fn compute_seconds_histogram(&self) -> Option<maas_actors::metrics::HistogramSnapshot> {
        self.compute_seconds.snapshot(maas_actors::metrics::LATENCY_BUCKETS)
    }
}
