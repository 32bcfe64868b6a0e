//! Host side of the attention backward's kernels: `attention_bwd_prep.wgsl` (D = rowsum(dO ∘ O)),
//! `attention_bwd_kv.wgsl` (dK, dV) and `attention_bwd_q.wgsl` (dQ), with the tile shapes of the
//! last two chosen to fit the device's workgroup memory and invocation limits.

use super::variants::{Distinct, sizes};
use super::{Overrides, pad4};
use crate::error::{Error, Result};

/// The most vec4 columns one invocation keeps in registers per accumulator (the kernels'
/// fixed register arrays).
const MAX_NC: u32 = 8;

/// The most invocations that split one row's columns.
const MAX_DS: u32 = 8;

/// The widest head the gradient kernels take: `MAX_DS * MAX_NC` vec4 columns.
pub(crate) const MAX_HEAD_DIM: u32 = 4 * MAX_DS * MAX_NC;

/// The most walked rows per step.
const MAX_BW: u32 = 32;

/// Rows per workgroup of the D pass.
pub(crate) const PREP_ROWS: u32 = 64;

/// The gradient kernels' override constants (see `shaders/attention_bwd.wgsl`): `ds`
/// invocations per owned row, each holding `nc` vec4 columns; `bo` rows owned per workgroup;
/// `bw` rows per step of the walk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct BackwardTiles {
    pub ds: u32,
    pub nc: u32,
    pub bo: u32,
    pub bw: u32,
}

impl BackwardTiles {
    /// Bytes of workgroup memory of the larger of the two kernels: four row tiles of `ds nc`
    /// vec4 (owned and walked, two tensors each), two f32 tiles of `bw bo` and two f32 rows
    /// of `bw`.
    pub fn workgroup_bytes(&self) -> u32 {
        let w4 = self.ds * self.nc;
        2 * (self.bo + self.bw) * w4 * 16 + 2 * self.bw * self.bo * 4 + 2 * self.bw * 4
    }

    /// Tiles for heads `dp` (queries, keys) and `dvp` (values) wide, padded to multiples of
    /// 4: enough invocations per row (a power of two) that each holds at most 4 vec4 columns
    /// (8 past 128 columns), rounded up to a power of two, then the most owned rows (up to 32)
    /// and walked rows (up to twice as many, 8 per invocation of a row, and 32) that fit the
    /// device's limits. Powers of two throughout
    /// and no dependence on the lengths keep the specialisations few (a handful per device),
    /// at the cost of idle columns for head widths between powers of two and idle rows for
    /// calls of a few tokens (the backward is for training, on long sequences).
    pub fn choose(dp: u32, dvp: u32, limits: &wgpu::Limits) -> Result<Self> {
        let w4 = dp.max(dvp) / 4;
        if w4 > MAX_DS * MAX_NC {
            return Err(Error::LimitExceeded {
                limit: "attention backward head width",
                max: MAX_HEAD_DIM as u64,
                requested: 4 * w4 as u64,
                what: "the widest head (padded to a multiple of 4)".into(),
                hint: String::new(),
            });
        }
        let ds = w4.div_ceil(4).next_power_of_two().clamp(1, MAX_DS);
        let nc = w4.div_ceil(ds).max(1).next_power_of_two();
        let mut smallest = u32::MAX;
        let mut bo = 32;
        while bo >= 1 {
            // The most walked rows per step the memory allows, up to 8 per invocation of a
            // row (the kernels' score registers) and twice the owned rows: every step ends in
            // barriers, so the more pairs each one serves, the less they cost.
            let mut bw = (8 * ds).min(2 * bo).min(MAX_BW);
            while bw >= 1 {
                let t = BackwardTiles { ds, nc, bo, bw };
                smallest = smallest.min(t.workgroup_bytes());
                if t.workgroup_bytes() <= limits.max_compute_workgroup_storage_size
                    && ds * bo <= limits.max_compute_invocations_per_workgroup
                    && ds <= limits.max_compute_workgroup_size_x
                    && bo <= limits.max_compute_workgroup_size_y
                {
                    return Ok(t);
                }
                bw /= 2;
            }
            bo /= 2;
        }
        Err(Error::LimitExceeded {
            limit: "max_compute_workgroup_storage_size",
            max: limits.max_compute_workgroup_storage_size as u64,
            requested: smallest as u64,
            what: "the attention backward's smallest tiles".into(),
            hint: String::new(),
        })
    }

    /// The override constants, for a call with or without a key mask and a bias.
    pub(crate) fn overrides(&self, mask: bool, bias: bool) -> Overrides {
        vec![
            ("DS", self.ds as f64),
            ("NC", self.nc as f64),
            ("BO", self.bo as f64),
            ("BW", self.bw as f64),
            ("ROWS", self.bw.div_ceil(self.ds) as f64),
            ("HAS_MASK", mask as u8 as f64),
            ("HAS_BIAS", bias as u8 as f64),
        ]
    }
}

/// The D pass's override constants.
pub(crate) fn prep_overrides() -> Overrides {
    vec![("WG", PREP_ROWS as f64)]
}

/// Every override set [`BackwardTiles::choose`] can emit under `limits`, with and without a
/// mask and a bias: the choice reads only the wider head's vec4 count.
pub(crate) fn override_sets(limits: &wgpu::Limits) -> Vec<Overrides> {
    let mut tiles = Distinct::default();
    for dp in sizes(4).take_while(|&d| d <= MAX_HEAD_DIM) {
        if let Ok(t) = BackwardTiles::choose(dp, 4, limits) {
            for (mask, bias) in [(false, false), (true, false), (false, true), (true, true)] {
                tiles.add((t, mask, bias));
            }
        }
    }
    tiles.overrides(|(t, mask, bias)| t.overrides(mask, bias))
}

/// Tiles for an operator's gradient kernels (the dK/dV kernel owns keys and walks queries, the
/// dQ kernel the other way round; one choice serves both).
pub(crate) fn tiles(
    head_dim: u32,
    head_dim_v: u32,
    limits: &wgpu::Limits,
) -> Result<BackwardTiles> {
    BackwardTiles::choose(pad4(head_dim), pad4(head_dim_v), limits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_cover_the_head_and_fit_the_limits() {
        for limits in [wgpu::Limits::default(), wgpu::Limits::downlevel_defaults()] {
            for dp in (4..=MAX_HEAD_DIM).step_by(4) {
                for dvp in [4, dp] {
                    let t = BackwardTiles::choose(dp, dvp, &limits).unwrap();
                    assert!(4 * t.ds * t.nc >= dp, "{dp}: {t:?}");
                    assert!(t.nc <= MAX_NC && t.bw <= 2 * t.bo && t.bw <= 8 * t.ds);
                    assert!(t.workgroup_bytes() <= limits.max_compute_workgroup_storage_size);
                }
            }
            // Few specialisations: the naga and Tint checks compile every one.
            assert!(override_sets(&limits).len() <= 40);
        }
        let t = BackwardTiles::choose(64, 64, &wgpu::Limits::default()).unwrap();
        assert_eq!((t.ds, t.nc, t.bo, t.bw), (4, 4, 16, 8));
        assert!(matches!(
            BackwardTiles::choose(MAX_HEAD_DIM + 4, 4, &wgpu::Limits::default()),
            Err(Error::LimitExceeded { .. })
        ));
    }
}
