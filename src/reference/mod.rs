//! The CPU reference: the same layer in plain loops with f64 arithmetic, every intermediate kept.
//!
//! This is the judge of every GPU result. It is written for clarity, not speed: each step of the
//! worked example is one loop nest, in the order the example gives them. [`output_rows`]
//! computes chosen output rows the same way without storing any `[seq, seq]` matrix, to judge
//! sequences too long for [`run`].

use std::borrow::Cow;
use std::ops::ControlFlow;

use crate::config::AttentionConfig;
use crate::error::{Error, Result};
use crate::precision::{F16_STORE_ERROR, Precision};
use crate::tensor::Tensor;
use crate::weights::{AttentionInputs, AttentionWeights};

/// Every tensor the layer computes, in the layouts the GPU plan reads back.
#[derive(Debug, Clone, PartialEq)]
pub struct Intermediates {
    /// Queries `[batch, heads, seq, head_dim]` (unscaled).
    pub q: Tensor,
    /// Keys `[batch, heads, seq, head_dim]`.
    pub k: Tensor,
    /// Values `[batch, heads, seq, head_dim_v]`.
    pub v: Tensor,
    /// Scaled scores `[batch, heads, seq, seq]`; masked positions hold `-inf`.
    pub scores: Tensor,
    /// Softmax of the scores over keys `[batch, heads, seq, seq]`; masked positions hold 0, and
    /// a row whose every key is masked is all zeros.
    pub probs: Tensor,
    /// Heads concatenated, before the output projection: `[batch, seq, heads * head_dim_v]`.
    pub attention: Tensor,
    /// The layer's output `[batch, seq, d_out]` (equal to `attention` without a projection).
    pub output: Tensor,
}

/// One vector per head, per token: `[heads][seq][width]`.
type ByHead = Vec<Vec<Vec<f64>>>;

/// The layer's tensors and sizes, checked, as the loops below read them.
struct Layer<'a> {
    config: &'a AttentionConfig,
    /// The weights as the GPU stores them (rounded to f16 for f16 precision).
    weights: Cow<'a, AttentionWeights>,
    /// x as the GPU stores it.
    x: Cow<'a, [f32]>,
    mask: Option<&'a [f32]>,
    scale: f64,
    /// The largest relative error of one store of a computed value (Q, K, V, a head's output,
    /// the layer's output): 0 for f32 storage, where values are computed in f32 already;
    /// [`F16_STORE_ERROR`] for f16.
    store_u: f64,
    /// The largest absolute error of one store of a value in the storage format's subnormal
    /// range: f16's smallest subnormal, 2^-24 (f32's is within the f32 floor).
    store_floor: f64,
}

impl<'a> Layer<'a> {
    fn new(
        config: &'a AttentionConfig,
        weights: &'a AttentionWeights,
        inputs: &'a AttentionInputs,
    ) -> Result<Self> {
        weights.validate(config)?;
        inputs.validate(config)?;
        // The reference judges the kernels' arithmetic: it starts from the values the GPU
        // holds, so f16's rounding of the inputs is not counted as a kernel error.
        let (weights, x, store_u, store_floor) = match config.precision {
            Precision::F32 => (
                Cow::Borrowed(weights),
                Cow::Borrowed(inputs.x.data()),
                0.0,
                0.0,
            ),
            Precision::F16 => (
                Cow::Owned(weights.rounded_to(Precision::F16)?),
                Cow::Owned(Precision::F16.round("x", inputs.x.shape(), inputs.x.data())?),
                F16_STORE_ERROR,
                2f64.powi(-24),
            ),
        };
        Ok(Layer {
            config,
            weights,
            x,
            mask: inputs.key_mask.as_ref().map(|m| m.data()),
            scale: config.scale_value() as f64,
            store_u,
            store_floor,
        })
    }

    /// Whether query `i` of batch row `b` may attend key `j`.
    fn allowed(&self, b: usize, i: usize, j: usize) -> bool {
        let causal_ok = !self.config.causal || j <= i;
        let mask_ok = self
            .mask
            .is_none_or(|m| m[b * self.config.seq_len + j] != 0.0);
        causal_ok && mask_ok
    }

    /// Step 3 for one token: `x[b, t] @ w + bias`, all heads side by side.
    fn project(&self, w: &Tensor, bias: &Option<Tensor>, b: usize, t: usize) -> Vec<f64> {
        let (dm, cols) = (self.config.d_model, w.shape()[1]);
        let row = &self.x[(b * self.config.seq_len + t) * dm..][..dm];
        (0..cols)
            .map(|c| {
                let acc: f64 = (0..dm)
                    .map(|k| row[k] as f64 * w.data()[k * cols + c] as f64)
                    .sum();
                acc + bias.as_ref().map_or(0.0, |b| b.data()[c] as f64)
            })
            .collect()
    }

    /// Keys and values of every token of batch row `b`, by head: `[heads][seq][width]`.
    fn keys_values(&self, b: usize) -> (ByHead, ByHead) {
        let (n, h) = (self.config.seq_len, self.config.heads);
        let split = |rows: Vec<Vec<f64>>, width: usize| -> ByHead {
            (0..h)
                .map(|head| {
                    rows.iter()
                        .map(|r| r[head * width..(head + 1) * width].to_vec())
                        .collect()
                })
                .collect()
        };
        let w = &*self.weights;
        let k = (0..n).map(|t| self.project(&w.w_k, &w.b_k, b, t)).collect();
        let v = (0..n).map(|t| self.project(&w.w_v, &w.b_v, b, t)).collect();
        (
            split(k, self.config.head_dim),
            split(v, self.config.head_dim_v),
        )
    }

    /// Steps 4 to 7 for query `i` of batch row `b` and one head: its scores (masked ones
    /// `-inf`), its softmax weights and its output.
    fn attend(
        &self,
        b: usize,
        i: usize,
        q: &[f64],
        keys: &[Vec<f64>],
        values: &[Vec<f64>],
    ) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        // Step 4: score the query against every key.
        let scores: Vec<f64> = keys
            .iter()
            .enumerate()
            .map(|(j, k)| {
                if self.allowed(b, i, j) {
                    self.scale * q.iter().zip(k).map(|(a, b)| a * b).sum::<f64>()
                } else {
                    f64::NEG_INFINITY
                }
            })
            .collect();
        // Step 5: softmax, stable: subtract the row maximum. A fully masked row has no maximum
        // and gives zeros.
        let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let mut probs = vec![0.0; scores.len()];
        if max != f64::NEG_INFINITY {
            for (p, s) in probs.iter_mut().zip(&scores) {
                *p = (s - max).exp();
            }
            let sum: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|p| *p /= sum);
        }
        // Steps 6 and 7: weight every value by its probability and sum.
        let out = (0..self.config.head_dim_v)
            .map(|d| probs.iter().zip(values).map(|(p, v)| p * v[d]).sum())
            .collect();
        (scores, probs, out)
    }

    /// The output projection of one row of concatenated heads.
    fn output_row(&self, heads: &[f64]) -> Vec<f64> {
        let Some(w_o) = &self.weights.w_o else {
            return heads.to_vec();
        };
        let d_out = self.config.d_out();
        (0..d_out)
            .map(|c| {
                let acc: f64 = heads
                    .iter()
                    .enumerate()
                    .map(|(k, a)| a * w_o.data()[k * d_out + c] as f64)
                    .sum();
                acc + self
                    .weights
                    .b_o
                    .as_ref()
                    .map_or(0.0, |b| b.data()[c] as f64)
            })
            .collect()
    }
}

/// Runs the layer on the CPU in f64 and returns every intermediate, rounded to f32.
///
/// Shapes and values are checked exactly as the GPU plan checks them. Memory grows with
/// `batch · heads · seq²`; see [`output_rows`] for long sequences.
///
/// ```
/// use wgpu_attention::{reference, AttentionConfig, AttentionInputs, AttentionWeights, Tensor};
/// let config = AttentionConfig::new(1, 2, 1, 1, 1).with_scale(1.0);
/// let one = || Tensor::new([1, 1], vec![1.0]).unwrap();
/// let weights = AttentionWeights::new(one(), one(), one());
/// let x = Tensor::new([1, 2, 1], vec![0.0, 1.0]).unwrap();
/// let out = reference::run(&config, &weights, &AttentionInputs::new(x)).unwrap();
/// // Query 1 scores keys [0, 1]: softmax gives [1/(1+e), e/(1+e)], weighting values [0, 1].
/// let e = std::f32::consts::E;
/// assert!((out.output.data()[1] - e / (1.0 + e)).abs() < 1e-6);
/// ```
pub fn run(
    config: &AttentionConfig,
    weights: &AttentionWeights,
    inputs: &AttentionInputs,
) -> Result<Intermediates> {
    let layer = Layer::new(config, weights, inputs)?;
    let (bsz, n, h) = (config.batch, config.seq_len, config.heads);
    let (dk, dv) = (config.head_dim, config.head_dim_v);
    let mut q = Vec::with_capacity(bsz * h * n * dk);
    let mut k = Vec::with_capacity(bsz * h * n * dk);
    let mut v = Vec::with_capacity(bsz * h * n * dv);
    let mut scores = Vec::with_capacity(bsz * h * n * n);
    let mut probs = Vec::with_capacity(bsz * h * n * n);
    let mut attention = vec![0.0f64; bsz * n * h * dv];
    let mut output = Vec::with_capacity(bsz * n * config.d_out());
    for b in 0..bsz {
        let queries: Vec<Vec<f64>> = (0..n)
            .map(|t| layer.project(&layer.weights.w_q, &layer.weights.b_q, b, t))
            .collect();
        let (keys, values) = layer.keys_values(b);
        for head in 0..h {
            q.extend(queries.iter().flat_map(|r| &r[head * dk..(head + 1) * dk]));
            k.extend(keys[head].iter().flatten());
            v.extend(values[head].iter().flatten());
            for (i, query) in queries.iter().enumerate() {
                let qh = &query[head * dk..(head + 1) * dk];
                let (s, p, o) = layer.attend(b, i, qh, &keys[head], &values[head]);
                scores.extend(s);
                probs.extend(p);
                attention[(b * n + i) * h * dv + head * dv..][..dv].copy_from_slice(&o);
            }
        }
        for i in 0..n {
            output.extend(layer.output_row(&attention[(b * n + i) * h * dv..][..h * dv]));
        }
    }
    let to_tensor = |shape: Vec<usize>, data: Vec<f64>| {
        Tensor::new(shape, data.into_iter().map(|v| v as f32).collect())
    };
    Ok(Intermediates {
        q: to_tensor(vec![bsz, h, n, dk], q)?,
        k: to_tensor(vec![bsz, h, n, dk], k)?,
        v: to_tensor(vec![bsz, h, n, dv], v)?,
        scores: to_tensor(vec![bsz, h, n, n], scores)?,
        probs: to_tensor(vec![bsz, h, n, n], probs)?,
        attention: to_tensor(vec![bsz, n, h * dv], attention)?,
        output: to_tensor(config.output_shape().to_vec(), output)?,
    })
}

/// Hands the layer's output rows for the tokens `rows` (each `(batch, position)`) to `each`, one
/// at a time as [`output_rows`] computes them, without keeping any: memory stays at one batch
/// row's keys and values however many rows are asked for, and the caller can count progress or
/// stop early by returning [`ControlFlow::Break`], whose value is returned.
///
/// Rows are computed in the order given; keys and values are recomputed whenever the batch row
/// changes, so rows grouped by batch row cost the least.
///
/// ```
/// use std::ops::ControlFlow;
/// use wgpu_attention::{reference, AttentionConfig, AttentionInputs, AttentionWeights, Tensor};
/// let config = AttentionConfig::new(1, 2, 1, 1, 1).with_scale(1.0);
/// let one = || Tensor::new([1, 1], vec![1.0]).unwrap();
/// let weights = AttentionWeights::new(one(), one(), one());
/// let inputs = AttentionInputs::new(Tensor::new([1, 2, 1], vec![0.0, 1.0]).unwrap());
/// let full = reference::run(&config, &weights, &inputs).unwrap();
/// let mut seen = Vec::new();
/// let flow = reference::for_each_output_row(&config, &weights, &inputs, &[(0, 0), (0, 1)], |_, row| {
///     seen.extend_from_slice(row);
///     ControlFlow::<()>::Continue(())
/// });
/// assert_eq!(flow.unwrap(), ControlFlow::Continue(()));
/// assert_eq!(seen, full.output.data());
/// ```
pub fn for_each_output_row<B>(
    config: &AttentionConfig,
    weights: &AttentionWeights,
    inputs: &AttentionInputs,
    rows: &[(usize, usize)],
    mut each: impl FnMut((usize, usize), &[f32]) -> ControlFlow<B>,
) -> Result<ControlFlow<B>> {
    let layer = Layer::new(config, weights, inputs)?;
    check_rows(config, rows)?;
    let (h, dk) = (config.heads, config.head_dim);
    let mut current: Option<(usize, ByHead, ByHead)> = None;
    for &(b, i) in rows {
        if current.as_ref().is_none_or(|(cb, _, _)| *cb != b) {
            // Dropped before the next batch row's are made, so only one set is ever held.
            drop(current.take());
            let (keys, values) = layer.keys_values(b);
            current = Some((b, keys, values));
        }
        let (_, keys, values) = current.as_ref().expect("set just above");
        let query = layer.project(&layer.weights.w_q, &layer.weights.b_q, b, i);
        let heads: Vec<f64> = (0..h)
            .flat_map(|head| {
                let qh = &query[head * dk..(head + 1) * dk];
                layer.attend(b, i, qh, &keys[head], &values[head]).2
            })
            .collect();
        let row: Vec<f32> = layer
            .output_row(&heads)
            .into_iter()
            .map(|v| v as f32)
            .collect();
        if let ControlFlow::Break(value) = each((b, i), &row) {
            return Ok(ControlFlow::Break(value));
        }
    }
    Ok(ControlFlow::Continue(()))
}

/// The layer's output rows for the tokens `rows` (each `(batch, position)`), in f64 like
/// [`run`] but without storing any `[seq, seq]` matrix: memory grows with `seq`, time with
/// `seq · d_model · width` per batch row touched plus `seq · head_dim` per row asked for.
///
/// ```
/// use wgpu_attention::{reference, AttentionConfig, AttentionInputs, AttentionWeights, Tensor};
/// let config = AttentionConfig::new(1, 2, 1, 1, 1).with_scale(1.0);
/// let one = || Tensor::new([1, 1], vec![1.0]).unwrap();
/// let weights = AttentionWeights::new(one(), one(), one());
/// let inputs = AttentionInputs::new(Tensor::new([1, 2, 1], vec![0.0, 1.0]).unwrap());
/// let full = reference::run(&config, &weights, &inputs).unwrap();
/// let rows = reference::output_rows(&config, &weights, &inputs, &[(0, 1)]).unwrap();
/// assert_eq!(rows[0], full.output.data()[1..2]);
/// ```
pub fn output_rows(
    config: &AttentionConfig,
    weights: &AttentionWeights,
    inputs: &AttentionInputs,
    rows: &[(usize, usize)],
) -> Result<Vec<Vec<f32>>> {
    let layer = Layer::new(config, weights, inputs)?;
    check_rows(config, rows)?;
    let (h, dk) = (config.heads, config.head_dim);
    let mut out = vec![Vec::new(); rows.len()];
    for b in 0..config.batch {
        if !rows.iter().any(|&(rb, _)| rb == b) {
            continue;
        }
        let (keys, values) = layer.keys_values(b);
        for (slot, &(_, i)) in out.iter_mut().zip(rows).filter(|(_, r)| r.0 == b) {
            let query = layer.project(&layer.weights.w_q, &layer.weights.b_q, b, i);
            let heads: Vec<f64> = (0..h)
                .flat_map(|head| {
                    let qh = &query[head * dk..(head + 1) * dk];
                    layer.attend(b, i, qh, &keys[head], &values[head]).2
                })
                .collect();
            *slot = layer
                .output_row(&heads)
                .into_iter()
                .map(|v| v as f32)
                .collect();
        }
    }
    Ok(out)
}

mod backward;
mod bound;
mod cached_layer;
mod layer_backward;
mod operator;

pub use backward::{EMPTY_ROW_LSE, OperatorGrads, operator_backward, operator_lse};
pub use bound::{error_bound, operator_error_bound, output_row_bounds};
pub use cached_layer::{cached_layer, cached_layer_error_bound};
pub use layer_backward::{LayerGrads, layer_backward};
pub use operator::{cache_step, operator, operator_probs};

/// Refuses a requested (batch row, token) outside the layer, naming it.
fn check_rows(config: &AttentionConfig, rows: &[(usize, usize)]) -> Result<()> {
    match rows
        .iter()
        .find(|&&(b, t)| b >= config.batch || t >= config.seq_len)
    {
        Some(&(b, t)) => Err(Error::InvalidConfig(format!(
            "row ({b}, {t}) is outside batch {} x seq {}",
            config.batch, config.seq_len
        ))),
        None => Ok(()),
    }
}
