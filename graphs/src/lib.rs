//! Pipeline graphs for maas: the TOML language, its checker, and the validated DAGs.
//!
//! A graph file declares **submodels** (a kernel kind with weights and serving settings) and
//! **pipelines** (DAGs of nodes that wire submodels' named ports together). Checking happens in
//! two steps: the TOML is parsed with spans (so every problem has a `file:line:col`), then
//! references, cycles, reachability and port types are checked against the signatures a
//! [`Catalog`] of kernel kinds declares. Every problem is reported at once; a graph with an
//! error is rejected whole.
//!
//! This crate knows nothing of tensors, actors or async runtimes.
//!
//! ```
//! use maas_graphs::{Catalog, KindError, Signature, SignatureError, SourceFile, SubmodelSpec, PortSpec, ty};
//!
//! /// A catalog with one kind, `double`: x: f32[B,N] -> out: f32[B,N].
//! struct Kinds;
//! impl Catalog for Kinds {
//!     fn kinds(&self) -> Vec<String> { vec!["double".into()] }
//!     fn signature(&self, s: &SubmodelSpec) -> Result<Signature, SignatureError> {
//!         match s.kind.as_str() {
//!             "double" => Ok(Signature {
//!                 inputs: vec![PortSpec::new("x", ty("f32[B,N]"))],
//!                 outputs: vec![PortSpec::new("out", ty("f32[B,N]"))],
//!             }),
//!             _ => Err(SignatureError::UnknownKind),
//!         }
//!     }
//! }
//!
//! let toml = r#"
//! [submodels.twice]
//! kind = "double"
//!
//! [pipelines.quad]
//! inputs = { x = "f32[B,4]" }
//! outputs = { y = "b.out" }
//! nodes.a = { submodel = "twice", inputs = { x = "$x" } }
//! nodes.b = { submodel = "twice", inputs = { x = "a.out" } }
//! "#;
//! let checked = maas_graphs::check(vec![SourceFile::new("quad.toml", toml, ".")], &Kinds).unwrap();
//! let quad = &checked.graph.pipelines["quad"];
//! assert_eq!(quad.outputs[0].ty.to_string(), "f32[B,4]");
//!
//! let bad = toml.replace("a.out", "a.nope");
//! let err = maas_graphs::check(vec![SourceFile::new("quad.toml", bad, ".")], &Kinds).unwrap_err();
//! assert_eq!(
//!     err.to_string(),
//!     "quad.toml:9:48: error: node `a` has no output port `nope`; kind `double` produces: out"
//! );
//! ```

mod catalog;
mod check;
mod diagnostic;
mod diff;
mod dot;
mod files;
mod names;
mod parse;
mod signature;
mod spec;
mod suggest;
mod to_toml;

pub use catalog::{Catalog, KindError, SignatureError};
pub use check::{Checked, check, check_files};
pub use diagnostic::{Diagnostic, Diagnostics, Location, Severity, SourceFile};
pub use diff::{Changes, GraphDiff};
pub use dot::to_dot;
pub use files::file_problem;
pub use names::{NodeName, PipelineName, PortName, SubmodelName, check_name};
pub use parse::parse_source;
pub use signature::{BATCH, DType, Dim, PortSpec, PortType, Ragged, Signature, TypeParseError, ty};
pub use spec::{
    BatchSpec, DEFAULT_QUEUE, DEFAULT_VERSION, DeviceSpec, Edge, FILE_PARAMS, Graph, LOCAL_NODE, Node, NodeSpec,
    Pipeline, PipelineInput, PipelineOutput, Source, SubmodelSpec, Vertex,
};
pub use suggest::{did_you_mean, hint};
pub use to_toml::{submodel_table, to_toml};
