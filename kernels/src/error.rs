//! The kernels crate's error type: every variant names what it is about (file, tensor, port,
//! param key) and the shapes involved.

use std::path::PathBuf;

/// A failure to load a kernel or to run a batch through it.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// A file could not be read.
    #[error("cannot read `{path}`: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A path given as a file is not a regular file (missing, a directory, a FIFO, ...); it is
    /// never opened.
    #[error("`{path}` {problem}")]
    NotAFile {
        /// The path.
        path: PathBuf,
        /// What it is instead (`is not a regular file (a FIFO)`).
        problem: String,
    },
    /// A buffer could not be allocated; the load fails instead of aborting the process.
    #[error("{op}: cannot allocate {bytes} bytes")]
    Allocation {
        /// What was being allocated.
        op: &'static str,
        /// How many bytes it needed (`u64::MAX`: more than can be counted).
        bytes: u64,
    },
    /// A weights file is not valid safetensors (corrupt or truncated).
    #[error("`{path}` is not a valid safetensors file: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A tensor the kind needs is not in the weights file.
    #[error("`{path}` has no tensor `{name}`")]
    MissingTensor {
        /// The file.
        path: PathBuf,
        /// The tensor's name.
        name: String,
    },
    /// A tensor in the weights file has the wrong shape.
    #[error("tensor `{name}` in `{path}` has shape {actual:?}, expected {expected:?}")]
    TensorShape {
        /// The file.
        path: PathBuf,
        /// The tensor's name.
        name: String,
        /// The shape the kind needs.
        expected: Vec<usize>,
        /// The shape in the file.
        actual: Vec<usize>,
    },
    /// A kind-specific setting is missing or does not fit the kind.
    #[error("`{key}`: {message}")]
    Param {
        /// The key, relative to the submodel (`params.max_length`, `weights`).
        key: String,
        /// What is wrong.
        message: String,
    },
    /// A model config file (e.g. `config.json`) is unreadable or invalid.
    #[error("config `{path}`: {message}")]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A batch lacks a required input port.
    #[error("input port `{port}` is missing")]
    MissingInput {
        /// The port.
        port: String,
    },
    /// An input does not fit its port (dtype, rank, size, or text vs tensor), or holds a value
    /// the kernel cannot take (a token id past the vocabulary, more positions than the model
    /// has).
    #[error("input port `{port}`: {message}")]
    Input {
        /// The port.
        port: String,
        /// What does not fit, with the expected and actual shapes or the value and the limit.
        message: String,
    },
    /// An input tensor has no elements (a zero-sized dimension), e.g. `"pixels": []` at a
    /// pipeline's input.
    #[error("input port `{port}` is empty (shape {shape:?}); expected {expected}")]
    EmptyInput {
        /// The port.
        port: String,
        /// The port's type (`f32[B,64]`).
        expected: String,
        /// The shape received.
        shape: Vec<usize>,
    },
    /// The device is not available in this build or on this machine.
    #[error("device `{device}`: {message}")]
    Device {
        /// The device as written (`cuda:0`).
        device: String,
        /// Why it cannot be used.
        message: String,
    },
    /// A tensor operation failed.
    #[error("{op}: {}", candle_message(source))]
    Candle {
        /// What was being done.
        op: &'static str,
        /// candle's error.
        #[source]
        source: candle_core::Error,
    },
    /// The tokenizer failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// An external model runtime (ONNX Runtime) failed to load or to run a model.
    #[error("{0}")]
    Runtime(String),
    /// A kernel panicked; the runtime turns the panic into this error.
    #[error("kernel panicked: {0}")]
    Panicked(String),
}

impl KernelError {
    /// The error is about what the caller sent (a missing, mistyped, empty or out-of-range
    /// input), not about the kernel: the request is at fault, the submodel is healthy.
    pub fn is_input(&self) -> bool {
        matches!(self, KernelError::MissingInput { .. } | KernelError::Input { .. } | KernelError::EmptyInput { .. })
    }
}

/// candle's message without the backtrace it attaches when `RUST_BACKTRACE` is set (which
/// would otherwise reach clients in error messages).
fn candle_message(e: &candle_core::Error) -> String {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => candle_message(inner),
        candle_core::Error::Context { inner, context } => format!("{context}: {}", candle_message(inner)),
        other => other.to_string(),
    }
}

/// `Result` with [`KernelError`].
pub type Result<T, E = KernelError> = std::result::Result<T, E>;

/// Adds the operation's name to candle errors: `tensor_op.ctx("mean_pool")?`.
pub trait CandleContext<T> {
    /// Wraps a candle error with the name of the operation.
    fn ctx(self, op: &'static str) -> Result<T>;
}

impl<T> CandleContext<T> for candle_core::Result<T> {
    fn ctx(self, op: &'static str) -> Result<T> {
        self.map_err(|source| KernelError::Candle { op, source })
    }
}
