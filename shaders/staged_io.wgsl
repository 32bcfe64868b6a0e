// Contract: the includer binds `p: StagedParams` at @binding(0) and `lq`, `lkv: Len` at @binding(4) and @binding(5) of group 0.
//
// What the staged attention kernels (scores, softmax, weighted_sum) share: the attention's
// geometry (StagedParams), the call's lengths (Len, at dynamic offsets into a table holding
// every length up to the plan's maximum, so a shorter call writes, allocates and compiles
// nothing), where a packed row lives, which keys it may see, and the overflow-safe exp.
// Not a kernel: no bindings of its own. WGSL declarations are order-free, so these functions
// may use the includer's `p`, `lq` and `lkv`.
//
// Geometry (the fused kernel's): query head h of batch b attends kv head kh = h / group
// (group = heads / kv_heads). A (batch, kv head) pair is one matrix `mat` = b kv_heads + kh of
// group · q_len packed rows, row r = (h - kh group) q_len + i, so every block of K or V a
// workgroup loads serves all query heads of the group (GQA and MQA without K/V copies). The
// packed rows of a matrix are also consecutive rows of the score matrix S
// [batch, heads, q_len, kvp]: row mat · group · q_len + r is (b heads + h) q_len + i. S rows are
// kvp = kv_len rounded up to a multiple of 4 wide, so that they can be read as vec4.
//
// Tensors are f32 arrays with element offsets and strides: element [b, h, i, d] of a tensor
// whose sequence axis is n long lies at offset + b (sb n + sbc) + h (sh n + shc) + i si + d, so
// head-major [B, H, N, D], token-major [B, N, H·D] and a KV cache (sb = sh = 0) all work
// without copies.

struct StagedParams {
    batch: u32,
    heads: u32,
    kv_heads: u32,
    group: u32,
    head_dim: u32,
    head_dim_v: u32,
    dp4: u32,
    dvp4: u32,
    causal: u32,
    has_mask: u32,
    has_bias: u32,
    // Bias broadcast: the bias's batch index step (in q_len kv_len blocks; 0 = broadcast)
    // and head index step (0 or 1).
    bias_b: u32,
    bias_h: u32,
    scale: f32,
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
    o_offset: u32,
    o_sb: u32,
    o_sbc: u32,
    o_sh: u32,
    o_shc: u32,
    o_si: u32,
    _pad0: u32,
    _pad1: u32,
}

// One length, at a dynamic offset into the plan's table of lengths.
struct Len {
    n: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

const LOWEST: f32 = -3.402823e38;
const LOG2E: f32 = 1.4426950408889634;

// Where packed row r of matrix `mat` lives: its batch, query head and query.
struct RowAt {
    b: u32,
    h: u32,
    i: u32,
}

fn row_at(mat: u32, r: u32) -> RowAt {
    return RowAt(mat / p.kv_heads, (mat % p.kv_heads) * p.group + r / lq.n, r % lq.n);
}

// Packed rows of one matrix and the width of a row of S.
fn packed_rows() -> u32 {
    return p.group * lq.n;
}

fn kvp() -> u32 {
    return (lkv.n + 3u) / 4u * 4u;
}

// One past the last key query i may attend: kv_len, or with causal masking (aligned to the
// end of the keys: j <= i + kv_len - q_len) i + 1 + kv_len - q_len, never below 0.
fn key_limit(i: u32) -> u32 {
    if (p.causal == 0u) {
        return lkv.n;
    }
    let reach = i + 1u + lkv.n;
    return select(0u, min(lkv.n, reach - lq.n), reach > lq.n);
}

// The furthest key any of the packed rows row0 .. row0 + count - 1 (count >= 1, all real rows)
// may attend: within one head, its last row's; across heads, the head's last query's.
fn block_key_end(row0: u32, count: u32) -> u32 {
    let last = row0 + count - 1u;
    if (row0 / lq.n != last / lq.n) {
        return key_limit(lq.n - 1u);
    }
    return key_limit(last % lq.n);
}

// Elements s .. s + 3 (s = 1, 2, 3) of the eight in a, b.
fn shifted(a: vec4<f32>, b: vec4<f32>, s: u32) -> vec4<f32> {
    switch s {
        case 1u: { return vec4<f32>(a.yzw, b.x); }
        case 2u: { return vec4<f32>(a.zw, b.xy); }
        default: { return vec4<f32>(a.w, b.xyz); }
    }
}

// Zeroes the columns of vec4 d4 at or past `width`.
fn clip(x: vec4<f32>, d4: u32, width: u32) -> vec4<f32> {
    if (4u * d4 + 4u <= width) {
        return x;
    }
    return select(vec4<f32>(0.0), x, vec4<u32>(4u * d4) + vec4<u32>(0u, 1u, 2u, 3u) < vec4<u32>(width));
}

// exp(|scale| d) for a difference d <= 0 of unscaled scores (exp(d) of logits when there is a
// bias), through exp2: the scores stay unscaled until their maximum is subtracted, so no finite
// scale can overflow one into inf - inf = NaN; at worst a product is -inf and exp2 gives 0. A
// zero exponent gives exactly 1 without exp2 (exp2(-0.0) came back NaN on a CPU Vulkan driver).
fn exp_scaled(d: f32) -> f32 {
    let t = (d * select(abs(p.scale), 1.0, p.has_bias != 0u)) * LOG2E;
    return select(exp2(t), 1.0, t == 0.0);
}
