//! The operator on host tensors, for tests and tools: upload, bounded submissions, read-back
//! and the checks of what comes back. An application records `encode` on its own buffers.

use super::*;

impl AttentionOp {
    /// Uploads `inputs` (in the configuration's layout, lengths read from their shapes), runs
    /// the operator and reads the output back, blocking until the GPU is done. For tests and
    /// tools; an application records [`AttentionOp::encode`] on its own buffers.
    ///
    /// A large call runs as several submissions of about 0.1 s of work each at the rate the
    /// device showed before, each waited for (see `shaders/dispatch.wgsl` for why).
    pub fn run(&mut self, inputs: &OperatorInputs) -> Result<Tensor> {
        let budget = self.ctx.kernels().submission_budget();
        self.run_within(inputs, budget)
    }

    /// [`AttentionOp::run`] with submissions of at most about `budget` FLOPs each; for tests
    /// of the split.
    #[doc(hidden)]
    pub fn run_within(&mut self, inputs: &OperatorInputs, budget: f64) -> Result<Tensor> {
        let ctx = self.ctx.clone();
        let _device = ctx.kernels().exclusive();
        let start = std::time::Instant::now();
        if self.config.row_lengths {
            return Err(Error::InvalidConfig(
                "`run` has no per-row lengths: bind a KvCache with bind_cache and record encode"
                    .into(),
            ));
        }
        let lengths = inputs.validate(&self.config)?;
        let p = self.config.precision;
        if p == Precision::F16 {
            for (name, t) in [("q", &inputs.q), ("k", &inputs.k), ("v", &inputs.v)] {
                crate::precision::check_f16_range(name, t.shape(), t.data())?;
            }
        }
        let out_elements = self
            .config
            .output_shape(lengths.q_len)
            .iter()
            .product::<usize>();
        // Copies move whole 4-byte words: an odd number of f16 outputs takes one more.
        let out_bytes = (out_elements as u64 * p.bytes()).next_multiple_of(4);
        let steps = self.call_steps(lengths);
        let work: Vec<Option<Work>> = steps.iter().map(|s| s.map(|(_, w)| w)).collect();
        let flops: f64 = work.iter().flatten().map(|w| w.flops).sum();
        let subs = submissions(&work, 0..work.len(), budget, self.max_per_dim)?;
        let (device, queue) = (self.ctx.device().clone(), self.ctx.queue().clone());
        // Split-K decode reads K and V once and is short: one submission.
        let decode = self.uses_decode(lengths.q_len);
        let (q_len, kv_len) = (lengths.q_len as u32, lengths.kv_len as u32);
        let last_sub = if decode { 0 } else { subs.len() - 1 };
        for (n, pieces) in subs.iter().enumerate().take(last_sub + 1) {
            let last = n == last_sub;
            scoped(&device, "running the attention operator", || {
                let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("attention operator"),
                });
                if n == 0 {
                    self.upload(&mut encoder, inputs);
                }
                if decode && let (Some(d), Some(groups)) = (&self.decode, &self.own_bindings.decode)
                {
                    d.record(&mut encoder, groups, self.tables(), (q_len, kv_len), None)?;
                } else {
                    self.record(
                        &mut encoder,
                        &self.own_bindings.groups,
                        lengths,
                        &steps,
                        pieces,
                        None,
                    );
                }
                if last {
                    encoder.copy_buffer_to_buffer(
                        &self.own.out,
                        0,
                        &self.own.staging,
                        0,
                        out_bytes,
                    );
                }
                queue.submit([encoder.finish()]);
                if n == 0 {
                    self.own.belt.recall();
                }
                Ok::<(), Error>(())
            })??;
            if !last {
                device.poll(wgpu::PollType::wait_indefinitely())?;
            }
        }
        self.last = Some(lengths);
        let mut data = map_and_read(&device, &self.own.staging, |bytes| {
            p.decode(&bytes[..out_bytes as usize])
        })?;
        data.truncate(out_elements);
        self.ctx
            .kernels()
            .measured(flops, start.elapsed().as_secs_f64());
        let shape = self.config.output_shape(lengths.q_len);
        if let Some(at) = data.iter().position(|v| !v.is_finite()) {
            return Err(Error::NonFiniteOutput {
                index: Shape(unravel(&shape, at)),
                value: data[at],
                hint: match p {
                    Precision::F32 => {
                        "a score, bias or product passed f32's range (3.4e38): scale the \
                         inputs down"
                    }
                    Precision::F16 => {
                        "the output passed f16's range (65504; scores and sums are f32): \
                         scale V down, or use f32 precision"
                    }
                }
                .into(),
            });
        }
        Tensor::new(shape, data)
    }

    /// The probabilities of the last [`AttentionOp::run`], `[batch, heads, q_len, kv_len]`:
    /// each query's softmax over the keys, 0 where a key is masked and a row of zeros where
    /// none is left (as [`crate::reference::operator_probs`]). Needs
    /// [`OperatorConfig::with_intermediates`], which runs the staged kernels. Allocates a
    /// read-back buffer: for tests and teaching, not hot loops.
    pub fn read_probabilities(&self) -> Result<Tensor> {
        let Path::Staged(core) = &self.path else {
            return Err(Error::InvalidConfig(
                "the fused kernel stores no probabilities: build the operator with \
                 OperatorConfig::with_intermediates()"
                    .into(),
            ));
        };
        if !self.config.keep_intermediates {
            return Err(Error::InvalidConfig(
                "probabilities were not kept: build the operator with \
                 OperatorConfig::with_intermediates()"
                    .into(),
            ));
        }
        let Some(lengths) = self.last else {
            return Err(Error::InvalidConfig(
                "no call has run yet: read the probabilities after AttentionOp::run".into(),
            ));
        };
        let _device = self.ctx.kernels().exclusive();
        let all = read_f32(self.ctx.device(), self.ctx.queue(), &core.probs)?;
        let (q_len, kv_len) = (lengths.q_len, lengths.kv_len);
        let kvp = pad4(kv_len as u32) as usize;
        let rows = self.config.batch * self.config.heads * q_len;
        let data = all
            .chunks_exact(kvp)
            .take(rows)
            .flat_map(|row| &row[..kv_len])
            .copied()
            .collect();
        Tensor::new([self.config.batch, self.config.heads, q_len, kv_len], data)
    }

    /// Records the upload of `inputs` (checked) into the operator's own buffers through its
    /// staging belt; the caller recalls the belt after submitting.
    pub(super) fn upload(&mut self, encoder: &mut wgpu::CommandEncoder, inputs: &OperatorInputs) {
        let mask_words: Option<Vec<u32>> = inputs
            .key_mask
            .as_ref()
            .map(|m| m.data().iter().map(|&x| (x != 0.0) as u32).collect());
        let p = self.config.precision;
        // K and V in blocks of kv_len token rows (a head, head-major; a batch row,
        // token-major), packed, or with a capacity each at its place in the cache.
        let kv = inputs.k.shape()[if self.config.layout == QkvLayout::HeadMajor {
            2
        } else {
            1
        }];
        let rows = self.config.kv_capacity.unwrap_or(kv);
        // Q, K and V as stored: f32 as they are; f16 as whole images of the buffers (an f16
        // block need not fill whole 4-byte words, the unit of a copy), K and V at their places.
        let image = |t: &Tensor, placed: bool| -> Vec<u8> {
            let width = t.shape().last().copied().unwrap_or(0);
            let (block, stride) = if placed {
                ((kv * width).max(1), rows * width)
            } else {
                (t.data().len().max(1), t.data().len().max(1))
            };
            let blocks = t.data().len().div_ceil(block);
            let mut out = vec![0u8; (blocks * stride * 2).next_multiple_of(4)];
            for (n, src) in t.data().chunks(block).enumerate() {
                for (i, &x) in src.iter().enumerate() {
                    let at = 2 * (n * stride + i);
                    out[at..at + 2].copy_from_slice(&half::f16::from_f32(x).to_le_bytes());
                }
            }
            out
        };
        let halves = (p == Precision::F16).then(|| {
            [
                image(&inputs.q, false),
                image(&inputs.k, true),
                image(&inputs.v, true),
            ]
        });
        let own = &mut self.own;
        let q: &[u8] = match &halves {
            Some([q, _, _]) => q,
            None => bytemuck::cast_slice(inputs.q.data()),
        };
        let mut uploads: Vec<(&wgpu::Buffer, u64, Option<&[u8]>)> = vec![
            (&own.q, 0, Some(q)),
            (
                &own.key_mask,
                0,
                mask_words.as_deref().map(bytemuck::cast_slice),
            ),
            (
                &own.bias,
                0,
                inputs.bias.as_ref().map(|b| bytemuck::cast_slice(b.data())),
            ),
        ];
        match &halves {
            Some([_, k, v]) => {
                uploads.push((&own.k, 0, Some(k)));
                uploads.push((&own.v, 0, Some(v)));
            }
            None => {
                for (target, t) in [(&own.k, &inputs.k), (&own.v, &inputs.v)] {
                    let width = t.shape().last().copied().unwrap_or(0);
                    let block = kv * width;
                    for (n, src) in t.data().chunks_exact(block.max(1)).enumerate() {
                        let at = (n * rows * width * 4) as u64;
                        uploads.push((target, at, Some(bytemuck::cast_slice(src))));
                    }
                }
            }
        }
        for (target, at, bytes) in uploads {
            if let Some(bytes) = bytes
                && let Some(size) = wgpu::BufferSize::new(bytes.len() as u64)
            {
                own.belt
                    .write_buffer(encoder, target, at, size)
                    .copy_from_slice(bytes);
            }
        }
        own.belt.finish();
    }
}
