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
        seq_stride: u32,
        store_qk: u32,
        store_v: u32,
        a_sm: u32,
        a_sk: u32,
        a_rows: u32,
        b_sk: u32,
        b_sn: u32,
        b_cols: u32,
        _pad0: u32,
        _pad1: u32,
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

const fn modes(a: u32, b: u32, head_split: bool) -> Modes {
    Modes { a, b, head_split }
}

/// The forward's products: A and B row-major, stored either way; and the cached layer's
/// output projection, A head-major (the operator's heads), stored row-major.
pub(crate) const FORWARD: [Modes; 3] = [modes(0, 0, false), modes(0, 0, true), modes(1, 0, false)];

/// The layer backward's products, stored row-major: `dA = dY W_oᵀ`, `[Aᵀ; 1] dY` and
/// `dx = dQKV W_qkvᵀ` read B by strides; `[xᵀ; 1] dQKV` reads it head-major; `dx` reads A
/// head-major.
pub(crate) const BACKWARD: [Modes; 3] =
    [modes(0, 1, false), modes(1, 1, false), modes(0, 2, false)];

/// How A is laid out.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Load {
    /// Row-major `[m, k]`.
    RowMajor,
    /// Head-major `[b, heads, seq, width]`, read as `[b * seq, heads * width]`: the
    /// attention operator's heads (only with [`Store::RowMajor`]).
    HeadMajor { seq: u32, heads: u32, width: u32 },
    /// `A[m, k] = a[m sm + k sk]` for `m < rows`; the rows from `rows` to `m` are all ones
    /// (a bias's gradient rides along as one more row of the product).
    Strided { sm: u32, sk: u32, rows: u32 },
    /// The head-major qkv layout, row `m` a token, column `k` a qkv column.
    Qkv(HeadMajor),
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
    /// Split by head into the qkv buffer's Q, K and V sections.
    HeadSplit(HeadMajor),
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

/// `C[m, n] = A[m, k] · B[k, n] + bias[n]`, A and B read as given, `n` a multiple of 4.
#[allow(clippy::too_many_arguments)]
pub(crate) fn spec_with(
    m: u32,
    n: u32,
    k: u32,
    a: Load,
    b: ReadB,
    store: Store,
    precision: Precision,
    limits: &wgpu::Limits,
) -> DispatchSpec {
    let tiles = tiles(m, n, limits);
    spec_full(tiles, m, n, k, a, b, store, precision, false)
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
    spec_full(
        tiles,
        m,
        n,
        k,
        load,
        ReadB::Vec4Rows,
        store,
        precision,
        cache,
    )
}

#[allow(clippy::too_many_arguments)]
fn spec_full(
    tiles: MatmulTiles,
    m: u32,
    n: u32,
    k: u32,
    load: Load,
    b: ReadB,
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
    let mut read_head_major = |h: HeadMajor| {
        debug_assert!(matches!(store, Store::RowMajor { .. }));
        params.seq = h.seq;
        params.heads = h.heads;
        params.width_qk = h.width_qk;
        params.width_v = h.width_v;
        params.k_offset = h.k_offset;
        params.v_offset = h.v_offset;
    };
    let a_mode = match load {
        Load::RowMajor => {
            (params.a_sm, params.a_sk, params.a_rows) = (k, 1, m);
            0
        }
        Load::Strided { sm, sk, rows } => {
            (params.a_sm, params.a_sk, params.a_rows) = (sm, sk, rows);
            0
        }
        // One section of heads `width` wide: the head-major read's Q section.
        Load::HeadMajor { seq, heads, width } => {
            read_head_major(HeadMajor {
                seq,
                heads,
                width_qk: width,
                width_v: width,
                k_offset: 0,
                v_offset: 0,
            });
            1
        }
        Load::Qkv(h) => {
            read_head_major(h);
            1
        }
    };
    let b_mode = match b {
        ReadB::Vec4Rows => 0,
        ReadB::Strided { sk, sn, cols } => {
            (params.b_sk, params.b_sn, params.b_cols) = (sk, sn, cols);
            1
        }
        ReadB::HeadMajor(h) => {
            read_head_major(h);
            2
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
        Store::HeadSplit(h) => {
            debug_assert!(h.width_qk.is_multiple_of(4) && h.width_v.is_multiple_of(4));
            params.seq = h.seq;
            params.heads = h.heads;
            params.width_qk = h.width_qk;
            params.width_v = h.width_v;
            params.k_offset = h.k_offset;
            params.v_offset = h.v_offset;
            params.seq_stride = h.seq;
            params.store_qk = h.width_qk;
            params.store_v = h.width_v;
            true
        }
    };
    DispatchSpec {
        kernel: if cache {
            Kernel::GemmCache(precision)
        } else {
            Kernel::Gemm(precision)
        },
        overrides: overrides(tiles, modes(a_mode, b_mode, head_split)),
        params: bytemuck::bytes_of(&params).to_vec(),
        workgroups: total_tiles,
        flops: 2.0 * m as f64 * n as f64 * k as f64,
    }
}

/// The tiles of an `m x n` product.
pub(crate) fn tiles(m: u32, n: u32, limits: &wgpu::Limits) -> MatmulTiles {
    MatmulTiles::for_shape(m, n, Columns::Vec4Groups, limits)
}

pub(super) fn overrides(tiles: MatmulTiles, modes: Modes) -> Overrides {
    let mut overrides = tiles.overrides("TK");
    overrides.push(("HEAD_SPLIT", if modes.head_split { 1.0 } else { 0.0 }));
    overrides.push(("A_MODE", modes.a as f64));
    overrides.push(("B_MODE", modes.b as f64));
    overrides
}

/// Every override set `spec`, `spec_tiled` and `spec_with` can emit under `limits` for
/// [`Kernel::Gemm`]: products of any number of rows (batch times seq, or a weight's rows plus
/// the ones row) by any multiple of 4 columns, in each of the forward's and the backward's
/// ways of reading and storing.
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

/// Every override set of [`Kernel::GemmCache`]: the tiles of any product, stored by head.
pub(crate) fn cache_override_sets(limits: &wgpu::Limits) -> Vec<Overrides> {
    let mut choices = Distinct::default();
    for m in sizes(1) {
        for n in sizes(4) {
            choices.add(tiles(m, n, limits));
        }
    }
    choices.overrides(|tiles| overrides(tiles, FORWARD[1]))
}
