//! The table of lengths the attention core's calls pick by dynamic offset.

use crate::gpu::init_uniform;
use crate::kernels::fused::Len;

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
    pub fn new(device: &wgpu::Device, lo: u32, hi: u32) -> Self {
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
