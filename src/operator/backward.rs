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

use crate::error::{Error, Result};
use crate::gpu::{STORAGE, buffer, check_storage, scoped, scoped_async};
use crate::kernels::{Pipeline, fold_grid};
use crate::tensor::Tensor;

use super::config::OperatorConfig;
use super::core::Core;
use super::grad_kernels::{self, GradKernels, GradStage as Stage};
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
    pub(super) op: u64,
    pub(super) prep: wgpu::BindGroup,
    pub(super) kv: wgpu::BindGroup,
    pub(super) q: wgpu::BindGroup,
    pub(super) key_mask: Option<wgpu::Buffer>,
}

/// The buffers [`AttentionOp::run_backward`] uploads to and reads back from (Q, K, V, the
/// mask, the bias and O use the operator's own forward buffers).
#[derive(Debug)]
pub(super) struct OwnGrads {
    pub(super) lse: wgpu::Buffer,
    pub(super) lse_staging: wgpu::Buffer,
    pub(super) grad_out: wgpu::Buffer,
    pub(super) grad_q: wgpu::Buffer,
    pub(super) grad_k: wgpu::Buffer,
    pub(super) grad_v: wgpu::Buffer,
    pub(super) staging: wgpu::Buffer,
    pub(super) belt: wgpu::util::StagingBelt,
}

/// The backward's pipelines, tiles and scratch, made with the operator.
#[derive(Debug)]
pub(crate) struct Backward {
    pub(super) kernels: GradKernels,
    /// lse and D per query row, then the key mask: see `shaders/attention_bwd.wgsl`.
    pub(super) aux: wgpu::Buffer,
    /// Four bytes bound as the bias where there is none: the kernels never read it.
    pub(super) absent: wgpu::Buffer,
    pub(super) own: OwnGrads,
    pub(super) own_bindings: Option<BackwardBindings>,
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
    pub(super) fn workgroups(
        &self,
        config: &OperatorConfig,
        lengths: Lengths,
        stage: Stage,
    ) -> u32 {
        let heads = [config.batch, config.heads, config.kv_heads].map(|n| n as u32);
        let (nq, nk) = (lengths.q_len as u32, lengths.kv_len as u32);
        self.kernels.workgroups(heads, nq, nk, stage)
    }

    pub(super) fn pipeline(&self, stage: Stage) -> &Pipeline {
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
pub(super) fn backward_flops(config: &OperatorConfig, lengths: Lengths) -> f64 {
    let pairs = (config.batch * config.heads) as f64 * lengths.q_len as f64 * lengths.kv_len as f64;
    grad_kernels::flops(
        pairs,
        config.causal,
        config.head_dim as f64,
        config.head_dim_v as f64,
    )
}

pub(super) fn make_groups(
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
    pub(super) fn fused_core(&self) -> Result<&Core> {
        match &self.path {
            super::Path::Fused(core) => Ok(core),
            super::Path::Staged(_) => Err(Error::InvalidConfig(
                "the attention backward needs the fused kernel's forward".into(),
            )),
        }
    }

    pub(super) fn backward_part(&self) -> Result<&Backward> {
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
    pub(super) fn record_backward(
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
}
