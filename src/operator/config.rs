//! What an operator computes: its configuration and maximum lengths, the layouts and bias
//! shapes it reads, and one call's lengths.

use crate::config::KernelChoice;
use crate::error::{Error, Result};
use crate::kernels::decode::DecodeGeometry;
use crate::kernels::fused::{FusedGeometry, Strides};
use crate::precision::Precision;

/// How Q, K, V and the output are laid out in memory (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QkvLayout {
    /// `[batch, heads, len, dim]`.
    #[default]
    HeadMajor,
    /// `[batch, len, heads * dim]`.
    TokenMajor,
}

/// The most queries a call may have for the split-K decode kernel
/// (`shaders/decode_split.wgsl`); [`OperatorPath::Auto`] runs it for calls up to this long.
pub const DECODE_MAX_Q_LEN: usize = 16;

/// Whether an [`AttentionOp`](super::AttentionOp) call runs split-K decode or the prefill
/// kernels (fused or staged, as [`OperatorConfig::with_kernel`] picks).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OperatorPath {
    /// By shape: split-K decode for calls of at most [`DECODE_MAX_Q_LEN`] queries (when there
    /// is no bias and no intermediates are kept), the prefill kernels otherwise.
    #[default]
    Auto,
    /// Always the prefill kernels (for the fused one, a workgroup per block of query rows: a
    /// "single pass" over the keys).
    Prefill,
    /// Always split-K decode: the keys cut across workgroups, the partial results merged by a
    /// second pass. Needs `max_q_len <= DECODE_MAX_Q_LEN` and no bias.
    SplitK,
}

/// Which dimensions of the bias `[batch or 1, heads or 1, q_len, kv_len]` are full; a
/// dimension that is not is 1 and broadcast.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BiasShape {
    /// The bias has a `batch` dimension (else 1).
    pub per_batch: bool,
    /// The bias has a `heads` dimension (else 1).
    pub per_head: bool,
}

impl BiasShape {
    /// The bias's leading dimensions for `batch` and `heads`.
    pub fn dims(&self, batch: usize, heads: usize) -> [usize; 2] {
        [
            if self.per_batch { batch } else { 1 },
            if self.per_head { heads } else { 1 },
        ]
    }
}

/// What an [`AttentionOp`](super::AttentionOp) computes and the largest lengths it runs.
#[derive(Debug, Clone, PartialEq)]
pub struct OperatorConfig {
    /// Batch rows.
    pub batch: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads; must divide `heads` (equal: MHA, 1: MQA).
    pub kv_heads: usize,
    /// Width of a query and key head.
    pub head_dim: usize,
    /// Width of a value head (and of the output's heads).
    pub head_dim_v: usize,
    /// The most queries a call may have.
    pub max_q_len: usize,
    /// The most keys a call may have.
    pub max_kv_len: usize,
    /// Causal masking, aligned to the end of the keys.
    pub causal: bool,
    /// Whether calls bind a key-padding mask `[batch, kv_len]`.
    pub key_padding_mask: bool,
    /// The additive bias's shape, if calls bind one.
    pub bias: Option<BiasShape>,
    /// The scale of `Q Kᵀ`; `None` means `1 / sqrt(head_dim)`.
    pub scale: Option<f32>,
    /// The layout of Q, K, V and the output.
    pub layout: QkvLayout,
    /// K and V laid out for this many keys whatever the call's `kv_len` (a KV cache: the
    /// head stride is `kv_capacity * head_dim` head-major); `None`: packed at each call's
    /// `kv_len`. At least `max_kv_len`.
    pub kv_capacity: Option<usize>,
    /// Whether the operator also runs the backward (dQ, dK, dV): it then runs the fused
    /// kernel, whose forward saves each row's logsumexp, and compiles the backward's kernels
    /// and allocates their scratch when built (see
    /// [`AttentionOp::encode_backward`](super::AttentionOp::encode_backward)).
    pub gradients: bool,
    /// Which kernels run: the fused kernel, the staged ones (scores, softmax, weighted sum,
    /// through a score matrix of the maximum lengths), or `Auto` (see
    /// [`OperatorConfig::with_kernel`]).
    pub kernel: KernelChoice,
    /// Keep each call's probabilities readable
    /// ([`AttentionOp::read_probabilities`](super::AttentionOp::read_probabilities)); only the
    /// staged kernels have them.
    pub keep_intermediates: bool,
    /// Whether short calls run split-K decode ([`OperatorPath`]); `kernel` picks the kernels
    /// of the others.
    pub path: OperatorPath,
    /// Key ranges split-K decode cuts the keys into; `None`: chosen from the shape and the
    /// adapter (enough workgroups to fill it when `batch x kv_heads` does not, each split at
    /// least 64 keys of `max_kv_len`).
    pub splits: Option<usize>,
    /// Each batch row has its own key count (`<=` the call's `kv_len`), read from a uniform
    /// table (a [`KvCache`](super::KvCache)'s, bound with
    /// [`AttentionOp::bind_cache`](super::AttentionOp::bind_cache)); causal masking is aligned
    /// to each row's own end. Split-K decode only: needs `max_q_len <= DECODE_MAX_Q_LEN`, no
    /// key mask and no bias.
    pub row_lengths: bool,
    /// How Q, K, V (the KV cache) and the output are stored in the caller's buffers: f32, or
    /// f16 with f32 arithmetic (see [`crate::precision`]).
    pub precision: Precision,
}

impl OperatorConfig {
    /// `heads` query heads over `kv_heads` key/value heads, all `head_dim` wide, for up to
    /// `max_q_len` queries over `max_kv_len` keys; head-major, unmasked, default scale.
    pub fn new(
        batch: usize,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        max_q_len: usize,
        max_kv_len: usize,
    ) -> Self {
        OperatorConfig {
            batch,
            heads,
            kv_heads,
            head_dim,
            head_dim_v: head_dim,
            max_q_len,
            max_kv_len,
            causal: false,
            key_padding_mask: false,
            bias: None,
            scale: None,
            layout: QkvLayout::HeadMajor,
            kv_capacity: None,
            gradients: false,
            kernel: KernelChoice::Auto,
            keep_intermediates: false,
            path: OperatorPath::Auto,
            splits: None,
            row_lengths: false,
            precision: Precision::F32,
        }
    }

    /// Q, K, V and the output stored in `precision` (see [`crate::precision`]).
    pub fn with_precision(mut self, precision: Precision) -> Self {
        self.precision = precision;
        self
    }

    /// Bytes of one element of the tensor `name` (of [`OperatorConfig::max_elements`]): Q, K,
    /// V and the output in the storage precision; the mask (u32) and the bias (f32) in 4.
    pub(crate) fn element_bytes(&self, name: &str) -> u64 {
        match name {
            "q" | "k" | "v" | "out" => self.precision.bytes(),
            _ => 4,
        }
    }

    /// Runs these kernels. `Auto` (the default) takes the fused kernel unless it cannot run:
    /// intermediates are kept, the device allows fewer storage buffers per shader stage than
    /// it binds (downlevel devices: 4), a value head is wider than it holds, or its smallest
    /// tiles pass the device's workgroup memory; the staged kernels then run.
    pub fn with_kernel(mut self, kernel: KernelChoice) -> Self {
        self.kernel = kernel;
        self
    }

    /// Keeps each call's probabilities readable; runs the staged kernels (an explicit
    /// `KernelChoice::Fused` is refused).
    pub fn with_intermediates(mut self) -> Self {
        self.keep_intermediates = true;
        self
    }

    /// Calls run this kernel.
    pub fn with_path(mut self, path: OperatorPath) -> Self {
        self.path = path;
        self
    }

    /// Split-K decode cuts the keys into `splits` ranges.
    pub fn with_splits(mut self, splits: usize) -> Self {
        self.splits = Some(splits);
        self
    }

    /// Each batch row has its own key count (see [`OperatorConfig::row_lengths`]).
    pub fn with_row_lengths(mut self) -> Self {
        self.row_lengths = true;
        self
    }

    /// Whether the operator builds the split-K decode kernel.
    pub(super) fn has_decode(&self) -> bool {
        // Split-K decode saves no logsumexp: an operator with gradients runs the fused kernel.
        self.path != OperatorPath::Prefill
            && self.bias.is_none()
            && !self.keep_intermediates
            && !self.gradients
    }

    /// Value heads of another width.
    pub fn with_head_dim_v(mut self, head_dim_v: usize) -> Self {
        self.head_dim_v = head_dim_v;
        self
    }

    /// Causal masking, aligned to the end of the keys.
    pub fn causal(mut self) -> Self {
        self.causal = true;
        self
    }

    /// Calls bind a key-padding mask.
    pub fn with_key_padding_mask(mut self) -> Self {
        self.key_padding_mask = true;
        self
    }

    /// Calls bind an additive bias of this shape.
    pub fn with_bias(mut self, bias: BiasShape) -> Self {
        self.bias = Some(bias);
        self
    }

    /// A scale other than `1 / sqrt(head_dim)`.
    pub fn with_scale(mut self, scale: f32) -> Self {
        self.scale = Some(scale);
        self
    }

    /// Q, K, V and the output token-major, `[batch, len, heads * dim]`.
    pub fn token_major(mut self) -> Self {
        self.layout = QkvLayout::TokenMajor;
        self
    }

    /// K and V buffers laid out for `capacity` keys (a KV cache), the call's keys first.
    pub fn with_kv_capacity(mut self, capacity: usize) -> Self {
        self.kv_capacity = Some(capacity);
        self
    }

    /// Gradients wanted: the operator also runs the backward.
    pub fn with_gradients(mut self) -> Self {
        self.gradients = true;
        self
    }

    /// Keys K and V are laid out for: the capacity, else the maximum length.
    fn kv_rows(&self) -> usize {
        self.kv_capacity.unwrap_or(self.max_kv_len)
    }

    /// The scale applied to `Q Kᵀ`.
    pub fn scale_value(&self) -> f32 {
        self.scale
            .unwrap_or_else(|| 1.0 / (self.head_dim as f32).sqrt())
    }

    /// Checks the configuration, naming what is wrong.
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("batch", self.batch),
            ("heads", self.heads),
            ("kv_heads", self.kv_heads),
            ("head_dim", self.head_dim),
            ("head_dim_v", self.head_dim_v),
            ("max_q_len", self.max_q_len),
            ("max_kv_len", self.max_kv_len),
        ] {
            if v == 0 {
                return Err(Error::ZeroSize { name });
            }
        }
        if !self.heads.is_multiple_of(self.kv_heads) {
            return Err(Error::KvHeadsNotDividing {
                heads: self.heads,
                kv_heads: self.kv_heads,
            });
        }
        if let Some(capacity) = self.kv_capacity
            && capacity < self.max_kv_len
        {
            return Err(Error::InvalidConfig(format!(
                "kv_capacity {capacity} is below max_kv_len {}",
                self.max_kv_len
            )));
        }
        if self.splits == Some(0) {
            return Err(Error::ZeroSize { name: "splits" });
        }
        let split_k_only = |what: &str| -> Result<()> {
            if self.max_q_len > DECODE_MAX_Q_LEN {
                return Err(Error::InvalidConfig(format!(
                    "{what} runs only split-K decode, which takes at most {DECODE_MAX_Q_LEN} \
                     queries, but max_q_len is {}",
                    self.max_q_len
                )));
            }
            if self.bias.is_some() {
                return Err(Error::InvalidConfig(format!(
                    "{what} runs only split-K decode, which takes no bias"
                )));
            }
            Ok(())
        };
        if self.path == OperatorPath::SplitK {
            split_k_only("OperatorPath::SplitK")?;
        }
        if self.row_lengths {
            split_k_only("with_row_lengths")?;
            if self.path == OperatorPath::Prefill {
                return Err(Error::InvalidConfig(
                    "with_row_lengths needs split-K decode, but the path is Fused".into(),
                ));
            }
            if self.batch > crate::kernels::decode::MAX_ROW_LENGTHS {
                return Err(Error::InvalidConfig(format!(
                    "with_row_lengths takes at most {} batch rows, not {}",
                    crate::kernels::decode::MAX_ROW_LENGTHS,
                    self.batch
                )));
            }
            if self.key_padding_mask {
                return Err(Error::InvalidConfig(
                    "with_row_lengths and a key-padding mask: the decode kernel takes one of \
                     the two (a row's key count is a mask of its first keys)"
                        .into(),
                ));
            }
        }
        if self.keep_intermediates && self.kernel == KernelChoice::Fused {
            return Err(Error::InvalidConfig(
                "the fused kernel stores no probabilities to keep: use KernelChoice::Staged \
                 (or Auto) to read them back"
                    .into(),
            ));
        }
        if !self.scale_value().is_finite() {
            return Err(Error::InvalidConfig(format!(
                "scale {} is not finite",
                self.scale_value()
            )));
        }
        Ok(())
    }

    /// The shape of a tensor for a call of `len` tokens: `heads` heads of `width`.
    pub(super) fn shape(&self, heads: usize, len: usize, width: usize) -> Vec<usize> {
        match self.layout {
            QkvLayout::HeadMajor => vec![self.batch, heads, len, width],
            QkvLayout::TokenMajor => vec![self.batch, len, heads * width],
        }
    }

    /// The output's shape for a call of `q_len` queries.
    pub fn output_shape(&self, q_len: usize) -> Vec<usize> {
        self.shape(self.heads, q_len, self.head_dim_v)
    }

    pub(super) fn decode_geometry(&self, splits: u32) -> DecodeGeometry {
        let g = self.geometry();
        DecodeGeometry {
            batch: g.batch,
            heads: g.heads,
            kv_heads: g.kv_heads,
            head_dim: g.head_dim,
            head_dim_v: g.head_dim_v,
            causal: g.causal,
            mask: self.key_padding_mask,
            row_lengths: self.row_lengths,
            scale: g.scale,
            splits,
            q: g.q,
            k: g.k,
            v: g.v,
            out: g.out,
        }
    }

    fn strides(&self, heads: usize, width: usize) -> Strides {
        let (h, w) = (heads as u32, width as u32);
        match self.layout {
            QkvLayout::HeadMajor => Strides::head_major(h, w, 0),
            QkvLayout::TokenMajor => Strides::token_major(h, w, 0),
        }
    }

    fn kv_strides(&self, width: usize) -> Strides {
        let s = self.strides(self.kv_heads, width);
        match self.kv_capacity {
            Some(capacity) => s.at_capacity(capacity as u32),
            None => s,
        }
    }

    pub(super) fn geometry(&self) -> FusedGeometry {
        FusedGeometry {
            precision: self.precision,
            batch: self.batch as u32,
            heads: self.heads as u32,
            kv_heads: self.kv_heads as u32,
            head_dim: self.head_dim as u32,
            head_dim_v: self.head_dim_v as u32,
            causal: self.causal,
            has_mask: self.key_padding_mask,
            packed_qkv: false,
            lse: self.gradients,
            bias: self.bias.map(|b| (b.per_batch, b.per_head)),
            scale: self.scale_value(),
            q: self.strides(self.heads, self.head_dim),
            k: self.kv_strides(self.head_dim),
            v: self.kv_strides(self.head_dim_v),
            out: self.strides(self.heads, self.head_dim_v),
        }
    }

    /// Elements of each tensor at the maximum lengths: q, k, v, out, key_mask, bias.
    pub(super) fn max_elements(&self) -> [(&'static str, u64); 6] {
        let (b, h, kh) = (self.batch as u64, self.heads as u64, self.kv_heads as u64);
        let (q, kv) = (self.max_q_len as u64, self.max_kv_len as u64);
        let rows = self.kv_rows() as u64;
        let (d, dv) = (self.head_dim as u64, self.head_dim_v as u64);
        let [bb, hb] = self.bias.map_or([0, 0], |s| s.dims(self.batch, self.heads));
        [
            ("q", b * h * q * d),
            ("k", b * kh * rows * d),
            ("v", b * kh * rows * dv),
            ("out", b * h * q * dv),
            ("key_mask", if self.key_padding_mask { b * kv } else { 0 }),
            ("bias", bb as u64 * hb as u64 * q * kv),
        ]
    }

    /// Checks a call's lengths against the maxima.
    pub fn check_lengths(&self, lengths: Lengths) -> Result<()> {
        for (name, len, max) in [
            ("q_len", lengths.q_len, self.max_q_len),
            ("kv_len", lengths.kv_len, self.max_kv_len),
        ] {
            if len == 0 {
                return Err(Error::ZeroSize { name });
            }
            if len > max {
                return Err(Error::LengthPastMaximum { name, len, max });
            }
        }
        Ok(())
    }
}

/// The lengths of one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lengths {
    /// Queries.
    pub q_len: usize,
    /// Keys (and values).
    pub kv_len: usize,
}
