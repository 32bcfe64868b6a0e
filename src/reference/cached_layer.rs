//! The f64 reference of the cached layer ([`crate::CachedAttention`]): its projections in f64
//! loops, and the attention by [`super::operator`] (the one attention reference); and its
//! error bound, the layer's ([`super::error_bound`]) for the MHA layer it equals.

use crate::cached::CachedLayerConfig;
use crate::config::AttentionConfig;
use crate::error::{Error, Result};
use crate::operator::{OperatorConfig, OperatorInputs};
use crate::tensor::Tensor;
use crate::weights::{AttentionInputs, AttentionWeights};

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
/// With [`crate::Precision::F16`] storage, `x` and the weights are first rounded to f16, as the
/// GPU stores them (a value past f16's range is [`Error::OutsideF16Range`]); everything after
/// is as for f32, the f16 stores of Q, K, V, the heads and the output being left to
/// [`cached_layer_error_bound`].
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
    let (weights, x) = (
        &weights.rounded_to(c.precision)?,
        &Tensor::new(
            x.shape().to_vec(),
            c.precision.round("x", x.shape(), x.data())?,
        )?,
    );
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

/// The error bound of [`cached_layer`]'s output (in its shape), per element: how far a correct
/// computation in f32 arithmetic with the configuration's storage can be from it, whatever
/// steps the sequence was fed in.
///
/// It is the layer's bound ([`super::error_bound`], derived from the storage format's unit
/// roundoff and each reduction's length) for the MHA layer that computes the same values: each
/// query head given its own copy of its key/value head's columns of `w_k`, `w_v`, `b_k` and
/// `b_v`. That layer sums the same products in the same reductions and stores the same
/// tensors (Q, K, V, the heads, the output: one f16 store error each with f16 storage); split-K
/// decode's partials stay f32 and their merge is covered as the softmax's rescales are.
///
/// ```
/// use wgpu_attention::{
///     compare_bounded, reference, AttentionWeights, CachedLayerConfig, Precision, Tensor,
/// };
/// // Two query heads over one key/value head of width 1.
/// let config = CachedLayerConfig::new(1, 1, 2, 1, 1, 8, 8).with_scale(1.0);
/// let w = |v: Vec<f32>| Tensor::new([1, v.len()], v).unwrap();
/// let weights = AttentionWeights::new(w(vec![1.0, -1.0]), w(vec![1.0]), w(vec![2.0]));
/// let x = Tensor::new([1, 3, 1], vec![0.5, 1.0, -2.0]).unwrap();
/// let exact = reference::cached_layer(&config, &weights, &x).unwrap();
/// let bound = reference::cached_layer_error_bound(&config, &weights, &x).unwrap();
/// assert_eq!(bound.shape(), exact.shape());
/// assert!(compare_bounded(&exact, &exact, &bound).unwrap().passed());
/// assert!(bound.data().iter().all(|&b| b > 0.0 && b < 1e-4), "{:?}", bound.data());
/// // f16 storage: each stored value may be one f16 ulp off, far more than f32's roundings.
/// let f16 = config.with_precision(Precision::F16);
/// let f16_bound = reference::cached_layer_error_bound(&f16, &weights, &x).unwrap();
/// for (h, s) in f16_bound.data().iter().zip(bound.data()) {
///     assert!(*h > 10.0 * s, "f16 {h} vs f32 {s}");
/// }
/// ```
pub fn cached_layer_error_bound(
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
    let group = c.heads / c.kv_heads;
    let widen = |t: &Tensor, width: usize| per_query_head(t, c.kv_heads, group, width);
    let widen_opt =
        |t: &Option<Tensor>, width: usize| t.as_ref().map(|t| widen(t, width)).transpose();
    let mha = AttentionWeights {
        w_k: widen(&weights.w_k, c.head_dim)?,
        w_v: widen(&weights.w_v, c.head_dim_v)?,
        b_k: widen_opt(&weights.b_k, c.head_dim)?,
        b_v: widen_opt(&weights.b_v, c.head_dim_v)?,
        ..weights.clone()
    };
    let mut layer = AttentionConfig::new(c.batch, seq, c.d_model, c.heads, c.head_dim)
        .with_head_dim_v(c.head_dim_v)
        .with_scale(c.scale_value())
        .with_precision(c.precision);
    if c.causal {
        layer = layer.causal();
    }
    if let Some(d_out) = c.d_out {
        layer = layer.with_output_projection(d_out);
    }
    let bound = super::error_bound(&layer, &mha, &AttentionInputs::new(x.clone()))?;
    if c.d_out.is_some() {
        return Ok(bound);
    }
    // The layer concatenates the heads per token; the cached layer writes them head-major.
    let (h, dv) = (c.heads, c.head_dim_v);
    let mut out = vec![0f32; bound.len()];
    for (at, &e) in bound.data().iter().enumerate() {
        let (col, t, b) = (at % (h * dv), at / (h * dv) % seq, at / (h * dv * seq));
        out[((b * h + col / dv) * seq + t) * dv + col % dv] = e;
    }
    Tensor::new(c.output_shape(seq), out)
}

/// `t` (`[.., kv_heads * width]`, heads side by side) with each head's `width` columns
/// repeated for each of the `group` query heads that read it: `[.., kv_heads * group * width]`.
fn per_query_head(t: &Tensor, kv_heads: usize, group: usize, width: usize) -> Result<Tensor> {
    let cols = kv_heads * width;
    let mut out = Vec::with_capacity(t.len() * group);
    for row in t.data().chunks(cols) {
        for h in 0..kv_heads * group {
            out.extend_from_slice(&row[h / group * width..][..width]);
        }
    }
    let mut shape = t.shape().to_vec();
    *shape.last_mut().expect("a weight has columns") *= group;
    Tensor::new(shape, out)
}
