// Contract: the includer declares `override TX` and `NV`, a uniform `p` with seq, out_stride and head_dim_v, and `out: array<f32>` read_write; tiles.wgsl comes first.
//
// Stores one query row of one head's output into the heads-concatenated output
// [batch, seq, out_stride], where head h's columns start at h * head_dim_v: the last step of the
// weighted sum and of the fused kernel. Not a kernel: no bindings of its own.

// Row i of head h in batch b: the invocation's NV column groups, vec4 group g0 + tx + TX c of
// the head for group c, dropping rows past seq and columns past head_dim_v (padding).
fn store_head_row(b: u32, h: u32, i: u32, g0: u32, tx: u32, r: Row) {
    if (i >= p.seq) {
        return;
    }
    let base = (b * p.seq + i) * p.out_stride + h * p.head_dim_v;
    for (var c = 0u; c < NV; c++) {
        let v = col_of(r, c);
        let d0 = 4u * (g0 + tx + TX * c);
        for (var e = 0u; e < 4u; e++) {
            if (d0 + e < p.head_dim_v) {
                out[base + d0 + e] = v[e];
            }
        }
    }
}
