// Fused attention (FlashAttention-2 style): O = softmax(scale · Q Kᵀ, masked) V without ever
// storing the score matrix.
//
// For every batch b, head h and query i < seq:
//     out[b, i, h * head_dim_v + d] = sum_j p_ij V[bh, j, d] / sum_j p_ij,
//     p_ij = exp(scale · Q[bh, i]·K[bh, j] - m_i) over the keys j query i may attend (causal:
//     j <= i; padding: key_mask[b, j] != 0), m_i their maximum score.
// A query with no key to attend gets zeros. Memory traffic and footprint grow linearly with seq.
//
// Bindings (group 0):
//   0  params    uniform             FusedParams, below
//   1  qkv       storage, read       vec4<f32>; Q at q_offset4 and K at k_offset4, head-major
//                                    [batch, heads, seq, dp4]; V at v_offset4 as
//                                    [batch, heads, seq, dvp4] (widths zero-padded to vec4)
//   2  key_mask  storage, read       u32 [batch, seq]; 0 = padding (read only if has_mask != 0)
//   3  out       storage, read_write f32 [batch, seq, out_stride]; this head's columns start at
//                                    h * head_dim_v
//
// A workgroup of TX x TY invocations owns BR = 4 TY query rows of one (batch, head) and walks
// the keys in blocks of BC = 4 TX (with causal masking it stops after its last row: blocks
// wholly above the diagonal are never touched). Per key block:
//   1. S = Q Kᵀ for the BR x BC block, each invocation a 4 x 4 block in named vec4 registers,
//      with Q and K staged through workgroup memory DK columns at a time (vec4 loads);
//   2. the online softmax: block row maxima reduced through workgroup memory, the running max
//      m raised, p = exp2(s - m) (scores carry scale · log2 e, so exp2 is exact exp), the
//      running sum l and the output accumulator rescaled by exp2(m_old - m_new);
//   3. O += P V, P staged in workgroup memory, V staged VK keys at a time; each invocation owns
//      4 rows x NV vec4 columns (columns 4 tx + 4 TX c, so neighbours read neighbours).
// At the end O is divided by l once. Masked scores never enter exp: a mask vector selects 0.
// The workgroup id is linearised over a possibly folded grid.

override TX: u32 = 16u;  // BC = 4 TX keys per block; also the column invocations of O
override TY: u32 = 8u;   // BR = 4 TY query rows per workgroup
override NV: u32 = 1u;   // vec4 columns of O per invocation: dvp <= 16 TX NV, at most 4
override DK: u32 = 16u;  // head-dim columns of Q and K staged per step (a multiple of 4)
override VK: u32 = 16u;  // keys of V staged per step (a multiple of 4 dividing 4 TX)

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

// P of the current block: p_tile[row * TX + k4] holds keys 4 k4 .. 4 k4 + 3 of row `row`.
var<workgroup> p_tile: array<vec4<f32>, 4u * TY * TX>;
// Staging, shared by the two phases: Q and K columns while scoring (q at [kk * TY + r4], k at
// DK * TY + [kk * TX + c4]), then V rows while weighting ([key * TX * NV + c * TX + tx]).
var<workgroup> stage: array<vec4<f32>, max(DK * (TY + TX), VK * TX * NV)>;
// Per-row partial maxima, then partial sums: red[row * TX + tx].
var<workgroup> red: array<f32, 4u * TY * TX>;

// One output row's columns owned by an invocation; members past NV stay zero and unused.
struct Row {
    c0: vec4<f32>,
    c1: vec4<f32>,
    c2: vec4<f32>,
    c3: vec4<f32>,
}

fn fma_row(acc: Row, w: f32, v: Row) -> Row {
    var r = acc;
    r.c0 += w * v.c0;
    if (NV > 1u) { r.c1 += w * v.c1; }
    if (NV > 2u) { r.c2 += w * v.c2; }
    if (NV > 3u) { r.c3 += w * v.c3; }
    return r;
}

fn scale_row(acc: Row, s: f32) -> Row {
    return Row(acc.c0 * s, acc.c1 * s, acc.c2 * s, acc.c3 * s);
}

fn v_row(key: u32, tx: u32) -> Row {
    let base = key * TX * NV + tx;
    var r = Row(stage[base], vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0));
    if (NV > 1u) { r.c1 = stage[base + TX]; }
    if (NV > 2u) { r.c2 = stage[base + 2u * TX]; }
    if (NV > 3u) { r.c3 = stage[base + 3u * TX]; }
    return r;
}

fn allowed(b: u32, i: u32, j: u32) -> bool {
    if (j >= p.seq) {
        return false;
    }
    if (p.causal != 0u && j > i) {
        return false;
    }
    return p.has_mask == 0u || key_mask[b * p.seq + j] != 0u;
}

// Scales a row of four scores into the exp2 domain and marks the keys the query may attend.
fn mask_scores(s: vec4<f32>, b: u32, i: u32, j0: u32, ok: ptr<function, vec4<bool>>) -> vec4<f32> {
    let o = vec4<bool>(allowed(b, i, j0), allowed(b, i, j0 + 1u), allowed(b, i, j0 + 2u), allowed(b, i, j0 + 3u));
    *ok = o;
    return select(vec4<f32>(LOWEST), s * (p.scale * LOG2E), o);
}

fn row_max_partial(s: vec4<f32>) -> f32 {
    return max(max(s.x, s.y), max(s.z, s.w));
}

// The maximum (or sum) over the TX partials of one row.
fn reduce_row(row: u32, take_max: bool) -> f32 {
    var acc = red[row * TX];
    for (var t = 1u; t < TX; t++) {
        let v = red[row * TX + t];
        acc = select(acc + v, max(acc, v), take_max);
    }
    return acc;
}

fn store_row(b: u32, h: u32, i: u32, tx: u32, o: Row, l: f32) {
    if (i >= p.seq) {
        return;
    }
    // A query with nothing to attend has l = 0 and o = 0: its output is zero.
    let inv = select(0.0, 1.0 / l, l > 0.0);
    let r = scale_row(o, inv);
    let base = (b * p.seq + i) * p.out_stride + h * p.head_dim_v;
    for (var c = 0u; c < NV; c++) {
        var v = r.c0;
        if (c == 1u) { v = r.c1; }
        if (c == 2u) { v = r.c2; }
        if (c == 3u) { v = r.c3; }
        let d0 = 4u * (tx + c * TX);
        for (var e = 0u; e < 4u; e++) {
            if (d0 + e < p.head_dim_v) {
                out[base + d0 + e] = v[e];
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
    let tile = wid.x + nwg.x * (wid.y + nwg.y * wid.z);
    if (tile >= p.total_tiles) {
        return;
    }
    let bh = tile / p.q_blocks;
    let b = bh / p.heads;
    let h = bh % p.heads;
    let br = 4u * TY;
    let bc = 4u * TX;
    let row0 = (tile % p.q_blocks) * br;
    let tx = lid.x;
    let ty = lid.y;
    let threads = TX * TY;
    let i0 = row0 + 4u * ty;
    let q_base = p.q_offset4 + bh * p.seq * p.dp4;
    let k_base = p.k_offset4 + bh * p.seq * p.dp4;
    let v_base = p.v_offset4 + bh * p.seq * p.dvp4;

    var m = vec4<f32>(LOWEST);
    var l = vec4<f32>(0.0);
    let zero = Row(vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0));
    var o0 = zero;
    var o1 = zero;
    var o2 = zero;
    var o3 = zero;

    var key_end = p.seq;
    if (p.causal != 0u) {
        key_end = min(p.seq, row0 + br);
    }

    for (var kb = 0u; kb < key_end; kb += bc) {
        // 1. Scores of this block.
        var s0 = vec4<f32>(0.0);
        var s1 = vec4<f32>(0.0);
        var s2 = vec4<f32>(0.0);
        var s3 = vec4<f32>(0.0);
        for (var d0 = 0u; d0 < 4u * p.dp4; d0 += DK) {
            let depth4 = DK / 4u;
            for (var e = li; e < (br + bc) * depth4; e += threads) {
                let r = e / depth4;
                let d4 = d0 / 4u + e % depth4;
                let kk = 4u * (e % depth4);
                var v = vec4<f32>(0.0);
                if (r < br) {
                    if (row0 + r < p.seq && d4 < p.dp4) {
                        v = qkv[q_base + (row0 + r) * p.dp4 + d4];
                    }
                    stage[kk * TY + r / 4u][r % 4u] = v.x;
                    stage[(kk + 1u) * TY + r / 4u][r % 4u] = v.y;
                    stage[(kk + 2u) * TY + r / 4u][r % 4u] = v.z;
                    stage[(kk + 3u) * TY + r / 4u][r % 4u] = v.w;
                } else {
                    let c = r - br;
                    if (kb + c < p.seq && d4 < p.dp4) {
                        v = qkv[k_base + (kb + c) * p.dp4 + d4];
                    }
                    let k_at = DK * TY;
                    stage[k_at + kk * TX + c / 4u][c % 4u] = v.x;
                    stage[k_at + (kk + 1u) * TX + c / 4u][c % 4u] = v.y;
                    stage[k_at + (kk + 2u) * TX + c / 4u][c % 4u] = v.z;
                    stage[k_at + (kk + 3u) * TX + c / 4u][c % 4u] = v.w;
                }
            }
            workgroupBarrier();
            for (var kk = 0u; kk < DK; kk++) {
                let qv = stage[kk * TY + ty];
                let kv = stage[DK * TY + kk * TX + tx];
                s0 += qv.x * kv;
                s1 += qv.y * kv;
                s2 += qv.z * kv;
                s3 += qv.w * kv;
            }
            workgroupBarrier();
        }

        // 2. Online softmax: raise the running max, weight, rescale what came before.
        let j0 = kb + 4u * tx;
        var ok0: vec4<bool>;
        var ok1: vec4<bool>;
        var ok2: vec4<bool>;
        var ok3: vec4<bool>;
        s0 = mask_scores(s0, b, i0, j0, &ok0);
        s1 = mask_scores(s1, b, i0 + 1u, j0, &ok1);
        s2 = mask_scores(s2, b, i0 + 2u, j0, &ok2);
        s3 = mask_scores(s3, b, i0 + 3u, j0, &ok3);
        let r0 = 4u * ty;
        red[r0 * TX + tx] = row_max_partial(s0);
        red[(r0 + 1u) * TX + tx] = row_max_partial(s1);
        red[(r0 + 2u) * TX + tx] = row_max_partial(s2);
        red[(r0 + 3u) * TX + tx] = row_max_partial(s3);
        workgroupBarrier();
        let m_new = max(m, vec4<f32>(reduce_row(r0, true), reduce_row(r0 + 1u, true), reduce_row(r0 + 2u, true), reduce_row(r0 + 3u, true)));
        workgroupBarrier();
        let p0 = select(vec4<f32>(0.0), exp2(s0 - m_new.x), ok0);
        let p1 = select(vec4<f32>(0.0), exp2(s1 - m_new.y), ok1);
        let p2 = select(vec4<f32>(0.0), exp2(s2 - m_new.z), ok2);
        let p3 = select(vec4<f32>(0.0), exp2(s3 - m_new.w), ok3);
        p_tile[r0 * TX + tx] = p0;
        p_tile[(r0 + 1u) * TX + tx] = p1;
        p_tile[(r0 + 2u) * TX + tx] = p2;
        p_tile[(r0 + 3u) * TX + tx] = p3;
        red[r0 * TX + tx] = (p0.x + p0.y) + (p0.z + p0.w);
        red[(r0 + 1u) * TX + tx] = (p1.x + p1.y) + (p1.z + p1.w);
        red[(r0 + 2u) * TX + tx] = (p2.x + p2.y) + (p2.z + p2.w);
        red[(r0 + 3u) * TX + tx] = (p3.x + p3.y) + (p3.z + p3.w);
        // While every key so far is masked m stays LOWEST and alpha is 1: l and o are still 0.
        let alpha = exp2(m - m_new);
        m = m_new;
        o0 = scale_row(o0, alpha.x);
        o1 = scale_row(o1, alpha.y);
        o2 = scale_row(o2, alpha.z);
        o3 = scale_row(o3, alpha.w);
        workgroupBarrier();
        l = alpha * l + vec4<f32>(reduce_row(r0, false), reduce_row(r0 + 1u, false), reduce_row(r0 + 2u, false), reduce_row(r0 + 3u, false));

        // 3. O += P V, VK keys at a time.
        for (var v0 = 0u; v0 < bc; v0 += VK) {
            for (var e = li; e < VK * TX * NV; e += threads) {
                let key = e / (TX * NV);
                // Column group c4 = c TX + t holds value columns 4 c4 .. 4 c4 + 3, so the
                // invocation at tx reads groups tx, tx + TX, ... : neighbours read neighbours.
                let c4 = e % (TX * NV);
                var v = vec4<f32>(0.0);
                if (kb + v0 + key < p.seq && c4 < p.dvp4) {
                    v = qkv[v_base + (kb + v0 + key) * p.dvp4 + c4];
                }
                stage[e] = v;
            }
            workgroupBarrier();
            for (var k4 = 0u; k4 < VK / 4u; k4++) {
                let at = (v0 / 4u) + k4;
                let w0 = p_tile[r0 * TX + at];
                let w1 = p_tile[(r0 + 1u) * TX + at];
                let w2 = p_tile[(r0 + 2u) * TX + at];
                let w3 = p_tile[(r0 + 3u) * TX + at];
                for (var kk = 0u; kk < 4u; kk++) {
                    let vr = v_row(4u * k4 + kk, tx);
                    o0 = fma_row(o0, w0[kk], vr);
                    o1 = fma_row(o1, w1[kk], vr);
                    o2 = fma_row(o2, w2[kk], vr);
                    o3 = fma_row(o3, w3[kk], vr);
                }
            }
            workgroupBarrier();
        }
    }

    store_row(b, h, i0, tx, o0, l.x);
    store_row(b, h, i0 + 1u, tx, o1, l.y);
    store_row(b, h, i0 + 2u, tx, o2, l.z);
    store_row(b, h, i0 + 3u, tx, o3, l.w);
}
