//! Host side of `softmax.wgsl`: the stable row softmax, in place.

use super::Layout;
use super::{DispatchSpec, Kernel};

/// Uniform parameters; the layout of `SoftmaxParams` in `softmax.wgsl`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
struct SoftmaxParams {
    seq: u32,
    seq_pad: u32,
    heads: u32,
    rows: u32,
    causal: u32,
    has_mask: u32,
    _pad: [u32; 2],
}

/// One workgroup per row of every (batch, head).
pub(crate) fn spec(l: &Layout, limits: &wgpu::Limits) -> DispatchSpec {
    // About eight vec4 per invocation: the reduction (log2 WG barrier steps through
    // workgroup memory) then stays small beside the row it reduces. A power of two, 8 to 256.
    let mut wg = (l.seq_pad / 4)
        .div_ceil(8)
        .next_power_of_two()
        .clamp(8, 256);
    while wg > 1
        && (wg > limits.max_compute_invocations_per_workgroup
            || wg > limits.max_compute_workgroup_size_x)
    {
        wg /= 2;
    }
    let rows = l.batch * l.heads * l.seq;
    let params = SoftmaxParams {
        seq: l.seq,
        seq_pad: l.seq_pad,
        heads: l.heads,
        rows,
        causal: l.causal as u32,
        has_mask: l.has_mask as u32,
        _pad: [0; 2],
    };
    DispatchSpec {
        kernel: Kernel::Softmax,
        overrides: vec![("WG", wg as f64)],
        params: bytemuck::bytes_of(&params).to_vec(),
        workgroups: rows,
        // A maximum, an exp, a sum and a division per score; few but costly.
        flops: 5.0 * rows as f64 * l.seq as f64,
    }
}
