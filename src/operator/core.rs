//! The attention core shared by the operator and the layer: the fused kernel's pipeline, its
//! uniform parameters and the table of lengths that calls select by dynamic offset.

use crate::context::GpuContext;
use crate::error::Result;
use crate::gpu::{init_uniform, scoped_async};
use crate::kernels::fused::{FusedGeometry, FusedTiles, Len};
use crate::kernels::{Kernel, Pipeline};

/// Uniform entries holding every length from `lo` to `hi`, one per `stride` bytes, so that a
/// call picks its length with a dynamic offset: nothing is written or allocated per call, and
/// several calls of different lengths recorded into one encoder each see their own.
#[derive(Debug)]
pub(crate) struct LengthTable {
    pub buffer: wgpu::Buffer,
    lo: u32,
    stride: u32,
}

impl LengthTable {
    fn new(device: &wgpu::Device, lo: u32, hi: u32) -> Self {
        let stride = device
            .limits()
            .min_uniform_buffer_offset_alignment
            .max(size_of::<Len>() as u32);
        let mut bytes = vec![0u8; ((hi - lo + 1) * stride) as usize];
        for n in lo..=hi {
            let at = ((n - lo) * stride) as usize;
            bytes[at..at + size_of::<Len>()].copy_from_slice(bytemuck::bytes_of(&Len::new(n)));
        }
        LengthTable {
            buffer: init_uniform(device, "attention lengths", &bytes),
            lo,
            stride,
        }
    }

    /// The dynamic offset of length `n` (which the caller checked to lie in the table).
    pub fn offset(&self, n: u32) -> u32 {
        (n - self.lo) * self.stride
    }

    /// The binding of one entry, at the dynamic offset given when recording.
    pub fn binding(&self) -> wgpu::BindingResource<'_> {
        wgpu::BindingResource::Buffer(wgpu::BufferBinding {
            buffer: &self.buffer,
            offset: 0,
            size: wgpu::BufferSize::new(size_of::<Len>() as u64),
        })
    }
}

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
        let limits = ctx.limits();
        let tiles = geometry.tiles(max_q, max_kv, &limits)?;
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
