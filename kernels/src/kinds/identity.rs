//! `identity`: `x` -> `out`, unchanged. For tests and for measuring the framework's own cost.

use std::sync::Arc;

use candle_core::Device;
use maas_graphs::{KindError, PortSpec, PortType, Signature, SubmodelSpec};

use crate::error::Result;
use crate::kernel::{Kernel, Kind};
use crate::value::Values;

pub(crate) struct Identity;

struct IdentityKernel;

impl Kind for Identity {
    fn name(&self) -> &str {
        "identity"
    }

    fn trivial(&self) -> bool {
        true
    }

    fn signature(&self, spec: &SubmodelSpec) -> Result<Signature, Vec<KindError>> {
        super::no_settings(spec)?;
        Ok(Signature {
            inputs: vec![PortSpec::new("x", PortType::Any)],
            outputs: vec![PortSpec::new("out", PortType::Any)],
        })
    }

    fn load(&self, _spec: &SubmodelSpec, _device: &Device) -> Result<Arc<dyn Kernel>> {
        Ok(Arc::new(IdentityKernel))
    }

    /// Nothing: it holds no parameters.
    fn memory_estimate(&self, _spec: &SubmodelSpec) -> Result<u64> {
        Ok(0)
    }
}

impl Kernel for IdentityKernel {
    fn forward(&self, inputs: &Values) -> Result<Values> {
        let x = inputs.get("x").cloned().ok_or(crate::KernelError::MissingInput { port: "x".into() })?;
        Ok(Values::from([("out".to_string(), x)]))
    }
}
