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
        seq_stride: u32,
        store_qk: u32,
        store_v: u32,
    }
}

/// How A is laid out.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Load {
    /// Row-major `[m, k]`.
    RowMajor,
    /// Head-major `[b, heads, seq, width]`, read as `[b * seq, heads * width]`: the
    /// attention operator's heads (only with [`Store::RowMajor`]).
    HeadMajor { seq: u32, heads: u32, width: u32 },
}

/// Where the product goes.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Store {
    /// Row-major `[m, ldc]`, columns `< n_store` only.
    RowMajor { ldc: u32, n_store: u32 },
    /// One section of heads `width` wide (padded, a multiple of 4), each row's `seq` tokens
    /// stored `stored` wide (the padding dropped) in blocks of `seq_stride` tokens per head:
    /// from the start of each block, or with [`Kernel::GemmCache`] from each batch row's
    /// length in a KV cache (`seq_stride` its capacity).
    Heads {
        seq: u32,
        heads: u32,
        width: u32,
        stored: u32,
        seq_stride: u32,
    },
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
    let tiles = tiles(m, n, limits);
    spec_tiled(tiles, m, n, k, Load::RowMajor, store, precision, false)
}

/// [`spec`] with the tiles given (one pipeline serving products of several row counts), A
/// laid out as `load`, and with `cache` the [`Kernel::GemmCache`] variant (rows stored from
/// each batch row's length in a KV cache; [`Store::Heads`] only).
#[allow(clippy::too_many_arguments)]
pub(crate) fn spec_tiled(
    tiles: MatmulTiles,
    m: u32,
    n: u32,
    k: u32,
    load: Load,
    store: Store,
    precision: Precision,
    cache: bool,
) -> DispatchSpec {
    debug_assert!(n.is_multiple_of(4), "gemm needs padded columns");
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
    let a_head_major = match load {
        Load::RowMajor => false,
        Load::HeadMajor { seq, heads, width } => {
            debug_assert!(matches!(store, Store::RowMajor { .. }));
            params.seq = seq;
            params.heads = heads;
            params.width_v = width;
            true
        }
    };
    debug_assert!(!cache || matches!(store, Store::Heads { .. }));
    let head_split = match store {
        Store::RowMajor { ldc, n_store } => {
            params.ldc = ldc;
            params.n_store = n_store;
            false
        }
        Store::Heads {
            seq,
            heads,
            width,
            stored,
            seq_stride,
        } => {
            debug_assert!(width.is_multiple_of(4) && stored <= width);
            params.seq = seq;
            params.heads = heads;
            // One section: every column is below heads * width, in the first (Q) branch.
            params.width_qk = width;
            params.store_qk = stored;
            params.seq_stride = seq_stride;
            true
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
            params.seq_stride = seq;
            params.store_qk = width_qk;
            params.store_v = width_v;
            true
        }
    };
    DispatchSpec {
        kernel: if cache {
            Kernel::GemmCache(precision)
        } else {
            Kernel::Gemm(precision)
        },
        overrides: overrides(tiles, head_split, a_head_major),
        params: bytemuck::bytes_of(&params).to_vec(),
        workgroups: total_tiles,
        flops: 2.0 * m as f64 * n as f64 * k as f64,
    }
}

/// The tiles of an `m x n` product.
pub(crate) fn tiles(m: u32, n: u32, limits: &wgpu::Limits) -> MatmulTiles {
    MatmulTiles::for_shape(m, n, Columns::Vec4Groups, limits)
}

pub(super) fn overrides(tiles: MatmulTiles, head_split: bool, a_head_major: bool) -> Overrides {
    let flag = |on: bool| if on { 1.0 } else { 0.0 };
    let mut overrides = tiles.overrides("TK");
    overrides.push(("HEAD_SPLIT", flag(head_split)));
    overrides.push(("A_HEAD_MAJOR", flag(a_head_major)));
    overrides
}

/// Every override set `spec` and `spec_tiled` can emit under `limits` for [`Kernel::Gemm`]:
/// products of any number of rows (batch times seq) by any multiple of 4 columns (the q|k|v
/// width or the padded output width), stored either way, and the output projection of the
/// cached layer (A head-major, stored row-major).
pub(crate) fn override_sets(limits: &wgpu::Limits) -> Vec<Overrides> {
    let mut choices = Distinct::default();
    for m in sizes(1) {
        for n in sizes(4) {
            let tiles = tiles(m, n, limits);
            for (head_split, a_head_major) in [(false, false), (true, false), (false, true)] {
                choices.add((tiles, head_split, a_head_major));
            }
        }
    }
    choices.overrides(|(tiles, head_split, a)| overrides(tiles, head_split, a))
}

/// Every override set of [`Kernel::GemmCache`]: the tiles of any product, stored by head.
pub(crate) fn cache_override_sets(limits: &wgpu::Limits) -> Vec<Overrides> {
    let mut choices = Distinct::default();
    for m in sizes(1) {
        for n in sizes(4) {
            choices.add(tiles(m, n, limits));
        }
    }
    choices.overrides(|tiles| overrides(tiles, true, false))
}
