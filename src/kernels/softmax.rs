//! Host side of `softmax.wgsl`: the stable row softmax, in place.

use super::Layout;
use super::variants::{Distinct, sizes};
use super::{DispatchSpec, Kernel, Overrides, uniform_params};

uniform_params! {
    /// Uniform parameters; the layout of `SoftmaxParams` in `softmax.wgsl`.
    struct SoftmaxParams {
        seq: u32,
        seq_pad: u32,
        heads: u32,
        rows: u32,
        causal: u32,
        has_mask: u32,
        _pad0: u32,
        _pad1: u32,
    }
}

/// One workgroup per row of every (batch, head).
pub(crate) fn spec(l: &Layout, limits: &wgpu::Limits) -> DispatchSpec {
    let wg = workgroup_size(l.seq_pad, limits);
    let rows = l.batch * l.heads * l.seq;
    let params = SoftmaxParams {
        seq: l.seq,
        seq_pad: l.seq_pad,
        heads: l.heads,
        rows,
        causal: l.causal as u32,
        has_mask: l.has_mask as u32,
        _pad0: 0,
        _pad1: 0,
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

/// Invocations per row of `seq_pad` scores: about eight vec4 each, so that the reduction (log2
/// WG barrier steps through workgroup memory) stays small beside the row it reduces. A power of
/// two, 8 to 256, halved to fit the device.
pub(super) fn workgroup_size(seq_pad: u32, limits: &wgpu::Limits) -> u32 {
    let mut wg = (seq_pad / 4).div_ceil(8).next_power_of_two().clamp(8, 256);
    while wg > 1
        && (wg > limits.max_compute_invocations_per_workgroup
            || wg > limits.max_compute_workgroup_size_x)
    {
        wg /= 2;
    }
    wg
}

/// Every override set `spec` can emit under `limits`: one per padded row length.
pub(crate) fn override_sets(limits: &wgpu::Limits) -> Vec<Overrides> {
    let mut sizes_seen = Distinct::default();
    for seq_pad in sizes(4) {
        sizes_seen.add(workgroup_size(seq_pad, limits));
    }
    sizes_seen.overrides(|wg| vec![("WG", wg as f64)])
}
