// Split-K decode attention, second pass: merges the partial (m, l, o) triples of `splits` key
// ranges (decode_split.wgsl, or partial results of several passes or devices laid out alike)
// into the attention output:
//     M = max_s m_s,   w_s = exp(|scale| (m_s - M)),
//     out[b, h, i, :] = sum_s w_s o_s / sum_s w_s l_s
// over the splits with a key (m_s > LOWEST); a query with no key in any split gets zeros.
// The partials are f32 whatever the storage precision; only the output's store differs.
// m is in unscaled score units (the maximum of sign(scale) · Q·K, see decode_split.wgsl), so
// |scale| is applied to differences only and no finite scale overflows.
//
// Bindings (group 0; group 1 is dispatch.wgsl's chunk index):
//   0  p         uniform             CombineParams, below
//   1  partials  storage, read       vec4 [batch, heads, q_len, splits, 1 + dvp4]: per entry
//                                    (m, l, 0, 0) then o in dvp4 vec4
//   2  out       storage, read_write out [b, h, i, d] at o_offset + b (sb n + sbc)
//                                    + h (sh n + shc) + i si + d, n = q_len, written through
//                                    store_out: f32, or f16 rounded once as it is stored
//                                    (decode_io_out.wgsl or decode_io_out_f16.wgsl)
//   3  lq        uniform, dynamic    Len: q_len
//
// One invocation per output vec4 (b, h, i, c4), WG per workgroup; each reads the splits' (m, l)
// and its column of their o (consecutive invocations read consecutive vec4). The workgroup
// index comes from dispatch.wgsl (folded grids, chunked dispatches).

override WG: u32 = 64u;

const LOWEST: f32 = -3.402823e38;
const LOG2E: f32 = 1.4426950408889634;

struct CombineParams {
    batch: u32,
    heads: u32,
    head_dim_v: u32,
    dvp4: u32,
    splits: u32,
    scale: f32,
    o_offset: u32,
    o_sb: u32,
    o_sbc: u32,
    o_sh: u32,
    o_shc: u32,
    o_si: u32,
}

struct Len {
    n: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: CombineParams;
@group(0) @binding(1) var<storage, read> partials: array<vec4<f32>>;
@group(0) @binding(3) var<uniform> lq: Len;

// exp(|scale| d) for d <= 0 (as decode_split.wgsl's).
fn exp_scaled(d: f32) -> f32 {
    let t = (d * abs(p.scale)) * LOG2E;
    return select(exp2(t), 1.0, t == 0.0);
}

@compute @workgroup_size(WG)
fn main(
    @builtin(local_invocation_index) li: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let q_len = lq.n;
    let g = workgroup_index(wid, nwg) * WG + li;
    if (g >= p.batch * p.heads * q_len * p.dvp4) {
        return;
    }
    let c4 = g % p.dvp4;
    let row = g / p.dvp4;
    let i = row % q_len;
    let h = (row / q_len) % p.heads;
    let b = row / (q_len * p.heads);
    let entry = 1u + p.dvp4;
    let first = row * p.splits * entry;

    var m = LOWEST;
    for (var s = 0u; s < p.splits; s++) {
        m = max(m, partials[first + s * entry].x);
    }
    var l = 0.0;
    var o = vec4<f32>(0.0);
    for (var s = 0u; s < p.splits; s++) {
        let ml = partials[first + s * entry];
        if (ml.x != LOWEST) {
            let w = exp_scaled(ml.x - m);
            l += w * ml.y;
            o += w * partials[first + s * entry + 1u + c4];
        }
    }
    // A query with nothing to attend has l = 0 and o = 0: its output is zero.
    let x = o * select(0.0, 1.0 / l, l > 0.0);
    let base = p.o_offset + b * (p.o_sb * q_len + p.o_sbc) + h * (p.o_sh * q_len + p.o_shc) + i * p.o_si;
    for (var e = 0u; e < 4u; e++) {
        if (4u * c4 + e < p.head_dim_v) {
            store_out(base + 4u * c4 + e, x[e]);
        }
    }
}
