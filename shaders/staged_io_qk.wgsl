// Contract: included ahead of scores.wgsl, which reads Q and K only through q_at and k_at; binds 1 q, 2 k.
//
// Not a kernel: the staged scores' Q and K in f32 storage (Precision::F32);
// staged_io_qk_f16.wgsl is the f16 choice.
//
// Bindings (group 0): 1 q, 2 k: storage, read, f32 read as vec4 (each buffer's size a multiple
// of 16 bytes); q_at and k_at take a vec4 index.

@group(0) @binding(1) var<storage, read> q: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> k: array<vec4<f32>>;

fn q_at(i: u32) -> vec4<f32> { return q[i]; }
fn k_at(i: u32) -> vec4<f32> { return k[i]; }
