//! Host side of `fused_attention.wgsl`: the FlashAttention-2 style kernel, with its tile shape
//! chosen to fit the device's workgroup memory and invocation limits.

use super::variants::{Distinct, sizes};
use super::{DispatchSpec, Kernel, Layout, Overrides, rows_per_eight, uniform_params};
use crate::error::{Error, Result};

uniform_params! {
    /// Uniform parameters; the layout of `FusedParams` in `fused_attention.wgsl`.
    struct FusedParams {
        seq: u32,
        heads: u32,
        dp4: u32,
        dvp4: u32,
        head_dim_v: u32,
        q_offset4: u32,
        k_offset4: u32,
        v_offset4: u32,
        out_stride: u32,
        q_blocks: u32,
        total_tiles: u32,
        causal: u32,
        has_mask: u32,
        scale: f32,
        _pad0: u32,
        _pad1: u32,
    }
}

/// The widest value head the kernel keeps in registers: 4 vec4 columns per row and invocation
/// across 16 invocations.
pub(crate) const MAX_HEAD_DIM_V: u32 = crate::config::FUSED_MAX_HEAD_DIM_V as u32;

/// The fused kernel's override constants (see the shader's opening comment).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct FusedTiles {
    pub tx: u32,
    pub ty: u32,
    pub nv: u32,
    pub dk: u32,
    pub vk: u32,
}

impl FusedTiles {
    /// Bytes of workgroup memory: the staging area, the P tile and the reduction rows.
    pub fn workgroup_bytes(&self) -> u32 {
        let rows = 8 * self.ty + 8 * self.tx;
        let stage = (rows * (self.dk / 4 + 1)).max(self.vk * self.tx * self.nv);
        let p_tile = 16 * self.ty * self.tx;
        let red = 2 * self.ty * self.tx;
        (stage + p_tile + red) * 16
    }

    /// Tiles for `seq` tokens, query/key heads `dp` wide and value heads `dvp` wide: up to 64 query rows by 64 keys, no
    /// more invocations than rows and keys to cover, enough column invocations that each holds
    /// at most 2 vec4 of a row (4 for heads past 128), then shrunk (fewer rows, shallower
    /// staging) until the device's workgroup memory and invocation limits are met.
    pub fn choose(seq: u32, dp: u32, dvp: u32, limits: &wgpu::Limits) -> Result<Self> {
        if dvp > MAX_HEAD_DIM_V {
            return Err(Error::LimitExceeded {
                limit: "fused kernel head_dim_v",
                max: MAX_HEAD_DIM_V as u64,
                requested: dvp as u64,
                what: "the value head width (padded to a multiple of 4)".into(),
                hint: "; use the staged kernels (KernelChoice::Staged)".into(),
            });
        }
        let tx = rows_per_eight(seq)
            .max(dvp.div_ceil(8).next_power_of_two())
            .clamp(1, 16);
        let nv = dvp.div_ceil(4 * tx).max(1);
        let mut smallest = u32::MAX;
        let mut ty = rows_per_eight(seq);
        while ty >= 1 {
            for (dk, vk) in [(16, 16), (16, 8), (8, 16), (8, 8), (8, 4), (4, 4)] {
                // Staging deeper than the head or wider than the block only moves zeros.
                if !(8 * tx).is_multiple_of(vk) || (dk > 4 && dk > dp) {
                    continue;
                }
                let t = FusedTiles { tx, ty, nv, dk, vk };
                smallest = smallest.min(t.workgroup_bytes());
                if t.workgroup_bytes() <= limits.max_compute_workgroup_storage_size
                    && tx * ty <= limits.max_compute_invocations_per_workgroup
                    && tx <= limits.max_compute_workgroup_size_x
                    && ty <= limits.max_compute_workgroup_size_y
                {
                    return Ok(t);
                }
            }
            ty /= 2;
        }
        Err(Error::LimitExceeded {
            limit: "max_compute_workgroup_storage_size",
            max: limits.max_compute_workgroup_storage_size as u64,
            requested: smallest as u64,
            what: "the fused kernel's smallest tiles".into(),
            hint: "; use the staged kernels (KernelChoice::Staged)".into(),
        })
    }

    /// Query rows per workgroup.
    pub fn rows(&self) -> u32 {
        8 * self.ty
    }

    pub(super) fn overrides(&self) -> Overrides {
        vec![
            ("TX", self.tx as f64),
            ("TY", self.ty as f64),
            ("NV", self.nv as f64),
            ("DK", self.dk as f64),
            ("VK", self.vk as f64),
        ]
    }
}

/// Every (batch, head, block of query rows) in one dispatch.
pub(crate) fn spec(l: &Layout, limits: &wgpu::Limits) -> Result<DispatchSpec> {
    let tiles = FusedTiles::choose(l.seq, l.dp, l.dvp, limits)?;
    let q_blocks = l.seq.div_ceil(tiles.rows());
    let total_tiles = q_blocks * l.batch * l.heads;
    let params = FusedParams {
        seq: l.seq,
        heads: l.heads,
        dp4: l.dp / 4,
        dvp4: l.dvp / 4,
        head_dim_v: l.head_dim_v,
        q_offset4: l.q_offset / 4,
        k_offset4: l.k_offset / 4,
        v_offset4: l.v_offset / 4,
        out_stride: l.heads * l.head_dim_v,
        q_blocks,
        total_tiles,
        causal: l.causal as u32,
        has_mask: l.has_mask as u32,
        scale: l.scale,
        _pad0: 0,
        _pad1: 0,
    };
    Ok(DispatchSpec {
        kernel: Kernel::Fused,
        overrides: tiles.overrides(),
        params: bytemuck::bytes_of(&params).to_vec(),
        workgroups: total_tiles,
        flops: {
            let full = 2.0 * (l.batch * l.heads) as f64 * l.seq as f64 * l.seq as f64;
            // Causal blocks above the diagonal are never visited: about half the work.
            let visited = if l.causal { 0.5 } else { 1.0 };
            full * (l.dp + l.dvp) as f64 * visited
        },
    })
}

/// Every override set `spec` can emit under `limits`: any sequence length, any padded query/key
/// head width and any padded value head width up to [`MAX_HEAD_DIM_V`]; shapes the kernel
/// refuses emit nothing.
pub(crate) fn override_sets(limits: &wgpu::Limits) -> Vec<Overrides> {
    let mut tiles = Distinct::default();
    for seq in sizes(1) {
        for dp in sizes(4) {
            for dvp in sizes(4).take_while(|&dvp| dvp <= MAX_HEAD_DIM_V) {
                if let Ok(t) = FusedTiles::choose(seq, dp, dvp, limits) {
                    tiles.add(t);
                }
            }
        }
    }
    tiles.overrides(|t| t.overrides())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_fit_the_default_limits_for_every_head_width() {
        let limits = wgpu::Limits::default();
        for seq in [1, 3, 17, 64, 1000] {
            for dvp in (4..=256).step_by(4) {
                let t = FusedTiles::choose(seq, 64, dvp, &limits).unwrap();
                assert!(
                    t.workgroup_bytes() <= limits.max_compute_workgroup_storage_size,
                    "{seq} {dvp}: {t:?}"
                );
                assert!(
                    4 * t.tx * t.nv >= dvp,
                    "{dvp}: {t:?} does not cover the head"
                );
                assert!(t.nv <= 4 && (8 * t.tx).is_multiple_of(t.vk));
                assert!(t.dk.is_multiple_of(4) && t.vk.is_multiple_of(4));
            }
        }
        // Three tokens of width 4 (the worked example) take one invocation.
        let t = FusedTiles::choose(3, 4, 4, &limits).unwrap();
        assert_eq!((t.tx, t.ty, t.nv, t.dk), (1, 1, 1, 4));
        // With more workgroup memory, head width 64 gets 64 rows by 64 keys.
        let roomy = wgpu::Limits {
            max_compute_workgroup_storage_size: 32768,
            ..limits.clone()
        };
        let t = FusedTiles::choose(1024, 64, 64, &roomy).unwrap();
        assert_eq!((t.tx, t.ty, t.nv), (8, 8, 2));
        assert!(FusedTiles::choose(64, 64, 260, &limits).is_err());
        let tiny = wgpu::Limits {
            max_compute_workgroup_storage_size: 1024,
            ..limits
        };
        assert!(matches!(
            FusedTiles::choose(64, 64, 64, &tiny),
            Err(Error::LimitExceeded {
                limit: "max_compute_workgroup_storage_size",
                ..
            })
        ));
    }
}
