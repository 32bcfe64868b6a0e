// Contract: the includer (gemm.wgsl) reads and writes its storage only through load_a, load_b, load_b4, load_bias4 and store_c.
//
// gemm.wgsl's storage in f32 (Precision::F32): the bindings, and element access in f32.
//
//   1  a     storage, read        f32 [M, K]
//   2  b     storage, read        vec4<f32> [K, N/4]
//   3  bias  storage, read        vec4<f32> [N/4]
//   4  c     storage, read_write  f32

@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> bias: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> c: array<f32>;

fn load_a(i: u32) -> f32 {
    return a[i];
}

// Element i of b, for B read by index rather than as whole vec4 rows.
fn load_b(i: u32) -> f32 {
    return (b[i / 4u][i % 4u]);
}

fn load_b4(i: u32) -> vec4<f32> {
    return b[i];
}

fn load_bias4(i: u32) -> vec4<f32> {
    return bias[i];
}

fn store_c(i: u32, v: f32) {
    c[i] = v;
}
