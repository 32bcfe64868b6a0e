// Attention backward, keys and values: dK and dV of the operator (FlashAttention-2's outer
// loop over key blocks). A workgroup owns BO keys of one (batch, kv head), keeps their rows of
// K and V in workgroup memory and their dK and dV rows in registers, and walks every query of
// every query head of the kv head's group in blocks of BW rows:
//     P = exp(scale · Q Kᵀ + bias - lse), dS = P ∘ (dO Vᵀ - D),
//     dV += Pᵀ dO, dK += scale · dSᵀ Q.
// Under GQA the sums over the group's query heads happen here, in registers: no K/V copies,
// no atomics, each dK and dV row written once. With causal masking (aligned to the end of the
// keys) the query blocks before the first query that sees the owned keys are skipped. See
// attention_bwd.wgsl for lse, D, the masks and the shared `aux` buffer.
//
// Bindings (group 0; group 1 is dispatch.wgsl's chunk index):
//   0  p      uniform             FusedParams (the forward's: strides of Q, K, V and O)
//   1  q      storage, read       f32 as vec4, Q [b, h, i, d]
//   2  k      storage, read       f32 as vec4, K [b, kh, j, d]
//   3  v      storage, read       f32 as vec4, V [b, kh, j, d]
//   4  d_o    storage, read       f32 as vec4, dO, laid out as the output
//   5  aux    storage, read       f32: lse, D, key mask (attention_bwd.wgsl)
//   6  bias   storage, read       f32 [batch or 1, heads or 1, q_len, kv_len] (if HAS_BIAS)
//   7  dk     storage, read_write f32 dK, laid out as K
//   8  dv     storage, read_write f32 dV, laid out as V
//   9  lq     uniform, dynamic    Len: q_len
//   10 lkv    uniform, dynamic    Len: kv_len
// Eight storage buffers: WebGPU's default limit per stage. Packing lse, D and the mask into
// one buffer is what brings it down from ten.

override DS: u32 = 4u;   // invocations per owned key, splitting its columns
override NC: u32 = 4u;   // vec4 columns per invocation: DS NC >= the widest head's vec4s, NC <= 8
override BO: u32 = 16u;  // keys owned per workgroup
override BW: u32 = 8u;   // query rows per step of the walk, at most 8 DS
// Walked rows per invocation in the score step (rows s, s + DS, ...): at most 8.
override ROWS: u32 = (BW + DS - 1u) / DS;

@group(0) @binding(0) var<uniform> p: FusedParams;
@group(0) @binding(1) var<storage, read> q: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> k: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> v: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> d_o: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read> aux: array<f32>;
@group(0) @binding(6) var<storage, read> bias: array<f32>;
@group(0) @binding(7) var<storage, read_write> dk: array<f32>;
@group(0) @binding(8) var<storage, read_write> dv: array<f32>;
@group(0) @binding(9) var<uniform> lq: Len;
@group(0) @binding(10) var<uniform> lkv: Len;

// Rows of DS NC vec4: the owned keys' K and V, the walked queries' Q and dO.
var<workgroup> own_k: array<vec4<f32>, BO * DS * NC>;
var<workgroup> own_v: array<vec4<f32>, BO * DS * NC>;
var<workgroup> walk_q: array<vec4<f32>, BW * DS * NC>;
var<workgroup> walk_do: array<vec4<f32>, BW * DS * NC>;
// P and dS of the step: [walked row w][owned key o].
var<workgroup> p_t: array<f32, BW * BO>;
var<workgroup> ds_t: array<f32, BW * BO>;
// The walked rows' lse and D, read once per step rather than once per pair.
var<workgroup> walk_lse: array<f32, BW>;
var<workgroup> walk_d: array<f32, BW>;

@compute @workgroup_size(DS, BO)
fn main(
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let key_blocks = (lkv.n + BO - 1u) / BO;
    let tile = workgroup_index(wid, nwg);
    if (tile >= key_blocks * p.batch * p.kv_heads) {
        return;
    }
    let mat = tile / key_blocks;
    let b = mat / p.kv_heads;
    let kh = mat % p.kv_heads;
    let j0 = (tile % key_blocks) * BO;
    let s = lid.x;
    let o = lid.y;
    let j = j0 + o;
    let w4 = DS * NC;
    let threads = DS * BO;

    for (var e = li; e < BO * w4; e += threads) {
        let jj = min(j0 + e / w4, lkv.n - 1u);
        own_k[e] = select(vec4<f32>(0.0), k4(k_row(b, kh, jj), e % w4), j0 + e / w4 < lkv.n);
        own_v[e] = select(vec4<f32>(0.0), v4(v_row(b, kh, jj), e % w4), j0 + e / w4 < lkv.n);
    }
    let present = key_ok(b, j);
    var acc_k: array<vec4<f32>, 8>;
    var acc_v: array<vec4<f32>, 8>;
    for (var c = 0u; c < 8u; c++) {
        acc_k[c] = vec4<f32>(0.0);
        acc_v[c] = vec4<f32>(0.0);
    }
    workgroupBarrier();

    // No query before this one sees any owned key.
    let i_first = (first_query(j0) / BW) * BW;
    for (var hh = 0u; hh < p.group; hh++) {
        let h = kh * p.group + hh;
        for (var i0 = i_first; i0 < lq.n; i0 += BW) {
            for (var e = li; e < BW * w4; e += threads) {
                let i = i0 + e / w4;
                let ii = min(i, lq.n - 1u);
                walk_q[e] = select(vec4<f32>(0.0), q4(q_row(b, h, ii), e % w4), i < lq.n);
                walk_do[e] = select(vec4<f32>(0.0), do4(o_row(b, h, ii), e % w4), i < lq.n);
            }
            for (var e = li; e < BW; e += threads) {
                let ii = min(i0 + e, lq.n - 1u);
                walk_lse[e] = lse_of(b, h, ii);
                walk_d[e] = d_of(b, h, ii);
            }
            workgroupBarrier();
            // Rows s, s + DS, ... of the step against key o: each vec4 of the key's K and V
            // rows is loaded once and feeds every one of them (up to 8, in registers).
            var sd = array<f32, 8>(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0);
            var pd = array<f32, 8>(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0);
            for (var c4 = 0u; c4 < w4; c4++) {
                let kk = own_k[o * w4 + c4];
                let vv = own_v[o * w4 + c4];
                for (var r = 0u; r < ROWS; r++) {
                    let w = min(s + DS * r, BW - 1u);
                    sd[r] += dot(walk_q[w * w4 + c4], kk);
                    pd[r] += dot(walk_do[w * w4 + c4], vv);
                }
            }
            for (var r = 0u; r < ROWS; r++) {
                let w = s + DS * r;
                let i = i0 + w;
                var pr = Pair(0.0, 0.0);
                if (w < BW && i < lq.n && present) {
                    pr = pair(b, h, i, j, sd[r], pd[r], walk_lse[w], walk_d[w], true);
                }
                if (w < BW) {
                    p_t[w * BO + o] = pr.prob;
                    ds_t[w * BO + o] = pr.ds;
                }
            }
            workgroupBarrier();
            for (var w = 0u; w < BW; w++) {
                let pw = p_t[w * BO + o];
                let dsw = ds_t[w * BO + o];
                for (var c = 0u; c < NC; c++) {
                    let c4 = s + DS * c;
                    acc_v[c] += pw * walk_do[w * w4 + c4];
                    acc_k[c] += dsw * walk_q[w * w4 + c4];
                }
            }
            workgroupBarrier();
        }
    }

    if (j >= lkv.n) {
        return;
    }
    let k_at = k_row(b, kh, j);
    let v_at = v_row(b, kh, j);
    for (var c = 0u; c < NC; c++) {
        let c4 = s + DS * c;
        for (var e = 0u; e < 4u; e++) {
            let col = 4u * c4 + e;
            if (col < p.head_dim) {
                dk[k_at + col] = p.scale * acc_k[c][e];
            }
            if (col < p.head_dim_v) {
                dv[v_at + col] = acc_v[c][e];
            }
        }
    }
}
