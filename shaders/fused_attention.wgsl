// Fused attention (FlashAttention-2 style): O = softmax(scale · Q Kᵀ + bias, masked) V without
// ever storing the score matrix. The one attention core: the layer (after its projection) and
// the operator on an application's own Q, K and V both run it.
//
// For every batch b, query head h (of `heads`) and query i < q_len, with kv head
// kh = h / group (group = heads / kv_heads: MHA when 1, MQA when heads):
//     out[b, h, i, :] = sum_j p_ij V[b, kh, j, :] / sum_j p_ij,
//     p_ij = exp(scale · Q[b, h, i]·K[b, kh, j] + bias[b, h, i, j] - m_i) over the keys j < kv_len
//     that query i may attend, m_i their maximum.
// Masks: causal aligned to the END of the keys (FlashAttention-2's convention, the one a KV
// cache needs): j <= i + kv_len - q_len; padding: key_mask[b, j] == 0; a bias of -inf also
// masks. A query with no key to attend gets zeros.
//
// Storage precision: Q, K, V and the output are f32, or f16 in the f16 variants (the
// *_f16.wgsl includes, after f16.wgsl's `enable f16;`), which widen every value to f32 as it is
// loaded and round only the finished output to f16 as it is stored: every dot product, the
// running maximum and sum, exp and the output accumulator are f32 in both, so no score is
// limited to f16's 65504. The mask is u32 and the bias f32 in both.
//
// Tensors are arrays addressed by element offsets and strides, so head-major
// [B, H, N, D] and token-major [B, N, H·D] both work without copies. A stride depends on the
// call's length n (the length of the tensor's sequence axis): batch stride = sb·n + sbc, head
// stride = sh·n + shc, row stride = si (a KV cache's K and V have constant strides: sb = sh = 0). The lengths come from two dynamic-offset uniforms (`lq`, `lkv`)
// that point into a table holding every length up to the plan's maximum, so a plan runs any
// shorter length with nothing written, allocated or compiled per call.
//
// Bindings (group 0; group 1 is dispatch.wgsl's chunk index). The buffers the kernel reads
// come from small include files, chosen by what the call binds (`FusedIo` on the host), so a
// pipeline's layout holds exactly the bindings its kernel reads:
//   0  p         uniform             FusedParams, below
//   1  q         storage, read       fused_io_qkv.wgsl: f32 read as vec4 (size a multiple of 16
//                                    bytes), Q [b, h, i, d] at q_offset + b (sb n + sbc)
//                                    + h (sh n + shc) + i si + d
//   2  k         storage, read       as q: K [b, kh, j, d], n = kv_len
//   3  v         storage, read       as q: V [b, kh, j, d], n = kv_len
//   1  qkv       storage, read       in place of 1-3 (fused_io_qkv_packed.wgsl): Q, K and V in
//                                    one buffer at their offsets, as the layer's projection
//                                    writes them
//   4  key_mask  storage, read       u32 [batch, kv_len]; 0 = padding (fused_io_mask.wgsl;
//                                    absent with fused_io_no_mask.wgsl)
//   5  bias      storage, read       f32 [batch or 1, heads or 1, q_len, kv_len]
//                                    (fused_io_bias.wgsl; absent with fused_io_no_bias.wgsl)
//   6  out       storage, read_write out [b, h, i, d], strides as for Q (fused_io_out.wgsl,
//                                    or fused_io_out_f16.wgsl for f16 storage)
//   7  lq        uniform, dynamic    Len: q_len
//   8  lkv       uniform, dynamic    Len: kv_len
//   9  lse       storage, read_write f32 [batch, heads, q_len]: each row's logsumexp, for the
//                                    backward (fused_io_lse.wgsl, when gradients are wanted;
//                                    absent with fused_io_no_lse.wgsl)
// With packed Q/K/V and no bias the layer binds three storage buffers: within the four per
// shader stage that downlevel devices allow.
//
// GQA without copies: a workgroup works on one (batch, kv head) and packs the `group` query
// heads of that kv head as group · q_len rows (row r: head kh group + r / q_len, query
// r % q_len), so each block of K and V it loads serves every query head of the group.
//
// Tiling (tiles.wgsl): a workgroup of TX x TY invocations owns BR = 8 TY packed query rows and
// walks the keys in blocks of BC = 8 TX; with causal masking it stops after the last key its
// rows may see. Each invocation owns 8 rows (8 ty .. 8 ty + 7):
//   1. S = Q Kᵀ for its 8 rows x 8 keys, 64 scores in named registers: the score kernel's tile,
//      shared with it in score_tile.wgsl (through load_q4 and load_k4 below);
//   2. the online softmax: row maxima and sums combined across the TX invocations of a row
//      through workgroup memory as vec4s, the maxima taken over unscaled scores (times the
//      scale's sign) and the scale applied only to differences from them, so a huge scale
//      cannot overflow; the running max raised, the running sum and the output rescaled by
//      exp(|scale| (m_old - m_new)). With a bias the logits scale · s + bias are formed first
//      (a bias is not a multiple of the scale) and exponentiated unscaled;
//   3. O += P V: P written to workgroup memory, V staged VK keys at a time; each invocation
//      owns 8 rows x NV vec4 columns (columns 4 (tx + TX c)), and each loaded vec4 of V feeds
//      8 rows.
// At the end O is divided by the running sum once. Masked scores never enter exp: they are set
// to LOWEST and selected out. Workgroup rows are padded (stride DK4 + 1 vec4) so that reads of
// eight neighbouring rows fall in distinct banks. The workgroup index comes from
// dispatch.wgsl (folded grids, chunked dispatches).

override TX: u32 = 8u;   // BC = 8 TX keys per block; also the column invocations of O
override TY: u32 = 8u;   // BR = 8 TY query rows per workgroup
override NV: u32 = 2u;   // vec4 columns of O per invocation and row: dvp <= 4 TX NV, NV <= 4
override DK: u32 = 16u;  // head-dim columns of Q and K staged per step (a multiple of 4)
override VK: u32 = 16u;  // keys of V staged per step (a multiple of 4 dividing 8 TX)

// Where this workgroup's rows start, set once by main: the element offset of each of its
// packed query rows (NO_ROW past the rows). Its kv head's (k_head, v_head) is in
// fused_common.wgsl, with the parameters and the loads both fused kernels share.
const NO_ROW: u32 = 0xffffffffu;
// 64 = 8 TY at the largest TY the host picks (rows_per_eight caps TY at 8).
var<workgroup> q_rows: array<u32, 64>;
var<private> row0_p: u32;

// vec4 d4 of packed row r's query: zero past the rows and past head_dim.
fn load_q4(mat: u32, r: u32, d4: u32) -> vec4<f32> {
    let base = q_rows[r - row0_p];
    if (base == NO_ROW || d4 >= p.dp4) {
        return vec4<f32>(0.0);
    }
    return clip(q4(base + 4u * d4), d4, p.head_dim);
}

// Staging, shared by the two phases. Scoring: Q rows at [row * (DK/4 + 1) + d4], then K rows
// at K_AT + [key * (DK/4 + 1) + d4]. Weighting: V rows at [key * TX * NV + c * TX + t].
var<workgroup> stage: array<vec4<f32>, max((8u * TY + 8u * TX) * (DK / 4u + 1u), VK * TX * NV)>;
// P of the current block: p_tile[row * 2 TX + key / 4][key % 4].
var<workgroup> p_tile: array<vec4<f32>, 16u * TY * TX>;
// Per-row partial maxima, then sums, of each invocation: red[t * 2 TY + r4] holds rows
// 4 r4 .. 4 r4 + 3 of invocation column t.
var<workgroup> red: array<vec4<f32>, 2u * TY * TX>;

fn v_row(key: u32, tx: u32) -> Row {
    let base = key * TX * NV + tx;
    var r = Row(stage[base], vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0));
    if (NV > 1u) { r.c1 = stage[base + TX]; }
    if (NV > 2u) { r.c2 = stage[base + 2u * TX]; }
    if (NV > 3u) { r.c3 = stage[base + 3u * TX]; }
    return r;
}

// Whether the eight keys of this invocation in the block starting at kb are real (in range and
// not padding); causality is checked per row.
fn keys_present(b: u32, kb: u32, tx: u32) -> Keys8 {
    var a = vec4<f32>(0.0);
    var c = vec4<f32>(0.0);
    for (var j = 0u; j < 4u; j++) {
        let k0 = kb + tx + TX * j;
        let k1 = kb + tx + TX * (j + 4u);
        if (k0 < lkv.n && key_kept(b, k0)) { a[j] = 1.0; }
        if (k1 < lkv.n && key_kept(b, k1)) { c[j] = 1.0; }
    }
    return Keys8(a, c);
}

// The bias from `base` for keys j (0 past kv_len, where the key is masked anyway).
fn bias4(base: u32, j: vec4<u32>) -> vec4<f32> {
    var x = vec4<f32>(0.0);
    for (var e = 0u; e < 4u; e++) {
        if (j[e] < lkv.n) { x[e] = bias_value(base + j[e]); }
    }
    return x;
}

// Sets a row's masked scores to LOWEST: keys at or past `lim` (its key_limit) and padding.
// Without a bias the others stay unscaled, times the sign of the scale: softmax(scale s) =
// softmax(|scale| (sign s)), and taking the maximum before scaling means no product with the
// scale is formed until after the maximum is subtracted, so no scale that is finite can
// overflow a score into inf - inf = NaN. With a bias (its row from bias_at) they become the
// logits scale · s + bias, and a bias of -inf masks the key (a NaN passes on).
fn mask_row(s: Keys8, present: Keys8, lim: u32, bias_at: u32, kb: u32, tx: u32) -> Keys8 {
    let j_a = vec4<u32>(kb + tx) + vec4<u32>(0u, TX, 2u * TX, 3u * TX);
    let j_b = j_a + vec4<u32>(4u * TX);
    // WGSL requires the parentheses between comparisons and & or |.
    var ok_a = (present.a > vec4<f32>(0.0)) & (j_a < vec4<u32>(lim));
    var ok_b = (present.b > vec4<f32>(0.0)) & (j_b < vec4<u32>(lim));
    let sg = select(1.0, -1.0, p.scale < 0.0);
    var x = Keys8(s.a * sg, s.b * sg);
    if (HAS_BIAS && lim > 0u) {
        x = Keys8(s.a * p.scale + bias4(bias_at, j_a), s.b * p.scale + bias4(bias_at, j_b));
        ok_a = ok_a & !(x.a < vec4<f32>(LOWEST));
        ok_b = ok_b & !(x.b < vec4<f32>(LOWEST));
    }
    return Keys8(select(vec4<f32>(LOWEST), x.a, ok_a), select(vec4<f32>(LOWEST), x.b, ok_b));
}

fn row_max(s: Keys8) -> f32 {
    let m = max(s.a, s.b);
    return max(max(m.x, m.y), max(m.z, m.w));
}

fn exp_row(s: Keys8, m: f32) -> Keys8 {
    return Keys8(
        select(vec4<f32>(0.0), exp_scaled(s.a - m), s.a != vec4<f32>(LOWEST)),
        select(vec4<f32>(0.0), exp_scaled(s.b - m), s.b != vec4<f32>(LOWEST)),
    );
}

fn row_sum(s: Keys8) -> f32 {
    let t = s.a + s.b;
    return (t.x + t.y) + (t.z + t.w);
}

fn store_p(row: u32, tx: u32, w: Keys8) {
    let base = row * 2u * TX;
    for (var j = 0u; j < 4u; j++) {
        let k0 = tx + TX * j;
        let k1 = k0 + 4u * TX;
        p_tile[base + k0 / 4u][k0 % 4u] = w.a[j];
        p_tile[base + k1 / 4u][k1 % 4u] = w.b[j];
    }
}

// Stores packed row r's output: the invocation's NV column groups, vec4 group tx + TX c of
// the row, dropping rows past the packed rows and columns past head_dim_v.
fn store_row(mat: u32, r: u32, tx: u32, x: Row) {
    if (r >= p.group * lq.n) {
        return;
    }
    let at = row_at(mat, r);
    let base = p.o_offset + at.b * (p.o_sb * lq.n + p.o_sbc) + at.h * (p.o_sh * lq.n + p.o_shc) + at.i * p.o_si;
    for (var c = 0u; c < NV; c++) {
        let x4 = col_of(x, c);
        let d0 = 4u * (tx + TX * c);
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
    let br = 8u * TY;
    let bc = 8u * TX;
    let rows = p.group * lq.n;
    let q_blocks = (rows + br - 1u) / br;
    let tile = workgroup_index(wid, nwg);
    // The grid is sized for the call's lengths by the host; anything past them does nothing.
    if (tile >= q_blocks * p.batch * p.kv_heads) {
        return;
    }
    // One column of tiles: a block of packed query rows spans the whole key range.
    let at = tile_origin(tile, q_blocks, 1u, br, 0u);
    let mat = at.mat;
    let b = mat / p.kv_heads;
    let row0 = at.row0;
    let tx = lid.x;
    let ty = lid.y;
    let threads = TX * TY;
    let r0 = 8u * ty;
    let i0 = row0 + r0;

    // Where this workgroup reads: its packed rows' Q, its kv head's K and V.
    row0_p = row0;
    k_head = p.k_offset + b * (p.k_sb * lkv.n + p.k_sbc) + (mat % p.kv_heads) * (p.k_sh * lkv.n + p.k_shc);
    v_head = p.v_offset + b * (p.v_sb * lkv.n + p.v_sbc) + (mat % p.kv_heads) * (p.v_sh * lkv.n + p.v_shc);
    for (var e = li; e < br; e += threads) {
        var base = NO_ROW;
        if (row0 + e < rows) {
            let a = row_at(mat, row0 + e);
            base = p.q_offset + a.b * (p.q_sb * lq.n + p.q_sbc) + a.h * (p.q_sh * lq.n + p.q_shc) + a.i * p.q_si;
        }
        q_rows[e] = base;
    }
    workgroupBarrier();
    // This invocation's eight rows: how far each may see, where each one's bias starts.
    var lim: array<u32, 8>;
    var bias_at: array<u32, 8>;
    for (var r = 0u; r < 8u; r++) {
        lim[r] = key_limit(mat, i0 + r);
        bias_at[r] = select(0u, bias_row(mat, i0 + r), HAS_BIAS && i0 + r < rows);
    }

    var m_lo = vec4<f32>(LOWEST);
    var m_hi = vec4<f32>(LOWEST);
    var l_lo = vec4<f32>(0.0);
    var l_hi = vec4<f32>(0.0);
    var o = rows_zero();

    // The keys any row of the block may see: a block of rows within one head reaches up to its
    // last row's limit; one that spans heads reaches the last query's.
    let last = min(row0 + br, rows) - 1u;
    var key_end = key_limit(mat, last);
    if (row0 / lq.n != last / lq.n) {
        key_end = key_limit(mat, lq.n - 1u);
    }

    for (var kb = 0u; kb < key_end; kb += bc) {
        // 1. Scores of this block (score_tile.wgsl).
        var s = score_tile(mat, row0, kb, tx, ty, li);

        // 2. Online softmax: raise the running max, weight, rescale what came before.
        let present = keys_present(b, kb, tx);
        s.s0 = mask_row(s.s0, present, lim[0], bias_at[0], kb, tx);
        s.s1 = mask_row(s.s1, present, lim[1], bias_at[1], kb, tx);
        s.s2 = mask_row(s.s2, present, lim[2], bias_at[2], kb, tx);
        s.s3 = mask_row(s.s3, present, lim[3], bias_at[3], kb, tx);
        s.s4 = mask_row(s.s4, present, lim[4], bias_at[4], kb, tx);
        s.s5 = mask_row(s.s5, present, lim[5], bias_at[5], kb, tx);
        s.s6 = mask_row(s.s6, present, lim[6], bias_at[6], kb, tx);
        s.s7 = mask_row(s.s7, present, lim[7], bias_at[7], kb, tx);
        let red_at = tx * 2u * TY + 2u * ty;
        red[red_at] = vec4<f32>(row_max(s.s0), row_max(s.s1), row_max(s.s2), row_max(s.s3));
        red[red_at + 1u] = vec4<f32>(row_max(s.s4), row_max(s.s5), row_max(s.s6), row_max(s.s7));
        workgroupBarrier();
        var mb_lo = m_lo;
        var mb_hi = m_hi;
        for (var t = 0u; t < TX; t++) {
            mb_lo = max(mb_lo, red[t * 2u * TY + 2u * ty]);
            mb_hi = max(mb_hi, red[t * 2u * TY + 2u * ty + 1u]);
        }
        workgroupBarrier();
        let w0 = exp_row(s.s0, mb_lo.x);
        let w1 = exp_row(s.s1, mb_lo.y);
        let w2 = exp_row(s.s2, mb_lo.z);
        let w3 = exp_row(s.s3, mb_lo.w);
        let w4 = exp_row(s.s4, mb_hi.x);
        let w5 = exp_row(s.s5, mb_hi.y);
        let w6 = exp_row(s.s6, mb_hi.z);
        let w7 = exp_row(s.s7, mb_hi.w);
        store_p(r0, tx, w0);
        store_p(r0 + 1u, tx, w1);
        store_p(r0 + 2u, tx, w2);
        store_p(r0 + 3u, tx, w3);
        store_p(r0 + 4u, tx, w4);
        store_p(r0 + 5u, tx, w5);
        store_p(r0 + 6u, tx, w6);
        store_p(r0 + 7u, tx, w7);
        red[red_at] = vec4<f32>(row_sum(w0), row_sum(w1), row_sum(w2), row_sum(w3));
        red[red_at + 1u] = vec4<f32>(row_sum(w4), row_sum(w5), row_sum(w6), row_sum(w7));
        // While every key so far is masked m stays LOWEST and alpha is 1: l and o are still 0.
        let a_lo = exp_scaled(m_lo - mb_lo);
        let a_hi = exp_scaled(m_hi - mb_hi);
        m_lo = mb_lo;
        m_hi = mb_hi;
        o.r0 = scale_row(o.r0, a_lo.x);
        o.r1 = scale_row(o.r1, a_lo.y);
        o.r2 = scale_row(o.r2, a_lo.z);
        o.r3 = scale_row(o.r3, a_lo.w);
        o.r4 = scale_row(o.r4, a_hi.x);
        o.r5 = scale_row(o.r5, a_hi.y);
        o.r6 = scale_row(o.r6, a_hi.z);
        o.r7 = scale_row(o.r7, a_hi.w);
        workgroupBarrier();
        var sum_lo = vec4<f32>(0.0);
        var sum_hi = vec4<f32>(0.0);
        for (var t = 0u; t < TX; t++) {
            sum_lo += red[t * 2u * TY + 2u * ty];
            sum_hi += red[t * 2u * TY + 2u * ty + 1u];
        }
        l_lo = a_lo * l_lo + sum_lo;
        l_hi = a_hi * l_hi + sum_hi;

        // 3. O += P V, VK keys at a time; each V vec4 feeds eight rows.
        for (var v0 = 0u; v0 < bc; v0 += VK) {
            for (var e = li; e < VK * TX * NV; e += threads) {
                // Column group c4 = c TX + t holds value columns 4 c4 .. 4 c4 + 3.
                stage[e] = load_v4(mat, kb + v0 + e / (TX * NV), e % (TX * NV));
            }
            workgroupBarrier();
            for (var k4 = 0u; k4 < VK / 4u; k4++) {
                let at = r0 * 2u * TX + v0 / 4u + k4;
                let ps = 2u * TX;
                let col = Col8(p_tile[at], p_tile[at + ps], p_tile[at + 2u * ps], p_tile[at + 3u * ps],
                    p_tile[at + 4u * ps], p_tile[at + 5u * ps], p_tile[at + 6u * ps], p_tile[at + 7u * ps]);
                let kk = 4u * k4;
                o = mma8(o, col, v_row(kk, tx), v_row(kk + 1u, tx), v_row(kk + 2u, tx), v_row(kk + 3u, tx));
            }
            workgroupBarrier();
        }
    }

    for (var r = 0u; r < 8u; r++) {
        let l = select(l_hi[r % 4u], l_lo[r % 4u], r < 4u);
        // A query with nothing to attend has l = 0 and o = 0: its output is zero.
        let o_r = scale_row(row_of(o, r), select(0.0, 1.0 / l, l > 0.0));
        store_row(mat, i0 + r, tx, o_r);
    }
    // The row logsumexp for the backward (fused_io_lse.wgsl; a call that compiles to nothing
    // with fused_io_no_lse.wgsl), in the units of the logits x = scale s + bias: the running
    // maximum m is over unscaled scores times the scale's sign without a bias, so
    // lse = |scale| m + ln l; over the logits with one, so lse = m + ln l. A row with no key
    // (l = 0) gets LOWEST.
    if (tx == 0u) {
        let unit = select(abs(p.scale), 1.0, HAS_BIAS);
        for (var r = 0u; r < 8u; r++) {
            if (i0 + r < rows) {
                let m = select(m_hi[r % 4u], m_lo[r % 4u], r < 4u);
                let l = select(l_hi[r % 4u], l_lo[r % 4u], r < 4u);
                let at = row_at(mat, i0 + r);
                let row = (at.b * p.kv_heads * p.group + at.h) * lq.n + at.i;
                store_lse(row, select(LOWEST, unit * m + log(l), l > 0.0));
            }
        }
    }
}
