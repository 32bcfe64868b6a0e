//! What an attention layer is: its sizes, scale, masks and which kernels run it.

use crate::error::{Error, Result};
use crate::precision::Precision;

/// The widest value head (`head_dim_v`) the fused kernel takes: it keeps each row of output in
/// registers. Wider heads need the staged kernels.
pub const FUSED_MAX_HEAD_DIM_V: usize = 256;

/// Which GPU kernels compute `softmax(scale * Q K^T) V`.
///
/// With the `cli` feature it is also the program's `--kernel` value (`staged`, `fused`, `auto`),
/// so the flag and the library cannot drift apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
pub enum KernelChoice {
    /// Separate score, softmax and weighted-sum kernels. Stores the `[seq, seq]` score matrix of
    /// every head, so scores and probabilities can be read back; memory grows with `seq²`.
    #[cfg_attr(
        feature = "cli",
        value(help = "score, softmax and weighted-sum kernels; keeps the [seq, seq] scores")
    )]
    Staged,
    /// One kernel with an online softmax that never stores scores; memory grows with `seq`.
    #[cfg_attr(
        feature = "cli",
        value(help = "one kernel with an online softmax; memory grows with seq")
    )]
    Fused,
    /// The fused kernel, unless intermediates are wanted or the value head is wider than
    /// [`FUSED_MAX_HEAD_DIM_V`] (see [`AttentionConfig::resolved_kernel`]).
    #[default]
    #[cfg_attr(
        feature = "cli",
        value(help = "fused, unless intermediates are kept or a value head is wider than 256")
    )]
    Auto,
}

/// The output projection applied after the heads are concatenated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputProjection {
    /// Width of the layer's output (`w_o` is `[heads * head_dim_v, d_out]`).
    pub d_out: usize,
}

/// The shape and options of one multi-head self-attention layer.
///
/// Weights use the worked example's `x @ W` layout: `w_q`, `w_k` are `[d_model, heads *
/// head_dim]`, `w_v` is `[d_model, heads * head_dim_v]`, and `w_o` (optional) is `[heads *
/// head_dim_v, d_out]`.
///
/// ```
/// use wgpu_attention::AttentionConfig;
/// // The worked example: 3 inputs of dimension 4, one head of width 3, no scaling.
/// let config = AttentionConfig::new(1, 3, 4, 1, 3).with_scale(1.0);
/// assert_eq!(config.scale_value(), 1.0);
/// assert_eq!(config.d_out(), 3);
/// // A causal 8-head layer with an output projection back to d_model.
/// let gpt = AttentionConfig::new(2, 128, 512, 8, 64).causal().with_output_projection(512);
/// assert_eq!(gpt.scale_value(), 0.125);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct AttentionConfig {
    /// Number of independent sequences.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Width of each input token.
    pub d_model: usize,
    /// Number of attention heads.
    pub heads: usize,
    /// Width of each head's queries and keys.
    pub head_dim: usize,
    /// Width of each head's values (usually equal to `head_dim`).
    pub head_dim_v: usize,
    /// Score scale; `None` means `1 / sqrt(head_dim)` as in PyTorch's
    /// `scaled_dot_product_attention`.
    pub scale: Option<f32>,
    /// Query `i` attends only keys `j <= i`.
    pub causal: bool,
    /// Inputs carry a `[batch, seq]` key-padding mask (1 = real token, 0 = padding).
    pub key_padding_mask: bool,
    /// The output projection, if the layer has one.
    pub output_projection: Option<OutputProjection>,
    /// Which kernels to run.
    pub kernel: KernelChoice,
    /// Keep Q, K, V, scores and probabilities in separate buffers so they can be read back
    /// (the staged path only; costs one more `[seq, seq]` buffer per head).
    pub keep_intermediates: bool,
    /// How x, the weights, Q/K/V and the output are stored on the GPU (arithmetic is f32
    /// either way); see [`crate::precision`].
    pub precision: Precision,
    /// The plan can run the layer's backward ([`crate::AttentionPlan::run_with_grad`],
    /// [`crate::AttentionPlan::encode_backward`]): its forward then saves each query row's
    /// logsumexp (`4 · batch · heads · seq` bytes), and the plan holds the backward's buffers.
    /// Runs the fused kernel, in f32.
    pub gradients: bool,
}

impl AttentionConfig {
    /// A layer with `heads` heads of width `head_dim` (values too), default scale, no masks and
    /// no output projection.
    pub fn new(
        batch: usize,
        seq_len: usize,
        d_model: usize,
        heads: usize,
        head_dim: usize,
    ) -> Self {
        AttentionConfig {
            batch,
            seq_len,
            d_model,
            heads,
            head_dim,
            head_dim_v: head_dim,
            scale: None,
            causal: false,
            key_padding_mask: false,
            output_projection: None,
            kernel: KernelChoice::Auto,
            keep_intermediates: false,
            precision: Precision::F32,
            gradients: false,
        }
    }

    /// Sets the value width per head.
    pub fn with_head_dim_v(mut self, head_dim_v: usize) -> Self {
        self.head_dim_v = head_dim_v;
        self
    }

    /// Sets the score scale (1.0 for the unscaled worked example).
    pub fn with_scale(mut self, scale: f32) -> Self {
        self.scale = Some(scale);
        self
    }

    /// Makes the layer causal.
    pub fn causal(mut self) -> Self {
        self.causal = true;
        self
    }

    /// Expects a key-padding mask with every input.
    pub fn with_key_padding_mask(mut self) -> Self {
        self.key_padding_mask = true;
        self
    }

    /// Adds an output projection to width `d_out`.
    pub fn with_output_projection(mut self, d_out: usize) -> Self {
        self.output_projection = Some(OutputProjection { d_out });
        self
    }

    /// Picks the kernels.
    pub fn with_kernel(mut self, kernel: KernelChoice) -> Self {
        self.kernel = kernel;
        self
    }

    /// Stores tensors in `precision` (see [`crate::precision`]).
    pub fn with_precision(mut self, precision: Precision) -> Self {
        self.precision = precision;
        self
    }

    /// Makes the plan able to run the layer's backward (see [`AttentionConfig::gradients`]).
    pub fn with_gradients(mut self) -> Self {
        self.gradients = true;
        self
    }

    /// Keeps every intermediate readable (see [`AttentionConfig::keep_intermediates`]).
    pub fn with_intermediates(mut self) -> Self {
        self.keep_intermediates = true;
        self
    }

    /// The scale actually applied to the scores.
    pub fn scale_value(&self) -> f32 {
        self.scale
            .unwrap_or_else(|| 1.0 / (self.head_dim as f32).sqrt())
    }

    /// Width of the layer's output: `d_out` with an output projection, `heads * head_dim_v`
    /// without.
    pub fn d_out(&self) -> usize {
        match self.output_projection {
            Some(p) => p.d_out,
            None => self.heads * self.head_dim_v,
        }
    }

    /// Shape of the input `x`: `[batch, seq, d_model]`.
    pub fn x_shape(&self) -> [usize; 3] {
        [self.batch, self.seq_len, self.d_model]
    }

    /// Shape of the output: `[batch, seq, d_out]`.
    pub fn output_shape(&self) -> [usize; 3] {
        [self.batch, self.seq_len, self.d_out()]
    }

    /// Shape of the key-padding mask: `[batch, seq]`.
    pub fn key_mask_shape(&self) -> [usize; 2] {
        [self.batch, self.seq_len]
    }

    /// Multiply-adds times two of the whole layer: the projections `2·B·N·d_model·width`, the
    /// attention `2·B·H·N²·(D + Dv)` (that is `4·B·H·N²·D` when `Dv = D`), and the output
    /// projection. Causal masking is not subtracted, so causal runs report the dense rate.
    pub fn flops(&self) -> f64 {
        let (b, n, h) = (self.batch as f64, self.seq_len as f64, self.heads as f64);
        let (d, dv) = (self.head_dim as f64, self.head_dim_v as f64);
        let width = h * (2.0 * d + dv);
        let projections = 2.0 * b * n * self.d_model as f64 * width;
        let out_projection = match self.output_projection {
            Some(p) => 2.0 * b * n * h * dv * p.d_out as f64,
            None => 0.0,
        };
        projections + self.attention_flops() + out_projection
    }

    /// Flops of `softmax(Q K^T) V` alone: `2·B·H·N²·(D + Dv)`.
    pub fn attention_flops(&self) -> f64 {
        let (b, n, h) = (self.batch as f64, self.seq_len as f64, self.heads as f64);
        2.0 * b * h * n * n * (self.head_dim + self.head_dim_v) as f64
    }

    /// Bytes of the staged path's score matrix: `batch · heads · seq · seq` f32, rows padded
    /// to a multiple of 4.
    pub fn score_matrix_bytes(&self) -> u64 {
        let padded = self.seq_len.div_ceil(4) * 4;
        (self.batch * self.heads * self.seq_len) as u64 * padded as u64 * 4
    }

    /// The kernels a plan will run: [`KernelChoice::Staged`] or [`KernelChoice::Fused`] as
    /// asked; for [`KernelChoice::Auto`], the staged path when intermediates are kept (only it
    /// has scores to read back) or the value head is wider than [`FUSED_MAX_HEAD_DIM_V`], else
    /// the fused kernel. The fused kernel was measured faster at every size from the worked
    /// example's 3 tokens to 1024 (it makes fewer dispatches and passes over memory), and its
    /// memory grows with `seq` where the staged path's grows with `seq²`.
    pub fn resolved_kernel(&self) -> KernelChoice {
        match self.kernel {
            KernelChoice::Auto if self.gradients => KernelChoice::Fused,
            KernelChoice::Auto
                if self.keep_intermediates
                    || self.head_dim_v.div_ceil(4) * 4 > FUSED_MAX_HEAD_DIM_V =>
            {
                KernelChoice::Staged
            }
            KernelChoice::Auto => KernelChoice::Fused,
            chosen => chosen,
        }
    }

    /// Checks sizes and scale.
    pub fn validate(&self) -> Result<()> {
        let dims = [
            ("batch", self.batch),
            ("seq_len", self.seq_len),
            ("d_model", self.d_model),
            ("heads", self.heads),
            ("head_dim", self.head_dim),
            ("head_dim_v", self.head_dim_v),
        ];
        for (name, value) in dims {
            if value == 0 {
                return Err(Error::ZeroSize { name });
            }
        }
        if let Some(p) = self.output_projection
            && p.d_out == 0
        {
            return Err(Error::ZeroSize { name: "d_out" });
        }
        if self.kernel == KernelChoice::Fused && self.keep_intermediates {
            return Err(Error::InvalidConfig(
                "the fused kernel never stores scores or probabilities, so intermediates cannot be \
                 kept: use KernelChoice::Staged (or Auto) to read them back"
                    .into(),
            ));
        }
        if self.gradients && (self.kernel == KernelChoice::Staged || self.keep_intermediates) {
            return Err(Error::InvalidConfig(
                "gradients need the fused kernel, whose forward saves the logsumexp the backward \
                 reads: drop KernelChoice::Staged and with_intermediates()"
                    .into(),
            ));
        }
        let scale = self.scale_value();
        if !scale.is_finite() {
            return Err(Error::InvalidConfig(format!(
                "scale must be finite, got {scale}"
            )));
        }
        Ok(())
    }
}
