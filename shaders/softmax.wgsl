// Softmax of the staged attention, in place: P = softmax(scale · S + bias, masked) along each
// row of the unscaled scores S (scores.wgsl), numerically stable at any finite scale.
//
// For every batch b, query head h and query i < q_len (row (b heads + h) q_len + i), with x_j
// the logit of key j and A the keys query i may attend:
//     P[row, j] = exp(x_j - m) / sum over A of exp(x_k - m),   m = max over A of x,  j in A
//     P[row, j] = 0 for j not in A, in the row padding kv_len <= j < kvp, and in every column of
//                 a row whose A is empty (zeros, never NaN).
// A excludes keys past the causal limit (aligned to the end of the keys: j <= i + kv_len -
// q_len), padding (key_mask[b, j] == 0) and keys whose bias is -inf. Without a bias the maximum
// is taken over the unscaled scores times the scale's sign and the scale applied only to
// differences from it (exp_scaled, staged_io.wgsl), so no finite scale overflows; with a bias
// x_j = scale · S + bias[b or 0, h or 0, i, j] (a bias is not a multiple of the scale).
//
// Bindings (group 0; group 1 is dispatch.wgsl's chunk index):
//   0  p         uniform             StagedParams (staged_io.wgsl)
//   1  key_mask  storage, read       u32 [batch, kv_len]; 0 = padding (read only if has_mask != 0)
//   2  bias      storage, read       f32 [batch or 1, heads or 1, q_len, kv_len] (if has_bias != 0)
//   3  probs     storage, read_write vec4<f32> [batch, heads, q_len, kvp / 4]: S in, P out
//   4  lq        uniform, dynamic    Len: q_len
//   5  lkv       uniform, dynamic    Len: kv_len
//
// One workgroup of WG invocations (a power of two) per row, any row length: each invocation
// walks the row in vec4 strides keeping a running maximum and a running sum rescaled whenever
// the maximum grows (the online softmax), the WG partial (max, sum) pairs are combined by a tree
// reduction in workgroup memory, and a second walk writes the probabilities. The row index is
// dispatch.wgsl's workgroup index (folded grids, chunked dispatches).

override WG: u32 = 256u;

@group(0) @binding(0) var<uniform> p: StagedParams;
@group(0) @binding(1) var<storage, read> key_mask: array<u32>;
@group(0) @binding(2) var<storage, read> bias: array<f32>;
@group(0) @binding(3) var<storage, read_write> probs: array<vec4<f32>>;
@group(0) @binding(4) var<uniform> lq: Len;
@group(0) @binding(5) var<uniform> lkv: Len;

var<workgroup> red_max: array<f32, WG>;
var<workgroup> red_sum: array<f32, WG>;

// The row being normalised: its batch, where its bias row starts, and its causal limit.
struct RowCtx {
    b: u32,
    bias_at: u32,
    lim: u32,
}

// Logits x of keys j0 .. j0 + 3 from their scores s, and which of them the row attends.
struct Logits {
    x: vec4<f32>,
    ok: vec4<bool>,
}

fn logits(c: RowCtx, j0: u32, s: vec4<f32>) -> Logits {
    var ok = vec4<bool>(false);
    var x = s * select(1.0, -1.0, p.scale < 0.0);
    for (var e = 0u; e < 4u; e++) {
        let j = j0 + e;
        ok[e] = j < c.lim && (p.has_mask == 0u || key_mask[c.b * lkv.n + j] != 0u);
        if (p.has_bias != 0u && ok[e]) {
            x[e] = p.scale * s[e] + bias[c.bias_at + j];
            // A bias of -inf masks the key; NaN passes on.
            ok[e] = !(x[e] < LOWEST);
        }
    }
    return Logits(select(vec4<f32>(LOWEST), x, ok), ok);
}

// l1 exp(|scale| (m1 - m)): a partial sum rescaled to the maximum m >= m1; an empty part (l1 =
// 0, whose m1 is LOWEST) stays 0 whatever the scale.
fn rescale(l1: f32, m1: f32, m: f32) -> f32 {
    return select(l1 * exp_scaled(m1 - m), 0.0, l1 == 0.0);
}

@compute @workgroup_size(WG)
fn main(
    @builtin(local_invocation_index) li: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let row = workgroup_index(wid, nwg);
    if (row >= p.batch * p.heads * lq.n) {
        return;
    }
    let i = row % lq.n;
    let h = (row / lq.n) % p.heads;
    let b = row / lq.n / p.heads;
    let c = RowCtx(b, (b * p.bias_b + h * p.bias_h) * lq.n * lkv.n + i * lkv.n, key_limit(i));
    let n4 = kvp() / 4u;
    let base = row * n4;
    // Nothing past the causal limit counts.
    let end4 = (c.lim + 3u) / 4u;

    var m = LOWEST;
    var l = 0.0;
    for (var j4 = li; j4 < end4; j4 += WG) {
        let x = logits(c, 4u * j4, probs[base + j4]);
        if (any(x.ok)) {
            let m_new = max(m, max(max(x.x.x, x.x.y), max(x.x.z, x.x.w)));
            var e = vec4<f32>(0.0);
            for (var t = 0u; t < 4u; t++) {
                e[t] = select(0.0, exp_scaled(x.x[t] - m_new), x.ok[t]);
            }
            l = rescale(l, m, m_new) + (e.x + e.y) + (e.z + e.w);
            m = m_new;
        }
    }
    red_max[li] = m;
    red_sum[li] = l;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride /= 2u) {
        if (li < stride) {
            let m1 = red_max[li];
            let m2 = red_max[li + stride];
            let mm = max(m1, m2);
            red_sum[li] = rescale(red_sum[li], m1, mm) + rescale(red_sum[li + stride], m2, mm);
            red_max[li] = mm;
        }
        workgroupBarrier();
    }
    let row_max = red_max[0];
    let row_sum = red_sum[0];

    for (var j4 = li; j4 < n4; j4 += WG) {
        var out = vec4<f32>(0.0);
        // row_sum >= 1 whenever any key is attended: the maximum contributes exp(0).
        if (j4 < end4 && row_sum > 0.0) {
            let x = logits(c, 4u * j4, probs[base + j4]);
            for (var t = 0u; t < 4u; t++) {
                out[t] = select(0.0, exp_scaled(x.x[t] - row_max) / row_sum, x.ok[t]);
            }
        }
        probs[base + j4] = out;
    }
}
