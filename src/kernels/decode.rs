//! Host side of `decode_split.wgsl` and `decode_combine.wgsl`: split-K ("flash decoding")
//! attention for a few queries over many keys, and the merge of its partial results.

use super::fused::Strides;
use super::variants::Distinct;
use super::{Overrides, pad4, uniform_params};
use crate::error::{Error, Result};

uniform_params! {
    /// Uniform parameters; the layout of `DecodeParams` in `decode_split.wgsl`.
    struct DecodeParams {
        batch: u32,
        kv_heads: u32,
        group: u32,
        head_dim: u32,
        head_dim_v: u32,
        dp4: u32,
        dvp4: u32,
        causal: u32,
        row_lengths: u32,
        splits: u32,
        scale: f32,
        _pad2: u32,
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
        _pad0: u32,
        _pad1: u32,
    }
}

uniform_params! {
    /// Uniform parameters; the layout of `CombineParams` in `decode_combine.wgsl`.
    struct CombineParams {
        batch: u32,
        heads: u32,
        head_dim_v: u32,
        dvp4: u32,
        splits: u32,
        scale: f32,
        o_offset: u32,
        o_sb: u32,
        o_sbc: u32,
        o_sh: u32,
        o_shc: u32,
        o_si: u32,
    }
}

uniform_params! {
    /// Uniform parameters; the layout of `StreamParams` in `stream_read.wgsl`.
    struct StreamParams {
        n4: u32,
        per: u32,
        groups: u32,
        _pad0: u32,
    }
}

/// Invocations per workgroup of the streaming-read ceiling: as many as the decode kernel's.
pub(crate) const STREAM_WG: u32 = 64;

impl StreamParams {
    /// `groups` workgroups over `n4` vec4.
    pub(crate) fn new(n4: u32, groups: u32) -> Self {
        StreamParams {
            n4,
            per: n4.div_ceil(groups.max(1)),
            groups,
            _pad0: 0,
        }
    }
}

/// The fewest invocations of a split workgroup, and so keys per block: 128 read K and V at
/// 0.55 of lavapipe's streaming-read rate at 4096 keys (32/8 heads of 128), where 64 read at
/// 0.46 and 256 at 0.41 (its barriers and per-row reductions cost per block).
const WG_MIN: u32 = 128;

/// The most packed query rows one split workgroup holds (`MAX_ROWS` in the shader).
const MAX_ROWS: u32 = 16;

/// The most batch rows a table of row lengths holds (`RowLengths` in `decode_split.wgsl`).
pub const MAX_ROW_LENGTHS: usize = 1024;

/// Each batch row's key count, `n[b]`; the layout of `RowLengths` in `decode_split.wgsl`
/// (`array<vec4<u32>, 256>`).
#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct RowLengths {
    n: [u32; MAX_ROW_LENGTHS],
}

impl RowLengths {
    pub(crate) const LAYOUT: super::UniformLayout = super::UniformLayout {
        name: "RowLengths",
        size: size_of::<RowLengths>(),
        fields: &[("n", 0)],
    };
}

/// The split kernel's override constants (see the shader's opening comment).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct DecodeTiles {
    pub wg: u32,
    pub rows: u32,
    pub d4: u32,
}

impl DecodeTiles {
    /// Bytes of workgroup memory: queries, the score block, three per-row values, a length.
    pub fn workgroup_bytes(&self) -> u32 {
        self.rows * self.d4 * 16 + self.rows * self.wg * 4 + 3 * self.rows * 4 + 4
    }

    /// Tiles for `rows` packed query rows (group x q_len) and heads `dp` / `dvp` wide (padded
    /// to 4): 128 invocations (more where a value head has more vec4), workgroup memory rows of
    /// the next power of two of vec4 (at least 8, so that few variants cover every width), and
    /// as many rows, up to 16, as fit the device's workgroup memory.
    pub fn choose(rows: u32, dp: u32, dvp: u32, limits: &wgpu::Limits) -> Result<Self> {
        let dvp4 = dvp / 4;
        let wg = dvp4.next_power_of_two().max(WG_MIN);
        let d4 = (dp / 4).max(dvp4).next_power_of_two().max(8);
        let most = limits
            .max_compute_invocations_per_workgroup
            .min(limits.max_compute_workgroup_size_x);
        if wg > most {
            return Err(Error::LimitExceeded {
                limit: "max_compute_invocations_per_workgroup",
                max: most as u64,
                requested: wg as u64,
                what: "the decode kernel's invocations (one per vec4 of a value head)".into(),
                hint: "; use the fused kernel".into(),
            });
        }
        let mut t = DecodeTiles {
            wg,
            rows: rows.clamp(1, MAX_ROWS).next_power_of_two(),
            d4,
        };
        while t.workgroup_bytes() > limits.max_compute_workgroup_storage_size {
            if t.rows == 1 {
                return Err(Error::LimitExceeded {
                    limit: "max_compute_workgroup_storage_size",
                    max: limits.max_compute_workgroup_storage_size as u64,
                    requested: t.workgroup_bytes() as u64,
                    what: "the decode kernel's smallest tiles".into(),
                    hint: "; use the fused kernel".into(),
                });
            }
            t.rows /= 2;
        }
        Ok(t)
    }

    pub fn overrides(&self) -> Overrides {
        vec![
            ("WG", self.wg as f64),
            ("ROWS", self.rows as f64),
            ("D4", self.d4 as f64),
        ]
    }
}

/// Invocations per combine workgroup.
pub(crate) const COMBINE_WG: u32 = 64;

/// Everything the split kernel needs to know of one problem but its lengths.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct DecodeGeometry {
    pub batch: u32,
    pub heads: u32,
    pub kv_heads: u32,
    pub head_dim: u32,
    pub head_dim_v: u32,
    pub causal: bool,
    pub mask: bool,
    pub row_lengths: bool,
    pub scale: f32,
    pub splits: u32,
    pub q: Strides,
    pub k: Strides,
    pub v: Strides,
    pub out: Strides,
}

impl DecodeGeometry {
    pub fn group(&self) -> u32 {
        self.heads / self.kv_heads
    }

    pub fn dvp4(&self) -> u32 {
        self.head_dim_v.div_ceil(4)
    }

    pub fn tiles(&self, max_q: u32, limits: &wgpu::Limits) -> Result<DecodeTiles> {
        DecodeTiles::choose(
            self.group() * max_q,
            pad4(self.head_dim),
            pad4(self.head_dim_v),
            limits,
        )
    }

    pub fn params(&self) -> DecodeParams {
        let (q, k, v) = (self.q, self.k, self.v);
        DecodeParams {
            batch: self.batch,
            kv_heads: self.kv_heads,
            group: self.group(),
            head_dim: self.head_dim,
            head_dim_v: self.head_dim_v,
            dp4: self.head_dim.div_ceil(4),
            dvp4: self.dvp4(),
            causal: self.causal as u32,
            row_lengths: self.row_lengths as u32,
            splits: self.splits,
            scale: self.scale,
            _pad2: 0,
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
            _pad0: 0,
            _pad1: 0,
        }
    }

    /// The combine's parameters: the output written with `out` strides.
    pub fn combine_params(&self) -> CombineParams {
        combine_params(
            self.batch,
            self.heads,
            self.head_dim_v,
            self.splits,
            self.scale,
            self.out,
        )
    }

    /// Split workgroups of a call of `q_len` queries.
    pub fn split_workgroups(&self, tiles: &DecodeTiles, q_len: u32) -> u32 {
        self.batch * self.kv_heads * (self.group() * q_len).div_ceil(tiles.rows) * self.splits
    }

    /// Combine workgroups of a call of `q_len` queries.
    pub fn combine_workgroups(&self, q_len: u32) -> u32 {
        (self.batch * self.heads * q_len * self.dvp4()).div_ceil(COMBINE_WG)
    }

    /// f32 elements of the partials for calls of up to `max_q` queries.
    pub fn partial_elements(&self, max_q: u32) -> u64 {
        partial_elements(self.batch, self.heads, max_q, self.splits, self.head_dim_v)
    }
}

pub(crate) fn combine_params(
    batch: u32,
    heads: u32,
    head_dim_v: u32,
    splits: u32,
    scale: f32,
    o: Strides,
) -> CombineParams {
    CombineParams {
        batch,
        heads,
        head_dim_v,
        dvp4: head_dim_v.div_ceil(4),
        splits,
        scale,
        o_offset: o.offset,
        o_sb: o.sb,
        o_sbc: o.sbc,
        o_sh: o.sh,
        o_shc: o.shc,
        o_si: o.si,
    }
}

/// f32 elements of partials `[batch, heads, q_len, splits, 4 + 4 ceil(head_dim_v / 4)]`.
pub(crate) fn partial_elements(
    batch: u32,
    heads: u32,
    q_len: u32,
    splits: u32,
    head_dim_v: u32,
) -> u64 {
    batch as u64
        * heads as u64
        * q_len as u64
        * splits as u64
        * (4 + 4 * head_dim_v.div_ceil(4)) as u64
}

/// How many workgroups keep an adapter busy, by its kind: a CPU driver runs one per core, a
/// GPU several per compute unit (wgpu does not report how many units there are, so a
/// discrete GPU is taken to have about a hundred, an integrated one a dozen).
pub(crate) fn parallelism(info: &wgpu::AdapterInfo) -> u32 {
    match info.device_type {
        wgpu::DeviceType::Cpu => std::thread::available_parallelism()
            .map_or(4, |n| n.get() as u32)
            .max(1),
        wgpu::DeviceType::DiscreteGpu => 256,
        wgpu::DeviceType::IntegratedGpu => 48,
        _ => 64,
    }
}

/// The `Auto` number of splits: enough split workgroups for `parallelism` when
/// `batch_heads` (batch x kv heads x row blocks) fall short of it, each split keeping at
/// least 64 keys of `max_kv`, at most 256 splits.
pub(crate) fn auto_splits(batch_heads: u32, max_kv: u32, parallelism: u32) -> u32 {
    let wanted = parallelism.div_ceil(batch_heads.max(1));
    wanted.min(max_kv.div_ceil(64)).clamp(1, 256)
}

/// Every override set the split kernel's tile choice can emit under `limits`.
pub(crate) fn override_sets(limits: &wgpu::Limits) -> Vec<Overrides> {
    let mut tiles = Distinct::default();
    for rows in [1, 2, 4, 8, 16] {
        for dp in super::variants::sizes(4).take_while(|&d| d <= 1024) {
            for dvp in [4, 64, 128, 256, 512, 1024] {
                if let Ok(t) = DecodeTiles::choose(rows, dp, dvp, limits) {
                    tiles.add(t);
                }
                if let Ok(t) = DecodeTiles::choose(rows, dvp.min(dp), dp, limits) {
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
    fn tiles_fit_and_cover_the_heads() {
        for limits in [wgpu::Limits::default(), wgpu::Limits::downlevel_defaults()] {
            for rows in [1, 3, 4, 16, 64, 512] {
                for d in [4, 8, 64, 100, 128, 256] {
                    let t = DecodeTiles::choose(rows, d, d, &limits).unwrap();
                    assert!(t.workgroup_bytes() <= limits.max_compute_workgroup_storage_size);
                    assert!(t.d4 >= d / 4 && t.wg >= d / 4 && t.rows <= MAX_ROWS);
                }
            }
        }
        // GQA 32/8 at q_len 1: the group's four heads in one workgroup.
        let t = DecodeTiles::choose(4, 128, 128, &wgpu::Limits::default()).unwrap();
        assert_eq!((t.wg, t.rows, t.d4), (128, 4, 32));
    }

    #[test]
    fn auto_splits_fill_the_adapter_only_when_heads_do_not() {
        assert_eq!(auto_splits(8, 4096, 256), 32);
        assert_eq!(auto_splits(512, 4096, 256), 1);
        // A short cache is not cut into splits of a few keys.
        assert_eq!(auto_splits(8, 100, 256), 2);
        assert_eq!(auto_splits(1, 1 << 20, 1 << 20), 256);
    }
}
