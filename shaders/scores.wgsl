// Scores of the staged attention: S = Q Kᵀ, unscaled, for every (batch, kv head) matrix of
// packed query rows (staged_io.wgsl) by every key.
//
// For every batch b, query head h, query i < q_len and key j < kv_len:
//     S[(b heads + h) q_len + i, j] = dot(Q[b, h, i, :], K[b, h / group, j, :])
// The softmax (softmax.wgsl) applies the scale, the bias and every mask: keeping S unscaled lets
// it take each row's maximum before any product with the scale is formed, so no finite scale
// overflows. Entries a causal mask hides from the whole tile are not computed (nor written); the
// row padding j >= kv_len is not written: the softmax reads neither.
//
// Bindings (group 0; group 1 is dispatch.wgsl's chunk index):
//   0  p    uniform             StagedParams (staged_io.wgsl)
//   1  q    storage, read       read as vec4 through q_at (staged_io_qk.wgsl: f32, size a
//                               multiple of 16 bytes; staged_io_qk_f16.wgsl: f16 widened to
//                               f32 as it is loaded), Q [b, h, i, d] at q_offset + b (sb n +
//                               sbc) + h (sh n + shc) + i si + d, n = q_len
//   2  k    storage, read       as q (k_at): K [b, kh, j, d], n = kv_len
//   3  s    storage, read_write f32 [batch, heads, q_len, kvp] (kvp = kv_len padded to 4)
//   4  lq   uniform, dynamic    Len: q_len
//   5  lkv  uniform, dynamic    Len: kv_len
//
// Tiling (tiles.wgsl, score_tile.wgsl): a workgroup of TX x TY invocations owns 8 TY packed
// rows by 8 TX keys of one matrix; each invocation 8 rows by 8 keys (keys tx + TX j), 64 scores
// in named registers, from Q and K staged DK columns at a time; each loaded vec4 feeds 8 dot
// products, and each block of K serves every query head of its group. The workgroup index comes
// from dispatch.wgsl (folded grids, chunked dispatches).

override TX: u32 = 8u;
override TY: u32 = 8u;
override DK: u32 = 16u; // a multiple of 4
override NV: u32 = 1u;  // tiles.wgsl's row helpers need it; the scores use none

@group(0) @binding(0) var<uniform> p: StagedParams;
@group(0) @binding(3) var<storage, read_write> s: array<f32>;
@group(0) @binding(4) var<uniform> lq: Len;
@group(0) @binding(5) var<uniform> lkv: Len;

// Q rows at [row * (DK/4 + 1) + d4], then K rows at 8 TY (DK/4 + 1) + [key * (DK/4 + 1) + d4].
var<workgroup> stage: array<vec4<f32>, (8u * TY + 8u * TX) * (DK / 4u + 1u)>;

// The four elements from element e on, each read as vec4: one load when e is a multiple of 4
// (every layer and every app tensor whose widths, strides and offsets are), two otherwise.
fn q4(e: u32) -> vec4<f32> {
    let a = q_at(e / 4u);
    if (e % 4u == 0u) { return a; }
    return shifted(a, q_at(e / 4u + 1u), e % 4u);
}

fn k4(e: u32) -> vec4<f32> {
    let a = k_at(e / 4u);
    if (e % 4u == 0u) { return a; }
    return shifted(a, k_at(e / 4u + 1u), e % 4u);
}

// vec4 d4 of packed row r's query (score_tile.wgsl): zero past the rows and head_dim.
fn load_q4(mat: u32, r: u32, d4: u32) -> vec4<f32> {
    if (r >= packed_rows() || d4 >= p.dp4) {
        return vec4<f32>(0.0);
    }
    let a = row_at(mat, r);
    let base = p.q_offset + a.b * (p.q_sb * lq.n + p.q_sbc) + a.h * (p.q_sh * lq.n + p.q_shc) + a.i * p.q_si;
    return clip(q4(base + 4u * d4), d4, p.head_dim);
}

// vec4 d4 of key j of the kv head of `mat`: zero past kv_len and head_dim.
fn load_k4(mat: u32, j: u32, d4: u32) -> vec4<f32> {
    if (j >= lkv.n || d4 >= p.dp4) {
        return vec4<f32>(0.0);
    }
    let b = mat / p.kv_heads;
    let kh = mat % p.kv_heads;
    let base = p.k_offset + b * (p.k_sb * lkv.n + p.k_sbc) + kh * (p.k_sh * lkv.n + p.k_shc) + j * p.k_si;
    return clip(k4(base + 4u * d4), d4, p.head_dim);
}

@compute @workgroup_size(TX, TY)
fn main(
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let bm = 8u * TY;
    let bn = 8u * TX;
    let rows = packed_rows();
    let tiles_n = (lkv.n + bn - 1u) / bn;
    let per_mat = tiles_n * ((rows + bm - 1u) / bm);
    let tile = workgroup_index(wid, nwg);
    // The grid is sized for the call's lengths by the host; anything past them does nothing.
    if (tile >= per_mat * p.batch * p.kv_heads) {
        return;
    }
    let at = tile_origin(tile, per_mat, tiles_n, bm, bn);
    let mat = at.mat;
    let tx = lid.x;

    var acc = scores_zero();
    // Keys past every row's causal limit: nothing the softmax will read.
    if (at.col0 < block_key_end(at.row0, min(bm, rows - at.row0))) {
        acc = score_tile(mat, at.row0, at.col0, tx, lid.y, li);
    }

    let kp = kvp();
    for (var r = 0u; r < 8u; r++) {
        let row = at.row0 + 8u * lid.y + r;
        if (row >= rows) {
            break;
        }
        let x = keys_of(acc, r);
        let base = (mat * rows + row) * kp;
        for (var j = 0u; j < 8u; j++) {
            let key = at.col0 + tx + TX * j;
            if (key < lkv.n) {
                s[base + key] = select(x.b[j % 4u], x.a[j % 4u], j < 4u);
            }
        }
    }
}
