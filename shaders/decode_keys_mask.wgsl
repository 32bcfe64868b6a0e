// Contract: included ahead of decode_split.wgsl, which declares the uniform `lkv` and asks key_kept; binds 4 key_mask.
//
// Not a kernel: the key-padding mask of split-K decode, when the attention has one
// (decode_keys_all.wgsl otherwise, which binds nothing, so that the kernel binds 4 storage
// buffers, as downlevel devices allow).
//
// Bindings (group 0): 4 key_mask: storage, read, u32 [batch, kv_len]; 0 = padding.

@group(0) @binding(4) var<storage, read> key_mask: array<u32>;

// Whether key j of batch b may be attended (j < the row's key count, checked by the caller).
fn key_kept(b: u32, j: u32) -> bool {
    return key_mask[b * lkv.n + j] != 0u;
}
