// Contract: included ahead of fused_attention.wgsl or decode_split.wgsl, which read Q, K and V only through q_at, k_at and v_at; binds 1 q, 2 k, 3 v; f16.wgsl comes first in the module.
//
// Not a kernel: fused_io_qkv.wgsl (Q, K and V in three buffers, the operator's, a KV cache) in
// f16 storage (Precision::F16). Each vec4 is widened to f32 as it is loaded, so the kernel's
// dot products and everything after them are f32; only the bytes read are halved.
//
// Bindings (group 0): 1 q, 2 k, 3 v: storage, read, f16 read as vec4<f16> (each buffer's size
// a multiple of 8 bytes). Indices as in fused_io_qkv.wgsl (vec4 index i).

@group(0) @binding(1) var<storage, read> q: array<vec4<f16>>;
@group(0) @binding(2) var<storage, read> k: array<vec4<f16>>;
@group(0) @binding(3) var<storage, read> v: array<vec4<f16>>;

fn q_at(i: u32) -> vec4<f32> { return vec4<f32>(q[i]); }
fn k_at(i: u32) -> vec4<f32> { return vec4<f32>(k[i]); }
fn v_at(i: u32) -> vec4<f32> { return vec4<f32>(v[i]); }
