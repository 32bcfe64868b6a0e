// Contract: the includer (gemm.wgsl) reads and writes its storage only through load_a, load_b, load_b4, load_bias4 and store_c; f16.wgsl comes first in the module.
//
// gemm.wgsl's storage in f16 (Precision::F16): the same bindings and element indices as
// gemm_io_f32.wgsl, holding f16. Every value is widened to f32 as it is loaded and the product
// accumulates in f32; only the stored result is rounded to f16 (the host keeps results within
// f16's range or reports the overflow as a non-finite output).
//
//   1  a     storage, read        f16 [M, K]
//   2  b     storage, read        vec4<f16> [K, N/4]
//   3  bias  storage, read        vec4<f16> [N/4]
//   4  c     storage, read_write  f16

@group(0) @binding(1) var<storage, read> a: array<f16>;
@group(0) @binding(2) var<storage, read> b: array<vec4<f16>>;
@group(0) @binding(3) var<storage, read> bias: array<vec4<f16>>;
@group(0) @binding(4) var<storage, read_write> c: array<f16>;

fn load_a(i: u32) -> f32 {
    return f32(a[i]);
}

// Element i of b, for B read by index rather than as whole vec4 rows.
fn load_b(i: u32) -> f32 {
    return f32(b[i / 4u][i % 4u]);
}

fn load_b4(i: u32) -> vec4<f32> {
    return vec4<f32>(b[i]);
}

fn load_bias4(i: u32) -> vec4<f32> {
    return vec4<f32>(bias[i]);
}

fn store_c(i: u32, v: f32) {
    c[i] = f16(v);
}
