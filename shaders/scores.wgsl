// Score matrix: S = scale · Q K^T per (batch, head), masked.
//
// Computes, for every batch·head bh and query i, key j < seq:
//     S[bh, i, j] = scale * dot(Q[bh, i, :], K[bh, j, :])   where query i may attend key j
//     S[bh, i, j] = -inf                                     where it may not (causal: j > i;
//                                                            padding: key_mask[b, j] == 0)
// Columns seq .. seq_pad - 1 (row padding) are written as -inf too.
//
// Bindings (group 0):
//   0  params    uniform             ScoreParams, below
//   1  qkv       storage, read       vec4<f32>; Q at q_offset4 and K at k_offset4, each head-major
//                                    [batch, heads, seq, dp4] (head width padded with zeros to a
//                                    multiple of 4)
//   2  key_mask  storage, read       u32 [batch, seq]; 0 = padding (read only if has_mask != 0)
//   3  scores    storage, read_write vec4<f32> [batch * heads, seq, seq_pad / 4]
//
// Tiling as in gemm.wgsl: a (4 WG_Y) x (4 WG_X) tile of S per workgroup, 4 x 4 per invocation in
// named vec4 accumulators, Q and K tiles TILE_K deep staged transposed in workgroup memory and
// loaded as vec4 along the head dimension. Causal tiles wholly above the diagonal skip the
// products and only write -inf. The workgroup id is linearised over a possibly folded grid.

override WG_X: u32 = 16u;
override WG_Y: u32 = 16u;
override TILE_K: u32 = 16u; // a multiple of 4

struct ScoreParams {
    seq: u32,
    seq_pad: u32,
    heads: u32,
    dp4: u32,
    q_offset4: u32,
    k_offset4: u32,
    tiles_n: u32,
    tiles_per_head: u32,
    total_tiles: u32,
    causal: u32,
    has_mask: u32,
    scale: f32,
}

@group(0) @binding(0) var<uniform> p: ScoreParams;
@group(0) @binding(1) var<storage, read> qkv: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> key_mask: array<u32>;
@group(0) @binding(3) var<storage, read_write> scores: array<vec4<f32>>;

// q_tile[kk * WG_Y + r4]: queries 4 r4 .. 4 r4 + 3 at depth kk; k_tile likewise for keys.
var<workgroup> q_tile: array<vec4<f32>, TILE_K * WG_Y>;
var<workgroup> k_tile: array<vec4<f32>, TILE_K * WG_X>;

fn neg_inf() -> f32 {
    return bitcast<f32>(0xff800000u);
}

fn masked(b: u32, i: u32, j: u32) -> bool {
    if (j >= p.seq) {
        return true;
    }
    if (p.causal != 0u && j > i) {
        return true;
    }
    return p.has_mask != 0u && key_mask[b * p.seq + j] == 0u;
}

// Loads rows row0 .. row0 + 4 n4_rows - 1 of one head's Q or K, depth k0 .. k0 + TILE_K - 1,
// transposed into q_tile (to_q) or k_tile.
fn load_tile(to_q: bool, offset4: u32, bh: u32, row0: u32, rows: u32, k0: u32, li: u32) {
    let depth4 = TILE_K / 4u;
    for (var e = li; e < rows * depth4; e += WG_X * WG_Y) {
        let r = e / depth4;
        let kq = e % depth4;
        let row = row0 + r;
        let d4 = k0 / 4u + kq;
        var v = vec4<f32>(0.0);
        if (row < p.seq && d4 < p.dp4) {
            v = qkv[offset4 + (bh * p.seq + row) * p.dp4 + d4];
        }
        let kk = 4u * kq;
        if (to_q) {
            q_tile[kk * WG_Y + r / 4u][r % 4u] = v.x;
            q_tile[(kk + 1u) * WG_Y + r / 4u][r % 4u] = v.y;
            q_tile[(kk + 2u) * WG_Y + r / 4u][r % 4u] = v.z;
            q_tile[(kk + 3u) * WG_Y + r / 4u][r % 4u] = v.w;
        } else {
            k_tile[kk * WG_X + r / 4u][r % 4u] = v.x;
            k_tile[(kk + 1u) * WG_X + r / 4u][r % 4u] = v.y;
            k_tile[(kk + 2u) * WG_X + r / 4u][r % 4u] = v.z;
            k_tile[(kk + 3u) * WG_X + r / 4u][r % 4u] = v.w;
        }
    }
}

fn store_row(bh: u32, b: u32, i: u32, j0: u32, acc: vec4<f32>) {
    if (i >= p.seq || j0 >= p.seq_pad) {
        return;
    }
    var out = acc * p.scale;
    for (var c = 0u; c < 4u; c++) {
        if (masked(b, i, j0 + c)) {
            out[c] = neg_inf();
        }
    }
    scores[((bh * p.seq + i) * p.seq_pad + j0) / 4u] = out;
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
    let b = bh / p.heads;
    let in_head = tile % p.tiles_per_head;
    let row0 = (in_head / p.tiles_n) * 4u * WG_Y;
    let col0 = (in_head % p.tiles_n) * 4u * WG_X;

    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);

    // Every key of this tile lies after every query of it: all masked, nothing to compute.
    let above_diagonal = p.causal != 0u && col0 > row0 + 4u * WG_Y - 1u;
    if (!above_diagonal) {
        for (var k0 = 0u; k0 < 4u * p.dp4; k0 += TILE_K) {
            load_tile(true, p.q_offset4, bh, row0, 4u * WG_Y, k0, li);
            load_tile(false, p.k_offset4, bh, col0, 4u * WG_X, k0, li);
            workgroupBarrier();
            for (var kk = 0u; kk < TILE_K; kk++) {
                let qv = q_tile[kk * WG_Y + lid.y];
                let kv = k_tile[kk * WG_X + lid.x];
                acc0 += qv.x * kv;
                acc1 += qv.y * kv;
                acc2 += qv.z * kv;
                acc3 += qv.w * kv;
            }
            workgroupBarrier();
        }
    }

    let i0 = row0 + 4u * lid.y;
    let j0 = col0 + 4u * lid.x;
    store_row(bh, b, i0, j0, acc0);
    store_row(bh, b, i0 + 1u, j0, acc1);
    store_row(bh, b, i0 + 2u, j0, acc2);
    store_row(bh, b, i0 + 3u, j0, acc3);
}
