//! The attention core shared by the operator and the layer: the fused kernel's pipeline, its
//! uniform parameters and the table of lengths that calls select by dynamic offset.

use crate::context::GpuContext;
use crate::error::Result;
use crate::gpu::{init_uniform, scoped_async};
use crate::kernels::fused::{FusedGeometry, FusedTiles};
use crate::kernels::{Kernel, Pipeline};

pub(crate) use super::lengths::LengthTable;

/// The fused kernel set up for one attention geometry and a range of lengths.
#[derive(Debug)]
pub(crate) struct Core {
    pub geometry: FusedGeometry,
    pub tiles: FusedTiles,
    pub pipeline: Pipeline,
    pub params: wgpu::Buffer,
    pub lengths: LengthTable,
}

impl Core {
    /// Compiles (or reuses) the pipeline for calls of `min_len ..= max_q` queries and up to
    /// `max_kv` keys, and makes the parameters and the length table.
    pub async fn new(
        ctx: &GpuContext,
        geometry: FusedGeometry,
        min_len: u32,
        max_q: u32,
        max_kv: u32,
    ) -> Result<Self> {
        let tiles = super::tune::tiles(ctx, &geometry, max_q, max_kv).await?;
        let pipeline = ctx
            .kernels()
            .pipeline(Kernel::Fused(geometry.io()), &tiles.overrides())
            .await?;
        let device = ctx.device();
        let (params, lengths) = scoped_async(device, "creating the attention parameters", || {
            (
                init_uniform(
                    device,
                    "fused attention",
                    bytemuck::bytes_of(&geometry.params()),
                ),
                LengthTable::new(device, min_len, max_q.max(max_kv)),
            )
        })
        .await?;
        Ok(Core {
            geometry,
            tiles,
            pipeline,
            params,
            lengths,
        })
    }

    /// The dynamic offsets of a call: q_len's entry, then kv_len's.
    pub fn offsets(&self, q_len: u32, kv_len: u32) -> [u32; 2] {
        [self.lengths.offset(q_len), self.lengths.offset(kv_len)]
    }

    /// Workgroups of a call with `q_len` queries.
    pub fn workgroups(&self, q_len: u32) -> u32 {
        self.geometry.workgroups(&self.tiles, q_len)
    }
}
