// Weighted sum of the values: O = P V per (batch, head), heads concatenated on the way out.
//
// Computes, for every batch b, head h, query i < seq and value column d < head_dim_v:
//     out[b, i, h * head_dim_v + d] = sum_j P[bh, i, j] * V[bh, j, d]      (bh = b * heads + h)
// which is steps 6 and 7 of the worked example (weight every value, sum) for all queries at once.
//
// Bindings (group 0; group 1 is dispatch.wgsl's chunk index):
//   0  params  uniform             WeightedSumParams, below
//   1  probs   storage, read       vec4<f32> [batch * heads, seq, seq_pad / 4]; zero where masked
//                                  and in the row padding
//   2  qkv     storage, read       vec4<f32>; V at v_offset4, head-major [batch, heads, seq, dvp4]
//                                  (value width padded with zeros to a multiple of 4)
//   3  out     storage, read_write f32 [batch, seq, out_stride]; this head's columns start at
//                                  h * head_dim_v
//
// Tiling (tiles.wgsl): a workgroup of TX x TY invocations owns 8 TY queries by 4 TX NV value
// columns of one head; each invocation 8 queries by NV vec4 column groups (tx + TX c), in named
// registers. P and V tiles TK keys deep are staged through workgroup memory as straight vec4
// copies (P rows padded to TK/4 + 1 vec4); each vec4 of V feeds 8 queries. With causal masking
// the walk over keys stops after the tile's last query (P is zero beyond it). The workgroup id
// is dispatch.wgsl's workgroup index (folded grids, chunked dispatches).

override TX: u32 = 8u;
override TY: u32 = 8u;
override NV: u32 = 2u;
override TK: u32 = 16u; // a multiple of 4

struct WeightedSumParams {
    seq: u32,
    seq_pad: u32,
    heads: u32,
    dvp4: u32,
    head_dim_v: u32,
    v_offset4: u32,
    out_stride: u32,
    tiles_n: u32,
    tiles_per_head: u32,
    total_tiles: u32,
    causal: u32,
    _pad0: u32,
}

@group(0) @binding(0) var<uniform> p: WeightedSumParams;
@group(0) @binding(1) var<storage, read> probs: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> qkv: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

// p_tile[row * (TK/4 + 1) + k4]: P[query row0 + row, keys k0 + 4 k4 .. + 3].
var<workgroup> p_tile: array<vec4<f32>, 8u * TY * (TK / 4u + 1u)>;
// v_tile[kk * TX * NV + g]: V[key k0 + kk, column group g of the tile].
var<workgroup> v_tile: array<vec4<f32>, TK * TX * NV>;

fn v_row(kk: u32, tx: u32) -> Row {
    let base = kk * TX * NV + tx;
    var r = Row(v_tile[base], vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0));
    if (NV > 1u) { r.c1 = v_tile[base + TX]; }
    if (NV > 2u) { r.c2 = v_tile[base + 2u * TX]; }
    if (NV > 3u) { r.c3 = v_tile[base + 3u * TX]; }
    return r;
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
    let at = tile_origin(tile, p.tiles_per_head, p.tiles_n, bm, groups);
    let bh = at.mat;
    let row0 = at.row0;
    let g0 = at.col0;
    let n4 = p.seq_pad / 4u;
    let threads = TX * TY;
    let tk4 = TK / 4u;
    let stride = tk4 + 1u;
    let tx = lid.x;
    let r0 = 8u * lid.y;
    let v_base = p.v_offset4 + bh * p.seq * p.dvp4;

    var key_end = p.seq;
    if (p.causal != 0u) {
        key_end = min(p.seq, row0 + bm);
    }

    var acc = rows_zero();
    for (var k0 = 0u; k0 < key_end; k0 += TK) {
        for (var e = li; e < bm * tk4; e += threads) {
            let r = e / tk4;
            let i = row0 + r;
            let j4 = k0 / 4u + e % tk4;
            var v = vec4<f32>(0.0);
            if (i < p.seq && j4 < n4) {
                v = probs[(bh * p.seq + i) * n4 + j4];
            }
            p_tile[r * stride + e % tk4] = v;
        }
        for (var e = li; e < TK * groups; e += threads) {
            let j = k0 + e / groups;
            let c4 = g0 + e % groups;
            var v = vec4<f32>(0.0);
            if (j < p.seq && c4 < p.dvp4) {
                v = qkv[v_base + j * p.dvp4 + c4];
            }
            v_tile[e] = v;
        }
        workgroupBarrier();
        for (var k4 = 0u; k4 < tk4; k4++) {
            let at = r0 * stride + k4;
            let col = Col8(
                p_tile[at],
                p_tile[at + stride],
                p_tile[at + 2u * stride],
                p_tile[at + 3u * stride],
                p_tile[at + 4u * stride],
                p_tile[at + 5u * stride],
                p_tile[at + 6u * stride],
                p_tile[at + 7u * stride],
            );
            let kk = 4u * k4;
            acc = mma8(acc, col, v_row(kk, tx), v_row(kk + 1u, tx), v_row(kk + 2u, tx), v_row(kk + 3u, tx));
        }
        workgroupBarrier();
    }

    let b = bh / p.heads;
    let h = bh % p.heads;
    let i0 = row0 + r0;
    for (var r = 0u; r < 8u; r++) {
        store_head_row(b, h, i0 + r, g0, tx, row_of(acc, r));
    }
}
