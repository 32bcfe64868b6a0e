// Contract: included ahead of fused_attention.wgsl, which calls store_lse for each packed row it owns; binds 9 lse.
//
// Not a kernel: the row logsumexp the backward needs, saved when gradients are wanted
// (fused_io_no_lse.wgsl otherwise, which binds and stores nothing).
//
// Bindings (group 0): 9 lse: storage, read_write, f32 [batch, heads, q_len]: per query row,
// the natural log of Σ_j exp(x_j) over the keys j it attends, x_j = scale q·k_j + bias_j the
// logits, so that P_j = exp(x_j - lse); LOWEST (-3.402823e38) for a row that attends no key.

@group(0) @binding(9) var<storage, read_write> lse: array<f32>;

fn store_lse(row: u32, value: f32) {
    lse[row] = value;
}
