//! Host tensors for an operator call, and the checks that turn a bad one into a named error
//! before anything reaches the GPU.

use super::config::{Lengths, OperatorConfig, QkvLayout};
use crate::error::{Error, Result, Shape};
use crate::tensor::{Tensor, unravel};

/// Host tensors for [`AttentionOp::run`](super::AttentionOp::run) and [`crate::reference::operator`], in the
/// configuration's layout; the lengths are read from their shapes.
#[derive(Debug, Clone, PartialEq)]
pub struct OperatorInputs {
    /// Queries.
    pub q: Tensor,
    /// Keys.
    pub k: Tensor,
    /// Values.
    pub v: Tensor,
    /// Key-padding mask `[batch, kv_len]`, nonzero = attend.
    pub key_mask: Option<Tensor>,
    /// Additive bias `[batch or 1, heads or 1, q_len, kv_len]`; `-inf` masks a key.
    pub bias: Option<Tensor>,
}

impl OperatorInputs {
    /// Q, K and V, with no mask or bias.
    pub fn new(q: Tensor, k: Tensor, v: Tensor) -> Self {
        OperatorInputs {
            q,
            k,
            v,
            key_mask: None,
            bias: None,
        }
    }

    /// With a key-padding mask.
    pub fn with_key_mask(mut self, mask: Tensor) -> Self {
        self.key_mask = Some(mask);
        self
    }

    /// With an additive bias.
    pub fn with_bias(mut self, bias: Tensor) -> Self {
        self.bias = Some(bias);
        self
    }

    /// The call's lengths, after checking every tensor against `config`, naming the first
    /// that does not fit.
    pub fn validate(&self, config: &OperatorConfig) -> Result<Lengths> {
        let rank = match config.layout {
            QkvLayout::HeadMajor => 4,
            QkvLayout::TokenMajor => 3,
        };
        // The sequence axis and, head-major, the head axis.
        let (len_axis, width) = (rank - 2, rank - 1);
        for (name, t) in [("q", &self.q), ("k", &self.k), ("v", &self.v)] {
            if t.shape().len() != rank {
                return Err(Error::WrongRank {
                    name: name.into(),
                    shape: Shape(t.shape().to_vec()),
                    rank,
                    layout: format!("{:?}", config.layout),
                });
            }
        }
        let q_len = self.q.shape()[len_axis];
        let kv_len = self.k.shape()[len_axis];
        // Head dims first: a mismatch there is the likelier mistake than a head count.
        let per_head = |t: &Tensor, heads: usize| match config.layout {
            QkvLayout::HeadMajor => t.shape()[width],
            QkvLayout::TokenMajor => t.shape()[width] / heads.max(1),
        };
        for (name, t, heads, dim) in [
            ("q", &self.q, config.heads, config.head_dim),
            ("k", &self.k, config.kv_heads, config.head_dim),
            ("v", &self.v, config.kv_heads, config.head_dim_v),
        ] {
            let actual = per_head(t, heads);
            if actual != dim {
                return Err(Error::HeadDimMismatch {
                    name: name.into(),
                    expected: dim,
                    actual,
                });
            }
        }
        config.check_lengths(Lengths { q_len, kv_len })?;
        for (name, t, expected) in [
            (
                "q",
                &self.q,
                config.shape(config.heads, q_len, config.head_dim),
            ),
            (
                "k",
                &self.k,
                config.shape(config.kv_heads, kv_len, config.head_dim),
            ),
            (
                "v",
                &self.v,
                config.shape(config.kv_heads, kv_len, config.head_dim_v),
            ),
        ] {
            if t.shape() != expected.as_slice() {
                return Err(Error::shape(name, &expected, t.shape()));
            }
            t.check_finite(name)?;
        }
        match (&self.key_mask, config.key_padding_mask) {
            (Some(m), true) => {
                let expected = [config.batch, kv_len];
                if m.shape() != expected {
                    return Err(Error::shape("key_mask", &expected, m.shape()));
                }
                m.check_finite("key_mask")?;
            }
            (None, true) => {
                return Err(Error::MissingTensor {
                    name: "key_mask".into(),
                    expected: Shape(vec![config.batch, kv_len]),
                    why: "the operator was built with a key-padding mask".into(),
                });
            }
            (Some(_), false) => {
                return Err(Error::UnexpectedTensor {
                    name: "key_mask".into(),
                    why: "the operator was built without a key-padding mask".into(),
                });
            }
            (None, false) => {}
        }
        match (&self.bias, config.bias) {
            (Some(t), Some(s)) => {
                let [bb, hb] = s.dims(config.batch, config.heads);
                let expected = [bb, hb, q_len, kv_len];
                if t.shape() != expected {
                    return Err(Error::shape("attn_bias", &expected, t.shape()));
                }
                // -inf masks a key; NaN and +inf have no meaning.
                if let Some(at) = t
                    .data()
                    .iter()
                    .position(|&x| x.is_nan() || x == f32::INFINITY)
                {
                    return Err(Error::NonFinite {
                        name: "attn_bias".into(),
                        index: Shape(unravel(t.shape(), at)),
                        value: t.data()[at],
                    });
                }
            }
            (None, Some(s)) => {
                let [bb, hb] = s.dims(config.batch, config.heads);
                return Err(Error::MissingTensor {
                    name: "attn_bias".into(),
                    expected: Shape(vec![bb, hb, q_len, kv_len]),
                    why: "the operator was built with an additive bias".into(),
                });
            }
            (Some(_), None) => {
                return Err(Error::UnexpectedTensor {
                    name: "attn_bias".into(),
                    why: "the operator was built without a bias".into(),
                });
            }
            (None, None) => {}
        }
        Ok(Lengths { q_len, kv_len })
    }
}
