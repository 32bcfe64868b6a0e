//! What a cached layer computes: its shape, its cache's capacity and step size, and the checks
//! of the weights and inputs against it.

use crate::error::{Error, Result, Shape};
use crate::precision::Precision;
use crate::tensor::Tensor;
use crate::weights::AttentionWeights;

/// The shape of a [`super::CachedAttention`]: a self-attention layer over a KV cache, fed a few
/// new tokens a step.
///
/// Weights are an [`AttentionWeights`] in the `x @ W` layout, the key and value projections
/// as narrow as the key/value heads (grouped-query attention):
/// - `w_q` `[d_model, heads * head_dim]`, `b_q` `[heads * head_dim]`;
/// - `w_k` `[d_model, kv_heads * head_dim]`, `b_k` `[kv_heads * head_dim]`;
/// - `w_v` `[d_model, kv_heads * head_dim_v]`, `b_v` `[kv_heads * head_dim_v]`;
/// - with an output projection ([`CachedLayerConfig::with_output_projection`]), `w_o`
///   `[heads * head_dim_v, d_out]` and `b_o` `[d_out]`.
///
/// ```
/// use wgpu_attention::CachedLayerConfig;
/// // Llama-style: 32 query heads over 8 key/value heads of 128, 4096 tokens of context,
/// // prompts fed in chunks of up to 512 tokens.
/// let config = CachedLayerConfig::new(1, 4096, 32, 8, 128, 4096, 512).with_output_projection(4096);
/// assert!(config.validate().is_ok() && config.causal);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct CachedLayerConfig {
    /// Batch rows (sequences), each with its own rows of the cache.
    pub batch: usize,
    /// Width of the input tokens.
    pub d_model: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads; must divide `heads` (equal: MHA, 1: MQA).
    pub kv_heads: usize,
    /// Width of a query and key head.
    pub head_dim: usize,
    /// Width of a value head.
    pub head_dim_v: usize,
    /// Tokens the cache holds per batch row.
    pub capacity: usize,
    /// The most new tokens one step takes (a prompt longer than this is fed in chunks).
    pub max_step: usize,
    /// Each new token attends only the tokens before it and itself (on by default: a decoder).
    pub causal: bool,
    /// The scale of `Q Kᵀ`; `None` means `1 / sqrt(head_dim)`.
    pub scale: Option<f32>,
    /// Width of the output projection's output, when the layer has one.
    pub d_out: Option<usize>,
    /// How x, the weights, Q, the cache and the output are stored (arithmetic is f32 with
    /// either); [`Precision::F32`] by default.
    pub precision: Precision,
}

impl CachedLayerConfig {
    /// A causal layer of `heads` query heads over `kv_heads` key/value heads, all `head_dim`
    /// wide, on tokens `d_model` wide; a cache of `capacity` tokens per row, steps of up to
    /// `max_step` tokens; no output projection, default scale.
    pub fn new(
        batch: usize,
        d_model: usize,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        capacity: usize,
        max_step: usize,
    ) -> Self {
        CachedLayerConfig {
            batch,
            d_model,
            heads,
            kv_heads,
            head_dim,
            head_dim_v: head_dim,
            capacity,
            max_step,
            causal: true,
            scale: None,
            d_out: None,
            precision: Precision::F32,
        }
    }

    /// Value heads `head_dim_v` wide.
    pub fn with_head_dim_v(mut self, head_dim_v: usize) -> Self {
        self.head_dim_v = head_dim_v;
        self
    }

    /// Causal masking on (the default) or off (each step's tokens then also see the step's
    /// later tokens).
    pub fn with_causal(mut self, causal: bool) -> Self {
        self.causal = causal;
        self
    }

    /// Scores scaled by `scale` instead of `1 / sqrt(head_dim)`.
    pub fn with_scale(mut self, scale: f32) -> Self {
        self.scale = Some(scale);
        self
    }

    /// An output projection to `d_out` columns after the attention.
    pub fn with_output_projection(mut self, d_out: usize) -> Self {
        self.d_out = Some(d_out);
        self
    }

    /// Stores x, the weights, Q, the KV cache and the output in `precision`.
    /// [`Precision::F16`] halves the bytes a decoding step reads from the cache; it needs the
    /// device's shader-f16 ([`Error::NoShaderF16`]) and even head widths (the f16 cache's
    /// rule), and every weight and input value must fit f16 ([`Error::OutsideF16Range`]).
    ///
    /// ```
    /// use wgpu_attention::{CachedLayerConfig, Precision};
    /// let config = CachedLayerConfig::new(1, 4096, 32, 8, 128, 4096, 512)
    ///     .with_precision(Precision::F16);
    /// assert_eq!(config.precision.bytes(), 2);
    /// ```
    pub fn with_precision(mut self, precision: Precision) -> Self {
        self.precision = precision;
        self
    }

    /// The scale in use.
    pub fn scale_value(&self) -> f32 {
        self.scale
            .unwrap_or_else(|| 1.0 / (self.head_dim as f32).sqrt())
    }

    /// The shape of a step's output for `n` new tokens: `[batch, n, d_out]` with an output
    /// projection, else the attention's heads as the operator writes them, head-major
    /// `[batch, heads, n, head_dim_v]`.
    pub fn output_shape(&self, n: usize) -> Vec<usize> {
        match self.d_out {
            Some(d_out) => vec![self.batch, n, d_out],
            None => vec![self.batch, self.heads, n, self.head_dim_v],
        }
    }

    /// Checks the configuration, naming what is wrong.
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("batch", self.batch),
            ("d_model", self.d_model),
            ("heads", self.heads),
            ("kv_heads", self.kv_heads),
            ("head_dim", self.head_dim),
            ("head_dim_v", self.head_dim_v),
            ("capacity", self.capacity),
            ("max_step", self.max_step),
            ("d_out", self.d_out.unwrap_or(1)),
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
        if self.max_step > self.capacity {
            return Err(Error::InvalidConfig(format!(
                "max_step {} is past the cache's capacity of {} tokens",
                self.max_step, self.capacity
            )));
        }
        if !self.scale_value().is_finite() {
            return Err(Error::InvalidConfig(format!(
                "scale {} is not finite",
                self.scale_value()
            )));
        }
        Ok(())
    }

    /// Checks every weight's shape, that the output projection is there exactly when the
    /// configuration has one, and that every value is finite.
    pub fn check_weights(&self, weights: &AttentionWeights) -> Result<()> {
        self.validate()?;
        let (q, k, v) = (
            self.heads * self.head_dim,
            self.kv_heads * self.head_dim,
            self.kv_heads * self.head_dim_v,
        );
        let shapes = [
            ("w_q", Some(&weights.w_q), vec![self.d_model, q]),
            ("w_k", Some(&weights.w_k), vec![self.d_model, k]),
            ("w_v", Some(&weights.w_v), vec![self.d_model, v]),
            ("b_q", weights.b_q.as_ref(), vec![q]),
            ("b_k", weights.b_k.as_ref(), vec![k]),
            ("b_v", weights.b_v.as_ref(), vec![v]),
        ];
        for (name, t, expected) in shapes {
            if let Some(t) = t
                && t.shape() != expected
            {
                return Err(Error::shape(name, &expected, t.shape()));
            }
        }
        let heads_width = self.heads * self.head_dim_v;
        match (self.d_out, &weights.w_o) {
            (Some(d_out), Some(w_o)) => {
                if w_o.shape() != [heads_width, d_out] {
                    return Err(Error::shape("w_o", &[heads_width, d_out], w_o.shape()));
                }
                if let Some(b_o) = &weights.b_o
                    && b_o.shape() != [d_out]
                {
                    return Err(Error::shape("b_o", &[d_out], b_o.shape()));
                }
            }
            (Some(d_out), None) => {
                return Err(Error::MissingTensor {
                    name: "w_o".into(),
                    expected: Shape(vec![heads_width, d_out]),
                    why: "the configuration has an output projection".into(),
                });
            }
            (None, Some(_)) => {
                return Err(Error::UnexpectedTensor {
                    name: "w_o".into(),
                    why: "the configuration has no output projection \
                          (CachedLayerConfig::with_output_projection)"
                        .into(),
                });
            }
            (None, None) => {}
        }
        if weights.w_o.is_none() && weights.b_o.is_some() {
            return Err(Error::UnexpectedTensor {
                name: "b_o".into(),
                why: "there is no output projection `w_o` for it to bias".into(),
            });
        }
        for (name, t) in weights.named() {
            t.check_finite(name)?;
        }
        Ok(())
    }

    /// Checks a step's input `x` `[batch, n, d_model]`, `1 <= n <= max_step`, finite (and,
    /// for f16 storage, within f16's range: [`Error::OutsideF16Range`] naming the index);
    /// returns `n`.
    pub fn check_input(&self, x: &Tensor) -> Result<usize> {
        let n = match x.shape() {
            [b, n, d] if *b == self.batch && *d == self.d_model => *n,
            s => {
                let n = s.get(1).copied().unwrap_or(0);
                return Err(Error::shape("x", &[self.batch, n, self.d_model], s));
            }
        };
        self.check_step(n)?;
        match self.precision {
            Precision::F32 => x.check_finite("x")?,
            Precision::F16 => crate::precision::check_f16_range("x", x.shape(), x.data())?,
        }
        Ok(n)
    }

    /// Checks a step's token count: `1 <= n <= max_step`.
    pub fn check_step(&self, n: usize) -> Result<()> {
        if n == 0 {
            return Err(Error::ZeroSize { name: "n_new" });
        }
        if n > self.max_step {
            return Err(Error::LengthPastMaximum {
                name: "n_new",
                len: n,
                max: self.max_step,
            });
        }
        Ok(())
    }
}
