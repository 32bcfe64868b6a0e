// Contract: included ahead of fused_attention.wgsl, which reads Q, K and V only through q_at, k_at and v_at; binds 1 qkv.
//
// Not a kernel: Q, K and V in ONE buffer at the offsets of the kernel's parameters, as the
// layer's projection writes them. One binding in place of three keeps the layer within the
// four storage buffers per shader stage of downlevel devices (qkv, key_mask, out).
//
// Bindings (group 0): 1 qkv: storage, read, f32 read as vec4 (size a multiple of 16 bytes).
// fused_attention.wgsl reads it only through q_at, k_at and v_at (vec4 index i).

@group(0) @binding(1) var<storage, read> qkv: array<vec4<f32>>;

fn q_at(i: u32) -> vec4<f32> { return qkv[i]; }
fn k_at(i: u32) -> vec4<f32> { return qkv[i]; }
fn v_at(i: u32) -> vec4<f32> { return qkv[i]; }
