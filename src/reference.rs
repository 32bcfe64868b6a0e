//! The CPU reference: the same layer in plain loops with f64 arithmetic, every intermediate kept.
//!
//! This is the judge of every GPU result. It is written for clarity, not speed: each step of the
//! worked example is one loop nest, in the order the example gives them.

use crate::config::AttentionConfig;
use crate::error::Result;
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

/// Whether query `i` may attend key `j` of batch row `b`.
pub(crate) fn allowed(
    config: &AttentionConfig,
    mask: Option<&[f32]>,
    b: usize,
    i: usize,
    j: usize,
) -> bool {
    let causal_ok = !config.causal || j <= i;
    let mask_ok = mask.is_none_or(|m| m[b * config.seq_len + j] != 0.0);
    causal_ok && mask_ok
}

/// Runs the layer on the CPU in f64 and returns every intermediate, rounded to f32.
///
/// Shapes and values are checked exactly as the GPU plan checks them.
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
    weights.validate(config)?;
    inputs.validate(config)?;
    let (bsz, n, dm, h) = (config.batch, config.seq_len, config.d_model, config.heads);
    let (dk, dv) = (config.head_dim, config.head_dim_v);
    let x = inputs.x.data();
    let mask = inputs.key_mask.as_ref().map(|m| m.data());
    let scale = config.scale_value() as f64;

    // Step 3: project every input into a query, key and value, split by head.
    let project = |w: &Tensor, bias: &Option<Tensor>, width: usize| -> Vec<f64> {
        let cols = h * width;
        let mut out = vec![0.0f64; bsz * h * n * width];
        for b in 0..bsz {
            for t in 0..n {
                for c in 0..cols {
                    let mut acc = bias.as_ref().map_or(0.0, |b| b.data()[c] as f64);
                    for k in 0..dm {
                        acc += x[(b * n + t) * dm + k] as f64 * w.data()[k * cols + c] as f64;
                    }
                    let (head, d) = (c / width, c % width);
                    out[((b * h + head) * n + t) * width + d] = acc;
                }
            }
        }
        out
    };
    let q = project(&weights.w_q, &weights.b_q, dk);
    let k = project(&weights.w_k, &weights.b_k, dk);
    let v = project(&weights.w_v, &weights.b_v, dv);

    let mut scores = vec![0.0f64; bsz * h * n * n];
    let mut probs = vec![0.0f64; bsz * h * n * n];
    let mut attention = vec![0.0f64; bsz * n * h * dv];
    for b in 0..bsz {
        for head in 0..h {
            let bh = b * h + head;
            for i in 0..n {
                let row = &mut scores[(bh * n + i) * n..(bh * n + i + 1) * n];
                // Step 4: score query i against every key.
                for (j, s) in row.iter_mut().enumerate() {
                    *s = if allowed(config, mask, b, i, j) {
                        let qi = &q[(bh * n + i) * dk..(bh * n + i + 1) * dk];
                        let kj = &k[(bh * n + j) * dk..(bh * n + j + 1) * dk];
                        scale * qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f64>()
                    } else {
                        f64::NEG_INFINITY
                    };
                }
                // Step 5: softmax, stable: subtract the row maximum. A fully masked row has
                // no maximum and gives zeros.
                let prow = &mut probs[(bh * n + i) * n..(bh * n + i + 1) * n];
                let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                if max != f64::NEG_INFINITY {
                    let mut sum = 0.0;
                    for (p, &s) in prow.iter_mut().zip(row.iter()) {
                        *p = (s - max).exp();
                        sum += *p;
                    }
                    prow.iter_mut().for_each(|p| *p /= sum);
                }
                // Steps 6 and 7: weight every value and sum them.
                for d in 0..dv {
                    let acc: f64 = (0..n).map(|j| prow[j] * v[(bh * n + j) * dv + d]).sum();
                    attention[(b * n + i) * h * dv + head * dv + d] = acc;
                }
            }
        }
    }

    let output = match &weights.w_o {
        None => attention.clone(),
        Some(w_o) => {
            let (hv, d_out) = (h * dv, config.d_out());
            let mut out = vec![0.0f64; bsz * n * d_out];
            for row in 0..bsz * n {
                for c in 0..d_out {
                    let mut acc = weights.b_o.as_ref().map_or(0.0, |b| b.data()[c] as f64);
                    for kk in 0..hv {
                        acc += attention[row * hv + kk] * w_o.data()[kk * d_out + c] as f64;
                    }
                    out[row * d_out + c] = acc;
                }
            }
            out
        }
    };

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
