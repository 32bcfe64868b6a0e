// Contract: binds nothing; declares shifted and clip for the includer's vec4 loads.
//
// Not a kernel: the two helpers that let a kernel read four elements from any element offset
// through vec4 loads (tensors of any head width and stride), and zero the columns past a width.

// Elements s .. s + 3 (s = 1, 2, 3) of the eight in a, b.
fn shifted(a: vec4<f32>, b: vec4<f32>, s: u32) -> vec4<f32> {
    switch s {
        case 1u: { return vec4<f32>(a.yzw, b.x); }
        case 2u: { return vec4<f32>(a.zw, b.xy); }
        default: { return vec4<f32>(a.w, b.xyz); }
    }
}

// Zeroes the columns of vec4 d4 at or past `width` (only the last vec4 of a width that is not
// a multiple of 4 has any).
fn clip(x: vec4<f32>, d4: u32, width: u32) -> vec4<f32> {
    if (4u * d4 + 4u <= width) {
        return x;
    }
    return select(vec4<f32>(0.0), x, vec4<u32>(4u * d4) + vec4<u32>(0u, 1u, 2u, 3u) < vec4<u32>(width));
}
