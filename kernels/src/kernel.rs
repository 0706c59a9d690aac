//! The two traits every kind implements: [`Kind`] (a factory registered by name) and
//! [`Kernel`] (a loaded instance that runs batches), plus [`Loaded`], which checks inputs
//! against the signature before a kernel ever sees them.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::Device;
use maas_graphs::{BATCH, Dim, KindError, PortType, Signature, SubmodelSpec};

use crate::error::{KernelError, Result};
use crate::value::{Value, Values};

/// A loaded kernel: runs one batch of named inputs into named outputs, synchronously, on its
/// device. Implementations may assume inputs were checked against their signature.
pub trait Kernel: Send + Sync {
    /// Runs one batch. Every output keeps the batch dimension of the inputs.
    fn forward(&self, inputs: &Values) -> Result<Values>;

    /// Checks what a signature cannot express before [`Kernel::forward`] runs: values in range
    /// (token ids below the vocabulary size, sequences no longer than the model's positions).
    /// A bad value is a [`KernelError::Input`] naming the port, the value and the limit, so the
    /// request is refused as invalid input rather than failing inside the model. Inputs have
    /// already been checked against the signature. Defaults to accepting everything.
    fn check(&self, inputs: &Values) -> Result<()> {
        let _ = inputs;
        Ok(())
    }
}

/// A kind of kernel, registered by name: declares signatures and loads kernels.
pub trait Kind: Send + Sync {
    /// The name used in `kind = "..."`.
    fn name(&self) -> &str;

    /// Cheap enough to run inline on the caller's task, without batching or a hop to an
    /// execution stream (element-wise ops, pooling, small reductions). Defaults to `false`.
    fn trivial(&self) -> bool {
        false
    }

    /// Run one synthetic row (zeros, or the text `"warm-up"`) through every freshly loaded
    /// kernel before it serves, so that lazy initialisation (CUDA context, cuBLAS handles,
    /// allocator pools) is not paid by the first request. A warm-up that panics fails the load;
    /// one that returns an error is logged (real inputs may differ from zeros). Defaults to
    /// `true`; a kind whose `forward` has side effects says `false`.
    fn warm_up(&self) -> bool {
        true
    }

    /// The signature of a submodel of this kind, from its params and files; checks settings
    /// without loading weights (reads headers and configs only).
    fn signature(&self, spec: &SubmodelSpec) -> Result<Signature, Vec<KindError>>;

    /// Loads a kernel on `device`.
    fn load(&self, spec: &SubmodelSpec, device: &Device) -> Result<Arc<dyn Kernel>>;

    /// The bytes loading one replica of `spec` takes at its peak (which covers what the loaded
    /// kernel then holds), from params and file headers only: nothing is
    /// allocated or loaded. The engine refuses a load whose estimate times the replica count
    /// exceeds its limit (`too_large`) instead of letting the allocation abort the process.
    /// Arithmetic saturates (see [`crate::memory`]): an absurd shape is `u64::MAX`, never a
    /// wrapped small number.
    ///
    /// Defaults to the total size of the submodel's files (`weights` and file params, see
    /// [`SubmodelSpec::files`]), 0 without files: right for a kind that reads its files as they
    /// are; a kind that allocates from its params (a seeded init) or decodes its files into a
    /// larger form should say so here.
    fn memory_estimate(&self, spec: &SubmodelSpec) -> Result<u64> {
        Ok(crate::memory::files_size(spec))
    }

    /// Whether a submodel of this kind can learn in a training job (`[training.NAME]`
    /// `learn = [...]`), and if not, why (the reason is shown as it is). Defaults to no: a kind
    /// learns only when it has a differentiable forward that writes back the weights it serves
    /// (`linear`, `mlp`, `digits_cnn`).
    fn learnable(&self, spec: &SubmodelSpec) -> std::result::Result<(), String> {
        let _ = spec;
        Err(format!("kind `{}` has no training forward (the kinds that learn: linear, mlp, digits_cnn)", self.name()))
    }
}

/// A kernel together with its signature and version: what a submodel runs.
#[derive(Clone)]
pub struct Loaded {
    /// The kernel.
    pub kernel: Arc<dyn Kernel>,
    /// What it accepts and produces.
    pub signature: Arc<Signature>,
    /// Where it computes: inputs on another device are moved here first.
    pub device: Device,
    /// Whether [`Loaded::warm_up`] runs a synthetic row (the kind's [`Kind::warm_up`]).
    pub warm_up: bool,
}

impl std::fmt::Debug for Loaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loaded").field("signature", &self.signature).finish_non_exhaustive()
    }
}

impl Loaded {
    /// Runs one synthetic row through the kernel (see [`Kind::warm_up`]); a no-op for kinds that
    /// opt out. Every required port gets one row: text `"warm-up"`, or zeros of its dtype with
    /// every other symbolic dimension 8. Its outputs are discarded.
    pub fn warm_up(&self) -> Result<()> {
        if !self.warm_up {
            return Ok(());
        }
        let mut inputs = Values::new();
        for port in self.signature.inputs.iter().filter(|p| !p.optional) {
            let value = match &port.ty {
                PortType::Text | PortType::Any => Value::text(["warm-up"]),
                PortType::Tensor { dtype, shape } => {
                    let dims: Vec<usize> = shape
                        .iter()
                        .filter(|d| **d != Dim::Rest)
                        .enumerate()
                        .map(|(i, d)| match d {
                            Dim::Fixed(n) => *n,
                            _ if i == 0 => 1,
                            _ => 8,
                        })
                        .collect();
                    let t = candle_core::Tensor::zeros(dims, candle_dtype(*dtype), &self.device)
                        .map_err(|source| KernelError::Candle { op: "warm-up input", source })?;
                    Value::Tensor(t)
                }
            };
            inputs.insert(port.name.clone(), value);
        }
        self.forward(&inputs).map(|_| ())
    }

    /// Checks `inputs` against the signature and the kernel's own limits ([`Kernel::check`]),
    /// then runs the kernel and checks that every declared output came back with the batch's
    /// row count.
    pub fn forward(&self, inputs: &Values) -> Result<Values> {
        let rows = check_inputs(&self.signature, inputs)?;
        self.kernel.check(inputs)?;
        // An edge that crosses devices (CPU input into a CUDA submodel, or between two CUDA
        // streams) is moved here, once, before the kernel sees it.
        let moved;
        let inputs = if inputs.values().any(|v| v.as_tensor().is_some_and(|t| !t.device().same_device(&self.device))) {
            let mut m = Values::new();
            for (port, v) in inputs {
                let v = match v {
                    Value::Tensor(t) if !t.device().same_device(&self.device) => {
                        Value::Tensor(t.to_device(&self.device).map_err(|source| KernelError::Candle {
                            op: "move input to the submodel's device",
                            source,
                        })?)
                    }
                    other => other.clone(),
                };
                m.insert(port.clone(), v);
            }
            moved = m;
            &moved
        } else {
            inputs
        };
        let out = self.kernel.forward(inputs)?;
        for port in &self.signature.outputs {
            match out.get(&port.name) {
                None => return Err(KernelError::Panicked(format!("kernel produced no output `{}`", port.name))),
                Some(v) if rows.is_some() && v.rows() != rows => {
                    return Err(KernelError::Panicked(format!(
                        "kernel output `{}` has {:?} rows for a batch of {:?}",
                        port.name,
                        v.rows(),
                        rows
                    )));
                }
                Some(_) => {}
            }
        }
        Ok(out)
    }
}

/// The candle dtype of a graph dtype.
pub fn candle_dtype(d: maas_graphs::DType) -> candle_core::DType {
    use maas_graphs::DType as G;
    match d {
        G::F32 => candle_core::DType::F32,
        G::F16 => candle_core::DType::F16,
        G::BF16 => candle_core::DType::BF16,
        G::F64 => candle_core::DType::F64,
        G::U8 => candle_core::DType::U8,
        G::U32 => candle_core::DType::U32,
        G::I64 => candle_core::DType::I64,
    }
}

/// Checks named inputs against a signature: presence, text vs tensor, dtype, rank, fixed sizes,
/// symbols equal across ports (e.g. `S` of `input_ids` and `attention_mask`), and one batch size
/// for all ports. Returns the batch size. (A zero-sized dimension fits; the engine refuses empty
/// tensors at a pipeline's inputs, where they are the client's mistake.)
pub fn check_inputs(sig: &Signature, inputs: &Values) -> Result<Option<usize>> {
    let mut bound: HashMap<&str, (usize, &str)> = HashMap::new();
    let mut rows: Option<(usize, &str)> = None;
    for name in inputs.keys() {
        if sig.input(name).is_none() {
            let known: Vec<&str> = sig.inputs.iter().map(|p| p.name.as_str()).collect();
            return Err(KernelError::Input {
                port: name.clone(),
                message: format!("no such input port; expected one of: {}", known.join(", ")),
            });
        }
    }
    for port in &sig.inputs {
        let Some(value) = inputs.get(&port.name) else {
            if port.optional {
                continue;
            }
            return Err(KernelError::MissingInput { port: port.name.clone() });
        };
        let bad = |message: String| KernelError::Input { port: port.name.clone(), message };
        let n = match (&port.ty, value) {
            (PortType::Any, v) => v.rows(),
            (PortType::Text, Value::Text(t)) => Some(t.len()),
            (PortType::Text, Value::Tensor(t)) => {
                return Err(bad(format!("expected text, got a tensor of shape {:?}", t.dims())));
            }
            (PortType::Tensor { .. }, Value::Text(_)) => {
                return Err(bad(format!("expected {}, got text", port.ty)));
            }
            (PortType::Tensor { dtype, shape }, Value::Tensor(t)) => {
                let want = candle_dtype(*dtype);
                let mismatch = || bad(format!("expected {}, got {:?} of shape {:?}", port.ty, t.dtype(), t.dims()));
                if t.dtype() != want {
                    return Err(mismatch());
                }
                let dims = t.dims();
                let rest = shape.last() == Some(&Dim::Rest);
                let fixed = if rest { shape.len() - 1 } else { shape.len() };
                if dims.len() < fixed || (!rest && dims.len() != fixed) {
                    return Err(mismatch());
                }
                for (d, &size) in shape.iter().zip(dims) {
                    match d {
                        Dim::Fixed(n) if *n != size => return Err(mismatch()),
                        Dim::Sym(s) if s != BATCH => match bound.get(s.as_str()) {
                            Some(&(m, other)) if m != size => {
                                return Err(bad(format!(
                                    "dimension `{s}` is {size} here but {m} on port `{other}` (shape {:?})",
                                    dims
                                )));
                            }
                            Some(_) => {}
                            None => {
                                bound.insert(s, (size, &port.name));
                            }
                        },
                        _ => {}
                    }
                }
                dims.first().copied()
            }
        };
        if let Some(n) = n {
            match rows {
                Some((m, other)) if m != n => {
                    return Err(bad(format!("has {n} rows but port `{other}` has {m}")));
                }
                None => rows = Some((n, &port.name)),
                _ => {}
            }
        }
    }
    Ok(rows.map(|(n, _)| n))
}
