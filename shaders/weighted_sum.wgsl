// Weighted sum of the values: O = P V per (batch, head), heads concatenated on the way out.
//
// Computes, for every batch b, head h, query i < seq and value column d < head_dim_v:
//     out[b, i, h * head_dim_v + d] = sum_j P[bh, i, j] * V[bh, j, d]      (bh = b * heads + h)
// which is steps 6 and 7 of the worked example (weight every value, sum) for all queries at once.
//
// Bindings (group 0):
//   0  params  uniform             WeightedSumParams, below
//   1  probs   storage, read       vec4<f32> [batch * heads, seq, seq_pad / 4]; zero where masked
//                                  and in the row padding
//   2  qkv     storage, read       vec4<f32>; V at v_offset4, head-major [batch, heads, seq, dvp4]
//                                  (value width padded with zeros to a multiple of 4)
//   3  out     storage, read_write f32 [batch, seq, out_stride]; this head's columns start at
//                                  h * head_dim_v
//
// Tiling as in gemm.wgsl: a (4 WG_Y) x (4 WG_X) tile of O (queries x value columns) per
// workgroup, 4 x 4 per invocation in named vec4 accumulators, P and V tiles TILE_K keys deep
// staged in workgroup memory with vec4 loads. With causal masking the walk over keys stops after
// the tile's last query (P is zero beyond it). The workgroup id is linearised over a possibly
// folded grid.

override WG_X: u32 = 16u;
override WG_Y: u32 = 16u;
override TILE_K: u32 = 16u; // a multiple of 4

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

// p_tile[kk * WG_Y + r4]: probabilities of queries 4 r4 .. 4 r4 + 3 for key kk of the tile.
var<workgroup> p_tile: array<vec4<f32>, TILE_K * WG_Y>;
// v_tile[kk * WG_X + c4]: value columns 4 c4 .. 4 c4 + 3 of key kk of the tile.
var<workgroup> v_tile: array<vec4<f32>, TILE_K * WG_X>;

fn store_row(b: u32, h: u32, i: u32, d0: u32, acc: vec4<f32>) {
    if (i >= p.seq) {
        return;
    }
    let base = (b * p.seq + i) * p.out_stride + h * p.head_dim_v;
    for (var c = 0u; c < 4u; c++) {
        if (d0 + c < p.head_dim_v) {
            out[base + d0 + c] = acc[c];
        }
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
    let bh = tile / p.tiles_per_head;
    let in_head = tile % p.tiles_per_head;
    let row0 = (in_head / p.tiles_n) * 4u * WG_Y;
    let col4_0 = (in_head % p.tiles_n) * WG_X;
    let n4 = p.seq_pad / 4u;
    let depth4 = TILE_K / 4u;

    var key_end = p.seq;
    if (p.causal != 0u) {
        key_end = min(p.seq, row0 + 4u * WG_Y);
    }

    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);

    for (var k0 = 0u; k0 < key_end; k0 += TILE_K) {
        for (var e = li; e < 4u * WG_Y * depth4; e += WG_X * WG_Y) {
            let r = e / depth4;
            let kq = e % depth4;
            let i = row0 + r;
            let j4 = k0 / 4u + kq;
            var v = vec4<f32>(0.0);
            if (i < p.seq && j4 < n4) {
                v = probs[(bh * p.seq + i) * n4 + j4];
            }
            let kk = 4u * kq;
            p_tile[kk * WG_Y + r / 4u][r % 4u] = v.x;
            p_tile[(kk + 1u) * WG_Y + r / 4u][r % 4u] = v.y;
            p_tile[(kk + 2u) * WG_Y + r / 4u][r % 4u] = v.z;
            p_tile[(kk + 3u) * WG_Y + r / 4u][r % 4u] = v.w;
        }
        for (var e = li; e < TILE_K * WG_X; e += WG_X * WG_Y) {
            let kk = e / WG_X;
            let c4 = col4_0 + e % WG_X;
            let j = k0 + kk;
            var v = vec4<f32>(0.0);
            if (j < p.seq && c4 < p.dvp4) {
                v = qkv[p.v_offset4 + (bh * p.seq + j) * p.dvp4 + c4];
            }
            v_tile[e] = v;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < TILE_K; kk++) {
            let pv = p_tile[kk * WG_Y + lid.y];
            let vv = v_tile[kk * WG_X + lid.x];
            acc0 += pv.x * vv;
            acc1 += pv.y * vv;
            acc2 += pv.z * vv;
            acc3 += pv.w * vv;
        }
        workgroupBarrier();
    }

    let b = bh / p.heads;
    let h = bh % p.heads;
    let i0 = row0 + 4u * lid.y;
    let d0 = 4u * (col4_0 + lid.x);
    store_row(b, h, i0, d0, acc0);
    store_row(b, h, i0 + 1u, d0, acc1);
    store_row(b, h, i0 + 2u, d0, acc2);
    store_row(b, h, i0 + 3u, d0, acc3);
}
