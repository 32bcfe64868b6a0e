// Contract: included ahead of weighted_sum.wgsl, which reads V only through v_at and writes its output only through store_out; binds 2 v, 3 out.
//
// Not a kernel: the weighted sum's V and output in f32 storage (Precision::F32);
// staged_io_v_out_f16.wgsl is the f16 choice.
//
// Bindings (group 0): 2 v: storage, read, f32 read as vec4 (size a multiple of 16 bytes), v_at
// takes a vec4 index; 3 out: storage, read_write, f32, store_out takes an element index.

@group(0) @binding(2) var<storage, read> v: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

fn v_at(i: u32) -> vec4<f32> { return v[i]; }
fn store_out(i: u32, x: f32) { out[i] = x; }
