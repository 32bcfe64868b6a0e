//! The f64 reference of the cached layer ([`crate::CachedAttention`]): its projections in f64
//! loops, and the attention by [`super::operator`] (the one attention reference).

use crate::cached::CachedLayerConfig;
use crate::error::{Error, Result};
use crate::operator::{OperatorConfig, OperatorInputs};
use crate::tensor::Tensor;
use crate::weights::AttentionWeights;

/// The cached layer over a whole sequence at once: `x` `[batch, seq, d_model]` projected to
/// Q, K and V (f64 sums, stored as f32 as the GPU stores them), attended by [`super::operator`]
/// with `kv_heads` key/value heads (causal if the layer is), and projected out (f64 sums of
/// the f32 heads). The output is in [`CachedLayerConfig::output_shape`] for `seq` tokens.
///
/// For a causal layer, each step's output equals the rows of this forward at the step's
/// positions, however the sequence was cut into steps: row `t` sees tokens `0..=t` either
/// way. (For a non-causal layer, a step of `n` tokens equals the last `n` rows of this forward
/// over the sequence up to the step's end.) The cache's capacity and step size are not used.
///
/// ```
/// use wgpu_attention::{reference, AttentionWeights, CachedLayerConfig, Tensor};
/// // One head of width 1, weights 1: Q = K = V = x.
/// let config = CachedLayerConfig::new(1, 1, 1, 1, 1, 8, 8).with_scale(1.0);
/// let one = || Tensor::new([1, 1], vec![1.0]).unwrap();
/// let weights = AttentionWeights::new(one(), one(), one());
/// let x = Tensor::new([1, 2, 1], vec![0.0, 1.0]).unwrap();
/// let out = reference::cached_layer(&config, &weights, &x).unwrap();
/// // Token 0 sees only itself; token 1 weighs values [0, 1] by softmax([0, 1]).
/// let e = std::f32::consts::E;
/// assert_eq!(out.shape(), &[1, 1, 2, 1]);
/// assert!(out.data()[0].abs() < 1e-7 && (out.data()[1] - e / (1.0 + e)).abs() < 1e-6);
/// ```
pub fn cached_layer(
    config: &CachedLayerConfig,
    weights: &AttentionWeights,
    x: &Tensor,
) -> Result<Tensor> {
    config.check_weights(weights)?;
    let c = config;
    let seq = match x.shape() {
        [b, n, d] if *b == c.batch && *d == c.d_model && *n > 0 => *n,
        s => {
            let n = s.get(1).copied().unwrap_or(0).max(1);
            return Err(Error::shape("x", &[c.batch, n, c.d_model], s));
        }
    };
    x.check_finite("x")?;
    // `x @ w + b`, head-major `[batch, hs, seq, width]`.
    let project = |w: &Tensor, b: &Option<Tensor>, hs: usize, width: usize| -> Result<Tensor> {
        let cols = hs * width;
        let mut out = vec![0f32; c.batch * cols * seq];
        for bi in 0..c.batch {
            for t in 0..seq {
                let row = &x.data()[(bi * seq + t) * c.d_model..][..c.d_model];
                for col in 0..cols {
                    let acc: f64 = row
                        .iter()
                        .enumerate()
                        .map(|(k, &a)| a as f64 * w.data()[k * cols + col] as f64)
                        .sum::<f64>()
                        + b.as_ref().map_or(0.0, |b| b.data()[col] as f64);
                    let (h, d) = (col / width, col % width);
                    out[((bi * hs + h) * seq + t) * width + d] = acc as f32;
                }
            }
        }
        Tensor::new([c.batch, hs, seq, width], out)
    };
    let w = weights;
    let inputs = OperatorInputs::new(
        project(&w.w_q, &w.b_q, c.heads, c.head_dim)?,
        project(&w.w_k, &w.b_k, c.kv_heads, c.head_dim)?,
        project(&w.w_v, &w.b_v, c.kv_heads, c.head_dim_v)?,
    );
    let mut op = OperatorConfig::new(c.batch, c.heads, c.kv_heads, c.head_dim, seq, seq)
        .with_head_dim_v(c.head_dim_v)
        .with_scale(c.scale_value());
    if c.causal {
        op = op.causal();
    }
    let heads = super::operator(&op, &inputs)?;
    let (Some(w_o), Some(d_out)) = (&w.w_o, c.d_out) else {
        return Ok(heads);
    };
    // The heads concatenated per token, times w_o, plus b_o.
    let (h, dv) = (c.heads, c.head_dim_v);
    let mut out = Vec::with_capacity(c.batch * seq * d_out);
    for bi in 0..c.batch {
        for t in 0..seq {
            for col in 0..d_out {
                let mut acc = w.b_o.as_ref().map_or(0.0, |b| b.data()[col] as f64);
                for head in 0..h {
                    let at = ((bi * h + head) * seq + t) * dv;
                    for (d, &a) in heads.data()[at..at + dv].iter().enumerate() {
                        acc += a as f64 * w_o.data()[(head * dv + d) * d_out + col] as f64;
                    }
                }
                out.push(acc as f32);
            }
        }
    }
    Tensor::new([c.batch, seq, d_out], out)
}
