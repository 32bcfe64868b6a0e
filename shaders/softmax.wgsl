// Row softmax over keys, numerically stable, in place: P = softmax(S) along each row.
//
// For every row (bh, i) and key j < seq that query i may attend:
//     P[bh, i, j] = exp(S[bh, i, j] - m) / l,   m = max over allowed j of S,  l = sum exp(S - m)
// and P = 0 where the key is masked, in the row padding (j >= seq), and in every column of a row
// whose keys are all masked (zeros, never NaN). The mask is recomputed from causal and key_mask
// rather than read from the -inf the score kernel stores, so no arithmetic on infinities is
// needed (some backends compile with fast math, which assumes there are none).
//
// Bindings (group 0; group 1 is dispatch.wgsl's chunk index):
//   0  params    uniform             SoftmaxParams, below
//   1  key_mask  storage, read       u32 [batch, seq]; 0 = padding (read only if has_mask != 0)
//   2  probs     storage, read_write vec4<f32> [batch * heads, seq, seq_pad / 4]: scores in,
//                                    probabilities out
//
// One workgroup of WG invocations (a power of two) per row, any row length: each invocation
// walks the row in vec4 strides keeping a running maximum and a running sum rescaled whenever
// the maximum grows (the online softmax), the WG partial (max, sum) pairs are combined by a tree
// reduction in workgroup memory, and a second walk writes the probabilities. The row index is
// dispatch.wgsl's workgroup index (folded grids, chunked dispatches).

override WG: u32 = 256u;

const LOWEST: f32 = -3.402823e38;

struct SoftmaxParams {
    seq: u32,
    seq_pad: u32,
    heads: u32,
    rows: u32,
    causal: u32,
    has_mask: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: SoftmaxParams;
@group(0) @binding(1) var<storage, read> key_mask: array<u32>;
@group(0) @binding(2) var<storage, read_write> probs: array<vec4<f32>>;

var<workgroup> red_max: array<f32, WG>;
var<workgroup> red_sum: array<f32, WG>;

fn allowed(b: u32, i: u32, j: u32) -> bool {
    if (j >= p.seq) {
        return false;
    }
    if (p.causal != 0u && j > i) {
        return false;
    }
    return p.has_mask == 0u || key_mask[b * p.seq + j] != 0u;
}

fn allowed4(b: u32, i: u32, j0: u32) -> vec4<bool> {
    return vec4<bool>(allowed(b, i, j0), allowed(b, i, j0 + 1u), allowed(b, i, j0 + 2u), allowed(b, i, j0 + 3u));
}

@compute @workgroup_size(WG)
fn main(
    @builtin(local_invocation_index) li: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let row = workgroup_index(wid, nwg);
    if (row >= p.rows) {
        return;
    }
    let i = row % p.seq;
    let b = row / p.seq / p.heads;
    let base = row * (p.seq_pad / 4u);
    let n4 = p.seq_pad / 4u;
    // With causal masking nothing past the diagonal counts.
    var end4 = n4;
    if (p.causal != 0u) {
        end4 = min(n4, i / 4u + 1u);
    }

    var m = LOWEST;
    var l = 0.0;
    for (var j4 = li; j4 < end4; j4 += WG) {
        let ok = allowed4(b, i, 4u * j4);
        let s = probs[base + j4];
        let sm = select(vec4<f32>(LOWEST), s, ok);
        let m_new = max(m, max(max(sm.x, sm.y), max(sm.z, sm.w)));
        let e = select(vec4<f32>(0.0), exp(s - m_new), ok);
        l = l * exp(m - m_new) + (e.x + e.y) + (e.z + e.w);
        m = m_new;
    }
    red_max[li] = m;
    red_sum[li] = l;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride /= 2u) {
        if (li < stride) {
            let m1 = red_max[li];
            let m2 = red_max[li + stride];
            let mm = max(m1, m2);
            red_sum[li] = red_sum[li] * exp(m1 - mm) + red_sum[li + stride] * exp(m2 - mm);
            red_max[li] = mm;
        }
        workgroupBarrier();
    }
    let row_max = red_max[0];
    let row_sum = red_sum[0];

    for (var j4 = li; j4 < n4; j4 += WG) {
        let ok = allowed4(b, i, 4u * j4);
        var out = vec4<f32>(0.0);
        if (any(ok)) {
            // row_sum >= 1 whenever any key is allowed: the maximum contributes exp(0).
            out = select(vec4<f32>(0.0), exp(probs[base + j4] - row_max) / row_sum, ok);
        }
        probs[base + j4] = out;
    }
}
