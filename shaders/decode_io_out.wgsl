// Contract: included ahead of decode_combine.wgsl, which writes its output only through store_out; binds 2 out.
//
// Not a kernel: the combine's output in f32 storage (Precision::F32); decode_io_out_f16.wgsl
// is the f16 choice.
//
// Bindings (group 0): 2 out: storage, read_write, f32; store_out takes an element index.

@group(0) @binding(2) var<storage, read_write> out: array<f32>;

fn store_out(i: u32, x: f32) { out[i] = x; }
