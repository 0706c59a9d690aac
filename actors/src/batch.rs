//! Batch assembly and splitting: jobs with different sequence lengths share a batch by padding
//! every ragged port to the longest job with the port's pad value; outputs are cut back to each
//! job's rows and, on ragged dimensions, to the job's own length.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use maas_graphs::{BATCH, Dim, PortType, Ragged, Signature};
use maas_kernels::{CandleContext, KernelError, Result, Value, Values};

/// The sizes a job binds to the signature's symbols (`S` -> 12), for trimming outputs.
#[derive(Debug, Clone, Default)]
pub struct JobShape {
    /// Rows.
    pub rows: usize,
    /// Symbol -> size, from the job's input tensors.
    pub symbols: HashMap<String, usize>,
}

/// Reads a job's symbol sizes off its inputs.
pub fn job_shape(sig: &Signature, inputs: &Values, rows: usize) -> JobShape {
    let mut symbols = HashMap::new();
    for port in &sig.inputs {
        if let (PortType::Tensor { shape, .. }, Some(Value::Tensor(t))) = (&port.ty, inputs.get(&port.name)) {
            for (d, &size) in shape.iter().zip(t.dims()) {
                if let Dim::Sym(s) = d
                    && s != BATCH
                {
                    symbols.entry(s.clone()).or_insert(size);
                }
            }
        }
    }
    JobShape { rows, symbols }
}

fn full(value: f64, dtype: DType, shape: &[usize], dev: &candle_core::Device) -> candle_core::Result<Tensor> {
    match dtype {
        DType::U8 => Tensor::full(value as u8, shape, dev),
        DType::U32 => Tensor::full(value as u32, shape, dev),
        DType::I64 => Tensor::full(value as i64, shape, dev),
        DType::F64 => Tensor::full(value, shape, dev),
        other => Tensor::full(value as f32, shape, dev)?.to_dtype(other),
    }
}

/// Joins the inputs of several jobs into one batch (rows in job order). Parts of a port that
/// come from different devices (the CPU and a GPU stream, or two GPU streams) are moved to
/// `device`, the submodel's, and concatenated there; parts that share a device are joined where
/// they are (the kernel moves the whole batch once). A lone job is passed as it is.
pub fn assemble(sig: &Signature, jobs: &[&Values], device: &Device) -> Result<Values> {
    if let [one] = jobs {
        return Ok((*one).clone());
    }
    let mut out = Values::new();
    for port in &sig.inputs {
        let parts: Vec<&Value> = jobs.iter().filter_map(|j| j.get(&port.name)).collect();
        if parts.is_empty() {
            continue;
        }
        if parts.len() != jobs.len() {
            return Err(KernelError::Input {
                port: port.name.clone(),
                message: "given by some jobs of the batch but not by others".into(),
            });
        }
        let value = match parts[0] {
            Value::Text(_) => {
                let mut rows = Vec::new();
                for p in &parts {
                    rows.extend(p.as_text().ok_or_else(|| mixed(&port.name))?.iter().cloned());
                }
                Value::text(rows)
            }
            Value::Tensor(_) => {
                let mut tensors: Vec<Tensor> = Vec::with_capacity(parts.len());
                for p in &parts {
                    tensors.push(p.as_tensor().ok_or_else(|| mixed(&port.name))?.clone());
                }
                // Parts that all live on one device are joined there (CPU rows from a tokenizer
                // stay on the CPU for the kernel's input checks, then move once, whole); parts
                // on different devices are first moved to the submodel's own.
                let home = tensors[0].device().clone();
                if tensors.iter().any(|t| !t.device().same_device(&home)) {
                    for t in &mut tensors {
                        if !t.device().same_device(device) {
                            *t = t.to_device(device).ctx("move a batch input to the submodel's device")?;
                        }
                    }
                }
                Value::Tensor(cat_padded(tensors, port.ragged)?)
            }
        };
        out.insert(port.name.clone(), value);
    }
    Ok(out)
}

/// Joins tensors along the batch dimension; with `ragged`, first pads each to the longest on
/// the ragged dimension with its pad value.
pub fn cat_padded(mut tensors: Vec<Tensor>, ragged: Option<Ragged>) -> Result<Tensor> {
    if let Some(r) = ragged {
        let longest = tensors.iter().filter_map(|t| t.dims().get(r.dim).copied()).max().unwrap_or(0);
        for t in &mut tensors {
            let len = t.dims().get(r.dim).copied().unwrap_or(longest);
            if len < longest {
                let mut pad_shape = t.dims().to_vec();
                pad_shape[r.dim] = longest - len;
                let pad = full(r.pad, t.dtype(), &pad_shape, t.device()).ctx("batch padding")?;
                *t = Tensor::cat(&[&*t, &pad], r.dim).ctx("batch padding")?;
            }
        }
    }
    Tensor::cat(&tensors, 0).ctx("batch assembly")
}

fn mixed(port: &str) -> KernelError {
    KernelError::Input { port: port.into(), message: "mixes text and tensors within one batch".into() }
}

/// Cuts a batch's outputs back into one set per job.
pub fn split(sig: &Signature, outputs: Values, jobs: &[JobShape]) -> Result<Vec<Values>> {
    if jobs.len() == 1 {
        let mut out = outputs;
        trim(sig, &mut out, &jobs[0])?;
        return Ok(vec![out]);
    }
    let mut per_job: Vec<Values> = vec![Values::new(); jobs.len()];
    for (name, value) in outputs {
        let mut offset = 0;
        for (job, values) in jobs.iter().zip(per_job.iter_mut()) {
            let part = match &value {
                Value::Tensor(t) => Value::Tensor(t.narrow(0, offset, job.rows).ctx("batch split")?),
                Value::Text(rows) => Value::text(rows[offset..offset + job.rows].iter().cloned()),
            };
            values.insert(name.clone(), part);
            offset += job.rows;
        }
    }
    for (values, job) in per_job.iter_mut().zip(jobs) {
        trim(sig, values, job)?;
    }
    Ok(per_job)
}

/// Narrows ragged output dimensions to the job's own length.
fn trim(sig: &Signature, values: &mut Values, job: &JobShape) -> Result<()> {
    for port in &sig.outputs {
        let (Some(r), PortType::Tensor { shape, .. }) = (port.ragged, &port.ty) else { continue };
        let Some(Dim::Sym(sym)) = shape.get(r.dim) else { continue };
        let Some(&len) = job.symbols.get(sym) else { continue };
        if let Some(Value::Tensor(t)) = values.get_mut(&port.name)
            && t.dims().get(r.dim).is_some_and(|&d| d > len)
        {
            *t = t.narrow(r.dim, 0, len).ctx("batch trim")?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use maas_graphs::{PortSpec, ty};

    fn sig() -> Signature {
        Signature {
            inputs: vec![PortSpec::new("ids", ty("u32[B,S]")).ragged(1, 7.0), PortSpec::new("t", ty("text"))],
            outputs: vec![PortSpec::new("h", ty("f32[B,S,2]")).ragged(1, 0.0)],
        }
    }

    fn job(rows: &[&[u32]]) -> Values {
        let s = rows[0].len();
        let flat: Vec<u32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        let ids = Tensor::from_vec(flat, (rows.len(), s), &Device::Cpu).unwrap();
        Values::from([
            ("ids".to_string(), Value::Tensor(ids)),
            ("t".to_string(), Value::text((0..rows.len()).map(|i| format!("r{i}")))),
        ])
    }

    #[test]
    fn ragged_ports_are_padded_and_outputs_trimmed() {
        let sig = sig();
        let a = job(&[&[1, 2, 3]]);
        let b = job(&[&[4], &[5]]);
        let batch = assemble(&sig, &[&a, &b], &Device::Cpu).unwrap();
        let ids: Vec<Vec<u32>> = batch["ids"].as_tensor().unwrap().to_vec2().unwrap();
        assert_eq!(ids, vec![vec![1, 2, 3], vec![4, 7, 7], vec![5, 7, 7]]);
        assert_eq!(batch["t"].as_text().unwrap(), ["r0", "r0", "r1"]);

        let shapes = [job_shape(&sig, &a, 1), job_shape(&sig, &b, 2)];
        assert_eq!(shapes[1].symbols["S"], 1);
        let hidden = Tensor::arange(0f32, 18.0, &Device::Cpu).unwrap().reshape((3, 3, 2)).unwrap();
        let parts = split(&sig, Values::from([("h".to_string(), Value::Tensor(hidden))]), &shapes).unwrap();
        assert_eq!(parts[0]["h"].as_tensor().unwrap().dims(), &[1, 3, 2]);
        let h_b = parts[1]["h"].as_tensor().unwrap();
        assert_eq!(h_b.dims(), &[2, 1, 2]);
        assert_eq!(h_b.to_vec3::<f32>().unwrap(), vec![vec![vec![6.0, 7.0]], vec![vec![12.0, 13.0]]]);
    }

    #[test]
    fn a_port_missing_from_some_jobs_is_an_error() {
        let sig = sig();
        let a = job(&[&[1]]);
        let mut b = job(&[&[2]]);
        b.remove("t");
        let e = assemble(&sig, &[&a, &b], &Device::Cpu).unwrap_err();
        assert!(e.to_string().contains("input port `t`"), "{e}");
    }

    /// Rows for one CUDA submodel that arrive from two devices are batched together, on the
    /// submodel's device. With a GPU: one input from the CPU and one from another CUDA stream
    /// (a device-to-device copy), batched on a third stream. Without one (every CI run): the
    /// same path with two CPU inputs, one of which is a view into another batch's output (what
    /// an upstream submodel's split hands on), so it is copied into the batch rather than moved.
    #[test]
    fn inputs_from_two_devices_are_batched_on_the_submodels_device() {
        let sig = Signature {
            inputs: vec![PortSpec::new("x", ty("f32[B,2]"))],
            outputs: vec![PortSpec::new("out", ty("f32[B,2]"))],
        };
        let cuda = (Device::new_cuda_with_stream(0), Device::new_cuda_with_stream(0));
        let (target, other) = match cuda {
            (Ok(a), Ok(b)) => (a, b),
            _ => (Device::Cpu, Device::Cpu),
        };
        let from_cpu = Tensor::new(&[[1f32, 2.0]], &Device::Cpu).unwrap();
        // With a GPU, `other` is a CUDA stream: the parts differ, so both move to `target`.
        let upstream = Tensor::new(&[[0f32, 0.0], [3.0, 4.0], [5.0, 6.0]], &other).unwrap();
        let from_other = upstream.narrow(0, 1, 2).unwrap(); // rows 1..3 of another batch
        let a = Values::from([("x".to_string(), Value::Tensor(from_cpu))]);
        let b = Values::from([("x".to_string(), Value::Tensor(from_other))]);
        let batch = assemble(&sig, &[&a, &b], &target).unwrap();
        let x = batch["x"].as_tensor().unwrap();
        assert!(x.device().same_device(&target), "the batch is on the submodel's device");
        let rows: Vec<Vec<f32>> = x.to_device(&Device::Cpu).unwrap().to_vec2().unwrap();
        assert_eq!(rows, vec![vec![1.0, 2.0], vec![3.0, 4.0], vec![5.0, 6.0]]);
    }
}
