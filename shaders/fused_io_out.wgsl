// Contract: included ahead of fused_attention.wgsl, which writes its output only through store_out; binds 6 out.
//
// Not a kernel: the output in f32 storage (Precision::F32); fused_io_out_f16.wgsl is the f16
// choice.
//
// Bindings (group 0): 6 out: storage, read_write, f32; store_out takes an element index.

@group(0) @binding(6) var<storage, read_write> out: array<f32>;

fn store_out(i: u32, x: f32) { out[i] = x; }
