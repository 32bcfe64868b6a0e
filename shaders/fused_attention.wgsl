// Fused attention (FlashAttention-2 style): O = softmax(scale · Q Kᵀ, masked) V without ever
// storing the score matrix.
//
// For every batch b, head h and query i < seq:
//     out[b, i, h * head_dim_v + d] = sum_j p_ij V[bh, j, d] / sum_j p_ij,
//     p_ij = exp(scale · Q[bh, i]·K[bh, j] - m_i) over the keys j query i may attend (causal:
//     j <= i; padding: key_mask[b, j] != 0), m_i their maximum score.
// A query with no key to attend gets zeros. Memory traffic and footprint grow linearly with seq.
//
// Bindings (group 0; group 1 is dispatch.wgsl's chunk index):
//   0  params    uniform             FusedParams, below
//   1  qkv       storage, read       vec4<f32>; Q at q_offset4 and K at k_offset4, head-major
//                                    [batch, heads, seq, dp4]; V at v_offset4 as
//                                    [batch, heads, seq, dvp4] (widths zero-padded to vec4)
//   2  key_mask  storage, read       u32 [batch, seq]; 0 = padding (read only if has_mask != 0)
//   3  out       storage, read_write f32 [batch, seq, out_stride]; this head's columns start at
//                                    h * head_dim_v
//
// Tiling (tiles.wgsl): a workgroup of TX x TY invocations owns BR = 8 TY query rows of one (batch, head) and walks
// the keys in blocks of BC = 8 TX; with causal masking it stops after its last row, so blocks
// wholly above the diagonal are never touched. Each invocation owns 8 rows (8 ty .. 8 ty + 7):
//   1. S = Q Kᵀ for its 8 rows x 8 keys, 64 scores in named registers: the score kernel's tile,
//      shared with it in score_tile.wgsl;
//   2. the online softmax: row maxima and sums combined across the TX invocations of a row
//      through workgroup memory as vec4s, the maxima taken over unscaled scores (times the
//      scale's sign) and the scale applied only to differences from them, so a huge scale
//      cannot overflow; the running max raised, the running sum and the output rescaled by
//      exp(|scale| (m_old - m_new));
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

const LOWEST: f32 = -3.402823e38;
const LOG2E: f32 = 1.4426950408889634;

struct FusedParams {
    seq: u32,
    heads: u32,
    dp4: u32,
    dvp4: u32,
    head_dim_v: u32,
    q_offset4: u32,
    k_offset4: u32,
    v_offset4: u32,
    out_stride: u32,
    q_blocks: u32,
    total_tiles: u32,
    causal: u32,
    has_mask: u32,
    scale: f32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: FusedParams;
@group(0) @binding(1) var<storage, read> qkv: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> key_mask: array<u32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

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
        if (k0 < p.seq && (p.has_mask == 0u || key_mask[b * p.seq + k0] != 0u)) { a[j] = 1.0; }
        if (k1 < p.seq && (p.has_mask == 0u || key_mask[b * p.seq + k1] != 0u)) { c[j] = 1.0; }
    }
    return Keys8(a, c);
}

// Sets a row's masked scores to LOWEST. The others stay unscaled, times the sign of the scale:
// softmax(scale s) = softmax(|scale| (sign s)), and taking the maximum before scaling means no
// product with the scale is formed until after the maximum is subtracted, so no scale that is
// finite can overflow a score into inf - inf = NaN.
fn mask_row(s: Keys8, present: Keys8, i: u32, kb: u32, tx: u32) -> Keys8 {
    let j_a = vec4<u32>(kb + tx) + vec4<u32>(0u, TX, 2u * TX, 3u * TX);
    let j_b = j_a + vec4<u32>(4u * TX);
    let causal = p.causal != 0u;
    // WGSL requires the parentheses between comparisons and & or |.
    let ok_a = (present.a > vec4<f32>(0.0)) & (vec4<bool>(!causal) | (j_a <= vec4<u32>(i)));
    let ok_b = (present.b > vec4<f32>(0.0)) & (vec4<bool>(!causal) | (j_b <= vec4<u32>(i)));
    let sg = select(1.0, -1.0, p.scale < 0.0);
    return Keys8(select(vec4<f32>(LOWEST), s.a * sg, ok_a), select(vec4<f32>(LOWEST), s.b * sg, ok_b));
}

// exp(|scale| d) for a difference d <= 0 of unscaled scores, through exp2. Multiplying d by the
// scale first and by log2 e second keeps a scale near f32::MAX from overflowing to inf: at worst
// the product is -inf, and exp2(-inf) = 0. A zero exponent gives exactly 1 without exp2: at
// scale 0 every exponent is a signed zero, and exp2(-0.0) came back NaN on a CPU Vulkan driver.
fn exp_scaled(d: vec4<f32>) -> vec4<f32> {
    let t = (d * abs(p.scale)) * LOG2E;
    return select(exp2(t), vec4<f32>(1.0), t == vec4<f32>(0.0));
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
    let br = 8u * TY;
    let bc = 8u * TX;
    // One column of tiles: a block of query rows spans the whole head.
    let at = tile_origin(tile, p.q_blocks, 1u, br, 0u);
    let bh = at.mat;
    let b = bh / p.heads;
    let h = bh % p.heads;
    let row0 = at.row0;
    let tx = lid.x;
    let ty = lid.y;
    let threads = TX * TY;
    let r0 = 8u * ty;
    let i0 = row0 + r0;
    let q_base = p.q_offset4 + bh * p.seq * p.dp4;
    let k_base = p.k_offset4 + bh * p.seq * p.dp4;
    let v_base = p.v_offset4 + bh * p.seq * p.dvp4;

    var m_lo = vec4<f32>(LOWEST);
    var m_hi = vec4<f32>(LOWEST);
    var l_lo = vec4<f32>(0.0);
    var l_hi = vec4<f32>(0.0);
    var o = rows_zero();

    var key_end = p.seq;
    if (p.causal != 0u) {
        key_end = min(p.seq, row0 + br);
    }

    for (var kb = 0u; kb < key_end; kb += bc) {
        // 1. Scores of this block (score_tile.wgsl).
        var s = score_tile(q_base, k_base, row0, kb, tx, ty, li);

        // 2. Online softmax: raise the running max, weight, rescale what came before.
        let present = keys_present(b, kb, tx);
        s.s0 = mask_row(s.s0, present, i0, kb, tx);
        s.s1 = mask_row(s.s1, present, i0 + 1u, kb, tx);
        s.s2 = mask_row(s.s2, present, i0 + 2u, kb, tx);
        s.s3 = mask_row(s.s3, present, i0 + 3u, kb, tx);
        s.s4 = mask_row(s.s4, present, i0 + 4u, kb, tx);
        s.s5 = mask_row(s.s5, present, i0 + 5u, kb, tx);
        s.s6 = mask_row(s.s6, present, i0 + 6u, kb, tx);
        s.s7 = mask_row(s.s7, present, i0 + 7u, kb, tx);
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
                let key = kb + v0 + e / (TX * NV);
                // Column group c4 = c TX + t holds value columns 4 c4 .. 4 c4 + 3.
                let c4 = e % (TX * NV);
                var v = vec4<f32>(0.0);
                if (key < p.seq && c4 < p.dvp4) {
                    v = qkv[v_base + key * p.dvp4 + c4];
                }
                stage[e] = v;
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
        store_head_row(b, h, i0 + r, 0u, tx, o_r);
    }
}
