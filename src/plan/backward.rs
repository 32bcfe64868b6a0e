//! The layer's backward on the GPU, for a plan built with
//! [`crate::AttentionConfig::gradients`]:
//! given `dY = ∂L/∂out`, the gradients of x and of every weight and bias, in f32.
//!
//! The steps, recorded after the forward (which saved each query row's logsumexp):
//! 1. with an output projection, `dA = dY W_oᵀ` and `[Aᵀ; 1] dY` (`dW_o` with `db_o` as its
//!    last row): two GEMMs reading `W_o` and `A` transposed by index;
//! 2. the operator's backward kernels ([`crate::operator`]'s `GradKernels`: one attention
//!    backward for the operator and the layer) on the qkv buffer the forward projected, Q, K
//!    and V bound as three ranges of it, writing `dQ | dK | dV` into one buffer laid out the
//!    same way (head-major, sections 256-byte aligned), with no K/V copies;
//! 3. `dx = dQKV W_qkvᵀ`: ONE GEMM, W_qkv being the packed `[d_model, qkv_width]` weight and
//!    dQKV read head-major as `[tokens, qkv_width]`;
//! 4. `[xᵀ; 1] dQKV`: ONE GEMM for `dW_q`, `dW_k`, `dW_v` and their biases' gradients (the
//!    last row: a bias is the weight of an input that is always 1).
//!
//! The packed gradients (`[d_model + 1, qkv_width]` and `[heads · head_dim_v + 1, d_out]`) are
//! what [`AttentionPlan::encode_backward`] writes; [`AttentionPlan::unpack_grads`] (in
//! `grads.rs`, with the host-tensor [`AttentionPlan::run_with_grad`]) turns them into the
//! weights' own shapes.

use super::steps::{self, CoreTables, Dispatch, Piece, Res, Step, gemm_step};
use super::{AttentionPlan, buffers::PlanBuffers};
use crate::context::GpuContext;
use crate::error::{Error, Result};
use crate::gpu::{STORAGE, buffer, check_storage, scoped, scoped_async};
use crate::kernels::gemm::{Load, ReadB, Store, spec_with};
use crate::kernels::{Layout, fold_grid, pad4};
use crate::operator::grad_kernels::{self, GradKernels, GradStage};
use crate::precision::Precision;
use crate::stage::Stage;

/// The application's buffers for one backward call of an [`AttentionPlan`] built with
/// [`crate::AttentionConfig::with_gradients`]: the forward's (bound with the same buffers for x, the
/// mask and the output, recorded before), the gradient of the output, and where the
/// gradients go. All f32, each with `STORAGE` usage:
/// - `x`, `key_mask`, `output`: as in [`super::AttentionIo`]; the mask also needs
///   `COPY_SRC` (the backward copies it beside its statistics);
/// - `grad_out`: `∂L/∂out`, `[batch, seq, d_out]`, read as vec4, so its size rounded up to a
///   multiple of 16 bytes;
/// - `grad_x`: `[batch, seq, d_model]`, written;
/// - `grad_w_qkv`: `[d_model + 1, qkv_width]` ([`AttentionPlan::qkv_width`]), written: the
///   gradient of the packed `[W_q | W_k | W_v]` (each head's columns padded to a multiple of
///   4), its last row the gradient of the packed biases;
/// - `grad_w_o`: `[heads · head_dim_v + 1, d_out]`, written, exactly when the layer has an
///   output projection: `∂L/∂W_o`, its last row `∂L/∂b_o`.
#[derive(Debug, Clone, Copy)]
pub struct LayerBackwardIo<'a> {
    /// The forward's input.
    pub x: &'a wgpu::Buffer,
    /// The forward's key-padding mask, if the configuration has one.
    pub key_mask: Option<&'a wgpu::Buffer>,
    /// The forward's output.
    pub output: &'a wgpu::Buffer,
    /// `∂L/∂out`.
    pub grad_out: &'a wgpu::Buffer,
    /// Where `∂L/∂x` goes.
    pub grad_x: &'a wgpu::Buffer,
    /// Where the packed `∂L/∂[W_q | W_k | W_v]` and bias gradients go.
    pub grad_w_qkv: &'a wgpu::Buffer,
    /// Where `∂L/∂W_o` and `∂L/∂b_o` go, with an output projection.
    pub grad_w_o: Option<&'a wgpu::Buffer>,
}

/// Bind groups tying a plan's backward to one set of application buffers; made once by
/// [`AttentionPlan::bind_backward`], reused by every [`AttentionPlan::encode_backward`].
#[derive(Debug)]
pub struct LayerBackwardBindings {
    plan: u64,
    groups: Vec<Option<wgpu::BindGroup>>,
    key_mask: Option<wgpu::Buffer>,
}

/// The backward's steps and buffers, made with the plan.
#[derive(Debug)]
pub(super) struct LayerBackward {
    pub steps: Vec<Step>,
    whole: Vec<Piece>,
    /// lse and D per query row, then the key mask (`shaders/attention_bwd.wgsl`).
    aux: wgpu::Buffer,
    pub own: OwnGrads,
    pub own_bindings: Option<LayerBackwardBindings>,
    /// Bytes of every buffer the backward added to the plan.
    pub memory_bytes: u64,
}

/// The buffers [`AttentionPlan::run_with_grad`] uploads `∂L/∂out` to and reads back from.
#[derive(Debug)]
pub(super) struct OwnGrads {
    pub grad_out: wgpu::Buffer,
    pub grad_x: wgpu::Buffer,
    pub grad_w_qkv: wgpu::Buffer,
    pub grad_w_o: Option<wgpu::Buffer>,
    pub staging: wgpu::Buffer,
    pub belt: wgpu::util::StagingBelt,
}

/// Sizes in f32 elements of the three gradient buffers: dx, packed dW_qkv, packed dW_o.
pub(super) fn grad_lens(l: &Layout, has_w_o: bool) -> [u64; 3] {
    let hv = (l.heads * l.head_dim_v) as u64;
    [
        l.tokens() * l.d_model as u64,
        (l.d_model as u64 + 1) * l.qkv_width() as u64,
        if has_w_o {
            (hv + 1) * l.d_out as u64
        } else {
            0
        },
    ]
}

impl LayerBackward {
    /// Compiles the backward's kernels and makes its buffers and steps.
    pub async fn new(
        ctx: &GpuContext,
        l: &Layout,
        bufs: &PlanBuffers,
        core: &CoreTables,
    ) -> Result<Self> {
        let kernels = GradKernels::new(ctx, l.head_dim, l.head_dim_v, l.has_mask, false).await?;
        let device = ctx.device();
        let (t, dm, hv, nq) = (
            l.tokens() as u32,
            l.d_model,
            l.heads * l.head_dim_v,
            l.qkv_width(),
        );
        let rows = l.tokens() * l.heads as u64;
        let has_w_o = bufs.w_o.is_some();
        let lens = grad_lens(l, has_w_o);
        let widest = [pad4(hv), l.d_out_pad, pad4(dm), nq].into_iter().max();
        let bytes = |n: u64| (n * 4).next_multiple_of(16);
        let (aux, absent, zeros, dqkv, d_attention, own) =
            scoped_async(device, "creating the layer backward's buffers", || {
                let aux = buffer(
                    device,
                    "backward scratch",
                    grad_kernels::scratch_bytes(
                        l.batch as u64,
                        l.heads as u64,
                        l.seq as u64,
                        l.seq as u64,
                    ),
                    STORAGE,
                );
                let absent = buffer(device, "absent bias", 4, STORAGE);
                // The backward's products add a bias like the forward's: zeros.
                let zeros = buffer(device, "zero bias", widest.unwrap_or(4) as u64 * 4, STORAGE);
                let dqkv = buffer(device, "dqkv", l.qkv_len * 4, STORAGE);
                let d_attention = has_w_o.then(|| {
                    buffer(
                        device,
                        "d_attention",
                        bytes(l.tokens() * hv as u64),
                        STORAGE,
                    )
                });
                let read_back = wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST;
                let grad_out_bytes = bytes(l.tokens() * l.d_out as u64);
                let own = OwnGrads {
                    grad_out: buffer(device, "grad_out", grad_out_bytes, STORAGE),
                    grad_x: buffer(device, "grad_x", bytes(lens[0]), STORAGE),
                    grad_w_qkv: buffer(device, "grad_w_qkv", bytes(lens[1]), STORAGE),
                    grad_w_o: has_w_o.then(|| buffer(device, "grad_w_o", bytes(lens[2]), STORAGE)),
                    staging: buffer(
                        device,
                        "backward read-back",
                        lens.iter().map(|&n| bytes(n)).sum(),
                        read_back,
                    ),
                    belt: wgpu::util::StagingBelt::new(
                        device.clone(),
                        grad_out_bytes.next_multiple_of(256),
                    ),
                };
                (aux, absent, zeros, dqkv, d_attention, own)
            })
            .await?;
        let own_buf = |b: &wgpu::Buffer| Res::Own(b.clone());
        let f32 = Precision::F32;
        let limits = ctx.limits();
        let mut steps = Vec::new();
        // The attention's output and its gradient: the concatenated heads and dA with an
        // output projection, else the layer's own output and dY.
        let (o, d_o) = match (&bufs.attention, &d_attention, &bufs.w_o) {
            (Some(a), Some(da), Some((w_o, _))) => {
                steps.push(
                    gemm_step(
                        ctx,
                        Stage::OutputProjection,
                        "backward: dA = dY W_oᵀ",
                        spec_with(
                            t,
                            pad4(hv),
                            l.d_out,
                            Load::Strided {
                                sm: l.d_out,
                                sk: 1,
                                rows: t,
                            },
                            ReadB::Strided {
                                sk: 1,
                                sn: l.d_out_pad,
                                cols: hv,
                            },
                            Store::RowMajor {
                                ldc: hv,
                                n_store: hv,
                            },
                            f32,
                            &limits,
                        ),
                        vec![Res::GradOut, own_buf(w_o), own_buf(&zeros), own_buf(da)],
                    )
                    .await?,
                );
                steps.push(
                    gemm_step(
                        ctx,
                        Stage::OutputProjection,
                        "backward: dW_o, db_o = [Aᵀ; 1] dY",
                        spec_with(
                            hv + 1,
                            l.d_out_pad,
                            t,
                            Load::Strided {
                                sm: 1,
                                sk: hv,
                                rows: hv,
                            },
                            ReadB::Strided {
                                sk: l.d_out,
                                sn: 1,
                                cols: l.d_out,
                            },
                            Store::RowMajor {
                                ldc: l.d_out,
                                n_store: l.d_out,
                            },
                            f32,
                            &limits,
                        ),
                        vec![own_buf(a), Res::GradOut, own_buf(&zeros), Res::GradWo],
                    )
                    .await?,
                );
                (own_buf(a), own_buf(da))
            }
            _ => (Res::Output, Res::GradOut),
        };
        let lse = bufs
            .lse
            .as_ref()
            .ok_or_else(|| Error::InvalidConfig("the plan's forward saves no logsumexp".into()))?;
        let [q, k, v] = steps::sections(l, &bufs.qkv);
        let [dq, dk, dv] = steps::sections(l, &dqkv);
        let lengths = || Res::Lengths(core.lengths.clone());
        let heads = [l.batch, l.heads, l.heads];
        let stages = [
            (
                GradStage::Prep,
                "backward: D = rowsum(dO ∘ O)",
                vec![o, d_o.clone(), own_buf(lse), own_buf(&aux)],
            ),
            (
                GradStage::Kv,
                "backward: dK, dV",
                vec![
                    q.clone(),
                    k.clone(),
                    v.clone(),
                    d_o.clone(),
                    own_buf(&aux),
                    own_buf(&absent),
                    dk,
                    dv,
                ],
            ),
            (
                GradStage::Q,
                "backward: dQ",
                vec![q, k, v, d_o, own_buf(&aux), own_buf(&absent), dq],
            ),
        ];
        let attention_flops = grad_kernels::flops(
            rows as f64 * l.seq as f64,
            l.causal,
            l.head_dim as f64,
            l.head_dim_v as f64,
        );
        for (stage, label, mut resources) in stages {
            resources.extend([lengths(), lengths()]);
            let workgroups = kernels.workgroups(heads, l.seq, l.seq, stage);
            steps.push(Step::Dispatch(Dispatch {
                stage: Stage::FusedAttention,
                label,
                pipeline: kernels.pipeline(stage).clone(),
                params: core.params.clone(),
                workgroups,
                grid: fold_grid(
                    workgroups,
                    limits.max_compute_workgroups_per_dimension,
                    label,
                )?,
                flops: match stage {
                    GradStage::Prep => 0.0,
                    GradStage::Kv => 0.6 * attention_flops,
                    GradStage::Q => 0.4 * attention_flops,
                },
                resources,
                offsets: core.offsets.clone(),
            }));
        }
        let hm = l.head_major();
        steps.push(
            gemm_step(
                ctx,
                Stage::Projection,
                "backward: dx = dQKV W_qkvᵀ",
                spec_with(
                    t,
                    pad4(dm),
                    nq,
                    Load::Qkv(hm),
                    ReadB::Strided {
                        sk: 1,
                        sn: nq,
                        cols: dm,
                    },
                    Store::RowMajor {
                        ldc: dm,
                        n_store: dm,
                    },
                    f32,
                    &limits,
                ),
                vec![
                    own_buf(&dqkv),
                    own_buf(&bufs.w_qkv),
                    own_buf(&zeros),
                    Res::GradX,
                ],
            )
            .await?,
        );
        steps.push(
            gemm_step(
                ctx,
                Stage::Projection,
                "backward: dW_qkv, db_qkv = [xᵀ; 1] dQKV",
                spec_with(
                    dm + 1,
                    nq,
                    t,
                    Load::Strided {
                        sm: 1,
                        sk: dm,
                        rows: dm,
                    },
                    ReadB::HeadMajor(hm),
                    Store::RowMajor {
                        ldc: nq,
                        n_store: nq,
                    },
                    f32,
                    &limits,
                ),
                vec![Res::X, own_buf(&dqkv), own_buf(&zeros), Res::GradWqkv],
            )
            .await?,
        );
        let mut all = vec![&aux, &absent, &zeros, &dqkv, &own.grad_out, &own.grad_x];
        all.extend([&own.grad_w_qkv, &own.staging]);
        all.extend(d_attention.iter().chain(&own.grad_w_o));
        all.extend(steps.iter().filter_map(|s| match s {
            Step::Dispatch(d) if d.stage != Stage::FusedAttention => Some(&d.params),
            _ => None,
        }));
        let memory_bytes = all.iter().map(|b| b.size()).sum::<u64>() + lse.size();
        Ok(LayerBackward {
            whole: steps::whole(&steps),
            steps,
            aux,
            own,
            own_bindings: None,
            memory_bytes,
        })
    }
}

impl AttentionPlan {
    pub(super) fn backward_part(&self) -> Result<&LayerBackward> {
        self.backward.as_ref().ok_or_else(|| {
            Error::InvalidConfig(
                "the plan was built without gradients: build it from \
                 AttentionConfig::with_gradients() to run its backward"
                    .into(),
            )
        })
    }

    /// Columns of the packed `[W_q | W_k | W_v]` (each head's columns padded to a multiple of
    /// 4): the width of [`LayerBackwardIo::grad_w_qkv`].
    pub fn qkv_width(&self) -> usize {
        self.layout.qkv_width() as usize
    }

    /// Makes the bind groups that tie this plan's backward to an application's buffers,
    /// checking each (usage, size). Call once per set of buffers and keep the result.
    pub fn bind_backward(&self, io: LayerBackwardIo<'_>) -> Result<LayerBackwardBindings> {
        let _device = self.ctx.kernels().exclusive();
        let bw = self.backward_part()?;
        let l = &self.layout;
        let lens = grad_lens(l, self.bufs.w_o.is_some());
        let out = l.tokens() * l.d_out as u64;
        check_storage("x", io.x, l.tokens() * l.d_model as u64 * 4, "")?;
        check_storage("output", io.output, out * 4, "")?;
        check_storage("grad_out", io.grad_out, (out * 4).next_multiple_of(16), "")?;
        check_storage("grad_x", io.grad_x, lens[0] * 4, "")?;
        check_storage("grad_w_qkv", io.grad_w_qkv, lens[1] * 4, "")?;
        match (self.bufs.w_o.is_some(), io.grad_w_o) {
            (true, Some(b)) => check_storage("grad_w_o", b, lens[2] * 4, "")?,
            (true, None) => {
                return Err(Error::BadBuffer {
                    name: "grad_w_o",
                    problem: "the layer has an output projection but no buffer was given".into(),
                });
            }
            (false, Some(_)) => {
                return Err(Error::BadBuffer {
                    name: "grad_w_o",
                    problem: "given, but the layer has no output projection".into(),
                });
            }
            (false, None) => {}
        }
        let mask = match (l.has_mask, io.key_mask) {
            (true, Some(m)) => {
                check_storage("key_mask", m, l.tokens() * 4, "")?;
                if !m.usage().contains(wgpu::BufferUsages::COPY_SRC) {
                    return Err(Error::BadBuffer {
                        name: "key_mask",
                        problem: format!(
                            "the backward copies it, so it needs COPY_SRC usage; has {:?}",
                            m.usage()
                        ),
                    });
                }
                Some(m)
            }
            (true, None) => {
                return Err(Error::BadBuffer {
                    name: "key_mask",
                    problem: "the configuration has a key-padding mask but no buffer was given"
                        .into(),
                });
            }
            (false, Some(_)) => {
                return Err(Error::BadBuffer {
                    name: "key_mask",
                    problem: "given, but the configuration has no key-padding mask".into(),
                });
            }
            (false, None) => None,
        };
        make_groups(self.ctx.device(), self.id, &bw.steps, io, mask)
    }

    /// Records the layer's backward into `encoder`, after the forward recorded on the same
    /// buffers ([`AttentionPlan::encode`]; it saved the logsumexp the backward reads): every
    /// dispatch, reading and writing the buffers of `bindings`. Nothing is allocated.
    pub fn encode_backward(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        bindings: &LayerBackwardBindings,
    ) -> Result<()> {
        let bw = self.backward_part()?;
        if bindings.plan != self.id || bindings.groups.len() != bw.steps.len() {
            return Err(Error::ForeignBindings);
        }
        self.record_backward(encoder, bw, bindings);
        Ok(())
    }

    pub(super) fn record_backward(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        bw: &LayerBackward,
        bindings: &LayerBackwardBindings,
    ) {
        let l = &self.layout;
        if let Some(mask) = &bindings.key_mask {
            let rows = l.tokens() * l.heads as u64;
            encoder.copy_buffer_to_buffer(
                mask,
                0,
                &bw.aux,
                grad_kernels::mask_offset(rows),
                l.tokens() * 4,
            );
        }
        // Every group exists (made for these steps), so recording cannot fail.
        let _ = steps::record(
            encoder,
            &bw.steps,
            &bindings.groups,
            &self.chunks,
            &bw.whole,
            None,
        );
    }
}

/// One bind group per backward dispatch, on the application's buffers and the plan's own.
pub(super) fn make_groups(
    device: &wgpu::Device,
    plan: u64,
    steps: &[Step],
    io: LayerBackwardIo<'_>,
    key_mask: Option<&wgpu::Buffer>,
) -> Result<LayerBackwardBindings> {
    let grad_w_o = io.grad_w_o;
    let groups = scoped(device, "binding the layer backward's buffers", || {
        super::bind::bind_groups(device, steps, |r| match r {
            Res::X => Some(io.x),
            Res::Output => Some(io.output),
            Res::GradOut => Some(io.grad_out),
            Res::GradX => Some(io.grad_x),
            Res::GradWqkv => Some(io.grad_w_qkv),
            Res::GradWo => grad_w_o,
            _ => None,
        })
    })?;
    Ok(LayerBackwardBindings {
        plan,
        groups,
        key_mask: key_mask.cloned(),
    })
}
