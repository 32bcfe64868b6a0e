// Contract: included ahead of scores.wgsl, which reads Q and K only through q_at and k_at; binds 1 q, 2 k; f16.wgsl comes first in the module.
//
// Not a kernel: the staged scores' Q and K in f16 storage (Precision::F16), each vec4 widened
// to f32 as it is loaded: the dot products and the score matrix stay f32, so no score can
// overflow f16's 65504.
//
// Bindings (group 0): 1 q, 2 k: storage, read, f16 read as vec4<f16> (each buffer's size a
// multiple of 8 bytes); q_at and k_at take a vec4 index.

@group(0) @binding(1) var<storage, read> q: array<vec4<f16>>;
@group(0) @binding(2) var<storage, read> k: array<vec4<f16>>;

fn q_at(i: u32) -> vec4<f32> { return vec4<f32>(q[i]); }
fn k_at(i: u32) -> vec4<f32> { return vec4<f32>(k[i]); }
