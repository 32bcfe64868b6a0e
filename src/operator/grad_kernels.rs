//! The attention backward's three kernels as one unit, shared by the operator's backward and
//! the layer's ([`crate::AttentionPlan`] with gradients): one attention backward for both,
//! whatever buffers each binds.

use crate::error::Result;
use crate::kernels::backward::{self, BackwardTiles, PREP_ROWS};
use crate::kernels::{Kernel, Pipeline};

/// The three stages of a backward call, in dispatch order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GradStage {
    /// `D = rowsum(dO ∘ O)` beside the logsumexp.
    Prep,
    /// dK and dV.
    Kv,
    /// dQ.
    Q,
}

/// The compiled kernels and their tiles for one head geometry.
#[derive(Debug)]
pub(crate) struct GradKernels {
    prep: Pipeline,
    kv: Pipeline,
    q: Pipeline,
    kv_tiles: BackwardTiles,
    q_tiles: BackwardTiles,
}

impl GradKernels {
    /// Compiles (or reuses) the kernels for heads `head_dim` (queries, keys) and `head_dim_v`
    /// (values) wide, specialised for whether a key mask and a bias are read; refuses a device
    /// with too few storage buffers per stage by name.
    pub async fn new(
        ctx: &crate::GpuContext,
        head_dim: u32,
        head_dim_v: u32,
        mask: bool,
        bias: bool,
    ) -> Result<Self> {
        let limits = ctx.limits();
        for kernel in [Kernel::BackwardPrep, Kernel::BackwardKv, Kernel::BackwardQ] {
            kernel.check_storage_buffers(&limits, "; the attention backward")?;
        }
        let tiles = backward::tiles(head_dim, head_dim_v, &limits)?;
        let (kv_tiles, q_tiles) = (tiles, tiles);
        let cache = ctx.kernels();
        let prep = cache
            .pipeline(Kernel::BackwardPrep, &backward::prep_overrides())
            .await?;
        let kv = cache
            .pipeline(Kernel::BackwardKv, &kv_tiles.overrides(mask, bias))
            .await?;
        let q = cache
            .pipeline(Kernel::BackwardQ, &q_tiles.overrides(mask, bias))
            .await?;
        Ok(GradKernels {
            prep,
            kv,
            q,
            kv_tiles,
            q_tiles,
        })
    }

    /// Workgroups of `stage` for `batch` sequences of `heads` query heads over `kv_heads` kv
    /// heads, `nq` queries and `nk` keys.
    pub fn workgroups(
        &self,
        [batch, heads, kv_heads]: [u32; 3],
        nq: u32,
        nk: u32,
        stage: GradStage,
    ) -> u32 {
        match stage {
            GradStage::Prep => (batch * heads * nq).div_ceil(PREP_ROWS),
            GradStage::Kv => batch * kv_heads * nk.div_ceil(self.kv_tiles.bo),
            GradStage::Q => batch * heads * nq.div_ceil(self.q_tiles.bo),
        }
    }

    pub fn pipeline(&self, stage: GradStage) -> &Pipeline {
        match stage {
            GradStage::Prep => &self.prep,
            GradStage::Kv => &self.kv,
            GradStage::Q => &self.q,
        }
    }
}

/// Bytes of the backward's scratch buffer (`aux` in `shaders/attention_bwd.wgsl`): lse and D
/// for every query row, then the key mask.
pub(crate) fn scratch_bytes(batch: u64, heads: u64, max_q: u64, max_kv: u64) -> u64 {
    4 * (2 * batch * heads * max_q + batch * max_kv)
}

/// Where the key mask goes in the scratch buffer, in bytes, for a call of `rows` query rows
/// (batch · heads · q_len).
pub(crate) fn mask_offset(rows: u64) -> u64 {
    8 * rows
}

/// The arithmetic of a backward call over `pairs` (query, key) pairs of heads `d` and `dv`
/// wide: per visited pair, the dK/dV kernel forms q·k, dO·v and adds to dK and dV; the dQ
/// kernel forms q·k and dO·v again and adds to dQ.
pub(crate) fn flops(pairs: f64, causal: bool, d: f64, dv: f64) -> f64 {
    let visited = if causal { 0.5 } else { 1.0 };
    pairs * visited * (2.0 * (2.0 * d + 2.0 * dv) + 2.0 * (2.0 * d + dv))
}
