// Contract: included ahead of fused_attention.wgsl, which calls store_lse; binds nothing.
//
// Not a kernel; the choice when no gradients are wanted: the row logsumexp is neither bound
// nor computed (the call below compiles to nothing).

fn store_lse(row: u32, value: f32) {}
