// Contract: included ahead of weighted_sum.wgsl, which reads V only through v_at and writes its output only through store_out; binds 2 v, 3 out; f16.wgsl comes first in the module.
//
// Not a kernel: the weighted sum's V and output in f16 storage (Precision::F16). V is widened
// to f32 as it is loaded; the f32 sum is rounded to f16 once, as it is stored (WGSL lets the
// conversion take either neighbour of an inexact value; the host's error bound allows one f16
// ulp for it). The probabilities stay f32.
//
// Bindings (group 0): 2 v: storage, read, f16 read as vec4<f16> (size a multiple of 8 bytes),
// v_at takes a vec4 index; 3 out: storage, read_write, f16, store_out takes an element index.

@group(0) @binding(2) var<storage, read> v: array<vec4<f16>>;
@group(0) @binding(3) var<storage, read_write> out: array<f16>;

fn v_at(i: u32) -> vec4<f32> { return vec4<f32>(v[i]); }
fn store_out(i: u32, x: f32) { out[i] = f16(x); }
