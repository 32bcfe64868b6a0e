//! The plan's step graph (which dispatches and copies run, on which buffers) and how it is
//! recorded: whole into an application's encoder, or cut into submissions of bounded work.

use std::ops::Range;

use super::buffers::PlanBuffers;
use crate::config::AttentionConfig;
use crate::context::GpuContext;
use crate::error::{Error, Result};
use crate::gpu::{init_uniform, scoped_async};
use crate::kernels::fused::FusedGeometry;
use crate::kernels::{
    self, ChunkTable, DispatchSpec, Layout, MAX_CHUNKS, Pipeline, fold_grid, gemm,
};
use crate::operator::Core;
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
}

/// One kernel dispatch of the plan, ready but for its bind group.
#[derive(Debug)]
pub(super) struct Dispatch {
    pub stage: Stage,
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

/// A dispatch's size, for cutting it into submissions.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Work {
    pub workgroups: u32,
    pub flops: f64,
}

/// Part of a step: a copy, or chunks `chunks` of a dispatch recorded with grid `grid`.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Piece {
    pub step: usize,
    pub grid: [u32; 3],
    pub chunks: Range<u32>,
}

/// Where to write timestamps: at the beginning of the first compute pass recorded and at the
/// end of the last, so that what is timed is the whole stream as it runs.
#[derive(Debug, Clone, Copy)]
pub(super) struct Stamps<'a> {
    pub query_set: &'a wgpu::QuerySet,
    pub beginning: Option<u32>,
    pub end: Option<u32>,
}

/// Every dispatch of the plan, in order: the projection, the attention (staged or fused), the
/// output projection.
pub(super) async fn build(
    ctx: &GpuContext,
    config: &AttentionConfig,
    l: &Layout,
    bufs: &PlanBuffers,
) -> Result<Vec<Step>> {
    let limits = ctx.limits();
    let own = |b: &wgpu::Buffer| Res::Own(b.clone());
    let dispatch = async |stage: Stage, spec: DispatchSpec, resources: Vec<Res>| -> Result<Step> {
        let pipeline = ctx.kernels().pipeline(spec.kernel, &spec.overrides).await?;
        let grid = fold_grid(
            spec.workgroups,
            limits.max_compute_workgroups_per_dimension,
            stage.label(),
        )?;
        let params = scoped_async(ctx.device(), "creating uniform parameters", || {
            init_uniform(ctx.device(), stage.label(), &spec.params)
        })
        .await?;
        Ok(Step::Dispatch(Dispatch {
            stage,
            pipeline,
            params,
            workgroups: spec.workgroups,
            grid,
            flops: spec.flops,
            resources,
            offsets: Vec::new(),
        }))
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
                gemm::Store::HeadSplit {
                    seq: l.seq,
                    heads: l.heads,
                    width_qk: l.dp,
                    width_v: l.dvp,
                    k_offset: l.k_offset,
                    v_offset: l.v_offset,
                },
                config.precision,
                &limits,
            ),
            vec![Res::X, own(&bufs.w_qkv), own(&bufs.b_qkv), own(&bufs.qkv)],
        )
        .await?,
    ];
    match &bufs.scores {
        None => {
            // The operator's core, on the qkv buffer the projection wrote: one attention
            // kernel for the layer and the operator.
            let core = Core::new(
                ctx,
                FusedGeometry::for_layer(l, config.precision),
                l.seq,
                l.seq,
                l.seq,
            )
            .await?;
            let workgroups = core.workgroups(l.seq);
            let lengths = || Res::Lengths(core.lengths.buffer.clone());
            steps.push(Step::Dispatch(Dispatch {
                stage: Stage::FusedAttention,
                pipeline: core.pipeline.clone(),
                params: core.params.clone(),
                workgroups,
                grid: fold_grid(
                    workgroups,
                    limits.max_compute_workgroups_per_dimension,
                    Stage::FusedAttention.label(),
                )?,
                flops: core.geometry.flops(l.seq, l.seq),
                // The packed variant: Q, K and V in one binding, a mask only if there is one.
                resources: [own(&bufs.qkv)]
                    .into_iter()
                    .chain(l.has_mask.then_some(Res::KeyMask))
                    .chain([heads_out(), lengths(), lengths()])
                    .collect(),
                offsets: core.offsets(l.seq, l.seq).to_vec(),
            }));
        }
        Some((scores, probs)) => {
            steps.push(
                dispatch(
                    Stage::Scores,
                    kernels::scores::spec(l, &limits),
                    vec![own(&bufs.qkv), Res::KeyMask, own(scores)],
                )
                .await?,
            );
            if config.keep_intermediates {
                steps.push(Step::Copy {
                    from: scores.clone(),
                    to: probs.clone(),
                    bytes: scores.size(),
                });
            }
            steps.push(
                dispatch(
                    Stage::Softmax,
                    kernels::softmax::spec(l, &limits),
                    vec![Res::KeyMask, own(probs)],
                )
                .await?,
            );
            steps.push(
                dispatch(
                    Stage::WeightedSum,
                    kernels::weighted_sum::spec(l, &limits),
                    vec![own(probs), own(&bufs.qkv), heads_out()],
                )
                .await?,
            );
        }
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
    Ok(steps)
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

/// The steps `range` cut into submissions of at most about `budget` FLOPs each: a dispatch
/// with more work than that is split into chunks of the same grid (see
/// `shaders/dispatch.wgsl`), and consecutive pieces share a submission while they fit.
///
/// Why: a submission is one uninterrupted call for some backends. OpenGL's context is locked
/// for a whole submission, so a second thread using the same device gives up after a few
/// seconds, and OS and browser watchdogs reset a GPU whose submission runs for seconds.
pub(super) fn submissions(
    steps: &[Option<Work>],
    range: Range<usize>,
    budget: f64,
    max_per_dim: u32,
) -> Result<Vec<Vec<Piece>>> {
    let mut subs: Vec<Vec<Piece>> = vec![Vec::new()];
    let mut used = 0.0;
    for (i, step) in steps.iter().enumerate().take(range.end).skip(range.start) {
        let Some(d) = step else {
            subs.last_mut().expect("one submission").push(Piece {
                step: i,
                grid: [0; 3],
                chunks: 0..0,
            });
            continue;
        };
        let wanted = (d.flops / budget).ceil().clamp(1.0, MAX_CHUNKS as f64) as u32;
        let grid = fold_grid(
            d.workgroups.div_ceil(wanted),
            max_per_dim,
            "a dispatch chunk",
        )?;
        let per_chunk = grid.iter().map(|&g| g as u64).product::<u64>();
        let chunks = (d.workgroups as u64).div_ceil(per_chunk).max(1) as u32;
        let flops = d.flops / chunks as f64;
        for c in 0..chunks {
            if used > 0.0 && used + flops > budget {
                subs.push(Vec::new());
                used = 0.0;
            }
            used += flops;
            let sub = subs.last_mut().expect("one submission");
            match sub.last_mut() {
                Some(p) if p.step == i && p.chunks.end == c => p.chunks.end = c + 1,
                _ => sub.push(Piece {
                    step: i,
                    grid,
                    chunks: c..c + 1,
                }),
            }
        }
    }
    subs.retain(|s| !s.is_empty());
    Ok(subs)
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
            pass.push_debug_group(d.stage.label());
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

#[cfg(test)]
mod tests {
    use super::*;

    fn dispatch(workgroups: u32, flops: f64) -> Option<Work> {
        Some(Work { workgroups, flops })
    }

    /// Every workgroup of every step is dispatched exactly once, in step order, and no
    /// submission holds more than the budget unless it is a single chunk.
    fn check(steps: &[Option<Work>], budget: f64, max: u32) -> Vec<Vec<Piece>> {
        let subs = submissions(steps, 0..steps.len(), budget, max).unwrap();
        let pieces: Vec<&Piece> = subs.iter().flatten().collect();
        for (i, step) in steps.iter().enumerate() {
            let mine: Vec<&&Piece> = pieces.iter().filter(|p| p.step == i).collect();
            let Some(w) = step else {
                assert_eq!(mine.len(), 1, "copy {i} once");
                continue;
            };
            let mut next = 0;
            for p in &mine {
                assert_eq!(p.chunks.start, next, "chunks of step {i} in order");
                next = p.chunks.end;
            }
            let per = mine[0].grid.iter().map(|&g| g as u64).product::<u64>();
            assert!(mine.iter().all(|p| p.grid == mine[0].grid));
            let covered = next as u64 * per;
            assert!(covered >= w.workgroups as u64, "step {i} not covered");
            assert!(
                covered - per < w.workgroups as u64,
                "step {i}: an empty chunk"
            );
        }
        let order: Vec<usize> = pieces.iter().map(|p| p.step).collect();
        assert!(order.is_sorted(), "{order:?}");
        for sub in &subs {
            let flops: f64 = sub
                .iter()
                .map(|p| match steps[p.step] {
                    Some(w) => {
                        let n = pieces
                            .iter()
                            .filter(|q| q.step == p.step)
                            .map(|q| q.chunks.len())
                            .sum::<usize>();
                        w.flops * p.chunks.len() as f64 / n as f64
                    }
                    None => 0.0,
                })
                .sum();
            let single = sub.iter().map(|p| p.chunks.len()).sum::<usize>() <= 1;
            assert!(flops <= budget * 1.000001 || single, "{flops} > {budget}");
        }
        subs
    }

    #[test]
    fn small_work_is_one_submission_of_whole_dispatches() {
        let steps = [
            dispatch(10, 1e6),
            None,
            dispatch(300, 2e6),
            dispatch(7, 1e3),
        ];
        let subs = check(&steps, 1e9, 65535);
        assert_eq!(subs.len(), 1);
        assert!(subs[0].iter().all(|p| p.chunks.len() <= 1));
    }

    #[test]
    fn large_dispatches_split_into_chunks_within_the_budget() {
        let steps = [dispatch(64, 1e8), dispatch(4096, 8.6e9), dispatch(64, 1e8)];
        let subs = check(&steps, 1e9, 65535);
        assert!(subs.len() >= 9, "{}", subs.len());
        let chunks: usize = subs
            .iter()
            .flatten()
            .filter(|p| p.step == 1)
            .map(|p| p.chunks.len())
            .sum();
        assert_eq!(chunks, 9);
    }

    #[test]
    fn chunking_respects_folded_grids_and_the_chunk_limit() {
        check(&[dispatch(70000, 1e12)], 1e9, 100);
        let subs = check(&[dispatch(5_000_000, 1e15)], 1e6, 65535);
        let chunks: usize = subs.iter().flatten().map(|p| p.chunks.len()).sum();
        assert!(chunks <= MAX_CHUNKS as usize);
        check(&[dispatch(3, 1e12), None], 1.0, 65535);
    }
}
