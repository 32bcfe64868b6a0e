// Contract: included ahead of fused_attention.wgsl, which reads Q, K and V only through q_at, k_at and v_at; binds 1 qkv; f16.wgsl comes first in the module.
//
// Not a kernel: fused_io_qkv_packed.wgsl (the layer's one Q|K|V buffer, as its f16 projection
// writes it) in f16 storage (Precision::F16), each vec4 widened to f32 as it is loaded.
//
// Bindings (group 0): 1 qkv: storage, read, f16 read as vec4<f16> (size a multiple of 8
// bytes). Indices as in fused_io_qkv_packed.wgsl (vec4 index i).

@group(0) @binding(1) var<storage, read> qkv: array<vec4<f16>>;

fn q_at(i: u32) -> vec4<f32> { return vec4<f32>(qkv[i]); }
fn k_at(i: u32) -> vec4<f32> { return vec4<f32>(qkv[i]); }
fn v_at(i: u32) -> vec4<f32> { return vec4<f32>(qkv[i]); }
