//! [`CachedAttention::step`]: a step on host data, through the layer's own buffers, converting
//! to and from the layer's storage precision.

use super::CachedAttention;
use crate::error::{Error, Result, Shape};
use crate::gpu::{map_and_read, scoped};
use crate::precision::{Precision, write_f16};
use crate::tensor::{Tensor, unravel};

/// The layer's own input, output and read-back buffers, for [`CachedAttention::step`].
#[derive(Debug)]
pub(super) struct OwnIo {
    pub x: wgpu::Buffer,
    pub output: wgpu::Buffer,
    pub staging: wgpu::Buffer,
    pub belt: wgpu::util::StagingBelt,
}

impl CachedAttention {
    /// Runs one step on host data: `x` `[batch, n, d_model]`, `1 <= n <= max_step`; returns
    /// the step's output ([`super::CachedLayerConfig::output_shape`]). Uploads through a
    /// staging belt made with the layer and reads back through its own buffer: after the first
    /// step this allocates only the returned tensor on the host.
    ///
    /// With f16 storage `x` is rounded to f16 on upload (a value past f16's range is
    /// [`Error::OutsideF16Range`], naming its index, and nothing runs) and the output is
    /// widened back from f16.
    pub fn step(&mut self, x: &Tensor) -> Result<Tensor> {
        let n = self.config.check_input(x)?;
        // Refused before the upload is recorded (encode_step checks the same).
        self.check_step(n)?;
        let ctx = self.ctx.clone();
        let _device = ctx.kernels().exclusive();
        let (device, queue) = (ctx.device(), ctx.queue());
        let p = self.config.precision;
        let shape = self.config.output_shape(n);
        let out_elements = shape.iter().product::<usize>();
        // Copies move whole 4-byte words: an odd count of f16 takes one more half-word.
        let out_bytes = (out_elements as u64 * p.bytes()).next_multiple_of(4);
        let bindings = self
            .own_bindings
            .take()
            .expect("bound when the layer was built");
        let recorded = scoped(device, "running a cached layer step", || {
            let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("cached layer step"),
            });
            let own = &mut self.own;
            let values = x.data();
            let bytes = (values.len() as u64 * p.bytes()).next_multiple_of(4);
            if let Some(size) = wgpu::BufferSize::new(bytes) {
                let mut view = own.belt.write_buffer(&mut encoder, &own.x, 0, size);
                match p {
                    Precision::F32 => view.copy_from_slice(bytemuck::cast_slice(values)),
                    // Converted straight into the mapped memory (no buffer per step), after
                    // check_input found every value within f16's range.
                    Precision::F16 => write_f16(values, |at, bytes| {
                        view.slice(at..at + bytes.len()).copy_from_slice(bytes)
                    }),
                }
            }
            own.belt.finish();
            let recorded = self.encode_step(&mut encoder, &bindings, n);
            encoder.copy_buffer_to_buffer(&self.own.output, 0, &self.own.staging, 0, out_bytes);
            if recorded.is_ok() {
                queue.submit([encoder.finish()]);
            }
            self.own.belt.recall();
            recorded
        });
        self.own_bindings = Some(bindings);
        recorded??;
        let mut data = map_and_read(device, &self.own.staging, |bytes| {
            p.decode(&bytes[..out_bytes as usize])
        })?;
        data.truncate(out_elements);
        if let Some(at) = data.iter().position(|v| !v.is_finite()) {
            return Err(Error::NonFiniteOutput {
                index: Shape(unravel(&shape, at)),
                value: data[at],
                hint: match p {
                    Precision::F32 => {
                        "a product of the inputs and weights passed f32's range (3.4e38): scale \
                         the inputs or weights down"
                    }
                    Precision::F16 => {
                        "with f16 storage, Q, K, V, the heads and the output must stay within \
                         f16's range (65504); the arithmetic is f32. Scale the inputs or \
                         weights down, or use f32 precision"
                    }
                }
                .into(),
            });
        }
        Tensor::new(shape, data)
    }
}
