//! The f64 reference of the attention operator's gradients, and of the row logsumexp the
//! forward saves for them.
//!
//! For one query row (batch `b`, query head `h`, query `i`) with logits
//! `x_j = scale · q·k_j + bias_j` over the keys `j` it may attend:
//! `P_j = exp(x_j - lse)`, `lse = log Σ_j exp(x_j)`, `O = Σ_j P_j v_j`, and for an upstream
//! gradient `dO`:
//! - `dV_j += P_j dO` and `dP_j = dO·v_j`;
//! - `D = Σ_j P_j dP_j = dO·O`, `dS_j = P_j (dP_j - D)` (the gradient of the logits);
//! - `dQ += scale Σ_j dS_j k_j` and `dK_j += scale dS_j q`.
//!
//! Under GQA, `dK` and `dV` of a key/value head sum the terms of every query head of its group.
//! A query with no key to attend has `O = 0` and contributes nothing: zero gradients.

use crate::error::Result;
pub use crate::operator::OperatorGrads;
use crate::operator::{Lengths, OperatorConfig, OperatorInputs, QkvLayout};
use crate::tensor::Tensor;

/// The logsumexp of a query row that attends no key: the kernels' `LOWEST` (-3.402823e38,
/// just above `-f32::MAX`), finite because WGSL implementations may assume no infinities.
pub const EMPTY_ROW_LSE: f32 = -3.402823e38;

/// The operator's tensors as f64, with the call's sizes: the loops below read it.
pub(crate) struct Problem<'a> {
    pub config: &'a OperatorConfig,
    pub lengths: Lengths,
    pub q: Vec<f64>,
    pub k: Vec<f64>,
    pub v: Vec<f64>,
    pub key_mask: Option<&'a [f32]>,
    pub bias: Option<&'a [f32]>,
}

impl<'a> Problem<'a> {
    /// Checks `inputs` against `config` and widens them to f64.
    pub fn new(config: &'a OperatorConfig, inputs: &'a OperatorInputs) -> Result<Self> {
        let lengths = inputs.validate(config)?;
        let wide = |t: &Tensor| t.data().iter().map(|&x| x as f64).collect();
        Ok(Problem {
            config,
            lengths,
            q: wide(&inputs.q),
            k: wide(&inputs.k),
            v: wide(&inputs.v),
            key_mask: inputs.key_mask.as_ref().map(|m| m.data()),
            bias: inputs.bias.as_ref().map(|b| b.data()),
        })
    }

    /// Element `[b, h, t, c]` of a tensor of `hs` heads, `len` tokens and `w` columns.
    #[allow(clippy::too_many_arguments)]
    fn at(&self, hs: usize, len: usize, w: usize, b: usize, h: usize, t: usize, c: usize) -> usize {
        match self.config.layout {
            QkvLayout::HeadMajor => ((b * hs + h) * len + t) * w + c,
            QkvLayout::TokenMajor => (b * len + t) * hs * w + h * w + c,
        }
    }

    fn q_at(&self, b: usize, h: usize, i: usize, c: usize) -> usize {
        let cfg = self.config;
        self.at(cfg.heads, self.lengths.q_len, cfg.head_dim, b, h, i, c)
    }

    fn k_at(&self, b: usize, kh: usize, j: usize, c: usize) -> usize {
        let cfg = self.config;
        self.at(cfg.kv_heads, self.lengths.kv_len, cfg.head_dim, b, kh, j, c)
    }

    fn v_at(&self, b: usize, kh: usize, j: usize, c: usize) -> usize {
        let cfg = self.config;
        self.at(
            cfg.kv_heads,
            self.lengths.kv_len,
            cfg.head_dim_v,
            b,
            kh,
            j,
            c,
        )
    }

    /// Element `[b, h, i, c]` of the output (and of its gradient).
    fn o_at(&self, b: usize, h: usize, i: usize, c: usize) -> usize {
        let cfg = self.config;
        self.at(cfg.heads, self.lengths.q_len, cfg.head_dim_v, b, h, i, c)
    }

    /// The logits of query `i` of head `h` in batch row `b`: `None` for a key it may not
    /// attend (causal, padding, or a bias of `-inf`).
    fn logits(&self, b: usize, h: usize, i: usize) -> Vec<Option<f64>> {
        let cfg = self.config;
        let (nq, nk) = (self.lengths.q_len, self.lengths.kv_len);
        let kh = h / (cfg.heads / cfg.kv_heads);
        let scale = cfg.scale_value() as f64;
        (0..nk)
            .map(|j| {
                let causal_ok = !cfg.causal || j + nq <= i + nk;
                let mask_ok = self.key_mask.is_none_or(|m| m[b * nk + j] != 0.0);
                if !(causal_ok && mask_ok) {
                    return None;
                }
                let dot: f64 = (0..cfg.head_dim)
                    .map(|c| self.q[self.q_at(b, h, i, c)] * self.k[self.k_at(b, kh, j, c)])
                    .sum();
                let bias = match (self.bias, cfg.bias) {
                    (Some(t), Some(s)) => {
                        let [bb, hb] = s.dims(cfg.batch, cfg.heads);
                        let (bi, hi) = (b.min(bb - 1), h.min(hb - 1));
                        t[((bi * hb + hi) * nq + i) * nk + j] as f64
                    }
                    _ => 0.0,
                };
                let x = scale * dot + bias;
                (x != f64::NEG_INFINITY).then_some(x)
            })
            .collect()
    }

    /// The softmax weights of a row and its logsumexp; `None` when it attends no key.
    fn probs(&self, b: usize, h: usize, i: usize) -> Option<(Vec<f64>, f64)> {
        let logits = self.logits(b, h, i);
        let max = logits.iter().flatten().copied().reduce(f64::max)?;
        let sum: f64 = logits.iter().flatten().map(|x| (x - max).exp()).sum();
        let lse = max + sum.ln();
        Some((
            logits
                .iter()
                .map(|x| x.map_or(0.0, |x| (x - lse).exp()))
                .collect(),
            lse,
        ))
    }

    /// Every (batch, query head, query) row, in output order.
    fn rows(&self) -> impl Iterator<Item = (usize, usize, usize)> + use<> {
        let (batch, heads, nq) = (self.config.batch, self.config.heads, self.lengths.q_len);
        (0..batch).flat_map(move |b| (0..heads).flat_map(move |h| (0..nq).map(move |i| (b, h, i))))
    }

    /// The output in f64, in the configuration's layout.
    pub fn forward(&self) -> Vec<f64> {
        let cfg = self.config;
        let group = cfg.heads / cfg.kv_heads;
        let mut out = vec![0.0; cfg.batch * cfg.heads * self.lengths.q_len * cfg.head_dim_v];
        for (b, h, i) in self.rows() {
            let Some((p, _)) = self.probs(b, h, i) else {
                continue;
            };
            for c in 0..cfg.head_dim_v {
                out[self.o_at(b, h, i, c)] = p
                    .iter()
                    .enumerate()
                    .map(|(j, pj)| pj * self.v[self.v_at(b, h / group, j, c)])
                    .sum();
            }
        }
        out
    }

    /// The row logsumexps `[batch, heads, q_len]` (natural log, of the logits), `None` for
    /// rows that attend no key.
    pub fn lse(&self) -> Vec<Option<f64>> {
        self.rows()
            .map(|(b, h, i)| self.probs(b, h, i).map(|(_, lse)| lse))
            .collect()
    }

    /// The gradients of `Σ grad_out ∘ O` with respect to Q, K and V, in their layouts.
    pub fn backward(&self, grad_out: &[f64]) -> [Vec<f64>; 3] {
        let cfg = self.config;
        let group = cfg.heads / cfg.kv_heads;
        let scale = cfg.scale_value() as f64;
        let (d, dv) = (cfg.head_dim, cfg.head_dim_v);
        let mut dq = vec![0.0; self.q.len()];
        let mut dk = vec![0.0; self.k.len()];
        let mut dvv = vec![0.0; self.v.len()];
        for (b, h, i) in self.rows() {
            let Some((p, _)) = self.probs(b, h, i) else {
                continue;
            };
            let kh = h / group;
            let d_o: Vec<f64> = (0..dv).map(|c| grad_out[self.o_at(b, h, i, c)]).collect();
            let dp: Vec<f64> = (0..p.len())
                .map(|j| {
                    (0..dv)
                        .map(|c| d_o[c] * self.v[self.v_at(b, kh, j, c)])
                        .sum()
                })
                .collect();
            let big_d: f64 = p.iter().zip(&dp).map(|(pj, dpj)| pj * dpj).sum();
            for (j, (&pj, &dpj)) in p.iter().zip(&dp).enumerate() {
                if pj == 0.0 {
                    continue;
                }
                let ds = pj * (dpj - big_d);
                for (c, &g) in d_o.iter().enumerate() {
                    dvv[self.v_at(b, kh, j, c)] += pj * g;
                }
                for c in 0..d {
                    dq[self.q_at(b, h, i, c)] += scale * ds * self.k[self.k_at(b, kh, j, c)];
                    dk[self.k_at(b, kh, j, c)] += scale * ds * self.q[self.q_at(b, h, i, c)];
                }
            }
        }
        [dq, dk, dvv]
    }
}

fn narrow(shape: &[usize], data: &[f64]) -> Result<Tensor> {
    Tensor::new(shape.to_vec(), data.iter().map(|&x| x as f32).collect())
}

/// The row logsumexps the forward saves for the backward: f32 `[batch, heads, q_len]`, the
/// natural log of `Σ_j exp(scale · q·k_j + bias_j)` over the keys the row attends, so that
/// `P_j = exp(logit_j - lse)`; [`EMPTY_ROW_LSE`] for a row that attends no key.
pub fn operator_lse(config: &OperatorConfig, inputs: &OperatorInputs) -> Result<Tensor> {
    let problem = Problem::new(config, inputs)?;
    let data = problem
        .lse()
        .iter()
        .map(|l| l.map_or(EMPTY_ROW_LSE, |l| l as f32))
        .collect();
    Tensor::new([config.batch, config.heads, problem.lengths.q_len], data)
}

/// The gradients of the loss `L` with respect to the operator's Q, K and V, given
/// `grad_out = ∂L/∂out` (shaped like the output): f64 loops, see the module documentation.
pub fn operator_backward(
    config: &OperatorConfig,
    inputs: &OperatorInputs,
    grad_out: &Tensor,
) -> Result<OperatorGrads> {
    let problem = Problem::new(config, inputs)?;
    let expected = config.output_shape(problem.lengths.q_len);
    if grad_out.shape() != expected.as_slice() {
        return Err(crate::error::Error::shape(
            "grad_out",
            &expected,
            grad_out.shape(),
        ));
    }
    grad_out.check_finite("grad_out")?;
    let g: Vec<f64> = grad_out.data().iter().map(|&x| x as f64).collect();
    let [dq, dk, dv] = problem.backward(&g);
    Ok(OperatorGrads {
        q: narrow(inputs.q.shape(), &dq)?,
        k: narrow(inputs.k.shape(), &dk)?,
        v: narrow(inputs.v.shape(), &dv)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operator::BiasShape;

    /// A small deterministic generator, so this test needs no `random` feature.
    struct Lcg(u64);

    impl Lcg {
        fn next(&mut self) -> f32 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }

        fn tensor(&mut self, shape: Vec<usize>) -> Tensor {
            let n = shape.iter().product();
            Tensor::new(shape, (0..n).map(|_| self.next()).collect()).unwrap()
        }
    }

    fn inputs(config: &OperatorConfig, nq: usize, nk: usize, seed: u64) -> OperatorInputs {
        let mut g = Lcg(seed);
        let shape = |heads: usize, len: usize, w: usize| match config.layout {
            QkvLayout::HeadMajor => vec![config.batch, heads, len, w],
            QkvLayout::TokenMajor => vec![config.batch, len, heads * w],
        };
        let mut inputs = OperatorInputs::new(
            g.tensor(shape(config.heads, nq, config.head_dim)),
            g.tensor(shape(config.kv_heads, nk, config.head_dim)),
            g.tensor(shape(config.kv_heads, nk, config.head_dim_v)),
        );
        if config.key_padding_mask {
            // Batch row 0 attends every other key; the others all but the first.
            let mask = (0..config.batch * nk)
                .map(|e| match (e / nk, e % nk) {
                    (0, j) => (j % 2 == 0) as u8 as f32,
                    (_, j) => (j != 0) as u8 as f32,
                })
                .collect();
            inputs = inputs.with_key_mask(Tensor::new([config.batch, nk], mask).unwrap());
        }
        if let Some(s) = config.bias {
            let [bb, hb] = s.dims(config.batch, config.heads);
            let mut bias = g.tensor(vec![bb, hb, nq, nk]);
            // One masked key by a bias of -inf.
            let mut data = bias.data().to_vec();
            data[1] = f32::NEG_INFINITY;
            bias = Tensor::new(bias.shape().to_vec(), data).unwrap();
            inputs = inputs.with_bias(bias);
        }
        inputs
    }

    fn tensor_mut<'p>(p: &'p mut Problem, which: usize) -> &'p mut Vec<f64> {
        match which {
            0 => &mut p.q,
            1 => &mut p.k,
            _ => &mut p.v,
        }
    }

    /// Central differences of `L = Σ g ∘ O` in f64 against the analytic gradients, for every
    /// element of Q, K and V.
    fn check_finite_differences(config: &OperatorConfig, nq: usize, nk: usize, seed: u64) {
        let inputs = inputs(config, nq, nk, seed);
        let problem = Problem::new(config, &inputs).unwrap();
        let mut g = Lcg(seed ^ 0x9e37);
        let grad_out: Vec<f64> = (0..problem.forward().len())
            .map(|_| g.next() as f64)
            .collect();
        let loss =
            |p: &Problem| -> f64 { p.forward().iter().zip(&grad_out).map(|(o, g)| o * g).sum() };
        let analytic = problem.backward(&grad_out);
        let eps = 1e-6;
        for (which, grads) in analytic.iter().enumerate() {
            for (e, &analytic) in grads.iter().enumerate() {
                let mut p = Problem::new(config, &inputs).unwrap();
                tensor_mut(&mut p, which)[e] += eps;
                let up = loss(&p);
                tensor_mut(&mut p, which)[e] -= 2.0 * eps;
                let down = loss(&p);
                let numeric = (up - down) / (2.0 * eps);
                assert!(
                    (numeric - analytic).abs() <= 1e-6 * (1.0 + numeric.abs()),
                    "{config:?} {nq}x{nk}: d{} [{e}] numeric {numeric} analytic {analytic}",
                    ["q", "k", "v"][which],
                );
            }
        }
        // Not all zero: the check compared something.
        assert!(analytic.iter().all(|g| g.iter().any(|&x| x.abs() > 1e-6)));
    }

    #[test]
    fn gradients_match_finite_differences() {
        let base = OperatorConfig::new(2, 4, 2, 3, 8, 8).with_head_dim_v(5);
        check_finite_differences(&base, 3, 5, 1);
        check_finite_differences(&base.clone().causal(), 4, 6, 2);
        check_finite_differences(&base.clone().causal(), 5, 3, 3);
        check_finite_differences(&base.clone().with_key_padding_mask(), 3, 4, 4);
        for per_batch in [false, true] {
            for per_head in [false, true] {
                let cfg = base.clone().with_bias(BiasShape {
                    per_batch,
                    per_head,
                });
                check_finite_differences(&cfg, 3, 4, 5);
            }
        }
        let mqa = OperatorConfig::new(1, 3, 1, 4, 4, 4)
            .token_major()
            .with_scale(0.7);
        check_finite_differences(&mqa, 2, 3, 6);
    }

    #[test]
    fn a_row_with_no_key_has_zero_gradients_and_the_empty_lse() {
        // Causal with more queries than keys: the first query sees no key.
        let config = OperatorConfig::new(1, 2, 1, 4, 4, 4).causal();
        let inputs = inputs(&config, 3, 2, 7);
        let out = crate::reference::operator(&config, &inputs).unwrap();
        let grad_out = Tensor::new(out.shape().to_vec(), vec![1.0; out.len()]).unwrap();
        let grads = operator_backward(&config, &inputs, &grad_out).unwrap();
        for h in 0..2 {
            for c in 0..4 {
                assert_eq!(grads.q.get(&[0, h, 0, c]), Some(0.0));
            }
            // Query 1 sees one key (P = 1, so dS = 0); query 2 sees two.
            assert!(grads.q.get(&[0, h, 2, 0]).unwrap() != 0.0);
        }
        let lse = operator_lse(&config, &inputs).unwrap();
        assert_eq!(lse.get(&[0, 0, 0]), Some(EMPTY_ROW_LSE));
        // Query 1 sees key 0 alone: its logsumexp is that one logit.
        let scale = 0.5f64;
        let dot: f64 = (0..4)
            .map(|c| {
                inputs.q.get(&[0, 0, 1, c]).unwrap() as f64
                    * inputs.k.get(&[0, 0, 0, c]).unwrap() as f64
            })
            .sum();
        assert!((lse.get(&[0, 0, 1]).unwrap() as f64 - scale * dot).abs() < 1e-6);
    }

    #[test]
    fn the_f64_forward_matches_the_operator_reference() {
        let config = OperatorConfig::new(2, 4, 2, 3, 8, 8)
            .causal()
            .with_key_padding_mask();
        let inputs = inputs(&config, 5, 7, 8);
        let out = crate::reference::operator(&config, &inputs).unwrap();
        let ours = Problem::new(&config, &inputs).unwrap().forward();
        for (a, b) in out.data().iter().zip(&ours) {
            assert!((*a as f64 - b).abs() < 1e-6, "{a} {b}");
        }
    }

    #[test]
    fn grad_out_of_the_wrong_shape_is_named() {
        let config = OperatorConfig::new(1, 2, 1, 4, 4, 4);
        let inputs = inputs(&config, 3, 2, 9);
        let err = operator_backward(&config, &inputs, &Tensor::zeros([1, 2, 2, 4])).unwrap_err();
        assert!(err.to_string().contains("grad_out"), "{err}");
    }
}
