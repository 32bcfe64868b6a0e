// Contract: included ahead of decode_combine.wgsl, which writes its output only through store_out; binds 2 out; f16.wgsl comes first in the module.
//
// Not a kernel: the combine's output in f16 storage (Precision::F16). The f32 merge is rounded
// to f16 here, once, as it is stored (WGSL lets the conversion take either neighbour of an
// inexact value; the host's error bound allows one f16 ulp for it).
//
// Bindings (group 0): 2 out: storage, read_write, f16; store_out takes an element index.

@group(0) @binding(2) var<storage, read_write> out: array<f16>;

fn store_out(i: u32, x: f32) { out[i] = f16(x); }
