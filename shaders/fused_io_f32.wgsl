// Contract: the includer (fused_attention.wgsl) reads Q, K, V and writes the output only through load_q_vec4, load_k_vec4, load_v_vec4 and store_out.
//
// fused_attention.wgsl's Q, K, V and output storage in f32 (Precision::F32): the bindings, and
// element access in f32. Indices are in vec4s for loads and in elements for the store.
//
//   1  q    storage, read        vec4<f32>
//   2  k    storage, read        vec4<f32>
//   3  v    storage, read        vec4<f32>
//   6  out  storage, read_write  f32

@group(0) @binding(1) var<storage, read> q: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> k: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> v: array<vec4<f32>>;
@group(0) @binding(6) var<storage, read_write> out: array<f32>;

fn load_q_vec4(i: u32) -> vec4<f32> {
    return q[i];
}

fn load_k_vec4(i: u32) -> vec4<f32> {
    return k[i];
}

fn load_v_vec4(i: u32) -> vec4<f32> {
    return v[i];
}

fn store_out(i: u32, x: f32) {
    out[i] = x;
}
