//! The one error type of the crate.
//!
//! Every variant names what went wrong in terms the caller can act on: the tensor and its shapes,
//! the device limit and the size that was asked for, or how to get an adapter where none exists.

use std::fmt;

/// A shorthand for `Result<T, wgpu_attention::Error>`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A tensor shape, printed as `[2, 3, 4]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shape(pub Vec<usize>);

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[")?;
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{d}")?;
        }
        f.write_str("]")
    }
}

impl From<&[usize]> for Shape {
    fn from(dims: &[usize]) -> Self {
        Shape(dims.to_vec())
    }
}

/// Everything that can go wrong in this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No adapter matched the request (or the machine has none at all).
    #[error(
        "no GPU adapter found ({request}). Install a GPU driver, or Mesa's software Vulkan driver \
         (lavapipe; on Debian/Ubuntu: `apt-get install mesa-vulkan-drivers libvulkan1`), or try \
         another backend with WGPU_BACKEND=vulkan|metal|dx12|gl"
    )]
    NoAdapter {
        /// What was asked for: backends, adapter name, power preference.
        request: String,
    },

    /// The adapter refused to create a device.
    #[error("the adapter `{adapter}` could not create a device: {source}")]
    RequestDevice {
        /// The adapter's name.
        adapter: String,
        /// wgpu's reason.
        source: wgpu::RequestDeviceError,
    },

    /// A tensor has the wrong shape.
    #[error("tensor `{name}` has shape {actual}, expected {expected}")]
    ShapeMismatch {
        /// The tensor's name (`x`, `w_q`, `key_mask`, ...).
        name: String,
        /// The shape the configuration calls for.
        expected: Shape,
        /// The shape that was given.
        actual: Shape,
    },

    /// A tensor's data does not fill its declared shape.
    #[error("tensor `{name}` has shape {shape} ({expected} values) but {actual} values were given")]
    DataLength {
        /// The tensor's name.
        name: String,
        /// The declared shape.
        shape: Shape,
        /// The product of the shape.
        expected: usize,
        /// The number of values given.
        actual: usize,
    },

    /// A tensor the configuration needs was not given.
    #[error("missing tensor `{name}` (expected shape {expected}): {why}")]
    MissingTensor {
        /// The tensor's name.
        name: String,
        /// The shape it should have.
        expected: Shape,
        /// Which part of the configuration needs it.
        why: String,
    },

    /// A tensor was given that the configuration does not use.
    #[error("tensor `{name}` was given but {why}")]
    UnexpectedTensor {
        /// The tensor's name.
        name: String,
        /// Why it does not fit.
        why: String,
    },

    /// A dimension of the configuration is zero.
    #[error("`{name}` is zero: every dimension of an attention layer must be at least 1")]
    ZeroSize {
        /// The dimension's name.
        name: &'static str,
    },

    /// A size goes past a limit of the device (or of the 32-bit indexing the shaders use).
    #[error("{what} needs {requested}, past the device limit `{limit}` = {max}{hint}")]
    LimitExceeded {
        /// The limit's name, as in `wgpu::Limits`.
        limit: &'static str,
        /// The limit's value on this device.
        max: u64,
        /// What was asked for.
        requested: u64,
        /// What needed it.
        what: String,
        /// A way out, if there is one (starts with "; ").
        hint: String,
    },

    /// An input holds NaN or infinity. Attention mixes every key into every query, so a single
    /// non-finite input would spread silently; it is refused instead.
    #[error("tensor `{name}` holds {value} at index {index}: inputs must be finite")]
    NonFinite {
        /// The tensor's name.
        name: String,
        /// The multi-dimensional index of the first bad value.
        index: Shape,
        /// The value found.
        value: f32,
    },

    /// The GPU produced NaN or infinity although every input was finite: a product or sum
    /// passed f32's range. Returned instead of the values, which would be silently wrong.
    #[error("the output holds {value} at index {index} although every input was finite: {hint}")]
    NonFiniteOutput {
        /// The multi-dimensional index of the first bad value.
        index: Shape,
        /// The value found.
        value: f32,
        /// What overflowed and what to do about it.
        hint: String,
    },

    /// A finite input is past f16's range (its magnitude rounds above 65504), so storing it in
    /// f16 would make it an infinity. Scale the tensor down or run in f32.
    #[error(
        "tensor `{name}` holds {value} at index {index}, past f16's largest value 65504: scale \
         it down or run with f32 precision"
    )]
    OutsideF16Range {
        /// The tensor's name.
        name: String,
        /// The multi-dimensional index of the first such value.
        index: Shape,
        /// The value found.
        value: f32,
    },

    /// f16 precision was asked for on a device without the `SHADER_F16` feature.
    #[error(
        "the adapter `{adapter}` lacks shader-f16 (wgpu's SHADER_F16 feature), so f16 storage \
         cannot run on it: use f32 precision, or an adapter that has it (Vulkan, Metal and DX12 \
         drivers usually do; OpenGL never does)"
    )]
    NoShaderF16 {
        /// The adapter's name.
        adapter: String,
    },

    /// f16 storage was asked for where kernels that store f32 only would run: the backward
    /// (an operator with gradients). The forward kernels (fused, staged, split-K decode) all
    /// have f16 storage.
    #[error(
        "f16 precision runs on the forward kernels only, but {why}: use f32 precision, or \
         drop the gradients"
    )]
    F16NeedsFused {
        /// Why an f32-only kernel would run.
        why: String,
    },

    /// A key-padding mask holds something other than 0 or 1.
    #[error("key_mask holds {value} at index {index}: use 1 for a real token and 0 for padding")]
    InvalidMask {
        /// The multi-dimensional index of the bad value.
        index: Shape,
        /// The value found.
        value: f32,
    },

    /// A configuration value is out of range.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),

    /// A file the library was asked to read or write (the autotuner's) could not be.
    #[error("{path}: {message}")]
    Io {
        /// The file.
        path: String,
        /// What went wrong.
        message: String,
    },

    /// A buffer handed in by the caller is too small or lacks a usage flag.
    #[error("buffer `{name}`: {problem}")]
    BadBuffer {
        /// Which buffer (`x`, `key_mask`, `output`).
        name: &'static str,
        /// What is wrong with it.
        problem: String,
    },

    /// Bindings made by one plan were handed to another.
    #[error("these bindings were made by another AttentionPlan; bind the buffers with this plan")]
    ForeignBindings,

    /// wgpu reported a validation, out-of-memory or internal error.
    #[error("wgpu error while {stage}: {message}")]
    Wgpu {
        /// What the crate was doing.
        stage: String,
        /// wgpu's message.
        message: String,
    },

    /// Mapping a buffer for read-back failed.
    #[error("reading results back from the GPU failed: {0}")]
    Map(#[from] wgpu::BufferAsyncError),

    /// Waiting for the device failed (device lost or timed out).
    #[error("waiting for the GPU failed: {0}")]
    Poll(#[from] wgpu::PollError),

    /// The number of key/value heads does not divide the number of query heads.
    #[error(
        "kv_heads = {kv_heads} does not divide heads = {heads}: every key/value head must serve          the same number of query heads (kv_heads = heads is MHA, kv_heads = 1 is MQA)"
    )]
    KvHeadsNotDividing {
        /// Query heads.
        heads: usize,
        /// Key/value heads.
        kv_heads: usize,
    },

    /// A tensor's heads are not as wide as the configuration says (Q and K share `head_dim`,
    /// V and the output `head_dim_v`).
    #[error(
        "tensor `{name}` has heads {actual} wide, expected {expected}: Q and K heads must be as wide as each other (head_dim), V's as head_dim_v"
    )]
    HeadDimMismatch {
        /// The tensor's name.
        name: String,
        /// The configured width.
        expected: usize,
        /// The width found.
        actual: usize,
    },

    /// A call's length is past the maximum the operator was built for.
    #[error(
        "`{name}` = {len} is past the operator's maximum {max}: build it with a larger maximum"
    )]
    LengthPastMaximum {
        /// `q_len` or `kv_len`.
        name: &'static str,
        /// The length asked for.
        len: usize,
        /// The maximum.
        max: usize,
    },

    /// An append would pass a KV cache's capacity (the cache never wraps around).
    #[error(
        "appending {adding} tokens to batch row {row} of the KV cache, which holds {len}, would \
         pass its capacity of {capacity} tokens: build the cache with a larger capacity, or set \
         shorter lengths first"
    )]
    KvCacheFull {
        /// The batch row.
        row: usize,
        /// Tokens the row holds.
        len: usize,
        /// Tokens being appended.
        adding: usize,
        /// The cache's capacity per row.
        capacity: usize,
    },

    /// A tensor has the wrong number of dimensions for the layout.
    #[error("tensor `{name}` has shape {shape}, expected rank {rank} for the {layout} layout")]
    WrongRank {
        /// The tensor's name.
        name: String,
        /// The shape given.
        shape: Shape,
        /// The rank expected.
        rank: usize,
        /// The layout the rank comes from.
        layout: String,
    },
}

impl Error {
    pub(crate) fn shape(name: &str, expected: &[usize], actual: &[usize]) -> Self {
        Error::ShapeMismatch {
            name: name.to_string(),
            expected: expected.into(),
            actual: actual.into(),
        }
    }
}
