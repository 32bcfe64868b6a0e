//! Host side of `scores.wgsl`: the scaled, masked score matrix.

use super::Layout;
use super::variants::{Distinct, sizes};
use super::{Columns, DispatchSpec, Kernel, MatmulTiles, Overrides, uniform_params};

uniform_params! {
    /// Uniform parameters; the layout of `ScoreParams` in `scores.wgsl`.
    struct ScoreParams {
        seq: u32,
        seq_pad: u32,
        heads: u32,
        dp4: u32,
        q_offset4: u32,
        k_offset4: u32,
        tiles_n: u32,
        tiles_per_head: u32,
        total_tiles: u32,
        causal: u32,
        has_mask: u32,
        scale: f32,
        neg_inf: f32,
        _pad0: u32,
        _pad1: u32,
        _pad2: u32,
    }
}

/// Scores of every (batch, head) in one dispatch.
pub(crate) fn spec(l: &Layout, limits: &wgpu::Limits) -> DispatchSpec {
    let tiles = tiles(l.seq, limits);
    let tiles_n = l.seq.div_ceil(tiles.keys());
    let tiles_per_head = tiles_n * l.seq.div_ceil(tiles.tile_m());
    let total_tiles = tiles_per_head * l.batch * l.heads;
    let params = ScoreParams {
        seq: l.seq,
        seq_pad: l.seq_pad,
        heads: l.heads,
        dp4: l.dp / 4,
        q_offset4: l.q_offset / 4,
        k_offset4: l.k_offset / 4,
        tiles_n,
        tiles_per_head,
        total_tiles,
        causal: l.causal as u32,
        has_mask: l.has_mask as u32,
        scale: l.scale,
        neg_inf: f32::NEG_INFINITY,
        _pad0: 0,
        _pad1: 0,
        _pad2: 0,
    };
    DispatchSpec {
        kernel: Kernel::Scores,
        overrides: tiles.overrides("DK"),
        params: bytemuck::bytes_of(&params).to_vec(),
        workgroups: total_tiles,
        flops: 2.0 * (l.batch * l.heads) as f64 * l.seq as f64 * l.seq as f64 * l.dp as f64,
    }
}

/// The tiles of one head's `seq x seq` scores.
pub(super) fn tiles(seq: u32, limits: &wgpu::Limits) -> MatmulTiles {
    MatmulTiles::for_shape(seq, seq, Columns::Keys, limits)
}

/// Every override set `spec` can emit under `limits`: one per sequence length.
pub(crate) fn override_sets(limits: &wgpu::Limits) -> Vec<Overrides> {
    let mut tiles_seen = Distinct::default();
    for seq in sizes(1) {
        tiles_seen.add(tiles(seq, limits));
    }
    tiles_seen.overrides(|t| t.overrides("DK"))
}
