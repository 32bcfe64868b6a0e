// Score matrix: S = scale · Q Kᵀ per (batch, head), masked.
//
// Computes, for every batch·head bh and query i, key j < seq:
//     S[bh, i, j] = scale * dot(Q[bh, i, :], K[bh, j, :])   where query i may attend key j
//     S[bh, i, j] = -inf                                     where it may not (causal: j > i;
//                                                            padding: key_mask[b, j] == 0)
// Columns seq .. seq_pad - 1 (row padding) are left alone: softmax.wgsl never reads them.
//
// Bindings (group 0; group 1 is dispatch.wgsl's chunk index):
//   0  params    uniform             ScoreParams, below
//   1  qkv       storage, read       vec4<f32>; Q at q_offset4 and K at k_offset4, each head-major
//                                    [batch, heads, seq, dp4] (head width padded with zeros to a
//                                    multiple of 4)
//   2  key_mask  storage, read       u32 [batch, seq]; 0 = padding (read only if has_mask != 0)
//   3  scores    storage, read_write f32 [batch * heads, seq, seq_pad]
//
// Tiling (tiles.wgsl, score_tile.wgsl): a workgroup of TX x TY invocations owns 8 TY queries by
// 8 TX keys of one head; each invocation 8 queries by 8 keys (keys tx + TX j), 64 scores in
// named registers, from Q and K staged DK columns at a time; each loaded vec4 feeds 8 dot
// products. Causal tiles wholly above the diagonal skip the products and only write -inf. The
// workgroup index comes from dispatch.wgsl (folded grids, chunked dispatches).

override TX: u32 = 8u;
override TY: u32 = 8u;
override DK: u32 = 16u; // a multiple of 4
override NV: u32 = 1u;  // tiles.wgsl's row helpers need it; the scores use none

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
    // -inf, passed in: WGSL makes an infinite constant expression a compile error (Tint rejects
    // even a bitcast of its bits), so the value must come from outside the shader.
    neg_inf: f32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: ScoreParams;
@group(0) @binding(1) var<storage, read> qkv: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> key_mask: array<u32>;
@group(0) @binding(3) var<storage, read_write> scores: array<f32>;

// Q rows at [row * (DK/4 + 1) + d4], then K rows at 8 TY (DK/4 + 1) + [key * (DK/4 + 1) + d4].
var<workgroup> stage: array<vec4<f32>, (8u * TY + 8u * TX) * (DK / 4u + 1u)>;

// vec4 d4 of query row i (key row j) of head bh, for score_tile.wgsl: zero past seq and dp4.
fn load_q4(bh: u32, i: u32, d4: u32) -> vec4<f32> {
    if (i < p.seq && d4 < p.dp4) {
        return qkv[p.q_offset4 + (bh * p.seq + i) * p.dp4 + d4];
    }
    return vec4<f32>(0.0);
}

fn load_k4(bh: u32, j: u32, d4: u32) -> vec4<f32> {
    if (j < p.seq && d4 < p.dp4) {
        return qkv[p.k_offset4 + (bh * p.seq + j) * p.dp4 + d4];
    }
    return vec4<f32>(0.0);
}

fn masked(b: u32, i: u32, j: u32) -> bool {
    if (p.causal != 0u && j > i) {
        return true;
    }
    return p.has_mask != 0u && key_mask[b * p.seq + j] == 0u;
}

fn store_row(bh: u32, b: u32, i: u32, col0: u32, tx: u32, s: Keys8) {
    if (i >= p.seq) {
        return;
    }
    let base = (bh * p.seq + i) * p.seq_pad;
    for (var j = 0u; j < 8u; j++) {
        let key = col0 + tx + TX * j;
        var v = s.a[j % 4u];
        if (j >= 4u) {
            v = s.b[j % 4u];
        }
        if (key < p.seq) {
            scores[base + key] = select(p.scale * v, p.neg_inf, masked(b, i, key));
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
    let bn = 8u * TX;
    let at = tile_origin(tile, p.tiles_per_head, p.tiles_n, bm, bn);
    let bh = at.mat;
    let b = bh / p.heads;
    let row0 = at.row0;
    let col0 = at.col0;
    let tx = lid.x;
    let r0 = 8u * lid.y;

    var acc = scores_zero();
    // Every key of this tile lies after every query of it: all masked, nothing to compute.
    if (!(p.causal != 0u && col0 > row0 + bm - 1u)) {
        acc = score_tile(bh, row0, col0, tx, lid.y, li);
    }

    let i0 = row0 + r0;
    for (var r = 0u; r < 8u; r++) {
        store_row(bh, b, i0 + r, col0, tx, keys_of(acc, r));
    }
}
