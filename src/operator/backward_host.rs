//! The operator's backward on host tensors: the forward saving its logsumexp, and the backward
//! run in bounded submissions with its inputs uploaded through the operator's own buffers
//! (the convenience for tests and tools; applications record `encode_backward`).

use crate::error::{Error, Result, Shape};
use crate::gpu::{map_and_read, scoped};
use crate::kernels::fold_grid;
use crate::tensor::{Tensor, unravel};

use super::AttentionOp;
use super::backward::{BackwardIo, OperatorGrads, backward_flops, make_groups};
use super::grad_kernels::GradStage as Stage;
use super::inputs::OperatorInputs;

impl AttentionOp {
    /// [`AttentionOp::run`] for an operator built with gradients: the output and the
    /// logsumexp its forward saved (`[batch, heads, q_len]`, see the module documentation).
    pub fn run_saving_lse(&mut self, inputs: &OperatorInputs) -> Result<(Tensor, Tensor)> {
        self.backward_part()?;
        let out = self.run(inputs)?;
        let _device = self.ctx.kernels().exclusive();
        let lengths = inputs.validate(&self.config)?;
        let shape = [self.config.batch, self.config.heads, lengths.q_len];
        let bytes = (shape.iter().product::<usize>() * 4) as u64;
        let bw = self.backward_part()?;
        let device = self.ctx.device();
        scoped(device, "reading the saved logsumexp", || {
            let mut encoder = device.create_command_encoder(&Default::default());
            encoder.copy_buffer_to_buffer(&bw.own.lse, 0, &bw.own.lse_staging, 0, bytes);
            self.ctx.queue().submit([encoder.finish()]);
        })?;
        let data = map_and_read(device, &bw.own.lse_staging, |b| {
            bytemuck::cast_slice::<u8, f32>(&b[..bytes as usize]).to_vec()
        })?;
        Ok((out, Tensor::new(shape, data)?))
    }

    /// The forward and then the backward, for tests and tools: the output and the gradients
    /// of Q, K and V for `grad_out = ∂L/∂out`, the backward reading the logsumexp the forward
    /// saved.
    pub fn run_with_grad(
        &mut self,
        inputs: &OperatorInputs,
        grad_out: &Tensor,
    ) -> Result<(Tensor, OperatorGrads)> {
        let (out, lse) = self.run_saving_lse(inputs)?;
        let grads = self.run_backward(inputs, &out, &lse, grad_out)?;
        Ok((out, grads))
    }

    /// Uploads the forward's `inputs`, its output `out` and saved logsumexp `lse`
    /// (`[batch, heads, q_len]`, see the module documentation) and `grad_out = ∂L/∂out`, runs
    /// the backward and reads dQ, dK and dV back, blocking until the GPU is done. For tests
    /// and tools; an application records [`AttentionOp::encode_backward`] on its own buffers.
    /// A large call runs as several submissions of bounded work, like [`AttentionOp::run`].
    pub fn run_backward(
        &mut self,
        inputs: &OperatorInputs,
        out: &Tensor,
        lse: &Tensor,
        grad_out: &Tensor,
    ) -> Result<OperatorGrads> {
        let budget = self.ctx.kernels().submission_budget();
        self.run_backward_within(inputs, out, lse, grad_out, budget)
    }

    /// [`AttentionOp::run_backward`] with submissions of at most about `budget` FLOPs each;
    /// for tests of the split.
    #[doc(hidden)]
    pub fn run_backward_within(
        &mut self,
        inputs: &OperatorInputs,
        out: &Tensor,
        lse: &Tensor,
        grad_out: &Tensor,
        budget: f64,
    ) -> Result<OperatorGrads> {
        let ctx = self.ctx.clone();
        let _device = ctx.kernels().exclusive();
        self.backward_part()?;
        let start = std::time::Instant::now();
        let lengths = inputs.validate(&self.config)?;
        let out_shape = self.config.output_shape(lengths.q_len);
        let lse_shape = [self.config.batch, self.config.heads, lengths.q_len];
        for (name, t, shape) in [
            ("out", out, out_shape.as_slice()),
            ("grad_out", grad_out, out_shape.as_slice()),
        ] {
            if t.shape() != shape {
                return Err(Error::shape(name, shape, t.shape()));
            }
            t.check_finite(name)?;
        }
        if lse.shape() != lse_shape {
            return Err(Error::shape("lse", &lse_shape, lse.shape()));
        }
        if self
            .backward
            .as_ref()
            .is_some_and(|b| b.own_bindings.is_none())
        {
            let bw = self.backward_part()?;
            let own = &self.own;
            let bindings = make_groups(
                self.ctx.device(),
                self.id,
                self.fused_core()?,
                bw,
                BackwardIo {
                    q: &own.q,
                    k: &own.k,
                    v: &own.v,
                    key_mask: self.config.key_padding_mask.then_some(&own.key_mask),
                    bias: self.config.bias.is_some().then_some(&own.bias),
                    out: &own.out,
                    lse: &bw.own.lse,
                    grad_out: &bw.own.grad_out,
                    grad_q: &bw.own.grad_q,
                    grad_k: &bw.own.grad_k,
                    grad_v: &bw.own.grad_v,
                },
            )?;
            if let Some(b) = self.backward.as_mut() {
                b.own_bindings = Some(bindings);
            }
        }
        let flops = backward_flops(&self.config, lengths);
        let (device, queue) = (ctx.device().clone(), ctx.queue().clone());
        // Each stage cut into chunks of about `budget` FLOPs, one submission each.
        let mut steps = Vec::new();
        for stage in [Stage::Prep, Stage::Kv, Stage::Q] {
            let bw = self.backward_part()?;
            let n = bw.workgroups(&self.config, lengths, stage);
            let share = match stage {
                Stage::Prep => 0.0,
                Stage::Kv => flops * 0.6,
                Stage::Q => flops * 0.4,
            };
            let wanted = (share / budget)
                .ceil()
                .clamp(1.0, crate::kernels::MAX_CHUNKS as f64) as u32;
            let grid = fold_grid(
                n.div_ceil(wanted),
                self.max_per_dim,
                "a chunk of the attention backward",
            )?;
            let per_chunk = grid.iter().product::<u32>();
            for c in 0..n.div_ceil(per_chunk).max(1) {
                steps.push((stage, grid, c..c + 1));
            }
        }
        // Each gradient is laid out like its tensor: K and V (and so dK and dV) in blocks of
        // `rows` token rows when the operator has a KV cache's capacity, packed otherwise.
        let kv_axis = match self.config.layout {
            super::QkvLayout::HeadMajor => 2,
            super::QkvLayout::TokenMajor => 1,
        };
        let rows = self.config.kv_capacity.unwrap_or(lengths.kv_len);
        // Bytes of a gradient up to the end of its last block's rows for this call.
        let span = |t: &Tensor, rows: usize| -> u64 {
            let (n, width) = (t.shape()[kv_axis], t.shape().last().copied().unwrap_or(0));
            let blocks = t.len() / (n * width).max(1);
            (blocks.saturating_sub(1) * rows + n) as u64 * width as u64 * 4
        };
        let sizes = [
            inputs.q.len() as u64 * 4,
            span(&inputs.k, rows),
            span(&inputs.v, rows),
        ];
        for (n, step) in steps.iter().enumerate() {
            let (first, last) = (n == 0, n + 1 == steps.len());
            let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("attention backward"),
            });
            scoped(&device, "running the attention backward", || {
                if first {
                    self.upload(&mut encoder, inputs);
                    self.upload_backward(&mut encoder, out, lse, grad_out);
                }
                if let Some(bw) = self.backward.as_ref()
                    && let Some(bindings) = &bw.own_bindings
                {
                    self.record_backward(
                        &mut encoder,
                        bindings,
                        lengths,
                        first,
                        std::slice::from_ref(step),
                    );
                    if last {
                        let mut at = 0;
                        for (src, size) in [&bw.own.grad_q, &bw.own.grad_k, &bw.own.grad_v]
                            .into_iter()
                            .zip(sizes)
                        {
                            encoder.copy_buffer_to_buffer(src, 0, &bw.own.staging, at, size);
                            at += size.next_multiple_of(16);
                        }
                    }
                }
                queue.submit([encoder.finish()]);
                if first {
                    self.own.belt.recall();
                    if let Some(bw) = self.backward.as_mut() {
                        bw.own.belt.recall();
                    }
                }
            })?;
            if !last {
                device.poll(wgpu::PollType::wait_indefinitely())?;
            }
        }
        let bw = self.backward_part()?;
        let data = map_and_read(&device, &bw.own.staging, |bytes| {
            let mut at = 0usize;
            sizes.map(|size| {
                let v = bytemuck::cast_slice::<u8, f32>(&bytes[at..at + size as usize]).to_vec();
                at += (size as usize).next_multiple_of(16);
                v
            })
        })?;
        ctx.kernels().measured(flops, start.elapsed().as_secs_f64());
        let [dq, dk, dv] = data;
        let unpack = |t: &Tensor, d: Vec<f32>| -> Vec<f32> {
            let (kv, width) = (t.shape()[kv_axis], t.shape().last().copied().unwrap_or(0));
            if rows == kv {
                return d;
            }
            let block = kv * width;
            (0..t.len() / block.max(1))
                .flat_map(|n| d[n * rows * width..][..block].iter().copied())
                .collect()
        };
        let (dk, dv) = (unpack(&inputs.k, dk), unpack(&inputs.v, dv));
        let checked = |name: &str, t: &Tensor, d: Vec<f32>| -> Result<Tensor> {
            if let Some(at) = d.iter().position(|x| !x.is_finite()) {
                return Err(Error::NonFiniteOutput {
                    index: Shape(unravel(t.shape(), at)),
                    value: d[at],
                    hint: format!(
                        "in {name}: a score, bias or product passed f32's range (3.4e38): \
                         scale the inputs down"
                    ),
                });
            }
            Tensor::new(t.shape().to_vec(), d)
        };
        Ok(OperatorGrads {
            q: checked("grad_q", &inputs.q, dq)?,
            k: checked("grad_k", &inputs.k, dk)?,
            v: checked("grad_v", &inputs.v, dv)?,
        })
    }

    /// Records the upload of O, lse and dO into the operator's own buffers through the
    /// backward's staging belt; the caller recalls the belt after submitting.
    fn upload_backward(
        &mut self,
        encoder: &mut wgpu::CommandEncoder,
        out: &Tensor,
        lse: &Tensor,
        grad_out: &Tensor,
    ) {
        let Some(bw) = self.backward.as_mut() else {
            return;
        };
        for (target, data) in [
            (&self.own.out, out.data()),
            (&bw.own.lse, lse.data()),
            (&bw.own.grad_out, grad_out.data()),
        ] {
            let bytes: &[u8] = bytemuck::cast_slice(data);
            if let Some(size) = wgpu::BufferSize::new(bytes.len() as u64) {
                bw.own
                    .belt
                    .write_buffer(encoder, target, 0, size)
                    .copy_from_slice(bytes);
            }
        }
        bw.own.belt.finish();
    }
}
