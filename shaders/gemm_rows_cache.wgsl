// Contract: included ahead of gemm.wgsl, which asks row_start; binds @group(0) @binding(5).
//
// Not a kernel; the cached layer's K and V projection (Kernel::GemmCache): the new tokens of
// batch row b are stored from that row's current length in a KV cache, read on the GPU from the
// cache's table of row lengths, so that the projection writes K and V straight into the cache
// and the host never needs the lengths in a dispatch's parameters.
//
// Bindings (group 0):
//   5  row_len  uniform  RowLengths: batch row b's length at n[b / 4][b % 4]; at most 1024 rows

struct RowLengths {
    n: array<vec4<u32>, 256>,
}

@group(0) @binding(5) var<uniform> row_len: RowLengths;

fn row_start(b: u32) -> u32 {
    return row_len.n[b / 4u][b % 4u];
}
