// Projection GEMM with bias: C = A · B + bias, the `x @ W` of the worked example.
//
// Computes, for every row m < M and (padded) column n < N:
//     C[m, n] = bias[n] + sum_k A[m, k] * B[k, n]
// once for the fused Q|K|V projection (the three weights side by side) and once for the output
// projection.
//
// Bindings (group 0):
//   0  params  uniform             GemmParams, below
//   1  a       storage, read       f32 [M, K] row-major (x, or the concatenated heads); any K
//   2  b       storage, read       vec4<f32> [K, N/4] row-major; N is a multiple of 4, the padding
//                                  columns hold zeros
//   3  bias    storage, read       vec4<f32> [N/4] (zeros where the layer has no bias)
//   4  c       storage, read_write f32, laid out as HEAD_SPLIT says:
//        false  row-major [M, ldc]; only columns n < n_store are written
//        true   the head-major qkv buffer: column n belongs to Q (n < H*Wqk), K (next H*Wqk) or
//               V (last H*Wv); within its section, head h = col / W and d = col % W, and row
//               m = b * seq + t lands at offset + ((b * H + h) * seq + t) * W + d. This fuses the
//               split into heads into the store, so no transpose pass is needed.
//
// Tiling: a workgroup of WG_X x WG_Y invocations owns a (4 WG_Y) x (4 WG_X) tile of C; each
// invocation owns a 4 x 4 block, kept in four named vec4 accumulators (naga turns arrays indexed
// by loop variables into memory round-trips). Tiles of A and B, TILE_K deep, are staged through
// workgroup memory: A transposed so that four consecutive rows are one vec4, B as vec4 rows.
// The grid may be folded into 2D/3D to respect max_compute_workgroups_per_dimension, so the
// workgroup id is linearised and workgroups past the last tile return at once (uniformly).

override WG_X: u32 = 16u;
override WG_Y: u32 = 16u;
override TILE_K: u32 = 16u;
override HEAD_SPLIT: bool = false;

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

@group(0) @binding(0) var<uniform> p: GemmParams;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> bias: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> c: array<f32>;

// a_tile[kk * WG_Y + r4] holds rows 4 r4 .. 4 r4 + 3 of column kk of the A tile.
var<workgroup> a_tile: array<vec4<f32>, TILE_K * WG_Y>;
// b_tile[kk * WG_X + c4] holds columns 4 c4 .. 4 c4 + 3 of row kk of the B tile.
var<workgroup> b_tile: array<vec4<f32>, TILE_K * WG_X>;

fn store4(m: u32, n4: u32, v: vec4<f32>) {
    if (m >= p.m) {
        return;
    }
    let n = n4 * 4u;
    if (HEAD_SPLIT) {
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
        // Widths are multiples of 4, so the four columns stay inside one head.
        let h = col / width;
        let d = col % width;
        let bt = m / p.seq;
        let t = m % p.seq;
        let idx = offset + ((bt * p.heads + h) * p.seq + t) * width + d;
        c[idx] = v.x;
        c[idx + 1u] = v.y;
        c[idx + 2u] = v.z;
        c[idx + 3u] = v.w;
    } else {
        let idx = m * p.ldc + n;
        if (n < p.n_store) { c[idx] = v.x; }
        if (n + 1u < p.n_store) { c[idx + 1u] = v.y; }
        if (n + 2u < p.n_store) { c[idx + 2u] = v.z; }
        if (n + 3u < p.n_store) { c[idx + 3u] = v.w; }
    }
}

@compute @workgroup_size(WG_X, WG_Y)
fn main(
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let tile = wid.x + nwg.x * (wid.y + nwg.y * wid.z);
    if (tile >= p.total_tiles) {
        return;
    }
    let row0 = (tile / p.tiles_n) * 4u * WG_Y;
    let col4_0 = (tile % p.tiles_n) * WG_X;
    let n4_total = p.n / 4u;
    let threads = WG_X * WG_Y;

    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);

    for (var k0 = 0u; k0 < p.k; k0 += TILE_K) {
        // Consecutive invocations read consecutive k of one row of A: coalesced.
        for (var e = li; e < 4u * WG_Y * TILE_K; e += threads) {
            let r = e / TILE_K;
            let kk = e % TILE_K;
            let m = row0 + r;
            let k = k0 + kk;
            var v = 0.0;
            if (m < p.m && k < p.k) {
                v = a[m * p.k + k];
            }
            a_tile[kk * WG_Y + r / 4u][r % 4u] = v;
        }
        for (var e = li; e < TILE_K * WG_X; e += threads) {
            let kk = e / WG_X;
            let c4 = e % WG_X;
            let k = k0 + kk;
            let n4 = col4_0 + c4;
            var v = vec4<f32>(0.0);
            if (k < p.k && n4 < n4_total) {
                v = b[k * n4_total + n4];
            }
            b_tile[e] = v;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < TILE_K; kk++) {
            let av = a_tile[kk * WG_Y + lid.y];
            let bv = b_tile[kk * WG_X + lid.x];
            acc0 += av.x * bv;
            acc1 += av.y * bv;
            acc2 += av.z * bv;
            acc3 += av.w * bv;
        }
        workgroupBarrier();
    }

    let n4 = col4_0 + lid.x;
    if (n4 >= n4_total) {
        return;
    }
    let bias4 = bias[n4];
    let m0 = row0 + 4u * lid.y;
    store4(m0, n4, acc0 + bias4);
    store4(m0 + 1u, n4, acc1 + bias4);
    store4(m0 + 2u, n4, acc2 + bias4);
    store4(m0 + 3u, n4, acc3 + bias4);
}
