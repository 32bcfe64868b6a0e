// Weighted sum of the staged attention: O = P V for every (batch, kv head) matrix of packed
// query rows (staged_io.wgsl), each row written where the output's strides put it.
//
// For every batch b, query head h, query i < q_len and value column d < head_dim_v:
//     out[b, h, i, d] = sum over j < kv_len of P[(b heads + h) q_len + i, j] V[b, h / group, j, d]
// P is zero where a key is masked and in the row padding (softmax.wgsl), so only the keys up to
// the block's causal limit are visited.
//
// Bindings (group 0; group 1 is dispatch.wgsl's chunk index):
//   0  p      uniform             StagedParams (staged_io.wgsl)
//   1  probs  storage, read       vec4<f32> [batch, heads, q_len, kvp / 4]
//   2  v      storage, read       read as vec4 through v_at (staged_io_v_out.wgsl: f32, size a
//                                 multiple of 16 bytes; staged_io_v_out_f16.wgsl: f16 widened
//                                 to f32), V [b, kh, j, d] at v_offset + b (sb n + sbc) + kh
//                                 (sh n + shc) + j si + d, n = kv_len
//   3  out    storage, read_write out [b, h, i, d], strides as for V with n = q_len, written
//                                 through store_out (f32, or f16 rounded once as stored)
//   4  lq     uniform, dynamic    Len: q_len
//   5  lkv    uniform, dynamic    Len: kv_len
//
// Tiling (tiles.wgsl): a workgroup of TX x TY invocations owns 8 TY packed rows by 4 TX NV
// value columns of one matrix; each invocation 8 rows by NV vec4 column groups (tx + TX c), in
// named registers. P and V tiles TK keys deep are staged through workgroup memory (P rows padded
// to TK/4 + 1 vec4); each vec4 of V feeds 8 rows, and each block of V serves every query head
// of its group. The workgroup index comes from dispatch.wgsl (folded grids, chunked dispatches).

override TX: u32 = 8u;
override TY: u32 = 8u;
override NV: u32 = 2u;
override TK: u32 = 16u; // a multiple of 4

@group(0) @binding(0) var<uniform> p: StagedParams;
@group(0) @binding(1) var<storage, read> probs: array<vec4<f32>>;
@group(0) @binding(4) var<uniform> lq: Len;
@group(0) @binding(5) var<uniform> lkv: Len;

// p_tile[row * (TK/4 + 1) + k4]: P[row row0 + row, keys k0 + 4 k4 .. + 3].
var<workgroup> p_tile: array<vec4<f32>, 8u * TY * (TK / 4u + 1u)>;
// v_tile[kk * TX * NV + g]: V[key k0 + kk, column group g of the tile].
var<workgroup> v_tile: array<vec4<f32>, TK * TX * NV>;

fn v4(e: u32) -> vec4<f32> {
    let a = v_at(e / 4u);
    if (e % 4u == 0u) { return a; }
    return shifted(a, v_at(e / 4u + 1u), e % 4u);
}

fn v_row(kk: u32, tx: u32) -> Row {
    let base = kk * TX * NV + tx;
    var r = Row(v_tile[base], vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0));
    if (NV > 1u) { r.c1 = v_tile[base + TX]; }
    if (NV > 2u) { r.c2 = v_tile[base + 2u * TX]; }
    if (NV > 3u) { r.c3 = v_tile[base + 3u * TX]; }
    return r;
}

// Stores packed row r's output: column groups g0 + tx + TX c, dropping rows past the packed
// rows and columns past head_dim_v.
fn store_row(mat: u32, r: u32, g0: u32, tx: u32, x: Row) {
    if (r >= packed_rows()) {
        return;
    }
    let at = row_at(mat, r);
    let base = p.o_offset + at.b * (p.o_sb * lq.n + p.o_sbc) + at.h * (p.o_sh * lq.n + p.o_shc) + at.i * p.o_si;
    for (var c = 0u; c < NV; c++) {
        let x4 = col_of(x, c);
        let d0 = 4u * (g0 + tx + TX * c);
        for (var e = 0u; e < 4u; e++) {
            if (d0 + e < p.head_dim_v) {
                store_out(base + d0 + e, x4[e]);
            }
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
    let bm = 8u * TY;
    let groups = TX * NV;
    let rows = packed_rows();
    let tiles_n = (p.dvp4 + groups - 1u) / groups;
    let per_mat = tiles_n * ((rows + bm - 1u) / bm);
    let tile = workgroup_index(wid, nwg);
    if (tile >= per_mat * p.batch * p.kv_heads) {
        return;
    }
    let at = tile_origin(tile, per_mat, tiles_n, bm, groups);
    let mat = at.mat;
    let row0 = at.row0;
    let g0 = at.col0;
    let n4 = kvp() / 4u;
    let threads = TX * TY;
    let tk4 = TK / 4u;
    let stride = tk4 + 1u;
    let tx = lid.x;
    let r0 = 8u * lid.y;
    let p_base = mat * rows;
    let v_head = p.v_offset + (mat / p.kv_heads) * (p.v_sb * lkv.n + p.v_sbc) + (mat % p.kv_heads) * (p.v_sh * lkv.n + p.v_shc);
    let key_end = block_key_end(row0, min(bm, rows - row0));

    var acc = rows_zero();
    for (var k0 = 0u; k0 < key_end; k0 += TK) {
        for (var e = li; e < bm * tk4; e += threads) {
            let r = e / tk4;
            let j4 = k0 / 4u + e % tk4;
            var x = vec4<f32>(0.0);
            if (row0 + r < rows && j4 < n4) {
                x = probs[(p_base + row0 + r) * n4 + j4];
            }
            p_tile[r * stride + e % tk4] = x;
        }
        for (var e = li; e < TK * groups; e += threads) {
            let j = k0 + e / groups;
            let c4 = g0 + e % groups;
            var x = vec4<f32>(0.0);
            if (j < lkv.n && c4 < p.dvp4) {
                x = clip(v4(v_head + j * p.v_si + 4u * c4), c4, p.head_dim_v);
            }
            v_tile[e] = x;
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

    for (var r = 0u; r < 8u; r++) {
        store_row(mat, row0 + r0 + r, g0, tx, row_of(acc, r));
    }
}
