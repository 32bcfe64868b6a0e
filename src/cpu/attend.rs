//! The fast CPU path's attention core: one rayon job per (batch row, head, block of queries),
//! each walking the keys in chunks with an online softmax (see the module above for why).

use gemm::Parallelism;
use rayon::prelude::*;

use super::exp::{Isa, ScoreBlock};
use super::matmul::{Gemm, Mat, matmul};
use super::{AttentionShape, KEY_BLOCK, QUERY_BLOCK};

/// Where queries, keys or values live: element `(b, h, t, d)` is at
/// `b·batch_stride + h·head_stride + t·row_stride + d`.
#[derive(Clone, Copy)]
pub(super) struct View<'a> {
    pub(super) data: &'a [f32],
    pub(super) batch_stride: usize,
    pub(super) head_stride: usize,
    pub(super) row_stride: usize,
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
pub(super) fn attention_core(
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
