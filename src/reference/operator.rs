//! The f64 reference of the attention operator.

use super::bound::{UNIT_ROUNDOFF, gamma};
use crate::error::Result;
use crate::precision::{F16_STORE_ERROR, Precision};
use crate::tensor::Tensor;

/// The attention operator ([`crate::AttentionOp`]) in f64 loops: for each batch row, query head
/// `h` (attending key/value head `h / (heads / kv_heads)`) and query `i`, the softmax over the
/// keys it may see of `scale · q·k + bias`, times V. Causal masking is aligned to the end of
/// the keys (`j <= i + kv_len - q_len`); a bias of `-inf` masks a key; a query with no key to
/// attend gets zeros. Inputs and output are in the configuration's layout.
///
/// With [`Precision::F16`] the reference starts from Q, K and V rounded to f16, as the kernel
/// reads them (the bias stays f32).
pub fn operator(
    config: &crate::operator::OperatorConfig,
    inputs: &crate::operator::OperatorInputs,
) -> Result<Tensor> {
    Ok(operator_bounded(config, inputs)?.0)
}

/// [`operator`]'s output and, per element, a bound on how far a correct computation by the
/// kernel can be from it (for [`crate::compare_bounded`]): the f32 arithmetic's rounding (the
/// dot products' `γ(head_dim + 2)` of their absolute terms, the subtraction of the maximum and
/// `exp`, carried through the softmax as in [`crate::reference::error_bound`]; the weighted
/// sum's `γ(kv_len + ...)` of its absolute terms), the rounding of the reference to f32, and,
/// with [`Precision::F16`], the output's one store in f16: one f16 ulp, `2^-10` of its
/// magnitude ([`F16_STORE_ERROR`]: WGSL may round either way), or `2^-24` absolute below f16's
/// normal range. Roundings are
/// counted as `λ·√n·u` as in the layer's bound (Higham and Mary's probabilistic bound).
pub fn operator_bounded(
    config: &crate::operator::OperatorConfig,
    inputs: &crate::operator::OperatorInputs,
) -> Result<(Tensor, Tensor)> {
    use crate::operator::QkvLayout;
    let lengths = inputs.validate(config)?;
    let (nq, nk) = (lengths.q_len, lengths.kv_len);
    let (batch, heads, kv_heads) = (config.batch, config.heads, config.kv_heads);
    let (d, dv) = (config.head_dim, config.head_dim_v);
    let group = heads / kv_heads;
    let scale = config.scale_value() as f64;
    // Element [b, h, t, c] of a tensor of `hs` heads, `len` tokens and `w` columns.
    let at = |hs: usize, len: usize, w: usize, b: usize, h: usize, t: usize, c: usize| match config
        .layout
    {
        QkvLayout::HeadMajor => ((b * hs + h) * len + t) * w + c,
        QkvLayout::TokenMajor => (b * len + t) * hs * w + h * w + c,
    };
    // With f16 storage the kernel reads Q, K and V rounded to f16: so does the reference.
    let stored = |name: &str, t: &Tensor| config.precision.round(name, t.shape(), t.data());
    let (q, k, v) = (
        &stored("q", &inputs.q)?,
        &stored("k", &inputs.k)?,
        &stored("v", &inputs.v)?,
    );
    let mut out = vec![0f32; batch * heads * nq * dv];
    let mut bound = vec![0f32; batch * heads * nq * dv];
    let precision_u = match config.precision {
        Precision::F32 => (0.0, 0.0),
        Precision::F16 => (F16_STORE_ERROR, 2f64.powi(-24)),
    };
    for b in 0..batch {
        for h in 0..heads {
            let kh = h / group;
            for i in 0..nq {
                let logits: Vec<Option<(f64, f64)>> = (0..nk)
                    .map(|j| {
                        let causal_ok = !config.causal || j + nq <= i + nk;
                        let mask_ok = inputs
                            .key_mask
                            .as_ref()
                            .is_none_or(|m| m.data()[b * nk + j] != 0.0);
                        if !(causal_ok && mask_ok) {
                            return None;
                        }
                        let (mut dot, mut terms) = (0.0, 0.0);
                        for c in 0..d {
                            let x = q[at(heads, nq, d, b, h, i, c)] as f64
                                * k[at(kv_heads, nk, d, b, kh, j, c)] as f64;
                            dot += x;
                            terms += x.abs();
                        }
                        let bias = match (&inputs.bias, config.bias) {
                            (Some(t), Some(s)) => {
                                let [bb, hb] = s.dims(batch, heads);
                                let (bi, hi) = (b.min(bb - 1), h.min(hb - 1));
                                t.data()[((bi * hb + hi) * nq + i) * nk + j] as f64
                            }
                            _ => 0.0,
                        };
                        let x = scale * dot + bias;
                        // The f32 score's error: its dot product's and the logit's roundings.
                        let error = gamma(d + 2) * scale.abs() * terms + UNIT_ROUNDOFF * x.abs();
                        (x != f64::NEG_INFINITY).then_some((x, error))
                    })
                    .collect();
                let Some(max) = logits.iter().flatten().map(|l| l.0).reduce(f64::max) else {
                    continue; // nothing to attend: zeros
                };
                let weights: Vec<f64> = logits
                    .iter()
                    .map(|x| x.map_or(0.0, |(x, _)| (x - max).exp()))
                    .collect();
                let sum: f64 = weights.iter().sum();
                // Each weight's error in the log domain: its score's, plus the subtraction of
                // the max and exp (see the layer's bound), and the max's own shared error.
                let moved: Vec<f64> = logits
                    .iter()
                    .map(|x| x.map_or(0.0, |(x, e)| e + UNIT_ROUNDOFF * (16.0 + 10.0 * (max - x))))
                    .collect();
                let largest = moved.iter().copied().fold(0.0, f64::max);
                let g_sum = gamma(nk + nk.div_ceil(8) + 4);
                let floor = (d + nk + 16) as f64 * f32::MIN_POSITIVE as f64;
                for c in 0..dv {
                    let value = |j: usize| v[at(kv_heads, nk, dv, b, kh, j, c)] as f64;
                    let acc: f64 = (0..nk).map(|j| weights[j] * value(j)).sum();
                    let o = acc / sum;
                    let (mut spread, mut terms) = (0.0, 0.0);
                    for j in (0..nk).filter(|&j| weights[j] != 0.0) {
                        let p = weights[j] / sum;
                        spread += p * (moved[j] + largest).exp_m1() * (value(j) - o).abs();
                        terms += p * value(j).abs();
                    }
                    let (u, store_floor) = precision_u;
                    let e = spread + g_sum * terms + (UNIT_ROUNDOFF + u) * o.abs() + store_floor;
                    let slot = at(heads, nq, dv, b, h, i, c);
                    out[slot] = o as f32;
                    bound[slot] = ((e + floor) as f32).next_up();
                }
            }
        }
    }
    Ok((
        Tensor::new(config.output_shape(nq), out)?,
        Tensor::new(config.output_shape(nq), bound)?,
    ))
}
