//! The f64 reference of the attention operator.

use crate::error::Result;
use crate::tensor::Tensor;

/// The attention operator ([`crate::AttentionOp`]) in f64 loops: for each batch row, query head
/// `h` (attending key/value head `h / (heads / kv_heads)`) and query `i`, the softmax over the
/// keys it may see of `scale · q·k + bias`, times V. Causal masking is aligned to the end of
/// the keys (`j <= i + kv_len - q_len`); a bias of `-inf` masks a key; a query with no key to
/// attend gets zeros. Inputs and output are in the configuration's layout.
///
/// With [`crate::Precision::F16`] the reference starts from Q, K and V rounded to f16, as the
/// kernel reads them (the mask and bias are not rounded: they are stored as u32 and f32).
pub fn operator(
    config: &crate::operator::OperatorConfig,
    inputs: &crate::operator::OperatorInputs,
) -> Result<Tensor> {
    Ok(attend(config, inputs)?.0)
}

/// The probabilities of [`operator`] `[batch, heads, q_len, kv_len]` (each query's softmax over
/// the keys: 0 where a key is masked, a row of zeros where none is left), what
/// [`crate::AttentionOp::read_probabilities`] reads back from the staged kernels.
pub fn operator_probs(
    config: &crate::operator::OperatorConfig,
    inputs: &crate::operator::OperatorInputs,
) -> Result<Tensor> {
    Ok(attend(config, inputs)?.1)
}

/// The output and the probabilities.
fn attend(
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
    let (q, k, v) = stored_qkv(config, inputs)?;
    let (q, k, v) = (&q[..], &k[..], &v[..]);
    let mut out = vec![0f32; batch * heads * nq * dv];
    let mut probs = vec![0f32; batch * heads * nq * nk];
    for b in 0..batch {
        for h in 0..heads {
            let kh = h / group;
            for i in 0..nq {
                let logits: Vec<Option<f64>> = (0..nk)
                    .map(|j| {
                        let causal_ok = !config.causal || j + nq <= i + nk;
                        let mask_ok = inputs
                            .key_mask
                            .as_ref()
                            .is_none_or(|m| m.data()[b * nk + j] != 0.0);
                        if !(causal_ok && mask_ok) {
                            return None;
                        }
                        let dot: f64 = (0..d)
                            .map(|c| {
                                q[at(heads, nq, d, b, h, i, c)] as f64
                                    * k[at(kv_heads, nk, d, b, kh, j, c)] as f64
                            })
                            .sum();
                        let bias = match (&inputs.bias, config.bias) {
                            (Some(t), Some(s)) => {
                                let [bb, hb] = s.dims(batch, heads);
                                let (bi, hi) = (b.min(bb - 1), h.min(hb - 1));
                                t.data()[((bi * hb + hi) * nq + i) * nk + j] as f64
                            }
                            _ => 0.0,
                        };
                        let x = scale * dot + bias;
                        (x != f64::NEG_INFINITY).then_some(x)
                    })
                    .collect();
                let Some(max) = logits.iter().flatten().copied().reduce(f64::max) else {
                    continue; // nothing to attend: zeros
                };
                let weights: Vec<f64> = logits
                    .iter()
                    .map(|x| x.map_or(0.0, |x| (x - max).exp()))
                    .collect();
                let sum: f64 = weights.iter().sum();
                let row = ((b * heads + h) * nq + i) * nk;
                for (p, w) in probs[row..row + nk].iter_mut().zip(&weights) {
                    *p = (w / sum) as f32;
                }
                for c in 0..dv {
                    let acc: f64 = (0..nk)
                        .map(|j| weights[j] * v[at(kv_heads, nk, dv, b, kh, j, c)] as f64)
                        .sum();
                    out[at(heads, nq, dv, b, h, i, c)] = (acc / sum) as f32;
                }
            }
        }
    }
    Ok((
        Tensor::new(config.output_shape(nq), out)?,
        Tensor::new([batch, heads, nq, nk], probs)?,
    ))
}

/// Q, K and V as the operator's kernels read them: rounded to f16 for f16 storage (a value past
/// f16's range is [`crate::Error::OutsideF16Range`], as the operator refuses it).
pub(super) fn stored_qkv(
    config: &crate::operator::OperatorConfig,
    inputs: &crate::operator::OperatorInputs,
) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    let p = config.precision;
    let round = |name: &str, t: &Tensor| p.round(name, t.shape(), t.data());
    Ok((
        round("q", &inputs.q)?,
        round("k", &inputs.k)?,
        round("v", &inputs.v)?,
    ))
}

/// The f64 reference of one step of attention over a KV cache ([`crate::KvCache`]) whose batch
/// rows hold different numbers of tokens: for each row `b`, its `q_len` queries `q[b]` are the
/// LAST `q_len` of its `lens[b]` tokens and attend its first `lens[b]` keys and values (causal
/// masking, if `config.causal`, aligned to the row's own end), exactly as
/// [`operator`] on that row alone. `q` is `[batch, heads, q_len, head_dim]`; `k` and `v` are
/// the cache's contents `[batch, kv_heads, capacity, head_dim(_v)]` (tokens past a row's
/// length are ignored). `config` gives the heads, widths, scale and masking; its lengths,
/// capacity and path are not used.
pub fn cache_step(
    config: &crate::operator::OperatorConfig,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    lens: &[usize],
) -> Result<Tensor> {
    use crate::error::Error;
    use crate::operator::{OperatorConfig, OperatorInputs};
    let (batch, heads, kv_heads) = (config.batch, config.heads, config.kv_heads);
    let (d, dv) = (config.head_dim, config.head_dim_v);
    let q_len = q.shape().get(2).copied().unwrap_or(0);
    let capacity = k.shape().get(2).copied().unwrap_or(0);
    for (name, t, expected) in [
        ("q", q, [batch, heads, q_len, d]),
        ("k", k, [batch, kv_heads, capacity, d]),
        ("v", v, [batch, kv_heads, capacity, dv]),
    ] {
        if t.shape() != expected {
            return Err(Error::shape(name, &expected, t.shape()));
        }
    }
    if lens.len() != batch {
        return Err(Error::shape("lens", &[batch], &[lens.len()]));
    }
    let mut out = Vec::with_capacity(batch * heads * q_len * dv);
    for (b, &len) in lens.iter().enumerate() {
        if len > capacity {
            return Err(Error::LengthPastMaximum {
                name: "lens",
                len,
                max: capacity,
            });
        }
        let rows = |t: &Tensor, hs: usize, w: usize| -> Result<Tensor> {
            let mut data = Vec::with_capacity(hs * len * w);
            for h in 0..hs {
                let at = (b * hs + h) * capacity * w;
                data.extend_from_slice(&t.data()[at..at + len * w]);
            }
            Tensor::new([1, hs, len, w], data)
        };
        let qb = &q.data()[b * heads * q_len * d..(b + 1) * heads * q_len * d];
        let row_config = OperatorConfig {
            batch: 1,
            max_q_len: q_len.max(1),
            max_kv_len: len.max(1),
            kv_capacity: None,
            row_lengths: false,
            ..config.clone()
        };
        let inputs = OperatorInputs::new(
            Tensor::new([1, heads, q_len, d], qb.to_vec())?,
            rows(k, kv_heads, d)?,
            rows(v, kv_heads, dv)?,
        );
        out.extend_from_slice(operator(&row_config, &inputs)?.data());
    }
    Tensor::new([batch, heads, q_len, dv], out)
}
