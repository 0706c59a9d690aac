//! Compute for maas: the [`Kernel`] and [`Kind`] traits, the [`Registry`] of kinds, weight
//! loading, and the built-in kinds on candle.
//!
//! Everything here is synchronous: a kernel runs one batch on the calling thread (the runtime
//! gives each submodel its own execution stream). Inputs are checked against the kind's
//! [`Signature`](maas_graphs::Signature) by [`Loaded::forward`] before a kernel sees them, so a
//! wrong dtype or shape is a typed error naming the port, never a panic.
//!
//! ```
//! use maas_kernels::{Registry, Value, Values};
//! use maas_graphs::{SubmodelName, SubmodelSpec};
//! use candle_core::{Device, Tensor};
//!
//! let registry = Registry::builtin();
//! let mut spec = SubmodelSpec::new(SubmodelName::new("probs").unwrap(), "softmax");
//! let softmax = registry.load(&spec).unwrap();
//! let x = Tensor::new(&[[1f32, 1.0], [0.0, 0.0]], &Device::Cpu).unwrap();
//! let out = softmax.forward(&Values::from([("x".to_string(), Value::from(x))])).unwrap();
//! let probs: Vec<Vec<f32>> = out["out"].as_tensor().unwrap().to_vec2().unwrap();
//! assert_eq!(probs, vec![vec![0.5, 0.5], vec![0.5, 0.5]]);
//!
//! // A wrong dtype is an error that names the port.
//! let ids = Tensor::new(&[[1u32, 2]], &Device::Cpu).unwrap();
//! let err = softmax.forward(&Values::from([("x".to_string(), Value::from(ids))])).unwrap_err();
//! assert!(err.to_string().starts_with("input port `x`: expected f32[B,N], got U32"));
//! # let _ = &mut spec;
//! ```

mod device;
mod error;
mod kernel;
pub mod kinds;
pub mod memory;
mod registry;
mod value;
pub mod weights;

pub use device::open_device;
pub use error::{CandleContext, KernelError, Result};
pub use kernel::{Kernel, Kind, Loaded, candle_dtype, check_inputs};
pub use kinds::fixed_cost::FixedCost;
pub use kinds::linear::{Linear, Quantize};
pub use registry::Registry;
pub use value::{Value, Values};
