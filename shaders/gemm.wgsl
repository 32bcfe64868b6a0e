// Projection GEMM with bias: C = A · B + bias, the `x @ W` of the worked example, and the
// products of the layer's backward (transposed operands read by index, never copied).
//
// Computes, for every row m < M and (padded) column n < N:
//     C[m, n] = bias[n] + sum_k A[m, k] * B[k, n]
// once for the fused Q|K|V projection (the three weights side by side) and once for the output
// projection; with gradients, also dx = dQKV W_qkvᵀ, [xᵀ; 1] dQKV (dW_qkv with db_qkv as its
// last row), dA = dY W_oᵀ and [Aᵀ; 1] dY (dW_o, db_o): a bias is the weight of an input that
// is always 1, so its gradient is one more row of A, all ones.
//
// Bindings (group 0; group 1 is dispatch.wgsl's chunk index), elements f32 or f16 (the storage
// precision, see below), offsets and sizes in elements:
//   0  params  uniform             GemmParams, below
//   1  a       storage, read       A, read as A_MODE says:
//        0 (strided)     A[m, k] = a[m a_sm + k a_sk] for m < a_rows, 1 for a_rows <= m < M
//                        (the ones row; a_rows = M without it); row-major [M, K] (x, or the
//                        concatenated heads) is (a_sm, a_sk) = (K, 1), its transpose (1, lda)
//        1 (head-major)  A[m, k] at the head-major offset of row m, column k (below, with
//                        seq_stride = seq and S = W): the layer's dQ | dK | dV, or the
//                        operator's heads [b, heads, seq, width] (one section) read as the
//                        concatenated [M, heads * width] without a transpose pass
//   2  b       storage, read       B, as vec4 (size a multiple of 16 bytes), read as B_MODE says:
//        0 (vec4 rows)   vec4 [K, N/4] row-major; N is a multiple of 4, the padding columns
//                        hold zeros
//        1 (strided)     B[k, n] = b[k b_sk + n b_sn] for n < b_cols, 0 past it (scalars)
//        2 (head-major)  B[k, n] at the head-major offset of row k, column n (as A's)
//   3  bias    storage, read       vec4 [N/4] (zeros where the layer has no bias)
//   4  c       storage, read_write laid out as HEAD_SPLIT says:
//        false  row-major [M, ldc]; only columns n < n_store are written
//        true   head-major: column n belongs to Q (n < H*Wqk), K (next H*Wqk) or V (last H*Wv);
//               within its section, head h = col / W and d = col % W (W the padded width), and
//               row m = b * seq + t lands at
//                   offset + ((b * H + h) * seq_stride + row_start(b) + t) * S + d
//               for d < S (S = store_qk or store_v, the stored width: padding columns are not
//               written). This fuses the split into heads into the store, so no transpose pass
//               is needed. The layer's qkv buffer: seq_stride = seq, S = W, row_start 0. A KV
//               cache (gemm_rows_cache.wgsl): seq_stride = capacity, S = the head width, and
//               row_start(b) = batch row b's length before the append, read on the GPU.
//   5  row_len uniform             RowLengths (gemm_rows_cache.wgsl only; see there)
//
// Reading the head-major layout lets the gradients of Q, K and V (which the attention's
// backward writes in the qkv buffer's layout) feed the weight gradients directly.
//
// row_start(b) comes from an include ahead of this file: gemm_rows_packed.wgsl (0) or
// gemm_rows_cache.wgsl (a KV cache row's length).
//
// Tiling (tiles.wgsl): a workgroup of TX x TY invocations owns 8 TY rows by 4 TX NV columns of
// C; each invocation 8 rows by NV vec4 column groups (tx + TX c), in named registers. Tiles of
// A (as vec4 along k, rows padded to TK/4 + 1 vec4 so neighbouring rows use distinct banks)
// and B, TK deep, are staged through workgroup memory; each loaded vec4 of B feeds 8 rows. The
// workgroup index comes from dispatch.wgsl (folded grids, chunked dispatches); workgroups past
// the last tile return at once (uniformly).

override TX: u32 = 8u;
override TY: u32 = 8u;
override NV: u32 = 2u;
override TK: u32 = 16u; // a multiple of 4
override HEAD_SPLIT: bool = false;
override A_MODE: u32 = 0u; // 0 strided, 1 head-major
override B_MODE: u32 = 0u; // 0 vec4 rows, 1 strided, 2 head-major

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

@group(0) @binding(0) var<uniform> p: GemmParams;
// Bindings 1 to 4 and their element access (load_a, load_b, load_b4, load_bias4, store_c) come from
// gemm_io_f32.wgsl or gemm_io_f16.wgsl, ahead of this file: the storage precision. The
// arithmetic below is f32 either way.

// a_tile[row * (TK/4 + 1) + k4]: A[row0 + row, k0 + 4 k4 .. + 3].
var<workgroup> a_tile: array<vec4<f32>, 8u * TY * (TK / 4u + 1u)>;
// b_tile[kk * TX * NV + g]: B[k0 + kk, column group g of the tile].
var<workgroup> b_tile: array<vec4<f32>, TK * TX * NV>;

// Where element (row m, column n) of the head-major layout lies, read as written by the
// layer's projection (seq_stride = seq, every column stored): widths are multiples of 4, so
// four neighbouring columns stay inside one head.
fn head_major(m: u32, n: u32) -> u32 {
    let qk_cols = p.heads * p.width_qk;
    var offset = 0u;
    var width = p.width_qk;
    var col = n;
    if (n >= 2u * qk_cols) {
        offset = p.v_offset;
        width = p.width_v;
        col = n - 2u * qk_cols;
    } else if (n >= qk_cols) {
        offset = p.k_offset;
        col = n - qk_cols;
    }
    let h = col / width;
    let d = col % width;
    let bt = m / p.seq;
    let t = m % p.seq;
    return offset + ((bt * p.heads + h) * p.seq + t) * width + d;
}

fn a_at(m: u32, k: u32) -> f32 {
    if (m >= p.m || k >= p.k) {
        return 0.0;
    }
    if (A_MODE == 1u) {
        return load_a(head_major(m, k));
    }
    if (m >= p.a_rows) {
        return 1.0;
    }
    return load_a(m * p.a_sm + k * p.a_sk);
}

// B[k, 4 n4 .. 4 n4 + 3], zero past K and N.
fn b_at4(k: u32, n4: u32) -> vec4<f32> {
    if (k >= p.k || n4 >= p.n / 4u) {
        return vec4<f32>(0.0);
    }
    if (B_MODE == 2u) {
        return load_b4(head_major(k, 4u * n4) / 4u);
    }
    if (B_MODE == 1u) {
        var v = vec4<f32>(0.0);
        for (var c = 0u; c < 4u; c++) {
            let n = 4u * n4 + c;
            if (n < p.b_cols) {
                v[c] = load_b(k * p.b_sk + n * p.b_sn);
            }
        }
        return v;
    }
    return load_b4(k * (p.n / 4u) + n4);
}

fn b_row(kk: u32, tx: u32) -> Row {
    let base = kk * TX * NV + tx;
    var r = Row(b_tile[base], vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0));
    if (NV > 1u) { r.c1 = b_tile[base + TX]; }
    if (NV > 2u) { r.c2 = b_tile[base + 2u * TX]; }
    if (NV > 3u) { r.c3 = b_tile[base + 3u * TX]; }
    return r;
}

fn store4(m: u32, n4: u32, v: vec4<f32>) {
    if (m >= p.m) {
        return;
    }
    let n = n4 * 4u;
    if (HEAD_SPLIT) {
        let qk_cols = p.heads * p.width_qk;
        var offset = 0u;
        var width = p.width_qk;
        var stored = p.store_qk;
        var col = n;
        if (n >= 2u * qk_cols) {
            offset = p.v_offset;
            width = p.width_v;
            stored = p.store_v;
            col = n - 2u * qk_cols;
        } else if (n >= qk_cols) {
            offset = p.k_offset;
            col = n - qk_cols;
        }
        // Widths are multiples of 4, so the four columns stay inside one head.
        let h = col / width;
        let d = col % width;
        let bt = m / p.seq;
        let t = row_start(bt) + m % p.seq;
        let idx = offset + ((bt * p.heads + h) * p.seq_stride + t) * stored + d;
        if (d < stored) { store_c(idx, v.x); }
        if (d + 1u < stored) { store_c(idx + 1u, v.y); }
        if (d + 2u < stored) { store_c(idx + 2u, v.z); }
        if (d + 3u < stored) { store_c(idx + 3u, v.w); }
    } else {
        let idx = m * p.ldc + n;
        if (n < p.n_store) { store_c(idx, v.x); }
        if (n + 1u < p.n_store) { store_c(idx + 1u, v.y); }
        if (n + 2u < p.n_store) { store_c(idx + 2u, v.z); }
        if (n + 3u < p.n_store) { store_c(idx + 3u, v.w); }
    }
}

// Adds the bias and stores one row's NV column groups.
fn store_row(m: u32, g0: u32, tx: u32, r: Row) {
    let n4_total = p.n / 4u;
    for (var cg = 0u; cg < NV; cg++) {
        let n4 = g0 + tx + TX * cg;
        if (n4 < n4_total) {
            store4(m, n4, col_of(r, cg) + load_bias4(n4));
        }
    }
}

@compute @workgroup_size(TX, TY)
fn main(
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let tile = workgroup_index(wid, nwg);
    if (tile >= p.total_tiles) {
        return;
    }
    let bm = 8u * TY;
    let groups = TX * NV;
    let at = tile_origin(tile, p.total_tiles, p.tiles_n, bm, groups);
    let row0 = at.row0;
    let g0 = at.col0;
    let threads = TX * TY;
    let tk4 = TK / 4u;
    let stride = tk4 + 1u;
    let tx = lid.x;
    let r0 = 8u * lid.y;

    var acc = rows_zero();
    for (var k0 = 0u; k0 < p.k; k0 += TK) {
        // A may have any width, so its rows are read as scalars and packed into vec4s.
        for (var e = li; e < bm * tk4; e += threads) {
            let r = e / tk4;
            let k = k0 + 4u * (e % tk4);
            let m = row0 + r;
            a_tile[r * stride + e % tk4] =
                vec4<f32>(a_at(m, k), a_at(m, k + 1u), a_at(m, k + 2u), a_at(m, k + 3u));
        }
        for (var e = li; e < TK * groups; e += threads) {
            b_tile[e] = b_at4(k0 + e / groups, g0 + e % groups);
        }
        workgroupBarrier();
        for (var k4 = 0u; k4 < tk4; k4++) {
            let at = r0 * stride + k4;
            let col = Col8(
                a_tile[at],
                a_tile[at + stride],
                a_tile[at + 2u * stride],
                a_tile[at + 3u * stride],
                a_tile[at + 4u * stride],
                a_tile[at + 5u * stride],
                a_tile[at + 6u * stride],
                a_tile[at + 7u * stride],
            );
            let kk = 4u * k4;
            acc = mma8(acc, col, b_row(kk, tx), b_row(kk + 1u, tx), b_row(kk + 2u, tx), b_row(kk + 3u, tx));
        }
        workgroupBarrier();
    }

    let m0 = row0 + r0;
    for (var r = 0u; r < 8u; r++) {
        store_row(m0 + r, g0, tx, row_of(acc, r));
    }
}
