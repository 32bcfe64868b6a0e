//! Host side of `scores.wgsl`: the scaled, masked score matrix.

use super::Layout;
use super::{Columns, DispatchSpec, Kernel, MatmulTiles};

/// Uniform parameters; the layout of `ScoreParams` in `scores.wgsl`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
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
    _pad: [u32; 3],
}

/// Scores of every (batch, head) in one dispatch.
pub(crate) fn spec(l: &Layout, limits: &wgpu::Limits) -> DispatchSpec {
    let tiles = MatmulTiles::for_shape(l.seq, l.seq, Columns::Keys, limits);
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
        _pad: [0; 3],
    };
    DispatchSpec {
        kernel: Kernel::Scores,
        overrides: tiles.overrides("DK"),
        params: bytemuck::bytes_of(&params).to_vec(),
        workgroups: total_tiles,
        flops: 2.0 * (l.batch * l.heads) as f64 * l.seq as f64 * l.seq as f64 * l.dp as f64,
    }
}
