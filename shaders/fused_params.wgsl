// Contract: the includer binds p (FusedParams) and the lengths lq, lkv (Len) itself; this file binds nothing.
//
// Not a kernel: the attention forward's uniform parameters (`FusedParams`, mirrored by the
// host's `uniform_params!` struct in src/kernels/fused.rs) and one entry of its table of
// lengths (`Len`), shared by the fused kernels and the backward's, which read the forward's
// very uniform buffers. A tensor's element (b, h, i, d) is at offset + b (sb n + sbc)
// + h (sh n + shc) + i si + d, n the call's length of its sequence axis (see
// fused_attention.wgsl's header).

struct FusedParams {
    batch: u32,
    kv_heads: u32,
    group: u32,
    head_dim: u32,
    head_dim_v: u32,
    dp4: u32,
    dvp4: u32,
    causal: u32,
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
    _pad2: u32,
    _pad3: u32,
    _pad4: u32,
}

// One length, at a dynamic offset into the plan's table of lengths.
struct Len {
    n: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}
