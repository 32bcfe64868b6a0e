//! The program's errors: the library's, and those of files and arguments.

use std::path::PathBuf;

/// Everything the program reports before exiting with a failure.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// An error of the attention library (shapes, limits, adapters, wgpu).
    #[error(transparent)]
    Attention(#[from] wgpu_attention::Error),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A file is not valid safetensors, or a tensor in it is unusable.
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    /// The arguments do not fit together.
    #[error("{0}")]
    Usage(String),
    /// The GPU and the CPU reference disagree beyond the tolerance.
    #[error("GPU and CPU reference disagree: {0}")]
    Mismatch(String),
}
