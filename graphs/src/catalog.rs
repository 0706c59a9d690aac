//! How the checker learns what each kernel kind accepts.
//!
//! The graphs crate knows no kernels. Whoever owns the kinds (the kernels crate's registry, or
//! a test) implements [`Catalog`]; the checker asks it for each submodel's [`Signature`], which
//! may depend on the submodel's params and on its weight and config files.

use crate::signature::Signature;
use crate::spec::SubmodelSpec;

/// A problem a kind found with a submodel's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KindError {
    /// The key it is about, relative to the submodel table: `"weights"`, `"params.config"`,
    /// `"params"`; `None` for the submodel as a whole. Used to point at the right place.
    pub key: Option<String>,
    /// What is wrong.
    pub message: String,
    /// The key is a param the kind does not take (a typo, or a param of another kind): a
    /// mistake in what was written rather than in the files it names.
    pub unknown_param: bool,
}

impl KindError {
    /// A problem with one key.
    pub fn at(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self { key: Some(key.into()), message: message.into(), unknown_param: false }
    }

    /// `params.<key>` is not a param of this kind, which takes `accepted` (perhaps none); the
    /// message lists them and suggests the closest.
    pub fn unknown_param(key: &str, accepted: &[&str]) -> Self {
        let takes = match accepted {
            [] => "it takes no params".to_string(),
            some => format!("it takes: {}", some.join(", ")),
        };
        Self {
            key: Some(format!("params.{key}")),
            message: format!("unknown param `{key}`; {takes}{}", crate::suggest::hint(key, accepted.iter().copied())),
            unknown_param: true,
        }
    }

    /// A problem with the submodel as a whole.
    pub fn whole(message: impl Into<String>) -> Self {
        Self { key: None, message: message.into(), unknown_param: false }
    }
}

/// Why a catalog could not give a signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignatureError {
    /// No kind of that name is registered.
    UnknownKind,
    /// The kind rejects these settings.
    Invalid(Vec<KindError>),
}

/// The kinds a graph may use and their signatures.
pub trait Catalog {
    /// The names of every registered kind, for "expected one of" messages.
    fn kinds(&self) -> Vec<String>;

    /// The signature of `submodel` (whose `kind` names the kind), or why there is none.
    fn signature(&self, submodel: &SubmodelSpec) -> Result<Signature, SignatureError>;
}
