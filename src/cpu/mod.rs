//! The fast CPU path: the layer as a CPU user would run it, multi-threaded on `gemm` and `rayon`.
//!
//! [`reference`](crate::reference) is the judge (f64, plain loops, every intermediate kept);
//! this module is the competitor the benchmark compares GPU times against. It computes in f32
//! and keeps nothing but the output:
//!
//! * the three projections are one GEMM, `x @ [W_q | W_k | W_v]`, with the weights packed side
//!   by side once in [`CpuAttention::new`]; the attention core reads its queries, keys and
//!   values straight out of that packed buffer through strides, so nothing is transposed;
//! * the attention core runs one rayon job per (batch row, head, block of 128 queries); each
//!   walks the keys in chunks of at most 512 with an online softmax (FlashAttention-2 style),
//!   so a job's scratch is a 128 × 512 score block whatever the sequence length. Causal blocks
//!   stop at their last query's key;
//! * the softmax's exponentials use a branch-free polynomial `exp` that LLVM vectorises, built for
//!   AVX2+FMA behind runtime feature detection.

mod attend;
mod checks;
mod exp;
mod matmul;

use gemm::Parallelism;

use attend::{View, attention_core};
use checks::{check_input, check_mask, checked_len};
use matmul::{Gemm, Mat, matmul};

use crate::config::AttentionConfig;
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use crate::weights::{AttentionInputs, AttentionWeights};

/// Queries per attention job. Measured on a 2-core Zen 4 with `gemm` 0.19's AVX2 kernels, 128
/// rows run the score GEMM about 10% and the weighted sum about 5% faster than 64 (packed keys
/// and values serve more queries), and a job per (batch row, head, block) still gives 32 jobs
/// to balance at 8 heads of 512 tokens.
const QUERY_BLOCK: usize = 128;

/// Keys per online-softmax step. The `QUERY_BLOCK × KEY_BLOCK` score block (256 KiB) and the
/// chunk's packed keys and values stay within a 1 MiB L2; a sequence up to this length takes a
/// single step, with no rescaling.
const KEY_BLOCK: usize = 512;

/// Shape and options of `softmax(scale · Q Kᵀ, masked) V` for already-projected inputs.
///
/// ```
/// use wgpu_attention::AttentionShape;
/// let shape = AttentionShape {
///     batch: 1, heads: 8, seq: 512, head_dim: 64, head_dim_v: 64, scale: 0.125, causal: true,
/// };
/// assert_eq!(shape.output_len(), 512 * 8 * 64);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionShape {
    /// Number of independent sequences.
    pub batch: usize,
    /// Number of heads.
    pub heads: usize,
    /// Tokens per sequence.
    pub seq: usize,
    /// Width of each head's queries and keys.
    pub head_dim: usize,
    /// Width of each head's values.
    pub head_dim_v: usize,
    /// Factor applied to every score `q · k` before the softmax.
    pub scale: f32,
    /// Query `i` attends only keys `j <= i`.
    pub causal: bool,
}

impl AttentionShape {
    /// The attention core of a layer: its sizes, [`AttentionConfig::scale_value`] and causality.
    pub fn of(config: &AttentionConfig) -> Self {
        AttentionShape {
            batch: config.batch,
            heads: config.heads,
            seq: config.seq_len,
            head_dim: config.head_dim,
            head_dim_v: config.head_dim_v,
            scale: config.scale_value(),
            causal: config.causal,
        }
    }

    /// Length of the output `[batch, seq, heads * head_dim_v]` (`usize::MAX` if it overflows).
    pub fn output_len(&self) -> usize {
        checked_len(&[self.batch, self.seq, self.heads, self.head_dim_v]).unwrap_or(usize::MAX)
    }

    fn validate(&self) -> Result<()> {
        let dims = [
            ("batch", self.batch),
            ("heads", self.heads),
            ("seq", self.seq),
            ("head_dim", self.head_dim),
            ("head_dim_v", self.head_dim_v),
        ];
        for (name, value) in dims {
            if value == 0 {
                return Err(Error::ZeroSize { name });
            }
        }
        if !self.scale.is_finite() {
            return Err(Error::InvalidConfig(format!(
                "scale must be finite, got {}",
                self.scale
            )));
        }
        let sizes = [
            [self.batch, self.heads, self.seq, self.head_dim],
            [self.batch, self.heads, self.seq, self.head_dim_v],
            [self.batch, self.seq, self.heads, self.head_dim_v],
        ];
        if sizes.iter().any(|s| checked_len(s).is_none()) {
            return Err(Error::InvalidConfig(format!(
                "{self:?} has more elements than memory can address"
            )));
        }
        Ok(())
    }
}

/// The attention core alone: `softmax(scale · Q Kᵀ, masked) V` for every batch row and head,
/// multi-threaded.
///
/// `q`, `k` are `[batch, heads, seq, head_dim]` and `v` is `[batch, heads, seq, head_dim_v]`,
/// head-major as in [`Intermediates`](crate::Intermediates); `key_mask` is `[batch, seq]` with 1
/// for a real token and 0 for padding. Returns `[batch, seq, heads * head_dim_v]`, the heads
/// concatenated. A query whose every key is masked gets zeros. Lengths, mask values and
/// finiteness are checked as [`reference::run`](crate::reference::run) checks its inputs.
///
/// ```
/// use wgpu_attention::{cpu, AttentionShape};
/// // One head of width 1, two tokens: query 1 scores keys [0, 1] as [0, 1].
/// let shape = AttentionShape {
///     batch: 1, heads: 1, seq: 2, head_dim: 1, head_dim_v: 1, scale: 1.0, causal: false,
/// };
/// let (q, k, v) = ([0.0, 1.0], [0.0, 1.0], [0.0, 1.0]);
/// let out = cpu::attention(&shape, &q, &k, &v, None).unwrap();
/// let e = std::f32::consts::E;
/// assert!((out[0] - 0.5).abs() < 1e-6);
/// assert!((out[1] - e / (1.0 + e)).abs() < 1e-6);
/// // Padding key 1 away leaves only value 0.
/// let out = cpu::attention(&shape, &q, &k, &v, Some(&[1.0, 0.0])).unwrap();
/// assert_eq!(out, [0.0, 0.0]);
/// ```
pub fn attention(
    shape: &AttentionShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    key_mask: Option<&[f32]>,
) -> Result<Vec<f32>> {
    shape.validate()?;
    let (b, h, n) = (shape.batch, shape.heads, shape.seq);
    let (d, dv) = (shape.head_dim, shape.head_dim_v);
    for (name, data, dims) in [
        ("q", q, [b, h, n, d]),
        ("k", k, [b, h, n, d]),
        ("v", v, [b, h, n, dv]),
    ] {
        check_input(name, data, &dims)?;
    }
    if let Some(mask) = key_mask {
        check_mask(mask, [b, n])?;
    }
    let view = |data, width| View {
        data,
        batch_stride: h * n * width,
        head_stride: n * width,
        row_stride: width,
    };
    let mut out = vec![0.0; shape.output_len()];
    attention_core(
        shape,
        view(q, d),
        view(k, d),
        view(v, dv),
        key_mask,
        &mut out,
    );
    Ok(out)
}

/// The whole layer on the CPU: weights prepared once, then run as often as needed.
///
/// Computes what [`reference::run`](crate::reference::run) computes, in f32: results agree
/// with it within [`Tolerance::F32`](crate::Tolerance::F32) for inputs of order 1.
///
/// ```
/// use wgpu_attention::{compare, reference, AttentionConfig, AttentionInputs, AttentionWeights,
///                      CpuAttention, Tensor, Tolerance};
/// # fn main() -> Result<(), wgpu_attention::Error> {
/// // The worked example: 3 tokens of width 4, one head of width 3, unscaled.
/// let config = AttentionConfig::new(1, 3, 4, 1, 3).with_scale(1.0);
/// let weights = AttentionWeights::new(
///     Tensor::new([4, 3], vec![1., 0., 1., 1., 0., 0., 0., 0., 1., 0., 1., 1.])?, // w_query
///     Tensor::new([4, 3], vec![0., 0., 1., 1., 1., 0., 0., 1., 0., 1., 1., 0.])?, // w_key
///     Tensor::new([4, 3], vec![0., 2., 0., 0., 3., 0., 1., 0., 3., 1., 1., 0.])?, // w_value
/// );
/// let inputs = AttentionInputs::new(Tensor::new(
///     [1, 3, 4],
///     vec![1., 0., 1., 0., 0., 2., 0., 2., 1., 1., 1., 1.],
/// )?);
/// let layer = CpuAttention::new(&config, &weights)?;
/// let out = layer.run(&inputs)?;
/// assert!((out.data()[0] - 1.9366211).abs() < 1e-6);
/// let cpu = reference::run(&config, &weights, &inputs)?;
/// assert!(compare(&out, &cpu.output, Tolerance::F32)?.passed());
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct CpuAttention {
    config: AttentionConfig,
    /// `[d_model, heads·(2·head_dim + head_dim_v)]`: `W_q | W_k | W_v` side by side.
    w_qkv: Vec<f32>,
    /// The three biases side by side; `None` when the layer has none.
    b_qkv: Option<Vec<f32>>,
    /// `[heads·head_dim_v, d_out]` and its bias.
    w_o: Option<(Vec<f32>, Option<Vec<f32>>)>,
}

impl CpuAttention {
    /// Checks `weights` against `config` (as [`AttentionWeights::validate`]) and packs them.
    pub fn new(config: &AttentionConfig, weights: &AttentionWeights) -> Result<Self> {
        weights.validate(config)?;
        let (dm, h) = (config.d_model, config.heads);
        let qk = h * config.head_dim;
        let width = 2 * qk + h * config.head_dim_v;
        let mut w_qkv = Vec::with_capacity(dm * width);
        for row in 0..dm {
            for (w, cols) in [
                (&weights.w_q, qk),
                (&weights.w_k, qk),
                (&weights.w_v, width - 2 * qk),
            ] {
                w_qkv.extend_from_slice(&w.data()[row * cols..(row + 1) * cols]);
            }
        }
        let biases = [
            (&weights.b_q, qk),
            (&weights.b_k, qk),
            (&weights.b_v, width - 2 * qk),
        ];
        let b_qkv = biases.iter().any(|(b, _)| b.is_some()).then(|| {
            biases
                .iter()
                .flat_map(|(b, cols)| match b {
                    Some(b) => b.data().to_vec(),
                    None => vec![0.0; *cols],
                })
                .collect()
        });
        let w_o = weights.w_o.as_ref().map(|w| {
            (
                w.data().to_vec(),
                weights.b_o.as_ref().map(|b| b.data().to_vec()),
            )
        });
        Ok(CpuAttention {
            config: config.clone(),
            w_qkv,
            b_qkv,
            w_o,
        })
    }

    /// The configuration the layer was built for.
    pub fn config(&self) -> &AttentionConfig {
        &self.config
    }

    /// Runs the layer on `inputs` (checked as [`AttentionInputs::validate`]) and returns the
    /// output `[batch, seq, d_out]`.
    pub fn run(&self, inputs: &AttentionInputs) -> Result<Tensor> {
        let c = &self.config;
        inputs.validate(c)?;
        let shape = AttentionShape::of(c);
        shape.validate()?;
        let rows = c.batch * c.seq_len;
        let (qk, hv) = (c.heads * c.head_dim, c.heads * c.head_dim_v);
        let width = 2 * qk + hv;
        let too_big =
            || Error::InvalidConfig(format!("{c:?} needs more memory than can be addressed"));
        let qkv_len = rows.checked_mul(width).ok_or_else(too_big)?;
        let out_len = rows.checked_mul(c.d_out()).ok_or_else(too_big)?;

        let mut qkv = vec![0.0; qkv_len];
        if let Some(bias) = &self.b_qkv {
            qkv.chunks_exact_mut(width)
                .for_each(|row| row.copy_from_slice(bias));
        }
        matmul(
            Gemm {
                m: rows,
                n: width,
                k: c.d_model,
                scale: 1.0,
                accumulate: self.b_qkv.is_some(),
            },
            Mat::row_major(&mut qkv, width),
            Mat::row_major(inputs.x.data(), c.d_model),
            Mat::row_major(&self.w_qkv, width),
            Parallelism::Rayon(0),
        );

        let view = |offset: usize| View {
            data: &qkv[offset..],
            batch_stride: c.seq_len * width,
            head_stride: c.head_dim,
            row_stride: width,
        };
        let mut attended = vec![0.0; rows * hv];
        let mask = inputs.key_mask.as_ref().map(|m| m.data());
        let mut v = view(2 * qk);
        v.head_stride = c.head_dim_v;
        attention_core(&shape, view(0), view(qk), v, mask, &mut attended);

        let output = match &self.w_o {
            None => attended,
            Some((w_o, b_o)) => {
                let d_out = c.d_out();
                let mut out = vec![0.0; out_len];
                if let Some(b) = b_o {
                    out.chunks_exact_mut(d_out)
                        .for_each(|row| row.copy_from_slice(b));
                }
                matmul(
                    Gemm {
                        m: rows,
                        n: d_out,
                        k: hv,
                        scale: 1.0,
                        accumulate: b_o.is_some(),
                    },
                    Mat::row_major(&mut out, d_out),
                    Mat::row_major(&attended, hv),
                    Mat::row_major(w_o, d_out),
                    Parallelism::Rayon(0),
                );
                out
            }
        };
        Tensor::new(c.output_shape().to_vec(), output)
    }
}
