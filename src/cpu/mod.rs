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

mod exp;
mod matmul;

use gemm::Parallelism;
use rayon::prelude::*;

use exp::{Isa, ScoreBlock};
use matmul::{Gemm, Mat, matmul};

use crate::config::AttentionConfig;
use crate::error::{Error, Result, Shape};
use crate::tensor::{Tensor, unravel};
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

/// The product of `dims`, or `None` past `usize`.
fn checked_len(dims: &[usize]) -> Option<usize> {
    dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

fn check_input(name: &str, data: &[f32], dims: &[usize]) -> Result<()> {
    // `validate` has made sure the product fits.
    let expected = checked_len(dims).unwrap_or(usize::MAX);
    if data.len() != expected {
        return Err(Error::DataLength {
            name: name.to_string(),
            shape: Shape(dims.to_vec()),
            expected,
            actual: data.len(),
        });
    }
    match first_non_finite(data) {
        None => Ok(()),
        Some(i) => Err(Error::NonFinite {
            name: name.to_string(),
            index: Shape(unravel(dims, i)),
            value: data[i],
        }),
    }
}

/// Index of the first NaN or infinity. The all-finite case, the common one, is an OR over
/// chunks that vectorises; only a failing chunk is searched element by element.
fn first_non_finite(data: &[f32]) -> Option<usize> {
    const CHUNK: usize = 1024;
    data.chunks(CHUNK).enumerate().find_map(|(c, chunk)| {
        let bad = chunk.iter().fold(false, |acc, x| acc | !x.is_finite());
        if bad {
            chunk
                .iter()
                .position(|x| !x.is_finite())
                .map(|i| c * CHUNK + i)
        } else {
            None
        }
    })
}

fn check_mask(mask: &[f32], dims: [usize; 2]) -> Result<()> {
    let expected = dims[0] * dims[1];
    if mask.len() != expected {
        return Err(Error::DataLength {
            name: "key_mask".to_string(),
            shape: Shape(dims.to_vec()),
            expected,
            actual: mask.len(),
        });
    }
    match mask.iter().position(|&m| m != 0.0 && m != 1.0) {
        None => Ok(()),
        Some(i) => Err(Error::InvalidMask {
            index: Shape(unravel(&dims, i)),
            value: mask[i],
        }),
    }
}

/// Where queries, keys or values live: element `(b, h, t, d)` is at
/// `b·batch_stride + h·head_stride + t·row_stride + d`.
#[derive(Clone, Copy)]
struct View<'a> {
    data: &'a [f32],
    batch_stride: usize,
    head_stride: usize,
    row_stride: usize,
}

impl<'a> View<'a> {
    /// Rows `t..` of head `h` in batch row `b`, as a matrix with unit column stride.
    fn rows(&self, b: usize, h: usize, t: usize) -> Mat<&'a [f32]> {
        let start = b * self.batch_stride + h * self.head_stride + t * self.row_stride;
        Mat::row_major(&self.data[start..], self.row_stride)
    }
}

/// Per-task memory of the attention core, reused from one job to the next.
struct Scratch {
    /// Scores, then probabilities, of one query block against one key chunk.
    s: Vec<f32>,
    /// The block's output `[rows, head_dim_v]`, unnormalised until the last chunk.
    o: Vec<f32>,
    /// Running row maximum of the scaled scores.
    max: Vec<f32>,
    /// Running row sum of `exp(score - max)`.
    sum: Vec<f32>,
    /// Factor by which each row's earlier output must shrink after this chunk raised its max.
    corr: Vec<f32>,
}

impl Scratch {
    fn new(rows: usize, cols: usize, dv: usize) -> Self {
        Scratch {
            s: vec![0.0; rows * cols],
            o: vec![0.0; rows * dv],
            max: vec![0.0; rows],
            sum: vec![0.0; rows],
            corr: vec![0.0; rows],
        }
    }
}

/// One task of the attention core: a block of queries of one head in one batch row.
struct Job<'o> {
    b: usize,
    h: usize,
    /// First query of the block.
    q0: usize,
    /// The block's rows of this head in the output, `head_dim_v` wide each.
    out: Vec<&'o mut [f32]>,
}

/// `out` `[batch, seq, heads·head_dim_v]` = attention of `q`, `k`, `v`. Inputs are checked.
fn attention_core(
    shape: &AttentionShape,
    q: View,
    k: View,
    v: View,
    key_mask: Option<&[f32]>,
    out: &mut [f32],
) {
    let (n, h, dv) = (shape.seq, shape.heads, shape.head_dim_v);
    let row_len = h * dv;
    let bq = QUERY_BLOCK.min(n);
    let bk = KEY_BLOCK.min(n);
    // A head's output columns are strided in `out`; handing each job its own row pieces keeps
    // the jobs independent (any number of them per batch row and head, for load balance)
    // without shared mutable state.
    let mut jobs = Vec::with_capacity(shape.batch * h * n.div_ceil(bq));
    for (b, out_b) in out.chunks_mut(n * row_len).enumerate() {
        for (block, out_blk) in out_b.chunks_mut(bq * row_len).enumerate() {
            let mut heads: Vec<Job> = (0..h)
                .map(|h| Job {
                    b,
                    h,
                    q0: block * bq,
                    out: Vec::with_capacity(bq),
                })
                .collect();
            for row in out_blk.chunks_mut(row_len) {
                for (job, piece) in heads.iter_mut().zip(row.chunks_mut(dv)) {
                    job.out.push(piece);
                }
            }
            jobs.extend(heads);
        }
    }
    if shape.causal {
        // Later blocks see more keys: start them first so the short ones fill the tail.
        jobs.sort_by_key(|job| std::cmp::Reverse(job.q0));
    }
    let ctx = Core {
        shape,
        isa: Isa::detect(),
        q,
        k,
        v,
        key_mask,
        bk,
    };
    jobs.into_par_iter().for_each_init(
        || Scratch::new(bq, bk, dv),
        |scratch, job| ctx.run(job, scratch),
    );
}

/// What every job of one attention call shares.
struct Core<'a> {
    shape: &'a AttentionShape,
    isa: Isa,
    q: View<'a>,
    k: View<'a>,
    v: View<'a>,
    key_mask: Option<&'a [f32]>,
    /// Keys per online-softmax step.
    bk: usize,
}

impl Core<'_> {
    fn run(&self, job: Job, scratch: &mut Scratch) {
        let shape = self.shape;
        let (b, h, q0) = (job.b, job.h, job.q0);
        let (d, dv, n) = (shape.head_dim, shape.head_dim_v, shape.seq);
        let rows = job.out.len();
        // Keys after the block's last query get weight 0 in every causal row: skip them.
        let key_end = if shape.causal { q0 + rows } else { n };
        let mask = self.key_mask.map(|m| &m[b * n..(b + 1) * n]);
        let o = &mut scratch.o[..rows * dv];
        scratch.max[..rows].fill(f32::NEG_INFINITY);
        scratch.sum[..rows].fill(0.0);

        for k0 in (0..key_end).step_by(self.bk) {
            let cols = self.bk.min(key_end - k0);
            let keys = self.k.rows(b, h, k0);
            matmul(
                Gemm {
                    m: rows,
                    n: cols,
                    k: d,
                    scale: shape.scale,
                    accumulate: false,
                },
                Mat::row_major(&mut scratch.s[..], cols),
                self.q.rows(b, h, q0),
                // Kᵀ: element (i, j) is key j's coordinate i.
                Mat {
                    data: keys.data,
                    rs: 1,
                    cs: keys.rs,
                },
                Parallelism::None,
            );
            self.isa.softmax_step(ScoreBlock {
                s: &mut scratch.s[..rows * cols],
                cols,
                first_query: q0,
                first_key: k0,
                causal: shape.causal,
                mask: mask.map(|m| &m[k0..k0 + cols]),
                max: &mut scratch.max[..rows],
                sum: &mut scratch.sum[..rows],
                corr: &mut scratch.corr[..rows],
            });
            if k0 > 0 {
                for (o_row, &c) in o.chunks_exact_mut(dv).zip(&scratch.corr[..rows]) {
                    if c != 1.0 {
                        o_row.iter_mut().for_each(|x| *x *= c);
                    }
                }
            }
            matmul(
                Gemm {
                    m: rows,
                    n: dv,
                    k: cols,
                    scale: 1.0,
                    accumulate: k0 > 0,
                },
                Mat::row_major(&mut *o, dv),
                Mat::row_major(&scratch.s[..], cols),
                self.v.rows(b, h, k0),
                Parallelism::None,
            );
        }
        for ((dst, o_row), &sum) in job
            .out
            .into_iter()
            .zip(o.chunks_exact(dv))
            .zip(&scratch.sum)
        {
            // A row with every key masked has sum 0 and all-zero probabilities: it stays 0.
            let inv = if sum > 0.0 { 1.0 / sum } else { 0.0 };
            dst.iter_mut().zip(o_row).for_each(|(d, &x)| *d = x * inv);
        }
    }
}
