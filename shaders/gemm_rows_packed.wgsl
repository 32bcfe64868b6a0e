// Contract: included ahead of gemm.wgsl, which asks row_start; binds nothing.
//
// Not a kernel; the layer's projection (Kernel::Gemm): every batch row's tokens start at the
// beginning of its block of the head-major output.

fn row_start(b: u32) -> u32 {
    return 0u;
}
