// Contract: the includer declares q_at, k_at and v_at (fused_io_qkv*.wgsl) and includes unaligned.wgsl; binds nothing.
//
// Not a kernel: Q, K and V read four elements at a time from any element offset, for the kernels
// that load them through the fused io includes (the fused kernels and split-K decode).

// The four elements from element e on, each read as vec4: one load when e is a multiple of 4
// (every layer and every app tensor whose widths, strides and offsets are), two otherwise,
// so that any head width and stride works.
fn q4(e: u32) -> vec4<f32> {
    let a = q_at(e / 4u);
    if (e % 4u == 0u) { return a; }
    return shifted(a, q_at(e / 4u + 1u), e % 4u);
}

fn k4(e: u32) -> vec4<f32> {
    let a = k_at(e / 4u);
    if (e % 4u == 0u) { return a; }
    return shifted(a, k_at(e / 4u + 1u), e % 4u);
}

fn v4(e: u32) -> vec4<f32> {
    let a = v_at(e / 4u);
    if (e % 4u == 0u) { return a; }
    return shifted(a, v_at(e / 4u + 1u), e % 4u);
}
