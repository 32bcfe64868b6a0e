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

use gemm::Parallelism;
use rayon::prelude::*;

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

/// A matrix in a slice: element `(i, j)` at `i·rs + j·cs`.
struct Mat<T> {
    data: T,
    rs: usize,
    cs: usize,
}

impl<T> Mat<T> {
    /// Rows `rs` apart, columns adjacent.
    fn row_major(data: T, rs: usize) -> Self {
        Mat { data, rs, cs: 1 }
    }
}

/// Sizes and factors of `dst[m×n] = scale · lhs[m×k] · rhs[k×n] (+ dst if accumulate)`.
struct Gemm {
    m: usize,
    n: usize,
    k: usize,
    scale: f32,
    accumulate: bool,
}

/// The one door to `gemm::gemm`: checks that every element the product touches lies inside its
/// slice, which is what makes the raw-pointer call sound.
fn matmul(g: Gemm, dst: Mat<&mut [f32]>, lhs: Mat<&[f32]>, rhs: Mat<&[f32]>, par: Parallelism) {
    if g.m == 0 || g.n == 0 {
        return;
    }
    let last = |rows: usize, cols: usize, rs: usize, cs: usize| (rows - 1) * rs + (cols - 1) * cs;
    // Callers derive every extent from validated shapes; a failure here is a bug in this module.
    // Rows of `dst` must not overlap: the parallel GEMM writes them from several threads.
    assert!(
        dst.cs == 1 && (g.m == 1 || dst.rs >= g.n),
        "gemm dst rows overlap"
    );
    assert!(
        last(g.m, g.n, dst.rs, dst.cs) < dst.data.len(),
        "gemm dst out of bounds"
    );
    if g.k > 0 {
        assert!(
            last(g.m, g.k, lhs.rs, lhs.cs) < lhs.data.len(),
            "gemm lhs out of bounds"
        );
        assert!(
            last(g.k, g.n, rhs.rs, rhs.cs) < rhs.data.len(),
            "gemm rhs out of bounds"
        );
    }
    let s = |x: usize| x as isize;
    // SAFETY: the asserts above keep every access of the m×n×k product inside the three
    // slices and every element of `dst` distinct; `dst` is borrowed mutably, so it cannot
    // alias `lhs` or `rhs`; gemm reads `dst` only when `accumulate` is set, and writes nothing
    // else.
    unsafe {
        gemm::gemm(
            g.m,
            g.n,
            g.k,
            dst.data.as_mut_ptr(),
            s(dst.cs),
            s(dst.rs),
            g.accumulate,
            lhs.data.as_ptr(),
            s(lhs.cs),
            s(lhs.rs),
            rhs.data.as_ptr(),
            s(rhs.cs),
            s(rhs.rs),
            1.0,
            g.scale,
            false,
            false,
            false,
            par,
        );
    }
}

/// One online-softmax step: scaled scores of a query block against a chunk of keys, turned into
/// unnormalised probabilities in place, with the rows' running max and sum brought up to date.
struct ScoreBlock<'a> {
    /// `[rows, cols]` scores in, `exp(score - max)` out (0 where masked).
    s: &'a mut [f32],
    cols: usize,
    /// Position of row 0 in the sequence.
    first_query: usize,
    /// Position of column 0 in the sequence.
    first_key: usize,
    causal: bool,
    /// The chunk's key mask, `[cols]`.
    mask: Option<&'a [f32]>,
    max: &'a mut [f32],
    sum: &'a mut [f32],
    /// Out: `exp(old max - new max)` per row, the factor for earlier chunks' contributions.
    corr: &'a mut [f32],
}

/// Lanes of the accumulators in the row loops: two AVX2 registers, so consecutive additions
/// into the running sum do not wait on each other.
const LANES: usize = 16;

/// The softmax step, written so LLVM vectorises its row loops; inlined into each target-feature
/// variant. `FMA` selects fused multiply-adds in [`exp_shifted`] (a library call without
/// hardware FMA, so the baseline does without).
#[inline(always)]
fn softmax_step_impl<const FMA: bool>(blk: ScoreBlock) {
    let cols = blk.cols;
    for (r, row) in blk.s.chunks_exact_mut(cols).enumerate() {
        let allowed = if blk.causal {
            (blk.first_query + r + 1)
                .saturating_sub(blk.first_key)
                .min(cols)
        } else {
            cols
        };
        let (live, dead) = row.split_at_mut(allowed);
        dead.fill(0.0);
        let chunk_max = match blk.mask {
            Some(mask) => mask_and_max(live, &mask[..allowed]),
            None => max_of(live),
        };
        let old = blk.max[r];
        let new = if chunk_max > old { chunk_max } else { old };
        if new == f32::NEG_INFINITY {
            // Nothing allowed so far: no maximum to subtract, every weight is 0.
            live.fill(0.0);
            blk.corr[r] = 1.0;
            continue;
        }
        let sum = exp_shifted_sum::<FMA>(live, new);
        let corr = if old == new {
            1.0
        } else {
            exp_shifted::<FMA>(old - new)
        };
        blk.corr[r] = corr;
        blk.sum[r] = blk.sum[r] * corr + sum;
        blk.max[r] = new;
    }
}

#[inline(always)]
fn max_of(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a = if x > *a { x } else { *a };
        }
    }
    let tail = chunks.remainder().iter().copied();
    acc.into_iter()
        .chain(tail)
        .fold(f32::NEG_INFINITY, f32::max)
}

/// Sets masked-out scores to `-inf` and returns the maximum.
#[inline(always)]
fn mask_and_max(xs: &mut [f32], mask: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = xs.chunks_exact_mut(LANES);
    let mut masks = mask.chunks_exact(LANES);
    for (c, m) in (&mut chunks).zip(&mut masks) {
        for ((a, x), &m) in acc.iter_mut().zip(c).zip(m) {
            *x = if m == 0.0 { f32::NEG_INFINITY } else { *x };
            *a = if *x > *a { *x } else { *a };
        }
    }
    let mut max = acc.into_iter().fold(f32::NEG_INFINITY, f32::max);
    for (x, &m) in chunks.into_remainder().iter_mut().zip(masks.remainder()) {
        if m == 0.0 {
            *x = f32::NEG_INFINITY;
        }
        max = max.max(*x);
    }
    max
}

/// `x ← exp(x - shift)` over the slice; returns the sum.
#[inline(always)]
fn exp_shifted_sum<const FMA: bool>(xs: &mut [f32], shift: f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let mut chunks = xs.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for (a, x) in acc.iter_mut().zip(c) {
            *x = exp_shifted::<FMA>(*x - shift);
            *a += *x;
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for x in chunks.into_remainder() {
        *x = exp_shifted::<FMA>(*x - shift);
        sum += *x;
    }
    sum
}

/// `exp(x)` in f32 for the softmax's shifted scores, `x <= 0`: Cody-Waite range reduction and
/// Cephes' degree-6 polynomial, branch-free so that loops over it vectorise.
///
/// Accuracy: for `-87.3 <= x <= 88` the relative error is below `f32::EPSILON` (1.2e-7;
/// measured worst 0.82·ε with FMA, 0.78·ε without, on a 2-million-point grid), i.e. within
/// 1 ulp. Below -87.3 it returns 0 (the true value is under 1.3e-38, so that is also the
/// absolute error); `-inf` gives 0 and NaN gives NaN. Above 88 the result is wrong: the
/// softmax never gets there (it subtracts the row maximum first), and leaving out the clamp
/// for it saves work in the loop that dominates the softmax. The unit tests hold every
/// compiled variant to these bounds against f64 `exp`.
#[inline(always)]
fn exp_shifted<const FMA: bool>(x: f32) -> f32 {
    // Keeps n >= -126, so that 2^n below is a normal number.
    const LO: f32 = -87.3;
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that n·LN2_HI is exact for |n| <= 512.
    const LN2_HI: f32 = 355.0 / 512.0;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5·2^23: adding it rounds to the nearest integer, which lands in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let fma = |a: f32, b: f32, c: f32| if FMA { a.mul_add(b, c) } else { a * b + c };

    let xc = if x < LO { LO } else { x };
    let t = fma(xc, LOG2E, ROUND);
    let n = t - ROUND;
    let r = fma(n, -LN2_LO, fma(n, -LN2_HI, xc));
    let mut p = 1.987_569_1e-4;
    p = fma(p, r, 1.398_199_9e-3);
    p = fma(p, r, 8.333_452e-3);
    p = fma(p, r, 4.166_579_6e-2);
    p = fma(p, r, 1.666_666_5e-1);
    p = fma(p, r, 0.5);
    let y = fma(p, r * r, r) + 1.0;
    // t's low bits hold n (two's complement): shifting n + 127 into the exponent field builds
    // 2^n and drops ROUND's own bits off the top.
    let pow = f32::from_bits(t.to_bits().wrapping_add(127) << 23);
    if x < LO { 0.0 } else { y * pow }
}

/// The instruction sets the softmax is compiled for.
///
/// x86-64 gets an AVX2+FMA variant behind runtime detection: one binary runs on any x86-64
/// (no global `target-cpu`) and still uses what the CPU has. There is no AVX-512 variant: its
/// target feature needs Rust 1.89, past the crate's `rust-version`, and on the Zen 4 this was
/// measured on (which splits 512-bit operations in two) it was within noise of AVX2, while the
/// SSE2 baseline was about 20% slower on the whole attention core.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Isa {
    #[cfg(target_arch = "x86_64")]
    Avx2Fma,
    /// The build's own target (SSE2 on x86-64, NEON on aarch64).
    Baseline,
}

impl Isa {
    /// The best this CPU supports. `is_x86_feature_detected!` caches its answer, so this is
    /// cheap enough to call per run.
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return Isa::Avx2Fma;
        }
        Isa::Baseline
    }

    /// Every variant this CPU can run (for the tests).
    #[cfg(test)]
    fn available() -> Vec<Self> {
        let best = Isa::detect();
        if best == Isa::Baseline {
            vec![best]
        } else {
            vec![best, Isa::Baseline]
        }
    }

    fn softmax_step(self, blk: ScoreBlock) {
        match self {
            // SAFETY: `detect` returns this variant only when the CPU has AVX2 and FMA, the
            // features the function is compiled for.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2Fma => unsafe { x86::softmax_step_avx2(blk) },
            Isa::Baseline => softmax_step_impl::<false>(blk),
        }
    }

    /// `exp` of every element, with this variant's code (for the tests).
    #[cfg(test)]
    fn exp_in_place(self, xs: &mut [f32]) {
        match self {
            // SAFETY: as in `softmax_step`.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2Fma => unsafe { x86::exp_avx2(xs) },
            Isa::Baseline => xs.iter_mut().for_each(|x| *x = exp_shifted::<false>(*x)),
        }
    }
}

/// The softmax step compiled for AVX2 and FMA: the generic code inlined into a function with
/// those features enabled, so LLVM vectorises it 8 lanes wide with fused multiply-adds.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{ScoreBlock, softmax_step_impl};

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn softmax_step_avx2(blk: ScoreBlock) {
        softmax_step_impl::<true>(blk)
    }

    #[cfg(test)]
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn exp_avx2(xs: &mut [f32]) {
        xs.iter_mut()
            .for_each(|x| *x = super::exp_shifted::<true>(*x))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Worst error of a variant's exp against f64 over `[lo, hi]`, in units of
    /// `f32::EPSILON · |exp x|` (at most one ulp of the true value).
    fn worst_ulps(isa: Isa, lo: f64, hi: f64, steps: usize) -> (f64, f32) {
        let xs: Vec<f32> = (0..=steps)
            .map(|i| (lo + (hi - lo) * i as f64 / steps as f64) as f32)
            .collect();
        let mut got = xs.clone();
        isa.exp_in_place(&mut got);
        let mut worst = (0.0, 0.0);
        for (&x, &g) in xs.iter().zip(&got) {
            let want = (x as f64).exp();
            let ulp = (want as f32).abs() * f32::EPSILON;
            let err = (g as f64 - want).abs() / ulp as f64;
            if err > worst.0 {
                worst = (err, x);
            }
        }
        worst
    }

    #[test]
    fn exp_is_within_one_ulp_over_its_range() {
        for isa in Isa::available() {
            let (ulps, at) = worst_ulps(isa, -87.3, 88.0, 2_000_000);
            assert!(ulps <= 1.0, "{isa:?}: {ulps} ulp at x = {at}");
            // The softmax's own range, densely.
            let (ulps, at) = worst_ulps(isa, -20.0, 0.0, 1_000_000);
            assert!(ulps <= 1.0, "{isa:?}: {ulps} ulp at x = {at}");
        }
    }

    #[test]
    fn exp_edges() {
        for isa in Isa::available() {
            let mut xs = [
                0.0,
                -1e4,
                -87.4,
                -200.0,
                f32::NEG_INFINITY,
                f32::MIN,
                f32::NAN,
            ];
            isa.exp_in_place(&mut xs);
            assert_eq!(xs[0], 1.0, "{isa:?}");
            // Large negatives flush to 0, never NaN.
            assert_eq!(&xs[1..6], &[0.0; 5], "{isa:?}");
            assert!(xs[6].is_nan(), "{isa:?}");
            // Just above the flush threshold the value is tiny but still accurate.
            let mut x = [-87.29f32, -87.3];
            isa.exp_in_place(&mut x);
            for (got, at) in x.into_iter().zip([-87.29f32, -87.3]) {
                let want = (at as f64).exp();
                let err = (got as f64 - want).abs();
                assert!(
                    err <= want * f32::EPSILON as f64,
                    "{isa:?}: {got:e} vs {want:e}"
                );
            }
        }
    }

    /// Every variant's softmax step gives the same numbers as the baseline.
    #[test]
    fn softmax_variants_agree() {
        let (rows, cols) = (5, 37);
        let base: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919) % 113) as f32 * 0.37 - 20.0)
            .collect();
        let mask: Vec<f32> = (0..cols)
            .map(|j| if j % 5 == 3 { 0.0 } else { 1.0 })
            .collect();
        let run = |isa: Isa, causal: bool| {
            let mut s = base.clone();
            let (mut max, mut sum, mut corr) = (vec![1.5; rows], vec![2.0; rows], vec![0.0; rows]);
            isa.softmax_step(ScoreBlock {
                s: &mut s,
                cols,
                first_query: 30,
                first_key: 10,
                causal,
                mask: Some(&mask),
                max: &mut max,
                sum: &mut sum,
                corr: &mut corr,
            });
            (s, max, sum, corr)
        };
        for causal in [false, true] {
            let (s0, m0, l0, c0) = run(Isa::Baseline, causal);
            // Masked keys and causal ones after the query weigh exactly 0.
            for (r, row) in s0.chunks(cols).enumerate() {
                for (j, &p) in row.iter().enumerate() {
                    let allowed = mask[j] == 1.0 && (!causal || 10 + j <= 30 + r);
                    assert_eq!(p == 0.0, !allowed, "row {r} col {j} p {p}");
                }
                let want: f32 = row.iter().sum::<f32>() + 2.0 * c0[r];
                assert!(
                    (l0[r] - want).abs() <= 1e-5 * want,
                    "row {r}: {} vs {want}",
                    l0[r]
                );
                assert!(m0[r] >= 1.5);
            }
            for isa in Isa::available() {
                let (s, m, l, c) = run(isa, causal);
                assert_eq!(m, m0, "{isa:?}");
                for (a, b) in s
                    .iter()
                    .chain(&l)
                    .chain(&c)
                    .zip(s0.iter().chain(&l0).chain(&c0))
                {
                    assert!(
                        (a - b).abs() <= 4.0 * f32::EPSILON * b.abs(),
                        "{isa:?}: {a} vs {b}"
                    );
                }
            }
        }
    }
}
