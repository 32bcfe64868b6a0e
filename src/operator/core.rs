//! The attention core shared by the operator and the layer, fused or staged: the kernels'
//! pipelines, their uniform parameters, the table of lengths that calls select by dynamic
//! offset, and (staged) the score matrix.

use crate::context::GpuContext;
use crate::error::{Error, Result};
use crate::gpu::{STORAGE, buffer, init_uniform, scoped_async};
use crate::kernels::fused::{FusedGeometry, FusedTiles};
use crate::kernels::staged::{StagedParams, StagedTiles};
use crate::kernels::{Kernel, Pipeline, pad4};

pub(crate) use super::lengths::LengthTable;

/// The fused kernel set up for one attention geometry and a range of lengths.
#[derive(Debug)]
pub(crate) struct Core {
    pub geometry: FusedGeometry,
    pub tiles: FusedTiles,
    pub pipeline: Pipeline,
    pub params: wgpu::Buffer,
    pub lengths: LengthTable,
}

impl Core {
    /// Compiles (or reuses) the pipeline for calls of `min_len ..= max_q` queries and up to
    /// `max_kv` keys, and makes the parameters and the length table.
    pub async fn new(
        ctx: &GpuContext,
        geometry: FusedGeometry,
        min_len: u32,
        max_q: u32,
        max_kv: u32,
    ) -> Result<Self> {
        let tiles = super::tune::tiles(ctx, &geometry, max_q, max_kv).await?;
        let pipeline = ctx
            .kernels()
            .pipeline(Kernel::Fused(geometry.io()), &tiles.overrides())
            .await?;
        let device = ctx.device();
        let (params, lengths) = scoped_async(device, "creating the attention parameters", || {
            (
                init_uniform(
                    device,
                    "fused attention",
                    bytemuck::bytes_of(&geometry.params()),
                ),
                LengthTable::new(device, min_len, max_q.max(max_kv)),
            )
        })
        .await?;
        Ok(Core {
            geometry,
            tiles,
            pipeline,
            params,
            lengths,
        })
    }

    /// The dynamic offsets of a call: q_len's entry, then kv_len's.
    pub fn offsets(&self, q_len: u32, kv_len: u32) -> [u32; 2] {
        [self.lengths.offset(q_len), self.lengths.offset(kv_len)]
    }

    /// Workgroups of a call with `q_len` queries.
    pub fn workgroups(&self, q_len: u32) -> u32 {
        self.geometry.workgroups(&self.tiles, q_len)
    }
}

/// The staged kernels (scores, softmax, weighted sum) set up for one attention geometry and a
/// range of lengths, with the score matrix they pass between them, sized for the maxima.
#[derive(Debug)]
pub(crate) struct StagedCore {
    pub geometry: FusedGeometry,
    pub tiles: StagedTiles,
    /// The score, softmax and weighted-sum pipelines, in dispatch order.
    pub pipelines: [Pipeline; 3],
    /// `StagedParams`, read by all three.
    pub params: wgpu::Buffer,
    pub lengths: LengthTable,
    /// Four bytes bound where there is no mask or bias: the softmax never reads them.
    pub absent: wgpu::Buffer,
    /// Unscaled `Q Kᵀ` `[batch, heads, q_len, kvp]` at a call's lengths (kvp: kv_len padded to
    /// a multiple of 4), from the start of the buffer.
    pub scores: wgpu::Buffer,
    /// The probabilities: a buffer of their own when intermediates are kept (the scores are
    /// copied there and the softmax runs on the copy), else `scores` again (in place).
    pub probs: wgpu::Buffer,
}

impl StagedCore {
    /// Compiles (or reuses) the three pipelines for calls of `min_len ..= max_q` queries over
    /// up to `max_kv` keys, and makes the parameters, the length table and the score matrix
    /// (two of them if `keep` asks for the scores to survive the softmax). A score matrix
    /// past the device's limits is refused by name before anything is allocated.
    pub async fn new(
        ctx: &GpuContext,
        geometry: FusedGeometry,
        min_len: u32,
        max_q: u32,
        max_kv: u32,
        keep: bool,
    ) -> Result<Self> {
        let limits = ctx.limits();
        let bytes = score_matrix_bytes(&geometry, max_q, max_kv, &limits)?;
        let tiles = StagedTiles::choose(
            geometry.group().saturating_mul(max_q),
            max_kv,
            pad4(geometry.head_dim_v),
            &limits,
        );
        let [o_scores, o_softmax, o_sum] = tiles.overrides();
        let kernels = ctx.kernels();
        let pipelines = [
            kernels
                .pipeline(Kernel::Scores(geometry.precision), &o_scores)
                .await?,
            kernels.pipeline(Kernel::Softmax, &o_softmax).await?,
            kernels
                .pipeline(Kernel::WeightedSum(geometry.precision), &o_sum)
                .await?,
        ];
        let device = ctx.device();
        let (params, lengths, absent, scores, probs) =
            scoped_async(device, "creating the staged attention's buffers", || {
                let scores = buffer(device, "scores", bytes, STORAGE);
                let probs = if keep {
                    buffer(device, "probs", bytes, STORAGE)
                } else {
                    scores.clone()
                };
                (
                    init_uniform(
                        device,
                        "staged attention",
                        bytemuck::bytes_of(&StagedParams::new(&geometry)),
                    ),
                    LengthTable::new(device, min_len, max_q.max(max_kv)),
                    buffer(device, "absent mask or bias", 4, STORAGE),
                    scores,
                    probs,
                )
            })
            .await?;
        Ok(StagedCore {
            geometry,
            tiles,
            pipelines,
            params,
            lengths,
            absent,
            scores,
            probs,
        })
    }

    /// Whether the scores survive the softmax (intermediates kept).
    pub fn keeps_scores(&self) -> bool {
        self.probs != self.scores
    }

    /// The dynamic offsets of a call: q_len's entry, then kv_len's.
    pub fn offsets(&self, q_len: u32, kv_len: u32) -> [u32; 2] {
        [self.lengths.offset(q_len), self.lengths.offset(kv_len)]
    }

    /// Workgroups of each kernel for a call.
    pub fn workgroups(&self, q_len: u32, kv_len: u32) -> [u32; 3] {
        self.tiles.workgroups(&self.geometry, q_len, kv_len)
    }

    /// The arithmetic of each kernel for a call.
    pub fn flops(&self, q_len: u32, kv_len: u32) -> [f64; 3] {
        StagedTiles::flops(&self.geometry, q_len, kv_len)
    }

    /// Bytes of the score matrix a call of these lengths fills.
    pub fn call_bytes(&self, q_len: u32, kv_len: u32) -> u64 {
        let g = &self.geometry;
        (g.batch * g.heads) as u64 * q_len as u64 * pad4(kv_len) as u64 * 4
    }
}

/// Bytes of the staged score matrix at the maximum lengths, or the limit it passes, named.
pub(crate) fn score_matrix_bytes(
    g: &FusedGeometry,
    max_q: u32,
    max_kv: u32,
    limits: &wgpu::Limits,
) -> Result<u64> {
    let elements = (g.batch as u64 * g.heads as u64) * max_q as u64 * pad4(max_kv) as u64;
    let bytes = (elements * 4).max(16);
    let what = format!(
        "the staged path's score matrix (batch {} x heads {} x {max_q} queries x {} keys, padded \
         to a multiple of 4) at {bytes} bytes",
        g.batch, g.heads, max_kv
    );
    for (limit, max, requested) in [
        (
            "max_storage_buffer_binding_size",
            limits.max_storage_buffer_binding_size,
            bytes,
        ),
        ("max_buffer_size", limits.max_buffer_size, bytes),
        ("u32 indexing", u32::MAX as u64, elements),
    ] {
        if requested > max {
            return Err(Error::LimitExceeded {
                limit,
                max,
                requested,
                what,
                hint: "; the staged path stores a score per query and key: use the fused kernel \
                       (KernelChoice::Fused, or Auto), whose memory grows linearly with the \
                       lengths, or smaller maximum lengths"
                    .into(),
            });
        }
    }
    Ok(bytes)
}
