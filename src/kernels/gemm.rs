//! Host side of `gemm.wgsl`: the projection GEMM with bias.

use super::{Columns, DispatchSpec, Kernel, MatmulTiles};

/// Uniform parameters; the layout of `GemmParams` in `gemm.wgsl`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
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
    _pad: [u32; 3],
}

/// Where the product goes.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Store {
    /// Row-major `[m, ldc]`, columns `< n_store` only.
    RowMajor { ldc: u32, n_store: u32 },
    /// Split by head into the qkv buffer's Q, K and V sections (offsets in f32 elements).
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
pub(crate) fn spec(m: u32, n: u32, k: u32, store: Store, limits: &wgpu::Limits) -> DispatchSpec {
    debug_assert!(n.is_multiple_of(4), "gemm needs padded columns");
    let tiles = MatmulTiles::for_shape(m, n, Columns::Vec4Groups, limits);
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
    let mut overrides = tiles.overrides("TK");
    overrides.push(("HEAD_SPLIT", if head_split { 1.0 } else { 0.0 }));
    DispatchSpec {
        kernel: Kernel::Gemm,
        overrides,
        params: bytemuck::bytes_of(&params).to_vec(),
        workgroups: total_tiles,
        flops: 2.0 * m as f64 * n as f64 * k as f64,
    }
}
