//! Host side of `gemm.wgsl`: the projection GEMM with bias.

use super::variants::{Distinct, sizes};
use super::{Columns, DispatchSpec, Kernel, MatmulTiles, Overrides, uniform_params};
use crate::precision::Precision;

uniform_params! {
    /// Uniform parameters; the layout of `GemmParams` in `gemm.wgsl`.
    struct GemmParams {
        m: u32,
        n: u32,
        k: u32,
        tiles_n: u32,
        total_tiles: u32,
        ldc: u32,
        n_store: u32,
        seq: u32,
        heads: u32,
        width_qk: u32,
        width_v: u32,
        k_offset: u32,
        v_offset: u32,
        _pad0: u32,
        _pad1: u32,
        _pad2: u32,
    }
}

/// Where the product goes.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Store {
    /// Row-major `[m, ldc]`, columns `< n_store` only.
    RowMajor { ldc: u32, n_store: u32 },
    /// Split by head into the qkv buffer's Q, K and V sections (offsets in elements).
    HeadSplit {
        seq: u32,
        heads: u32,
        width_qk: u32,
        width_v: u32,
        k_offset: u32,
        v_offset: u32,
    },
}

/// `C[m, n] = A[m, k] · B[k, n] + bias[n]` with `n` a multiple of 4.
pub(crate) fn spec(
    m: u32,
    n: u32,
    k: u32,
    store: Store,
    precision: Precision,
    limits: &wgpu::Limits,
) -> DispatchSpec {
    debug_assert!(n.is_multiple_of(4), "gemm needs padded columns");
    let tiles = tiles(m, n, limits);
    let tiles_n = (n / 4).div_ceil(tiles.groups());
    let total_tiles = tiles_n * m.div_ceil(tiles.tile_m());
    let mut params = GemmParams {
        m,
        n,
        k,
        tiles_n,
        total_tiles,
        ..GemmParams::default()
    };
    let head_split = match store {
        Store::RowMajor { ldc, n_store } => {
            params.ldc = ldc;
            params.n_store = n_store;
            false
        }
        Store::HeadSplit {
            seq,
            heads,
            width_qk,
            width_v,
            k_offset,
            v_offset,
        } => {
            debug_assert!(width_qk.is_multiple_of(4) && width_v.is_multiple_of(4));
            params.seq = seq;
            params.heads = heads;
            params.width_qk = width_qk;
            params.width_v = width_v;
            params.k_offset = k_offset;
            params.v_offset = v_offset;
            true
        }
    };
    DispatchSpec {
        kernel: Kernel::Gemm(precision),
        overrides: overrides(tiles, head_split),
        params: bytemuck::bytes_of(&params).to_vec(),
        workgroups: total_tiles,
        flops: 2.0 * m as f64 * n as f64 * k as f64,
    }
}

/// The tiles of an `m x n` product.
pub(super) fn tiles(m: u32, n: u32, limits: &wgpu::Limits) -> MatmulTiles {
    MatmulTiles::for_shape(m, n, Columns::Vec4Groups, limits)
}

pub(super) fn overrides(tiles: MatmulTiles, head_split: bool) -> Overrides {
    let mut overrides = tiles.overrides("TK");
    overrides.push(("HEAD_SPLIT", if head_split { 1.0 } else { 0.0 }));
    overrides
}

/// Every override set `spec` can emit under `limits`: products of any number of rows (batch
/// times seq) by any multiple of 4 columns (the q|k|v width or the padded output width), stored
/// either way.
pub(crate) fn override_sets(limits: &wgpu::Limits) -> Vec<Overrides> {
    let mut choices = Distinct::default();
    for m in sizes(1) {
        for n in sizes(4) {
            let tiles = tiles(m, n, limits);
            for head_split in [false, true] {
                choices.add((tiles, head_split));
            }
        }
    }
    choices.overrides(|(tiles, head_split)| overrides(tiles, head_split))
}
