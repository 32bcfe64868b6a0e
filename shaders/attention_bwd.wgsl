// Contract: the host puts fused_params.wgsl and unaligned.wgsl ahead of this file; the includer binds p (FusedParams), lq and lkv (Len), and q, k, v, d_o (vec4 arrays), aux and bias (f32 arrays), and declares overrides DS and NC; the host sets HAS_MASK and HAS_BIAS.
//
// What the two gradient kernels of the attention backward (attention_bwd_kv.wgsl and
// attention_bwd_q.wgsl) share: the forward's parameters and length table (the same uniform
// buffers the fused kernel reads), the element offsets of a row of each tensor, vec4 loads of
// any alignment, the masks, and the recomputed probability and logit gradient of one
// (query, key) pair:
//     x = scale · q·k + bias, P = exp(x - lse), dS = P (dO·v - D),
// with lse the row's logsumexp saved by the forward (natural log, of the logits x) and
// D = dO·O from attention_bwd_prep.wgsl. Both are in `aux` (f32): lse at [row], D at
// [R + row], with row = (b heads + h) q_len + i and R = batch heads q_len; the key-padding
// mask follows at [2 R + b kv_len + j] (u32 bits, copied there by the host), so the kernels
// bind one buffer for all three. A pair that is masked (causal aligned to the end of the
// keys, padding, a bias of -inf, or out of range) has P = 0 and dS = 0.
//
// Work split: an invocation (s, o) of a DS x BO workgroup serves owned row o; its DS
// invocations split that row's columns, invocation s holding vec4 columns s + DS c for
// c < NC in registers (so DS NC vec4 cover the widest head). In the score step of each walk
// step of BW rows, invocation (s, o) forms q·k and dO·v of its owned row against walked rows
// s, s + DS, ... (ROWS = BW / DS of them, at most 8, in registers), loading each vec4 of the
// owned row once for all of them.

const LOWEST: f32 = -3.402823e38;

// Whether a key-padding mask (in aux) and a bias are read: the host specialises the kernels,
// so that what a call lacks costs nothing (the forward's parameters do not say).
override HAS_MASK: bool = false;
override HAS_BIAS: bool = false;

// Where row i of query head h (Q, O, dO, dQ) or key j of kv head kh (K, dK; V, dV) starts.
fn q_row(b: u32, h: u32, i: u32) -> u32 {
    return p.q_offset + b * (p.q_sb * lq.n + p.q_sbc) + h * (p.q_sh * lq.n + p.q_shc) + i * p.q_si;
}

fn o_row(b: u32, h: u32, i: u32) -> u32 {
    return p.o_offset + b * (p.o_sb * lq.n + p.o_sbc) + h * (p.o_sh * lq.n + p.o_shc) + i * p.o_si;
}

fn k_row(b: u32, kh: u32, j: u32) -> u32 {
    return p.k_offset + b * (p.k_sb * lkv.n + p.k_sbc) + kh * (p.k_sh * lkv.n + p.k_shc) + j * p.k_si;
}

fn v_row(b: u32, kh: u32, j: u32) -> u32 {
    return p.v_offset + b * (p.v_sb * lkv.n + p.v_sbc) + kh * (p.v_sh * lkv.n + p.v_shc) + j * p.v_si;
}

// Vec4 c4 of the row starting at element `row` of each tensor, zero past its width: one load
// when the row is 16-byte aligned, two otherwise.
fn q4(row: u32, c4: u32) -> vec4<f32> {
    if (c4 >= p.dp4) { return vec4<f32>(0.0); }
    let e = row + 4u * c4;
    var a = q[e / 4u];
    if (e % 4u != 0u) { a = shifted(a, q[e / 4u + 1u], e % 4u); }
    return clip(a, c4, p.head_dim);
}

fn k4(row: u32, c4: u32) -> vec4<f32> {
    if (c4 >= p.dp4) { return vec4<f32>(0.0); }
    let e = row + 4u * c4;
    var a = k[e / 4u];
    if (e % 4u != 0u) { a = shifted(a, k[e / 4u + 1u], e % 4u); }
    return clip(a, c4, p.head_dim);
}

fn v4(row: u32, c4: u32) -> vec4<f32> {
    if (c4 >= p.dvp4) { return vec4<f32>(0.0); }
    let e = row + 4u * c4;
    var a = v[e / 4u];
    if (e % 4u != 0u) { a = shifted(a, v[e / 4u + 1u], e % 4u); }
    return clip(a, c4, p.head_dim_v);
}

fn do4(row: u32, c4: u32) -> vec4<f32> {
    if (c4 >= p.dvp4) { return vec4<f32>(0.0); }
    let e = row + 4u * c4;
    var a = d_o[e / 4u];
    if (e % 4u != 0u) { a = shifted(a, d_o[e / 4u + 1u], e % 4u); }
    return clip(a, c4, p.head_dim_v);
}

// Row (b, h, i) of lse and D in aux.
fn stat_row(b: u32, h: u32, i: u32) -> u32 {
    return (b * p.kv_heads * p.group + h) * lq.n + i;
}

fn lse_of(b: u32, h: u32, i: u32) -> f32 {
    return aux[stat_row(b, h, i)];
}

fn d_of(b: u32, h: u32, i: u32) -> f32 {
    return aux[p.batch * p.kv_heads * p.group * lq.n + stat_row(b, h, i)];
}

// Whether key j of batch row b exists and is not padding.
fn key_ok(b: u32, j: u32) -> bool {
    if (j >= lkv.n) {
        return false;
    }
    if (!HAS_MASK) {
        return true;
    }
    return bitcast<u32>(aux[2u * p.batch * p.kv_heads * p.group * lq.n + b * lkv.n + j]) != 0u;
}

// Whether query i may see key j under causal masking aligned to the end of the keys.
fn causal_ok(i: u32, j: u32) -> bool {
    return p.causal == 0u || j + lq.n <= i + lkv.n;
}

// The first query that may see key j (0 without causal masking).
fn first_query(j: u32) -> u32 {
    if (p.causal == 0u || j + lq.n <= lkv.n) {
        return 0u;
    }
    return j + lq.n - lkv.n;
}

// One past the last key query i may see.
fn key_end(i: u32) -> u32 {
    if (p.causal == 0u) {
        return lkv.n;
    }
    let reach = i + 1u + lkv.n;
    return select(0u, min(lkv.n, reach - lq.n), reach > lq.n);
}

// P and dS of query i (head h) against key j, given s = q·k and dp = dO·v, the row's lse and
// D, and whether the key is present (key_ok) and both are in range.
struct Pair {
    prob: f32,
    ds: f32,
}

fn pair(b: u32, h: u32, i: u32, j: u32, s: f32, dp: f32, lse: f32, dd: f32, present: bool) -> Pair {
    var ok = present && causal_ok(i, j);
    var x = p.scale * s;
    if (ok && HAS_BIAS) {
        x += bias[(b * p.bias_b + h * p.bias_h) * lq.n * lkv.n + i * lkv.n + j];
        ok = !(x < LOWEST);
    }
    // Masked pairs never reach exp: x - lse of a masked key may be anything.
    let prob = select(0.0, exp(min(x - lse, 0.0)), ok);
    return Pair(prob, prob * (dp - dd));
}
