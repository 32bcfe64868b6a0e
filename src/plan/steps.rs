//! The plan's step graph (which dispatches and copies run, on which buffers) and how it is
//! recorded: whole into an application's encoder, or cut into submissions of bounded work.

use super::buffers::PlanBuffers;
use crate::config::{AttentionConfig, KernelChoice};
use crate::context::GpuContext;
use crate::error::{Error, Result};
use crate::gpu::{init_uniform, scoped_async};
use crate::kernels::fused::FusedGeometry;
use crate::kernels::{ChunkTable, DispatchSpec, Layout, Pipeline, fold_grid, gemm};
pub(super) use crate::kernels::{Piece, Work, submissions};
use crate::operator::{Core, StagedCore};
use crate::stage::Stage;

/// A buffer a dispatch binds, resolved when bind groups are made: the caller's input, mask or
/// output, or one of the plan's own.
#[derive(Debug, Clone)]
pub(super) enum Res {
    X,
    KeyMask,
    Output,
    Own(wgpu::Buffer),
    /// A table of lengths, bound one entry wide at the dispatch's dynamic offsets.
    Lengths(wgpu::Buffer),
    /// `size` bytes of one of the plan's buffers from byte `offset` (a section of qkv).
    Range(wgpu::Buffer, u64, u64),
    /// The backward's caller buffers: `∂L/∂out`, and where `∂L/∂x`, the packed
    /// `∂L/∂[W_q | W_k | W_v]` and `∂L/∂W_o` go.
    GradOut,
    GradX,
    GradWqkv,
    GradWo,
}

/// One kernel dispatch of the plan, ready but for its bind group.
#[derive(Debug)]
pub(super) struct Dispatch {
    pub stage: Stage,
    /// The debug group's name: the stage's, or the backward product's.
    pub label: &'static str,
    pub pipeline: Pipeline,
    pub params: wgpu::Buffer,
    pub workgroups: u32,
    /// The whole dispatch's grid (one chunk).
    pub grid: [u32; 3],
    pub flops: f64,
    /// Bindings 1.. in order (binding 0 is always `params`).
    pub resources: Vec<Res>,
    /// The dynamic offsets of group 0 (the attention core's lengths), in binding order.
    pub offsets: Vec<u32>,
}

#[derive(Debug)]
pub(super) enum Step {
    Dispatch(Dispatch),
    Copy {
        from: wgpu::Buffer,
        to: wgpu::Buffer,
        bytes: u64,
    },
}

impl Step {
    /// What the schedule needs to know of the step: `None` for a copy.
    pub fn work(&self) -> Option<Work> {
        match self {
            Step::Dispatch(d) => Some(Work {
                workgroups: d.workgroups,
                flops: d.flops,
            }),
            Step::Copy { .. } => None,
        }
    }
}

/// Where to write timestamps: at the beginning of the first compute pass recorded and at the
/// end of the last, so that what is timed is the whole stream as it runs.
#[derive(Debug, Clone, Copy)]
pub(super) struct Stamps<'a> {
    pub query_set: &'a wgpu::QuerySet,
    pub beginning: Option<u32>,
    pub end: Option<u32>,
}

/// One dispatch of a kernel that reads no lengths (the GEMM), with its own parameters.
pub(super) async fn gemm_step(
    ctx: &GpuContext,
    stage: Stage,
    label: &'static str,
    spec: DispatchSpec,
    resources: Vec<Res>,
) -> Result<Step> {
    let limits = ctx.limits();
    let pipeline = ctx.kernels().pipeline(spec.kernel, &spec.overrides).await?;
    let grid = fold_grid(
        spec.workgroups,
        limits.max_compute_workgroups_per_dimension,
        label,
    )?;
    let params = scoped_async(ctx.device(), "creating uniform parameters", || {
        init_uniform(ctx.device(), label, &spec.params)
    })
    .await?;
    Ok(Step::Dispatch(Dispatch {
        stage,
        label,
        pipeline,
        params,
        workgroups: spec.workgroups,
        grid,
        flops: spec.flops,
        resources,
        offsets: Vec::new(),
    }))
}

/// The fused attention core of a plan with gradients, which the backward's kernels share:
/// its parameters (the strides of Q, K, V and O), its table of lengths and the offsets of a
/// call at the layer's length.
#[derive(Debug)]
pub(super) struct CoreTables {
    pub params: wgpu::Buffer,
    pub lengths: wgpu::Buffer,
    pub offsets: Vec<u32>,
}

/// What [`build`] makes.
pub(super) struct Built {
    pub steps: Vec<Step>,
    /// The staged path's (scores, probabilities) buffers.
    pub scores: Option<(wgpu::Buffer, wgpu::Buffer)>,
    /// The fused core's tables, when the layer has gradients.
    pub core: Option<CoreTables>,
}

/// The bytes of each of Q, K and V in the qkv buffer (and of each gradient in dqkv), from
/// their 256-byte aligned offsets.
pub(super) fn sections(l: &Layout, buffer: &wgpu::Buffer) -> [Res; 3] {
    let rows = l.batch as u64 * l.heads as u64 * l.seq as u64;
    let qk = rows * l.dp as u64 * 4;
    [
        Res::Range(buffer.clone(), l.q_offset as u64 * 4, qk),
        Res::Range(buffer.clone(), l.k_offset as u64 * 4, qk),
        Res::Range(
            buffer.clone(),
            l.v_offset as u64 * 4,
            rows * l.dvp as u64 * 4,
        ),
    ]
}

/// Every dispatch of the plan, in order: the projection, the attention (staged or fused), the
/// output projection; and the staged path's (scores, probabilities) buffers.
pub(super) async fn build(
    ctx: &GpuContext,
    config: &AttentionConfig,
    l: &Layout,
    bufs: &PlanBuffers,
) -> Result<Built> {
    let limits = ctx.limits();
    let own = |b: &wgpu::Buffer| Res::Own(b.clone());
    let dispatch = async |stage: Stage, spec: DispatchSpec, resources: Vec<Res>| {
        gemm_step(ctx, stage, stage.label(), spec, resources).await
    };
    // The heads go straight to the output unless a projection follows.
    let heads_out = || match &bufs.attention {
        Some(a) => own(a),
        None => Res::Output,
    };
    let mut steps = vec![
        dispatch(
            Stage::Projection,
            gemm::spec(
                l.batch * l.seq,
                l.qkv_width(),
                l.d_model,
                gemm::Store::HeadSplit(l.head_major()),
                config.precision,
                &limits,
            ),
            vec![Res::X, own(&bufs.w_qkv), own(&bufs.b_qkv), own(&bufs.qkv)],
        )
        .await?,
    ];
    let geometry = FusedGeometry::for_plan(l, config);
    let mut scores = None;
    let mut tables = None;
    if l.kernel == KernelChoice::Fused {
        // The operator's core, on the qkv buffer the projection wrote: one attention
        // kernel for the layer and the operator.
        let core = Core::new(ctx, geometry, l.seq, l.seq, l.seq).await?;
        let workgroups = core.workgroups(l.seq);
        let lengths = || Res::Lengths(core.lengths.buffer.clone());
        steps.push(Step::Dispatch(Dispatch {
            stage: Stage::FusedAttention,
            label: Stage::FusedAttention.label(),
            pipeline: core.pipeline.clone(),
            params: core.params.clone(),
            workgroups,
            grid: fold_grid(
                workgroups,
                limits.max_compute_workgroups_per_dimension,
                Stage::FusedAttention.label(),
            )?,
            flops: core.geometry.flops(l.seq, l.seq),
            // The packed variant: Q, K and V in one binding, a mask only if there is one. With
            // gradients, Q, K and V as three ranges of it, and the logsumexp saved.
            resources: match &bufs.lse {
                None => vec![own(&bufs.qkv)],
                Some(_) => sections(l, &bufs.qkv).to_vec(),
            }
            .into_iter()
            .chain(l.has_mask.then_some(Res::KeyMask))
            .chain([heads_out()])
            .chain(bufs.lse.as_ref().map(own))
            .chain([lengths(), lengths()])
            .collect(),
            offsets: core.offsets(l.seq, l.seq).to_vec(),
        }));
        if bufs.lse.is_some() {
            tables = Some(CoreTables {
                params: core.params.clone(),
                lengths: core.lengths.buffer.clone(),
                offsets: core.offsets(l.seq, l.seq).to_vec(),
            });
        }
    } else {
        // The operator's staged core, on the same qkv buffer: its three kernels, with the
        // scores copied aside before the softmax overwrites them when they are to be read.
        let core = StagedCore::new(
            ctx,
            geometry,
            l.seq,
            l.seq,
            l.seq,
            config.keep_intermediates,
        )
        .await?;
        let workgroups = core.workgroups(l.seq, l.seq);
        let flops = core.flops(l.seq, l.seq);
        let offsets = core.offsets(l.seq, l.seq).to_vec();
        let lengths = || Res::Lengths(core.lengths.buffer.clone());
        let stages = [Stage::Scores, Stage::Softmax, Stage::WeightedSum];
        let resources = [
            [own(&bufs.qkv), own(&bufs.qkv), own(&core.scores)],
            [Res::KeyMask, own(&core.absent), own(&core.probs)],
            [own(&core.probs), own(&bufs.qkv), heads_out()],
        ];
        for (k, resources) in resources.into_iter().enumerate() {
            if k == 1 && core.keeps_scores() {
                steps.push(Step::Copy {
                    from: core.scores.clone(),
                    to: core.probs.clone(),
                    bytes: core.call_bytes(l.seq, l.seq),
                });
            }
            let mut resources = resources.to_vec();
            resources.extend([lengths(), lengths()]);
            steps.push(Step::Dispatch(Dispatch {
                stage: stages[k],
                label: stages[k].label(),
                pipeline: core.pipelines[k].clone(),
                params: core.params.clone(),
                workgroups: workgroups[k],
                grid: fold_grid(
                    workgroups[k],
                    limits.max_compute_workgroups_per_dimension,
                    stages[k].label(),
                )?,
                flops: flops[k],
                resources,
                offsets: offsets.clone(),
            }));
        }
        scores = Some((core.scores.clone(), core.probs.clone()));
    }
    if let (Some(a), Some((w_o, b_o))) = (&bufs.attention, &bufs.w_o) {
        steps.push(
            dispatch(
                Stage::OutputProjection,
                gemm::spec(
                    l.batch * l.seq,
                    l.d_out_pad,
                    l.heads * l.head_dim_v,
                    gemm::Store::RowMajor {
                        ldc: l.d_out,
                        n_store: l.d_out,
                    },
                    config.precision,
                    &limits,
                ),
                vec![own(a), own(w_o), own(b_o), Res::Output],
            )
            .await?,
        );
    }
    Ok(Built {
        steps,
        scores,
        core: tables,
    })
}

/// Each step whole: what [`super::AttentionPlan::encode`] records.
pub(super) fn whole(steps: &[Step]) -> Vec<Piece> {
    steps
        .iter()
        .enumerate()
        .map(|(step, s)| match s {
            Step::Dispatch(d) => Piece {
                step,
                grid: d.grid,
                chunks: 0..1,
            },
            Step::Copy { .. } => Piece {
                step,
                grid: [0; 3],
                chunks: 0..0,
            },
        })
        .collect()
}

/// Records `pieces` into `encoder`: runs of dispatches share one compute pass (wgpu orders
/// them with barriers inside it, and each pass begun and ended costs time on every backend);
/// copies split the runs. Each dispatch sits in a debug group named for its stage, so that an
/// application's GPU captures (RenderDoc, Xcode, PIX) show it by name.
pub(super) fn record(
    encoder: &mut wgpu::CommandEncoder,
    steps: &[Step],
    groups: &[Option<wgpu::BindGroup>],
    chunks: &ChunkTable,
    pieces: &[Piece],
    stamps: Option<Stamps<'_>>,
) -> Result<()> {
    let is_dispatch = |p: &Piece| matches!(steps[p.step], Step::Dispatch(_));
    let runs = || pieces.chunk_by(|a, b| is_dispatch(a) && is_dispatch(b));
    let passes = runs().filter(|r| is_dispatch(&r[0])).count();
    let mut pass_index = 0;
    for run in runs() {
        if let [p] = run
            && let Step::Copy { from, to, bytes } = &steps[p.step]
        {
            encoder.copy_buffer_to_buffer(from, 0, to, 0, *bytes);
            continue;
        }
        let timestamp_writes = stamps.and_then(|s| {
            let beginning = s.beginning.filter(|_| pass_index == 0);
            let end = s.end.filter(|_| pass_index + 1 == passes);
            (beginning.is_some() || end.is_some()).then_some(wgpu::ComputePassTimestampWrites {
                query_set: s.query_set,
                beginning_of_pass_write_index: beginning,
                end_of_pass_write_index: end,
            })
        });
        pass_index += 1;
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("attention"),
            timestamp_writes,
        });
        for piece in run {
            let (Step::Dispatch(d), Some(group)) = (&steps[piece.step], &groups[piece.step]) else {
                return Err(Error::ForeignBindings);
            };
            pass.push_debug_group(d.label);
            pass.set_pipeline(&d.pipeline.pipeline);
            pass.set_bind_group(0, group, &d.offsets);
            let [x, y, z] = piece.grid;
            for c in piece.chunks.clone() {
                pass.set_bind_group(1, &chunks.group, &[c * chunks.stride]);
                pass.dispatch_workgroups(x, y, z);
            }
            pass.pop_debug_group();
        }
    }
    Ok(())
}
