// Attention backward, first pass: D = rowsum(dO ∘ O) for every query row, written beside the
// row's logsumexp into `aux`, the one buffer of per-row values (and the key mask, copied in
// by the host) that the two gradient kernels read (see attention_bwd.wgsl). One invocation
// per row (b, h, i), row = (b heads + h) q_len + i, of the R = batch heads q_len rows:
//     aux[row] = lse[row], aux[R + row] = Σ_c dO[b, h, i, c] O[b, h, i, c].
//
// Bindings (group 0; group 1 is dispatch.wgsl's chunk index):
//   0  p      uniform             FusedParams (fused_params.wgsl; the forward's: the output's strides)
//   1  o      storage, read       f32 as vec4, the forward's output O [b, h, i, c]
//   2  d_o    storage, read       f32 as vec4, dO, laid out as O
//   3  lse    storage, read       f32 [batch, heads, q_len], saved by the forward
//   4  aux    storage, read_write f32: lse at [row], D at [R + row]
//   5  lq     uniform, dynamic    Len: q_len
//   6  lkv    uniform, dynamic    Len: kv_len (unused: the table binds both)

override WG: u32 = 64u;  // rows per workgroup

@group(0) @binding(0) var<uniform> p: FusedParams;
@group(0) @binding(1) var<storage, read> o: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> d_o: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> lse: array<f32>;
@group(0) @binding(4) var<storage, read_write> aux: array<f32>;
@group(0) @binding(5) var<uniform> lq: Len;
@group(0) @binding(6) var<uniform> lkv: Len;

fn load(buf_is_o: bool, e: u32) -> vec4<f32> {
    var a: vec4<f32>;
    var b: vec4<f32>;
    if (buf_is_o) {
        a = o[e / 4u];
        if (e % 4u != 0u) { b = o[e / 4u + 1u]; }
    } else {
        a = d_o[e / 4u];
        if (e % 4u != 0u) { b = d_o[e / 4u + 1u]; }
    }
    if (e % 4u == 0u) { return a; }
    return shifted(a, b, e % 4u);
}

@compute @workgroup_size(WG)
fn main(
    @builtin(local_invocation_index) li: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let heads = p.kv_heads * p.group;
    let rows = p.batch * heads * lq.n;
    let row = workgroup_index(wid, nwg) * WG + li;
    if (row >= rows) {
        return;
    }
    let i = row % lq.n;
    let h = (row / lq.n) % heads;
    let b = row / (lq.n * heads);
    let base = p.o_offset + b * (p.o_sb * lq.n + p.o_sbc) + h * (p.o_sh * lq.n + p.o_shc) + i * p.o_si;
    var acc = 0.0;
    for (var c4 = 0u; c4 < p.dvp4; c4++) {
        let x = load(true, base + 4u * c4) * load(false, base + 4u * c4);
        // Columns past head_dim_v belong to the next row or head: drop them.
        let keep = vec4<u32>(4u * c4) + vec4<u32>(0u, 1u, 2u, 3u) < vec4<u32>(p.head_dim_v);
        acc += dot(select(vec4<f32>(0.0), x, keep), vec4<f32>(1.0));
    }
    aux[row] = lse[row];
    aux[rows + row] = acc;
}
