//! The tensors of an attention layer (weights, biases) and of one call (input, key mask), and
//! the checks that they fit an [`AttentionConfig`].

use crate::config::AttentionConfig;
use crate::error::{Error, Result, Shape};
use crate::precision::Precision;
use crate::tensor::Tensor;

/// The learned tensors of one layer, in the `x @ W` layout.
///
/// Biases are optional one by one; a missing bias is zero.
///
/// ```
/// use wgpu_attention::{AttentionWeights, Tensor};
/// let w = |rows: usize, cols: usize| Tensor::zeros([rows, cols]);
/// let weights = AttentionWeights::new(w(4, 3), w(4, 3), w(4, 3));
/// assert!(weights.b_q.is_none() && weights.w_o.is_none());
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct AttentionWeights {
    /// Query projection `[d_model, heads * head_dim]`.
    pub w_q: Tensor,
    /// Key projection `[d_model, heads * head_dim]`.
    pub w_k: Tensor,
    /// Value projection `[d_model, heads * head_dim_v]`.
    pub w_v: Tensor,
    /// Query bias `[heads * head_dim]`.
    pub b_q: Option<Tensor>,
    /// Key bias `[heads * head_dim]`.
    pub b_k: Option<Tensor>,
    /// Value bias `[heads * head_dim_v]`.
    pub b_v: Option<Tensor>,
    /// Output projection `[heads * head_dim_v, d_out]`.
    pub w_o: Option<Tensor>,
    /// Output bias `[d_out]`.
    pub b_o: Option<Tensor>,
}

impl AttentionWeights {
    /// Weights without biases or output projection.
    pub fn new(w_q: Tensor, w_k: Tensor, w_v: Tensor) -> Self {
        AttentionWeights {
            w_q,
            w_k,
            w_v,
            b_q: None,
            b_k: None,
            b_v: None,
            w_o: None,
            b_o: None,
        }
    }

    /// Adds the three projection biases.
    pub fn with_qkv_bias(mut self, b_q: Tensor, b_k: Tensor, b_v: Tensor) -> Self {
        self.b_q = Some(b_q);
        self.b_k = Some(b_k);
        self.b_v = Some(b_v);
        self
    }

    /// Adds the output projection and its optional bias.
    pub fn with_output_projection(mut self, w_o: Tensor, b_o: Option<Tensor>) -> Self {
        self.w_o = Some(w_o);
        self.b_o = b_o;
        self
    }

    /// Checks every shape against `config`, that the output projection is present exactly when
    /// the configuration has one, and that every value is finite.
    pub fn validate(&self, config: &AttentionConfig) -> Result<()> {
        config.validate()?;
        let qk = config.heads * config.head_dim;
        let v = config.heads * config.head_dim_v;
        let d = config.d_model;
        expect_shape("w_q", &self.w_q, &[d, qk])?;
        expect_shape("w_k", &self.w_k, &[d, qk])?;
        expect_shape("w_v", &self.w_v, &[d, v])?;
        for (name, bias, width) in [
            ("b_q", &self.b_q, qk),
            ("b_k", &self.b_k, qk),
            ("b_v", &self.b_v, v),
        ] {
            if let Some(b) = bias {
                expect_shape(name, b, &[width])?;
            }
        }
        match (config.output_projection, &self.w_o) {
            (Some(p), Some(w_o)) => {
                expect_shape("w_o", w_o, &[v, p.d_out])?;
                if let Some(b_o) = &self.b_o {
                    expect_shape("b_o", b_o, &[p.d_out])?;
                }
            }
            (Some(p), None) => {
                return Err(Error::MissingTensor {
                    name: "w_o".into(),
                    expected: Shape(vec![v, p.d_out]),
                    why: "the configuration has an output projection".into(),
                });
            }
            (None, Some(_)) => {
                return Err(Error::UnexpectedTensor {
                    name: "w_o".into(),
                    why: "the configuration has no output projection \
                          (AttentionConfig::with_output_projection)"
                        .into(),
                });
            }
            (None, None) => {}
        }
        if self.w_o.is_none() && self.b_o.is_some() {
            return Err(Error::UnexpectedTensor {
                name: "b_o".into(),
                why: "there is no output projection `w_o` for it to bias".into(),
            });
        }
        for (name, t) in self.named() {
            t.check_finite(name)?;
        }
        Ok(())
    }

    /// Every tensor as `precision` stores it on the GPU (rounded to f16 and widened back for
    /// [`Precision::F16`]; a value past f16's range is [`Error::OutsideF16Range`] naming the
    /// tensor): what a reference must be computed from to judge the GPU's arithmetic alone.
    pub fn rounded_to(&self, precision: Precision) -> Result<AttentionWeights> {
        let round = |name: &str, t: &Tensor| -> Result<Tensor> {
            Tensor::named(name, t.shape(), precision.round(name, t.shape(), t.data())?)
        };
        let opt = |name: &str, t: &Option<Tensor>| t.as_ref().map(|t| round(name, t)).transpose();
        Ok(AttentionWeights {
            w_q: round("w_q", &self.w_q)?,
            w_k: round("w_k", &self.w_k)?,
            w_v: round("w_v", &self.w_v)?,
            b_q: opt("b_q", &self.b_q)?,
            b_k: opt("b_k", &self.b_k)?,
            b_v: opt("b_v", &self.b_v)?,
            w_o: opt("w_o", &self.w_o)?,
            b_o: opt("b_o", &self.b_o)?,
        })
    }

    /// Every tensor present, with its name.
    pub fn named(&self) -> Vec<(&'static str, &Tensor)> {
        let mut out = vec![("w_q", &self.w_q), ("w_k", &self.w_k), ("w_v", &self.w_v)];
        let optional = [
            ("b_q", &self.b_q),
            ("b_k", &self.b_k),
            ("b_v", &self.b_v),
            ("w_o", &self.w_o),
            ("b_o", &self.b_o),
        ];
        out.extend(
            optional
                .into_iter()
                .filter_map(|(name, t)| t.as_ref().map(|t| (name, t))),
        );
        out
    }
}

/// The per-call tensors: the input sequence and, if the layer uses one, its key-padding mask.
#[derive(Debug, Clone, PartialEq)]
pub struct AttentionInputs {
    /// Input `[batch, seq, d_model]`.
    pub x: Tensor,
    /// Key-padding mask `[batch, seq]`: 1 for a real token, 0 for padding.
    pub key_mask: Option<Tensor>,
}

impl AttentionInputs {
    /// Inputs without a mask.
    pub fn new(x: Tensor) -> Self {
        AttentionInputs { x, key_mask: None }
    }

    /// Adds a key-padding mask.
    pub fn with_key_mask(mut self, key_mask: Tensor) -> Self {
        self.key_mask = Some(key_mask);
        self
    }

    /// Checks shapes against `config`, that the mask is present exactly when the configuration
    /// expects one and holds only 0 and 1, and that `x` is finite.
    pub fn validate(&self, config: &AttentionConfig) -> Result<()> {
        expect_shape("x", &self.x, &config.x_shape())?;
        self.x.check_finite("x")?;
        match (config.key_padding_mask, &self.key_mask) {
            (true, Some(mask)) => {
                expect_shape("key_mask", mask, &config.key_mask_shape())?;
                if let Some(i) = mask.data().iter().position(|&m| m != 0.0 && m != 1.0) {
                    return Err(Error::InvalidMask {
                        index: Shape(mask.unravel(i)),
                        value: mask.data()[i],
                    });
                }
            }
            (true, None) => {
                return Err(Error::MissingTensor {
                    name: "key_mask".into(),
                    expected: Shape(config.key_mask_shape().to_vec()),
                    why: "the configuration has a key-padding mask".into(),
                });
            }
            (false, Some(_)) => {
                return Err(Error::UnexpectedTensor {
                    name: "key_mask".into(),
                    why: "the configuration has no key-padding mask \
                          (AttentionConfig::with_key_padding_mask)"
                        .into(),
                });
            }
            (false, None) => {}
        }
        Ok(())
    }
}

fn expect_shape(name: &str, t: &Tensor, expected: &[usize]) -> Result<()> {
    if t.shape() == expected {
        Ok(())
    } else {
        Err(Error::shape(name, expected, t.shape()))
    }
}
