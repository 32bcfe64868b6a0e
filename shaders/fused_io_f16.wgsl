// Contract: the includer (fused_attention.wgsl) reads Q, K, V and writes the output only through load_q_vec4, load_k_vec4, load_v_vec4 and store_out; f16.wgsl comes first in the module.
//
// fused_attention.wgsl's Q, K, V (a KV cache) and output storage in f16 (Precision::F16), with
// the same bindings and indices as fused_io_f32.wgsl. Every value is widened to f32 as it is
// loaded: the dot products, the running maximum and sum, the exponentials and the output
// accumulator are all f32, so no score is ever rounded to f16 or limited to its 65504. Only
// the finished output row is rounded to f16 when it is stored.
//
//   1  q    storage, read        vec4<f16>
//   2  k    storage, read        vec4<f16>
//   3  v    storage, read        vec4<f16>
//   6  out  storage, read_write  f16

@group(0) @binding(1) var<storage, read> q: array<vec4<f16>>;
@group(0) @binding(2) var<storage, read> k: array<vec4<f16>>;
@group(0) @binding(3) var<storage, read> v: array<vec4<f16>>;
@group(0) @binding(6) var<storage, read_write> out: array<f16>;

fn load_q_vec4(i: u32) -> vec4<f32> {
    return vec4<f32>(q[i]);
}

fn load_k_vec4(i: u32) -> vec4<f32> {
    return vec4<f32>(k[i]);
}

fn load_v_vec4(i: u32) -> vec4<f32> {
    return vec4<f32>(v[i]);
}

fn store_out(i: u32, x: f32) {
    out[i] = f16(x);
}
