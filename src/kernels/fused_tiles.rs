//! The fused attention kernels' tiles: the override constants of `fused_attention.wgsl`
//! (rows shared by a row of invocations, [`SharedTiles`]) and of `fused_rows.wgsl` (whole rows
//! per invocation, [`RowTiles`]), and which of them the autotuner times ([`FusedTiles`]).

use super::fused::FusedIo;
use super::variants::{Distinct, sizes};
use super::{Kernel, Overrides, rows_per_eight};
use crate::error::{Error, Result};

/// The widest value head the kernel keeps in registers: 4 vec4 columns per row and invocation
/// across 16 invocations.
pub(crate) const MAX_HEAD_DIM_V: u32 = crate::config::FUSED_MAX_HEAD_DIM_V as u32;

/// Entries of the kernel's `q_rows` (a fixed 64: 8 TY rows at the largest TY, 8).
const ROW_OFFSETS: u32 = 64;

/// The tiles of one fused attention kernel: which kernel runs and its override constants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum FusedTiles {
    /// `fused_attention.wgsl`: 8 rows by 8 keys per invocation, rows shared across a row of
    /// invocations. The rule's choice, and the one every device can run.
    Shared(SharedTiles),
    /// `fused_rows.wgsl`: whole rows per invocation. Only ever a timed candidate.
    Rows(RowTiles),
}

impl FusedTiles {
    /// The rule's tiles ([`SharedTiles::choose`]).
    pub fn choose(rows: u32, keys: u32, dp: u32, dvp: u32, limits: &wgpu::Limits) -> Result<Self> {
        SharedTiles::choose(rows, keys, dp, dvp, limits).map(FusedTiles::Shared)
    }

    /// What the autotuner times, in the order worth timing when its budget runs out first: the
    /// rule's tiles, then whole rows per invocation read directly and staged (the partition
    /// that wins where loads dominate, as on CPU drivers), then the other shared tiles, then
    /// smaller whole-row tiles (more invocations, fewer registers each: GPU-shaped).
    pub fn candidates(rows: u32, keys: u32, dp: u32, dvp: u32, limits: &wgpu::Limits) -> Vec<Self> {
        let shared = SharedTiles::candidates(rows, keys, dp, dvp, limits);
        let Some((&base, others)) = shared.split_first() else {
            return Vec::new();
        };
        let row = RowTiles::candidates(dp, dvp, limits);
        let mut out = vec![FusedTiles::Shared(base)];
        out.extend(row.iter().take(2).map(|&t| FusedTiles::Rows(t)));
        out.extend(others.iter().map(|&t| FusedTiles::Shared(t)));
        out.extend(row.iter().skip(2).map(|&t| FusedTiles::Rows(t)));
        out
    }

    /// Whether these tiles fit a device's limits and cover heads `dp` (query/key) and `dvp`
    /// (value) wide.
    pub fn fits(&self, dp: u32, dvp: u32, limits: &wgpu::Limits) -> bool {
        match self {
            FusedTiles::Shared(t) => t.fits(dvp, limits),
            FusedTiles::Rows(t) => t.fits(dp, dvp, limits),
        }
    }

    /// Query rows per workgroup.
    pub fn rows(&self) -> u32 {
        match self {
            FusedTiles::Shared(t) => t.rows(),
            FusedTiles::Rows(t) => t.rows(),
        }
    }

    /// The kernel these tiles are for, binding `io`.
    pub fn kernel(&self, io: FusedIo) -> Kernel {
        match self {
            FusedTiles::Shared(_) => Kernel::Fused(io),
            FusedTiles::Rows(_) => Kernel::FusedRows(io),
        }
    }

    pub(crate) fn overrides(&self) -> Overrides {
        match self {
            FusedTiles::Shared(t) => t.overrides(),
            FusedTiles::Rows(t) => t.overrides(),
        }
    }

    /// As the autotune file writes them: `TX=8 TY=8 NV=2 DK=16 VK=16` for shared tiles,
    /// `WG=32 R=8 DIRECT=1` for whole rows.
    pub fn text(&self) -> String {
        match self {
            FusedTiles::Shared(t) => format!(
                "TX={} TY={} NV={} DK={} VK={}",
                t.tx, t.ty, t.nv, t.dk, t.vk
            ),
            FusedTiles::Rows(t) => format!("WG={} R={} DIRECT={}", t.wg, t.r, t.direct as u32),
        }
    }
}

/// `fused_rows.wgsl`'s override constants (see the shader's opening comment); its rows are
/// 16 named vec4 (heads up to 64 wide), and it stages 16 keys at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct RowTiles {
    /// Invocations per workgroup.
    pub wg: u32,
    /// Packed rows per invocation, 1 to 8.
    pub r: u32,
    /// K and V read from storage by every invocation rather than staged per workgroup.
    pub direct: bool,
}

/// Keys staged per step and the widest head `fused_rows.wgsl` holds (its constants SK and
/// 4 D4).
const ROW_SK: u32 = 16;
const ROW_MAX_HEAD: u32 = 64;

impl RowTiles {
    /// Whole-row tiles for heads `dp` and `dvp` wide (padded to multiples of 4), none past
    /// 64: 32 invocations of 8 rows each (cubek's unit attention: 8 rows per unit, a plane of
    /// units per workgroup) staging K and V (the faster on a CPU driver: 224 against 286 ms at
    /// N=512, H=8, D=64), then reading them directly; then 64 invocations of 2 rows, staged
    /// (fewer registers each: GPU-shaped). Only those that fit.
    pub fn candidates(dp: u32, dvp: u32, limits: &wgpu::Limits) -> Vec<Self> {
        [
            RowTiles {
                wg: 32,
                r: 8,
                direct: false,
            },
            RowTiles {
                wg: 32,
                r: 8,
                direct: true,
            },
            RowTiles {
                wg: 64,
                r: 2,
                direct: false,
            },
        ]
        .into_iter()
        .filter(|t| t.fits(dp, dvp, limits))
        .collect()
    }

    /// Bytes of workgroup memory: the K and V stages (declared, though unread, when direct).
    pub fn workgroup_bytes(&self) -> u32 {
        2 * ROW_SK * (ROW_MAX_HEAD / 4) * 16
    }

    /// Whether these tiles fit a device's workgroup limits and cover heads `dp` and `dvp`
    /// wide.
    pub fn fits(&self, dp: u32, dvp: u32, limits: &wgpu::Limits) -> bool {
        self.workgroup_bytes() <= limits.max_compute_workgroup_storage_size
            && self.wg <= limits.max_compute_invocations_per_workgroup
            && self.wg <= limits.max_compute_workgroup_size_x
            && (1..=64).contains(&self.wg)
            && (1..=8).contains(&self.r)
            && dp.max(dvp) <= ROW_MAX_HEAD
    }

    /// Query rows per workgroup.
    pub fn rows(&self) -> u32 {
        self.r * self.wg
    }

    pub(crate) fn overrides(&self) -> Overrides {
        vec![
            ("WG", self.wg as f64),
            ("R", self.r as f64),
            ("DIRECT", self.direct as u32 as f64),
        ]
    }
}

/// `fused_attention.wgsl`'s override constants (see the shader's opening comment).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct SharedTiles {
    pub tx: u32,
    pub ty: u32,
    pub nv: u32,
    pub dk: u32,
    pub vk: u32,
}

impl SharedTiles {
    /// Bytes of workgroup memory: the staging area, the P tile and the reduction rows (all
    /// vec4), and the 64 row offsets (u32).
    pub fn workgroup_bytes(&self) -> u32 {
        let rows = 8 * self.ty + 8 * self.tx;
        let stage = (rows * (self.dk / 4 + 1)).max(self.vk * self.tx * self.nv);
        let p_tile = 16 * self.ty * self.tx;
        let red = 2 * self.ty * self.tx;
        (stage + p_tile + red) * 16 + ROW_OFFSETS * 4
    }

    /// Tiles for `rows` query rows over `keys` keys, query/key heads `dp` wide and value heads
    /// `dvp` wide: up to 64 query rows by 64 keys, no more invocations than rows and keys to
    /// cover, enough column invocations that each holds
    /// at most 2 vec4 of a row (4 for heads past 128), then shrunk (fewer rows, shallower
    /// staging) until the device's workgroup memory and invocation limits are met.
    pub fn choose(rows: u32, keys: u32, dp: u32, dvp: u32, limits: &wgpu::Limits) -> Result<Self> {
        if dvp > MAX_HEAD_DIM_V {
            return Err(Error::LimitExceeded {
                limit: "fused kernel head_dim_v",
                max: MAX_HEAD_DIM_V as u64,
                requested: dvp as u64,
                what: "the value head width (padded to a multiple of 4)".into(),
                hint: "; use the staged kernels (KernelChoice::Staged)".into(),
            });
        }
        let tx = rows_per_eight(keys)
            .max(dvp.div_ceil(8).next_power_of_two())
            .clamp(1, 16);
        let nv = dvp.div_ceil(4 * tx).max(1);
        let mut smallest = u32::MAX;
        let mut ty = rows_per_eight(rows);
        while ty >= 1 {
            for (dk, vk) in [(16, 16), (16, 8), (8, 16), (8, 8), (8, 4), (4, 4)] {
                // Staging deeper than the head or wider than the block only moves zeros.
                if !(8 * tx).is_multiple_of(vk) || (dk > 4 && dk > dp) {
                    continue;
                }
                let t = SharedTiles { tx, ty, nv, dk, vk };
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

    /// Whether these tiles fit a device's workgroup limits and cover value heads `dvp` wide.
    pub fn fits(&self, dvp: u32, limits: &wgpu::Limits) -> bool {
        self.workgroup_bytes() <= limits.max_compute_workgroup_storage_size
            && self.tx * self.ty <= limits.max_compute_invocations_per_workgroup
            && self.tx <= limits.max_compute_workgroup_size_x
            && self.ty <= limits.max_compute_workgroup_size_y
            && (1..=16).contains(&self.tx)
            && (1..=8).contains(&self.ty)
            && self.tx.is_power_of_two()
            && self.ty.is_power_of_two()
            && (1..=4).contains(&self.nv)
            && 4 * self.tx * self.nv >= dvp
            && [4, 8, 16].contains(&self.dk)
            && [4, 8, 16].contains(&self.vk)
            && (8 * self.tx).is_multiple_of(self.vk)
    }

    /// The tiles the autotuner times for the same problem, [`SharedTiles::choose`]'s first:
    /// half its rows per workgroup, twice its key columns (half the vec4 columns of O per
    /// invocation), twice its rows, and shallower Q/K staging, each kept where it fits. At most six, so
    /// that tuning stays within its budget on a slow device.
    pub fn candidates(rows: u32, keys: u32, dp: u32, dvp: u32, limits: &wgpu::Limits) -> Vec<Self> {
        let Ok(base) = Self::choose(rows, keys, dp, dvp, limits) else {
            return Vec::new();
        };
        let mut out = vec![base];
        let wider = |tx: u32| SharedTiles {
            tx,
            nv: dvp.div_ceil(4 * tx).max(1),
            ..base
        };
        // In the order they are worth timing when the budget runs out first.
        for t in [
            SharedTiles {
                ty: base.ty / 2,
                ..base
            },
            wider(base.tx * 2),
            SharedTiles {
                ty: base.ty * 2,
                ..base
            },
            SharedTiles { dk: 8, ..base },
            SharedTiles {
                ty: base.ty / 2,
                ..wider(base.tx * 2)
            },
        ] {
            if t.ty >= 1 && t.fits(dvp, limits) && !out.contains(&t) {
                out.push(t);
            }
        }
        out
    }

    /// Query rows per workgroup.
    pub fn rows(&self) -> u32 {
        8 * self.ty
    }

    pub(crate) fn overrides(&self) -> Overrides {
        vec![
            ("TX", self.tx as f64),
            ("TY", self.ty as f64),
            ("NV", self.nv as f64),
            ("DK", self.dk as f64),
            ("VK", self.vk as f64),
        ]
    }
}

/// Every override set [`SharedTiles::choose`] and the autotuner's candidates
/// ([`SharedTiles::candidates`]) can emit under `limits`: any numbers of rows and
/// keys (which count only through `rows_per_eight`, so 8, 16, 32 and 64 stand for all), any
/// padded query/key head width and any padded value head width up to [`MAX_HEAD_DIM_V`];
/// shapes the kernel refuses emit nothing.
pub(crate) fn shared_override_sets(limits: &wgpu::Limits) -> Vec<Overrides> {
    let mut tiles = Distinct::default();
    for rows in [8, 16, 32, 64] {
        for keys in [8, 16, 32, 64] {
            for dp in sizes(4) {
                for dvp in sizes(4).take_while(|&dvp| dvp <= MAX_HEAD_DIM_V) {
                    for t in SharedTiles::candidates(rows, keys, dp, dvp, limits) {
                        tiles.add(t);
                    }
                }
            }
        }
    }
    tiles.overrides(|t| t.overrides())
}

/// Every override set of `fused_rows.wgsl` the autotuner's candidates can emit under
/// `limits` (they do not depend on the shape, only on whether it fits).
pub(crate) fn row_override_sets(limits: &wgpu::Limits) -> Vec<Overrides> {
    let mut tiles = Distinct::default();
    for dp in [4, ROW_MAX_HEAD] {
        for t in RowTiles::candidates(dp, dp, limits) {
            tiles.add(t);
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
                let t = SharedTiles::choose(seq, seq, 64, dvp, &limits).unwrap();
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
        let t = SharedTiles::choose(3, 3, 4, 4, &limits).unwrap();
        assert_eq!((t.tx, t.ty, t.nv, t.dk), (1, 1, 1, 4));
        // With more workgroup memory, head width 64 gets 64 rows by 64 keys.
        let roomy = wgpu::Limits {
            max_compute_workgroup_storage_size: 32768,
            ..limits.clone()
        };
        let t = SharedTiles::choose(1024, 1024, 64, 64, &roomy).unwrap();
        assert_eq!((t.tx, t.ty, t.nv), (8, 8, 2));
        assert!(SharedTiles::choose(64, 64, 64, 260, &limits).is_err());
        let tiny = wgpu::Limits {
            max_compute_workgroup_storage_size: 1024,
            ..limits
        };
        assert!(matches!(
            SharedTiles::choose(64, 64, 64, 64, &tiny),
            Err(Error::LimitExceeded {
                limit: "max_compute_workgroup_storage_size",
                ..
            })
        ));
    }

    #[test]
    fn whole_rows_are_timed_right_after_the_rule_for_heads_up_to_64() {
        let limits = wgpu::Limits::default();
        let all = FusedTiles::candidates(1024, 1024, 64, 64, &limits);
        assert!(
            matches!(all[0], FusedTiles::Shared(_)),
            "the rule first: {all:?}"
        );
        assert_eq!(
            all[1],
            FusedTiles::Rows(RowTiles {
                wg: 32,
                r: 8,
                direct: false
            })
        );
        assert_eq!(all[1].rows(), 256);
        assert_eq!(
            all[1].kernel(FusedIo::ALL[0]),
            Kernel::FusedRows(FusedIo::ALL[0])
        );
        assert_eq!(
            all[0].kernel(FusedIo::ALL[0]),
            Kernel::Fused(FusedIo::ALL[0])
        );
        let rows: Vec<_> = all
            .iter()
            .filter(|t| matches!(t, FusedTiles::Rows(_)))
            .collect();
        assert_eq!(rows.len(), 3, "{all:?}");
        assert!(rows.iter().all(|t| t.fits(64, 64, &limits)));
        // A row of 16 vec4 holds heads up to 64 wide; wider ones get shared tiles only.
        for (dp, dvp) in [(68, 64), (64, 68), (128, 128)] {
            assert!(
                FusedTiles::candidates(1024, 1024, dp, dvp, &limits)
                    .iter()
                    .all(|t| matches!(t, FusedTiles::Shared(_))),
                "{dp} {dvp}"
            );
        }
        // No device limit is passed: 64 invocations need a device that allows them.
        let small = wgpu::Limits {
            max_compute_invocations_per_workgroup: 32,
            ..limits
        };
        assert!(
            FusedTiles::candidates(1024, 1024, 64, 64, &small)
                .iter()
                .all(|t| t.fits(64, 64, &small) && t.rows() <= 256)
        );
        assert!(
            !RowTiles {
                wg: 64,
                r: 2,
                direct: false
            }
            .fits(64, 64, &small)
        );
    }
}
