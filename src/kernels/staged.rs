//! Host side of the staged attention kernels (`scores.wgsl`, `softmax.wgsl`,
//! `weighted_sum.wgsl`, sharing `staged_io.wgsl`): their common parameters, their tile shapes
//! chosen for an attention's maximum lengths and the device's limits, and each call's grid.
//!
//! The staged path computes what the fused kernel does in three dispatches through a score
//! matrix `[batch, heads, q_len, kvp]` (kvp = kv_len rounded up to a multiple of 4), which can be
//! read back; each kernel binds three storage buffers, so it runs on downlevel devices (four).

use super::fused::FusedGeometry;
use super::variants::{Distinct, sizes};
use super::{Columns, MatmulTiles, Overrides, pad4, uniform_params};

uniform_params! {
    /// Uniform parameters of all three kernels; `StagedParams` in `staged_io.wgsl`.
    struct StagedParams {
        batch: u32,
        heads: u32,
        kv_heads: u32,
        group: u32,
        head_dim: u32,
        head_dim_v: u32,
        dp4: u32,
        dvp4: u32,
        causal: u32,
        has_mask: u32,
        has_bias: u32,
        bias_b: u32,
        bias_h: u32,
        scale: f32,
        q_offset: u32,
        q_sb: u32,
        q_sbc: u32,
        q_sh: u32,
        q_shc: u32,
        q_si: u32,
        k_offset: u32,
        k_sb: u32,
        k_sbc: u32,
        k_sh: u32,
        k_shc: u32,
        k_si: u32,
        v_offset: u32,
        v_sb: u32,
        v_sbc: u32,
        v_sh: u32,
        v_shc: u32,
        v_si: u32,
        o_offset: u32,
        o_sb: u32,
        o_sbc: u32,
        o_sh: u32,
        o_shc: u32,
        o_si: u32,
        _pad0: u32,
        _pad1: u32,
    }
}

impl StagedParams {
    /// The parameters of `g`: the same geometry, strides and bias broadcast the fused kernel
    /// reads.
    pub fn new(g: &FusedGeometry) -> Self {
        // The bias's batch index step (in q_len kv_len blocks; 0 = broadcast) and head step.
        let (bias_b, bias_h) = match g.bias {
            Some((per_batch, per_head)) => {
                let hb = if per_head { g.heads } else { 1 };
                (if per_batch { hb } else { 0 }, per_head as u32)
            }
            None => (0, 0),
        };
        let (q, k, v, o) = (g.q, g.k, g.v, g.out);
        StagedParams {
            batch: g.batch,
            heads: g.heads,
            kv_heads: g.kv_heads,
            group: g.group(),
            head_dim: g.head_dim,
            head_dim_v: g.head_dim_v,
            dp4: g.head_dim.div_ceil(4),
            dvp4: g.head_dim_v.div_ceil(4),
            causal: g.causal as u32,
            has_mask: g.has_mask as u32,
            has_bias: g.bias.is_some() as u32,
            bias_b,
            bias_h,
            scale: g.scale,
            q_offset: q.offset,
            q_sb: q.sb,
            q_sbc: q.sbc,
            q_sh: q.sh,
            q_shc: q.shc,
            q_si: q.si,
            k_offset: k.offset,
            k_sb: k.sb,
            k_sbc: k.sbc,
            k_sh: k.sh,
            k_shc: k.shc,
            k_si: k.si,
            v_offset: v.offset,
            v_sb: v.sb,
            v_sbc: v.sbc,
            v_sh: v.sh,
            v_shc: v.shc,
            v_si: v.si,
            o_offset: o.offset,
            o_sb: o.sb,
            o_sbc: o.sbc,
            o_sh: o.sh,
            o_shc: o.shc,
            o_si: o.si,
            _pad0: 0,
            _pad1: 0,
        }
    }
}

/// The three kernels' override constants for one attention, chosen for its maximum lengths.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct StagedTiles {
    /// `scores.wgsl`: 8 TY packed rows by 8 TX keys per workgroup, DK deep.
    pub scores: MatmulTiles,
    /// `softmax.wgsl`: invocations per row.
    pub softmax: u32,
    /// `weighted_sum.wgsl`: 8 TY packed rows by 4 TX NV value columns, TK deep.
    pub sum: MatmulTiles,
}

impl StagedTiles {
    /// Tiles for up to `rows` packed rows (group · q_len) over up to `keys` keys, value heads
    /// `dvp` wide (padded): each kernel's shape narrowed to the work and shrunk to the device.
    pub fn choose(rows: u32, keys: u32, dvp: u32, limits: &wgpu::Limits) -> Self {
        StagedTiles {
            scores: score_tiles(rows, keys, limits),
            softmax: softmax_size(pad4(keys), limits),
            sum: sum_tiles(rows, dvp, limits),
        }
    }

    /// Workgroups of each kernel for a call of `q_len` queries over `kv_len` keys: tiles of
    /// every (batch, kv head) matrix, one per score row, tiles of every matrix's output.
    pub fn workgroups(&self, g: &FusedGeometry, q_len: u32, kv_len: u32) -> [u32; 3] {
        let rows = g.group() * q_len;
        let mats = g.batch * g.kv_heads;
        let s = &self.scores;
        let w = &self.sum;
        [
            rows.div_ceil(s.tile_m()) * kv_len.div_ceil(s.keys()) * mats,
            g.batch * g.heads * q_len,
            rows.div_ceil(w.tile_m()) * g.head_dim_v.div_ceil(4).div_ceil(w.groups()) * mats,
        ]
    }

    /// The arithmetic of each kernel for a call, which sizes submissions.
    pub fn flops(g: &FusedGeometry, q_len: u32, kv_len: u32) -> [f64; 3] {
        let pairs = (g.batch * g.heads) as f64 * q_len as f64 * kv_len as f64;
        // Causal tiles past every row's limit are skipped: about half the products.
        let visited = if g.causal { 0.5 } else { 1.0 };
        [
            2.0 * pairs * pad4(g.head_dim) as f64 * visited,
            // A maximum, an exp, a sum and a division per score; few but costly.
            5.0 * pairs,
            2.0 * pairs * pad4(g.head_dim_v) as f64 * visited,
        ]
    }

    /// Each kernel's override constants, in dispatch order.
    pub fn overrides(&self) -> [Overrides; 3] {
        [
            self.scores.overrides("DK"),
            vec![("WG", self.softmax as f64)],
            self.sum.overrides("TK"),
        ]
    }
}

/// The score kernel's tiles for `rows` packed rows by `keys` keys.
pub(super) fn score_tiles(rows: u32, keys: u32, limits: &wgpu::Limits) -> MatmulTiles {
    MatmulTiles::for_shape(rows, keys, Columns::Keys, limits)
}

/// The weighted sum's tiles for `rows` packed rows by `dvp` value columns.
pub(super) fn sum_tiles(rows: u32, dvp: u32, limits: &wgpu::Limits) -> MatmulTiles {
    MatmulTiles::for_shape(rows, dvp, Columns::Vec4Groups, limits)
}

/// Invocations per softmax row of `kvp` scores: about eight vec4 each, so that the reduction
/// (log2 WG barrier steps through workgroup memory) stays small beside the row it reduces. A
/// power of two, 8 to 256, halved to fit the device.
pub(super) fn softmax_size(kvp: u32, limits: &wgpu::Limits) -> u32 {
    let mut wg = (kvp / 4).div_ceil(8).next_power_of_two().clamp(8, 256);
    while wg > 1
        && (wg > limits.max_compute_invocations_per_workgroup
            || wg > limits.max_compute_workgroup_size_x)
    {
        wg /= 2;
    }
    wg
}

/// Every override set of the score kernel under `limits`: rows and keys count only through
/// `rows_per_eight` and the key tiling, which change at powers of two up to 64.
pub(crate) fn score_override_sets(limits: &wgpu::Limits) -> Vec<Overrides> {
    let mut seen = Distinct::default();
    for rows in sizes(1) {
        for keys in sizes(1) {
            seen.add(score_tiles(rows, keys, limits));
        }
    }
    seen.overrides(|t| t.overrides("DK"))
}

/// Every override set of the softmax under `limits`: one per padded row length.
pub(crate) fn softmax_override_sets(limits: &wgpu::Limits) -> Vec<Overrides> {
    let mut seen = Distinct::default();
    for kvp in sizes(4) {
        seen.add(softmax_size(kvp, limits));
    }
    seen.overrides(|wg| vec![("WG", wg as f64)])
}

/// Every override set of the weighted sum under `limits`: any number of packed rows by any
/// padded value head width.
pub(crate) fn sum_override_sets(limits: &wgpu::Limits) -> Vec<Overrides> {
    let mut seen = Distinct::default();
    for rows in sizes(1) {
        for dvp in sizes(4) {
            seen.add(sum_tiles(rows, dvp, limits));
        }
    }
    seen.overrides(|t| t.overrides("TK"))
}
