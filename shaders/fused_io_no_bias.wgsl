// Contract: included ahead of fused_attention.wgsl, which reads HAS_BIAS and bias_value; binds nothing.
//
// Not a kernel; the choice when there is no bias: the scores are scaled in exp_scaled, after
// the maximum (see fused_attention.wgsl), and no bias buffer is bound.

const HAS_BIAS: bool = false;

fn bias_value(i: u32) -> f32 {
    return 0.0;
}
