// Split-K decode attention ("flash decoding"), first pass: for a few queries (q_len 1 to about
// 16) over many keys, the keys are cut into `splits` ranges and each workgroup attends one range,
// writing a partial (m, l, o) per (batch, query head, query, split) that decode_combine.wgsl
// merges. A kernel with one workgroup per head would leave most of a GPU idle: 8 kv heads over
// 8k keys are 8 workgroups.
//
// For batch b, query head h (kv head kh = h / group), query i and split s, over the keys j of
// the split that query i may attend:
//     m = max_j sg · (Q[b,h,i] · K[b,kh,j])      (sg = sign of scale; unscaled, see exp_scaled)
//     l = sum_j exp(|scale| (sg · Q·K_j - m))
//     o = sum_j exp(|scale| (sg · Q·K_j - m)) V[b,kh,j,:]        (not divided by l)
// A split with no key to attend writes m = LOWEST, l = 0, o = 0.
// Masks: causal aligned to the end of the row's keys: j <= i + n_b - q_len, with n_b the row's
// key count; padding: key_kept(b, j) false (decode_keys_mask.wgsl reads key_mask[b, j];
// decode_keys_all.wgsl keeps every key and binds no mask). The row's key count n_b is kv_len,
// or with per-row lengths (row_lengths != 0) row_len[b] (<= kv_len): a KV cache whose batch
// rows hold different numbers of tokens.
//
// Bindings (group 0; group 1 is dispatch.wgsl's chunk index):
//   0  p         uniform             DecodeParams, below
//   1  q         storage, read       Q [b, h, i, d] at q_offset + b (sb n + sbc) + h (sh n + shc)
//                                    + i si + d, n = q_len (as fused_attention), read as vec4
//                                    through q_at: f32, or f16 widened to f32 as it is loaded
//                                    (fused_io_qkv.wgsl or fused_io_qkv_f16.wgsl, by precision)
//   2  k         storage, read       as q: K [b, kh, j, d], n = kv_len (k_at)
//   3  v         storage, read       as q: V [b, kh, j, d], n = kv_len (v_at)
//   4  key_mask  storage, read       u32 [batch, kv_len], 0 = padding (the mask variant only)
//   5  partials  storage, read_write  vec4 [batch, heads, q_len, splits, 1 + dvp4]: per entry
//                                    (m, l, 0, 0) then o in dvp4 vec4 (dvp4 = ceil(head_dim_v/4))
//   6  lq        uniform, dynamic    Len: q_len
//   7  lkv       uniform, dynamic    Len: kv_len
//   8  row_len   uniform             RowLengths: batch row b's key count at n[b / 4][b % 4]
//                                    (read only if row_lengths != 0); at most 1024 rows
//
// Work: one workgroup per (batch, kv head, block of ROWS packed query rows, split). As in
// fused_attention.wgsl the `group` query heads of a kv head are packed as group · q_len rows, so
// each K and V row the workgroup loads serves every query head of its group (GQA, MQA). Keys are
// walked in blocks of WG, one key per invocation:
//   1. each invocation dots its key with the workgroup's ROWS queries (held in workgroup memory),
//      loading the key once, as vec4;
//   2. online softmax per row: the block maximum raises the running one, the running sum and
//      output are rescaled by exp(|scale| (m_old - m_new)). Maxima are of unscaled scores times
//      the scale's sign, the scale applied only to differences from them, so that no finite
//      scale can overflow a score (as fused_attention.wgsl's exp_scaled);
//   3. O += P V: invocation t owns vec4 column t % dvp4 of every row, for keys t / dvp4 + lanes
//      · n (lanes = WG / dvp4 invocations share a column): each V vec4 is loaded once and feeds
//      every row; consecutive invocations read consecutive vec4 of a value row.
// At the end the lanes' outputs are summed through workgroup memory and written unnormalised.
// With f16 storage only the loads change: scores, maxima, sums and outputs are f32 here, and so
// are the partials, so no score can overflow f16's 65504.

override WG: u32 = 128u;   // invocations; keys per block; at least dvp4
override ROWS: u32 = 16u;  // packed query rows per workgroup, at most MAX_ROWS
override D4: u32 = 32u;    // vec4 of workgroup memory per row: at least dp4 and dvp4

const MAX_ROWS: u32 = 16u;
const LOWEST: f32 = -3.402823e38;
const LOG2E: f32 = 1.4426950408889634;

struct DecodeParams {
    batch: u32,
    kv_heads: u32,
    group: u32,
    head_dim: u32,
    head_dim_v: u32,
    dp4: u32,
    dvp4: u32,
    causal: u32,
    row_lengths: u32,
    splits: u32,
    scale: f32,
    _pad2: u32,
    q_offset: u32,
    q_sb: u32,
    q_sbc: u32,
    q_sh: u32,
    q_shc: u32,
    q_si: u32,
    k_offset: u32,
    k_sb: u32,
    k_sbc: u32,
    k_sh: u32,
    k_shc: u32,
    k_si: u32,
    v_offset: u32,
    v_sb: u32,
    v_sbc: u32,
    v_sh: u32,
    v_shc: u32,
    v_si: u32,
    _pad0: u32,
    _pad1: u32,
}

// Each batch row's key count (a KV cache's rows hold different numbers of tokens).
struct RowLengths {
    n: array<vec4<u32>, 256>,
}

// One length, at a dynamic offset into the operator's table of lengths.
struct Len {
    n: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: DecodeParams;
@group(0) @binding(5) var<storage, read_write> partials: array<vec4<f32>>;
@group(0) @binding(6) var<uniform> lq: Len;
@group(0) @binding(7) var<uniform> lkv: Len;
@group(0) @binding(8) var<uniform> row_len: RowLengths;

// The queries (rows r at r D4), and at the end the summed outputs in the same place.
var<workgroup> q_tile: array<vec4<f32>, ROWS * D4>;
// Scores, then weights, of the current block: row r's key t at r WG + t.
var<workgroup> s_tile: array<f32, ROWS * WG>;
// Per row: running maximum, this block's rescale factor, running sum.
var<workgroup> row_m: array<f32, ROWS>;
var<workgroup> row_a: array<f32, ROWS>;
var<workgroup> row_l: array<f32, ROWS>;
// The row's key count and the split's key range, made uniform for the loop bounds.
var<workgroup> keys_n: u32;

// exp(|scale| d) for a difference d <= 0 of unscaled scores, through exp2, the scale applied
// before log2 e so that a scale near f32::MAX gives at worst -inf; a zero exponent gives exactly
// 1 (exp2(-0.0) came back NaN on a CPU Vulkan driver).
fn exp_scaled(d: f32) -> f32 {
    let t = (d * abs(p.scale)) * LOG2E;
    return select(exp2(t), 1.0, t == 0.0);
}

@compute @workgroup_size(WG)
fn main(
    @builtin(local_invocation_index) t: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let index = workgroup_index(wid, nwg);
    let row_blocks = (p.group * lq.n + ROWS - 1u) / ROWS;
    if (index >= p.batch * p.kv_heads * row_blocks * p.splits) {
        return;
    }
    let s = index % p.splits;
    let rb = (index / p.splits) % row_blocks;
    let mat = index / (p.splits * row_blocks);
    let b = mat / p.kv_heads;
    let kh = mat % p.kv_heads;
    let q_len = lq.n;
    let rows = p.group * q_len;
    let row0 = rb * ROWS;

    if (t == 0u) {
        var n = lkv.n;
        if (p.row_lengths != 0u) {
            n = min(row_len.n[b / 4u][b % 4u], lkv.n);
        }
        keys_n = n;
    }
    for (var e = t; e < ROWS * D4; e += WG) {
        let r = e / D4;
        let d4 = e % D4;
        var x = vec4<f32>(0.0);
        let pr = row0 + r;
        if (pr < rows && d4 < p.dp4) {
            let h = kh * p.group + pr / q_len;
            let i = pr % q_len;
            let base = p.q_offset + b * (p.q_sb * q_len + p.q_sbc) + h * (p.q_sh * q_len + p.q_shc) + i * p.q_si;
            x = clip(q4(base + 4u * d4), d4, p.head_dim);
        }
        q_tile[e] = x;
    }
    for (var r = t; r < ROWS; r += WG) {
        row_m[r] = LOWEST;
        row_l[r] = 0.0;
    }
    let n = workgroupUniformLoad(&keys_n);
    // The split's keys: ceil(n / splits) each, the last ones shorter or empty.
    let per = (n + p.splits - 1u) / p.splits;
    let k_begin = min(s * per, n);
    var k_end = min(k_begin + per, n);
    // With causal masking no row of the block sees past its last query's limit.
    if (p.causal != 0u) {
        let last = min(row0 + ROWS, rows) - 1u;
        var i_max = last % q_len;
        if (row0 / q_len != last / q_len) {
            i_max = q_len - 1u;
        }
        let reach = i_max + 1u + n;
        k_end = min(k_end, select(0u, reach - q_len, reach > q_len));
    }

    let k_head = p.k_offset + b * (p.k_sb * lkv.n + p.k_sbc) + kh * (p.k_sh * lkv.n + p.k_shc);
    let v_head = p.v_offset + b * (p.v_sb * lkv.n + p.v_sbc) + kh * (p.v_sh * lkv.n + p.v_shc);
    let sg = select(1.0, -1.0, p.scale < 0.0);
    let lanes = WG / p.dvp4;
    let c4 = t % p.dvp4;
    let lane = t / p.dvp4;
    var o: array<vec4<f32>, MAX_ROWS>;
    for (var r = 0u; r < ROWS; r++) {
        o[r] = vec4<f32>(0.0);
    }

    for (var kb = k_begin; kb < k_end; kb += WG) {
        // 1. This invocation's key against every row.
        let j = kb + t;
        var acc: array<f32, MAX_ROWS>;
        for (var r = 0u; r < ROWS; r++) {
            acc[r] = 0.0;
        }
        var present = j < k_end;
        if (present) {
            present = key_kept(b, j);
        }
        if (present) {
            for (var d4 = 0u; d4 < p.dp4; d4++) {
                let kv = clip(k4(k_head + j * p.k_si + 4u * d4), d4, p.head_dim);
                for (var r = 0u; r < ROWS; r++) {
                    acc[r] += dot(q_tile[r * D4 + d4], kv);
                }
            }
        }
        for (var r = 0u; r < ROWS; r++) {
            let pr = row0 + r;
            // Causal: query i sees keys j <= i + n - q_len.
            let ok = present && pr < rows && (p.causal == 0u || j + q_len <= pr % q_len + n);
            s_tile[r * WG + t] = select(LOWEST, acc[r] * sg, ok);
        }
        workgroupBarrier();

        // 2. Online softmax: the block maximum, the rescale, the weights, the sum.
        for (var r = t; r < ROWS; r += WG) {
            var mb = row_m[r];
            for (var e = 0u; e < WG; e++) {
                mb = max(mb, s_tile[r * WG + e]);
            }
            // While every key so far is masked both are LOWEST and the factor is 1 (l, o are 0).
            row_a[r] = exp_scaled(row_m[r] - mb);
            row_m[r] = mb;
        }
        workgroupBarrier();
        for (var r = 0u; r < ROWS; r++) {
            let x = s_tile[r * WG + t];
            s_tile[r * WG + t] = select(0.0, exp_scaled(x - row_m[r]), x != LOWEST);
        }
        workgroupBarrier();
        for (var r = t; r < ROWS; r += WG) {
            var sum = 0.0;
            for (var e = 0u; e < WG; e++) {
                sum += s_tile[r * WG + e];
            }
            row_l[r] = row_l[r] * row_a[r] + sum;
        }

        // 3. O += P V, each V vec4 loaded once for every row.
        if (lane < lanes) {
            for (var r = 0u; r < ROWS; r++) {
                o[r] *= row_a[r];
            }
            let kn = min(WG, k_end - kb);
            for (var e = lane; e < kn; e += lanes) {
                let vv = clip(v4(v_head + (kb + e) * p.v_si + 4u * c4), c4, p.head_dim_v);
                for (var r = 0u; r < ROWS; r++) {
                    o[r] += s_tile[r * WG + e] * vv;
                }
            }
        }
        workgroupBarrier();
    }

    // The lanes' outputs summed into q_tile, one lane at a time.
    for (var ln = 0u; ln < lanes; ln++) {
        if (lane == ln) {
            for (var r = 0u; r < ROWS; r++) {
                let prev = select(q_tile[r * D4 + c4], vec4<f32>(0.0), ln == 0u);
                q_tile[r * D4 + c4] = prev + o[r];
            }
        }
        workgroupBarrier();
    }

    let entry = 1u + p.dvp4;
    for (var e = t; e < ROWS * entry; e += WG) {
        let r = e / entry;
        let c = e % entry;
        let pr = row0 + r;
        if (pr < rows) {
            let h = kh * p.group + pr / q_len;
            let i = pr % q_len;
            let at = ((((b * p.kv_heads * p.group + h) * q_len + i) * p.splits + s) * entry);
            if (c == 0u) {
                partials[at] = vec4<f32>(row_m[r], row_l[r], 0.0, 0.0);
            } else {
                partials[at + c] = q_tile[r * D4 + c - 1u];
            }
        }
    }
}
