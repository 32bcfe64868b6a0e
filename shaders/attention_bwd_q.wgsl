// Attention backward, queries: dQ of the operator, in its own pass over key blocks (WGSL has
// no float atomics, so dQ is not scattered from the dK/dV kernel; each dQ row is written once
// by the workgroup that owns it). A workgroup owns BO queries of one (batch, query head),
// keeps their rows of Q and dO in workgroup memory and their dQ rows in registers, and walks
// the keys in blocks of BW:
//     P = exp(scale · Q Kᵀ + bias - lse), dS = P ∘ (dO Vᵀ - D), dQ += scale · dS K.
// With causal masking (aligned to the end of the keys) the walk stops after the last key its
// last query sees. See attention_bwd.wgsl for lse, D, the masks and the shared `aux` buffer.
//
// Bindings (group 0; group 1 is dispatch.wgsl's chunk index):
//   0  p      uniform             FusedParams (the forward's: strides of Q, K, V and O)
//   1  q      storage, read       f32 as vec4, Q [b, h, i, d]
//   2  k      storage, read       f32 as vec4, K [b, kh, j, d]
//   3  v      storage, read       f32 as vec4, V [b, kh, j, d]
//   4  d_o    storage, read       f32 as vec4, dO, laid out as the output
//   5  aux    storage, read       f32: lse, D, key mask (attention_bwd.wgsl)
//   6  bias   storage, read       f32 [batch or 1, heads or 1, q_len, kv_len] (if HAS_BIAS)
//   7  dq     storage, read_write f32 dQ, laid out as Q
//   8  lq     uniform, dynamic    Len: q_len
//   9  lkv    uniform, dynamic    Len: kv_len

override DS: u32 = 4u;   // invocations per owned query, splitting its columns
override NC: u32 = 4u;   // vec4 columns per invocation: DS NC >= the widest head's vec4s, NC <= 8
override BO: u32 = 16u;  // queries owned per workgroup
override BW: u32 = 8u;   // keys per step of the walk, at most 8 DS
// Walked keys per invocation in the score step (keys s, s + DS, ...): at most 8.
override ROWS: u32 = (BW + DS - 1u) / DS;

@group(0) @binding(0) var<uniform> p: FusedParams;
@group(0) @binding(1) var<storage, read> q: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> k: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> v: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> d_o: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read> aux: array<f32>;
@group(0) @binding(6) var<storage, read> bias: array<f32>;
@group(0) @binding(7) var<storage, read_write> dq: array<f32>;
@group(0) @binding(8) var<uniform> lq: Len;
@group(0) @binding(9) var<uniform> lkv: Len;

// Rows of DS NC vec4: the owned queries' Q and dO, the walked keys' K and V.
var<workgroup> own_q: array<vec4<f32>, BO * DS * NC>;
var<workgroup> own_do: array<vec4<f32>, BO * DS * NC>;
var<workgroup> walk_k: array<vec4<f32>, BW * DS * NC>;
var<workgroup> walk_v: array<vec4<f32>, BW * DS * NC>;
// Whether each walked key is present (in range, not padding), and dS: [owned o][walked w].
var<workgroup> walk_ok: array<u32, BW>;
var<workgroup> ds_t: array<f32, BW * BO>;

@compute @workgroup_size(DS, BO)
fn main(
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let heads = p.kv_heads * p.group;
    let q_blocks = (lq.n + BO - 1u) / BO;
    let tile = workgroup_index(wid, nwg);
    if (tile >= q_blocks * p.batch * heads) {
        return;
    }
    let mat = tile / q_blocks;
    let b = mat / heads;
    let h = mat % heads;
    let kh = h / p.group;
    let i0 = (tile % q_blocks) * BO;
    let s = lid.x;
    let o = lid.y;
    let i = i0 + o;
    let w4 = DS * NC;
    let threads = DS * BO;

    for (var e = li; e < BO * w4; e += threads) {
        let ii = min(i0 + e / w4, lq.n - 1u);
        own_q[e] = select(vec4<f32>(0.0), q4(q_row(b, h, ii), e % w4), i0 + e / w4 < lq.n);
        own_do[e] = select(vec4<f32>(0.0), do4(o_row(b, h, ii), e % w4), i0 + e / w4 < lq.n);
    }
    let in_range = i < lq.n;
    let ii = min(i, lq.n - 1u);
    let lse = lse_of(b, h, ii);
    let dd = d_of(b, h, ii);
    var acc: array<vec4<f32>, 8>;
    for (var c = 0u; c < 8u; c++) {
        acc[c] = vec4<f32>(0.0);
    }
    workgroupBarrier();

    // The keys the block's last query sees (causal: the later queries see more).
    let end = key_end(min(i0 + BO, lq.n) - 1u);
    for (var j0 = 0u; j0 < end; j0 += BW) {
        for (var e = li; e < BW * w4; e += threads) {
            let j = j0 + e / w4;
            let jj = min(j, lkv.n - 1u);
            walk_k[e] = select(vec4<f32>(0.0), k4(k_row(b, kh, jj), e % w4), j < lkv.n);
            walk_v[e] = select(vec4<f32>(0.0), v4(v_row(b, kh, jj), e % w4), j < lkv.n);
        }
        for (var e = li; e < BW; e += threads) {
            walk_ok[e] = u32(key_ok(b, j0 + e));
        }
        workgroupBarrier();
        // Keys s, s + DS, ... of the step against query o: each vec4 of the query's Q and
        // dO rows is loaded once and feeds every one of them (up to 8, in registers).
        var sd = array<f32, 8>(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0);
        var pd = array<f32, 8>(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0);
        for (var c4 = 0u; c4 < w4; c4++) {
            let qq = own_q[o * w4 + c4];
            let gg = own_do[o * w4 + c4];
            for (var r = 0u; r < ROWS; r++) {
                let w = min(s + DS * r, BW - 1u);
                sd[r] += dot(qq, walk_k[w * w4 + c4]);
                pd[r] += dot(gg, walk_v[w * w4 + c4]);
            }
        }
        for (var r = 0u; r < ROWS; r++) {
            let w = s + DS * r;
            var pr = Pair(0.0, 0.0);
            if (w < BW && in_range && walk_ok[w] != 0u) {
                pr = pair(b, h, i, j0 + w, sd[r], pd[r], lse, dd, true);
            }
            if (w < BW) {
                ds_t[o * BW + w] = pr.ds;
            }
        }
        workgroupBarrier();
        for (var w = 0u; w < BW; w++) {
            let dsw = ds_t[o * BW + w];
            for (var c = 0u; c < NC; c++) {
                acc[c] += dsw * walk_k[w * w4 + s + DS * c];
            }
        }
        workgroupBarrier();
    }

    if (!in_range) {
        return;
    }
    let at = q_row(b, h, i);
    for (var c = 0u; c < NC; c++) {
        let c4 = s + DS * c;
        for (var e = 0u; e < 4u; e++) {
            let col = 4u * c4 + e;
            if (col < p.head_dim) {
                dq[at + col] = p.scale * acc[c][e];
            }
        }
    }
}
