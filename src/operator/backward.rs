//! The operator's backward pass (FlashAttention-2 style): given dO, O, the row logsumexp the
//! forward saved, and the forward's inputs, dQ, dK and dV, with memory linear in the lengths.
//!
//! Three kernels, recorded into one compute pass:
//! 1. `attention_bwd_prep.wgsl`: `D = rowsum(dO ∘ O)` per query row, written beside the
//!    row's logsumexp into one scratch buffer (`aux`), into which the key mask is also copied:
//!    the gradient kernels then bind one buffer for all three, which keeps the dK/dV kernel at
//!    eight storage buffers (WebGPU's default limit) instead of ten;
//! 2. `attention_bwd_kv.wgsl`: dK and dV, a workgroup per block of keys walking the queries of
//!    every query head of the kv head's group (GQA sums in registers, no atomics);
//! 3. `attention_bwd_q.wgsl`: dQ, a workgroup per block of queries walking the keys (WGSL has
//!    no float atomics, so dQ gets a pass of its own rather than being scattered from 2.).
//!
//! Both gradient kernels recompute `P = exp(scale · q·k + bias - lse)`: nothing of size
//! `q_len × kv_len` is stored. The only memory the backward allocates for a call on an
//! application's buffers is `aux`, `4 (2 batch heads max_q_len + batch max_kv_len)` bytes
//! ([`AttentionOp::backward_scratch_bytes`]); with the application's buffers a backward call
//! binds, [`AttentionOp::backward_memory_bytes`].
//!
//! # The saved logsumexp
//!
//! f32 `[batch, heads, q_len]`: for each query row, the natural log of `Σ_j exp(x_j)` over the
//! keys `j` it attends, `x_j = scale · q·k_j + bias_j` the logits the softmax sees (so
//! `P_j = exp(x_j - lse)`); `-3.402823e38` ([`crate::reference::EMPTY_ROW_LSE`]) for a row that
//! attends no key. [`crate::reference::operator_lse`] computes it in f64.
//!
//! # Use
//!
//! Build the operator from [`OperatorConfig::with_gradients`] (it then always runs the fused
//! kernel, the one whose forward saves the logsumexp). On an application's buffers: bind the
//! forward with [`AttentionOp::bind_with_lse`] and the backward with
//! [`AttentionOp::bind_backward`] once, then record [`AttentionOp::encode`] and
//! [`AttentionOp::encode_backward`] per call. For tests and tools,
//! [`AttentionOp::run_with_grad`] runs both on host tensors.
//!
//! Limits: every storage binding is a buffer of the application's or the backward's scratch,
//! so the dK/dV kernel binds eight (q, k, v, dO, scratch, bias, dK, dV) and the dQ kernel
//! seven; a device with four per shader stage (downlevel) refuses the operator with
//! gradients by name. Head widths up to 256.

use crate::error::{Error, Result, Shape};
use crate::gpu::{STORAGE, buffer, check_storage, map_and_read, scoped, scoped_async};
use crate::kernels::{Pipeline, fold_grid};
use crate::tensor::{Tensor, unravel};

use super::config::OperatorConfig;
use super::core::Core;
use super::grad_kernels::{self, GradKernels, GradStage as Stage};
use super::inputs::OperatorInputs;
use super::{AttentionOp, Lengths};

/// The gradients of a loss with respect to the operator's Q, K and V, each shaped (and laid
/// out) like the tensor it is the gradient of.
#[derive(Debug, Clone, PartialEq)]
pub struct OperatorGrads {
    /// `∂L/∂Q`, shaped like Q.
    pub q: Tensor,
    /// `∂L/∂K`, shaped like K (summed over each group's query heads under GQA).
    pub k: Tensor,
    /// `∂L/∂V`, shaped like V (summed over each group's query heads under GQA).
    pub v: Tensor,
}

/// The application's buffers for one backward call of an [`AttentionOp`] built with
/// [`OperatorConfig::with_gradients`]: the forward's inputs and output, the logsumexp it
/// saved, the gradient of the output, and where the three gradients go. Each needs `STORAGE`
/// usage and room for the operator's maximum lengths; Q, K, V, O and dO are read as vec4, so
/// their sizes must be multiples of 16 bytes. Each gradient is laid out like its tensor (dK
/// and dV like K and V, a KV cache's capacity included).
#[derive(Debug, Clone, Copy)]
pub struct BackwardIo<'a> {
    /// Queries, f32.
    pub q: &'a wgpu::Buffer,
    /// Keys, f32.
    pub k: &'a wgpu::Buffer,
    /// Values, f32.
    pub v: &'a wgpu::Buffer,
    /// Key-padding mask, u32 `[batch, kv_len]`, exactly when the configuration has one; it is
    /// copied into the backward's scratch buffer, so it also needs `COPY_SRC` usage.
    pub key_mask: Option<&'a wgpu::Buffer>,
    /// Additive bias, f32, exactly when the configuration has one.
    pub bias: Option<&'a wgpu::Buffer>,
    /// The forward's output O, f32.
    pub out: &'a wgpu::Buffer,
    /// The row logsumexps the forward saved, f32 `[batch, heads, q_len]`.
    pub lse: &'a wgpu::Buffer,
    /// `∂L/∂O`, f32, laid out as the output.
    pub grad_out: &'a wgpu::Buffer,
    /// Where `∂L/∂Q` goes, f32, laid out as Q.
    pub grad_q: &'a wgpu::Buffer,
    /// Where `∂L/∂K` goes, f32, laid out as K.
    pub grad_k: &'a wgpu::Buffer,
    /// Where `∂L/∂V` goes, f32, laid out as V.
    pub grad_v: &'a wgpu::Buffer,
}

/// Bind groups tying an [`AttentionOp`]'s backward to one set of application buffers; made
/// once by [`AttentionOp::bind_backward`], reused by every [`AttentionOp::encode_backward`].
#[derive(Debug)]
pub struct BackwardBindings {
    op: u64,
    prep: wgpu::BindGroup,
    kv: wgpu::BindGroup,
    q: wgpu::BindGroup,
    key_mask: Option<wgpu::Buffer>,
}

/// The buffers [`AttentionOp::run_backward`] uploads to and reads back from (Q, K, V, the
/// mask, the bias and O use the operator's own forward buffers).
#[derive(Debug)]
struct OwnGrads {
    lse: wgpu::Buffer,
    lse_staging: wgpu::Buffer,
    grad_out: wgpu::Buffer,
    grad_q: wgpu::Buffer,
    grad_k: wgpu::Buffer,
    grad_v: wgpu::Buffer,
    staging: wgpu::Buffer,
    belt: wgpu::util::StagingBelt,
}

/// The backward's pipelines, tiles and scratch, made with the operator.
#[derive(Debug)]
pub(crate) struct Backward {
    kernels: GradKernels,
    /// lse and D per query row, then the key mask: see `shaders/attention_bwd.wgsl`.
    aux: wgpu::Buffer,
    /// Four bytes bound as the bias where there is none: the kernels never read it.
    absent: wgpu::Buffer,
    own: OwnGrads,
    own_bindings: Option<BackwardBindings>,
}

impl Backward {
    /// Compiles (or reuses) the three kernels and makes the scratch buffer and the buffers of
    /// `run_backward`.
    pub async fn new(ctx: &crate::GpuContext, config: &OperatorConfig) -> Result<Self> {
        let kernels = GradKernels::new(
            ctx,
            config.head_dim as u32,
            config.head_dim_v as u32,
            config.key_padding_mask,
            config.bias.is_some(),
        )
        .await?;
        let device = ctx.device();
        let [q_n, k_n, v_n, out_n, _, _] = config.max_elements();
        let rows = (config.batch * config.heads * config.max_q_len) as u64;
        let bytes = |n: u64| (n * 4).next_multiple_of(16);
        let (aux, absent, own) = scoped_async(device, "creating the backward's buffers", || {
            let aux = buffer(device, "backward scratch", scratch_bytes(config), STORAGE);
            let absent = buffer(device, "absent bias", 4, STORAGE);
            let staging = bytes(q_n.1) + bytes(k_n.1) + bytes(v_n.1);
            let upload = bytes(rows) + bytes(out_n.1);
            let own = OwnGrads {
                lse: buffer(device, "lse", bytes(rows), STORAGE),
                lse_staging: buffer(
                    device,
                    "lse read-back",
                    bytes(rows),
                    wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                ),
                grad_out: buffer(device, "grad_out", bytes(out_n.1), STORAGE),
                grad_q: buffer(device, "grad_q", bytes(q_n.1), STORAGE),
                grad_k: buffer(device, "grad_k", bytes(k_n.1), STORAGE),
                grad_v: buffer(device, "grad_v", bytes(v_n.1), STORAGE),
                staging: buffer(
                    device,
                    "backward read-back",
                    staging,
                    wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                ),
                belt: wgpu::util::StagingBelt::new(device.clone(), upload.next_multiple_of(256)),
            };
            (aux, absent, own)
        })
        .await?;
        Ok(Backward {
            kernels,
            aux,
            absent,
            own,
            own_bindings: None,
        })
    }

    /// The buffer the operator's own forward ([`AttentionOp::run`]) saves the logsumexp to.
    pub fn own_lse(&self) -> &wgpu::Buffer {
        &self.own.lse
    }

    /// Workgroups of each stage for a call.
    fn workgroups(&self, config: &OperatorConfig, lengths: Lengths, stage: Stage) -> u32 {
        let heads = [config.batch, config.heads, config.kv_heads].map(|n| n as u32);
        let (nq, nk) = (lengths.q_len as u32, lengths.kv_len as u32);
        self.kernels.workgroups(heads, nq, nk, stage)
    }

    fn pipeline(&self, stage: Stage) -> &Pipeline {
        self.kernels.pipeline(stage)
    }
}

/// Bytes of the backward's scratch buffer: lse and D for every query row, then the key mask.
fn scratch_bytes(config: &OperatorConfig) -> u64 {
    let [b, h, q, kv] = [
        config.batch,
        config.heads,
        config.max_q_len,
        config.max_kv_len,
    ]
    .map(|n| n as u64);
    grad_kernels::scratch_bytes(b, h, q, kv)
}

/// The arithmetic of a backward call (see [`grad_kernels::flops`]).
fn backward_flops(config: &OperatorConfig, lengths: Lengths) -> f64 {
    let pairs = (config.batch * config.heads) as f64 * lengths.q_len as f64 * lengths.kv_len as f64;
    grad_kernels::flops(
        pairs,
        config.causal,
        config.head_dim as f64,
        config.head_dim_v as f64,
    )
}

fn make_groups(
    device: &wgpu::Device,
    op: u64,
    core: &Core,
    bw: &Backward,
    io: BackwardIo<'_>,
) -> Result<BackwardBindings> {
    scoped(device, "binding the backward's buffers", || {
        let group = |label: &str, pipeline: &Pipeline, buffers: &[&wgpu::Buffer]| {
            let resources = std::iter::once(&core.params)
                .chain(buffers.iter().copied())
                .map(|b| b.as_entire_binding())
                .chain([core.lengths.binding(), core.lengths.binding()]);
            pipeline.bind_group(device, label, resources)
        };
        let bias = io.bias.unwrap_or(&bw.absent);
        BackwardBindings {
            op,
            prep: group(
                "attention backward: D",
                bw.pipeline(Stage::Prep),
                &[io.out, io.grad_out, io.lse, &bw.aux],
            ),
            kv: group(
                "attention backward: dK, dV",
                bw.pipeline(Stage::Kv),
                &[
                    io.q,
                    io.k,
                    io.v,
                    io.grad_out,
                    &bw.aux,
                    bias,
                    io.grad_k,
                    io.grad_v,
                ],
            ),
            q: group(
                "attention backward: dQ",
                bw.pipeline(Stage::Q),
                &[io.q, io.k, io.v, io.grad_out, &bw.aux, bias, io.grad_q],
            ),
            key_mask: io.key_mask.cloned(),
        }
    })
}

impl AttentionOp {
    /// The fused kernel's core, whose parameters and length table the backward binds (an
    /// operator with gradients always runs the fused kernel: see `choose_kernel`).
    fn fused_core(&self) -> Result<&Core> {
        match &self.path {
            super::Path::Fused(core) => Ok(core),
            super::Path::Staged(_) => Err(Error::InvalidConfig(
                "the attention backward needs the fused kernel's forward".into(),
            )),
        }
    }

    fn backward_part(&self) -> Result<&Backward> {
        self.backward.as_ref().ok_or_else(|| {
            Error::InvalidConfig(
                "the operator was built without gradients: build it from \
                 OperatorConfig::with_gradients() to run its backward"
                    .into(),
            )
        })
    }

    /// Bytes the backward allocates beyond the application's buffers: its scratch of
    /// `4 (2 batch heads max_q_len + batch max_kv_len)` bytes, linear in the lengths (`None`
    /// without gradients).
    pub fn backward_scratch_bytes(&self) -> Option<u64> {
        self.backward.as_ref().map(|b| b.aux.size())
    }

    /// Makes the bind groups that tie this operator's backward to an application's buffers,
    /// checking each (usage, size for the maximum lengths). Call once per set and keep it.
    pub fn bind_backward(&self, io: BackwardIo<'_>) -> Result<BackwardBindings> {
        let _device = self.ctx.kernels().exclusive();
        let bw = self.backward_part()?;
        let [q, k, v, out, mask, bias] = self.config.max_elements();
        let rows = (self.config.batch * self.config.heads * self.config.max_q_len) as u64;
        let max = " (the maximum lengths)";
        for ((name, elements), buffer) in [
            (q, io.q),
            (k, io.k),
            (v, io.v),
            (out, io.out),
            (("grad_out", out.1), io.grad_out),
        ] {
            check_storage(name, buffer, (elements * 4).next_multiple_of(16), max)?;
        }
        for ((name, elements), buffer) in [
            (("lse", rows), io.lse),
            (("grad_q", q.1), io.grad_q),
            (("grad_k", k.1), io.grad_k),
            (("grad_v", v.1), io.grad_v),
        ] {
            check_storage(name, buffer, elements * 4, max)?;
        }
        for ((name, elements), wanted, given) in [
            (mask, self.config.key_padding_mask, io.key_mask),
            (bias, self.config.bias.is_some(), io.bias),
        ] {
            match (wanted, given) {
                (true, Some(b)) => check_storage(name, b, elements * 4, max)?,
                (true, None) => {
                    return Err(Error::BadBuffer {
                        name,
                        problem: "the configuration has one but no buffer was given".into(),
                    });
                }
                (false, Some(_)) => {
                    return Err(Error::BadBuffer {
                        name,
                        problem: "given, but the configuration has none".into(),
                    });
                }
                (false, None) => {}
            }
        }
        if let Some(m) = io.key_mask
            && !m.usage().contains(wgpu::BufferUsages::COPY_SRC)
        {
            return Err(Error::BadBuffer {
                name: "key_mask",
                problem: format!(
                    "the backward copies it, so it needs COPY_SRC usage; has {:?}",
                    m.usage()
                ),
            });
        }
        make_groups(self.ctx.device(), self.id, self.fused_core()?, bw, io)
    }

    /// Records one backward call into `encoder`: the gradients of `lengths.q_len` queries over
    /// `lengths.kv_len` keys, reading and writing the buffers of `bindings`. Allocates, writes
    /// and compiles nothing; calls recorded one after another into one encoder share the
    /// scratch buffer safely (each call's passes follow the previous call's).
    pub fn encode_backward(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        bindings: &BackwardBindings,
        lengths: Lengths,
    ) -> Result<()> {
        let bw = self.backward_part()?;
        if bindings.op != self.id {
            return Err(Error::ForeignBindings);
        }
        self.config.check_lengths(lengths)?;
        let mut grids = Vec::new();
        for stage in [Stage::Prep, Stage::Kv, Stage::Q] {
            let n = bw.workgroups(&self.config, lengths, stage);
            grids.push((
                stage,
                fold_grid(n, self.max_per_dim, "the attention backward")?,
                0..1,
            ));
        }
        self.record_backward(encoder, bindings, lengths, true, &grids);
        Ok(())
    }

    /// Records the given chunks of the given stages in one compute pass, after the key mask's
    /// copy into the scratch buffer when `copy_mask`.
    fn record_backward(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        bindings: &BackwardBindings,
        lengths: Lengths,
        copy_mask: bool,
        stages: &[(Stage, [u32; 3], std::ops::Range<u32>)],
    ) {
        // Both exist: the callers checked (backward_part, and gradients imply the fused path).
        let (Some(bw), Ok(core)) = (self.backward.as_ref(), self.fused_core()) else {
            return;
        };
        if copy_mask && let Some(mask) = &bindings.key_mask {
            let rows = (self.config.batch * self.config.heads * lengths.q_len) as u64;
            let bytes = (self.config.batch * lengths.kv_len * 4) as u64;
            encoder.copy_buffer_to_buffer(mask, 0, &bw.aux, grad_kernels::mask_offset(rows), bytes);
        }
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("attention backward"),
            timestamp_writes: None,
        });
        let offsets = core.offsets(lengths.q_len as u32, lengths.kv_len as u32);
        for (stage, [x, y, z], chunks) in stages {
            let group = match stage {
                Stage::Prep => &bindings.prep,
                Stage::Kv => &bindings.kv,
                Stage::Q => &bindings.q,
            };
            pass.set_pipeline(&bw.pipeline(*stage).pipeline);
            pass.set_bind_group(0, group, &offsets);
            for c in chunks.clone() {
                pass.set_bind_group(1, &self.chunks.group, &[c * self.chunks.stride]);
                pass.dispatch_workgroups(*x, *y, *z);
            }
        }
    }

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
