// Contract: included ahead of fused_attention.wgsl, which reads HAS_BIAS and bias_value; binds 5 bias.
//
// Not a kernel: the additive bias, when the attention has one (fused_io_no_bias.wgsl
// otherwise, which binds nothing).
//
// Bindings (group 0): 5 bias: storage, read, f32 [batch or 1, heads or 1, q_len, kv_len]; its
// broadcast is in FusedParams (bias_b, bias_h).

@group(0) @binding(5) var<storage, read> bias: array<f32>;

const HAS_BIAS: bool = true;

fn bias_value(i: u32) -> f32 {
    return bias[i];
}
