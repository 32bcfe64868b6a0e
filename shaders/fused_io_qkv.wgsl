// Contract: included ahead of fused_attention.wgsl or decode_split.wgsl, which read Q, K and V only through q_at, k_at and v_at; binds 1 q, 2 k, 3 v.
//
// Not a kernel: Q, K and V in three buffers, as an application holds them (the operator).
// The other choice, fused_io_qkv_packed.wgsl, binds one buffer; the host picks by what it binds
// (`FusedIo`), so the pipeline layout has exactly the bindings the kernel reads. Split-K
// decode (decode_split.wgsl) reads its Q, K and V through this file too, at the same slots.
//
// Bindings (group 0): 1 q, 2 k, 3 v: storage, read, f32 read as vec4 (each buffer's size a
// multiple of 16 bytes). fused_attention.wgsl reads them only through q_at, k_at and v_at
// (vec4 index i).

@group(0) @binding(1) var<storage, read> q: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> k: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> v: array<vec4<f32>>;

fn q_at(i: u32) -> vec4<f32> { return q[i]; }
fn k_at(i: u32) -> vec4<f32> { return k[i]; }
fn v_at(i: u32) -> vec4<f32> { return v[i]; }
