//! Host side of `weighted_sum.wgsl`: `P V` with the heads concatenated.

use super::Layout;
use super::variants::{Distinct, sizes};
use super::{Columns, DispatchSpec, Kernel, MatmulTiles, Overrides, uniform_params};

uniform_params! {
    /// Uniform parameters; the layout of `WeightedSumParams` in `weighted_sum.wgsl`.
    struct WeightedSumParams {
        seq: u32,
        seq_pad: u32,
        heads: u32,
        dvp4: u32,
        head_dim_v: u32,
        v_offset4: u32,
        out_stride: u32,
        tiles_n: u32,
        tiles_per_head: u32,
        total_tiles: u32,
        causal: u32,
        _pad0: u32,
    }
}

/// Every (batch, head) in one dispatch, written into `[batch, seq, heads * head_dim_v]`.
pub(crate) fn spec(l: &Layout, limits: &wgpu::Limits) -> DispatchSpec {
    let tiles = tiles(l.seq, l.dvp, limits);
    let tiles_n = (l.dvp / 4).div_ceil(tiles.groups());
    let tiles_per_head = tiles_n * l.seq.div_ceil(tiles.tile_m());
    let total_tiles = tiles_per_head * l.batch * l.heads;
    let params = WeightedSumParams {
        seq: l.seq,
        seq_pad: l.seq_pad,
        heads: l.heads,
        dvp4: l.dvp / 4,
        head_dim_v: l.head_dim_v,
        v_offset4: l.v_offset / 4,
        out_stride: l.heads * l.head_dim_v,
        tiles_n,
        tiles_per_head,
        total_tiles,
        causal: l.causal as u32,
        _pad0: 0,
    };
    DispatchSpec {
        kernel: Kernel::WeightedSum,
        overrides: tiles.overrides("TK"),
        params: bytemuck::bytes_of(&params).to_vec(),
        workgroups: total_tiles,
        flops: 2.0 * (l.batch * l.heads) as f64 * l.seq as f64 * l.seq as f64 * l.dvp as f64,
    }
}

/// The tiles of one head's `seq x dvp` output.
pub(super) fn tiles(seq: u32, dvp: u32, limits: &wgpu::Limits) -> MatmulTiles {
    MatmulTiles::for_shape(seq, dvp, Columns::Vec4Groups, limits)
}

/// Every override set `spec` can emit under `limits`: any sequence length by any padded value
/// head width.
pub(crate) fn override_sets(limits: &wgpu::Limits) -> Vec<Overrides> {
    let mut tiles_seen = Distinct::default();
    for seq in sizes(1) {
        for dvp in sizes(4) {
            tiles_seen.add(tiles(seq, dvp, limits));
        }
    }
    tiles_seen.overrides(|t| t.overrides("TK"))
}
