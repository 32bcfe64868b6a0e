//! The f32 forward error bound of the layer's output, computed beside the f64 reference: what
//! [`crate::compare_bounded`] judges a GPU result by.

use super::*;

/// f32's unit roundoff: the largest relative error of one rounding to nearest, `2^-24`.
const UNIT_ROUNDOFF: f64 = f32::EPSILON as f64 / 2.0;

/// How many "standard deviations" of rounding error the bound allows; see [`gamma`].
const LAMBDA: f64 = 6.0;

/// `λ·√n·u`: how far, relative to the sum of the absolute terms, an f32 sum of `n` products
/// can be from the exact sum. The worst case is `n·u` (Higham, *Accuracy and Stability of
/// Numerical Algorithms*, §3.1), but it is reached only when every rounding errs the same way;
/// treating roundings as independent and mean-zero, `λ·√n·u` holds with probability at least
/// `1 - 2n·exp(-λ²/2)` (Higham and Mary, *A New Approach to Probabilistic Rounding Error
/// Analysis*, SIAM J. Sci. Comput. 41(5), 2019). The worst case is useless as a check: for a
/// BERT-sized layer it allows errors of 8 on outputs of 70, so that a 1% error in the scale
/// passes.
fn gamma(n: usize) -> f64 {
    LAMBDA * (n as f64).sqrt() * UNIT_ROUNDOFF
}

/// The size of a sum of independent errors: the root of the sum of their squares.
fn rss(errors: impl Iterator<Item = f64>) -> f64 {
    errors.map(|e| e * e).sum::<f64>().sqrt()
}

/// Values and a bound on the error an f32 computation of them can carry, side by side.
struct Bounded {
    value: Vec<f64>,
    /// Errors independent from element to element.
    error: Vec<f64>,
    /// Errors every element of one head shares the cause of (the softmax weights'), which add
    /// up rather than cancel when the elements are summed.
    shared: Vec<f64>,
}

impl Layer<'_> {
    /// [`Layer::project`] with the error bound of an f32 GEMM: `γ(d_model + 1)` times the sum of
    /// the absolute products and the bias.
    fn project_bounded(&self, w: &Tensor, bias: &Option<Tensor>, b: usize, t: usize) -> Bounded {
        let (dm, cols) = (self.config.d_model, w.shape()[1]);
        let row = &self.x[(b * self.config.seq_len + t) * dm..][..dm];
        let g = gamma(dm + 1);
        let error = (0..cols)
            .map(|c| {
                let terms: f64 = (0..dm)
                    .map(|k| (row[k] as f64 * w.data()[k * cols + c] as f64).abs())
                    .sum();
                g * (terms + bias.as_ref().map_or(0.0, |b| (b.data()[c] as f64).abs()))
            })
            .collect();
        let value = self.project(w, bias, b, t);
        Bounded {
            error: self.stored(&value, error),
            value,
            shared: vec![0.0; cols],
        }
    }

    /// `error` plus one rounding of each of `value` to the storage format, where a kernel
    /// stores a value it computed (nothing for f32 storage; see [`Layer::store_u`]).
    fn stored(&self, value: &[f64], mut error: Vec<f64>) -> Vec<f64> {
        if self.store_u > 0.0 {
            for (e, v) in error.iter_mut().zip(value) {
                *e += self.store_u * v.abs() + self.store_floor;
            }
        }
        error
    }

    /// One head's slice of a bounded projection.
    fn head_of(whole: &Bounded, head: usize, width: usize) -> Bounded {
        let part = |v: &[f64]| v[head * width..(head + 1) * width].to_vec();
        Bounded {
            value: part(&whole.value),
            error: part(&whole.error),
            shared: part(&whole.shared),
        }
    }

    /// [`Layer::attend`]'s output for one head, with a bound on the error of an f32
    /// computation of it from f32 queries, keys and values within their own bounds.
    ///
    /// - Scores: the errors of q and k carried through the dot product, plus `γ(head_dim + 2)`
    ///   of its absolute terms (the `+ 2` for the scale and a folded `log2 e`).
    /// - Softmax: errors `Δs_j` in the scores move the weights by `Δp_j = p_j (Δs_j - Σ p_l Δs_l)`
    ///   to first order, so the output by `Σ p_j Δs_j (v_j - o)`: the common part cancels. The
    ///   parts of `Δs_j` from each key's own errors are independent from key to key and add as
    ///   a root sum of squares; the part from the query's errors, shared by every key, adds
    ///   linearly, as do a few roundings per weight for the subtraction of the max and `exp`
    ///   (WGSL allows `3 + 2|x|` ULP). The sum of the weights, the rescales by a new running max
    ///   (one per 8 keys at most) and the division scale the whole output: `γ` of it. Where
    ///   score errors are too large for first order (a tenth), every term adds linearly.
    /// - Weighted sum: the values' errors carried through, plus `γ` of the absolute terms over
    ///   `seq` keys and the rescales.
    fn attend_bounded(
        &self,
        b: usize,
        i: usize,
        q: &Bounded,
        keys: &[Bounded],
        values: &[Bounded],
    ) -> Bounded {
        let dv = self.config.head_dim_v;
        let n = keys.len();
        let scale = self.scale.abs();
        let g_dot = gamma(q.value.len() + 2);
        let mut scores = vec![f64::NEG_INFINITY; n];
        // Per key: the score's error from the key's own errors and the dot product's
        // rounding (independent between keys), and from the query's errors (shared).
        let mut own = vec![0.0; n];
        let mut from_query = vec![0.0; n];
        for (j, k) in keys.iter().enumerate() {
            if !self.allowed(b, i, j) {
                continue;
            }
            let mut dot = 0.0;
            let (mut by_key, mut by_query, mut terms) = (0.0, 0.0, 0.0);
            for d in 0..q.value.len() {
                let (qv, qe, kv, ke) = (q.value[d], q.error[d], k.value[d], k.error[d]);
                dot += qv * kv;
                by_key += ((qv.abs() + qe) * ke).powi(2);
                by_query += (qe * kv.abs()).powi(2);
                terms += (qv.abs() + qe) * (kv.abs() + ke);
            }
            scores[j] = self.scale * dot;
            own[j] = scale * (by_key.sqrt() + g_dot * terms);
            from_query[j] = scale * by_query.sqrt();
        }
        let o = attend_scores_bounded(&scores, &own, &from_query, values, dv);
        // The kernel stores its output row: rounded once more in f16 storage.
        Bounded {
            error: self.stored(&o.value, o.error),
            ..o
        }
    }

    /// [`Layer::output_row`] with the heads' errors carried through the output projection
    /// (a head's shared errors add up within the head) and `γ(heads · head_dim_v + 1)` of its
    /// absolute terms.
    fn output_row_bounded(&self, heads: &Bounded) -> Vec<(f64, f64)> {
        let Some(w_o) = &self.weights.w_o else {
            return (0..heads.value.len())
                .map(|e| (heads.value[e], heads.error[e] + heads.shared[e]))
                .collect();
        };
        let d_out = self.config.d_out();
        let dv = self.config.head_dim_v;
        let g = gamma(heads.value.len() + 1);
        let value = self.output_row(&heads.value);
        (0..d_out)
            .map(|c| {
                let w = |e: usize| (w_o.data()[e * d_out + c] as f64).abs();
                let independent = rss((0..heads.value.len()).map(|e| heads.error[e] * w(e)));
                let shared = rss((0..self.config.heads).map(|h| {
                    (h * dv..(h + 1) * dv)
                        .map(|e| heads.shared[e] * w(e))
                        .sum::<f64>()
                }));
                let terms: f64 = (0..heads.value.len())
                    .map(|e| (heads.value[e].abs() + heads.error[e] + heads.shared[e]) * w(e))
                    .sum();
                let bias = self
                    .weights
                    .b_o
                    .as_ref()
                    .map_or(0.0, |b| (b.data()[c] as f64).abs());
                let stored = self.store_u * value[c].abs() + self.store_floor;
                (value[c], independent + shared + g * (terms + bias) + stored)
            })
            .collect()
    }
}

/// The softmax of one query's `scores` (`-inf`: masked) and its weighted sum of `values`,
/// with a bound on the error of an f32 computation of it, given each score's error from its
/// own key and rounding (`own`, independent between keys) and from the query (`from_query`,
/// shared by every key); see [`Layer::attend_bounded`] for the analysis.
fn attend_scores_bounded(
    scores: &[f64],
    own: &[f64],
    from_query: &[f64],
    values: &[Bounded],
    dv: usize,
) -> Bounded {
    let n = scores.len();
    let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if max == f64::NEG_INFINITY {
        // Nothing to attend: the kernels write exact zeros.
        return Bounded {
            value: vec![0.0; dv],
            error: vec![0.0; dv],
            shared: vec![0.0; dv],
        };
    }
    let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
    let sum: f64 = weights.iter().sum();
    let probs: Vec<f64> = weights.iter().map(|w| w / sum).collect();
    let rescales = n.div_ceil(8);
    let g_normalise = gamma(n + 2 * rescales + 4);
    // Per weight, in the worst case: the subtraction of the max and exp, whose ULP is 2u
    // and whose exp2 domain stretches the distance to the max by log2 e < 1.5.
    let rounding = |j: usize| UNIT_ROUNDOFF * (16.0 + 10.0 * (max - scores[j]));
    let attended: Vec<usize> = (0..n).filter(|&j| probs[j] != 0.0).collect();
    let mut value = vec![0.0; dv];
    let mut carried = vec![0.0; dv];
    let mut terms = vec![0.0; dv];
    for &j in &attended {
        let (p, v) = (probs[j], &values[j]);
        for d in 0..dv {
            value[d] += p * v.value[d];
            carried[d] += (p * v.error[d]).powi(2);
            terms[d] += p * (v.value[d].abs() + v.error[d]);
        }
    }
    let largest = attended
        .iter()
        .map(|&j| own[j] + from_query[j] + rounding(j))
        .fold(0.0, f64::max);
    let mut shared = vec![0.0; dv];
    if largest <= 0.1 {
        let mut independent = vec![0.0; dv];
        for &j in &attended {
            let (p, v) = (probs[j], &values[j]);
            let (own, linear) = (own[j].exp_m1(), (from_query[j] + rounding(j)).exp_m1());
            for d in 0..dv {
                let spread = (v.value[d] - value[d]).abs() + v.error[d];
                independent[d] += (p * own * spread).powi(2);
                shared[d] += p * linear * spread;
            }
        }
        for d in 0..dv {
            shared[d] += independent[d].sqrt() + g_normalise * terms[d];
        }
    } else {
        // Far from first order: |Δ ln p_j| <= e_j + max_l e_l, every term counted.
        for &j in &attended {
            let moved =
                (own[j] + from_query[j] + rounding(j) + largest + 2.0 * g_normalise).exp_m1();
            let v = &values[j];
            for ((s, value), error) in shared.iter_mut().zip(&v.value).zip(&v.error) {
                *s += probs[j] * moved * (value.abs() + error);
            }
        }
    }
    // Exact and computed outputs both average the attended values: they can differ by no
    // more than the values' spread, however far the weights move.
    for (d, s) in shared.iter_mut().enumerate() {
        let (lo, hi) = attended.iter().fold((f64::MAX, f64::MIN), |(lo, hi), &j| {
            let (v, e) = (values[j].value[d], values[j].error[d]);
            (lo.min(v - e), hi.max(v + e))
        });
        *s = s.min(hi - lo);
    }
    let g_sum = gamma(n + rescales + 1);
    let error = (0..dv)
        .map(|d| carried[d].sqrt() + g_sum * terms[d])
        .collect();
    Bounded {
        value,
        error,
        shared,
    }
}

/// For the output rows `rows` (each `(batch, position)`), a bound on how far a correct f32
/// computation of the layer can be from the f32-rounded reference, per element: f32's unit
/// roundoff `u = 2^-24` times each reduction's length (as `λ·√n`, see below) times the sum of
/// its absolute terms, carried through the scores, the softmax and both projections, plus the
/// rounding of the reference itself. Memory grows with `seq`, like [`output_rows`].
///
/// Rounding errors are treated as independent: each reduction of `n` terms gets `6·√n·u` of its
/// absolute terms (Higham and Mary's probabilistic bound, which fails with probability below
/// `2n·e^-18`), and independent errors combine as the root of their sum of squares. A correct
/// f32 result of a BERT-sized layer with activations of 20 uses about 1% of it (tests/
/// tolerance.rs); a dropped key, a scale 1% off and values held to f16's precision exceed it.
///
/// For [`crate::Precision::F16`] storage the values are those of the f16-rounded inputs, and
/// every value a kernel stores (Q, K and V after the projection, each head's output, the
/// output projection's result) adds one f16 store error, one ulp: `2^-10` of its magnitude
/// ([`crate::precision::F16_STORE_ERROR`], from f16's unit roundoff `2^-11`, doubled because
/// WGSL may round a conversion either way) or `2^-24` absolute in the subnormal range, as an
/// independent error carried through everything that reads it: a score's error then grows as
/// `√head_dim · 2^-10` of its absolute terms, an output's through the softmax and the output
/// projection's `heads · head_dim_v` terms. The f32 arithmetic terms stay as they are.
pub fn output_row_bounds(
    config: &AttentionConfig,
    weights: &AttentionWeights,
    inputs: &AttentionInputs,
    rows: &[(usize, usize)],
) -> Result<Vec<Vec<f32>>> {
    let layer = Layer::new(config, weights, inputs)?;
    check_rows(config, rows)?;
    let (h, dk, dv) = (config.heads, config.head_dim, config.head_dim_v);
    // Flushed subnormals cost at most the smallest normal per operation.
    let floor =
        (config.d_model + config.seq_len + dk + h * dv + 16) as f64 * f32::MIN_POSITIVE as f64;
    let mut out = vec![Vec::new(); rows.len()];
    for b in 0..config.batch {
        if !rows.iter().any(|&(rb, _)| rb == b) {
            continue;
        }
        let tokens = |w: &Tensor, bias: &Option<Tensor>| -> Vec<Bounded> {
            (0..config.seq_len)
                .map(|t| layer.project_bounded(w, bias, b, t))
                .collect()
        };
        let by_head = |all: &[Bounded], width: usize| -> Vec<Vec<Bounded>> {
            (0..h)
                .map(|head| all.iter().map(|t| Layer::head_of(t, head, width)).collect())
                .collect()
        };
        let keys = by_head(&tokens(&layer.weights.w_k, &layer.weights.b_k), dk);
        let values = by_head(&tokens(&layer.weights.w_v, &layer.weights.b_v), dv);
        for (slot, &(_, i)) in out.iter_mut().zip(rows).filter(|(_, r)| r.0 == b) {
            let query = layer.project_bounded(&layer.weights.w_q, &layer.weights.b_q, b, i);
            let mut heads = Bounded {
                value: Vec::with_capacity(h * dv),
                error: Vec::with_capacity(h * dv),
                shared: Vec::with_capacity(h * dv),
            };
            for head in 0..h {
                let q = Layer::head_of(&query, head, dk);
                let o = layer.attend_bounded(b, i, &q, &keys[head], &values[head]);
                heads.value.extend(o.value);
                heads.error.extend(o.error);
                heads.shared.extend(o.shared);
            }
            *slot = layer
                .output_row_bounded(&heads)
                .into_iter()
                .map(|(v, e)| {
                    let bound = e + UNIT_ROUNDOFF * v.abs() + floor;
                    // Rounded up, so the f32 bound never falls below the f64 one.
                    (bound as f32).next_up()
                })
                .collect();
        }
    }
    Ok(out)
}

/// The bound of [`output_row_bounds`] for every output element, shaped like the output
/// `[batch, seq, d_out]`: the default allowance for comparing a GPU result with
/// [`run`]'s output (see [`crate::compare_bounded`]).
///
/// ```
/// use wgpu_attention::{compare_bounded, reference, AttentionConfig, AttentionInputs,
///                      AttentionWeights, Tensor};
/// let config = AttentionConfig::new(1, 2, 1, 1, 1).with_scale(1.0);
/// let w = |v: f32| Tensor::new([1, 1], vec![v]).unwrap();
/// let inputs = AttentionInputs::new(Tensor::new([1, 2, 1], vec![0.25, 1.0]).unwrap());
/// let weights = AttentionWeights::new(w(1.0), w(1.0), w(20.0));
/// let exact = reference::run(&config, &weights, &inputs).unwrap().output;
/// let bound = reference::error_bound(&config, &weights, &inputs).unwrap();
/// assert!(compare_bounded(&exact, &exact, &bound).unwrap().passed());
/// // Query 1 mixes values 5 and 20: a few f32 roundings of 14.3, each about 1e-6.
/// assert!(bound.data()[1] > 1e-6 && bound.data()[1] < 1e-4, "{:?}", bound.data());
/// let mut wrong = exact.data().to_vec();
/// wrong[1] += 2.0 * bound.data()[1];
/// let wrong = Tensor::new([1, 2, 1], wrong).unwrap();
/// assert!(!compare_bounded(&wrong, &exact, &bound).unwrap().passed());
/// ```
pub fn error_bound(
    config: &AttentionConfig,
    weights: &AttentionWeights,
    inputs: &AttentionInputs,
) -> Result<Tensor> {
    let rows: Vec<(usize, usize)> = (0..config.batch)
        .flat_map(|b| (0..config.seq_len).map(move |i| (b, i)))
        .collect();
    let data = output_row_bounds(config, weights, inputs, &rows)?
        .into_iter()
        .flatten()
        .collect();
    Tensor::new(config.output_shape().to_vec(), data)
}

/// The bound of [`error_bound`] for the attention operator ([`crate::AttentionOp`]), shaped
/// like its output: per element, how far a correct f32 computation from these (exact) f32
/// inputs can be from [`super::operator`]'s f32-rounded output. The same analysis as the
/// layer's, with no projection before or after: each score's error is its dot product's
/// rounding (`γ(head_dim + 2)` of its absolute terms) and that of the scale and bias
/// (`γ(2)` of their sizes), carried through the softmax and the weighted sum. With
/// [`crate::Precision::F16`] storage the inputs are Q, K and V rounded to f16 (as
/// [`super::operator`] takes them) and the output's store adds one f16 ulp, `2^-10` of its
/// magnitude ([`crate::precision::F16_STORE_ERROR`]), or `2^-24` below f16's normal range.
///
/// ```
/// use wgpu_attention::{compare_bounded, reference, OperatorConfig, OperatorInputs, Tensor};
/// // One head of width 1: a query over keys 1 and 2 with values 5 and 20.
/// let config = OperatorConfig::new(1, 1, 1, 1, 1, 2).with_scale(1.0);
/// let t = |len: usize, v: Vec<f32>| Tensor::new([1, 1, len, 1], v).unwrap();
/// let inputs = OperatorInputs::new(t(1, vec![0.25]), t(2, vec![1.0, 2.0]), t(2, vec![5.0, 20.0]));
/// let exact = reference::operator(&config, &inputs).unwrap();
/// let bound = reference::operator_error_bound(&config, &inputs).unwrap();
/// assert!(compare_bounded(&exact, &exact, &bound).unwrap().passed());
/// assert!(bound.data()[0] > 1e-7 && bound.data()[0] < 1e-4, "{:?}", bound.data());
/// let wrong = Tensor::new([1, 1, 1, 1], vec![exact.data()[0] + 2.0 * bound.data()[0]]).unwrap();
/// assert!(!compare_bounded(&wrong, &exact, &bound).unwrap().passed());
/// ```
pub fn operator_error_bound(
    config: &crate::operator::OperatorConfig,
    inputs: &crate::operator::OperatorInputs,
) -> Result<Tensor> {
    use crate::operator::QkvLayout;
    let lengths = inputs.validate(config)?;
    let (nq, nk) = (lengths.q_len, lengths.kv_len);
    let (batch, heads, kv_heads) = (config.batch, config.heads, config.kv_heads);
    let (d, dv) = (config.head_dim, config.head_dim_v);
    let group = heads / kv_heads;
    let scale = config.scale_value() as f64;
    let (g_dot, g_logit) = (gamma(d + 2), gamma(2));
    let at = |hs: usize, len: usize, w: usize, b: usize, h: usize, t: usize, c: usize| match config
        .layout
    {
        QkvLayout::HeadMajor => ((b * hs + h) * len + t) * w + c,
        QkvLayout::TokenMajor => (b * len + t) * hs * w + h * w + c,
    };
    let (q, k, v) = super::operator::stored_qkv(config, inputs)?;
    let (q, k, v) = (&q[..], &k[..], &v[..]);
    // Flushed subnormals cost at most the smallest normal per operation.
    let floor = (d + nk + dv + 16) as f64 * f32::MIN_POSITIVE as f64;
    // The output's store in f16: one f16 ulp (WGSL may round either way), or one subnormal
    // step below f16's normal range.
    let (store_u, store_floor) = match config.precision {
        crate::Precision::F32 => (0.0, 0.0),
        crate::Precision::F16 => (crate::precision::F16_STORE_ERROR, 2f64.powi(-24)),
    };
    let mut out = vec![0f32; batch * heads * nq * dv];
    for b in 0..batch {
        for kh in 0..kv_heads {
            let values: Vec<Bounded> = (0..nk)
                .map(|j| Bounded {
                    value: (0..dv)
                        .map(|c| v[at(kv_heads, nk, dv, b, kh, j, c)] as f64)
                        .collect(),
                    error: vec![0.0; dv],
                    shared: vec![0.0; dv],
                })
                .collect();
            for h in kh * group..(kh + 1) * group {
                for i in 0..nq {
                    let mut scores = vec![f64::NEG_INFINITY; nk];
                    let mut own = vec![0.0; nk];
                    for j in 0..nk {
                        let causal_ok = !config.causal || j + nq <= i + nk;
                        let mask_ok = inputs
                            .key_mask
                            .as_ref()
                            .is_none_or(|m| m.data()[b * nk + j] != 0.0);
                        if !(causal_ok && mask_ok) {
                            continue;
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
                        if bias == f64::NEG_INFINITY {
                            continue;
                        }
                        scores[j] = scale * dot + bias;
                        own[j] = scale.abs() * g_dot * terms
                            + g_logit * ((scale * dot).abs() + bias.abs());
                    }
                    let o = attend_scores_bounded(&scores, &own, &vec![0.0; nk], &values, dv);
                    for c in 0..dv {
                        let bound = o.error[c]
                            + o.shared[c]
                            + (UNIT_ROUNDOFF + store_u) * o.value[c].abs()
                            + store_floor;
                        // Rounded up, so the f32 bound never falls below the f64 one.
                        out[at(heads, nq, dv, b, h, i, c)] = ((bound + floor) as f32).next_up();
                    }
                }
            }
        }
    }
    Tensor::new(config.output_shape(nq), out)
}
