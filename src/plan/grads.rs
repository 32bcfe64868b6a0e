//! The layer backward on host tensors ([`AttentionPlan::run_with_grad`]) and the packed
//! gradients in the weights' own shapes ([`AttentionPlan::unpack_grads`]); the backward's
//! steps are in `backward.rs`.

use super::AttentionPlan;
use super::backward::{LayerBackwardIo, grad_lens, make_groups};
use crate::error::{Error, Result, Shape};
use crate::gpu::{map_and_read, scoped};
use crate::reference::LayerGrads;
use crate::tensor::{Tensor, unravel};
use crate::weights::AttentionInputs;

impl AttentionPlan {
    /// The forward and then the backward on host tensors, for tests and tools: the output and
    /// the gradients of x and of every weight and bias the layer has, for
    /// `grad_out = ∂L/∂out`. Blocks until done; the second and later calls create nothing.
    /// Runs as one submission (an application's large layers record
    /// [`AttentionPlan::encode_backward`] into their own encoders).
    ///
    /// ```no_run
    /// use wgpu_attention::{AttentionConfig, AttentionInputs, AttentionPlan, AttentionWeights, GpuContext, Tensor};
    /// let ctx = GpuContext::from_env()?;
    /// let config = AttentionConfig::new(1, 3, 4, 1, 4).with_gradients();
    /// let w = Tensor::new([4, 4], vec![0.5; 16])?;
    /// let weights = AttentionWeights::new(w.clone(), w.clone(), w);
    /// let mut plan = AttentionPlan::new(&ctx, &config, &weights)?;
    /// let x = AttentionInputs::new(Tensor::new([1, 3, 4], vec![1.0; 12])?);
    /// let grad_out = Tensor::new([1, 3, 4], vec![1.0; 12])?;
    /// let (out, grads) = plan.run_with_grad(&x, &grad_out)?;
    /// assert_eq!(grads.w_q.shape(), &[4, 4]);
    /// assert_eq!(grads.x.shape(), out.shape());
    /// # Ok::<(), wgpu_attention::Error>(())
    /// ```
    pub fn run_with_grad(
        &mut self,
        inputs: &AttentionInputs,
        grad_out: &Tensor,
    ) -> Result<(Tensor, LayerGrads)> {
        self.backward_part()?;
        let shape = self.config.output_shape();
        if grad_out.shape() != shape {
            return Err(Error::shape("grad_out", &shape, grad_out.shape()));
        }
        grad_out.check_finite("grad_out")?;
        let out = self.run(inputs)?;
        let ctx = self.ctx.clone();
        let _device = ctx.kernels().exclusive();
        if self
            .backward
            .as_ref()
            .is_some_and(|b| b.own_bindings.is_none())
        {
            let bw = self.backward_part()?;
            let (own, grads) = (&self.own, &bw.own);
            let bindings = make_groups(
                ctx.device(),
                self.id,
                &bw.steps,
                LayerBackwardIo {
                    x: &own.x,
                    key_mask: None,
                    output: &own.output,
                    grad_out: &grads.grad_out,
                    grad_x: &grads.grad_x,
                    grad_w_qkv: &grads.grad_w_qkv,
                    grad_w_o: grads.grad_w_o.as_ref(),
                },
                self.layout.has_mask.then_some(&own.key_mask),
            )?;
            if let Some(b) = self.backward.as_mut() {
                b.own_bindings = Some(bindings);
            }
        }
        let lens = grad_lens(&self.layout, self.bufs.w_o.is_some());
        let (device, queue) = (ctx.device().clone(), ctx.queue().clone());
        scoped(&device, "running the layer backward", || {
            let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("layer backward"),
            });
            let Some(bw) = self.backward.as_mut() else {
                return;
            };
            let bytes: &[u8] = bytemuck::cast_slice(grad_out.data());
            if let Some(size) = wgpu::BufferSize::new(bytes.len() as u64) {
                bw.own
                    .belt
                    .write_buffer(&mut encoder, &bw.own.grad_out, 0, size)
                    .copy_from_slice(bytes);
            }
            bw.own.belt.finish();
            let Some(bw) = self.backward.as_ref() else {
                return;
            };
            if let Some(bindings) = &bw.own_bindings {
                self.record_backward(&mut encoder, bw, bindings);
            }
            let mut at = 0;
            let sources = [Some(&bw.own.grad_x), Some(&bw.own.grad_w_qkv)]
                .into_iter()
                .chain([bw.own.grad_w_o.as_ref()]);
            for (src, n) in sources.zip(lens) {
                if let Some(src) = src {
                    encoder.copy_buffer_to_buffer(src, 0, &bw.own.staging, at, n * 4);
                }
                at += (n * 4).next_multiple_of(16);
            }
            queue.submit([encoder.finish()]);
            if let Some(bw) = self.backward.as_mut() {
                bw.own.belt.recall();
            }
        })?;
        let bw = self.backward_part()?;
        let [dx, dw, dwo] = map_and_read(&device, &bw.own.staging, |bytes| {
            let mut at = 0usize;
            lens.map(|n| {
                let n = n as usize * 4;
                let v = bytemuck::cast_slice::<u8, f32>(&bytes[at..at + n]).to_vec();
                at += n.next_multiple_of(16);
                v
            })
        })?;
        let grads = self.unpack_grads(&dx, &dw, self.bufs.w_o.is_some().then_some(&dwo[..]))?;
        Ok((out, grads))
    }

    /// The gradients in the weights' own shapes, from what [`AttentionPlan::encode_backward`]
    /// wrote into [`LayerBackwardIo::grad_x`], [`LayerBackwardIo::grad_w_qkv`] and
    /// [`LayerBackwardIo::grad_w_o`] (read back as f32). Bias gradients are present where the
    /// plan's weights have biases; a non-finite gradient is an error naming where it is.
    pub fn unpack_grads(
        &self,
        grad_x: &[f32],
        grad_w_qkv: &[f32],
        grad_w_o: Option<&[f32]>,
    ) -> Result<LayerGrads> {
        let l = &self.layout;
        let c = &self.config;
        let lens = grad_lens(l, self.bufs.w_o.is_some());
        let wanted = |name: &'static str, data: &[f32], n: u64| -> Result<()> {
            if (data.len() as u64) < n {
                return Err(Error::shape(name, &[n as usize], &[data.len()]));
            }
            Ok(())
        };
        wanted("grad_x", grad_x, lens[0])?;
        wanted("grad_w_qkv", grad_w_qkv, lens[1])?;
        let checked = |name: &str, shape: Vec<usize>, d: Vec<f32>| -> Result<Tensor> {
            if let Some(at) = d.iter().position(|x| !x.is_finite()) {
                return Err(Error::NonFiniteOutput {
                    index: Shape(unravel(&shape, at)),
                    value: d[at],
                    hint: format!(
                        "in {name}: a product passed f32's range (3.4e38): scale the inputs, \
                         weights or grad_out down"
                    ),
                });
            }
            Tensor::new(shape, d)
        };
        let (dm, h, width) = (c.d_model, c.heads, l.qkv_width() as usize);
        // Section s's columns of the packed rows `rows`: head hd's first `d` of `dpad`.
        let section = |rows: std::ops::Range<usize>, col0: usize, d: usize, dpad: usize| {
            rows.flat_map(move |r| {
                (0..h).flat_map(move |hd| (0..d).map(move |c| r * width + col0 + hd * dpad + c))
            })
            .map(|at| grad_w_qkv[at])
            .collect::<Vec<f32>>()
        };
        let (dp, dvp) = (l.dp as usize, l.dvp as usize);
        let sections = [
            (0, c.head_dim, dp),
            (h * dp, c.head_dim, dp),
            (2 * h * dp, c.head_dim_v, dvp),
        ];
        let names = [
            ("grad_w_q", "grad_b_q"),
            ("grad_w_k", "grad_b_k"),
            ("grad_w_v", "grad_b_v"),
        ];
        let has_bias = self.has_qkv_bias;
        let mut w = Vec::new();
        let mut b = Vec::new();
        for ((col0, d, dpad), (wn, bn)) in sections.into_iter().zip(names) {
            w.push(checked(wn, vec![dm, h * d], section(0..dm, col0, d, dpad))?);
            b.push(if has_bias {
                Some(checked(
                    bn,
                    vec![h * d],
                    section(dm..dm + 1, col0, d, dpad),
                )?)
            } else {
                None
            });
        }
        let (w_o, b_o) = match grad_w_o {
            Some(g) if self.bufs.w_o.is_some() => {
                wanted("grad_w_o", g, lens[2])?;
                let (hv, d_out) = (h * c.head_dim_v, l.d_out as usize);
                let w_o = checked("grad_w_o", vec![hv, d_out], g[..hv * d_out].to_vec())?;
                let b_o = if self.has_b_o {
                    Some(checked(
                        "grad_b_o",
                        vec![d_out],
                        g[hv * d_out..(hv + 1) * d_out].to_vec(),
                    )?)
                } else {
                    None
                };
                (Some(w_o), b_o)
            }
            _ => (None, None),
        };
        let [w_q, w_k, w_v]: [Tensor; 3] = w.try_into().map_err(|_| Error::ForeignBindings)?;
        let [b_q, b_k, b_v]: [Option<Tensor>; 3] =
            b.try_into().map_err(|_| Error::ForeignBindings)?;
        Ok(LayerGrads {
            x: checked(
                "grad_x",
                c.x_shape().to_vec(),
                grad_x[..lens[0] as usize].to_vec(),
            )?,
            w_q,
            w_k,
            w_v,
            b_q,
            b_k,
            b_v,
            w_o,
            b_o,
        })
    }
}
