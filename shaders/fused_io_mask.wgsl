// Contract: included ahead of fused_attention.wgsl, which declares the uniform `lkv` and asks key_kept; binds 4 key_mask.
//
// Not a kernel: the key-padding mask, when the attention has one (fused_io_no_mask.wgsl
// otherwise, which binds nothing).
//
// Bindings (group 0): 4 key_mask: storage, read, u32 [batch, kv_len]; 0 = padding.

@group(0) @binding(4) var<storage, read> key_mask: array<u32>;

// Whether key j of batch b may be attended (j < kv_len, checked by the caller).
fn key_kept(b: u32, j: u32) -> bool {
    return key_mask[b * lkv.n + j] != 0u;
}
