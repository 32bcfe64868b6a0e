//! The operator's split-K decode path: the split and combine pipelines, their parameters and
//! the partials buffer between them, made once with the operator.

use super::core::LengthTable;
use crate::context::GpuContext;
use crate::error::{Error, Result};
use crate::gpu::{STORAGE, buffer, init_uniform, scoped_async};
use crate::kernels::decode::{DecodeGeometry, DecodeTiles, RowLengths, auto_splits, parallelism};
use crate::kernels::{ChunkTable, Kernel, Pipeline, fold_grid};

/// Split-K decode for one geometry.
#[derive(Debug)]
pub(crate) struct DecodeCore {
    pub geometry: DecodeGeometry,
    pub tiles: DecodeTiles,
    split: Pipeline,
    combine: Pipeline,
    params: wgpu::Buffer,
    combine_params: wgpu::Buffer,
    pub partials: wgpu::Buffer,
    /// A table of row lengths bound where calls have none: never read.
    pub no_rows: wgpu::Buffer,
}

/// What a call's record reads from its operator beside the decode core: the length table the
/// dynamic offsets index, the dispatch-chunk table, and the device's grid limit.
#[derive(Clone, Copy)]
pub(crate) struct Tables<'a> {
    pub lengths: &'a LengthTable,
    pub chunks: &'a ChunkTable,
    pub max_per_dim: u32,
}

impl DecodeCore {
    /// Compiles (or reuses) both kernels for calls of up to `max_q` queries over up to `max_kv`
    /// keys, choosing the splits (`splits`, else the `Auto` rule) and making the partials.
    pub async fn new(
        ctx: &GpuContext,
        config: &super::OperatorConfig,
        max_q: u32,
        max_kv: u32,
    ) -> Result<Self> {
        let limits = ctx.limits();
        let kernel = Kernel::DecodeSplit {
            mask: config.key_padding_mask,
            precision: config.precision,
        };
        kernel.check_storage_buffers(&limits, "; use OperatorPath::Prefill")?;
        let probe = config.decode_geometry(1);
        let tiles = probe.tiles(max_q, &limits)?;
        let splits = match config.splits {
            Some(s) => s as u32,
            None => {
                // Workgroups without splitting, at one query: batch x kv heads x row blocks.
                let unsplit = probe.split_workgroups(&tiles, 1);
                auto_splits(unsplit, max_kv, parallelism(ctx.adapter_info()))
            }
        };
        let geometry = config.decode_geometry(splits);
        let bytes = geometry.partial_elements(max_q) * 4;
        if bytes > limits.max_storage_buffer_binding_size {
            return Err(Error::LimitExceeded {
                limit: "max_storage_buffer_binding_size",
                max: limits.max_storage_buffer_binding_size,
                requested: bytes,
                what: format!("the split-K partials ({splits} splits)"),
                hint: "; choose fewer splits (OperatorConfig::with_splits)".into(),
            });
        }
        let kernels = ctx.kernels();
        let split = kernels.pipeline(kernel, &tiles.overrides()).await?;
        let combine = kernels
            .pipeline(
                Kernel::DecodeCombine(config.precision),
                &[("WG", crate::kernels::decode::COMBINE_WG as f64)],
            )
            .await?;
        let device = ctx.device();
        let (params, combine_params, partials, no_rows) =
            scoped_async(device, "creating the decode buffers", || {
                (
                    init_uniform(
                        device,
                        "decode split",
                        bytemuck::bytes_of(&geometry.params()),
                    ),
                    init_uniform(
                        device,
                        "decode combine",
                        bytemuck::bytes_of(&geometry.combine_params()),
                    ),
                    buffer(device, "decode partials", bytes.max(16), STORAGE),
                    buffer(
                        device,
                        "decode: no row lengths",
                        RowLengths::LAYOUT.size as u64,
                        wgpu::BufferUsages::UNIFORM,
                    ),
                )
            })
            .await?;
        Ok(DecodeCore {
            geometry,
            tiles,
            split,
            combine,
            params,
            combine_params,
            partials,
            no_rows,
        })
    }

    /// The two bind groups of one set of buffers (the mask only where the configuration has
    /// one; the row lengths, a uniform table, where calls have them): the split's and the
    /// combine's.
    pub fn groups(
        &self,
        device: &wgpu::Device,
        lengths: &LengthTable,
        [q, k, v, out]: [&wgpu::Buffer; 4],
        mask: Option<&wgpu::Buffer>,
        row_lengths: Option<&wgpu::Buffer>,
    ) -> [wgpu::BindGroup; 2] {
        // In binding order (Kernel::bindings): 0 params, 1-3 q k v, 4 mask (if any),
        // 5 partials, 6-7 lengths, 8 row lengths.
        let storage: Vec<&wgpu::Buffer> = [&self.params, q, k, v]
            .into_iter()
            .chain(mask)
            .chain([&self.partials])
            .collect();
        let resources = storage
            .iter()
            .map(|b| b.as_entire_binding())
            .chain([lengths.binding(), lengths.binding()])
            .chain([row_lengths.unwrap_or(&self.no_rows).as_entire_binding()]);
        let split = self.split.bind_group(device, "decode split", resources);
        let combine = self.combine.bind_group(
            device,
            "decode combine",
            [&self.combine_params, &self.partials, out]
                .map(|b| b.as_entire_binding())
                .into_iter()
                .chain([lengths.binding()]),
        );
        [split, combine]
    }

    /// Records one call: the split pass, then the combine, in one compute pass (wgpu orders
    /// the combine's reads after the split's writes).
    pub fn record(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        groups: &[wgpu::BindGroup; 2],
        Tables {
            lengths,
            chunks,
            max_per_dim,
        }: Tables<'_>,
        (q_len, kv_len): (u32, u32),
        timestamp_writes: Option<wgpu::ComputePassTimestampWrites<'_>>,
    ) -> Result<()> {
        let split_grid = fold_grid(
            self.geometry.split_workgroups(&self.tiles, q_len),
            max_per_dim,
            "the split-K decode pass",
        )?;
        let combine_grid = fold_grid(
            self.geometry.combine_workgroups(q_len),
            max_per_dim,
            "the split-K combine pass",
        )?;
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("split-K decode"),
            timestamp_writes,
        });
        pass.push_debug_group("split-K decode");
        pass.set_bind_group(1, &chunks.group, &[0]);
        pass.set_pipeline(&self.split.pipeline);
        pass.set_bind_group(
            0,
            &groups[0],
            &[lengths.offset(q_len), lengths.offset(kv_len)],
        );
        let [x, y, z] = split_grid;
        pass.dispatch_workgroups(x, y, z);
        pass.set_pipeline(&self.combine.pipeline);
        pass.set_bind_group(0, &groups[1], &[lengths.offset(q_len)]);
        let [x, y, z] = combine_grid;
        pass.dispatch_workgroups(x, y, z);
        pass.pop_debug_group();
        Ok(())
    }
}
