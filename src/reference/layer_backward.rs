//! The f64 reference of the layer's gradients: the layer is projection → attention (the
//! operator, token-major, one kv head per head) → output projection, so its backward is the
//! operator's between two projections':
//! - `dA = dY W_oᵀ`, `dW_o = Aᵀ dY`, `db_o = Σ_rows dY` (without an output projection, `dA = dY`);
//! - `dQ, dK, dV` from the operator's backward ([`super::operator_backward`]'s loops);
//! - `dW_q = xᵀ dQ`, `db_q = Σ_rows dQ` (and so for K and V), `dx = dQ W_qᵀ + dK W_kᵀ + dV W_vᵀ`.
//!
//! Rows are the `batch · seq` tokens; every product is in f64.

use super::backward::Problem;
use crate::config::AttentionConfig;
use crate::error::{Error, Result};
use crate::operator::{Lengths, OperatorConfig};
use crate::tensor::Tensor;
use crate::weights::{AttentionInputs, AttentionWeights};

/// The gradients of a loss with respect to the layer's input and parameters, each shaped like
/// the tensor it is the gradient of; a gradient is `None` where the layer has no such tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerGrads {
    /// `∂L/∂x`, `[batch, seq, d_model]`.
    pub x: Tensor,
    /// `∂L/∂W_q`.
    pub w_q: Tensor,
    /// `∂L/∂W_k`.
    pub w_k: Tensor,
    /// `∂L/∂W_v`.
    pub w_v: Tensor,
    /// `∂L/∂b_q`, if the layer has projection biases.
    pub b_q: Option<Tensor>,
    /// `∂L/∂b_k`.
    pub b_k: Option<Tensor>,
    /// `∂L/∂b_v`.
    pub b_v: Option<Tensor>,
    /// `∂L/∂W_o`, if the layer has an output projection.
    pub w_o: Option<Tensor>,
    /// `∂L/∂b_o`, if its output projection has a bias.
    pub b_o: Option<Tensor>,
}

/// A row-major f64 matrix.
#[derive(Debug, Clone, PartialEq)]
struct Mat {
    rows: usize,
    cols: usize,
    data: Vec<f64>,
}

impl Mat {
    fn of(t: &Tensor, rows: usize, cols: usize) -> Mat {
        Mat {
            rows,
            cols,
            data: t.data().iter().map(|&x| x as f64).collect(),
        }
    }

    fn zeros(rows: usize, cols: usize) -> Mat {
        Mat {
            rows,
            cols,
            data: vec![0.0; rows * cols],
        }
    }

    /// `a b`, with either side transposed first when asked.
    fn mul(a: &Mat, ta: bool, b: &Mat, tb: bool) -> Mat {
        let (m, k) = if ta {
            (a.cols, a.rows)
        } else {
            (a.rows, a.cols)
        };
        let n = if tb { b.rows } else { b.cols };
        let at = |i: usize, l: usize| {
            if ta {
                a.data[l * a.cols + i]
            } else {
                a.data[i * a.cols + l]
            }
        };
        let bt = |l: usize, j: usize| {
            if tb {
                b.data[j * b.cols + l]
            } else {
                b.data[l * b.cols + j]
            }
        };
        let mut c = Mat::zeros(m, n);
        for i in 0..m {
            for j in 0..n {
                c.data[i * n + j] = (0..k).map(|l| at(i, l) * bt(l, j)).sum();
            }
        }
        c
    }

    fn add_row(&mut self, bias: Option<&Mat>) {
        if let Some(b) = bias {
            for r in self.data.chunks_mut(self.cols) {
                r.iter_mut().zip(&b.data).for_each(|(x, b)| *x += b);
            }
        }
    }

    fn add(&mut self, other: &Mat) {
        self.data
            .iter_mut()
            .zip(&other.data)
            .for_each(|(x, y)| *x += y);
    }

    fn column_sums(&self) -> Mat {
        let mut s = Mat::zeros(1, self.cols);
        for r in self.data.chunks(self.cols) {
            s.data.iter_mut().zip(r).for_each(|(s, x)| *s += x);
        }
        s
    }

    fn tensor(&self, shape: &[usize]) -> Result<Tensor> {
        Tensor::new(
            shape.to_vec(),
            self.data.iter().map(|&x| x as f32).collect(),
        )
    }
}

/// The layer's parameters and input as f64 matrices.
#[derive(Debug, Clone)]
struct Params {
    x: Mat,
    w: [Mat; 3],
    b: [Option<Mat>; 3],
    w_o: Option<Mat>,
    b_o: Option<Mat>,
}

/// The layer in f64: the output, and what the backward needs (Q, K, V and the heads).
struct Forward {
    qkv: [Mat; 3],
    heads: Mat,
    /// Read by the finite differences' loss; the backward itself needs only the above.
    #[cfg_attr(not(test), allow(dead_code))]
    out: Mat,
}

/// The operator the layer's attention is: MHA, token-major, causal aligned as the layer's
/// (equal lengths: the two conventions agree).
fn operator_config(config: &AttentionConfig) -> OperatorConfig {
    let mut op = OperatorConfig::new(
        config.batch,
        config.heads,
        config.heads,
        config.head_dim,
        config.seq_len,
        config.seq_len,
    )
    .with_head_dim_v(config.head_dim_v)
    .token_major()
    .with_scale(config.scale_value());
    op.causal = config.causal;
    op.key_padding_mask = config.key_padding_mask;
    op
}

fn problem<'a>(op: &'a OperatorConfig, qkv: &[Mat; 3], mask: Option<&'a [f32]>) -> Problem<'a> {
    Problem {
        config: op,
        lengths: Lengths {
            q_len: op.max_q_len,
            kv_len: op.max_kv_len,
        },
        q: qkv[0].data.clone(),
        k: qkv[1].data.clone(),
        v: qkv[2].data.clone(),
        key_mask: mask,
        bias: None,
    }
}

fn forward(op: &OperatorConfig, p: &Params, mask: Option<&[f32]>) -> Forward {
    let qkv = [0, 1, 2].map(|n| {
        let mut m = Mat::mul(&p.x, false, &p.w[n], false);
        m.add_row(p.b[n].as_ref());
        m
    });
    let heads_data = problem(op, &qkv, mask).forward();
    let heads = Mat {
        rows: p.x.rows,
        cols: heads_data.len() / p.x.rows.max(1),
        data: heads_data,
    };
    let out = match &p.w_o {
        Some(w_o) => {
            let mut o = Mat::mul(&heads, false, w_o, false);
            o.add_row(p.b_o.as_ref());
            o
        }
        None => heads.clone(),
    };
    Forward { qkv, heads, out }
}

/// The gradients of `Σ dy ∘ Y` with respect to x and every parameter, as f64 matrices in
/// the order of [`Params`].
fn backward(op: &OperatorConfig, p: &Params, mask: Option<&[f32]>, dy: &Mat) -> Params {
    let f = forward(op, p, mask);
    let (d_heads, w_o, b_o) = match &p.w_o {
        Some(w) => (
            Mat::mul(dy, false, w, true),
            Some(Mat::mul(&f.heads, true, dy, false)),
            p.b_o.as_ref().map(|_| dy.column_sums()),
        ),
        None => (dy.clone(), None, None),
    };
    let grads = problem(op, &f.qkv, mask).backward(&d_heads.data);
    let dqkv: Vec<Mat> = grads
        .into_iter()
        .zip(&f.qkv)
        .map(|(data, m)| Mat {
            rows: m.rows,
            cols: m.cols,
            data,
        })
        .collect();
    let mut x = Mat::zeros(p.x.rows, p.x.cols);
    for (d, w) in dqkv.iter().zip(&p.w) {
        x.add(&Mat::mul(d, false, w, true));
    }
    Params {
        x,
        w: [0, 1, 2].map(|n| Mat::mul(&p.x, true, &dqkv[n], false)),
        b: [0, 1, 2].map(|n| p.b[n].as_ref().map(|_| dqkv[n].column_sums())),
        w_o,
        b_o,
    }
}

/// The gradients of the loss `L` with respect to the layer's input and parameters, given
/// `grad_out = ∂L/∂out` (shaped like the output), in f64 (see the module documentation).
pub fn layer_backward(
    config: &AttentionConfig,
    weights: &AttentionWeights,
    inputs: &AttentionInputs,
    grad_out: &Tensor,
) -> Result<LayerGrads> {
    config.validate()?;
    weights.validate(config)?;
    inputs.validate(config)?;
    let expected = config.output_shape();
    if grad_out.shape() != expected {
        return Err(Error::shape("grad_out", &expected, grad_out.shape()));
    }
    grad_out.check_finite("grad_out")?;
    let rows = config.batch * config.seq_len;
    let dm = config.d_model;
    let mat = |t: &Tensor| Mat::of(t, t.shape()[0], t.len() / t.shape()[0].max(1));
    let row = |t: &Option<Tensor>| t.as_ref().map(|t| Mat::of(t, 1, t.len()));
    let params = Params {
        x: Mat::of(&inputs.x, rows, dm),
        w: [&weights.w_q, &weights.w_k, &weights.w_v].map(mat),
        b: [&weights.b_q, &weights.b_k, &weights.b_v].map(row),
        w_o: weights.w_o.as_ref().map(mat),
        b_o: row(&weights.b_o),
    };
    let op = operator_config(config);
    let mask = inputs.key_mask.as_ref().map(|m| m.data());
    let dy = Mat::of(grad_out, rows, config.d_out());
    let g = backward(&op, &params, mask, &dy);
    let like = |m: &Mat, t: &Tensor| m.tensor(t.shape());
    let like_opt = |m: &Option<Mat>, t: &Option<Tensor>| -> Result<Option<Tensor>> {
        match (m, t) {
            (Some(m), Some(t)) => Ok(Some(m.tensor(t.shape())?)),
            _ => Ok(None),
        }
    };
    let [gq, gk, gv] = &g.w;
    let [bq, bk, bv] = &g.b;
    Ok(LayerGrads {
        x: like(&g.x, &inputs.x)?,
        w_q: like(gq, &weights.w_q)?,
        w_k: like(gk, &weights.w_k)?,
        w_v: like(gv, &weights.w_v)?,
        b_q: like_opt(bq, &weights.b_q)?,
        b_k: like_opt(bk, &weights.b_k)?,
        b_v: like_opt(bv, &weights.b_v)?,
        w_o: like_opt(&g.w_o, &weights.w_o)?,
        b_o: like_opt(&g.b_o, &weights.b_o)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn t(shape: &[usize], seed: u64) -> Tensor {
        Tensor::new(shape.to_vec(), data(shape.iter().product(), seed)).unwrap()
    }

    /// Every parameter of the f64 layer nudged both ways: central differences of
    /// `L = Σ dy ∘ Y` against the analytic gradients.
    #[test]
    fn layer_gradients_match_finite_differences() {
        let (b, n, dm, h, dk, dv, dout) = (2, 3, 4, 2, 2, 3, 5);
        let config = AttentionConfig::new(b, n, dm, h, dk)
            .with_head_dim_v(dv)
            .with_output_projection(dout)
            .causal()
            .with_key_padding_mask();
        let weights = AttentionWeights::new(
            t(&[dm, h * dk], 1),
            t(&[dm, h * dk], 2),
            t(&[dm, h * dv], 3),
        )
        .with_qkv_bias(t(&[h * dk], 4), t(&[h * dk], 5), t(&[h * dv], 6))
        .with_output_projection(t(&[h * dv, dout], 7), Some(t(&[dout], 8)));
        let mask = Tensor::new([b, n], vec![1., 0., 1., 1., 1., 0.]).unwrap();
        let inputs = AttentionInputs::new(t(&[b, n, dm], 9)).with_key_mask(mask);
        let grad_out = t(&[b, n, dout], 10);
        let grads = layer_backward(&config, &weights, &inputs, &grad_out).unwrap();

        let op = operator_config(&config);
        let m = inputs.key_mask.as_ref().map(|m| m.data());
        let mat = |t: &Tensor| Mat::of(t, t.shape()[0], t.len() / t.shape()[0]);
        let row = |t: &Option<Tensor>| t.as_ref().map(|t| Mat::of(t, 1, t.len()));
        let base = Params {
            x: Mat::of(&inputs.x, b * n, dm),
            w: [&weights.w_q, &weights.w_k, &weights.w_v].map(mat),
            b: [&weights.b_q, &weights.b_k, &weights.b_v].map(row),
            w_o: weights.w_o.as_ref().map(mat),
            b_o: row(&weights.b_o),
        };
        let dy = Mat::of(&grad_out, b * n, dout);
        let loss = |p: &Params| -> f64 {
            let y = forward(&op, p, m).out;
            y.data.iter().zip(&dy.data).map(|(y, g)| y * g).sum()
        };
        type Pick = fn(&mut Params) -> &mut Mat;
        let picks: [(&str, Pick, &Tensor); 9] = [
            ("x", |p| &mut p.x, &grads.x),
            ("w_q", |p| &mut p.w[0], &grads.w_q),
            ("w_k", |p| &mut p.w[1], &grads.w_k),
            ("w_v", |p| &mut p.w[2], &grads.w_v),
            (
                "b_q",
                |p| p.b[0].as_mut().unwrap(),
                grads.b_q.as_ref().unwrap(),
            ),
            (
                "b_k",
                |p| p.b[1].as_mut().unwrap(),
                grads.b_k.as_ref().unwrap(),
            ),
            (
                "b_v",
                |p| p.b[2].as_mut().unwrap(),
                grads.b_v.as_ref().unwrap(),
            ),
            (
                "w_o",
                |p| p.w_o.as_mut().unwrap(),
                grads.w_o.as_ref().unwrap(),
            ),
            (
                "b_o",
                |p| p.b_o.as_mut().unwrap(),
                grads.b_o.as_ref().unwrap(),
            ),
        ];
        let eps = 1e-6;
        for (name, pick, analytic) in picks {
            let mut nonzero = false;
            for (e, &a) in analytic.data().iter().enumerate() {
                let mut p = base.clone();
                pick(&mut p).data[e] += eps;
                let up = loss(&p);
                pick(&mut p).data[e] -= 2.0 * eps;
                let down = loss(&p);
                let numeric = (up - down) / (2.0 * eps);
                // The analytic gradient was rounded to f32.
                assert!(
                    (numeric - a as f64).abs() <= 1e-5 * (1.0 + numeric.abs()),
                    "d{name}[{e}]: central difference {numeric}, analytic {a}"
                );
                nonzero |= a != 0.0;
            }
            assert!(nonzero, "d{name} is all zero: the check compared nothing");
        }
    }

    #[test]
    fn a_layer_without_projections_has_no_such_gradients() {
        let config = AttentionConfig::new(1, 3, 4, 2, 2);
        let weights = AttentionWeights::new(t(&[4, 4], 1), t(&[4, 4], 2), t(&[4, 4], 3));
        let inputs = AttentionInputs::new(t(&[1, 3, 4], 4));
        let grads = layer_backward(&config, &weights, &inputs, &t(&[1, 3, 4], 5)).unwrap();
        assert!(grads.w_o.is_none() && grads.b_o.is_none() && grads.b_q.is_none());
        assert_eq!(grads.x.shape(), &[1, 3, 4]);
        let err = layer_backward(&config, &weights, &inputs, &t(&[1, 3, 5], 5)).unwrap_err();
        assert!(err.to_string().contains("grad_out"), "{err}");
    }
}
