//! The registry of kinds: built-in ones plus whatever an embedding application adds.

use std::collections::BTreeMap;
use std::sync::Arc;

use maas_graphs::{Catalog, Signature, SignatureError, SubmodelSpec};

use crate::device::open_device;
use crate::error::{KernelError, Result};
use crate::kernel::{Kind, Loaded};

/// Kinds by name. Implements [`Catalog`], so the graph checker asks it for signatures.
#[derive(Clone)]
pub struct Registry {
    kinds: BTreeMap<String, Arc<dyn Kind>>,
}

impl Default for Registry {
    fn default() -> Self {
        Self::builtin()
    }
}

impl Registry {
    /// A registry with no kinds.
    pub fn empty() -> Self {
        Self { kinds: BTreeMap::new() }
    }

    /// A registry with every built-in kind.
    pub fn builtin() -> Self {
        let mut r = Self::empty();
        for k in crate::kinds::builtin() {
            r.kinds.insert(k.name().to_string(), k);
        }
        r
    }

    /// Registers a kind under its name, replacing any kind of that name; returns the replaced one.
    pub fn register(&mut self, kind: impl Kind + 'static) -> Option<Arc<dyn Kind>> {
        self.kinds.insert(kind.name().to_string(), Arc::new(kind))
    }

    /// A kind by name.
    pub fn get(&self, name: &str) -> Option<&Arc<dyn Kind>> {
        self.kinds.get(name)
    }

    /// The bytes loading one replica of `spec` takes (its kind's [`Kind::memory_estimate`]).
    pub fn memory_estimate(&self, spec: &SubmodelSpec) -> Result<u64> {
        let kind = self.get(&spec.kind).ok_or_else(|| KernelError::Param {
            key: "kind".into(),
            message: format!("unknown kind `{}`", spec.kind),
        })?;
        kind.memory_estimate(spec)
    }

    /// Opens the submodel's device and loads its kernel there.
    pub fn load(&self, spec: &SubmodelSpec) -> Result<Loaded> {
        let kind = self.get(&spec.kind).ok_or_else(|| KernelError::Param {
            key: "kind".into(),
            message: format!("unknown kind `{}`", spec.kind),
        })?;
        let signature = kind.signature(spec).map_err(crate::kinds::settings_error)?;
        let device = open_device(spec.device)?;
        let kernel = kind.load(spec, &device)?;
        Ok(Loaded { kernel, signature: Arc::new(signature), device, warm_up: kind.warm_up() })
    }
}

impl Catalog for Registry {
    fn kinds(&self) -> Vec<String> {
        self.kinds.keys().cloned().collect()
    }

    fn signature(&self, submodel: &SubmodelSpec) -> Result<Signature, SignatureError> {
        let kind = self.get(&submodel.kind).ok_or(SignatureError::UnknownKind)?;
        kind.signature(submodel).map_err(SignatureError::Invalid)
    }
}
