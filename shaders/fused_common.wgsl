// Contract: the includer declares the io functions q_at, k_at, v_at, key_kept, bias_value and HAS_BIAS (fused_io_*.wgsl), includes fused_params.wgsl, unaligned.wgsl and qkv_unaligned.wgsl, and sets k_head and v_head before loading keys or values.
//
// Not a kernel: what the fused attention kernels (fused_attention.wgsl, fused_rows.wgsl) share:
// the bindings of their parameters and lengths, where a packed row lives, loads of K and V
// rows, the causal key limit, the bias row, and the overflow-safe exponential. The host puts
// this file after the io includes and the shared parts above, ahead of each fused kernel.
//
// Bindings (group 0): 0 p: uniform FusedParams; 7 lq, 8 lkv: uniform Len at dynamic offsets
// (the call's q_len and kv_len). See fused_attention.wgsl's header for the layout they describe.

const LOWEST: f32 = -3.402823e38;
const LOG2E: f32 = 1.4426950408889634;

@group(0) @binding(0) var<uniform> p: FusedParams;
@group(0) @binding(7) var<uniform> lq: Len;
@group(0) @binding(8) var<uniform> lkv: Len;

// Where packed row r of the (batch, kv head) `mat` lives: its batch, query head and query.
struct RowAt {
    b: u32,
    h: u32,
    i: u32,
}

fn row_at(mat: u32, r: u32) -> RowAt {
    return RowAt(mat / p.kv_heads, (mat % p.kv_heads) * p.group + r / lq.n, r % lq.n);
}

// Where this workgroup's kv head starts in K and V (element offsets), set once by main.
var<private> k_head: u32;
var<private> v_head: u32;

// vec4 d4 of key j of the kv head of `mat`: zero past kv_len and head_dim.
fn load_k4(mat: u32, j: u32, d4: u32) -> vec4<f32> {
    if (j >= lkv.n || d4 >= p.dp4) {
        return vec4<f32>(0.0);
    }
    return clip(k4(k_head + j * p.k_si + 4u * d4), d4, p.head_dim);
}

// vec4 c4 of value row j of the kv head of `mat`: zero past kv_len and head_dim_v.
fn load_v4(mat: u32, j: u32, c4: u32) -> vec4<f32> {
    if (j >= lkv.n || c4 >= p.dvp4) {
        return vec4<f32>(0.0);
    }
    return clip(v4(v_head + j * p.v_si + 4u * c4), c4, p.head_dim_v);
}

// One past the last key packed row r may attend: kv_len, or with causal masking
// i + 1 + kv_len - q_len (never below 0); 0 for rows past the packed rows.
fn key_limit(mat: u32, r: u32) -> u32 {
    if (r >= p.group * lq.n) {
        return 0u;
    }
    if (p.causal == 0u) {
        return lkv.n;
    }
    let reach = r % lq.n + 1u + lkv.n;
    return select(0u, min(lkv.n, reach - lq.n), reach > lq.n);
}

// Where packed row r's bias row starts.
fn bias_row(mat: u32, r: u32) -> u32 {
    let at = row_at(mat, r);
    return (at.b * p.bias_b + at.h * p.bias_h) * lq.n * lkv.n + at.i * lkv.n;
}

// exp(|scale| d) for a difference d <= 0 of unscaled scores (exp(d) of logits when there is a
// bias), through exp2. Multiplying d by the scale first and by log2 e second keeps a scale near
// f32::MAX from overflowing to inf: at worst the product is -inf, and exp2(-inf) = 0. A zero
// exponent gives exactly 1 without exp2: at scale 0 every exponent is a signed zero, and
// exp2(-0.0) came back NaN on a CPU Vulkan driver.
fn exp_scaled(d: vec4<f32>) -> vec4<f32> {
    let t = (d * select(abs(p.scale), 1.0, HAS_BIAS)) * LOG2E;
    return select(exp2(t), vec4<f32>(1.0), t == vec4<f32>(0.0));
}
