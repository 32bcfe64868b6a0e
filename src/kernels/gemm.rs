//! Host side of `gemm.wgsl`: the projection GEMM with bias, and the layer backward's products,
//! whose transposed or head-major operands it reads by index (see the shader's header).

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
        a_sm: u32,
        a_sk: u32,
        a_rows: u32,
        b_sk: u32,
        b_sn: u32,
        b_cols: u32,
        _pad0: u32,
    }
}

/// The head-major qkv layout (`shaders/gemm.wgsl`): Q, K and V sections at offsets (in
/// elements), each `[batch, heads, seq, width]`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HeadMajor {
    pub seq: u32,
    pub heads: u32,
    pub width_qk: u32,
    pub width_v: u32,
    pub k_offset: u32,
    pub v_offset: u32,
}

/// Where the product goes.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Store {
    /// Row-major `[m, ldc]`, columns `< n_store` only.
    RowMajor { ldc: u32, n_store: u32 },
    /// Split by head into the qkv buffer's Q, K and V sections.
    HeadSplit(HeadMajor),
}

/// How A (`[m, k]`) is read.
#[derive(Debug, Clone, Copy)]
pub(crate) enum ReadA {
    /// `A[m, k] = a[m sm + k sk]` for `m < rows`; the rows from `rows` to `m` are all ones
    /// (a bias's gradient rides along as one more row of the product).
    Strided { sm: u32, sk: u32, rows: u32 },
    /// The head-major qkv layout, row `m` a token, column `k` a qkv column.
    HeadMajor(HeadMajor),
}

/// How B (`[k, n]`) is read.
#[derive(Debug, Clone, Copy)]
pub(crate) enum ReadB {
    /// vec4 rows `[k, n / 4]`, padded with zero columns.
    Vec4Rows,
    /// `B[k, n] = b[k sk + n sn]` for `n < cols`, zero past it.
    Strided { sk: u32, sn: u32, cols: u32 },
    /// The head-major qkv layout, row `k` a token, column `n` a qkv column.
    HeadMajor(HeadMajor),
}

/// The override values of one way of reading and storing: `A_MODE`, `B_MODE`, `HEAD_SPLIT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Modes {
    pub a: u32,
    pub b: u32,
    pub head_split: bool,
}

/// The forward's projections: A and B row-major, stored either way.
pub(crate) const FORWARD: [Modes; 2] = [
    Modes {
        a: 0,
        b: 0,
        head_split: false,
    },
    Modes {
        a: 0,
        b: 0,
        head_split: true,
    },
];

/// The layer backward's products, stored row-major: `dA = dY W_oᵀ`, `[Aᵀ; 1] dY` and
/// `dx = dQKV W_qkvᵀ` read B by strides; `[xᵀ; 1] dQKV` reads it head-major; `dx` reads A
/// head-major.
pub(crate) const BACKWARD: [Modes; 3] = [
    Modes {
        a: 0,
        b: 1,
        head_split: false,
    },
    Modes {
        a: 1,
        b: 1,
        head_split: false,
    },
    Modes {
        a: 0,
        b: 2,
        head_split: false,
    },
];

/// `C[m, n] = A[m, k] · B[k, n] + bias[n]` with A and B row-major and `n` a multiple of 4.
pub(crate) fn spec(
    m: u32,
    n: u32,
    k: u32,
    store: Store,
    precision: Precision,
    limits: &wgpu::Limits,
) -> DispatchSpec {
    let a = ReadA::Strided {
        sm: k,
        sk: 1,
        rows: m,
    };
    spec_with(m, n, k, a, ReadB::Vec4Rows, store, precision, limits)
}

/// `C[m, n] = A[m, k] · B[k, n] + bias[n]`, A and B read as given, `n` a multiple of 4.
#[allow(clippy::too_many_arguments)]
pub(crate) fn spec_with(
    m: u32,
    n: u32,
    k: u32,
    a: ReadA,
    b: ReadB,
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
    let mut head_major = |h: HeadMajor| {
        debug_assert!(h.width_qk.is_multiple_of(4) && h.width_v.is_multiple_of(4));
        params.seq = h.seq;
        params.heads = h.heads;
        params.width_qk = h.width_qk;
        params.width_v = h.width_v;
        params.k_offset = h.k_offset;
        params.v_offset = h.v_offset;
    };
    let mut modes = Modes {
        a: 0,
        b: 0,
        head_split: false,
    };
    match store {
        Store::RowMajor { ldc, n_store } => {
            params.ldc = ldc;
            params.n_store = n_store;
        }
        Store::HeadSplit(h) => {
            head_major(h);
            modes.head_split = true;
        }
    }
    match a {
        ReadA::Strided { sm, sk, rows } => {
            params.a_sm = sm;
            params.a_sk = sk;
            params.a_rows = rows;
        }
        ReadA::HeadMajor(h) => {
            head_major(h);
            modes.a = 1;
        }
    }
    match b {
        ReadB::Vec4Rows => {}
        ReadB::Strided { sk, sn, cols } => {
            params.b_sk = sk;
            params.b_sn = sn;
            params.b_cols = cols;
            modes.b = 1;
        }
        ReadB::HeadMajor(h) => {
            head_major(h);
            modes.b = 2;
        }
    }
    DispatchSpec {
        kernel: Kernel::Gemm(precision),
        overrides: overrides(tiles, modes),
        params: bytemuck::bytes_of(&params).to_vec(),
        workgroups: total_tiles,
        flops: 2.0 * m as f64 * n as f64 * k as f64,
    }
}

/// The tiles of an `m x n` product.
pub(super) fn tiles(m: u32, n: u32, limits: &wgpu::Limits) -> MatmulTiles {
    MatmulTiles::for_shape(m, n, Columns::Vec4Groups, limits)
}

pub(super) fn overrides(tiles: MatmulTiles, modes: Modes) -> Overrides {
    let mut overrides = tiles.overrides("TK");
    overrides.push(("HEAD_SPLIT", if modes.head_split { 1.0 } else { 0.0 }));
    overrides.push(("A_MODE", modes.a as f64));
    overrides.push(("B_MODE", modes.b as f64));
    overrides
}

/// Every override set `spec_with` can emit under `limits`: products of any number of rows
/// (batch times seq, or a weight's rows plus the ones row) by any multiple of 4 columns, in
/// each of the forward's and the backward's ways of reading and storing.
pub(crate) fn override_sets(limits: &wgpu::Limits) -> Vec<Overrides> {
    let mut choices = Distinct::default();
    for m in sizes(1) {
        for n in sizes(4) {
            let tiles = tiles(m, n, limits);
            for modes in FORWARD.into_iter().chain(BACKWARD) {
                choices.add((tiles, modes));
            }
        }
    }
    choices.overrides(|(tiles, modes)| overrides(tiles, modes))
}
