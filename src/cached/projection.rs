//! One projection GEMM of the cached layer, ready for every step size: its packed weights, the
//! pipelines, and a table of its uniform parameters for each step size from which each step
//! copies its own into the parameters the kernel reads (no write, no allocation per step).

use crate::context::GpuContext;
use crate::error::Result;
use crate::gpu::{STORAGE, buffer, init_bytes, scoped_async};
use crate::kernels::gemm::{self, Load, Store};
use crate::kernels::{ChunkTable, DispatchSpec, Pipeline, fold_grid, pad4};
use crate::precision::Precision;
use crate::tensor::Tensor;
use wgpu::util::DeviceExt;

/// Bytes of one entry of the parameter table: `GemmParams`.
const PARAMS_BYTES: u64 = crate::kernels::gemm::GemmParams::LAYOUT.size as u64;

/// The product `[batch * n, k] · [k, cols] + bias` of one step of `n` tokens, for every
/// `n` up to the layer's step size.
#[derive(Debug)]
pub(super) struct Projection {
    /// Pipelines by the largest step they serve, ascending: tiles sized for one token, for
    /// split-K decode's longest step and for the longest.
    pipelines: Vec<(usize, Pipeline)>,
    /// The parameters the kernel reads (`UNIFORM | COPY_DST`).
    params: wgpu::Buffer,
    /// Entry `n - 1` holds the parameters of a step of `n` tokens (`COPY_SRC`).
    table: wgpu::Buffer,
    /// The grid of a step of `n` tokens at `n - 1`.
    grids: Vec<[u32; 3]>,
    pub weights: wgpu::Buffer,
    pub bias: wgpu::Buffer,
}

/// What a projection computes for a step of `n` tokens: A's layout and where the product goes.
pub(super) type StepShape<'a> = &'a dyn Fn(u32) -> (Load, Store);

impl Projection {
    /// `w` `[k, cols]` (columns in groups of `group` padded to `pad4(group)`: heads) with
    /// optional bias `[cols]`, for steps of 1 to `max_step` tokens over `batch` rows; with
    /// `cache` the K/V variant (rows stored from each batch row's length in the cache). The
    /// weights are stored, and A read and C written, in `precision`; `w` and `b` must already
    /// hold values of it (rounded by the caller, who names what does not fit).
    #[allow(clippy::too_many_arguments)]
    pub async fn new(
        ctx: &GpuContext,
        label: &str,
        w: &Tensor,
        b: Option<&Tensor>,
        group: usize,
        batch: usize,
        max_step: usize,
        cache: bool,
        precision: Precision,
        shape: StepShape<'_>,
    ) -> Result<Self> {
        let limits = ctx.limits();
        let (packed_w, packed_b) = pack(w, b, group);
        let k = w.shape()[0] as u32;
        let cols = packed_b.len() as u32;
        // Tiles by step size, so that short steps waste little work on empty rows: one token
        // (decode), up to split-K decode's longest, and the longest (a prompt).
        let mut classes = vec![1, max_step.min(crate::DECODE_MAX_Q_LEN), max_step];
        classes.dedup();
        let mut pipelines = Vec::new();
        let mut table = Vec::with_capacity(max_step * PARAMS_BYTES as usize);
        let mut grids = Vec::with_capacity(max_step);
        for &up_to in &classes {
            let tiles = gemm::tiles((batch * up_to) as u32, cols, &limits);
            let from = pipelines.last().map_or(1, |(n, _)| n + 1);
            let mut kernel = None;
            for n in from..=up_to {
                let (load, store) = shape(n as u32);
                let spec: DispatchSpec = gemm::spec_tiled(
                    tiles,
                    (batch * n) as u32,
                    cols,
                    k,
                    load,
                    store,
                    precision,
                    cache,
                );
                grids.push(fold_grid(
                    spec.workgroups,
                    limits.max_compute_workgroups_per_dimension,
                    label,
                )?);
                table.extend_from_slice(&spec.params);
                kernel.get_or_insert((spec.kernel, spec.overrides));
            }
            let (kernel, overrides) = kernel.expect("every class serves at least one step size");
            pipelines.push((up_to, ctx.kernels().pipeline(kernel, &overrides).await?));
        }
        let packed_w = precision.encode(label, &[packed_w.len()], &packed_w)?;
        let packed_b = precision.encode(label, &[packed_b.len()], &packed_b)?;
        let device = ctx.device();
        let (params, table, weights, bias) = scoped_async(device, "creating a projection", || {
            (
                buffer(
                    device,
                    label,
                    PARAMS_BYTES,
                    wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
                ),
                device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                    label: Some(label),
                    contents: &table,
                    usage: wgpu::BufferUsages::COPY_SRC,
                }),
                init_bytes(device, label, &packed_w),
                init_bytes(device, label, &packed_b),
            )
        })
        .await?;
        Ok(Projection {
            pipelines,
            params,
            table,
            grids,
            weights,
            bias,
        })
    }

    /// The bind group on input `a`, output `c` and, for the K/V variant, the cache's row
    /// lengths. Every pipeline of the projection is of one kernel, so one layout serves all.
    pub fn bind(
        &self,
        device: &wgpu::Device,
        a: &wgpu::Buffer,
        c: &wgpu::Buffer,
        row_lengths: Option<&wgpu::Buffer>,
    ) -> wgpu::BindGroup {
        let resources = [&self.params, a, &self.weights, &self.bias, c]
            .into_iter()
            .chain(row_lengths)
            .map(|b| b.as_entire_binding());
        self.pipelines[0]
            .1
            .bind_group(device, "cached layer projection", resources)
    }

    /// Records the copy of a step of `n` tokens' parameters (before the pass that dispatches).
    pub fn set_step(&self, encoder: &mut wgpu::CommandEncoder, n: usize) {
        let at = (n as u64 - 1) * PARAMS_BYTES;
        encoder.copy_buffer_to_buffer(&self.table, at, &self.params, 0, PARAMS_BYTES);
    }

    /// Records the dispatch of a step of `n` tokens into `pass`.
    pub fn dispatch(
        &self,
        pass: &mut wgpu::ComputePass<'_>,
        group: &wgpu::BindGroup,
        chunks: &ChunkTable,
        n: usize,
    ) {
        let (_, pipeline) = self
            .pipelines
            .iter()
            .find(|(up_to, _)| n <= *up_to)
            .unwrap_or_else(|| self.pipelines.last().expect("a projection has a pipeline"));
        pass.set_pipeline(&pipeline.pipeline);
        pass.set_bind_group(0, group, &[]);
        pass.set_bind_group(1, &chunks.group, &[0]);
        let [x, y, z] = self.grids[n - 1];
        pass.dispatch_workgroups(x, y, z);
    }

    /// Every buffer the projection owns.
    pub fn buffers(&self) -> [&wgpu::Buffer; 4] {
        [&self.params, &self.table, &self.weights, &self.bias]
    }
}

/// `w` `[k, cols]` with each group of `group` columns padded with zeros to `pad4(group)`
/// (vec4 loads; the stores drop the padding), and the bias likewise (zeros without one).
fn pack(w: &Tensor, b: Option<&Tensor>, group: usize) -> (Vec<f32>, Vec<f32>) {
    let (k, cols) = (w.shape()[0], w.shape()[1]);
    let padded = pad4(group as u32) as usize;
    let width = cols / group * padded;
    let at = |c: usize| c / group * padded + c % group;
    let mut out = vec![0f32; k * width];
    for r in 0..k {
        for c in 0..cols {
            out[r * width + at(c)] = w.data()[r * cols + c];
        }
    }
    let mut bias = vec![0f32; width];
    if let Some(b) = b {
        for (c, &v) in b.data().iter().enumerate() {
            bias[at(c)] = v;
        }
    }
    (out, bias)
}

/// A storage buffer for `elements` in `precision`, rounded up to 16 bytes (read as vec4).
pub(super) fn scratch(
    device: &wgpu::Device,
    label: &str,
    elements: usize,
    precision: Precision,
) -> wgpu::Buffer {
    buffer(
        device,
        label,
        (elements as u64 * precision.bytes()).next_multiple_of(16),
        STORAGE,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_pads_each_group_to_whole_vec4() {
        // Two heads of 3 columns over 2 rows: each head padded to 4 with a zero column.
        let w = Tensor::new([2, 6], (1..=12).map(|v| v as f32).collect()).unwrap();
        let b = Tensor::new([6], vec![0.5, 1.5, 2.5, 3.5, 4.5, 5.5]).unwrap();
        let (w, b) = pack(&w, Some(&b), 3);
        assert_eq!(
            w,
            [
                1., 2., 3., 0., 4., 5., 6., 0., 7., 8., 9., 0., 10., 11., 12., 0.
            ]
        );
        assert_eq!(b, [0.5, 1.5, 2.5, 0., 3.5, 4.5, 5.5, 0.]);
    }
}
